//! llama.cpp's recorded greedy continuations (tests/data/*_llamacpp.json, written by
//! scripts/llamacpp_golden.py through llama.cpp's C API) and the walk that compares a backend
//! with them step by step. Included with `#[path]` by the suites that use it (tests/smollm2.rs,
//! tests/qwen25.rs, tests/arch_llamacpp.rs), so the other suites do not recompile with it.
#![allow(dead_code)]

use std::path::Path;

use llama_tpu::backend::{Backend, Next};
use llama_tpu::tokenizer::Tokenizer;
use serde_json::Value;

/// One step of llama.cpp's greedy continuation: the token it chose, and its highest logits
/// (best first) from which it chose.
pub struct Step {
    pub id: u32,
    pub top: Vec<(u32, f32)>,
}

/// A prompt: llama.cpp's ids for it, the text of its continuation (the end-of-generation token
/// left out) and its steps.
pub struct Case {
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
    pub continuation: String,
    pub steps: Vec<Step>,
}

/// A file of tests/data, parsed.
pub fn read(name: &str) -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A JSON array of token ids.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_u64().unwrap() as u32)
        .collect()
}

/// The cases of a golden's JSON array of prompts.
pub fn cases(v: &Value) -> Vec<Case> {
    let step = |s: &Value| Step {
        id: s["id"].as_u64().unwrap() as u32,
        top: s["top"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_u64().unwrap() as u32, p[1].as_f64().unwrap() as f32))
            .collect(),
    };
    v.as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            prompt: c["prompt"].as_str().unwrap().into(),
            prompt_ids: ids(&c["prompt_ids"]),
            continuation: c["continuation"].as_str().unwrap().into(),
            steps: c["steps"].as_array().unwrap().iter().map(step).collect(),
        })
        .collect()
}

/// `tok` gives llama.cpp's ids for each text of a tokens golden (`name`: a JSON array of
/// `{text, ids}`, at least 30), and the ids decode back to the text without its ChatML
/// markers (byte-level BPE is lossless; control tokens decode to nothing).
pub fn assert_token_ids(tok: &Tokenizer, name: &str) {
    let cases = read(name);
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 30, "{name}: only {} texts", cases.len());
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want = ids(&c["ids"]);
        assert_eq!(tok.encode(text, true).unwrap(), want, "{name}: text {text:?}");
        assert_eq!(
            tok.decode(&want),
            text.replace("<|im_start|>", "")
                .replace("<|im_end|>", "")
                .replace("<|endoftext|>", ""),
            "{name}: decoded {text:?}"
        );
    }
}

/// How far our logits may be from llama.cpp's, and why the bounds are what they are is the
/// calling test's to say.
pub struct Tolerances {
    /// Each of llama.cpp's top logits within this of ours; none of our others above its last
    /// by more than this.
    pub logit: f32,
    /// The mean difference over every compared logit (an error spread over all of them, too
    /// small for the per-logit bound, moves the mean).
    pub mean: f32,
    /// Our greedy token may differ from llama.cpp's only where its own top two are closer than
    /// this (0: never).
    pub tie: f32,
}

/// What a walk saw.
pub struct Walk {
    pub prompts: usize,
    pub steps: usize,
    /// Steps where llama.cpp's top two are within the tie bound.
    pub ties: usize,
    /// Steps where our greedy token is another.
    pub differ: usize,
    /// The largest top-two gap of llama.cpp's where we chose another token.
    pub widest: f32,
    /// The smallest top-two gap of llama.cpp's over all steps.
    pub narrowest: f32,
    pub compared: usize,
    pub worst: f32,
    pub mean: f32,
}

impl std::fmt::Display for Walk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} steps of {} prompts: our token is llama.cpp's at {}, another at {} of the {} \
             near-ties (the widest {}; llama.cpp's top two at least {:.4} apart at any step); \
             {} logits differ by at most {:.5}, {:.5} on average",
            self.steps,
            self.prompts,
            self.steps - self.differ,
            self.differ,
            self.ties,
            self.widest,
            self.narrowest,
            self.compared,
            self.worst,
            self.mean
        )
    }
}

