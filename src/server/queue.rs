//! The bounded FIFO between the transports and the engine thread.
//!
//! A transport pushes a [`Job`] (an engine request, its cancel flag and where its events go);
//! the engine thread pops a job whenever one of its slots is idle, so jobs wait here only while
//! every slot is busy. A full queue refuses at once (the client gets `busy`); a closed queue
//! (shutdown) refuses everything and hands back what was waiting.

use std::collections::VecDeque;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::engine::{Request, Summary};

/// How a job ended, as its [`Reply`] is told.
#[derive(Debug)]
pub enum Outcome<'a> {
    /// The engine ran it (possibly cancelled).
    Done(&'a Summary),
    /// It failed or was never run; `code` is the protocol's error code.
    Failed {
        /// Stable error code.
        code: &'static str,
        /// Human-readable message.
        message: &'a str,
    },
}

/// Where a job's output goes: implemented by each transport. Called on the engine thread.
pub trait Reply: Send {
    /// A piece of generated text (whole UTF-8 characters). `false` means the client is gone.
    /// Text that does not fit the client's outbound buffer is kept, in order, until it has
    /// room (see [`Reply::waiting`]).
    fn text(&mut self, piece: &str) -> bool;
    /// A piece of the answer's reasoning (thinking on: `engine::Request::thinking`), kept apart
    /// from its text; as [`Reply::text`] otherwise.
    fn reasoning(&mut self, piece: &str) -> bool;
    /// Whether text handed over still waits for room (the client stopped reading): `Some(t)`,
    /// the client having last taken bytes at `t`; `None` once everything is queued for it
    /// (what waited goes now if it fits). The engine makes no more text for the request
    /// while it waits.
    fn waiting(&mut self) -> Option<Instant> {
        None
    }
    /// The job is over; called exactly once.
    fn finish(&mut self, outcome: Outcome<'_>);
}

/// One queued generation.
pub struct Job {
    /// What to generate.
    pub request: Request,
    /// Per-request time limit, counted from when the engine starts the job.
    pub time_limit: Option<Duration>,
    /// Set by the client's connection to stop the job (running or still queued).
    pub cancel: Arc<AtomicBool>,
    /// Where text and the outcome go.
    pub reply: Box<dyn Reply>,
    /// The text-mode connection it came from, whose KV slot is kept for its next turn.
    pub affinity: Option<u64>,
}

/// Why a push was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The queue holds its maximum.
    Full,
    /// The daemon is shutting down.
    Closed,
}

/// The result of waiting for a job.
// A job carries its request's stop strings inline (2 KiB, bounded by their type): it is moved
// once per request, never per token, so boxing it would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum Pop {
    /// The next job; the queue counts it as running until [`Queue::finished`].
    Job(Job),
    /// Nothing arrived within the timeout.
    Idle,
    /// The queue is closed and empty.
    Closed,
}

#[derive(Default)]
struct State {
    waiting: VecDeque<Job>,
    /// The running jobs' cancel flags.
    running: Vec<Arc<AtomicBool>>,
    closed: bool,
}

/// See the module documentation.
pub struct Queue {
    state: Mutex<State>,
    arrived: Condvar,
    depth: usize,
}

