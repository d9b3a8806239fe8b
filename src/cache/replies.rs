//! The table of cached replies: a hash table of small slots over a slab of nodes, in
//! least-recently-used order by second chance (CLOCK).
//!
//! # Why not a linked-hash-map LRU
//!
//! While Redis is healthy nearly every cached read's reply is one the cache already holds,
//! unchanged, so the common operation is "this key was just re-read with the same reply":
//! refresh its age and mark it used. In a linked-hash-map LRU (the `lru` crate) that
//! dereferences the key's heap node to compare the key and read the stored reply's hash,
//! then relinks it: with 100k keys spread over tens of MiB of heap, a cache (and TLB) miss
//! per read that the profile showed as half of what the cache cost the data path.
//!
//! Here the hash table's slot holds the key itself and what a refresh reads and writes (the
//! reply's hash and length, when it was filled): one probe of a dense table, no node
//! touched. Recency is kept by CLOCK (second chance) instead of moving a node to the front
//! on every use: every use sets the node's bit, a hand sweeps over the nodes clearing
//! bits, and the first node it finds unused since it last passed is evicted. That
//! approximates LRU closely (an entry used since the hand last passed it is never the one
//! evicted) and makes every use O(1).
//!
//! The bits are bitmaps by node index (12 KiB each for 100k entries, so they stay in the
//! CPU's cache), and the hand sweeps the bitmaps, 64 nodes per word, touching no node but
//! the one it evicts. The sweep clears one bit per use since the last pass, so it works as
//! hard as the cache is read: with a list walked node by node (an earlier design, a used
//! node moved to the front), each step was a cache miss, 40 ns per read of random keys over
//! a full cache.
//!
//! Nodes (the stored bytes) live in one `Vec`; freed nodes are chained for reuse, so the
//! slab never holds more nodes than the most entries held at once.

use bytes::Bytes;
use tokio::time::Instant;

use super::{CacheKey, Entry, FastMap};

const NIL: u32 = u32::MAX;

/// What the common operations read, kept in the hash table beside the key.
struct Slot {
    filled: Instant,
    reply_hash: u64,
    node: u32,
    reply_len: u32,
    /// The node's `expires` is set (so a refresh without one must clear it).
    expiring: bool,
}

struct Node {
    key: CacheKey,
    /// The next free node while free.
    next_free: u32,
    reply: Bytes,
    key_hash: u64,
    expires: Option<Instant>,
    charge: usize,
}

/// A stored reply, as [`Replies::get`] shows it.
pub(super) struct Stored<'a> {
    pub filled: Instant,
    pub expires: Option<Instant>,
    pub reply: &'a Bytes,
}

pub(super) struct Replies {
    slots: FastMap<CacheKey, Slot>,
    nodes: Vec<Node>,
    /// By node index: used since the hand last passed it.
    used: Vec<u64>,
    /// By node index: holds an entry (is not free).
    held: Vec<u64>,
    /// The next node the hand considers for eviction.
    hand: usize,
    /// Head of the chain of free nodes.
    free: u32,
}

impl Default for Replies {
    fn default() -> Self {
        Replies {
            slots: FastMap::default(),
            nodes: Vec::new(),
            used: Vec::new(),
            held: Vec::new(),
            hand: 0,
            free: NIL,
        }
    }
}

/// What [`Replies::refresh`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresh {
    /// The key holds the same reply: refreshed.
    Done,
    /// The key holds another reply: nothing changed.
    Changed,
    /// The key holds no reply.
    Absent,
}

