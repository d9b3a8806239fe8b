//! The client side of redfuse: the listener, one session per client, and what every
//! session shares.
//!
//! Layout, top-down: [`listener`] accepts clients; [`session`] runs one client's loop (read
//! frames, classify, act, queue replies in order); [`state`] is the client connection's
//! state machine and [`route`] decides, from the state and the classified request, where a
//! request goes; [`local`] answers per-connection commands itself and [`login`] checks
//! credentials; [`links`] holds the client's upstream connections and keeps its commands
//! in order across them, [`shared`] sends on shared pipelined connections, [`pinned`] on
//! the client's dedicated one, [`tunnel`] turns the connection into a raw pipe; [`writer`]
//! writes replies back in order. Nothing below `server` imports from it.

pub mod links;
pub mod listener;
pub mod local;
pub mod login;
pub mod pinned;
pub mod route;
pub mod session;
pub mod shared;
pub mod state;
pub mod tunnel;
pub mod writer;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::auth::{ClientUsers, Identities, Identity};
use crate::cache::SingleFlight;
use crate::config::{Balance, Config, ReadPolicy};
use crate::degrade::Degrade;
use crate::effect::FlightKey;
use crate::error::Reply;
use crate::metrics::Metrics;
use crate::upstream::Upstream;

pub use listener::serve;

/// Upstreams to try, best first; one (the primary, for writes or with no replicas) needs
/// no allocation.
pub enum RouteOrder {
    One(usize),
    Many(Vec<usize>),
}

impl RouteOrder {
    pub fn iter(&self) -> std::iter::Copied<std::slice::Iter<'_, usize>> {
        match self {
            RouteOrder::One(i) => std::slice::from_ref(i).iter().copied(),
            RouteOrder::Many(v) => v.iter().copied(),
        }
    }
}

/// State shared by all sessions.
pub struct Server {
    pub config: Config,
    pub metrics: Arc<Metrics>,
    /// Every upstream; `primary` indexes the primary.
    pub upstreams: Vec<Arc<Upstream>>,
    primary: usize,
    pub degrade: Arc<Degrade>,
    /// Identical cacheable reads in flight share one upstream request.
    pub flights: SingleFlight<FlightKey, Reply>,
    pub identities: Arc<Identities>,
    /// What clients run as before they authenticate, when redfuse does not require it:
    /// redfuse's own upstream credentials, or none.
    pub own: Identity,
    /// Client authentication on the listener (`requirepass`, `[[users]]`), if configured.
    pub users: Option<ClientUsers>,
    next_client_id: AtomicU64,
    round_robin: AtomicU64,
}

impl Server {
    pub fn new(
        config: Config,
        metrics: Arc<Metrics>,
        upstreams: Vec<Arc<Upstream>>,
        degrade: Arc<Degrade>,
        flights: SingleFlight<FlightKey, Reply>,
    ) -> Server {
        let primary = upstreams
            .iter()
            .position(|u| u.ctx.role == crate::config::Role::Primary)
            .unwrap_or(0);
        let identities = degrade.identities.clone();
        let own = identities.identity(config.credentials.clone());
        let users = ClientUsers::new(&config.users);
        Server {
            config,
            metrics,
            upstreams,
            primary,
            degrade,
            flights,
            identities,
            own,
            users,
            next_client_id: AtomicU64::new(1),
            round_robin: AtomicU64::new(0),
        }
    }

    pub fn primary(&self) -> &Arc<Upstream> {
        &self.upstreams[self.primary]
    }

    pub fn primary_index(&self) -> usize {
        self.primary
    }

    fn next_client_id(&self) -> u64 {
        self.next_client_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The upstreams to try for a command, best first (indexes into `upstreams`). Writes go
    /// to the primary alone. Reads follow `read_policy` and `balance` among upstreams whose
    /// breaker is not open, and fail over to replicas in priority order when the primary's
    /// breaker rejects them.
    pub fn route(&self, is_read: bool) -> RouteOrder {
        if !is_read || self.upstreams.len() == 1 {
            return RouteOrder::One(self.primary);
        }
        let mut order = Vec::with_capacity(self.upstreams.len());
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
        RouteOrder::Many(order)
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

    /// What the primary said about itself in its last handshake. Before any handshake has
    /// succeeded (a client's HELLO racing start-up), one connection is made to learn it;
    /// with Redis down, a generic answer beats failing the client's handshake.
    pub async fn server_info(&self) -> Arc<crate::upstream::ServerInfo> {
        let ctx = &self.primary().ctx;
        if let Some(info) = ctx.server_info() {
            return info;
        }
        let setup =
            crate::upstream::Setup::new(crate::resp::Proto::Resp2, self.config.credentials.clone());
        let _ = crate::upstream::handshake::open(ctx, &setup).await;
        ctx.server_info().unwrap_or_default()
    }
}
