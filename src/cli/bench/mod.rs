//! `llama-tpu bench`: prompt processing and generation speed, like llama.cpp's llama-bench.

mod constrained;
mod parallel;

use std::time::Instant;

use clap::Args;

use super::{CliError, Exit, ModelArgs};
use crate::backend::cpu::{CpuBackend, CpuOptions};
use crate::backend::Backend;
use crate::engine::load::{open_gguf, open_sophon, open_tokenizer};

/// Arguments of `bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt length for the prompt-processing test (0 skips it).
    #[arg(short = 'p', long, default_value_t = 512)]
    n_prompt: usize,
    /// Tokens for the generation test (0 skips it).
    #[arg(short = 'n', long, default_value_t = 128)]
    n_gen: usize,
    /// Repetitions; the median is reported.
    #[arg(short = 'r', long, default_value_t = 5)]
    repetitions: usize,
    /// Instead of the tests above: N requests at once (comma-separated, e.g. 1,2,4,8), each a
    /// prompt of --parallel-prompt tokens and -n generated tokens; prints the aggregate
    /// generation speed and the time to first token of a request arriving while N-1 stream.
    #[arg(long, value_name = "N[,N..]", value_delimiter = ',')]
    parallel: Vec<usize>,
    /// Prompt length of each request of --parallel.
    #[arg(long, default_value_t = 64)]
    parallel_prompt: usize,
    /// Instead of the tests above: a free answer and one constrained to this JSON schema,
    /// through the engine; prints the time per token of each (-n tokens at most).
    #[arg(long, value_name = "FILE")]
    json_schema: Option<std::path::PathBuf>,
}

