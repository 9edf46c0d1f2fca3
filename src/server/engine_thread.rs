//! The engine thread: the only owner of the engine (and so of the device). It starts a job
//! whenever a slot is idle and advances every running job one token per engine step, each
//! job's text going to its own reply.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::backend::BackendError;
use crate::engine::{Clients, Engine, EngineError, FinishReason, Summary, MAX_SLOTS};
use crate::reasoning::Kind;

use super::queue::{Job, Outcome, Pop, Reply};
use super::shared::Shared;

/// How often an idle engine thread shows life to the watchdog.
const IDLE_TICK: Duration = Duration::from_millis(250);

/// How often requests that wait for their clients look again when nothing else runs.
const WAITING_TICK: Duration = Duration::from_millis(10);

/// A device failure ended the engine thread; the daemon must exit so it can be restarted.
#[derive(Debug)]
pub struct DeviceFailure(pub String);

/// Serves jobs until the queue is closed and every job is over, or the device fails.
///
/// # Errors
/// A device failure (the jobs that met it are answered first).
pub fn serve(mut engine: Engine, shared: Arc<Shared>) -> Result<(), DeviceFailure> {
    shared
        .started_jobs
        .lock()
        .resize_with(engine.slots().min(MAX_SLOTS), || None);
    let mut running = Running { shared: &shared };
    let mut closed = false;
    loop {
        shared.stats.heartbeat();
        // Start jobs while a slot is idle; wait for one only when nothing runs.
        while !closed && engine.has_idle_slot() {
            let wait = if engine.active() == 0 {
                IDLE_TICK
            } else {
                Duration::ZERO
            };
            match shared.queue.pop(wait) {
                Pop::Job(job) => running.start(&mut engine, job),
                Pop::Idle => break,
                Pop::Closed => closed = true,
            }
        }
        if engine.active() == 0 {
            if closed {
                return Ok(());
            }
            continue;
        }
        match engine.step(&mut running) {
            // Nothing ran, yet requests remain: each waits for its client to read. Look
            // again in a moment rather than spin (requests that merely ended go on at once).
            Ok(false) if engine.active() > 0 => std::thread::sleep(WAITING_TICK),
            Ok(_) => {}
            Err(e) => {
                let message = e.to_string();
                log::error!("device failure: {message}");
                return Err(DeviceFailure(message));
            }
        }
    }
}

/// A started job: what its client is told through.
struct Ticket {
    cancel: Arc<AtomicBool>,
    reply: Box<dyn Reply>,
    /// Its client takes no text (said once in the log).
    waiting: bool,
}

/// The jobs in the engine's slots, by slot. They live here rather than on the engine
/// thread's stack so that shutdown can answer them when the engine cannot: a prompt chunk of
/// a big model may outlast the time the daemon has to exit, and its client must still be
/// told why its request ended. A job answered that way leaves an empty place, which the
/// engine takes as a cancel when it comes back.
#[derive(Default)]
pub struct StartedJobs {
    jobs: Mutex<Vec<Option<Ticket>>>,
}

impl StartedJobs {
    fn lock(&self) -> MutexGuard<'_, Vec<Option<Ticket>>> {
        // Each critical section moves a ticket or writes through one: a holder's panic leaves
        // the list whole.
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Answers every started job `shutting_down` from the calling thread (shutdown, once the
    /// engine has had its time). Returns how many there were.
    pub fn abandon(&self, shared: &Shared) -> usize {
        let mut jobs = self.lock();
        let mut answered = 0;
        for mut job in jobs.iter_mut().filter_map(Option::take) {
            shared.queue.finished(&job.cancel);
            shared.metrics.failed("shutting_down");
            job.reply.finish(Outcome::Failed {
                code: "shutting_down",
                message: "the daemon is shutting down; the request was stopped",
            });
            answered += 1;
        }
        answered
    }
}

/// The engine thread's view of the started jobs.
struct Running<'a> {
    shared: &'a Shared,
}

