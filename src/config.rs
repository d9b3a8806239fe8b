//! One validated [`Config`] from flags, environment, a TOML file and defaults.
//!
//! Precedence is flag > env > file > default. clap already folds env into flags
//! (`REDFUSE_<NAME>`), so every flag is an `Option` with no clap default; the file is read next
//! and defaults fill the rest. Validation happens once, here, and every message names the field
//! so that an operator can fix a bad deployment from the log line alone.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

use std::sync::Arc;

pub use crate::auth::Credentials;
use crate::auth::UserSpec;
use crate::breaker::BreakerConfig;
use crate::cache::CacheConfig;
use crate::resp::Limits;
use crate::rules::{
    CachePolicy, CachePolicyConfig, FailOpen, FailOpenConfig, MissReply, PatternConfig,
};
use crate::writequeue::WriteQueueConfig;

/// Command-line interface. Every flag has an env var `REDFUSE_<NAME>`.
#[derive(Debug, Parser, Default)]
#[command(
    name = "redfuse",
    version,
    about = "A RESP caching proxy that keeps serving when Redis fails"
)]
pub struct Cli {
    /// Address clients connect to (default 127.0.0.1:6380).
    #[arg(long, env = "REDFUSE_LISTEN")]
    pub listen: Option<String>,
    /// Upstream Redis host:port; repeat for replicas (the first is the primary).
    #[arg(long, env = "REDFUSE_UPSTREAM", value_delimiter = ',')]
    pub upstream: Vec<String>,
    /// Admin HTTP address serving /metrics, /healthz, /ready (default 127.0.0.1:9380).
    #[arg(long, env = "REDFUSE_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// TOML configuration file.
    #[arg(long, env = "REDFUSE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Validate this configuration file and exit.
    #[arg(long, value_name = "FILE")]
    pub check_config: Option<PathBuf>,
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
    pub breaker: Option<BreakerConfig>,
    pub read_policy: Option<ReadPolicy>,
    pub balance: Option<Balance>,
    pub max_inflight_per_upstream: Option<usize>,
    pub health_probe_interval_ms: Option<u64>,
    pub health_probe_timeout_ms: Option<u64>,
    pub cache: Option<CacheSection>,
    pub fail_open: Option<FailOpenConfig>,
    pub write_queue: Option<WriteQueueConfig>,
}

/// `[cache]`: the degraded-mode reply cache: its bounds and which keys it serves how.
///
/// The policy fields mirror `rules::CachePolicyConfig` on purpose: serde cannot `flatten`
/// into a struct that denies unknown fields, and a typo in `[cache]` must be reported.
#[derive(Debug, Clone, Deserialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    #[default]
    RoundRobin,
    LeastOutstanding,
    Weighted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    #[default]
    Primary,
    Replica,
}

/// One upstream Redis.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Name used in metrics, logs and error replies (defaults to the address).
    #[serde(default)]
    pub name: String,
    pub addr: String,
    #[serde(default)]
    pub role: Role,
    #[serde(default)]
    pub priority: u32,
    #[serde(default = "one")]
    pub weight: u32,
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
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// Plain password.
    #[serde(default)]
    pub password: Option<String>,
    /// SHA-256 of the password, in hex (as Redis's ACL `#<hash>`), to keep it out of the
    /// file.
    #[serde(default)]
    pub password_sha256: Option<String>,
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The upstream ACL user this user's commands run as; default: redfuse's own
    /// credentials (`username`/`password`).
    #[serde(default)]
    pub upstream_username: Option<String>,
    #[serde(default)]
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
    pub breaker: BreakerConfig,
    pub read_policy: ReadPolicy,
    pub balance: Balance,
    pub max_inflight_per_upstream: usize,
    /// 0 disables the active health probe.
    pub health_probe_interval: Duration,
    /// No answer from the probe within this is a failed probe (a frozen server).
    pub health_probe_timeout: Duration,
    pub cache: CacheSection,
    pub fail_open: FailOpenConfig,
    pub write_queue: WriteQueueConfig,
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
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim().replace('\n', " "),
        })
    }
}

impl Config {
    /// Loads the file named by `--config` (if any) and merges it under the flags.
    pub fn from_cli(cli: &Cli) -> Result<Config, ConfigError> {
        let file = match &cli.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        Config::merge(cli, file)
    }

