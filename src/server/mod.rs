//! The client listener and what every session shares.
//!
//! The accept loop enforces the connection limit with a semaphore (a refused client gets
//! Redis's own `max number of clients reached` error), runs each client in its own task and
//! tracing span, and on shutdown stops accepting, tells sessions to stop reading, and waits
//! for their in-flight replies up to the drain deadline.

pub mod session;
pub mod writer;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{Instrument, info, info_span, warn};

use crate::cache::SingleFlight;
use crate::command::CommandSpec;
use crate::config::{Balance, Config, Credentials, ReadPolicy};
use crate::degrade::{ClientView, Degrade, Origin};
use crate::error::UpstreamError;
use crate::metrics::Metrics;
use crate::protocol::Request;
use crate::upstream::{Reply, Upstream};

/// Upstream indexes in the order to try them.
pub type RouteOrder = Vec<usize>;

/// How long credentials checked against the upstream are trusted without asking again.
const VERIFIED_CREDENTIALS_TTL: Duration = Duration::from_secs(60);

/// State shared by all sessions.
pub struct Server {
    pub config: Config,
    pub metrics: Arc<Metrics>,
    /// Every upstream; `primary` indexes the primary.
    pub upstreams: Vec<Arc<Upstream>>,
    primary: usize,
    pub degrade: Degrade,
    /// Identical cacheable reads in flight share one upstream request.
    pub flights: SingleFlight<writer::FlightKey, Reply>,
    /// Notified when a journal replay pass ends.
    pub replay_done: tokio::sync::Notify,
    /// The last replay pass failed; cleared by the next one that succeeds.
    pub replay_stalled: std::sync::atomic::AtomicBool,
    next_client_id: AtomicU64,
    round_robin: AtomicU64,
    verified: Mutex<HashMap<Credentials, Instant>>,
}

impl Server {
    pub fn new(
        config: Config,
        metrics: Arc<Metrics>,
        upstreams: Vec<Arc<Upstream>>,
        degrade: Degrade,
        flights: SingleFlight<writer::FlightKey, Reply>,
    ) -> Server {
        let primary = upstreams
            .iter()
            .position(|u| u.ctx.role == crate::config::Role::Primary)
            .unwrap_or(0);
        Server {
            config,
            metrics,
            upstreams,
            primary,
            degrade,
            flights,
            replay_done: tokio::sync::Notify::new(),
            replay_stalled: std::sync::atomic::AtomicBool::new(false),
            next_client_id: AtomicU64::new(1),
            round_robin: AtomicU64::new(0),
            verified: Mutex::new(HashMap::new()),
        }
    }

    pub fn primary(&self) -> &Arc<Upstream> {
        &self.upstreams[self.primary]
    }

    pub fn primary_index(&self) -> usize {
        self.primary
    }

    /// The upstreams to try for a command, best first (indexes into `upstreams`). Writes go
    /// to the primary alone. Reads follow `read_policy` and `balance` among upstreams whose
    /// breaker is not open, and fail over to replicas in priority order when the primary's
    /// breaker rejects them.
    pub fn route(&self, is_read: bool) -> RouteOrder {
        let mut order = RouteOrder::new();
        if !is_read || self.upstreams.len() == 1 {
            order.push(self.primary);
            return order;
        }
        let healthy = |i: &usize| self.upstreams[*i].breaker.state() != crate::breaker::State::Open;
        let mut replicas: Vec<usize> = (0..self.upstreams.len())
            .filter(|&i| i != self.primary)
            .collect();
        replicas.sort_by_key(|&i| self.upstreams[i].ctx.priority);
        match self.config.read_policy {
            ReadPolicy::Primary => {
                order.push(self.primary);
                order.extend(replicas);
            }
            ReadPolicy::PreferReplica => {
                let (up, down): (Vec<usize>, Vec<usize>) = replicas.into_iter().partition(healthy);
                order.extend(self.balance(up));
                order.push(self.primary);
                order.extend(down);
            }
            ReadPolicy::Any => {
                let all: Vec<usize> = std::iter::once(self.primary).chain(replicas).collect();
                let (up, down): (Vec<usize>, Vec<usize>) = all.into_iter().partition(healthy);
                order.extend(self.balance(up));
                order.extend(down);
            }
        }
        order
    }

