//! How many prompt tokens a step carries, and who gets them.
//!
//! A step's cost is what users feel: every stream decoding in it waits for the whole step
//! before its next token. So the prompt tokens a step carries are sized by *time*, from the
//! measured cost of this model's steps on this machine (a token of the 3B costs twenty times
//! one of SmolLM2):
//!
//! - while a stream decodes, or a prompt is about to give its first token, a step aims at
//!   [`DEFAULT_DECODE_SLOWDOWN`] times a decoding step (a load option): the prompt tokens it
//!   carries are the time that leaves over their measured marginal cost;
//! - when only prompts are read, a step carries [`PREFILL_CHUNK`] tokens: large chunks are
//!   the efficient ones (a request arriving meanwhile waits at most one such step).
//!
//! The budget is then shared by [`share`]: shortest remaining prompt first, so a short request
//! starts within one step of its admission whatever else is being read, while the prompt that
//! started first keeps a quarter of the budget, so a stream of short requests never starves it.

use crate::limits::{DEFAULT_DECODE_SLOWDOWN, PREFILL_CHUNK, PREFILL_CHUNK_MIN};

/// Prompt tokens a step carries alongside decoding streams before any step has been measured.
const COLD_CHUNK: usize = 32;

/// The weight of the latest observation in the running averages.
const SMOOTHING: f64 = 0.3;

/// A running average (exponentially weighted), empty until the first observation.
#[derive(Debug, Clone, Copy, Default)]
struct Average(Option<f64>);

impl Average {
    fn observe(&mut self, x: f64) {
        self.0 = Some(match self.0 {
            None => x,
            Some(v) => v + SMOOTHING * (x - v),
        });
    }
}

/// The measured cost of steps, and the prompt tokens the next one may carry.
#[derive(Debug, Clone)]
pub(super) struct Pacing {
    slowdown: f64,
    /// Seconds of a step that only decodes.
    decode_step: Average,
    /// Seconds a prompt token adds to a step.
    per_token: Average,
    /// Budgets that ignore the clock (with and without latency), for the scheduler's tests.
    #[cfg(test)]
    fixed: Option<(usize, usize)>,
}

impl Pacing {
    /// `slowdown`: see [`DEFAULT_DECODE_SLOWDOWN`] (at least 1).
    pub(super) fn new(slowdown: Option<f64>) -> Self {
        Self {
            slowdown: slowdown.unwrap_or(DEFAULT_DECODE_SLOWDOWN),
            decode_step: Average::default(),
            per_token: Average::default(),
            #[cfg(test)]
            fixed: None,
        }
    }

    /// Budgets of `latency` and `alone` tokens, whatever the steps take.
    #[cfg(test)]
    pub(super) fn fixed(latency: usize, alone: usize) -> Self {
        Self {
            fixed: Some((latency, alone)),
            ..Self::new(None)
        }
    }

    /// Prompt tokens the next step may carry: `latency` when a stream decodes in it or a prompt
    /// gives its first token from it.
    pub(super) fn budget(&self, latency: bool) -> usize {
        #[cfg(test)]
        if let Some((with, without)) = self.fixed {
            return if latency { with } else { without };
        }
        if !latency {
            return PREFILL_CHUNK;
        }
        let (Some(per_token), Some(decode)) =
            (self.per_token.0.filter(|&c| c > 0.0), self.decode_step.0)
        else {
            return COLD_CHUNK;
        };
        let spare = (self.slowdown - 1.0) * decode;
        tokens(spare / per_token).clamp(PREFILL_CHUNK_MIN, PREFILL_CHUNK)
    }

    /// Takes a step's measure: it took `seconds`, computing `prompt_tokens` prompt tokens and
    /// `decode_rows` rows of decoding streams (their tokens and drafts).
    pub(super) fn observe(&mut self, seconds: f64, prompt_tokens: usize, decode_rows: usize) {
        if !seconds.is_finite() || seconds <= 0.0 {
            return;
        }
        if prompt_tokens == 0 {
            if decode_rows > 0 {
                self.decode_step.observe(seconds);
            }
            return;
        }
        // What the prompt tokens added to the step: beyond what its decoding rows cost alone,
        // and never less than a quarter of the step (the estimate of those rows may be old).
        let decoding = if decode_rows > 0 {
            self.decode_step.0.unwrap_or(0.0)
        } else {
            0.0
        };
        let added = (seconds - decoding).max(seconds / 4.0);
        self.per_token.observe(added / prompt_tokens as f64);
    }
}

fn tokens(x: f64) -> usize {
    if x.is_finite() && x > 0.0 {
        x.min(usize::MAX as f64 / 2.0) as usize
    } else {
        0
    }
}

