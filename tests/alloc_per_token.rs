//! A counting global allocator proves the per-token loop allocates nothing: after warm-up,
//! decoding a token (backend forward on two threads, sampling with every filter, stop-string
//! scanning, UTF-8 streaming, a thinking answer's split into reasoning and content) performs
//! zero heap allocations anywhere in the process; and
//! serving one (the daemon's engine thread writing a JSON token event or console text to a
//! client's socket) performs none either; nor does decoding with any weight type's kernels.
//!
//! It runs without libtest's harness (`harness = false`): the count is process-wide, and the
//! harness's own thread allocates when it prints its "running for over 60 seconds" notice
//! (seen under qemu, where this test takes about a minute).
mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicUsize, Ordering};
use std::sync::Arc;

use llama_tpu::backend::cpu::{CpuBackend, CpuOptions};
use llama_tpu::backend::Backend;
use llama_tpu::chat::ChatTemplate;
use llama_tpu::engine::{Clients, Engine, EngineError, FinishReason, Input, Request, Summary};
use llama_tpu::model::{Gguf, MappedFile};
use llama_tpu::sampler::SamplerConfig;
use llama_tpu::server::engine_thread;
use llama_tpu::server::outbound::{Outbound, DEFAULT_CAPACITY};
use llama_tpu::server::session::{Output, Session};
use llama_tpu::server::shared::{Defaults, ModelFacts, Shared};
use llama_tpu::tokenizer::Tokenizer;

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
/// Bytes allocated and not yet freed (what the process holds on the heap).
static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts calls.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        LIVE_BYTES.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Tokens after which the count must stay flat (the first decode makes thread-local buffers).
const WARM_UP: usize = 3;

/// Allocations between the first count after warm-up and the last (counts taken per token).
fn grew_after_warm_up(counts: &[usize]) -> usize {
    counts[counts.len() - 1] - counts[WARM_UP]
}

/// The default model on the CPU backend, 2 threads, a KV cache of `context` tokens.
fn default_engine(context: usize) -> Engine {
    let file = Arc::new(MappedFile::open(&common::default_model()).unwrap());
    let gguf = Gguf::parse(&file).unwrap();
    let tok = Tokenizer::from_gguf(&gguf).unwrap();
    let opts = CpuOptions {
        threads: 2,
        context: Some(context),
        ..CpuOptions::default()
    };
    let backend = CpuBackend::from_parts(Arc::clone(&file), &gguf, &opts).unwrap();
    Engine::new(Box::new(backend), tok, Some(ChatTemplate::ChatMl))
}

fn decoding_a_token_allocates_nothing() {
    let mut engine = default_engine(256);
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
            frequency_penalty: 0.3,
            presence_penalty: 0.2,
        },
        max_tokens: Some(60),
        stop: llama_tpu::engine::stop_strings(["never appears in this story \u{1f409}"]).unwrap(),
        deadline: None,
        drop_old_turns: false,
        ignore_eos: false,
        shape: None,
        thinking: false,
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
        let grew = grew_after_warm_up(&counts);
        assert_eq!(
            grew,
            0,
            "round {round}: {grew} allocations over {} tokens",
            counts.len() - WARM_UP
        );
    }
}

