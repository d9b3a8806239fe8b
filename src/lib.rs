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
//!                       command::classify once: id, route, read/write, keys, cacheability;
//!                       stops reading while the client has ~8 MiB of replies still to
//!                       come from Redis (its share of a shared connection)
//!  -> server::route     from the connection's state (server::state) and the class:
//!                       local reply (server::local, server::login) | shared | pinned |
//!                       tunnel | degraded
//!  -> breaker           SharedBreaker::try_acquire -> CallGuard | rejected
//!                         rejected -> degrade::Degrade::reply_by: cache hit | typed miss |
//!                         fail-open rule (reply, error, queue -> writequeue)
//!  -> server::shared    writes invalidate their keys; cacheable reads plan a fill and join
//!                       a single-flight; the request carries a typed effect::ReplyEffect
//!  -> server::outbox    the calls and reply slots of one client read go on as one message
//!                       each (sent before the session waits on anything else)
//!  -> upstream::conn    (drill::inject may delay, fail or refuse it first, during a drill)
//!                       a queue bounded in calls; FIFO pipeline with a bounded number of
//!                       unanswered calls, batched writes, per-command timeout; on the reply
//!                       (or the failure) the breaker hears the outcome and degrade applies
//!                       the effect in pipeline order (invalidate again, learn expiries; a
//!                       failed cacheable read is answered from the cache right there);
//!                       a fill of the reply the cache stored under the same key a
//!                       moment ago is skipped (cache::refreshed), and a full cache takes
//!                       in a key it does not hold only if it is read more often than the
//!                       entry it would push out (cache::admission, cache::frequency);
//!                       what completing a reply touches is prefetched a few replies
//!                       ahead;
//!                       the fills and breaker outcomes of the replies read together are
//!                       applied together (one cache lock, one breaker lock), fills before
//!                       any later effect, and release the reads that followed them
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
//!
//! The set of upstreams changes at run time through one reconciliation API
//! (`upstream::set::Manager::apply`): sessions route by an immutable snapshot and pick up a
//! new one with an atomic check per request. `reload` (SIGHUP, a change of the file) goes
//! through it for the upstream list and swaps fail-open rules, the cache policy, breaker
//! thresholds and the log level in place. `discovery` composes the configuration's list
//! with a watched file, DNS re-resolution and Redis Sentinel, and hands the result to the
//! same reconciliation.

pub(crate) mod admin;
pub(crate) mod auth;
pub(crate) mod breaker;
pub(crate) mod burst;
pub(crate) mod cache;
pub(crate) mod command;
pub mod config;
pub(crate) mod degrade;
pub(crate) mod discovery;
pub mod drill;
pub(crate) mod effect;
pub(crate) mod error;
pub mod fleet;
pub(crate) mod metrics;
pub mod reload;
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
use crate::breaker::BreakerMetrics;
use crate::cache::{Cache, CacheMetrics, SingleFlight};
use crate::config::{Config, UpstreamConfig};
use crate::degrade::Degrade;
use crate::discovery::Discovery;
use crate::discovery::sentinel::Sentinel;
use crate::metrics::Metrics;
use crate::rules::{CachePolicy, FailOpen};
use crate::server::Server;
use crate::upstream::UpstreamSettings;
use crate::upstream::probe::ProbeTiming;
pub use crate::upstream::set::{Applied, SetError};
use crate::upstream::set::{Factory, Manager};
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
    server: Arc<Server>,
    shutdown: watch::Sender<bool>,
    clients: JoinHandle<()>,
    admin: JoinHandle<()>,
}

impl Running {
    /// Reconciles the set of upstreams with `list` (see `upstream::set`): an upstream
    /// whose address changed gets new connections while in-flight commands finish on the
    /// old ones, removed upstreams are drained, added ones are probed before they serve.
    pub async fn apply_upstreams(&self, list: &[UpstreamConfig]) -> Result<Applied, SetError> {
        self.server.apply_upstreams(list).await
    }

