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

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, watch};
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
use crate::protocol::{Proto, Request, encode_command, parse_request, reply};
use crate::upstream::conn::{self, outcome_of_error, roundtrip};
use crate::upstream::{Call, ConnHandle, Setup, Upstream};

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
    /// The connection (and its upstream's index) the previous command went to, for fencing.
    last_conn: Option<(usize, ConnHandle)>,
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
    let mut session = Session {
        shared: vec![None; server.upstreams.len()],
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
        last_conn: None,
        slots: slots_tx,
    };
    session.read_loop(rd, &mut shutdown).await;
    if let Some(t) = session.tunnel.take() {
        // The pipe ends when its upstream socket closes; on our side that is now.
        t.pipe.abort();
    }
    drop(session);
    let _ = writer.await;
}

impl Session {
    async fn read_loop(&mut self, mut rd: OwnedReadHalf, shutdown: &mut watch::Receiver<bool>) {
        let limits = self.server.config.limits;
        let idle = self.server.config.idle_timeout;
        let mut buf = BytesMut::with_capacity(16 * 1024);
        loop {
            loop {
                match parse_request(&mut buf, &limits) {
                    Ok(Some(req)) => {
                        if self.dispatch(req).await == Flow::Stop {
                            return;
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
                        return;
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
                    Ok(0) | Err(_) => return,
                    Ok(n) => self.server.metrics.bytes_received.inc_by(n as u64),
                },
                _ = shutdown.changed() => return,
                _ = sleep_or_forever(idle_deadline) => {
                    debug!(client = self.id, "closing idle client");
                    return;
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
                    let flow = self.pinned_send(req, id, false).await;
                    self.in_multi = false;
                    self.watching = false;
                    flow
                }
                _ => self.pinned_send(req, id, false).await,
            };
        }
        let Some(spec) = spec else {
            return self.forward(req, id, None).await;
        };
        match spec.route {
            Route::Local => self.local(req, spec).await,
            Route::Pin => self.stateful(req, spec).await,
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
            if self.db != 0 || self.watching {
                return self.pinned_send(req, id, false).await;
            }
            self.unpin().await;
        }
        let is_write = spec.is_none_or(|s| command::is_write(s, &req.args));
        let is_read = spec.is_some_and(|s| command::is_read(s, &req.args));
        if is_write && let Some(spec) = spec {
            self.server
                .degrade
                .invalidate_for_write(self.db, &req, spec);
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
        let mut leader = None;
        if let Some(key) = fill.as_ref().and_then(|f| f.flight_key()) {
            match self.server.flights.join(key) {
                Flight::Leader(guard) => leader = Some(guard),
                Flight::Follower(follower) => {
                    // The identical read already in flight answers this one too.
                    drop((guard, inflight));
                    let hook = fill.zip(spec).map(|(fill, spec)| {
                        Box::new(Hook {
                            fill,
                            leader: None,
                            fills: false,
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
        let hook = fill.zip(spec).map(|(fill, spec)| {
            Box::new(Hook {
                fill,
                leader,
                fills: true,
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

    /// Writes on dedicated connections and pipes invalidate the cache like shared ones. Inside
    /// MULTI the write only happens at EXEC, so its request is kept to invalidate again then:
    /// a read by another client between queueing and EXEC could otherwise re-cache the old value.
    fn invalidate_if_write(&mut self, req: &Request) {
        let Some(spec) = command::lookup(req.name()) else {
            return;
        };
        if spec.name == "exec" {
            for queued in std::mem::take(&mut self.multi_writes) {
                if let Some(s) = command::lookup(queued.name()) {
                    self.server
                        .degrade
                        .invalidate_for_write(self.db, &queued, s);
                }
            }
            return;
        }
        if spec.name == "discard" {
            self.multi_writes.clear();
            return;
        }
        if command::is_write(spec, &req.args) {
            self.server.degrade.invalidate_for_write(self.db, req, spec);
            if self.in_multi {
                self.multi_writes.push(req.clone());
            }
        }
    }

    fn view(&self) -> ClientView {
        ClientView {
            db: self.db,
            proto: self.proto,
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
        let prev = match self.last_conn.replace((upstream, next.clone())) {
            Some((u, prev)) if u == upstream && prev.id != next.id => prev,
            _ => return,
        };
        let (call, rx) = Call::new(Bytes::from_static(PING), false, false);
        prev.send(call, || UpstreamError::Closed {
            upstream: "fence".into(),
        })
        .await;
        let _ = rx.await;
    }

    fn setup(&self) -> Setup {
        Setup {
            proto: self.proto,
            credentials: self.credentials.clone(),
            db: self.db,
            client_name: None,
        }
    }

    /// Sends on this client's dedicated connection, opening one if needed.
    async fn pinned_send(&mut self, req: Request, id: usize, blocking: bool) -> Flow {
        if self.pinned.is_none() {
            let upstream = self.server.primary().clone();
            let Ok(guard) = upstream.breaker.try_acquire() else {
                let spec = command::lookup(req.name());
                return self.degraded(req, id, spec).await;
            };
            match upstream.dedicated(&self.setup()).await {
                Ok(conn) => {
                    guard.success();
                    self.pinned = Some(Pinned { upstream, conn });
                }
                Err(e) => {
                    guard.complete(outcome_of_error(&e));
                    self.push_ready(id, error_reply(&e.into())).await;
                    return Flow::Continue;
                }
            }
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
            return Flow::Stop;
        }
        let primary = self.server.primary_index();
        self.fence(primary, &conn).await;
        self.invalidate_if_write(&req);
        let (call, rx) = Call::new(req.raw, blocking, true);
        conn.send(call, || UpstreamError::Closed { upstream: name })
            .await;
        self.push(Slot {
            command: id,
            kind: SlotKind::Waiting(rx, None),
        })
        .await;
        Flow::Continue
    }

    /// Returns the dedicated connection once its server-side state is back to a fresh one.
    async fn unpin(&mut self) {
        if let Some(p) = self.pinned.take() {
            // The fence on the next send waits for the pinned commands; release after that.
            let (call, rx) = Call::new(Bytes::from_static(PING), false, false);
            p.conn
                .send(call, || UpstreamError::Closed {
                    upstream: p.upstream.name().clone(),
                })
                .await;
            if matches!(rx.await, Ok(Ok(_))) {
                p.upstream.release_dedicated(self.setup(), p.conn);
            }
            self.last_conn = None;
        }
    }

    async fn stateful(&mut self, req: Request, spec: &'static CommandSpec) -> Flow {
        let id = spec.id;
        match spec.name {
            "select" => return self.select(req, id).await,
            "multi" => self.in_multi = true,
            "watch" => self.watching = true,
            "exec" | "discard" | "unwatch" if self.pinned.is_none() => {
                // Nothing to end: Redis answers (an error, or OK for UNWATCH) on any connection.
                return self.forward(req, id, Some(spec)).await;
            }
            "exec" | "discard" | "unwatch" => self.watching = false,
            _ => {}
        }
        self.pinned_send(req, id, false).await
    }

    async fn select(&mut self, req: Request, id: usize) -> Flow {
        let db = (req.args.len() == 2)
            .then(|| std::str::from_utf8(&req.args[1]).ok()?.parse::<u32>().ok())
            .flatten();
        match db {
            // Malformed: Redis's own error text, from any connection.
            None => self.forward(req, id, None).await,
            Some(0) if self.db == 0 && self.pinned.is_none() => {
                self.push_ready(id, reply::ok()).await;
                Flow::Continue
            }
            Some(db) => {
                let flow = self.pinned_send(req, id, false).await;
                if self.pinned.is_some() {
                    self.db = db;
                }
                flow
            }
        }
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
        if let Some(p) = self.pinned.take() {
            // Its server-side state is unknown now: let it close rather than reuse it.
            drop(p);
        }
        self.last_conn = None;
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
                let _ = rx.await;
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
        // Everything sent before must have run before the pipe's first command does.
        if let Some((_, prev)) = self.last_conn.take() {
            let (call, rx) = Call::new(Bytes::from_static(PING), false, false);
            prev.send(call, || UpstreamError::Closed {
                upstream: upstream.name().clone(),
            })
            .await;
            let _ = rx.await;
        }
        let setup = Setup {
            client_name: self.name.clone(),
            ..self.setup()
        };
        self.pinned = None;
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
