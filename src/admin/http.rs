//! The admin port's HTTP server: hyper's HTTP/1 with a header-read timeout and a cap on
//! connections served at once.
//!
//! A connection that has not sent a whole request head within `admin_header_timeout_ms` is
//! closed (idle keep-alive connections too), and past `admin_max_connections` a new
//! connection is closed as soon as it is accepted, so a flood of half-sent requests costs a
//! bounded number of sockets for a bounded time and cannot starve the client port's file
//! descriptors. Shutdown stops accepting and lets requests in progress finish.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus::IntCounter;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tracing::{debug, warn};

/// How long requests in progress may take to finish once shutdown starts.
const DRAIN: Duration = Duration::from_secs(5);

pub struct Limits {
    pub header_timeout: Duration,
    pub max_connections: usize,
    /// Connections closed at once because `max_connections` were being served.
    pub rejected: IntCounter,
}

pub async fn serve(
    app: Router,
    listener: TcpListener,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let builder = Arc::new(builder);
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, most likely: let some close.
                    warn!("admin port: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            limits.rejected.inc();
            debug!("admin port: too many connections, closing a new one");
            drop(stream);
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let builder = builder.clone();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(DRAIN, conn).await;
                }
            }
        });
    }
    // Every slot back: the connections in progress have ended.
    let _ = tokio::time::timeout(
        DRAIN,
        slots.acquire_many(limits.max_connections.min(u32::MAX as usize) as u32),
    )
    .await;
}
