//! Active health probe: a `PING` per upstream on a connection of its own.
//!
//! The probe feeds the same breaker as client traffic, so an idle sidecar still notices that
//! Redis went away, and recovery does not wait for a client to risk a request. When the
//! breaker's timer moves it to HalfOpen the probe runs at once (not at its next tick) and
//! keeps probing while HalfOpen, so a recovered Redis closes the breaker within the open
//! period plus a few round trips. A successful probe after a failure also wakes the shared
//! connections out of their reconnect back-off.
//!
//! What the probe judges is whether the server *answers*. A server that refuses the
//! probe's credentials (`NOAUTH`, `WRONGPASS`) or this one connection (`max number of
//! clients`) is up: with redfuse's own credentials refused it is *up, misconfigured*
//! (logged, `redfuse_upstream_misconfigured`, shown by `/ready`), which an open breaker
//! would only hide. While the breaker is Open because the server said `-BUSY` or
//! `-LOADING`, the probe keeps asking, and the first normal answer starts probing at once.
//!
//! # Noticing a frozen server
//!
//! A frozen or black-holed Redis (SIGSTOP, a paused VM, a dropped NAT entry) refuses
//! nothing: connections hang. Client traffic alone would notice one command timeout at a
//! time, so the probe has its own short timeout (`health_probe_timeout_ms`, 1.2 s), and
//! `probe_failures_to_open` (1) silent probes open the breaker: within the probe interval
//! plus its timeout of the freeze, traffic or not. A command that is slow by nature (a
//! script, `KEYS`, `DEBUG SLEEP`, a whole-collection read: `command::LONG_RUNNING`)
//! waiting on Redis excuses a silent probe, for at most the command timeout, so legitimately
//! slow commands do not open the breaker by themselves. Everyday commands that Redis merely
//! does not flag `FAST` (`SET`, `DEL`, `MSET`) do not excuse it: with one of those always in
//! flight, a frozen Redis would be noticed only at the command timeout.
//!
//! When a silent probe opens the breaker, the commands waiting on the server's connections
//! are failed at once (reads fall back to the cache) instead of each waiting out the command
//! timeout.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use prometheus::IntCounter;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::Upstream;
use super::conn::outcome_of_error;
use super::handshake::{Setup, open, roundtrip};
use super::tls::UpstreamStream;
use crate::auth::Credentials;
use crate::breaker::{FailureKind, Outcome, State};
use crate::error::UpstreamError;
use crate::resp::{ErrorCode, Proto};

/// Per-upstream probe counters: `redfuse_health_probe_total{upstream,result}`.
#[derive(Clone)]
pub struct ProbeMetrics {
    pub success: IntCounter,
    pub failure: IntCounter,
    /// The breaker did not admit the probe (HalfOpen permits taken).
    pub skipped: IntCounter,
}

const PING: &[u8] = b"*1\r\n$4\r\nPING\r\n";

/// What one probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Health {
    Up,
    /// Up, but refusing redfuse's own credentials.
    Misconfigured(String),
    Down(Outcome),
    /// No answer within the probe timeout.
    Silent,
}

/// How often and how patiently the probe asks.
#[derive(Debug, Clone, Copy)]
pub struct ProbeTiming {
    pub interval: Duration,
    /// No answer within this (connect, handshake and `PING`) is a failed probe.
    pub timeout: Duration,
}

