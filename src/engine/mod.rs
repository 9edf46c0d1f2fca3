//! The engine: one backend, its tokenizer and chat template, and the loop that turns a request
//! into a stream of text pieces and a final [`Summary`].
//!
//! It does not know which backend it drives. It remembers which tokens the backend's KV cache
//! holds, so a conversation that grows by one turn only prefills the new turn. Every buffer of
//! the per-token loop is allocated when the engine is made; a decoded token allocates nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub mod constraint;
pub mod load;
pub mod slots;

use crate::backend::{Backend, BackendError, BackendInfo, Next, Span};
use crate::chat::{ChatTemplate, Message, Part, RenderState, Role, ToolSyntax};
use crate::reasoning::{Kind, Splitter};
use crate::sampler::{Sampler, SamplerConfig};
use crate::tokenizer::{TextStream, Tokenizer, TokenizerError};
pub use constraint::Shape;
use constraint::{Constraint, GrammarError, Grammars, Progress};
use slots::SlotView;

/// Most slots an engine holds (its per-step lists are inline arrays of this size).
pub const MAX_SLOTS: usize = 64;

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
    /// Never end on an end-of-generation token: they are masked out of the host's choice
    /// (llama.cpp's `ignore_eos`; benchmarks use it for answers of a known length). One the
    /// chip picks anyway is run like any other token.
    pub ignore_eos: bool,
    /// What the answer must be (a JSON document); `None`: free text.
    pub shape: Option<Shape>,
    /// `enable_thinking`: a chat whose template has a thinking mode (Qwen3's) is cued to think
    /// first, and its reasoning (`<think>...</think>`) goes out apart from the content
    /// ([`Clients::reasoning`]). Ignored for other templates, prompts that are not a chat, and
    /// answers that must be a JSON document (`shape` a schema: its grammar would constrain the
    /// reasoning too, so they answer with thinking off).
    pub thinking: bool,
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
            ignore_eos: false,
            shape: None,
            thinking: false,
        }
    }
}

/// Most tokens one answer may ask for (`max_tokens`): far past any context, small enough that
/// no count overflows.
pub const MAX_ANSWER_TOKENS: usize = 1 << 20;

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

    /// A piece of the answer's reasoning ([`Request::thinking`]); a sink that does not tell
    /// reasoning apart takes it as text.
    fn reasoning(&mut self, piece: &str) -> bool {
        self.text(piece)
    }

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
    /// Every slot is serving a request (the caller admits only when one is idle).
    #[error("every slot is busy")]
    Busy,
    /// The answer's shape cannot be used (an unsupported schema) or its grammar failed.
    #[error("{0}")]
    Grammar(#[from] GrammarError),
}

/// Receives what the engine makes for the requests it runs, slot by slot (the daemon's engine
/// thread: each slot's client connection).
pub trait Clients {
    /// A piece of the answer of the request in `slot` (valid UTF-8). `Err(reason)` stops that
    /// request (a client gone: `Cancelled`; one too slow: `SlowClient`).
    ///
    /// # Errors
    /// The request must stop, for the reason given.
    fn text(&mut self, slot: usize, piece: &str) -> Result<(), FinishReason>;

    /// A piece of the reasoning of the request in `slot` ([`Request::thinking`]), as
    /// [`Clients::text`]; clients that do not tell reasoning apart take it as text.
    ///
    /// # Errors
    /// The request must stop, for the reason given.
    fn reasoning(&mut self, slot: usize, piece: &str) -> Result<(), FinishReason> {
        self.text(slot, piece)
    }

    /// Whether the request in `slot` was cancelled (checked before every step).
    fn cancelled(&self, slot: usize) -> bool;

    /// Whether the client of the generating request in `slot` can take more text (checked
    /// before every step). `Ok(false)`: not yet (it is not reading); the request sits this
    /// step out, keeping its place. `Err(reason)` ends it.
    ///
    /// # Errors
    /// The request must stop, for the reason given (one waited for too long: `SlowClient`).
    fn ready(&mut self, slot: usize) -> Result<bool, FinishReason> {
        let _ = slot;
        Ok(true)
    }

    /// Called after every backend step, so a watchdog sees the device answer even while no
    /// text comes out.
    fn progress(&mut self) {}

    /// The request in `slot` is over; called exactly once per admitted request.
    fn finished(&mut self, slot: usize, result: Result<Summary, EngineError>);
}

