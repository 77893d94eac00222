//! The engine owns the model on its own thread. Callers submit requests (token ids and sampling
//! settings) and receive events over a channel; every active sequence advances one step per
//! turn of the scheduler loop, so several streams make progress together.
//!
//! Admission is bounded: at most `max_active` sequences run at once, and together they reserve
//! at most the key/value budget (each what its prompt and `max_tokens` can fill). Other
//! requests wait in a queue of at most `max_queued`, where each stream can read its place, and
//! start by turns among their clients; past that, [`Engine::generate`] refuses with
//! [`Error::Busy`].
//!
//! - `request`: load options, requests, the events of a stream and its handles;
//! - `admission`: the limits on running and waiting requests, and their counters;
//! - `scheduler`: the engine thread's loop, its turns and batched steps;
//! - `pacing`: the prompt tokens a step carries, sized by its measured time, and their share;
//! - `sequence`: one generation's state, what it feeds a step and what it takes from it;
//! - `host`: the device, the CPU threads, the memory available and given back.

mod admission;
mod host;
mod pacing;
mod request;
mod scheduler;
mod sequence;
#[cfg(test)]
pub(crate) mod testing;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

pub use admission::AdmissionStats;
pub use host::parse_device;
pub(crate) use host::release_freed_memory as release_memory;
pub use request::{
    Canceller, Event, FinishReason, GenerateRequest, LoadOptions, QueuePlace, SpeculationStats,
    Stream, TokenLogprob, Usage,
};

use admission::Admission;
use host::{available_memory, configure_threads, release_freed_memory};
use pacing::Pacing;
use request::SpeculationCounters;
use scheduler::{Command, KvUse, Scheduler};

use crate::error::{Error, Result};
use crate::gguf::{GgufFile, MetadataValue};
use crate::grammar::{Constraint, Grammars};
use crate::limits::{
    DEFAULT_DISK_CACHE_BYTES, DEFAULT_PREFIX_CACHE_BYTES, MAX_EMBED_CALL_TOKENS, MAX_EMBED_INPUTS,
    MAX_EMBED_TOKENS, MAX_METADATA_ARRAY, MAX_TOP_LOGPROBS,
};
use crate::model::{KvType, Model};
use crate::prefix::{DiskTier, DiskWatch, ModelIdentity, PrefixCache, PrefixStats};
use crate::tokenizer::Tokenizer;

