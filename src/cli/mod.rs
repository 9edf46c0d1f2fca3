//! The `llama-tpu` command line. Each subcommand has its own file (`serve` the daemon, `ask`
//! and `chat` its clients); this one holds the shared options and the exit codes. Engines are
//! assembled by [`crate::engine::load`] from the options' [`ModelSettings`].

mod bench;
mod client;
pub mod config;
mod doctor;
mod info;
mod run;
mod serve;
mod tokenize;

use std::fmt;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub use crate::engine::load::DEFAULT_MODEL;
use crate::engine::load::{LoadError, LoadFailure, ModelSettings};

/// Exit codes (sysexits.h values where one fits), documented in the README.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// Success.
    Ok = 0,
    /// A runtime failure (generation or backend error).
    Failure = 1,
    /// Bad command line (clap's own code).
    Usage = 2,
    /// A model or tokenizer file is malformed or unsupported (EX_DATAERR).
    BadModel = 65,
    /// A model or input file cannot be opened (EX_NOINPUT).
    NoInput = 66,
    /// A device or runtime library is unavailable (EX_UNAVAILABLE).
    Unavailable = 69,
    /// Writing the output failed (EX_IOERR).
    Io = 74,
    /// Bad configuration (EX_CONFIG).
    Config = 78,
}

/// An error with the exit code it maps to.
#[derive(Debug)]
pub struct CliError {
    /// Process exit code.
    pub exit: Exit,
    /// Message for stderr.
    pub message: String,
}

impl CliError {
    /// An error with a code.
    pub fn new(exit: Exit, message: impl Into<String>) -> CliError {
        CliError {
            exit,
            message: message.into(),
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// A model that did not load exits with the code of its cause.
impl From<LoadError> for CliError {
    fn from(e: LoadError) -> CliError {
        let exit = match e.failure {
            LoadFailure::NoInput => Exit::NoInput,
            LoadFailure::BadModel => Exit::BadModel,
            LoadFailure::Unavailable => Exit::Unavailable,
            LoadFailure::Usage => Exit::Usage,
            LoadFailure::Config | LoadFailure::Range => Exit::Config,
        };
        CliError::new(exit, e.message)
    }
}

/// llama-tpu: Llama models on the Sophgo BM1684X TPU, or on the CPU.
#[derive(Debug, Parser)]
#[command(name = "llama-tpu", version, about, long_about = None, after_help = EXIT_CODES)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

const EXIT_CODES: &str = "Exit codes: 0 ok, 1 runtime failure, 2 usage, 65 bad model file, 66 model file not found, \
69 device unavailable, 74 output error, 78 bad configuration.";

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate text from a prompt and stream it to stdout (timings to stderr).
    Run(run::RunArgs),
    /// Describe a model file: architecture, sizes, tensor types, tokenizer, chat template.
    Info(info::InfoArgs),
    /// Print the token ids of a text, space-separated, on one line.
    Tokenize(tokenize::TokenizeArgs),
    /// Measure prompt processing and generation speed (tokens/s, median of several runs).
    Bench(bench::BenchArgs),
    /// Run the daemon: keep the model loaded and answer over a UNIX socket, serial lines and
    /// optionally HTTP.
    Serve(Box<serve::ServeArgs>),
    /// Ask a running daemon one question; the answer streams to stdout.
    Ask(client::AskArgs),
    /// Talk with a running daemon interactively.
    Chat(client::ChatArgs),
    /// Check a TPU box (or the simulator) for the vendor FAQ's failure causes: runtime and
    /// driver versions, device nodes, the bmodel, device memory, the tokenizer, one short run.
    /// One line per check (ok, note, problem); exit 1 when any is a problem.
    Doctor(doctor::DoctorArgs),
}

/// Options that choose and load a model.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Model file (GGUF for the cpu backend, .bmodel for sophon).
    #[arg(short, long, default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    /// Compute backend: cpu (reference, any machine) or sophon (BM1684X TPU; needs --tokenizer).
    #[arg(long, default_value = "cpu", value_parser = BACKENDS)]
    pub backend: String,
    /// sophon: the folder of libbmrt.so and libbmlib.so (default:
    /// /opt/sophon/libsophon-current/lib, then the loader's path).
    #[arg(long, value_name = "DIR", env = "LLAMA_TPU_SOPHON_LIB")]
    pub sophon_lib: Option<PathBuf>,
    /// sophon: TPU device indices, comma-separated (/dev/bm-sophonN on PCIe; the SoC has 0).
    #[arg(long, value_name = "N[,N..]", value_delimiter = ',', default_value = "0")]
    pub devices: Vec<usize>,
    /// sophon: the embedding table of a bmodel without embedding nets (--embedding_disk builds;
    /// default: config/embedding.bin or embedding.bin beside the bmodel).
    #[arg(long, value_name = "FILE")]
    pub embedding_table: Option<PathBuf>,
    /// Threads for matrix work (0 = all cores; at most 1024).
    #[arg(short, long, default_value_t = 0, value_parser = threads_in_range)]
    pub threads: usize,
    /// KV cache length in tokens (default: the model's trained context, at most 4096; never more than it).
    #[arg(short = 'c', long, value_parser = ctx_size_in_range)]
    pub ctx_size: Option<usize>,
    /// Tokenizer file (tokenizer.json, or a SentencePiece tokenizer.model) instead of the model's own vocabulary.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Chat template (chatml, qwen2.5, qwen3, llama2, llama3, llama3.1, llama3.2); default: recognized from the model.
    #[arg(long)]
    pub chat_template: Option<String>,
    /// KV caches: conversations kept and served at once (1 to 64; default: `serve` 4 on the
    /// cpu backend, as many as memory holds up to 4; `run` and `bench` 1).
    #[arg(long, value_parser = slots_in_range)]
    pub slots: Option<usize>,
}

impl ModelArgs {
    /// The settings these options load a model with.
    pub fn settings(&self) -> ModelSettings {
        ModelSettings {
            model: self.model.clone(),
            backend: self.backend.clone(),
            sophon_lib: self.sophon_lib.clone(),
            devices: self.devices.clone(),
            embedding_table: self.embedding_table.clone(),
            threads: self.threads,
            ctx_size: self.ctx_size,
            tokenizer: self.tokenizer.clone(),
            chat_template: self.chat_template.clone(),
            slots: self.slots,
        }
    }
}

/// `--ctx-size`: [`config::CTX_SIZE_RANGE`] (the model's own context is checked at load).
fn ctx_size_in_range(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("{e}"))?;
    if !config::CTX_SIZE_RANGE.contains(&n) {
        return Err(format!(
            "from {} to {} tokens",
            config::CTX_SIZE_RANGE.start(),
            config::CTX_SIZE_RANGE.end()
        ));
    }
    Ok(n)
}