fn argmax(v: &[f32]) -> u32 {
    (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap() as u32
}

/// Follows llama.cpp's greedy continuation of each case (its tokens fed back: teacher forcing)
/// on `b`'s slot 0 and compares, at every step, each logit llama.cpp recorded with ours, under
/// `tol`. First checks that `tok` gives llama.cpp's prompt ids and decodes its continuation.
/// `label` starts every failure's message.
pub fn walk(b: &mut dyn Backend, tok: &Tokenizer, cases: &[Case], tol: &Tolerances, label: &str) -> Walk {
    let mut w = Walk {
        prompts: cases.len(),
        steps: 0,
        ties: 0,
        differ: 0,
        widest: 0.0,
        narrowest: f32::INFINITY,
        compared: 0,
        worst: 0.0,
        mean: 0.0,
    };
    let mut sum = 0f64;
    for case in cases {
        let prompt = &case.prompt;
        assert_eq!(tok.encode(prompt, true).unwrap(), case.prompt_ids, "{label}{prompt:?}");
        let chosen: Vec<u32> = case.steps.iter().map(|s| s.id).collect();
        let text: Vec<u32> = chosen.iter().filter(|&&t| !tok.is_eog(t)).copied().collect();
        assert_eq!(tok.decode(&text), case.continuation, "{label}{prompt:?}");
        let Next::Logits(l) = b.prefill(&case.prompt_ids, 0).unwrap() else {
            unreachable!("a CPU backend returns logits")
        };
        let mut logits = l.to_vec();
        let mut pos = case.prompt_ids.len();
        for (i, step) in case.steps.iter().enumerate() {
            let theirs = &step.top;
            let at = format!("{label}{prompt:?} step {i} (after {:?})", tok.decode(&chosen[..i]));
            assert_eq!(theirs[0].0, step.id, "{at}: the golden's best is its token");
            assert_eq!(theirs.len(), 20, "{at}: the golden keeps llama.cpp's 20 best");
            for &(t, v) in theirs {
                let d = (logits[t as usize] - v).abs();
                assert!(
                    d <= tol.logit,
                    "{at}: {:?} ({t}) scores {} here, {v} in llama.cpp",
                    tok.decode(&[t]),
                    logits[t as usize]
                );
                w.worst = w.worst.max(d);
                sum += d as f64;
                w.compared += 1;
            }
            let floor = theirs.last().unwrap().1;
            let above = (0..logits.len() as u32)
                .filter(|&t| logits[t as usize] > floor + tol.logit)
                .find(|t| !theirs.iter().any(|p| p.0 == *t));
            assert_eq!(above, None, "{at}: above llama.cpp's 20th ({floor}) here only");
            let ours = argmax(&logits);
            let gap = theirs[0].1 - theirs[1].1;
            w.narrowest = w.narrowest.min(gap);
            w.ties += (gap < tol.tie) as usize;
            if ours != step.id {
                assert!(
                    gap < tol.tie,
                    "{at}: we choose {:?}, llama.cpp {:?} by {gap}",
                    tok.decode(&[ours]),
                    tok.decode(&[step.id])
                );
                w.differ += 1;
                w.widest = w.widest.max(gap);
            }
            w.steps += 1;
            if i + 1 < case.steps.len() {
                let Next::Logits(l) = b.decode(step.id, pos).unwrap() else {
                    unreachable!("a CPU backend returns logits")
                };
                logits.copy_from_slice(l);
                pos += 1;
            }
        }
    }
    w.mean = (sum / w.compared.max(1) as f64) as f32;
    assert!(w.mean <= tol.mean, "{label}logits differ by {} on average", w.mean);
    w
}
