//! Quantized matrix kernels of our own, multiplying weights in place in the file's memory map:
//! Q4_1 (the type of the SmolLM2 demo model, where Candle's CPU backend runs its scalar
//! `vec_dot_unopt`), Q8_0 (SmolLM2's tied output; Candle copies it and keeps a repacked copy
//! too), and Q4_K/Q6_K ([`compact`], [`kquant`]). Every other type goes through Candle's
//! `QMatMul`.
//! [`attention`] is the CPU attention and [`ggml`] the CPU's elementwise steps, both in
//! llama.cpp's order of operations.

use std::sync::Arc;

/// `unsafe { $simd }` where the build has AVX2, FMA and F16C, else `$scalar`: the kernels choose
/// their SIMD code at compile time, from the build's target features. `$simd` may rely on
/// every target feature the build enables (AVX-512 included, where it does). Defined before
/// the kernel modules, so it is in scope in all of them.
macro_rules! avx2_or {
    ($simd:expr, $scalar:expr) => {{
        #[cfg(avx2)]
        // SAFETY: the build enables AVX2, FMA and F16C, and whatever else `$simd` requires of it.
        let value = unsafe { $simd };
        #[cfg(not(avx2))]
        let value = $scalar;
        value
    }};
}

/// Runs `$each` for the activation rows `0..$m` in tiles of up to four rows, with `$i` the
/// tile's first row and `$acts` an array of its rows (`$act(row)` each), so that a kernel
/// generic over the array's length takes a tile at once: a weight block loaded once serves
/// every row of the tile.
macro_rules! in_tiles_of_four {
    ($m:expr, $act:expr, |$i:ident, $acts:ident| $each:expr) => {{
        let mut $i = 0;
        while $i < $m {
            let n = ($m - $i).min(4);
            match n {
                4 => {
                    let $acts: [_; 4] = std::array::from_fn(|j| $act($i + j));
                    $each
                }
                3 => {
                    let $acts: [_; 3] = std::array::from_fn(|j| $act($i + j));
                    $each
                }
                2 => {
                    let $acts: [_; 2] = std::array::from_fn(|j| $act($i + j));
                    $each
                }
                _ => {
                    let $acts = [$act($i)];
                    $each
                }
            }
            $i += n;
        }
    }};
}

/// `$tile.$dot::<P>($args)` for `P` the pairs of rows of `$tile.x` (an [`x86::Pairs`], 1 to 4):
/// the AVX-512 decode tiles' kernels are generic over it, so that their accumulators are
/// registers.
#[cfg(avx512)]
macro_rules! by_pairs {
    ($tile:ident . $dot:ident ($($arg:expr),*)) => {
        match $tile.x.pairs() {
            1 => $tile.$dot::<1>($($arg),*),
            2 => $tile.$dot::<2>($($arg),*),
            3 => $tile.$dot::<3>($($arg),*),
            _ => $tile.$dot::<4>($($arg),*),
        }
    };
}

pub mod attention;
pub mod compact;
pub mod ggml;
pub mod kquant;
pub mod q4_1;
pub mod q8_0;
#[cfg(avx2)]
mod x86;

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

/// Calls `f` with the values of `t`, a float32 tensor: its storage itself, borrowed, when it is
/// in host memory and contiguous (the activations the CPU kernels read, so that each step does
/// not first copy them: for a 512-token prompt through the 3B shape's MLP, 22 MB a copy), else
/// a copy.
pub fn with_host_f32<R>(
    t: &candle_core::Tensor,
    f: impl FnOnce(&[f32]) -> R,
) -> candle_core::Result<R> {
    if t.dtype() == candle_core::DType::F32 && t.is_contiguous() {
        let (storage, layout) = t.storage_and_layout();
        if let candle_core::Storage::Cpu(cpu) = &*storage {
            let all = cpu.as_slice::<f32>()?;
            return Ok(f(&all[layout.start_offset()..][..t.elem_count()]));
        }
    }
    Ok(f(&t.flatten_all()?.to_vec1::<f32>()?))
}

/// A block type of a quantized matrix, as stored in the file.
pub trait Block {
    /// Values per block.
    const VALUES: usize;
}

/// A weight matrix `[rows, cols]` as the file stores it, rows of `cols / B::VALUES` blocks,
/// that a kernel multiplies in place (its `matmul` is in the block type's module).
pub struct BlockMatrix<B> {
    bytes: Bytes,
    rows: usize,
    cols: usize,
    block: std::marker::PhantomData<B>,
}

impl<B: Block> BlockMatrix<B> {
    /// `None` unless `cols` is whole blocks and `bytes` are exactly that block array, aligned
    /// for `B`.
    pub fn new(bytes: Bytes, rows: usize, cols: usize) -> Option<Self> {
        if !cols.is_multiple_of(B::VALUES) {
            return None;
        }
        as_blocks::<B>((*bytes).as_ref(), rows * cols / B::VALUES)?;
        Some(Self {
            bytes,
            rows,
            cols,
            block: std::marker::PhantomData,
        })
    }

