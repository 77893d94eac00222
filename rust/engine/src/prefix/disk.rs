//! Kept prefixes on disk, so that a restart, a deploy or a second replica does not compute a
//! conversation again.
//!
//! Each finished prefix of at least [`DISK_MIN_TOKENS`] tokens is written, by a thread of its
//! own, to one file under the directory of the model's identity ([`ModelIdentity`]): a header
//! (the identity, the tenant's hash, the cache's shape, the tokens, checksums), then the
//! positions' keys and values exactly as the cache stores them (F32, F16, or Q8_0's blocks:
//! what is read back is bit for bit what was computed, so a prefix from disk gives a cold
//! start's state). A file that a conversation's next turn extends is removed; beyond the byte
//! budget the least recently used files go.
//!
//! A request's prompt is matched against the files' tokens (kept in memory); the file of the
//! longest match is memory-mapped, its checksums and identity verified, and its positions
//! copied into the request's cache. A file whose header or payload does not verify, or that
//! another model (another file, other weights, another cache layout) wrote, is refused.
//!
//! Files are written under a temporary name and renamed into place, so a reader sees a whole
//! file or none. Replicas sharing the directory share the files: two writing the same prefix
//! write the same bytes under the same name, and the last rename wins; each notices the
//! others' files when the directory changes.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use super::{common_prefix, CacheScope};
use crate::error::{Error, Result};
use crate::model::KvCache;

/// Prompts shorter than this are not written: they are quicker to compute than to read.
pub const DISK_MIN_TOKENS: usize = 64;

/// Prefixes that may wait for the writer; past them a prefix is not stored.
const WRITES_WAITING: usize = 4;

/// Temporary files older than this are a crashed writer's, and removed.
const STALE_TMP: std::time::Duration = std::time::Duration::from_secs(3600);

const MAGIC: &[u8; 4] = b"SCKV";
/// The layout of the files; a change makes older files unreadable, and so refused.
const FORMAT: u32 = 1;
/// Bytes of the header before the tokens.
const FIXED_HEADER: usize = 4 + 4 + 32 + 32 + 16 + 8 + 8 + 4;

/// What identifies a model's keys and values: the file (its length, its header, and samples
/// of its weights from end to end), the cache's layout, and the hyper-parameters the engine
/// read. Two files that differ anywhere in those get different identities; the whole weights
/// are not hashed (seconds for a 2 GB file at every load), so two files equal in every sampled
/// byte but not elsewhere would share one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelIdentity(pub [u8; 32]);

/// Bytes hashed at each sampled place of the weights, and how many places.
const SAMPLE: u64 = 64 << 10;
const SAMPLES: u64 = 64;

impl ModelIdentity {
    pub fn of(path: &Path, facts: &str) -> Result<Self> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mut h = Sha256::new();
        h.update(b"smolcandle kv identity\0");
        h.update(FORMAT.to_le_bytes());
        h.update(facts.as_bytes());
        h.update(len.to_le_bytes());
        let mut buf = vec![0u8; SAMPLE as usize];
        // The header (metadata, tensor names, types and shapes) is in the first bytes.
        for i in 0..=SAMPLES {
            let at = if i == 0 {
                0
            } else {
                (len.saturating_sub(SAMPLE)) / SAMPLES * i
            };
            file.seek(SeekFrom::Start(at)).map_err(io)?;
            let n = read_up_to(&mut file, &mut buf).map_err(io)?;
            h.update(&buf[..n]);
        }
        Ok(Self(h.finalize().into()))
    }

    /// The directory name of this identity's files.
    fn dir_name(&self) -> String {
        hex(&self.0[..12])
    }
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A tenant as the files name it: a hash, never the tenant's name (an API key, a session).
fn scope_hash(scope: &CacheScope) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"smolcandle kv scope\0");
    match scope {
        CacheScope::Shared => h.update(b"shared"),
        CacheScope::Tenant(t) => {
            h.update(b"tenant:");
            h.update(t.as_bytes());
        }
        CacheScope::Private => h.update(b"private"),
    }
    h.finalize().into()
}

