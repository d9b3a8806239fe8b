//! One validated [`Config`] from flags, environment, a TOML file and defaults.
//!
//! Precedence is flag > env > file > default. The file is read into a TOML table, the
//! environment is laid over it (`REDFUSE_<SECTION>__<KEY>`, see [`keys`]), and the result is
//! deserialized once into [`FileConfig`], so every key has the same types, validation and
//! unknown-field checks whichever way it was set. Flags come last: clap folds their own env
//! vars (`REDFUSE_<NAME>`) into them, so every flag is an `Option` with no clap default.
//! Validation happens once, here, and every message names the field so that an operator can
//! fix a bad deployment from the log line alone.

pub mod keys;
pub mod url;

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::{Deserialize, Serialize};

use std::sync::Arc;

pub use crate::auth::Credentials;
use crate::auth::UserSpec;
use crate::breaker::BreakerConfig;
use crate::cache::CacheConfig;
use crate::drill::DrillsConfig;
use crate::fleet::{FleetConfig, FleetSettings};
use crate::resp::Limits;
use crate::rules::{
    CachePolicy, CachePolicyConfig, FailOpen, FailOpenConfig, MissReply, PatternConfig,
};
use crate::writequeue::WriteQueueConfig;

/// What redacted secrets are shown as.
pub const REDACTED: &str = "<redacted>";

/// Command-line interface. Every flag has an env var `REDFUSE_<NAME>`; every other
/// configuration key has one too (listed by `--help`, see [`keys`]).
#[derive(Debug, Clone, Parser, Default)]
#[command(
    name = "redfuse",
    version,
    about = "A RESP caching proxy that keeps serving when Redis fails",
    after_long_help = keys::env_help()
)]
pub struct Cli {
    /// Address clients connect to (default 127.0.0.1:6380).
    #[arg(long, env = "REDFUSE_LISTEN")]
    pub listen: Option<String>,
    /// Upstream Redis: host:port, redis://[user[:password]@]host[:port][/0] or rediss://...
    /// (TLS); repeat for replicas (the first is the primary). Or
    /// sentinel://[user[:password]@]host:26379[,host:26379...]/<master name>: the master and
    /// replicas that Redis Sentinel reports.
    #[arg(long, env = "REDFUSE_UPSTREAM", value_delimiter = ',')]
    pub upstream: Vec<String>,
    /// Admin HTTP address serving /metrics, /healthz, /ready (default 127.0.0.1:9380).
    #[arg(long, env = "REDFUSE_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// TOML configuration file.
    #[arg(long, env = "REDFUSE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Validate the configuration this invocation would run (flags, env, and FILE or
    /// --config), print it with secrets redacted, and exit: 0 when valid, 2 when not.
    #[arg(long, value_name = "FILE", num_args = 0..=1)]
    pub check_config: Option<Option<PathBuf>>,
    /// Log filter: error, warn, info, debug, trace (or a tracing directive).
    #[arg(long, env = "REDFUSE_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Log format: text or json.
    #[arg(long, env = "REDFUSE_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// ACL user redfuse authenticates its upstream connections with.
    #[arg(long, env = "REDFUSE_USERNAME")]
    pub username: Option<String>,
    /// Password redfuse authenticates its upstream connections with.
    #[arg(long, env = "REDFUSE_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// Password clients must give (`AUTH password`) before anything else, as Redis's own
    /// `requirepass`. More users go in the config file (`[[users]]`).
    #[arg(long, env = "REDFUSE_REQUIREPASS", hide_env_values = true)]
    pub requirepass: Option<String>,
    /// Accept clients that have not authenticated on a non-loopback address although
    /// redfuse holds upstream credentials (they then act as redfuse's upstream user).
    #[arg(long, env = "REDFUSE_ALLOW_UNAUTHENTICATED_CLIENTS")]
    pub allow_unauthenticated_clients: bool,
    /// Shared pipelined connections per upstream and protocol version.
    #[arg(long, env = "REDFUSE_UPSTREAM_CONNECTIONS")]
    pub upstream_connections: Option<usize>,
    /// Upstream connect timeout in milliseconds.
    #[arg(long, env = "REDFUSE_CONNECT_TIMEOUT_MS")]
    pub connect_timeout_ms: Option<u64>,
    /// Per-command upstream timeout in milliseconds (blocking commands are exempt).
    #[arg(long, env = "REDFUSE_COMMAND_TIMEOUT_MS")]
    pub command_timeout_ms: Option<u64>,
    /// Maximum simultaneous client connections.
    #[arg(long, env = "REDFUSE_MAX_CLIENTS")]
    pub max_clients: Option<usize>,
    /// Maximum bulk string length a client may send, in bytes.
    #[arg(long, env = "REDFUSE_MAX_BULK_LEN")]
    pub max_bulk_len: Option<usize>,
    /// Maximum number of elements in a client's command array.
    #[arg(long, env = "REDFUSE_MAX_ARRAY_LEN")]
    pub max_array_len: Option<usize>,
    /// Deepest nesting accepted in an upstream reply (a bound against a broken upstream,
    /// far above anything Redis sends).
    #[arg(long, env = "REDFUSE_MAX_NESTING_DEPTH")]
    pub max_nesting_depth: Option<usize>,
    /// Close clients idle for this many milliseconds (0: never).
    #[arg(long, env = "REDFUSE_IDLE_TIMEOUT_MS")]
    pub idle_timeout_ms: Option<u64>,
    /// How long in-flight replies may take to drain on SIGTERM, in milliseconds.
    #[arg(long, env = "REDFUSE_SHUTDOWN_TIMEOUT_MS")]
    pub shutdown_timeout_ms: Option<u64>,
    /// Worker threads: 1 (default) runs one event loop like Redis itself; 0 means one per core.
    #[arg(long, env = "REDFUSE_THREADS")]
    pub threads: Option<usize>,
    /// Bearer token that enables the mutating admin endpoints (POST /breakers/...).
    #[arg(long, env = "REDFUSE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Connect to every upstream with TLS (one upstream: a rediss:// address).
    #[arg(long, env = "REDFUSE_TLS")]
    pub tls: bool,
    /// PEM CA bundle that verifies the upstreams' certificates (default: the system's roots).
    #[arg(long, env = "REDFUSE_TLS_CA_CERT_FILE", value_name = "FILE")]
    pub tls_ca_cert_file: Option<PathBuf>,
    /// PEM client certificate (chain) for upstreams that require one (tls-auth-clients).
    #[arg(long, env = "REDFUSE_TLS_CERT_FILE", value_name = "FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of --tls-cert-file.
    #[arg(long, env = "REDFUSE_TLS_KEY_FILE", value_name = "FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// Name the upstreams' certificates must carry (default: each upstream's host).
    #[arg(long, env = "REDFUSE_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
}

