//! The engine: one backend, its tokenizer and chat template, and the loop that turns a request
//! into a stream of text pieces and a final [`Summary`].
//!
//! It does not know which backend it drives. It remembers which tokens the backend's KV cache
//! holds, so a conversation that grows by one turn only prefills the new turn. Every buffer of
//! the per-token loop is allocated when the engine is made; a decoded token allocates nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::{Backend, BackendError, BackendInfo, Next};
use crate::chat::{ChatTemplate, Message, Part, RenderState, Role};
use crate::sampler::{Sampler, SamplerConfig};
use crate::tokenizer::{TextStream, Tokenizer, TokenizerError};

/// Held-back text is at most this many bytes plus the longest stop string.
const TEXT_CAPACITY: usize = 1024;

/// What to generate from.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// Raw prompt text (BOS added if the model wants it; special tokens in it are parsed).
    Text(String),
    /// A conversation, rendered with the chat template.
    Chat(Vec<Message>),
    /// Token ids as they are.
    Tokens(Vec<u32>),
}

/// One generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The prompt.
    pub input: Input,
    /// Sampling settings.
    pub sampling: SamplerConfig,
    /// Most tokens to generate; `None` means until end of generation or the context is full.
    pub max_tokens: Option<usize>,
    /// Generation stops when one of these appears in the output (it is not sent).
    pub stop: StopStrings,
    /// Generation stops (reason `time_limit`) when this instant passes.
    pub deadline: Option<Instant>,
    /// For chat input that does not fit the context with room for the answer: drop the oldest
    /// turns (a leading system message stays) until it does, and count them in the summary.
    /// Without it such a prompt is refused ([`EngineError::PromptTooLong`]).
    pub drop_old_turns: bool,
}

impl Request {
    /// A request with default settings.
    pub fn new(input: Input) -> Request {
        Request {
            input,
            sampling: SamplerConfig::default(),
            max_tokens: None,
            stop: StopStrings::new(),
            deadline: None,
            drop_old_turns: false,
        }
    }
}

/// Most stop strings in one request (they are scanned every token).
pub const MAX_STOP: usize = 8;
/// Longest stop string in bytes.
pub const MAX_STOP_BYTES: usize = 256;

/// One stop string: its bound is in its type.
pub type StopString = heapless::String<MAX_STOP_BYTES>;

/// A request's stop strings: at most [`MAX_STOP`] of at most [`MAX_STOP_BYTES`] each, held
/// inline (no heap: nothing a client sends can make them grow).
pub type StopStrings = heapless::Vec<StopString, MAX_STOP>;

/// Builds the stop list from strings, refusing more than [`MAX_STOP`], an empty one or one
/// longer than [`MAX_STOP_BYTES`].
///
/// # Errors
/// What is wrong, for the user.
pub fn stop_strings<'a>(items: impl IntoIterator<Item = &'a str>) -> Result<StopStrings, String> {
    let mut out = StopStrings::new();
    for s in items {
        if s.is_empty() {
            return Err("stop strings must not be empty".into());
        }
        let one =
            StopString::try_from(s).map_err(|_| format!("a stop string is longer than {MAX_STOP_BYTES} bytes"))?;
        out.push(one).map_err(|_| format!("at most {MAX_STOP} stop strings"))?;
    }
    Ok(out)
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced an end-of-generation token.
    Eos,
    /// `max_tokens` reached.
    Length,
    /// A stop string appeared.
    Stop,
    /// Cancelled: flag set or the sink refused more text (client gone).
    Cancelled,
    /// The request's deadline passed.
    TimeLimit,
    /// The KV cache is full.
    Context,
    /// The client did not read its answer fast enough: its outbound buffer filled.
    SlowClient,
}

impl FinishReason {
    /// Protocol spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
            FinishReason::Cancelled => "cancelled",
            FinishReason::TimeLimit => "time_limit",
            FinishReason::Context => "context",
            FinishReason::SlowClient => "slow_client",
        }
    }
}

