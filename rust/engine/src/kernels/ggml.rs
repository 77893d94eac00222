//! Elementwise steps in llama.cpp's CPU arithmetic (AVX2 build), so that quantized models give
//! its tokens: every product quantizes its input to Q8 blocks, and a last-bit difference in an
//! activation can move one of those roundings (see [`super::attention`]).

/// One row of llama.cpp's `rms_norm` followed by its multiplication by the weight: squares
/// summed in f64, then `x * (1 / sqrt(mean + eps)) * w` in f32.
pub fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let sum: f64 = x.iter().map(|&v| (v * v) as f64).sum();
    let mean = (sum / x.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
        *y = (x * scale) * w;
    }
}

/// `ggml_vec_swiglu_f32`: `silu(gate) * up`, where SiLU is `x / (1 + exp(-x))` with the vector
/// `expf` ([`expf`]) over whole groups of 8 and the C library's `expf` for the rest.
pub fn swiglu(gate: &[f32], up: &[f32], y: &mut [f32]) {
    let silu_times = |x: f32, e: f32, u: f32| (x / (1.0 + e)) * u;
    let n8 = gate.len() / 8 * 8;
    // Two loops, not one with a branch on `i < n8`: the compiler, free to call `exp` for
    // every value and keep the result it needs, did so, and the C library's `expf` took a
    // share of a prompt's time for values whose result was thrown away.
    avx2_or!(swiglu_avx2(&gate[..n8], &up[..n8], &mut y[..n8]), {
        for ((y, &x), &u) in y[..n8].iter_mut().zip(&gate[..n8]).zip(&up[..n8]) {
            *y = silu_times(x, expf(-x), u);
        }
    });
    for ((y, &x), &u) in y[n8..].iter_mut().zip(&gate[n8..]).zip(&up[n8..]) {
        *y = silu_times(x, (-x).exp(), u);
    }
}

/// [`swiglu`] of whole groups of 8, eight lanes at a time with [`expf8_avx2`].
#[cfg(avx2)]
#[target_feature(enable = "avx2,fma")]
unsafe fn swiglu_avx2(gate: &[f32], up: &[f32], y: &mut [f32]) {
    use std::arch::x86_64::*;
    let one = _mm256_set1_ps(1.0);
    for ((y, x), u) in y
        .chunks_exact_mut(8)
        .zip(gate.chunks_exact(8))
        .zip(up.chunks_exact(8))
    {
        let x = _mm256_loadu_ps(x.as_ptr());
        let e = expf8_avx2(_mm256_xor_ps(x, _mm256_set1_ps(-0.0)));
        let silu = _mm256_div_ps(x, _mm256_add_ps(one, e));
        _mm256_storeu_ps(
            y.as_mut_ptr(),
            _mm256_mul_ps(silu, _mm256_loadu_ps(u.as_ptr())),
        );
    }
}

/// [`swiglu`] of rows of `cols` values, each row as ggml computes it, on the pool's threads
/// when there are at least [`super::PARALLEL_VALUES`] values. Rows are cut into pieces of
/// whole groups of 8 (the last piece of a row keeps the row's tail), so every value is
/// computed as in one call per row.
pub fn swiglu_rows(gate: &[f32], up: &[f32], cols: usize, y: &mut [f32]) {
    const PIECE: usize = 2048;
    assert!(gate.len() == up.len() && gate.len() == y.len() && gate.len().is_multiple_of(cols));
    let rows = gate.len() / cols;
    if gate.len() < super::PARALLEL_VALUES {
        for ((g, u), y) in gate
            .chunks(cols)
            .zip(up.chunks(cols))
            .zip(y.chunks_mut(cols))
        {
            swiglu(g, u, y);
        }
        return;
    }
    let per_row = cols.div_ceil(PIECE);
    let out = super::SharedOut(y.as_mut_ptr());
    crate::kernels::pool().execute_chunked(rows * per_row, |pieces| {
        let out = &out;
        for p in pieces {
            let start = (p / per_row) * cols + (p % per_row) * PIECE;
            let n = PIECE.min(cols - (p % per_row) * PIECE);
            // SAFETY: the pieces are disjoint ranges of `y`, each written by one chunk.
            let y = unsafe { std::slice::from_raw_parts_mut(out.0.add(start), n) };
            swiglu(&gate[start..start + n], &up[start..start + n], y);
        }
    });
}

