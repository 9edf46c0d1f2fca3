//! Llama hyper-parameters, read from GGUF metadata (never assumed).

use super::gguf::{Gguf, GgufError};

/// Architectures whose GGUF files follow the llama layout (same tensors and metadata keys);
/// what sets them apart is in their tensors (Qwen2's Q/K/V biases, Qwen3's per-head Q/K norms:
/// optional parts of a layer) and in [`LlamaConfig::rope_neox`].
pub const LLAMA_LIKE: &[&str] = &["llama", "mistral", "qwen2", "qwen3"];

/// Most layers accepted (the largest Llama has 126).
const MAX_LAYERS: usize = 1024;
/// Widest hidden or FFN size accepted (Llama-3 405B: 16384 and 53248).
const MAX_WIDTH: usize = 1 << 18;
/// Most attention heads accepted.
const MAX_HEADS: usize = 1024;

/// The shape of a Llama-family decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// `general.architecture`.
    pub arch: String,
    /// Number of decoder layers.
    pub n_layers: usize,
    /// Hidden size (embedding length).
    pub dim: usize,
    /// FFN inner size.
    pub ffn_dim: usize,
    /// Attention (query) heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `n_heads`).
    pub n_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Context length the model was trained for.
    pub context_length: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// Linear RoPE scaling factor (positions are divided by it); 1 when absent.
    pub rope_scale: f32,
    /// Dimensions rotated by RoPE (normally `head_dim`).
    pub rope_dims: usize,
    /// RoPE rotates the two halves of each head (`(i, i + d/2)`, GPT-NeoX's layout) instead
    /// of neighbouring pairs. No GGUF key says so: llama.cpp's converter permutes the Q/K
    /// weights of Llama checkpoints into the neighbouring-pairs layout but writes Qwen's as
    /// they are, and llama.cpp decides by the architecture's name, as this does.
    pub rope_neox: bool,
}

impl LlamaConfig {
    /// Reads the configuration from metadata.
    ///
    /// # Errors
    /// A required key is missing or mistyped, the architecture is not llama-like, or the
    /// numbers are inconsistent (heads not dividing the hidden size, and so on).
    pub fn from_gguf(g: &Gguf) -> Result<LlamaConfig, ConfigError> {
        let arch = g.str("general.architecture")?.to_string();
        if !LLAMA_LIKE.contains(&arch.as_str()) {
            return Err(ConfigError::UnsupportedArch(arch));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let n_layers = g.u64(&key("block_count"))? as usize;
        let dim = g.u64(&key("embedding_length"))? as usize;
        let ffn_dim = g.u64(&key("feed_forward_length"))? as usize;
        let n_heads = g.u64(&key("attention.head_count"))? as usize;
        let n_kv_heads = g
            .u64_opt(&key("attention.head_count_kv"))?
            .map_or(n_heads, |v| v as usize);
        let context_length = g.u64(&key("context_length"))? as usize;
        let rms_eps = g.f64_opt(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5) as f32;
        let rope_theta = g.f64_opt(&key("rope.freq_base"))?.unwrap_or(10000.0) as f32;
        let rope_scale = match g.str_opt(&key("rope.scaling.type"))? {
            None | Some("none") => 1.0,
            Some("linear") => g.f64_opt(&key("rope.scaling.factor"))?.unwrap_or(1.0) as f32,
            Some(other) => return Err(ConfigError::Invalid(format!("unsupported rope scaling type '{other}'"))),
        };
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if n_layers == 0 || dim == 0 || ffn_dim == 0 || n_heads == 0 || n_kv_heads == 0 {
            return invalid("layer count, sizes and head counts must be positive".into());
        }
        // Far beyond any real model, small enough that buffers sized from them cannot overflow.
        for (what, v, cap) in [
            ("block count", n_layers, MAX_LAYERS),
            ("embedding length", dim, MAX_WIDTH),
            ("feed-forward length", ffn_dim, MAX_WIDTH),
            ("head count", n_heads, MAX_HEADS),
            ("kv head count", n_kv_heads, MAX_HEADS),
        ] {
            if v > cap {
                return invalid(format!("{what} {v} is larger than {cap}"));
            }
        }
        // Heads may be wider or narrower than hidden / heads (Qwen3: 16 x 128 over 1024), as
        // the key length says; without it, they divide the hidden size.
        let head_dim = match g.u64_opt(&key("attention.key_length"))? {
            Some(v) => v as usize,
            None if dim.is_multiple_of(n_heads) => dim / n_heads,
            None => {
                return invalid(format!(
                    "hidden size {dim} is not a multiple of the head count {n_heads}"
                ))
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 || head_dim > MAX_WIDTH {
            return invalid(format!("head dim {head_dim} must be even and at most {MAX_WIDTH}"));
        }
        if let Some(v) = g.u64_opt(&key("attention.value_length"))? {
            if v as usize != head_dim {
                return invalid(format!(
                    "value length {v} differs from the key length {head_dim} (not supported)"
                ));
            }
        }
        if head_dim * n_heads > MAX_WIDTH {
            return invalid(format!("{n_heads} heads of {head_dim} are wider than {MAX_WIDTH}"));
        }
        if !n_heads.is_multiple_of(n_kv_heads) {
            return invalid(format!("{n_heads} heads are not a multiple of {n_kv_heads} kv heads"));
        }
        let rope_dims = g
            .u64_opt(&key("rope.dimension_count"))?
            .map_or(head_dim, |v| v as usize);
        if rope_dims > head_dim || rope_dims % 2 != 0 {
            return invalid(format!(
                "rope dimension count {rope_dims} does not fit head dim {head_dim}"
            ));
        }
        let vocab_size = match g.u64_opt(&key("vocab_size"))? {
            Some(v) => v as usize,
            None => g
                .tensor("token_embd.weight")
                .map(|t| t.dims.get(1).copied().unwrap_or(0) as usize)
                .unwrap_or(0),
        };
        if vocab_size == 0 {
            return invalid("vocabulary size unknown (no vocab_size key and no token_embd.weight)".into());
        }
        if !(rms_eps > 0.0 && rope_theta > 0.0 && rope_scale > 0.0) {
            return invalid("rms epsilon, rope base and rope scale must be positive".into());
        }
        Ok(LlamaConfig {
            n_layers,
            dim,
            ffn_dim,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab_size,
            context_length,
            rms_eps,
            rope_theta,
            rope_scale,
            rope_dims,
            rope_neox: matches!(arch.as_str(), "qwen2" | "qwen3"),
            arch,
        })
    }

    /// Width of the query projection (all heads), which is also the attention output's.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of the K and V projections.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Query heads per key/value head (1 without grouped-query attention).
    pub fn heads_per_kv_head(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }
}

/// Why a configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Metadata problem.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// Not a llama-family model.
    #[error("unsupported architecture '{0}' (supported: {list})", list = LLAMA_LIKE.join(", "))]
    UnsupportedArch(String),
    /// Inconsistent numbers.
    #[error("invalid model configuration: {0}")]
    Invalid(String),
}
