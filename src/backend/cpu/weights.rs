//! The Llama weights of a GGUF file as validated views into the mapping.

use crate::kernels::matmul::Weight;
use crate::kernels::{interleave, quant};
use crate::model::{GgmlType, Gguf, LlamaConfig, MappedFile};

use super::CpuError;

/// Where a matrix lies in the mapped file; `Copy` so that jobs can carry it to worker threads.
#[derive(Debug, Clone, Copy)]
pub struct TensorRef {
    /// Row encoding.
    pub ty: GgmlType,
    /// Byte offset in the file.
    pub offset: usize,
    /// Byte length.
    pub len: usize,
    /// Elements per row (input width).
    pub cols: usize,
    /// Rows (output width).
    pub rows: usize,
    /// Where its interleaved copy starts in [`ModelWeights::interleaved`], if it has one.
    pub interleaved: Option<usize>,
}

impl TensorRef {
    /// The matrix view over the mapped bytes (and its interleaved copy in `interleaved`,
    /// [`ModelWeights::interleaved`], if it has one).
    pub fn view<'a>(&self, file: &'a MappedFile, interleaved: &'a [u8]) -> Weight<'a> {
        Weight {
            ty: self.ty,
            data: &file[self.offset..self.offset + self.len],
            cols: self.cols,
            rows: self.rows,
            interleaved: self
                .interleaved
                .map(|at| &interleaved[at..at + interleave::q4_0_bytes(self.rows, self.cols)]),
        }
    }
}

/// One decoder layer. Field names follow the GGUF tensor names `blk.N.<name>.weight`.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    /// RMSNorm before attention, `[dim]`.
    pub attn_norm: Vec<f32>,
    /// Query projection, `[dim] -> [dim]`.
    pub attn_q: TensorRef,
    /// Key projection, `[dim] -> [kv_dim]`.
    pub attn_k: TensorRef,
    /// Value projection, `[dim] -> [kv_dim]`.
    pub attn_v: TensorRef,
    /// Output projection, `[dim] -> [dim]`.
    pub attn_output: TensorRef,
    /// RMSNorm before the FFN, `[dim]`.
    pub ffn_norm: Vec<f32>,
    /// FFN gate, `[dim] -> [ffn_dim]`.
    pub ffn_gate: TensorRef,
    /// FFN up, `[dim] -> [ffn_dim]`.
    pub ffn_up: TensorRef,
    /// FFN down, `[ffn_dim] -> [dim]`.
    pub ffn_down: TensorRef,
    /// Biases added to the query, key and value projections (Qwen2), `[q_dim]`, `[kv_dim]`.
    pub attn_q_bias: Option<Vec<f32>>,
    /// See `attn_q_bias`.
    pub attn_k_bias: Option<Vec<f32>>,
    /// See `attn_q_bias`.
    pub attn_v_bias: Option<Vec<f32>>,
    /// RMSNorm of each query and key head before RoPE (Qwen3), `[head_dim]`.
    pub attn_q_norm: Option<Vec<f32>>,
    /// See `attn_q_norm`.
    pub attn_k_norm: Option<Vec<f32>>,
}

impl LayerWeights {
    /// The optional vectors a layer may have.
    fn optional_parts(&self) -> [&Option<Vec<f32>>; 5] {
        [
            &self.attn_q_bias,
            &self.attn_k_bias,
            &self.attn_v_bias,
            &self.attn_q_norm,
            &self.attn_k_norm,
        ]
    }
}

/// What may follow `blk.N.` in a tensor's name: every part the forward pass computes. A layer
/// tensor named otherwise is refused ([`CpuError::UnknownPart`]) rather than ignored.
const LAYER_PARTS: &[&str] = &[
    "attn_norm.weight",
    "attn_q.weight",
    "attn_k.weight",
    "attn_v.weight",
    "attn_output.weight",
    "ffn_norm.weight",
    "ffn_gate.weight",
    "ffn_up.weight",
    "ffn_down.weight",
    "attn_q.bias",
    "attn_k.bias",
    "attn_v.bias",
    "attn_q_norm.weight",
    "attn_k_norm.weight",
];

/// All weights. Matrices stay in the file mapping; only the small norm vectors are expanded
/// to f32 (a few KiB per layer) so the per-token code has one form to read.
#[derive(Debug, Clone)]
pub struct ModelWeights {
    /// Token embeddings, `[vocab]` rows of `[dim]`.
    pub token_embd: TensorRef,
    /// Final RMSNorm, `[dim]`.
    pub output_norm: Vec<f32>,
    /// Output projection `[dim] -> [vocab]`; the embedding matrix when the model ties them.
    pub output: TensorRef,
    /// Whether `output` is the tied embedding.
    pub tied_output: bool,
    /// Decoder layers.
    pub layers: Vec<LayerWeights>,
    /// Per-pair RoPE inverse frequencies, `[rope_dims / 2]`.
    pub rope_inv_freq: Vec<f32>,
    /// Interleaved copies of Q4_0 matrices, when the kernels multiply that form (see
    /// [`ModelWeights::interleave_q4_0`]); empty otherwise.
    pub interleaved: Vec<u8>,
}