/// The horizontal sum of 8 lanes as ggml's `hsum_float_8` and tinyBLAS's AVX2 code take it.
pub fn hsum8(v: [f32; 8]) -> f32 {
    let h = [v[4] + v[0], v[5] + v[1], v[6] + v[2], v[7] + v[3]];
    (h[0] + h[2]) + (h[1] + h[3])
}

/// ggml's AVX2 `ggml_v_expf` for one lane (after ARM's optimized routines; at most 1.5 ulp from
/// `exp`), so that softmax weights round as llama.cpp's do.
pub fn expf(x: f32) -> f32 {
    let c = |bits: u32| f32::from_bits(bits);
    let r = c(0x4b40_0000); // 0x1.8p23
    let z = x.mul_add(c(0x3fb8_aa3b), r); // x / ln 2, rounded to an integer in the low bits
    let n = z - r;
    let b = (-n).mul_add(c(0x35bf_be8e), (-n).mul_add(c(0x3f31_7200), x));
    let e = z.to_bits() << 23;
    let k = f32::from_bits(e.wrapping_add(1f32.to_bits()));
    let u = b * b;
    let j = c(0x3c07_2010)
        .mul_add(b, c(0x3d2b_9f17))
        .mul_add(u, c(0x3e2a_af33).mul_add(b, c(0x3eff_fedb)))
        .mul_add(u, c(0x3f7f_fff6) * b);
    if n.abs() <= 126.0 {
        return j.mul_add(k, k);
    }
    let g: u32 = if n <= 0.0 { 0x8200_0000 } else { 0 };
    let s1 = f32::from_bits(g.wrapping_add(0x7f00_0000));
    let s2 = f32::from_bits(e.wrapping_sub(g));
    if n.abs() > 192.0 {
        s1 * s1
    } else {
        s2.mul_add(j, s2) * s1
    }
}

