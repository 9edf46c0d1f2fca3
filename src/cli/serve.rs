//! `llama-tpu serve`: the daemon. Reads the configuration, loads the model once (the HTTP
//! front, if configured, answers `loading` meanwhile) and serves it over a UNIX socket, serial
//! lines and HTTP until SIGTERM or SIGINT; SIGHUP re-reads the reloadable settings. Speaks
//! systemd's notify protocol (READY, STATUS, STOPPING, and the watchdog while the engine makes
//! progress); `--check` only says whether a model is configured (for ExecCondition=).

use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;

use super::config::Config;
use super::{CliError, Exit};
use crate::engine::load::load_engine;
use crate::server::shared::{ModelFacts, Shared};
use crate::server::unix::Listener;
use crate::server::{Server, Transports};
use crate::sys::notify::Notifier;
use crate::sys::{logging, signals};

/// Arguments of `serve`. Each overrides the configuration file's setting of the same name.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Configuration file (TOML; see systemd/llama-tpu.toml for every setting).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Model file (default: models/SmolLM2-135M-Instruct.Q4_1.gguf).
    #[arg(short, long)]
    model: Option<PathBuf>,
    /// Compute backend: cpu or sophon.
    #[arg(long, value_parser = super::BACKENDS)]
    backend: Option<String>,
    /// sophon: folder of libbmrt.so and libbmlib.so.
    #[arg(long, value_name = "DIR", env = "LLAMA_TPU_SOPHON_LIB")]
    sophon_lib: Option<PathBuf>,
    /// sophon: TPU device indices, comma-separated [default: 0].
    #[arg(long, value_name = "N[,N..]", value_delimiter = ',')]
    devices: Vec<usize>,
    /// sophon: the embedding table of a bmodel without embedding nets (--embedding_disk builds;
    /// default: config/embedding.bin or embedding.bin beside the bmodel).
    #[arg(long, value_name = "FILE")]
    embedding_table: Option<PathBuf>,
    /// Threads for matrix work (0 = all cores; at most 1024).
    #[arg(short, long, value_parser = super::threads_in_range)]
    threads: Option<usize>,
    /// KV cache length in tokens.
    #[arg(short = 'c', long)]
    ctx_size: Option<usize>,
    /// KV caches: conversations kept and served at once (1 to 64; default: as many as half the
    /// available memory holds, up to 4).
    #[arg(long, value_parser = super::slots_in_range)]
    slots: Option<usize>,
    /// Tokenizer file (tokenizer.json, or a SentencePiece tokenizer.model) instead of the model's vocabulary.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Chat template (chatml, qwen2.5, qwen3, llama2, llama3, llama3.1, llama3.2).
    #[arg(long)]
    chat_template: Option<String>,
    /// UNIX socket path [default: /run/llama-tpu/llama-tpu.sock].
    #[arg(short, long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Socket file mode, octal [default: 0660].
    #[arg(long, value_name = "MODE")]
    socket_mode: Option<String>,
    /// Socket file group.
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,
    /// Serve a serial line (repeatable; replaces the file's list).
    #[arg(long, value_name = "DEVICE[:BAUD]")]
    serial: Vec<String>,
    /// Serve the HTTP API too: IP:PORT (loopback unless an API key or allowed_hosts is set)
    /// or unix:PATH.
    #[arg(long, value_name = "ADDR")]
    http: Option<String>,
    /// File holding the HTTP API key (clients send 'Authorization: Bearer KEY').
    #[arg(long, value_name = "FILE")]
    api_key_file: Option<PathBuf>,
    /// A Host name the HTTP front answers to besides localhost and IP addresses; '*' for any
    /// (repeatable; replaces the file's list).
    #[arg(long = "allowed-host", value_name = "NAME")]
    allowed_hosts: Vec<String>,
    /// A web origin whose pages may call the HTTP API, e.g. https://app.example (repeatable;
    /// replaces the file's list).
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    cors_origins: Vec<String>,
    /// Requests that may wait behind the running one [default: 8].
    #[arg(long)]
    queue_depth: Option<usize>,
    /// Most socket connections at once [default: 16].
    #[arg(long)]
    max_connections: Option<usize>,
    /// Bytes queued for each client; a request whose client falls further behind waits for
    /// it out of the batch [default: 65536].
    #[arg(long, value_name = "BYTES")]
    outbound_buffer: Option<usize>,
    /// Seconds a request waits for a client that takes none of its answer before it ends
    /// with reason slow_client, 1-3600 [default: 30].
    #[arg(long, value_name = "SECONDS")]
    client_stall_timeout: Option<u64>,
    /// Seconds a request may run, 0 = no limit [default: 300].
    #[arg(long, value_name = "SECONDS")]
    request_timeout: Option<u64>,
    /// Seconds a running request may go on after SIGTERM [default: 0].
    #[arg(long, value_name = "SECONDS")]
    shutdown_grace: Option<f64>,
    /// error, warn, info, debug, trace [default: info].
    #[arg(long)]
    log_level: Option<String>,
    /// Default temperature [default: 0.8].
    #[arg(long)]
    temperature: Option<f32>,
    /// Default most tokens per answer, 0 = no limit [default: 512].
    #[arg(short = 'n', long)]
    max_tokens: Option<usize>,
    /// Fixed seed for every request [default: a new one per request].
    #[arg(long)]
    seed: Option<u64>,
    /// System message of text-mode conversations.
    #[arg(long)]
    system_prompt: Option<String>,
    /// Requests think first unless they say not to (`enable_thinking`; templates with a
    /// thinking mode, Qwen3's, only) [default: off].
    #[arg(long)]
    enable_thinking: bool,
    /// Only check: exit 1 when no model is configured or its file is missing, 255 when the
    /// configuration is invalid, 0 otherwise (for systemd's ExecCondition=).
    #[arg(long)]
    check: bool,
}

