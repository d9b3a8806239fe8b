//! What a client connection is in: its mode, database, protocol and identity, as one value
//! with its transitions.
//!
//! Redis keeps some state in the server's connection (the selected database, a
//! transaction, watched keys, a blocked command, a subscription). redfuse multiplexes
//! clients over shared upstream connections, so a client whose state lives in the server
//! needs a dedicated upstream connection for as long as that state lasts: it is *pinned*,
//! and the [`Pin`] says why. Pub/sub, `MONITOR` and `CLIENT TRACKING|REPLY` turn the
//! connection into a raw [`Mode::Tunnel`] for the rest of its life.
//!
//! Nothing here does I/O: the session asks [`ConnState`] what a request means for the
//! connection and tells it what Redis answered, and every rule is unit-tested without
//! sockets. Whether a blocking command is still waiting is the one fact only the upstream
//! connection knows; transitions that depend on it take it as an argument.

use bytes::Bytes;

use crate::auth::Identity;
use crate::resp::Proto;

/// Why a client holds a dedicated upstream connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pin {
    /// The client selected a database other than 0, or one redfuse could not follow.
    Select,
    /// `WATCH` and/or `MULTI`: until `EXEC`, `DISCARD`, `UNWATCH` or `RESET`.
    Transaction {
        /// `MULTI` was sent: commands are queued by Redis.
        multi: bool,
        watched: bool,
        /// A `SELECT` was queued: the database is learnt again after `EXEC`.
        select_queued: bool,
    },
    /// A blocking command (`BLPOP` ...) was sent; kept at least until it is answered.
    Blocking,
    /// Nothing holds the connection any more: the next stateless command releases it.
    Lingering,
}

/// How a client's commands reach Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Multiplexed on shared pipelined connections.
    Shared,
    /// On a dedicated connection.
    Pinned(Pin),
    /// A raw pipe to a dedicated connection (pub/sub, `MONITOR`, `CLIENT TRACKING|REPLY`).
    Tunnel,
}

/// Where a client stands with authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// redfuse requires authentication and the client has not given it.
    Required,
    /// Runs as this identity without having authenticated: the sidecar model.
    Implicit(Identity),
    /// Authenticated with `AUTH` or `HELLO ... AUTH`.
    Explicit(Identity),
}

impl Auth {
    /// The upstream identity commands run as; `None` while authentication is required.
    pub fn identity(&self) -> Option<&Identity> {
        match self {
            Auth::Required => None,
            Auth::Implicit(i) | Auth::Explicit(i) => Some(i),
        }
    }
}

/// The state of one client connection.
#[derive(Debug, Clone)]
pub struct ConnState {
    pub proto: Proto,
    pub name: Option<Bytes>,
    pub auth: Auth,
    /// The selected database, `None` when redfuse could not follow it (a `SELECT` whose
    /// answer went by unread): the cache is then off for this client, and its writes
    /// invalidate their keys in every database.
    pub db: Option<u32>,
    pub mode: Mode,
    /// What a new connection (and `RESET`) starts with.
    initial_auth: Auth,
}

impl ConnState {
    pub fn new(initial_auth: Auth) -> ConnState {
        ConnState {
            proto: Proto::Resp2,
            name: None,
            auth: initial_auth.clone(),
            db: Some(0),
            mode: Mode::Shared,
            initial_auth,
        }
    }

    pub fn identity(&self) -> Option<&Identity> {
        self.auth.identity()
    }

    pub fn pin(&self) -> Option<Pin> {
        match self.mode {
            Mode::Pinned(p) => Some(p),
            _ => None,
        }
    }

    pub fn is_pinned(&self) -> bool {
        matches!(self.mode, Mode::Pinned(_))
    }

    pub fn in_multi(&self) -> bool {
        matches!(self.pin(), Some(Pin::Transaction { multi: true, .. }))
    }

    /// The reason to stay pinned once a transaction or a blocking command is over.
    fn settled(&self) -> Pin {
        if self.db != Some(0) {
            Pin::Select
        } else {
            Pin::Lingering
        }
    }

    /// A stateless command is about to be sent: whether the dedicated connection can be
    /// released first (so the command goes to a shared connection). Nothing may wait
    /// behind a blocking command that is still waiting.
    pub fn releasable(&self, blocked: bool) -> bool {
        match self.mode {
            Mode::Pinned(Pin::Lingering) => !blocked,
            Mode::Pinned(Pin::Blocking) => !blocked && self.db == Some(0),
            _ => false,
        }
    }