pub struct Engine {
    model: Arc<Model>,
    tokenizer: Arc<Tokenizer>,
    grammars: Grammars,
    prefix_stats: Arc<Mutex<PrefixStats>>,
    disk: Option<DiskWatch>,
    kv_use: Arc<KvUse>,
    admission: Arc<Admission>,
    speculative: bool,
    speculation: Arc<SpeculationCounters>,
    metadata: HashMap<String, MetadataValue>,
    tx: Sender<Command>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Engine {
    pub fn load(path: impl AsRef<Path>, options: &LoadOptions) -> Result<Self> {
        let path = path.as_ref();
        configure_threads(options.n_threads)?;
        let admission = Admission::new(options)?;
        if let Some(x) = options
            .decode_slowdown
            .filter(|x| !(x.is_finite() && *x >= 1.0))
        {
            return Err(Error::invalid(
                "decode_slowdown",
                format!("{x} (a step may take at least as long as a decoding step: use 1 or more)"),
            ));
        }
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
        let model = Model::load(&gguf, &device, options.n_ctx, kv_type, options.rope_scaling)?;
        if device.is_cpu() {
            crate::limits::check_context_fits(
                model.n_ctx(),
                model.new_cache().bytes_per_position(),
                model.kv_type(),
                available_memory(),
            )?;
        }
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
        let mut prefix = PrefixCache::new(
            options
                .prefix_cache_bytes
                .unwrap_or(DEFAULT_PREFIX_CACHE_BYTES),
        );
        let disk_budget = options.disk_cache_bytes.unwrap_or(DEFAULT_DISK_CACHE_BYTES);
        if let Some(dir) = options.disk_cache_dir.as_ref().filter(|_| disk_budget > 0) {
            // What a position's keys and values depend on besides the file: the hyper-parameters
            // read, the cache's layout, the device and the kernels' summation order.
            let facts = format!(
                "{:?} {} {} {} {}",
                model.config(),
                model.kv_type().name(),
                options.device,
                crate::kernels::simd(),
                model.batch_invariant()
            );
            let identity = ModelIdentity::of(path, &facts)?;
            let tier =
                DiskTier::open(dir, identity, model.new_cache(), model.n_ctx(), disk_budget)?;
            prefix = prefix.with_disk(tier);
        }
        drop(gguf);
        release_freed_memory();
        Ok(Self::start(
            Arc::new(model),
            Arc::new(tokenizer),
            metadata,
            prefix,
            Arc::new(admission),
            speculative,
            Pacing::new(options.decode_slowdown),
        ))
    }

    fn start(
        model: Arc<Model>,
        tokenizer: Arc<Tokenizer>,
        metadata: HashMap<String, MetadataValue>,
        prefix: PrefixCache,
        admission: Arc<Admission>,
        speculative: bool,
        pacing: Pacing,
    ) -> Self {
        let (tx, rx) = mpsc::channel();
        let prefix_disk = prefix.disk_watch();
        let scheduler = Scheduler::new(
            model.clone(),
            tokenizer.clone(),
            rx,
            admission.clone(),
            prefix,
            speculative,
            pacing,
        );
        let speculation = scheduler.speculation.clone();
        let disk = prefix_disk;
        let prefix_stats = scheduler.prefix_stats.clone();
        let kv_use = scheduler.kv_use.clone();
        let thread = std::thread::Builder::new()
            .name("smolcandle-engine".into())
            .spawn(move || scheduler.run())
            .expect("spawning the engine thread");
        let grammars = Grammars::new(tokenizer.clone(), model.config().n_vocab);
        Self {
            model,
            tokenizer,
            grammars,
            prefix_stats,
            disk,
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
        let stats = self.prefix_stats.lock().map(|s| *s).unwrap_or_default();
        PrefixStats {
            disk: self.disk.as_ref().map(|d| d.stats()),
            ..stats
        }
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
        submit(&self.admission, &self.tx, request, constraint)
    }

    /// Float32 logits for every position of a fresh sequence, `[ids.len(), n_vocab]`
    /// row-major. Runs on the calling thread.
    pub fn logits(&self, ids: &[u32]) -> Result<(Vec<f32>, usize)> {
        let mut cache = self.model.new_cache();
        let logits = self.model.forward(ids, &mut cache, true)?;
        let n_vocab = self.model.config().n_vocab;
        Ok((logits.flatten_all()?.to_vec1::<f32>()?, n_vocab))
    }

    /// The embedding of each input (token ids), see [`Model::embed`]. Runs on the engine
    /// thread, a forward pass of at most
    /// [`EMBED_BATCH_TOKENS`](crate::limits::EMBED_BATCH_TOKENS) tokens between two of the
    /// scheduler's steps, within [`MAX_EMBED_INPUTS`] inputs of at most
    /// [`MAX_EMBED_TOKENS`] tokens (and the context) each, [`MAX_EMBED_CALL_TOKENS`] in all.
    pub fn embed(&self, inputs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        if inputs.is_empty() {
            return Err(Error::invalid("input", "is empty"));
        }
        if inputs.len() > MAX_EMBED_INPUTS {
            return Err(Error::invalid(
                "input",
                format!("{} inputs are more than {MAX_EMBED_INPUTS}", inputs.len()),
            ));
        }
        let (max_tokens, n_vocab) = (
            MAX_EMBED_TOKENS.min(self.model.n_ctx()),
            self.model.config().n_vocab,
        );
        for (i, ids) in inputs.iter().enumerate() {
            if ids.is_empty() {
                return Err(Error::invalid("input", format!("input {i} is empty")));
            }
            if ids.len() > max_tokens {
                return Err(Error::invalid(
                    "input",
                    format!("input {i} has {} tokens, more than {max_tokens}", ids.len()),
                ));
            }
            if let Some(bad) = ids.iter().find(|&&t| t as usize >= n_vocab) {
                return Err(Error::invalid(
                    "input",
                    format!("token id {bad} is outside the vocabulary of {n_vocab}"),
                ));
            }
        }
        let total: usize = inputs.iter().map(Vec::len).sum();
        if total > MAX_EMBED_CALL_TOKENS {
            return Err(Error::invalid(
                "input",
                format!("{total} tokens in all are more than {MAX_EMBED_CALL_TOKENS}"),
            ));
        }
        let (tx, rx) = mpsc::channel();
        self.tx
            .send(Command::Embed {
                inputs: inputs.to_vec(),
                tx,
            })
            .map_err(|_| Error::EngineStopped)?;
        rx.recv().map_err(|_| Error::EngineStopped)?
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

/// Queues a request for the engine thread: takes a place in the queue, or refuses with
/// [`Error::Busy`], and hands the thread the request with the ends of its stream.
fn submit(
    admission: &Admission,
    to_engine: &Sender<Command>,
    request: GenerateRequest,
    constraint: Option<Box<Constraint>>,
) -> Result<Stream> {
    admission.enqueue()?;
    let (tx, rx) = mpsc::channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let position = Arc::new(AtomicUsize::new(admission.queued.load(Ordering::Relaxed)));
    let submitted = to_engine.send(Command::Submit {
        request: Box::new(request),
        constraint,
        tx,
        cancel: cancel.clone(),
        position: position.clone(),
    });
    if submitted.is_err() {
        admission.queued.fetch_sub(1, Ordering::AcqRel);
        return Err(Error::EngineStopped);
    }
    Ok(Stream {
        rx,
        cancel,
        position,
    })
}
