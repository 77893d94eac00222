//! One generation on the engine thread: its cache, sampler, constraint and reasoning state,
//! what it feeds each step (a chunk of its prompt, or its last token and perhaps a draft), and
//! how it takes the step's logits, chooses tokens and streams their text.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Instant;

use super::request::{Event, FinishReason, GenerateRequest, TokenLogprob, Usage};
use super::scheduler::StepModel;
use crate::detok::TextStream;
use crate::error::{Error, Result};
use crate::grammar::Constraint;
use crate::model::KvCache;
use crate::prefix::CacheScope;
use crate::reasoning::ReasoningState;
use crate::sampling::{token_logprob, Sampler};
use crate::speculative::{Acceptance, Drafts, NgramIndex, Source, MAX_DRAFT};
use crate::tokenizer::Tokenizer;

pub(super) struct Sequence {
    tx: Sender<Event>,
    pub(super) cancel: Arc<AtomicBool>,
    /// Its place in the queue, 0 once running.
    pub(super) position: Arc<AtomicUsize>,
    /// Key/value bytes its prompt and `max_tokens` can fill (within the context).
    pub(super) reserve: usize,
    pub(super) cache_scope: CacheScope,
    pub(super) client: Option<String>,
    pub(super) cache: KvCache,
    sampler: Sampler,
    constraint: Option<Box<Constraint>>,
    /// A constraint that applies once the reasoning block has ended.
    held_constraint: Option<Box<Constraint>>,
    reasoning: Option<ReasoningState>,
    /// How many alternatives to report with each token's log-probability, if asked.
    logprobs: Option<usize>,
    /// Log-probabilities of the tokens the text stream holds back, in order.
    pending_logprobs: VecDeque<TokenLogprob>,
    /// Prompt then generated tokens.
    pub(super) tokens: Vec<u32>,
    pub(super) n_prompt: usize,
    pub(super) n_prefilled: usize,
    /// Prompt tokens taken from the prefix cache.
    pub(super) n_cached: usize,
    /// Waiting for another sequence of its tenant to read the prompt they share.
    pub(super) follows: bool,
    n_generated: usize,
    max_tokens: usize,
    stop_token_ids: Vec<u32>,
    ignore_eog: bool,
    text: TextStream,
    pub(super) started: Instant,
    first_token_at: Option<Instant>,
    prefill_seconds: f64,
    pub(super) done: bool,
    /// Ended by an error: its cache may be half-updated and is not kept.
    pub(super) failed: bool,
    /// The tokens fed this step: a chunk of the prompt, or the last token and a draft.
    pub(super) feed: Vec<u32>,
    /// Whether this step decodes (else it prefills), and the draft tokens it verifies.
    pub(super) decoding: bool,
    pub(super) draft_len: usize,
    /// Where this step's draft came from.
    source: Source,
    /// A draft that was not fed, to compare with the token chosen (its acceptance, measured
    /// at no cost).
    unfed_draft: Option<u32>,
    ngrams: NgramIndex,
    /// The measured acceptance of each source's drafts.
    acceptance: [Acceptance; Source::COUNT],
    pub(super) drafted: usize,
    pub(super) accepted: usize,
}

impl Sequence {
    pub(super) fn new(
        request: GenerateRequest,
        constraint: Option<Box<Constraint>>,
        tx: Sender<Event>,
        cancel: Arc<AtomicBool>,
        position: Arc<AtomicUsize>,
        model: &impl StepModel,
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
            follows: false,
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
            acceptance: Acceptance::per_source(),
            drafted: 0,
            accepted: 0,
        }
    }

    /// Prompt tokens it has still to compute.
    pub(super) fn prompt_left(&self) -> usize {
        self.n_prompt - self.n_prefilled
    }

    /// Fills [`Self::feed`] with what this sequence feeds the next step: the next `chunk` tokens
    /// of its prompt (its share of the step's budget), or its last token, followed by a draft
    /// when `drafts` (decoding alone) says one pays. False when it waits for budget or has just
    /// finished.
    pub(super) fn next_input(
        &mut self,
        model: &impl StepModel,
        chunk: usize,
        drafts: Option<&Drafts>,
    ) -> bool {
        self.feed.clear();
        self.draft_len = 0;
        self.unfed_draft = None;
        if self.cancel.load(Ordering::Relaxed) {
            self.finish(FinishReason::Cancelled);
            return false;
        }
        if self.n_prefilled < self.n_prompt {
            self.decoding = false;
            let n = self.prompt_left().min(chunk);
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
    pub(super) fn after_forward(&mut self, logits: candle_core::Tensor, tokenizer: &Tokenizer) {
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
    pub(super) fn fail(&mut self, message: String) {
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

    pub(super) fn finish(&mut self, reason: FinishReason) {
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