    /// A dedicated connection was taken for a command that needs one.
    pub fn pinned(&mut self) {
        if self.mode == Mode::Shared {
            self.mode = Mode::Pinned(Pin::Lingering);
        }
    }

    /// The dedicated connection was given back.
    pub fn released(&mut self) {
        debug_assert!(self.is_pinned());
        self.mode = Mode::Shared;
    }

    /// Redis answered `OK` to `SELECT db`.
    pub fn selected(&mut self, db: u32) {
        self.db = Some(db);
        match self.mode {
            Mode::Pinned(Pin::Select | Pin::Lingering | Pin::Blocking) | Mode::Shared => {
                self.mode = Mode::Pinned(self.settled());
            }
            Mode::Pinned(Pin::Transaction { .. }) | Mode::Tunnel => {}
        }
    }

    /// A `SELECT` went by whose answer redfuse will not read (queued behind a blocking
    /// command, or in a tunnel): the database is unknown until the next one.
    pub fn select_unseen(&mut self) {
        self.db = None;
        if let Mode::Pinned(Pin::Lingering) = self.mode {
            self.mode = Mode::Pinned(Pin::Select);
        }
    }

    /// `SELECT` queued inside `MULTI`: it takes effect at `EXEC`, if at all.
    pub fn select_queued(&mut self) {
        if let Mode::Pinned(Pin::Transaction {
            multi: true,
            watched,
            ..
        }) = self.mode
        {
            self.db = None;
            self.mode = Mode::Pinned(Pin::Transaction {
                multi: true,
                watched,
                select_queued: true,
            });
        }
    }

    /// `WATCH` reached the dedicated connection.
    pub fn watched(&mut self) {
        self.mode = match self.mode {
            Mode::Pinned(Pin::Transaction {
                multi,
                select_queued,
                ..
            }) => Mode::Pinned(Pin::Transaction {
                multi,
                watched: true,
                select_queued,
            }),
            _ => Mode::Pinned(Pin::Transaction {
                multi: false,
                watched: true,
                select_queued: false,
            }),
        };
    }

    /// `MULTI` reached the dedicated connection.
    pub fn multi(&mut self) {
        let watched = matches!(self.pin(), Some(Pin::Transaction { watched: true, .. }));
        self.mode = Mode::Pinned(Pin::Transaction {
            multi: true,
            watched,
            select_queued: false,
        });
    }

    /// `EXEC` or `DISCARD` ended the transaction (also `UNWATCH` outside `MULTI`). Returns
    /// whether a `SELECT` was queued, so the database must be read back after `EXEC`.
    pub fn transaction_ended(&mut self) -> bool {
        let select_queued = matches!(
            self.pin(),
            Some(Pin::Transaction {
                select_queued: true,
                ..
            })
        );
        if let Mode::Pinned(Pin::Transaction { .. }) = self.mode {
            self.mode = Mode::Pinned(self.settled());
        }
        select_queued
    }

    /// The database after an `EXEC` that ran a queued `SELECT`, read back from Redis.
    pub fn db_learnt(&mut self, db: Option<u32>) {
        self.db = db;
        if let Mode::Pinned(Pin::Lingering | Pin::Select) = self.mode {
            self.mode = Mode::Pinned(self.settled());
        }
    }

    /// A blocking command went to the dedicated connection.
    pub fn blocking_sent(&mut self) {
        if matches!(self.mode, Mode::Shared | Mode::Pinned(Pin::Lingering)) {
            self.mode = Mode::Pinned(Pin::Blocking);
        }
    }

    /// The connection became a raw pipe.
    pub fn tunnel(&mut self) {
        self.mode = Mode::Tunnel;
    }

    /// `HELLO`: a new protocol and maybe a name.
    pub fn hello(&mut self, proto: Proto, name: Option<Bytes>) {
        self.proto = proto;
        if let Some(n) = name {
            self.set_name(n);
        }
    }

    /// `CLIENT SETNAME` (an empty name clears it).
    pub fn set_name(&mut self, name: Bytes) {
        self.name = (!name.is_empty()).then_some(name);
    }

    /// Credentials were accepted.
    pub fn authenticated(&mut self, identity: Identity) {
        self.auth = Auth::Explicit(identity);
    }

    /// Credentials were refused: an identity given implicitly is taken away (the client
    /// then runs with no credentials, as it would on Redis); one it authenticated as stays.
    pub fn auth_failed(&mut self) {
        if let Auth::Implicit(_) = self.auth {
            self.auth = Auth::Implicit(Identity::anonymous());
        }
    }

