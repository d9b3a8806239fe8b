//! Process and upstream lifecycle: upstream down/up/killed, graceful
//! shutdown, admin endpoints (metrics, health, readiness), config checking.

mod support;

use std::time::{Duration, Instant};

use support::*;

/// Poll `SET probe 1` (reconnecting on errors) until it succeeds.
fn wait_until_commands_succeed(rf: &Redfuse, within: Duration) -> Result<(), String> {
    let mut c = rf.client();
    let mut last = String::new();
    let ok = wait_until(within, || {
        let reply = c
            .try_send(&resp_cmd(&["SET", "probe", "1"]))
            .map_err(ReadError::Io)
            .and_then(|()| c.try_read_frame(secs(5)));
        match reply {
            Ok(f) if f == b"+OK\r\n" => true,
            Ok(f) => {
                last = esc(&f);
                false
            }
            Err(e) => {
                last = format!("{e:?}");
                c = rf.client();
                false
            }
        }
    });
    if ok { Ok(()) } else { Err(last) }
}

#[test]
fn upstream_down_at_start_then_up() {
    let port = free_port();
    let upstream = format!("127.0.0.1:{port}");
    let rf = start_with_short_timeouts(&upstream);
    let mut c = rf.client();
    let started = Instant::now();
    // A write: degraded mode would answer a read with the configured miss reply (nil).
    c.send_cmd(&["INCR", "k"]);
    let reply = match c.try_read_frame(secs(10)) {
        Ok(f) => f,
        Err(e) => panic!("INCR with the upstream down: expected an `ERR redfuse` error, got {e:?}"),
    };
    let took = started.elapsed();
    assert!(
        reply.starts_with(b"-ERR redfuse: "),
        "INCR with the upstream down: expected `-ERR redfuse: ...`, got {}",
        esc(&reply)
    );
    assert!(
        took < ms(3000),
        "error took {took:?}, not faster than the 3000ms command timeout"
    );
    assert!(
        String::from_utf8_lossy(&reply).contains(&upstream),
        "error should name the upstream {upstream}: {}",
        esc(&reply)
    );
    // The client connection survives an upstream error.
    c.send_cmd(&["INCR", "k"]);
    let again = c.read_frame();
    assert!(
        again.starts_with(b"-ERR redfuse: "),
        "second INCR: {}",
        esc(&again)
    );

    let redis = RedisServer::start_on(port, &[]);
    assert_frame(&redis.cmd(&["SET", "k", "v"]), b"+OK\r\n", "direct SET");
    // The same client connection recovers within a bounded time.
    let mut last = Vec::new();
    let recovered = wait_until(secs(15), || {
        c.send_cmd(&["GET", "k"]);
        last = c.read_frame();
        last == b"$1\r\nv\r\n"
    });
    assert!(
        recovered,
        "existing client: GET still failing 15s after redis came up: {}",
        esc(&last)
    );
    let mut fresh = rf.client();
    assert_frame(
        &fresh.cmd(&["GET", "k"]),
        b"$1\r\nv\r\n",
        "fresh client after recovery",
    );
}

/// redfuse with a 500 ms connect timeout and a 3 s command timeout.
fn start_with_short_timeouts(upstream: &str) -> Redfuse {
    Redfuse::start(
        upstream,
        &[
            "--connect-timeout-ms",
            "500",
            "--command-timeout-ms",
            "3000",
        ],
    )
}

