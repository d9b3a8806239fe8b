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
//!  -> server::listener  accept, connection limit, drain
//!  -> server::session   read bytes; resp::request splits frames (zero-copy);
//!                       command::classify once: id, route, read/write, keys, cacheability
//!  -> server::route     from the connection's state (server::state) and the class:
//!                       local reply (server::local, server::login) | shared | pinned |
//!                       tunnel | degraded
//!  -> breaker           SharedBreaker::try_acquire -> CallGuard | rejected
//!                         rejected -> degrade::Degrade::reply: cache hit | typed miss |
//!                         fail-open rule (reply, error, queue -> writequeue)
//!  -> server::shared    writes invalidate their keys; cacheable reads plan a fill and join
//!                       a single-flight; the request carries a typed effect::ReplyEffect
//!  -> upstream::conn    (drill::inject may delay, fail or refuse it first, during a drill)
//!                       FIFO pipeline, batched writes, per-command timeout; on the reply
//!                       (or the failure) the breaker hears the outcome and degrade applies
//!                       the effect in pipeline order (fill, release followers, invalidate
//!                       again, learn expiries; a failed cacheable read is answered from
//!                       the cache right there)
//!  -> server::writer    replies in request order, many frames per write; client-side
//!                       latency per command
//! ```
//!
//! `writequeue` replays queued writes to the primary, as the identity that queued them, in
//! transactions that move a cursor key (exactly once), before newer client writes.
//! `upstream::probe` pings each upstream on its own connection (a frozen Redis opens the
//! breaker within interval + timeout). `auth` holds the identity model; `config` turns
//! flags, env and TOML into one validated `Config`; `metrics` owns the Prometheus registry;
//! `admin` serves the status page (`/`), `/config` (secrets redacted), `/metrics`,
//! `/healthz`, `/ready`, `/breakers` (forced states with the admin token), `/write-queue`
//! (with its dead letters), `/fleet` and `/faults`.
//!
//! Beside the request path: `fleet` shares breaker transitions with the other instances
//! through a coordination Redis (published from a queue the breaker never waits on) and
//! feeds their reports back to each breaker as advice; `drill` injects faults for game
//! days, checked with one atomic load per request when no drill is active.

