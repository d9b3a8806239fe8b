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
use crate::effect::ConnId;

/// Invalidations remembered by key; older ones are only known to have happened.
const REMEMBERED: usize = 8 * 1024;

/// How long a superseded reply stays available to the reads that were in flight when it was
/// superseded: longer than any command timeout in practice; bytes bound it too.
const GRACE: Duration = Duration::from_secs(30);

/// The most recent invalidations, by key hash.
#[derive(Default)]
pub(super) struct Invalidations {
    last: FastMap<u64, KeyInvalidations>,
    order: VecDeque<(u64, u64)>,
    /// The newest invalidation forgotten: a ticket older than this cannot be vouched for.
    floor: u64,
}

/// A key's latest invalidations by where they came from. A reply's effect on connection
/// `c` is harmless to the fills of reads on `c` (see `ConnId`); anything else is not.
#[derive(Default, Clone, Copy)]
struct KeyInvalidations {
    /// The latest from no connection (before a write is sent, a failed write, a replay).
    unsourced: u64,
    /// The latest of two connections; `others` for any further connection.
    conns: [(u64, u64); 2],
    others: u64,
}

impl KeyInvalidations {
    fn newest(&self) -> u64 {
        self.unsourced
            .max(self.conns[0].1)
            .max(self.conns[1].1)
            .max(self.others)
    }
}

impl Invalidations {
    pub(super) fn record(&mut self, hash: u64, seq: u64, via: Option<ConnId>) {
        let k = self.last.entry(hash).or_default();
        match via {
            None => k.unsourced = seq,
            Some(ConnId(id)) => {
                if let Some(slot) = k.conns.iter_mut().find(|(c, s)| *c == id && *s > 0) {
                    slot.1 = seq;
                } else {
                    let oldest = if k.conns[0].1 <= k.conns[1].1 { 0 } else { 1 };
                    k.others = k.others.max(k.conns[oldest].1);
                    k.conns[oldest] = (id, seq);
                }
            }
        }
        self.order.push_back((hash, seq));
        if self.order.len() > REMEMBERED
            && let Some((h, s)) = self.order.pop_front()
        {
            if self.last.get(&h).is_some_and(|k| k.newest() == s) {
                self.last.remove(&h);
            }
            self.floor = self.floor.max(s);
        }
    }

    /// Whether the key hashing to `hash` may have been invalidated after invalidation
    /// number `seq` other than by a reply on `via`.
    pub(super) fn since(&self, hash: u64, seq: u64, via: Option<ConnId>) -> bool {
        if self.floor > seq {
            return true;
        }
        let Some(k) = self.last.get(&hash) else {
            return false;
        };
        k.unsourced > seq
            || k.others > seq
            || k.conns
                .iter()
                .any(|(c, s)| *s > seq && via != Some(ConnId(*c)))
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
        // A key superseded again leaves its older place in `order` behind (skipped when it
        // comes up). A few hot keys written thousands of times a second would otherwise
        // grow `order` by one place per write for the whole grace period (measured: 30 MiB
        // in 30 s of bench/soak.sh with 800 keys): keep it within twice what it stands for.
        if self.order.len() > 2 * self.entries.len() + 1024 {
            let entries = &self.entries;
            self.order
                .retain(|(_, k, s)| entries.get(k).is_some_and(|g| g.seq == *s));
        }
    }

    /// Places in the age order, live or left behind (for tests).
    #[cfg(test)]
    pub(super) fn order_len(&self) -> usize {
        self.order.len()
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
        inv.record(7, 10, None);
        assert!(inv.since(7, 9, None));
        assert!(!inv.since(7, 10, None), "the ticket was taken after it");
        assert!(!inv.since(8, 9, None), "another key of the stripe");
    }

    #[test]
    fn replies_on_the_reads_own_connection_do_not_refuse_its_fill() {
        let c = |id| Some(ConnId(id));
        let mut inv = Invalidations::default();
        inv.record(7, 10, c(1));
        inv.record(7, 11, c(1));
        assert!(
            !inv.since(7, 9, c(1)),
            "both ran before the read, on its connection"
        );
        assert!(inv.since(7, 9, c(2)));
        assert!(inv.since(7, 9, None));
        inv.record(7, 12, c(2));
        assert!(
            inv.since(7, 9, c(1)),
            "another connection's write may have raced"
        );
        inv.record(7, 13, c(3));
        inv.record(7, 14, c(1));
        assert!(
            inv.since(7, 12, c(1)),
            "a third connection's write is still known"
        );
        assert!(!inv.since(7, 14, c(1)));
        inv.record(7, 15, None);
        assert!(inv.since(7, 14, c(1)), "sent since: from no connection");
    }

    #[test]
    fn forgotten_invalidations_refuse_older_tickets() {
        let mut inv = Invalidations::default();
        for seq in 1..=(REMEMBERED as u64 + 1) {
            inv.record(seq, seq, None);
        }
        assert!(inv.since(999_999, 0, None), "older than what was forgotten");
        assert!(!inv.since(999_999, 1, None));
    }
}
