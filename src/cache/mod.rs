//! The in-process reply cache behind degraded mode.
//!
//! While the upstream is healthy every cacheable read's reply is remembered; while its
//! breaker is open those replies are served instead of an error. The cache never decides
//! *when* to serve: the caller does, and passes in everything that depends on policy or
//! time.
//!
//! # Design decisions
//!
//! * **Replies are stored as bytes, exactly as the client received them.** Degraded mode
//!   must answer byte-for-byte what Redis would have said (RESP2 vs RESP3 framing, nil
//!   encodings, map ordering), and re-encoding a decoded value would be both slower and a
//!   second place where that can go wrong. Bytes are also what the byte bound counts.
//!   The protocol version is part of [`CacheKey`] because the same command has
//!   differently-framed replies under RESP2 and RESP3.
//! * **Partitioned by identity.** A cached reply carries no ACL, so the Redis user whose
//!   read filled an entry is part of its [`CacheKey`]: a client is only ever served what
//!   reads made as its own identity filled.
//! * **Entries are indexed by the Redis key they read.** A write to `k` makes `GET k`,
//!   `HGETALL k`, `LRANGE k 0 -1`, ... all wrong at once (for every identity), and the
//!   write only names `k`. The index `hash(db, key) -> {CacheKey}` lets [`Cache::invalidate`]
//!   find every one of them without scanning, and eviction removes entries from it so it
//!   never holds more than the LRU does.
//! * **What redfuse learnt about a key is kept beside its replies.** A *key record* holds
//!   the key's expiry when the commands redfuse forwarded told it (`SET ... EX`, `EXPIRE`,
//!   `PERSIST` ...), so an entry is never served past the moment Redis expires the key,
//!   and a *write mark* when a write to the key was acknowledged whose result redfuse does
//!   not hold: a degraded read that misses the cache must then not answer as if the key
//!   were absent (see [`Cache::miss_is_unsafe`]). Key records are filed by a hash of the
//!   key (no copy of it) in an LRU of their own, within the same byte bound; a write mark
//!   evicted before its time is remembered in a small bitmap, so losing one can only turn a
//!   miss reply into an error, never the reverse.
//! * **No clock reads inside.** Every operation that cares about age takes `now`, and
//!   the allowed staleness comes from the caller (it depends on the key pattern, which is
//!   configuration the cache knows nothing about). One clock reading then serves every key
//!   of an MGET consistently, and tests control age exactly with paused tokio time.
//! * **Stale entries are dropped when found.** An entry's age only grows and the caller's
//!   `max_stale` for a key is fixed by its pattern, so an entry found too old can never
//!   be served again; keeping it would only crowd out entries that can be. The lookup
//!   still reports [`Lookup::Stale`] (not `Miss`) so the metrics show how much was lost.
//! * **One `std::sync::Mutex`.** Every operation is a few hash lookups; nothing awaits
//!   under the lock and reply copies are made before it is taken.
//! * **Fill tickets.** A read sent before a write can have its (older) reply arrive after
//!   the write's invalidation; filling it then would cache a value Redis no longer holds.
//!   [`Cache::ticket`] taken before the read is sent and [`Cache::insert_all`] refuse
//!   such fills. Tickets are striped by a hash of the key, so the bookkeeping stays
//!   bounded at the price of an occasional needless refusal.
//! * **A full cache takes a new key in only if it is read more often** than the entry it
//!   would push out, and never on its first fill (TinyLFU, see `admission`): with more
//!   read than fits, storing every reply turned the cache over as fast as reads came,
//!   each fill an allocation, a copy and an eviction, without holding more of what is read.
//! * **MGET is cached per key,** as `GET` entries ([`CacheKey::get`]), so that any later
//!   GET or MGET over an overlapping set of keys can be answered.
//!
//! [`flight`] holds the single-flight that lets identical reads share one request.

mod admission;
mod bits;
pub mod flight;
mod frequency;
mod recent;
mod records;
mod refreshed;
mod replies;

pub use flight::{Flight, Follower, LeaderGuard, SingleFlight};

use std::collections::hash_map::Entry as MapEntry;
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tokio::time::Instant;

use crate::auth::IdentityId;
use crate::effect::ConnId;
use crate::resp::{Args, Proto};
use admission::Admission;
use bits::GenerationBits;
use recent::{Invalidations, Superseded};
use records::Records;
pub use refreshed::FreshClock;
use refreshed::Refreshed;
use replies::{Refresh, Replies};

/// Estimated memory per entry beyond its command, Redis key and reply bytes: the slot and
/// node of the reply table, the index slot, and allocator rounding. Measured as RSS at the
/// 64 MiB cap, filled with 64-byte values (bench/run.sh's memory figures, mimalloc):
/// 576 bytes per entry, 456 of them beyond the bytes counted (a Redis key the entry no
/// longer stores a copy of counts all the same). More when several commands of one key
/// are cached; the byte bound is only as good as this estimate, by design, since counting
/// exactly would cost more than it saves.
pub const ENTRY_OVERHEAD: usize = 456;

/// The LRU's own hasher (foldhash, randomly seeded). The index hashes the same
/// client-chosen bytes the LRU already does, so SipHash would buy no DoS resistance there
/// and would cost more than the rest of an insert.
type Hasher = lru::DefaultHasher;
pub(crate) type FastMap<K, V> = HashMap<K, V, Hasher>;
type FastSet<K> = HashSet<K, Hasher>;

/// Number of fill-ticket stripes; more means fewer needless refusals, each costs 8 bytes.
const TICKET_STRIPES: usize = 1024;

/// A normalised cacheable command: which reply bytes are stored under.
///
/// The command is kept as a 128-bit digest (XXH3-128 with a random per-process seed) of the
/// upper-cased command name and each argument, every piece length-prefixed (so `HGET ab c`
/// and `HGET a bc` differ): the LRU, the index and single-flight hash and compare 32
/// bytes, and a false match would take a 2^-128 coincidence that clients cannot aim for.
/// The pieces are laid out in one buffer (on the stack, for any command up to
/// [`DIGEST_STACK`] bytes) and hashed in one pass: two 64-bit hashers fed piece by piece
/// took five times as long, more than anything else a cached read adds. A name of up to 8
/// bytes with one argument (`GET k`, `HGETALL k`: most reads) skips the buffer: the argument
/// is hashed in place with the name folded into the seed ([`name_seed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheKey {
    pub db: u32,
    /// Whose read filled it; only that identity is served it.
    pub identity: IdentityId,
    /// The framing of the stored reply.
    pub proto: Proto,
    digest: [u64; 2],
}

/// One word for the table's hasher: the digest is keyed with a random per-process seed, so
/// half of it, mixed with the rest of the key, is as good a hash as all of it, and the
/// tables (the reply slots, looked up by every fill and refresh) hash one word instead of
/// five fields. Equality still compares every field.
impl std::hash::Hash for CacheKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.digest[0] ^ self.context_word());
    }
}

/// Starts loading the cache line of `at` into the CPU's cache: a hint, it changes nothing.
/// Memory that a later step will need is requested this way a few steps ahead, so that
/// the miss overlaps other work instead of stalling that step.
pub(crate) fn prefetch_line<T>(at: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is only a hint; any address is allowed.
    unsafe {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        _mm_prefetch::<_MM_HINT_T0>(at as *const T as *const i8);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

/// The seed of [`CacheKey`] digests and reply hashes: random per process.
fn digest_seed() -> u64 {
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SEED.get_or_init(rand::random)
}

/// The seed that digests a command of `name` (at most 8 bytes, upper-cased here) and one
/// argument: the name folded into the process's seed, so that the argument is hashed where
/// it lies. Laying such a command out in a buffer first (as longer ones are) cost more than
/// the hash: the hash's wide loads stalled on the narrow stores that had just written the
/// buffer. Two names share a seed only by a 2^-64 coincidence of the random seed, and a
/// digest made this way matches one laid out only by a 2^-128 one.
fn name_seed(name: &[u8]) -> u64 {
    let packed = name
        .iter()
        .rev()
        .fold(0u64, |p, b| (p << 8) | u64::from(b.to_ascii_uppercase()));
    let h = (packed ^ digest_seed()).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (h.rotate_left(31) ^ name.len() as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93)
}

/// The digest of a command of a short `name` (at most 8 bytes) and one argument: the
/// argument hashed where it lies, with the name in the seed (see [`name_seed`]).
fn short_digest(name: &[u8], arg: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128_with_seed(arg, name_seed(name))
}

/// A stored reply's hash: an unchanged reply is recognised by it (and its length).
fn reply_hash(reply: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(reply, digest_seed())
}

impl CacheKey {
    /// Normalises `args` (name first). The name is upper-cased because Redis treats it
    /// case-insensitively; arguments are not, because keys and values are binary.
    pub fn new<A: AsRef<[u8]>>(
        db: u32,
        identity: IdentityId,
        proto: Proto,
        args: &[A],
    ) -> CacheKey {
        CacheKey::digest(db, identity, proto, args.iter().map(|a| a.as_ref()))
    }

    /// The key of a request (see [`CacheKey::new`]).
    pub fn of(db: u32, identity: IdentityId, proto: Proto, args: Args<'_>) -> CacheKey {
        let digest = match args.first() {
            Some(name) if args.len() == 2 && name.len() <= 8 => short_digest(name, args.arg(1)),
            _ => CacheKey::digest_laid_out(args.iter()),
        };
        CacheKey::with_digest(db, identity, proto, digest)
    }

    fn digest<'a>(
        db: u32,
        identity: IdentityId,
        proto: Proto,
        args: impl Iterator<Item = &'a [u8]> + Clone,
    ) -> CacheKey {
        let mut pieces = args.clone();
        let digest = match (pieces.next(), pieces.next(), pieces.next()) {
            (Some(name), Some(key), None) if name.len() <= 8 => short_digest(name, key),
            _ => CacheKey::digest_laid_out(args),
        };
        CacheKey::with_digest(db, identity, proto, digest)
    }

    fn with_digest(db: u32, identity: IdentityId, proto: Proto, digest: u128) -> CacheKey {
        CacheKey {
            db,
            identity,
            proto,
            digest: [digest as u64, (digest >> 64) as u64],
        }
    }

    /// The digest of a command other than a short name and one argument: its pieces laid
    /// out in one buffer, each length-prefixed.
    fn digest_laid_out<'a>(args: impl Iterator<Item = &'a [u8]> + Clone) -> u128 {
        let total: usize = args.clone().map(|a| 4 + a.len()).sum();
        let mut stack = [0u8; DIGEST_STACK];
        let mut heap = Vec::new();
        let buf = match stack.get_mut(..total) {
            Some(b) => b,
            None => {
                heap.resize(total, 0);
                &mut heap[..]
            }
        };
        let mut at = 0;
        for (i, piece) in args.enumerate() {
            // No argument reaches 4 GiB (`max_bulk_len` is at most 512 MiB).
            buf[at..at + 4].copy_from_slice(&(piece.len() as u32).to_le_bytes());
            at += 4;
            let to = &mut buf[at..at + piece.len()];
            to.copy_from_slice(piece);
            if i == 0 {
                to.make_ascii_uppercase();
            }
            at += piece.len();
        }
        xxhash_rust::xxh3::xxh3_128_with_seed(buf, digest_seed())
    }

    /// The key of `GET key`, which is also where MGET results are stored one key at a
    /// time so that a later `GET` or a differently-shaped `MGET` can use them.
    ///
    /// Caveat for the caller: MGET answers nil for a key holding a non-string, where GET
    /// answers WRONGTYPE; storing that nil as a GET entry is a deliberate approximation.
    pub fn get(db: u32, identity: IdentityId, proto: Proto, key: &[u8]) -> CacheKey {
        CacheKey::with_digest(db, identity, proto, short_digest(b"GET", key))
    }

    /// The hash single-flight files a read of this key under `ticket` by: the digest is
    /// keyed with a random seed, so it needs mixing with the rest, not hashing again.
    #[inline]
    pub fn flight_hash(&self, ticket: &FillTicket) -> u64 {
        // Each step is a bijection of the word before it: for one key, two tickets only
        // share a hash by a 2^-64 coincidence, never by nearby counter values.
        let h = (self.digest[0] ^ self.context_word() ^ ticket.generation)
            .wrapping_mul(0xA076_1D64_78BD_642F);
        let h = (h.rotate_left(29) ^ ticket.seq).wrapping_mul(0xE703_7ED1_A0B4_28DB);
        (h.rotate_left(29) ^ ticket.clears).wrapping_mul(0x8EBC_6AF0_9C88_C6E3)
    }

    /// The command's digest, its two halves: seeded, as random as any hash of the key.
    fn digest_words(&self) -> (u64, u64) {
        (self.digest[0], self.digest[1])
    }

    /// A hash of the whole key for `admission`'s bitmap.
    fn admission_hash(&self) -> u64 {
        (self.digest[1] ^ self.context_word()).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20
    }

    /// The rest of the key (db, identity, protocol) in one word.
    fn context_word(&self) -> u64 {
        // An odd multiplier maps each (db, identity) to a word of its own.
        ((u64::from(self.db) << 32) | u64::from(self.identity.as_u32()))
            .wrapping_mul(0xD6E8_FEB8_6659_FD93)
            ^ u64::from(self.proto.as_u8())
    }
}

