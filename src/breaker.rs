//! Per-upstream circuit breaker.
//!
//! # Design
//!
//! The breaker is split in two layers:
//!
//! * [`Breaker`] is a **pure state machine**: no I/O, no locks, no clock reads,
//!   no logging. Every method that depends on time takes `now` explicitly.
//!   That keeps every rule (trip thresholds, back-off, jitter, permits,
//!   generations) testable to the millisecond with a seeded RNG, and keeps the
//!   questions "what should happen" and "how do many tasks share it" apart.
//! * [`SharedBreaker`] is a thin wrapper used from many tokio tasks: a
//!   `std::sync::Mutex<Breaker>` (held only for a few arithmetic operations,
//!   never across an `.await`), pre-resolved Prometheus handles, a
//!   `tokio::sync::watch` channel announcing state changes, `tracing` logs, and
//!   a timer task. All side effects of a transition happen in this layer, under
//!   the same lock as the transition itself, so gauges, the watch channel and
//!   the log never disagree about ordering.
//!
//! # Why generations
//!
//! A request admitted while Closed may take seconds to fail; by then the
//! breaker may already be Open or probing in HalfOpen. If its late result were
//! allowed to count, one slow pre-outage request could re-open a breaker whose
//! probes are succeeding, or a late success could close it. Every state
//! transition bumps a generation counter, each [`Permit`] carries the
//! generation it was issued under, and [`Breaker::record`] ignores results whose
//! generation is stale. Half-open permit slots also belong to a generation: a
//! transition resets the count, so a wedged probe from an earlier HalfOpen can
//! never hold a slot of a later one.
//!
//! # Why timer-driven
//!
//! Open -> HalfOpen happens when the open period expires, not lazily on the
//! next request: an idle upstream is re-probed (and `/ready`, the cache and
//! the write-queue replay, which watch [`SharedBreaker::subscribe`], learn
//! about it) even when no client traffic arrives, and the jittered schedule is
//! what actually de-synchronises a fleet. The same timer enforces the
//! half-open max wait (so a probe that never answers cannot wedge the
//! breaker), rotates the rolling window buckets (so the rate gauges decay
//! while idle) and resets the back-off after a healthy window.
//! [`Breaker::next_deadline`] says when the timer must next call
//! [`Breaker::poll`]; the timer task started by [`SharedBreaker::spawn_timer`]
//! sleeps until then and is woken through a `Notify` whenever a call changes
//! that deadline. [`Breaker::try_acquire`] never fires timers (it cannot report
//! a transition); [`Breaker::record`] does fire overdue ones first, so a lagging
//! timer never lets a result be judged against an expired state.
//!
//! # What counts
//!
//! * Failure ([`Outcome::Failure`]): connect refused/reset/timeout, per-command
//!   timeout, connection closed with replies pending, malformed reply, and the
//!   error replies `-LOADING`, `-BUSY`, `-MASTERDOWN`, `-CLUSTERDOWN`,
//!   `-TRYAGAIN` (plus `-READONLY` and `-OOM` for writes); see
//!   [`classify_error_reply`].
//! * Success: every other well-formed reply, error replies included. A success
//!   slower than `slow_call_threshold_ms` is also a *slow call*.
//! * Ignored: client cancellations (a dropped [`CallGuard`]) and anything the
//!   caller does not want judged, e.g. the server-side wait of blocking
//!   commands (pass [`Outcome::Ignored`], or a latency that excludes the wait).
//!
//! # Rules
//!
//! * Closed -> Open after `consecutive_failures` failures in a row, or when,
//!   over the rolling window (the current bucket plus the `window/bucket - 1`
//!   previous ones) holding at least `minimum_calls` calls, the failure rate
//!   reaches `failure_rate_threshold` or the slow-call rate (slow successes /
//!   all counted calls) reaches `slow_call_rate_threshold`.
//! * Open lasts `open_base * 2^level`, capped at `open_max`, then multiplied by
//!   `1 + U[0, jitter]`. The jitter is applied *after* the cap, so at the cap a
//!   fleet still spreads its probes (an Open period can therefore last up to
//!   `open_max * (1 + jitter)`). `level` goes up by one on every opening and
//!   returns to 0 once the breaker has spent one full window in Closed.
//! * HalfOpen admits at most `half_open_permits` concurrent probes; it closes
//!   after `success_threshold` probe successes, re-opens on any probe failure,
//!   and re-opens if it has not closed within `half_open_max_wait_ms`.
//! * Every transition clears the rolling window on entry to Closed, so
//!   failures that caused an opening cannot immediately re-trip it.
//!
//! # Modes
//!
//! See [`Mode`]. A manual mode change that changes the state is a transition
//! with [`Reason::Manual`]. Leaving `ForceOpen` for `Normal`/`MetricsOnly`
//! goes to HalfOpen, so traffic returns through probes rather than all at once.
//!
//! # Metrics
//!
//! See [`BreakerMetrics`]. `redfuse_breaker_calls_total` counts every completed
//! admitted call by outcome, including calls the state machine ignores (stale
//! generation, shadow calls): it describes traffic, not the breaker's
//! arithmetic. A slow success is counted under **both** `outcome="success"`
//! and `outcome="slow"`, so `success` stays comparable to `failure` and `slow`
//! is a subset of `success`. The rate gauges are refreshed by the timer task at
//! every bucket boundary while the window holds calls, and on every
//! transition; they are not touched on the per-call hot path.

use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use prometheus::{
    Gauge, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

// ---------------------------------------------------------------------------
// Classification
// ---------------------------------------------------------------------------

/// Why a call counted as a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    ConnectRefused,
    ConnectReset,
    ConnectTimeout,
    /// The per-command timeout expired.
    CommandTimeout,
    /// The connection closed while replies were still pending.
    ConnectionClosed,
    MalformedReply,
    Loading,
    Busy,
    MasterDown,
    ClusterDown,
    TryAgain,
    /// `-READONLY` to a write.
    ReadOnly,
    /// `-OOM` to a write.
    Oom,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::ConnectRefused => "connect_refused",
            FailureKind::ConnectReset => "connect_reset",
            FailureKind::ConnectTimeout => "connect_timeout",
            FailureKind::CommandTimeout => "command_timeout",
            FailureKind::ConnectionClosed => "connection_closed",
            FailureKind::MalformedReply => "malformed_reply",
            FailureKind::Loading => "loading",
            FailureKind::Busy => "busy",
            FailureKind::MasterDown => "masterdown",
            FailureKind::ClusterDown => "clusterdown",
            FailureKind::TryAgain => "tryagain",
            FailureKind::ReadOnly => "readonly",
            FailureKind::Oom => "oom",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the breaker should treat an error reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyClass {
    /// A well-formed reply the upstream was healthy enough to produce.
    Success,
    /// The upstream is unavailable or degraded.
    Failure(FailureKind),
    /// `-NOAUTH`, `-WRONGPASS`, `-NOPERM`: a configuration problem, not an
    /// availability one. The caller counts and logs it loudly; for the breaker
    /// it is a success (see [`ReplyClass::outcome`]).
    AuthProblem,
}

impl ReplyClass {
    /// The breaker outcome for this reply. An auth problem is a well-formed,
    /// prompt reply, so it counts as a success: tripping the breaker would only
    /// hide the misconfiguration behind "upstream unavailable".
    pub fn outcome(self, latency: Duration) -> Outcome {
        match self {
            ReplyClass::Success | ReplyClass::AuthProblem => Outcome::Success { latency },
            ReplyClass::Failure(kind) => Outcome::Failure(kind),
        }
    }
}

/// Classifies a raw RESP error reply: a simple error (`-CODE message\r\n`) or
/// a RESP3 blob error (`!<len>\r\nCODE message\r\n`).
///
/// Only the error code (the first word) is compared, ASCII case-insensitively,
/// so `-BUSYKEY` or `-BUSYGROUP` (ordinary command errors) are not mistaken for
/// `-BUSY`. Replies that are not errors are [`ReplyClass::Success`]; empty
/// input or a blob error whose length header cannot be parsed is
/// [`FailureKind::MalformedReply`].
pub fn classify_error_reply(reply: &[u8], is_write: bool) -> ReplyClass {
    let message: &[u8] = match reply.first() {
        None => return ReplyClass::Failure(FailureKind::MalformedReply),
        Some(b'-') => &reply[1..],
        Some(b'!') => match blob_body(&reply[1..]) {
            Some(body) => body,
            None => return ReplyClass::Failure(FailureKind::MalformedReply),
        },
        Some(_) => return ReplyClass::Success,
    };
    let end = message
        .iter()
        .position(|&b| b == b' ' || b == b'\r' || b == b'\n')
        .unwrap_or(message.len());
    let code = &message[..end];
    let is = |name: &str| code.eq_ignore_ascii_case(name.as_bytes());
    if is("LOADING") {
        ReplyClass::Failure(FailureKind::Loading)
    } else if is("BUSY") {
        ReplyClass::Failure(FailureKind::Busy)
    } else if is("MASTERDOWN") {
        ReplyClass::Failure(FailureKind::MasterDown)
    } else if is("CLUSTERDOWN") {
        ReplyClass::Failure(FailureKind::ClusterDown)
    } else if is("TRYAGAIN") {
        ReplyClass::Failure(FailureKind::TryAgain)
    } else if is_write && is("READONLY") {
        ReplyClass::Failure(FailureKind::ReadOnly)
    } else if is_write && is("OOM") {
        ReplyClass::Failure(FailureKind::Oom)
    } else if is("NOAUTH") || is("WRONGPASS") || is("NOPERM") {
        ReplyClass::AuthProblem
    } else {
        ReplyClass::Success
    }
}

/// The payload of a blob error after its `!`: `<len>\r\n<payload>\r\n`.
/// A truncated payload is classified on what is there; the framing itself is
/// the parser's business, this only needs the code.
fn blob_body(rest: &[u8]) -> Option<&[u8]> {
    let header_end = rest.windows(2).position(|w| w == b"\r\n")?;
    let len: usize = std::str::from_utf8(&rest[..header_end])
        .ok()?
        .parse()
        .ok()?;
    let body = &rest[header_end + 2..];
    Some(&body[..len.min(body.len())])
}

/// The result of an admitted call, as classified by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success {
        latency: Duration,
    },
    Failure(FailureKind),
    /// Neither success nor failure: client cancellation, blocking-command wait.
    Ignored,
}

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

