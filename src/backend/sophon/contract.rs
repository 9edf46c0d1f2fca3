//! The Llama bmodel contract (docs/tpu.md: "The bmodel contract", "Which bmodels run"), checked
//! against what the runtime says about the nets: everything the backend needs is read from the bmodel, and a
//! bmodel that does not fit is refused with a message naming the mismatch. Pure: nets in,
//! layout or error out.
//!
//! The producers users have differ, and this reads them all from the nets themselves:
//! - tpu-mlir's `llm_convert.py` (1.30.2): half activations, ids `[1, L]`, the last block
//!   applies the final norm, `lm_head` returns the token (or logits with `--do_sample`, plus
//!   `greedy_head` and a `sample_head` compiled `--dynamic`), `block_cache_N` io_alone,
//!   optionally `--dynamic` prefill blocks (no mask) and, with `--use_block_with_kv`,
//!   `block_kv_N` nets and several decode stages per `block_cache_N`;
//! - LLM-TPU's Llama2 `export_onnx.py` + `compile.sh`: half activations, `lm_head` with the
//!   final norm returning logits, `greedy_head` and a 5-input `penalty_sample_head` in the
//!   default address mode, `block_cache_N` io_alone only on request;
//! - the original Llama2-TPU export (and sophon-demo's copies of its bmodels): f32 hidden
//!   states and masks, 1-D ids, half K/V only, a token-returning `lm_head`, nothing io_alone;
//!   sophon-demo's build names both embeddings `embedding` (one net, two stages).

use super::ffi::DataType;
use super::runtime::{Net, Port};

/// What `lm_head` produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LmHeadOutput {
    /// f32 logits over a vocabulary of this size.
    Logits(usize),
    /// A token id chosen on the chip (compiled with a top-1).
    Token,
}

/// How a prompt goes through the prefill blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefill {
    /// Static blocks over `max_input` positions, with an attention mask of this type.
    Static(DataType),
    /// Dynamic blocks without a mask input (causal inside): launched with the real length.
    Dynamic,
    /// Dynamic blocks, plus `block_kv_N` nets that prefill a chunk after history K/V already
    /// in the cache (`--use_history_kv`, alias `--use_block_with_kv`).
    WithHistory,
}

/// Where block 0's input, a token's embedding row, comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Embedding {
    /// Nets on the chip: the prefill stage (`embedding`) and the decode one.
    Nets {
        /// The prefill embedding.
        prefill: NetStage,
        /// The decode embedding (`embedding_cache`, or a one-token stage of `embedding`).
        decode: NetStage,
        /// Devices it was compiled for: all the blocks' or one (sophon-demo compiles the
        /// embedding for one device and the blocks with `--num_device`).
        devices: usize,
    },
    /// No embedding nets (tpu-mlir's `--embedding_disk`): the host gathers the rows from
    /// the table the converter wrote beside the bmodel (`config/embedding.bin`: raw
    /// `[vocabulary, hidden]` rows in the hidden states' type, no header).
    Table,
}

/// Where an embedding is: a net and its stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetStage {
    /// Net name.
    pub net: String,
    /// Stage index.
    pub stage: usize,
}

/// A Llama bmodel's shape, as compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlamaLayout {
    /// Decoder layers (count of `block_N` nets).
    pub layers: usize,
    /// Compiled sequence length S: the KV cache's length (the decode blocks' history).
    pub seq_len: usize,
    /// Tokens one prefill launch takes (the embedding's input length): S, or a chunk.
    pub max_input: usize,
    /// Hidden size H.
    pub hidden: usize,
    /// Key/value heads (per device, for a multi-chip bmodel).
    pub kv_heads: usize,
    /// Devices it was compiled for (multi-chip PCIe bmodels: the nets carry one group of
    /// inputs and outputs per device).
    pub devices: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Hidden states between nets: F16, BF16, or F32 (the original Llama2-TPU export).
    pub hidden_dtype: DataType,
    /// K/V cache elements: F16, BF16 (or F32).
    pub kv_dtype: DataType,
    /// The decode blocks' attention mask elements.
    pub mask_dtype: DataType,
    /// The prefill kind.
    pub prefill: Prefill,
    /// Where the embedding rows come from.
    pub embedding: Embedding,
    /// Token ids are 1-D (`[L]`, `[1]`: the original Llama2-TPU export) rather than `[1, L]`.
    pub flat_ids: bool,
    /// History lengths of the decode blocks' stages, in stage order (stage 0 is S).
    pub decode_stages: Vec<usize>,
    /// Every `block_cache_N` is io_alone and all its stages read history at one address:
    /// its own history inputs can hold the cache (no copy of it per launch).
    pub cache_in_decode_inputs: bool,
    /// What `lm_head` returns.
    pub lm_head: LmHeadOutput,
    /// An on-chip greedy head (`greedy_head`: logits in, one token out).
    pub greedy_head: bool,
    /// An on-chip sampling head.
    pub sample_head: Option<SampleHead>,
}

impl LlamaLayout {
    /// The prefill and decode embedding nets, unless the host gathers the rows.
    pub fn embedding_nets(&self) -> Option<(&NetStage, &NetStage)> {
        match &self.embedding {
            Embedding::Nets { prefill, decode, .. } => Some((prefill, decode)),
            Embedding::Table => None,
        }
    }
}

/// An on-chip sampling head: logits and the ids to penalize in, with its settings; the
/// probabilities of the best candidates and their ids out, from which the host draws one.
/// Its inputs are found by the names the runtime reports: the producers order them
/// differently (LLM-TPU's `penalty_sample_head` takes `m_logits, input_ids, top_p,
/// temperature, penalty`; tpu-mlir's `sample_head` `m_logits, input_ids, penalty,
/// temperature, top_k, top_p`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleHead {
    /// Net name.
    pub net: String,
    /// Input index of the logits.
    pub logits: usize,
    /// Input index of the ids to penalize.
    pub ids: usize,
    /// Length of the ids input.
    pub ids_len: usize,
    /// Input index of the repetition penalty.
    pub penalty: usize,
    /// Input index of the temperature.
    pub temperature: usize,
    /// Input index of top_p.
    pub top_p: usize,
    /// Input index of top_k (tpu-mlir's head; LLM-TPU's keeps all candidates).
    pub top_k: Option<usize>,
    /// Output index of the probabilities (f32).
    pub probs_out: usize,
    /// Output index of the candidates' ids (i32).
    pub ids_out: usize,
    /// Candidates it returns at most.
    pub candidates: usize,
    /// Compiled `--dynamic`: the ids input takes its real length, and only the first top_k
    /// candidates come back valid.
    pub dynamic: bool,
}

