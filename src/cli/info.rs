//! `llama-tpu info`: what a model file is: a GGUF's metadata, tensors and tokenizer, or a
//! bmodel's nets and its Llama contract, read through the Sophon runtime.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Args;

use super::{CliError, Exit};
use crate::engine::load::{choose_template, open_gguf};
use crate::model::gguf::Value;
use crate::model::LlamaConfig;
use crate::tokenizer::Tokenizer;

/// Arguments of `info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// The model file.
    model: PathBuf,
    /// Also list every metadata key and every tensor.
    #[arg(long)]
    verbose: bool,
    /// For a .bmodel: the folder of libbmrt.so and libbmlib.so (default:
    /// /opt/sophon/libsophon-current/lib, then the loader's path).
    #[arg(long, value_name = "DIR", env = "LLAMA_TPU_SOPHON_LIB")]
    sophon_lib: Option<PathBuf>,
    /// For a .bmodel: the device to load it on.
    #[arg(long, default_value_t = 0)]
    device: usize,
}

pub(super) fn info(a: &InfoArgs) -> Result<(), CliError> {
    if a.model.extension().is_some_and(|e| e == "bmodel") {
        return bmodel_info(a);
    }
    let m = open_gguf(&a.model)?;
    let g = &m.gguf;
    println!(
        "file:          {} ({:.1} MiB)",
        a.model.display(),
        m.file.len() as f64 / (1 << 20) as f64
    );
    println!(
        "format:        GGUF v{}, {} metadata keys, {} tensors",
        g.version,
        g.metadata.len(),
        g.tensors.len()
    );
    if let Ok(Some(name)) = g.str_opt("general.name") {
        println!("name:          {name}");
    }
    match LlamaConfig::from_gguf(g) {
        Ok(c) => {
            println!(
                "architecture:  {} ({} layers, hidden {}, FFN {})",
                c.arch, c.n_layers, c.dim, c.ffn_dim
            );
            println!(
                "attention:     {} heads, {} KV heads, head dim {}, rope theta {}, rms eps {:e}",
                c.n_heads, c.n_kv_heads, c.head_dim, c.rope_theta, c.rms_eps
            );
            println!(
                "context:       {} tokens (trained), vocab {}",
                c.context_length, c.vocab_size
            );
            let params: u64 = g.tensors.iter().map(|t| t.elements()).sum();
            println!("parameters:    {:.1} M", params as f64 / 1e6);
        }
        Err(e) => println!("architecture:  not runnable here: {e}"),
    }
    let mut types: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for t in &g.tensors {
        let e = types.entry(t.ty.to_string()).or_default();
        e.0 += 1;
        e.1 += t.size;
    }
    let list: Vec<String> = types
        .iter()
        .map(|(ty, (n, b))| format!("{ty} x{n} ({:.1} MiB)", *b as f64 / (1 << 20) as f64))
        .collect();
    println!("tensor types:  {}", list.join(", "));
    match Tokenizer::from_gguf(g) {
        Ok(t) => {
            let pre = g.str_opt("tokenizer.ggml.pre").ok().flatten().unwrap_or("-");
            let name = |id: Option<u32>| id.map_or("-".to_string(), |i| format!("{i} {:?}", g_token(g, i)));
            println!("tokenizer:     {}, pre-tokenizer {pre}", t.description);
            println!(
                "special:       bos {}, eos {}, add bos {}",
                name(t.bos),
                name(t.eos),
                t.add_bos
            );
        }
        Err(e) => println!("tokenizer:     unusable: {e}"),
    }
    match choose_template(None, Some(g)) {
        Ok(Some(t)) => println!("chat template: {t} (recognized from the model)"),
        _ if g.get("tokenizer.chat_template").is_some() => {
            println!("chat template: not recognized; pass --chat-template")
        }
        _ => println!("chat template: none in the file"),
    }
    if a.verbose {
        println!("\nmetadata:");
        for (k, v) in &g.metadata {
            println!("  {k} = {v}");
        }
        println!("\ntensors:");
        for t in &g.tensors {
            println!("  {:32} {:6} {:?}", t.name, t.ty.to_string(), t.dims);
        }
    }
    Ok(())
}

fn g_token(g: &crate::model::Gguf, id: u32) -> String {
    match g.array_opt("tokenizer.ggml.tokens") {
        Ok(Some(a)) => match a.get(id as usize) {
            Some(Value::Str(s)) => s.clone(),
            _ => String::new(),
        },
        _ => String::new(),
    }
}

