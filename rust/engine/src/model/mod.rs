//! The SmolLM3 / Llama decoder over quantized GGUF weights.
//!
//! SmolLM3 is Llama with "NoPE" layers that skip rotary embeddings. The Q and K weights are kept
//! exactly as quantized in the file: llama.cpp's converter permuted them for the interleaved
//! rotary layout, so RoPE is applied interleaved ([`rope`]) rather than un-permuting them.
//!
//! A layer is `x += attention(attn_norm(x)); x += mlp(ffn_norm(x))`. Every part decides at
//! load where it runs: our CPU kernels, multiplying the weights in place in the mapped file,
//! or Candle's ops on any device.

mod attention;
mod config;
mod embedding;
mod kv_cache;
mod linear;
mod mlp;
mod norm;
mod rope;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use self::attention::{Attention, Kernel, Part};
pub use self::config::Config;
use self::embedding::Embedding;
pub use self::kv_cache::{KvCache, KvType};
use self::linear::Linear;
use self::mlp::Mlp;
use self::norm::RmsNorm;
use self::rope::Rope;
pub use self::rope::{Yarn, YarnOptions};
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::limits;

struct Layer {
    attn_norm: RmsNorm,
    attn: Attention,
    ffn_norm: RmsNorm,
    mlp: Mlp,
}

impl Layer {
    fn load(
        gguf: &GgufFile,
        i: usize,
        cfg: &Config,
        kernel: Kernel,
        device: &Device,
    ) -> Result<Self> {
        let norm = |s: &str| {
            RmsNorm::load(
                gguf,
                &format!("blk.{i}.{s}.weight"),
                cfg.n_embd,
                cfg.rms_eps,
                device,
            )
        };
        Ok(Self {
            attn_norm: norm("attn_norm")?,
            attn: Attention::load(gguf, i, cfg, kernel, device)?,
            ffn_norm: norm("ffn_norm")?,
            mlp: Mlp::load(gguf, i, cfg, device)?,
        })
    }
}

/// One sequence's share of a batched step: new tokens, after what its cache holds, and how
/// many of its last positions' logits are wanted (1 for a prompt chunk or a decoded token, more
/// when a draft is verified).
pub struct BatchItem<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    pub logits: usize,
}

/// An embedding call under way ([`Model::start_embedding`]): its inputs, each one's cache and
/// the running sum of its final hidden states.
pub struct EmbeddingCall {
    inputs: Vec<Vec<u32>>,
    caches: Vec<KvCache>,
    sums: Vec<Vec<f64>>,
    /// The first input not computed yet.
    next: usize,
}

impl EmbeddingCall {
    /// Each input's final hidden states, mean-pooled and L2-normalised.
    pub fn vectors(self) -> Vec<Vec<f32>> {
        self.sums
            .into_iter()
            .zip(&self.inputs)
            .map(|(sum, ids)| {
                let mean: Vec<f64> = sum.iter().map(|s| s / ids.len() as f64).collect();
                let norm = mean.iter().map(|v| v * v).sum::<f64>().sqrt();
                let scale = if norm > 0.0 { 1.0 / norm } else { 0.0 };
                mean.iter().map(|v| (v * scale) as f32).collect()
            })
            .collect()
    }
}

pub struct Model {
    cfg: Config,
    device: Device,
    /// How the KV cache stores keys and values.
    kv_type: KvType,
    n_ctx: usize,
    tok_embd: Embedding,
    layers: Vec<Layer>,
    output_norm: RmsNorm,
    output: Box<dyn Linear>,
    rope: Rope,
    attention: Kernel,
    /// See [`Model::batch_invariant`].
    batch_invariant: bool,
}