impl ModelWeights {
    /// Bytes of what was expanded out of the file (norm vectors, RoPE frequencies).
    pub fn state_bytes(&self) -> usize {
        let norms: usize = self
            .layers
            .iter()
            .map(|l| {
                let optional: usize = l.optional_parts().iter().filter_map(|p| p.as_ref()).map(Vec::len).sum();
                l.attn_norm.len() + l.ffn_norm.len() + optional
            })
            .sum();
        4 * (norms + self.output_norm.len() + self.rope_inv_freq.len()) + self.interleaved.len()
    }

    /// Makes an interleaved copy of every Q4_0 matrix that is multiplied (the layers' and
    /// the output projection; the embedding table is only looked up), for kernels that take
    /// that form ([`crate::kernels::simd::Kernels::interleaves_q4_0`]). It costs 1.11 times
    /// the matrices' bytes in memory, once, at load.
    ///
    /// # Errors
    /// The copy cannot be allocated.
    pub fn interleave_q4_0(&mut self, file: &MappedFile) -> Result<(), CpuError> {
        // The tied output is also the embedding table, which lookups keep reading.
        let tied = self.tied_output;
        let mut matrices: Vec<&mut TensorRef> = vec![&mut self.output];
        for l in &mut self.layers {
            matrices.extend([
                &mut l.attn_q,
                &mut l.attn_k,
                &mut l.attn_v,
                &mut l.attn_output,
                &mut l.ffn_gate,
                &mut l.ffn_up,
                &mut l.ffn_down,
            ]);
        }
        matrices.retain(|t| t.ty == GgmlType::Q4_0);
        let total: usize = matrices.iter().map(|t| interleave::q4_0_bytes(t.rows, t.cols)).sum();
        let mut bytes = Vec::new();
        bytes.try_reserve_exact(total).map_err(|_| {
            CpuError::Context(format!(
                "cannot allocate {} MiB for the interleaved Q4_0 matrices",
                total >> 20
            ))
        })?;
        bytes.resize(total, 0);
        let mut at = 0;
        for t in matrices {
            let len = interleave::q4_0_bytes(t.rows, t.cols);
            interleave::interleave_q4_0(
                &file[t.offset..t.offset + t.len],
                t.rows,
                t.cols,
                &mut bytes[at..at + len],
            );
            t.interleaved = Some(at);
            at += len;
            if !(tied && t.offset == self.token_embd.offset) {
                // The file's copy is no longer read: let it leave memory (best effort).
                if let Err(e) = file.release(t.offset..t.offset + t.len) {
                    log::debug!("could not release mapped Q4_0 rows: {e}");
                }
            }
        }
        self.interleaved = bytes;
        Ok(())
    }

