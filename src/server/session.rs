//! One client connection: read frames, classify each once, decide where it goes, act, and
//! queue its reply slot in order.
//!
//! The decisions are made elsewhere and tested there: [`route`](super::route) says where
//! a request goes, [`state`](super::state) how the connection changes, [`local`](super::local)
//! what per-connection commands answer. This file is the loop and the glue.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::debug;

use super::Server;
use super::links::Links;
use super::local::Local;
use super::outbox::Outbox;
use super::route::{self, Dispatch};
use super::state::{Auth, ConnState};
use super::writer::{Slot, SlotKind, Slots};
use crate::burst;
use crate::command::{Classified, UNKNOWN, classify};
use crate::degrade::{ClientView, Origin};
use crate::effect::OutputBudget;
use crate::error::{Error, UpstreamError, error_reply};
use crate::resp::request::{Framer, Peer};
use crate::resp::{Request, reply};
use crate::upstream::set::UpstreamSet;

/// Whether the read loop goes on after a request.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Flow {
    Continue,
    Stop,
}

pub(super) struct Session {
    pub(super) server: Arc<Server>,
    pub(super) id: u64,
    pub(super) state: ConnState,
    pub(super) links: Links,
    /// Writes queued in the current MULTI: they run at EXEC, whose reply invalidates them
    /// again (a read by another client in between could re-cache the old value).
    pub(super) multi_writes: Vec<crate::effect::Written>,
    /// Replies arrived and not yet written to the client, against the output limits.
    pub(super) output: Arc<OutputBudget>,
    /// The set of upstreams this session routes by, refreshed when a new one is published
    /// (checked before each request: one atomic load, no lock).
    pub(super) set: Arc<UpstreamSet>,
    set_changed: watch::Receiver<u64>,
    /// Bounded in slots (`writer::SLOT_ROOM`), not in messages.
    slots: burst::Sender<Slots>,
    /// Calls and reply slots of the current read burst, handed on together.
    pub(super) outbox: Outbox,
    /// When the bytes being parsed arrived: what the client-side latency counts from, and
    /// the time the breaker admits their requests at.
    pub(super) received: Instant,
    /// A run of reads parsed ahead of their dispatch while they are answered from the
    /// cache; room for [`KEPT_AHEAD`] of them is kept between runs, so that a client
    /// sending one read at a time does not allocate it for each.
    ahead: Vec<(Request, Classified)>,
    /// The clock of the run of reads being answered from the cache: read when the run
    /// starts and again only after the session waited, so that the answers given together
    /// read it once. `None` outside a run.
    run_clock: Option<Instant>,
}

/// Reads of a run whose room a session keeps between runs (about 2.4 KiB).
const KEPT_AHEAD: usize = 16;

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