/// The backend to measure, what to call its parallelism in the table, and the CPU kernels'
/// instruction set.
type Measured = (Box<dyn Backend>, String, Option<&'static str>);

fn open_backend(a: &BenchArgs) -> Result<Measured, CliError> {
    open_backend_with(a, 1, a.model.ctx_size.unwrap_or(a.n_prompt.max(a.n_gen).max(1)))
}

fn open_backend_with(a: &BenchArgs, slots: usize, context: usize) -> Result<Measured, CliError> {
    if a.model.backend == "sophon" {
        // Random ids need the vocabulary size, which a bmodel whose lm_head returns a token
        // does not tell: --tokenizer gives it.
        let vocab = match &a.model.tokenizer {
            Some(p) => Some(open_tokenizer(p)?.vocab_size()),
            None => None,
        };
        let backend = open_sophon(&a.model.settings(), vocab)?;
        if backend.info().vocab_size == 0 {
            return Err(CliError::new(
                Exit::Usage,
                "this bmodel's lm_head returns a token: give --tokenizer for the vocabulary size",
            ));
        }
        let devices = format!("tpu {:?}", a.model.devices);
        return Ok((Box::new(backend), devices, None));
    }
    let opened = open_gguf(&a.model.model)?;
    let opts = CpuOptions {
        threads: a.model.threads,
        context: Some(context),
        slots,
        ..CpuOptions::default()
    };
    let backend = CpuBackend::from_parts(opened.file.clone(), &opened.gguf, &opts)
        .map_err(|e| CliError::new(Exit::BadModel, format!("{}: {e}", a.model.model.display())))?;
    let threads = backend.threads().to_string();
    let kernels = backend.kernels().isa().name();
    Ok((Box::new(backend), threads, Some(kernels)))
}

pub(super) fn bench(a: &BenchArgs) -> Result<(), CliError> {
    if !a.parallel.is_empty() {
        return parallel::bench(a);
    }
    if let Some(file) = &a.json_schema {
        return constrained::bench(a, file);
    }
    let (mut backend, threads, kernels) = open_backend(a)?;
    let vocab = backend.info().vocab_size as u32;
    // A TPU bmodel holds SEQLEN tokens: longer tests are cut to it, and say so.
    let context = backend.info().context_length;
    let (n_prompt, n_gen) = (a.n_prompt.min(context), a.n_gen.min(context));
    if (n_prompt, n_gen) != (a.n_prompt, a.n_gen) {
        eprintln!("llama-tpu: the context holds {context} tokens: pp{n_prompt} and tg{n_gen} instead");
    }
    let backend_name = backend.info().backend;
    let fail = |e: crate::backend::BackendError| CliError::new(Exit::Failure, e.to_string());
    let mut rng = fastrand::Rng::with_seed(1);
    let reps = a.repetitions.max(1);
    println!(
        "| model | size | backend | threads | test | t/s (median of {reps}) |\n| --- | ---: | --- | --- | --- | ---: |"
    );
    let size = format!("{:.2} MiB", backend.info().weight_bytes as f64 / (1 << 20) as f64);
    let name = a
        .model
        .model
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let report = |test: String, mut rates: Vec<f64>| {
        rates.sort_by(f64::total_cmp);
        let median = rates[rates.len() / 2];
        let (lo, hi) = (rates[0], rates[rates.len() - 1]);
        println!("| {name} | {size} | {backend_name} | {threads} | {test} | {median:.2} ({lo:.2} - {hi:.2}) |");
    };
    // Generation picks greedily: on a bmodel with greedy_head, the on-chip head.
    let greedy = crate::sampler::SamplerConfig {
        temperature: 0.0,
        ..crate::sampler::SamplerConfig::default()
    };
    backend.configure_sampling(0, &greedy).map_err(fail)?;
    // What one prompt and one decoded token ask of the accelerator (TPU backend).
    let mut per_prompt = None;
    let mut per_token = None;
    // One untimed warm-up pass touches the weights (page faults of the mapping).
    let warm: Vec<u32> = (0..n_prompt.clamp(1, 32)).map(|_| rng.u32(..vocab)).collect();
    backend.prefill(&warm, 0).map_err(fail)?;
    if n_prompt > 0 {
        let mut rates = Vec::with_capacity(reps);
        for _ in 0..reps {
            let tokens: Vec<u32> = (0..n_prompt).map(|_| rng.u32(..vocab)).collect();
            backend.reset();
            let before = backend.traffic();
            let t = Instant::now();
            backend.prefill(&tokens, 0).map_err(fail)?;
            rates.push(n_prompt as f64 / t.elapsed().as_secs_f64());
            per_prompt = before.zip(backend.traffic()).map(|(b, a)| a - b);
        }
        report(format!("pp{n_prompt}"), rates);
    }
    if n_gen > 0 {
        let mut rates = Vec::with_capacity(reps);
        for _ in 0..reps {
            backend.reset();
            let mut token = rng.u32(..vocab);
            let mut after_first = None;
            let t = Instant::now();
            for pos in 0..n_gen {
                backend.decode(token, pos).map_err(fail)?;
                token = rng.u32(..vocab);
                if pos == 0 {
                    after_first = backend.traffic();
                }
            }
            rates.push(n_gen as f64 / t.elapsed().as_secs_f64());
            // Steady state: every step but the first (which lays out the decode mask).
            if n_gen > 1 {
                per_token = after_first
                    .zip(backend.traffic())
                    .map(|(b, a)| (a - b, n_gen as u64 - 1));
            }
        }
        report(format!("tg{n_gen}"), rates);
    }
    let info = backend.info();
    if info.host_state_bytes > 0 {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        println!(
            "\nCPU backend: {} kernels; memory beyond the mapped weights {:.1} MiB (KV cache {:.1} MiB as f16 for {} tokens;{} the rest is activations for batches of {} tokens)",
            kernels.unwrap_or("no"),
            mib(info.host_state_bytes),
            mib(info.kv_cache_bytes),
            info.context_length,
            match info.rearranged_weight_bytes {
                0 => String::new(),
                b => format!(" Q4_0 matrices interleaved for the kernels {:.1} MiB;", mib(b)),
            },
            info.max_batch
        );
    }
    if per_prompt.is_some() || per_token.is_some() {
        println!(
            "\nWhat llama-tpu asks of the TPU (copies the runtime makes inside a launch are not visible):\n\
             | per | launches | syncs | host -> device | device -> host | device -> device |\n\
             | --- | ---: | ---: | ---: | ---: | ---: |"
        );
        let row = |what: String, t: crate::backend::Traffic, n: u64| {
            let per = |x: u64| x as f64 / n as f64;
            println!(
                "| {what} | {:.1} | {:.1} | {:.1} B in {:.1} calls | {:.1} B in {:.1} calls | {:.1} B in {:.1} calls |",
                per(t.launches),
                per(t.syncs),
                per(t.h2d_bytes),
                per(t.h2d_calls),
                per(t.d2h_bytes),
                per(t.d2h_calls),
                per(t.d2d_bytes),
                per(t.d2d_calls)
            );
        };
        if let Some(t) = per_prompt {
            row(format!("prompt of {n_prompt} tokens"), t, 1);
        }
        if let Some((t, n)) = per_token {
            row(format!("decoded token (mean of {n})"), t, n);
        }
    }
    Ok(())
}
