//! Several conversations at once: one backend step advances every running request, and a
//! request's answer does not depend on what else runs beside it.
//!
//! - The CPU backend's logits for a sequence are the same bits whether it runs alone (its
//!   prompt in one call) or batched with three others (prompts cut into chunks, decodes of
//!   other slots in the same pass), for every weight type the kernels have.
//! - The engine gives each request the tokens it gives alone (greedy and seeded sampling);
//!   cancelling one leaves the others' output unchanged.
//! - A prompt arriving while another request streams is fed in chunks between that stream's
//!   tokens: the stream advances by one token every step.
//! - Two conversations taking turns each find their own history cached.
mod common;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use llama_tpu::backend::cpu::{CpuBackend, CpuOptions};
use llama_tpu::backend::{Backend, Next, Span};
use llama_tpu::chat::{ChatTemplate, Message, Role};
use llama_tpu::engine::{Clients, Engine, EngineError, FinishReason, Input, Request, Summary};
use llama_tpu::model::{Gguf, MappedFile};
use llama_tpu::sampler::SamplerConfig;
use llama_tpu::tokenizer::Tokenizer;

fn cpu(path: &std::path::Path, slots: usize, context: usize, batch: usize) -> (CpuBackend, Gguf) {
    let file = Arc::new(MappedFile::open(path).unwrap());
    let gguf = Gguf::parse(&file).unwrap();
    let opts = CpuOptions {
        threads: 2,
        context: Some(context),
        batch,
        slots,
        ..CpuOptions::default()
    };
    (CpuBackend::from_parts(Arc::clone(&file), &gguf, &opts).unwrap(), gguf)
}

fn bits(l: &[f32]) -> Vec<u32> {
    l.iter().map(|x| x.to_bits()).collect()
}

/// Sequence `k`'s prompt and the tokens it then decodes (fixed ids: the logits are compared,
/// not the choices).
fn sequence(k: usize, vocab: usize) -> (Vec<u32>, Vec<u32>) {
    let len = [9, 5, 13, 3][k];
    let prompt = (0..len).map(|i| ((7 + 31 * i + 101 * k) % vocab) as u32).collect();
    let decoded = (0..6).map(|i| ((3 + 17 * i + 53 * k) % vocab) as u32).collect();
    (prompt, decoded)
}

#[test]
fn batched_logits_are_the_bits_of_a_sequence_run_alone_for_every_weight_type() {
    let dir = common::scratch("batching-types");
    common::numpy_reference(&dir);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("toy.json")).unwrap()).unwrap();
    let types: Vec<String> = meta["types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    assert!(types.len() >= 10, "toy types: {types:?}");
    for ty in &types {
        let path = dir.join(format!("toy_{ty}.gguf"));
        // Alone: each sequence in a fresh one-slot backend, its prompt in one call.
        let mut alone = Vec::new();
        for k in 0..4 {
            let (mut b, _) = cpu(&path, 1, 64, 64);
            let vocab = b.info().vocab_size;
            let (prompt, decoded) = sequence(k, vocab);
            let mut outs = Vec::new();
            let Next::Logits(l) = b.prefill(&prompt, 0).unwrap() else {
                panic!("cpu gives logits")
            };
            outs.push(bits(l));
            for (i, &t) in decoded.iter().enumerate() {
                let Next::Logits(l) = b.decode(t, prompt.len() + i).unwrap() else {
                    panic!("cpu gives logits")
                };
                outs.push(bits(l));
            }
            alone.push(outs);
        }
        // Together: four slots; sequence k starts at step k; prompts go in chunks of at most
        // 4 tokens beside the others' decodes (a batch of 8 tokens).
        let (mut b, _) = cpu(&path, 4, 64, 8);
        let vocab = b.info().vocab_size;
        let seqs: Vec<_> = (0..4).map(|k| sequence(k, vocab)).collect();
        let mut done = [0usize; 4]; // tokens run so far
        let mut outs: Vec<Vec<Vec<u32>>> = vec![Vec::new(); 4];
        for step in 0.. {
            let mut tokens = Vec::new();
            let mut spans = Vec::new();
            for (k, (prompt, decoded)) in seqs.iter().enumerate() {
                let total = prompt.len() + decoded.len();
                if step < k || done[k] >= total {
                    continue;
                }
                let (start, len, decode) = if done[k] < prompt.len() {
                    (done[k], (prompt.len() - done[k]).min(4), false)
                } else {
                    (done[k], 1, true)
                };
                let all: Vec<u32> = prompt.iter().chain(decoded).copied().collect();
                tokens.extend_from_slice(&all[start..start + len]);
                spans.push(Span {
                    slot: k,
                    start,
                    len,
                    output: start + len >= prompt.len(),
                    decode,
                });
            }
            if spans.is_empty() {
                break;
            }
            let mut got = Vec::new();
            b.step(&tokens, &spans, &mut |i, next| {
                let Next::Logits(l) = next else {
                    panic!("cpu gives logits")
                };
                got.push((spans[i].slot, bits(l)));
            })
            .unwrap();
            assert_eq!(got.len(), spans.iter().filter(|s| s.output).count(), "{ty}");
            for (k, l) in got {
                outs[k].push(l);
            }
            for s in &spans {
                done[s.slot] += s.len;
            }
        }
        for k in 0..4 {
            assert_eq!(outs[k].len(), alone[k].len(), "{ty}: sequence {k}");
            for (i, (a, b)) in alone[k].iter().zip(&outs[k]).enumerate() {
                assert!(
                    a == b,
                    "{ty}: sequence {k}, output {i}: batched logits differ from alone"
                );
            }
        }
    }
}

