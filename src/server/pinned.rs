//! Commands on the client's dedicated connection: `SELECT n`, transactions, `WATCH`,
//! blocking commands, `WAIT`, and the commands that end a busy script.
//!
//! A dedicated connection comes from the upstream's warm set (no connect, no round trip),
//! so entering pinned mode cannot let another client's command overtake this one. Opening
//! or reusing one is admitted by the breaker but never judged by it: a refused extra
//! connection (Redis at `maxclients`) is this client's problem, answered with Redis's own
//! words, not proof that the shared connections are down.

use bytes::Bytes;
use tokio::sync::oneshot;

use super::links::{Dedicated, Tracked, await_ping};
use super::route::Then;
use super::session::{Flow, Session};
use super::state::{Mode, Pin};
use super::writer::{Slot, SlotKind};
use crate::breaker::Outcome;
use crate::command::{Classified, ids};
use crate::effect::ReplyEffect;
use crate::error::{Error, Reply, UpstreamError, error_reply};
use crate::resp::{Request, encode_command, is_error_reply, reply};
use crate::upstream::{Call, Setup};

impl Session {
    /// The handshake a dedicated connection for this client is opened with.
    fn setup(&self) -> Setup {
        Setup {
            proto: self.state.proto,
            credentials: self.state.identity().and_then(|i| i.credentials.clone()),
            db: self.state.db.unwrap_or(0),
            client_name: None,
        }
    }

    /// Makes sure this client has a dedicated connection; false when it could not get one
    /// (the reply for the request is then queued).
    async fn ensure_pinned(&mut self, req: &Request, cls: &Classified) -> bool {
        if self.links.pinned.is_some() {
            return true;
        }
        let upstream = self.set.primary().clone();
        let Ok(guard) = upstream.breaker.try_acquire() else {
            self.degraded(req, cls).await;
            return false;
        };
        let setup = self.setup();
        let got = upstream.dedicated(&setup).await;
        guard.complete(Outcome::Ignored);
        match got {
            Ok(conn) => {
                self.links.pinned = Some(Dedicated {
                    upstream,
                    link: Tracked::new(conn),
                    setup,
                });
                self.state.pinned();
                true
            }
            Err(e) => {
                self.fail(cls.id, e).await;
                false
            }
        }
    }

    /// Sends on this client's dedicated connection, opening one if needed; returns the
    /// reply's receiver, or `None` when the request was answered otherwise.
    async fn pinned_call(
        &mut self,
        req: Request,
        cls: &Classified,
        blocking: bool,
        to_writer: bool,
    ) -> Result<Option<oneshot::Receiver<Reply>>, Flow> {
        // Raised before anything here can wait, so that no other client's command read
        // after this one reaches the server first (see `upstream::barrier`).
        let raised = blocking.then(|| self.set.primary().raise_barrier());
        if cls.write
            && let Err(gate) = self
                .server
                .degrade
                .queue
                .wait_for_replay(self.replay_wait())
                .await
        {
            let name = self.set.primary().name().clone();
            self.fail(cls.id, UpstreamError::unavailable(&name, gate))
                .await;
            return Ok(None);
        }
        if !self.ensure_pinned(&req, cls).await {
            return Ok(None);
        }
        let link = self
            .links
            .pinned
            .as_ref()
            .expect("pinned above")
            .link
            .clone();
        if link.conn.is_closed() {
            // The server-side state this client relied on is gone; Redis would have closed
            // the connection.
            let err = UpstreamError::Closed {
                upstream: link.conn.upstream().clone(),
            };
            self.fail(cls.id, err).await;
            self.push(Slot {
                command: cls.id,
                kind: SlotKind::Close,
            })
            .await;
            return Err(Flow::Stop);
        }
        let primary = self.set.primary_index();
        self.links.fence(primary, &link, raised.as_ref()).await;
        let identity = self.view().identity;
        let effect = if cls.is(ids::EXEC) {
            // A transaction's writes run at EXEC: invalidated when EXEC is sent and again
            // when its reply arrives.
            let writes = std::mem::take(&mut self.multi_writes);
            for w in &writes {
                self.server.degrade.invalidate(w.db, &w.request, &w.class);
            }
            (!writes.is_empty()).then_some(ReplyEffect::Exec(writes))
        } else if cls.is(ids::DISCARD) {
            self.multi_writes.clear();
            None
        } else if cls.write {
            let written = self.server.degrade.before_write(
                self.state.db,
                identity,
                self.state.proto,
                &req,
                cls,
            );
            if self.state.in_multi() {
                // Queued: it runs at EXEC, whose reply invalidates it again.
                self.multi_writes.push(written);
                None
            } else {
                Some(ReplyEffect::Write(Box::new(written)))
            }
        } else {
            None
        };
        let (mut call, rx) = Call::new(req.raw, blocking, true);
        call.slow = cls.slow();
        // A reply that goes to the writer counts against the client's output limit.
        call.output = to_writer.then(|| self.output.owe());
        call.effect = effect;
        call.raised = raised;
        let mark = blocking.then(|| self.links.blocking.mark());
        if blocking {
            self.state.blocking_sent();
        }
        link.send(call, mark).await;
        Ok(Some(rx))
    }

