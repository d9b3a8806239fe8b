//! `[fleet]`: the coordination Redis, who this instance is, and how remote reports weigh.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::breaker::AdvicePolicy;
use crate::config::url;
use crate::config::{Credentials, REDACTED, UpstreamConfig};

/// The `[fleet]` section as written. Every field is optional; unknown fields are refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FleetConfig {
    /// Share breaker state with the other instances.
    pub enabled: bool,
    /// The coordination Redis: `host:port` or `redis://[user[:password]@]host[:port]`.
    /// Unset: the primary upstream, with redfuse's own credentials.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Names this instance in the hashes and messages; unset: the host name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    pub channel: String,
    pub key_prefix: String,
    /// The hashes expire this long after their last write, and older reports are ignored.
    pub state_ttl_ms: u64,
    /// How often every hash is read again, to catch up on missed messages.
    pub catch_up_interval_ms: u64,
    /// How long a remote "open" counts (quorum and suspicion).
    pub window_ms: u64,
    /// Other instances reporting open within `window_ms` that open a breaker outright.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quorum: Option<u32>,
    /// Connect and command timeout of the coordination connections.
    pub timeout_ms: u64,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            enabled: false,
            redis: None,
            username: None,
            password: None,
            instance_id: None,
            channel: "redfuse:fleet".into(),
            key_prefix: "redfuse:breaker".into(),
            state_ttl_ms: 300_000,
            catch_up_interval_ms: 2_000,
            window_ms: 10_000,
            quorum: None,
            timeout_ms: 1_000,
        }
    }
}

/// Where the coordination Redis is and how to log in to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coordination {
    /// `host:port`, as shown.
    pub addr: String,
    /// Without IPv6 brackets.
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    /// No `fleet.redis`: the primary upstream.
    pub is_primary: bool,
}

/// `[fleet]` validated and resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetSettings {
    /// As written, `instance_id` filled in.
    pub config: FleetConfig,
    pub instance_id: String,
    pub coordination: Coordination,
}

