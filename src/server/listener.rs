//! The client listener: accept, enforce the connection limit, run each client in its own
//! task and tracing span, and drain on shutdown.
//!
//! A refused client gets Redis's own `max number of clients reached` error. The limit is
//! `max_clients`, lowered to what the open file limit allows ([`fdlimit`]); should accept
//! still run out of descriptors, a spare one is given up for a moment so that the client
//! gets the same error and a close rather than a connection that hangs (Redis's trick).
//! On shutdown the listener stops accepting, tells sessions to stop reading, and waits for
//! their in-flight replies up to the drain deadline.

pub mod checks;
pub mod fdlimit;

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, info, info_span, warn};

use super::{Server, session};

const MAX_CLIENTS: &[u8] = b"-ERR max number of clients reached\r\n";

/// Redis's answer to a client over the limit: the error, then a close. Written at once
/// when the socket takes it (a fresh socket nearly always does), so that a burst of
/// refused clients does not hold descriptors.
fn refuse(stream: TcpStream) {
    if stream.try_write(MAX_CLIENTS).ok() == Some(MAX_CLIENTS.len()) {
        return;
    }
    let mut stream = stream;
    tokio::spawn(async move {
        let _ = stream.write_all(MAX_CLIENTS).await;
        let _ = stream.shutdown().await;
    });
}

/// Accepts clients until `shutdown` turns true, then drains within the configured deadline.
pub async fn serve(
    server: Arc<Server>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    fdlimit::set_backlog(&listener, fdlimit::TCP_BACKLOG);
    let budget = fdlimit::apply(&server.config);
    let limit = Arc::new(Semaphore::new(budget.max_clients));
    let mut spare = fdlimit::SpareFd::open();
    let mut sessions = JoinSet::new();
    loop {
        while sessions.try_join_next().is_some() {}
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) if fdlimit::is_out_of_fds(&e) && spare.release() => {
                // The client waiting in the backlog gets the error instead of a hang.
                warn!("accept failed: {e}; refusing a client with the max clients error");
                match fdlimit::refuse_pending(&listener, MAX_CLIENTS) {
                    Ok(()) => server.metrics.client_rejected_total.inc(),
                    Err(e) => warn!("cannot refuse the client: {e}"),
                }
                spare.reopen();
                continue;
            }
            Err(e) => {
                // Out of file descriptors and similar: back off briefly instead of spinning.
                warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                spare.reopen();
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            server.metrics.client_rejected_total.inc();
            refuse(stream);
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
