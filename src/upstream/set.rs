//! The set of upstreams, changeable at run time, and the one API that changes it.
//!
//! # Design
//!
//! The set is an immutable snapshot ([`UpstreamSet`]) behind an `ArcSwap`: the hot path
//! never takes a lock, and a session keeps the snapshot it loaded until a `watch` channel
//! tells it a new one was published (one atomic load per request to check). A change is a
//! new snapshot, never an edit of the current one, so a request routed on the old snapshot
//! finishes on the upstreams it chose while new requests see the new set.
//!
//! [`Manager::apply`] is the only way to change it (configuration reload, DNS, a watched
//! file and Sentinel all go through it), one reconciliation at a time, keyed by upstream
//! *name*:
//!
//! * same name, same endpoint (address and TLS): the same [`Upstream`] stays, with its
//!   connections and its breaker; role, priority and weight change in place (a replica
//!   promoted by Sentinel keeps its warm connections).
//! * same name, new endpoint: a new instance at the new address, with a breaker of its own
//!   (the old address's failures do not punish the new one: permits of the old breaker can
//!   only ever be recorded by the old breaker), and the old instance is drained.
//! * a new name: built, connected and probed before it is published, so it joins the read
//!   policies once it can serve (or after the connect timeout, when it cannot: its breaker
//!   then decides).
//! * a name no longer listed: drained.
//!
//! Draining ([`super::Drain`]): the retired instance takes no new work, sessions drop their
//! links to it as soon as they see the new snapshot, and its connections end once what is
//! in flight on them has been answered; at the drain deadline whatever is left is closed.
//! No client connection is closed by a reconciliation.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use super::probe::{self, ProbeTiming};
use super::{Upstream, UpstreamSettings};
use crate::auth::Credentials;
use crate::breaker::{BreakerConfig, BreakerMetrics, SharedBreaker, State};
use crate::config::{Balance, ReadPolicy, Role, UpstreamConfig};
use crate::effect::EffectSink;
use crate::metrics::Metrics;

/// Upstreams to try, best first (indexes into [`UpstreamSet::list`]); one (the primary,
/// for writes or with no replicas) needs no allocation.
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

/// One published set of upstreams. Immutable: a change publishes a new one.
pub struct UpstreamSet {
    /// Bumped by every publication.
    pub version: u64,
    pub list: Vec<Arc<Upstream>>,
    primary: usize,
}

impl UpstreamSet {
    fn new(version: u64, list: Vec<Arc<Upstream>>) -> UpstreamSet {
        let primary = list
            .iter()
            .position(|u| u.ctx.role() == Role::Primary)
            .unwrap_or(0);
        UpstreamSet {
            version,
            list,
            primary,
        }
    }

    /// Whether every upstream's breaker refuses requests (a lock-free hint each): reads
    /// are answered from the cache.
    pub fn all_refuse(&self) -> bool {
        self.list.iter().all(|u| u.breaker.rejects_all())
    }

    pub fn primary(&self) -> &Arc<Upstream> {
        &self.list[self.primary]
    }

    pub fn primary_index(&self) -> usize {
        self.primary
    }

    pub fn find(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.list.iter().find(|u| *u.ctx.name == *name)
    }

    /// Whether this instance (by [`super::UpstreamCtx::id`]) is in the set.
    pub fn contains(&self, id: u64) -> bool {
        self.list.iter().any(|u| u.ctx.id == id)
    }

