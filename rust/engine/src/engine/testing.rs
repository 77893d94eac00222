//! A fake model and a scheduler driven one turn at a time, for the engine's unit tests: no
//! model file, no weights. The fake's logits make the letter after each fed letter the most
//! likely next token (`a`, `b`, … `z`, `a`), and it records what every step fed it.

use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::{Device, Tensor};

use super::admission::Admission;
use super::pacing::Pacing;
use super::request::{Event, FinishReason, GenerateRequest, LoadOptions, Stream, Usage};
use super::scheduler::{Command, Scheduler, StepModel};
use super::submit;
use crate::error::Result;
use crate::limits::PREFILL_CHUNK;
use crate::model::{BatchItem, EmbeddingCall, KvCache, KvType};
use crate::prefix::{CacheScope, PrefixCache};
use crate::sampling::SamplingParams;
use crate::tokenizer::Tokenizer;

/// The tests' vocabulary: the letters (ids 0 to 25), a line break, the reasoning tags, an
/// end-of-generation token, and the closing tag's text in three pieces.
pub(crate) const VOCAB: &[&str] = &[
    "a",
    "b",
    "c",
    "d",
    "e",
    "f",
    "g",
    "h",
    "i",
    "j",
    "k",
    "l",
    "m",
    "n",
    "o",
    "p",
    "q",
    "r",
    "s",
    "t",
    "u",
    "v",
    "w",
    "x",
    "y",
    "z",
    "Ċ",
    "<think>",
    "</think>",
    "<|im_end|>",
    "</",
    "think",
    ">",
];

const LETTERS: u32 = 26;

/// The fake's context in tokens.
pub(super) const N_CTX: usize = 4096;

/// Prompt tokens the tests' steps carry while a stream decodes or a prompt is about to give
/// its first token (the clock's measure, fixed); without either, [`PREFILL_CHUNK`].
pub(super) const LATENCY_BUDGET: usize = 64;

/// Key/value bytes a position takes in the fake's caches (one layer, one head of one F32
/// value, keys and values).
pub(super) const BYTES_PER_POSITION: usize = 8;

/// The id of a token of [`VOCAB`].
pub(crate) fn id(text: &str) -> u32 {
    VOCAB
        .iter()
        .position(|t| *t == text)
        .expect("in the vocabulary") as u32
}

/// One sequence's share of a step, as the fake model saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Fed {
    /// Positions its cache held before the step.
    pub(super) pos: usize,
    pub(super) tokens: Vec<u32>,
}

/// A model whose next token is the letter after the last one fed.
pub(super) struct FakeModel {
    steps: Mutex<Vec<Vec<Fed>>>,
}

impl StepModel for FakeModel {
    fn n_ctx(&self) -> usize {
        N_CTX
    }

    fn batch_invariant(&self) -> bool {
        true
    }

    fn new_cache(&self) -> KvCache {
        KvCache::new(1, 1, 1, KvType::F32, &Device::Cpu, N_CTX)
    }

    fn forward_batch(&self, items: &mut [BatchItem<'_>]) -> Result<Vec<Tensor>> {
        let n_vocab = VOCAB.len();
        let mut fed = Vec::with_capacity(items.len());
        let mut out = Vec::with_capacity(items.len());
        for item in items.iter_mut() {
            let pos = item.cache.len();
            item.cache.reserve(pos + item.tokens.len())?;
            item.cache.advance(item.tokens.len());
            let rows = &item.tokens[item.tokens.len() - item.logits..];
            let mut logits = vec![0f32; rows.len() * n_vocab];
            for (row, &t) in rows.iter().enumerate() {
                logits[row * n_vocab + ((t + 1) % LETTERS) as usize] = 1.0;
            }
            out.push(Tensor::from_vec(
                logits,
                (rows.len(), n_vocab),
                &Device::Cpu,
            )?);
            fed.push(Fed {
                pos,
                tokens: item.tokens.to_vec(),
            });
        }
        self.steps.lock().unwrap().push(fed);
        Ok(out)
    }

    fn start_embedding(&self, _inputs: Vec<Vec<u32>>) -> EmbeddingCall {
        unimplemented!("the fake model has no hidden states")
    }

    fn embed_step(&self, _job: &mut EmbeddingCall) -> Result<bool> {
        unimplemented!("the fake model has no hidden states")
    }
}

/// A scheduler over the fake model, without its thread: requests go in as
/// [`super::Engine::generate`] queues them, and each [`Harness::turn`] is one turn of the
/// engine thread's loop.
pub(super) struct Harness {
    model: Arc<FakeModel>,
    pub(super) admission: Arc<Admission>,
    scheduler: Scheduler<FakeModel>,
    to_engine: Sender<Command>,
}

impl Harness {
    pub(super) fn new(max_active: usize, max_queued: usize, kv_budget_bytes: usize) -> Self {
        Self::with_prefix_cache(max_active, max_queued, kv_budget_bytes, 0)
    }

