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
use super::{q8_0, SharedOut};

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

/// Queries (a GQA group's heads for a few rows) one unit of work takes together: each key and
/// value row read from the cache serves all of them.
const UNIT_QUERIES: usize = 16;

/// Queries the SIMD score and weighted-sum kernels take at once.
const QUERY_BLOCK: usize = 4;

/// A cache's keys or values, `[kv_heads, capacity, row]`, as [`attend`] reads them.
#[derive(Clone, Copy)]
pub enum Cache<'a> {
    /// Rows of `head_dim` floats, read in place.
    F32(&'a [f32]),
    /// Rows of Q8_0 blocks' bytes ([`q8_0::quantize_rows`]): a unit dequantizes the rows it
    /// reads once, into floats of its own, then computes as for [`Cache::F32`]. The values are
    /// the same whichever unit or batch reads them, so attention stays batch-invariant.
    Q8_0(&'a [u8]),
}

impl<'a> Cache<'a> {
    /// Elements (floats, or bytes) one row of `head_dim` values takes.
    fn row_len(self, head_dim: usize) -> usize {
        match self {
            Self::F32(_) => head_dim,
            Self::Q8_0(_) => head_dim / q8_0::QK * q8_0::BLOCK_BYTES,
        }
    }

    fn len(self) -> usize {
        match self {
            Self::F32(c) => c.len(),
            Self::Q8_0(c) => c.len(),
        }
    }

    /// KV head `g`'s first `n` rows as floats: the cache itself, or dequantized into `buf`.
    fn head<'b>(self, g: usize, d: Dims, n: usize, buf: &'b mut Vec<f32>) -> &'b [f32]
    where
        'a: 'b,
    {
        let row = self.row_len(d.head_dim);
        let start = g * d.capacity * row;
        match self {
            Self::F32(c) => &c[start..start + n * row],
            Self::Q8_0(c) => {
                buf.resize(n * d.head_dim, 0.0);
                q8_0::dequantize_rows(&c[start..start + n * row], buf);
                buf
            }
        }
    }
}

/// One sequence's attention in a step: its queries `[seq, n_head, head_dim]` against its
/// cache's first `pos + seq` positions.
#[derive(Clone, Copy)]
pub struct Job<'a> {
    pub q: &'a [f32],
    pub k: Cache<'a>,
    pub v: Cache<'a>,
    pub dims: Dims,
}

/// How a job splits into units of work: one KV head and `rows` rows each, all the query heads
/// that share that KV head (GQA), so that one pass over its keys and values serves them all.
struct Plan {
    group: usize,
    rows: usize,
    row_blocks: usize,
    /// A unit's queries, padded to whole blocks by repeating its last query.
    slots: usize,
    /// Scores per query row, padded for the SIMD kernels.
    stride: usize,
}

impl Plan {
    fn new(job: &Job<'_>) -> Self {
        let d = job.dims;
        let (nh, hd) = (d.n_head, d.head_dim);
        let group = nh / d.n_head_kv;
        let total = d.pos + d.seq;
        assert_eq!(job.q.len(), d.seq * nh * hd);
        let cached = d.n_head_kv * d.capacity * job.k.row_len(hd);
        assert!(job.k.len() >= cached && job.v.len() >= cached && total <= d.capacity);
        let rows = UNIT_QUERIES.div_ceil(group).min(d.seq);
        Self {
            group,
            rows,
            row_blocks: d.seq.div_ceil(rows),
            slots: (rows * group).next_multiple_of(QUERY_BLOCK),
            stride: total.next_multiple_of(8),
        }
    }

    fn units(&self, d: Dims) -> usize {
        d.n_head_kv * self.row_blocks
    }
}

/// `softmax(q·kᵀ · scale + causal mask) · v` for `q` `[seq, n_head, head_dim]` against the
/// cache's first `pos + seq` positions; returns `[seq, n_head * head_dim]`.
pub fn attend(q: &[f32], k: Cache<'_>, v: Cache<'_>, dims: Dims, scale: f32) -> Vec<f32> {
    let job = Job { q, k, v, dims };
    attend_all(&[job], scale).pop().expect("one job")
}

