//! A persistent pool of worker threads for the forward pass, with no allocation per job.
//!
//! A job is plain `Copy` data; the workers own an `Arc` of the executor (weights and shared
//! buffers) and pull work items from an atomic counter until none are left. The calling thread
//! works too. Between jobs workers spin briefly (jobs come every few microseconds while a token
//! is computed) and then sleep on a condition variable (between requests).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Spin iterations before a waiting worker goes to sleep: long enough to bridge the gap between
/// two jobs of one token, short enough not to burn a core between requests.
const SPIN_BEFORE_SLEEP: u32 = 200_000;

/// What the pool runs. `run` is called once per thread per job and pulls items from `next`.
pub trait Executor: Send + Sync + 'static {
    /// A unit of parallel work, described by value.
    type Job: Copy + Send + Sync + 'static;
    /// Does this thread's share of `job` (items are claimed with `next.fetch_add(1)`).
    fn run(&self, job: &Self::Job, worker: usize, next: &AtomicUsize);
}

struct Shared<E: Executor> {
    exec: Arc<E>,
    job: Mutex<Option<E::Job>>,
    generation: AtomicU64,
    next: AtomicUsize,
    done: AtomicUsize,
    sleepers: AtomicUsize,
    quit: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

/// The pool; dropping it stops and joins the workers.
pub struct Pool<E: Executor> {
    shared: Arc<Shared<E>>,
    handles: Vec<JoinHandle<()>>,
}

impl<E: Executor> Pool<E> {
    /// Starts `threads - 1` workers (the caller is the remaining one).
    ///
    /// # Errors
    /// A thread could not be spawned.
    pub fn new(exec: Arc<E>, threads: usize) -> std::io::Result<Pool<E>> {
        let shared = Arc::new(Shared {
            exec,
            job: Mutex::new(None),
            generation: AtomicU64::new(0),
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            quit: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut handles = Vec::new();
        for worker in 1..threads.max(1) {
            let s = Arc::clone(&shared);
            handles.push(
                std::thread::Builder::new()
                    .name(format!("cpu-worker-{worker}"))
                    .spawn(move || worker_loop(&s, worker))?,
            );
        }
        Ok(Pool { shared, handles })
    }

    /// Threads taking part in a job, the caller included.
    pub fn threads(&self) -> usize {
        self.handles.len() + 1
    }

    /// Runs `job` on every thread and returns when all are done.
    pub fn run(&self, job: E::Job) {
        let s = &*self.shared;
        if self.handles.is_empty() {
            s.next.store(0, Ordering::Relaxed);
            s.exec.run(&job, 0, &s.next);
            return;
        }
        *lock(&s.job) = Some(job);
        s.next.store(0, Ordering::Relaxed);
        s.done.store(0, Ordering::Relaxed);
        // SeqCst pairs with the sleeper's SeqCst increment: either it sees the new generation
        // before sleeping, or this sees it as a sleeper and wakes it.
        s.generation.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = lock(&s.lock);
            s.wake.notify_all();
        }
        s.exec.run(&job, 0, &s.next);
        let mut spins = 0u32;
        while s.done.load(Ordering::Acquire) < self.handles.len() {
            spins += 1;
            if spins < 1 << 16 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A worker that panicked poisons nothing we rely on: the data is plain values.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn worker_loop<E: Executor>(s: &Shared<E>, worker: usize) {
    let mut seen = 0u64;
    loop {
        let mut spins = 0u32;
        loop {
            if s.quit.load(Ordering::Acquire) {
                return;
            }
            if s.generation.load(Ordering::Acquire) != seen {
                break;
            }
            spins += 1;
            if spins < SPIN_BEFORE_SLEEP {
                std::hint::spin_loop();
                continue;
            }
            let mut g = lock(&s.lock);
            s.sleepers.fetch_add(1, Ordering::SeqCst);
            while s.generation.load(Ordering::SeqCst) == seen && !s.quit.load(Ordering::SeqCst) {
                g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            s.sleepers.fetch_sub(1, Ordering::SeqCst);
            drop(g);
            spins = 0;
        }
        seen = s.generation.load(Ordering::Acquire);
        let job = *lock(&s.job);
        if let Some(job) = job {
            s.exec.run(&job, worker, &s.next);
        }
        s.done.fetch_add(1, Ordering::Release);
    }
}

impl<E: Executor> Drop for Pool<E> {
    fn drop(&mut self) {
        self.shared.quit.store(true, Ordering::SeqCst);
        {
            let _g = lock(&self.shared.lock);
            self.shared.wake.notify_all();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Summer {
        hits: Vec<AtomicUsize>,
    }

    impl Executor for Summer {
        type Job = usize;
        fn run(&self, &n: &usize, _worker: usize, next: &AtomicUsize) {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return;
                }
                self.hits[i].fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    #[test]
    fn every_item_runs_exactly_once_per_job() {
        for threads in [1, 2, 4] {
            let exec = Arc::new(Summer {
                hits: (0..1000).map(|_| AtomicUsize::new(0)).collect(),
            });
            let pool = Pool::new(Arc::clone(&exec), threads).unwrap();
            for _ in 0..200 {
                pool.run(1000);
            }
            assert!(exec.hits.iter().all(|h| h.load(Ordering::Relaxed) == 200));
        }
    }
}
