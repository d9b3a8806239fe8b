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

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::backoff::Backoff;
use super::{Inflight, ServerInfo, UpstreamCtx};
use crate::breaker::{CallGuard, Outcome, ReplyClass, classify_error_reply};
use crate::config::Credentials;
use crate::error::UpstreamError;
use crate::protocol::{Proto, ReplyScanner, encode_command, is_error_reply};

/// The reply to one request: the raw reply frame, or why there is none.
pub type Reply = Result<Bytes, UpstreamError>;

/// A request travelling to a connection task.
pub struct Call {
    pub frame: Bytes,
    pub reply: oneshot::Sender<Reply>,
    /// Blocking commands wait as long as the server makes them wait.
    pub blocking: bool,
    pub is_write: bool,
    /// The breaker permit this call was admitted with; completed when the reply arrives.
    pub guard: Option<CallGuard>,
    /// The bulkhead slot, held until the reply arrives.
    pub inflight: Option<Inflight>,
    /// Runs in the connection task as soon as the reply (or the failure) is known, before it
    /// travels to the client: cache fills, single-flight and invalidations must not wait for
    /// a client that is slow to read its replies.
    pub on_reply: Option<OnReply>,
}

/// See [`Call::on_reply`].
pub type OnReply = Box<dyn FnOnce(&Reply) + Send>;

impl Call {
    pub fn new(frame: Bytes, blocking: bool, is_write: bool) -> (Call, oneshot::Receiver<Reply>) {
        let (tx, rx) = oneshot::channel();
        (
            Call {
                frame,
                reply: tx,
                blocking,
                is_write,
                guard: None,
                inflight: None,
                on_reply: None,
            },
            rx,
        )
    }

    /// Answers the call with an error without sending it.
    pub fn fail(self, err: UpstreamError) {
        if let Some(g) = self.guard {
            g.complete(outcome_of_error(&err));
        }
        let result = Err(err);
        if let Some(f) = self.on_reply {
            run_on_reply(f, &result);
        }
        let _ = self.reply.send(result);
    }
}

pub fn outcome_of_error(err: &UpstreamError) -> Outcome {
    use crate::breaker::FailureKind;
    match err {
        UpstreamError::Timeout { .. } => Outcome::Failure(FailureKind::CommandTimeout),
        UpstreamError::Closed { .. } => Outcome::Failure(FailureKind::ConnectionClosed),
        UpstreamError::Malformed { .. } => Outcome::Failure(FailureKind::MalformedReply),
        UpstreamError::Unavailable { .. } => Outcome::Failure(FailureKind::ConnectRefused),
        // Not the server's fault, or never tried.
        UpstreamError::Auth { .. }
        | UpstreamError::CircuitOpen { .. }
        | UpstreamError::Overloaded { .. } => Outcome::Ignored,
    }
}

