//! The pure circuit-breaker state machine: no I/O, no locks, no clock reads (time is
//! passed in), no logging; see the module docs of `breaker`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::classify::{FailureKind, Outcome};
use super::config::BreakerConfig;
use super::window::{Totals, Window};

mod advice;
pub use advice::{Advice, AdviceEffect, AdvicePolicy, Advised};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Admits every request.
    Closed,
    /// Admits a bounded number of probes.
    HalfOpen,
    /// Rejects every request.
    Open,
}

impl State {
    pub const ALL: [State; 3] = [State::Closed, State::HalfOpen, State::Open];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::HalfOpen => "half_open",
            State::Open => "open",
        }
    }

    /// Value of `redfuse_breaker_state`: 0 closed, 1 half-open, 2 open.
    pub fn as_gauge(self) -> i64 {
        match self {
            State::Closed => 0,
            State::HalfOpen => 1,
            State::Open => 2,
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Operator override of the breaker's behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The rules decide; Open rejects.
    #[default]
    Normal,
    /// State Open, every request rejected, no timer: the operator decides when
    /// it ends.
    ForceOpen,
    /// State Closed, every request admitted, statistics still counted, never
    /// opens. An operator override, meant to be temporary.
    ForceClosed,
    /// Same machine behaviour as `ForceClosed` (state Closed, admits all,
    /// counts statistics, never opens); it is the configured "breaker off"
    /// setting rather than an incident override, and is reported as such.
    Disabled,
    /// Shadow roll-out: states and transitions are computed, logged and
    /// exported exactly like `Normal`, but nothing is rejected. A would-be
    /// rejection is admitted with a shadow permit whose result the state
    /// machine ignores, is counted in [`BreakerSnapshot::shadow_rejections`]
    /// and logged at debug; `redfuse_breaker_rejected_total` is not bumped.
    MetricsOnly,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Normal => "normal",
            Mode::ForceOpen => "force_open",
            Mode::ForceClosed => "force_closed",
            Mode::Disabled => "disabled",
            Mode::MetricsOnly => "metrics_only",
        }
    }

    /// Whether the rules may move the state.
    fn evaluates(self) -> bool {
        matches!(self, Mode::Normal | Mode::MetricsOnly)
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            Mode::Normal,
            Mode::ForceOpen,
            Mode::ForceClosed,
            Mode::Disabled,
            Mode::MetricsOnly,
        ]
        .into_iter()
        .find(|m| m.as_str() == s)
        .ok_or_else(|| {
            format!(
                "unknown breaker mode {s:?} (expected normal, force_open, force_closed, disabled or metrics_only)"
            )
        })
    }
}

/// The operator action behind a [`Reason::Manual`] transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManualAction {
    SetMode(Mode),
    Reset,
}

/// Why a transition happened. [`Reason::as_str`] is the metric label;
/// `Display` adds the details for the log line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reason {
    ConsecutiveFailures {
        count: u32,
        threshold: u32,
    },
    FailureRate {
        rate: f64,
        threshold: f64,
        calls: u64,
    },
    SlowCallRate {
        rate: f64,
        threshold: f64,
        calls: u64,
    },
    /// Open -> HalfOpen after the (jittered) open period.
    OpenTimeout {
        after: Duration,
    },
    ProbeSuccess {
        successes: u32,
    },
    ProbeFailure {
        kind: FailureKind,
    },
    HalfOpenTimeout {
        waited: Duration,
    },
    /// The health probe failed this many times in a row.
    HealthProbe {
        failures: u32,
        kind: FailureKind,
    },
    /// The server answers normally again after a condition of its own (`-BUSY`, `-LOADING`)
    /// opened the breaker: probing starts without waiting out the open period.
    ServerRecovered {
        kind: FailureKind,
    },
    Manual {
        action: ManualAction,
    },
    /// The first local failure while other instances report the upstream open.
    FleetAdvice {
        kind: FailureKind,
        instances: u32,
    },
    /// The configured quorum of other instances reports the upstream open.
    FleetQuorum {
        instances: u32,
        quorum: u32,
    },
    /// Another instance's breaker closed on its own probes after this one opened: probing
    /// starts without waiting out the open period.
    FleetRecovered,
}

