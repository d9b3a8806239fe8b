//! Breaker state shared across instances: the hybrid breaker.
//!
//! # Design
//!
//! Every breaker stays in memory and decides on the data path alone; the fleet only gives
//! it *advice* (`breaker::Advice`), an input of the pure state machine like a call's
//! outcome. The sync never sits on the data path and never blocks a transition: a breaker's
//! transition is handed to `Publisher` under the breaker's lock, which only `try_send`s it
//! into a bounded queue (a full queue drops it and counts `redfuse_fleet_dropped_total`). A
//! background task writes it to the hash `<key_prefix>:<upstream>` (field: this instance's
//! id, value: state, generation, reason, timestamp) with a TTL and publishes it on the
//! channel.
//!
//! Other instances' reports arrive two ways: the channel (fast: the figure that matters is
//! the propagation delay, a few milliseconds on a LAN) and a catch-up read of every hash at
//! start and every `catch_up_interval_ms` (slow but complete: messages sent while this
//! instance was away, or while the subscription was down, are not lost). [`peers::Peers`]
//! lets only news through, so a report re-read every few seconds acts once.
//!
//! The coordination Redis is a dependency the data path must not acquire: when it is
//! unreachable every breaker keeps working alone, `redfuse_fleet_sync_up` drops to 0 and one
//! log line says so (one per change, not per attempt). When it answers again this instance
//! re-announces its latest transitions and catches up.
//!
//! Control-plane connections (hash reads and writes, fleet-wide actions) come from a small
//! `deadpool-redis` pool; the subscription is the `redis` crate's pub/sub connection. Neither
//! shares anything with the data path's pipelined connections.
//!
//! Fleet-wide breaker actions (`POST /breakers/<name>/<action>?scope=fleet`) are applied
//! locally, published, and stored in the hash's `@fleet` field, so that instances that
//! start or reconnect within `state_ttl_ms` apply them too.
//!
//! [`config`] is the `[fleet]` section, [`report`] the wire format, [`peers`] the news
//! filter, [`metrics`] the Prometheus families, `sync` the background tasks.

pub mod config;
pub mod metrics;
pub mod peers;
pub mod report;
mod sync;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde_json::json;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::breaker::{Action, AdviceEffect, SharedBreaker, Transition, TransitionObserver};
pub use config::{FleetConfig, FleetSettings};
use metrics::Dropped;
pub use metrics::FleetMetrics;
use peers::{Peers, Via};
use report::{Command, Report, unix_ms};

/// Own reports waiting for the publisher; beyond this they are dropped (and counted).
const QUEUE_DEPTH: usize = 256;

/// Why the coordination Redis could not be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FleetError {
    #[error("cannot set up the coordination Redis connections to {addr}: {reason}")]
    Setup { addr: String, reason: String },
    #[error("coordination Redis {addr}: {reason}")]
    Unavailable { addr: String, reason: String },
    #[error("coordination Redis {addr}: no answer within {} ms", timeout.as_millis())]
    Timeout { addr: String, timeout: Duration },
}

/// Something the publisher task must write.
enum Outgoing {
    State {
        upstream: String,
        report: Report,
    },
    /// Write every latest own report again (the coordination Redis is back).
    Reannounce,
}

/// The fleet sync of one process. Cheap to clone.
#[derive(Clone)]
pub struct Fleet {
    shared: Arc<Shared>,
}

struct Shared {
    settings: FleetSettings,
    metrics: FleetMetrics,
    breakers: RwLock<BTreeMap<String, SharedBreaker>>,
    peers: Mutex<Peers>,
    outgoing: mpsc::Sender<Outgoing>,
    /// The latest own report per upstream, re-announced when sync comes back.
    own: Mutex<BTreeMap<String, Report>>,
    /// Time of the latest fleet-wide action applied, per upstream.
    actions: Mutex<BTreeMap<String, u64>>,
    status: sync::Status,
    conn: sync::Conn,
    /// Wakes the catch-up task (the subscription was re-established).
    catch_up_now: Notify,
}

/// Hands transitions to the publisher task without waiting.
struct Publisher {
    tx: mpsc::Sender<Outgoing>,
    metrics: FleetMetrics,
}