/// A thinking answer (Qwen3's template, `thinking` on) split into reasoning and content as it
/// streams, with a stop string scanned in the content: nothing allocated per token either. The
/// answer is the test build's scripted one (`LLAMA_TPU_FAULT_SCRIPT`), a long reasoning then
/// a long content, so both parts run well past the warm-up.
fn decoding_a_thinking_token_allocates_nothing() {
    let script = format!(
        "<think>\n{}\n</think>\n\n{}",
        "the sea is wide, ".repeat(12),
        "Paris is the capital. ".repeat(8)
    );
    // Read when the engine is made, then disarmed for the tests after this one.
    std::env::set_var("LLAMA_TPU_FAULT_SCRIPT", &script);
    let mut engine = {
        let file = Arc::new(MappedFile::open(&common::default_model()).unwrap());
        let gguf = Gguf::parse(&file).unwrap();
        let tok = Tokenizer::from_gguf(&gguf).unwrap();
        let opts = CpuOptions {
            threads: 2,
            context: Some(512),
            ..CpuOptions::default()
        };
        let backend = CpuBackend::from_parts(Arc::clone(&file), &gguf, &opts).unwrap();
        Engine::new(Box::new(backend), tok, Some(ChatTemplate::Qwen3))
    };
    std::env::remove_var("LLAMA_TPU_FAULT_SCRIPT");
    let req = Request {
        max_tokens: Some(300),
        stop: llama_tpu::engine::stop_strings(["never said \u{1f409}"]).unwrap(),
        thinking: true,
        ..Request::new(Input::Chat(vec![llama_tpu::chat::Message::new(
            llama_tpu::chat::Role::User,
            "Where is Paris?",
        )]))
    };
    struct Split<'a> {
        reasoning: usize,
        content: usize,
        counts: &'a mut Vec<usize>,
    }
    impl llama_tpu::engine::Sink for Split<'_> {
        fn text(&mut self, _: &str) -> bool {
            self.content += 1;
            self.counts.push(ALLOCATIONS.load(Ordering::Relaxed));
            true
        }
        fn reasoning(&mut self, _: &str) -> bool {
            self.reasoning += 1;
            self.counts.push(ALLOCATIONS.load(Ordering::Relaxed));
            true
        }
    }
    for round in 0..2 {
        let mut counts: Vec<usize> = Vec::with_capacity(1000);
        let mut sink = Split {
            reasoning: 0,
            content: 0,
            counts: &mut counts,
        };
        let cancel = AtomicBool::new(false);
        let summary = engine.generate(&req, &cancel, &mut sink).unwrap();
        let (reasoning, content) = (sink.reasoning, sink.content);
        assert_eq!(summary.reason, FinishReason::Eos, "round {round}: the script ends");
        assert!(
            reasoning > 20 && content > 20,
            "round {round}: {reasoning} reasoning and {content} content pieces"
        );
        let grew = grew_after_warm_up(&counts);
        assert_eq!(
            grew,
            0,
            "round {round}: {grew} allocations over {} pieces",
            counts.len() - WARM_UP
        );
    }
}

/// What a step sends the engine's clients, counted without allocating.
struct Counted {
    pieces: [usize; 4],
    ended: [bool; 4],
    /// The allocation count after each step.
    counts: Vec<usize>,
}

impl Clients for Counted {
    fn text(&mut self, slot: usize, _: &str) -> Result<(), FinishReason> {
        self.pieces[slot] += 1;
        Ok(())
    }
    fn cancelled(&self, _: usize) -> bool {
        false
    }
    fn progress(&mut self) {
        self.counts.push(ALLOCATIONS.load(Ordering::Relaxed));
    }
    fn finished(&mut self, slot: usize, _: Result<Summary, EngineError>) {
        self.ended[slot] = true;
    }
}

/// Four requests at once, each with its own sampling settings and stop strings, advanced one
/// token each per step in one batched pass: after warm-up, a step allocates nothing.
fn decoding_four_requests_at_once_allocates_nothing() {
    let file = Arc::new(MappedFile::open(&common::default_model()).unwrap());
    let gguf = Gguf::parse(&file).unwrap();
    let tok = Tokenizer::from_gguf(&gguf).unwrap();
    let opts = CpuOptions {
        threads: 2,
        context: Some(256),
        slots: 4,
        ..CpuOptions::default()
    };
    let backend = CpuBackend::from_parts(Arc::clone(&file), &gguf, &opts).unwrap();
    let mut engine = Engine::new(Box::new(backend), tok, Some(ChatTemplate::ChatMl));
    let prompts = [
        "Once upon a time, in a small village by the sea,",
        "The history of the printing press",
        "Ten facts about the ocean:",
        "Dear diary, today",
    ];
    for (i, p) in prompts.iter().enumerate() {
        let mut req = Request::new(Input::Text((*p).into()));
        req.sampling = SamplerConfig {
            temperature: [0.0, 0.7, 0.9, 1.1][i],
            top_k: [1, 40, 0, 50][i],
            repeat_penalty: [1.0, 1.1, 1.0, 1.2][i],
            frequency_penalty: [0.0, 0.0, 0.3, 0.0][i],
            seed: i as u64,
            ..SamplerConfig::default()
        };
        req.max_tokens = Some(40);
        req.stop = llama_tpu::engine::stop_strings(["never appears here \u{1f409}"]).unwrap();
        engine.admit(req, None).unwrap();
    }
    let mut c = Counted {
        pieces: [0; 4],
        ended: [false; 4],
        counts: Vec::with_capacity(100),
    };
    // Prompts and the first few tokens; then 30 steps of four decodes each.
    for _ in 0..WARM_UP + 30 {
        engine.step(&mut c).unwrap();
    }
    assert_eq!(
        engine.active(),
        4,
        "all four still run (none ended early: {:?})",
        c.ended
    );
    assert!(c.pieces.iter().all(|&p| p >= 25), "{:?}", c.pieces);
    let grew = grew_after_warm_up(&c.counts);
    assert_eq!(
        grew,
        0,
        "{grew} allocations over {} steps of 4 tokens",
        c.counts.len() - WARM_UP
    );
}