impl ServeArgs {
    /// The file's settings with the flags applied.
    fn config(&self) -> Result<Config, CliError> {
        let mut c = match &self.config {
            Some(path) => {
                let c = Config::read(path)?;
                // The file's own values first: a bad one there is a configuration error (78),
                // one the flags bring in a command-line error (2).
                c.validate()?;
                c
            }
            None => Config::default(),
        };
        macro_rules! flag {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { c.$f = v.clone().into(); } )* };
        }
        flag!(
            model,
            tokenizer,
            chat_template,
            socket_group,
            sophon_lib,
            embedding_table
        );
        if !self.devices.is_empty() {
            c.devices = self.devices.clone();
        }
        macro_rules! plain {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { c.$f = v.clone(); } )* };
        }
        plain!(
            backend,
            threads,
            socket,
            socket_mode,
            queue_depth,
            max_connections,
            outbound_buffer,
            client_stall_timeout,
            request_timeout,
            shutdown_grace,
            log_level
        );
        if self.ctx_size.is_some() {
            c.ctx_size = self.ctx_size;
        }
        if self.slots.is_some() {
            c.slots = self.slots;
        }
        if self.http.is_some() {
            c.http = self.http.clone();
        }
        if self.api_key_file.is_some() {
            c.api_key_file = self.api_key_file.clone();
        }
        if !self.allowed_hosts.is_empty() {
            c.allowed_hosts = Some(self.allowed_hosts.clone());
        }
        if !self.cors_origins.is_empty() {
            c.cors_origins = self.cors_origins.clone();
        }
        if !self.serial.is_empty() {
            c.serial = self.serial.clone();
        }
        if let Some(t) = self.temperature {
            c.generation.temperature = t;
        }
        if let Some(n) = self.max_tokens {
            c.generation.max_tokens = n;
        }
        if self.seed.is_some() {
            c.generation.seed = self.seed;
        }
        if self.system_prompt.is_some() {
            c.generation.system_prompt = self.system_prompt.clone();
        }
        if self.enable_thinking {
            c.generation.enable_thinking = true;
        }
        c.validate()
            .map_err(|e| CliError::new(Exit::Usage, format!("{e} (from the command line)")))?;
        Ok(c)
    }
}

/// Messages for the main thread.
enum Event {
    Signal(signals::Request),
    /// The model loaded (or did not), on its own thread.
    Loaded(Box<Result<crate::engine::Engine, CliError>>),
}

impl From<signals::Request> for Event {
    fn from(r: signals::Request) -> Event {
        Event::Signal(r)
    }
}

/// How often the main thread wakes up when no watchdog asks for more.
const TICK: Duration = Duration::from_secs(1);

/// The engine counts as stalled only after this long without a heartbeat, however short the
/// watchdog period (the idle engine thread beats every quarter second).
const STALL_FLOOR: Duration = Duration::from_secs(1);

