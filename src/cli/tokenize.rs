//! `llama-tpu tokenize`: token ids of a text, like llama.cpp's llama-tokenize.

use clap::Args;

use super::{text_or_stdin, CliError, Exit, ModelArgs};
use crate::engine::load::{load_tokenizer, open_gguf};

/// Arguments of `tokenize`.
#[derive(Debug, Args)]
pub struct TokenizeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The text; read from stdin when absent or "-".
    text: Option<String>,
    /// Do not add the BOS token even if the model asks for one.
    #[arg(long)]
    no_bos: bool,
    /// Print each id with its text, one per line.
    #[arg(long)]
    pieces: bool,
    /// Write the model's vocabulary as a Hugging Face tokenizer.json to this file (for a
    /// bmodel compiled from the same model: `--tokenizer` on the sophon backend) and exit.
    #[arg(long, value_name = "FILE")]
    write_json: Option<std::path::PathBuf>,
}

pub(super) fn tokenize(a: &TokenizeArgs) -> Result<(), CliError> {
    if let Some(path) = &a.write_json {
        let opened = open_gguf(&a.model.model)?;
        let tok = load_tokenizer(&a.model.settings(), &opened.gguf)?;
        let json = tok.to_json().map_err(|e| CliError::new(Exit::Failure, e.to_string()))?;
        return std::fs::write(path, json).map_err(|e| CliError::new(Exit::Io, format!("{}: {e}", path.display())));
    }
    let text = text_or_stdin(a.text.as_deref())?;
    let opened = open_gguf(&a.model.model)?;
    let tok = load_tokenizer(&a.model.settings(), &opened.gguf)?;
    let ids = tok
        .encode(&text, !a.no_bos)
        .map_err(|e| CliError::new(Exit::Failure, e.to_string()))?;
    if a.pieces {
        for id in ids {
            println!("{id:6} {:?}", String::from_utf8_lossy(tok.token_bytes(id)));
        }
    } else {
        let line: Vec<String> = ids.iter().map(u32::to_string).collect();
        println!("{}", line.join(" "));
    }
    Ok(())
}