/// Shares a step's `budget` of prompt tokens among the prompts still being read, given the
/// tokens each has `left`, in the order they started: the one that started first is given a
/// quarter of the budget (or what it has left), then the others, shortest first, what they have
/// left while the budget lasts, and the first takes what remains. Every token of the budget is
/// given while any prompt has tokens left.
pub(super) fn share(budget: usize, left: &[usize]) -> Vec<usize> {
    let mut given = vec![0; left.len()];
    let Some(&first) = left.first() else {
        return given;
    };
    given[0] = first.min(budget.div_ceil(4));
    let mut rest = budget - given[0];
    let mut order: Vec<usize> = (1..left.len()).collect();
    order.sort_by_key(|&i| (left[i], i));
    for i in order {
        given[i] = left[i].min(rest);
        rest -= given[i];
    }
    let more = (first - given[0]).min(rest);
    given[0] += more;
    given
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_prompt_gets_all_it_needs_beside_a_long_one() {
        assert_eq!(share(512, &[7000, 4]), vec![508, 4]);
        assert_eq!(share(512, &[7000, 4, 300, 50]), vec![158, 4, 300, 50]);
        assert_eq!(share(100, &[7000]), vec![100]);
        assert_eq!(share(100, &[]), Vec::<usize>::new());
    }

    #[test]
    fn the_first_prompt_keeps_a_quarter_and_nothing_is_wasted() {
        // Short prompts that fill the budget still leave the first one a quarter of it.
        assert_eq!(share(512, &[7000, 400, 400]), vec![128, 384, 0]);
        assert_eq!(share(9, &[100, 100]), vec![3, 6]);
        // A first prompt nearly read takes only what it has left; the others the rest.
        assert_eq!(share(512, &[10, 1000, 2000]), vec![10, 502, 0]);
        for (budget, left) in [
            (512, vec![3, 1, 4, 1, 5, 9, 2, 6]),
            (8, vec![100, 1, 1, 1, 1, 1, 1, 1, 1, 1]),
            (513, vec![200, 200, 200]),
            (1, vec![5, 5]),
            (0, vec![5]),
        ] {
            let given = share(budget, &left);
            let total: usize = given.iter().sum();
            assert_eq!(
                total,
                budget.min(left.iter().sum()),
                "{budget} {left:?}: the whole budget, while prompts have tokens left"
            );
            assert!(given.iter().zip(&left).all(|(g, l)| g <= l));
            if budget > 0 {
                assert!(given[0] > 0, "{budget} {left:?}: the first always advances");
            }
        }
    }

    #[test]
    fn a_step_beside_decoding_streams_is_sized_by_their_measured_step() {
        let mut p = Pacing::new(Some(2.0));
        assert_eq!(p.budget(true), COLD_CHUNK, "nothing measured yet");
        assert_eq!(p.budget(false), PREFILL_CHUNK);
        // Reading prompts alone: 512 tokens in 0.75 s.
        p.observe(0.75, 512, 0);
        assert_eq!(
            p.budget(false),
            PREFILL_CHUNK,
            "large chunks when nothing waits"
        );
        assert_eq!(p.budget(true), COLD_CHUNK, "no decoding step measured yet");
        // Decoding steps of 20 ms: a step beside them may take 20 ms more, 13 tokens' worth.
        for _ in 0..3 {
            p.observe(0.020, 0, 4);
        }
        assert_eq!(p.budget(true), 13);
        // Tokens that turn out dearer (deep in a prompt) shrink the next steps.
        for _ in 0..20 {
            p.observe(0.020 + 0.040, 10, 4);
        }
        assert_eq!(
            p.budget(true),
            8,
            "4 ms a token, but never fewer than the minimum"
        );
        assert_eq!(p.budget(false), PREFILL_CHUNK);
        // A model fast against its steps: the chunk is capped.
        let mut fast = Pacing::new(None);
        fast.observe(0.1, 0, 1);
        fast.observe(0.001, 512, 0);
        assert_eq!(fast.budget(true), PREFILL_CHUNK);
        assert_eq!(fast.budget(false), PREFILL_CHUNK);
    }

    #[test]
    fn nonsense_measures_are_ignored() {
        let mut p = Pacing::new(None);
        p.observe(f64::NAN, 10, 0);
        p.observe(0.0, 10, 0);
        p.observe(-1.0, 0, 1);
        p.observe(0.5, 0, 0);
        assert_eq!(p.budget(false), PREFILL_CHUNK);
        assert_eq!(p.budget(true), COLD_CHUNK);
    }
}