impl Reason {
    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::ConsecutiveFailures { .. } => "consecutive_failures",
            Reason::FailureRate { .. } => "failure_rate",
            Reason::SlowCallRate { .. } => "slow_call_rate",
            Reason::OpenTimeout { .. } => "open_timeout",
            Reason::ProbeSuccess { .. } => "probe_success",
            Reason::ProbeFailure { .. } => "probe_failure",
            Reason::HalfOpenTimeout { .. } => "half_open_timeout",
            Reason::ServerRecovered { .. } => "server_recovered",
            Reason::HealthProbe { .. } => "health_probe",
            Reason::Manual { .. } => "manual",
            Reason::FleetAdvice { .. } => "fleet_advice",
            Reason::FleetQuorum { .. } => "fleet_quorum",
            Reason::FleetRecovered => "fleet_recovered",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let label = self.as_str();
        match *self {
            Reason::ConsecutiveFailures { count, threshold } => write!(
                f,
                "{label}: {count} consecutive failures (threshold {threshold})"
            ),
            Reason::FailureRate {
                rate,
                threshold,
                calls,
            } => write!(
                f,
                "{label}: failure rate {:.1}% over {calls} calls (threshold {:.1}%)",
                rate * 100.0,
                threshold * 100.0
            ),
            Reason::SlowCallRate {
                rate,
                threshold,
                calls,
            } => write!(
                f,
                "{label}: slow-call rate {:.1}% over {calls} calls (threshold {:.1}%)",
                rate * 100.0,
                threshold * 100.0
            ),
            Reason::OpenTimeout { after } => {
                write!(f, "{label}: open for {:.3}s, probing", after.as_secs_f64())
            }
            Reason::ProbeSuccess { successes } => {
                write!(f, "{label}: {successes} successful probes")
            }
            Reason::ProbeFailure { kind } => write!(f, "{label}: probe failed ({kind})"),
            Reason::HalfOpenTimeout { waited } => write!(
                f,
                "{label}: no verdict after {:.3}s in half-open",
                waited.as_secs_f64()
            ),
            Reason::HealthProbe { failures, kind } => {
                write!(
                    f,
                    "{label}: {failures} health probes failed in a row ({kind})"
                )
            }
            Reason::ServerRecovered { kind } => {
                write!(f, "{label}: the server answers again after {kind}")
            }
            Reason::Manual {
                action: ManualAction::SetMode(mode),
            } => write!(f, "{label}: mode set to {mode}"),
            Reason::Manual {
                action: ManualAction::Reset,
            } => write!(f, "{label}: reset"),
            Reason::FleetAdvice { kind, instances } => write!(
                f,
                "{label}: local failure ({kind}) while {instances} other instance(s) report the upstream open"
            ),
            Reason::FleetQuorum { instances, quorum } => write!(
                f,
                "{label}: {instances} other instance(s) report the upstream open (quorum {quorum})"
            ),
            Reason::FleetRecovered => write!(
                f,
                "{label}: another instance's breaker closed after the outage, probing now"
            ),
        }
    }
}

/// A state change, as returned by the methods that can cause one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transition {
    pub from: State,
    pub to: State,
    pub reason: Reason,
    /// The generation that starts with this transition.
    pub generation: u64,
    /// How long the breaker stays Open before probing, when `to` is Open and
    /// a timer was armed (not under `ForceOpen`).
    pub open_for: Option<Duration>,
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}: {}", self.from, self.to, self.reason)?;
        if let Some(d) = self.open_for {
            write!(f, "; next probe in {:.3}s", d.as_secs_f64())?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Permits and rejections
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PermitKind {
    /// Admitted while Closed.
    Normal,
    /// One of the HalfOpen probe slots.
    Probe,
    /// Would have been rejected, admitted only because of `MetricsOnly`.
    Shadow,
}

/// Admission token returned by [`Breaker::try_acquire`]; hand it back exactly
/// once to [`Breaker::record`].
#[must_use = "a permit must be handed back to Breaker::record, or a half-open probe slot stays taken"]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permit {
    generation: u64,
    kind: PermitKind,
}

impl Permit {
    #[cfg(test)]
    /// Whether this call holds a HalfOpen probe slot.
    pub fn is_probe(&self) -> bool {
        self.kind == PermitKind::Probe
    }
    /// Whether `Normal` mode would have rejected this call (`MetricsOnly`).
    pub fn is_shadow(&self) -> bool {
        self.kind == PermitKind::Shadow
    }
}