    /// The upstreams to try for a command, best first. Writes go to the primary alone.
    /// Reads follow `policy` and `balance` among upstreams whose breaker is not open, and
    /// fail over to replicas in priority order when the primary's breaker rejects them.
    pub fn route(
        &self,
        is_read: bool,
        policy: ReadPolicy,
        balance: Balance,
        round_robin: &AtomicU64,
    ) -> RouteOrder {
        if !is_read || self.list.len() == 1 {
            return RouteOrder::One(self.primary);
        }
        let mut order = Vec::with_capacity(self.list.len());
        let healthy = |i: &usize| self.list[*i].breaker.state() != State::Open;
        let mut replicas: Vec<usize> = (0..self.list.len())
            .filter(|&i| i != self.primary)
            .collect();
        replicas.sort_by_key(|&i| self.list[i].ctx.priority());
        match policy {
            ReadPolicy::Primary => {
                order.push(self.primary);
                order.extend(replicas);
            }
            ReadPolicy::PreferReplica => {
                let (up, down): (Vec<usize>, Vec<usize>) = replicas.into_iter().partition(healthy);
                order.extend(self.balance(up, balance, round_robin));
                order.push(self.primary);
                order.extend(down);
            }
            ReadPolicy::Any => {
                let all: Vec<usize> = std::iter::once(self.primary).chain(replicas).collect();
                let (up, down): (Vec<usize>, Vec<usize>) = all.into_iter().partition(healthy);
                order.extend(self.balance(up, balance, round_robin));
                order.extend(down);
            }
        }
        RouteOrder::Many(order)
    }

    /// Orders equally eligible upstreams by the balancing strategy.
    fn balance(&self, mut group: Vec<usize>, balance: Balance, rr: &AtomicU64) -> Vec<usize> {
        if group.len() < 2 {
            return group;
        }
        match balance {
            Balance::RoundRobin => {
                let n = rr.fetch_add(1, Ordering::Relaxed) as usize % group.len();
                group.rotate_left(n);
            }
            Balance::LeastOutstanding => group.sort_by_key(|&i| self.list[i].inflight()),
            Balance::Weighted => {
                use rand::RngExt;
                let weight = |i: usize| self.list[i].ctx.weight().max(1) as u64;
                let total: u64 = group.iter().map(|&i| weight(i)).sum();
                let mut pick = rand::rng().random_range(0..total);
                let chosen = group
                    .iter()
                    .position(|&i| {
                        if pick < weight(i) {
                            return true;
                        }
                        pick -= weight(i);
                        false
                    })
                    .unwrap_or(0);
                group.swap(0, chosen);
            }
        }
        group
    }
}

/// The current set, readable without a lock. Cheap to clone.
#[derive(Clone)]
pub struct Upstreams {
    inner: Arc<Current>,
}

struct Current {
    set: ArcSwap<UpstreamSet>,
    changed: watch::Sender<u64>,
}

impl Upstreams {
    fn new(list: Vec<Arc<Upstream>>) -> Upstreams {
        Upstreams {
            inner: Arc::new(Current {
                set: ArcSwap::from_pointee(UpstreamSet::new(1, list)),
                changed: watch::channel(1).0,
            }),
        }
    }

    /// The current set.
    pub fn load(&self) -> Arc<UpstreamSet> {
        self.inner.set.load_full()
    }

    /// Changes with every publication (the new version).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }

    /// The current upstreams, a snapshot.
    pub fn iter(&self) -> std::vec::IntoIter<Arc<Upstream>> {
        self.load().list.clone().into_iter()
    }

    pub fn len(&self) -> usize {
        self.inner.set.load().list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn publish(&self, list: Vec<Arc<Upstream>>) -> Arc<UpstreamSet> {
        let version = self.inner.set.load().version + 1;
        let set = Arc::new(UpstreamSet::new(version, list));
        self.inner.set.store(set.clone());
        self.inner.changed.send_replace(version);
        set
    }
}

impl IntoIterator for &Upstreams {
    type Item = Arc<Upstream>;
    type IntoIter = std::vec::IntoIter<Arc<Upstream>>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// Why a new list of upstreams was refused (the current set stays).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SetError {
    #[error("at least one upstream is needed")]
    Empty,
    #[error("exactly one primary is needed, found {0}")]
    Primaries(usize),
    #[error("upstream name `{0}` is used twice")]
    DuplicateName(String),
    #[error("upstream `{name}`: `{addr}` is not host:port")]
    Address { name: String, addr: String },
}

/// Checks a list the way the configuration does.
pub fn validate(list: &[UpstreamConfig]) -> Result<(), SetError> {
    if list.is_empty() {
        return Err(SetError::Empty);
    }
    let primaries = list.iter().filter(|u| u.role == Role::Primary).count();
    if primaries != 1 {
        return Err(SetError::Primaries(primaries));
    }
    let mut names = std::collections::HashSet::new();
    for u in list {
        if !names.insert(u.name.as_str()) {
            return Err(SetError::DuplicateName(u.name.clone()));
        }
        let ok = u
            .addr
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        if !ok {
            return Err(SetError::Address {
                name: u.name.clone(),
                addr: u.addr.clone(),
            });
        }
    }
    Ok(())
}

/// What a reconciliation changed, by upstream name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    pub added: Vec<String>,
    /// Same name, new address: a new instance, the old one drained.
    pub moved: Vec<String>,
    pub removed: Vec<String>,
    /// Same endpoint, new role, priority or weight.
    pub updated: Vec<String>,
}

