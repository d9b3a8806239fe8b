//! The fleet's Prometheus families. Registered whether or not `[fleet]` is enabled, so that
//! dashboards and alerts find them on every instance (`redfuse_fleet_enabled` says which).

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use super::peers::Via;

#[derive(Clone)]
pub struct FleetMetrics {
    /// 1 when `[fleet]` is enabled.
    pub enabled: IntGauge,
    /// 1 while the coordination Redis answers and the subscription is up.
    pub sync_up: IntGauge,
    /// Own transitions and fleet-wide actions written and published.
    pub published: IntCounter,
    received: IntCounterVec,
    dropped: IntCounterVec,
    advice: IntCounterVec,
}

/// Why an own report was not delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// The publisher's queue was full (the coordination Redis is slow or away).
    QueueFull,
    /// Writing or publishing it failed.
    SyncDown,
}

impl FleetMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<FleetMetrics> {
        let m = FleetMetrics {
            enabled: IntGauge::new(
                "redfuse_fleet_enabled",
                "1 when breaker state is shared with the fleet ([fleet] enabled).",
            )?,
            sync_up: IntGauge::new(
                "redfuse_fleet_sync_up",
                "1 while the coordination Redis answers and the subscription is up; 0 while breakers decide alone.",
            )?,
            published: IntCounter::new(
                "redfuse_fleet_published_total",
                "Own breaker transitions and fleet-wide actions written to the coordination Redis and published.",
            )?,
            received: IntCounterVec::new(
                Opts::new(
                    "redfuse_fleet_received_total",
                    "New reports from other instances, by how they arrived (channel or catch_up).",
                ),
                &["via"],
            )?,
            dropped: IntCounterVec::new(
                Opts::new(
                    "redfuse_fleet_dropped_total",
                    "Own reports not delivered: queue_full (publisher queue full) or sync_down (write failed).",
                ),
                &["reason"],
            )?,
            advice: IntCounterVec::new(
                Opts::new(
                    "redfuse_fleet_advice_total",
                    "Reports from other instances applied to a breaker, by what they did (probe_now, quorum_open, recovery_probe, noted, ignored).",
                ),
                &["upstream", "effect"],
            )?,
        };
        registry.register(Box::new(m.enabled.clone()))?;
        registry.register(Box::new(m.sync_up.clone()))?;
        registry.register(Box::new(m.published.clone()))?;
        registry.register(Box::new(m.received.clone()))?;
        registry.register(Box::new(m.dropped.clone()))?;
        registry.register(Box::new(m.advice.clone()))?;
        for via in [Via::Channel, Via::CatchUp] {
            m.received.with_label_values(&[via.as_str()]);
        }
        for d in [Dropped::QueueFull, Dropped::SyncDown] {
            m.dropped.with_label_values(&[d.as_str()]);
        }
        Ok(m)
    }

    pub fn received(&self, via: Via) {
        self.received.with_label_values(&[via.as_str()]).inc();
    }

    pub fn dropped(&self, why: Dropped) {
        self.dropped.with_label_values(&[why.as_str()]).inc();
    }

    pub fn advice(&self, upstream: &str, effect: &str) {
        self.advice.with_label_values(&[upstream, effect]).inc();
    }
}

impl Dropped {
    pub fn as_str(self) -> &'static str {
        match self {
            Dropped::QueueFull => "queue_full",
            Dropped::SyncDown => "sync_down",
        }
    }
}
