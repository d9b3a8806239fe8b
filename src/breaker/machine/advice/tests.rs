//! Fleet advice under paused time: suspicion, quorum, recovery, and what is ignored.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::super::{Breaker, Mode, Reason, State, Transition};
use super::*;
use crate::breaker::classify::{FailureKind, Outcome};
use crate::breaker::config::BreakerConfig;

const TIMEOUT: Outcome = Outcome::Failure(FailureKind::CommandTimeout);
const WINDOW: Duration = Duration::from_secs(10);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn breaker(quorum: Option<u32>) -> Breaker {
    let config = BreakerConfig {
        jitter: 0.0,
        ..BreakerConfig::default()
    };
    let mut b = Breaker::new(config, 7);
    b.set_advice_policy(AdvicePolicy {
        window: WINDOW,
        quorum,
    });
    b
}

fn opened(instance: &str, at: Instant) -> Advice {
    Advice::Opened {
        instance: instance.into(),
        at,
        first_hand: true,
    }
}

fn closed(instance: &str, at: Instant) -> Advice {
    Advice::Closed {
        instance: instance.into(),
        at,
        first_hand: true,
    }
}

fn call(b: &mut Breaker, outcome: Outcome, now: Instant) -> Option<Transition> {
    let p = b.try_acquire(now).expect("admitted");
    b.record(p, outcome, now)
}

#[tokio::test(start_paused = true)]
async fn without_a_policy_advice_is_ignored() {
    let t0 = Instant::now();
    let mut b = Breaker::new(BreakerConfig::default(), 1);
    let a = b.advise(opened("a", t0), t0);
    assert_eq!(a.effect, AdviceEffect::Ignored);
    assert_eq!(call(&mut b, TIMEOUT, t0), None, "one failure does not trip");
}

#[tokio::test(start_paused = true)]
async fn a_remote_open_makes_the_first_local_failure_trip() {
    let t0 = Instant::now();
    let mut b = breaker(None);
    // Without advice one failure is far from the 5 in a row.
    assert_eq!(call(&mut b, TIMEOUT, t0), None);
    assert_eq!(call(&mut b, Outcome::Success { latency: ms(1) }, t0), None);

    let a = b.advise(opened("a", t0 + ms(10)), t0 + ms(10));
    assert_eq!(a.effect, AdviceEffect::Suspect);
    assert!(a.effect.probe_now(), "the caller probes at once");
    assert_eq!(a.transition, None, "advice alone does not open");
    assert_eq!(b.state(), State::Closed);
    assert_eq!(b.snapshot(t0 + ms(10)).fleet_open_reports, 1);

    // Successes do not clear the suspicion: the next failure still trips.
    assert_eq!(
        call(&mut b, Outcome::Success { latency: ms(1) }, t0 + ms(20)),
        None
    );
    let t = call(&mut b, TIMEOUT, t0 + ms(30)).expect("first local failure trips");
    assert_eq!((t.from, t.to), (State::Closed, State::Open));
    assert_eq!(
        t.reason,
        Reason::FleetAdvice {
            kind: FailureKind::CommandTimeout,
            instances: 1
        }
    );
    assert_eq!(t.reason.as_str(), "fleet_advice");
    assert!(t.open_for.is_some(), "a normal open period with a timer");
}

#[tokio::test(start_paused = true)]
async fn a_failed_health_probe_trips_too_while_suspect() {
    let t0 = Instant::now();
    let config = BreakerConfig {
        probe_failures_to_open: 3,
        ..BreakerConfig::default()
    };
    let mut b = Breaker::new(config, 1);
    b.set_advice_policy(AdvicePolicy {
        window: WINDOW,
        quorum: None,
    });
    assert_eq!(
        b.probes_failed(1, FailureKind::ConnectRefused, b.generation(), t0),
        None
    );
    b.advise(opened("a", t0), t0);
    let t = b
        .probes_failed(1, FailureKind::ConnectRefused, b.generation(), t0 + ms(5))
        .expect("one failed probe trips while suspect");
    assert_eq!(t.reason.as_str(), "fleet_advice");
}

#[tokio::test(start_paused = true)]
async fn the_suspicion_lasts_the_window() {
    let t0 = Instant::now();
    let mut b = breaker(None);
    b.advise(opened("a", t0), t0);
    assert_eq!(
        call(&mut b, TIMEOUT, t0 + WINDOW),
        None,
        "expired at the window's end"
    );
    assert_eq!(b.state(), State::Closed);
    assert_eq!(b.snapshot(t0 + WINDOW).fleet_open_reports, 0);
}

