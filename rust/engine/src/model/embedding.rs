//! The token embedding table.

use std::sync::Arc;

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::gguf::{GgufFile, Mapped};

/// The token embedding table. On the CPU its rows are dequantized straight from the mapped
/// file when looked up, so the table is not copied (215 MB of Q6_K on the 3B shape) and only
/// the rows in use are read; elsewhere, or when the tied output needs Candle's copy, Candle's
/// QTensor does the lookup.
pub enum Embedding {
    Candle(Arc<QTensor>),
    Mapped {
        bytes: Mapped,
        dtype: GgmlDType,
        row_bytes: usize,
        n_embd: usize,
    },
}

impl Embedding {
    pub fn mapped(gguf: &GgufFile, n_vocab: usize, n_embd: usize) -> Result<Self> {
        let name = "token_embd.weight";
        let (dtype, bytes) = gguf.tensor_bytes(name, &[n_vocab, n_embd])?;
        if !n_embd.is_multiple_of(dtype.block_size()) {
            return Err(Error::BadTensor {
                name: name.into(),
                reason: format!(
                    "rows of {n_embd} are not whole {dtype:?} blocks of {}",
                    dtype.block_size()
                ),
            });
        }
        let embd = Self::Mapped {
            row_bytes: n_embd / dtype.block_size() * dtype.type_size(),
            bytes,
            dtype,
            n_embd,
        };
        // A type Candle cannot read fails here, not at the first token.
        embd.lookup(&[0], &Device::Cpu)
            .map_err(|e| Error::BadTensor {
                name: name.into(),
                reason: e.to_string(),
            })?;
        Ok(embd)
    }

    /// `[ids.len(), n_embd]` float32 rows.
    pub fn lookup(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        match self {
            Self::Candle(t) => Ok(t.embedding(&Tensor::new(ids, device)?)?),
            Self::Mapped {
                bytes,
                dtype,
                row_bytes,
                n_embd,
            } => {
                let table: &[u8] = bytes.as_ref();
                let rows = ids
                    .iter()
                    .map(|&id| {
                        let start = id as usize * row_bytes;
                        let row = &table[start..start + row_bytes];
                        let q = qtensor_from_ggml(*dtype, row, vec![1, *n_embd], &Device::Cpu)?;
                        q.dequantize(&Device::Cpu)
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Ok(Tensor::cat(&rows, 0)?)
            }
        }
    }
}
