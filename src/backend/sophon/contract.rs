//! The Llama bmodel contract (../shared/design/bmodel-contract.md), checked against what the
//! runtime says about the nets: everything the backend needs is read from the bmodel, and a
//! bmodel that does not fit is refused with a message naming the mismatch. Pure: nets in,
//! layout or error out.

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

/// A Llama bmodel's shape, as compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlamaLayout {
    /// Decoder layers (count of `block_N` nets).
    pub layers: usize,
    /// Compiled sequence length S.
    pub seq_len: usize,
    /// Hidden size H.
    pub hidden: usize,
    /// Key/value heads (per device, for a multi-chip bmodel).
    pub kv_heads: usize,
    /// Devices it was compiled for (multi-chip PCIe bmodels: the nets carry one group of
    /// inputs and outputs per device).
    pub devices: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Activation type: F16 or BF16.
    pub dtype: DataType,
    /// Prefill blocks take no attention mask (`--dynamic` compiles).
    pub dynamic_prefill: bool,
    /// What `lm_head` returns.
    pub lm_head: LmHeadOutput,
    /// An on-chip greedy head (`greedy_head`: logits in, one token out).
    pub greedy_head: bool,
    /// An on-chip sampling head (`sample_head`, or the older `penalty_sample_head`).
    pub sample_head: Option<SampleHead>,
}

/// An on-chip sampling head: logits, the ids so far (for the repetition penalty), penalty,
/// temperature, top_k (newer compiles only) and top_p in; the probabilities of the best
/// candidates and their ids out. The host draws one of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleHead {
    /// Net name.
    pub net: String,
    /// It has a top_k input (input 4; top_p is then input 5, else 4).
    pub top_k_input: bool,
    /// Candidates it returns.
    pub candidates: usize,
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

fn expect(net: &Net, input: bool, i: usize, dtype: DataType, shape: &[usize]) -> Result<(), ContractError> {
    let p = port(net, input, i)?;
    let want: Vec<i32> = shape.iter().map(|&d| d as i32).collect();
    if p.shape != want || p.dtype != Some(dtype) {
        return Err(bad(format!(
            "net {} {} {i} ({}) is {:?} {:?}, expected {dtype:?} {want:?}",
            net.name,
            if input { "input" } else { "output" },
            p.name,
            p.dtype,
            p.shape
        )));
    }
    Ok(())
}

fn dim(p: &Port, i: usize) -> usize {
    p.shape.get(i).map_or(0, |&d| d.max(0) as usize)
}

