//! Q4_1 weights times F32 activations, the way llama.cpp computes it: activations are
//! quantized to Q8_1 blocks (round half to even, block sum `s = d * Σq` rounded once), then
//! each output is Σ_blocks d_w·d_x·Σ(q_w·q_x) + m_w·s_x, with AVX2 where the build has it (one
//! row's products four weight rows at a time), and with AVX-512 tiles of a decode step's rows
//! and panels of a prompt's.

use half::f16;

use super::{quantize_blocks, Block, BlockMatrix, SharedOut};

const QK: usize = 32;

/// One Q4_1 block as stored in GGUF: scale, minimum, 32 nibbles.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ4_1 {
    d: f16,
    m: f16,
    qs: [u8; QK / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);

impl Block for BlockQ4_1 {
    const VALUES: usize = QK;
}

#[repr(C)]
#[derive(Clone, Copy)]
struct BlockQ8_1 {
    d: f32,
    /// d * Σq, rounded through f16 as llama.cpp stores it.
    s: f32,
    qs: [i8; QK],
}

/// A Q4_1 weight matrix `[rows, cols]`, multiplied in place in the file's bytes.
pub type Matrix = BlockMatrix<BlockQ4_1>;

impl Matrix {
    /// `dst[i, r] = Σ_c x[i, c] · W[r, c]` for the `m` rows of `x` (`[m, cols]` row-major);
    /// `dst` is `[m, rows]`.
    pub fn matmul(&self, x: &[f32], m: usize, dst: &mut [f32]) {
        assert_eq!(x.len(), m * self.cols);
        assert_eq!(dst.len(), m * self.rows);
        let nb = self.cols / QK;
        let xq = quantize_blocks(x, QK, quantize_q8_1);
        let rows = self.rows;
        let blocks = self.blocks();
        #[cfg(avx512)]
        if m >= 2 {
            // SAFETY: the build enables AVX-512 F, BW and VNNI.
            unsafe {
                if m >= PANEL_ROWS {
                    avx512::matmul_panels(blocks, rows, nb, &xq, m, dst)
                } else {
                    avx512::matmul_tiles(blocks, rows, nb, &xq, m, dst)
                }
            };
            return;
        }
        let act = |i: usize| &xq[i * nb..(i + 1) * nb];
        let row = |r: usize| &blocks[r * nb..(r + 1) * nb];
        let out = SharedOut(dst.as_mut_ptr());
        if m == 1 {
            // Decode: weight rows four at a time (the last few one by one), so that each
            // activation block loaded serves four sums.
            let x = act(0);
            crate::kernels::pool().execute_chunked(rows.div_ceil(4), |fours| {
                let out = &out;
                for r in fours.map(|f| 4 * f) {
                    let n = (rows - r).min(4);
                    let vs = if n == 4 {
                        dot_rows(std::array::from_fn(|j| row(r + j)), x)
                    } else {
                        std::array::from_fn(|j| if j < n { dot(row(r + j), [x])[0] } else { 0.0 })
                    };
                    // SAFETY: outputs `r..r + n` of the one row are written by this chunk only.
                    unsafe { std::ptr::copy_nonoverlapping(vs.as_ptr(), out.0.add(r), n) };
                }
            });
            return;
        }
        crate::kernels::pool().execute_chunked(rows, |range| {
            let out = &out;
            for r in range {
                in_tiles_of_four!(m, act, |i, acts| {
                    // SAFETY: each (i + j, r) is written by exactly one chunk.
                    unsafe { out.put_column(rows, i, r, &dot(row(r), acts)) };
                });
            }
        });
    }
}

fn quantize_q8_1(x: &[f32]) -> BlockQ8_1 {
    let (amax, qs, sum) = super::quantize_i8(x);
    let d = amax / 127.0;
    BlockQ8_1 {
        d: f16::from_f32(d).to_f32(),
        s: f16::from_f32(d * sum as f32).to_f32(),
        qs,
    }
}

/// Dot products of one weight row against `R` activation rows, each summed exactly as it is
/// alone: a row's result never depends on the rows beside it.
fn dot<const R: usize>(w: &[BlockQ4_1], x: [&[BlockQ8_1]; R]) -> [f32; R] {
    avx2_or!(dot_avx2(w, x), x.map(|x| dot_scalar(w, x)))
}

