//! Stateless commands on the client's shared pipelined connection: breaker admission,
//! replica failover for reads, the write queue's gate, the bulkhead, the cache plan and
//! single-flight, then the send.

use crate::breaker::State;
use crate::cache::Flight;
use crate::command::Classified;
use crate::effect::{DegradedRead, ReplyEffect};
use crate::error::UpstreamError;
use crate::resp::Request;
use crate::upstream::Call;

use super::links::Tracked;
use super::session::{Flow, Session};
use super::writer::{Fallback, Slot, SlotKind};

impl Session {
    /// A command with no connection state: on the dedicated connection while the client
    /// holds one it cannot release yet, else shared.
    pub(super) async fn forward(&mut self, req: Request, cls: Classified) -> Flow {
        if self.links.pinned.is_some() {
            self.flush().await;
            if !self.state.releasable(self.links.blocked()) {
                return self
                    .pinned_send(req, cls, false, super::route::Then::Nothing)
                    .await;
            }
            self.release_dedicated().await;
        }
        let view = self.view();
        // With every breaker open the read is answered from the cache: there is no fill to
        // plan and no request in flight to share (planned after admission if one admits
        // after all).
        let unplanned = cls.read && self.set.all_refuse();
        // A read identical to one in flight waits for it: no permit, no bulkhead slot.
        let mut plan = None;
        let mut leader = None;
        if cls.read
            && !unplanned
            && let Some(p) = self.server.degrade.plan_fill(view, &req, &cls)
        {
            // While this client has writes in flight, a read in flight of another client
            // may have run before them: it must send its own.
            if !self.links.writes.any()
                && let Some(hash) = p.flight_hash()
            {
                match self.server.flights.join_hashed(hash) {
                    Flight::Leader(guard) => leader = Some(guard),
                    Flight::Follower(follower) => {
                        let fallback = Fallback {
                            plan: p,
                            read: DegradedRead::new(view, &cls, &req),
                        };
                        self.push(Slot {
                            command: cls.id,
                            kind: SlotKind::Follower(follower, Some(Box::new(fallback))),
                        })
                        .await;
                        return Flow::Continue;
                    }
                }
            }
            plan = Some(p);
        }
        // Queued writes land before newer ones: a write waits for the replay, holding no
        // breaker permit meanwhile (in half-open, writes waiting on the replay would take
        // every permit and starve the probes that close the breaker). With the breaker
        // open, it goes where the queued ones went.
        // The set is read in place, not cloned: `self.set` changes only between requests.
        if cls.write
            && !self.server.degrade.queue.is_empty()
            && self.set.primary().breaker.state() != State::Open
        {
            self.flush().await;
            if let Err(gate) = self
                .server
                .degrade
                .queue
                .wait_for_replay(self.replay_wait())
                .await
            {
                let err = UpstreamError::unavailable(self.set.primary().name(), gate);
                self.fail(cls.id, err).await;
                return Flow::Continue;
            }
        }
        let mut admitted = None;
        for index in self.server.route(&self.set, cls.read).iter() {
            let upstream = &self.set.list[index];
            if let Ok(guard) = upstream.breaker.try_acquire_at(self.received) {
                admitted = Some((index, guard));
                break;
            }
        }
        let Some((index, guard)) = admitted else {
            return self.degraded(&req, &cls).await;
        };
        if unplanned {
            plan = self.server.degrade.plan_fill(view, &req, &cls);
        }
        let Some(inflight) = self.set.list[index].admit() else {
            // Shed load here rather than pile onto a struggling Redis; not the server's fault.
            drop(guard);
            let upstream = &self.set.list[index];
            upstream.ctx.metrics.bulkhead_overflow.inc();
            let err = UpstreamError::Overloaded {
                upstream: upstream.name().clone(),
            };
            self.fail(cls.id, err).await;
            return Flow::Continue;
        };
        let mut effect = None;
        let mut write_mark = None;
        if cls.write {
            let written = self.server.degrade.before_write(
                self.state.db,
                view.identity,
                view.proto,
                &req,
                &cls,
            );
            effect = Some(ReplyEffect::Write(Box::new(written)));
            write_mark = Some(self.links.writes.mark());
        } else if let Some(plan) = plan {
            // A failure is answered from the cache by the effect, wherever it happens: on
            // the connection, or unsent (`Call::fail`).
            effect = Some(ReplyEffect::Fill {
                plan,
                leader,
                degraded: Some(DegradedRead::new(view, &cls, &req)),
            });
        }
        // Taken out for the send and put back after it rather than cloned: a clone and a
        // drop of the handle per request showed in profiles. Nothing else reads it meanwhile
        // (the session is one task), and a session cancelled in between is gone anyway.
        let link = match self.links.shared[index].take() {
            Some(c) => c,
            None => {
                let identity = self.state.identity().and_then(|i| i.credentials.clone());
                Tracked::new(self.set.list[index].shared_conn(self.state.proto, &identity))
            }
        };
        // Calls held for another connection go first (the fence may wait on them), and
        // everything held before the fence waits.
        if self.links.moves(index, &link)
            || self.outbox.conn_id().is_some_and(|id| id != link.conn.id)
        {
            self.flush().await;
        }
        self.links.fence(index, &link, None).await;
        let (mut call, rx) = Call::new(req.raw, false, cls.write);
        call.slow = cls.slow();
        call.output = Some(self.output.owe());
        call.guard = Some(guard);
        call.inflight = Some(inflight);
        call.effect = effect;
        link.track(&mut call, write_mark);
        self.outbox.hold(&link.conn, call);
        self.links.shared[index] = Some(link);
        self.push(Slot {
            command: cls.id,
            kind: SlotKind::Waiting(rx),
        })
        .await;
        Flow::Continue
    }
}
