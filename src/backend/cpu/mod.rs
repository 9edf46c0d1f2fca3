//! The CPU reference backend: the Llama forward pass in plain Rust over a memory-mapped GGUF.
//!
//! It is the default backend (runs anywhere) and the oracle the TPU backend is checked against.
//! The shape follows llama2.c: a config, weights borrowed from the file, and run state (scratch
//! activations and the KV cache) allocated once; `forward` allocates nothing.
//!
//! Matrix products, attention and the per-token steps between them (residual adds, norms,
//! SwiGLU, quantizing a matrix's input) are spread over a [`pool::Pool`]; the calling thread
//! does RoPE and the KV cache writes.

pub mod pool;
pub mod weights;

use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use super::{check_spans, Backend, BackendError, BackendInfo, Next, Span};
use crate::kernels::matmul::{matmul_rows, Activations, TokenRows};
use crate::kernels::ops;
use crate::kernels::quant::{self, BlockQ8, QK};
use crate::kernels::simd::Kernels;
use crate::model::config::ConfigError;
use crate::model::{Gguf, GgufError, LlamaConfig, MappedFile};
use pool::{Executor, Pool};
use weights::{ModelWeights, TensorRef};

/// Rows of one matrix per work item: small enough to balance two to eight threads on a
/// 576-row matrix, large enough that claiming an item costs nothing next to computing it.
const ROWS_PER_ITEM: usize = 16;
/// Runs of rows per thread in a one-token matrix product: long runs let the prefetch run
/// ahead (16-row items claimed in turn gave 135-190 t/s on tg128, varying with timing; one run
/// per thread 240-259, two 244-250); two leave some balancing when a thread is slowed.
const STREAMS_PER_THREAD: usize = 2;
/// Default KV cache length when the model's own context is longer (memory on small boards).
pub const DEFAULT_CONTEXT: usize = 4096;
/// Tokens per forward batch during prompt processing (activation buffers scale with it).
pub const DEFAULT_BATCH: usize = 512;

/// Why a CPU backend could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// The file could not be read.
    #[error("cannot open {path}: {source}")]
    Io {
        /// The model path.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Container problem.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// Metadata problem.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A tensor the architecture needs is absent.
    #[error("tensor '{0}' is missing")]
    MissingTensor(String),
    /// A tensor's type has no kernel.
    #[error(
        "unsupported tensor type {ty} in tensor '{tensor}' (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K)"
    )]
    UnsupportedType {
        /// The type.
        ty: String,
        /// The tensor.
        tensor: String,
    },
    /// A tensor's dimensions disagree with the configuration.
    #[error("tensor '{tensor}' has shape {found:?}, expected {expected:?}")]
    Shape {
        /// The tensor.
        tensor: String,
        /// Its dims.
        found: Vec<u64>,
        /// What the config implies.
        expected: Vec<u64>,
    },
    /// A tensor of a part the CPU backend does not compute (a fused QKV, a bias it does not
    /// add, experts): the model would be computed wrong, so it is refused.
    #[error("tensor '{0}' belongs to a part of the model this backend does not compute")]
    UnknownPart(String),
    /// The requested context cannot be had.
    #[error("{0}")]
    Context(String),
    /// Worker threads could not start.
    #[error("cannot start worker threads: {0}")]
    Threads(std::io::Error),
}

/// Settings of the CPU backend.
#[derive(Debug, Clone)]
pub struct CpuOptions {
    /// Threads for matrix work (the calling thread included); 0 means all available cores.
    pub threads: usize,
    /// KV cache length; `None` means the model's context, capped at [`DEFAULT_CONTEXT`].
    pub context: Option<usize>,
    /// Tokens per prompt batch.
    pub batch: usize,
    /// Matrix kernels to use; `None` means the best this CPU runs.
    pub kernels: Option<Kernels>,
    /// KV caches (conversations held at once), each `context` tokens long.
    pub slots: usize,
}

impl Default for CpuOptions {
    fn default() -> Self {
        CpuOptions {
            threads: 0,
            context: None,
            batch: DEFAULT_BATCH,
            kernels: None,
            slots: 1,
        }
    }
}

/// Keys and values of every slot, layer and position, `[slot][layer][pos][kv_dim]`, as f16
/// (little-endian bytes), llama.cpp's default: half the memory of f32, and attention reads
/// half the bytes.
struct KvCache {
    k: Vec<u8>,
    v: Vec<u8>,
}

/// Stores `src` into `dst` (`2 * src.len()` bytes) as f16, rounding to nearest.
fn store_f16(dst: &mut [u8], src: &[f32]) {
    for (d, &v) in dst.chunks_exact_mut(2).zip(src) {
        d.copy_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes());
    }
}

/// Where a token of a batch goes: its slot's KV cache, at its position.
#[derive(Debug, Clone, Copy, Default)]
struct Place {
    slot: usize,
    pos: usize,
}

/// Chunks of a batch's per-token state (see [`Compute::tokens`]).
const CHUNKS: usize = 16;
/// Below this many tokens the calling thread does a stage alone (handing it to the pool
/// costs more than it saves for one token).
const PARALLEL_STAGE_TOKENS: usize = 8;

