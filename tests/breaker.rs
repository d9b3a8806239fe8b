//! End-to-end circuit breaker behaviour: a real redis-server, the redfuse binary, and a fault
//! relay (or a fake server where Redis cannot be made to misbehave on demand) between them.
//!
//! Timings are short (open period 400 ms, probe every 100 ms, command timeout 300 ms) so the
//! suite stays quick; every wait is bounded and polls, none sleeps for synchronisation.

mod support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use support::*;

const COMMAND_TIMEOUT_MS: u64 = 300;

fn config(dir: &TempDir, upstreams: &[(&str, &str, &str)], extra: &str) -> String {
    let probe = if extra.contains("health_probe_interval_ms") {
        ""
    } else {
        "health_probe_interval_ms = 100\n"
    };
    let mut text = format!(
        "command_timeout_ms = {COMMAND_TIMEOUT_MS}\nconnect_timeout_ms = 300\n{probe}{extra}\n"
    );
    for (name, addr, role) in upstreams {
        text.push_str(&format!(
            "[[upstreams]]\nname = \"{name}\"\naddr = \"{addr}\"\nrole = \"{role}\"\n"
        ));
    }
    // Degraded mode would answer reads from the cache or with nil; these tests look at the
    // breaker itself, so a miss is the circuit's error and nothing is cached.
    text.push_str("[cache]\nenabled = false\nmiss = \"error\"\n");
    text.push_str(
        "[breaker]\nopen_base_ms = 400\nopen_max_ms = 1600\nhalf_open_max_wait_ms = 300\nwindow_ms = 2000\nbucket_ms = 100\n",
    );
    dir.write("redfuse.toml", &text)
        .to_string_lossy()
        .into_owned()
}

fn start(upstreams: &[(&str, &str, &str)], extra: &str, breaker_extra: &str) -> (Redfuse, TempDir) {
    let dir = TempDir::new("breaker");
    let mut path = config(&dir, upstreams, extra);
    if !breaker_extra.is_empty() {
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(breaker_extra);
        path = dir
            .write("redfuse.toml", &text)
            .to_string_lossy()
            .into_owned();
    }
    let rf = start_with_config(std::path::Path::new(&path));
    (rf, dir)
}

fn breaker_state(rf: &Redfuse, upstream: &str) -> f64 {
    metric_value(
        &rf.metrics(),
        "redfuse_breaker_state",
        &[("upstream", upstream)],
    )
    .unwrap_or(-1.0)
}

const OPEN: f64 = 2.0;
const CLOSED: f64 = 0.0;

/// Sends GETs until one is rejected by the open circuit; returns how long that took.
fn drive_until_open(client: &mut RawClient, timeout: Duration) -> Duration {
    let start = Instant::now();
    while start.elapsed() < timeout {
        let t = Instant::now();
        let reply = client.cmd_str(&["GET", "k"]);
        assert!(
            t.elapsed() < ms(COMMAND_TIMEOUT_MS + 700),
            "a request waited {:?}, longer than the command timeout allows",
            t.elapsed()
        );
        if reply.contains("circuit open") {
            return start.elapsed();
        }
    }
    panic!("breaker did not open within {timeout:?}");
}

/// While Open, requests are answered at once: the median is far below a millisecond on
/// loopback, and no request comes anywhere near the command timeout. Timed with a bare socket
/// and a small buffer so that the measuring client costs next to nothing itself.
fn assert_fast_rejections(rf: &Redfuse) {
    let mut s = std::net::TcpStream::connect(rf.addr()).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(secs(5))).unwrap();
    let request = resp_cmd(&["GET", "k"]);
    let mut times = Vec::new();
    let mut buf = [0u8; 512];
    for _ in 0..200 {
        let t = Instant::now();
        s.write_all(&request).unwrap();
        let mut got = Vec::new();
        while !got.ends_with(b"\r\n") {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "redfuse closed the connection");
            got.extend_from_slice(&buf[..n]);
        }
        times.push(t.elapsed());
        let reply = String::from_utf8_lossy(&got).into_owned();
        assert!(
            reply.contains("circuit open"),
            "expected a circuit-open reply, got {reply}"
        );
    }
    times.sort();
    let median = times[times.len() / 2];
    let max = *times.last().unwrap();
    eprintln!("open-circuit replies: median {median:?}, max {max:?}");
    assert!(median < ms(1), "median open-circuit reply took {median:?}");
    assert!(
        max < ms(COMMAND_TIMEOUT_MS),
        "an open-circuit reply took {max:?}"
    );
}