/// `--max-tokens`: 0 to [`crate::engine::MAX_ANSWER_TOKENS`].
pub(crate) fn max_tokens_in_range(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("{e}"))?;
    if n > crate::engine::MAX_ANSWER_TOKENS {
        return Err(format!("at most {}", crate::engine::MAX_ANSWER_TOKENS));
    }
    Ok(n)
}

/// A load failure of settings given as flags: what is out of range for the model is a usage
/// error (2), as any other bad flag.
pub(crate) fn from_flags(e: LoadError) -> CliError {
    match e.failure {
        LoadFailure::Range => CliError::new(Exit::Usage, e.message),
        _ => e.into(),
    }
}

/// `--slots`: 1 to [`crate::engine::MAX_SLOTS`].
fn slots_in_range(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("{e}"))?;
    if !(1..=crate::engine::MAX_SLOTS).contains(&n) {
        return Err(format!("from 1 to {}", crate::engine::MAX_SLOTS));
    }
    Ok(n)
}

/// `--threads`: 0 (all cores) to [`config::MAX_THREADS`].
fn threads_in_range(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("{e}"))?;
    if n > config::MAX_THREADS {
        return Err(format!("at most {}", config::MAX_THREADS));
    }
    Ok(n)
}

/// The backends `--backend` accepts.
pub const BACKENDS: [&str; 2] = ["cpu", "sophon"];

/// Longest text read from stdin (64 MiB): far beyond any context, small enough to refuse a
/// runaway pipe before it eats memory.
const MAX_STDIN_TEXT: u64 = 64 << 20;

/// The text argument, or stdin when it is absent or "-".
///
/// # Errors
/// stdin cannot be read or is not UTF-8 (66).
pub fn text_or_stdin(arg: Option<&str>) -> Result<String, CliError> {
    use std::io::Read;
    match arg {
        Some(t) if t != "-" => Ok(t.to_string()),
        _ => {
            let mut s = String::new();
            std::io::stdin()
                .take(MAX_STDIN_TEXT)
                .read_to_string(&mut s)
                .map_err(|e| CliError::new(Exit::NoInput, format!("cannot read the text from stdin: {e}")))?;
            Ok(s)
        }
    }
}

/// Parses the command line and runs it; returns the exit code.
pub fn main() -> u8 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                Exit::Usage as u8
            } else {
                Exit::Ok as u8
            };
        }
    };
    let result = match cli.command {
        Command::Run(a) => run::run(&a),
        Command::Info(a) => info::info(&a),
        Command::Tokenize(a) => tokenize::tokenize(&a),
        Command::Bench(a) => bench::bench(&a),
        Command::Serve(a) => serve::serve(&a),
        Command::Ask(a) => client::ask(&a),
        Command::Chat(a) => client::chat(&a),
        Command::Doctor(a) => doctor::doctor(&a),
    };
    match result {
        Ok(()) => Exit::Ok as u8,
        Err(e) => {
            eprintln!("llama-tpu: {e}");
            e.exit as u8
        }
    }
}