/// What a constrained answer's steps cost: allocations and the heap held after each step,
/// and the answer's text.
#[derive(Default)]
struct Costs {
    allocations: Vec<usize>,
    held: Vec<isize>,
    text: String,
    summary: Option<Result<Summary, EngineError>>,
}

impl Clients for Costs {
    fn text(&mut self, _: usize, piece: &str) -> Result<(), FinishReason> {
        if self.text.len() + piece.len() <= self.text.capacity() {
            self.text.push_str(piece);
        }
        Ok(())
    }
    fn cancelled(&self, _: usize) -> bool {
        false
    }
    fn progress(&mut self) {
        self.allocations.push(ALLOCATIONS.load(Ordering::Relaxed));
        self.held.push(LIVE_BYTES.load(Ordering::Relaxed));
    }
    fn finished(&mut self, _: usize, result: Result<Summary, EngineError>) {
        self.summary = Some(result);
    }
}

/// Tokens of the constrained answer below; the windows compared are tokens 11 to 60 (after
/// the grammar's first masks have built most of its lexer states: the first tokens cost up
/// to about 1,100 allocations) and 150 to 199 (the 200th token's step ends the request).
const CONSTRAINED_TOKENS: usize = 200;
const SKIP: usize = 10;
const WINDOW: usize = 50;

/// Most allocations a constrained token may cost on average over a window: llguidance's
/// step (a new mask bit set each time, its parser's and lexer's vectors). Measured on the
/// default model: 15 to 20 for a token inside a string, 90 to 171 for one that ends an item
/// or starts the next; a window's mean 24 (greedy, late) to 63 (sampled). The bound is above
/// the costliest kind's, so any mix of tokens stays under it.
const CONSTRAINED_ALLOCATIONS_PER_TOKEN: f64 = 200.0;

/// Most heap bytes llguidance keeps per constrained token (its parser's history, rows it can
/// roll back to: the one thing that grows with the answer, freed when it ends); measured 48
/// greedy, about 290 sampled (new lexer states for new words included).
const CONSTRAINED_HELD_BYTES_PER_TOKEN: f64 = 1024.0;

