//! Per-upstream circuit breaker.
//!
//! # Design
//!
//! The breaker is split in two layers:
//!
//! * [`Breaker`] is a **pure state machine**: no I/O, no locks, no clock reads,
//!   no logging. Every method that depends on time takes `now` explicitly.
//!   That keeps every rule (trip thresholds, back-off, jitter, permits,
//!   generations) testable to the millisecond with a seeded RNG, and keeps the
//!   questions "what should happen" and "how do many tasks share it" apart.
//! * [`SharedBreaker`] is a thin wrapper used from many tokio tasks: a
//!   `std::sync::Mutex<Breaker>` (held only for a few arithmetic operations,
//!   never across an `.await`), pre-resolved Prometheus handles, a
//!   `tokio::sync::watch` channel announcing state changes, `tracing` logs, and
//!   a timer task. All side effects of a transition happen in this layer, under
//!   the same lock as the transition itself, so gauges, the watch channel and
//!   the log never disagree about ordering.
//!
//! # Why generations
//!
//! A request admitted while Closed may take seconds to fail; by then the
//! breaker may already be Open or probing in HalfOpen. If its late result were
//! allowed to count, one slow pre-outage request could re-open a breaker whose
//! probes are succeeding, or a late success could close it. Every state
//! transition bumps a generation counter, each [`Permit`] carries the
//! generation it was issued under, and [`Breaker::record`] ignores results whose
//! generation is stale. Half-open permit slots also belong to a generation: a
//! transition resets the count, so a wedged probe from an earlier HalfOpen can
//! never hold a slot of a later one.
//!
//! # Why timer-driven
//!
//! Open -> HalfOpen happens when the open period expires, not lazily on the
//! next request: an idle upstream is re-probed (and `/ready`, the cache and
//! the write-queue replay, which watch [`SharedBreaker::subscribe`], learn
//! about it) even when no client traffic arrives, and the jittered schedule is
//! what actually de-synchronises a fleet. The same timer enforces the
//! half-open max wait (so a probe that never answers cannot wedge the
//! breaker), rotates the rolling window buckets (so the rate gauges decay
//! while idle) and resets the back-off after a healthy window.
//! [`Breaker::next_deadline`] says when the timer must next call
//! [`Breaker::poll`]; the timer task started by [`SharedBreaker::spawn_timer`]
//! sleeps until then and is woken through a `Notify` whenever a call changes
//! that deadline. [`Breaker::try_acquire`] never fires timers (it cannot report
//! a transition); [`Breaker::record`] does fire overdue ones first, so a lagging
//! timer never lets a result be judged against an expired state.
//!
//! # What counts
//!
//! * Failure ([`Outcome::Failure`]): connect refused/reset/timeout, per-command
//!   timeout, connection closed with replies pending, malformed reply, and the
//!   error replies `-LOADING`, `-BUSY`, `-MASTERDOWN`, `-CLUSTERDOWN`,
//!   `-TRYAGAIN` (plus `-READONLY` and `-OOM` for writes); see
//!   [`classify_error_reply`].
//! * Success: every other well-formed reply, error replies included. A success
//!   slower than `slow_call_threshold_ms` is also a *slow call*.
//! * Ignored: client cancellations (a dropped [`CallGuard`]) and anything the
//!   caller does not want judged, e.g. the server-side wait of blocking
//!   commands (pass [`Outcome::Ignored`], or a latency that excludes the wait).
//!
//! # Rules
//!
//! * Closed -> Open after `consecutive_failures` failures in a row, or when,
//!   over the rolling window (the current bucket plus the `window/bucket - 1`
//!   previous ones) holding at least `minimum_calls` calls, the failure rate
//!   reaches `failure_rate_threshold` or the slow-call rate (slow successes /
//!   all counted calls) reaches `slow_call_rate_threshold`.
//! * Open lasts `open_base * 2^level`, capped at `open_max`, then multiplied by
//!   `1 + U[0, jitter]`. The jitter is applied *after* the cap, so at the cap a
//!   fleet still spreads its probes (an Open period can therefore last up to
//!   `open_max * (1 + jitter)`). `level` goes up by one on every opening and
//!   returns to 0 once the breaker has spent one full window in Closed.
//! * HalfOpen admits at most `half_open_permits` concurrent probes; it closes
//!   after `success_threshold` probe successes, re-opens on any probe failure,
//!   and re-opens if it has not closed within `half_open_max_wait_ms`.
//! * Every transition clears the rolling window on entry to Closed, so
//!   failures that caused an opening cannot immediately re-trip it.
//!
//! # Fleet advice
//!
//! With `[fleet]` configured, other instances' transitions reach the machine as
//! [`Advice`] (an input like any other, with its own instant): a remote "open" makes the
//! breaker probe at once and trip on the first local failure, or open outright at a
//! quorum; a remote recovery starts probing without waiting out the back-off. Advice never
//! closes a breaker by itself. Rules in `machine/advice.rs`; every transition is handed to
//! a [`TransitionObserver`] (the fleet's publisher) under the lock, in order.
//!
//! # Modes
//!
//! See [`Mode`]. A manual mode change that changes the state is a transition
//! with [`Reason::Manual`]. Leaving `ForceOpen` for `Normal`/`MetricsOnly`
//! goes to HalfOpen, so traffic returns through probes rather than all at once.
//!
//! # Metrics
//!
//! See [`BreakerMetrics`]. `redfuse_breaker_calls_total` counts every completed
//! admitted call by outcome, including calls the state machine ignores (stale
//! generation, shadow calls): it describes traffic, not the breaker's
//! arithmetic. A slow success is counted under **both** `outcome="success"`
//! and `outcome="slow"`, so `success` stays comparable to `failure` and `slow`
//! is a subset of `success`. The rate gauges are refreshed by the timer task at
//! every bucket boundary while the window holds calls, and on every
//! transition; they are not touched on the per-call hot path.
//!
//! # Layout
//!
//! [`classify`] says what a reply or error means for health, [`config`] holds the
//! settings, [`machine`] is the pure state machine (with [`window`], its rolling counts, and
//! `machine/advice.rs`, the fleet's advice), [`metrics`] its Prometheus families, [`shared`]
//! the wrapper many tasks share, and [`action`] names the operator's actions.

pub mod action;
pub mod classify;
pub mod config;
pub mod machine;
pub mod metrics;
pub mod shared;
pub mod window;

pub use action::Action;
pub use classify::{FailureKind, Outcome, ReplyClass, classify_error_reply};
pub use config::BreakerConfig;
pub use machine::{Advice, AdviceEffect, AdvicePolicy, Mode, State, Transition};
pub use metrics::BreakerMetrics;
pub use shared::{CallGuard, SharedBreaker, TransitionObserver};

#[cfg(test)]
mod tests;