/// Serves one client until it quits, breaks the protocol, idles out or shutdown begins.
pub async fn run(
    server: Arc<Server>,
    stream: TcpStream,
    id: u64,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let (mut rd, wr) = stream.into_split();
    let (slots_tx, slots_rx) = burst::channel(super::writer::SLOT_ROOM);
    let output = Arc::new(OutputBudget::new(server.config.output_limits));
    let writer = tokio::spawn(super::writer::write_replies(
        wr,
        slots_rx,
        server.clone(),
        output.clone(),
    ));
    let initial = match server.users {
        Some(_) => Auth::Required,
        None => Auth::Implicit(server.own.clone()),
    };
    let set_changed = server.upstreams.subscribe();
    let set = server.upstreams.load();
    let mut session = Session {
        links: Links::new(set.list.len()),
        set,
        set_changed,
        state: ConnState::new(initial),
        multi_writes: Vec::new(),
        output,
        server,
        id,
        slots: slots_tx,
        outbox: Outbox::default(),
        received: Instant::now(),
        ahead: Vec::new(),
        run_clock: None,
    };
    let end = session.read_loop(&mut rd, &mut shutdown).await;
    if end == End::ClientGone {
        session.links.abandon();
    }
    let tunnel = session.links.tunnel.take();
    let mut writer = writer;
    if matches!(end, End::Quit | End::Closed)
        && (session.links.pinned.is_some() || !session.links.retired.is_empty())
    {
        // Replies are still owed (QUIT's +OK may wait behind a BLPOP): watch for the client
        // leaving meanwhile, so a blocked command does not outlive it.
        tokio::select! {
            _ = wait_for_eof(&mut rd) => session.links.abandon(),
            _ = &mut writer => {}
        }
    }
    session.give_back_dedicated().await;
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

async fn sleep_or_forever(d: Option<std::time::Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

impl Session {
    async fn read_loop(
        &mut self,
        rd: &mut OwnedReadHalf,
        shutdown: &mut watch::Receiver<bool>,
    ) -> End {
        let end = self.read_bursts(rd, shutdown).await;
        self.flush().await;
        end
    }

    async fn read_bursts(
        &mut self,
        rd: &mut OwnedReadHalf,
        shutdown: &mut watch::Receiver<bool>,
    ) -> End {
        let limits = self.server.config.limits;
        let idle = self.server.config.idle_timeout;
        let mut buf = BytesMut::with_capacity(16 * 1024);
        let mut framer = Framer::new();
        loop {
            loop {
                // Redis's tighter limits until the client authenticates (when it must).
                let peer = match self.state.auth {
                    Auth::Required => Peer::Unauthenticated,
                    _ => Peer::Authenticated,
                };
                let req = match framer.next(&mut buf, &limits, peer) {
                    Ok(Some(req)) => req,
                    Ok(None) => {
                        self.flush().await;
                        break;
                    }
                    Err(e) => return self.protocol_error(e).await,
                };
                // The client has its share of the upstream pipeline waiting on Redis: the
                // others on its connection are not kept waiting behind more of it.
                if self.output.owes_enough()
                    && let Some(end) = self.wait_for_answers(shutdown).await
                {
                    return end;
                }
                let cls = classify(req.args());
                if !(cls.read && self.answering_from_cache()) {
                    if let Some(end) = self.dispatch(req, cls).await {
                        return end;
                    }
                    continue;
                }
                // A read answered from the cache (every breaker refuses) stalls on memory,
                // on its cache entry. The run of reads that follows is parsed first and
                // their entries are requested together before the first waits on its own.
                // The run ends after its first command that is not a read: reads change
                // nothing the parsing depends on (authentication), so every frame is parsed
                // as before. While Redis answers, reads are not run ahead: planning a run's
                // fills ahead to prefetch their single-flight stripes (a table the CPU's
                // cache holds anyway) cost more in moving each read and its plan around
                // than the stalls it saved.
                let mut run = std::mem::take(&mut self.ahead);
                run.push((req, cls));
                let mut error = None;
                while run.len() < super::outbox::MAX_SLOTS {
                    match framer.next(&mut buf, &limits, peer) {
                        Ok(Some(req)) => {
                            let cls = classify(req.args());
                            let read = cls.read;
                            run.push((req, cls));
                            if !read {
                                break;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            error = Some(e);
                            break;
                        }
                    }
                }
                let view = self.view();
                self.server
                    .degrade
                    .prefetch_answers(view, run.iter().map(|(r, c)| (r, c)));
                self.run_clock = Some(Instant::now());
                for (i, (req, cls)) in run.drain(..).enumerate() {
                    // Checked for the first before it was classified.
                    if i > 0 && self.output.owes_enough() {
                        if let Some(end) = self.wait_for_answers(shutdown).await {
                            self.run_clock = None;
                            return end;
                        }
                        self.run_clock = Some(Instant::now());
                    }
                    if let Some(end) = self.dispatch(req, cls).await {
                        self.run_clock = None;
                        return end;
                    }
                }
                self.run_clock = None;
                // A long pipeline's room is not kept for the life of the connection.
                run.shrink_to(KEPT_AHEAD);
                self.ahead = run;
                if let Some(e) = error {
                    return self.protocol_error(e).await;
                }
            }
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve(16 * 1024);
            }
            // A pipe (subscribers, MONITOR) is exempt from the idle timeout, as in Redis;
            // pinned sessions may be blocked in BLPOP & co., which Redis also exempts.
            let idle_deadline = idle.filter(|_| self.state.mode == super::state::Mode::Shared);
            tokio::select! {
                r = rd.read_buf(&mut buf) => match r {
                    Ok(0) | Err(_) => return End::ClientGone,
                    Ok(n) => {
                        self.received = Instant::now();
                        self.server.metrics.bytes_received.inc_by(n as u64);
                    }
                },
                _ = shutdown.changed() => return End::Shutdown,
                // An idle client lets go of retired upstreams at once too.
                r = self.set_changed.changed() => if r.is_ok() {
                    self.refresh_set().await;
                },
                _ = self.output.exceeded() => return self.over_output_limit(),
                _ = sleep_or_forever(idle_deadline) => {
                    debug!(client = self.id, "closing idle client");
                    return End::Closed;
                }
            }
        }
    }

    /// Waits until fewer of the client's requests wait on Redis (`OutputBudget::owes_enough`);
    /// how the session ends if it does meanwhile.
    async fn wait_for_answers(&mut self, shutdown: &mut watch::Receiver<bool>) -> Option<End> {
        self.flush().await;
        tokio::select! {
            _ = self.output.caught_up() => None,
            _ = shutdown.changed() => Some(End::Shutdown),
            _ = self.output.exceeded() => Some(self.over_output_limit()),
        }
    }

    fn over_output_limit(&self) -> End {
        self.server.metrics.client_output_overflows.inc();
        debug!(
            client = self.id,
            pending = self.output.pending(),
            "closing a client over its output buffer limit"
        );
        End::ClientGone
    }

    /// The client broke the protocol: it gets the error, then the connection closes.
    async fn protocol_error(&mut self, e: crate::resp::request::ProtocolError) -> End {
        self.server.metrics.client_protocol_errors.inc();
        debug!(client = self.id, "protocol error: {e}");
        self.push_ready(UNKNOWN, error_reply(&Error::Client(e)))
            .await;
        self.push(Slot {
            command: UNKNOWN,
            kind: SlotKind::Close,
        })
        .await;
        End::ClientGone
    }

    /// How long a write of this burst may still wait for the replay of queued writes: the
    /// command timeout from when it arrived. The writes of one pipeline share that
    /// deadline; each waiting the whole timeout in turn, the last would be answered many
    /// timeouts late.
    pub(super) fn replay_wait(&self) -> std::time::Duration {
        (self.received + self.server.config.command_timeout)
            .saturating_duration_since(Instant::now())
    }

    /// Whether reads are answered from the cache now: it is on, and every breaker refuses.
    fn answering_from_cache(&self) -> bool {
        self.server.degrade.cache.enabled() && self.set.all_refuse()
    }

    /// Queues a reply slot, in request order (handed to the writer with its burst).
    pub(super) async fn push(&mut self, slot: Slot) {
        if self.outbox.hold_slot(slot) {
            self.flush().await;
        }
    }

    pub(super) async fn push_ready(&mut self, command: usize, reply: Bytes) {
        self.push(Slot::ready(command, reply)).await;
    }

    /// Hands on everything held: the calls first, since the writer may wait on their
    /// replies (and the slot channel, when full, on the writer). Done at the end of a
    /// burst and before the session waits on anything else: what it waits for may be
    /// behind a held call, and replies already made must not wait with it.
    pub(super) async fn flush(&mut self) {
        if let Some((conn, calls)) = self.outbox.take_calls() {
            conn.send_all(calls).await;
        }
        if let Some(slots) = self.outbox.take_slots(self.received) {
            // The writer only goes away when the client socket is gone; nothing to do then.
            let _ = self.slots.send(slots).await;
        }
    }

    /// Routes by the current set of upstreams from now on (see `Links::remap`).
    async fn refresh_set(&mut self) {
        self.set_changed.borrow_and_update();
        let set = self.server.upstreams.load();
        self.links.remap(&self.set, &set);
        self.set = set;
        self.move_off_retired().await;
    }

    /// Dispatches one request; how the session ends if it does. One async layer between
    /// the read loop and the handlers: each layer moved the request and its class into its
    /// own future once more, which showed in profiles.
    async fn dispatch(&mut self, req: Request, cls: Classified) -> Option<End> {
        let quit = cls.is(crate::command::ids::QUIT);
        if self.set_changed.has_changed().unwrap_or(false) {
            self.flush().await;
            self.refresh_set().await;
        }
        let id = cls.id;
        let dispatch = route::decide(&self.state, &cls, req.args(), self.id);
        // Only the shared path and local replies wait on nothing (or only on a held call
        // being sent, on the shared path).
        if !matches!(
            dispatch,
            Dispatch::Shared | Dispatch::Local(Local::Reply(_) | Local::SetName(_))
        ) {
            self.flush().await;
        }
        let flow = match dispatch {
            Dispatch::Local(local) => self.local(local, req, cls).await,
            Dispatch::Quit => self.quit(id).await,
            Dispatch::Reset => self.reset(id).await,
            Dispatch::Shared => self.forward(req, cls).await,
            Dispatch::Pinned { blocking, then } => self.pinned_send(req, cls, blocking, then).await,
            Dispatch::Select(db) => self.select(req, cls, db).await,
            Dispatch::ExecWithSelect => self.exec_with_select(req, cls).await,
            Dispatch::WaitReplication => self.wait_replication(req, cls).await,
            Dispatch::EnterTunnel => self.enter_tunnel(req, cls).await,
            Dispatch::Tunnel => self.tunnel_send(req, cls).await,
            Dispatch::Bypass => self.bypass(req, cls).await,
        };
        match flow {
            Flow::Continue => None,
            Flow::Stop if quit => Some(End::Quit),
            Flow::Stop => Some(End::Closed),
        }
    }

    async fn local(&mut self, local: Local, req: Request, cls: Classified) -> Flow {
        match local {
            Local::Reply(r) => self.push_ready(cls.id, r).await,
            Local::SetName(name) => {
                self.state.set_name(name);
                self.push_ready(cls.id, reply::ok()).await;
            }
            Local::Hello(hello) => self.hello(hello, cls.id).await,
            Local::Auth(credentials) => return self.auth(credentials, req, cls).await,
            // Decided by `route`, which never returns these as local.
            Local::Forward | Local::Tunnel => return self.forward(req, cls).await,
        }
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
        self.links.fence_all().await;
        if let Some(p) = self.links.pinned.take() {
            // Its server-side state is unknown now: let it close rather than reuse it.
            if self.links.blocked() {
                self.links.retire(p.link.conn);
            } else {
                super::links::await_ping(&p.link.conn, None).await;
            }
        }
        self.links.blocking = crate::effect::InFlight::new();
        self.multi_writes.clear();
        let old_identity = self.state.identity().cloned();
        let old_proto = self.state.proto;
        self.state.reset();
        if self.state.identity() != old_identity.as_ref() || self.state.proto != old_proto {
            self.links.forget_shared();
        }
        self.push_ready(id, reply::simple("RESET")).await;
        Flow::Continue
    }

    /// What about this client changes a cached or degraded answer.
    pub(super) fn view(&self) -> ClientView {
        let identity = self.state.identity();
        let noauth = identity.is_some_and(|i| i.credentials.is_none())
            && self
                .set
                .primary()
                .ctx
                .anonymous_denied
                .load(std::sync::atomic::Ordering::Relaxed);
        ClientView {
            db: self.state.db,
            identity: identity.map_or(crate::auth::IdentityId::ANONYMOUS, |i| i.id),
            proto: self.state.proto,
            noauth,
        }
    }

    /// No upstream admits the request: degraded mode answers it.
    pub(super) async fn degraded(&mut self, req: &Request, cls: &Classified) -> Flow {
        // A read is answered from memory at once; anything else may wait (a queued write
        // on the journal's disk).
        if !cls.read {
            self.flush().await;
        }
        let primary = self.set.primary();
        let misconfigured;
        let err = match primary.ctx.misconfigured() {
            Some(reason) => {
                misconfigured = UpstreamError::Misconfigured {
                    upstream: primary.name().clone(),
                    reason: reason.into(),
                };
                &misconfigured
            }
            None => primary.circuit_open_error(),
        };
        let credentials = self.state.identity().and_then(|i| i.credentials.as_ref());
        let degrade = &self.server.degrade;
        // The primary's own fail-open rules, when it has some (`upstreams[].fail_open`).
        let own = primary.fail_open();
        let rules = own.as_deref().unwrap_or_else(|| degrade.fail_open.get());
        // Anything but a read may have waited above.
        let now = match self.run_clock {
            Some(now) if cls.read => now,
            _ => Instant::now(),
        };
        let (reply, origin) = degrade
            .reply_by(rules, self.view(), credentials, req, cls, err, now)
            .await;
        self.push(Slot {
            command: cls.id,
            kind: SlotKind::Ready(reply, origin),
        })
        .await;
        Flow::Continue
    }

    /// An error of redfuse's own, for `req`.
    pub(super) async fn fail(&mut self, id: usize, err: UpstreamError) {
        self.push(Slot {
            command: id,
            kind: SlotKind::Ready(error_reply(&err.into()), Origin::Error),
        })
        .await;
    }
}
