//! One client connection: read requests, route each, queue its reply slot in order.
//!
//! Routing keeps the client unable to tell redfuse from Redis:
//! - per-connection bookkeeping (`HELLO`, `PING`, `CLIENT SETNAME/GETNAME/ID/SETINFO`,
//!   `SELECT 0`, `QUIT`, `RESET`) is answered here, byte-identical to Redis;
//! - stateless commands go to the client's shared pipelined connection;
//! - commands whose state lives in the server's connection (`SELECT n`, `MULTI`, `WATCH`,
//!   blocking commands) pin a dedicated connection until that state is gone;
//! - pub/sub, `MONITOR` and `CLIENT TRACKING|REPLY` turn the session into a raw pipe to a
//!   connection of its own for the rest of its life.
//!
//! When a client's commands move from one upstream connection to another, a `PING` fence
//! on the old connection waits until everything sent there has executed, so commands still
//! run in the order the client sent them. The fence waits on Redis, never on the client
//! reading its replies, so a client that writes a whole pipeline before reading cannot
//! deadlock it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::debug;

use super::Server;
use super::writer::{Hook, Slot, SlotKind};
use crate::cache::Flight;
use crate::command::{self, CommandSpec, Route};
use crate::config::Credentials;
use crate::degrade::ClientView;
use crate::error::{Error, UpstreamError, error_reply};
use crate::metrics::unknown_command_id;
use crate::protocol::{Proto, Request, encode_command, is_error_reply, parse_request, reply};
use crate::upstream::conn::{self, OnReply, outcome_of_error, roundtrip};
use crate::upstream::{Call, ConnHandle, Reply, Setup, Upstream};

/// Whether the read loop goes on after a request.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Stop,
}

struct Pinned {
    upstream: Arc<Upstream>,
    conn: ConnHandle,
}

struct Tunnel {
    wr: OwnedWriteHalf,
    pipe: JoinHandle<()>,
}

pub struct Session {
    server: Arc<Server>,
    id: u64,
    proto: Proto,
    credentials: Option<Credentials>,
    name: Option<Bytes>,
    db: u32,
    in_multi: bool,
    watching: bool,
    pinned: Option<Pinned>,
    tunnel: Option<Tunnel>,
    /// Writes queued inside MULTI, invalidated again at EXEC.
    multi_writes: Vec<Request>,
    /// This client's shared connection per upstream (index as in `Server::upstreams`).
    shared: Vec<Option<ConnHandle>>,
    /// Per upstream, the connection this client's previous command to it went to, for fencing.
    last_conn: Vec<Option<ConnHandle>>,
    /// False after a SELECT whose outcome redfuse could not see (inside MULTI without a
    /// readable answer, or in a pipe): the cache is then neither filled nor read for this
    /// client, writes invalidate their keys in every db, and the pinned connection is never
    /// handed to another client.
    db_known: bool,
    /// A SELECT was queued in the current MULTI: the db is learnt again after EXEC.
    multi_select: bool,
    /// This client's writes sent on shared connections and not yet answered: while there are
    /// any, its reads do not join another client's in-flight read, which may have run before
    /// the write.
    writes_in_flight: Arc<AtomicUsize>,
    /// Blocking commands sent on the dedicated connection and not yet answered. Nothing waits
    /// behind one (no unpin, no fence, no awaited SELECT): a wait there would keep redfuse from
    /// noticing that the client left, and the command from being dropped with it.
    blocking_inflight: Arc<AtomicUsize>,
    /// Dedicated connections given up while a blocking command may still wait on them (RESET,
    /// SUBSCRIBE): abandoned with the rest if the client leaves.
    retired: Vec<ConnHandle>,
    slots: mpsc::Sender<Slot>,
}

const PING: &[u8] = b"*1\r\n$4\r\nPING\r\n";