    /// Reloads the configuration on SIGHUP and when the file changes (see [`reload`]),
    /// loading it again from `source`; `log_level` sets the log filter, when the caller
    /// owns one.
    pub fn watch_config(
        &self,
        source: reload::Source,
        log_level: Option<reload::LogLevelSetter>,
    ) -> Result<Arc<reload::Reloader>, StartError> {
        let reloader = reload::Reloader::new(self.server.clone(), source, log_level)?;
        reloader.spawn(self.shutdown.subscribe());
        Ok(reloader)
    }

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
    // The watched file or Sentinel, when there is one, gives the list from the start: the
    // configuration's (maybe only the default) is never connected to.
    let sentinel = match config.sentinel_enabled {
        true => Some(
            Sentinel::new(
                config.sentinel.clone(),
                &metrics.registry,
                config.connect_timeout * 2,
            )
            .map_err(|e| StartError::Config {
                field: "sentinel",
                message: e.to_string(),
            })?,
        ),
        false => None,
    };
    let mut first_topology = None;
    if let Some(s) = &sentinel {
        match s.query().await {
            Ok(t) => first_topology = Some(t),
            // Redfuse starts anyway, on the configured list, and follows Sentinel once it answers.
            Err(e) => tracing::warn!("{e}; starting with the configured upstreams"),
        }
    }
    let initial = match (&first_topology, &config.discovery.file) {
        (Some(t), _) => t.upstreams(),
        (None, Some(path)) => discovery::file::load(path).map_err(|e| StartError::Config {
            field: "discovery.file",
            message: e.to_string(),
        })?,
        (None, None) => config.upstreams.clone(),
    };
    let manager = Manager::start(
        Factory {
            settings,
            metrics: metrics.clone(),
            breaker_metrics,
            sink: degrade.clone(),
            credentials: config.credentials.clone(),
            probe: ProbeTiming {
                interval: config.health_probe_interval,
                timeout: config.health_probe_timeout,
            },
            breaker: config.breaker.clone(),
            drain_timeout: config.drain_timeout,
            shutdown: shutdown_rx.clone(),
            fleet: fleet.clone(),
        },
        &initial,
    );
    let discovery = Discovery::new(manager.clone(), config.upstreams.clone());
    start_discovery(&config, &discovery, &manager, &shutdown_rx).await?;
    if let Some(s) = sentinel {
        s.attach(discovery.clone(), first_topology).await;
        tokio::spawn(s.run(shutdown_rx.clone()));
    }
    let flights = SingleFlight::new(Some(cache_metrics.singleflight_shared.clone()));
    let server = Arc::new(Server::new(config, metrics, discovery, degrade, flights));
    tokio::spawn(replay_to_primary(
        queue,
        server.clone(),
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
    let admin = tokio::spawn(admin::serve(server.clone(), ops, admin, shutdown_rx));
    Ok(Running {
        client_addr,
        admin_addr,
        server,
        shutdown: shutdown_tx,
        clients,
        admin,
    })
}

/// Starts the discovery sources the configuration asks for. The watched file is read once
/// here: a file that is invalid at start is a configuration error.
async fn start_discovery(
    config: &Config,
    discovery: &Arc<Discovery>,
    manager: &Arc<Manager>,
    shutdown: &watch::Receiver<bool>,
) -> Result<(), StartError> {
    if let Some(path) = &config.discovery.file {
        let seen = std::fs::read(path).ok();
        let list = discovery::file::load(path).map_err(|e| StartError::Config {
            field: "discovery.file",
            message: e.to_string(),
        })?;
        discovery
            .set_file(list)
            .await
            .map_err(|e| StartError::Config {
                field: "discovery.file",
                message: e.to_string(),
            })?;
        tokio::spawn(discovery::file::run(
            discovery.clone(),
            path.clone(),
            seen,
            shutdown.clone(),
        ));
    }
    if config.discovery.dns_interval_ms > 0 {
        tokio::spawn(discovery::dns::run(
            discovery.clone(),
            manager.upstreams().clone(),
            discovery::dns::system_resolver(),
            std::time::Duration::from_millis(config.discovery.dns_interval_ms),
            shutdown.clone(),
        ));
    }
    Ok(())
}

/// Runs the write-queue replay against the current primary. When the primary changes (a
/// reload, Sentinel), the replay to the old one is stopped between two passes and awaited
/// before one to the new primary starts: two replays at once could send an entry twice.
async fn replay_to_primary(
    queue: Arc<WriteQueue>,
    server: Arc<Server>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut changed = server.upstreams.subscribe();
    loop {
        let primary = server.primary();
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut task = tokio::spawn(writequeue::replay::run(
            queue.clone(),
            primary.clone(),
            server.config.credentials.clone(),
            server.degrade.clone(),
            stop_rx,
        ));
        loop {
            tokio::select! {
                _ = &mut task => return,
                r = shutdown.changed() => {
                    if r.is_err() || *shutdown.borrow() {
                        let _ = stop_tx.send(true);
                        let _ = task.await;
                        return;
                    }
                }
                r = changed.changed() => {
                    if r.is_err() {
                        let _ = stop_tx.send(true);
                        let _ = task.await;
                        return;
                    }
                    if server.primary().ctx.id != primary.ctx.id {
                        break;
                    }
                }
            }
        }
        let _ = stop_tx.send(true);
        let _ = task.await;
    }
}