/// The breaker refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("circuit breaker {state} (mode {mode}): request rejected")]
pub struct Rejected {
    pub state: State,
    pub mode: Mode,
    /// Time until the next probe is scheduled, when a timer is armed.
    pub retry_after: Option<Duration>,
}

/// Serializable view of a breaker, for the admin endpoint and logs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BreakerSnapshot {
    pub state: State,
    pub mode: Mode,
    /// Failures / calls in the window (0 when empty), judged only once
    /// `calls_in_window >= minimum_calls`.
    pub failure_rate: f64,
    /// Slow successes / calls in the window.
    pub slow_call_rate: f64,
    pub calls_in_window: u64,
    pub failures_in_window: u64,
    pub slow_calls_in_window: u64,
    pub consecutive_failures: u32,
    /// How many openings the back-off has doubled through (0 = next opening
    /// lasts `open_base`).
    pub backoff_level: u32,
    /// Jittered length of the current or most recent Open period; 0 after the
    /// back-off has reset.
    pub open_backoff_seconds: f64,
    /// Seconds until Open turns HalfOpen; `None` unless Open with a timer.
    pub next_probe_in_seconds: Option<f64>,
    pub generation: u64,
    pub half_open_permits_in_use: u32,
    pub half_open_successes: u32,
    /// Would-be rejections admitted under `MetricsOnly` since the last reset.
    pub shadow_rejections: u64,
    /// Other instances whose breaker reported this upstream open within the fleet window.
    pub fleet_open_reports: u32,
}

/// The pure circuit-breaker state machine; see the module docs.
#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    rng: StdRng,
    mode: Mode,
    state: State,
    generation: u64,
    /// Bucket 0 starts here. Set by the first call that passes a `now`,
    /// because construction must not read the clock.
    origin: Option<Instant>,
    window: Window,
    consecutive_failures: u32,
    closed_since: Option<Instant>,
    backoff_level: u32,
    last_open_duration: Duration,
    open_until: Option<Instant>,
    half_open_since: Option<Instant>,
    half_open_in_flight: u32,
    half_open_successes: u32,
    shadow_rejections: u64,
    /// The kind of the latest failure, and of the one that opened the breaker.
    last_failure: Option<FailureKind>,
    open_cause: Option<FailureKind>,
    /// What other instances said about this upstream; see [`advice`].
    fleet: advice::FleetView,
}

impl Breaker {
    /// Creates a Closed breaker (Open if `config.mode` is `ForceOpen`). `seed`
    /// drives the jitter; give every process a different one.
    ///
    /// # Panics
    ///
    /// If `config.validate()` fails: configuration must be validated where it
    /// is loaded, so that the error reaches the operator with its context.
    pub fn new(config: BreakerConfig, seed: u64) -> Breaker {
        if let Err(e) = config.validate() {
            panic!("invalid circuit breaker configuration: {e}");
        }
        let buckets = (config.window_ms / config.bucket_ms) as usize;
        let mode = config.mode;
        Breaker {
            rng: StdRng::seed_from_u64(seed),
            mode,
            state: if mode == Mode::ForceOpen {
                State::Open
            } else {
                State::Closed
            },
            generation: 0,
            origin: None,
            window: Window::new(buckets),
            consecutive_failures: 0,
            closed_since: None,
            backoff_level: 0,
            last_open_duration: Duration::ZERO,
            open_until: None,
            half_open_since: None,
            half_open_in_flight: 0,
            half_open_successes: 0,
            shadow_rejections: 0,
            last_failure: None,
            open_cause: None,
            fleet: advice::FleetView::default(),
            config,
        }
    }

