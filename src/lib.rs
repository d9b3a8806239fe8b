//! redfuse: a RESP proxy that sits beside an application and keeps answering when Redis
//! cannot.
//!
//! While Redis is healthy redfuse forwards every command on a few long-lived pipelined
//! connections and hands back Redis's reply bytes untouched. When an upstream fails, its
//! circuit breaker opens and requests are answered at once instead of waiting on timeouts;
//! the breaker probes and heals by itself.
//!
//! # Layout
//!
//! ```text
//! client socket
//!  -> server::session   read bytes; protocol::parse_request splits frames (zero-copy)
//!  -> command::lookup   classify by the name's bytes: local / shared / pinned / blocking / pipe
//!  -> route             local reply | dedicated connection | shared pipelined connection
//!  -> breaker           SharedBreaker::try_acquire -> CallGuard | rejected
//!                         rejected -> Server::unavailable_reply -> degrade::Degrade::reply:
//!                         cache hit | miss reply | fail-open rule (reply, error, queue->journal)
//!  -> cache plan        writes invalidate their keys; cacheable reads plan a fill
//!                       (degrade::plan_fill) and join a single-flight
//!  -> upstream::conn    FIFO pipeline, batched writes, per-command timeout,
//!                       protocol::ReplyScanner finds reply ends; on the reply: the guard records
//!                       the outcome, Call::on_reply fills the cache / releases followers /
//!                       invalidates a write's keys again
//!  -> server::writer    replies in request order, many frames per write; a cacheable read the
//!                       upstream failed is answered in degraded mode
//! ```
//!
//! `replay` drains the write journal to the primary when its breaker closes, before newer
//! client writes.
//!
//! `config` turns flags, env and TOML into one validated `Config`; `metrics` owns the
//! Prometheus registry; `admin` serves `/metrics`, `/healthz`, `/ready` and `/breakers`.

pub mod admin;
pub mod breaker;
pub mod cache;
pub mod command;
pub mod config;
pub mod degrade;
pub mod error;
pub mod journal;
pub mod metrics;
pub mod protocol;
pub mod replay;
pub mod rules;
pub mod server;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::breaker::{BreakerMetrics, SharedBreaker};
use crate::cache::{Cache, CacheMetrics, SingleFlight};
use crate::config::Config;
use crate::degrade::Degrade;
use crate::journal::{Journal, WriteQueueMetrics};
use crate::metrics::Metrics;
use crate::rules::{CachePolicy, FailOpen};
use crate::server::Server;
use crate::upstream::{Upstream, UpstreamSettings};

/// Why redfuse could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} (`{field}`): {source}")]
    Bind {
        field: &'static str,
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("cannot open the write queue journal (`write_queue.journal_path`): {0}")]
    Journal(#[from] journal::JournalError),
    #[error("invalid `{field}`: {message}")]
    Config {
        field: &'static str,
        message: String,
    },
}

/// A started redfuse: its bound addresses and a way to stop it.
pub struct Running {
    pub client_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub server: Arc<Server>,
    shutdown: watch::Sender<bool>,
    clients: JoinHandle<()>,
    admin: JoinHandle<()>,
}

impl Running {
    /// Stops accepting, drains in-flight replies within the configured deadline, and returns.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.clients.await;
        let _ = self.admin.await;
    }
}

async fn bind(field: &'static str, addr: &str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind {
            field,
            addr: addr.to_owned(),
            source,
        })
}

/// Binds the client and admin listeners and starts serving. Upstreams are connected in the
/// background, so redfuse starts even when Redis is down.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let clients = bind("listen", &config.listen).await?;
    let admin = bind("admin_listen", &config.admin_listen).await?;
    let metrics = Arc::new(Metrics::new()?);
    let breaker_metrics = BreakerMetrics::register(&metrics.registry)?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let settings = UpstreamSettings {
        connections: config.upstream_connections,
        connect_timeout: config.connect_timeout,
        command_timeout: config.command_timeout,
        max_nesting_depth: config.limits.max_nesting_depth,
        queue_depth: 4096,
        max_inflight: config.max_inflight_per_upstream,
    };
    let upstreams: Vec<Arc<Upstream>> = config
        .upstreams
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let name = if u.name.is_empty() {
                u.addr.as_str()
            } else {
                u.name.as_str()
            };
            let breaker = SharedBreaker::new(
                name,
                config.breaker.clone(),
                rand::random::<u64>() ^ i as u64,
                breaker_metrics.for_upstream(name),
            );
            let mut stop = shutdown_rx.clone();
            breaker.spawn_timer(async move {
                let _ = stop.changed().await;
            });
            Arc::new(Upstream::new(
                u,
                settings.clone(),
                metrics.for_upstream(name),
                breaker,
            ))
        })
        .collect();
    for u in &upstreams {
        u.warm_up(&config.credentials);
        if !config.health_probe_interval.is_zero() {
            tokio::spawn(upstream::probe::run(
                u.clone(),
                config.credentials.clone(),
                config.health_probe_interval,
                u.ctx.metrics.probe.clone(),
                shutdown_rx.clone(),
            ));
        }
    }
    let cache_metrics = CacheMetrics::register(&metrics.registry)?;
    let cache = Cache::with_metrics(config.cache.limits(), cache_metrics.clone());
    let policy =
        CachePolicy::compile(&config.cache.policy()).map_err(|message| StartError::Config {
            field: "cache",
            message,
        })?;
    let fail_open = FailOpen::compile_checked(&config.fail_open, |n| {
        command::lookup(n.as_bytes()).is_some()
    })
    .map_err(|message| StartError::Config {
        field: "fail_open",
        message,
    })?;
    let queue_metrics = WriteQueueMetrics::register(&metrics.registry)?;
    let journal = Arc::new(Journal::open(&config.write_queue)?.with_metrics(queue_metrics.clone()));
    Journal::spawn_sync_task(&journal);
    let degrade = Degrade::new(cache, policy, fail_open, journal, &metrics.registry)?;
    let flights = SingleFlight::new(Some(cache_metrics.singleflight_shared.clone()));
    let server = Arc::new(Server::new(config, metrics, upstreams, degrade, flights));
    tokio::spawn(replay::run(
        server.clone(),
        Some(queue_metrics),
        shutdown_rx.clone(),
    ));
    let client_addr = clients.local_addr().map_err(|source| StartError::Bind {
        field: "listen",
        addr: server.config.listen.clone(),
        source,
    })?;
    let admin_addr = admin.local_addr().map_err(|source| StartError::Bind {
        field: "admin_listen",
        addr: server.config.admin_listen.clone(),
        source,
    })?;
    let clients = tokio::spawn(server::serve(server.clone(), clients, shutdown_rx.clone()));
    let admin = tokio::spawn(admin::serve(server.clone(), admin, shutdown_rx));
    Ok(Running {
        client_addr,
        admin_addr,
        server,
        shutdown: shutdown_tx,
        clients,
        admin,
    })
}
