//! Every configuration key in one list: its kind, its flag, its environment variable, and
//! what it does. The list drives the environment overlay, `--help`'s list of variables and
//! the README's configuration reference; unit tests hold it to the structs that deserialize
//! the file (every field listed, nothing listed that is not a field).
//!
//! # Environment variables
//!
//! Every key has one: `REDFUSE_<KEY>` at the top level, `REDFUSE_<SECTION>__<KEY>` in a
//! section (`REDFUSE_BREAKER__CONSECUTIVE_FAILURES`, `REDFUSE_WRITE_QUEUE__JOURNAL_PATH`).
//! Keys that have a flag use clap's variable of the same name (it counts as the flag).
//! Values: string keys take the text as it is; numbers and booleans are TOML values (`5`,
//! `0.5`, `true`); lists of strings are a TOML array (`["a:*", "b:*"]`) or comma-separated
//! (`a:*,b:*`); arrays of tables (`[[upstreams]]`, `[[users]]`, `[[cache.patterns]]`,
//! `[[fail_open.rules]]`) are a TOML array of inline tables, which replaces the file's
//! whole array: `REDFUSE_UPSTREAMS='[{addr="a:6379"}, {addr="b:6379", role="replica"}]'`.
//! A `REDFUSE_*` variable that names no key is an error naming it, so that a typo is not
//! ignored; only [`IGNORED_ENV`] (the bench scripts' own variables) and the service links
//! Kubernetes puts in every pod for a Service named `redfuse...` are let through.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;

use clap::CommandFactory;
use serde::Deserialize;

use super::{Cli, Config, ConfigError, FileConfig, UpstreamConfig, UserConfig};
use crate::rules::PatternConfig;
use crate::rules::failopen::RuleConfig;

/// How an environment variable's text becomes a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Str,
    Int,
    Float,
    Bool,
    /// A list of strings.
    StrList,
    /// An array of tables.
    Tables,
}

/// One configuration key.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    /// `listen`, `breaker.window_ms`, or `upstreams[].addr` for a field of an array's
    /// tables.
    pub path: &'static str,
    pub kind: Kind,
    /// The command-line flag, when there is one.
    pub flag: Option<&'static str>,
    /// A secret (or holds secrets): redacted wherever it is shown.
    pub secret: bool,
    /// Shown as the default instead of the computed one.
    pub default: Option<&'static str>,
    pub doc: &'static str,
}

const fn key(path: &'static str, kind: Kind, doc: &'static str) -> Key {
    Key {
        path,
        kind,
        flag: None,
        secret: false,
        default: None,
        doc,
    }
}

impl Key {
    const fn flag(mut self, flag: &'static str) -> Key {
        self.flag = Some(flag);
        self
    }

    const fn secret(mut self) -> Key {
        self.secret = true;
        self
    }

    const fn shown(mut self, default: &'static str) -> Key {
        self.default = Some(default);
        self
    }

    /// Its environment variable; `None` for a field of an array's tables (set through the
    /// whole array's variable).
    pub fn env(&self) -> Option<String> {
        if self.path.contains("[]") {
            return None;
        }
        Some(format!(
            "REDFUSE_{}",
            self.path.replace('.', "__").to_ascii_uppercase()
        ))
    }

    /// The array a field belongs to (`upstreams` for `upstreams[].addr`).
    pub fn array(&self) -> Option<&'static str> {
        self.path.split_once("[]").map(|(a, _)| a)
    }
}

use Kind::*;

