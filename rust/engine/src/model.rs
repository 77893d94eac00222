//! The SmolLM3 / Llama decoder over quantized GGUF weights.
//!
//! SmolLM3 is Llama with "NoPE" layers that skip rotary embeddings. The Q and K weights are kept
//! exactly as quantized in the file: llama.cpp's converter permuted them for the interleaved
//! rotary layout, so RoPE is applied interleaved (`rope_i`) rather than un-permuting them.

use std::sync::Arc;

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Storage, Tensor};

use crate::error::{Error, Result};
use crate::gguf::{GgufFile, Mapped};
use crate::kernels::{attention, compact, ggml, q4_1, q8_0, with_host_f32, Bytes};

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
            rms_eps,
            use_rope,
        })
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

/// Checks a tensor type up front so an unsupported one is named, not hit mid-load.
fn check_dtype(gguf: &GgufFile, name: &str) -> Result<()> {
    match gguf.tensor_info(name) {
        Some((_, GgmlDType::Q8_1)) => Err(Error::UnsupportedTensorType {
            path: gguf.path().to_path_buf(),
            reason: format!("tensor {name:?} is Q8_1, which Candle cannot multiply"),
        }),
        _ => Ok(()),
    }
}

/// A weight matrix. On the CPU, Q4_1, Q8_0, Q4_K and Q6_K are multiplied by our kernels in
/// place in the mapped file (Candle has no SIMD Q4_1 kernel, and keeps copies of the others);
/// everything else, and every type on CUDA, through Candle's `QMatMul`.
enum Linear {
    Candle(QMatMul),
    Q4_1(q4_1::Matrix),
    Q8_0(q8_0::Matrix),
    Compact(compact::Matrix),
}

impl Linear {
    /// The matrix multiplied in place in the mapped file, if one of our kernels takes its type
    /// on this device.
    fn mapped(
        gguf: &GgufFile,
        name: &str,
        shape: &[usize],
        device: &Device,
    ) -> Result<Option<Self>> {
        let (true, &[rows, cols]) = (device.is_cpu(), shape) else {
            return Ok(None);
        };
        let (dtype, bytes) = gguf.tensor_bytes(name, shape)?;
        let bytes: Bytes = Arc::new(bytes);
        Ok(match dtype {
            GgmlDType::Q4_1 => q4_1::Matrix::new(bytes, rows, cols).map(Self::Q4_1),
            GgmlDType::Q8_0 => q8_0::Matrix::new(bytes, rows, cols).map(Self::Q8_0),
            GgmlDType::Q4K | GgmlDType::Q6K => {
                compact::Matrix::new(bytes, dtype, rows, cols).map(Self::Compact)
            }
            _ => None,
        })
    }

