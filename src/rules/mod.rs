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
//! * **Replies are pre-encoded per protocol.** A [`ReplyValue`] (`resp::value`) is parsed
//!   from a compact string (`"+OK"`, `":1"`, `"[]"`, `"nil"`, raw RESP ...) once and stored
//!   as the exact bytes for RESP2 and RESP3 clients; answering is a refcount bump.
//! * **Binary-safe globs with Redis semantics.** Keys are bytes, so [`glob::glob_match`] works on
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

//!
//! Layout: [`glob`] (key patterns), [`failopen`] (the ordered rules for writes and key-less
//! commands), [`policy`] (which keys are cached, how stale they may be served, what a miss
//! answers), [`live`] (how a reload replaces them while requests read them).

pub mod failopen;
pub mod glob;
pub mod live;
pub mod policy;

pub use failopen::{Decision, FailOpen, FailOpenConfig};
pub use live::Live;
pub use policy::{CachePolicy, CachePolicyConfig, MissReply, PatternConfig};

/// How stale a cached value may be when served in degraded mode, unless a pattern says
/// otherwise.
pub const DEFAULT_MAX_STALE_MS: u64 = 300_000;

/// The rule name reported for commands no rule matches.
pub(crate) const DEFAULT_RULE: &str = "default";
/// The rule name reported for `PING` answered because `ping_locally = true`.
pub(crate) const PING_RULE: &str = "ping_locally";

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};
    use std::time::Duration;

    fn reply_of(d: Decision<'_>) -> (&str, &str) {
        match d {
            Decision::Reply { rule, value } => (rule, value.as_str()),
            other => panic!("expected a reply, got {other:?}"),
        }
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
        assert_eq!(file.fail_open.default_error, None);
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
                message: Some("ERR redfuse: writes are unavailable")
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
        assert_eq!(cache.miss_reply(b"session:abc"), &MissReply::Absent);
        assert_eq!(cache.max_stale(b"session:abc"), Duration::from_secs(60));
        assert_eq!(
            &cache
                .miss_reply(b"recs:u1")
                .value(crate::resp::Proto::Resp2)
                .unwrap()[..],
            b"*0\r\n"
        );
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
