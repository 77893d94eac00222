//! Reuse of computed key/value state across requests. When a generation ends, its cache is
//! kept, keyed by its tokens: the prompt's, and the generated ones' too where the model is
//! batch-invariant ([`crate::model::Model::batch_invariant`]). A new request starts from a copy of the
//! longest cached prefix of its prompt: the next turn of a conversation computes only the new
//! message (and, on other models, the previous answer), and a system prompt shared by many
//! requests is computed once. The kept caches are bounded by a byte budget, least recently used
//! first out.
//!
//! Keys and values depend only on the tokens before them, and what is kept was computed as a
//! cold start computes it, so a reused prefix gives exactly a cold start's state.
//!
//! Reuse never crosses tenants: a request starts only from caches kept for its own
//! [`CacheScope`], so neither its speed nor the `cached_tokens` it reports tells it anything
//! about another tenant's prompts.

use crate::error::Result;
use crate::model::KvCache;

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

struct Entry {
    scope: CacheScope,
    tokens: Vec<u32>,
    cache: KvCache,
    bytes: usize,
    last_used: u64,
}

/// Counters for `/status` and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    pub entries: usize,
    pub bytes: usize,
    pub hits: u64,
    pub misses: u64,
    pub reused_tokens: u64,
    pub evictions: u64,
}

pub struct PrefixCache {
    entries: Vec<Entry>,
    budget: usize,
    clock: u64,
    stats: PrefixStats,
}

impl PrefixCache {
    /// `budget` bytes of kept caches at most; 0 turns reuse off.
    pub fn new(budget: usize) -> Self {
        Self {
            entries: Vec::new(),
            budget,
            clock: 0,
            stats: PrefixStats::default(),
        }
    }

    pub fn stats(&self) -> PrefixStats {
        PrefixStats {
            entries: self.entries.len(),
            bytes: self.entries.iter().map(|e| e.bytes).sum(),
            ..self.stats
        }
    }

    /// A fresh cache holding the longest prefix of `prompt` kept for `scope` that still leaves
    /// one prompt token to compute (its logits give the first generated token), and that
    /// prefix's length.
    pub fn lookup(
        &mut self,
        prompt: &[u32],
        scope: &CacheScope,
    ) -> Result<Option<(KvCache, usize)>> {
        if self.budget == 0 || prompt.len() < 2 || *scope == CacheScope::Private {
            return Ok(None);
        }
        let limit = prompt.len() - 1;
        let best = self
            .entries
            .iter_mut()
            .filter(|e| e.scope == *scope)
            .map(|e| {
                let n = common_prefix(&e.tokens, prompt).min(limit);
                (n, e)
            })
            .max_by_key(|(n, e)| (*n, e.last_used));
        let Some((n, entry)) = best.filter(|(n, _)| *n > 0) else {
            self.stats.misses += 1;
            return Ok(None);
        };
        self.clock += 1;
        entry.last_used = self.clock;
        // Room for the whole prompt: its computation then writes after the copied positions
        // without growing (and so copying) the cache again.
        let cache = entry.cache.prefix(n, prompt.len())?;
        self.stats.hits += 1;
        self.stats.reused_tokens += n as u64;
        Ok(Some((cache, n)))
    }

    /// Whether [`Self::insert`] would keep a cache of `bytes` for `tokens`: reuse is on, it fits
    /// the budget, and no kept entry covers it already (one for a longer prompt that starts
    /// with these tokens). Asked before cutting a finished cache to size, a copy.
    pub fn admits(&self, tokens: &[u32], bytes: usize, scope: &CacheScope) -> bool {
        self.budget > 0
            && *scope != CacheScope::Private
            && !tokens.is_empty()
            && bytes <= self.budget
            && !self.entries.iter().any(|e| {
                e.scope == *scope && e.tokens.len() > tokens.len() && e.tokens.starts_with(tokens)
            })
    }

    /// Keeps `cache`, which holds the keys and values of `tokens`. Entries it extends are
    /// dropped (it serves every prompt they served); then the least recently used ones go until
    /// the budget holds.
    pub fn insert(&mut self, tokens: Vec<u32>, cache: KvCache, scope: CacheScope) {
        debug_assert_eq!(tokens.len(), cache.len());
        let bytes = cache.bytes();
        if !self.admits(&tokens, bytes, &scope) {
            return;
        }
        self.entries.retain(|e| {
            !(e.scope == scope && e.tokens.len() <= tokens.len() && tokens.starts_with(&e.tokens))
        });
        self.clock += 1;
        self.entries.push(Entry {
            scope,
            tokens,
            cache,
            bytes,
            last_used: self.clock,
        });
        let mut used: usize = self.entries.iter().map(|e| e.bytes).sum();
        while used > self.budget {
            let (oldest, _) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_used)
                .expect("over budget means not empty");
            used -= self.entries.swap_remove(oldest).bytes;
            self.stats.evictions += 1;
        }
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
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
