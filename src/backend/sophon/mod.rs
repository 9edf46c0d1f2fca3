//! The Sophon BM1684X backend (issue 4, in progress): a TPU-MLIR-compiled bmodel driven
//! through the vendor runtime, loaded at run time. So far: the runtime's C API, declared by
//! hand and loaded with `libloading` ([`ffi`]); device and device-memory handles ([`device`]);
//! a loaded bmodel with its nets described in plain Rust values ([`runtime`]); the Llama
//! contract checked against those nets ([`contract`]).

pub mod contract;
pub mod device;
pub mod ffi;
pub mod llama;
pub mod plan;
pub mod runtime;

pub use llama::{SophonBackend, SophonError, SophonOptions};
