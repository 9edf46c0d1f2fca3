//! `llama-tpu bench --parallel N`: several requests at once through the engine, as a busy
//! daemon runs them. For each N: N-1 requests start and stream; once each has its first
//! token, one more arrives, and its time to first token is what a newcomer waits while the
//! box is busy. The aggregate generation speed counts every request's tokens from the first
//! token made to the last request's end.

use std::time::{Duration, Instant};

use super::{open_backend_with, BenchArgs};
use crate::cli::{CliError, Exit};
use crate::engine::load::model_tokenizer;
use crate::engine::{Clients, Engine, EngineError, FinishReason, Input, Request, Summary};
use crate::sampler::SamplerConfig;

/// What the requests in the engine's slots did, by slot.
struct Watch {
    first_token: Vec<Option<Instant>>,
    admitted: Vec<Instant>,
    ended: Vec<Option<Result<Summary, String>>>,
}

impl Clients for Watch {
    fn text(&mut self, slot: usize, _: &str) -> Result<(), FinishReason> {
        if self.first_token[slot].is_none() {
            self.first_token[slot] = Some(Instant::now());
        }
        Ok(())
    }

    fn cancelled(&self, _: usize) -> bool {
        false
    }

    fn finished(&mut self, slot: usize, result: Result<Summary, EngineError>) {
        self.ended[slot] = Some(result.map_err(|e| e.to_string()));
    }
}

/// One measurement of N streams: aggregate tokens/s and the newcomer's time to first token.
fn run_once(
    engine: &mut Engine,
    n: usize,
    a: &BenchArgs,
    rng: &mut fastrand::Rng,
) -> Result<(f64, Duration), CliError> {
    let vocab = engine.info().vocab_size as u32;
    let slots = engine.slots();
    let mut w = Watch {
        first_token: vec![None; slots],
        admitted: vec![Instant::now(); slots],
        ended: vec![None; slots],
    };
    let request = |rng: &mut fastrand::Rng| {
        let mut r = Request::new(Input::Tokens(
            (0..a.parallel_prompt.max(1)).map(|_| rng.u32(..vocab)).collect(),
        ));
        r.sampling = SamplerConfig {
            temperature: 0.0,
            ..SamplerConfig::default()
        };
        r.max_tokens = Some(a.n_gen.max(1));
        r.ignore_eos = true;
        r
    };
    let fail = |e: EngineError| CliError::new(Exit::Failure, e.to_string());
    let mut started = Vec::with_capacity(n);
    for _ in 0..n - 1 {
        let slot = engine.admit(request(rng), None).map_err(fail)?;
        w.admitted[slot] = Instant::now();
        started.push(slot);
    }
    while started
        .iter()
        .any(|&s| w.first_token[s].is_none() && w.ended[s].is_none())
    {
        engine.step(&mut w).map_err(|e| fail(e.into()))?;
    }
    let newcomer = engine.admit(request(rng), None).map_err(fail)?;
    w.admitted[newcomer] = Instant::now();
    started.push(newcomer);
    while engine.active() > 0 {
        engine.step(&mut w).map_err(|e| fail(e.into()))?;
    }
    let end = Instant::now();
    let mut tokens = 0;
    for &s in &started {
        match w.ended[s].take() {
            Some(Ok(summary)) => tokens += summary.completion_tokens,
            Some(Err(e)) => return Err(CliError::new(Exit::Failure, e)),
            None => return Err(CliError::new(Exit::Failure, "a request never ended")),
        }
    }
    let first = started.iter().filter_map(|&s| w.first_token[s]).min().unwrap_or(end);
    let ttft = w.first_token[newcomer].map_or(Duration::ZERO, |t| t - w.admitted[newcomer]);
    Ok((tokens as f64 / (end - first).as_secs_f64().max(1e-9), ttft))
}

/// Resident memory of this process (VmRSS), in MiB.
fn rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

pub(super) fn bench(a: &BenchArgs) -> Result<(), CliError> {
    let most = a.parallel.iter().copied().max().unwrap_or(1);
    if a.parallel.contains(&0) || most > crate::engine::MAX_SLOTS {
        return Err(CliError::new(
            Exit::Usage,
            format!("--parallel: from 1 to {} requests", crate::engine::MAX_SLOTS),
        ));
    }
    let context = a.model.ctx_size.unwrap_or(a.parallel_prompt + a.n_gen + 1);
    let (backend, threads, _) = open_backend_with(a, most, context)?;
    if backend.info().slots < most {
        return Err(CliError::new(
            Exit::Usage,
            format!(
                "the {} backend holds {} slot(s) of this model: --parallel {most} cannot run at once",
                backend.info().backend,
                backend.info().slots
            ),
        ));
    }
    let tokenizer = model_tokenizer(&a.model.settings())?;
    let mut engine = Engine::new(backend, tokenizer, None);
    let name = a
        .model
        .model
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let backend_name = engine.info().backend;
    let reps = a.repetitions.max(1);
    let mut rng = fastrand::Rng::with_seed(1);
    // Warm-up: touches the weights and every slot's cache.
    run_once(&mut engine, most, a, &mut rng)?;
    println!(
        "| model | backend | threads | requests at once | prompt, generated | aggregate generation t/s (median of {reps}) | first token of one arriving while the others stream, ms (median) | RSS, MiB |\n| --- | --- | --- | ---: | --- | ---: | ---: | ---: |"
    );
    for &n in &a.parallel {
        let mut rates = Vec::with_capacity(reps);
        let mut ttfts = Vec::with_capacity(reps);
        for _ in 0..reps {
            let (rate, ttft) = run_once(&mut engine, n, a, &mut rng)?;
            rates.push(rate);
            ttfts.push(ttft.as_secs_f64() * 1000.0);
        }
        rates.sort_by(f64::total_cmp);
        ttfts.sort_by(f64::total_cmp);
        println!(
            "| {name} | {backend_name} | {threads} | {n} | {}, {} | {:.1} ({:.1} - {:.1}) | {:.0} ({:.0} - {:.0}) | {} |",
            a.parallel_prompt,
            a.n_gen,
            rates[reps / 2],
            rates[0],
            rates[reps - 1],
            ttfts[reps / 2],
            ttfts[0],
            ttfts[reps - 1],
            rss_mib().map_or_else(|| "-".into(), |m| format!("{m:.0}"))
        );
    }
    Ok(())
}