/// A constrained answer (a JSON array of at least 300 strings, which 200 tokens cannot
/// finish) allocates per token, in llguidance: a bounded number, and no more for the 190th
/// token than for the 20th. The unconstrained path stays at zero (the tests above).
fn a_constrained_token_allocates_a_bounded_amount_that_does_not_grow() {
    use llama_tpu::engine::Shape;
    let started = std::time::Instant::now();
    let mut engine = default_engine(512);
    let schema = serde_json::json!({"type": "array", "minItems": 300,
                                    "items": {"type": "string", "minLength": 1, "maxLength": 12}});
    let mut req = Request::new(Input::Text("Three hundred English words, as a JSON list: ".into()));
    // Greedy: the answer falls into a pattern, so the two windows hold the same kinds of
    // tokens and their costs compare.
    req.sampling = SamplerConfig {
        temperature: 0.0,
        ..SamplerConfig::default()
    };
    req.max_tokens = Some(CONSTRAINED_TOKENS);
    req.shape = Some(Shape::Schema(Arc::new(schema)));
    engine.admit(req, None).unwrap();
    let mut c = Costs {
        allocations: Vec::with_capacity(1000),
        held: Vec::with_capacity(1000),
        text: String::with_capacity(4096),
        summary: None,
    };
    while c.summary.is_none() {
        engine.step(&mut c).unwrap();
    }
    let summary = c.summary.take().unwrap().unwrap();
    assert_eq!(summary.reason, FinishReason::Length, "{summary:?}: {}", c.text);
    assert_eq!(summary.completion_tokens, CONSTRAINED_TOKENS);
    assert!(c.text.starts_with("[\""), "{}", c.text);
    // One step per token (the prompt's last step makes the first): token t (from 1) came
    // out of step `first + t - 1`, and cost what the count grew by over that step.
    let first = c.allocations.len() - CONSTRAINED_TOKENS;
    let cost = |t: usize| c.allocations[first + t - 1] - c.allocations[first + t - 2];
    let early: Vec<usize> = (SKIP + 1..=SKIP + WINDOW).map(cost).collect();
    let late: Vec<usize> = (CONSTRAINED_TOKENS - WINDOW..CONSTRAINED_TOKENS).map(cost).collect();
    let mean = |w: &[usize]| w.iter().sum::<usize>() as f64 / w.len() as f64;
    let quartile = |w: &[usize]| {
        let mut w = w.to_vec();
        w.sort_unstable();
        w[w.len() / 4]
    };
    let held = |t: usize| c.held[first + t - 1];
    let held_per_token =
        (held(CONSTRAINED_TOKENS - 1) - held(2 * SKIP)) as f64 / (CONSTRAINED_TOKENS - 1 - 2 * SKIP) as f64;
    eprintln!(
        "constrained: allocations per token, tokens {}..={}: mean {:.1}, lower quartile {}, max {}; tokens {}..={}: \
         mean {:.1}, lower quartile {}, max {}; heap held {held_per_token:.0} bytes more per token; {:.1} s; {:?}...",
        SKIP + 1,
        SKIP + WINDOW,
        mean(&early),
        quartile(&early),
        early.iter().max().unwrap(),
        CONSTRAINED_TOKENS - WINDOW,
        CONSTRAINED_TOKENS - 1,
        mean(&late),
        quartile(&late),
        late.iter().max().unwrap(),
        started.elapsed().as_secs_f64(),
        &c.text[..c.text.len().min(60)],
    );
    for (name, w) in [("early", &early), ("late", &late)] {
        assert!(
            mean(w) <= CONSTRAINED_ALLOCATIONS_PER_TOKEN,
            "{name}: {:.1} allocations per token: {w:?}",
            mean(w)
        );
    }
    // No growth with the answer's length: the late tokens cost no more than the early ones,
    // on average (within a fifth, for a different mix of tokens) and for the cheap majority
    // (the lower quartile, tokens inside a string: within 3). A cost that grew with the
    // output would move both.
    assert!(
        mean(&late) <= mean(&early) * 1.2 && quartile(&late) <= quartile(&early) + 3,
        "allocations per token grew: early {early:?}, late {late:?}"
    );
    assert!(
        held_per_token <= CONSTRAINED_HELD_BYTES_PER_TOKEN,
        "the heap held grew {held_per_token:.0} bytes per token"
    );
}

/// Every weight type's kernels, as this machine chooses them (the numpy reference's toy
/// models: each quantized type, F16, BF16 and F32; on AVX-512 Q4_0 goes through its
/// interleaved kernel): after a batched prefill, decoding allocates nothing.
fn decoding_every_weight_type_allocates_nothing() {
    let dir = common::scratch("alloc-types");
    common::numpy_reference(&dir);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("toy.json")).unwrap()).unwrap();
    let types: Vec<&str> = meta["types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert!(types.len() >= 10, "toy types: {types:?}");
    for ty in types {
        let file = Arc::new(MappedFile::open(&dir.join(format!("toy_{ty}.gguf"))).unwrap());
        let gguf = Gguf::parse(&file).unwrap();
        let opts = CpuOptions {
            threads: 2,
            context: Some(64),
            ..CpuOptions::default()
        };
        let mut backend = CpuBackend::from_parts(Arc::clone(&file), &gguf, &opts).unwrap();
        let prompt: Vec<u32> = (0..9).map(|i| 7 + 31 * i).collect();
        backend.prefill(&prompt, 0).unwrap();
        let mut counts = Vec::with_capacity(32);
        for pos in prompt.len()..prompt.len() + 12 {
            backend.decode(pos as u32 % 300, pos).unwrap();
            counts.push(ALLOCATIONS.load(Ordering::Relaxed));
        }
        let grew = grew_after_warm_up(&counts);
        assert_eq!(
            grew,
            0,
            "{ty}: {grew} allocations over {} decoded tokens",
            counts.len() - WARM_UP
        );
    }
}