/// Serves one client until it quits, breaks the protocol, idles out or shutdown begins.
pub async fn run(
    server: Arc<Server>,
    stream: TcpStream,
    id: u64,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    // Replies a client may have outstanding before redfuse stops reading from it: deep enough
    // that a client writing a whole pipeline before reading its replies does not stall.
    let (slots_tx, slots_rx) = mpsc::channel(16 * 1024);
    let writer = tokio::spawn(super::writer::write_replies(wr, slots_rx, server.clone()));
    let server_upstreams = server.upstreams.len();
    let mut session = Session {
        shared: vec![None; server_upstreams],
        credentials: server.config.credentials.clone(),
        server,
        id,
        proto: Proto::Resp2,
        name: None,
        db: 0,
        in_multi: false,
        watching: false,
        pinned: None,
        tunnel: None,
        multi_writes: Vec::new(),
        last_conn: vec![None; server_upstreams],
        db_known: true,
        multi_select: false,
        writes_in_flight: Arc::new(AtomicUsize::new(0)),
        blocking_inflight: Arc::new(AtomicUsize::new(0)),
        retired: Vec::new(),
        slots: slots_tx,
    };
    let mut rd = rd;
    let end = session.read_loop(&mut rd, &mut shutdown).await;
    let abandon = |session: &Session| {
        // Redis would drop a vanished client's blocking command; a dedicated connection left
        // waiting would otherwise pop data that nobody reads.
        if let Some(p) = &session.pinned {
            p.conn.abandon();
        }
        for c in &session.retired {
            c.abandon();
        }
    };
    if end == End::ClientGone {
        abandon(&session);
    }
    let tunnel = session.tunnel.take();
    let mut writer = writer;
    if matches!(end, End::Quit | End::Closed)
        && (session.pinned.is_some() || !session.retired.is_empty())
    {
        // Replies are still owed (QUIT's +OK may wait behind a BLPOP): watch for the client
        // leaving meanwhile, so a blocked command does not outlive it.
        tokio::select! {
            _ = wait_for_eof(&mut rd) => abandon(&session),
            _ = &mut writer => {}
        }
    }
    drop(session);
    match tunnel {
        // QUIT through a pipe: Redis answers and closes, which ends the pipe; give it a moment.
        Some(t) if end == End::Quit => {
            let abort = t.pipe.abort_handle();
            if tokio::time::timeout(std::time::Duration::from_secs(5), writer)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        Some(t) => {
            t.pipe.abort();
            let _ = writer.await;
        }
        None => {
            let _ = writer.await;
        }
    }
}

/// Reads and discards until the client closes its side.
async fn wait_for_eof(rd: &mut OwnedReadHalf) {
    let mut scratch = [0u8; 4096];
    loop {
        match rd.read(&mut scratch).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Why a session stopped reading.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The client closed its side or the socket failed.
    ClientGone,
    /// QUIT: replies before it still go out.
    Quit,
    /// A protocol error, an idle timeout, or a lost pinned connection: the connection is closed.
    Closed,
    /// Graceful shutdown: in-flight replies still go out.
    Shutdown,
}

impl Session {
    async fn read_loop(
        &mut self,
        rd: &mut OwnedReadHalf,
        shutdown: &mut watch::Receiver<bool>,
    ) -> End {
        let limits = self.server.config.limits;
        let idle = self.server.config.idle_timeout;
        let mut buf = BytesMut::with_capacity(16 * 1024);
        loop {
            loop {
                match parse_request(&mut buf, &limits) {
                    Ok(Some(req)) => {
                        let quit = req.name().eq_ignore_ascii_case(b"quit");
                        if self.dispatch(req).await == Flow::Stop {
                            return if quit { End::Quit } else { End::Closed };
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        self.server.metrics.client_protocol_errors.inc();
                        debug!(client = self.id, "protocol error: {e}");
                        self.push(Slot::ready(
                            unknown_command_id(),
                            error_reply(&Error::Client(e)),
                        ))
                        .await;
                        self.push(Slot {
                            command: unknown_command_id(),
                            kind: SlotKind::Close,
                        })
                        .await;
                        return End::ClientGone;
                    }
                }
            }
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve(16 * 1024);
            }
            // A session in a pipe (subscribers, MONITOR) is exempt from the idle timeout, as in Redis.
            // Pinned sessions may be blocked in BLPOP & co., which Redis also exempts.
            let idle_deadline = idle.filter(|_| self.tunnel.is_none() && self.pinned.is_none());
            tokio::select! {
                r = rd.read_buf(&mut buf) => match r {
                    Ok(0) | Err(_) => return End::ClientGone,
                    Ok(n) => self.server.metrics.bytes_received.inc_by(n as u64),
                },
                _ = shutdown.changed() => return End::Shutdown,
                _ = sleep_or_forever(idle_deadline) => {
                    debug!(client = self.id, "closing idle client");
                    return End::Closed;
                }
            }
        }
    }

    async fn push(&self, slot: Slot) {
        // The writer only goes away when the client socket is gone; nothing to do then.
        let _ = self.slots.send(slot).await;
    }

    async fn push_ready(&self, command: usize, reply: Bytes) {
        self.push(Slot::ready(command, reply)).await;
    }

    async fn dispatch(&mut self, req: Request) -> Flow {
        let spec = command::lookup(req.name());
        let id = spec.map_or_else(unknown_command_id, |s| s.id);
        if self.tunnel.is_some() {
            return self.tunnel_send(req).await;
        }
        let name = spec.map_or("", |s| s.name);
        if self.in_multi {
            // Inside MULTI everything is queued by the server, except what ends the connection.
            return match name {
                "quit" => self.quit(id).await,
                "reset" => self.reset(id).await,
                "exec" | "discard" => {
                    let with_select = std::mem::take(&mut self.multi_select);
                    let flow = if name == "exec" && with_select {
                        self.exec_with_select(req, id).await
                    } else {
                        self.pinned_send(req, id, false).await
                    };
                    self.in_multi = false;
                    self.watching = false;
                    flow
                }
                _ => {
                    if name == "select" {
                        // Takes effect at EXEC, if at all: until redfuse reads it back, the db
                        // is unknown (writes invalidate in every db, the cache is off).
                        self.multi_select = true;
                        self.db_known = false;
                    }
                    self.pinned_send(req, id, false).await
                }
            };
        }
        let Some(spec) = spec else {
            return self.forward(req, id, None).await;
        };
        match spec.route {
            Route::Local => self.local(req, spec).await,
            Route::Pin => self.stateful(req, spec).await,
            Route::Blocking if matches!(spec.name, "wait" | "waitaof") => {
                self.wait_replication(req, id).await
            }
            Route::Blocking => self.pinned_send(req, id, true).await,
            Route::Tunnel => self.enter_tunnel(req, id).await,
            Route::Shared if command::is_blocking(spec, &req.args) => {
                self.pinned_send(req, id, true).await
            }
            Route::Shared => self.forward(req, id, Some(spec)).await,
        }
    }

    /// A stateless command: to the pinned connection while there is one, else shared.
    async fn forward(
        &mut self,
        req: Request,
        id: usize,
        spec: Option<&'static CommandSpec>,
    ) -> Flow {
        if self.pinned.is_some() {
            if self.db != 0 || self.watching || !self.db_known || self.blocked() {
                return self.pinned_send(req, id, false).await;
            }
            self.unpin().await;
        }
        let is_write = spec.is_none_or(|s| command::is_write(s, &req.args));
        let is_read = spec.is_some_and(|s| command::is_read(s, &req.args));
        if is_write {
            self.invalidate_write(&req, spec);
        }
        let mut admitted = None;
        for index in self.server.route(is_read) {
            let upstream = &self.server.upstreams[index];
            if let Ok(guard) = upstream.breaker.try_acquire() {
                admitted = Some((index, guard));
                break;
            }
        }
        let Some((index, guard)) = admitted else {
            return self.degraded(req, id, spec).await;
        };
        if is_write
            && index == self.server.primary_index()
            && let Err(e) = self.server.wait_for_replay().await
        {
            drop(guard);
            self.push_ready(id, error_reply(&e.into())).await;
            return Flow::Continue;
        }
        let upstream = self.server.upstreams[index].clone();
        let Some(inflight) = upstream.admit() else {
            // Shed load here rather than pile onto a struggling Redis; not the server's fault.
            drop(guard);
            upstream.ctx.metrics.bulkhead_overflow.inc();
            let err = UpstreamError::Overloaded {
                upstream: upstream.name().clone(),
            };
            self.push_ready(id, error_reply(&err.into())).await;
            return Flow::Continue;
        };
        let view = self.view();
        let fill = match spec {
            Some(spec) if is_read => self.server.degrade.plan_fill(view, &req, spec),
            _ => None,
        };
        let mut on_reply: Option<OnReply> = None;
        if let Some(fill) = &fill {
            let mut leader = None;
            let may_share = self.writes_in_flight.load(Ordering::Acquire) == 0;
            if let Some(key) = fill.flight_key().filter(|_| may_share) {
                match self.server.flights.join(key) {
                    Flight::Leader(guard) => leader = Some(guard),
                    Flight::Follower(follower) => {
                        // The identical read already in flight answers this one too.
                        drop((guard, inflight));
                        let hook = spec.map(|spec| {
                            Box::new(Hook {
                                fill: fill.clone(),
                                view,
                                command: spec.name,
                            })
                        });
                        self.push(Slot {
                            command: id,
                            kind: SlotKind::Follower(follower, hook),
                        })
                        .await;
                        return Flow::Continue;
                    }
                }
            }
            let server = self.server.clone();
            let fill = fill.clone();
            on_reply = Some(Box::new(move |result: &Reply| {
                if let Ok(reply) = result
                    && !is_error_reply(reply)
                {
                    server.degrade.apply_fill(fill, reply);
                }
                if let Some(leader) = leader {
                    leader.finish(result.clone());
                }
            }));
        } else if is_write {
            // Invalidate again once the write has run: a read on another connection may have
            // filled the old value in between.
            let server = self.server.clone();
            let writes = self.writes_in_flight.clone();
            writes.fetch_add(1, Ordering::AcqRel);
            let db = self.db_known.then_some(self.db);
            let req = req.clone();
            on_reply = Some(Box::new(move |_: &Reply| {
                if let Some(spec) = spec {
                    server.degrade.invalidate_for_write(db, &req, spec);
                }
                writes.fetch_sub(1, Ordering::AcqRel);
            }));
        }
        let hook = fill.zip(spec).map(|(fill, spec)| {
            Box::new(Hook {
                fill,
                view,
                command: spec.name,
            })
        });
        let conn = match &self.shared[index] {
            Some(c) => c.clone(),
            None => {
                let c = upstream.shared_conn(self.proto, &self.credentials);
                self.shared[index] = Some(c.clone());
                c
            }
        };
        self.fence(index, &conn).await;
        let (mut call, rx) = Call::new(req.raw, false, is_write);
        call.guard = Some(guard);
        call.inflight = Some(inflight);
        call.on_reply = on_reply;
        let name = upstream.name().clone();
        conn.send(call, || {
            UpstreamError::unavailable(&name, "connection task ended")
        })
        .await;
        self.push(Slot {
            command: id,
            kind: SlotKind::Waiting(rx, hook),
        })
        .await;
        Flow::Continue
    }

    /// WAIT/WAITAOF count the replicas that acknowledged the writes of *this connection*.
    /// The client's writes went over shared connections, so after fencing them a replicated
    /// no-op (`PUBLISH` to a private channel) on the client's dedicated connection carries the
    /// replication offset past them, and WAIT there waits for at least that: never a count of
    /// replicas that lack the client's writes, and no shared pipeline is held while it waits.
    async fn wait_replication(&mut self, req: Request, id: usize) -> Flow {
        self.fence_all().await;
        if !self.ensure_pinned(&req, id).await {
            return Flow::Continue;
        }
        let blocked = self.blocked();
        if let Some(p) = &self.pinned {
            let marker = encode_command(&["PUBLISH", "__redfuse:wait", ""]);
            let (call, rx) = Call::new(marker, false, false);
            p.conn
                .send(call, || UpstreamError::Closed {
                    upstream: p.upstream.name().clone(),
                })
                .await;
            // Without the marker WAIT could count replicas that lack the client's writes:
            // if Redis refused it (an ACL without that channel), say so instead.
            if !blocked
                && let Ok(Ok(reply)) = rx.await
                && is_error_reply(&reply)
            {
                self.push_ready(id, reply).await;
                return Flow::Continue;
            }
        }
        self.pinned_send(req, id, true).await
    }

    /// Keeps a dedicated connection that may still hold a blocking command of this client,
    /// so it can be abandoned if the client leaves; ones already finished are let go.
    fn retire(&mut self, conn: ConnHandle) {
        self.retired.retain(|c| !c.is_closed());
        self.retired.push(conn);
    }

    fn blocked(&self) -> bool {
        self.blocking_inflight.load(Ordering::Acquire) > 0
    }

    /// The client's database, if redfuse knows it.
    fn db(&self) -> Option<u32> {
        self.db_known.then_some(self.db)
    }

    /// Drops the cache entries a write may change (before it is sent).
    fn invalidate_write(&self, req: &Request, spec: Option<&'static CommandSpec>) {
        match spec {
            Some(spec) => self
                .server
                .degrade
                .invalidate_for_write(self.db(), req, spec),
            // A command the table does not know (a module's, a newer Redis's): its first
            // argument is most likely a key.
            None => {
                if let Some(key) = req.args.get(1) {
                    match self.db() {
                        Some(db) => self.server.degrade.cache.invalidate(db, key),
                        None => self.server.degrade.cache.invalidate_everywhere(key),
                    };
                }
            }
        }
    }

    /// Writes on dedicated connections and pipes invalidate the cache like shared ones. Inside
    /// MULTI the write only happens at EXEC, so its request is kept to invalidate again then:
    /// a read by another client between queueing and EXEC could otherwise re-cache the old value.
    fn invalidate_if_write(&mut self, req: &Request) {
        let spec = command::lookup(req.name());
        match spec.map(|s| s.name) {
            Some("exec") => {
                for queued in std::mem::take(&mut self.multi_writes) {
                    self.invalidate_write(&queued, command::lookup(queued.name()));
                }
            }
            Some("discard") => self.multi_writes.clear(),
            _ if spec.is_none_or(|s| command::is_write(s, &req.args)) => {
                self.invalidate_write(req, spec);
                if self.in_multi {
                    self.multi_writes.push(req.clone());
                }
            }
            _ => {}
        }
    }

    fn view(&self) -> ClientView {
        ClientView {
            db: self.db,
            proto: self.proto,
            cache: self.db_known
                && same_identity(&self.credentials, &self.server.config.credentials),
        }
    }

    /// No upstream admits the request: degraded mode answers it.
    async fn degraded(
        &mut self,
        req: Request,
        id: usize,
        spec: Option<&'static CommandSpec>,
    ) -> Flow {
        let upstream = self.server.primary();
        let err = UpstreamError::CircuitOpen {
            upstream: upstream.name().clone(),
        };
        let (reply, origin) = self.server.unavailable_reply(self.view(), &req, spec, err);
        self.push(Slot {
            command: id,
            kind: SlotKind::Ready(reply, origin),
        })
        .await;
        Flow::Continue
    }

    /// Waits until everything this client sent to another connection of the same upstream
    /// has executed. Across upstreams (replica reads) there is no order to keep: replication
    /// lag already gives none.
    async fn fence(&mut self, upstream: usize, next: &ConnHandle) {
        let prev = match self.last_conn[upstream].replace(next.clone()) {
            Some(prev) if prev.id != next.id => prev,
            _ => return,
        };
        await_ping(&prev).await;
    }

    /// Fences every connection this client used, and forgets them.
    async fn fence_all(&mut self) {
        let blocked = self
            .blocked()
            .then(|| self.pinned.as_ref().map(|p| p.conn.id))
            .flatten();
        for prev in std::mem::take(&mut self.last_conn).into_iter().flatten() {
            if Some(prev.id) != blocked {
                await_ping(&prev).await;
            }
        }
        self.last_conn = vec![None; self.server.upstreams.len()];
    }

    fn setup(&self) -> Setup {
        Setup {
            proto: self.proto,
            credentials: self.credentials.clone(),
            db: self.db,
            client_name: None,
        }
    }

    /// Makes sure this client has a dedicated connection; false when it could not get one
    /// (the reply for `req` is then queued).
    async fn ensure_pinned(&mut self, req: &Request, id: usize) -> bool {
        if self.pinned.is_some() {
            return true;
        }
        let upstream = self.server.primary().clone();
        let Ok(guard) = upstream.breaker.try_acquire() else {
            let spec = command::lookup(req.name());
            self.degraded(req.clone(), id, spec).await;
            return false;
        };
        match upstream.dedicated(&self.setup()).await {
            Ok((conn, fresh)) => {
                // Reusing an idle connection proves nothing about the server.
                if fresh {
                    guard.success();
                }
                self.pinned = Some(Pinned { upstream, conn });
                true
            }
            Err(e) => {
                guard.complete(outcome_of_error(&e));
                self.push_ready(id, error_reply(&e.into())).await;
                false
            }
        }
    }

    /// Sends on this client's dedicated connection, opening one if needed; returns the
    /// reply's receiver, or None when the request was answered otherwise.
    async fn pinned_call(
        &mut self,
        req: Request,
        id: usize,
        blocking: bool,
    ) -> Result<Option<oneshot::Receiver<Reply>>, Flow> {
        let is_write =
            command::lookup(req.name()).is_none_or(|spec| command::is_write(spec, &req.args));
        if is_write && let Err(e) = self.server.wait_for_replay().await {
            self.push_ready(id, error_reply(&e.into())).await;
            return Ok(None);
        }
        if !self.ensure_pinned(&req, id).await {
            return Ok(None);
        }
        let (conn, name) = {
            let p = self.pinned.as_ref().expect("pinned above");
            (p.conn.clone(), p.upstream.name().clone())
        };
        if conn.is_closed() {
            // The server-side state this client relied on is gone; Redis would have closed it.
            let err = UpstreamError::Closed { upstream: name };
            self.push_ready(id, error_reply(&err.into())).await;
            self.push(Slot {
                command: id,
                kind: SlotKind::Close,
            })
            .await;
            return Err(Flow::Stop);
        }
        let primary = self.server.primary_index();
        self.fence(primary, &conn).await;
        // A transaction's writes run at EXEC: invalidated when EXEC is sent and again when its
        // reply arrives.
        let exec_writes = match req.name().eq_ignore_ascii_case(b"exec") {
            true => self.multi_writes.clone(),
            false => Vec::new(),
        };
        self.invalidate_if_write(&req);
        let (mut call, rx) = Call::new(req.raw.clone(), blocking, true);
        if blocking {
            let counter = self.blocking_inflight.clone();
            counter.fetch_add(1, Ordering::AcqRel);
            call.on_reply = Some(Box::new(move |_: &Reply| {
                counter.fetch_sub(1, Ordering::AcqRel);
            }));
        } else if !exec_writes.is_empty() {
            let server = self.server.clone();
            let db = self.db();
            call.on_reply = Some(Box::new(move |_: &Reply| {
                for w in &exec_writes {
                    if let Some(spec) = command::lookup(w.name()) {
                        server.degrade.invalidate_for_write(db, w, spec);
                    }
                }
            }));
        } else if is_write && let Some(spec) = command::lookup(req.name()) {
            // As on shared connections: invalidate again once the write has run.
            let server = self.server.clone();
            let db = self.db();
            let write = req.clone();
            call.on_reply = Some(Box::new(move |_: &Reply| {
                server.degrade.invalidate_for_write(db, &write, spec);
            }));
        }
        conn.send(call, || UpstreamError::Closed { upstream: name })
            .await;
        Ok(Some(rx))
    }

    async fn pinned_send(&mut self, req: Request, id: usize, blocking: bool) -> Flow {
        match self.pinned_call(req, id, blocking).await {
            Ok(Some(rx)) => {
                self.push(Slot {
                    command: id,
                    kind: SlotKind::Waiting(rx, None),
                })
                .await;
                Flow::Continue
            }
            Ok(None) => Flow::Continue,
            Err(flow) => flow,
        }
    }

    /// Like `pinned_send`, but waits for the reply (for the few commands whose reply
    /// changes what redfuse knows about the connection) and returns it too.
    async fn pinned_roundtrip(&mut self, req: Request, id: usize) -> Result<Option<Bytes>, Flow> {
        let Some(rx) = self.pinned_call(req, id, false).await? else {
            return Ok(None);
        };
        let reply = match rx.await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => error_reply(&e.into()),
            Err(_) => error_reply(&Error::Internal("reply dropped".into())),
        };
        self.push_ready(id, reply.clone()).await;
        Ok(Some(reply))
    }

    /// Returns the dedicated connection once its server-side state is back to a fresh one.
    async fn unpin(&mut self) {
        if let Some(p) = self.pinned.take() {
            let primary = self.server.primary_index();
            self.last_conn[primary] = None;
            if await_ping(&p.conn).await && self.db_known && self.db == 0 {
                p.upstream.release_dedicated(self.setup(), p.conn);
            }
        }
    }

    async fn stateful(&mut self, req: Request, spec: &'static CommandSpec) -> Flow {
        let id = spec.id;
        match spec.name {
            "select" => return self.select(req, id).await,
            "exec" | "discard" | "unwatch" if self.pinned.is_none() => {
                // Nothing to end: Redis answers (an error, or OK for UNWATCH) on any connection.
                return self.forward(req, id, Some(spec)).await;
            }
            "exec" | "discard" | "unwatch" => self.watching = false,
            _ => {}
        }
        let flow = self.pinned_send(req, id, false).await;
        // The state exists only once the command reached the dedicated connection.
        if self.pinned.is_some() {
            match spec.name {
                "multi" => self.in_multi = true,
                "watch" => self.watching = true,
                _ => {}
            }
        }
        flow
    }

    /// SELECT changes which database redfuse caches under, so its reply is awaited: the db
    /// is updated only when Redis said OK.
    async fn select(&mut self, req: Request, id: usize) -> Flow {
        let db = (req.args.len() == 2)
            .then(|| std::str::from_utf8(&req.args[1]).ok()?.parse::<u32>().ok())
            .flatten();
        match db {
            // Malformed: Redis's own error text, from any connection.
            None => self.forward(req, id, None).await,
            Some(0) if self.db == 0 && self.db_known && self.pinned.is_none() => {
                self.push_ready(id, reply::ok()).await;
                Flow::Continue
            }
            Some(_) if self.blocked() => {
                // Its answer queues behind the blocking command: not waited for, so the db is
                // unknown until a later SELECT.
                let flow = self.pinned_send(req, id, false).await;
                self.db_known = false;
                flow
            }
            Some(db) => match self.pinned_roundtrip(req, id).await {
                Ok(Some(reply)) => {
                    if &reply[..] == reply::OK {
                        self.db = db;
                        self.db_known = true;
                    }
                    Flow::Continue
                }
                Ok(None) => Flow::Continue,
                Err(flow) => flow,
            },
        }
    }

    /// EXEC of a transaction that queued a SELECT: the database it left the connection in is
    /// read back from Redis (`CLIENT INFO`).
    async fn exec_with_select(&mut self, req: Request, id: usize) -> Flow {
        if self.blocked() {
            // Nothing waits behind a blocking command: the db stays unknown.
            self.db_known = false;
            return self.pinned_send(req, id, false).await;
        }
        match self.pinned_roundtrip(req, id).await {
            Ok(_) => {}
            Err(flow) => return flow,
        }
        self.db_known = false;
        if let Some(p) = &self.pinned {
            let (call, rx) = Call::new(encode_command(&["CLIENT", "INFO"]), false, false);
            p.conn
                .send(call, || UpstreamError::Closed {
                    upstream: "client info".into(),
                })
                .await;
            if let Ok(Ok(info)) = rx.await
                && let Some(db) = parse_client_info_db(&info)
            {
                self.db = db;
                self.db_known = true;
            }
        }
        Flow::Continue
    }

    async fn local(&mut self, req: Request, spec: &'static CommandSpec) -> Flow {
        let id = spec.id;
        let reply = match spec.name {
            "ping" => match req.args.len() {
                1 => Bytes::from_static(reply::PONG),
                2 => reply::bulk(&req.args[1]),
                _ => wrong_arity("ping"),
            },
            "echo" if req.args.len() == 2 => reply::bulk(&req.args[1]),
            "quit" => return self.quit(id).await,
            "reset" => return self.reset(id).await,
            "hello" => return self.hello(req, id).await,
            "auth" => return self.auth(req, id).await,
            "select" => return self.select(req, id).await,
            "client" => return self.client(req, spec).await,
            _ => return self.forward(req, id, Some(spec)).await,
        };
        self.push_ready(id, reply).await;
        Flow::Continue
    }

    async fn quit(&mut self, id: usize) -> Flow {
        self.push_ready(id, reply::ok()).await;
        self.push(Slot {
            command: id,
            kind: SlotKind::Close,
        })
        .await;
        Flow::Stop
    }

    async fn reset(&mut self, id: usize) -> Flow {
        // What was sent before RESET runs before what comes after, on whichever connection.
        self.fence_all().await;
        if let Some(p) = self.pinned.take() {
            // Its server-side state is unknown now: let it close rather than reuse it.
            if self.blocked() {
                self.retire(p.conn);
            } else {
                await_ping(&p.conn).await;
            }
        }
        self.blocking_inflight = Arc::new(AtomicUsize::new(0));
        self.db_known = true;
        self.multi_select = false;
        self.in_multi = false;
        self.watching = false;
        self.multi_writes.clear();
        self.db = 0;
        self.name = None;
        self.set_session_keys(Proto::Resp2, self.server.config.credentials.clone());
        self.push_ready(id, reply::simple("RESET")).await;
        Flow::Continue
    }

    /// Changes what the shared connections' handshake must match.
    fn set_session_keys(&mut self, proto: Proto, credentials: Option<Credentials>) {
        if proto != self.proto || credentials != self.credentials {
            self.proto = proto;
            self.credentials = credentials;
            self.shared.iter_mut().for_each(|c| *c = None);
        }
    }

    async fn hello(&mut self, req: Request, id: usize) -> Flow {
        let args = &req.args;
        let mut proto = self.proto;
        if args.len() >= 2 {
            match std::str::from_utf8(&args[1])
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
            {
                Some(2) => proto = Proto::Resp2,
                Some(3) => proto = Proto::Resp3,
                Some(_) => {
                    self.push_ready(id, reply::error("NOPROTO unsupported protocol version"))
                        .await;
                    return Flow::Continue;
                }
                None => {
                    let e = reply::error("ERR Protocol version is not an integer or out of range");
                    self.push_ready(id, e).await;
                    return Flow::Continue;
                }
            }
        }
        let mut auth: Option<Credentials> = None;
        let mut name: Option<Bytes> = None;
        let mut j = 2;
        while j < args.len() {
            let more = args.len() - 1 - j;
            if args[j].eq_ignore_ascii_case(b"AUTH") && more >= 2 {
                auth = Some(Credentials {
                    username: Some(String::from_utf8_lossy(&args[j + 1]).into_owned()),
                    password: String::from_utf8_lossy(&args[j + 2]).into_owned(),
                });
                j += 3;
            } else if args[j].eq_ignore_ascii_case(b"SETNAME") && more >= 1 {
                name = Some(args[j + 1].clone());
                j += 2;
            } else {
                let msg = format!(
                    "ERR Syntax error in HELLO option '{}'",
                    String::from_utf8_lossy(&args[j])
                );
                self.push_ready(id, reply::error(&msg)).await;
                return Flow::Continue;
            }
        }
        let mut credentials = self.credentials.clone();
        if let Some(candidate) = auth {
            let frame = encode_command(&[
                b"AUTH".as_slice(),
                candidate
                    .username
                    .as_deref()
                    .unwrap_or("default")
                    .as_bytes(),
                candidate.password.as_bytes(),
            ]);
            match self.verify_auth(&candidate, &frame).await {
                Ok(()) => credentials = Some(candidate),
                Err(reply) => {
                    self.push_ready(id, reply).await;
                    return Flow::Continue;
                }
            }
        }
        if let Some(n) = &name {
            if let Err(e) = check_client_name(n) {
                self.push_ready(id, e).await;
                return Flow::Continue;
            }
            self.name = if n.is_empty() { None } else { Some(n.clone()) };
        }
        if let Some(p) = &self.pinned {
            // The pinned connection must act as the client's new user, or it would keep the
            // old user's rights (and be reused under the new one).
            if let Some(c) = credentials
                .as_ref()
                .filter(|c| Some(*c) != self.credentials.as_ref())
            {
                let auth = encode_command(&[
                    b"AUTH".as_slice(),
                    c.username.as_deref().unwrap_or("default").as_bytes(),
                    c.password.as_bytes(),
                ]);
                let (call, rx) = Call::new(auth, false, false);
                p.conn
                    .send(call, || UpstreamError::Closed {
                        upstream: p.upstream.name().clone(),
                    })
                    .await;
                // Not awaited: the connection is FIFO, so what the client sends next runs
                // after it, and nothing may wait behind a blocking command.
                drop(rx);
            }
            // The pinned connection must speak the client's protocol too.
            if proto != self.proto {
                let hello = encode_command(&[
                    b"HELLO".as_slice(),
                    if proto == Proto::Resp3 { b"3" } else { b"2" },
                ]);
                let (call, rx) = Call::new(hello, false, false);
                p.conn
                    .send(call, || UpstreamError::Closed {
                        upstream: p.upstream.name().clone(),
                    })
                    .await;
                // Not awaited: the connection is FIFO, so what the client sends next runs
                // after it, and nothing may wait behind a blocking command.
                drop(rx);
            }
        }
        self.set_session_keys(proto, credentials);
        let info = self.server.server_info().await;
        self.push_ready(id, info.hello_reply(proto, self.id)).await;
        Flow::Continue
    }

    async fn auth(&mut self, req: Request, id: usize) -> Flow {
        let candidate = match req.args.len() {
            2 => Credentials {
                username: None,
                password: String::from_utf8_lossy(&req.args[1]).into_owned(),
            },
            3 => Credentials {
                username: Some(String::from_utf8_lossy(&req.args[1]).into_owned()),
                password: String::from_utf8_lossy(&req.args[2]).into_owned(),
            },
            _ => {
                self.push_ready(id, reply::error("ERR syntax error")).await;
                return Flow::Continue;
            }
        };
        match self.verify_auth(&candidate, &req.raw).await {
            Ok(()) => {
                if self.pinned.is_some() {
                    // Keep the pinned connection's identity in step with the client's.
                    return {
                        let flow = self.pinned_send(req, id, false).await;
                        self.set_session_keys(self.proto, Some(candidate));
                        flow
                    };
                }
                self.set_session_keys(self.proto, Some(candidate));
                self.push_ready(id, reply::ok()).await;
            }
            Err(reply) => self.push_ready(id, reply).await,
        }
        Flow::Continue
    }

    /// Checks credentials against the upstream with the client's own AUTH frame, so that the
    /// error a client sees is exactly Redis's. Known-good credentials are remembered briefly so
    /// clients that authenticate on every connect do not cost a connection each.
    async fn verify_auth(&self, candidate: &Credentials, frame: &[u8]) -> Result<(), Bytes> {
        if self.server.credentials_recently_verified(candidate) {
            return Ok(());
        }
        let upstream = self.server.primary();
        let ctx = &upstream.ctx;
        let mut stream = conn::connect(ctx)
            .await
            .map_err(|e| error_reply(&e.into()))?;
        let mut buf = BytesMut::with_capacity(256);
        let reply = roundtrip(ctx, &mut stream, frame, &mut buf)
            .await
            .map_err(|e| error_reply(&e.into()))?;
        if crate::protocol::is_error_reply(&reply) {
            return Err(reply);
        }
        self.server.remember_verified(candidate.clone());
        Ok(())
    }

    async fn client(&mut self, req: Request, spec: &'static CommandSpec) -> Flow {
        let id = spec.id;
        let Some(sub) = req.args.get(1) else {
            return self.forward(req, id, Some(spec)).await;
        };
        let sub = sub.to_ascii_lowercase();
        let reply = match (sub.as_slice(), req.args.len()) {
            (b"setname", 3) => match check_client_name(&req.args[2]) {
                Ok(()) => {
                    self.name = if req.args[2].is_empty() {
                        None
                    } else {
                        Some(req.args[2].clone())
                    };
                    reply::ok()
                }
                Err(e) => e,
            },
            (b"getname", 2) => match &self.name {
                Some(n) => reply::bulk(n),
                None => reply::null(self.proto),
            },
            (b"id", 2) => reply::integer(self.id as i64),
            (b"setinfo", 4) => client_setinfo(&req.args[2], &req.args[3]),
            (b"setinfo", _) => wrong_arity("client|setinfo"),
            (b"tracking" | b"reply" | b"no-evict" | b"no-touch" | b"caching", _) => {
                return self.enter_tunnel(req, id).await;
            }
            _ => return self.forward(req, id, Some(spec)).await,
        };
        self.push_ready(id, reply).await;
        Flow::Continue
    }

    /// Hands the rest of this connection to a dedicated upstream connection as a raw pipe.
    async fn enter_tunnel(&mut self, req: Request, id: usize) -> Flow {
        let upstream = self.server.primary().clone();
        let Ok(guard) = upstream.breaker.try_acquire() else {
            let spec = command::lookup(req.name());
            return self.degraded(req, id, spec).await;
        };
        // Everything sent before must have run before the pipe's first command does, and
        // queued writes from an outage must reach Redis before this client's.
        self.fence_all().await;
        if let Err(e) = self.server.wait_for_replay().await {
            self.push_ready(id, error_reply(&e.into())).await;
            return Flow::Continue;
        }
        let setup = Setup {
            client_name: self.name.clone(),
            ..self.setup()
        };
        if let Some(p) = self.pinned.take()
            && self.blocked()
        {
            self.retire(p.conn);
        }
        let stream = match conn::open(&upstream.ctx, &setup).await {
            Ok(s) => {
                guard.success();
                s
            }
            Err(e) => {
                guard.complete(outcome_of_error(&e));
                self.push_ready(id, error_reply(&e.into())).await;
                return Flow::Continue;
            }
        };
        let (mut rd, mut wr) = stream.into_split();
        if let Err(e) = wr.write_all(&req.raw).await {
            let err = UpstreamError::unavailable(upstream.name(), e);
            self.push_ready(id, error_reply(&err.into())).await;
            return Flow::Continue;
        }
        let (tx, rx) = mpsc::channel::<Bytes>(64);
        let pipe = tokio::spawn(async move {
            let mut buf = BytesMut::with_capacity(16 * 1024);
            loop {
                if buf.capacity() < 4096 {
                    buf.reserve(16 * 1024);
                }
                match rd.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        if tx.send(buf.split().freeze()).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        self.push(Slot {
            command: id,
            kind: SlotKind::Stream(rx),
        })
        .await;
        self.tunnel = Some(Tunnel { wr, pipe });
        Flow::Continue
    }

    async fn tunnel_send(&mut self, req: Request) -> Flow {
        if req.name().eq_ignore_ascii_case(b"select") {
            // The reply goes by in the raw stream, unread: from now on the db is unknown.
            self.db_known = false;
        }
        self.invalidate_if_write(&req);
        let tunnel = self.tunnel.as_mut().expect("in tunnel");
        if tunnel.wr.write_all(&req.raw).await.is_err() {
            return Flow::Stop;
        }
        // Redis answers QUIT and closes; the pipe then ends and so does the session.
        if req.name().eq_ignore_ascii_case(b"quit") {
            Flow::Stop
        } else {
            Flow::Continue
        }
    }
}

async fn sleep_or_forever(d: Option<std::time::Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

fn wrong_arity(name: &str) -> Bytes {
    reply::error(&format!(
        "ERR wrong number of arguments for '{name}' command"
    ))
}

fn check_client_name(name: &[u8]) -> Result<(), Bytes> {
    if name.iter().any(|&c| !(b'!'..=b'~').contains(&c)) {
        return Err(reply::error(
            "ERR Client names cannot contain spaces, newlines or special characters.",
        ));
    }
    Ok(())
}

fn client_setinfo(attr: &[u8], value: &[u8]) -> Bytes {
    let label = if attr.eq_ignore_ascii_case(b"lib-name") {
        "lib-name"
    } else if attr.eq_ignore_ascii_case(b"lib-ver") {
        "lib-ver"
    } else {
        return reply::error(&format!(
            "ERR Unrecognized option '{}'",
            String::from_utf8_lossy(attr)
        ));
    };
    if value.iter().any(|&c| !(b'!'..=b'~').contains(&c)) {
        return reply::error(&format!(
            "ERR {label} cannot contain spaces, newlines or special characters."
        ));
    }
    reply::ok()
}

/// Sends a PING on `conn` and waits for it: everything sent there before has then run.
/// True when the connection answered.
async fn await_ping(conn: &ConnHandle) -> bool {
    let (call, rx) = Call::new(Bytes::from_static(PING), false, false);
    conn.send(call, || UpstreamError::Closed {
        upstream: "fence".into(),
    })
    .await;
    // Exactly PONG: inside a transaction the answer would be QUEUED, and such a connection
    // must never be handed to another client.
    matches!(rx.await, Ok(Ok(reply)) if &reply[..] == reply::PONG)
}

/// The `db=N` field of a `CLIENT INFO` reply.
fn parse_client_info_db(reply: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(reply).ok()?;
    let field = text
        .split_ascii_whitespace()
        .find_map(|f| f.strip_prefix("db="))?;
    field.parse().ok()
}

/// Whether two credentials name the same Redis user (`AUTH pw` is user `default`).
fn same_identity(a: &Option<Credentials>, b: &Option<Credentials>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            a.username.as_deref().unwrap_or("default") == b.username.as_deref().unwrap_or("default")
                && a.password == b.password
        }
        _ => false,
    }
}
