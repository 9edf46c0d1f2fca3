//! Backends run the model: the CPU reference backend ([`cpu`]) and the Sophon BM1684X TPU
//! backend ([`sophon`]). They know nothing of serving: the engine drives them through
//! [`Backend`] only.
//!
//! The interface is shaped for a device that keeps its KV cache resident: the caller says
//! which positions a call covers and the backend writes keys/values there in place. Token ids
//! go in (and, for a device that samples on chip, the request's sampling settings), and logits
//! (or that device's token id) come out.

pub mod cpu;
pub mod sophon;

use std::fmt;

use crate::sampler::SamplerConfig;

/// What a backend can do and how big it is.
#[derive(Debug, Clone)]
pub struct BackendInfo {
    /// Backend name (`cpu`, `sophon`).
    pub backend: &'static str,
    /// Model description for humans (file name, architecture, size).
    pub model: String,
    /// Longest sequence the KV cache holds (prompt + generated).
    pub context_length: usize,
    /// Vocabulary size (length of the logits).
    pub vocab_size: usize,
    /// Compute data type of the weights or device, for display (`Q4_1`, `f16`, ...).
    pub dtype: String,
    /// Bytes of weights (mapped or resident).
    pub weight_bytes: u64,
    /// Bytes of KV cache.
    pub kv_cache_bytes: u64,
    /// Host memory the backend allocated beyond the mapped weights: its run state, the KV
    /// cache included (the CPU backend; the TPU backend's state is on the device).
    pub host_state_bytes: u64,
    /// The part of `host_state_bytes` that holds weights rearranged for the kernels (the CPU
    /// backend's interleaved Q4_0 matrices on AVX-512).
    pub rearranged_weight_bytes: u64,
    /// Most tokens one `prefill` call accepts; longer prompts are fed in pieces.
    pub max_batch: usize,
    /// KV caches held (conversations kept at once), each `context_length` long.
    pub slots: usize,
}

/// One sequence's part of a [`Backend::step`]: `len` tokens of slot `slot`'s conversation at
/// positions `start..start + len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Which KV cache.
    pub slot: usize,
    /// Position of the first token.
    pub start: usize,
    /// Tokens (consecutive in the step's token list).
    pub len: usize,
    /// Whether the output for the last token is wanted (the end of a prompt, or a decode).
    pub output: bool,
    /// The token is one the slot's last output chose (generation), not prompt text.
    pub decode: bool,
}

/// The result of a forward step.
#[derive(Debug, Clone, Copy)]
pub enum Next<'a> {
    /// Logits over the vocabulary for the last position; the caller samples.
    Logits(&'a [f32]),
    /// The device chose the token itself (on-chip greedy or sampling head).
    Token(u32),
}

/// A backend failure. Carries the operation's name so that a device error says which call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// A position outside the KV cache was asked for.
    #[error("position {pos} + {len} tokens is beyond the context length {context}")]
    ContextOverflow {
        /// First position.
        pos: usize,
        /// Tokens in the call.
        len: usize,
        /// Context length.
        context: usize,
    },
    /// A token id outside the vocabulary.
    #[error("token id {0} is outside the vocabulary")]
    BadToken(u32),
    /// An empty prefill.
    #[error("prefill called with no tokens")]
    Empty,
    /// A step named a KV cache the backend does not hold, or its spans do not add up to its
    /// tokens.
    #[error("a step's spans do not fit the backend ({0})")]
    BadSpan(&'static str),
    /// The model cannot do what the request needs.
    #[error("{0}")]
    Unsupported(&'static str),
    /// The device or its runtime failed.
    #[error("device call {call} failed: {detail}")]
    Device {
        /// The runtime function.
        call: &'static str,
        /// What it said.
        detail: String,
    },
}

/// What a backend asked of its accelerator: counted by the calls themselves (a relaxed atomic
/// add each, next to an ioctl), so the figures are what our code requests. Copies the vendor
/// runtime makes inside a launch (a static net's inputs moved to where it was compiled to
/// read them) are not visible here.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Traffic {
    /// Nets launched.
    pub launches: u64,
    /// Waits for launched work (`bm_thread_sync`).
    pub syncs: u64,
    /// Host-to-device copies.
    pub h2d_calls: u64,
    /// Host-to-device bytes.
    pub h2d_bytes: u64,
    /// Device-to-host copies.
    pub d2h_calls: u64,
    /// Device-to-host bytes.
    pub d2h_bytes: u64,
    /// Device-to-device copies (`bm_memcpy_d2d_byte`).
    pub d2d_calls: u64,
    /// Device-to-device bytes.
    pub d2d_bytes: u64,
}

impl std::ops::Sub for Traffic {
    type Output = Traffic;
    fn sub(self, o: Traffic) -> Traffic {
        Traffic {
            launches: self.launches - o.launches,
            syncs: self.syncs - o.syncs,
            h2d_calls: self.h2d_calls - o.h2d_calls,
            h2d_bytes: self.h2d_bytes - o.h2d_bytes,
            d2h_calls: self.d2h_calls - o.d2h_calls,
            d2h_bytes: self.d2h_bytes - o.d2h_bytes,
            d2d_calls: self.d2d_calls - o.d2d_calls,
            d2d_bytes: self.d2d_bytes - o.d2d_bytes,
        }
    }
}

