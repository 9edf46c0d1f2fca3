//! The `llama-tpu` command line. Each subcommand has its own file (`serve` the daemon, `ask`
//! and `chat` its clients); this one holds the shared options, model loading and the exit codes.

mod bench;
mod client;
pub mod config;
mod doctor;
mod info;
mod run;
mod serve;
mod tokenize;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};

use crate::backend::cpu::{CpuBackend, CpuOptions};
use crate::backend::{Backend, BackendError};
use crate::chat::ChatTemplate;
use crate::engine::Engine;
use crate::model::{Gguf, MappedFile};
use crate::tokenizer::Tokenizer;

/// The embedded default model, fetched by `make model`.
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

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
    #[arg(short = 'c', long)]
    pub ctx_size: Option<usize>,
    /// Tokenizer file (tokenizer.json, or a SentencePiece tokenizer.model) instead of the model's own vocabulary.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Chat template (chatml, llama2, llama3); default: recognized from the model.
    #[arg(long)]
    pub chat_template: Option<String>,
    /// KV caches: conversations kept and served at once (1 to 64; default: `serve` 4 on the
    /// cpu backend, as many as memory holds up to 4; `run` and `bench` 1).
    #[arg(long, value_parser = slots_in_range)]
    pub slots: Option<usize>,
}

/// `--slots`: 1 to [`crate::engine::MAX_SLOTS`].
fn slots_in_range(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("{e}"))?;
    if !(1..=crate::engine::MAX_SLOTS).contains(&n) {
        return Err(format!("from 1 to {}", crate::engine::MAX_SLOTS));
    }
    Ok(n)
}

/// A mapped and parsed GGUF.
pub struct OpenedModel {
    /// The mapping.
    pub file: Arc<MappedFile>,
    /// The parsed header.
    pub gguf: Gguf,
}

/// Maps and parses a GGUF, with errors that name the file.
///
/// # Errors
/// Missing file (66) or malformed content (65).
pub fn open_gguf(path: &Path) -> Result<OpenedModel, CliError> {
    let file = MappedFile::open(path).map_err(|e| {
        let hint = if path == Path::new(DEFAULT_MODEL) {
            " (run `make model` to fetch the default model)"
        } else {
            ""
        };
        CliError::new(Exit::NoInput, format!("{}: cannot open: {e}{hint}", path.display()))
    })?;
    let gguf = Gguf::parse(&file).map_err(|e| CliError::new(Exit::BadModel, format!("{}: {e}", path.display())))?;
    Ok(OpenedModel {
        file: Arc::new(file),
        gguf,
    })
}

/// The chat template: `--chat-template`, else recognized from the GGUF.
///
/// # Errors
/// An unknown template name (the message lists the known ones).
pub fn choose_template(name: Option<&str>, gguf: Option<&Gguf>) -> Result<Option<ChatTemplate>, CliError> {
    if let Some(n) = name {
        return n
            .parse::<ChatTemplate>()
            .map(Some)
            .map_err(|e| CliError::new(Exit::Usage, e.to_string()));
    }
    let jinja = gguf.and_then(|g| g.str_opt("tokenizer.chat_template").ok().flatten());
    Ok(jinja.and_then(ChatTemplate::detect))
}

/// A `--tokenizer` file: one that cannot be opened is 66, one that does not parse 65.
fn open_tokenizer(path: &std::path::Path) -> Result<Tokenizer, CliError> {
    if let Err(e) = std::fs::File::open(path) {
        return Err(CliError::new(
            Exit::NoInput,
            format!("{}: cannot open the tokenizer: {e}", path.display()),
        ));
    }
    Tokenizer::from_file(path).map_err(|e| CliError::new(Exit::BadModel, e.to_string()))
}

/// `--threads`: 0 (all cores) to [`config::MAX_THREADS`].
fn threads_in_range(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("{e}"))?;
    if n > config::MAX_THREADS {
        return Err(format!("at most {}", config::MAX_THREADS));
    }
    Ok(n)
}

