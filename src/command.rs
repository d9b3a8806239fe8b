//! The proxy's static command table: what every Redis command is, decided once per request
//! from the bytes of its name.
//!
//! # Design
//!
//! * **One static table, built at compile time.** [`COMMANDS`] holds one [`CommandSpec`] per
//!   top-level command of Redis 7.2 (241 of them), sorted by name. A spec's `id` is its index,
//!   so per-command metrics can live in a plain array. The ids, the lookup index and the ids
//!   of the few commands that need special handling are all computed by `const fn`s, so a
//!   missing or misspelt entry fails the build, not a request.
//! * **Byte matching, never strings.** Command names, keys and arguments arrive as binary
//!   `Bytes` slices of the client's read buffer. Turning them into `String`s would cost an
//!   allocation and a UTF-8 check per request and would fail on binary keys, so [`lookup`]
//!   hashes the name with ASCII case folding (FNV-1a, folded on the fly) into a
//!   compile-time open-addressing index and confirms with `eq_ignore_ascii_case`. Option
//!   tokens (`STREAMS`, `STORE`, `BLOCK` ...) are matched the same way. Nothing in a
//!   lookup or a key extraction allocates unless a command names more than
//!   [`INLINE_KEYS`] keys.
//! * **Static facts vs. per-call answers.** A spec records what Redis records: arity, flags
//!   and where keys are. Some answers depend on the arguments (`SORT ... STORE` writes,
//!   `XREAD BLOCK` blocks, `EXISTS a b` is not cacheable, `XGROUP CREATE` writes but
//!   `XGROUP HELP` does not), so the proxy should ask [`effective_flags`], [`is_write`],
//!   [`is_read`], [`is_blocking`], [`cacheable`] and [`key_indices`], which look at the
//!   arguments, rather than read the spec's fields directly.
//! * **Containers are one entry.** CLIENT, CONFIG, OBJECT, XGROUP ... are single entries
//!   with [`Flags::CONTAINER`] and a small subcommand table ([`SubcommandSpec`]) that
//!   carries each subcommand's arity, flags and key positions, found by
//!   [`lookup_subcommand`].
//! * **Never panics on bad input.** Arity and syntax errors are Redis's to report. Key
//!   extraction on short or malformed arguments returns the keys that are there, and every
//!   index it returns is in bounds.
//!
//! Flags follow `COMMAND INFO` of Redis 7.2 with these additions: `MAY_REPLICATE` (hidden by
//! `COMMAND INFO`), `RANDOM` and `TIME_DEPENDENT` (Redis 7 moved these to command tips),
//! `CONTAINER`, and `WRITE` on EVAL/EVALSHA/FCALL, which the proxy must treat as writes
//! although Redis leaves them unflagged (a script declares its own flags).

use std::fmt;
use std::ops::{BitAnd, BitOr, BitOrAssign};

use crate::resp::Args;

// ---------------------------------------------------------------------------------------
// Flags
// ---------------------------------------------------------------------------------------

/// A set of command properties. Copy-cheap bitset; combine with `|`, test with
/// [`Flags::contains`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Flags(u32);

impl Flags {
    pub const NONE: Flags = Flags(0);
    /// Reads the keyspace and never writes it (Redis `readonly`).
    pub const READ: Flags = Flags(1 << 0);
    /// May modify the keyspace.
    pub const WRITE: Flags = Flags(1 << 1);
    /// May grow memory use; Redis rejects it when over `maxmemory`.
    pub const DENYOOM: Flags = Flags(1 << 2);
    /// Administrative / dangerous.
    pub const ADMIN: Flags = Flags(1 << 3);
    /// Pub/Sub related.
    pub const PUBSUB: Flags = Flags(1 << 4);
    /// Not allowed inside scripts.
    pub const NOSCRIPT: Flags = Flags(1 << 5);
    /// May block the client (Redis `blocking`; see [`is_blocking`] for the per-call answer).
    pub const BLOCKING: Flags = Flags(1 << 6);
    /// Allowed while the server loads its dataset.
    pub const LOADING_OK: Flags = Flags(1 << 7);
    /// Allowed on a replica with a stale dataset.
    pub const STALE_OK: Flags = Flags(1 << 8);
    /// O(1) or O(log N); never delays the server.
    pub const FAST: Flags = Flags(1 << 9);
    /// Allowed before authentication.
    pub const NO_AUTH: Flags = Flags(1 << 10);
    /// Not a write, but may produce replication traffic (PUBLISH, PFCOUNT, scripts).
    pub const MAY_REPLICATE: Flags = Flags(1 << 11);
    /// Two identical calls on an unchanged dataset may answer differently.
    pub const RANDOM: Flags = Flags(1 << 12);
    /// The reply depends on the clock (TTL, idle times, ...).
    pub const TIME_DEPENDENT: Flags = Flags(1 << 13);
    /// Key positions depend on the arguments (Redis `movablekeys`).
    pub const MOVABLE_KEYS: Flags = Flags(1 << 14);
    /// Allowed while a script or function is busy.
    pub const ALLOW_BUSY: Flags = Flags(1 << 15);
    /// Not allowed inside MULTI.
    pub const NO_MULTI: Flags = Flags(1 << 16);
    /// Not propagated to MONITOR.
    pub const SKIP_MONITOR: Flags = Flags(1 << 17);
    /// Not recorded in SLOWLOG.
    pub const SKIP_SLOWLOG: Flags = Flags(1 << 18);
    /// Denied during async loading.
    pub const NO_ASYNC_LOADING: Flags = Flags(1 << 19);
    /// Cluster: accepted for an importing slot after ASKING.
    pub const ASKING: Flags = Flags(1 << 20);
    /// May run with zero keys although it takes keys (scripts).
    pub const NO_MANDATORY_KEYS: Flags = Flags(1 << 21);
    /// Has subcommands; the real flags are the subcommand's (see [`effective_flags`]).
    pub const CONTAINER: Flags = Flags(1 << 22);

    const NAMES: [(Flags, &'static str); 23] = [
        (Flags::READ, "READ"),
        (Flags::WRITE, "WRITE"),
        (Flags::DENYOOM, "DENYOOM"),
        (Flags::ADMIN, "ADMIN"),
        (Flags::PUBSUB, "PUBSUB"),
        (Flags::NOSCRIPT, "NOSCRIPT"),
        (Flags::BLOCKING, "BLOCKING"),
        (Flags::LOADING_OK, "LOADING_OK"),
        (Flags::STALE_OK, "STALE_OK"),
        (Flags::FAST, "FAST"),
        (Flags::NO_AUTH, "NO_AUTH"),
        (Flags::MAY_REPLICATE, "MAY_REPLICATE"),
        (Flags::RANDOM, "RANDOM"),
        (Flags::TIME_DEPENDENT, "TIME_DEPENDENT"),
        (Flags::MOVABLE_KEYS, "MOVABLE_KEYS"),
        (Flags::ALLOW_BUSY, "ALLOW_BUSY"),
        (Flags::NO_MULTI, "NO_MULTI"),
        (Flags::SKIP_MONITOR, "SKIP_MONITOR"),
        (Flags::SKIP_SLOWLOG, "SKIP_SLOWLOG"),
        (Flags::NO_ASYNC_LOADING, "NO_ASYNC_LOADING"),
        (Flags::ASKING, "ASKING"),
        (Flags::NO_MANDATORY_KEYS, "NO_MANDATORY_KEYS"),
        (Flags::CONTAINER, "CONTAINER"),
    ];

    /// True if every flag of `other` is set in `self`.
    pub const fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }

    /// True if any flag of `other` is set in `self`.
    #[cfg(test)]
    pub const fn intersects(self, other: Flags) -> bool {
        self.0 & other.0 != 0
    }

    pub const fn union(self, other: Flags) -> Flags {
        Flags(self.0 | other.0)
    }

    pub const fn difference(self, other: Flags) -> Flags {
        Flags(self.0 & !other.0)
    }

    #[cfg(test)]
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Names of the set flags, in a fixed order (for logs and admin output).
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        Flags::NAMES
            .into_iter()
            .filter(move |(f, _)| self.contains(*f))
            .map(|(_, n)| n)
    }
}

impl BitOr for Flags {
    type Output = Flags;
    fn bitor(self, rhs: Flags) -> Flags {
        self.union(rhs)
    }
}

impl BitOrAssign for Flags {
    fn bitor_assign(&mut self, rhs: Flags) {
        self.0 |= rhs.0;
    }
}

impl BitAnd for Flags {
    type Output = Flags;
    fn bitand(self, rhs: Flags) -> Flags {
        Flags(self.0 & rhs.0)
    }
}

impl fmt::Debug for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Flags(")?;
        for (i, name) in self.names().enumerate() {
            if i > 0 {
                f.write_str(" | ")?;
            }
            f.write_str(name)?;
        }
        f.write_str(")")
    }
}

/// `f!(READ | FAST)`: flag sets in the table without `BitOr`, which is not `const`.
macro_rules! f {
    ($($flag:ident)|+) => {
        Flags(0 $(| Flags::$flag.0)+)
    };
}

// ---------------------------------------------------------------------------------------
// Spec types
// ---------------------------------------------------------------------------------------

/// How the proxy must carry a command upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    /// Stateless: multiplex on shared upstream connections.
    Shared,
    /// Answered (or emulated) by the proxy on the client connection: HELLO, PING, ECHO, QUIT,
    /// RESET, AUTH, CLIENT (the caller inspects the subcommand), and the cluster
    /// connection-state commands ASKING, READONLY, READWRITE.
    Local,
    /// Needs a dedicated upstream connection while the state lasts: MULTI, EXEC, DISCARD,
    /// WATCH, UNWATCH, SELECT.
    Pin,
    /// Always blocks on the server: BLPOP BRPOP BLMOVE BRPOPLPUSH BZPOPMIN BZPOPMAX BLMPOP
    /// BZMPOP WAIT WAITAOF. (XREAD/XREADGROUP block only with BLOCK: see [`is_blocking`].)
    Blocking,
    /// The connection becomes a raw pipe: (P|S)SUBSCRIBE, the UNSUBSCRIBE family when sent
    /// first, MONITOR, SYNC, PSYNC, REPLCONF.
    Tunnel,
}

/// Whether a command's reply may be served from the proxy's cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cacheable {
    No,
    /// A read-only command on one key whose reply depends only on that key's value.
    SingleKeyRead,
    /// MGET: cacheable per key.
    Mget,
}

/// Where a command's keys are, as argument indices (`args[0]` is the command name).
#[derive(Debug, Clone, Copy)]
pub enum KeySpec {
    /// No keys.
    None,
    /// Keys at `first`, `first + step`, ... up to `last`; a negative `last` counts from the
    /// end (`-1` = last argument, `-2` = the one before). Redis's legacy key spec.
    Range {
        first: usize,
        last: isize,
        step: usize,
    },
    /// `args[numkeys_index]` is a key count `n`; keys are `args[first..first + n]`, plus
    /// `args[dest]` if set (ZUNIONSTORE's destination).
    NumKeys {
        dest: Option<usize>,
        numkeys_index: usize,
        first: usize,
    },
    /// XREAD / XREADGROUP: the first half of the arguments after the `STREAMS` option.
    Streams,
    /// Keys that only a parser of the options can find (SORT, GEORADIUS, MIGRATE).
    Custom(fn(Args<'_>, &mut KeyIndices)),
    /// A container: keys are those of the subcommand ([`SubcommandSpec::keys`]).
    Subcommand,
}

/// One top-level command.
#[derive(Debug)]
pub struct CommandSpec {
    /// Canonical lowercase name, as in `COMMAND INFO`.
    pub name: &'static str,
    /// Dense index into [`COMMANDS`], for per-command metric arrays.
    pub id: usize,
    /// As Redis: positive = exact argument count including the name, negative = at least
    /// `-arity`.
    pub arity: i32,
    /// Static flags: what *may* hold for any call. See [`effective_flags`] for one call.
    pub flags: Flags,
    pub keys: KeySpec,
    /// Upper bound on cacheability; [`cacheable`] decides per call.
    pub cache: Cacheable,
    pub route: Route,
    /// Non-empty exactly for containers ([`Flags::CONTAINER`]).
    pub subcommands: &'static [SubcommandSpec],
}

impl CommandSpec {
    /// Whether `argc` arguments (name included) satisfy the arity.
    pub fn arity_ok(&self, argc: usize) -> bool {
        arity_ok(self.arity, argc)
    }

    #[cfg(test)]
    pub fn is_container(&self) -> bool {
        !self.subcommands.is_empty()
    }

    const fn with_subcommands(mut self, subs: &'static [SubcommandSpec]) -> CommandSpec {
        self.subcommands = subs;
        self
    }
}

/// One subcommand of a container (`OBJECT ENCODING`, `XGROUP CREATE` ...).
#[derive(Debug)]
pub struct SubcommandSpec {
    /// Lowercase subcommand name without the container (`"encoding"`).
    pub name: &'static str,
    /// Counts the container name and the subcommand, as Redis does (`OBJECT ENCODING k` = 3).
    /// Mirrors `COMMAND INFO`; only the table's own tests read it.
    #[cfg_attr(not(test), allow(dead_code))]
    pub arity: i32,
    pub flags: Flags,
    /// Never [`KeySpec::Subcommand`].
    pub keys: KeySpec,
}

fn arity_ok(arity: i32, argc: usize) -> bool {
    let need = arity.unsigned_abs() as usize;
    if arity >= 0 {
        argc == need
    } else {
        argc >= need
    }
}

const fn cmd(
    name: &'static str,
    arity: i32,
    flags: Flags,
    keys: KeySpec,
    cache: Cacheable,
    route: Route,
) -> CommandSpec {
    CommandSpec {
        name,
        id: 0,
        arity,
        flags,
        keys,
        cache,
        route,
        subcommands: &[],
    }
}

const fn sub(name: &'static str, arity: i32, flags: Flags, keys: KeySpec) -> SubcommandSpec {
    SubcommandSpec {
        name,
        arity,
        flags,
        keys,
    }
}

const NO_KEYS: KeySpec = KeySpec::None;
const KEY1: KeySpec = KeySpec::Range {
    first: 1,
    last: 1,
    step: 1,
};
const SUBCMD: KeySpec = KeySpec::Subcommand;
const STREAMS: KeySpec = KeySpec::Streams;

const fn range(first: usize, last: isize, step: usize) -> KeySpec {
    KeySpec::Range { first, last, step }
}

const fn numkeys(numkeys_index: usize, first: usize) -> KeySpec {
    KeySpec::NumKeys {
        dest: None,
        numkeys_index,
        first,
    }
}

/// ZUNIONSTORE / ZINTERSTORE / ZDIFFSTORE: `dest numkeys key...`.
const fn store_numkeys() -> KeySpec {
    KeySpec::NumKeys {
        dest: Some(1),
        numkeys_index: 2,
        first: 3,
    }
}

// ---------------------------------------------------------------------------------------
// Lookup
// ---------------------------------------------------------------------------------------

/// Every top-level command of Redis 7.2, sorted by name; `COMMANDS[i].id == i`.
pub static COMMANDS: &[CommandSpec] = &TABLE;

/// Finds a command by name, ignoring ASCII case. No allocation; one hash of the name and
/// usually one comparison.
pub fn lookup(name: &[u8]) -> Option<&'static CommandSpec> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return None;
    }
    let mut slot = fold_hash(name) as usize & INDEX_MASK;
    loop {
        let i = INDEX[slot];
        if i == EMPTY_SLOT {
            return None;
        }
        let spec = &TABLE[i as usize];
        // The table's names are lower case: only the request's need folding.
        if spec.name.len() == name.len()
            && spec
                .name
                .bytes()
                .zip(name)
                .all(|(a, &b)| a == b.to_ascii_lowercase())
        {
            return Some(spec);
        }
        slot = (slot + 1) & INDEX_MASK;
    }
}

