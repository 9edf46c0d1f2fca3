//! The Llama forward pass on the BM1684X: the bmodel contract's prefill and decode sequence
//! over a loaded bmodel, with no device-to-device copy of ours on the way.
//!
//! Every net is launched on tensors over memory this backend owns, made once at load: token
//! ids, a table of positions `0..S` (a prompt's positions are a window of it), the causal
//! prefill mask (written once), the decode mask (one cell changes per token), two hidden-state
//! buffers the layers use in turn (each block reads one and writes the other), and per layer
//! a K and a V cache of S rows. A block's K/V outputs are tensors that point into the cache at
//! the token's row, so the chip writes them in place; lm_head reads the prompt's last row
//! where the last block left it. Nothing of ours lives in a net's own I/O memory, which in the
//! default address mode lies in the activation area every net shares, except the KV cache of a
//! bmodel whose decode blocks are io_alone: there it stays in their own history inputs, which
//! saves the runtime a copy of the whole history per launch.
//!
//! One exception, measured on the simulator: `block_kv_N` (bmodels built with
//! `--use_block_with_kv`) reads its history only at the address it was compiled for, because
//! its attention joins history and chunk in place behind it; a continued turn on such a
//! bmodel copies the history there, two device-to-device copies per layer per chunk, as the
//! vendor's demo does. Decoding never copies.
//!
//! Per decoded token the host writes the token id, its position and the one mask cell that
//! changes, and reads the token (on-chip heads, token-returning lm_head), the sampling head's
//! candidates, or the logits. The runtime moves a static net's inputs and outputs between our
//! memory and the addresses it was compiled for inside each launch; that is not visible here.
//!
//! Slots: a bmodel whose decode blocks are io_alone holds several conversations, each with
//! K and V caches of its own (as many as device memory holds beside the weights, up to four).
//! The launches always read and write the working caches (the blocks' own history inputs):
//! pointing a launch at another buffer was measured on the simulator to disturb what those
//! inputs held (the runtime stages a static net's inputs at its compiled addresses). So a slot's
//! turn brings its conversation into the working caches first: the leaving slot's new rows are
//! saved to its own buffers and the coming slot's rows are loaded, two device copies per layer
//! each way, counted like every copy of ours. A slot that keeps its turn (one conversation at
//! a time, the common case) copies nothing. What the slots share (ids, hidden states, masks,
//! the sampling head's settings and penalty window) is rewritten when another slot's turn
//! comes. The slots take turns, one launch group each per engine step: fair, not faster (a
//! batched decode needs `block_cache` nets compiled with a batch; the converter does not build
//! them for llama). A bmodel whose decode blocks are in the default address mode has its history
//! inputs in the activation area every net shares, so the runtime copies a cache in at every
//! launch: several slots are offered only where the cache is read in place, and such a
//! bmodel holds one.
//!
//! On a multi-chip bmodel every device has its own set of these buffers and each net's group
//! of tensors for a device points at that device's set; lm_head and the heads run on the
//! first. (The simulator has one chip: that path is argued, not tested.)

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::contract::{self, Embedding, LlamaLayout, LmHeadOutput, Prefill, SampleHead};
use super::device::{Device, DeviceBuffer, Traffic};
use super::ffi::{DataType, DeviceMem};
use super::plan::{self, Plan, Route};
use super::runtime::{Launch, Loaded};
use super::table::EmbeddingTable;
use crate::backend::{check_spans, Backend, BackendError, BackendInfo, Next, Span};
use crate::sampler::SamplerConfig;

/// How to open a bmodel.
#[derive(Debug, Clone, Default)]
pub struct SophonOptions {
    /// Folder of libbmrt/libbmlib (default: /opt/sophon/libsophon-current/lib, then the
    /// loader's path).
    pub lib_dir: Option<PathBuf>,
    /// Device indices (empty: device 0).
    pub devices: Vec<usize>,
    /// Vocabulary size, needed only when lm_head returns a token instead of logits.
    pub vocab_hint: Option<usize>,
    /// The embedding table of a bmodel without embedding nets (default: the vendor's names
    /// beside the bmodel, see [`super::table::TABLE_NAMES`]).
    pub embedding_table: Option<PathBuf>,
    /// KV caches (conversations kept at once); `None`: as many as device memory holds beside
    /// the weights, up to [`DEFAULT_SLOTS`]. More than one needs io_alone decode blocks.
    pub slots: Option<usize>,
}

/// Slots when not told: four conversations at once, if device memory holds them.
pub const DEFAULT_SLOTS: usize = 4;

/// Why the backend could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SophonError {
    /// libbmrt/libbmlib could not be loaded.
    #[error("{0}")]
    Runtime(String),
    /// A device or runtime call failed (no device, out of memory, a file that does not load).
    #[error(transparent)]
    Device(#[from] BackendError),
    /// The bmodel is not a Llama of the contract, or uses what this backend does not support.
    #[error(transparent)]
    Contract(#[from] contract::ContractError),
    /// The slots asked for cannot be had (the numbers say why).
    #[error("{0}")]
    Slots(String),
}

/// The additive attention mask's "minus infinity" in the mask's type, as the vendor's demos
/// write it: -10000 (f16 0xF0E2; bf16 0xC61C is -9984, the nearest).
fn masked(dtype: DataType) -> &'static [u8] {
    const F16: [u8; 2] = 0xF0E2u16.to_le_bytes();
    const BF16: [u8; 2] = 0xC61Cu16.to_le_bytes();
    const F32: [u8; 4] = (-10000.0f32).to_le_bytes();
    match dtype {
        DataType::Bf16 => &BF16,
        DataType::F32 => &F32,
        _ => &F16,
    }
}

/// Candidates the vendor's sampling heads always keep, whatever top_p says.
const HEAD_KEEPS: usize = 5;

/// The top_p written to a sampling head: above any cumulative probability, so the head keeps
/// every candidate and the host makes the request's cut.
pub const HEAD_TOP_P_OFF: f32 = 2.0;

/// What picks the next token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Picker {
    /// The host samples from the logits.
    Host,
    /// lm_head itself returns the token (compiled with a top-1).
    LmHead,
    /// greedy_head.
    Greedy,
    /// The sampling head; the host draws from its candidates.
    Sample,
}

/// One device's buffers (see the module documentation).
struct DeviceState {
    /// A prompt launch's token ids (`max_input` i32; ids past the prompt are stale but valid).
    ids: DeviceBuffer,
    /// The decoded token's id.
    token: DeviceBuffer,
    /// `0..S` as i32, written once.
    positions: DeviceBuffer,
    /// The decoded token's position.
    position: DeviceBuffer,
    /// `max_input` x `max_input` causal mask, written once (static prefill). Rows past a
    /// prompt are causal too: they compute finite values nobody attends to.
    _prefill_mask: Option<DeviceBuffer>,
    /// S + 1 cells: zeros on `[0, pos)`, masked on `[pos, kv)`, zero at `kv` (the token
    /// itself) for the decode stage of history length `kv`.
    decode_mask: DeviceBuffer,
    /// Hidden states, `max_input` rows each; block `i` reads `hidden[i % 2]`.
    hidden: [DeviceBuffer; 2],
    /// The K and V caches the launches read and write: the decode blocks' own history
    /// inputs (io_alone), else buffers of ours. They hold the resident slot's conversation.
    work: KvSet,
    /// With several slots, every slot's caches while it is not resident.
    stores: Vec<KvSet>,
    /// Per layer: `block_kv_N`'s own history inputs (K, V), on bmodels with history.
    history_inputs: Vec<[DeviceMem; 2]>,
    /// Per layer: the dynamic prefill nets' own K and V outputs (`block_N`'s, then
    /// `block_kv_N`'s), where a chunk too short for the runtime's check of a cache slice
    /// is written before it is copied into the cache.
    prefill_outputs: Vec<[DeviceMem; 2]>,
    history_outputs: Vec<[DeviceMem; 2]>,
}

