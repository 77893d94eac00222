//! Speculative decoding without a draft model. A decoding sequence may feed, after its last
//! token, a few guessed tokens (a *draft*): the continuation of the latest earlier occurrence
//! of its last few tokens in the prompt and the answer so far (n-gram lookup), or the tokens an
//! output grammar forces. One forward pass then gives the logits after each of them, and the
//! engine chooses tokens from those rows exactly as it would one step at a time, keeping the
//! draft's tokens for as long as they are what it chose.
//!
//! Verification keeps the output what plain decoding gives, token for token, for sampling too:
//! a draft is one token, certain, so the standard acceptance rule (accept it with probability
//! `min(1, p/q)` = `p`, else draw from `p` without it) is a draw from `p` that keeps the draft
//! when the draw is that token; the engine makes that draw as plain decoding does, with the same
//! random numbers. It takes a model whose rows are batch-invariant ([`crate::model::Model::
//! batch_invariant`]): a verified row is then the same bits as the step it stands for.
//!
//! The draft length adapts ([`Drafts`]): the expected tokens a step yields, `1 + a + … + a^k`
//! for a per-token acceptance `a` measured on the sequence, against the measured time of a step
//! of `k + 1` rows; no draft where none pays. Drafting is for a sequence decoding alone: several
//! streams already fill a step, and batching them gains more.

use std::collections::HashMap;

/// Draft tokens fed at most in one step.
pub const MAX_DRAFT: usize = 8;
/// The n-gram lengths looked up, longest first.
const NGRAMS: [usize; 3] = [4, 3, 2];
/// Weight of the past in the acceptance and step-time averages.
const DECAY: f64 = 0.9;
/// Before a step of `n` rows is measured, it is taken to cost this much more per row than one
/// row (decode reads the weights once for all rows; each row adds its compute).
const PRIOR_ROW_COST: f64 = 0.25;
/// A draft must promise this many times plain decoding's tokens per second. The acceptance and
/// step times it is judged on are estimates, so a draft that only just pays on them loses about
/// as often as it wins; the margin keeps such drafts out (their gain would be small anyway).
const MIN_GAIN: f64 = 1.05;
/// Draft tokens of a source compared with the chosen ones before its drafts are fed. None is
/// fed at first: a draft not fed is compared for free, so text that gives the drafts nothing
/// costs nothing to find out, and text that does starts drafting a few tokens later.
const MIN_TRIED: f64 = 4.0;

/// Where each n-gram of a sequence's tokens last occurred: for the `n` tokens ending before
/// position `i`, `i` (the position of the token that followed them).
#[derive(Default)]
pub struct NgramIndex {
    last: HashMap<(usize, u64), usize>,
    /// Tokens indexed so far.
    len: usize,
}

impl NgramIndex {
    /// Indexes the n-grams of `tokens` not yet seen (it only ever grows).
    pub fn extend(&mut self, tokens: &[u32]) {
        for i in self.len.max(1)..tokens.len() {
            for n in NGRAMS {
                if n <= i {
                    self.last.insert((n, key(&tokens[i - n..i])), i);
                }
            }
        }
        self.len = tokens.len();
    }

    /// Up to `max` tokens that followed the latest earlier occurrence of `tokens`' last
    /// n-gram, the longest n-gram that occurred first, and that draft's [`Source`]. `tokens` is
    /// what was indexed.
    pub fn draft(&self, tokens: &[u32], max: usize) -> (Vec<u32>, Source) {
        for (source, n) in NGRAMS.into_iter().enumerate() {
            if n > tokens.len() || max == 0 {
                break;
            }
            let tail = &tokens[tokens.len() - n..];
            if let Some(&at) = self.last.get(&(n, key(tail))) {
                // The index keeps a hash: check that the tokens do match.
                if at < tokens.len() && tokens[at - n..at] == *tail {
                    let draft = tokens[at..tokens.len().min(at + max)].to_vec();
                    return (draft, Source(1 + source));
                }
            }
        }
        (Vec::new(), Source::GRAMMAR)
    }
}

fn key(tokens: &[u32]) -> u64 {
    // FNV-1a over the ids.
    tokens.iter().fold(0xcbf29ce484222325, |h, &t| {
        (h ^ t as u64).wrapping_mul(0x100000001b3)
    })
}

/// Where a draft came from: a grammar's forced tokens, or an n-gram match of one of the
/// lengths looked up. Each is right at its own rate (a match of four tokens more often than one
/// of two), measured apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source(usize);

impl Source {
    pub const GRAMMAR: Source = Source(0);
    /// How many there are.
    pub const COUNT: usize = 1 + NGRAMS.len();

    pub fn index(self) -> usize {
        self.0
    }
}

/// A sequence's measured acceptance of draft tokens from one source: nothing known at first.
#[derive(Default)]
pub struct Acceptance {
    kept: f64,
    tried: f64,
}

impl Acceptance {
    /// A source's acceptance before any of its drafts is compared: a grammar's forced tokens are
    /// chosen whatever the logits (every other token is masked out), n-gram drafts unknown.
    pub fn prior(source: Source) -> Self {
        if source == Source::GRAMMAR {
            Self {
                kept: MIN_TRIED,
                tried: MIN_TRIED,
            }
        } else {
            Self::default()
        }
    }

    /// One per source, as [`Self::prior`] says.
    pub fn per_source() -> [Self; Source::COUNT] {
        std::array::from_fn(|i| Self::prior(Source(i)))
    }

    /// Counts a verified draft: `tried` tokens were compared with what was chosen, `kept` of
    /// them matched (all the leading ones).
    pub fn observe(&mut self, kept: usize, tried: usize) {
        self.kept = DECAY * self.kept + kept as f64;
        self.tried = DECAY * self.tried + tried as f64;
    }

