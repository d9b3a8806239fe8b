//! A client's upstream connections, and the fences that keep its commands in order across
//! them.
//!
//! A client uses one shared connection per upstream, a dedicated connection while it is
//! pinned, and dedicated connections it gave up while a blocking command may still wait
//! on them ("retired"). When its commands move from one connection of an upstream to
//! another, everything sent on the old one must have run first. Each connection is
//! tracked with a count of this client's requests in flight on it: when nothing is in
//! flight there is nothing to wait for and the move costs nothing; otherwise a `PING`
//! fence on the old connection waits until Redis has run what was sent there. The fence
//! waits on Redis, never on the client reading its replies, so a client that writes a whole
//! pipeline before reading cannot deadlock it.

use std::sync::Arc;

use bytes::Bytes;
use tokio::task::JoinHandle;

use crate::effect::{InFlight, Mark};
use crate::resp::reply;
use crate::upstream::barrier::Raised;
use crate::upstream::set::UpstreamSet;
use crate::upstream::tls::OwnedWriteHalf;
use crate::upstream::{Call, ConnHandle, Setup, Upstream};

/// A connection with this client's requests in flight on it counted.
#[derive(Clone)]
pub struct Tracked {
    pub conn: ConnHandle,
    pub inflight: InFlight,
}

impl Tracked {
    pub fn new(conn: ConnHandle) -> Tracked {
        Tracked {
            conn,
            inflight: InFlight::new(),
        }
    }

    /// Counts `call` on this connection (and in `other`) until it is answered.
    pub fn track(&self, call: &mut Call, other: Option<Mark>) {
        call.marks = [Some(self.inflight.mark()), other];
    }

    /// Sends a call on this connection, counted until answered.
    pub async fn send(&self, mut call: Box<Call>, other: Option<Mark>) {
        self.track(&mut call, other);
        self.conn.send(call).await;
    }
}

/// The dedicated connection of a pinned client.
pub struct Dedicated {
    pub upstream: Arc<Upstream>,
    pub link: Tracked,
    /// The handshake it was opened with: it goes back to the warm set only in that state.
    pub setup: Setup,
}

/// A raw pipe to Redis (pub/sub, MONITOR, CLIENT TRACKING|REPLY).
pub struct Tunnel {
    pub wr: OwnedWriteHalf,
    pub pipe: JoinHandle<()>,
}

/// Everything a client holds upstream.
pub struct Links {
    /// The client's shared connection per upstream (index as in the session's
    /// `UpstreamSet`; see [`Links::remap`]).
    pub shared: Vec<Option<Tracked>>,
    /// Per upstream, the connection the client's previous command went to.
    last: Vec<Option<Tracked>>,
    pub pinned: Option<Dedicated>,
    /// Dedicated connections given up while a blocking command may still wait on them
    /// (RESET, SUBSCRIBE): abandoned with the rest if the client leaves.
    pub retired: Vec<ConnHandle>,
    pub tunnel: Option<Tunnel>,
    /// The client's writes sent on shared connections and not yet answered: while there
    /// are any, its reads do not join another client's in-flight read, which may have run
    /// before the write.
    pub writes: InFlight,
    /// Blocking commands sent on the dedicated connection and not yet answered. Nothing
    /// waits behind one (no release, no fence, no awaited SELECT): a wait there would keep
    /// redfuse from noticing that the client left, and the command from being dropped with
    /// it.
    pub blocking: InFlight,
}

const PING: &[u8] = b"*1\r\n$4\r\nPING\r\n";

impl Links {
    pub fn new(upstreams: usize) -> Links {
        Links {
            shared: vec![None; upstreams],
            last: vec![None; upstreams],
            pinned: None,
            retired: Vec::new(),
            tunnel: None,
            writes: InFlight::new(),
            blocking: InFlight::new(),
        }
    }

    pub fn blocked(&self) -> bool {
        self.blocking.any()
    }

    /// The protocol or credentials changed: shared connections of the old kind are not
    /// this client's any more (it gets new ones of the new kind on its next command).
    pub fn forget_shared(&mut self) {
        self.shared.iter_mut().for_each(|c| *c = None);
    }

