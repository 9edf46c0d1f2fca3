//! Qwen2, Qwen3 and Llama-3.1 against oracles that are not ours (issue 25): toy checkpoints
//! written as Hugging Face folders (scripts/hf_toys.py: random weights, the families' real
//! vocabularies), converted to GGUF by llama.cpp's own convert_hf_to_gguf.py (`make
//! toy-gguf`, into .cache/hf-toys), and llama.cpp's logits for them
//! (tests/data/*_toy_llamacpp.json, recorded by `scripts/llamacpp_golden.py DIR --toys`
//! through llama.cpp's C API). The numpy reference (tests/reference_forward.rs) checks the
//! same parts against our own reading of the Hugging Face conventions; this checks that
//! reading against llama.cpp's converter and llama.cpp's forward pass.
//!
//! The toys: qwen2 with Q/K/V biases; qwen3 with per-head Q/K norms and
//! heads wider than hidden / heads (4 x 32 on 64); llama3 with Llama-3.1's rope_scaling, whose
//! `rope_freqs` are 1, 8 and in between on its 16-wide heads. Each: hidden 64, 2 layers,
//! GQA, F32 weights, the family's chat template as the converter writes it.
//!
//! Needs `make toy-gguf` (`make test` runs it); fails, never skips, without it.
mod common;
#[path = "common/llamacpp.rs"]
mod llamacpp;

use std::path::PathBuf;
use std::sync::Arc;

use llama_tpu::backend::cpu::{CpuBackend, CpuOptions};
use llama_tpu::backend::{Backend, Next};
use llama_tpu::chat::ChatTemplate;
use llama_tpu::kernels::simd::{Isa, Kernels};
use llama_tpu::model::{Gguf, MappedFile};
use llama_tpu::tokenizer::Tokenizer;

