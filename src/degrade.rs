//! Degraded mode: the one place that decides what a client gets when an upstream cannot
//! serve, and the cache bookkeeping that makes those answers possible.
//!
//! While an upstream is healthy, replies of cacheable reads fill the cache and every write
//! invalidates the keys it touches *before* it is forwarded; a fill carries a ticket taken
//! before its read was sent, so a read that raced a write can never re-insert the old value.
//! When the breaker rejects a request (or an admitted one fails), reads are answered from
//! the cache or with the configured miss reply, and writes by the first matching fail-open
//! rule: a fixed reply, an error, or a reply plus a journal entry replayed on recovery.

use std::sync::Arc;

use bytes::Bytes;
use prometheus::{IntCounterVec, Opts, Registry};
use tokio::time::Instant;
use tracing::debug;

use crate::cache::{
    Cache, CacheKey, CacheResult, FillTicket, Lookup, join_array_reply, split_array_reply,
};
use crate::command::{self, Cacheable, CommandSpec};
use crate::error::{Error, UpstreamError, error_reply};
use crate::journal::{Journal, JournalError};
use crate::protocol::{Proto, Request, reply};
use crate::rules::{CachePolicy, Decision, FailOpen, MissReply};

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

/// What a session knows that changes a cached answer.
#[derive(Debug, Clone, Copy)]
pub struct ClientView {
    pub db: u32,
    pub proto: Proto,
    /// Whether this client may share the cache (and in-flight reads): only clients on
    /// redfuse's own identity do. Cached replies carry no ACL, so a client authenticated as
    /// another user must never be answered with them, nor fill them.
    pub cache: bool,
}

/// How a read's reply fills the cache.
#[derive(Clone)]
pub enum Fill {
    Single {
        key: CacheKey,
        redis_key: Bytes,
        ticket: FillTicket,
    },
    /// MGET: one GET entry per key, in argument order.
    Mget {
        parts: Vec<(CacheKey, Bytes, FillTicket)>,
    },
}

impl Fill {
    /// The identity of a single-key read for single-flight: the same command, db and
    /// protocol, and no write to the key since.
    pub fn flight_key(&self) -> Option<(CacheKey, FillTicket)> {
        match self {
            Fill::Single { key, ticket, .. } => Some((key.clone(), *ticket)),
            Fill::Mget { .. } => None,
        }
    }
}

pub struct Degrade {
    pub cache: Cache,
    pub policy: CachePolicy,
    pub fail_open: FailOpen,
    pub journal: Arc<Journal>,
    failopen_replies: IntCounterVec,
}