/// [`attend`] for every sequence of a step, in one dispatch to the pool: the units of all the
/// jobs share the threads, so that several decoding sequences (a few KV heads each) keep both
/// busy instead of waking them once per sequence and layer. Each output is still computed in
/// the order described above, bit for bit as for one query alone, in whatever unit and
/// company it comes.
pub fn attend_all(jobs: &[Job<'_>], scale: f32) -> Vec<Vec<f32>> {
    let plans: Vec<Plan> = jobs.iter().map(Plan::new).collect();
    // The first unit of each job, and one past the last.
    let mut starts = Vec::with_capacity(jobs.len() + 1);
    starts.push(0);
    for (job, plan) in jobs.iter().zip(&plans) {
        starts.push(starts.last().expect("a start") + plan.units(job.dims));
    }
    let mut outs: Vec<Vec<f32>> = jobs
        .iter()
        .map(|j| vec![0f32; j.dims.seq * j.dims.n_head * j.dims.head_dim])
        .collect();
    let shared: Vec<SharedOut> = outs.iter_mut().map(|o| SharedOut(o.as_mut_ptr())).collect();
    let units = *starts.last().expect("a start");
    crate::kernels::pool().execute_chunked(units, |units| {
        let (mut p, mut y) = (Vec::new(), Vec::new());
        // (offset of a query in `q` and in the output, positions it sees), and its values.
        let mut at = Vec::new();
        let mut queries = Vec::new();
        let (mut kbuf, mut vbuf) = (Vec::new(), Vec::new());
        for u in units {
            let j = starts.partition_point(|&s| s <= u) - 1;
            let (job, plan, out) = (&jobs[j], &plans[j], &shared[j]);
            let (d, group) = (job.dims, plan.group);
            let (nh, hd) = (d.n_head, d.head_dim);
            let (g, rb) = (
                (u - starts[j]) / plan.row_blocks,
                (u - starts[j]) % plan.row_blocks,
            );
            let first = rb * plan.rows;
            let last = (first + plan.rows).min(d.seq);
            let seen = d.pos + last;
            let keys = job.k.head(g, d, seen, &mut kbuf);
            let values = job.v.head(g, d, seen, &mut vbuf);
            let n = (last - first) * group;
            at.clear();
            at.extend((0..plan.slots).map(|i| {
                let (t, h) = (
                    first + i.min(n - 1) / group,
                    g * group + i.min(n - 1) % group,
                );
                ((t * nh + h) * hd, d.pos + t + 1)
            }));
            queries.clear();
            queries.extend(at.iter().map(|&(o, _)| &job.q[o..o + hd]));
            p.resize(plan.slots * plan.stride, 0.0);
            y.resize(plan.slots * hd, 0.0);
            scores(&queries, keys, seen, scale, &mut p, plan.stride);
            for (row, &(_, s)) in p.chunks_exact_mut(plan.stride).zip(&at) {
                softmax(&mut row[..s]);
                // Positions after a row's own weigh nothing: adding `0·v` changes no bit of a
                // sum (but the sign of a zero one).
                row[s..seen].fill(0.0);
            }
            weighted_sums(&p, plan.stride, values, seen, &mut y);
            for (yq, &(o, _)) in y.chunks_exact(hd).zip(&at).take(n) {
                // SAFETY: each query's output (one head, one row: `hd` values at `o` of its
                // job's output) is written by the one unit that owns its KV head and row.
                unsafe { std::ptr::copy_nonoverlapping(yq.as_ptr(), out.0.add(o), hd) };
            }
        }
    });
    outs
}

/// `p[i·stride + j] = dot(k_j, q_i) · scale` for the first `n` keys, each as [`dot`] computes
/// it.
fn scores(qs: &[&[f32]], keys: &[f32], n: usize, scale: f32, p: &mut [f32], stride: usize) {
    let hd = qs[0].len();
    let done = if hd.is_multiple_of(32) && qs.len().is_multiple_of(QUERY_BLOCK) {
        avx2_or!(scores_avx2(qs, keys, n / 8 * 8, scale, p, stride), 0)
    } else {
        0
    };
    for (q, row) in qs.iter().zip(p.chunks_exact_mut(stride)) {
        for (j, k) in keys.chunks_exact(hd).enumerate().take(n).skip(done) {
            row[j] = dot(k, q) * scale;
        }
    }
}

/// [`scores`] of the first `n` keys (a multiple of 8) for blocks of four queries whose length
/// is a multiple of 32; returns `n`. Each score is [`dot_avx2`]'s arithmetic: four accumulators
/// over blocks of 32, summed `(a0 + a2) + (a1 + a3)`, then across lanes as
/// `(l0+l4 + l1+l5) + (l2+l6 + l3+l7)`, here for eight keys in one register.
#[cfg(avx2)]
#[target_feature(enable = "avx2,fma")]
unsafe fn scores_avx2(
    qs: &[&[f32]],
    keys: &[f32],
    n: usize,
    scale: f32,
    p: &mut [f32],
    stride: usize,
) -> usize {
    use std::arch::x86_64::*;
    let hd = qs[0].len();
    let blocks = hd / 32;
    let scale = _mm256_set1_ps(scale);
    for (b, rows) in qs
        .chunks_exact(QUERY_BLOCK)
        .zip(p.chunks_exact_mut(QUERY_BLOCK * stride))
    {
        let qp: [*const f32; QUERY_BLOCK] = std::array::from_fn(|i| b[i].as_ptr());
        for j0 in (0..n).step_by(8) {
            // sums[query][key], the eight keys j0..j0 + 8.
            let mut sums = [[_mm256_setzero_ps(); 8]; QUERY_BLOCK];
            for pair in 0..4 {
                let kp = [
                    keys.as_ptr().add((j0 + 2 * pair) * hd),
                    keys.as_ptr().add((j0 + 2 * pair + 1) * hd),
                ];
                let add = |x: [__m256; 8], y: [__m256; 8]| -> [__m256; 8] {
                    std::array::from_fn(|i| _mm256_add_ps(x[i], y[i]))
                };
                let even = add(dots_4x2(&qp, kp, 0, blocks), dots_4x2(&qp, kp, 2, blocks));
                let odd = add(dots_4x2(&qp, kp, 1, blocks), dots_4x2(&qp, kp, 3, blocks));
                let sum = add(even, odd);
                for (i, sums) in sums.iter_mut().enumerate() {
                    sums[2 * pair] = sum[2 * i];
                    sums[2 * pair + 1] = sum[2 * i + 1];
                }
            }
            for (sums, row) in sums.iter().zip(rows.chunks_exact_mut(stride)) {
                let v = _mm256_mul_ps(reduce8_avx2(sums), scale);
                _mm256_storeu_ps(row.as_mut_ptr().add(j0), v);
            }
        }
    }
    n
}

/// Accumulator `a` of [`dot_avx2`]'s four (lanes `8a..8a + 8` of each block of 32) for four
/// queries and two keys: `[q0·k0, q0·k1, q1·k0, ...]`.
#[cfg(avx2)]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dots_4x2(
    qp: &[*const f32; QUERY_BLOCK],
    kp: [*const f32; 2],
    a: usize,
    blocks: usize,
) -> [std::arch::x86_64::__m256; 8] {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); 8];
    for blk in 0..blocks {
        let off = 32 * blk + 8 * a;
        let (k0, k1) = (
            _mm256_loadu_ps(kp[0].add(off)),
            _mm256_loadu_ps(kp[1].add(off)),
        );
        for (i, &q) in qp.iter().enumerate() {
            let q = _mm256_loadu_ps(q.add(off));
            acc[2 * i] = _mm256_fmadd_ps(k0, q, acc[2 * i]);
            acc[2 * i + 1] = _mm256_fmadd_ps(k1, q, acc[2 * i + 1]);
        }
    }
    acc
}

