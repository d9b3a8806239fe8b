//! Hot reload: SIGHUP, or a change of the configuration file, loads the configuration again
//! the way the process was started (the same flags, the environment, the same file) and
//! applies what can change while clients are connected.
//!
//! # Design
//!
//! A reload is all or nothing. The new configuration is loaded and validated in full first
//! (`Config::load`, the same code as at start-up, so its errors name the field); an invalid
//! one is logged and counted (`redfuse_config_reload_total{result="error"}`) and the running
//! configuration stays. A valid one is applied piece by piece, each through the owner of
//! that piece, none of them closing a client connection or dropping a command:
//!
//! * the upstream list through the set's reconciliation (`upstream::set`): moved and
//!   removed upstreams drain, added ones are probed first;
//! * breaker thresholds through each breaker's `reconfigure` (state and timers kept);
//! * fail-open rules and the cache policy through `rules::Live` (requests in flight keep
//!   the rules they started with);
//! * the log level through the tracing filter's reload handle;
//! * `read_policy`, `balance` and `upstream_drain_timeout_ms` by publishing the new
//!   configuration, which `GET /config` then shows.
//!
//! Everything else (listen addresses, limits, credentials, the cache's size, the write
//! queue, ...) is fixed by what was set up at start: a change to it is logged as needing a
//! restart and otherwise ignored.
//!
//! The file is polled every second (its contents, not only its mtime: an editor that
//! rewrites a file within the same second is still noticed), which needs no extra
//! dependency and works with the symlink swaps of a Kubernetes ConfigMap.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounter, IntCounterVec, Opts};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::config::{Cli, Config, ConfigError};
use crate::rules::{CachePolicy, FailOpen};
use crate::server::Server;
use crate::upstream::set::SetError;

/// Sets the log filter (`log_level`) of the running process.
pub type LogLevelSetter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// How often the configuration file is checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Where the configuration came from: loaded again the same way on each reload.
#[derive(Debug, Clone)]
pub struct Source {
    pub cli: Cli,
    pub path: Option<PathBuf>,
}

/// Why a reload was rejected; the running configuration stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("invalid `upstreams`: {0}")]
    Upstreams(#[from] SetError),
    #[error("invalid `log_level`: {0}")]
    LogLevel(String),
    #[error("invalid `{field}`: {message}")]
    Rules {
        field: &'static str,
        message: String,
    },
}

/// What a reload changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Keys applied at run time that changed.
    pub applied: Vec<&'static str>,
    /// Keys that changed but take effect only after a restart.
    pub restart_needed: Vec<String>,
}

pub struct Reloader {
    server: Arc<Server>,
    source: Source,
    log_level: Option<LogLevelSetter>,
    ok: IntCounter,
    error: IntCounter,
    one_at_a_time: tokio::sync::Mutex<()>,
}

impl Reloader {
    pub fn new(
        server: Arc<Server>,
        source: Source,
        log_level: Option<LogLevelSetter>,
    ) -> prometheus::Result<Arc<Reloader>> {
        let total = IntCounterVec::new(
            Opts::new(
                "redfuse_config_reload_total",
                "Configuration reloads (SIGHUP or a change of the file), by result",
            ),
            &["result"],
        )?;
        server.metrics.registry.register(Box::new(total.clone()))?;
        Ok(Arc::new(Reloader {
            ok: total.with_label_values(&["ok"]),
            error: total.with_label_values(&["error"]),
            server,
            source,
            log_level,
            one_at_a_time: tokio::sync::Mutex::new(()),
        }))
    }

    /// Loads the configuration again and applies it, or logs why not and keeps the
    /// running one. `trigger` says what asked (`sighup`, `file`), for the log.
    pub async fn reload(&self, trigger: &str) -> Result<Changes, ReloadError> {
        let _one = self.one_at_a_time.lock().await;
        let started = std::time::Instant::now();
        match self.try_reload().await {
            Ok(changes) => {
                let took_ms = started.elapsed().as_millis() as u64;
                self.ok.inc();
                for key in &changes.restart_needed {
                    warn!(
                        key = %key,
                        "`{key}` changed in the configuration; it takes effect after a restart"
                    );
                }
                info!(
                    trigger,
                    took_ms,
                    applied = ?changes.applied,
                    restart_needed = ?changes.restart_needed,
                    "configuration reloaded"
                );
                Ok(changes)
            }
            Err(e) => {
                self.error.inc();
                error!(
                    trigger,
                    "configuration reload rejected, keeping the running configuration: {e}"
                );
                Err(e)
            }
        }
    }