    /// Whether a row's product is the same bits whatever the other rows multiplied with it
    /// (tested in the kernels' modules). The K-quant kernels are not: prompts go through
    /// panels that sum in another order than decode's tiles. Candle's kernels are not known to.
    fn batch_invariant(&self) -> bool {
        matches!(self, Self::Q4_1(_) | Self::Q8_0(_))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Candle(m) => Ok(m.forward(x)?),
            Self::Compact(m) => Ok(m.forward(x)?),
            Self::Q4_1(w) => in_place(x, w.rows(), |x, m, out| w.matmul(x, m, out)),
            Self::Q8_0(w) => in_place(x, w.rows(), |x, m, out| w.matmul(x, m, out)),
        }
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

fn qmm(gguf: &GgufFile, name: &str, shape: &[usize], device: &Device) -> Result<Linear> {
    match Linear::mapped(gguf, name, shape, device)? {
        Some(linear) => Ok(linear),
        None => Ok(Linear::Candle(QMatMul::from_arc(Arc::new(
            gguf.tensor(name, shape, device)?,
        ))?)),
    }
}

/// RMSNorm with its weight. On the CPU it is computed as llama.cpp does (squares summed in
/// f64, `x * (1 / sqrt(mean + eps)) * w` in f32), not as Candle's (an f32 sum, `x / rms * w`):
/// SmolLM2 and SmolLM3 carry activations in the tens of thousands in some dimensions, where an
/// f32 sum of squares is off in its fifth digit, and that is enough to move many of the next
/// product's Q8 activation roundings (about 0.2 logits on average at the output).
struct RmsNorm {
    weight: Tensor,
    host: Option<Vec<f32>>,
    eps: f32,
}

impl RmsNorm {
    fn load(gguf: &GgufFile, name: &str, n: usize, eps: f64, device: &Device) -> Result<Self> {
        let weight = gguf.tensor(name, &[n], device)?.dequantize(device)?;
        let host = if device.is_cpu() {
            Some(weight.to_vec1::<f32>()?)
        } else {
            None
        };
        Ok(Self {
            weight,
            host,
            eps: eps as f32,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let Some(w) = &self.host else {
            return Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps)?);
        };
        let mut out = vec![0f32; x.elem_count()];
        with_host_f32(x, |xs| {
            for (src, dst) in xs.chunks_exact(w.len()).zip(out.chunks_exact_mut(w.len())) {
                ggml::rms_norm_row(src, w, self.eps, dst);
            }
        })?;
        Ok(Tensor::from_vec(out, x.shape(), x.device())?)
    }
}

/// The token embedding table. On the CPU its rows are dequantized straight from the mapped
/// file when looked up, so the table is not copied (215 MB of Q6_K on the 3B shape) and only
/// the rows in use are read; elsewhere, or when the tied output needs Candle's copy, Candle's
/// QTensor does the lookup.
enum Embedding {
    Candle(Arc<QTensor>),
    Mapped {
        bytes: Mapped,
        dtype: GgmlDType,
        row_bytes: usize,
        n_embd: usize,
    },
}

impl Embedding {
    fn mapped(gguf: &GgufFile, n_vocab: usize, n_embd: usize) -> Result<Self> {
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
    fn lookup(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
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

struct Layer {
    attn_norm: RmsNorm,
    attn_q: Linear,
    attn_k: Linear,
    attn_v: Linear,
    attn_o: Linear,
    ffn_norm: RmsNorm,
    ffn_gate: Linear,
    ffn_up: Linear,
    ffn_down: Linear,
    use_rope: bool,
}

/// One sequence's share of a batched step: new tokens, after what its cache holds.
pub struct BatchItem<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
}

/// Where an item's rows sit in a batched step, and its positions' mask and RoPE tables.
struct Part {
    offset: usize,
    /// Positions the cache held before these rows.
    pos: usize,
    seq: usize,
    mask: Option<Tensor>,
    cos: Tensor,
    sin: Tensor,
}

/// The key/value cache of one sequence: per layer, keys and values `[1, kv_heads, capacity,
/// head_dim]`, of which the first `len` positions are filled. Its storage is allocated at the
/// size of the first rows written (a prompt, or its first chunk) and grows by a quarter when
/// full, never beyond the context: growth copies the cache, so growing geometrically keeps the
/// copying to a few times the final size while leaving at most a fifth of the storage empty.
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    n_layer: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    device: Device,
    len: usize,
    capacity: usize,
    n_ctx: usize,
}

/// Positions a cache grows by at least.
const KV_MIN_GROWTH: usize = 16;

impl KvCache {
    /// A cache with no layers, standing in for one that was moved out.
    pub fn empty() -> Self {
        Self {
            layers: Vec::new(),
            n_layer: 0,
            kv_heads: 0,
            head_dim: 0,
            dtype: DType::F32,
            device: Device::Cpu,
            len: 0,
            capacity: 0,
            n_ctx: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets the positions and frees the storage.
    pub fn clear(&mut self) {
        self.layers.clear();
        self.len = 0;
        self.capacity = 0;
    }

    /// Bytes allocated for keys and values (at least `len` positions' worth).
    pub fn bytes(&self) -> usize {
        self.bytes_per_position() * self.capacity
    }

    /// Storage for `n` positions at least, the filled ones copied over.
    fn reserve(&mut self, n: usize) -> Result<()> {
        if n <= self.capacity {
            return Ok(());
        }
        let grown = self.capacity + (self.capacity / 4).max(KV_MIN_GROWTH);
        let capacity = if self.capacity == 0 { n } else { n.max(grown) }.min(self.n_ctx.max(n));
        let shape = (1, self.kv_heads, capacity, self.head_dim);
        for l in 0..self.n_layer {
            match self.layers.get_mut(l) {
                // Layer by layer, so that growing holds one layer twice, not the whole cache.
                Some((k, v)) => {
                    *k = moved_to(k, self.len, capacity)?;
                    *v = moved_to(v, self.len, capacity)?;
                }
                None => self.layers.push((
                    Tensor::zeros(shape, self.dtype, &self.device)?,
                    Tensor::zeros(shape, self.dtype, &self.device)?,
                )),
            }
        }
        self.capacity = capacity;
        Ok(())
    }

    /// Writes layer `l`'s keys and values (`[1, kv_heads, seq, head_dim]`) after the filled
    /// positions (storage reserved for them), and returns its storage.
    fn write(&mut self, l: usize, k: &Tensor, v: &Tensor) -> Result<&(Tensor, Tensor)> {
        let (kc, vc) = &self.layers[l];
        kc.slice_set(&k.to_dtype(self.dtype)?, 2, self.len)?;
        vc.slice_set(&v.to_dtype(self.dtype)?, 2, self.len)?;
        Ok(&self.layers[l])
    }

    /// The first `n` positions in storage of exactly that size: this cache's own storage when
    /// it is that size already, else a copy made layer by layer, each layer's old storage freed
    /// once it is copied, so that cutting holds one layer twice, not the whole cache.
    pub fn into_prefix(mut self, n: usize) -> Result<KvCache> {
        self.check_filled(n)?;
        if n != self.capacity {
            self.layers = if n == 0 {
                Vec::new() // no storage until something is written
            } else {
                std::mem::take(&mut self.layers)
                    .into_iter()
                    .map(|(k, v)| Ok((moved_to(&k, n, n)?, moved_to(&v, n, n)?)))
                    .collect::<Result<_>>()?
            };
            self.capacity = n;
        }
        self.len = n;
        Ok(self)
    }

    /// A separate cache (storage of its own) holding the first `n` positions of this one, with
    /// room for `room` positions (at least `n`, at most the context), so that a request reusing
    /// them as the start of a longer prompt does not copy them a second time to grow.
    pub fn prefix(&self, n: usize, room: usize) -> Result<KvCache> {
        self.check_filled(n)?;
        let (layers, capacity) = if n == 0 {
            (Vec::new(), 0) // no storage until something is written
        } else {
            let capacity = room.min(self.n_ctx).max(n);
            let layers = self
                .layers
                .iter()
                .map(|(k, v)| Ok((moved_to(k, n, capacity)?, moved_to(v, n, capacity)?)))
                .collect::<Result<_>>()?;
            (layers, capacity)
        };
        Ok(KvCache {
            layers,
            device: self.device.clone(),
            len: n,
            capacity,
            ..*self
        })
    }

    fn check_filled(&self, n: usize) -> Result<()> {
        if n > self.len {
            return Err(Error::Inference(format!(
                "cannot copy {n} positions of a cache holding {}",
                self.len
            )));
        }
        Ok(())
    }

    /// Bytes one position takes in every layer's keys and values.
    pub fn bytes_per_position(&self) -> usize {
        self.n_layer * 2 * self.kv_heads * self.head_dim * self.dtype.size_in_bytes()
    }
}

/// The first `filled` positions of `t` (`[1, kv_heads, positions, head_dim]`) in new storage
/// for `capacity` positions (at least `filled`), the rest zero. Head by head: a head's first
/// positions are one contiguous run in both tensors, so each is copied once, and the new
/// storage never holds more than `capacity` positions.
fn moved_to(t: &Tensor, filled: usize, capacity: usize) -> Result<Tensor> {
    let (b, heads, _, head_dim) = t.dims4()?;
    let out = Tensor::zeros((b, heads, capacity, head_dim), t.dtype(), t.device())?;
    if filled > 0 {
        for h in 0..heads {
            let src = t.narrow(1, h, 1)?.narrow(2, 0, filled)?;
            out.narrow(1, h, 1)?.slice_set(&src, 2, 0)?;
        }
    }
    Ok(out)
}

pub struct Model {
    cfg: Config,
    device: Device,
    /// Storage type of the KV cache: F32 (default) or F16, which halves its memory; attention
    /// then sees F16-rounded queries, keys, values and probabilities, with F32 accumulation.
    kv_dtype: DType,
    n_ctx: usize,
    tok_embd: Embedding,
    layers: Vec<Layer>,
    output_norm: RmsNorm,
    output: Linear,
    cos: Tensor,
    sin: Tensor,
    /// See [`Model::batch_invariant`].
    batch_invariant: bool,
}

impl Layer {
    fn linears(&self) -> [&Linear; 7] {
        [
            &self.attn_q,
            &self.attn_k,
            &self.attn_v,
            &self.attn_o,
            &self.ffn_gate,
            &self.ffn_up,
            &self.ffn_down,
        ]
    }
}

impl Model {
    /// Builds the decoder from an opened GGUF file. `n_ctx` caps the context (default: the
    /// training context from the file).
    pub fn load(
        gguf: &GgufFile,
        device: &Device,
        n_ctx: Option<usize>,
        kv_dtype: Option<DType>,
    ) -> Result<Self> {
        let cfg = Config::from_gguf(gguf)?;
        let names: Vec<String> = gguf.tensor_names().cloned().collect();
        for name in &names {
            check_dtype(gguf, name)?;
        }
        let n_ctx = match n_ctx {
            Some(0) => return Err(Error::invalid("n_ctx", "must be positive")),
            Some(n) => n,
            None => cfg.n_ctx_train,
        };
        let (e, hd) = (cfg.n_embd, cfg.head_dim);
        let (q_dim, kv_dim) = (cfg.n_head * hd, cfg.n_head_kv * hd);

        let kv_dtype = kv_dtype.unwrap_or(DType::F32);
        if !matches!(kv_dtype, DType::F32 | DType::F16) {
            return Err(Error::invalid(
                "kv_cache_dtype",
                format!("{kv_dtype:?} (use f16 or f32)"),
            ));
        }
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let p = |s: &str| format!("blk.{i}.{s}.weight");
            layers.push(Layer {
                attn_norm: RmsNorm::load(gguf, &p("attn_norm"), e, cfg.rms_eps, device)?,
                attn_q: qmm(gguf, &p("attn_q"), &[q_dim, e], device)?,
                attn_k: qmm(gguf, &p("attn_k"), &[kv_dim, e], device)?,
                attn_v: qmm(gguf, &p("attn_v"), &[kv_dim, e], device)?,
                attn_o: qmm(gguf, &p("attn_output"), &[e, q_dim], device)?,
                ffn_norm: RmsNorm::load(gguf, &p("ffn_norm"), e, cfg.rms_eps, device)?,
                ffn_gate: qmm(gguf, &p("ffn_gate"), &[cfg.n_ff, e], device)?,
                ffn_up: qmm(gguf, &p("ffn_up"), &[cfg.n_ff, e], device)?,
                ffn_down: qmm(gguf, &p("ffn_down"), &[e, cfg.n_ff], device)?,
                use_rope: cfg.use_rope[i],
            });
        }
        let output_norm = RmsNorm::load(gguf, "output_norm.weight", e, cfg.rms_eps, device)?;
        let embd_shape = [cfg.n_vocab, e];
        let (tok_embd, output) = if cfg.tied_embeddings {
            // One copy of the table at most: the output matrix is the mapped file's blocks when
            // a kernel multiplies them, and the lookups read them too; otherwise both share
            // Candle's copy.
            match Linear::mapped(gguf, "token_embd.weight", &embd_shape, device)? {
                Some(linear) => (Embedding::mapped(gguf, cfg.n_vocab, e)?, linear),
                None => {
                    let t = Arc::new(gguf.tensor("token_embd.weight", &embd_shape, device)?);
                    (
                        Embedding::Candle(t.clone()),
                        Linear::Candle(QMatMul::from_arc(t)?),
                    )
                }
            }
        } else {
            let output = qmm(gguf, "output.weight", &embd_shape, device)?;
            let embd = if device.is_cpu() {
                Embedding::mapped(gguf, cfg.n_vocab, e)?
            } else {
                Embedding::Candle(Arc::new(gguf.tensor(
                    "token_embd.weight",
                    &embd_shape,
                    device,
                )?))
            };
            (embd, output)
        };
        let (cos, sin) = rope_tables(&cfg, n_ctx, device)?;
        let batch_invariant = device.is_cpu()
            && kv_dtype == DType::F32
            && layers
                .iter()
                .all(|l| l.linears().iter().all(|m| m.batch_invariant()));
        tracing::info!(
            arch = %cfg.architecture,
            layers = cfg.n_layer,
            hidden = cfg.n_embd,
            heads = cfg.n_head,
            kv_heads = cfg.n_head_kv,
            vocab = cfg.n_vocab,
            n_ctx,
            "model loaded"
        );
        Ok(Self {
            cfg,
            device: device.clone(),
            kv_dtype,
            n_ctx,
            tok_embd,
            layers,
            output_norm,
            output,
            cos,
            sin,
            batch_invariant,
        })
    }

    /// Whether a position's keys and values are the same bits however they were computed: as
    /// a prompt row or as a generated token fed back, alone or beside other sequences, in
    /// whichever chunk of a prompt. True on the CPU with an F32 cache when every layer's
    /// products are batch-invariant (Q4_1, Q8_0): the generated tokens' state can then be kept
    /// and reused as exactly what a cold start computes for them.
    pub fn batch_invariant(&self) -> bool {
        self.batch_invariant
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    pub fn kv_dtype(&self) -> DType {
        self.kv_dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// "cpu" or "cuda:N".
    pub fn device_name(&self) -> String {
        match self.device.location() {
            candle_core::DeviceLocation::Cpu => "cpu".into(),
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
        }
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache {
            n_layer: self.cfg.n_layer,
            kv_heads: self.cfg.n_head_kv,
            head_dim: self.cfg.head_dim,
            dtype: self.kv_dtype,
            device: self.device.clone(),
            n_ctx: self.n_ctx,
            ..KvCache::empty()
        }
    }

    /// Runs `tokens` after what `cache` holds and returns float32 logits: `[n_vocab]` for the
    /// last position, or `[tokens.len(), n_vocab]` with `all_logits`.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, all_logits: bool) -> Result<Tensor> {
        let item = BatchItem { tokens, cache };
        let logits = self.run(&mut [item], all_logits)?;
        Ok(if all_logits {
            logits
        } else {
            logits.squeeze(0)?
        })
    }

    /// One step for several sequences at once: every item's new tokens go through the linear
    /// layers together, as rows of one matrix (the weights are read once for all of them);
    /// attention runs per sequence, against its own cache and at its own positions. Returns
    /// each item's float32 logits for its last position, `[n_vocab]`, in order.
    pub fn forward_batch(&self, items: &mut [BatchItem<'_>]) -> Result<Vec<Tensor>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let logits = self.run(items, false)?;
        (0..items.len()).map(|i| Ok(logits.get(i)?)).collect()
    }

    /// Logits `[rows, n_vocab]`: every position of every item with `all_logits`, else the last
    /// position of each item.
    fn run(&self, items: &mut [BatchItem<'_>], all_logits: bool) -> Result<Tensor> {
        let mut ids = Vec::new();
        let mut parts = Vec::with_capacity(items.len());
        for item in items.iter() {
            let (seq, pos) = (item.tokens.len(), item.cache.len);
            if seq == 0 {
                return Err(Error::invalid("tokens", "empty input"));
            }
            if pos + seq > self.n_ctx {
                return Err(Error::ContextOverflow {
                    n_prompt: pos + seq,
                    n_ctx: self.n_ctx,
                });
            }
            if let Some(&bad) = item
                .tokens
                .iter()
                .find(|&&t| t as usize >= self.cfg.n_vocab)
            {
                return Err(Error::invalid(
                    "tokens",
                    format!(
                        "token id {bad} is outside the vocabulary of {}",
                        self.cfg.n_vocab
                    ),
                ));
            }
            parts.push(Part {
                offset: ids.len(),
                pos,
                seq,
                // Our CPU attention masks as it goes; a mask would be `seq × (pos + seq)` floats.
                mask: if seq > 1 && !self.attends_on_cpu() {
                    Some(self.causal_mask(seq, pos)?)
                } else {
                    None
                },
                cos: self.cos.narrow(0, pos, seq)?,
                sin: self.sin.narrow(0, pos, seq)?,
            });
            ids.extend_from_slice(item.tokens);
        }
        for (part, item) in parts.iter().zip(items.iter_mut()) {
            item.cache.reserve(part.pos + part.seq)?;
        }
        let n_rows = ids.len();
        let mut x = self.tok_embd.lookup(&ids, &self.device)?.unsqueeze(0)?; // [1, rows, e]
        for (l, layer) in self.layers.iter().enumerate() {
            // Each step's activations are dropped as soon as the next is computed: for a
            // 512-token prompt they are megabytes each (on the 3B shape the MLP's are 22 MB).
            let y = {
                let (q, k, v) = {
                    let h = layer.attn_norm.forward(&x)?;
                    (
                        layer.attn_q.forward(&h)?,
                        layer.attn_k.forward(&h)?,
                        layer.attn_v.forward(&h)?,
                    )
                };
                let mut ys = Vec::with_capacity(parts.len());
                for (part, item) in parts.iter().zip(items.iter_mut()) {
                    let rows = |t: &Tensor| t.narrow(1, part.offset, part.seq);
                    ys.push(self.attention(
                        layer,
                        (&rows(&q)?, &rows(&k)?, &rows(&v)?),
                        item.cache,
                        l,
                        part,
                    )?);
                }
                if ys.len() == 1 {
                    ys.pop().expect("one part")
                } else {
                    Tensor::cat(&ys, 1)?
                }
            };
            x = (x + layer.attn_o.forward(&y)?)?;
            drop(y);
            let act = {
                let h = layer.ffn_norm.forward(&x)?;
                let gate = layer.ffn_gate.forward(&h)?;
                let up = layer.ffn_up.forward(&h)?;
                drop(h);
                self.swiglu(&gate, &up)?
            };
            x = (x + layer.ffn_down.forward(&act)?)?;
        }
        for (part, item) in parts.iter().zip(items.iter_mut()) {
            item.cache.len += part.seq;
        }
        let x = x.squeeze(0)?;
        let x = if all_logits {
            x
        } else if parts.len() == 1 {
            x.narrow(0, n_rows - 1, 1)?
        } else {
            let last: Vec<u32> = parts
                .iter()
                .map(|p| (p.offset + p.seq - 1) as u32)
                .collect();
            let last = Tensor::new(last, &self.device)?;
            x.index_select(&last, 0)?
        };
        let x = self.output_norm.forward(&x)?;
        Ok(self.output.forward(&x)?.to_dtype(DType::F32)?)
    }

    /// Attention of one sequence's new rows (`[1, seq, heads * head_dim]` projections) against
    /// its cache, which it extends.
    fn attention(
        &self,
        layer: &Layer,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        cache: &mut KvCache,
        l: usize,
        part: &Part,
    ) -> Result<Tensor> {
        let seq = part.seq;
        let (nh, nkv, hd) = (self.cfg.n_head, self.cfg.n_head_kv, self.cfg.head_dim);
        if self.attends_on_cpu() {
            return self.attention_cpu(layer, (q, k, v), cache, l, part);
        }
        let q = q.reshape((1, seq, nh, hd))?.transpose(1, 2)?.contiguous()?;
        let k = k
            .reshape((1, seq, nkv, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let v = v
            .reshape((1, seq, nkv, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let (q, k) = if layer.use_rope {
            (
                candle_nn::rotary_emb::rope_i(&q, &part.cos, &part.sin)?,
                candle_nn::rotary_emb::rope_i(&k, &part.cos, &part.sin)?,
            )
        } else {
            (q, k)
        };
        let half = self.kv_dtype == DType::F16;
        let total = part.pos + seq;
        let (k, v) = cache.write(l, &k, &v)?;
        let (k, v) = (k.narrow(2, 0, total)?, v.narrow(2, 0, total)?);
        let (k, v) = (k.to_dtype(DType::F32)?, v.to_dtype(DType::F32)?); // [1, nkv, total, hd]
        let q = if half { round_f16(&q)? } else { q };
        // Grouped-query attention without copying K/V: the query heads that share a KV head
        // are stacked along the row axis, [nkv, rep * seq, hd] against [nkv, total, hd].
        let rep = nh / nkv;
        let q = (q.reshape((nkv, rep * seq, hd))? * (1.0 / (hd as f64).sqrt()))?;
        let k = k.squeeze(0)?.contiguous()?;
        let v = v.squeeze(0)?.contiguous()?;
        let mut att = q.matmul(&k.t()?)?; // [nkv, rep * seq, total]
        if let Some(mask) = &part.mask {
            let mask = mask.repeat((rep, 1))?; // [rep * seq, total]
            att = att.broadcast_add(&mask)?;
        }
        let mut att = candle_nn::ops::softmax_last_dim(&att)?;
        if half {
            att = round_f16(&att)?;
        }
        let y = att.matmul(&v)?; // [nkv, rep * seq, hd]
        Ok(y.reshape((1, nh, seq, hd))?
            .transpose(1, 2)?
            .reshape((1, seq, nh * hd))?)
    }

    /// `silu(gate) * up`; on the CPU as llama.cpp computes it ([`ggml::swiglu`]).
    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        if !self.device.is_cpu() {
            return Ok((candle_nn::ops::silu(gate)? * up)?);
        }
        let mut y = vec![0f32; gate.elem_count()];
        let width = *gate.dims().last().expect("[.., ffn]");
        with_host_f32(gate, |g| {
            with_host_f32(up, |u| ggml::swiglu_rows(g, u, width, &mut y))
        })??;
        Ok(Tensor::from_vec(y, gate.shape(), gate.device())?)
    }

    /// Whether attention runs in [`Self::attention_cpu`].
    fn attends_on_cpu(&self) -> bool {
        self.device.is_cpu() && self.kv_dtype == DType::F32
    }

    /// [`Self::attention`] on the CPU with an F32 cache: llama.cpp's arithmetic
    /// ([`attention`]), reading the cache in place.
    fn attention_cpu(
        &self,
        layer: &Layer,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        cache: &mut KvCache,
        l: usize,
        part: &Part,
    ) -> Result<Tensor> {
        let (seq, pos) = (part.seq, part.pos);
        let (nh, nkv, hd) = (self.cfg.n_head, self.cfg.n_head_kv, self.cfg.head_dim);
        let mut qs = q.flatten_all()?.to_vec1::<f32>()?; // [seq, nh, hd]
        let mut ks = k.flatten_all()?.to_vec1::<f32>()?; // [seq, nkv, hd]
        if layer.use_rope {
            let cos = part.cos.flatten_all()?.to_vec1::<f32>()?;
            let sin = part.sin.flatten_all()?.to_vec1::<f32>()?;
            attention::rope(&mut qs, hd, &cos, &sin);
            attention::rope(&mut ks, hd, &cos, &sin);
        }
        let heads_first = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((1, seq, nkv, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let k = heads_first(Tensor::from_vec(ks, (1, seq, nkv * hd), &self.device)?)?;
        let (k_all, v_all) = cache.write(l, &k, &heads_first(v.clone())?)?;
        let dims = attention::Dims {
            n_head: nh,
            n_head_kv: nkv,
            head_dim: hd,
            pos,
            seq,
            capacity: k_all.dim(2)?,
        };
        let scale = 1.0 / (hd as f32).sqrt();
        let out = {
            let (ks, kl) = k_all.storage_and_layout();
            let (vs, vl) = v_all.storage_and_layout();
            let (Storage::Cpu(kc), Storage::Cpu(vc)) = (&*ks, &*vs) else {
                return Err(Error::Inference("the CPU cache is not in memory".into()));
            };
            let (kc, vc) = (kc.as_slice::<f32>()?, vc.as_slice::<f32>()?);
            attention::attend(
                &qs,
                &kc[kl.start_offset()..],
                &vc[vl.start_offset()..],
                dims,
                scale,
            )
        };
        Ok(Tensor::from_vec(out, (1, seq, nh * hd), &self.device)?)
    }

    /// `[seq, pos + seq]`: 0 where row `i` may attend, -inf after position `pos + i`.
    fn causal_mask(&self, seq: usize, pos: usize) -> Result<Tensor> {
        let total = pos + seq;
        let mask: Vec<f32> = (0..seq)
            .flat_map(|i| {
                (0..total).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 })
            })
            .collect();
        Ok(Tensor::from_vec(mask, (seq, total), &self.device)?)
    }
}

fn round_f16(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F16)?.to_dtype(DType::F32)?)
}

fn rope_tables(cfg: &Config, n_ctx: usize, device: &Device) -> Result<(Tensor, Tensor)> {
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
    Ok((
        Tensor::from_vec(cos, (n_ctx, half), device)?,
        Tensor::from_vec(sin, (n_ctx, half), device)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` positions of keys for `heads` heads of 4 values, numbered from `start` (values the
    /// same).
    fn rows(start: usize, n: usize, heads: usize) -> Tensor {
        let v: Vec<f32> = (0..heads * n * 4)
            .map(|i| (start * heads * 4 + i) as f32)
            .collect();
        Tensor::from_vec(v, (1, n, heads, 4), &Device::Cpu)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    }

    /// An empty cache of `n_layer` layers of 2 heads of 4 values (the shape [`rows`] makes).
    fn cache(n_layer: usize, n_ctx: usize) -> KvCache {
        KvCache {
            n_layer,
            kv_heads: 2,
            head_dim: 4,
            n_ctx,
            ..KvCache::empty()
        }
    }

    fn append(c: &mut KvCache, n: usize) {
        c.reserve(c.len + n).unwrap();
        for l in 0..c.n_layer {
            let r = rows(c.len, n, c.kv_heads);
            c.write(l, &r, &r).unwrap();
        }
        c.len += n;
    }

    fn filled(c: &KvCache, l: usize) -> Vec<f32> {
        let (k, v) = &c.layers[l];
        let k = k.narrow(2, 0, c.len).unwrap().flatten_all().unwrap();
        assert_eq!(
            k.to_vec1::<f32>().unwrap(),
            v.narrow(2, 0, c.len)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
        k.to_vec1().unwrap()
    }

    #[test]
    fn cache_grows_by_a_quarter_and_keeps_its_positions() {
        let mut c = cache(2, 100);
        append(&mut c, 10);
        assert_eq!(c.capacity, 10, "the first rows are stored exactly");
        append(&mut c, 1);
        assert_eq!(c.capacity, 26, "at least 16 more");
        append(&mut c, 20);
        assert_eq!(c.capacity, 42);
        for _ in 0..69 {
            append(&mut c, 1);
        }
        assert_eq!((c.len, c.capacity), (100, 100), "never beyond the context");
        assert_eq!(c.bytes(), 2 * 2 * 2 * 4 * 100 * 4);
        let want = filled(&c, 0);
        assert_eq!(filled(&c, 1), want);
        // Position p of head h holds p * 8 + h * 4 + (0..4), whichever growth it came in.
        for h in 0..2 {
            for p in 0..100 {
                let at = (h * 100 + p) * 4;
                assert_eq!(want[at], (p * 8 + h * 4) as f32, "head {h} position {p}");
            }
        }
        let kept = c.prefix(40, 40).unwrap();
        assert_eq!((kept.len, kept.capacity), (40, 40));
        let first = filled(&kept, 1);
        for h in 0..2 {
            assert_eq!(first[h * 40 * 4..][..160], want[h * 100 * 4..][..160]);
        }
        let moved = kept.into_prefix(40).unwrap();
        assert_eq!(moved.capacity, 40);
        assert!(c.prefix(101, 101).is_err());

        // Room for a longer prompt: the same positions, and no growth until it is filled.
        let mut roomy = moved.prefix(30, 60).unwrap();
        assert_eq!((roomy.len, roomy.capacity), (30, 60));
        assert_eq!(filled(&roomy, 0), filled(&moved.prefix(30, 30).unwrap(), 0));
        append(&mut roomy, 30);
        assert_eq!(roomy.capacity, 60, "filled within its room, not grown");

        // Cutting a cache layer by layer keeps its first positions.
        let cut = c.prefix(100, 100).unwrap().into_prefix(70).unwrap();
        assert_eq!((cut.len, cut.capacity), (70, 70));
        assert_eq!(filled(&cut, 1)[..70 * 4], want[..70 * 4]);
    }

    #[test]
    fn a_cut_cache_holds_storage_of_its_size() {
        // With one KV head the first positions of a layer are a contiguous view of all of its
        // storage; the cut must still be storage of its own size.
        for heads in [1, 2] {
            let mut c = KvCache {
                kv_heads: heads,
                ..cache(1, 64)
            };
            append(&mut c, 40);
            let before = filled(&c, 0);
            let cut = c.into_prefix(30).unwrap();
            let (k, _) = &cut.layers[0];
            let (storage, _) = k.storage_and_layout();
            let Storage::Cpu(cpu) = &*storage else {
                unreachable!("a CPU test")
            };
            assert_eq!(
                cpu.as_slice::<f32>().unwrap().len(),
                heads * 30 * 4,
                "{heads} heads"
            );
            let kept = filled(&cut, 0);
            for h in 0..heads {
                assert_eq!(
                    kept[h * 30 * 4..(h + 1) * 30 * 4],
                    before[h * 40 * 4..h * 40 * 4 + 30 * 4],
                    "{heads} heads, head {h}"
                );
            }
        }
    }

    #[test]
    fn a_prefix_copy_never_shares_storage() {
        let mut c = cache(1, 8);
        append(&mut c, 8);
        let before = filled(&c, 0);
        // The whole cache, at its own size: the one case a narrowed view is the same storage.
        let copy = c.prefix(8, 8).unwrap();
        let ones = Tensor::ones((1, 2, 8, 4), DType::F32, &Device::Cpu).unwrap();
        copy.layers[0].0.slice_set(&ones, 2, 0).unwrap();
        copy.layers[0].1.slice_set(&ones, 2, 0).unwrap();
        assert_eq!(filled(&copy, 0), vec![1.0; 64]);
        assert_eq!(filled(&c, 0), before);
    }
}