/// The configuration file, every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    pub log_level: Option<String>,
    pub log_format: Option<String>,
    /// Shorthand for a single primary upstream.
    pub upstream: Option<String>,
    pub upstreams: Option<Vec<UpstreamConfig>>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub requirepass: Option<String>,
    pub allow_unauthenticated_clients: Option<bool>,
    /// Client users of redfuse's own listener.
    pub users: Option<Vec<UserConfig>>,
    pub upstream_connections: Option<usize>,
    pub connect_timeout_ms: Option<u64>,
    pub command_timeout_ms: Option<u64>,
    pub max_clients: Option<usize>,
    pub max_bulk_len: Option<usize>,
    pub max_array_len: Option<usize>,
    pub max_nesting_depth: Option<usize>,
    pub idle_timeout_ms: Option<u64>,
    pub shutdown_timeout_ms: Option<u64>,
    pub threads: Option<usize>,
    pub admin_token: Option<String>,
    pub ready_requires_upstream: Option<bool>,
    /// A client whose unwritten replies exceed this many bytes is disconnected (0: never).
    pub client_output_hard_limit_bytes: Option<usize>,
    /// ... or exceed this many bytes for longer than `client_output_soft_limit_seconds`.
    pub client_output_soft_limit_bytes: Option<usize>,
    pub client_output_soft_limit_seconds: Option<u64>,
    pub admin_header_timeout_ms: Option<u64>,
    pub admin_max_connections: Option<usize>,
    pub tls: Option<bool>,
    pub tls_ca_cert_file: Option<PathBuf>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    pub tls_server_name: Option<String>,
    pub breaker: Option<BreakerConfig>,
    pub read_policy: Option<ReadPolicy>,
    pub balance: Option<Balance>,
    pub max_inflight_per_upstream: Option<usize>,
    pub upstream_drain_timeout_ms: Option<u64>,
    pub health_probe_interval_ms: Option<u64>,
    pub health_probe_timeout_ms: Option<u64>,
    pub cache: Option<CacheSection>,
    pub fail_open: Option<FailOpenConfig>,
    pub write_queue: Option<WriteQueueConfig>,
    pub fleet: Option<FleetConfig>,
    pub drills: Option<DrillsConfig>,
    pub discovery: Option<DiscoverySection>,
    pub sentinel: Option<SentinelSection>,
}

/// `[sentinel]`: the upstreams are the master and replicas that Redis Sentinel reports for
/// one master name (see `discovery::sentinel`); replaces `[[upstreams]]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SentinelSection {
    /// `sentinel://[user[:password]@]host:26379[,host:26379...]/<master name>`, instead of
    /// `addrs` and `master_name` (and the credentials).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Sentinel addresses, `host:port`.
    pub addrs: Vec<String>,
    pub master_name: String,
    /// The Sentinels' own credentials (`requirepass` / ACL of the Sentinels).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Ask the Sentinels again this often, besides their `+switch-master`, `+sdown` and
    /// `-sdown` announcements.
    pub refresh_ms: u64,
}

impl Default for SentinelSection {
    fn default() -> Self {
        SentinelSection {
            url: None,
            addrs: Vec::new(),
            master_name: String::new(),
            username: None,
            password: None,
            refresh_ms: 5000,
        }
    }
}

impl SentinelSection {
    /// Whether Sentinel discovery is configured.
    pub fn enabled(&self) -> bool {
        self.url.is_some() || !self.addrs.is_empty()
    }

    /// The section with `url` taken apart into the other keys.
    pub fn resolved(&self) -> Result<SentinelSection, String> {
        let mut out = self.clone();
        if let Some(url) = &self.url {
            let rest = url
                .strip_prefix("sentinel://")
                .ok_or_else(|| format!("`{}` does not start with sentinel://", redact_url(url)))?;
            let (hosts, name) = rest
                .rsplit_once('/')
                .ok_or_else(|| "no master name: sentinel://host:26379/<master name>".to_owned())?;
            let hosts = match hosts.rsplit_once('@') {
                Some((auth, hosts)) => {
                    let (user, password) = match auth.split_once(':') {
                        Some((u, p)) => (Some(u), p),
                        None => (None, auth),
                    };
                    out.username = match user.filter(|u| !u.is_empty()) {
                        Some(u) => Some(url::decode(u)?),
                        None => None,
                    };
                    out.password = Some(url::decode(password)?);
                    hosts
                }
                None => hosts,
            };
            out.addrs = hosts.split(',').map(str::to_owned).collect();
            out.master_name = name.to_owned();
            out.url = None;
        }
        if out.master_name.is_empty() {
            return Err("`master_name` is needed".into());
        }
        if out.addrs.is_empty() {
            return Err("at least one Sentinel address is needed".into());
        }
        for a in &out.addrs {
            let ok = a
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !ok {
                return Err(format!("`{a}` is not host:port"));
            }
        }
        if out.refresh_ms == 0 {
            return Err("`refresh_ms` must be greater than 0".into());
        }
        Ok(out)
    }
}

fn redact_url(url: &str) -> String {
    match url.split_once('@') {
        Some((_, rest)) => format!("<credentials>@{rest}"),
        None => url.to_owned(),
    }
}

/// `[discovery]`: where the upstream list comes from at run time besides this file (see
/// `discovery`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoverySection {
    /// Resolve upstreams given by host name again this often (and when a breaker opens);
    /// 0: off (a name is then resolved by each connect).
    pub dns_interval_ms: u64,
    /// A watched JSON or TOML file listing the upstreams; replaces `[[upstreams]]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
}

/// `[cache]`: the degraded-mode reply cache: its bounds and which keys it serves how.
///
/// The policy fields mirror `rules::CachePolicyConfig` on purpose: serde cannot `flatten`
/// into a struct that denies unknown fields, and a typo in `[cache]` must be reported.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSection {
    /// Off: nothing is cached and degraded reads get the miss reply.
    pub enabled: bool,
    pub max_bytes: usize,
    pub max_entries: usize,
    /// Replies larger than this are not cached.
    pub max_entry_bytes: usize,
    pub max_stale_ms: u64,
    pub cache_nil: bool,
    pub miss: MissReply,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    pub patterns: Vec<PatternConfig>,
}

impl Default for CacheSection {
    fn default() -> Self {
        let limits = CacheConfig::default();
        let policy = CachePolicyConfig::default();
        CacheSection {
            enabled: true,
            max_bytes: limits.max_bytes,
            max_entries: limits.max_entries,
            max_entry_bytes: limits.max_entry_bytes,
            max_stale_ms: policy.max_stale_ms,
            cache_nil: policy.cache_nil,
            miss: policy.miss,
            include: policy.include,
            exclude: policy.exclude,
            patterns: policy.patterns,
        }
    }
}

impl CacheSection {
    pub fn limits(&self) -> CacheConfig {
        if !self.enabled {
            return CacheConfig {
                max_bytes: 0,
                max_entries: 0,
                max_entry_bytes: 0,
                ..CacheConfig::default()
            };
        }
        CacheConfig {
            max_bytes: self.max_bytes,
            max_entries: self.max_entries,
            max_entry_bytes: self.max_entry_bytes,
            ..CacheConfig::default()
        }
    }