/// Breaker configuration. Deserializes from snake_case fields; every field is
/// optional (missing ones take the default) and unknown fields are rejected so
/// a typo is not silently ignored. Durations are integer milliseconds in
/// fields named `*_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Initial mode. [`Breaker::reset`] always returns to `Normal`.
    pub mode: Mode,
    /// Consecutive failures that open the breaker (default 5).
    pub consecutive_failures: u32,
    /// Failure rate in (0, 1] over the window that opens it (default 0.5).
    pub failure_rate_threshold: f64,
    /// Slow-call rate in (0, 1] over the window that opens it (default 0.8).
    pub slow_call_rate_threshold: f64,
    /// A success strictly slower than this is a slow call (default 250).
    pub slow_call_threshold_ms: u64,
    /// Calls the window must hold before the rates are judged (default 20).
    pub minimum_calls: u32,
    /// Rolling window length (default 10000).
    pub window_ms: u64,
    /// Window bucket length; must divide `window_ms` (default 1000).
    pub bucket_ms: u64,
    /// First open duration (default 5000).
    pub open_base_ms: u64,
    /// Cap of the doubling open duration, before jitter (default 60000).
    pub open_max_ms: u64,
    /// Extra random fraction in [0, jitter] added to each open duration
    /// (default 0.2).
    pub jitter: f64,
    /// Concurrent probes admitted in HalfOpen (default 3).
    pub half_open_permits: u32,
    /// Probe successes that close the breaker (default 3).
    pub success_threshold: u32,
    /// Longest HalfOpen may last before re-opening; set it to the command
    /// timeout (default 5000).
    pub half_open_max_wait_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            mode: Mode::Normal,
            consecutive_failures: 5,
            failure_rate_threshold: 0.5,
            slow_call_rate_threshold: 0.8,
            slow_call_threshold_ms: 250,
            minimum_calls: 20,
            window_ms: 10_000,
            bucket_ms: 1_000,
            open_base_ms: 5_000,
            open_max_ms: 60_000,
            jitter: 0.2,
            half_open_permits: 3,
            success_threshold: 3,
            half_open_max_wait_ms: 5_000,
        }
    }
}

/// Upper bound for every `*_ms` field: keeps `Instant + Duration` far from
/// overflow (which panics) whatever the back-off arithmetic does.
const MAX_DURATION_MS: u64 = 86_400_000;
/// Bounds the memory and the rotation work of one window.
const MAX_BUCKETS: u64 = 1_000;

impl BreakerConfig {
    /// Checks every field; the error names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        fn at_least_one(field: &str, v: u64) -> Result<(), String> {
            if v == 0 {
                return Err(format!("{field} must be at least 1, got 0"));
            }
            Ok(())
        }
        fn duration(field: &str, v: u64) -> Result<(), String> {
            at_least_one(field, v)?;
            if v > MAX_DURATION_MS {
                return Err(format!(
                    "{field} must be at most {MAX_DURATION_MS} (one day), got {v}"
                ));
            }
            Ok(())
        }
        fn rate(field: &str, v: f64) -> Result<(), String> {
            if !(v > 0.0 && v <= 1.0) {
                return Err(format!("{field} must be in (0, 1], got {v}"));
            }
            Ok(())
        }
        at_least_one("consecutive_failures", self.consecutive_failures.into())?;
        rate("failure_rate_threshold", self.failure_rate_threshold)?;
        rate("slow_call_rate_threshold", self.slow_call_rate_threshold)?;
        duration("slow_call_threshold_ms", self.slow_call_threshold_ms)?;
        at_least_one("minimum_calls", self.minimum_calls.into())?;
        duration("window_ms", self.window_ms)?;
        duration("bucket_ms", self.bucket_ms)?;
        if self.bucket_ms > self.window_ms || !self.window_ms.is_multiple_of(self.bucket_ms) {
            return Err(format!(
                "bucket_ms must divide window_ms ({}), got {}",
                self.window_ms, self.bucket_ms
            ));
        }
        if self.window_ms / self.bucket_ms > MAX_BUCKETS {
            return Err(format!(
                "bucket_ms too small: window_ms / bucket_ms must be at most {MAX_BUCKETS}, got {}",
                self.window_ms / self.bucket_ms
            ));
        }
        duration("open_base_ms", self.open_base_ms)?;
        duration("open_max_ms", self.open_max_ms)?;
        if self.open_max_ms < self.open_base_ms {
            return Err(format!(
                "open_max_ms ({}) must be at least open_base_ms ({})",
                self.open_max_ms, self.open_base_ms
            ));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(format!("jitter must be in [0, 1], got {}", self.jitter));
        }
        at_least_one("half_open_permits", self.half_open_permits.into())?;
        at_least_one("success_threshold", self.success_threshold.into())?;
        duration("half_open_max_wait_ms", self.half_open_max_wait_ms)?;
        Ok(())
    }

    pub fn slow_call_threshold(&self) -> Duration {
        Duration::from_millis(self.slow_call_threshold_ms)
    }
    pub fn window(&self) -> Duration {
        Duration::from_millis(self.window_ms)
    }
    pub fn bucket(&self) -> Duration {
        Duration::from_millis(self.bucket_ms)
    }
    pub fn open_base(&self) -> Duration {
        Duration::from_millis(self.open_base_ms)
    }
    pub fn open_max(&self) -> Duration {
        Duration::from_millis(self.open_max_ms)
    }
    pub fn half_open_max_wait(&self) -> Duration {
        Duration::from_millis(self.half_open_max_wait_ms)
    }
    /// Whether a success with this latency is a slow call.
    pub fn is_slow(&self, latency: Duration) -> bool {
        latency > self.slow_call_threshold()
    }
}

// ---------------------------------------------------------------------------
// States, modes, reasons
// ---------------------------------------------------------------------------

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
    Manual {
        action: ManualAction,
    },
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
            Reason::Manual { .. } => "manual",
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
            Reason::Manual {
                action: ManualAction::SetMode(mode),
            } => write!(f, "{label}: mode set to {mode}"),
            Reason::Manual {
                action: ManualAction::Reset,
            } => write!(f, "{label}: reset"),
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
    pub fn generation(&self) -> u64 {
        self.generation
    }
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

// ---------------------------------------------------------------------------
// Rolling window
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Absolute bucket number, so a read-only view can tell live from expired.
    index: u64,
    calls: u64,
    failures: u64,
    slow: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Totals {
    calls: u64,
    failures: u64,
    slow: u64,
}