    /// Merges flags over a file over defaults, then validates.
    pub fn merge(cli: &Cli, file: FileConfig) -> Result<Config, ConfigError> {
        let upstreams = if !cli.upstream.is_empty() {
            cli.upstream
                .iter()
                .enumerate()
                .map(|(i, addr)| UpstreamConfig {
                    name: addr.clone(),
                    addr: addr.clone(),
                    role: if i == 0 { Role::Primary } else { Role::Replica },
                    priority: i as u32,
                    weight: 1,
                })
                .collect()
        } else if let Some(list) = file.upstreams {
            if file.upstream.is_some() {
                return Err(invalid(
                    "upstream",
                    "set either `upstream` or `[[upstreams]]`, not both",
                ));
            }
            // An unnamed upstream is named by its address, as on the command line.
            list.into_iter()
                .map(|mut u| {
                    if u.name.is_empty() {
                        u.name = u.addr.clone();
                    }
                    u
                })
                .collect()
        } else {
            let addr = file.upstream.unwrap_or_else(|| "127.0.0.1:6379".to_owned());
            vec![UpstreamConfig {
                name: addr.clone(),
                addr,
                role: Role::Primary,
                priority: 0,
                weight: 1,
            }]
        };

        let password = cli.password.clone().or(file.password);
        let username = cli.username.clone().or(file.username);
        let credentials = match (username, password) {
            (username, Some(password)) => Some(Arc::new(Credentials { username, password })),
            (Some(_), None) => {
                return Err(invalid("username", "a username needs a `password` too"));
            }
            (None, None) => None,
        };
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
        let users = client_users(
            cli.requirepass.clone().or(file.requirepass),
            file.users.unwrap_or_default(),
        )?;
        let allow_unauthenticated_clients = cli.allow_unauthenticated_clients
            || file.allow_unauthenticated_clients.unwrap_or(false);
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
            breaker: file.breaker.unwrap_or_default(),
            read_policy: file.read_policy.unwrap_or_default(),
            balance: file.balance.unwrap_or_default(),
            max_inflight_per_upstream: file.max_inflight_per_upstream.unwrap_or(10_000),
            health_probe_interval: ms(file.health_probe_interval_ms.unwrap_or(500)),
            health_probe_timeout: ms(file.health_probe_timeout_ms.unwrap_or(1200)),
            cache: file.cache.unwrap_or_default(),
            fail_open: file.fail_open.unwrap_or_default(),
            write_queue: file.write_queue.unwrap_or_default(),
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        check_addr("listen", &self.listen)?;
        check_addr("admin_listen", &self.admin_listen)?;
        if self.upstreams.is_empty() {
            return Err(invalid("upstreams", "at least one upstream is needed"));
        }
        let mut names = std::collections::HashSet::new();
        for u in &self.upstreams {
            check_addr("upstreams.addr", &u.addr)?;
            if !names.insert(u.name.as_str()) {
                return Err(invalid(
                    "upstreams.name",
                    format!("`{}` is used twice", u.name),
                ));
            }
        }
        let primaries = self
            .upstreams
            .iter()
            .filter(|u| u.role == Role::Primary)
            .count();
        if primaries != 1 {
            return Err(invalid(
                "upstreams.role",
                format!("exactly one primary is needed, found {primaries}"),
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log_level).is_err() {
            return Err(invalid(
                "log_level",
                format!("`{}` is not a log level or filter", self.log_level),
            ));
        }
        positive("upstream_connections", self.upstream_connections as u64)?;
        positive(
            "connect_timeout_ms",
            self.connect_timeout.as_millis() as u64,
        )?;
        positive(
            "command_timeout_ms",
            self.command_timeout.as_millis() as u64,
        )?;
        positive(
            "shutdown_timeout_ms",
            self.shutdown_timeout.as_millis() as u64,
        )?;
        positive("max_clients", self.max_clients as u64)?;
        positive(
            "max_inflight_per_upstream",
            self.max_inflight_per_upstream as u64,
        )?;
        positive("max_bulk_len", self.limits.max_bulk_len as u64)?;
        positive(
            "health_probe_timeout_ms",
            self.health_probe_timeout.as_millis() as u64,
        )?;
        positive("max_array_len", self.limits.max_array_len as u64)?;
        positive("max_nesting_depth", self.max_reply_depth as u64)?;
        self.check_exposure()?;
        if let Err(message) = self.breaker.validate() {
            return Err(ConfigError::Invalid {
                field: "breaker",
                message,
            });
        }
        if let Err(message) = CachePolicy::compile(&self.cache.policy()) {
            return Err(ConfigError::Invalid {
                field: "cache",
                message,
            });
        }
        if let Err(message) = FailOpen::compile_checked(&self.fail_open, |n| {
            crate::command::lookup(n.as_bytes()).is_some()
        }) {
            return Err(ConfigError::Invalid {
                field: "fail_open",
                message,
            });
        }
        if let Err(message) = self.write_queue.validate() {
            return Err(ConfigError::Invalid {
                field: "write_queue",
                message,
            });
        }
        if self.upstream_connections > 64 {
            return Err(invalid("upstream_connections", "at most 64"));
        }
        Ok(())
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
