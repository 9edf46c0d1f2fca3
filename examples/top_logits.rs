//! Prints the most likely next tokens of a prompt with their logits: for checking near-ties
//! when greedy output differs from another implementation.
//! `cargo run --release --example top_logits -- MODEL.gguf "prompt" [K]`
use std::path::Path;

use llama_tpu::backend::cpu::{CpuBackend, CpuOptions};
use llama_tpu::backend::{Backend, Next};
use llama_tpu::model::{Gguf, MappedFile};
use llama_tpu::tokenizer::Tokenizer;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (model, prompt) = (args.get(1).ok_or("model?")?, args.get(2).ok_or("prompt?")?);
    let k: usize = args.get(3).map_or(Ok(5), |s| s.parse())?;
    let file = MappedFile::open(Path::new(model))?;
    let gguf = Gguf::parse(&file)?;
    let tok = Tokenizer::from_gguf(&gguf)?;
    let mut backend = CpuBackend::from_parts(
        std::sync::Arc::new(MappedFile::open(Path::new(model))?),
        &gguf,
        &CpuOptions::default(),
    )?;
    let ids = tok.encode(prompt, true)?;
    let Next::Logits(logits) = backend.prefill(&ids, 0)? else {
        return Err("no logits".into());
    };
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    for &i in order.iter().take(k) {
        println!("{:8.4} {:6} {:?}", logits[i], i, tok.decode(&[i as u32]));
    }
    Ok(())
}
