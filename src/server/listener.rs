//! The client listener: accept, enforce the connection limit, run each client in its own
//! task and tracing span, and drain on shutdown.
//!
//! A refused client gets Redis's own `max number of clients reached` error. On shutdown
//! the listener stops accepting, tells sessions to stop reading, and waits for their
//! in-flight replies up to the drain deadline.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, info, info_span, warn};

use super::{Server, session};

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
        let id = server.next_client_id();
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