/// The outcome of a generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Why it ended.
    pub reason: FinishReason,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Prompt tokens found already in the KV cache (not recomputed).
    pub cached_tokens: usize,
    /// Tokens generated (including one that ended on a stop string, excluding EOS).
    pub completion_tokens: usize,
    /// Chat messages dropped from the front of the conversation (after a system message) to
    /// fit the context ([`Request::drop_old_turns`]).
    pub dropped_messages: usize,
    /// Time spent on the prompt.
    pub prompt_time: Duration,
    /// From the start of the request to the first generated token.
    pub time_to_first_token: Duration,
    /// Time spent generating after the first token.
    pub generation_time: Duration,
    /// What picked the tokens: `host` (the host sampler on the logits) or an on-chip
    /// picker (`greedy_head`, `sample_head`, `lm_head`), see [`Backend::picker`].
    pub picker: &'static str,
}

impl Summary {
    /// Prompt tokens computed per second.
    pub fn prompt_tokens_per_second(&self) -> f64 {
        rate(self.prompt_tokens - self.cached_tokens, self.prompt_time)
    }

    /// Generated tokens per second (after the first).
    pub fn generation_tokens_per_second(&self) -> f64 {
        rate(self.completion_tokens.saturating_sub(1), self.generation_time)
    }
}

fn rate(n: usize, t: Duration) -> f64 {
    if t.is_zero() {
        0.0
    } else {
        n as f64 / t.as_secs_f64()
    }
}

/// Receives generated text. Returning `false` stops the generation (reason `cancelled`).
pub trait Sink {
    /// A piece of valid UTF-8 text (one token's worth, or held-back text released).
    fn text(&mut self, piece: &str) -> bool;

    /// Called after every backend step (a prompt chunk or a token), so a watchdog can see that
    /// the device still answers even while no text comes out.
    fn progress(&mut self) {}

    /// Why it refused text (after [`Sink::text`] returned `false`): a client gone is
    /// `Cancelled`, one too slow to keep up `SlowClient`.
    fn refusal(&self) -> FinishReason {
        FinishReason::Cancelled
    }
}

impl<F: FnMut(&str) -> bool> Sink for F {
    fn text(&mut self, piece: &str) -> bool {
        self(piece)
    }
}

/// Why a request could not be served.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Tokenization failed.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The prompt does not leave room for one generated token.
    #[error("prompt is {tokens} tokens, the context holds {context}")]
    PromptTooLong {
        /// Prompt length.
        tokens: usize,
        /// Context length.
        context: usize,
    },
    /// Nothing to generate from.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// Chat input without a template.
    #[error("this model has no known chat template; choose one with --chat-template ({})", crate::chat::KNOWN.join(", "))]
    NoTemplate,
    /// Bad sampling settings.
    #[error("{0}")]
    Sampling(String),
}

/// See the module documentation.
pub struct Engine {
    backend: Box<dyn Backend>,
    /// Shared with the HTTP front's `/tokenize` (read-only).
    tokenizer: Arc<Tokenizer>,
    template: Option<ChatTemplate>,
    sampler: Sampler,
    /// Logits copied out of the backend so the sampler may modify them.
    logits: Vec<f32>,
    /// Tokens whose keys and values are in the backend's cache, in position order.
    cached: Vec<u32>,
    stream: TextStream,
    /// Text of the current token.
    piece: String,
    /// Text not yet sent because it may be the start of a stop string.
    held: String,
}

impl Engine {
    /// An engine over a loaded backend and its tokenizer.
    pub fn new(backend: Box<dyn Backend>, tokenizer: Tokenizer, template: Option<ChatTemplate>) -> Engine {
        let info = backend.info().clone();
        Engine {
            sampler: Sampler::new(info.vocab_size, SamplerConfig::default()),
            logits: vec![0.0; info.vocab_size],
            cached: Vec::with_capacity(info.context_length),
            stream: TextStream::new(),
            piece: String::with_capacity(TEXT_CAPACITY),
            held: String::with_capacity(TEXT_CAPACITY),
            backend,
            tokenizer: Arc::new(tokenizer),
            template,
        }
    }

    /// Backend limits.
    pub fn info(&self) -> &BackendInfo {
        self.backend.info()
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The tokenizer, for threads that tokenize beside the engine (it is immutable).
    pub fn shared_tokenizer(&self) -> Arc<Tokenizer> {
        Arc::clone(&self.tokenizer)
    }

    /// The chat template in use.
    pub fn template(&self) -> Option<ChatTemplate> {
        self.template
    }

    /// What picked the last request's tokens (the backend's answer: `host`, or an on-chip
    /// head).
    pub fn picker(&self) -> &'static str {
        self.backend.picker()
    }

