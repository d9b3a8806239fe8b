//! Reply effects applied by the cache's owner: fills, single-flight, and what a write that
//! has run tells about its keys (see `crate::effect`).

use std::borrow::Cow;
use std::ops::Range;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::time::Instant;

use super::Degrade;
use crate::auth::IdentityId;
use crate::cache::{CacheKey, Fill, FreshClock, Seen, Ttl};
use crate::command::{Classified, ids};
use crate::effect::{ConnId, DeferredFill, EffectSink, FillPlan, Fills, ReplyEffect, Written};
use crate::error::{Reply, UpstreamError};
use crate::resp::scan::element_ranges;
use crate::resp::{Args, Proto, Request, is_error_reply, parse_int, reply};

impl EffectSink for Degrade {
    fn apply(&self, effect: ReplyEffect, result: &mut Reply, via: Option<ConnId>) {
        match effect {
            ReplyEffect::Fill {
                plan,
                leader,
                degraded,
            } => {
                match &*result {
                    Ok(r) if !is_error_reply(r) => {
                        let fill = DeferredFill {
                            plan,
                            leader,
                            reply: r.clone(),
                            fresh: 0,
                            elements: None,
                        };
                        self.fill_together(&mut vec![fill], via);
                        return;
                    }
                    Ok(_) => {}
                    Err(e)
                        if e.is_unavailability()
                            && !matches!(e, UpstreamError::Answered { .. }) =>
                    {
                        if let Some(d) = degraded {
                            let (answer, _) = self.cached_answer(
                                d.view,
                                &plan,
                                d.command,
                                d.absent,
                                e,
                                Instant::now(),
                            );
                            let cause = Box::new(e.clone());
                            *result = Err(UpstreamError::Answered { answer, cause });
                        }
                    }
                    Err(_) => {}
                }
                if let Some(leader) = leader {
                    leader.finish(result);
                }
            }
            ReplyEffect::Write(w) => self.written(&w, result, via),
            // A queued write reached Redis: everyone's view of its keys is outdated now.
            ReplyEffect::Replayed(w) => {
                self.invalidate(w.db, &w.request, &w.class);
                self.mark(&w, true, Ttl::Unknown);
            }
            ReplyEffect::Exec(writes) => {
                // Which of the queued writes ran, and to what effect, is inside the EXEC
                // reply; redfuse only knows they may all have.
                for w in &writes {
                    self.invalidate(w.db, &w.request, &w.class);
                    self.mark(w, true, Ttl::Unknown);
                }
            }
        }
    }

    fn apply_fills(&self, fills: &mut Fills, via: Option<ConnId>) {
        if fills.skipped > 0 {
            self.cache
                .count_skipped_fills(std::mem::take(&mut fills.skipped));
        }
        fills.clock = None;
        if !fills.deferred.is_empty() {
            self.fill_together(&mut fills.deferred, via);
        }
    }

    fn prefetch(&self, effect: &ReplyEffect) {
        if let ReplyEffect::Fill { plan, leader, .. } = effect {
            self.prefetch_fresh_fills(plan);
            if let Some(leader) = leader {
                leader.prefetch();
            }
        }
    }

    fn defer(
        &self,
        effect: ReplyEffect,
        reply: &Reply,
        fills: &mut Fills,
        now: Instant,
    ) -> Option<ReplyEffect> {
        let mut fresh = Fresh::default();
        if let (ReplyEffect::Fill { plan, .. }, Ok(r)) = (&effect, reply)
            && !is_error_reply(r)
        {
            let clock = *fills.clock.get_or_insert_with(|| {
                self.cache
                    .fresh_clock(now, self.policy.get().refill_after())
            });
            fresh = self.fresh_fills(plan, r, clock);
            fills.skipped += fresh.count;
            if fresh.all {
                if let ReplyEffect::Fill {
                    leader: Some(leader),
                    ..
                } = effect
                {
                    leader.finish(reply);
                }
                return None;
            }
        }
        effect.defer(reply, &mut fills.deferred, fresh.parts, fresh.elements)
    }
}

/// Which fills of a reply would store nothing new; see [`Degrade::fresh_fills`].
#[derive(Debug, Default)]
struct Fresh {
    /// Every fill the reply would make stores nothing new: none is made.
    all: bool,
    /// MGET parts whose fill stores nothing new (bit i: part i, for the first 64).
    parts: u64,
    /// How many fills store nothing new.
    count: u64,
    /// Where each element of an MGET's reply lies, found while looking (handed to the fill,
    /// which would otherwise split the reply again).
    elements: Option<Vec<Range<usize>>>,
}

