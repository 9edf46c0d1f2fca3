//! The Sophon backend on the BM1684X simulator (the vendor's libbmrt/libbmlib running the
//! chip's functional model), against the CPU reference backend on the same weights: toy
//! Llama models compiled by the vendor's compiler (`sim/toy.sh`).
//!
//! Tolerances: the toy weights are exactly representable in f16 and bf16, so the two
//! backends differ only by the device's arithmetic, which rounds activations to the
//! bmodel's half type between ops: about 2^-11 relative for f16 and 2^-8 for bf16 per
//! rounding, over two layers of ~15 roundings each on logits of magnitude ~1-4. Measured
//! here: see the constants. They are set at a few times the measured error, and far below
//! what a wrong mask constant, a wrong KV position or a wrong RoPE gives (0.17 and more).
#![cfg(target_arch = "x86_64")]

mod common;

use std::path::{Path, PathBuf};

use llama_tpu::backend::cpu::{CpuBackend, CpuOptions};
use llama_tpu::backend::sophon::{SophonBackend, SophonOptions};
use llama_tpu::backend::{Backend, BackendError, Next};
use llama_tpu::sampler::{argmax, SamplerConfig};

/// Measured: 0.0045 (prefill), 0.0034 (decode).
const F16_TOLERANCE: f32 = 0.02;
/// Measured: 0.045.
const BF16_TOLERANCE: f32 = 0.1;

struct Pair {
    // The simulator is one chip per process: one backend on it at a time.
    _chip: std::sync::MutexGuard<'static, ()>,
    tpu: SophonBackend,
    cpu: CpuBackend,
    tolerance: f32,
}