fn wait_for_get(client: &mut RawClient, expected: &str, timeout: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let reply = client.cmd_str(&["GET", "k"]);
        if reply.contains(expected) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "no recovery within {timeout:?}; last reply {reply}"
        );
        std::thread::sleep(ms(20));
    }
}

#[test]
fn hard_down_opens_fast_rejects_in_microseconds_and_heals() {
    let mut redis = RedisServer::start();
    redis.cmd(&["SET", "k", "v1"]);
    let (rf, _dir) = start(&[("main", &redis.addr(), "primary")], "", "");
    let mut client = rf.client();
    assert!(client.cmd_str(&["GET", "k"]).contains("v1"));

    redis.kill();
    let to_open = drive_until_open(&mut client, secs(5));
    eprintln!("hard down: fault to open in {to_open:?}");
    assert_eq!(breaker_state(&rf, "main"), OPEN);
    assert_fast_rejections(&rf);

    redis.restart();
    redis.cmd(&["SET", "k", "v2"]);
    // Open period (<= 1600 ms with jitter) plus a probe interval, with room for a noisy machine.
    let healed = wait_for_get(&mut client, "v2", secs(6));
    eprintln!("hard down: restart to served in {healed:?}");
    eventually("breaker closed", secs(3), || {
        breaker_state(&rf, "main") == CLOSED
    });
    let m = rf.metrics();
    assert!(metric_sum(&m, "redfuse_breaker_transitions_total", &[("to", "open")]) >= 1.0);
    assert!(metric_sum(&m, "redfuse_breaker_transitions_total", &[("to", "closed")]) >= 1.0);
    assert!(
        metric_value(
            &m,
            "redfuse_breaker_rejected_total",
            &[("upstream", "main")]
        )
        .unwrap()
            >= 200.0
    );
}

#[test]
fn refused_upstream_opens_from_health_probes_alone() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let (rf, _dir) = start(&[("main", &addr, "primary")], "", "");
    // No client traffic at all: the probe must find out by itself.
    eventually("breaker opened by probes", secs(5), || {
        breaker_state(&rf, "main") == OPEN
    });
    let m = rf.metrics();
    assert!(
        metric_value(
            &m,
            "redfuse_health_probe_total",
            &[("upstream", "main"), ("result", "failure")]
        )
        .unwrap()
            >= 1.0
    );
    assert!(
        metric_value(
            &m,
            "redfuse_breaker_transitions_total",
            &[
                ("upstream", "main"),
                ("to", "open"),
                ("reason", "health_probe")
            ]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "opened by the probe's own rule"
    );
    let (status, body) = http_get(&rf.admin_addr(), "/ready");
    assert_eq!(
        status, 200,
        "a Redis outage must not make redfuse unready: {body}"
    );
    assert!(body.contains("\"breaker\":\"open\""), "{body}");

    // Redis appears: the breaker closes without any client request.
    let _redis = RedisServer::start_on(port, &[]);
    eventually("breaker closed by probes", secs(6), || {
        breaker_state(&rf, "main") == CLOSED
    });
    let mut client = rf.client();
    assert!(client.cmd_str(&["PING", "x"]).contains('x'));
    assert!(client.cmd_str(&["SET", "a", "1"]).contains("OK"));
}

#[test]
fn black_hole_times_out_within_the_command_timeout_then_opens() {
    let redis = RedisServer::start();
    let relay = FaultRelay::start(&redis.addr());
    let (rf, _dir) = start(&[("main", &relay.addr(), "primary")], "", "");
    let mut client = rf.client();
    assert!(client.cmd_str(&["SET", "k", "v"]).contains("OK"));
    relay.set_mode(FaultMode::BlackHole);
    let to_open = drive_until_open(&mut client, secs(10));
    eprintln!("black hole: fault to open in {to_open:?}");
    assert_fast_rejections(&rf);
    relay.set_mode(FaultMode::Pass);
    let healed = wait_for_get(&mut client, "v", secs(8));
    eprintln!("black hole: repair to served in {healed:?}");
}

