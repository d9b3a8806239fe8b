//! The fleet's background tasks and their connections to the coordination Redis.
//!
//! Every operation has the `fleet.timeout_ms` deadline: a black-holed coordination Redis
//! must cost a bounded wait in these tasks, and nothing at all elsewhere.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use deadpool_redis::{Manager, Pool, Runtime};
use futures_util::StreamExt;
use redis::{AsyncConnectionConfig, IntoConnectionInfo, RedisConnectionInfo};
use tokio::sync::{mpsc, watch};
use tracing::debug;

use super::peers::Via;
use super::report::{Command, FLEET_FIELD, Message, Report};
use super::{Fleet, FleetError, FleetSettings, Outgoing};
use crate::fleet::metrics::Dropped;

/// The two halves of the sync's health: hash reads and writes, and the subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Control,
    Channel,
}

#[derive(Debug, Default, Clone)]
pub struct StatusSnapshot {
    pub control: Option<bool>,
    pub channel: Option<bool>,
    /// Both up: `Some(true)`; either down: `Some(false)`; not known yet: `None`.
    pub up: Option<bool>,
    pub last_error: Option<String>,
}

/// A change of the overall state, to log once.
pub struct Change {
    pub up: bool,
    pub was_down: bool,
    pub error: Option<String>,
}

#[derive(Default)]
pub struct Status(Mutex<StatusSnapshot>);

impl Status {
    /// Records one outcome; returns the overall change it caused, if any.
    pub fn set(&self, part: Part, r: Result<(), String>) -> Option<Change> {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let ok = r.is_ok();
        match part {
            Part::Control => s.control = Some(ok),
            Part::Channel => s.channel = Some(ok),
        }
        if let Err(e) = r {
            s.last_error = Some(e);
        }
        let up = match (s.control, s.channel) {
            (Some(false), _) | (_, Some(false)) => Some(false),
            (Some(true), Some(true)) => Some(true),
            _ => None,
        };
        let before = s.up;
        if up.is_none() || up == before {
            return None;
        }
        s.up = up;
        Some(Change {
            up: up == Some(true),
            was_down: before == Some(false),
            error: s.last_error.clone(),
        })
    }

    pub fn snapshot(&self) -> StatusSnapshot {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The coordination Redis: a small pool for hash reads and writes, and a client for the
/// subscription.
pub struct Conn {
    pool: Pool,
    client: redis::Client,
    addr: String,
    timeout: Duration,
    channel: String,
    ttl_ms: i64,
}

impl Conn {
    pub fn new(settings: &FleetSettings) -> Result<Conn, FleetError> {
        let c = &settings.coordination;
        let setup = |reason: String| FleetError::Setup {
            addr: c.addr.clone(),
            reason,
        };
        let mut redis_settings = RedisConnectionInfo::default().set_skip_set_lib_name();
        if let Some(u) = &c.username {
            redis_settings = redis_settings.set_username(u);
        }
        if let Some(p) = &c.password {
            redis_settings = redis_settings.set_password(p);
        }
        let info = (c.host.clone(), c.port)
            .into_connection_info()
            .map_err(|e| setup(e.to_string()))?
            .set_redis_settings(redis_settings);
        let timeout = settings.timeout();
        let manager = Manager::new_with_config(
            info.clone(),
            AsyncConnectionConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout)),
        )
        .map_err(|e| setup(e.to_string()))?;
        let pool = Pool::builder(manager)
            .max_size(2)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .recycle_timeout(Some(timeout))
            .build()
            .map_err(|e| setup(e.to_string()))?;
        let client = redis::Client::open(info).map_err(|e| setup(e.to_string()))?;
        Ok(Conn {
            pool,
            client,
            addr: c.addr.clone(),
            timeout,
            channel: settings.config.channel.clone(),
            ttl_ms: settings.config.state_ttl_ms as i64,
        })
    }

    /// Runs `op` on a pooled connection within the deadline.
    async fn with_conn<T, F, Fut>(&self, op: F) -> Result<T, FleetError>
    where
        F: FnOnce(deadpool_redis::Connection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let work = async {
            let conn = self
                .pool
                .get()
                .await
                .map_err(|e| self.unavailable(e.to_string()))?;
            op(conn).await.map_err(|e| self.unavailable(e.to_string()))
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(FleetError::Timeout {
                addr: self.addr.clone(),
                timeout: self.timeout,
            }),
        }
    }