impl Applied {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.moved.is_empty()
            && self.removed.is_empty()
            && self.updated.is_empty()
    }
}

/// Everything a new upstream is built with.
pub struct Factory {
    pub settings: UpstreamSettings,
    pub metrics: Arc<Metrics>,
    pub breaker_metrics: BreakerMetrics,
    pub sink: Arc<dyn EffectSink>,
    pub credentials: Option<Arc<Credentials>>,
    /// An interval of zero: no probe.
    pub probe: ProbeTiming,
    pub breaker: BreakerConfig,
    /// How long a retired upstream's in-flight commands may take before its connections
    /// are closed.
    pub drain_timeout: Duration,
    pub shutdown: watch::Receiver<bool>,
    /// Every new instance's breaker reports to, and takes advice from, the fleet.
    pub fleet: Option<crate::fleet::Fleet>,
}

/// Owns the set and reconciles it.
pub struct Manager {
    upstreams: Upstreams,
    factory: Mutex<Factory>,
    /// What each instance (`UpstreamCtx::id`) was last configured with, and the breaker
    /// settings that came to: a reconciliation compares against them.
    configured: Mutex<std::collections::HashMap<u64, (UpstreamConfig, BreakerConfig)>>,
    /// One reconciliation at a time (it awaits new upstreams' first connection).
    applying: tokio::sync::Mutex<()>,
}

impl Manager {
    /// Builds the first set from the configuration (validated there) and starts its
    /// connections and probes in the background: redfuse starts even when Redis is down.
    pub fn start(factory: Factory, list: &[UpstreamConfig]) -> Arc<Manager> {
        let mut configured = std::collections::HashMap::new();
        let built: Vec<Arc<Upstream>> = list
            .iter()
            .map(|cfg| {
                let (u, breaker) = build(&factory, cfg);
                configured.insert(u.ctx.id, (cfg.clone(), breaker));
                u
            })
            .collect();
        let mut shutdown = factory.shutdown.clone();
        let manager = Arc::new(Manager {
            upstreams: Upstreams::new(built),
            factory: Mutex::new(factory),
            configured: Mutex::new(configured),
            applying: tokio::sync::Mutex::new(()),
        });
        let weak = Arc::downgrade(&manager);
        tokio::spawn(async move {
            let _ = shutdown.wait_for(|s| *s).await;
            if let Some(m) = weak.upgrade() {
                for u in &m.upstreams {
                    u.stop();
                }
            }
        });
        manager
    }

    pub fn upstreams(&self) -> &Upstreams {
        &self.upstreams
    }

    fn factory(&self) -> std::sync::MutexGuard<'_, Factory> {
        self.factory.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the settings later upstreams are built with (a configuration reload).
    pub fn set_defaults(&self, breaker: BreakerConfig, probe: ProbeTiming, drain: Duration) {
        let mut f = self.factory();
        f.breaker = breaker;
        f.probe = probe;
        f.drain_timeout = drain;
    }