/// Loads the tokenizer for a model.
///
/// # Errors
/// Unreadable or inconsistent tokenizer data (65 or 66).
pub fn load_tokenizer(args: &ModelArgs, gguf: &Gguf) -> Result<Tokenizer, CliError> {
    match &args.tokenizer {
        Some(p) => open_tokenizer(p),
        None => Tokenizer::from_gguf(gguf)
            .map_err(|e| CliError::new(Exit::BadModel, format!("{}: {e}", args.model.display()))),
    }
}

/// The tokenizer of a model alone: `--tokenizer`, else the GGUF's vocabulary (a bmodel holds
/// none).
///
/// # Errors
/// As for [`load_tokenizer`]; a bmodel without `--tokenizer` (2).
pub fn model_tokenizer(args: &ModelArgs) -> Result<Tokenizer, CliError> {
    match &args.tokenizer {
        Some(p) => open_tokenizer(p),
        None if args.backend == "sophon" => Err(CliError::new(
            Exit::Usage,
            "the sophon backend needs --tokenizer (a bmodel holds no vocabulary)",
        )),
        None => load_tokenizer(args, &open_gguf(&args.model)?.gguf),
    }
}

/// The backends `--backend` accepts.
pub const BACKENDS: [&str; 2] = ["cpu", "sophon"];

/// Loads model, tokenizer, template and backend into an engine.
///
/// # Errors
/// As for the pieces.
pub fn load_engine(args: &ModelArgs) -> Result<Engine, CliError> {
    if args.backend == "sophon" {
        return load_sophon(args);
    }
    let opened = open_gguf(&args.model)?;
    let template = choose_template(args.chat_template.as_deref(), Some(&opened.gguf))?;
    // The model first: "unsupported architecture" says more than a missing tokenizer key.
    let backend = load_cpu(args, &opened)?;
    let tokenizer = load_tokenizer(args, &opened.gguf)?;
    Ok(Engine::new(Box::new(backend), tokenizer, template))
}

/// Opens `--model` on the TPU with exit codes by cause: no runtime or device 69, a bmodel
/// that does not load or fit 65.
///
/// # Errors
/// As said.
pub fn open_sophon(
    args: &ModelArgs,
    vocab_hint: Option<usize>,
) -> Result<crate::backend::sophon::SophonBackend, CliError> {
    use crate::backend::sophon::{SophonBackend, SophonError, SophonOptions};
    let unfinished = std::sync::Arc::clone(crate::backend::sophon::device::unfinished_call());
    if let Err(e) = crate::sys::signals::exit_on_abort_while(unfinished, Exit::Unavailable as i32) {
        log::warn!("cannot watch for the vendor runtime's aborts: {e}");
    }
    if let Err(e) = std::fs::metadata(&args.model) {
        return Err(CliError::new(
            Exit::NoInput,
            format!("{}: cannot open: {e}", args.model.display()),
        ));
    }
    let opts = SophonOptions {
        lib_dir: args.sophon_lib.clone(),
        devices: args.devices.clone(),
        vocab_hint,
        embedding_table: args.embedding_table.clone(),
    };
    let name = args.model.display();
    SophonBackend::open(&args.model, &opts).map_err(|e| match e {
        SophonError::Runtime(m) => CliError::new(Exit::Unavailable, m),
        SophonError::Contract(c) => CliError::new(Exit::BadModel, format!("{name}: {c}")),
        SophonError::Device(
            d @ BackendError::Device {
                call: "bmrt_load_bmodel",
                ..
            },
        ) => CliError::new(Exit::BadModel, format!("{name}: {d}")),
        SophonError::Device(d) => CliError::new(Exit::Unavailable, format!("{name}: {d}")),
    })
}

