//! Replays queued writes once the primary's breaker is no longer open.
//!
//! Each entry is sent on a connection authenticated as the identity that queued it (one
//! connection per identity, opened as needed), after a `SELECT` of its database. An entry
//! leaves the journal only once Redis has answered it: acknowledged when Redis took it,
//! dead-lettered when Redis refused it for good, kept (and the pass stopped) when the
//! refusal may pass (see the module docs of `writequeue`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use super::WriteQueue;
use super::journal::Entry;
use crate::auth::Credentials;
use crate::breaker::State;
use crate::command::classify;
use crate::effect::{EffectSink, ReplyEffect, Written};
use crate::error::UpstreamError;
use crate::resp::{ErrorCode, Limits, Proto, encode_command, parse_request};
use crate::upstream::handshake::{open, roundtrip};
use crate::upstream::tls::UpstreamStream;
use crate::upstream::{Setup, Upstream};

/// Entries read from the journal at a time.
const BATCH: usize = 256;

/// Replays whenever there is something to replay and the primary's breaker allows it;
/// returns on shutdown.
pub async fn run(
    queue: Arc<WriteQueue>,
    primary: Arc<Upstream>,
    own: Option<Arc<Credentials>>,
    sink: Arc<dyn EffectSink>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut states = primary.breaker.subscribe();
    let mut oom_since: Option<(u64, Instant)> = None;
    loop {
        // HalfOpen too: with no probe and only writes waiting on the replay, waiting for
        // Closed would wait forever.
        if !queue.is_empty() && primary.breaker.state() != State::Open {
            let mut pass = Pass {
                queue: &queue,
                primary: &primary,
                own: &own,
                sink: &*sink,
                conns: HashMap::new(),
                oom_since: &mut oom_since,
                replayed: 0,
            };
            let result = pass.run().await;
            let replayed = pass.replayed;
            match result {
                Ok(()) => {
                    queue.pass_ended(false);
                    info!(upstream = %primary.name(), replayed, "queued writes replayed");
                }
                Err(e) => {
                    queue.pass_ended(true);
                    warn!(upstream = %primary.name(), replayed, "write queue replay stopped: {e}; will retry");
                }
            }
            if let Some(m) = queue.journal.metrics() {
                m.replayed(replayed as u64);
            }
            if !queue.is_empty() {
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

/// One replay pass over the journal.
struct Pass<'a> {
    queue: &'a WriteQueue,
    primary: &'a Upstream,
    own: &'a Option<Arc<Credentials>>,
    /// Told about every replayed write, so the cache forgets the values it changed.
    sink: &'a dyn EffectSink,
    /// A connection per identity (`None`: redfuse's own), with its selected database.
    conns: HashMap<Option<Bytes>, (UpstreamStream, u32)>,
    /// The entry Redis has been refusing with `OOM`, and since when.
    oom_since: &'a mut Option<(u64, Instant)>,
    replayed: usize,
}

/// How one entry went.
enum Outcome {
    /// Redis took it, with this reply.
    Done(Bytes),
    /// Redis refused it for good: to the dead letters, with a reason class.
    Dead(String, &'static str),
    /// Redis refused it for now: the pass stops.
    Later(String),
}

impl Pass<'_> {
    async fn run(&mut self) -> Result<(), UpstreamError> {
        loop {
            let batch = self.queue.journal.peek(BATCH);
            if batch.is_empty() {
                return Ok(());
            }
            for entry in &batch {
                match self.replay(entry).await? {
                    Outcome::Done(reply) => {
                        self.ack(entry.seq)?;
                        self.replayed += 1;
                        self.replayed_effect(entry, reply);
                    }
                    Outcome::Dead(reason, class) => {
                        self.queue
                            .dead_letter(entry, &reason, class)
                            .map_err(|e| self.journal_error(e))?;
                    }
                    Outcome::Later(reason) => {
                        return Err(UpstreamError::unavailable(
                            self.primary.name(),
                            format!("replayed write refused for now ({reason}); kept queued"),
                        ));
                    }
                }
            }
        }
    }

    /// The write is in Redis now: the cache's view of its keys is outdated for everyone.
    fn replayed_effect(&self, entry: &Entry, reply: Bytes) {
        let mut buf = BytesMut::from(&entry.frame[..]);
        let Ok(Some(request)) = parse_request(&mut buf, &Limits::default()) else {
            return;
        };
        let identity = match &entry.identity {
            Some(name) if !name.is_empty() => {
                self.queue.identities.intern(&String::from_utf8_lossy(name))
            }
            _ => crate::auth::IdentityId::ANONYMOUS,
        };
        let written = Written {
            db: Some(entry.db),
            identity,
            class: classify(&request.args),
            request,
            sent: Instant::now(),
            ticket: None,
        };
        self.sink
            .apply(ReplyEffect::Replayed(Box::new(written)), &mut Ok(reply));
    }

    fn ack(&self, seq: u64) -> Result<(), UpstreamError> {
        self.queue.done(seq).map_err(|e| self.journal_error(e))
    }

    fn journal_error(&self, e: impl std::fmt::Display) -> UpstreamError {
        UpstreamError::unavailable(self.primary.name(), format!("journal: {e}"))
    }

    /// The credentials to replay an entry with: its client's own while redfuse holds them;
    /// after a restart, redfuse's own for its own user, or those the user authenticated
    /// with last since the restart; `Err` with the reason when there are none.
    fn credentials(&self, entry: &Entry) -> Result<Option<Arc<Credentials>>, String> {
        if let Some(c) = self.queue.credentials_of(entry.seq) {
            return Ok(Some(c));
        }
        let Some(name) = &entry.identity else {
            return Ok(self.own.clone());
        };
        if name.is_empty() {
            return Ok(None);
        }
        let user = String::from_utf8_lossy(name);
        let id = self.queue.identities.intern(&user);
        if let Some(c) = self.queue.identities.credentials(id) {
            return Ok(Some(c));
        }
        match self.own {
            Some(own) if own.user() == user => Ok(Some(own.clone())),
            _ => Err(format!(
                "credentials of user '{user}' are no longer known (redfuse restarted since the write was queued)"
            )),
        }
    }

    async fn replay(&mut self, entry: &Entry) -> Result<Outcome, UpstreamError> {
        let credentials = match self.credentials(entry) {
            Ok(c) => c,
            Err(reason) => return Ok(Outcome::Dead(reason, "identity")),
        };
        let ctx = &self.primary.ctx;
        let slot = entry.identity.clone();
        if !self.conns.contains_key(&slot) {
            match open(ctx, &Setup::new(Proto::Resp2, credentials)).await {
                Ok(stream) => {
                    self.conns.insert(slot.clone(), (stream, 0));
                }
                // The identity itself is refused: nothing of it can be replayed.
                Err(UpstreamError::Auth { reply, .. }) => {
                    return Ok(Outcome::Dead(reply.to_string(), "auth"));
                }
                Err(e) => return Err(e),
            }
        }
        let mut buf = BytesMut::with_capacity(4096);
        let (stream, db) = self.conns.get_mut(&slot).expect("opened above");
        if entry.db != *db {
            let select = encode_command(&[b"SELECT".as_slice(), entry.db.to_string().as_bytes()]);
            let reply = roundtrip(ctx, stream, &select, &mut buf, ctx.command_timeout).await?;
            if crate::resp::is_error_reply(&reply) {
                let text = String::from_utf8_lossy(&reply).into_owned();
                return Ok(Outcome::Dead(text, "error"));
            }
            *db = entry.db;
        }
        let reply = match roundtrip(ctx, stream, &entry.frame, &mut buf, ctx.command_timeout).await
        {
            Ok(r) => r,
            Err(e) => {
                self.conns.remove(&slot);
                return Err(e);
            }
        };
        let text = || String::from_utf8_lossy(&reply).trim_end().to_owned();
        Ok(match ErrorCode::of(&reply) {
            ErrorCode::NotAnError => {
                *self.oom_since = None;
                Outcome::Done(reply)
            }
            ErrorCode::Loading
            | ErrorCode::Busy
            | ErrorCode::MasterDown
            | ErrorCode::ClusterDown
            | ErrorCode::TryAgain
            | ErrorCode::ReadOnly => Outcome::Later(text()),
            ErrorCode::Oom => {
                let since = match *self.oom_since {
                    Some((seq, at)) if seq == entry.seq => at,
                    _ => {
                        *self.oom_since = Some((entry.seq, Instant::now()));
                        Instant::now()
                    }
                };
                if since.elapsed() >= super::OOM_PATIENCE {
                    *self.oom_since = None;
                    Outcome::Dead(text(), "oom")
                } else {
                    Outcome::Later(text())
                }
            }
            ErrorCode::NoAuth | ErrorCode::WrongPass => Outcome::Dead(text(), "auth"),
            ErrorCode::NoPerm => Outcome::Dead(text(), "permission"),
            ErrorCode::WrongType => Outcome::Dead(text(), "wrongtype"),
            ErrorCode::MaxClients | ErrorCode::Other | ErrorCode::Malformed => {
                Outcome::Dead(text(), "error")
            }
        })
    }
}