    /// Forgets the KV cache contents.
    pub fn reset(&mut self) {
        self.cached.clear();
        self.backend.reset();
    }

    /// Token ids of a request's prompt.
    ///
    /// # Errors
    /// Tokenizer failure, or chat input without a template.
    pub fn prompt_tokens(&self, input: &Input) -> Result<Vec<u32>, EngineError> {
        Ok(match input {
            Input::Text(t) => self.tokenizer.encode(t, true)?,
            Input::Chat(messages) => {
                let template = self.template.ok_or(EngineError::NoTemplate)?;
                let mut parts = Vec::new();
                template.render_parts(messages, &mut parts);
                let mut ids = self.bos();
                self.encode_parts(&parts, &mut ids)?;
                ids
            }
            Input::Tokens(ids) => ids.clone(),
        })
    }

    /// Runs a request to its end, streaming text into `sink`. `cancel` is checked between
    /// tokens; setting it ends the generation with reason `cancelled` within one token.
    ///
    /// # Errors
    /// Bad settings, a prompt that does not fit, tokenizer or backend failures.
    pub fn generate(
        &mut self,
        req: &Request,
        cancel: &AtomicBool,
        sink: &mut dyn Sink,
    ) -> Result<Summary, EngineError> {
        let started = Instant::now();
        req.sampling.validate().map_err(EngineError::Sampling)?;
        let context = self.backend.info().context_length;
        let (prompt, dropped_messages) = match &req.input {
            Input::Chat(messages) if req.drop_old_turns => {
                self.fit_conversation(messages, answer_room(req, context))?
            }
            input => (self.prompt_tokens(input)?, 0),
        };
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if prompt.len() >= context {
            return Err(EngineError::PromptTooLong {
                tokens: prompt.len(),
                context,
            });
        }
        let vocab = self.backend.info().vocab_size as u32;
        if let Some(&bad) = prompt.iter().find(|&&t| t >= vocab) {
            return Err(BackendError::BadToken(bad).into());
        }

        // Reuse the cached prefix; at least the last prompt token is recomputed for its logits.
        let common = self.cached.iter().zip(&prompt).take_while(|(a, b)| a == b).count();
        let reuse = common.min(prompt.len() - 1);
        self.cached.truncate(reuse);
        self.sampler.reconfigure(req.sampling.clone());
        self.sampler.reset(Some(&prompt));
        self.backend.configure_sampling(&req.sampling)?;
        self.stream.clear();
        self.held.clear();

        let mut summary = Summary {
            reason: FinishReason::Eos,
            prompt_tokens: prompt.len(),
            cached_tokens: reuse,
            completion_tokens: 0,
            dropped_messages,
            prompt_time: Duration::ZERO,
            time_to_first_token: Duration::ZERO,
            generation_time: Duration::ZERO,
            picker: self.backend.picker(),
        };
        if cancel.load(Ordering::Relaxed) {
            summary.reason = FinishReason::Cancelled;
            return Ok(summary);
        }
        let prefill_start = Instant::now();
        // In chunks of the backend's batch, so a cancel or a deadline is seen during a long
        // prompt too, and the watchdog sees progress.
        let batch = self.backend.info().max_batch.max(1);
        let mut next = None;
        for chunk in prompt[reuse..].chunks(batch) {
            if cancel.load(Ordering::Relaxed) {
                summary.reason = FinishReason::Cancelled;
                return Ok(summary);
            }
            if req.deadline.is_some_and(|d| Instant::now() >= d) {
                summary.reason = FinishReason::TimeLimit;
                return Ok(summary);
            }
            let pos = self.cached.len();
            next = match self.backend.prefill(chunk, pos) {
                Ok(n) => copy_out(n, &mut self.logits),
                Err(e) => {
                    self.cached.clear();
                    return Err(e.into());
                }
            };
            self.cached.extend_from_slice(chunk);
            sink.progress();
        }
        summary.prompt_time = prefill_start.elapsed();
        let mut first_token_at: Option<Instant> = None;

        let reason = loop {
            // `max_tokens: 0` asks for the prompt only, as llama.cpp's n_predict 0 does.
            if req.max_tokens == Some(0) {
                break FinishReason::Length;
            }
            if cancel.load(Ordering::Relaxed) {
                break FinishReason::Cancelled;
            }
            if req.deadline.is_some_and(|d| Instant::now() >= d) {
                break FinishReason::TimeLimit;
            }
            let token = match next {
                Some(t) => t,
                None => self.sampler.sample(&mut self.logits),
            };
            self.sampler.accept(token);
            if first_token_at.is_none() {
                let now = Instant::now();
                summary.time_to_first_token = now - started;
                first_token_at = Some(now);
            }
            if self.tokenizer.is_eog(token) {
                break FinishReason::Eos;
            }
            summary.completion_tokens += 1;
            self.piece.clear();
            self.stream.push(self.tokenizer.token_bytes(token), &mut self.piece);
            match self.release_text(&req.stop, sink) {
                Release::Continue => {}
                Release::Stopped => break FinishReason::Stop,
                Release::SinkClosed => break sink.refusal(),
            }
            if req.max_tokens.is_some_and(|m| summary.completion_tokens >= m) {
                break FinishReason::Length;
            }
            let pos = self.cached.len();
            if pos >= context {
                break FinishReason::Context;
            }
            crate::faults::stall_decode(summary.completion_tokens as u64);
            next = match self.backend.decode(token, pos) {
                Ok(n) => copy_out(n, &mut self.logits),
                Err(e) => {
                    self.cached.clear();
                    return Err(e.into());
                }
            };
            self.cached.push(token);
            sink.progress();
        };
        // Text held for a possible stop string is real output when no stop string came.
        if !matches!(
            reason,
            FinishReason::Stop | FinishReason::Cancelled | FinishReason::TimeLimit
        ) {
            self.stream.finish();
            if !self.held.is_empty() {
                sink.text(&self.held);
            }
        }
        summary.reason = reason;
        if let Some(t) = first_token_at {
            summary.generation_time = t.elapsed();
        }
        Ok(summary)
    }