/// Every key, in the order of the reference table.
pub const KEYS: &[Key] = &[
    key("listen", Str, "Address clients connect to.").flag("--listen"),
    key("admin_listen", Str, "Admin HTTP address (`/`, `/metrics`, `/healthz`, `/ready`, `/config`, ...).").flag("--admin-listen"),
    key("log_level", Str, "`error`, `warn`, `info`, `debug`, `trace`, or a tracing filter.").flag("--log-level"),
    key("log_format", Str, "`text` or `json`.").flag("--log-format"),
    key("upstream", Str, "The primary upstream in short form: `host:port`, `redis://[user[:password]@]host[:port][/0]` or `rediss://...` (TLS). The flag repeats (or takes a comma-separated list): the first is the primary, the rest replicas.").flag("--upstream").shown("`\"127.0.0.1:6379\"`"),
    key("upstreams", Tables, "Upstream servers, `[[upstreams]]` (instead of `upstream`).").shown("one primary, `upstream`"),
    key("upstreams[].name", Str, "Name in metrics, logs and error replies.").shown("its `addr` (`host:port`)"),
    key("upstreams[].addr", Str, "`host:port`, `redis://...` or `rediss://...` URL."),
    key("upstreams[].role", Str, "`primary` (exactly one) or `replica`."),
    key("upstreams[].priority", Int, "Lower is preferred when reads fail over."),
    key("upstreams[].weight", Int, "Share of reads under `balance = \"weighted\"`."),
    key("upstreams[].tls", Bool, "Connect with TLS (a `rediss://` address implies it)."),
    key("upstreams[].breaker", Tables, "This upstream's breaker: `[breaker]` keys that override the global ones (`breaker = { consecutive_failures = 2 }`).").shown("`[breaker]`"),
    key("upstreams[].health_probe_interval_ms", Int, "This upstream's probe interval.").shown("`health_probe_interval_ms`"),
    key("upstreams[].health_probe_timeout_ms", Int, "This upstream's probe timeout.").shown("`health_probe_timeout_ms`"),
    key("upstreams[].connect_timeout_ms", Int, "This upstream's connect timeout.").shown("`connect_timeout_ms`"),
    key("upstreams[].command_timeout_ms", Int, "This upstream's command timeout.").shown("`command_timeout_ms`"),
    key("upstreams[].fail_open", Tables, "Fail-open rules for what this upstream cannot serve (`{ rules = [...], ping_locally, default_error }`), instead of `[fail_open]`; for writes and commands routed to the primary, the primary's.").shown("`[fail_open]`"),
    key("username", Str, "ACL user redfuse authenticates its upstream connections as (a URL's user is the same setting).").flag("--username"),
    key("password", Str, "Password of redfuse's upstream connections (a URL's password is the same setting).").flag("--password").secret(),
    key("requirepass", Str, "Password clients must `AUTH` with (user `default`).").flag("--requirepass").secret(),
    key("allow_unauthenticated_clients", Bool, "Serve unauthenticated clients on a non-loopback address with redfuse's upstream credentials.").flag("--allow-unauthenticated-clients"),
    key("users", Tables, "Client users of redfuse's listener, `[[users]]`.").secret(),
    key("users[].name", Str, "User name."),
    key("users[].password", Str, "Plain password.").secret(),
    key("users[].password_sha256", Str, "SHA-256 of the password in hex (instead of `password`).").secret(),
    key("users[].enabled", Bool, "A disabled user cannot authenticate."),
    key("users[].upstream_username", Str, "Upstream ACL user this user's commands run as.").shown("redfuse's own `username`"),
    key("users[].upstream_password", Str, "Password of `upstream_username`.").secret(),
    key("upstream_connections", Int, "Shared pipelined connections per upstream and protocol version (at most 64).").flag("--upstream-connections"),
    key("connect_timeout_ms", Int, "Upstream connect timeout (TLS handshake included).").flag("--connect-timeout-ms"),
    key("command_timeout_ms", Int, "Per-command upstream timeout (blocking commands are exempt).").flag("--command-timeout-ms"),
    key("max_clients", Int, "Simultaneous client connections.").flag("--max-clients"),
    key("max_bulk_len", Int, "Longest bulk string a client may send, in bytes.").flag("--max-bulk-len"),
    key("max_array_len", Int, "Most elements in a client's command.").flag("--max-array-len"),
    key("max_nesting_depth", Int, "Deepest upstream reply accepted.").flag("--max-nesting-depth"),
    key("idle_timeout_ms", Int, "Close clients idle this long; 0: never.").flag("--idle-timeout-ms"),
    key("shutdown_timeout_ms", Int, "How long in-flight replies may drain on SIGTERM.").flag("--shutdown-timeout-ms"),
    key("threads", Int, "Worker threads; 1 is one event loop, 0 one per core.").flag("--threads"),
    key("admin_token", Str, "Bearer token enabling the mutating admin endpoints.").flag("--admin-token").secret(),
    key("admin_header_timeout_ms", Int, "An admin connection that has not sent a request's headers within this is closed."),
    key("admin_max_connections", Int, "Admin connections served at once; more are closed at once."),
    key("ready_requires_upstream", Bool, "`/ready` answers 503 while no upstream is connected."),
    key("read_policy", Str, "`primary`, `prefer-replica` or `any`."),
    key("balance", Str, "`round-robin`, `least-outstanding` or `weighted`."),
    key("max_inflight_per_upstream", Int, "Bulkhead: requests in flight per upstream."),
    key("upstream_drain_timeout_ms", Int, "An upstream removed from the set, or moved to a new address, keeps its connections this long for the commands in flight on them."),
    key("health_probe_interval_ms", Int, "Active `PING` probe per upstream; 0: off."),
    key("health_probe_timeout_ms", Int, "A probe with no answer this long failed (a frozen Redis)."),
    key("client_output_hard_limit_bytes", Int, "Disconnect a client whose unwritten replies exceed this; 0: never."),
    key("client_output_soft_limit_bytes", Int, "... or exceed this for `client_output_soft_limit_seconds`; 0: never."),
    key("client_output_soft_limit_seconds", Int, "Grace period of the soft output limit."),
    key("tls", Bool, "Connect to every upstream with TLS.").flag("--tls"),
    key("tls_ca_cert_file", Str, "PEM CA bundle that verifies upstream certificates.").flag("--tls-ca-cert-file").shown("the system's roots"),
    key("tls_cert_file", Str, "PEM client certificate for upstreams that require one.").flag("--tls-cert-file"),
    key("tls_key_file", Str, "PEM private key of `tls_cert_file`.").flag("--tls-key-file"),
    key("tls_server_name", Str, "Name the upstream certificates must carry.").flag("--tls-server-name").shown("each upstream's host"),
    key("breaker.mode", Str, "`normal`, `force_open`, `force_closed`, `disabled` or `metrics_only`."),
    key("breaker.consecutive_failures", Int, "Consecutive failures that open the breaker."),
    key("breaker.failure_rate_threshold", Float, "Failure rate over the window that opens it."),
    key("breaker.slow_call_rate_threshold", Float, "Slow-call rate over the window that opens it."),
    key("breaker.slow_call_threshold_ms", Int, "A call slower than this is slow."),
    key("breaker.minimum_calls", Int, "Calls the window needs before rates count."),
    key("breaker.window_ms", Int, "Rolling window."),
    key("breaker.bucket_ms", Int, "Window bucket; divides `window_ms`."),
    key("breaker.open_base_ms", Int, "First open period; doubles on each re-open."),
    key("breaker.open_max_ms", Int, "Longest open period, before jitter."),
    key("breaker.jitter", Float, "Up to this fraction added to each open period."),
    key("breaker.half_open_permits", Int, "Concurrent probes while half-open."),
    key("breaker.success_threshold", Int, "Probe successes that close it."),
    key("breaker.half_open_max_wait_ms", Int, "A half-open lasting longer re-opens."),
    key("breaker.probe_failures_to_open", Int, "Health probes failing in a row that open it."),
    key("cache.enabled", Bool, "The degraded-mode reply cache."),
    key("cache.max_bytes", Int, "Bytes the cache may hold."),
    key("cache.max_entries", Int, "Entries the cache may hold."),
    key("cache.max_entry_bytes", Int, "Larger replies are not cached."),
    key("cache.max_stale_ms", Int, "Oldest entry served during an outage."),
    key("cache.cache_nil", Bool, "Remember \"not found\" too."),
    key("cache.miss", Str, "A miss during an outage: `nil`, `error`, or a reply such as `[]`."),
    key("cache.include", StrList, "Key globs to cache (empty: all)."),
    key("cache.exclude", StrList, "Key globs never cached."),
    key("cache.patterns", Tables, "Per-pattern overrides, `[[cache.patterns]]`."),
    key("cache.patterns[].keys", Str, "Key glob."),
    key("cache.patterns[].max_stale_ms", Int, "Overrides `cache.max_stale_ms`.").shown("`cache.max_stale_ms`"),
    key("cache.patterns[].miss", Str, "Overrides `cache.miss`.").shown("`cache.miss`"),
    key("fail_open.rules", Tables, "What commands get while the breaker is open, `[[fail_open.rules]]`, first match wins."),
    key("fail_open.rules[].name", Str, "Name in logs and metrics.").shown("`rules[<index>]`"),
    key("fail_open.rules[].commands", StrList, "Command names or `@write`, `@read`, `@all`."),
    key("fail_open.rules[].keys", StrList, "Key globs (empty: any key, and key-less commands).").shown("`[]`"),
    key("fail_open.rules[].action", Str, "`reply`, `error` or `queue`."),
    key("fail_open.rules[].reply", Str, "Reply of `reply` and `queue` rules (`+OK`, `:1`, `nil`, `[]`, ...)."),
    key("fail_open.rules[].message", Str, "Error text of `error` rules.").shown("`fail_open.default_error`"),
    key("fail_open.ping_locally", Bool, "Answer `PING` locally."),
    key("fail_open.default_error", Str, "Error text for commands no rule matches.").shown("names the upstream and why"),
    key("write_queue.max_bytes", Int, "Bytes of queued writes (a full queue answers with an error)."),
    key("write_queue.max_entries", Int, "Queued writes."),
    key("write_queue.journal_path", Str, "Append-only file that keeps the queue across restarts.").shown("memory only"),
    key("write_queue.fsync", Str, "`always`, `everysec` or `never`."),
    key("fleet.enabled", Bool, "Share breaker state with the other instances through a coordination Redis (hybrid breaker)."),
    key("fleet.redis", Str, "Coordination Redis: `host:port` or `redis://[user[:password]@]host[:port]`.").secret().shown("the primary upstream, with redfuse's credentials"),
    key("fleet.username", Str, "ACL user for the coordination Redis (with `fleet.redis`)."),
    key("fleet.password", Str, "Password for the coordination Redis (with `fleet.redis`).").secret(),
    key("fleet.instance_id", Str, "This instance's name in the fleet's hashes and messages.").shown("the host name"),
    key("fleet.channel", Str, "Pub/sub channel of transitions and fleet-wide actions."),
    key("fleet.key_prefix", Str, "Breaker states live in the hash `<key_prefix>:<upstream>`, a field per instance."),
    key("fleet.state_ttl_ms", Int, "The hashes expire this long after their last write; older reports are ignored."),
    key("fleet.catch_up_interval_ms", Int, "Every hash is read again this often (and at start), to catch up on missed messages."),
    key("fleet.window_ms", Int, "A remote \"open\" counts this long: the first local failure trips, and toward the quorum."),
    key("fleet.quorum", Int, "Other instances reporting open within `fleet.window_ms` that open a breaker outright; unset: never on the fleet's word alone."),
    key("fleet.timeout_ms", Int, "Connect and command timeout of the coordination connections."),
    key("drills.enabled", Bool, "Allow fault injection drills (`POST /faults`, with `admin_token`)."),
    key("drills.max_duration_ms", Int, "The longest a drill may be started for."),
    key("sentinel.url", Str, "`sentinel://[user[:password]@]host:26379[,host:26379...]/<master name>`: the upstreams are the master and replicas Sentinel reports (instead of the keys below).").secret().shown("unset"),
    key("sentinel.addrs", StrList, "Sentinel addresses, `host:port`; with `master_name`, the upstreams are the master and replicas Sentinel reports; replaces `[[upstreams]]`.").shown("`[]`"),
    key("sentinel.master_name", Str, "The master name Sentinel monitors.").shown("unset"),
    key("sentinel.username", Str, "User of the Sentinels' own ACL.").shown("unset"),
    key("sentinel.password", Str, "Password of the Sentinels (their `requirepass`).").secret().shown("unset"),
    key("sentinel.refresh_ms", Int, "Ask the Sentinels again this often, besides their announcements.").shown("`5000`"),
    key("discovery.dns_interval_ms", Int, "Resolve upstreams given by host name again this often, and when a breaker opens; a name with several addresses becomes a group of replicas; 0: off."),
    key("discovery.file", Str, "Watched JSON or TOML file listing the upstreams (`upstreams = [{name, addr, role, priority, weight}]`), reloaded when it changes; replaces `[[upstreams]]`.").shown("unset"),
];

