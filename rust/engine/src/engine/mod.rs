//! The engine owns the model on its own thread. Callers submit requests (token ids and sampling
//! settings) and receive events over a channel; every active sequence advances one step per
//! turn of the scheduler loop, so several streams make progress together.
//!
//! Admission is bounded: at most `max_active` sequences run at once, and together they reserve
//! at most the key/value budget (each what its prompt and `max_tokens` can fill). Other
//! requests wait in a queue of at most `max_queued`, where each stream can read its place, and
//! start by turns among their clients; past that, [`Engine::generate`] refuses with
//! [`Error::Busy`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::Device;

use crate::detok::TextStream;
use crate::error::{catch_panic, Error, Result};
use crate::gguf::{GgufFile, MetadataValue};
use crate::grammar::{Constraint, Grammar, Grammars};
use crate::limits::{
    default_kv_budget, default_max_active, DEFAULT_PREFIX_CACHE_BYTES, MAX_METADATA_ARRAY,
    MAX_TOP_LOGPROBS, QUEUED_PER_ACTIVE,
};
use crate::model::{BatchItem, KvCache, KvType, Model};
use crate::prefix::{CacheScope, PrefixCache, PrefixStats};
use crate::reasoning::{Reasoning, ReasoningState};
use crate::sampling::{Sampler, SamplingParams};
use crate::speculative::{Acceptance, Drafts, NgramIndex, Source, MAX_DRAFT};
use crate::tokenizer::Tokenizer;

/// Prompt tokens computed per scheduler step, across all sequences, so a long prompt does not
/// stall the streams already decoding for its whole prefill.
const PREFILL_BUDGET: usize = 512;

#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// "cpu", "cuda" or "cuda:N".
    pub device: String,
    pub n_threads: Option<usize>,
    /// The context in tokens (see [`crate::limits::context_length`]).
    pub n_ctx: Option<usize>,
    /// How the KV cache stores keys and values: "f32" (default), "f16" (half the memory) or
    /// "q8_0" (53% of F16, on the CPU); see [`KvType`].
    pub kv_cache_dtype: Option<String>,
    /// Bytes of finished generations' key/value caches kept for reuse by later requests that
    /// share their prefix (default [`DEFAULT_PREFIX_CACHE_BYTES`]; 0 turns reuse off).
    pub prefix_cache_bytes: Option<usize>,
    /// Sequences generated at once (default [`default_max_active`] of the cores).
    pub max_active: Option<usize>,
    /// Requests that may wait for a place (default [`QUEUED_PER_ACTIVE`] per active place).
    pub max_queued: Option<usize>,
    /// Bytes of key/value storage the active sequences may reserve (default
    /// [`default_kv_budget`] of the memory available at load).
    pub kv_budget_bytes: Option<usize>,
    /// Speculative decoding ([`crate::speculative`]): on by default where the model is
    /// batch-invariant, which it needs; `Some(false)` turns it off.
    pub speculative: Option<bool>,
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
struct SpeculationCounters {
    drafted: AtomicU64,
    accepted: AtomicU64,
    steps: AtomicU64,
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
    rx: Receiver<Event>,
    cancel: Arc<AtomicBool>,
    position: Arc<AtomicUsize>,
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

/// A request's place in the engine's queue: 1 for the next to start, 0 once it runs (or ended).
#[derive(Clone)]
pub struct QueuePlace(Arc<AtomicUsize>);

impl QueuePlace {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// The scheduler's limits and where it stands against them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AdmissionStats {
    pub max_active: usize,
    pub max_queued: usize,
    pub kv_budget_bytes: usize,
    pub active: usize,
    pub queued: usize,
    /// Key/value bytes the active sequences have reserved.
    pub kv_reserved_bytes: usize,
    /// Requests refused because the queue was full.
    pub refused: u64,
}

/// The limits, and counters shared between the callers and the engine thread.
struct Admission {
    max_active: usize,
    max_queued: usize,
    kv_budget: usize,
    /// Submitted and not yet running (nor cancelled while waiting).
    queued: AtomicUsize,
    active: AtomicUsize,
    reserved: AtomicUsize,
    refused: AtomicU64,
}

impl Admission {
    fn new(options: &LoadOptions) -> Result<Self> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let max_active = options.max_active.unwrap_or(default_max_active(cores));
        let max_queued = options
            .max_queued
            .unwrap_or(max_active.saturating_mul(QUEUED_PER_ACTIVE));
        let kv_budget = options
            .kv_budget_bytes
            .unwrap_or_else(|| default_kv_budget(available_memory()));
        if max_active == 0 {
            return Err(Error::invalid("max_active", "must be at least 1"));
        }
        if kv_budget == 0 {
            return Err(Error::invalid("kv_budget_bytes", "must be at least 1"));
        }
        if max_queued == 0 {
            // Every request passes through the queue, if only until the next step.
            return Err(Error::invalid("max_queued", "must be at least 1"));
        }
        Ok(Self {
            max_active,
            max_queued,
            kv_budget,
            queued: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            reserved: AtomicUsize::new(0),
            refused: Default::default(),
        })
    }

