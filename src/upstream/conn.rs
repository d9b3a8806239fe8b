//! One upstream TCP connection carrying a FIFO pipeline of requests.
//!
//! A connection is a single task that runs two futures under one `select!`: a writer that
//! drains the request channel and writes many frames per syscall, and a reader that measures
//! reply frames and hands each to the oldest pending request. Both live in the same task, so
//! the pending queue is a plain mutex that is never contended across threads for long.
//!
//! A FIFO pipeline cannot skip a reply, so a per-command timeout, a malformed reply or a
//! closed socket ends the connection and fails everything pending on it; shared connections
//! then reconnect with back-off, dedicated ones just end (their client is closed, as Redis
//! would close it).
//!
//! # What the breaker is told
//!
//! A reply's latency is its *service time*: from when Redis could start on it (it was sent,
//! and the reply before it had fully arrived) to when its own reply had arrived. Time spent
//! behind other requests' large replies on the same pipe, or waiting for a client to read,
//! is not the server being slow. The per-command timeout is counted the same way: from
//! when the request reached the head of the pipeline, so it bounds how long Redis makes no
//! progress, not how much other clients queued ahead. While Redis answers `-BUSY` (a script is running), a
//! command waiting behind the script is not timed out: Redis is alive and answers the
//! moment the script ends or is killed (the health probe keeps seeing `-BUSY` meanwhile).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::backoff::Backoff;
use super::barrier::Raised;
use super::handshake::{Setup, open};
use super::tls::UpstreamStream;
use super::{Inflight, UpstreamCtx};
use crate::breaker::{CallGuard, FailureKind, Outcome, ReplyClass, classify_error_reply};
use crate::burst;
use crate::effect::{ConnId, Fills, Mark, Owed, ReplyEffect};
use crate::error::{ConnectFailure, Reply, UpstreamError};
use crate::resp::{ErrorCode, ReplyScanner};

/// A request travelling to a connection task.
pub struct Call {
    pub frame: Bytes,
    pub reply: oneshot::Sender<Reply>,
    /// Blocking commands wait as long as the server makes them wait.
    pub blocking: bool,
    pub is_write: bool,
    /// Slow by nature (no `FAST` flag in Redis's table: scripts, KEYS, range reads ...):
    /// while one is waiting on Redis, a health probe that gets no answer is not proof of a
    /// frozen server.
    pub slow: bool,
    /// The breaker permit this call was admitted with; completed when the reply arrives.
    pub guard: Option<CallGuard>,
    /// The bulkhead slot, held until the reply arrives.
    pub inflight: Option<Inflight>,
    /// What the reply changes besides reaching the client, applied by the upstream's
    /// effect sink as soon as the reply (or the failure) is known.
    pub effect: Option<ReplyEffect>,
    /// The client's counts this request is in; they go down once it is answered.
    pub marks: [Option<Mark>; 2],
    /// The client's output budget, charged with the reply until the client has it; the
    /// call counts as unanswered until this is dropped.
    pub output: Option<Owed>,
    /// A blocking command's hold on other traffic to the server, let go once it is
    /// written (see [`super::barrier`]).
    pub raised: Option<Raised>,
}

impl Call {
    /// A call on the heap: it moves from the session to the connection's queue and out
    /// again as a pointer (a `Call` is 300 bytes, and copying it at every step showed in
    /// profiles).
    pub fn new(
        frame: Bytes,
        blocking: bool,
        is_write: bool,
    ) -> (Box<Call>, oneshot::Receiver<Reply>) {
        let (tx, rx) = oneshot::channel();
        // Written in place: `Box::new` built the call on the stack and copied it over.
        (
            Box::write(
                Box::new_uninit(),
                Call {
                    frame,
                    reply: tx,
                    blocking,
                    is_write,
                    slow: false,
                    guard: None,
                    inflight: None,
                    effect: None,
                    marks: [None, None],
                    output: None,
                    raised: None,
                },
            ),
            rx,
        )
    }