/// Why a bmodel does not fit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the bmodel does not fit the Llama contract: {0}")]
pub struct ContractError(pub String);

fn bad(msg: impl Into<String>) -> ContractError {
    ContractError(msg.into())
}

fn net<'a>(nets: &'a [Net], name: &str) -> Result<&'a Net, ContractError> {
    nets.iter()
        .find(|n| n.name == name)
        .ok_or_else(|| bad(format!("no net named {name}")))
}

fn port(net: &Net, input: bool, i: usize) -> Result<&Port, ContractError> {
    let (list, what) = if input {
        (&net.inputs, "input")
    } else {
        (&net.outputs, "output")
    };
    list.get(i)
        .ok_or_else(|| bad(format!("net {} has no {what} {i} ({} {what}s)", net.name, list.len())))
}

/// Checks port `i` of stage `stage` against a dtype and one of the allowed shapes.
fn expect_in(
    net: &Net,
    stage: usize,
    input: bool,
    i: usize,
    dtype: DataType,
    shapes: &[&[usize]],
) -> Result<(), ContractError> {
    let p = port(net, input, i)?;
    let st = net
        .stages
        .get(stage)
        .ok_or_else(|| bad(format!("net {} has no stage {stage}", net.name)))?;
    let shape = if input {
        st.input_shapes.get(i)
    } else {
        st.output_shapes.get(i)
    }
    .unwrap_or(&p.shape);
    let fits = shapes
        .iter()
        .any(|want| want.len() == shape.len() && want.iter().zip(shape).all(|(&w, &s)| w as i64 == s as i64));
    if !fits || p.dtype != Some(dtype) {
        let wanted: Vec<String> = shapes.iter().map(|s| format!("{s:?}")).collect();
        return Err(bad(format!(
            "net {}{} {} {i} ({}) is {:?} {:?}, expected {dtype:?} {}",
            net.name,
            if stage > 0 {
                format!(" stage {stage}")
            } else {
                String::new()
            },
            if input { "input" } else { "output" },
            p.name,
            p.dtype,
            shape,
            wanted.join(" or ")
        )));
    }
    Ok(())
}

fn expect(net: &Net, input: bool, i: usize, dtype: DataType, shape: &[usize]) -> Result<(), ContractError> {
    expect_in(net, 0, input, i, dtype, &[shape])
}

/// Elements of a shape (0 for a negative dimension or one past usize: a corrupt net).
fn elements(shape: &[i32]) -> usize {
    shape
        .iter()
        .try_fold(1usize, |n, &d| usize::try_from(d).ok().and_then(|d| n.checked_mul(d)))
        .unwrap_or(0)
}

fn dim(shape: &[i32], i: usize) -> usize {
    shape.get(i).map_or(0, |&d| d.max(0) as usize)
}

/// A float type the backend can fill (masks) or carry (activations).
fn float(net: &Net, p: &Port, what: &str) -> Result<DataType, ContractError> {
    match p.dtype {
        Some(d @ (DataType::F16 | DataType::Bf16 | DataType::F32)) => Ok(d),
        other => Err(bad(format!(
            "net {} {what} ({}) is {other:?}; expected F16, BF16 or F32",
            net.name, p.name
        ))),
    }
}

/// The embedding nets: `embedding` (longest ids) and `embedding_cache`, or one `embedding`
/// net with a one-token stage (sophon-demo's build); none (an `--embedding_disk` build).
/// Also the prefill's token count and whether ids are 1-D.
fn embeddings(nets: &[Net]) -> Result<Option<(NetStage, NetStage, usize, bool)>, ContractError> {
    let Some(emb) = nets.iter().find(|n| n.name == "embedding") else {
        return match nets.iter().find(|n| n.name == "embedding_cache") {
            Some(_) => Err(bad("an embedding_cache net but no embedding net")),
            None => Ok(None),
        };
    };
    if emb.stages.is_empty() {
        return Err(bad("embedding has no stages"));
    }
    let len = |n: &Net, s: usize| n.stages[s].input_shapes.first().map_or(0, |sh| elements(sh));
    let prefill_stage = (0..emb.stages.len()).max_by_key(|&s| len(emb, s)).unwrap_or(0);
    let max_input = len(emb, prefill_stage);
    let flat_ids = emb.stages[prefill_stage]
        .input_shapes
        .first()
        .is_some_and(|s| s.len() == 1);
    let decode = match nets.iter().find(|n| n.name == "embedding_cache") {
        Some(_) => NetStage {
            net: "embedding_cache".into(),
            stage: 0,
        },
        None => match (0..emb.stages.len()).find(|&s| len(emb, s) == 1 && s != prefill_stage) {
            Some(stage) => NetStage {
                net: "embedding".into(),
                stage,
            },
            None => return Err(bad("no net named embedding_cache (nor a one-token stage of embedding)")),
        },
    };
    Ok(Some((
        NetStage {
            net: "embedding".into(),
            stage: prefill_stage,
        },
        decode,
        max_input,
        flat_ids,
    )))
}

/// Checks that a net has `inputs` inputs and `outputs` outputs per device, on `devices`.
fn counts(net: &Net, devices: usize, inputs: usize, outputs: usize) -> Result<(), ContractError> {
    if net.inputs.len() != devices * inputs || net.outputs.len() != devices * outputs {
        return Err(bad(format!(
            "net {} has {} inputs and {} outputs; expected {inputs} and {outputs}{}",
            net.name,
            net.inputs.len(),
            net.outputs.len(),
            if devices > 1 {
                format!(" per device, on {devices} devices")
            } else {
                String::new()
            }
        )));
    }
    Ok(())
}