    fn unavailable(&self, reason: String) -> FleetError {
        FleetError::Unavailable {
            addr: self.addr.clone(),
            reason,
        }
    }

    /// `HSET` + `PEXPIRE` + `PUBLISH` in one round trip; returns the receivers.
    async fn write(
        &self,
        key: String,
        field: String,
        value: String,
        message: String,
    ) -> Result<u64, FleetError> {
        let (channel, ttl) = (self.channel.clone(), self.ttl_ms);
        self.with_conn(|mut c| async move {
            let (receivers,): (u64,) = redis::pipe()
                .hset(&key, &field, &value)
                .ignore()
                .pexpire(&key, ttl)
                .ignore()
                .publish(&channel, &message)
                .query_async(&mut c)
                .await?;
            Ok(receivers)
        })
        .await
    }

    pub async fn write_state(
        &self,
        fleet: &Fleet,
        upstream: &str,
        report: &Report,
    ) -> Result<u64, FleetError> {
        let instance = fleet.shared.settings.instance_id.clone();
        let value = serde_json::to_string(report).unwrap_or_default();
        let message = Message::State {
            instance: instance.clone(),
            upstream: upstream.to_owned(),
            report: report.clone(),
        };
        self.write(fleet.key(upstream), instance, value, message.encode())
            .await
    }

    pub async fn write_command(
        &self,
        fleet: &Fleet,
        upstream: &str,
        command: &Command,
    ) -> Result<u64, FleetError> {
        let value = serde_json::to_string(command).unwrap_or_default();
        let message = Message::Command {
            upstream: upstream.to_owned(),
            command: command.clone(),
        };
        self.write(
            fleet.key(upstream),
            FLEET_FIELD.to_owned(),
            value,
            message.encode(),
        )
        .await
    }

    async fn read_hash(&self, key: String) -> Result<HashMap<String, String>, FleetError> {
        self.with_conn(
            |mut c| async move { redis::cmd("HGETALL").arg(&key).query_async(&mut c).await },
        )
        .await
    }

    async fn ping(&self) -> Result<(), FleetError> {
        self.with_conn(|mut c| async move {
            let _: String = redis::cmd("PING").query_async(&mut c).await?;
            Ok(())
        })
        .await
    }
}

/// Writes own transitions, oldest first.
pub async fn publisher(
    fleet: Fleet,
    mut rx: mpsc::Receiver<Outgoing>,
    mut shutdown: watch::Receiver<bool>,
) {
    let s = fleet.shared.clone();
    loop {
        let out = tokio::select! {
            out = rx.recv() => match out {
                Some(o) => o,
                None => return,
            },
            _ = shutdown.changed() => return,
        };
        let batch: Vec<(String, Report)> = match out {
            Outgoing::State { upstream, report } => {
                s.own
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(upstream.clone(), report.clone());
                vec![(upstream, report)]
            }
            Outgoing::Reannounce => s
                .own
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(u, r)| (u.clone(), r.clone()))
                .collect(),
        };
        for (upstream, report) in batch {
            let r = s.conn.write_state(&fleet, &upstream, &report).await;
            match &r {
                Ok(receivers) => {
                    s.metrics.published.inc();
                    debug!(upstream, state = ?report.state, receivers, "breaker state published to the fleet");
                }
                Err(e) => {
                    s.metrics.dropped(Dropped::SyncDown);
                    debug!(upstream, "breaker state not published: {e}");
                }
            }
            fleet.note_control(&r);
        }
    }
}