    /// Answers the call with an error without sending it.
    pub fn fail(self, ctx: &UpstreamCtx, err: UpstreamError) {
        if let Some(g) = self.guard {
            g.complete(outcome_of_error(&err));
        }
        let mut result = Err(err);
        if let Some(e) = self.effect {
            ctx.sink.apply(e, &mut result, None);
        }
        let _ = self.reply.send(result);
    }
}

/// What an error says about the upstream's health.
pub fn outcome_of_error(err: &UpstreamError) -> Outcome {
    match err {
        UpstreamError::Connect { failure, .. } => Outcome::Failure(match failure {
            ConnectFailure::Timeout => FailureKind::ConnectTimeout,
            ConnectFailure::Reset => FailureKind::ConnectReset,
            ConnectFailure::Refused | ConnectFailure::Other => FailureKind::ConnectRefused,
        }),
        UpstreamError::Timeout { .. } | UpstreamError::Silent { .. } => {
            Outcome::Failure(FailureKind::CommandTimeout)
        }
        UpstreamError::Closed { .. } | UpstreamError::Unavailable { .. } => {
            Outcome::Failure(FailureKind::ConnectionClosed)
        }
        UpstreamError::Malformed { .. } => Outcome::Failure(FailureKind::MalformedReply),
        UpstreamError::Answered { cause, .. } => outcome_of_error(cause),
        // The server answered, or was never tried.
        UpstreamError::Auth { .. }
        | UpstreamError::Refused { .. }
        | UpstreamError::CircuitOpen { .. }
        | UpstreamError::Misconfigured { .. }
        | UpstreamError::Overloaded { .. } => Outcome::Ignored,
    }
}

/// Calls handed to a connection task in one message: a client's pipelined requests for one
/// connection, read in one burst, cost one channel send instead of one each. Each is boxed
/// (see [`Call::new`]): it goes on into the pending queue as a pointer.
pub type Calls = Vec<Box<Call>>;

type CallRx = burst::Receiver<Calls>;

/// A cheap handle to a connection task.
#[derive(Clone)]
pub struct ConnHandle {
    /// Bounded in calls (`depth`), not in messages.
    tx: burst::Sender<Calls>,
    pub id: u64,
    ctx: Arc<UpstreamCtx>,
    /// Dedicated connections only: see [`ConnHandle::abandon`].
    abandon: Option<Arc<Abandon>>,
}

/// Set when a dedicated connection's client went away.
#[derive(Default)]
pub struct Abandon {
    flag: std::sync::atomic::AtomicBool,
    wake: Notify,
}

impl ConnHandle {
    /// Queues a call; if the task is gone the call is answered with an error.
    pub async fn send(&self, call: Box<Call>) {
        self.send_all(vec![call]).await;
    }