    pub(super) async fn pinned_send(
        &mut self,
        req: Request,
        cls: Classified,
        blocking: bool,
        then: Then,
    ) -> Flow {
        match self.pinned_call(req, &cls, blocking, true).await {
            Ok(Some(rx)) => {
                // The state exists only once the command reached the dedicated connection.
                match then {
                    Then::Nothing => {}
                    Then::Multi => self.state.multi(),
                    Then::Watch => self.state.watched(),
                    Then::TransactionEnded => {
                        self.state.transaction_ended();
                    }
                    Then::SelectQueued => self.state.select_queued(),
                }
                self.push(Slot {
                    command: cls.id,
                    kind: SlotKind::Waiting(rx),
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
    async fn pinned_roundtrip(
        &mut self,
        req: Request,
        cls: &Classified,
    ) -> Result<Option<Bytes>, Flow> {
        let Some(rx) = self.pinned_call(req, cls, false, false).await? else {
            return Ok(None);
        };
        let reply = match rx.await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => error_reply(&e.into()),
            Err(_) => error_reply(&Error::Internal("reply dropped".into())),
        };
        self.push_ready(cls.id, reply.clone()).await;
        Ok(Some(reply))
    }

    /// `SELECT n` changes which database redfuse caches under, so its reply is awaited:
    /// the database changes only when Redis said `OK`.
    pub(super) async fn select(&mut self, req: Request, cls: Classified, db: u32) -> Flow {
        if self.links.blocked() {
            // Its answer queues behind the blocking command: not waited for, so the
            // database is unknown until a later SELECT.
            let flow = self.pinned_send(req, cls, false, Then::Nothing).await;
            self.state.select_unseen();
            return flow;
        }
        match self.pinned_roundtrip(req, &cls).await {
            Ok(Some(reply)) => {
                if &reply[..] == reply::OK {
                    self.state.selected(db);
                }
                Flow::Continue
            }
            Ok(None) => Flow::Continue,
            Err(flow) => flow,
        }
    }

    /// `EXEC` of a transaction that queued a `SELECT`: the database it left the connection
    /// in is read back from Redis (`CLIENT INFO`).
    pub(super) async fn exec_with_select(&mut self, req: Request, cls: Classified) -> Flow {
        if self.links.blocked() {
            // Nothing waits behind a blocking command: the database stays unknown.
            return self
                .pinned_send(req, cls, false, Then::TransactionEnded)
                .await;
        }
        if let Err(flow) = self.pinned_roundtrip(req, &cls).await {
            return flow;
        }
        self.state.transaction_ended();
        let mut db = None;
        if let Some(p) = &self.links.pinned {
            let (call, rx) = Call::new(encode_command(&["CLIENT", "INFO"]), false, false);
            p.link.send(call, None).await;
            if let Ok(Ok(info)) = rx.await {
                db = parse_client_info_db(&info);
            }
        }
        self.state.db_learnt(db);
        Flow::Continue
    }

    /// `WAIT`/`WAITAOF` count the replicas that acknowledged the writes of *this
    /// connection*. The client's writes went over shared connections, so after fencing them
    /// a replicated no-op (`PUBLISH` to a private channel) on the client's dedicated
    /// connection carries the replication offset past them, and WAIT there waits for at
    /// least that: never a count of replicas that lack the client's writes, and no shared
    /// pipeline is held while it waits.
    pub(super) async fn wait_replication(&mut self, req: Request, cls: Classified) -> Flow {
        self.links.fence_all().await;
        if !self.ensure_pinned(&req, &cls).await {
            return Flow::Continue;
        }
        let blocked = self.links.blocked();
        if let Some(p) = &self.links.pinned {
            let marker = encode_command(&["PUBLISH", "__redfuse:wait", ""]);
            let (call, rx) = Call::new(marker, false, false);
            p.link.send(call, None).await;
            // Without the marker WAIT could count replicas that lack the client's writes:
            // if Redis refused it (an ACL without that channel), say so instead.
            if !blocked
                && let Ok(Ok(reply)) = rx.await
                && is_error_reply(&reply)
            {
                self.push_ready(cls.id, reply).await;
                return Flow::Continue;
            }
        }
        self.pinned_send(req, cls, true, Then::Nothing).await
    }

    /// Gives the dedicated connection back once its server-side state is a fresh one's.
    pub(super) async fn release_dedicated(&mut self) {
        let Some(p) = self.links.pinned.take() else {
            return;
        };
        let primary = self.set.primary_index();
        self.links.unlink(primary);
        self.state.released();
        let clean = self.state.db == Some(0)
            && p.setup.proto == self.state.proto
            && p.setup.credentials == self.setup().credentials;
        let answered = !p.link.inflight.any() || await_ping(&p.link.conn, None).await;
        if clean && answered {
            p.upstream.release_dedicated(p.setup, p.link.conn);
        }
    }

    /// At the end of a session: a dedicated connection in a fresh state goes back to the
    /// warm set instead of closing.
    pub(super) async fn give_back_dedicated(&mut self) {
        let reusable = matches!(self.state.mode, Mode::Pinned(Pin::Lingering))
            || (self.state.mode == Mode::Pinned(Pin::Blocking) && !self.links.blocked());
        if reusable && self.state.db == Some(0) {
            self.release_dedicated().await;
        }
    }

    /// Commands that end a busy script (`SCRIPT KILL`, `FUNCTION KILL`, `SHUTDOWN`): while
    /// Redis runs a script it answers everything else with `-BUSY`, the breaker opens, and
    /// the shared connections wait behind the script. These go on a dedicated connection
    /// of their own, past the breaker, as they would reach Redis directly.
    pub(super) async fn bypass(&mut self, req: Request, cls: Classified) -> Flow {
        let upstream = self.set.primary().clone();
        let setup = Setup::new(
            self.state.proto,
            self.state.identity().and_then(|i| i.credentials.clone()),
        );
        let conn = match upstream.dedicated(&setup).await {
            Ok(c) => c,
            Err(e) => {
                self.fail(cls.id, e).await;
                return Flow::Continue;
            }
        };
        self.links.fence_all().await;
        let (call, rx) = Call::new(req.raw, false, cls.write);
        conn.send(call).await;
        let answer = match rx.await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => error_reply(&e.into()),
            Err(_) => error_reply(&Error::Internal("reply dropped".into())),
        };
        if !is_error_reply(&answer) || answer.starts_with(b"-NOTBUSY") {
            upstream.release_dedicated(setup, conn);
        }
        self.push_ready(cls.id, answer).await;
        Flow::Continue
    }
}

impl Session {
    /// The upstream of this client's dedicated connection left the set (it moved, or a
    /// failover demoted it). A connection with nothing of the client's on it goes back (and
    /// closes); one that only holds a selected database is replaced by one to the current
    /// primary in the same database. A transaction or a blocking command stays where it is
    /// until it ends, or until the drain deadline closes the connection.
    pub(super) async fn move_off_retired(&mut self) {
        let Some(p) = &self.links.pinned else { return };
        if !p.upstream.ctx.drain.is_retired() {
            return;
        }
        let blocked = self.links.blocked();
        if self.state.releasable(blocked) {
            self.release_dedicated().await;
            return;
        }
        if blocked || self.state.pin() != Some(Pin::Select) || self.state.db.is_none() {
            return;
        }
        let upstream = self.set.primary().clone();
        let setup = self.setup();
        if let Ok(conn) = upstream.dedicated(&setup).await {
            self.links.pinned = Some(Dedicated {
                upstream,
                link: Tracked::new(conn),
                setup,
            });
        }
    }
}

/// The `db=N` field of a `CLIENT INFO` reply.
fn parse_client_info_db(reply: &[u8]) -> Option<u32> {
    reply
        .split(|b| b.is_ascii_whitespace())
        .find_map(|f| f.strip_prefix(b"db="))
        .and_then(crate::resp::parse_u32)
}

#[cfg(test)]
mod tests {
    #[test]
    fn client_info_db_is_read() {
        let info =
            b"$80\r\nid=3 addr=127.0.0.1:1 laddr=x fd=8 name= age=0 idle=0 flags=N db=5 sub=0\r\n";
        assert_eq!(super::parse_client_info_db(info), Some(5));
        assert_eq!(super::parse_client_info_db(b"+OK\r\n"), None);
    }
}
