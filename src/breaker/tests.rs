//! Tests of the breaker: the state machine under paused time, the shared wrapper, metrics.

use super::classify::*;
use super::config::*;
use super::machine::*;
use super::metrics::*;
use super::shared::*;
use std::sync::Arc;
use std::time::Duration;

use prometheus::Registry;
use tokio::sync::watch;
use tokio::time::Instant;

use prometheus::proto::MetricType;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};

const TIMEOUT: Outcome = Outcome::Failure(FailureKind::CommandTimeout);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}
fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}
fn fast() -> Outcome {
    Outcome::Success { latency: ms(5) }
}
fn slow() -> Outcome {
    Outcome::Success { latency: ms(300) }
}
fn no_jitter() -> BreakerConfig {
    BreakerConfig {
        jitter: 0.0,
        ..BreakerConfig::default()
    }
}

/// One admitted call, recorded at the same instant.
fn call(b: &mut Breaker, outcome: Outcome, now: Instant) -> Option<Transition> {
    let p = b.try_acquire(now).expect("call should be admitted");
    b.record(p, outcome, now)
}

/// Trips a Closed breaker with consecutive failures at `now`.
fn trip(b: &mut Breaker, now: Instant) -> Transition {
    for _ in 1..b.config().consecutive_failures {
        assert_eq!(call(b, TIMEOUT, now), None);
    }
    let t = call(b, TIMEOUT, now).expect("the last failure trips");
    assert_eq!((t.from, t.to), (State::Closed, State::Open));
    t
}

/// Fires the Open timer exactly at its deadline; returns that instant.
fn to_half_open(b: &mut Breaker) -> Instant {
    let at = b.next_deadline().expect("Open has a deadline");
    assert_eq!(b.poll(at - ms(1)), None, "must not fire early");
    let t = b.poll(at).expect("timer fires at the deadline");
    assert_eq!((t.from, t.to), (State::Open, State::HalfOpen));
    assert_eq!(t.reason.as_str(), "open_timeout");
    at
}

fn probe_fail(b: &mut Breaker, now: Instant) -> Transition {
    let p = b.try_acquire(now).expect("probe admitted");
    assert!(p.is_probe());
    b.record(p, TIMEOUT, now).expect("probe failure re-opens")
}

fn probe_ok(b: &mut Breaker, now: Instant) -> Option<Transition> {
    let p = b.try_acquire(now).expect("probe admitted");
    assert!(p.is_probe());
    b.record(p, fast(), now)
}

async fn settle() {
    for _ in 0..16 {
        tokio::task::yield_now().await;
    }
}

fn shared(name: &str, config: BreakerConfig) -> (SharedBreaker, Registry) {
    let registry = Registry::new();
    let metrics = BreakerMetrics::register(&registry).expect("register");
    let sb = SharedBreaker::new(name, config, 42, metrics.for_upstream(name));
    (sb, registry)
}

fn metric(reg: &Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    for family in reg.gather() {
        if family.name() != name {
            continue;
        }
        for m in family.get_metric() {
            let matches = labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|lp| lp.name() == *k && lp.value() == *v)
            });
            if matches {
                return match family.get_field_type() {
                    MetricType::COUNTER => m.get_counter().get_value(),
                    MetricType::GAUGE => m.get_gauge().get_value(),
                    other => panic!("unexpected metric type {other:?}"),
                };
            }
        }
    }
    panic!("no series {name} {labels:?}");
}

// -- Closed -> Open -------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn consecutive_failures_trip() {
    let t0 = Instant::now();
    let mut b = Breaker::new(no_jitter(), 1);
    for i in 1..5 {
        assert_eq!(call(&mut b, TIMEOUT, t0 + ms(i)), None);
    }
    assert_eq!(b.state(), State::Closed);
    assert_eq!(b.snapshot(t0 + ms(4)).consecutive_failures, 4);
    let t = call(&mut b, TIMEOUT, t0 + ms(5)).expect("5th failure trips");
    assert_eq!(t.from, State::Closed);
    assert_eq!(t.to, State::Open);
    assert_eq!(
        t.reason,
        Reason::ConsecutiveFailures {
            count: 5,
            threshold: 5
        }
    );
    assert_eq!(t.generation, 1);
    assert_eq!(t.open_for, Some(secs(5)));
    assert_eq!(b.state(), State::Open);
    assert_eq!(b.generation(), 1);
}

