//! The kept prefixes in memory: one tree of token segments per scope (a radix tree), each
//! segment holding its positions' keys and values once. Conversations that share a system
//! prompt and tools share the segment that holds them; each conversation's own turns hang
//! below it. A prefix is assembled for a request by joining the segments along its path.

use std::collections::HashMap;

use super::{common_prefix, CacheScope};
use crate::error::Result;
use crate::model::KvCache;

const NONE: usize = usize::MAX;

struct Node {
    /// The segment's tokens (empty at a scope's root).
    tokens: Vec<u32>,
    /// Their keys and values: exactly `tokens.len()` positions, following the segments above.
    kv: KvCache,
    parent: usize,
    children: Vec<usize>,
    last_used: u64,
}

/// The segments along a path from a scope's root, with how many positions of each are taken.
pub(super) type Path = Vec<(usize, usize)>;

#[derive(Default)]
pub(super) struct Tree {
    nodes: Vec<Option<Node>>,
    free: Vec<usize>,
    roots: HashMap<CacheScope, usize>,
    bytes: usize,
    clock: u64,
}

impl Tree {
    /// Bytes of keys and values held.
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Segments held.
    pub(super) fn segments(&self) -> usize {
        self.nodes
            .iter()
            .flatten()
            .filter(|n| !n.tokens.is_empty())
            .count()
    }

    /// Prefixes held: the segments that end a path.
    pub(super) fn prefixes(&self) -> usize {
        self.nodes
            .iter()
            .flatten()
            .filter(|n| !n.tokens.is_empty() && n.children.is_empty())
            .count()
    }

    fn node(&self, id: usize) -> &Node {
        self.nodes[id].as_ref().expect("a live node")
    }

    fn node_mut(&mut self, id: usize) -> &mut Node {
        self.nodes[id].as_mut().expect("a live node")
    }

    fn add(&mut self, node: Node) -> usize {
        self.bytes += node.kv.bytes();
        match self.free.pop() {
            Some(id) => {
                self.nodes[id] = Some(node);
                id
            }
            None => {
                self.nodes.push(Some(node));
                self.nodes.len() - 1
            }
        }
    }

    /// The path `tokens` follows in `scope`'s tree, and the positions it covers.
    pub(super) fn walk(&self, tokens: &[u32], scope: &CacheScope) -> (Path, usize) {
        let mut path = Vec::new();
        let Some(&root) = self.roots.get(scope) else {
            return (path, 0);
        };
        let (mut at, mut pos) = (root, 0);
        while pos < tokens.len() {
            let next = self
                .node(at)
                .children
                .iter()
                .copied()
                .find(|&c| self.node(c).tokens.first() == Some(&tokens[pos]));
            let Some(child) = next else { break };
            let seg = &self.node(child).tokens;
            let m = common_prefix(seg, &tokens[pos..]);
            path.push((child, m));
            pos += m;
            if m < seg.len() {
                break;
            }
            at = child;
        }
        (path, pos)
    }

    /// Marks the segments of `path` as just used.
    pub(super) fn touch(&mut self, path: &Path) {
        self.clock += 1;
        let now = self.clock;
        for &(id, _) in path {
            self.node_mut(id).last_used = now;
        }
    }

    /// The positions of `path` joined in one cache with room for `room` positions.
    pub(super) fn assemble(&self, path: &Path, room: usize) -> Result<KvCache> {
        let parts: Vec<(&KvCache, usize)> = path
            .iter()
            .map(|&(id, take)| (&self.node(id).kv, take))
            .collect();
        parts[0].0.joined(&parts, room)
    }

    /// Keeps the keys and values of `tokens` (the first `tokens.len()` positions of `cache`)
    /// for `scope`: only the positions no segment holds yet are copied, into a new segment
    /// below the ones that hold the rest (one of which is split where the tokens part from it).
    /// The bytes it added.
    pub(super) fn insert(
        &mut self,
        tokens: &[u32],
        cache: &KvCache,
        scope: &CacheScope,
    ) -> Result<usize> {
        let (path, covered) = self.walk(tokens, scope);
        if covered >= tokens.len() {
            self.touch(&path);
            return Ok(0);
        }
        let kv = cache.segment(covered, tokens.len())?;
        let added = kv.bytes();
        let root = match self.roots.get(scope) {
            Some(&root) => root,
            None => {
                let root = self.add(Node {
                    tokens: Vec::new(),
                    kv: KvCache::empty(),
                    parent: NONE,
                    children: Vec::new(),
                    last_used: 0,
                });
                self.roots.insert(scope.clone(), root);
                root
            }
        };
        let mut parent = path.last().map_or(root, |&(id, _)| id);
        if let Some(&(id, m)) = path
            .last()
            .filter(|&&(id, m)| m < self.node(id).tokens.len())
        {
            parent = self.split(id, m)?;
        }
        let leaf = self.add(Node {
            tokens: tokens[covered..].to_vec(),
            kv,
            parent,
            children: Vec::new(),
            last_used: 0,
        });
        self.node_mut(parent).children.push(leaf);
        let mut path = path;
        path.push((leaf, 0));
        if let Some(last) = path.iter_mut().rev().nth(1) {
            last.0 = parent; // the split's upper half, if there was one
        }
        self.touch(&path);
        Ok(added)
    }