impl TransitionObserver for Publisher {
    fn transition(&self, upstream: &str, t: &Transition) {
        let out = Outgoing::State {
            upstream: upstream.to_owned(),
            report: Report::of(t, unix_ms()),
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(out) {
            self.metrics.dropped(Dropped::QueueFull);
        }
    }
}

impl Fleet {
    /// Starts the publisher, subscriber and catch-up tasks (inside a tokio runtime).
    /// Nothing is connected yet: a coordination Redis that is down at start is only
    /// reported, like one that goes away later.
    pub fn start(
        settings: FleetSettings,
        metrics: FleetMetrics,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Fleet, FleetError> {
        let conn = sync::Conn::new(&settings)?;
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        metrics.enabled.set(1);
        metrics.sync_up.set(0);
        info!(
            instance = %settings.instance_id,
            coordination = %settings.coordination.addr,
            channel = %settings.config.channel,
            "sharing breaker state with the fleet"
        );
        let fleet = Fleet {
            shared: Arc::new(Shared {
                status: sync::Status::default(),
                settings,
                metrics,
                breakers: RwLock::new(BTreeMap::new()),
                peers: Mutex::new(Peers::default()),
                outgoing: tx,
                own: Mutex::new(BTreeMap::new()),
                actions: Mutex::new(BTreeMap::new()),
                conn,
                catch_up_now: Notify::new(),
            }),
        };
        tokio::spawn(sync::publisher(fleet.clone(), rx, shutdown.clone()));
        tokio::spawn(sync::subscriber(fleet.clone(), shutdown.clone()));
        tokio::spawn(sync::catch_up(fleet.clone(), shutdown));
        Ok(fleet)
    }

    pub fn settings(&self) -> &FleetSettings {
        &self.shared.settings
    }

    /// Shares `breaker`, the breaker of `upstream`: its transitions are published and the
    /// fleet's reports about `upstream` advise it. Upstreams are matched by name across the
    /// fleet.
    pub fn register(&self, upstream: &str, breaker: &SharedBreaker) {
        breaker.set_advice_policy(self.shared.settings.policy());
        breaker.observe(Arc::new(Publisher {
            tx: self.shared.outgoing.clone(),
            metrics: self.shared.metrics.clone(),
        }));
        self.shared
            .breakers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(upstream.to_owned(), breaker.clone());
        // Learn what the fleet already knows about it.
        self.shared.catch_up_now.notify_one();
    }

    /// Stops advising the breaker of an upstream that is gone.
    pub fn unregister(&self, upstream: &str) {
        self.shared
            .breakers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(upstream);
    }

    fn breaker(&self, upstream: &str) -> Option<SharedBreaker> {
        self.shared
            .breakers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(upstream)
            .cloned()
    }

    fn upstreams(&self) -> Vec<String> {
        self.shared
            .breakers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    fn key(&self, upstream: &str) -> String {
        format!("{}:{upstream}", self.shared.settings.config.key_prefix)
    }

    /// Publishes a fleet-wide breaker action (already applied here) and stores it for
    /// instances that catch up later. Returns how many subscribers received it.
    pub async fn broadcast(&self, upstream: &str, action: Action) -> Result<u64, FleetError> {
        let command = Command {
            action: action.as_str().to_owned(),
            instance: self.shared.settings.instance_id.clone(),
            ts: unix_ms(),
        };
        // Our own message comes back on the channel: it must not apply twice.
        self.shared
            .actions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(upstream.to_owned(), command.ts);
        let result = self
            .shared
            .conn
            .write_command(self, upstream, &command)
            .await;
        self.note_control(&result);
        match &result {
            Ok(receivers) => {
                self.shared.metrics.published.inc();
                info!(upstream, action = %action, receivers, "fleet-wide breaker action published");
            }
            Err(e) => {
                warn!(upstream, action = %action, "fleet-wide breaker action applied here only: {e}")
            }
        }
        result
    }

    /// A report from another instance, from the channel or a catch-up read.
    fn on_report(&self, upstream: &str, instance: &str, report: &Report, via: Via) {
        let s = &self.shared;
        if instance == s.settings.instance_id {
            return;
        }
        let now_unix = unix_ms();
        let now = Instant::now();
        // Older than the state TTL: history, whatever the hash still holds.
        if now_unix.saturating_sub(report.ts) > s.settings.config.state_ttl_ms {
            return;
        }
        let news = s
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .note(upstream, instance, report, now_unix, via);
        if !news {
            return;
        }
        s.metrics.received(via);
        let Some(breaker) = self.breaker(upstream) else {
            return;
        };
        let Some(advice) = report.advice(instance, now_unix, now) else {
            return;
        };
        let advised = breaker.advise(advice);
        s.metrics.advice(upstream, advised.effect.as_str());
        let delay_ms = now_unix.saturating_sub(report.ts);
        match advised.effect {
            AdviceEffect::Suspect => info!(
                upstream, instance, reason = %report.reason, delay_ms, via = via.as_str(),
                "another instance reports the upstream open: probing now, the first local failure opens the breaker"
            ),
            AdviceEffect::QuorumOpen | AdviceEffect::Recovered => info!(
                upstream, instance, state = ?report.state, delay_ms, via = via.as_str(),
                "breaker moved on the fleet's report"
            ),
            AdviceEffect::Noted | AdviceEffect::Ignored => debug!(
                upstream, instance, state = ?report.state, delay_ms, via = via.as_str(),
                effect = advised.effect.as_str(), "fleet report"
            ),
        }
    }

    /// A fleet-wide action, from the channel or a catch-up read.
    fn on_command(&self, upstream: &str, command: &Command, via: Via) {
        let s = &self.shared;
        if unix_ms().saturating_sub(command.ts) > s.settings.config.state_ttl_ms {
            return;
        }
        let action = match command.action.parse::<Action>() {
            Ok(a) => a,
            Err(e) => {
                debug!(upstream, "fleet-wide action ignored: {e}");
                return;
            }
        };
        {
            let mut applied = s.actions.lock().unwrap_or_else(|e| e.into_inner());
            if applied.get(upstream).is_some_and(|&ts| command.ts <= ts) {
                return;
            }
            applied.insert(upstream.to_owned(), command.ts);
        }
        let Some(breaker) = self.breaker(upstream) else {
            return;
        };
        s.metrics.received(via);
        action.apply(&breaker);
        info!(
            upstream,
            action = %action,
            from = %command.instance,
            via = via.as_str(),
            "fleet-wide breaker action applied"
        );
    }

    /// Records how a control-plane operation went.
    fn note_control<T>(&self, r: &Result<T, FleetError>) {
        let part = r.as_ref().map(|_| ()).map_err(|e| e.to_string());
        self.set_status(sync::Part::Control, part);
    }

    fn set_status(&self, part: sync::Part, r: Result<(), String>) {
        let s = &self.shared;
        let Some(change) = s.status.set(part, r) else {
            return;
        };
        s.metrics.sync_up.set(i64::from(change.up));
        let coordination = &s.settings.coordination.addr;
        if change.up {
            if change.was_down {
                info!(%coordination, "fleet sync up again: re-announcing this instance's breaker states");
                let _ = s.outgoing.try_send(Outgoing::Reannounce);
            } else {
                info!(%coordination, "fleet sync up");
            }
        } else {
            warn!(
                %coordination,
                error = change.error.as_deref().unwrap_or("unknown"),
                "fleet sync down: breakers decide alone until the coordination Redis answers"
            );
        }
    }

    /// `GET /fleet`: this instance, the sync's health, and what was heard from the others.
    pub fn status_json(&self) -> serde_json::Value {
        let s = &self.shared;
        let st = s.status.snapshot();
        let peers = s.peers.lock().unwrap_or_else(|e| e.into_inner()).snapshot();
        json!({
            "enabled": true,
            "instance_id": s.settings.instance_id,
            "coordination": s.settings.coordination.addr,
            "channel": s.settings.config.channel,
            "key_prefix": s.settings.config.key_prefix,
            "quorum": s.settings.config.quorum,
            "window_ms": s.settings.config.window_ms,
            "sync_up": st.up == Some(true),
            "subscribed": st.channel,
            "control_plane": st.control,
            "last_error": st.last_error,
            "upstreams": self.upstreams(),
            "peers": peers,
        })
    }
}
