//! Replays queued writes once the primary's breaker is no longer open.
//!
//! Entries are sent on a connection authenticated as the identity that queued them (one
//! connection per identity, opened as needed), after a `SELECT` of their database. An entry
//! leaves the journal only once Redis has answered it: acknowledged when Redis took it,
//! dead-lettered when Redis refused it for good, kept (and the pass stopped) when the
//! refusal may pass (see the module docs of `writequeue`).
//!
//! # Transactions and the cursor
//!
//! Consecutive entries of one identity and database go as one pipelined transaction:
//!
//! ```text
//! MULTI | entry ... entry | SET <cursor key> <epoch>:<last seq> PX <a week> | EXEC
//! ```
//!
//! One round trip per [`TX_ENTRIES`] writes instead of one per write, and exactly once:
//! Redis applies the transaction, cursor included, entirely or not at all, so when its
//! outcome is lost (the connection reset before `EXEC`'s reply, redfuse killed before the
//! journal's ack reached the disk) the next pass reads the cursor first and acknowledges
//! what it covers instead of sending it again. The epoch tells this journal's run of seqs
//! from an earlier one's (see `journal`).
//!
//! Order survives refusals: a write Redis refuses while queueing it (`OOM`, `LOADING`,
//! `NOPERM`, a wrong arity ...) aborts the whole transaction (`EXECABORT`), so nothing
//! after it ran either; it is dead-lettered or waited for, and the rest is sent again.
//! A write that fails while running (`WRONGTYPE`) changed nothing, Redis ran the others,
//! and it is dead-lettered.
//!
//! An identity that may not use `MULTI` or the cursor key (ACL) replays one write at a
//! time, at least once: a write whose reply was lost is sent again. Operators who want
//! exactly once for such users grant them `+multi +exec ~redfuse:replay:*`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
use crate::resp::scan::split_aggregate;
use crate::resp::{ErrorCode, Limits, Proto, ReplyScanner, encode_command, parse_request};
use crate::upstream::handshake::open;
use crate::upstream::tls::UpstreamStream;
use crate::upstream::{Setup, Upstream};

/// Entries read from the journal at a time.
const BATCH: usize = 256;

/// Most entries in one transaction, and most of their bytes (at least one entry).
const TX_ENTRIES: usize = 128;
const TX_BYTES: usize = 1 << 20;

/// How long the cursor outlives the last replay: far longer than any restart.
const CURSOR_TTL_MS: &str = "604800000";

/// Replies nested deeper than this in a replayed write's reply are refused as malformed.
const MAX_REPLY_DEPTH: usize = 1024;

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
                links: HashMap::new(),
                cursor_read: false,
                cut: None,
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
                Err(Stop::Refused(reason)) => {
                    queue.pass_ended(true);
                    warn!(upstream = %primary.name(), replayed, "write queue replay waits: a queued write was refused for now ({reason}); kept queued");
                }
                Err(Stop::Upstream(e)) => {
                    queue.pass_ended(false);
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

/// Why a pass stopped early.
enum Stop {
    /// Redis refused a queued write for now (`LOADING`, `BUSY`, `OOM` ...): the replay is
    /// stalled, and writes waiting behind it fail fast.
    Refused(String),
    /// The primary could not be reached, or the journal failed.
    Upstream(UpstreamError),
}

impl From<UpstreamError> for Stop {
    fn from(e: UpstreamError) -> Stop {
        Stop::Upstream(e)
    }
}

/// How an identity's writes are replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// In transactions that move the cursor: exactly once.
    Transactions,
    /// One at a time, at least once: Redis refuses this identity `MULTI` or the cursor.
    OneByOne,
}

/// A replay connection of one identity.
struct Link {
    stream: UpstreamStream,
    db: u32,
    mode: Mode,
    buf: BytesMut,
}

/// One replay pass over the journal.
struct Pass<'a> {
    queue: &'a WriteQueue,
    primary: &'a Upstream,
    own: &'a Option<Arc<Credentials>>,
    /// Told about every replayed write, so the cache forgets the values it changed.
    sink: &'a dyn EffectSink,
    /// A connection per identity (`None`: redfuse's own).
    links: HashMap<Option<Bytes>, Link>,
    /// The cursor is read once per pass, before anything is sent.
    cursor_read: bool,
    /// The next transaction holds at most this many entries (those before a refused one).
    cut: Option<usize>,
    /// The entry Redis has been refusing with `OOM`, and since when.
    oom_since: &'a mut Option<(u64, Instant)>,
    replayed: usize,
}

/// How a transaction went.
enum Tx {
    /// It ran (or its first entry was refused): the outcomes, in order, from the first.
    Ran(Vec<Outcome>),
    /// Entry `n` was refused while queueing, so nothing ran: the `n` before it go first.
    Cut(usize),
    /// Redis refuses this identity `MULTI` or the cursor: it goes one by one now.
    Switched,
}