/// The lane sums of eight registers, each as [`dot_avx2`] takes it, in one register.
#[cfg(avx2)]
#[target_feature(enable = "avx2,fma")]
unsafe fn reduce8_avx2(x: &[std::arch::x86_64::__m256; 8]) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // Low half plus high half (lanes l + (l + 4)) of two registers in one, paired 0 with 4,
    // 1 with 5, ... so that the `hadd`s below leave the eight sums in order.
    let half = |a: __m256, b: __m256| {
        _mm256_add_ps(
            _mm256_permute2f128_ps(a, b, 0x20),
            _mm256_permute2f128_ps(a, b, 0x31),
        )
    };
    let h = [
        half(x[0], x[4]),
        half(x[1], x[5]),
        half(x[2], x[6]),
        half(x[3], x[7]),
    ];
    // Then (t0 + t1) + (t2 + t3) of each register's four, as `_mm_hadd_ps` twice.
    _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]))
}

/// `y[i] = Σ_j p[i·stride + j] · v_j` over the first `n` value rows, each as [`weighted_sum`]
/// computes it.
fn weighted_sums(p: &[f32], stride: usize, values: &[f32], n: usize, y: &mut [f32]) {
    let slots = p.len() / stride;
    let hd = y.len() / slots;
    if hd.is_multiple_of(16) && slots.is_multiple_of(QUERY_BLOCK) {
        avx2_or!(weighted_sums_avx2(p, stride, values, n, y), {
            weighted_sums_scalar(p, stride, values, n, y)
        });
    } else {
        weighted_sums_scalar(p, stride, values, n, y);
    }
}

