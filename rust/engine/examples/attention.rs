//! Time of the CPU attention of one layer of the 3B shape (16 query heads in groups of 4,
//! head size 128) for a prompt of `SEQ` new rows after `POS` cached positions, as a
//! conversation's later turn meets it:
//!
//!     cargo run --release -p smolcandle-engine --example attention [-- SEQ POS...]
//!
//! Defaults: 80 rows after 0, 600 and 1200 positions, and one decoded row after 1200. Each
//! figure is the best of several calls; the prefill's share is that time 36 times (layers).

use std::time::Instant;

use smolcandle_engine::kernels::attention::{attend, Cache, Dims};

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("SEQ POS... as integers"))
        .collect();
    let cases: Vec<(usize, usize)> = match args.split_first() {
        Some((&seq, pos)) if !pos.is_empty() => pos.iter().map(|&p| (seq, p)).collect(),
        _ => vec![(80, 0), (80, 600), (80, 1200), (1, 1200)],
    };
    let val = |i: usize| ((i * 7919 % 263) as f32 - 131.0) / 131.0;
    for (seq, pos) in cases {
        let d = Dims {
            n_head: 16,
            n_head_kv: 4,
            head_dim: 128,
            pos,
            seq,
            capacity: pos + seq,
        };
        let q: Vec<f32> = (0..seq * 16 * 128).map(val).collect();
        let kc: Vec<f32> = (0..4 * d.capacity * 128).map(|i| val(i + 5)).collect();
        let vc: Vec<f32> = (0..kc.len()).map(|i| val(i + 11)).collect();
        let scale = 1.0 / 128f32.sqrt();
        let best = (0..20)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(attend(&q, Cache::F32(&kc), Cache::F32(&vc), d, scale));
                t.elapsed().as_secs_f64()
            })
            .fold(f64::MAX, f64::min);
        println!(
            "{seq:>4} rows after {pos:>5}: {:>8.3} ms a layer, {:>7.1} ms for 36 layers",
            best * 1e3,
            best * 36e3
        );
    }
}