    /// Queues calls, in order, as one message; if the task is gone they are answered with
    /// an error.
    pub async fn send_all(&self, mut calls: Calls) {
        if crate::drill::inject::armed() {
            let mut kept = Vec::with_capacity(calls.len());
            for call in calls {
                if let Some(c) = crate::drill::inject::intercept(&self.ctx, call).await {
                    kept.push(c);
                }
            }
            calls = kept;
        }
        if calls.is_empty() {
            return;
        }
        // A blocking command never waits for another (see `barrier`).
        if self.ctx.barrier.is_raised() && !calls.iter().any(|c| c.raised.is_some()) {
            self.ctx.barrier.pass(self.ctx.connect_timeout).await;
        }
        if let Err(calls) = self.tx.send(calls).await {
            let err = UpstreamError::Closed {
                upstream: self.ctx.name.clone(),
            };
            for call in calls {
                call.fail(&self.ctx, err.clone());
            }
        }
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    pub fn upstream(&self) -> &Arc<str> {
        &self.ctx.name
    }

    /// The client of a dedicated connection went away. What it sent still runs (its writes
    /// must not be lost), but a blocking command is not waited for: the connection closes as
    /// soon as one is at the head, which makes Redis drop it, as it would for the vanished
    /// client itself, instead of letting it pop data nobody will read.
    pub fn abandon(&self) {
        if let Some(a) = &self.abandon {
            a.flag.store(true, std::sync::atomic::Ordering::SeqCst);
            a.wake.notify_one();
        }
    }
}

fn next_conn_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Starts a shared connection task that reconnects with back-off for as long as a handle exists.
pub fn spawn_shared(ctx: Arc<UpstreamCtx>, setup: Setup, depth: usize) -> ConnHandle {
    let (tx, rx) = burst::channel(depth);
    let id = next_conn_id();
    tokio::spawn(run_shared(ctx.clone(), setup, rx, id));
    ConnHandle {
        tx,
        id,
        ctx,
        abandon: None,
    }
}

/// Runs a dedicated connection on an already opened stream; it ends with its socket.
pub fn spawn_dedicated(ctx: Arc<UpstreamCtx>, stream: UpstreamStream, depth: usize) -> ConnHandle {
    let (tx, mut rx) = burst::channel(depth);
    let id = next_conn_id();
    let abandon = Arc::new(Abandon::default());
    let watch = abandon.clone();
    let handle_ctx = ctx.clone();
    tokio::spawn(async move {
        ctx.metrics.connections.inc();
        // Decremented on every way out of the task.
        struct Gauge<'a>(&'a UpstreamCtx);
        impl Drop for Gauge<'_> {
            fn drop(&mut self) {
                self.0.metrics.connections.dec();
            }
        }
        let gauge = Gauge(&ctx);
        let end = pipeline(&ctx, stream, &mut rx, None, Some(&watch), id).await;
        drop(gauge);
        debug!(upstream = %ctx.name, conn = id, "dedicated connection ended: {end:?}");
        rx.close();
        let err = end.error(&ctx);
        while let Some(calls) = rx.try_recv() {
            for call in calls {
                call.fail(&ctx, err.clone());
            }
        }
    });
    ConnHandle {
        tx,
        id,
        ctx: handle_ctx,
        abandon: Some(abandon),
    }
}

async fn run_shared(ctx: Arc<UpstreamCtx>, setup: Setup, mut rx: CallRx, id: u64) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    let mut logged_down = false;
    // Requests that arrived during back-off and triggered this attempt.
    let mut first: Option<Calls> = None;
    loop {
        if ctx.drain.is_forced() {
            // Every call is answered (a read from the cache, by its effect), queued ones too.
            let err = Ended::Drained.error(&ctx);
            fail_all(&ctx, first.take(), &err);
            rx.close();
            while let Some(calls) = rx.try_recv() {
                fail_all(&ctx, Some(calls), &err);
            }
            return;
        }
        let attempt = open(&ctx, &setup).await;
        if let Err(err) = &attempt {
            fail_all(&ctx, first.take(), err);
        }
        match attempt {
            Ok(stream) => {
                info!(upstream = %ctx.name, addr = %ctx.addr, conn = id, proto = setup.proto.as_u8(), "upstream connected");
                if logged_down {
                    // Redis is back: the sibling connections need not wait out their back-off.
                    ctx.reconnect.notify_waiters();
                }
                logged_down = false;
                backoff.reset();
                ctx.metrics.connections.inc();
                ctx.connected
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let end = pipeline(&ctx, stream, &mut rx, first.take(), None, id).await;
                ctx.connected
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                ctx.metrics.connections.dec();
                if let Ended::HandlesDropped = end {
                    return;
                }
                ctx.metrics.disconnects.inc();
                info!(upstream = %ctx.name, conn = id, "upstream disconnected: {end}");
            }
            Err(err) => {
                ctx.metrics.connect_errors.inc();
                if !logged_down {
                    warn!(upstream = %ctx.name, addr = %ctx.addr, conn = id, "cannot connect to upstream: {err}; retrying with back-off");
                    logged_down = true;
                }
                // Until the next attempt, requests get a prompt error instead of waiting; a
                // request arriving once the minimum gap has passed triggers an attempt at once,
                // so recovery does not wait out a long back-off, yet a down Redis sees at most
                // one connect per gap per connection.
                let retry = tokio::time::sleep(backoff.next_delay());
                let min_gap = tokio::time::sleep(Duration::from_millis(100));
                tokio::pin!(retry, min_gap);
                let mut gap_passed = false;
                loop {
                    tokio::select! {
                        _ = ctx.drain.forced() => break,
                        _ = &mut retry => break,
                        _ = ctx.reconnect.notified() => break,
                        _ = &mut min_gap, if !gap_passed => gap_passed = true,
                        calls = rx.recv() => match calls {
                            // Another connection to this upstream is up: Redis is back.
                            Some(calls) if gap_passed || ctx.connected.load(std::sync::atomic::Ordering::Relaxed) > 0 => {
                                first = Some(calls);
                                break;
                            }
                            calls @ Some(_) => fail_all(&ctx, calls, &err),
                            None => return,
                        },
                    }
                }
            }
        }
    }
}