    /// Finds, checks and maps every tensor the config calls for.
    ///
    /// # Errors
    /// A tensor is missing, has the wrong shape, or has a type without kernels.
    pub fn load(g: &Gguf, file: &MappedFile, cfg: &LlamaConfig) -> Result<ModelWeights, CpuError> {
        let matrix = |name: &str, cols: usize, rows: usize| -> Result<TensorRef, CpuError> {
            let t = g
                .tensor(name)
                .ok_or_else(|| CpuError::MissingTensor(name.to_string()))?;
            if !t.ty.is_supported() {
                return Err(CpuError::UnsupportedType {
                    ty: t.ty.to_string(),
                    tensor: name.to_string(),
                });
            }
            let want = [cols as u64, rows as u64];
            // Rows must also split into whole kernel blocks (32 for 8-bit activations, 8 floats).
            let row_unit = if quant::uses_q8_activations(t.ty) {
                t.ty.block_elements().max(quant::QK)
            } else {
                8
            };
            if t.dims != want || !cols.is_multiple_of(row_unit) {
                return Err(CpuError::Shape {
                    tensor: name.to_string(),
                    found: t.dims.clone(),
                    expected: want.to_vec(),
                });
            }
            Ok(TensorRef {
                ty: t.ty,
                offset: t.offset as usize,
                len: t.size as usize,
                cols,
                rows,
                interleaved: None,
            })
        };
        let vector = |name: &str, len: usize| -> Result<Vec<f32>, CpuError> {
            let t = matrix(name, len, 1).or_else(|_| {
                // Vectors are stored with one dimension.
                let t = g
                    .tensor(name)
                    .ok_or_else(|| CpuError::MissingTensor(name.to_string()))?;
                if t.dims != [len as u64] || !t.ty.is_supported() || t.ty.block_elements() != 1 {
                    return Err(CpuError::Shape {
                        tensor: name.to_string(),
                        found: t.dims.clone(),
                        expected: vec![len as u64],
                    });
                }
                Ok(TensorRef {
                    ty: t.ty,
                    offset: t.offset as usize,
                    len: t.size as usize,
                    cols: len,
                    rows: 1,
                    interleaved: None,
                })
            })?;
            let mut out = vec![0f32; len];
            quant::dequantize_row(t.ty, &file[t.offset..t.offset + t.len], &mut out);
            Ok(out)
        };

        let optional = |name: &str, len: usize| -> Result<Option<Vec<f32>>, CpuError> {
            match g.tensor(name) {
                Some(_) => vector(name, len).map(Some),
                None => Ok(None),
            }
        };
        if let Some(t) = g.tensors.iter().find(|t| {
            t.name
                .strip_prefix("blk.")
                .and_then(|rest| rest.split_once('.'))
                .is_some_and(|(_, part)| !LAYER_PARTS.contains(&part))
        }) {
            return Err(CpuError::UnknownPart(t.name.clone()));
        }
        let (dim, kv, ffn, vocab) = (cfg.dim, cfg.kv_dim(), cfg.ffn_dim, cfg.vocab_size);
        let (q_dim, hd) = (cfg.q_dim(), cfg.head_dim);
        let token_embd = matrix("token_embd.weight", dim, vocab)?;
        let (output, tied_output) = match g.tensor("output.weight") {
            Some(_) => (matrix("output.weight", dim, vocab)?, false),
            None => (token_embd, true),
        };
        if tied_output && !quant::uses_q8_activations(token_embd.ty) && dim % 8 != 0 {
            return Err(CpuError::MissingTensor("output.weight".into()));
        }
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            let bias = |s: &str| format!("blk.{i}.{s}.bias");
            layers.push(LayerWeights {
                attn_norm: vector(&n("attn_norm"), dim)?,
                attn_q: matrix(&n("attn_q"), dim, q_dim)?,
                attn_k: matrix(&n("attn_k"), dim, kv)?,
                attn_v: matrix(&n("attn_v"), dim, kv)?,
                attn_output: matrix(&n("attn_output"), q_dim, dim)?,
                attn_q_bias: optional(&bias("attn_q"), q_dim)?,
                attn_k_bias: optional(&bias("attn_k"), kv)?,
                attn_v_bias: optional(&bias("attn_v"), kv)?,
                attn_q_norm: optional(&n("attn_q_norm"), hd)?,
                attn_k_norm: optional(&n("attn_k_norm"), hd)?,
                ffn_norm: vector(&n("ffn_norm"), dim)?,
                ffn_gate: matrix(&n("ffn_gate"), dim, ffn)?,
                ffn_up: matrix(&n("ffn_up"), dim, ffn)?,
                ffn_down: matrix(&n("ffn_down"), ffn, dim)?,
            });
        }
        let output_norm = vector("output_norm.weight", dim)?;

        // Llama-3.1 style frequency factors, when present, divide the base frequencies.
        let factors = match g.tensor("rope_freqs.weight") {
            Some(_) => Some(vector("rope_freqs.weight", cfg.rope_dims / 2)?),
            None => None,
        };
        let rope_inv_freq = (0..cfg.rope_dims / 2)
            .map(|i| {
                let f = cfg.rope_theta.powf(-2.0 * i as f32 / cfg.rope_dims as f32) / cfg.rope_scale;
                factors.as_ref().map_or(f, |fs| f / fs[i])
            })
            .collect();
        Ok(ModelWeights {
            token_embd,
            output_norm,
            output,
            tied_output,
            layers,
            rope_inv_freq,
            interleaved: Vec::new(),
        })
    }

    /// Bytes of all matrices (what the mapping keeps resident once touched).
    pub fn bytes(&self) -> u64 {
        let mut b = self.token_embd.len as u64;
        if !self.tied_output {
            b += self.output.len as u64;
        }
        for l in &self.layers {
            for t in [
                l.attn_q,
                l.attn_k,
                l.attn_v,
                l.attn_output,
                l.ffn_gate,
                l.ffn_up,
                l.ffn_down,
            ] {
                b += t.len as u64;
            }
        }
        b
    }
}
