//! The cache policy: which keys are cached, how stale a cached reply may be served, and
//! what a degraded read that misses the cache answers.

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::DEFAULT_MAX_STALE_MS;
use super::glob::{Glob, compile_glob};
use crate::resp::Proto;
use crate::resp::value::ReplyValue;

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
            miss: MissReply::Absent,
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

/// The reply to a cache miss while the upstream is down. In TOML a string: `"nil"` (also
/// spelt `"absent"`), `"error"`, or any other [`ReplyValue`] (`"[]"`, `":0"`,
/// `"-ERR custom"` ...).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum MissReply {
    /// What Redis answers for a key that does not exist, typed per command (`nil` for
    /// `GET`, `0` for `EXISTS` and `LLEN`, an empty array for `LRANGE`, an empty map for
    /// `HGETALL` in RESP3 ...): the application treats the key as absent and uses its own
    /// fallback.
    #[default]
    Absent,
    /// An error naming the upstream and why it cannot answer.
    Error,
    /// A configured value.
    Value(ReplyValue),
}

impl MissReply {
    /// The configured value, for [`MissReply::Value`].
    pub fn value(&self, proto: Proto) -> Option<Bytes> {
        match self {
            MissReply::Value(v) => Some(v.encode(proto)),
            _ => None,
        }
    }
}

impl TryFrom<String> for MissReply {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "nil" | "absent" => Ok(MissReply::Absent),
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
            MissReply::Absent => "nil".to_owned(),
            MissReply::Error => "error".to_owned(),
            MissReply::Value(v) => v.as_str().to_owned(),
        }
    }
}

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
    /// Derived from the `max_stale`s once, when compiled: it is read for every reply.
    refill_after: Duration,
}

/// The longest [`CachePolicy::refill_after`].
const MAX_REFILL_AFTER: Duration = Duration::from_secs(4);

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
            refill_after: Duration::ZERO,
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
        policy.refill_after = policy.shortest_refill();
        Ok(policy)
    }

    /// Whether replies for `key` may be cached: it matches an `include` glob (or `include`
    /// is empty) and no `exclude` glob.
    pub fn cacheable_key(&self, key: &[u8]) -> bool {
        (self.include.is_empty() || self.include.iter().any(|g| g.matches(key)))
            && !self.exclude.iter().any(|g| g.matches(key))
    }

    /// How long after a reply is stored an identical reply's fill may be skipped (see
    /// `cache::refreshed`): the entry's age then runs ahead of the truth by at most this,
    /// so it is a 64th of the shortest `max_stale` of any key (an entry is refused at most
    /// that much early in an outage), and never more than 4 s.
    pub fn refill_after(&self) -> Duration {
        self.refill_after
    }

    fn shortest_refill(&self) -> Duration {
        let shortest = self.max_stales().min().unwrap_or(self.max_stale);
        (shortest / 64).min(MAX_REFILL_AFTER)
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

    /// The longest `max_stale` of any pattern: how long anything about a write can matter
    /// to a degraded read.
    pub fn longest_max_stale(&self) -> Duration {
        self.max_stales().max().unwrap_or(self.max_stale)
    }

    /// Every `max_stale` a key can have: the default and each pattern's.
    fn max_stales(&self) -> impl Iterator<Item = Duration> + '_ {
        self.stale
            .iter()
            .map(|&(_, d)| d)
            .chain(std::iter::once(self.max_stale))
    }

    /// Whether nil replies are cached.
    pub fn cache_nil(&self) -> bool {
        self.cache_nil
    }
}

impl Default for CachePolicy {
    /// Every key cacheable, 300 s max staleness, nil on a miss.
    fn default() -> Self {
        let mut policy = CachePolicy {
            max_stale: Duration::from_millis(DEFAULT_MAX_STALE_MS),
            cache_nil: true,
            miss: MissReply::Absent,
            include: Vec::new(),
            exclude: Vec::new(),
            stale: Vec::new(),
            misses: Vec::new(),
            refill_after: Duration::ZERO,
        };
        policy.refill_after = policy.shortest_refill();
        policy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(
            &p.miss_reply(b"recs:hot:1").value(Proto::Resp3).unwrap()[..],
            b"*0\r\n"
        );
        assert_eq!(p.miss_reply(b"session:1"), &MissReply::Absent);
        assert_eq!(p.miss_reply(b"other"), &MissReply::Error);

        let d = CachePolicy::default();
        assert_eq!(d.max_stale(b"k"), Duration::from_secs(300));
        assert_eq!(d.miss_reply(b"k"), &MissReply::Absent);
        assert!(d.cache_nil());
    }

    #[test]
    fn an_unchanged_reply_is_refilled_within_a_64th_of_the_shortest_max_stale() {
        let with = |max_stale_ms, patterns| {
            CachePolicy::compile(&CachePolicyConfig {
                max_stale_ms,
                patterns,
                ..CachePolicyConfig::default()
            })
            .unwrap()
            .refill_after()
        };
        assert_eq!(with(6_400, vec![]), Duration::from_millis(100));
        let short = vec![pattern("recs:hot:*", Some(640), None)];
        assert_eq!(with(60_000, short), Duration::from_millis(10));
        assert_eq!(
            with(3_600_000, vec![]),
            Duration::from_secs(4),
            "at most 4 s"
        );
        assert_eq!(
            CachePolicy::default().refill_after(),
            Duration::from_secs(4)
        );
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
}
