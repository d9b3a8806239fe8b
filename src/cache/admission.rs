//! Which replies of keys the cache does not hold may enter it once it is full.
//!
//! Storing a new reply in a full cache evicts the least recently used ones. When more is
//! read than fits (a working set larger than `max_bytes`), every such fill costs an
//! allocation, a copy of the reply and an eviction, and the entry it makes is as likely as
//! not to be evicted again before its key is read a second time: the cache turns over as
//! fast as reads arrive without holding more of what is read. On bench/run.sh's 90/10 mix
//! (1 KB values, 100,000 keys: about 150 MB against the 64 MiB cap) the cache cost about
//! 1.9 µs of CPU per request, and a cache large enough for every key about 0.8 µs less.
//! Declining first fills cut that run's evictions by two thirds (171,000 to 59,000).
//!
//! So a full cache admits a key it does not hold on the key's second fill within a window
//! (TinyLFU's "doorkeeper"): the first only marks it in a bitmap of key digests, and a key
//! read again enters as before. The window is
//! two generations of the bitmap, a generation lasting as many decisions as the cache holds
//! replies (at least [`MIN_GENERATION`]), so that it spans about one turnover of the cache.
//! A key a scan reads once, or a batch job walks past, does not push out the keys an
//! application reads again and again: what degraded mode will need.
//!
//! Declining never makes the cache serve anything older: the key is not held, and a
//! reply that is not stored is a miss, exactly as if it had been evicted. Only keys the
//! cache does not hold are declined; a held key's new reply always replaces the old one,
//! and a key whose entry a write superseded is taken in on its next fill (the write's own
//! value, or the next read's reply).

use super::CacheKey;
use super::bits::GenerationBits;

/// The shortest generation, in decisions: a small cache still remembers a few reads.
pub(super) const MIN_GENERATION: usize = 1024;

pub(super) struct Admission {
    seen: GenerationBits,
    /// Decisions since the current generation began.
    decided: usize,
}

impl Admission {
    pub(super) fn new() -> Admission {
        Admission {
            seen: GenerationBits::new(),
            decided: 0,
        }
    }

    /// `key`'s entry was superseded by a write: its next fill is admitted as if declined
    /// once (the key was held; a write should not push it out of a full cache).
    pub(super) fn remember(&mut self, key: &CacheKey) {
        self.seen.set(key.admission_hash());
    }

    /// Whether `key`, which a full cache holding `held` replies does not hold, may be
    /// stored now: its fill was declined once already within the window. A key seen for
    /// the first time is remembered and declined.
    pub(super) fn admit(&mut self, key: &CacheKey, held: usize) -> bool {
        let hash = key.admission_hash();
        let seen = self.seen.test(hash);
        if !seen {
            self.seen.set(hash);
        }
        self.decided += 1;
        if self.decided >= held.max(MIN_GENERATION) {
            self.seen.turn();
            self.decided = 0;
        }
        seen
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

    #[test]
    fn a_key_enters_on_its_second_fill() {
        let mut a = Admission::new();
        assert!(!a.admit(&key("a"), 10), "first fill: declined");
        assert!(
            !a.admit(&key("b"), 10),
            "another key is not admitted by a's mark"
        );
        assert!(a.admit(&key("a"), 10), "second fill: admitted");
        assert!(a.admit(&key("b"), 10));
        let other_db = CacheKey::get(1, IdentityId::ANONYMOUS, Proto::Resp2, b"a");
        assert!(!a.admit(&other_db, 10), "the same Redis key in another db");
    }

    #[test]
    fn a_key_remembered_enters_on_its_first_fill() {
        let mut a = Admission::new();
        a.remember(&key("a"));
        assert!(a.admit(&key("a"), 10));
        assert!(!a.admit(&key("b"), 10));
    }

    #[test]
    fn a_mark_lasts_two_generations() {
        let mut a = Admission::new();
        assert!(!a.admit(&key("a"), 0));
        // One generation of decisions on another key: the mark is in the previous one.
        // (One other key, not many: a mark of another key may share `a`'s bit.)
        for _ in 1..MIN_GENERATION {
            a.admit(&key("x"), 0);
        }
        assert!(
            a.admit(&key("a"), 0),
            "remembered through the next generation"
        );
        let mut a = Admission::new();
        assert!(!a.admit(&key("a"), 0));
        for _ in 1..2 * MIN_GENERATION {
            a.admit(&key("x"), 0);
        }
        assert!(!a.admit(&key("a"), 0), "forgotten after two generations");
    }

    #[test]
    fn a_generation_lasts_as_many_decisions_as_the_cache_holds() {
        let held = 4 * MIN_GENERATION;
        let mut a = Admission::new();
        assert!(!a.admit(&key("a"), held));
        for _ in 1..2 * held - 1 {
            a.admit(&key("x"), held);
        }
        assert!(a.admit(&key("a"), held), "still within two generations");
    }
}
