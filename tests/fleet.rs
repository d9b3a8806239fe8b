//! The hybrid breaker with real processes: redfuse instances sharing breaker state through a
//! coordination Redis. Instance A reaches the upstream through a fault relay only it uses,
//! B directly, so only A sees the upstream fail; B must learn it from the fleet.
//!
//! Propagation is measured on one clock: A stamps its report with the wall-clock time of the
//! transition, B records the wall-clock time it received it (`GET /fleet`), both on this
//! machine. Every wait polls with a deadline.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::admin::{breaker, get_json, send, unix_ms};
use support::*;

const TOKEN: &str = "fleet-t0ken";
/// The bound on how fast B learns A's state.
const PROPAGATION_MS: u64 = 200;

struct Instance<'a> {
    id: &'a str,
    upstream: String,
    coordination: String,
    probe_ms: u64,
    open_base_ms: u64,
    quorum: Option<u32>,
}

fn start(dir: &TempDir, i: &Instance) -> Redfuse {
    let quorum = i
        .quorum
        .map_or(String::new(), |q| format!("quorum = {q}\n"));
    let text = format!(
        "command_timeout_ms = 300\nconnect_timeout_ms = 300\n\
         health_probe_interval_ms = {probe}\nhealth_probe_timeout_ms = 300\n\
         admin_token = \"{TOKEN}\"\n\
         [[upstreams]]\nname = \"primary\"\naddr = \"{upstream}\"\n\
         [breaker]\nopen_base_ms = {open}\nopen_max_ms = {open_max}\njitter = 0.0\n\
         half_open_max_wait_ms = 300\nwindow_ms = 2000\nbucket_ms = 100\n\
         [fleet]\nenabled = true\nredis = \"{coordination}\"\ninstance_id = \"{id}\"\n\
         catch_up_interval_ms = 300\ntimeout_ms = 300\n{quorum}",
        probe = i.probe_ms,
        upstream = i.upstream,
        open = i.open_base_ms,
        open_max = i.open_base_ms * 4,
        coordination = i.coordination,
        id = i.id,
    );
    let path = dir.write(&format!("{}.toml", i.id), &text);
    start_with_config(&path)
}

fn sync_up(rf: &Redfuse) -> bool {
    get_json(&rf.admin_addr(), "/fleet")["sync_up"] == true
}

fn wait_synced(all: &[&Redfuse]) {
    for rf in all {
        eventually("fleet sync up", secs(10), || sync_up(rf));
    }
}

