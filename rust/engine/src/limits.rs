//! The defaults and limits of requests and load options, in one place. The bindings publish
//! them to Python (`smolcandle._native.DEFAULTS`), where the API, the command line and the
//! server read them instead of keeping their own.

use crate::error::{Error, Result};
use crate::model::KvType;

/// Sampling temperature when a request does not set one (llama.cpp's default).
pub const DEFAULT_TEMPERATURE: f32 = 0.8;

/// Tokens generated when a raw generation does not say how many.
pub const DEFAULT_MAX_TOKENS: usize = 256;

/// Tokens an answer to a conversation may take when the request does not say.
pub const DEFAULT_CHAT_MAX_TOKENS: usize = 1024;

/// The context a model is loaded with when the caller does not choose one: this, or the
/// model's training context if that is shorter. A sequence's key/value storage grows with
/// what it holds, so the context is a limit, not an allocation.
pub const DEFAULT_N_CTX: usize = 8192;

/// Bytes of finished generations' key/value caches kept for reuse by later requests that
/// share their prefix.
pub const DEFAULT_PREFIX_CACHE_BYTES: usize = 1 << 30;

/// Bytes of finished prefixes' keys and values kept on disk (when a directory is given), least
/// recently used out first.
pub const DEFAULT_DISK_CACHE_BYTES: u64 = 4 << 30;

/// Most alternatives a request may ask log-probabilities for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// How many recent tokens the repetition penalty looks at (llama.cpp's default).
pub const REPEAT_LAST_N: usize = 64;

/// Metadata arrays longer than this (the vocabulary, the merges) are not kept by the engine.
pub const MAX_METADATA_ARRAY: usize = 1024;

/// Sequences generated at once when the load options do not say: four per core (decoding is
/// bound by memory bandwidth, so a step that advances several sequences costs little more than
/// one), between 4 and 32.
pub fn default_max_active(cores: usize) -> usize {
    (4 * cores).clamp(4, 32)
}

/// Requests that may wait for a place among the active sequences, per active place; past
/// them a request is refused ([`crate::Error::Busy`]) rather than queued without bound.
pub const QUEUED_PER_ACTIVE: usize = 8;

/// Key/value storage the active sequences may reserve when the load options do not say: a
/// quarter of the memory available when the model loads, at least 256 MiB. Each sequence
/// reserves what its prompt and `max_tokens` can fill; one that does not fit waits.
pub fn default_kv_budget(available_bytes: usize) -> usize {
    (available_bytes / 4).max(256 << 20)
}

/// Most prompt tokens one scheduler step computes, across all sequences: a longer prompt is
/// computed in chunks, one a step, and the sequences that decode feed their token besides.
/// When only prompts are read, steps carry this many (smaller chunks cost more per token: each
/// step reads the weights, and attention's work per step grows with the prompt read so far);
/// larger ones gain little and hold every newcomer back for longer.
pub const PREFILL_CHUNK: usize = 512;

/// Fewest prompt tokens a step that prefills carries (when prompts have that many left), so that
/// a prompt always advances, however slow the model is against its decoding streams.
pub const PREFILL_CHUNK_MIN: usize = 8;

/// While streams decode, how many times longer than a decoding step a step that also reads a
/// prompt aims to take, so that their inter-token latency at most doubles with the variance of
/// real steps. A load option (`decode_slowdown`) overrides it.
pub const DEFAULT_DECODE_SLOWDOWN: f64 = 1.5;

/// Inputs one embedding call may hold.
pub const MAX_EMBED_INPUTS: usize = 256;

/// Tokens one input of an embedding call may hold (and never more than the context).
pub const MAX_EMBED_TOKENS: usize = 8192;

/// Tokens one embedding call may hold in all: the engine thread computes a call a pass at a
/// time between two scheduler steps, and each pass slows the generations under way.
pub const MAX_EMBED_CALL_TOKENS: usize = 16384;