/// `REDFUSE_*` variables that are not configuration (the bench scripts' own) and are
/// ignored rather than refused.
pub const IGNORED_ENV: &[&str] = &["REDFUSE_BIN", "REDFUSE_ARGS"];

/// Whether a variable is one Kubernetes sets for a Service whose name starts with
/// `redfuse` (`REDFUSE_SERVICE_HOST`, `REDFUSE_PORT=tcp://...`, `REDFUSE_PORT_9380_TCP_ADDR`
/// ...): those are in every pod of the namespace and are not configuration.
fn is_service_link(name: &str, value: &std::ffi::OsStr) -> bool {
    if name.ends_with("_SERVICE_HOST") || name.contains("_SERVICE_PORT") {
        return true;
    }
    if name.ends_with("_PORT") {
        let v = value.to_string_lossy();
        return ["tcp://", "udp://", "sctp://"]
            .iter()
            .any(|p| v.starts_with(p));
    }
    // `..._PORT_<n>_<PROTO>` and its `_PROTO`, `_PORT`, `_ADDR`.
    let parts: Vec<&str> = name.split('_').collect();
    parts.windows(3).any(|w| {
        w[0] == "PORT"
            && !w[1].is_empty()
            && w[1].bytes().all(|b| b.is_ascii_digit())
            && ["TCP", "UDP", "SCTP"].contains(&w[2])
    })
}

