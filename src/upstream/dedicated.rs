//! Warm dedicated connections: a few connected, authenticated connections per handshake
//! (protocol and credentials), ready for a client that needs a connection of its own.
//!
//! Why: a client entering a blocking command or a transaction used to wait for a connect,
//! a handshake and credentials before its command could leave, while another client's
//! command went straight out on a shared connection. A `BLPOP` sent just before another
//! client's `LPUSH` then reached Redis after it, and blocked forever. Taking a warm
//! connection costs nothing that can be overtaken.
//!
//! The set is bounded ([`WARM_PER_SETUP`] per handshake, [`MAX_SETUPS`] handshakes),
//! refilled in the background after each take, and a handshake nobody used for
//! [`IDLE_AFTER`] is let go (its connections close), except the default one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::UpstreamCtx;
use super::conn::{self, ConnHandle};
use super::handshake::{Setup, open};
use crate::error::UpstreamError;

/// Connections kept ready per handshake.
pub const WARM_PER_SETUP: usize = 2;
/// Handshakes kept warm at most.
pub const MAX_SETUPS: usize = 32;
/// A handshake unused this long is no longer kept warm.
pub const IDLE_AFTER: Duration = Duration::from_secs(60);
/// Requests a dedicated connection queues before its client waits.
const DEPTH: usize = 1024;

pub struct WarmSet {
    ctx: Arc<UpstreamCtx>,
    state: Mutex<HashMap<Setup, Warm>>,
}

struct Warm {
    ready: Vec<ConnHandle>,
    /// Opens under way.
    filling: usize,
    last_used: Instant,
    /// Kept warm even when idle (the default handshake).
    pinned: bool,
}

impl WarmSet {
    pub fn new(ctx: Arc<UpstreamCtx>) -> WarmSet {
        WarmSet {
            ctx,
            state: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Setup, Warm>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `setup` warm for good and starts filling it.
    pub fn keep(self: &Arc<Self>, setup: Setup) {
        self.lock()
            .entry(setup.clone())
            .or_insert_with(|| Warm::new(true))
            .pinned = true;
        self.refill(&setup);
    }

    /// A ready connection for `setup`, or one opened now.
    pub async fn take(self: &Arc<Self>, setup: &Setup) -> Result<ConnHandle, UpstreamError> {
        let warmable = setup.db == 0 && setup.client_name.is_none();
        if warmable {
            let found = {
                let mut state = self.lock();
                self.expire(&mut state);
                if !state.contains_key(setup) && state.len() >= MAX_SETUPS {
                    None
                } else {
                    let warm = state
                        .entry(setup.clone())
                        .or_insert_with(|| Warm::new(false));
                    warm.last_used = Instant::now();
                    warm.ready.retain(|c| !c.is_closed());
                    warm.ready.pop()
                }
            };
            self.refill(setup);
            if let Some(c) = found {
                self.ctx.metrics.dedicated_warm_hits.inc();
                return Ok(c);
            }
        }
        self.ctx.metrics.dedicated_opened.inc();
        let stream = open(&self.ctx, setup).await?;
        Ok(conn::spawn_dedicated(self.ctx.clone(), stream, DEPTH))
    }

    /// A connection back in the state `setup` describes.
    pub fn give_back(&self, setup: Setup, c: ConnHandle) {
        if c.is_closed() || setup.db != 0 || setup.client_name.is_some() {
            return;
        }
        let mut state = self.lock();
        if let Some(warm) = state.get_mut(&setup)
            && warm.ready.len() < WARM_PER_SETUP
        {
            warm.ready.push(c);
        }
    }

    /// Opens connections in the background until `setup` has its share ready.
    fn refill(self: &Arc<Self>, setup: &Setup) {
        let missing = {
            let mut state = self.lock();
            let Some(warm) = state.get_mut(setup) else {
                return;
            };
            let missing = WARM_PER_SETUP.saturating_sub(warm.ready.len() + warm.filling);
            warm.filling += missing;
            missing
        };
        for _ in 0..missing {
            let weak: Weak<WarmSet> = Arc::downgrade(self);
            let setup = setup.clone();
            let ctx = self.ctx.clone();
            tokio::spawn(async move {
                let opened = open(&ctx, &setup).await;
                let Some(set) = weak.upgrade() else { return };
                let mut state = set.lock();
                let Some(warm) = state.get_mut(&setup) else {
                    return;
                };
                warm.filling -= 1;
                // A failure waits for the next take: the breaker and the probe, not this
                // loop, are what watch an unhealthy server.
                if let Ok(stream) = opened
                    && warm.ready.len() < WARM_PER_SETUP
                {
                    warm.ready
                        .push(conn::spawn_dedicated(ctx.clone(), stream, DEPTH));
                }
            });
        }
    }

    /// Lets go of handshakes nobody used for a while (their connections close).
    fn expire(&self, state: &mut HashMap<Setup, Warm>) {
        state.retain(|_, w| w.pinned || w.filling > 0 || w.last_used.elapsed() < IDLE_AFTER);
    }

    /// Lets go of every warm connection and stops keeping any (the upstream left the set).
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// Connections ready now, for tests and the status page.
    pub fn ready(&self) -> usize {
        self.lock()
            .values_mut()
            .map(|w| {
                w.ready.retain(|c| !c.is_closed());
                w.ready.len()
            })
            .sum()
    }
}

impl Warm {
    fn new(pinned: bool) -> Warm {
        Warm {
            ready: Vec::new(),
            filling: 0,
            last_used: Instant::now(),
            pinned,
        }
    }
}