impl Degrade {
    /// Starts loading what [`Degrade::fresh_fills`] will read for `plan`.
    fn prefetch_fresh_fills(&self, plan: &FillPlan) {
        match plan {
            FillPlan::Single { key, .. } => self.cache.prefetch_unchanged(key),
            FillPlan::Mget { parts } => {
                for (key, _, _) in parts.iter() {
                    self.cache.prefetch_unchanged(key);
                }
            }
        }
    }

    /// The fills of `reply` that would store nothing new: the reply each would store was
    /// stored under the same key less than the policy's `refill_after` ago
    /// ([`crate::cache::Cache::unchanged`]). An MGET whose keys were read a moment ago
    /// but for one stores that one alone.
    fn fresh_fills(&self, plan: &FillPlan, reply: &Bytes, clock: FreshClock) -> Fresh {
        match plan {
            FillPlan::Single { key, .. } => {
                let all = self.cache.unchanged(key, reply, clock);
                Fresh {
                    all,
                    count: u64::from(all),
                    ..Fresh::default()
                }
            }
            FillPlan::Mget { parts } => {
                // The lookups do not depend on each other: their misses overlap.
                self.prefetch_fresh_fills(plan);
                let Some(ranges) = element_ranges(reply).filter(|r| r.len() == parts.len()) else {
                    return Fresh::default();
                };
                let nil_ok = self.policy.cache_nil();
                let mut fresh = Fresh {
                    all: true,
                    ..Fresh::default()
                };
                for (i, ((key, _, _), range)) in parts.iter().zip(&ranges).enumerate() {
                    let value = &reply[range.clone()];
                    if !storable_get_reply(value, nil_ok) {
                        continue;
                    }
                    if i < 64 && self.cache.unchanged(key, value, clock) {
                        fresh.parts |= 1 << i;
                        fresh.count += 1;
                    } else {
                        fresh.all = false;
                    }
                }
                fresh.elements = Some(ranges);
                fresh
            }
        }
    }
}

impl Degrade {
    /// The fills of [`EffectSink::apply_fills`]: one cache lock for all of them, then the
    /// reads that followed them are released.
    fn fill_together(&self, fills: &mut Vec<DeferredFill>, via: Option<ConnId>) {
        let now = Instant::now();
        let nil_ok = self.policy.cache_nil();
        let mut batch = Vec::with_capacity(fills.len());
        for f in fills.iter() {
            match &f.plan {
                FillPlan::Single {
                    key,
                    redis_key,
                    ticket,
                } => {
                    if nil_ok || !reply::is_null(&f.reply) {
                        batch.push(Fill {
                            ticket: *ticket,
                            key: *key,
                            redis_key,
                            reply: &f.reply,
                        });
                    }
                }
                FillPlan::Mget { parts } => {
                    let ranges = match &f.elements {
                        Some(ranges) => Cow::Borrowed(ranges),
                        None => match element_ranges(&f.reply) {
                            Some(ranges) => Cow::Owned(ranges),
                            None => continue,
                        },
                    };
                    if ranges.len() != parts.len() {
                        continue;
                    }
                    for (i, ((key, redis_key, ticket), range)) in
                        parts.iter().zip(ranges.iter()).enumerate()
                    {
                        let value = &f.reply[range.clone()];
                        let fresh = i < 64 && f.fresh & (1 << i) != 0;
                        if !fresh && storable_get_reply(value, nil_ok) {
                            batch.push(Fill {
                                ticket: *ticket,
                                key: *key,
                                redis_key,
                                reply: value,
                            });
                        }
                    }
                }
            }
        }
        self.cache.insert_all(&batch, via, now);
        drop(batch);
        for f in fills.drain(..) {
            if let Some(leader) = f.leader {
                leader.finish(&Ok(f.reply));
            }
        }
    }