#[test]
fn upstream_killed_mid_pipeline_every_command_answered() {
    let mut redis = RedisServer::start();
    let rf = start_with_short_timeouts(&redis.addr());
    // A list big enough that LRANGE replies are sizeable.
    let mut d = redis.client();
    for chunk in 0..10 {
        let mut args = vec!["RPUSH".to_string(), "biglist".to_string()];
        args.extend((0..1000).map(|i| format!("element-{chunk}-{i}")));
        let r = d.cmd(&args);
        assert!(r.starts_with(b":"), "RPUSH: {}", esc(&r));
    }
    drop(d);

    const N: usize = 1000;
    // A blocking command at this index keeps everything after it pending at
    // redis (BLPOP blocks only this client, unlike DEBUG SLEEP which would
    // also delay the replies before it).
    const BLOCK_AT: usize = 10;
    let mut pipeline = Vec::new();
    let mut kinds = Vec::new();
    for i in 0..N {
        let (cmd, kind): (Vec<String>, u8) = if i == BLOCK_AT {
            (vec!["BLPOP".into(), "nothing".into(), "10".into()], b'*')
        } else {
            match i % 4 {
                0 => (vec!["SET".into(), format!("mk{i}"), "v".into()], b'+'),
                1 => (vec!["GET".into(), format!("mk{}", i - 1)], b'$'),
                2 => (
                    vec!["LRANGE".into(), "biglist".into(), "0".into(), "-1".into()],
                    b'*',
                ),
                _ => (vec!["DEBUG".into(), "SLEEP".into(), "0".into()], b'+'),
            }
        };
        pipeline.extend(resp_cmd(&cmd));
        kinds.push(kind);
    }
    let mut c = rf.client();
    c.send(&pipeline);
    // Replies before the BLPOP arrive; once redis reports the BLPOP blocked,
    // kill it: the BLPOP and the 989 commands behind it are pending.
    for (i, kind) in kinds.iter().enumerate().take(BLOCK_AT) {
        let f = c.read_frame();
        assert_eq!(
            f[0],
            *kind,
            "reply #{i} before the kill: {}",
            esc(&f[..f.len().min(200)])
        );
    }
    redis.wait_blocked_clients(1);
    redis.kill();
    let killed_at = Instant::now();

    let deadline = killed_at + secs(20);
    let mut replies = BLOCK_AT;
    let mut errors = 0;
    let mut first_error = None;
    let mut closed = false;
    while replies < N {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        match c.try_read_frame(deadline - now) {
            Ok(f) => {
                if f[0] == b'-' {
                    errors += 1;
                    first_error.get_or_insert_with(|| String::from_utf8_lossy(&f).into_owned());
                } else {
                    assert_eq!(
                        f[0],
                        kinds[replies],
                        "reply #{replies} has the wrong type: {}",
                        esc(&f[..f.len().min(80)])
                    );
                }
                replies += 1;
            }
            Err(ReadError::Closed(rest)) => {
                closed = true;
                assert!(
                    rest.is_empty(),
                    "partial frame before close: {}",
                    esc(&rest)
                );
                break;
            }
            Err(ReadError::Timeout(_)) => break,
            Err(e) => panic!("reading replies after the kill: {e:?}"),
        }
    }
    let took = killed_at.elapsed();
    assert_eq!(
        replies, N,
        "after killing redis mid-pipeline only {replies} of {N} commands got a reply \
         (connection closed: {closed}, waited {took:?}, errors: {errors}, first error: {first_error:?})"
    );
    assert!(
        errors > 0,
        "redis was killed while BLPOP was in flight, yet no command failed"
    );
    let first_error = first_error.unwrap();
    assert!(
        first_error.starts_with("-ERR redfuse: "),
        "errors should come from redfuse: {first_error}"
    );
    eprintln!(
        "{N} replies ({errors} errors) within {took:?} of the kill; first error: {first_error}"
    );

    // The proxy is alive and reports the outage promptly to new clients.
    let mut fresh = rf.client();
    let t = Instant::now();
    let r = fresh.cmd(&["INCR", "k"]);
    assert!(
        r.starts_with(b"-ERR redfuse: "),
        "INCR while redis is down: {}",
        esc(&r)
    );
    assert!(
        t.elapsed() < secs(3),
        "error while down took {:?}",
        t.elapsed()
    );
}

#[test]
fn upstream_restart_recovers() {
    let mut redis = RedisServer::start();
    let rf = start_with_short_timeouts(&redis.addr());
    let mut c = rf.client();
    assert_frame(&c.cmd(&["SET", "k", "v"]), b"+OK\r\n", "SET before restart");
    redis.kill();
    let r = c.cmd(&["INCR", "k"]);
    assert!(
        r.starts_with(b"-ERR redfuse: "),
        "INCR while redis is down: {}",
        esc(&r)
    );
    redis.restart();
    if let Err(last) = wait_until_commands_succeed(&rf, secs(15)) {
        panic!("commands still failing 15s after redis restarted on the same port; last: {last}");
    }
    let mut last = Vec::new();
    let ok = wait_until(secs(10), || {
        last = c.cmd(&["PING"]);
        last == b"+PONG\r\n"
    });
    assert!(
        ok,
        "the pre-existing client did not recover: {}",
        esc(&last)
    );
    assert_frame(
        &c.cmd(&["GET", "k"]),
        b"$-1\r\n",
        "data is gone after restart (no persistence)",
    );
}

