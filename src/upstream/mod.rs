//! Upstream Redis servers: shared pipelined connections, dedicated connections for stateful
//! clients, and what redfuse learned about the server.
//!
//! Shared connections are grouped in pools keyed by what a connection's handshake fixes
//! (protocol version and credentials), so a `HELLO 3` client or one that sent `AUTH` stays
//! multiplexed with its peers instead of needing a connection of its own. A client keeps one
//! shared connection per pool for its lifetime: its commands then reach Redis in the order it
//! sent them, which spreading them over several connections would not guarantee.

pub mod backoff;
pub mod conn;
pub mod probe;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};

use crate::breaker::SharedBreaker;
use crate::config::{Credentials, Role, UpstreamConfig};
use crate::error::UpstreamError;
use crate::metrics::UpstreamMetrics;
use crate::protocol::{Proto, ReplyScanner, reply};
pub use conn::{Call, ConnHandle, Reply, Setup};

/// Everything a connection task needs to know about its upstream.
pub struct UpstreamCtx {
    pub name: Arc<str>,
    pub addr: String,
    pub role: Role,
    pub priority: u32,
    pub weight: u32,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    pub max_nesting_depth: usize,
    pub metrics: UpstreamMetrics,
    /// Shared connections currently connected.
    pub connected: AtomicUsize,
    /// Requests written or queued and not yet answered (the bulkhead counts these).
    pub inflight: AtomicUsize,
    /// Set once a rejection of redfuse's own credentials has been logged.
    pub auth_warned: std::sync::atomic::AtomicBool,
    /// Wakes shared connections out of their reconnect back-off (the probe saw Redis back).
    pub reconnect: tokio::sync::Notify,
    server_info: RwLock<Option<Arc<ServerInfo>>>,
}

impl UpstreamCtx {
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
}

/// Settings common to every upstream.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    pub connections: usize,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    pub max_nesting_depth: usize,
    pub queue_depth: usize,
    /// Bulkhead: the most requests in flight or queued for one upstream.
    pub max_inflight: usize,
}

/// What `HELLO` told us about the server, for answering clients' `HELLO` locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    pub server: Bytes,
    pub version: Bytes,
    pub mode: Bytes,
    pub role: Bytes,
    /// The raw `modules` value as the server sent it.
    pub modules: Bytes,
}

impl Default for ServerInfo {
    fn default() -> Self {
        ServerInfo {
            server: Bytes::from_static(b"redis"),
            version: Bytes::from_static(b"7.0.0"),
            mode: Bytes::from_static(b"standalone"),
            role: Bytes::from_static(b"master"),
            modules: Bytes::from_static(b"*0\r\n"),
        }
    }
}

/// Splits an aggregate frame (array or map) into its children's raw bytes.
fn children(frame: &Bytes) -> Option<Vec<Bytes>> {
    let nl = frame.iter().position(|&b| b == b'\n')?;
    let mut rest = frame.slice(nl + 1..);
    let mut out = Vec::new();
    while !rest.is_empty() {
        let n = ReplyScanner::new().scan(&rest, 64).ok()??;
        out.push(rest.slice(..n));
        rest = rest.slice(n..);
    }
    Some(out)
}

fn decode_string(raw: &[u8]) -> Option<Bytes> {
    use redis_protocol::resp3::decode::complete::decode;
    use redis_protocol::resp3::types::OwnedFrame;
    match decode(raw).ok()??.0 {
        OwnedFrame::BlobString { data, .. } | OwnedFrame::SimpleString { data, .. } => {
            Some(Bytes::from(data))
        }
        OwnedFrame::VerbatimString { data, .. } => Some(Bytes::from(data)),
        _ => None,
    }
}

impl ServerInfo {
    /// Reads a `HELLO` reply (RESP2 array or RESP3 map of field/value pairs).
    pub fn parse(reply: &Bytes) -> Option<ServerInfo> {
        if !matches!(reply.first(), Some(b'*') | Some(b'%')) {
            return None;
        }
        let items = children(reply)?;
        let mut info = ServerInfo::default();
        for pair in items.chunks(2) {
            let [key, value] = pair else { break };
            match &decode_string(key)?[..] {
                b"server" => info.server = decode_string(value)?,
                b"version" => info.version = decode_string(value)?,
                b"mode" => info.mode = decode_string(value)?,
                b"role" => info.role = decode_string(value)?,
                b"modules" => info.modules = value.clone(),
                _ => {}
            }
        }
        Some(info)
    }