fn fail_all(ctx: &UpstreamCtx, calls: Option<Calls>, err: &UpstreamError) {
    for call in calls.into_iter().flatten() {
        call.fail(ctx, err.clone());
    }
}

/// Why a pipeline stopped.
#[derive(Debug)]
enum Ended {
    HandlesDropped,
    /// The client went away while a blocking command of its was waiting.
    Abandoned,
    Closed,
    Io(std::io::Error),
    Timeout,
    Malformed(String),
    /// The upstream left the set and its drain deadline passed.
    Drained,
    /// The health probe found the server silent and opened the breaker.
    Silent,
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::HandlesDropped => write!(f, "no longer used"),
            Ended::Abandoned => write!(f, "client gone during a blocking command"),
            Ended::Closed => write!(f, "connection closed by the server"),
            Ended::Io(e) => write!(f, "{e}"),
            Ended::Timeout => write!(f, "a command timed out"),
            Ended::Malformed(m) => write!(f, "malformed reply: {m}"),
            Ended::Drained => write!(f, "upstream removed, drain deadline passed"),
            Ended::Silent => write!(f, "the server stopped answering (silent health probe)"),
        }
    }
}

impl Ended {
    fn error(&self, ctx: &UpstreamCtx) -> UpstreamError {
        let upstream = ctx.name.clone();
        match self {
            Ended::Timeout => UpstreamError::Timeout {
                upstream,
                timeout: ctx.command_timeout,
            },
            Ended::Malformed(m) => UpstreamError::Malformed {
                upstream,
                reason: m.as_str().into(),
            },
            Ended::Closed => UpstreamError::Closed { upstream },
            Ended::Io(e) => UpstreamError::Unavailable {
                upstream,
                reason: e.to_string().into(),
            },
            Ended::Silent => UpstreamError::Silent { upstream },
            Ended::HandlesDropped | Ended::Abandoned | Ended::Drained => {
                UpstreamError::Closed { upstream }
            }
        }
    }
}

struct Pending<'a> {
    /// Its frame already taken and written.
    call: Box<Call>,
    sent: Instant,
    deadline: Option<Instant>,
    /// Counted in `UpstreamCtx::slow_in_flight` until answered.
    _slow: Option<SlowMark<'a>>,
}

const WRITE_BATCH_BYTES: usize = 256 * 1024;
const DIRECT_WRITE_BYTES: usize = 64 * 1024;