/// A cheap handle to a connection task.
#[derive(Clone)]
pub struct ConnHandle {
    tx: mpsc::Sender<Call>,
    pub id: u64,
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
    /// Queues a call; if the task is gone the call is answered with `gone`.
    pub async fn send(&self, call: Call, gone: impl FnOnce() -> UpstreamError) {
        if let Err(mpsc::error::SendError(call)) = self.tx.send(call).await {
            call.fail(gone());
        }
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
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

/// What a new connection is set up with before it carries client traffic.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Setup {
    pub proto: Proto,
    pub credentials: Option<Credentials>,
    pub db: u32,
    pub client_name: Option<Bytes>,
}

impl Setup {
    pub fn new(proto: Proto, credentials: Option<Credentials>) -> Setup {
        Setup {
            proto,
            credentials,
            db: 0,
            client_name: None,
        }
    }
}

/// Connects within the connect timeout.
pub async fn connect(ctx: &UpstreamCtx) -> Result<TcpStream, UpstreamError> {
    let attempt =
        tokio::time::timeout(ctx.connect_timeout, TcpStream::connect(ctx.addr.as_str())).await;
    let stream = match attempt {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(UpstreamError::unavailable(&ctx.name, e)),
        Err(_) => {
            return Err(UpstreamError::unavailable(
                &ctx.name,
                format!(
                    "connect timed out after {} ms",
                    ctx.connect_timeout.as_millis()
                ),
            ));
        }
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Sends one frame on a connection that carries nothing else and reads its reply.
pub async fn roundtrip(
    ctx: &UpstreamCtx,
    stream: &mut TcpStream,
    frame: &[u8],
    buf: &mut BytesMut,
) -> Result<Bytes, UpstreamError> {
    let fut = async {
        stream
            .write_all(frame)
            .await
            .map_err(|e| UpstreamError::unavailable(&ctx.name, e))?;
        let mut scanner = ReplyScanner::new();
        loop {
            match scanner.scan(buf, ctx.max_nesting_depth) {
                Ok(Some(n)) => return Ok(buf.split_to(n).freeze()),
                Ok(None) => {}
                Err(e) => {
                    return Err(UpstreamError::Malformed {
                        upstream: ctx.name.clone(),
                        reason: e.0.into(),
                    });
                }
            }
            buf.reserve(4096);
            match stream.read_buf(buf).await {
                Ok(0) => {
                    return Err(UpstreamError::Closed {
                        upstream: ctx.name.clone(),
                    });
                }
                Ok(_) => {}
                Err(e) => return Err(UpstreamError::unavailable(&ctx.name, e)),
            }
        }
    };
    match tokio::time::timeout(ctx.connect_timeout.max(ctx.command_timeout), fut).await {
        Ok(r) => r,
        Err(_) => Err(UpstreamError::Timeout {
            upstream: ctx.name.clone(),
            timeout: ctx.command_timeout,
        }),
    }
}

/// Connects and runs the handshake: `HELLO <proto> [AUTH user pass]`, then `SELECT` and
/// `CLIENT SETNAME` when the setup asks for them.
pub async fn open(ctx: &UpstreamCtx, setup: &Setup) -> Result<TcpStream, UpstreamError> {
    let mut stream = connect(ctx).await?;
    let mut buf = BytesMut::with_capacity(1024);
    let mut hello: Vec<Bytes> = vec![Bytes::from_static(b"HELLO"), Bytes::from_static(b"2")];
    if setup.proto == Proto::Resp3 {
        hello[1] = Bytes::from_static(b"3");
    }
    if let Some(c) = &setup.credentials {
        hello.push(Bytes::from_static(b"AUTH"));
        hello.push(Bytes::from(
            c.username.clone().unwrap_or_else(|| "default".to_owned()),
        ));
        hello.push(Bytes::from(c.password.clone()));
    }
    let reply = roundtrip(ctx, &mut stream, &encode_command(&hello), &mut buf).await?;
    if is_error_reply(&reply) {
        let text: Arc<str> = String::from_utf8_lossy(&reply[1..]).trim_end().into();
        if matches!(classify_error_reply(&reply, false), ReplyClass::AuthProblem) {
            ctx.metrics.auth_errors.inc();
            // Without credentials this is the client's job (it will AUTH); with them it is a
            // misconfiguration that waiting will not fix: say so loudly, once per episode.
            if setup.credentials.is_some()
                && !ctx
                    .auth_warned
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                warn!(upstream = %ctx.name, reply = %text, "upstream rejected redfuse's credentials; check username/password");
            }
            return Err(UpstreamError::Auth {
                upstream: ctx.name.clone(),
                reply: text,
            });
        }
        return Err(UpstreamError::unavailable(
            &ctx.name,
            format!("handshake failed: {text}"),
        ));
    }
    ctx.auth_warned
        .store(false, std::sync::atomic::Ordering::Relaxed);
    if let Some(info) = ServerInfo::parse(&reply) {
        ctx.remember_server_info(info);
    }
    if setup.db != 0 {
        let select = encode_command(&[b"SELECT".as_slice(), setup.db.to_string().as_bytes()]);
        let reply = roundtrip(ctx, &mut stream, &select, &mut buf).await?;
        if is_error_reply(&reply) {
            return Err(UpstreamError::unavailable(
                &ctx.name,
                "SELECT failed during handshake",
            ));
        }
    }
    if let Some(name) = &setup.client_name {
        let cmd = encode_command(&[b"CLIENT".as_slice(), b"SETNAME", name]);
        roundtrip(ctx, &mut stream, &cmd, &mut buf).await?;
    }
    Ok(stream)
}

/// Starts a shared connection task that reconnects with back-off for as long as a handle exists.
pub fn spawn_shared(ctx: Arc<UpstreamCtx>, setup: Setup, depth: usize) -> ConnHandle {
    let (tx, rx) = mpsc::channel(depth);
    let id = next_conn_id();
    tokio::spawn(run_shared(ctx, setup, rx, id));
    ConnHandle {
        tx,
        id,
        abandon: None,
    }
}

/// Runs a dedicated connection on an already opened stream; it ends with its socket.
pub fn spawn_dedicated(ctx: Arc<UpstreamCtx>, stream: TcpStream, depth: usize) -> ConnHandle {
    let (tx, mut rx) = mpsc::channel(depth);
    let id = next_conn_id();
    let abandon = Arc::new(Abandon::default());
    let watch = abandon.clone();
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
        let end = pipeline(&ctx, stream, &mut rx, None, Some(&watch)).await;
        drop(gauge);
        debug!(upstream = %ctx.name, conn = id, "dedicated connection ended: {end:?}");
        rx.close();
        let err = end.error(&ctx);
        while let Ok(call) = rx.try_recv() {
            call.fail(err.clone());
        }
    });
    ConnHandle {
        tx,
        id,
        abandon: Some(abandon),
    }
}

