//! Attention of one sequence on the CPU with an F32 KV cache, in llama.cpp's arithmetic.
//!
//! Quantized models amplify rounding: every product quantizes its input to Q8 blocks, so a
//! difference in the last bit of an activation can move a rounding and, layers later, the
//! logits by a tenth. To give the same tokens as llama.cpp on the same file, each step here
//! repeats what its CPU backend computes, in the same order (checked bit for bit against
//! tensors dumped from llama.cpp by `scripts/llamacpp_tensors.py`):
//!
//! - RoPE (interleaved pairs) with fused multiply-adds: `x0·cos − x1·sin` as `fma(x0, cos,
//!   −(x1·sin))`, `x0·sin + x1·cos` as `fma(x0, sin, x1·cos)`;
//! - scores `q·k` in the order of `ggml_vec_dot_f32` (AVX2: 32 lanes, then its reduction);
//! - softmax of `score · scale` with ggml's vectorised `expf`, the sum of each 8 lanes
//!   accumulated in f64, and a multiplication by `1 / sum`;
//! - `Σ p·v` in llamafile's tinyBLAS order (8 lanes), which llama.cpp takes for a batch of
//!   several rows, for every row. llama.cpp takes `ggml_vec_dot_f32`'s order (32 lanes) for a
//!   batch of one token; we do not, so that a position's keys and values never depend on
//!   whether it was generated or read as a prompt, nor on how a prompt was split or cached:
//!   a conversation's next turn reuses the state of the answer it contains, and gets the
//!   output of a cold start. (A generated token's logits may so differ from llama.cpp's in the
//!   last bits; a prompt's are the same.)
//!
//! The cache keeps Candle's layout `[1, kv_heads, capacity, head_dim]`; it is read in place,
//! not copied.

use super::ggml::{expf, hsum8};
use super::SharedOut;

/// Shapes of one attention call.
#[derive(Clone, Copy)]
pub struct Dims {
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// Positions the cache held before these rows.
    pub pos: usize,
    /// New rows.
    pub seq: usize,
    /// Positions the cache buffer has room for (its third dimension).
    pub capacity: usize,
}

/// Rotates `x` (`[rows, heads, head_dim]`) in place: row `t` by the angles of its position,
/// `cos[t]`/`sin[t]` (`head_dim / 2` each), in llama.cpp's interleaved layout.
pub fn rope(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    let per_row = x.len() / (cos.len() / half);
    for (t, row) in x.chunks_exact_mut(per_row).enumerate() {
        let (c, s) = (
            &cos[t * half..(t + 1) * half],
            &sin[t * half..(t + 1) * half],
        );
        for head in row.chunks_exact_mut(head_dim) {
            for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                let (x0, x1) = (pair[0], pair[1]);
                pair[0] = x0.mul_add(c[i], -(x1 * s[i]));
                pair[1] = x0.mul_add(s[i], x1 * c[i]);
            }
        }
    }
}