pub(super) fn serve(a: &ServeArgs) -> Result<(), CliError> {
    let config = match a.config() {
        Ok(c) => c,
        Err(e) if a.check => {
            eprintln!("llama-tpu: {e}");
            std::process::exit(255);
        }
        Err(e) => return Err(e),
    };
    if a.check {
        return check(&config);
    }
    logging::set_level(config.log_level()?);
    crate::sys::memory::use_one_heap();
    let notifier = Notifier::from_env();
    let listener = match Listener::from_systemd().map_err(|e| CliError::new(Exit::Config, e.to_string()))? {
        Some(l) => l,
        None => Listener::bind(&config.socket, config.socket_mode()?, config.socket_group.as_deref())
            .map_err(|e| CliError::new(Exit::Config, e.to_string()))?,
    };
    let http = config.http_front()?;
    let http_where = http.as_ref().map(|(l, _)| l.describe());
    // An HTTP UNIX socket's file goes when the daemon does, however it stops.
    let _http_socket_file = config
        .http
        .as_deref()
        .and_then(|a| a.strip_prefix("unix:"))
        .filter(|_| http.is_some())
        .map(|p| RemovedOnDrop(PathBuf::from(p)));
    let http_loaded = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let http_loading = match &http {
        Some((l, _)) => Some(
            crate::server::http::conn::answer_while_loading(l, Arc::clone(&http_loaded))
                .map_err(|e| CliError::new(Exit::Failure, format!("http: {e}")))?,
        ),
        None => None,
    };
    // Signals first: a SIGTERM or SIGHUP during a long load (a 7B bmodel) must not kill the
    // process with the default action and leave the socket file behind.
    let (tx, rx) = mpsc::channel::<Event>();
    signals::forward(tx.clone())
        .map_err(|e| CliError::new(Exit::Failure, format!("cannot install signal handlers: {e}")))?;
    let model_settings = config.model_settings();
    notifier.status(&format!("loading {}", model_settings.model.display()));
    log::info!("loading {}", model_settings.model.display());
    let loading = model_settings.clone();
    let ctx_from_flag = a.ctx_size.is_some();
    std::thread::Builder::new()
        .name("load".into())
        .spawn(move || {
            crate::faults::slow_load();
            let _ = tx.send(Event::Loaded(Box::new(load_engine(&loading).map_err(|e| {
                if ctx_from_flag {
                    super::from_flags(e)
                } else {
                    CliError::from(e)
                }
            }))));
        })
        .map_err(|e| CliError::new(Exit::Failure, format!("cannot start the loading thread: {e}")))?;
    let mut reload_pending = false;
    let engine = loop {
        match rx.recv() {
            Ok(Event::Loaded(result)) => break (*result)?,
            Ok(Event::Signal(signals::Request::Stop(name))) => {
                // The socket file goes with the listener; the half-loaded model with the process.
                log::info!("{name} while loading the model: stopped");
                notifier.stopping();
                drop(listener);
                return Ok(());
            }
            Ok(Event::Signal(signals::Request::Reload)) => {
                log::info!("SIGHUP while loading the model: the configuration is read again once it is loaded");
                reload_pending = true;
            }
            Err(_) => return Err(CliError::new(Exit::Failure, "the loading thread ended without a model")),
        }
    };
    let info = engine.info().clone();
    let file = std::fs::metadata(&model_settings.model).ok();
    let engine_template = engine.template();
    let facts = ModelFacts {
        model: model_settings.model.file_name().map_or_else(
            || model_settings.model.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        ),
        backend: info.backend.to_string(),
        context_length: info.context_length,
        has_chat_template: engine.template().is_some(),
        tool_syntax: engine.tool_syntax(),
        default_system: engine.template().and_then(|t| t.default_system()),
        slots: engine.slots(),
        quantization: info.dtype.clone(),
        file_size: file.as_ref().map_or(0, std::fs::Metadata::len),
        modified: file.and_then(|m| m.modified().ok()),
    };
    let shared = Arc::new(Shared::new(facts, config.queue_depth, config.defaults()?));
    http_loaded.store(true, std::sync::atomic::Ordering::Release);
    if let Some(t) = http_loading {
        let _ = t.join();
    }
    let where_ = listener.describe();
    let serial = config.serial_lines()?;
    let serial_names: Vec<String> = serial.iter().map(|s| s.path.display().to_string()).collect();
    let server = Server::start(
        engine,
        Arc::clone(&shared),
        Transports {
            listener: Some(listener),
            max_connections: config.max_connections,
            outbound_buffer: config.outbound_buffer,
            serial,
            http,
        },
    )
    .map_err(|e| CliError::new(Exit::Failure, format!("cannot start the server threads: {e}")))?;
    if let Some(template) = engine_template {
        log::info!(
            "chat template {template}; tool calls in the {} syntax",
            shared.facts.tool_syntax.as_str()
        );
    }
    let serving = format!(
        "serving {} ({}, context {}) on {where_}{}{}",
        shared.facts.model,
        shared.facts.backend,
        shared.facts.context_length,
        if serial_names.is_empty() {
            String::new()
        } else {
            format!(" and {}", serial_names.join(", "))
        },
        http_where.map(|w| format!(" and HTTP at {w}")).unwrap_or_default()
    );
    log::info!("{serving}");
    if reload_pending {
        reload(a, &config, &shared);
    }
    notifier.ready(&serving);

    let watchdog = notifier.watchdog_timeout();
    let wake = watchdog.map_or(TICK, |w| (w / 4).clamp(Duration::from_millis(50), TICK));
    let mut last_status = String::new();
    let mut warned_stall = false;
    let mut last_ping = Instant::now() - Duration::from_secs(3600);
    let reason = loop {
        match rx.recv_timeout(wake) {
            Ok(Event::Signal(signals::Request::Stop(name))) => break name,
            Ok(Event::Signal(signals::Request::Reload)) => {
                notifier.reloading();
                reload(a, &config, &shared);
                notifier.ready(&serving);
            }
            Ok(Event::Loaded(_)) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break "signal thread ended",
        }
        if !server.engine_running() {
            notifier.stopping();
            let failure = server.shutdown(Duration::ZERO);
            let why = failure.map_or_else(|| "the engine stopped".to_string(), |f| f.0);
            return Err(CliError::new(Exit::Unavailable, format!("device failure: {why}")));
        }
        if let Some(timeout) = watchdog {
            // Fed only while the engine thread shows life: a hung device gets the service
            // restarted. An idle engine shows life every IDLE_TICK, so "alive" must allow more.
            if shared.stats.since_heartbeat() < (timeout / 2).max(STALL_FLOOR) {
                if last_ping.elapsed() >= timeout / 4 {
                    notifier.watchdog();
                    last_ping = Instant::now();
                }
                warned_stall = false;
            } else if !warned_stall {
                log::error!(
                    "the engine has shown no progress for {:?}; no longer feeding the watchdog",
                    shared.stats.since_heartbeat()
                );
                warned_stall = true;
            }
        }
        let status = status_line(&shared);
        if status != last_status {
            notifier.status(&status);
            last_status = status;
        }
    };
    log::info!("{reason}: shutting down");
    notifier.stopping();
    let grace = Duration::from_secs_f64(config.shutdown_grace);
    match server.shutdown(grace) {
        Some(f) => Err(CliError::new(Exit::Unavailable, format!("device failure: {}", f.0))),
        None => {
            log::info!("stopped");
            Ok(())
        }
    }
}

