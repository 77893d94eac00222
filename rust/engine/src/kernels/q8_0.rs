//! Q8_0 weights times F32 activations, read in place in the file's memory map, the way
//! llama.cpp computes it: activations are quantized to Q8_0 blocks (`d = max|x| / 127` stored
//! as f16, `x · 127 / max|x|` rounded half to even), and each output is the sum over blocks of
//! `d_w · d_x · Σ q_w·q_x`, accumulated in eight lanes of four-value integer sums with a fused
//! multiply-add per block and added as ggml's `hsum_float_8` adds them.
//!
//! Candle's `QMatMul` would copy a Q8_0 matrix out of the file, and on machines with AVX-512
//! VNNI keep a repacked copy beside that one (SmolLM2's tied output: 30 MB each). Here no copy
//! is made. Each weight block is loaded once for up to four activation rows (eight, two to a
//! vector, with AVX-512), and every output is summed the same way whatever the number of rows:
//! a row's result never depends on the batch it came in.

use half::f16;

use super::ggml::hsum8;
use super::{quantize_blocks, Block, BlockMatrix, SharedOut};

/// Values per block.
pub const QK: usize = 32;
/// Bytes per block: the f16 scale, then the 32 values.
pub const BLOCK_BYTES: usize = 34;
/// Weight rows walked per activation tile, so their blocks stay in cache across the tiles.
const ROW_GROUP: usize = 16;

/// One Q8_0 block as stored in GGUF (and as the activations are quantized): scale, 32 values.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ8_0 {
    d: f16,
    qs: [i8; QK],
}
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == BLOCK_BYTES);

impl Block for BlockQ8_0 {
    const VALUES: usize = QK;
}

/// A Q8_0 weight matrix `[rows, cols]`, multiplied in place in the file's bytes.
pub type Matrix = BlockMatrix<BlockQ8_0>;

impl Matrix {
    /// `dst[i, r] = Σ_c x[i, c] · W[r, c]` for the `m` rows of `x` (`[m, cols]` row-major);
    /// `dst` is `[m, rows]`.
    pub fn matmul(&self, x: &[f32], m: usize, dst: &mut [f32]) {
        assert_eq!(x.len(), m * self.cols);
        assert_eq!(dst.len(), m * self.rows);
        let (rows, nb) = (self.rows, self.cols / QK);
        let xq = quantize_blocks(x, QK, quantize);
        let blocks = self.blocks();
        #[cfg(avx512)]
        if m >= 2 {
            // SAFETY: the build enables AVX-512 F, BW and VNNI.
            unsafe { avx512::matmul_tiles(blocks, rows, nb, &xq, m, dst) };
            return;
        }
        let act = |i: usize| &xq[i * nb..(i + 1) * nb];
        let out = SharedOut(dst.as_mut_ptr());
        crate::kernels::pool().execute_chunked(rows.div_ceil(ROW_GROUP), |groups| {
            let out = &out;
            for g in groups {
                in_tiles_of_four!(m, act, |i, acts| {
                    for r in g * ROW_GROUP..rows.min((g + 1) * ROW_GROUP) {
                        let w = &blocks[r * nb..(r + 1) * nb];
                        // SAFETY: each (i + j, r) is written by exactly one chunk.
                        unsafe { out.put_column(rows, i, r, &dot(w, acts)) };
                    }
                });
            }
        });
    }
}

/// ggml's `quantize_row_q8_0` for one block.
fn quantize(x: &[f32]) -> BlockQ8_0 {
    let (amax, qs, _) = super::quantize_i8(x);
    BlockQ8_0 {
        d: f16::from_f32(amax / 127.0),
        qs,
    }
}

/// `x` (whole blocks) quantized as ggml quantizes it, in GGUF's bytes: each block its scale
/// (little-endian f16), then its 32 values.
pub fn quantize_rows(x: &[f32]) -> Vec<u8> {
    let blocks = quantize_blocks(x, QK, quantize);
    let mut out = Vec::with_capacity(blocks.len() * BLOCK_BYTES);
    for b in &blocks {
        out.extend_from_slice(&b.d.to_le_bytes());
        out.extend(b.qs.iter().map(|&q| q as u8));
    }
    out
}

/// The values of [`quantize_rows`]'s bytes, `d · q` each, into `out` (as long as they hold).
pub fn dequantize_rows(bytes: &[u8], out: &mut [f32]) {
    assert_eq!(bytes.len() / BLOCK_BYTES * QK, out.len());
    for (b, out) in bytes
        .chunks_exact(BLOCK_BYTES)
        .zip(out.chunks_exact_mut(QK))
    {
        let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
        for (o, &q) in out.iter_mut().zip(&b[2..]) {
            *o = d * (q as i8) as f32;
        }
    }
}

/// Dot products of one weight row against `R` activation rows.
fn dot<const R: usize>(w: &[BlockQ8_0], x: [&[BlockQ8_0]; R]) -> [f32; R] {
    avx2_or!(dot_avx2(w, x), x.map(|x| dot_scalar(w, x)))
}