/// Commands up to this size (arguments and a 4-byte length each) are digested from a
/// buffer on the stack.
const DIGEST_STACK: usize = 128;

/// Replies up to this size are handed out as copies (see [`share`]).
const COPY_REPLIES_UP_TO: usize = 1024;

/// A stored reply to hand out. A small one is copied: a clone's shared count lives in an
/// allocation of its own, a cache miss away, and is written by the clone and again by its
/// drop, where a copy of a few dozen bytes reads what the client's write reads anyway.
fn share(reply: &Bytes) -> Bytes {
    if reply.len() <= COPY_REPLIES_UP_TO {
        Bytes::copy_from_slice(reply)
    } else {
        reply.clone()
    }
}

/// What redfuse knows of a key's expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ttl {
    /// Nothing: replies of the key are bounded by `max_stale` only.
    Unknown,
    /// The key has no expiry.
    Persistent,
    /// Redis expires the key at this moment (or a little after: redfuse counts from when
    /// it sent the command).
    At(Instant),
}

/// Whose degraded misses a write mark concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// A write Redis acknowledged: any client may have seen it succeed.
    ByAll,
    /// A write queued during an outage: only its identity was told it succeeded (Redis,
    /// and every other identity, still hold the old value).
    By(IdentityId),
}

impl Seen {
    fn merge(self, other: Seen) -> Seen {
        match (self, other) {
            (Seen::By(a), Seen::By(b)) if a == b => self,
            _ => Seen::ByAll,
        }
    }

    fn includes(self, identity: IdentityId) -> bool {
        match self {
            Seen::ByAll => true,
            Seen::By(i) => i == identity,
        }
    }
}

impl Ttl {
    fn deadline(self) -> Option<Instant> {
        match self {
            Ttl::At(t) => Some(t),
            _ => None,
        }
    }
}

/// Bounds of the cache. A zero in any of them disables caching.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// Total of every entry's charge (see [`entry_charge`]).
    pub max_bytes: usize,
    pub max_entries: usize,
    /// Entries whose charge is larger are not cached: one huge reply would evict
    /// thousands of small ones that are more likely to be asked for again.
    pub max_entry_bytes: usize,
    /// How long a write mark matters: the longest `max_stale` of any key pattern (past it,
    /// no reply from before the write could be served anyway).
    pub written_ttl: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_bytes: 64 << 20,
            max_entries: 1_000_000,
            max_entry_bytes: 1 << 20,
            written_ttl: Duration::from_secs(300),
        }
    }
}

/// What a key record counts against the byte bound.
const RECORD_CHARGE: usize = 96;

/// What one entry counts against [`CacheConfig::max_bytes`].
pub fn entry_charge(key: &CacheKey, redis_key_len: usize, reply_len: usize) -> usize {
    std::mem::size_of_val(key) + redis_key_len + reply_len + ENTRY_OVERHEAD
}

/// The outcome of [`Cache::get`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Filled no longer than `max_stale` ago: these bytes may be sent as the reply.
    Hit(Bytes),
    /// An entry existed but was older than `max_stale`; it has been removed.
    Stale,
    Miss,
}

impl Lookup {
    /// The metric label this lookup counts under.
    pub fn result(&self) -> CacheResult {
        match self {
            Lookup::Hit(_) => CacheResult::Hit,
            Lookup::Stale => CacheResult::StaleHit,
            Lookup::Miss => CacheResult::Miss,
        }
    }
}

/// Proof of when a fill's read was sent; see [`Cache::ticket`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FillTicket {
    /// The key's hash: it picks the stripe, and files the key's record.
    hash: u64,
    generation: u64,
    clears: u64,
    /// Invalidations begun before the ticket was taken (see `recent`).
    seq: u64,
}

fn stripe_of(hash: u64) -> usize {
    (hash % TICKET_STRIPES as u64) as usize
}

/// The `result` label of `redfuse_cache_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheResult {
    /// Served from the cache.
    Hit = 0,
    /// Found, but older than the key's `max_stale`, so not served.
    StaleHit = 1,
    /// Not in the cache.
    Miss = 2,
    /// A reply was stored.
    Fill = 3,
    /// Not cacheable: the command, or this reply (error, too large, raced a write).
    Bypass = 4,
    /// Cacheable, but the cache was full and the key was read for the first time in a
    /// while: not stored (see `admission`).
    Declined = 5,
}

impl CacheResult {
    pub const ALL: [CacheResult; 6] = [
        CacheResult::Hit,
        CacheResult::StaleHit,
        CacheResult::Miss,
        CacheResult::Fill,
        CacheResult::Bypass,
        CacheResult::Declined,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::StaleHit => "stale_hit",
            CacheResult::Miss => "miss",
            CacheResult::Fill => "fill",
            CacheResult::Bypass => "bypass",
            CacheResult::Declined => "declined",
        }
    }
}

/// Cache and single-flight metrics, with every label resolved up front.
#[derive(Clone)]
pub struct CacheMetrics {
    pub entries: IntGauge,
    pub bytes: IntGauge,
    /// Indexed by `CacheResult as usize`.
    requests: [IntCounter; 6],
    pub evictions: IntCounter,
    pub invalidations: IntCounter,
    /// Give this to [`SingleFlight::new`].
    pub singleflight_shared: IntCounter,
}

impl CacheMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<CacheMetrics> {
        let entries = IntGauge::new("redfuse_cache_entries", "Replies held by the cache")?;
        let bytes = IntGauge::new(
            "redfuse_cache_bytes",
            "Estimated bytes held by the cache (keys, replies and per-entry overhead)",
        )?;
        let requests_vec = IntCounterVec::new(
            Opts::new(
                "redfuse_cache_requests_total",
                "Cache lookups and fills, by result",
            ),
            &["result"],
        )?;
        let evictions = IntCounter::new(
            "redfuse_cache_evictions_total",
            "Entries evicted to stay within the cache's bounds",
        )?;
        let invalidations = IntCounter::new(
            "redfuse_cache_invalidations_total",
            "Entries removed because their key was written or their database flushed",
        )?;
        let singleflight_shared = IntCounter::new(
            "redfuse_singleflight_shared_total",
            "Reads that waited for an identical in-flight read instead of sending their own",
        )?;
        registry.register(Box::new(entries.clone()))?;
        registry.register(Box::new(bytes.clone()))?;
        registry.register(Box::new(requests_vec.clone()))?;
        registry.register(Box::new(evictions.clone()))?;
        registry.register(Box::new(invalidations.clone()))?;
        registry.register(Box::new(singleflight_shared.clone()))?;
        let requests = CacheResult::ALL.map(|r| requests_vec.with_label_values(&[r.as_str()]));
        Ok(CacheMetrics {
            entries,
            bytes,
            requests,
            evictions,
            invalidations,
            singleflight_shared,
        })
    }

    /// Counts one `redfuse_cache_requests_total{result}`.
    pub fn count(&self, result: CacheResult) {
        self.requests[result as usize].inc();
    }
}

/// One reply for [`Cache::insert_all`]: stored under `key`, registered under `redis_key`,
/// unless the key was invalidated since `ticket` was taken.
pub struct Fill<'a> {
    pub ticket: FillTicket,
    pub key: CacheKey,
    pub redis_key: &'a [u8],
    pub reply: &'a [u8],
}

/// What a run of stores did, counted into the metrics once per run rather than once per
/// reply (each count is an atomic add).
#[derive(Default)]
struct Tally {
    fills: u64,
    bypasses: u64,
    declined: u64,
    evicted: u64,
    /// The entry count or bytes changed: gauges to publish.
    changed: bool,
}

/// A cached reply.
struct Entry {
    reply: Bytes,
    /// A hash of `reply`, so an unchanged re-fill is recognised without reading the stored
    /// bytes (cold in memory by then).
    reply_hash: u64,
    /// The hash of `(db, Redis key)` the entry is indexed under (see `State::index`).
    key_hash: u64,
    filled: Instant,
    /// When Redis expires the key, if redfuse knew when this was filled.
    expires: Option<Instant>,
    charge: usize,
}

/// What redfuse learnt about one Redis key (see the module docs), filed by a 64-bit hash of
/// `(db, key)`: two keys sharing a hash share a record, which can only make a reply expire
/// early or a miss answer with an error, never the reverse.
#[derive(Clone, Copy)]
struct Record {
    db: u32,
    /// When a write whose result redfuse does not hold was acknowledged, and to whom.
    written: Option<(Instant, Seen)>,
    ttl: Ttl,
}

/// The cached commands that read one Redis key. Almost every key has exactly one, and a
/// set per key would cost an allocation and a hash for each of them. Boxed so that the
/// common case stays the size of one key.
enum Readers {
    One(CacheKey),
    Many(Box<FastSet<CacheKey>>),
}

impl Readers {
    fn insert(&mut self, key: CacheKey) {
        match self {
            Readers::One(k) if *k == key => {}
            Readers::One(k) => *self = Readers::Many(Box::new(FastSet::from_iter([*k, key]))),
            Readers::Many(set) => {
                set.insert(key);
            }
        }
    }

