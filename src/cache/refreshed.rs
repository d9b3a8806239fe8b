//! Which entries were stored or refreshed with which reply a moment ago: lets the
//! fill of an unchanged reply be skipped without the cache's lock or its tables.
//!
//! While Redis is healthy nearly every cached read's reply is one the cache already holds,
//! and a refresh only moves the entry's age forward. Doing it for every read cost a lock,
//! a probe of a table of tens of MiB (a memory miss) and the batch bookkeeping around it:
//! most of what the cache cost the data path. A little lag in an entry's age is
//! harmless (an older age only makes a degraded answer more careful), so a read whose
//! reply was stored or refreshed under the same key less than a window ago is not filled
//! again. The window is the cache policy's (`CachePolicy::refill_after`): a small part of
//! the shortest `max_stale`, so that the lag is small next to the age that matters.
//!
//! Skipping can never make the cache serve something older than a write redfuse saw:
//! a skipped fill stores nothing, and every store of a reply goes through
//! `Cache::store`, which sets the cell. Every entry that leaves the cache (invalidated by
//! a write, evicted, flushed) clears its cell, so the read after a write (even one Redis
//! refused) fills it again: a read served from the cache while Redis is down is as recent
//! as without skipping, give or take the window's lag in age.
//!
//! The table is a set-associative array of 64-bit cells, eight to a cache line: 32 bits
//! of the cache key's tag, 16 of the reply's hash and 16 of time. A lookup reads one cache
//! line, prefetched by the connection a few replies before the read's
//! ([`Refreshed::prefetch`]); a store replaces the
//! key's own cell, else the oldest of its line. Cells are only written under the cache's
//! lock, so a key has at most one cell. A lookup wrongly finds a fresh cell with a
//! 2^-45 chance (a 32-bit key tag and a 16-bit reply tag both matching).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::CacheKey;

/// 2^14 lines of eight cells: 1 MiB, 131,072 entries.
const LINES: usize = 1 << 14;
const WAYS: usize = 8;

/// Time is kept in units of 2^24 ns (about 16.8 ms), 16 bits of it: it wraps every
/// 18 minutes, and a cell that old may look fresh again for one window (harmless, as
/// above).
const UNIT_SHIFT: u32 = 24;
const TIME_MASK: u64 = 0xFFFF;

/// The longest window [`Refreshed::fresh`] honours, in time units: a minute, far inside
/// the 18 minutes before the time wraps.
const MAX_WINDOW_UNITS: u64 = 60 << (30 - UNIT_SHIFT);

#[repr(align(64))]
struct Line([AtomicU64; WAYS]);

pub(super) struct Refreshed {
    lines: Box<[Line]>,
    epoch: Instant,
}

impl Refreshed {
    pub fn new(epoch: Instant) -> Refreshed {
        Refreshed {
            lines: (0..LINES)
                .map(|_| Line(std::array::from_fn(|_| AtomicU64::new(0))))
                .collect(),
            epoch,
        }
    }

    fn units(&self, now: Instant) -> u64 {
        units(now.saturating_duration_since(self.epoch)) & TIME_MASK
    }

    /// Starts loading `key`'s line, so that the lookup when its reply is completed finds
    /// it in cache instead of stalling on memory.
    pub fn prefetch(&self, key: &CacheKey) {
        super::prefetch_line(&self.lines[place(key).0]);
    }

    /// `key` was stored or refreshed with a reply hashing to `reply_hash` at `now`.
    /// Called under the cache's lock.
    pub fn set(&self, key: &CacheKey, reply_hash: u64, now: Instant) {
        let (line, tag) = place(key);
        let now = self.units(now);
        let cell = (tag << 32) | ((reply_hash >> 48) << 16) | now;
        let line = &self.lines[line].0;
        let mut victim = 0;
        let mut oldest = 0;
        for (i, c) in line.iter().enumerate() {
            let seen = c.load(Ordering::Relaxed);
            if seen >> 32 == tag {
                victim = i;
                break;
            }
            let age = if seen == 0 {
                u64::MAX
            } else {
                now.wrapping_sub(seen) & TIME_MASK
            };
            if age > oldest {
                (victim, oldest) = (i, age);
            }
        }
        line[victim].store(cell, Ordering::Relaxed);
    }

    /// `key`'s entry left the cache (invalidated, evicted, replaced): the next read of it
    /// fills it again, whatever the reply. Called under the cache's lock.
    pub fn forget(&self, key: &CacheKey) {
        let (line, tag) = place(key);
        for c in &self.lines[line].0 {
            if c.load(Ordering::Relaxed) >> 32 == tag {
                c.store(0, Ordering::Relaxed);
                return;
            }
        }
    }

    /// Every entry left the cache (see [`forget`](Self::forget)).
    pub fn clear(&self) {
        for line in self.lines.iter() {
            for c in &line.0 {
                c.store(0, Ordering::Relaxed);
            }
        }
    }

    /// The clock [`Refreshed::fresh`] compares against: `now` and `window` in time units,
    /// worked out once for every key of a reply (an MGET's ten keys took ten clock
    /// subtractions).
    pub fn clock(&self, now: Instant, window: Duration) -> FreshClock {
        FreshClock {
            now: self.units(now),
            window: units(window).min(MAX_WINDOW_UNITS),
        }
    }