/// The variables clap reads for flags.
fn flag_env_vars() -> BTreeSet<String> {
    Cli::command()
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect()
}

/// `--help`'s list of the variables of keys without a flag.
pub fn env_help() -> String {
    let mut out = String::from(
        "Configuration keys without a flag have an environment variable too (precedence: \
         flag > environment > file > default); string keys take the text as is, numbers and \
         booleans are TOML values, lists a TOML array or comma-separated, arrays of tables a \
         TOML array of inline tables:\n",
    );
    for k in KEYS {
        if k.flag.is_none()
            && let Some(env) = k.env()
        {
            out.push_str(&format!("  {env:<44} {}\n", k.path));
        }
    }
    out
}

/// Lays the `REDFUSE_*` variables of `env` over the file's `table`. Every bad variable is
/// reported, naming it; values of secrets are never echoed.
pub fn overlay_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (OsString, OsString)>,
) -> Result<(), ConfigError> {
    let flags = flag_env_vars();
    let by_env: BTreeMap<String, &Key> = KEYS
        .iter()
        .filter(|k| k.flag.is_none())
        .filter_map(|k| Some((k.env()?, k)))
        .collect();
    let mut vars: Vec<(String, OsString)> = env
        .into_iter()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v)))
        .filter(|(k, _)| k.starts_with("REDFUSE_"))
        .collect();
    vars.sort();
    let mut errors = Vec::new();
    for (var, value) in vars {
        if flags.contains(&var)
            || IGNORED_ENV.contains(&var.as_str())
            || is_service_link(&var, &value)
        {
            continue;
        }
        let Some(key) = by_env.get(&var) else {
            errors.push(ConfigError::Env {
                message: unknown_var_message(&var),
                var,
            });
            continue;
        };
        let Some(text) = value.to_str() else {
            errors.push(ConfigError::Env {
                var,
                message: "not UTF-8".into(),
            });
            continue;
        };
        let value = match env_value(key.kind, text) {
            Ok(v) => v,
            Err(message) => {
                errors.push(ConfigError::Env { var, message });
                continue;
            }
        };
        // Checked alone first, so that the error names this variable.
        let mut alone = toml::Table::new();
        insert(&mut alone, key.path, value.clone());
        if let Err(e) = FileConfig::deserialize(toml::Value::Table(alone)) {
            let mut message = e.to_string().trim().replace('\n', " ");
            if key.secret {
                message = scrub(&message);
            }
            if !message.contains(key.path) {
                message = format!("`{}`: {message}", key.path);
            }
            errors.push(ConfigError::Env { var, message });
            continue;
        }
        insert(table, key.path, value);
    }
    ConfigError::from_list(errors)
}

