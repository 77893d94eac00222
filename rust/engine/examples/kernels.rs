//! Memory throughput of the quantized kernels on matrices far larger than the caches, as
//! decode meets them: every weight read once per pass, `m` activation rows (default 1).
//!
//!     cargo run --release -p smolcandle-engine --example kernels [-- M [TYPE]]
//!
//! With TYPE (`Q4_1`, `Q8_0`, `Q4_K` or `Q6_K`), only that kernel runs.
//!
//! Shapes: 150 SmolLM2-sized Q4_1 matrices (1536x576, 83 MB) and its Q8_0 output (49152x576,
//! 30 MB); 80 Q4_K matrices of the 3B shape's FFN (11008x2048, 1 GB) and 50 Q6_K ones
//! (2048x11008, 0.9 GB). The blocks are a constant byte pattern: the kernels' speed does not
//! depend on the values. Each figure is the best of several passes. Compare with a plain
//! read loop on the same machine to see how close a kernel is to the memory's bandwidth.

use std::sync::Arc;
use std::time::Instant;

use smolcandle_engine::kernels::kquant::{self, BlockQ4K, BlockQ6K, KBlock};
use smolcandle_engine::kernels::{q4_1, q8_0};

/// Bytes of weights that fill a matrix of `rows x cols` with `block_bytes` per `values`.
fn weights(rows: usize, cols: usize, values: usize, block_bytes: usize) -> Vec<u8> {
    vec![0x11; rows * cols / values * block_bytes]
}

fn activations(m: usize, cols: usize) -> Vec<f32> {
    (0..m * cols)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect()
}

/// Prints the best throughput of `passes` calls of `pass`, which reads `bytes` of weights.
fn report(name: &str, bytes: usize, passes: usize, mut pass: impl FnMut()) {
    let best = (0..passes)
        .map(|_| {
            let t = Instant::now();
            pass();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min);
    let gb = bytes as f64 / 1e9;
    println!(
        "{name:<24} {:>6.1} GB/s  ({:.2} ms for {gb:.2} GB)",
        gb / best,
        best * 1e3
    );
}

fn kquant<B: KBlock>(
    name: &str,
    block_bytes: usize,
    rows: usize,
    cols: usize,
    mats: usize,
    m: usize,
) {
    let all = weights(rows * mats, cols, kquant::QK_K, block_bytes);
    let nb = rows * cols / kquant::QK_K;
    assert_eq!(all.len(), nb * mats * std::mem::size_of::<B>());
    assert!((all.as_ptr() as usize).is_multiple_of(std::mem::align_of::<B>()));
    // SAFETY: the block types are plain old data (integers and f16), so any bytes are valid;
    // size and alignment are checked above.
    let blocks: &[B] = unsafe { std::slice::from_raw_parts(all.as_ptr() as *const B, nb * mats) };
    let (x, mut dst) = (activations(m, cols), vec![0f32; m * rows]);
    report(name, all.len(), 6, || {
        for w in blocks.chunks_exact(nb) {
            kquant::matmul(w, rows, cols, &x, m, &mut dst);
        }
    });
}

fn main() {
    let m: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("M: a number of activation rows"))
        .unwrap_or(1);
    let only = std::env::args().nth(2);
    let runs = |name: &str| only.as_ref().is_none_or(|t| name.starts_with(t.as_str()));
    println!("{m} activation row(s)");

    let (rows, cols, mats) = (1536, 576, 150);
    if runs("Q4_1") {
        q4_1(rows, cols, mats, m);
    }
    if runs("Q8_0") {
        q8_0(49152, cols, m);
    }
    if runs("Q4_K") {
        kquant::<BlockQ4K>("Q4_K 80 x 11008x2048", 144, 11008, 2048, 80, m);
    }
    if runs("Q6_K") {
        kquant::<BlockQ6K>("Q6_K 50 x 2048x11008", 210, 2048, 11008, 50, m);
    }
}

fn q4_1(rows: usize, cols: usize, mats: usize, m: usize) {
    let ws: Vec<q4_1::Matrix> = (0..mats)
        .map(|_| q4_1::Matrix::new(Arc::new(weights(rows, cols, 32, 20)), rows, cols).unwrap())
        .collect();
    let (x, mut dst) = (activations(m, cols), vec![0f32; m * rows]);
    report(
        "Q4_1 150 x 1536x576",
        rows * cols / 32 * 20 * mats,
        8,
        || ws.iter().for_each(|w| w.matmul(&x, m, &mut dst)),
    );
}

fn q8_0(rows: usize, cols: usize, m: usize) {
    let x = activations(m, cols);
    let head = q8_0::Matrix::new(Arc::new(weights(rows, cols, 32, 34)), rows, cols).unwrap();
    let mut dst = vec![0f32; m * rows];
    report("Q8_0 49152x576", rows * cols / 32 * 34, 20, || {
        head.matmul(&x, m, &mut dst)
    });
}
