//! A counting global allocator proves the per-token loop allocates nothing: after warm-up,
//! decoding a token (backend forward on two threads, sampling with every filter, stop-string
//! scanning, UTF-8 streaming) performs zero heap allocations anywhere in the process.
//!
//! It runs without libtest's harness (`harness = false`): the count is process-wide, and the
//! harness's own thread allocates when it prints its "running for over 60 seconds" notice
//! (seen under qemu, where this test takes about a minute).
mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use llama_tpu::backend::cpu::{CpuBackend, CpuOptions};
use llama_tpu::chat::ChatTemplate;
use llama_tpu::engine::{Engine, FinishReason, Input, Request};
use llama_tpu::model::{Gguf, MappedFile};
use llama_tpu::sampler::SamplerConfig;
use llama_tpu::tokenizer::Tokenizer;

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts calls.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Tokens after which the count must stay flat (the first decode makes thread-local buffers).
const WARM_UP: usize = 3;

fn decoding_a_token_allocates_nothing() {
    let file = Arc::new(MappedFile::open(&common::default_model()).unwrap());
    let gguf = Gguf::parse(&file).unwrap();
    let tok = Tokenizer::from_gguf(&gguf).unwrap();
    let opts = CpuOptions {
        threads: 2,
        context: Some(256),
        ..CpuOptions::default()
    };
    let backend = CpuBackend::from_parts(Arc::clone(&file), &gguf, &opts).unwrap();
    let mut engine = Engine::new(Box::new(backend), tok, Some(ChatTemplate::ChatMl));
    let req = Request {
        input: Input::Text("Once upon a time, in a small village by the sea,".into()),
        sampling: SamplerConfig {
            temperature: 0.9,
            top_k: 50,
            top_p: 0.9,
            min_p: 0.02,
            repeat_penalty: 1.1,
            repeat_last_n: 32,
            seed: 5,
        },
        max_tokens: Some(60),
        stop: vec!["never appears in this story \u{1f409}".into()],
        deadline: None,
        drop_old_turns: false,
    };
    for round in 0..2 {
        let mut counts: Vec<usize> = Vec::with_capacity(1000);
        let cancel = AtomicBool::new(false);
        let summary = engine
            .generate(&req, &cancel, &mut |_: &str| {
                counts.push(ALLOCATIONS.load(Ordering::Relaxed));
                true
            })
            .unwrap();
        assert_eq!(summary.reason, FinishReason::Length, "round {round}");
        assert!(counts.len() > 40, "only {} text pieces", counts.len());
        let after_warm_up = &counts[WARM_UP..];
        let grew = after_warm_up.last().unwrap() - after_warm_up[0];
        assert_eq!(
            grew,
            0,
            "round {round}: {grew} allocations over {} tokens",
            after_warm_up.len()
        );
    }
}

fn the_counter_sees_allocations() {
    // The proof above is only as good as the counter: an allocation must register.
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let v: Vec<u64> = Vec::with_capacity(std::hint::black_box(100));
    drop(std::hint::black_box(v));
    assert!(ALLOCATIONS.load(Ordering::Relaxed) > before);
}

fn main() {
    let tests: [(&str, fn()); 2] = [
        ("the_counter_sees_allocations", the_counter_sees_allocations),
        ("decoding_a_token_allocates_nothing", decoding_a_token_allocates_nothing),
    ];
    // A failed assertion panics and ends the process with a non-zero status.
    for (name, test) in tests {
        test();
        println!("test {name} ... ok");
    }
    println!("{} passed, 0 failed", tests.len());
}