/// One slot's K and V caches on one device, per layer S rows each.
struct KvSet {
    k: Vec<DeviceMem>,
    v: Vec<DeviceMem>,
    /// The buffers this backend allocated (none for slot 0 when the decode nets hold it).
    _owned: Vec<DeviceBuffer>,
}

/// What a slot's conversation keeps on the host while other slots run.
struct SlotState {
    /// Tokens by position, as its cache holds them.
    history: Vec<u32>,
    picker: Picker,
    rng: fastrand::Rng,
    /// Its request's settings, written to the sampling head when it runs.
    sampling: SamplerConfig,
}

/// The sampling head's buffers and the penalty window (on the first device).
struct SampleState {
    head: SampleHead,
    /// The ids to penalize: a ring of the last `n` tokens (slot = position mod n); a static
    /// head's longer input is padded with a token of the window.
    ids: DeviceBuffer,
    /// penalty, temperature, top_p, top_k: 4 bytes each.
    settings: DeviceBuffer,
    probs: DeviceBuffer,
    candidates: DeviceBuffer,
    /// Ring slots (repeat_last_n, at most the ids input's length).
    ring: usize,
    /// Candidates valid per launch (the top_k written; all of them for a head without one).
    top_k: usize,
    /// What the host finishes on them: the request's top_k (at most `top_k`), top_p, min_p.
    keep_k: usize,
    top_p: f32,
    min_p: f32,
    /// Candidates kept after the host's cut, at the last launch.
    kept: usize,
    /// The ring on the device holds the window ending at this position.
    synced: Option<usize>,
    /// Tokens in the ring.
    filled: usize,
    /// Position of the token the padding repeats.
    fill_pos: usize,
}

/// The nets, prepared for launching on the buffers above.
struct Nets {
    /// The embedding nets (none: the host gathers rows of the table).
    embedding: Option<Launch>,
    embedding_cache: Option<Launch>,
    /// Devices the embedding nets run on: all, or the first only (then the rows are carried
    /// to the others through the host).
    embedding_devices: usize,
    blocks: Vec<Launch>,
    /// `block_kv_N` (bmodels with history).
    with_history: Vec<Launch>,
    caches: Vec<Launch>,
    lm_head: Launch,
    greedy: Option<Launch>,
    sample: Option<Launch>,
}

/// Head buffers on the first device.
struct HeadState {
    /// lm_head's output: logits (V x f32) or a token.
    logits: DeviceBuffer,
    /// greedy_head's token.
    token: DeviceBuffer,
}

/// A Llama bmodel resident on a BM1684X.
pub struct SophonBackend {
    info: BackendInfo,
    layout: LlamaLayout,
    nets: Nets,
    devs: Vec<DeviceState>,
    heads: HeadState,
    sample: Option<SampleState>,
    /// The embedding table (bmodels without embedding nets).
    table: Option<EmbeddingTable>,
    /// The slot whose request runs now: `picker`, `rng`, `history` and the sampling head's
    /// settings and window are its; the other slots' wait in `slots`.
    slot: usize,
    /// The slot whose conversation the working caches hold ([`DeviceState::work`]), its rows
    /// written there, and how many of those (from the start) its store holds too.
    resident: usize,
    work_rows: usize,
    saved_rows: usize,
    slots: Vec<SlotState>,
    picker: Picker,
    rng: fastrand::Rng,
    /// Tokens by position, as the cache holds them (for a re-prefill and the penalty window).
    history: Vec<u32>,
    /// The decode mask's current layout: (history length of its stage, zeros before).
    mask_state: Option<(usize, usize)>,
    /// Row lm_head reads next, in the last block's output.
    last_row: usize,
    /// Position of the token whose logits lm_head computes next.
    current: usize,
    /// How the last prompt went through the chip.
    last_plan: Option<Plan>,
    /// Host scratch, sized at load.
    bytes: Vec<u8>,
    logits: Vec<f32>,
    /// Read lm_head's logits back before a head runs (`record_logits`; for tests).
    record_logits: bool,
    probs: Vec<f32>,
    candidates: Vec<u32>,
    /// Dropped after the prepared nets and buffers above: the context, then the devices.
    loaded: Loaded,
}