/// A bmodel: its nets as the runtime loads them, and whether they fit the Llama contract.
fn bmodel_info(a: &InfoArgs) -> Result<(), CliError> {
    use std::sync::Arc;

    use crate::backend::sophon::contract;
    use crate::backend::sophon::device::Device;
    use crate::backend::sophon::ffi::Runtime;
    use crate::backend::sophon::runtime::Loaded;

    let size = std::fs::metadata(&a.model)
        .map_err(|e| CliError::new(Exit::NoInput, format!("{}: cannot open: {e}", a.model.display())))?
        .len();
    let unavailable = |e: String| CliError::new(Exit::Unavailable, e);
    let rt = Arc::new(Runtime::load(a.sophon_lib.as_deref()).map_err(|e| unavailable(e.to_string()))?);
    let runtime_line = format!(
        "runtime:       {} ({})",
        rt.dir
            .as_ref()
            .map_or_else(|| "the loader's path".to_string(), |d| d.display().to_string()),
        rt.version.as_deref().unwrap_or("no version string")
    );
    let dev = Arc::new(Device::open(rt, a.device).map_err(|e| unavailable(e.to_string()))?);
    let loaded = Loaded::load(dev, &a.model)
        .map_err(|e| CliError::new(Exit::BadModel, format!("{}: {e}", a.model.display())))?;
    println!(
        "file:          {} ({:.1} MiB)",
        a.model.display(),
        size as f64 / (1 << 20) as f64
    );
    println!("{runtime_line}");
    println!("nets:          {}", loaded.nets().len());
    let ports = |ps: &[crate::backend::sophon::runtime::Port]| {
        ps.iter()
            .map(|p| format!("{}{:?}", p.dtype.map_or("?".to_string(), |d| format!("{d:?}")), p.shape))
            .collect::<Vec<_>>()
            .join(" ")
    };
    for n in loaded.nets() {
        println!(
            "  {:<20} in: {}  out: {}{}",
            n.name,
            ports(&n.inputs),
            ports(&n.outputs),
            if n.addr_mode == 1 { "  (io_alone)" } else { "" }
        );
    }
    let layout = contract::check(loaded.nets())
        .map_err(|e| CliError::new(Exit::BadModel, format!("{}: {e}", a.model.display())))?;
    let row = (layout.kv_heads * layout.head_dim * layout.kv_dtype.size()) as u64;
    let kv = 2 * layout.layers as u64 * layout.seq_len as u64 * row;
    println!(
        "llama:         {} layers, SEQLEN {}, hidden {}, {} KV heads x {}",
        layout.layers, layout.seq_len, layout.hidden, layout.kv_heads, layout.head_dim,
    );
    println!(
        "types:         hidden states {:?}, KV cache {:?}, attention masks {:?}{}",
        layout.hidden_dtype,
        layout.kv_dtype,
        layout.mask_dtype,
        if layout.flat_ids { ", 1-D token ids" } else { "" }
    );
    println!(
        "prefill:       {}, {} tokens per launch{}",
        match layout.prefill {
            contract::Prefill::Static(_) => "static (padded to its length, with a mask)",
            contract::Prefill::Dynamic => "dynamic (the prompt's real length)",
            contract::Prefill::WithHistory => "dynamic, in chunks after history K/V (block_kv_N)",
        },
        layout.max_input,
        match &layout.embedding {
            contract::Embedding::Nets { decode, .. } if decode.net == "embedding" => {
                "; the decode embedding is a stage of net embedding"
            }
            contract::Embedding::Nets { devices: 1, .. } if layout.devices > 1 => {
                "; the embedding runs on the first device, its rows carried to the others"
            }
            contract::Embedding::Table => "; embedding rows gathered on the host from the table beside the bmodel",
            _ => "",
        }
    );
    println!(
        "decode:        history lengths {:?}; the KV cache {}",
        layout.decode_stages,
        if layout.cache_in_decode_inputs {
            "stays in the decode blocks' own inputs (io_alone)"
        } else {
            "is memory the backend allocates (the decode blocks are not io_alone)"
        }
    );
    println!(
        "lm_head:       {}{}{}",
        match layout.lm_head {
            contract::LmHeadOutput::Logits(v) => format!("logits over {v} tokens"),
            contract::LmHeadOutput::Token => "a token id (on-chip top-1)".to_string(),
        },
        if layout.greedy_head { ", greedy_head" } else { "" },
        layout
            .sample_head
            .as_ref()
            .map(|h| format!(", {} ({} candidates)", h.net, h.candidates))
            .unwrap_or_default()
    );
    println!(
        "device memory: about {:.1} MiB: the bmodel ({:.1} MiB) plus the KV cache ({:.1} MiB)",
        (size + kv) as f64 / (1 << 20) as f64,
        size as f64 / (1 << 20) as f64,
        kv as f64 / (1 << 20) as f64
    );
    Ok(())
}
