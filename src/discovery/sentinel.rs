//! Redis Sentinel: the upstreams are the master and the replicas that the Sentinels report
//! for one master name, kept current by their announcements.
//!
//! # Design
//!
//! Control-plane queries (`SENTINEL GET-MASTER-ADDR-BY-NAME`, `SENTINEL REPLICAS`) go
//! through a `deadpool-redis` pool per Sentinel, tried in turn until one answers; the
//! announcements come from a `redis` pub/sub subscription on one Sentinel at a time
//! (`+switch-master`, `+sdown`, `-sdown`, `+odown`), moved to the next one when it drops.
//! The client data path never uses these: it keeps its own pipelined connections.
//!
//! Upstreams are named by address, so a replica promoted by a failover is the same
//! upstream with a new role: it keeps its warm connections and its own (healthy) breaker,
//! and writes move to it the moment the new set is published; the old master, which
//! Sentinel then lists as a down replica, leaves the set and is drained. On
//! `+switch-master` the new master is applied at once, before anything is asked again;
//! `+sdown`/`-sdown` and a periodic refresh (`sentinel.refresh_ms`) keep the replicas
//! current. Replicas Sentinel flags down or disconnected take no reads.
//!
//! `redfuse_failover_total` counts the master switches redfuse applied, and
//! `redfuse_failover_seconds` measures each from the first sign of the master's loss that
//! redfuse saw (`+sdown`/`+odown` of the master, or the switch itself when it saw none) to
//! the new master being connected and taking writes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use prometheus::{Histogram, HistogramOpts, IntCounter, Registry};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::Discovery;
use crate::config::{Role, SentinelSection, UpstreamConfig};

/// What the Sentinels report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// `host:port`.
    pub master: String,
    /// `host:port` of the replicas that are up.
    pub replicas: Vec<String>,
}

impl Topology {
    /// The upstream list: the master, then the replicas, named by address.
    pub fn upstreams(&self) -> Vec<UpstreamConfig> {
        let mut list = vec![UpstreamConfig::new(&self.master)];
        for (i, r) in self.replicas.iter().enumerate() {
            if *r == self.master {
                continue;
            }
            let mut u = UpstreamConfig::new(r);
            u.role = Role::Replica;
            u.priority = i as u32;
            list.push(u);
        }
        list
    }
}

/// Why the Sentinels could not say.
#[derive(Debug, thiserror::Error)]
pub enum SentinelError {
    #[error("no Sentinel answered for master `{master}`: {last}")]
    Unreachable { master: String, last: String },
    #[error("the Sentinels do not know master `{0}`")]
    UnknownMaster(String),
    #[error("cannot set up the Sentinel connections: {0}")]
    Setup(String),
}

struct Metrics {
    failovers: IntCounter,
    seconds: Histogram,
}

pub struct Sentinel {
    config: SentinelSection,
    pools: Vec<deadpool_redis::Pool>,
    /// Set once the set exists ([`Sentinel::attach`]): the first query chooses it.
    discovery: std::sync::OnceLock<Arc<Discovery>>,
    metrics: Metrics,
    /// What was last applied.
    applied: Mutex<Option<Topology>>,
    /// When the master's loss was first announced, until the switch is applied.
    lost_at: Mutex<Option<Instant>>,
    timeout: Duration,
}

/// `redis://` URL of one Sentinel, with the Sentinels' credentials.
fn sentinel_url(config: &SentinelSection, addr: &str) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    match (&config.username, &config.password) {
        (Some(u), Some(p)) => format!("redis://{}:{}@{addr}/", enc(u), enc(p)),
        (None, Some(p)) => format!("redis://:{}@{addr}/", enc(p)),
        _ => format!("redis://{addr}/"),
    }
}