    /// Removes `key`; returns whether none are left.
    fn remove(&mut self, key: &CacheKey) -> bool {
        match self {
            Readers::One(k) => k == key,
            Readers::Many(set) => {
                set.remove(key);
                set.is_empty()
            }
        }
    }

    fn iter(&self) -> Box<dyn Iterator<Item = &CacheKey> + '_> {
        match self {
            Readers::One(k) => Box::new(std::iter::once(k)),
            Readers::Many(set) => Box::new(set.iter()),
        }
    }
}

/// Write marks evicted before `written_ttl` passed, as a two-generation bitmap of key
/// hashes: a key whose bit is set may have lost its mark, so a miss on it is answered with
/// an error. Bits are dropped a generation at a time, once no mark they stand for can
/// matter any more.
struct LostMarks {
    bits: GenerationBits,
    since: Instant,
}

impl LostMarks {
    fn new(now: Instant) -> LostMarks {
        LostMarks {
            bits: GenerationBits::new(),
            since: now,
        }
    }

    fn rotate(&mut self, now: Instant, ttl: Duration) {
        if now.saturating_duration_since(self.since) > ttl {
            self.bits.turn();
            self.since = now;
        }
    }

    fn set(&mut self, hash: u64) {
        self.bits.set(hash);
    }

    fn test(&self, hash: u64) -> bool {
        self.bits.test(hash)
    }
}

struct State {
    lru: Replies,
    /// The hash of `(db, Redis key)` -> every cached reply that read that key. Holds
    /// exactly the replies the LRU holds. Filed by the 64-bit hash the key's ticket and
    /// record use, not by the key's bytes: nothing to copy per entry, nothing to read
    /// behind a pointer to find it. Two keys sharing a hash share a set, so a write to one
    /// drops the other's replies too: a miss more, never a reply served that a write
    /// should have removed.
    index: FastMap<u64, Readers>,
    /// Every database an entry was ever filed in beyond Redis's default 16 (for
    /// `invalidate_everywhere`).
    other_dbs: Vec<u32>,
    /// Key records by key hash, least recently used first (by second chance, see `records`).
    records: Records<Record>,
    /// Whether a record may hold an expiry (`Ttl::At`): set when one is recorded, cleared
    /// with the records. While it is false a fill need not look its key's record up (a
    /// memory miss per fill once writes have left records of many keys).
    expiring_records: bool,
    bytes: usize,
    lost: LostMarks,
    /// Which keys a full cache takes in (see `admission`).
    admission: Admission,
    invalidations: Invalidations,
    superseded: Superseded,
    /// The cache's table of fresh fills (see `refreshed`): an entry that leaves `lru`
    /// leaves it too, so that the next read of its key fills it again.
    refreshed: Arc<Refreshed>,
}

impl State {
    fn add_to_index(&mut self, key: CacheKey, key_hash: u64) {
        match self.index.entry(key_hash) {
            MapEntry::Occupied(o) => o.into_mut().insert(key),
            MapEntry::Vacant(v) => {
                v.insert(Readers::One(key));
            }
        }
        if key.db >= 16 && !self.other_dbs.contains(&key.db) {
            self.other_dbs.push(key.db);
        }
    }

    fn remove_from_index(&mut self, key: &CacheKey, key_hash: u64) {
        if let MapEntry::Occupied(mut readers) = self.index.entry(key_hash)
            && readers.get_mut().remove(key)
        {
            readers.remove();
        }
    }

    fn remove(&mut self, key: &CacheKey) -> bool {
        let Some(entry) = self.lru.pop(key) else {
            return false;
        };
        self.unaccount(key, entry);
        true
    }

    /// Forgets a reply taken out of the LRU.
    fn unaccount(&mut self, key: &CacheKey, entry: Entry) {
        self.refreshed.forget(key);
        self.bytes -= entry.charge;
        self.remove_from_index(key, entry.key_hash);
    }

    /// Drops the least recently used record. A write mark that still matters is remembered
    /// as lost.
    fn evict_record(&mut self, now: Instant, written_ttl: Duration) -> bool {
        let Some((hash, r)) = self.records.pop_lru() else {
            return false;
        };
        self.bytes -= RECORD_CHARGE;
        if let Some((written, _)) = r.written
            && now.saturating_duration_since(written) <= written_ttl
        {
            self.lost.set(hash);
        }
        true
    }

    fn replies(&self) -> usize {
        self.lru.len()
    }
}

/// The reply cache. Share it behind an `Arc`; every method takes `&self`.
pub struct Cache {
    config: CacheConfig,
    state: Mutex<State>,
    metrics: Option<CacheMetrics>,
    /// Bumped (under `state`'s lock) by every invalidation of a key hashing to the stripe.
    stripes: Box<[AtomicU64]>,
    /// Bumped (under `state`'s lock) by `clear_db` and `clear_all`.
    clears: AtomicU64,
    /// Invalidations so far, bumped (under `state`'s lock) after the stripe's.
    invalidated: AtomicU64,
    stripe_hasher: Hasher,
    /// Lets the fill of a reply the cache has just stored be skipped (see `refreshed`).
    refreshed: Arc<Refreshed>,
}

impl Cache {
    #[cfg(test)]
    pub fn new(config: CacheConfig) -> Cache {
        Cache::build(config, None)
    }

    pub fn with_metrics(config: CacheConfig, metrics: CacheMetrics) -> Cache {
        Cache::build(config, Some(metrics))
    }

    fn build(config: CacheConfig, metrics: Option<CacheMetrics>) -> Cache {
        // Superseded replies are kept beside the byte bound, at a sixteenth of it.
        let superseded = Superseded::new(config.max_bytes / 16);
        let refreshed = Arc::new(Refreshed::new(Instant::now()));
        // Most entries it may hold: the entry count, or the bytes in entries of a short key
        // and reply (`ENTRY_OVERHEAD` and a little more).
        let capacity = config
            .max_entries
            .min(config.max_bytes / (ENTRY_OVERHEAD + 64));
        Cache {
            config,
            state: Mutex::new(State {
                lru: Replies::default(),
                index: FastMap::default(),
                other_dbs: Vec::new(),
                records: Records::default(),
                expiring_records: false,
                bytes: 0,
                lost: LostMarks::new(Instant::now()),
                admission: Admission::new(capacity),
                invalidations: Invalidations::default(),
                superseded,
                refreshed: refreshed.clone(),
            }),
            metrics,
            stripes: (0..TICKET_STRIPES).map(|_| AtomicU64::new(0)).collect(),
            clears: AtomicU64::new(0),
            invalidated: AtomicU64::new(0),
            stripe_hasher: Hasher::default(),
            refreshed,
        }
    }

    /// Starts loading what [`Cache::unchanged`] will read for `key`. The connection calls
    /// it a few replies ahead: prefetched when the read was sent, the line had been
    /// evicted again by the time the reply arrived.
    pub fn prefetch_unchanged(&self, key: &CacheKey) {
        self.refreshed.prefetch(key);
    }

    /// The moment and window [`Cache::unchanged`] checks against, for every key of a reply.
    pub fn fresh_clock(&self, now: Instant, window: Duration) -> FreshClock {
        self.refreshed.clock(now, window)
    }

    /// Whether `reply` to `key` was stored or refreshed less than the clock's window before
    /// its moment: its fill can be skipped (see `refreshed`; count it with
    /// [`Cache::count_skipped_fills`]).
    pub fn unchanged(&self, key: &CacheKey, reply: &[u8], clock: FreshClock) -> bool {
        self.enabled() && self.refreshed.fresh(key, || reply_hash(reply), clock)
    }

    /// Counts `n` fills skipped as [`Cache::unchanged`] as made: the reply is stored.
    pub fn count_skipped_fills(&self, n: u64) {
        self.count_tally(&Tally {
            fills: n,
            ..Tally::default()
        });
    }

    /// Whether the cache stores anything at all.
    pub fn enabled(&self) -> bool {
        self.config.max_bytes > 0 && self.config.max_entries > 0
    }

    /// Counts an outcome the cache itself never sees (e.g. a non-cacheable command in
    /// degraded mode). [`Cache::get`] and the inserts count their own outcomes.
    pub fn count(&self, result: CacheResult) {
        if let Some(m) = &self.metrics {
            m.count(result);
        }
    }

    /// Number of cached replies (key records are not counted).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().replies()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sum of the charges of replies and key records; never above `max_bytes` between
    /// calls.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    #[cfg(test)]
    pub fn get(&self, key: &CacheKey, now: Instant, max_stale: Duration) -> Lookup {
        self.get_for(key, None, now, max_stale)
    }

    /// Looks `key` up for a read sent with `ticket`, and counts the outcome. A hit becomes
    /// most recently used; an entry older than `max_stale`, or past its key's known
    /// expiry, is removed (see the module docs) and reported as `Stale`. A reply an
    /// invalidation removed after the ticket was taken is still the answer that read would
    /// have had (see `recent`).
    pub fn get_for(
        &self,
        key: &CacheKey,
        ticket: Option<FillTicket>,
        now: Instant,
        max_stale: Duration,
    ) -> Lookup {
        let mut st = self.lock();
        let lookup = match st.lru.get(key) {
            Some(e)
                if now.saturating_duration_since(e.filled) <= max_stale
                    && e.expires.is_none_or(|x| now < x) =>
            {
                Lookup::Hit(share(e.reply))
            }
            Some(_) => {
                st.remove(key);
                self.publish(&st);
                Lookup::Stale
            }
            None => match ticket.and_then(|t| st.superseded.get(key, t.seq, now, max_stale)) {
                Some(reply) => Lookup::Hit(reply),
                None => Lookup::Miss,
            },
        };
        drop(st);
        self.count(lookup.result());
        lookup
    }

    /// Whether answering a miss on `redis_key` with the configured miss reply could show a
    /// client a value older than a write it saw acknowledged: a write whose result redfuse
    /// does not hold was acknowledged less than `max_stale` ago (or its mark may have been
    /// evicted). Such a miss must be answered with an error.
    pub fn miss_is_unsafe(
        &self,
        db: u32,
        redis_key: &[u8],
        identity: IdentityId,
        now: Instant,
        max_stale: Duration,
    ) -> bool {
        let hash = self.key_hash(db, redis_key);
        let st = self.lock();
        if let Some(Record {
            written: Some((at, seen)),
            ..
        }) = st.records.peek(&hash)
            && seen.includes(identity)
            && now.saturating_duration_since(*at) <= max_stale
        {
            return true;
        }
        st.lost.test(hash)
    }

    /// Stores `reply` for `key`, registered under `redis_key` in `key.db`, filled at
    /// `now`. Returns whether it was stored; counts `fill` or `bypass`.
    ///
    /// Refused: error replies (`-`, `!`), which are answers about a moment, not data, and
    /// leave any existing entry alone, since a transient error (LOADING, BUSY, OOM) says
    /// nothing about the data and the old entry is exactly what degraded mode needs;
    /// empty replies (not RESP); replies of a key already past its known expiry; entries
    /// over `max_entry_bytes` or `max_bytes`, which do remove an existing entry for `key`,
    /// because Redis has since answered something else and serving the older answer later
    /// would go back in time.
    ///
    /// Both byte strings are copied: the caller's are usually slices of a connection's
    /// read buffer, and keeping one alive would pin the whole buffer unaccounted.
    pub fn insert(
        &self,
        key: CacheKey,
        redis_key: impl AsRef<[u8]>,
        reply: impl AsRef<[u8]>,
        now: Instant,
    ) -> bool {
        let mut tally = Tally::default();
        let mut st = self.lock();
        let stored = self.store(
            &mut st,
            None,
            key,
            redis_key.as_ref(),
            reply.as_ref(),
            now,
            &mut tally,
        );
        if tally.changed {
            self.publish(&st);
        }
        drop(st);
        self.count_tally(&tally);
        stored
    }

