//! The client-facing half of a session: writes replies in request order.
//!
//! The reader hands over one [`Slot`] per request, in order, the slots of a read burst in
//! one message ([`Slots`]); a slot is either a reply made locally or the receiving end of
//! an upstream reply. The writer resolves slots strictly in
//! order and batches: while the next slot is already resolved its bytes join the same write,
//! so a pipeline of thousands of commands leaves in a few syscalls. A cacheable read the
//! upstream failed is answered in degraded mode where the failure happened (see
//! `ReplyEffect::Fill`); here only a follower whose leader went away unanswered is.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::Server;
use crate::burst;
use crate::cache::Follower;
use crate::degrade::Origin;
use crate::effect::{DegradedRead, FillPlan, OutputBudget};
use crate::error::{Error, Reply, UpstreamError, error_reply};
use crate::metrics::{CommandResult, CommandTally};
use crate::resp::is_error_reply;

pub enum SlotKind {
    Ready(Bytes, Origin),
    /// An upstream reply. A cacheable read's failure arrives already answered from the
    /// cache (`ReplyEffect::Fill`): every way a call ends applies its effect.
    Waiting(oneshot::Receiver<Reply>),
    /// The same read is already in flight; its leader's reply is ours.
    Follower(Follower<Reply>, Option<Box<Fallback>>),
    /// Raw bytes from an upstream connection that became a pipe (pub/sub, MONITOR).
    Stream(mpsc::Receiver<Bytes>),
    /// Close the connection once everything before is written.
    Close,
}

/// How a follower answers its read in degraded mode if its leader's failure reaches it
/// unanswered.
pub struct Fallback {
    pub plan: FillPlan,
    pub read: DegradedRead,
}

pub struct Slot {
    /// Command table id, for the per-command metrics.
    pub command: usize,
    pub kind: SlotKind,
}

impl Slot {
    pub fn ready(command: usize, reply: Bytes) -> Slot {
        Slot {
            command,
            kind: SlotKind::Ready(reply, Origin::Upstream),
        }
    }
}

/// The slots of one client read burst, in request order: one channel message for them all.
pub struct Slots {
    pub slots: Vec<Slot>,
    /// When the burst's bytes arrived: what the client-side latency counts from.
    pub received: Instant,
}

impl crate::burst::Burst for Slots {
    fn items(&self) -> usize {
        self.slots.len()
    }
}

/// Reply slots a client may have outstanding before redfuse stops reading from it: deep
/// enough that a client writing a whole pipeline before reading its replies does not
/// stall. Counted in slots, not messages (a message holds a read burst's slots).
pub const SLOT_ROOM: usize = 16 * 1024;

const BATCH_BYTES: usize = 64 * 1024;

/// Turns an upstream result into the client's reply, falling back to degraded mode for a
/// read the upstream could not answer.
fn resolve(server: &Server, result: Reply, fallback: Option<Box<Fallback>>) -> (Bytes, Origin) {
    match (result, fallback) {
        (Ok(b), _) => (b, Origin::Upstream),
        (Err(UpstreamError::Answered { answer, .. }), _) => {
            let origin = if is_error_reply(&answer) {
                Origin::Error
            } else {
                Origin::Fallback
            };
            (answer, origin)
        }
        (Err(e), Some(f)) if e.is_unavailability() => {
            let r = f.read;
            server
                .degrade
                .cached_answer(r.view, &f.plan, r.command, r.absent, &e, Instant::now())
        }
        (Err(e), _) => (error_reply(&Error::Upstream(e)), Origin::Error),
    }
}

/// Times replies from the arrival of their request's bytes to the reply leaving for the
/// client: what the client sees of redfuse and Redis together. The clock is read again
/// only after the writer waited: replies handled without a wait in between leave
/// together, so one reading (and one subtraction) times all those of one burst.
struct Stopwatch {
    received: Instant,
    clock: Option<Instant>,
    seconds: Option<f64>,
}

impl Stopwatch {
    fn new() -> Stopwatch {
        Stopwatch {
            received: Instant::now(),
            clock: None,
            seconds: None,
        }
    }

    /// The writer waited: the replies after this leave later.
    fn waited(&mut self) {
        self.clock = None;
        self.seconds = None;
    }

    /// The replies after this answer requests that arrived at `received`.
    fn burst(&mut self, received: Instant) {
        if received != self.received {
            self.received = received;
            self.seconds = None;
        }
    }

    fn seconds(&mut self) -> f64 {
        *self.seconds.get_or_insert_with(|| {
            let now = *self.clock.get_or_insert_with(Instant::now);
            now.saturating_duration_since(self.received).as_secs_f64()
        })
    }
}

/// Writes replies until the client is gone, everything is written, or the client's output
/// budget is exceeded (its pending replies are then dropped and it is disconnected).
pub async fn write_replies(
    wr: OwnedWriteHalf,
    slots: burst::Receiver<Slots>,
    server: Arc<Server>,
    output: Arc<OutputBudget>,
) {
    tokio::select! {
        _ = write_loop(wr, slots, &server, &output) => {}
        // The writer is stuck on a client that does not read: stop holding its replies.
        _ = output.exceeded() => {}
    }
}

