//! Upstream Redis servers: shared pipelined connections, dedicated connections for stateful
//! clients, and what redfuse learnt about each server.
//!
//! Shared connections are grouped in pools keyed by what a connection's handshake fixes
//! (protocol version and credentials), so a `HELLO 3` client or one that sent `AUTH` stays
//! multiplexed with its peers instead of needing a connection of its own. A client keeps one
//! shared connection per pool for its lifetime: its commands then reach Redis in the order it
//! sent them, which spreading them over several connections would not guarantee.
//!
//! Dedicated connections ([`dedicated`]) are kept warm, so that a client entering a
//! blocking command or a transaction needs no connect and no handshake first.
//!
//! Layout: [`handshake`] opens connections, [`conn`] runs a connection's pipeline,
//! [`dedicated`] keeps the warm set, [`barrier`] keeps other traffic behind a blocking
//! command on its way, [`probe`] checks health, [`backoff`] paces reconnects,
//! [`info`] remembers what `HELLO` said, [`set`] holds the set of upstreams that changes at
//! run time and reconciles it.

pub mod backoff;
pub mod barrier;
pub mod conn;
pub mod dedicated;
pub mod handshake;
pub mod info;
pub mod probe;
pub mod set;
pub mod tls;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use crate::auth::Credentials;
use crate::breaker::SharedBreaker;
use crate::config::{Role, UpstreamConfig};
use crate::effect::EffectSink;
use crate::error::UpstreamError;
use crate::metrics::UpstreamMetrics;
use crate::resp::Proto;
pub use conn::{Call, Calls, ConnHandle};
pub use handshake::Setup;
pub use info::ServerInfo;

/// Everything a connection task needs to know about its upstream.
pub struct UpstreamCtx {
    /// Unique per instance: an upstream whose address changes is a new instance under the
    /// same name.
    pub id: u64,
    pub name: Arc<str>,
    pub addr: String,
    /// TLS settings when the upstream is reached over TLS.
    pub tls: Option<crate::config::TlsClient>,
    /// Role, priority and weight change in place (a replica promoted by Sentinel keeps its
    /// connections), so they are atomics read with `role()`, `priority()`, `weight()`.
    role: AtomicU8,
    priority: AtomicU32,
    weight: AtomicU32,
    /// Set once the upstream left the set: see [`Drain`].
    pub drain: Drain,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    /// Deepest reply nesting accepted (a bound against a broken upstream, far above what
    /// Redis sends).
    pub max_reply_depth: usize,
    pub metrics: UpstreamMetrics,
    /// Applies the effects replies carry (cache fills, invalidations).
    pub sink: Arc<dyn EffectSink>,
    /// Shared connections currently connected.
    pub connected: AtomicUsize,
    /// Requests written or queued and not yet answered (the bulkhead counts these).
    pub inflight: AtomicUsize,
    /// Slow-by-nature commands waiting on Redis (see `conn::Call::slow`).
    pub slow_in_flight: AtomicUsize,
    /// Woken when a silent health probe (no slow command to excuse it) opened the breaker:
    /// the server is frozen or black-holed, and what waits on its connections would only
    /// wait out the command timeout (see `conn::Ended::Silent`).
    pub silent: tokio::sync::Notify,
    /// Set once a rejection of redfuse's own credentials has been logged.
    pub auth_warned: AtomicBool,
    /// The server refuses connections without credentials (`requirepass`): a client that
    /// never authenticated gets `NOAUTH` in degraded mode too.
    pub anonymous_denied: AtomicBool,
    /// Why the server is up but refuses redfuse's own credentials, if it does.
    misconfigured: Mutex<Option<String>>,
    /// The address does not resolve (a typo, a Service that does not exist): also
    /// misconfigured, kept apart so that a good probe answer does not hide it.
    unresolved: Mutex<Option<String>>,
    /// Why the last TLS handshake was refused (an untrusted certificate, a client
    /// certificate required ...), until one succeeds.
    tls_refused: Mutex<Option<String>>,
    /// Whether any of the three above is set: every degraded reply asks, and nearly
    /// always the answer is no (one load instead of three locks).
    any_misconfigured: AtomicBool,
    /// When a `-BUSY` reply was last seen, in ms since `epoch`.
    busy_seen: AtomicU64,
    epoch: Instant,
    /// Wakes shared connections out of their reconnect back-off (the probe saw Redis back).
    pub reconnect: tokio::sync::Notify,
    /// Raised while a client's blocking command is on its way here: see [`barrier`].
    pub barrier: Arc<barrier::Barrier>,
    server_info: RwLock<Option<Arc<ServerInfo>>>,
}

