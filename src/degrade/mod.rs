//! Degraded mode: the one place that decides what a client gets when an upstream cannot
//! serve, and the owner of everything those answers come from: the reply cache, the cache
//! policy, the fail-open rules and the write queue.
//!
//! While an upstream is healthy, replies of cacheable reads fill the cache and every write
//! invalidates the keys it touches *before* it is forwarded and again when it has run
//! ([`effects`]); a fill carries a ticket taken before its read was sent, so a read that
//! raced a write can never re-insert the old value. When the breaker rejects a request (or
//! an admitted one fails), reads are answered from the cache partition of the client's
//! identity, or with what Redis answers for a missing key, and writes by the first
//! matching fail-open rule: a fixed reply, an error, or a reply plus a journal entry
//! replayed on recovery.
//!
//! # What a degraded read can return
//!
//! - A reply Redis gave to the same command, for the same database, protocol and identity,
//!   no older than the key's `max_stale_ms`, filled after every write to the key that
//!   redfuse forwarded, and never past the key's expiry when the commands redfuse
//!   forwarded told it (`SET ... EX|PX|EXAT|PXAT|KEEPTTL`, `SETEX`, `PSETEX`, `EXPIRE*`,
//!   `PERSIST`, `GETEX`). Where the expiry is unknown, `max_stale_ms` bounds it.
//! - The value of a plain `SET` Redis acknowledged, for its writer's identity.
//! - On a miss: what Redis answers for a key that does not exist (typed by the command
//!   table: nil, 0, an empty array, map or set), or the configured miss reply; but an error
//!   when a write to the key whose result redfuse does not know was acknowledged within
//!   `max_stale_ms`, so a client never reads a value older than a write it saw succeed.
//! - `NOAUTH` for a client that never authenticated against a Redis that requires it.

pub mod effects;

use std::sync::Arc;

use bytes::Bytes;
use std::sync::OnceLock;

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use tokio::time::Instant;

use crate::auth::{Credentials, Identities, IdentityId};
use crate::cache::{Cache, CacheKey, CacheResult, Lookup};
use crate::command::{Cacheable, Classified, absent_reply, ids, name_of};
use crate::effect::{ConnId, FillPlan, KeyName, MgetParts, Written};
use crate::error::{Error, UpstreamError, error_reply};
use crate::resp::reply::Absent;
use crate::resp::scan::join_array;
use crate::resp::{Proto, Request, parse_u32, reply};
use crate::rules::{CachePolicy, Decision, FailOpen, Live, MissReply};
use crate::writequeue::{QueueError, WriteQueue};

/// Where a reply came from, for `redfuse_operations_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Redis answered (an error reply from Redis is still Redis's answer).
    Upstream,
    /// Answered from the cache or by a fail-open rule.
    Fallback,
    /// redfuse answered with an error of its own.
    Error,
}

/// What about a client changes a cached answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientView {
    /// `None` when redfuse could not follow the client's `SELECT`: no cache then.
    pub db: Option<u32>,
    pub identity: IdentityId,
    pub proto: Proto,
    /// The client never authenticated and Redis requires it: degraded answers are
    /// Redis's `NOAUTH` too.
    pub noauth: bool,
}

pub struct Degrade {
    pub cache: Cache,
    /// Both replaced by a configuration reload (`rules::Live`).
    pub policy: Live<CachePolicy>,
    pub fail_open: Live<FailOpen>,
    pub queue: Arc<WriteQueue>,
    pub identities: Arc<Identities>,
    failopen_replies: IntCounterVec,
    /// `failopen_replies{command,rule="cache_hit"}` per command id, resolved on first use:
    /// the one degraded answer that is on a hot path (every read while a breaker is open).
    hits: Vec<OnceLock<IntCounter>>,
}

impl Degrade {
    pub fn new(
        cache: Cache,
        policy: CachePolicy,
        fail_open: FailOpen,
        queue: Arc<WriteQueue>,
        identities: Arc<Identities>,
        registry: &Registry,
    ) -> prometheus::Result<Degrade> {
        let failopen_replies = IntCounterVec::new(
            Opts::new(
                "redfuse_failopen_replies_total",
                "Replies made in degraded mode, by command and by the rule (or cache outcome) that made them",
            ),
            &["command", "rule"],
        )?;
        registry.register(Box::new(failopen_replies.clone()))?;
        Ok(Degrade {
            cache,
            policy: Live::new(policy),
            fail_open: Live::new(fail_open),
            queue,
            identities,
            failopen_replies,
            hits: (0..=crate::command::UNKNOWN)
                .map(|_| OnceLock::new())
                .collect(),
        })
    }

