//! The weight matrices, behind one trait for every weight type. On the CPU, Q4_1, Q8_0, Q4_K
//! and Q6_K are multiplied by our kernels in place in the mapped file (Candle has no SIMD Q4_1
//! kernel, and keeps copies of the others); everything else, and every type on CUDA, goes
//! through Candle's `QMatMul`. Which one a matrix gets is decided when it is loaded.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::kernels::{compact, q4_1, q8_0, with_host_f32, Bytes};

/// A weight matrix `W` that multiplies activations: `x · Wᵀ` over their last dimension.
pub trait Linear: Send + Sync {
    fn forward(&self, x: &Tensor) -> Result<Tensor>;

    /// Whether a row's product is the same bits whatever the other rows multiplied with it
    /// (tested in the kernels' modules). The K-quant kernels are with AVX-512, where every
    /// product goes through ours; with AVX2 only, one row goes through Candle's (faster there),
    /// which sum in another order. Candle's kernels are not known to be.
    fn batch_invariant(&self) -> bool {
        false
    }
}

impl Linear for QMatMul {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(Module::forward(self, x)?)
    }
}

impl Linear for compact::Matrix {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(compact::Matrix::forward(self, x)?)
    }

    fn batch_invariant(&self) -> bool {
        compact::BATCH_INVARIANT
    }
}

impl Linear for q4_1::Matrix {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        in_place(x, self.rows(), |x, m, out| self.matmul(x, m, out))
    }

    fn batch_invariant(&self) -> bool {
        true
    }
}

impl Linear for q8_0::Matrix {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        in_place(x, self.rows(), |x, m, out| self.matmul(x, m, out))
    }

    fn batch_invariant(&self) -> bool {
        true
    }
}

/// `x · Wᵀ` over the last dimension of `x`, by a kernel that writes `[m, rows]` for `m` rows.
fn in_place(x: &Tensor, rows: usize, matmul: impl Fn(&[f32], usize, &mut [f32])) -> Result<Tensor> {
    let mut shape = x.dims().to_vec();
    let k = *shape.last().expect("activations have a last dimension");
    let m = x.elem_count() / k;
    let mut out = vec![0f32; m * rows];
    with_host_f32(x, |xs| matmul(xs, m, &mut out))?;
    *shape.last_mut().expect("non-empty") = rows;
    Ok(Tensor::from_vec(out, shape, x.device())?)
}

/// The matrix `name` of `shape`: multiplied in place in the mapped file when one of our
/// kernels takes its type on this device, else by Candle.
pub fn load(
    gguf: &GgufFile,
    name: &str,
    shape: &[usize],
    device: &Device,
) -> Result<Box<dyn Linear>> {
    match mapped(gguf, name, shape, device)? {
        Some(linear) => Ok(linear),
        None => Ok(Box::new(QMatMul::from_arc(Arc::new(
            gguf.tensor(name, shape, device)?,
        ))?)),
    }
}

/// The matrix multiplied in place in the mapped file, if one of our kernels takes its type on
/// this device.
pub fn mapped(
    gguf: &GgufFile,
    name: &str,
    shape: &[usize],
    device: &Device,
) -> Result<Option<Box<dyn Linear>>> {
    let (true, &[rows, cols]) = (device.is_cpu(), shape) else {
        return Ok(None);
    };
    let (dtype, bytes) = gguf.tensor_bytes(name, shape)?;
    let bytes: Bytes = Arc::new(bytes);
    fn boxed(m: impl Linear + 'static) -> Box<dyn Linear> {
        Box::new(m)
    }
    Ok(match dtype {
        GgmlDType::Q4_1 => q4_1::Matrix::new(bytes, rows, cols).map(boxed),
        GgmlDType::Q8_0 => q8_0::Matrix::new(bytes, rows, cols).map(boxed),
        GgmlDType::Q4K | GgmlDType::Q6K => {
            compact::Matrix::new(bytes, dtype, rows, cols).map(boxed)
        }
        _ => None,
    })
}

/// A table Candle holds (the tied output when no kernel of ours multiplies its type).
pub fn candle(t: Arc<QTensor>) -> Result<Box<dyn Linear>> {
    Ok(Box::new(QMatMul::from_arc(t)?))
}

/// Checks a tensor type up front so an unsupported one is named, not hit mid-load.
pub fn check_dtype(gguf: &GgufFile, name: &str) -> Result<()> {
    match gguf.tensor_info(name) {
        Some((_, GgmlDType::Q8_1)) => Err(Error::UnsupportedTensorType {
            path: gguf.path().to_path_buf(),
            reason: format!("tensor {name:?} is Q8_1, which Candle cannot multiply"),
        }),
        _ => Ok(()),
    }
}