impl Degrade {
    pub fn new(
        cache: Cache,
        policy: CachePolicy,
        fail_open: FailOpen,
        journal: Arc<Journal>,
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
            policy,
            fail_open,
            journal,
            failopen_replies,
        })
    }

    fn count(&self, command: &str, rule: &str) {
        self.failopen_replies
            .with_label_values(&[command, rule])
            .inc();
    }

    /// Plans how this read's reply fills the cache, or None when it is not cacheable.
    pub fn plan_fill(&self, view: ClientView, req: &Request, spec: &CommandSpec) -> Option<Fill> {
        if !view.cache {
            return None;
        }
        self.cache_keys(view, req, spec, true)
    }

    /// The cache entries a read maps to; `filter` applies the include/exclude policy (a
    /// degraded lookup does not: an excluded key is simply never found).
    fn cache_keys(
        &self,
        view: ClientView,
        req: &Request,
        spec: &CommandSpec,
        filter: bool,
    ) -> Option<Fill> {
        let proto = view.proto.as_u8();
        let allowed = |k: &[u8]| !filter || self.policy.cacheable_key(k);
        match command::cacheable(spec, &req.args) {
            Cacheable::No => None,
            Cacheable::SingleKeyRead => {
                let index = *command::key_indices(spec, &req.args).first()?;
                let redis_key = req.args[index].clone();
                if !allowed(&redis_key) {
                    self.cache.count(CacheResult::Bypass);
                    return None;
                }
                let ticket = self.cache.ticket(view.db, &redis_key);
                let key = CacheKey::new(view.db, proto, &req.args);
                Some(Fill::Single {
                    key,
                    redis_key,
                    ticket,
                })
            }
            Cacheable::Mget => {
                let parts: Vec<_> = req.args[1..]
                    .iter()
                    .filter(|k| allowed(k))
                    .map(|k| {
                        (
                            CacheKey::get(view.db, proto, k),
                            k.clone(),
                            self.cache.ticket(view.db, k),
                        )
                    })
                    .collect();
                if parts.len() != req.args.len() - 1 {
                    self.cache.count(CacheResult::Bypass);
                    return None;
                }
                Some(Fill::Mget { parts })
            }
        }
    }

    /// The degraded answer for a cacheable read: cached bytes while fresh enough, else the
    /// configured miss reply (per key for MGET).
    pub fn from_cache(
        &self,
        view: ClientView,
        fill: &Fill,
        command: &str,
        err: &UpstreamError,
    ) -> (Bytes, Origin) {
        let now = Instant::now();
        let resp3 = view.proto == Proto::Resp3;
        match fill {
            Fill::Single { key, redis_key, .. } => {
                if view.cache
                    && let Lookup::Hit(bytes) =
                        self.cache.get(key, now, self.policy.max_stale(redis_key))
                {
                    self.count(command, "cache_hit");
                    return (bytes, Origin::Fallback);
                }
                self.miss(command, redis_key, resp3, err)
            }
            Fill::Mget { parts } => {
                let mut values = Vec::with_capacity(parts.len());
                for (key, redis_key, _) in parts {
                    let found = match view.cache {
                        true => self.cache.get(key, now, self.policy.max_stale(redis_key)),
                        false => Lookup::Miss,
                    };
                    match found {
                        Lookup::Hit(bytes) => values.push(bytes),
                        _ => match self.policy.miss_reply(redis_key) {
                            MissReply::Nil => values.push(reply::null(view.proto)),
                            MissReply::Value(v) => values.push(v.encode(resp3)),
                            MissReply::Error => {
                                self.count(command, "cache_miss_error");
                                return (error_reply(&Error::Upstream(err.clone())), Origin::Error);
                            }
                        },
                    }
                }
                self.count(command, "cache_mget");
                (join_array_reply(&values), Origin::Fallback)
            }
        }
    }

    /// Stores a reply per its fill plan. Error replies are never stored; nil ones only when
    /// configured.
    pub fn apply_fill(&self, fill: Fill, reply: &Bytes) {
        let now = Instant::now();
        let storable = |r: &Bytes| self.policy.cache_nil() || !is_nil(r);
        match fill {
            Fill::Single {
                key,
                redis_key,
                ticket,
            } => {
                if storable(reply) {
                    self.cache
                        .insert_checked(ticket, key, redis_key, reply.clone(), now);
                }
            }
            Fill::Mget { parts } => {
                let Some(values) = split_array_reply(reply) else {
                    return;
                };
                if values.len() != parts.len() {
                    return;
                }
                for ((key, redis_key, ticket), value) in parts.into_iter().zip(values) {
                    if storable(&value) {
                        self.cache
                            .insert_checked(ticket, key, redis_key, value, now);
                    }
                }
            }
        }
    }

    /// Removes what a write may change. Called before the write is sent and again when its
    /// reply arrives: a read that ran on another connection between the two could otherwise
    /// fill the value the write is about to replace. `db` None: the client's database is
    /// unknown (a SELECT whose outcome redfuse could not see), so every database is cleared
    /// of the keys.
    pub fn invalidate_for_write(&self, db: Option<u32>, req: &Request, spec: &CommandSpec) {
        let Some(db) = db else {
            for i in command::key_indices(spec, &req.args).iter() {
                self.cache.invalidate_everywhere(&req.args[i]);
            }
            if matches!(spec.name, "flushall" | "flushdb" | "swapdb") {
                self.cache.clear_all();
            }
            return;
        };
        match spec.name {
            "flushall" => {
                self.cache.clear_all();
            }
            "flushdb" => {
                self.cache.clear_db(db);
            }
            "swapdb" => {
                for a in req.args.iter().skip(1).take(2) {
                    if let Some(other) = parse_u32(a) {
                        self.cache.clear_db(other);
                    }
                }
            }
            _ => {
                for i in command::key_indices(spec, &req.args).iter() {
                    self.cache.invalidate(db, &req.args[i]);
                }
                // Commands that write a key in another db.
                match spec.name {
                    "move" if req.args.len() >= 3 => {
                        if let Some(target) = parse_u32(&req.args[2]) {
                            self.cache.invalidate(target, &req.args[1]);
                        }
                    }
                    "copy" => {
                        let db_opt = req.args.iter().position(|a| a.eq_ignore_ascii_case(b"DB"));
                        if let (Some(i), Some(dst)) = (db_opt, req.args.get(2))
                            && let Some(target) = req.args.get(i + 1).and_then(parse_u32)
                        {
                            self.cache.invalidate(target, dst);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// The answer for a request the upstream cannot serve: from the cache, by a miss reply, or
    /// by a fail-open rule.
    pub fn reply(
        &self,
        view: ClientView,
        req: &Request,
        spec: Option<&CommandSpec>,
        err: &UpstreamError,
    ) -> (Bytes, Origin) {
        let Some(spec) = spec else {
            return self.by_rule(view, req, "unknown", false, false, &[], err);
        };
        if spec.name == "ping" && self.fail_open.ping_locally() {
            self.count("ping", "ping");
            return (Bytes::from_static(reply::PONG), Origin::Fallback);
        }
        if let Some(fill) = self.cache_keys(view, req, spec, false) {
            return self.from_cache(view, &fill, spec.name, err);
        }
        let is_write = command::is_write(spec, &req.args);
        let is_read = command::is_read(spec, &req.args);
        let keys: Vec<&[u8]> = command::key_indices(spec, &req.args)
            .iter()
            .map(|i| &req.args[i][..])
            .collect();
        self.by_rule(view, req, spec.name, is_write, is_read, &keys, err)
    }

    fn miss(
        &self,
        command: &str,
        redis_key: &[u8],
        resp3: bool,
        err: &UpstreamError,
    ) -> (Bytes, Origin) {
        match self.policy.miss_reply(redis_key) {
            MissReply::Nil => {
                self.count(command, "cache_miss_nil");
                let proto = if resp3 { Proto::Resp3 } else { Proto::Resp2 };
                (reply::null(proto), Origin::Fallback)
            }
            MissReply::Value(v) => {
                self.count(command, "cache_miss_default");
                (v.encode(resp3), Origin::Fallback)
            }
            MissReply::Error => {
                self.count(command, "cache_miss_error");
                (error_reply(&Error::Upstream(err.clone())), Origin::Error)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn by_rule(
        &self,
        view: ClientView,
        req: &Request,
        name: &str,
        is_write: bool,
        is_read: bool,
        keys: &[&[u8]],
        err: &UpstreamError,
    ) -> (Bytes, Origin) {
        let resp3 = view.proto == Proto::Resp3;
        match self.fail_open.decide(name, is_write, is_read, keys) {
            Decision::Reply { rule, value } => {
                self.count(name, rule);
                (value.encode(resp3), Origin::Fallback)
            }
            Decision::Queue { rule, value } => {
                match self.journal.append(view.db, req.raw.clone()) {
                    Ok(_) => {
                        self.count(name, rule);
                        self.apply_queued_write(view, req, name, keys);
                        (value.encode(resp3), Origin::Fallback)
                    }
                    Err(JournalError::Full { max_bytes }) => {
                        self.count(name, "queue_full");
                        let msg = format!(
                            "ERR redfuse: write queue full ({max_bytes} bytes); write not accepted"
                        );
                        (reply::error(&msg), Origin::Error)
                    }
                    Err(e) => {
                        self.count(name, "queue_error");
                        debug!("journal append failed: {e}");
                        let msg = format!("ERR redfuse: write queue unavailable: {e}");
                        (reply::error(&msg), Origin::Error)
                    }
                }
            }
            Decision::Error { rule, message } => {
                self.count(name, rule);
                if rule == "default" {
                    // Nothing configured: say which upstream failed and why.
                    let _ = message;
                    return (error_reply(&Error::Upstream(err.clone())), Origin::Error);
                }
                (reply::error(message), Origin::Error)
            }
        }
    }

    /// A queued write will happen later; until then the cache shows its plain effect (SET,
    /// DEL, HSET) or forgets the keys, so the application reads its own writes during the outage.
    fn apply_queued_write(&self, view: ClientView, req: &Request, name: &str, keys: &[&[u8]]) {
        for k in keys {
            self.cache.invalidate(view.db, k);
        }
        let now = Instant::now();
        let args = &req.args;
        let both = |redis_key: &Bytes, cmd: &[&[u8]], value: Bytes| {
            for proto in [2u8, 3] {
                let v = if is_nil(&value) {
                    reply::null(if proto == 3 {
                        Proto::Resp3
                    } else {
                        Proto::Resp2
                    })
                } else {
                    value.clone()
                };
                self.cache.insert(
                    CacheKey::new(view.db, proto, cmd),
                    redis_key.clone(),
                    v,
                    now,
                );
            }
        };
        match name {
            // Only the plain form: NX/XX/GET/KEEPTTL change what the result would be.
            "set" if args.len() == 3 => both(&args[1], &[b"GET", &args[1]], reply::bulk(&args[2])),
            "setex" | "psetex" if args.len() == 4 => {
                both(&args[1], &[b"GET", &args[1]], reply::bulk(&args[3]))
            }
            "del" | "unlink" if self.policy.cache_nil() => {
                for k in &args[1..] {
                    both(k, &[b"GET", k], reply::null(Proto::Resp2));
                }
            }
            "hset" | "hmset" if args.len() >= 4 && args.len().is_multiple_of(2) => {
                for pair in args[2..].chunks(2) {
                    both(
                        &args[1],
                        &[b"HGET", &args[1], &pair[0]],
                        reply::bulk(&pair[1]),
                    );
                }
            }
            _ => {}
        }
    }
}

fn is_nil(reply: &[u8]) -> bool {
    reply == b"$-1\r\n" || reply == b"_\r\n" || reply == b"*-1\r\n"
}

fn parse_u32(b: &Bytes) -> Option<u32> {
    std::str::from_utf8(b).ok()?.parse().ok()
}