/// The same on the Sophon backend (x86_64: the BM1684X simulator), for each way a token is
/// picked: the on-chip greedy head, the on-chip sampling head with the host's draw, and host
/// sampling of the logits. Counted are the Rust side's allocations (the vendor runtime's own
/// C allocations go through malloc, outside this allocator).
#[cfg(target_arch = "x86_64")]
fn decoding_a_token_on_the_tpu_allocates_nothing() {
    use llama_tpu::backend::sophon::{SophonBackend, SophonOptions};
    let toys = common::toy_models();
    let tok = Tokenizer::from_file(&toys.join("tokenizer.json")).unwrap();
    let backend = SophonBackend::open(
        &toys.join("toy_conv_f16_sample.bmodel"),
        &SophonOptions {
            lib_dir: Some(common::simulator_lib_dir()),
            vocab_hint: Some(tok.vocab_size()),
            ..SophonOptions::default()
        },
    )
    .unwrap();
    let mut engine = Engine::new(Box::new(backend), tok, None);
    // (picker, temperature, top_k): the whole vocabulary (top_k 0) is sampled on the host.
    let picks = [("greedy_head", 0.0, 40), ("sample_head", 0.9, 40), ("host", 0.9, 0)];
    for (pick, temperature, top_k) in picks {
        let req = Request {
            input: Input::Text("hello".into()),
            sampling: SamplerConfig {
                temperature,
                top_k,
                top_p: 0.95,
                min_p: 0.05,
                repeat_penalty: 1.0,
                repeat_last_n: 16,
                seed: 5,
                frequency_penalty: 0.0,
                presence_penalty: 0.0,
            },
            max_tokens: Some(20),
            stop: Default::default(),
            deadline: None,
            drop_old_turns: false,
            ignore_eos: false,
            shape: None,
            thinking: false,
        };
        let mut counts: Vec<usize> = Vec::with_capacity(1000);
        let cancel = AtomicBool::new(false);
        engine
            .generate(&req, &cancel, &mut |_: &str| {
                counts.push(ALLOCATIONS.load(Ordering::Relaxed));
                true
            })
            .unwrap();
        assert_eq!(
            engine.picker(),
            pick,
            "the tokens were picked by another than the case names"
        );
        assert!(counts.len() > 10, "{pick}: only {} text pieces", counts.len());
        let grew = grew_after_warm_up(&counts);
        assert_eq!(
            grew,
            0,
            "{pick}: {grew} allocations over {} tokens",
            counts.len() - WARM_UP
        );
    }
}

/// Reads a client's socket until the reply's end (`done` event or EOT), keeping only the last
/// bytes seen, in a fixed buffer: the reading allocates nothing itself.
fn read_to_end_of_reply(client: &mut UnixStream, json: bool) {
    const DONE: &[u8] = b"\"event\":\"done\"";
    let mut chunk = [0u8; 4096];
    let mut tail = [0u8; 256];
    loop {
        let n = client.read(&mut chunk).unwrap();
        assert!(n > 0, "the session's socket closed");
        // Slide the tail window over the new bytes.
        let len = tail.len();
        let keep = len.saturating_sub(n);
        tail.copy_within(len - keep.., 0);
        let take = n.min(len);
        tail[keep..].copy_from_slice(&chunk[n - take..n]);
        let ended = if json {
            tail.windows(DONE.len()).any(|w| w == DONE) && tail.ends_with(b"\n")
        } else {
            tail.contains(&0x04)
        };
        if ended {
            return;
        }
    }
}