/// A request being served in a slot.
struct Run {
    request: Request,
    /// Its prompt's ids; the slot's `cached` grows towards it while prefilling.
    prompt: Vec<u32>,
    started: Instant,
    first_token_at: Option<Instant>,
    /// The token to run next (generation); `None` while the prompt is still being fed.
    pending: Option<u32>,
    /// Its client cannot take more text yet: it sits out the steps until it can.
    waiting: bool,
    /// The answer is split into reasoning and content (thinking on, and the template thinks).
    thinking: bool,
    summary: Summary,
}

/// One KV cache and what serves from it: every buffer of the per-token loop, made once.
struct Slot {
    /// Tokens whose keys and values are in this slot's cache, in position order.
    cached: Vec<u32>,
    /// The text-mode connection whose conversation this is ([`choose`](slots::choose)).
    owner: Option<u64>,
    /// When it last started a request (the engine's counter).
    last_used: u64,
    sampler: Sampler,
    /// Logits copied out of the backend so the sampler may modify them.
    logits: Vec<f32>,
    stream: TextStream,
    /// Text of the current token.
    piece: String,
    /// Text not yet sent because it may be the start of a stop string.
    held: String,
    /// Where the answer is between its reasoning and its content (thinking on).
    split: Splitter,
    /// Where the answer is in the document it must be, for a constrained request.
    constraint: Option<Constraint>,
    run: Option<Run>,
}

/// See the module documentation.
pub struct Engine {
    backend: Box<dyn Backend>,
    /// Shared with the HTTP front's `/tokenize` (read-only).
    tokenizer: Arc<Tokenizer>,
    grammars: Arc<Grammars>,
    template: Option<ChatTemplate>,
    tool_syntax: ToolSyntax,
    slots: Vec<Slot>,
    /// Counts admissions, for least-recently-used order.
    clock: u64,
    /// The slot of the request admitted last.
    last_admitted: usize,
    /// The test build's scripted answer ([`crate::faults::script`]): forced as every answer's
    /// tokens, an end of generation after them. Empty: the model chooses.
    script: Vec<u32>,
    /// The tokens and spans of the step being built (capacity for a full one, made once).
    step_tokens: Vec<u32>,
    step_spans: Vec<Span>,
}

impl Engine {
    /// An engine over a loaded backend (with as many slots as it holds KV caches) and its
    /// tokenizer.
    pub fn new(backend: Box<dyn Backend>, tokenizer: Tokenizer, template: Option<ChatTemplate>) -> Engine {
        let info = backend.info().clone();
        let tokenizer = Arc::new(tokenizer);
        let slots = (0..info.slots.max(1))
            .map(|_| Slot {
                cached: Vec::with_capacity(info.context_length),
                owner: None,
                last_used: 0,
                sampler: Sampler::new(info.vocab_size, SamplerConfig::default()),
                logits: vec![0.0; info.vocab_size],
                stream: TextStream::new(),
                piece: String::with_capacity(TEXT_CAPACITY),
                held: String::with_capacity(TEXT_CAPACITY),
                split: Splitter::new(),
                constraint: None,
                run: None,
            })
            .collect::<Vec<_>>();
        Engine {
            step_tokens: Vec::with_capacity(info.max_batch.max(slots.len())),
            step_spans: Vec::with_capacity(slots.len()),
            slots,
            clock: 0,
            last_admitted: 0,
            backend,
            grammars: Arc::new(Grammars::new(Arc::clone(&tokenizer))),
            script: scripted_tokens(&tokenizer),
            tokenizer,
            template,
            tool_syntax: ToolSyntax::Generic,
        }
    }

    /// The engine with the tool-call syntax its model's template teaches.
    pub fn with_tool_syntax(mut self, syntax: ToolSyntax) -> Engine {
        self.tool_syntax = syntax;
        self
    }

    /// How the model writes a tool call.
    pub fn tool_syntax(&self) -> ToolSyntax {
        self.tool_syntax
    }

    /// What compiles answers' shapes for this model (the transports check a request's schema
    /// with it before queueing).
    pub fn grammars(&self) -> Arc<Grammars> {
        Arc::clone(&self.grammars)
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

    /// What picks the tokens of the request admitted last (the backend's answer: `host`, or
    /// an on-chip head).
    pub fn picker(&self) -> &'static str {
        self.backend.picker(self.last_admitted)
    }

