//! Q4_K and Q6_K weights times F32 activations, reading the weight blocks as stored, with
//! AVX2, or AVX-512 (F, BW, VNNI) where the build has it. Activations are quantized to Q8_K as
//! llama.cpp does (per 256 values: scale `max / -127` of the signed largest magnitude, round
//! half to even, sums of 16); each output is then the integer dot products of the blocks,
//! scaled.
//!
//! The dot products follow ggml's AVX2 ones, with one difference that makes batched streams
//! fast without a second copy of the weights: each weight block is unpacked once for up to
//! `TILE` activation rows (4 with AVX2, 8 with AVX-512), instead of once per row. (Candle's
//! compact kernels unpack it per row; its repacked tiles are faster for many rows but are an
//! expanded copy of the weights kept beside the file's.) For one row the AVX2 kernel is
//! ggml's; the AVX-512 one unpacks a block into four 64-byte planes in the activations' order.
//! Prompts (`PANEL_ROWS` rows and more) go through weight panels with AVX-512 instead: see
//! the panels' section of the `avx512` module.

use half::f16;

use super::{quantize_blocks, SharedOut};

pub const QK_K: usize = 256;
/// Whether the build has the AVX-512 kernels (AVX-512 F, BW and VNNI): they unpack a whole
/// 256-value block in four 64-byte planes, and accumulate the scaled products with VNNI's
/// `vpdpwssd`, about half the instructions of the AVX2 ones.
pub const AVX512: bool = cfg!(avx512);
/// Activation rows sharing one unpacked weight block (at most 8). Eight with AVX-512, whose
/// 32 registers hold their accumulators (measurements: docs/performance.md, kernel constants).
const TILE: usize = if AVX512 { 8 } else { 4 };
/// Activation rows from which products go through weight panels (AVX-512 builds): below
/// it repacking costs more than it saves (docs/performance.md, kernel constants).
#[cfg_attr(not(avx512), allow(dead_code))]
const PANEL_ROWS: usize = 24;
/// Weight rows walked per activation tile, so their blocks stay in cache across the tiles.
const ROW_GROUP: usize = 16;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ4K {
    d: f16,
    dmin: f16,
    scales: [u8; 12],
    qs: [u8; QK_K / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);

#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ6K {
    ql: [u8; QK_K / 2],
    qh: [u8; QK_K / 4],
    scales: [i8; QK_K / 16],
    d: f16,
}
const _: () = assert!(std::mem::size_of::<BlockQ6K>() == 210);

#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ8K {
    d: f32,
    qs: [i8; QK_K],
    bsums: [i16; QK_K / 16],
}

/// A weight block's scales, as [`KBlock::scales`] reads them for the panels (AVX-512 builds).
#[cfg_attr(not(avx512), allow(dead_code))]
pub struct Scales {
    d: f32,
    dmin: f32,
    scales: [i32; 16],
    mins: [i16; 8],
}

/// A weight block type these kernels multiply.
pub trait KBlock: Copy + Sync {
    /// One dot product in plain Rust: the definition the SIMD code is tested against.
    fn scalar(w: &[Self], x: &[BlockQ8K]) -> f32;

    /// `dot` with AVX2, or with AVX-512 where the build has it ([`AVX512`]).
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA, and AVX-512 where `AVX512` is true (the build's target
    /// features guarantee it).
    #[cfg(avx2)]
    unsafe fn simd<const R: usize>(w: &[Self], x: [&[BlockQ8K]; R]) -> [f32; R];

    /// Sub-blocks of 256 values with a scale each (Q4_K: 8, Q6_K: 16), for the panels.
    const SUBS: usize;
    /// Whether sub-blocks have a min (Q4_K) rather than an offset of 32 (Q6_K).
    const MINS: bool;
    /// The block's scales: `d` and `dmin` (zero for Q6_K), the integer scale of each
    /// sub-block, and the integer min of each (Q4_K).
    fn scales(&self) -> Scales;
    /// The block's 256 values in order, in four 64-byte planes.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and BW (the build's target features guarantee it).
    #[cfg(avx512)]
    unsafe fn planes(&self) -> [std::arch::x86_64::__m512i; 4];

    /// Dot products of one weight row against `R` (at most `TILE`) activation rows.
    fn dot<const R: usize>(w: &[Self], x: [&[BlockQ8K]; R]) -> [f32; R] {
        avx2_or!(Self::simd(w, x), x.map(|x| Self::scalar(w, x)))
    }
}

/// `dst[i, r] = Σ_c x[i, c] · W[r, c]` for the `m` rows of `x` (`[m, cols]` row-major) and the
/// weight rows `w` (`rows` rows of `cols / 256` blocks); `dst` is `[m, rows]`.
pub fn matmul<B: KBlock>(w: &[B], rows: usize, cols: usize, x: &[f32], m: usize, dst: &mut [f32]) {
    assert_eq!(cols % QK_K, 0);
    let nb = cols / QK_K;
    assert_eq!(w.len(), rows * nb);
    assert_eq!(x.len(), m * cols);
    assert_eq!(dst.len(), m * rows);
    let xq = quantize_blocks(x, QK_K, quantize_q8k);
    #[cfg(avx512)]
    if m >= PANEL_ROWS {
        // SAFETY: the build enables AVX-512 F, BW and VNNI.
        unsafe { avx512::matmul_panels(w, rows, nb, &xq, m, dst) };
        return;
    }
    let out = SharedOut(dst.as_mut_ptr());
    let act = |i: usize| &xq[i * nb..(i + 1) * nb];
    crate::kernels::pool().execute_chunked(rows.div_ceil(ROW_GROUP), |groups| {
        let out = &out;
        let put = |i: usize, r: usize, v: f32| {
            // SAFETY: each (i, r) is written by exactly one chunk; r < rows, i < m.
            unsafe { *out.0.add(i * rows + r) = v }
        };
        for g in groups {
            let group = g * ROW_GROUP..rows.min((g + 1) * ROW_GROUP);
            let mut i = 0;
            while i < m {
                let n = (m - i).min(TILE);
                for r in group.clone() {
                    let wr = &w[r * nb..(r + 1) * nb];
                    let put_all =
                        |vs: &[f32]| vs.iter().enumerate().for_each(|(j, &v)| put(i + j, r, v));
                    match n {
                        8 => put_all(&B::dot::<8>(wr, std::array::from_fn(|j| act(i + j)))),
                        7 => put_all(&B::dot::<7>(wr, std::array::from_fn(|j| act(i + j)))),
                        6 => put_all(&B::dot::<6>(wr, std::array::from_fn(|j| act(i + j)))),
                        5 => put_all(&B::dot::<5>(wr, std::array::from_fn(|j| act(i + j)))),
                        4 => put_all(&B::dot::<4>(wr, std::array::from_fn(|j| act(i + j)))),
                        3 => put_all(&B::dot::<3>(wr, std::array::from_fn(|j| act(i + j)))),
                        2 => put_all(&B::dot::<2>(wr, std::array::from_fn(|j| act(i + j)))),
                        _ => put_all(&B::dot::<1>(wr, [act(i)])),
                    }
                }
                i += n;
            }
        }
    });
}

/// ggml's `quantize_row_q8_K`: the value of largest magnitude maps to -127.
fn quantize_q8k(x: &[f32]) -> BlockQ8K {
    let mut out = BlockQ8K {
        d: 0.0,
        qs: [0; QK_K],
        bsums: [0; QK_K / 16],
    };
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        return out;
    }
    let iscale = -127.0 / max;
    for (q, &v) in out.qs.iter_mut().zip(x) {
        *q = ((iscale * v).round_ties_even() as i32).min(127) as i8;
    }
    for (s, q) in out.bsums.iter_mut().zip(out.qs.chunks_exact(16)) {
        *s = q.iter().map(|&v| v as i16).sum();
    }
    out.d = 1.0 / iscale;
    out
}