fn pair(bmodel: &str, gguf: &str, tolerance: f32) -> Pair {
    let chip = common::simulator_chip();
    let lib = common::simulator_lib_dir();
    let dir = common::toy_models();
    let tpu = SophonBackend::open(
        &dir.join(bmodel),
        &SophonOptions {
            lib_dir: Some(lib),
            ..SophonOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{bmodel}: {e}"));
    let cpu = CpuBackend::load(
        &dir.join(gguf),
        &CpuOptions {
            threads: 1,
            ..CpuOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{gguf}: {e}"));
    Pair {
        _chip: chip,
        tpu,
        cpu,
        tolerance,
    }
}

fn logits(n: Next<'_>) -> Vec<f32> {
    match n {
        Next::Logits(l) => l.to_vec(),
        Next::Token(t) => panic!("expected logits, got token {t}"),
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    // NaN counts as infinitely far.
    a.iter()
        .zip(b)
        .map(|(x, y)| if x.is_finite() { (x - y).abs() } else { f32::INFINITY })
        .fold(0.0, f32::max)
}

const PROMPT: [u32; 5] = [256, 72, 101, 108, 108];

/// Prefill then greedy decoding to `until` positions; returns the worst logit difference.
fn greedy_run(p: &mut Pair, until: usize) -> f32 {
    let t = logits(p.tpu.prefill(&PROMPT, 0).unwrap());
    let c = logits(p.cpu.prefill(&PROMPT, 0).unwrap());
    let mut worst = max_diff(&t, &c);
    let (mut tt, mut ct) = (argmax(&t), argmax(&c));
    for pos in PROMPT.len()..until {
        assert_eq!(
            tt, ct,
            "different tokens before position {pos} (worst logit difference so far {worst})"
        );
        let t = logits(p.tpu.decode(tt, pos).unwrap());
        let c = logits(p.cpu.decode(ct, pos).unwrap());
        let d = max_diff(&t, &c);
        worst = worst.max(d);
        tt = argmax(&t);
        ct = argmax(&c);
    }
    worst
}

#[test]
fn f16_bmodel_matches_the_cpu_backend_over_20_decode_steps() {
    let mut p = pair("toy_f16_gqa_heads.bmodel", "toy_kv2.gguf", F16_TOLERANCE);
    let worst = greedy_run(&mut p, PROMPT.len() + 20);
    eprintln!("f16: worst logit difference {worst}");
    assert!(worst < p.tolerance, "f16: {worst} >= {}", p.tolerance);
}

#[test]
fn bf16_bmodel_matches_the_cpu_backend_over_20_decode_steps() {
    let mut p = pair("toy_bf16_mha.bmodel", "toy_kv4.gguf", BF16_TOLERANCE);
    let worst = greedy_run(&mut p, PROMPT.len() + 20);
    eprintln!("bf16: worst logit difference {worst}");
    assert!(worst < p.tolerance, "bf16: {worst} >= {}", p.tolerance);
}

#[test]
fn the_kv_cache_is_right_up_to_the_context_end_and_no_further() {
    let mut p = pair("toy_f16_gqa_heads.bmodel", "toy_kv2.gguf", F16_TOLERANCE);
    let s = p.tpu.info().context_length;
    assert_eq!(s, 32, "the toy's SEQLEN, read from the bmodel");
    // Every position up to the last one the device holds, compared with the CPU.
    let worst = greedy_run(&mut p, s);
    assert!(worst < p.tolerance, "{worst}");
    match p.tpu.decode(1, s) {
        Err(BackendError::ContextOverflow { pos, context, .. }) => assert_eq!((pos, context), (s, s)),
        Err(e) => panic!("expected a context overflow, got {e}"),
        Ok(_) => panic!("decoding past SEQLEN succeeded"),
    }
    // A continued conversation (prefill at start > 0) goes through decode steps: same numbers.
    p.tpu.reset();
    p.cpu.reset();
    let a = logits(p.tpu.prefill(&PROMPT[..2], 0).unwrap());
    let b = logits(p.cpu.prefill(&PROMPT[..2], 0).unwrap());
    assert!(max_diff(&a, &b) < p.tolerance);
    let a = logits(p.tpu.prefill(&PROMPT[2..], 2).unwrap());
    let b = logits(p.cpu.prefill(&PROMPT[2..], 2).unwrap());
    assert!(max_diff(&a, &b) < p.tolerance, "{}", max_diff(&a, &b));
    assert!(matches!(
        p.tpu.prefill(&[1; 33], 0),
        Err(BackendError::ContextOverflow { .. })
    ));
    assert!(matches!(p.tpu.prefill(&[258], 0), Err(BackendError::BadToken(258))));
}

fn token(n: Next<'_>) -> u32 {
    match n {
        Next::Token(t) => t,
        Next::Logits(_) => panic!("expected an on-chip token, got logits"),
    }
}

/// Tokens from the on-chip heads for `steps` decode steps after the prompt.
fn head_tokens(p: &mut Pair, cfg: &SamplerConfig, steps: usize) -> Vec<u32> {
    p.tpu.configure_sampling(cfg).unwrap();
    let mut t = token(p.tpu.prefill(&PROMPT, 0).unwrap());
    let mut out = vec![t];
    for pos in PROMPT.len()..PROMPT.len() + steps {
        t = token(p.tpu.decode(t, pos).unwrap());
        out.push(t);
    }
    out
}

#[test]
fn on_chip_heads_pick_tokens_and_get_top_p_as_f32() {
    let mut p = pair("toy_f16_gqa_heads.bmodel", "toy_kv2.gguf", F16_TOLERANCE);
    assert!(p.tpu.layout().greedy_head && p.tpu.layout().sample_head.is_some());
    // greedy_head gives the CPU's greedy tokens.
    let greedy = SamplerConfig {
        temperature: 0.0,
        ..SamplerConfig::default()
    };
    let chip = head_tokens(&mut p, &greedy, 20);
    let mut host = vec![argmax(&logits(p.cpu.prefill(&PROMPT, 0).unwrap()))];
    for pos in PROMPT.len()..PROMPT.len() + 20 {
        let t = *host.last().unwrap();
        host.push(argmax(&logits(p.cpu.decode(t, pos).unwrap())));
    }
    assert_eq!(chip, host, "greedy_head against the CPU's argmax");

    // The sampling head: a seed gives the same tokens again; a tiny top_p keeps only the best
    // candidate (greedy); top_p 1.0 read as f32 keeps them all, so a hot temperature leaves
    // the greedy path. (Passed as f16 bits, 1.0 would read as 2e-41: greedy again.)
    let sampled = |top_p: f32, seed: u64| SamplerConfig {
        temperature: 1.5,
        top_k: 0,
        top_p,
        min_p: 0.0,
        repeat_penalty: 1.0,
        seed,
        ..SamplerConfig::default()
    };
    let a = head_tokens(&mut p, &sampled(1.0, 7), 12);
    assert_eq!(a, head_tokens(&mut p, &sampled(1.0, 7), 12), "same seed, same tokens");
    assert_ne!(a, chip[..13], "top_p 1.0 at temperature 1.5 sampled the greedy tokens");
    assert_ne!(
        a,
        head_tokens(&mut p, &sampled(1.0, 8), 20),
        "another seed, other tokens"
    );
    assert_eq!(
        head_tokens(&mut p, &sampled(1e-4, 7), 20),
        chip,
        "top_p 1e-4 keeps only the best"
    );
}

#[test]
fn a_corrupt_or_foreign_bmodel_is_refused_with_the_reason() {
    let _chip = common::simulator_chip();
    let lib = common::simulator_lib_dir();
    let dir = common::scratch("sophon-bad");
    let good = std::fs::read(common::toy_models().join("toy_bf16_mha.bmodel")).unwrap();
    let truncated = dir.join("truncated.bmodel");
    std::fs::write(&truncated, &good[..good.len() / 2]).unwrap();
    let opts = SophonOptions {
        lib_dir: Some(lib.clone()),
        ..SophonOptions::default()
    };
    let err = |path: &Path| match SophonBackend::open(path, &opts) {
        Ok(_) => panic!("{} was accepted", path.display()),
        Err(e) => e.to_string(),
    };
    let e = err(&truncated);
    assert!(e.contains("bmrt_load_bmodel"), "{e}");
    let e = err(&dir.join("missing.bmodel"));
    assert!(e.contains("bmrt_load_bmodel"), "{e}");
    // The wheel's sample bmodel is a real bmodel but not a Llama.
    let foreign: PathBuf = lib.join("../python/tools/soc_infer/demo/Yuv2rgb_0_int8/compilation.bmodel");
    let e = err(&foreign);
    assert!(
        e.contains("does not fit the Llama contract") && e.contains("embedding"),
        "{e}"
    );
    // No runtime where it is looked for.
    let e = match SophonBackend::open(
        &truncated,
        &SophonOptions {
            lib_dir: Some(dir.clone()),
            ..SophonOptions::default()
        },
    ) {
        Ok(_) => panic!("opened without a runtime"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("libbmrt"), "{e}");
}