    /// Reconciles the set with `list`; see the module docs. On error nothing changed.
    pub async fn apply(&self, list: &[UpstreamConfig]) -> Result<Applied, SetError> {
        validate(list)?;
        let _one = self.applying.lock().await;
        let old = self.upstreams.load();
        let mut applied = Applied::default();
        let mut next = Vec::with_capacity(list.len());
        let mut fresh = Vec::new();
        let mut retired = Vec::new();
        {
            let factory = self.factory();
            let mut configured = self.configured.lock().unwrap_or_else(|e| e.into_inner());
            for cfg in list {
                let kept = old.find(&cfg.name).filter(|u| {
                    same_endpoint(u, cfg)
                        && configured.get(&u.ctx.id).is_some_and(|(last, _)| {
                            last.instance_settings() == cfg.instance_settings()
                        })
                });
                match kept {
                    Some(u) => {
                        let ctx = &u.ctx;
                        let mut updated = (ctx.role(), ctx.priority(), ctx.weight())
                            != (cfg.role, cfg.priority, cfg.weight);
                        // Policy changes in place: the breaker keeps its state.
                        let breaker = breaker_of(&factory, cfg);
                        let entry = configured
                            .entry(ctx.id)
                            .or_insert_with(|| (cfg.clone(), breaker.clone()));
                        if entry.1 != breaker {
                            u.breaker.reconfigure(breaker.clone());
                            updated = true;
                        }
                        if entry.0.fail_open != cfg.fail_open {
                            u.set_fail_open(fail_open_of(cfg).map(Arc::new));
                            updated = true;
                        }
                        *entry = (cfg.clone(), breaker);
                        if updated {
                            applied.updated.push(cfg.name.clone());
                        }
                        next.push((u.clone(), Some(cfg)));
                    }
                    None => {
                        let (u, breaker) = build(&factory, cfg);
                        configured.insert(u.ctx.id, (cfg.clone(), breaker));
                        let found = old.find(&cfg.name);
                        match found {
                            Some(old) => {
                                applied.moved.push(cfg.name.clone());
                                retired.push(old.clone());
                            }
                            None => applied.added.push(cfg.name.clone()),
                        }
                        fresh.push(u.clone());
                        next.push((u, None));
                    }
                }
            }
        }
        for u in &old.list {
            if !list.iter().any(|c| c.name == *u.ctx.name) {
                applied.removed.push(u.ctx.name.to_string());
                retired.push(u.clone());
            }
        }
        // New instances join once they can serve (or once it is clear they cannot yet).
        let until =
            Instant::now() + self.factory().settings.connect_timeout + Duration::from_millis(200);
        for u in &fresh {
            ready(u, until).await;
        }
        if applied.is_empty() {
            return Ok(applied);
        }
        // Places change together with the publication: routing never sees two primaries
        // for long, and a promoted replica keeps its connections.
        let list: Vec<Arc<Upstream>> = next
            .into_iter()
            .map(|(u, cfg)| {
                if let Some(cfg) = cfg {
                    u.ctx.set_place(cfg.role, cfg.priority, cfg.weight);
                }
                u
            })
            .collect();
        let set = self.upstreams.publish(list);
        info!(
            version = set.version,
            primary = %set.primary().name(),
            primary_addr = %set.primary().ctx.addr,
            added = ?applied.added,
            moved = ?applied.moved,
            removed = ?applied.removed,
            updated = ?applied.updated,
            "upstream set changed"
        );
        let (deadline, fleet) = {
            let f = self.factory();
            (f.drain_timeout, f.fleet.clone())
        };
        for u in retired {
            // Removed, not replaced under its name: the fleet stops following it.
            if let Some(fleet) = &fleet
                && !set.list.iter().any(|n| n.name() == u.name())
            {
                fleet.unregister(u.name());
            }
            self.configured
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&u.ctx.id);
            u.retire();
            tokio::spawn(drain(u, deadline));
        }
        Ok(applied)
    }
}

/// Whether `cfg` names the endpoint `u` connects to.
fn same_endpoint(u: &Upstream, cfg: &UpstreamConfig) -> bool {
    let tls_name = |t: &Option<crate::config::TlsClient>| {
        t.as_ref().map(|t| t.server_name.to_str().into_owned())
    };
    u.ctx.addr == cfg.addr && tls_name(&u.ctx.tls) == tls_name(&cfg.tls_client)
}

/// The upstream's breaker settings: its own keys over the global ones (validated with
/// the configuration; the global ones should a list from elsewhere carry bad ones).
fn breaker_of(f: &Factory, cfg: &UpstreamConfig) -> BreakerConfig {
    cfg.breaker_config(&f.breaker).unwrap_or_else(|e| {
        warn!(upstream = %cfg.name, "invalid breaker settings, using the global ones: {e}");
        f.breaker.clone()
    })
}

