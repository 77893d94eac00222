//! The engine thread's loop: it takes submitted requests, starts waiting ones by turns within
//! the admission limits, advances every active sequence in one batched forward pass per step
//! (prompts within the step's budget, sized by time and shared fairly: [`super::pacing`]), and
//! retires finished ones, keeping their caches for reuse.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::Tensor;

use super::admission::Admission;
use super::host::release_freed_memory;
use super::pacing::{share, Pacing};
use super::request::{Event, FinishReason, GenerateRequest, SpeculationCounters};
use super::sequence::Sequence;
use crate::error::{catch_panic, Result};
use crate::grammar::Constraint;
use crate::model::{BatchItem, EmbeddingCall, KvCache, Model};
use crate::prefix::{common_prefix, CacheScope, PrefixCache, PrefixStats};
use crate::speculative::Drafts;
use crate::tokenizer::Tokenizer;

/// What the scheduler and its sequences ask of a model: its context, whether its rows are
/// batch-invariant, an empty cache, and one batched step. [`Model`] is the implementation;
/// tests put a fake in its place. The scheduler is generic over it, so the calls are static,
/// as they were on [`Model`] itself.
pub(crate) trait StepModel {
    /// See [`Model::n_ctx`].
    fn n_ctx(&self) -> usize;
    /// See [`Model::batch_invariant`].
    fn batch_invariant(&self) -> bool;
    /// See [`Model::new_cache`].
    fn new_cache(&self) -> KvCache;
    /// See [`Model::forward_batch`]: each item's logits for its last `logits` positions,
    /// `[logits, n_vocab]`, its cache advanced past its tokens.
    fn forward_batch(&self, items: &mut [BatchItem<'_>]) -> Result<Vec<Tensor>>;
    /// See [`Model::start_embedding`].
    fn start_embedding(&self, inputs: Vec<Vec<u32>>) -> EmbeddingCall;
    /// See [`Model::embed_step`].
    fn embed_step(&self, job: &mut EmbeddingCall) -> Result<bool>;
}

impl StepModel for Model {
    #[inline]
    fn n_ctx(&self) -> usize {
        Model::n_ctx(self)
    }

    #[inline]
    fn batch_invariant(&self) -> bool {
        Model::batch_invariant(self)
    }

    #[inline]
    fn new_cache(&self) -> KvCache {
        Model::new_cache(self)
    }

    #[inline]
    fn forward_batch(&self, items: &mut [BatchItem<'_>]) -> Result<Vec<Tensor>> {
        Model::forward_batch(self, items)
    }

    fn start_embedding(&self, inputs: Vec<Vec<u32>>) -> EmbeddingCall {
        Model::start_embedding(self, inputs)
    }

    fn embed_step(&self, job: &mut EmbeddingCall) -> Result<bool> {
        Model::embed_step(self, job)
    }
}

/// An embedding call's answer: a vector per input.
type Vectors = Vec<Vec<f32>>;

/// Tokens a prompt must share with one its tenant is reading, beyond what it has from the
/// cache, to wait for it rather than compute them itself.
const FOLLOW_MIN: usize = 32;

pub(super) enum Command {
    Submit {
        request: Box<GenerateRequest>,
        constraint: Option<Box<Constraint>>,
        tx: Sender<Event>,
        cancel: Arc<AtomicBool>,
        position: Arc<AtomicUsize>,
    },
    /// An embedding call: computed a pass at a time between the scheduler's steps, so that
    /// the streams under way keep going; its vectors (or error) go back on `tx`.
    Embed {
        inputs: Vec<Vec<u32>>,
        tx: Sender<Result<Vectors>>,
    },
    Shutdown,
}

pub(super) struct Scheduler<M: StepModel = Model> {
    model: Arc<M>,
    tokenizer: Arc<Tokenizer>,
    rx: Receiver<Command>,
    active: Vec<Sequence>,
    /// Submitted requests waiting for a place, in the order they came.
    waiting: VecDeque<Sequence>,
    /// Embedding calls under way, the first computed a pass per turn.
    embeddings: VecDeque<(EmbeddingCall, Sender<Result<Vectors>>)>,
    /// When each client last had a request started (a count of starts), for turns.
    last_start: HashMap<Option<String>, u64>,
    starts: u64,
    admission: Arc<Admission>,
    prefix: PrefixCache,
    pub(super) prefix_stats: Arc<Mutex<PrefixStats>>,
    pub(super) kv_use: Arc<KvUse>,
    /// Whether a sequence decoding alone may verify drafts.
    speculative: bool,
    /// The measured cost of verifying drafts.
    drafts: Drafts,
    /// The measured cost of steps, which sizes the prompt tokens they carry.
    pacing: Pacing,
    pub(super) speculation: Arc<SpeculationCounters>,
}

/// Key/value storage held by the engine thread, for [`super::Engine::kv_bytes`].
#[derive(Default)]
pub(super) struct KvUse {
    pub(super) bytes: AtomicUsize,
    pub(super) peak: AtomicUsize,
}

impl<M: StepModel> Scheduler<M> {
    pub(super) fn new(
        model: Arc<M>,
        tokenizer: Arc<Tokenizer>,
        rx: Receiver<Command>,
        admission: Arc<Admission>,
        prefix: PrefixCache,
        speculative: bool,
        pacing: Pacing,
    ) -> Self {
        let prefix_stats = Arc::new(Mutex::new(prefix.stats()));
        Self {
            model,
            tokenizer,
            rx,
            active: Vec::new(),
            waiting: VecDeque::new(),
            embeddings: VecDeque::new(),
            last_start: HashMap::new(),
            starts: 0,
            admission,
            prefix,
            prefix_stats,
            kv_use: Arc::new(KvUse::default()),
            speculative,
            drafts: Drafts::default(),
            pacing,
            speculation: Arc::new(SpeculationCounters::default()),
        }
    }

    pub(super) fn run(mut self) {
        let mut ran = false;
        loop {
            if self.active.is_empty() && self.waiting.is_empty() && self.embeddings.is_empty() {
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
            if !self.receive() {
                return;
            }
            if self.turn() {
                ran = true;
            }
        }
    }

    /// Takes the commands that have come in, without waiting; false when the engine must stop.
    pub(super) fn receive(&mut self) -> bool {
        loop {
            match self.rx.try_recv() {
                Ok(cmd) => {
                    if !self.handle(cmd) {
                        return false;
                    }
                }
                Err(mpsc::TryRecvError::Empty) => return true,
                Err(mpsc::TryRecvError::Disconnected) => {
                    self.stop_all();
                    return false;
                }
            }
        }
    }

    /// One turn of the loop once the commands are in: starts what may start, then steps the
    /// active sequences and retires the finished ones. False when nothing was active.
    pub(super) fn turn(&mut self) -> bool {
        self.admit();
        let embedded = self.embed_pass();
        if self.active.is_empty() {
            return embedded;
        }
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
        true
    }

    /// One forward pass of the oldest embedding call, if any, answering it once it is done
    /// (or failed). Whether a pass ran.
    fn embed_pass(&mut self) -> bool {
        let Some((job, _)) = self.embeddings.front_mut() else {
            return false;
        };
        let model = &*self.model;
        match catch_panic(|| model.embed_step(job)) {
            Ok(false) => {}
            Ok(true) => {
                let (job, tx) = self.embeddings.pop_front().expect("the front");
                let _ = tx.send(Ok(job.vectors()));
            }
            Err(e) => {
                let (_, tx) = self.embeddings.pop_front().expect("the front");
                let _ = tx.send(Err(e));
            }
        }
        true
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
            Self::start_from_cache(&mut self.prefix, &mut seq);
            // A prompt another one of its tenant is reading waits for it and starts from its
            // cache (the n choices of one request, a preamble sent twice at once).
            seq.follows = self.leader_of(&seq).is_some();
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

    /// Starts `seq` from the longest prefix of its prompt kept for its tenant, if any.
    fn start_from_cache(prefix: &mut PrefixCache, seq: &mut Sequence) {
        let found = catch_panic(|| prefix.lookup(&seq.tokens[..seq.n_prompt], &seq.cache_scope));
        match found {
            Ok(Some((cache, n))) if n > seq.n_prefilled => {
                seq.cache = cache;
                seq.n_prefilled = n;
                seq.n_cached = n;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "prefix cache lookup failed"),
        }
    }

    /// The active sequence of `seq`'s tenant, itself no follower, whose prompt shares at least
    /// [`FOLLOW_MIN`] more tokens with `seq`'s than `seq` has computed (where the memory tier
    /// can keep them for it).
    fn leader_of(&self, seq: &Sequence) -> Option<usize> {
        if seq.cache_scope == CacheScope::Private || seq.prompt_left() == 0 || !self.prefix.keeps()
        {
            return None;
        }
        let prompt = &seq.tokens[..seq.n_prompt];
        self.active.iter().position(|l| {
            !l.follows
                && !l.done
                && l.cache_scope == seq.cache_scope
                && common_prefix(&l.tokens[..l.n_prompt], prompt) >= seq.n_prefilled + FOLLOW_MIN
        })
    }

    /// Lets followers go once their leader has read the part of the prompt they share: what
    /// the leader has read is kept (its positions no kept segment holds yet), and each follower
    /// starts from it. A follower whose leader is gone goes on alone.
    fn release_followers(&mut self) {
        for i in 0..self.active.len() {
            if !self.active[i].follows {
                continue;
            }
            let leader = self.leader_of(&self.active[i]);
            if let Some(l) = leader {
                let (leader, seq) = (&self.active[l], &self.active[i]);
                let shared = common_prefix(
                    &leader.tokens[..leader.n_prompt],
                    &seq.tokens[..seq.n_prompt],
                )
                .min(seq.n_prompt - 1);
                if leader.n_prefilled < shared {
                    continue; // still reading it
                }
                let n = leader.n_prefilled.min(leader.cache.len());
                self.prefix
                    .keep(&leader.tokens[..n], &leader.cache, &leader.cache_scope);
            }
            let seq = &mut self.active[i];
            seq.follows = false;
            Self::start_from_cache(&mut self.prefix, seq);
        }
    }

    /// Publishes the running sequences' count and reservations for [`super::Engine::admission`].
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
    /// feeds its last token (and, decoding alone, perhaps a draft to verify), prefilling ones
    /// their share of the step's prompt budget ([`super::pacing`]).
    fn step(&mut self) {
        let started = Instant::now();
        self.release_followers();
        let drafts = (self.speculative && self.active.len() == 1).then_some(&self.drafts);
        let left: Vec<usize> = self
            .active
            .iter()
            .filter(|s| !s.follows)
            .map(|s| s.prompt_left())
            .filter(|&n| n > 0)
            .collect();
        let decoders = self.active.iter().filter(|s| s.prompt_left() == 0).count();
        let latency_budget = self.pacing.budget(true);
        // A stream decoding, or a prompt about to give its first token, waits for this step.
        let latency = decoders > 0 || left.iter().any(|&n| n <= latency_budget);
        let budget = if latency {
            latency_budget
        } else {
            self.pacing.budget(false)
        };
        let mut shares = share(budget, &left).into_iter();
        let fed: Vec<bool> = self
            .active
            .iter_mut()
            .map(|seq| {
                let chunk = if seq.prompt_left() > 0 && !seq.follows {
                    shares.next().unwrap_or(0)
                } else {
                    0
                };
                seq.next_input(&*self.model, chunk, drafts)
            })
            .collect();
        let (mut prompt_tokens, mut decode_rows) = (0, 0);
        for (seq, _) in self.active.iter().zip(&fed).filter(|(_, &fed)| fed) {
            if seq.decoding {
                decode_rows += seq.feed.len();
            } else {
                prompt_tokens += seq.feed.len();
            }
        }
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
        let seconds = started.elapsed().as_secs_f64();
        self.pacing.observe(seconds, prompt_tokens, decode_rows);
        // What a step decoding one sequence costs, by the rows it fed: the drafts' measure.
        if let ([seq], [true], true) = (&self.active[..], &fed[..], drafts.is_some()) {
            if seq.decoding && !seq.failed {
                let rows = seq.draft_len + 1;
                self.drafts.observe(rows, seconds);
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
            // bits, and so, at times, the output.
            let cache = std::mem::replace(&mut seq.cache, KvCache::empty());
            let n = if self.model.batch_invariant() {
                cache.len()
            } else {
                cache.len().min(seq.n_prompt)
            };
            let scope = std::mem::take(&mut seq.cache_scope);
            self.prefix.insert(&seq.tokens[..n], cache, &scope);
            kept = true;
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
                    &*self.model,
                    &self.tokenizer,
                );
                seq.position
                    .store(self.waiting.len() + 1, Ordering::Relaxed);
                self.waiting.push_back(seq);
                true
            }
            Command::Embed { inputs, tx } => {
                let job = self.model.start_embedding(inputs);
                self.embeddings.push_back((job, tx));
                true
            }
            Command::Shutdown => {
                self.stop_all();
                false
            }
        }
    }

    fn stop_all(&mut self) {
        self.embeddings.clear(); // their callers see the engine stop
        for seq in self.active.iter_mut().chain(self.waiting.iter_mut()) {
            seq.finish(FinishReason::Cancelled);
        }
        self.active.clear();
        self.waiting.clear();
    }
}

#[cfg(test)]
mod tests {
    use crate::engine::testing::{letters, of_tenant, received, request, Harness, LATENCY_BUDGET};
    use crate::engine::FinishReason;
    use crate::limits::PREFILL_CHUNK;

    const PLENTY: usize = 1 << 30;

    #[test]
    fn every_running_sequence_advances_every_step() {
        let mut h = Harness::new(4, 8, PLENTY);
        let streams: Vec<_> = (0..3)
            .map(|i| h.submit(request(letters(5 * i, 3), 4, "a")).unwrap())
            .collect();
        assert!(h.turn());
        let fed: Vec<_> = h.last_step().into_iter().map(|f| f.tokens).collect();
        assert_eq!(fed, vec![letters(0, 3), letters(5, 3), letters(10, 3)]);
        for (i, s) in streams.iter().enumerate() {
            assert_eq!(received(s).0, letters(5 * i as u32 + 3, 1));
        }
        for step in 1..4 {
            assert!(h.turn());
            let fed: Vec<_> = h
                .last_step()
                .into_iter()
                .map(|f| (f.pos, f.tokens))
                .collect();
            let expected: Vec<_> = (0..3)
                .map(|i| (2 + step, letters(5 * i + 2 + step as u32, 1)))
                .collect();
            assert_eq!(fed, expected, "step {step}: each sequence's last token");
            for s in &streams {
                let (tokens, done) = received(s);
                assert_eq!(tokens.len(), 1, "one token a step for every stream");
                if step == 3 {
                    let (finish, usage) = done.expect("finished");
                    assert_eq!((finish, usage.completion_tokens), (FinishReason::Length, 4));
                }
            }
        }
        assert!(!h.turn());
    }

    #[test]
    fn a_long_prompt_alone_is_read_in_large_chunks() {
        let mut h = Harness::new(4, 8, PLENTY);
        let n = 2 * PREFILL_CHUNK + 100;
        let s = h.submit(request(letters(0, n), 2, "a")).unwrap();
        for (pos, len) in [(0, PREFILL_CHUNK), (PREFILL_CHUNK, PREFILL_CHUNK)] {
            assert!(h.turn());
            let fed = h.last_step();
            assert_eq!((fed[0].pos, fed[0].tokens.len()), (pos, len));
            assert_eq!(
                received(&s),
                (vec![], None),
                "no token before the prompt is in"
            );
        }
        assert!(h.turn());
        let fed = h.last_step();
        assert_eq!((fed[0].pos, fed[0].tokens.len()), (2 * PREFILL_CHUNK, 100));
        assert_eq!(received(&s).0.len(), 1);
        assert!(h.turn());
        assert_eq!(h.last_step()[0].tokens.len(), 1);
        let (finish, usage) = received(&s).1.expect("finished");
        assert_eq!(finish, FinishReason::Length);
        assert_eq!(usage.prompt_tokens, n);
    }

    #[test]
    fn a_short_prompt_starts_within_a_step_whatever_else_is_read() {
        let mut h = Harness::new(4, 8, PLENTY);
        let long = h.submit(request(letters(0, 7000), 1, "a")).unwrap();
        assert!(h.turn());
        assert_eq!(h.last_step()[0].tokens.len(), PREFILL_CHUNK);
        // Admitted while the long prompt is read: its four tokens go in the very next step,
        // which is sized for latency since it gives a first token.
        let short = h.submit(request(letters(3, 4), 3, "b")).unwrap();
        assert!(h.turn());
        let fed = h.last_step();
        assert_eq!(fed[1].tokens, letters(3, 4));
        assert_eq!(
            fed[0].tokens.len(),
            LATENCY_BUDGET - 4,
            "the long one takes the rest"
        );
        assert_eq!(
            received(&short).0,
            letters(7, 1),
            "its first token, one step in"
        );
        // A second long prompt admitted later does not take the first one's turn.
        let other = h.submit(request(letters(5, 3000), 1, "c")).unwrap();
        while received(&short).1.is_none() {
            assert!(h.turn());
            let fed = h.last_step();
            let prompt: usize = fed.iter().map(|f| f.tokens.len()).sum::<usize>() - 1;
            assert_eq!(
                prompt, LATENCY_BUDGET,
                "beside a decoding stream, the latency budget"
            );
            assert!(
                fed[0].tokens.len() >= LATENCY_BUDGET / 4,
                "the first keeps its quarter"
            );
        }
        let mut steps = 0;
        while received(&long).1.is_none() || received(&other).1.is_none() {
            assert!(h.turn());
            steps += 1;
            assert!(steps < 100, "both prompts are read");
        }
    }

    #[test]
    fn decoding_streams_keep_their_pace_while_long_prompts_prefill() {
        let mut h = Harness::new(4, 8, PLENTY);
        let decoding = h.submit(request(letters(0, 3), 100, "a")).unwrap();
        assert!(h.turn());
        assert_eq!(received(&decoding).0.len(), 1);
        let long = [3 * LATENCY_BUDGET + 7, LATENCY_BUDGET + 20];
        // Different prompts: neither waits to start from the other's.
        let readers: Vec<_> = long
            .iter()
            .zip([1, 7])
            .map(|(&n, first)| h.submit(request(letters(first, n), 1, "b")).unwrap())
            .collect();
        let mut left = long.iter().sum::<usize>();
        let (mut steps, mut finished) = (0, [false; 2]);
        while finished != [true; 2] {
            assert!(h.turn());
            steps += 1;
            let fed = h.last_step();
            assert_eq!(
                fed[0].tokens.len(),
                1,
                "the decoding stream feeds its token"
            );
            assert_eq!(received(&decoding).0.len(), 1, "and gets the next one");
            let prefilled: usize = fed[1..].iter().map(|f| f.tokens.len()).sum();
            assert_eq!(prefilled, left.min(LATENCY_BUDGET), "step {steps}");
            left -= prefilled;
            for (r, finished) in readers.iter().zip(&mut finished) {
                *finished |= received(r).1.is_some();
            }
        }
        assert_eq!(steps, long.iter().sum::<usize>().div_ceil(LATENCY_BUDGET));
    }

    #[test]
    fn choices_of_one_prompt_read_it_once() {
        let mut h = Harness::with_prefix_cache(4, 8, PLENTY, PLENTY);
        let prompt = letters(0, 300);
        let streams: Vec<_> = (0..3)
            .map(|_| {
                h.submit(of_tenant(request(prompt.clone(), 2, "a"), "t"))
                    .unwrap()
            })
            .collect();
        assert!(h.turn());
        let fed = h.last_step();
        assert_eq!(fed.len(), 1, "only the first reads the prompt");
        assert_eq!(fed[0].tokens.len(), 300);
        assert!(h.turn());
        let fed: Vec<_> = h
            .last_step()
            .into_iter()
            .map(|f| (f.pos, f.tokens.len()))
            .collect();
        assert_eq!(
            fed,
            vec![(300, 1), (299, 1), (299, 1)],
            "the others start from its cache"
        );
        while h.turn() {}
        for (i, s) in streams.iter().enumerate() {
            let (tokens, done) = received(s);
            let (_, usage) = done.expect("finished");
            assert_eq!(tokens, letters(300 % 26, 2), "choice {i}");
            assert_eq!(usage.cached_tokens, if i == 0 { 0 } else { 299 });
        }
    }

    #[test]
    fn a_follower_whose_leader_is_cancelled_reads_the_prompt_itself() {
        let mut h = Harness::with_prefix_cache(4, 8, PLENTY, PLENTY);
        let prompt = letters(0, 2 * PREFILL_CHUNK);
        let leader = h
            .submit(of_tenant(request(prompt.clone(), 1, "a"), "t"))
            .unwrap();
        let follower = h.submit(of_tenant(request(prompt, 1, "b"), "t")).unwrap();
        assert!(h.turn());
        assert_eq!(h.last_step().len(), 1);
        leader.cancel();
        let (mut steps, mut done) = (0, None);
        while done.is_none() {
            assert!(h.turn(), "the follower is not left waiting");
            done = received(&follower).1;
            steps += 1;
            assert!(steps < 10);
        }
        // The cancelled leader's chunk was kept; the follower computes the rest.
        let fed: usize = h
            .steps()
            .iter()
            .flatten()
            .filter(|f| f.pos + f.tokens.len() <= 2 * PREFILL_CHUNK)
            .map(|f| f.tokens.len())
            .sum();
        assert_eq!(fed, 2 * PREFILL_CHUNK, "the prompt is read once in all");
        assert_eq!(done.unwrap().1.cached_tokens, PREFILL_CHUNK);
    }
}
