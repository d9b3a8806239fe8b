//! Blocking commands on their way to a server: other traffic to that server waits until
//! they are written.
//!
//! Why: Redis serves a `BLPOP` that reached it before another client's `LPUSH`, and a
//! client of Redis can count on that when it sends the pop first. Through redfuse the pop
//! takes a longer path than the push (a dedicated connection, a task of its own, maybe a
//! connect) while the push goes straight out on a shared connection; when the pop is held
//! up anywhere on that path (its task not scheduled yet on a loaded machine, another worker
//! thread already running the pusher) the push would reach Redis first, and the pop would
//! wait for a value that is already gone.
//!
//! So a client's blocking command raises the barrier as soon as redfuse has read it, and the
//! connection lowers it once the command's bytes are written to the server's socket; until
//! then calls without a raised barrier wait before they are queued. Blocking commands are
//! rare and the wait is the time a write takes (or, when no warm connection is left, the
//! time opening one takes: a connect and a `HELLO`), so traffic pays one load of a counter
//! that is nearly always zero. A blocking command never waits for another: two of them could
//! each wait for the other, and Redis's order between two waiting pops is not a guarantee
//! clients rely on.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

#[derive(Default)]
pub struct Barrier {
    raised: AtomicUsize,
    lowered: Notify,
}

/// One blocking command not written yet; dropping it lowers the barrier.
#[derive(Debug)]
pub struct Raised(Arc<Barrier>);

impl std::fmt::Debug for Barrier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Barrier")
            .field("raised", &self.raised.load(Ordering::Relaxed))
            .finish()
    }
}

impl Barrier {
    pub fn raise(self: &Arc<Self>) -> Raised {
        self.raised.fetch_add(1, Ordering::AcqRel);
        Raised(self.clone())
    }

    /// Whether a blocking command is on its way (one load: the common answer is no).
    pub fn is_raised(&self) -> bool {
        self.raised.load(Ordering::Acquire) > 0
    }

    /// Waits until no blocking command is on its way, or `limit` passed. The caller passes
    /// the server's connect timeout: a blocking command whose connection must first be
    /// opened (no warm one left) holds the barrier while it is, and opening one is what that
    /// timeout bounds; a write that never completes is the connection's to time out, not a
    /// reason to stall everyone else longer.
    pub async fn pass(&self, limit: Duration) {
        let wait = async {
            loop {
                let lowered = self.lowered.notified();
                tokio::pin!(lowered);
                lowered.as_mut().enable();
                if !self.is_raised() {
                    return;
                }
                lowered.await;
            }
        };
        let _ = tokio::time::timeout(limit, wait).await;
    }
}

impl Raised {
    /// Another hold on the same barrier, for a call the blocking command's own path sends
    /// before it (a fence): that call must not wait behind the command it clears the way
    /// for.
    pub fn again(&self) -> Raised {
        self.0.raise()
    }
}

impl Drop for Raised {
    fn drop(&mut self) {
        if self.0.raised.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.lowered.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn traffic_passes_once_every_blocking_command_is_written() {
        let barrier = Arc::new(Barrier::default());
        barrier.pass(Duration::from_secs(1)).await;
        let first = barrier.raise();
        let second = barrier.raise();
        let passed = tokio::spawn({
            let barrier = barrier.clone();
            async move {
                barrier.pass(Duration::from_secs(1)).await;
                tokio::time::Instant::now()
            }
        });
        let start = tokio::time::Instant::now();
        tokio::time::sleep(Duration::from_millis(5)).await;
        drop(first);
        tokio::task::yield_now().await;
        assert!(!passed.is_finished(), "passed with one still raised");
        tokio::time::sleep(Duration::from_millis(5)).await;
        drop(second);
        let at = passed.await.unwrap();
        assert_eq!(at - start, Duration::from_millis(10));
        assert!(!barrier.is_raised());
    }

    #[tokio::test(start_paused = true)]
    async fn a_barrier_never_lowered_holds_traffic_up_to_the_limit() {
        let barrier = Arc::new(Barrier::default());
        let _stuck = barrier.raise();
        let start = tokio::time::Instant::now();
        barrier.pass(Duration::from_millis(500)).await;
        assert_eq!(start.elapsed(), Duration::from_millis(500));
    }
}