/// Checks the nets against the contract.
///
/// # Errors
/// The first mismatch, named.
pub fn check(nets: &[Net]) -> Result<LlamaLayout, ContractError> {
    if let Some(n) = nets.iter().find(|n| n.name.starts_with("block_kv_")) {
        return Err(bad(format!(
            "{} found: bmodels compiled with --use_history_kv are not supported",
            n.name
        )));
    }
    let emb = net(nets, "embedding")?;
    let ids = port(emb, true, 0)?;
    let out = port(emb, false, 0)?;
    let (seq_len, hidden) = (dim(ids, 1), dim(out, 2));
    let dtype = match out.dtype {
        Some(d @ (DataType::F16 | DataType::Bf16)) => d,
        other => return Err(bad(format!("embedding outputs {other:?}; expected F16 or BF16"))),
    };
    if seq_len == 0 || hidden == 0 {
        return Err(bad(format!("embedding has shapes {:?} -> {:?}", ids.shape, out.shape)));
    }
    expect(emb, true, 0, DataType::I32, &[1, seq_len])?;
    expect(emb, false, 0, dtype, &[1, seq_len, hidden])?;
    let emb_cache = net(nets, "embedding_cache")?;
    expect(emb_cache, true, 0, DataType::I32, &[1, 1])?;
    expect(emb_cache, false, 0, dtype, &[1, 1, hidden])?;

    let layers = nets
        .iter()
        .filter(|n| {
            n.name
                .strip_prefix("block_")
                .is_some_and(|i| i.parse::<usize>().is_ok())
        })
        .count();
    if layers == 0 {
        return Err(bad("no block_N nets"));
    }
    let first = net(nets, "block_0")?;
    let k = port(first, false, 1)?;
    let (kv_heads, head_dim) = (dim(k, 2), dim(k, 3));
    if kv_heads == 0 || head_dim == 0 {
        return Err(bad(format!("block_0's k output has shape {:?}", k.shape)));
    }
    // The embedding takes one input, the token ids, per device.
    let devices = emb.inputs.len().max(1);
    let dynamic_prefill = first.inputs.len() == 2 * devices;
    for i in 0..layers {
        let b = net(nets, &format!("block_{i}"))?;
        expect(b, true, 0, dtype, &[1, seq_len, hidden])?;
        expect(b, true, 1, DataType::I32, &[1, seq_len])?;
        if !dynamic_prefill {
            expect(b, true, 2, dtype, &[1, 1, seq_len, seq_len])?;
        }
        expect(b, false, 0, dtype, &[1, seq_len, hidden])?;
        expect(b, false, 1, dtype, &[1, seq_len, kv_heads, head_dim])?;
        expect(b, false, 2, dtype, &[1, seq_len, kv_heads, head_dim])?;
        let c = net(nets, &format!("block_cache_{i}"))?;
        expect(c, true, 0, dtype, &[1, 1, hidden])?;
        expect(c, true, 1, DataType::I32, &[1, 1])?;
        expect(c, true, 2, dtype, &[1, 1, 1, seq_len + 1])?;
        expect(c, true, 3, dtype, &[1, seq_len, kv_heads, head_dim])?;
        expect(c, true, 4, dtype, &[1, seq_len, kv_heads, head_dim])?;
        expect(c, false, 0, dtype, &[1, 1, hidden])?;
        expect(c, false, 1, dtype, &[1, 1, kv_heads, head_dim])?;
        expect(c, false, 2, dtype, &[1, 1, kv_heads, head_dim])?;
    }
    if let Some(extra) = nets.iter().find(|n| {
        n.name
            .strip_prefix("block_cache_")
            .and_then(|i| i.parse::<usize>().ok())
            .is_some_and(|i| i >= layers)
    }) {
        return Err(bad(format!(
            "{} has no matching prefill block ({layers} block_N nets)",
            extra.name
        )));
    }

    let head = net(nets, "lm_head")?;
    let h_in = port(head, true, 0)?;
    if h_in.shape.last().copied() != Some(hidden as i32) || h_in.dtype != Some(dtype) {
        return Err(bad(format!(
            "lm_head input is {:?} {:?}, expected {dtype:?} [.., {hidden}]",
            h_in.dtype, h_in.shape
        )));
    }
    let h_out = port(head, false, 0)?;
    let lm_head = match (h_out.dtype, h_out.shape.iter().product::<i32>()) {
        (Some(DataType::I32), 1) => LmHeadOutput::Token,
        (Some(DataType::F32), v) if v > 1 => LmHeadOutput::Logits(v as usize),
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
        Some(h) => Some(sample_head(h, vocab, seq_len)?),
        None => None,
    };
    Ok(LlamaLayout {
        layers,
        seq_len,
        hidden,
        kv_heads,
        devices,
        head_dim,
        dtype,
        dynamic_prefill,
        lm_head,
        greedy_head,
        sample_head,
    })
}