pub async fn run(
    upstream: Arc<Upstream>,
    credentials: Option<Arc<Credentials>>,
    timing: ProbeTiming,
    metrics: ProbeMetrics,
    mut shutdown: watch::Receiver<bool>,
) {
    let interval = timing.interval;
    let ctx = upstream.ctx.clone();
    let mut states = upstream.breaker.subscribe();
    let setup = Setup::new(Proto::Resp2, credentials);
    let mut stream: Option<UpstreamStream> = None;
    let mut buf = BytesMut::with_capacity(256);
    let mut next = Instant::now();
    let mut was_failing = false;
    // Failed probes in a row (within one breaker generation: a transition starts the count
    // again), and since when failures have been excused by a slow command.
    let mut failures = 0u32;
    let mut counted_in = upstream.breaker.generation();
    let mut excused_since: Option<Instant> = None;
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
            // Fleet advice: another instance saw this upstream fail.
            _ = upstream.breaker.probe_wanted() => {}
            _ = shutdown.changed() => return,
        }
        next = Instant::now() + interval;
        // Read before the permit is taken: a probe admitted just before a transition
        // belongs to the generation before it.
        let began = upstream.breaker.generation();
        if began != counted_in {
            failures = 0;
            counted_in = began;
        }
        let guard = match upstream.breaker.try_acquire() {
            Ok(g) => Some(g),
            // Open: ask anyway, without a permit; only a recovery from the server's own
            // condition acts on the answer.
            Err(_) if upstream.breaker.state() == State::Open => None,
            Err(_) => {
                metrics.skipped.inc();
                continue;
            }
        };
        let started = Instant::now();
        let health = match tokio::time::timeout(
            timing.timeout,
            probe_once(&upstream, &setup, &mut stream, &mut buf),
        )
        .await
        {
            Ok(h) => h,
            Err(_) => {
                // The connection may still owe this PING's answer: start afresh.
                stream = None;
                Health::Silent
            }
        };
        match &health {
            Health::Misconfigured(why) => {
                if ctx.misconfigured().as_deref() != Some(why.as_str()) {
                    warn!(upstream = %ctx.name, reply = %why, "upstream is up but refuses redfuse's credentials; check username/password");
                }
                ctx.set_misconfigured(Some(why.clone()));
            }
            Health::Up => ctx.set_misconfigured(None),
            Health::Down(_) | Health::Silent => {}
        }
        // No answer while a command slow by nature waits on Redis: Redis is presumably busy
        // with it, and that command's own timeout decides (for at most that long).
        let excused = health == Health::Silent
            && ctx.slow_in_flight.load(Ordering::Relaxed) > 0
            && excused_since.get_or_insert_with(Instant::now).elapsed() < ctx.command_timeout;
        let outcome = match &health {
            Health::Up | Health::Misconfigured(_) => Outcome::Success {
                latency: started.elapsed(),
            },
            Health::Silent if excused => Outcome::Ignored,
            Health::Silent => Outcome::Failure(FailureKind::CommandTimeout),
            Health::Down(o) => *o,
        };
        // The breaker moved while this probe was out (client traffic closed it, say, while
        // the probe waited on a black-holed connection): it judged a state that is gone, so
        // it does not count (see `Breaker::probes_failed`), and the next probe counts anew.
        let moved = upstream.breaker.generation() != began;
        match guard {
            Some(g) => g.complete(outcome),
            None if matches!(outcome, Outcome::Success { .. }) => {
                upstream.breaker.server_recovered();
            }
            None => {}
        }
        if let Outcome::Failure(kind) = outcome {
            if !moved {
                failures += 1;
                upstream.breaker.probes_failed(failures, kind, began);
            }
            // Frozen: the commands waiting on it would each wait out the command timeout,
            // and a client waiting on one sends nothing the open breaker could answer.
            if health == Health::Silent && upstream.breaker.state() == State::Open {
                ctx.silent.notify_waiters();
            }
        } else if !excused {
            failures = 0;
            excused_since = None;
        }
        if matches!(health, Health::Down(_) | Health::Silent) {
            metrics.failure.inc();
            was_failing = true;
        } else {
            metrics.success.inc();
            if was_failing {
                debug!(upstream = %ctx.name, "health probe succeeded again; waking reconnects");
                ctx.reconnect.notify_waiters();
            }
            was_failing = false;
        }
        // While half-open, keep probing back to back: each success counts toward closing.
        if upstream.breaker.state() == State::HalfOpen {
            next = Instant::now();
        }
    }
}

async fn probe_once(
    upstream: &Upstream,
    setup: &Setup,
    stream: &mut Option<UpstreamStream>,
    buf: &mut BytesMut,
) -> Health {
    let ctx = &upstream.ctx;
    let injected = match crate::drill::inject::armed() {
        true => crate::drill::inject::probe(ctx).await,
        false => None,
    };
    let result = async {
        match injected {
            Some(crate::drill::inject::ProbeFault::Reply(frame)) => return Ok(frame),
            Some(crate::drill::inject::ProbeFault::Refused(e)) => return Err(e),
            None => {}
        }
        // A kept connection may have died with the old server: one retry on a new one, so
        // a restarted Redis is not judged by its predecessor's socket.
        if let Some(s) = stream.as_mut() {
            buf.clear();
            match roundtrip(ctx, s, PING, buf, ctx.command_timeout).await {
                Ok(reply) => return Ok(reply),
                Err(e @ UpstreamError::Timeout { .. }) => return Err(e),
                Err(_) => *stream = None,
            }
        }
        let s = stream.insert(open(ctx, setup).await?);
        buf.clear();
        roundtrip(ctx, s, PING, buf, ctx.command_timeout).await
    }
    .await;
    match result {
        Ok(reply) => match ErrorCode::of(&reply) {
            ErrorCode::NotAnError => Health::Up,
            ErrorCode::Busy => {
                ctx.note_busy();
                Health::Down(Outcome::Failure(FailureKind::Busy))
            }
            ErrorCode::Loading => Health::Down(Outcome::Failure(FailureKind::Loading)),
            ErrorCode::MasterDown => Health::Down(Outcome::Failure(FailureKind::MasterDown)),
            ErrorCode::ClusterDown => Health::Down(Outcome::Failure(FailureKind::ClusterDown)),
            ErrorCode::TryAgain => Health::Down(Outcome::Failure(FailureKind::TryAgain)),
            ErrorCode::Malformed => Health::Down(Outcome::Failure(FailureKind::MalformedReply)),
            // An answer, whatever it says.
            _ => Health::Up,
        },
        Err(UpstreamError::Auth { reply, .. }) => {
            *stream = None;
            match &setup.credentials {
                Some(_) => Health::Misconfigured(reply.to_string()),
                // No credentials: Redis requires them of clients, which is theirs to give.
                None => {
                    ctx.anonymous_denied.store(true, Ordering::Relaxed);
                    Health::Up
                }
            }
        }
        // It answered: full for this connection, not down.
        Err(UpstreamError::Refused { .. }) => {
            *stream = None;
            Health::Up
        }
        // Connected, but no answer to the handshake or the PING: as silent as a probe
        // that ran out of its own time (and excused the same way by a slow command).
        Err(UpstreamError::Timeout { .. }) => {
            *stream = None;
            Health::Silent
        }
        Err(e) => {
            debug!(upstream = %ctx.name, "health probe failed: {e}");
            *stream = None;
            Health::Down(outcome_of_error(&e))
        }
    }
}
