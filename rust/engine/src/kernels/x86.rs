//! The x86 SIMD pieces the kernels are built from, each written once: ggml's horizontal sum of
//! eight lanes, the quantizing of activations to bytes, the sums of four byte products, the
//! unpacking of 4-bit weights, and the pairs of activation rows the AVX-512 decode tiles read.
//! They are inlined into the kernels, which carry the target features (`#[cfg(avx2)]` builds
//! only).

use std::arch::x86_64::*;

/// The sum of eight lanes as ggml's `hsum_float_8` takes it (and [`super::ggml::hsum8`] on an
/// array): lanes `l + (l + 4)`, then `(h0 + h2) + (h1 + h3)`.
#[inline(always)]
pub(crate) unsafe fn hsum8(x: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// 32 values quantized to bytes as [`super::quantize_i8`] defines it, the way ggml's AVX2
/// quantizers do it: `vcvtps2dq` rounds half to even in the default rounding mode, and the
/// packs saturate as Rust's `as i8` does.
#[inline(always)]
pub(crate) unsafe fn quantize_32(x: &[f32]) -> (f32, [i8; 32], i32) {
    assert_eq!(x.len(), 32);
    let v: [__m256; 4] = std::array::from_fn(|k| _mm256_loadu_ps(x.as_ptr().add(8 * k)));
    let abs = |v: __m256| _mm256_andnot_ps(_mm256_set1_ps(-0.0), v);
    let m = _mm256_max_ps(
        _mm256_max_ps(abs(v[0]), abs(v[1])),
        _mm256_max_ps(abs(v[2]), abs(v[3])),
    );
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
    let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
    let q = v.map(|v| _mm256_cvtps_epi32(_mm256_mul_ps(v, id)));
    let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    let sum = _mm_add_epi32(
        _mm256_castsi256_si128(sum),
        _mm256_extracti128_si256(sum, 1),
    );
    let sum = _mm_add_epi32(sum, _mm_unpackhi_epi64(sum, sum));
    let sum = _mm_cvtsi128_si32(_mm_add_epi32(sum, _mm_shuffle_epi32(sum, 1)));
    // The packs interleave 128-bit lanes; the permutation puts the values back in order.
    let bytes = _mm256_packs_epi16(
        _mm256_packs_epi32(q[0], q[1]),
        _mm256_packs_epi32(q[2], q[3]),
    );
    let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    let mut qs = [0i8; 32];
    _mm256_storeu_si256(qs.as_mut_ptr() as *mut __m256i, bytes);
    (amax, qs, sum)
}

/// Eight sums of four `u8 · i8` products: `vpdpbusd` where the build has AVX-512 VNNI (with
/// VL), else `vpmaddubsw` then `vpmaddwd`; the same integers either way, as long as no pair's
/// sum leaves i16 (Q4 weights times Q8 activations, or `|q_w|` times `±q_x` within ±127).
#[inline(always)]
pub(crate) unsafe fn quad_sums(a: __m256i, b: __m256i) -> __m256i {
    #[cfg(avx512_vl_vnni)]
    {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b)
    }
    #[cfg(not(avx512_vl_vnni))]
    {
        _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1))
    }
}

/// The low and the high 4-bit halves of 32 bytes, as 32 bytes each.
#[inline(always)]
pub(crate) unsafe fn nibbles(bits: __m256i) -> (__m256i, __m256i) {
    let m4 = _mm256_set1_epi8(0xF);
    (
        _mm256_and_si256(bits, m4),
        _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4),
    )
}

/// 16 bytes of packed 4-bit values at `p` as 32 bytes: the low nibbles first, then the high
/// ones (ggml's layout of a Q4_0/Q4_1 block).
#[inline(always)]
pub(crate) unsafe fn nibbles_16(p: *const u8) -> __m256i {
    let packed = _mm_loadu_si128(p as *const __m128i);
    let both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
    _mm256_and_si256(both, _mm256_set1_epi8(0xF))
}

