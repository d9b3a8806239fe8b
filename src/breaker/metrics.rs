//! The breaker's Prometheus families, every series labelled by upstream.

use prometheus::{
    Gauge, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use super::machine::{BreakerSnapshot, State, Transition};

/// The breaker metric families, registered once per registry. Every series
/// carries an `upstream` label; see [`BreakerMetrics::for_upstream`].
#[derive(Clone)]
pub struct BreakerMetrics {
    state: IntGaugeVec,
    state_info: IntGaugeVec,
    transitions: IntCounterVec,
    calls: IntCounterVec,
    pub(super) rejected: IntCounterVec,
    failure_rate: GaugeVec,
    slow_call_rate: GaugeVec,
    open_backoff: GaugeVec,
}

impl BreakerMetrics {
    /// Creates the families and registers them in `registry`. Fails if they
    /// are already registered there.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let up = &["upstream"];
        let m = BreakerMetrics {
            state: IntGaugeVec::new(
                Opts::new(
                    "redfuse_breaker_state",
                    "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
                ),
                up,
            )?,
            state_info: IntGaugeVec::new(
                Opts::new(
                    "redfuse_breaker_state_info",
                    "1 for the circuit breaker's current state, 0 for the others.",
                ),
                &["upstream", "state"],
            )?,
            transitions: IntCounterVec::new(
                Opts::new(
                    "redfuse_breaker_transitions_total",
                    "Circuit breaker state transitions.",
                ),
                &["upstream", "from", "to", "reason"],
            )?,
            calls: IntCounterVec::new(
                Opts::new(
                    "redfuse_breaker_calls_total",
                    "Completed calls through the circuit breaker by outcome; slow successes count under both success and slow.",
                ),
                &["upstream", "outcome"],
            )?,
            rejected: IntCounterVec::new(
                Opts::new(
                    "redfuse_breaker_rejected_total",
                    "Requests rejected by the circuit breaker.",
                ),
                up,
            )?,
            failure_rate: GaugeVec::new(
                Opts::new(
                    "redfuse_breaker_failure_rate",
                    "Failure rate over the circuit breaker's rolling window (0..1).",
                ),
                up,
            )?,
            slow_call_rate: GaugeVec::new(
                Opts::new(
                    "redfuse_breaker_slow_call_rate",
                    "Slow-call rate over the circuit breaker's rolling window (0..1).",
                ),
                up,
            )?,
            open_backoff: GaugeVec::new(
                Opts::new(
                    "redfuse_breaker_open_backoff_seconds",
                    "Length of the current or most recent Open period; 0 once the back-off has reset.",
                ),
                up,
            )?,
        };
        registry.register(Box::new(m.state.clone()))?;
        registry.register(Box::new(m.state_info.clone()))?;
        registry.register(Box::new(m.transitions.clone()))?;
        registry.register(Box::new(m.calls.clone()))?;
        registry.register(Box::new(m.rejected.clone()))?;
        registry.register(Box::new(m.failure_rate.clone()))?;
        registry.register(Box::new(m.slow_call_rate.clone()))?;
        registry.register(Box::new(m.open_backoff.clone()))?;
        Ok(m)
    }

    /// Resolves the label handles of one upstream once, so the hot path only
    /// touches atomics. Creating it makes the series visible (at 0).
    pub fn for_upstream(&self, upstream: &str) -> UpstreamBreakerMetrics {
        let u = [upstream];
        let info = |s: State| self.state_info.with_label_values(&[upstream, s.as_str()]);
        let calls = |o: &str| self.calls.with_label_values(&[upstream, o]);
        UpstreamBreakerMetrics {
            upstream: upstream.to_owned(),
            state: self.state.with_label_values(&u),
            state_info: [
                info(State::Closed),
                info(State::HalfOpen),
                info(State::Open),
            ],
            transitions: self.transitions.clone(),
            calls_success: calls("success"),
            calls_failure: calls("failure"),
            calls_ignored: calls("ignored"),
            calls_slow: calls("slow"),
            rejected: self.rejected.with_label_values(&u),
            failure_rate: self.failure_rate.with_label_values(&u),
            slow_call_rate: self.slow_call_rate.with_label_values(&u),
            open_backoff: self.open_backoff.with_label_values(&u),
        }
    }
}

/// Pre-resolved metric handles for one upstream.
#[derive(Clone)]
pub struct UpstreamBreakerMetrics {
    upstream: String,
    state: IntGauge,
    /// Indexed like [`State::ALL`].
    state_info: [IntGauge; 3],
    /// Resolved per transition: transitions are rare, and pre-resolving every
    /// from/to/reason combination would create dozens of meaningless series.
    transitions: IntCounterVec,
    pub(super) calls_success: IntCounter,
    pub(super) calls_failure: IntCounter,
    pub(super) calls_ignored: IntCounter,
    pub(super) calls_slow: IntCounter,
    pub(super) rejected: IntCounter,
    failure_rate: Gauge,
    slow_call_rate: Gauge,
    open_backoff: Gauge,
}

impl UpstreamBreakerMetrics {
    pub(super) fn publish(&self, snap: &BreakerSnapshot) {
        self.state.set(snap.state.as_gauge());
        for (gauge, s) in self.state_info.iter().zip(State::ALL) {
            gauge.set(i64::from(s == snap.state));
        }
        self.failure_rate.set(snap.failure_rate);
        self.slow_call_rate.set(snap.slow_call_rate);
        self.open_backoff.set(snap.open_backoff_seconds);
    }

    pub(super) fn count_transition(&self, t: &Transition) {
        self.transitions
            .with_label_values(&[
                self.upstream.as_str(),
                t.from.as_str(),
                t.to.as_str(),
                t.reason.as_str(),
            ])
            .inc();
    }
}