    async fn try_reload(&self) -> Result<Changes, ReloadError> {
        let new = Config::load(
            &self.source.cli,
            self.source.path.as_deref(),
            std::env::vars_os(),
        )?;
        let old = self.server.current_config();
        let mut changes = Changes {
            restart_needed: restart_needed(&old, &new),
            ..Changes::default()
        };
        // Compiled before anything is applied, so that a failure leaves everything as it was
        // (validation compiled them already; this cannot fail for a validated config).
        let fail_open = (new.fail_open != old.fail_open)
            .then(|| {
                FailOpen::compile_checked(&new.fail_open, |n| {
                    crate::command::lookup(n.as_bytes()).is_some()
                })
                .map_err(|message| ReloadError::Rules {
                    field: "fail_open",
                    message,
                })
            })
            .transpose()?;
        let policy = (new.cache.policy() != old.cache.policy())
            .then(|| {
                CachePolicy::compile(&new.cache.policy()).map_err(|message| ReloadError::Rules {
                    field: "cache",
                    message,
                })
            })
            .transpose()?;
        if new.log_level != old.log_level
            && let Some(set) = &self.log_level
        {
            set(&new.log_level).map_err(ReloadError::LogLevel)?;
            changes.applied.push("log_level");
        }

        // The global breaker settings first: the reconciliation lays each upstream's own
        // over them and reconfigures the breakers whose settings changed.
        self.server.manager.set_defaults(
            new.breaker.clone(),
            crate::upstream::probe::ProbeTiming {
                interval: old.health_probe_interval,
                timeout: old.health_probe_timeout,
            },
            new.drain_timeout,
        );
        let applied = self.server.apply_upstreams(&new.upstreams).await?;
        if !applied.is_empty() {
            changes.applied.push("upstreams");
        }
        if new.breaker != old.breaker {
            changes.applied.push("breaker");
        }
        if let Some(rules) = fail_open {
            self.server.degrade.fail_open.replace(rules);
            changes.applied.push("fail_open");
        }
        if let Some(policy) = policy {
            self.server.degrade.policy.replace(policy);
            changes.applied.push("cache");
        }
        for (key, changed) in [
            ("read_policy", new.read_policy != old.read_policy),
            ("balance", new.balance != old.balance),
            (
                "upstream_drain_timeout_ms",
                new.drain_timeout != old.drain_timeout,
            ),
        ] {
            if changed {
                changes.applied.push(key);
            }
        }
        self.server.set_config(new);
        Ok(changes)
    }

    /// Reloads on SIGHUP and when the file's contents change, until shutdown.
    pub fn spawn(self: &Arc<Self>, shutdown: watch::Receiver<bool>) {
        let me = self.clone();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let mut hup = match signal(SignalKind::hangup()) {
                Ok(s) => s,
                Err(e) => {
                    warn!("cannot install the SIGHUP handler, reload by SIGHUP is off: {e}");
                    return;
                }
            };
            loop {
                tokio::select! {
                    r = hup.recv() => {
                        if r.is_none() {
                            return;
                        }
                        let _ = me.reload("sighup").await;
                    }
                    _ = stop.changed() => return,
                }
            }
        });
        let Some(path) = self.source.path.clone() else {
            return;
        };
        let me = self.clone();
        let mut stop = shutdown;
        tokio::spawn(async move {
            let mut seen = tokio::fs::read(&path).await.ok();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(POLL_INTERVAL) => {}
                    _ = stop.changed() => return,
                }
                // Unreadable for a moment (an editor or a ConfigMap swapping it): next time.
                let Ok(now) = tokio::fs::read(&path).await else {
                    continue;
                };
                if seen.as_deref() != Some(&now[..]) {
                    seen = Some(now);
                    let _ = me.reload("file").await;
                }
            }
        });
    }
}