    pub fn policy(&self) -> CachePolicyConfig {
        CachePolicyConfig {
            max_stale_ms: self.max_stale_ms,
            cache_nil: self.cache_nil,
            miss: self.miss.clone(),
            include: self.include.clone(),
            exclude: self.exclude.clone(),
            patterns: self.patterns.clone(),
        }
    }
}

/// Where reads go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ReadPolicy {
    /// Reads go to the primary; replicas only take them while the primary's breaker is open.
    #[default]
    Primary,
    /// Reads go to a healthy replica, the primary when none is.
    PreferReplica,
    /// Reads go to any healthy upstream.
    Any,
}

/// How a read picks among equally eligible upstreams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    #[default]
    RoundRobin,
    LeastOutstanding,
    Weighted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    #[default]
    Primary,
    Replica,
}

/// One upstream Redis.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Name used in metrics, logs and error replies (defaults to the address).
    #[serde(default)]
    pub name: String,
    /// `host:port`, or a `redis://` / `rediss://` URL in the file; always `host:port` once
    /// validated (the URL's credentials and scheme are taken out).
    pub addr: String,
    #[serde(default)]
    pub role: Role,
    #[serde(default)]
    pub priority: u32,
    #[serde(default = "one")]
    pub weight: u32,
    /// Connect with TLS (also set by a `rediss://` address or the top-level `tls`).
    #[serde(default)]
    pub tls: bool,
    /// The TLS client settings, once validated (only when `tls`).
    #[serde(skip)]
    pub tls_client: Option<TlsClient>,
    /// Per-upstream policy, each falling back to the global setting: breaker keys laid over
    /// `[breaker]`, probe and timeouts, and fail-open rules that replace `[fail_open]` for
    /// the commands this upstream cannot serve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breaker: Option<toml::Table>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_probe_interval_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_probe_timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_open: Option<FailOpenConfig>,
}

impl UpstreamConfig {
    /// This upstream's breaker settings: its `breaker` keys over the global `[breaker]`.
    pub fn breaker_config(&self, global: &BreakerConfig) -> Result<BreakerConfig, String> {
        let Some(over) = &self.breaker else {
            return Ok(global.clone());
        };
        let mut table = toml::Table::try_from(global).map_err(|e| e.to_string())?;
        table.extend(over.iter().map(|(k, v)| (k.clone(), v.clone())));
        let config: BreakerConfig = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| e.to_string().trim().replace('\n', " "))?;
        config.validate()?;
        Ok(config)
    }

    /// The settings that only a new instance can change (with the endpoint): timeouts and
    /// the probe's timing.
    pub fn instance_settings(&self) -> [Option<u64>; 4] {
        [
            self.health_probe_interval_ms,
            self.health_probe_timeout_ms,
            self.connect_timeout_ms,
            self.command_timeout_ms,
        ]
    }
}

impl UpstreamConfig {
    /// A primary at `addr` (`host:port`), named by its address, with the defaults.
    pub fn new(addr: &str) -> UpstreamConfig {
        UpstreamConfig {
            name: addr.to_owned(),
            addr: addr.to_owned(),
            role: Role::Primary,
            priority: 0,
            weight: 1,
            tls: false,
            tls_client: None,
            breaker: None,
            health_probe_interval_ms: None,
            health_probe_timeout_ms: None,
            connect_timeout_ms: None,
            command_timeout_ms: None,
            fail_open: None,
        }
    }
}

/// What a TLS upstream connection is made with: the shared client configuration and the
/// name its certificate must carry.
#[derive(Clone)]
pub struct TlsClient {
    pub(crate) config: Arc<rustls::ClientConfig>,
    pub(crate) server_name: rustls::pki_types::ServerName<'static>,
}

impl PartialEq for TlsClient {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.config, &other.config) && self.server_name == other.server_name
    }
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient")
            .field("server_name", &self.server_name.to_str())
            .finish_non_exhaustive()
    }
}

/// The TLS settings as configured (for the effective configuration).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// Top-level `tls`: every upstream uses TLS.
    pub all: bool,
    pub ca_cert_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub server_name: Option<String>,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// One `[[users]]` entry: a client user of redfuse's own listener.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// Plain password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// SHA-256 of the password, in hex (as Redis's ACL `#<hash>`), to keep it out of the
    /// file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_sha256: Option<String>,
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The upstream ACL user this user's commands run as; default: redfuse's own
    /// credentials (`username`/`password`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_password: Option<String>,
}

fn yes() -> bool {
    true
}

/// The validated configuration the server runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: String,
    pub admin_listen: String,
    pub log_level: String,
    pub log_format: LogFormat,
    pub upstreams: Vec<UpstreamConfig>,
    /// What redfuse authenticates its upstream connections with.
    pub credentials: Option<Arc<Credentials>>,
    /// Client authentication on the listener (`requirepass` is user `default`); empty:
    /// none.
    pub users: Vec<UserSpec>,
    pub allow_unauthenticated_clients: bool,
    pub upstream_connections: usize,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    pub max_clients: usize,
    pub limits: Limits,
    /// `max_nesting_depth`: the deepest upstream reply accepted.
    pub max_reply_depth: usize,
    pub idle_timeout: Option<Duration>,
    /// `client-output-buffer-limit`-style bounds on a client's unwritten replies.
    pub output_limits: crate::effect::OutputLimits,
    pub shutdown_timeout: Duration,
    pub threads: usize,
    pub admin_token: Option<String>,
    pub ready_requires_upstream: bool,
    /// How long an admin connection may take to send a request's headers.
    pub admin_header_timeout: Duration,
    /// Admin connections served at once; more are closed at once.
    pub admin_max_connections: usize,
    pub tls: TlsSettings,
    pub breaker: BreakerConfig,
    pub read_policy: ReadPolicy,
    pub balance: Balance,
    pub max_inflight_per_upstream: usize,
    /// How long an upstream that left the set (or moved) keeps its connections for the
    /// commands in flight on them.
    pub drain_timeout: Duration,
    /// 0 disables the active health probe.
    pub health_probe_interval: Duration,
    /// No answer from the probe within this is a failed probe (a frozen server).
    pub health_probe_timeout: Duration,
    pub cache: CacheSection,
    pub fail_open: FailOpenConfig,
    pub write_queue: WriteQueueConfig,
    /// `[fleet]`, resolved: breaker state shared across instances.
    pub fleet: FleetSettings,
    /// `[drills]`: fault injection for game days.
    pub drills: DrillsConfig,
    pub discovery: DiscoverySection,
    /// `[sentinel]`, its `url` taken apart.
    pub sentinel: SentinelSection,
    /// Whether `[sentinel]` is set at all.
    pub sentinel_enabled: bool,
    /// `[[users]]` with their secrets redacted, for the effective configuration.
    users_shown: Vec<UserConfig>,
    requirepass_set: bool,
}

/// A configuration problem, naming the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid value for `{field}`: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("invalid environment variable {var}: {message}")]
    Env { var: String, message: String },
    /// More than one problem, each on its own line.
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
    Several(Vec<ConfigError>),
}

impl ConfigError {
    /// One error, or all of them.
    fn from_list(mut errors: Vec<ConfigError>) -> Result<(), ConfigError> {
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            _ => Err(ConfigError::Several(errors)),
        }
    }
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