    /// Tokens of a conversation that leaves `room` tokens for the answer, dropping the oldest
    /// turns (never a leading system message, never the last message) until it does. Returns
    /// the tokens and how many messages were dropped.
    /// BOS, when the model wants one before a prompt.
    fn bos(&self) -> Vec<u32> {
        self.tokenizer
            .bos
            .filter(|_| self.tokenizer.add_bos)
            .into_iter()
            .collect()
    }

    /// A template's parts as ids: its markers as their special tokens, everything else as text
    /// (a message spelling a marker stays text).
    fn encode_parts(&self, parts: &[Part], out: &mut Vec<u32>) -> Result<(), EngineError> {
        for p in parts {
            match p {
                Part::Marker(m) => match self.tokenizer.special_id(m) {
                    Some(id) => out.push(id),
                    None => self.tokenizer.encode_text_into(m, out)?,
                },
                Part::Text(t) => self.tokenizer.encode_text_into(t, out)?,
            }
        }
        Ok(())
    }

    /// The conversation's ids with the oldest turns dropped (the system message kept) until
    /// `room` tokens are left for the answer. Each turn (a user message and the answers after
    /// it) is tokenized once, for each way it can render (Llama-2 renders the first kept turn
    /// with the system message folded in), and the fit is found by adding lengths: a long
    /// conversation costs one pass of the tokenizer, not one per dropped turn.
    fn fit_conversation(&self, messages: &[Message], room: usize) -> Result<(Vec<u32>, usize), EngineError> {
        let template = self.template.ok_or(EngineError::NoTemplate)?;
        let context = self.backend.info().context_length;
        let keep_first = usize::from(messages.first().is_some_and(|m| m.role == Role::System));
        // Turns: from keep_first, each ending before the next user message.
        let mut turns = Vec::new();
        let mut start = keep_first;
        while start < messages.len() {
            let mut end = start + 1;
            while end < messages.len() && messages[end].role != Role::User {
                end += 1;
            }
            turns.push(start..end);
            start = end;
        }
        let mut parts = Vec::new();
        let encode = |parts: &[Part]| -> Result<Vec<u32>, EngineError> {
            let mut ids = Vec::new();
            self.encode_parts(parts, &mut ids)?;
            Ok(ids)
        };
        let mut head_state = RenderState::default();
        let mut head = self.bos();
        if keep_first == 1 {
            template.message(&messages[0], &mut head_state, &mut parts);
            head.extend(encode(&parts)?);
        }
        parts.clear();
        template.cue(&mut parts);
        let cue = encode(&parts)?;
        // Every turn once, in order: how it renders when the turns before it are kept. (What
        // a turn carries into the next depends only on that turn, as each turn after the
        // first starts with a user message: so this is its form whichever earlier turn the
        // kept part starts at.)
        let mut rest = Vec::with_capacity(turns.len());
        let mut state = head_state.clone();
        for turn in &turns {
            parts.clear();
            for m in &messages[turn.clone()] {
                template.message(m, &mut state, &mut parts);
            }
            rest.push(encode(&parts)?);
        }
        // Lengths of turns k.. in that form.
        let mut suffix = vec![0usize; turns.len() + 1];
        for i in (0..turns.len()).rev() {
            suffix[i] = suffix[i + 1] + rest[i].len();
        }
        for first in 0..turns.len() {
            // The first kept turn renders after the head alone (Llama-2 folds the system
            // message into it): one more tokenization of one turn.
            let first_ids = if first == 0 {
                None
            } else {
                parts.clear();
                let mut state = head_state.clone();
                for m in &messages[turns[first].clone()] {
                    template.message(m, &mut state, &mut parts);
                }
                Some(encode(&parts)?)
            };
            let first_len = first_ids.as_ref().map_or(rest[first].len(), Vec::len);
            let total = head.len() + first_len + suffix[first + 1] + cue.len();
            if total + room <= context || first + 1 == turns.len() {
                let mut ids = Vec::with_capacity(total);
                ids.extend_from_slice(&head);
                ids.extend_from_slice(first_ids.as_deref().unwrap_or(&rest[first]));
                for turn in &rest[first + 1..] {
                    ids.extend_from_slice(turn);
                }
                ids.extend_from_slice(&cue);
                return Ok((ids, turns[first].start - keep_first));
            }
        }
        // No turns: the system message alone.
        let mut ids = head;
        ids.extend_from_slice(&cue);
        Ok((ids, 0))
    }

