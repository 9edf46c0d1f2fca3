//! The CPU backend against an independent numpy forward pass (tests/reference), on toy models
//! in every supported weight type and of every architecture (llama, Llama-3.1's RoPE factors,
//! Qwen2's biases, Qwen3's per-head norms and wide heads): prefill of a few tokens, then
//! decode steps, each compared with the reference logits at that position.
mod common;

use std::sync::Arc;

use llama_tpu::backend::cpu::{CpuBackend, CpuOptions};
use llama_tpu::backend::{Backend, Next};
use llama_tpu::kernels::simd::{Isa, Kernels};
use llama_tpu::model::{Gguf, MappedFile};

/// Tokens fed by the prefill; the rest go through decode one at a time.
const PREFILL: usize = 4;

/// Relative tolerance, as max |ours - reference| / max |reference| over a logit vector.
/// Float weights multiply f32 activations, and the KV cache holds keys and values as f16 (as
/// llama.cpp's does): each cached value carries up to 2^-11 (4.9e-4) of itself as rounding
/// error, which reaches the logits diluted by the attention average and the residual stream
/// (seen up to 2.3e-4; with an f32 cache it was ~1e-6); 1e-3 leaves room. Quantized weights multiply activations quantized to 8 bits per block of 32, as
/// llama.cpp does: each activation carries up to 1/254 of its block's largest value as error,
/// which over two layers stays within 1.5% of the logit range (seen 0.05-1.5%); 3% leaves room
/// while a RoPE rotating the wrong way gives 20% (seen when
/// checking that this test can fail).
fn tolerance(ty: &str) -> f32 {
    match ty {
        "f32" | "f16" | "bf16" => 1e-3,
        _ => 3e-2,
    }
}

fn rel_err(ours: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    ours.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
        .unwrap()
}

#[test]
fn logits_match_the_numpy_reference_for_every_weight_type_and_architecture() {
    let dir = common::scratch("reference");
    common::numpy_reference(&dir);
    let meta: toy_meta::Meta = toy_meta::read(&dir.join("toy.json"));
    let archs: std::collections::BTreeSet<&str> = meta.models.iter().map(|m| m.1.as_str()).collect();
    assert_eq!(
        archs.into_iter().collect::<Vec<_>>(),
        ["llama", "llama3", "qwen2", "qwen3"]
    );
    for (name, arch, ty) in &meta.models {
        let path = dir.join(format!("toy_{name}.gguf"));
        let want = common::read_f32s(&dir.join(format!("toy_{name}.logits")));
        let file = Arc::new(MappedFile::open(&path).unwrap());
        let gguf = Gguf::parse(&file).unwrap();
        // The best kernels this CPU runs, with 1 and 3 threads, and the portable ones.
        let best = Kernels::best();
        let scalar = Kernels::new(Isa::Scalar).unwrap();
        for (threads, kernels) in [(1, best), (3, best), (2, scalar)] {
            let opts = CpuOptions {
                threads,
                context: Some(32),
                batch: 3,
                slots: 1,
                kernels: Some(kernels),
            };
            let mut b = CpuBackend::from_parts(Arc::clone(&file), &gguf, &opts).unwrap();
            let check = |pos: usize, next: Next<'_>| {
                let Next::Logits(ours) = next else {
                    panic!("cpu backend returns logits")
                };
                let row = &want[pos * meta.vocab..(pos + 1) * meta.vocab];
                let e = rel_err(ours, row);
                assert!(
                    e <= tolerance(ty),
                    "{name}, {threads} threads, {} kernels, position {pos}: relative error {e}",
                    kernels.isa().name()
                );
                assert_eq!(argmax(ours), argmax(row), "{name}: greedy token differs at {pos}");
                e
            };
            // batch 3 < PREFILL: the prefill is split across two forward batches.
            let mut worst = check(PREFILL - 1, b.prefill(&meta.tokens[..PREFILL], 0).unwrap());
            let mut last = Vec::new();
            for pos in PREFILL..meta.tokens.len() {
                let next = b.decode(meta.tokens[pos], pos).unwrap();
                if let Next::Logits(l) = next {
                    last = l.to_vec();
                }
                worst = worst.max(check(pos, next));
            }
            // The same tokens as one prompt give bit-identical logits: a cached prefix never
            // changes what a request produces.
            let mut fresh = CpuBackend::from_parts(Arc::clone(&file), &gguf, &opts).unwrap();
            let Next::Logits(whole) = fresh.prefill(&meta.tokens, 0).unwrap() else {
                unreachable!()
            };
            assert!(
                whole == last.as_slice(),
                "{name}: prompt and step-by-step logits differ"
            );
            eprintln!(
                "{name:11} ({arch}) threads {threads} {:12}: worst relative error {worst:.2e}",
                kernels.isa().name()
            );
        }
    }
}

/// What toy.json says: the token sequence, vocabulary size and models (name, architecture,
/// weight type).
mod toy_meta {
    pub struct Meta {
        pub tokens: Vec<u32>,
        pub vocab: usize,
        pub models: Vec<(String, String, String)>,
    }

    pub fn read(path: &std::path::Path) -> Meta {
        let s = std::fs::read_to_string(path).unwrap();
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        Meta {
            tokens: v["tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_u64().unwrap() as u32)
                .collect(),
            vocab: v["vocab"].as_u64().unwrap() as usize,
            models: v["models"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    let s = |k: &str| m[k].as_str().unwrap().to_string();
                    (s("name"), s("arch"), s("type"))
                })
                .collect(),
        }
    }
}