impl Queue {
    /// A queue holding at most `depth` waiting jobs (not counting the running one).
    pub fn new(depth: usize) -> Queue {
        Queue {
            state: Mutex::new(State::default()),
            arrived: Condvar::new(),
            depth,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves the queue's data consistent (every
        // update is a single push or pop), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends a job; returns how many jobs are ahead of it (the running ones included).
    ///
    /// # Errors
    /// The queue is full or closed; the job is handed back.
    pub fn push(&self, job: Job) -> Result<usize, (Box<Job>, Refused)> {
        let mut s = self.lock();
        if s.closed {
            return Err((Box::new(job), Refused::Closed));
        }
        if s.waiting.len() >= self.depth {
            return Err((Box::new(job), Refused::Full));
        }
        let ahead = s.waiting.len() + s.running.len();
        s.waiting.push_back(job);
        drop(s);
        self.arrived.notify_one();
        Ok(ahead)
    }

    /// Waits up to `timeout` for the next job.
    pub fn pop(&self, timeout: Duration) -> Pop {
        let mut s = self.lock();
        if s.waiting.is_empty() && !s.closed {
            s = self
                .arrived
                .wait_timeout(s, timeout)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        match s.waiting.pop_front() {
            Some(job) => {
                s.running.push(Arc::clone(&job.cancel));
                Pop::Job(job)
            }
            None if s.closed => Pop::Closed,
            None => Pop::Idle,
        }
    }

    /// The running job with this cancel flag is over.
    pub fn finished(&self, cancel: &Arc<AtomicBool>) {
        let mut s = self.lock();
        if let Some(i) = s.running.iter().position(|c| Arc::ptr_eq(c, cancel)) {
            s.running.swap_remove(i);
        }
    }

    /// Cancels the running jobs (shutdown).
    pub fn cancel_running(&self) {
        for c in &self.lock().running {
            c.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Jobs running.
    pub fn running(&self) -> usize {
        self.lock().running.len()
    }

    /// Jobs waiting (not counting the running one).
    pub fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }

    /// Whether a job is running.
    pub fn busy(&self) -> bool {
        !self.lock().running.is_empty()
    }

    /// Refuses further jobs and returns those still waiting.
    pub fn close(&self) -> Vec<Job> {
        let mut s = self.lock();
        s.closed = true;
        let jobs = s.waiting.drain(..).collect();
        drop(s);
        self.arrived.notify_all();
        jobs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Input;

    struct Nothing;
    impl Reply for Nothing {
        fn text(&mut self, _: &str) -> bool {
            true
        }
        fn reasoning(&mut self, _: &str) -> bool {
            true
        }
        fn finish(&mut self, _: Outcome<'_>) {}
    }

    fn job(text: &str) -> Job {
        Job {
            request: Request::new(Input::Text(text.into())),
            time_limit: None,
            cancel: Arc::default(),
            reply: Box::new(Nothing),
            affinity: None,
        }
    }

    fn prompt(p: Pop) -> String {
        match p {
            Pop::Job(j) => match j.request.input {
                Input::Text(t) => t,
                _ => unreachable!(),
            },
            Pop::Idle => "idle".into(),
            Pop::Closed => "closed".into(),
        }
    }

    /// Pops a job: its prompt and its cancel flag (to say it finished).
    fn take(q: &Queue) -> (String, Arc<AtomicBool>) {
        match q.pop(Duration::ZERO) {
            Pop::Job(j) => {
                let cancel = Arc::clone(&j.cancel);
                (prompt(Pop::Job(j)), cancel)
            }
            other => (prompt(other), Arc::default()),
        }
    }

    #[test]
    fn first_in_first_out_with_positions_and_a_bound() {
        let q = Queue::new(2);
        assert_eq!(q.push(job("a")).ok(), Some(0));
        assert_eq!(q.push(job("b")).ok(), Some(1));
        assert_eq!(q.push(job("c")).err().map(|e| e.1), Some(Refused::Full));
        let (a, a_cancel) = take(&q);
        assert_eq!(a, "a");
        // "a" runs: "c" now fits, with two ahead of it.
        assert_eq!(q.push(job("c")).ok(), Some(2));
        assert!(q.busy());
        q.finished(&a_cancel);
        assert!(!q.busy());
        // Two slots: both run at once, and the queue knows both.
        let (b, b_cancel) = take(&q);
        let (c, c_cancel) = take(&q);
        assert_eq!((b.as_str(), c.as_str()), ("b", "c"));
        assert_eq!(q.running(), 2);
        q.cancel_running();
        assert!(b_cancel.load(std::sync::atomic::Ordering::Relaxed));
        q.finished(&c_cancel);
        q.finished(&b_cancel);
        assert_eq!(q.running(), 0);
        assert_eq!(prompt(q.pop(Duration::from_millis(10))), "idle");
    }

    #[test]
    fn closing_hands_back_the_waiting_jobs_and_refuses_more() {
        let q = Queue::new(4);
        q.push(job("a")).ok();
        q.push(job("b")).ok();
        assert_eq!(q.close().len(), 2);
        assert_eq!(q.push(job("c")).err().map(|e| e.1), Some(Refused::Closed));
        assert_eq!(prompt(q.pop(Duration::from_secs(5))), "closed");
    }

    #[test]
    fn a_waiting_engine_wakes_when_a_job_arrives() {
        let q = Arc::new(Queue::new(1));
        let q2 = Arc::clone(&q);
        let t = std::thread::spawn(move || prompt(q2.pop(Duration::from_secs(30))));
        std::thread::sleep(Duration::from_millis(50));
        q.push(job("x")).ok();
        assert_eq!(t.join().unwrap(), "x");
    }
}