/// One file's header, as read back.
struct Header {
    scope: [u8; 32],
    tokens: Vec<u32>,
    payload_len: u64,
    payload_crc: u32,
    /// Where the payload starts.
    payload_at: usize,
}

fn shape_of(cache: &KvCache) -> [u32; 4] {
    let (layers, heads, head_dim, kind) = cache.shape();
    [layers as u32, heads as u32, head_dim as u32, kind as u32]
}

fn header_bytes(
    identity: &ModelIdentity,
    scope: &[u8; 32],
    shape: [u32; 4],
    tokens: &[u32],
    payload_len: u64,
    payload_crc: u32,
) -> Vec<u8> {
    let mut b = Vec::with_capacity(FIXED_HEADER + 4 * tokens.len() + 4);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&FORMAT.to_le_bytes());
    b.extend_from_slice(&identity.0);
    b.extend_from_slice(scope);
    for x in shape {
        b.extend_from_slice(&x.to_le_bytes());
    }
    b.extend_from_slice(&(tokens.len() as u64).to_le_bytes());
    b.extend_from_slice(&payload_len.to_le_bytes());
    b.extend_from_slice(&payload_crc.to_le_bytes());
    for t in tokens {
        b.extend_from_slice(&t.to_le_bytes());
    }
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// Why a file is not used, and whether it is to be removed: a damaged file, or one another
/// model wrote where this one looks, is; one another replica may use (a later format, a longer
/// context) or that could not be read just now is left alone.
struct Refusal {
    reason: String,
    remove: bool,
}

fn damaged(reason: impl Into<String>) -> Refusal {
    Refusal {
        reason: reason.into(),
        remove: true,
    }
}

fn not_for_us(reason: impl Into<String>) -> Refusal {
    Refusal {
        reason: reason.into(),
        remove: false,
    }
}

/// Reads and verifies a file's header: its magic, format, identity, shape and checksum, and
/// that the file is as long as it says. Why it is refused otherwise.
fn read_header(
    file: &mut File,
    identity: &ModelIdentity,
    shape: [u32; 4],
    max_tokens: usize,
) -> std::result::Result<Header, Refusal> {
    let len = file
        .metadata()
        .map_err(|e| not_for_us(e.to_string()))?
        .len();
    let mut fixed = [0u8; FIXED_HEADER];
    file.read_exact(&mut fixed)
        .map_err(|_| damaged("shorter than a header"))?;
    if &fixed[..4] != MAGIC {
        return Err(damaged("not a key/value file"));
    }
    let u32_at = |at: usize| u32::from_le_bytes(fixed[at..at + 4].try_into().unwrap());
    let u64_at = |at: usize| u64::from_le_bytes(fixed[at..at + 8].try_into().unwrap());
    if u32_at(4) != FORMAT {
        return Err(not_for_us(format!(
            "format {} (this build reads {FORMAT})",
            u32_at(4)
        )));
    }
    if fixed[8..40] != identity.0 {
        return Err(damaged("written by another model file or cache layout"));
    }
    let scope: [u8; 32] = fixed[40..72].try_into().unwrap();
    let stored = [u32_at(72), u32_at(76), u32_at(80), u32_at(84)];
    if stored != shape {
        return Err(damaged("written for another cache shape"));
    }
    let n_tokens = u64_at(88);
    let payload_len = u64_at(96);
    let payload_crc = u32_at(104);
    if n_tokens == 0 {
        return Err(damaged("no tokens"));
    }
    if n_tokens > max_tokens as u64 {
        return Err(not_for_us(format!(
            "{n_tokens} tokens, more than this context"
        )));
    }
    let n_tokens = n_tokens as usize;
    let mut rest = vec![0u8; 4 * n_tokens + 4];
    file.read_exact(&mut rest)
        .map_err(|_| damaged("truncated in its tokens"))?;
    let (token_bytes, crc) = rest.split_at(4 * n_tokens);
    let mut all = fixed.to_vec();
    all.extend_from_slice(token_bytes);
    if crc32fast::hash(&all).to_le_bytes() != crc {
        return Err(damaged("its header's checksum does not match"));
    }
    let payload_at = FIXED_HEADER + 4 * n_tokens + 4;
    let whole = (payload_at as u64).checked_add(payload_len);
    if whole != Some(len) {
        return Err(damaged(format!(
            "{len} bytes long where its header says {whole:?}"
        )));
    }
    let tokens = token_bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    Ok(Header {
        scope,
        tokens,
        payload_len,
        payload_crc,
        payload_at,
    })
}

