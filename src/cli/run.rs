//! `llama-tpu run`: one prompt, streamed to stdout.

use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::Args;

use super::{text_or_stdin, CliError, Exit, ModelArgs};
use crate::chat::{Message, Role};
use crate::engine::load::load_engine;
use crate::engine::{Input, Request};
use crate::sampler::SamplerConfig;

/// Arguments of `run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt; read from stdin when absent or "-".
    prompt: Option<String>,
    /// Apply the chat template (the prompt is the user's message).
    #[arg(long)]
    chat: bool,
    /// System message for --chat.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Top-k (0 = off).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Top-p (1 = off).
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Min-p (0 = off).
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    /// Repetition penalty (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Tokens the repetition penalty looks back over.
    #[arg(long, default_value_t = 64)]
    repeat_last_n: usize,
    /// RNG seed (same seed, same output).
    #[arg(short, long, default_value_t = 0)]
    seed: u64,
    /// Most tokens to generate, at most 1048576 (default: until end of text or context).
    #[arg(short = 'n', long, value_parser = super::max_tokens_in_range)]
    max_tokens: Option<usize>,
    /// Stop when this string is generated (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Do not print timings to stderr.
    #[arg(long)]
    quiet: bool,
}

pub(super) fn run(a: &RunArgs) -> Result<(), CliError> {
    let prompt = text_or_stdin(a.prompt.as_deref())?;
    let sampling = SamplerConfig {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repeat_penalty: a.repeat_penalty,
        repeat_last_n: a.repeat_last_n,
        frequency_penalty: 0.0,
        presence_penalty: 0.0,
        seed: a.seed,
    };
    sampling.validate().map_err(|e| CliError::new(Exit::Usage, e))?;
    // One request: one slot, unless asked.
    let mut model = a.model.settings();
    model.slots = model.slots.or(Some(1));
    let mut engine = load_engine(&model).map_err(super::from_flags)?;
    let input = if a.chat {
        let mut messages = Vec::new();
        if let Some(s) = &a.system {
            messages.push(Message::new(Role::System, s.clone()));
        }
        messages.push(Message::new(Role::User, prompt));
        Input::Chat(messages)
    } else {
        Input::Text(prompt)
    };
    let request = Request {
        input,
        sampling,
        max_tokens: a.max_tokens,
        stop: crate::engine::stop_strings(a.stop.iter().map(String::as_str))
            .map_err(|e| CliError::new(Exit::Usage, format!("--stop: {e}")))?,
        deadline: None,
        drop_old_turns: false,
        ignore_eos: false,
        shape: None,
        thinking: false,
    };

    // Ctrl-C ends the generation (reason "cancelled"); a second one exits at once.
    let cancel = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&cancel));
        let _ = signal_hook::flag::register(sig, Arc::clone(&cancel));
    }

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut write_error: Option<std::io::Error> = None;
    let mut sink = |piece: &str| match out.write_all(piece.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => true,
        Err(e) => {
            write_error = Some(e);
            false
        }
    };
    let summary = engine
        .generate(&request, &cancel, &mut sink)
        .map_err(|e| CliError::new(Exit::Failure, e.to_string()))?;
    if let Some(e) = write_error {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(CliError::new(Exit::Io, format!("cannot write the answer: {e}")));
        }
    }
    let _ = writeln!(out);
    if !a.quiet {
        eprintln!(
            "\n[{}] prompt: {} tokens ({} cached), {:.1} tokens/s | generation: {} tokens, {:.1} tokens/s | first token: {:.0} ms | stop: {}",
            engine.info().backend,
            summary.prompt_tokens,
            summary.cached_tokens,
            summary.prompt_tokens_per_second(),
            summary.completion_tokens,
            summary.generation_tokens_per_second(),
            summary.time_to_first_token.as_secs_f64() * 1000.0,
            summary.reason.as_str()
        );
    }
    Ok(())
}
