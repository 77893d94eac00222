//! The x86 SIMD pieces the kernels are built from, each written once: ggml's horizontal sum of
//! eight lanes and the unpacking of 4-bit weights. They are inlined into the kernels, which
//! carry the target features (`#[cfg(avx2)]` builds only).

use std::arch::x86_64::*;

/// The sum of eight lanes as ggml's `hsum_float_8` takes it (and [`super::ggml::hsum8`] on an
/// array): lanes `l + (l + 4)`, then `(h0 + h2) + (h1 + h3)`.
#[inline(always)]
pub(crate) unsafe fn hsum8(x: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
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