fn default_engine(slots: usize, batch: usize) -> Engine {
    let (backend, gguf) = cpu(&common::default_model(), slots, 512, batch);
    let tok = Tokenizer::from_gguf(&gguf).unwrap();
    Engine::new(Box::new(backend), tok, Some(ChatTemplate::ChatMl))
}

/// Collects each slot's text and outcome; cancels slot `cancel_at.0` after its
/// `cancel_at.1`-th text piece.
#[derive(Default)]
struct Collect {
    text: Vec<String>,
    pieces: Vec<usize>,
    done: Vec<Option<Result<Summary, String>>>,
    cancel_at: Option<(usize, usize)>,
    /// Per step: how many text pieces each slot got.
    steps: Vec<Vec<usize>>,
}

impl Collect {
    fn new(slots: usize) -> Collect {
        Collect {
            text: vec![String::new(); slots],
            pieces: vec![0; slots],
            done: vec![None; slots],
            ..Collect::default()
        }
    }
}

impl Clients for Collect {
    fn text(&mut self, slot: usize, piece: &str) -> Result<(), FinishReason> {
        self.text[slot].push_str(piece);
        self.pieces[slot] += 1;
        Ok(())
    }

    fn cancelled(&self, slot: usize) -> bool {
        self.cancel_at.is_some_and(|(s, n)| s == slot && self.pieces[slot] >= n)
    }

    fn progress(&mut self) {
        self.steps.push(self.pieces.clone());
    }

    fn finished(&mut self, slot: usize, result: Result<Summary, EngineError>) {
        assert!(self.done[slot].is_none(), "slot {slot} finished twice");
        self.done[slot] = Some(result.map_err(|e| e.to_string()));
    }
}

fn request(prompt: &str, sampling: SamplerConfig, max_tokens: usize) -> Request {
    let mut r = Request::new(Input::Text(prompt.into()));
    r.sampling = sampling;
    r.max_tokens = Some(max_tokens);
    r
}

fn alone(req: &Request) -> (String, Summary) {
    let mut engine = default_engine(1, 512);
    let mut text = String::new();
    let mut sink = |p: &str| {
        text.push_str(p);
        true
    };
    let summary = engine.generate(req, &AtomicBool::new(false), &mut sink).unwrap();
    (text, summary)
}

