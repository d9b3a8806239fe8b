//! Replays writes queued during an outage once the primary's breaker closes.
//!
//! Replay runs on a connection of its own, oldest entry first, switching database with
//! `SELECT` as the entries require. An entry is acknowledged (and so removed from the journal
//! and its file) only after its reply has been read, so a failure mid-replay leaves the rest
//! queued for the next attempt: delivery is at least once, never silently dropped. While the
//! journal is not empty, client writes to the primary wait (see `Server::wait_for_replay`),
//! so queued writes land before newer ones.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::breaker::{ReplyClass, State, classify_error_reply};
use crate::error::UpstreamError;
use crate::journal::WriteQueueMetrics;
use crate::protocol::{Proto, encode_command, is_error_reply};
use crate::server::Server;
use crate::upstream::Setup;
use crate::upstream::conn::{self, roundtrip};

/// Entries sent per acknowledgement.
const BATCH: usize = 256;

pub async fn run(
    server: Arc<Server>,
    metrics: Option<WriteQueueMetrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let primary = server.primary().clone();
    let mut states = primary.breaker.subscribe();
    loop {
        let journal = &server.degrade.journal;
        // HalfOpen too: with no probe and only writes waiting on the replay, waiting for
        // Closed would wait forever.
        if !journal.is_empty() && primary.breaker.state() != State::Open {
            match replay_once(&server).await {
                Ok(n) => {
                    server
                        .replay_stalled
                        .store(false, std::sync::atomic::Ordering::Release);
                    if let Some(m) = &metrics {
                        m.replayed(n as u64);
                    }
                    info!(upstream = %primary.name(), replayed = n, "queued writes replayed");
                }
                Err(e) => {
                    server
                        .replay_stalled
                        .store(true, std::sync::atomic::Ordering::Release);
                    warn!(upstream = %primary.name(), "write queue replay stopped: {e}; will retry");
                }
            }
            server.replay_done.notify_waiters();
            if !journal.is_empty() {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = shutdown.changed() => return,
                }
            }
            continue;
        }
        tokio::select! {
            r = states.changed() => if r.is_err() { return },
            // A journal restored from disk at start-up, or filled while the state did not change.
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn replay_once(server: &Server) -> Result<usize, UpstreamError> {
    let primary = server.primary();
    let ctx = &primary.ctx;
    let journal = &server.degrade.journal;
    let mut stream = conn::open(
        ctx,
        &Setup::new(Proto::Resp2, server.config.credentials.clone()),
    )
    .await?;
    let mut buf = BytesMut::with_capacity(4096);
    let mut db = 0u32;
    let mut replayed = 0;
    loop {
        let batch = journal.peek(BATCH);
        let Some(last) = batch.last().map(|e| e.seq) else {
            return Ok(replayed);
        };
        for entry in &batch {
            if entry.db != db {
                let select =
                    encode_command(&[b"SELECT".as_slice(), entry.db.to_string().as_bytes()]);
                let reply = roundtrip(ctx, &mut stream, &select, &mut buf).await?;
                if is_error_reply(&reply) {
                    return Err(UpstreamError::unavailable(
                        primary.name(),
                        "SELECT failed during replay",
                    ));
                }
                db = entry.db;
            }
            let reply = roundtrip(ctx, &mut stream, &entry.frame, &mut buf).await?;
            if is_error_reply(&reply) {
                let text = String::from_utf8_lossy(&reply).trim_end().to_owned();
                if !matches!(classify_error_reply(&reply, true), ReplyClass::Success) {
                    // LOADING, OOM, READONLY, NOAUTH ...: Redis did not take the write and may
                    // later; keep it queued and stop this pass.
                    return Err(UpstreamError::unavailable(
                        primary.name(),
                        format!("replayed write refused for now ({text}); kept queued"),
                    ));
                }
                // The write ran and Redis refused it (WRONGTYPE ...): retrying cannot help.
                warn!(seq = entry.seq, reply = %text, "replayed write failed");
            }
            journal
                .ack(entry.seq)
                .map_err(|e| UpstreamError::unavailable(primary.name(), format!("journal: {e}")))?;
            replayed += 1;
        }
        debug_assert!(journal.peek(1).first().is_none_or(|e| e.seq > last));
    }
}
