//! llama-tpu: a Llama daemon for the Sophgo BM1684X TPU, with a pure-Rust CPU reference backend.
//!
//! # Layout
//! Data flows one way: transport → protocol → queue → engine → backend → kernels, and tokens
//! back. docs/architecture.md has every module, what it imports and where to add things.
//!
//! - [`model`]: model files: the GGUF parser (pure, capped), tensor types, the read-only
//!   mapping, the Llama hyper-parameters.
//! - [`kernels`]: numeric kernels over slices: block formats and dot products, matrix rows,
//!   norms, RoPE, softmax; the SIMD kernels (AVX2, AVX-512 VNNI, NEON) behind a safe type.
//! - [`backend`]: the [`backend::Backend`] interface (prefill, decode, reset, limits) and its
//!   implementations; backends know nothing of serving.
//! - [`tokenizer`]: text ↔ token ids through the `tokenizers` crate, built from a GGUF
//!   vocabulary, a `tokenizer.json` or a SentencePiece `tokenizer.model`, and a streaming
//!   detokenizer that only emits whole UTF-8 characters.
//! - [`sampler`]: seeded, allocation-free token choice (greedy, temperature, top-k/p, min-p,
//!   repetition, frequency and presence penalties).
//! - [`chat`]: chat templates (ChatML, Llama-2, Llama-3), recognized from GGUF metadata.
//! - [`engine`]: turns a request into streamed text and a summary; owns the backend.
//! - [`server`]: the daemon's serving side: UNIX-socket, serial and HTTP transports, line
//!   framing, the pure request parsers, sessions, per-client outbound buffers, the bounded
//!   queue, the engine thread and the metrics.
//! - [`sys`]: systemd notification and watchdog, signals, journal-friendly logging, the heap's
//!   setup.
//! - [`faults`]: the test build's fault points (compiled to nothing in a release build).
//! - [`cli`]: the `llama-tpu` command line (`run`, `info`, `tokenize`, `bench`, `serve`, `ask`,
//!   `chat`).
#![deny(missing_docs)]
#![deny(unsafe_code)]

pub mod backend;
pub mod chat;
pub mod cli;
pub mod engine;
pub mod faults;
pub mod kernels;
pub mod model;
pub mod reasoning;
pub mod sampler;
pub mod server;
pub mod sys;
pub mod tokenizer;