    pub(crate) fn blocks(&self) -> &[B] {
        as_blocks((*self.bytes).as_ref(), self.rows * self.cols / B::VALUES)
            .expect("checked in new")
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }
}

/// How far ahead of the weight block being read the dot-product loops prefetch (bytes).
/// Decode reads every weight once per token, in file order, so the loops are memory streams;
/// with compute between the loads the hardware prefetchers fall behind (`examples/kernels.rs`
/// measures it; the figures are in docs/performance.md, kernel constants).
const PREFETCH_AHEAD: usize = 2048;

/// Asks for the cache lines of the block `PREFETCH_AHEAD` bytes after `block` to be brought
/// into L1. Rows of a matrix are contiguous, so this runs on into the next row; a prefetch
/// past the end of the mapping is harmless (prefetches never fault, and the address is only
/// computed, never dereferenced).
///
/// Only the SIMD loops call it: the scalar ones are the definitions the SIMD code is tested
/// against.
#[cfg_attr(not(avx2), allow(dead_code))]
#[inline(always)]
pub(crate) fn prefetch_ahead<T>(block: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let p = (block as *const T as *const i8).wrapping_add(PREFETCH_AHEAD);
        for line in 0..std::mem::size_of::<T>().div_ceil(64) {
            // SAFETY: PREFETCH is a hint: it has no architectural effect and cannot fault.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64 * line)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = block;
}

/// The threads the kernels split their work over: Candle's barrier pool, which Candle's own
/// quantized kernels use too, so that one pool serves every product. Its size is read once, from
/// `CANDLE_NUM_THREADS`, which `Engine::load` sets from `n_threads` before the pool exists:
/// Candle offers no other way to size it.
#[inline]
pub(crate) fn pool() -> &'static candle_core::utils::BarrierPool {
    candle_core::utils::barrier_pool()
}

/// The output of a matmul (or of other work split over the pool) whose elements are written
/// by the pool's chunks.
pub(crate) struct SharedOut<T = f32>(pub(crate) *mut T);
// SAFETY: the kernels' `execute_chunked` chunks write disjoint elements.
unsafe impl<T: Send> Sync for SharedOut<T> {}

impl SharedOut {
    /// Writes weight row `r`'s outputs for the activation rows `i..i + vs.len()` into a
    /// product `[m, rows]`.
    ///
    /// # Safety
    /// Those elements are in bounds and written by no other chunk.
    pub(crate) unsafe fn put_column(&self, rows: usize, i: usize, r: usize, vs: &[f32]) {
        for (j, &v) in vs.iter().enumerate() {
            *self.0.add((i + j) * rows + r) = v;
        }
    }
}

/// Work over at least this many values goes to the pool's threads; below it, waking them costs
/// more than it saves. Batched decode and prompts otherwise leave the second thread waiting
/// while one quantizes activations or computes SwiGLU, with the pool's worker spinning.
pub(crate) const PARALLEL_VALUES: usize = 16 * 1024;

/// `x`'s blocks of `n` values each, quantized by `quantize`, on the pool's threads when there
/// are at least [`PARALLEL_VALUES`] values. Each block is quantized alone, so the blocks are
/// the same either way.
pub(crate) fn quantize_blocks<T: Copy + Send>(
    x: &[f32],
    n: usize,
    quantize: impl Fn(&[f32]) -> T + Sync,
) -> Vec<T> {
    assert!(x.len().is_multiple_of(n), "whole blocks");
    if x.len() < PARALLEL_VALUES {
        return x.chunks_exact(n).map(quantize).collect();
    }
    let count = x.len() / n;
    let mut out: Vec<T> = Vec::with_capacity(count);
    let dst = SharedOut(out.as_mut_ptr());
    pool().execute_chunked(count, |range| {
        let dst = &dst;
        for i in range {
            // SAFETY: i < count = the capacity, and each index is written by one chunk.
            unsafe { dst.0.add(i).write(quantize(&x[i * n..(i + 1) * n])) };
        }
    });
    // SAFETY: the chunks covered 0..count (a panic in one would have unwound past here), and
    // T is Copy, so nothing needs dropping.
    unsafe { out.set_len(count) };
    out
}

/// 32 activations quantized to bytes as ggml's Q8 quantizers take them (Q8_0, Q8_1):
/// `id = 127 / max|x|` (0 when every value is 0), each `x · id` rounded half to even.
/// Returns `max|x|`, the bytes and their sum.
pub(crate) fn quantize_i8(x: &[f32]) -> (f32, [i8; 32], i32) {
    avx2_or!(x86::quantize_32(x), quantize_i8_scalar(x))
}