impl SophonBackend {
    /// Loads the runtime, opens the device and loads `path`, checking the contract.
    ///
    /// # Errors
    /// No runtime libraries, no device, a file that does not load or does not fit.
    pub fn open(path: &Path, opts: &SophonOptions) -> Result<SophonBackend, SophonError> {
        let rt = Arc::new(
            super::ffi::Runtime::load(opts.lib_dir.as_deref()).map_err(|e| SophonError::Runtime(e.to_string()))?,
        );
        let devices = if opts.devices.is_empty() {
            vec![0]
        } else {
            opts.devices.clone()
        };
        let opened = devices
            .iter()
            .map(|&d| Device::open(Arc::clone(&rt), d).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let loaded = Loaded::load_on(opened.clone(), path)?;
        let layout = contract::check(loaded.nets())?;
        if layout.devices != devices.len() {
            return Err(contract::ContractError(format!(
                "the bmodel is compiled for {} device(s), but {} given (--devices)",
                layout.devices,
                devices.len()
            ))
            .into());
        }
        let vocab = match layout.lm_head {
            LmHeadOutput::Logits(v) => v,
            LmHeadOutput::Token => opts.vocab_hint.unwrap_or(0),
        };
        let mut nets = Nets {
            embedding: match &layout.embedding {
                Embedding::Nets {
                    prefill, devices: 1, ..
                } => Some(loaded.prepare(&prefill.net, prefill.stage)?),
                Embedding::Nets { prefill, .. } => Some(loaded.prepare_spanning(&prefill.net, prefill.stage)?),
                Embedding::Table => None,
            },
            embedding_cache: match &layout.embedding {
                Embedding::Nets { decode, devices: 1, .. } => Some(loaded.prepare(&decode.net, decode.stage)?),
                Embedding::Nets { decode, .. } => Some(loaded.prepare_spanning(&decode.net, decode.stage)?),
                Embedding::Table => None,
            },
            embedding_devices: match layout.embedding {
                Embedding::Nets { devices, .. } => devices,
                Embedding::Table => 0,
            },
            blocks: (0..layout.layers)
                .map(|i| loaded.prepare_spanning(&format!("block_{i}"), 0))
                .collect::<Result<_, _>>()?,
            with_history: if layout.prefill == Prefill::WithHistory {
                (0..layout.layers)
                    .map(|i| loaded.prepare_spanning(&format!("block_kv_{i}"), 0))
                    .collect::<Result<_, _>>()?
            } else {
                Vec::new()
            },
            caches: (0..layout.layers)
                .map(|i| loaded.prepare_spanning(&format!("block_cache_{i}"), 0))
                .collect::<Result<_, _>>()?,
            lm_head: loaded.prepare("lm_head", 0)?,
            greedy: if layout.greedy_head {
                Some(loaded.prepare("greedy_head", 0)?)
            } else {
                None
            },
            sample: match &layout.sample_head {
                Some(h) => Some(loaded.prepare(&h.net, 0)?),
                None => None,
            },
        };
        let table = match layout.embedding {
            Embedding::Table => Some(
                EmbeddingTable::open(
                    opts.embedding_table.as_deref(),
                    path,
                    vocab,
                    layout.hidden * layout.hidden_dtype.size(),
                )
                .map_err(contract::ContractError)?,
            ),
            Embedding::Nets { .. } => None,
        };
        let mut devs = opened
            .iter()
            .enumerate()
            .map(|(d, dev)| DeviceState::new(dev, d, &layout, &nets))
            .collect::<Result<Vec<_>, _>>()?;
        let slots = add_slots(&opened, &mut devs, &layout, opts.slots)?;
        let heads = HeadState {
            logits: opened[0].alloc(vocab.max(1) * 4)?,
            token: opened[0].alloc(4)?,
        };
        let sample = match &layout.sample_head {
            Some(h) => Some(SampleState::new(&opened[0], h.clone())?),
            None => None,
        };
        bind(&mut nets, &layout, &devs, &heads, sample.as_ref());

        let s = layout.seq_len;
        let row = layout.kv_heads * layout.head_dim * layout.kv_dtype.size();
        let kv_bytes = (slots * layout.devices * layout.layers * 2 * s * row) as u64;
        let info = BackendInfo {
            backend: "sophon",
            model: format!(
                "{} ({} layers, hidden {}, {} KV heads x {}, {}, devices {:?})",
                path.file_name()
                    .map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned()),
                layout.layers,
                layout.hidden,
                layout.kv_heads,
                layout.head_dim,
                match layout.prefill {
                    Prefill::Static(_) => "static prefill",
                    Prefill::Dynamic => "dynamic prefill",
                    Prefill::WithHistory => "prefill with history",
                },
                devices
            ),
            context_length: s,
            vocab_size: vocab,
            dtype: format!(
                "{} activations, {} KV",
                dtype_name(layout.hidden_dtype),
                dtype_name(layout.kv_dtype)
            ),
            weight_bytes: std::fs::metadata(path).map_or(0, |m| m.len()),
            kv_cache_bytes: kv_bytes,
            host_state_bytes: 0,
            rearranged_weight_bytes: 0,
            max_batch: layout.max_input,
            slots,
        };
        let n_candidates = layout.sample_head.as_ref().map_or(0, |h| h.candidates);
        let ids_len = layout.sample_head.as_ref().map_or(0, |h| h.ids_len);
        let scratch = [
            layout.max_input * 4,
            layout.max_input * layout.hidden * layout.hidden_dtype.size(),
            (s + 1) * layout.mask_dtype.size(),
            vocab * 4,
            ids_len * 4,
            n_candidates * 4,
        ]
        .into_iter()
        .max()
        .unwrap_or(0);
        let picker = if layout.lm_head == LmHeadOutput::Token {
            Picker::LmHead
        } else {
            Picker::Host
        };
        Ok(SophonBackend {
            picker,
            info,
            nets,
            devs,
            heads,
            sample,
            table,
            rng: fastrand::Rng::with_seed(0),
            history: vec![0; s],
            slot: 0,
            resident: 0,
            work_rows: 0,
            saved_rows: 0,
            slots: (0..slots)
                .map(|_| SlotState {
                    history: vec![0; s],
                    picker,
                    rng: fastrand::Rng::with_seed(0),
                    sampling: SamplerConfig::default(),
                })
                .collect(),
            mask_state: None,
            last_row: 0,
            current: 0,
            last_plan: None,
            bytes: vec![0; scratch],
            logits: vec![0.0; vocab],
            record_logits: false,
            probs: vec![0.0; n_candidates],
            candidates: vec![0; n_candidates],
            layout,
            loaded,
        })
    }

    /// The bmodel's layout.
    pub fn layout(&self) -> &LlamaLayout {
        &self.layout
    }

    /// What picks the tokens of the current request.
    pub fn token_picker(&self) -> Picker {
        self.picker
    }

    /// How the last prompt went through the chip (route, launches, positions computed).
    pub fn last_plan(&self) -> Option<Plan> {
        self.last_plan
    }

    /// From now on, read lm_head's logits back at every step before an on-chip head runs
    /// (a device-to-host copy of the vocabulary per token: for tests and diagnostics, which
    /// hold a head to a model of its math on exactly what it was given). Reading the logits
    /// buffer after the head ran is not the same: nothing promises that a compiled head leaves
    /// its input as it found it (one CI run's mismatch between the chip's head and the numpy
    /// model fitted that, though it was not reproduced).
    pub fn record_logits(&mut self) {
        self.record_logits = true;
    }

    /// The logits recorded before the head of the last step ran (see `record_logits`).
    pub fn recorded_logits(&self) -> &[f32] {
        &self.logits
    }

    /// The logits lm_head left on the device at the last step, read back (for tests and
    /// diagnostics). Empty when lm_head returns a token.
    ///
    /// # Errors
    /// The read fails.
    pub fn read_logits(&mut self) -> Result<&[f32], BackendError> {
        let v = self.logits.len();
        self.loaded
            .device()
            .read(self.heads.logits.mem(), &mut self.bytes[..v * 4])?;
        for (l, b) in self.logits.iter_mut().zip(self.bytes.chunks_exact(4)) {
            *l = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        Ok(&self.logits)
    }

    /// The sampling head's last answer: the valid candidates' probabilities and ids.
    pub fn candidates(&self) -> (&[f32], &[u32]) {
        let k = self.sample.as_ref().map_or(0, |s| s.top_k);
        (&self.probs[..k], &self.candidates[..k])
    }

    /// How many of those the host's top_k / top_p / min_p cut kept at the last token (the
    /// draw was among them).
    pub fn kept_candidates(&self) -> usize {
        self.sample.as_ref().map_or(0, |s| s.kept)
    }

    /// The ids the sampling head penalized at its last launch, as it was given them (the
    /// window of the last `repeat_last_n` tokens, and a static head's padding).
    ///
    /// # Errors
    /// The read fails.
    pub fn penalized_ids(&mut self) -> Result<Vec<u32>, BackendError> {
        let Some(s) = self.sample.as_ref() else {
            return Ok(Vec::new());
        };
        let n = if s.head.dynamic { s.filled } else { s.head.ids_len };
        let mut raw = vec![0u8; n * 4];
        self.loaded.device().read(s.ids.mem(), &mut raw)?;
        Ok(raw
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u32)
            .collect())
    }

    /// Writes the same bytes into one buffer of every device.
    fn write_all(
        &self,
        pick: impl Fn(&DeviceState) -> DeviceMem,
        offset: usize,
        data: &[u8],
    ) -> Result<(), BackendError> {
        for (dev, state) in self.loaded.devices().iter().zip(&self.devs) {
            dev.write_at(pick(state), offset, data)?;
        }
        Ok(())
    }