/// `softmax(q·kᵀ · scale + causal mask) · v` for `q` `[seq, n_head, head_dim]` against the
/// cache's first `pos + seq` positions; returns `[seq, n_head * head_dim]`.
pub fn attend(q: &[f32], k_cache: &[f32], v_cache: &[f32], d: Dims, scale: f32) -> Vec<f32> {
    let (nh, hd) = (d.n_head, d.head_dim);
    let group = nh / d.n_head_kv;
    let total = d.pos + d.seq;
    assert_eq!(q.len(), d.seq * nh * hd);
    assert!(k_cache.len() >= d.n_head_kv * d.capacity * hd && total <= d.capacity);
    let mut out = vec![0f32; d.seq * nh * hd];
    let shared = SharedOut(out.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(nh, |heads| {
        let shared = &shared;
        let mut p = vec![0f32; total.next_multiple_of(32)];
        let mut acc = vec![0f32; 8 * hd];
        let mut y = vec![0f32; hd];
        for h in heads {
            let base = (h / group) * d.capacity * hd;
            let keys = &k_cache[base..base + total * hd];
            let values = &v_cache[base..base + total * hd];
            for t in 0..d.seq {
                let qr = &q[(t * nh + h) * hd..(t * nh + h + 1) * hd];
                let seen = d.pos + t + 1;
                for (j, kr) in keys.chunks_exact(hd).take(seen).enumerate() {
                    p[j] = dot(kr, qr) * scale;
                }
                p[seen..].fill(0.0);
                softmax(&mut p[..seen]);
                weighted_sum(&p, values, seen, &mut acc, &mut y);
                let at = (t * nh + h) * hd;
                for (i, &v) in y.iter().enumerate() {
                    // SAFETY: head h of row t is written by the one chunk that owns head h.
                    unsafe { *shared.0.add(at + i) = v };
                }
            }
        }
    });
    out
}

/// `ggml_vec_dot_f32`'s order with AVX2: four 8-lane accumulators over blocks of 32, reduced as
/// `(a0 + a2) + (a1 + a3)`, then across lanes; the remainder added in f64.
fn dot(x: &[f32], y: &[f32]) -> f32 {
    avx2_or!(dot_avx2(x, y), dot_scalar(x, y))
}

/// [`dot`] with AVX2 registers, as ggml writes it (the scalar definition leaves the compiler
/// too little room to vectorise it well for short rows).
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(x: &[f32], y: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = x.len().min(y.len());
    let n32 = n / 32 * 32;
    let (px, py) = (x.as_ptr(), y.as_ptr());
    let mut s = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i < n32 {
        for (j, acc) in s.iter_mut().enumerate() {
            let (a, b) = (px.add(i + 8 * j), py.add(i + 8 * j));
            *acc = _mm256_fmadd_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(b), *acc);
        }
        i += 32;
    }
    let a = _mm256_add_ps(_mm256_add_ps(s[0], s[2]), _mm256_add_ps(s[1], s[3]));
    let t0 = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    let t1 = _mm_hadd_ps(t0, t0);
    let mut sum = _mm_cvtss_f32(_mm_hadd_ps(t1, t1)) as f64;
    for k in n32..n {
        sum += (x[k] * y[k]) as f64;
    }
    sum as f32
}

#[cfg_attr(
    all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ),
    allow(dead_code)
)]
fn dot_scalar(x: &[f32], y: &[f32]) -> f32 {
    let n32 = x.len() / 32 * 32;
    let mut acc = [0f32; 32];
    for (cx, cy) in x[..n32].chunks_exact(32).zip(y[..n32].chunks_exact(32)) {
        for l in 0..32 {
            acc[l] = cx[l].mul_add(cy[l], acc[l]);
        }
    }
    let mut s = reduce32(&acc) as f64;
    for (a, b) in x[n32..].iter().zip(&y[n32..]) {
        s += (a * b) as f64;
    }
    s as f32
}

/// GGML_F32_VEC_REDUCE of four 8-lane accumulators (lane `l` of accumulator `a` at `8a + l`).
fn reduce32(acc: &[f32; 32]) -> f32 {
    let mut x = [0f32; 8];
    for l in 0..8 {
        x[l] = (acc[l] + acc[16 + l]) + (acc[8 + l] + acc[24 + l]);
    }
    let t = [x[0] + x[4], x[1] + x[5], x[2] + x[6], x[3] + x[7]];
    (t[0] + t[1]) + (t[2] + t[3])
}

/// ggml's softmax of a row whose masked tail is already cut off: `exp(x - max)` with its vector
/// `expf`, the 8-lane sums added in f64, then a multiplication by `1 / sum`.
fn softmax(x: &mut [f32]) {
    let max = x
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| if m > v { m } else { v });
    let mut sum = 0f64;
    for chunk in x.chunks_mut(8) {
        let mut lanes = [0f32; 8];
        for (l, v) in chunk.iter_mut().enumerate() {
            *v = expf(*v - max);
            lanes[l] = *v;
        }
        sum += hsum8(lanes) as f64;
    }
    let inv = (1.0 / sum) as f32;
    x.iter_mut().for_each(|v| *v *= inv);
}