async fn pipeline(
    ctx: &UpstreamCtx,
    mut stream: UpstreamStream,
    rx: &mut CallRx,
    mut first: Option<Calls>,
    abandon: Option<&Abandon>,
    id: u64,
) -> Ended {
    let depth = rx.room();
    let (mut rd, mut wr) = stream.split();
    let pending: Mutex<VecDeque<Pending<'_>>> = Mutex::new(VecDeque::new());
    let armed = Notify::new();
    // Sent and unanswered calls are bounded too: past `depth` the writer takes no more
    // from the channel, which fills, and senders wait. Without this a fast client could
    // push the whole in-flight allowance of the upstream into one connection's pipe.
    let roomy = Notify::new();
    // Set when every handle is gone: replies still pending (a client's last BLPOP during a
    // graceful shutdown) are read before the connection ends.
    let closing = std::sync::atomic::AtomicBool::new(false);

    let writer = async {
        let mut out = BytesMut::with_capacity(16 * 1024);
        loop {
            if first.is_none() && pending.lock().unwrap_or_else(|e| e.into_inner()).len() >= depth {
                roomy.notified().await;
                continue;
            }
            let calls = match first.take() {
                Some(c) => c,
                None => match rx.recv().await {
                    Some(c) => c,
                    None => {
                        closing.store(true, std::sync::atomic::Ordering::SeqCst);
                        armed.notify_one();
                        return std::future::pending::<Ended>().await;
                    }
                },
            };
            let mut next = Some(calls);
            // Calls taken together are sent together: one clock reading for them all
            // (taken again after a write that had to wait).
            let mut now = Instant::now();
            // Barriers that blocking commands among these raised: lowered once written.
            let mut raised: Vec<Raised> = Vec::new();
            while let Some(calls) = next.take() {
                let deadline = now + ctx.command_timeout;
                // Frames from the first large one on, written after the lock (none, nearly
                // always: the small ones are copied into `out` right here).
                let mut large = Vec::new();
                {
                    // Registered before any of their bytes can reach Redis, under one lock.
                    let mut q = pending.lock().unwrap_or_else(|e| e.into_inner());
                    if q.is_empty() {
                        armed.notify_one();
                    }
                    for mut call in calls {
                        raised.extend(call.raised.take());
                        // The request's bytes go now, not with the reply: they pin the
                        // client's read buffer.
                        let frame = std::mem::take(&mut call.frame);
                        if large.is_empty() && frame.len() < DIRECT_WRITE_BYTES {
                            out.extend_from_slice(&frame);
                        } else {
                            large.push(frame);
                        }
                        q.push_back(Pending {
                            sent: now,
                            deadline: (!call.blocking).then_some(deadline),
                            _slow: call.slow.then(|| SlowMark::new(ctx)),
                            call,
                        });
                    }
                }
                for frame in large {
                    if frame.len() >= DIRECT_WRITE_BYTES {
                        if !out.is_empty() {
                            if let Err(e) = wr.write_all(&out).await {
                                return Ended::Io(e);
                            }
                            out.clear();
                        }
                        if let Err(e) = wr.write_all(&frame).await {
                            return Ended::Io(e);
                        }
                        now = Instant::now();
                    } else {
                        out.extend_from_slice(&frame);
                    }
                }
                if out.len() < WRITE_BATCH_BYTES
                    && pending.lock().unwrap_or_else(|e| e.into_inner()).len() < depth
                {
                    next = rx.try_recv();
                }
            }
            if !out.is_empty() {
                if let Err(e) = wr.write_all(&out).await {
                    return Ended::Io(e);
                }
                out.clear();
            }
            // TLS holds back what it could not write at once; a no-op on plain TCP.
            if let Err(e) = wr.flush().await {
                return Ended::Io(e);
            }
            drop(raised);
        }
    };

    let reader = async {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let mut scanner = ReplyScanner::new();
        // What the replies in `buf` leave to do, done together once it is scanned.
        let mut settle = Settle::new(ctx);
        // When the reply before the next one had fully arrived: see the module docs.
        let mut last_done = Instant::now();
        let far = Duration::from_secs(86400 * 365);
        let timer = tokio::time::sleep(far);
        tokio::pin!(timer);
        loop {
            // Replies read together arrived together: one clock reading for all of them.
            let arrived = Instant::now();
            loop {
                match scanner.scan(&buf, ctx.max_reply_depth) {
                    Ok(Some(n)) => {
                        let frame = buf.split_to(n).freeze();
                        if let Err(end) = complete(
                            ctx,
                            (&pending, &roomy, depth),
                            frame,
                            &mut last_done,
                            arrived,
                            id,
                            &mut settle,
                        ) {
                            settle.apply(ctx, id, arrived);
                            return end;
                        }
                    }
                    Ok(None) => {
                        settle.apply(ctx, id, arrived);
                        break;
                    }
                    Err(e) => {
                        settle.apply(ctx, id, arrived);
                        return Ended::Malformed(e.0);
                    }
                }
            }
            let (deadline, idle) = {
                let q = pending.lock().unwrap_or_else(|e| e.into_inner());
                (q.front().and_then(|p| p.deadline), q.is_empty())
            };
            if idle && closing.load(std::sync::atomic::Ordering::SeqCst) {
                return Ended::HandlesDropped;
            }
            // Only blocking calls have no deadline.
            if !idle
                && deadline.is_none()
                && abandon.is_some_and(|a| a.flag.load(std::sync::atomic::Ordering::SeqCst))
            {
                return Ended::Abandoned;
            }
            timer
                .as_mut()
                .reset(deadline.unwrap_or_else(|| Instant::now() + far));
            if buf.capacity() - buf.len() < 8 * 1024 {
                buf.reserve(64 * 1024);
            }
            tokio::select! {
                r = rd.read_buf(&mut buf) => match r {
                    Ok(0) => return Ended::Closed,
                    Ok(_) => {}
                    Err(e) => return Ended::Io(e),
                },
                _ = &mut timer, if deadline.is_some() => {
                    // A script keeps Redis busy: the command is waiting on a live server.
                    if ctx.busy_recently() {
                        let mut q = pending.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(front) = q.front_mut() {
                            front.deadline = Some(Instant::now() + ctx.command_timeout);
                        }
                        continue;
                    }
                    return Ended::Timeout;
                }
                _ = armed.notified() => {}
                _ = async {
                    match abandon {
                        Some(a) => a.wake.notified().await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
        }
    };

    let end = tokio::select! {
        e = writer => e,
        e = reader => e,
        _ = ctx.drain.forced() => Ended::Drained,
        _ = ctx.silent.notified() => Ended::Silent,
    };
    match &end {
        Ended::Timeout => ctx.metrics.timeouts.inc(),
        Ended::Malformed(_) => ctx.metrics.protocol_errors.inc(),
        _ => {}
    }
    let err = end.error(ctx);
    let drained: Vec<Pending<'_>> = pending
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .drain(..)
        .collect();
    let mut counted = false;
    for p in drained {
        let mut call = p.call;
        // Only the oldest request saw the failure; the rest are collateral (one slow command
        // must not count as many failures and trip the breaker for everyone). Calls without a
        // permit (fences) do not take that place.
        if let Some(g) = call.guard.take() {
            let first = !std::mem::replace(&mut counted, true);
            let outcome = if first && !matches!(end, Ended::Abandoned) {
                outcome_of_error(&err)
            } else {
                Outcome::Ignored
            };
            g.complete(outcome);
        }
        let mut result = Err(err.clone());
        if let Some(e) = call.effect.take() {
            ctx.sink.apply(e, &mut result, None);
        }
        let _ = call.reply.send(result);
    }
    end
}

/// One slow-by-nature command waiting on Redis (see [`Call::slow`]).
struct SlowMark<'a>(&'a UpstreamCtx);

impl<'a> SlowMark<'a> {
    fn new(ctx: &'a UpstreamCtx) -> SlowMark<'a> {
        ctx.slow_in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        SlowMark(ctx)
    }
}

impl Drop for SlowMark<'_> {
    fn drop(&mut self) {
        self.0
            .slow_in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What the replies read together leave to do once each has been handed on: their cache
/// fills (see `ReplyEffect::defer`), their breaker outcomes and their latencies, each
/// group applied in one step (one cache lock, one breaker lock, one histogram update).
struct Settle {
    fills: Fills,
    outcomes: Vec<(CallGuard, Outcome)>,
    latency: prometheus::local::LocalHistogram,
}

impl Settle {
    fn new(ctx: &UpstreamCtx) -> Settle {
        Settle {
            fills: Fills::default(),
            outcomes: Vec::new(),
            latency: ctx.metrics.latency.local(),
        }
    }

    fn apply(&mut self, ctx: &UpstreamCtx, id: u64, now: Instant) {
        ctx.sink.apply_fills(&mut self.fills, Some(ConnId(id)));
        CallGuard::complete_all(&mut self.outcomes, now);
        self.latency.flush();
    }
}

/// How many replies ahead of the one it completes the connection starts loading what
/// completing will touch (`EffectSink::prefetch`): a reply takes a few hundred
/// nanoseconds to complete, so the loads have that long times this to arrive.
const PREFETCH_AHEAD: usize = 5;

/// Hands a reply frame to the oldest pending request.
fn complete<'a>(
    ctx: &'a UpstreamCtx,
    (pending, roomy, depth): (&Mutex<VecDeque<Pending<'a>>>, &Notify, usize),
    frame: Bytes,
    last_done: &mut Instant,
    now: Instant,
    id: u64,
    settle: &mut Settle,
) -> Result<(), Ended> {
    // Out-of-band RESP3 pushes belong to no request.
    if frame.first() == Some(&b'>') {
        return Ok(());
    }
    let p = {
        let mut q = pending.lock().unwrap_or_else(|e| e.into_inner());
        let Some(p) = q.pop_front() else {
            return Err(Ended::Malformed("reply without a request".to_owned()));
        };
        if q.len() + 1 == depth {
            roomy.notify_one();
        }
        if let Some(effect) = q
            .get(PREFETCH_AHEAD - 1)
            .and_then(|a| a.call.effect.as_ref())
        {
            ctx.sink.prefetch(effect);
        }
        // The next request's time starts now if it was waiting behind this one: the
        // timeout bounds how long Redis makes no progress, not how much was queued.
        if let Some(next) = q.front_mut()
            && let Some(deadline) = next.deadline.as_mut()
        {
            *deadline = (*deadline).max(now + ctx.command_timeout);
        }
        p
    };
    // After the first of the replies read together, the time since the one before is nil.
    let Call {
        reply,
        is_write,
        guard,
        inflight: _inflight,
        effect,
        marks: _marks,
        output,
        ..
    } = *p.call;
    let latency = if *last_done == now {
        Duration::ZERO
    } else {
        now.saturating_duration_since(p.sent.max(*last_done))
    };
    *last_done = now;
    settle.latency.observe(latency.as_secs_f64());
    if frame.first() == Some(&b'-') && ErrorCode::of(&frame) == ErrorCode::Busy {
        ctx.note_busy();
    }
    if let Some(g) = guard {
        let class = classify_error_reply(&frame, is_write);
        if class == ReplyClass::AuthProblem {
            ctx.metrics.auth_errors.inc();
        }
        settle.outcomes.push((g, class.outcome(latency)));
    }
    if let Some(budget) = &output {
        budget.add(frame.len());
    }
    let mut result = Ok(frame);
    if let Some(e) = effect
        && let Some(e) = ctx.sink.defer(e, &result, &mut settle.fills, now)
    {
        ctx.sink.apply_fills(&mut settle.fills, Some(ConnId(id)));
        ctx.sink.apply(e, &mut result, Some(ConnId(id)));
    }
    let _ = reply.send(result);
    Ok(())
}
