//! Rotary position embeddings: the cos/sin tables for every position of the context, applied
//! in the interleaved layout that llama.cpp's converter permuted the Q and K weights for; with
//! YaRN ([`Yarn`]) past the window the model was trained on.

use candle_core::{Device, Tensor};

use super::Config;
use crate::error::{Error, Result};

/// YaRN rope scaling ("Yet another RoPE extensioN", Peng et al. 2023), as transformers'
/// `rope_type: "yarn"` defines it: positions up to `factor` times the training window. Pairs
/// that turn fewer than `beta_slow` times over the window are interpolated (their angles divided
/// by `factor`), pairs that turn more than `beta_fast` times are kept, those between are mixed
/// along a linear ramp; cos and sin are scaled by `attention_factor`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Yarn {
    pub factor: f32,
    /// The window the model was trained on (`original_max_position_embeddings`).
    pub original_context: usize,
    pub beta_fast: f32,
    pub beta_slow: f32,
    pub attention_factor: f32,
}

/// YaRN asked for when loading ([`crate::engine::LoadOptions::rope_scaling`]), in
/// transformers' terms; the window defaults to the file's training context.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct YarnOptions {
    pub factor: f32,
    pub original_context: Option<usize>,
    pub beta_fast: Option<f32>,
    pub beta_slow: Option<f32>,
    pub attention_factor: Option<f32>,
}

impl YarnOptions {
    pub fn resolve(&self, n_ctx_train: usize) -> Result<Yarn> {
        Yarn::new(
            self.factor,
            self.original_context.unwrap_or(n_ctx_train),
            self.beta_fast,
            self.beta_slow,
            self.attention_factor,
        )
    }
}

impl Yarn {
    pub const BETA_FAST: f32 = 32.0;
    pub const BETA_SLOW: f32 = 1.0;

    /// YaRN over a training window of `original_context` positions, with the paper's defaults
    /// where `None`: betas 32 and 1, an attention factor of `0.1 ln(factor) + 1`.
    pub fn new(
        factor: f32,
        original_context: usize,
        beta_fast: Option<f32>,
        beta_slow: Option<f32>,
        attention_factor: Option<f32>,
    ) -> Result<Self> {
        let positive = |name: &'static str, v: f32| {
            if v.is_finite() && v > 0.0 {
                Ok(v)
            } else {
                Err(Error::invalid(
                    name,
                    format!("must be a positive number, not {v}"),
                ))
            }
        };
        if !(factor.is_finite() && factor >= 1.0) {
            return Err(Error::invalid(
                "rope_scaling",
                format!("factor must be at least 1, not {factor}"),
            ));
        }
        if original_context == 0 {
            return Err(Error::invalid(
                "rope_scaling",
                "original_max_position_embeddings must be positive",
            ));
        }
        let beta_fast = positive("rope_scaling", beta_fast.unwrap_or(Self::BETA_FAST))?;
        let beta_slow = positive("rope_scaling", beta_slow.unwrap_or(Self::BETA_SLOW))?;
        let attention_factor = match attention_factor {
            Some(a) => positive("rope_scaling", a)?,
            None => Self::default_attention_factor(factor),
        };
        Ok(Self {
            factor,
            original_context,
            beta_fast,
            beta_slow,
            attention_factor,
        })
    }

    /// `0.1 ln(factor) + 1`: the paper's scale of cos and sin (transformers' `yarn_get_mscale`).
    pub fn default_attention_factor(factor: f32) -> f32 {
        if factor <= 1.0 {
            1.0
        } else {
            0.1 * factor.ln() + 1.0
        }
    }

    /// The positions it reaches: `factor` times the training window.
    pub fn context(&self) -> usize {
        (self.factor as f64 * self.original_context as f64).round() as usize
    }

    /// Per pair of a head of `head_dim`, the weight of the kept (extrapolated) angle against the
    /// interpolated one: 1 for the fast pairs, 0 for the slow ones, a linear ramp between.
    fn kept_weights(&self, head_dim: usize, base: f32) -> Vec<f32> {
        // transformers' find_correction_range, truncated: in f64 as Python computes it.
        let dim = head_dim as f64;
        let correction = |rotations: f32| {
            dim * (self.original_context as f64 / (rotations as f64 * 2.0 * std::f64::consts::PI))
                .ln()
                / (2.0 * (base as f64).ln())
        };
        let low = correction(self.beta_fast).floor().max(0.0);
        let mut high = correction(self.beta_slow).ceil().min(dim - 1.0);
        if low == high {
            high += 0.001;
        }
        (0..head_dim / 2)
            .map(|i| 1.0 - ((i as f32 - low as f32) / (high - low) as f32).clamp(0.0, 1.0))
            .collect()
    }
}

pub struct Rope {
    /// `[n_ctx, head_dim / 2]` each.
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    pub fn new(cfg: &Config, n_ctx: usize, device: &Device) -> Result<Self> {
        // The angles are computed as llama.cpp does (ggml_rope_cache_init): theta starts at the
        // position and is multiplied by base^(-2/d) once per pair, in f32. The same rounding
        // keeps our logits bit-identical to llama.cpp's wherever the rest of the arithmetic is.
        // With YaRN each angle is mixed from that one and the interpolated one (divided by the
        // factor), as llama.cpp's rope_yarn does, and cos and sin are scaled.
        let half = cfg.head_dim / 2;
        let theta_scale = cfg.rope_freq_base.powf(-2.0 / cfg.head_dim as f32);
        let yarn = cfg
            .rope_scaling
            .map(|y| (y.kept_weights(cfg.head_dim, cfg.rope_freq_base), y));
        let mut cos = Vec::with_capacity(n_ctx * half);
        let mut sin = Vec::with_capacity(n_ctx * half);
        for pos in 0..n_ctx {
            let mut theta = pos as f32;
            for i in 0..half {
                match &yarn {
                    None => {
                        cos.push(theta.cos());
                        sin.push(theta.sin());
                    }
                    Some((kept, y)) => {
                        let t = theta / y.factor * (1.0 - kept[i]) + theta * kept[i];
                        cos.push(t.cos() * y.attention_factor);
                        sin.push(t.sin() * y.attention_factor);
                    }
                }
                theta *= theta_scale;
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (n_ctx, half), device)?,
            sin: Tensor::from_vec(sin, (n_ctx, half), device)?,
        })
    }

    /// The tables `(cos, sin)` of positions `pos..pos + seq`.
    pub fn at(&self, pos: usize, seq: usize) -> Result<(Tensor, Tensor)> {
        Ok((self.cos.narrow(0, pos, seq)?, self.sin.narrow(0, pos, seq)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yarn_keeps_the_fast_pairs_and_interpolates_the_slow_ones() {
        // Head of 16, base 10,000, a window of 32: a pair turning 32 times over the window
        // would sit below pair 0 (kept from there), one turning once at 1.41 (interpolated from
        // pair 2 on, the ramp rounded outwards).
        let y = Yarn::new(2.0, 32, None, None, None).unwrap();
        assert_eq!(
            y.kept_weights(16, 10_000.0),
            [1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
        );
        assert_eq!(y.context(), 64);
        assert!(Yarn::new(2.0, 0, None, None, None).is_err());
        assert!(Yarn::new(f32::NAN, 32, None, None, None).is_err());
        assert!(Yarn::new(2.0, 32, Some(-1.0), None, None).is_err());
        assert_eq!(
            Yarn::new(1.0, 32, None, None, None)
                .unwrap()
                .attention_factor,
            1.0
        );
    }
}