    /// Splits segment `id` after its first `m` tokens; the upper half takes its place in the
    /// tree, the lower half hangs below it. Returns the upper half.
    fn split(&mut self, id: usize, m: usize) -> Result<usize> {
        let node = self.node(id);
        let upper_kv = node.kv.segment(0, m)?;
        let lower_kv = node.kv.segment(m, node.tokens.len())?;
        let (parent, last_used) = (node.parent, node.last_used);
        let upper_tokens = node.tokens[..m].to_vec();
        let node = self.node_mut(id);
        let before = node.kv.bytes();
        node.tokens.drain(..m);
        node.kv = lower_kv;
        let after = node.kv.bytes();
        self.bytes = self.bytes - before + after;
        let upper = self.add(Node {
            tokens: upper_tokens,
            kv: upper_kv,
            parent,
            children: vec![id],
            last_used,
        });
        self.node_mut(id).parent = upper;
        for child in &mut self.node_mut(parent).children {
            if *child == id {
                *child = upper;
            }
        }
        Ok(upper)
    }

    /// Drops the least recently used segments that end a path until at most `budget` bytes
    /// are held. The number dropped.
    pub(super) fn evict_to(&mut self, budget: usize) -> u64 {
        let mut dropped = 0;
        while self.bytes > budget {
            let oldest = self
                .nodes
                .iter()
                .enumerate()
                .filter_map(|(id, n)| n.as_ref().map(|n| (id, n)))
                .filter(|(_, n)| n.children.is_empty() && n.parent != NONE)
                .min_by_key(|(_, n)| n.last_used)
                .map(|(id, _)| id);
            let Some(id) = oldest else { break };
            let node = self.nodes[id].take().expect("a live node");
            self.free.push(id);
            self.bytes -= node.kv.bytes();
            dropped += 1;
            let parent = self.node_mut(node.parent);
            parent.children.retain(|&c| c != id);
            if parent.parent == NONE && parent.children.is_empty() {
                self.nodes[node.parent] = None;
                self.free.push(node.parent);
                self.roots.retain(|_, root| *root != node.parent);
            }
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::KvType;

    fn tenant(name: &str) -> CacheScope {
        CacheScope::Tenant(name.into())
    }

    /// The tokens and cache of a conversation: a shared preamble of `shared` tokens, then its
    /// own `own` tokens, numbered from `first`.
    fn conversation(shared: usize, own: usize, first: u32) -> (Vec<u32>, KvCache) {
        let mut tokens: Vec<u32> = (0..shared as u32).collect();
        tokens.extend((0..own as u32).map(|i| first + i));
        // Positions of the same tokens at the same places hold the same values, as a model
        // computes them: the preamble's from seed 0, the rest from the conversation's.
        let pre = KvCache::numbered(KvType::F32, 2, shared, 0.0);
        let all = KvCache::numbered(KvType::F32, 2, shared + own, first as f32);
        let cache = pre
            .joined(
                &[
                    (&pre, shared),
                    (&all.segment(shared, shared + own).unwrap(), own),
                ],
                shared + own,
            )
            .unwrap();
        (tokens, cache)
    }

    #[test]
    fn conversations_sharing_a_preamble_hold_it_once() {
        let mut tree = Tree::default();
        let scope = tenant("a");
        let (a, ca) = conversation(100, 20, 1000);
        let (b, cb) = conversation(100, 30, 2000);
        let per_position = ca.bytes_per_position();
        tree.insert(&a, &ca, &scope).unwrap();
        assert_eq!(tree.bytes(), 120 * per_position);
        tree.insert(&b, &cb, &scope).unwrap();
        assert_eq!(
            tree.bytes(),
            150 * per_position,
            "the preamble once, each ending once"
        );
        assert_eq!(
            tree.segments(),
            3,
            "the preamble split from the first conversation"
        );
        assert_eq!(tree.prefixes(), 2);
        for (tokens, cache) in [(&a, &ca), (&b, &cb)] {
            let (path, n) = tree.walk(tokens, &scope);
            assert_eq!(n, tokens.len());
            let joined = tree.assemble(&path, n + 10).unwrap();
            assert_eq!(joined.bytes_of(n), cache.bytes_of(n), "bit for bit");
        }
        // A prompt that leaves the tree inside a segment takes that segment's first positions.
        let mut c = a[..110].to_vec();
        c.push(7);
        let (path, n) = tree.walk(&c, &scope);
        assert_eq!(n, 110);
        assert_eq!(
            tree.assemble(&path, 111).unwrap().bytes_of(110),
            ca.bytes_of(110)
        );
        // Inserting what is held adds nothing.
        assert_eq!(tree.insert(&a[..50], &ca, &scope).unwrap(), 0);
        assert_eq!(tree.bytes(), 150 * per_position);
    }

    #[test]
    fn scopes_never_share_and_the_oldest_endings_go_first() {
        let mut tree = Tree::default();
        let (a, ca) = conversation(64, 16, 1000);
        let (b, cb) = conversation(64, 16, 2000);
        let per_position = ca.bytes_per_position();
        tree.insert(&a, &ca, &tenant("x")).unwrap();
        assert_eq!(
            tree.walk(&a, &tenant("y")).1,
            0,
            "another tenant sees nothing"
        );
        tree.insert(&b, &cb, &tenant("x")).unwrap();
        tree.insert(&a, &ca, &tenant("y")).unwrap();
        assert_eq!(tree.bytes(), (64 + 16 + 16 + 80) * per_position);
        // `a` in x was used before `b`: its ending goes first, then the next oldest ending.
        assert_eq!(tree.evict_to(tree.bytes() - 1), 1);
        assert_eq!(
            tree.walk(&a, &tenant("x")).1,
            64,
            "x keeps the preamble under b"
        );
        assert_eq!(tree.walk(&b, &tenant("x")).1, 80);
        tree.evict_to(0);
        assert_eq!((tree.bytes(), tree.segments()), (0, 0));
        assert_eq!(tree.walk(&a, &tenant("y")).1, 0);
        // Freed places are used again.
        tree.insert(&a, &ca, &tenant("z")).unwrap();
        assert_eq!(tree.walk(&a, &tenant("z")).1, 80);
    }
}