    /// A new set of upstreams was published: links follow their upstream to its new
    /// index. A shared link follows its instance, and goes with a retired one (its
    /// connection then ends once what is in flight on it is answered). The fence follows
    /// the upstream's name: when an upstream moved to a new address, the client's first
    /// command there waits for what it still had in flight at the old one.
    pub fn remap(&mut self, old: &UpstreamSet, new: &UpstreamSet) {
        let mut shared = vec![None; new.list.len()];
        let mut last = vec![None; new.list.len()];
        for (i, u) in new.list.iter().enumerate() {
            if let Some(j) = old.list.iter().position(|o| o.ctx.id == u.ctx.id) {
                shared[i] = self.shared.get_mut(j).and_then(Option::take);
            }
            if let Some(j) = old.list.iter().position(|o| o.ctx.name == u.ctx.name) {
                last[i] = self.last.get_mut(j).and_then(Option::take);
            }
        }
        self.shared = shared;
        self.last = last;
    }

    /// Whether the client's commands to `upstream` move to `next` from another connection
    /// (the fence may then wait).
    pub fn moves(&self, upstream: usize, next: &Tracked) -> bool {
        self.last[upstream]
            .as_ref()
            .is_none_or(|prev| prev.conn.id != next.conn.id)
    }

    /// Waits until everything this client sent to another connection of the same upstream
    /// has run, then records `next` as where its commands go. Across upstreams (replica
    /// reads) there is no order to keep: replication lag already gives none.
    ///
    /// `hold` is the barrier a blocking command about to go to `next` raised: the fence
    /// goes through it.
    pub async fn fence(&mut self, upstream: usize, next: &Tracked, hold: Option<&Raised>) {
        // The same connection as last time (nearly always): nothing to fence, and no clone
        // of the handle to store (each clone and drop is a handful of atomic counts).
        if !self.moves(upstream, next) {
            return;
        }
        if let Some(prev) = self.last[upstream].replace(next.clone())
            && prev.inflight.any()
        {
            await_ping(&prev.conn, hold.map(Raised::again)).await;
        }
    }

    /// Fences every connection this client used, and forgets them (before a `RESET`, a
    /// pipe, `WAIT`). A connection with a blocking command waiting is skipped: nothing
    /// waits behind one.
    pub async fn fence_all(&mut self) {
        let blocked = self
            .blocked()
            .then(|| self.pinned.as_ref().map(|p| p.link.conn.id))
            .flatten();
        let n = self.last.len();
        for prev in std::mem::replace(&mut self.last, vec![None; n])
            .into_iter()
            .flatten()
        {
            if Some(prev.conn.id) != blocked && prev.inflight.any() {
                await_ping(&prev.conn, None).await;
            }
        }
    }

    /// The dedicated connection is not this client's any more; where the next command
    /// to its upstream goes is fenced against it no longer.
    pub fn unlink(&mut self, upstream: usize) {
        self.last[upstream] = None;
    }

    /// Keeps a dedicated connection that may still hold a blocking command of this client,
    /// so it can be abandoned if the client leaves; ones already finished are let go.
    pub fn retire(&mut self, conn: ConnHandle) {
        self.retired.retain(|c| !c.is_closed());
        self.retired.push(conn);
    }

    /// The client left: a blocking command of its must not outlive it (Redis would drop
    /// it), or it would take data nobody reads.
    pub fn abandon(&self) {
        if let Some(p) = &self.pinned
            && self.blocked()
        {
            p.link.conn.abandon();
        }
        for c in &self.retired {
            c.abandon();
        }
    }
}

/// Sends a `PING` on `conn` and waits for it: everything sent there before has then run.
/// True when the connection answered `PONG` (inside a transaction the answer would be
/// `QUEUED`, and such a connection must never be handed to another client).
///
/// `raised` lets it past the barrier its own blocking command raised.
pub async fn await_ping(conn: &ConnHandle, raised: Option<Raised>) -> bool {
    let (mut call, rx) = Call::new(Bytes::from_static(PING), false, false);
    call.raised = raised;
    conn.send(call).await;
    matches!(rx.await, Ok(Ok(reply)) if &reply[..] == reply::PONG)
}