/// The definition, in the order of the SIMD code: lane `l` of eight sums values `4l..4l + 4`
/// of every block, each block's integer sum scaled with a fused multiply-add.
#[cfg_attr(avx2, allow(dead_code))]
fn dot_scalar(w: &[BlockQ8_0], x: &[BlockQ8_0]) -> f32 {
    let mut acc = [0f32; 8];
    for (wb, xb) in w.iter().zip(x) {
        let d = wb.d.to_f32() * xb.d.to_f32();
        for (l, a) in acc.iter_mut().enumerate() {
            let s: i32 = (4 * l..4 * l + 4)
                .map(|j| wb.qs[j] as i32 * xb.qs[j] as i32)
                .sum();
            *a = d.mul_add(s as f32, *a);
        }
    }
    hsum8(acc)
}

#[cfg(avx2)]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2<const R: usize>(w: &[BlockQ8_0], x: [&[BlockQ8_0]; R]) -> [f32; R] {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); R];
    for (b, wb) in w.iter().enumerate() {
        super::prefetch_ahead(wb);
        let qw = _mm256_loadu_si256(wb.qs.as_ptr() as *const __m256i);
        // |w| against x with w's sign: an unsigned-by-signed product that cannot overflow.
        let aw = _mm256_sign_epi8(qw, qw);
        let dw = wb.d.to_f32();
        for r in 0..R {
            let xb = x[r].get_unchecked(b);
            let qx = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
            let sx = _mm256_sign_epi8(qx, qw);
            let quads = super::x86::quad_sums(aw, sx);
            let d = _mm256_set1_ps(dw * xb.d.to_f32());
            acc[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(quads), acc[r]);
        }
    }
    acc.map(|a| super::x86::hsum8(a))
}

/// Steps of several rows with AVX-512: two activation rows to a vector
/// ([`crate::kernels::x86::Pairs`]).
#[cfg(avx512)]
mod avx512 {
    use super::{BlockQ8_0, SharedOut, ROW_GROUP};
    use crate::kernels::x86::Pairs;
    use std::arch::x86_64::*;

    /// Up to eight activation rows, for [`Tile::dot`].
    struct Tile {
        x: Pairs,
        /// `fix[b * pairs + p]`: `-128` times each four values' sum, which `vpdpbusd` adds
        /// back when it multiplies the weights made unsigned (`q_w + 128`).
        fix: Vec<__m512i>,
    }

