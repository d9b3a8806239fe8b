//! Key records by key hash, evicted least recently used first by second chance (CLOCK).
//!
//! Every acknowledged write looks its key's record up and most store one, so with writes
//! spread over many keys a record access is a memory miss or several. A linked-hash-map LRU
//! (the `lru` crate, used before) made it four: the hash table's slot, the record's own
//! heap node, and the two neighbours it is unlinked from and the head it is linked to on
//! every use. The profile of unpipelined SETs over 100k keys showed that relinking as the
//! largest single cost the cache added to a write.
//!
//! Here the record lives in the hash table's slot, a use sets a bit beside it, and
//! insertion order is a queue of `(hash, stamp)`: eviction takes the queue's front, gives a
//! used record a second chance (its bit cleared, sent to the back) and evicts the first
//! that was not used since it last went round. A record removed or replaced leaves its
//! queue item behind; the stamp tells such an item from the record's current one, and the
//! queue is compacted when stale items outnumber live ones.

use std::collections::VecDeque;

use super::FastMap;

struct Slot<V> {
    value: V,
    /// Which queue item is this record's.
    stamp: u32,
    used: bool,
}

pub(super) struct Records<V> {
    map: FastMap<u64, Slot<V>>,
    /// Insertion order, oldest first; items whose stamp is not their record's are stale.
    queue: VecDeque<(u64, u32)>,
    next_stamp: u32,
}

impl<V> Default for Records<V> {
    fn default() -> Self {
        Records {
            map: FastMap::default(),
            queue: VecDeque::new(),
            next_stamp: 0,
        }
    }
}

impl<V> Records<V> {
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    /// The record without marking it used.
    pub(super) fn peek(&self, hash: &u64) -> Option<&V> {
        self.map.get(hash).map(|s| &s.value)
    }

    /// The record, marked used.
    pub(super) fn get_mut(&mut self, hash: &u64) -> Option<&mut V> {
        self.map.get_mut(hash).map(|s| {
            s.used = true;
            &mut s.value
        })
    }

    /// Stores a record, replacing (and returning) any of the same hash; it goes to the back
    /// of the eviction order, marked used: when every older record was used too, their
    /// second chances must not leave the newest first in line.
    pub(super) fn push(&mut self, hash: u64, value: V) -> Option<V> {
        let stamp = self.next_stamp;
        self.next_stamp = self.next_stamp.wrapping_add(1);
        let old = self.map.insert(
            hash,
            Slot {
                value,
                stamp,
                used: true,
            },
        );
        self.queue.push_back((hash, stamp));
        self.compact();
        old.map(|s| s.value)
    }

    pub(super) fn pop(&mut self, hash: &u64) -> Option<V> {
        let old = self.map.remove(hash).map(|s| s.value);
        self.compact();
        old
    }

    /// Removes the record least recently used, approximately: the oldest not used since
    /// it last reached the front.
    pub(super) fn pop_lru(&mut self) -> Option<(u64, V)> {
        while let Some((hash, stamp)) = self.queue.pop_front() {
            let Some(slot) = self.map.get_mut(&hash) else {
                continue;
            };
            if slot.stamp != stamp {
                continue;
            }
            if slot.used {
                slot.used = false;
                self.queue.push_back((hash, stamp));
                continue;
            }
            return self.map.remove(&hash).map(|s| (hash, s.value));
        }
        None
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&u64, &V)> {
        self.map.iter().map(|(h, s)| (h, &s.value))
    }

    pub(super) fn clear(&mut self) {
        self.map.clear();
        self.queue.clear();
    }

    /// Drops the stale queue items once they are as many as the records (plus some slack,
    /// so that a small table is not compacted on every removal): the queue stays within
    /// about twice the records, and each stale item is dropped once.
    fn compact(&mut self) {
        if self.queue.len() > 2 * self.map.len() + 64 {
            let map = &self.map;
            self.queue
                .retain(|(hash, stamp)| map.get(hash).is_some_and(|s| s.stamp == *stamp));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(r: &mut Records<u32>) -> Vec<u64> {
        std::iter::from_fn(|| r.pop_lru().map(|(h, _)| h)).collect()
    }

    #[test]
    fn evicts_in_insertion_order_but_spares_a_used_record_once() {
        let mut r = Records::default();
        for h in 1..=4 {
            assert!(r.push(h, h as u32).is_none());
        }
        // A first pass gives every record its second chance (a new one counts as used).
        assert_eq!(r.pop_lru(), Some((1, 1)));
        r.push(1, 1);
        *r.get_mut(&3).unwrap() += 10;
        assert_eq!(r.peek(&3), Some(&13));
        assert_eq!(r.peek(&4), Some(&4), "peek does not use");
        assert_eq!(r.pop_lru(), Some((2, 2)));
        assert_eq!(r.pop_lru(), Some((4, 4)), "3 was used since: second chance");
        // Both used since the last pass: their second chances keep the queue's order.
        assert_eq!(drain(&mut r), [3, 1]);
        assert_eq!(r.len(), 0);
    }

    #[test]
    fn the_newest_record_is_not_first_in_line_when_all_were_used() {
        let mut r = Records::default();
        for h in 1..=3 {
            r.push(h, h as u32);
        }
        for h in 1..=3 {
            r.get_mut(&h);
        }
        r.push(9, 9);
        assert_eq!(r.pop_lru(), Some((1, 1)));
        assert_eq!(drain(&mut r), [2, 3, 9]);
    }

    #[test]
    fn a_replaced_or_removed_record_leaves_no_live_trace_in_the_order() {
        let mut r = Records::default();
        r.push(1, 1);
        r.push(2, 2);
        assert_eq!(r.push(1, 10), Some(1), "replaced: now the newest");
        assert_eq!(r.pop(&2), Some(2));
        r.push(3, 3);
        assert_eq!(drain(&mut r), [1, 3]);
        assert!(r.pop_lru().is_none());
    }

    #[test]
    fn the_queue_stays_within_twice_the_records() {
        let mut r = Records::default();
        for round in 0..1000u64 {
            for h in 0..10 {
                r.push(h, round as u32);
            }
            r.pop(&(round % 10));
            assert!(r.queue.len() <= 2 * r.len() + 64 + 1, "{}", r.queue.len());
        }
        assert_eq!(r.len(), 9, "the last round removed 9");
        let mut order = drain(&mut r);
        order.sort_unstable();
        assert_eq!(order, (0..9).collect::<Vec<_>>());
        r.push(7, 7);
        r.clear();
        assert_eq!((r.len(), r.queue.len()), (0, 0));
    }
}
