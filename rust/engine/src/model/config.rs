//! The model's hyper-parameters, read from the GGUF metadata and checked before anything is
//! allocated from them.

use super::Yarn;
use crate::error::{Error, Result};
use crate::gguf::GgufFile;

/// Hyper-parameters read from the GGUF metadata.
#[derive(Debug, Clone)]
pub struct Config {
    pub architecture: String,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_vocab: usize,
    pub n_ctx_train: usize,
    pub rope_freq_base: f32,
    /// Rotary scaling past the training window: the file's (`{arch}.rope.scaling.*`, as
    /// llama.cpp's converter writes transformers' `rope_scaling`), or a load option's.
    pub rope_scaling: Option<Yarn>,
    pub rms_eps: f64,
    /// `use_rope[i]` is false for the NoPE layers.
    pub use_rope: Vec<bool>,
    pub tied_embeddings: bool,
}

impl Config {
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let architecture = gguf.require_str("general.architecture")?.to_string();
        if architecture != "smollm3" && architecture != "llama" {
            return Err(Error::UnsupportedArchitecture(architecture));
        }
        let key = |k: &str| format!("{architecture}.{k}");
        let n_layer = gguf.require_usize(&key("block_count"))?;
        let n_embd = gguf.require_usize(&key("embedding_length"))?;
        let n_ff = gguf.require_usize(&key("feed_forward_length"))?;
        let n_head = gguf.require_usize(&key("attention.head_count"))?;
        let n_head_kv = gguf
            .get_usize(&key("attention.head_count_kv"))?
            .unwrap_or(n_head);
        let positive = |name: &str, v: usize| {
            if v == 0 {
                Err(Error::BadMetadata {
                    key: key(name),
                    reason: "must be positive".into(),
                })
            } else {
                Ok(v)
            }
        };
        positive("block_count", n_layer)?;
        // Every layer has its tensors: a count beyond what the file holds is no model, and
        // nothing may be allocated from it.
        if n_layer > gguf.tensor_names().count() {
            return Err(Error::BadMetadata {
                key: key("block_count"),
                reason: format!(
                    "{n_layer} layers, but the file has {} tensors",
                    gguf.tensor_names().count()
                ),
            });
        }
        positive("embedding_length", n_embd)?;
        positive("feed_forward_length", n_ff)?;
        positive("attention.head_count", n_head)?;
        positive("attention.head_count_kv", n_head_kv)?;
        if n_head % n_head_kv != 0 {
            return Err(Error::BadMetadata {
                key: key("attention.head_count_kv"),
                reason: format!("{n_head} heads are not a multiple of {n_head_kv} KV heads"),
            });
        }
        let head_dim = match gguf.get_usize(&key("attention.key_length"))? {
            Some(d) => d,
            None => {
                if n_embd % n_head != 0 {
                    return Err(Error::BadMetadata {
                        key: key("embedding_length"),
                        reason: format!("{n_embd} is not a multiple of {n_head} heads"),
                    });
                }
                n_embd / n_head
            }
        };
        if head_dim % 2 != 0 {
            return Err(Error::BadMetadata {
                key: key("attention.key_length"),
                reason: format!("head dimension {head_dim} must be even for RoPE"),
            });
        }
        if let Some(rope_dim) = gguf.get_usize(&key("rope.dimension_count"))? {
            if rope_dim != head_dim {
                return Err(Error::BadMetadata {
                    key: key("rope.dimension_count"),
                    reason: format!(
                        "partial rotary embeddings ({rope_dim} of {head_dim}) are not supported"
                    ),
                });
            }
        }
        let rope_freq_base = gguf.get_f32(&key("rope.freq_base"))?.unwrap_or(10_000.0);
        let rms_eps = gguf
            .get_f32(&key("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5) as f64;
        let n_ctx_train = gguf.get_usize(&key("context_length"))?.unwrap_or(2048);
        let n_vocab = match gguf.tensor_info("token_embd.weight") {
            Some((dims, _)) if dims.len() == 2 => dims[0],
            Some((dims, _)) => {
                return Err(Error::BadTensor {
                    name: "token_embd.weight".into(),
                    reason: format!("expected 2 dimensions, found {dims:?}"),
                })
            }
            None => {
                return Err(Error::BadTensor {
                    name: "token_embd.weight".into(),
                    reason: "missing from the file".into(),
                })
            }
        };
        let use_rope = Self::rope_layers(gguf, &architecture, n_layer)?;
        let rope_scaling = Self::rope_scaling(gguf, &architecture, n_ctx_train)?;
        Ok(Self {
            tied_embeddings: !gguf.has_tensor("output.weight"),
            architecture,
            n_layer,
            n_embd,
            n_ff,
            n_head,
            n_head_kv,
            head_dim,
            n_vocab,
            n_ctx_train,
            rope_freq_base,
            rope_scaling,
            rms_eps,
            use_rope,
        })
    }

    /// The most positions a context may have: the training window, or as far as YaRN reaches.
    pub fn max_context(&self) -> usize {
        self.rope_scaling
            .map_or(self.n_ctx_train, |y| y.context().max(self.n_ctx_train))
    }

    /// YaRN from the file's keys: `rope.scaling.type` "yarn" with its `factor`,
    /// `original_context_length` (default: the context length), `yarn_beta_fast`/`_slow`, and
    /// `attn_factor` (llama.cpp's multiplier of the default attention factor).
    fn rope_scaling(gguf: &GgufFile, arch: &str, n_ctx_train: usize) -> Result<Option<Yarn>> {
        let key = |k: &str| format!("{arch}.rope.scaling.{k}");
        let bad = |k: &str, reason: String| Error::BadMetadata {
            key: key(k),
            reason,
        };
        match gguf.get_str(&key("type"))? {
            None | Some("none") => return Ok(None),
            Some("yarn") => {}
            Some(other) => {
                return Err(bad(
                    "type",
                    format!("rope scaling {other:?} is not supported (\"yarn\" is)"),
                ))
            }
        }
        let factor = gguf
            .get_f32(&key("factor"))?
            .ok_or_else(|| bad("factor", "YaRN needs a factor".into()))?;
        let original = gguf
            .get_usize(&key("original_context_length"))?
            .unwrap_or(n_ctx_train);
        let attention = gguf
            .get_f32(&key("attn_factor"))?
            .map(|a| a * Yarn::default_attention_factor(factor));
        Yarn::new(
            factor,
            original,
            gguf.get_f32(&key("yarn_beta_fast"))?,
            gguf.get_f32(&key("yarn_beta_slow"))?,
            attention,
        )
        .map(Some)
        .map_err(|e| bad("factor", e.to_string()))
    }

    /// Which layers apply RoPE. A per-layer list in the file wins (`smollm3.no_rope_layers`,
    /// with transformers' meaning: 1 = the layer uses RoPE); otherwise SmolLM3 skips RoPE in
    /// every fourth layer, as llama.cpp hard-codes, and Llama uses it everywhere.
    fn rope_layers(gguf: &GgufFile, arch: &str, n_layer: usize) -> Result<Vec<bool>> {
        let list_key = format!("{arch}.no_rope_layers");
        if gguf.get(&list_key).is_some() {
            let list = gguf.require_array(&list_key)?;
            if list.len() != n_layer {
                return Err(Error::BadMetadata {
                    key: list_key,
                    reason: format!("has {} entries for {n_layer} layers", list.len()),
                });
            }
            return list
                .iter()
                .map(
                    |v| match v.to_u32().or_else(|_| v.to_i32().map(|x| x as u32)) {
                        Ok(x) => Ok(x != 0),
                        Err(e) => Err(Error::BadMetadata {
                            key: list_key.clone(),
                            reason: e.to_string(),
                        }),
                    },
                )
                .collect();
        }
        Ok((0..n_layer)
            .map(|i| arch != "smollm3" || (i + 1) % 4 != 0)
            .collect())
    }
}