fn serving_a_token_allocates_nothing() {
    let engine = default_engine(512);
    let facts = ModelFacts {
        model: "test".into(),
        backend: "cpu".into(),
        context_length: 512,
        has_chat_template: true,
        tool_syntax: llama_tpu::chat::ToolSyntax::Generic,
        default_system: None,
        slots: 1,
        quantization: "Q4_1".into(),
        file_size: 0,
        modified: None,
    };
    let defaults = Defaults {
        sampling: SamplerConfig {
            temperature: 0.9,
            top_k: 50,
            top_p: 0.9,
            min_p: 0.02,
            repeat_penalty: 1.1,
            repeat_last_n: 32,
            seed: 0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
        },
        seed: Some(11),
        ..Defaults::default()
    };
    let shared = Arc::new(Shared::new(facts, 4, defaults));
    let engine_shared = Arc::clone(&shared);
    let engine_thread = std::thread::spawn(move || engine_thread::serve(engine, engine_shared));
    // JSON over a socket, then a serial-style console (text mode, CR LF translation).
    for (json, console) in [(true, false), (false, true)] {
        let (server_end, mut client) = UnixStream::pair().unwrap();
        let mut session = Session::new(
            {
                // As the transports do: a bounded buffer, drained by a thread of its own.
                let outbound = Outbound::new(DEFAULT_CAPACITY);
                outbound.drain_into(Box::new(server_end), "test-out".into()).unwrap();
                Output::new(outbound, console)
            },
            Arc::clone(&shared),
            console,
            "test".into(),
        );
        // The same request with two answer lengths: if serving a token allocated, the longer
        // one would allocate more.
        let mut totals = Vec::new();
        for max_tokens in [16, 16, 64, 16, 64] {
            let made_before = shared.stats.tokens.load(Ordering::Relaxed);
            let before = ALLOCATIONS.load(Ordering::Relaxed);
            if json {
                session.line(
                    format!(
                        r#"{{"messages":[{{"role":"user","content":"Tell me a story about the sea."}}],"max_tokens":{max_tokens}}}"#
                    )
                    .as_bytes(),
                );
                read_to_end_of_reply(&mut client, true);
                totals.push((max_tokens, ALLOCATIONS.load(Ordering::Relaxed) - before));
            } else {
                session.line(b"/reset");
                read_to_end_of_reply(&mut client, false);
                session.line(format!("/set max_tokens {max_tokens}").as_bytes());
                read_to_end_of_reply(&mut client, false);
                let before_turn = ALLOCATIONS.load(Ordering::Relaxed);
                session.line(b"Tell me a story about the sea.");
                read_to_end_of_reply(&mut client, false);
                totals.push((max_tokens, ALLOCATIONS.load(Ordering::Relaxed) - before_turn));
            }
            // The comparison means something only if the answers had those lengths.
            let made = shared.stats.tokens.load(Ordering::Relaxed) - made_before;
            assert_eq!(made, max_tokens as u64, "json={json}: asked for {max_tokens} tokens");
        }
        // The first request warms up (thread-local buffers, the cache's first fill).
        let short = totals[1].1;
        for &(n, count) in &totals[1..] {
            assert_eq!(
                count, short,
                "json={json}: {n} tokens cost {count} allocations, 16 cost {short}: {totals:?}"
            );
        }
    }
    shared.queue.close();
    engine_thread.join().unwrap().unwrap();
}

/// The same for a server-sent-event stream through the HTTP front (its whole transport: the
/// accept loop, the connection thread, the reply, the drainer), 16 tokens against 64; and for
/// Ollama's NDJSON stream through the same front.
fn streaming_over_http_allocates_nothing_per_token() {
    use llama_tpu::server::http::conn::{accept_loop, HttpConfig, HttpListener};
    use llama_tpu::server::http::head::Policy;
    use std::net::TcpListener;

    let engine = default_engine(512);
    let facts = ModelFacts {
        model: "test".into(),
        backend: "cpu".into(),
        context_length: 512,
        has_chat_template: true,
        tool_syntax: llama_tpu::chat::ToolSyntax::Generic,
        default_system: None,
        slots: 1,
        quantization: "Q4_1".into(),
        file_size: 0,
        modified: None,
    };
    let defaults = Defaults {
        seed: Some(11),
        ..Defaults::default()
    };
    let shared = Arc::new(Shared::new(facts, 4, defaults));
    let engine_shared = Arc::clone(&shared);
    let tokenizer = engine.shared_tokenizer();
    let grammars = engine.grammars();
    let engine_thread = std::thread::spawn(move || engine_thread::serve(engine, engine_shared));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let open = Arc::new(AtomicUsize::new(0));
    let config = HttpConfig {
        policy: Policy::for_tcp(None, None, &[]),
        max_connections: 4,
        outbound_buffer: DEFAULT_CAPACITY,
        tokenizer,
        grammars,
        chat_template: None,
    };
    let (s, o) = (Arc::clone(&shared), Arc::clone(&open));
    let accept = std::thread::spawn(move || accept_loop(HttpListener::Tcp(listener), s, config, o));
    let openai = |n: usize| {
        let body = format!(
            r#"{{"messages":[{{"role":"user","content":"Tell me a story about the sea."}}],"max_tokens":{n},"stream":true}}"#
        );
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let ollama = |n: usize| {
        let body = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"Tell me a story about the sea."}}],"options":{{"num_predict":{n}}}}}"#
        );
        format!(
            "POST /api/chat HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let sse_end: &[u8] = b"data: [DONE]\n\n\r\n0\r\n\r\n";
    // Ollama's last line ends with its last counter.
    let ndjson_end: &[u8] = b"}\n\r\n0\r\n\r\n";
    for (api, request, end) in [
        ("SSE", &openai as &dyn Fn(usize) -> String, sse_end),
        ("NDJSON", &ollama, ndjson_end),
    ] {
        stream_twice(api, request, end, addr, &shared, &open);
    }
    shared.stopping.store(true, Ordering::SeqCst);
    accept.join().unwrap();
    shared.queue.close();
    engine_thread.join().unwrap().unwrap();
}

