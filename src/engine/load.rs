//! An engine assembled from its settings: the model file (a GGUF for the CPU backend, a bmodel
//! for the TPU), its tokenizer and chat template, and the backend. `serve`, `run`, `bench` and
//! `doctor` all build engines through here; the command line only parses. Every failure says
//! its cause ([`LoadFailure`]), which the command line turns into its exit code.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backend::cpu::{CpuBackend, CpuOptions};
use crate::backend::sophon::SophonBackend;
use crate::backend::{Backend, BackendError};
use crate::chat::{ChatTemplate, ToolSyntax};
use crate::engine::Engine;
use crate::model::{Gguf, MappedFile};
use crate::tokenizer::Tokenizer;

/// The embedded default model, fetched by `make model`.
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Slots `serve` holds when not told: four conversations at once (llama-server's `-np 4`).
pub const DEFAULT_SLOTS: usize = 4;

/// The process exit status when the vendor runtime aborts during a call: the "device
/// unavailable" exit code (69, EX_UNAVAILABLE; the command line's `Exit::Unavailable`).
const DEVICE_UNAVAILABLE_EXIT: i32 = 69;

/// What chooses and loads a model (the command line's model options, or the daemon's
/// configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSettings {
    /// Model file (GGUF for the cpu backend, .bmodel for sophon).
    pub model: PathBuf,
    /// Compute backend: "cpu" or "sophon".
    pub backend: String,
    /// sophon: the folder of libbmrt.so and libbmlib.so (`None`: the backend's default).
    pub sophon_lib: Option<PathBuf>,
    /// sophon: TPU device indices.
    pub devices: Vec<usize>,
    /// sophon: the embedding table of a bmodel without embedding nets (`None`: looked for
    /// beside the bmodel).
    pub embedding_table: Option<PathBuf>,
    /// Threads for matrix work (0 = all cores).
    pub threads: usize,
    /// KV cache length in tokens (`None`: the model's trained context, at most 4096).
    pub ctx_size: Option<usize>,
    /// Tokenizer file instead of the model's own vocabulary.
    pub tokenizer: Option<PathBuf>,
    /// Chat template by name (`None`: recognized from the model).
    pub chat_template: Option<String>,
    /// KV caches (`None`: as many as half the available memory holds, up to
    /// [`DEFAULT_SLOTS`]).
    pub slots: Option<usize>,
}

/// Why a model did not load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadFailure {
    /// A model or tokenizer file cannot be opened.
    NoInput,
    /// A model or tokenizer file is malformed, unsupported or does not fit its device.
    BadModel,
    /// A device or runtime library is unavailable.
    Unavailable,
    /// The settings contradict each other or name something unknown.
    Usage,
    /// The settings ask for more than the machine has.
    Config,
    /// A setting is outside what this model takes (a context longer than it was trained
    /// for).
    Range,
}

/// A model that did not load: its cause and the message for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    /// The cause.
    pub failure: LoadFailure,
    /// What went wrong, naming the file.
    pub message: String,
}