    /// One launch of the prefill nets: the `n` tokens (at most `max_input`) of `history` at
    /// positions `start..`, after `start` rows of history (only on bmodels with `block_kv_N`
    /// nets, or `start == 0`). Leaves the last token's row for lm_head.
    fn prefill_launch(&mut self, start: usize, n: usize) -> Result<(), BackendError> {
        let tokens = &self.history[start..start + n];
        let l = &self.layout;
        let max_input = l.max_input;
        let (layers, dynamic) = (l.layers, !matches!(l.prefill, Prefill::Static(_)));
        let hidden_row = l.hidden * l.hidden_dtype.size();
        let kv_row = l.kv_heads * l.head_dim * l.kv_dtype.size();
        let (kvh, hd, h) = (l.kv_heads as i32, l.head_dim as i32, l.hidden as i32);
        let in_place = (n * kv_row).div_ceil(4096) * 4096 >= l.max_input * kv_row;
        let own_outputs = |s: &DeviceState, layer: usize| {
            let list = if start > 0 {
                &s.history_outputs
            } else {
                &s.prefill_outputs
            };
            list.get(layer).copied().unwrap_or_default()
        };
        match (&self.table, self.nets.embedding.as_mut()) {
            (Some(table), _) => {
                let rows = &mut self.bytes[..n * hidden_row];
                table.gather(tokens, rows).map_err(BackendError::BadToken)?;
                for (dev, state) in self.loaded.devices().iter().zip(&self.devs) {
                    dev.write(state.hidden[0].mem(), rows)?;
                }
            }
            (None, Some(net)) => {
                let ids = &mut self.bytes[..n * 4];
                for (cell, &t) in ids.chunks_exact_mut(4).zip(tokens) {
                    cell.copy_from_slice(&(t as i32).to_le_bytes());
                }
                for (dev, state) in self.loaded.devices().iter().zip(&self.devs) {
                    dev.write(state.ids.mem(), &self.bytes[..n * 4])?;
                }
                self.loaded.launch(net)?;
                self.spread_embedding(n * hidden_row)?;
            }
            (None, None) => return Err(missing("embedding")),
        }
        for layer in 0..layers {
            let net = if start > 0 {
                &mut self.nets.with_history[layer]
            } else {
                &mut self.nets.blocks[layer]
            };
            for (d, state) in self.devs.iter().enumerate() {
                let (k, v) = (state.work.k[layer], state.work.v[layer]);
                if !dynamic {
                    // A static prefill writes its `max_input` rows from position 0.
                    net.set_output(1, d, k.slice(0, max_input * kv_row));
                    net.set_output(2, d, v.slice(0, max_input * kv_row));
                }
                if dynamic {
                    set(
                        net.input(0, d),
                        state.hidden[layer % 2].mem().slice(0, n * hidden_row),
                        &[1, n as i32, h],
                    );
                    set(
                        net.input(1, d),
                        state.positions.mem().slice(start * 4, n * 4),
                        &[1, n as i32],
                    );
                    if start > 0 {
                        // block_kv_N reads its history only where it was compiled to: the
                        // attention concatenates history and chunk in place behind it (as
                        // the vendor's demo does, the history is copied there).
                        let [hk, hv] = state.history_inputs[layer];
                        let dev = &self.loaded.devices()[d];
                        dev.copy(hk, 0, k, 0, start * kv_row)?;
                        dev.copy(hv, 0, v, 0, start * kv_row)?;
                        let past = [1, start as i32, kvh, hd];
                        set(net.input(2, d), hk.slice(0, start * kv_row), &past);
                        set(net.input(3, d), hv.slice(0, start * kv_row), &past);
                    }
                    // A dynamic net writes its real rows, n, at the prompt's place in the
                    // cache; but the runtime wants an output's memory, rounded up to 4 KiB,
                    // to hold the compiled (longest) shape: a shorter chunk goes to the
                    // net's own outputs and is copied into the cache after the launch.
                    if in_place {
                        net.set_output(1, d, k.slice(start * kv_row, n * kv_row));
                        net.set_output(2, d, v.slice(start * kv_row, n * kv_row));
                    } else {
                        let [ok, ov] = own_outputs(state, layer);
                        net.set_output(1, d, Some(ok));
                        net.set_output(2, d, Some(ov));
                    }
                }
            }
            self.loaded.launch(net)?;
            if dynamic && !in_place {
                for (dev, state) in self.loaded.devices().iter().zip(&self.devs) {
                    let [ok, ov] = own_outputs(state, layer);
                    dev.copy(state.work.k[layer], start * kv_row, ok, 0, n * kv_row)?;
                    dev.copy(state.work.v[layer], start * kv_row, ov, 0, n * kv_row)?;
                }
            }
        }
        self.last_row = n - 1;
        Ok(())
    }

    /// After an embedding net compiled for one device ran on a multi-device bmodel, carries
    /// its `bytes` of rows to the other devices' block inputs, through the host.
    fn spread_embedding(&mut self, bytes: usize) -> Result<(), BackendError> {
        if self.nets.embedding_devices != 1 || self.devs.len() < 2 {
            return Ok(());
        }
        let devices = self.loaded.devices();
        let rows = &mut self.bytes[..bytes];
        devices[0].read(self.devs[0].hidden[0].mem(), rows)?;
        for (dev, state) in devices.iter().zip(&self.devs).skip(1) {
            dev.write(state.hidden[0].mem(), rows)?;
        }
        Ok(())
    }

    /// One token at position `pos`, attending to the cache before it.
    fn decode_step(&mut self, token: u32, pos: usize) -> Result<(), BackendError> {
        let l = &self.layout;
        let hidden_row = l.hidden * l.hidden_dtype.size();
        let kv_row = l.kv_heads * l.head_dim * l.kv_dtype.size();
        let cell = l.mask_dtype.size();
        let (kvh, hd) = (l.kv_heads as i32, l.head_dim as i32);
        // The shortest decode stage that holds the history and the token.
        let kv = l
            .decode_stages
            .iter()
            .copied()
            .filter(|&s| s > pos)
            .min()
            .unwrap_or(l.seq_len);
        if self.table.is_none() {
            self.write_all(|s| s.token.mem(), 0, &(token as i32).to_le_bytes())?;
        }
        self.write_all(|s| s.position.mem(), 0, &(pos as i32).to_le_bytes())?;
        let minus = masked(l.mask_dtype);
        match self.mask_state {
            Some((k, zeros)) if k == kv && zeros == pos => {}
            Some((k, zeros)) if k == kv && zeros + 1 == pos => {
                self.write_all(|s| s.decode_mask.mem(), (pos - 1) * cell, &[0u8; 4][..cell])?;
            }
            _ => {
                let mask = &mut self.bytes[..(kv + 1) * cell];
                for (j, c) in mask.chunks_exact_mut(cell).enumerate() {
                    if j < pos || j == kv {
                        c.fill(0);
                    } else {
                        c.copy_from_slice(minus);
                    }
                }
                for (dev, state) in self.loaded.devices().iter().zip(&self.devs) {
                    dev.write(state.decode_mask.mem(), &self.bytes[..(kv + 1) * cell])?;
                }
            }
        }
        self.mask_state = Some((kv, pos));
        match (&self.table, self.nets.embedding_cache.as_mut()) {
            (Some(table), _) => {
                let row = &mut self.bytes[..table.row_bytes()];
                table.gather(&[token], row).map_err(BackendError::BadToken)?;
                for (dev, state) in self.loaded.devices().iter().zip(&self.devs) {
                    dev.write(state.hidden[0].mem(), row)?;
                }
            }
            (None, Some(net)) => {
                self.loaded.launch(net)?;
                self.spread_embedding(hidden_row)?;
            }
            (None, None) => return Err(missing("embedding_cache")),
        }
        let l = &self.layout;
        for layer in 0..l.layers {
            let net = &mut self.nets.caches[layer];
            for (d, state) in self.devs.iter().enumerate() {
                let (k, v) = (state.work.k[layer], state.work.v[layer]);
                set(
                    net.input(2, d),
                    state.decode_mask.mem().slice(0, (kv + 1) * cell),
                    &[1, 1, 1, kv as i32 + 1],
                );
                let past = [1, kv as i32, kvh, hd];
                set(net.input(3, d), k.slice(0, kv * kv_row), &past);
                set(net.input(4, d), v.slice(0, kv * kv_row), &past);
                net.set_output(1, d, k.slice(pos * kv_row, kv_row));
                net.set_output(2, d, v.slice(pos * kv_row, kv_row));
            }
            self.loaded.launch(net)?;
        }
        self.last_row = 0;
        Ok(())
    }