impl FileConfig {
    /// Reads and checks a file alone (errors point into it, naming the key).
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = read_file(path)?;
        parse_file(path, &text)
    }

    /// The file as a TOML table, checked as a [`FileConfig`] first so that its errors
    /// point into the file.
    pub fn load_table(path: &Path) -> Result<toml::Table, ConfigError> {
        let text = read_file(path)?;
        parse_file(path, &text)?;
        toml::from_str(&text).map_err(|e| parse_error(path, e))
    }

    /// A table (a file with the environment laid over it) as a [`FileConfig`].
    pub fn from_table(table: toml::Table) -> Result<FileConfig, ConfigError> {
        toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse {
                path: PathBuf::from("(file and environment)"),
                message: e.to_string().trim().replace('\n', " "),
            })
    }
}

fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })
}

fn parse_file(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| parse_error(path, e))
}

fn parse_error(path: &Path, e: toml::de::Error) -> ConfigError {
    ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string().trim().replace('\n', " "),
    }
}

impl Config {
    /// The configuration this process runs with: the file named by `--config` (if any),
    /// the process environment, then the flags.
    pub fn from_cli(cli: &Cli) -> Result<Config, ConfigError> {
        Config::load(cli, cli.config.as_deref(), std::env::vars_os())
    }

    /// Flags over `env` over the file at `path` (if any) over defaults, validated.
    pub fn load(
        cli: &Cli,
        path: Option<&Path>,
        env: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
    ) -> Result<Config, ConfigError> {
        let mut table = match path {
            Some(path) => FileConfig::load_table(path)?,
            None => toml::Table::new(),
        };
        keys::overlay_env(&mut table, env)?;
        Config::merge(cli, FileConfig::from_table(table)?)
    }

    /// The built-in defaults (no flags, no file, no environment).
    pub fn defaults() -> Config {
        Config::merge(&Cli::default(), FileConfig::default()).expect("the defaults are valid")
    }