impl Sentinel {
    pub fn new(
        config: SentinelSection,
        registry: &Registry,
        timeout: Duration,
    ) -> Result<Arc<Sentinel>, SentinelError> {
        let pools = config
            .addrs
            .iter()
            .map(|a| {
                let mut c = deadpool_redis::Config::from_url(sentinel_url(&config, a));
                c.pool = Some(deadpool_redis::PoolConfig::new(2));
                c.create_pool(Some(deadpool_redis::Runtime::Tokio1))
                    .map_err(|e| SentinelError::Setup(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let failovers = IntCounter::new(
            "redfuse_failover_total",
            "Master switches announced by Sentinel that redfuse applied",
        )
        .map_err(|e| SentinelError::Setup(e.to_string()))?;
        let seconds = Histogram::with_opts(
            HistogramOpts::new(
                "redfuse_failover_seconds",
                "From the first sign of the master's loss redfuse saw to the new master taking writes",
            )
            .buckets(vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0]),
        )
        .map_err(|e| SentinelError::Setup(e.to_string()))?;
        for m in [
            Box::new(failovers.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(seconds.clone()),
        ] {
            registry
                .register(m)
                .map_err(|e| SentinelError::Setup(e.to_string()))?;
        }
        Ok(Arc::new(Sentinel {
            config,
            pools,
            discovery: std::sync::OnceLock::new(),
            metrics: Metrics { failovers, seconds },
            applied: Mutex::new(None),
            lost_at: Mutex::new(None),
            timeout,
        }))
    }

    /// Hands the topology of the first query (used to build the set) and the set's
    /// discovery to this Sentinel follower.
    pub async fn attach(&self, discovery: Arc<Discovery>, first: Option<Topology>) {
        let _ = self.discovery.set(discovery.clone());
        if let Some(t) = first
            && discovery.set_sentinel(t.upstreams()).await.is_ok()
        {
            *self.applied.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
        }
    }

    /// Asks the Sentinels, in turn, for the master and its replicas.
    pub async fn query(&self) -> Result<Topology, SentinelError> {
        let name = &self.config.master_name;
        let mut last = String::from("no Sentinel configured");
        for (pool, addr) in self.pools.iter().zip(&self.config.addrs) {
            let asked = tokio::time::timeout(self.timeout, async {
                let mut con = pool.get().await.map_err(|e| e.to_string())?;
                let master: Option<(String, String)> = redis::cmd("SENTINEL")
                    .arg("GET-MASTER-ADDR-BY-NAME")
                    .arg(name)
                    .query_async(&mut con)
                    .await
                    .map_err(|e| e.to_string())?;
                let replicas: Vec<HashMap<String, String>> = redis::cmd("SENTINEL")
                    .arg("REPLICAS")
                    .arg(name)
                    .query_async(&mut con)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>((master, replicas))
            })
            .await
            .unwrap_or_else(|_| Err("timed out".into()));
            match asked {
                Ok((Some((host, port)), replicas)) => {
                    return Ok(Topology {
                        master: join(&host, &port),
                        replicas: replicas_up(&replicas),
                    });
                }
                Ok((None, _)) => return Err(SentinelError::UnknownMaster(name.clone())),
                Err(e) => {
                    debug!(sentinel = %addr, "Sentinel query failed: {e}");
                    last = format!("{addr}: {e}");
                }
            }
        }
        Err(SentinelError::Unreachable {
            master: name.clone(),
            last,
        })
    }

    /// Applies `topology` when it differs from what was applied last.
    async fn apply(&self, topology: Topology) {
        let previous = self
            .applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if previous.as_ref() == Some(&topology) {
            return;
        }
        let Some(discovery) = self.discovery.get() else {
            return;
        };
        match discovery.set_sentinel(topology.upstreams()).await {
            Ok(changes) => {
                if previous
                    .as_ref()
                    .is_some_and(|p| p.master != topology.master)
                {
                    let lost = self
                        .lost_at
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .take();
                    let took = lost.map_or(Duration::ZERO, |t| t.elapsed());
                    self.metrics.failovers.inc();
                    self.metrics.seconds.observe(took.as_secs_f64());
                    info!(
                        master = %topology.master,
                        old_master = %previous.as_ref().map(|p| p.master.as_str()).unwrap_or(""),
                        took_ms = took.as_millis() as u64,
                        "Sentinel failover applied: writes go to the new master"
                    );
                }
                if !changes.is_empty() {
                    info!(master = %topology.master, replicas = ?topology.replicas, ?changes, "Sentinel topology applied");
                }
                *self.applied.lock().unwrap_or_else(|e| e.into_inner()) = Some(topology);
            }
            Err(e) => warn!("Sentinel topology not applied: {e}"),
        }
    }

    /// Asks again and applies what changed.
    async fn refresh(&self) {
        match self.query().await {
            Ok(t) => self.apply(t).await,
            Err(e) => warn!("{e}; keeping the current upstreams"),
        }
    }

    /// A `+switch-master` for our master: the new master is applied at once, with the
    /// replicas known so far (less the new master), then the replicas are asked again.
    async fn switched(&self, new_master: String) {
        let replicas = self
            .applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|t| {
                t.replicas
                    .iter()
                    .filter(|r| **r != new_master && **r != t.master)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        self.apply(Topology {
            master: new_master,
            replicas,
        })
        .await;
        self.refresh().await;
    }

    /// Follows the Sentinels' announcements until shutdown.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let refresh = Duration::from_millis(self.config.refresh_ms);
        let mut next = 0usize;
        loop {
            let addr = self.config.addrs[next % self.config.addrs.len()].clone();
            next += 1;
            let subscribed = async {
                let client = redis::Client::open(sentinel_url(&self.config, &addr))
                    .map_err(|e| e.to_string())?;
                let mut pubsub = client.get_async_pubsub().await.map_err(|e| e.to_string())?;
                for channel in ["+switch-master", "+sdown", "-sdown", "+odown"] {
                    pubsub.subscribe(channel).await.map_err(|e| e.to_string())?;
                }
                Ok::<_, String>(pubsub)
            };
            let pubsub = match tokio::time::timeout(self.timeout, subscribed).await {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => {
                    warn!(sentinel = %addr, "cannot subscribe to Sentinel announcements: {e}");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                        _ = shutdown.changed() => return,
                    }
                }
                Err(_) => {
                    warn!(sentinel = %addr, "subscribing to Sentinel announcements timed out");
                    continue;
                }
            };
            info!(sentinel = %addr, master = %self.config.master_name, "following Sentinel announcements");
            // What happened while nobody listened.
            self.refresh().await;
            let mut messages = pubsub.into_on_message();
            loop {
                tokio::select! {
                    msg = messages.next() => {
                        let Some(msg) = msg else {
                            warn!(sentinel = %addr, "Sentinel subscription lost; moving to the next Sentinel");
                            break;
                        };
                        let channel = msg.get_channel_name().to_owned();
                        let payload: String = msg.get_payload().unwrap_or_default();
                        self.announced(&channel, &payload).await;
                    }
                    _ = tokio::time::sleep(refresh) => self.refresh().await,
                    _ = shutdown.changed() => return,
                }
            }
        }
    }

    async fn announced(&self, channel: &str, payload: &str) {
        let words: Vec<&str> = payload.split_whitespace().collect();
        let name = &self.config.master_name;
        match channel {
            // `<name> <old ip> <old port> <new ip> <new port>`
            "+switch-master" if words.first() == Some(&name.as_str()) && words.len() >= 5 => {
                info!(payload, "Sentinel announced a new master");
                self.switched(join(words[3], words[4])).await;
            }
            // `master <name> <ip> <port>`: the first sign of the master's loss.
            "+sdown" | "+odown"
                if words.first() == Some(&"master") && words.get(1) == Some(&name.as_str()) =>
            {
                info!(channel, payload, "Sentinel reports the master down");
                self.lost_at
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert_with(Instant::now);
            }
            // `slave <ip:port> <ip> <port> @ <name> <master ip> <master port>`
            "+sdown" | "-sdown" if words.contains(&name.as_str()) => {
                debug!(channel, payload, "Sentinel reports a replica's state");
                self.refresh().await;
            }
            _ => {}
        }
    }
}

fn join(host: &str, port: &str) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The replicas Sentinel does not flag down or disconnected, in its order.
fn replicas_up(replicas: &[HashMap<String, String>]) -> Vec<String> {
    replicas
        .iter()
        .filter(|r| {
            let flags = r.get("flags").map(String::as_str).unwrap_or("");
            !flags
                .split(',')
                .any(|f| matches!(f, "s_down" | "o_down" | "disconnected"))
        })
        .filter_map(|r| Some(join(r.get("ip")?, r.get("port")?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_flagged_down_take_no_reads() {
        let r = |ip: &str, flags: &str| {
            HashMap::from([
                ("ip".to_owned(), ip.to_owned()),
                ("port".to_owned(), "6379".to_owned()),
                ("flags".to_owned(), flags.to_owned()),
            ])
        };
        let up = replicas_up(&[
            r("10.0.0.2", "slave"),
            r("10.0.0.3", "s_down,slave"),
            r("10.0.0.4", "slave,disconnected"),
            r("::1", "slave"),
        ]);
        assert_eq!(up, ["10.0.0.2:6379", "[::1]:6379"]);
        let t = Topology {
            master: "10.0.0.1:6379".into(),
            replicas: up,
        };
        let list = t.upstreams();
        assert_eq!(list[0].role, Role::Primary);
        assert_eq!(list[1].name, "10.0.0.2:6379");
        assert_eq!(list[2].role, Role::Replica);
        crate::upstream::set::validate(&list).unwrap();
    }

    #[test]
    fn sentinel_urls_carry_the_sentinels_credentials() {
        let mut c = SentinelSection {
            addrs: vec!["h:26379".into()],
            master_name: "m".into(),
            ..SentinelSection::default()
        };
        assert_eq!(sentinel_url(&c, "h:26379"), "redis://h:26379/");
        c.password = Some("p@ss".into());
        assert_eq!(sentinel_url(&c, "h:26379"), "redis://:p%40ss@h:26379/");
        c.username = Some("u".into());
        assert_eq!(sentinel_url(&c, "h:26379"), "redis://u:p%40ss@h:26379/");
    }

    #[test]
    fn the_url_form_is_taken_apart() {
        let s = SentinelSection {
            url: Some("sentinel://u:pw%21@a:26379,b:26380/mymaster".into()),
            ..SentinelSection::default()
        }
        .resolved()
        .unwrap();
        assert_eq!(s.addrs, ["a:26379", "b:26380"]);
        assert_eq!(s.master_name, "mymaster");
        assert_eq!(
            (s.username.as_deref(), s.password.as_deref()),
            (Some("u"), Some("pw!"))
        );
        let bad = |url: &str| {
            SentinelSection {
                url: Some(url.into()),
                ..SentinelSection::default()
            }
            .resolved()
            .unwrap_err()
        };
        assert!(bad("redis://a:1/m").contains("sentinel://"));
        assert!(bad("sentinel://a:1/").contains("master_name"));
        assert!(bad("sentinel://a/m").contains("host:port"));
    }
}