/// The keys applied at run time; within `[cache]`, only the policy is.
const RELOADABLE: &[&str] = &[
    "log_level",
    "upstreams",
    "breaker",
    "fail_open",
    "read_policy",
    "balance",
    "upstream_drain_timeout_ms",
];
const RELOADABLE_CACHE: &[&str] = &[
    "max_stale_ms",
    "cache_nil",
    "miss",
    "include",
    "exclude",
    "patterns",
];

/// The keys that differ between `old` and `new` but are fixed at start.
fn restart_needed(old: &Config, new: &Config) -> Vec<String> {
    let (a, b) = (old.effective(), new.effective());
    let mut out = Vec::new();
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for key in keys {
        if RELOADABLE.contains(&key.as_str()) {
            continue;
        }
        let (x, y) = (a.get(key), b.get(key));
        if key == "cache" {
            let table = |t: Option<&toml::Value>| t.and_then(|t| t.as_table()).cloned();
            let (x, y) = (table(x).unwrap_or_default(), table(y).unwrap_or_default());
            let sub: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in sub {
                if !RELOADABLE_CACHE.contains(&k.as_str()) && x.get(k) != y.get(k) {
                    out.push(format!("cache.{k}"));
                }
            }
            continue;
        }
        if x != y {
            out.push(key.clone());
        }
    }
    // Secrets are redacted in the effective configuration: compared here.
    if old.credentials != new.credentials && !out.iter().any(|k| k == "password") {
        out.push("password".into());
    }
    if old.admin_token != new.admin_token && !out.iter().any(|k| k == "admin_token") {
        out.push("admin_token".into());
    }
    if format!("{:?}", old.users) != format!("{:?}", new.users) && !out.iter().any(|k| k == "users")
    {
        out.push("users".into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FileConfig;

    fn config(text: &str) -> Config {
        Config::merge(&Cli::default(), toml::from_str::<FileConfig>(text).unwrap()).unwrap()
    }

    #[test]
    fn only_what_is_fixed_at_start_needs_a_restart() {
        let old = config("log_level = \"info\"\n[cache]\nmax_stale_ms = 1000\n");
        let new = config(
            "log_level = \"debug\"\nmax_clients = 5\nread_policy = \"any\"\npassword = \"x\"\n\
             [cache]\nmax_stale_ms = 2000\nmax_bytes = 10\n[breaker]\nconsecutive_failures = 2\n",
        );
        assert_eq!(
            restart_needed(&old, &new),
            ["cache.max_bytes", "max_clients", "password"]
        );
        assert!(restart_needed(&old, &old).is_empty());
    }
}

#[cfg(test)]
mod policy_tests {
    use crate::config::{Cli, Config, FileConfig};

    fn load(text: &str) -> Result<Config, String> {
        Config::merge(&Cli::default(), toml::from_str::<FileConfig>(text).unwrap())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn per_upstream_breakers_lay_their_keys_over_the_global_section() {
        let c = load(
            "[breaker]\nconsecutive_failures = 7\nwindow_ms = 20000\n\
             [[upstreams]]\naddr = \"h:1\"\nbreaker = { consecutive_failures = 2 }\n",
        )
        .unwrap();
        let b = c.upstreams[0].breaker_config(&c.breaker).unwrap();
        assert_eq!((b.consecutive_failures, b.window_ms), (2, 20000));
        let e = load("[[upstreams]]\naddr = \"h:1\"\nbreaker = { window_ms = 0 }\n").unwrap_err();
        assert!(
            e.contains("upstreams.breaker") && e.contains("window_ms"),
            "{e}"
        );
        let e = load("[[upstreams]]\naddr = \"h:1\"\nbreaker = { windw_ms = 5 }\n").unwrap_err();
        assert!(
            e.contains("upstreams.breaker") && e.contains("windw_ms"),
            "{e}"
        );
        let e = load(
            "[[upstreams]]\naddr = \"h:1\"\nfail_open = { rules = [{ commands = [\"NOPE\"], action = \"error\" }] }\n",
        )
        .unwrap_err();
        assert!(e.contains("upstreams.fail_open"), "{e}");
        let e = load("[[upstreams]]\naddr = \"h:1\"\ncommand_timeout_ms = 0\n").unwrap_err();
        assert!(e.contains("upstreams.command_timeout_ms"), "{e}");
    }
}