    /// Like [`Cache::insert`], but also refused (without touching the cache) when
    /// `redis_key` was invalidated, or its database cleared, since `ticket` was taken:
    /// [`Cache::insert_all`] for one reply.
    #[cfg(test)]
    pub fn insert_checked(
        &self,
        ticket: FillTicket,
        via: Option<ConnId>,
        key: CacheKey,
        redis_key: &[u8],
        reply: &[u8],
        now: Instant,
    ) -> bool {
        let fill = Fill {
            ticket,
            key,
            redis_key,
            reply,
        };
        self.insert_all(std::slice::from_ref(&fill), via, now) == 1
    }

    /// Take this before sending a read whose reply may fill the cache, and hand it to
    /// [`Cache::insert_all`]. No lock: it is two atomic loads.
    pub fn ticket(&self, db: u32, redis_key: &[u8]) -> FillTicket {
        let hash = self.key_hash(db, redis_key);
        let stripe = stripe_of(hash);
        // The count first: an invalidation it includes has moved the stripe already (they
        // are bumped in the other order), so `generation` includes it too.
        let seq = self.invalidated.load(Ordering::SeqCst);
        FillTicket {
            hash,
            generation: self.stripes[stripe].load(Ordering::SeqCst),
            clears: self.clears.load(Ordering::SeqCst),
            seq,
        }
    }

    /// [`Cache::ticket_valid`], taking the lock.
    #[cfg(test)]
    pub fn ticket_current(&self, t: FillTicket, via: Option<ConnId>) -> bool {
        let st = self.lock();
        self.ticket_valid(&st, t, via)
    }

    /// Whether nothing invalidated the ticket's key since it was taken, but replies that
    /// arrived on `via` before the reply now being stored (see [`ConnId`]). Call under the
    /// lock invalidations bump under: the stripe alone when it has not moved, else what is
    /// remembered of the key's own invalidations.
    fn ticket_valid(&self, st: &State, t: FillTicket, via: Option<ConnId>) -> bool {
        if self.clears.load(Ordering::SeqCst) != t.clears {
            return false;
        }
        self.stripes[stripe_of(t.hash)].load(Ordering::SeqCst) == t.generation
            || !st.invalidations.since(t.hash, t.seq, via)
    }

    /// Bumps the key's stripe and the invalidation count, remembering the key and where
    /// the invalidation came from; returns its number. Call under the lock.
    fn bump(&self, st: &mut State, hash: u64, via: Option<ConnId>) -> u64 {
        self.stripes[stripe_of(hash)].fetch_add(1, Ordering::SeqCst);
        let seq = self.invalidated.fetch_add(1, Ordering::SeqCst) + 1;
        st.invalidations.record(hash, seq, via);
        seq
    }

    /// The hash of `(db, redis_key)`: it picks the key's ticket stripe and files its record.
    fn key_hash(&self, db: u32, redis_key: &[u8]) -> u64 {
        self.stripe_hasher.hash_one((db, redis_key))
    }

    /// Stores replies that arrived together on `via`, under one lock, each refused (without
    /// touching the cache) when its key was invalidated, or its database cleared, since its
    /// ticket was taken. Returns how many were stored.
    ///
    /// Their slots are looked up once before any is stored: the lookups do not depend on
    /// each other, so their cache misses overlap instead of each stalling in turn (with
    /// many keys, the miss on a key's slot is most of what a fill costs).
    /// Brings the entries of `keys` into the CPU's cache before a run of lookups (see
    /// `Replies::prefetch_entries`); changes nothing, not even recency.
    pub fn prefetch(&self, keys: &[CacheKey]) {
        if keys.len() > 1 {
            self.lock().lru.prefetch_entries(keys);
        }
    }