/// The per-token state of one chunk of a batch.
struct TokenState {
    /// Residual stream, `[tokens][dim]`.
    x: Vec<f32>,
    /// Quantized input of the next matrix job, `[tokens][widest / 32]`.
    xq: Vec<BlockQ8>,
    /// Float input of the next matrix job (float weights), `[tokens][widest]`.
    xf: Vec<f32>,
    /// One token's input on its way into `xq` / `xf`, `[widest]`.
    row: Vec<f32>,
}

/// Which norm weights a stage applies.
#[derive(Debug, Clone, Copy)]
enum Norm {
    Attention(usize),
    FeedForward(usize),
}

/// The per-token steps between two matrix jobs, as a job: each item is one chunk of tokens.
#[derive(Debug, Clone, Copy)]
enum Stage {
    /// Optionally add the last matrix output to the residual stream, then normalize it.
    Norm { add: bool, norm: Norm },
    /// The last job's output (the attention heads) as it is.
    Output { cols: usize },
    /// SwiGLU of the last job's two outputs (gate and up).
    Glu { cols: usize },
    /// Only add the last matrix output to the residual stream.
    Add,
}

/// What the worker threads share with the calling thread: weights and the buffers a job reads
/// or fills. Buffers written by the caller between jobs sit behind uncontended locks; buffers
/// written by workers are atomics (each element stored once per job).
struct Compute {
    file: Arc<MappedFile>,
    weights: ModelWeights,
    cfg: LlamaConfig,
    context: usize,
    /// The matrix kernels for this CPU, chosen once at load.
    kernels: Kernels,
    /// The per-token state of a batch (residual stream and matrix inputs), in [`CHUNKS`]
    /// chunks of `per_chunk` tokens: a stage job fills them on every thread at once.
    tokens: Vec<RwLock<TokenState>>,
    /// Tokens per chunk of `tokens`.
    per_chunk: usize,
    /// Rotated queries, `[tokens][dim]`.
    q: RwLock<Vec<f32>>,
    /// Each token's slot and position, `[tokens]`: a batch may hold several conversations.
    places: RwLock<Vec<Place>>,
    kv: RwLock<KvCache>,
    /// Outputs of the matrices of a job (up to three: Q/K/V or gate/up), `[tokens][rows]`.
    out: [Vec<AtomicU32>; 3],
    /// Per-thread attention scratch for a KV group's query heads: scores `[group][context]`
    /// then accumulators `[group][head_dim]`.
    scratch: Vec<Mutex<Vec<f32>>>,
}

#[derive(Debug, Clone, Copy)]
enum Job {
    /// Multiply the current input by up to three matrices.
    MatMul {
        weights: [Option<TensorRef>; 3],
        n_tokens: usize,
    },
    /// Causal attention for `n_tokens` queries, each against its own slot's cache up to its
    /// position ([`Compute::places`]), one item per (token, KV head).
    Attention { layer: usize, n_tokens: usize },
    /// The per-token steps before a matrix job; its input is made in the forms `q8` and `f32`.
    Stage {
        stage: Stage,
        n_tokens: usize,
        q8: bool,
        f32: bool,
    },
}

impl Executor for Compute {
    type Job = Job;

    fn run(&self, job: &Job, worker: usize, next: &AtomicUsize) {
        match *job {
            Job::MatMul { weights, n_tokens } => self.run_matmul(&weights, n_tokens, next),
            Job::Attention { layer, n_tokens } => self.run_attention(layer, n_tokens, worker, next),
            Job::Stage {
                stage,
                n_tokens,
                q8,
                f32,
            } => self.run_stage(stage, n_tokens, (q8, f32), next),
        }
    }
}

impl Compute {
    fn run_matmul(&self, weights: &[Option<TensorRef>; 3], n_tokens: usize, next: &AtomicUsize) {
        // Only the chunks that hold the job's tokens (one for a single token).
        let tokens: [_; CHUNKS] = std::array::from_fn(|c| {
            (c * self.per_chunk < n_tokens).then(|| self.tokens[c].read().unwrap_or_else(|e| e.into_inner()))
        });
        let xq: [&[BlockQ8]; CHUNKS] = std::array::from_fn(|c| tokens[c].as_ref().map_or(&[][..], |t| &t.xq[..]));
        let xf: [&[f32]; CHUNKS] = std::array::from_fn(|c| tokens[c].as_ref().map_or(&[][..], |t| &t.xf[..]));
        // One token (or a few decoding together): each thread streams a few long runs of rows (the prefetcher follows a run;
        // small items claimed in turn interleave the threads' reads). A prompt: small items,
        // which balance threads whatever their speed.
        let per_item = |rows: usize| {
            if n_tokens <= crate::kernels::matmul::SMALL_BATCH {
                rows.div_ceil(self.scratch.len() * STREAMS_PER_THREAD)
                    .next_multiple_of(ROWS_PER_ITEM)
            } else {
                ROWS_PER_ITEM
            }
        };
        loop {
            let mut item = next.fetch_add(1, Ordering::Relaxed);
            let mut found = None;
            for (i, w) in weights.iter().enumerate() {
                let Some(w) = w else { continue };
                let items = w.rows.div_ceil(per_item(w.rows));
                if item < items {
                    found = Some((i, w, item));
                    break;
                }
                item -= items;
            }
            let Some((i, w, chunk)) = found else { return };
            let size = per_item(w.rows);
            let rows = chunk * size..((chunk + 1) * size).min(w.rows);
            let x = if quant::uses_q8_activations(w.ty) {
                Activations::Q8(TokenRows::new(&xq, self.per_chunk, w.cols / QK))
            } else {
                Activations::F32(TokenRows::new(&xf, self.per_chunk, w.cols))
            };
            matmul_rows(
                self.kernels,
                &w.view(&self.file, &self.weights.interleaved),
                x,
                n_tokens,
                rows,
                &self.out[i],
                w.rows,
            );
        }
    }