/// The subcommand argument (`args[1]`) of a container command, if present.
pub fn subcommand(args: Args<'_>) -> Option<&[u8]> {
    args.get(1)
}

/// The subcommand spec of a container call (`OBJECT ENCODING k` -> `encoding`), ignoring
/// ASCII case. `None` for non-containers, a missing subcommand or an unknown one.
pub fn lookup_subcommand(spec: &CommandSpec, args: Args<'_>) -> Option<&'static SubcommandSpec> {
    let subcommands: &'static [SubcommandSpec] = spec.subcommands;
    let name = subcommand(args)?;
    subcommands
        .iter()
        .find(|s| s.name.as_bytes().eq_ignore_ascii_case(name))
}

// Open addressing with linear probing over a power-of-two table under a quarter full: every
// name is found within a few probes (checked by a test) and a miss ends at an empty slot.
const INDEX_SIZE: usize = 1024;
const INDEX_MASK: usize = INDEX_SIZE - 1;
const EMPTY_SLOT: u16 = u16::MAX;
static INDEX: [u16; INDEX_SIZE] = build_index();
const MAX_NAME_LEN: usize = max_name_len();

const _: () = assert!(TABLE.len() * 4 <= INDEX_SIZE);

/// FNV-1a over the bytes with bit 5 set, so lookups need no lowercased copy of the name:
/// that lowercases a letter without a branch, and only picks the slot (a name is then
/// compared in full).
const fn fold_hash(name: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    let mut i = 0;
    while i < name.len() {
        h ^= (name[i] | 0x20) as u32;
        h = h.wrapping_mul(0x0100_0193);
        i += 1;
    }
    // FNV's low bits, the ones the mask keeps, mix poorly on short names: finalise.
    h ^= h >> 16;
    h = h.wrapping_mul(0x7feb_352d);
    h ^ (h >> 15)
}

const fn build_index() -> [u16; INDEX_SIZE] {
    let mut index = [EMPTY_SLOT; INDEX_SIZE];
    let mut i = 0;
    while i < TABLE.len() {
        let mut slot = fold_hash(TABLE[i].name.as_bytes()) as usize & INDEX_MASK;
        while index[slot] != EMPTY_SLOT {
            slot = (slot + 1) & INDEX_MASK;
        }
        index[slot] = i as u16;
        i += 1;
    }
    index
}

const fn max_name_len() -> usize {
    let mut max = 0;
    let mut i = 0;
    while i < TABLE.len() {
        if TABLE[i].name.len() > max {
            max = TABLE[i].name.len();
        }
        i += 1;
    }
    max
}

const fn assign_ids<const N: usize>(mut table: [CommandSpec; N]) -> [CommandSpec; N] {
    let mut i = 0;
    while i < N {
        table[i].id = i;
        i += 1;
    }
    table
}

const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Id of a command known to be in the table; a typo fails the build.
const fn id_of(name: &str) -> usize {
    let mut i = 0;
    while i < TABLE.len() {
        if str_eq(TABLE[i].name, name) {
            return i;
        }
        i += 1;
    }
    panic!("command missing from TABLE")
}

/// Commands that may legitimately keep Redis's one thread busy past the health probe's
/// timeout: scripts and functions, `KEYS`, `DEBUG` (`SLEEP`), `SORT`, set and sorted-set
/// algebra, whole-collection reads (`LRANGE`, `HGETALL`, `SMEMBERS`, `ZRANGE`, `XRANGE` of
/// big keys), geo searches, bit scans, synchronous flushes and `SAVE`. While one of these
/// waits on Redis, a silent health probe is not taken for a frozen server (see
/// `upstream::probe`). Narrower than "not flagged `FAST`": Redis leaves `SET`, `MSET`,
/// `DEL` and friends unflagged too, and with those in flight at all times (any write-heavy
/// application) a frozen Redis would be noticed only at the command timeout. `DEL` of a huge
/// key is the case left out; `UNLINK` is Redis's own answer to it.
#[rustfmt::skip]
pub const LONG_RUNNING: &[&str] = &[
    "eval", "eval_ro", "evalsha", "evalsha_ro", "fcall", "fcall_ro",
    "keys", "debug", "sort", "sort_ro",
    "sunion", "sunionstore", "sinter", "sinterstore", "sintercard", "sdiff", "sdiffstore",
    "smembers",
    "zunion", "zunionstore", "zinter", "zinterstore", "zintercard", "zdiff", "zdiffstore",
    "zrange", "zrangestore", "zrangebyscore", "zrevrangebyscore", "zrangebylex",
    "zrevrangebylex", "zrevrange",
    "lrange", "lrem", "lpos", "hgetall", "hkeys", "hvals", "xrange", "xrevrange",
    "georadius", "georadius_ro", "georadiusbymember", "georadiusbymember_ro", "geosearch",
    "geosearchstore",
    "bitcount", "bitpos", "bitop",
    "flushall", "flushdb", "save", "migrate", "restore", "copy", "memory",
];

static LONG_RUNNING_BY_ID: [bool; TABLE.len()] = {
    let mut by_id = [false; TABLE.len()];
    let mut i = 0;
    while i < LONG_RUNNING.len() {
        by_id[id_of(LONG_RUNNING[i])] = true;
        i += 1;
    }
    by_id
};

// Commands whose flags or keys depend on their options.
const SORT: usize = id_of("sort");
const GEORADIUS: usize = id_of("georadius");
const GEORADIUSBYMEMBER: usize = id_of("georadiusbymember");
const XREAD: usize = id_of("xread");
const XREADGROUP: usize = id_of("xreadgroup");

// ---------------------------------------------------------------------------------------
// Key extraction
// ---------------------------------------------------------------------------------------

/// How many key indices [`KeyIndices`] holds before it allocates: enough for an MGET of
/// ten keys.
pub const INLINE_KEYS: usize = 12;

/// Argument indices of a command's keys, in argument order. Inline up to [`INLINE_KEYS`],
/// a `Vec` beyond (MSET with thousands of keys).
///
/// Every request's classification carries one, moved from the parser down to the send
/// and into a write's reply effect: 32-bit indices (an argument count stays below 2^31,
/// `max_array_len`) and the inline room shared with the spill keep it at 56 bytes, where
/// `usize` indices and a separate spill took 96.
#[derive(Clone)]
pub struct KeyIndices(Indices);

#[derive(Clone)]
enum Indices {
    Inline { len: u8, at: [u32; INLINE_KEYS] },
    Spill(Vec<u32>),
}

impl KeyIndices {
    pub const fn new() -> KeyIndices {
        KeyIndices(Indices::Inline {
            len: 0,
            at: [0; INLINE_KEYS],
        })
    }

    /// Adds argument `index`; never past an argument count, so it fits 32 bits.
    #[inline]
    pub fn push(&mut self, index: usize) {
        let index = index as u32;
        match &mut self.0 {
            Indices::Inline { len, at } if usize::from(*len) < INLINE_KEYS => {
                at[usize::from(*len)] = index;
                *len += 1;
            }
            Indices::Inline { at, .. } => {
                let mut spill = Vec::with_capacity(INLINE_KEYS * 2);
                spill.extend_from_slice(at);
                spill.push(index);
                self.0 = Indices::Spill(spill);
            }
            Indices::Spill(spill) => spill.push(index),
        }
    }

    /// Lets a caller that knows the count avoid repeated growth of the spill.
    #[inline]
    fn reserve(&mut self, additional: usize) {
        let total = self.len().saturating_add(additional);
        if total <= INLINE_KEYS {
            return;
        }
        match &mut self.0 {
            Indices::Inline { len, at } => {
                let mut spill = Vec::with_capacity(total);
                spill.extend_from_slice(&at[..usize::from(*len)]);
                self.0 = Indices::Spill(spill);
            }
            Indices::Spill(spill) => spill.reserve(total - spill.len()),
        }
    }

    pub fn as_slice(&self) -> &[u32] {
        match &self.0 {
            Indices::Inline { len, at } => &at[..usize::from(*len)],
            Indices::Spill(spill) => spill,
        }
    }

    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn first(&self) -> Option<usize> {
        self.as_slice().first().map(|&i| i as usize)
    }

    pub fn iter(&self) -> KeyIter<'_> {
        self.as_slice().iter().map(|&i| i as usize)
    }
}

/// The indices of [`KeyIndices`], as `usize`.
pub type KeyIter<'a> = std::iter::Map<std::slice::Iter<'a, u32>, fn(&u32) -> usize>;

impl<'a> IntoIterator for &'a KeyIndices {
    type Item = usize;
    type IntoIter = KeyIter<'a>;
    fn into_iter(self) -> KeyIter<'a> {
        self.iter()
    }
}

impl Default for KeyIndices {
    fn default() -> Self {
        KeyIndices::new()
    }
}

impl fmt::Debug for KeyIndices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