fn status_line(shared: &Shared) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    format!(
        "{}: {} requests, {} tokens served, {} waiting, {} connections",
        if shared.queue.busy() { "busy" } else { "idle" },
        shared.stats.requests.load(Relaxed),
        shared.stats.tokens.load(Relaxed),
        shared.queue.waiting(),
        shared.stats.connections.load(Relaxed),
    )
}

/// SIGHUP: re-read the configuration; apply what can change without reloading the model.
fn reload(a: &ServeArgs, running: &Config, shared: &Shared) {
    let fresh = match a.config() {
        Ok(c) => c,
        Err(e) => return log::error!("reload: {e}; keeping the current settings"),
    };
    let defaults = match fresh.defaults() {
        Ok(d) => d,
        Err(e) => return log::error!("reload: {e}; keeping the current settings"),
    };
    if let Ok(level) = fresh.log_level() {
        logging::set_level(level);
    }
    shared.set_defaults(defaults);
    let fixed = Config {
        generation: running.generation.clone(),
        request_timeout: running.request_timeout,
        client_stall_timeout: running.client_stall_timeout,
        allow_uids: running.allow_uids.clone(),
        allow_gids: running.allow_gids.clone(),
        log_level: running.log_level.clone(),
        ..fresh
    };
    if &fixed != running {
        log::warn!("reload: settings other than [generation], request_timeout, client_stall_timeout, allow_uids, allow_gids and log_level changed; they apply after a restart");
    }
    log::info!("reloaded the configuration");
}

/// `--check`: whether the service can start.
fn check(config: &Config) -> Result<(), CliError> {
    let Some(model) = &config.model else {
        eprintln!("llama-tpu: no model configured: set `model` in the configuration file");
        std::process::exit(1);
    };
    if !model.is_file() {
        eprintln!("llama-tpu: model {} does not exist", model.display());
        std::process::exit(1);
    }
    // A context longer than the model's is found in its header (a CPU model; a bmodel's
    // context is its SEQLEN, whatever is asked).
    if let (Some(n), "cpu") = (config.ctx_size, config.backend.as_str()) {
        let trained = crate::engine::load::open_gguf(model)
            .ok()
            .and_then(|m| crate::model::LlamaConfig::from_gguf(&m.gguf).ok())
            .map(|c| c.context_length);
        if let Some(trained) = trained.filter(|&t| n > t) {
            eprintln!("llama-tpu: ctx_size {n} is longer than the model's context of {trained} tokens");
            std::process::exit(255);
        }
    }
    println!("configuration valid, model {}", model.display());
    Ok(())
}

/// A socket file removed when the daemon's `serve` returns.
struct RemovedOnDrop(PathBuf);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