/// How long after a `-BUSY` reply a command waiting on the server is not timed out.
const BUSY_GRACE: Duration = Duration::from_secs(3);

/// The end of an upstream that left the set. Retired, it takes no new work: sessions let
/// go of its connections (which then end once what is in flight on them is answered), its
/// probe stops and its warm connections close. Forced at the drain deadline, every
/// connection still open to it closes, failing what is still pending there.
#[derive(Default)]
pub struct Drain {
    retired: AtomicBool,
    forced: AtomicBool,
    wake: tokio::sync::Notify,
}

impl Drain {
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    pub fn is_forced(&self) -> bool {
        self.forced.load(Ordering::Acquire)
    }

    fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }

    fn force(&self) {
        self.forced.store(true, Ordering::Release);
        self.wake.notify_waiters();
    }

    /// Completes once the drain deadline has passed.
    pub async fn forced(&self) {
        loop {
            let notified = self.wake.notified();
            if self.is_forced() {
                return;
            }
            notified.await;
        }
    }
}

impl UpstreamCtx {
    pub fn role(&self) -> Role {
        match self.role.load(Ordering::Relaxed) {
            0 => Role::Primary,
            _ => Role::Replica,
        }
    }

    pub fn priority(&self) -> u32 {
        self.priority.load(Ordering::Relaxed)
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    /// A reconciliation changed where this upstream stands in the set.
    pub fn set_place(&self, role: Role, priority: u32, weight: u32) {
        let r = match role {
            Role::Primary => 0,
            Role::Replica => 1,
        };
        self.role.store(r, Ordering::Relaxed);
        self.priority.store(priority, Ordering::Relaxed);
        self.weight.store(weight, Ordering::Relaxed);
    }

    pub fn remember_server_info(&self, info: ServerInfo) {
        let mut slot = self.server_info.write().unwrap_or_else(|e| e.into_inner());
        if slot.as_deref() != Some(&info) {
            *slot = Some(Arc::new(info));
        }
    }

    pub fn server_info(&self) -> Option<Arc<ServerInfo>> {
        self.server_info
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Redis answered `-BUSY`: a script or function keeps it busy.
    pub fn note_busy(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.busy_seen.store(ms.max(1), Ordering::Relaxed);
    }

    pub fn busy_recently(&self) -> bool {
        let seen = self.busy_seen.load(Ordering::Relaxed);
        seen != 0 && self.epoch.elapsed().as_millis() as u64 <= seen + BUSY_GRACE.as_millis() as u64
    }

    fn note_misconfigured(&self) {
        // Serialised, so that two changes at once cannot leave the flag of the older.
        static UPDATE: Mutex<()> = Mutex::new(());
        let _serial = UPDATE.lock().unwrap_or_else(|e| e.into_inner());
        let any = self.misconfigured_now().is_some();
        self.any_misconfigured.store(any, Ordering::Release);
        self.metrics.misconfigured.set(any as i64);
    }

    /// The server answers but refuses redfuse's credentials (`Some(reply)`), or no longer.
    pub fn set_misconfigured(&self, why: Option<String>) {
        *self.misconfigured.lock().unwrap_or_else(|e| e.into_inner()) = why;
        self.note_misconfigured();
    }

    /// The address does not resolve (`Some(why)`), or resolves again.
    pub fn set_unresolved(&self, why: Option<String>) {
        *self.unresolved.lock().unwrap_or_else(|e| e.into_inner()) = why;
        self.note_misconfigured();
    }

    /// The TLS handshake was refused (`Some(why)`), or succeeded.
    pub fn set_tls_refused(&self, why: Option<String>) {
        *self.tls_refused.lock().unwrap_or_else(|e| e.into_inner()) = why;
        self.note_misconfigured();
    }

    /// Why the upstream cannot be used as configured: its address does not resolve, it
    /// refuses the TLS handshake, or it refuses redfuse's credentials.
    pub fn misconfigured(&self) -> Option<String> {
        if !self.any_misconfigured.load(Ordering::Acquire) {
            return None;
        }
        self.misconfigured_now()
    }

    fn misconfigured_now(&self) -> Option<String> {
        let read = |m: &Mutex<Option<String>>| m.lock().unwrap_or_else(|e| e.into_inner()).clone();
        read(&self.unresolved)
            .or_else(|| read(&self.tls_refused))
            .or_else(|| read(&self.misconfigured))
    }
}

/// Settings common to every upstream.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    pub connections: usize,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    pub max_reply_depth: usize,
    pub queue_depth: usize,
    /// Bulkhead: the most requests in flight or queued for one upstream.
    pub max_inflight: usize,
}

/// One request's bulkhead slot, released when the request is answered or dropped.
pub struct Inflight(Arc<UpstreamCtx>);

impl Drop for Inflight {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    proto: Proto,
    credentials: Option<Arc<Credentials>>,
}

struct Pool {
    conns: Vec<ConnHandle>,
    next: AtomicUsize,
}

fn next_upstream_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// One upstream Redis server.
pub struct Upstream {
    pub ctx: Arc<UpstreamCtx>,
    pub breaker: SharedBreaker,
    settings: UpstreamSettings,
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    warm: Arc<dedicated::WarmSet>,
    /// Stops this upstream's probe and breaker timer when it leaves the set.
    stop: tokio::sync::watch::Sender<bool>,
    /// Its own fail-open rules (`upstreams[].fail_open`), replaced by a reload.
    fail_open: arc_swap::ArcSwapOption<crate::rules::FailOpen>,
    /// Whether `fail_open` is set: nearly no upstream has rules of its own, and a guard
    /// taken for nothing on every degraded answer showed in profiles.
    has_fail_open: AtomicBool,
    /// What a request it refuses with its breaker open failed with: made once, borrowed by
    /// every degraded answer (most never show it).
    circuit_open: UpstreamError,
}

impl Upstream {
    /// The error of a request refused by its open breaker.
    pub fn circuit_open_error(&self) -> &UpstreamError {
        &self.circuit_open
    }