impl LoadError {
    /// An error with its cause.
    pub fn new(failure: LoadFailure, message: impl Into<String>) -> LoadError {
        LoadError {
            failure,
            message: message.into(),
        }
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for LoadError {}

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
/// Missing file ([`LoadFailure::NoInput`]) or malformed content ([`LoadFailure::BadModel`]).
pub fn open_gguf(path: &Path) -> Result<OpenedModel, LoadError> {
    let file = MappedFile::open(path).map_err(|e| {
        let hint = if path == Path::new(DEFAULT_MODEL) {
            " (run `make model` to fetch the default model)"
        } else {
            ""
        };
        LoadError::new(
            LoadFailure::NoInput,
            format!("{}: cannot open: {e}{hint}", path.display()),
        )
    })?;
    let gguf =
        Gguf::parse(&file).map_err(|e| LoadError::new(LoadFailure::BadModel, format!("{}: {e}", path.display())))?;
    Ok(OpenedModel {
        file: Arc::new(file),
        gguf,
    })
}

/// The chat template: the one named, else recognized from the GGUF.
///
/// # Errors
/// An unknown template name ([`LoadFailure::Usage`]; the message lists the known ones).
pub fn choose_template(name: Option<&str>, gguf: Option<&Gguf>) -> Result<Option<ChatTemplate>, LoadError> {
    if let Some(n) = name {
        return n
            .parse::<ChatTemplate>()
            .map(Some)
            .map_err(|e| LoadError::new(LoadFailure::Usage, e.to_string()));
    }
    let jinja = gguf.and_then(|g| g.str_opt("tokenizer.chat_template").ok().flatten());
    Ok(jinja.and_then(ChatTemplate::detect))
}

/// A tokenizer file (`tokenizer.json` or a SentencePiece `tokenizer.model`).
///
/// # Errors
/// One that cannot be opened ([`LoadFailure::NoInput`]), one that does not parse
/// ([`LoadFailure::BadModel`]).
pub fn open_tokenizer(path: &Path) -> Result<Tokenizer, LoadError> {
    if let Err(e) = std::fs::File::open(path) {
        return Err(LoadError::new(
            LoadFailure::NoInput,
            format!("{}: cannot open the tokenizer: {e}", path.display()),
        ));
    }
    Tokenizer::from_file(path).map_err(|e| LoadError::new(LoadFailure::BadModel, e.to_string()))
}

/// Loads the tokenizer for a model: the settings' tokenizer file, else the GGUF's vocabulary.
///
/// # Errors
/// Unreadable or inconsistent tokenizer data ([`LoadFailure::BadModel`] or
/// [`LoadFailure::NoInput`]).
pub fn load_tokenizer(settings: &ModelSettings, gguf: &Gguf) -> Result<Tokenizer, LoadError> {
    match &settings.tokenizer {
        Some(p) => open_tokenizer(p),
        None => Tokenizer::from_gguf(gguf)
            .map_err(|e| LoadError::new(LoadFailure::BadModel, format!("{}: {e}", settings.model.display()))),
    }
}

/// The tokenizer of a model alone: the settings' tokenizer file, else the GGUF's vocabulary (a
/// bmodel holds none).
///
/// # Errors
/// As for [`load_tokenizer`]; a bmodel without a tokenizer file ([`LoadFailure::Usage`]).
pub fn model_tokenizer(settings: &ModelSettings) -> Result<Tokenizer, LoadError> {
    match &settings.tokenizer {
        Some(p) => open_tokenizer(p),
        None if settings.backend == "sophon" => Err(LoadError::new(
            LoadFailure::Usage,
            "the sophon backend needs --tokenizer (a bmodel holds no vocabulary)",
        )),
        None => load_tokenizer(settings, &open_gguf(&settings.model)?.gguf),
    }
}

/// Loads model, tokenizer, template and backend into an engine.
///
/// # Errors
/// As for the pieces.
pub fn load_engine(settings: &ModelSettings) -> Result<Engine, LoadError> {
    if settings.backend == "sophon" {
        return load_sophon(settings);
    }
    let opened = open_gguf(&settings.model)?;
    let template = choose_template(settings.chat_template.as_deref(), Some(&opened.gguf))?;
    let jinja = opened.gguf.str_opt("tokenizer.chat_template").ok().flatten();
    let tool_syntax = template.map_or(ToolSyntax::Generic, |t| ToolSyntax::detect(t, jinja));
    // The model first: "unsupported architecture" says more than a missing tokenizer key.
    let backend = load_cpu(settings, &opened)?;
    let tokenizer = load_tokenizer(settings, &opened.gguf)?;
    Ok(Engine::new(Box::new(backend), tokenizer, template).with_tool_syntax(tool_syntax))
}

/// Opens the settings' bmodel on the TPU, failures classed by cause: no runtime or device
/// [`LoadFailure::Unavailable`], a bmodel that does not load or fit [`LoadFailure::BadModel`],
/// no file [`LoadFailure::NoInput`]. From here on an abort inside the vendor runtime ends the
/// process with the "device unavailable" exit code.
///
/// # Errors
/// As said.
pub fn open_sophon(settings: &ModelSettings, vocab_hint: Option<usize>) -> Result<SophonBackend, LoadError> {
    use crate::backend::sophon::{SophonError, SophonOptions};
    let unfinished = Arc::clone(crate::backend::sophon::device::unfinished_call());
    if let Err(e) = crate::sys::signals::exit_on_abort_while(unfinished, DEVICE_UNAVAILABLE_EXIT) {
        log::warn!("cannot watch for the vendor runtime's aborts: {e}");
    }
    if let Err(e) = std::fs::metadata(&settings.model) {
        return Err(LoadError::new(
            LoadFailure::NoInput,
            format!("{}: cannot open: {e}", settings.model.display()),
        ));
    }
    let opts = SophonOptions {
        lib_dir: settings.sophon_lib.clone(),
        devices: settings.devices.clone(),
        vocab_hint,
        embedding_table: settings.embedding_table.clone(),
        slots: settings.slots,
    };
    let name = settings.model.display();
    SophonBackend::open(&settings.model, &opts).map_err(|e| match e {
        SophonError::Runtime(m) => LoadError::new(LoadFailure::Unavailable, m),
        SophonError::Slots(m) => LoadError::new(LoadFailure::Config, format!("{name}: {m}")),
        SophonError::Contract(c) => LoadError::new(LoadFailure::BadModel, format!("{name}: {c}")),
        SophonError::Device(
            d @ BackendError::Device {
                call: "bmrt_load_bmodel",
                ..
            },
        ) => LoadError::new(LoadFailure::BadModel, format!("{name}: {d}")),
        SophonError::Device(d) => LoadError::new(LoadFailure::Unavailable, format!("{name}: {d}")),
    })
}

/// A bmodel on the TPU: the tokenizer comes from the settings' tokenizer file (a bmodel holds
/// no vocabulary), the chat template from the settings, the `tokenizer_config.json` beside
/// the tokenizer (as Hugging Face ships them), or Llama-2's for a bare `tokenizer.model`.
fn load_sophon(settings: &ModelSettings) -> Result<Engine, LoadError> {
    let Some(tokenizer_path) = &settings.tokenizer else {
        return Err(LoadError::new(
            LoadFailure::Usage,
            "the sophon backend needs --tokenizer tokenizer.json or tokenizer.model (a bmodel holds no vocabulary)",
        ));
    };
    let tokenizer = open_tokenizer(tokenizer_path)?;
    let jinja = tokenizer_path
        .parent()
        .and_then(|dir| std::fs::read_to_string(dir.join("tokenizer_config.json")).ok())
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|v| v.get("chat_template").and_then(|t| t.as_str()).map(str::to_string));
    let template = match &settings.chat_template {
        Some(_) => choose_template(settings.chat_template.as_deref(), None)?,
        None => jinja
            .as_deref()
            .and_then(ChatTemplate::detect)
            // A bare SentencePiece tokenizer.model is what the Llama-2 demos ship: its chat
            // format is Llama-2's.
            .or_else(|| {
                (tokenizer.kind() == crate::tokenizer::VocabKind::SentencePiece
                    && tokenizer_path.extension().is_some_and(|e| e == "model"))
                .then_some(ChatTemplate::Llama2)
            }),
    };
    let backend = open_sophon(settings, Some(tokenizer.vocab_size()))?;
    let name = settings.model.display();
    let vocab = backend.info().vocab_size;
    if tokenizer.vocab_size() > vocab {
        return Err(LoadError::new(
            LoadFailure::BadModel,
            format!(
                "{}: {} tokens, but {name} has logits for {vocab}: not this model's tokenizer",
                tokenizer_path.display(),
                tokenizer.vocab_size()
            ),
        ));
    }
    let tool_syntax = template.map_or(ToolSyntax::Generic, |t| ToolSyntax::detect(t, jinja.as_deref()));
    Ok(Engine::new(Box::new(backend), tokenizer, template).with_tool_syntax(tool_syntax))
}

/// A GGUF on the CPU, with as many slots as asked (refused when their KV caches do not fit
/// the available memory) or as half the available memory holds, up to [`DEFAULT_SLOTS`].
fn load_cpu(settings: &ModelSettings, opened: &OpenedModel) -> Result<CpuBackend, LoadError> {
    let mut opts = CpuOptions {
        threads: settings.threads,
        context: settings.ctx_size,
        slots: 1,
        ..CpuOptions::default()
    };
    let per_slot = CpuBackend::kv_bytes_per_slot(&opened.gguf, &opts).map_err(|e| {
        let failure = match e {
            crate::backend::cpu::CpuError::Context(_) => LoadFailure::Range,
            _ => LoadFailure::BadModel,
        };
        LoadError::new(failure, format!("{}: {e}", settings.model.display()))
    })?;
    let available = crate::faults::available_memory(crate::sys::memory::available_bytes());
    opts.slots = match settings.slots {
        Some(n) => {
            let need = per_slot.saturating_mul(n as u64);
            if let Some(free) = available.filter(|&free| need > free) {
                return Err(LoadError::new(
                    LoadFailure::Config,
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
        .map_err(|e| LoadError::new(LoadFailure::BadModel, format!("{}: {e}", settings.model.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(model: &str, backend: &str) -> ModelSettings {
        ModelSettings {
            model: model.into(),
            backend: backend.into(),
            sophon_lib: None,
            devices: vec![0],
            embedding_table: None,
            threads: 0,
            ctx_size: None,
            tokenizer: None,
            chat_template: None,
            slots: None,
        }
    }

    #[test]
    fn a_missing_model_is_no_input_and_the_default_one_says_how_to_fetch_it() {
        let e = open_gguf(Path::new("/nonexistent/model.gguf")).err().unwrap();
        assert_eq!(e.failure, LoadFailure::NoInput);
        assert!(e.message.starts_with("/nonexistent/model.gguf: cannot open: "), "{e}");
        assert!(!e.message.contains("make model"), "{e}");
        if !Path::new(DEFAULT_MODEL).exists() {
            let e = open_gguf(Path::new(DEFAULT_MODEL)).err().unwrap();
            assert!(
                e.to_string()
                    .ends_with(" (run `make model` to fetch the default model)"),
                "{e}"
            );
        }
    }

    #[test]
    fn failures_keep_their_cause() {
        let e = choose_template(Some("no-such-template"), None).unwrap_err();
        assert_eq!(e.failure, LoadFailure::Usage);
        let e = model_tokenizer(&settings("x.bmodel", "sophon")).err().unwrap();
        assert_eq!(e.failure, LoadFailure::Usage);
        let e = load_engine(&settings("x.bmodel", "sophon")).err().unwrap();
        assert_eq!(e.failure, LoadFailure::Usage);
        assert!(e.message.starts_with("the sophon backend needs --tokenizer"), "{e}");
        let e = open_tokenizer(Path::new("/nonexistent/tokenizer.json")).err().unwrap();
        assert_eq!(e.failure, LoadFailure::NoInput);
    }
}
