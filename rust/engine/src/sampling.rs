//! Choosing the next token from logits: greedy, or temperature with top-k, top-p and min-p,
//! after repetition / frequency / presence penalties. Seeded runs are reproducible.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::engine::TokenLogprob;
use crate::error::{Error, Result};
use crate::limits::{DEFAULT_TEMPERATURE, REPEAT_LAST_N};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    /// Multiplicative penalty (> 1 discourages) on tokens among the last `REPEAT_LAST_N`.
    pub repeat_penalty: Option<f32>,
    /// OpenAI-style additive penalties on tokens already generated.
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: DEFAULT_TEMPERATURE,
            top_k: None,
            top_p: None,
            min_p: None,
            repeat_penalty: None,
            frequency_penalty: None,
            presence_penalty: None,
            seed: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    pub fn validate(&self) -> Result<()> {
        let finite = |name: &'static str, v: f32| {
            if v.is_finite() {
                Ok(())
            } else {
                Err(Error::invalid(name, format!("{v} is not a finite number")))
            }
        };
        finite("temperature", self.temperature)?;
        if self.temperature < 0.0 {
            return Err(Error::invalid(
                "temperature",
                format!("{} is negative (0 means greedy)", self.temperature),
            ));
        }
        if self.top_k == Some(0) {
            return Err(Error::invalid("top_k", "must be at least 1"));
        }
        if let Some(p) = self.top_p {
            finite("top_p", p)?;
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::invalid("top_p", format!("{p} is not in (0, 1]")));
            }
        }
        if let Some(p) = self.min_p {
            finite("min_p", p)?;
            if !(0.0..=1.0).contains(&p) {
                return Err(Error::invalid("min_p", format!("{p} is not in [0, 1]")));
            }
        }
        if let Some(p) = self.repeat_penalty {
            finite("repeat_penalty", p)?;
            if p <= 0.0 {
                return Err(Error::invalid(
                    "repeat_penalty",
                    format!("{p} must be positive"),
                ));
            }
        }
        for (name, v) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if let Some(v) = v {
                finite(name, v)?;
                if !(-2.0..=2.0).contains(&v) {
                    return Err(Error::invalid(name, format!("{v} is not in [-2, 2]")));
                }
            }
        }
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Scratch: (logit, id) candidates.
    candidates: Vec<(f32, u32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self {
            params,
            rng,
            candidates: Vec::new(),
        }
    }

    /// Picks the next token. `context` is the prompt and the tokens generated so far;
    /// `n_generated` of its last tokens were generated (for the OpenAI penalties).
    pub fn sample(&mut self, logits: &mut [f32], context: &[u32], n_generated: usize) -> u32 {
        self.apply_penalties(logits, context, n_generated);
        if self.params.temperature == 0.0 {
            return argmax(logits);
        }
        let p = &self.params;
        let cands = &mut self.candidates;
        cands.clear();
        cands.extend(logits.iter().enumerate().map(|(i, &l)| (l, i as u32)));
        let by_logit_desc =
            |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if let Some(k) = p.top_k.filter(|&k| k < cands.len()) {
            cands.select_nth_unstable_by(k - 1, by_logit_desc);
            cands.truncate(k);
        }
        cands.sort_unstable_by(by_logit_desc);
        // Softmax at the temperature, in place: first element is the largest logit.
        let max = cands[0].0;
        let mut sum = 0.0f32;
        for c in cands.iter_mut() {
            c.0 = ((c.0 - max) / p.temperature).exp();
            sum += c.0;
        }
        for c in cands.iter_mut() {
            c.0 /= sum;
        }
        if let Some(min_p) = p.min_p {
            let threshold = cands[0].0 * min_p;
            let keep = cands.iter().take_while(|c| c.0 >= threshold).count().max(1);
            cands.truncate(keep);
        }
        if let Some(top_p) = p.top_p {
            let mut acc = 0.0;
            let mut keep = cands.len();
            for (i, c) in cands.iter().enumerate() {
                acc += c.0;
                if acc >= top_p {
                    keep = i + 1;
                    break;
                }
            }
            cands.truncate(keep);
        }
        let total: f32 = cands.iter().map(|c| c.0).sum();
        let mut r = self.rng.random::<f32>() * total;
        for c in cands.iter() {
            r -= c.0;
            if r <= 0.0 {
                return c.1;
            }
        }
        cands[cands.len() - 1].1
    }

    fn apply_penalties(&self, logits: &mut [f32], context: &[u32], n_generated: usize) {
        let p = &self.params;
        if let Some(penalty) = p.repeat_penalty.filter(|&x| x != 1.0) {
            let start = context.len().saturating_sub(REPEAT_LAST_N);
            let mut recent: Vec<u32> = context[start..].to_vec();
            recent.sort_unstable();
            recent.dedup();
            for id in recent {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = finite_as(*l, if *l > 0.0 { *l / penalty } else { *l * penalty });
                }
            }
        }
        let freq = p.frequency_penalty.unwrap_or(0.0);
        let pres = p.presence_penalty.unwrap_or(0.0);
        if freq != 0.0 || pres != 0.0 {
            let generated = &context[context.len() - n_generated.min(context.len())..];
            let mut counts: Vec<(u32, u32)> = Vec::new();
            let mut sorted = generated.to_vec();
            sorted.sort_unstable();
            for id in sorted {
                match counts.last_mut() {
                    Some((last, n)) if *last == id => *n += 1,
                    _ => counts.push((id, 1)),
                }
            }
            for (id, n) in counts {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = finite_as(*l, *l - (freq * n as f32 + pres));
                }
            }
        }
    }
}

