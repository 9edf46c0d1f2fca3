//! Numeric kernels: free functions over slices, shared by the CPU backend and the tests.
//! `quant` and `matmul` are the hot ones.

pub mod half;
pub mod interleave;
pub mod matmul;
pub mod ops;
pub mod quant;
pub mod simd;