    /// `RESET`: everything a new connection would have. The dedicated connection, if any,
    /// must be given up by the caller.
    pub fn reset(&mut self) {
        debug_assert!(self.mode != Mode::Tunnel, "RESET in a tunnel goes to Redis");
        *self = ConnState::new(self.initial_auth.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Credentials, IdentityId};
    use std::sync::Arc;

    fn own() -> Identity {
        Identity {
            id: IdentityId::ANONYMOUS,
            credentials: Some(Arc::new(Credentials {
                username: None,
                password: "pw".into(),
            })),
        }
    }

    fn state() -> ConnState {
        ConnState::new(Auth::Implicit(own()))
    }

    #[test]
    fn select_pins_until_back_on_zero() {
        let mut s = state();
        s.selected(3);
        assert_eq!(s.mode, Mode::Pinned(Pin::Select));
        assert_eq!(s.db, Some(3));
        assert!(!s.releasable(false));
        s.selected(0);
        assert_eq!(s.mode, Mode::Pinned(Pin::Lingering));
        assert!(s.releasable(false));
        s.released();
        assert_eq!(s.mode, Mode::Shared);
    }

    #[test]
    fn transaction_with_watch_and_queued_select() {
        let mut s = state();
        s.watched();
        assert_eq!(
            s.pin(),
            Some(Pin::Transaction {
                multi: false,
                watched: true,
                select_queued: false
            })
        );
        assert!(!s.releasable(false));
        s.multi();
        assert!(s.in_multi());
        s.select_queued();
        assert_eq!(s.db, None, "unknown until read back");
        assert!(s.transaction_ended(), "EXEC must read the db back");
        assert_eq!(s.mode, Mode::Pinned(Pin::Select));
        s.db_learnt(Some(0));
        assert_eq!(s.mode, Mode::Pinned(Pin::Lingering));
        s.db_learnt(Some(2));
        assert_eq!(s.mode, Mode::Pinned(Pin::Select));
    }

    #[test]
    fn discard_without_select_lingers() {
        let mut s = state();
        s.multi();
        assert!(!s.transaction_ended());
        assert_eq!(s.mode, Mode::Pinned(Pin::Lingering));
        assert!(s.releasable(false));
    }

    #[test]
    fn nothing_is_released_while_a_blocking_command_waits() {
        let mut s = state();
        s.blocking_sent();
        assert_eq!(s.mode, Mode::Pinned(Pin::Blocking));
        assert!(!s.releasable(true));
        assert!(s.releasable(false));
        // A SELECT queued behind the blocked command: its answer is not waited for.
        s.select_unseen();
        assert_eq!(s.db, None);
        assert!(!s.releasable(false));
        assert_eq!(s.db, None, "no cache with an unknown db");
    }

    #[test]
    fn blocking_in_another_db_stays_select() {
        let mut s = state();
        s.selected(1);
        s.blocking_sent();
        assert_eq!(s.mode, Mode::Pinned(Pin::Select));
    }

    #[test]
    fn reset_returns_to_a_new_connection() {
        let mut s = state();
        s.hello(Proto::Resp3, Some(Bytes::from_static(b"n")));
        s.selected(4);
        s.authenticated(Identity::anonymous());
        s.reset();
        assert_eq!(s.proto, Proto::Resp2);
        assert_eq!(s.name, None);
        assert_eq!(s.db, Some(0));
        assert_eq!(s.mode, Mode::Shared);
        assert_eq!(s.auth, Auth::Implicit(own()));
    }

    #[test]
    fn failed_auth_takes_away_only_an_implicit_identity() {
        let mut s = state();
        s.auth_failed();
        assert_eq!(s.auth, Auth::Implicit(Identity::anonymous()));
        s.authenticated(own());
        s.auth_failed();
        assert_eq!(s.auth, Auth::Explicit(own()));
        let mut r = ConnState::new(Auth::Required);
        r.auth_failed();
        assert_eq!(r.auth, Auth::Required);
        assert_eq!(r.identity(), None);
    }

    #[test]
    fn names_and_tunnels() {
        let mut s = state();
        s.set_name(Bytes::from_static(b"app"));
        assert_eq!(s.name.as_deref(), Some(&b"app"[..]));
        s.set_name(Bytes::new());
        assert_eq!(s.name, None);
        s.tunnel();
        assert_eq!(s.mode, Mode::Tunnel);
        assert!(!s.releasable(false));
    }
}
