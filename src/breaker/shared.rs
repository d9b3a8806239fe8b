//! The breaker shared by the tasks talking to one upstream: a mutex around the state
//! machine, the timer task, the watch channel, metrics and log lines.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

#[cfg(test)]
use super::classify::FailureKind;
use super::classify::Outcome;
use super::config::BreakerConfig;
use super::machine::{
    Advice, AdvicePolicy, Advised, Breaker, BreakerSnapshot, Mode, Permit, Rejected, State,
    Transition,
};
use super::metrics::UpstreamBreakerMetrics;

struct Inner {
    name: String,
    /// `slow_call_threshold_ms`, read outside the lock for the slow-call counter; a
    /// reload changes it ([`SharedBreaker::reconfigure`]).
    slow_ms: std::sync::atomic::AtomicU64,
    breaker: Mutex<Breaker>,
    /// Whether the breaker refuses every request (see [`SharedBreaker::rejects_all`]),
    /// kept beside the lock so that the hot path can ask without taking it.
    rejecting: std::sync::atomic::AtomicBool,
    metrics: UpstreamBreakerMetrics,
    /// Separate `Arc` so the timer can wait on it without keeping `Inner`
    /// alive; see [`SharedBreaker::spawn_timer`].
    timer_wake: Arc<Notify>,
    state_tx: watch::Sender<State>,
    /// The last [`RECENT_TRANSITIONS`] transitions, oldest first (the admin status page).
    recent: Mutex<VecDeque<TransitionRecord>>,
    /// Told of every transition (the fleet's publisher), set once.
    observer: OnceLock<Arc<dyn TransitionObserver>>,
    /// Asks the health probe to run now (fleet advice).
    probe_now: Notify,
}

/// Told of every transition of a breaker, under its lock and in order: it must return at
/// once (the fleet's publisher only queues).
pub trait TransitionObserver: Send + Sync + 'static {
    fn transition(&self, upstream: &str, t: &Transition);
}

/// Transitions kept per breaker for [`SharedBreaker::recent_transitions`].
pub const RECENT_TRANSITIONS: usize = 20;

/// One past transition, as shown by the admin status page.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TransitionRecord {
    /// Wall-clock time, in milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    pub from: &'static str,
    pub to: &'static str,
    pub reason: String,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Lets a sleeping timer task notice that the breaker is gone.
        self.timer_wake.notify_one();
    }
}

/// A [`Breaker`] shared by the tasks talking to one upstream. Cheap to clone.
#[derive(Clone)]
pub struct SharedBreaker {
    inner: Arc<Inner>,
}

impl fmt::Debug for SharedBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedBreaker")
            .field("name", &self.inner.name)
            .field("state", &self.state())
            .field("mode", &self.mode())
            .finish()
    }
}