/// Keeps a subscription to the channel, re-established after any failure.
pub async fn subscriber(fleet: Fleet, mut shutdown: watch::Receiver<bool>) {
    let s = fleet.shared.clone();
    let timeout = s.conn.timeout;
    let interval = s.settings.catch_up_interval();
    let retry = interval.min(Duration::from_secs(1));
    loop {
        let connect = async {
            let pubsub = s.conn.client.get_async_pubsub().await?;
            let (mut sink, stream) = pubsub.split();
            sink.subscribe(&s.conn.channel).await?;
            redis::RedisResult::Ok((sink, stream))
        };
        let why = match tokio::time::timeout(timeout, connect).await {
            Ok(Ok((mut sink, mut stream))) => {
                fleet.set_status(Part::Channel, Ok(()));
                // Whatever was sent while we were away is in the hashes.
                s.catch_up_now.notify_one();
                loop {
                    tokio::select! {
                        msg = stream.next() => match msg {
                            Some(msg) => on_message(&fleet, msg.get_payload_bytes()),
                            None => break "the subscription connection closed".to_owned(),
                        },
                        // A silent server (black hole) never closes the stream: ask it.
                        _ = tokio::time::sleep(interval) => {
                            match tokio::time::timeout(timeout, sink.ping::<redis::Value>()).await {
                                Ok(Ok(_)) => {}
                                Ok(Err(e)) => break e.to_string(),
                                Err(_) => break format!("no answer to PING within {} ms", timeout.as_millis()),
                            }
                        }
                        _ = shutdown.changed() => return,
                    }
                }
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("cannot subscribe within {} ms", timeout.as_millis()),
        };
        fleet.set_status(Part::Channel, Err(format!("{}: {why}", s.conn.addr)));
        tokio::select! {
            _ = tokio::time::sleep(retry) => {}
            _ = shutdown.changed() => return,
        }
    }
}

fn on_message(fleet: &Fleet, payload: &[u8]) {
    match Message::decode(payload) {
        Ok(Message::State {
            instance,
            upstream,
            report,
        }) => fleet.on_report(&upstream, &instance, &report, Via::Channel),
        Ok(Message::Command { upstream, command }) => {
            fleet.on_command(&upstream, &command, Via::Channel)
        }
        Err(e) => debug!("fleet channel: not a fleet message: {e}"),
    }
}

/// Reads every hash at start, every `catch_up_interval_ms`, and when woken.
pub async fn catch_up(fleet: Fleet, mut shutdown: watch::Receiver<bool>) {
    let s = fleet.shared.clone();
    let interval = s.settings.catch_up_interval();
    loop {
        let r = catch_up_once(&fleet).await;
        fleet.note_control(&r);
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = s.catch_up_now.notified() => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn catch_up_once(fleet: &Fleet) -> Result<(), FleetError> {
    let s = &fleet.shared;
    let upstreams = fleet.upstreams();
    if upstreams.is_empty() {
        return s.conn.ping().await;
    }
    for upstream in upstreams {
        let entries = s.conn.read_hash(fleet.key(&upstream)).await?;
        for (field, value) in entries {
            if field == FLEET_FIELD {
                match serde_json::from_str::<Command>(&value) {
                    Ok(c) => fleet.on_command(&upstream, &c, Via::CatchUp),
                    Err(e) => debug!(upstream, "fleet hash: bad {FLEET_FIELD}: {e}"),
                }
                continue;
            }
            match serde_json::from_str::<Report>(&value) {
                Ok(r) => fleet.on_report(&upstream, &field, &r, Via::CatchUp),
                Err(e) => debug!(upstream, instance = field, "fleet hash: bad report: {e}"),
            }
        }
    }
    s.peers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .prune(super::report::unix_ms(), s.settings.config.state_ttl_ms);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_changes_once_per_transition_not_per_attempt() {
        let s = Status::default();
        assert!(
            s.set(Part::Control, Ok(())).is_none(),
            "channel not known yet"
        );
        let c = s.set(Part::Channel, Ok(())).expect("up");
        assert!(c.up && !c.was_down);
        assert!(s.set(Part::Control, Ok(())).is_none());
        let c = s.set(Part::Control, Err("refused".into())).expect("down");
        assert!(!c.up);
        assert_eq!(c.error.as_deref(), Some("refused"));
        assert!(
            s.set(Part::Control, Err("refused".into())).is_none(),
            "once"
        );
        assert!(
            s.set(Part::Channel, Err("closed".into())).is_none(),
            "still down"
        );
        assert!(
            s.set(Part::Control, Ok(())).is_none(),
            "the channel is still down"
        );
        let c = s.set(Part::Channel, Ok(())).expect("up again");
        assert!(c.up && c.was_down);
        assert_eq!(s.snapshot().up, Some(true));
    }
}