#[test]
fn latency_spike_opens_on_slow_call_rate() {
    let redis = RedisServer::start();
    let relay = FaultRelay::start(&redis.addr());
    let breaker = "slow_call_threshold_ms = 50\nminimum_calls = 5\nconsecutive_failures = 1000\n";
    // Probes would also count as slow calls; keep them out to test client traffic alone.
    let (rf, _dir) = start(
        &[("main", &relay.addr(), "primary")],
        "health_probe_interval_ms = 0",
        breaker,
    );
    let mut client = rf.client();
    assert!(client.cmd_str(&["SET", "k", "v"]).contains("OK"));
    relay.set_mode(FaultMode::Delay(ms(120)));
    let to_open = drive_until_open(&mut client, secs(10));
    eprintln!("latency spike: fault to open in {to_open:?}");
    let m = rf.metrics();
    assert!(
        metric_sum(
            &m,
            "redfuse_breaker_transitions_total",
            &[("to", "open"), ("reason", "slow_call_rate")]
        ) >= 1.0,
        "{}",
        m.lines()
            .filter(|l| l.contains("transitions"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        metric_value(
            &m,
            "redfuse_breaker_calls_total",
            &[("upstream", "main"), ("outcome", "slow")]
        )
        .unwrap()
            >= 4.0
    );
}

/// A server that answers every command with `-LOADING`, like a Redis still loading its data.
fn loading_server() -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let handle = std::thread::spawn(move || {
        for stream in listener.incoming().take(64) {
            let Ok(mut s) = stream else { return };
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    let frames = split_frames(&buf);
                    let used: usize = frames.iter().map(|f| f.len()).sum();
                    buf.drain(..used);
                    for f in frames {
                        let reply: &[u8] = if f.windows(5).any(|w| w.eq_ignore_ascii_case(b"HELLO"))
                        {
                            // Let the handshake through so the LOADING replies reach the breaker.
                            b"*14\r\n$6\r\nserver\r\n$5\r\nredis\r\n$7\r\nversion\r\n$5\r\n7.0.0\r\n$5\r\nproto\r\n:2\r\n$2\r\nid\r\n:1\r\n$4\r\nmode\r\n$10\r\nstandalone\r\n$4\r\nrole\r\n$6\r\nmaster\r\n$7\r\nmodules\r\n*0\r\n"
                        } else {
                            b"-LOADING Redis is loading the dataset in memory\r\n"
                        };
                        if s.write_all(reply).is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, handle)
}

#[test]
fn loading_replies_count_as_failures_and_open() {
    let (addr, _server) = loading_server();
    let (rf, _dir) = start(
        &[("main", &addr, "primary")],
        "health_probe_interval_ms = 0",
        "",
    );
    let mut client = rf.client();
    let first = client.cmd_str(&["GET", "k"]);
    assert!(
        first.contains("LOADING"),
        "the client sees Redis's own reply: {first}"
    );
    drive_until_open(&mut client, secs(5));
    let m = rf.metrics();
    assert!(
        metric_sum(
            &m,
            "redfuse_breaker_transitions_total",
            &[("reason", "consecutive_failures")]
        ) >= 1.0
    );
}

#[test]
fn flapping_upstream_doubles_the_open_period() {
    let redis = RedisServer::start();
    let relay = FaultRelay::start(&redis.addr());
    let (rf, _dir) = start(&[("main", &relay.addr(), "primary")], "", "");
    relay.set_mode(FaultMode::Reset);
    eventually("first open", secs(5), || breaker_state(&rf, "main") == OPEN);
    let first = metric_value(
        &rf.metrics(),
        "redfuse_breaker_open_backoff_seconds",
        &[("upstream", "main")],
    )
    .unwrap();
    // Still failing when the breaker half-opens: the probe fails and it re-opens, longer.
    eventually("re-opened with a longer period", secs(5), || {
        let m = rf.metrics();
        metric_sum(
            &m,
            "redfuse_breaker_transitions_total",
            &[("from", "half_open"), ("to", "open")],
        ) >= 1.0
            && metric_value(
                &m,
                "redfuse_breaker_open_backoff_seconds",
                &[("upstream", "main")],
            )
            .unwrap()
                > first
    });
    relay.set_mode(FaultMode::Pass);
    eventually("closed after the flapping stops", secs(8), || {
        breaker_state(&rf, "main") == CLOSED
    });
}

#[test]
fn reads_fail_over_to_a_replica_while_the_primary_is_down() {
    let mut primary = RedisServer::start();
    let replica =
        RedisServer::start_with(&["--replicaof", "127.0.0.1", &primary.port().to_string()]);
    primary.cmd(&["SET", "k", "replicated"]);
    eventually("replica synced", secs(10), || {
        String::from_utf8_lossy(&replica.cmd(&["GET", "k"])).contains("replicated")
    });
    let (rf, _dir) = start(
        &[
            ("primary", &primary.addr(), "primary"),
            ("replica", &replica.addr(), "replica"),
        ],
        "",
        "",
    );
    let mut client = rf.client();
    assert!(client.cmd_str(&["GET", "k"]).contains("replicated"));
    primary.kill();
    eventually("primary breaker open", secs(5), || {
        breaker_state(&rf, "primary") == OPEN
    });
    // Reads now come from the replica; writes are answered at once with the circuit error.
    for _ in 0..20 {
        assert!(client.cmd_str(&["GET", "k"]).contains("replicated"));
    }
    let write = client.cmd_str(&["SET", "k", "x"]);
    assert!(
        write.contains("circuit open") && write.contains("'primary'"),
        "{write}"
    );
    assert_eq!(breaker_state(&rf, "replica"), CLOSED);
}

#[test]
fn admin_breaker_actions_need_a_configured_token() {
    let redis = RedisServer::start();
    let (rf, _dir) = start(&[("main", &redis.addr(), "primary")], "", "");
    let (status, _) = http_post(&rf.admin_addr(), "/breakers/main/force-open", None);
    assert_eq!(status, 403, "mutating endpoints are off without a token");
    let (status, body) = http_get(&rf.admin_addr(), "/breakers");
    assert_eq!(status, 200);
    assert!(
        body.contains("\"main\"") && body.contains("\"state\":\"closed\""),
        "{body}"
    );
    drop(rf);

    let (rf, _dir) = start(
        &[("main", &redis.addr(), "primary")],
        "admin_token = \"s3cret\"",
        "",
    );
    let admin = rf.admin_addr();
    assert_eq!(http_post(&admin, "/breakers/main/force-open", None).0, 401);
    assert_eq!(
        http_post(&admin, "/breakers/main/force-open", Some("wrong")).0,
        401
    );
    assert_eq!(
        http_post(&admin, "/breakers/nope/force-open", Some("s3cret")).0,
        404
    );
    assert_eq!(
        http_post(&admin, "/breakers/main/explode", Some("s3cret")).0,
        400
    );
    let (status, body) = http_post(&admin, "/breakers/main/force-open", Some("s3cret"));
    assert_eq!(status, 200, "{body}");
    let mut client = rf.client();
    assert!(client.cmd_str(&["GET", "k"]).contains("circuit open"));
    assert_eq!(
        http_post(&admin, "/breakers/main/reset", Some("s3cret")).0,
        200
    );
    assert!(!client.cmd_str(&["GET", "k"]).contains("circuit open"));
    // metrics-only: the breaker may compute "open" but never rejects.
    assert_eq!(
        http_post(&admin, "/breakers/main/metrics-only", Some("s3cret")).0,
        200
    );
    assert!(client.cmd_str(&["SET", "k", "v"]).contains("OK"));
}

#[test]
fn bulkhead_refuses_overflow_at_once_and_counts_it() {
    let redis = RedisServer::start();
    let relay = FaultRelay::start(&redis.addr());
    let (rf, _dir) = start(
        &[("main", &relay.addr(), "primary")],
        "max_inflight_per_upstream = 5\nhealth_probe_interval_ms = 0",
        "",
    );
    let mut c = rf.client();
    assert!(c.cmd_str(&["SET", "k", "v"]).contains("OK"));
    relay.set_mode(FaultMode::Delay(ms(150)));
    let n = 20;
    let mut pipeline = Vec::new();
    // Distinct keys: identical reads would share one request (single-flight).
    for i in 0..n {
        pipeline.extend_from_slice(&resp_cmd(&["GET", &format!("k{i}")]));
    }
    c.send(&pipeline);
    let replies = c.read_frames(n);
    let served = replies
        .iter()
        .filter(|r| r.as_slice() == b"$-1\r\n")
        .count();
    let refused = replies
        .iter()
        .filter(|r| String::from_utf8_lossy(r).contains("overloaded"))
        .count();
    assert_eq!(
        served,
        5,
        "{:?}",
        replies.iter().map(|r| esc(r)).collect::<Vec<_>>()
    );
    assert_eq!(refused, n - 5);
    let m = rf.metrics();
    assert_eq!(
        metric_value(
            &m,
            "redfuse_bulkhead_overflow_total",
            &[("upstream", "main")]
        ),
        Some((n - 5) as f64)
    );
}