/// What Redis said about one entry.
enum Outcome {
    /// Redis took it, with this reply.
    Done(Bytes),
    /// Redis refused it for good: to the dead letters, with a reason class.
    Dead(String, &'static str),
    /// Redis refused it for now: the pass stops.
    Later(String),
}

impl Pass<'_> {
    async fn run(&mut self) -> Result<(), Stop> {
        loop {
            let batch = self.queue.journal.peek(BATCH);
            let Some(first) = batch.first() else {
                return Ok(());
            };
            let slot = first.identity.clone();
            if !self.links.contains_key(&slot) {
                let credentials = match self.credentials(first) {
                    Ok(c) => c,
                    Err(reason) => {
                        self.dead(first, &reason, "identity")?;
                        continue;
                    }
                };
                match open(&self.primary.ctx, &Setup::new(Proto::Resp2, credentials)).await {
                    Ok(stream) => {
                        let link = Link {
                            stream,
                            db: 0,
                            mode: Mode::Transactions,
                            buf: BytesMut::with_capacity(4096),
                        };
                        self.links.insert(slot.clone(), link);
                    }
                    // The identity itself is refused: nothing of it can be replayed.
                    Err(UpstreamError::Auth { reply, .. }) => {
                        self.dead(first, &reply, "auth")?;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            if !self.cursor_read {
                self.cursor_read = true;
                if let Some(done) = self.read_cursor(&slot).await? {
                    self.acknowledge_through(&batch, done)?;
                    continue;
                }
            }
            let run = leading_run(&batch, self.cut.take());
            self.select(&slot, first.db).await?;
            let mode = self.links[&slot].mode;
            let outcomes = match mode {
                Mode::Transactions => match self.transaction(&slot, run).await? {
                    Tx::Ran(outcomes) => outcomes,
                    Tx::Cut(n) => {
                        self.cut = Some(n);
                        continue;
                    }
                    Tx::Switched => continue,
                },
                Mode::OneByOne => {
                    let reply = self.send(&slot, &[&first.frame]).await?.remove(0);
                    vec![self.judge(first, reply)]
                }
            };
            for (entry, outcome) in run.iter().zip(outcomes) {
                match outcome {
                    Outcome::Done(reply) => {
                        self.ack(entry.seq)?;
                        self.replayed += 1;
                        self.replayed_effect(entry, reply);
                    }
                    Outcome::Dead(reason, class) => self.dead(entry, &reason, class)?,
                    Outcome::Later(reason) => return Err(Stop::Refused(reason)),
                }
                self.queue.progressed();
            }
        }
    }

    /// Sends `run` as one transaction moving the cursor. `MULTI` goes first on its own:
    /// were it refused, the entries pipelined behind it would run one by one, some of
    /// them perhaps after a refusal that must keep them waiting.
    async fn transaction(&mut self, slot: &Option<Bytes>, run: &[Entry]) -> Result<Tx, Stop> {
        let multi = self.send(slot, &[MULTI]).await?.remove(0);
        match ErrorCode::of(&multi) {
            ErrorCode::NotAnError => {}
            ErrorCode::NoPerm => {
                self.one_by_one(slot, &multi);
                return Ok(Tx::Switched);
            }
            _ => return Err(Stop::Refused(text(&multi))),
        }
        let last = run.last().expect("a run is never empty").seq;
        let cursor_value = format!("{}:{last}", self.queue.journal.epoch());
        let cursor = encode_command(&[
            b"SET".as_slice(),
            self.queue.cursor_key(),
            cursor_value.as_bytes(),
            b"PX",
            CURSOR_TTL_MS.as_bytes(),
        ]);
        let mut frames: Vec<&[u8]> = Vec::with_capacity(run.len() + 2);
        frames.extend(run.iter().map(|e| &e.frame[..]));
        frames.push(&cursor);
        frames.push(EXEC);
        let replies = self.send(slot, &frames).await?;
        let (exec, rest) = replies.split_last().expect("one reply per frame");
        let (cursor_reply, queued) = rest.split_last().expect("one reply per frame");
        if let Some(results) = split_aggregate(exec) {
            if results.len() != run.len() + 1 {
                return Err(Stop::Upstream(UpstreamError::unavailable(
                    self.primary.name(),
                    format!(
                        "EXEC of {} replayed writes answered {} replies",
                        run.len() + 1,
                        results.len()
                    ),
                )));
            }
            *self.oom_since = None;
            // Everything ran: a write that failed while running changed nothing and would
            // fail the same way again.
            return Ok(Tx::Ran(
                results
                    .into_iter()
                    .take(run.len())
                    .map(|r| match ErrorCode::of(&r) {
                        ErrorCode::NotAnError => Outcome::Done(r),
                        _ => Outcome::Dead(text(&r), class_of(&r)),
                    })
                    .collect(),
            ));
        }
        // Aborted: nothing ran. The first refusal decides.
        match queued.iter().position(|r| is_error(r)) {
            // The entries before the refused one go first, on their own.
            Some(i) if i > 0 => Ok(Tx::Cut(i)),
            Some(_) => Ok(Tx::Ran(vec![self.judge(&run[0], queued[0].clone())])),
            None if ErrorCode::of(cursor_reply) == ErrorCode::NoPerm => {
                self.one_by_one(slot, cursor_reply);
                Ok(Tx::Switched)
            }
            None if is_error(cursor_reply) => Err(Stop::Refused(text(cursor_reply))),
            // EXEC itself refused (OOM for the transaction as a whole ...): judged as the
            // first entry's refusal, so that OOM_PATIENCE applies.
            None => Ok(Tx::Ran(vec![self.judge(&run[0], exec.clone())])),
        }
    }

    fn one_by_one(&mut self, slot: &Option<Bytes>, why: &[u8]) {
        if let Some(link) = self.links.get_mut(slot) {
            link.mode = Mode::OneByOne;
        }
        warn!(
            upstream = %self.primary.name(),
            identity = %String::from_utf8_lossy(slot.as_deref().unwrap_or(b"(redfuse)")),
            reply = %text(why),
            "Redis refuses this identity MULTI or the replay cursor; its queued writes are replayed one at a time, at least once (grant +multi +exec ~redfuse:replay:* for exactly once)"
        );
    }

    /// Reads the cursor: the last seq of this journal's epoch a transaction applied.
    async fn read_cursor(&mut self, slot: &Option<Bytes>) -> Result<Option<u64>, Stop> {
        let get = encode_command(&[b"GET".as_slice(), self.queue.cursor_key()]);
        let reply = self.send(slot, &[&get]).await?.remove(0);
        if is_error(&reply) {
            if ErrorCode::of(&reply) == ErrorCode::NoPerm {
                self.one_by_one(slot, &reply);
            }
            return Ok(None);
        }
        let Some(value) = split_bulk(&reply) else {
            return Ok(None);
        };
        let value = String::from_utf8_lossy(value);
        let Some((epoch, seq)) = value.split_once(':') else {
            return Ok(None);
        };
        if epoch.parse::<u32>().ok() != Some(self.queue.journal.epoch()) {
            return Ok(None);
        }
        Ok(seq.parse::<u64>().ok())
    }

    /// Entries up to `done` were applied by a transaction whose reply was lost.
    fn acknowledge_through(&mut self, batch: &[Entry], done: u64) -> Result<(), Stop> {
        let applied: Vec<&Entry> = batch.iter().take_while(|e| e.seq <= done).collect();
        if applied.is_empty() {
            return Ok(());
        }
        info!(
            upstream = %self.primary.name(),
            writes = applied.len(),
            "queued writes found applied by a replay whose reply was lost; not sent again"
        );
        for entry in applied {
            self.ack(entry.seq)?;
            self.replayed += 1;
            // What they answered is lost: their keys are unknown now.
            self.replayed_effect(entry, Bytes::from_static(b"+OK\r\n"));
        }
        Ok(())
    }

    async fn select(&mut self, slot: &Option<Bytes>, db: u32) -> Result<(), Stop> {
        if self.links[slot].db == db {
            return Ok(());
        }
        let select = encode_command(&[b"SELECT".as_slice(), db.to_string().as_bytes()]);
        let reply = self.send(slot, &[&select]).await?.remove(0);
        if is_error(&reply) {
            // A database this Redis does not have: every entry of it would fail alike.
            return Err(Stop::Refused(text(&reply)));
        }
        if let Some(link) = self.links.get_mut(slot) {
            link.db = db;
        }
        Ok(())
    }

    /// Writes `frames` in one go and reads one reply for each. Any failure drops the
    /// connection: what it still owes cannot be told apart from what comes next.
    async fn send(&mut self, slot: &Option<Bytes>, frames: &[&[u8]]) -> Result<Vec<Bytes>, Stop> {
        let ctx = &self.primary.ctx;
        let link = self.links.get_mut(slot).expect("opened before sending");
        let result = exchange(ctx, link, frames).await;
        if result.is_err() {
            self.links.remove(slot);
        }
        Ok(result?)
    }

    /// What a reply to one entry sent on its own means.
    fn judge(&mut self, entry: &Entry, reply: Bytes) -> Outcome {
        match ErrorCode::of(&reply) {
            ErrorCode::NotAnError => {
                *self.oom_since = None;
                Outcome::Done(reply)
            }
            ErrorCode::Loading
            | ErrorCode::Busy
            | ErrorCode::MasterDown
            | ErrorCode::ClusterDown
            | ErrorCode::TryAgain
            | ErrorCode::ReadOnly => Outcome::Later(text(&reply)),
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
                    Outcome::Dead(text(&reply), "oom")
                } else {
                    Outcome::Later(text(&reply))
                }
            }
            _ => Outcome::Dead(text(&reply), class_of(&reply)),
        }
    }

    fn dead(&self, entry: &Entry, reason: &str, class: &'static str) -> Result<(), Stop> {
        self.queue
            .dead_letter(entry, reason, class)
            .map_err(|e| Stop::Upstream(self.journal_error(e)))
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
            class: classify(request.args()),
            request,
            sent: Instant::now(),
            ticket: None,
            proto: crate::resp::Proto::Resp2,
        };
        self.sink.apply(
            ReplyEffect::Replayed(Box::new(written)),
            &mut Ok(reply),
            None,
        );
    }

