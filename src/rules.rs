//! Degraded-mode rules: what redfuse answers while an upstream cannot.
//!
//! When an upstream's breaker is open and no replica can take a request, the proxy answers
//! from its cache or by the rules in this module:
//!
//! * **Reads** that miss the cache get the configured *miss reply* ([`CachePolicy::miss_reply`]):
//!   `nil` by default, so that the application treats the key as absent and falls back to
//!   its database; or an error; or a per-pattern value such as an empty array for `recs:*`.
//!   Which keys are cached at all, and how stale a cached value may be when it is served in
//!   degraded mode, are per-pattern too ([`CachePolicy`]).
//! * **Writes and key-less commands** go through an ordered list of fail-open rules
//!   ([`FailOpen::decide`]). A rule matches command names or classes and key globs, and
//!   either replies with a configured RESP value, queues the write for replay (and replies),
//!   or replies with an error. Anything no rule matches gets the default error. `PING` is
//!   answered `+PONG` locally unless `ping_locally = false`.
//!
//! # Design
//!
//! * **Compile once, match many.** The TOML structs ([`FailOpenConfig`], [`CachePolicyConfig`])
//!   are plain data; [`FailOpen::compile`] and [`CachePolicy::compile`] validate them once at
//!   startup (every message names the offending field, e.g.
//!   `fail_open.rules[2].reply: ...`) and turn them into matchers that never fail and never
//!   allocate. A typo in a fail-open rule would otherwise surface only during an outage,
//!   which is the worst moment to learn about it.
//! * **First match wins.** Rules and patterns are evaluated in file order, like firewall
//!   rules, so an operator can read the file top to bottom and predict the answer. A
//!   catch-all rule placed before other rules is rejected as making them unreachable.
//! * **Replies are pre-encoded per protocol.** A [`ReplyValue`] is parsed from a compact
//!   string (`"+OK"`, `":1"`, `"[]"`, `"nil"`, raw RESP ...) and stored as the exact bytes
//!   to send to a RESP2 client and to a RESP3 client (`nil` is `$-1\r\n` vs `_\r\n`, `{}` is
//!   `*0\r\n` vs `%0\r\n`). Answering is a refcount bump on a [`Bytes`], with no encoding
//!   on the request path.
//! * **Binary-safe globs with Redis semantics.** Keys are bytes, so [`glob_match`] works on
//!   bytes and follows Redis's `stringmatchlen` (`*`, `?`, `[abc]`, `[^a]`, `[a-z]`, `\`
//!   escapes, including its treatment of malformed classes), but iteratively: a pattern
//!   such as `a*a*a*a*a*b` costs O(pattern × subject) at worst instead of exponential time.
//!   Compiled globs additionally recognise the common shapes (`*`, `prefix:*`, a literal)
//!   and match them with a single comparison.
//! * **Independent of the command table.** The caller passes the canonical command name,
//!   its read/write class and its key arguments, so this module can be tested on its own;
//!   [`FailOpen::compile_checked`] takes a predicate to reject unknown command names.
//!
//! # Configured replies must fit the command
//!
//! A fail-open reply is a fiction the client must be able to decode: `INCR` must get an
//! integer (`":1"`), not `"+OK"`, or typed clients throw. For a *queued* counter
//! (`INCR counter:*` with `action = "queue"`) the examples use `":0"`: the real value is
//! unknowable until the journal is replayed, and `0` is a value a freshly incremented
//! counter that starts at zero never has, so an application that does look at it can tell
//! it is a placeholder. Never fail open an `INCR` used to allocate ids.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// The error text (without the leading `-`) for writes no rule matches.
pub const DEFAULT_ERROR: &str = "ERR redfuse: upstream unavailable and no fail-open rule matches";
/// The error text sent for a cache miss when the miss reply is `"error"`.
pub const MISS_ERROR: &str = "ERR redfuse: upstream unavailable and key not in cache";
/// How stale a cached value may be when served in degraded mode, unless a pattern says
/// otherwise.
pub const DEFAULT_MAX_STALE_MS: u64 = 300_000;

/// The rule name reported for commands no rule matches.
const DEFAULT_RULE: &str = "default";
/// The rule name reported for `PING` answered because `ping_locally = true`.
const PING_RULE: &str = "ping_locally";

// ---------------------------------------------------------------------------------------
// Configuration (TOML)
// ---------------------------------------------------------------------------------------

/// `[fail_open]`: how writes and key-less commands are answered while the upstream is down.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FailOpenConfig {
    /// Ordered; the first matching rule decides.
    pub rules: Vec<RuleConfig>,
    /// Answer `PING` with `+PONG` before any rule is consulted.
    pub ping_locally: bool,
    /// Error text (without the leading `-`) for commands no rule matches.
    pub default_error: String,
}

impl Default for FailOpenConfig {
    fn default() -> Self {
        FailOpenConfig {
            rules: Vec::new(),
            ping_locally: true,
            default_error: DEFAULT_ERROR.to_owned(),
        }
    }
}

/// One `[[fail_open.rules]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Shown in logs and metrics; defaults to `rules[<index>]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Command names (case-insensitive) or classes: `@write`, `@read`, `@all`.
    pub commands: Vec<String>,
    /// Key globs. Empty matches any key and also key-less commands; otherwise every key of
    /// the command must match at least one glob, and key-less commands never match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<String>,
    pub action: ActionKind,
    /// The reply for `reply` and `queue` rules, in [`ReplyValue::parse`] syntax.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
    /// The error text (without the leading `-`) for `error` rules; defaults to
    /// `default_error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActionKind {
    /// Answer with `reply`; the write is lost.
    Reply,
    /// Answer with an error.
    Error,
    /// Answer with `reply` and journal the write for replay once the upstream is back.
    Queue,
}

/// `[cache]`: which keys are cached and how they are served in degraded mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CachePolicyConfig {
    /// How stale a cached value may be when served while the upstream is down.
    pub max_stale_ms: u64,
    /// Cache nil replies too, so that "not found" survives an outage.
    pub cache_nil: bool,
    /// Reply for a read that misses the cache while the upstream is down.
    pub miss: MissReply,
    /// Globs of keys to cache; empty caches every key.
    pub include: Vec<String>,
    /// Globs of keys never to cache; wins over `include`.
    pub exclude: Vec<String>,
    /// Per-pattern overrides of `max_stale_ms` and `miss`.
    pub patterns: Vec<PatternConfig>,
}

impl Default for CachePolicyConfig {
    fn default() -> Self {
        CachePolicyConfig {
            max_stale_ms: DEFAULT_MAX_STALE_MS,
            cache_nil: true,
            miss: MissReply::Nil,
            include: Vec::new(),
            exclude: Vec::new(),
            patterns: Vec::new(),
        }
    }
}

/// One `[[cache.patterns]]` entry. Each field is resolved separately: the first pattern
/// that matches the key *and sets the field* wins, so a narrow pattern can override only
/// `max_stale_ms` without losing a broader pattern's `miss`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatternConfig {
    /// Key glob.
    pub keys: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_stale_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub miss: Option<MissReply>,
}

/// The reply to a cache miss while the upstream is down. In TOML a string: `"nil"`,
/// `"error"`, or any other [`ReplyValue`] (`"[]"`, `":0"`, `"-ERR custom"` ...).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum MissReply {
    /// A null reply: the application treats the key as absent and uses its own fallback.
    #[default]
    Nil,
    /// The error [`MISS_ERROR`].
    Error,
    /// A configured value.
    Value(ReplyValue),
}

impl MissReply {
    /// The pre-encoded reply to send.
    pub fn reply(&self) -> &ReplyValue {
        match self {
            MissReply::Nil => &NIL,
            MissReply::Error => &MISS_ERROR_REPLY,
            MissReply::Value(v) => v,
        }
    }

    /// Shorthand for `self.reply().encode(resp3)`.
    pub fn encode(&self, resp3: bool) -> Bytes {
        self.reply().encode(resp3)
    }
}

impl TryFrom<String> for MissReply {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "nil" => Ok(MissReply::Nil),
            "error" => Ok(MissReply::Error),
            _ => ReplyValue::parse(&s)
                .map(MissReply::Value)
                .map_err(|e| format!("miss: expected \"nil\", \"error\" or a reply value: {e}")),
        }
    }
}

