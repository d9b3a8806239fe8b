//! Who a client is: the upstream identity its commands run as, and how redfuse knows it.
//!
//! # The identity model
//!
//! Every client's commands run upstream as one Redis user, its *identity*:
//!
//! - **Sidecar, no client authentication** (no `requirepass`, no `[[users]]`): a new client
//!   runs as redfuse's own upstream credentials (`--username`/`--password`), or with none.
//!   `AUTH` / `HELLO ... AUTH` are checked against Redis with the client's own frame and, when
//!   Redis accepts them, the client runs as that user from then on. A failed `AUTH` takes
//!   away the identity the client was given implicitly (it then runs with no credentials,
//!   as it would on Redis after the same failure) and never one it authenticated as.
//! - **Client authentication on the listener** (`requirepass` or `[[users]]`): a new client
//!   is unauthenticated and gets `NOAUTH` for everything but `AUTH`, `HELLO` and `QUIT`.
//!   `AUTH` is answered by redfuse from its own users; a user runs upstream as its
//!   `upstream_username`/`upstream_password`, or as redfuse's own credentials. A failed
//!   `AUTH` leaves the client as it was.
//!
//! Identities are interned ([`IdentityId`]): the cache is partitioned by them, so what one
//! Redis user's reads filled is never served to another, and queued writes are replayed as
//! the identity that queued them.
//!
//! # Credentials Redis accepted
//!
//! [`Identities`] remembers which credentials Redis accepted, as salted SHA-256 digests,
//! never the plain password, so that `AUTH` keeps working during an outage for exactly those
//! credentials (and is answered without a round trip for a minute after a check). To replay
//! queued writes as their identity, the last accepted credentials of each identity are also
//! held in memory (never on disk), as redfuse already holds them for its connections.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::time::Instant;

/// Credentials for `AUTH [username] password`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Credentials {
    pub username: Option<String>,
    pub password: String,
}

impl Credentials {
    /// The Redis user these name: `AUTH password` is the `default` user.
    pub fn user(&self) -> &str {
        self.username.as_deref().unwrap_or("default")
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <redacted>)", self.user())
    }
}

/// An interned upstream identity: one Redis user, or none (an unauthenticated connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityId(u32);

impl IdentityId {
    /// Connections that never authenticated upstream.
    pub const ANONYMOUS: IdentityId = IdentityId(0);

    pub fn as_u32(self) -> u32 {
        self.0
    }

    #[cfg(test)]
    pub fn is_anonymous(self) -> bool {
        self == IdentityId::ANONYMOUS
    }
}

/// What a client's commands run upstream as: the credentials its connections are opened
/// with, and the identity they amount to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub id: IdentityId,
    pub credentials: Option<Arc<Credentials>>,
}

impl Identity {
    pub fn anonymous() -> Identity {
        Identity {
            id: IdentityId::ANONYMOUS,
            credentials: None,
        }
    }
}

/// How long an accepted credential is trusted without asking Redis again while Redis can
/// be asked; it keeps being accepted during an outage for as long as Redis cannot be.
pub const RECHECK_AFTER: Duration = Duration::from_secs(60);

/// Most accepted credentials remembered; the oldest are forgotten beyond it.
const MAX_ACCEPTED: usize = 16_384;

/// The identity registry: interned users, credentials Redis accepted, and the credentials
/// to replay queued writes with.
pub struct Identities {
    inner: Mutex<Inner>,
    salt: [u8; 16],
}

#[derive(Default)]
struct Inner {
    ids: HashMap<String, IdentityId>,
    names: Vec<String>,
    /// Digest of (user, password) -> when Redis last accepted it.
    accepted: HashMap<[u8; 32], Instant>,
    /// The last credentials Redis accepted for each identity, for replaying its writes.
    latest: HashMap<IdentityId, Arc<Credentials>>,
}

impl Default for Identities {
    fn default() -> Self {
        Identities::new()
    }
}

impl Identities {
    pub fn new() -> Identities {
        let inner = Inner {
            names: vec![String::new()],
            ..Inner::default()
        };
        Identities {
            inner: Mutex::new(inner),
            salt: rand::random(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The identity of a Redis user, by name.
    pub fn intern(&self, user: &str) -> IdentityId {
        let mut inner = self.lock();
        if let Some(id) = inner.ids.get(user) {
            return *id;
        }
        let id = IdentityId(inner.names.len() as u32);
        inner.names.push(user.to_owned());
        inner.ids.insert(user.to_owned(), id);
        id
    }

    /// The identity connections opened with `credentials` run as.
    pub fn identity(&self, credentials: Option<Arc<Credentials>>) -> Identity {
        match credentials {
            None => Identity::anonymous(),
            Some(c) => Identity {
                id: self.intern(c.user()),
                credentials: Some(c),
            },
        }
    }

    /// The user name of an identity (empty for anonymous), for logs and the journal.
    pub fn name(&self, id: IdentityId) -> String {
        self.lock()
            .names
            .get(id.0 as usize)
            .cloned()
            .unwrap_or_default()
    }

    fn digest(&self, c: &Credentials) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.salt);
        h.update(c.user().as_bytes());
        h.update([0]);
        h.update(c.password.as_bytes());
        h.finalize().into()
    }

    /// Redis accepted these credentials just now.
    pub fn accepted(&self, c: &Arc<Credentials>) {
        let digest = self.digest(c);
        let id = self.intern(c.user());
        let now = Instant::now();
        let mut inner = self.lock();
        if inner.accepted.len() >= MAX_ACCEPTED
            && !inner.accepted.contains_key(&digest)
            && let Some(oldest) = inner
                .accepted
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(d, _)| *d)
        {
            inner.accepted.remove(&oldest);
        }
        inner.accepted.insert(digest, now);
        inner.latest.insert(id, c.clone());
    }