    /// lm_head on the last row, then the picker; waits for the chip and reads the result.
    fn head(&mut self) -> Result<Next<'_>, BackendError> {
        let l = &self.layout;
        let hidden_row = l.hidden * l.hidden_dtype.size();
        let last = &self.devs[0].hidden[l.layers % 2];
        if let Some(t) = self.nets.lm_head.input(0, 0) {
            t.device_mem = last
                .mem()
                .slice(self.last_row * hidden_row, hidden_row)
                .unwrap_or_default();
        }
        self.loaded.launch(&mut self.nets.lm_head)?;
        let v = self.logits.len();
        if self.record_logits && matches!(self.picker, Picker::Greedy | Picker::Sample) {
            self.loaded.finish()?;
            self.read_logits()?;
        }
        match self.picker {
            Picker::LmHead => {
                self.loaded.finish()?;
                let mem = self.heads.logits.mem();
                self.read_token(mem)
            }
            Picker::Greedy => {
                let Some(greedy) = self.nets.greedy.as_mut() else {
                    return Err(missing("greedy_head"));
                };
                self.loaded.launch(greedy)?;
                self.loaded.finish()?;
                let mem = self.heads.token.mem();
                self.read_token(mem)
            }
            Picker::Sample => self.sample_on_chip(),
            Picker::Host => {
                self.loaded.finish()?;
                self.loaded
                    .device()
                    .read(self.heads.logits.mem(), &mut self.bytes[..v * 4])?;
                for (l, b) in self.logits.iter_mut().zip(self.bytes.chunks_exact(4)) {
                    *l = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
                Ok(Next::Logits(&self.logits))
            }
        }
    }

    /// The sampling head on the logits lm_head left (its penalty window already brought up
    /// to the current position); the host draws among the valid candidates.
    fn sample_on_chip(&mut self) -> Result<Next<'_>, BackendError> {
        let (Some(state), Some(net)) = (self.sample.as_mut(), self.nets.sample.as_mut()) else {
            return Err(missing("sample_head"));
        };
        let dev = self.loaded.device();
        if state.head.dynamic {
            let w = state.filled;
            if let Some(t) = net.input(state.head.ids, 0) {
                t.device_mem = state.ids.mem().slice(0, w * 4).unwrap_or_default();
                t.shape = super::ffi::Shape::from_dims(&[1, w as i32]);
            }
        }
        self.loaded.launch(net)?;
        self.loaded.finish()?;
        let k = state.top_k;
        dev.read(state.probs.mem(), &mut self.bytes[..k * 4])?;
        for (p, b) in self.probs[..k].iter_mut().zip(self.bytes[..k * 4].chunks_exact(4)) {
            *p = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        dev.read(state.candidates.mem(), &mut self.bytes[..k * 4])?;
        let vocab = self.info.vocab_size;
        for (t, b) in self.candidates[..k].iter_mut().zip(self.bytes[..k * 4].chunks_exact(4)) {
            let id = i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            if id < 0 || id as usize >= vocab {
                return Err(BackendError::Device {
                    call: "bmrt_launch_tensor_ex",
                    detail: format!("the sampling head returned token {id}, outside the vocabulary"),
                });
            }
            *t = id as u32;
        }
        let keep_k = state.keep_k.min(k);
        let total = self.probs[..keep_k].iter().sum();
        let kept = crate::sampler::nucleus(self.probs[..keep_k].iter().copied(), total, state.top_p, state.min_p);
        state.kept = kept;
        Ok(Next::Token(draw(
            &self.probs[..kept],
            &self.candidates[..kept],
            &mut self.rng,
        )))
    }

    fn read_token(&mut self, mem: DeviceMem) -> Result<Next<'_>, BackendError> {
        let mut b = [0u8; 4];
        self.loaded.device().read(mem, &mut b)?;
        let t = i32::from_le_bytes(b);
        if t < 0 || (self.info.vocab_size > 0 && t as usize >= self.info.vocab_size) {
            return Err(BackendError::Device {
                call: "bmrt_launch_tensor_ex",
                detail: format!("the on-chip head returned token {t}, outside the vocabulary"),
            });
        }
        Ok(Next::Token(t as u32))
    }

    /// Brings the sampling head's penalty window up to position `last`, before anything is
    /// launched for it: a copy waits for the launches in flight (see [`Device`]).
    fn sync_sample_window(&mut self, last: usize) -> Result<(), BackendError> {
        match self.sample.as_mut() {
            Some(state) if self.picker == Picker::Sample => {
                state.sync_window(self.loaded.device(), &self.history, last, &mut self.bytes)
            }
            _ => Ok(()),
        }
    }

    fn check_call(&self, tokens: &[u32], start: usize) -> Result<(), BackendError> {
        if tokens.is_empty() {
            return Err(BackendError::Empty);
        }
        let context = self.layout.seq_len;
        if start + tokens.len() > context {
            return Err(BackendError::ContextOverflow {
                pos: start,
                len: tokens.len(),
                context,
            });
        }
        let vocab = self.info.vocab_size;
        match tokens.iter().find(|&&t| vocab > 0 && t as usize >= vocab) {
            Some(&t) => Err(BackendError::BadToken(t)),
            None => Ok(()),
        }
    }
}

fn dtype_name(d: DataType) -> &'static str {
    match d {
        DataType::F32 => "f32",
        DataType::Bf16 => "bf16",
        _ => "f16",
    }
}

/// Whether a sampling head gives exactly what the host sampler would for these settings
/// (the host finishing top_k, top_p and min_p on its candidates): a top_k it returns (0 means
/// the whole vocabulary, more than it returns), a temperature, the repetition window within
/// its ids input, and none of OpenAI's additive penalties (it has no input for them).
pub fn chip_can_sample(head: &SampleHead, cfg: &SamplerConfig) -> bool {
    cfg.temperature >= crate::sampler::GREEDY_BELOW
        && (1..=head.candidates).contains(&cfg.top_k)
        && (cfg.repeat_last_n <= head.ids_len || cfg.repeat_penalty == 1.0)
        && cfg.frequency_penalty == 0.0
        && cfg.presence_penalty == 0.0
}

/// Points a tensor at `mem` with `dims` (a range the contract ruled out leaves an empty
/// descriptor, which the runtime refuses with an error rather than a crash).
fn set(tensor: Option<&mut super::ffi::Tensor>, mem: Option<DeviceMem>, dims: &[i32]) {
    if let Some(t) = tensor {
        t.device_mem = mem.unwrap_or_default();
        t.shape = super::ffi::Shape::from_dims(dims);
    }
}

fn missing(net: &'static str) -> BackendError {
    BackendError::Device {
        call: "bmrt_launch_tensor_ex",
        detail: format!("no {net} net"),
    }
}

/// Draws one candidate with probability proportional to `probs` (non-finite or negative
/// probabilities count as zero; if none is positive, the first candidate).
fn draw(probs: &[f32], candidates: &[u32], rng: &mut fastrand::Rng) -> u32 {
    let weight = |p: f32| if p.is_finite() { p.max(0.0) } else { 0.0 };
    let total: f32 = probs.iter().map(|&p| weight(p)).sum();
    let mut r = rng.f32() * total;
    for (&p, &t) in probs.iter().zip(candidates) {
        r -= weight(p);
        if r <= 0.0 && weight(p) > 0.0 {
            return t;
        }
    }
    candidates.first().copied().unwrap_or(0)
}

