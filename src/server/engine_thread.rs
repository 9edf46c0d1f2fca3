//! The engine thread: the only owner of the engine (and so of the device). It takes jobs from
//! the queue one at a time and streams their text to their replies.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::BackendError;
use crate::engine::{Engine, EngineError, FinishReason, Sink};

use super::queue::{Outcome, Pop, Reply};
use super::shared::Shared;

/// How often an idle engine thread shows life to the watchdog.
const IDLE_TICK: Duration = Duration::from_millis(250);

/// A device failure ended the engine thread; the daemon must exit so it can be restarted.
#[derive(Debug)]
pub struct DeviceFailure(pub String);

/// Serves jobs until the queue is closed and empty, or the device fails.
///
/// # Errors
/// A device failure (the job that met it is answered first).
pub fn serve(mut engine: Engine, shared: Arc<Shared>) -> Result<(), DeviceFailure> {
    loop {
        shared.stats.heartbeat();
        let mut job = match shared.queue.pop(IDLE_TICK) {
            Pop::Job(job) => job,
            Pop::Idle => continue,
            Pop::Closed => return Ok(()),
        };
        if let Some(limit) = job.time_limit {
            // Settings are bounded (a year at most); a limit past the clock's end is none.
            job.request.deadline = Instant::now().checked_add(limit);
        }
        let mut sink = JobSink {
            reply: job.reply.as_mut(),
            shared: &shared,
        };
        let result = engine.generate(&job.request, &job.cancel, &mut sink);
        shared.queue.finished();
        shared.stats.requests.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(summary) => {
                shared.metrics.done(&summary);
                shared
                    .stats
                    .tokens
                    .fetch_add(summary.completion_tokens as u64, Ordering::Relaxed);
                log::debug!(
                    "request done: {} ({} prompt, {} cached, {} generated tokens)",
                    summary.reason.as_str(),
                    summary.prompt_tokens,
                    summary.cached_tokens,
                    summary.completion_tokens
                );
                job.reply.finish(Outcome::Done(&summary));
            }
            Err(e) => {
                let message = e.to_string();
                shared.metrics.failed(error_code(&e));
                job.reply.finish(Outcome::Failed {
                    code: error_code(&e),
                    message: &message,
                });
                if let EngineError::Backend(BackendError::Device { .. }) = e {
                    log::error!("device failure: {message}");
                    return Err(DeviceFailure(message));
                }
                log::info!("request refused: {message}");
            }
        }
    }
}

/// The protocol's error code for an engine error.
pub fn error_code(e: &EngineError) -> &'static str {
    match e {
        EngineError::PromptTooLong { .. } => "prompt_too_long",
        EngineError::EmptyPrompt => "invalid_prompt",
        EngineError::NoTemplate => "no_chat_template",
        EngineError::Sampling(_) => "invalid_field",
        EngineError::Tokenizer(_) => "tokenizer",
        EngineError::Backend(BackendError::Device { .. }) => "device",
        EngineError::Backend(_) => "backend",
    }
}

struct JobSink<'a> {
    reply: &'a mut dyn Reply,
    shared: &'a Shared,
}

impl Sink for JobSink<'_> {
    fn text(&mut self, piece: &str) -> bool {
        self.reply.text(piece)
    }

    fn progress(&mut self) {
        self.shared.stats.heartbeat();
    }

    fn refusal(&self) -> FinishReason {
        if self.reply.fell_behind() {
            FinishReason::SlowClient
        } else {
            FinishReason::Cancelled
        }
    }
}
