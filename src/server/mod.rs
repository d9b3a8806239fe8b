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
pub mod outbox;
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
use crate::config::Config;
use crate::degrade::Degrade;
use crate::discovery::Discovery;
use crate::error::Reply;
use crate::metrics::Metrics;
use crate::upstream::Upstream;
use crate::upstream::set::{Applied, Manager, SetError, UpstreamSet, Upstreams};

pub use listener::serve;

pub use crate::upstream::set::RouteOrder;

/// State shared by all sessions.
pub struct Server {
    /// The configuration at start: what only a restart changes is read here.
    pub config: Config,
    /// The configuration as last (re)loaded: `read_policy`, `balance` and `GET /config`.
    current: arc_swap::ArcSwap<Config>,
    pub metrics: Arc<Metrics>,
    /// The current set of upstreams (it changes at run time: see `upstream::set`).
    pub upstreams: Upstreams,
    pub manager: Arc<Manager>,
    /// Composes the configuration's list with the discovery sources (see `discovery`).
    pub discovery: Arc<Discovery>,
    pub degrade: Arc<Degrade>,
    /// Identical cacheable reads in flight share one upstream request.
    pub flights: SingleFlight<Reply>,
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
        discovery: Arc<Discovery>,
        degrade: Arc<Degrade>,
        flights: SingleFlight<Reply>,
    ) -> Server {
        let identities = degrade.identities.clone();
        let own = identities.identity(config.credentials.clone());
        let users = ClientUsers::new(&config.users);
        Server {
            current: arc_swap::ArcSwap::from_pointee(config.clone()),
            config,
            metrics,
            upstreams: discovery.manager().upstreams().clone(),
            manager: discovery.manager().clone(),
            discovery,
            degrade,
            flights,
            identities,
            own,
            users,
            next_client_id: AtomicU64::new(1),
            round_robin: AtomicU64::new(0),
        }
    }

    /// The current primary.
    pub fn primary(&self) -> Arc<Upstream> {
        self.upstreams.load().primary().clone()
    }

    fn next_client_id(&self) -> u64 {
        self.next_client_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The upstreams to try for a command in `set`, best first, by the read policy.
    pub fn route(&self, set: &UpstreamSet, is_read: bool) -> RouteOrder {
        if !is_read || set.list.len() == 1 {
            return RouteOrder::One(set.primary_index());
        }
        let current = self.current.load();
        set.route(
            is_read,
            current.read_policy,
            current.balance,
            &self.round_robin,
        )
    }

    /// The configuration as last (re)loaded.
    pub fn current_config(&self) -> Arc<Config> {
        self.current.load_full()
    }

    /// A reload was applied: `config` is the configuration now.
    pub fn set_config(&self, config: Config) {
        self.current.store(Arc::new(config));
    }

    /// Sets the configuration's upstream list and reconciles the set with it, composed
    /// with the discovery sources (see `upstream::set` and `discovery`): changed addresses
    /// get new connections while in-flight commands finish on the old ones, removed
    /// upstreams are drained, added ones are probed before they take traffic.
    pub async fn apply_upstreams(
        &self,
        list: &[crate::config::UpstreamConfig],
    ) -> Result<Applied, SetError> {
        self.discovery.set_config(list.to_vec()).await
    }

    /// What the primary said about itself in its last handshake. Before any handshake has
    /// succeeded (a client's HELLO racing start-up), one connection is made to learn it;
    /// with Redis down, a generic answer beats failing the client's handshake.
    pub async fn server_info(&self) -> Arc<crate::upstream::ServerInfo> {
        let primary = self.primary();
        let ctx = &primary.ctx;
        if let Some(info) = ctx.server_info() {
            return info;
        }
        let setup =
            crate::upstream::Setup::new(crate::resp::Proto::Resp2, self.config.credentials.clone());
        let _ = crate::upstream::handshake::open(ctx, &setup).await;
        ctx.server_info().unwrap_or_default()
    }
}
