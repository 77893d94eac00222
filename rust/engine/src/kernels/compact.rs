//! K-quant matrices (Q4_K, Q6_K) multiplied in the layout they have in the file, in place in
//! its memory map.
//!
//! On x86, Candle 0.11's `QMatMul` repacks Q4_K weights (and Q6_K ones, for more than one
//! activation row) into expanded tiles on first use and keeps the compact copy as well: resident
//! memory grows from the file's size to more than twice it. Here products go through our
//! kernels ([`kquant`]), which unpack each weight block once for several activation rows (and,
//! with AVX-512, repack the weights 16 rows at a time into a cached panel for prompts), except
//! one activation row (decode) on a build with AVX2 but no AVX-512: that goes through
//! Candle's compact kernels (`k_quants::matmul`: ggml's AVX2 dot products against Q8_K
//! activations). Neither copies the weights.

use candle_core::quantized::k_quants::{self, BlockQ4K, BlockQ6K};
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};

use super::{as_blocks, kquant, with_host_f32, Bytes};

pub struct Matrix {
    bytes: Bytes,
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
}

impl Matrix {
    /// A Q4_K or Q6_K matrix `[rows, cols]` from its bytes as stored; `None` for another type
    /// or bytes that are not that matrix's block array.
    pub fn new(bytes: Bytes, dtype: GgmlDType, rows: usize, cols: usize) -> Option<Self> {
        if !cols.is_multiple_of(kquant::QK_K) {
            return None;
        }
        let n = rows * cols / kquant::QK_K;
        let ok = match dtype {
            GgmlDType::Q4K => as_blocks::<BlockQ4K>((*bytes).as_ref(), n).is_some(),
            GgmlDType::Q6K => as_blocks::<BlockQ6K>((*bytes).as_ref(), n).is_some(),
            _ => false,
        };
        ok.then_some(Self {
            bytes,
            dtype,
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
        let m = x.elem_count() / k;
        let mut out = vec![0f32; m * self.rows];
        let (bytes, n) = ((*self.bytes).as_ref(), self.rows * k / kquant::QK_K);
        let mkn = (m, k, self.rows);
        // One row (decode) with AVX2 only: Candle's kernels are ggml's AVX2 dot products, four
        // weight rows per call, and measured faster than ours there; ours share each unpacked
        // weight block between activation rows. With AVX-512 ours are faster for one row too
        // (docs/performance.md, kernel constants).
        let own = OWN_KERNELS && (m > 1 || kquant::AVX512);
        with_host_f32(x, |xs| {
            match self.dtype {
                GgmlDType::Q4K if own => kquant::matmul(
                    blocks::<kquant::BlockQ4K>(bytes, n),
                    self.rows,
                    k,
                    xs,
                    m,
                    &mut out,
                ),
                GgmlDType::Q6K if own => kquant::matmul(
                    blocks::<kquant::BlockQ6K>(bytes, n),
                    self.rows,
                    k,
                    xs,
                    m,
                    &mut out,
                ),
                GgmlDType::Q4K => {
                    k_quants::matmul(mkn, xs, blocks::<BlockQ4K>(bytes, n), &mut out)?
                }
                GgmlDType::Q6K => {
                    k_quants::matmul(mkn, xs, blocks::<BlockQ6K>(bytes, n), &mut out)?
                }
                other => candle_core::bail!("compact matmul: unexpected {other:?}"),
            }
            Ok(())
        })??;
        *shape.last_mut().expect("non-empty") = self.rows;
        Tensor::from_vec(out, shape, &Device::Cpu)
    }
}

/// Our kernels ([`kquant`]) where they have SIMD code; Candle's compact ones elsewhere.
const OWN_KERNELS: bool = cfg!(avx2);

/// Whether a row's product is the same bits whatever the other rows multiplied with it: where
/// every product goes through our kernels, which sum tiles and panels in one order (AVX-512).
pub const BATCH_INVARIANT: bool = OWN_KERNELS && kquant::AVX512;

fn blocks<T>(bytes: &[u8], n: usize) -> &[T] {
    as_blocks(bytes, n).expect("checked in Matrix::new")
}