impl std::ops::Add for Traffic {
    type Output = Traffic;
    fn add(self, o: Traffic) -> Traffic {
        Traffic {
            launches: self.launches + o.launches,
            syncs: self.syncs + o.syncs,
            h2d_calls: self.h2d_calls + o.h2d_calls,
            h2d_bytes: self.h2d_bytes + o.h2d_bytes,
            d2h_calls: self.d2h_calls + o.d2h_calls,
            d2h_bytes: self.d2h_bytes + o.d2h_bytes,
            d2d_calls: self.d2d_calls + o.d2d_calls,
            d2d_bytes: self.d2d_bytes + o.d2d_bytes,
        }
    }
}

impl std::iter::Sum for Traffic {
    fn sum<I: Iterator<Item = Traffic>>(iter: I) -> Traffic {
        iter.fold(Traffic::default(), |a, b| a + b)
    }
}

/// A model held by a compute device.
///
/// Positions are explicit: `prefill(tokens, start)` computes positions `start..start+len` and
/// `decode(token, pos)` position `pos`, writing the KV cache there, attending to everything
/// before. The engine keeps track of what the cache holds (and may reuse a common prefix by
/// starting past it); a backend that cannot start a prefill at `start > 0` may run those
/// tokens one decode step at a time.
pub trait Backend: Send {
    /// Limits and sizes.
    fn info(&self) -> &BackendInfo;

    /// Runs `tokens` at positions `start..start + tokens.len()` of slot 0 and returns the
    /// output for the last one. `tokens.len()` may exceed `info().max_batch`; the backend
    /// splits it.
    ///
    /// # Errors
    /// Positions past the context, bad token ids, device failures.
    fn prefill(&mut self, tokens: &[u32], start: usize) -> Result<Next<'_>, BackendError>;

    /// Runs one token at position `pos` of slot 0.
    ///
    /// # Errors
    /// As for [`Backend::prefill`].
    fn decode(&mut self, token: u32, pos: usize) -> Result<Next<'_>, BackendError>;

    /// One engine step: every span's tokens (`tokens` holds them back to back, in span order)
    /// run in their own slot's KV cache; `out(i, next)` receives span `i`'s output when it
    /// asked for one. A backend that computes several sequences in one pass (the CPU) shares
    /// the weights' reads among them; this default runs the spans one after another, on
    /// slot 0 (a backend with one KV cache).
    ///
    /// # Errors
    /// As for [`Backend::prefill`]; a span for a slot the backend lacks.
    fn step(
        &mut self,
        tokens: &[u32],
        spans: &[Span],
        out: &mut dyn FnMut(usize, Next<'_>),
    ) -> Result<(), BackendError> {
        check_spans(tokens, spans, 1)?;
        let mut at = 0;
        for (i, s) in spans.iter().enumerate() {
            let part = &tokens[at..at + s.len];
            at += s.len;
            let next = if s.decode && s.len == 1 {
                self.decode(part[0], s.start)?
            } else {
                self.prefill(part, s.start)?
            };
            if s.output {
                out(i, next);
            }
        }
        Ok(())
    }

    /// Forgets the KV cache contents (a new conversation).
    fn reset(&mut self);

    /// The sampling settings of slot `slot`'s next generation, for a backend that can pick
    /// tokens itself (on-chip heads). One that cannot ignores them and returns logits.
    ///
    /// # Errors
    /// The settings cannot be passed to the device.
    fn configure_sampling(&mut self, _slot: usize, _cfg: &SamplerConfig) -> Result<(), BackendError> {
        Ok(())
    }

    /// Makes slot `slot`'s request return logits for the host to pick from, whatever its
    /// settings (after [`Backend::configure_sampling`]): its answer is constrained by a mask.
    ///
    /// # Errors
    /// The model cannot return logits (its head picks tokens on the device).
    fn sample_on_host(&mut self, _slot: usize) -> Result<(), BackendError> {
        Ok(())
    }

    /// What picks slot `slot`'s tokens: `host` (the caller samples the logits), or an on-chip
    /// picker (`lm_head`, `greedy_head`, `sample_head`).
    fn picker(&self, _slot: usize) -> &'static str {
        "host"
    }

    /// What it has asked of its accelerator so far (`None` for the CPU backend).
    fn traffic(&self) -> Option<Traffic> {
        None
    }
}

/// Checks that `spans` cover `tokens` exactly, each non-empty and in one of `slots` caches.
///
/// # Errors
/// What does not fit.
pub fn check_spans(tokens: &[u32], spans: &[Span], slots: usize) -> Result<(), BackendError> {
    let mut total = 0usize;
    for s in spans {
        if s.len == 0 {
            return Err(BackendError::Empty);
        }
        if s.slot >= slots {
            return Err(BackendError::BadSpan("no such slot"));
        }
        total = total.saturating_add(s.len);
    }
    if total != tokens.len() {
        return Err(BackendError::BadSpan("the spans' lengths are not the tokens'"));
    }
    Ok(())
}

impl fmt::Display for BackendInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} backend, {} ({}), context {}, vocab {}, weights {:.1} MiB, KV cache {:.1} MiB",
            self.backend,
            self.model,
            self.dtype,
            self.context_length,
            self.vocab_size,
            self.weight_bytes as f64 / (1 << 20) as f64,
            self.kv_cache_bytes as f64 / (1 << 20) as f64
        )?;
        if self.rearranged_weight_bytes > 0 {
            write!(
                f,
                " (and {:.1} MiB of weights rearranged for the kernels)",
                self.rearranged_weight_bytes as f64 / (1 << 20) as f64
            )?;
        }
        Ok(())
    }
}