    /// Whether `key` was stored or refreshed with a reply hashing to `reply_hash()` less
    /// than the clock's window before its `now` (a window shorter than a time unit is
    /// never met). The reply is hashed only when the key has a fresh cell: a reply that is
    /// not skipped is hashed once, by the store.
    pub fn fresh(
        &self,
        key: &CacheKey,
        reply_hash: impl FnOnce() -> u64,
        clock: FreshClock,
    ) -> bool {
        let (line, tag) = place(key);
        for c in &self.lines[line].0 {
            let seen = c.load(Ordering::Relaxed);
            if seen >> 32 == tag {
                let age = clock.now.wrapping_sub(seen) & TIME_MASK;
                return age < clock.window && (seen >> 16) & 0xFFFF == reply_hash() >> 48;
            }
        }
        false
    }
}

/// A moment and a window for [`Refreshed::fresh`], in its time units.
#[derive(Debug, Clone, Copy)]
pub struct FreshClock {
    now: u64,
    window: u64,
}

/// `d` in time units; a second counts as 2^30 ns: monotonic, and no division.
fn units(d: Duration) -> u64 {
    (d.as_secs().min(1 << 32) << 30).saturating_add(u64::from(d.subsec_nanos())) >> UNIT_SHIFT
}

/// The line of `key` and its 32-bit tag (never 0: an empty cell). The digest is keyed
/// with a random per-process seed, so its bits are as good as a hash.
fn place(key: &CacheKey) -> (usize, u64) {
    let (low, high) = key.digest_words();
    let line = (low as usize) % LINES;
    let tag = ((high ^ key.context_word()).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) | 1;
    (line, tag)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::IdentityId;
    use crate::resp::Proto;

    fn key(k: &str) -> CacheKey {
        CacheKey::get(0, IdentityId::ANONYMOUS, Proto::Resp2, k.as_bytes())
    }

    const V1: u64 = 0x1234_5678_9abc_def0;
    const V2: u64 = 0x4321_5678_9abc_def0;
    const FRESH: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn a_reply_is_fresh_for_a_second_under_its_own_key_only() {
        let r = Refreshed::new(Instant::now());
        let now = Instant::now();
        assert!(
            !r.fresh(&key("a"), || V1, r.clock(now, FRESH)),
            "nothing stored yet"
        );
        let unhashed = || -> u64 { panic!("hashed a reply no fresh cell vouches for") };
        assert!(!r.fresh(&key("a"), unhashed, r.clock(now, FRESH)));
        r.set(&key("a"), V1, now);
        assert!(r.fresh(&key("a"), || V1, r.clock(now, FRESH)));
        assert!(r.fresh(
            &key("a"),
            || V1,
            r.clock(now + FRESH - Duration::from_millis(20), FRESH)
        ));
        assert!(
            !r.fresh(&key("a"), || V1, r.clock(now + FRESH, FRESH)),
            "a second later"
        );
        assert!(!r.fresh(&key("a"), unhashed, r.clock(now + FRESH, FRESH)));
        assert!(
            !r.fresh(&key("a"), || V2, r.clock(now, FRESH)),
            "another reply"
        );
        assert!(
            !r.fresh(&key("b"), || V1, r.clock(now, FRESH)),
            "another key"
        );
        let other_db = CacheKey::get(1, IdentityId::ANONYMOUS, Proto::Resp2, b"a");
        assert!(
            !r.fresh(&other_db, || V1, r.clock(now, FRESH)),
            "another db"
        );
        let resp3 = CacheKey::get(0, IdentityId::ANONYMOUS, Proto::Resp3, b"a");
        assert!(
            !r.fresh(&resp3, || V1, r.clock(now, FRESH)),
            "another protocol"
        );
        // The window is the caller's: a longer one keeps it fresh longer, one shorter than
        // the table's time unit never.
        let long = Duration::from_secs(4);
        assert!(r.fresh(
            &key("a"),
            || V1,
            r.clock(now + Duration::from_millis(3900), long)
        ));
        assert!(!r.fresh(&key("a"), || V1, r.clock(now + long, long)));
        assert!(!r.fresh(&key("a"), || V1, r.clock(now, Duration::from_millis(10))));
        // Refreshed again: fresh from then on.
        let later = now + Duration::from_secs(5);
        r.set(&key("a"), V1, later);
        assert!(r.fresh(
            &key("a"),
            || V1,
            r.clock(later + Duration::from_millis(500), FRESH)
        ));
        // Stored with another reply: the old one is no longer fresh.
        r.set(&key("a"), V2, later);
        assert!(!r.fresh(&key("a"), || V1, r.clock(later, FRESH)));
        assert!(r.fresh(&key("a"), || V2, r.clock(later, FRESH)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_line_gives_up_its_oldest_cell() {
        let r = Refreshed::new(Instant::now());
        let start = Instant::now();
        // Keys that share a line, found by trying.
        let line = place(&key("k0")).0;
        let mates: Vec<CacheKey> = (0..)
            .map(|i| key(&format!("k{i}")))
            .filter(|k| place(k).0 == line)
            .take(WAYS + 1)
            .collect();
        for (i, k) in mates[..WAYS].iter().enumerate() {
            r.set(k, V1, start + Duration::from_millis(100 * i as u64));
        }
        let now = start + Duration::from_millis(100 * WAYS as u64);
        r.set(&mates[WAYS], V1, now);
        assert!(
            !r.fresh(&mates[0], || V1, r.clock(now, FRESH)),
            "the oldest made room"
        );
        for k in &mates[1..] {
            assert!(r.fresh(k, || V1, r.clock(now, FRESH)));
        }
        // A key stored again keeps its one cell.
        r.set(&mates[3], V2, now);
        assert!(r.fresh(&mates[3], || V2, r.clock(now, FRESH)));
        assert!(
            r.fresh(&mates[1], || V1, r.clock(now, FRESH))
                && r.fresh(&mates[WAYS], || V1, r.clock(now, FRESH))
        );
    }
}