fn unknown_var_message(var: &str) -> String {
    let mut known: Vec<String> = KEYS.iter().filter_map(|k| k.env()).collect();
    known.extend(IGNORED_ENV.iter().map(|s| s.to_string()));
    let near = known
        .iter()
        .map(|k| (edit_distance(k, var), k))
        .min()
        .filter(|(d, _)| *d <= 3);
    let hint = match near {
        Some((_, k)) => format!("; did you mean {k}?"),
        None => String::new(),
    };
    format!(
        "names no configuration key (REDFUSE_<KEY>, or REDFUSE_<SECTION>__<KEY> in a section; \
         `redfuse --help` lists them){hint}"
    )
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let subst = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = subst.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Replaces every quoted string in a message (which may quote a secret).
fn scrub(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut quoted = false;
    for c in message.chars() {
        if c == '"' {
            if !quoted {
                out.push_str("\"…");
            }
            quoted = !quoted;
            if !quoted {
                out.push('"');
            }
        } else if !quoted {
            out.push(c);
        }
    }
    out
}

/// One TOML value, as the right-hand side of `v = ...`.
fn parse_toml_value(text: &str) -> Option<toml::Value> {
    let mut t: toml::Table = toml::from_str(&format!("v = {text}")).ok()?;
    if t.len() != 1 {
        return None;
    }
    t.remove("v")
}

/// An environment variable's text as the value of a key of this kind.
pub fn env_value(kind: Kind, text: &str) -> Result<toml::Value, String> {
    let text_value = || toml::Value::String(text.to_owned());
    Ok(match kind {
        Kind::Str => text_value(),
        // Not a number or boolean: left a string, for deserialization to name the type.
        Kind::Int | Kind::Float | Kind::Bool => parse_toml_value(text.trim())
            .filter(|v| !matches!(v, toml::Value::Array(_) | toml::Value::Table(_)))
            .unwrap_or_else(text_value),
        Kind::StrList => match parse_toml_value(text.trim()) {
            Some(v @ toml::Value::Array(_)) => v,
            _ => toml::Value::Array(
                text.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| toml::Value::String(s.to_owned()))
                    .collect(),
            ),
        },
        Kind::Tables => match parse_toml_value(text.trim()) {
            Some(v @ toml::Value::Array(_)) => v,
            _ => {
                return Err(
                    "expected a TOML array of inline tables, such as [{ addr = \"host:6379\" }]"
                        .into(),
                );
            }
        },
    })
}

/// Sets `a.b.c` in a table, making the sections on the way.
fn insert(table: &mut toml::Table, path: &str, value: toml::Value) {
    let mut parts: Vec<&str> = path.split('.').collect();
    let last = parts.pop().expect("a path has a key");
    let mut at = table;
    for part in parts {
        let entry = at
            .entry(part.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        at = entry.as_table_mut().expect("made a table above");
    }
    at.insert(last.to_owned(), value);
}

fn lookup<'a>(table: &'a toml::Table, path: &str) -> Option<&'a toml::Value> {
    let mut parts = path.split('.');
    let mut v = table.get(parts.next()?)?;
    for part in parts {
        v = v.as_table()?.get(part)?;
    }
    Some(v)
}