impl DeviceState {
    /// Allocates device `d`'s buffers and writes the tables that never change.
    fn new(dev: &Arc<Device>, d: usize, l: &LlamaLayout, nets: &Nets) -> Result<DeviceState, BackendError> {
        let (s, li) = (l.seq_len, l.max_input);
        let positions = dev.alloc(s * 4)?;
        let table: Vec<u8> = (0..s as i32).flat_map(i32::to_le_bytes).collect();
        positions.write(&table)?;
        let prefill_mask = match l.prefill {
            Prefill::Static(dtype) => {
                let cell = dtype.size();
                let buf = dev.alloc(li * li * cell)?;
                let mut mask = vec![0u8; li * li * cell];
                for (index, c) in mask.chunks_exact_mut(cell).enumerate() {
                    if index % li > index / li {
                        c.copy_from_slice(masked(dtype));
                    }
                }
                buf.write(&mask)?;
                Some(buf)
            }
            _ => None,
        };
        let hidden_bytes = li * l.hidden * l.hidden_dtype.size();
        let first = KvSet::new(dev, d, l, l.cache_in_decode_inputs.then_some(nets))?;
        Ok(DeviceState {
            ids: {
                let b = dev.alloc(li * 4)?;
                b.write(&vec![0u8; li * 4])?;
                b
            },
            token: dev.alloc(4)?,
            positions,
            position: dev.alloc(4)?,
            _prefill_mask: prefill_mask,
            decode_mask: dev.alloc((s + 1) * l.mask_dtype.size())?,
            hidden: [dev.alloc(hidden_bytes)?, dev.alloc(hidden_bytes)?],
            work: first,
            stores: Vec::new(),
            history_inputs: nets
                .with_history
                .iter()
                .map(|n| {
                    [
                        n.input_mem(2, d).unwrap_or_default(),
                        n.input_mem(3, d).unwrap_or_default(),
                    ]
                })
                .collect(),
            prefill_outputs: own_kv_outputs(&nets.blocks, d),
            history_outputs: own_kv_outputs(&nets.with_history, d),
        })
    }
}

impl KvSet {
    /// Slot caches on device `d`: the decode nets' own history inputs when `in_nets` is
    /// given (io_alone blocks: the runtime reads them where they are), else buffers of ours.
    fn new(dev: &Arc<Device>, d: usize, l: &LlamaLayout, in_nets: Option<&Nets>) -> Result<KvSet, BackendError> {
        let kv_row = l.kv_heads * l.head_dim * l.kv_dtype.size();
        let bytes = l.seq_len * kv_row;
        let mut owned = Vec::new();
        let (mut k, mut v) = (Vec::new(), Vec::new());
        // The cache starts as zeros: rows not yet written are masked, but must hold finite
        // numbers (a masked weight is exactly 0, and 0 x NaN is NaN).
        let zeros = vec![0u8; bytes];
        for layer in 0..l.layers {
            for (list, input) in [(&mut k, 3), (&mut v, 4)] {
                let mem = match in_nets {
                    Some(nets) => nets.caches[layer].input_mem(input, d).unwrap_or_default(),
                    None => {
                        let buf = dev.alloc(bytes)?;
                        let mem = buf.mem();
                        owned.push(buf);
                        mem
                    }
                };
                dev.write(mem, &zeros)?;
                list.push(mem);
            }
        }
        Ok(KvSet { k, v, _owned: owned })
    }
}

/// Gives every device the caches of the slots beyond the first: `asked`, or as many as device
/// memory holds beside the weights up to [`DEFAULT_SLOTS`]. Returns the slots held.
fn add_slots(
    opened: &[Arc<Device>],
    devs: &mut [DeviceState],
    l: &LlamaLayout,
    asked: Option<usize>,
) -> Result<usize, SophonError> {
    let kv_row = l.kv_heads * l.head_dim * l.kv_dtype.size();
    let per_slot = (l.layers * 2 * l.seq_len * kv_row) as u64;
    let mib = |b: u64| b >> 20;
    if !l.cache_in_decode_inputs {
        // Such a block's history inputs lie in the activation area every net shares: the
        // runtime copies a cache in at every launch. Slots are offered where it reads in place.
        if asked.is_some_and(|n| n > 1) {
            return Err(SophonError::Slots(format!(
                "{} slots asked, but this bmodel's decode blocks are not io_alone (the runtime copies their history in at every launch): it serves one conversation at a time (slots = 1)",
                asked.unwrap_or(1)
            )));
        }
        log::info!("1 slot: this bmodel's decode blocks are not io_alone (the runtime copies their history in at every launch)");
        return Ok(1);
    }
    // What the devices have free now, the weights loaded (libbmlib's `bm_get_stat`, in MiB).
    let free = opened
        .iter()
        .map(|dev| match dev.runtime().device_stat(dev.index()) {
            Ok(super::ffi::StatAnswer::Stat(st)) if st.mem_total > 0 => {
                u64::try_from(st.mem_total.saturating_sub(st.mem_used))
                    .ok()
                    .map(|m| m << 20)
            }
            _ => None,
        })
        .try_fold(u64::MAX, |low, f| f.map(|f| low.min(f)));
    // Every slot has a store of its own beside the working caches.
    let want = match asked {
        Some(n) => n,
        // A tenth of what is free stays for the runtime; without figures, allocation says.
        None => free.map_or(DEFAULT_SLOTS, |f| {
            ((f - f / 10) / per_slot.max(1)).clamp(1, DEFAULT_SLOTS as u64) as usize
        }),
    };
    if want <= 1 {
        return Ok(1);
    }
    let mut held = 0;
    while held < want {
        let mut made = Vec::with_capacity(opened.len());
        for (d, dev) in opened.iter().enumerate() {
            match KvSet::new(dev, d, l, None) {
                Ok(set) => made.push(set),
                Err(e) => {
                    if asked.is_some() {
                        return Err(SophonError::Slots(format!(
                            "{want} slots need {} MiB of KV cache each on every device; device memory held {held} ({e})",
                            mib(per_slot)
                        )));
                    }
                    log::info!("device memory held {held} slots ({e})");
                    break;
                }
            }
        }
        if made.len() < opened.len() {
            break;
        }
        for (state, set) in devs.iter_mut().zip(made) {
            state.stores.push(set);
        }
        held += 1;
    }
    if held < 2 {
        // One store is no use: one slot works in place.
        for state in devs.iter_mut() {
            state.stores.clear();
        }
        held = 1;
    }
    log::info!(
        "{held} slot(s) of {} MiB KV cache each per device ({})",
        mib(per_slot),
        free.map_or_else(
            || "free device memory not reported".into(),
            |f| format!("{} MiB were free", mib(f))
        )
    );
    Ok(held)
}

/// The K and V outputs each net was loaded with, on device `d` (before [`bind`] points them
/// into the cache).
fn own_kv_outputs(nets: &[Launch], d: usize) -> Vec<[DeviceMem; 2]> {
    nets.iter()
        .map(|n| {
            [
                n.output_mem(1, d).unwrap_or_default(),
                n.output_mem(2, d).unwrap_or_default(),
            ]
        })
        .collect()
}