    /// Merges flags over a file over defaults, then validates.
    pub fn merge(cli: &Cli, mut file: FileConfig) -> Result<Config, ConfigError> {
        // `--upstream sentinel://h1:26379,h2:26379/name`: clap has split it at the commas
        // that separate the Sentinels; put it back together as the `[sentinel]` URL, over
        // what the file says.
        let mut cli_upstreams: &[String] = &cli.upstream;
        if cli_upstreams
            .first()
            .is_some_and(|a| a.starts_with("sentinel://"))
        {
            let section = file.sentinel.get_or_insert_with(SentinelSection::default);
            section.url = Some(cli_upstreams.join(","));
            section.addrs.clear();
            section.master_name.clear();
            cli_upstreams = &[];
        }
        // Where the upstream addresses came from, for messages.
        let (addr_field, mut upstreams): (&'static str, Vec<UpstreamConfig>) =
            if !cli_upstreams.is_empty() {
                let list = cli_upstreams
                    .iter()
                    .enumerate()
                    .map(|(i, addr)| UpstreamConfig {
                        name: String::new(),
                        role: if i == 0 { Role::Primary } else { Role::Replica },
                        priority: i as u32,
                        ..UpstreamConfig::new(addr)
                    })
                    .collect();
                ("upstream", list)
            } else if let Some(list) = file.upstreams {
                if file.upstream.is_some() {
                    return Err(invalid(
                        "upstream",
                        "set either `upstream` or `[[upstreams]]`, not both",
                    ));
                }
                ("upstreams.addr", list)
            } else {
                let addr = file.upstream.unwrap_or_else(|| "127.0.0.1:6379".to_owned());
                let single = UpstreamConfig {
                    name: String::new(),
                    ..UpstreamConfig::new(&addr)
                };
                ("upstream", vec![single])
            };

        // URLs: `host:port` to connect to, TLS, and credentials (one set for every upstream).
        let tls_all = cli.tls || file.tls.unwrap_or(false);
        let mut url_credentials: Option<(Option<String>, String)> = None;
        let mut hosts = Vec::with_capacity(upstreams.len());
        for u in &mut upstreams {
            let parsed = url::parse(&u.addr).map_err(|m| invalid(addr_field, m))?;
            if let Some(password) = parsed.password {
                let found = (parsed.username, password);
                match &url_credentials {
                    Some(seen) if *seen != found => {
                        return Err(invalid(
                            addr_field,
                            "the upstream URLs carry different credentials; redfuse \
                             authenticates to every upstream with one user and password \
                             (`username`/`password`)",
                        ));
                    }
                    _ => url_credentials = Some(found),
                }
            }
            // An unnamed upstream is named by its address (never by a URL with a password).
            if u.name.is_empty() {
                u.name = parsed.addr.clone();
            }
            u.addr = parsed.addr;
            u.tls = u.tls || parsed.tls || tls_all;
            hosts.push(parsed.host);
        }

        let password = cli.password.clone().or(file.password);
        let username = cli.username.clone().or(file.username);
        let (username, password) = match url_credentials {
            None => (username, password),
            Some((url_user, url_password)) => {
                if password.as_ref().is_some_and(|p| *p != url_password) {
                    return Err(invalid(
                        "password",
                        format!(
                            "differs from the password in the `{addr_field}` URL; redfuse \
                             authenticates to every upstream with one password: set it in \
                             one place"
                        ),
                    ));
                }
                if let (Some(a), Some(b)) = (&username, &url_user)
                    && a != b
                {
                    return Err(invalid(
                        "username",
                        format!(
                            "`{a}` differs from the user `{b}` in the `{addr_field}` URL; \
                             redfuse authenticates to every upstream as one user"
                        ),
                    ));
                }
                (url_user.or(username), Some(url_password))
            }
        };
        let credentials = match (username, password) {
            (username, Some(password)) => Some(Arc::new(Credentials { username, password })),
            (Some(_), None) => {
                return Err(invalid("username", "a username needs a `password` too"));
            }
            (None, None) => None,
        };

        let tls = TlsSettings {
            all: tls_all,
            ca_cert_file: cli.tls_ca_cert_file.clone().or(file.tls_ca_cert_file),
            cert_file: cli.tls_cert_file.clone().or(file.tls_cert_file),
            key_file: cli.tls_key_file.clone().or(file.tls_key_file),
            server_name: cli.tls_server_name.clone().or(file.tls_server_name),
        };
        resolve_tls(&tls, &mut upstreams, &hosts)?;

        let log_format = match cli.log_format.clone().or(file.log_format).as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(invalid(
                    "log_format",
                    format!("`{other}` is not `text` or `json`"),
                ));
            }
        };
        let requirepass = cli.requirepass.clone().or(file.requirepass);
        let requirepass_set = requirepass.is_some();
        let file_users = file.users.unwrap_or_default();
        let users_shown = file_users.iter().map(redact_user).collect();
        let users = client_users(requirepass, file_users)?;
        let allow_unauthenticated_clients = cli.allow_unauthenticated_clients
            || file.allow_unauthenticated_clients.unwrap_or(false);
        let fleet = FleetSettings::resolve(
            file.fleet.unwrap_or_default(),
            upstreams.iter().find(|u| u.role == Role::Primary),
            credentials.as_deref(),
        )
        .map_err(|(field, message)| invalid(field, message))?;
        let defaults = Limits::default();
        let config = Config {
            listen: cli
                .listen
                .clone()
                .or(file.listen)
                .unwrap_or_else(|| "127.0.0.1:6380".to_owned()),
            admin_listen: cli
                .admin_listen
                .clone()
                .or(file.admin_listen)
                .unwrap_or_else(|| "127.0.0.1:9380".to_owned()),
            log_level: cli
                .log_level
                .clone()
                .or(file.log_level)
                .unwrap_or_else(|| "info".to_owned()),
            log_format,
            upstreams,
            credentials,
            users,
            allow_unauthenticated_clients,
            upstream_connections: cli
                .upstream_connections
                .or(file.upstream_connections)
                .unwrap_or(2),
            connect_timeout: ms(cli
                .connect_timeout_ms
                .or(file.connect_timeout_ms)
                .unwrap_or(1000)),
            command_timeout: ms(cli
                .command_timeout_ms
                .or(file.command_timeout_ms)
                .unwrap_or(5000)),
            max_clients: cli.max_clients.or(file.max_clients).unwrap_or(10_000),
            limits: Limits {
                max_bulk_len: cli
                    .max_bulk_len
                    .or(file.max_bulk_len)
                    .unwrap_or(defaults.max_bulk_len),
                max_array_len: cli
                    .max_array_len
                    .or(file.max_array_len)
                    .unwrap_or(defaults.max_array_len),
                max_inline_len: defaults.max_inline_len,
            },
            max_reply_depth: cli
                .max_nesting_depth
                .or(file.max_nesting_depth)
                .unwrap_or(DEFAULT_MAX_REPLY_DEPTH),
            output_limits: crate::effect::OutputLimits {
                // Above the largest single reply Redis can send (a 512 MiB string), so only a
                // client that does not read hits it; the soft limit catches those sooner.
                hard: file.client_output_hard_limit_bytes.unwrap_or(600 << 20),
                soft: file.client_output_soft_limit_bytes.unwrap_or(32 << 20),
                soft_for: Duration::from_secs(file.client_output_soft_limit_seconds.unwrap_or(10)),
            },
            idle_timeout: match cli.idle_timeout_ms.or(file.idle_timeout_ms).unwrap_or(0) {
                0 => None,
                n => Some(ms(n)),
            },
            shutdown_timeout: ms(cli
                .shutdown_timeout_ms
                .or(file.shutdown_timeout_ms)
                .unwrap_or(10_000)),
            threads: cli.threads.or(file.threads).unwrap_or(1),
            admin_token: cli
                .admin_token
                .clone()
                .or(file.admin_token)
                .filter(|t| !t.is_empty()),
            ready_requires_upstream: file.ready_requires_upstream.unwrap_or(false),
            admin_header_timeout: ms(file.admin_header_timeout_ms.unwrap_or(5000)),
            admin_max_connections: file.admin_max_connections.unwrap_or(64),
            tls,
            breaker: file.breaker.unwrap_or_default(),
            read_policy: file.read_policy.unwrap_or_default(),
            balance: file.balance.unwrap_or_default(),
            max_inflight_per_upstream: file.max_inflight_per_upstream.unwrap_or(10_000),
            drain_timeout: ms(file.upstream_drain_timeout_ms.unwrap_or(10_000)),
            health_probe_interval: ms(file.health_probe_interval_ms.unwrap_or(500)),
            health_probe_timeout: ms(file.health_probe_timeout_ms.unwrap_or(1200)),
            cache: file.cache.unwrap_or_default(),
            fail_open: file.fail_open.unwrap_or_default(),
            write_queue: file.write_queue.unwrap_or_default(),
            fleet,
            drills: file.drills.unwrap_or_default(),
            discovery: file.discovery.unwrap_or_default(),
            sentinel_enabled: file.sentinel.as_ref().is_some_and(|s| s.enabled()),
            sentinel: match file.sentinel {
                Some(s) if s.enabled() => s.resolved().map_err(|m| invalid("sentinel", m))?,
                _ => SentinelSection::default(),
            },
            users_shown,
            requirepass_set,
        };
        config.validate()?;
        Ok(config)
    }

    /// Every problem found, each naming its field.
    fn validate(&self) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        let mut check = |r: Result<(), ConfigError>| {
            if let Err(e) = r {
                errors.push(e);
            }
        };
        check(check_addr("listen", &self.listen));
        check(check_addr("admin_listen", &self.admin_listen));
        if self.upstreams.is_empty() {
            check(Err(invalid("upstreams", "at least one upstream is needed")));
        }
        let mut names = std::collections::HashSet::new();
        for u in &self.upstreams {
            check(check_addr("upstreams.addr", &u.addr));
            check(
                u.breaker_config(&self.breaker).map(|_| ()).map_err(|m| {
                    invalid("upstreams.breaker", format!("upstream `{}`: {m}", u.name))
                }),
            );
            for (field, v) in [
                (
                    "upstreams.health_probe_timeout_ms",
                    u.health_probe_timeout_ms,
                ),
                ("upstreams.connect_timeout_ms", u.connect_timeout_ms),
                ("upstreams.command_timeout_ms", u.command_timeout_ms),
            ] {
                if v == Some(0) {
                    check(Err(invalid(
                        field,
                        format!("upstream `{}`: must be greater than 0", u.name),
                    )));
                }
            }
            if let Some(rules) = &u.fail_open {
                check(
                    FailOpen::compile_checked(rules, |n| {
                        crate::command::lookup(n.as_bytes()).is_some()
                    })
                    .map(|_| ())
                    .map_err(|m| {
                        invalid("upstreams.fail_open", format!("upstream `{}`: {m}", u.name))
                    }),
                );
            }
            if !names.insert(u.name.as_str()) {
                check(Err(invalid(
                    "upstreams.name",
                    format!("`{}` is used twice", u.name),
                )));
            }
        }
        let primaries = self
            .upstreams
            .iter()
            .filter(|u| u.role == Role::Primary)
            .count();
        if primaries != 1 {
            check(Err(invalid(
                "upstreams.role",
                format!("exactly one primary is needed, found {primaries}"),
            )));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log_level).is_err() {
            check(Err(invalid(
                "log_level",
                format!("`{}` is not a log level or filter", self.log_level),
            )));
        }
        for (field, v) in [
            ("upstream_connections", self.upstream_connections as u64),
            (
                "connect_timeout_ms",
                self.connect_timeout.as_millis() as u64,
            ),
            (
                "command_timeout_ms",
                self.command_timeout.as_millis() as u64,
            ),
            (
                "shutdown_timeout_ms",
                self.shutdown_timeout.as_millis() as u64,
            ),
            ("max_clients", self.max_clients as u64),
            (
                "upstream_drain_timeout_ms",
                self.drain_timeout.as_millis() as u64,
            ),
            (
                "max_inflight_per_upstream",
                self.max_inflight_per_upstream as u64,
            ),
            ("max_bulk_len", self.limits.max_bulk_len as u64),
            (
                "health_probe_timeout_ms",
                self.health_probe_timeout.as_millis() as u64,
            ),
            ("max_array_len", self.limits.max_array_len as u64),
            ("max_nesting_depth", self.max_reply_depth as u64),
            (
                "admin_header_timeout_ms",
                self.admin_header_timeout.as_millis() as u64,
            ),
            ("admin_max_connections", self.admin_max_connections as u64),
        ] {
            check(positive(field, v));
        }
        if self.upstream_connections > 64 {
            check(Err(invalid("upstream_connections", "at most 64")));
        }
        check(self.check_exposure());
        let sections: [(&'static str, Result<(), String>); 4] = [
            ("breaker", self.breaker.validate()),
            (
                "cache",
                CachePolicy::compile(&self.cache.policy()).map(|_| ()),
            ),
            (
                "fail_open",
                FailOpen::compile_checked(&self.fail_open, |n| {
                    crate::command::lookup(n.as_bytes()).is_some()
                })
                .map(|_| ()),
            ),
            ("write_queue", self.write_queue.validate()),
        ];
        for (field, r) in sections {
            check(r.map_err(|message| ConfigError::Invalid { field, message }));
        }
        check(
            self.drills
                .validate(self.admin_token.is_some())
                .map_err(|(field, message)| invalid(field, message)),
        );
        ConfigError::from_list(errors)
    }

    /// The configuration as it runs, in the file's shape (defaults filled in, upstream
    /// URLs resolved), with every secret replaced by [`REDACTED`]: what `--check-config`
    /// prints and `GET /config` serves.
    pub fn effective(&self) -> toml::Table {
        let secret = |set: bool| set.then_some(REDACTED);
        let shown = Effective {
            listen: &self.listen,
            admin_listen: &self.admin_listen,
            log_level: &self.log_level,
            log_format: match self.log_format {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            },
            username: self
                .credentials
                .as_ref()
                .and_then(|c| c.username.as_deref()),
            password: secret(self.credentials.is_some()),
            requirepass: secret(self.requirepass_set),
            allow_unauthenticated_clients: self.allow_unauthenticated_clients,
            upstream_connections: self.upstream_connections,
            connect_timeout_ms: self.connect_timeout.as_millis() as u64,
            command_timeout_ms: self.command_timeout.as_millis() as u64,
            max_clients: self.max_clients,
            max_bulk_len: self.limits.max_bulk_len,
            max_array_len: self.limits.max_array_len,
            max_nesting_depth: self.max_reply_depth,
            idle_timeout_ms: self.idle_timeout.map_or(0, |d| d.as_millis() as u64),
            shutdown_timeout_ms: self.shutdown_timeout.as_millis() as u64,
            threads: self.threads,
            admin_token: secret(self.admin_token.is_some()),
            ready_requires_upstream: self.ready_requires_upstream,
            admin_header_timeout_ms: self.admin_header_timeout.as_millis() as u64,
            admin_max_connections: self.admin_max_connections,
            read_policy: self.read_policy,
            balance: self.balance,
            max_inflight_per_upstream: self.max_inflight_per_upstream,
            upstream_drain_timeout_ms: self.drain_timeout.as_millis() as u64,
            health_probe_interval_ms: self.health_probe_interval.as_millis() as u64,
            health_probe_timeout_ms: self.health_probe_timeout.as_millis() as u64,
            client_output_hard_limit_bytes: self.output_limits.hard,
            client_output_soft_limit_bytes: self.output_limits.soft,
            client_output_soft_limit_seconds: self.output_limits.soft_for.as_secs(),
            tls: self.tls.all,
            tls_ca_cert_file: self.tls.ca_cert_file.as_deref(),
            tls_cert_file: self.tls.cert_file.as_deref(),
            tls_key_file: self.tls.key_file.as_deref(),
            tls_server_name: self.tls.server_name.as_deref(),
            upstreams: &self.upstreams,
            users: &self.users_shown,
            breaker: &self.breaker,
            cache: &self.cache,
            fail_open: &self.fail_open,
            write_queue: WriteQueueShown {
                max_bytes: self.write_queue.max_bytes,
                max_entries: self.write_queue.max_entries,
                journal_path: self.write_queue.journal_path.as_deref(),
                fsync: format!("{:?}", self.write_queue.fsync).to_ascii_lowercase(),
            },
            fleet: self.fleet.shown(),
            drills: &self.drills,
            discovery: &self.discovery,
            sentinel: self.sentinel_enabled.then(|| SentinelSection {
                password: self.sentinel.password.as_ref().map(|_| REDACTED.to_owned()),
                ..self.sentinel.clone()
            }),
        };
        toml::Table::try_from(&shown).unwrap_or_else(|e| {
            let mut t = toml::Table::new();
            t.insert("error".into(), e.to_string().into());
            t
        })
    }

    /// [`Config::effective`] as a TOML document.
    pub fn effective_toml(&self) -> String {
        toml::to_string(&self.effective()).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }

    /// [`Config::effective`] as JSON.
    pub fn effective_json(&self) -> serde_json::Value {
        serde_json::to_value(self.effective()).unwrap_or_default()
    }

    /// Secure by default: redfuse holding upstream credentials lends them to every client
    /// that connects without authenticating. That is the sidecar model on loopback inside
    /// a pod; anywhere else it needs client authentication, or an explicit opt-out.
    fn check_exposure(&self) -> Result<(), ConfigError> {
        if self.credentials.is_some()
            && self.users.is_empty()
            && !self.allow_unauthenticated_clients
            && !is_loopback(&self.listen)
        {
            return Err(invalid(
                "listen",
                format!(
                    "redfuse holds upstream credentials (`password`) and would lend them to \
                     unauthenticated clients on the non-loopback address `{}`; set \
                     `--requirepass` (or `[[users]]` in the config file) so clients must \
                     authenticate, or pass `--allow-unauthenticated-clients` to accept them \
                     anyway",
                    self.listen
                ),
            ));
        }
        Ok(())
    }

    /// Whether clients on a non-loopback listener are served with redfuse's upstream
    /// credentials without authenticating (allowed explicitly; logged as a warning).
    pub fn exposes_credentials(&self) -> bool {
        self.credentials.is_some() && self.users.is_empty() && !is_loopback(&self.listen)
    }

    /// The primary upstream (validation guarantees exactly one).
    pub fn primary(&self) -> &UpstreamConfig {
        self.upstreams
            .iter()
            .find(|u| u.role == Role::Primary)
            .expect("validated: one primary")
    }
}

