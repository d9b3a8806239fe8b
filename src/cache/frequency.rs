//! How often each key has been filled lately, approximately: a count-min sketch of small
//! counters that halves itself every so often, so that old popularity fades (TinyLFU's
//! frequency sketch). `admission` compares a new key's count with that of the entry a
//! full cache would evict for it.
//!
//! A key's four counters lie in one 64-byte block, one in each quarter, picked by bits of
//! its hash (as Caffeine lays its sketch out): counting a fill touches one cache line, not
//! four lines of a table of hundreds of KiB. A key's count is the least of its four, so a
//! count can only be overstated, by keys that share all four counters. Counters stop at
//! 15: beyond that, "read often" is all the comparison needs. After ten increments per
//! block's worth of counters, every counter is halved.

/// Counters at most per row (a quarter of the sketch).
const MAX_WIDTH: usize = 1 << 18;
/// Counters at least per row.
const MIN_WIDTH: usize = 1 << 10;
const ROWS: usize = 4;
/// Counters per block: one cache line, a quarter of it per row.
const BLOCK: usize = 64;
pub(super) const MAX_COUNT: u8 = 15;

pub(super) struct Frequency {
    counters: Box<[u8]>,
    /// Counters per row, a power of two (the sketch holds `ROWS * width`).
    width: usize,
    /// Increments since the last halving.
    added: usize,
}

impl Frequency {
    /// A sketch for a cache of up to `capacity` entries. Allocated zeroed: its pages are
    /// mapped as the counters are first touched.
    pub(super) fn new(capacity: usize) -> Frequency {
        let width = capacity
            .clamp(MIN_WIDTH, MAX_WIDTH)
            .next_power_of_two()
            .min(MAX_WIDTH);
        Frequency {
            counters: vec![0; ROWS * width].into_boxed_slice(),
            width,
            added: 0,
        }
    }

    /// Counts one more fill of the key hashing to `hash`.
    pub(super) fn increment(&mut self, hash: u64) {
        let mut grew = false;
        for i in self.places(hash) {
            let c = &mut self.counters[i];
            if *c < MAX_COUNT {
                *c += 1;
                grew = true;
            }
        }
        if grew {
            self.added += 1;
            if self.added >= 10 * self.width {
                self.halve();
            }
        }
    }

    /// About how many fills of the key hashing to `hash` were counted lately.
    pub(super) fn estimate(&self, hash: u64) -> u8 {
        self.places(hash)
            .map(|i| self.counters[i])
            .min()
            .unwrap_or(0)
    }

    fn halve(&mut self) {
        for c in self.counters.iter_mut() {
            *c >>= 1;
        }
        self.added /= 2;
    }

    /// The key's counter in each row: its block, then in each quarter of the block the
    /// counter four bits of the (random) hash pick.
    fn places(&self, hash: u64) -> impl Iterator<Item = usize> + use<> {
        let blocks = ROWS * self.width / BLOCK;
        let block = (hash.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize & (blocks - 1);
        (0..ROWS).map(move |row| {
            let within = (hash >> (4 * row)) as usize & (BLOCK / ROWS - 1);
            block * BLOCK + row * (BLOCK / ROWS) + within
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(i: u64) -> u64 {
        i.wrapping_mul(0xD6E8_FEB8_6659_FD93).rotate_left(17) ^ 0x1234_5678_9ABC_DEF0
    }

    #[test]
    fn counts_what_was_counted_and_stops_at_fifteen() {
        let mut f = Frequency::new(100_000);
        for _ in 0..3 {
            f.increment(hash(1));
        }
        f.increment(hash(2));
        assert_eq!(f.estimate(hash(1)), 3);
        assert_eq!(f.estimate(hash(2)), 1);
        assert_eq!(f.estimate(hash(3)), 0);
        for _ in 0..40 {
            f.increment(hash(1));
        }
        assert_eq!(f.estimate(hash(1)), MAX_COUNT);
    }

    #[test]
    fn old_counts_fade() {
        let mut f = Frequency::new(MIN_WIDTH);
        for _ in 0..8 {
            f.increment(hash(1));
        }
        f.halve();
        assert_eq!(f.estimate(hash(1)), 4);
        // Ten increments per counter of a row: the sketch halves itself.
        for i in 0..(10 * MIN_WIDTH) as u64 {
            f.increment(hash(1000 + i));
        }
        assert!(f.added < 10 * MIN_WIDTH, "halved: {}", f.added);
    }

    #[test]
    fn a_count_is_rarely_overstated() {
        let mut f = Frequency::new(1 << 18);
        for i in 0..50_000 {
            f.increment(hash(i));
        }
        let overstated = (50_000..60_000)
            .filter(|&i| f.estimate(hash(i)) > 0)
            .count();
        assert!(
            overstated < 100,
            "{overstated} of 10000 unseen keys look seen"
        );
    }
}