#[test]
fn graceful_shutdown_finishes_in_flight_command() {
    let redis = RedisServer::start();
    let mut rf = Redfuse::start(&redis.addr(), &["--shutdown-timeout-ms", "5000"]);
    let mut a = rf.client();
    assert_frame(&a.cmd(&["PING"]), b"+PONG\r\n", "PING");
    a.send_cmd(&["BLPOP", "nothing", "2"]);
    redis.wait_blocked_clients(1);
    let sent_at = Instant::now();
    rf.sigterm();

    // New connections are refused while the in-flight command finishes.
    let mut last = String::new();
    let refused = wait_until(secs(3), || match RawClient::try_connect(&rf.addr()) {
        Err(_) => true,
        Ok(mut c) => {
            // Accepted: it must at least not be served. A connection that
            // the kernel queued while the listener was closing is reset when
            // the listener goes, so the write itself may fail: not served.
            if let Err(e) = c.try_send(&resp_cmd(&["PING"])) {
                last = format!("write failed: {e}");
                return false;
            }
            last = format!("{:?}", c.try_read_frame(ms(200)));
            false
        }
    });
    assert!(
        refused,
        "new connections still accepted 3s after SIGTERM; last attempt read: {last}"
    );
    assert!(
        rf.is_running(),
        "redfuse exited before the in-flight BLPOP (2s) finished"
    );

    let reply = match a.try_read_frame(secs(6)) {
        Ok(f) => f,
        Err(e) => panic!("in-flight BLPOP reply lost during graceful shutdown: {e:?}"),
    };
    assert_frame(&reply, b"*-1\r\n", "in-flight BLPOP reply after SIGTERM");
    let status = rf
        .wait_exit(secs(6))
        .unwrap_or_else(|| panic!("redfuse still running 6s after its in-flight reply"));
    assert!(status.success(), "exit status after SIGTERM: {status}");
    assert!(
        sent_at.elapsed() < secs(6),
        "shutdown took {:?} (deadline 5s)",
        sent_at.elapsed()
    );
}

#[test]
fn graceful_shutdown_with_idle_client_exits_promptly() {
    let redis = RedisServer::start();
    let mut rf = Redfuse::start(&redis.addr(), &["--shutdown-timeout-ms", "10000"]);
    let mut idle = rf.client();
    assert_frame(&idle.cmd(&["PING"]), b"+PONG\r\n", "PING");
    let t = Instant::now();
    rf.sigterm();
    let status = rf.wait_exit(secs(3)).unwrap_or_else(|| {
        panic!("redfuse with only an idle client (no in-flight commands) still running 3s after SIGTERM")
    });
    assert!(status.success(), "exit status: {status}");
    assert!(
        idle.wait_closed(secs(2)),
        "idle client not disconnected at shutdown"
    );
    eprintln!("exited {:?} after SIGTERM", t.elapsed());
}

#[test]
fn shutdown_deadline_bounds_exit_with_stuck_command() {
    let redis = RedisServer::start();
    let mut rf = Redfuse::start(&redis.addr(), &["--shutdown-timeout-ms", "500"]);
    let mut a = rf.client();
    a.send_cmd(&["BLPOP", "nothing", "0"]);
    redis.wait_blocked_clients(1);
    let t = Instant::now();
    rf.sigterm();
    let status = rf.wait_exit(secs(5)).unwrap_or_else(|| {
        panic!("redfuse still running 5s after SIGTERM with --shutdown-timeout-ms 500 and a BLPOP 0 in flight")
    });
    let took = t.elapsed();
    assert!(
        took >= ms(400),
        "exited after {took:?}, before the 500ms deadline for the in-flight BLPOP"
    );
    assert!(
        a.wait_closed(secs(2)),
        "client with a stuck command not disconnected"
    );
    eprintln!("exit {status} after {took:?}");
}