/// A bmodel on the TPU: the tokenizer comes from `--tokenizer` (a bmodel holds no
/// vocabulary), the chat template from `--chat-template`, the `tokenizer_config.json` beside
/// the tokenizer (as Hugging Face ships them), or Llama-2's for a bare `tokenizer.model`.
fn load_sophon(args: &ModelArgs) -> Result<Engine, CliError> {
    let Some(tokenizer_path) = &args.tokenizer else {
        return Err(CliError::new(
            Exit::Usage,
            "the sophon backend needs --tokenizer tokenizer.json or tokenizer.model (a bmodel holds no vocabulary)",
        ));
    };
    let tokenizer = open_tokenizer(tokenizer_path)?;
    let template = match &args.chat_template {
        Some(_) => choose_template(args.chat_template.as_deref(), None)?,
        None => tokenizer_path
            .parent()
            .and_then(|dir| std::fs::read_to_string(dir.join("tokenizer_config.json")).ok())
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .and_then(|v| {
                v.get("chat_template")
                    .and_then(|t| t.as_str())
                    .and_then(ChatTemplate::detect)
            })
            // A bare SentencePiece tokenizer.model is what the Llama-2 demos ship: its chat
            // format is Llama-2's.
            .or_else(|| {
                (tokenizer.kind() == crate::tokenizer::VocabKind::SentencePiece
                    && tokenizer_path.extension().is_some_and(|e| e == "model"))
                .then_some(ChatTemplate::Llama2)
            }),
    };
    let backend = open_sophon(args, Some(tokenizer.vocab_size()))?;
    let name = args.model.display();
    let vocab = backend.info().vocab_size;
    if tokenizer.vocab_size() > vocab {
        return Err(CliError::new(
            Exit::BadModel,
            format!(
                "{}: {} tokens, but {name} has logits for {vocab}: not this model's tokenizer",
                tokenizer_path.display(),
                tokenizer.vocab_size()
            ),
        ));
    }
    Ok(Engine::new(Box::new(backend), tokenizer, template))
}

fn load_cpu(args: &ModelArgs, opened: &OpenedModel) -> Result<CpuBackend, CliError> {
    let mut opts = CpuOptions {
        threads: args.threads,
        context: args.ctx_size,
        slots: 1,
        ..CpuOptions::default()
    };
    let per_slot = CpuBackend::kv_bytes_per_slot(&opened.gguf, &opts)
        .map_err(|e| CliError::new(Exit::BadModel, format!("{}: {e}", args.model.display())))?;
    let available = crate::sys::memory::available_bytes();
    opts.slots = match args.slots {
        Some(n) => {
            let need = per_slot.saturating_mul(n as u64);
            if let Some(free) = available.filter(|&free| need > free) {
                return Err(CliError::new(
                    Exit::Config,
                    format!(
                        "{n} slots need {} MiB of KV cache ({} MiB each), but {} MiB of memory is available: choose fewer slots or a shorter ctx_size",
                        need >> 20,
                        per_slot >> 20,
                        free >> 20
                    ),
                ));
            }
            n
        }
        // As many as half the available memory holds, up to the default; at least one.
        None => available.map_or(DEFAULT_SLOTS, |free| {
            ((free / 2) / per_slot.max(1)).clamp(1, DEFAULT_SLOTS as u64) as usize
        }),
    };
    log::info!(
        "{} slots of {} MiB KV cache each ({} MiB of memory available)",
        opts.slots,
        per_slot >> 20,
        available.map_or_else(|| "unknown".to_string(), |a| (a >> 20).to_string())
    );
    CpuBackend::from_parts(Arc::clone(&opened.file), &opened.gguf, &opts)
        .map_err(|e| CliError::new(Exit::BadModel, format!("{}: {e}", args.model.display())))
}

/// Slots `serve` holds when not told: four conversations at once (llama-server's `-np 4`).
pub const DEFAULT_SLOTS: usize = 4;

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
