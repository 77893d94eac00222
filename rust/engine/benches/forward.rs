//! Criterion benchmarks of the decoder: one decode step after a 128-token context, and a
//! 128-token prefill. The model is $SMOLCANDLE_BENCH_MODEL, by default the demo model in the
//! cache (run `python -m smolcandle` or the tests once to fetch it).
//!
//!     cargo bench -p smolcandle-engine --bench forward

use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion};
use smolcandle_engine::gguf::GgufFile;
use smolcandle_engine::model::Model;

fn model_path() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("SMOLCANDLE_BENCH_MODEL") {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var("SMOLCANDLE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            let cache = std::env::var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|_| {
                    PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache")
                });
            cache.join("smolcandle")
        });
    let p = home.join("models").join("SmolLM2-135M-Instruct.Q4_1.gguf");
    p.exists().then_some(p)
}

fn bench(c: &mut Criterion) {
    let Some(path) = model_path() else {
        eprintln!("no model: set SMOLCANDLE_BENCH_MODEL to a GGUF file");
        return;
    };
    let gguf = GgufFile::open(&path).expect("open model");
    let model =
        Model::load(&gguf, &candle_core::Device::Cpu, Some(1024), None, None).expect("load model");
    let context: Vec<u32> = (0..128).map(|i| 100 + (i * 7) % 500).collect();
    let name = path.file_name().unwrap().to_string_lossy().to_string();

    let mut group = c.benchmark_group(name);
    group.sample_size(20);
    group.bench_function("decode_step_at_128", |b| {
        b.iter_batched_ref(
            || {
                let mut c = model.new_cache();
                model.forward(&context, &mut c, false).unwrap();
                c
            },
            |cache| model.forward(&[42], cache, false).unwrap(),
            criterion::BatchSize::LargeInput,
        );
    });
    group.bench_function("prefill_128", |b| {
        b.iter(|| {
            let mut cache = model.new_cache();
            model.forward(&context, &mut cache, false).unwrap()
        });
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