/// A table of the array `array` with only its required fields, and those fields.
fn minimal_element(array: &str) -> (toml::Table, &'static [&'static str]) {
    let (text, required): (&str, &'static [&'static str]) = match array {
        "upstreams" => ("addr = \"h:1\"", &["addr"]),
        "users" => ("name = \"u\"", &["name"]),
        "fail_open.rules" => (
            "commands = [\"GET\"]\naction = \"error\"",
            &["commands", "action"],
        ),
        "cache.patterns" => ("keys = \"*\"", &["keys"]),
        other => unreachable!("no array of tables `{other}`"),
    };
    let t: toml::Table = toml::from_str(text).expect("valid TOML");
    let v = toml::Value::Table(t);
    let shown = match array {
        "upstreams" => toml::Table::try_from(UpstreamConfig::deserialize(v).expect("valid")),
        "users" => toml::Table::try_from(UserConfig::deserialize(v).expect("valid")),
        "fail_open.rules" => toml::Table::try_from(RuleConfig::deserialize(v).expect("valid")),
        _ => toml::Table::try_from(PatternConfig::deserialize(v).expect("valid")),
    };
    (shown.expect("serializable"), required)
}

fn code(text: &str) -> String {
    format!("`{}`", text.replace('|', "\\|"))
}

/// The default of a key as shown in the reference.
pub fn default_of(key: &Key, defaults: &toml::Table) -> String {
    if let Some(shown) = key.default {
        return shown.to_owned();
    }
    let value = match key.array() {
        Some(array) => {
            let field = key.path.rsplit_once("[].").map_or(key.path, |(_, f)| f);
            let (element, required) = minimal_element(array);
            if required.contains(&field) {
                return "required".to_owned();
            }
            element.get(field).cloned()
        }
        None => lookup(defaults, key.path).cloned(),
    };
    match value {
        Some(v) => code(&v.to_string()),
        None => "unset".to_owned(),
    }
}

