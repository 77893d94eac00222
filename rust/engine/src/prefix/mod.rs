//! Reuse of computed key/value state across requests. When a generation ends, its cache is
//! kept, keyed by its tokens: the prompt's, and the generated ones' too where the model is
//! batch-invariant ([`crate::model::Model::batch_invariant`]). A new request starts from a copy of the
//! longest kept prefix of its prompt: the next turn of a conversation computes only the new
//! message (and, on other models, the previous answer), and a system prompt shared by many
//! requests is computed once.
//!
//! - `tree`: in memory, a tree of token segments per tenant, so that many conversations sharing
//!   a system prompt and tools hold it once; bounded by a byte budget, least recently used
//!   segments out first;
//! - `disk`: on disk, under the model's identity, so that a restart does not compute a
//!   conversation again; bounded by its own budget.
//!
//! Keys and values depend only on the tokens before them, and what is kept was computed as a
//! cold start computes it (and is stored bit for bit), so a reused prefix gives exactly a cold
//! start's state.
//!
//! Reuse never crosses tenants: a request starts only from caches kept for its own
//! [`CacheScope`], so neither its speed nor the `cached_tokens` it reports tells it anything
//! about another tenant's prompts.

mod disk;
mod tree;

pub use disk::{DiskStats, DiskTier, DiskWatch, ModelIdentity, DISK_MIN_TOKENS};

use crate::error::Result;
use crate::model::KvCache;
use tree::Tree;

/// Whose kept caches a request may start from, and for whom its own is kept.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub enum CacheScope {
    /// Shared by every request of this scope: one caller alone in its process.
    #[default]
    Shared,
    /// Only this tenant's requests (a browser session, an API key).
    Tenant(String),
    /// Neither starts from a kept cache nor leaves one (an anonymous client).
    Private,
}

/// Counters for `/status` and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Prefixes held in memory (conversations, or their shared parts, that were kept).
    pub entries: usize,
    /// The segments they are held in (a shared part is held once).
    pub segments: usize,
    pub bytes: usize,
    pub hits: u64,
    pub misses: u64,
    pub reused_tokens: u64,
    pub evictions: u64,
    /// The disk tier's, when there is one.
    pub disk: Option<DiskStats>,
}

pub struct PrefixCache {
    tree: Tree,
    budget: usize,
    stats: PrefixStats,
    disk: Option<DiskTier>,
}

/// A file must hold this many more positions than memory does to be read instead.
const DISK_GAIN: usize = 32;

impl PrefixCache {
    /// `budget` bytes of kept caches in memory at most; 0 keeps none there.
    pub fn new(budget: usize) -> Self {
        Self {
            tree: Tree::default(),
            budget,
            stats: PrefixStats::default(),
            disk: None,
        }
    }

    /// A handle on the disk tier's counters, if there is one.
    pub fn disk_watch(&self) -> Option<DiskWatch> {
        self.disk.as_ref().map(|d| d.watch())
    }

    /// Keeps finished prefixes on disk too, and reads them back.
    pub fn with_disk(mut self, disk: DiskTier) -> Self {
        self.disk = Some(disk);
        self
    }

    pub fn stats(&self) -> PrefixStats {
        PrefixStats {
            entries: self.tree.prefixes(),
            segments: self.tree.segments(),
            bytes: self.tree.bytes(),
            disk: self.disk.as_ref().map(|d| d.stats()),
            ..self.stats
        }
    }

    /// A fresh cache holding the longest prefix of `prompt` kept for `scope` (in memory or on
    /// disk) that still leaves one prompt token to compute (its logits give the first generated
    /// token), with room for the whole prompt, and that prefix's length.
    pub fn lookup(
        &mut self,
        prompt: &[u32],
        scope: &CacheScope,
    ) -> Result<Option<(KvCache, usize)>> {
        if prompt.len() < 2 || *scope == CacheScope::Private {
            return Ok(None);
        }
        let limit = prompt.len() - 1;
        let (mut path, mut n) = self.tree.walk(&prompt[..limit], scope);
        let from_disk = self
            .disk
            .as_ref()
            .and_then(|d| d.lookup(&prompt[..limit], scope, n + DISK_GAIN, prompt.len()));
        if let Some((cache, m)) = from_disk {
            self.stats.hits += 1;
            self.stats.reused_tokens += m as u64;
            return Ok(Some((cache, m)));
        }
        path.retain(|&(_, take)| take > 0);
        if n == 0 || path.is_empty() {
            self.stats.misses += 1;
            return Ok(None);
        }
        self.tree.touch(&path);
        // Room for the whole prompt: its computation then writes after the copied positions
        // without growing (and so copying) the cache again.
        let cache = self.tree.assemble(&path, prompt.len())?;
        n = cache.len();
        self.stats.hits += 1;
        self.stats.reused_tokens += n as u64;
        Ok(Some((cache, n)))
    }

    /// Whether the memory tier keeps anything.
    pub fn keeps(&self) -> bool {
        self.budget > 0
    }

    /// Keeps the keys and values of `tokens` (the first positions of `cache`, which goes on
    /// being used) in memory only: a prompt just read, for requests waiting to start from it.
    pub fn keep(&mut self, tokens: &[u32], cache: &KvCache, scope: &CacheScope) {
        if self.budget == 0 || tokens.is_empty() || *scope == CacheScope::Private {
            return;
        }
        let (_, covered) = self.tree.walk(tokens, scope);
        if cache.len() < tokens.len() || cache.positions_bytes(tokens.len() - covered) > self.budget
        {
            return;
        }
        match self.tree.insert(tokens, cache, scope) {
            Ok(_) => self.stats.evictions += self.tree.evict_to(self.budget),
            Err(e) => tracing::warn!(error = %e, "could not keep a prompt's cache"),
        }
    }

    /// Keeps the keys and values of `tokens`, the first positions of `cache`: in memory the
    /// positions no kept segment holds yet (then the least recently used segments go until
    /// the budget holds), on disk the whole prefix.
    pub fn insert(&mut self, tokens: &[u32], cache: KvCache, scope: &CacheScope) {
        if tokens.is_empty() || *scope == CacheScope::Private || cache.len() < tokens.len() {
            return;
        }
        if self.budget > 0 {
            let (_, covered) = self.tree.walk(tokens, scope);
            let new = cache.positions_bytes(tokens.len() - covered);
            if new <= self.budget {
                match self.tree.insert(tokens, &cache, scope) {
                    Ok(_) => self.stats.evictions += self.tree.evict_to(self.budget),
                    Err(e) => {
                        tracing::warn!(error = %e, "could not keep a finished prompt's cache")
                    }
                }
            }
        }
        if let Some(disk) = &self.disk {
            disk.store(tokens.to_vec(), cache, scope);
        }
    }
}

pub(crate) fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::common_prefix;

    #[test]
    fn common_prefix_counts_equal_leading_tokens() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4, 5]), 2);
        assert_eq!(common_prefix(&[1, 2], &[1, 2, 3]), 2);
        assert_eq!(common_prefix(&[], &[1]), 0);
        assert_eq!(common_prefix(&[9], &[1]), 0);
    }
}