#[cfg_attr(avx2, allow(dead_code))]
fn dot_scalar(w: &[BlockQ4_1], x: &[BlockQ8_1]) -> f32 {
    let mut sum = 0f32;
    for (wb, xb) in w.iter().zip(x) {
        let mut acc = 0i32;
        for j in 0..QK / 2 {
            acc += (wb.qs[j] & 0x0F) as i32 * xb.qs[j] as i32;
            acc += (wb.qs[j] >> 4) as i32 * xb.qs[j + QK / 2] as i32;
        }
        sum += wb.d.to_f32() * xb.d * acc as f32 + wb.m.to_f32() * xb.s;
    }
    sum
}

/// Dot products of four weight rows against one activation row, each summed exactly as
/// [`dot`] sums it alone.
fn dot_rows(w: [&[BlockQ4_1]; 4], x: &[BlockQ8_1]) -> [f32; 4] {
    avx2_or!(dot_rows_avx2(w, x), w.map(|w| dot_scalar(w, x)))
}

/// ggml's AVX2 order for each row: per block, `d_w·d_x` times the eight lanes' four-value
/// integer sums with a fused multiply-add, the minima's `m_w·s_x` summed apart, then the
/// lanes added as `hsum_float_8` adds them. Each weight block is unpacked once for the `R`
/// rows, whose sums are independent chains.
#[cfg(avx2)]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2<const R: usize>(w: &[BlockQ4_1], x: [&[BlockQ8_1]; R]) -> [f32; R] {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); R];
    let mut summs = [0f32; R];
    for (b, wb) in w.iter().enumerate() {
        super::prefetch_ahead(wb);
        let (wd, wm) = (wb.d.to_f32(), wb.m.to_f32());
        // 32 nibbles -> 32 bytes: low nibbles are elements 0..16, high nibbles 16..32.
        let qw = super::x86::nibbles_16(wb.qs.as_ptr());
        for r in 0..R {
            let xb = x[r].get_unchecked(b);
            summs[r] += wm * xb.s;
            let d = _mm256_set1_ps(wd * xb.d);
            let qx = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
            let quads = super::x86::quad_sums(qw, qx);
            acc[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(quads), acc[r]);
        }
    }
    std::array::from_fn(|r| super::x86::hsum8(acc[r]) + summs[r])
}

/// [`dot_avx2`]'s sums for four weight rows: four independent chains, which one core keeps in
/// flight together, and less work per block shared among them: one load of the activations,
/// and the rows' scales and minima converted and multiplied by the activation's scale and sum
/// in one vector (`[d_0, m_0, d_1, m_1, …]` times `[d_x, s_x, d_x, s_x, …]`), lane by lane the
/// same products `d_w·d_x` and `m_w·s_x` that [`dot_avx2`] takes one row at a time.
#[cfg(avx2)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_rows_avx2(w: [&[BlockQ4_1]; 4], x: &[BlockQ8_1]) -> [f32; 4] {
    use std::arch::x86_64::*;
    assert!(w.iter().all(|w| w.len() == x.len()));
    let mut acc = [_mm256_setzero_ps(); 4];
    // Lane 2r + 1 sums row r's m_w·s_x; the even lanes are not read.
    let mut summs = _mm256_setzero_ps();
    for (b, xb) in x.iter().enumerate() {
        let qx = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
        // `d` and `s` are adjacent in the block: [d_x, s_x] in each 64-bit lane.
        let ds = std::ptr::read_unaligned(xb as *const BlockQ8_1 as *const f64);
        let ds = _mm256_castpd_ps(_mm256_set1_pd(ds));
        // Each weight block starts with its f16 scale and minimum.
        let dm = |r: usize| std::ptr::read_unaligned(w[r].as_ptr().add(b) as *const i32);
        let dm = _mm256_cvtph_ps(_mm_setr_epi32(dm(0), dm(1), dm(2), dm(3)));
        let scaled = _mm256_mul_ps(dm, ds);
        summs = _mm256_add_ps(summs, scaled);
        for (r, acc) in acc.iter_mut().enumerate() {
            let wb = w[r].get_unchecked(b);
            super::prefetch_ahead(wb);
            let qw = super::x86::nibbles_16(wb.qs.as_ptr());
            let d = _mm256_permutevar8x32_ps(scaled, _mm256_set1_epi32(2 * r as i32));
            let quads = super::x86::quad_sums(qw, qx);
            *acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(quads), *acc);
        }
    }
    let mut summs_r = [0f32; 8];
    _mm256_storeu_ps(summs_r.as_mut_ptr(), summs);
    std::array::from_fn(|r| super::x86::hsum8(acc[r]) + summs_r[2 * r + 1])
}

