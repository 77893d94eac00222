//! The key/value cache of one sequence, grown as it fills and cut or copied for reuse.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::kernels::q8_0;

/// How the cache stores each key and value row (one head's `head_dim` values at a position).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvType {
    /// Float32 (the default): attention reads it in place, in llama.cpp's arithmetic.
    F32,
    /// Float16: half the memory; attention by Candle's ops.
    F16,
    /// Q8_0 blocks as llama.cpp stores them (32 values in 34 bytes: an f16 scale and 32
    /// signed bytes): 53% of F16, 27% of F32. Each row is quantized alone, when it is written,
    /// so a position's stored keys and values do not depend on the batch it came in.
    Q8_0,
}

impl KvType {
    /// The names [`Self::parse`] takes, as the load option spells them.
    pub const NAMES: &'static str = "\"f32\", \"f16\" or \"q8_0\"";

    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "f32" => Self::F32,
            "f16" => Self::F16,
            "q8_0" => Self::Q8_0,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Q8_0 => "q8_0",
        }
    }

    /// The storage tensors' element type (Q8_0 rows are bytes).
    fn storage(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Q8_0 => DType::U8,
        }
    }

    /// Elements of [`Self::storage`] one row of `head_dim` values takes.
    fn row_len(self, head_dim: usize) -> usize {
        match self {
            Self::F32 | Self::F16 => head_dim,
            Self::Q8_0 => head_dim / q8_0::QK * q8_0::BLOCK_BYTES,
        }
    }

    /// Whether rows of `head_dim` values can be stored this way.
    pub fn holds(self, head_dim: usize) -> bool {
        self != Self::Q8_0 || head_dim.is_multiple_of(q8_0::QK)
    }
}