async fn run_shared(ctx: Arc<UpstreamCtx>, setup: Setup, mut rx: mpsc::Receiver<Call>, id: u64) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    let mut logged_down = false;
    // A request that arrived during back-off and triggered this attempt.
    let mut first: Option<Call> = None;
    loop {
        let attempt = open(&ctx, &setup).await;
        if let (Err(err), Some(call)) = (&attempt, first.take()) {
            call.fail(err.clone());
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
                let end = pipeline(&ctx, stream, &mut rx, first.take(), None).await;
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
                        _ = &mut retry => break,
                        _ = ctx.reconnect.notified() => break,
                        _ = &mut min_gap, if !gap_passed => gap_passed = true,
                        call = rx.recv() => match call {
                            // Another connection to this upstream is up: Redis is back.
                            Some(call) if gap_passed || ctx.connected.load(std::sync::atomic::Ordering::Relaxed) > 0 => {
                                first = Some(call);
                                break;
                            }
                            Some(call) => call.fail(err.clone()),
                            None => return,
                        },
                    }
                }
            }
        }
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
            Ended::HandlesDropped | Ended::Abandoned => UpstreamError::Closed { upstream },
        }
    }
}

struct Pending {
    reply: oneshot::Sender<Reply>,
    sent: Instant,
    deadline: Option<Instant>,
    is_write: bool,
    guard: Option<CallGuard>,
    _inflight: Option<Inflight>,
    on_reply: Option<OnReply>,
}

const WRITE_BATCH_BYTES: usize = 256 * 1024;
const DIRECT_WRITE_BYTES: usize = 64 * 1024;