    /// Takes a place in the queue, or says the queue is full.
    fn enqueue(&self) -> Result<()> {
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q < self.max_queued).then_some(q + 1)
            })
            .map(drop)
            .map_err(|queued| {
                self.refused.fetch_add(1, Ordering::Relaxed);
                Error::Busy { queued }
            })
    }

    fn stats(&self) -> AdmissionStats {
        AdmissionStats {
            max_active: self.max_active,
            max_queued: self.max_queued,
            kv_budget_bytes: self.kv_budget,
            active: self.active.load(Ordering::Relaxed),
            queued: self.queued.load(Ordering::Relaxed),
            kv_reserved_bytes: self.reserved.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }
}

/// Bytes of memory the system can give without swapping (Linux's `MemAvailable`); 4 GiB
/// where that cannot be read.
fn available_memory() -> usize {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
            let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
            kib.checked_mul(1024)
        })
        .unwrap_or(4 << 30)
}

impl Drop for Stream {
    /// A stream nobody reads any more stops generating.
    fn drop(&mut self) {
        self.cancel();
    }
}

#[derive(Clone)]
pub struct Canceller(Arc<AtomicBool>);

impl Canceller {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

enum Command {
    Submit {
        request: Box<GenerateRequest>,
        constraint: Option<Box<Constraint>>,
        tx: Sender<Event>,
        cancel: Arc<AtomicBool>,
        position: Arc<AtomicUsize>,
    },
    Shutdown,
}

pub struct Engine {
    model: Arc<Model>,
    tokenizer: Arc<Tokenizer>,
    grammars: Grammars,
    prefix_stats: Arc<Mutex<PrefixStats>>,
    kv_use: Arc<KvUse>,
    admission: Arc<Admission>,
    speculative: bool,
    speculation: Arc<SpeculationCounters>,
    metadata: HashMap<String, MetadataValue>,
    tx: Sender<Command>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim();
    if spec.is_empty() || spec == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match spec {
        "cuda" => 0,
        _ => match spec.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => {
                return Err(Error::Device(format!(
                    "{spec:?} is not a device (use \"cpu\", \"cuda\" or \"cuda:N\")"
                )))
            }
        },
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(Error::Device(format!(
            "{spec:?}: this build of smolcandle has no CUDA support (build with --features cuda)"
        )));
    }
    Device::new_cuda(ordinal).map_err(|e| Error::Device(format!("{spec:?}: {e}")))
}

/// Candle sizes its CPU thread pool once per process, from the environment, on first use.
fn configure_threads(n_threads: Option<usize>) -> Result<()> {
    static CHOSEN: OnceLock<Option<usize>> = OnceLock::new();
    if n_threads == Some(0) {
        return Err(Error::invalid("n_threads", "must be at least 1"));
    }
    let chosen = *CHOSEN.get_or_init(|| {
        if let Some(n) = n_threads {
            for var in ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"] {
                // Set before any thread pool exists, from the loading thread.
                std::env::set_var(var, n.to_string());
            }
        }
        n_threads
    });
    if n_threads.is_some() && n_threads != chosen {
        tracing::warn!(
            requested = n_threads,
            in_use = chosen,
            "the CPU thread count is fixed by the first model loaded in this process"
        );
    }
    Ok(())
}

/// Hands the heap's free pages back to the system. After load, they are the file's metadata as
/// Candle's reader parsed it (on SmolLM2's vocabulary about 100,000 strings), freed in between
/// allocations that live on, which glibc would otherwise keep resident: 3 MB on SmolLM2. When
/// the engine goes idle, they are the finished sequences' key/value caches and buffers.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: glibc's malloc_trim takes any padding and releases only free memory.
        unsafe {
            malloc_trim(0);
        }
    }
}

impl Engine {
    pub fn load(path: impl AsRef<Path>, options: &LoadOptions) -> Result<Self> {
        let path = path.as_ref();
        configure_threads(options.n_threads)?;
        let admission = Admission::new(options)?;
        let device = parse_device(&options.device)?;
        let gguf = GgufFile::open(path)?;
        let mut tokenizer = Tokenizer::from_gguf(&gguf)?;
        let override_json = path.with_file_name("tokenizer.json");
        if override_json.is_file() {
            tokenizer.set_override(&override_json)?;
        }
        let kv_type = match options.kv_cache_dtype.as_deref() {
            None => None,
            Some(name) => Some(KvType::parse(name).ok_or_else(|| {
                Error::invalid(
                    "kv_cache_dtype",
                    format!("{name:?} (use {})", KvType::NAMES),
                )
            })?),
        };
        let model = Model::load(&gguf, &device, options.n_ctx, kv_type)?;
        let speculative = match options.speculative {
            Some(true) if !model.batch_invariant() => {
                return Err(Error::invalid(
                    "speculative",
                    "this model's products are not batch-invariant on this device and build, \
                     so a verified draft could differ from plain decoding",
                ))
            }
            on => on.unwrap_or(true) && model.batch_invariant(),
        };
        if tokenizer.n_vocab() > model.config().n_vocab {
            return Err(Error::Tokenizer(format!(
                "the vocabulary has {} tokens but the embedding only {} rows",
                tokenizer.n_vocab(),
                model.config().n_vocab
            )));
        }
        // The vocabulary and merges live on in the tokenizer; a second copy would be 6 MB on
        // SmolLM2's vocabulary.
        let metadata = gguf
            .metadata()
            .iter()
            .filter(
                |(_, v)| !matches!(v, MetadataValue::Array(xs) if xs.len() > MAX_METADATA_ARRAY),
            )
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let prefix = PrefixCache::new(
            options
                .prefix_cache_bytes
                .unwrap_or(DEFAULT_PREFIX_CACHE_BYTES),
        );
        drop(gguf);
        release_freed_memory();
        Ok(Self::start(
            Arc::new(model),
            Arc::new(tokenizer),
            metadata,
            prefix,
            Arc::new(admission),
            speculative,
        ))
    }

