//! Rotary position embeddings: the cos/sin tables for every position of the context, applied
//! in the interleaved layout that llama.cpp's converter permuted the Q and K weights for.

use candle_core::{Device, Tensor};

use super::Config;
use crate::error::Result;

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
        let half = cfg.head_dim / 2;
        let theta_scale = cfg.rope_freq_base.powf(-2.0 / cfg.head_dim as f32);
        let mut cos = Vec::with_capacity(n_ctx * half);
        let mut sin = Vec::with_capacity(n_ctx * half);
        for pos in 0..n_ctx {
            let mut theta = pos as f32;
            for _ in 0..half {
                cos.push(theta.cos());
                sin.push(theta.sin());
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
