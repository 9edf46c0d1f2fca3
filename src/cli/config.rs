//! The daemon's configuration: a TOML file (every setting optional; see
//! `systemd/llama-tpu.toml` for each one with its default), overridden by `serve`'s flags.

use std::path::{Path, PathBuf};
use std::time::Duration;

use log::LevelFilter;
use serde::Deserialize;

use super::{CliError, Exit, DEFAULT_MODEL};
use crate::engine::load::ModelSettings;
use crate::sampler::SamplerConfig;
use crate::server::http::conn::HttpListener;
use crate::server::http::head::Policy;
use crate::server::serial::SerialSpec;
use crate::server::shared::Defaults;

/// Where the socket goes by default (systemd's RuntimeDirectory=llama-tpu).
pub const DEFAULT_SOCKET: &str = "/run/llama-tpu/llama-tpu.sock";

/// Largest configuration file read (a runaway file is an error, not a memory problem).
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Longest `request_timeout`: a year (longer is a typo; an unbounded one overflowed the clock).
pub const MAX_REQUEST_TIMEOUT: u64 = 365 * 24 * 3600;
/// `ctx_size`: a context shorter than a chat template's frame is no use; the model's own
/// context is the real upper bound, checked when it is opened.
pub const CTX_SIZE_RANGE: std::ops::RangeInclusive<usize> = 16..=(1 << 20);
/// Most `threads`.
pub const MAX_THREADS: usize = 1024;
/// Most `queue_depth` and `max_connections` (each connection is a thread and a few buffers).
pub const MAX_CLIENTS: usize = 4096;

/// The file's contents. Every field has a default.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Model file; unset: the working tree's default model (`make model`).
    pub model: Option<PathBuf>,
    /// Backend name.
    pub backend: String,
    /// sophon: folder of libbmrt/libbmlib (unset: the libsophon default, then the loader path).
    pub sophon_lib: Option<PathBuf>,
    /// sophon: device indices.
    pub devices: Vec<usize>,
    /// sophon: the embedding table of a bmodel without embedding nets.
    pub embedding_table: Option<PathBuf>,
    /// tokenizer.json (or a SentencePiece tokenizer.model) instead of the model's vocabulary.
    pub tokenizer: Option<PathBuf>,
    /// Chat template name.
    pub chat_template: Option<String>,
    /// Matrix threads (0 = all cores).
    pub threads: usize,
    /// KV cache length.
    pub ctx_size: Option<usize>,
    /// KV caches (conversations served at once); unset: as many as memory holds, up to 4.
    pub slots: Option<usize>,
    /// Socket path.
    pub socket: PathBuf,
    /// Socket file mode, octal.
    pub socket_mode: String,
    /// Socket file group.
    pub socket_group: Option<String>,
    /// Peers allowed by uid.
    pub allow_uids: Vec<u32>,
    /// Peers allowed by gid.
    pub allow_gids: Vec<u32>,
    /// Most socket connections.
    pub max_connections: usize,
    /// Bytes queued for each client before a request it does not read is stopped.
    pub outbound_buffer: usize,
    /// Serial lines, `DEVICE[:BAUD]`.
    pub serial: Vec<String>,
    /// The HTTP front: `IP:PORT` or `unix:PATH`; absent: off.
    pub http: Option<String>,
    /// File holding the HTTP API key (a reachable address needs it, or `allowed_hosts`).
    pub api_key_file: Option<PathBuf>,
    /// `Host` names the HTTP front answers to besides localhost and IP addresses (`*`: any);
    /// unset: any with a key, the local names only without one.
    pub allowed_hosts: Option<Vec<String>>,
    /// Web origins whose pages may call the HTTP API (CORS); empty: none.
    pub cors_origins: Vec<String>,
    /// Requests waiting at most.
    pub queue_depth: usize,
    /// Seconds a request may run (0 = no limit).
    pub request_timeout: u64,
    /// Seconds a request waits, out of the batch, for a client that takes none of its answer.
    pub client_stall_timeout: u64,
    /// Seconds a running request may go on after SIGTERM before it is cancelled.
    pub shutdown_grace: f64,
    /// error, warn, info, debug, trace.
    pub log_level: String,
    /// Defaults for requests.
    pub generation: Generation,
}