/// The shape of [`Config::effective`]: the file's keys, resolved.
#[derive(Serialize)]
struct Effective<'a> {
    listen: &'a str,
    admin_listen: &'a str,
    log_level: &'a str,
    log_format: &'static str,
    username: Option<&'a str>,
    password: Option<&'static str>,
    requirepass: Option<&'static str>,
    allow_unauthenticated_clients: bool,
    upstream_connections: usize,
    connect_timeout_ms: u64,
    command_timeout_ms: u64,
    max_clients: usize,
    max_bulk_len: usize,
    max_array_len: usize,
    max_nesting_depth: usize,
    idle_timeout_ms: u64,
    shutdown_timeout_ms: u64,
    threads: usize,
    admin_token: Option<&'static str>,
    ready_requires_upstream: bool,
    admin_header_timeout_ms: u64,
    admin_max_connections: usize,
    read_policy: ReadPolicy,
    balance: Balance,
    max_inflight_per_upstream: usize,
    upstream_drain_timeout_ms: u64,
    health_probe_interval_ms: u64,
    health_probe_timeout_ms: u64,
    client_output_hard_limit_bytes: usize,
    client_output_soft_limit_bytes: usize,
    client_output_soft_limit_seconds: u64,
    tls: bool,
    tls_ca_cert_file: Option<&'a Path>,
    tls_cert_file: Option<&'a Path>,
    tls_key_file: Option<&'a Path>,
    tls_server_name: Option<&'a str>,
    upstreams: &'a [UpstreamConfig],
    users: &'a [UserConfig],
    breaker: &'a BreakerConfig,
    cache: &'a CacheSection,
    fail_open: &'a FailOpenConfig,
    write_queue: WriteQueueShown<'a>,
    fleet: FleetConfig,
    drills: &'a DrillsConfig,
    discovery: &'a DiscoverySection,
    #[serde(skip_serializing_if = "Option::is_none")]
    sentinel: Option<SentinelSection>,
}