/// [`expf`] of eight lanes at once: ggml's AVX2 `ggml_v_expf` itself. The slow path's
/// scaling is computed only when some lane needs it, and blended into those lanes.
///
/// # Safety
///
/// The CPU must have AVX2 and FMA (the builds that compile this function enable them).
#[cfg(avx2)]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub unsafe fn expf8_avx2(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let c = |bits: u32| _mm256_set1_ps(f32::from_bits(bits));
    let r = c(0x4b40_0000);
    let z = _mm256_fmadd_ps(x, c(0x3fb8_aa3b), r);
    let n = _mm256_sub_ps(z, r);
    let b = _mm256_fnmadd_ps(n, c(0x35bf_be8e), _mm256_fnmadd_ps(n, c(0x3f31_7200), x));
    let e = _mm256_slli_epi32::<23>(_mm256_castps_si256(z));
    let k = _mm256_castsi256_ps(_mm256_add_epi32(
        e,
        _mm256_castps_si256(_mm256_set1_ps(1.0)),
    ));
    let abs_n = _mm256_andnot_ps(_mm256_set1_ps(-0.0), n);
    let slow = _mm256_cmp_ps::<_CMP_GT_OQ>(abs_n, _mm256_set1_ps(126.0));
    let u = _mm256_mul_ps(b, b);
    let j = _mm256_fmadd_ps(
        _mm256_fmadd_ps(
            _mm256_fmadd_ps(c(0x3c07_2010), b, c(0x3d2b_9f17)),
            u,
            _mm256_fmadd_ps(c(0x3e2a_af33), b, c(0x3eff_fedb)),
        ),
        u,
        _mm256_mul_ps(c(0x3f7f_fff6), b),
    );
    let fast = _mm256_fmadd_ps(j, k, k);
    if _mm256_movemask_ps(slow) == 0 {
        return fast;
    }
    let g = _mm256_and_si256(
        _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LE_OQ>(n, _mm256_setzero_ps())),
        _mm256_set1_epi32(0x8200_0000u32 as i32),
    );
    let s1 = _mm256_castsi256_ps(_mm256_add_epi32(g, _mm256_set1_epi32(0x7f00_0000)));
    let s2 = _mm256_castsi256_ps(_mm256_sub_epi32(e, g));
    let huge = _mm256_cmp_ps::<_CMP_GT_OQ>(abs_n, _mm256_set1_ps(192.0));
    let scaled = _mm256_mul_ps(_mm256_fmadd_ps(s2, j, s2), s1);
    _mm256_blendv_ps(
        _mm256_blendv_ps(fast, scaled, slow),
        _mm256_mul_ps(s1, s1),
        huge,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expf_is_within_two_ulp_of_exp() {
        for i in -2000..=800 {
            let x = i as f32 * 0.11;
            let (got, want) = (expf(x), (x as f64).exp());
            if want < f32::MIN_POSITIVE as f64 || want > f32::MAX as f64 {
                continue;
            }
            let ulp = (want as f32).to_bits().abs_diff(got.to_bits());
            assert!(ulp <= 2, "exp({x}) = {got}, want {want}");
        }
        assert_eq!(expf(-200.0), 0.0);
        assert_eq!(expf(f32::NEG_INFINITY), 0.0);
        assert_eq!(expf(0.0), 1.0);
    }

    #[cfg(avx2)]
    #[test]
    fn expf8_is_expf_in_every_lane() {
        use std::arch::x86_64::*;
        // Both paths of the scaling (|n| above 126 and above 192), alone and mixed with
        // ordinary lanes.
        let xs: Vec<f32> = (-1200..=1000)
            .map(|i| i as f32 * 0.173)
            .chain([f32::NEG_INFINITY, -0.0, 0.0, 88.5, -103.9])
            .collect();
        for chunk in xs.chunks(8) {
            let mut lanes = [0f32; 8];
            lanes[..chunk.len()].copy_from_slice(chunk);
            let mut got = [0f32; 8];
            // SAFETY: the build has AVX2 and FMA (the test's cfg).
            unsafe {
                _mm256_storeu_ps(
                    got.as_mut_ptr(),
                    expf8_avx2(_mm256_loadu_ps(lanes.as_ptr())),
                )
            };
            for (x, g) in lanes.iter().zip(got) {
                assert_eq!(g.to_bits(), expf(*x).to_bits(), "exp({x})");
            }
        }
    }

    #[test]
    fn swiglu_is_silu_times_up() {
        let gate: Vec<f32> = (0..21).map(|i| i as f32 * 0.7 - 7.0).collect();
        let up: Vec<f32> = (0..21).map(|i| 1.0 + i as f32 * 0.1).collect();
        let mut y = vec![0f32; 21];
        swiglu(&gate, &up, &mut y);
        for i in 0..21 {
            let want = gate[i] as f64 / (1.0 + (-gate[i] as f64).exp()) * up[i] as f64;
            assert!(
                (y[i] as f64 - want).abs() < 1e-5 * (1.0 + want.abs()),
                "{i}"
            );
        }
    }

    #[test]
    fn swiglu_is_ggml_arithmetic_bit_for_bit() {
        // Whole groups of 8 (the vector path) and a tail, values far enough out for both of
        // `expf`'s scalings.
        let gate: Vec<f32> = (0..1003).map(|i| (i as f32 - 500.0) * 0.41).collect();
        let up: Vec<f32> = (0..1003)
            .map(|i| ((i * 37) % 19) as f32 * 0.3 - 2.5)
            .collect();
        let mut y = vec![0f32; gate.len()];
        swiglu(&gate, &up, &mut y);
        for i in 0..gate.len() {
            let e = if i < 1000 {
                expf(-gate[i])
            } else {
                (-gate[i]).exp()
            };
            let want = (gate[i] / (1.0 + e)) * up[i];
            assert_eq!(y[i].to_bits(), want.to_bits(), "{i}: {}", gate[i]);
        }
    }

    #[test]
    fn swiglu_rows_computes_each_row_as_one_call() {
        // Long enough for the pool, with rows of a length that is not a multiple of 8 or of
        // the pieces.
        let cols = 5003;
        let gate: Vec<f32> = (0..4 * cols)
            .map(|i| (i % 97) as f32 * 0.13 - 6.0)
            .collect();
        let up: Vec<f32> = (0..4 * cols)
            .map(|i| (i % 31) as f32 * 0.07 - 1.0)
            .collect();
        let mut y = vec![0f32; gate.len()];
        swiglu_rows(&gate, &up, cols, &mut y);
        for r in 0..4 {
            let row = r * cols..(r + 1) * cols;
            let mut want = vec![0f32; cols];
            swiglu(&gate[row.clone()], &up[row.clone()], &mut want);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&y[row]), bits(&want), "row {r}");
        }
    }

    #[test]
    fn rms_norm_row_normalises() {
        let mut y = [0f32; 4];
        rms_norm_row(&[3.0, -3.0, 3.0, -3.0], &[1.0, 2.0, 1.0, 1.0], 0.0, &mut y);
        assert_eq!(y, [1.0, -2.0, 1.0, -1.0]);
    }
}
