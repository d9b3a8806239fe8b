//! Drills: fault injection for game days.
//!
//! # Design
//!
//! A drill makes a share of the requests to one upstream fail the way a sick Redis would:
//! late (`delay`), answered with an error (`error`, `-LOADING ...` by default), or refused
//! (`refuse`, as a refused connection), for a bounded time. The point is to exercise what
//! teams rely on in an outage (the breaker, degraded mode, failover to replicas, alerts,
//! dashboards) without breaking anything real, so faults are injected where a request is
//! handed to an upstream connection ([`inject::intercept`], called from
//! `upstream::conn`) and where the health probe asks ([`inject::probe`]): everything above
//! sees exactly what it would see from a real fault, and the breaker judges injected
//! faults by the same rules as real ones (an injected delay counts in the call's latency,
//! and one past the command timeout is a timeout). Internal calls without a breaker permit
//! (ordering fences) and blocking commands are left alone.
//!
//! Drills are off unless `[drills] enabled = true`, and then started and stopped only with
//! the admin token (`POST /faults`, `DELETE /faults`); every drill has a duration, bounded
//! by `max_duration_ms`, after which it ends by itself. When no drill is active the data
//! path pays one relaxed atomic load ([`inject::armed`]).
//!
//! The active drills are process-wide (the data path reaches them without a handle): one
//! redfuse per process, as the binary runs it.
//!
//! [`inject`] is the hot path, [`Drills`] the admin side and the expiry task.

pub mod inject;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tracing::{info, warn};

/// `[drills]` in the config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DrillsConfig {
    /// Allow `POST /faults` (with the admin token).
    pub enabled: bool,
    /// The longest a drill may be started for.
    pub max_duration_ms: u64,
}

impl Default for DrillsConfig {
    fn default() -> Self {
        DrillsConfig {
            enabled: false,
            max_duration_ms: 900_000,
        }
    }
}

impl DrillsConfig {
    /// The bad field and why; `admin_token_set`: drills are only started with the token.
    pub fn validate(&self, admin_token_set: bool) -> Result<(), (&'static str, String)> {
        if self.max_duration_ms == 0 || self.max_duration_ms > 86_400_000 {
            return Err((
                "drills.max_duration_ms",
                format!(
                    "must be in 1..=86400000 (one day), got {}",
                    self.max_duration_ms
                ),
            ));
        }
        if self.enabled && !admin_token_set {
            return Err((
                "drills.enabled",
                "drills are started only with the admin token: set `admin_token` too".into(),
            ));
        }
        Ok(())
    }
}

/// What a drill does to the requests it picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The reply arrives `delay_ms` late.
    Delay,
    /// An error reply instead of sending the request.
    Error,
    /// A refused connection instead of sending the request.
    Refuse,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Delay => "delay",
            Kind::Error => "error",
            Kind::Refuse => "refuse",
        }
    }
}

/// `POST /faults`: one drill as asked for.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// The upstream's name, as in `/breakers`.
    pub upstream: String,
    pub kind: Kind,
    /// Share of the upstream's requests affected, in (0, 1].
    pub share: f64,
    /// How long the drill lasts; required, at most `max_duration_ms`.
    pub duration_ms: u64,
    /// `delay`: how late.
    #[serde(default)]
    pub delay_ms: Option<u64>,
    /// `error`: the error reply (a RESP simple error such as `-LOADING ...`).
    #[serde(default)]
    pub reply: Option<String>,
}

/// The error reply of an `error` drill when none is given: what Redis says while it loads
/// its data after a restart, which the breaker counts as a failure.
pub const DEFAULT_REPLY: &str = "-LOADING Redis is loading the dataset in memory (redfuse drill)";

/// The most drills active at once.
const MAX_ACTIVE: usize = 64;

/// Why a drill was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DrillError {
    #[error("invalid drill: {0}")]
    Invalid(String),
    #[error("no upstream named '{0}'")]
    UnknownUpstream(String),
    #[error("{MAX_ACTIVE} drills are active already")]
    TooMany,
}

/// One active drill.
#[derive(Debug)]
pub struct Drill {
    pub id: u64,
    pub spec: Spec,
    pub started_unix_ms: u64,
    until: Instant,
    delay: Duration,
    /// The error reply with its CRLF.
    frame: Bytes,
    injected: prometheus::IntCounter,
}

impl Drill {
    /// How it is shown by `GET /faults`.
    pub fn view(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "id": self.id,
            "upstream": self.spec.upstream,
            "kind": self.spec.kind,
            "share": self.spec.share,
            "duration_ms": self.spec.duration_ms,
            "started_unix_ms": self.started_unix_ms,
            "remaining_ms": self.until.saturating_duration_since(Instant::now()).as_millis() as u64,
            "injected": self.injected.get(),
        });
        match self.spec.kind {
            Kind::Delay => v["delay_ms"] = (self.delay.as_millis() as u64).into(),
            Kind::Error => {
                let text = String::from_utf8_lossy(&self.frame);
                v["reply"] = text.trim_end().into();
            }
            Kind::Refuse => {}
        }
        v
    }
}

/// The drill metrics: registered whether or not drills are enabled, so that dashboards and
/// alerts find them everywhere.
#[derive(Clone)]
pub struct DrillMetrics {
    injections: IntCounterVec,
    active: IntGauge,
}