/// What a net the contract does not know would have done, where its name says it.
fn unknown_net_meaning(name: &str) -> &'static str {
    if name.contains("lora") {
        "a LoRA adapter (--lora_max_rank): it changes every answer"
    } else if name.starts_with("block_prompt_") {
        "a shared prompt's prefill (--share_prompt): its cache belongs in every answer"
    } else if name.contains("vit") || name.contains("vision") {
        "a vision encoder"
    } else if name.contains("unshare") {
        "an unshared prefill (share_cache builds)"
    } else {
        "unknown to this backend"
    }
}

/// Refuses nets outside the contract, naming them: a net the backend would not launch may
/// carry what the answers depend on (LoRA adapters, a shared prompt), so a bmodel is run
/// whole or not at all.
fn unknown_nets(nets: &[Net], layers: usize) -> Result<(), ContractError> {
    // block_cache_N and block_kv_N past the layers are named by the check of their own.
    let numbered = |name: &str, prefix: &str| {
        name.strip_prefix(prefix)
            .and_then(|i| i.parse::<usize>().ok())
            .is_some_and(|i| i < layers || prefix != "block_")
    };
    let known = |name: &str| {
        matches!(
            name,
            "embedding" | "embedding_cache" | "lm_head" | "greedy_head" | "sample_head" | "penalty_sample_head"
        ) || ["block_", "block_cache_", "block_kv_"]
            .iter()
            .any(|p| numbered(name, p))
    };
    let unknown: Vec<String> = nets
        .iter()
        .filter(|n| !known(&n.name))
        .map(|n| format!("{} ({})", n.name, unknown_net_meaning(&n.name)))
        .collect();
    if unknown.is_empty() {
        return Ok(());
    }
    Err(bad(format!(
        "the bmodel has nets this backend does not run, and answers without them would not be the model's: {}",
        unknown.join(", ")
    )))
}