impl Model {
    /// Builds the decoder from an opened GGUF file, for a context of `n_ctx` tokens as
    /// [`limits::context_length`] settles it.
    pub fn load(
        gguf: &GgufFile,
        device: &Device,
        n_ctx: Option<usize>,
        kv_type: Option<KvType>,
        rope_scaling: Option<YarnOptions>,
    ) -> Result<Self> {
        let mut cfg = Config::from_gguf(gguf)?;
        if let Some(asked) = rope_scaling {
            cfg.rope_scaling = Some(asked.resolve(cfg.n_ctx_train)?);
        }
        for name in gguf.tensor_names() {
            linear::check_dtype(gguf, name)?;
        }
        let n_ctx = match n_ctx {
            Some(0) => return Err(Error::invalid("n_ctx", "must be positive")),
            n => limits::context_length(n, cfg.max_context()),
        };
        let kv_type = kv_type.unwrap_or(KvType::F32);
        if !kv_type.holds(cfg.head_dim) {
            return Err(Error::invalid(
                "kv_cache_dtype",
                format!(
                    "{}: heads of {} values are not whole blocks",
                    kv_type.name(),
                    cfg.head_dim
                ),
            ));
        }
        let attention = Kernel::new(device, kv_type).ok_or_else(|| {
            Error::invalid(
                "kv_cache_dtype",
                format!("{} runs on the CPU only", kv_type.name()),
            )
        })?;
        let layers = (0..cfg.n_layer)
            .map(|i| Layer::load(gguf, i, &cfg, attention, device))
            .collect::<Result<Vec<_>>>()?;
        let output_norm =
            RmsNorm::load(gguf, "output_norm.weight", cfg.n_embd, cfg.rms_eps, device)?;
        let (tok_embd, output) = Self::load_embeddings(gguf, &cfg, device)?;
        let batch_invariant = attention == Kernel::Host
            && layers
                .iter()
                .all(|l| l.attn.batch_invariant() && l.mlp.batch_invariant());
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
            rope: Rope::new(&cfg, n_ctx, device)?,
            cfg,
            device: device.clone(),
            kv_type,
            n_ctx,
            tok_embd,
            layers,
            output_norm,
            output,
            attention,
            batch_invariant,
        })
    }

    /// The token embedding table and the output matrix, which is the same table when the file
    /// ties them.
    fn load_embeddings(
        gguf: &GgufFile,
        cfg: &Config,
        device: &Device,
    ) -> Result<(Embedding, Box<dyn Linear>)> {
        let shape = [cfg.n_vocab, cfg.n_embd];
        let candle_table = || -> Result<Arc<_>> {
            Ok(Arc::new(gguf.tensor(
                "token_embd.weight",
                &shape,
                device,
            )?))
        };
        if cfg.tied_embeddings {
            // One copy of the table at most: the output matrix is the mapped file's blocks when
            // a kernel multiplies them, and the lookups read them too; otherwise both share
            // Candle's copy.
            return Ok(
                match linear::mapped(gguf, "token_embd.weight", &shape, device)? {
                    Some(output) => (Embedding::mapped(gguf, cfg.n_vocab, cfg.n_embd)?, output),
                    None => {
                        let t = candle_table()?;
                        (Embedding::Candle(t.clone()), linear::candle(t)?)
                    }
                },
            );
        }
        let output = linear::load(gguf, "output.weight", &shape, device)?;
        let embd = if device.is_cpu() {
            Embedding::mapped(gguf, cfg.n_vocab, cfg.n_embd)?
        } else {
            Embedding::Candle(candle_table()?)
        };
        Ok((embd, output))
    }

    /// Whether a position's keys and values are the same bits however they were computed: as
    /// a prompt row or as a generated token fed back, alone or beside other sequences, in
    /// whichever chunk of a prompt. True on the CPU with an F32 cache when every layer's
    /// products are batch-invariant (Q4_1, Q8_0, and Q4_K and Q6_K with AVX-512): the
    /// generated tokens' state can then be kept and reused as exactly what a cold start
    /// computes for them.
    pub fn batch_invariant(&self) -> bool {
        self.batch_invariant
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    pub fn kv_type(&self) -> KvType {
        self.kv_type
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
        KvCache::new(
            self.cfg.n_layer,
            self.cfg.n_head_kv,
            self.cfg.head_dim,
            self.kv_type,
            &self.device,
            self.n_ctx,
        )
    }

    /// Runs `tokens` after what `cache` holds and returns float32 logits: `[n_vocab]` for the
    /// last position, or `[tokens.len(), n_vocab]` with `all_logits`.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, all_logits: bool) -> Result<Tensor> {
        let logits = if all_logits { tokens.len() } else { 1 };
        let item = BatchItem {
            tokens,
            cache,
            logits,
        };
        let logits = self.run(&mut [item])?;
        Ok(if all_logits {
            logits
        } else {
            logits.squeeze(0)?
        })
    }

    /// One step for several sequences at once: every item's new tokens go through the linear
    /// layers together, as rows of one matrix (the weights are read once for all of them);
    /// attention runs per sequence, against its own cache and at its own positions. Returns
    /// each item's float32 logits for its last `logits` positions, `[logits, n_vocab]`, in
    /// order.
    pub fn forward_batch(&self, items: &mut [BatchItem<'_>]) -> Result<Vec<Tensor>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let logits = self.run(items)?;
        let mut start = 0;
        items
            .iter()
            .map(|item| {
                let rows = logits.narrow(0, start, item.logits)?;
                start += item.logits;
                Ok(rows)
            })
            .collect()
    }

    /// Logits `[rows, n_vocab]`: the last `logits` positions of each item, in order.
    fn run(&self, items: &mut [BatchItem<'_>]) -> Result<Tensor> {
        let (x, parts) = self.trunk(items)?;
        let wanted: Vec<usize> = items.iter().map(|item| item.logits).collect();
        let x = self.last_rows(x, &parts, &wanted)?;
        let x = self.output_norm.forward(&x)?;
        Ok(self.output.forward(&x)?.to_dtype(DType::F32)?)
    }

    /// The embedding of each input: its final hidden states (after the output norm) averaged
    /// over its tokens and scaled to unit length, as llama.cpp's server computes them with
    /// `--pooling mean`. A decoder's pooled states, not a trained embedding model's.
    ///
    /// Each input runs in a cache of its own that is dropped afterwards; inputs are batched
    /// together up to [`limits::EMBED_BATCH_TOKENS`] tokens a step, and a longer input is
    /// computed in chunks of that size. An input's vector does not depend on the others in the
    /// call where the model is batch-invariant ([`Model::batch_invariant`]).
    pub fn embed(&self, inputs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let mut job = self.start_embedding(inputs.to_vec());
        while !self.embed_step(&mut job)? {}
        Ok(job.vectors())
    }

    /// An embedding call to compute a pass at a time ([`Self::embed_step`]), so that the
    /// engine thread can run the scheduler's steps in between.
    pub fn start_embedding(&self, inputs: Vec<Vec<u32>>) -> EmbeddingCall {
        EmbeddingCall {
            caches: inputs.iter().map(|_| self.new_cache()).collect(),
            sums: vec![vec![0f64; self.cfg.n_embd]; inputs.len()],
            inputs,
            next: 0,
        }
    }

    /// One forward pass of an embedding call: the next [`limits::EMBED_BATCH_TOKENS`] tokens
    /// of its inputs, in order (whole inputs batched together, a longer one in chunks). True
    /// once every input is computed.
    pub fn embed_step(&self, job: &mut EmbeddingCall) -> Result<bool> {
        let EmbeddingCall {
            inputs,
            caches,
            sums,
            next,
        } = job;
        let mut items = Vec::new();
        let mut which = Vec::new();
        let mut room = limits::EMBED_BATCH_TOKENS;
        for (i, (ids, cache)) in inputs.iter().zip(caches.iter_mut()).enumerate().skip(*next) {
            let done = cache.len();
            let n = (ids.len() - done).min(room);
            if n == 0 {
                break;
            }
            room -= n;
            items.push(BatchItem {
                tokens: &ids[done..done + n],
                cache,
                logits: n,
            });
            which.push(i);
        }
        if items.is_empty() {
            return Ok(true);
        }
        let (x, _) = self.trunk(&mut items)?;
        let rows = self
            .output_norm
            .forward(&x)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let mut rows = rows.iter();
        for (item, &i) in items.iter().zip(&which) {
            for row in rows.by_ref().take(item.tokens.len()) {
                for (s, &v) in sums[i].iter_mut().zip(row) {
                    *s += f64::from(v);
                }
            }
        }
        drop(items);
        while *next < inputs.len() && caches[*next].len() == inputs[*next].len() {
            caches[*next].clear(); // its keys and values are no longer needed
            *next += 1;
        }
        Ok(*next == inputs.len())
    }

    /// The hidden states `[rows, e]` after the last layer, before the output norm, of every
    /// item's tokens in order; each item's cache is advanced past its tokens.
    fn trunk(&self, items: &mut [BatchItem<'_>]) -> Result<(Tensor, Vec<Part>)> {
        let mut ids = Vec::new();
        let mut parts = Vec::with_capacity(items.len());
        for item in items.iter() {
            let (seq, pos) = (item.tokens.len(), item.cache.len());
            self.check_input(item.tokens, pos)?;
            if !(1..=seq).contains(&item.logits) {
                return Err(Error::invalid(
                    "logits",
                    format!("{} rows of logits from {seq} positions", item.logits),
                ));
            }
            parts.push(Part::new(
                self.attention,
                &self.rope,
                ids.len(),
                pos,
                seq,
                &self.device,
            )?);
            ids.extend_from_slice(item.tokens);
        }
        for (part, item) in parts.iter().zip(items.iter_mut()) {
            item.cache.reserve(part.pos + part.seq)?;
        }
        // Each step's activations are dropped as soon as the next is computed: for a 512-token
        // prompt they are megabytes each.
        let mut x = self.tok_embd.lookup(&ids, &self.device)?.unsqueeze(0)?; // [1, rows, e]
        for (l, layer) in self.layers.iter().enumerate() {
            let y = layer
                .attn
                .forward(layer.attn_norm.forward(&x)?, l, &parts, items)?;
            x = (x + y)?;
            let y = layer.mlp.forward(layer.ffn_norm.forward(&x)?)?;
            x = (x + y)?;
        }
        for (part, item) in parts.iter().zip(items.iter_mut()) {
            item.cache.advance(part.seq);
        }
        Ok((x.squeeze(0)?, parts))
    }

    /// An item's tokens are not empty, in the vocabulary, and fit the context after `pos`.
    fn check_input(&self, tokens: &[u32], pos: usize) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::invalid("tokens", "empty input"));
        }
        if pos + tokens.len() > self.n_ctx {
            return Err(Error::ContextOverflow {
                n_prompt: pos + tokens.len(),
                n_ctx: self.n_ctx,
            });
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.cfg.n_vocab) {
            return Err(Error::invalid(
                "tokens",
                format!(
                    "token id {bad} is outside the vocabulary of {}",
                    self.cfg.n_vocab
                ),
            ));
        }
        Ok(())
    }

    /// The rows of `x` (`[rows, e]`) whose logits are wanted: each item's last `wanted`.
    fn last_rows(&self, x: Tensor, parts: &[Part], wanted: &[usize]) -> Result<Tensor> {
        if let ([part], [n]) = (parts, wanted) {
            return Ok(if *n == part.seq {
                x
            } else {
                x.narrow(0, part.offset + part.seq - n, *n)?
            });
        }
        let rows: Vec<u32> = parts
            .iter()
            .zip(wanted)
            .flat_map(|(p, &n)| (p.offset + p.seq - n..p.offset + p.seq).map(|r| r as u32))
            .collect();
        Ok(x.index_select(&Tensor::new(rows, &self.device)?, 0)?)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};

    use super::*;

    /// A tiny Llama with random Q8_0 weights (products our kernels compute batch-invariantly),
    /// written to a temporary GGUF file and loaded.
    fn tiny_model() -> Model {
        tiny_model_with(&[], None, None).unwrap()
    }

    /// The tiny model with more metadata, a context and YaRN asked for.
    fn tiny_model_with(
        extra: &[(&str, gguf_file::Value)],
        n_ctx: Option<usize>,
        yarn: Option<YarnOptions>,
    ) -> Result<Model> {
        let (layers, e, heads, kv_heads, ff, vocab) =
            (2usize, 64usize, 4usize, 2usize, 128usize, 96usize);
        let hd = e / heads;
        let dev = Device::Cpu;
        let q8 = |rows: usize, cols: usize| {
            let t = Tensor::randn(0f32, 0.3, (rows, cols), &dev).unwrap();
            QTensor::quantize(&t, GgmlDType::Q8_0).unwrap()
        };
        let ones = || {
            QTensor::quantize(&Tensor::ones(e, DType::F32, &dev).unwrap(), GgmlDType::F32).unwrap()
        };
        let mut tensors = vec![
            ("token_embd.weight".to_string(), q8(vocab, e)),
            ("output_norm.weight".to_string(), ones()),
        ];
        for i in 0..layers {
            for (name, t) in [
                ("attn_norm", ones()),
                ("attn_q", q8(heads * hd, e)),
                ("attn_k", q8(kv_heads * hd, e)),
                ("attn_v", q8(kv_heads * hd, e)),
                ("attn_output", q8(e, heads * hd)),
                ("ffn_norm", ones()),
                ("ffn_gate", q8(ff, e)),
                ("ffn_up", q8(ff, e)),
                ("ffn_down", q8(e, ff)),
            ] {
                tensors.push((format!("blk.{i}.{name}.weight"), t));
            }
        }
        use gguf_file::Value;
        let meta = [
            ("general.architecture", Value::String("llama".into())),
            ("llama.block_count", Value::U32(layers as u32)),
            ("llama.embedding_length", Value::U32(e as u32)),
            ("llama.feed_forward_length", Value::U32(ff as u32)),
            ("llama.attention.head_count", Value::U32(heads as u32)),
            ("llama.attention.head_count_kv", Value::U32(kv_heads as u32)),
            ("llama.context_length", Value::U32(2048)),
        ];
        let meta: Vec<(&str, &Value)> = meta.iter().chain(extra).map(|(k, v)| (*k, v)).collect();
        let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        static FILES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "smolcandle-{}-{}-tiny.gguf",
            std::process::id(),
            FILES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let mut file = std::fs::File::create(&path).unwrap();
        gguf_file::write(&mut file, &meta, &tensors).unwrap();
        drop(file);
        let gguf = GgufFile::open(&path).unwrap();
        let model = Model::load(&gguf, &dev, n_ctx, None, yarn);
        drop(gguf);
        let _ = std::fs::remove_file(&path);
        model
    }

    #[test]
    fn yarn_is_read_from_the_files_keys_and_reaches_factor_times_the_window() {
        use gguf_file::Value;
        let yarn = [
            ("llama.rope.scaling.type", Value::String("yarn".into())),
            ("llama.rope.scaling.factor", Value::F32(2.0)),
            (
                "llama.rope.scaling.original_context_length",
                Value::U32(2048),
            ),
        ];
        let model = tiny_model_with(&yarn, Some(100_000), None).unwrap();
        let y = model.config().rope_scaling.expect("read from the file");
        assert_eq!((y.factor, y.original_context), (2.0, 2048));
        assert_eq!((y.beta_fast, y.beta_slow), (32.0, 1.0));
        assert!((y.attention_factor - (1.0 + 0.1 * 2f32.ln())).abs() < 1e-7);
        assert_eq!(model.config().max_context(), 4096);
        assert_eq!(model.n_ctx(), 4096, "capped where YaRN stops");

        // Without it the training window is the limit; a load option turns it on.
        assert_eq!(
            tiny_model_with(&[], Some(100_000), None).unwrap().n_ctx(),
            2048
        );
        let asked = YarnOptions {
            factor: 4.0,
            ..Default::default()
        };
        let model = tiny_model_with(&[], Some(100_000), Some(asked)).unwrap();
        assert_eq!(model.config().rope_scaling.unwrap().original_context, 2048);
        assert_eq!(model.n_ctx(), 8192);

        let linear = [("llama.rope.scaling.type", Value::String("linear".into()))];
        let err = tiny_model_with(&linear, None, None)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("rope.scaling.type") && err.contains("linear"),
            "{err}"
        );
        let bad = YarnOptions {
            factor: 0.5,
            ..Default::default()
        };
        let err = tiny_model_with(&[], None, Some(bad))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("rope_scaling") && err.contains("at least 1"),
            "{err}"
        );
    }

    #[test]
    fn an_embedding_is_unit_length_and_the_same_alone_or_in_a_batch() {
        let model = tiny_model();
        assert!(model.batch_invariant());
        let text: Vec<u32> = vec![5, 17, 3, 9, 41, 2, 88];
        let others: Vec<Vec<u32>> =
            vec![vec![1, 2, 3], (0..40).map(|t| t % 96).collect(), vec![60]];
        let alone = model.embed(std::slice::from_ref(&text)).unwrap();
        assert_eq!(alone.len(), 1);
        assert_eq!(alone[0].len(), 64);
        let batch = model
            .embed(&[
                others[0].clone(),
                text.clone(),
                others[1].clone(),
                others[2].clone(),
            ])
            .unwrap();
        assert_eq!(batch.len(), 4);
        assert_eq!(
            batch[1], alone[0],
            "the vector of a text depends on its batch"
        );
        for v in batch.iter().chain(&alone) {
            let norm: f64 = v
                .iter()
                .map(|&x| f64::from(x) * f64::from(x))
                .sum::<f64>()
                .sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
        }
        assert_ne!(batch[0], batch[1]);
        // An input longer than a step's batch is computed in chunks, as a prompt is prefilled.
        let long: Vec<u32> = (0..limits::EMBED_BATCH_TOKENS as u32 + 100)
            .map(|t| (t * 7) % 96)
            .collect();
        let chunked = model.embed(std::slice::from_ref(&long)).unwrap();
        let mut cache = model.new_cache();
        let (whole, _) = model
            .trunk(&mut [BatchItem {
                tokens: &long,
                cache: &mut cache,
                logits: long.len(),
            }])
            .unwrap();
        let rows = model
            .output_norm
            .forward(&whole)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let mean: Vec<f64> = (0..64)
            .map(|j| rows.iter().map(|r| f64::from(r[j])).sum::<f64>() / rows.len() as f64)
            .collect();
        let norm = mean.iter().map(|v| v * v).sum::<f64>().sqrt();
        for (a, b) in chunked[0].iter().zip(&mean) {
            assert!(
                (f64::from(*a) - b / norm).abs() < 1e-5,
                "{a} vs {}",
                b / norm
            );
        }
    }
}