impl From<MissReply> for String {
    fn from(m: MissReply) -> String {
        match m {
            MissReply::Nil => "nil".to_owned(),
            MissReply::Error => "error".to_owned(),
            MissReply::Value(v) => v.source.into_owned(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// ReplyValue
// ---------------------------------------------------------------------------------------

static NIL: ReplyValue = ReplyValue::from_static("nil", b"$-1\r\n", b"_\r\n", false);
static PONG: ReplyValue = ReplyValue::from_static("+PONG", b"+PONG\r\n", b"+PONG\r\n", false);
static MISS_ERROR_REPLY: ReplyValue = ReplyValue::from_static(
    "-ERR redfuse: upstream unavailable and key not in cache",
    b"-ERR redfuse: upstream unavailable and key not in cache\r\n",
    b"-ERR redfuse: upstream unavailable and key not in cache\r\n",
    true,
);

/// A configured RESP reply, parsed once and pre-encoded for both protocol versions.
///
/// Accepted forms ([`ReplyValue::parse`]):
///
/// | form            | meaning                 | RESP2                | RESP3           |
/// |-----------------|-------------------------|----------------------|-----------------|
/// | `+OK`           | simple string           | `+OK\r\n`            | same            |
/// | `-ERR msg`      | error                   | `-ERR msg\r\n`       | same            |
/// | `:1`            | integer                 | `:1\r\n`             | same            |
/// | `$text`         | bulk string `text`      | `$4\r\ntext\r\n`     | same            |
/// | `nil`           | null                    | `$-1\r\n`            | `_\r\n`         |
/// | `[]`            | empty array             | `*0\r\n`             | same            |
/// | `{}`            | empty map               | `*0\r\n`             | `%0\r\n`        |
/// | `...\r\n`       | raw RESP2/RESP3, one complete value, validated | downgraded | as given |
///
/// Other single-line RESP values may also omit the trailing `\r\n` (`*0`, `_`, `#t`,
/// `,1.5`, `%0`). A string ending in `\r\n` is always raw RESP, so a bulk string that
/// itself ends in `\r\n` must be written raw. RESP3-only types are downgraded for RESP2
/// clients the way Redis does it: maps and sets become arrays, null becomes `$-1`,
/// booleans become `:1`/`:0`, doubles, big numbers and verbatim strings become bulk
/// strings, blob errors become simple errors. Attributes and pushes are rejected: they are
/// not replies to a command.
#[derive(Clone)]
pub struct ReplyValue {
    /// The configured text, kept for display and for writing the config back out.
    source: Cow<'static, str>,
    resp2: Bytes,
    resp3: Bytes,
    is_error: bool,
}

impl ReplyValue {
    const fn from_static(
        source: &'static str,
        resp2: &'static [u8],
        resp3: &'static [u8],
        is_error: bool,
    ) -> ReplyValue {
        ReplyValue {
            source: Cow::Borrowed(source),
            resp2: Bytes::from_static(resp2),
            resp3: Bytes::from_static(resp3),
            is_error,
        }
    }

    /// Parses the compact syntax described on [`ReplyValue`].
    pub fn parse(s: &str) -> Result<ReplyValue, String> {
        let (resp2, resp3, is_error) = match s {
            "" => {
                return Err(
                    "empty reply (use \"nil\" for null or \"$\" for an empty string)".into(),
                );
            }
            "nil" => return Ok(NIL.clone()),
            "[]" => (b"*0\r\n".to_vec(), b"*0\r\n".to_vec(), false),
            "{}" => (b"*0\r\n".to_vec(), b"%0\r\n".to_vec(), false),
            _ if s.ends_with("\r\n") => encode_raw(s.as_bytes(), s)?,
            _ if s.starts_with('$') => {
                let mut out = format!("${}\r\n", s.len() - 1).into_bytes();
                out.extend_from_slice(&s.as_bytes()[1..]);
                out.extend_from_slice(b"\r\n");
                (out.clone(), out, false)
            }
            _ if s.starts_with(['+', '-', ':', '*', '%', '~', '_', ',', '#', '(']) => {
                // Single-line values read naturally without the terminator; adding it and
                // going through the raw parser gives one set of validation rules.
                encode_raw(format!("{s}\r\n").as_bytes(), s)?
            }
            _ => {
                return Err(format!(
                    "unrecognised reply {s:?}: expected +simple, -error, :integer, $bulk, nil, \
                     [], {{}} or raw RESP ending in \\r\\n"
                ));
            }
        };
        let resp2 = Bytes::from(resp2);
        // Most values are the same in both protocols; share the buffer.
        let resp3 = if resp3 == resp2 {
            resp2.clone()
        } else {
            Bytes::from(resp3)
        };
        Ok(ReplyValue {
            source: Cow::Owned(s.to_owned()),
            resp2,
            resp3,
            is_error,
        })
    }

    /// The bytes to send to a client speaking RESP3 (`HELLO 3`) or RESP2. Cheap: a
    /// reference-count increment.
    pub fn encode(&self, resp3: bool) -> Bytes {
        if resp3 {
            self.resp3.clone()
        } else {
            self.resp2.clone()
        }
    }

    /// The configured text this value was parsed from.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the reply is an error (`-...` or a blob error).
    pub fn is_error(&self) -> bool {
        self.is_error
    }
}

/// Two values are equal when they put the same bytes on the wire, whatever their spelling
/// (`"+OK"` and `"+OK\r\n"` are equal).
impl PartialEq for ReplyValue {
    fn eq(&self, other: &Self) -> bool {
        self.resp2 == other.resp2 && self.resp3 == other.resp3
    }
}

impl Eq for ReplyValue {}

impl fmt::Debug for ReplyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReplyValue({:?})", self.source)
    }
}

impl fmt::Display for ReplyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl TryFrom<String> for ReplyValue {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        ReplyValue::parse(&s)
    }
}

impl From<ReplyValue> for String {
    fn from(v: ReplyValue) -> String {
        v.source.into_owned()
    }
}

impl Serialize for ReplyValue {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.source)
    }
}

impl<'de> Deserialize<'de> for ReplyValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        ReplyValue::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Nesting limit for raw replies: a configured reply has no business being deep, and the
/// parser is recursive.
const MAX_REPLY_DEPTH: usize = 16;

/// Validates one complete raw RESP value and re-encodes it for RESP2 and RESP3; `shown`
/// is the configured text, for error messages.
fn encode_raw(input: &[u8], shown: &str) -> Result<(Vec<u8>, Vec<u8>, bool), String> {
    let mut enc = RawEncoder {
        input,
        pos: 0,
        value_start: 0,
        resp2: Vec::with_capacity(input.len()),
        resp3: Vec::with_capacity(input.len()),
    };
    let is_error = matches!(input.first(), Some(b'-' | b'!'));
    enc.value(0).map_err(|e| {
        format!(
            "invalid reply {shown:?}: {e} (in the value starting at byte {})",
            enc.value_start
        )
    })?;
    if enc.pos != input.len() {
        return Err(format!(
            "invalid reply {shown:?}: {} trailing bytes after the first complete value",
            input.len() - enc.pos
        ));
    }
    Ok((enc.resp2, enc.resp3, is_error))
}

struct RawEncoder<'a> {
    input: &'a [u8],
    pos: usize,
    /// Where the innermost value being parsed starts, to point errors at it.
    value_start: usize,
    resp2: Vec<u8>,
    resp3: Vec<u8>,
}

impl<'a> RawEncoder<'a> {
    fn both(&mut self, bytes: &[u8]) {
        self.resp2.extend_from_slice(bytes);
        self.resp3.extend_from_slice(bytes);
    }

