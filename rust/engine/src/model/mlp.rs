//! The feed-forward block: SwiGLU, `down(silu(gate(x)) * up(x))`.

use candle_core::{Device, Tensor};

use super::linear::{self, Linear};
use super::Config;
use crate::error::Result;
use crate::gguf::GgufFile;
use crate::kernels::{ggml, with_host_f32};

pub struct Mlp {
    gate: Box<dyn Linear>,
    up: Box<dyn Linear>,
    down: Box<dyn Linear>,
    /// `silu(gate) * up` as llama.cpp computes it ([`ggml::swiglu_rows`]) on the CPU, else by
    /// Candle's ops.
    host: bool,
}

impl Mlp {
    pub fn load(gguf: &GgufFile, layer: usize, cfg: &Config, device: &Device) -> Result<Self> {
        let p = |s: &str| format!("blk.{layer}.{s}.weight");
        let (e, ff) = (cfg.n_embd, cfg.n_ff);
        Ok(Self {
            gate: linear::load(gguf, &p("ffn_gate"), &[ff, e], device)?,
            up: linear::load(gguf, &p("ffn_up"), &[ff, e], device)?,
            down: linear::load(gguf, &p("ffn_down"), &[e, ff], device)?,
            host: device.is_cpu(),
        })
    }

    /// The block's output for the normed activations `h`, which are dropped as soon as the
    /// products that read them are done (for a 512-token prompt through the 3B shape, the
    /// intermediate activations are 22 MB each).
    pub fn forward(&self, h: Tensor) -> Result<Tensor> {
        let act = {
            let gate = self.gate.forward(&h)?;
            let up = self.up.forward(&h)?;
            drop(h);
            self.swiglu(&gate, &up)?
        };
        self.down.forward(&act)
    }

    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        if !self.host {
            return Ok((candle_nn::ops::silu(gate)? * up)?);
        }
        let mut y = vec![0f32; gate.elem_count()];
        let width = *gate.dims().last().expect("[.., ffn]");
        with_host_f32(gate, |g| {
            with_host_f32(up, |u| ggml::swiglu_rows(g, u, width, &mut y))
        })??;
        Ok(Tensor::from_vec(y, gate.shape(), gate.device())?)
    }

    pub fn batch_invariant(&self) -> bool {
        [&self.gate, &self.up, &self.down]
            .iter()
            .all(|m| m.batch_invariant())
    }
}
