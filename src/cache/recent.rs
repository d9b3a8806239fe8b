//! What an invalidation leaves behind for the requests already in flight.
//!
//! Fill tickets are striped (one atomic per stripe, so taking one needs no lock), and a
//! write to any key of a stripe moves the stripe. Alone, that would refuse the fills of
//! every read in flight on the stripe's other keys, and a busy cache would keep missing
//! keys nobody wrote. [`Invalidations`] remembers which key each recent invalidation was,
//! so a fill whose stripe moved is refused only when its own key was invalidated after the
//! ticket, or when that is no longer known.
//!
//! [`Superseded`] keeps, for a short grace, the replies an invalidation removed. A client
//! that pipelines `GET k` then `SET k v` has its `SET` invalidate `k` the moment it is sent;
//! if the connection then fails, its `GET` (sent first) must still be answered with the
//! value it would have read, not with "written since". Only reads whose ticket predates
//! the invalidation see these replies.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::{CacheKey, Entry, FastMap};

/// Invalidations remembered by key; older ones are only known to have happened.
const REMEMBERED: usize = 16 * 1024;

/// How long a superseded reply stays available to the reads that were in flight when it was
/// superseded: longer than any command timeout in practice; bytes bound it too.
const GRACE: Duration = Duration::from_secs(30);

/// The most recent invalidations, by key hash.
#[derive(Default)]
pub(super) struct Invalidations {
    /// Key hash -> sequence number of its last remembered invalidation.
    last: FastMap<u64, u64>,
    order: VecDeque<(u64, u64)>,
    /// The newest invalidation forgotten: a ticket older than this cannot be vouched for.
    floor: u64,
}

impl Invalidations {
    pub(super) fn record(&mut self, hash: u64, seq: u64) {
        self.last.insert(hash, seq);
        self.order.push_back((hash, seq));
        if self.order.len() > REMEMBERED
            && let Some((h, s)) = self.order.pop_front()
        {
            if self.last.get(&h) == Some(&s) {
                self.last.remove(&h);
            }
            self.floor = self.floor.max(s);
        }
    }

    /// Whether the key hashing to `hash` may have been invalidated after invalidation
    /// number `seq`.
    pub(super) fn since(&self, hash: u64, seq: u64) -> bool {
        self.floor > seq || self.last.get(&hash).is_some_and(|s| *s > seq)
    }
}

/// A reply taken out of the cache by an invalidation.
struct Gone {
    reply: Bytes,
    filled: Instant,
    expires: Option<Instant>,
    /// The invalidation that removed it.
    seq: u64,
    charge: usize,
}

/// Replies removed by invalidations, for the reads sent before them.
pub(super) struct Superseded {
    entries: FastMap<CacheKey, Gone>,
    order: VecDeque<(Instant, CacheKey, u64)>,
    bytes: usize,
    max_bytes: usize,
}

impl Superseded {
    pub(super) fn new(max_bytes: usize) -> Superseded {
        Superseded {
            entries: FastMap::default(),
            order: VecDeque::new(),
            bytes: 0,
            max_bytes,
        }
    }

    /// Keeps `entry`, removed from the cache by invalidation number `seq`.
    pub(super) fn keep(&mut self, key: CacheKey, entry: Entry, seq: u64, now: Instant) {
        self.prune(now);
        if entry.charge > self.max_bytes {
            return;
        }
        while self.bytes + entry.charge > self.max_bytes && self.drop_oldest() {}
        let gone = Gone {
            reply: entry.reply,
            filled: entry.filled,
            expires: entry.expires,
            seq,
            charge: entry.charge,
        };
        self.bytes += gone.charge;
        if let Some(old) = self.entries.insert(key, gone) {
            self.bytes -= old.charge;
        }
        self.order.push_back((now, key, seq));
    }

    /// The reply a read whose ticket was taken after invalidation number `asked_seq` would
    /// have found: only if it was superseded later than that, and is still fresh at `now`.
    pub(super) fn get(
        &self,
        key: &CacheKey,
        asked_seq: u64,
        now: Instant,
        max_stale: Duration,
    ) -> Option<Bytes> {
        let g = self.entries.get(key)?;
        (g.seq > asked_seq
            && now.saturating_duration_since(g.filled) <= max_stale
            && g.expires.is_none_or(|x| now < x))
        .then(|| g.reply.clone())
    }

    pub(super) fn clear(&mut self) {
        self.entries.clear();
        self.order.clear();
        self.bytes = 0;
    }

    fn prune(&mut self, now: Instant) {
        while let Some((at, _, _)) = self.order.front()
            && now.saturating_duration_since(*at) > GRACE
        {
            self.drop_oldest();
        }
    }

    fn drop_oldest(&mut self) -> bool {
        let Some((_, key, seq)) = self.order.pop_front() else {
            return false;
        };
        if self.entries.get(&key).is_some_and(|g| g.seq == seq)
            && let Some(g) = self.entries.remove(&key)
        {
            self.bytes -= g.charge;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_moved_stripe_refuses_only_tickets_of_the_invalidated_key() {
        let mut inv = Invalidations::default();
        inv.record(7, 10);
        assert!(inv.since(7, 9));
        assert!(!inv.since(7, 10), "the ticket was taken after it");
        assert!(!inv.since(8, 9), "another key of the stripe");
    }

    #[test]
    fn forgotten_invalidations_refuse_older_tickets() {
        let mut inv = Invalidations::default();
        for seq in 1..=(REMEMBERED as u64 + 1) {
            inv.record(seq, seq);
        }
        assert!(inv.since(999_999, 0), "older than what was forgotten");
        assert!(!inv.since(999_999, 1));
    }
}
