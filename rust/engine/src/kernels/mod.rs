//! Quantized matrix kernels of our own, for tensor types where Candle's CPU backend has no
//! SIMD implementation (Q4_1, the type of the SmolLM2 demo model: Candle runs it through its
//! scalar `vec_dot_unopt`), and a direct route to Candle's compact K-quant kernels that avoids
//! its repacked copies ([`compact`]). Every other type goes through Candle's `QMatMul`.

pub mod compact;
pub mod q4_1;