/// Each toy, with the template the converter writes into it (from the tokenizer_config.json
/// scripts/hf_toys.py gives it: the family's own, from llama.cpp's collection).
const TOYS: [(&str, ChatTemplate); 3] = [
    ("qwen2", ChatTemplate::Qwen25),
    ("qwen3", ChatTemplate::Qwen3),
    ("llama3", ChatTemplate::Llama31),
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn toy(name: &str) -> PathBuf {
    let p = root().join(format!(".cache/hf-toys/toy_{name}.gguf"));
    assert!(
        p.exists(),
        "{} is missing: run `make toy-gguf` (the README's test command does)",
        p.display()
    );
    p
}

/// The file llama.cpp's logits were recorded from, and the recorded cases.
fn golden(name: &str) -> (String, Vec<llamacpp::Case>) {
    let v = llamacpp::read(&format!("{name}_toy_llamacpp.json"));
    (v["gguf_sha256"].as_str().unwrap().into(), llamacpp::cases(&v["cases"]))
}

fn open(name: &str) -> (Arc<MappedFile>, Gguf) {
    let file = Arc::new(MappedFile::open(&toy(name)).unwrap());
    let gguf = Gguf::parse(&file).unwrap();
    (file, gguf)
}

fn backend(name: &str, kernels: Kernels) -> CpuBackend {
    let (file, gguf) = open(name);
    let opts = CpuOptions {
        threads: 2,
        context: Some(128),
        kernels: Some(kernels),
        ..CpuOptions::default()
    };
    CpuBackend::from_parts(file, &gguf, &opts).unwrap()
}

/// The files are the ones llama.cpp's logits were recorded for: same converter, same
/// generator, deterministic output. (`make toy-gguf` checks this too, and says what to do.)
#[test]
fn toy_ggufs_are_the_files_llama_cpp_ran() {
    for (name, _) in TOYS {
        let path = toy(name);
        let out = std::process::Command::new("sha256sum")
            .arg(&path)
            .output()
            .expect("sha256sum (coreutils)");
        assert!(out.status.success());
        let got = String::from_utf8_lossy(&out.stdout)[..64].to_string();
        assert_eq!(
            got,
            golden(name).0,
            "{}: not the file tests/data/{name}_toy_llamacpp.json was recorded from: run `make toy-gguf`",
            path.display()
        );
    }
}

/// Our tokenizer, read from the converter's GGUF, gives llama.cpp's ids for every prompt (the
/// chats' markers are single tokens), and the template the converter wrote is recognized.
#[test]
fn prompts_tokenize_as_llama_cpp_does_and_templates_are_recognized() {
    for (name, template) in TOYS {
        let (_, gguf) = open(name);
        let tok = Tokenizer::from_gguf(&gguf).unwrap();
        for case in golden(name).1 {
            assert_eq!(
                tok.encode(&case.prompt, true).unwrap(),
                case.prompt_ids,
                "{name}: {:?}",
                case.prompt
            );
        }
        assert_eq!(
            ChatTemplate::detect(gguf.str("tokenizer.chat_template").unwrap()),
            Some(template),
            "{name}"
        );
    }
}

/// Follows llama.cpp's greedy continuation of each prompt (its tokens: teacher forcing) and
/// compares, at every step, each of the 20 logits llama.cpp ranks highest with ours (each
/// within `logit`, their mean within `mean`: an error spread over every logit, too small
/// for the bound, moves the mean); nothing else of ours may rise above llama.cpp's 20th; our
/// greedy token must be llama.cpp's at every step
/// (no near-ties to excuse: the goldens' script only takes prompts whose every step has its
/// top two at least 0.1 apart, five times `logit`, so a bound kept implies the same token).
///
/// The bounds, why not equal: the same F32 weights and an f16 KV cache on both sides, but not
/// the same arithmetic. llama.cpp multiplies Q with the f16 K cache, and the attention weights
/// with the f16 V cache, in f16 (Q and the weights rounded to f16, relative 2^-11), where we
/// keep them f32; every sum is ordered differently (SIMD widths, threads). The goldens are
/// recorded with flash attention off: llama.cpp's CPU flash attention also sums V in an f16
/// accumulator, which took the differences to 0.022.
/// Measured (AVX-512 VNNI and portable kernels alike), on logits of 14 to 23: within 0.0023
/// (qwen2), 0.0054 (qwen3), 0.0066 (llama3), 0.0004 / 0.0010 / 0.0011 on average (the goldens
/// are rounded to 1e-4). The bounds are three times the worst of each. Seen failing: Llama-3.1's factor
/// left out for the one pair between its two regimes (0.04 off at the first step); Qwen3's K
/// normed with Q's weights (0.36 off at the first step).
#[test]
fn logits_and_greedy_tokens_follow_llama_cpp() {
    let tol = llamacpp::Tolerances {
        logit: 0.02,
        mean: 0.0035,
        tie: 0.0,
    };
    // The best kernels this CPU runs, and the portable ones.
    for kernels in [Kernels::best(), Kernels::new(Isa::Scalar).unwrap()] {
        for (name, _) in TOYS {
            let mut b = backend(name, kernels);
            let tok = Tokenizer::from_gguf(&open(name).1).unwrap();
            let isa = kernels.isa().name();
            let walked = llamacpp::walk(&mut b, &tok, &golden(name).1, &tol, &format!("{name} ({isa}), "));
            eprintln!("{name:6} {isa:12} {walked}");
            assert!(walked.steps >= 45, "{name}: only {} steps checked", walked.steps);
        }
    }
}

/// A prompt computed in one call gives the same logits, to the bit, as its tokens fed one by
/// one (a cached prefix never changes what a request produces), on the converter's files too.
#[test]
fn a_prompt_in_one_batch_equals_its_tokens_one_by_one() {
    for (name, _) in TOYS {
        for case in golden(name).1 {
            let ids = &case.prompt_ids;
            let mut whole = backend(name, Kernels::best());
            let Next::Logits(whole) = whole.prefill(ids, 0).unwrap() else {
                unreachable!()
            };
            let whole = whole.to_vec();
            let mut single = backend(name, Kernels::best());
            let mut last = Vec::new();
            for (pos, &t) in ids.iter().enumerate() {
                let Next::Logits(l) = single.decode(t, pos).unwrap() else {
                    unreachable!()
                };
                last = l.to_vec();
            }
            assert!(
                whole == last,
                "{name}: {:?} in one batch and one by one differ",
                case.prompt
            );
        }
    }
}
