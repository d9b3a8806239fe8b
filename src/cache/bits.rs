//! A bitmap of 64-bit hashes in two generations: a bit set stays visible through the
//! current generation and the next, and is forgotten a generation at a time (when to turn
//! is the owner's decision). One bit per hash, no collision handling: a shared bit can only
//! make a hash look set that was not, so owners use it where that errs on the safe side.

/// Bits of each generation: 128 KiB, allocated zeroed (pages the OS maps on first touch).
const BITS: usize = 1 << 20;

pub(super) struct GenerationBits {
    current: Box<[u64]>,
    previous: Box<[u64]>,
}

impl GenerationBits {
    pub(super) fn new() -> GenerationBits {
        GenerationBits {
            current: vec![0; BITS / 64].into_boxed_slice(),
            previous: vec![0; BITS / 64].into_boxed_slice(),
        }
    }

    pub(super) fn set(&mut self, hash: u64) {
        let (word, bit) = place(hash);
        self.current[word] |= bit;
    }

    /// Whether `hash` was set in this generation or the one before.
    pub(super) fn test(&self, hash: u64) -> bool {
        let (word, bit) = place(hash);
        (self.current[word] | self.previous[word]) & bit != 0
    }

    /// Starts a new generation, forgetting the older of the two.
    pub(super) fn turn(&mut self) {
        std::mem::swap(&mut self.current, &mut self.previous);
        self.current.fill(0);
    }
}

fn place(hash: u64) -> (usize, u64) {
    let bit = hash as usize % BITS;
    (bit / 64, 1 << (bit % 64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bit_lasts_through_the_next_generation() {
        let mut g = GenerationBits::new();
        g.set(7);
        assert!(g.test(7) && !g.test(8));
        g.turn();
        assert!(g.test(7), "one turn: still set");
        g.turn();
        assert!(!g.test(7), "two turns: forgotten");
    }
}