impl Replies {
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// The entry of `key`, marked used.
    pub fn get(&mut self, key: &CacheKey) -> Option<Stored<'_>> {
        let slot = self.slots.get(key)?;
        mark(&mut self.used, slot.node, true);
        let node = &self.nodes[slot.node as usize];
        Some(Stored {
            filled: slot.filled,
            expires: node.expires,
            reply: &node.reply,
        })
    }

    /// Reads the slots of `keys` without using them, so that the cache misses of a run of
    /// lookups overlap (each lookup is independent of the others) and the stores that
    /// follow find the slots in cache.
    pub fn prefetch<'a>(&self, keys: impl Iterator<Item = &'a CacheKey>) {
        let mut seen = 0u64;
        for key in keys {
            if let Some(slot) = self.slots.get(key) {
                seen = seen.wrapping_add(slot.reply_hash);
            }
        }
        std::hint::black_box(seen);
    }

    /// Reads, for each of `keys`, its slot, then its node, then the first byte of its
    /// stored reply, without using them. Each level depends on the one before, so one
    /// lookup takes three cache misses in turn; done a level at a time for a run of
    /// lookups, the misses of one level overlap, and the lookups that follow (answers from
    /// the cache while the breaker is open) find all three in cache.
    pub fn prefetch_entries(&self, keys: &[CacheKey]) {
        let mut seen = 0u64;
        let mut nodes = Vec::with_capacity(keys.len());
        for key in keys {
            if let Some(slot) = self.slots.get(key) {
                nodes.push(slot.node as usize);
            }
        }
        let mut replies = Vec::with_capacity(nodes.len());
        for &i in &nodes {
            if let Some(node) = self.nodes.get(i) {
                // A node spans two cache lines: a lookup reads both.
                seen = seen.wrapping_add(u64::from(node.expires.is_some()));
                replies.push(&node.reply);
            }
        }
        // The first and the last byte: a reply of a few dozen bytes may straddle two lines.
        for reply in replies {
            let ends = [reply.first(), reply.last()];
            seen = ends
                .into_iter()
                .flatten()
                .fold(seen, |s, &b| s.wrapping_add(b.into()));
        }
        std::hint::black_box(seen);
    }

    /// When `key` holds a reply with this hash and length: records it as filled again at
    /// `now` with `expires` and marks it used. The stored bytes are not read (nor, unless
    /// an expiry changes, written), and the reply is hashed only when the key is held.
    pub fn refresh(
        &mut self,
        key: &CacheKey,
        reply_hash: impl FnOnce() -> u64,
        reply_len: usize,
        now: Instant,
        expires: Option<Instant>,
    ) -> Refresh {
        let Some(slot) = self.slots.get_mut(key) else {
            return Refresh::Absent;
        };
        if slot.reply_len as usize != reply_len || slot.reply_hash != reply_hash() {
            return Refresh::Changed;
        }
        slot.filled = now;
        mark(&mut self.used, slot.node, true);
        if slot.expiring || expires.is_some() {
            slot.expiring = expires.is_some();
            self.nodes[slot.node as usize].expires = expires;
        }
        Refresh::Done
    }

    /// Stores `entry` under `key`, not yet used; returns the entry it replaced.
    pub fn push(&mut self, key: CacheKey, entry: Entry) -> Option<Entry> {
        let old = self.pop(&key);
        let reply_len = u32::try_from(entry.reply.len()).unwrap_or(u32::MAX);
        let node = Node {
            key,
            next_free: NIL,
            reply: entry.reply,
            key_hash: entry.key_hash,
            expires: entry.expires,
            charge: entry.charge,
        };
        let index = if self.free == NIL {
            let index = u32::try_from(self.nodes.len())
                .ok()
                .filter(|&i| i != NIL)
                .expect("fewer than 2^32-1 cached replies");
            self.nodes.push(node);
            if self.used.len() * 64 < self.nodes.len() {
                self.used.push(0);
                self.held.push(0);
            }
            index
        } else {
            let index = self.free;
            self.free = self.nodes[index as usize].next_free;
            self.nodes[index as usize] = node;
            index
        };
        mark(&mut self.used, index, false);
        mark(&mut self.held, index, true);
        self.slots.insert(
            key,
            Slot {
                filled: entry.filled,
                reply_hash: entry.reply_hash,
                node: index,
                reply_len,
                expiring: entry.expires.is_some(),
            },
        );
        old
    }

    /// Removes the entry of `key`.
    pub fn pop(&mut self, key: &CacheKey) -> Option<Entry> {
        let slot = self.slots.remove(key)?;
        Some(self.release(slot))
    }

    /// Removes the least recently used entry, as CLOCK approximates it: the first the hand
    /// finds not used since it last passed (clearing the bits of the used ones on its way).
    pub fn pop_lru(&mut self) -> Option<(CacheKey, Entry)> {
        let index = self.sweep()?;
        let key = self.nodes[index as usize].key;
        let slot = self.slots.remove(&key).expect("every held node has a slot");
        let entry = self.release(slot);
        Some((key, entry))
    }

    /// The entry [`pop_lru`](Self::pop_lru) would evict next, left where it is: the hand
    /// stops on it (clearing the used bits it passes, as evicting would).
    pub fn victim(&mut self) -> Option<CacheKey> {
        let index = self.sweep()?;
        self.hand = index as usize;
        Some(self.nodes[index as usize].key)
    }

    /// Moves the hand to the next held node not used since the hand last passed it,
    /// clearing the used bits it passes, and returns that node; `None` when none is held.
    /// Two turns at most: the first clears every bit.
    fn sweep(&mut self) -> Option<u32> {
        if self.slots.is_empty() {
            return None;
        }
        let words = self.held.len();
        let mut word = self.hand / 64;
        // Bits below the hand in its word are behind it: not considered until next turn.
        let mut from = self.hand % 64;
        for _ in 0..=2 * words {
            if word >= words {
                word = 0;
                from = 0;
            }
            let ahead = u64::MAX << from;
            let unused = self.held[word] & !self.used[word] & ahead;
            if unused != 0 {
                let bit = unused.trailing_zeros() as usize;
                // Passed on the way: the used ones below the victim get their second chance.
                self.used[word] &= !(ahead & ((1u64 << bit) - 1));
                let index = word * 64 + bit;
                self.hand = index + 1;
                return Some(index as u32);
            }
            self.used[word] &= !ahead;
            word += 1;
            from = 0;
        }
        unreachable!("a held node is unused after one turn of the hand")
    }

    pub fn clear(&mut self) {
        *self = Replies::default();
    }

    /// The key hash and charge of `key`'s entry, without marking it used.
    #[cfg(test)]
    pub fn peek(&self, key: &CacheKey) -> Option<(u64, usize)> {
        let slot = self.slots.get(key)?;
        let node = &self.nodes[slot.node as usize];
        Some((node.key_hash, node.charge))
    }

    #[cfg(test)]
    pub fn keys(&self) -> impl Iterator<Item = &CacheKey> {
        self.slots.keys()
    }

    /// Frees `slot`'s node, returning what it held.
    fn release(&mut self, slot: Slot) -> Entry {
        mark(&mut self.held, slot.node, false);
        let node = &mut self.nodes[slot.node as usize];
        let entry = Entry {
            reply: std::mem::take(&mut node.reply),
            reply_hash: slot.reply_hash,
            key_hash: node.key_hash,
            filled: slot.filled,
            expires: node.expires.take(),
            charge: node.charge,
        };
        node.next_free = self.free;
        self.free = slot.node;
        entry
    }
}