#[tokio::test(start_paused = true)]
async fn stale_and_second_hand_reports_are_ignored() {
    let t0 = Instant::now();
    let mut b = breaker(Some(1));
    let later = t0 + WINDOW + ms(1);
    assert_eq!(
        b.advise(opened("a", t0), later).effect,
        AdviceEffect::Ignored
    );
    let quorum_echo = Advice::Opened {
        instance: "b".into(),
        at: later,
        first_hand: false,
    };
    assert_eq!(b.advise(quorum_echo, later).effect, AdviceEffect::Ignored);
    assert_eq!(b.state(), State::Closed);
    assert_eq!(call(&mut b, TIMEOUT, later), None, "no suspicion either");
}

#[tokio::test(start_paused = true)]
async fn a_quorum_of_distinct_instances_within_the_window_opens_outright() {
    let t0 = Instant::now();
    let mut b = breaker(Some(2));
    assert_eq!(b.advise(opened("a", t0), t0).effect, AdviceEffect::Suspect);
    // The same instance again (it re-opened) is still one instance.
    assert_eq!(
        b.advise(opened("a", t0 + ms(100)), t0 + ms(100)).effect,
        AdviceEffect::Suspect
    );
    let a = b.advise(opened("b", t0 + ms(200)), t0 + ms(200));
    assert_eq!(a.effect, AdviceEffect::QuorumOpen);
    let t = a.transition.expect("opens");
    assert_eq!((t.from, t.to), (State::Closed, State::Open));
    assert_eq!(
        t.reason,
        Reason::FleetQuorum {
            instances: 2,
            quorum: 2
        }
    );
    assert_eq!(t.generation, 1);
    assert!(t.open_for.is_some());
    // Further reports while Open are only remembered.
    assert_eq!(
        b.advise(opened("c", t0 + ms(300)), t0 + ms(300)).effect,
        AdviceEffect::Noted
    );
}