    /// The `HELLO` reply Redis would send to a client with this id and protocol.
    pub fn hello_reply(&self, proto: Proto, client_id: u64) -> Bytes {
        let mut b = BytesMut::with_capacity(160);
        match proto {
            Proto::Resp2 => reply::put_header(&mut b, b'*', 14),
            Proto::Resp3 => reply::put_header(&mut b, b'%', 7),
        }
        let field = |b: &mut BytesMut, k: &[u8], v: &[u8]| {
            reply::put_bulk(b, k);
            reply::put_bulk(b, v);
        };
        field(&mut b, b"server", &self.server);
        field(&mut b, b"version", &self.version);
        reply::put_bulk(&mut b, b"proto");
        b.extend_from_slice(&reply::integer(proto.as_u8() as i64));
        reply::put_bulk(&mut b, b"id");
        b.extend_from_slice(&reply::integer(client_id as i64));
        field(&mut b, b"mode", &self.mode);
        field(&mut b, b"role", &self.role);
        reply::put_bulk(&mut b, b"modules");
        b.extend_from_slice(&self.modules);
        b.freeze()
    }
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
    credentials: Option<Credentials>,
}

struct Pool {
    conns: Vec<ConnHandle>,
    next: AtomicUsize,
}

/// Dedicated connections kept for reuse, per handshake.
const IDLE_DEDICATED_PER_SETUP: usize = 16;

/// One upstream Redis server.
pub struct Upstream {
    pub ctx: Arc<UpstreamCtx>,
    pub breaker: SharedBreaker,
    settings: UpstreamSettings,
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    idle: Mutex<HashMap<Setup, Vec<ConnHandle>>>,
}

impl Upstream {
    pub fn new(
        config: &UpstreamConfig,
        settings: UpstreamSettings,
        metrics: UpstreamMetrics,
        breaker: SharedBreaker,
    ) -> Upstream {
        let name: Arc<str> = if config.name.is_empty() {
            config.addr.as_str().into()
        } else {
            config.name.as_str().into()
        };
        let ctx = Arc::new(UpstreamCtx {
            name,
            addr: config.addr.clone(),
            role: config.role,
            priority: config.priority,
            weight: config.weight,
            connect_timeout: settings.connect_timeout,
            command_timeout: settings.command_timeout,
            max_nesting_depth: settings.max_nesting_depth,
            metrics,
            connected: AtomicUsize::new(0),
            inflight: AtomicUsize::new(0),
            reconnect: tokio::sync::Notify::new(),
            auth_warned: std::sync::atomic::AtomicBool::new(false),
            server_info: RwLock::new(None),
        });
        Upstream {
            ctx,
            breaker,
            settings,
            pools: Mutex::new(HashMap::new()),
            idle: Mutex::new(HashMap::new()),
        }
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
    pub fn shared_conn(&self, proto: Proto, credentials: &Option<Credentials>) -> ConnHandle {
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

    /// A connection for one client alone, reused from the idle set when one with the same
    /// handshake is there.
    /// A connection for one client alone, reused from the idle set when one with the same
    /// handshake is there. The flag says whether it is new: only a new one proves the
    /// server answered (for the breaker).
    pub async fn dedicated(&self, setup: &Setup) -> Result<(ConnHandle, bool), UpstreamError> {
        {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(list) = idle.get_mut(setup) {
                while let Some(c) = list.pop() {
                    if !c.is_closed() {
                        return Ok((c, false));
                    }
                }
            }
        }
        let stream = conn::open(&self.ctx, setup).await?;
        Ok((conn::spawn_dedicated(self.ctx.clone(), stream, 1024), true))
    }

    /// Returns a dedicated connection whose server-side state matches `setup` again.
    pub fn release_dedicated(&self, setup: Setup, c: ConnHandle) {
        if c.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.entry(setup).or_default();
        if list.len() < IDLE_DEDICATED_PER_SETUP {
            list.push(c);
        }
    }

    /// Whether at least one shared connection is up.
    pub fn is_connected(&self) -> bool {
        self.ctx.connected.load(Ordering::Relaxed) > 0
    }

    /// Starts the default pool (RESP2 with the configured credentials) so that redfuse
    /// connects at start-up rather than on the first command.
    pub fn warm_up(&self, credentials: &Option<Credentials>) {
        let _ = self.shared_conn(Proto::Resp2, credentials);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hello_and_answers_in_both_protocols() {
        let resp3 = Bytes::from_static(
            b"%7\r\n$6\r\nserver\r\n$5\r\nredis\r\n$7\r\nversion\r\n$6\r\n7.0.15\r\n$5\r\nproto\r\n:3\r\n$2\r\nid\r\n:9\r\n$4\r\nmode\r\n$10\r\nstandalone\r\n$4\r\nrole\r\n$6\r\nmaster\r\n$7\r\nmodules\r\n*0\r\n",
        );
        let info = ServerInfo::parse(&resp3).unwrap();
        assert_eq!(&info.version[..], b"7.0.15");
        let mine = info.hello_reply(Proto::Resp3, 9);
        assert_eq!(mine, resp3);
        let two = info.hello_reply(Proto::Resp2, 4);
        assert!(two.starts_with(b"*14\r\n$6\r\nserver\r\n$5\r\nredis\r\n"));
        assert!(two.ends_with(b"$7\r\nmodules\r\n*0\r\n"));
    }
}
