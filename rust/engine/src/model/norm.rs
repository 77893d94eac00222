//! RMSNorm with its weight.

use candle_core::{Device, Tensor};

use crate::error::Result;
use crate::gguf::GgufFile;
use crate::kernels::{ggml, with_host_f32};

/// On the CPU it is computed as llama.cpp does (squares summed in f64, `x * (1 / sqrt(mean +
/// eps)) * w` in f32), not as Candle's (an f32 sum, `x / rms * w`): SmolLM2 and SmolLM3 carry
/// activations in the tens of thousands in some dimensions, where an f32 sum of squares is off
/// in its fifth digit, and that is enough to move many of the next product's Q8 activation
/// roundings (about 0.2 logits on average at the output). Elsewhere, Candle's.
pub enum RmsNorm {
    Host { weight: Vec<f32>, eps: f32 },
    Candle { weight: Tensor, eps: f32 },
}

impl RmsNorm {
    pub fn load(gguf: &GgufFile, name: &str, n: usize, eps: f64, device: &Device) -> Result<Self> {
        let weight = gguf.tensor(name, &[n], device)?.dequantize(device)?;
        let eps = eps as f32;
        Ok(if device.is_cpu() {
            Self::Host {
                weight: weight.to_vec1::<f32>()?,
                eps,
            }
        } else {
            Self::Candle { weight, eps }
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Candle { weight, eps } => Ok(candle_nn::ops::rms_norm(x, weight, *eps)?),
            Self::Host { weight: w, eps } => {
                let mut out = vec![0f32; x.elem_count()];
                with_host_f32(x, |xs| {
                    for (src, dst) in xs.chunks_exact(w.len()).zip(out.chunks_exact_mut(w.len())) {
                        ggml::rms_norm_row(src, w, *eps, dst);
                    }
                })?;
                Ok(Tensor::from_vec(out, x.shape(), x.device())?)
            }
        }
    }
}
