//! Grouped-query self-attention with its projections: the query heads that share a key/value
//! head attend to that head's cache; RoPE (interleaved) on the queries and keys except in the
//! NoPE layers.

use candle_core::{DType, Device, Layout, Storage, Tensor};

use super::kv_cache::{KvCache, KvType};
use super::linear::{self, Linear};
use super::rope::Rope;
use super::{BatchItem, Config};
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::kernels::attention as kernel;

/// Where attention runs, chosen once at load from the device and the cache's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// On the CPU with an F32 or Q8_0 cache: llama.cpp's arithmetic ([`kernel`]), reading the
    /// cache in place and masking as it goes.
    Host,
    /// Candle's ops, on any device, with an F32 or F16 cache. With F16 (`half`) attention sees
    /// F16-rounded queries, keys, values and probabilities, with F32 accumulation.
    Candle { half: bool },
}

impl Kernel {
    /// `None` where no kernel takes the cache type on the device (Q8_0 off the CPU).
    pub fn new(device: &Device, kv: KvType) -> Option<Self> {
        match kv {
            KvType::F32 | KvType::Q8_0 if device.is_cpu() => Some(Self::Host),
            KvType::Q8_0 => None,
            KvType::F32 | KvType::F16 => Some(Self::Candle {
                half: kv == KvType::F16,
            }),
        }
    }
}

/// Where one sequence's rows sit in a batched step, and its positions' mask and RoPE tables.
pub struct Part {
    pub offset: usize,
    /// Positions the cache held before these rows.
    pub pos: usize,
    pub seq: usize,
    mask: Option<Tensor>,
    cos: Tensor,
    sin: Tensor,
}

impl Part {
    pub fn new(
        kernel: Kernel,
        rope: &Rope,
        offset: usize,
        pos: usize,
        seq: usize,
        device: &Device,
    ) -> Result<Self> {
        let (cos, sin) = rope.at(pos, seq)?;
        Ok(Self {
            offset,
            pos,
            seq,
            // Our CPU attention masks as it goes; a mask would be `seq × (pos + seq)` floats.
            mask: if seq > 1 && kernel != Kernel::Host {
                Some(causal_mask(seq, pos, device)?)
            } else {
                None
            },
            cos,
            sin,
        })
    }
}

pub struct Attention {
    q: Box<dyn Linear>,
    k: Box<dyn Linear>,
    v: Box<dyn Linear>,
    o: Box<dyn Linear>,
    n_head: usize,
    n_head_kv: usize,
    head_dim: usize,
    /// False in the NoPE layers.
    use_rope: bool,
    kernel: Kernel,
}

impl Attention {
    pub fn load(
        gguf: &GgufFile,
        layer: usize,
        cfg: &Config,
        kernel: Kernel,
        device: &Device,
    ) -> Result<Self> {
        let p = |s: &str| format!("blk.{layer}.{s}.weight");
        let (e, hd) = (cfg.n_embd, cfg.head_dim);
        let (q_dim, kv_dim) = (cfg.n_head * hd, cfg.n_head_kv * hd);
        Ok(Self {
            q: linear::load(gguf, &p("attn_q"), &[q_dim, e], device)?,
            k: linear::load(gguf, &p("attn_k"), &[kv_dim, e], device)?,
            v: linear::load(gguf, &p("attn_v"), &[kv_dim, e], device)?,
            o: linear::load(gguf, &p("attn_output"), &[e, q_dim], device)?,
            n_head: cfg.n_head,
            n_head_kv: cfg.n_head_kv,
            head_dim: hd,
            use_rope: cfg.use_rope[layer],
            kernel,
        })
    }

    pub fn batch_invariant(&self) -> bool {
        [&self.q, &self.k, &self.v, &self.o]
            .iter()
            .all(|m| m.batch_invariant())
    }