#[derive(Serialize)]
struct WriteQueueShown<'a> {
    max_bytes: usize,
    max_entries: usize,
    journal_path: Option<&'a Path>,
    fsync: String,
}

/// A `[[users]]` entry as shown: every password and hash replaced.
fn redact_user(u: &UserConfig) -> UserConfig {
    let hide = |s: &Option<String>| s.as_ref().map(|_| REDACTED.to_owned());
    UserConfig {
        name: u.name.clone(),
        password: hide(&u.password),
        password_sha256: hide(&u.password_sha256),
        enabled: u.enabled,
        upstream_username: u.upstream_username.clone(),
        upstream_password: hide(&u.upstream_password),
    }
}

/// Builds the TLS client settings of the upstreams that use TLS (`hosts[i]` is upstream
/// `i`'s host). TLS settings with no TLS upstream are refused: they would connect in plain
/// text while the operator believes otherwise.
fn resolve_tls(
    tls: &TlsSettings,
    upstreams: &mut [UpstreamConfig],
    hosts: &[String],
) -> Result<(), ConfigError> {
    if !upstreams.iter().any(|u| u.tls) {
        let set = [
            ("tls_ca_cert_file", tls.ca_cert_file.is_some()),
            ("tls_cert_file", tls.cert_file.is_some()),
            ("tls_key_file", tls.key_file.is_some()),
            ("tls_server_name", tls.server_name.is_some()),
        ];
        if let Some((field, _)) = set.iter().find(|(_, set)| *set) {
            return Err(invalid(
                field,
                "is set but no upstream uses TLS: use rediss:// addresses, `tls = true` \
                 (or --tls), or `tls = true` on an [[upstreams]] entry",
            ));
        }
        return Ok(());
    }
    let config = crate::upstream::tls::client_config(
        tls.ca_cert_file.as_deref(),
        tls.cert_file.as_deref(),
        tls.key_file.as_deref(),
    )
    .map_err(|(field, message)| invalid(field, message))?;
    for (u, host) in upstreams.iter_mut().zip(hosts) {
        if !u.tls {
            continue;
        }
        let (field, name) = match &tls.server_name {
            Some(n) => ("tls_server_name", n.clone()),
            None => ("upstreams.addr", host.clone()),
        };
        let server_name = rustls::pki_types::ServerName::try_from(name.clone())
            .map_err(|_| invalid(field, format!("`{name}` is not a DNS name or IP address")))?;
        u.tls_client = Some(TlsClient {
            config: config.clone(),
            server_name,
        });
    }
    Ok(())
}

/// Default of `max_nesting_depth`: eight bytes of bookkeeping a level, and far deeper than
/// a Lua script or a module reply goes.
pub const DEFAULT_MAX_REPLY_DEPTH: usize = 65_536;

