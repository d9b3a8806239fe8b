//! Exponential reconnect back-off with jitter.
//!
//! Full jitter on the upper half of the interval (delay in [d/2, d]) keeps a fleet of
//! sidecars from reconnecting in step after a shared outage, while never retrying sooner than
//! half the nominal delay.

use std::time::Duration;

use rand::RngExt;

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max,
            current: base,
        }
    }

    /// The delay before the next attempt; each call doubles the nominal delay up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let nominal = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = nominal / 2;
        let jitter = rand::rng().random_range(0..=half.as_micros() as u64);
        half + Duration::from_micros(jitter)
    }

    pub fn reset(&mut self) {
        self.current = self.base;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let mut nominal = Duration::from_millis(100);
        for _ in 0..12 {
            let d = b.next_delay();
            assert!(d >= nominal / 2 && d <= nominal, "{d:?} vs {nominal:?}");
            nominal = (nominal * 2).min(Duration::from_secs(10));
        }
        assert!(b.next_delay() >= Duration::from_secs(5));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
