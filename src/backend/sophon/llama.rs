//! The Llama forward pass on the BM1684X: the bmodel contract's prefill and decode sequence
//! over a loaded bmodel. The KV cache lives in the decode blocks' own input memory
//! (`block_cache_N` inputs 3 and 4) and never leaves the device; per decoded token the host
//! writes the token id and reads back the token (on-chip heads) or the logits.
//!
//! Positions and masks for decoding come from two small device-resident tables made at load
//! (positions `0..S`, and `S` zeros followed by `S` "minus infinity"), copied device to device
//! into each block: the mask for position `p` is the window starting at `S - p`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::contract::{self, LlamaLayout, LmHeadOutput, SampleHead};
use super::device::{Device, DeviceBuffer};
use super::ffi::{DataType, DeviceMem, Runtime};
use super::runtime::{Launch, Loaded};
use crate::backend::{Backend, BackendError, BackendInfo, Next};
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
}

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
}

/// The "minus infinity" of the attention masks, as compiled models expect it.
fn minus_infinity(dtype: DataType) -> [u8; 2] {
    match dtype {
        DataType::Bf16 => 0xC61Cu16.to_le_bytes(),
        _ => 0xF0E2u16.to_le_bytes(),
    }
}

/// The nets, prepared for launching.
struct Nets {
    embedding: Launch,
    embedding_cache: Launch,
    blocks: Vec<Launch>,
    caches: Vec<Launch>,
    lm_head: Launch,
    greedy: Option<Launch>,
    sample: Option<(Launch, SampleHead)>,
}

/// Tables the backend keeps in one device's memory.
struct Tables {
    /// `0..S` as i32 (decode positions).
    positions: DeviceBuffer,
    /// `S` zeros then `S` minus-infinities (decode masks).
    masks: DeviceBuffer,
    /// This prompt's positions and S x S mask, copied into each prefill block (the nets' own
    /// inputs may share memory with other nets' activations, so they are filled just before
    /// each launch).
    prefill_positions: DeviceBuffer,
    prefill_mask: DeviceBuffer,
}

impl Tables {
    fn new(device: &Arc<Device>, s: usize, dtype: DataType) -> Result<Tables, BackendError> {
        let positions = device.alloc(s * 4)?;
        let table: Vec<u8> = (0..s as i32).flat_map(i32::to_le_bytes).collect();
        positions.write(&table)?;
        let masks = device.alloc(2 * s * 2)?;
        let mut table = vec![0u8; 2 * s * 2];
        for cell in table[s * 2..].chunks_exact_mut(2) {
            cell.copy_from_slice(&minus_infinity(dtype));
        }
        masks.write(&table)?;
        Ok(Tables {
            positions,
            masks,
            prefill_positions: device.alloc(s * 4)?,
            prefill_mask: device.alloc(s * s * 2)?,
        })
    }
}

/// What picks the next token.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Picker {
    /// The host samples from the logits.
    Host,
    /// lm_head itself returns the token (compiled with a top-1).
    LmHead,
    /// greedy_head.
    Greedy,
    /// The sampling head; the host draws from its candidates.
    Sample,
}

/// A Llama bmodel resident on a BM1684X.
pub struct SophonBackend {
    info: BackendInfo,
    layout: LlamaLayout,
    nets: Nets,
    /// Position and mask tables, one set per device.
    tables: Vec<Tables>,
    picker: Picker,
    rng: fastrand::Rng,
    /// Host scratch, sized at load.
    bytes: Vec<u8>,
    logits: Vec<f32>,
    probs: Vec<f32>,
    candidates: Vec<u32>,
    /// Dropped after the prepared nets and buffers above: the context, then the device.
    loaded: Loaded,
}