/// Tokens an embedding call computes per forward pass: inputs are batched up to this many, and
/// a longer input is computed in chunks of this size.
pub const EMBED_BATCH_TOKENS: usize = PREFILL_CHUNK;

/// The context to load a model with: the one asked for, or [`DEFAULT_N_CTX`], never more than
/// `max_context`: the training context, or as far as YaRN scaling reaches (positions past it
/// were never trained, and the rotary tables would be extrapolated).
pub fn context_length(requested: Option<usize>, max_context: usize) -> usize {
    let n = requested.unwrap_or(DEFAULT_N_CTX);
    if n > max_context {
        if requested.is_some() {
            tracing::warn!(
                requested = n,
                max_context,
                "the context is capped at the model's: its training context, or as far as rope scaling reaches"
            );
        }
        return max_context;
    }
    n
}

/// One sequence filling a context of `n_ctx` positions must fit in `available` bytes of memory:
/// a context whose keys and values alone would take more than the machine has is refused at
/// load, saying what it costs, rather than failing when a conversation grows into it.
pub fn check_context_fits(
    n_ctx: usize,
    bytes_per_position: usize,
    kv_type: KvType,
    available: usize,
) -> Result<()> {
    let need = n_ctx.saturating_mul(bytes_per_position);
    if need <= available {
        return Ok(());
    }
    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    Err(Error::invalid(
        "n_ctx",
        format!(
            "a context of {n_ctx} tokens takes {:.1} GiB of keys and values per sequence with the \
             {} cache ({bytes_per_position} bytes a position), more than the {:.1} GiB of memory \
             available; use a smaller n_ctx or a smaller cache type (kv_cache_dtype {})",
            gib(need),
            kv_type.name(),
            gib(available),
            KvType::NAMES
        ),
    ))
}

/// Tokens a conversation's prompt may take in a context of `n_ctx` so that an answer of
/// `max_tokens` still fits; an answer is given at most half of the context, so that a long
/// `max_tokens` does not crowd out the conversation.
pub fn prompt_budget(n_ctx: usize, max_tokens: usize) -> usize {
    n_ctx - max_tokens.min(n_ctx / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_context_is_the_default_or_the_request_within_the_training_context() {
        assert_eq!(context_length(None, 65536), DEFAULT_N_CTX);
        assert_eq!(context_length(None, 2048), 2048);
        assert_eq!(context_length(Some(100_000), 65536), 65536);
        assert_eq!(context_length(Some(512), 65536), 512);
    }

    #[test]
    fn a_context_whose_keys_and_values_exceed_memory_is_refused() {
        // The 3B shape's Q8_0 cache: 36 layers, 4 KV heads of 128, 34 bytes per 32 values.
        let q8 = 36 * 2 * 4 * 128 / 32 * 34;
        assert_eq!(q8, 39_168);
        assert!(check_context_fits(131_072, q8, KvType::Q8_0, 6 << 30).is_ok());
        let f32 = 36 * 2 * 4 * 128 * 4;
        let err = check_context_fits(131_072, f32, KvType::F32, 6 << 30)
            .unwrap_err()
            .to_string();
        assert!(err.contains("n_ctx") && err.contains("18.0 GiB"), "{err}");
        assert!(err.contains("f32") && err.contains("q8_0"), "{err}");
    }

    #[test]
    fn admission_defaults_follow_the_machine() {
        assert_eq!(default_max_active(1), 4);
        assert_eq!(default_max_active(2), 8);
        assert_eq!(default_max_active(64), 32);
        assert_eq!(default_kv_budget(0), 256 << 20);
        assert_eq!(default_kv_budget(16 << 30), 4 << 30);
    }

    #[test]
    fn an_answer_takes_at_most_half_the_context() {
        assert_eq!(prompt_budget(8192, 1024), 7168);
        assert_eq!(prompt_budget(2048, 4096), 1024);
        assert_eq!(prompt_budget(255, 1000), 128);
    }
}