/// [`quantize_i8`]'s definition.
#[cfg_attr(avx2, allow(dead_code))]
fn quantize_i8_scalar(x: &[f32]) -> (f32, [i8; 32], i32) {
    assert_eq!(x.len(), 32);
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let qs: [i8; 32] = std::array::from_fn(|j| (x[j] * id).round_ties_even() as i8);
    (amax, qs, qs.iter().map(|&q| q as i32).sum())
}

/// The kernels' tests' pseudo-random numbers (a linear congruential generator, top 24 bits),
/// so that their matrices are the same from run to run.
#[cfg(test)]
pub(crate) fn test_rng(seed: u32) -> impl FnMut() -> u32 {
    let mut state = seed;
    move || {
        state = state.wrapping_mul(1664525).wrapping_add(1013904223);
        state >> 8
    }
}

/// Which SIMD the CPU kernels of this build use, fixed when it was compiled: `"avx512"`
/// (AVX-512 F/BW/VNNI panels and tiles, over AVX2), `"avx2"` (AVX2, FMA and F16C) or `"scalar"`.
/// Candle's own quantized kernels follow the same target features.
pub const fn simd() -> &'static str {
    if cfg!(avx512) {
        "avx512"
    } else if cfg!(avx2) {
        "avx2"
    } else {
        "scalar"
    }
}

/// The SIMD levels the running CPU supports, best first, from CPUID (not from how this build
/// was compiled). Each is a build of the portable wheel and needs every feature that build is
/// compiled with: `"avx2"` is x86-64-v3 (AVX2, FMA, F16C, BMI1/2, LZCNT, MOVBE), `"avx512"`
/// x86-64-v4 (AVX-512 F, BW, CD, DQ, VL) with VNNI.
pub fn cpu_levels() -> Vec<&'static str> {
    let mut out = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let v3 = has!("avx2")
            && has!("fma")
            && has!("f16c")
            && has!("bmi1")
            && has!("bmi2")
            && has!("lzcnt")
            && has!("movbe");
        let v4 = v3
            && has!("avx512f")
            && has!("avx512bw")
            && has!("avx512cd")
            && has!("avx512dq")
            && has!("avx512vl");
        if v4 && has!("avx512vnni") {
            out.push("avx512");
        }
        if v3 {
            out.push("avx2");
        }
    }
    out.push("scalar");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejects_wrong_sizes<B: Block>() {
        let bytes = |n: usize| -> Bytes { Arc::new(vec![0u8; n]) };
        let size = std::mem::size_of::<B>();
        assert!(BlockMatrix::<B>::new(bytes(size), 1, B::VALUES + 1).is_none());
        assert!(BlockMatrix::<B>::new(bytes(size - 1), 1, B::VALUES).is_none());
        assert!(BlockMatrix::<B>::new(bytes(size), 1, B::VALUES).is_some());
    }

    #[test]
    fn quantize_blocks_is_the_serial_map_on_the_pool_too() {
        let quantize = |b: &[f32]| (b[0], b.iter().sum::<f32>());
        for n in [PARALLEL_VALUES / 2, 3 * PARALLEL_VALUES] {
            let x: Vec<f32> = (0..n).map(|i| (i % 1013) as f32 * 0.5).collect();
            let want: Vec<(f32, f32)> = x.chunks_exact(32).map(quantize).collect();
            assert_eq!(quantize_blocks(&x, 32, quantize), want, "{n} values");
        }
    }

    #[test]
    fn quantize_i8_is_its_definition() {
        let mut next = test_rng(3);
        let mut blocks: Vec<Vec<f32>> = (0..2000)
            .map(|k| {
                let scale = [1e-6, 0.01, 1.0, 300.0][k % 4];
                (0..32)
                    .map(|_| (next() % 20001) as f32 / 10000.0 * scale - scale)
                    .collect()
            })
            .collect();
        // Zeros, halves that round to even, and values at the clamp.
        blocks.push(vec![0.0; 32]);
        blocks.push((0..32).map(|j| j as f32 - 16.5).collect());
        blocks.push(
            (0..32)
                .map(|j| [127.0, -127.0, 0.5, -63.5][j % 4])
                .collect(),
        );
        for x in &blocks {
            let (a, b) = (quantize_i8(x), quantize_i8_scalar(x));
            assert_eq!(
                (a.0.to_bits(), a.1, a.2),
                (b.0.to_bits(), b.1, b.2),
                "{x:?}"
            );
        }
    }

    #[test]
    fn block_matrices_reject_wrong_sizes() {
        rejects_wrong_sizes::<q4_1::BlockQ4_1>();
        rejects_wrong_sizes::<q8_0::BlockQ8_0>();
    }
}
