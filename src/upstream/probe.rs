//! Active health probe: a `PING` per upstream on a connection of its own.
//!
//! The probe feeds the same breaker as client traffic, so an idle sidecar still notices that
//! Redis went away, and recovery does not wait for a client to risk a request. When the
//! breaker's timer moves it to HalfOpen the probe runs at once (not at its next tick) and
//! keeps probing while HalfOpen, so a recovered Redis closes the breaker within the open
//! period plus a few round trips. A successful probe after a failure also wakes the shared
//! connections out of their reconnect back-off.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use prometheus::IntCounter;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::debug;

use super::Upstream;
use super::conn::{self, Setup, outcome_of_error, roundtrip};
use crate::breaker::{ReplyClass, State, classify_error_reply};
use crate::config::Credentials;
use crate::error::UpstreamError;
use crate::protocol::{Proto, is_error_reply};

/// Per-upstream probe counters: `redfuse_health_probe_total{upstream,result}`.
#[derive(Clone)]
pub struct ProbeMetrics {
    pub success: IntCounter,
    pub failure: IntCounter,
    /// The breaker did not admit the probe (Open, or HalfOpen permits taken).
    pub skipped: IntCounter,
}

const PING: &[u8] = b"*1\r\n$4\r\nPING\r\n";

pub async fn run(
    upstream: Arc<Upstream>,
    credentials: Option<Credentials>,
    interval: Duration,
    metrics: ProbeMetrics,
    mut shutdown: watch::Receiver<bool>,
) {
    let ctx = upstream.ctx.clone();
    let mut states = upstream.breaker.subscribe();
    let setup = Setup::new(Proto::Resp2, credentials);
    let mut stream: Option<TcpStream> = None;
    let mut buf = BytesMut::with_capacity(256);
    let mut next = Instant::now();
    let mut was_failing = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            r = states.changed() => {
                if r.is_err() {
                    return;
                }
                if *states.borrow_and_update() != State::HalfOpen {
                    continue;
                }
            }
            _ = shutdown.changed() => return,
        }
        next = Instant::now() + interval;
        let Ok(guard) = upstream.breaker.try_acquire() else {
            metrics.skipped.inc();
            continue;
        };
        let result = async {
            // A kept connection may have died with the old server: one retry on a new one, so
            // a restarted Redis is not judged by its predecessor's socket.
            if let Some(s) = stream.as_mut() {
                buf.clear();
                match roundtrip(&ctx, s, PING, &mut buf).await {
                    Ok(reply) => return Ok(reply),
                    Err(UpstreamError::Timeout { upstream, timeout }) => {
                        return Err(UpstreamError::Timeout { upstream, timeout });
                    }
                    Err(_) => stream = None,
                }
            }
            let s = stream.insert(conn::open(&ctx, &setup).await?);
            buf.clear();
            roundtrip(&ctx, s, PING, &mut buf).await
        }
        .await;
        match result {
            Ok(reply) => {
                let class = if is_error_reply(&reply) {
                    classify_error_reply(&reply, false)
                } else {
                    ReplyClass::Success
                };
                let healthy = !matches!(class, ReplyClass::Failure(_));
                let latency = guard.elapsed();
                guard.complete(class.outcome(latency));
                if healthy {
                    metrics.success.inc();
                    if was_failing {
                        debug!(upstream = %ctx.name, "health probe succeeded again; waking reconnects");
                        ctx.reconnect.notify_waiters();
                    }
                    was_failing = false;
                } else {
                    metrics.failure.inc();
                    was_failing = true;
                }
            }
            Err(e) => {
                debug!(upstream = %ctx.name, "health probe failed: {e}");
                guard.complete(outcome_of_error(&e));
                metrics.failure.inc();
                stream = None;
                was_failing = true;
            }
        }
        // While half-open, keep probing back to back: each success counts toward closing.
        if upstream.breaker.state() == State::HalfOpen {
            next = Instant::now();
        }
    }
}