/// [`nibbles_16`] in both 256-bit halves of a vector: the same 32 values for two rows of
/// activations side by side.
#[cfg(avx512)]
#[inline(always)]
pub(crate) unsafe fn nibbles_16_x2(p: *const u8) -> __m512i {
    let packed = _mm512_broadcast_i32x4(_mm_loadu_si128(p as *const __m128i));
    // Shift the second and fourth 128-bit lanes (words 8..16 and 24..32) to the high nibbles.
    let both = _mm512_mask_srli_epi16::<4>(packed, 0xFF00_FF00, packed);
    _mm512_and_si512(both, _mm512_set1_epi8(0xF))
}

/// The two 256-bit halves of a vector.
#[cfg(avx512)]
#[inline(always)]
pub(crate) unsafe fn halves(x: __m512) -> [__m256; 2] {
    let hi = _mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x));
    [_mm512_castps512_ps256(x), _mm256_castpd_ps(hi)]
}

/// Up to [`Pairs::ROWS`] activation rows of a step, packed two to a vector for the AVX-512
/// decode tiles: one row in each 256-bit half, so that one `vpdpbusd` against a weight block
/// (its 32 values in both halves) gives two rows' eight four-value sums.
#[cfg(avx512)]
pub(crate) struct Pairs {
    /// The first of the rows.
    pub first: usize,
    pub rows: usize,
    /// `qs[b * pairs + p]`: block `b` of pair `p`'s two rows, 32 values each (a missing second
    /// row is zeros).
    pub qs: Vec<__m512i>,
    /// `d[b * pairs + p]`: each row's block scale over its half's eight lanes.
    pub d: Vec<__m512>,
}

#[cfg(avx512)]
impl Pairs {
    /// Rows in a tile: four pairs, whose sums take four registers.
    pub const ROWS: usize = 8;

    /// Rows `0..m` in tiles of [`Self::ROWS`], `pack(first, n)` each.
    pub fn tiles<T>(m: usize, pack: impl Fn(usize, usize) -> T) -> Vec<T> {
        (0..m)
            .step_by(Self::ROWS)
            .map(|first| pack(first, Self::ROWS.min(m - first)))
            .collect()
    }

    /// Rows `first..first + n` of `nb` blocks each, `block(i, b)` being block `b` of row `i`:
    /// its 32 values and its scale.
    pub unsafe fn pack<'a>(
        first: usize,
        n: usize,
        nb: usize,
        block: impl Fn(usize, usize) -> (&'a [i8; 32], f32),
    ) -> Self {
        let pairs = n.div_ceil(2);
        let mut t = Pairs {
            first,
            rows: n,
            qs: Vec::with_capacity(nb * pairs),
            d: Vec::with_capacity(nb * pairs),
        };
        for b in 0..nb {
            for p in 0..pairs {
                let (mut qs, mut d) = ([0i8; 64], [0f32; 16]);
                for h in (0..2).filter(|h| 2 * p + h < n) {
                    let (q, scale) = block(first + 2 * p + h, b);
                    qs[h * 32..(h + 1) * 32].copy_from_slice(q);
                    d[h * 8..(h + 1) * 8].fill(scale);
                }
                t.qs.push(_mm512_loadu_si512(qs.as_ptr() as *const __m512i));
                t.d.push(_mm512_loadu_ps(d.as_ptr()));
            }
        }
        t
    }

    pub fn pairs(&self) -> usize {
        self.rows.div_ceil(2)
    }

    /// Each row's eight lanes (half `h` of `acc[p]` for row `2p + h`) added as ggml's
    /// `hsum_float_8` adds them.
    #[inline(always)]
    pub unsafe fn sums<const P: usize>(acc: &[__m512; P]) -> [f32; Self::ROWS] {
        let mut out = [0f32; Self::ROWS];
        for (p, acc) in acc.iter().enumerate() {
            for (h, half) in halves(*acc).into_iter().enumerate() {
                out[2 * p + h] = hsum8(half);
            }
        }
        out
    }
}

/// [`nibbles`] of 64 bytes.
#[cfg(avx512)]
#[inline(always)]
pub(crate) unsafe fn nibbles512(bits: __m512i) -> (__m512i, __m512i) {
    let m4 = _mm512_set1_epi8(0xF);
    (
        _mm512_and_si512(bits, m4),
        _mm512_and_si512(_mm512_srli_epi16::<4>(bits), m4),
    )
}
