//! Fault injection drills against a real redis-server: the breaker, degraded mode and the
//! client see injected faults as they would see real ones, drills end by themselves, and
//! only the admin token starts or stops them, only where they are enabled.

mod support;

use std::time::Instant;

use serde_json::json;
use support::admin::{breaker, get_json, send};
use support::*;

const TOKEN: &str = "drill-t0ken";

fn start(drills: &str) -> (RedisServer, Redfuse, TempDir) {
    let redis = RedisServer::start();
    let dir = TempDir::new("drills");
    let text = format!(
        "command_timeout_ms = 300\nconnect_timeout_ms = 300\n\
         health_probe_interval_ms = 100\nhealth_probe_timeout_ms = 300\n\
         admin_token = \"{TOKEN}\"\n\
         [[upstreams]]\nname = \"primary\"\naddr = \"{}\"\n\
         [breaker]\nopen_base_ms = 400\nopen_max_ms = 800\njitter = 0.0\n\
         half_open_max_wait_ms = 300\nwindow_ms = 2000\nbucket_ms = 100\n{drills}",
        redis.addr()
    );
    let path = dir.write("redfuse.toml", &text);
    let rf = start_with_config(&path);
    (redis, rf, dir)
}

const ENABLED: &str = "[drills]\nenabled = true\nmax_duration_ms = 10000\n";