/// Activation rows from which products go through weight panels ([`avx512`]).
#[cfg_attr(not(avx512), allow(dead_code))]
const PANEL_ROWS: usize = 24;

/// Prompts with AVX-512: 16 weight rows at a time are repacked into a panel (vector lane i holds
/// four consecutive values of row i), so that one `vpdpbusd` against four broadcast activation
/// bytes advances 16 outputs. Each output is still summed exactly as [`dot_avx2`] sums it,
/// which is ggml's order: eight partial sums of four-value products over the blocks, each
/// block's scaled by `d_w · d_x` with a fused multiply-add, then added as ggml's `hsum_float_8`
/// adds them, then the block minima's sum. Only the work is shared, not the order changed.
#[cfg(avx512)]
mod avx512 {
    use super::{BlockQ4_1, BlockQ8_1, SharedOut, QK};
    use crate::kernels::x86::Pairs;
    use std::arch::x86_64::*;

    const PANEL: usize = 16;
    /// Activation rows per pass over a panel: two hold their 16 accumulators in registers.
    const PASS: usize = 2;

    struct Panel {
        /// `vals[b * 8 + l]`: values `4l..4l + 4` of block `b` of the panel's rows, lane by lane.
        vals: Vec<__m512i>,
        d: Vec<f32>,
        m: Vec<f32>,
    }

    impl Panel {
        unsafe fn pack(&mut self, w: &[BlockQ4_1], nb: usize, r0: usize, n: usize) {
            for b in 0..nb {
                let vals = self.vals.as_mut_ptr().add(b * 8) as *mut u32;
                for i in 0..PANEL {
                    let (mut q, mut d, mut m) = ([0u8; QK], 0f32, 0f32);
                    if i < n {
                        let wb = &w[(r0 + i) * nb + b];
                        for j in 0..QK / 2 {
                            q[j] = wb.qs[j] & 0x0F;
                            q[j + QK / 2] = wb.qs[j] >> 4;
                        }
                        (d, m) = (wb.d.to_f32(), wb.m.to_f32());
                    }
                    for l in 0..QK / 4 {
                        let quad = [q[4 * l], q[4 * l + 1], q[4 * l + 2], q[4 * l + 3]];
                        *vals.add(l * PANEL + i) = u32::from_le_bytes(quad);
                    }
                    self.d[b * PANEL + i] = d;
                    self.m[b * PANEL + i] = m;
                }
            }
        }

        // Indexing by the activation row and the partial sum keeps the accumulators in
        // registers, and reads as the order it must keep.
        #[allow(clippy::needless_range_loop)]
        #[inline(always)]
        unsafe fn pass<const R: usize>(&self, nb: usize, x: [&[BlockQ8_1]; R]) -> [__m512; R] {
            let mut acc = [[_mm512_setzero_ps(); 8]; R];
            let mut summs = [_mm512_setzero_ps(); R];
            for b in 0..nb {
                let wd = _mm512_loadu_ps(self.d.as_ptr().add(b * PANEL));
                let wm = _mm512_loadu_ps(self.m.as_ptr().add(b * PANEL));
                let mut d = [_mm512_setzero_ps(); R];
                for r in 0..R {
                    let xb = x[r].get_unchecked(b);
                    summs[r] = _mm512_add_ps(summs[r], _mm512_mul_ps(wm, _mm512_set1_ps(xb.s)));
                    d[r] = _mm512_mul_ps(wd, _mm512_set1_ps(xb.d));
                }
                for l in 0..8 {
                    let wv = *self.vals.as_ptr().add(b * 8 + l);
                    for r in 0..R {
                        let q = x[r].get_unchecked(b).qs.as_ptr().add(4 * l) as *const i32;
                        let p = _mm512_dpbusd_epi32(
                            _mm512_setzero_si512(),
                            wv,
                            _mm512_set1_epi32(q.read_unaligned()),
                        );
                        acc[r][l] = _mm512_fmadd_ps(d[r], _mm512_cvtepi32_ps(p), acc[r][l]);
                    }
                }
            }
            let mut out = [_mm512_setzero_ps(); R];
            for r in 0..R {
                let a = &acc[r];
                let even = _mm512_add_ps(_mm512_add_ps(a[0], a[4]), _mm512_add_ps(a[2], a[6]));
                let odd = _mm512_add_ps(_mm512_add_ps(a[1], a[5]), _mm512_add_ps(a[3], a[7]));
                out[r] = _mm512_add_ps(_mm512_add_ps(even, odd), summs[r]);
            }
            out
        }
    }