    #[cfg(test)]
    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }
    pub fn state(&self) -> State {
        self.state
    }
    pub fn mode(&self) -> Mode {
        self.mode
    }
    /// Bumped by every transition: what was judged under one generation does not judge
    /// the next.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Asks to send one request. Never changes the state and never moves
    /// [`Breaker::next_deadline`], so a caller need not wake the timer.
    /// Whether [`Breaker::try_acquire`] refuses every request until the next transition or
    /// mode change.
    pub fn rejects_all(&self) -> bool {
        self.mode == Mode::ForceOpen
            || (self.state == State::Open && self.mode != Mode::MetricsOnly)
    }

    pub fn try_acquire(&mut self, now: Instant) -> Result<Permit, Rejected> {
        self.init_clock(now);
        let permit = |kind| Permit {
            generation: self.generation,
            kind,
        };
        if self.mode == Mode::ForceOpen {
            return Err(self.rejected(now));
        }
        match self.state {
            State::Closed => Ok(permit(PermitKind::Normal)),
            State::HalfOpen if self.half_open_in_flight < self.config.half_open_permits => {
                self.half_open_in_flight += 1;
                Ok(permit(PermitKind::Probe))
            }
            State::HalfOpen | State::Open => {
                if self.mode == Mode::MetricsOnly {
                    self.shadow_rejections += 1;
                    Ok(permit(PermitKind::Shadow))
                } else {
                    Err(self.rejected(now))
                }
            }
        }
    }

    /// Hands back a permit with the call's outcome. Fires overdue timers
    /// first; results from an earlier generation and shadow calls are ignored.
    #[cfg(test)]
    pub fn record(&mut self, permit: Permit, outcome: Outcome, now: Instant) -> Option<Transition> {
        let mut transition = None;
        self.record_all(now, [(permit, outcome)], |_, t| transition = Some(t));
        transition
    }

    /// Hands back, in order, the permits of calls that ended together at `now` (the replies
    /// read in one go): the same as [`Breaker::record`] for each, with the timers fired
    /// and the window's bucket found once, not once per call (again only after a
    /// transition). `on_transition` sees each transition as it happens, with the machine
    /// in its new state.
    pub fn record_all(
        &mut self,
        now: Instant,
        finished: impl IntoIterator<Item = (Permit, Outcome)>,
        mut on_transition: impl FnMut(&Breaker, Transition),
    ) {
        // The bucket of `now`, known while no transition happened since the timers fired.
        let mut bucket = None;
        for (permit, outcome) in finished {
            let cur = match bucket {
                Some(cur) => cur,
                None => {
                    if let Some(t) = self.fire_timers(now) {
                        // The transition bumped the generation, so the permit is stale.
                        on_transition(self, t);
                        continue;
                    }
                    *bucket.insert(self.bucket_index(now))
                }
            };
            if permit.generation != self.generation {
                continue;
            }
            let transition = match (self.state, permit.kind) {
                (State::Closed, PermitKind::Normal) => self.record_closed(outcome, now, cur),
                (State::HalfOpen, PermitKind::Probe) => self.record_probe(outcome, now),
                _ => None,
            };
            if let Some(t) = transition {
                bucket = None;
                on_transition(self, t);
            }
        }
    }

    fn record_closed(&mut self, outcome: Outcome, now: Instant, cur: u64) -> Option<Transition> {
        let failure = match outcome {
            Outcome::Ignored => return None,
            Outcome::Success { latency } => {
                self.window.add(cur, false, self.config.is_slow(latency));
                self.consecutive_failures = 0;
                false
            }
            Outcome::Failure(kind) => {
                self.last_failure = Some(kind);
                self.window.add(cur, true, false);
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                true
            }
        };
        if !self.mode.evaluates() {
            return None;
        }
        let fleet_advice = match outcome {
            Outcome::Failure(kind) => self.fleet_advice(kind, now),
            _ => None,
        };
        let cfg = &self.config;
        let reason = if failure && self.consecutive_failures >= cfg.consecutive_failures {
            Some(Reason::ConsecutiveFailures {
                count: self.consecutive_failures,
                threshold: cfg.consecutive_failures,
            })
        } else if fleet_advice.is_some() {
            fleet_advice
        } else {
            let t = self.window.totals;
            if t.calls < u64::from(cfg.minimum_calls) {
                None
            } else if t.failure_rate() >= cfg.failure_rate_threshold {
                Some(Reason::FailureRate {
                    rate: t.failure_rate(),
                    threshold: cfg.failure_rate_threshold,
                    calls: t.calls,
                })
            } else if t.slow_rate() >= cfg.slow_call_rate_threshold {
                Some(Reason::SlowCallRate {
                    rate: t.slow_rate(),
                    threshold: cfg.slow_call_rate_threshold,
                    calls: t.calls,
                })
            } else {
                None
            }
        };
        reason.map(|reason| {
            // Do the healthy-window reset here as well as in poll, so a missed
            // or late timer cannot leave an old back-off level in place.
            self.maybe_reset_backoff(now);
            self.transition(State::Open, reason, now)
        })
    }

    fn record_probe(&mut self, outcome: Outcome, now: Instant) -> Option<Transition> {
        self.half_open_in_flight = self.half_open_in_flight.saturating_sub(1);
        match outcome {
            Outcome::Ignored => None,
            Outcome::Success { .. } => {
                self.half_open_successes += 1;
                (self.half_open_successes >= self.config.success_threshold).then(|| {
                    let reason = Reason::ProbeSuccess {
                        successes: self.half_open_successes,
                    };
                    self.transition(State::Closed, reason, now)
                })
            }
            Outcome::Failure(kind) => {
                self.last_failure = Some(kind);
                Some(self.transition(State::Open, Reason::ProbeFailure { kind }, now))
            }
        }
    }

    /// Fires whatever timer is due: Open -> HalfOpen, HalfOpen max wait ->
    /// Open, window rotation, back-off reset after a healthy window.
    pub fn poll(&mut self, now: Instant) -> Option<Transition> {
        self.fire_timers(now)
    }

    fn fire_timers(&mut self, now: Instant) -> Option<Transition> {
        let cur = self.bucket_index(now);
        self.window.advance(cur);
        match self.state {
            State::Closed => {
                self.maybe_reset_backoff(now);
                None
            }
            State::Open => match self.open_until {
                Some(until) if now >= until => {
                    let reason = Reason::OpenTimeout {
                        after: self.last_open_duration,
                    };
                    Some(self.transition(State::HalfOpen, reason, now))
                }
                _ => None,
            },
            State::HalfOpen => {
                let since = self.half_open_since.unwrap_or(now);
                let waited = now.saturating_duration_since(since);
                (waited >= self.config.half_open_max_wait())
                    .then(|| self.transition(State::Open, Reason::HalfOpenTimeout { waited }, now))
            }
        }
    }

    /// When [`Breaker::poll`] must next be called; `None` if no timer is due.
    pub fn next_deadline(&self) -> Option<Instant> {
        match self.state {
            State::Open => self.open_until,
            State::HalfOpen => self
                .half_open_since
                .map(|s| s + self.config.half_open_max_wait()),
            State::Closed => {
                let backoff_reset = (self.backoff_level > 0)
                    .then(|| self.closed_since.map(|c| c + self.config.window()))
                    .flatten();
                // Only while the window holds calls: an idle breaker sleeps.
                let rotation = (self.window.totals.calls > 0)
                    .then(|| {
                        self.origin.map(|o| {
                            let ms = self.config.bucket_ms.saturating_mul(self.window.head + 1);
                            o + Duration::from_millis(ms)
                        })
                    })
                    .flatten();
                match (backoff_reset, rotation) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
        }
    }

    /// Changes the mode; returns the transition if the state changes.
    pub fn set_mode(&mut self, mode: Mode, now: Instant) -> Option<Transition> {
        self.init_clock(now);
        let old = self.mode;
        if old == mode {
            return None;
        }
        self.mode = mode;
        let reason = Reason::Manual {
            action: ManualAction::SetMode(mode),
        };
        match mode {
            Mode::ForceOpen if self.state == State::Open => {
                // Already Open: only the exit timer goes, the operator owns it now.
                self.open_until = None;
                None
            }
            Mode::ForceOpen => Some(self.transition(State::Open, reason, now)),
            Mode::ForceClosed | Mode::Disabled => {
                (self.state != State::Closed).then(|| self.transition(State::Closed, reason, now))
            }
            // Probing first means a still-broken upstream costs a few probes,
            // not a full burst of traffic.
            Mode::Normal | Mode::MetricsOnly if old == Mode::ForceOpen => {
                Some(self.transition(State::HalfOpen, reason, now))
            }
            Mode::Normal | Mode::MetricsOnly => None,
        }
    }

    /// The health probe has failed `failures` times in a row (the last with `kind`): a
    /// Closed breaker opens at `probe_failures_to_open`.
    ///
    /// `began` is the generation the last probe started in. A probe that began before a
    /// transition judged a server the breaker has since judged again: one sent into a black
    /// hole that times out just after client traffic closed the breaker says nothing about
    /// the recovered server, and must not open the breaker again.
    pub fn probes_failed(
        &mut self,
        failures: u32,
        kind: FailureKind,
        began: u64,
        now: Instant,
    ) -> Option<Transition> {
        self.init_clock(now);
        if self.state != State::Closed || !self.mode.evaluates() || began != self.generation {
            return None;
        }
        let reason = if failures >= self.config.probe_failures_to_open {
            Reason::HealthProbe { failures, kind }
        } else {
            self.fleet_advice(kind, now)?
        };
        self.last_failure = Some(kind);
        self.maybe_reset_backoff(now);
        Some(self.transition(State::Open, reason, now))
    }

    /// The server answers normally again. When what opened the breaker was a condition
    /// of the server's own that ends by itself (`-BUSY`: a script ran long; `-LOADING`: it
    /// restarted), it moves to HalfOpen now instead of after the open period, so the
    /// upstream heals as soon as Redis answers. Other causes keep their back-off.
    pub fn server_recovered(&mut self, now: Instant) -> Option<Transition> {
        self.init_clock(now);
        let kind = self.open_cause?;
        let ends_by_itself = matches!(kind, FailureKind::Busy | FailureKind::Loading);
        (self.state == State::Open && self.open_until.is_some() && ends_by_itself)
            .then(|| self.transition(State::HalfOpen, Reason::ServerRecovered { kind }, now))
    }

    /// New thresholds, keeping the state, its timers and the back-off level. The rolling
    /// window starts afresh when its shape (window or bucket length) changes; a changed
    /// configured mode is applied like an operator's. `config` must be valid (it was
    /// validated where it was loaded).
    pub fn reconfigure(&mut self, config: BreakerConfig, now: Instant) -> Option<Transition> {
        if config.validate().is_err() {
            return None;
        }
        if (config.window_ms, config.bucket_ms) != (self.config.window_ms, self.config.bucket_ms) {
            self.window = Window::new((config.window_ms / config.bucket_ms) as usize);
            self.origin = None;
            self.init_clock(now);
        }
        let mode_changed = config.mode != self.config.mode;
        let mode = config.mode;
        self.config = config;
        if mode_changed {
            return self.set_mode(mode, now);
        }
        None
    }

    /// Back to Closed in `Normal` mode with counters and back-off cleared.
    pub fn reset(&mut self, now: Instant) -> Option<Transition> {
        self.init_clock(now);
        self.mode = Mode::Normal;
        self.backoff_level = 0;
        self.last_open_duration = Duration::ZERO;
        self.shadow_rejections = 0;
        if self.state == State::Closed {
            self.enter_closed(now);
            None
        } else {
            let reason = Reason::Manual {
                action: ManualAction::Reset,
            };
            Some(self.transition(State::Closed, reason, now))
        }
    }

    pub fn snapshot(&self, now: Instant) -> BreakerSnapshot {
        let totals = match self.origin {
            Some(origin) => self.window.totals_at(self.index_since(origin, now)),
            None => Totals::default(),
        };
        BreakerSnapshot {
            state: self.state,
            mode: self.mode,
            failure_rate: totals.failure_rate(),
            slow_call_rate: totals.slow_rate(),
            calls_in_window: totals.calls,
            failures_in_window: totals.failures,
            slow_calls_in_window: totals.slow,
            consecutive_failures: self.consecutive_failures,
            backoff_level: self.backoff_level,
            open_backoff_seconds: self.last_open_duration.as_secs_f64(),
            next_probe_in_seconds: match self.state {
                State::Open => self
                    .open_until
                    .map(|u| u.saturating_duration_since(now).as_secs_f64()),
                _ => None,
            },
            generation: self.generation,
            half_open_permits_in_use: self.half_open_in_flight,
            half_open_successes: self.half_open_successes,
            shadow_rejections: self.shadow_rejections,
            fleet_open_reports: self.fleet.open_reports(now),
        }
    }

    // -- internals ----------------------------------------------------------

    fn rejected(&self, now: Instant) -> Rejected {
        Rejected {
            state: self.state,
            mode: self.mode,
            retry_after: match self.state {
                State::Open => self.open_until.map(|u| u.saturating_duration_since(now)),
                _ => None,
            },
        }
    }

    fn init_clock(&mut self, now: Instant) {
        if self.origin.is_none() {
            self.origin = Some(now);
            self.closed_since.get_or_insert(now);
        }
    }

    fn bucket_index(&mut self, now: Instant) -> u64 {
        self.init_clock(now);
        let origin = self.origin.unwrap_or(now);
        self.index_since(origin, now)
    }

    fn index_since(&self, origin: Instant, now: Instant) -> u64 {
        // In u64: a u128 division per call showed in profiles.
        let elapsed = now.saturating_duration_since(origin);
        let ms = elapsed
            .as_secs()
            .saturating_mul(1000)
            .saturating_add(u64::from(elapsed.subsec_millis()));
        ms / self.config.bucket_ms.max(1)
    }

    fn maybe_reset_backoff(&mut self, now: Instant) {
        if self.state != State::Closed || self.backoff_level == 0 {
            return;
        }
        if let Some(since) = self.closed_since
            && now.saturating_duration_since(since) >= self.config.window()
        {
            self.backoff_level = 0;
            self.last_open_duration = Duration::ZERO;
        }
    }

    fn enter_closed(&mut self, now: Instant) {
        self.window.clear();
        self.consecutive_failures = 0;
        self.closed_since = Some(now);
    }

    /// The next open period: doubled per level, capped, then jittered.
    fn next_open_duration(&mut self) -> Duration {
        let factor = 1u32.checked_shl(self.backoff_level).unwrap_or(u32::MAX);
        let capped = self
            .config
            .open_base()
            .saturating_mul(factor)
            .min(self.config.open_max());
        let jitter = if self.config.jitter > 0.0 {
            self.rng.random_range(0.0..=self.config.jitter)
        } else {
            0.0
        };
        self.backoff_level = self.backoff_level.saturating_add(1);
        let d = capped.mul_f64(1.0 + jitter);
        self.last_open_duration = d;
        d
    }

    fn transition(&mut self, to: State, reason: Reason, now: Instant) -> Transition {
        let from = self.state;
        self.state = to;
        self.generation += 1;
        self.half_open_in_flight = 0;
        self.half_open_successes = 0;
        self.half_open_since = None;
        self.open_until = None;
        let mut open_for = None;
        self.fleet.entered(to, now);
        match to {
            State::Closed => self.enter_closed(now),
            State::Open => {
                self.open_cause = self.last_failure;
                if self.mode != Mode::ForceOpen {
                    let d = self.next_open_duration();
                    self.open_until = Some(now + d);
                    open_for = Some(d);
                }
            }
            State::HalfOpen => self.half_open_since = Some(now),
        }
        Transition {
            from,
            to,
            reason,
            generation: self.generation,
            open_for,
        }
    }
}