impl SharedBreaker {
    /// `name` is used in logs; pass `metrics` from
    /// `BreakerMetrics::for_upstream(name)` so both carry the same upstream.
    ///
    /// # Panics
    ///
    /// If `config` is invalid, like [`Breaker::new`].
    pub fn new(
        name: &str,
        config: BreakerConfig,
        seed: u64,
        metrics: UpstreamBreakerMetrics,
    ) -> SharedBreaker {
        let breaker = Breaker::new(config.clone(), seed);
        let state = breaker.state();
        let rejecting = std::sync::atomic::AtomicBool::new(breaker.rejects_all());
        metrics.publish(&breaker.snapshot(Instant::now()));
        let (state_tx, _) = watch::channel(state);
        SharedBreaker {
            inner: Arc::new(Inner {
                name: name.to_owned(),
                slow_ms: std::sync::atomic::AtomicU64::new(config.slow_call_threshold_ms),
                breaker: Mutex::new(breaker),
                rejecting,
                metrics,
                timer_wake: Arc::new(Notify::new()),
                state_tx,
                recent: Mutex::new(VecDeque::with_capacity(RECENT_TRANSITIONS)),
                observer: OnceLock::new(),
                probe_now: Notify::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Breaker> {
        // A panic while the lock was held can only have come from this
        // module's arithmetic, after which the breaker is still a coherent
        // value; refusing every later request to the upstream would be worse.
        self.inner.breaker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the task that fires the breaker's timers (call it once, inside
    /// a tokio runtime). It sleeps until [`Breaker::next_deadline`], calls
    /// `poll`, and re-arms; calls that move the deadline wake it early.
    ///
    /// It exits when `shutdown` completes (pass e.g.
    /// `async move { let _ = rx.changed().await; }` for a watch channel, or
    /// `token.cancelled_owned()`), or once every `SharedBreaker` clone (and
    /// every outstanding [`CallGuard`]) has been dropped: it holds only a weak
    /// reference, so it never keeps the breaker alive.
    pub fn spawn_timer<F>(&self, shutdown: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let weak = Arc::downgrade(&self.inner);
        let wake = Arc::clone(&self.inner.timer_wake);
        tokio::spawn(run_timer(weak, wake, shutdown))
    }

    /// Asks to send one request. The guard records the outcome when completed
    /// and records [`Outcome::Ignored`] if dropped first.
    pub fn try_acquire(&self) -> Result<CallGuard, Rejected> {
        self.try_acquire_at(Instant::now())
    }

    /// [`SharedBreaker::try_acquire`] at `now`, for a caller that has just read the clock
    /// (the requests of one client read arrived together).
    pub fn try_acquire_at(&self, now: Instant) -> Result<CallGuard, Rejected> {
        let result = {
            let mut b = self.lock();
            let before = b.next_deadline();
            let result = b.try_acquire(now);
            // Why the hot path need not wake the timer.
            debug_assert_eq!(before, b.next_deadline());
            result
        };
        match result {
            Ok(permit) => {
                if permit.is_shadow() {
                    tracing::debug!(
                        upstream = %self.inner.name,
                        "circuit breaker would reject this request (metrics_only mode)"
                    );
                }
                Ok(CallGuard {
                    breaker: self.clone(),
                    permit,
                    started: now,
                    completed: false,
                })
            }
            Err(rejected) => {
                self.inner.metrics.rejected.inc();
                Err(rejected)
            }
        }
    }

    fn finish(&self, permit: Permit, outcome: Outcome, now: Instant) {
        self.finish_all(std::iter::once((permit, outcome)), now);
    }

    /// Records outcomes in order under one lock, and counts them in one step each.
    fn finish_all(&self, finished: impl Iterator<Item = (Permit, Outcome)>, now: Instant) {
        let slow = Duration::from_millis(
            self.inner
                .slow_ms
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        let mut counts = [0u64; 4];
        let mut b = self.lock();
        let before = b.next_deadline();
        let counted = finished.inspect(|(_, outcome)| match outcome {
            Outcome::Success { latency } => {
                counts[0] += 1;
                counts[1] += u64::from(*latency > slow);
            }
            Outcome::Failure(_) => counts[2] += 1,
            Outcome::Ignored => counts[3] += 1,
        });
        b.record_all(now, counted, |b, t| self.apply(b, &t, now));
        if b.next_deadline() != before {
            self.inner.timer_wake.notify_one();
        }
        drop(b);
        let m = &self.inner.metrics;
        for (counter, n) in [
            &m.calls_success,
            &m.calls_slow,
            &m.calls_failure,
            &m.calls_ignored,
        ]
        .into_iter()
        .zip(counts)
        {
            if n > 0 {
                counter.inc_by(n);
            }
        }
    }

    fn poll_and_deadline(&self) -> (Option<Transition>, Option<Instant>) {
        let mut b = self.lock();
        let now = Instant::now();
        let t = b.poll(now);
        match &t {
            Some(t) => self.apply(&b, t, now),
            // Window rotation: keep the rate gauges decaying while idle.
            None => self.inner.metrics.publish(&b.snapshot(now)),
        }
        (t, b.next_deadline())
    }

    /// Side effects of a transition. Runs under the breaker lock so that two
    /// quick transitions cannot publish out of order.
    fn apply(&self, b: &Breaker, t: &Transition, now: Instant) {
        self.note_rejecting(b);
        let m = &self.inner.metrics;
        m.publish(&b.snapshot(now));
        m.count_transition(t);
        let name = &self.inner.name;
        if t.to == State::Open {
            tracing::warn!(
                upstream = %name,
                from = t.from.as_str(),
                to = t.to.as_str(),
                reason = t.reason.as_str(),
                generation = t.generation,
                "circuit breaker {t}"
            );
        } else {
            tracing::info!(
                upstream = %name,
                from = t.from.as_str(),
                to = t.to.as_str(),
                reason = t.reason.as_str(),
                generation = t.generation,
                "circuit breaker {t}"
            );
        }
        self.inner.state_tx.send_replace(t.to);
        let mut recent = self.inner.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == RECENT_TRANSITIONS {
            recent.pop_front();
        }
        recent.push_back(TransitionRecord {
            at_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            from: t.from.as_str(),
            to: t.to.as_str(),
            reason: t.reason.to_string(),
        });
        drop(recent);
        if let Some(o) = self.inner.observer.get() {
            o.transition(name, t);
        }
    }

    fn manual(
        &self,
        f: impl FnOnce(&mut Breaker, Instant) -> Option<Transition>,
    ) -> Option<Transition> {
        let mut b = self.lock();
        let now = Instant::now();
        let old_mode = b.mode();
        let t = f(&mut b, now);
        match &t {
            Some(t) => self.apply(&b, t, now),
            None => self.inner.metrics.publish(&b.snapshot(now)),
        }
        if t.is_none() && b.mode() != old_mode {
            tracing::info!(
                upstream = %self.inner.name,
                from = old_mode.as_str(),
                to = b.mode().as_str(),
                "circuit breaker mode changed"
            );
        }
        self.note_rejecting(&b);
        // Manual actions rearrange timers freely; an extra wake-up is cheap.
        self.inner.timer_wake.notify_one();
        t
    }

    /// Call under the lock after anything that may change the state or the mode.
    fn note_rejecting(&self, b: &Breaker) {
        self.inner
            .rejecting
            .store(b.rejects_all(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the breaker refuses every request (Open, or forced open), as of its last
    /// transition: a hint, without the lock, for work that only matters if a request can
    /// go upstream. [`SharedBreaker::try_acquire`] remains the answer.
    pub fn rejects_all(&self) -> bool {
        self.inner
            .rejecting
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn set_mode(&self, mode: Mode) -> Option<Transition> {
        self.manual(|b, now| b.set_mode(mode, now))
    }

    pub fn reset(&self) -> Option<Transition> {
        self.manual(|b, now| b.reset(now))
    }

    /// The health probe has failed `failures` times in a row, the last one begun in
    /// generation `began`; see [`Breaker::probes_failed`].
    pub fn probes_failed(
        &self,
        failures: u32,
        kind: super::FailureKind,
        began: u64,
    ) -> Option<Transition> {
        self.manual(|b, now| b.probes_failed(failures, kind, began, now))
    }

    /// See [`Breaker::generation`].
    pub fn generation(&self) -> u64 {
        self.lock().generation()
    }

    /// The health probe got a normal answer while the breaker is Open because of a
    /// condition of the server's own (a busy script, loading): probing starts now.
    pub fn server_recovered(&self) -> Option<Transition> {
        self.manual(|b, now| b.server_recovered(now))
    }

    /// Sets the observer told of every transition; false if one was set already.
    pub fn observe(&self, observer: Arc<dyn TransitionObserver>) -> bool {
        self.inner.observer.set(observer).is_ok()
    }

    /// Lets fleet advice act on this breaker; see [`Breaker::advise`].
    pub fn set_advice_policy(&self, policy: AdvicePolicy) {
        self.lock().set_advice_policy(policy);
    }

    /// Takes one report from another instance; asks the health probe to run now when the
    /// advice says so.
    pub fn advise(&self, advice: Advice) -> Advised {
        let advised = {
            let mut b = self.lock();
            let now = Instant::now();
            let advised = b.advise(advice, now);
            if let Some(t) = &advised.transition {
                self.apply(&b, t, now);
            }
            advised
        };
        if advised.transition.is_some() {
            self.inner.timer_wake.notify_one();
        }
        if advised.effect.probe_now() {
            self.inner.probe_now.notify_one();
        }
        advised
    }

    /// Completes when something (fleet advice) asks the health probe to run now. A request
    /// made while nobody waits is kept for the next wait.
    pub async fn probe_wanted(&self) {
        self.inner.probe_now.notified().await
    }

    /// New thresholds from a configuration reload; see [`Breaker::reconfigure`]. The mode
    /// changes only when the configured mode did, so a reload does not undo an operator's
    /// forced state.
    pub fn reconfigure(&self, config: BreakerConfig) {
        self.inner.slow_ms.store(
            config.slow_call_threshold_ms,
            std::sync::atomic::Ordering::Relaxed,
        );
        self.manual(|b, now| b.reconfigure(config, now));
    }

    pub fn snapshot(&self) -> BreakerSnapshot {
        let b = self.lock();
        b.snapshot(Instant::now())
    }

    pub fn state(&self) -> State {
        self.lock().state()
    }

    pub fn mode(&self) -> Mode {
        self.lock().mode()
    }

    /// The last transitions, oldest first (at most [`RECENT_TRANSITIONS`]).
    pub fn recent_transitions(&self) -> Vec<TransitionRecord> {
        let recent = self.inner.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.iter().cloned().collect()
    }

    /// State changes, for the cache, the write-queue replay and `/ready`.
    pub fn subscribe(&self) -> watch::Receiver<State> {
        self.inner.state_tx.subscribe()
    }
}

async fn run_timer<F>(weak: Weak<Inner>, wake: Arc<Notify>, shutdown: F)
where
    F: Future<Output = ()>,
{
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let deadline = match weak.upgrade() {
            // The strong reference is dropped before the await below, so the
            // timer never keeps the breaker alive.
            Some(inner) => SharedBreaker { inner }.poll_and_deadline().1,
            None => return,
        };
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        // `notify_one` stores a permit when nobody waits, so a wake-up sent
        // between the poll above and this select is not lost.
        tokio::select! {
            biased;
            () = &mut shutdown => return,
            () = wake.notified() => {}
            () = sleep => {}
        }
    }
}

/// An admitted call. Complete it with its outcome; dropping it unfinished
/// records [`Outcome::Ignored`] (client cancellation) and frees a half-open
/// probe slot.
#[must_use = "dropping a CallGuard at once records the call as ignored"]
pub struct CallGuard {
    breaker: SharedBreaker,
    permit: Permit,
    started: Instant,
    completed: bool,
}

impl fmt::Debug for CallGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallGuard")
            .field("upstream", &self.breaker.inner.name)
            .field("permit", &self.permit)
            .finish()
    }
}

impl CallGuard {
    #[cfg(test)]
    pub fn is_probe(&self) -> bool {
        self.permit.is_probe()
    }

    /// Time since admission.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn complete(self, outcome: Outcome) {
        self.complete_at(outcome, Instant::now());
    }

    /// [`CallGuard::complete`] at `now`, for a caller that has just read the clock (the
    /// replies read together from one connection).
    pub fn complete_at(mut self, outcome: Outcome, now: Instant) {
        self.completed = true;
        self.breaker.finish(self.permit, outcome, now);
    }

    /// Completes calls at `now`, in order: the replies read together from one connection,
    /// all admitted by the same breaker (one lock for them all).
    pub fn complete_all(finished: &mut Vec<(CallGuard, Outcome)>, now: Instant) {
        let Some(breaker) = finished.first().map(|(g, _)| g.breaker.clone()) else {
            return;
        };
        debug_assert!(
            finished
                .iter()
                .all(|(g, _)| Arc::ptr_eq(&g.breaker.inner, &breaker.inner))
        );
        breaker.finish_all(
            finished.drain(..).map(|(mut g, outcome)| {
                g.completed = true;
                (g.permit, outcome)
            }),
            now,
        );
    }

    /// Completes as a success whose latency is the time since admission.
    pub fn success(self) {
        let latency = self.elapsed();
        self.complete(Outcome::Success { latency });
    }

    #[cfg(test)]
    pub fn failure(self, kind: FailureKind) {
        self.complete(Outcome::Failure(kind));
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if !self.completed {
            self.breaker
                .finish(self.permit, Outcome::Ignored, Instant::now());
        }
    }
}