impl Running<'_> {
    /// A piece of the answer (or of its reasoning) to the reply of the job in `slot`.
    fn hand(&mut self, slot: usize, kind: Kind, piece: &str) -> Result<(), FinishReason> {
        let mut jobs = self.shared.started_jobs.lock();
        let Some(Some(job)) = jobs.get_mut(slot) else {
            return Err(FinishReason::Cancelled);
        };
        let taken = match kind {
            Kind::Content => job.reply.text(piece),
            Kind::Reasoning => job.reply.reasoning(piece),
        };
        if taken {
            Ok(())
        } else {
            Err(FinishReason::Cancelled)
        }
    }

    fn start(&mut self, engine: &mut Engine, job: Job) {
        let Job {
            mut request,
            time_limit,
            cancel,
            reply,
            affinity,
        } = job;
        if let Some(limit) = time_limit {
            // Settings are bounded (a year at most); a limit past the clock's end is none.
            request.deadline = Instant::now().checked_add(limit);
        }
        let job = Ticket {
            cancel,
            reply,
            waiting: false,
        };
        match engine.admit(request, affinity) {
            Ok(slot) => match self.shared.started_jobs.lock().get_mut(slot) {
                Some(place) => *place = Some(job),
                None => self.end(job, Err(EngineError::Busy)),
            },
            Err(e) => self.end(job, Err(e)),
        }
    }

    /// Tells a job's client how it ended and counts it.
    fn end(&self, mut job: Ticket, result: Result<Summary, EngineError>) {
        let shared = self.shared;
        shared.queue.finished(&job.cancel);
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
                if !matches!(e, EngineError::Backend(BackendError::Device { .. })) {
                    log::info!("request refused: {message}");
                }
            }
        }
    }
}

impl Clients for Running<'_> {
    fn text(&mut self, slot: usize, piece: &str) -> Result<(), FinishReason> {
        self.hand(slot, Kind::Content, piece)
    }

    fn reasoning(&mut self, slot: usize, piece: &str) -> Result<(), FinishReason> {
        self.hand(slot, Kind::Reasoning, piece)
    }

    fn ready(&mut self, slot: usize) -> Result<bool, FinishReason> {
        let mut jobs = self.shared.started_jobs.lock();
        let Some(Some(job)) = jobs.get_mut(slot) else {
            return Err(FinishReason::Cancelled);
        };
        let Some(taken) = job.reply.waiting() else {
            if job.waiting {
                job.waiting = false;
                log::debug!("slot {slot}: its client reads again; the request goes on");
            }
            return Ok(true);
        };
        if !job.waiting {
            job.waiting = true;
            log::info!("slot {slot}: its client takes no more text; the request waits out of the batch");
        }
        // A request whose client does not read never holds up another. A job can sit in the
        // queue for a moment while a slot is idle (pushed during this step, popped before
        // the next): only with every slot busy does it need this one.
        let every_slot_busy = jobs.iter().all(Option::is_some);
        if every_slot_busy && self.shared.queue.waiting() > 0 {
            log::info!("slot {slot}: a queued request needs the slot; the request whose client does not read ends");
            return Err(FinishReason::SlowClient);
        }
        let limit = self.shared.defaults().client_stall_timeout;
        if taken.elapsed() >= limit {
            log::info!(
                "slot {slot}: its client took nothing for {} s (client_stall_timeout); the request ends",
                limit.as_secs()
            );
            return Err(FinishReason::SlowClient);
        }
        Ok(false)
    }

    fn cancelled(&self, slot: usize) -> bool {
        match self.shared.started_jobs.lock().get(slot) {
            Some(Some(job)) => job.cancel.load(Ordering::Relaxed),
            _ => true,
        }
    }

    fn progress(&mut self) {
        self.shared.stats.heartbeat();
    }

    fn finished(&mut self, slot: usize, result: Result<Summary, EngineError>) {
        let job = self.shared.started_jobs.lock().get_mut(slot).and_then(Option::take);
        if let Some(job) = job {
            self.end(job, result);
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
        EngineError::Busy => "busy",
        EngineError::Grammar(_) => "invalid_schema",
        EngineError::Tokenizer(_) => "tokenizer",
        EngineError::Backend(BackendError::Device { .. }) => "device",
        EngineError::Backend(_) => "backend",
    }
}