    /// KV caches held.
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Requests running.
    pub fn active(&self) -> usize {
        self.slots.iter().filter(|s| s.run.is_some()).count()
    }

    /// Whether another request can start now.
    pub fn has_idle_slot(&self) -> bool {
        self.slots.iter().any(|s| s.run.is_none())
    }

    /// Forgets every idle slot's KV cache contents.
    pub fn reset(&mut self) {
        for s in self.slots.iter_mut().filter(|s| s.run.is_none()) {
            s.cached.clear();
            s.owner = None;
        }
        self.backend.reset();
    }

    /// Token ids of a request's prompt.
    ///
    /// # Errors
    /// Tokenizer failure, or chat input without a template.
    pub fn prompt_tokens(&self, input: &Input) -> Result<Vec<u32>, EngineError> {
        self.prompt_tokens_thinking(input, false)
    }

    /// The same with thinking on or off ([`Request::thinking`]).
    ///
    /// # Errors
    /// Tokenizer failure, or chat input without a template.
    pub fn prompt_tokens_thinking(&self, input: &Input, thinking: bool) -> Result<Vec<u32>, EngineError> {
        Ok(match input {
            Input::Text(t) => self.tokenizer.encode(t, true)?,
            Input::Chat(messages) => {
                let template = self.template.ok_or(EngineError::NoTemplate)?;
                let mut parts = Vec::new();
                template.render_parts(messages, thinking, &mut parts);
                let mut ids = self.bos();
                self.encode_parts(&parts, &mut ids)?;
                ids
            }
            Input::Tokens(ids) => ids.clone(),
        })
    }