fn weighted_sums_scalar(p: &[f32], stride: usize, values: &[f32], n: usize, y: &mut [f32]) {
    let hd = y.len() / (p.len() / stride);
    let mut acc = vec![0f32; 8 * hd];
    for (p, y) in p.chunks_exact(stride).zip(y.chunks_exact_mut(hd)) {
        weighted_sum(p, values, n, &mut acc, y);
    }
}

/// [`weighted_sums`] for blocks of four queries and rows of a multiple of 16 values: lane `l`
/// of [`weighted_sum`] is the positions `j ≡ l (mod 8)`, accumulated in registers sixteen
/// columns at a time, then the eight lanes added as [`hsum8`] adds them.
#[cfg(avx2)]
#[target_feature(enable = "avx2,fma")]
unsafe fn weighted_sums_avx2(p: &[f32], stride: usize, values: &[f32], n: usize, y: &mut [f32]) {
    use std::arch::x86_64::*;
    let hd = y.len() / (p.len() / stride);
    for (pb, yb) in p
        .chunks_exact(QUERY_BLOCK * stride)
        .zip(y.chunks_exact_mut(QUERY_BLOCK * hd))
    {
        let pp: [*const f32; QUERY_BLOCK] = std::array::from_fn(|i| pb.as_ptr().add(i * stride));
        for c in (0..hd).step_by(16) {
            let mut lanes = [[[_mm256_setzero_ps(); 2]; QUERY_BLOCK]; 8];
            for (l, lane) in lanes.iter_mut().enumerate() {
                let mut acc = [[_mm256_setzero_ps(); 2]; QUERY_BLOCK];
                for j in (l..n).step_by(8) {
                    let row = values.as_ptr().add(j * hd + c);
                    let v = [_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(8))];
                    for (acc, &pq) in acc.iter_mut().zip(&pp) {
                        let w = _mm256_broadcast_ss(&*pq.add(j));
                        acc[0] = _mm256_fmadd_ps(v[0], w, acc[0]);
                        acc[1] = _mm256_fmadd_ps(v[1], w, acc[1]);
                    }
                }
                *lane = acc;
            }
            // A transpose: query i's half k from every lane.
            #[allow(clippy::needless_range_loop)]
            for i in 0..QUERY_BLOCK {
                for k in 0..2 {
                    let l = |x: usize| lanes[x][i][k];
                    let h = [
                        _mm256_add_ps(l(4), l(0)),
                        _mm256_add_ps(l(5), l(1)),
                        _mm256_add_ps(l(6), l(2)),
                        _mm256_add_ps(l(7), l(3)),
                    ];
                    let s = _mm256_add_ps(_mm256_add_ps(h[0], h[2]), _mm256_add_ps(h[1], h[3]));
                    _mm256_storeu_ps(yb.as_mut_ptr().add(i * hd + c + 8 * k), s);
                }
            }
        }
    }
}

/// `ggml_vec_dot_f32`'s order with AVX2: four 8-lane accumulators over blocks of 32, reduced as
/// `(a0 + a2) + (a1 + a3)`, then across lanes; the remainder added in f64.
fn dot(x: &[f32], y: &[f32]) -> f32 {
    avx2_or!(dot_avx2(x, y), dot_scalar(x, y))
}

/// [`dot`] with AVX2 registers, as ggml writes it (the scalar definition leaves the compiler
/// too little room to vectorise it well for short rows).
#[cfg(avx2)]
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

