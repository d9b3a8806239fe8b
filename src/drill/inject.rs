//! The hot path of drills: is one active, does it pick this request, and what it does.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use rand::RngExt;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{Drill, Kind};
use crate::breaker::classify_error_reply;
use crate::error::{ConnectFailure, UpstreamError};
use crate::upstream::UpstreamCtx;
use crate::upstream::conn::{Call, outcome_of_error};

/// Set while at least one drill is active: the only cost of drills on the data path.
static ARMED: AtomicBool = AtomicBool::new(false);
static ACTIVE: RwLock<Vec<Arc<Drill>>> = RwLock::new(Vec::new());

/// Whether any drill is active. One relaxed load: call it before anything else here.
#[inline]
pub fn armed() -> bool {
    ARMED.load(Ordering::Relaxed)
}

pub(super) fn activate(drill: Arc<Drill>, max: usize) -> bool {
    let mut all = ACTIVE.write().unwrap_or_else(|e| e.into_inner());
    if all.len() >= max {
        return false;
    }
    all.push(drill);
    ARMED.store(true, Ordering::Relaxed);
    true
}

pub(super) fn active() -> Vec<Arc<Drill>> {
    ACTIVE.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Keeps the drills `keep` says; returns the others.
pub(super) fn retain(keep: impl Fn(&Drill) -> bool) -> Vec<Arc<Drill>> {
    let mut all = ACTIVE.write().unwrap_or_else(|e| e.into_inner());
    let (kept, ended): (Vec<_>, Vec<_>) = all.drain(..).partition(|d| keep(d));
    *all = kept;
    ARMED.store(!all.is_empty(), Ordering::Relaxed);
    ended
}

/// The drill that picks a request to `upstream` now, if any (each rolls its share).
pub(super) fn pick(upstream: &str) -> Option<Arc<Drill>> {
    let now = Instant::now();
    let all = ACTIVE.read().unwrap_or_else(|e| e.into_inner());
    let mut rng = rand::rng();
    all.iter()
        .filter(|d| d.until > now && d.spec.upstream == upstream)
        .find(|d| d.spec.share >= 1.0 || rng.random_range(0.0..1.0) < d.spec.share)
        .cloned()
}

fn refused(ctx: &UpstreamCtx) -> UpstreamError {
    UpstreamError::Connect {
        upstream: ctx.name.clone(),
        failure: ConnectFailure::Refused,
        reason: "connection refused (redfuse drill)".into(),
    }
}

/// Called where a request is handed to an upstream connection: `Some(call)` to send it
/// (perhaps with its reply delayed), `None` when the drill has answered it.
pub async fn intercept(ctx: &Arc<UpstreamCtx>, call: Box<Call>) -> Option<Box<Call>> {
    // Ordering fences carry no permit; a blocking command's wait is the client's choice.
    if call.guard.is_none() || call.blocking {
        return Some(call);
    }
    let Some(drill) = pick(&ctx.name) else {
        return Some(call);
    };
    drill.injected.inc();
    match drill.spec.kind {
        Kind::Refuse => {
            call.fail(ctx, refused(ctx));
            None
        }
        Kind::Error => {
            answer(ctx, call, drill.frame.clone());
            None
        }
        Kind::Delay => Some(delayed(ctx, call, drill.delay)),
    }
}

/// Answers a call with `frame` as if Redis had sent it at once.
fn answer(ctx: &UpstreamCtx, call: Box<Call>, frame: Bytes) {
    if let Some(g) = call.guard {
        g.complete(classify_error_reply(&frame, call.is_write).outcome(Duration::ZERO));
    }
    // The writer takes every reply frame back off the budget.
    if let Some(budget) = &call.output {
        budget.add(frame.len());
    }
    let mut result = Ok(frame);
    if let Some(e) = call.effect {
        ctx.sink.apply(e, &mut result, None);
    }
    let _ = call.reply.send(result);
}

/// Sends the call, and hands its reply on `delay` later, judged by the breaker with the
/// delay in its latency; past the command timeout it becomes the timeout a server this
/// slow would cause.
fn delayed(ctx: &Arc<UpstreamCtx>, mut call: Box<Call>, delay: Duration) -> Box<Call> {
    let guard = call.guard.take();
    let effect = call.effect.take();
    let output = call.output.as_ref().map(|o| o.budget().clone());
    let (tx, rx) = oneshot::channel();
    let client = std::mem::replace(&mut call.reply, tx);
    let is_write = call.is_write;
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let sent = Instant::now();
        let got = rx.await.unwrap_or_else(|_| {
            Err(UpstreamError::Closed {
                upstream: ctx.name.clone(),
            })
        });
        let service = sent.elapsed();
        let timeout = ctx.command_timeout;
        let mut result = if service + delay >= timeout {
            tokio::time::sleep_until(sent + timeout).await;
            if let (Ok(frame), Some(budget)) = (&got, &output) {
                budget.sub(frame.len());
            }
            Err(UpstreamError::Timeout {
                upstream: ctx.name.clone(),
                timeout,
            })
        } else {
            tokio::time::sleep(delay).await;
            got
        };
        if let Some(g) = guard {
            g.complete(match &result {
                Ok(frame) => classify_error_reply(frame, is_write).outcome(service + delay),
                Err(e) => outcome_of_error(e),
            });
        }
        // Delayed apart from its connection's other replies: from no connection.
        if let Some(e) = effect {
            ctx.sink.apply(e, &mut result, None);
        }
        let _ = client.send(result);
    });
    call
}

/// What a drill does to a health probe.
pub enum ProbeFault {
    /// Answer the probe with this frame.
    Reply(Bytes),
    Refused(UpstreamError),
}

/// Called before the health probe asks `ctx`'s server: delays it (inside the probe's own
/// timeout), or says what the server "answered".
pub async fn probe(ctx: &UpstreamCtx) -> Option<ProbeFault> {
    let drill = pick(&ctx.name)?;
    drill.injected.inc();
    match drill.spec.kind {
        Kind::Delay => {
            tokio::time::sleep(drill.delay).await;
            None
        }
        Kind::Error => Some(ProbeFault::Reply(drill.frame.clone())),
        Kind::Refuse => Some(ProbeFault::Refused(refused(ctx))),
    }
}