    /// A harness whose scheduler keeps up to `prefix_bytes` of finished prefixes.
    pub(super) fn with_prefix_cache(
        max_active: usize,
        max_queued: usize,
        kv_budget_bytes: usize,
        prefix_bytes: usize,
    ) -> Self {
        let options = LoadOptions {
            max_active: Some(max_active),
            max_queued: Some(max_queued),
            kv_budget_bytes: Some(kv_budget_bytes),
            ..Default::default()
        };
        let admission = Arc::new(Admission::new(&options).unwrap());
        let model = Arc::new(FakeModel {
            steps: Mutex::new(Vec::new()),
        });
        let (to_engine, rx) = mpsc::channel();
        let scheduler = Scheduler::new(
            model.clone(),
            Arc::new(Tokenizer::for_tests(VOCAB)),
            rx,
            admission.clone(),
            PrefixCache::new(prefix_bytes),
            false,
            Pacing::fixed(LATENCY_BUDGET, PREFILL_CHUNK),
        );
        Self {
            model,
            admission,
            scheduler,
            to_engine,
        }
    }

    /// Queues a request, or refuses it, as [`super::Engine::generate`] does once it is valid.
    pub(super) fn submit(&self, request: GenerateRequest) -> Result<Stream> {
        submit(&self.admission, &self.to_engine, request, None)
    }

    /// One turn of the engine thread: the commands come in, then waiting requests start and
    /// the active ones step. Whether a step ran.
    pub(super) fn turn(&mut self) -> bool {
        assert!(self.scheduler.receive(), "the engine stopped");
        self.scheduler.turn()
    }

    /// What each step fed the model, since the start.
    pub(super) fn steps(&self) -> Vec<Vec<Fed>> {
        self.model.steps.lock().unwrap().clone()
    }

    /// What the latest step fed the model.
    pub(super) fn last_step(&self) -> Vec<Fed> {
        self.steps().pop().unwrap_or_default()
    }
}

/// `n` letters from `first` on, round the alphabet.
pub(super) fn letters(first: u32, n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (first + i) % LETTERS).collect()
}

/// A greedy request for `max_tokens` after `prompt`, from `client`.
pub(super) fn request(prompt: Vec<u32>, max_tokens: usize, client: &str) -> GenerateRequest {
    GenerateRequest {
        client: Some(client.to_string()),
        ..GenerateRequest::new(prompt, max_tokens, SamplingParams::greedy())
    }
}

/// `request` of `tenant`, whose prefixes it reuses and leaves.
pub(super) fn of_tenant(request: GenerateRequest, tenant: &str) -> GenerateRequest {
    GenerateRequest {
        cache_scope: CacheScope::Tenant(tenant.into()),
        ..request
    }
}

/// What a stream has received so far: the tokens of its chunks, and how it finished, if it has.
pub(super) fn received(stream: &Stream) -> (Vec<u32>, Option<(FinishReason, Usage)>) {
    let mut tokens = Vec::new();
    let mut done = None;
    while let Ok(event) = stream.recv_timeout(Duration::ZERO) {
        match event {
            Event::Chunk { token_ids, .. } => tokens.extend(token_ids),
            Event::Done {
                finish_reason,
                usage,
            } => done = Some((finish_reason, usage)),
            Event::Error(e) => panic!("the generation failed: {e}"),
        }
    }
    (tokens, done)
}