fn state(rf: &Redfuse) -> String {
    breaker(&rf.admin_addr(), "primary")["state"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn mode(rf: &Redfuse) -> String {
    breaker(&rf.admin_addr(), "primary")["mode"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn metric(rf: &Redfuse, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_sum(&rf.metrics(), name, labels)
}

fn probe_successes(rf: &Redfuse) -> f64 {
    metric(
        rf,
        "redfuse_health_probe_total",
        &[("upstream", "primary"), ("result", "success")],
    )
}

/// What `rf` heard from `instance` about the primary, once it reports `state`.
fn wait_heard(rf: &Redfuse, instance: &str, state: &str, timeout: Duration) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let found = wait_until(timeout, || {
        last = get_json(&rf.admin_addr(), "/fleet");
        last["peers"]["primary"][instance]["state"] == state
    });
    assert!(found, "never heard {instance} report {state}: {last}");
    last["peers"]["primary"][instance].clone()
}

/// Propagation delay of one report, in ms: B's receipt minus A's transition.
fn delay_ms(heard: &serde_json::Value) -> u64 {
    let ts = heard["ts"].as_u64().expect("ts");
    let received = heard["received_unix_ms"]
        .as_u64()
        .expect("received_unix_ms");
    received.saturating_sub(ts)
}

fn cached_read_ok(rf: &Redfuse) {
    let mut c = rf.client();
    assert_frame(&c.cmd(&["SET", "fleet:k", "v"]), b"+OK\r\n", "SET");
    assert_frame(&c.cmd(&["GET", "fleet:k"]), b"$1\r\nv\r\n", "GET");
}

#[test]
fn b_learns_that_a_opened_within_200ms_probes_at_once_and_trips_on_its_first_failure() {
    let redis = RedisServer::start();
    let relay = FaultRelay::start(&redis.addr());
    let dir = TempDir::new("fleet-advice");
    let a = start(
        &dir,
        &Instance {
            id: "a",
            upstream: relay.addr(),
            coordination: redis.addr(),
            probe_ms: 100,
            open_base_ms: 400,
            quorum: None,
        },
    );
    // B's own probe runs once at start and then only every minute: a probe soon after A's
    // report can only be the fleet's doing.
    let b = start(
        &dir,
        &Instance {
            id: "b",
            upstream: redis.addr(),
            coordination: redis.addr(),
            probe_ms: 60_000,
            open_base_ms: 400,
            quorum: None,
        },
    );
    wait_synced(&[&a, &b]);
    cached_read_ok(&b);
    eventually("B's start-up probe", secs(5), || probe_successes(&b) >= 1.0);
    let probes_before = probe_successes(&b);

    relay.set_mode(FaultMode::Reset);
    eventually("A's breaker open", secs(5), || state(&a) == "open");
    let a_open_seen = Instant::now();
    let heard = wait_heard(&b, "a", "open", secs(2));
    let b_seen = a_open_seen.elapsed();
    let delay = delay_ms(&heard);
    eprintln!(
        "fleet propagation A -> B: {delay} ms from A's transition to B's receipt (reason {}); \
         B's /fleet showed it {b_seen:?} after this test saw A open",
        heard["reason"]
    );
    assert!(
        delay <= PROPAGATION_MS,
        "B learnt A's state after {delay} ms: {heard}"
    );

    // B probes at once, stays closed (its upstream is fine) and keeps serving.
    let t = Instant::now();
    eventually("B probed on A's report", secs(1), || {
        probe_successes(&b) > probes_before
    });
    eprintln!(
        "B's advised probe seen {:?} after its receipt was",
        t.elapsed()
    );
    assert!(
        metric(
            &b,
            "redfuse_fleet_advice_total",
            &[("upstream", "primary"), ("effect", "probe_now")]
        ) >= 1.0
    );
    assert_eq!(state(&b), "closed");
    cached_read_ok(&b);
    // Own messages are ignored: A never hears itself.
    let a_view = get_json(&a.admin_addr(), "/fleet");
    assert!(a_view["peers"]["primary"].get("a").is_none(), "{a_view}");

    // While A keeps reporting open, one local failure opens B (5 in a row otherwise).
    let mut c = b.client();
    let reply = c.cmd_str(&["DEBUG", "SLEEP", "0.6"]);
    assert!(reply.contains("timed out"), "{reply}");
    eventually("B opened on its first failure", secs(2), || {
        metric(
            &b,
            "redfuse_breaker_transitions_total",
            &[
                ("upstream", "primary"),
                ("to", "open"),
                ("reason", "fleet_advice"),
            ],
        ) >= 1.0
    });
}

#[test]
fn with_quorum_one_b_opens_on_a_report_and_heals_when_a_recovers() {
    let redis = RedisServer::start();
    let relay = FaultRelay::start(&redis.addr());
    let dir = TempDir::new("fleet-quorum");
    // A stays open 3 s before probing again: its first report is the one B acts on.
    let a = start(
        &dir,
        &Instance {
            id: "a",
            upstream: relay.addr(),
            coordination: redis.addr(),
            probe_ms: 100,
            open_base_ms: 3_000,
            quorum: None,
        },
    );
    // B's own back-off is 30 s: healing sooner than that is the fleet's doing.
    let b = start(
        &dir,
        &Instance {
            id: "b",
            upstream: redis.addr(),
            coordination: redis.addr(),
            probe_ms: 100,
            open_base_ms: 30_000,
            quorum: Some(1),
        },
    );
    wait_synced(&[&a, &b]);
    cached_read_ok(&b);

    relay.set_mode(FaultMode::Reset);
    eventually("A's breaker open", secs(5), || state(&a) == "open");
    let heard = wait_heard(&b, "a", "open", secs(2));
    let mut b_seen_at = 0;
    eventually("B open on A's report", secs(2), || {
        b_seen_at = unix_ms();
        state(&b) == "open"
    });
    // B's own transition, as B reported it to the fleet (A hears it): both times are the
    // instances' own stamps, not this test's polling.
    let b_report = wait_heard(&a, "b", "open", secs(2));
    assert_eq!(b_report["reason"], "fleet_quorum", "{b_report}");
    let a_ts = heard["ts"].as_u64().unwrap();
    let delay = delay_ms(&heard);
    let b_open = b_report["ts"].as_u64().unwrap().saturating_sub(a_ts);
    eprintln!(
        "fleet quorum 1: A's report reached B in {delay} ms; B's breaker opened {b_open} ms after \
         A's transition (this test saw it open {} ms after)",
        b_seen_at.saturating_sub(a_ts)
    );
    assert!(delay <= PROPAGATION_MS, "{heard}");
    assert!(
        b_open <= PROPAGATION_MS,
        "B opened {b_open} ms after A's transition"
    );
    assert!(
        metric(
            &b,
            "redfuse_breaker_transitions_total",
            &[
                ("upstream", "primary"),
                ("to", "open"),
                ("reason", "fleet_quorum")
            ]
        ) >= 1.0
    );
    // Open on the fleet's word: cached reads are served, no upstream needed.
    let mut c = b.client();
    assert_frame(&c.cmd(&["GET", "fleet:k"]), b"$1\r\nv\r\n", "cached GET");

    // A recovers by itself; its "closed" makes B probe at once instead of in 30 s.
    relay.set_mode(FaultMode::Pass);
    eventually("A closed again", secs(15), || state(&a) == "closed");
    let recovered = wait_heard(&b, "a", "closed", secs(2));
    let t = Instant::now();
    eventually("B closed on the fleet's recovery", secs(5), || {
        state(&b) == "closed"
    });
    eprintln!(
        "fleet recovery: A's close reached B in {} ms, B closed {:?} after that",
        delay_ms(&recovered),
        t.elapsed()
    );
    assert!(
        metric(
            &b,
            "redfuse_breaker_transitions_total",
            &[
                ("upstream", "primary"),
                ("to", "half_open"),
                ("reason", "fleet_recovered")
            ]
        ) >= 1.0
    );
    assert_frame(
        &c.cmd(&["GET", "fleet:k"]),
        b"$1\r\nv\r\n",
        "GET after healing",
    );
}

#[test]
fn a_fleet_wide_force_open_reaches_b_and_a_late_starter() {
    let redis = RedisServer::start();
    let dir = TempDir::new("fleet-force");
    let instance = |id| Instance {
        id,
        upstream: redis.addr(),
        coordination: redis.addr(),
        probe_ms: 100,
        open_base_ms: 400,
        quorum: None,
    };
    let a = start(&dir, &instance("a"));
    let b = start(&dir, &instance("b"));
    wait_synced(&[&a, &b]);

    let path = "/breakers/primary/force-open?scope=fleet";
    let (status, _) = send(&a.admin_addr(), "POST", path, None, None);
    assert_eq!(status, 401, "no token");
    let (status, body) = send(
        &a.admin_addr(),
        "POST",
        "/breakers/primary/force-open?scope=galaxy",
        Some(TOKEN),
        None,
    );
    assert_eq!(status, 400, "{body}");
    assert_eq!(mode(&a), "normal", "a refused request changes nothing");

    let sent = Instant::now();
    let (status, body) = send(&a.admin_addr(), "POST", path, Some(TOKEN), None);
    assert_eq!(status, 200, "{body}");
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reply["mode"], "force_open");
    assert_eq!(reply["fleet"]["published"], true, "{reply}");
    assert!(reply["fleet"]["receivers"].as_u64() >= Some(2), "{reply}");
    eventually("B forced open", secs(2), || mode(&b) == "force_open");
    eprintln!(
        "fleet-wide force-open reached B within {:?}",
        sent.elapsed()
    );
    assert_eq!(state(&b), "open");
    let mut c = b.client();
    let reply = c.cmd_str(&["SET", "fleet:k", "v"]);
    assert!(reply.contains("circuit open"), "{reply}");

    // An instance that starts later catches up from the hash.
    let late = start(&dir, &instance("late"));
    eventually("the late starter forced open", secs(5), || {
        mode(&late) == "force_open"
    });

    let (status, body) = send(
        &b.admin_addr(),
        "POST",
        "/breakers/primary/normal?scope=fleet",
        Some(TOKEN),
        None,
    );
    assert_eq!(status, 200, "{body}");
    for rf in [&a, &b, &late] {
        eventually("back to normal everywhere", secs(3), || {
            mode(rf) == "normal"
        });
        eventually("closed again", secs(5), || state(rf) == "closed");
    }
    assert_frame(&c.cmd(&["SET", "fleet:k", "v"]), b"+OK\r\n", "SET");
}

#[test]
fn without_the_coordination_redis_both_work_alone_and_say_so_once() {
    let redis = RedisServer::start();
    let mut coordination = RedisServer::start();
    let relay = FaultRelay::start(&redis.addr());
    let dir = TempDir::new("fleet-down");
    let a = start(
        &dir,
        &Instance {
            id: "a",
            upstream: relay.addr(),
            coordination: coordination.addr(),
            probe_ms: 100,
            open_base_ms: 400,
            quorum: Some(1),
        },
    );
    let b = start(
        &dir,
        &Instance {
            id: "b",
            upstream: redis.addr(),
            coordination: coordination.addr(),
            probe_ms: 100,
            open_base_ms: 400,
            quorum: Some(1),
        },
    );
    wait_synced(&[&a, &b]);
    for rf in [&a, &b] {
        assert_eq!(metric(rf, "redfuse_fleet_sync_up", &[]), 1.0);
        assert_eq!(metric(rf, "redfuse_fleet_enabled", &[]), 1.0);
    }

    coordination.kill();
    for rf in [&a, &b] {
        eventually("sync down in the metric", secs(5), || {
            metric(rf, "redfuse_fleet_sync_up", &[]) == 0.0
        });
        assert_eq!(get_json(&rf.admin_addr(), "/fleet")["sync_up"], false);
    }

    // Traffic is served by both, without waiting on the coordination Redis.
    for rf in [&a, &b] {
        let t = Instant::now();
        cached_read_ok(rf);
        eprintln!(
            "SET + GET with the coordination Redis down: {:?}",
            t.elapsed()
        );
        assert!(
            t.elapsed() < secs(1),
            "a SET and a GET took {:?}",
            t.elapsed()
        );
    }
    // A's breaker works alone: it opens on its own failures, and B (quorum 1) does not
    // follow, because it cannot hear it.
    relay.set_mode(FaultMode::Reset);
    eventually("A open alone", secs(5), || state(&a) == "open");
    eventually("A's report counted as undelivered", secs(5), || {
        metric(&a, "redfuse_fleet_dropped_total", &[]) >= 1.0
    });
    let mut c = a.client();
    assert_frame(
        &c.cmd(&["GET", "fleet:k"]),
        b"$1\r\nv\r\n",
        "A's cached GET",
    );
    // Give B the time it needed above (a few ms) many times over to follow, which it must
    // not: nothing reaches it.
    let quiet = Instant::now();
    while quiet.elapsed() < ms(500) {
        assert_eq!(state(&b), "closed", "B cannot know");
        std::thread::sleep(ms(20));
    }
    cached_read_ok(&b);
    relay.set_mode(FaultMode::Pass);
    eventually("A heals alone", secs(10), || state(&a) == "closed");

    // One log line per change, not one per failed attempt (catch-up runs every 300 ms).
    for rf in [&a, &b] {
        let down = rf
            .logs()
            .iter()
            .filter(|l| l.contains("fleet sync down"))
            .count();
        assert_eq!(down, 1, "{}", rf.logs_text());
    }

    coordination.restart();
    for rf in [&a, &b] {
        eventually("sync up again", secs(10), || {
            metric(rf, "redfuse_fleet_sync_up", &[]) == 1.0
        });
        assert!(rf.wait_for_log("fleet sync up again", secs(2)));
    }
    // A re-announced its latest state: B hears of it once the hash is back.
    let heard = wait_heard(&b, "a", "closed", secs(5));
    assert_eq!(heard["reason"], "probe_success", "{heard}");
}

#[test]
fn check_config_names_bad_fleet_fields() {
    for (text, field) in [
        ("[fleet]\nenabled = true\nquorum = 0\n", "fleet.quorum"),
        ("[fleet]\nwindow_ms = 0\n", "fleet.window_ms"),
        (
            "[fleet]\nenabled = true\nredis = \"rediss://h:1\"\n",
            "fleet.redis",
        ),
        ("[fleet]\nenabeld = true\n", "enabeld"),
    ] {
        let dir = TempDir::new("fleet-check");
        let path = dir.write("bad.toml", text);
        let o = run_redfuse(&["--check-config", &path.to_string_lossy()], &[], secs(10));
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{text}: {err}");
        assert!(err.contains(field), "{text}: {err}");
    }
    let o = run_redfuse(
        &["--check-config"],
        &[
            ("REDFUSE_FLEET__QUORUM", "0"),
            ("REDFUSE_FLEET__ENABLED", "true"),
        ],
        secs(10),
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("fleet.quorum"));

    // Without [fleet], scope=fleet is refused and nothing is changed.
    let (_redis, rf) = setup(&["--admin-token", TOKEN]);
    let name = rf_upstream(&rf);
    let (status, body) = send(
        &rf.admin_addr(),
        "POST",
        &format!("/breakers/{name}/force-open?scope=fleet"),
        Some(TOKEN),
        Some(&json!({})),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("[fleet]"), "{body}");
    assert_eq!(get_json(&rf.admin_addr(), "/fleet")["enabled"], false);
    assert_eq!(metric(&rf, "redfuse_fleet_enabled", &[]), 0.0);
    assert_eq!(breaker(&rf.admin_addr(), &name)["mode"], "normal");
}

/// The only upstream's name (its address when unnamed).
fn rf_upstream(rf: &Redfuse) -> String {
    let b = get_json(&rf.admin_addr(), "/breakers");
    b.as_object().unwrap().keys().next().unwrap().clone()
}
