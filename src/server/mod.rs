//! The daemon's serving side: transports, the pure protocol, the queue and the engine thread.
//!
//! Data flows one way: a transport ([`unix`], [`serial`], [`http`]) frames bytes into lines
//! ([`framing`]; HTTP reads request heads and bodies), the pure parser turns lines into
//! requests ([`protocol`]), a [`session`] turns requests into jobs on the bounded [`queue`],
//! and the [`engine_thread`], the only owner of the engine, streams each job's text back
//! through the job's reply ([`events`] for JSON clients) into the client's bounded
//! [`outbound`] buffer, which a thread of the transport drains. [`shared`] holds what the
//! threads share and [`metrics`] the Prometheus counters. Only the engine thread drives the
//! engine; the rest knows it through its request and summary types (and the HTTP front reads
//! its immutable tokenizer for `/tokenize`).

pub mod engine_thread;
pub mod events;
pub mod framing;
pub mod http;
pub mod metrics;
pub mod outbound;
pub mod protocol;
pub mod queue;
pub mod refusal;
pub mod serial;
pub mod session;
pub mod shared;
pub mod tools;
pub mod unix;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::engine::Engine;

use self::engine_thread::DeviceFailure;
use self::queue::Outcome;
use self::serial::SerialSpec;
use self::shared::Shared;
use self::unix::{Connections, Listener};

/// What to serve on.
pub struct Transports {
    /// The UNIX socket, bound or adopted.
    pub listener: Option<Listener>,
    /// Most socket connections open at once.
    pub max_connections: usize,
    /// Bytes each client's outbound buffer holds (see [`outbound`]).
    pub outbound_buffer: usize,
    /// Serial lines.
    pub serial: Vec<SerialSpec>,
    /// The HTTP front, bound, and who may use it.
    pub http: Option<(http::conn::HttpListener, http::head::Policy)>,
}

/// A running daemon's threads.
pub struct Server {
    shared: Arc<Shared>,
    conns: Arc<Connections>,
    engine: JoinHandle<Result<(), DeviceFailure>>,
    accept: Option<JoinHandle<()>>,
    serial: Vec<JoinHandle<()>>,
    /// HTTP connections open (each ends once its reply is written).
    http_open: Arc<std::sync::atomic::AtomicUsize>,
}

/// Stack of a connection's thread (it frames, parses and queues; serde_json bounds its own
/// recursion; measured use is about 40 KiB): an eighth of the default 2 MiB, so 64
/// connections reserve 16 MiB, not 128, and glibc's cache of freed stacks (40 MiB) keeps
/// them all between bursts instead of mapping fresh ones.
pub(crate) const CONNECTION_STACK: usize = 256 * 1024;

/// How long shutdown waits for the engine to end its cancelled requests (a token each; a
/// prompt chunk may take longer) before it answers them itself.
const ENGINE_TIME: Duration = Duration::from_millis(1200);

/// How long after the grace shutdown may take in all: README promises an exit within 2 s of
/// SIGTERM with the default grace (0), and the process still has to close and unlink.
const EXIT_TIME: Duration = Duration::from_millis(1700);

/// Stack of a connection's drainer thread (it only copies a buffer into a writer).
pub(crate) const DRAINER_STACK: usize = 64 * 1024;

fn spawn<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> std::io::Result<JoinHandle<T>> {
    std::thread::Builder::new().name(name.into()).spawn(f)
}

impl Server {
    /// Starts the engine thread and the transports.
    ///
    /// # Errors
    /// A thread cannot be started.
    pub fn start(engine: Engine, shared: Arc<Shared>, transports: Transports) -> std::io::Result<Server> {
        let conns = Arc::new(Connections::default());
        let tokenizer = engine.shared_tokenizer();
        let grammars = engine.grammars();
        let chat_template = engine.template().map(|t| t.to_string());
        let s = Arc::clone(&shared);
        let engine = spawn("engine", move || engine_thread::serve(engine, s))?;
        let accept = match transports.listener {
            Some(listener) => {
                let (s, c) = (Arc::clone(&shared), Arc::clone(&conns));
                let (max, buffer) = (transports.max_connections, transports.outbound_buffer);
                Some(spawn("accept", move || unix::accept_loop(listener, s, c, max, buffer))?)
            }
            None => None,
        };
        let http_open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        if let Some((listener, policy)) = transports.http {
            let s = Arc::clone(&shared);
            let config = http::conn::HttpConfig {
                policy,
                max_connections: transports.max_connections,
                outbound_buffer: transports.outbound_buffer,
                tokenizer,
                grammars,
                chat_template,
            };
            let open = Arc::clone(&http_open);
            spawn("http-accept", move || {
                http::conn::accept_loop(listener, s, config, open)
            })?;
        }
        let mut serial = Vec::new();
        for spec in transports.serial {
            let s = Arc::clone(&shared);
            let buffer = transports.outbound_buffer;
            serial.push(spawn("serial", move || serial::serve_port(spec, s, buffer))?);
        }
        Ok(Server {
            shared,
            conns,
            engine,
            accept,
            serial,
            http_open,
        })
    }

    /// The shared state (settings, counters).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Whether the engine thread still runs (it ends only on a device failure or shutdown).
    pub fn engine_running(&self) -> bool {
        !self.engine.is_finished()
    }

    /// Stops serving: refuses new work, tells queued clients, lets the running request finish
    /// for up to `grace` and then cancels it, closes every connection and removes the socket
    /// file. Returns the engine thread's device failure, if it had one.
    pub fn shutdown(self, grace: Duration) -> Option<DeviceFailure> {
        self.shared.stopping.store(true, Ordering::SeqCst);
        for mut job in self.shared.queue.close() {
            self.shared.metrics.failed("shutting_down");
            job.reply.finish(Outcome::Failed {
                code: "shutting_down",
                message: "the daemon is shutting down",
            });
        }
        let deadline = Instant::now() + grace;
        while self.shared.queue.busy() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.shared.queue.cancel_running();
        // A cancelled request ends within one token; a prompt chunk may take longer (a big
        // model's, on a slow device). The daemon exits within EXIT_TIME of the grace's end
        // all the same, and every client is told why its request ended: what the engine has
        // not answered by ENGINE_TIME is answered from here.
        let cancelled = Instant::now();
        while !self.engine.is_finished() && cancelled.elapsed() < ENGINE_TIME {
            std::thread::sleep(Duration::from_millis(10));
        }
        if !self.engine.is_finished() {
            let answered = self.shared.started_jobs.abandon(&self.shared);
            log::warn!(
                "the engine is still busy with a prompt; {answered} requests answered shutting_down, exiting without waiting for it"
            );
        }
        // HTTP replies end with a last chunk or body: give their writers the rest of the time
        // to send it (a connection ends once its reply is written).
        while self.http_open.load(Ordering::Acquire) > 0 && cancelled.elapsed() < EXIT_TIME {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.conns.close_all();
        while self.conns.open() > 0 && cancelled.elapsed() < EXIT_TIME {
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(a) = self.accept {
            let _ = a.join();
        }
        drop(self.serial);
        if self.engine.is_finished() {
            match self.engine.join() {
                Ok(Err(failure)) => return Some(failure),
                Ok(Ok(())) => {}
                Err(_) => return Some(DeviceFailure("the engine thread panicked".into())),
            }
        }
        None
    }
}
