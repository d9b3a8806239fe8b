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
//! So a full cache admits a key it does not hold in two steps (TinyLFU):
//!
//! - Its first fill within a window only marks it in a bitmap of key digests (the
//!   "doorkeeper"): a key a scan reads once, or a batch job walks past, never enters. The
//!   window is two generations of the bitmap, a generation lasting as many decisions as
//!   the cache holds replies (at least [`MIN_GENERATION`]), so that it spans about one
//!   turnover of the cache.
//! - A later fill enters only if the key was filled more often lately than the entry it
//!   would push out, the one the eviction hand stops on (counted by `frequency`, which
//!   forgets old counts by halving them). Two workloads sharing the cache, one reading
//!   100,000 keys ten times a minute and one reading another 100,000 twice, no longer take
//!   turns evicting each other's keys (each round of `bench/run.sh` did that: its mix
//!   pushed out the keys of its pipelined GETs, whose next run had to fill them all again);
//!   the keys read more often stay. A key filled as often as counts go always enters.
//!
//! What degraded mode will need is what the application reads again and again.
//! Declining never makes the cache serve anything older: the key is not held, and a
//! reply that is not stored is a miss, exactly as if it had been evicted. Only keys the
//! cache does not hold are declined; a held key's new reply always replaces the old one,
//! and a key whose entry a write superseded is taken in on its next fill (the write's own
//! value, or the next read's reply).

use super::CacheKey;
use super::bits::GenerationBits;
use super::frequency::{Frequency, MAX_COUNT};

/// The shortest generation, in decisions: a small cache still remembers a few reads.
pub(super) const MIN_GENERATION: usize = 1024;

pub(super) struct Admission {
    seen: GenerationBits,
    /// Keys whose entry a write superseded: taken in on their next fill.
    welcome: GenerationBits,
    /// Decisions since the current generation began.
    decided: usize,
    /// How often each key was filled lately.
    fills: Frequency,
}

impl Admission {
    /// Admission for a cache of up to `capacity` entries.
    pub(super) fn new(capacity: usize) -> Admission {
        Admission {
            seen: GenerationBits::new(),
            welcome: GenerationBits::new(),
            decided: 0,
            fills: Frequency::new(capacity),
        }
    }

    /// A fill of `key` (stored, refreshed or declined): counted for its frequency.
    pub(super) fn count(&mut self, key: &CacheKey) {
        self.fills.increment(key.admission_hash());
    }

    /// `key`'s entry was superseded by a write: its next fill is admitted (the key was
    /// held; a write should not push it out of a full cache).
    pub(super) fn remember(&mut self, key: &CacheKey) {
        self.welcome.set(key.admission_hash());
    }

    /// Whether `key`, which a full cache holding `held` replies does not hold, may be
    /// stored now in place of `victim`, the entry the cache would evict first (if it
    /// holds any): its fill was declined once already within the window, and it was
    /// filled more often lately than the victim (or as often as counts go: a key read
    /// that often is never kept out). A key seen for the first time is remembered and
    /// declined.
    pub(super) fn admit(
        &mut self,
        key: &CacheKey,
        held: usize,
        victim: impl FnOnce() -> Option<CacheKey>,
    ) -> bool {
        let hash = key.admission_hash();
        let welcome = self.welcome.test(hash);
        let seen = welcome || self.seen.test(hash);
        if !seen {
            self.seen.set(hash);
        }
        self.decided += 1;
        if self.decided >= held.max(MIN_GENERATION) {
            self.seen.turn();
            self.welcome.turn();
            self.decided = 0;
        }
        // The victim is looked for only when it matters: finding it moves the eviction
        // hand, which a fill declined anyway should not do.
        welcome
            || seen
                && victim().is_none_or(|v| {
                    let count = self.fills.estimate(hash);
                    count > self.fills.estimate(v.admission_hash()) || count == MAX_COUNT
                })
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
        let mut a = Admission::new(100_000);
        assert!(!a.admit(&key("a"), 10, || None), "first fill: declined");
        assert!(
            !a.admit(&key("b"), 10, || None),
            "another key is not admitted by a's mark"
        );
        assert!(a.admit(&key("a"), 10, || None), "second fill: admitted");
        assert!(a.admit(&key("b"), 10, || None));
        let other_db = CacheKey::get(1, IdentityId::ANONYMOUS, Proto::Resp2, b"a");
        assert!(
            !a.admit(&other_db, 10, || None),
            "the same Redis key in another db"
        );
    }

    #[test]
    fn a_key_remembered_enters_on_its_first_fill() {
        let mut a = Admission::new(100_000);
        a.remember(&key("a"));
        assert!(a.admit(&key("a"), 10, || None));
        assert!(!a.admit(&key("b"), 10, || None));
    }

    #[test]
    fn a_mark_lasts_two_generations() {
        let mut a = Admission::new(100_000);
        assert!(!a.admit(&key("a"), 0, || None));
        // One generation of decisions on another key: the mark is in the previous one.
        // (One other key, not many: a mark of another key may share `a`'s bit.)
        for _ in 1..MIN_GENERATION {
            a.admit(&key("x"), 0, || None);
        }
        assert!(
            a.admit(&key("a"), 0, || None),
            "remembered through the next generation"
        );
        let mut a = Admission::new(100_000);
        assert!(!a.admit(&key("a"), 0, || None));
        for _ in 1..2 * MIN_GENERATION {
            a.admit(&key("x"), 0, || None);
        }
        assert!(
            !a.admit(&key("a"), 0, || None),
            "forgotten after two generations"
        );
    }

    #[test]
    fn a_key_takes_the_place_of_one_filled_less_often() {
        let mut a = Admission::new(100_000);
        let (hot, cold, new) = (key("hot"), key("cold"), key("new"));
        for _ in 0..5 {
            a.count(&hot);
        }
        a.count(&cold);
        a.count(&new);
        assert!(!a.admit(&new, 10, || Some(cold)), "first fill: declined");
        a.count(&new);
        assert!(
            !a.admit(&new, 10, || Some(hot)),
            "filled twice: not in place of one filled five times"
        );
        assert!(
            a.admit(&new, 10, || Some(cold)),
            "but in place of one filled once"
        );
        a.remember(&cold);
        assert!(
            a.admit(&cold, 10, || Some(hot)),
            "a key a write superseded is taken back in"
        );
    }

    #[test]
    fn a_generation_lasts_as_many_decisions_as_the_cache_holds() {
        let held = 4 * MIN_GENERATION;
        let mut a = Admission::new(100_000);
        assert!(!a.admit(&key("a"), held, || None));
        for _ in 1..2 * held - 1 {
            a.admit(&key("x"), held, || None);
        }
        assert!(
            a.admit(&key("a"), held, || None),
            "still within two generations"
        );
    }
}