    /// One stage (see [`Stage`]) on whole chunks of tokens, leaving each token's input to the
    /// next matrix job in the forms it takes (`forms`: 8-bit, float).
    fn run_stage(&self, stage: Stage, n_tokens: usize, forms: (bool, bool), next: &AtomicUsize) {
        let cfg = &self.cfg;
        let dim = cfg.dim;
        loop {
            let chunk = next.fetch_add(1, Ordering::Relaxed);
            let first = chunk * self.per_chunk;
            if chunk >= CHUNKS || first >= n_tokens {
                return;
            }
            let mut guard = self.tokens[chunk].write().unwrap_or_else(|e| e.into_inner());
            let st = &mut *guard;
            for i in 0..self.per_chunk.min(n_tokens - first) {
                let t = first + i;
                let cols = match stage {
                    Stage::Norm { add, norm } => {
                        let x = &mut st.x[i * dim..(i + 1) * dim];
                        if add {
                            add_atomics(x, &self.out[0][t * dim..(t + 1) * dim]);
                        }
                        let weight = match norm {
                            Norm::Attention(l) => &self.weights.layers[l].attn_norm,
                            Norm::FeedForward(l) => &self.weights.layers[l].ffn_norm,
                        };
                        ops::rms_norm(&mut st.row[..dim], x, weight, cfg.rms_eps);
                        dim
                    }
                    Stage::Output { cols } => {
                        read_atomics(&self.out[0][t * cols..(t + 1) * cols], &mut st.row[..cols]);
                        cols
                    }
                    Stage::Glu { cols } => {
                        let (gate, up) = (&self.out[0][t * cols..], &self.out[1][t * cols..]);
                        read_atomics(gate, &mut st.row[..cols]);
                        self.kernels.silu(&mut st.row[..cols]);
                        for (r, u) in st.row[..cols].iter_mut().zip(up) {
                            *r *= f32::from_bits(u.load(Ordering::Relaxed));
                        }
                        cols
                    }
                    Stage::Add => {
                        add_atomics(&mut st.x[i * dim..(i + 1) * dim], &self.out[0][t * dim..(t + 1) * dim]);
                        continue;
                    }
                };
                if forms.0 {
                    let blocks = cols / QK;
                    self.kernels
                        .quantize_q8(&st.row[..cols], &mut st.xq[i * blocks..(i + 1) * blocks]);
                }
                if forms.1 {
                    st.xf[i * cols..(i + 1) * cols].copy_from_slice(&st.row[..cols]);
                }
            }
        }
    }

    /// Byte offset of `(slot, layer)`'s keys (or values) in the cache.
    fn kv_base(&self, slot: usize, layer: usize) -> usize {
        2 * (slot * self.cfg.n_layers + layer) * self.context * self.cfg.kv_dim()
    }

    fn run_attention(&self, layer: usize, n_tokens: usize, worker: usize, next: &AtomicUsize) {
        let cfg = &self.cfg;
        let (qd, hd, kvd) = (cfg.q_dim(), cfg.head_dim, cfg.kv_dim());
        let group = cfg.heads_per_kv_head();
        let q = self.q.read().unwrap_or_else(|e| e.into_inner());
        let places = self.places.read().unwrap_or_else(|e| e.into_inner());
        let kv = self.kv.read().unwrap_or_else(|e| e.into_inner());
        let mut scratch = self.scratch[worker].lock().unwrap_or_else(|e| e.into_inner());
        let (scores, acc) = scratch.split_at_mut(group * self.context);
        let scale = 1.0 / (hd as f32).sqrt();
        // An item is one token's query heads that share a key/value head: the kernels read
        // their keys and values from the cache once for the group.
        let kv_heads = cfg.n_kv_heads;
        loop {
            let item = next.fetch_add(1, Ordering::Relaxed);
            if item >= n_tokens * kv_heads {
                return;
            }
            let (t, kv_head) = (item / kv_heads, item % kv_heads);
            let Place { slot, pos } = places[t];
            let n = pos + 1;
            let base = self.kv_base(slot, layer);
            let layer_k = &kv.k[base..base + 2 * n * kvd];
            let layer_v = &kv.v[base..base + 2 * n * kvd];
            let heads = t * qd + kv_head * group * hd..t * qd + (kv_head + 1) * group * hd;
            // Row p of this KV head starts at byte 2 * (p * kvd + kv_head * hd).
            let (keys, values) = (&layer_k[2 * kv_head * hd..], &layer_v[2 * kv_head * hd..]);
            let scores = &mut scores[..group * n];
            self.kernels
                .dot_f16_rows_heads(&q[heads.clone()], group, keys, 2 * kvd, scores);
            for head_scores in scores.chunks_exact_mut(n) {
                self.kernels.softmax(head_scores, scale);
            }
            let acc = &mut acc[..group * hd];
            self.kernels.sum_f16_rows_heads(acc, group, scores, values, 2 * kvd);
            for (o, &a) in self.out[0][heads].iter().zip(acc.iter()) {
                o.store(a.to_bits(), Ordering::Relaxed);
            }
        }
    }
}