/// Checks the nets against the contract.
///
/// # Errors
/// The first mismatch, named.
pub fn check(nets: &[Net]) -> Result<LlamaLayout, ContractError> {
    use DataType::I32;
    if let Some(n) = nets.iter().find(|n| n.addr_mode > 1) {
        return Err(bad(format!(
            "net {} has address mode {} (io_tag): only the basic mode and io_alone are supported",
            n.name, n.addr_mode
        )));
    }
    let numbered = |prefix: &str| {
        nets.iter()
            .filter(|n| n.name.strip_prefix(prefix).is_some_and(|i| i.parse::<usize>().is_ok()))
            .count()
    };
    let layers = numbered("block_");
    if layers == 0 {
        return Err(bad("no block_N nets"));
    }
    unknown_nets(nets, layers)?;
    // The devices are the blocks': each decode block takes hidden state, position, mask, K
    // and V per device and gives hidden state, K and V.
    let cache0 = net(nets, "block_cache_0")?;
    let devices = cache0.inputs.len() / 5;
    if devices == 0 || cache0.inputs.len() != devices * 5 || cache0.outputs.len() != devices * 3 {
        return Err(bad(format!(
            "block_cache_0 has {} inputs and {} outputs; expected 5 and 3 per device",
            cache0.inputs.len(),
            cache0.outputs.len()
        )));
    }
    let first = net(nets, "block_0")?;
    let input = port(first, true, 0)?;
    let (max_input, hidden) = (dim(&input.shape, 1), dim(&input.shape, 2));
    if max_input == 0 || hidden == 0 || input.shape.len() != 3 {
        return Err(bad(format!(
            "block_0's input 0 has shape {:?}; expected [1, tokens, hidden]",
            input.shape
        )));
    }
    let hidden_dtype = float(first, input, "input 0")?;
    let (l, h) = (max_input, hidden);
    let (embedding, flat_ids) = match embeddings(nets)? {
        None => {
            if hidden_dtype == DataType::F32 {
                return Err(bad(
                    "no embedding nets, and f32 hidden states: tpu-mlir writes no embedding table for those",
                ));
            }
            (Embedding::Table, false)
        }
        Some((prefill, decode, emb_input, flat_ids)) => {
            let emb = net(nets, &prefill.net)?;
            let emb_devices = emb.inputs.len();
            if emb_devices != 1 && emb_devices != devices {
                return Err(bad(format!(
                    "embedding has {emb_devices} inputs; expected one per device ({devices}) or one"
                )));
            }
            if emb_input != max_input {
                return Err(bad(format!(
                    "the embedding takes {emb_input} tokens, block_0 {max_input}"
                )));
            }
            expect_in(emb, prefill.stage, true, 0, I32, &[&[1, l], &[l]])?;
            expect_in(emb, prefill.stage, false, 0, hidden_dtype, &[&[1, l, h], &[l, h]])?;
            let emb_cache = net(nets, &decode.net)?;
            expect_in(emb_cache, decode.stage, true, 0, I32, &[&[1, 1], &[1]])?;
            expect_in(emb_cache, decode.stage, false, 0, hidden_dtype, &[&[1, 1, h], &[1, h]])?;
            for n in [emb, emb_cache] {
                counts(n, emb_devices, 1, 1)?;
            }
            (
                Embedding::Nets {
                    prefill,
                    decode,
                    devices: emb_devices,
                },
                flat_ids,
            )
        }
    };
    for prefix in ["block_cache_", "block_kv_"] {
        if let Some(extra) = nets.iter().find(|n| {
            n.name
                .strip_prefix(prefix)
                .and_then(|i| i.parse::<usize>().ok())
                .is_some_and(|i| i >= layers)
        }) {
            return Err(bad(format!(
                "{} has no matching prefill block ({layers} block_N nets)",
                extra.name
            )));
        }
    }
    let k = port(first, false, 1)?;
    let (kv_heads, head_dim) = (dim(&k.shape, 2), dim(&k.shape, 3));
    if kv_heads == 0 || head_dim == 0 {
        return Err(bad(format!("block_0's k output has shape {:?}", k.shape)));
    }
    let kv_dtype = float(first, k, "output 1")?;
    let decode_stages: Vec<usize> = cache0
        .stages
        .iter()
        .map(|st| st.input_shapes.get(3).map_or(0, |s| dim(s, 1)))
        .collect();
    let seq_len = decode_stages.first().copied().unwrap_or(0);
    if seq_len == 0 || decode_stages.iter().any(|&s| s == 0 || s > seq_len) {
        return Err(bad(format!(
            "block_cache_0's history lengths are {decode_stages:?}: stage 0 must be the longest"
        )));
    }
    if max_input > seq_len {
        return Err(bad(format!(
            "the prefill takes {max_input} tokens, more than the {seq_len} the KV cache holds"
        )));
    }
    let mask_dtype = float(cache0, port(cache0, true, 2)?, "input 2 (attention_mask)")?;

    let history = numbered("block_kv_");
    if first.inputs.len() % devices != 0 {
        return Err(bad(format!(
            "block_0 has {} inputs, not a multiple of the {devices} devices of the decode blocks",
            first.inputs.len()
        )));
    }
    let per_device_inputs = first.inputs.len() / devices;
    let prefill = match (per_device_inputs, history) {
        (3, 0) => Prefill::Static(float(first, port(first, true, 2)?, "input 2 (attention_mask)")?),
        (2, 0) if first.dynamic => Prefill::Dynamic,
        (2, n) if n == layers && first.dynamic => Prefill::WithHistory,
        (2, 0) => return Err(bad("block_0 takes no attention mask but is not dynamic")),
        (_, n) if n > 0 && n != layers => {
            return Err(bad(format!("{n} block_kv_N nets for {layers} layers")));
        }
        (n, _) => {
            return Err(bad(format!(
                "block_0 has {n} inputs per device; expected 3 (hidden, positions, mask) or 2 (dynamic)"
            )));
        }
    };

    let (kvh, d, s) = (kv_heads, head_dim, seq_len);
    for i in 0..layers {
        let b = net(nets, &format!("block_{i}"))?;
        counts(b, devices, per_device_inputs, 3)?;
        expect(b, true, 0, hidden_dtype, &[1, l, h])?;
        expect(b, true, 1, I32, &[1, l])?;
        if let Prefill::Static(mask) = prefill {
            expect(b, true, 2, mask, &[1, 1, l, l])?;
        }
        expect(b, false, 0, hidden_dtype, &[1, l, h])?;
        expect(b, false, 1, kv_dtype, &[1, l, kvh, d])?;
        expect(b, false, 2, kv_dtype, &[1, l, kvh, d])?;
        if prefill == Prefill::WithHistory {
            let kvn = net(nets, &format!("block_kv_{i}"))?;
            if !kvn.dynamic {
                return Err(bad(format!("{} is not dynamic", kvn.name)));
            }
            counts(kvn, devices, 4, 3)?;
            expect(kvn, true, 0, hidden_dtype, &[1, l, h])?;
            expect(kvn, true, 1, I32, &[1, l])?;
            expect(kvn, true, 2, kv_dtype, &[1, s, kvh, d])?;
            expect(kvn, true, 3, kv_dtype, &[1, s, kvh, d])?;
            expect(kvn, false, 0, hidden_dtype, &[1, l, h])?;
            expect(kvn, false, 1, kv_dtype, &[1, l, kvh, d])?;
            expect(kvn, false, 2, kv_dtype, &[1, l, kvh, d])?;
        }
        let c = net(nets, &format!("block_cache_{i}"))?;
        counts(c, devices, 5, 3)?;
        if c.stages.len() != decode_stages.len() {
            return Err(bad(format!(
                "{} has {} stages, block_cache_0 {}",
                c.name,
                c.stages.len(),
                decode_stages.len()
            )));
        }
        for (stage, &kv) in decode_stages.iter().enumerate() {
            expect_in(c, stage, true, 0, hidden_dtype, &[&[1, 1, h]])?;
            expect_in(c, stage, true, 1, I32, &[&[1, 1]])?;
            expect_in(c, stage, true, 2, mask_dtype, &[&[1, 1, 1, kv + 1]])?;
            expect_in(c, stage, true, 3, kv_dtype, &[&[1, kv, kvh, d]])?;
            expect_in(c, stage, true, 4, kv_dtype, &[&[1, kv, kvh, d]])?;
            expect_in(c, stage, false, 0, hidden_dtype, &[&[1, 1, h]])?;
            expect_in(c, stage, false, 1, kv_dtype, &[&[1, 1, kvh, d]])?;
            expect_in(c, stage, false, 2, kv_dtype, &[&[1, 1, kvh, d]])?;
        }
    }
    let cache_in_decode_inputs = (0..layers).all(|i| {
        nets.iter()
            .find(|n| n.name == format!("block_cache_{i}"))
            .is_some_and(|c| {
                c.io_alone()
                    && c.stages.iter().all(|st| {
                        let per = c.inputs.len() / devices;
                        (0..devices).all(|dev| {
                            [3, 4].iter().all(|&k| {
                                st.input_mems.get(k + dev * per).map(|m| m.addr)
                                    == c.stages[0].input_mems.get(k + dev * per).map(|m| m.addr)
                            })
                        })
                    })
            })
    });

    let head = net(nets, "lm_head")?;
    counts(head, 1, 1, 1)?;
    expect_in(head, 0, true, 0, hidden_dtype, &[&[1, h], &[1, 1, h]])?;
    let h_out = port(head, false, 0)?;
    let lm_head = match (h_out.dtype, elements(&h_out.shape)) {
        (Some(DataType::I32), 1) => LmHeadOutput::Token,
        (Some(DataType::F32), v) if v > 1 => LmHeadOutput::Logits(v),
        (d, _) => {
            return Err(bad(format!(
                "lm_head outputs {d:?} {:?}; expected F32 logits or one I32 token",
                h_out.shape
            )))
        }
    };
    let vocab = match lm_head {
        LmHeadOutput::Logits(v) => Some(v),
        LmHeadOutput::Token => None,
    };
    let greedy_head = match nets.iter().find(|n| n.name == "greedy_head") {
        Some(g) => {
            let v = vocab.ok_or_else(|| bad("greedy_head present but lm_head outputs a token, not logits"))?;
            counts(g, 1, 1, 1)?;
            expect(g, true, 0, DataType::F32, &[1, v])?;
            expect(g, false, 0, DataType::I32, &[1, 1])?;
            true
        }
        None => false,
    };
    let sample_head = match ["sample_head", "penalty_sample_head"]
        .iter()
        .find_map(|name| nets.iter().find(|n| n.name == *name))
    {
        Some(h) => Some(sample_head(h, vocab)?),
        None => None,
    };
    Ok(LlamaLayout {
        layers,
        seq_len,
        max_input,
        hidden,
        kv_heads,
        devices,
        head_dim,
        hidden_dtype,
        kv_dtype,
        mask_dtype,
        prefill,
        embedding,
        flat_ids,
        decode_stages,
        cache_in_decode_inputs,
        lm_head,
        greedy_head,
        sample_head,
    })
}