/// `y[d] = Σ_j p[j] · v[j, d]` over `n` positions, accumulating position `j` in lane `j % 8`
/// and adding the lanes as tinyBLAS's AVX2 code does.
fn weighted_sum(p: &[f32], v: &[f32], n: usize, acc: &mut [f32], y: &mut [f32]) {
    const L: usize = 8;
    let hd = y.len();
    let acc = &mut acc[..L * hd];
    acc.fill(0.0);
    for (j, row) in v.chunks_exact(hd).take(n).enumerate() {
        let lane = &mut acc[(j % L) * hd..(j % L + 1) * hd];
        for (a, &x) in lane.iter_mut().zip(row) {
            *a = x.mul_add(p[j], *a);
        }
    }
    let mut lanes = [0f32; L];
    for (i, out) in y.iter_mut().enumerate() {
        for (l, lane) in lanes.iter_mut().enumerate() {
            *lane = acc[l * hd + i];
        }
        *out = hsum8(lanes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_matches_the_definition() {
        // Two query heads per KV head, three cached positions and two new rows.
        let d = Dims {
            n_head: 4,
            n_head_kv: 2,
            head_dim: 64,
            pos: 3,
            seq: 2,
            capacity: 8,
        };
        let val = |i: usize| ((i * 7919 % 263) as f32 - 131.0) / 97.0;
        let q: Vec<f32> = (0..d.seq * d.n_head * d.head_dim).map(val).collect();
        let kc: Vec<f32> = (0..d.n_head_kv * d.capacity * d.head_dim)
            .map(|i| val(i + 5))
            .collect();
        let vc: Vec<f32> = (0..kc.len()).map(|i| val(i + 11)).collect();
        let scale = 0.125;
        let got = attend(&q, &kc, &vc, d, scale);
        for t in 0..d.seq {
            for h in 0..d.n_head {
                let base = (h / 2) * d.capacity * d.head_dim;
                let seen = d.pos + t + 1;
                let qr = &q[(t * d.n_head + h) * 64..][..64];
                let s: Vec<f64> = (0..seen)
                    .map(|j| {
                        let kr = &kc[base + j * 64..][..64];
                        qr.iter().zip(kr).map(|(a, b)| (a * b) as f64).sum::<f64>() * scale as f64
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
                for i in 0..64 {
                    let want: f64 = (0..seen)
                        .map(|j| (s[j] - m).exp() / z * vc[base + j * 64 + i] as f64)
                        .sum();
                    let g = got[(t * d.n_head + h) * 64 + i] as f64;
                    assert!((g - want).abs() < 1e-4, "t{t} h{h} d{i}: {g} vs {want}");
                }
            }
        }
    }

    #[test]
    fn simd_dot_is_the_scalar_definition_bit_for_bit() {
        for n in [32, 64, 128, 100] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 7919 % 263) as f32 - 131.0) / 97.0)
                .collect();
            let y: Vec<f32> = (0..n)
                .map(|i| ((i * 104729 % 251) as f32 - 125.0) / 89.0)
                .collect();
            assert_eq!(
                dot(&x, &y).to_bits(),
                dot_scalar(&x, &y).to_bits(),
                "n = {n}"
            );
        }
    }

    #[test]
    fn rope_rotates_pairs() {
        let mut x = vec![1.0f32, 0.0, 0.0, 1.0];
        let (cos, sin) = (vec![0.0f32, 1.0], vec![1.0f32, 0.0]);
        rope(&mut x, 4, &cos, &sin);
        assert_eq!(x, vec![0.0, 1.0, 0.0, 1.0]);
    }
}
