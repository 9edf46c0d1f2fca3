//! What the daemon's threads share: the queue, counters, the model's facts and the settings
//! that SIGHUP may change.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use crate::sampler::SamplerConfig;

use super::queue::Queue;

/// Facts about the loaded model, fixed for the daemon's life.
#[derive(Debug, Clone)]
pub struct ModelFacts {
    /// The model file's name.
    pub model: String,
    /// The backend's name.
    pub backend: String,
    /// KV cache length in tokens.
    pub context_length: usize,
    /// Whether chat requests can be served.
    pub has_chat_template: bool,
    /// How the model writes a tool call (its template's syntax, or the generic format).
    pub tool_syntax: crate::chat::ToolSyntax,
    /// The system message the chat template puts first when a conversation has none (tools
    /// are told after it, as the template itself does).
    pub default_system: Option<&'static str>,
    /// KV caches: requests served at once.
    pub slots: usize,
    /// The weights' type as the backend names it (`Q4_1`, `f16`): Ollama's
    /// `quantization_level`.
    pub quantization: String,
    /// The model file's size in bytes.
    pub file_size: u64,
    /// When the model file was last changed, if the file system says.
    pub modified: Option<std::time::SystemTime>,
}

/// Seconds a request waits for a client that takes none of its answer, by default.
pub const DEFAULT_CLIENT_STALL_TIMEOUT: u64 = 30;

/// The range of `client_stall_timeout`, in seconds.
pub const CLIENT_STALL_TIMEOUT_RANGE: std::ops::RangeInclusive<u64> = 1..=3600;

/// Settings a request does not give itself; re-read on SIGHUP.
#[derive(Debug, Clone, PartialEq)]
pub struct Defaults {
    /// Sampling defaults (the seed is replaced per request unless `seed` is set).
    pub sampling: SamplerConfig,
    /// A fixed seed for every request; `None` draws one per request.
    pub seed: Option<u64>,
    /// Most tokens per answer.
    pub max_tokens: Option<usize>,
    /// The system message at the start of every text-mode conversation.
    pub system_prompt: Option<String>,
    /// `enable_thinking` of requests that do not say.
    pub thinking: bool,
    /// Longest time a request may run.
    pub request_timeout: Option<Duration>,
    /// How long a request whose client takes no bytes waits for it, out of the batch, before
    /// it ends `slow_client`.
    pub client_stall_timeout: Duration,
    /// Peers allowed on the UNIX socket by uid (empty with `allow_gids` empty: everyone the
    /// socket's file mode lets in).
    pub allow_uids: Vec<u32>,
    /// Peers allowed by primary gid.
    pub allow_gids: Vec<u32>,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            sampling: SamplerConfig::default(),
            seed: None,
            max_tokens: Some(512),
            system_prompt: None,
            thinking: false,
            request_timeout: Some(Duration::from_secs(300)),
            client_stall_timeout: Duration::from_secs(DEFAULT_CLIENT_STALL_TIMEOUT),
            allow_uids: Vec::new(),
            allow_gids: Vec::new(),
        }
    }
}

impl Defaults {
    /// Whether a peer may use the socket.
    pub fn allows(&self, uid: u32, gid: u32) -> bool {
        (self.allow_uids.is_empty() && self.allow_gids.is_empty())
            || self.allow_uids.contains(&uid)
            || self.allow_gids.contains(&gid)
    }
}

/// Counters for `status` and the watchdog.
#[derive(Debug)]
pub struct Stats {
    started: Instant,
    /// Requests the engine finished.
    pub requests: AtomicU64,
    /// Tokens generated.
    pub tokens: AtomicU64,
    /// Milliseconds since `started` when the engine thread last showed life.
    heartbeat_ms: AtomicU64,
    /// Connections open now (socket and serial).
    pub connections: AtomicU64,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            started: Instant::now(),
            requests: AtomicU64::new(0),
            tokens: AtomicU64::new(0),
            heartbeat_ms: AtomicU64::new(0),
            connections: AtomicU64::new(0),
        }
    }

    /// Time since the daemon started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The engine thread is alive and making progress.
    pub fn heartbeat(&self) {
        self.heartbeat_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Time since the engine thread last showed life.
    pub fn since_heartbeat(&self) -> Duration {
        let now = self.started.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.heartbeat_ms.load(Ordering::Relaxed)))
    }
}

/// See the module documentation.
pub struct Shared {
    /// The queue in front of the engine.
    pub queue: Queue,
    /// Counters.
    pub stats: Stats,
    /// The model.
    pub facts: ModelFacts,
    defaults: RwLock<Arc<Defaults>>,
    /// Set once shutdown begins: transports stop accepting and reading.
    pub stopping: AtomicBool,
    /// Requests by outcome, tokens, latency histograms (`/metrics`).
    pub metrics: super::metrics::Metrics,
    /// The jobs in the engine's slots (the engine thread's; shutdown's at the last moment).
    pub started_jobs: super::engine_thread::StartedJobs,
}

impl Shared {
    /// Shared state for a daemon.
    pub fn new(facts: ModelFacts, queue_depth: usize, defaults: Defaults) -> Shared {
        Shared {
            queue: Queue::new(queue_depth),
            stats: Stats::new(),
            facts,
            defaults: RwLock::new(Arc::new(defaults)),
            stopping: AtomicBool::new(false),
            metrics: super::metrics::Metrics::default(),
            started_jobs: super::engine_thread::StartedJobs::default(),
        }
    }

    /// The current defaults.
    pub fn defaults(&self) -> Arc<Defaults> {
        Arc::clone(&self.defaults.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Replaces the defaults (SIGHUP).
    pub fn set_defaults(&self, d: Defaults) {
        *self.defaults.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(d);
    }

    /// Whether shutdown has begun.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }
}
