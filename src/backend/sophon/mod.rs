//! The Sophon BM1684X backend: a TPU-MLIR-compiled bmodel driven through the vendor runtime,
//! loaded at run time (docs/tpu.md). The runtime's C API, declared by hand and loaded with
//! `libloading` ([`ffi`]); device and device-memory handles with traffic counters
//! ([`device`]); a loaded bmodel with its nets described in plain Rust values ([`runtime`]);
//! the Llama contract checked against those nets ([`contract`]); the cost model of a prompt's
//! route through the chip ([`plan`]); the embedding table of a bmodel without embedding
//! nets ([`table`]); and the Llama forward pass on it, [`SophonBackend`] ([`llama`]).

pub mod contract;
pub mod device;
pub mod ffi;
pub mod llama;
pub mod plan;
pub mod runtime;
pub mod table;

pub use llama::{SophonBackend, SophonError, SophonOptions};