#[cfg(test)]
mod reconfigure_tests {
    use super::*;

    fn fail(b: &mut Breaker, now: Instant) -> Option<Transition> {
        let p = b.try_acquire(now).expect("admitted");
        b.record(p, Outcome::Failure(FailureKind::ConnectRefused), now)
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_changes_thresholds_and_keeps_the_state() {
        let now = Instant::now();
        let mut b = Breaker::new(BreakerConfig::default(), 1);
        assert!(fail(&mut b, now).is_none());
        let cfg = BreakerConfig {
            consecutive_failures: 2,
            ..BreakerConfig::default()
        };
        assert!(b.reconfigure(cfg.clone(), now).is_none());
        let t = fail(&mut b, now).expect("the second failure opens it now");
        assert_eq!(t.to, State::Open);
        // Open stays open through a reload, with its timer.
        let until = b.open_until;
        let cfg = BreakerConfig {
            window_ms: 20_000,
            bucket_ms: 2_000,
            ..cfg
        };
        assert!(b.reconfigure(cfg.clone(), now).is_none());
        assert_eq!((b.state(), b.open_until), (State::Open, until));
        // A changed configured mode applies like an operator's.
        let forced = BreakerConfig {
            mode: Mode::ForceClosed,
            ..cfg
        };
        let t = b.reconfigure(forced, now).expect("forced closed");
        assert_eq!((t.to, b.mode()), (State::Closed, Mode::ForceClosed));
        // An invalid configuration (not validated by a caller) changes nothing.
        let bad = BreakerConfig {
            bucket_ms: 3_000,
            ..BreakerConfig::default()
        };
        assert!(b.reconfigure(bad, now).is_none());
        assert_eq!(b.config().bucket_ms, 2_000);
    }
}