    /// Moves `piece` into the held text and sends what can no longer be part of a stop string.
    fn release_text(&mut self, stop: &[StopString], sink: &mut dyn Sink) -> Release {
        self.held.push_str(&self.piece);
        if stop.is_empty() {
            let ok = self.held.is_empty() || sink.text(&self.held);
            self.held.clear();
            return if ok { Release::Continue } else { Release::SinkClosed };
        }
        if let Some(at) = stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            if at > 0 {
                sink.text(&self.held[..at]);
            }
            self.held.clear();
            return Release::Stopped;
        }
        // Keep the longest tail that is a prefix of a stop string.
        let mut keep = 0;
        for s in stop {
            for (i, _) in self.held.char_indices() {
                let tail = &self.held[i..];
                if tail.len() > keep && s.starts_with(tail) {
                    keep = tail.len();
                }
            }
        }
        let send = self.held.len() - keep;
        let mut ok = true;
        if send > 0 {
            ok = sink.text(&self.held[..send]);
            self.held.drain(..send);
        }
        if ok {
            Release::Continue
        } else {
            Release::SinkClosed
        }
    }
}

enum Release {
    Continue,
    Stopped,
    SinkClosed,
}

/// Tokens a conversation must leave free for the answer: `max_tokens`, or a quarter of the
/// context without it; never more than half the context, so a long answer limit does not
/// empty a conversation.
fn answer_room(req: &Request, context: usize) -> usize {
    req.max_tokens.unwrap_or(context / 4).clamp(1, (context / 2).max(1))
}

/// Copies logits into the engine's buffer (`None`), or passes on a device-chosen token.
fn copy_out(next: Next<'_>, logits: &mut [f32]) -> Option<u32> {
    match next {
        Next::Logits(l) => {
            logits.copy_from_slice(l);
            None
        }
        Next::Token(t) => Some(t),
    }
}