    pub fn insert_all(&self, fills: &[Fill<'_>], via: Option<ConnId>, now: Instant) -> usize {
        let mut tally = Tally::default();
        self.fill_all(fills, via, now, &mut tally);
        self.count_tally(&tally);
        tally.fills as usize
    }

    fn fill_all(&self, fills: &[Fill<'_>], via: Option<ConnId>, now: Instant, tally: &mut Tally) {
        let mut st = self.lock();
        if fills.len() > 1 {
            st.lru.prefetch(fills.iter().map(|f| &f.key));
        }
        for f in fills {
            self.store(
                &mut st,
                Some((f.ticket, via)),
                f.key,
                f.redis_key,
                f.reply,
                now,
                tally,
            );
        }
        if tally.changed {
            self.publish(&st);
        }
    }

    fn count_tally(&self, tally: &Tally) {
        if let Some(m) = &self.metrics {
            if tally.fills > 0 {
                m.requests[CacheResult::Fill as usize].inc_by(tally.fills);
            }
            if tally.bypasses > 0 {
                m.requests[CacheResult::Bypass as usize].inc_by(tally.bypasses);
            }
            if tally.declined > 0 {
                m.requests[CacheResult::Declined as usize].inc_by(tally.declined);
            }
            if tally.evicted > 0 {
                m.evictions.inc_by(tally.evicted);
            }
        }
    }

    /// Stores one reply under the lock (see [`Cache::insert`]); what happened goes into
    /// `tally`.
    #[allow(clippy::too_many_arguments)]
    fn store(
        &self,
        st: &mut State,
        checked: Option<(FillTicket, Option<ConnId>)>,
        key: CacheKey,
        redis_key: &[u8],
        reply: &[u8],
        now: Instant,
        tally: &mut Tally,
    ) -> bool {
        if matches!(reply.first(), None | Some(b'-' | b'!')) {
            tally.bypasses += 1;
            return false;
        }
        let charge = entry_charge(&key, redis_key.len(), reply.len());
        let fits = charge <= self.config.max_entry_bytes
            && charge <= self.config.max_bytes
            && self.config.max_entries > 0;
        // Checked under the lock that invalidation bumps under: either the invalidation
        // came first and we see it, or we insert first and it removes what we stored.
        if let Some((t, via)) = checked
            && !self.ticket_valid(st, t, via)
        {
            tally.bypasses += 1;
            return false;
        }
        let key_hash = || checked.map_or_else(|| self.key_hash(key.db, redis_key), |(t, _)| t.hash);
        let expires = if !st.expiring_records {
            None
        } else {
            st.records.peek(&key_hash()).and_then(|r| r.ttl.deadline())
        };
        if expires.is_some_and(|e| e <= now) {
            tally.bypasses += 1;
            return false;
        }
        st.admission.count(&key);
        // A key re-read with an unchanged value (the common case) only refreshes its age
        // and use: no copy, no allocation, no index work, and the stored reply not touched.
        // Hashed when first needed: a declined fill needs no hash (a 1 KB reply's took
        // 112 ns).
        let hashed = std::cell::OnceCell::new();
        let hash = || *hashed.get_or_init(|| reply_hash(reply));
        let held = match st.lru.refresh(&key, hash, reply.len(), now, expires) {
            Refresh::Done => {
                self.refreshed.set(&key, hash(), now);
                tally.fills += 1;
                return true;
            }
            Refresh::Changed => true,
            Refresh::Absent => false,
        };
        if !fits {
            if held && st.remove(&key) {
                tally.changed = true;
            }
            tally.bypasses += 1;
            return false;
        }
        // Only a key the cache does not hold is declined (see `admission`): a held key's
        // new reply must replace the old one.
        if !held && self.full_for(st, charge) && !self.admits(st, &key) {
            tally.declined += 1;
            return false;
        }
        let key_hash = key_hash();
        let entry = Entry {
            reply_hash: hash(),
            reply: Bytes::copy_from_slice(reply),
            key_hash,
            filled: now,
            expires,
            charge,
        };
        st.bytes += charge;
        // The same command always names the same Redis key, but unindexing through the old
        // entry keeps the index right even if a caller disagrees with itself.
        if let Some(old) = st.lru.push(key, entry) {
            st.unaccount(&key, old);
        }
        st.add_to_index(key, key_hash);
        self.refreshed.set(&key, hash(), now);
        tally.evicted += self.evict_until_within(st, now);
        tally.changed = true;
        tally.fills += 1;
        true
    }

    /// Records what a write acknowledged at `now` told about `redis_key`: `written` (and to
    /// whom) when redfuse does not hold its result, so a degraded miss must not pretend the
    /// key is absent, and what it did to the key's expiry. Call after the write's
    /// invalidation.
    pub fn key_written(
        &self,
        db: u32,
        redis_key: &[u8],
        written: Option<Seen>,
        ttl: Ttl,
        now: Instant,
    ) {
        if !self.enabled() {
            return;
        }
        let hash = self.key_hash(db, redis_key);
        let mut st = self.lock();
        let evicted = self.record_locked(&mut st, hash, db, written, ttl, now);
        self.publish(&st);
        drop(st);
        if let Some(m) = &self.metrics {
            m.evictions.inc_by(evicted);
        }
    }

    /// [`Cache::key_written`] under the lock, `hash` being the key's; returns how many
    /// entries it evicted.
    fn record_locked(
        &self,
        st: &mut State,
        hash: u64,
        db: u32,
        written: Option<Seen>,
        ttl: Ttl,
        now: Instant,
    ) -> u64 {
        st.lost.rotate(now, self.config.written_ttl);
        st.expiring_records |= ttl.deadline().is_some();
        let written = written.map(|seen| (now, seen));
        if let Some(r) = st.records.get_mut(&hash) {
            r.written = match (written, r.written) {
                (Some((at, seen)), Some((_, before))) => Some((at, seen.merge(before))),
                (new, old) => new.or(old),
            };
            r.ttl = ttl;
            r.db = db;
        } else {
            if written.is_none() && ttl == Ttl::Unknown {
                return 0;
            }
            st.bytes += RECORD_CHARGE;
            st.records.push(hash, Record { db, written, ttl });
        }
        self.evict_until_within(st, now)
    }

    /// Whether a full cache takes in `key`, which it does not hold (see `admission`).
    fn admits(&self, st: &mut State, key: &CacheKey) -> bool {
        let held = st.replies();
        let State { admission, lru, .. } = st;
        admission.admit(key, held, || lru.victim())
    }

    /// Whether storing a new entry of `charge` bytes would evict others.
    fn full_for(&self, st: &State, charge: usize) -> bool {
        st.bytes + charge > self.config.max_bytes || st.replies() >= self.config.max_entries
    }

    /// Evicts replies, least recently used first, then records, until within the bounds.
    /// Records are bounded by count too (`max_entries`).
    fn evict_until_within(&self, st: &mut State, now: Instant) -> u64 {
        let mut evicted = 0;
        while st.records.len() > self.config.max_entries.max(1024) {
            st.evict_record(now, self.config.written_ttl);
        }
        while st.bytes > self.config.max_bytes || st.replies() > self.config.max_entries {
            match st.lru.pop_lru() {
                Some((key, entry)) => st.unaccount(&key, entry),
                None if st.evict_record(now, self.config.written_ttl) => {}
                None => break,
            }
            evicted += 1;
        }
        evicted
    }

    /// [`invalidate`](Cache::invalidate) in every database a client can select (Redis's
    /// default 16, and any other the cache holds entries for).
    pub fn invalidate_everywhere(&self, redis_key: &[u8]) -> usize {
        let mut dbs: Vec<u32> = self.lock().other_dbs.clone();
        dbs.extend(0..16);
        dbs.into_iter()
            .map(|db| self.invalidate(db, redis_key))
            .sum()
    }

    /// Removes every reply that read `redis_key` in `db` (`GET k`, `HGETALL k`, ... of
    /// every identity) and makes tickets taken for it before now stale. Returns how many
    /// were removed. The key's record stays.
    pub fn invalidate(&self, db: u32, redis_key: &[u8]) -> usize {
        self.invalidate_via(db, redis_key, None)
    }

    /// [`Cache::invalidate`] by the reply of a write that arrived on `via`.
    pub fn invalidate_via(&self, db: u32, redis_key: &[u8], via: Option<ConnId>) -> usize {
        // Nothing is stored, so no ticket can fill anything: no bookkeeping per write.
        if !self.enabled() {
            return 0;
        }
        let hash = self.key_hash(db, redis_key);
        let mut st = self.lock();
        let removed = self.invalidate_locked(&mut st, hash, via);
        if removed > 0 {
            self.publish(&st);
        }
        drop(st);
        self.count_invalidations(removed);
        removed
    }

    /// [`Cache::invalidate_via`] under the lock, `hash` being the key's.
    fn invalidate_locked(&self, st: &mut State, hash: u64, via: Option<ConnId>) -> usize {
        let seq = self.bump(st, hash, via);
        let Some(keys) = st.index.remove(&hash) else {
            return 0;
        };
        self.supersede_entries(st, keys, seq)
    }

    /// What an acknowledged plain `SET` (see `degrade::effects::fills_own_value`) did to
    /// its key, as one step under one lock: its reply invalidates the key again, the key
    /// is marked written (other commands and identities do not hold the new value) with
    /// `ttl`, and `get` (the writer's `GET` of the key) is filled with `reply`, the value
    /// as a bulk string. Does nothing and returns false when the key was invalidated
    /// since `ticket` was taken (another write went by: the value is not known).
    #[allow(clippy::too_many_arguments)]
    pub fn set_acknowledged(
        &self,
        ticket: FillTicket,
        via: Option<ConnId>,
        get: CacheKey,
        redis_key: &[u8],
        reply: &[u8],
        ttl: Ttl,
        now: Instant,
    ) -> bool {
        if !self.enabled() {
            return false;
        }
        let mut tally = Tally::default();
        let mut st = self.lock();
        if !self.ticket_valid(&st, ticket, via) {
            return false;
        }
        let removed = self.invalidate_locked(&mut st, ticket.hash, via);
        tally.evicted +=
            self.record_locked(&mut st, ticket.hash, get.db, Some(Seen::ByAll), ttl, now);
        // Stored unchecked: the ticket was current a moment ago, under this same lock,
        // and the invalidation just made is this write's own.
        self.store(&mut st, None, get, redis_key, reply, now, &mut tally);
        self.publish(&st);
        drop(st);
        self.count_invalidations(removed);
        self.count_tally(&tally);
        true
    }

    /// Removes what `identity`'s reads of `redis_key` filled, and nobody else's (a write
    /// queued during an outage changes only what its writer sees).
    pub fn invalidate_for(&self, db: u32, redis_key: &[u8], identity: IdentityId) -> usize {
        if !self.enabled() {
            return 0;
        }
        let hash = self.key_hash(db, redis_key);
        let mut st = self.lock();
        self.bump(&mut st, hash, None);
        let keys: Vec<CacheKey> = match st.index.get(&hash) {
            Some(Readers::One(k)) if k.identity == identity => vec![*k],
            Some(Readers::Many(set)) => set
                .iter()
                .filter(|k| k.identity == identity)
                .cloned()
                .collect(),
            _ => Vec::new(),
        };
        let removed = keys.iter().filter(|k| st.remove(k)).count();
        self.publish(&st);
        drop(st);
        self.count_invalidations(removed);
        removed
    }

    /// Removes every entry of `db`, key records too (FLUSHDB, SWAPDB, ...). Returns how
    /// many replies were removed.
    pub fn clear_db(&self, db: u32) -> usize {
        let mut st = self.lock();
        self.clears.fetch_add(1, Ordering::SeqCst);
        let records: Vec<u64> = st
            .records
            .iter()
            .filter(|(_, r)| r.db == db)
            .map(|(h, _)| *h)
            .collect();
        for h in &records {
            st.records.pop(h);
            st.bytes -= RECORD_CHARGE;
        }
        // Rare (FLUSHDB, SWAPDB): the index is not by database, so every entry is looked at.
        let keys: Vec<CacheKey> = st
            .index
            .values()
            .flat_map(Readers::iter)
            .filter(|k| k.db == db)
            .copied()
            .collect();
        let removed = keys.iter().filter(|k| st.remove(k)).count();
        self.publish(&st);
        drop(st);
        self.count_invalidations(removed);
        removed
    }

    /// Removes everything (FLUSHALL, or an upstream that may have lost its data).
    pub fn clear_all(&self) -> usize {
        let mut st = self.lock();
        self.clears.fetch_add(1, Ordering::SeqCst);
        let removed = st.replies();
        st.lru.clear();
        st.refreshed.clear();
        st.index.clear();
        st.records.clear();
        st.expiring_records = false;
        st.superseded.clear();
        st.bytes = 0;
        self.publish(&st);
        drop(st);
        self.count_invalidations(removed);
        removed
    }

    /// Moves to the superseded replies entries already taken out of the index by
    /// invalidation number `seq`.
    fn supersede_entries(&self, st: &mut State, readers: Readers, seq: u64) -> usize {
        let now = Instant::now();
        let mut move_one = |key: &CacheKey| match st.lru.pop(key) {
            Some(entry) => {
                st.refreshed.forget(key);
                st.admission.remember(key);
                st.bytes -= entry.charge;
                st.superseded.keep(*key, entry, seq, now);
                1
            }
            None => 0,
        };
        match readers {
            Readers::One(key) => move_one(&key),
            Readers::Many(keys) => keys.iter().map(move_one).sum(),
        }
    }

    fn count_invalidations(&self, n: usize) {
        if let Some(m) = &self.metrics {
            m.invalidations.inc_by(n as u64);
        }
    }

    /// Gauges are set under the lock so that concurrent updates cannot land out of order.
    fn publish(&self, st: &State) {
        if let Some(m) = &self.metrics {
            m.entries.set(st.replies() as i64);
            m.bytes.set(st.bytes as i64);
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing under this lock panics between two related updates, so a poisoned
        // state is still consistent; refusing to serve would only turn one bug into an
        // outage.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Panics unless the index holds exactly the LRU's replies and `bytes` is the sum of
    /// all charges.
    #[cfg(test)]
    fn check_invariants(&self) {
        let st = self.lock();
        let mut indexed = 0;
        for (hash, readers) in &st.index {
            if let Readers::Many(set) = readers {
                assert!(!set.is_empty(), "empty key set left in the index");
            }
            for key in readers.iter() {
                match st.lru.peek(key) {
                    Some((h, _)) => assert_eq!(h, *hash),
                    None => panic!("indexed key missing from the LRU"),
                }
                indexed += 1;
            }
        }
        assert_eq!(
            indexed,
            st.replies(),
            "index and LRU disagree on the number of replies"
        );
        assert_eq!(
            st.bytes,
            st.lru
                .keys()
                .map(|k| st.lru.peek(k).expect("listed").1)
                .sum::<usize>()
                + st.records.len() * RECORD_CHARGE
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANON: IdentityId = IdentityId::ANONYMOUS;

    const FRESH: Duration = Duration::from_secs(3600);

    fn key(db: u32, args: &[&str]) -> CacheKey {
        CacheKey::new(db, ANON, Proto::Resp2, args)
    }

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    /// Two Redis keys whose tickets share a stripe.
    fn stripe_mates(cache: &Cache) -> (String, String) {
        let mut seen: HashMap<usize, String> = HashMap::new();
        for i in 0.. {
            let k = format!("k{i}");
            let stripe = stripe_of(cache.ticket(0, k.as_bytes()).hash);
            if let Some(other) = seen.insert(stripe, k.clone()) {
                return (other, k);
            }
        }
        unreachable!()
    }

    #[test]
    fn a_key_superseded_over_and_over_keeps_its_bookkeeping_small() {
        let cache = Cache::new(CacheConfig::default());
        let now = Instant::now();
        for i in 0..200_000u32 {
            let name = format!("k{}", i % 8);
            let k = key(0, &["GET", &name]);
            assert!(cache.insert(k, b(&name), b("$1\r\nv\r\n"), now));
            cache.invalidate(0, name.as_bytes());
        }
        let st = cache.lock();
        assert!(
            st.superseded.order_len() <= 2 * 8 + 1024,
            "{} places for 8 keys",
            st.superseded.order_len()
        );
    }

    #[test]
    fn a_write_to_a_stripe_mate_does_not_refuse_a_fill() {
        let cache = Cache::new(CacheConfig::default());
        let (a, other) = stripe_mates(&cache);
        let now = Instant::now();
        let t = cache.ticket(0, a.as_bytes());
        cache.invalidate(0, other.as_bytes());
        assert!(cache.ticket_current(t, None), "only the stripe moved");
        let ka = key(0, &["GET", &a]);
        assert!(cache.insert_checked(t, None, ka, &b(&a), &b("$1\r\nv\r\n"), now));
        cache.invalidate(0, a.as_bytes());
        assert!(!cache.ticket_current(t, None), "its own key was written");
    }

    #[test]
    fn a_read_sent_before_a_write_is_answered_with_the_value_it_would_have_read() {
        let cache = Cache::new(CacheConfig::default());
        let now = Instant::now();
        let k = key(0, &["GET", "k"]);
        assert!(cache.insert(k, b("k"), b("$3\r\nold\r\n"), now));
        let before = cache.ticket(0, b"k");
        // The write is sent: its key's replies are invalidated.
        assert_eq!(cache.invalidate(0, b"k"), 1);
        let after = cache.ticket(0, b"k");
        assert_eq!(
            cache.get_for(&k, Some(before), now, FRESH),
            Lookup::Hit(b("$3\r\nold\r\n"))
        );
        assert_eq!(cache.get_for(&k, Some(after), now, FRESH), Lookup::Miss);
        assert_eq!(cache.get(&k, now, FRESH), Lookup::Miss);
        assert_eq!(cache.len(), 0);
        // Still bounded by freshness.
        let later = now + Duration::from_secs(10);
        assert_eq!(
            cache.get_for(&k, Some(before), later, Duration::from_secs(5)),
            Lookup::Miss
        );
    }

    fn small(max_bytes: usize, max_entries: usize) -> Cache {
        Cache::new(CacheConfig {
            max_bytes,
            max_entries,
            max_entry_bytes: max_bytes,
            ..CacheConfig::default()
        })
    }

    #[test]
    fn insert_then_get_returns_the_exact_bytes() {
        let cache = Cache::new(CacheConfig::default());
        let now = Instant::now();
        let reply = b("*2\r\n$1\r\na\r\n_\r\n");
        assert_eq!(
            cache.get(&key(0, &["HGETALL", "h"]), now, FRESH),
            Lookup::Miss
        );
        assert!(cache.insert(key(0, &["HGETALL", "h"]), b("h"), reply.clone(), now));
        assert_eq!(
            cache.get(&key(0, &["hgetall", "h"]), now, FRESH),
            Lookup::Hit(reply)
        );
        assert_eq!(cache.len(), 1);
        assert!(cache.bytes() > ENTRY_OVERHEAD);
        cache.check_invariants();
    }

    #[test]
    fn a_fill_of_the_reply_just_stored_may_be_skipped_and_never_hides_a_newer_one() {
        let cache = Cache::new(CacheConfig::default());
        let now = Instant::now();
        let get = key(0, &["GET", "k"]);
        let (v1, v2) = (b("$2\r\nv1\r\n"), b("$2\r\nv2\r\n"));
        let window = Duration::from_secs(1);
        assert!(
            !cache.unchanged(&get, &v1, cache.fresh_clock(now, window)),
            "nothing stored yet"
        );
        assert!(cache.insert(get, b("k"), v1.clone(), now));
        assert!(cache.unchanged(&get, &v1, cache.fresh_clock(now, window)));
        assert!(
            !cache.unchanged(&get, &v2, cache.fresh_clock(now, window)),
            "another reply is filled"
        );
        assert!(
            !cache.unchanged(
                &get,
                &v1,
                cache.fresh_clock(now + Duration::from_secs(2), window)
            ),
            "refreshed again once the window is over"
        );
        assert!(cache.insert(get, b("k"), v2.clone(), now));
        assert!(
            !cache.unchanged(&get, &v1, cache.fresh_clock(now, window)),
            "v1 is no longer what is stored"
        );
        // An entry that leaves the cache (a write, even one Redis refused; eviction; a
        // flush) is filled again by the next read, whatever its reply.
        cache.invalidate(0, b"k");
        assert!(!cache.unchanged(&get, &v2, cache.fresh_clock(now, window)));
        assert!(cache.insert(get, b("k"), v2.clone(), now));
        assert!(cache.unchanged(&get, &v2, cache.fresh_clock(now, window)));
        assert_eq!(cache.get(&get, now, FRESH), Lookup::Hit(v2.clone()));
        cache.clear_all();
        assert!(!cache.unchanged(&get, &v2, cache.fresh_clock(now, window)));
        let small = Cache::new(CacheConfig {
            max_entries: 1,
            ..CacheConfig::default()
        });
        let other = key(0, &["GET", "other"]);
        assert!(small.insert(get, b("k"), v1.clone(), now));
        // The cache is full: `other` is declined once (see `admission`), then stored.
        assert!(!small.insert(other, b("other"), v1.clone(), now));
        assert!(
            small.unchanged(&get, &v1, small.fresh_clock(now, window)),
            "a declined fill evicts nothing"
        );
        assert!(small.insert(other, b("other"), v1.clone(), now));
        assert!(
            !small.unchanged(&get, &v1, small.fresh_clock(now, window)),
            "evicted"
        );
        assert!(small.unchanged(&other, &v1, small.fresh_clock(now, window)));
        cache.check_invariants();
    }

    #[test]
    fn replacing_an_entry_keeps_bytes_and_index_right() {
        let cache = Cache::new(CacheConfig::default());
        let now = Instant::now();
        let k = key(0, &["GET", "k"]);
        assert!(cache.insert(k, b("k"), b("$1\r\na\r\n"), now));
        assert!(cache.insert(k, b("k"), b("$3\r\nabc\r\n"), now));
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.bytes(), entry_charge(&k, 1, 9));
        cache.check_invariants();
        // A caller that files the same command under another key moves it there.
        assert!(cache.insert(k, b("other"), b("+x\r\n"), now));
        cache.check_invariants();
        assert_eq!(cache.invalidate(0, b"k"), 0);
        assert_eq!(cache.invalidate(0, b"other"), 1);
        cache.check_invariants();
    }

    #[test]
    fn shared_types_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Cache>();
        check::<SingleFlight<Bytes>>();
        check::<LeaderGuard<Bytes>>();
        check::<Follower<Bytes>>();
    }

    #[test]
    fn nil_replies_are_cacheable() {
        let cache = Cache::new(CacheConfig::default());
        let now = Instant::now();
        assert!(cache.insert(
            CacheKey::get(0, ANON, Proto::Resp2, b"k"),
            b("k"),
            b("$-1\r\n"),
            now
        ));
        assert!(cache.insert(
            CacheKey::get(0, ANON, Proto::Resp3, b"k"),
            b("k"),
            b("_\r\n"),
            now
        ));
        assert_eq!(
            cache.get(&CacheKey::get(0, ANON, Proto::Resp3, b"k"), now, FRESH),
            Lookup::Hit(b("_\r\n"))
        );
    }

    #[test]
    fn keys_differ_by_db_proto_arguments_and_split() {
        assert_eq!(key(0, &["get", "k"]), key(0, &["GET", "k"]));
        assert_eq!(
            CacheKey::get(0, ANON, Proto::Resp2, b"k"),
            key(0, &["GET", "k"])
        );
        assert_ne!(key(0, &["GET", "k"]), key(0, &["GET", "K"]));
        assert_ne!(key(0, &["GET", "k"]), key(1, &["GET", "k"]));
        assert_ne!(
            CacheKey::get(0, ANON, Proto::Resp2, b"k"),
            CacheKey::get(0, ANON, Proto::Resp3, b"k")
        );
        assert_ne!(key(0, &["HGET", "ab", "c"]), key(0, &["HGET", "a", "bc"]));
        assert_ne!(key(0, &["HGET", "a:b", "c"]), key(0, &["HGET", "a", "b:c"]));
        // A short name and one argument are digested in place (`name_seed`), longer
        // commands laid out: a request and its arguments agree either way.
        for parts in [
            &["get", "k"][..],
            &["HGETALL", "h"],
            &["GETRANGES", "k"],
            &["ZRANGE", "z", "0", "-1"],
        ] {
            let req = crate::resp::Request::from_args(parts);
            assert_eq!(
                CacheKey::of(0, ANON, Proto::Resp2, req.args()),
                key(0, parts)
            );
        }
        let short_names = [
            "GET", "TTL", "PTTL", "TYPE", "STRLEN", "HGETALL", "GETBIT", "SCARD",
        ];
        let mut seen = HashSet::new();
        for name in short_names {
            assert!(seen.insert(key(0, &[name, "k"])), "{name} k");
            assert!(seen.insert(key(0, &[name, "k", ""])), "{name} k ''");
        }
        assert!(seen.insert(key(0, &["GET", ""])));
        assert!(seen.insert(key(0, &["GET"])));
        assert_ne!(key(0, &["GETX", "k"]), key(0, &["GET", "Xk"]));
        assert_ne!(key(0, &["GET\0", "k"]), key(0, &["GET", "k"]));

        let cache = Cache::new(CacheConfig::default());
        let now = Instant::now();
        cache.insert(
            CacheKey::get(0, ANON, Proto::Resp2, b"k"),
            b("k"),
            b("$2\r\nv0\r\n"),
            now,
        );
        cache.insert(
            CacheKey::get(1, ANON, Proto::Resp2, b"k"),
            b("k"),
            b("$2\r\nv1\r\n"),
            now,
        );
        cache.insert(
            CacheKey::get(0, ANON, Proto::Resp3, b"k"),
            b("k"),
            b("$2\r\nv3\r\n"),
            now,
        );
        assert_eq!(
            cache.get(&CacheKey::get(0, ANON, Proto::Resp2, b"k"), now, FRESH),
            Lookup::Hit(b("$2\r\nv0\r\n"))
        );
        assert_eq!(
            cache.get(&CacheKey::get(1, ANON, Proto::Resp2, b"k"), now, FRESH),
            Lookup::Hit(b("$2\r\nv1\r\n"))
        );
        assert_eq!(
            cache.get(&CacheKey::get(0, ANON, Proto::Resp3, b"k"), now, FRESH),
            Lookup::Hit(b("$2\r\nv3\r\n"))
        );
        assert_eq!(
            cache.get(&CacheKey::get(1, ANON, Proto::Resp3, b"k"), now, FRESH),
            Lookup::Miss
        );
    }

    #[test]
    fn binary_keys_and_arguments_are_kept_exactly() {
        let cache = Cache::new(CacheConfig::default());
        let now = Instant::now();
        let raw: &[u8] = b"\xff\x00k\r\n";
        let k = CacheKey::new(0, ANON, Proto::Resp2, &[b"get".as_slice(), raw]);
        assert!(cache.insert(k, Bytes::copy_from_slice(raw), b("$1\r\nv\r\n"), now));
        assert_eq!(
            cache.get(&CacheKey::get(0, ANON, Proto::Resp2, raw), now, FRESH),
            Lookup::Hit(b("$1\r\nv\r\n"))
        );
        assert_eq!(cache.invalidate(0, raw), 1);
        cache.check_invariants();
    }

    #[test]
    fn invalidate_removes_every_command_of_the_key_and_nothing_else() {
        let cache = Cache::new(CacheConfig::default());
        let now = Instant::now();
        let of_k = [
            key(0, &["GET", "k"]),
            key(0, &["STRLEN", "k"]),
            key(0, &["LRANGE", "k", "0", "-1"]),
            key(0, &["LRANGE", "k", "0", "9"]),
        ];
        for (i, k) in of_k.iter().enumerate() {
            assert!(cache.insert(*k, b("k"), b(&format!(":{i}\r\n")), now));
        }
        cache.insert(
            CacheKey::get(0, ANON, Proto::Resp3, b"k"),
            b("k"),
            b(":9\r\n"),
            now,
        );
        let others = [
            (key(0, &["GET", "k2"]), "k2"),
            (key(1, &["GET", "k"]), "k"),
            (key(0, &["GET", "K"]), "K"),
        ];
        for (k, redis_key) in &others {
            assert!(cache.insert(*k, b(redis_key), b("+other\r\n"), now));
        }
        cache.check_invariants();

        assert_eq!(cache.invalidate(0, b"k"), 5);
        for k in &of_k {
            assert_eq!(cache.get(k, now, FRESH), Lookup::Miss);
        }
        for (k, _) in &others {
            assert_eq!(
                cache.get(k, now, FRESH),
                Lookup::Hit(b("+other\r\n")),
                "{k:?}"
            );
        }
        assert_eq!(cache.invalidate(0, b"k"), 0);
        assert_eq!(cache.len(), others.len());
        cache.check_invariants();
    }

    #[test]
    fn clear_db_removes_only_that_db_and_clear_all_everything() {
        let cache = Cache::new(CacheConfig::default());
        let now = Instant::now();
        for db in 0..3 {
            for k in ["a", "b", "c"] {
                cache.insert(
                    CacheKey::get(db, ANON, Proto::Resp2, k.as_bytes()),
                    b(k),
                    b("+v\r\n"),
                    now,
                );
            }
        }
        assert_eq!(cache.clear_db(1), 3);
        assert_eq!(cache.clear_db(1), 0);
        assert_eq!(
            cache.get(&CacheKey::get(1, ANON, Proto::Resp2, b"a"), now, FRESH),
            Lookup::Miss
        );
        assert_eq!(
            cache.get(&CacheKey::get(0, ANON, Proto::Resp2, b"a"), now, FRESH),
            Lookup::Hit(b("+v\r\n"))
        );
        assert_eq!(
            cache.get(&CacheKey::get(2, ANON, Proto::Resp2, b"c"), now, FRESH),
            Lookup::Hit(b("+v\r\n"))
        );
        assert_eq!(cache.len(), 6);
        cache.check_invariants();

        assert_eq!(cache.clear_all(), 6);
        assert!(cache.is_empty());
        assert_eq!(cache.bytes(), 0);
        cache.check_invariants();
    }

    #[test]
    fn a_million_distinct_keys_stay_within_the_bounds() {
        let cache = small(1 << 20, 1_000_000);
        let now = Instant::now();
        let reply = b("$5\r\nvalue\r\n");
        for i in 0..1_000_000u32 {
            let k = i.to_be_bytes();
            let fill = || {
                cache.insert(
                    CacheKey::get(0, ANON, Proto::Resp2, &k),
                    Bytes::copy_from_slice(&k),
                    reply.clone(),
                    now,
                )
            };
            // Once the cache is full a new key is stored when it was filled more often
            // lately than the entry it would push out, at the latest when its count is as
            // high as counts go.
            let mut fills = 1;
            while !fill() {
                fills += 1;
                assert!(fills <= 16, "key {i} not stored after 16 fills");
            }
        }
        assert!(cache.bytes() <= 1 << 20, "{} bytes", cache.bytes());
        let per_entry = entry_charge(
            &CacheKey::get(0, ANON, Proto::Resp2, b"0000"),
            4,
            reply.len(),
        );
        assert_eq!(cache.len(), (1 << 20) / per_entry);
        // The newest survive, the oldest are gone.
        assert!(matches!(
            cache.get(
                &CacheKey::get(0, ANON, Proto::Resp2, &999_999u32.to_be_bytes()),
                now,
                FRESH
            ),
            Lookup::Hit(_)
        ));
        assert_eq!(
            cache.get(
                &CacheKey::get(0, ANON, Proto::Resp2, &0u32.to_be_bytes()),
                now,
                FRESH
            ),
            Lookup::Miss
        );
        cache.check_invariants();
    }

    #[test]
    fn max_entries_bounds_the_count() {
        let cache = small(1 << 30, 10);
        let now = Instant::now();
        for i in 0..100u32 {
            cache.insert(
                CacheKey::get(0, ANON, Proto::Resp2, &i.to_be_bytes()),
                Bytes::copy_from_slice(&i.to_be_bytes()),
                b(":1\r\n"),
                now,
            );
        }
        assert_eq!(cache.len(), 10);
        cache.check_invariants();
    }

    #[test]
    fn entries_over_the_per_entry_cap_are_not_cached_and_displace_the_old_one() {
        let cache = Cache::new(CacheConfig {
            max_entry_bytes: ENTRY_OVERHEAD + 100,
            ..CacheConfig::default()
        });
        let now = Instant::now();
        let k = CacheKey::get(0, ANON, Proto::Resp2, b"k");
        assert!(cache.insert(k, b("k"), b("$2\r\nok\r\n"), now));
        let big = Bytes::from(format!("${}\r\n{}\r\n", 100, "x".repeat(100)));
        assert!(!cache.insert(k, b("k"), big, now));
        assert_eq!(cache.get(&k, now, FRESH), Lookup::Miss);
        assert!(cache.is_empty());
        cache.check_invariants();

        // An entry larger than the whole cache is refused too, whatever the per-entry cap.
        let tiny = Cache::new(CacheConfig {
            max_bytes: ENTRY_OVERHEAD + 10,
            ..CacheConfig::default()
        });
        assert!(!tiny.insert(k, b("k"), b("$20\r\n01234567890123456789\r\n"), now));
        assert!(tiny.is_empty());
    }

    #[test]
    fn a_full_cache_declines_a_new_key_once_and_never_a_held_ones_new_reply() {
        let cache = small(1 << 20, 1);
        let now = Instant::now();
        let k = CacheKey::get(0, ANON, Proto::Resp2, b"k");
        assert!(cache.insert(k, b("k"), b("+v1\r\n"), now), "not full yet");
        // Full: a changed reply of the key it holds replaces the old one at once (keeping
        // the old one would serve a value Redis no longer holds).
        assert!(cache.insert(k, b("k"), b("+v2\r\n"), now));
        assert_eq!(cache.get(&k, now, FRESH), Lookup::Hit(b("+v2\r\n")));
        let other = CacheKey::get(0, ANON, Proto::Resp2, b"other");
        assert!(
            !cache.insert(other, b("other"), b("+o\r\n"), now),
            "new key: declined"
        );
        assert_eq!(cache.get(&other, now, FRESH), Lookup::Miss);
        assert_eq!(cache.get(&k, now, FRESH), Lookup::Hit(b("+v2\r\n")));
        assert!(
            !cache.insert(other, b("other"), b("+o\r\n"), now),
            "second fill: no more often than the entry it would push out (k, filled twice)"
        );
        assert!(
            cache.insert(other, b("other"), b("+o\r\n"), now),
            "third fill: more often"
        );
        assert_eq!(cache.len(), 1, "within the bound");
        // A write's own value (SET w v) is declined like a read's fill, leaving the key
        // marked written: a degraded miss on it is answered with an error.
        let w = CacheKey::get(0, ANON, Proto::Resp2, b"w");
        cache.invalidate(0, b"w");
        let ticket = cache.ticket(0, b"w");
        assert!(cache.set_acknowledged(ticket, None, w, b"w", b"$1\r\nv\r\n", Ttl::Unknown, now));
        assert_eq!(cache.get(&w, now, FRESH), Lookup::Miss);
        assert!(cache.miss_is_unsafe(0, b"w", ANON, now, FRESH));
        cache.check_invariants();

        // A write to a key a full cache holds: its entry makes way before the write is
        // sent, the write's record takes some of that room, and the write's own value is
        // taken in all the same (the key was held, not read once).
        let (v1, v2) = (b("$2\r\nv1\r\n"), b("$2\r\nv2\r\n"));
        let metrics = CacheMetrics::register(&Registry::new()).unwrap();
        let full = Cache::with_metrics(
            CacheConfig {
                max_bytes: 2 * entry_charge(&k, 1, v1.len()),
                ..CacheConfig::default()
            },
            metrics.clone(),
        );
        let x = CacheKey::get(0, ANON, Proto::Resp2, b"x");
        assert!(full.insert(k, b("k"), v1, now) && full.insert(x, b("x"), b("$2\r\nxx\r\n"), now));
        full.invalidate(0, b"k");
        let ticket = full.ticket(0, b"k");
        assert!(full.set_acknowledged(ticket, None, k, b"k", &v2, Ttl::Unknown, now));
        // Stored (the eviction that made room for it may then pick any unused entry).
        let count = |r: CacheResult| metrics.requests[r as usize].get();
        assert_eq!(
            (count(CacheResult::Fill), count(CacheResult::Declined)),
            (3, 0)
        );
        full.check_invariants();
    }

    #[test]
    fn a_scan_of_keys_read_once_does_not_push_out_keys_read_again() {
        let reply = b(":1\r\n");
        let get = |k: &str| CacheKey::get(0, ANON, Proto::Resp2, k.as_bytes());
        let charge = entry_charge(&get("hot00"), 5, reply.len());
        let cache = small(100 * charge, 1000);
        let now = Instant::now();
        for i in 0..100 {
            let k = format!("hot{i:02}");
            assert!(cache.insert(get(&k), b(&k), reply.clone(), now));
        }
        // Ten times as many keys as fit, each read once (a batch job walking the keyspace).
        // A scanned key whose admission bit another one set is stored: about one in the
        // run (1000 keys into 2^20 bits), each evicting one hot key; more than five, a
        // chance below 10^-5 (and every one of them without admission).
        let stored = (0..1000)
            .filter(|i| {
                let k = format!("s{i:04}");
                cache.insert(get(&k), b(&k), reply.clone(), now)
            })
            .count();
        let hot = (0..100)
            .filter(|i| {
                let k = get(&format!("hot{i:02}"));
                matches!(cache.get(&k, now, FRESH), Lookup::Hit(_))
            })
            .count();
        assert!(
            stored <= 5 && hot >= 95,
            "{stored} scanned keys stored, {hot} hot keys left"
        );
        cache.check_invariants();
    }

    #[test]
    fn recently_read_entries_survive_eviction() {
        let reply = b(":1\r\n");
        let charge = entry_charge(&CacheKey::get(0, ANON, Proto::Resp2, b"a"), 1, reply.len());
        let cache = small(3 * charge, 100);
        let now = Instant::now();
        for k in ["a", "b", "c"] {
            assert!(cache.insert(
                CacheKey::get(0, ANON, Proto::Resp2, k.as_bytes()),
                b(k),
                reply.clone(),
                now
            ));
        }
        // Reading "a" makes "b" the least recently used.
        assert!(matches!(
            cache.get(&CacheKey::get(0, ANON, Proto::Resp2, b"a"), now, FRESH),
            Lookup::Hit(_)
        ));
        let fill_d = || {
            cache.insert(
                CacheKey::get(0, ANON, Proto::Resp2, b"d"),
                b("d"),
                reply.clone(),
                now,
            )
        };
        // The cache is full and "d" is new: declined once (see `admission`), then stored.
        assert!(!fill_d());
        assert_eq!(cache.len(), 3);
        assert!(fill_d());
        assert_eq!(
            cache.get(&CacheKey::get(0, ANON, Proto::Resp2, b"b"), now, FRESH),
            Lookup::Miss
        );
        for k in ["a", "c", "d"] {
            assert!(
                matches!(
                    cache.get(
                        &CacheKey::get(0, ANON, Proto::Resp2, k.as_bytes()),
                        now,
                        FRESH
                    ),
                    Lookup::Hit(_)
                ),
                "{k}"
            );
        }
        cache.check_invariants();
    }

    #[test]
    fn error_replies_are_refused_and_leave_the_old_entry() {
        let cache = Cache::new(CacheConfig::default());
        let now = Instant::now();
        let k = CacheKey::get(0, ANON, Proto::Resp3, b"k");
        assert!(!cache.insert(k, b("k"), b("-ERR nope\r\n"), now));
        assert!(!cache.insert(k, b("k"), b("!9\r\nERR nope!\r\n"), now));
        assert!(!cache.insert(k, b("k"), Bytes::new(), now));
        assert!(cache.is_empty());
        assert!(cache.insert(k, b("k"), b("+v\r\n"), now));
        assert!(!cache.insert(k, b("k"), b("-LOADING\r\n"), now));
        assert_eq!(cache.get(&k, now, FRESH), Lookup::Hit(b("+v\r\n")));
    }

    #[tokio::test(start_paused = true)]
    async fn entries_older_than_max_stale_are_stale() {
        let cache = Cache::new(CacheConfig::default());
        let max_stale = Duration::from_secs(10);
        let k = CacheKey::get(0, ANON, Proto::Resp2, b"k");
        cache.insert(k, b("k"), b("+v\r\n"), Instant::now());

        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(
            cache.get(&k, Instant::now(), max_stale),
            Lookup::Hit(b("+v\r\n"))
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(cache.get(&k, Instant::now(), max_stale), Lookup::Stale);
        // Removed when found stale: it could never be served again.
        assert_eq!(cache.get(&k, Instant::now(), Duration::MAX), Lookup::Miss);
        assert!(cache.is_empty());
        cache.check_invariants();

        // A refill restarts the age.
        cache.insert(k, b("k"), b("+w\r\n"), Instant::now());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(
            cache.get(&k, Instant::now(), max_stale),
            Lookup::Hit(b("+w\r\n"))
        );
    }

    #[test]
    fn the_index_stays_consistent_through_evictions() {
        let reply = b(":1\r\n");
        let cache = small(
            50 * entry_charge(&key(0, &["GET", "k00"]), 3, reply.len()) + 500,
            1000,
        );
        let now = Instant::now();
        for round in 0..20 {
            for i in 0..30 {
                let k = format!("k{i:02}");
                let cmd = if (i + round) % 2 == 0 { "GET" } else { "TTL" };
                cache.insert(key(i % 3, &[cmd, &k]), b(&k), reply.clone(), now);
                cache.insert(key(i % 3, &["STRLEN", &k]), b(&k), reply.clone(), now);
            }
            cache.check_invariants();
            for i in (round % 5..30).step_by(5) {
                cache.invalidate(i % 3, format!("k{i:02}").as_bytes());
            }
            cache.check_invariants();
        }
        assert!(cache.len() <= 50);
        for i in 0..30 {
            cache.invalidate(i % 3, format!("k{i:02}").as_bytes());
        }
        assert!(cache.is_empty());
        assert_eq!(cache.bytes(), 0);
        assert!(cache.lock().index.is_empty());
    }

    #[test]
    fn a_fill_that_raced_an_invalidation_is_refused() {
        let cache = Cache::new(CacheConfig::default());
        let now = Instant::now();
        let k = CacheKey::get(0, ANON, Proto::Resp2, b"k");

        let ticket = cache.ticket(0, b"k");
        cache.invalidate(0, b"k");
        assert!(!cache.insert_checked(ticket, None, k, &b("k"), &b("+old\r\n"), now));
        assert!(cache.is_empty());

        let ticket = cache.ticket(0, b"k");
        assert!(cache.insert_checked(ticket, None, k, &b("k"), &b("+new\r\n"), now));
        // A stale ticket must not disturb the newer entry either.
        let stale = cache.ticket(0, b"k");
        cache.invalidate(0, b"other");
        cache.invalidate(0, b"k");
        assert!(cache.insert_checked(cache.ticket(0, b"k"), None, k, b"k", b"+newer\r\n", now));
        assert!(!cache.insert_checked(stale, None, k, &b("k"), &b("+old\r\n"), now));
        assert_eq!(cache.get(&k, now, FRESH), Lookup::Hit(b("+newer\r\n")));

        let ticket = cache.ticket(0, b"k");
        cache.clear_db(5);
        assert!(!cache.insert_checked(ticket, None, k, &b("k"), &b("+old\r\n"), now));
    }

    #[test]
    fn metrics_count_what_happened() {
        let registry = Registry::new();
        let metrics = CacheMetrics::register(&registry).unwrap();
        let reply = b(":1\r\n");
        let charge = entry_charge(&CacheKey::get(0, ANON, Proto::Resp2, b"a"), 1, reply.len());
        let cache = Cache::with_metrics(
            CacheConfig {
                max_bytes: 2 * charge,
                max_entries: 10,
                max_entry_bytes: 1 << 20,
                ..CacheConfig::default()
            },
            metrics.clone(),
        );
        let now = Instant::now();
        // Full after "b": "c" is declined once, then evicts "a".
        for k in ["a", "b", "c", "c"] {
            cache.insert(
                CacheKey::get(0, ANON, Proto::Resp2, k.as_bytes()),
                b(k),
                reply.clone(),
                now,
            );
        }
        cache.insert(
            CacheKey::get(0, ANON, Proto::Resp2, b"c"),
            b("c"),
            b("-ERR\r\n"),
            now,
        );
        cache.get(&CacheKey::get(0, ANON, Proto::Resp2, b"c"), now, FRESH);
        cache.get(&CacheKey::get(0, ANON, Proto::Resp2, b"a"), now, FRESH);
        cache.get(
            &CacheKey::get(0, ANON, Proto::Resp2, b"b"),
            now + Duration::from_secs(2),
            Duration::from_secs(1),
        );
        cache.count(CacheResult::Bypass);
        cache.insert(
            CacheKey::get(0, ANON, Proto::Resp2, b"d"),
            b("d"),
            reply.clone(),
            now,
        );
        assert_eq!(cache.invalidate(0, b"d"), 1);

        let count = |r: CacheResult| metrics.requests[r as usize].get();
        assert_eq!(count(CacheResult::Fill), 4);
        assert_eq!(count(CacheResult::Hit), 1);
        assert_eq!(count(CacheResult::Miss), 1);
        assert_eq!(count(CacheResult::StaleHit), 1);
        assert_eq!(count(CacheResult::Bypass), 2);
        assert_eq!(count(CacheResult::Declined), 1);
        assert_eq!(metrics.evictions.get(), 1);
        assert_eq!(metrics.invalidations.get(), 1);
        assert_eq!(metrics.entries.get(), 1);
        assert_eq!(metrics.bytes.get(), charge as i64);

        let mut names: Vec<String> = registry
            .gather()
            .iter()
            .map(|f| f.name().to_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "redfuse_cache_bytes",
                "redfuse_cache_entries",
                "redfuse_cache_evictions_total",
                "redfuse_cache_invalidations_total",
                "redfuse_cache_requests_total",
                "redfuse_singleflight_shared_total",
            ]
        );
        let labels: Vec<&str> = CacheResult::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            labels,
            ["hit", "stale_hit", "miss", "fill", "bypass", "declined"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn replies_are_not_served_past_a_known_expiry() {
        let cache = Cache::new(CacheConfig::default());
        let now = Instant::now();
        let k = CacheKey::get(0, ANON, Proto::Resp2, b"k");
        cache.key_written(0, b"k", None, Ttl::At(now + Duration::from_secs(2)), now);
        assert!(cache.insert(k, b("k"), b("$1\r\nv\r\n"), now));
        assert!(matches!(cache.get(&k, now, FRESH), Lookup::Hit(_)));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(cache.get(&k, Instant::now(), FRESH), Lookup::Stale);
        // Once expired, a late fill is refused too.
        assert!(!cache.insert(k, b("k"), b("$1\r\nv\r\n"), Instant::now()));
        // PERSIST: no expiry any more.
        cache.key_written(0, b"k", None, Ttl::Persistent, Instant::now());
        assert!(cache.insert(k, b("k"), b("$1\r\nv\r\n"), Instant::now()));
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(matches!(
            cache.get(&k, Instant::now(), FRESH),
            Lookup::Hit(_)
        ));
        assert_eq!(cache.len(), 1, "key records are not replies");
        cache.check_invariants();
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_mark_makes_misses_unsafe_for_max_stale() {
        let cache = Cache::new(CacheConfig::default());
        let now = Instant::now();
        let stale = Duration::from_secs(10);
        let bob = crate::auth::Identities::new().intern("bob");
        assert!(!cache.miss_is_unsafe(0, b"k", ANON, now, stale));
        cache.key_written(0, b"k", Some(Seen::ByAll), Ttl::Unknown, now);
        assert!(cache.miss_is_unsafe(0, b"k", ANON, now, stale));
        assert!(cache.miss_is_unsafe(0, b"k", bob, now, stale));
        assert!(
            !cache.miss_is_unsafe(1, b"k", ANON, now, stale),
            "per database"
        );
        assert!(!cache.miss_is_unsafe(0, b"j", ANON, now, stale));
        // Invalidation leaves the mark; the reply of a later read is served as usual.
        cache.invalidate(0, b"k");
        assert!(cache.miss_is_unsafe(0, b"k", ANON, now, stale));
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(!cache.miss_is_unsafe(0, b"k", ANON, Instant::now(), stale));
        // A queued write concerns its writer only, until another identity queues one too.
        cache.key_written(0, b"q", Some(Seen::By(bob)), Ttl::Unknown, Instant::now());
        assert!(cache.miss_is_unsafe(0, b"q", bob, Instant::now(), stale));
        assert!(!cache.miss_is_unsafe(0, b"q", ANON, Instant::now(), stale));
        cache.key_written(0, b"q", Some(Seen::By(ANON)), Ttl::Unknown, Instant::now());
        assert!(cache.miss_is_unsafe(0, b"q", bob, Instant::now(), stale));
        assert!(cache.miss_is_unsafe(0, b"q", ANON, Instant::now(), stale));
        cache.clear_all();
        cache.check_invariants();
    }

    #[tokio::test(start_paused = true)]
    async fn an_evicted_write_mark_still_makes_misses_unsafe() {
        let charge = entry_charge(&CacheKey::get(0, ANON, Proto::Resp2, b"k0"), 2, 9);
        let cache = small(3 * charge, 100);
        let now = Instant::now();
        let stale = Duration::from_secs(60);
        cache.key_written(0, b"marked", Some(Seen::ByAll), Ttl::Unknown, now);
        for i in 0..10 {
            let k = format!("k{i}");
            cache.insert(
                CacheKey::get(0, ANON, Proto::Resp2, k.as_bytes()),
                b(&k),
                b("$3\r\nabc\r\n"),
                now,
            );
        }
        cache.check_invariants();
        assert!(cache.miss_is_unsafe(0, b"marked", ANON, now, stale));
        // After two generations the lost mark no longer matters and is forgotten.
        for _ in 0..2 {
            tokio::time::advance(Duration::from_secs(301)).await;
            cache.key_written(0, b"other", None, Ttl::Persistent, Instant::now());
        }
        assert!(!cache.miss_is_unsafe(0, b"marked", ANON, Instant::now(), stale));
    }

    #[test]
    fn identities_are_separate_partitions() {
        let cache = Cache::new(CacheConfig::default());
        let now = Instant::now();
        let alice = CacheKey::get(0, IdentityId::ANONYMOUS, Proto::Resp2, b"k");
        let bob = CacheKey::get(
            0,
            crate::auth::Identities::new().intern("bob"),
            Proto::Resp2,
            b"k",
        );
        assert_ne!(alice, bob);
        assert!(cache.insert(alice, b("k"), b("$1\r\na\r\n"), now));
        assert_eq!(cache.get(&bob, now, FRESH), Lookup::Miss);
        assert!(cache.insert(bob, b("k"), b("$1\r\nb\r\n"), now));
        assert_eq!(cache.invalidate_for(0, b"k", bob.identity), 1);
        assert!(matches!(cache.get(&alice, now, FRESH), Lookup::Hit(_)));
        cache.check_invariants();
        assert_eq!(cache.invalidate(0, b"k"), 1);
    }
}