#[tokio::test(start_paused = true)]
async fn reports_outside_the_window_do_not_make_a_quorum() {
    let t0 = Instant::now();
    let mut b = breaker(Some(2));
    b.advise(opened("a", t0), t0);
    let late = t0 + WINDOW + ms(1);
    let a = b.advise(opened("b", late), late);
    assert_eq!(a.effect, AdviceEffect::Suspect, "a's report has expired");
    assert_eq!(b.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn quorum_one_opens_on_a_single_report() {
    let t0 = Instant::now();
    let mut b = breaker(Some(1));
    let a = b.advise(opened("a", t0), t0);
    assert_eq!(a.effect, AdviceEffect::QuorumOpen);
    assert_eq!(b.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn a_newer_remote_recovery_starts_probing_without_waiting_out_the_back_off() {
    let t0 = Instant::now();
    let mut b = breaker(Some(1));
    b.advise(opened("a", t0), t0);
    assert_eq!(b.state(), State::Open);
    let deadline = b.next_deadline().expect("open timer");
    assert!(deadline >= t0 + ms(5000));

    // A recovery reported from before this breaker opened is no news.
    let stale = b.advise(closed("a", t0 - ms(1)), t0 + ms(50));
    assert_eq!(stale.effect, AdviceEffect::Noted);
    assert_eq!(b.state(), State::Open);

    b.advise(opened("a", t0 + ms(60)), t0 + ms(60));
    let a = b.advise(closed("a", t0 + ms(100)), t0 + ms(100));
    assert_eq!(a.effect, AdviceEffect::Recovered);
    let t = a.transition.expect("to half-open");
    assert_eq!((t.from, t.to), (State::Open, State::HalfOpen));
    assert_eq!(t.reason, Reason::FleetRecovered);
    // The probes still decide.
    for i in 0..3 {
        let p = b.try_acquire(t0 + ms(110)).expect("probe");
        let r = b.record(p, Outcome::Success { latency: ms(1) }, t0 + ms(110));
        assert_eq!(r.is_some(), i == 2);
    }
    assert_eq!(b.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_manual_close_elsewhere_is_not_a_recovery() {
    let t0 = Instant::now();
    let mut b = breaker(Some(1));
    b.advise(opened("a", t0), t0);
    let manual = Advice::Closed {
        instance: "a".into(),
        at: t0 + ms(10),
        first_hand: false,
    };
    assert_eq!(b.advise(manual, t0 + ms(10)).effect, AdviceEffect::Ignored);
    assert_eq!(b.state(), State::Open);
    assert_eq!(b.snapshot(t0 + ms(10)).fleet_open_reports, 0, "forgotten");
}

#[tokio::test(start_paused = true)]
async fn a_remote_close_ends_the_suspicion() {
    let t0 = Instant::now();
    let mut b = breaker(None);
    b.advise(opened("a", t0), t0);
    b.advise(opened("b", t0), t0);
    b.advise(closed("a", t0 + ms(10)), t0 + ms(10));
    assert!(
        b.fleet_advice(FailureKind::ConnectReset, t0 + ms(10))
            .is_some(),
        "b still says open"
    );
    b.advise(closed("b", t0 + ms(20)), t0 + ms(20));
    assert_eq!(call(&mut b, TIMEOUT, t0 + ms(30)), None);
}

#[tokio::test(start_paused = true)]
async fn closing_on_local_probes_ends_the_suspicion() {
    let t0 = Instant::now();
    let mut b = breaker(None);
    b.advise(opened("a", t0), t0);
    call(&mut b, TIMEOUT, t0).expect("trips");
    let at = b.next_deadline().unwrap();
    b.poll(at).expect("half-open");
    for _ in 0..3 {
        let p = b.try_acquire(at).expect("probe");
        b.record(p, Outcome::Success { latency: ms(1) }, at);
    }
    assert_eq!(b.state(), State::Closed);
    assert!(at < t0 + WINDOW, "still within the report's window");
    assert_eq!(call(&mut b, TIMEOUT, at), None, "local evidence is newer");
}

#[tokio::test(start_paused = true)]
async fn forced_modes_ignore_advice() {
    let t0 = Instant::now();
    let mut b = breaker(Some(1));
    b.set_mode(Mode::ForceClosed, t0);
    assert_eq!(b.advise(opened("a", t0), t0).effect, AdviceEffect::Noted);
    assert_eq!(b.state(), State::Closed);
    for _ in 0..10 {
        assert_eq!(call(&mut b, TIMEOUT, t0), None);
    }
    b.set_mode(Mode::ForceOpen, t0);
    assert_eq!(
        b.advise(closed("a", t0 + ms(1)), t0 + ms(1)).transition,
        None,
        "the operator owns a forced open"
    );
    assert_eq!(b.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn metrics_only_follows_advice_like_normal() {
    let t0 = Instant::now();
    let mut b = breaker(Some(1));
    b.set_mode(Mode::MetricsOnly, t0);
    assert_eq!(
        b.advise(opened("a", t0), t0).effect,
        AdviceEffect::QuorumOpen
    );
    assert_eq!(b.state(), State::Open);
    assert!(b.try_acquire(t0).expect("shadow").is_shadow());
}

// -- the shared wrapper --------------------------------------------------------------

struct Recorder(Mutex<Vec<(String, State, &'static str)>>);

impl crate::breaker::TransitionObserver for Recorder {
    fn transition(&self, upstream: &str, t: &Transition) {
        self.0
            .lock()
            .unwrap()
            .push((upstream.to_owned(), t.to, t.reason.as_str()));
    }
}

#[tokio::test(start_paused = true)]
async fn the_shared_breaker_wakes_the_probe_and_tells_the_observer() {
    let registry = prometheus::Registry::new();
    let metrics = crate::breaker::BreakerMetrics::register(&registry).unwrap();
    let sb = crate::breaker::SharedBreaker::new(
        "main",
        BreakerConfig::default(),
        1,
        metrics.for_upstream("main"),
    );
    let seen = Arc::new(Recorder(Mutex::new(Vec::new())));
    assert!(sb.observe(seen.clone()));
    assert!(!sb.observe(seen.clone()), "set once");
    sb.set_advice_policy(AdvicePolicy {
        window: WINDOW,
        quorum: Some(2),
    });

    let now = Instant::now();
    assert_eq!(sb.advise(opened("a", now)).effect, AdviceEffect::Suspect);
    // The request was made before anyone waited: it is kept.
    tokio::time::timeout(ms(1), sb.probe_wanted())
        .await
        .expect("the probe is asked to run now");
    assert!(
        tokio::time::timeout(ms(1), sb.probe_wanted())
            .await
            .is_err(),
        "one request, one wake-up"
    );

    assert_eq!(sb.advise(opened("b", now)).effect, AdviceEffect::QuorumOpen);
    assert_eq!(sb.state(), State::Open);
    assert_eq!(
        *seen.0.lock().unwrap(),
        vec![("main".to_owned(), State::Open, "fleet_quorum")]
    );
    assert_eq!(sb.recent_transitions().len(), 1);
}