/// A bad `[fleet]` field and why.
pub type FieldError = (&'static str, String);

impl FleetSettings {
    /// The settings of a configuration without `[fleet]` (disabled).
    pub fn disabled() -> FleetSettings {
        FleetSettings::resolve(FleetConfig::default(), None, None).expect("the defaults are valid")
    }

    /// Checks every field and resolves the coordination Redis: `fleet.redis`, else the
    /// primary upstream with redfuse's own `credentials`.
    pub fn resolve(
        config: FleetConfig,
        primary: Option<&UpstreamConfig>,
        credentials: Option<&Credentials>,
    ) -> Result<FleetSettings, FieldError> {
        let bad = |field: &'static str, m: &str| Err((field, m.to_owned()));
        for (field, v) in [
            ("fleet.state_ttl_ms", config.state_ttl_ms),
            ("fleet.catch_up_interval_ms", config.catch_up_interval_ms),
            ("fleet.window_ms", config.window_ms),
            ("fleet.timeout_ms", config.timeout_ms),
        ] {
            if v == 0 {
                return bad(field, "must be greater than 0");
            }
            if v > 86_400_000 {
                return bad(field, "must be at most 86400000 (one day)");
            }
        }
        if config.quorum == Some(0) {
            return bad(
                "fleet.quorum",
                "must be at least 1 (leave it unset to never open on the fleet's word alone)",
            );
        }
        if config.channel.trim().is_empty() {
            return bad("fleet.channel", "must not be empty");
        }
        if config.key_prefix.trim().is_empty() {
            return bad("fleet.key_prefix", "must not be empty");
        }
        let instance_id = match &config.instance_id {
            Some(id) => id.clone(),
            None => host_name(),
        };
        // `@` starts the hash fields that are not instances (the fleet-wide action).
        if instance_id.is_empty()
            || instance_id.starts_with('@')
            || instance_id
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err((
                "fleet.instance_id",
                format!(
                    "`{instance_id}` cannot name an instance (no spaces, not empty, not starting with @)"
                ),
            ));
        }
        if config.password.is_none() && config.username.is_some() {
            return bad("fleet.username", "a username needs `fleet.password` too");
        }
        let coordination = match &config.redis {
            Some(addr) => {
                let p = url::parse(addr).map_err(|m| ("fleet.redis", m))?;
                if p.tls {
                    return bad(
                        "fleet.redis",
                        "TLS to the coordination Redis is not supported; give a plain redis:// address",
                    );
                }
                let (host, port) = split_host_port(&p.addr).ok_or_else(|| {
                    (
                        "fleet.redis",
                        format!("`{}` is not host:port", url::redact(addr)),
                    )
                })?;
                let password = match (&p.password, &config.password) {
                    (Some(a), Some(b)) if a != b => {
                        return bad(
                            "fleet.password",
                            "differs from the password in the `fleet.redis` URL: set it in one place",
                        );
                    }
                    (a, b) => a.clone().or_else(|| b.clone()),
                };
                Coordination {
                    addr: p.addr,
                    host,
                    port,
                    username: p.username.or_else(|| config.username.clone()),
                    password,
                    is_primary: false,
                }
            }
            None => {
                let primary = match primary {
                    Some(p) => p,
                    None if !config.enabled => {
                        // Disabled and nothing to resolve against: a placeholder never used.
                        &UpstreamConfig {
                            name: String::new(),
                            ..UpstreamConfig::new("127.0.0.1:6379")
                        }
                    }
                    None => return bad("fleet.redis", "no primary upstream to default to"),
                };
                if config.enabled && primary.tls {
                    return bad(
                        "fleet.redis",
                        "the primary upstream uses TLS, which the coordination connections do not \
                         support: set `fleet.redis` to a plain redis:// address",
                    );
                }
                let (host, port) = split_host_port(&primary.addr).ok_or_else(|| {
                    (
                        "fleet.redis",
                        format!("`{}` is not host:port", primary.addr),
                    )
                })?;
                Coordination {
                    addr: primary.addr.clone(),
                    host,
                    port,
                    username: credentials.and_then(|c| c.username.clone()),
                    password: credentials.map(|c| c.password.clone()),
                    is_primary: true,
                }
            }
        };
        let config = FleetConfig {
            instance_id: Some(instance_id.clone()),
            ..config
        };
        Ok(FleetSettings {
            config,
            instance_id,
            coordination,
        })
    }

    pub fn enabled(&self) -> bool {
        self.config.enabled
    }

    pub fn policy(&self) -> AdvicePolicy {
        AdvicePolicy {
            window: self.window(),
            quorum: self.config.quorum,
        }
    }

    pub fn window(&self) -> Duration {
        Duration::from_millis(self.config.window_ms)
    }

    pub fn state_ttl(&self) -> Duration {
        Duration::from_millis(self.config.state_ttl_ms)
    }

    pub fn catch_up_interval(&self) -> Duration {
        Duration::from_millis(self.config.catch_up_interval_ms)
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.timeout_ms)
    }

    /// The section as shown by `--check-config` and `GET /config`: secrets redacted.
    pub fn shown(&self) -> FleetConfig {
        FleetConfig {
            redis: self.config.redis.as_deref().map(url::redact),
            password: self.config.password.as_ref().map(|_| REDACTED.to_owned()),
            ..self.config.clone()
        }
    }
}

fn split_host_port(addr: &str) -> Option<(String, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    Some((host.to_owned(), port.parse().ok()?))
}