    /// Replaces its own fail-open rules.
    pub fn set_fail_open(&self, rules: Option<Arc<crate::rules::FailOpen>>) {
        self.has_fail_open.store(rules.is_some(), Ordering::Release);
        self.fail_open.store(rules);
    }

    /// Its own fail-open rules, if it has some.
    pub fn fail_open(&self) -> Option<Arc<crate::rules::FailOpen>> {
        if !self.has_fail_open.load(Ordering::Acquire) {
            return None;
        }
        self.fail_open.load_full()
    }

    pub fn new(
        config: &UpstreamConfig,
        settings: UpstreamSettings,
        metrics: UpstreamMetrics,
        breaker: SharedBreaker,
        sink: Arc<dyn EffectSink>,
    ) -> Upstream {
        let name: Arc<str> = if config.name.is_empty() {
            config.addr.as_str().into()
        } else {
            config.name.as_str().into()
        };
        let ctx = Arc::new(UpstreamCtx {
            id: next_upstream_id(),
            name,
            addr: config.addr.clone(),
            tls: config.tls_client.clone(),
            role: AtomicU8::new(0),
            priority: AtomicU32::new(0),
            weight: AtomicU32::new(1),
            drain: Drain::default(),
            connect_timeout: config
                .connect_timeout_ms
                .map_or(settings.connect_timeout, Duration::from_millis),
            command_timeout: config
                .command_timeout_ms
                .map_or(settings.command_timeout, Duration::from_millis),
            max_reply_depth: settings.max_reply_depth,
            metrics,
            sink,
            connected: AtomicUsize::new(0),
            inflight: AtomicUsize::new(0),
            slow_in_flight: AtomicUsize::new(0),
            silent: tokio::sync::Notify::new(),
            auth_warned: AtomicBool::new(false),
            anonymous_denied: AtomicBool::new(false),
            misconfigured: Mutex::new(None),
            unresolved: Mutex::new(None),
            tls_refused: Mutex::new(None),
            any_misconfigured: AtomicBool::new(false),
            busy_seen: AtomicU64::new(0),
            epoch: Instant::now(),
            reconnect: tokio::sync::Notify::new(),
            barrier: Arc::default(),
            server_info: RwLock::new(None),
        });
        ctx.set_place(config.role, config.priority, config.weight);
        let circuit_open = UpstreamError::CircuitOpen {
            upstream: ctx.name.clone(),
        };
        Upstream {
            circuit_open,
            warm: Arc::new(dedicated::WarmSet::new(ctx.clone())),
            ctx,
            breaker,
            settings,
            pools: Mutex::new(HashMap::new()),
            stop: tokio::sync::watch::channel(false).0,
            fail_open: arc_swap::ArcSwapOption::empty(),
            has_fail_open: AtomicBool::new(false),
        }
    }