impl DrillMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<DrillMetrics> {
        let m = DrillMetrics {
            injections: IntCounterVec::new(
                Opts::new(
                    "redfuse_fault_injections_total",
                    "Requests (and health probes) a fault injection drill delayed, failed or refused.",
                ),
                &["upstream", "kind"],
            )?,
            active: IntGauge::new(
                "redfuse_drills_active",
                "Fault injection drills running now.",
            )?,
        };
        registry.register(Box::new(m.injections.clone()))?;
        registry.register(Box::new(m.active.clone()))?;
        Ok(m)
    }
}

/// The admin side of drills: start, list, clear, and the task that ends them on time.
#[derive(Clone)]
pub struct Drills {
    inner: Arc<Inner>,
}

struct Inner {
    config: DrillsConfig,
    metrics: DrillMetrics,
    next_id: AtomicU64,
    /// Wakes the expiry task (a drill started or was cleared).
    changed: Notify,
}

impl Drills {
    /// Starts the expiry task (inside a tokio runtime).
    pub fn start(
        config: DrillsConfig,
        metrics: DrillMetrics,
        shutdown: watch::Receiver<bool>,
    ) -> Drills {
        let d = Drills {
            inner: Arc::new(Inner {
                config,
                metrics,
                next_id: AtomicU64::new(1),
                changed: Notify::new(),
            }),
        };
        tokio::spawn(d.clone().expire(shutdown));
        d
    }

    pub fn config(&self) -> &DrillsConfig {
        &self.inner.config
    }

    /// Checks and starts a drill on one of `upstreams`.
    pub fn add(&self, spec: Spec, upstreams: &[&str]) -> Result<Arc<Drill>, DrillError> {
        let bad = |m: String| Err(DrillError::Invalid(m));
        if !upstreams.contains(&spec.upstream.as_str()) {
            return Err(DrillError::UnknownUpstream(spec.upstream));
        }
        if !(spec.share > 0.0 && spec.share <= 1.0) {
            return bad(format!("share must be in (0, 1], got {}", spec.share));
        }
        let max = self.inner.config.max_duration_ms;
        if spec.duration_ms == 0 || spec.duration_ms > max {
            return bad(format!(
                "duration_ms must be in 1..={max} (drills.max_duration_ms), got {}",
                spec.duration_ms
            ));
        }
        let delay = match (spec.kind, spec.delay_ms) {
            (Kind::Delay, Some(d)) if d > 0 && d <= max => Duration::from_millis(d),
            (Kind::Delay, Some(d)) => {
                return bad(format!("delay_ms must be in 1..={max}, got {d}"));
            }
            (Kind::Delay, None) => return bad("a delay drill needs delay_ms".into()),
            (_, Some(_)) => return bad("delay_ms is for delay drills".into()),
            (_, None) => Duration::ZERO,
        };
        let frame = match (spec.kind, &spec.reply) {
            (Kind::Error, Some(r))
                if r.starts_with('-') && r.len() > 1 && !r.contains(['\r', '\n']) =>
            {
                Bytes::from(format!("{r}\r\n"))
            }
            (Kind::Error, Some(r)) => {
                return bad(format!(
                    "reply must be one RESP error line starting with '-', got {r:?}"
                ));
            }
            (Kind::Error, None) => Bytes::from(format!("{DEFAULT_REPLY}\r\n")),
            (_, Some(_)) => return bad("reply is for error drills".into()),
            (_, None) => Bytes::new(),
        };
        let injected = self
            .inner
            .metrics
            .injections
            .with_label_values(&[spec.upstream.as_str(), spec.kind.as_str()]);
        let drill = Arc::new(Drill {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            until: Instant::now() + Duration::from_millis(spec.duration_ms),
            started_unix_ms: crate::fleet::report::unix_ms(),
            delay,
            frame,
            injected,
            spec,
        });
        if !inject::activate(drill.clone(), MAX_ACTIVE) {
            return Err(DrillError::TooMany);
        }
        self.inner.metrics.active.set(inject::active().len() as i64);
        self.inner.changed.notify_one();
        warn!(
            drill = drill.id,
            upstream = %drill.spec.upstream,
            kind = drill.spec.kind.as_str(),
            share = drill.spec.share,
            duration_ms = drill.spec.duration_ms,
            "fault injection drill started"
        );
        Ok(drill)
    }

    /// The active drills.
    pub fn list(&self) -> Vec<Arc<Drill>> {
        inject::active()
    }

    /// Ends every drill now; returns how many there were.
    pub fn clear(&self) -> usize {
        let ended = inject::retain(|_| false);
        self.ended(&ended, "cleared");
        ended.len()
    }

    fn ended(&self, ended: &[Arc<Drill>], how: &str) {
        self.inner.metrics.active.set(inject::active().len() as i64);
        for d in ended {
            info!(
                drill = d.id,
                upstream = %d.spec.upstream,
                kind = d.spec.kind.as_str(),
                injected = d.injected.get(),
                "fault injection drill ended ({how})"
            );
        }
        self.inner.changed.notify_one();
    }

    /// Ends drills when their time is up.
    async fn expire(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            let now = Instant::now();
            let ended = inject::retain(|d| d.until > now);
            if !ended.is_empty() {
                self.ended(&ended, "expired");
            }
            let next = inject::active().iter().map(|d| d.until).min();
            tokio::select! {
                _ = async {
                    match next {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {}
                _ = self.inner.changed.notified() => {}
                _ = shutdown.changed() => {
                    inject::retain(|_| false);
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