    /// Redis refused these credentials: they are not accepted during an outage any more.
    pub fn rejected(&self, c: &Credentials) {
        let digest = self.digest(c);
        let mut inner = self.lock();
        inner.accepted.remove(&digest);
        if let Some(id) = inner.ids.get(c.user()).copied()
            && inner.latest.get(&id).is_some_and(|l| **l == *c)
        {
            inner.latest.remove(&id);
        }
    }

    /// When Redis last accepted exactly these credentials, if ever.
    pub fn last_accepted(&self, c: &Credentials) -> Option<Instant> {
        let digest = self.digest(c);
        self.lock().accepted.get(&digest).copied()
    }

    /// The credentials to act as `id` upstream (replaying its queued writes).
    pub fn credentials(&self, id: IdentityId) -> Option<Arc<Credentials>> {
        self.lock().latest.get(&id).cloned()
    }
}

/// Client authentication on redfuse's own listener: `requirepass` and `[[users]]`.
pub struct ClientUsers {
    users: HashMap<String, ClientUser>,
}

struct ClientUser {
    /// SHA-256 digests of the accepted passwords.
    passwords: Vec<[u8; 32]>,
    enabled: bool,
    /// What the user's commands run as upstream; `None`: redfuse's own credentials.
    upstream: Option<Arc<Credentials>>,
}

/// One `[[users]]` entry, validated.
#[derive(Debug, Clone)]
pub struct UserSpec {
    pub name: String,
    /// SHA-256 digests of the passwords.
    pub passwords: Vec<[u8; 32]>,
    pub enabled: bool,
    pub upstream: Option<Credentials>,
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

impl ClientUsers {
    /// `None` when the listener needs no authentication.
    pub fn new(specs: &[UserSpec]) -> Option<ClientUsers> {
        if specs.is_empty() {
            return None;
        }
        let users = specs
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    ClientUser {
                        passwords: s.passwords.clone(),
                        enabled: s.enabled,
                        upstream: s.upstream.clone().map(Arc::new),
                    },
                )
            })
            .collect();
        Some(ClientUsers { users })
    }

    /// Checks `AUTH [user] password` against the configured users. On success, the upstream
    /// credentials the user runs as (`None`: redfuse's own).
    pub fn check(
        &self,
        user: &str,
        password: &[u8],
    ) -> Result<Option<Arc<Credentials>>, AuthRefused> {
        let digest = sha256(password);
        match self.users.get(user) {
            Some(u) if u.enabled && u.passwords.iter().any(|p| constant_time_eq(p, &digest)) => {
                Ok(u.upstream.clone())
            }
            _ => Err(AuthRefused),
        }
    }
}

/// The credentials were not accepted (Redis's `WRONGPASS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthRefused;

pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(user: Option<&str>, pw: &str) -> Arc<Credentials> {
        Arc::new(Credentials {
            username: user.map(str::to_owned),
            password: pw.to_owned(),
        })
    }

    #[test]
    fn identities_are_interned_per_user() {
        let ids = Identities::new();
        let a = ids.identity(Some(creds(None, "pw")));
        let b = ids.identity(Some(creds(Some("default"), "other")));
        let c = ids.identity(Some(creds(Some("alice"), "pw")));
        assert_eq!(a.id, b.id, "AUTH pw is user default");
        assert_ne!(a.id, c.id);
        assert!(ids.identity(None).id.is_anonymous());
        assert_eq!(ids.name(c.id), "alice");
    }

    #[tokio::test(start_paused = true)]
    async fn accepted_credentials_are_remembered_by_digest_only() {
        let ids = Identities::new();
        let good = creds(Some("alice"), "secret");
        assert_eq!(ids.last_accepted(&good), None);
        ids.accepted(&good);
        let at = ids.last_accepted(&good).unwrap();
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(ids.last_accepted(&good), Some(at), "no expiry by age");
        assert_eq!(ids.last_accepted(&creds(Some("alice"), "Secret")), None);
        assert_eq!(ids.last_accepted(&creds(Some("bob"), "secret")), None);
        let id = ids.intern("alice");
        assert_eq!(ids.credentials(id).as_deref(), Some(&*good));
        ids.rejected(&good);
        assert_eq!(ids.last_accepted(&good), None);
        assert_eq!(ids.credentials(id), None);
        let inner = ids.lock();
        assert!(
            inner
                .accepted
                .keys()
                .all(|d| !d.windows(6).any(|w| w == b"secret")),
            "no plain password stored"
        );
    }

    #[test]
    fn client_users_check_passwords_and_map_identities() {
        let users = ClientUsers::new(&[
            UserSpec {
                name: "default".into(),
                passwords: vec![sha256(b"pw")],
                enabled: true,
                upstream: None,
            },
            UserSpec {
                name: "alice".into(),
                passwords: vec![sha256(b"a1"), sha256(b"a2")],
                enabled: true,
                upstream: Some(Credentials {
                    username: Some("app".into()),
                    password: "up".into(),
                }),
            },
            UserSpec {
                name: "off".into(),
                passwords: vec![sha256(b"x")],
                enabled: false,
                upstream: None,
            },
        ])
        .unwrap();
        assert_eq!(users.check("default", b"pw"), Ok(None));
        assert_eq!(users.check("default", b"nope"), Err(AuthRefused));
        assert_eq!(users.check("alice", b"a2").unwrap().unwrap().user(), "app");
        assert_eq!(users.check("off", b"x"), Err(AuthRefused));
        assert_eq!(users.check("nobody", b"pw"), Err(AuthRefused));
        assert!(ClientUsers::new(&[]).is_none());
    }
}