#[test]
fn each_request_gets_the_tokens_it_gets_alone_and_a_cancel_touches_only_its_own() {
    let greedy = SamplerConfig {
        temperature: 0.0,
        ..SamplerConfig::default()
    };
    let seeded = |seed| SamplerConfig {
        temperature: 0.9,
        seed,
        ..SamplerConfig::default()
    };
    let requests = [
        request("The capital of France is", greedy.clone(), 24),
        request("Once upon a time, in a small village,", seeded(7), 32),
        request("List three colors:", seeded(11), 20),
        request("def fibonacci(n):", greedy.clone(), 28),
    ];
    let expected: Vec<(String, Summary)> = requests.iter().map(alone).collect();
    for cancel in [None, Some((1usize, 5usize))] {
        let mut engine = default_engine(4, 512);
        let mut c = Collect::new(4);
        c.cancel_at = cancel;
        // Staggered: one more request joins every two steps.
        let mut slot_of = Vec::new();
        let mut step = 0;
        while slot_of.len() < requests.len() || engine.active() > 0 {
            if step % 2 == 0 && slot_of.len() < requests.len() {
                slot_of.push(engine.admit(requests[slot_of.len()].clone(), None).unwrap());
            }
            engine.step(&mut c).unwrap();
            step += 1;
        }
        for (k, &slot) in slot_of.iter().enumerate() {
            let summary = c.done[slot].clone().expect("finished").unwrap();
            if cancel.is_some_and(|(s, _)| s == slot) {
                assert_eq!(summary.reason, FinishReason::Cancelled);
                assert!(
                    expected[k].0.starts_with(&c.text[slot]),
                    "request {k}: the cancelled one's text so far is its own"
                );
                continue;
            }
            assert_eq!(c.text[slot], expected[k].0, "request {k} (cancel: {cancel:?})");
            assert_eq!(summary.completion_tokens, expected[k].1.completion_tokens);
            assert_eq!(summary.reason, expected[k].1.reason);
        }
    }
}

#[test]
fn a_prompt_arriving_during_a_stream_is_fed_between_its_tokens() {
    // A batch of 32 tokens: a 200-token prompt takes 7 steps beside a running stream.
    let mut engine = default_engine(2, 32);
    let mut c = Collect::new(2);
    let greedy = SamplerConfig {
        temperature: 0.0,
        ..SamplerConfig::default()
    };
    let mut story = Request::new(Input::Chat(vec![Message::new(
        Role::User,
        "Write a long story about a dragon.",
    )]));
    story.sampling = greedy.clone();
    story.max_tokens = Some(200);
    let streaming = engine.admit(story, None).unwrap();
    for _ in 0..5 {
        engine.step(&mut c).unwrap();
    }
    let long: String = (0..60).map(|i| format!("item {i}, ")).collect();
    let arriving = engine.admit(request(&long, greedy, 4), None).unwrap();
    let prompt_tokens = engine.tokenizer().encode(&long, true).unwrap().len();
    assert!(prompt_tokens > 150, "{prompt_tokens}");
    let steps_before = c.steps.len();
    while c.pieces[arriving] == 0 {
        engine.step(&mut c).unwrap();
    }
    let prefill_steps = c.steps.len() - steps_before;
    // Each step: the stream's token and at most 31 prompt tokens.
    assert!(
        prefill_steps >= prompt_tokens.div_ceil(31),
        "{prefill_steps} steps for {prompt_tokens} tokens"
    );
    // The stream got a token every step while the prompt went in (a token's text can be held
    // back, rarely: a partial character; none is in this answer's first 20 tokens).
    let during: Vec<usize> = c.steps[steps_before - 1..].iter().map(|p| p[streaming]).collect();
    for w in during.windows(2) {
        assert_eq!(
            w[1],
            w[0] + 1,
            "the stream stalled during the other's prompt: {during:?}"
        );
    }
    while engine.active() > 0 {
        engine.step(&mut c).unwrap();
    }
}

#[test]
fn two_conversations_taking_turns_each_find_their_history_cached() {
    let mut engine = default_engine(2, 512);
    let greedy = SamplerConfig {
        temperature: 0.0,
        ..SamplerConfig::default()
    };
    let system = Message::new(Role::System, "You are a helpful assistant.");
    let mut talks = [
        vec![system.clone(), Message::new(Role::User, "Name a fruit.")],
        vec![system, Message::new(Role::User, "Name a planet.")],
    ];
    let mut prompt_len = [0usize; 2];
    for turn in 0..3 {
        for (k, talk) in talks.iter_mut().enumerate() {
            let mut req = Request::new(Input::Chat(talk.clone()));
            req.sampling = greedy.clone();
            req.max_tokens = Some(12);
            let mut text = String::new();
            let mut sink = |p: &str| {
                text.push_str(p);
                true
            };
            let s = engine.generate(&req, &AtomicBool::new(false), &mut sink).unwrap();
            if turn > 0 {
                // Everything up to the last turn's prompt is still there (its answer too,
                // but for the last token, whose keys were never computed).
                assert!(
                    s.cached_tokens >= prompt_len[k],
                    "conversation {k}, turn {turn}: {} cached, its last prompt was {}",
                    s.cached_tokens,
                    prompt_len[k]
                );
            }
            prompt_len[k] = s.prompt_tokens;
            talk.push(Message::new(Role::Assistant, &text));
            talk.push(Message::new(Role::User, "And another one?"));
        }
    }
}
