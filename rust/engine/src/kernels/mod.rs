//! Quantized matrix kernels of our own, multiplying weights in place in the file's memory map:
//! Q4_1 (the type of the SmolLM2 demo model, where Candle's CPU backend runs its scalar
//! `vec_dot_unopt`), Q8_0 (SmolLM2's tied output; Candle copies it and keeps a repacked copy
//! too), and Q4_K/Q6_K ([`compact`], [`kquant`]). Every other type goes through Candle's
//! `QMatMul`.
//! [`attention`] is the CPU attention and [`ggml`] the CPU's elementwise steps, both in
//! llama.cpp's order of operations.

use std::sync::Arc;

pub mod attention;
pub mod compact;
pub mod ggml;
pub mod kquant;
pub mod q4_1;
pub mod q8_0;

/// A weight tensor's bytes as stored in the file: a slice of its memory map (owned bytes in
/// tests).
pub type Bytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// `bytes` as an array of `n` blocks of `T`, if it is exactly that long and aligned for `T`.
pub(crate) fn as_blocks<T>(bytes: &[u8], n: usize) -> Option<&[T]> {
    if bytes.len() != n * std::mem::size_of::<T>()
        || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
    {
        return None;
    }
    // SAFETY: the callers' block types are plain old data (integers and f16, `repr(C)`), so any
    // bytes are valid; length and alignment are checked above, and the slice borrows `bytes`.
    Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, n) })
}

/// The output of a matmul whose rows or columns are written by the pool's chunks.
pub(crate) struct SharedOut(pub(crate) *mut f32);
// SAFETY: the kernels' `execute_chunked` chunks write disjoint elements.
unsafe impl Sync for SharedOut {}