/// Streams 16 and 64 tokens a few times through the HTTP front at `addr` and checks that
/// every stream after the first costs the same allocations, whatever its length.
fn stream_twice(
    api: &str,
    request: &dyn Fn(usize) -> String,
    end: &[u8],
    addr: std::net::SocketAddr,
    shared: &Shared,
    open: &AtomicUsize,
) {
    use std::io::Write;
    use std::net::TcpStream;

    let (ask16, ask64) = (request(16), request(64));
    let mut totals = Vec::new();
    for max_tokens in [16, 16, 64, 16, 64] {
        let ask = if max_tokens == 16 { &ask16 } else { &ask64 };
        let made_before = shared.stats.tokens.load(Ordering::Relaxed);
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        let mut client = TcpStream::connect(addr).unwrap();
        client.write_all(ask.as_bytes()).unwrap();
        // Read to the end (asked to, the server closes after the last chunk), keeping only
        // the last bytes.
        let mut chunk = [0u8; 4096];
        let mut tail = [0u8; 64];
        loop {
            let n = client.read(&mut chunk).unwrap();
            if n == 0 {
                break;
            }
            let len = tail.len();
            let keep = len.saturating_sub(n);
            tail.copy_within(len - keep.., 0);
            let take = n.min(len);
            tail[keep..].copy_from_slice(&chunk[n - take..n]);
        }
        assert!(tail.ends_with(end), "{api}: {}", String::from_utf8_lossy(&tail));
        drop(client);
        while open.load(Ordering::Acquire) > 0 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        totals.push((max_tokens, ALLOCATIONS.load(Ordering::Relaxed) - before));
        let made = shared.stats.tokens.load(Ordering::Relaxed) - made_before;
        assert_eq!(made, max_tokens as u64, "asked for {max_tokens} tokens");
    }
    let short = totals[1].1;
    for &(n, count) in &totals[1..] {
        assert_eq!(
            count, short,
            "{api}: {n} tokens cost {count} allocations, 16 cost {short}: {totals:?}"
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
    let tests: [(&str, fn()); 8] = [
        ("the_counter_sees_allocations", the_counter_sees_allocations),
        ("decoding_a_token_allocates_nothing", decoding_a_token_allocates_nothing),
        (
            "decoding_a_thinking_token_allocates_nothing",
            decoding_a_thinking_token_allocates_nothing,
        ),
        (
            "decoding_four_requests_at_once_allocates_nothing",
            decoding_four_requests_at_once_allocates_nothing,
        ),
        (
            "decoding_every_weight_type_allocates_nothing",
            decoding_every_weight_type_allocates_nothing,
        ),
        (
            "a_constrained_token_allocates_a_bounded_amount_that_does_not_grow",
            a_constrained_token_allocates_a_bounded_amount_that_does_not_grow,
        ),
        ("serving_a_token_allocates_nothing", serving_a_token_allocates_nothing),
        (
            "streaming_over_http_allocates_nothing_per_token",
            streaming_over_http_allocates_nothing_per_token,
        ),
    ];
    // A failed assertion panics and ends the process with a non-zero status.
    for (name, test) in tests {
        test();
        println!("test {name} ... ok");
    }
    #[cfg(target_arch = "x86_64")]
    {
        decoding_a_token_on_the_tpu_allocates_nothing();
        println!("test decoding_a_token_on_the_tpu_allocates_nothing ... ok");
    }
    println!(
        "{} passed, 0 failed",
        tests.len() + usize::from(cfg!(target_arch = "x86_64"))
    );
}