    /// Starts a request in an idle slot (see [`slots::choose`]): checks it, tokenizes its
    /// prompt and keeps the cached prefix. `affinity` names a text-mode connection, whose
    /// slot is kept for its next turn. Returns the slot; [`Engine::step`] then runs it.
    ///
    /// # Errors
    /// Bad settings, a prompt that does not fit, tokenizer failures; no idle slot (a
    /// programming error of the caller: [`EngineError::Busy`]).
    pub fn admit(&mut self, request: Request, affinity: Option<u64>) -> Result<usize, EngineError> {
        let started = Instant::now();
        request.sampling.validate().map_err(EngineError::Sampling)?;
        if let Some(n) = request.max_tokens.filter(|&n| n > MAX_ANSWER_TOKENS) {
            return Err(EngineError::Sampling(format!(
                "max_tokens must be at most {MAX_ANSWER_TOKENS}, got {n}"
            )));
        }
        let context = self.backend.info().context_length;
        // A JSON document's grammar would constrain the reasoning as well as the answer: such
        // an answer is written with thinking off. (A Lark grammar is the tool layer's: it lets
        // free text, and so a reasoning, come first, or the tool layer turns thinking off.)
        let thinking = request.thinking
            && !matches!(request.shape, Some(Shape::Schema(_) | Shape::AnyJson))
            && matches!(request.input, Input::Chat(_))
            && self.template.is_some_and(ChatTemplate::thinks);
        let (prompt, dropped_messages) = match &request.input {
            Input::Chat(messages) if request.drop_old_turns => {
                self.fit_conversation(messages, answer_room(&request, context), thinking)?
            }
            input => (self.prompt_tokens_thinking(input, thinking)?, 0),
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
        let chosen = {
            let views: heapless::Vec<SlotView<'_>, MAX_SLOTS> = self
                .slots
                .iter()
                .map(|s| SlotView {
                    cached: &s.cached,
                    owner: s.owner,
                    last_used: s.last_used,
                    idle: s.run.is_none(),
                })
                .collect();
            slots::choose(&views, &prompt, affinity)
        };
        let i = chosen.ok_or(EngineError::Busy)?;
        let constraint = match &request.shape {
            Some(shape) => Some(self.grammars.compile(shape)?),
            None => None,
        };
        self.backend.configure_sampling(i, &request.sampling)?;
        if constraint.is_some() {
            // The mask is applied to logits: the host picks this request's tokens.
            self.backend.sample_on_host(i)?;
        }
        self.clock += 1;
        self.last_admitted = i;
        let slot = &mut self.slots[i];
        // Reuse the cached prefix; at least the last prompt token is recomputed for its logits.
        let reuse = slots::common_prefix(&slot.cached, &prompt).min(prompt.len() - 1);
        slot.cached.truncate(reuse);
        slot.owner = affinity;
        slot.last_used = self.clock;
        slot.sampler.reconfigure(request.sampling.clone());
        slot.sampler.reset(Some(&prompt));
        slot.stream.clear();
        slot.held.clear();
        slot.split.reset();
        slot.constraint = constraint;
        slot.run = Some(Run {
            summary: Summary {
                reason: FinishReason::Eos,
                prompt_tokens: prompt.len(),
                cached_tokens: reuse,
                completion_tokens: 0,
                dropped_messages,
                prompt_time: Duration::ZERO,
                time_to_first_token: Duration::ZERO,
                generation_time: Duration::ZERO,
                picker: self.backend.picker(i),
            },
            request,
            prompt,
            started,
            first_token_at: None,
            pending: None,
            waiting: false,
            thinking,
        });
        Ok(i)
    }

    /// One step of every running request: each decoding slot runs its next token and the
    /// prompts still being fed run their next chunk, all in one backend call (the CPU computes
    /// them in one pass over the weights). Cancelled and timed-out requests end first. Returns
    /// whether anything ran.
    ///
    /// # Errors
    /// A device failure, after every request it touched was told ([`Clients::finished`]).
    pub fn step(&mut self, clients: &mut dyn Clients) -> Result<bool, BackendError> {
        let now = Instant::now();
        for i in 0..self.slots.len() {
            let Some(run) = &mut self.slots[i].run else { continue };
            let reason = if clients.cancelled(i) {
                FinishReason::Cancelled
            } else if run.request.deadline.is_some_and(|d| now >= d) {
                FinishReason::TimeLimit
            } else if run.pending.is_none() {
                continue;
            } else {
                match clients.ready(i) {
                    Ok(ready) => {
                        run.waiting = !ready;
                        continue;
                    }
                    Err(reason) => reason,
                }
            };
            self.finish(i, reason, clients);
        }
        self.plan_step();
        if self.step_spans.is_empty() {
            return Ok(false);
        }
        crate::faults::slow_step(
            self.step_spans.iter().any(|s| !s.decode),
            self.step_spans.iter().any(|s| s.decode),
        );
        let Engine {
            backend,
            slots,
            step_tokens,
            step_spans,
            ..
        } = self;
        let mut picked: heapless::Vec<(usize, Option<u32>), MAX_SLOTS> = heapless::Vec::new();
        let result = backend.step(step_tokens, step_spans, &mut |i, next| {
            let slot = step_spans[i].slot;
            let token = copy_out(next, &mut slots[slot].logits);
            // At most one output per slot per step: the push cannot fail.
            let _ = picked.push((slot, token));
        });
        if let Err(e) = result {
            let spans = std::mem::take(&mut self.step_spans);
            for s in &spans {
                self.slots[s.slot].cached.clear();
                if self.slots[s.slot].run.take().is_some() {
                    clients.finished(s.slot, Err(EngineError::Backend(e.clone())));
                }
            }
            self.step_spans = spans;
            return if matches!(e, BackendError::Device { .. }) {
                Err(e)
            } else {
                Ok(true)
            };
        }
        let mut at = 0;
        for s in self.step_spans.iter() {
            let slot = &mut self.slots[s.slot];
            slot.cached.extend_from_slice(&self.step_tokens[at..at + s.len]);
            at += s.len;
        }
        for &(slot, device_token) in &picked {
            if let Some(reason) = self.take_token(slot, device_token, clients) {
                self.finish(slot, reason, clients);
            }
        }
        clients.progress();
        Ok(true)
    }

    /// Fills `step_tokens` / `step_spans`: one token for each decoding slot, then prompt
    /// chunks (oldest request first) up to the backend's batch.
    fn plan_step(&mut self) {
        self.step_tokens.clear();
        self.step_spans.clear();
        for (i, slot) in self.slots.iter().enumerate() {
            if let Some(token) = slot.run.as_ref().filter(|r| !r.waiting).and_then(|r| r.pending) {
                self.step_tokens.push(token);
                // Capacity is one span per slot: the push cannot fail to fit.
                self.step_spans.push(Span {
                    slot: i,
                    start: slot.cached.len(),
                    len: 1,
                    output: true,
                    decode: true,
                });
            }
        }
        let batch = self.backend.info().max_batch.max(1);
        let mut order: heapless::Vec<(u64, usize), MAX_SLOTS> = heapless::Vec::new();
        for (i, slot) in self.slots.iter().enumerate() {
            if slot.run.as_ref().is_some_and(|r| r.pending.is_none()) {
                let _ = order.push((slot.last_used, i));
            }
        }
        order.sort_unstable();
        for &(_, i) in &order {
            let room = batch.saturating_sub(self.step_tokens.len());
            if room == 0 {
                break;
            }
            let slot = &mut self.slots[i];
            let Some(run) = &slot.run else { continue };
            let done = slot.cached.len();
            let len = (run.prompt.len() - done).min(room);
            self.step_tokens.extend_from_slice(&run.prompt[done..done + len]);
            self.step_spans.push(Span {
                slot: i,
                start: done,
                len,
                output: done + len == run.prompt.len(),
                decode: false,
            });
        }
    }

    /// What follows an output for `slot`: the token chosen (by the device, or sampled here),
    /// its text sent; `Some(reason)` when the request ends.
    fn take_token(&mut self, i: usize, device_token: Option<u32>, clients: &mut dyn Clients) -> Option<FinishReason> {
        let context = self.backend.info().context_length;
        let slot = &mut self.slots[i];
        let run = slot.run.as_mut()?;
        if run.pending.is_none() {
            run.summary.prompt_time = run.started.elapsed();
        }
        // `max_tokens: 0` asks for the prompt only, as llama.cpp's n_predict 0 does.
        if run.request.max_tokens == Some(0) {
            return Some(FinishReason::Length);
        }
        let token = match device_token {
            Some(t) => t,
            None => {
                if run.request.ignore_eos {
                    for &t in self.tokenizer.eog_tokens() {
                        if let Some(l) = slot.logits.get_mut(t as usize) {
                            *l = f32::NEG_INFINITY;
                        }
                    }
                }
                if let Some(c) = slot.constraint.as_mut() {
                    if let Err(e) = c.mask(&mut slot.logits) {
                        return self.fail(i, e, clients);
                    }
                }
                slot.sampler.sample(&mut slot.logits)
            }
        };
        // A shaped answer stays the model's: its grammar would refuse the script.
        let token = if self.script.is_empty() || run.request.shape.is_some() {
            token
        } else {
            let eog = self.tokenizer.eog_tokens().first().copied();
            self.script
                .get(run.summary.completion_tokens)
                .copied()
                .or(eog)
                .unwrap_or(token)
        };
        slot.sampler.accept(token);
        if run.first_token_at.is_none() {
            let now = Instant::now();
            run.summary.time_to_first_token = now - run.started;
            run.first_token_at = Some(now);
        }
        if self.tokenizer.is_eog(token) && !run.request.ignore_eos {
            return Some(FinishReason::Eos);
        }
        let complete = match slot.constraint.as_mut().map(|c| c.advance(token)) {
            Some(Err(e)) => return self.fail(i, e, clients),
            Some(Ok(progress)) => progress == Progress::Complete,
            None => false,
        };
        run.summary.completion_tokens += 1;
        slot.piece.clear();
        slot.stream.push(self.tokenizer.token_bytes(token), &mut slot.piece);
        let released = if run.thinking {
            release_split(
                &mut slot.split,
                &mut slot.held,
                &slot.piece,
                &run.request.stop,
                i,
                clients,
            )
        } else {
            release_text(&mut slot.held, &slot.piece, &run.request.stop, &mut |piece| {
                clients.text(i, piece)
            })
        };
        match released {
            Ok(false) => {}
            Ok(true) => return Some(FinishReason::Stop),
            Err(reason) => return Some(reason),
        }
        if complete {
            // The document is whole and nothing may follow: the answer's natural end.
            return Some(FinishReason::Eos);
        }
        if run
            .request
            .max_tokens
            .is_some_and(|m| run.summary.completion_tokens >= m)
        {
            return Some(FinishReason::Length);
        }
        if slot.cached.len() >= context {
            return Some(FinishReason::Context);
        }
        crate::faults::stall_decode(run.summary.completion_tokens as u64);
        run.pending = Some(token);
        None
    }

    /// Ends the request in slot `i` with an error from its grammar.
    fn fail(&mut self, i: usize, e: GrammarError, clients: &mut dyn Clients) -> Option<FinishReason> {
        let slot = &mut self.slots[i];
        slot.held.clear();
        slot.constraint = None;
        if slot.run.take().is_some() {
            clients.finished(i, Err(EngineError::Grammar(e)));
        }
        None
    }

    /// Ends the request in slot `i`.
    fn finish(&mut self, i: usize, reason: FinishReason, clients: &mut dyn Clients) {
        let slot = &mut self.slots[i];
        let Some(mut run) = slot.run.take() else { return };
        slot.constraint = None;
        // Text held for a possible stop string is real output when no stop string came.
        if !matches!(
            reason,
            FinishReason::Stop | FinishReason::Cancelled | FinishReason::TimeLimit | FinishReason::SlowClient
        ) {
            slot.stream.finish();
            if run.thinking {
                // What the splitter held (an unfinished tag) is text of its kind; content
                // still passes the stop strings.
                let _ = finish_split(&mut slot.split, &mut slot.held, &run.request.stop, i, clients);
            }
            if !slot.held.is_empty() {
                let _ = clients.text(i, &slot.held);
            }
        }
        slot.held.clear();
        run.summary.reason = reason;
        if let Some(t) = run.first_token_at {
            run.summary.generation_time = t.elapsed();
        }
        clients.finished(i, Ok(run.summary));
    }

    /// Runs one request to its end alone (the command line, tests), streaming text into
    /// `sink`. `cancel` is checked between steps; setting it ends the generation with reason
    /// `cancelled` within one token.
    ///
    /// # Errors
    /// Bad settings, a prompt that does not fit, tokenizer or backend failures.
    pub fn generate(
        &mut self,
        req: &Request,
        cancel: &AtomicBool,
        sink: &mut dyn Sink,
    ) -> Result<Summary, EngineError> {
        let slot = self.admit(req.clone(), None)?;
        let mut one = One {
            slot,
            cancel,
            sink,
            result: None,
        };
        loop {
            let stepped = self.step(&mut one);
            if let Some(result) = one.result.take() {
                return result;
            }
            match stepped {
                Ok(true) => {}
                Ok(false) => return Err(EngineError::Busy),
                Err(e) => return Err(e.into()),
            }
        }
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
    fn fit_conversation(
        &self,
        messages: &[Message],
        room: usize,
        thinking: bool,
    ) -> Result<(Vec<u32>, usize), EngineError> {
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
        // What each message is to Qwen3's template (after the last question, the last one) is
        // the same whichever turns are dropped: the last turn is always kept.
        let last_query = crate::chat::last_query(messages);
        let place = |state: &mut RenderState, i: usize| {
            state.after_last_query = last_query.is_some_and(|q| i > q);
            state.last = i + 1 == messages.len();
        };
        let mut head_state = RenderState::default();
        let mut head = self.bos();
        if keep_first == 1 {
            place(&mut head_state, 0);
            template.message(&messages[0], &mut head_state, &mut parts);
            head.extend(encode(&parts)?);
        }
        parts.clear();
        template.cue_thinking(thinking, &mut parts);
        let cue = encode(&parts)?;
        // Every turn once, in order: how it renders when the turns before it are kept. (What
        // a turn carries into the next depends only on that turn, as each turn after the
        // first starts with a user message: so this is its form whichever earlier turn the
        // kept part starts at.)
        let mut rest = Vec::with_capacity(turns.len());
        let mut state = head_state.clone();
        for turn in &turns {
            parts.clear();
            for i in turn.clone() {
                place(&mut state, i);
                template.message(&messages[i], &mut state, &mut parts);
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
                for i in turns[first].clone() {
                    place(&mut state, i);
                    template.message(&messages[i], &mut state, &mut parts);
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
}

/// [`Engine::generate`]'s one request, seen as the engine's clients.
struct One<'a> {
    slot: usize,
    cancel: &'a AtomicBool,
    sink: &'a mut dyn Sink,
    result: Option<Result<Summary, EngineError>>,
}

impl Clients for One<'_> {
    fn text(&mut self, slot: usize, piece: &str) -> Result<(), FinishReason> {
        if slot != self.slot || self.sink.text(piece) {
            Ok(())
        } else {
            Err(self.sink.refusal())
        }
    }

    fn reasoning(&mut self, slot: usize, piece: &str) -> Result<(), FinishReason> {
        if slot != self.slot || self.sink.reasoning(piece) {
            Ok(())
        } else {
            Err(self.sink.refusal())
        }
    }

    fn cancelled(&self, slot: usize) -> bool {
        slot == self.slot && self.cancel.load(Ordering::Relaxed)
    }

    fn progress(&mut self) {
        self.sink.progress();
    }

    fn finished(&mut self, slot: usize, result: Result<Summary, EngineError>) {
        if slot == self.slot {
            self.result = Some(result);
        }
    }
}

/// The tokens of the test build's scripted answer, if one is armed (none in a release build).
fn scripted_tokens(tokenizer: &Tokenizer) -> Vec<u32> {
    let Some(text) = crate::faults::script() else {
        return Vec::new();
    };
    match tokenizer.encode(&text, false) {
        Ok(ids) => {
            log::warn!("fault injected: every answer is the {} tokens of {text:?}", ids.len());
            ids
        }
        Err(e) => {
            log::error!("fault injected: the script cannot be encoded: {e}");
            Vec::new()
        }
    }
}

/// A piece of a thinking answer through its splitter: reasoning goes out as it comes, content
/// through [`release_text`] (stop strings apply to the content only). `Ok(true)`: a stop string
/// came.
fn release_split(
    split: &mut Splitter,
    held: &mut String,
    piece: &str,
    stop: &[StopString],
    slot: usize,
    clients: &mut dyn Clients,
) -> Result<bool, FinishReason> {
    let mut stopped = false;
    let sent = split.push(piece, &mut |kind, text| {
        route(kind, text, held, stop, slot, clients, &mut stopped)
    });
    settle(sent, stopped)
}

/// What a thinking answer's splitter still holds, when the answer ends.
fn finish_split(
    split: &mut Splitter,
    held: &mut String,
    stop: &[StopString],
    slot: usize,
    clients: &mut dyn Clients,
) -> Result<bool, FinishReason> {
    let mut stopped = false;
    let sent = split.finish(&mut |kind, text| route(kind, text, held, stop, slot, clients, &mut stopped));
    settle(sent, stopped)
}

/// One run of a thinking answer to its client. A stop string in the content ends the split
/// (`stopped`, and an error that [`settle`] takes back).
fn route(
    kind: Kind,
    text: &str,
    held: &mut String,
    stop: &[StopString],
    slot: usize,
    clients: &mut dyn Clients,
    stopped: &mut bool,
) -> Result<(), FinishReason> {
    match kind {
        Kind::Reasoning => clients.reasoning(slot, text),
        Kind::Content => {
            if release_text(held, text, stop, &mut |piece| clients.text(slot, piece))? {
                *stopped = true;
                return Err(FinishReason::Stop);
            }
            Ok(())
        }
    }
}

fn settle(sent: Result<(), FinishReason>, stopped: bool) -> Result<bool, FinishReason> {
    match sent {
        Ok(()) => Ok(false),
        Err(_) if stopped => Ok(true),
        Err(reason) => Err(reason),
    }
}

/// Moves `piece` into the held text and sends what can no longer be part of a stop string.
/// `Ok(true)`: a stop string came (the text before it was sent).
fn release_text(
    held: &mut String,
    piece: &str,
    stop: &[StopString],
    emit: &mut dyn FnMut(&str) -> Result<(), FinishReason>,
) -> Result<bool, FinishReason> {
    held.push_str(piece);
    if stop.is_empty() {
        let sent = if held.is_empty() { Ok(()) } else { emit(held) };
        held.clear();
        return sent.map(|()| false);
    }
    if let Some(at) = stop
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| held.find(s.as_str()))
        .min()
    {
        if at > 0 {
            let _ = emit(&held[..at]);
        }
        held.clear();
        return Ok(true);
    }
    // Keep the longest tail that is a prefix of a stop string.
    let mut keep = 0;
    for s in stop {
        for (i, _) in held.char_indices() {
            let tail = &held[i..];
            if tail.len() > keep && s.starts_with(tail) {
                keep = tail.len();
            }
        }
    }
    let send = held.len() - keep;
    if send > 0 {
        let sent = emit(&held[..send]);
        held.drain(..send);
        sent?;
    }
    Ok(false)
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