    /// The chance that a draft token is kept; 0 until enough were compared to tell.
    pub fn rate(&self) -> f64 {
        if self.tried < MIN_TRIED {
            return 0.0;
        }
        (self.kept / self.tried).clamp(0.0, 1.0)
    }
}

/// The engine's measured time of a step that decodes one sequence, by the rows it feeds.
pub struct Drafts {
    seconds: [Option<f64>; MAX_DRAFT + 1],
}

impl Default for Drafts {
    fn default() -> Self {
        Self {
            seconds: [None; MAX_DRAFT + 1],
        }
    }
}

impl Drafts {
    /// Records a step of one sequence that fed `rows` rows.
    pub fn observe(&mut self, rows: usize, seconds: f64) {
        if let Some(slot) = self.seconds.get_mut(rows - 1) {
            *slot = Some(match *slot {
                Some(s) => DECAY * s + (1.0 - DECAY) * seconds,
                None => seconds,
            });
        }
    }

    /// A step of `rows` rows against one of one row: measured, else the prior.
    pub fn cost(&self, rows: usize) -> Option<f64> {
        let one = self.seconds[0]?;
        Some(match self.seconds[rows - 1] {
            Some(s) => s / one,
            None => 1.0 + PRIOR_ROW_COST * (rows - 1) as f64,
        })
    }

    /// How many of `available` draft tokens to feed: the number that yields the most tokens
    /// per second at acceptance `rate`, 0 when none beats plain decoding by [`MIN_GAIN`].
    pub fn length(&self, available: usize, rate: f64) -> usize {
        let mut best = (MIN_GAIN, 0);
        let mut expected = 1.0; // 1 + a + … + a^k
        let mut term = 1.0;
        for k in 1..=available.min(MAX_DRAFT) {
            term *= rate;
            expected += term;
            let Some(cost) = self.cost(k + 1) else {
                return 0; // one row's time is not known yet
            };
            if expected / cost > best.0 {
                best = (expected / cost, k);
            }
        }
        best.1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drafts_continue_the_latest_earlier_occurrence() {
        let mut index = NgramIndex::default();
        // "a b c d x y | a b c d" : the last four tokens occurred before, followed by x y.
        let mut tokens = vec![1, 2, 3, 4, 9, 8, 1, 2, 3, 4];
        index.extend(&tokens);
        assert_eq!(index.draft(&tokens, 8), (vec![9, 8, 1, 2, 3, 4], Source(1)));
        assert_eq!(index.draft(&tokens, 2).0, [9, 8]);
        // A later occurrence with another continuation wins.
        tokens.extend([7, 1, 2, 3, 4]);
        index.extend(&tokens);
        assert_eq!(index.draft(&tokens, 1).0, [7]);
        // Nothing repeats: no draft.
        let mut fresh = NgramIndex::default();
        fresh.extend(&[5, 6, 7]);
        assert!(fresh.draft(&[5, 6, 7], 4).0.is_empty());
    }

    #[test]
    fn shorter_ngrams_are_the_fallback() {
        let mut index = NgramIndex::default();
        let tokens = [1, 2, 5, 6, 3, 1, 2];
        index.extend(&tokens);
        assert_eq!(index.draft(&tokens, 3), (vec![5, 6, 3], Source(3)));
    }

    #[test]
    fn the_length_follows_acceptance_and_cost() {
        let mut drafts = Drafts::default();
        assert_eq!(drafts.length(8, 0.9), 0, "nothing measured yet");
        drafts.observe(1, 0.010);
        // Verifying costs as the prior says: a good acceptance drafts long, a poor one not.
        assert!(drafts.length(8, 0.9) >= 4);
        assert_eq!(drafts.length(8, 0.1), 0);
        // Rows that cost as much as steps never pay.
        for rows in 2..=MAX_DRAFT + 1 {
            drafts.observe(rows, 0.010 * rows as f64);
        }
        assert_eq!(drafts.length(8, 0.9), 0);
        // A draft that only just pays on the estimates is not fed.
        let mut even = Drafts::default();
        even.observe(1, 0.010);
        even.observe(2, 0.0105);
        assert_eq!(even.length(1, 0.06), 0, "1.06 tokens for 1.05 steps");
        assert_eq!(even.length(1, 0.2), 1);
        // Rows that are nearly free pay even at a modest acceptance.
        let mut cheap = Drafts::default();
        for rows in 1..=MAX_DRAFT + 1 {
            cheap.observe(rows, 0.010 + 0.0002 * rows as f64);
        }
        assert!(cheap.length(8, 0.4) >= 1);
        assert_eq!(cheap.length(0, 0.9), 0, "no draft available");
    }

    #[test]
    fn acceptance_follows_the_recent_drafts() {
        let mut a = Acceptance::prior(Source(1));
        assert_eq!(
            a.rate(),
            0.0,
            "an n-gram source drafts nothing before it is measured"
        );
        for _ in 0..4 {
            a.observe(1, 1);
        }
        assert_eq!(
            a.rate(),
            0.0,
            "four comparisons, decayed, are not yet enough"
        );
        a.observe(1, 1);
        assert_eq!(a.rate(), 1.0);
        assert_eq!(
            Acceptance::prior(Source::GRAMMAR).rate(),
            1.0,
            "forced tokens are chosen"
        );
        for _ in 0..50 {
            a.observe(0, 1);
        }
        assert!(a.rate() < 0.05);
        for _ in 0..50 {
            a.observe(4, 4);
        }
        assert!(a.rate() > 0.95);
    }
}