/// The names each sampling-head input is known by.
const HEAD_INPUTS: [(&str, &[&str]); 6] = [
    ("logits", &["m_logits", "logits"]),
    ("ids", &["input_ids", "ids"]),
    ("penalty", &["penalty", "repeat_penalty", "repetition_penalty"]),
    ("temperature", &["temperature"]),
    ("top_p", &["top_p"]),
    ("top_k", &["top_k"]),
];

fn sample_head(h: &Net, vocab: Option<usize>) -> Result<SampleHead, ContractError> {
    use DataType::{F32, I32};
    let v = vocab.ok_or_else(|| bad(format!("{} present but lm_head outputs a token, not logits", h.name)))?;
    let names: Vec<&str> = h.inputs.iter().map(|p| p.name.as_str()).collect();
    let find = |role: usize| HEAD_INPUTS[role].1.iter().find_map(|n| h.input_named(n));
    let required = |role: usize| {
        find(role).ok_or_else(|| {
            bad(format!(
                "{} has no input named {} (its inputs are {names:?}; they are matched by name, never by position)",
                h.name,
                HEAD_INPUTS[role].1.join(" or ")
            ))
        })
    };
    let (logits, ids, penalty, temperature, top_p) =
        (required(0)?, required(1)?, required(2)?, required(3)?, required(4)?);
    let top_k = find(5);
    let known = [
        Some(logits),
        Some(ids),
        Some(penalty),
        Some(temperature),
        Some(top_p),
        top_k,
    ];
    if let Some(other) = (0..h.inputs.len()).find(|i| !known.contains(&Some(*i))) {
        return Err(bad(format!(
            "{} has an input named {}, which this backend does not know how to fill",
            h.name, h.inputs[other].name
        )));
    }
    expect(h, true, logits, F32, &[1, v])?;
    let ids_len = dim(&port(h, true, ids)?.shape, 1);
    expect(h, true, ids, I32, &[1, ids_len.max(1)])?;
    for i in [penalty, temperature, top_p] {
        // The settings are written as f32: a head compiled to read them otherwise is
        // refused, not fed wrong bits.
        expect(h, true, i, F32, &[1])?;
    }
    if let Some(k) = top_k {
        expect(h, true, k, I32, &[1])?;
    }
    // Outputs keep compiler-made names: the probabilities are the f32 one, the ids the i32.
    let by_type = |t| h.outputs.iter().position(|p| p.dtype == Some(t));
    let (Some(probs_out), Some(ids_out), 2) = (by_type(F32), by_type(I32), h.outputs.len()) else {
        return Err(bad(format!(
            "{} should output f32 probabilities and i32 ids; it outputs {:?}",
            h.name,
            h.outputs.iter().map(|p| (p.dtype, p.shape.clone())).collect::<Vec<_>>()
        )));
    };
    let candidates = dim(&port(h, false, probs_out)?.shape, 1);
    if candidates == 0 {
        return Err(bad(format!("{} returns no candidates", h.name)));
    }
    expect(h, false, probs_out, F32, &[1, candidates])?;
    expect(h, false, ids_out, I32, &[1, candidates])?;
    Ok(SampleHead {
        net: h.name.clone(),
        logits,
        ids,
        ids_len,
        penalty,
        temperature,
        top_p,
        top_k,
        probs_out,
        ids_out,
        candidates,
        dynamic: h.dynamic,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::sophon::ffi::DeviceMem;
    use crate::backend::sophon::runtime::Stage;
    use DataType::{Bf16, F16, F32, I32};

    fn p(dtype: DataType, shape: &[i32]) -> Port {
        named("x", dtype, shape)
    }

    fn named(name: &str, dtype: DataType, shape: &[i32]) -> Port {
        Port {
            name: name.into(),
            dtype: Some(dtype),
            shape: shape.to_vec(),
            mem: DeviceMem::default(),
        }
    }

    fn stage_of(inputs: &[Port], outputs: &[Port]) -> Stage {
        Stage {
            input_shapes: inputs.iter().map(|p| p.shape.clone()).collect(),
            output_shapes: outputs.iter().map(|p| p.shape.clone()).collect(),
            input_mems: inputs.iter().map(|p| p.mem).collect(),
            output_mems: outputs.iter().map(|p| p.mem).collect(),
        }
    }

    fn n(name: &str, inputs: Vec<Port>, outputs: Vec<Port>) -> Net {
        Net {
            name: name.into(),
            dynamic: false,
            stages: vec![stage_of(&inputs, &outputs)],
            inputs,
            outputs,
            addr_mode: 0,
        }
    }

    /// A converter-like toy's nets: S 32, H 64, 2 KV heads of 16, `layers` layers.
    fn toy(dt: DataType, layers: usize) -> Vec<Net> {
        let (s, h, kvh, d) = (32, 64, 2, 16);
        let mut nets = vec![
            n("embedding", vec![p(I32, &[1, s])], vec![p(dt, &[1, s, h])]),
            n("embedding_cache", vec![p(I32, &[1, 1])], vec![p(dt, &[1, 1, h])]),
            n("lm_head", vec![p(dt, &[1, h])], vec![p(F32, &[1, 256])]),
        ];
        for i in 0..layers {
            nets.push(n(
                &format!("block_{i}"),
                vec![p(dt, &[1, s, h]), p(I32, &[1, s]), p(dt, &[1, 1, s, s])],
                vec![p(dt, &[1, s, h]), p(dt, &[1, s, kvh, d]), p(dt, &[1, s, kvh, d])],
            ));
            nets.push(n(
                &format!("block_cache_{i}"),
                vec![
                    p(dt, &[1, 1, h]),
                    p(I32, &[1, 1]),
                    p(dt, &[1, 1, 1, s + 1]),
                    p(dt, &[1, s, kvh, d]),
                    p(dt, &[1, s, kvh, d]),
                ],
                vec![p(dt, &[1, 1, h]), p(dt, &[1, 1, kvh, d]), p(dt, &[1, 1, kvh, d])],
            ));
        }
        nets
    }

    #[test]
    fn a_toy_bmodel_is_read_in_both_precisions() {
        for dt in [F16, Bf16] {
            let l = check(&toy(dt, 3)).unwrap();
            assert_eq!(
                (l.layers, l.seq_len, l.max_input, l.hidden, l.kv_heads, l.head_dim),
                (3, 32, 32, 64, 2, 16)
            );
            assert_eq!((l.hidden_dtype, l.kv_dtype, l.mask_dtype), (dt, dt, dt));
            assert_eq!(l.lm_head, LmHeadOutput::Logits(256));
            assert_eq!(l.prefill, Prefill::Static(dt));
            assert_eq!(l.decode_stages, vec![32]);
            assert!(!l.greedy_head && !l.flat_ids && !l.cache_in_decode_inputs);
            assert_eq!(l.devices, 1);
        }
        // A two-chip bmodel: every net of the layout carries one group of inputs and outputs
        // per device, the KV heads split between them.
        let two: Vec<Net> = toy(F16, 2)
            .into_iter()
            .map(|mut net| {
                if net.name != "lm_head" {
                    let (i, o) = (net.inputs.clone(), net.outputs.clone());
                    net.inputs.extend(i);
                    net.outputs.extend(o);
                    net.stages = vec![stage_of(&net.inputs, &net.outputs)];
                }
                net
            })
            .collect();
        let l = check(&two).unwrap();
        assert_eq!((l.devices, l.layers, l.kv_heads), (2, 2, 2));
        assert_eq!(l.prefill, Prefill::Static(F16));
        let mut nets = toy(F16, 1);
        nets[2].outputs[0] = p(I32, &[1, 1]);
        let l = check(&nets).unwrap();
        assert_eq!((l.lm_head, l.greedy_head), (LmHeadOutput::Token, false));
        nets.push(n("greedy_head", vec![], vec![]));
        assert!(check(&nets)
            .unwrap_err()
            .to_string()
            .contains("greedy_head present but lm_head outputs a token"));
    }

    /// tpu-mlir's sample_head and LLM-TPU's penalty_sample_head take the same settings in
    /// different orders: found by name, whatever the order.
    #[test]
    fn sampling_head_inputs_are_found_by_name() {
        let head = |name: &str, order: &[(&str, DataType, &[i32])]| {
            n(
                name,
                order.iter().map(|(nm, t, s)| named(nm, *t, s)).collect(),
                vec![p(F32, &[1, 50]), p(I32, &[1, 50])],
            )
        };
        let (logits, ids) = (("m_logits", F32, &[1, 256][..]), ("input_ids", I32, &[1, 32][..]));
        let (pen, temp, tk, tp) = (
            ("penalty", F32, &[1][..]),
            ("temperature", F32, &[1][..]),
            ("top_k", I32, &[1][..]),
            ("top_p", F32, &[1][..]),
        );
        let mut nets = toy(F16, 1);
        nets.push(head("penalty_sample_head", &[logits, ids, tp, temp, pen]));
        let h = check(&nets).unwrap().sample_head.unwrap();
        assert_eq!(
            (h.logits, h.ids, h.top_p, h.temperature, h.penalty, h.top_k),
            (0, 1, 2, 3, 4, None)
        );
        assert_eq!((h.ids_len, h.candidates, h.probs_out, h.ids_out), (32, 50, 0, 1));
        nets.pop();
        nets.push(head("sample_head", &[logits, ids, pen, temp, tk, tp]));
        let h = check(&nets).unwrap().sample_head.unwrap();
        assert_eq!((h.penalty, h.temperature, h.top_k, h.top_p), (2, 3, Some(4), 5));
        // top_p is read as f32: a head compiled to take it otherwise is refused, not fed
        // wrong bits.
        nets.pop();
        nets.push(head("sample_head", &[logits, ids, pen, temp, tk, ("top_p", F16, &[1])]));
        assert!(check(&nets)
            .unwrap_err()
            .to_string()
            .contains("sample_head input 5 (top_p)"));
        // Unknown names are refused rather than guessed by position.
        nets.pop();
        nets.push(head("sample_head", &[logits, ids, pen, ("temp", F32, &[1]), tk, tp]));
        let e = check(&nets).unwrap_err().to_string();
        assert!(
            e.contains("no input named temperature") && e.contains("never by position"),
            "{e}"
        );
    }

    /// The original Llama2-TPU export: f32 hidden states and masks, 1-D ids, half K/V, a
    /// token-returning lm_head; and sophon-demo's build of it with one two-stage embedding.
    #[test]
    fn the_original_llama2_tpu_layout_is_read() {
        let (s, h, kvh, d) = (32, 64, 4, 16);
        let mut nets = vec![
            n("embedding", vec![p(I32, &[s])], vec![p(F32, &[s, h])]),
            n("embedding_cache", vec![p(I32, &[1])], vec![p(F32, &[1, h])]),
            n("lm_head", vec![p(F32, &[1, h])], vec![p(I32, &[1, 1])]),
        ];
        for i in 0..2 {
            nets.push(n(
                &format!("block_{i}"),
                vec![p(F32, &[1, s, h]), p(I32, &[1, s]), p(F32, &[1, 1, s, s])],
                vec![p(F32, &[1, s, h]), p(Bf16, &[1, s, kvh, d]), p(Bf16, &[1, s, kvh, d])],
            ));
            nets.push(n(
                &format!("block_cache_{i}"),
                vec![
                    p(F32, &[1, 1, h]),
                    p(I32, &[1, 1]),
                    p(F32, &[1, 1, 1, s + 1]),
                    p(Bf16, &[1, s, kvh, d]),
                    p(Bf16, &[1, s, kvh, d]),
                ],
                vec![p(F32, &[1, 1, h]), p(Bf16, &[1, 1, kvh, d]), p(Bf16, &[1, 1, kvh, d])],
            ));
        }
        let l = check(&nets).unwrap();
        assert_eq!((l.hidden_dtype, l.kv_dtype, l.mask_dtype), (F32, Bf16, F32));
        assert_eq!(
            (l.prefill, l.lm_head, l.flat_ids),
            (Prefill::Static(F32), LmHeadOutput::Token, true)
        );
        assert_eq!(l.embedding_nets().unwrap().1.net, "embedding_cache");
        // sophon-demo: both embeddings are stages of one net named embedding.
        let cache = nets.remove(1);
        nets[0].stages.push(cache.stages[0].clone());
        let l = check(&nets).unwrap();
        let (prefill, decode) = l.embedding_nets().unwrap();
        assert_eq!((prefill.stage, decode.net.as_str(), decode.stage), (0, "embedding", 1));
        // Stages in the other order: the longest is the prefill one.
        nets[0].stages.swap(0, 1);
        let l = check(&nets).unwrap();
        let (prefill, decode) = l.embedding_nets().unwrap();
        assert_eq!((prefill.stage, decode.stage, l.max_input), (1, 0, 32));
    }

    /// tpu-mlir's `--dynamic` and `--use_block_with_kv` builds: no prefill mask, block_kv_N
    /// nets, decode stages of several history lengths.
    #[test]
    fn dynamic_and_history_builds_are_read() {
        let (s, h, kvh, d, l) = (32, 64, 2, 16, 8);
        let mut nets = toy(F16, 2);
        for net in nets.iter_mut() {
            if net.name.starts_with("block_") && !net.name.starts_with("block_cache") {
                net.inputs.truncate(2);
                net.dynamic = true;
                net.stages = vec![stage_of(&net.inputs, &net.outputs)];
            }
        }
        assert_eq!(check(&nets).unwrap().prefill, Prefill::Dynamic);
        nets[3].dynamic = false;
        assert!(check(&nets).unwrap_err().to_string().contains("not dynamic"));

        // With history: chunks of l tokens, and decode stages 32, 16, 8.
        let mut nets = vec![
            n("embedding", vec![p(I32, &[1, l])], vec![p(F16, &[1, l, h])]),
            n("embedding_cache", vec![p(I32, &[1, 1])], vec![p(F16, &[1, 1, h])]),
            n("lm_head", vec![p(F16, &[1, h])], vec![p(I32, &[1, 1])]),
        ];
        for i in 0..2 {
            let out = || vec![p(F16, &[1, l, h]), p(F16, &[1, l, kvh, d]), p(F16, &[1, l, kvh, d])];
            let mut b = n(&format!("block_{i}"), vec![p(F16, &[1, l, h]), p(I32, &[1, l])], out());
            b.dynamic = true;
            nets.push(b);
            let mut kv = n(
                &format!("block_kv_{i}"),
                vec![
                    p(F16, &[1, l, h]),
                    p(I32, &[1, l]),
                    p(F16, &[1, s, kvh, d]),
                    p(F16, &[1, s, kvh, d]),
                ],
                out(),
            );
            kv.dynamic = true;
            nets.push(kv);
            let stage = |kvlen: i32, addr: u64| {
                let mem = DeviceMem {
                    addr,
                    ..DeviceMem::default()
                };
                let mut ins = vec![
                    p(F16, &[1, 1, h]),
                    p(I32, &[1, 1]),
                    p(F16, &[1, 1, 1, kvlen + 1]),
                    p(F16, &[1, kvlen, kvh, d]),
                    p(F16, &[1, kvlen, kvh, d]),
                ];
                ins[3].mem = mem;
                ins[4].mem = mem;
                stage_of(
                    &ins,
                    &[p(F16, &[1, 1, h]), p(F16, &[1, 1, kvh, d]), p(F16, &[1, 1, kvh, d])],
                )
            };
            let mut c = n(&format!("block_cache_{i}"), vec![], vec![]);
            c.stages = vec![stage(32, 0x1000), stage(16, 0x1000), stage(8, 0x1000)];
            c.inputs = (0..5)
                .map(|k| p(if k == 1 { I32 } else { F16 }, &c.stages[0].input_shapes[k]))
                .collect();
            c.outputs = (0..3).map(|k| p(F16, &c.stages[0].output_shapes[k])).collect();
            c.addr_mode = 1;
            nets.push(c);
        }
        let lay = check(&nets).unwrap();
        assert_eq!(lay.prefill, Prefill::WithHistory);
        assert_eq!((lay.seq_len, lay.max_input), (32, 8));
        assert_eq!(lay.decode_stages, vec![32, 16, 8]);
        assert!(lay.cache_in_decode_inputs);
        // A stage whose history lies elsewhere: the cache cannot live in the net's inputs.
        let last = nets.len() - 1;
        nets[last].stages[2].input_mems[3].addr = 0x2000;
        assert!(!check(&nets).unwrap().cache_in_decode_inputs);
    }

    /// Whatever a corrupt or foreign bmodel's nets say, the check answers, never panics.
    #[test]
    fn mangled_nets_get_an_answer_not_a_panic() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..3000 {
            let mut nets = toy(if rng.bool() { F16 } else { F32 }, 2);
            nets.push(n(
                "sample_head",
                vec![named("m_logits", F32, &[1, 256]), named("input_ids", I32, &[1, 32])],
                vec![p(F32, &[1, 50])],
            ));
            for _ in 0..rng.usize(1..6) {
                let k = rng.usize(..nets.len());
                let net = &mut nets[k];
                match rng.u8(..7) {
                    0 => net.inputs.truncate(rng.usize(..=net.inputs.len())),
                    1 => net.outputs.truncate(rng.usize(..=net.outputs.len())),
                    2 => net.stages.truncate(rng.usize(..=net.stages.len())),
                    3 => {
                        if let Some(st) = net.stages.first_mut() {
                            let shapes = if rng.bool() {
                                &mut st.input_shapes
                            } else {
                                &mut st.output_shapes
                            };
                            if let Some(sh) = shapes.first_mut() {
                                *sh = (0..rng.usize(..5)).map(|_| rng.i32(-3..40)).collect();
                            }
                        }
                    }
                    4 => {
                        if let Some(p) = net.inputs.first_mut() {
                            p.dtype = None;
                        }
                    }
                    5 => net.addr_mode = rng.i32(-1..4),
                    _ => net.name = ["block_kv_0", "block_cache_9", "embedding_cache", "x"][rng.usize(..4)].into(),
                }
            }
            let _ = check(&nets);
        }
    }

    /// Found by the fuzzer (fuzz/src/bin/contract.rs): a shape whose element count overflows
    /// is a corrupt net, not an arithmetic panic.
    #[test]
    fn shapes_that_overflow_are_refused() {
        let mut nets = toy(F16, 1);
        nets[2].outputs[0] = p(F32, &[i32::MAX, i32::MAX, i32::MAX]);
        assert!(check(&nets).unwrap_err().to_string().contains("lm_head outputs"));
        assert_eq!(elements(&[-1, 4]), 0);
        assert_eq!(elements(&[i32::MAX; 8]), 0);
        assert_eq!(elements(&[2, 3]), 6);
    }

    #[test]
    fn mismatches_are_named() {
        let err = |nets: Vec<Net>| check(&nets).unwrap_err().to_string();
        let mut nets = toy(F16, 2);
        nets.retain(|n| n.name != "block_cache_1");
        assert!(err(nets).contains("no net named block_cache_1"));
        let mut nets = toy(F16, 2);
        nets[4].inputs[2] = p(F16, &[1, 1, 1, 32]);
        nets[4].stages = vec![stage_of(&nets[4].inputs, &nets[4].outputs)];
        let e = err(nets);
        assert!(
            e.contains("block_cache_0 input 2") && e.contains("[1, 1, 1, 33]"),
            "{e}"
        );
        let nets = toy(I32, 1);
        assert!(err(nets).contains("expected F16, BF16 or F32"));
        let mut nets = toy(F16, 1);
        nets.push(n("block_cache_1", vec![], vec![]));
        assert!(err(nets).contains("block_cache_1 has no matching prefill block"));
        let mut nets = toy(F16, 1);
        nets[3].addr_mode = 2;
        assert!(err(nets).contains("io_tag"));
    }

    /// sophon-demo's multi-chip build: the blocks compiled with `--num_device 2` (one group of
    /// inputs and outputs per device), the embedding for one device. The devices are the
    /// blocks'.
    #[test]
    fn the_devices_are_the_blocks_and_a_one_device_embedding_fits() {
        let mut nets = toy(F16, 2);
        for net in nets.iter_mut().filter(|n| n.name.starts_with("block_")) {
            net.inputs = [net.inputs.clone(), net.inputs.clone()].concat();
            net.outputs = [net.outputs.clone(), net.outputs.clone()].concat();
            net.stages = vec![stage_of(&net.inputs, &net.outputs)];
        }
        let l = check(&nets).unwrap();
        assert_eq!(l.devices, 2);
        assert!(
            matches!(l.embedding, Embedding::Nets { devices: 1, .. }),
            "{:?}",
            l.embedding
        );
        // An embedding for 3 devices fits neither.
        let emb = &mut nets[0];
        emb.inputs = vec![emb.inputs[0].clone(); 3];
        emb.outputs = vec![emb.outputs[0].clone(); 3];
        emb.stages = vec![stage_of(&emb.inputs, &emb.outputs)];
        let e = check(&nets).unwrap_err().to_string();
        assert!(e.contains("embedding has 3 inputs"), "{e}");
    }

    /// Every net's inputs and outputs are counted, not only the first ones.
    #[test]
    fn an_extra_input_or_output_is_refused() {
        let mut nets = toy(F16, 2);
        let extra = p(F16, &[1, 1]);
        nets[5].inputs.push(extra.clone());
        nets[5].stages = vec![stage_of(&nets[5].inputs, &nets[5].outputs)];
        let e = check(&nets).unwrap_err().to_string();
        assert!(
            e.contains("net block_1 has 4 inputs and 3 outputs; expected 3 and 3"),
            "{e}"
        );
        let mut nets = toy(F16, 1);
        nets[2].outputs.push(extra);
        let e = check(&nets).unwrap_err().to_string();
        assert!(e.contains("net lm_head has 1 inputs and 2 outputs"), "{e}");
    }

    /// Nets whose meaning would change the answer are refused by name: LoRA adapters
    /// (`--lora_max_rank`), a shared prompt (`--share_prompt`), anything unknown.
    #[test]
    fn lora_and_shared_prompt_nets_are_refused_by_name() {
        let mut nets = toy(F16, 2);
        for name in ["embedding_lora", "embedding_cache_lora", "lm_head_lora"] {
            nets.push(n(name, vec![p(F16, &[1, 8])], vec![p(F16, &[1, 8])]));
        }
        let e = check(&nets).unwrap_err().to_string();
        assert!(
            e.contains("embedding_lora (a LoRA adapter")
                && e.contains("embedding_cache_lora (a LoRA adapter")
                && e.contains("lm_head_lora (a LoRA adapter"),
            "{e}"
        );
        let mut nets = toy(F16, 2);
        for i in 0..2 {
            nets.push(n(
                &format!("block_prompt_{i}"),
                vec![p(F16, &[1, 8])],
                vec![p(F16, &[1, 8])],
            ));
        }
        nets.push(n("vit", vec![p(F16, &[1, 8])], vec![p(F16, &[1, 8])]));
        let e = check(&nets).unwrap_err().to_string();
        assert!(
            e.contains("block_prompt_0 (a shared prompt")
                && e.contains("block_prompt_1 (a shared prompt")
                && e.contains("vit (a vision encoder)"),
            "{e}"
        );
    }

    /// An `--embedding_disk` build has no embedding nets: the host gathers rows (the hidden
    /// size and prefill length are block 0's); half an embedding pair is refused.
    #[test]
    fn no_embedding_nets_means_a_table() {
        let mut nets = toy(Bf16, 2);
        nets.retain(|n| !n.name.starts_with("embedding"));
        let l = check(&nets).unwrap();
        assert_eq!(l.embedding, Embedding::Table);
        assert_eq!((l.hidden, l.max_input, l.hidden_dtype), (64, 32, Bf16));
        let mut nets = toy(F16, 2);
        nets.retain(|n| n.name != "embedding");
        let e = check(&nets).unwrap_err().to_string();
        assert!(e.contains("an embedding_cache net but no embedding net"), "{e}");
    }
}