    /// The block's output for the normed activations `h` (`[1, rows, n_embd]`, every item's
    /// rows one after the other as `parts` places them): each item's rows attend to its own
    /// cache, layer `l` of which they extend.
    pub fn forward(
        &self,
        h: Tensor,
        l: usize,
        parts: &[Part],
        items: &mut [BatchItem<'_>],
    ) -> Result<Tensor> {
        let y = {
            let (q, k, v) = (
                self.q.forward(&h)?,
                self.k.forward(&h)?,
                self.v.forward(&h)?,
            );
            drop(h);
            let mut ys = match self.kernel {
                Kernel::Host => self.attend_host((&q, &k, &v), items, l, parts)?,
                Kernel::Candle { half } => {
                    let mut ys = Vec::with_capacity(parts.len());
                    for (part, item) in parts.iter().zip(items.iter_mut()) {
                        let rows = |t: &Tensor| t.narrow(1, part.offset, part.seq);
                        let qkv = (&rows(&q)?, &rows(&k)?, &rows(&v)?);
                        ys.push(self.attend_candle(qkv, item.cache, l, part, half)?);
                    }
                    ys
                }
            };
            if ys.len() == 1 {
                ys.pop().expect("one part")
            } else {
                Tensor::cat(&ys, 1)?
            }
        };
        self.o.forward(&y)
    }

    /// One sequence's new rows (`[1, seq, heads * head_dim]` projections) against its cache,
    /// by Candle's ops.
    fn attend_candle(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        cache: &mut KvCache,
        l: usize,
        part: &Part,
        half: bool,
    ) -> Result<Tensor> {
        let seq = part.seq;
        let (nh, nkv, hd) = (self.n_head, self.n_head_kv, self.head_dim);
        let q = q.reshape((1, seq, nh, hd))?.transpose(1, 2)?.contiguous()?;
        let k = k
            .reshape((1, seq, nkv, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let v = v
            .reshape((1, seq, nkv, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let (q, k) = if self.use_rope {
            (
                candle_nn::rotary_emb::rope_i(&q, &part.cos, &part.sin)?,
                candle_nn::rotary_emb::rope_i(&k, &part.cos, &part.sin)?,
            )
        } else {
            (q, k)
        };
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

    /// Every sequence's new rows (`[1, rows, heads * head_dim]` projections, placed as
    /// `parts` says) against its F32 or Q8_0 cache on the CPU: llama.cpp's arithmetic
    /// ([`kernel::attend_all`]), reading the caches in place, all of them in one dispatch.
    fn attend_host(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        items: &mut [BatchItem<'_>],
        l: usize,
        parts: &[Part],
    ) -> Result<Vec<Tensor>> {
        let (nh, nkv, hd) = (self.n_head, self.n_head_kv, self.head_dim);
        let device = q.device();
        // Each sequence's queries, and its cache with this step's keys and values written.
        let mut staged = Vec::with_capacity(parts.len());
        for (part, item) in parts.iter().zip(items.iter_mut()) {
            let (seq, pos) = (part.seq, part.pos);
            let rows = |t: &Tensor| t.narrow(1, part.offset, seq);
            let mut qs = rows(q)?.flatten_all()?.to_vec1::<f32>()?; // [seq, nh, hd]
            let mut ks = rows(k)?.flatten_all()?.to_vec1::<f32>()?; // [seq, nkv, hd]
            if self.use_rope {
                let cos = part.cos.flatten_all()?.to_vec1::<f32>()?;
                let sin = part.sin.flatten_all()?.to_vec1::<f32>()?;
                kernel::rope(&mut qs, hd, &cos, &sin);
                kernel::rope(&mut ks, hd, &cos, &sin);
            }
            let heads_first = |t: Tensor| -> Result<Tensor> {
                Ok(t.reshape((1, seq, nkv, hd))?
                    .transpose(1, 2)?
                    .contiguous()?)
            };
            let ks = heads_first(Tensor::from_vec(ks, (1, seq, nkv * hd), device)?)?;
            let (k_all, v_all) = item.cache.write(l, &ks, &heads_first(rows(v)?)?)?.clone();
            let dims = kernel::Dims {
                n_head: nh,
                n_head_kv: nkv,
                head_dim: hd,
                pos,
                seq,
                capacity: k_all.dim(2)?,
            };
            staged.push((qs, k_all, v_all, dims));
        }
        let storage: Vec<_> = staged
            .iter()
            .map(|(_, k, v, _)| (k.storage_and_layout(), v.storage_and_layout()))
            .collect();
        let jobs = staged
            .iter()
            .zip(&storage)
            .map(|((qs, _, _, dims), (k, v))| {
                Ok(kernel::Job {
                    q: qs,
                    k: host_cache(&k.0, k.1)?,
                    v: host_cache(&v.0, v.1)?,
                    dims: *dims,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let outs = kernel::attend_all(&jobs, 1.0 / (hd as f32).sqrt());
        outs.into_iter()
            .zip(parts)
            .map(|(out, part)| Ok(Tensor::from_vec(out, (1, part.seq, nh * hd), device)?))
            .collect()
    }
}

/// A CPU cache tensor's storage as the attention kernel reads it: F32 values, or Q8_0 rows'
/// bytes.
fn host_cache<'a>(storage: &'a Storage, layout: &Layout) -> Result<kernel::Cache<'a>> {
    let Storage::Cpu(cpu) = storage else {
        return Err(Error::Inference("the CPU cache is not in memory".into()));
    };
    let start = layout.start_offset();
    Ok(match cpu {
        candle_core::CpuStorage::U8(bytes) => kernel::Cache::Q8_0(&bytes[start..]),
        _ => kernel::Cache::F32(&cpu.as_slice::<f32>()?[start..]),
    })
}

/// `[seq, pos + seq]`: 0 where row `i` may attend, -inf after position `pos + i`.
fn causal_mask(seq: usize, pos: usize, device: &Device) -> Result<Tensor> {
    let total = pos + seq;
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| (0..total).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(mask, (seq, total), device)?)
}

fn round_f16(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F16)?.to_dtype(DType::F32)?)
}