/// The 6-bit scales and mins of a Q4_K block: `(scales[0..8], mins[0..8])`.
fn q4k_scales_mins(s: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut mn) = ([0u8; 8], [0u8; 8]);
    for j in 0..8 {
        if j < 4 {
            sc[j] = s[j] & 63;
            mn[j] = s[j + 4] & 63;
        } else {
            sc[j] = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
            mn[j] = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        }
    }
    (sc, mn)
}

impl KBlock for BlockQ4K {
    #[cfg(avx2)]
    unsafe fn simd<const R: usize>(w: &[Self], x: [&[BlockQ8K]; R]) -> [f32; R] {
        #[cfg(avx512)]
        return avx512::dot_q4k(w, x);
        #[allow(unreachable_code)]
        avx2::dot_q4k(w, x)
    }

    fn scalar(w: &[Self], x: &[BlockQ8K]) -> f32 {
        scalar_dot_q4k(w, x)
    }
    const SUBS: usize = 8;
    const MINS: bool = true;

    fn scales(&self) -> Scales {
        let (sc, mn) = q4k_scales_mins(&self.scales);
        let mut scales = [0; 16];
        for (o, &s) in scales.iter_mut().zip(&sc) {
            *o = s as i32;
        }
        Scales {
            d: self.d.to_f32(),
            dmin: self.dmin.to_f32(),
            scales,
            mins: mn.map(|m| m as i16),
        }
    }

    #[cfg(avx512)]
    #[inline(always)]
    unsafe fn planes(&self) -> [std::arch::x86_64::__m512i; 4] {
        avx512::q4k_planes(self)
    }
}

impl KBlock for BlockQ6K {
    #[cfg(avx2)]
    unsafe fn simd<const R: usize>(w: &[Self], x: [&[BlockQ8K]; R]) -> [f32; R] {
        #[cfg(avx512)]
        return avx512::dot_q6k(w, x);
        #[allow(unreachable_code)]
        avx2::dot_q6k(w, x)
    }

    fn scalar(w: &[Self], x: &[BlockQ8K]) -> f32 {
        scalar_dot_q6k(w, x)
    }
    const SUBS: usize = 16;
    const MINS: bool = false;

    fn scales(&self) -> Scales {
        Scales {
            d: self.d.to_f32(),
            dmin: 0.0,
            scales: self.scales.map(|s| s as i32),
            mins: [0; 8],
        }
    }

    #[cfg(avx512)]
    #[inline(always)]
    unsafe fn planes(&self) -> [std::arch::x86_64::__m512i; 4] {
        avx512::q6k_planes(self)
    }
}

fn scalar_dot_q4k(w: &[BlockQ4K], x: &[BlockQ8K]) -> f32 {
    let mut sum = 0f32;
    for (wb, xb) in w.iter().zip(x) {
        let (sc, mn) = q4k_scales_mins(&wb.scales);
        let (mut dots, mut mins) = (0i32, 0i32);
        for g in 0..8 {
            // 32 values per sub-block: low nibbles of 32 bytes, then their high nibbles.
            let bytes = &wb.qs[(g / 2) * 32..(g / 2) * 32 + 32];
            let shift = if g % 2 == 0 { 0 } else { 4 };
            let d: i32 = (0..32)
                .map(|j| ((bytes[j] >> shift) & 0xF) as i32 * xb.qs[g * 32 + j] as i32)
                .sum();
            dots += sc[g] as i32 * d;
            mins += mn[g] as i32 * (xb.bsums[2 * g] as i32 + xb.bsums[2 * g + 1] as i32);
        }
        sum += xb.d * (wb.d.to_f32() * dots as f32 - wb.dmin.to_f32() * mins as f32);
    }
    sum
}

