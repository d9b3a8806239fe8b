//! The client-facing half of a session: writes replies in request order.
//!
//! The reader pushes one [`Slot`] per request, in order; a slot is either a reply made
//! locally or the receiving end of an upstream reply. The writer resolves slots strictly in
//! order and batches: while the next slot is already resolved its bytes join the same write,
//! so a pipeline of thousands of commands leaves in a few syscalls.

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, error_reply};
use crate::metrics::{CommandResult, Metrics};
use crate::protocol::is_error_reply;
use crate::upstream::Reply;

pub enum SlotKind {
    Ready(Bytes),
    Waiting(oneshot::Receiver<Reply>),
    /// Raw bytes from an upstream connection that became a pipe (pub/sub, MONITOR).
    Stream(mpsc::Receiver<Bytes>),
    /// Close the connection once everything before is written.
    Close,
}

pub struct Slot {
    /// Command table id, for the per-command metric.
    pub command: usize,
    pub kind: SlotKind,
}

impl Slot {
    pub fn ready(command: usize, reply: Bytes) -> Slot {
        Slot {
            command,
            kind: SlotKind::Ready(reply),
        }
    }
}

const BATCH_BYTES: usize = 64 * 1024;

pub async fn write_replies(
    mut wr: OwnedWriteHalf,
    mut slots: mpsc::Receiver<Slot>,
    metrics: &Metrics,
) {
    let mut out = BytesMut::with_capacity(16 * 1024);
    loop {
        let slot = match slots.try_recv() {
            Ok(slot) => slot,
            Err(_) => {
                if flush(&mut wr, &mut out, metrics).await.is_err() {
                    return;
                }
                match slots.recv().await {
                    Some(slot) => slot,
                    None => break,
                }
            }
        };
        let reply = match slot.kind {
            SlotKind::Ready(b) => b,
            SlotKind::Waiting(mut rx) => {
                let result = match rx.try_recv() {
                    Ok(r) => Ok(r),
                    Err(oneshot::error::TryRecvError::Empty) => {
                        if flush(&mut wr, &mut out, metrics).await.is_err() {
                            return;
                        }
                        rx.await.map_err(|_| ())
                    }
                    Err(oneshot::error::TryRecvError::Closed) => Err(()),
                };
                match result {
                    Ok(Ok(b)) => b,
                    Ok(Err(e)) => error_reply(&Error::Upstream(e)),
                    Err(()) => error_reply(&Error::Internal("reply dropped".into())),
                }
            }
            SlotKind::Stream(mut rx) => {
                if flush(&mut wr, &mut out, metrics).await.is_err() {
                    return;
                }
                while let Some(chunk) = rx.recv().await {
                    metrics.bytes_sent.inc_by(chunk.len() as u64);
                    if wr.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
                continue;
            }
            SlotKind::Close => break,
        };
        let result = if is_error_reply(&reply) {
            CommandResult::Error
        } else {
            CommandResult::Ok
        };
        metrics.count_command(slot.command, result);
        if reply.len() >= BATCH_BYTES {
            if flush(&mut wr, &mut out, metrics).await.is_err() {
                return;
            }
            metrics.bytes_sent.inc_by(reply.len() as u64);
            if wr.write_all(&reply).await.is_err() {
                return;
            }
        } else {
            out.extend_from_slice(&reply);
            if out.len() >= BATCH_BYTES && flush(&mut wr, &mut out, metrics).await.is_err() {
                return;
            }
        }
    }
    let _ = flush(&mut wr, &mut out, metrics).await;
    let _ = wr.shutdown().await;
}

async fn flush(
    wr: &mut OwnedWriteHalf,
    out: &mut BytesMut,
    metrics: &Metrics,
) -> std::io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    metrics.bytes_sent.inc_by(out.len() as u64);
    let r = wr.write_all(out).await;
    out.clear();
    r
}