impl SophonBackend {
    /// Loads the runtime, opens the device and loads `path`, checking the contract.
    ///
    /// # Errors
    /// No runtime libraries, no device, a file that does not load or does not fit.
    pub fn open(path: &Path, opts: &SophonOptions) -> Result<SophonBackend, SophonError> {
        let rt = Arc::new(Runtime::load(opts.lib_dir.as_deref()).map_err(|e| SophonError::Runtime(e.to_string()))?);
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
        if layout.dynamic_prefill {
            return Err(contract::ContractError(
                "the prefill blocks take no attention mask (compiled with --dynamic): not supported yet".into(),
            )
            .into());
        }
        let vocab = match layout.lm_head {
            LmHeadOutput::Logits(v) => v,
            LmHeadOutput::Token => opts.vocab_hint.unwrap_or(0),
        };
        let nets = Nets {
            embedding: loaded.prepare_spanning("embedding")?,
            embedding_cache: loaded.prepare_spanning("embedding_cache")?,
            blocks: (0..layout.layers)
                .map(|i| loaded.prepare_spanning(&format!("block_{i}")))
                .collect::<Result<_, _>>()?,
            caches: (0..layout.layers)
                .map(|i| loaded.prepare_spanning(&format!("block_cache_{i}")))
                .collect::<Result<_, _>>()?,
            lm_head: loaded.prepare("lm_head")?,
            greedy: if layout.greedy_head {
                Some(loaded.prepare("greedy_head")?)
            } else {
                None
            },
            sample: match &layout.sample_head {
                Some(h) => Some((loaded.prepare(&h.net)?, h.clone())),
                None => None,
            },
        };
        let s = layout.seq_len;
        let tables = opened
            .iter()
            .map(|d| Tables::new(d, s, layout.dtype))
            .collect::<Result<Vec<_>, _>>()?;
        let kv_bytes = (layout.devices * layout.layers * 2 * s * layout.kv_heads * layout.head_dim * 2) as u64;
        let info = BackendInfo {
            backend: "sophon",
            model: format!(
                "{} ({} layers, hidden {}, {} KV heads x {}, devices {:?})",
                path.file_name()
                    .map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned()),
                layout.layers,
                layout.hidden,
                layout.kv_heads,
                layout.head_dim,
                devices
            ),
            context_length: s,
            vocab_size: vocab,
            dtype: match layout.dtype {
                DataType::Bf16 => "bf16".into(),
                _ => "f16".into(),
            },
            weight_bytes: std::fs::metadata(path).map_or(0, |m| m.len()),
            kv_cache_bytes: kv_bytes,
            max_batch: s,
        };
        // The KV cache starts as zeros: positions not yet written are masked, but must hold
        // finite numbers (whatever the device memory held before may be NaN).
        let zeros = vec![0u8; s * layout.kv_heads * layout.head_dim * 2];
        for cache in &nets.caches {
            for (d, device) in opened.iter().enumerate() {
                device.write(input_on(cache, 3, d), &zeros)?;
                device.write(input_on(cache, 4, d), &zeros)?;
            }
        }
        let n_candidates = layout.sample_head.as_ref().map_or(0, |h| h.candidates);
        let scratch = (s * s * 2).max(s * 4).max(vocab * 4).max(n_candidates * 4);
        Ok(SophonBackend {
            picker: if layout.lm_head == LmHeadOutput::Token {
                Picker::LmHead
            } else {
                Picker::Host
            },
            info,
            layout,
            nets,
            tables,
            rng: fastrand::Rng::with_seed(0),
            bytes: vec![0; scratch],
            logits: vec![0.0; vocab],
            probs: vec![0.0; n_candidates],
            candidates: vec![0; n_candidates],
            loaded,
        })
    }

    /// The bmodel's layout.
    pub fn layout(&self) -> &LlamaLayout {
        &self.layout
    }

    /// Bytes per activation element (f16 and bf16 alike).
    const HALF: usize = 2;

    /// The whole prompt at positions `0..len` in one pass of the prefill blocks. On a
    /// multi-chip bmodel every device gets the same ids, positions and mask, and each copy
    /// stays on its device; lm_head runs on the first.
    fn prefill_from_start(&mut self, tokens: &[u32]) -> Result<(), BackendError> {
        let s = self.layout.seq_len;
        let len = tokens.len();
        let (hidden, kv_row) = (self.layout.hidden, self.layout.kv_heads * self.layout.head_dim);
        let devices = self.loaded.devices();

        let ids = &mut self.bytes[..s * 4];
        for (i, cell) in ids.chunks_exact_mut(4).enumerate() {
            let id = tokens.get(i).copied().unwrap_or(0) as i32;
            cell.copy_from_slice(&id.to_le_bytes());
        }
        for (d, dev) in devices.iter().enumerate() {
            dev.write(input_on(&self.nets.embedding, 0, d), ids)?;
        }
        if let Some((head, _)) = &self.nets.sample {
            // The ids so far, for the repetition penalty; padded with a token already in
            // them, which penalizing twice leaves as once.
            for (i, cell) in ids.chunks_exact_mut(4).enumerate() {
                let id = tokens.get(i).copied().unwrap_or(tokens[0]) as i32;
                cell.copy_from_slice(&id.to_le_bytes());
            }
            devices[0].write(input(head, 1), ids)?;
        }
        self.loaded.launch(&mut self.nets.embedding)?;

        // Positions 0..len then 0; mask 0 where j <= i < len, else minus infinity.
        for (i, cell) in self.bytes[..s * 4].chunks_exact_mut(4).enumerate() {
            let p = if i < len { i as i32 } else { 0 };
            cell.copy_from_slice(&p.to_le_bytes());
        }
        for t in &self.tables {
            t.prefill_positions.write(&self.bytes[..s * 4])?;
        }
        let minus = minus_infinity(self.layout.dtype);
        for (cell_index, cell) in self.bytes[..s * s * 2].chunks_exact_mut(2).enumerate() {
            let (i, j) = (cell_index / s, cell_index % s);
            cell.copy_from_slice(if j <= i && i < len { &[0, 0] } else { &minus });
        }
        for t in &self.tables {
            t.prefill_mask.write(&self.bytes[..s * s * 2])?;
        }

        for layer in 0..self.layout.layers {
            for (d, dev) in devices.iter().enumerate() {
                let block = &self.nets.blocks[layer];
                let hidden_out = match layer {
                    0 => output_on(&self.nets.embedding, 0, d),
                    _ => output_on(&self.nets.blocks[layer - 1], 0, d),
                };
                let t = &self.tables[d];
                dev.copy(input_on(block, 0, d), 0, hidden_out, 0, s * hidden * Self::HALF)?;
                // After --combine every net has its own inputs: positions and mask per block.
                dev.copy(input_on(block, 1, d), 0, t.prefill_positions.mem(), 0, s * 4)?;
                dev.copy(input_on(block, 2, d), 0, t.prefill_mask.mem(), 0, s * s * Self::HALF)?;
            }
            self.loaded.launch(&mut self.nets.blocks[layer])?;
            for (d, dev) in devices.iter().enumerate() {
                let block = &self.nets.blocks[layer];
                let cache = &self.nets.caches[layer];
                // All S rows, not only len: rows past the prompt are masked, but a masked row
                // must still hold finite numbers (0 x NaN is NaN), and these are.
                let kv_len = s * kv_row * Self::HALF;
                dev.copy(input_on(cache, 3, d), 0, output_on(block, 1, d), 0, kv_len)?;
                dev.copy(input_on(cache, 4, d), 0, output_on(block, 2, d), 0, kv_len)?;
            }
        }
        let last = output_on(&self.nets.blocks[self.layout.layers - 1], 0, 0);
        let row = hidden * Self::HALF;
        devices[0].copy(input(&self.nets.lm_head, 0), 0, last, (len - 1) * row, row)
    }

    /// One token at position `pos`, attending to the cache before it.
    fn decode_step(&mut self, token: u32, pos: usize) -> Result<(), BackendError> {
        let s = self.layout.seq_len;
        let (hidden, kv_row) = (self.layout.hidden, self.layout.kv_heads * self.layout.head_dim);
        let devices = self.loaded.devices();
        let id = (token as i32).to_le_bytes();
        for (d, dev) in devices.iter().enumerate() {
            dev.write(input_on(&self.nets.embedding_cache, 0, d), &id)?;
        }
        if let Some((head, _)) = &self.nets.sample {
            let id_mem = input_on(&self.nets.embedding_cache, 0, 0);
            devices[0].copy(input(head, 1), pos * 4, id_mem, 0, 4)?;
        }
        self.loaded.launch(&mut self.nets.embedding_cache)?;
        for layer in 0..self.layout.layers {
            for (d, dev) in devices.iter().enumerate() {
                let cache = &self.nets.caches[layer];
                let hidden_out = match layer {
                    0 => output_on(&self.nets.embedding_cache, 0, d),
                    _ => output_on(&self.nets.caches[layer - 1], 0, d),
                };
                let t = &self.tables[d];
                dev.copy(input_on(cache, 0, d), 0, hidden_out, 0, hidden * Self::HALF)?;
                dev.copy(input_on(cache, 1, d), 0, t.positions.mem(), pos * 4, 4)?;
                // Mask: zeros on [0, pos), minus infinity on [pos, S), and 0 for the token itself.
                let mask = input_on(cache, 2, d);
                dev.copy(mask, 0, t.masks.mem(), (s - pos) * Self::HALF, s * Self::HALF)?;
                dev.copy(mask, s * Self::HALF, t.masks.mem(), 0, Self::HALF)?;
            }
            self.loaded.launch(&mut self.nets.caches[layer])?;
            for (d, dev) in devices.iter().enumerate() {
                let cache = &self.nets.caches[layer];
                let kv = kv_row * Self::HALF;
                dev.copy(input_on(cache, 3, d), pos * kv, output_on(cache, 1, d), 0, kv)?;
                dev.copy(input_on(cache, 4, d), pos * kv, output_on(cache, 2, d), 0, kv)?;
            }
        }
        let last = output_on(&self.nets.caches[self.layout.layers - 1], 0, 0);
        devices[0].copy(input(&self.nets.lm_head, 0), 0, last, 0, hidden * Self::HALF)
    }

    /// lm_head on the row placed in its input, then the picker.
    fn head(&mut self) -> Result<Next<'_>, BackendError> {
        self.loaded.launch(&mut self.nets.lm_head)?;
        let logits_mem = output(&self.nets.lm_head, 0);
        let v = self.logits.len();
        match self.picker {
            Picker::LmHead => self.read_token(logits_mem),
            Picker::Greedy => {
                let Some(greedy) = self.nets.greedy.as_mut() else {
                    return Err(missing("greedy_head"));
                };
                self.loaded.device().copy(input(greedy, 0), 0, logits_mem, 0, v * 4)?;
                self.loaded.launch(greedy)?;
                let out = output(greedy, 0);
                self.read_token(out)
            }
            Picker::Sample => {
                let Some((head, layout)) = self.nets.sample.as_mut() else {
                    return Err(missing("sample_head"));
                };
                let dev = self.loaded.device();
                dev.copy(input(head, 0), 0, logits_mem, 0, v * 4)?;
                self.loaded.launch(head)?;
                let n = layout.candidates;
                dev.read(output(head, 0), &mut self.bytes[..n * 4])?;
                for (p, b) in self.probs.iter_mut().zip(self.bytes.chunks_exact(4)) {
                    *p = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
                dev.read(output(head, 1), &mut self.bytes[..n * 4])?;
                for (t, b) in self.candidates.iter_mut().zip(self.bytes.chunks_exact(4)) {
                    *t = i32::from_le_bytes([b[0], b[1], b[2], b[3]]).max(0) as u32;
                }
                Ok(Next::Token(draw(&self.probs, &self.candidates, &mut self.rng)))
            }
            Picker::Host => {
                self.loaded.device().read(logits_mem, &mut self.bytes[..v * 4])?;
                for (l, b) in self.logits.iter_mut().zip(self.bytes.chunks_exact(4)) {
                    *l = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
                Ok(Next::Logits(&self.logits))
            }
        }
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

    /// Writes the sampling head's settings (f32, as its inputs are declared).
    fn write_sampling(&mut self, cfg: &SamplerConfig) -> Result<(), BackendError> {
        let Some((head, layout)) = &self.nets.sample else {
            return Ok(());
        };
        let dev = self.loaded.device();
        dev.write(input(head, 2), &cfg.repeat_penalty.to_le_bytes())?;
        dev.write(input(head, 3), &cfg.temperature.to_le_bytes())?;
        let top_p_index = if layout.top_k_input {
            let k = if cfg.top_k == 0 {
                layout.candidates
            } else {
                cfg.top_k.min(layout.candidates)
            };
            dev.write(input(head, 4), &(k as i32).to_le_bytes())?;
            5
        } else {
            4
        };
        dev.write(input(head, top_p_index), &cfg.top_p.to_le_bytes())
    }
}

fn missing(net: &'static str) -> BackendError {
    BackendError::Device {
        call: "bmrt_launch_tensor_ex",
        detail: format!("no {net} net"),
    }
}

/// A net's input memory (a default, zero-sized one for an index the contract ruled out, so a
/// copy into it fails with an error rather than a panic).
fn input(net: &Launch, i: usize) -> DeviceMem {
    net.input_mem(i).unwrap_or_default()
}

fn output(net: &Launch, i: usize) -> DeviceMem {
    net.output_mem(i).unwrap_or_default()
}

/// Input `i` of device `d`'s group of a net spanning all devices.
fn input_on(net: &Launch, i: usize, d: usize) -> DeviceMem {
    net.input_mem_on(i, d).unwrap_or_default()
}

fn output_on(net: &Launch, i: usize, d: usize) -> DeviceMem {
    net.output_mem_on(i, d).unwrap_or_default()
}

/// Draws one candidate with probability proportional to `probs`.
fn draw(probs: &[f32], candidates: &[u32], rng: &mut fastrand::Rng) -> u32 {
    let total: f32 = probs.iter().map(|p| p.max(0.0)).sum();
    let mut r = rng.f32() * total;
    for (&p, &t) in probs.iter().zip(candidates) {
        r -= p.max(0.0);
        if r <= 0.0 && p > 0.0 {
            return t;
        }
    }
    candidates.first().copied().unwrap_or(0)
}

impl Backend for SophonBackend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    fn prefill(&mut self, tokens: &[u32], start: usize) -> Result<Next<'_>, BackendError> {
        self.check_call(tokens, start)?;
        if start == 0 {
            self.prefill_from_start(tokens)?;
        } else {
            // The prefill blocks start at position 0: continuing a cached conversation goes
            // one decode step per token.
            for (i, &t) in tokens.iter().enumerate() {
                self.decode_step(t, start + i)?;
            }
        }
        self.head()
    }

    fn decode(&mut self, token: u32, pos: usize) -> Result<Next<'_>, BackendError> {
        self.check_call(&[token], pos)?;
        self.decode_step(token, pos)?;
        self.head()
    }

    fn reset(&mut self) {}

    fn configure_sampling(&mut self, cfg: &SamplerConfig) -> Result<(), BackendError> {
        self.picker = if self.layout.lm_head == LmHeadOutput::Token {
            Picker::LmHead
        } else if cfg.is_greedy() && self.nets.greedy.is_some() {
            Picker::Greedy
        } else if cfg.temperature > 0.0 && cfg.min_p <= 0.0 && self.nets.sample.is_some() {
            Picker::Sample
        } else {
            Picker::Host
        };
        self.rng = fastrand::Rng::with_seed(cfg.seed);
        if self.picker == Picker::Sample {
            self.write_sampling(cfg)?;
        }
        Ok(())
    }
}