    fn ack(&self, seq: u64) -> Result<(), Stop> {
        self.queue
            .done(seq)
            .map_err(|e| Stop::Upstream(self.journal_error(e)))
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
}

const MULTI: &[u8] = b"*1\r\n$5\r\nMULTI\r\n";
const EXEC: &[u8] = b"*1\r\n$4\r\nEXEC\r\n";

/// The leading entries of `batch` that can share a transaction: one identity, one
/// database, within [`TX_ENTRIES`] and [`TX_BYTES`].
fn leading_run(batch: &[Entry], cut: Option<usize>) -> &[Entry] {
    let first = &batch[0];
    let mut bytes = 0;
    let n = batch
        .iter()
        .take(cut.unwrap_or(TX_ENTRIES).min(TX_ENTRIES))
        .take_while(|e| {
            bytes += e.frame.len();
            e.identity == first.identity
                && e.db == first.db
                && (bytes <= TX_BYTES || e.seq == first.seq)
        })
        .count();
    &batch[..n.max(1)]
}

/// Writes `frames` and reads one reply per frame, each within the command timeout of the
/// previous one (a transaction of slow writes may take longer as a whole).
async fn exchange(
    ctx: &crate::upstream::UpstreamCtx,
    link: &mut Link,
    frames: &[&[u8]],
) -> Result<Vec<Bytes>, UpstreamError> {
    let timeout = ctx.command_timeout;
    let lost = |e: std::io::Error| UpstreamError::unavailable(&ctx.name, e);
    let timed_out = || UpstreamError::Timeout {
        upstream: ctx.name.clone(),
        timeout,
    };
    let mut out = BytesMut::with_capacity(frames.iter().map(|f| f.len()).sum());
    for f in frames {
        out.put_slice(f);
    }
    tokio::time::timeout(timeout, async {
        link.stream.write_all(&out).await?;
        link.stream.flush().await
    })
    .await
    .map_err(|_| timed_out())?
    .map_err(lost)?;
    let mut replies = Vec::with_capacity(frames.len());
    let buf = &mut link.buf;
    let mut scanner = ReplyScanner::new();
    while replies.len() < frames.len() {
        match scanner.scan(buf, MAX_REPLY_DEPTH) {
            Ok(Some(n)) => {
                replies.push(buf.split_to(n).freeze());
                scanner = ReplyScanner::new();
                continue;
            }
            Ok(None) => {}
            Err(e) => {
                return Err(UpstreamError::Malformed {
                    upstream: ctx.name.clone(),
                    reason: e.0.into(),
                });
            }
        }
        buf.reserve(4096);
        match tokio::time::timeout(timeout, link.stream.read_buf(buf)).await {
            Err(_) => return Err(timed_out()),
            Ok(Ok(0)) => {
                return Err(UpstreamError::Closed {
                    upstream: ctx.name.clone(),
                });
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(lost(e)),
        }
    }
    Ok(replies)
}

fn is_error(reply: &[u8]) -> bool {
    crate::resp::is_error_reply(reply)
}

fn text(reply: &[u8]) -> String {
    String::from_utf8_lossy(reply).trim_end().to_owned()
}

/// The dead-letter class of a refusal that will not pass.
fn class_of(reply: &[u8]) -> &'static str {
    match ErrorCode::of(reply) {
        ErrorCode::NoAuth | ErrorCode::WrongPass => "auth",
        ErrorCode::NoPerm => "permission",
        ErrorCode::WrongType => "wrongtype",
        ErrorCode::Oom => "oom",
        _ => "error",
    }
}

/// The payload of a bulk string reply (`$3\r\nabc\r\n`); `None` for anything else.
fn split_bulk(reply: &[u8]) -> Option<&[u8]> {
    let rest = reply.strip_prefix(b"$")?;
    let line_end = rest.iter().position(|b| *b == b'\r')?;
    let len: usize = std::str::from_utf8(&rest[..line_end]).ok()?.parse().ok()?;
    rest.get(line_end + 2..line_end + 2 + len)
}