    /// A write has run (`Ok`, its reply arrived on `via`) or its fate is unknown (`Err`).
    fn written(&self, w: &Written, result: &Reply, via: Option<ConnId>) {
        let Some(db) = w.db else {
            self.invalidate(None, &w.request, &w.class);
            return;
        };
        // A write whose fate is unknown may still run later: from no connection.
        let via = via.filter(|_| result.is_ok());
        let reply = match result {
            // Redis refused it: nothing changed (WRONGTYPE, NOPERM ...).
            Ok(r) if is_error_reply(r) => {
                self.invalidate_via(w.db, &w.request, &w.class, via);
                return;
            }
            Ok(r) => Some(r),
            Err(_) => None,
        };
        let learnt = reply.map(|r| learn(&w.class, w.request.args(), r, w.sent));
        // A plain SET that nothing raced: the cache can show its value.
        if let (
            Some(Learnt {
                own_value: true,
                ttl,
                ..
            }),
            Some(ticket),
        ) = (&learnt, w.ticket)
            && self.cache.set_acknowledged(
                ticket,
                via,
                CacheKey::get(db, w.identity, w.proto, &w.request.args()[1]),
                &w.request.args()[1],
                &reply::bulk(&w.request.args()[2]),
                *ttl,
                Instant::now(),
            )
        {
            return;
        }
        self.invalidate_via(w.db, &w.request, &w.class, via);
        match learnt {
            Some(l) => self.mark(w, l.value_unknown, l.ttl),
            None => self.mark(w, true, Ttl::Unknown),
        }
    }

    /// Records on every key of a write whether its value is now unknown, and its expiry.
    fn mark(&self, w: &Written, value_unknown: bool, ttl: Ttl) {
        let Some(db) = w.db else { return };
        let now = Instant::now();
        for i in w.class.keys.iter() {
            self.cache.key_written(
                db,
                &w.request.args()[i],
                value_unknown.then_some(Seen::ByAll),
                ttl,
                now,
            );
        }
    }
}

/// Whether a write, acknowledged, leaves its key holding exactly its own argument: `SET k v`
/// (with an expiry or `KEEPTTL`, not `NX`, `XX` or `GET`), `SETEX`, `PSETEX`.
pub fn fills_own_value(class: &Classified, args: Args<'_>) -> bool {
    match class.id {
        ids::SET if args.len() >= 3 => args.skip(3).iter().all(|a| {
            !(a.eq_ignore_ascii_case(b"NX")
                || a.eq_ignore_ascii_case(b"XX")
                || a.eq_ignore_ascii_case(b"GET"))
        }),
        _ => false,
    }
}

/// What an acknowledged write tells about its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Learnt {
    /// The key holds the write's own argument (see [`fills_own_value`]).
    own_value: bool,
    /// redfuse does not hold the key's value any more.
    value_unknown: bool,
    ttl: Ttl,
}

/// Reads an acknowledged write and its reply. Relative expiries count from `sent`, which
/// is no later than when Redis counted them, so redfuse never believes a key lives longer
/// than it does.
fn learn(class: &Classified, args: Args<'_>, reply: &Bytes, sent: Instant) -> Learnt {
    let unknown = Learnt {
        own_value: false,
        value_unknown: true,
        ttl: Ttl::Unknown,
    };
    let int = |r: &Bytes| {
        r.strip_prefix(b":")
            .and_then(|r| parse_int(r.strip_suffix(b"\r\n")?))
    };
    let arg_int = |i: usize| args.get(i).and_then(parse_int);
    let secs = |n: i64| Duration::from_secs(n.max(0) as u64);
    let millis = |n: i64| Duration::from_millis(n.max(0) as u64);
    match class.id {
        ids::SET if &reply[..] == reply::OK => {
            let ttl = set_ttl(args.skip(3), sent);
            Learnt {
                own_value: fills_own_value(class, args),
                value_unknown: !fills_own_value(class, args),
                ttl,
            }
        }
        ids::SETEX | ids::PSETEX if &reply[..] == reply::OK => {
            let ttl = match arg_int(2) {
                Some(n) if class.is(ids::SETEX) => Ttl::At(sent + secs(n)),
                Some(n) => Ttl::At(sent + millis(n)),
                None => Ttl::Unknown,
            };
            Learnt {
                own_value: false,
                value_unknown: true,
                ttl,
            }
        }
        ids::EXPIRE | ids::PEXPIRE | ids::EXPIREAT | ids::PEXPIREAT => {
            let ttl = match (int(reply), arg_int(2)) {
                (Some(1), Some(n)) => match class.id {
                    ids::EXPIRE => Ttl::At(sent + secs(n)),
                    ids::PEXPIRE => Ttl::At(sent + millis(n)),
                    ids::EXPIREAT => at_unix(secs(n), sent),
                    _ => at_unix(millis(n), sent),
                },
                _ => Ttl::Unknown,
            };
            // The value is untouched; the key may now be gone, which a miss says anyway.
            Learnt {
                own_value: false,
                value_unknown: false,
                ttl,
            }
        }
        ids::PERSIST => Learnt {
            own_value: false,
            value_unknown: false,
            ttl: if int(reply) == Some(1) {
                Ttl::Persistent
            } else {
                Ttl::Unknown
            },
        },
        ids::GETEX => Learnt {
            own_value: false,
            value_unknown: false,
            ttl: if reply::is_null(reply) {
                Ttl::Unknown
            } else {
                getex_ttl(args.skip(2), sent)
            },
        },
        // The key is gone: a miss answering "absent" is the truth.
        ids::DEL | ids::UNLINK | ids::GETDEL => Learnt {
            own_value: false,
            value_unknown: false,
            ttl: Ttl::Unknown,
        },
        _ => unknown,
    }
}

