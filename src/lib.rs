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
//!                         rejected -> Server::unavailable_reply (the one degraded-mode hook)
//!  -> upstream::conn    FIFO pipeline, batched writes, per-command timeout,
//!                       protocol::ReplyScanner finds reply ends; guard records the outcome
//!  -> server::writer    replies in request order, many frames per write
//! ```
//!
//! `config` turns flags, env and TOML into one validated `Config`; `metrics` owns the
//! Prometheus registry; `admin` serves `/metrics`, `/healthz`, `/ready` and `/breakers`.

pub mod admin;
pub mod breaker;
pub mod command;
pub mod config;
pub mod error;
pub mod metrics;
pub mod protocol;
pub mod server;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::breaker::{BreakerMetrics, SharedBreaker};
use crate::config::Config;
use crate::metrics::Metrics;
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
    let server = Arc::new(Server::new(config, metrics, upstreams));
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