/// Points every net's tensors at the backend's buffers, once; what changes per launch
/// (a prompt's length, the token's cache row, a decode stage's history) is set at launch.
fn bind(nets: &mut Nets, l: &LlamaLayout, devs: &[DeviceState], heads: &HeadState, sample: Option<&SampleState>) {
    let hidden_row = l.hidden * l.hidden_dtype.size();
    let kv_row = l.kv_heads * l.head_dim * l.kv_dtype.size();
    let li = l.max_input;
    let mem = |t: Option<&mut super::ffi::Tensor>, m: Option<DeviceMem>| {
        if let Some(t) = t {
            t.device_mem = m.unwrap_or_default();
        }
    };
    for (d, st) in devs.iter().enumerate() {
        if let Some(net) = nets.embedding.as_mut() {
            mem(net.input(0, d), Some(st.ids.mem()));
            mem(net.output(0, d), Some(st.hidden[0].mem()));
        }
        if let Some(net) = nets.embedding_cache.as_mut() {
            mem(net.input(0, d), Some(st.token.mem()));
            mem(net.output(0, d), st.hidden[0].mem().slice(0, hidden_row));
        }
        for layer in 0..l.layers {
            let (a, b) = (&st.hidden[layer % 2], &st.hidden[(layer + 1) % 2]);
            for net in [Some(&mut nets.blocks[layer]), nets.with_history.get_mut(layer)]
                .into_iter()
                .flatten()
            {
                mem(net.input(0, d), Some(a.mem()));
                mem(net.input(1, d), st.positions.mem().slice(0, li * 4));
                if let Some(mask) = &st._prefill_mask {
                    mem(net.input(2, d), Some(mask.mem()));
                }
                mem(net.output(0, d), Some(b.mem()));
                mem(net.output(1, d), st.work.k[layer].slice(0, li * kv_row));
                mem(net.output(2, d), st.work.v[layer].slice(0, li * kv_row));
            }
            let c = &mut nets.caches[layer];
            mem(c.input(0, d), a.mem().slice(0, hidden_row));
            mem(c.input(1, d), Some(st.position.mem()));
            mem(c.output(0, d), b.mem().slice(0, hidden_row));
        }
    }
    mem(nets.lm_head.output(0, 0), Some(heads.logits.mem()));
    if let Some(g) = nets.greedy.as_mut() {
        mem(g.input(0, 0), Some(heads.logits.mem()));
        mem(g.output(0, 0), Some(heads.token.mem()));
    }
    if let (Some(net), Some(st)) = (nets.sample.as_mut(), sample) {
        let h = &st.head;
        mem(net.input(h.logits, 0), Some(heads.logits.mem()));
        mem(net.input(h.ids, 0), Some(st.ids.mem()));
        for (i, input) in [Some(h.penalty), Some(h.temperature), Some(h.top_p), h.top_k]
            .into_iter()
            .enumerate()
        {
            if let Some(input) = input {
                mem(net.input(input, 0), st.settings.mem().slice(i * 4, 4));
            }
        }
        mem(net.output(h.probs_out, 0), Some(st.probs.mem()));
        mem(net.output(h.ids_out, 0), Some(st.candidates.mem()));
    }
}

impl SampleState {
    fn new(dev: &Arc<Device>, head: SampleHead) -> Result<SampleState, BackendError> {
        let c = head.candidates;
        Ok(SampleState {
            ids: dev.alloc(head.ids_len.max(1) * 4)?,
            settings: dev.alloc(16)?,
            probs: dev.alloc(c * 4)?,
            candidates: dev.alloc(c * 4)?,
            ring: 1,
            top_k: c,
            keep_k: c,
            top_p: 1.0,
            min_p: 0.0,
            kept: 0,
            synced: None,
            filled: 0,
            fill_pos: 0,
            head,
        })
    }

    /// Writes the settings (f32, as the head's inputs are declared; top_k as i32) and sizes
    /// the penalty window. The chip does what needs the whole vocabulary (the penalty, the
    /// best candidates, the temperature, their softmax); its own top-p cut is switched off
    /// (it drops the candidate that crosses top_p and always keeps five), and the host
    /// finishes top_k, top_p and min_p on the candidates exactly as its sampler does.
    fn configure(&mut self, dev: &Device, cfg: &SamplerConfig) -> Result<(), BackendError> {
        let c = self.head.candidates;
        self.keep_k = cfg.top_k.clamp(1, c);
        self.top_k = match self.head.top_k {
            // The converter's head always keeps five: fewer would index past its top-k.
            Some(_) => self.keep_k.max(HEAD_KEEPS).min(c),
            None => c,
        };
        (self.top_p, self.min_p) = (cfg.top_p, cfg.min_p);
        // repeat_last_n 0 turns the penalty off, as on the host.
        let penalty = if cfg.repeat_last_n == 0 {
            1.0
        } else {
            cfg.repeat_penalty
        };
        let mut settings = [0u8; 16];
        settings[0..4].copy_from_slice(&penalty.to_le_bytes());
        settings[4..8].copy_from_slice(&cfg.temperature.to_le_bytes());
        settings[8..12].copy_from_slice(&HEAD_TOP_P_OFF.to_le_bytes());
        settings[12..16].copy_from_slice(&(self.top_k as i32).to_le_bytes());
        let len = if self.head.top_k.is_some() { 16 } else { 12 };
        dev.write(self.settings.mem(), &settings[..len])?;
        let ring = cfg.repeat_last_n.clamp(1, self.head.ids_len.max(1));
        if ring != self.ring {
            self.ring = ring;
            self.synced = None;
        }
        Ok(())
    }

    /// Brings the ring of penalized ids up to position `p` (`history[..=p]` holds the
    /// tokens): one id per decoded token; the whole window after a prompt or a jump.
    fn sync_window(&mut self, dev: &Device, history: &[u32], p: usize, scratch: &mut [u8]) -> Result<(), BackendError> {
        let (n, len) = (self.ring, self.head.ids_len.max(1));
        let padded = !self.head.dynamic;
        let id = |pos: usize| (history.get(pos).copied().unwrap_or(0) as i32).to_le_bytes();
        match self.synced {
            Some(q) if q == p => {}
            Some(q) if q + 1 == p => {
                dev.write_at(self.ids.mem(), (p % n) * 4, &id(p))?;
                self.filled = (self.filled + 1).min(n);
                if padded && p == self.fill_pos + n && len > n {
                    // The token the padding repeats just left the window: repeat the newest.
                    let pad = &mut scratch[..(len - n) * 4];
                    for c in pad.chunks_exact_mut(4) {
                        c.copy_from_slice(&id(p));
                    }
                    dev.write_at(self.ids.mem(), n * 4, pad)?;
                    self.fill_pos = p;
                }
            }
            _ => {
                let w = (p + 1).min(n);
                let end = if padded { len } else { w };
                let buf = &mut scratch[..end * 4];
                for c in buf.chunks_exact_mut(4) {
                    c.copy_from_slice(&id(p));
                }
                for pos in p + 1 - w..=p {
                    buf[(pos % n) * 4..(pos % n) * 4 + 4].copy_from_slice(&id(pos));
                }
                dev.write(self.ids.mem(), buf)?;
                self.filled = w;
                self.fill_pos = p;
            }
        }
        self.synced = Some(p);
        Ok(())
    }
}