impl PartialEq for KeyIndices {
    fn eq(&self, other: &KeyIndices) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for KeyIndices {}

/// Argument indices of the keys of one call (`args[0]` is the command name).
///
/// Complete for writes, so the caller can invalidate by them: DEL/UNLINK all keys, MSET
/// every other argument, both keys of RENAME/SMOVE/LMOVE/COPY, destination and sources of
/// the *STORE commands and BITOP, declared keys of EVAL/FCALL, `STORE` destinations of SORT
/// and GEORADIUS, MIGRATE's key or `KEYS` list. For SSUBSCRIBE/SUNSUBSCRIBE/SPUBLISH the
/// indices are shard channels, which hash like keys (Redis's `COMMAND GETKEYS` omits them).
///
/// Never panics: on short or malformed arguments it returns the keys that are present, and
/// every index is `< args.len()`.
pub fn key_indices(spec: &CommandSpec, args: Args<'_>) -> KeyIndices {
    let mut out = KeyIndices::new();
    match spec.keys {
        KeySpec::Subcommand => {
            if let Some(sub) = lookup_subcommand(spec, args) {
                collect_keys(sub.keys, args, &mut out);
            }
        }
        keys => collect_keys(keys, args, &mut out),
    }
    out
}

fn collect_keys(keys: KeySpec, args: Args<'_>, out: &mut KeyIndices) {
    match keys {
        // A subcommand table never nests containers.
        KeySpec::None | KeySpec::Subcommand => {}
        KeySpec::Range { first, last, step } => push_range(args.len(), first, last, step, out),
        KeySpec::NumKeys {
            dest,
            numkeys_index,
            first,
        } => {
            if let Some(dest) = dest
                && dest < args.len()
            {
                out.push(dest);
            }
            let Some(n) = args.get(numkeys_index).and_then(parse_count) else {
                return;
            };
            let end = first.saturating_add(n).min(args.len());
            if first < end {
                out.reserve(end - first);
                for i in first..end {
                    out.push(i);
                }
            }
        }
        KeySpec::Streams => {
            let opts = xread_options(args);
            if let Some(pos) = opts.streams {
                // Keys and IDs pair up; an odd tail is Redis's error to report.
                let n = (args.len() - pos - 1) / 2;
                out.reserve(n);
                for i in pos + 1..pos + 1 + n {
                    out.push(i);
                }
            }
        }
        KeySpec::Custom(find) => find(args, out),
    }
}

fn push_range(argc: usize, first: usize, last: isize, step: usize, out: &mut KeyIndices) {
    if first == 0 || argc <= first {
        return;
    }
    let last = if last < 0 {
        match argc.checked_sub(last.unsigned_abs()) {
            Some(l) => l,
            None => return,
        }
    } else {
        (last as usize).min(argc - 1)
    };
    if last < first {
        return;
    }
    let step = step.max(1);
    out.reserve((last - first) / step + 1);
    let mut i = first;
    while i <= last {
        out.push(i);
        i += step;
    }
}

/// A non-negative decimal count. Overflow saturates (the caller clamps to `args.len()`);
/// anything else is not a count.
fn parse_count(arg: &[u8]) -> Option<usize> {
    if arg.is_empty() {
        return None;
    }
    let mut n: usize = 0;
    for &b in arg {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.saturating_mul(10).saturating_add((b - b'0') as usize);
    }
    Some(n)
}

fn is_token(arg: &[u8], token: &[u8]) -> bool {
    arg.eq_ignore_ascii_case(token)
}

struct XreadOptions {
    /// Index of the `STREAMS` token.
    streams: Option<usize>,
    block: bool,
}

/// Walks XREAD/XREADGROUP options the way Redis does, skipping each option's values, so a
/// group, consumer or stream named "block" or "streams" is not taken for the option.
fn xread_options(args: Args<'_>) -> XreadOptions {
    let mut opts = XreadOptions {
        streams: None,
        block: false,
    };
    let mut i = 1;
    while i < args.len() {
        let a = &args[i][..];
        if is_token(a, b"STREAMS") {
            opts.streams = Some(i);
            break;
        } else if is_token(a, b"BLOCK") {
            opts.block = true;
            i += 2;
        } else if is_token(a, b"COUNT") {
            i += 2;
        } else if is_token(a, b"GROUP") {
            i += 3;
        } else if is_token(a, b"NOACK") {
            i += 1;
        } else {
            // Syntax error: Redis will reject the call without reading or blocking.
            break;
        }
    }
    if opts.streams.is_none() {
        opts.block = false;
    }
    opts
}

/// SORT's `STORE` destination, found as Redis's `sortGetKeys` does: skip LIMIT's two values
/// and BY/GET's pattern, and let the last STORE win.
fn sort_store_index(args: Args<'_>) -> Option<usize> {
    let mut store = None;
    let mut i = 2;
    while i < args.len() {
        let a = &args[i][..];
        if is_token(a, b"LIMIT") {
            i += 2;
        } else if is_token(a, b"GET") || is_token(a, b"BY") {
            i += 1;
        } else if is_token(a, b"STORE") && i + 1 < args.len() {
            store = Some(i + 1);
        }
        i += 1;
    }
    store
}

fn sort_keys(args: Args<'_>, out: &mut KeyIndices) {
    if args.len() > 1 {
        out.push(1);
    }
    if let Some(store) = sort_store_index(args) {
        out.push(store);
    }
}

/// GEORADIUS(BYMEMBER)'s `STORE`/`STOREDIST` destination; options start at `first_option`.
/// As in Redis's parser, COUNT's value is skipped and the last STORE/STOREDIST wins.
fn geo_store_index(args: Args<'_>, first_option: usize) -> Option<usize> {
    let mut store = None;
    let mut i = first_option;
    while i < args.len() {
        let a = &args[i][..];
        if is_token(a, b"COUNT") {
            i += 1;
        } else if (is_token(a, b"STORE") || is_token(a, b"STOREDIST")) && i + 1 < args.len() {
            store = Some(i + 1);
            i += 1;
        }
        i += 1;
    }
    store
}

/// GEORADIUS key longitude latitude radius unit [options]: options from index 6.
const GEORADIUS_FIRST_OPTION: usize = 6;
/// GEORADIUSBYMEMBER key member radius unit [options]: options from index 5.
const GEORADIUSBYMEMBER_FIRST_OPTION: usize = 5;

fn georadius_keys(args: Args<'_>, out: &mut KeyIndices) {
    geo_keys(args, GEORADIUS_FIRST_OPTION, out)
}

fn georadiusbymember_keys(args: Args<'_>, out: &mut KeyIndices) {
    geo_keys(args, GEORADIUSBYMEMBER_FIRST_OPTION, out)
}

fn geo_keys(args: Args<'_>, first_option: usize, out: &mut KeyIndices) {
    if args.len() > 1 {
        out.push(1);
    }
    if let Some(store) = geo_store_index(args, first_option) {
        out.push(store);
    }
}

/// MIGRATE host port key|"" destination-db timeout [COPY] [REPLACE] [AUTH pw | AUTH2 user pw]
/// [KEYS key...]: the single key at 3, or every argument after KEYS (as Redis's
/// `migrateGetKeys`, which returns nothing when both are given: the call is an error).
fn migrate_keys(args: Args<'_>, out: &mut KeyIndices) {
    const KEY: usize = 3;
    const FIRST_OPTION: usize = 6;
    if args.len() <= KEY {
        return;
    }
    let mut i = FIRST_OPTION;
    while i < args.len() {
        let a = &args[i][..];
        if is_token(a, b"KEYS") {
            if args[KEY].is_empty() {
                out.reserve(args.len() - i - 1);
                for k in i + 1..args.len() {
                    out.push(k);
                }
            }
            return;
        } else if is_token(a, b"AUTH") {
            i += 1;
        } else if is_token(a, b"AUTH2") {
            i += 2;
        }
        i += 1;
    }
    out.push(KEY);
}

// ---------------------------------------------------------------------------------------
// Per-call classification
// ---------------------------------------------------------------------------------------

/// The flags of this call: the subcommand's for containers (joined with the container's),
/// `READ` instead of `WRITE` for SORT/GEORADIUS without STORE, no `BLOCKING` for XREAD /
/// XREADGROUP without BLOCK; the static flags otherwise.
pub fn effective_flags(spec: &CommandSpec, args: Args<'_>) -> Flags {
    if spec.flags.contains(Flags::CONTAINER) {
        return match lookup_subcommand(spec, args) {
            Some(sub) => spec.flags | sub.flags,
            None => spec.flags,
        };
    }
    let read_only = |f: Flags| f.difference(Flags::WRITE | Flags::DENYOOM) | Flags::READ;
    match spec.id {
        SORT if sort_store_index(args).is_none() => read_only(spec.flags),
        GEORADIUS if geo_store_index(args, GEORADIUS_FIRST_OPTION).is_none() => {
            read_only(spec.flags)
        }
        GEORADIUSBYMEMBER if geo_store_index(args, GEORADIUSBYMEMBER_FIRST_OPTION).is_none() => {
            read_only(spec.flags)
        }
        XREAD | XREADGROUP if !xread_options(args).block => spec.flags.difference(Flags::BLOCKING),
        _ => spec.flags,
    }
}

/// True if this call may modify the keyspace. EVAL/EVALSHA/FCALL count as writes,
/// their `_RO` variants as reads; SORT and GEORADIUS(BYMEMBER) only with STORE.
#[cfg(test)]
pub fn is_write(spec: &CommandSpec, args: Args<'_>) -> bool {
    effective_flags(spec, args).contains(Flags::WRITE)
}

/// True if this call reads the keyspace without writing. Commands that touch no data
/// (PING, CONFIG GET ...) are neither reads nor writes.
#[cfg(test)]
pub fn is_read(spec: &CommandSpec, args: Args<'_>) -> bool {
    let flags = effective_flags(spec, args);
    flags.contains(Flags::READ) && !flags.contains(Flags::WRITE)
}

/// True if this call may block on the server: the [`Route::Blocking`] commands, and
/// XREAD/XREADGROUP with a BLOCK option. Nothing else.
pub fn is_blocking(spec: &CommandSpec, args: Args<'_>) -> bool {
    match spec.route {
        Route::Blocking => true,
        _ => matches!(spec.id, XREAD | XREADGROUP) && xread_options(args).block,
    }
}

/// Whether this call's reply may be cached: `No` unless the command is cacheable, the
/// arity holds, and (for `SingleKeyRead`) it names exactly one key, so `EXISTS a` and
/// `PFCOUNT a` are cacheable but `EXISTS a b` is not.
#[cfg(test)]
pub fn cacheable(spec: &CommandSpec, args: Args<'_>) -> Cacheable {
    if !spec.arity_ok(args.len()) {
        return Cacheable::No;
    }
    match spec.cache {
        Cacheable::No => Cacheable::No,
        Cacheable::Mget => Cacheable::Mget,
        Cacheable::SingleKeyRead => {
            if key_indices(spec, args).as_slice() == [1] {
                Cacheable::SingleKeyRead
            } else {
                Cacheable::No
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// One classification per request
// ---------------------------------------------------------------------------------------

/// Ids of the commands redfuse treats specially, checked against the table at compile time.
/// Code outside this module dispatches on these, never on names.
pub mod ids {
    use super::id_of;

    pub const AUTH: usize = id_of("auth");
    pub const CLIENT: usize = id_of("client");
    pub const COPY: usize = id_of("copy");
    pub const DEL: usize = id_of("del");
    pub const DISCARD: usize = id_of("discard");
    pub const ECHO: usize = id_of("echo");
    pub const EXEC: usize = id_of("exec");
    pub const EXPIRE: usize = id_of("expire");
    pub const EXPIREAT: usize = id_of("expireat");
    pub const FLUSHALL: usize = id_of("flushall");
    pub const FLUSHDB: usize = id_of("flushdb");
    pub const FUNCTION: usize = id_of("function");
    pub const GETDEL: usize = id_of("getdel");
    pub const GETEX: usize = id_of("getex");
    pub const HELLO: usize = id_of("hello");
    pub const HMSET: usize = id_of("hmset");
    pub const HSET: usize = id_of("hset");
    pub const MOVE: usize = id_of("move");
    pub const MULTI: usize = id_of("multi");
    pub const PERSIST: usize = id_of("persist");
    pub const PEXPIRE: usize = id_of("pexpire");
    pub const PEXPIREAT: usize = id_of("pexpireat");
    pub const PING: usize = id_of("ping");
    pub const PSETEX: usize = id_of("psetex");
    pub const QUIT: usize = id_of("quit");
    pub const RESET: usize = id_of("reset");
    pub const SCRIPT: usize = id_of("script");
    pub const SELECT: usize = id_of("select");
    pub const SET: usize = id_of("set");
    pub const SETEX: usize = id_of("setex");
    pub const SHUTDOWN: usize = id_of("shutdown");
    pub const SWAPDB: usize = id_of("swapdb");
    pub const UNLINK: usize = id_of("unlink");
    pub const UNWATCH: usize = id_of("unwatch");
    pub const WAIT: usize = id_of("wait");
    pub const WAITAOF: usize = id_of("waitaof");
    pub const WATCH: usize = id_of("watch");
}

/// Everything redfuse needs to know about one request, worked out once when it is read and
/// handed down with it: the session routes on it, degraded mode answers from it, the cache
/// plans fills and invalidations from it.
#[derive(Debug, Clone)]
pub struct Classified {
    /// `None` for a command the table does not know (a module's, a newer Redis's).
    pub spec: Option<&'static CommandSpec>,
    /// The spec's id, or [`UNKNOWN`] for commands the table does not know.
    pub id: usize,
    pub route: Route,
    /// May modify the keyspace (unknown commands count as writes: invalidating is safe).
    pub write: bool,
    /// Reads the keyspace and writes nothing.
    pub read: bool,
    /// May block on the server.
    pub blocking: bool,
    pub cacheable: Cacheable,
    /// Argument indices of the keys; for an unknown command, its first argument.
    pub keys: KeyIndices,
}

/// The id given to commands the table does not know; one past the last table id, so
/// per-command metric arrays can have a row for them.
pub const UNKNOWN: usize = TABLE.len();

/// The name of the command with this id (`"unknown"` for [`UNKNOWN`]).
pub fn name_of(id: usize) -> &'static str {
    TABLE.get(id).map_or("unknown", |s| s.name)
}

impl Classified {
    pub fn name(&self) -> &'static str {
        name_of(self.id)
    }

    pub fn is(&self, id: usize) -> bool {
        self.id == id
    }

    /// Slow by nature: it may keep Redis's one thread busy for seconds (see
    /// [`LONG_RUNNING`]), or redfuse does not know it (a module command may).
    pub fn slow(&self) -> bool {
        self.spec.is_none_or(|s| LONG_RUNNING_BY_ID[s.id])
    }
}

/// Classifies a request by its arguments (`args[0]` is the name).
pub fn classify(args: Args<'_>) -> Classified {
    let Some(spec) = args.first().and_then(|n| lookup(n)) else {
        let mut keys = KeyIndices::new();
        if args.len() > 1 {
            keys.push(1);
        }
        return Classified {
            spec: None,
            id: UNKNOWN,
            route: Route::Shared,
            write: true,
            read: false,
            blocking: false,
            cacheable: Cacheable::No,
            keys,
        };
    };
    let flags = effective_flags(spec, args);
    let keys = key_indices(spec, args);
    let cacheable = match spec.cache {
        _ if !spec.arity_ok(args.len()) => Cacheable::No,
        Cacheable::SingleKeyRead if keys.as_slice() != [1] => Cacheable::No,
        c => c,
    };
    Classified {
        spec: Some(spec),
        id: spec.id,
        route: spec.route,
        write: flags.contains(Flags::WRITE),
        read: flags.contains(Flags::READ) && !flags.contains(Flags::WRITE),
        blocking: is_blocking(spec, args),
        cacheable,
        keys,
    }
}

/// What Redis answers to a cacheable read of a key that does not exist; what a degraded
/// read that misses the cache answers unless a pattern configures otherwise. `None` for
/// commands that are not cacheable reads.
///
/// Every cached read carries its answer with it (`effect::DegradedRead`), so it is looked
/// up by id: matching the name against each command's in turn cost more than the rest of
/// planning the read's fill.
pub fn absent_reply(id: usize, args: Args<'_>) -> Option<crate::resp::reply::Absent> {
    use crate::resp::reply::Absent;
    match ABSENT_BY_ID.get(id)? {
        AbsentRule::None => None,
        AbsentRule::Fixed(absent) => Some(*absent),
        AbsentRule::FromArgs => {
            let after_key = args.len().saturating_sub(2);
            let with = |opt: &[u8]| args.iter().skip(2).any(|a| a.eq_ignore_ascii_case(opt));
            Some(match TABLE[id].name {
                "zrank" | "zrevrank" if with(b"WITHSCORE") => Absent::NullArray,
                "zrank" | "zrevrank" => Absent::Nil,
                "lpos" if with(b"COUNT") => Absent::EmptyArray,
                "lpos" => Absent::Nil,
                "bitpos" => match args.get(2) {
                    Some(b"1") => Absent::Integer(-1),
                    _ => Absent::Integer(0),
                },
                "hmget" | "zmscore" | "geohash" => Absent::Nils(after_key),
                "geopos" => Absent::NullArrays(after_key),
                "smismember" => Absent::Zeros(after_key),
                _ => return None,
            })
        }
    }
}

/// How [`absent_reply`] finds a command's answer.
#[derive(Clone, Copy)]
enum AbsentRule {
    /// Not a cacheable read.
    None,
    Fixed(crate::resp::reply::Absent),
    /// Depends on the arguments: [`absent_reply`] names each such command.
    FromArgs,
}

/// The commands whose absent reply is always the same.
#[rustfmt::skip]
const ABSENT_FIXED: &[(&str, crate::resp::reply::Absent)] = {
    use crate::resp::reply::Absent::{EmptyArray, EmptyBulk, EmptyMap, EmptySet, Integer, Nil, Status};
    &[
        ("get", Nil), ("hget", Nil), ("lindex", Nil), ("zscore", Nil), ("geodist", Nil),
        ("bitcount", Integer(0)), ("exists", Integer(0)), ("getbit", Integer(0)),
        ("hexists", Integer(0)), ("hlen", Integer(0)), ("hstrlen", Integer(0)),
        ("llen", Integer(0)), ("pfcount", Integer(0)), ("scard", Integer(0)),
        ("sismember", Integer(0)), ("strlen", Integer(0)), ("xlen", Integer(0)),
        ("zcard", Integer(0)), ("zcount", Integer(0)), ("zlexcount", Integer(0)),
        ("getrange", EmptyBulk), ("substr", EmptyBulk),
        ("type", Status("none")),
        ("hgetall", EmptyMap),
        ("smembers", EmptySet),
        ("hkeys", EmptyArray), ("hvals", EmptyArray), ("lrange", EmptyArray),
        ("xrange", EmptyArray), ("xrevrange", EmptyArray), ("zrange", EmptyArray),
        ("zrangebylex", EmptyArray), ("zrangebyscore", EmptyArray), ("zrevrange", EmptyArray),
        ("zrevrangebylex", EmptyArray), ("zrevrangebyscore", EmptyArray),
    ]
};

/// The commands whose absent reply depends on their arguments (see [`absent_reply`]).
const ABSENT_FROM_ARGS: &[&str] = &[
    "zrank",
    "zrevrank",
    "lpos",
    "bitpos",
    "hmget",
    "zmscore",
    "geohash",
    "geopos",
    "smismember",
];

static ABSENT_BY_ID: [AbsentRule; TABLE.len()] = {
    let mut by_id = [AbsentRule::None; TABLE.len()];
    let mut i = 0;
    while i < ABSENT_FIXED.len() {
        by_id[id_of(ABSENT_FIXED[i].0)] = AbsentRule::Fixed(ABSENT_FIXED[i].1);
        i += 1;
    }
    let mut i = 0;
    while i < ABSENT_FROM_ARGS.len() {
        by_id[id_of(ABSENT_FROM_ARGS[i])] = AbsentRule::FromArgs;
        i += 1;
    }
    by_id
};

// ---------------------------------------------------------------------------------------
// The table
// ---------------------------------------------------------------------------------------

use Cacheable::{Mget, No, SingleKeyRead};
use Route::{Blocking, Local, Pin, Shared, Tunnel};

#[rustfmt::skip]
static TABLE: [CommandSpec; 241] = assign_ids([
    cmd("acl", -2, f!(CONTAINER), SUBCMD, No, Shared).with_subcommands(ACL_SUBS),
    cmd("append", 3, f!(WRITE | DENYOOM | FAST), KEY1, No, Shared),
    cmd("asking", 1, f!(FAST), NO_KEYS, No, Local),
    cmd("auth", -2, f!(NOSCRIPT | LOADING_OK | STALE_OK | FAST | NO_AUTH | ALLOW_BUSY), NO_KEYS, No, Local),
    cmd("bgrewriteaof", 1, f!(ADMIN | NOSCRIPT | NO_ASYNC_LOADING), NO_KEYS, No, Shared),
    cmd("bgsave", -1, f!(ADMIN | NOSCRIPT | NO_ASYNC_LOADING), NO_KEYS, No, Shared),
    cmd("bitcount", -2, f!(READ), KEY1, SingleKeyRead, Shared),
    cmd("bitfield", -2, f!(WRITE | DENYOOM), KEY1, No, Shared),
    cmd("bitfield_ro", -2, f!(READ | FAST), KEY1, No, Shared),
    cmd("bitop", -4, f!(WRITE | DENYOOM), range(2, -1, 1), No, Shared),
    cmd("bitpos", -3, f!(READ), KEY1, SingleKeyRead, Shared),
    cmd("blmove", 6, f!(WRITE | DENYOOM | NOSCRIPT | BLOCKING), range(1, 2, 1), No, Blocking),
    cmd("blmpop", -5, f!(WRITE | BLOCKING | MOVABLE_KEYS), numkeys(2, 3), No, Blocking),
    cmd("blpop", -3, f!(WRITE | NOSCRIPT | BLOCKING), range(1, -2, 1), No, Blocking),
    cmd("brpop", -3, f!(WRITE | NOSCRIPT | BLOCKING), range(1, -2, 1), No, Blocking),
    cmd("brpoplpush", 4, f!(WRITE | DENYOOM | NOSCRIPT | BLOCKING), range(1, 2, 1), No, Blocking),
    cmd("bzmpop", -5, f!(WRITE | BLOCKING | MOVABLE_KEYS), numkeys(2, 3), No, Blocking),
    cmd("bzpopmax", -3, f!(WRITE | NOSCRIPT | BLOCKING | FAST), range(1, -2, 1), No, Blocking),
    cmd("bzpopmin", -3, f!(WRITE | NOSCRIPT | BLOCKING | FAST), range(1, -2, 1), No, Blocking),
    cmd("client", -2, f!(TIME_DEPENDENT | CONTAINER), SUBCMD, No, Local).with_subcommands(CLIENT_SUBS),
    cmd("cluster", -2, f!(RANDOM | CONTAINER), SUBCMD, No, Shared).with_subcommands(CLUSTER_SUBS),
    cmd("command", -1, f!(LOADING_OK | STALE_OK | CONTAINER), SUBCMD, No, Shared).with_subcommands(COMMAND_SUBS),
    cmd("config", -2, f!(CONTAINER), SUBCMD, No, Shared).with_subcommands(CONFIG_SUBS),
    cmd("copy", -3, f!(WRITE | DENYOOM), range(1, 2, 1), No, Shared),
    cmd("dbsize", 1, f!(READ | FAST), NO_KEYS, No, Shared),
    cmd("debug", -2, f!(ADMIN | NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS, No, Shared),
    cmd("decr", 2, f!(WRITE | DENYOOM | FAST), KEY1, No, Shared),
    cmd("decrby", 3, f!(WRITE | DENYOOM | FAST), KEY1, No, Shared),
    cmd("del", -2, f!(WRITE), range(1, -1, 1), No, Shared),
    cmd("discard", 1, f!(NOSCRIPT | LOADING_OK | STALE_OK | FAST | ALLOW_BUSY), NO_KEYS, No, Pin),
    cmd("dump", 2, f!(READ | RANDOM), KEY1, No, Shared),
    cmd("echo", 2, f!(LOADING_OK | STALE_OK | FAST), NO_KEYS, No, Local),
    cmd("eval", -3, f!(WRITE | NOSCRIPT | STALE_OK | MAY_REPLICATE | MOVABLE_KEYS | SKIP_MONITOR | NO_MANDATORY_KEYS), numkeys(2, 3), No, Shared),
    cmd("eval_ro", -3, f!(READ | NOSCRIPT | STALE_OK | MOVABLE_KEYS | SKIP_MONITOR | NO_MANDATORY_KEYS), numkeys(2, 3), No, Shared),
    cmd("evalsha", -3, f!(WRITE | NOSCRIPT | STALE_OK | MAY_REPLICATE | MOVABLE_KEYS | SKIP_MONITOR | NO_MANDATORY_KEYS), numkeys(2, 3), No, Shared),
    cmd("evalsha_ro", -3, f!(READ | NOSCRIPT | STALE_OK | MOVABLE_KEYS | SKIP_MONITOR | NO_MANDATORY_KEYS), numkeys(2, 3), No, Shared),
    cmd("exec", 1, f!(NOSCRIPT | LOADING_OK | STALE_OK | SKIP_SLOWLOG), NO_KEYS, No, Pin),
    cmd("exists", -2, f!(READ | FAST), range(1, -1, 1), SingleKeyRead, Shared),
    cmd("expire", -3, f!(WRITE | FAST), KEY1, No, Shared),
    cmd("expireat", -3, f!(WRITE | FAST), KEY1, No, Shared),
    cmd("expiretime", 2, f!(READ | FAST | TIME_DEPENDENT), KEY1, No, Shared),
    cmd("failover", -1, f!(ADMIN | NOSCRIPT | STALE_OK), NO_KEYS, No, Shared),
    cmd("fcall", -3, f!(WRITE | NOSCRIPT | STALE_OK | MAY_REPLICATE | MOVABLE_KEYS | SKIP_MONITOR | NO_MANDATORY_KEYS), numkeys(2, 3), No, Shared),
    cmd("fcall_ro", -3, f!(READ | NOSCRIPT | STALE_OK | MOVABLE_KEYS | SKIP_MONITOR | NO_MANDATORY_KEYS), numkeys(2, 3), No, Shared),
    cmd("flushall", -1, f!(WRITE), NO_KEYS, No, Shared),
    cmd("flushdb", -1, f!(WRITE), NO_KEYS, No, Shared),
    cmd("function", -2, f!(CONTAINER), SUBCMD, No, Shared).with_subcommands(FUNCTION_SUBS),
    cmd("geoadd", -5, f!(WRITE | DENYOOM), KEY1, No, Shared),
    cmd("geodist", -4, f!(READ), KEY1, SingleKeyRead, Shared),
    cmd("geohash", -2, f!(READ), KEY1, SingleKeyRead, Shared),
    cmd("geopos", -2, f!(READ), KEY1, SingleKeyRead, Shared),
    cmd("georadius", -6, f!(WRITE | DENYOOM | MOVABLE_KEYS), KeySpec::Custom(georadius_keys), No, Shared),
    cmd("georadius_ro", -6, f!(READ), KEY1, No, Shared),
    cmd("georadiusbymember", -5, f!(WRITE | DENYOOM | MOVABLE_KEYS), KeySpec::Custom(georadiusbymember_keys), No, Shared),
    cmd("georadiusbymember_ro", -5, f!(READ), KEY1, No, Shared),
    cmd("geosearch", -7, f!(READ), KEY1, No, Shared),
    cmd("geosearchstore", -8, f!(WRITE | DENYOOM), range(1, 2, 1), No, Shared),
    cmd("get", 2, f!(READ | FAST), KEY1, SingleKeyRead, Shared),
    cmd("getbit", 3, f!(READ | FAST), KEY1, SingleKeyRead, Shared),
    cmd("getdel", 2, f!(WRITE | FAST), KEY1, No, Shared),
    cmd("getex", -2, f!(WRITE | FAST), KEY1, No, Shared),
    cmd("getrange", 4, f!(READ), KEY1, SingleKeyRead, Shared),
    cmd("getset", 3, f!(WRITE | DENYOOM | FAST), KEY1, No, Shared),
    cmd("hdel", -3, f!(WRITE | FAST), KEY1, No, Shared),
    cmd("hello", -1, f!(NOSCRIPT | LOADING_OK | STALE_OK | FAST | NO_AUTH | ALLOW_BUSY), NO_KEYS, No, Local),
    cmd("hexists", 3, f!(READ | FAST), KEY1, SingleKeyRead, Shared),
    cmd("hget", 3, f!(READ | FAST), KEY1, SingleKeyRead, Shared),
    cmd("hgetall", 2, f!(READ), KEY1, SingleKeyRead, Shared),
    cmd("hincrby", 4, f!(WRITE | DENYOOM | FAST), KEY1, No, Shared),
    cmd("hincrbyfloat", 4, f!(WRITE | DENYOOM | FAST), KEY1, No, Shared),
    cmd("hkeys", 2, f!(READ), KEY1, SingleKeyRead, Shared),
    cmd("hlen", 2, f!(READ | FAST), KEY1, SingleKeyRead, Shared),
    cmd("hmget", -3, f!(READ | FAST), KEY1, SingleKeyRead, Shared),
    cmd("hmset", -4, f!(WRITE | DENYOOM | FAST), KEY1, No, Shared),
    cmd("hrandfield", -2, f!(READ | RANDOM), KEY1, No, Shared),
    cmd("hscan", -3, f!(READ | RANDOM), KEY1, No, Shared),
    cmd("hset", -4, f!(WRITE | DENYOOM | FAST), KEY1, No, Shared),
    cmd("hsetnx", 4, f!(WRITE | DENYOOM | FAST), KEY1, No, Shared),
    cmd("hstrlen", 3, f!(READ | FAST), KEY1, SingleKeyRead, Shared),
    cmd("hvals", 2, f!(READ), KEY1, SingleKeyRead, Shared),
    cmd("incr", 2, f!(WRITE | DENYOOM | FAST), KEY1, No, Shared),
    cmd("incrby", 3, f!(WRITE | DENYOOM | FAST), KEY1, No, Shared),
    cmd("incrbyfloat", 3, f!(WRITE | DENYOOM | FAST), KEY1, No, Shared),
    cmd("info", -1, f!(LOADING_OK | STALE_OK | RANDOM), NO_KEYS, No, Shared),
    cmd("keys", 2, f!(READ), NO_KEYS, No, Shared),
    cmd("lastsave", 1, f!(LOADING_OK | STALE_OK | FAST | TIME_DEPENDENT), NO_KEYS, No, Shared),
    cmd("latency", -2, f!(TIME_DEPENDENT | CONTAINER), SUBCMD, No, Shared).with_subcommands(LATENCY_SUBS),
    cmd("lcs", -3, f!(READ), range(1, 2, 1), No, Shared),
    cmd("lindex", 3, f!(READ), KEY1, SingleKeyRead, Shared),
    cmd("linsert", 5, f!(WRITE | DENYOOM), KEY1, No, Shared),
    cmd("llen", 2, f!(READ | FAST), KEY1, SingleKeyRead, Shared),
    cmd("lmove", 5, f!(WRITE | DENYOOM), range(1, 2, 1), No, Shared),
    cmd("lmpop", -4, f!(WRITE | MOVABLE_KEYS), numkeys(1, 2), No, Shared),
    cmd("lolwut", -1, f!(READ | FAST), NO_KEYS, No, Shared),
    cmd("lpop", -2, f!(WRITE | FAST), KEY1, No, Shared),
    cmd("lpos", -3, f!(READ), KEY1, SingleKeyRead, Shared),
    cmd("lpush", -3, f!(WRITE | DENYOOM | FAST), KEY1, No, Shared),
    cmd("lpushx", -3, f!(WRITE | DENYOOM | FAST), KEY1, No, Shared),
    cmd("lrange", 4, f!(READ), KEY1, SingleKeyRead, Shared),
    cmd("lrem", 4, f!(WRITE), KEY1, No, Shared),
    cmd("lset", 4, f!(WRITE | DENYOOM), KEY1, No, Shared),
    cmd("ltrim", 4, f!(WRITE), KEY1, No, Shared),
    cmd("memory", -2, f!(RANDOM | CONTAINER), SUBCMD, No, Shared).with_subcommands(MEMORY_SUBS),
    cmd("mget", -2, f!(READ | FAST), range(1, -1, 1), Mget, Shared),
    cmd("migrate", -6, f!(WRITE | RANDOM | MOVABLE_KEYS), KeySpec::Custom(migrate_keys), No, Shared),
    cmd("module", -2, f!(CONTAINER), SUBCMD, No, Shared).with_subcommands(MODULE_SUBS),
    cmd("monitor", 1, f!(ADMIN | NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS, No, Tunnel),
    cmd("move", 3, f!(WRITE | FAST), KEY1, No, Shared),
    cmd("mset", -3, f!(WRITE | DENYOOM), range(1, -1, 2), No, Shared),
    cmd("msetnx", -3, f!(WRITE | DENYOOM), range(1, -1, 2), No, Shared),
    cmd("multi", 1, f!(NOSCRIPT | LOADING_OK | STALE_OK | FAST | ALLOW_BUSY), NO_KEYS, No, Pin),
    cmd("object", -2, f!(TIME_DEPENDENT | CONTAINER), SUBCMD, No, Shared).with_subcommands(OBJECT_SUBS),
    cmd("persist", 2, f!(WRITE | FAST), KEY1, No, Shared),
    cmd("pexpire", -3, f!(WRITE | FAST), KEY1, No, Shared),
    cmd("pexpireat", -3, f!(WRITE | FAST), KEY1, No, Shared),
    cmd("pexpiretime", 2, f!(READ | FAST | TIME_DEPENDENT), KEY1, No, Shared),
    cmd("pfadd", -2, f!(WRITE | DENYOOM | FAST), KEY1, No, Shared),
    cmd("pfcount", -2, f!(READ | MAY_REPLICATE), range(1, -1, 1), SingleKeyRead, Shared),
    cmd("pfdebug", 3, f!(WRITE | DENYOOM | ADMIN), range(2, 2, 1), No, Shared),
    cmd("pfmerge", -2, f!(WRITE | DENYOOM), range(1, -1, 1), No, Shared),
    cmd("pfselftest", 1, f!(ADMIN), NO_KEYS, No, Shared),
    cmd("ping", -1, f!(FAST), NO_KEYS, No, Local),
    cmd("psetex", 4, f!(WRITE | DENYOOM), KEY1, No, Shared),
    cmd("psubscribe", -2, f!(PUBSUB | NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS, No, Tunnel),
    cmd("psync", -3, f!(ADMIN | NOSCRIPT | NO_MULTI | NO_ASYNC_LOADING), NO_KEYS, No, Tunnel),
    cmd("pttl", 2, f!(READ | FAST | TIME_DEPENDENT), KEY1, No, Shared),
    cmd("publish", 3, f!(PUBSUB | LOADING_OK | STALE_OK | FAST | MAY_REPLICATE), NO_KEYS, No, Shared),
    cmd("pubsub", -2, f!(RANDOM | CONTAINER), SUBCMD, No, Shared).with_subcommands(PUBSUB_SUBS),
    cmd("punsubscribe", -1, f!(PUBSUB | NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS, No, Tunnel),
    cmd("quit", -1, f!(NOSCRIPT | LOADING_OK | STALE_OK | FAST | NO_AUTH | ALLOW_BUSY), NO_KEYS, No, Local),
    cmd("randomkey", 1, f!(READ | RANDOM), NO_KEYS, No, Shared),
    cmd("readonly", 1, f!(LOADING_OK | STALE_OK | FAST), NO_KEYS, No, Local),
    cmd("readwrite", 1, f!(LOADING_OK | STALE_OK | FAST), NO_KEYS, No, Local),
    cmd("rename", 3, f!(WRITE), range(1, 2, 1), No, Shared),
    cmd("renamenx", 3, f!(WRITE | FAST), range(1, 2, 1), No, Shared),
    cmd("replconf", -1, f!(ADMIN | NOSCRIPT | LOADING_OK | STALE_OK | ALLOW_BUSY), NO_KEYS, No, Tunnel),
    cmd("replicaof", 3, f!(ADMIN | NOSCRIPT | STALE_OK | NO_ASYNC_LOADING), NO_KEYS, No, Shared),
    cmd("reset", 1, f!(NOSCRIPT | LOADING_OK | STALE_OK | FAST | NO_AUTH | ALLOW_BUSY), NO_KEYS, No, Local),
    cmd("restore", -4, f!(WRITE | DENYOOM), KEY1, No, Shared),
    cmd("restore-asking", -4, f!(WRITE | DENYOOM | ASKING), KEY1, No, Shared),
    cmd("role", 1, f!(NOSCRIPT | LOADING_OK | STALE_OK | FAST), NO_KEYS, No, Shared),
    cmd("rpop", -2, f!(WRITE | FAST), KEY1, No, Shared),
    cmd("rpoplpush", 3, f!(WRITE | DENYOOM), range(1, 2, 1), No, Shared),
    cmd("rpush", -3, f!(WRITE | DENYOOM | FAST), KEY1, No, Shared),
    cmd("rpushx", -3, f!(WRITE | DENYOOM | FAST), KEY1, No, Shared),
    cmd("sadd", -3, f!(WRITE | DENYOOM | FAST), KEY1, No, Shared),
    cmd("save", 1, f!(ADMIN | NOSCRIPT | NO_MULTI | NO_ASYNC_LOADING), NO_KEYS, No, Shared),
    cmd("scan", -2, f!(READ | RANDOM), NO_KEYS, No, Shared),
    cmd("scard", 2, f!(READ | FAST), KEY1, SingleKeyRead, Shared),
    cmd("script", -2, f!(CONTAINER), SUBCMD, No, Shared).with_subcommands(SCRIPT_SUBS),
    cmd("sdiff", -2, f!(READ), range(1, -1, 1), No, Shared),
    cmd("sdiffstore", -3, f!(WRITE | DENYOOM), range(1, -1, 1), No, Shared),
    cmd("select", 2, f!(LOADING_OK | STALE_OK | FAST), NO_KEYS, No, Pin),
    cmd("set", -3, f!(WRITE | DENYOOM), KEY1, No, Shared),
    cmd("setbit", 4, f!(WRITE | DENYOOM), KEY1, No, Shared),
    cmd("setex", 4, f!(WRITE | DENYOOM), KEY1, No, Shared),
    cmd("setnx", 3, f!(WRITE | DENYOOM | FAST), KEY1, No, Shared),
    cmd("setrange", 4, f!(WRITE | DENYOOM), KEY1, No, Shared),
    cmd("shutdown", -1, f!(ADMIN | NOSCRIPT | LOADING_OK | STALE_OK | ALLOW_BUSY | NO_MULTI), NO_KEYS, No, Shared),
    cmd("sinter", -2, f!(READ), range(1, -1, 1), No, Shared),
    cmd("sintercard", -3, f!(READ | MOVABLE_KEYS), numkeys(1, 2), No, Shared),
    cmd("sinterstore", -3, f!(WRITE | DENYOOM), range(1, -1, 1), No, Shared),
    cmd("sismember", 3, f!(READ | FAST), KEY1, SingleKeyRead, Shared),
    cmd("slaveof", 3, f!(ADMIN | NOSCRIPT | STALE_OK | NO_ASYNC_LOADING), NO_KEYS, No, Shared),
    cmd("slowlog", -2, f!(TIME_DEPENDENT | CONTAINER), SUBCMD, No, Shared).with_subcommands(SLOWLOG_SUBS),
    cmd("smembers", 2, f!(READ), KEY1, SingleKeyRead, Shared),
    cmd("smismember", -3, f!(READ | FAST), KEY1, SingleKeyRead, Shared),
    cmd("smove", 4, f!(WRITE | FAST), range(1, 2, 1), No, Shared),
    cmd("sort", -2, f!(WRITE | DENYOOM | MOVABLE_KEYS), KeySpec::Custom(sort_keys), No, Shared),
    cmd("sort_ro", -2, f!(READ | MOVABLE_KEYS), KEY1, No, Shared),
    cmd("spop", -2, f!(WRITE | FAST | RANDOM), KEY1, No, Shared),
    cmd("spublish", 3, f!(PUBSUB | LOADING_OK | STALE_OK | FAST | MAY_REPLICATE), KEY1, No, Shared),
    cmd("srandmember", -2, f!(READ | RANDOM), KEY1, No, Shared),
    cmd("srem", -3, f!(WRITE | FAST), KEY1, No, Shared),
    cmd("sscan", -3, f!(READ | RANDOM), KEY1, No, Shared),
    cmd("ssubscribe", -2, f!(PUBSUB | NOSCRIPT | LOADING_OK | STALE_OK), range(1, -1, 1), No, Tunnel),
    cmd("strlen", 2, f!(READ | FAST), KEY1, SingleKeyRead, Shared),
    cmd("subscribe", -2, f!(PUBSUB | NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS, No, Tunnel),
    cmd("substr", 4, f!(READ), KEY1, SingleKeyRead, Shared),
    cmd("sunion", -2, f!(READ), range(1, -1, 1), No, Shared),
    cmd("sunionstore", -3, f!(WRITE | DENYOOM), range(1, -1, 1), No, Shared),
    cmd("sunsubscribe", -1, f!(PUBSUB | NOSCRIPT | LOADING_OK | STALE_OK), range(1, -1, 1), No, Tunnel),
    cmd("swapdb", 3, f!(WRITE | FAST), NO_KEYS, No, Shared),
    cmd("sync", 1, f!(ADMIN | NOSCRIPT | NO_MULTI | NO_ASYNC_LOADING), NO_KEYS, No, Tunnel),
    cmd("time", 1, f!(LOADING_OK | STALE_OK | FAST | TIME_DEPENDENT), NO_KEYS, No, Shared),
    cmd("touch", -2, f!(READ | FAST), range(1, -1, 1), No, Shared),
    cmd("ttl", 2, f!(READ | FAST | TIME_DEPENDENT), KEY1, No, Shared),
    cmd("type", 2, f!(READ | FAST), KEY1, SingleKeyRead, Shared),
    cmd("unlink", -2, f!(WRITE | FAST), range(1, -1, 1), No, Shared),
    cmd("unsubscribe", -1, f!(PUBSUB | NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS, No, Tunnel),
    cmd("unwatch", 1, f!(NOSCRIPT | LOADING_OK | STALE_OK | FAST | ALLOW_BUSY), NO_KEYS, No, Pin),
    cmd("wait", 3, f!(NOSCRIPT), NO_KEYS, No, Blocking),
    cmd("waitaof", 4, f!(NOSCRIPT), NO_KEYS, No, Blocking),
    cmd("watch", -2, f!(NOSCRIPT | LOADING_OK | STALE_OK | FAST | ALLOW_BUSY), range(1, -1, 1), No, Pin),
    cmd("xack", -4, f!(WRITE | FAST), KEY1, No, Shared),
    cmd("xadd", -5, f!(WRITE | DENYOOM | FAST | RANDOM), KEY1, No, Shared),
    cmd("xautoclaim", -6, f!(WRITE | FAST | TIME_DEPENDENT), KEY1, No, Shared),
    cmd("xclaim", -6, f!(WRITE | FAST | TIME_DEPENDENT), KEY1, No, Shared),
    cmd("xdel", -3, f!(WRITE | FAST), KEY1, No, Shared),
    cmd("xgroup", -2, f!(CONTAINER), SUBCMD, No, Shared).with_subcommands(XGROUP_SUBS),
    cmd("xinfo", -2, f!(TIME_DEPENDENT | CONTAINER), SUBCMD, No, Shared).with_subcommands(XINFO_SUBS),
    cmd("xlen", 2, f!(READ | FAST), KEY1, SingleKeyRead, Shared),
    cmd("xpending", -3, f!(READ | TIME_DEPENDENT), KEY1, No, Shared),
    cmd("xrange", -4, f!(READ), KEY1, SingleKeyRead, Shared),
    cmd("xread", -4, f!(READ | BLOCKING | MOVABLE_KEYS), STREAMS, No, Shared),
    cmd("xreadgroup", -7, f!(WRITE | BLOCKING | MOVABLE_KEYS), STREAMS, No, Shared),
    cmd("xrevrange", -4, f!(READ), KEY1, SingleKeyRead, Shared),
    cmd("xsetid", -3, f!(WRITE | DENYOOM | FAST), KEY1, No, Shared),
    cmd("xtrim", -4, f!(WRITE | RANDOM), KEY1, No, Shared),
    cmd("zadd", -4, f!(WRITE | DENYOOM | FAST), KEY1, No, Shared),
    cmd("zcard", 2, f!(READ | FAST), KEY1, SingleKeyRead, Shared),
    cmd("zcount", 4, f!(READ | FAST), KEY1, SingleKeyRead, Shared),
    cmd("zdiff", -3, f!(READ | MOVABLE_KEYS), numkeys(1, 2), No, Shared),
    cmd("zdiffstore", -4, f!(WRITE | DENYOOM | MOVABLE_KEYS), store_numkeys(), No, Shared),
    cmd("zincrby", 4, f!(WRITE | DENYOOM | FAST), KEY1, No, Shared),
    cmd("zinter", -3, f!(READ | MOVABLE_KEYS), numkeys(1, 2), No, Shared),
    cmd("zintercard", -3, f!(READ | MOVABLE_KEYS), numkeys(1, 2), No, Shared),
    cmd("zinterstore", -4, f!(WRITE | DENYOOM | MOVABLE_KEYS), store_numkeys(), No, Shared),
    cmd("zlexcount", 4, f!(READ | FAST), KEY1, SingleKeyRead, Shared),
    cmd("zmpop", -4, f!(WRITE | MOVABLE_KEYS), numkeys(1, 2), No, Shared),
    cmd("zmscore", -3, f!(READ | FAST), KEY1, SingleKeyRead, Shared),
    cmd("zpopmax", -2, f!(WRITE | FAST), KEY1, No, Shared),
    cmd("zpopmin", -2, f!(WRITE | FAST), KEY1, No, Shared),
    cmd("zrandmember", -2, f!(READ | RANDOM), KEY1, No, Shared),
    cmd("zrange", -4, f!(READ), KEY1, SingleKeyRead, Shared),
    cmd("zrangebylex", -4, f!(READ), KEY1, SingleKeyRead, Shared),
    cmd("zrangebyscore", -4, f!(READ), KEY1, SingleKeyRead, Shared),
    cmd("zrangestore", -5, f!(WRITE | DENYOOM), range(1, 2, 1), No, Shared),
    cmd("zrank", -3, f!(READ | FAST), KEY1, SingleKeyRead, Shared),
    cmd("zrem", -3, f!(WRITE | FAST), KEY1, No, Shared),
    cmd("zremrangebylex", 4, f!(WRITE), KEY1, No, Shared),
    cmd("zremrangebyrank", 4, f!(WRITE), KEY1, No, Shared),
    cmd("zremrangebyscore", 4, f!(WRITE), KEY1, No, Shared),
    cmd("zrevrange", -4, f!(READ), KEY1, SingleKeyRead, Shared),
    cmd("zrevrangebylex", -4, f!(READ), KEY1, SingleKeyRead, Shared),
    cmd("zrevrangebyscore", -4, f!(READ), KEY1, SingleKeyRead, Shared),
    cmd("zrevrank", -3, f!(READ | FAST), KEY1, SingleKeyRead, Shared),
    cmd("zscan", -3, f!(READ | RANDOM), KEY1, No, Shared),
    cmd("zscore", 3, f!(READ | FAST), KEY1, SingleKeyRead, Shared),
    cmd("zunion", -3, f!(READ | MOVABLE_KEYS), numkeys(1, 2), No, Shared),
    cmd("zunionstore", -4, f!(WRITE | DENYOOM | MOVABLE_KEYS), store_numkeys(), No, Shared),
]);

#[rustfmt::skip]
const ACL_SUBS: &[SubcommandSpec] = &[
    sub("cat", -2, f!(NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS),
    sub("deluser", -3, f!(ADMIN | NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS),
    sub("dryrun", -4, f!(ADMIN | NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS),
    sub("genpass", -2, f!(NOSCRIPT | LOADING_OK | STALE_OK | RANDOM), NO_KEYS),
    sub("getuser", 3, f!(ADMIN | NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS),
    sub("help", 2, f!(LOADING_OK | STALE_OK), NO_KEYS),
    sub("list", 2, f!(ADMIN | NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS),
    sub("load", 2, f!(ADMIN | NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS),
    sub("log", -2, f!(ADMIN | NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS),
    sub("save", 2, f!(ADMIN | NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS),
    sub("setuser", -3, f!(ADMIN | NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS),
    sub("users", 2, f!(ADMIN | NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS),
    sub("whoami", 2, f!(NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS),
];

#[rustfmt::skip]
const CLIENT_SUBS: &[SubcommandSpec] = &[
    sub("caching", 3, f!(NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS),
    sub("getname", 2, f!(NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS),
    sub("getredir", 2, f!(NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS),
    sub("help", 2, f!(LOADING_OK | STALE_OK), NO_KEYS),
    sub("id", 2, f!(NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS),
    sub("info", 2, f!(NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS),
    sub("kill", -3, f!(ADMIN | NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS),
    sub("list", -2, f!(ADMIN | NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS),
    sub("no-evict", 3, f!(ADMIN | NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS),
    sub("no-touch", 3, f!(NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS),
    sub("pause", -3, f!(ADMIN | NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS),
    sub("reply", 3, f!(NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS),
    sub("setinfo", 4, f!(NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS),
    sub("setname", 3, f!(NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS),
    sub("tracking", -3, f!(NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS),
    sub("trackinginfo", 2, f!(NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS),
    sub("unblock", -3, f!(ADMIN | NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS),
    sub("unpause", 2, f!(ADMIN | NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS),
];

#[rustfmt::skip]
const CLUSTER_SUBS: &[SubcommandSpec] = &[
    sub("addslots", -3, f!(ADMIN | STALE_OK | NO_ASYNC_LOADING), NO_KEYS),
    sub("addslotsrange", -4, f!(ADMIN | STALE_OK | NO_ASYNC_LOADING), NO_KEYS),
    sub("bumpepoch", 2, f!(ADMIN | STALE_OK | NO_ASYNC_LOADING), NO_KEYS),
    sub("count-failure-reports", 3, f!(ADMIN | STALE_OK), NO_KEYS),
    sub("countkeysinslot", 3, f!(STALE_OK), NO_KEYS),
    sub("delslots", -3, f!(ADMIN | STALE_OK | NO_ASYNC_LOADING), NO_KEYS),
    sub("delslotsrange", -4, f!(ADMIN | STALE_OK | NO_ASYNC_LOADING), NO_KEYS),
    sub("failover", -2, f!(ADMIN | STALE_OK | NO_ASYNC_LOADING), NO_KEYS),
    sub("flushslots", 2, f!(ADMIN | STALE_OK | NO_ASYNC_LOADING), NO_KEYS),
    sub("forget", 3, f!(ADMIN | STALE_OK | NO_ASYNC_LOADING), NO_KEYS),
    sub("getkeysinslot", 4, f!(STALE_OK), NO_KEYS),
    sub("help", 2, f!(LOADING_OK | STALE_OK), NO_KEYS),
    sub("info", 2, f!(STALE_OK), NO_KEYS),
    sub("keyslot", 3, f!(STALE_OK), NO_KEYS),
    sub("links", 2, f!(STALE_OK), NO_KEYS),
    sub("meet", -4, f!(ADMIN | STALE_OK | NO_ASYNC_LOADING), NO_KEYS),
    sub("myid", 2, f!(STALE_OK), NO_KEYS),
    sub("myshardid", 2, f!(STALE_OK), NO_KEYS),
    sub("nodes", 2, f!(STALE_OK), NO_KEYS),
    sub("replicas", 3, f!(ADMIN | STALE_OK), NO_KEYS),
    sub("replicate", 3, f!(ADMIN | STALE_OK | NO_ASYNC_LOADING), NO_KEYS),
    sub("reset", -2, f!(ADMIN | NOSCRIPT | STALE_OK), NO_KEYS),
    sub("saveconfig", 2, f!(ADMIN | STALE_OK | NO_ASYNC_LOADING), NO_KEYS),
    sub("set-config-epoch", 3, f!(ADMIN | STALE_OK | NO_ASYNC_LOADING), NO_KEYS),
    sub("setslot", -4, f!(ADMIN | STALE_OK | NO_ASYNC_LOADING), NO_KEYS),
    sub("shards", 2, f!(STALE_OK), NO_KEYS),
    sub("slaves", 3, f!(ADMIN | STALE_OK), NO_KEYS),
    sub("slots", 2, f!(STALE_OK), NO_KEYS),
];

#[rustfmt::skip]
const COMMAND_SUBS: &[SubcommandSpec] = &[
    sub("count", 2, f!(LOADING_OK | STALE_OK), NO_KEYS),
    sub("docs", -2, f!(LOADING_OK | STALE_OK), NO_KEYS),
    sub("getkeys", -4, f!(LOADING_OK | STALE_OK), NO_KEYS),
    sub("getkeysandflags", -4, f!(LOADING_OK | STALE_OK), NO_KEYS),
    sub("help", 2, f!(LOADING_OK | STALE_OK), NO_KEYS),
    sub("info", -2, f!(LOADING_OK | STALE_OK), NO_KEYS),
    sub("list", -2, f!(LOADING_OK | STALE_OK), NO_KEYS),
];

#[rustfmt::skip]
const CONFIG_SUBS: &[SubcommandSpec] = &[
    sub("get", -3, f!(ADMIN | NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS),
    sub("help", 2, f!(LOADING_OK | STALE_OK), NO_KEYS),
    sub("resetstat", 2, f!(ADMIN | NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS),
    sub("rewrite", 2, f!(ADMIN | NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS),
    sub("set", -4, f!(ADMIN | NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS),
];

#[rustfmt::skip]
const FUNCTION_SUBS: &[SubcommandSpec] = &[
    sub("delete", 3, f!(WRITE | NOSCRIPT), NO_KEYS),
    sub("dump", 2, f!(NOSCRIPT), NO_KEYS),
    sub("flush", -2, f!(WRITE | NOSCRIPT), NO_KEYS),
    sub("help", 2, f!(LOADING_OK | STALE_OK), NO_KEYS),
    sub("kill", 2, f!(NOSCRIPT | ALLOW_BUSY), NO_KEYS),
    sub("list", -2, f!(NOSCRIPT), NO_KEYS),
    sub("load", -3, f!(WRITE | DENYOOM | NOSCRIPT), NO_KEYS),
    sub("restore", -3, f!(WRITE | DENYOOM | NOSCRIPT), NO_KEYS),
    sub("stats", 2, f!(NOSCRIPT | ALLOW_BUSY), NO_KEYS),
];

#[rustfmt::skip]
const LATENCY_SUBS: &[SubcommandSpec] = &[
    sub("doctor", 2, f!(ADMIN | NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS),
    sub("graph", 3, f!(ADMIN | NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS),
    sub("help", 2, f!(LOADING_OK | STALE_OK), NO_KEYS),
    sub("histogram", -2, f!(ADMIN | NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS),
    sub("history", 3, f!(ADMIN | NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS),
    sub("latest", 2, f!(ADMIN | NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS),
    sub("reset", -2, f!(ADMIN | NOSCRIPT | LOADING_OK | STALE_OK), NO_KEYS),
];

#[rustfmt::skip]
const MEMORY_SUBS: &[SubcommandSpec] = &[
    sub("doctor", 2, Flags::NONE, NO_KEYS),
    sub("help", 2, f!(LOADING_OK | STALE_OK), NO_KEYS),
    sub("malloc-stats", 2, Flags::NONE, NO_KEYS),
    sub("purge", 2, Flags::NONE, NO_KEYS),
    sub("stats", 2, Flags::NONE, NO_KEYS),
    sub("usage", -3, f!(READ), range(2, 2, 1)),
];

#[rustfmt::skip]
const MODULE_SUBS: &[SubcommandSpec] = &[
    sub("help", 2, f!(LOADING_OK | STALE_OK), NO_KEYS),
    sub("list", 2, f!(ADMIN | NOSCRIPT), NO_KEYS),
    sub("load", -3, f!(ADMIN | NOSCRIPT | NO_ASYNC_LOADING), NO_KEYS),
    sub("loadex", -3, f!(ADMIN | NOSCRIPT | NO_ASYNC_LOADING), NO_KEYS),
    sub("unload", 3, f!(ADMIN | NOSCRIPT | NO_ASYNC_LOADING), NO_KEYS),
];

#[rustfmt::skip]
const OBJECT_SUBS: &[SubcommandSpec] = &[
    sub("encoding", 3, f!(READ), range(2, 2, 1)),
    sub("freq", 3, f!(READ), range(2, 2, 1)),
    sub("help", 2, f!(LOADING_OK | STALE_OK), NO_KEYS),
    sub("idletime", 3, f!(READ), range(2, 2, 1)),
    sub("refcount", 3, f!(READ), range(2, 2, 1)),
];

#[rustfmt::skip]
const PUBSUB_SUBS: &[SubcommandSpec] = &[
    sub("channels", -2, f!(PUBSUB | LOADING_OK | STALE_OK), NO_KEYS),
    sub("help", 2, f!(LOADING_OK | STALE_OK), NO_KEYS),
    sub("numpat", 2, f!(PUBSUB | LOADING_OK | STALE_OK), NO_KEYS),
    sub("numsub", -2, f!(PUBSUB | LOADING_OK | STALE_OK), NO_KEYS),
    sub("shardchannels", -2, f!(PUBSUB | LOADING_OK | STALE_OK), NO_KEYS),
    sub("shardnumsub", -2, f!(PUBSUB | LOADING_OK | STALE_OK), NO_KEYS),
];

#[rustfmt::skip]
const SCRIPT_SUBS: &[SubcommandSpec] = &[
    sub("debug", 3, f!(NOSCRIPT), NO_KEYS),
    sub("exists", -3, f!(NOSCRIPT), NO_KEYS),
    sub("flush", -2, f!(NOSCRIPT), NO_KEYS),
    sub("help", 2, f!(LOADING_OK | STALE_OK), NO_KEYS),
    sub("kill", 2, f!(NOSCRIPT | ALLOW_BUSY), NO_KEYS),
    sub("load", 3, f!(NOSCRIPT | STALE_OK), NO_KEYS),
];

#[rustfmt::skip]
const SLOWLOG_SUBS: &[SubcommandSpec] = &[
    sub("get", -2, f!(ADMIN | LOADING_OK | STALE_OK), NO_KEYS),
    sub("help", 2, f!(LOADING_OK | STALE_OK), NO_KEYS),
    sub("len", 2, f!(ADMIN | LOADING_OK | STALE_OK), NO_KEYS),
    sub("reset", 2, f!(ADMIN | LOADING_OK | STALE_OK), NO_KEYS),
];

#[rustfmt::skip]
const XGROUP_SUBS: &[SubcommandSpec] = &[
    sub("create", -5, f!(WRITE | DENYOOM), range(2, 2, 1)),
    sub("createconsumer", 5, f!(WRITE | DENYOOM), range(2, 2, 1)),
    sub("delconsumer", 5, f!(WRITE), range(2, 2, 1)),
    sub("destroy", 4, f!(WRITE), range(2, 2, 1)),
    sub("help", 2, f!(LOADING_OK | STALE_OK), NO_KEYS),
    sub("setid", -5, f!(WRITE), range(2, 2, 1)),
];

#[rustfmt::skip]
const XINFO_SUBS: &[SubcommandSpec] = &[
    sub("consumers", 4, f!(READ), range(2, 2, 1)),
    sub("groups", 3, f!(READ), range(2, 2, 1)),
    sub("help", 2, f!(LOADING_OK | STALE_OK), NO_KEYS),
    sub("stream", -3, f!(READ), range(2, 2, 1)),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resp::Request;

    /// Whitespace-separated arguments; `''` stands for an empty argument.
    fn argv(line: &str) -> Request {
        let parts: Vec<&str> = line
            .split_whitespace()
            .map(|a| if a == "''" { "" } else { a })
            .collect();
        Request::from_args(&parts)
    }

    fn spec(name: &str) -> &'static CommandSpec {
        lookup(name.as_bytes()).unwrap_or_else(|| panic!("{name} not in table"))
    }

    fn keys_of(line: &str) -> Vec<usize> {
        let req = argv(line);
        let spec = lookup(req.name()).unwrap_or_else(|| panic!("unknown command in {line:?}"));
        key_indices(spec, req.args()).iter().collect()
    }

    #[test]
    fn lookup_ignores_case_and_rejects_unknown_names() {
        for name in ["get", "GET", "Get", "gEt"] {
            assert_eq!(lookup(name.as_bytes()).map(|s| s.name), Some("get"));
        }
        assert_eq!(
            lookup(b"ZRANGEBYSCORE").map(|s| s.name),
            Some("zrangebyscore")
        );
        assert_eq!(
            lookup(b"Restore-Asking").map(|s| s.name),
            Some("restore-asking")
        );
        assert_eq!(
            lookup(b"GeoRadiusByMember_RO").map(|s| s.name),
            Some("georadiusbymember_ro")
        );
        assert_eq!(lookup(b"client").map(|s| s.name), Some("client"));
        for unknown in [
            &b""[..],
            b"ge",
            b"gett",
            b"get ",
            b" get",
            b"getx",
            b"hexpire",
            b"georadiusbymember_ro_",
            b"this-name-is-longer-than-any-command",
            b"\xffget",
            b"g\0t",
            b"client|list",
        ] {
            assert!(lookup(unknown).is_none(), "{:?} should be unknown", unknown);
        }
    }

    #[test]
    fn every_entry_is_found_by_its_name_in_any_case() {
        for spec in COMMANDS {
            assert!(std::ptr::eq(lookup(spec.name.as_bytes()).unwrap(), spec));
            let upper = spec.name.to_ascii_uppercase();
            assert!(std::ptr::eq(lookup(upper.as_bytes()).unwrap(), spec));
        }
    }

    #[test]
    fn lookup_index_probes_are_short() {
        for spec in COMMANDS {
            let mut slot = fold_hash(spec.name.as_bytes()) as usize & INDEX_MASK;
            let mut probes = 1;
            while INDEX[slot] as usize != spec.id {
                slot = (slot + 1) & INDEX_MASK;
                probes += 1;
            }
            assert!(probes <= 4, "{} needs {probes} probes", spec.name);
        }
    }

    #[test]
    fn table_is_sorted_unique_lowercase_with_dense_ids() {
        assert_eq!(COMMANDS.len(), 241);
        for (i, spec) in COMMANDS.iter().enumerate() {
            assert_eq!(spec.id, i, "{}", spec.name);
            assert!(!spec.name.is_empty());
            assert!(
                spec.name.bytes().all(|b| b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || b == b'_'
                    || b == b'-'),
                "{} is not canonical lowercase",
                spec.name
            );
            assert_ne!(spec.arity, 0, "{}", spec.name);
            if i > 0 {
                assert!(
                    COMMANDS[i - 1].name < spec.name,
                    "{} out of order or duplicated",
                    spec.name
                );
            }
        }
    }

    #[test]
    fn table_invariants() {
        for spec in COMMANDS {
            let n = spec.name;
            assert!(
                !spec.flags.contains(Flags::READ | Flags::WRITE),
                "{n}: both READ and WRITE"
            );
            assert_eq!(
                spec.is_container(),
                spec.flags.contains(Flags::CONTAINER),
                "{n}"
            );
            assert_eq!(
                spec.is_container(),
                matches!(spec.keys, KeySpec::Subcommand),
                "{n}"
            );
            if spec.cache != Cacheable::No {
                assert!(
                    spec.flags.contains(Flags::READ),
                    "{n}: cacheable but not READ"
                );
                assert!(
                    !spec.flags.intersects(Flags::RANDOM | Flags::TIME_DEPENDENT),
                    "{n}: cacheable but not deterministic"
                );
                assert_eq!(spec.route, Route::Shared, "{n}");
            }
            if spec.flags.contains(Flags::MOVABLE_KEYS) && n != "sort_ro" {
                assert!(
                    !matches!(spec.keys, KeySpec::None | KeySpec::Range { .. }),
                    "{n}: movable keys need a dynamic key spec"
                );
            }
            if spec.flags.contains(Flags::BLOCKING) {
                assert!(
                    spec.route == Route::Blocking || matches!(spec.keys, KeySpec::Streams),
                    "{n}"
                );
            }
            let mut seen = Vec::new();
            for sub in spec.subcommands {
                assert!(!matches!(sub.keys, KeySpec::Subcommand), "{n} {}", sub.name);
                assert_ne!(sub.arity, 0);
                assert!(!seen.contains(&sub.name), "{n}: duplicate {}", sub.name);
                seen.push(sub.name);
            }
        }
    }

    #[test]
    fn key_indices_for_representative_commands() {
        let cases: &[(&str, &[usize])] = &[
            // Single key and fixed ranges.
            ("GET k", &[1]),
            ("set k v EX 10 GET", &[1]),
            ("SETEX k 10 v", &[1]),
            ("BITFIELD k GET u8 0 SET u8 0 1", &[1]),
            ("EXPIRE k 10", &[1]),
            ("pexpireat k 10 NX", &[1]),
            ("GEOADD k 1 2 m", &[1]),
            ("XADD s * f v", &[1]),
            ("XTRIM s MAXLEN ~ 10", &[1]),
            ("RESTORE k 0 payload REPLACE", &[1]),
            ("LCS a b LEN", &[1, 2]),
            ("RENAME a b", &[1, 2]),
            ("RENAMENX a b", &[1, 2]),
            ("SMOVE a b m", &[1, 2]),
            ("LMOVE a b LEFT RIGHT", &[1, 2]),
            ("RPOPLPUSH a b", &[1, 2]),
            ("BLMOVE a b LEFT RIGHT 0", &[1, 2]),
            ("COPY a b DB 1 REPLACE", &[1, 2]),
            ("ZRANGESTORE d s 0 -1", &[1, 2]),
            ("GEOSEARCHSTORE d s FROMMEMBER m BYRADIUS 1 km", &[1, 2]),
            ("PFDEBUG GETREG k", &[2]),
            // Open ranges.
            ("MGET a b c", &[1, 2, 3]),
            ("DEL a b c", &[1, 2, 3]),
            ("UNLINK a b", &[1, 2]),
            ("EXISTS a b", &[1, 2]),
            ("TOUCH a", &[1]),
            ("WATCH a b", &[1, 2]),
            ("MSET a 1 b 2 c 3", &[1, 3, 5]),
            ("MSETNX a 1 b 2", &[1, 3]),
            ("SINTERSTORE d a b", &[1, 2, 3]),
            ("SUNIONSTORE d a", &[1, 2]),
            ("SDIFFSTORE d a b c", &[1, 2, 3, 4]),
            ("BITOP AND d a b", &[2, 3, 4]),
            ("BITOP NOT d a", &[2, 3]),
            ("PFMERGE d a b", &[1, 2, 3]),
            ("PFCOUNT a b", &[1, 2]),
            ("BLPOP a b 0", &[1, 2]),
            ("BRPOP a 1.5", &[1]),
            ("BZPOPMIN a b 0", &[1, 2]),
            ("SSUBSCRIBE c1 c2", &[1, 2]),
            ("SPUBLISH c1 msg", &[1]),
            // Key counts.
            ("EVAL s 2 a b x y", &[3, 4]),
            ("EVAL s 0 x", &[]),
            ("EVALSHA sha 1 a x", &[3]),
            ("EVAL_RO s 1 a", &[3]),
            ("FCALL f 2 a b x", &[3, 4]),
            ("FCALL_RO f 1 a", &[3]),
            ("ZUNION 2 a b WEIGHTS 1 2", &[2, 3]),
            ("ZINTER 1 a", &[2]),
            ("ZDIFF 2 a b WITHSCORES", &[2, 3]),
            ("ZINTERCARD 2 a b LIMIT 1", &[2, 3]),
            ("SINTERCARD 3 a b c", &[2, 3, 4]),
            ("LMPOP 2 a b LEFT COUNT 2", &[2, 3]),
            ("ZMPOP 1 z MIN", &[2]),
            ("ZUNIONSTORE d 2 a b WEIGHTS 1 2", &[1, 3, 4]),
            ("ZINTERSTORE d 1 a", &[1, 3]),
            ("ZDIFFSTORE d 2 a b", &[1, 3, 4]),
            ("BLMPOP 0 2 a b LEFT", &[3, 4]),
            ("BZMPOP 1.5 1 z MAX COUNT 3", &[3]),
            // Streams.
            ("XREAD COUNT 10 STREAMS a b 0 0", &[4, 5]),
            ("XREAD BLOCK 0 STREAMS a $", &[4]),
            ("xread streams a b c 0 0 0", &[2, 3, 4]),
            ("XREADGROUP GROUP g c COUNT 1 NOACK STREAMS s >", &[8]),
            ("XREADGROUP GROUP streams block STREAMS s >", &[5]),
            ("XREAD STREAMS block 0", &[2]),
            // Options that name keys.
            ("SORT k", &[1]),
            ("SORT k BY w_* LIMIT 0 10 GET # ALPHA STORE d", &[1, 11]),
            ("sort k store d1 store d2", &[1, 5]),
            ("SORT k GET store", &[1]),
            ("SORT_RO k BY w_*", &[1]),
            ("GEORADIUS k 1 2 3 km", &[1]),
            (
                "GEORADIUS k 1 2 3 km WITHDIST COUNT 5 ANY STORE d",
                &[1, 11],
            ),
            ("GEORADIUS k 1 2 3 km STOREDIST d", &[1, 7]),
            ("GEORADIUS k 1 2 3 km COUNT store", &[1]),
            ("GEORADIUSBYMEMBER k m 3 km STORE d", &[1, 6]),
            ("GEORADIUS_RO k 1 2 3 km", &[1]),
            ("MIGRATE h 6379 k 0 1000", &[3]),
            ("MIGRATE h 6379 k 0 1000 COPY REPLACE AUTH pw", &[3]),
            (
                "MIGRATE h 6379 '' 0 1000 COPY AUTH keys KEYS a b",
                &[10, 11],
            ),
            ("MIGRATE h 6379 '' 0 1000 AUTH2 u keys KEYS a", &[10]),
            // Containers.
            ("OBJECT ENCODING k", &[2]),
            ("object freq k", &[2]),
            ("OBJECT IDLETIME k", &[2]),
            ("OBJECT REFCOUNT k", &[2]),
            ("OBJECT HELP", &[]),
            ("MEMORY USAGE k SAMPLES 5", &[2]),
            ("MEMORY STATS", &[]),
            ("XINFO STREAM s FULL", &[2]),
            ("XINFO GROUPS s", &[2]),
            ("XINFO CONSUMERS s g", &[2]),
            ("XGROUP CREATE s g $ MKSTREAM", &[2]),
            ("XGROUP SETID s g 0", &[2]),
            ("XGROUP DESTROY s g", &[2]),
            ("XGROUP CREATECONSUMER s g c", &[2]),
            ("XGROUP DELCONSUMER s g c", &[2]),
            ("CONFIG GET maxmemory", &[]),
            ("CLIENT LIST", &[]),
            // No keys.
            ("PING", &[]),
            ("FLUSHALL", &[]),
            ("KEYS *", &[]),
            ("SCAN 0 MATCH *", &[]),
            ("PUBLISH ch msg", &[]),
            ("SUBSCRIBE ch", &[]),
        ];
        for (line, want) in cases {
            assert_eq!(keys_of(line), *want, "{line}");
        }
    }

    #[test]
    fn key_indices_on_short_or_malformed_args() {
        let cases: &[(&str, &[usize])] = &[
            ("GET", &[]),
            ("MGET", &[]),
            ("MSET a", &[1]),
            ("MSET a 1 b", &[1, 3]),
            ("RENAME a", &[1]),
            ("BLPOP", &[]),
            ("BLPOP 0", &[]),
            ("BITOP AND", &[]),
            ("EVAL", &[]),
            ("EVAL s", &[]),
            ("EVAL s 3 a", &[3]),
            ("EVAL s -1 a", &[]),
            ("EVAL s two a", &[]),
            ("EVAL s 99999999999999999999999999 a b", &[3, 4]),
            ("ZUNIONSTORE", &[]),
            ("ZUNIONSTORE d", &[1]),
            ("ZUNIONSTORE d x a", &[1]),
            ("BLMPOP 0", &[]),
            ("XREAD", &[]),
            ("XREAD STREAMS", &[]),
            ("XREAD STREAMS a", &[]),
            ("XREAD STREAMS a b 0", &[2]),
            ("XREAD COUNT", &[]),
            ("XREAD BLOCK", &[]),
            ("XREAD a b", &[]),
            ("XREADGROUP GROUP g", &[]),
            ("SORT", &[]),
            ("SORT k STORE", &[1]),
            ("SORT k LIMIT 0", &[1]),
            ("GEORADIUS", &[]),
            ("GEORADIUS k 1 2 3 km STORE", &[1]),
            ("MIGRATE", &[]),
            ("MIGRATE h p", &[]),
            ("MIGRATE h p k", &[3]),
            ("MIGRATE h p '' 0 0 KEYS", &[]),
            ("MIGRATE h p k 0 0 KEYS a", &[]),
            ("MIGRATE h p '' 0 0 AUTH2", &[3]),
            ("OBJECT", &[]),
            ("OBJECT ENCODING", &[]),
            ("OBJECT NOSUCH k", &[]),
            ("XGROUP CREATE", &[]),
            ("MEMORY USAGE", &[]),
        ];
        for (line, want) in cases {
            assert_eq!(keys_of(line), *want, "{line}");
        }
    }

    #[test]
    fn key_indices_never_panics_and_stays_in_bounds() {
        let tokens = [
            "",
            "0",
            "1",
            "2",
            "3",
            "-1",
            "x",
            "STREAMS",
            "STORE",
            "KEYS",
            "BLOCK",
            "GROUP",
            "COUNT",
            "LIMIT",
            "BY",
            "GET",
            "AUTH",
            "AUTH2",
            "ENCODING",
            "USAGE",
            "CREATE",
            "STOREDIST",
            "99999999999",
        ];
        for spec in COMMANDS {
            assert!(
                key_indices(spec, Args::default()).is_empty(),
                "{}",
                spec.name
            );
            for len in 1..10 {
                for seed in 0..tokens.len() {
                    let mut parts = vec![spec.name];
                    for j in 1..len {
                        parts.push(tokens[(seed * 7 + j * 3 + len) % tokens.len()]);
                    }
                    let req = Request::from_args(&parts);
                    let args = req.args();
                    let keys = key_indices(spec, args);
                    let mut prev = 0;
                    for k in &keys {
                        assert!(
                            k > prev && k < args.len(),
                            "{}: {:?} of {:?}",
                            spec.name,
                            keys,
                            args
                        );
                        prev = k;
                    }
                    // Exercise the per-call helpers on the same junk.
                    let _ = (
                        effective_flags(spec, args),
                        is_blocking(spec, args),
                        cacheable(spec, args),
                    );
                }
            }
        }
    }

    #[test]
    fn key_indices_spill_past_the_inline_capacity() {
        let mut line = String::from("MSET");
        for i in 0..100 {
            line.push_str(&format!(" k{i} v{i}"));
        }
        let keys = keys_of(&line);
        assert_eq!(keys, (0..100).map(|i| 1 + 2 * i).collect::<Vec<_>>());

        let mut k = KeyIndices::new();
        for i in 1..=INLINE_KEYS + 3 {
            k.push(i);
        }
        assert_eq!(k.len(), INLINE_KEYS + 3);
        assert_eq!(
            k.iter().collect::<Vec<_>>(),
            (1..=INLINE_KEYS + 3).collect::<Vec<_>>()
        );
        assert_eq!(k.iter().count(), INLINE_KEYS + 3);
    }

    #[test]
    fn blocking_commands() {
        assert!(is_blocking(spec("blpop"), argv("BLPOP a 0").args()));
        assert!(is_blocking(spec("wait"), argv("WAIT 1 0").args()));
        assert!(is_blocking(spec("waitaof"), argv("WAITAOF 1 0 0").args()));
        assert!(is_blocking(
            spec("xread"),
            argv("XREAD BLOCK 0 STREAMS a $").args()
        ));
        assert!(is_blocking(
            spec("xread"),
            argv("XREAD count 1 block 100 STREAMS a $").args()
        ));
        assert!(is_blocking(
            spec("xreadgroup"),
            argv("XREADGROUP GROUP g c BLOCK 10 STREAMS s >").args()
        ));
        assert!(!is_blocking(
            spec("xread"),
            argv("XREAD STREAMS a $").args()
        ));
        assert!(!is_blocking(
            spec("xread"),
            argv("XREAD COUNT 5 STREAMS block 0").args()
        ));
        assert!(!is_blocking(
            spec("xreadgroup"),
            argv("XREADGROUP GROUP block c STREAMS s >").args()
        ));
        // No STREAMS: a syntax error, answered at once.
        assert!(!is_blocking(spec("xread"), argv("XREAD BLOCK 0").args()));
        assert!(!is_blocking(spec("get"), argv("GET block").args()));
        assert!(!is_blocking(spec("lpop"), argv("LPOP a").args()));
        assert!(!is_blocking(spec("subscribe"), argv("SUBSCRIBE a").args()));

        let blocking: Vec<&str> = COMMANDS
            .iter()
            .filter(|s| s.route == Route::Blocking)
            .map(|s| s.name)
            .collect();
        assert_eq!(
            blocking,
            [
                "blmove",
                "blmpop",
                "blpop",
                "brpop",
                "brpoplpush",
                "bzmpop",
                "bzpopmax",
                "bzpopmin",
                "wait",
                "waitaof"
            ]
        );
        assert!(
            !effective_flags(spec("xread"), argv("XREAD STREAMS a $").args())
                .contains(Flags::BLOCKING)
        );
        assert!(
            effective_flags(spec("xread"), argv("XREAD BLOCK 1 STREAMS a $").args())
                .contains(Flags::BLOCKING)
        );
    }

    #[test]
    fn cacheability() {
        let c = |line: &str| {
            let req = argv(line);
            let args = req.args();
            cacheable(lookup(&args[0]).unwrap(), args)
        };
        assert_eq!(c("EXISTS a"), Cacheable::SingleKeyRead);
        assert_eq!(c("EXISTS a b"), Cacheable::No);
        assert_eq!(c("PFCOUNT a"), Cacheable::SingleKeyRead);
        assert_eq!(c("PFCOUNT a b"), Cacheable::No);
        assert_eq!(c("MGET a"), Cacheable::Mget);
        assert_eq!(c("MGET a b c"), Cacheable::Mget);
        assert_eq!(c("MGET"), Cacheable::No);
        assert_eq!(c("GET a"), Cacheable::SingleKeyRead);
        assert_eq!(c("GET a b"), Cacheable::No);
        assert_eq!(c("GET"), Cacheable::No);
        assert_eq!(c("HGET h f"), Cacheable::SingleKeyRead);
        assert_eq!(c("ZRANGE z 0 -1 WITHSCORES"), Cacheable::SingleKeyRead);
        assert_eq!(c("ZRANK z m WITHSCORE"), Cacheable::SingleKeyRead);
        for never in [
            "SET a b",
            "TTL a",
            "PTTL a",
            "EXPIRETIME a",
            "PEXPIRETIME a",
            "RANDOMKEY",
            "SRANDMEMBER s",
            "SPOP s",
            "HRANDFIELD h",
            "ZRANDMEMBER z",
            "OBJECT ENCODING a",
            "TOUCH a",
            "GETEX a",
            "GETDEL a",
            "SCAN 0",
            "SSCAN s 0",
            "LCS a b",
            "DUMP a",
            "SORT_RO a",
            "SUNION a",
            "EVAL_RO s 1 a",
        ] {
            assert_eq!(c(never), Cacheable::No, "{never}");
        }
        let single: Vec<&str> = COMMANDS
            .iter()
            .filter(|s| s.cache == Cacheable::SingleKeyRead)
            .map(|s| s.name)
            .collect();
        assert_eq!(
            single,
            [
                "bitcount",
                "bitpos",
                "exists",
                "geodist",
                "geohash",
                "geopos",
                "get",
                "getbit",
                "getrange",
                "hexists",
                "hget",
                "hgetall",
                "hkeys",
                "hlen",
                "hmget",
                "hstrlen",
                "hvals",
                "lindex",
                "llen",
                "lpos",
                "lrange",
                "pfcount",
                "scard",
                "sismember",
                "smembers",
                "smismember",
                "strlen",
                "substr",
                "type",
                "xlen",
                "xrange",
                "xrevrange",
                "zcard",
                "zcount",
                "zlexcount",
                "zmscore",
                "zrange",
                "zrangebylex",
                "zrangebyscore",
                "zrank",
                "zrevrange",
                "zrevrangebylex",
                "zrevrangebyscore",
                "zrevrank",
                "zscore",
            ]
        );
        assert_eq!(
            COMMANDS
                .iter()
                .filter(|s| s.cache == Cacheable::Mget)
                .map(|s| s.name)
                .collect::<Vec<_>>(),
            ["mget"]
        );
    }

    #[test]
    fn routes() {
        let route = |name: &str| spec(name).route;
        assert_eq!(route("multi"), Route::Pin);
        assert_eq!(route("exec"), Route::Pin);
        assert_eq!(route("watch"), Route::Pin);
        assert_eq!(route("select"), Route::Pin);
        assert_eq!(route("subscribe"), Route::Tunnel);
        assert_eq!(route("psubscribe"), Route::Tunnel);
        assert_eq!(route("ssubscribe"), Route::Tunnel);
        assert_eq!(route("unsubscribe"), Route::Tunnel);
        assert_eq!(route("monitor"), Route::Tunnel);
        assert_eq!(route("psync"), Route::Tunnel);
        assert_eq!(route("blpop"), Route::Blocking);
        assert_eq!(route("get"), Route::Shared);
        assert_eq!(route("xread"), Route::Shared);
        assert_eq!(route("publish"), Route::Shared);
        assert_eq!(route("hello"), Route::Local);
        assert_eq!(route("ping"), Route::Local);
        assert_eq!(route("auth"), Route::Local);
        assert_eq!(route("client"), Route::Local);
        assert_eq!(route("quit"), Route::Local);
        assert_eq!(route("reset"), Route::Local);
    }

    #[test]
    fn reads_and_writes() {
        let rw = |line: &str| {
            let req = argv(line);
            let s = lookup(req.name()).unwrap();
            (is_read(s, req.args()), is_write(s, req.args()))
        };
        const READ: (bool, bool) = (true, false);
        const WRITE: (bool, bool) = (false, true);
        const NEITHER: (bool, bool) = (false, false);
        let cases = [
            ("GET a", READ),
            ("SET a b", WRITE),
            ("DEL a", WRITE),
            ("EVAL s 0", WRITE),
            ("EVALSHA sha 0", WRITE),
            ("FCALL f 0", WRITE),
            ("EVAL_RO s 0", READ),
            ("EVALSHA_RO sha 0", READ),
            ("FCALL_RO f 0", READ),
            ("SORT k", READ),
            ("SORT k ALPHA STORE d", WRITE),
            ("sort k store d", WRITE),
            ("SORT_RO k", READ),
            ("GEORADIUS k 1 2 3 km", READ),
            ("GEORADIUS k 1 2 3 km STORE d", WRITE),
            ("GEORADIUSBYMEMBER k m 3 km STOREDIST d", WRITE),
            ("GEORADIUSBYMEMBER k m 3 km WITHDIST", READ),
            ("XREADGROUP GROUP g c STREAMS s >", WRITE),
            ("XREAD STREAMS s 0", READ),
            ("XGROUP CREATE s g $", WRITE),
            ("xgroup destroy s g", WRITE),
            ("XGROUP HELP", NEITHER),
            ("XINFO STREAM s", READ),
            ("OBJECT ENCODING k", READ),
            ("MEMORY USAGE k", READ),
            ("FUNCTION LOAD code", WRITE),
            ("FUNCTION FLUSH", WRITE),
            ("FUNCTION LIST", NEITHER),
            ("CONFIG SET a b", NEITHER),
            ("PING", NEITHER),
            ("MULTI", NEITHER),
            ("FLUSHALL", WRITE),
            ("PUBLISH c m", NEITHER),
        ];
        for (line, want) in cases {
            assert_eq!(rw(line), want, "{line}");
        }
        let sort = spec("sort");
        assert!(
            sort.flags.contains(Flags::WRITE),
            "static flags say what may happen"
        );
        assert!(
            effective_flags(spec("config"), argv("CONFIG SET a b").args()).contains(Flags::ADMIN)
        );
        assert!(
            !effective_flags(spec("config"), argv("CONFIG HELP").args()).contains(Flags::ADMIN)
        );
    }

    #[test]
    fn subcommands() {
        let req = argv("client LIST");
        let args = req.args();
        assert_eq!(subcommand(args), Some(&b"LIST"[..]));
        assert_eq!(subcommand(argv("PING").args()), None);
        assert_eq!(
            lookup_subcommand(spec("client"), args).map(|s| s.name),
            Some("list")
        );
        assert_eq!(
            lookup_subcommand(spec("client"), argv("CLIENT No-Touch on").args()).map(|s| s.name),
            Some("no-touch")
        );
        assert!(lookup_subcommand(spec("client"), argv("CLIENT bogus").args()).is_none());
        assert!(lookup_subcommand(spec("get"), argv("GET list").args()).is_none());
        let containers: Vec<&str> = COMMANDS
            .iter()
            .filter(|s| s.is_container())
            .map(|s| s.name)
            .collect();
        assert_eq!(
            containers,
            [
                "acl", "client", "cluster", "command", "config", "function", "latency", "memory",
                "module", "object", "pubsub", "script", "slowlog", "xgroup", "xinfo"
            ]
        );
    }

    #[test]
    fn arity() {
        assert!(spec("get").arity_ok(2));
        assert!(!spec("get").arity_ok(1));
        assert!(!spec("get").arity_ok(3));
        assert!(spec("mget").arity_ok(2));
        assert!(spec("mget").arity_ok(10));
        assert!(!spec("mget").arity_ok(1));
        assert_eq!(spec("zrank").arity, -3, "WITHSCORE since 7.2");
    }

    #[test]
    fn flags_basics() {
        let f = Flags::READ | Flags::FAST;
        assert!(f.contains(Flags::READ));
        assert!(f.contains(Flags::READ | Flags::FAST));
        assert!(!f.contains(Flags::READ | Flags::WRITE));
        assert!(f.intersects(Flags::READ | Flags::WRITE));
        assert!(Flags::NONE.is_empty());
        assert_eq!(format!("{f:?}"), "Flags(READ | FAST)");
        assert_eq!(spec("get").flags, Flags::READ | Flags::FAST);
        assert!(spec("ttl").flags.contains(Flags::TIME_DEPENDENT));
        assert!(spec("srandmember").flags.contains(Flags::RANDOM));
        assert!(spec("publish").flags.contains(Flags::MAY_REPLICATE));
        let mut all = Flags::NONE;
        for (flag, _) in Flags::NAMES {
            assert!(!all.intersects(flag), "flag bits overlap");
            all |= flag;
        }
    }

    fn args(parts: &[&str]) -> Request {
        Request::from_args(parts)
    }

    #[test]
    fn classify_works_out_everything_once() {
        let c = classify(args(&["get", "k"]).args());
        assert_eq!(
            (c.id, c.read, c.write, c.blocking),
            (lookup(b"get").unwrap().id, true, false, false)
        );
        assert_eq!(c.cacheable, Cacheable::SingleKeyRead);
        assert_eq!(c.keys.as_slice(), [1]);
        assert!(!c.slow(), "GET is FAST");
        let c = classify(args(&["EXISTS", "a", "b"]).args());
        assert_eq!(c.cacheable, Cacheable::No, "two keys");
        let c = classify(args(&["SORT", "l", "STORE", "d"]).args());
        assert!(c.write && !c.read);
        assert_eq!(c.keys.as_slice(), [1, 3]);
        let c = classify(args(&["XREAD", "BLOCK", "0", "STREAMS", "s", "$"]).args());
        assert!(c.blocking);
        let c = classify(args(&["KEYS", "*"]).args());
        assert!(c.slow());
        for common in ["SET", "MSET", "DEL", "MGET", "RPUSH", "INCR", "EXPIRE"] {
            assert!(
                !classify(args(&[common, "k", "v"]).args()).slow(),
                "{common} is everyday traffic: it must not hide a frozen Redis"
            );
        }
        for long in ["EVAL", "LRANGE", "HGETALL", "DEBUG", "SUNIONSTORE"] {
            assert!(classify(args(&[long, "k", "v"]).args()).slow(), "{long}");
        }
        let c = classify(args(&["MODULE.CMD", "k", "v"]).args());
        assert_eq!(c.id, UNKNOWN);
        assert!(
            c.write && c.slow(),
            "unknown commands are treated as writes"
        );
        assert_eq!(c.keys.as_slice(), [1]);
        assert_eq!(c.name(), "unknown");
        assert_eq!(
            classify(args(&["GET"]).args()).cacheable,
            Cacheable::No,
            "arity"
        );
    }

    #[test]
    fn absent_replies_are_typed_per_command() {
        use crate::resp::reply::Absent;
        let absent = |p: &[&str]| {
            let a = args(p);
            absent_reply(classify(a.args()).id, a.args())
        };
        assert_eq!(absent(&["GET", "k"]), Some(Absent::Nil));
        assert_eq!(absent(&["EXISTS", "k"]), Some(Absent::Integer(0)));
        assert_eq!(absent(&["HGETALL", "k"]), Some(Absent::EmptyMap));
        assert_eq!(absent(&["SMEMBERS", "k"]), Some(Absent::EmptySet));
        assert_eq!(
            absent(&["LRANGE", "k", "0", "-1"]),
            Some(Absent::EmptyArray)
        );
        assert_eq!(absent(&["HMGET", "k", "a", "b"]), Some(Absent::Nils(2)));
        assert_eq!(absent(&["GEOPOS", "k", "a"]), Some(Absent::NullArrays(1)));
        assert_eq!(
            absent(&["SMISMEMBER", "k", "a", "b", "c"]),
            Some(Absent::Zeros(3))
        );
        assert_eq!(
            absent(&["LPOS", "k", "x", "COUNT", "2"]),
            Some(Absent::EmptyArray)
        );
        assert_eq!(absent(&["BITPOS", "k", "1"]), Some(Absent::Integer(-1)));
        assert_eq!(absent(&["TYPE", "k"]), Some(Absent::Status("none")));
        assert_eq!(absent(&["SET", "k", "v"]), None);
        // Every cacheable command has one.
        for spec in COMMANDS.iter().filter(|s| s.cache != Cacheable::No) {
            if spec.cache == Cacheable::Mget {
                continue;
            }
            assert!(
                absent_reply(spec.id, Args::default()).is_some(),
                "{}",
                spec.name
            );
        }
    }
}
