//! What callers hand the engine and what they get back: load options, a request, the events
//! of its stream, its usage, and the handles that cancel it or read its place in the queue.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use crate::grammar::Grammar;
use crate::prefix::CacheScope;
use crate::reasoning::Reasoning;
use crate::sampling::SamplingParams;

#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// "cpu", "cuda" or "cuda:N".
    pub device: String,
    pub n_threads: Option<usize>,
    /// The context in tokens (see [`crate::limits::context_length`]).
    pub n_ctx: Option<usize>,
    /// How the KV cache stores keys and values: "f32" (default), "f16" (half the memory) or
    /// "q8_0" (53% of F16, on the CPU); see [`KvType`](crate::model::KvType).
    pub kv_cache_dtype: Option<String>,
    /// YaRN rope scaling instead of the file's, to reach past the training window (the context
    /// may then be `factor` times longer; see [`crate::model::Yarn`]).
    pub rope_scaling: Option<crate::model::YarnOptions>,
    /// Bytes of finished generations' key/value caches kept for reuse by later requests that
    /// share their prefix (default
    /// [`DEFAULT_PREFIX_CACHE_BYTES`](crate::limits::DEFAULT_PREFIX_CACHE_BYTES); 0 turns reuse
    /// off).
    pub prefix_cache_bytes: Option<usize>,
    /// Sequences generated at once (default
    /// [`default_max_active`](crate::limits::default_max_active) of the cores).
    pub max_active: Option<usize>,
    /// Requests that may wait for a place (default
    /// [`QUEUED_PER_ACTIVE`](crate::limits::QUEUED_PER_ACTIVE) per active place).
    pub max_queued: Option<usize>,
    /// Bytes of key/value storage the active sequences may reserve (default
    /// [`default_kv_budget`](crate::limits::default_kv_budget) of the memory available at load).
    pub kv_budget_bytes: Option<usize>,
    /// Speculative decoding ([`crate::speculative`]): on by default where the model is
    /// batch-invariant, which it needs; `Some(false)` turns it off.
    pub speculative: Option<bool>,
    /// While streams decode, how many times longer than a decoding step a step that also
    /// reads a prompt may take (default
    /// [`DEFAULT_DECODE_SLOWDOWN`](crate::limits::DEFAULT_DECODE_SLOWDOWN), at least 1): the
    /// prompt tokens a step carries are sized by their measured cost to keep to it.
    pub decode_slowdown: Option<f64>,
    /// A directory where finished prefixes' keys and values are kept across restarts (under
    /// the model's identity; [`crate::prefix::DiskTier`]); none by default.
    pub disk_cache_dir: Option<std::path::PathBuf>,
    /// Bytes kept there at most (default
    /// [`DEFAULT_DISK_CACHE_BYTES`](crate::limits::DEFAULT_DISK_CACHE_BYTES)); 0 keeps nothing.
    pub disk_cache_bytes: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends before any of these strings; they are never emitted.
    pub stop_strings: Vec<String>,
    /// Tokens that end generation, besides the model's end-of-generation tokens.
    pub stop_token_ids: Vec<u32>,
    /// Keep going past end-of-generation tokens (for benchmarks that need a fixed length).
    pub ignore_eog: bool,
    /// Output must follow this grammar; tokens leaving it are masked out before sampling.
    pub grammar: Option<Grammar>,
    /// Report each generated token's log-probability and this many most likely alternatives.
    pub logprobs: Option<usize>,
    /// Whose kept prefix caches this request may start from, and for whom its own is kept.
    pub cache_scope: CacheScope,
    /// Who asked: waiting requests are started by turns among clients (those with the fewest
    /// running first, then the longest since their last start), so one client's many requests
    /// do not keep the others waiting. `None` is one client like any other.
    pub client: Option<String>,
    /// The answer's reasoning block: its tags, whether the prompt opens it, its budget. An
    /// output constraint applies from the end of the block.
    pub reasoning: Option<Reasoning>,
}

impl GenerateRequest {
    /// A request with the given prompt and defaults for everything else.
    pub fn new(prompt: Vec<u32>, max_tokens: usize, sampling: SamplingParams) -> Self {
        Self {
            prompt,
            max_tokens,
            sampling,
            stop_strings: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eog: false,
            grammar: None,
            logprobs: None,
            cache_scope: CacheScope::Shared,
            client: None,
            reasoning: None,
        }
    }
}

/// A generated token's log-probability under the model (before penalties, temperature and
/// grammar), and the most likely tokens at that position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values came from an earlier request (not computed).
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    /// Completion tokens inside the reasoning block, its closing tag included.
    pub reasoning_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    /// Draft tokens fed for verification ([`crate::speculative`]), and how many of them were
    /// kept as the tokens chosen.
    pub drafted_tokens: usize,
    pub accepted_tokens: usize,
}

/// Speculative decoding's state and counters since the engine started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpeculationStats {
    pub enabled: bool,
    pub drafted_tokens: u64,
    pub accepted_tokens: u64,
    /// Steps that verified a draft.
    pub steps: u64,
}

/// [`SpeculationStats`]' counters, written by the engine thread.
#[derive(Default)]
pub(super) struct SpeculationCounters {
    pub(super) drafted: AtomicU64,
    pub(super) accepted: AtomicU64,
    pub(super) steps: AtomicU64,
}

#[derive(Debug, Clone)]
pub enum Event {
    Chunk {
        text: String,
        token_ids: Vec<u32>,
        /// One entry per token of `token_ids` when the request asked for log-probabilities.
        logprobs: Vec<TokenLogprob>,
    },
    Done {
        finish_reason: FinishReason,
        usage: Usage,
    },
    /// The generation failed; the text of the engine error, ready to show.
    Error(String),
}

/// The receiving end of one generation.
pub struct Stream {
    pub(super) rx: Receiver<Event>,
    pub(super) cancel: Arc<AtomicBool>,
    pub(super) position: Arc<AtomicUsize>,
}

impl Stream {
    /// The next event; `None` once the engine has dropped the sequence (after `Done`).
    pub fn recv(&self) -> Option<Event> {
        self.rx.recv().ok()
    }

    pub fn recv_timeout(&self, timeout: Duration) -> std::result::Result<Event, RecvTimeoutError> {
        self.rx.recv_timeout(timeout)
    }

    /// Asks the engine to stop this generation; a `Done` with `Cancelled` follows.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// A handle that cancels this stream from another thread.
    pub fn canceller(&self) -> Canceller {
        Canceller(self.cancel.clone())
    }

    /// A handle that reads this stream's place in the queue from another thread.
    pub fn place(&self) -> QueuePlace {
        QueuePlace(self.position.clone())
    }
}

impl Drop for Stream {
    /// A stream nobody reads any more stops generating.
    fn drop(&mut self) {
        self.cancel();
    }
}

/// A request's place in the engine's queue: 1 for the next to start, 0 once it runs (or ended).
#[derive(Clone)]
pub struct QueuePlace(Arc<AtomicUsize>);

impl QueuePlace {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
pub struct Canceller(Arc<AtomicBool>);

impl Canceller {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}