struct Entry {
    file: PathBuf,
    scope: [u8; 32],
    tokens: Vec<u32>,
    bytes: u64,
    used: SystemTime,
}

/// Counters of the disk tier, for `/status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskStats {
    pub files: usize,
    pub bytes: u64,
    pub hits: u64,
    pub reused_tokens: u64,
    pub writes: u64,
    /// Files refused: another model's, damaged, or unreadable.
    pub refused: u64,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    reused_tokens: AtomicU64,
    writes: AtomicU64,
    refused: AtomicU64,
}

/// The files known, shared by the engine thread (which reads them) and the writer.
struct Index {
    entries: Vec<Entry>,
    /// The directory's modification time when it was last read, to notice other replicas'
    /// files.
    scanned: Option<SystemTime>,
}

struct Shared {
    dir: PathBuf,
    identity: ModelIdentity,
    /// An empty cache of the model's shape: what files are read into.
    template: KvCache,
    shape: [u32; 4],
    max_tokens: usize,
    budget: u64,
    index: Mutex<Index>,
    counters: Counters,
}

struct Job {
    tokens: Vec<u32>,
    cache: KvCache,
    scope: [u8; 32],
}

pub struct DiskTier {
    shared: Arc<Shared>,
    writer: Option<SyncSender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl DiskTier {
    /// The tier under `root`, for the model `identity` names, whose caches look like
    /// `template` and hold at most `max_tokens` positions, within `budget` bytes.
    pub fn open(
        root: &Path,
        identity: ModelIdentity,
        template: KvCache,
        max_tokens: usize,
        budget: u64,
    ) -> Result<Self> {
        let dir = root.join(identity.dir_name());
        fs::create_dir_all(&dir).map_err(|source| Error::Io {
            path: dir.clone(),
            source,
        })?;
        let shape = shape_of(&template);
        let shared = Arc::new(Shared {
            dir,
            identity,
            template,
            shape,
            max_tokens,
            budget,
            index: Mutex::new(Index {
                entries: Vec::new(),
                scanned: None,
            }),
            counters: Counters::default(),
        });
        shared.rescan();
        shared.evict();
        let (tx, rx) = mpsc::sync_channel(WRITES_WAITING);
        let writer = shared.clone();
        let thread = std::thread::Builder::new()
            .name("smolcandle-kv-writer".into())
            .spawn(move || writer.write_all(rx))
            .map_err(|e| Error::Inference(format!("starting the key/value writer: {e}")))?;
        Ok(Self {
            shared,
            writer: Some(tx),
            thread: Some(thread),
        })
    }

    /// A handle that reads [`Self::stats`] from another thread.
    pub fn watch(&self) -> DiskWatch {
        DiskWatch(self.shared.clone())
    }

    pub fn stats(&self) -> DiskStats {
        self.shared.stats()
    }
}

/// Reads a [`DiskTier`]'s counters from any thread.
#[derive(Clone)]
pub struct DiskWatch(Arc<Shared>);

impl DiskWatch {
    pub fn stats(&self) -> DiskStats {
        self.0.stats()
    }
}

impl Shared {
    fn stats(&self) -> DiskStats {
        let c = &self.counters;
        let (files, bytes) = self
            .index
            .lock()
            .map(|i| (i.entries.len(), i.entries.iter().map(|e| e.bytes).sum()))
            .unwrap_or_default();
        DiskStats {
            files,
            bytes,
            hits: c.hits.load(Ordering::Relaxed),
            reused_tokens: c.reused_tokens.load(Ordering::Relaxed),
            writes: c.writes.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
        }
    }
}

impl DiskTier {
    /// The longest prefix of `prompt` a file of `scope` holds, if longer than `than`
    /// positions, read into a cache with room for `room` positions.
    pub fn lookup(
        &self,
        prompt: &[u32],
        scope: &CacheScope,
        than: usize,
        room: usize,
    ) -> Option<(KvCache, usize)> {
        if *scope == CacheScope::Private {
            return None;
        }
        self.shared.rescan_if_changed();
        let hash = scope_hash(scope);
        let (file, n) = {
            let index = self.shared.index.lock().ok()?;
            index
                .entries
                .iter()
                .filter(|e| e.scope == hash)
                .map(|e| (&e.file, common_prefix(&e.tokens, prompt)))
                .max_by_key(|(_, n)| *n)
                .filter(|(_, n)| *n > than)
                .map(|(f, n)| (f.clone(), n))?
        };
        match self.shared.read(&file, &hash, prompt, n, room) {
            Ok(cache) => {
                let c = &self.shared.counters;
                c.hits.fetch_add(1, Ordering::Relaxed);
                c.reused_tokens.fetch_add(n as u64, Ordering::Relaxed);
                Some((cache, n))
            }
            Err(Refusal { reason, remove }) => {
                tracing::warn!(file = %file.display(), %reason, "refused a stored key/value file");
                if remove {
                    self.shared.counters.refused.fetch_add(1, Ordering::Relaxed);
                }
                self.shared.forget(&file, remove);
                None
            }
        }
    }