/// The expiry `SET`'s options leave the key with.
fn set_ttl(options: Args<'_>, sent: Instant) -> Ttl {
    let mut it = options.iter();
    while let Some(opt) = it.next() {
        let value = || it.clone().next().and_then(parse_int);
        let is = |name: &[u8]| opt.eq_ignore_ascii_case(name);
        let n = |v: Option<i64>| v.map(|n| n.max(0) as u64);
        if is(b"EX") {
            return n(value()).map_or(Ttl::Unknown, |s| Ttl::At(sent + Duration::from_secs(s)));
        } else if is(b"PX") {
            return n(value()).map_or(Ttl::Unknown, |m| Ttl::At(sent + Duration::from_millis(m)));
        } else if is(b"EXAT") {
            return n(value()).map_or(Ttl::Unknown, |s| at_unix(Duration::from_secs(s), sent));
        } else if is(b"PXAT") {
            return n(value()).map_or(Ttl::Unknown, |m| at_unix(Duration::from_millis(m), sent));
        } else if is(b"KEEPTTL") {
            return Ttl::Unknown;
        }
    }
    Ttl::Persistent
}

/// The expiry `GETEX`'s options leave the key with; `Unknown` when it keeps the old one.
fn getex_ttl(options: Args<'_>, sent: Instant) -> Ttl {
    match set_ttl(options, sent) {
        // No option: the expiry is untouched; PERSIST: none.
        Ttl::Persistent if options.iter().any(|o| o.eq_ignore_ascii_case(b"PERSIST")) => {
            Ttl::Persistent
        }
        Ttl::Persistent => Ttl::Unknown,
        other => other,
    }
}

/// An absolute Unix time as an `Instant`, reading the wall clock once.
fn at_unix(since_epoch: Duration, now: Instant) -> Ttl {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    match since_epoch.checked_sub(wall) {
        Some(ahead) => Ttl::At(now + ahead),
        None => Ttl::At(now),
    }
}

/// A queued write will happen later; until then the cache shows its plain effect (SET,
/// DEL, HSET) to the identity that wrote it, or makes its misses errors, so the application
/// reads its own writes during the outage; every other identity keeps what Redis still
/// holds.
pub(super) fn show_queued_write(
    d: &Degrade,
    db: u32,
    identity: IdentityId,
    req: &Request,
    cls: &Classified,
) {
    let now = Instant::now();
    let args = req.args();
    // Redis still holds the old values, and so may every other identity's cache.
    for i in cls.keys.iter() {
        d.cache.invalidate_for(db, &args[i], identity);
        d.cache
            .key_written(db, &args[i], Some(Seen::By(identity)), Ttl::Unknown, now);
    }
    let both = |redis_key: &[u8], cmd: &[&[u8]], value: Option<&[u8]>| {
        for proto in [Proto::Resp2, Proto::Resp3] {
            let v = value.map_or_else(|| reply::null(proto), reply::bulk);
            d.cache
                .insert(CacheKey::new(db, identity, proto, cmd), redis_key, v, now);
        }
    };
    match cls.id {
        // Only the plain form: NX/XX/GET/KEEPTTL change what the result would be.
        ids::SET if args.len() == 3 => both(&args[1], &[b"GET", &args[1]], Some(&args[2])),
        ids::SETEX | ids::PSETEX if args.len() == 4 => {
            both(&args[1], &[b"GET", &args[1]], Some(&args[3]))
        }
        ids::DEL | ids::UNLINK if d.policy.cache_nil() => {
            for k in args.skip(1).iter() {
                both(k, &[b"GET", k], None);
            }
        }
        ids::HSET | ids::HMSET if args.len() >= 4 && args.len().is_multiple_of(2) => {
            for i in (2..args.len()).step_by(2) {
                both(&args[1], &[b"HGET", &args[1], &args[i]], Some(&args[i + 1]));
            }
        }
        _ => {}
    }
}

