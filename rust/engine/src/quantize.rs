//! Re-quantizing a GGUF file (for instance an F32 or F16 export) to a llama.cpp quantization
//! mix. Used to make the K-quant test fixtures and the full-size benchmark model.

use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Device;

use crate::error::{Error, Result};
use crate::gguf::GgufFile;

/// A quantization mix: the type of the bulk of the weights and of the sensitive ones
/// (llama.cpp's `_M` mixes keep `attn_v`, `ffn_down` and the embeddings at higher precision).
#[derive(Debug, Clone, Copy)]
pub struct Mix {
    pub bulk: GgmlDType,
    pub sensitive: GgmlDType,
}

impl Mix {
    pub fn parse(name: &str) -> Result<Self> {
        let one = |t| Mix {
            bulk: t,
            sensitive: t,
        };
        Ok(match name.to_ascii_lowercase().as_str() {
            "f16" => one(GgmlDType::F16),
            "q8_0" => one(GgmlDType::Q8_0),
            "q4_0" => one(GgmlDType::Q4_0),
            "q4_1" => one(GgmlDType::Q4_1),
            "q5_0" => one(GgmlDType::Q5_0),
            "q5_1" => one(GgmlDType::Q5_1),
            "q2_k" => one(GgmlDType::Q2K),
            "q3_k" => one(GgmlDType::Q3K),
            "q4_k" => one(GgmlDType::Q4K),
            "q5_k" => one(GgmlDType::Q5K),
            "q6_k" => one(GgmlDType::Q6K),
            "q4_k_m" => Mix {
                bulk: GgmlDType::Q4K,
                sensitive: GgmlDType::Q6K,
            },
            "q5_k_m" => Mix {
                bulk: GgmlDType::Q5K,
                sensitive: GgmlDType::Q6K,
            },
            other => {
                return Err(Error::invalid(
                    "mix",
                    format!("unknown quantization {other:?} (try q8_0, q4_k_m, q6_k…)"),
                ))
            }
        })
    }

    fn for_tensor(&self, name: &str) -> GgmlDType {
        if name.contains("attn_v")
            || name.contains("ffn_down")
            || name.starts_with("token_embd")
            || name.starts_with("output.")
        {
            self.sensitive
        } else {
            self.bulk
        }
    }
}

/// Writes `dst`: `src`'s metadata and tensors, with every 2-D weight whose rows fit the
/// target block size quantized to the mix (others, like norms, stay as they were).
pub fn quantize_file(src: &Path, dst: &Path, mix: Mix) -> Result<()> {
    let gguf = GgufFile::open(src)?;
    let device = Device::Cpu;
    let mut names: Vec<String> = gguf.tensor_names().cloned().collect();
    names.sort();
    let mut tensors = Vec::with_capacity(names.len());
    for name in &names {
        let (shape, dtype) = gguf.tensor_info(name).expect("listed tensor");
        let q = gguf.tensor(name, &shape, &device)?;
        let target = mix.for_tensor(name);
        let fits = shape.len() == 2 && shape[1] % target.block_size() == 0;
        let q = if fits && dtype != target {
            QTensor::quantize(&q.dequantize(&device)?, target)?
        } else {
            q
        };
        tracing::debug!(name, ?target, "quantized");
        tensors.push(q);
    }
    let mut metadata: Vec<(&str, &gguf_file::Value)> = gguf
        .metadata()
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    metadata.sort_by_key(|(k, _)| *k);
    let file_type = gguf_file::Value::U32(match mix.bulk {
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q8_0 => 7,
        GgmlDType::Q5_0 => 8,
        GgmlDType::Q5_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K if mix.sensitive == GgmlDType::Q6K => 15,
        GgmlDType::Q4K => 14,
        GgmlDType::Q5K if mix.sensitive == GgmlDType::Q6K => 17,
        GgmlDType::Q5K => 16,
        GgmlDType::Q6K => 18,
        _ => 0,
    });
    metadata.retain(|(k, _)| *k != "general.file_type");
    metadata.push(("general.file_type", &file_type));
    let pairs: Vec<(&str, &QTensor)> = names
        .iter()
        .map(|n| n.as_str())
        .zip(tensors.iter())
        .collect();
    let tmp = dst.with_extension("gguf.part");
    let io = |source| Error::Io {
        path: tmp.clone(),
        source,
    };
    let file = std::fs::File::create(&tmp).map_err(io)?;
    let mut w = std::io::BufWriter::new(file);
    gguf_file::write(&mut w, &metadata, &pairs)?;
    std::io::Write::flush(&mut w).map_err(io)?;
    drop(w);
    std::fs::rename(&tmp, dst).map_err(io)?;
    Ok(())
}
