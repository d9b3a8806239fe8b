//! The rolling window of call counts a breaker judges rates over.

#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Bucket {
    /// Absolute bucket number, so a read-only view can tell live from expired.
    pub(super) index: u64,
    pub(super) calls: u64,
    pub(super) failures: u64,
    pub(super) slow: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Totals {
    pub(super) calls: u64,
    pub(super) failures: u64,
    pub(super) slow: u64,
}

impl Totals {
    pub(super) fn failure_rate(&self) -> f64 {
        ratio(self.failures, self.calls)
    }
    pub(super) fn slow_rate(&self) -> f64 {
        ratio(self.slow, self.calls)
    }
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// Ring of buckets with running totals, so the per-call rate check is O(1)
/// and rotation costs at most one step per elapsed bucket.
#[derive(Debug, Clone)]
pub(super) struct Window {
    pub(super) buckets: Vec<Bucket>,
    /// Absolute number of the newest bucket.
    pub(super) head: u64,
    pub(super) totals: Totals,
}

impl Window {
    pub(super) fn new(len: usize) -> Self {
        Window {
            buckets: vec![Bucket::default(); len],
            head: 0,
            totals: Totals::default(),
        }
    }

    pub(super) fn len(&self) -> u64 {
        self.buckets.len() as u64
    }

    pub(super) fn clear(&mut self) {
        self.buckets.fill(Bucket::default());
        self.totals = Totals::default();
    }

    /// Moves the head to bucket `cur`, dropping the buckets that fall out.
    /// Time that appears to go backwards (callers racing to the lock with
    /// slightly older `now`s) leaves the head where it is.
    pub(super) fn advance(&mut self, cur: u64) {
        if cur <= self.head {
            return;
        }
        let n = self.len();
        if cur - self.head >= n {
            self.clear();
        } else {
            for idx in self.head + 1..=cur {
                let b = &mut self.buckets[(idx % n) as usize];
                self.totals.calls -= b.calls;
                self.totals.failures -= b.failures;
                self.totals.slow -= b.slow;
                *b = Bucket {
                    index: idx,
                    ..Bucket::default()
                };
            }
        }
        self.head = cur;
    }

    pub(super) fn add(&mut self, cur: u64, failure: bool, slow: bool) {
        self.advance(cur);
        let n = self.len();
        let head = self.head;
        let b = &mut self.buckets[(head % n) as usize];
        b.index = head;
        b.calls += 1;
        b.failures += u64::from(failure);
        b.slow += u64::from(slow);
        self.totals.calls += 1;
        self.totals.failures += u64::from(failure);
        self.totals.slow += u64::from(slow);
    }

    /// Totals as they would be at bucket `cur`, without rotating.
    pub(super) fn totals_at(&self, cur: u64) -> Totals {
        if cur <= self.head {
            return self.totals;
        }
        let n = self.len();
        self.buckets
            .iter()
            .filter(|b| b.index + n > cur)
            .fold(Totals::default(), |t, b| Totals {
                calls: t.calls + b.calls,
                failures: t.failures + b.failures,
                slow: t.slow + b.slow,
            })
    }
}