/// A penalised logit, kept finite where the logit was: an extreme but valid penalty (a
/// repetition penalty of 1e-40) would otherwise make it infinite, the softmax's `inf - inf`
/// would make every probability NaN, and the draw would fall through to the last candidate,
/// which can be a token the grammar masked out (`-inf`). Masked logits stay `-inf`.
fn finite_as(before: f32, after: f32) -> f32 {
    if before.is_finite() {
        after.clamp(-f32::MAX, f32::MAX)
    } else {
        after
    }
}

/// Index of the largest logit; the first one on ties.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// `id`'s log-probability under `logits` and the `top` most likely tokens (ties by id).
pub(crate) fn token_logprob(logits: &[f32], id: u32, top: usize) -> TokenLogprob {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, 0.5, 2.9]
    }

    #[test]
    fn greedy_takes_the_largest() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&mut logits(), &[], 0), 1);
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 5.0,
            top_k: Some(1),
            seed: Some(3),
            ..Default::default()
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&mut logits(), &[], 0), 1);
        }
    }

    #[test]
    fn same_seed_same_draws() {
        let params = SamplingParams {
            temperature: 1.0,
            seed: Some(42),
            ..Default::default()
        };
        let draw = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone());
            (0..32)
                .map(|_| s.sample(&mut logits(), &[], 0))
                .collect::<Vec<_>>()
        };
        let a = draw(&params);
        assert_eq!(a, draw(&params));
        assert!(
            a.iter().any(|&t| t != a[0]),
            "temperature 1.0 should vary: {a:?}"
        );
    }

    /// The tokens drawn in 300 samples of [`logits`] (probabilities at temperature 1: token 1
    /// 0.40, 4 0.36, 2 0.15, 0 0.05, 3 0.03).
    fn drawn(params: SamplingParams) -> std::collections::BTreeSet<u32> {
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            seed: Some(1),
            ..params
        });
        (0..300).map(|_| s.sample(&mut logits(), &[], 0)).collect()
    }

    #[test]
    fn min_p_and_top_p_cut_the_tail() {
        let all = drawn(SamplingParams::default());
        assert_eq!(
            all,
            [0, 1, 2, 3, 4].into(),
            "unfiltered, every token is drawn"
        );
        // min_p 0.5 keeps what is at least half as likely as token 1: 4 (0.91 of it), not 2 (0.37).
        let min_p = drawn(SamplingParams {
            min_p: Some(0.5),
            ..Default::default()
        });
        assert_eq!(min_p, [1, 4].into());
        // top_p 0.6: token 1 (0.40) is not enough, 1 and 4 (0.77) are.
        let top_p = drawn(SamplingParams {
            top_p: Some(0.6),
            ..Default::default()
        });
        assert_eq!(top_p, [1, 4].into());
        let top_p = drawn(SamplingParams {
            top_p: Some(0.3),
            ..Default::default()
        });
        assert_eq!(top_p, [1].into());
        let top_k = drawn(SamplingParams {
            top_k: Some(3),
            ..Default::default()
        });
        assert_eq!(top_k, [1, 2, 4].into());
    }

    #[test]
    fn repeat_penalty_discourages_seen_tokens() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            repeat_penalty: Some(2.0),
            ..Default::default()
        });
        assert_eq!(s.sample(&mut logits(), &[1], 0), 4);
        // 3 / 1.01 is still above 2.9; a token before the last REPEAT_LAST_N is not penalised.
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            repeat_penalty: Some(1.01),
            ..Default::default()
        });
        assert_eq!(s.sample(&mut logits(), &[1], 0), 1);
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            repeat_penalty: Some(2.0),
            ..Default::default()
        });
        let mut old = vec![1];
        old.extend(std::iter::repeat_n(0, REPEAT_LAST_N));
        assert_eq!(s.sample(&mut logits(), &old, 0), 1);
    }

    /// A found failure (the API's fuzz test, a `json_object` request with repetition penalty
    /// 5.5e-44): the penalty made a seen token's logit infinite and the draw picked a masked one.
    #[test]
    fn extreme_penalties_never_pick_a_masked_token() {
        for penalty in [5.5e-44, 1e-30, 1e30] {
            let mut s = Sampler::new(SamplingParams {
                temperature: 1.3,
                repeat_penalty: Some(penalty),
                frequency_penalty: Some(2.0),
                seed: Some(7),
                ..Default::default()
            });
            for _ in 0..50 {
                let mut l = logits();
                l[0] = f32::NEG_INFINITY;
                l[3] = f32::NEG_INFINITY;
                let t = s.sample(&mut l, &[1, 2, 4], 3);
                assert!(
                    t == 1 || t == 2 || t == 4,
                    "penalty {penalty}: drew masked {t}"
                );
            }
        }
    }

    #[test]
    fn validation_names_the_parameter() {
        for (p, name) in [
            (
                SamplingParams {
                    temperature: -1.0,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    top_p: Some(1.5),
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    top_k: Some(0),
                    ..Default::default()
                },
                "top_k",
            ),
            (
                SamplingParams {
                    min_p: Some(f32::NAN),
                    ..Default::default()
                },
                "min_p",
            ),
            (
                SamplingParams {
                    repeat_penalty: Some(0.0),
                    ..Default::default()
                },
                "repeat_penalty",
            ),
        ] {
            let err = p.validate().unwrap_err().to_string();
            assert!(err.contains(name), "{err}");
        }
    }
}