#[cfg_attr(avx2, allow(dead_code))]
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
    let (sum, done) = avx2_or!(
        {
            let whole = x.len() / 8 * 8;
            (exp_sum_avx2(&mut x[..whole], max), whole)
        },
        (0f64, 0)
    );
    let sum = sum + exp_sum(&mut x[done..], max);
    let inv = (1.0 / sum) as f32;
    x.iter_mut().for_each(|v| *v *= inv);
}

/// `x = exp(x - max)`, and the sum of each group of 8's [`hsum8`] (the last group padded with
/// zeros) in f64: [`softmax`]'s sum, one lane at a time.
fn exp_sum(x: &mut [f32], max: f32) -> f64 {
    let mut sum = 0f64;
    for chunk in x.chunks_mut(8) {
        let mut lanes = [0f32; 8];
        for (l, v) in chunk.iter_mut().enumerate() {
            *v = expf(*v - max);
            lanes[l] = *v;
        }
        sum += hsum8(lanes) as f64;
    }
    sum
}

/// [`exp_sum`] of whole groups of 8, eight lanes at a time.
#[cfg(avx2)]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_sum_avx2(x: &mut [f32], max: f32) -> f64 {
    use std::arch::x86_64::*;
    let m = _mm256_set1_ps(max);
    let mut sum = 0f64;
    for chunk in x.chunks_exact_mut(8) {
        let v = super::ggml::expf8_avx2(_mm256_sub_ps(_mm256_loadu_ps(chunk.as_ptr()), m));
        _mm256_storeu_ps(chunk.as_mut_ptr(), v);
        sum += super::x86::hsum8(v) as f64;
    }
    sum
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

    /// Queries `[seq, n_head, head_dim]` and a cache's keys and values, full to its capacity,
    /// for `d`: values spread over ±131 / `div`, shifted by `seed`.
    fn inputs(d: Dims, div: f32, seed: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let val = |i: usize| ((i * 7919 % 263) as f32 - 131.0) / div;
        let q = (0..d.seq * d.n_head * d.head_dim)
            .map(|i| val(i + seed))
            .collect();
        let cached = d.n_head_kv * d.capacity * d.head_dim;
        let kc = (0..cached).map(|i| val(i + 5 + seed)).collect();
        let vc = (0..cached).map(|i| val(i + 11 + seed)).collect();
        (q, kc, vc)
    }

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
        let (q, kc, vc) = inputs(d, 97.0, 0);
        let scale = 0.125;
        let got = attend(&q, Cache::F32(&kc), Cache::F32(&vc), d, scale);
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

    /// One query at a time, one head per thread: the arithmetic [`attend`] must keep.
    fn attend_per_query(q: &[f32], kc: &[f32], vc: &[f32], d: Dims, scale: f32) -> Vec<f32> {
        let (nh, hd) = (d.n_head, d.head_dim);
        let total = d.pos + d.seq;
        let mut out = vec![0f32; d.seq * nh * hd];
        let mut acc = vec![0f32; 8 * hd];
        for h in 0..nh {
            let base = (h / (nh / d.n_head_kv)) * d.capacity * hd;
            let (keys, values) = (&kc[base..base + total * hd], &vc[base..base + total * hd]);
            for t in 0..d.seq {
                let at = (t * nh + h) * hd;
                let seen = d.pos + t + 1;
                let mut p: Vec<f32> = keys
                    .chunks_exact(hd)
                    .take(seen)
                    .map(|k| dot(k, &q[at..at + hd]) * scale)
                    .collect();
                softmax(&mut p);
                weighted_sum(&p, values, seen, &mut acc, &mut out[at..at + hd]);
            }
        }
        out
    }

    #[test]
    fn grouped_attention_is_the_per_query_arithmetic_bit_for_bit() {
        // The 3B shape's heads (a prompt after a cached prefix, and one decoded token),
        // SmolLM2's (groups of three: padded query blocks), and a head size the SIMD kernels
        // do not take.
        for (n_head, n_head_kv, head_dim, pos, seq) in [
            (16, 4, 128, 37, 11),
            (16, 4, 128, 60, 1),
            (9, 3, 64, 0, 13),
            (9, 3, 64, 21, 1),
            (4, 2, 48, 5, 3),
        ] {
            let d = Dims {
                n_head,
                n_head_kv,
                head_dim,
                pos,
                seq,
                capacity: pos + seq + 3,
            };
            let (q, kc, vc) = inputs(d, 37.0, 0);
            let scale = 1.0 / (head_dim as f32).sqrt();
            let got = attend(&q, Cache::F32(&kc), Cache::F32(&vc), d, scale);
            let want = attend_per_query(&q, &kc, &vc, d, scale);
            let differ = got
                .iter()
                .zip(&want)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(
                differ, 0,
                "{n_head}/{n_head_kv} heads of {head_dim}, {pos}+{seq}"
            );
        }
    }

    #[test]
    fn a_step_of_several_sequences_is_each_ones_attention() {
        // Decoding sequences at different positions, a prompt and a Q8_0 cache, in one
        // dispatch: each output bit for bit what the sequence gets alone.
        let shapes = [
            (9, 3, 64, 40, 1),
            (9, 3, 64, 7, 1),
            (9, 3, 64, 0, 13),
            (9, 3, 64, 90, 1),
        ];
        let data: Vec<_> = shapes
            .iter()
            .enumerate()
            .map(|(s, &(n_head, n_head_kv, head_dim, pos, seq))| {
                let d = Dims {
                    n_head,
                    n_head_kv,
                    head_dim,
                    pos,
                    seq,
                    capacity: pos + seq + 5,
                };
                let (q, kc, vc) = inputs(d, 37.0, s);
                (d, q, kc, vc)
            })
            .collect();
        let (kq, vq) = (
            q8_0::quantize_rows(&data[3].2),
            q8_0::quantize_rows(&data[3].3),
        );
        let jobs: Vec<Job> = data
            .iter()
            .enumerate()
            .map(|(i, (d, q, kc, vc))| {
                let (k, v) = if i == 3 {
                    (Cache::Q8_0(&kq), Cache::Q8_0(&vq))
                } else {
                    (Cache::F32(kc), Cache::F32(vc))
                };
                Job { q, k, v, dims: *d }
            })
            .collect();
        let together = attend_all(&jobs, 0.125);
        for (job, got) in jobs.iter().zip(&together) {
            let alone = attend(job.q, job.k, job.v, job.dims, 0.125);
            assert!(got
                .iter()
                .zip(&alone)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }

    #[test]
    fn a_q8_0_cache_is_attended_as_its_values() {
        // A Q8_0 cache gives, bit for bit, what an F32 cache holding its dequantized values
        // gives: the same arithmetic after the unit's dequantizing.
        for (n_head, n_head_kv, head_dim, pos, seq) in [(16, 4, 128, 37, 11), (9, 3, 64, 21, 1)] {
            let d = Dims {
                n_head,
                n_head_kv,
                head_dim,
                pos,
                seq,
                capacity: pos + seq + 3,
            };
            let (q, kc, vc) = inputs(d, 37.0, 0);
            let (kq, vq) = (q8_0::quantize_rows(&kc), q8_0::quantize_rows(&vc));
            let (mut kd, mut vd) = (vec![0f32; kc.len()], vec![0f32; vc.len()]);
            q8_0::dequantize_rows(&kq, &mut kd);
            q8_0::dequantize_rows(&vq, &mut vd);
            assert_ne!(kd, kc, "the values were rounded");
            let scale = 1.0 / (head_dim as f32).sqrt();
            let got = attend(&q, Cache::Q8_0(&kq), Cache::Q8_0(&vq), d, scale);
            let want = attend(&q, Cache::F32(&kd), Cache::F32(&vd), d, scale);
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{n_head}/{n_head_kv} heads of {head_dim}, {pos}+{seq}"
            );
        }
    }

    #[test]
    fn softmax_is_the_one_lane_arithmetic_bit_for_bit() {
        // Whole groups of 8 (eight lanes at a time where the build has AVX2) and a tail.
        for n in [5, 8, 37, 200] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 7919 % 263) as f32 - 131.0) / 7.0)
                .collect();
            let mut got = x.clone();
            softmax(&mut got);
            let mut want = x.clone();
            let max = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let inv = (1.0 / exp_sum(&mut want, max)) as f32;
            want.iter_mut().for_each(|v| *v *= inv);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "n = {n}");
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