/// Whether a listen address accepts only local connections.
pub fn is_loopback(addr: &str) -> bool {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The listener's client users: `requirepass` is user `default`.
fn client_users(
    requirepass: Option<String>,
    users: Vec<UserConfig>,
) -> Result<Vec<UserSpec>, ConfigError> {
    let mut out: Vec<UserSpec> = Vec::new();
    if let Some(pw) = requirepass {
        if pw.is_empty() {
            return Err(invalid("requirepass", "must not be empty"));
        }
        out.push(UserSpec {
            name: "default".into(),
            passwords: vec![crate::auth::sha256(pw.as_bytes())],
            enabled: true,
            upstream: None,
        });
    }
    for u in users {
        if u.name.is_empty() || u.name.contains(char::is_whitespace) {
            return Err(invalid(
                "users.name",
                format!("`{}` is not a user name", u.name),
            ));
        }
        if out.iter().any(|o| o.name == u.name) {
            let why = if u.name == "default" {
                "user `default` is set twice (requirepass is user `default`)".to_owned()
            } else {
                format!("`{}` is used twice", u.name)
            };
            return Err(invalid("users.name", why));
        }
        let mut passwords = Vec::new();
        if let Some(p) = &u.password {
            passwords.push(crate::auth::sha256(p.as_bytes()));
        }
        if let Some(h) = &u.password_sha256 {
            passwords.push(parse_sha256(h).ok_or_else(|| {
                invalid(
                    "users.password_sha256",
                    format!("user `{}`: expected 64 hex digits", u.name),
                )
            })?);
        }
        if passwords.is_empty() {
            return Err(invalid(
                "users.password",
                format!("user `{}` needs `password` or `password_sha256`", u.name),
            ));
        }
        let upstream = match (u.upstream_username, u.upstream_password) {
            (username, Some(password)) => Some(Credentials { username, password }),
            (Some(_), None) => {
                return Err(invalid(
                    "users.upstream_password",
                    format!(
                        "user `{}`: `upstream_username` needs `upstream_password`",
                        u.name
                    ),
                ));
            }
            (None, None) => None,
        };
        out.push(UserSpec {
            name: u.name,
            passwords,
            enabled: u.enabled,
            upstream,
        });
    }
    Ok(out)
}

fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn positive(field: &'static str, v: u64) -> Result<(), ConfigError> {
    if v == 0 {
        Err(invalid(field, "must be greater than 0"))
    } else {
        Ok(())
    }
}

/// `host:port`, where host may be a name (resolved when connecting) or an IP literal.
fn check_addr(field: &'static str, addr: &str) -> Result<(), ConfigError> {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(invalid(field, format!("`{addr}` is not host:port")));
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(invalid(field, format!("`{addr}` is not host:port")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        let mut all = vec!["redfuse"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).unwrap()
    }

    fn file(text: &str) -> FileConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn defaults_listen_on_6380_and_forward_to_6379() {
        let c = Config::merge(&Cli::default(), FileConfig::default()).unwrap();
        assert_eq!(c.listen, "127.0.0.1:6380");
        assert_eq!(c.admin_listen, "127.0.0.1:9380");
        assert_eq!(c.primary().addr, "127.0.0.1:6379");
        assert_eq!(c.limits.max_bulk_len, 512 * 1024 * 1024);
        assert_eq!(c.idle_timeout, None);
        assert_eq!(c.shutdown_timeout, Duration::from_secs(10));
    }

    #[test]
    fn a_sentinel_url_in_the_upstream_flag_is_put_back_together() {
        let f = file("[sentinel]\nurl = \"sentinel://old:26379/old\"\nrefresh_ms = 700");
        let c = Config::merge(
            &cli(&["--upstream", "sentinel://u:p%40ss@a:26379,b:26380/mymaster"]),
            f,
        )
        .unwrap();
        assert!(c.sentinel_enabled);
        assert_eq!(c.sentinel.addrs, ["a:26379", "b:26380"]);
        assert_eq!(c.sentinel.master_name, "mymaster");
        assert_eq!(c.sentinel.username.as_deref(), Some("u"));
        assert_eq!(c.sentinel.password.as_deref(), Some("p@ss"));
        assert_eq!(c.sentinel.refresh_ms, 700);
    }

    #[test]
    fn flags_win_over_file() {
        let f =
            file("listen = \"0.0.0.0:7000\"\ncommand_timeout_ms = 250\nupstream = \"redis:6379\"");
        let c = Config::merge(&cli(&["--listen", "127.0.0.1:7001"]), f).unwrap();
        assert_eq!(c.listen, "127.0.0.1:7001");
        assert_eq!(c.command_timeout, Duration::from_millis(250));
        assert_eq!(c.primary().addr, "redis:6379");
    }

    #[test]
    fn repeated_upstream_flags_make_replicas() {
        let c = Config::merge(
            &cli(&["--upstream", "a:1", "--upstream", "b:2"]),
            FileConfig::default(),
        )
        .unwrap();
        assert_eq!(c.upstreams.len(), 2);
        assert_eq!(c.upstreams[0].role, Role::Primary);
        assert_eq!(c.upstreams[1].role, Role::Replica);
        assert_eq!(c.upstreams[1].name, "b:2");
    }

    #[test]
    fn bad_values_name_the_field() {
        let err = |c: Cli, f: FileConfig| Config::merge(&c, f).unwrap_err().to_string();
        assert!(err(cli(&["--listen", "nope"]), FileConfig::default()).contains("`listen`"));
        assert!(err(cli(&["--log-format", "xml"]), FileConfig::default()).contains("`log_format`"));
        assert!(
            err(cli(&["--command-timeout-ms", "0"]), FileConfig::default())
                .contains("`command_timeout_ms`")
        );
        assert!(err(Cli::default(), file("username = \"u\"")).contains("`username`"));
        let two_primaries = file(
            "[[upstreams]]\naddr = \"a:1\"\nname = \"a\"\n[[upstreams]]\naddr = \"b:1\"\nname = \"b\"",
        );
        assert!(err(Cli::default(), two_primaries).contains("upstreams.role"));
    }

    #[test]
    fn unnamed_upstreams_are_named_by_address() {
        let f = file(
            "[[upstreams]]\naddr = \"a:1\"\n[[upstreams]]\naddr = \"b:1\"\nrole = \"replica\"",
        );
        let c = Config::merge(&Cli::default(), f).unwrap();
        assert_eq!(c.upstreams[0].name, "a:1");
        assert_eq!(c.upstreams[1].name, "b:1");
    }

    #[test]
    fn the_documented_example_config_is_valid() {
        let text = include_str!("../config/redfuse.toml");
        let c = Config::merge(&Cli::default(), toml::from_str(text).unwrap()).unwrap();
        assert_eq!(c.primary().name, "primary");
        assert_eq!(c.fail_open.rules.len(), 4);
        assert!(c.cache.enabled);
    }

    #[test]
    fn unknown_file_fields_are_named() {
        let dir = std::env::temp_dir().join(format!("redfuse-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        std::fs::write(&path, "lissten = \"x\"\n").unwrap();
        let e = FileConfig::load(&path).unwrap_err().to_string();
        assert!(e.contains("lissten"), "{e}");
    }

    #[test]
    fn client_users_and_requirepass() {
        let c = Config::merge(&cli(&["--requirepass", "pw"]), FileConfig::default()).unwrap();
        assert_eq!(c.users.len(), 1);
        assert_eq!(c.users[0].name, "default");
        let f = file(
            "[[users]]\nname = \"alice\"\npassword_sha256 = \"5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8\"\nupstream_username = \"app\"\nupstream_password = \"x\"",
        );
        let c = Config::merge(&Cli::default(), f).unwrap();
        assert_eq!(c.users[0].passwords[0], crate::auth::sha256(b"password"));
        assert_eq!(c.users[0].upstream.as_ref().unwrap().user(), "app");
        let err = |c: Cli, f: FileConfig| Config::merge(&c, f).unwrap_err().to_string();
        assert!(err(Cli::default(), file("[[users]]\nname = \"a\"")).contains("users.password"));
        assert!(
            err(
                Cli::default(),
                file("[[users]]\nname = \"a\"\npassword_sha256 = \"zz\"")
            )
            .contains("users.password_sha256")
        );
        assert!(
            err(
                cli(&["--requirepass", "x"]),
                file("[[users]]\nname = \"default\"\npassword = \"y\"")
            )
            .contains("users.name")
        );
    }

    #[test]
    fn upstream_credentials_are_not_lent_to_anyone_on_the_network() {
        let err = Config::merge(
            &cli(&["--password", "pw", "--listen", "0.0.0.0:6380"]),
            FileConfig::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("`listen`"), "{err}");
        assert!(err.contains("--requirepass"), "{err}");
        assert!(err.contains("--allow-unauthenticated-clients"), "{err}");
        for ok in [
            vec!["--password", "pw", "--listen", "127.0.0.1:6380"],
            vec!["--password", "pw", "--listen", "[::1]:6380"],
            vec!["--password", "pw", "--listen", "localhost:6380"],
            vec![
                "--password",
                "pw",
                "--listen",
                "0.0.0.0:6380",
                "--requirepass",
                "c",
            ],
            vec![
                "--password",
                "pw",
                "--listen",
                "0.0.0.0:6380",
                "--allow-unauthenticated-clients",
            ],
            vec!["--listen", "0.0.0.0:6380"],
        ] {
            Config::merge(&cli(&ok), FileConfig::default())
                .unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
        let c = Config::merge(
            &cli(&[
                "--password",
                "pw",
                "--listen",
                "0.0.0.0:1",
                "--allow-unauthenticated-clients",
            ]),
            FileConfig::default(),
        )
        .unwrap();
        assert!(c.exposes_credentials());
    }
}