impl Totals {
    fn failure_rate(&self) -> f64 {
        ratio(self.failures, self.calls)
    }
    fn slow_rate(&self) -> f64 {
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
struct Window {
    buckets: Vec<Bucket>,
    /// Absolute number of the newest bucket.
    head: u64,
    totals: Totals,
}

impl Window {
    fn new(len: usize) -> Self {
        Window {
            buckets: vec![Bucket::default(); len],
            head: 0,
            totals: Totals::default(),
        }
    }

    fn len(&self) -> u64 {
        self.buckets.len() as u64
    }

    fn clear(&mut self) {
        self.buckets.fill(Bucket::default());
        self.totals = Totals::default();
    }

    /// Moves the head to bucket `cur`, dropping the buckets that fall out.
    /// Time that appears to go backwards (callers racing to the lock with
    /// slightly older `now`s) leaves the head where it is.
    fn advance(&mut self, cur: u64) {
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

    fn add(&mut self, cur: u64, failure: bool, slow: bool) {
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
    fn totals_at(&self, cur: u64) -> Totals {
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

// ---------------------------------------------------------------------------
// The pure state machine
// ---------------------------------------------------------------------------

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
            config,
        }
    }

    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }
    pub fn state(&self) -> State {
        self.state
    }
    pub fn mode(&self) -> Mode {
        self.mode
    }
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Asks to send one request. Never changes the state and never moves
    /// [`Breaker::next_deadline`], so a caller need not wake the timer.
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
    pub fn record(&mut self, permit: Permit, outcome: Outcome, now: Instant) -> Option<Transition> {
        if let Some(t) = self.fire_timers(now) {
            // The transition bumped the generation, so the permit is stale.
            return Some(t);
        }
        if permit.generation != self.generation {
            return None;
        }
        match (self.state, permit.kind) {
            (State::Closed, PermitKind::Normal) => self.record_closed(outcome, now),
            (State::HalfOpen, PermitKind::Probe) => self.record_probe(outcome, now),
            _ => None,
        }
    }

    fn record_closed(&mut self, outcome: Outcome, now: Instant) -> Option<Transition> {
        let cur = self.bucket_index(now);
        let failure = match outcome {
            Outcome::Ignored => return None,
            Outcome::Success { latency } => {
                self.window.add(cur, false, self.config.is_slow(latency));
                self.consecutive_failures = 0;
                false
            }
            Outcome::Failure(_) => {
                self.window.add(cur, true, false);
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                true
            }
        };
        if !self.mode.evaluates() {
            return None;
        }
        let cfg = &self.config;
        let reason = if failure && self.consecutive_failures >= cfg.consecutive_failures {
            Some(Reason::ConsecutiveFailures {
                count: self.consecutive_failures,
                threshold: cfg.consecutive_failures,
            })
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
        let elapsed = now.saturating_duration_since(origin).as_millis();
        u64::try_from(elapsed / u128::from(self.config.bucket_ms)).unwrap_or(u64::MAX)
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
        match to {
            State::Closed => self.enter_closed(now),
            State::Open => {
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

// ---------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------

/// The breaker metric families, registered once per registry. Every series
/// carries an `upstream` label; see [`BreakerMetrics::for_upstream`].
#[derive(Clone)]
pub struct BreakerMetrics {
    state: IntGaugeVec,
    state_info: IntGaugeVec,
    transitions: IntCounterVec,
    calls: IntCounterVec,
    rejected: IntCounterVec,
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
    calls_success: IntCounter,
    calls_failure: IntCounter,
    calls_ignored: IntCounter,
    calls_slow: IntCounter,
    rejected: IntCounter,
    failure_rate: Gauge,
    slow_call_rate: Gauge,
    open_backoff: Gauge,
}

impl UpstreamBreakerMetrics {
    fn publish(&self, snap: &BreakerSnapshot) {
        self.state.set(snap.state.as_gauge());
        for (gauge, s) in self.state_info.iter().zip(State::ALL) {
            gauge.set(i64::from(s == snap.state));
        }
        self.failure_rate.set(snap.failure_rate);
        self.slow_call_rate.set(snap.slow_call_rate);
        self.open_backoff.set(snap.open_backoff_seconds);
    }

    fn count_transition(&self, t: &Transition) {
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

// ---------------------------------------------------------------------------
// Shared wrapper
// ---------------------------------------------------------------------------

struct Inner {
    name: String,
    config: BreakerConfig,
    breaker: Mutex<Breaker>,
    metrics: UpstreamBreakerMetrics,
    /// Separate `Arc` so the timer can wait on it without keeping `Inner`
    /// alive; see [`SharedBreaker::spawn_timer`].
    timer_wake: Arc<Notify>,
    state_tx: watch::Sender<State>,
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
        metrics.publish(&breaker.snapshot(Instant::now()));
        let (state_tx, _) = watch::channel(state);
        SharedBreaker {
            inner: Arc::new(Inner {
                name: name.to_owned(),
                config,
                breaker: Mutex::new(breaker),
                metrics,
                timer_wake: Arc::new(Notify::new()),
                state_tx,
            }),
        }
    }

    pub fn name(&self) -> &str {
        &self.inner.name
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
        let result = {
            let mut b = self.lock();
            let before = b.next_deadline();
            // Read under the lock so the machine sees monotonic time.
            let result = b.try_acquire(Instant::now());
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
                    started: Instant::now(),
                    completed: false,
                })
            }
            Err(rejected) => {
                self.inner.metrics.rejected.inc();
                Err(rejected)
            }
        }
    }

    fn finish(&self, permit: Permit, outcome: Outcome) {
        let m = &self.inner.metrics;
        match outcome {
            Outcome::Success { latency } => {
                m.calls_success.inc();
                if self.inner.config.is_slow(latency) {
                    m.calls_slow.inc();
                }
            }
            Outcome::Failure(_) => m.calls_failure.inc(),
            Outcome::Ignored => m.calls_ignored.inc(),
        }
        let mut b = self.lock();
        let now = Instant::now();
        let before = b.next_deadline();
        if let Some(t) = b.record(permit, outcome, now) {
            self.apply(&b, &t, now);
        }
        if b.next_deadline() != before {
            self.inner.timer_wake.notify_one();
        }
    }

    /// Runs the machine's timers now. The timer task does this; it is public
    /// for callers that drive time themselves.
    pub fn poll(&self) -> Option<Transition> {
        self.poll_and_deadline().0
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
        // Manual actions rearrange timers freely; an extra wake-up is cheap.
        self.inner.timer_wake.notify_one();
        t
    }

    pub fn set_mode(&self, mode: Mode) -> Option<Transition> {
        self.manual(|b, now| b.set_mode(mode, now))
    }

    pub fn reset(&self) -> Option<Transition> {
        self.manual(|b, now| b.reset(now))
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
    pub fn permit(&self) -> Permit {
        self.permit
    }

    pub fn is_probe(&self) -> bool {
        self.permit.is_probe()
    }

    /// Time since admission.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn complete(mut self, outcome: Outcome) {
        self.completed = true;
        self.breaker.finish(self.permit, outcome);
    }

    /// Completes as a success whose latency is the time since admission.
    pub fn success(self) {
        let latency = self.elapsed();
        self.complete(Outcome::Success { latency });
    }

    pub fn failure(self, kind: FailureKind) {
        self.complete(Outcome::Failure(kind));
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if !self.completed {
            self.breaker.finish(self.permit, Outcome::Ignored);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::proto::MetricType;
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const TIMEOUT: Outcome = Outcome::Failure(FailureKind::CommandTimeout);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }
    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }
    fn fast() -> Outcome {
        Outcome::Success { latency: ms(5) }
    }
    fn slow() -> Outcome {
        Outcome::Success { latency: ms(300) }
    }
    fn no_jitter() -> BreakerConfig {
        BreakerConfig {
            jitter: 0.0,
            ..BreakerConfig::default()
        }
    }

    /// One admitted call, recorded at the same instant.
    fn call(b: &mut Breaker, outcome: Outcome, now: Instant) -> Option<Transition> {
        let p = b.try_acquire(now).expect("call should be admitted");
        b.record(p, outcome, now)
    }

    /// Trips a Closed breaker with consecutive failures at `now`.
    fn trip(b: &mut Breaker, now: Instant) -> Transition {
        for _ in 1..b.config().consecutive_failures {
            assert_eq!(call(b, TIMEOUT, now), None);
        }
        let t = call(b, TIMEOUT, now).expect("the last failure trips");
        assert_eq!((t.from, t.to), (State::Closed, State::Open));
        t
    }

    /// Fires the Open timer exactly at its deadline; returns that instant.
    fn to_half_open(b: &mut Breaker) -> Instant {
        let at = b.next_deadline().expect("Open has a deadline");
        assert_eq!(b.poll(at - ms(1)), None, "must not fire early");
        let t = b.poll(at).expect("timer fires at the deadline");
        assert_eq!((t.from, t.to), (State::Open, State::HalfOpen));
        assert_eq!(t.reason.as_str(), "open_timeout");
        at
    }

    fn probe_fail(b: &mut Breaker, now: Instant) -> Transition {
        let p = b.try_acquire(now).expect("probe admitted");
        assert!(p.is_probe());
        b.record(p, TIMEOUT, now).expect("probe failure re-opens")
    }

    fn probe_ok(b: &mut Breaker, now: Instant) -> Option<Transition> {
        let p = b.try_acquire(now).expect("probe admitted");
        assert!(p.is_probe());
        b.record(p, fast(), now)
    }

    async fn settle() {
        for _ in 0..16 {
            tokio::task::yield_now().await;
        }
    }

    fn shared(name: &str, config: BreakerConfig) -> (SharedBreaker, Registry) {
        let registry = Registry::new();
        let metrics = BreakerMetrics::register(&registry).expect("register");
        let sb = SharedBreaker::new(name, config, 42, metrics.for_upstream(name));
        (sb, registry)
    }

    fn metric(reg: &Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
        for family in reg.gather() {
            if family.name() != name {
                continue;
            }
            for m in family.get_metric() {
                let matches = labels.iter().all(|(k, v)| {
                    m.get_label()
                        .iter()
                        .any(|lp| lp.name() == *k && lp.value() == *v)
                });
                if matches {
                    return match family.get_field_type() {
                        MetricType::COUNTER => m.get_counter().get_value(),
                        MetricType::GAUGE => m.get_gauge().get_value(),
                        other => panic!("unexpected metric type {other:?}"),
                    };
                }
            }
        }
        panic!("no series {name} {labels:?}");
    }

    // -- Closed -> Open -------------------------------------------------------

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_trip() {
        let t0 = Instant::now();
        let mut b = Breaker::new(no_jitter(), 1);
        for i in 1..5 {
            assert_eq!(call(&mut b, TIMEOUT, t0 + ms(i)), None);
        }
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.snapshot(t0 + ms(4)).consecutive_failures, 4);
        let t = call(&mut b, TIMEOUT, t0 + ms(5)).expect("5th failure trips");
        assert_eq!(t.from, State::Closed);
        assert_eq!(t.to, State::Open);
        assert_eq!(
            t.reason,
            Reason::ConsecutiveFailures {
                count: 5,
                threshold: 5
            }
        );
        assert_eq!(t.generation, 1);
        assert_eq!(t.open_for, Some(secs(5)));
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.generation(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn failure_rate_trip_needs_minimum_calls() {
        let t0 = Instant::now();
        let mut b = Breaker::new(no_jitter(), 1);
        // Alternating, so the consecutive rule never fires: F S F S ... F.
        for i in 0..19u64 {
            let o = if i % 2 == 0 { TIMEOUT } else { fast() };
            assert_eq!(call(&mut b, o, t0 + ms(i * 10)), None, "call {i}");
        }
        let s = b.snapshot(t0 + ms(190));
        assert_eq!((s.calls_in_window, s.failures_in_window), (19, 10));
        assert!(
            s.failure_rate > 0.5,
            "above threshold yet below minimum_calls"
        );
        assert_eq!(b.state(), State::Closed);
        // 20th call: 10/20 reaches exactly 0.5.
        let t = call(&mut b, fast(), t0 + ms(200)).expect("trips at minimum_calls");
        assert_eq!(
            t.reason,
            Reason::FailureRate {
                rate: 0.5,
                threshold: 0.5,
                calls: 20
            }
        );
        assert_eq!(b.state(), State::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn failure_rate_below_threshold_does_not_trip() {
        let t0 = Instant::now();
        let mut b = Breaker::new(no_jitter(), 1);
        // 9 failures in 20 calls (45%), never 5 in a row.
        for i in 0..20u64 {
            let o = if i % 2 == 0 && i < 18 {
                TIMEOUT
            } else {
                fast()
            };
            assert_eq!(call(&mut b, o, t0), None, "call {i}");
        }
        let s = b.snapshot(t0);
        assert_eq!((s.calls_in_window, s.failures_in_window), (20, 9));
        assert_eq!(b.state(), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_call_rate_trip() {
        let t0 = Instant::now();
        let mut b = Breaker::new(no_jitter(), 1);
        for _ in 0..4 {
            assert_eq!(call(&mut b, fast(), t0), None);
        }
        for i in 0..15 {
            assert_eq!(call(&mut b, slow(), t0), None, "slow call {i}");
        }
        let s = b.snapshot(t0);
        assert_eq!((s.calls_in_window, s.slow_calls_in_window), (19, 15));
        let t = call(&mut b, slow(), t0).expect("16/20 slow reaches 0.8");
        assert_eq!(
            t.reason,
            Reason::SlowCallRate {
                rate: 0.8,
                threshold: 0.8,
                calls: 20
            }
        );
        assert_eq!(b.state(), State::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_means_strictly_slower_than_threshold() {
        let t0 = Instant::now();
        let mut b = Breaker::new(no_jitter(), 1);
        call(&mut b, Outcome::Success { latency: ms(250) }, t0);
        assert_eq!(b.snapshot(t0).slow_calls_in_window, 0);
        call(&mut b, Outcome::Success { latency: ms(251) }, t0);
        assert_eq!(b.snapshot(t0).slow_calls_in_window, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn success_resets_consecutive_count_but_not_window() {
        let t0 = Instant::now();
        let mut b = Breaker::new(no_jitter(), 1);
        for _ in 0..4 {
            assert_eq!(call(&mut b, TIMEOUT, t0), None);
        }
        assert_eq!(call(&mut b, fast(), t0), None);
        assert_eq!(b.snapshot(t0).consecutive_failures, 0);
        for _ in 0..4 {
            assert_eq!(call(&mut b, TIMEOUT, t0), None);
        }
        let s = b.snapshot(t0);
        assert_eq!(b.state(), State::Closed);
        assert_eq!(s.consecutive_failures, 4);
        assert_eq!((s.calls_in_window, s.failures_in_window), (9, 8));
        assert!((s.failure_rate - 8.0 / 9.0).abs() < 1e-9);
        let t = call(&mut b, TIMEOUT, t0).expect("fifth in a row trips");
        assert_eq!(t.reason.as_str(), "consecutive_failures");
    }

    #[tokio::test(start_paused = true)]
    async fn window_rolls_old_buckets_out() {
        let t0 = Instant::now();
        let mut b = Breaker::new(no_jitter(), 1);
        // 10 failures in 19 calls, all in bucket 0.
        for i in 0..19u64 {
            let o = if i % 2 == 0 { TIMEOUT } else { fast() };
            assert_eq!(call(&mut b, o, t0), None);
        }
        // Rotation is timer work: the window holds calls, so a deadline is
        // due at the first bucket boundary, then at the next one.
        assert_eq!(b.next_deadline(), Some(t0 + secs(1)));
        assert_eq!(b.poll(t0 + secs(1)), None);
        assert_eq!(b.next_deadline(), Some(t0 + secs(2)));
        // Bucket 0 is still inside the 10 s window until bucket 10 begins.
        assert_eq!(b.snapshot(t0 + ms(9_999)).calls_in_window, 19);
        assert_eq!(b.snapshot(t0 + secs(10)).calls_in_window, 0);
        // With bucket 0 still counted this would be 11/20 and trip.
        assert_eq!(call(&mut b, TIMEOUT, t0 + secs(10)), None);
        let s = b.snapshot(t0 + secs(10));
        assert_eq!((s.calls_in_window, s.failures_in_window), (1, 1));
        assert_eq!(b.state(), State::Closed);
        // Once everything has rolled out the breaker needs no timer.
        assert_eq!(b.poll(t0 + secs(20)), None);
        assert_eq!(b.snapshot(t0 + secs(20)).calls_in_window, 0);
        assert_eq!(b.next_deadline(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn window_keeps_recent_buckets() {
        let t0 = Instant::now();
        let mut b = Breaker::new(no_jitter(), 1);
        call(&mut b, TIMEOUT, t0);
        call(&mut b, fast(), t0 + secs(5));
        call(&mut b, fast(), t0 + ms(9_500));
        assert_eq!(b.snapshot(t0 + ms(9_999)).calls_in_window, 3);
        let s = b.snapshot(t0 + secs(10));
        assert_eq!((s.calls_in_window, s.failures_in_window), (2, 0));
        assert_eq!(b.snapshot(t0 + secs(15)).calls_in_window, 1);
    }

    // -- Open ------------------------------------------------------------------

    #[tokio::test(start_paused = true)]
    async fn open_rejects_until_timer() {
        let t0 = Instant::now();
        let mut b = Breaker::new(no_jitter(), 1);
        trip(&mut b, t0);
        let r = b.try_acquire(t0 + secs(1)).expect_err("Open rejects");
        assert_eq!(r.state, State::Open);
        assert_eq!(r.mode, Mode::Normal);
        assert_eq!(r.retry_after, Some(secs(4)));
        assert!(b.try_acquire(t0 + ms(4_999)).is_err());
        // try_acquire never fires the timer itself, even once it is due.
        assert!(b.try_acquire(t0 + secs(6)).is_err());
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.next_deadline(), Some(t0 + secs(5)));
        assert_eq!(b.snapshot(t0 + secs(1)).next_probe_in_seconds, Some(4.0));
    }

    #[tokio::test(start_paused = true)]
    async fn open_to_half_open_fires_via_timer_task_without_requests() {
        let (sb, registry) = shared("primary", no_jitter());
        let timer = sb.spawn_timer(std::future::pending());
        // Let the timer go to sleep with no deadline, so the trip below must
        // wake it through the Notify.
        settle().await;
        let mut rx = sb.subscribe();
        for _ in 0..5 {
            sb.try_acquire()
                .expect("closed admits")
                .failure(FailureKind::ConnectRefused);
        }
        assert_eq!(sb.state(), State::Open);
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), State::Open);

        tokio::time::advance(ms(4_999)).await;
        settle().await;
        assert_eq!(sb.state(), State::Open);
        assert!(!rx.has_changed().unwrap());

        tokio::time::advance(ms(1)).await;
        settle().await;
        assert_eq!(sb.state(), State::HalfOpen);
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), State::HalfOpen);
        let labels = [
            ("upstream", "primary"),
            ("from", "open"),
            ("to", "half_open"),
            ("reason", "open_timeout"),
        ];
        assert_eq!(
            metric(&registry, "redfuse_breaker_transitions_total", &labels),
            1.0
        );
        assert_eq!(
            metric(&registry, "redfuse_breaker_rejected_total", &[]),
            0.0
        );
        timer.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_bounds_and_seeds() {
        let t0 = Instant::now();
        let open_for = |seed: u64| {
            let mut b = Breaker::new(BreakerConfig::default(), seed);
            let t = trip(&mut b, t0);
            let d = t.open_for.expect("timer armed");
            assert_eq!(b.next_deadline(), Some(t0 + d));
            d
        };
        let durations: Vec<Duration> = (0..64).map(open_for).collect();
        for d in &durations {
            assert!(*d >= secs(5) && *d <= secs(6), "{d:?} outside [5s, 6s]");
        }
        assert_ne!(
            durations[1], durations[2],
            "different seeds, different durations"
        );
        let distinct: HashSet<_> = durations.iter().collect();
        assert!(distinct.len() > 32, "jitter is spread: {}", distinct.len());
        assert_eq!(open_for(1), durations[1], "same seed, same duration");

        // At the cap the jitter still applies on top of open_max.
        let mut b = Breaker::new(BreakerConfig::default(), 9);
        trip(&mut b, t0);
        for expected in [10u64, 20, 40, 60, 60, 60] {
            let now = to_half_open(&mut b);
            let d = probe_fail(&mut b, now).open_for.expect("timer armed");
            let lo = secs(expected);
            assert!(d >= lo && d <= lo.mul_f64(1.2), "{d:?} vs {lo:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_on_reopen_and_caps() {
        let t0 = Instant::now();
        let mut b = Breaker::new(no_jitter(), 3);
        assert_eq!(trip(&mut b, t0).open_for, Some(secs(5)));
        for expected in [10u64, 20, 40, 60, 60] {
            let now = to_half_open(&mut b);
            let t = probe_fail(&mut b, now);
            assert_eq!(t.reason.as_str(), "probe_failure");
            assert_eq!(t.open_for, Some(secs(expected)));
            assert_eq!(b.next_deadline(), Some(now + secs(expected)));
        }
        let s = b.snapshot(b.next_deadline().unwrap());
        assert_eq!(s.open_backoff_seconds, 60.0);
        assert_eq!(s.backoff_level, 6);
    }

    /// Trip, fail one probe (level 2), then close: returns the closing instant.
    fn closed_after_two_openings(b: &mut Breaker, t0: Instant) -> Instant {
        trip(b, t0);
        let now = to_half_open(b);
        assert_eq!(probe_fail(b, now).open_for, Some(secs(10)));
        let now = to_half_open(b);
        assert_eq!(probe_ok(b, now), None);
        assert_eq!(probe_ok(b, now), None);
        let t = probe_ok(b, now).expect("closes");
        assert_eq!(t.to, State::Closed);
        now
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_resets_after_full_healthy_window() {
        let t0 = Instant::now();

        let mut b = Breaker::new(no_jitter(), 3);
        let closed_at = closed_after_two_openings(&mut b, t0);
        assert_eq!(b.snapshot(closed_at).backoff_level, 2);
        assert_eq!(b.next_deadline(), Some(closed_at + secs(10)));
        assert_eq!(b.poll(closed_at + ms(9_999)), None);
        assert_eq!(b.snapshot(closed_at).backoff_level, 2);
        assert_eq!(b.poll(closed_at + secs(10)), None);
        let s = b.snapshot(closed_at + secs(10));
        assert_eq!((s.backoff_level, s.open_backoff_seconds), (0, 0.0));
        assert_eq!(b.next_deadline(), None);
        assert_eq!(trip(&mut b, closed_at + secs(10)).open_for, Some(secs(5)));

        // Re-opening within the window keeps doubling.
        let mut b = Breaker::new(no_jitter(), 3);
        let closed_at = closed_after_two_openings(&mut b, t0);
        assert_eq!(trip(&mut b, closed_at + secs(9)).open_for, Some(secs(20)));

        // A late timer cannot keep the old level: the trip checks too.
        let mut b = Breaker::new(no_jitter(), 3);
        let closed_at = closed_after_two_openings(&mut b, t0);
        assert_eq!(trip(&mut b, closed_at + secs(10)).open_for, Some(secs(5)));
    }

    // -- HalfOpen --------------------------------------------------------------

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn half_open_permits_bounded_under_concurrency() {
        // Real OS-thread contention on the mutex; no time passes in this test.
        const TASKS: usize = 64;
        let (sb, registry) = shared("conc", BreakerConfig::default());
        sb.set_mode(Mode::ForceOpen);
        let t = sb
            .set_mode(Mode::Normal)
            .expect("leaving force_open probes");
        assert_eq!(t.to, State::HalfOpen);

        let start = Arc::new(tokio::sync::Barrier::new(TASKS));
        let everyone_tried = Arc::new(tokio::sync::Barrier::new(TASKS));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let max_seen = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..TASKS)
            .map(|_| {
                let (sb, start, everyone_tried) =
                    (sb.clone(), start.clone(), everyone_tried.clone());
                let (in_flight, max_seen) = (in_flight.clone(), max_seen.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    let guard = sb.try_acquire();
                    if guard.is_ok() {
                        let n = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                        max_seen.fetch_max(n, Ordering::SeqCst);
                    }
                    // Hold the permit until every task has tried, so the
                    // admitted count is exactly the bound.
                    everyone_tried.wait().await;
                    let admitted = guard.is_ok();
                    if admitted {
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                    }
                    drop(guard);
                    admitted
                })
            })
            .collect();
        let mut admitted = 0;
        for t in tasks {
            admitted += usize::from(t.await.expect("task"));
        }
        assert_eq!(admitted, 3);
        assert!(max_seen.load(Ordering::SeqCst) <= 3);
        assert_eq!(
            metric(&registry, "redfuse_breaker_rejected_total", &[]),
            (TASKS - 3) as f64
        );
        let s = sb.snapshot();
        assert_eq!(s.state, State::HalfOpen);
        assert_eq!(
            s.half_open_permits_in_use, 0,
            "dropped guards free their slots"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_closes_after_success_threshold() {
        let t0 = Instant::now();
        let mut b = Breaker::new(no_jitter(), 1);
        trip(&mut b, t0);
        let now = to_half_open(&mut b);
        let p: Vec<Permit> = (0..3).map(|_| b.try_acquire(now).expect("probe")).collect();
        assert!(p.iter().all(Permit::is_probe));
        let r = b.try_acquire(now).expect_err("beyond permits");
        assert_eq!(r.state, State::HalfOpen);
        assert_eq!(b.record(p[0], fast(), now), None);
        assert_eq!(b.record(p[1], slow(), now), None);
        let s = b.snapshot(now);
        assert_eq!((s.half_open_successes, s.half_open_permits_in_use), (2, 1));
        let p4 = b
            .try_acquire(now)
            .expect("a freed slot admits another probe");
        let t = b.record(p[2], fast(), now).expect("third success closes");
        assert_eq!((t.from, t.to), (State::HalfOpen, State::Closed));
        assert_eq!(t.reason, Reason::ProbeSuccess { successes: 3 });
        assert_eq!(b.record(p4, TIMEOUT, now), None, "stale probe ignored");
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.snapshot(now).consecutive_failures, 0);
        assert!(!b.try_acquire(now).expect("closed admits").is_probe());
    }

    #[tokio::test(start_paused = true)]
    async fn any_failure_in_half_open_reopens() {
        let t0 = Instant::now();
        let mut b = Breaker::new(no_jitter(), 1);
        trip(&mut b, t0);
        let now = to_half_open(&mut b);
        assert_eq!(probe_ok(&mut b, now), None);
        assert_eq!(probe_ok(&mut b, now), None);
        let p = b.try_acquire(now).expect("probe");
        let t = b
            .record(p, Outcome::Failure(FailureKind::Loading), now)
            .expect("reopens");
        assert_eq!((t.from, t.to), (State::HalfOpen, State::Open));
        assert_eq!(
            t.reason,
            Reason::ProbeFailure {
                kind: FailureKind::Loading
            }
        );
        assert_eq!(t.open_for, Some(secs(10)), "doubled back-off");
        assert!(b.try_acquire(now).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_max_wait_reopens_wedged_probes() {
        let (sb, registry) = shared("wedge", no_jitter());
        let timer = sb.spawn_timer(std::future::pending());
        for _ in 0..5 {
            sb.try_acquire()
                .unwrap()
                .failure(FailureKind::CommandTimeout);
        }
        tokio::time::advance(secs(5)).await;
        settle().await;
        assert_eq!(sb.state(), State::HalfOpen);
        let wedged: Vec<CallGuard> = (0..3).map(|_| sb.try_acquire().unwrap()).collect();
        assert!(sb.try_acquire().is_err());

        tokio::time::advance(ms(4_999)).await;
        settle().await;
        assert_eq!(sb.state(), State::HalfOpen);
        tokio::time::advance(ms(1)).await;
        settle().await;
        assert_eq!(sb.state(), State::Open);
        let labels = [
            ("from", "half_open"),
            ("to", "open"),
            ("reason", "half_open_timeout"),
        ];
        assert_eq!(
            metric(&registry, "redfuse_breaker_transitions_total", &labels),
            1.0
        );
        assert_eq!(sb.snapshot().open_backoff_seconds, 10.0);

        // The wedged calls finally end: they belong to an old generation.
        drop(wedged);
        assert_eq!(sb.state(), State::Open);
        assert_eq!(
            metric(
                &registry,
                "redfuse_breaker_calls_total",
                &[("outcome", "ignored")]
            ),
            3.0
        );
        tokio::time::advance(secs(10)).await;
        settle().await;
        assert_eq!(sb.state(), State::HalfOpen);
        let fresh: Vec<CallGuard> = (0..3).map(|_| sb.try_acquire().unwrap()).collect();
        assert_eq!(fresh.len(), 3, "no slot is held by the old probes");
        timer.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn stale_generation_results_do_not_drive_transitions() {
        let t0 = Instant::now();
        let mut b = Breaker::new(no_jitter(), 1);
        let old: Vec<Permit> = (0..5).map(|_| b.try_acquire(t0).unwrap()).collect();
        trip(&mut b, t0);
        assert_eq!(b.record(old[0], TIMEOUT, t0), None);
        let now = to_half_open(&mut b);
        // Pre-outage failures arriving now must not re-open the probing breaker.
        for p in &old[1..] {
            assert_eq!(b.record(*p, TIMEOUT, now), None);
        }
        assert_eq!(b.state(), State::HalfOpen);

        // Probes of one HalfOpen neither count nor free slots in the next one.
        let probes: Vec<Permit> = (0..3).map(|_| b.try_acquire(now).unwrap()).collect();
        b.record(probes[2], TIMEOUT, now).expect("re-opens");
        let now = to_half_open(&mut b);
        let current = b.try_acquire(now).unwrap();
        assert_eq!(b.record(probes[0], fast(), now), None);
        assert_eq!(b.record(probes[1], fast(), now), None);
        let s = b.snapshot(now);
        assert_eq!((s.half_open_successes, s.half_open_permits_in_use), (0, 1));
        assert_eq!(b.record(current, fast(), now), None);
        assert_eq!(b.snapshot(now).half_open_successes, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn record_fires_overdue_timer_first() {
        let t0 = Instant::now();
        let mut b = Breaker::new(no_jitter(), 1);
        trip(&mut b, t0);
        let now = to_half_open(&mut b);
        let p = b.try_acquire(now).unwrap();
        // The probe answers after the max wait, before the timer ran.
        let t = b
            .record(p, fast(), now + secs(6))
            .expect("timeout transition");
        assert_eq!(t.reason.as_str(), "half_open_timeout");
        assert_eq!(b.state(), State::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn call_guard_drop_is_ignored_and_frees_probe_slot() {
        let (sb, registry) = shared("guard", no_jitter());
        // Dropped in Closed: neither success nor failure, so it neither
        // counts in the window nor breaks a run of failures.
        for _ in 0..4 {
            sb.try_acquire()
                .unwrap()
                .failure(FailureKind::CommandTimeout);
        }
        drop(sb.try_acquire().unwrap());
        let s = sb.snapshot();
        assert_eq!((s.calls_in_window, s.consecutive_failures), (4, 4));
        let ignored = [("outcome", "ignored")];
        assert_eq!(
            metric(&registry, "redfuse_breaker_calls_total", &ignored),
            1.0
        );
        sb.reset();

        sb.set_mode(Mode::ForceOpen);
        sb.set_mode(Mode::Normal);
        assert_eq!(sb.state(), State::HalfOpen);
        let mut guards: Vec<CallGuard> = (0..3).map(|_| sb.try_acquire().unwrap()).collect();
        assert!(guards.iter().all(CallGuard::is_probe));
        assert!(sb.try_acquire().is_err());
        drop(guards.pop());
        assert_eq!(
            metric(&registry, "redfuse_breaker_calls_total", &ignored),
            2.0
        );
        assert_eq!(sb.snapshot().half_open_permits_in_use, 2);
        assert_eq!(sb.state(), State::HalfOpen);
        let g = sb.try_acquire().expect("slot freed by the dropped guard");
        g.success();
        assert_eq!(sb.snapshot().half_open_successes, 1);
    }

    // -- Modes -----------------------------------------------------------------

    #[tokio::test(start_paused = true)]
    async fn force_open_mode() {
        let t0 = Instant::now();
        let mut b = Breaker::new(no_jitter(), 1);
        let t = b.set_mode(Mode::ForceOpen, t0).expect("closed -> open");
        assert_eq!(
            (t.from, t.to, t.open_for),
            (State::Closed, State::Open, None)
        );
        assert_eq!(
            t.reason,
            Reason::Manual {
                action: ManualAction::SetMode(Mode::ForceOpen)
            }
        );
        let r = b.try_acquire(t0).expect_err("force_open rejects");
        assert_eq!((r.mode, r.retry_after), (Mode::ForceOpen, None));
        assert_eq!(b.next_deadline(), None);
        assert_eq!(b.poll(t0 + secs(3600)), None);
        assert_eq!(b.state(), State::Open);
        let t = b.set_mode(Mode::Normal, t0 + secs(3600)).expect("probes");
        assert_eq!((t.from, t.to), (State::Open, State::HalfOpen));

        // Forcing an already Open breaker removes its timer.
        let mut b = Breaker::new(no_jitter(), 1);
        trip(&mut b, t0);
        assert_eq!(b.set_mode(Mode::ForceOpen, t0), None);
        assert_eq!(b.next_deadline(), None);
        assert_eq!(b.poll(t0 + secs(60)), None);
        assert_eq!(b.state(), State::Open);

        // Configured initial mode.
        let cfg = BreakerConfig {
            mode: Mode::ForceOpen,
            ..no_jitter()
        };
        let mut b = Breaker::new(cfg, 1);
        assert_eq!(b.state(), State::Open);
        assert!(b.try_acquire(t0).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn force_closed_mode() {
        let t0 = Instant::now();
        let mut b = Breaker::new(no_jitter(), 1);
        trip(&mut b, t0);
        let t = b.set_mode(Mode::ForceClosed, t0).expect("open -> closed");
        assert_eq!((t.from, t.to), (State::Open, State::Closed));
        for _ in 0..50 {
            assert_eq!(call(&mut b, TIMEOUT, t0), None);
        }
        let s = b.snapshot(t0);
        assert_eq!(s.state, State::Closed);
        assert_eq!(s.mode, Mode::ForceClosed);
        assert_eq!((s.consecutive_failures, s.failures_in_window), (50, 50));
        // Back to the rules: the statistics it kept are judged again.
        assert_eq!(b.set_mode(Mode::Normal, t0), None);
        let t = call(&mut b, TIMEOUT, t0).expect("trips");
        assert_eq!(t.reason.as_str(), "consecutive_failures");
    }

    #[tokio::test(start_paused = true)]
    async fn disabled_mode_never_opens_but_counts() {
        let cfg = BreakerConfig {
            mode: Mode::Disabled,
            ..no_jitter()
        };
        let (sb, registry) = shared("off", cfg);
        let timer = sb.spawn_timer(std::future::pending());
        for _ in 0..40 {
            sb.try_acquire()
                .expect("disabled admits")
                .failure(FailureKind::ConnectReset);
        }
        assert_eq!(sb.state(), State::Closed);
        assert_eq!(sb.mode(), Mode::Disabled);
        let s = sb.snapshot();
        assert_eq!((s.calls_in_window, s.failure_rate), (40, 1.0));
        let failures = [("outcome", "failure")];
        assert_eq!(
            metric(&registry, "redfuse_breaker_calls_total", &failures),
            40.0
        );
        tokio::time::advance(secs(1)).await;
        settle().await;
        assert_eq!(metric(&registry, "redfuse_breaker_failure_rate", &[]), 1.0);
        // The gauge decays once the calls roll out of the window.
        tokio::time::advance(secs(9)).await;
        settle().await;
        assert_eq!(metric(&registry, "redfuse_breaker_failure_rate", &[]), 0.0);
        assert_eq!(metric(&registry, "redfuse_breaker_state", &[]), 0.0);
        timer.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn metrics_only_mode_transitions_but_never_rejects() {
        let t0 = Instant::now();
        let cfg = BreakerConfig {
            mode: Mode::MetricsOnly,
            ..no_jitter()
        };
        let mut b = Breaker::new(cfg.clone(), 1);
        let t = trip(&mut b, t0);
        assert_eq!(t.open_for, Some(secs(5)));
        let p = b.try_acquire(t0).expect("metrics_only admits while Open");
        assert!(p.is_shadow());
        assert_eq!(b.record(p, fast(), t0), None, "shadow results are ignored");
        assert_eq!(b.snapshot(t0).shadow_rejections, 1);
        let now = to_half_open(&mut b);
        let probes: Vec<Permit> = (0..3).map(|_| b.try_acquire(now).unwrap()).collect();
        assert!(probes.iter().all(Permit::is_probe));
        let extra = b.try_acquire(now).expect("beyond permits: shadow");
        assert!(extra.is_shadow());
        assert_eq!(b.record(extra, TIMEOUT, now), None);
        assert_eq!(b.state(), State::HalfOpen);
        for p in &probes[..2] {
            assert_eq!(b.record(*p, fast(), now), None);
        }
        let t = b.record(probes[2], fast(), now).expect("closes");
        assert_eq!(t.to, State::Closed);

        // Through the wrapper, would-be rejections never bump rejected_total.
        let (sb, registry) = shared("shadow", cfg);
        for _ in 0..5 {
            sb.try_acquire().unwrap().failure(FailureKind::Busy);
        }
        assert_eq!(sb.state(), State::Open);
        for _ in 0..4 {
            sb.try_acquire().expect("never rejects").success();
        }
        assert_eq!(
            metric(&registry, "redfuse_breaker_rejected_total", &[]),
            0.0
        );
        assert_eq!(sb.snapshot().shadow_rejections, 4);
        assert_eq!(metric(&registry, "redfuse_breaker_state", &[]), 2.0);
    }

    #[tokio::test(start_paused = true)]
    async fn reset_clears_everything() {
        let t0 = Instant::now();
        let mut b = Breaker::new(no_jitter(), 1);
        trip(&mut b, t0);
        let now = to_half_open(&mut b);
        probe_fail(&mut b, now);
        b.set_mode(Mode::ForceOpen, now);
        let t = b.reset(now).expect("open -> closed");
        assert_eq!((t.from, t.to), (State::Open, State::Closed));
        assert_eq!(
            t.reason,
            Reason::Manual {
                action: ManualAction::Reset
            }
        );
        let s = b.snapshot(now);
        assert_eq!(s.mode, Mode::Normal);
        assert_eq!((s.backoff_level, s.open_backoff_seconds), (0, 0.0));
        assert_eq!((s.calls_in_window, s.consecutive_failures), (0, 0));
        assert_eq!(trip(&mut b, now).open_for, Some(secs(5)));

        // Reset while Closed is not a transition but still clears counters.
        let mut b = Breaker::new(no_jitter(), 1);
        for _ in 0..4 {
            call(&mut b, TIMEOUT, t0);
        }
        assert_eq!(b.reset(t0), None);
        let s = b.snapshot(t0);
        assert_eq!((s.calls_in_window, s.consecutive_failures), (0, 0));
        assert_eq!(call(&mut b, TIMEOUT, t0), None, "count starts over");
    }

    #[tokio::test(start_paused = true)]
    async fn shared_reset_and_set_mode_publish() {
        let (sb, registry) = shared("ops", no_jitter());
        let mut rx = sb.subscribe();
        sb.set_mode(Mode::ForceOpen).expect("transition");
        assert_eq!(*rx.borrow_and_update(), State::Open);
        assert_eq!(metric(&registry, "redfuse_breaker_state", &[]), 2.0);
        let labels = [("to", "open"), ("reason", "manual")];
        assert_eq!(
            metric(&registry, "redfuse_breaker_transitions_total", &labels),
            1.0
        );
        sb.reset().expect("transition");
        assert_eq!(*rx.borrow_and_update(), State::Closed);
        assert_eq!(sb.mode(), Mode::Normal);
        assert_eq!(metric(&registry, "redfuse_breaker_state", &[]), 0.0);
    }

    // -- Timer task lifecycle ------------------------------------------------------

    #[tokio::test(start_paused = true)]
    async fn timer_exits_when_breaker_dropped() {
        let (sb, _registry) = shared("gone", no_jitter());
        let timer = sb.spawn_timer(std::future::pending());
        let guard = sb.try_acquire().unwrap();
        settle().await;
        drop(sb);
        settle().await;
        assert!(!timer.is_finished(), "an outstanding guard keeps it alive");
        drop(guard);
        settle().await;
        assert!(timer.is_finished());
    }

    #[tokio::test(start_paused = true)]
    async fn timer_exits_on_shutdown() {
        let (sb, _registry) = shared("stop", no_jitter());
        let (tx, mut rx) = watch::channel(false);
        let timer = sb.spawn_timer(async move {
            let _ = rx.wait_for(|stop| *stop).await;
        });
        settle().await;
        assert!(!timer.is_finished());
        tx.send(true).unwrap();
        settle().await;
        assert!(timer.is_finished());
        assert_eq!(sb.state(), State::Closed, "breaker itself unaffected");
    }

    // -- Metrics -----------------------------------------------------------------

    #[tokio::test(start_paused = true)]
    async fn metrics_visible_in_registry() {
        let (sb, reg) = shared("cache-a", no_jitter());
        let timer = sb.spawn_timer(std::future::pending());
        let up = ("upstream", "cache-a");
        let info = |s: &str| metric(&reg, "redfuse_breaker_state_info", &[up, ("state", s)]);
        let calls = |o: &str| metric(&reg, "redfuse_breaker_calls_total", &[up, ("outcome", o)]);
        assert_eq!(metric(&reg, "redfuse_breaker_state", &[up]), 0.0);
        assert_eq!(
            (info("closed"), info("half_open"), info("open")),
            (1.0, 0.0, 0.0)
        );
        assert_eq!(calls("success"), 0.0);

        sb.try_acquire().unwrap().complete(slow());
        assert_eq!((calls("success"), calls("slow")), (1.0, 1.0));
        for _ in 0..4 {
            sb.try_acquire().unwrap().failure(FailureKind::MasterDown);
        }
        tokio::time::advance(secs(1)).await;
        settle().await;
        assert!((metric(&reg, "redfuse_breaker_failure_rate", &[up]) - 0.8).abs() < 1e-9);
        assert!((metric(&reg, "redfuse_breaker_slow_call_rate", &[up]) - 0.2).abs() < 1e-9);

        sb.try_acquire().unwrap().failure(FailureKind::MasterDown);
        assert_eq!(metric(&reg, "redfuse_breaker_state", &[up]), 2.0);
        assert_eq!(
            (info("closed"), info("half_open"), info("open")),
            (0.0, 0.0, 1.0)
        );
        let trans = [
            up,
            ("from", "closed"),
            ("to", "open"),
            ("reason", "consecutive_failures"),
        ];
        assert_eq!(
            metric(&reg, "redfuse_breaker_transitions_total", &trans),
            1.0
        );
        assert_eq!(
            metric(&reg, "redfuse_breaker_open_backoff_seconds", &[up]),
            5.0
        );
        assert_eq!(calls("failure"), 5.0);
        assert!(sb.try_acquire().is_err());
        assert_eq!(metric(&reg, "redfuse_breaker_rejected_total", &[up]), 1.0);

        tokio::time::advance(secs(5)).await;
        settle().await;
        assert_eq!(metric(&reg, "redfuse_breaker_state", &[up]), 1.0);
        assert_eq!(info("half_open"), 1.0);
        timer.abort();
    }

    #[test]
    fn metrics_register_twice_fails() {
        let registry = Registry::new();
        BreakerMetrics::register(&registry).expect("first registration");
        assert!(BreakerMetrics::register(&registry).is_err());
    }

    // -- Classification ------------------------------------------------------------

    #[test]
    fn classify_failure_replies() {
        let cases = [
            (
                "-LOADING Redis is loading the dataset in memory\r\n",
                FailureKind::Loading,
            ),
            (
                "-BUSY Redis is busy running a script.\r\n",
                FailureKind::Busy,
            ),
            (
                "-MASTERDOWN Link with MASTER is down\r\n",
                FailureKind::MasterDown,
            ),
            (
                "-CLUSTERDOWN The cluster is down\r\n",
                FailureKind::ClusterDown,
            ),
            (
                "-TRYAGAIN Multiple keys request during rehashing\r\n",
                FailureKind::TryAgain,
            ),
        ];
        for (reply, kind) in cases {
            for is_write in [false, true] {
                assert_eq!(
                    classify_error_reply(reply.as_bytes(), is_write),
                    ReplyClass::Failure(kind),
                    "{reply:?}"
                );
            }
        }
        let body = "LOADING loading the dataset";
        let blob = format!("!{}\r\n{body}\r\n", body.len());
        assert_eq!(
            classify_error_reply(blob.as_bytes(), false),
            ReplyClass::Failure(FailureKind::Loading)
        );
        assert_eq!(
            classify_error_reply(b"-TRYAGAIN\r\n", false),
            ReplyClass::Failure(FailureKind::TryAgain)
        );
    }

    #[test]
    fn classify_write_only_failures() {
        for (reply, kind) in [
            (
                "-READONLY You can't write against a read only replica.\r\n",
                FailureKind::ReadOnly,
            ),
            (
                "-OOM command not allowed when used memory > 'maxmemory'.\r\n",
                FailureKind::Oom,
            ),
        ] {
            assert_eq!(
                classify_error_reply(reply.as_bytes(), true),
                ReplyClass::Failure(kind)
            );
            assert_eq!(
                classify_error_reply(reply.as_bytes(), false),
                ReplyClass::Success
            );
        }
    }

    #[test]
    fn classify_auth_and_success_replies() {
        for reply in [
            "-NOAUTH Authentication required.\r\n",
            "-WRONGPASS invalid username-password pair or user is disabled.\r\n",
            "-NOPERM User x has no permissions to run the 'get' command\r\n",
        ] {
            for is_write in [false, true] {
                assert_eq!(
                    classify_error_reply(reply.as_bytes(), is_write),
                    ReplyClass::AuthProblem
                );
            }
        }
        for reply in [
            "-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
            "-ERR unknown command 'FOO'\r\n",
            "-NOSCRIPT No matching script.\r\n",
            "-BUSYKEY Target key name already exists.\r\n",
            "-BUSYGROUP Consumer Group name already exists\r\n",
            "!20\r\nSYNTAX invalid syntax\r\n",
            "+OK\r\n",
            ":1\r\n",
        ] {
            for is_write in [false, true] {
                assert_eq!(
                    classify_error_reply(reply.as_bytes(), is_write),
                    ReplyClass::Success,
                    "{reply:?}"
                );
            }
        }
        assert_eq!(
            classify_error_reply(b"", false),
            ReplyClass::Failure(FailureKind::MalformedReply)
        );
        assert_eq!(
            classify_error_reply(b"!x\r\nLOADING\r\n", false),
            ReplyClass::Failure(FailureKind::MalformedReply)
        );
        assert_eq!(
            ReplyClass::AuthProblem.outcome(ms(3)),
            Outcome::Success { latency: ms(3) }
        );
        assert_eq!(
            ReplyClass::Failure(FailureKind::Busy).outcome(ms(3)),
            Outcome::Failure(FailureKind::Busy)
        );
    }

    // -- Config, names, display -------------------------------------------------------

    #[test]
    fn config_defaults_and_serde() {
        let d = BreakerConfig::default();
        assert_eq!(d.consecutive_failures, 5);
        assert_eq!(d.failure_rate_threshold, 0.5);
        assert_eq!(d.slow_call_rate_threshold, 0.8);
        assert_eq!(d.slow_call_threshold(), ms(250));
        assert_eq!(d.minimum_calls, 20);
        assert_eq!((d.window(), d.bucket()), (secs(10), secs(1)));
        assert_eq!((d.open_base(), d.open_max()), (secs(5), secs(60)));
        assert_eq!(d.jitter, 0.2);
        assert_eq!((d.half_open_permits, d.success_threshold), (3, 3));
        assert_eq!(d.half_open_max_wait(), secs(5));
        assert_eq!(d.mode, Mode::Normal);
        assert_eq!(d.validate(), Ok(()));

        let empty: BreakerConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(empty, d);
        let c: BreakerConfig =
            serde_json::from_str(r#"{"open_base_ms": 100, "mode": "metrics_only"}"#).unwrap();
        assert_eq!((c.open_base(), c.mode), (ms(100), Mode::MetricsOnly));
        assert!(serde_json::from_str::<BreakerConfig>(r#"{"open_base": 1}"#).is_err());
    }

    #[test]
    fn config_validate_names_the_field() {
        type Edit = fn(&mut BreakerConfig);
        let cases: [(Edit, &str); 14] = [
            (|c| c.consecutive_failures = 0, "consecutive_failures"),
            (|c| c.failure_rate_threshold = 0.0, "failure_rate_threshold"),
            (|c| c.failure_rate_threshold = 1.5, "failure_rate_threshold"),
            (
                |c| c.slow_call_rate_threshold = f64::NAN,
                "slow_call_rate_threshold",
            ),
            (|c| c.slow_call_threshold_ms = 0, "slow_call_threshold_ms"),
            (|c| c.minimum_calls = 0, "minimum_calls"),
            (|c| c.window_ms = 0, "window_ms"),
            (|c| c.bucket_ms = 3_000, "bucket_ms"),
            (|c| c.bucket_ms = 1, "bucket_ms"),
            (|c| c.open_base_ms = 0, "open_base_ms"),
            (|c| c.open_max_ms = 1_000, "open_max_ms"),
            (|c| c.jitter = -0.1, "jitter"),
            (|c| c.half_open_permits = 0, "half_open_permits"),
            (
                |c| c.half_open_max_wait_ms = u64::MAX,
                "half_open_max_wait_ms",
            ),
        ];
        for (edit, field) in cases {
            let mut c = BreakerConfig::default();
            edit(&mut c);
            let err = c.validate().expect_err(field);
            assert!(err.starts_with(field), "{err:?} should name {field}");
        }
        let c = BreakerConfig {
            success_threshold: 0,
            ..BreakerConfig::default()
        };
        assert!(c.validate().unwrap_err().starts_with("success_threshold"));
    }

    #[test]
    #[should_panic(expected = "open_base_ms")]
    fn breaker_new_rejects_invalid_config() {
        let c = BreakerConfig {
            open_base_ms: 0,
            ..BreakerConfig::default()
        };
        let _ = Breaker::new(c, 0);
    }

    #[test]
    fn names_and_display() {
        let states: Vec<_> = State::ALL
            .iter()
            .map(|s| (s.as_str(), s.as_gauge()))
            .collect();
        assert_eq!(states, [("closed", 0), ("half_open", 1), ("open", 2)]);
        for m in [
            Mode::Normal,
            Mode::ForceOpen,
            Mode::ForceClosed,
            Mode::Disabled,
            Mode::MetricsOnly,
        ] {
            assert_eq!(m.as_str().parse::<Mode>(), Ok(m));
        }
        assert!("open".parse::<Mode>().is_err());

        let labels: Vec<&str> = [
            Reason::ConsecutiveFailures {
                count: 5,
                threshold: 5,
            },
            Reason::FailureRate {
                rate: 0.55,
                threshold: 0.5,
                calls: 20,
            },
            Reason::SlowCallRate {
                rate: 0.9,
                threshold: 0.8,
                calls: 30,
            },
            Reason::OpenTimeout { after: secs(5) },
            Reason::ProbeSuccess { successes: 3 },
            Reason::ProbeFailure {
                kind: FailureKind::Busy,
            },
            Reason::HalfOpenTimeout { waited: secs(5) },
            Reason::Manual {
                action: ManualAction::Reset,
            },
        ]
        .iter()
        .map(Reason::as_str)
        .collect();
        assert_eq!(
            labels,
            [
                "consecutive_failures",
                "failure_rate",
                "slow_call_rate",
                "open_timeout",
                "probe_success",
                "probe_failure",
                "half_open_timeout",
                "manual"
            ]
        );
        let r = Reason::FailureRate {
            rate: 0.55,
            threshold: 0.5,
            calls: 20,
        };
        assert_eq!(
            r.to_string(),
            "failure_rate: failure rate 55.0% over 20 calls (threshold 50.0%)"
        );
        let t = Transition {
            from: State::Closed,
            to: State::Open,
            reason: Reason::ConsecutiveFailures {
                count: 5,
                threshold: 5,
            },
            generation: 1,
            open_for: Some(ms(5_250)),
        };
        assert_eq!(
            t.to_string(),
            "closed -> open: consecutive_failures: 5 consecutive failures (threshold 5); next probe in 5.250s"
        );
        let m = Reason::Manual {
            action: ManualAction::SetMode(Mode::ForceOpen),
        };
        assert_eq!(m.to_string(), "manual: mode set to force_open");
    }

    #[tokio::test(start_paused = true)]
    async fn snapshot_serializes() {
        let t0 = Instant::now();
        let mut b = Breaker::new(no_jitter(), 1);
        trip(&mut b, t0);
        let v = serde_json::to_value(b.snapshot(t0 + secs(2))).unwrap();
        assert_eq!(v["state"], "open");
        assert_eq!(v["mode"], "normal");
        assert_eq!(v["next_probe_in_seconds"], 3.0);
        assert_eq!(v["open_backoff_seconds"], 5.0);
        assert_eq!(v["generation"], 1);
        assert_eq!(v["calls_in_window"], 5);
        assert_eq!(v["failure_rate"], 1.0);
        let now = to_half_open(&mut b);
        let _probe = b.try_acquire(now).unwrap();
        let v = serde_json::to_value(b.snapshot(now)).unwrap();
        assert_eq!(v["state"], "half_open");
        assert_eq!(v["half_open_permits_in_use"], 1);
        assert!(v["next_probe_in_seconds"].is_null());
    }
}