/// The configuration reference: a Markdown table of every key with its default, its
/// environment variable and its flag. README.md carries it in its configuration reference
/// (between `<!-- configuration-reference:start -->` and `<!-- configuration-reference:end -->`);
/// `tests/ops.rs` checks that it is current.
pub fn reference_table() -> String {
    let defaults = Config::defaults().effective();
    let mut out =
        String::from("| key | default | environment | flag | what |\n|---|---|---|---|---|\n");
    for k in KEYS {
        let env = match k.env() {
            Some(e) => code(&e),
            None => format!(
                "in {}",
                code(
                    &Key {
                        path: k.array().unwrap_or(k.path),
                        ..*k
                    }
                    .env()
                    .unwrap_or_default()
                )
            ),
        };
        let flag = k.flag.map_or("—".to_owned(), code);
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            code(k.path),
            default_of(k, &defaults),
            env,
            flag,
            k.doc.replace('|', "\\|")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fields a struct accepts, read from serde's "unknown field" message.
    fn fields_of(scope: &str) -> BTreeSet<String> {
        let probe = "zz_not_a_key";
        let text = match scope {
            "" => format!("{probe} = 1"),
            "upstreams[]" => format!("[[upstreams]]\naddr = \"h:1\"\n{probe} = 1"),
            "users[]" => format!("[[users]]\nname = \"u\"\n{probe} = 1"),
            "fail_open.rules[]" => {
                format!("[[fail_open.rules]]\ncommands = []\naction = \"error\"\n{probe} = 1")
            }
            "cache.patterns[]" => format!("[[cache.patterns]]\nkeys = \"*\"\n{probe} = 1"),
            section => format!("[{section}]\n{probe} = 1"),
        };
        let err = toml::from_str::<FileConfig>(&text).unwrap_err().to_string();
        // serde says "expected one of `a`, `b`, `c`", or "expected `a` or `b`".
        let list = err
            .split_once("expected one of")
            .or_else(|| err.split_once("expected "))
            .unwrap_or_else(|| panic!("{scope}: {err}"))
            .1
            .replace(" or ", ",");
        list.split(',')
            .map(|f| f.trim().trim_matches('`').trim().to_owned())
            .filter(|f| !f.is_empty())
            .map(|f| f.split('`').next().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn every_field_of_every_struct_is_listed_and_nothing_else() {
        for scope in [
            "",
            "breaker",
            "cache",
            "fail_open",
            "write_queue",
            "fleet",
            "drills",
            "discovery",
            "sentinel",
            "upstreams[]",
            "users[]",
            "fail_open.rules[]",
            "cache.patterns[]",
        ] {
            let want = fields_of(scope);
            let prefix = if scope.is_empty() {
                String::new()
            } else {
                format!("{scope}.")
            };
            let listed: BTreeSet<String> = KEYS
                .iter()
                .filter_map(|k| k.path.strip_prefix(prefix.as_str()))
                .filter(|rest| !rest.contains('.') && !rest.contains("[]"))
                .map(str::to_owned)
                .collect();
            // Sections are keys of the root table but not rows.
            let want: BTreeSet<String> = want
                .into_iter()
                .filter(|f| {
                    !scope.is_empty()
                        || ![
                            "breaker",
                            "cache",
                            "fail_open",
                            "write_queue",
                            "fleet",
                            "drills",
                            "discovery",
                            "sentinel",
                        ]
                        .contains(&f.as_str())
                })
                .collect();
            assert_eq!(listed, want, "keys listed vs fields of `{scope}`");
        }
    }

    #[test]
    fn flags_and_their_env_vars_match_the_list() {
        let cmd = Cli::command();
        let mut flagged = BTreeSet::new();
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if ["config", "check-config", "help", "version"].contains(&long) {
                continue;
            }
            let flag = format!("--{long}");
            let k = KEYS
                .iter()
                .find(|k| k.flag == Some(flag.as_str()))
                .unwrap_or_else(|| panic!("{flag} has no key in KEYS"));
            assert_eq!(
                arg.get_env().map(|e| e.to_string_lossy().into_owned()),
                k.env(),
                "{flag}'s env var"
            );
            flagged.insert(flag);
        }
        for k in KEYS {
            if let Some(f) = k.flag {
                assert!(flagged.contains(f), "{}: flag {f} does not exist", k.path);
            }
        }
    }

    #[test]
    fn help_lists_every_variable() {
        let mut cmd = Cli::command();
        let help = cmd.render_long_help().to_string();
        for k in KEYS {
            if let Some(env) = k.env() {
                assert!(help.contains(&env), "--help lacks {env}");
            }
        }
    }

    fn env(vars: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        vars.iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    fn load(file: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut table: toml::Table = toml::from_str(file).unwrap();
        overlay_env(&mut table, env(vars))?;
        Config::merge(&Cli::default(), FileConfig::from_table(table)?)
    }

    #[test]
    fn env_sets_section_keys_over_the_file() {
        let c = load(
            "[breaker]\nconsecutive_failures = 9\nwindow_ms = 20000\nbucket_ms = 2000\n[cache]\nmax_bytes = 5",
            &[
                ("REDFUSE_BREAKER__CONSECUTIVE_FAILURES", "3"),
                ("REDFUSE_BREAKER__JITTER", "0.1"),
                ("REDFUSE_CACHE__ENABLED", "false"),
                ("REDFUSE_CACHE__EXCLUDE", "lock:*, tmp:*"),
                ("REDFUSE_CACHE__INCLUDE", "[\"a:*\"]"),
                ("REDFUSE_CACHE__MISS", "[]"),
                ("REDFUSE_WRITE_QUEUE__JOURNAL_PATH", "/tmp/j"),
                ("REDFUSE_READ_POLICY", "any"),
                ("REDFUSE_HEALTH_PROBE_INTERVAL_MS", "0"),
                // Flags' variables are clap's and the bench scripts' are not config.
                ("REDFUSE_LISTEN", "ignored-here"),
                ("REDFUSE_BIN", "/x"),
                // Nor are Kubernetes' service links for a Service named `redfuse`.
                ("REDFUSE_SERVICE_HOST", "10.0.0.1"),
                ("REDFUSE_SERVICE_PORT_REDFUSE_ADMIN", "9380"),
                ("REDFUSE_PORT", "tcp://10.0.0.1:9380"),
                ("REDFUSE_PORT_9380_TCP", "tcp://10.0.0.1:9380"),
                ("REDFUSE_PORT_9380_TCP_ADDR", "10.0.0.1"),
                ("REDFUSE_ADMIN_PORT_9380_TCP_PROTO", "tcp"),
                ("OTHER", "x"),
            ],
        )
        .unwrap();
        assert_eq!(c.breaker.consecutive_failures, 3);
        assert_eq!(c.breaker.window_ms, 20000, "the file's other keys stay");
        assert_eq!(c.breaker.jitter, 0.1);
        assert!(!c.cache.enabled);
        assert_eq!(c.cache.max_bytes, 5);
        assert_eq!(c.cache.exclude, vec!["lock:*", "tmp:*"]);
        assert_eq!(c.cache.include, vec!["a:*"]);
        assert_eq!(c.effective()["cache"]["miss"].as_str(), Some("[]"));
        assert_eq!(
            c.write_queue.journal_path.as_deref(),
            Some(std::path::Path::new("/tmp/j"))
        );
        assert_eq!(c.read_policy, super::super::ReadPolicy::Any);
        assert!(c.health_probe_interval.is_zero());
    }

    #[test]
    fn env_sets_arrays_of_tables() {
        let c = load(
            "",
            &[
                (
                    "REDFUSE_UPSTREAMS",
                    "[{addr=\"a:1\"},{addr=\"b:2\",role=\"replica\"}]",
                ),
                (
                    "REDFUSE_FAIL_OPEN__RULES",
                    "[{commands=[\"INCR\"], action=\"reply\", reply=\":1\"}]",
                ),
            ],
        )
        .unwrap();
        assert_eq!(c.upstreams.len(), 2);
        assert_eq!(c.upstreams[1].name, "b:2");
        assert_eq!(c.fail_open.rules.len(), 1);
    }

    #[test]
    fn bad_env_vars_are_named_every_one() {
        let err = load(
            "",
            &[
                ("REDFUSE_BREAKER__CONSECUTIVE_FAILUERS", "3"),
                ("REDFUSE_CACHE__MAX_BYTES", "lots"),
                ("REDFUSE_UPSTREAMS", "a:1"),
                ("REDFUSE_USERS", "[{name=\"a\", password=5}]"),
                ("REDFUSE_NOPE", "1"),
            ],
        )
        .unwrap_err()
        .to_string();
        for want in [
            "REDFUSE_BREAKER__CONSECUTIVE_FAILUERS",
            "did you mean REDFUSE_BREAKER__CONSECUTIVE_FAILURES",
            "REDFUSE_CACHE__MAX_BYTES",
            "`cache.max_bytes`",
            "REDFUSE_UPSTREAMS",
            "REDFUSE_USERS",
            "REDFUSE_NOPE",
        ] {
            assert!(err.contains(want), "{want} missing from: {err}");
        }
    }

    #[test]
    fn effective_config_round_trips_and_hides_secrets() {
        let c = load(
            "password = \"hunter2\"\nrequirepass = \"sesame\"\nadmin_token = \"tok\"\n\
             [[users]]\nname = \"alice\"\npassword = \"wonderland\"\nupstream_username = \"app\"\nupstream_password = \"apppw\"\n\
             [[upstreams]]\naddr = \"redis://app:urlpw@h:1\"\n",
            &[],
        );
        // The URL's password differs from `password`: refused, naming the field.
        let e = c.unwrap_err().to_string();
        assert!(e.contains("`password`"), "{e}");
        assert!(!e.contains("urlpw") && !e.contains("hunter2"), "{e}");

        let c = load(
            "requirepass = \"sesame\"\nadmin_token = \"tok\"\n\
             [[users]]\nname = \"alice\"\npassword = \"wonderland\"\nupstream_username = \"app\"\nupstream_password = \"apppw\"\n\
             [[upstreams]]\naddr = \"redis://app:urlpw@h:1\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.credentials.as_ref().unwrap().password, "urlpw");
        let text = c.effective_toml();
        let json = c.effective_json().to_string();
        for secret in ["sesame", "tok\"", "wonderland", "apppw", "urlpw"] {
            assert!(!text.contains(secret), "{secret} in:\n{text}");
            assert!(!json.contains(secret), "{secret} in:\n{json}");
        }
        assert!(text.contains("<redacted>"), "{text}");
        assert!(text.contains("addr = \"h:1\""), "{text}");

        // Without secrets, the effective configuration is itself a file that gives the
        // same configuration.
        let c = load(
            "listen = \"127.0.0.1:7000\"\n[breaker]\nconsecutive_failures = 2\n[[upstreams]]\naddr = \"a:1\"\n[[upstreams]]\naddr = \"b:1\"\nrole = \"replica\"\n[[cache.patterns]]\nkeys = \"s:*\"\nmiss = \"[]\"\n[[fail_open.rules]]\ncommands = [\"INCR\"]\nkeys = [\"c:*\"]\naction = \"queue\"\nreply = \":0\"\n",
            &[],
        )
        .unwrap();
        let text = c.effective_toml();
        let again = Config::merge(&Cli::default(), toml::from_str(&text).unwrap())
            .unwrap_or_else(|e| panic!("{e}:\n{text}"));
        assert_eq!(again.effective(), c.effective(), "{text}");
    }

    #[test]
    fn the_reference_lists_every_key_with_a_default() {
        let md = reference_table();
        for k in KEYS {
            assert!(md.contains(&format!("| `{}` |", k.path)), "{}", k.path);
        }
        assert!(md.contains("| `breaker.consecutive_failures` | `5` | `REDFUSE_BREAKER__CONSECUTIVE_FAILURES` | — |"), "{md}");
        assert!(
            md.contains("| `listen` | `\"127.0.0.1:6380\"` | `REDFUSE_LISTEN` | `--listen` |"),
            "{md}"
        );
        assert!(
            md.contains("| `upstreams[].role` | `\"primary\"` | in `REDFUSE_UPSTREAMS` |"),
            "{md}"
        );
        assert!(md.contains("| `upstreams[].addr` | required |"), "{md}");
        assert!(md.contains("| `password` | unset |"), "{md}");
    }
}
