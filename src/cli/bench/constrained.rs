//! `llama-tpu bench --json-schema FILE`: what a constrained token costs. The same prompt is
//! answered freely and constrained to the schema (greedy, through the engine as the daemon
//! runs it), and the generation time per token of each is printed with their ratio. The
//! grammar's tables are built before the first measurement (a daemon builds them on its
//! first constrained request), and schema compilation is timed apart.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use super::{open_backend_with, BenchArgs};
use crate::cli::{CliError, Exit};
use crate::engine::load::model_tokenizer;
use crate::engine::{Engine, Input, Request, Shape, Sink, Summary};
use crate::sampler::SamplerConfig;

/// Discards text.
struct Quiet;

impl Sink for Quiet {
    fn text(&mut self, _: &str) -> bool {
        true
    }
}

pub(super) fn bench(a: &BenchArgs, file: &std::path::Path) -> Result<(), CliError> {
    let text =
        std::fs::read_to_string(file).map_err(|e| CliError::new(Exit::NoInput, format!("{}: {e}", file.display())))?;
    let schema: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| CliError::new(Exit::Usage, format!("{}: not JSON: {e}", file.display())))?;
    let shape = Shape::Schema(Arc::new(schema));
    let (backend, threads, _) = open_backend_with(a, 1, a.model.ctx_size.unwrap_or(1024))?;
    let tokenizer = model_tokenizer(&a.model.settings())?;
    let mut engine = Engine::new(backend, tokenizer, None);
    let grammars = engine.grammars();
    let t = Instant::now();
    grammars
        .compile(&shape)
        .map_err(|e| CliError::new(Exit::Usage, format!("{}: {e}", file.display())))?;
    let first = t.elapsed();
    let t = Instant::now();
    grammars
        .compile(&shape)
        .map_err(|e| CliError::new(Exit::Usage, e.to_string()))?;
    println!(
        "grammar tables and the first compile {:.1} ms, a compile {:.2} ms",
        first.as_secs_f64() * 1e3,
        t.elapsed().as_secs_f64() * 1e3
    );
    let ask = |shape: Option<Shape>| {
        let mut r = Request::new(Input::Text("Here is the record, as JSON:".into()));
        r.sampling = SamplerConfig {
            temperature: 0.0,
            ..SamplerConfig::default()
        };
        r.max_tokens = Some(a.n_gen.max(1));
        // Free text runs its whole length, so both answers are timed over many tokens.
        r.ignore_eos = shape.is_none();
        r.shape = shape;
        r
    };
    let cancel = AtomicBool::new(false);
    let per_token =
        |s: &Summary| s.generation_time.as_secs_f64() * 1e3 / s.completion_tokens.saturating_sub(1).max(1) as f64;
    println!(
        "| threads | answer | tokens | ms/token (median of {}) |\n| --- | --- | ---: | ---: |",
        a.repetitions.max(1)
    );
    let mut medians = [0f64; 2];
    for (i, (name, shape)) in [("free", None), ("constrained", Some(shape))].into_iter().enumerate() {
        let mut times = Vec::new();
        let mut tokens = 0;
        for _ in 0..a.repetitions.max(1) {
            let s = engine
                .generate(&ask(shape.clone()), &cancel, &mut Quiet)
                .map_err(|e| CliError::new(Exit::Failure, e.to_string()))?;
            tokens = s.completion_tokens;
            times.push(per_token(&s));
        }
        times.sort_by(f64::total_cmp);
        medians[i] = times[times.len() / 2];
        println!("| {threads} | {name} | {tokens} | {:.3} |", medians[i]);
    }
    println!("a constrained token costs {:.2}x a free one", medians[1] / medians[0]);
    Ok(())
}
