//! K-quant matrices multiplied in the layout they have in the file.
//!
//! On x86, Candle 0.11's `QMatMul` repacks Q4_K weights (and Q6_K ones, for more than one
//! activation row) into expanded tiles on first use and keeps the compact copy as well: resident
//! memory grows from the file's size to more than twice it, and every decode step streams the
//! expanded tiles. Candle's own compact kernels (`k_quants::matmul`: AVX2 dot products against
//! Q8_K activations, four weight rows at a time, row tiles for prefill) read the blocks as
//! stored; this calls them directly on the tensor's bytes, with no copy.

use std::sync::Arc;

use candle_core::quantized::k_quants::{self, BlockQ4K, BlockQ6K, GgmlType};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

pub struct Matrix {
    weights: Arc<QTensor>,
    rows: usize,
    cols: usize,
}

impl Matrix {
    /// A Q4_K or Q6_K matrix on the CPU; `None` for anything else.
    pub fn new(weights: Arc<QTensor>) -> Option<Self> {
        if !weights.device().is_cpu() || !matches!(weights.dtype(), GgmlDType::Q4K | GgmlDType::Q6K)
        {
            return None;
        }
        let (rows, cols) = weights.shape().dims2().ok()?;
        Some(Self {
            weights,
            rows,
            cols,
        })
    }

    /// `x · Wᵀ` over the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut shape = x.dims().to_vec();
        let k = *shape.last().expect("activations have a last dimension");
        if k != self.cols {
            candle_core::bail!(
                "matmul: activations of width {k} against {} columns",
                self.cols
            )
        }
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let m = xs.len() / k;
        let mut out = vec![0f32; m * self.rows];
        let bytes = self.weights.data()?;
        match self.weights.dtype() {
            GgmlDType::Q4K => run::<BlockQ4K>(&bytes, (m, k, self.rows), &xs, &mut out)?,
            GgmlDType::Q6K => run::<BlockQ6K>(&bytes, (m, k, self.rows), &xs, &mut out)?,
            other => candle_core::bail!("compact matmul: unexpected {other:?}"),
        }
        *shape.last_mut().expect("non-empty") = self.rows;
        Tensor::from_vec(out, shape, &Device::Cpu)
    }
}

fn run<T: GgmlType>(
    bytes: &[u8],
    mkn: (usize, usize, usize),
    lhs: &[f32],
    dst: &mut [f32],
) -> candle_core::Result<()> {
    let size = std::mem::size_of::<T>();
    if bytes.len() != mkn.2 * mkn.1 / T::BLCK_SIZE * size
        || (bytes.as_ptr() as usize) % std::mem::align_of::<T>() != 0
    {
        candle_core::bail!("compact matmul: the weights are not a whole, aligned block array")
    }
    // SAFETY: the bytes are the tensor's own block array (Candle stores a `Vec<T>`), checked
    // above for length and alignment, and live as long as `bytes`.
    let blocks =
        unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, bytes.len() / size) };
    k_quants::matmul(mkn, lhs, blocks, dst)
}