/// `[generation]`: what a request does not say itself.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Generation {
    /// Most tokens per answer (0 = until end of text or context).
    pub max_tokens: usize,
    /// Temperature (0 = greedy).
    pub temperature: f32,
    /// Top-k (0 = off).
    pub top_k: usize,
    /// Top-p (1 = off).
    pub top_p: f32,
    /// Min-p (0 = off).
    pub min_p: f32,
    /// Repetition penalty (1 = off).
    pub repeat_penalty: f32,
    /// Tokens the penalty looks back over.
    pub repeat_last_n: usize,
    /// Fixed seed; absent: a new one per request.
    pub seed: Option<u64>,
    /// System message of text-mode conversations.
    pub system_prompt: Option<String>,
    /// `enable_thinking` of requests that do not say (templates with a thinking mode only).
    pub enable_thinking: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            model: None,
            backend: "cpu".into(),
            sophon_lib: None,
            devices: vec![0],
            embedding_table: None,
            tokenizer: None,
            chat_template: None,
            threads: 0,
            ctx_size: None,
            slots: None,
            socket: DEFAULT_SOCKET.into(),
            socket_mode: "0660".into(),
            socket_group: None,
            allow_uids: Vec::new(),
            allow_gids: Vec::new(),
            max_connections: 16,
            outbound_buffer: crate::server::outbound::DEFAULT_CAPACITY,
            serial: Vec::new(),
            http: None,
            api_key_file: None,
            allowed_hosts: None,
            cors_origins: Vec::new(),
            queue_depth: 8,
            request_timeout: 300,
            client_stall_timeout: crate::server::shared::DEFAULT_CLIENT_STALL_TIMEOUT,
            shutdown_grace: 0.0,
            log_level: "info".into(),
            generation: Generation::default(),
        }
    }
}

impl Default for Generation {
    fn default() -> Self {
        let s = SamplerConfig::default();
        Generation {
            max_tokens: 512,
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            min_p: s.min_p,
            repeat_penalty: s.repeat_penalty,
            repeat_last_n: s.repeat_last_n,
            seed: None,
            system_prompt: None,
            enable_thinking: false,
        }
    }
}

fn bad(message: impl Into<String>) -> CliError {
    CliError::new(Exit::Config, message)
}

