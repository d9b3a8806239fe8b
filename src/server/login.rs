//! `AUTH` and `HELLO`: checking credentials and carrying out the change of identity or
//! protocol (see `crate::auth` for the identity model).
//!
//! With client authentication on the listener, credentials are checked against redfuse's
//! own users. Otherwise they are checked against Redis with the client's own frame, so the
//! error a client sees is exactly Redis's; credentials Redis accepted are remembered (as
//! digests) and accepted without asking for a minute, and for as long as Redis cannot be
//! asked (an outage), never ones Redis has not accepted.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::local::Hello;
use super::session::{Flow, Session};
use crate::auth::{Credentials, Identity, RECHECK_AFTER};
use crate::command::Classified;
use crate::error::{UpstreamError, error_reply};
use crate::resp::{Proto, Request, encode_command, is_error_reply, reply};
use crate::upstream::Call;
use crate::upstream::handshake::{connect, roundtrip};

/// Why credentials were not accepted: the reply for the client.
type Refusal = Bytes;

impl Session {
    /// `AUTH [user] password`.
    pub(super) async fn auth(
        &mut self,
        candidate: Credentials,
        req: Request,
        cls: Classified,
    ) -> Flow {
        match self.check(candidate, &req.raw).await {
            Ok(identity) => {
                let pinned = self.links.pinned.is_some();
                self.become_identity(identity, self.state.proto).await;
                if !pinned {
                    self.push_ready(cls.id, reply::ok()).await;
                    return Flow::Continue;
                }
                // The dedicated connection was told (see `become_identity`); its OK answers.
                self.push_ready(cls.id, reply::ok()).await;
            }
            Err(refusal) => {
                let before = self.state.identity().cloned();
                self.state.auth_failed();
                if self.state.identity() != before.as_ref() {
                    self.links.forget_shared();
                }
                self.push_ready(cls.id, refusal).await;
            }
        }
        Flow::Continue
    }

    /// `HELLO [proto [AUTH user pass] [SETNAME name]]`.
    pub(super) async fn hello(&mut self, hello: Hello, id: usize) {
        let mut identity = None;
        if let Some(candidate) = hello.auth {
            let frame = encode_command(&[
                b"AUTH".as_slice(),
                candidate.user().as_bytes(),
                candidate.password.as_bytes(),
            ]);
            match self.check(candidate, &frame).await {
                Ok(i) => identity = Some(i),
                Err(refusal) => {
                    self.state.auth_failed();
                    self.push_ready(id, refusal).await;
                    return;
                }
            }
        }
        let identity = identity.or_else(|| self.state.identity().cloned());
        if let Some(identity) = identity {
            self.become_identity(identity, hello.proto).await;
        }
        self.state.hello(hello.proto, hello.name);
        let info = self.server.server_info().await;
        self.push_ready(id, info.hello_reply(hello.proto, self.id))
            .await;
    }

    /// Switches the client's identity and protocol. The dedicated connection, if any, is
    /// told at once (not awaited: it is FIFO, so what the client sends next runs after, and
    /// nothing may wait behind a blocking command), so it never keeps the old user's rights
    /// nor speaks the old protocol; shared connections of the new kind are taken on the
    /// next command.
    async fn become_identity(&mut self, identity: Identity, proto: Proto) {
        let changed_identity = self.state.identity() != Some(&identity);
        if let Some(p) = &self.links.pinned {
            if changed_identity {
                let frame = match &identity.credentials {
                    Some(c) => encode_command(&[
                        b"AUTH".as_slice(),
                        c.user().as_bytes(),
                        c.password.as_bytes(),
                    ]),
                    // Back to no credentials: RESET would drop the connection's state too.
                    None => Bytes::new(),
                };
                if !frame.is_empty() {
                    let (call, _rx) = Call::new(frame, false, false);
                    p.link.send(call, None).await;
                }
            }
            if proto != self.state.proto {
                let frame = encode_command(&[
                    b"HELLO".as_slice(),
                    if proto == Proto::Resp3 { b"3" } else { b"2" },
                ]);
                let (call, _rx) = Call::new(frame, false, false);
                p.link.send(call, None).await;
            }
        }
        if changed_identity || proto != self.state.proto {
            self.links.forget_shared();
        }
        self.state.authenticated(identity);
    }

    /// Checks credentials; on success, the identity they give.
    async fn check(&self, candidate: Credentials, frame: &[u8]) -> Result<Identity, Refusal> {
        let server = &self.server;
        if let Some(users) = &server.users {
            return match users.check(candidate.user(), candidate.password.as_bytes()) {
                Ok(Some(upstream)) => Ok(server.identities.identity(Some(upstream))),
                Ok(None) => Ok(server.own.clone()),
                Err(_) => Err(Bytes::from_static(reply::WRONGPASS)),
            };
        }
        let candidate = Arc::new(candidate);
        let last = server.identities.last_accepted(&candidate);
        // Checked lately, or Redis is down and checked it before: no round trip.
        let down = server.primary().breaker.state() == crate::breaker::State::Open;
        if last.is_some_and(|at| down || at.elapsed() < RECHECK_AFTER) {
            return Ok(server.identities.identity(Some(candidate)));
        }
        match self.ask_redis(frame).await {
            Ok(()) => {
                server.identities.accepted(&candidate);
                Ok(server.identities.identity(Some(candidate)))
            }
            Err(Asked::Refused(reply)) => {
                server.identities.rejected(&candidate);
                Err(reply)
            }
            // Redis cannot be asked: what it accepted before still goes.
            Err(Asked::Unavailable(_)) if last.is_some() => {
                Ok(server.identities.identity(Some(candidate)))
            }
            Err(Asked::Unavailable(e)) => Err(error_reply(&e.into())),
        }
    }

    /// Sends the client's own `AUTH` frame to the primary on a connection of its own.
    /// Asked even while the breaker is open (bounded by the connect timeout): only Redis can
    /// say whether credentials it never accepted are good, and it may be back already.
    async fn ask_redis(&self, frame: &[u8]) -> Result<(), Asked> {
        let primary = self.set.primary().clone();
        let ctx = &primary.ctx;
        let mut stream = connect(ctx).await.map_err(Asked::Unavailable)?;
        let mut buf = BytesMut::with_capacity(256);
        let reply = roundtrip(ctx, &mut stream, frame, &mut buf, ctx.connect_timeout)
            .await
            .map_err(Asked::Unavailable)?;
        if is_error_reply(&reply) {
            return Err(Asked::Refused(reply));
        }
        Ok(())
    }
}

enum Asked {
    Refused(Bytes),
    Unavailable(UpstreamError),
}
