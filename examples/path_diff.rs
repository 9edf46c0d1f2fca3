//! Compares the logits of one prompt computed as one batch and as prefill + decode steps
//! (debugging aid for numerical drift between the batched and single-token kernels).
use llama_tpu::backend::cpu::{CpuBackend, CpuOptions};
use llama_tpu::backend::{Backend, Next};
use llama_tpu::model::{Gguf, MappedFile};
use llama_tpu::tokenizer::Tokenizer;
use std::sync::Arc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    let file = Arc::new(MappedFile::open(std::path::Path::new(&a[1]))?);
    let g = Gguf::parse(&file)?;
    let ids = Tokenizer::from_gguf(&g)?.encode(&a[2], true)?;
    let opts = CpuOptions {
        threads: 1,
        context: Some(256),
        ..Default::default()
    };
    let mut b = CpuBackend::from_parts(file.clone(), &g, &opts)?;
    let Next::Logits(l) = b.prefill(&ids, 0)? else {
        return Err("x".into());
    };
    let batched = l.to_vec();
    let mut c = CpuBackend::from_parts(file, &g, &opts)?;
    c.prefill(&ids[..ids.len() - 1], 0)?;
    let Next::Logits(l) = c.decode(ids[ids.len() - 1], ids.len() - 1)? else {
        return Err("x".into());
    };
    let max = batched.iter().zip(l).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    println!("{} tokens: max |batched - stepwise| = {max}", ids.len());
    Ok(())
}