async fn write_loop(
    mut wr: OwnedWriteHalf,
    mut slots: burst::Receiver<Slots>,
    server: &Server,
    output: &OutputBudget,
) {
    let metrics = &server.metrics;
    let mut tally = CommandTally::new(metrics);
    let mut out = BytesMut::with_capacity(16 * 1024);
    let mut watch = Stopwatch::new();
    let mut batch = Vec::new().into_iter();
    loop {
        let slot = match batch.next() {
            Some(slot) => slot,
            None => {
                let next = match slots.try_recv() {
                    Some(next) => next,
                    None => {
                        if flush(&mut wr, &mut out, &mut tally).await.is_err() {
                            return;
                        }
                        watch.waited();
                        match slots.recv().await {
                            Some(next) => next,
                            None => break,
                        }
                    }
                };
                watch.burst(next.received);
                batch = next.slots.into_iter();
                continue;
            }
        };
        let (reply, origin) = match slot.kind {
            SlotKind::Ready(b, origin) => (b, origin),
            SlotKind::Waiting(mut rx) => {
                let result = match rx.try_recv() {
                    Ok(r) => r,
                    Err(oneshot::error::TryRecvError::Empty) => {
                        if flush(&mut wr, &mut out, &mut tally).await.is_err() {
                            return;
                        }
                        watch.waited();
                        rx.await.unwrap_or_else(|_| Err(dropped()))
                    }
                    Err(oneshot::error::TryRecvError::Closed) => Err(dropped()),
                };
                if let Ok(b) = &result {
                    output.sub(b.len());
                }
                resolve(server, result, None)
            }
            SlotKind::Follower(follower, fallback) => {
                // Usually the leader's reply is already in: no flush, no wake-up.
                let result = match follower.try_take() {
                    Ok(v) => v,
                    Err(follower) => {
                        if flush(&mut wr, &mut out, &mut tally).await.is_err() {
                            return;
                        }
                        watch.waited();
                        follower.await
                    }
                };
                resolve(server, result.unwrap_or_else(|| Err(dropped())), fallback)
            }
            SlotKind::Stream(mut rx) => {
                if flush(&mut wr, &mut out, &mut tally).await.is_err() {
                    return;
                }
                while let Some(chunk) = rx.recv().await {
                    metrics.bytes_sent.inc_by(chunk.len() as u64);
                    if wr.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
                // The pipe's upstream side closed (Redis restarted, killed the client, or
                // answered QUIT): so does the client's, as it would talking to Redis.
                break;
            }
            SlotKind::Close => break,
        };
        let result = if is_error_reply(&reply) {
            CommandResult::Error
        } else {
            CommandResult::Ok
        };
        tally.record(slot.command, result, origin, watch.seconds());
        if reply.len() >= BATCH_BYTES {
            if flush(&mut wr, &mut out, &mut tally).await.is_err() {
                return;
            }
            metrics.bytes_sent.inc_by(reply.len() as u64);
            if wr.write_all(&reply).await.is_err() {
                return;
            }
            watch.waited();
        } else {
            out.extend_from_slice(&reply);
            if out.len() >= BATCH_BYTES {
                if flush(&mut wr, &mut out, &mut tally).await.is_err() {
                    return;
                }
                watch.waited();
            }
        }
    }
    let _ = flush(&mut wr, &mut out, &mut tally).await;
    let _ = wr.shutdown().await;
}

fn dropped() -> UpstreamError {
    UpstreamError::Closed {
        upstream: "(request abandoned)".into(),
    }
}

/// Writes what `out` holds, and adds what `tally` recorded to the metrics.
async fn flush(
    wr: &mut OwnedWriteHalf,
    out: &mut BytesMut,
    tally: &mut CommandTally<'_>,
) -> std::io::Result<()> {
    tally.flush();
    if out.is_empty() {
        return Ok(());
    }
    tally.metrics().bytes_sent.inc_by(out.len() as u64);
    let r = wr.write_all(out).await;
    out.clear();
    r
}

#[cfg(test)]
mod tests {
    use super::Stopwatch;
    use std::time::Duration;
    use tokio::time::{Instant, advance};

    /// Replies written in one go are timed by one clock reading; a wait reads it again, and
    /// a new burst counts from its own arrival.
    #[tokio::test(start_paused = true)]
    async fn a_stopwatch_reads_the_clock_again_only_after_a_wait() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut watch = Stopwatch::new();
        watch.burst(t0);
        advance(ms(5)).await;
        assert_eq!(watch.seconds(), 0.005);
        advance(ms(5)).await;
        assert_eq!(
            watch.seconds(),
            0.005,
            "no wait in between: the same reading"
        );
        watch.burst(t0 + ms(2));
        assert_eq!(watch.seconds(), 0.003, "a new burst, the same reading");
        watch.waited();
        assert_eq!(watch.seconds(), 0.008);
        watch.burst(t0 + ms(2));
        advance(ms(1)).await;
        assert_eq!(
            watch.seconds(),
            0.008,
            "the same burst again changes nothing"
        );
    }
}