    fn start(
        model: Arc<Model>,
        tokenizer: Arc<Tokenizer>,
        metadata: HashMap<String, MetadataValue>,
        prefix: PrefixCache,
        admission: Arc<Admission>,
        speculative: bool,
    ) -> Self {
        let (tx, rx) = mpsc::channel();
        let speculation = Arc::new(SpeculationCounters::default());
        let prefix_stats = Arc::new(Mutex::new(prefix.stats()));
        let kv_use = Arc::new(KvUse::default());
        let thread = {
            let (model, tokenizer) = (model.clone(), tokenizer.clone());
            let scheduler = Scheduler {
                model,
                tokenizer,
                rx,
                active: Vec::new(),
                waiting: std::collections::VecDeque::new(),
                last_start: HashMap::new(),
                starts: 0,
                admission: admission.clone(),
                prefix,
                prefix_stats: prefix_stats.clone(),
                kv_use: kv_use.clone(),
                speculative,
                drafts: Drafts::default(),
                speculation: speculation.clone(),
            };
            std::thread::Builder::new()
                .name("smolcandle-engine".into())
                .spawn(move || scheduler.run())
                .expect("spawning the engine thread")
        };
        let grammars = Grammars::new(tokenizer.clone(), model.config().n_vocab);
        Self {
            model,
            tokenizer,
            grammars,
            prefix_stats,
            kv_use,
            admission,
            speculative,
            speculation,
            metadata,
            tx,
            thread: Mutex::new(Some(thread)),
        }
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The file's metadata, without arrays longer than [`MAX_METADATA_ARRAY`].
    pub fn metadata(&self) -> &HashMap<String, MetadataValue> {
        &self.metadata
    }

    /// Counters of the prefix cache (kept entries, bytes, hits, reused tokens, evictions).
    pub fn prefix_stats(&self) -> PrefixStats {
        self.prefix_stats.lock().map(|s| *s).unwrap_or_default()
    }

    /// Bytes of key/value storage held now (active sequences' caches and kept ones), and the
    /// most held at once since the engine started.
    pub fn kv_bytes(&self) -> (usize, usize) {
        (
            self.kv_use.bytes.load(Ordering::Relaxed),
            self.kv_use.peak.load(Ordering::Relaxed),
        )
    }

    /// The scheduler's limits (active sequences, queue, key/value budget) and its use of them.
    pub fn admission(&self) -> AdmissionStats {
        self.admission.stats()
    }

    /// Whether speculative decoding is on, and its counters.
    pub fn speculation(&self) -> SpeculationStats {
        let c = &self.speculation;
        SpeculationStats {
            enabled: self.speculative,
            drafted_tokens: c.drafted.load(Ordering::Relaxed),
            accepted_tokens: c.accepted.load(Ordering::Relaxed),
            steps: c.steps.load(Ordering::Relaxed),
        }
    }

    /// Validates a request and queues it. Errors in the request are returned here, before any
    /// stream exists; a full queue is [`Error::Busy`].
    pub fn generate(&self, request: GenerateRequest) -> Result<Stream> {
        request.sampling.validate()?;
        if request.prompt.is_empty() {
            return Err(Error::invalid("prompt", "is empty"));
        }
        if request.max_tokens == 0 {
            return Err(Error::invalid("max_tokens", "must be at least 1"));
        }
        let n_ctx = self.model.n_ctx();
        if request.prompt.len() > n_ctx {
            return Err(Error::ContextOverflow {
                n_prompt: request.prompt.len(),
                n_ctx,
            });
        }
        let n_vocab = self.model.config().n_vocab;
        for (name, ids) in [
            ("prompt", &request.prompt),
            ("stop_token_ids", &request.stop_token_ids),
        ] {
            if let Some(bad) = ids.iter().find(|&&t| t as usize >= n_vocab) {
                return Err(Error::invalid(
                    name,
                    format!("token id {bad} is outside the vocabulary of {n_vocab}"),
                ));
            }
        }
        if let Some(n) = request.logprobs.filter(|&n| n > MAX_TOP_LOGPROBS) {
            return Err(Error::invalid(
                "top_logprobs",
                format!("{n} is more than {MAX_TOP_LOGPROBS}"),
            ));
        }
        let constraint = match &request.grammar {
            Some(g) => Some(Box::new(self.grammars.compile(g)?)),
            None => None,
        };
        self.admission.enqueue()?;
        let (tx, rx) = mpsc::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let position = Arc::new(AtomicUsize::new(
            self.admission.queued.load(Ordering::Relaxed),
        ));
        let submitted = self.tx.send(Command::Submit {
            request: Box::new(request),
            constraint,
            tx,
            cancel: cancel.clone(),
            position: position.clone(),
        });
        if submitted.is_err() {
            self.admission.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(Error::EngineStopped);
        }
        Ok(Stream {
            rx,
            cancel,
            position,
        })
    }

    /// Float32 logits for every position of a fresh sequence, `[ids.len(), n_vocab]`
    /// row-major. Runs on the calling thread.
    pub fn logits(&self, ids: &[u32]) -> Result<(Vec<f32>, usize)> {
        let mut cache = self.model.new_cache();
        let logits = self.model.forward(ids, &mut cache, true)?;
        let n_vocab = self.model.config().n_vocab;
        Ok((logits.flatten_all()?.to_vec1::<f32>()?, n_vocab))
    }

    /// Stops the engine thread; open streams end with `Cancelled`.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
        if let Some(handle) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = handle.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Scheduler {
    model: Arc<Model>,
    tokenizer: Arc<Tokenizer>,
    rx: Receiver<Command>,
    active: Vec<Sequence>,
    /// Submitted requests waiting for a place, in the order they came.
    waiting: std::collections::VecDeque<Sequence>,
    /// When each client last had a request started (a count of starts), for turns.
    last_start: HashMap<Option<String>, u64>,
    starts: u64,
    admission: Arc<Admission>,
    prefix: PrefixCache,
    prefix_stats: Arc<Mutex<PrefixStats>>,
    kv_use: Arc<KvUse>,
    /// Whether a sequence decoding alone may verify drafts.
    speculative: bool,
    /// The measured cost of verifying drafts.
    drafts: Drafts,
    speculation: Arc<SpeculationCounters>,
}

/// Key/value storage held by the engine thread, for [`Engine::kv_bytes`].
#[derive(Default)]
struct KvUse {
    bytes: AtomicUsize,
    peak: AtomicUsize,
}

impl Scheduler {
    fn run(mut self) {
        let mut ran = false;
        loop {
            if self.active.is_empty() && self.waiting.is_empty() {
                if std::mem::take(&mut ran) {
                    // Idle: the finished sequences' caches (megabytes each, freed from several
                    // threads' arenas) go back to the system rather than stay resident.
                    release_freed_memory();
                }
                match self.rx.recv() {
                    Ok(cmd) => {
                        if !self.handle(cmd) {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
            loop {
                match self.rx.try_recv() {
                    Ok(cmd) => {
                        if !self.handle(cmd) {
                            return;
                        }
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        self.stop_all();
                        return;
                    }
                }
            }
            self.admit();
            if self.active.is_empty() {
                continue;
            }
            ran = true;
            // A panic in a step (a bug, never input) fails the sequences of that step; the
            // engine goes on serving the others.
            if let Err(e) = catch_panic(|| {
                self.step();
                Ok(())
            }) {
                let message = e.to_string();
                for seq in &mut self.active {
                    seq.fail(message.clone());
                }
            }
            self.count_kv();
            self.retire();
            self.count_kv();
        }
    }

    /// Drops cancelled requests from the queue, then starts waiting ones while a place and their
    /// key/value reservation are free (one runs alone whatever it reserves, so no request waits
    /// for ever), and tells the rest their place. The next to start is the oldest request of the
    /// client with the fewest running, then the one whose last start is longest ago.
    fn admit(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain_mut(|seq| {
            if seq.cancel.load(Ordering::Relaxed) {
                seq.finish(FinishReason::Cancelled);
                seq.position.store(0, Ordering::Relaxed);
            }
            !seq.done
        });
        let mut started = before - self.waiting.len();
        let mut reserved: usize = self.active.iter().map(|s| s.reserve).sum();
        while let Some(at) = self.next_turn() {
            let next = &self.waiting[at];
            let fits = self.active.len() < self.admission.max_active
                && reserved + next.reserve <= self.admission.kv_budget;
            if !(fits || self.active.is_empty()) {
                break;
            }
            let mut seq = self.waiting.remove(at).expect("picked from the queue");
            self.starts += 1;
            self.last_start.insert(seq.client.clone(), self.starts);
            started += 1;
            reserved += seq.reserve;
            seq.position.store(0, Ordering::Relaxed);
            match self
                .prefix
                .lookup(&seq.tokens[..seq.n_prompt], &seq.cache_scope)
            {
                Ok(Some((cache, n))) => {
                    seq.cache = cache;
                    seq.n_prefilled = n;
                    seq.n_cached = n;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "prefix cache lookup failed"),
            }
            seq.started = Instant::now();
            self.publish_stats();
            self.active.push(seq);
        }
        if started > 0 {
            for (i, seq) in self.waiting.iter().enumerate() {
                seq.position.store(i + 1, Ordering::Relaxed);
            }
            self.admission.queued.fetch_sub(started, Ordering::AcqRel);
        }
        if self.last_start.len() > 4 * (self.admission.max_active + self.admission.max_queued) {
            // Forget clients with nothing running or waiting.
            let (active, waiting) = (&self.active, &self.waiting);
            self.last_start.retain(|client, _| {
                active
                    .iter()
                    .chain(waiting.iter())
                    .any(|s| s.client == *client)
            });
        }
        self.publish_admission();
    }

    /// Publishes the running sequences' count and reservations for [`Engine::admission`].
    fn publish_admission(&self) {
        let reserved = self.active.iter().map(|s| s.reserve).sum();
        self.admission
            .active
            .store(self.active.len(), Ordering::Relaxed);
        self.admission.reserved.store(reserved, Ordering::Relaxed);
    }

    /// The index in the queue of the request whose turn it is.
    fn next_turn(&self) -> Option<usize> {
        self.waiting
            .iter()
            .enumerate()
            .min_by_key(|(i, seq)| {
                let running = self
                    .active
                    .iter()
                    .filter(|a| a.client == seq.client)
                    .count();
                let last = self.last_start.get(&seq.client).copied().unwrap_or(0);
                (running, last, *i)
            })
            .map(|(i, _)| i)
    }

    /// Advances every active sequence in one batched forward pass: each decoding sequence
    /// feeds its last token (and, decoding alone, perhaps a draft to verify), prefilling ones a
    /// chunk of their prompt within the step's budget.
    fn step(&mut self) {
        let started = Instant::now();
        let mut budget = PREFILL_BUDGET;
        let drafts = (self.speculative && self.active.len() == 1).then_some(&self.drafts);
        let fed: Vec<bool> = self
            .active
            .iter_mut()
            .map(|seq| seq.next_input(&self.model, &mut budget, drafts))
            .collect();
        let mut items: Vec<BatchItem<'_>> = self
            .active
            .iter_mut()
            .zip(&fed)
            .filter(|(_, &fed)| fed)
            .map(|(seq, _)| BatchItem {
                logits: seq.draft_len + 1,
                tokens: &seq.feed,
                cache: &mut seq.cache,
            })
            .collect();
        let result = self.model.forward_batch(&mut items);
        drop(items);
        let stepped = self
            .active
            .iter_mut()
            .zip(&fed)
            .filter(|(_, &fed)| fed)
            .map(|(seq, _)| seq);
        match result {
            Ok(logits) => {
                for (seq, logits) in stepped.zip(logits) {
                    let before = (seq.drafted, seq.accepted);
                    seq.after_forward(logits, &self.tokenizer);
                    let c = &self.speculation;
                    if seq.drafted > before.0 {
                        c.steps.fetch_add(1, Ordering::Relaxed);
                        let drafted = (seq.drafted - before.0) as u64;
                        c.drafted.fetch_add(drafted, Ordering::Relaxed);
                        let accepted = (seq.accepted - before.1) as u64;
                        c.accepted.fetch_add(accepted, Ordering::Relaxed);
                    }
                }
            }
            Err(e) => {
                let message = e.to_string();
                for seq in stepped {
                    seq.fail(message.clone());
                }
            }
        }
        // What a step decoding one sequence costs, by the rows it fed: the drafts' measure.
        if let ([seq], [true], true) = (&self.active[..], &fed[..], drafts.is_some()) {
            if seq.decoding && !seq.failed {
                let rows = seq.draft_len + 1;
                self.drafts.observe(rows, started.elapsed().as_secs_f64());
            }
        }
    }

    /// Drops finished sequences, keeping their caches for requests that share their prefix.
    fn retire(&mut self) {
        let mut kept = false;
        for seq in self.active.iter_mut().filter(|s| s.done && !s.failed) {
            // Every position fed to the model is kept where the model is batch-invariant: a
            // generated token's keys and values are then exactly those a later prompt holding
            // it computes, so the next turn of a conversation starts after the answer.
            // Elsewhere only the prompt's positions are: generated ones were computed by other
            // kernels than prompt rows (K-quant panels, CUDA), in another summation order, and
            // keeping them would make a reused prefix differ from a cold start in the last
            // bits, and so, at times, the output. They are kept in storage of exactly their
            // size (a cache grows by a quarter at a time).
            let cache = std::mem::replace(&mut seq.cache, KvCache::empty());
            let n = if self.model.batch_invariant() {
                cache.len()
            } else {
                cache.len().min(seq.n_prompt)
            };
            if !self.prefix.admits(
                &seq.tokens[..n],
                n * cache.bytes_per_position(),
                &seq.cache_scope,
            ) {
                continue; // not cut to size (a copy) only to be dropped
            }
            match cache.into_prefix(n) {
                Ok(cache) => {
                    let scope = std::mem::take(&mut seq.cache_scope);
                    self.prefix.insert(seq.tokens[..n].to_vec(), cache, scope);
                    kept = true;
                }
                Err(e) => tracing::warn!(error = %e, "could not keep a finished prompt's cache"),
            }
        }
        self.active.retain(|s| !s.done);
        self.publish_admission();
        if kept {
            self.publish_stats();
        }
    }

    /// Records the key/value storage held: after a step it is largest (finished sequences'
    /// caches are not yet handed to the prefix cache, nor cut to their size).
    fn count_kv(&self) {
        let active: usize = self.active.iter().map(|s| s.cache.bytes()).sum();
        let bytes = active + self.prefix.stats().bytes;
        self.kv_use.bytes.store(bytes, Ordering::Relaxed);
        self.kv_use.peak.fetch_max(bytes, Ordering::Relaxed);
    }

    fn publish_stats(&self) {
        if let Ok(mut s) = self.prefix_stats.lock() {
            *s = self.prefix.stats();
        }
    }

    /// False when the engine must stop.
    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Submit {
                request,
                constraint,
                tx,
                cancel,
                position,
            } => {
                let seq = Sequence::new(
                    *request,
                    constraint,
                    tx,
                    cancel,
                    position,
                    &self.model,
                    &self.tokenizer,
                );
                seq.position
                    .store(self.waiting.len() + 1, Ordering::Relaxed);
                self.waiting.push_back(seq);
                true
            }
            Command::Shutdown => {
                self.stop_all();
                false
            }
        }
    }

    fn stop_all(&mut self) {
        for seq in self.active.iter_mut().chain(self.waiting.iter_mut()) {
            seq.finish(FinishReason::Cancelled);
        }
        self.active.clear();
        self.waiting.clear();
    }
}

struct Sequence {
    tx: Sender<Event>,
    cancel: Arc<AtomicBool>,
    /// Its place in the queue, 0 once running.
    position: Arc<AtomicUsize>,
    /// Key/value bytes its prompt and `max_tokens` can fill (within the context).
    reserve: usize,
    cache_scope: CacheScope,
    client: Option<String>,
    cache: KvCache,
    sampler: Sampler,
    constraint: Option<Box<Constraint>>,
    /// A constraint that applies once the reasoning block has ended.
    held_constraint: Option<Box<Constraint>>,
    reasoning: Option<ReasoningState>,
    /// How many alternatives to report with each token's log-probability, if asked.
    logprobs: Option<usize>,
    /// Log-probabilities of the tokens the text stream holds back, in order.
    pending_logprobs: std::collections::VecDeque<TokenLogprob>,
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    n_prompt: usize,
    n_prefilled: usize,
    /// Prompt tokens taken from the prefix cache.
    n_cached: usize,
    n_generated: usize,
    max_tokens: usize,
    stop_token_ids: Vec<u32>,
    ignore_eog: bool,
    text: TextStream,
    started: Instant,
    first_token_at: Option<Instant>,
    prefill_seconds: f64,
    done: bool,
    /// Ended by an error: its cache may be half-updated and is not kept.
    failed: bool,
    /// The tokens fed this step: a chunk of the prompt, or the last token and a draft.
    feed: Vec<u32>,
    /// Whether this step decodes (else it prefills), and the draft tokens it verifies.
    decoding: bool,
    draft_len: usize,
    /// Where this step's draft came from.
    source: Source,
    /// A draft that was not fed, to compare with the token chosen (its acceptance, measured
    /// at no cost).
    unfed_draft: Option<u32>,
    ngrams: NgramIndex,
    /// The measured acceptance of each source's drafts.
    acceptance: [Acceptance; Source::COUNT],
    drafted: usize,
    accepted: usize,
}

impl Sequence {
    fn new(
        request: GenerateRequest,
        constraint: Option<Box<Constraint>>,
        tx: Sender<Event>,
        cancel: Arc<AtomicBool>,
        position: Arc<AtomicUsize>,
        model: &Model,
        tokenizer: &Tokenizer,
    ) -> Self {
        let n_prompt = request.prompt.len();
        let cache = model.new_cache();
        // A cache grows by a quarter at a time, so it may hold that much more than it fills.
        let positions = n_prompt
            .saturating_add(request.max_tokens)
            .min(model.n_ctx());
        let positions = positions.saturating_add(positions / 4).min(model.n_ctx());
        let reasoning = request.reasoning.map(|mut r| {
            if !r.inside && constraint.is_some() {
                // The constraint holds from the first token: no block opens, none is closed.
                r.budget = None;
            }
            ReasoningState::new(r, tokenizer)
        });
        let (constraint, held_constraint) = match &reasoning {
            Some(r) if r.holds_constraint() => (None, constraint),
            _ => (constraint, None),
        };
        Self {
            tx,
            cancel,
            position,
            reserve: positions.saturating_mul(cache.bytes_per_position()),
            cache_scope: request.cache_scope,
            client: request.client,
            cache,
            sampler: Sampler::new(request.sampling),
            constraint,
            held_constraint,
            reasoning,
            logprobs: request.logprobs,
            pending_logprobs: Default::default(),
            tokens: request.prompt,
            n_prompt,
            n_prefilled: 0,
            n_cached: 0,
            n_generated: 0,
            max_tokens: request.max_tokens,
            stop_token_ids: request.stop_token_ids,
            ignore_eog: request.ignore_eog,
            text: TextStream::new(request.stop_strings),
            started: Instant::now(),
            first_token_at: None,
            prefill_seconds: 0.0,
            done: false,
            failed: false,
            feed: Vec::new(),
            decoding: false,
            draft_len: 0,
            source: Source::GRAMMAR,
            unfed_draft: None,
            ngrams: NgramIndex::default(),
            acceptance: Default::default(),
            drafted: 0,
            accepted: 0,
        }
    }

    /// Fills [`Self::feed`] with what this sequence feeds the next step: a chunk of its prompt
    /// (taken from the step's prefill `budget`), or its last token, followed by a draft when
    /// `drafts` (decoding alone) says one pays. False when it waits for budget or has just
    /// finished.
    fn next_input(&mut self, model: &Model, budget: &mut usize, drafts: Option<&Drafts>) -> bool {
        self.feed.clear();
        self.draft_len = 0;
        self.unfed_draft = None;
        if self.cancel.load(Ordering::Relaxed) {
            self.finish(FinishReason::Cancelled);
            return false;
        }
        if self.n_prefilled < self.n_prompt {
            self.decoding = false;
            let n = (self.n_prompt - self.n_prefilled).min(*budget);
            *budget -= n;
            let chunk = self.n_prefilled..self.n_prefilled + n;
            self.feed.extend_from_slice(&self.tokens[chunk]);
            return n > 0;
        }
        if self.cache.len() + 1 > model.n_ctx() {
            self.finish(FinishReason::Length);
            return false;
        }
        self.decoding = true;
        self.feed
            .push(*self.tokens.last().expect("a prompt is never empty"));
        if let Some(drafts) = drafts {
            // No more than the context holds, nor past the last token asked for.
            let room = model.n_ctx() - (self.cache.len() + 1);
            let wanted = self.max_tokens.saturating_sub(self.n_generated + 1);
            let (draft, source) = self.draft(MAX_DRAFT.min(room).min(wanted));
            self.source = source;
            let k = drafts.length(draft.len(), self.acceptance[source.index()].rate());
            self.feed.extend_from_slice(&draft[..k]);
            self.draft_len = k;
            self.unfed_draft = draft.get(k).copied().filter(|_| k == 0);
        }
        true
    }

    /// Up to `max` tokens that may well come next: those an output grammar forces, else the
    /// continuation of the last n-gram's latest earlier occurrence.
    fn draft(&mut self, max: usize) -> (Vec<u32>, Source) {
        if max == 0 {
            return (Vec::new(), Source::GRAMMAR);
        }
        if let Some(constraint) = &mut self.constraint {
            let mut forced = constraint.forced();
            if !forced.is_empty() {
                forced.truncate(max);
                return (forced, Source::GRAMMAR);
            }
        }
        self.ngrams.extend(&self.tokens);
        self.ngrams.draft(&self.tokens, max)
    }

    /// Takes the logits of the step, `[rows, n_vocab]`: counts a prompt chunk, or chooses the
    /// next token from each row in turn, as one step at a time would, for as long as the draft
    /// fed after it is what was chosen. The cache then forgets the rest of the draft.
    fn after_forward(&mut self, logits: candle_core::Tensor, tokenizer: &Tokenizer) {
        let mut logits = match logits.flatten_all().and_then(|l| l.to_vec1::<f32>()) {
            Ok(l) => l,
            Err(e) => return self.fail(Error::from(e).to_string()),
        };
        if !self.decoding {
            self.n_prefilled += self.feed.len();
            if self.n_prefilled < self.n_prompt {
                return;
            }
            self.prefill_seconds = self.started.elapsed().as_secs_f64();
            self.first_token_at = Some(Instant::now());
        }
        let n_vocab = logits.len() / (self.draft_len + 1);
        // Positions the cache holds before the token fed first.
        let base = self.cache.len() - if self.decoding { self.feed.len() } else { 0 };
        // Counted before a token ends the generation (and its usage is sent).
        self.drafted += self.draft_len;
        // Draft tokens kept in the cache, compared with the token chosen, and equal to it.
        let (mut kept, mut compared, mut matches) = (0, 0, 0);
        for (i, row) in logits.chunks_exact_mut(n_vocab).enumerate() {
            let raw = self.logprobs.map(|top| (row.to_vec(), top));
            let id = match self.choose(row, tokenizer) {
                Ok(id) => id,
                Err(e) => return self.fail(e.to_string()),
            };
            if let Some(unfed) = self.unfed_draft.take() {
                self.acceptance[self.source.index()].observe((unfed == id) as usize, 1);
            }
            let matched = i < self.draft_len && self.feed[i + 1] == id;
            compared += (i < self.draft_len) as usize;
            matches += matched as usize;
            self.accepted += matched as usize; // before a token ends it and sends the usage
            let logprob = raw.map(|(raw, top)| token_logprob(&raw, id, top));
            self.accept(id, logprob, tokenizer);
            if self.done || !matched {
                break;
            }
            kept += 1;
        }
        if self.draft_len > 0 {
            self.acceptance[self.source.index()].observe(matches, compared);
            self.cache.truncate(base + 1 + kept);
        }
    }

    /// The token to follow, from its logits: the one the reasoning budget forces, else a draw
    /// within the grammar.
    fn choose(&mut self, logits: &mut [f32], tokenizer: &Tokenizer) -> Result<u32> {
        if let Some(id) = self.reasoning.as_mut().and_then(|r| r.next_forced()) {
            return Ok(id); // the reasoning's budget ran out: the engine closes the block
        }
        if let Some(constraint) = &mut self.constraint {
            constraint.mask(logits)?;
        }
        if self.held_constraint.is_some() {
            // A constrained answer is still to come: the reasoning may not end the turn.
            for &eog in tokenizer.eog_tokens() {
                if let Some(l) = logits.get_mut(eog as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        let id = self.sampler.sample(logits, &self.tokens, self.n_generated);
        if let Some(constraint) = &mut self.constraint {
            constraint.accept(id)?;
        }
        Ok(id)
    }

    /// Ends the generation with `message` (an engine error's text, sent as it is).
    fn fail(&mut self, message: String) {
        tracing::error!(error = %message, "generation failed");
        let _ = self.tx.send(Event::Error(message));
        self.done = true;
        self.failed = true;
    }

    fn accept(&mut self, id: u32, logprob: Option<TokenLogprob>, tokenizer: &Tokenizer) {
        self.n_generated += 1;
        if (tokenizer.is_eog(id) && !self.ignore_eog) || self.stop_token_ids.contains(&id) {
            return self.finish(FinishReason::Stop);
        }
        self.tokens.push(id);
        self.pending_logprobs.extend(logprob);
        if let Some(reasoning) = &mut self.reasoning {
            reasoning.observe(id, tokenizer);
            if !reasoning.holds_constraint() && self.held_constraint.is_some() {
                self.constraint = self.held_constraint.take();
            }
        }
        if let Some(released) = self.text.push(tokenizer, id) {
            let stopped = released.stopped;
            if !released.text.is_empty() && !self.send_chunk(released.text, released.token_ids) {
                return self.finish(FinishReason::Cancelled);
            }
            if stopped {
                return self.finish(FinishReason::Stop);
            }
        }
        if self.constraint.as_ref().is_some_and(|c| c.is_finished()) {
            return self.finish(FinishReason::Stop);
        }
        if self.n_generated >= self.max_tokens {
            self.finish(FinishReason::Length);
        }
    }

    fn send_chunk(&mut self, text: String, token_ids: Vec<u32>) -> bool {
        let n = token_ids.len().min(self.pending_logprobs.len());
        let logprobs = self.pending_logprobs.drain(..n).collect();
        self.tx
            .send(Event::Chunk {
                text,
                token_ids,
                logprobs,
            })
            .is_ok()
    }

    fn finish(&mut self, reason: FinishReason) {
        if self.done {
            return;
        }
        self.done = true;
        if let Some(rest) = self.text.finish() {
            if !rest.text.is_empty() {
                self.send_chunk(rest.text, rest.token_ids);
            }
        }
        let decode_seconds = self
            .first_token_at
            .map(|t| t.elapsed().as_secs_f64())
            .unwrap_or(0.0);
        let usage = Usage {
            prompt_tokens: self.n_prompt,
            cached_tokens: self.n_cached,
            completion_tokens: self.n_generated,
            reasoning_tokens: self.reasoning.as_ref().map_or(0, |r| r.tokens_used()),
            prefill_seconds: self.prefill_seconds,
            decode_seconds,
            drafted_tokens: self.drafted,
            accepted_tokens: self.accepted,
        };
        let _ = self.tx.send(Event::Done {
            finish_reason: reason,
            usage,
        });
    }
}

/// `id`'s log-probability under `logits` and the `top` most likely tokens (ties by id).
fn token_logprob(logits: &[f32], id: u32, top: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let log_z = max + sum.ln() as f32;
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &l) in logits.iter().enumerate() {
            if best.len() == top && l <= best[top - 1].1 {
                continue;
            }
            let at = best.partition_point(|&(_, b)| b >= l);
            best.insert(at, (i as u32, l));
            best.truncate(top);
        }
    }
    TokenLogprob {
        id,
        logprob: logits[id as usize] - log_z,
        top: best.into_iter().map(|(t, l)| (t, l - log_z)).collect(),
    }
}