#[tokio::test(start_paused = true)]
async fn failure_rate_trip_needs_minimum_calls() {
    let t0 = Instant::now();
    let mut b = Breaker::new(no_jitter(), 1);
    // Alternating, so the consecutive rule never fires: F S F S ... F.
    for i in 0..19u64 {
        let o = if i % 2 == 0 { TIMEOUT } else { fast() };
        assert_eq!(call(&mut b, o, t0 + ms(i * 10)), None, "call {i}");
    }
    let s = b.snapshot(t0 + ms(190));
    assert_eq!((s.calls_in_window, s.failures_in_window), (19, 10));
    assert!(
        s.failure_rate > 0.5,
        "above threshold yet below minimum_calls"
    );
    assert_eq!(b.state(), State::Closed);
    // 20th call: 10/20 reaches exactly 0.5.
    let t = call(&mut b, fast(), t0 + ms(200)).expect("trips at minimum_calls");
    assert_eq!(
        t.reason,
        Reason::FailureRate {
            rate: 0.5,
            threshold: 0.5,
            calls: 20
        }
    );
    assert_eq!(b.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn failure_rate_below_threshold_does_not_trip() {
    let t0 = Instant::now();
    let mut b = Breaker::new(no_jitter(), 1);
    // 9 failures in 20 calls (45%), never 5 in a row.
    for i in 0..20u64 {
        let o = if i % 2 == 0 && i < 18 {
            TIMEOUT
        } else {
            fast()
        };
        assert_eq!(call(&mut b, o, t0), None, "call {i}");
    }
    let s = b.snapshot(t0);
    assert_eq!((s.calls_in_window, s.failures_in_window), (20, 9));
    assert_eq!(b.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn slow_call_rate_trip() {
    let t0 = Instant::now();
    let mut b = Breaker::new(no_jitter(), 1);
    for _ in 0..4 {
        assert_eq!(call(&mut b, fast(), t0), None);
    }
    for i in 0..15 {
        assert_eq!(call(&mut b, slow(), t0), None, "slow call {i}");
    }
    let s = b.snapshot(t0);
    assert_eq!((s.calls_in_window, s.slow_calls_in_window), (19, 15));
    let t = call(&mut b, slow(), t0).expect("16/20 slow reaches 0.8");
    assert_eq!(
        t.reason,
        Reason::SlowCallRate {
            rate: 0.8,
            threshold: 0.8,
            calls: 20
        }
    );
    assert_eq!(b.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn slow_means_strictly_slower_than_threshold() {
    let t0 = Instant::now();
    let mut b = Breaker::new(no_jitter(), 1);
    call(&mut b, Outcome::Success { latency: ms(250) }, t0);
    assert_eq!(b.snapshot(t0).slow_calls_in_window, 0);
    call(&mut b, Outcome::Success { latency: ms(251) }, t0);
    assert_eq!(b.snapshot(t0).slow_calls_in_window, 1);
}

#[tokio::test(start_paused = true)]
async fn success_resets_consecutive_count_but_not_window() {
    let t0 = Instant::now();
    let mut b = Breaker::new(no_jitter(), 1);
    for _ in 0..4 {
        assert_eq!(call(&mut b, TIMEOUT, t0), None);
    }
    assert_eq!(call(&mut b, fast(), t0), None);
    assert_eq!(b.snapshot(t0).consecutive_failures, 0);
    for _ in 0..4 {
        assert_eq!(call(&mut b, TIMEOUT, t0), None);
    }
    let s = b.snapshot(t0);
    assert_eq!(b.state(), State::Closed);
    assert_eq!(s.consecutive_failures, 4);
    assert_eq!((s.calls_in_window, s.failures_in_window), (9, 8));
    assert!((s.failure_rate - 8.0 / 9.0).abs() < 1e-9);
    let t = call(&mut b, TIMEOUT, t0).expect("fifth in a row trips");
    assert_eq!(t.reason.as_str(), "consecutive_failures");
}

#[tokio::test(start_paused = true)]
async fn window_rolls_old_buckets_out() {
    let t0 = Instant::now();
    let mut b = Breaker::new(no_jitter(), 1);
    // 10 failures in 19 calls, all in bucket 0.
    for i in 0..19u64 {
        let o = if i % 2 == 0 { TIMEOUT } else { fast() };
        assert_eq!(call(&mut b, o, t0), None);
    }
    // Rotation is timer work: the window holds calls, so a deadline is
    // due at the first bucket boundary, then at the next one.
    assert_eq!(b.next_deadline(), Some(t0 + secs(1)));
    assert_eq!(b.poll(t0 + secs(1)), None);
    assert_eq!(b.next_deadline(), Some(t0 + secs(2)));
    // Bucket 0 is still inside the 10 s window until bucket 10 begins.
    assert_eq!(b.snapshot(t0 + ms(9_999)).calls_in_window, 19);
    assert_eq!(b.snapshot(t0 + secs(10)).calls_in_window, 0);
    // With bucket 0 still counted this would be 11/20 and trip.
    assert_eq!(call(&mut b, TIMEOUT, t0 + secs(10)), None);
    let s = b.snapshot(t0 + secs(10));
    assert_eq!((s.calls_in_window, s.failures_in_window), (1, 1));
    assert_eq!(b.state(), State::Closed);
    // Once everything has rolled out the breaker needs no timer.
    assert_eq!(b.poll(t0 + secs(20)), None);
    assert_eq!(b.snapshot(t0 + secs(20)).calls_in_window, 0);
    assert_eq!(b.next_deadline(), None);
}

#[tokio::test(start_paused = true)]
async fn window_keeps_recent_buckets() {
    let t0 = Instant::now();
    let mut b = Breaker::new(no_jitter(), 1);
    call(&mut b, TIMEOUT, t0);
    call(&mut b, fast(), t0 + secs(5));
    call(&mut b, fast(), t0 + ms(9_500));
    assert_eq!(b.snapshot(t0 + ms(9_999)).calls_in_window, 3);
    let s = b.snapshot(t0 + secs(10));
    assert_eq!((s.calls_in_window, s.failures_in_window), (2, 0));
    assert_eq!(b.snapshot(t0 + secs(15)).calls_in_window, 1);
}

// -- Open ------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn open_rejects_until_timer() {
    let t0 = Instant::now();
    let mut b = Breaker::new(no_jitter(), 1);
    trip(&mut b, t0);
    let r = b.try_acquire(t0 + secs(1)).expect_err("Open rejects");
    assert_eq!(r.state, State::Open);
    assert_eq!(r.mode, Mode::Normal);
    assert_eq!(r.retry_after, Some(secs(4)));
    assert!(b.try_acquire(t0 + ms(4_999)).is_err());
    // try_acquire never fires the timer itself, even once it is due.
    assert!(b.try_acquire(t0 + secs(6)).is_err());
    assert_eq!(b.state(), State::Open);
    assert_eq!(b.next_deadline(), Some(t0 + secs(5)));
    assert_eq!(b.snapshot(t0 + secs(1)).next_probe_in_seconds, Some(4.0));
}

#[tokio::test(start_paused = true)]
async fn open_to_half_open_fires_via_timer_task_without_requests() {
    let (sb, registry) = shared("primary", no_jitter());
    let timer = sb.spawn_timer(std::future::pending());
    // Let the timer go to sleep with no deadline, so the trip below must
    // wake it through the Notify.
    settle().await;
    let mut rx = sb.subscribe();
    for _ in 0..5 {
        sb.try_acquire()
            .expect("closed admits")
            .failure(FailureKind::ConnectRefused);
    }
    assert_eq!(sb.state(), State::Open);
    assert!(rx.has_changed().unwrap());
    assert_eq!(*rx.borrow_and_update(), State::Open);

    tokio::time::advance(ms(4_999)).await;
    settle().await;
    assert_eq!(sb.state(), State::Open);
    assert!(!rx.has_changed().unwrap());

    tokio::time::advance(ms(1)).await;
    settle().await;
    assert_eq!(sb.state(), State::HalfOpen);
    assert!(rx.has_changed().unwrap());
    assert_eq!(*rx.borrow_and_update(), State::HalfOpen);
    let labels = [
        ("upstream", "primary"),
        ("from", "open"),
        ("to", "half_open"),
        ("reason", "open_timeout"),
    ];
    assert_eq!(
        metric(&registry, "redfuse_breaker_transitions_total", &labels),
        1.0
    );
    assert_eq!(
        metric(&registry, "redfuse_breaker_rejected_total", &[]),
        0.0
    );
    timer.abort();
}

#[tokio::test(start_paused = true)]
async fn jitter_bounds_and_seeds() {
    let t0 = Instant::now();
    let open_for = |seed: u64| {
        let mut b = Breaker::new(BreakerConfig::default(), seed);
        let t = trip(&mut b, t0);
        let d = t.open_for.expect("timer armed");
        assert_eq!(b.next_deadline(), Some(t0 + d));
        d
    };
    let durations: Vec<Duration> = (0..64).map(open_for).collect();
    for d in &durations {
        assert!(*d >= secs(5) && *d <= secs(6), "{d:?} outside [5s, 6s]");
    }
    assert_ne!(
        durations[1], durations[2],
        "different seeds, different durations"
    );
    let distinct: HashSet<_> = durations.iter().collect();
    assert!(distinct.len() > 32, "jitter is spread: {}", distinct.len());
    assert_eq!(open_for(1), durations[1], "same seed, same duration");

    // At the cap the jitter still applies on top of open_max.
    let mut b = Breaker::new(BreakerConfig::default(), 9);
    trip(&mut b, t0);
    for expected in [10u64, 20, 40, 60, 60, 60] {
        let now = to_half_open(&mut b);
        let d = probe_fail(&mut b, now).open_for.expect("timer armed");
        let lo = secs(expected);
        assert!(d >= lo && d <= lo.mul_f64(1.2), "{d:?} vs {lo:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn backoff_doubles_on_reopen_and_caps() {
    let t0 = Instant::now();
    let mut b = Breaker::new(no_jitter(), 3);
    assert_eq!(trip(&mut b, t0).open_for, Some(secs(5)));
    for expected in [10u64, 20, 40, 60, 60] {
        let now = to_half_open(&mut b);
        let t = probe_fail(&mut b, now);
        assert_eq!(t.reason.as_str(), "probe_failure");
        assert_eq!(t.open_for, Some(secs(expected)));
        assert_eq!(b.next_deadline(), Some(now + secs(expected)));
    }
    let s = b.snapshot(b.next_deadline().unwrap());
    assert_eq!(s.open_backoff_seconds, 60.0);
    assert_eq!(s.backoff_level, 6);
}

/// Trip, fail one probe (level 2), then close: returns the closing instant.
fn closed_after_two_openings(b: &mut Breaker, t0: Instant) -> Instant {
    trip(b, t0);
    let now = to_half_open(b);
    assert_eq!(probe_fail(b, now).open_for, Some(secs(10)));
    let now = to_half_open(b);
    assert_eq!(probe_ok(b, now), None);
    assert_eq!(probe_ok(b, now), None);
    let t = probe_ok(b, now).expect("closes");
    assert_eq!(t.to, State::Closed);
    now
}

#[tokio::test(start_paused = true)]
async fn backoff_resets_after_full_healthy_window() {
    let t0 = Instant::now();

    let mut b = Breaker::new(no_jitter(), 3);
    let closed_at = closed_after_two_openings(&mut b, t0);
    assert_eq!(b.snapshot(closed_at).backoff_level, 2);
    assert_eq!(b.next_deadline(), Some(closed_at + secs(10)));
    assert_eq!(b.poll(closed_at + ms(9_999)), None);
    assert_eq!(b.snapshot(closed_at).backoff_level, 2);
    assert_eq!(b.poll(closed_at + secs(10)), None);
    let s = b.snapshot(closed_at + secs(10));
    assert_eq!((s.backoff_level, s.open_backoff_seconds), (0, 0.0));
    assert_eq!(b.next_deadline(), None);
    assert_eq!(trip(&mut b, closed_at + secs(10)).open_for, Some(secs(5)));

    // Re-opening within the window keeps doubling.
    let mut b = Breaker::new(no_jitter(), 3);
    let closed_at = closed_after_two_openings(&mut b, t0);
    assert_eq!(trip(&mut b, closed_at + secs(9)).open_for, Some(secs(20)));

    // A late timer cannot keep the old level: the trip checks too.
    let mut b = Breaker::new(no_jitter(), 3);
    let closed_at = closed_after_two_openings(&mut b, t0);
    assert_eq!(trip(&mut b, closed_at + secs(10)).open_for, Some(secs(5)));
}

// -- HalfOpen --------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_permits_bounded_under_concurrency() {
    // Real OS-thread contention on the mutex; no time passes in this test.
    const TASKS: usize = 64;
    let (sb, registry) = shared("conc", BreakerConfig::default());
    sb.set_mode(Mode::ForceOpen);
    let t = sb
        .set_mode(Mode::Normal)
        .expect("leaving force_open probes");
    assert_eq!(t.to, State::HalfOpen);

    let start = Arc::new(tokio::sync::Barrier::new(TASKS));
    let everyone_tried = Arc::new(tokio::sync::Barrier::new(TASKS));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let max_seen = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let (sb, start, everyone_tried) = (sb.clone(), start.clone(), everyone_tried.clone());
            let (in_flight, max_seen) = (in_flight.clone(), max_seen.clone());
            tokio::spawn(async move {
                start.wait().await;
                let guard = sb.try_acquire();
                if guard.is_ok() {
                    let n = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    max_seen.fetch_max(n, Ordering::SeqCst);
                }
                // Hold the permit until every task has tried, so the
                // admitted count is exactly the bound.
                everyone_tried.wait().await;
                let admitted = guard.is_ok();
                if admitted {
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                }
                drop(guard);
                admitted
            })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        admitted += usize::from(t.await.expect("task"));
    }
    assert_eq!(admitted, 3);
    assert!(max_seen.load(Ordering::SeqCst) <= 3);
    assert_eq!(
        metric(&registry, "redfuse_breaker_rejected_total", &[]),
        (TASKS - 3) as f64
    );
    let s = sb.snapshot();
    assert_eq!(s.state, State::HalfOpen);
    assert_eq!(
        s.half_open_permits_in_use, 0,
        "dropped guards free their slots"
    );
}

#[tokio::test(start_paused = true)]
async fn half_open_closes_after_success_threshold() {
    let t0 = Instant::now();
    let mut b = Breaker::new(no_jitter(), 1);
    trip(&mut b, t0);
    let now = to_half_open(&mut b);
    let p: Vec<Permit> = (0..3).map(|_| b.try_acquire(now).expect("probe")).collect();
    assert!(p.iter().all(Permit::is_probe));
    let r = b.try_acquire(now).expect_err("beyond permits");
    assert_eq!(r.state, State::HalfOpen);
    assert_eq!(b.record(p[0], fast(), now), None);
    assert_eq!(b.record(p[1], slow(), now), None);
    let s = b.snapshot(now);
    assert_eq!((s.half_open_successes, s.half_open_permits_in_use), (2, 1));
    let p4 = b
        .try_acquire(now)
        .expect("a freed slot admits another probe");
    let t = b.record(p[2], fast(), now).expect("third success closes");
    assert_eq!((t.from, t.to), (State::HalfOpen, State::Closed));
    assert_eq!(t.reason, Reason::ProbeSuccess { successes: 3 });
    assert_eq!(b.record(p4, TIMEOUT, now), None, "stale probe ignored");
    assert_eq!(b.state(), State::Closed);
    assert_eq!(b.snapshot(now).consecutive_failures, 0);
    assert!(!b.try_acquire(now).expect("closed admits").is_probe());
}

#[tokio::test(start_paused = true)]
async fn any_failure_in_half_open_reopens() {
    let t0 = Instant::now();
    let mut b = Breaker::new(no_jitter(), 1);
    trip(&mut b, t0);
    let now = to_half_open(&mut b);
    assert_eq!(probe_ok(&mut b, now), None);
    assert_eq!(probe_ok(&mut b, now), None);
    let p = b.try_acquire(now).expect("probe");
    let t = b
        .record(p, Outcome::Failure(FailureKind::Loading), now)
        .expect("reopens");
    assert_eq!((t.from, t.to), (State::HalfOpen, State::Open));
    assert_eq!(
        t.reason,
        Reason::ProbeFailure {
            kind: FailureKind::Loading
        }
    );
    assert_eq!(t.open_for, Some(secs(10)), "doubled back-off");
    assert!(b.try_acquire(now).is_err());
}

#[tokio::test(start_paused = true)]
async fn half_open_max_wait_reopens_wedged_probes() {
    let (sb, registry) = shared("wedge", no_jitter());
    let timer = sb.spawn_timer(std::future::pending());
    for _ in 0..5 {
        sb.try_acquire()
            .unwrap()
            .failure(FailureKind::CommandTimeout);
    }
    tokio::time::advance(secs(5)).await;
    settle().await;
    assert_eq!(sb.state(), State::HalfOpen);
    let wedged: Vec<CallGuard> = (0..3).map(|_| sb.try_acquire().unwrap()).collect();
    assert!(sb.try_acquire().is_err());

    tokio::time::advance(ms(4_999)).await;
    settle().await;
    assert_eq!(sb.state(), State::HalfOpen);
    tokio::time::advance(ms(1)).await;
    settle().await;
    assert_eq!(sb.state(), State::Open);
    let labels = [
        ("from", "half_open"),
        ("to", "open"),
        ("reason", "half_open_timeout"),
    ];
    assert_eq!(
        metric(&registry, "redfuse_breaker_transitions_total", &labels),
        1.0
    );
    assert_eq!(sb.snapshot().open_backoff_seconds, 10.0);

    // The wedged calls finally end: they belong to an old generation.
    drop(wedged);
    assert_eq!(sb.state(), State::Open);
    assert_eq!(
        metric(
            &registry,
            "redfuse_breaker_calls_total",
            &[("outcome", "ignored")]
        ),
        3.0
    );
    tokio::time::advance(secs(10)).await;
    settle().await;
    assert_eq!(sb.state(), State::HalfOpen);
    let fresh: Vec<CallGuard> = (0..3).map(|_| sb.try_acquire().unwrap()).collect();
    assert_eq!(fresh.len(), 3, "no slot is held by the old probes");
    timer.abort();
}

#[tokio::test(start_paused = true)]
async fn stale_generation_results_do_not_drive_transitions() {
    let t0 = Instant::now();
    let mut b = Breaker::new(no_jitter(), 1);
    let old: Vec<Permit> = (0..5).map(|_| b.try_acquire(t0).unwrap()).collect();
    trip(&mut b, t0);
    assert_eq!(b.record(old[0], TIMEOUT, t0), None);
    let now = to_half_open(&mut b);
    // Pre-outage failures arriving now must not re-open the probing breaker.
    for p in &old[1..] {
        assert_eq!(b.record(*p, TIMEOUT, now), None);
    }
    assert_eq!(b.state(), State::HalfOpen);

    // Probes of one HalfOpen neither count nor free slots in the next one.
    let probes: Vec<Permit> = (0..3).map(|_| b.try_acquire(now).unwrap()).collect();
    b.record(probes[2], TIMEOUT, now).expect("re-opens");
    let now = to_half_open(&mut b);
    let current = b.try_acquire(now).unwrap();
    assert_eq!(b.record(probes[0], fast(), now), None);
    assert_eq!(b.record(probes[1], fast(), now), None);
    let s = b.snapshot(now);
    assert_eq!((s.half_open_successes, s.half_open_permits_in_use), (0, 1));
    assert_eq!(b.record(current, fast(), now), None);
    assert_eq!(b.snapshot(now).half_open_successes, 1);
}

#[tokio::test(start_paused = true)]
async fn record_fires_overdue_timer_first() {
    let t0 = Instant::now();
    let mut b = Breaker::new(no_jitter(), 1);
    trip(&mut b, t0);
    let now = to_half_open(&mut b);
    let p = b.try_acquire(now).unwrap();
    // The probe answers after the max wait, before the timer ran.
    let t = b
        .record(p, fast(), now + secs(6))
        .expect("timeout transition");
    assert_eq!(t.reason.as_str(), "half_open_timeout");
    assert_eq!(b.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn call_guard_drop_is_ignored_and_frees_probe_slot() {
    let (sb, registry) = shared("guard", no_jitter());
    // Dropped in Closed: neither success nor failure, so it neither
    // counts in the window nor breaks a run of failures.
    for _ in 0..4 {
        sb.try_acquire()
            .unwrap()
            .failure(FailureKind::CommandTimeout);
    }
    drop(sb.try_acquire().unwrap());
    let s = sb.snapshot();
    assert_eq!((s.calls_in_window, s.consecutive_failures), (4, 4));
    let ignored = [("outcome", "ignored")];
    assert_eq!(
        metric(&registry, "redfuse_breaker_calls_total", &ignored),
        1.0
    );
    sb.reset();

    sb.set_mode(Mode::ForceOpen);
    sb.set_mode(Mode::Normal);
    assert_eq!(sb.state(), State::HalfOpen);
    let mut guards: Vec<CallGuard> = (0..3).map(|_| sb.try_acquire().unwrap()).collect();
    assert!(guards.iter().all(CallGuard::is_probe));
    assert!(sb.try_acquire().is_err());
    drop(guards.pop());
    assert_eq!(
        metric(&registry, "redfuse_breaker_calls_total", &ignored),
        2.0
    );
    assert_eq!(sb.snapshot().half_open_permits_in_use, 2);
    assert_eq!(sb.state(), State::HalfOpen);
    let g = sb.try_acquire().expect("slot freed by the dropped guard");
    g.success();
    assert_eq!(sb.snapshot().half_open_successes, 1);
}

// -- Modes -----------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn force_open_mode() {
    let t0 = Instant::now();
    let mut b = Breaker::new(no_jitter(), 1);
    let t = b.set_mode(Mode::ForceOpen, t0).expect("closed -> open");
    assert_eq!(
        (t.from, t.to, t.open_for),
        (State::Closed, State::Open, None)
    );
    assert_eq!(
        t.reason,
        Reason::Manual {
            action: ManualAction::SetMode(Mode::ForceOpen)
        }
    );
    let r = b.try_acquire(t0).expect_err("force_open rejects");
    assert_eq!((r.mode, r.retry_after), (Mode::ForceOpen, None));
    assert_eq!(b.next_deadline(), None);
    assert_eq!(b.poll(t0 + secs(3600)), None);
    assert_eq!(b.state(), State::Open);
    let t = b.set_mode(Mode::Normal, t0 + secs(3600)).expect("probes");
    assert_eq!((t.from, t.to), (State::Open, State::HalfOpen));

    // Forcing an already Open breaker removes its timer.
    let mut b = Breaker::new(no_jitter(), 1);
    trip(&mut b, t0);
    assert_eq!(b.set_mode(Mode::ForceOpen, t0), None);
    assert_eq!(b.next_deadline(), None);
    assert_eq!(b.poll(t0 + secs(60)), None);
    assert_eq!(b.state(), State::Open);

    // Configured initial mode.
    let cfg = BreakerConfig {
        mode: Mode::ForceOpen,
        ..no_jitter()
    };
    let mut b = Breaker::new(cfg, 1);
    assert_eq!(b.state(), State::Open);
    assert!(b.try_acquire(t0).is_err());
}

#[tokio::test(start_paused = true)]
async fn force_closed_mode() {
    let t0 = Instant::now();
    let mut b = Breaker::new(no_jitter(), 1);
    trip(&mut b, t0);
    let t = b.set_mode(Mode::ForceClosed, t0).expect("open -> closed");
    assert_eq!((t.from, t.to), (State::Open, State::Closed));
    for _ in 0..50 {
        assert_eq!(call(&mut b, TIMEOUT, t0), None);
    }
    let s = b.snapshot(t0);
    assert_eq!(s.state, State::Closed);
    assert_eq!(s.mode, Mode::ForceClosed);
    assert_eq!((s.consecutive_failures, s.failures_in_window), (50, 50));
    // Back to the rules: the statistics it kept are judged again.
    assert_eq!(b.set_mode(Mode::Normal, t0), None);
    let t = call(&mut b, TIMEOUT, t0).expect("trips");
    assert_eq!(t.reason.as_str(), "consecutive_failures");
}

#[tokio::test(start_paused = true)]
async fn disabled_mode_never_opens_but_counts() {
    let cfg = BreakerConfig {
        mode: Mode::Disabled,
        ..no_jitter()
    };
    let (sb, registry) = shared("off", cfg);
    let timer = sb.spawn_timer(std::future::pending());
    for _ in 0..40 {
        sb.try_acquire()
            .expect("disabled admits")
            .failure(FailureKind::ConnectReset);
    }
    assert_eq!(sb.state(), State::Closed);
    assert_eq!(sb.mode(), Mode::Disabled);
    let s = sb.snapshot();
    assert_eq!((s.calls_in_window, s.failure_rate), (40, 1.0));
    let failures = [("outcome", "failure")];
    assert_eq!(
        metric(&registry, "redfuse_breaker_calls_total", &failures),
        40.0
    );
    tokio::time::advance(secs(1)).await;
    settle().await;
    assert_eq!(metric(&registry, "redfuse_breaker_failure_rate", &[]), 1.0);
    // The gauge decays once the calls roll out of the window.
    tokio::time::advance(secs(9)).await;
    settle().await;
    assert_eq!(metric(&registry, "redfuse_breaker_failure_rate", &[]), 0.0);
    assert_eq!(metric(&registry, "redfuse_breaker_state", &[]), 0.0);
    timer.abort();
}

#[tokio::test(start_paused = true)]
async fn metrics_only_mode_transitions_but_never_rejects() {
    let t0 = Instant::now();
    let cfg = BreakerConfig {
        mode: Mode::MetricsOnly,
        ..no_jitter()
    };
    let mut b = Breaker::new(cfg.clone(), 1);
    let t = trip(&mut b, t0);
    assert_eq!(t.open_for, Some(secs(5)));
    let p = b.try_acquire(t0).expect("metrics_only admits while Open");
    assert!(p.is_shadow());
    assert_eq!(b.record(p, fast(), t0), None, "shadow results are ignored");
    assert_eq!(b.snapshot(t0).shadow_rejections, 1);
    let now = to_half_open(&mut b);
    let probes: Vec<Permit> = (0..3).map(|_| b.try_acquire(now).unwrap()).collect();
    assert!(probes.iter().all(Permit::is_probe));
    let extra = b.try_acquire(now).expect("beyond permits: shadow");
    assert!(extra.is_shadow());
    assert_eq!(b.record(extra, TIMEOUT, now), None);
    assert_eq!(b.state(), State::HalfOpen);
    for p in &probes[..2] {
        assert_eq!(b.record(*p, fast(), now), None);
    }
    let t = b.record(probes[2], fast(), now).expect("closes");
    assert_eq!(t.to, State::Closed);

    // Through the wrapper, would-be rejections never bump rejected_total.
    let (sb, registry) = shared("shadow", cfg);
    for _ in 0..5 {
        sb.try_acquire().unwrap().failure(FailureKind::Busy);
    }
    assert_eq!(sb.state(), State::Open);
    for _ in 0..4 {
        sb.try_acquire().expect("never rejects").success();
    }
    assert_eq!(
        metric(&registry, "redfuse_breaker_rejected_total", &[]),
        0.0
    );
    assert_eq!(sb.snapshot().shadow_rejections, 4);
    assert_eq!(metric(&registry, "redfuse_breaker_state", &[]), 2.0);
}

#[tokio::test(start_paused = true)]
async fn reset_clears_everything() {
    let t0 = Instant::now();
    let mut b = Breaker::new(no_jitter(), 1);
    trip(&mut b, t0);
    let now = to_half_open(&mut b);
    probe_fail(&mut b, now);
    b.set_mode(Mode::ForceOpen, now);
    let t = b.reset(now).expect("open -> closed");
    assert_eq!((t.from, t.to), (State::Open, State::Closed));
    assert_eq!(
        t.reason,
        Reason::Manual {
            action: ManualAction::Reset
        }
    );
    let s = b.snapshot(now);
    assert_eq!(s.mode, Mode::Normal);
    assert_eq!((s.backoff_level, s.open_backoff_seconds), (0, 0.0));
    assert_eq!((s.calls_in_window, s.consecutive_failures), (0, 0));
    assert_eq!(trip(&mut b, now).open_for, Some(secs(5)));

    // Reset while Closed is not a transition but still clears counters.
    let mut b = Breaker::new(no_jitter(), 1);
    for _ in 0..4 {
        call(&mut b, TIMEOUT, t0);
    }
    assert_eq!(b.reset(t0), None);
    let s = b.snapshot(t0);
    assert_eq!((s.calls_in_window, s.consecutive_failures), (0, 0));
    assert_eq!(call(&mut b, TIMEOUT, t0), None, "count starts over");
}

#[tokio::test(start_paused = true)]
async fn shared_reset_and_set_mode_publish() {
    let (sb, registry) = shared("ops", no_jitter());
    let mut rx = sb.subscribe();
    sb.set_mode(Mode::ForceOpen).expect("transition");
    assert_eq!(*rx.borrow_and_update(), State::Open);
    assert_eq!(metric(&registry, "redfuse_breaker_state", &[]), 2.0);
    let labels = [("to", "open"), ("reason", "manual")];
    assert_eq!(
        metric(&registry, "redfuse_breaker_transitions_total", &labels),
        1.0
    );
    sb.reset().expect("transition");
    assert_eq!(*rx.borrow_and_update(), State::Closed);
    assert_eq!(sb.mode(), Mode::Normal);
    assert_eq!(metric(&registry, "redfuse_breaker_state", &[]), 0.0);
}

// -- Timer task lifecycle ------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn timer_exits_when_breaker_dropped() {
    let (sb, _registry) = shared("gone", no_jitter());
    let timer = sb.spawn_timer(std::future::pending());
    let guard = sb.try_acquire().unwrap();
    settle().await;
    drop(sb);
    settle().await;
    assert!(!timer.is_finished(), "an outstanding guard keeps it alive");
    drop(guard);
    settle().await;
    assert!(timer.is_finished());
}

#[tokio::test(start_paused = true)]
async fn timer_exits_on_shutdown() {
    let (sb, _registry) = shared("stop", no_jitter());
    let (tx, mut rx) = watch::channel(false);
    let timer = sb.spawn_timer(async move {
        let _ = rx.wait_for(|stop| *stop).await;
    });
    settle().await;
    assert!(!timer.is_finished());
    tx.send(true).unwrap();
    settle().await;
    assert!(timer.is_finished());
    assert_eq!(sb.state(), State::Closed, "breaker itself unaffected");
}

// -- Metrics -----------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn metrics_visible_in_registry() {
    let (sb, reg) = shared("cache-a", no_jitter());
    let timer = sb.spawn_timer(std::future::pending());
    let up = ("upstream", "cache-a");
    let info = |s: &str| metric(&reg, "redfuse_breaker_state_info", &[up, ("state", s)]);
    let calls = |o: &str| metric(&reg, "redfuse_breaker_calls_total", &[up, ("outcome", o)]);
    assert_eq!(metric(&reg, "redfuse_breaker_state", &[up]), 0.0);
    assert_eq!(
        (info("closed"), info("half_open"), info("open")),
        (1.0, 0.0, 0.0)
    );
    assert_eq!(calls("success"), 0.0);

    sb.try_acquire().unwrap().complete(slow());
    assert_eq!((calls("success"), calls("slow")), (1.0, 1.0));
    for _ in 0..4 {
        sb.try_acquire().unwrap().failure(FailureKind::MasterDown);
    }
    tokio::time::advance(secs(1)).await;
    settle().await;
    assert!((metric(&reg, "redfuse_breaker_failure_rate", &[up]) - 0.8).abs() < 1e-9);
    assert!((metric(&reg, "redfuse_breaker_slow_call_rate", &[up]) - 0.2).abs() < 1e-9);

    sb.try_acquire().unwrap().failure(FailureKind::MasterDown);
    assert_eq!(metric(&reg, "redfuse_breaker_state", &[up]), 2.0);
    assert_eq!(
        (info("closed"), info("half_open"), info("open")),
        (0.0, 0.0, 1.0)
    );
    let trans = [
        up,
        ("from", "closed"),
        ("to", "open"),
        ("reason", "consecutive_failures"),
    ];
    assert_eq!(
        metric(&reg, "redfuse_breaker_transitions_total", &trans),
        1.0
    );
    assert_eq!(
        metric(&reg, "redfuse_breaker_open_backoff_seconds", &[up]),
        5.0
    );
    assert_eq!(calls("failure"), 5.0);
    assert!(sb.try_acquire().is_err());
    assert_eq!(metric(&reg, "redfuse_breaker_rejected_total", &[up]), 1.0);

    tokio::time::advance(secs(5)).await;
    settle().await;
    assert_eq!(metric(&reg, "redfuse_breaker_state", &[up]), 1.0);
    assert_eq!(info("half_open"), 1.0);
    timer.abort();
}

#[test]
fn metrics_register_twice_fails() {
    let registry = Registry::new();
    BreakerMetrics::register(&registry).expect("first registration");
    assert!(BreakerMetrics::register(&registry).is_err());
}

// -- Classification ------------------------------------------------------------

#[test]
fn classify_failure_replies() {
    let cases = [
        (
            "-LOADING Redis is loading the dataset in memory\r\n",
            FailureKind::Loading,
        ),
        (
            "-BUSY Redis is busy running a script.\r\n",
            FailureKind::Busy,
        ),
        (
            "-MASTERDOWN Link with MASTER is down\r\n",
            FailureKind::MasterDown,
        ),
        (
            "-CLUSTERDOWN The cluster is down\r\n",
            FailureKind::ClusterDown,
        ),
        (
            "-TRYAGAIN Multiple keys request during rehashing\r\n",
            FailureKind::TryAgain,
        ),
    ];
    for (reply, kind) in cases {
        for is_write in [false, true] {
            assert_eq!(
                classify_error_reply(reply.as_bytes(), is_write),
                ReplyClass::Failure(kind),
                "{reply:?}"
            );
        }
    }
    let body = "LOADING loading the dataset";
    let blob = format!("!{}\r\n{body}\r\n", body.len());
    assert_eq!(
        classify_error_reply(blob.as_bytes(), false),
        ReplyClass::Failure(FailureKind::Loading)
    );
    assert_eq!(
        classify_error_reply(b"-TRYAGAIN\r\n", false),
        ReplyClass::Failure(FailureKind::TryAgain)
    );
}

#[test]
fn classify_write_only_failures() {
    for (reply, kind) in [
        (
            "-READONLY You can't write against a read only replica.\r\n",
            FailureKind::ReadOnly,
        ),
        (
            "-OOM command not allowed when used memory > 'maxmemory'.\r\n",
            FailureKind::Oom,
        ),
    ] {
        assert_eq!(
            classify_error_reply(reply.as_bytes(), true),
            ReplyClass::Failure(kind)
        );
        assert_eq!(
            classify_error_reply(reply.as_bytes(), false),
            ReplyClass::Success
        );
    }
}

#[test]
fn classify_auth_and_success_replies() {
    for reply in [
        "-NOAUTH Authentication required.\r\n",
        "-WRONGPASS invalid username-password pair or user is disabled.\r\n",
        "-NOPERM User x has no permissions to run the 'get' command\r\n",
    ] {
        for is_write in [false, true] {
            assert_eq!(
                classify_error_reply(reply.as_bytes(), is_write),
                ReplyClass::AuthProblem
            );
        }
    }
    for reply in [
        "-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
        "-ERR unknown command 'FOO'\r\n",
        "-NOSCRIPT No matching script.\r\n",
        "-BUSYKEY Target key name already exists.\r\n",
        "-BUSYGROUP Consumer Group name already exists\r\n",
        "!20\r\nSYNTAX invalid syntax\r\n",
        "+OK\r\n",
        ":1\r\n",
    ] {
        for is_write in [false, true] {
            assert_eq!(
                classify_error_reply(reply.as_bytes(), is_write),
                ReplyClass::Success,
                "{reply:?}"
            );
        }
    }
    assert_eq!(
        classify_error_reply(b"", false),
        ReplyClass::Failure(FailureKind::MalformedReply)
    );
    assert_eq!(
        classify_error_reply(b"!x\r\nLOADING\r\n", false),
        ReplyClass::Failure(FailureKind::MalformedReply)
    );
    assert_eq!(
        ReplyClass::AuthProblem.outcome(ms(3)),
        Outcome::Success { latency: ms(3) }
    );
    assert_eq!(
        ReplyClass::Failure(FailureKind::Busy).outcome(ms(3)),
        Outcome::Failure(FailureKind::Busy)
    );
}

// -- Config, names, display -------------------------------------------------------

#[test]
fn config_defaults_and_serde() {
    let d = BreakerConfig::default();
    assert_eq!(d.consecutive_failures, 5);
    assert_eq!(d.failure_rate_threshold, 0.5);
    assert_eq!(d.slow_call_rate_threshold, 0.8);
    assert_eq!(d.slow_call_threshold(), ms(250));
    assert_eq!(d.minimum_calls, 20);
    assert_eq!((d.window(), d.bucket()), (secs(10), secs(1)));
    assert_eq!((d.open_base(), d.open_max()), (secs(5), secs(60)));
    assert_eq!(d.jitter, 0.2);
    assert_eq!((d.half_open_permits, d.success_threshold), (3, 3));
    assert_eq!(d.half_open_max_wait(), secs(5));
    assert_eq!(d.mode, Mode::Normal);
    assert_eq!(d.validate(), Ok(()));

    let empty: BreakerConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(empty, d);
    let c: BreakerConfig =
        serde_json::from_str(r#"{"open_base_ms": 100, "mode": "metrics_only"}"#).unwrap();
    assert_eq!((c.open_base(), c.mode), (ms(100), Mode::MetricsOnly));
    assert!(serde_json::from_str::<BreakerConfig>(r#"{"open_base": 1}"#).is_err());
}

#[test]
fn config_validate_names_the_field() {
    type Edit = fn(&mut BreakerConfig);
    let cases: [(Edit, &str); 14] = [
        (|c| c.consecutive_failures = 0, "consecutive_failures"),
        (|c| c.failure_rate_threshold = 0.0, "failure_rate_threshold"),
        (|c| c.failure_rate_threshold = 1.5, "failure_rate_threshold"),
        (
            |c| c.slow_call_rate_threshold = f64::NAN,
            "slow_call_rate_threshold",
        ),
        (|c| c.slow_call_threshold_ms = 0, "slow_call_threshold_ms"),
        (|c| c.minimum_calls = 0, "minimum_calls"),
        (|c| c.window_ms = 0, "window_ms"),
        (|c| c.bucket_ms = 3_000, "bucket_ms"),
        (|c| c.bucket_ms = 1, "bucket_ms"),
        (|c| c.open_base_ms = 0, "open_base_ms"),
        (|c| c.open_max_ms = 1_000, "open_max_ms"),
        (|c| c.jitter = -0.1, "jitter"),
        (|c| c.half_open_permits = 0, "half_open_permits"),
        (
            |c| c.half_open_max_wait_ms = u64::MAX,
            "half_open_max_wait_ms",
        ),
    ];
    for (edit, field) in cases {
        let mut c = BreakerConfig::default();
        edit(&mut c);
        let err = c.validate().expect_err(field);
        assert!(err.starts_with(field), "{err:?} should name {field}");
    }
    let c = BreakerConfig {
        success_threshold: 0,
        ..BreakerConfig::default()
    };
    assert!(c.validate().unwrap_err().starts_with("success_threshold"));
}

#[test]
#[should_panic(expected = "open_base_ms")]
fn breaker_new_rejects_invalid_config() {
    let c = BreakerConfig {
        open_base_ms: 0,
        ..BreakerConfig::default()
    };
    let _ = Breaker::new(c, 0);
}

#[test]
fn names_and_display() {
    let states: Vec<_> = State::ALL
        .iter()
        .map(|s| (s.as_str(), s.as_gauge()))
        .collect();
    assert_eq!(states, [("closed", 0), ("half_open", 1), ("open", 2)]);
    for m in [
        Mode::Normal,
        Mode::ForceOpen,
        Mode::ForceClosed,
        Mode::Disabled,
        Mode::MetricsOnly,
    ] {
        assert_eq!(m.as_str().parse::<Mode>(), Ok(m));
    }
    assert!("open".parse::<Mode>().is_err());

    let labels: Vec<&str> = [
        Reason::ConsecutiveFailures {
            count: 5,
            threshold: 5,
        },
        Reason::FailureRate {
            rate: 0.55,
            threshold: 0.5,
            calls: 20,
        },
        Reason::SlowCallRate {
            rate: 0.9,
            threshold: 0.8,
            calls: 30,
        },
        Reason::OpenTimeout { after: secs(5) },
        Reason::ProbeSuccess { successes: 3 },
        Reason::ProbeFailure {
            kind: FailureKind::Busy,
        },
        Reason::HalfOpenTimeout { waited: secs(5) },
        Reason::Manual {
            action: ManualAction::Reset,
        },
    ]
    .iter()
    .map(Reason::as_str)
    .collect();
    assert_eq!(
        labels,
        [
            "consecutive_failures",
            "failure_rate",
            "slow_call_rate",
            "open_timeout",
            "probe_success",
            "probe_failure",
            "half_open_timeout",
            "manual"
        ]
    );
    let r = Reason::FailureRate {
        rate: 0.55,
        threshold: 0.5,
        calls: 20,
    };
    assert_eq!(
        r.to_string(),
        "failure_rate: failure rate 55.0% over 20 calls (threshold 50.0%)"
    );
    let t = Transition {
        from: State::Closed,
        to: State::Open,
        reason: Reason::ConsecutiveFailures {
            count: 5,
            threshold: 5,
        },
        generation: 1,
        open_for: Some(ms(5_250)),
    };
    assert_eq!(
        t.to_string(),
        "closed -> open: consecutive_failures: 5 consecutive failures (threshold 5); next probe in 5.250s"
    );
    let m = Reason::Manual {
        action: ManualAction::SetMode(Mode::ForceOpen),
    };
    assert_eq!(m.to_string(), "manual: mode set to force_open");
}

#[tokio::test(start_paused = true)]
async fn snapshot_serializes() {
    let t0 = Instant::now();
    let mut b = Breaker::new(no_jitter(), 1);
    trip(&mut b, t0);
    let v = serde_json::to_value(b.snapshot(t0 + secs(2))).unwrap();
    assert_eq!(v["state"], "open");
    assert_eq!(v["mode"], "normal");
    assert_eq!(v["next_probe_in_seconds"], 3.0);
    assert_eq!(v["open_backoff_seconds"], 5.0);
    assert_eq!(v["generation"], 1);
    assert_eq!(v["calls_in_window"], 5);
    assert_eq!(v["failure_rate"], 1.0);
    let now = to_half_open(&mut b);
    let _probe = b.try_acquire(now).unwrap();
    let v = serde_json::to_value(b.snapshot(now)).unwrap();
    assert_eq!(v["state"], "half_open");
    assert_eq!(v["half_open_permits_in_use"], 1);
    assert!(v["next_probe_in_seconds"].is_null());
}

#[tokio::test(start_paused = true)]
async fn silent_probes_open_a_closed_breaker() {
    let mut b = Breaker::new(
        BreakerConfig {
            probe_failures_to_open: 2,
            ..no_jitter()
        },
        1,
    );
    let now = Instant::now();
    let kind = FailureKind::CommandTimeout;
    assert_eq!(
        b.probes_failed(1, kind, b.generation(), now),
        None,
        "one is not enough here"
    );
    let t = b
        .probes_failed(2, kind, b.generation(), now)
        .expect("two silent probes open it");
    assert_eq!((t.from, t.to), (State::Closed, State::Open));
    assert_eq!(t.reason, Reason::HealthProbe { failures: 2, kind });
    assert_eq!(
        b.probes_failed(3, kind, b.generation(), now),
        None,
        "already open"
    );
    let mut forced = Breaker::new(no_jitter(), 1);
    forced.set_mode(Mode::ForceClosed, now);
    assert_eq!(
        forced.probes_failed(9, kind, forced.generation(), now),
        None,
        "forced closed stays closed"
    );
}

/// The black-hole fault catalogue failed this way: a probe sent while the breaker was
/// open timed out just after client probes had closed it, and opened it again.
#[tokio::test(start_paused = true)]
async fn a_probe_begun_before_the_breaker_closed_does_not_open_it_again() {
    let mut b = Breaker::new(no_jitter(), 1);
    let t0 = Instant::now();
    trip(&mut b, t0);
    let began = b.generation();
    let at = to_half_open(&mut b);
    for i in 0..b.config().success_threshold {
        probe_ok(&mut b, at + ms(u64::from(i)));
    }
    assert_eq!(b.state(), State::Closed);
    let kind = FailureKind::CommandTimeout;
    let late = at + ms(1200);
    assert_eq!(b.probes_failed(1, kind, began, late), None, "stale probe");
    assert_eq!(b.state(), State::Closed);
    let t = b
        .probes_failed(1, kind, b.generation(), late)
        .expect("a probe begun since the close still opens it");
    assert_eq!((t.from, t.to), (State::Closed, State::Open));
}

#[tokio::test(start_paused = true)]
async fn a_busy_server_heals_as_soon_as_it_answers() {
    let mut b = Breaker::new(no_jitter(), 1);
    let now = Instant::now();
    for _ in 0..b.config().consecutive_failures {
        let p = b.try_acquire(now).unwrap();
        b.record(p, Outcome::Failure(FailureKind::Busy), now);
    }
    assert_eq!(b.state(), State::Open);
    let t = b
        .server_recovered(now + ms(10))
        .expect("busy ended: probing starts at once");
    assert_eq!((t.from, t.to), (State::Open, State::HalfOpen));
    assert_eq!(
        t.reason,
        Reason::ServerRecovered {
            kind: FailureKind::Busy
        }
    );
    // A breaker opened by timeouts keeps its back-off: a flapping network must not flap it.
    let mut c = Breaker::new(no_jitter(), 1);
    trip(&mut c, now);
    assert_eq!(c.server_recovered(now + ms(10)), None);
    assert_eq!(c.state(), State::Open);
}

// -- The lock-free rejection hint -------------------------------------------

#[tokio::test(start_paused = true)]
async fn the_rejection_hint_follows_state_and_mode() {
    let (sb, _registry) = shared("hint", BreakerConfig::default());
    let agrees = |sb: &SharedBreaker| sb.rejects_all() == sb.try_acquire().is_err();
    assert!(!sb.rejects_all());
    sb.set_mode(Mode::ForceOpen);
    assert!(sb.rejects_all() && agrees(&sb));
    sb.set_mode(Mode::Normal);
    assert_eq!(sb.state(), State::HalfOpen);
    assert!(!sb.rejects_all(), "half-open admits probes");
    sb.reset();
    sb.probes_failed(3, FailureKind::ConnectRefused, sb.generation());
    assert_eq!(sb.state(), State::Open);
    assert!(sb.rejects_all() && agrees(&sb));
    sb.set_mode(Mode::MetricsOnly);
    assert!(
        !sb.rejects_all() && agrees(&sb),
        "metrics_only admits everything"
    );
    sb.set_mode(Mode::Normal);
    sb.reset();
    assert_eq!(sb.state(), State::Closed);
    assert!(!sb.rejects_all() && agrees(&sb));
}

/// Replies read together are completed together: in order, under one lock, with the same
/// transitions and counts as one at a time (a trip in the middle of the batch included).
#[tokio::test(start_paused = true)]
async fn complete_all_records_a_batch_as_one_at_a_time_would() {
    let (sb, reg) = shared("batch", no_jitter());
    let up = ("upstream", "batch");
    let calls = |o: &str| metric(&reg, "redfuse_breaker_calls_total", &[up, ("outcome", o)]);
    let now = Instant::now();
    let mut batch: Vec<(CallGuard, Outcome)> = Vec::new();
    batch.push((sb.try_acquire().unwrap(), fast()));
    batch.push((sb.try_acquire().unwrap(), slow()));
    CallGuard::complete_all(&mut batch, now);
    assert!(batch.is_empty());
    assert_eq!((calls("success"), calls("slow")), (2.0, 1.0));
    assert_eq!(sb.state(), State::Closed);
    // Five consecutive failures trip the breaker; the call after them in the same batch
    // is still recorded (as a late reply of the old generation, ignored by the machine).
    for _ in 0..5 {
        batch.push((sb.try_acquire().unwrap(), TIMEOUT));
    }
    batch.push((sb.try_acquire().unwrap(), Outcome::Ignored));
    CallGuard::complete_all(&mut batch, now);
    assert_eq!(sb.state(), State::Open);
    assert!(sb.rejects_all());
    assert_eq!((calls("failure"), calls("ignored")), (5.0, 1.0));
    // Nothing left to record when the guards are gone (no double count on drop).
    assert_eq!(calls("success"), 2.0);
    let mut empty = Vec::new();
    CallGuard::complete_all(&mut empty, now);
}

/// `record_all` is `record` for each call in turn: the same transitions, at the same
/// calls, and the same window afterwards, across a trip in the middle of a batch, a batch
/// that finds the Open timer due, and probes that close the breaker part-way through.
#[tokio::test(start_paused = true)]
async fn record_all_is_record_one_at_a_time() {
    let t0 = Instant::now();
    let mut one = Breaker::new(no_jitter(), 1);
    let mut all = Breaker::new(no_jitter(), 1);
    // Each step: the outcomes of calls admitted together, then recorded together at `at`.
    let step = |one: &mut Breaker, all: &mut Breaker, outcomes: &[Outcome], at: Instant| {
        let permits: Vec<_> = outcomes
            .iter()
            .map(|_| {
                let p = one.try_acquire(at).expect("admitted");
                assert_eq!(all.try_acquire(at).expect("admitted"), p);
                p
            })
            .collect();
        let singly: Vec<Transition> = permits
            .iter()
            .zip(outcomes)
            .filter_map(|(p, o)| one.record(*p, *o, at))
            .collect();
        let mut together = Vec::new();
        all.record_all(
            at,
            permits.iter().copied().zip(outcomes.iter().copied()),
            |b, t| {
                assert_eq!(b.state(), t.to, "seen in the new state");
                together.push(t);
            },
        );
        assert_eq!(singly, together);
        assert_eq!(one.snapshot(at), all.snapshot(at));
        singly
    };
    let t = step(&mut one, &mut all, &[fast(), slow(), fast()], t0);
    assert!(t.is_empty());
    // The fifth failure trips; the successes after it belong to the old generation.
    let mut batch = vec![TIMEOUT; 5];
    batch.extend([fast(), fast()]);
    let t = step(&mut one, &mut all, &batch, t0 + ms(10));
    assert_eq!(t.len(), 1);
    assert_eq!((t[0].from, t[0].to), (State::Closed, State::Open));
    // Half-open probes: the third success closes; nothing after it counts as a probe.
    let at = one.next_deadline().expect("Open has a deadline");
    assert_eq!(one.poll(at).map(|t| t.to), Some(State::HalfOpen));
    assert_eq!(all.poll(at).map(|t| t.to), Some(State::HalfOpen));
    let t = step(&mut one, &mut all, &[fast(), fast(), fast()], at);
    assert_eq!(t.len(), 1);
    assert_eq!((t[0].from, t[0].to), (State::HalfOpen, State::Closed));
    // Trip again, with two calls admitted before the trip whose replies come late, once
    // the Open timer is overdue: the timer fires first and both permits are stale.
    let late: Vec<Permit> = (0..2)
        .map(|_| {
            let p = one.try_acquire(at + ms(1)).expect("admitted");
            assert_eq!(all.try_acquire(at + ms(1)).expect("admitted"), p);
            p
        })
        .collect();
    let t = step(&mut one, &mut all, &[TIMEOUT; 5], at + ms(1));
    assert_eq!(t.len(), 1);
    let due = one.next_deadline().expect("Open has a deadline");
    assert_eq!(all.next_deadline(), Some(due));
    let singly: Vec<Transition> = late
        .iter()
        .filter_map(|p| one.record(*p, fast(), due))
        .collect();
    let mut together = Vec::new();
    all.record_all(due, late.iter().map(|p| (*p, fast())), |_, t| {
        together.push(t)
    });
    assert_eq!(singly, together);
    assert_eq!(together.len(), 1);
    assert_eq!(
        (together[0].from, together[0].to),
        (State::Open, State::HalfOpen)
    );
    assert_eq!(one.snapshot(due), all.snapshot(due));
}
