//! Numeric kernels over slices, shared by the CPU backend and the tests. `quant` holds the block
//! formats and the portable dot products (the reference), `matmul` the unit of work of a matrix
//! product, `simd` the hand-written SIMD kernels behind the safe `Kernels` type, `interleave`
//! the Q4_0 layout of the AVX-512 kernel, `ops` and `half` the small float operations.

pub mod half;
pub mod interleave;
pub mod matmul;
pub mod ops;
pub mod quant;
pub mod simd;