    /// Stops the probe and the breaker timer (the upstream left the set, or shutdown).
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// Changes to true when [`Upstream::stop`] is called.
    pub fn stop_receiver(&self) -> tokio::sync::watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// Completes when this upstream leaves the set (or its stop sender is gone).
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.stop.subscribe();
        async move {
            let _ = rx.wait_for(|stopped| *stopped).await;
        }
    }

    /// Takes the upstream out of service: no new connections, the probe and the breaker
    /// timer stop, warm connections close; shared connections end once their last user lets
    /// go and what is in flight on them is answered.
    pub fn retire(&self) {
        self.ctx.drain.retire();
        self.stop();
        self.pools.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.warm.clear();
    }

    /// The drain deadline passed: whatever is still open to this upstream closes.
    pub fn force_close(&self) {
        self.ctx.drain.force();
    }

    pub fn name(&self) -> &Arc<str> {
        &self.ctx.name
    }

    /// Takes a bulkhead slot for one request, or None when the upstream has too many.
    pub fn admit(&self) -> Option<Inflight> {
        let prev = self.ctx.inflight.fetch_add(1, Ordering::Relaxed);
        if prev >= self.settings.max_inflight {
            self.ctx.inflight.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Inflight(self.ctx.clone()))
    }

    pub fn inflight(&self) -> usize {
        self.ctx.inflight.load(Ordering::Relaxed)
    }

    /// A shared connection for this protocol and credentials; starts the pool on first use.
    pub fn shared_conn(&self, proto: Proto, credentials: &Option<Arc<Credentials>>) -> ConnHandle {
        if self.ctx.drain.is_retired() {
            // A session that chose this upstream just before it left the set: one
            // connection for this request, not a pool that nobody would clear again.
            let setup = Setup::new(proto, credentials.clone());
            return conn::spawn_shared(self.ctx.clone(), setup, self.settings.queue_depth);
        }
        let key = PoolKey {
            proto,
            credentials: credentials.clone(),
        };
        let pool = {
            let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
            pools
                .entry(key)
                .or_insert_with(|| {
                    let setup = Setup::new(proto, credentials.clone());
                    let conns = (0..self.settings.connections)
                        .map(|_| {
                            conn::spawn_shared(
                                self.ctx.clone(),
                                setup.clone(),
                                self.settings.queue_depth,
                            )
                        })
                        .collect();
                    Arc::new(Pool {
                        conns,
                        next: AtomicUsize::new(0),
                    })
                })
                .clone()
        };
        let i = pool.next.fetch_add(1, Ordering::Relaxed) % pool.conns.len();
        pool.conns[i].clone()
    }

    /// Holds other traffic to this server back until the blocking command just read is
    /// written (the guard goes into its call).
    pub fn raise_barrier(&self) -> barrier::Raised {
        self.ctx.barrier.raise()
    }

    /// A connection for one client alone: a warm one with this handshake when there is one
    /// (no connect, no round trip), else one opened now.
    pub async fn dedicated(
        &self,
        setup: &Setup,
    ) -> Result<ConnHandle, crate::error::UpstreamError> {
        self.warm.take(setup).await
    }

    /// Gives back a dedicated connection whose server-side state matches `setup` again.
    pub fn release_dedicated(&self, setup: Setup, c: ConnHandle) {
        // A retired upstream keeps nothing: the connection closes once dropped.
        if self.ctx.drain.is_retired() {
            return;
        }
        self.warm.give_back(setup, c);
    }

    /// Dedicated connections ready to be handed out.
    pub fn warm_dedicated(&self) -> usize {
        self.warm.ready()
    }

    /// Whether at least one shared connection is up.
    pub fn is_connected(&self) -> bool {
        self.ctx.connected.load(Ordering::Relaxed) > 0
    }

    /// Starts the default pool (RESP2 with the configured credentials) so that redfuse
    /// connects at start-up rather than on the first command, and keeps dedicated
    /// connections of that handshake warm.
    pub fn warm_up(&self, credentials: &Option<Arc<Credentials>>) {
        let _ = self.shared_conn(Proto::Resp2, credentials);
        self.warm
            .keep(Setup::new(Proto::Resp2, credentials.clone()));
    }
}