    /// Orders equally eligible upstreams by the configured balancing strategy.
    fn balance(&self, mut group: Vec<usize>) -> Vec<usize> {
        if group.len() < 2 {
            return group;
        }
        match self.config.balance {
            Balance::RoundRobin => {
                let n = self.round_robin.fetch_add(1, Ordering::Relaxed) as usize % group.len();
                group.rotate_left(n);
            }
            Balance::LeastOutstanding => group.sort_by_key(|&i| self.upstreams[i].inflight()),
            Balance::Weighted => {
                use rand::RngExt;
                let total: u64 = group
                    .iter()
                    .map(|&i| self.upstreams[i].ctx.weight.max(1) as u64)
                    .sum();
                let mut pick = rand::rng().random_range(0..total);
                let chosen = group
                    .iter()
                    .position(|&i| {
                        let w = self.upstreams[i].ctx.weight.max(1) as u64;
                        if pick < w {
                            return true;
                        }
                        pick -= w;
                        false
                    })
                    .unwrap_or(0);
                group.swap(0, chosen);
            }
        }
        group
    }

    /// The reply for a request that no upstream can serve right now. Every such decision
    /// goes through here and on to degraded mode: cache, miss reply or fail-open rule.
    pub fn unavailable_reply(
        &self,
        view: ClientView,
        request: &Request,
        spec: Option<&'static CommandSpec>,
        err: UpstreamError,
    ) -> (Bytes, Origin) {
        self.degrade.reply(view, request, spec, &err)
    }

    /// Writes wait here while queued writes from an outage are replayed, so that they reach
    /// the primary first. Bounded by the command timeout.
    pub async fn wait_for_replay(&self) -> Result<(), UpstreamError> {
        if self.degrade.journal.is_empty() {
            return Ok(());
        }
        if self.replay_stalled.load(Ordering::Acquire) {
            // Redis refuses the queued writes for now (OOM, LOADING, ACL ...): fail fast
            // rather than make every write wait out the timeout.
            return Err(UpstreamError::unavailable(
                self.primary().name(),
                "queued writes from the outage cannot be replayed yet",
            ));
        }
        let deadline = tokio::time::Instant::now() + self.config.command_timeout;
        loop {
            let notified = self.replay_done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.degrade.journal.is_empty() {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(UpstreamError::unavailable(
                    self.primary().name(),
                    "queued writes from the outage are still being replayed",
                ));
            }
        }
    }

    /// What the primary said about itself in its last handshake. Before any handshake has
    /// succeeded (a client's HELLO racing start-up), one connection is made to learn it;
    /// with Redis down, a generic answer beats failing the client's handshake.
    pub async fn server_info(&self) -> Arc<crate::upstream::ServerInfo> {
        let ctx = &self.primary().ctx;
        if let Some(info) = ctx.server_info() {
            return info;
        }
        let setup = crate::upstream::Setup::new(
            crate::protocol::Proto::Resp2,
            self.config.credentials.clone(),
        );
        let _ = crate::upstream::conn::open(ctx, &setup).await;
        ctx.server_info().unwrap_or_default()
    }

    fn credentials_recently_verified(&self, c: &Credentials) -> bool {
        let map = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        map.get(c)
            .is_some_and(|at| at.elapsed() < VERIFIED_CREDENTIALS_TTL)
    }

    fn remember_verified(&self, c: Credentials) {
        let mut map = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() > 1024 {
            map.retain(|_, at| at.elapsed() < VERIFIED_CREDENTIALS_TTL);
        }
        map.insert(c, Instant::now());
    }
}

/// Accepts clients until `shutdown` turns true, then drains within the configured deadline.
pub async fn serve(
    server: Arc<Server>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(server.config.max_clients));
    let mut sessions = JoinSet::new();
    loop {
        while sessions.try_join_next().is_some() {}
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => break,
        };
        let (mut stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and similar: back off briefly instead of spinning.
                warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            server.metrics.client_rejected_total.inc();
            tokio::spawn(async move {
                let _ = stream
                    .write_all(b"-ERR max number of clients reached\r\n")
                    .await;
                let _ = stream.shutdown().await;
            });
            continue;
        };
        let id = server.next_client_id.fetch_add(1, Ordering::Relaxed);
        let span = info_span!("client", id, %peer);
        let server = server.clone();
        let shutdown = shutdown.clone();
        sessions.spawn(
            async move {
                server.metrics.client_connections.inc();
                server.metrics.client_connections_total.inc();
                session::run(server.clone(), stream, id, shutdown).await;
                server.metrics.client_connections.dec();
                drop(permit);
            }
            .instrument(span),
        );
    }
    drop(listener);
    let open = sessions.len();
    info!(
        sessions = open,
        "shutting down: stopped accepting, draining in-flight replies"
    );
    let deadline = server.config.shutdown_timeout;
    let drained = tokio::time::timeout(deadline, async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            remaining = sessions.len(),
            "drain deadline passed; closing remaining clients"
        );
        sessions.abort_all();
    }
}