/// Whether an element of an MGET reply is stored as the key's GET entry: only strings and
/// nulls are GET answers (MGET nils a hash key, GET would refuse it), nulls when the
/// policy caches them.
fn storable_get_reply(value: &[u8], nil_ok: bool) -> bool {
    matches!(value.first(), Some(b'$' | b'_')) && (nil_ok || !reply::is_null(value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::classify;

    fn args(parts: &[&str]) -> Request {
        Request::from_args(parts)
    }

    fn learnt(parts: &[&str], reply: &str, sent: Instant) -> Learnt {
        let a = args(parts);
        learn(
            &classify(a.args()),
            a.args(),
            &Bytes::copy_from_slice(reply.as_bytes()),
            sent,
        )
    }

    #[test]
    fn plain_sets_fill_their_own_value() {
        let own = |p: &[&str]| {
            let a = args(p);
            fills_own_value(&classify(a.args()), a.args())
        };
        assert!(own(&["SET", "k", "v"]));
        assert!(own(&["set", "k", "v", "EX", "10"]));
        assert!(own(&["SET", "k", "v", "KEEPTTL"]));
        assert!(!own(&["SET", "k", "v", "NX"]));
        assert!(!own(&["SET", "k", "v", "xx"]));
        assert!(!own(&["SET", "k", "v", "GET"]));
        assert!(!own(&["INCR", "k"]));
    }

    #[test]
    fn expiries_are_learnt_from_acknowledged_writes() {
        let t = Instant::now();
        let s = Duration::from_secs;
        let l = learnt(&["SET", "k", "v", "EX", "2"], "+OK\r\n", t);
        assert_eq!(l.ttl, Ttl::At(t + s(2)));
        assert!(l.own_value && !l.value_unknown);
        assert_eq!(
            learnt(&["SET", "k", "v", "PX", "1500"], "+OK\r\n", t).ttl,
            Ttl::At(t + Duration::from_millis(1500))
        );
        assert_eq!(
            learnt(&["SET", "k", "v"], "+OK\r\n", t).ttl,
            Ttl::Persistent
        );
        assert_eq!(
            learnt(&["SET", "k", "v", "KEEPTTL"], "+OK\r\n", t).ttl,
            Ttl::Unknown
        );
        let nx = learnt(&["SET", "k", "v", "NX"], "$-1\r\n", t);
        assert!(nx.value_unknown, "not set or set: unknown");
        assert_eq!(
            learnt(&["SETEX", "k", "3", "v"], "+OK\r\n", t).ttl,
            Ttl::At(t + s(3))
        );
        assert_eq!(
            learnt(&["EXPIRE", "k", "5"], ":1\r\n", t).ttl,
            Ttl::At(t + s(5))
        );
        assert_eq!(learnt(&["EXPIRE", "k", "5"], ":0\r\n", t).ttl, Ttl::Unknown);
        assert!(!learnt(&["EXPIRE", "k", "5"], ":1\r\n", t).value_unknown);
        assert_eq!(learnt(&["PERSIST", "k"], ":1\r\n", t).ttl, Ttl::Persistent);
        assert_eq!(
            learnt(&["GETEX", "k", "PX", "10"], "$1\r\nv\r\n", t).ttl,
            Ttl::At(t + Duration::from_millis(10))
        );
        assert_eq!(learnt(&["GETEX", "k"], "$1\r\nv\r\n", t).ttl, Ttl::Unknown);
        assert_eq!(
            learnt(&["GETEX", "k", "PERSIST"], "$1\r\nv\r\n", t).ttl,
            Ttl::Persistent
        );
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        match learnt(&["EXPIREAT", "k", &(wall + 100).to_string()], ":1\r\n", t).ttl {
            Ttl::At(at) => {
                let d = at - t;
                assert!(d > s(98) && d <= s(100), "{d:?}");
            }
            other => panic!("{other:?}"),
        }
        let incr = learnt(&["INCR", "k"], ":1\r\n", t);
        assert!(incr.value_unknown);
        assert_eq!(incr.ttl, Ttl::Unknown);
        assert!(!learnt(&["DEL", "k"], ":1\r\n", t).value_unknown);
    }
}