    /// The rest of the current line; a bare CR or LF is an error because a RESP line can
    /// contain neither.
    fn line(&mut self) -> Result<&'a [u8], String> {
        let rest = &self.input[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == b'\r' || b == b'\n')
            .ok_or("missing \\r\\n")?;
        if rest[end] != b'\r' || rest.get(end + 1) != Some(&b'\n') {
            return Err("bare \\r or \\n inside a line".into());
        }
        self.pos += end + 2;
        Ok(&rest[..end])
    }

    /// A length or count: non-negative, or -1 (null) where `nullable`.
    fn length(line: &[u8], nullable: bool) -> Result<Option<usize>, String> {
        let n = parse_i64(line).ok_or("invalid length")?;
        match n {
            -1 if nullable => Ok(None),
            n if n < 0 => Err(format!("negative length {n}")),
            n => usize::try_from(n)
                .map(Some)
                .map_err(|_| "length too large".into()),
        }
    }

    /// `len` bytes of payload followed by CRLF.
    fn blob(&mut self, len: usize) -> Result<&'a [u8], String> {
        let rest = &self.input[self.pos..];
        if rest.len() < len.saturating_add(2) {
            return Err("truncated blob".into());
        }
        if &rest[len..len + 2] != b"\r\n" {
            return Err("blob not followed by \\r\\n".into());
        }
        self.pos += len + 2;
        Ok(&rest[..len])
    }

    /// An aggregate's elements; refuses counts the remaining input cannot possibly hold
    /// before looping over them.
    fn elements(&mut self, count: usize, depth: usize) -> Result<(), String> {
        if depth >= MAX_REPLY_DEPTH {
            return Err(format!("nested deeper than {MAX_REPLY_DEPTH}"));
        }
        if count > (self.input.len() - self.pos) / 3 {
            return Err(format!("truncated aggregate of {count} elements"));
        }
        for _ in 0..count {
            self.value(depth + 1)?;
        }
        Ok(())
    }

    fn value(&mut self, depth: usize) -> Result<(), String> {
        let Some(&kind) = self.input.get(self.pos) else {
            return Err("truncated value".into());
        };
        self.value_start = self.pos;
        self.pos += 1;
        let line = self.line()?;
        match kind {
            b'+' | b'-' => {
                self.both(&[kind]);
                self.both(line);
                self.both(b"\r\n");
            }
            b':' => {
                let n = parse_i64(line).ok_or("invalid integer")?;
                self.both(format!(":{n}\r\n").as_bytes());
            }
            b'$' => match Self::length(line, true)? {
                None => {
                    self.resp2.extend_from_slice(b"$-1\r\n");
                    self.resp3.extend_from_slice(b"_\r\n");
                }
                Some(len) => {
                    let data = self.blob(len)?;
                    self.both(format!("${len}\r\n").as_bytes());
                    self.both(data);
                    self.both(b"\r\n");
                }
            },
            b'*' | b'~' => match Self::length(line, kind == b'*')? {
                None => {
                    self.resp2.extend_from_slice(b"*-1\r\n");
                    self.resp3.extend_from_slice(b"_\r\n");
                }
                Some(count) => {
                    self.resp2
                        .extend_from_slice(format!("*{count}\r\n").as_bytes());
                    self.resp3.push(kind);
                    self.resp3
                        .extend_from_slice(format!("{count}\r\n").as_bytes());
                    self.elements(count, depth)?;
                }
            },
            b'%' => {
                let count = Self::length(line, false)?.unwrap_or(0);
                let items = count.checked_mul(2).ok_or("length too large")?;
                self.resp2
                    .extend_from_slice(format!("*{items}\r\n").as_bytes());
                self.resp3
                    .extend_from_slice(format!("%{count}\r\n").as_bytes());
                self.elements(items, depth)?;
            }
            b'_' => {
                if !line.is_empty() {
                    return Err("null carries no data".into());
                }
                self.resp2.extend_from_slice(b"$-1\r\n");
                self.resp3.extend_from_slice(b"_\r\n");
            }
            b'#' => {
                let int = match line {
                    b"t" => b":1\r\n",
                    b"f" => b":0\r\n",
                    _ => return Err("boolean must be t or f".into()),
                };
                self.resp2.extend_from_slice(int);
                self.resp3.push(b'#');
                self.resp3.extend_from_slice(line);
                self.resp3.extend_from_slice(b"\r\n");
            }
            b',' | b'(' => {
                let valid = if kind == b',' {
                    is_double(line)
                } else {
                    is_big_number(line)
                };
                if !valid {
                    return Err(if kind == b',' {
                        "invalid double".into()
                    } else {
                        "invalid big number".into()
                    });
                }
                push_bulk(&mut self.resp2, line);
                self.resp3.push(kind);
                self.resp3.extend_from_slice(line);
                self.resp3.extend_from_slice(b"\r\n");
            }
            b'=' | b'!' => {
                let len = Self::length(line, false)?.unwrap_or(0);
                let data = self.blob(len)?;
                if kind == b'=' {
                    if data.len() < 4 || data[3] != b':' {
                        return Err(
                            "verbatim string must start with a 3-byte format and ':'".into()
                        );
                    }
                    push_bulk(&mut self.resp2, &data[4..]);
                } else {
                    if data.iter().any(|&b| b == b'\r' || b == b'\n') {
                        return Err(
                            "blob error with \\r or \\n cannot be sent to RESP2 clients".into()
                        );
                    }
                    self.resp2.push(b'-');
                    self.resp2.extend_from_slice(data);
                    self.resp2.extend_from_slice(b"\r\n");
                }
                self.resp3
                    .extend_from_slice(format!("{}{len}\r\n", kind as char).as_bytes());
                self.resp3.extend_from_slice(data);
                self.resp3.extend_from_slice(b"\r\n");
            }
            b'|' => return Err("attributes are not supported in configured replies".into()),
            b'>' => return Err("a push is not a reply to a command".into()),
            other => return Err(format!("unknown RESP type byte {:?}", other as char)),
        }
        Ok(())
    }
}