    /// Up to eight activation rows of a decode step, for [`Tile::dot`].
    struct Tile {
        x: Pairs,
        /// `s[b]`: the block sums of the tile's rows, row `j` in lane `j`.
        s: Vec<__m256>,
    }

    impl Tile {
        /// Rows `first..first + n` of `xq`.
        unsafe fn pack(xq: &[BlockQ8_1], nb: usize, first: usize, n: usize) -> Self {
            let block = |i: usize, b: usize| &xq[i * nb + b];
            let s = (0..nb).map(|b| {
                let s: [f32; 8] =
                    std::array::from_fn(|j| if j < n { block(first + j, b).s } else { 0.0 });
                _mm256_loadu_ps(s.as_ptr())
            });
            Tile {
                s: s.collect(),
                x: Pairs::pack(first, n, nb, |i, b| (&block(i, b).qs, block(i, b).d)),
            }
        }

        /// Weight row `w` against the tile's `2 * P` rows, each summed in [`super::dot_avx2`]'s
        /// order: per block, `d_w · d_x` times the eight four-value sums with a fused
        /// multiply-add into eight lanes, the minima's `m_w · s_x` apart, then the lanes added
        /// as `hsum_float_8` adds them. The same operations on the same values, two rows a
        /// vector: each row's result is the one it has alone.
        #[inline(always)]
        unsafe fn dot<const P: usize>(&self, w: &[BlockQ4_1]) -> [f32; Pairs::ROWS] {
            let mut acc = [_mm512_setzero_ps(); P];
            let mut summs = _mm256_setzero_ps();
            for (b, wb) in w.iter().enumerate() {
                crate::kernels::prefetch_ahead(wb);
                let (wd, wm) = (wb.d.to_f32(), wb.m.to_f32());
                let qw = crate::kernels::x86::nibbles_16_x2(wb.qs.as_ptr());
                let s = *self.s.get_unchecked(b);
                summs = _mm256_add_ps(summs, _mm256_mul_ps(_mm256_set1_ps(wm), s));
                let wd = _mm512_set1_ps(wd);
                for (p, acc) in acc.iter_mut().enumerate() {
                    let i = b * P + p;
                    let x = *self.x.qs.get_unchecked(i);
                    let sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), qw, x);
                    let d = _mm512_mul_ps(wd, *self.x.d.get_unchecked(i));
                    *acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(sums), *acc);
                }
            }
            let mut s = [0f32; 8];
            _mm256_storeu_ps(s.as_mut_ptr(), summs);
            let mut out = Pairs::sums(&acc);
            for (o, s) in out.iter_mut().zip(s) {
                *o += s;
            }
            out
        }
    }

    /// Decode steps of 2 to [`super::PANEL_ROWS`]` - 1` rows: each weight row is read once for every
    /// tile of eight activation rows, which [`Tile::dot`] multiplies two to a vector.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn matmul_tiles(
        w: &[BlockQ4_1],
        rows: usize,
        nb: usize,
        xq: &[BlockQ8_1],
        m: usize,
        dst: &mut [f32],
    ) {
        let tiles = Pairs::tiles(m, |first, n| Tile::pack(xq, nb, first, n));
        let out = SharedOut(dst.as_mut_ptr());
        crate::kernels::pool().execute_chunked(rows, |range| {
            let out = &out;
            for r in range {
                let wr = &w[r * nb..(r + 1) * nb];
                for t in &tiles {
                    let v = by_pairs!(t.dot(wr));
                    // SAFETY: each (t.x.first + j, r) is written by exactly one chunk.
                    out.put_column(rows, t.x.first, r, &v[..t.x.rows]);
                }
            }
        });
    }

    /// `dst[i, r]` for the `m` activation rows `xq` (`nb` blocks each); `dst` is `[m, rows]`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn matmul_panels(
        w: &[BlockQ4_1],
        rows: usize,
        nb: usize,
        xq: &[BlockQ8_1],
        m: usize,
        dst: &mut [f32],
    ) {
        let out = SharedOut(dst.as_mut_ptr());
        let act = |i: usize| &xq[i * nb..(i + 1) * nb];
        crate::kernels::pool().execute_chunked(rows.div_ceil(PANEL), |panels| {
            let out = &out;
            let mut panel = Panel {
                vals: vec![_mm512_setzero_si512(); nb * 8],
                d: vec![0.0; nb * PANEL],
                m: vec![0.0; nb * PANEL],
            };
            for p in panels {
                let r0 = p * PANEL;
                let n = PANEL.min(rows - r0);
                panel.pack(w, nb, r0, n);
                let mask: __mmask16 = if n == PANEL { !0 } else { (1 << n) - 1 };
                // SAFETY: each panel's rows are written by one chunk only; the mask keeps the
                // store within row i's `rows` outputs.
                let put =
                    |i: usize, v: __m512| _mm512_mask_storeu_ps(out.0.add(i * rows + r0), mask, v);
                let mut i = 0;
                while i + PASS <= m {
                    let v = panel.pass::<PASS>(nb, [act(i), act(i + 1)]);
                    (0..PASS).for_each(|j| put(i + j, v[j]));
                    i += PASS;
                }
                if i < m {
                    put(i, panel.pass::<1>(nb, [act(i)])[0]);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(rows: usize, cols: usize, seed: u32) -> (Vec<u8>, Vec<f32>) {
        // Random blocks, and the dequantized weights they stand for.
        let mut next = crate::kernels::test_rng(seed);
        let mut bytes = Vec::new();
        let mut dense = Vec::new();
        for _ in 0..rows * cols / QK {
            let d = f16::from_f32((next() % 1000) as f32 / 20000.0);
            let m = f16::from_f32(-((next() % 1000) as f32) / 10000.0);
            let qs: Vec<u8> = (0..16).map(|_| (next() & 0xFF) as u8).collect();
            bytes.extend_from_slice(&d.to_le_bytes());
            bytes.extend_from_slice(&m.to_le_bytes());
            bytes.extend_from_slice(&qs);
            let mut block = [0f32; QK];
            for j in 0..16 {
                block[j] = d.to_f32() * (qs[j] & 0xF) as f32 + m.to_f32();
                block[j + 16] = d.to_f32() * (qs[j] >> 4) as f32 + m.to_f32();
            }
            dense.extend_from_slice(&block);
        }
        (bytes, dense)
    }

    #[test]
    fn matches_dense_matmul() {
        let (rows, cols, m) = (48, 128, 3);
        let (bytes, dense) = matrix(rows, cols, 7);
        let w = Matrix::new(std::sync::Arc::new(bytes), rows, cols).unwrap();
        let x: Vec<f32> = (0..m * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let mut out = vec![0f32; m * rows];
        w.matmul(&x, m, &mut out);
        for i in 0..m {
            for r in 0..rows {
                let exact: f32 = (0..cols)
                    .map(|c| x[i * cols + c] * dense[r * cols + c])
                    .sum();
                let got = out[i * rows + r];
                // Q8_1 activations: about 1% of the magnitude.
                assert!(
                    (got - exact).abs() < 0.02 * (1.0 + exact.abs()),
                    "{got} vs {exact}"
                );
            }
        }
        // The SIMD and scalar dots agree.
        let xq: Vec<BlockQ8_1> = x[..cols].chunks_exact(QK).map(quantize_q8_1).collect();
        let a = dot_scalar(&w.blocks()[..cols / QK], &xq);
        let [b] = dot(&w.blocks()[..cols / QK], [&xq]);
        assert!((a - b).abs() < 1e-3 * (1.0 + a.abs()), "{a} vs {b}");
    }

    /// Products of several rows (tiles of a decode step's rows, and the panels of prompts
    /// with AVX-512) and decode's four weight rows at a time give exactly the one-row dot's
    /// sums, bit for bit: they share work, not change the order of the additions.
    #[test]
    fn many_rows_sum_exactly_as_one_row() {
        let (rows, cols) = (37, 256);
        let (bytes, _) = matrix(rows, cols, 9);
        let w = Matrix::new(std::sync::Arc::new(bytes), rows, cols).unwrap();
        for m in [1, 2, 7, 8, 9, 16, 23, 27] {
            let x: Vec<f32> = (0..m * cols)
                .map(|i| ((i * 53 % 211) as f32 - 105.0) / 40.0)
                .collect();
            let mut out = vec![0f32; m * rows];
            w.matmul(&x, m, &mut out);
            let nb = cols / QK;
            for i in 0..m {
                let xq: Vec<BlockQ8_1> = x[i * cols..(i + 1) * cols]
                    .chunks_exact(QK)
                    .map(quantize_q8_1)
                    .collect();
                for r in 0..rows {
                    let [one] = dot(&w.blocks()[r * nb..(r + 1) * nb], [&xq]);
                    assert_eq!(
                        out[i * rows + r].to_bits(),
                        one.to_bits(),
                        "{m} rows: ({i}, {r})"
                    );
                }
            }
        }
    }
}