/// The key/value cache of one sequence: per layer, keys and values `[1, kv_heads, capacity,
/// row]` (a row: `head_dim` values, or their Q8_0 blocks' bytes), of which the first `len` positions are filled. Its storage is allocated at the
/// size of the first rows written (a prompt, or its first chunk) and grows by a quarter when
/// full, never beyond the context: growth copies the cache, so growing geometrically keeps the
/// copying to a few times the final size while leaving at most a fifth of the storage empty.
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    n_layer: usize,
    kv_heads: usize,
    head_dim: usize,
    kind: KvType,
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
            kind: KvType::F32,
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

    /// An empty cache for a model's shape; no storage until something is written.
    pub(crate) fn new(
        n_layer: usize,
        kv_heads: usize,
        head_dim: usize,
        kind: KvType,
        device: &Device,
        n_ctx: usize,
    ) -> Self {
        Self {
            n_layer,
            kv_heads,
            head_dim,
            kind,
            device: device.clone(),
            n_ctx,
            ..Self::empty()
        }
    }

    /// Storage for `n` positions at least, the filled ones copied over.
    pub(crate) fn reserve(&mut self, n: usize) -> Result<()> {
        if n <= self.capacity {
            return Ok(());
        }
        let grown = self.capacity + (self.capacity / 4).max(KV_MIN_GROWTH);
        let capacity = if self.capacity == 0 { n } else { n.max(grown) }.min(self.n_ctx.max(n));
        let shape = (1, self.kv_heads, capacity, self.kind.row_len(self.head_dim));
        let dtype = self.kind.storage();
        for l in 0..self.n_layer {
            match self.layers.get_mut(l) {
                // Layer by layer, so that growing holds one layer twice, not the whole cache.
                Some((k, v)) => {
                    *k = moved_to(k, self.len, capacity)?;
                    *v = moved_to(v, self.len, capacity)?;
                }
                None => self.layers.push((
                    Tensor::zeros(shape, dtype, &self.device)?,
                    Tensor::zeros(shape, dtype, &self.device)?,
                )),
            }
        }
        self.capacity = capacity;
        Ok(())
    }

    /// Writes layer `l`'s keys and values (`[1, kv_heads, seq, head_dim]`) after the filled
    /// positions (storage reserved for them), and returns its storage.
    pub(super) fn write(&mut self, l: usize, k: &Tensor, v: &Tensor) -> Result<&(Tensor, Tensor)> {
        let (kc, vc) = &self.layers[l];
        kc.slice_set(&self.stored(k)?, 2, self.len)?;
        vc.slice_set(&self.stored(v)?, 2, self.len)?;
        Ok(&self.layers[l])
    }

    /// Rows `[1, kv_heads, seq, head_dim]` as this cache stores them.
    fn stored(&self, t: &Tensor) -> Result<Tensor> {
        Ok(match self.kind {
            KvType::F32 | KvType::F16 => t.to_dtype(self.kind.storage())?,
            KvType::Q8_0 => {
                let (b, heads, seq, head_dim) = t.dims4()?;
                let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let bytes = q8_0::quantize_rows(&values);
                let row = self.kind.row_len(head_dim);
                Tensor::from_vec(bytes, (b, heads, seq, row), t.device())?
            }
        })
    }

    /// Counts `n` positions, written in every layer by [`Self::write`], as filled.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Forgets the positions from `n` on (a verified draft's rejected tokens); their storage
    /// stays, to be written again.
    pub fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
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

    /// A separate cache holding positions `start..end` of this one, in storage of exactly that
    /// size: a piece of a prefix, to be [`Self::joined`] after the pieces before it.
    pub fn segment(&self, start: usize, end: usize) -> Result<KvCache> {
        self.check_filled(end)?;
        let n = end.saturating_sub(start);
        let layers = if n == 0 {
            Vec::new()
        } else {
            self.layers
                .iter()
                .map(|(k, v)| {
                    // `copy` would clone all of the source's storage under a narrowed view.
                    Ok((
                        k.narrow(2, start, n)?.force_contiguous()?,
                        v.narrow(2, start, n)?.force_contiguous()?,
                    ))
                })
                .collect::<Result<_>>()?
        };
        Ok(KvCache {
            layers,
            device: self.device.clone(),
            len: n,
            capacity: n,
            ..*self
        })
    }

    /// One cache holding, in order, the first `take` positions of each of `parts` (caches of
    /// this shape, each a segment that follows the ones before it), with room for `room`
    /// positions: a prefix assembled from the pieces it is kept in.
    pub fn joined(&self, parts: &[(&KvCache, usize)], room: usize) -> Result<KvCache> {
        let n: usize = parts.iter().map(|(_, take)| take).sum();
        let mut out = KvCache {
            layers: Vec::new(),
            device: self.device.clone(),
            len: 0,
            capacity: 0,
            ..*self
        };
        if n == 0 {
            return Ok(out);
        }
        for (part, take) in parts {
            part.check_filled(*take)?;
            if part.shape() != self.shape() {
                return Err(Error::Inference(
                    "joining caches of different shapes".into(),
                ));
            }
        }
        out.reserve(room.min(self.n_ctx).max(n))?;
        for l in 0..self.n_layer {
            let (k, v) = &out.layers[l];
            let mut at = 0;
            for (part, take) in parts.iter().filter(|(_, take)| *take > 0) {
                let (pk, pv) = &part.layers[l];
                k.slice_set(&pk.narrow(2, 0, *take)?.contiguous()?, 2, at)?;
                v.slice_set(&pv.narrow(2, 0, *take)?.contiguous()?, 2, at)?;
                at += take;
            }
        }
        out.len = n;
        Ok(out)
    }

    /// What a cache's layers hold, to tell whether two caches' positions can be joined or a
    /// stored one read into this model's.
    pub fn shape(&self) -> (usize, usize, usize, KvType) {
        (self.n_layer, self.kv_heads, self.head_dim, self.kind)
    }

    /// The first `n` positions' bytes, layer by layer, keys then values, head by head: the
    /// layout [`Self::read_positions`] takes back.
    pub fn write_positions(&self, n: usize, out: &mut impl std::io::Write) -> std::io::Result<()> {
        let run = |t: &Tensor, h: usize| -> Result<Vec<u8>> {
            tensor_bytes(&t.narrow(1, h, 1)?.narrow(2, 0, n)?.contiguous()?)
        };
        self.check_filled(n).map_err(std::io::Error::other)?;
        if n == 0 {
            return Ok(());
        }
        for (k, v) in &self.layers {
            for t in [k, v] {
                for h in 0..self.kv_heads {
                    out.write_all(&run(t, h).map_err(std::io::Error::other)?)?;
                }
            }
        }
        Ok(())
    }

    /// Bytes [`Self::write_positions`] writes for `n` positions.
    pub fn positions_bytes(&self, n: usize) -> usize {
        n * self.bytes_per_position()
    }

    /// A cache of this shape holding the first `n` of the `stored` positions in `bytes` (as
    /// [`Self::write_positions`] wrote them), with room for `room` positions.
    pub fn read_positions(
        &self,
        bytes: &[u8],
        stored: usize,
        n: usize,
        room: usize,
    ) -> Result<KvCache> {
        if bytes.len() != self.positions_bytes(stored) || n > stored {
            return Err(Error::Inference(format!(
                "{} bytes do not hold {stored} positions of this cache",
                bytes.len()
            )));
        }
        let mut out = KvCache {
            layers: Vec::new(),
            device: self.device.clone(),
            len: 0,
            capacity: 0,
            ..*self
        };
        if n == 0 {
            return Ok(out);
        }
        out.reserve(room.min(self.n_ctx).max(n))?;
        let row = self.kind.row_len(self.head_dim);
        let dtype = self.kind.storage();
        let run = stored * row * dtype.size_in_bytes();
        let mut runs = bytes.chunks_exact(run);
        for l in 0..self.n_layer {
            let (k, v) = &out.layers[l];
            for t in [k, v] {
                for h in 0..self.kv_heads {
                    let raw = &runs.next().expect("sized above")[..n * row * dtype.size_in_bytes()];
                    let src = Tensor::from_raw_buffer(raw, dtype, &[1, 1, n, row], &self.device)?;
                    t.narrow(1, h, 1)?.slice_set(&src, 2, 0)?;
                }
            }
        }
        out.len = n;
        Ok(out)
    }

    /// A cache of `n` positions whose every value tells its layer, head, position and `seed`
    /// apart, for tests of what copies and stores caches.
    #[cfg(test)]
    pub(crate) fn numbered(kind: KvType, n_layer: usize, n: usize, seed: f32) -> KvCache {
        let (heads, head_dim) = (2, 32);
        let mut c = KvCache::new(n_layer, heads, head_dim, kind, &Device::Cpu, 4096);
        if n == 0 {
            return c;
        }
        c.reserve(n).unwrap();
        for l in 0..n_layer {
            let v: Vec<f32> = (0..heads * n * head_dim)
                .map(|i| seed + (l * 7919 + i) as f32 * 0.001)
                .collect();
            let t = Tensor::from_vec(v, (1, heads, n, head_dim), &Device::Cpu).unwrap();
            c.write(l, &t, &(t.clone() * -1.0).unwrap()).unwrap();
        }
        c.advance(n);
        c
    }

    /// The first `n` positions' bytes (see [`Self::write_positions`]).
    #[cfg(test)]
    pub(crate) fn bytes_of(&self, n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_positions(n, &mut out).unwrap();
        out
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
        let row = self.kind.row_len(self.head_dim) * self.kind.storage().size_in_bytes();
        self.n_layer * 2 * self.kv_heads * row
    }
}