fn sample_head(h: &Net, vocab: Option<usize>, seq_len: usize) -> Result<SampleHead, ContractError> {
    use DataType::{F32, I32};
    let v = vocab.ok_or_else(|| bad(format!("{} present but lm_head outputs a token, not logits", h.name)))?;
    let top_k_input = match h.inputs.len() {
        6 => true,
        5 => false,
        n => return Err(bad(format!("{} has {n} inputs, expected 5 or 6", h.name))),
    };
    expect(h, true, 0, F32, &[1, v])?;
    expect(h, true, 1, I32, &[1, seq_len])?;
    expect(h, true, 2, F32, &[1])?;
    expect(h, true, 3, F32, &[1])?;
    if top_k_input {
        expect(h, true, 4, I32, &[1])?;
    }
    expect(h, true, h.inputs.len() - 1, F32, &[1])?;
    let candidates = dim(port(h, false, 0)?, 1);
    if candidates == 0 {
        return Err(bad(format!("{} returns no candidates", h.name)));
    }
    expect(h, false, 0, F32, &[1, candidates])?;
    expect(h, false, 1, I32, &[1, candidates])?;
    Ok(SampleHead {
        net: h.name.clone(),
        top_k_input,
        candidates,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::sophon::ffi::DeviceMem;

    fn p(dtype: DataType, shape: &[i32]) -> Port {
        Port {
            name: "x".into(),
            dtype: Some(dtype),
            shape: shape.to_vec(),
            mem: DeviceMem::default(),
        }
    }

    fn n(name: &str, inputs: Vec<Port>, outputs: Vec<Port>) -> Net {
        Net {
            name: name.into(),
            dynamic: false,
            inputs,
            outputs,
            stages: 1,
            addr_mode: 0,
        }
    }

    /// A toy bmodel's nets: S 32, H 64, 2 KV heads of 16, `layers` layers.
    fn toy(dt: DataType, layers: usize) -> Vec<Net> {
        use DataType::{F32, I32};
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
        for dt in [DataType::F16, DataType::Bf16] {
            let l = check(&toy(dt, 3)).unwrap();
            assert_eq!(
                (l.layers, l.seq_len, l.hidden, l.kv_heads, l.head_dim, l.dtype),
                (3, 32, 64, 2, 16, dt)
            );
            assert_eq!(l.lm_head, LmHeadOutput::Logits(256));
            assert!(!l.dynamic_prefill && !l.greedy_head);
            assert_eq!(l.devices, 1);
        }
        // A two-chip bmodel: every net of the layout carries one group of inputs and outputs
        // per device, the KV heads split between them.
        let two: Vec<Net> = toy(DataType::F16, 2)
            .into_iter()
            .map(|mut net| {
                if net.name != "lm_head" {
                    let (i, o) = (net.inputs.clone(), net.outputs.clone());
                    net.inputs.extend(i);
                    net.outputs.extend(o);
                }
                net
            })
            .collect();
        let l = check(&two).unwrap();
        assert_eq!((l.devices, l.layers, l.kv_heads, l.dynamic_prefill), (2, 2, 2, false));
        let mut nets = toy(DataType::F16, 1);
        nets[2].outputs[0] = p(DataType::I32, &[1, 1]);
        let l = check(&nets).unwrap();
        assert_eq!((l.lm_head, l.greedy_head), (LmHeadOutput::Token, false));
        nets.push(n("greedy_head", vec![], vec![]));
        assert!(check(&nets)
            .unwrap_err()
            .to_string()
            .contains("greedy_head present but lm_head outputs a token"));

        use DataType::{F32, I32};
        let mut nets = toy(DataType::F16, 1);
        nets.push(n("greedy_head", vec![p(F32, &[1, 256])], vec![p(I32, &[1, 1])]));
        let sample = |top_p: DataType| {
            n(
                "sample_head",
                vec![
                    p(F32, &[1, 256]),
                    p(I32, &[1, 32]),
                    p(F32, &[1]),
                    p(F32, &[1]),
                    p(I32, &[1]),
                    p(top_p, &[1]),
                ],
                vec![p(F32, &[1, 50]), p(I32, &[1, 50])],
            )
        };
        nets.push(sample(F32));
        let l = check(&nets).unwrap();
        assert!(l.greedy_head);
        assert_eq!(
            l.sample_head,
            Some(SampleHead {
                net: "sample_head".into(),
                top_k_input: true,
                candidates: 50
            })
        );
        // top_p is read as f32: a head compiled to take it otherwise is refused, not fed wrong bits.
        *nets.last_mut().unwrap() = sample(DataType::F16);
        assert!(check(&nets).unwrap_err().to_string().contains("sample_head input 5"));
    }

    #[test]
    fn mismatches_are_named() {
        let err = |nets: Vec<Net>| check(&nets).unwrap_err().to_string();
        let mut nets = toy(DataType::F16, 2);
        nets.retain(|n| n.name != "block_cache_1");
        assert!(err(nets).contains("no net named block_cache_1"));
        let mut nets = toy(DataType::F16, 2);
        nets[4].inputs[2] = p(DataType::F16, &[1, 1, 1, 32]);
        let e = err(nets);
        assert!(
            e.contains("block_cache_0 input 2") && e.contains("[1, 1, 1, 33]"),
            "{e}"
        );
        let mut nets = toy(DataType::F32, 1);
        nets.truncate(3);
        assert!(err(nets).contains("expected F16 or BF16"));
        let mut nets = toy(DataType::Bf16, 1);
        nets.push(n("block_kv_0", vec![], vec![]));
        assert!(err(nets).contains("--use_history_kv"));
        let mut nets = toy(DataType::F16, 1);
        nets.push(n("block_cache_1", vec![], vec![]));
        assert!(err(nets).contains("block_cache_1 has no matching prefill block"));
    }
}