fn scalar_dot_q6k(w: &[BlockQ6K], x: &[BlockQ8K]) -> f32 {
    let mut sum = 0f32;
    for (wb, xb) in w.iter().zip(x) {
        let mut dots = 0i32;
        for half in 0..2 {
            let (ql, qh) = (&wb.ql[half * 64..], &wb.qh[half * 32..]);
            for l in 0..32 {
                let q = [
                    (ql[l] & 0xF) | ((qh[l] & 3) << 4),
                    (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4),
                    (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                    (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
                ];
                for (k, &q) in q.iter().enumerate() {
                    let idx = half * 128 + k * 32 + l;
                    let scale = wb.scales[idx / 16] as i32;
                    dots += scale * (q as i32 - 32) * xb.qs[idx] as i32;
                }
            }
        }
        sum += xb.d * wb.d.to_f32() * dots as f32;
    }
    sum
}

#[cfg(avx2)]
mod avx2 {
    use super::{q4k_scales_mins, BlockQ4K, BlockQ6K, BlockQ8K, QK_K};
    use crate::kernels::prefetch_ahead;
    use crate::kernels::x86::{hsum8, nibbles};
    use std::arch::x86_64::*;

    /// Broadcasts 16-bit lane `i` (< 8) of each 128-bit half to all lanes of that half.
    #[inline(always)]
    unsafe fn splat_i16(v: __m256i, i: usize) -> __m256i {
        let b = (2 * i) as i8;
        _mm256_shuffle_epi8(
            v,
            _mm256_set1_epi16(i16::from_le_bytes([b as u8, b as u8 + 1])),
        )
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_q4k<const R: usize>(w: &[BlockQ4K], x: [&[BlockQ8K]; R]) -> [f32; R] {
        let mut acc = [_mm256_setzero_ps(); R];
        for (b, wb) in w.iter().enumerate() {
            prefetch_ahead(wb);
            let (sc, mn) = q4k_scales_mins(&wb.scales);
            let mut bytes = [0u8; 16];
            bytes[..8].copy_from_slice(&sc);
            bytes[8..].copy_from_slice(&mn);
            // 16 x i16: scales in lanes 0..8, mins in 8..16.
            let scales_mins =
                _mm256_cvtepu8_epi16(_mm_loadu_si128(bytes.as_ptr() as *const __m128i));
            let mins = _mm256_extracti128_si256(scales_mins, 1);
            let sc128 = _mm256_castsi256_si128(scales_mins);
            let scales = _mm256_set_m128i(sc128, sc128);
            let (d, dmin) = (wb.d.to_f32(), wb.dmin.to_f32());
            let mut sumi = [_mm256_setzero_si256(); R];
            let mut q4 = wb.qs.as_ptr();
            for j in 0..QK_K / 64 {
                let scale_l = splat_i16(scales, 2 * j);
                let scale_h = splat_i16(scales, 2 * j + 1);
                let bits = _mm256_loadu_si256(q4 as *const __m256i);
                q4 = q4.add(32);
                let (lo, hi) = nibbles(bits);
                for r in 0..R {
                    let q8 = x[r].get_unchecked(b).qs.as_ptr().add(64 * j);
                    let pl = _mm256_maddubs_epi16(lo, _mm256_loadu_si256(q8 as *const __m256i));
                    let ph =
                        _mm256_maddubs_epi16(hi, _mm256_loadu_si256(q8.add(32) as *const __m256i));
                    sumi[r] = _mm256_add_epi32(
                        sumi[r],
                        _mm256_add_epi32(
                            _mm256_madd_epi16(scale_l, pl),
                            _mm256_madd_epi16(scale_h, ph),
                        ),
                    );
                }
            }
            for r in 0..R {
                let xb = x[r].get_unchecked(b);
                // Σ mins · (sums of 32 activations), as 4 x i32.
                let bs = _mm256_loadu_si256(xb.bsums.as_ptr() as *const __m256i);
                let q8s =
                    _mm_hadd_epi16(_mm256_castsi256_si128(bs), _mm256_extracti128_si256(bs, 1));
                let pm = _mm256_castsi128_si256(_mm_madd_epi16(mins, q8s));
                let pm = _mm256_permute2x128_si256(pm, pm, 0x80); // upper half zero
                acc[r] = _mm256_fmadd_ps(
                    _mm256_set1_ps(xb.d * d),
                    _mm256_cvtepi32_ps(sumi[r]),
                    acc[r],
                );
                acc[r] =
                    _mm256_fmadd_ps(_mm256_set1_ps(-xb.d * dmin), _mm256_cvtepi32_ps(pm), acc[r]);
            }
        }
        let mut out = [0f32; R];
        for r in 0..R {
            out[r] = hsum8(acc[r]);
        }
        out
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_q6k<const R: usize>(w: &[BlockQ6K], x: [&[BlockQ8K]; R]) -> [f32; R] {
        let m2 = _mm256_set1_epi8(3);
        let mut acc = [_mm256_setzero_ps(); R];
        for (b, wb) in w.iter().enumerate() {
            prefetch_ahead(wb);
            // 16 x i16 scales.
            let scales =
                _mm256_cvtepi8_epi16(_mm_loadu_si128(wb.scales.as_ptr() as *const __m128i));
            let d = wb.d.to_f32();
            let mut sumi = [_mm256_setzero_si256(); R];
            let (mut ql, mut qh) = (wb.ql.as_ptr(), wb.qh.as_ptr());
            for j in 0..QK_K / 128 {
                let b1 = _mm256_loadu_si256(ql as *const __m256i);
                let b2 = _mm256_loadu_si256(ql.add(32) as *const __m256i);
                let bh = _mm256_loadu_si256(qh as *const __m256i);
                ql = ql.add(64);
                qh = qh.add(32);
                let ((l1, u1), (l2, u2)) = (nibbles(b1), nibbles(b2));
                let h0 = _mm256_slli_epi16(_mm256_and_si256(bh, m2), 4);
                let h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(bh, 2), m2), 4);
                let h2 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(bh, 4), m2), 4);
                let h3 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(bh, 6), m2), 4);
                // Unsigned 6-bit values; the -32 offset is applied once per block below.
                let q = [
                    _mm256_or_si256(l1, h0),
                    _mm256_or_si256(l2, h1),
                    _mm256_or_si256(u1, h2),
                    _mm256_or_si256(u2, h3),
                ];
                // Each 32-value group spans two 16-value scales: its first 16 products are
                // in the low 128-bit half, its last 16 in the high one.
                let s8 = _mm_cvtepi8_epi16(_mm_loadl_epi64(
                    wb.scales.as_ptr().add(8 * j) as *const __m128i
                ));
                let sc = _mm256_set_m128i(s8, s8);
                let s = [0u8, 1, 2, 3].map(|k| {
                    let lane = |i: u8| _mm_set1_epi16(i16::from_le_bytes([2 * i, 2 * i + 1]));
                    _mm256_shuffle_epi8(sc, _mm256_set_m128i(lane(2 * k + 1), lane(2 * k)))
                });
                for r in 0..R {
                    let q8 = x[r].get_unchecked(b).qs.as_ptr().add(128 * j);
                    let mut t = _mm256_setzero_si256();
                    for k in 0..4 {
                        let y = _mm256_loadu_si256(q8.add(32 * k) as *const __m256i);
                        t = _mm256_add_epi32(
                            t,
                            _mm256_madd_epi16(s[k], _mm256_maddubs_epi16(q[k], y)),
                        );
                    }
                    sumi[r] = _mm256_add_epi32(sumi[r], t);
                }
            }
            for r in 0..R {
                let xb = x[r].get_unchecked(b);
                // 32 · Σ scale_g · bsum_g: the offset of the unsigned values.
                let bs = _mm256_loadu_si256(xb.bsums.as_ptr() as *const __m256i);
                let off = _mm256_slli_epi32(_mm256_madd_epi16(scales, bs), 5);
                let s = _mm256_sub_epi32(sumi[r], off);
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(xb.d * d), _mm256_cvtepi32_ps(s), acc[r]);
            }
        }
        let mut out = [0f32; R];
        for r in 0..R {
            out[r] = hsum8(acc[r]);
        }
        out
    }
}