fn push_bulk(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(format!("${}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

fn parse_i64(line: &[u8]) -> Option<i64> {
    std::str::from_utf8(line).ok()?.parse().ok()
}

fn is_double(line: &[u8]) -> bool {
    let Ok(s) = std::str::from_utf8(line) else {
        return false;
    };
    matches!(s, "inf" | "-inf" | "nan")
        || (s
            .bytes()
            .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b))
            && s.parse::<f64>().is_ok())
}

fn is_big_number(line: &[u8]) -> bool {
    let digits = line
        .strip_prefix(b"-")
        .or_else(|| line.strip_prefix(b"+"))
        .unwrap_or(line);
    !digits.is_empty() && digits.iter().all(u8::is_ascii_digit)
}

// ---------------------------------------------------------------------------------------
// Globs
// ---------------------------------------------------------------------------------------

/// Redis glob matching (`stringmatchlen` without `nocase`), binary-safe.
///
/// `*` any run of bytes, `?` any one byte, `[abc]` / `[^abc]` / `[a-z]` classes, `\x` the
/// literal `x` (also inside classes). Malformed patterns behave as in Redis: an
/// unterminated class runs to the end of the pattern (`[ab` matches `a`), `[]` matches
/// nothing and `[^]` any byte, `[a-]` is a range up to `]`, a trailing `\` is literal.
///
/// Deliberate differences from Redis, both in corner cases no key pattern relies on:
/// a pattern made only of `*` matches the empty string (Redis's matcher says no, although
/// `KEYS *` and `SCAN` special-case `*` to match everything); range bounds are compared as
/// unsigned bytes (Redis compares C `char`s, signed on most platforms); and there is no
/// nesting cut-off, because nothing recurses.
///
/// Runs in O(pattern × subject) time at worst, without allocating: on a mismatch only the
/// most recent `*` is widened, which suffices because every other token matches exactly
/// one byte.
pub fn glob_match(pattern: &[u8], subject: &[u8]) -> bool {
    let (mut p, mut s) = (0, 0);
    // Pattern index just after the latest `*`, and the subject index where what follows
    // it is being tried.
    let mut star: Option<(usize, usize)> = None;
    while s < subject.len() {
        if p < pattern.len() {
            if pattern[p] == b'*' {
                while p < pattern.len() && pattern[p] == b'*' {
                    p += 1;
                }
                if p == pattern.len() {
                    return true;
                }
                star = Some((p, s));
                continue;
            }
            if let Some(next) = match_token(pattern, p, subject[s]) {
                p = next;
                s += 1;
                continue;
            }
        }
        match star {
            Some((after, tried)) => {
                p = after;
                s = tried + 1;
                star = Some((after, s));
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

/// Matches the single-byte token (anything but `*`) at `pattern[p]` against `c`; returns
/// the index of the next token on a match.
fn match_token(pattern: &[u8], p: usize, c: u8) -> Option<usize> {
    match pattern[p] {
        b'?' => Some(p + 1),
        b'[' => match_class(pattern, p + 1, c),
        b'\\' if p + 1 < pattern.len() => (pattern[p + 1] == c).then_some(p + 2),
        literal => (literal == c).then_some(p + 1),
    }
}

/// A `[...]` class whose body starts at `pattern[start]`.
fn match_class(pattern: &[u8], start: usize, c: u8) -> Option<usize> {
    let len = pattern.len();
    let mut i = start;
    let negate = pattern.get(i) == Some(&b'^');
    if negate {
        i += 1;
    }
    let mut matched = false;
    // `i` ends on the closing `]`, or on the last byte when the class is unterminated, so
    // that the next token is at `i + 1` either way.
    loop {
        if i >= len {
            i -= 1;
            break;
        }
        match pattern[i] {
            b'\\' if len - i >= 2 => {
                i += 1;
                matched |= pattern[i] == c;
            }
            b']' => break,
            lo if len - i >= 3 && pattern[i + 1] == b'-' => {
                let hi = pattern[i + 2];
                let (lo, hi) = if lo <= hi { (lo, hi) } else { (hi, lo) };
                matched |= (lo..=hi).contains(&c);
                i += 2;
            }
            b => matched |= b == c,
        }
        i += 1;
    }
    (matched != negate).then_some(i + 1)
}

/// A glob compiled for matching many keys: the shapes real configurations use (`*`,
/// `prefix*`, literal keys) skip the general matcher.
#[derive(Debug, Clone)]
enum Glob {
    Any,
    Exact(Box<[u8]>),
    Prefix(Box<[u8]>),
    General(Box<[u8]>),
}

impl Glob {
    fn compile(pattern: &[u8]) -> Glob {
        let mut literal = Vec::with_capacity(pattern.len());
        let mut i = 0;
        while i < pattern.len() {
            match pattern[i] {
                b'*' if pattern[i..].iter().all(|&b| b == b'*') => {
                    return if literal.is_empty() {
                        Glob::Any
                    } else {
                        Glob::Prefix(literal.into())
                    };
                }
                b'*' | b'?' | b'[' => return Glob::General(pattern.into()),
                b'\\' if i + 1 < pattern.len() => {
                    literal.push(pattern[i + 1]);
                    i += 2;
                }
                b => {
                    literal.push(b);
                    i += 1;
                }
            }
        }
        Glob::Exact(literal.into())
    }

    fn matches(&self, key: &[u8]) -> bool {
        match self {
            Glob::Any => true,
            Glob::Exact(lit) => key == &lit[..],
            Glob::Prefix(prefix) => key.starts_with(prefix),
            Glob::General(pattern) => glob_match(pattern, key),
        }
    }
}

/// Compiles a configured glob; `field` is its path for the error message.
fn compile_glob(pattern: &str, field: &str) -> Result<Glob, String> {
    if pattern.is_empty() {
        return Err(format!(
            "{field}: empty pattern (it would match only the empty key; use \"*\" for every key)"
        ));
    }
    Ok(Glob::compile(pattern.as_bytes()))
}

// ---------------------------------------------------------------------------------------
// Fail-open rules
// ---------------------------------------------------------------------------------------

/// What to do with a command while its upstream is unavailable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision<'a> {
    /// Send `value`; do not journal.
    Reply {
        rule: &'a str,
        value: &'a ReplyValue,
    },
    /// Journal the write for replay, then send `value`.
    Queue {
        rule: &'a str,
        value: &'a ReplyValue,
    },
    /// Send `-{message}\r\n`. `rule` is `"default"` when no rule matched.
    Error { rule: &'a str, message: &'a str },
}

impl<'a> Decision<'a> {
    /// The rule that decided: its configured name, `rules[<index>]`, `"ping_locally"` or
    /// `"default"`. Suitable as a metrics label.
    pub fn rule(&self) -> &'a str {
        match *self {
            Decision::Reply { rule, .. }
            | Decision::Queue { rule, .. }
            | Decision::Error { rule, .. } => rule,
        }
    }
}

/// Compiled `[fail_open]` rules.
#[derive(Debug, Clone)]
pub struct FailOpen {
    rules: Vec<Rule>,
    ping_locally: bool,
    default_error: String,
}

#[derive(Debug, Clone)]
struct Rule {
    name: String,
    commands: CommandSet,
    /// Empty: any keys, and key-less commands.
    keys: Vec<Glob>,
    action: Action,
}

#[derive(Debug, Clone, Default)]
struct CommandSet {
    /// Lowercase command names.
    names: Vec<Box<str>>,
    writes: bool,
    reads: bool,
    all: bool,
}

#[derive(Debug, Clone)]
enum Action {
    Reply(ReplyValue),
    Queue(ReplyValue),
    Error(String),
}

impl Rule {
    fn matches(&self, name: &str, is_write: bool, is_read: bool, keys: &[&[u8]]) -> bool {
        let c = &self.commands;
        let command = c.all
            || (c.writes && is_write)
            || (c.reads && is_read)
            || c.names.iter().any(|n| n.eq_ignore_ascii_case(name));
        command
            && (self.keys.is_empty()
                || (!keys.is_empty()
                    && keys
                        .iter()
                        .all(|key| self.keys.iter().any(|glob| glob.matches(key)))))
    }

    fn is_catch_all(&self) -> bool {
        self.commands.all && self.keys.is_empty()
    }
}

impl FailOpen {
    /// Validates and compiles the rules. Command names are not checked against the
    /// command table; see [`FailOpen::compile_checked`].
    pub fn compile(cfg: &FailOpenConfig) -> Result<FailOpen, String> {
        FailOpen::compile_checked(cfg, |_| true)
    }

    /// Like [`FailOpen::compile`], and rejects command names for which `known_command`
    /// (given the lowercase name) returns false, so a misspelt command is caught at
    /// startup rather than silently never matching during an outage.
    pub fn compile_checked(
        cfg: &FailOpenConfig,
        known_command: impl Fn(&str) -> bool,
    ) -> Result<FailOpen, String> {
        validate_error_text(&cfg.default_error)
            .map_err(|e| format!("fail_open.default_error: {e}"))?;
        let mut rules: Vec<Rule> = Vec::with_capacity(cfg.rules.len());
        for (i, rc) in cfg.rules.iter().enumerate() {
            let at = format!("fail_open.rules[{i}]");
            if let Some(j) = rules.iter().position(Rule::is_catch_all) {
                return Err(format!(
                    "{at}: unreachable because fail_open.rules[{j}] (\"{}\") matches every \
                     command; move catch-all rules last",
                    rules[j].name
                ));
            }
            let name = match &rc.name {
                None => format!("rules[{i}]"),
                Some(n) if n.trim().is_empty() => return Err(format!("{at}.name: empty")),
                // Reserved so that a metrics label always means one thing.
                Some(n) if n == DEFAULT_RULE || n == PING_RULE || n.starts_with("rules[") => {
                    return Err(format!("{at}.name: \"{n}\" is reserved"));
                }
                Some(n) if rules.iter().any(|r| r.name == *n) => {
                    return Err(format!("{at}.name: duplicate rule name \"{n}\""));
                }
                Some(n) => n.clone(),
            };
            let commands = compile_commands(cfg, rc, &at, &known_command)?;
            let keys = rc
                .keys
                .iter()
                .enumerate()
                .map(|(k, glob)| compile_glob(glob, &format!("{at}.keys[{k}]")))
                .collect::<Result<Vec<_>, _>>()?;
            let action = compile_action(cfg, rc, &at, &commands)?;
            rules.push(Rule {
                name,
                commands,
                keys,
                action,
            });
        }
        Ok(FailOpen {
            rules,
            ping_locally: cfg.ping_locally,
            default_error: cfg.default_error.clone(),
        })
    }

    /// The first rule matching the command.
    ///
    /// `name` is the canonical command name (matched case-insensitively), `is_write` /
    /// `is_read` its class, `keys` its key arguments (empty for key-less commands). `PING`
    /// gets `+PONG` when `ping_locally` is set; for `PING message` the caller should echo
    /// the message instead, as only it sees the arguments.
    pub fn decide(
        &self,
        name: &str,
        is_write: bool,
        is_read: bool,
        keys: &[&[u8]],
    ) -> Decision<'_> {
        if self.ping_locally && name.eq_ignore_ascii_case("ping") {
            return Decision::Reply {
                rule: PING_RULE,
                value: &PONG,
            };
        }
        // Linear on purpose: a handful of rules, consulted only while an upstream is down.
        for rule in &self.rules {
            if rule.matches(name, is_write, is_read, keys) {
                return match &rule.action {
                    Action::Reply(value) => Decision::Reply {
                        rule: &rule.name,
                        value,
                    },
                    Action::Queue(value) => Decision::Queue {
                        rule: &rule.name,
                        value,
                    },
                    Action::Error(message) => Decision::Error {
                        rule: &rule.name,
                        message,
                    },
                };
            }
        }
        Decision::Error {
            rule: DEFAULT_RULE,
            message: &self.default_error,
        }
    }

    /// Every name [`Decision::rule`] can return, for registering metric labels up front.
    pub fn rule_names(&self) -> impl Iterator<Item = &str> {
        let ping = self.ping_locally.then_some(PING_RULE);
        ping.into_iter()
            .chain(self.rules.iter().map(|r| r.name.as_str()))
            .chain(std::iter::once(DEFAULT_RULE))
    }

    pub fn ping_locally(&self) -> bool {
        self.ping_locally
    }
}

impl Default for FailOpen {
    /// No rules: `PING` answered locally, everything else the default error.
    fn default() -> Self {
        FailOpen {
            rules: Vec::new(),
            ping_locally: true,
            default_error: DEFAULT_ERROR.to_owned(),
        }
    }
}

fn compile_commands(
    cfg: &FailOpenConfig,
    rc: &RuleConfig,
    at: &str,
    known_command: impl Fn(&str) -> bool,
) -> Result<CommandSet, String> {
    if rc.commands.is_empty() {
        return Err(format!(
            "{at}.commands: empty; list command names or classes (\"@write\", \"@read\", \
             \"@all\")"
        ));
    }
    let mut set = CommandSet::default();
    for (k, command) in rc.commands.iter().enumerate() {
        let field = format!("{at}.commands[{k}]");
        if let Some(class) = command.strip_prefix('@') {
            match class.to_ascii_lowercase().as_str() {
                "write" => set.writes = true,
                "read" => set.reads = true,
                "all" => set.all = true,
                _ => {
                    return Err(format!(
                        "{field}: unknown class \"{command}\"; expected \"@write\", \"@read\" \
                         or \"@all\""
                    ));
                }
            }
            continue;
        }
        if command.is_empty() || !command.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!("{field}: invalid command name {command:?}"));
        }
        let lower = command.to_ascii_lowercase();
        if !known_command(&lower) {
            return Err(format!("{field}: unknown command \"{command}\""));
        }
        if cfg.ping_locally && lower == "ping" {
            return Err(format!(
                "{field}: PING is answered locally while fail_open.ping_locally = true; \
                 remove it here or set ping_locally = false"
            ));
        }
        set.names.push(lower.into_boxed_str());
    }
    Ok(set)
}

fn compile_action(
    cfg: &FailOpenConfig,
    rc: &RuleConfig,
    at: &str,
    commands: &CommandSet,
) -> Result<Action, String> {
    let kind = match rc.action {
        ActionKind::Reply => "reply",
        ActionKind::Queue => "queue",
        ActionKind::Error => {
            if rc.reply.is_some() {
                return Err(format!(
                    "{at}.reply: not used with action = \"error\"; set message instead"
                ));
            }
            let message = rc.message.as_deref().unwrap_or(&cfg.default_error);
            validate_error_text(message).map_err(|e| format!("{at}.message: {e}"))?;
            return Ok(Action::Error(message.to_owned()));
        }
    };
    if rc.message.is_some() {
        return Err(format!(
            "{at}.message: only used with action = \"error\"; action = \"{kind}\" answers \
             with reply"
        ));
    }
    let Some(text) = &rc.reply else {
        return Err(format!(
            "{at}.reply: required with action = \"{kind}\" (e.g. reply = \"+OK\", or \":1\" \
             for commands that return an integer)"
        ));
    };
    let value = ReplyValue::parse(text).map_err(|e| format!("{at}.reply: {e}"))?;
    if rc.action == ActionKind::Reply {
        return Ok(Action::Reply(value));
    }
    if value.is_error() {
        // The client would retry a write the journal is going to replay anyway, applying
        // it twice.
        return Err(format!(
            "{at}.reply: a queued write must not reply with an error; use e.g. \"+OK\""
        ));
    }
    if commands.reads || commands.all {
        return Err(format!(
            "{at}.commands: queue rules journal writes; \"@read\" and \"@all\" are not allowed"
        ));
    }
    Ok(Action::Queue(value))
}