/// The CPU backend. See the module documentation.
pub struct CpuBackend {
    info: BackendInfo,
    compute: Arc<Compute>,
    pool: Pool<Compute>,
    batch: usize,
    /// Logits of the tokens of a batch whose output is wanted, `[slots][vocab]`.
    logits: Vec<f32>,
    /// One token's key or value row on its way into the f16 cache, `[kv_dim]`.
    kv_row: Vec<f32>,
    /// The residual streams of the tokens whose output is wanted, on their way to the output
    /// norm, `[slots][dim]`.
    last_x: Vec<f32>,
    /// The tokens of the batch being filled, `[batch]`.
    batch_tokens: Vec<u32>,
    /// For each output wanted from the batch: the token's index in it and the span's.
    wanted: Vec<(usize, usize)>,
    /// Each token's rotary (cos, sin) pairs, `[batch][rope_dims]`.
    rope_angles: Vec<f32>,
}

impl CpuBackend {
    /// Maps and validates a GGUF model and allocates all run state.
    ///
    /// # Errors
    /// The file is unreadable, malformed, not a llama-family model, or uses unsupported types.
    pub fn load(path: &Path, opts: &CpuOptions) -> Result<CpuBackend, CpuError> {
        let file = MappedFile::open(path).map_err(|source| CpuError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let gguf = Gguf::parse(&file)?;
        Self::from_parts(Arc::new(file), &gguf, opts)
    }

    /// Bytes of one slot's KV cache for this model and these options.
    ///
    /// # Errors
    /// The model's metadata is unusable, or the context is longer than it was trained for.
    pub fn kv_bytes_per_slot(gguf: &Gguf, opts: &CpuOptions) -> Result<u64, CpuError> {
        let cfg = LlamaConfig::from_gguf(gguf)?;
        let context = context_for(&cfg, opts)?;
        // Keys and values, f16.
        Ok(2 * 2 * (cfg.n_layers as u64) * (context as u64) * (cfg.kv_dim() as u64))
    }

    /// Builds the backend from an already parsed file.
    ///
    /// # Errors
    /// As for [`CpuBackend::load`].
    pub fn from_parts(file: Arc<MappedFile>, gguf: &Gguf, opts: &CpuOptions) -> Result<CpuBackend, CpuError> {
        let cfg = LlamaConfig::from_gguf(gguf)?;
        let mut weights = ModelWeights::load(gguf, &file, &cfg)?;
        let kernels = opts.kernels.unwrap_or_else(Kernels::best);
        if kernels.interleaves_q4_0() {
            weights.interleave_q4_0(&file)?;
        }
        let context = context_for(&cfg, opts)?;
        let slots = opts.slots.max(1);
        // A batch holds at least one token of every slot (one step decodes them all).
        let batch = opts.batch.clamp(1, context).max(slots);
        let threads = match opts.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let (dim, kvd, ffn, vocab) = (cfg.dim, cfg.kv_dim(), cfg.ffn_dim, cfg.vocab_size);
        let widest = dim.max(ffn).max(cfg.q_dim());
        let per_chunk = batch.div_ceil(CHUNKS);
        let out_len = (batch * widest).max(slots * vocab);
        let kv_len = slots
            .checked_mul(cfg.n_layers * context * kvd)
            .ok_or_else(|| CpuError::Context(format!("{slots} slots of {context} tokens do not fit in memory")))?;
        // The KV cache is the one large allocation; refuse it with a message, not an abort.
        // Written at once (zeros), so its memory is taken now, not under load.
        let kv_vec = || -> Result<Vec<u8>, CpuError> {
            let mut v = Vec::new();
            v.try_reserve_exact(2 * kv_len).map_err(|_| {
                CpuError::Context(format!(
                    "cannot allocate a KV cache of {} MiB ({slots} slots of {context} tokens)",
                    (kv_len * 4) >> 20
                ))
            })?;
            v.resize(2 * kv_len, 0);
            Ok(v)
        };
        let atomics = |n: usize| (0..n).map(|_| AtomicU32::new(0)).collect::<Vec<_>>();
        let dtype = describe_types(&weights);
        let compute = Arc::new(Compute {
            file: Arc::clone(&file),
            cfg: cfg.clone(),
            context,
            kernels,
            tokens: (0..CHUNKS)
                .map(|_| {
                    RwLock::new(TokenState {
                        x: vec![0.0; per_chunk * dim],
                        xq: vec![BlockQ8::default(); per_chunk * widest / QK],
                        xf: vec![0.0; per_chunk * widest],
                        row: vec![0.0; widest],
                    })
                })
                .collect(),
            per_chunk,
            q: RwLock::new(vec![0.0; batch * cfg.q_dim()]),
            places: RwLock::new(vec![Place::default(); batch]),
            kv: RwLock::new(KvCache {
                k: kv_vec()?,
                v: kv_vec()?,
            }),
            out: [atomics(out_len), atomics(batch * widest), atomics(batch * widest)],
            scratch: (0..threads)
                .map(|_| Mutex::new(vec![0.0; cfg.heads_per_kv_head() * (context + cfg.head_dim)]))
                .collect(),
            weights,
        });
        let pool = Pool::new(Arc::clone(&compute), threads).map_err(CpuError::Threads)?;
        let name = file
            .path()
            .file_name()
            .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
        let info = BackendInfo {
            backend: "cpu",
            model: format!("{name} ({}, {} layers, dim {})", cfg.arch, cfg.n_layers, cfg.dim),
            context_length: context,
            vocab_size: vocab,
            dtype,
            weight_bytes: compute.weights.bytes(),
            kv_cache_bytes: (2 * kv_len * 2) as u64,
            host_state_bytes: 0,
            rearranged_weight_bytes: 0,
            max_batch: batch,
            slots,
        };
        let mut backend = CpuBackend {
            info,
            pool,
            batch,
            logits: vec![0.0; slots * vocab],
            kv_row: vec![0.0; kvd],
            last_x: vec![0.0; slots * dim],
            batch_tokens: vec![0; batch],
            wanted: Vec::with_capacity(slots),
            rope_angles: vec![0.0; batch * cfg.rope_dims],
            compute,
        };
        backend.info.host_state_bytes = backend.state_bytes();
        backend.info.rearranged_weight_bytes = backend.compute.weights.interleaved.len() as u64;
        Ok(backend)
    }

    /// Bytes of every buffer the backend allocated (weights are mapped, not counted).
    fn state_bytes(&self) -> u64 {
        fn bytes<T>(v: &[T]) -> usize {
            std::mem::size_of_val(v)
        }
        let c = &*self.compute;
        let read = |l: &RwLock<Vec<f32>>| bytes(&l.read().unwrap_or_else(|e| e.into_inner()));
        let kv = c.kv.read().unwrap_or_else(|e| e.into_inner());
        let scratch: usize = c
            .scratch
            .iter()
            .map(|m| bytes(&m.lock().unwrap_or_else(|e| e.into_inner())))
            .sum();
        let tokens: usize = c
            .tokens
            .iter()
            .map(|t| {
                let t = t.read().unwrap_or_else(|e| e.into_inner());
                bytes(&t.x) + bytes(&t.xq) + bytes(&t.xf) + bytes(&t.row)
            })
            .sum();
        let total = bytes(&kv.k)
            + bytes(&kv.v)
            + bytes(&c.places.read().unwrap_or_else(|e| e.into_inner()))
            + bytes(&self.batch_tokens)
            + self.wanted.capacity() * std::mem::size_of::<(usize, usize)>()
            + tokens
            + read(&c.q)
            + c.out.iter().map(|o| bytes(o)).sum::<usize>()
            + scratch
            + [&self.logits, &self.kv_row, &self.last_x]
                .iter()
                .map(|v| bytes(v))
                .sum::<usize>()
            + bytes(&self.rope_angles)
            + c.weights.state_bytes();
        total as u64
    }

    /// The matrix kernels in use.
    pub fn kernels(&self) -> Kernels {
        self.compute.kernels
    }

    /// Threads used for matrix work.
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// Checks a step before anything runs: spans that cover the tokens, positions inside
    /// the context, ids inside the vocabulary.
    fn check(&self, tokens: &[u32], spans: &[Span]) -> Result<(), BackendError> {
        check_spans(tokens, spans, self.info.slots)?;
        let context = self.info.context_length;
        if let Some(s) = spans.iter().find(|s| s.start.saturating_add(s.len) > context) {
            return Err(BackendError::ContextOverflow {
                pos: s.start,
                len: s.len,
                context,
            });
        }
        match tokens.iter().find(|&&t| t as usize >= self.info.vocab_size) {
            Some(&t) => Err(BackendError::BadToken(t)),
            None => Ok(()),
        }
    }

    /// Runs the filled batch (`n` tokens, their places set) and hands the wanted outputs on.
    fn run_batch(&mut self, n: usize, out: &mut dyn FnMut(usize, Next<'_>)) {
        self.forward_batch(n);
        let vocab = self.info.vocab_size;
        for (row, &(_, span)) in self.wanted.iter().enumerate() {
            out(span, Next::Logits(&self.logits[row * vocab..(row + 1) * vocab]));
        }
        self.wanted.clear();
    }

    /// Runs `stage` on the batch's `n` tokens, making the inputs that `weights` take; on the
    /// pool when the batch is large enough to pay for it.
    fn stage(&self, stage: Stage, n: usize, weights: &[Option<TensorRef>; 3]) {
        let job = Job::Stage {
            stage,
            n_tokens: n,
            q8: weights.iter().flatten().any(|w| quant::uses_q8_activations(w.ty)),
            f32: weights.iter().flatten().any(|w| !quant::uses_q8_activations(w.ty)),
        };
        if n < PARALLEL_STAGE_TOKENS {
            self.compute.run(&job, 0, &AtomicUsize::new(0));
        } else {
            self.pool.run(job);
        }
    }

    fn matmul(&self, n: usize, weights: [Option<TensorRef>; 3]) {
        self.pool.run(Job::MatMul { weights, n_tokens: n });
    }

    /// One batch: the first `n` of `batch_tokens` at their [`Place`]s; fills a row of
    /// `self.logits` for each token in `wanted`.
    fn forward_batch(&mut self, n: usize) {
        let c = Arc::clone(&self.compute);
        let cfg = &c.cfg;
        let (dim, kvd, ffn, hd, qd) = (cfg.dim, cfg.kv_dim(), cfg.ffn_dim, cfg.head_dim, cfg.q_dim());
        let rotate = if cfg.rope_neox {
            ops::rope_rotate_neox
        } else {
            ops::rope_rotate
        };
        let tokens = &self.batch_tokens[..n];
        let embd = c.weights.token_embd.view(&c.file, &c.weights.interleaved);
        {
            // The rotary angles of each token, for every head of every layer.
            let places = c.places.read().unwrap_or_else(|e| e.into_inner());
            for (angles, p) in self.rope_angles.chunks_exact_mut(cfg.rope_dims).zip(&places[..n]) {
                ops::rope_angles(p.pos, &c.weights.rope_inv_freq, angles);
            }
        }
        for (chunk, tokens) in c.tokens.iter().zip(tokens.chunks(c.per_chunk)) {
            let mut st = chunk.write().unwrap_or_else(|e| e.into_inner());
            for (x, &tok) in st.x.chunks_exact_mut(dim).zip(tokens) {
                quant::dequantize_row(embd.ty, embd.row(tok as usize), x);
            }
        }
        for (l, lw) in c.weights.layers.iter().enumerate() {
            // Attention block (the residual add of the layer before comes first).
            let qkv = [Some(lw.attn_q), Some(lw.attn_k), Some(lw.attn_v)];
            let norm = Norm::Attention(l);
            self.stage(Stage::Norm { add: l > 0, norm }, n, &qkv);
            self.matmul(n, qkv);
            {
                let mut q = c.q.write().unwrap_or_else(|e| e.into_inner());
                let mut kv = c.kv.write().unwrap_or_else(|e| e.into_inner());
                let places = c.places.read().unwrap_or_else(|e| e.into_inner());
                // Each projection's optional parts in llama.cpp's order: bias, then the
                // per-head norm, then RoPE.
                let finish = |x: &mut [f32], bias: &Option<Vec<f32>>, norm: &Option<Vec<f32>>, angles: &[f32]| {
                    if let Some(b) = bias {
                        x.iter_mut().zip(b).for_each(|(v, b)| *v += b);
                    }
                    for head in x.chunks_exact_mut(hd) {
                        if let Some(w) = norm {
                            ops::rms_norm_in_place(head, w, cfg.rms_eps);
                        }
                        rotate(&mut head[..cfg.rope_dims], angles);
                    }
                };
                for (t, p) in places[..n].iter().enumerate() {
                    let qt = &mut q[t * qd..(t + 1) * qd];
                    read_atomics(&c.out[0][t * qd..(t + 1) * qd], qt);
                    let angles = &self.rope_angles[t * cfg.rope_dims..(t + 1) * cfg.rope_dims];
                    finish(qt, &lw.attn_q_bias, &lw.attn_q_norm, angles);
                    let at = c.kv_base(p.slot, l) + 2 * p.pos * kvd;
                    let kt = &mut self.kv_row[..kvd];
                    read_atomics(&c.out[1][t * kvd..(t + 1) * kvd], kt);
                    finish(kt, &lw.attn_k_bias, &lw.attn_k_norm, angles);
                    store_f16(&mut kv.k[at..at + 2 * kvd], kt);
                    read_atomics(&c.out[2][t * kvd..(t + 1) * kvd], kt);
                    if let Some(b) = &lw.attn_v_bias {
                        kt.iter_mut().zip(b).for_each(|(v, b)| *v += b);
                    }
                    store_f16(&mut kv.v[at..at + 2 * kvd], kt);
                }
            }
            self.pool.run(Job::Attention { layer: l, n_tokens: n });
            let output = [Some(lw.attn_output), None, None];
            self.stage(Stage::Output { cols: qd }, n, &output);
            self.matmul(n, output);

            // Feed-forward block.
            let gate_up = [Some(lw.ffn_gate), Some(lw.ffn_up), None];
            let norm = Norm::FeedForward(l);
            self.stage(Stage::Norm { add: true, norm }, n, &gate_up);
            self.matmul(n, gate_up);
            let down = [Some(lw.ffn_down), None, None];
            self.stage(Stage::Glu { cols: ffn }, n, &down);
            self.matmul(n, down);
        }
        self.stage(Stage::Add, n, &[None; 3]);
        let wanted = self.wanted.len();
        if wanted > 0 {
            // The wanted tokens' rows, normalized, as the only inputs of the output matrix
            // (rows 0.. of the batch: their residual streams are copied out first).
            let output = c.weights.output;
            for (row, &(t, _)) in self.wanted.iter().enumerate() {
                let (chunk, i) = (t / c.per_chunk, t % c.per_chunk);
                let st = c.tokens[chunk].read().unwrap_or_else(|e| e.into_inner());
                self.last_x[row * dim..(row + 1) * dim].copy_from_slice(&st.x[i * dim..(i + 1) * dim]);
            }
            for row in 0..wanted {
                let (chunk, i) = (row / c.per_chunk, row % c.per_chunk);
                let mut guard = c.tokens[chunk].write().unwrap_or_else(|e| e.into_inner());
                let st = &mut *guard;
                let last = &self.last_x[row * dim..(row + 1) * dim];
                ops::rms_norm(&mut st.row[..dim], last, &c.weights.output_norm, cfg.rms_eps);
                if quant::uses_q8_activations(output.ty) {
                    let blocks = dim / QK;
                    c.kernels
                        .quantize_q8(&st.row[..dim], &mut st.xq[i * blocks..(i + 1) * blocks]);
                } else {
                    st.xf[i * dim..(i + 1) * dim].copy_from_slice(&st.row[..dim]);
                }
            }
            self.matmul(wanted, [Some(output), None, None]);
            let vocab = cfg.vocab_size;
            read_atomics(&c.out[0][..wanted * vocab], &mut self.logits[..wanted * vocab]);
        }
    }
}

/// The KV cache length: asked for, or the model's own capped at [`DEFAULT_CONTEXT`].
fn context_for(cfg: &LlamaConfig, opts: &CpuOptions) -> Result<usize, CpuError> {
    let context = opts
        .context
        .unwrap_or_else(|| cfg.context_length.min(DEFAULT_CONTEXT))
        .max(1);
    if context > cfg.context_length.max(1) {
        return Err(CpuError::Context(format!(
            "a context of {context} tokens is longer than the model's {} (it was not trained for more)",
            cfg.context_length
        )));
    }
    Ok(context)
}

fn read_atomics(src: &[AtomicU32], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits(s.load(Ordering::Relaxed));
    }
}

fn add_atomics(acc: &mut [f32], src: &[AtomicU32]) {
    for (a, s) in acc.iter_mut().zip(src) {
        *a += f32::from_bits(s.load(Ordering::Relaxed));
    }
}

fn describe_types(w: &ModelWeights) -> String {
    let mut types: Vec<String> = Vec::new();
    let mut note = |t: &TensorRef| {
        let s = t.ty.to_string();
        if !types.contains(&s) {
            types.push(s);
        }
    };
    for l in &w.layers {
        for t in [
            &l.attn_q,
            &l.attn_k,
            &l.attn_v,
            &l.attn_output,
            &l.ffn_gate,
            &l.ffn_up,
            &l.ffn_down,
        ] {
            note(t);
        }
    }
    note(&w.token_embd);
    note(&w.output);
    types.join("/")
}

impl Backend for CpuBackend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    fn prefill(&mut self, tokens: &[u32], start: usize) -> Result<Next<'_>, BackendError> {
        let span = Span {
            slot: 0,
            start,
            len: tokens.len(),
            output: true,
            decode: false,
        };
        self.step(tokens, &[span], &mut |_, _| {})?;
        Ok(Next::Logits(&self.logits[..self.info.vocab_size]))
    }

    fn decode(&mut self, token: u32, pos: usize) -> Result<Next<'_>, BackendError> {
        let span = Span {
            slot: 0,
            start: pos,
            len: 1,
            output: true,
            decode: true,
        };
        self.step(&[token], &[span], &mut |_, _| {})?;
        Ok(Next::Logits(&self.logits[..self.info.vocab_size]))
    }

    /// Packs the spans' tokens into forward batches of at most `batch` tokens (a long prompt
    /// takes several): one pass over the weights serves every sequence in a batch.
    fn step(
        &mut self,
        tokens: &[u32],
        spans: &[Span],
        out: &mut dyn FnMut(usize, Next<'_>),
    ) -> Result<(), BackendError> {
        self.check(tokens, spans)?;
        let compute = Arc::clone(&self.compute);
        let mut n = 0;
        let mut at = 0;
        for (i, s) in spans.iter().enumerate() {
            for j in 0..s.len {
                {
                    let mut places = compute.places.write().unwrap_or_else(|e| e.into_inner());
                    places[n] = Place {
                        slot: s.slot,
                        pos: s.start + j,
                    };
                }
                self.batch_tokens[n] = tokens[at + j];
                n += 1;
                if j + 1 == s.len && s.output {
                    self.wanted.push((n - 1, i));
                }
                if n == self.batch || self.wanted.len() == self.info.slots {
                    self.run_batch(n, out);
                    n = 0;
                }
            }
            at += s.len;
        }
        if n > 0 {
            self.run_batch(n, out);
        }
        Ok(())
    }

    fn reset(&mut self) {
        // Positions are always written before they are read (attention covers 0..=pos and the
        // engine fills them in order), so forgetting needs no clearing.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf::writer::{write, Meta};
    use crate::model::GgmlType;

    /// A tiny F32 llama (dim 32, 2 heads, 1 layer, vocab 8) with one metadata value replaced.
    fn tiny(replace: Option<(&str, u32)>) -> Vec<u8> {
        let (dim, ffn, vocab) = (32u64, 64u64, 8u64);
        let f32s = |n: u64| vec![0u8; n as usize * 4];
        let mut meta = vec![
            ("general.architecture", Meta::Str("llama".into())),
            ("llama.block_count", Meta::U32(1)),
            ("llama.embedding_length", Meta::U32(dim as u32)),
            ("llama.feed_forward_length", Meta::U32(ffn as u32)),
            ("llama.attention.head_count", Meta::U32(2)),
            ("llama.attention.head_count_kv", Meta::U32(2)),
            ("llama.context_length", Meta::U32(16)),
        ];
        if let Some((key, v)) = replace {
            for m in meta.iter_mut().filter(|m| m.0 == key) {
                m.1 = Meta::U32(v);
            }
        }
        let t = |name: &'static str, dims: Vec<u64>| {
            let n = dims.iter().product();
            (name, dims, GgmlType::F32, f32s(n))
        };
        let tensors = vec![
            t("token_embd.weight", vec![dim, vocab]),
            t("output_norm.weight", vec![dim]),
            t("blk.0.attn_norm.weight", vec![dim]),
            t("blk.0.attn_q.weight", vec![dim, dim]),
            t("blk.0.attn_k.weight", vec![dim, dim]),
            t("blk.0.attn_v.weight", vec![dim, dim]),
            t("blk.0.attn_output.weight", vec![dim, dim]),
            t("blk.0.ffn_norm.weight", vec![dim]),
            t("blk.0.ffn_gate.weight", vec![dim, ffn]),
            t("blk.0.ffn_up.weight", vec![dim, ffn]),
            t("blk.0.ffn_down.weight", vec![ffn, dim]),
        ];
        write(&meta, &tensors)
    }

    fn load(bytes: &[u8], opts: &CpuOptions) -> Result<CpuBackend, CpuError> {
        let dir = std::env::temp_dir().join(format!("llama-tpu-tiny-{}-{}", std::process::id(), fastrand::u64(..)));
        std::fs::write(&dir, bytes).unwrap();
        let r = CpuBackend::load(&dir, opts);
        let _ = std::fs::remove_file(&dir);
        r
    }

    #[test]
    fn the_tiny_model_runs() {
        let mut b = load(
            &tiny(None),
            &CpuOptions {
                threads: 2,
                ..CpuOptions::default()
            },
        )
        .unwrap();
        assert_eq!(b.info().context_length, 16);
        assert!(matches!(b.prefill(&[1, 2, 3], 0), Ok(Next::Logits(l)) if l.len() == 8));
        assert!(matches!(b.decode(9, 3), Err(BackendError::BadToken(9))));
        assert!(matches!(b.decode(1, 16), Err(BackendError::ContextOverflow { .. })));
    }

    #[test]
    fn extreme_metadata_is_an_error_never_a_panic() {
        for key in [
            "llama.block_count",
            "llama.embedding_length",
            "llama.feed_forward_length",
            "llama.attention.head_count",
            "llama.attention.head_count_kv",
            "llama.context_length",
        ] {
            for v in [0, 1, 3, 7, 4096, u32::MAX] {
                // Whatever the value, loading returns (Ok only where the file is consistent).
                let _ = load(&tiny(Some((key, v))), &CpuOptions::default());
            }
        }
        assert!(load(&tiny(Some(("llama.block_count", u32::MAX))), &CpuOptions::default()).is_err());
    }

    #[test]
    fn oversized_context_is_refused_clearly() {
        let opts = CpuOptions {
            context: Some(1 << 40),
            ..CpuOptions::default()
        };
        let e = load(&tiny(None), &opts).err().expect("refused").to_string();
        assert!(e.contains("longer than the model's 16"), "{e}");
    }
}