    impl Tile {
        /// Rows `first..first + n` of `xq`.
        unsafe fn pack(xq: &[BlockQ8_0], nb: usize, first: usize, n: usize) -> Self {
            let x = Pairs::pack(first, n, nb, |i, b| {
                let xb = &xq[i * nb + b];
                (&xb.qs, xb.d.to_f32())
            });
            // 128 · Σ q, negated: `vpdpbusd` of bytes of 128 against the values.
            let (zero, bias) = (_mm512_setzero_si512(), _mm512_set1_epi8(-128));
            let fix =
                x.qs.iter()
                    .map(|&q| _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, bias, q)));
            Tile {
                fix: fix.collect(),
                x,
            }
        }

        /// Weight row `w` against the tile's `2 * P` rows, each summed as [`super::dot_scalar`]
        /// sums it: the same integer four-value sums (`Σ (q_w + 128)·q_x - 128·Σ q_x`), scaled
        /// by `d_w · d_x` with a fused multiply-add into eight lanes, added as `hsum_float_8`
        /// adds them. Each row's result is the one it has alone.
        #[inline(always)]
        unsafe fn dot<const P: usize>(&self, w: &[BlockQ8_0]) -> [f32; Pairs::ROWS] {
            let mut acc = [_mm512_setzero_ps(); P];
            let bias = _mm512_set1_epi8(-128);
            for (b, wb) in w.iter().enumerate() {
                crate::kernels::prefetch_ahead(wb);
                let qw = _mm256_loadu_si256(wb.qs.as_ptr() as *const __m256i);
                let qw = _mm512_xor_si512(_mm512_broadcast_i64x4(qw), bias);
                let wd = _mm512_set1_ps(wb.d.to_f32());
                for (p, acc) in acc.iter_mut().enumerate() {
                    let i = b * P + p;
                    let fix = *self.fix.get_unchecked(i);
                    let sums = _mm512_dpbusd_epi32(fix, qw, *self.x.qs.get_unchecked(i));
                    let d = _mm512_mul_ps(wd, *self.x.d.get_unchecked(i));
                    *acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(sums), *acc);
                }
            }
            Pairs::sums(&acc)
        }
    }

    /// `dst[i, r]` for the `m` activation rows `xq` (`nb` blocks each), in groups of
    /// `ROW_GROUP` weight rows, so that a group stays in cache across the tiles of eight rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn matmul_tiles(
        w: &[BlockQ8_0],
        rows: usize,
        nb: usize,
        xq: &[BlockQ8_0],
        m: usize,
        dst: &mut [f32],
    ) {
        let tiles = Pairs::tiles(m, |first, n| Tile::pack(xq, nb, first, n));
        let out = SharedOut(dst.as_mut_ptr());
        crate::kernels::pool().execute_chunked(rows.div_ceil(ROW_GROUP), |groups| {
            let out = &out;
            for g in groups {
                for t in &tiles {
                    for r in g * ROW_GROUP..rows.min((g + 1) * ROW_GROUP) {
                        let wr = &w[r * nb..(r + 1) * nb];
                        let v = by_pairs!(t.dot(wr));
                        // SAFETY: each (t.x.first + j, r) is written by exactly one chunk.
                        out.put_column(rows, t.x.first, r, &v[..t.x.rows]);
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(rows: usize, cols: usize, seed: u32) -> (Vec<u8>, Vec<f32>) {
        // Random blocks (every byte value, -128 included), and the weights they stand for.
        let mut next = crate::kernels::test_rng(seed);
        let (mut bytes, mut dense) = (Vec::new(), Vec::new());
        for _ in 0..rows * cols / QK {
            let d = f16::from_f32((next() % 1000) as f32 / 50000.0);
            bytes.extend_from_slice(&d.to_le_bytes());
            for _ in 0..QK {
                let q = (next() & 0xFF) as u8;
                bytes.push(q);
                dense.push(d.to_f32() * q as i8 as f32);
            }
        }
        (bytes, dense)
    }

    fn activations(m: usize, cols: usize) -> Vec<f32> {
        (0..m * cols)
            .map(|i| ((i * 53 % 211) as f32 - 105.0) / 40.0)
            .collect()
    }

    #[test]
    fn matches_dense_matmul_and_the_scalar_definition() {
        let (rows, cols, m) = (37, 256, 3);
        let (bytes, dense) = matrix(rows, cols, 7);
        let w = Matrix::new(std::sync::Arc::new(bytes), rows, cols).unwrap();
        let x = activations(m, cols);
        let mut out = vec![0f32; m * rows];
        w.matmul(&x, m, &mut out);
        let nb = cols / QK;
        for i in 0..m {
            let xq: Vec<BlockQ8_0> = x[i * cols..(i + 1) * cols]
                .chunks_exact(QK)
                .map(quantize)
                .collect();
            for r in 0..rows {
                let terms = (0..cols).map(|c| x[i * cols + c] * dense[r * cols + c]);
                let exact: f32 = terms.clone().sum();
                let magnitude: f32 = terms.map(f32::abs).sum();
                let got = out[i * rows + r];
                // Q8_0 activations: each term off by well under 1%.
                assert!((got - exact).abs() < 0.01 * magnitude, "{got} vs {exact}");
                let def = dot_scalar(&w.blocks()[r * nb..(r + 1) * nb], &xq);
                assert_eq!(got.to_bits(), def.to_bits(), "({i}, {r}): {got} vs {def}");
            }
        }
    }

    /// A row's outputs are the same bits whatever the number of rows multiplied with it.
    #[test]
    fn rows_do_not_depend_on_the_batch() {
        let (rows, cols) = (37, 128);
        let (bytes, _) = matrix(rows, cols, 9);
        let w = Matrix::new(std::sync::Arc::new(bytes), rows, cols).unwrap();
        for m in [2, 3, 8, 9, 17] {
            let all = activations(m, cols);
            let mut many = vec![0f32; m * rows];
            w.matmul(&all, m, &mut many);
            for i in 0..m {
                let mut one = vec![0f32; rows];
                w.matmul(&all[i * cols..(i + 1) * cols], 1, &mut one);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                let got = bits(&many[i * rows..(i + 1) * rows]);
                assert_eq!(got, bits(&one), "{m} rows: row {i}");
            }
        }
    }

    #[test]
    fn quantizes_as_ggml() {
        let mut x = [0f32; QK];
        x[..4].copy_from_slice(&[-127.0, 2.5, 3.5, 0.25]); // halves round to even
        let q = quantize(&x);
        assert_eq!(q.d, f16::from_f32(1.0));
        assert_eq!(&q.qs[..4], &[-127, 2, 4, 0]);
        assert_eq!(quantize(&[0.0; QK]).qs, [0; QK]);
    }

    #[test]
    fn rows_keep_their_blocks_bytes() {
        let mut x = [0f32; 2 * QK];
        x[..4].copy_from_slice(&[-127.0, 2.5, 3.5, 0.25]);
        x[QK] = 0.5;
        let bytes = quantize_rows(&x);
        assert_eq!(bytes.len(), 2 * BLOCK_BYTES);
        assert_eq!(&bytes[..2], &f16::from_f32(1.0).to_le_bytes());
        assert_eq!(&bytes[2..6], &[(-127i8) as u8, 2, 4, 0]);
        let mut back = [1f32; 2 * QK];
        dequantize_rows(&bytes, &mut back);
        assert_eq!(&back[..4], &[-127.0, 2.0, 4.0, 0.0]);
        assert_eq!(back[QK], f16::from_f32(0.5 / 127.0).to_f32() * 127.0);
        assert!(back[4..QK].iter().chain(&back[QK + 1..]).all(|&v| v == 0.0));
    }
}