/// A contiguous tensor's elements as bytes, in memory order (little-endian on every target we
/// build for).
fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::U8 => t.to_vec1::<u8>()?,
        other => {
            return Err(Error::Inference(format!(
                "a cache of {other:?} cannot be written"
            )))
        }
    })
}

/// The first `filled` positions of `t` (`[1, kv_heads, positions, row]`) in new storage
/// for `capacity` positions (at least `filled`), the rest zero. Head by head: a head's first
/// positions are one contiguous run in both tensors, so each is copied once, and the new
/// storage never holds more than `capacity` positions.
fn moved_to(t: &Tensor, filled: usize, capacity: usize) -> Result<Tensor> {
    let (b, heads, _, row) = t.dims4()?;
    let out = Tensor::zeros((b, heads, capacity, row), t.dtype(), t.device())?;
    if filled > 0 {
        for h in 0..heads {
            let src = t.narrow(1, h, 1)?.narrow(2, 0, filled)?;
            out.narrow(1, h, 1)?.slice_set(&src, 2, 0)?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use candle_core::Storage;

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

    fn stored_floats(t: &Tensor) -> usize {
        let (storage, _) = t.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            unreachable!("a CPU test")
        };
        cpu.as_slice::<f32>().unwrap().len()
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
            // A kept segment too: the prefix tree's budget counts only its positions.
            let piece = c.segment(10, 20).unwrap();
            for t in [&piece.layers[0].0, &piece.layers[0].1] {
                assert_eq!(stored_floats(t), heads * 10 * 4, "{heads} heads, a segment");
            }
            let cut = c.into_prefix(30).unwrap();
            let (k, _) = &cut.layers[0];
            assert_eq!(stored_floats(k), heads * 30 * 4, "{heads} heads");
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
    fn a_q8_0_cache_holds_each_rows_blocks() {
        let mut c = KvCache {
            n_layer: 1,
            kv_heads: 2,
            head_dim: 64,
            kind: KvType::Q8_0,
            n_ctx: 64,
            ..KvCache::empty()
        };
        let v: Vec<f32> = (0..2 * 10 * 64).map(|i| (i % 97) as f32 - 48.5).collect();
        let r = Tensor::from_vec(v.clone(), (1, 2, 10, 64), &Device::Cpu).unwrap();
        c.reserve(10).unwrap();
        c.write(0, &r, &r).unwrap();
        c.advance(10);
        assert_eq!(
            c.bytes(),
            2 * 2 * 2 * 34 * 10,
            "two blocks of 34 bytes a row"
        );
        c.reserve(11).unwrap(); // grows, copying the rows' bytes
        let k = c.layers[0]
            .0
            .narrow(2, 0, 10)
            .unwrap()
            .flatten_all()
            .unwrap();
        assert_eq!(k.to_vec1::<u8>().unwrap(), q8_0::quantize_rows(&v));
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