pub(crate) mod admin;
pub(crate) mod auth;
pub(crate) mod breaker;
pub(crate) mod cache;
pub(crate) mod command;
pub mod config;
pub(crate) mod degrade;
pub mod drill;
pub(crate) mod effect;
pub(crate) mod error;
pub mod fleet;
pub(crate) mod metrics;
pub mod resp;
pub(crate) mod rules;
pub(crate) mod server;
pub(crate) mod upstream;
pub(crate) mod writequeue;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::auth::Identities;
use crate::breaker::{BreakerMetrics, SharedBreaker};
use crate::cache::{Cache, CacheMetrics, SingleFlight};
use crate::config::Config;
use crate::degrade::Degrade;
use crate::metrics::Metrics;
use crate::rules::{CachePolicy, FailOpen};
use crate::server::Server;
use crate::upstream::{Upstream, UpstreamSettings};
use crate::writequeue::{QueueError, WriteQueue};

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
    Journal(#[from] QueueError),
    #[error("cannot start the fleet sync (`fleet.redis`): {0}")]
    Fleet(#[from] fleet::FleetError),
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

/// What only the running machine can judge about a configuration (see
/// `server::listener::checks`): `errors` make `--check-config` and the start fail;
/// `warnings` are worth a line. An upstream that does not resolve is only a warning: a
/// configuration checked outside its cluster names hosts only the cluster's DNS knows,
/// and at start DNS may not be ready yet (the upstream is retried anyway). The journal's
/// place is checked with `strict` (`--check-config`); at start, opening it says the same.
pub fn preflight(config: &Config, strict: bool) -> Preflight {
    use server::listener::checks;
    let mut report = Preflight::default();
    match checks::check_threads(config.threads) {
        Ok(Some(w)) => report.warnings.push(w),
        Ok(None) => {}
        Err(e) => report.errors.push(e),
    }
    report.warnings.extend(checks::unresolved_upstreams(config));
    if strict && let Err(e) = config.write_queue.check_journal_path() {
        report.errors.push(e);
    }
    report
}

/// See [`preflight`].
#[derive(Debug, Default)]
pub struct Preflight {
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

/// Binds the client and admin listeners and starts serving. Upstreams are connected in the
/// background, so redfuse starts even when Redis is down.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let clients = bind("listen", &config.listen).await?;
    let admin = bind("admin_listen", &config.admin_listen).await?;
    if config.exposes_credentials() {
        tracing::warn!(
            listen = %config.listen,
            "clients that do not authenticate act as redfuse's upstream user on a non-loopback address (--allow-unauthenticated-clients)"
        );
    }
    let metrics = Arc::new(Metrics::new()?);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

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
    let cache_metrics = CacheMetrics::register(&metrics.registry)?;
    let mut limits = config.cache.limits();
    limits.written_ttl = policy.longest_max_stale();
    let cache = Cache::with_metrics(limits, cache_metrics.clone());
    let identities = Arc::new(Identities::new());
    let queue = Arc::new(WriteQueue::open(
        &config.write_queue,
        identities.clone(),
        &metrics.registry,
    )?);
    writequeue::Journal::spawn_sync_task(&queue.journal);
    let degrade = Arc::new(Degrade::new(
        cache,
        policy,
        fail_open,
        queue.clone(),
        identities,
        &metrics.registry,
    )?);

    let breaker_metrics = BreakerMetrics::register(&metrics.registry)?;
    let fleet_metrics = fleet::FleetMetrics::register(&metrics.registry)?;
    let fleet = match config.fleet.enabled() {
        true => Some(fleet::Fleet::start(
            config.fleet.clone(),
            fleet_metrics,
            shutdown_rx.clone(),
        )?),
        false => None,
    };
    let settings = UpstreamSettings {
        connections: config.upstream_connections,
        connect_timeout: config.connect_timeout,
        command_timeout: config.command_timeout,
        max_reply_depth: config.max_reply_depth,
        queue_depth: 4096,
        max_inflight: config.max_inflight_per_upstream,
    };
    let upstreams: Vec<Arc<Upstream>> = config
        .upstreams
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let breaker = SharedBreaker::new(
                &u.name,
                config.breaker.clone(),
                rand::random::<u64>() ^ i as u64,
                breaker_metrics.for_upstream(&u.name),
            );
            let mut stop = shutdown_rx.clone();
            breaker.spawn_timer(async move {
                let _ = stop.changed().await;
            });
            if let Some(f) = &fleet {
                f.register(&u.name, &breaker);
            }
            Arc::new(Upstream::new(
                u,
                settings.clone(),
                metrics.for_upstream(&u.name),
                breaker,
                degrade.clone(),
            ))
        })
        .collect();
    for u in &upstreams {
        u.warm_up(&config.credentials);
        if !config.health_probe_interval.is_zero() {
            tokio::spawn(upstream::probe::run(
                u.clone(),
                config.credentials.clone(),
                upstream::probe::ProbeTiming {
                    interval: config.health_probe_interval,
                    timeout: config.health_probe_timeout,
                },
                u.ctx.metrics.probe.clone(),
                shutdown_rx.clone(),
            ));
        }
    }
    let flights = SingleFlight::new(Some(cache_metrics.singleflight_shared.clone()));
    let server = Arc::new(Server::new(config, metrics, upstreams, degrade, flights));
    tokio::spawn(writequeue::replay::run(
        queue,
        server.primary().clone(),
        server.config.credentials.clone(),
        server.degrade.clone(),
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
    let drills = drill::DrillMetrics::register(&server.metrics.registry)?;
    let drills =
        server.config.drills.enabled.then(|| {
            drill::Drills::start(server.config.drills.clone(), drills, shutdown_rx.clone())
        });
    let ops = admin::Ops { fleet, drills };
    let admin = tokio::spawn(admin::serve(server, ops, admin, shutdown_rx));
    Ok(Running {
        client_addr,
        admin_addr,
        shutdown: shutdown_tx,
        clients,
        admin,
    })
}