fn mark(bits: &mut [u64], index: u32, used: bool) {
    let (word, bit) = (index as usize / 64, index % 64);
    if used {
        bits[word] |= 1 << bit;
    } else {
        bits[word] &= !(1 << bit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::IdentityId;
    use crate::resp::Proto;

    fn key(k: &str) -> CacheKey {
        CacheKey::get(0, IdentityId::ANONYMOUS, Proto::Resp2, k.as_bytes())
    }

    fn entry(reply: &str, now: Instant) -> Entry {
        Entry {
            reply: Bytes::copy_from_slice(reply.as_bytes()),
            reply_hash: reply.len() as u64,
            key_hash: 7,
            filled: now,
            expires: None,
            charge: 100,
        }
    }

    fn evict_all(r: &mut Replies) -> Vec<CacheKey> {
        std::iter::from_fn(|| r.pop_lru().map(|(k, _)| k)).collect()
    }

    #[test]
    fn unused_entries_leave_oldest_first() {
        let now = Instant::now();
        let mut r = Replies::default();
        for k in ["a", "b", "c"] {
            assert!(r.push(key(k), entry(k, now)).is_none());
        }
        assert_eq!(evict_all(&mut r), vec![key("a"), key("b"), key("c")]);
        assert_eq!(r.len(), 0);
    }

    #[test]
    fn a_used_entry_outlives_unused_older_and_newer_ones() {
        let now = Instant::now();
        let mut r = Replies::default();
        for k in ["a", "b", "c"] {
            r.push(key(k), entry(k, now));
        }
        assert!(r.get(&key("a")).is_some());
        assert_eq!(r.refresh(&key("b"), || 1, 1, now, None), Refresh::Done);
        assert_eq!(evict_all(&mut r), vec![key("c"), key("a"), key("b")]);
    }

    #[test]
    fn prefetching_changes_nothing_not_even_recency() {
        let now = Instant::now();
        let mut r = Replies::default();
        for k in ["a", "b", "c"] {
            r.push(key(k), entry(k, now));
        }
        r.prefetch_entries(&[key("a"), key("zz"), key("c"), key("")]);
        assert_eq!(r.len(), 3);
        assert_eq!(evict_all(&mut r), vec![key("a"), key("b"), key("c")]);
    }

    #[test]
    fn refresh_needs_the_same_reply_and_keeps_the_expiry_right() {
        let t0 = Instant::now();
        let t1 = t0 + std::time::Duration::from_secs(5);
        let mut r = Replies::default();
        r.push(key("a"), entry("xy", t0));
        assert_eq!(
            r.refresh(&key("a"), || 3, 2, t1, None),
            Refresh::Changed,
            "other hash"
        );
        assert_eq!(
            r.refresh(&key("a"), || 2, 3, t1, None),
            Refresh::Changed,
            "other length"
        );
        assert_eq!(r.refresh(&key("b"), || 2, 2, t1, None), Refresh::Absent);
        assert_eq!(r.get(&key("a")).unwrap().filled, t0);
        assert_eq!(r.refresh(&key("a"), || 2, 2, t1, Some(t1)), Refresh::Done);
        let got = r.get(&key("a")).unwrap();
        assert_eq!((got.filled, got.expires), (t1, Some(t1)));
        assert_eq!(r.refresh(&key("a"), || 2, 2, t1, None), Refresh::Done);
        assert_eq!(r.get(&key("a")).unwrap().expires, None);
    }

    #[test]
    fn push_replaces_and_pop_returns_what_was_stored() {
        let now = Instant::now();
        let mut r = Replies::default();
        r.push(key("a"), entry("one", now));
        let old = r.push(key("a"), entry("four", now)).expect("replaced");
        assert_eq!(&old.reply[..], b"one");
        assert_eq!(r.len(), 1);
        let e = r.pop(&key("a")).expect("stored");
        assert_eq!(
            (&e.reply[..], e.reply_hash, e.charge),
            (&b"four"[..], 4, 100)
        );
        assert!(r.pop(&key("a")).is_none());
        assert!(r.get(&key("a")).is_none());
    }

    #[test]
    fn freed_nodes_are_reused() {
        let now = Instant::now();
        let mut r = Replies::default();
        for round in 0..100 {
            for i in 0..10 {
                r.push(key(&format!("{round}-{i}")), entry("v", now));
            }
            if round % 2 == 0 {
                while r.pop_lru().is_some() {}
            } else {
                for i in 0..10 {
                    assert!(r.pop(&key(&format!("{round}-{i}"))).is_some());
                }
            }
            assert_eq!(r.len(), 0);
        }
        assert_eq!(r.nodes.len(), 10);
    }

    #[test]
    fn the_hand_goes_round_across_words_and_spares_what_was_used_since_it_passed() {
        let now = Instant::now();
        let mut r = Replies::default();
        let name = |i: usize| format!("k{i}");
        for i in 0..150 {
            r.push(key(&name(i)), entry("v", now));
        }
        for i in (0..150).filter(|i| i % 3 != 0) {
            r.get(&key(&name(i)));
        }
        // First turn: the unused ones, in node order, across the three words.
        let first: Vec<CacheKey> = (0..50).map(|_| r.pop_lru().unwrap().0).collect();
        let want: Vec<CacheKey> = (0..150).step_by(3).map(|i| key(&name(i))).collect();
        assert_eq!(first, want);
        // The hand stands at 148: 148 and 149 were used before it got there, 2 is used
        // again after it passed. It spares the three and goes on round to the start.
        r.get(&key(&name(2)));
        let next: Vec<CacheKey> = (0..3).map(|_| r.pop_lru().unwrap().0).collect();
        assert_eq!(next, vec![key(&name(1)), key(&name(4)), key(&name(5))]);
        let rest = evict_all(&mut r);
        assert_eq!(rest.len(), 97);
        assert_eq!(
            rest.last(),
            Some(&key(&name(2))),
            "used again: evicted last"
        );
        assert!(r.pop_lru().is_none());
    }

    #[test]
    fn order_survives_removals_from_the_middle_and_both_ends() {
        let now = Instant::now();
        let mut r = Replies::default();
        for k in ["a", "b", "c", "d", "e"] {
            r.push(key(k), entry(k, now));
        }
        r.pop(&key("c"));
        r.pop(&key("a"));
        r.pop(&key("e"));
        r.push(key("f"), entry("f", now));
        assert_eq!(evict_all(&mut r), vec![key("b"), key("d"), key("f")]);
        r.push(key("g"), entry("g", now));
        assert_eq!(evict_all(&mut r), vec![key("g")]);
    }
}