impl SophonBackend {
    /// Makes `slot`'s request the one the shared state serves: its history, picker and
    /// random state come out of waiting, the sampling head gets its settings back and its
    /// penalty window is rebuilt from its tokens (one small write each, when slots take
    /// turns). The KV caches need nothing: launches point at the slot's own.
    fn select(&mut self, slot: usize) -> Result<(), BackendError> {
        if slot == self.slot {
            return Ok(());
        }
        if slot >= self.slots.len() {
            return Err(BackendError::BadSpan("no such slot"));
        }
        let leaving = &mut self.slots[self.slot];
        std::mem::swap(&mut leaving.history, &mut self.history);
        leaving.picker = self.picker;
        leaving.rng = self.rng.clone();
        let coming = &mut self.slots[slot];
        std::mem::swap(&mut coming.history, &mut self.history);
        self.picker = coming.picker;
        self.rng = coming.rng.clone();
        self.slot = slot;
        if let Some(s) = self.sample.as_mut() {
            s.synced = None;
            if self.picker == Picker::Sample {
                s.configure(self.loaded.device(), &self.slots[slot].sampling)?;
            }
        }
        Ok(())
    }

    /// Makes `slot`'s conversation, its first `rows` positions, the one the working caches
    /// hold: the leaving slot's rows not yet in its store are saved there, then the coming
    /// slot's are loaded (two device copies per layer each way, on every device). Nothing moves
    /// while one slot keeps its turn, or on a backend of one slot (it works in place).
    fn bring_in(&mut self, slot: usize, rows: usize) -> Result<(), BackendError> {
        if slot == self.resident || self.devs.first().is_none_or(|d| d.stores.is_empty()) {
            return Ok(());
        }
        let l = &self.layout;
        let kv_row = l.kv_heads * l.head_dim * l.kv_dtype.size();
        let (from, to) = (self.saved_rows, self.work_rows);
        for (dev, state) in self.loaded.devices().iter().zip(&self.devs) {
            let (work, leaving, coming) = (&state.work, &state.stores[self.resident], &state.stores[slot]);
            for layer in 0..l.layers {
                if to > from {
                    dev.copy(
                        leaving.k[layer],
                        from * kv_row,
                        work.k[layer],
                        from * kv_row,
                        (to - from) * kv_row,
                    )?;
                    dev.copy(
                        leaving.v[layer],
                        from * kv_row,
                        work.v[layer],
                        from * kv_row,
                        (to - from) * kv_row,
                    )?;
                }
                if rows > 0 {
                    dev.copy(work.k[layer], 0, coming.k[layer], 0, rows * kv_row)?;
                    dev.copy(work.v[layer], 0, coming.v[layer], 0, rows * kv_row)?;
                }
            }
        }
        self.resident = slot;
        (self.saved_rows, self.work_rows) = (rows, rows);
        Ok(())
    }

    /// [`Backend::prefill`] in the selected slot.
    fn prefill_here(&mut self, tokens: &[u32], start: usize) -> Result<Next<'_>, BackendError> {
        self.check_call(tokens, start)?;
        let n = tokens.len();
        self.history[start..start + n].copy_from_slice(tokens);
        // A prompt is a new request's (or a new chunk's): its window is rebuilt from its own
        // tokens, never continued from what the ring held before.
        if let Some(s) = self.sample.as_mut() {
            s.synced = None;
        }
        self.sync_sample_window(start + n - 1)?;
        let plan = plan::plan(&self.layout, start, n);
        self.last_plan = Some(plan);
        let max_input = self.layout.max_input.max(1);
        match plan.route {
            Route::Prefill if self.layout.prefill == Prefill::WithHistory => {
                for from in (start..start + n).step_by(max_input) {
                    self.prefill_launch(from, max_input.min(start + n - from))?;
                }
            }
            Route::Prefill => {
                let first = n.min(max_input);
                self.prefill_launch(0, first)?;
                for (i, &t) in tokens[first..].iter().enumerate() {
                    self.decode_step(t, first + i)?;
                }
            }
            Route::Reprefill => self.prefill_launch(0, start + n)?,
            Route::Decode => {
                for (i, &t) in tokens.iter().enumerate() {
                    self.decode_step(t, start + i)?;
                }
            }
        }
        self.current = start + n - 1;
        self.work_rows = start + n;
        self.head()
    }

    /// [`Backend::decode`] in the selected slot.
    fn decode_here(&mut self, token: u32, pos: usize) -> Result<Next<'_>, BackendError> {
        self.check_call(&[token], pos)?;
        self.history[pos] = token;
        self.sync_sample_window(pos)?;
        self.decode_step(token, pos)?;
        self.current = pos;
        self.work_rows = pos + 1;
        self.head()
    }
}

impl Backend for SophonBackend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    fn prefill(&mut self, tokens: &[u32], start: usize) -> Result<Next<'_>, BackendError> {
        self.select(0)?;
        self.bring_in(0, start)?;
        self.prefill_here(tokens, start)
    }

    fn decode(&mut self, token: u32, pos: usize) -> Result<Next<'_>, BackendError> {
        self.select(0)?;
        self.bring_in(0, pos)?;
        self.decode_here(token, pos)
    }

    /// The slots take turns: each span is its own launches on its slot's caches (a batched
    /// decode needs a bmodel compiled with a batch, which the converter does not build for
    /// llama yet).
    fn step(
        &mut self,
        tokens: &[u32],
        spans: &[Span],
        out: &mut dyn FnMut(usize, Next<'_>),
    ) -> Result<(), BackendError> {
        check_spans(tokens, spans, self.slots.len())?;
        let mut at = 0;
        for (i, s) in spans.iter().enumerate() {
            self.select(s.slot)?;
            self.bring_in(s.slot, s.start)?;
            let part = &tokens[at..at + s.len];
            at += s.len;
            let next = if s.decode && s.len == 1 {
                self.decode_here(part[0], s.start)?
            } else {
                self.prefill_here(part, s.start)?
            };
            if s.output {
                out(i, next);
            }
        }
        Ok(())
    }

    fn traffic(&self) -> Option<Traffic> {
        Some(self.loaded.traffic())
    }

    fn picker(&self, slot: usize) -> &'static str {
        let picker = match self.slots.get(slot) {
            Some(state) if slot != self.slot => state.picker,
            _ => self.picker,
        };
        match picker {
            Picker::Host => "host",
            Picker::LmHead => "lm_head",
            Picker::Greedy => "greedy_head",
            Picker::Sample => "sample_head",
        }
    }

    fn reset(&mut self) {
        if let Some(s) = self.sample.as_mut() {
            s.synced = None;
        }
    }

    fn sample_on_host(&mut self, slot: usize) -> Result<(), BackendError> {
        self.select(slot)?;
        if self.layout.lm_head == LmHeadOutput::Token {
            return Err(BackendError::Unsupported(
                "this bmodel's lm_head picks tokens on the chip and returns no logits: a constrained answer (a JSON schema) cannot run on it",
            ));
        }
        self.picker = Picker::Host;
        Ok(())
    }

    fn configure_sampling(&mut self, slot: usize, cfg: &SamplerConfig) -> Result<(), BackendError> {
        self.select(slot)?;
        self.slots[slot].sampling = cfg.clone();
        self.picker = if self.layout.lm_head == LmHeadOutput::Token {
            if !cfg.is_greedy() {
                log::warn!(
                    "this bmodel's lm_head picks the most likely token on the chip: sampling settings are not applied"
                );
            }
            Picker::LmHead
        } else if cfg.is_greedy() && self.nets.greedy.is_some() {
            Picker::Greedy
        } else if self
            .layout
            .sample_head
            .as_ref()
            .is_some_and(|h| chip_can_sample(h, cfg))
        {
            Picker::Sample
        } else {
            Picker::Host
        };
        self.rng = fastrand::Rng::with_seed(cfg.seed);
        if self.picker == Picker::Sample {
            if let Some(s) = self.sample.as_mut() {
                s.configure(self.loaded.device(), cfg)?;
            }
        }
        Ok(())
    }
}
