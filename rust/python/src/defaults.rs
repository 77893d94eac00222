//! The module's constants: the engine's defaults and limits (`DEFAULTS`) and how this build
//! was compiled (`BUILD`).

use pyo3::prelude::*;
use pyo3::types::PyDict;

use smolcandle_engine::{kernels, limits};

/// The engine's defaults and limits (`limits`), for the layers above to read rather than keep
/// their own.
pub(crate) fn defaults(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("temperature", limits::DEFAULT_TEMPERATURE)?;
    d.set_item("max_tokens", limits::DEFAULT_MAX_TOKENS)?;
    d.set_item("chat_max_tokens", limits::DEFAULT_CHAT_MAX_TOKENS)?;
    d.set_item("n_ctx", limits::DEFAULT_N_CTX)?;
    d.set_item("prefix_cache_bytes", limits::DEFAULT_PREFIX_CACHE_BYTES)?;
    d.set_item("disk_cache_bytes", limits::DEFAULT_DISK_CACHE_BYTES)?;
    d.set_item("max_top_logprobs", limits::MAX_TOP_LOGPROBS)?;
    d.set_item("repeat_last_n", limits::REPEAT_LAST_N)?;
    d.set_item("queued_per_active", limits::QUEUED_PER_ACTIVE)?;
    d.set_item("prefill_chunk", limits::PREFILL_CHUNK)?;
    d.set_item("decode_slowdown", limits::DEFAULT_DECODE_SLOWDOWN)?;
    d.set_item("max_embed_inputs", limits::MAX_EMBED_INPUTS)?;
    d.set_item("max_embed_tokens", limits::MAX_EMBED_TOKENS)?;
    d.set_item("max_embed_call_tokens", limits::MAX_EMBED_CALL_TOKENS)?;
    Ok(d)
}

/// The SIMD this build's kernels were compiled for (`simd`), what the running CPU offers
/// (`cpu`), whether CUDA is built in (`cuda`), and the SIMD target features it was compiled
/// with (`target_features`): Candle's quantized kernels use AVX, FMA and F16C only where
/// these say so, and fall back to scalar code otherwise.
pub(crate) fn build(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let build = PyDict::new(py);
    build.set_item("simd", kernels::simd())?;
    build.set_item("cpu", kernels::cpu_levels())?;
    build.set_item("cuda", cfg!(feature = "cuda"))?;
    let mut features = Vec::new();
    macro_rules! compiled {
        ($($f:tt),*) => {$(if cfg!(target_feature = $f) { features.push($f); })*};
    }
    compiled!(
        "sse4.2",
        "avx",
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512vnni"
    );
    build.set_item("target_features", features)?;
    Ok(build)
}