/// This machine's host name (a pod's name under Kubernetes), or `redfuse-<pid>`.
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its whole length, which is what is passed.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let name = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).trim().to_owned()
    } else {
        String::new()
    };
    if name.is_empty() {
        format!("redfuse-{}", std::process::id())
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn primary(addr: &str, tls: bool) -> UpstreamConfig {
        UpstreamConfig {
            name: "primary".into(),
            tls,
            ..UpstreamConfig::new(addr)
        }
    }

    fn enabled() -> FleetConfig {
        FleetConfig {
            enabled: true,
            ..FleetConfig::default()
        }
    }

    #[test]
    fn defaults_to_the_primary_with_redfuses_credentials_and_the_host_name() {
        let creds = Credentials {
            username: Some("app".into()),
            password: "pw".into(),
        };
        let s = FleetSettings::resolve(enabled(), Some(&primary("r:6379", false)), Some(&creds))
            .unwrap();
        assert!(s.coordination.is_primary);
        assert_eq!(
            (s.coordination.host.as_str(), s.coordination.port),
            ("r", 6379)
        );
        assert_eq!(s.coordination.password.as_deref(), Some("pw"));
        assert_eq!(s.coordination.username.as_deref(), Some("app"));
        assert!(!s.instance_id.is_empty());
        assert_eq!(
            s.config.instance_id.as_deref(),
            Some(s.instance_id.as_str())
        );
    }

    #[test]
    fn a_separate_coordination_redis_with_credentials_in_the_url() {
        let c = FleetConfig {
            redis: Some("redis://ops:s3cret@[::1]:7000".into()),
            instance_id: Some("pod-1".into()),
            ..enabled()
        };
        let s = FleetSettings::resolve(c, Some(&primary("r:6379", true)), None).unwrap();
        assert!(!s.coordination.is_primary);
        assert_eq!(s.coordination.host, "::1");
        assert_eq!(s.coordination.port, 7000);
        assert_eq!(s.coordination.username.as_deref(), Some("ops"));
        assert_eq!(s.coordination.password.as_deref(), Some("s3cret"));
        let shown = toml::to_string(&s.shown()).unwrap();
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("instance_id = \"pod-1\""), "{shown}");
    }

    #[test]
    fn bad_fields_are_named() {
        let err = |c: FleetConfig| {
            FleetSettings::resolve(c, Some(&primary("r:6379", false)), None)
                .unwrap_err()
                .0
        };
        assert_eq!(
            err(FleetConfig {
                quorum: Some(0),
                ..enabled()
            }),
            "fleet.quorum"
        );
        assert_eq!(
            err(FleetConfig {
                window_ms: 0,
                ..enabled()
            }),
            "fleet.window_ms"
        );
        assert_eq!(
            err(FleetConfig {
                catch_up_interval_ms: 0,
                ..enabled()
            }),
            "fleet.catch_up_interval_ms"
        );
        assert_eq!(
            err(FleetConfig {
                state_ttl_ms: 0,
                ..enabled()
            }),
            "fleet.state_ttl_ms"
        );
        assert_eq!(
            err(FleetConfig {
                channel: " ".into(),
                ..enabled()
            }),
            "fleet.channel"
        );
        assert_eq!(
            err(FleetConfig {
                instance_id: Some("@x".into()),
                ..enabled()
            }),
            "fleet.instance_id"
        );
        assert_eq!(
            err(FleetConfig {
                redis: Some("rediss://h:1".into()),
                ..enabled()
            }),
            "fleet.redis"
        );
        assert_eq!(
            err(FleetConfig {
                redis: Some("nope".into()),
                ..enabled()
            }),
            "fleet.redis"
        );
        assert_eq!(
            err(FleetConfig {
                redis: Some("redis://:a@h:1".into()),
                password: Some("b".into()),
                ..enabled()
            }),
            "fleet.password"
        );
        let tls_primary =
            FleetSettings::resolve(enabled(), Some(&primary("r:6379", true)), None).unwrap_err();
        assert_eq!(tls_primary.0, "fleet.redis");
        // Disabled, a TLS primary is no problem.
        FleetSettings::resolve(FleetConfig::default(), Some(&primary("r:6379", true)), None)
            .unwrap();
    }
}