impl Config {
    /// Reads a configuration file.
    ///
    /// # Errors
    /// Unreadable file, TOML syntax, unknown keys, wrong types (all exit 78).
    pub fn read(path: &Path) -> Result<Config, CliError> {
        use std::io::Read;
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_CONFIG_BYTES).read_to_string(&mut text))
            .map_err(|e| bad(format!("{}: cannot read the configuration: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| bad(format!("{}: {e}", path.display())))
    }

    /// Checks values that parse but make no sense.
    ///
    /// # Errors
    /// The first bad value (exit 78).
    pub fn validate(&self) -> Result<(), CliError> {
        self.socket_mode()?;
        self.log_level()?;
        self.serial_lines()?;
        self.defaults()?;
        if !(1..=MAX_CLIENTS).contains(&self.queue_depth) || !(1..=MAX_CLIENTS).contains(&self.max_connections) {
            return Err(bad(format!(
                "queue_depth and max_connections must be between 1 and {MAX_CLIENTS}"
            )));
        }
        if !(self.shutdown_grace.is_finite() && (0.0..=3600.0).contains(&self.shutdown_grace)) {
            return Err(bad("shutdown_grace must be between 0 and 3600 seconds"));
        }
        let stall = crate::server::shared::CLIENT_STALL_TIMEOUT_RANGE;
        if !stall.contains(&self.client_stall_timeout) {
            return Err(bad(format!(
                "client_stall_timeout must be between {} and {} seconds, got {}",
                stall.start(),
                stall.end(),
                self.client_stall_timeout
            )));
        }
        if self.request_timeout > MAX_REQUEST_TIMEOUT {
            return Err(bad(format!(
                "request_timeout must be at most {MAX_REQUEST_TIMEOUT} seconds (a year), got {}",
                self.request_timeout
            )));
        }
        let (lo, hi) = (
            crate::server::outbound::MIN_CAPACITY,
            crate::server::outbound::MAX_CAPACITY,
        );
        if !(lo..=hi).contains(&self.outbound_buffer) {
            return Err(bad(format!(
                "outbound_buffer must be between {lo} and {hi} bytes, got {}",
                self.outbound_buffer
            )));
        }
        for host in self.allowed_hosts.iter().flatten() {
            let ok = host == "*"
                || (!host.is_empty()
                    && host.len() <= 253
                    && host
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b)));
            if !ok {
                return Err(bad(format!(
                    "allowed_hosts: '{host}' is not a host name (box.local, 192.168.1.20, or * for any)"
                )));
            }
        }
        for origin in &self.cors_origins {
            let ok = origin == "*"
                || ((origin.starts_with("http://") || origin.starts_with("https://"))
                    && origin.len() <= 300
                    && !origin
                        .trim_end_matches('/')
                        .split_once("://")
                        .is_some_and(|(_, a)| a.is_empty() || a.contains('/')));
            if !ok {
                return Err(bad(format!(
                    "cors_origins: '{origin}' is not a web origin (https://app.example:8443, or * for any)"
                )));
            }
        }
        if self.slots.is_some_and(|n| !(1..=crate::engine::MAX_SLOTS).contains(&n)) {
            return Err(bad(format!(
                "slots must be from 1 to {}, got {}",
                crate::engine::MAX_SLOTS,
                self.slots.unwrap_or(0)
            )));
        }
        if let Some(n) = self.ctx_size.filter(|n| !CTX_SIZE_RANGE.contains(n)) {
            return Err(bad(format!(
                "ctx_size must be from {} to {} tokens (and at most the model's), got {n}",
                CTX_SIZE_RANGE.start(),
                CTX_SIZE_RANGE.end()
            )));
        }
        if self.threads > MAX_THREADS {
            return Err(bad(format!(
                "threads must be at most {MAX_THREADS}, got {}",
                self.threads
            )));
        }
        Ok(())
    }

    /// Binds the HTTP front, if configured. An address that is not loopback needs an API key:
    /// without one the daemon refuses to start.
    ///
    /// # Errors
    /// A bad address, a missing or empty key file, a non-loopback address without a key, a
    /// port or path that cannot be bound.
    pub fn http_front(&self) -> Result<Option<(HttpListener, Policy)>, CliError> {
        let Some(addr) = self.http.as_deref() else {
            return Ok(None);
        };
        let bad = |m: String| CliError::new(Exit::Config, m);
        let api_key = match &self.api_key_file {
            None => None,
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|e| bad(format!("api_key_file {}: {e}", path.display())))?;
                let key = text.trim().to_string();
                if key.is_empty() || key.len() > 1024 || key.contains(char::is_whitespace) {
                    return Err(bad(format!(
                        "api_key_file {}: the key must be one word of 1 to 1024 characters",
                        path.display()
                    )));
                }
                Some(key)
            }
        };
        if let Some(path) = addr.strip_prefix("unix:") {
            let path = Path::new(path);
            if path.exists() && std::os::unix::net::UnixStream::connect(path).is_err() {
                // A stale socket file from a crash; anything else is left alone by bind.
                if std::fs::symlink_metadata(path).is_ok_and(|m| {
                    use std::os::unix::fs::FileTypeExt;
                    m.file_type().is_socket()
                }) {
                    let _ = std::fs::remove_file(path);
                }
            }
            let listener = std::os::unix::net::UnixListener::bind(path)
                .map_err(|e| bad(format!("http: cannot listen on {}: {e}", path.display())))?;
            let policy = Policy::for_unix(api_key, &self.cors_origins);
            return Ok(Some((HttpListener::Unix(listener), policy)));
        }
        let sock: std::net::SocketAddr = addr.parse().map_err(|_| {
            bad(format!(
                "http = '{addr}': expected IP:PORT (127.0.0.1:8080, [::1]:8080) or unix:PATH"
            ))
        })?;
        if !sock.ip().is_loopback() && api_key.is_none() {
            if self.allowed_hosts.is_none() {
                return Err(bad(format!(
                    "http = '{addr}' is reachable from other machines: set api_key_file (clients send 'Authorization: Bearer KEY'), or allowed_hosts to serve those names without a key, or bind a loopback address"
                )));
            }
            log::warn!("http = '{addr}': no API key, anyone who can reach it may use it (allowed_hosts is set)");
        }
        let listener =
            std::net::TcpListener::bind(sock).map_err(|e| bad(format!("http: cannot listen on {sock}: {e}")))?;
        if api_key.is_none() && self.allowed_hosts.iter().flatten().any(|h| h == "*") {
            log::warn!("allowed_hosts = [\"*\"] without an API key: any web page whose name resolves to this address may use the API (no DNS-rebinding protection)");
        }
        let policy = Policy::for_tcp(self.allowed_hosts.as_deref(), api_key, &self.cors_origins);
        Ok(Some((HttpListener::Tcp(listener), policy)))
    }

    /// The socket's file mode.
    ///
    /// # Errors
    /// Not an octal mode.
    pub fn socket_mode(&self) -> Result<u32, CliError> {
        u32::from_str_radix(self.socket_mode.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                bad(format!(
                    "socket_mode '{}' is not an octal file mode such as 0660",
                    self.socket_mode
                ))
            })
    }

    /// The log level.
    ///
    /// # Errors
    /// An unknown level name.
    pub fn log_level(&self) -> Result<LevelFilter, CliError> {
        self.log_level.parse().map_err(|_| {
            bad(format!(
                "log_level '{}': use error, warn, info, debug or trace",
                self.log_level
            ))
        })
    }

    /// The serial lines.
    ///
    /// # Errors
    /// A malformed `DEVICE[:BAUD]`.
    pub fn serial_lines(&self) -> Result<Vec<SerialSpec>, CliError> {
        self.serial.iter().map(|s| s.parse().map_err(bad)).collect()
    }

    /// The request defaults (what SIGHUP re-reads).
    ///
    /// # Errors
    /// Invalid sampling values.
    pub fn defaults(&self) -> Result<Defaults, CliError> {
        let g = &self.generation;
        let sampling = SamplerConfig {
            temperature: g.temperature,
            top_k: g.top_k,
            top_p: g.top_p,
            min_p: g.min_p,
            repeat_penalty: g.repeat_penalty,
            repeat_last_n: g.repeat_last_n,
            // Per request only (OpenAI's fields): a daemon-wide default would surprise clients.
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: 0,
        };
        sampling.validate().map_err(|e| bad(format!("[generation]: {e}")))?;
        if g.max_tokens > crate::engine::MAX_ANSWER_TOKENS {
            return Err(bad(format!(
                "[generation]: max_tokens must be at most {}, got {}",
                crate::engine::MAX_ANSWER_TOKENS,
                g.max_tokens
            )));
        }
        Ok(Defaults {
            sampling,
            seed: g.seed,
            max_tokens: (g.max_tokens > 0).then_some(g.max_tokens),
            system_prompt: g.system_prompt.clone().filter(|s| !s.is_empty()),
            thinking: g.enable_thinking,
            request_timeout: (self.request_timeout > 0).then(|| Duration::from_secs(self.request_timeout)),
            client_stall_timeout: Duration::from_secs(self.client_stall_timeout),
            allow_uids: self.allow_uids.clone(),
            allow_gids: self.allow_gids.clone(),
        })
    }

    /// The model settings for [`crate::engine::load::load_engine`].
    pub fn model_settings(&self) -> ModelSettings {
        ModelSettings {
            model: self.model.clone().unwrap_or_else(|| DEFAULT_MODEL.into()),
            backend: self.backend.clone(),
            sophon_lib: self.sophon_lib.clone(),
            devices: self.devices.clone(),
            embedding_table: self.embedding_table.clone(),
            threads: self.threads,
            ctx_size: self.ctx_size,
            slots: self.slots,
            tokenizer: self.tokenizer.clone(),
            chat_template: self.chat_template.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_file_is_the_defaults() {
        // Every setting is written out with its default value, but the model, which the
        // administrator must choose (the unit does not start until then).
        let text = include_str!("../../systemd/llama-tpu.toml");
        let shipped: Config = toml::from_str(text).unwrap();
        assert_eq!(shipped, Config::default());
        let written: Vec<&str> = text
            .lines()
            .filter_map(|l| l.split_once(" = ").map(|(k, _)| k.trim_start_matches("# ")))
            .collect();
        for key in [
            "model",
            "backend",
            "sophon_lib",
            "devices",
            "embedding_table",
            "tokenizer",
            "chat_template",
            "threads",
            "ctx_size",
            "slots",
            "socket",
            "socket_mode",
            "socket_group",
            "allow_uids",
            "allow_gids",
            "max_connections",
            "outbound_buffer",
            "serial",
            "http",
            "api_key_file",
            "allowed_hosts",
            "cors_origins",
            "queue_depth",
            "request_timeout",
            "client_stall_timeout",
            "shutdown_grace",
            "log_level",
            "max_tokens",
            "temperature",
            "top_k",
            "top_p",
            "min_p",
            "repeat_penalty",
            "repeat_last_n",
            "seed",
            "system_prompt",
            "enable_thinking",
        ] {
            assert!(written.contains(&key), "{key} is not documented in llama-tpu.toml");
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_are_configuration_errors() {
        let unknown = toml::from_str::<Config>("modle = \"x\"").unwrap_err().to_string();
        assert!(unknown.contains("unknown field `modle`"), "{unknown}");
        assert!(toml::from_str::<Config>("[generation]\ntemprature = 1").is_err());
        assert!(toml::from_str::<Config>("queue_depth = \"8\"").is_err());
        let c: Config = toml::from_str("socket_mode = \"0999\"").unwrap();
        assert_eq!(c.validate().unwrap_err().exit, Exit::Config);
        let c: Config = toml::from_str("[generation]\ntop_p = 0").unwrap();
        assert!(c.validate().unwrap_err().message.contains("top_p"));
        let c: Config = toml::from_str("serial = [\"/dev/ttyS1:0\"]").unwrap();
        assert!(c.validate().is_err());
        // A colon followed by something that is not a number belongs to the path
        // (/dev/serial/by-path names have colons).
        let c: Config =
            toml::from_str("serial = [\"/dev/serial/by-path/pci-0000:00:14.0-usb-0:2:1.0-port0\"]").unwrap();
        assert_eq!(c.serial_lines().unwrap()[0].baud, crate::server::serial::DEFAULT_BAUD);
        for bad in [
            "allowed_hosts = [\"a b\"]",
            "allowed_hosts = [\"\"]",
            "cors_origins = [\"ftp://x\"]",
            "cors_origins = [\"https://app.example/path\"]",
        ] {
            let c: Config = toml::from_str(bad).unwrap();
            assert_eq!(c.validate().unwrap_err().exit, Exit::Config, "{bad}");
        }
        let c: Config = toml::from_str(
            "allowed_hosts = [\"box.local\", \"*\"]\ncors_origins = [\"https://app.example:8443/\", \"*\"]",
        )
        .unwrap();
        assert!(c.validate().is_ok());
        let c: Config = toml::from_str("socket_mode = \"0600\"\nrequest_timeout = 0").unwrap();
        assert_eq!(c.socket_mode().unwrap(), 0o600);
        assert_eq!(c.defaults().unwrap().request_timeout, None);
    }
}