fn state(rf: &Redfuse) -> String {
    breaker(&rf.admin_addr(), "primary")["state"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn post(rf: &Redfuse, body: serde_json::Value) -> (u16, String) {
    send(
        &rf.admin_addr(),
        "POST",
        "/faults",
        Some(TOKEN),
        Some(&body),
    )
}

fn active(rf: &Redfuse) -> Vec<serde_json::Value> {
    get_json(&rf.admin_addr(), "/faults")["drills"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn an_error_drill_opens_the_breaker_serves_cached_reads_and_ends_by_itself() {
    let (_redis, rf, _dir) = start(ENABLED);
    let mut c = rf.client();
    assert_frame(&c.cmd(&["SET", "drill:k", "v"]), b"+OK\r\n", "SET");
    assert_frame(
        &c.cmd(&["GET", "drill:k"]),
        b"$1\r\nv\r\n",
        "GET fills the cache",
    );

    let (status, body) = post(
        &rf,
        json!({"upstream": "primary", "kind": "error", "share": 1.0, "duration_ms": 1500}),
    );
    assert_eq!(status, 201, "{body}");
    let started = Instant::now();
    let drill: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(drill["kind"], "error");
    assert!(
        drill["reply"].as_str().unwrap().starts_with("-LOADING"),
        "{drill}"
    );

    eventually("breaker open under the drill", secs(3), || {
        state(&rf) == "open"
    });
    eprintln!(
        "error drill: breaker open {:?} after the drill started",
        started.elapsed()
    );
    // Open: the cached read is served, as in a real outage.
    assert_frame(&c.cmd(&["GET", "drill:k"]), b"$1\r\nv\r\n", "cached GET");
    let list = active(&rf);
    assert_eq!(list.len(), 1, "{list:?}");
    assert!(list[0]["injected"].as_u64() >= Some(1), "{list:?}");
    let m = rf.metrics();
    assert!(
        metric_sum(
            &m,
            "redfuse_fault_injections_total",
            &[("upstream", "primary"), ("kind", "error")]
        ) >= 1.0
    );
    assert_eq!(metric_sum(&m, "redfuse_drills_active", &[]), 1.0);
    assert!(
        metric_sum(
            &m,
            "redfuse_breaker_transitions_total",
            &[("upstream", "primary"), ("to", "open")]
        ) >= 1.0
    );

    // The drill ends by itself and the breaker heals.
    eventually("drill expired", secs(5), || active(&rf).is_empty());
    assert!(
        started.elapsed() >= ms(1500),
        "ended early: {:?}",
        started.elapsed()
    );
    eventually("breaker closed after the drill", secs(5), || {
        state(&rf) == "closed"
    });
    eprintln!(
        "error drill: breaker closed {:?} after the drill started",
        started.elapsed()
    );
    assert_eq!(metric_sum(&rf.metrics(), "redfuse_drills_active", &[]), 0.0);
    assert_frame(&c.cmd(&["SET", "drill:k", "w"]), b"+OK\r\n", "SET after");
    assert_frame(&c.cmd(&["GET", "drill:k"]), b"$1\r\nw\r\n", "GET after");
    assert!(rf.logs_contain("fault injection drill started"));
    assert!(rf.wait_for_log("fault injection drill ended (expired)", secs(2)));
}

#[test]
fn delay_and_refuse_drills_reach_the_client_as_real_faults_and_delete_ends_them() {
    let (_redis, rf, _dir) = start(ENABLED);
    let mut c = rf.client();
    assert_frame(&c.cmd(&["SET", "drill:k", "v"]), b"+OK\r\n", "SET");

    // A delay under the command timeout: the reply, late.
    let (status, body) = post(
        &rf,
        json!({"upstream": "primary", "kind": "delay", "share": 1.0, "duration_ms": 5000, "delay_ms": 120}),
    );
    assert_eq!(status, 201, "{body}");
    let t = Instant::now();
    assert_frame(&c.cmd(&["GET", "drill:k"]), b"$1\r\nv\r\n", "delayed GET");
    let took = t.elapsed();
    eprintln!("delay drill of 120 ms: GET took {took:?}");
    assert!(took >= ms(120), "{took:?}");
    let (status, body) = send(&rf.admin_addr(), "DELETE", "/faults", Some(TOKEN), None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["cleared"],
        1
    );

    // A delay past the command timeout (300 ms): the timeout a server that slow causes.
    let (status, body) = post(
        &rf,
        json!({"upstream": "primary", "kind": "delay", "share": 1.0, "duration_ms": 5000, "delay_ms": 400}),
    );
    assert_eq!(status, 201, "{body}");
    let reply = c.cmd_str(&["INCR", "drill:n"]);
    assert!(reply.contains("timed out after 300 ms"), "{reply}");
    send(&rf.admin_addr(), "DELETE", "/faults", Some(TOKEN), None);
    eventually("closed between drills", secs(5), || state(&rf) == "closed");

    // Refused connections: the client gets the refusal until the breaker opens.
    let (status, body) = post(
        &rf,
        json!({"upstream": "primary", "kind": "refuse", "share": 1.0, "duration_ms": 5000}),
    );
    assert_eq!(status, 201, "{body}");
    let reply = c.cmd_str(&["INCR", "drill:n"]);
    assert!(
        reply.contains("connection refused (redfuse drill)") || reply.contains("circuit open"),
        "{reply}"
    );
    eventually("breaker open on refusals", secs(3), || state(&rf) == "open");
    assert!(
        metric_sum(
            &rf.metrics(),
            "redfuse_fault_injections_total",
            &[("upstream", "primary"), ("kind", "refuse")]
        ) >= 1.0
    );
    let (status, _) = send(&rf.admin_addr(), "DELETE", "/faults", Some(TOKEN), None);
    assert_eq!(status, 200);
    assert!(active(&rf).is_empty());
    eventually("healed once deleted", secs(5), || state(&rf) == "closed");
    assert_frame(&c.cmd(&["GET", "drill:k"]), b"$1\r\nv\r\n", "GET after");
}

#[test]
fn drills_need_the_token_the_flag_and_a_sane_request() {
    let (_redis, rf, _dir) = start(ENABLED);
    let good = json!({"upstream": "primary", "kind": "error", "share": 0.5, "duration_ms": 1000});
    let admin = rf.admin_addr();
    let (status, _) = send(&admin, "POST", "/faults", None, Some(&good));
    assert_eq!(status, 401, "no token");
    let (status, _) = send(&admin, "POST", "/faults", Some("wrong"), Some(&good));
    assert_eq!(status, 401, "wrong token");
    let (status, _) = send(&admin, "DELETE", "/faults", None, None);
    assert_eq!(status, 401);
    assert!(active(&rf).is_empty(), "nothing started");

    for (body, want, says) in [
        (
            json!({"upstream": "primary", "kind": "error", "share": 2.0, "duration_ms": 1000}),
            400,
            "share",
        ),
        (
            json!({"upstream": "primary", "kind": "error", "share": 1.0, "duration_ms": 60000}),
            400,
            "max_duration_ms",
        ),
        (
            json!({"upstream": "primary", "kind": "error", "share": 1.0}),
            400,
            "duration_ms",
        ),
        (
            json!({"upstream": "primary", "kind": "delay", "share": 1.0, "duration_ms": 100}),
            400,
            "delay_ms",
        ),
        (
            json!({"upstream": "primary", "kind": "melt", "share": 1.0, "duration_ms": 100}),
            400,
            "kind",
        ),
        (
            json!({"upstream": "nope", "kind": "error", "share": 1.0, "duration_ms": 100}),
            404,
            "nope",
        ),
    ] {
        let (status, text) = post(&rf, body.clone());
        assert_eq!(status, want, "{body}: {text}");
        assert!(text.contains(says), "{body}: {text}");
    }
    assert!(active(&rf).is_empty());

    // Disabled (the default), every route says how to enable it.
    let (_redis2, off, _dir2) = start("");
    for method in ["GET", "POST", "DELETE"] {
        let (status, text) = send(
            &off.admin_addr(),
            method,
            "/faults",
            Some(TOKEN),
            Some(&good),
        );
        assert_eq!(status, 404, "{method}: {text}");
        assert!(text.contains("[drills] enabled = true"), "{text}");
    }
    assert_eq!(
        metric_sum(&off.metrics(), "redfuse_drills_active", &[]),
        0.0
    );

    // Enabled without an admin token is a configuration error, named.
    let dir = TempDir::new("drills-check");
    let path = dir.write("bad.toml", "[drills]\nenabled = true\n");
    let o = run_redfuse(&["--check-config", &path.to_string_lossy()], &[], secs(10));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("drills.enabled") && err.contains("admin_token"),
        "{err}"
    );
}