#[cfg(avx512)]
mod avx512 {
    //! A block's 256 weights become four 64-byte planes of unsigned values in the activations'
    //! order, so that each plane meets one contiguous 64-byte load of Q8_K activations:
    //! `vpmaddubsw` multiplies and adds pairs, `vpdpwssd` multiplies those by the planes' 16-bit
    //! scales and accumulates.
    //!
    //! Tiles and panels compute every output in one order, so that a row's result is the same
    //! bits whether it was multiplied alone, in a tile or in a panel: per block, the integer
    //! sum of its scaled products (exact, whatever the order of its terms) and, for Q4_K, the
    //! integer sum of its mins times the activations' sums; then, block after block,
    //! `acc = fma(xd · d, dots, acc)` and `acc = fma(-(xd · dmin), mins, acc)`.

    use super::{BlockQ4K, BlockQ6K, BlockQ8K, KBlock};
    use crate::kernels::prefetch_ahead;
    use crate::kernels::x86::nibbles512;
    use std::arch::x86_64::*;

    /// The sixteen 32-bit lanes of `v` added pairwise into eight.
    #[inline(always)]
    unsafe fn fold(v: __m512i) -> __m256i {
        _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64::<1>(v))
    }

    /// The sums of the eight lanes of `a` and of `b`.
    #[inline(always)]
    unsafe fn hsum_pair(a: __m256i, b: __m256i) -> (i32, i32) {
        // [a01 a23 b01 b23 | a45 a67 b45 b67], then [a0123 b0123 .. | a4567 b4567 ..].
        let t = _mm256_hadd_epi32(a, b);
        let t = _mm256_hadd_epi32(t, t);
        let u = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256::<1>(t));
        (_mm_cvtsi128_si32(u), _mm_extract_epi32::<1>(u))
    }

    /// One block's term of an output: `fma(scale, sum, acc)`, as the panels take it lane by
    /// lane.
    #[inline(always)]
    fn block_term(scale: f32, sum: i32, acc: f32) -> f32 {
        scale.mul_add(sum as f32, acc)
    }

    /// A 512-bit vector whose two 256-bit halves are `lo` and `hi`.
    #[inline(always)]
    unsafe fn halves(lo: __m256i, hi: __m256i) -> __m512i {
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
    }

    #[inline(always)]
    unsafe fn load(p: *const u8) -> __m512i {
        _mm512_loadu_si512(p as *const __m512i)
    }

    /// ggml's unpacking of a Q4_K block's 12 scale bytes: eight 6-bit scales, then eight
    /// 6-bit mins, one per byte.
    #[inline(always)]
    fn scales_mins(s: &[u8; 12]) -> (u64, u64) {
        const K1: u32 = 0x3f3f3f3f;
        const K2: u32 = 0x0f0f0f0f;
        const K3: u32 = 0x03030303;
        let u = |i: usize| u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]);
        let (u0, u1, u2) = (u(0), u(1), u(2));
        let sc = (u0 & K1) as u64 | ((((u2 & K2) | (((u0 >> 6) & K3) << 4)) as u64) << 32);
        let mn = (u1 & K1) as u64 | (((((u2 >> 4) & K2) | (((u1 >> 6) & K3) << 4)) as u64) << 32);
        (sc, mn)
    }

    /// A Q4_K block's 256 values (0..=15) in order, in four 64-byte planes.
    #[inline(always)]
    pub(super) unsafe fn q4k_planes(wb: &BlockQ4K) -> [__m512i; 4] {
        // Bytes 0..32 of a 64-byte half hold values 0..32 (low nibbles) and 32..64 (high),
        // bytes 32..64 values 64..96 and 96..128: regroup their 128-bit lanes in order.
        let (alo, ahi) = nibbles512(load(wb.qs.as_ptr()));
        let (blo, bhi) = nibbles512(load(wb.qs.as_ptr().add(64)));
        [
            _mm512_shuffle_i64x2::<0x44>(alo, ahi),
            _mm512_shuffle_i64x2::<0xEE>(alo, ahi),
            _mm512_shuffle_i64x2::<0x44>(blo, bhi),
            _mm512_shuffle_i64x2::<0xEE>(blo, bhi),
        ]
    }

    /// A Q6_K block's 256 values (0..=63, stored with +32) in order, in four 64-byte planes.
    #[inline(always)]
    pub(super) unsafe fn q6k_planes(wb: &BlockQ6K) -> [__m512i; 4] {
        let m3 = _mm512_set1_epi8(3);
        // A half block's 32 high-bit bytes, in both 256-bit halves, shifted by these per half:
        // bits 0-1 and 2-3 complete the low nibbles, bits 4-5 and 6-7 the high ones.
        let shift_lo = halves(_mm256_set1_epi16(0), _mm256_set1_epi16(2));
        let shift_hi = halves(_mm256_set1_epi16(4), _mm256_set1_epi16(6));
        let mut planes = [_mm512_setzero_si512(); 4];
        for h in 0..2 {
            let l = load(wb.ql.as_ptr().add(64 * h));
            let hb = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                wb.qh.as_ptr().add(32 * h) as *const __m256i
            ));
            let high =
                |shift| _mm512_slli_epi16::<4>(_mm512_and_si512(_mm512_srlv_epi16(hb, shift), m3));
            let (lo, hi) = nibbles512(l);
            planes[2 * h] = _mm512_or_si512(lo, high(shift_lo));
            planes[2 * h + 1] = _mm512_or_si512(hi, high(shift_hi));
        }
        planes
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn dot_q4k<const R: usize>(w: &[BlockQ4K], x: [&[BlockQ8K]; R]) -> [f32; R] {
        // Plane p holds sub-blocks 2p (low 256 bits) and 2p + 1 (high): byte shuffles that
        // spread those two 16-bit scales over each half.
        let pick = |a: i16, b: i16| halves(_mm256_set1_epi16(a), _mm256_set1_epi16(b));
        let ctl = [
            pick(0x0100, 0x0302),
            pick(0x0504, 0x0706),
            pick(0x0908, 0x0b0a),
            pick(0x0d0c, 0x0f0e),
        ];
        let mut acc = [0f32; R];
        for (b, wb) in w.iter().enumerate() {
            prefetch_ahead(wb);
            let (sc, mn) = scales_mins(&wb.scales);
            let scales = _mm512_broadcast_i32x4(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64)));
            let s = ctl.map(|c| _mm512_shuffle_epi8(scales, c));
            // Each min twice, as 16-bit lanes against the 16 sums of 16 activations.
            let mins = _mm256_cvtepu16_epi32(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(mn as i64)));
            let mins = _mm256_or_si256(mins, _mm256_slli_epi32::<16>(mins));
            let planes = q4k_planes(wb);
            let (d, dmin) = (wb.d.to_f32(), wb.dmin.to_f32());
            for r in 0..R {
                let xb = x[r].get_unchecked(b);
                let y = xb.qs.as_ptr() as *const u8;
                let mut sumi = _mm512_setzero_si512();
                for p in 0..4 {
                    let prod = _mm512_maddubs_epi16(planes[p], load(y.add(64 * p)));
                    sumi = _mm512_dpwssd_epi32(sumi, prod, s[p]);
                }
                let bs = _mm256_loadu_si256(xb.bsums.as_ptr() as *const __m256i);
                let (dots, min_sums) = hsum_pair(fold(sumi), _mm256_madd_epi16(mins, bs));
                acc[r] = block_term(xb.d * d, dots, acc[r]);
                acc[r] = block_term(-(xb.d * dmin), min_sums, acc[r]);
            }
        }
        acc
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn dot_q6k<const R: usize>(w: &[BlockQ6K], x: [&[BlockQ8K]; R]) -> [f32; R] {
        // Plane j holds values 64j..64j+64, with scales 4j..4j+4, one per 128-bit lane.
        let lanes = |j: i16| {
            let l = |i: i16| _mm_set1_epi16(4 * j + i);
            halves(_mm256_set_m128i(l(1), l(0)), _mm256_set_m128i(l(3), l(2)))
        };
        let idx = [lanes(0), lanes(1), lanes(2), lanes(3)];
        let mut acc = [0f32; R];
        for (b, wb) in w.iter().enumerate() {
            prefetch_ahead(wb);
            let scales =
                _mm256_cvtepi8_epi16(_mm_loadu_si128(wb.scales.as_ptr() as *const __m128i));
            let wide = _mm512_castsi256_si512(scales);
            let s = idx.map(|i| _mm512_permutexvar_epi16(i, wide));
            let planes = q6k_planes(wb);
            let d = wb.d.to_f32();
            for r in 0..R {
                let xb = x[r].get_unchecked(b);
                let y = xb.qs.as_ptr() as *const u8;
                let mut sumi = _mm512_setzero_si512();
                for j in 0..4 {
                    let prod = _mm512_maddubs_epi16(planes[j], load(y.add(64 * j)));
                    sumi = _mm512_dpwssd_epi32(sumi, prod, s[j]);
                }
                // The values are stored with +32: take 32 · Σ scale · (sum of 16 activations).
                let bs = _mm256_loadu_si256(xb.bsums.as_ptr() as *const __m256i);
                let off = _mm256_slli_epi32::<5>(_mm256_madd_epi16(scales, bs));
                let (dots, _) = hsum_pair(_mm256_sub_epi32(fold(sumi), off), off);
                acc[r] = block_term(xb.d * d, dots, acc[r]);
            }
        }
        acc
    }

    // -- panels: prompts and other products of many activation rows -------------------------
    //
    // The dot products above put 64 values of one weight row in a vector and reduce it to one
    // output at the end, so every block of every (weight row, activation row) pair pays for
    // its own scaling. For many activation rows the weights are repacked instead, a panel of
    // `PANEL` rows at a time, into a buffer that stays in cache while all activation rows pass
    // over it: vector lane i holds four consecutive values of panel row i, so one `vpdpbusd`
    // against four broadcast activation bytes advances sixteen outputs, and each sub-block's
    // scales are a vector of sixteen rows' scales. The buffer is a few hundred KiB per thread,
    // rebuilt per panel; the weights themselves are never copied whole.

    /// Weight rows per panel: one per f32 lane.
    const PANEL: usize = 16;
    /// Activation rows per pass over a panel's block (docs/performance.md, kernel constants).
    const PASS: usize = 8;

    /// An activation block's sums, as the panels take them: the sums of each 32 values in
    /// pairs of 16-bit lanes (against Q4_K's mins, in pairs), and `-32 ·` the sum of each 16
    /// (Q6_K's offset).
    struct Sums {
        bs32: [i32; 4],
        off16: [i32; 16],
    }

    fn sums(x: &BlockQ8K) -> Sums {
        let bs32 = |j: usize| (x.bsums[2 * j] as i32 + x.bsums[2 * j + 1] as i32) as i16;
        Sums {
            bs32: std::array::from_fn(|k| i32::from_le_bytes(pair(bs32(2 * k), bs32(2 * k + 1)))),
            off16: x.bsums.map(|s| -32 * s as i32),
        }
    }

    /// Two 16-bit values as the bytes of one 32-bit lane, `lo` first.
    fn pair(lo: i16, hi: i16) -> [u8; 4] {
        let (l, h) = (lo.to_le_bytes(), hi.to_le_bytes());
        [l[0], l[1], h[0], h[1]]
    }

    /// One panel's blocks, repacked: `vals[b * 64 + t]` holds values `4t..4t + 4` of block `b`
    /// of each of the panel's rows, lane by lane; `scales` the rows' integer sub-block scales,
    /// `mins` their mins in pairs of 16-bit lanes, `d` and `dmin` their blocks' factors.
    struct Panel {
        vals: Vec<__m512i>,
        scales: Vec<i32>,
        mins: Vec<i32>,
        d: Vec<f32>,
        dmin: Vec<f32>,
    }

    impl Panel {
        unsafe fn new<B: KBlock>(nb: usize) -> Self {
            Self {
                vals: vec![_mm512_setzero_si512(); nb * 64],
                scales: vec![0; nb * B::SUBS * PANEL],
                mins: vec![0; nb * 4 * PANEL],
                d: vec![0.0; nb * PANEL],
                dmin: vec![0.0; nb * PANEL],
            }
        }

        /// Repacks rows `r0..r0 + n` (`n <= PANEL`; the other lanes are zero).
        unsafe fn pack<B: KBlock>(&mut self, w: &[B], nb: usize, r0: usize, n: usize) {
            let mut tmp = [[0u32; 64]; PANEL];
            for b in 0..nb {
                for (i, row) in tmp.iter_mut().enumerate() {
                    if i >= n {
                        *row = [0; 64];
                        for s in 0..B::SUBS {
                            self.scales[(b * B::SUBS + s) * PANEL + i] = 0;
                        }
                        for k in 0..4 {
                            self.mins[(b * 4 + k) * PANEL + i] = 0;
                        }
                        self.d[b * PANEL + i] = 0.0;
                        self.dmin[b * PANEL + i] = 0.0;
                        continue;
                    }
                    let wb = &w[(r0 + i) * nb + b];
                    for (p, v) in wb.planes().into_iter().enumerate() {
                        _mm512_storeu_si512(row.as_mut_ptr().add(16 * p) as *mut __m512i, v);
                    }
                    let sc = wb.scales();
                    for (s, &v) in sc.scales[..B::SUBS].iter().enumerate() {
                        self.scales[(b * B::SUBS + s) * PANEL + i] = v;
                    }
                    for k in 0..4 {
                        let m = pair(sc.mins[2 * k], sc.mins[2 * k + 1]);
                        self.mins[(b * 4 + k) * PANEL + i] = i32::from_le_bytes(m);
                    }
                    self.d[b * PANEL + i] = sc.d;
                    self.dmin[b * PANEL + i] = sc.dmin;
                }
                let vals = self.vals.as_mut_ptr().add(b * 64) as *mut u32;
                for t in 0..64 {
                    for (i, row) in tmp.iter().enumerate() {
                        *vals.add(t * PANEL + i) = row[t];
                    }
                }
            }
        }

        /// The panel's rows against `R` activation rows: lane i of result r is row i's dot
        /// product with activation row r, in the tiles' order (see the module's comment).
        #[inline(always)]
        unsafe fn pass<B: KBlock, const R: usize>(
            &self,
            nb: usize,
            x: [&[BlockQ8K]; R],
            s: [&[Sums]; R],
        ) -> [__m512; R] {
            let per_sub = 64 / B::SUBS;
            let mut acc = [_mm512_setzero_ps(); R];
            for b in 0..nb {
                let vals = self.vals.as_ptr().add(b * 64);
                let mut sum = [_mm512_setzero_si512(); R];
                for sub in 0..B::SUBS {
                    let mut dot = [_mm512_setzero_si512(); R];
                    if !B::MINS {
                        for r in 0..R {
                            dot[r] = _mm512_set1_epi32(s[r].get_unchecked(b).off16[sub]);
                        }
                    }
                    for g in 0..per_sub {
                        let t = sub * per_sub + g;
                        let wv = *vals.add(t);
                        for r in 0..R {
                            let q = x[r].get_unchecked(b).qs.as_ptr().add(4 * t) as *const i32;
                            let xv = _mm512_set1_epi32(q.read_unaligned());
                            dot[r] = _mm512_dpbusd_epi32(dot[r], wv, xv);
                        }
                    }
                    let sc = _mm512_loadu_si512(
                        self.scales.as_ptr().add((b * B::SUBS + sub) * PANEL) as *const __m512i,
                    );
                    for r in 0..R {
                        sum[r] = _mm512_add_epi32(sum[r], _mm512_mullo_epi32(dot[r], sc));
                    }
                }
                let d = _mm512_loadu_ps(self.d.as_ptr().add(b * PANEL));
                for r in 0..R {
                    let xd = _mm512_set1_ps(x[r].get_unchecked(b).d);
                    let f = _mm512_mul_ps(xd, d);
                    acc[r] = _mm512_fmadd_ps(f, _mm512_cvtepi32_ps(sum[r]), acc[r]);
                }
                if B::MINS {
                    let mut mins = [_mm512_setzero_si512(); R];
                    for k in 0..4 {
                        let mv = _mm512_loadu_si512(
                            self.mins.as_ptr().add((b * 4 + k) * PANEL) as *const __m512i
                        );
                        for r in 0..R {
                            let bs = _mm512_set1_epi32(s[r].get_unchecked(b).bs32[k]);
                            mins[r] = _mm512_dpwssd_epi32(mins[r], mv, bs);
                        }
                    }
                    let dmin = _mm512_loadu_ps(self.dmin.as_ptr().add(b * PANEL));
                    for r in 0..R {
                        let xd = _mm512_set1_ps(x[r].get_unchecked(b).d);
                        let f = _mm512_mul_ps(xd, dmin);
                        acc[r] = _mm512_fnmadd_ps(f, _mm512_cvtepi32_ps(mins[r]), acc[r]);
                    }
                }
            }
            acc
        }
    }

    /// `dst[i, r] = Σ_c x[i, c] · W[r, c]` through panels; `xq` are the `m` activation rows
    /// as Q8_K blocks, `dst` is `[m, rows]`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn matmul_panels<B: KBlock>(
        w: &[B],
        rows: usize,
        nb: usize,
        xq: &[BlockQ8K],
        m: usize,
        dst: &mut [f32],
    ) {
        let sums: Vec<Sums> = xq.iter().map(sums).collect();
        let out = super::SharedOut(dst.as_mut_ptr());
        let act = |i: usize| &xq[i * nb..(i + 1) * nb];
        let sum = |i: usize| &sums[i * nb..(i + 1) * nb];
        crate::kernels::pool().execute_chunked(rows.div_ceil(PANEL), |panels| {
            let out = &out;
            let mut panel = Panel::new::<B>(nb);
            for p in panels {
                let r0 = p * PANEL;
                let n = PANEL.min(rows - r0);
                panel.pack(w, nb, r0, n);
                let mask: __mmask16 = if n == PANEL { !0 } else { (1 << n) - 1 };
                let put = |i: usize, v: __m512| {
                    // SAFETY: each panel's rows are written by one chunk only; the mask keeps
                    // the store within row i's `rows` outputs.
                    _mm512_mask_storeu_ps(out.0.add(i * rows + r0), mask, v)
                };
                let mut i = 0;
                while i < m {
                    let k = (m - i).min(PASS);
                    macro_rules! pass {
                        ($n:literal) => {{
                            let a: [&[BlockQ8K]; $n] = std::array::from_fn(|j| act(i + j));
                            let s: [&[Sums]; $n] = std::array::from_fn(|j| sum(i + j));
                            let v = panel.pass::<B, $n>(nb, a, s);
                            (0..$n).for_each(|j| put(i + j, v[j]));
                        }};
                    }
                    match k {
                        8 => pass!(8),
                        7 => pass!(7),
                        6 => pass!(6),
                        5 => pass!(5),
                        4 => pass!(4),
                        3 => pass!(3),
                        2 => pass!(2),
                        _ => pass!(1),
                    }
                    i += k;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_rng;
    use candle_core::quantized::k_quants::{self, GgmlType};

    /// Random blocks as bytes, and their dequantization by Candle (an independent reading of
    /// the format).
    fn blocks<B: KBlock, C: GgmlType>(n: usize, seed: u32) -> (Vec<B>, Vec<f32>) {
        let mut next = test_rng(seed);
        let size = std::mem::size_of::<B>();
        let mut bytes: Vec<u8> = (0..n * size).map(|_| next() as u8).collect();
        // Small, finite f16 scales: d (and dmin) are the first 4 bytes of a Q4_K block and the
        // last 2 of a Q6_K one.
        for b in bytes.chunks_exact_mut(size) {
            let scale = |next: &mut dyn FnMut() -> u32| {
                f16::from_f32((next() % 1000) as f32 / 50000.0).to_le_bytes()
            };
            if size == 144 {
                b[0..2].copy_from_slice(&scale(&mut next));
                b[2..4].copy_from_slice(&scale(&mut next));
            } else {
                b[208..210].copy_from_slice(&scale(&mut next));
            }
        }
        // SAFETY: both block types are plain old data of exactly `size` bytes, align <= 2.
        let ours = unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const B, n) }.to_vec();
        let theirs = unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const C, n) };
        let mut dense = vec![0f32; n * QK_K];
        C::to_float(theirs, &mut dense);
        (ours, dense)
    }

    fn check<B: KBlock, C: GgmlType>(seed: u32) {
        let (rows, cols) = (37, 512);
        let (w, dense) = blocks::<B, C>(rows * cols / QK_K, seed);
        let mut next = test_rng(seed + 1);
        for m in [1, 2, 3, 4, 5, 9, 16, 24, 31] {
            let x: Vec<f32> = (0..m * cols)
                .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
                .collect();
            let mut out = vec![0f32; m * rows];
            matmul(&w, rows, cols, &x, m, &mut out);
            // Candle's compact kernel on the same blocks: the same Q8_K activations and
            // integer products, summed in another order.
            let theirs_w = unsafe { std::slice::from_raw_parts(w.as_ptr() as *const C, w.len()) };
            let mut theirs = vec![0f32; m * rows];
            k_quants::matmul((m, cols, rows), &x, theirs_w, &mut theirs).unwrap();
            for i in 0..m {
                for r in 0..rows {
                    let terms = (0..cols).map(|c| x[i * cols + c] * dense[r * cols + c]);
                    let exact: f32 = terms.clone().sum();
                    // Q8_K rounding: under 1% of the terms' magnitude.
                    let scale: f32 = terms.map(f32::abs).sum();
                    let got = out[i * rows + r];
                    assert!(
                        (got - exact).abs() < 0.01 * scale,
                        "m={m} ({i},{r}): {got} vs {exact}"
                    );
                    let t = theirs[i * rows + r];
                    assert!(
                        (got - t).abs() < 1e-4 * scale,
                        "m={m} ({i},{r}): {got} vs candle {t}"
                    );
                }
            }
            // The SIMD and scalar dots agree.
            let xq: Vec<BlockQ8K> = x[..cols].chunks_exact(QK_K).map(quantize_q8k).collect();
            let nb = cols / QK_K;
            let simd = B::dot(&w[..nb], [&xq[..]])[0];
            let scalar = B::scalar(&w[..nb], &xq);
            assert!(
                (simd - scalar).abs() < 1e-4 * (1.0 + scalar.abs()),
                "{simd} vs {scalar}"
            );
        }
    }

    #[test]
    fn q4k_matches_dequantized_and_candle() {
        check::<BlockQ4K, k_quants::BlockQ4K>(3);
    }

    #[test]
    fn q6k_matches_dequantized_and_candle() {
        check::<BlockQ6K, k_quants::BlockQ6K>(5);
    }

    /// A row's outputs are the same bits alone, in a tile of rows or in a panel of them.
    fn rows_do_not_depend_on_the_batch<B: KBlock, C: GgmlType>(seed: u32) {
        let (rows, cols) = (37, 768);
        let (w, _) = blocks::<B, C>(rows * cols / QK_K, seed);
        let mut next = test_rng(seed + 1);
        let m = 2 * PANEL_ROWS - 1;
        let x: Vec<f32> = (0..m * cols)
            .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        let alone: Vec<Vec<u32>> = (0..m)
            .map(|i| {
                let mut one = vec![0f32; rows];
                matmul(&w, rows, cols, &x[i * cols..(i + 1) * cols], 1, &mut one);
                bits(&one)
            })
            .collect();
        for batch in [2, TILE + 3, PANEL_ROWS, m] {
            let mut many = vec![0f32; batch * rows];
            matmul(&w, rows, cols, &x[..batch * cols], batch, &mut many);
            for (i, want) in alone.iter().take(batch).enumerate() {
                assert_eq!(
                    &bits(&many[i * rows..(i + 1) * rows]),
                    want,
                    "{batch} rows: row {i}"
                );
            }
        }
    }

    #[test]
    fn q4k_rows_do_not_depend_on_the_batch() {
        rows_do_not_depend_on_the_batch::<BlockQ4K, k_quants::BlockQ4K>(21);
    }

    #[test]
    fn q6k_rows_do_not_depend_on_the_batch() {
        rows_do_not_depend_on_the_batch::<BlockQ6K, k_quants::BlockQ6K>(22);
    }

    /// The AVX2 kernels against the scalar definition, also on a build whose `dot` is AVX-512
    /// (the AVX2 ones are then what a machine without AVX-512 runs).
    #[cfg(avx2)]
    #[test]
    fn avx2_kernels_match_scalar() {
        let cols = 768;
        let nb = cols / QK_K;
        let mut next = test_rng(11);
        let x: Vec<f32> = (0..4 * cols)
            .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        let xq: Vec<BlockQ8K> = x.chunks_exact(QK_K).map(quantize_q8k).collect();
        let rows = [
            &xq[..nb],
            &xq[nb..2 * nb],
            &xq[2 * nb..3 * nb],
            &xq[3 * nb..],
        ];
        let close = |a: f32, b: f32| (a - b).abs() < 1e-4 * (1.0 + b.abs());
        let (w4, _) = blocks::<BlockQ4K, k_quants::BlockQ4K>(nb, 12);
        let (w6, _) = blocks::<BlockQ6K, k_quants::BlockQ6K>(nb, 13);
        // SAFETY: the build enables AVX2 and FMA.
        let (d4, d6) = unsafe { (avx2::dot_q4k(&w4, rows), avx2::dot_q6k(&w6, rows)) };
        for (r, x) in rows.iter().enumerate() {
            assert!(close(d4[r], scalar_dot_q4k(&w4, x)), "q4k row {r}");
            assert!(close(d6[r], scalar_dot_q6k(&w6, x)), "q6k row {r}");
        }
    }

    #[test]
    fn q8k_quantization_is_ggml_s() {
        let x: Vec<f32> = (0..QK_K).map(|i| (i as f32 - 100.0) / 7.0).collect();
        let q = quantize_q8k(&x);
        // The value of largest magnitude (155/7, at i = 255) maps to -127.
        assert_eq!(q.qs[255], -127);
        assert!((q.d - (155.0 / 7.0) / -127.0).abs() < 1e-6);
        assert_eq!(
            q.bsums[0],
            q.qs[..16].iter().map(|&v| v as i16).sum::<i16>()
        );
        assert!(quantize_q8k(&[0.0; QK_K]).qs.iter().all(|&v| v == 0));
    }
}