/// The upstream's own fail-open rules, compiled (validated with the configuration).
fn fail_open_of(cfg: &UpstreamConfig) -> Option<crate::rules::FailOpen> {
    let rules = cfg.fail_open.as_ref()?;
    crate::rules::FailOpen::compile_checked(rules, |n| {
        crate::command::lookup(n.as_bytes()).is_some()
    })
    .map_err(|e| warn!(upstream = %cfg.name, "invalid fail-open rules, using the global ones: {e}"))
    .ok()
}

/// A new upstream: its breaker (timer included), its default pool and warm connections,
/// and its probe; with the breaker settings it got.
fn build(f: &Factory, cfg: &UpstreamConfig) -> (Arc<Upstream>, BreakerConfig) {
    let breaker_config = breaker_of(f, cfg);
    let breaker = SharedBreaker::new(
        &cfg.name,
        breaker_config.clone(),
        rand::random::<u64>(),
        f.breaker_metrics.for_upstream(&cfg.name),
    );
    let u = Arc::new(Upstream::new(
        cfg,
        f.settings.clone(),
        f.metrics.for_upstream(&cfg.name),
        breaker,
        f.sink.clone(),
    ));
    u.set_fail_open(fail_open_of(cfg).map(Arc::new));
    // By name: an instance replacing another (a moved address) takes its place.
    if let Some(fleet) = &f.fleet {
        fleet.register(&cfg.name, &u.breaker);
    }
    let stopped = u.stopped();
    u.breaker.spawn_timer(stopped);
    u.warm_up(&f.credentials);
    let timing = ProbeTiming {
        interval: cfg
            .health_probe_interval_ms
            .map_or(f.probe.interval, Duration::from_millis),
        timeout: cfg
            .health_probe_timeout_ms
            .map_or(f.probe.timeout, Duration::from_millis),
    };
    if !timing.interval.is_zero() {
        tokio::spawn(probe::run(
            u.clone(),
            f.credentials.clone(),
            timing,
            u.ctx.metrics.probe.clone(),
            u.stop_receiver(),
        ));
    }
    (u, breaker_config)
}

/// Waits until `u` has a shared connection up or its breaker opened, at most `until`.
async fn ready(u: &Upstream, until: Instant) {
    while !u.is_connected() && u.breaker.state() != State::Open && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Lets a retired upstream's in-flight commands finish, then closes what is left.
async fn drain(u: Arc<Upstream>, deadline: Duration) {
    let until = Instant::now() + deadline;
    while u.inflight() > 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = u.inflight();
    if left > 0 {
        warn!(upstream = %u.name(), addr = %u.ctx.addr, in_flight = left, "drain deadline passed; closing the retired upstream's connections");
    } else {
        info!(upstream = %u.name(), addr = %u.ctx.addr, "retired upstream drained");
    }
    // Dedicated connections (transactions, blocking commands) are not counted in flight:
    // they keep the rest of the deadline.
    tokio::time::sleep_until(until).await;
    u.force_close();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(name: &str, addr: &str, role: Role) -> UpstreamConfig {
        let mut u = UpstreamConfig::new(addr);
        u.name = name.into();
        u.role = role;
        u
    }

    #[test]
    fn lists_are_checked_like_the_configuration() {
        assert_eq!(validate(&[]), Err(SetError::Empty));
        let p = up("a", "h:1", Role::Primary);
        assert_eq!(validate(std::slice::from_ref(&p)), Ok(()));
        assert_eq!(
            validate(&[p.clone(), up("b", "h:2", Role::Primary)]),
            Err(SetError::Primaries(2))
        );
        assert_eq!(
            validate(&[up("a", "h:2", Role::Replica)]),
            Err(SetError::Primaries(0))
        );
        assert_eq!(
            validate(&[p.clone(), up("a", "h:2", Role::Replica)]),
            Err(SetError::DuplicateName("a".into()))
        );
        assert!(matches!(
            validate(&[up("a", "nope", Role::Primary)]),
            Err(SetError::Address { .. })
        ));
    }
}