#[test]
fn metrics_healthz_and_ready() {
    let redis = RedisServer::start();
    let rf = Redfuse::start(&redis.addr(), &[]);
    let admin = rf.admin_addr();

    let (status, body) = http_get(&admin, "/healthz");
    assert_eq!(status, 200, "/healthz: {body}");

    let (status, body) = http_get(&admin, "/ready");
    assert_eq!(status, 200, "/ready: {body}");
    let json: serde_json::Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("/ready body is not JSON ({e}): {body}"));
    assert!(json.is_object() || json.is_array(), "/ready JSON: {json}");

    let m0 = rf.metrics();
    assert!(
        metric_exists(&m0, "redfuse_client_connections"),
        "/metrics lacks redfuse_client_connections:\n{m0}"
    );
    for line in m0
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        assert!(
            line.starts_with("redfuse_"),
            "metric not prefixed redfuse_: {line}"
        );
    }
    let get_ok = [("command", "get"), ("result", "ok")];
    let set_ok = [("command", "set"), ("result", "ok")];
    let gets0 = metric_sum(&m0, "redfuse_commands_total", &get_ok);
    let sets0 = metric_sum(&m0, "redfuse_commands_total", &set_ok);

    let mut clients: Vec<RawClient> = (0..3).map(|_| rf.client()).collect();
    for c in clients.iter_mut() {
        assert_frame(&c.cmd(&["PING"]), b"+PONG\r\n", "PING");
    }
    let mut text = String::new();
    let three = wait_until(secs(5), || {
        text = rf.metrics();
        metric_sum(&text, "redfuse_client_connections", &[]) == 3.0
    });
    assert!(
        three,
        "redfuse_client_connections != 3 with 3 clients connected:\n{text}"
    );

    let c = &mut clients[0];
    assert_frame(&c.cmd(&["SET", "mk", "v"]), b"+OK\r\n", "SET");
    for _ in 0..3 {
        assert_frame(&c.cmd(&["GET", "mk"]), b"$1\r\nv\r\n", "GET");
    }
    let counted = wait_until(secs(5), || {
        text = rf.metrics();
        metric_sum(&text, "redfuse_commands_total", &get_ok) >= gets0 + 3.0
            && metric_sum(&text, "redfuse_commands_total", &set_ok) >= sets0 + 1.0
    });
    assert!(
        counted,
        "redfuse_commands_total{{command=\"get\",result=\"ok\"}} did not grow by 3 (from {gets0}) and \
         {{command=\"set\",result=\"ok\"}} by 1 (from {sets0}):\n{text}"
    );

    clients.truncate(1);
    let one = wait_until(secs(5), || {
        text = rf.metrics();
        metric_sum(&text, "redfuse_client_connections", &[]) == 1.0
    });
    assert!(
        one,
        "redfuse_client_connections != 1 after 2 of 3 clients left:\n{text}"
    );

    let (status, _) = http_get(&admin, "/no-such-path");
    assert_eq!(status, 404, "unknown admin path");
}

#[test]
fn check_config_good_and_bad_files() {
    let dir = TempDir::new("config");
    let good = dir.write(
        "good.toml",
        r#"
listen = "127.0.0.1:6390"
upstream = "127.0.0.1:6379"
admin_listen = "127.0.0.1:9190"
log_level = "info"
upstream_connections = 4
connect_timeout_ms = 1000
command_timeout_ms = 2000
max_clients = 100
"#,
    );
    let out = run_redfuse(&["--check-config", good.to_str().unwrap()], &[], secs(10));
    assert!(
        out.status.success(),
        "--check-config on a good file failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let bad = dir.write(
        "bad.toml",
        r#"
listen = "127.0.0.1:6390"
upstream = "127.0.0.1:6379"
admin_listen = "127.0.0.1:9190"
max_clients = "lots"
"#,
    );
    let out = run_redfuse(&["--check-config", bad.to_str().unwrap()], &[], secs(10));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "--check-config accepted a bad file; stderr: {stderr}"
    );
    assert!(
        stderr.contains("max_clients"),
        "the error should name the bad field `max_clients`:\n{stderr}"
    );

    // A semantic error and an unknown key are named too.
    for (name, body, field) in [
        ("bad-format.toml", "log_format = \"xml\"\n", "log_format"),
        ("unknown.toml", "max_clientz = 5\n", "max_clientz"),
    ] {
        let path = dir.write(name, body);
        let out = run_redfuse(&["--check-config", path.to_str().unwrap()], &[], secs(10));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "--check-config accepted {name} ({body:?}); stderr: {stderr}"
        );
        assert!(
            stderr.contains(field),
            "--check-config on {body:?} should name `{field}`:\n{stderr}"
        );
    }

    let missing = dir.path().join("does-not-exist.toml");
    let out = run_redfuse(
        &["--check-config", missing.to_str().unwrap()],
        &[],
        secs(10),
    );
    assert!(
        !out.status.success(),
        "--check-config accepted a missing file"
    );
}