    /// Hands `cache`, holding the keys and values of `tokens` (at least), to the writer.
    pub fn store(&self, tokens: Vec<u32>, cache: KvCache, scope: &CacheScope) {
        if tokens.len() < DISK_MIN_TOKENS || *scope == CacheScope::Private {
            return;
        }
        let hash = scope_hash(scope);
        let covered = self.shared.index.lock().is_ok_and(|i| {
            i.entries
                .iter()
                .any(|e| e.scope == hash && e.tokens.starts_with(&tokens))
        });
        if covered || cache.len() < tokens.len() {
            return;
        }
        if let Some(w) = &self.writer {
            let job = Job {
                tokens,
                cache,
                scope: hash,
            };
            if let Err(TrySendError::Full(_)) = w.try_send(job) {
                // Storing is best effort: the writer is behind, and the caches waiting for
                // it would hold memory without bound.
                tracing::debug!("the key/value writer is busy; a prefix is not stored");
            }
        }
    }
}

impl Drop for DiskTier {
    fn drop(&mut self) {
        drop(self.writer.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Shared {
    /// Reads the index from the directory: every file's header, refusing those that do not
    /// verify.
    fn rescan(&self) {
        let scanned = fs::metadata(&self.dir).and_then(|m| m.modified()).ok();
        let mut entries = Vec::new();
        if let Ok(dir) = fs::read_dir(&self.dir) {
            for item in dir.flatten() {
                let path = item.path();
                if path.extension().is_some_and(|e| e == "tmp") {
                    let age = item
                        .metadata()
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok());
                    if age.is_some_and(|a| a > STALE_TMP) {
                        let _ = fs::remove_file(&path);
                    }
                    continue;
                }
                if path.extension().is_none_or(|e| e != "kv") {
                    continue;
                }
                match self.header(&path) {
                    Ok((header, bytes, used)) => entries.push(Entry {
                        file: path,
                        scope: header.scope,
                        tokens: header.tokens,
                        bytes,
                        used,
                    }),
                    Err(Refusal { reason, remove }) => {
                        tracing::warn!(file = %path.display(), %reason, "refused a stored key/value file");
                        if remove {
                            self.counters.refused.fetch_add(1, Ordering::Relaxed);
                            let _ = fs::remove_file(&path);
                        }
                    }
                }
            }
        }
        if let Ok(mut index) = self.index.lock() {
            index.entries = entries;
            index.scanned = scanned;
        }
    }

    fn rescan_if_changed(&self) {
        let now = fs::metadata(&self.dir).and_then(|m| m.modified()).ok();
        let seen = self.index.lock().map(|i| i.scanned).unwrap_or_default();
        if now != seen {
            self.rescan();
        }
    }

    fn header(&self, path: &Path) -> std::result::Result<(Header, u64, SystemTime), Refusal> {
        let mut file = File::open(path).map_err(|e| not_for_us(e.to_string()))?;
        let meta = file.metadata().map_err(|e| not_for_us(e.to_string()))?;
        let header = read_header(&mut file, &self.identity, self.shape, self.max_tokens)?;
        let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        Ok((header, meta.len(), used))
    }

    /// The first `n` positions of a file, verified, with room for `room` positions.
    fn read(
        &self,
        path: &Path,
        scope: &[u8; 32],
        prompt: &[u32],
        n: usize,
        room: usize,
    ) -> std::result::Result<KvCache, Refusal> {
        let mut file = File::open(path).map_err(|e| not_for_us(e.to_string()))?;
        let header = read_header(&mut file, &self.identity, self.shape, self.max_tokens)?;
        if header.scope != *scope
            || header.tokens.len() < n
            || prompt.len() < n
            || header.tokens[..n] != prompt[..n]
        {
            return Err(not_for_us("its header changed since it was indexed"));
        }
        // SAFETY: the file is only ever replaced by a rename, never written in place, so the
        // mapped bytes do not change under us; its length was checked against the header.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| not_for_us(e.to_string()))?;
        let payload = map
            .get(header.payload_at..)
            .filter(|p| p.len() as u64 == header.payload_len)
            .ok_or_else(|| damaged("truncated"))?;
        if crc32fast::hash(payload) != header.payload_crc {
            return Err(damaged("its keys and values do not match their checksum"));
        }
        let cache = self
            .template
            .read_positions(payload, header.tokens.len(), n, room)
            .map_err(|e| damaged(e.to_string()))?;
        let _ = file.set_modified(SystemTime::now());
        if let Ok(mut index) = self.index.lock() {
            if let Some(e) = index.entries.iter_mut().find(|e| e.file == path) {
                e.used = SystemTime::now();
            }
        }
        Ok(cache)
    }

    /// Drops a file from the index, and from the disk when `remove`.
    fn forget(&self, path: &Path, remove: bool) {
        if remove {
            let _ = fs::remove_file(path);
        }
        if let Ok(mut index) = self.index.lock() {
            index.entries.retain(|e| e.file != path);
        }
    }

    /// The writer thread's loop.
    fn write_all(&self, jobs: Receiver<Job>) {
        loop {
            let job = match jobs.try_recv() {
                Ok(job) => job,
                Err(TryRecvError::Disconnected) => return,
                Err(TryRecvError::Empty) => {
                    // Idle: the caches written and the write buffers (freed on this thread, in
                    // its own arena) go back to the system rather than stay resident.
                    crate::engine::release_memory();
                    match jobs.recv() {
                        Ok(job) => job,
                        Err(_) => return,
                    }
                }
            };
            if let Err(e) = self.write(&job) {
                tracing::warn!(error = %e, dir = %self.dir.display(), "could not store a prefix's keys and values");
            }
        }
    }

    fn write(&self, job: &Job) -> std::io::Result<()> {
        let mut name = Sha256::new();
        name.update(job.scope);
        for t in &job.tokens {
            name.update(t.to_le_bytes());
        }
        let name: [u8; 32] = name.finalize().into();
        let path = self.dir.join(format!("{}.kv", hex(&name[..16])));
        let payload_len = job.cache.positions_bytes(job.tokens.len()) as u64;
        if payload_len > self.budget {
            return Ok(());
        }
        if !path.exists() {
            let nanos = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let tmp = self.dir.join(format!(
                ".{}.{}.{nanos}.tmp",
                hex(&name[..16]),
                std::process::id()
            ));
            let written = (|| {
                let mut file = File::create(&tmp)?;
                let blank = header_bytes(&self.identity, &job.scope, self.shape, &job.tokens, 0, 0);
                file.write_all(&blank)?;
                let mut out = Crc32Writer {
                    inner: BufWriter::with_capacity(1 << 20, &mut file),
                    crc: crc32fast::Hasher::new(),
                };
                job.cache.write_positions(job.tokens.len(), &mut out)?;
                let crc = out.crc.clone().finalize();
                out.inner.flush()?;
                drop(out);
                let header = header_bytes(
                    &self.identity,
                    &job.scope,
                    self.shape,
                    &job.tokens,
                    payload_len,
                    crc,
                );
                file.seek(SeekFrom::Start(0))?;
                file.write_all(&header)?;
                fs::rename(&tmp, &path)
            })();
            if let Err(e) = written {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
            self.counters.writes.fetch_add(1, Ordering::Relaxed);
        }
        let bytes = fs::metadata(&path)?.len();
        if let Ok(mut index) = self.index.lock() {
            // A longer prefix serves every prompt the shorter ones it extends served.
            let mut gone = Vec::new();
            index.entries.retain(|e| {
                let extended = e.scope == job.scope
                    && e.tokens.len() <= job.tokens.len()
                    && job.tokens.starts_with(&e.tokens);
                if extended {
                    gone.push(e.file.clone());
                }
                !extended
            });
            for file in gone.iter().filter(|f| **f != path) {
                let _ = fs::remove_file(file);
            }
            index.entries.push(Entry {
                file: path,
                scope: job.scope,
                tokens: job.tokens.clone(),
                bytes,
                used: SystemTime::now(),
            });
            index.scanned = fs::metadata(&self.dir).and_then(|m| m.modified()).ok();
        }
        self.evict();
        Ok(())
    }

    /// Removes the least recently used files until the budget holds.
    fn evict(&self) {
        let Ok(mut index) = self.index.lock() else {
            return;
        };
        let mut used: u64 = index.entries.iter().map(|e| e.bytes).sum();
        while used > self.budget {
            let Some(oldest) = index
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.used)
                .map(|(i, _)| i)
            else {
                break;
            };
            let e = index.entries.swap_remove(oldest);
            let _ = fs::remove_file(&e.file);
            used -= e.bytes;
        }
        index.scanned = fs::metadata(&self.dir).and_then(|m| m.modified()).ok();
    }
}

/// A writer that checksums what passes through it.
struct Crc32Writer<W: Write> {
    inner: W,
    crc: crc32fast::Hasher,
}

impl<W: Write> Write for Crc32Writer<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::KvType;

    const N_CTX: usize = 4096;

    fn identity(name: &str) -> ModelIdentity {
        ModelIdentity(Sha256::digest(name.as_bytes()).into())
    }

    fn tier(root: &Path, model: &str, kind: KvType, budget: u64) -> DiskTier {
        let template = KvCache::numbered(kind, 2, 0, 0.0);
        DiskTier::open(root, identity(model), template, N_CTX, budget).unwrap()
    }

    fn tokens(n: usize, first: u32) -> Vec<u32> {
        (0..n as u32).map(|i| first + i).collect()
    }

    fn scope(name: &str) -> CacheScope {
        CacheScope::Tenant(name.into())
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("smolcandle-disk-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_stored_prefix_reads_back_bit_for_bit_after_a_restart() {
        for kind in [KvType::F32, KvType::F16, KvType::Q8_0] {
            let root = temp_dir(&format!("roundtrip-{}", kind.name()));
            let cache = KvCache::numbered(kind, 2, 200, 3.0);
            let t = tokens(200, 5);
            {
                let disk = tier(&root, "m", kind, 1 << 30);
                disk.store(t.clone(), KvCache::numbered(kind, 2, 200, 3.0), &scope("a"));
            } // dropped: the writer finishes, as at shutdown
            let disk = tier(&root, "m", kind, 1 << 30);
            assert_eq!(disk.stats().files, 1);
            let mut prompt = t[..150].to_vec();
            prompt.push(99_999);
            assert!(
                disk.lookup(&prompt, &scope("b"), 0, 200).is_none(),
                "another tenant"
            );
            assert!(
                disk.lookup(&prompt, &scope("a"), 150, 200).is_none(),
                "no longer than memory's"
            );
            let (read, n) = disk.lookup(&prompt, &scope("a"), 0, 200).unwrap();
            assert_eq!(n, 150);
            assert_eq!(read.bytes_of(150), cache.bytes_of(150), "{}", kind.name());
            let s = disk.stats();
            assert_eq!((s.hits, s.reused_tokens, s.refused), (1, 150, 0));
            let _ = fs::remove_dir_all(&root);
        }
    }

    #[test]
    fn files_of_another_model_or_damaged_are_refused() {
        let root = temp_dir("refused");
        let t = tokens(100, 0);
        {
            let disk = tier(&root, "model-a", KvType::F32, 1 << 30);
            disk.store(
                t.clone(),
                KvCache::numbered(KvType::F32, 2, 100, 0.0),
                &scope("a"),
            );
        }
        let a_dir = root.join(identity("model-a").dir_name());
        let file = fs::read_dir(&a_dir)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        // Another model's directory holds nothing of model a's.
        let b = tier(&root, "model-b", KvType::F32, 1 << 30);
        assert_eq!(b.stats().files, 0);
        assert!(b.lookup(&t, &scope("a"), 0, 100).is_none());
        drop(b);
        // A file of model a's copied where model b looks is refused, and removed.
        let b_dir = root.join(identity("model-b").dir_name());
        fs::copy(&file, b_dir.join("copied.kv")).unwrap();
        let b = tier(&root, "model-b", KvType::F32, 1 << 30);
        assert_eq!((b.stats().files, b.stats().refused), (0, 1));
        assert!(!b_dir.join("copied.kv").exists());
        // Another cache layout of the same model is another shape: refused too.
        fs::copy(&file, a_dir.join("copy.kv")).unwrap();
        let q8 = DiskTier::open(
            &root,
            identity("model-a"),
            KvCache::numbered(KvType::Q8_0, 2, 0, 0.0),
            N_CTX,
            1 << 30,
        )
        .unwrap();
        assert_eq!(q8.stats().files, 0);
        drop(q8);
        // A flipped byte in the keys and values fails the checksum when read.
        {
            let disk = tier(&root, "model-a", KvType::F32, 1 << 30);
            disk.store(
                t.clone(),
                KvCache::numbered(KvType::F32, 2, 100, 0.0),
                &scope("a"),
            );
        }
        let file = fs::read_dir(&a_dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "kv"))
            .unwrap();
        let mut bytes = fs::read(&file).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&file, bytes).unwrap();
        let disk = tier(&root, "model-a", KvType::F32, 1 << 30);
        assert_eq!(disk.stats().files, 1, "the header still verifies");
        assert!(disk.lookup(&t, &scope("a"), 0, 100).is_none());
        assert_eq!((disk.stats().files, disk.stats().refused), (0, 1));
        assert!(!file.exists());
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn a_longer_turn_replaces_the_shorter_and_the_budget_holds() {
        let root = temp_dir("budget");
        let one = KvCache::numbered(KvType::F32, 2, 300, 0.0);
        let per_file = (one.positions_bytes(100) + 1000) as u64;
        {
            let disk = tier(&root, "m", KvType::F32, 3 * per_file);
            let conversation = tokens(300, 0);
            disk.store(
                conversation[..100].to_vec(),
                KvCache::numbered(KvType::F32, 2, 100, 0.0),
                &scope("a"),
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
            disk.store(
                conversation[..150].to_vec(),
                KvCache::numbered(KvType::F32, 2, 150, 0.0),
                &scope("a"),
            );
        }
        let disk = tier(&root, "m", KvType::F32, 3 * per_file);
        assert_eq!(
            disk.stats().files,
            1,
            "the next turn's file replaced the first's"
        );
        drop(disk);
        {
            let disk = tier(&root, "m", KvType::F32, 3 * per_file);
            for i in 0..4 {
                disk.store(
                    tokens(100, 1000 * (i + 1)),
                    KvCache::numbered(KvType::F32, 2, 100, 0.0),
                    &scope("b"),
                );
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        let disk = tier(&root, "m", KvType::F32, 3 * per_file);
        let s = disk.stats();
        assert!(s.bytes <= 3 * per_file, "{s:?}");
        assert!(
            disk.lookup(&tokens(101, 4000), &scope("b"), 0, 101)
                .is_some(),
            "the newest stays"
        );
        assert!(
            disk.lookup(&tokens(101, 0), &scope("a"), 0, 101).is_none(),
            "the oldest went"
        );
        let _ = fs::remove_dir_all(&root);
    }
}