async fn pipeline(
    ctx: &UpstreamCtx,
    mut stream: TcpStream,
    rx: &mut mpsc::Receiver<Call>,
    mut first: Option<Call>,
    abandon: Option<&Abandon>,
) -> Ended {
    let (mut rd, mut wr) = stream.split();
    let pending: Mutex<VecDeque<Pending>> = Mutex::new(VecDeque::new());
    let armed = Notify::new();
    // Set when every handle is gone: replies still pending (a client's last BLPOP during a
    // graceful shutdown) are read before the connection ends.
    let closing = std::sync::atomic::AtomicBool::new(false);

    let writer = async {
        let mut out = BytesMut::with_capacity(16 * 1024);
        loop {
            let call = match first.take() {
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
            let mut next = Some(call);
            while let Some(call) = next.take() {
                let now = Instant::now();
                let deadline = (!call.blocking).then(|| now + ctx.command_timeout);
                let frame = call.frame;
                {
                    let mut q = pending.lock().unwrap_or_else(|e| e.into_inner());
                    if q.is_empty() {
                        armed.notify_one();
                    }
                    q.push_back(Pending {
                        reply: call.reply,
                        sent: now,
                        deadline,
                        is_write: call.is_write,
                        guard: call.guard,
                        _inflight: call.inflight,
                        on_reply: call.on_reply,
                    });
                }
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
                } else {
                    out.extend_from_slice(&frame);
                }
                if out.len() < WRITE_BATCH_BYTES {
                    next = rx.try_recv().ok();
                }
            }
            if !out.is_empty() {
                if let Err(e) = wr.write_all(&out).await {
                    return Ended::Io(e);
                }
                out.clear();
            }
        }
    };

    let reader = async {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let mut scanner = ReplyScanner::new();
        let far = Duration::from_secs(86400 * 365);
        let timer = tokio::time::sleep(far);
        tokio::pin!(timer);
        loop {
            loop {
                match scanner.scan(&buf, ctx.max_nesting_depth) {
                    Ok(Some(n)) => {
                        let frame = buf.split_to(n).freeze();
                        if let Err(end) = complete(ctx, &pending, frame) {
                            return end;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => return Ended::Malformed(e.0),
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
                _ = &mut timer, if deadline.is_some() => return Ended::Timeout,
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
    };
    match &end {
        Ended::Timeout => ctx.metrics.timeouts.inc(),
        Ended::Malformed(_) => ctx.metrics.protocol_errors.inc(),
        _ => {}
    }
    let err = end.error(ctx);
    let drained: Vec<Pending> = pending
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .drain(..)
        .collect();
    let mut counted = false;
    for p in drained {
        // Only the oldest request saw the failure; the rest are collateral (one slow command
        // must not count as many failures and trip the breaker for everyone). Calls without a
        // permit (fences) do not take that place.
        if let Some(g) = p.guard {
            let first = !std::mem::replace(&mut counted, true);
            let outcome = if first && !matches!(end, Ended::Abandoned) {
                outcome_of_error(&err)
            } else {
                Outcome::Ignored
            };
            g.complete(outcome);
        }
        let result = Err(err.clone());
        if let Some(f) = p.on_reply {
            run_on_reply(f, &result);
        }
        let _ = p.reply.send(result);
    }
    end
}

/// Hands a reply frame to the oldest pending request.
fn complete(
    ctx: &UpstreamCtx,
    pending: &Mutex<VecDeque<Pending>>,
    frame: Bytes,
) -> Result<(), Ended> {
    // Out-of-band RESP3 pushes belong to no request.
    if frame.first() == Some(&b'>') {
        return Ok(());
    }
    let Some(p) = pending
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .pop_front()
    else {
        return Err(Ended::Malformed("reply without a request".to_owned()));
    };
    let latency = p.sent.elapsed();
    ctx.metrics.latency.observe(latency.as_secs_f64());
    if let Some(g) = p.guard {
        let outcome = if is_error_reply(&frame) {
            match classify_error_reply(&frame, p.is_write) {
                ReplyClass::Failure(kind) => Outcome::Failure(kind),
                ReplyClass::AuthProblem => {
                    ctx.metrics.auth_errors.inc();
                    Outcome::Success { latency }
                }
                ReplyClass::Success => Outcome::Success { latency },
            }
        } else {
            Outcome::Success { latency }
        };
        g.complete(outcome);
    }
    let result = Ok(frame);
    if let Some(f) = p.on_reply {
        run_on_reply(f, &result);
    }
    let _ = p.reply.send(result);
    Ok(())
}

/// A hook is cache bookkeeping: if it ever panicked, the connection task (shared by many
/// clients) must carry on.
fn run_on_reply(f: OnReply, result: &Reply) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(result))).is_err() {
        tracing::error!("reply hook panicked; continuing");
    }
}
