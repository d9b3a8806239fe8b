//! Pub/sub, `MONITOR` and `CLIENT TRACKING|REPLY`: the rest of the connection becomes a
//! raw pipe to a dedicated upstream connection (RESP3 pushes included), because the state
//! lives in Redis's connection and the replies are not one per request any more.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::links::Tunnel;
use super::session::{Flow, Session};
use super::writer::{Slot, SlotKind};
use crate::command::{Classified, ids};
use crate::error::UpstreamError;
use crate::resp::Request;
use crate::upstream::Setup;
use crate::upstream::conn::outcome_of_error;
use crate::upstream::handshake::open;

impl Session {
    /// Hands the rest of this connection to a dedicated upstream connection as a raw pipe.
    pub(super) async fn enter_tunnel(&mut self, req: Request, cls: Classified) -> Flow {
        let upstream = self.set.primary().clone();
        let Ok(guard) = upstream.breaker.try_acquire() else {
            return self.degraded(&req, &cls).await;
        };
        // Everything sent before must have run before the pipe's first command does, and
        // queued writes from an outage must reach Redis before this client's.
        self.links.fence_all().await;
        if let Err(gate) = self
            .server
            .degrade
            .queue
            .wait_for_replay(self.replay_wait())
            .await
        {
            drop(guard);
            self.fail(cls.id, UpstreamError::unavailable(upstream.name(), gate))
                .await;
            return Flow::Continue;
        }
        let setup = Setup {
            proto: self.state.proto,
            credentials: self.state.identity().and_then(|i| i.credentials.clone()),
            db: self.state.db.unwrap_or(0),
            client_name: self.state.name.clone(),
        };
        if let Some(p) = self.links.pinned.take()
            && self.links.blocked()
        {
            self.links.retire(p.link.conn);
        }
        let stream = match open(&upstream.ctx, &setup).await {
            Ok(s) => {
                guard.success();
                s
            }
            Err(e) => {
                // A refused extra connection (Redis answered) is not an outage: ignored.
                guard.complete(outcome_of_error(&e));
                self.fail(cls.id, e).await;
                return Flow::Continue;
            }
        };
        let (mut rd, mut wr) = stream.into_split();
        let sent = async {
            wr.write_all(&req.raw).await?;
            wr.flush().await
        };
        if let Err(e) = sent.await {
            let err = UpstreamError::unavailable(upstream.name(), e);
            self.fail(cls.id, err).await;
            return Flow::Continue;
        }
        let (tx, rx) = mpsc::channel::<Bytes>(64);
        // An upstream that left the set (a Sentinel failover, a discovery change) keeps its
        // subscribers until its drain deadline; then the pipe ends as if Redis had closed
        // it, and so does the client's connection: subscribing again reaches the new set.
        let retiring = upstream.clone();
        let pipe = tokio::spawn(async move {
            let mut buf = BytesMut::with_capacity(16 * 1024);
            loop {
                if buf.capacity() < 4096 {
                    buf.reserve(16 * 1024);
                }
                let read = tokio::select! {
                    r = rd.read_buf(&mut buf) => r,
                    _ = retiring.ctx.drain.forced() => return,
                };
                match read {
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
            command: cls.id,
            kind: SlotKind::Stream(rx),
        })
        .await;
        self.links.tunnel = Some(Tunnel { wr, pipe });
        self.state.tunnel();
        Flow::Continue
    }

    /// A command into the pipe, as it is. Writes still invalidate what they touch.
    pub(super) async fn tunnel_send(&mut self, req: Request, cls: Classified) -> Flow {
        if cls.is(ids::SELECT) {
            // The reply goes by in the raw stream, unread: from now on the db is unknown.
            self.state.select_unseen();
        }
        if cls.write {
            self.server.degrade.invalidate(self.state.db, &req, &cls);
        }
        let Some(tunnel) = self.links.tunnel.as_mut() else {
            return Flow::Stop;
        };
        if tunnel.wr.write_all(&req.raw).await.is_err() || tunnel.wr.flush().await.is_err() {
            return Flow::Stop;
        }
        // Redis answers QUIT and closes; the pipe then ends and so does the session.
        if cls.is(ids::QUIT) {
            Flow::Stop
        } else {
            Flow::Continue
        }
    }
}