    fn count_hit(&self, id: usize) {
        if let Some(cell) = self.hits.get(id) {
            cell.get_or_init(|| {
                self.failopen_replies
                    .with_label_values(&[name_of(id), "cache_hit"])
            })
            .inc();
        }
    }

    fn count(&self, command: &str, rule: &str) {
        self.failopen_replies
            .with_label_values(&[command, rule])
            .inc();
    }

    /// Plans how a read's reply fills the cache, or `None` when it does not.
    pub fn plan_fill(&self, view: ClientView, req: &Request, cls: &Classified) -> Option<FillPlan> {
        if !self.cache.enabled() || view.noauth {
            return None;
        }
        self.cache_keys(view, req, cls, true)
    }

    /// Warms the cache entries a run of reads answered from the cache will look up, so
    /// that their memory misses overlap instead of stalling each answer in turn.
    pub fn prefetch_answers<'a>(
        &self,
        view: ClientView,
        reads: impl Iterator<Item = (&'a Request, &'a Classified)>,
    ) {
        let Some(db) = view.db else {
            return;
        };
        if !self.cache.enabled() {
            return;
        }
        let mut keys = Vec::with_capacity(reads.size_hint().0);
        for (req, cls) in reads {
            match cls.cacheable {
                Cacheable::No => {}
                Cacheable::SingleKeyRead => {
                    keys.push(CacheKey::of(db, view.identity, view.proto, req.args()))
                }
                Cacheable::Mget => keys.extend(
                    req.args()
                        .skip(1)
                        .iter()
                        .map(|k| CacheKey::get(db, view.identity, view.proto, k)),
                ),
            }
        }
        self.cache.prefetch(&keys);
    }

    /// The cache entries a read maps to; `filter` applies the include/exclude policy (a
    /// degraded lookup does not: an excluded key is simply never found).
    fn cache_keys(
        &self,
        view: ClientView,
        req: &Request,
        cls: &Classified,
        filter: bool,
    ) -> Option<FillPlan> {
        let db = view.db?;
        let policy = self.policy.get();
        let allowed = |k: &[u8]| !filter || policy.cacheable_key(k);
        match cls.cacheable {
            Cacheable::No => None,
            Cacheable::SingleKeyRead => {
                let redis_key = KeyName::of(req, cls.keys.first()?);
                if !allowed(&redis_key) {
                    self.cache.count(CacheResult::Bypass);
                    return None;
                }
                let key = CacheKey::of(db, view.identity, view.proto, req.args());
                Some(FillPlan::Single {
                    ticket: self.cache.ticket(db, &redis_key),
                    key,
                    redis_key,
                })
            }
            Cacheable::Mget => {
                let args = req.args();
                if !args.skip(1).iter().all(allowed) {
                    self.cache.count(CacheResult::Bypass);
                    return None;
                }
                // Exact size known: one allocation, no regrowth.
                let parts = MgetParts::new(req, |k| {
                    (
                        CacheKey::get(db, view.identity, view.proto, k),
                        self.cache.ticket(db, k),
                    )
                });
                Some(FillPlan::Mget { parts })
            }
        }
    }

    /// Removes what a write may change, before it is sent (and, through its reply effect,
    /// again once it has run: a read that ran on another connection between the two could
    /// otherwise fill the value the write is about to replace). Returns what the reply
    /// effect needs.
    pub fn before_write(
        &self,
        db: Option<u32>,
        identity: IdentityId,
        proto: Proto,
        request: &Request,
        class: &Classified,
    ) -> Written {
        self.invalidate(db, request, class);
        let ticket = match db {
            Some(db) if effects::fills_own_value(class, request.args()) => {
                Some(self.cache.ticket(db, &request.args()[1]))
            }
            _ => None,
        };
        Written {
            db,
            identity,
            request: request.clone(),
            class: class.clone(),
            sent: Instant::now(),
            ticket,
            proto,
        }
    }

    /// Drops every entry a write may change. `db` `None`: the client's database is
    /// unknown, so every database is cleared of the keys.
    pub fn invalidate(&self, db: Option<u32>, req: &Request, cls: &Classified) {
        self.invalidate_via(db, req, cls, None);
    }

    /// [`Degrade::invalidate`] by the reply of a write that arrived on `via`.
    pub fn invalidate_via(
        &self,
        db: Option<u32>,
        req: &Request,
        cls: &Classified,
        via: Option<ConnId>,
    ) {
        let args = req.args();
        if matches!(cls.id, ids::FLUSHALL)
            || (db.is_none() && matches!(cls.id, ids::FLUSHDB | ids::SWAPDB))
        {
            self.cache.clear_all();
            return;
        }
        let Some(db) = db else {
            for i in cls.keys.iter() {
                self.cache.invalidate_everywhere(&args[i]);
            }
            return;
        };
        match cls.id {
            ids::FLUSHDB => {
                self.cache.clear_db(db);
            }
            ids::SWAPDB => {
                for a in args.iter().skip(1).take(2) {
                    if let Some(other) = parse_u32(a) {
                        self.cache.clear_db(other);
                    }
                }
            }
            _ => {
                for i in cls.keys.iter() {
                    self.cache.invalidate_via(db, &args[i], via);
                }
                // Commands that write a key in another db.
                match cls.id {
                    ids::MOVE if args.len() >= 3 => {
                        if let Some(target) = parse_u32(&args[2]) {
                            self.cache.invalidate(target, &args[1]);
                        }
                    }
                    ids::COPY => {
                        let db_opt = args.iter().position(|a| a.eq_ignore_ascii_case(b"DB"));
                        if let (Some(i), Some(dst)) = (db_opt, args.get(2))
                            && let Some(target) = args.get(i + 1).and_then(parse_u32)
                        {
                            self.cache.invalidate(target, dst);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// The degraded answer for a cacheable read given at `now`: the cached reply while
    /// fresh enough, else the miss reply (per key for MGET).
    pub fn cached_answer(
        &self,
        view: ClientView,
        plan: &FillPlan,
        id: usize,
        absent: Option<Absent>,
        err: &UpstreamError,
        now: Instant,
    ) -> (Bytes, Origin) {
        if view.noauth {
            return (Bytes::from_static(reply::NOAUTH), Origin::Error);
        }
        let command = name_of(id);
        match plan {
            FillPlan::Single {
                key,
                redis_key,
                ticket,
            } => {
                let max_stale = self.policy.max_stale(redis_key);
                if let Lookup::Hit(bytes) = self.cache.get_for(key, Some(*ticket), now, max_stale) {
                    self.count_hit(id);
                    return (bytes, Origin::Fallback);
                }
                self.miss(view, command, absent, key.db, redis_key, err, now)
            }
            FillPlan::Mget { parts } => {
                let mut values = Vec::with_capacity(parts.len());
                for (key, redis_key, ticket) in parts.iter() {
                    let max_stale = self.policy.max_stale(redis_key);
                    if let Lookup::Hit(bytes) =
                        self.cache.get_for(key, Some(*ticket), now, max_stale)
                    {
                        values.push(bytes);
                        continue;
                    }
                    if let UpstreamError::Misconfigured { .. } = err {
                        self.count(command, "cache_miss_misconfigured");
                        return (error_reply(&Error::Upstream(err.clone())), Origin::Error);
                    }
                    if self
                        .cache
                        .miss_is_unsafe(key.db, redis_key, view.identity, now, max_stale)
                    {
                        self.count(command, "cache_miss_written");
                        return (written_error(err), Origin::Error);
                    }
                    match self.policy.miss_reply(redis_key) {
                        MissReply::Absent => values.push(reply::null(view.proto)),
                        MissReply::Value(v) => values.push(v.encode(view.proto)),
                        MissReply::Error => {
                            self.count(command, "cache_miss_error");
                            return (error_reply(&Error::Upstream(err.clone())), Origin::Error);
                        }
                    }
                }
                self.count(command, "cache_mget");
                (join_array(&values), Origin::Fallback)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn miss(
        &self,
        view: ClientView,
        command: &'static str,
        absent: Option<Absent>,
        db: u32,
        redis_key: &[u8],
        err: &UpstreamError,
        now: Instant,
    ) -> (Bytes, Origin) {
        if let UpstreamError::Misconfigured { .. } = err {
            self.count(command, "cache_miss_misconfigured");
            return (error_reply(&Error::Upstream(err.clone())), Origin::Error);
        }
        if self.cache.miss_is_unsafe(
            db,
            redis_key,
            view.identity,
            now,
            self.policy.max_stale(redis_key),
        ) {
            self.count(command, "cache_miss_written");
            return (written_error(err), Origin::Error);
        }
        match self.policy.miss_reply(redis_key) {
            MissReply::Absent => {
                self.count(command, "cache_miss_absent");
                let reply =
                    absent.map_or_else(|| reply::null(view.proto), |a| a.encode(view.proto));
                (reply, Origin::Fallback)
            }
            MissReply::Value(v) => {
                self.count(command, "cache_miss_default");
                (v.encode(view.proto), Origin::Fallback)
            }
            MissReply::Error => {
                self.count(command, "cache_miss_error");
                (error_reply(&Error::Upstream(err.clone())), Origin::Error)
            }
        }
    }

    /// The answer, at `now`, for a request the upstream cannot serve: from the cache, by a
    /// miss reply, or by the fail-open `rules` of the upstream that could not serve (its
    /// own, or the global ones). Async for the `queue` rule only: its reply waits until
    /// the write is in the journal (on the journal's disk thread); every other answer is
    /// ready at once.
    #[allow(clippy::too_many_arguments)]
    pub async fn reply_by(
        &self,
        rules: &FailOpen,
        view: ClientView,
        credentials: Option<&Arc<Credentials>>,
        req: &Request,
        cls: &Classified,
        err: &UpstreamError,
        now: Instant,
    ) -> (Bytes, Origin) {
        if cls.is(ids::PING) && rules.ping_locally() {
            self.count("ping", "ping");
            return (Bytes::from_static(reply::PONG), Origin::Fallback);
        }
        if view.noauth {
            return (Bytes::from_static(reply::NOAUTH), Origin::Error);
        }
        if let Some(plan) = self.cache_keys(view, req, cls, false) {
            let absent = absent_reply(cls.id, req.args());
            return self.cached_answer(view, &plan, cls.id, absent, err, now);
        }
        let keys: Vec<&[u8]> = cls.keys.iter().map(|i| req.args().arg(i)).collect();
        let name = cls.name();
        match rules.decide(name, cls.write, cls.read, &keys) {
            Decision::Reply { rule, value } => {
                self.count(name, rule);
                (value.encode(view.proto), Origin::Fallback)
            }
            Decision::Queue { rule, value } => {
                let Some(db) = view.db else {
                    // Replayed in the wrong database, it would write the wrong keys.
                    self.count(name, "queue_unknown_db");
                    return (error_reply(&Error::Upstream(err.clone())), Origin::Error);
                };
                match self
                    .queue
                    .append(db, view.identity, credentials.cloned(), req.raw.clone())
                    .await
                {
                    Ok(_) => {
                        self.count(name, rule);
                        effects::show_queued_write(self, db, view.identity, req, cls);
                        (value.encode(view.proto), Origin::Fallback)
                    }
                    Err(e @ QueueError::Full { .. }) => {
                        self.count(name, "queue_full");
                        let msg = format!("ERR redfuse: {e}; write not accepted");
                        (reply::error(&msg), Origin::Error)
                    }
                    Err(e) => {
                        self.count(name, "queue_error");
                        let msg = format!("ERR redfuse: write queue unavailable: {e}");
                        (reply::error(&msg), Origin::Error)
                    }
                }
            }
            Decision::Error { rule, message } => {
                self.count(name, rule);
                match message {
                    Some(m) => (reply::error(m), Origin::Error),
                    // Nothing configured: say which upstream failed and why.
                    None => (error_reply(&Error::Upstream(err.clone())), Origin::Error),
                }
            }
        }
    }
}

/// The answer to a degraded read of a key written since its last cached reply.
fn written_error(err: &UpstreamError) -> Bytes {
    reply::error(&format!(
        "ERR redfuse: {err}; the key was written since it was last read, so no cached reply can be served"
    ))
}