/// An error text is sent as `-{text}\r\n`, so it must be one non-empty line, and the
/// prefix is ours to add.
fn validate_error_text(text: &str) -> Result<(), String> {
    if text.trim().is_empty() {
        return Err("empty error message".into());
    }
    if text.contains(['\r', '\n']) {
        return Err("error message must be a single line (no \\r or \\n)".into());
    }
    if text.starts_with('-') {
        return Err(format!(
            "error message {text:?} must not start with '-' (it is added); write e.g. \
             \"ERR ...\""
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Cache policy
// ---------------------------------------------------------------------------------------

/// Compiled `[cache]` policy.
#[derive(Debug, Clone)]
pub struct CachePolicy {
    max_stale: Duration,
    cache_nil: bool,
    miss: MissReply,
    include: Vec<Glob>,
    exclude: Vec<Glob>,
    /// Patterns that set `max_stale_ms`, in file order.
    stale: Vec<(Glob, Duration)>,
    /// Patterns that set `miss`, in file order.
    misses: Vec<(Glob, MissReply)>,
}

impl CachePolicy {
    /// Validates and compiles the policy.
    pub fn compile(cfg: &CachePolicyConfig) -> Result<CachePolicy, String> {
        let globs = |list: &[String], field: &str| -> Result<Vec<Glob>, String> {
            list.iter()
                .enumerate()
                .map(|(i, g)| compile_glob(g, &format!("cache.{field}[{i}]")))
                .collect()
        };
        let mut policy = CachePolicy {
            max_stale: Duration::from_millis(cfg.max_stale_ms),
            cache_nil: cfg.cache_nil,
            miss: cfg.miss.clone(),
            include: globs(&cfg.include, "include")?,
            exclude: globs(&cfg.exclude, "exclude")?,
            stale: Vec::new(),
            misses: Vec::new(),
        };
        for (i, pattern) in cfg.patterns.iter().enumerate() {
            let at = format!("cache.patterns[{i}]");
            let glob = compile_glob(&pattern.keys, &format!("{at}.keys"))?;
            if pattern.max_stale_ms.is_none() && pattern.miss.is_none() {
                return Err(format!("{at}: sets neither max_stale_ms nor miss"));
            }
            if let Some(ms) = pattern.max_stale_ms {
                policy.stale.push((glob.clone(), Duration::from_millis(ms)));
            }
            if let Some(miss) = &pattern.miss {
                policy.misses.push((glob, miss.clone()));
            }
        }
        Ok(policy)
    }

    /// Whether replies for `key` may be cached: it matches an `include` glob (or `include`
    /// is empty) and no `exclude` glob.
    pub fn cacheable_key(&self, key: &[u8]) -> bool {
        (self.include.is_empty() || self.include.iter().any(|g| g.matches(key)))
            && !self.exclude.iter().any(|g| g.matches(key))
    }

    /// How stale a cached value for `key` may be when served in degraded mode: the first
    /// pattern matching `key` that sets `max_stale_ms`, else the default.
    pub fn max_stale(&self, key: &[u8]) -> Duration {
        self.stale
            .iter()
            .find(|(glob, _)| glob.matches(key))
            .map_or(self.max_stale, |&(_, d)| d)
    }

    /// The reply to a degraded-mode cache miss on `key`: the first pattern matching `key`
    /// that sets `miss`, else the default.
    pub fn miss_reply(&self, key: &[u8]) -> &MissReply {
        self.misses
            .iter()
            .find(|(glob, _)| glob.matches(key))
            .map_or(&self.miss, |(_, m)| m)
    }

    /// Whether nil replies are cached.
    pub fn cache_nil(&self) -> bool {
        self.cache_nil
    }
}

impl Default for CachePolicy {
    /// Every key cacheable, 300 s max staleness, nil on a miss.
    fn default() -> Self {
        CachePolicy {
            max_stale: Duration::from_millis(DEFAULT_MAX_STALE_MS),
            cache_nil: true,
            miss: MissReply::Nil,
            include: Vec::new(),
            exclude: Vec::new(),
            stale: Vec::new(),
            misses: Vec::new(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn m(pattern: &str, subject: &str) -> bool {
        glob_match(pattern.as_bytes(), subject.as_bytes())
    }

    #[test]
    fn glob_question_mark() {
        assert!(m("h?llo", "hello"));
        assert!(m("h?llo", "hallo"));
        assert!(m("h?llo", "hxllo"));
        assert!(!m("h?llo", "hllo"));
        assert!(!m("h?llo", "heello"));
    }

    #[test]
    fn glob_star() {
        assert!(m("h*llo", "hllo"));
        assert!(m("h*llo", "heeeello"));
        assert!(!m("h*llo", "heeeellox"));
        assert!(m("*", "anything"));
        assert!(m("*", ""));
        assert!(m("**", ""));
        assert!(m("ratelimit:*", "ratelimit:"));
        assert!(m("ratelimit:*", "ratelimit:user:42"));
        assert!(!m("ratelimit:*", "ratelimit"));
        assert!(m("*:*:*", "a:b:c"));
        assert!(!m("*:*:*", "a:b"));
        assert!(m("a*b*c", "abc"));
        assert!(m("a*b*c", "axxbyyc"));
        assert!(!m("a*b*c", "axxbyy"));
        assert!(!m("", "a"));
        assert!(m("", ""));
        assert!(!m("a", ""));
    }

    #[test]
    fn glob_classes() {
        assert!(m("h[ae]llo", "hello"));
        assert!(m("h[ae]llo", "hallo"));
        assert!(!m("h[ae]llo", "hillo"));
        assert!(m("h[^e]llo", "hallo"));
        assert!(m("h[^e]llo", "hbllo"));
        assert!(!m("h[^e]llo", "hello"));
        assert!(m("h[a-b]llo", "hallo"));
        assert!(m("h[a-b]llo", "hbllo"));
        assert!(!m("h[a-b]llo", "hcllo"));
        // Reversed ranges are normalised, as in Redis.
        assert!(m("h[b-a]llo", "hallo"));
        assert!(m("[a-cx]", "x"));
        assert!(!m("[^a-c]", "b"));
    }

    #[test]
    fn glob_escapes() {
        assert!(m(r"h\*llo", "h*llo"));
        assert!(!m(r"h\*llo", "hello"));
        assert!(m(r"h\?llo", "h?llo"));
        assert!(!m(r"h\?llo", "hallo"));
        assert!(m(r"\[a]", "[a]"));
        assert!(m(r"a\\b", r"a\b"));
        assert!(m(r"[\]]", "]"));
        assert!(m(r"[\-]", "-"));
        assert!(!m(r"[\-]", r"\"));
        // A trailing backslash is a literal backslash.
        assert!(m(r"a\", r"a\"));
        assert!(!m(r"a\", "a"));
    }

    #[test]
    fn glob_malformed_classes_follow_redis() {
        // Unterminated: the class runs to the end of the pattern.
        assert!(m("[ab", "a"));
        assert!(m("x[ab", "xb"));
        assert!(!m("x[ab", "xc"));
        // Empty class matches nothing, its negation any byte.
        assert!(!m("[]", "a"));
        assert!(m("[^]", "a"));
        assert!(!m("[", "["));
        assert!(m("[^", "z"));
        // `[a-]` is the range a..=] (reversed to ]..=a), and swallows the `]`.
        assert!(m("[a-]", "^"));
        assert!(!m("[a-]", "b"));
    }

    #[test]
    fn glob_binary() {
        assert!(glob_match(b"\x00\xff*", b"\x00\xff\x01\x02"));
        assert!(!glob_match(b"\x00\xff*", b"\x00\xfe"));
        assert!(glob_match(b"?\x00?", b"\xff\x00\x80"));
        assert!(glob_match(b"[\x80-\xff]", b"\x90"));
        assert!(!glob_match(b"[\x80-\xff]", b"\x10"));
        assert!(glob_match(b"a\\\xffb", b"a\xffb"));
        assert!(glob_match(b"*\r\n*", b"x\r\ny"));
    }

    #[test]
    fn glob_pathological_patterns_stay_fast() {
        let subject = vec![b'a'; 200_000];
        let started = Instant::now();
        assert!(!glob_match(b"a*a*a*a*a*a*a*a*a*a*b", &subject));
        assert!(!glob_match(
            b"*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b",
            &subject
        ));
        assert!(glob_match(b"a*a*a*a*a*a*a*a*a*a*", &subject));
        assert!(!glob_match(b"*[^a]*", &subject));
        // A naive backtracking matcher needs years for these; allow generous slack for
        // unoptimised builds on a loaded machine.
        assert!(
            started.elapsed().as_secs() < 5,
            "took {:?}",
            started.elapsed()
        );
    }

    /// Exponential but obviously correct star handling, to check the iterative matcher
    /// and the compiled fast paths against.
    fn naive(pattern: &[u8], subject: &[u8]) -> bool {
        match pattern.first() {
            None => subject.is_empty(),
            Some(b'*') => (0..=subject.len()).any(|k| naive(&pattern[1..], &subject[k..])),
            Some(_) => match subject.first() {
                None => false,
                Some(&c) => match match_token(pattern, 0, c) {
                    Some(next) => naive(&pattern[next..], &subject[1..]),
                    None => false,
                },
            },
        }
    }

    #[test]
    fn glob_agrees_with_naive_matcher_and_fast_paths() {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let pattern_bytes = b"ab*?[]^-\\";
        let subject_bytes = b"ab-]^\\";
        let mut matches = 0;
        for _ in 0..50_000 {
            let plen = (next() % 8) as usize;
            let slen = (next() % 8) as usize;
            let pattern: Vec<u8> = (0..plen)
                .map(|_| pattern_bytes[(next() % pattern_bytes.len() as u64) as usize])
                .collect();
            let subject: Vec<u8> = (0..slen)
                .map(|_| subject_bytes[(next() % subject_bytes.len() as u64) as usize])
                .collect();
            let expected = naive(&pattern, &subject);
            matches += usize::from(expected);
            assert_eq!(
                glob_match(&pattern, &subject),
                expected,
                "pattern {:?} subject {:?}",
                String::from_utf8_lossy(&pattern),
                String::from_utf8_lossy(&subject)
            );
            assert_eq!(
                Glob::compile(&pattern).matches(&subject),
                expected,
                "compiled pattern {:?} subject {:?}",
                String::from_utf8_lossy(&pattern),
                String::from_utf8_lossy(&subject)
            );
        }
        // Guard against a generator that only ever produces mismatches.
        assert!(matches > 1_000, "only {matches} matches");
    }

    #[test]
    fn glob_compiles_common_shapes() {
        assert!(matches!(Glob::compile(b"*"), Glob::Any));
        assert!(matches!(Glob::compile(b"**"), Glob::Any));
        assert!(matches!(Glob::compile(b"user:*"), Glob::Prefix(p) if &*p == b"user:"));
        assert!(matches!(Glob::compile(br"a\*b"), Glob::Exact(p) if &*p == b"a*b"));
        assert!(matches!(Glob::compile(b"a*b"), Glob::General(_)));
        assert!(matches!(Glob::compile(br"a\*"), Glob::Exact(p) if &*p == b"a*"));
    }

    fn enc(s: &str) -> (Vec<u8>, Vec<u8>) {
        let v = ReplyValue::parse(s).unwrap_or_else(|e| panic!("{s:?}: {e}"));
        (v.encode(false).to_vec(), v.encode(true).to_vec())
    }

    fn same(s: &str, wire: &[u8]) {
        assert_eq!(enc(s), (wire.to_vec(), wire.to_vec()), "{s:?}");
    }

    #[test]
    fn reply_compact_forms() {
        same("+OK", b"+OK\r\n");
        same("-ERR nope", b"-ERR nope\r\n");
        same(":1", b":1\r\n");
        same(":-42", b":-42\r\n");
        same("$text", b"$4\r\ntext\r\n");
        same("$", b"$0\r\n\r\n");
        same("$a\r\nb", b"$4\r\na\r\nb\r\n");
        same("[]", b"*0\r\n");
        same("*0", b"*0\r\n");
        assert_eq!(enc("nil"), (b"$-1\r\n".to_vec(), b"_\r\n".to_vec()));
        assert_eq!(enc("{}"), (b"*0\r\n".to_vec(), b"%0\r\n".to_vec()));
        assert_eq!(enc("_"), (b"$-1\r\n".to_vec(), b"_\r\n".to_vec()));
        assert_eq!(enc("#t"), (b":1\r\n".to_vec(), b"#t\r\n".to_vec()));
        assert_eq!(
            enc(",1.5"),
            (b"$3\r\n1.5\r\n".to_vec(), b",1.5\r\n".to_vec())
        );
        assert!(ReplyValue::parse("-ERR x").unwrap().is_error());
        assert!(!ReplyValue::parse("+OK").unwrap().is_error());
    }

    #[test]
    fn reply_raw_forms() {
        same(":0\r\n", b":0\r\n");
        same("+OK\r\n", b"+OK\r\n");
        same("*2\r\n$1\r\na\r\n:1\r\n", b"*2\r\n$1\r\na\r\n:1\r\n");
        assert_eq!(enc("$-1\r\n"), (b"$-1\r\n".to_vec(), b"_\r\n".to_vec()));
        assert_eq!(enc("*-1\r\n"), (b"*-1\r\n".to_vec(), b"_\r\n".to_vec()));
        assert_eq!(
            enc("%1\r\n+k\r\n:1\r\n"),
            (
                b"*2\r\n+k\r\n:1\r\n".to_vec(),
                b"%1\r\n+k\r\n:1\r\n".to_vec()
            )
        );
        assert_eq!(
            enc("~1\r\n_\r\n"),
            (b"*1\r\n$-1\r\n".to_vec(), b"~1\r\n_\r\n".to_vec())
        );
        assert_eq!(
            enc("=8\r\ntxt:abcd\r\n"),
            (b"$4\r\nabcd\r\n".to_vec(), b"=8\r\ntxt:abcd\r\n".to_vec())
        );
        assert_eq!(
            enc("!7\r\nERR bad\r\n"),
            (b"-ERR bad\r\n".to_vec(), b"!7\r\nERR bad\r\n".to_vec())
        );
        assert_eq!(
            enc("(12345678901234567890\r\n"),
            (
                b"$20\r\n12345678901234567890\r\n".to_vec(),
                b"(12345678901234567890\r\n".to_vec()
            )
        );
        // Equal when the wire bytes are, whatever the spelling.
        assert_eq!(
            ReplyValue::parse("+OK").unwrap(),
            ReplyValue::parse("+OK\r\n").unwrap()
        );
        assert_ne!(
            ReplyValue::parse("[]").unwrap(),
            ReplyValue::parse("{}").unwrap()
        );
    }

    #[test]
    fn reply_rejects_malformed() {
        for bad in [
            "",
            "OK",
            "nope",
            ":abc",
            ":1.5",
            "+a\r\nb",
            "*2",
            "*1\r\n",
            "$5\r\nab\r\n",
            "$2\r\nabc\r\n",
            "+OK\r\n+OK\r\n",
            "$-2\r\n",
            "~-1\r\n",
            "#x",
            ",abc",
            "(12a",
            "_x",
            "=3\r\nabc\r\n",
            "!3\r\na\nb\r\n",
            ">1\r\n+x\r\n",
            "|1\r\n+a\r\n+b\r\n+c\r\n",
            "*99999999999\r\n",
            "+OK\n",
        ] {
            assert!(ReplyValue::parse(bad).is_err(), "{bad:?} accepted");
        }
        let deep = format!("{}:1\r\n", "*1\r\n".repeat(MAX_REPLY_DEPTH + 1));
        assert!(ReplyValue::parse(&deep).unwrap_err().contains("nested"));
        let shallow = format!("{}:1\r\n", "*1\r\n".repeat(MAX_REPLY_DEPTH - 1));
        assert!(ReplyValue::parse(&shallow).is_ok());
    }

    #[test]
    fn static_replies_match_their_source() {
        assert_eq!(NIL, ReplyValue::parse(NIL.as_str()).unwrap());
        assert_eq!(PONG, ReplyValue::parse(PONG.as_str()).unwrap());
        assert_eq!(
            MISS_ERROR_REPLY,
            ReplyValue::parse(MISS_ERROR_REPLY.as_str()).unwrap()
        );
        assert_eq!(MISS_ERROR_REPLY.as_str(), format!("-{MISS_ERROR}"));
        assert!(MISS_ERROR_REPLY.is_error());
    }

    fn rule(
        commands: &[&str],
        keys: &[&str],
        action: ActionKind,
        reply: Option<&str>,
    ) -> RuleConfig {
        RuleConfig {
            name: None,
            commands: commands.iter().map(|s| s.to_string()).collect(),
            keys: keys.iter().map(|s| s.to_string()).collect(),
            action,
            reply: reply.map(str::to_owned),
            message: None,
        }
    }

    fn fail_open(rules: Vec<RuleConfig>) -> FailOpen {
        FailOpen::compile(&FailOpenConfig {
            rules,
            ..FailOpenConfig::default()
        })
        .unwrap()
    }

    fn reply_of(d: Decision<'_>) -> (&str, &str) {
        match d {
            Decision::Reply { rule, value } => (rule, value.as_str()),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    #[test]
    fn first_matching_rule_wins() {
        let f = fail_open(vec![
            rule(&["INCR"], &["ratelimit:*"], ActionKind::Reply, Some(":1")),
            rule(&["incr"], &[], ActionKind::Reply, Some(":0")),
            rule(
                &["@write"],
                &["ratelimit:*"],
                ActionKind::Reply,
                Some("+OK"),
            ),
        ]);
        assert_eq!(
            reply_of(f.decide("incr", true, false, &[b"ratelimit:u1"])),
            ("rules[0]", ":1")
        );
        assert_eq!(
            reply_of(f.decide("incr", true, false, &[b"other"])),
            ("rules[1]", ":0")
        );
        assert_eq!(
            reply_of(f.decide("set", true, false, &[b"ratelimit:u1"])),
            ("rules[2]", "+OK")
        );
        // Reordered, the broad rule shadows the specific one.
        let f = fail_open(vec![
            rule(&["incr"], &[], ActionKind::Reply, Some(":0")),
            rule(&["INCR"], &["ratelimit:*"], ActionKind::Reply, Some(":1")),
        ]);
        assert_eq!(
            reply_of(f.decide("incr", true, false, &[b"ratelimit:u1"])),
            ("rules[0]", ":0")
        );
    }

    #[test]
    fn command_classes() {
        let f = fail_open(vec![
            rule(&["@write"], &[], ActionKind::Reply, Some("+OK")),
            rule(&["@read"], &[], ActionKind::Reply, Some("nil")),
        ]);
        assert_eq!(
            reply_of(f.decide("set", true, false, &[b"k"])).0,
            "rules[0]"
        );
        assert_eq!(
            reply_of(f.decide("get", false, true, &[b"k"])).0,
            "rules[1]"
        );
        // Neither class: falls through to the default.
        assert!(matches!(
            f.decide("client", false, false, &[]),
            Decision::Error {
                rule: "default",
                ..
            }
        ));
        let f = fail_open(vec![rule(&["@ALL"], &[], ActionKind::Reply, Some("+OK"))]);
        assert_eq!(
            reply_of(f.decide("client", false, false, &[])).0,
            "rules[0]"
        );
    }

    #[test]
    fn key_globs_must_match_every_key() {
        let f = fail_open(vec![rule(
            &["del", "mset"],
            &["session:*", "tmp:*"],
            ActionKind::Reply,
            Some(":0"),
        )]);
        assert_eq!(
            reply_of(f.decide("del", true, false, &[b"session:1", b"tmp:2", b"session:3"])).0,
            "rules[0]"
        );
        assert!(matches!(
            f.decide("del", true, false, &[b"session:1", b"user:2"]),
            Decision::Error {
                rule: "default",
                ..
            }
        ));
    }

    #[test]
    fn keyless_commands_match_only_rules_without_keys() {
        let f = fail_open(vec![
            rule(&["@write"], &["*"], ActionKind::Reply, Some("+OK")),
            rule(
                &["flushall", "publish"],
                &[],
                ActionKind::Reply,
                Some("+OK"),
            ),
        ]);
        // `keys = ["*"]` still needs a key.
        assert!(matches!(
            f.decide("flushdb", true, false, &[]),
            Decision::Error {
                rule: "default",
                ..
            }
        ));
        assert_eq!(
            reply_of(f.decide("flushall", true, false, &[])).0,
            "rules[1]"
        );
        assert_eq!(reply_of(f.decide("set", true, false, &[b""])).0, "rules[0]");
    }

    #[test]
    fn unmatched_gets_default_error_and_ping_is_local() {
        let f = fail_open(vec![]);
        assert_eq!(
            f.decide("set", true, false, &[b"k"]),
            Decision::Error {
                rule: "default",
                message: DEFAULT_ERROR
            }
        );
        let d = f.decide("PING", false, false, &[]);
        assert_eq!(reply_of(d), ("ping_locally", "+PONG"));
        if let Decision::Reply { value, .. } = d {
            assert_eq!(&value.encode(true)[..], b"+PONG\r\n");
        }
        let f = FailOpen::compile(&FailOpenConfig {
            ping_locally: false,
            default_error: "ERR down".into(),
            ..FailOpenConfig::default()
        })
        .unwrap();
        assert_eq!(
            f.decide("ping", false, false, &[]),
            Decision::Error {
                rule: "default",
                message: "ERR down"
            }
        );
        assert_eq!(f.rule_names().collect::<Vec<_>>(), ["default"]);
    }

    #[test]
    fn error_and_queue_actions() {
        let mut err = rule(&["del"], &[], ActionKind::Error, None);
        err.message = Some("ERR deletes disabled".into());
        let named_err = RuleConfig {
            name: Some("no-flush".into()),
            ..rule(&["flushall"], &[], ActionKind::Error, None)
        };
        let queue = rule(&["incr"], &["counter:*"], ActionKind::Queue, Some(":0"));
        let f = fail_open(vec![err, named_err, queue]);
        assert_eq!(
            f.decide("del", true, false, &[b"x"]),
            Decision::Error {
                rule: "rules[0]",
                message: "ERR deletes disabled"
            }
        );
        assert_eq!(
            f.decide("flushall", true, false, &[]),
            Decision::Error {
                rule: "no-flush",
                message: DEFAULT_ERROR
            }
        );
        match f.decide("incr", true, false, &[b"counter:views"]) {
            Decision::Queue { rule, value } => {
                assert_eq!(rule, "rules[2]");
                assert_eq!(&value.encode(false)[..], b":0\r\n");
            }
            other => panic!("expected queue, got {other:?}"),
        }
        assert_eq!(
            f.rule_names().collect::<Vec<_>>(),
            [
                "ping_locally",
                "rules[0]",
                "no-flush",
                "rules[2]",
                "default"
            ]
        );
    }

    fn compile_err(rules: Vec<RuleConfig>) -> String {
        FailOpen::compile(&FailOpenConfig {
            rules,
            ..FailOpenConfig::default()
        })
        .unwrap_err()
    }

    #[test]
    fn rule_validation_names_the_field() {
        let ok = rule(&["set"], &[], ActionKind::Reply, Some("+OK"));
        let err = compile_err(vec![
            ok.clone(),
            ok.clone(),
            rule(&["incr"], &[], ActionKind::Queue, None),
        ]);
        assert!(
            err.starts_with("fail_open.rules[2].reply: required"),
            "{err}"
        );
        assert!(err.contains("+OK"), "{err}");

        let err = compile_err(vec![rule(&["set"], &[], ActionKind::Reply, None)]);
        assert!(
            err.starts_with("fail_open.rules[0].reply: required"),
            "{err}"
        );

        let err = compile_err(vec![rule(&["incr"], &[], ActionKind::Reply, Some(":x"))]);
        assert_eq!(
            err,
            "fail_open.rules[0].reply: invalid reply \":x\": invalid integer (in the value \
             starting at byte 0)"
        );

        let err = compile_err(vec![rule(
            &["incr"],
            &[],
            ActionKind::Queue,
            Some("-ERR no"),
        )]);
        assert!(
            err.starts_with("fail_open.rules[0].reply: a queued write"),
            "{err}"
        );

        let err = compile_err(vec![rule(&["@read"], &[], ActionKind::Queue, Some("+OK"))]);
        assert!(err.starts_with("fail_open.rules[0].commands"), "{err}");

        let err = compile_err(vec![rule(&["del"], &[], ActionKind::Error, Some("+OK"))]);
        assert!(
            err.starts_with("fail_open.rules[0].reply: not used"),
            "{err}"
        );

        let mut with_message = ok.clone();
        with_message.message = Some("ERR x".into());
        let err = compile_err(vec![with_message]);
        assert!(err.starts_with("fail_open.rules[0].message"), "{err}");

        let mut bad_message = rule(&["del"], &[], ActionKind::Error, None);
        bad_message.message = Some("-ERR x".into());
        let err = compile_err(vec![bad_message]);
        assert!(err.starts_with("fail_open.rules[0].message"), "{err}");

        let err = compile_err(vec![rule(&[], &[], ActionKind::Reply, Some("+OK"))]);
        assert!(
            err.starts_with("fail_open.rules[0].commands: empty"),
            "{err}"
        );

        let err = compile_err(vec![rule(
            &["set", "@writes"],
            &[],
            ActionKind::Reply,
            Some("+OK"),
        )]);
        assert!(
            err.starts_with("fail_open.rules[0].commands[1]: unknown class"),
            "{err}"
        );

        let err = compile_err(vec![rule(&["ping"], &[], ActionKind::Reply, Some("+OK"))]);
        assert!(
            err.starts_with("fail_open.rules[0].commands[0]: PING"),
            "{err}"
        );

        let err = compile_err(vec![rule(
            &["set"],
            &["a:*", ""],
            ActionKind::Reply,
            Some("+OK"),
        )]);
        assert!(
            err.starts_with("fail_open.rules[0].keys[1]: empty"),
            "{err}"
        );

        let err = compile_err(vec![
            rule(&["@all"], &[], ActionKind::Error, None),
            ok.clone(),
        ]);
        assert!(err.starts_with("fail_open.rules[1]: unreachable"), "{err}");

        let named = RuleConfig {
            name: Some("x".into()),
            ..ok.clone()
        };
        let err = compile_err(vec![named.clone(), named]);
        assert!(
            err.starts_with("fail_open.rules[1].name: duplicate"),
            "{err}"
        );

        let reserved = RuleConfig {
            name: Some("default".into()),
            ..ok.clone()
        };
        let err = compile_err(vec![reserved]);
        assert!(err.starts_with("fail_open.rules[0].name"), "{err}");
        let generated = RuleConfig {
            name: Some("rules[1]".into()),
            ..ok.clone()
        };
        let err = compile_err(vec![generated, ok.clone()]);
        assert!(err.starts_with("fail_open.rules[0].name"), "{err}");

        let err = FailOpen::compile(&FailOpenConfig {
            default_error: "oops\r\n".into(),
            ..FailOpenConfig::default()
        })
        .unwrap_err();
        assert!(err.starts_with("fail_open.default_error"), "{err}");

        let err = FailOpen::compile_checked(
            &FailOpenConfig {
                rules: vec![rule(&["set", "INCRR"], &[], ActionKind::Reply, Some("+OK"))],
                ..FailOpenConfig::default()
            },
            |name| matches!(name, "set" | "incr"),
        )
        .unwrap_err();
        assert_eq!(
            err,
            "fail_open.rules[0].commands[1]: unknown command \"INCRR\""
        );
    }

    fn pattern(keys: &str, max_stale_ms: Option<u64>, miss: Option<&str>) -> PatternConfig {
        PatternConfig {
            keys: keys.into(),
            max_stale_ms,
            miss: miss.map(|s| MissReply::try_from(s.to_owned()).unwrap()),
        }
    }

    #[test]
    fn cache_include_exclude() {
        let p = CachePolicy::compile(&CachePolicyConfig::default()).unwrap();
        assert!(p.cacheable_key(b"anything"));
        assert!(p.cacheable_key(b""));

        let p = CachePolicy::compile(&CachePolicyConfig {
            include: vec!["user:*".into(), "recs:*".into()],
            exclude: vec!["user:*:token".into()],
            ..CachePolicyConfig::default()
        })
        .unwrap();
        assert!(p.cacheable_key(b"user:1"));
        assert!(p.cacheable_key(b"recs:1"));
        assert!(!p.cacheable_key(b"user:1:token"));
        assert!(!p.cacheable_key(b"session:1"));

        let p = CachePolicy::compile(&CachePolicyConfig {
            exclude: vec!["lock:*".into()],
            ..CachePolicyConfig::default()
        })
        .unwrap();
        assert!(p.cacheable_key(b"user:1"));
        assert!(!p.cacheable_key(b"lock:1"));
    }

    #[test]
    fn cache_per_pattern_max_stale_and_miss() {
        let p = CachePolicy::compile(&CachePolicyConfig {
            max_stale_ms: 1_000,
            miss: MissReply::Error,
            patterns: vec![
                pattern("recs:hot:*", Some(10), None),
                pattern("recs:*", Some(60_000), Some("[]")),
                pattern("session:*", None, Some("nil")),
            ],
            ..CachePolicyConfig::default()
        })
        .unwrap();
        assert_eq!(p.max_stale(b"recs:hot:1"), Duration::from_millis(10));
        assert_eq!(p.max_stale(b"recs:1"), Duration::from_millis(60_000));
        assert_eq!(p.max_stale(b"session:1"), Duration::from_millis(1_000));
        assert_eq!(p.max_stale(b"other"), Duration::from_millis(1_000));
        // The narrow pattern sets only max_stale, so the broader pattern's miss applies.
        assert_eq!(&p.miss_reply(b"recs:hot:1").encode(true)[..], b"*0\r\n");
        assert_eq!(p.miss_reply(b"session:1"), &MissReply::Nil);
        assert_eq!(&p.miss_reply(b"session:1").encode(true)[..], b"_\r\n");
        assert_eq!(p.miss_reply(b"other"), &MissReply::Error);
        assert_eq!(
            &p.miss_reply(b"other").encode(false)[..],
            format!("-{MISS_ERROR}\r\n").as_bytes()
        );

        let d = CachePolicy::default();
        assert_eq!(d.max_stale(b"k"), Duration::from_secs(300));
        assert_eq!(d.miss_reply(b"k"), &MissReply::Nil);
        assert!(d.cache_nil());
    }

    #[test]
    fn cache_validation_names_the_field() {
        let err = CachePolicy::compile(&CachePolicyConfig {
            patterns: vec![pattern("a:*", Some(1), None), pattern("b:*", None, None)],
            ..CachePolicyConfig::default()
        })
        .unwrap_err();
        assert!(err.starts_with("cache.patterns[1]: sets neither"), "{err}");
        let err = CachePolicy::compile(&CachePolicyConfig {
            exclude: vec!["a".into(), "".into()],
            ..CachePolicyConfig::default()
        })
        .unwrap_err();
        assert!(err.starts_with("cache.exclude[1]: empty"), "{err}");
        let err = CachePolicy::compile(&CachePolicyConfig {
            patterns: vec![pattern("", Some(1), None)],
            ..CachePolicyConfig::default()
        })
        .unwrap_err();
        assert!(err.starts_with("cache.patterns[0].keys: empty"), "{err}");
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        fail_open: FailOpenConfig,
        cache: CachePolicyConfig,
    }

    const REALISTIC: &str = r#"
[fail_open]
ping_locally = true

# Rate limiting fails open: every caller looks like its first request in the window.
[[fail_open.rules]]
name = "rate-limit"
commands = ["INCR", "INCRBY", "EXPIRE"]
keys = ["ratelimit:*"]
action = "reply"
reply = ":1"

# Page-view counters are journaled and replayed; ":0" marks the reply as a placeholder.
[[fail_open.rules]]
name = "page-views"
commands = ["INCR"]
keys = ["counter:*"]
action = "queue"
reply = ":0"

[[fail_open.rules]]
name = "sessions"
commands = ["SET"]
keys = ["session:*"]
action = "reply"
reply = "+OK"

[[fail_open.rules]]
name = "session-logout"
commands = ["DEL"]
keys = ["session:*"]
action = "reply"
reply = ":0"

[[fail_open.rules]]
name = "everything-else"
commands = ["@write"]
action = "error"
message = "ERR redfuse: writes are unavailable"

[cache]
max_stale_ms = 300000
miss = "nil"
exclude = ["ratelimit:*", "counter:*"]

[[cache.patterns]]
keys = "session:*"
max_stale_ms = 60000
miss = "nil"

[[cache.patterns]]
keys = "recs:*"
max_stale_ms = 3600000
miss = "[]"
"#;

    #[test]
    fn toml_round_trip_of_a_realistic_config() {
        let file: File = toml::from_str(REALISTIC).unwrap();
        let written = toml::to_string(&file).unwrap();
        let reread: File = toml::from_str(&written).unwrap();
        assert_eq!(file, reread, "written back as:\n{written}");
        assert_eq!(file.fail_open.default_error, DEFAULT_ERROR);
        assert!(file.cache.cache_nil);

        let rules = FailOpen::compile(&file.fail_open).unwrap();
        assert_eq!(
            reply_of(rules.decide("incr", true, false, &[b"ratelimit:api:42"])),
            ("rate-limit", ":1")
        );
        assert_eq!(
            reply_of(rules.decide("expire", true, false, &[b"ratelimit:api:42"])),
            ("rate-limit", ":1")
        );
        assert!(matches!(
            rules.decide("incr", true, false, &[b"counter:home"]),
            Decision::Queue { rule: "page-views", value } if value.as_str() == ":0"
        ));
        assert_eq!(
            reply_of(rules.decide("set", true, false, &[b"session:abc"])),
            ("sessions", "+OK")
        );
        assert_eq!(
            rules.decide("set", true, false, &[b"user:1"]),
            Decision::Error {
                rule: "everything-else",
                message: "ERR redfuse: writes are unavailable"
            }
        );
        assert!(matches!(
            rules.decide("client", false, false, &[]),
            Decision::Error {
                rule: "default",
                ..
            }
        ));

        let cache = CachePolicy::compile(&file.cache).unwrap();
        assert!(!cache.cacheable_key(b"ratelimit:x"));
        assert!(cache.cacheable_key(b"session:abc"));
        assert_eq!(cache.miss_reply(b"session:abc"), &MissReply::Nil);
        assert_eq!(cache.max_stale(b"session:abc"), Duration::from_secs(60));
        assert_eq!(&cache.miss_reply(b"recs:u1").encode(false)[..], b"*0\r\n");
        assert_eq!(cache.max_stale(b"recs:u1"), Duration::from_secs(3600));
        assert_eq!(cache.max_stale(b"user:1"), Duration::from_secs(300));
    }

    #[test]
    fn toml_defaults_and_errors() {
        let file: File = toml::from_str("[fail_open]\n[cache]\n").unwrap();
        assert_eq!(file.fail_open, FailOpenConfig::default());
        assert_eq!(file.cache, CachePolicyConfig::default());

        let err = toml::from_str::<File>("[fail_open]\n[cache]\nmax_stale = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_stale"), "{err}");

        let err = toml::from_str::<File>(
            "[fail_open]\n[[fail_open.rules]]\ncommands = [\"set\"]\naction = \"drop\"\n[cache]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("drop") && err.contains("queue"), "{err}");

        let err = toml::from_str::<File>("[fail_open]\n[cache]\nmiss = \"empty\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("miss"), "{err}");

        let err = toml::from_str::<File>(
            "[fail_open]\n[[fail_open.rules]]\ncommands = [\"set\"]\naction = \"reply\"\nreplay = \"+OK\"\n[cache]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("replay"), "{err}");
    }
}
