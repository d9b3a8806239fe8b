//! Client-facing limits and protocol hygiene: malformed input, oversized
//! bulk strings and arrays, the connection limit, and the idle timeout.

mod support;

use std::thread;
use std::time::Instant;

use support::*;

/// Send `input` on a fresh connection; expect a `-ERR Protocol error...` reply
/// and then the connection closed. Returns the error line.
#[track_caller]
fn expect_protocol_error_and_close(rf: &Redfuse, input: &[u8]) -> String {
    let mut c = rf.client();
    c.send(input);
    let reply = match c.try_read_frame(secs(5)) {
        Ok(f) => f,
        Err(e) => panic!(
            "input {}: expected a protocol error reply, got {e:?}",
            esc(input)
        ),
    };
    assert!(
        reply.starts_with(b"-ERR Protocol error"),
        "input {}: expected `-ERR Protocol error...`, got {}",
        esc(input),
        esc(&reply)
    );
    assert!(
        c.wait_closed(secs(5)),
        "input {}: connection not closed after the protocol error (unread: {})",
        esc(input),
        esc(c.pending_bytes())
    );
    assert!(
        c.pending_bytes().is_empty(),
        "input {}: unexpected bytes after the protocol error: {}",
        esc(input),
        esc(c.pending_bytes())
    );
    String::from_utf8_lossy(&reply).into_owned()
}

#[test]
fn malformed_input_gets_protocol_error_and_close_others_unaffected() {
    let (redis, rf) = setup(&[]);
    let mut bystander = rf.client();
    assert_frame(
        &bystander.cmd(&["SET", "by", "1"]),
        b"+OK\r\n",
        "bystander SET",
    );
    let cases: &[&[u8]] = &[
        b"*1\r\n$abc\r\n",
        b"*2\r\n:1\r\n",
        b"*abc\r\n",
        b"*1\r\n$-5\r\n",
        b"*2\r\n$3\r\nGET\r\n+x\r\n",
    ];
    for input in cases {
        let err = expect_protocol_error_and_close(&rf, input);
        // Redis's own reply to the same bytes, for reference in failures.
        let mut d = redis.client();
        d.send(input);
        let direct = d.read_frame();
        eprintln!(
            "{}: redfuse={:?} redis={:?}",
            esc(input),
            err,
            String::from_utf8_lossy(&direct)
        );
        assert_frame(
            &bystander.cmd(&["INCR", "by"]),
            b":2\r\n",
            "bystander keeps working",
        );
        assert_frame(
            &bystander.cmd(&["SET", "by", "1"]),
            b"+OK\r\n",
            "bystander reset",
        );
    }
    // Garbage after a valid command in the same write: the valid one is answered first.
    let mut c = rf.client();
    let mut input = resp_cmd(&["SET", "valid", "yes"]);
    input.extend(b"*1\r\n$x\r\n");
    c.send(&input);
    assert_frame(
        &c.read_frame(),
        b"+OK\r\n",
        "valid command before the garbage",
    );
    let err = c.read_frame();
    assert!(
        err.starts_with(b"-ERR Protocol error"),
        "garbage after a valid command: {}",
        esc(&err)
    );
    assert!(
        c.wait_closed(secs(5)),
        "connection not closed after protocol error"
    );
    assert_frame(
        &bystander.cmd(&["GET", "valid"]),
        b"$3\r\nyes\r\n",
        "the valid command ran",
    );
    // The proxy itself is still fine.
    let mut fresh = rf.client();
    assert_frame(
        &fresh.cmd(&["PING"]),
        b"+PONG\r\n",
        "new client after protocol errors",
    );
}

#[test]
fn oversized_bulk_rejected_without_buffering_payload() {
    let (redis, rf) = setup(&["--max-bulk-len", "1024"]);
    let mut ok = rf.client();
    let v = vec![b'v'; 1000];
    assert_frame(
        &ok.cmd(&[&b"SET"[..], b"k", &v]),
        b"+OK\r\n",
        "SET with a 1000-byte value under a 1024 limit",
    );

    // Only the header of a 2000-byte bulk: the payload is never sent, so an
    // answer proves the proxy rejected it without waiting to buffer it.
    let mut c = rf.client();
    let started = Instant::now();
    c.send(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2000\r\n");
    let reply = match c.try_read_frame(secs(5)) {
        Ok(f) => f,
        Err(e) => panic!(
            "a 2000-byte bulk header with --max-bulk-len 1024 got no reply within 5s \
             (is the proxy waiting for the payload?): {e:?}"
        ),
    };
    assert!(
        reply.starts_with(b"-ERR Protocol error"),
        "oversized bulk: expected `-ERR Protocol error...` (as Redis answers for proto-max-bulk-len), got {}",
        esc(&reply)
    );
    assert!(
        c.wait_closed(secs(5)),
        "connection must be closed after an oversized bulk"
    );
    eprintln!(
        "oversized bulk rejected in {:?}: {}",
        started.elapsed(),
        esc(&reply)
    );
    assert_frame(
        &redis.cmd(&["STRLEN", "k"]),
        b":1000\r\n",
        "k keeps its previous value",
    );

    // Same for a bulk arriving as the key of a GET, with the payload streaming in.
    let mut c = rf.client();
    c.send(b"*2\r\n$3\r\nGET\r\n$5000\r\n");
    let _ = c.try_send(&[b'x'; 100]);
    let reply = c.read_frame();
    assert!(
        reply.starts_with(b"-ERR Protocol error"),
        "oversized GET key: {}",
        esc(&reply)
    );
    assert!(
        c.wait_closed(secs(5)),
        "connection must be closed after an oversized bulk"
    );

    assert_frame(&ok.cmd(&["PING"]), b"+PONG\r\n", "other client unaffected");
}

#[test]
fn oversized_array_rejected() {
    let (_redis, rf) = setup(&["--max-array-len", "10"]);
    let mut ok = rf.client();
    let mut args = vec!["DEL".to_string()];
    args.extend((0..9).map(|i| format!("k{i}")));
    assert_frame(
        &ok.cmd(&args),
        b":0\r\n",
        "a 10-element command under --max-array-len 10",
    );

    let mut c = rf.client();
    c.send(b"*11\r\n");
    let reply = match c.try_read_frame(secs(5)) {
        Ok(f) => f,
        Err(e) => panic!("`*11` with --max-array-len 10 got no reply within 5s: {e:?}"),
    };
    assert!(
        reply.starts_with(b"-ERR Protocol error"),
        "oversized array: expected `-ERR Protocol error...`, got {}",
        esc(&reply)
    );
    assert!(
        c.wait_closed(secs(5)),
        "connection must be closed after an oversized array"
    );

    let mut c = rf.client();
    c.send(b"*1000000\r\n$3\r\nDEL\r\n");
    let reply = c.read_frame();
    assert!(
        reply.starts_with(b"-ERR Protocol error"),
        "*1000000: {}",
        esc(&reply)
    );
    assert!(
        c.wait_closed(secs(5)),
        "connection must be closed after an oversized array"
    );

    assert_frame(&ok.cmd(&["PING"]), b"+PONG\r\n", "other client unaffected");
}

#[test]
fn max_clients_rejects_extra_connection_like_redis() {
    let (_redis, rf) = setup(&["--max-clients", "5"]);
    let mut clients: Vec<RawClient> = (0..5).map(|_| rf.client()).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        assert_frame(&c.cmd(&["PING"]), b"+PONG\r\n", &format!("client {i} of 5"));
    }
    // The 6th: Redis sends the error right away (without waiting for a command) and closes.
    let mut sixth = match RawClient::try_connect(&rf.addr()) {
        Ok(c) => c,
        Err(e) => panic!("6th client: connect failed ({e}); expected an error reply, then close"),
    };
    let reply = match sixth.try_read_frame(secs(5)) {
        Ok(f) => f,
        Err(e) => panic!("6th client: expected `-ERR max number of clients reached`, got {e:?}"),
    };
    assert_frame(
        &reply,
        b"-ERR max number of clients reached\r\n",
        "6th client",
    );
    assert!(
        sixth.wait_closed(secs(5)),
        "6th client must be disconnected"
    );

    // The 5 existing clients are unaffected.
    for (i, c) in clients.iter_mut().enumerate() {
        assert_frame(
            &c.cmd(&["ECHO", "still"]),
            b"$5\r\nstill\r\n",
            &format!("client {i} after rejection"),
        );
    }

    // Free a slot; a new client gets in (bounded wait for the proxy to notice).
    drop(clients.pop());
    let mut last = String::new();
    let admitted = wait_until(secs(5), || {
        let Ok(mut c) = RawClient::try_connect(&rf.addr()) else {
            return false;
        };
        c.send_cmd(&["PING"]);
        match c.try_read_frame(secs(2)) {
            Ok(f) if f == b"+PONG\r\n" => {
                clients.push(c);
                true
            }
            other => {
                last = format!("{other:?}");
                false
            }
        }
    });
    assert!(
        admitted,
        "no client admitted within 5s after one of 5 disconnected; last: {last}"
    );
}

#[test]
fn idle_timeout_closes_idle_client_but_not_active_one() {
    let (_redis, rf) = setup(&["--idle-timeout-ms", "300"]);
    let mut idle = rf.client();
    let mut active = rf.client();
    assert_frame(
        &idle.cmd(&["PING"]),
        b"+PONG\r\n",
        "idle client's only command",
    );
    let last_activity = Instant::now();
    assert_frame(&active.cmd(&["PING"]), b"+PONG\r\n", "active client");
    let deadline = Instant::now() + secs(5);
    let mut idle_closed_after = None;
    // The active client keeps talking every 100ms (pacing, not synchronisation).
    while Instant::now() < deadline {
        if idle_closed_after.is_none() && idle.is_closed() {
            idle_closed_after = Some(last_activity.elapsed());
        }
        if idle_closed_after.is_some() && last_activity.elapsed() >= ms(900) {
            break;
        }
        thread::sleep(ms(100));
        assert_frame(
            &active.cmd(&["PING"]),
            b"+PONG\r\n",
            &format!("active client after {:?}", last_activity.elapsed()),
        );
    }
    let closed_after = idle_closed_after
        .expect("idle client was not disconnected within 5s (--idle-timeout-ms 300)");
    assert!(
        closed_after >= ms(250),
        "idle client closed too early, after {closed_after:?} (timeout is 300ms)"
    );
    assert!(
        idle.pending_bytes().is_empty(),
        "idle client got unexpected bytes: {}",
        esc(idle.pending_bytes())
    );
    assert_frame(
        &active.cmd(&["PING"]),
        b"+PONG\r\n",
        "active client still connected",
    );
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Sets `big:0` .. `big:{n-1}` to `len` bytes of `x` directly in Redis, pipelined; the
/// replies.
fn set_big_values(redis: &RedisServer, n: usize, len: usize) -> Vec<Vec<u8>> {
    let value = "x".repeat(len);
    let mut filler = redis.client();
    for i in 0..n {
        filler.send_cmd(&["SET", &format!("big:{i}"), &value]);
    }
    (0..n).map(|_| filler.read_frame()).collect()
}

/// A client that pipelines large reads and never reads the replies is disconnected once its
/// unwritten replies pass the output limit, instead of growing redfuse without bound; other
/// clients carry on.
#[test]
fn a_client_that_never_reads_is_cut_off_at_its_output_limit() {
    let redis = RedisServer::start();
    set_big_values(&redis, 200, 100 * 1024);
    let dir = TempDir::new("limits");
    let config = dir.write(
        "redfuse.toml",
        &format!(
            "upstream = \"{}\"\nclient_output_hard_limit_bytes = 8388608\nclient_output_soft_limit_bytes = 4194304\nclient_output_soft_limit_seconds = 60\n",
            redis.addr()
        ),
    );
    let rf = start_with_config(&config);
    let before = rss_kib(rf.pid());
    let mut hog = rf.client();
    // 6,000 distinct reads of ~100 KB (600 MB of replies), never read.
    let mut pipeline = Vec::new();
    for i in 0..6000 {
        let end = 100_000 + i % 1000;
        pipeline.extend(resp_cmd(&[
            "GETRANGE",
            &format!("big:{}", i % 200),
            "0",
            &end.to_string(),
        ]));
    }
    let _ = hog.try_send(&pipeline);
    eventually("the hog is disconnected", secs(20), || {
        metric_value(
            &rf.metrics(),
            "redfuse_client_output_limit_disconnects_total",
            &[],
        )
        .unwrap_or(0.0)
            >= 1.0
    });
    let grown = rss_kib(rf.pid()).saturating_sub(before);
    assert!(
        grown < 200 * 1024,
        "redfuse grew by {grown} KiB for a client limited to 8 MiB"
    );
    let mut other = rf.client();
    assert_eq!(other.cmd(&["SET", "k", "v"]), b"+OK\r\n");
    assert_eq!(other.cmd(&["GET", "k"]), b"$1\r\nv\r\n");
}

/// A client that writes a long pipeline before reading any reply (`redis-cli --pipe`) is
/// slowed down, never refused: a connection to Redis holds a bounded number of calls
/// (sent or waiting to be), so redfuse stops reading the client's socket instead of
/// pushing the upstream's whole in-flight allowance (the bulkhead) into one pipe while
/// Redis is slow to answer.
#[test]
fn a_long_pipeline_is_slowed_down_not_refused_by_the_bulkhead() {
    use std::io::Write;
    // Redis answers late: what redfuse reads from the client piles up unless it stops.
    let redis = RedisServer::start();
    let relay = FaultRelay::start(&redis.addr());
    relay.set_mode(FaultMode::Delay(ms(50)));
    let rf = Redfuse::start(&relay.addr(), &[]);
    let n = 200_000;
    let mut input = Vec::with_capacity(n * 32);
    for i in 0..n {
        input.extend_from_slice(&resp_cmd(&["GET", &format!("key:{i}")]));
    }
    let port = rf.addr().rsplit(':').next().unwrap().to_owned();
    let mut cli = std::process::Command::new("redis-cli")
        .args(["-p", &port, "--pipe"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("redis-cli runs");
    let mut stdin = cli.stdin.take().unwrap();
    let writer = thread::spawn(move || stdin.write_all(&input));
    let out = cli.wait_with_output().expect("redis-cli --pipe finishes");
    writer
        .join()
        .unwrap()
        .expect("pipeline written to redis-cli");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains(&format!("errors: 0, replies: {n}")),
        "redis-cli --pipe: {report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = rf.metrics();
    assert_eq!(metric_sum(&m, "redfuse_bulkhead_overflow_total", &[]), 0.0);
    // Every GET reached Redis.
    let stats = String::from_utf8_lossy(&redis.cmd(&["INFO", "commandstats"])).into_owned();
    assert!(
        stats.contains(&format!("cmdstat_get:calls={n},")),
        "{stats}"
    );
}

/// A client pipelining large reads holds a bounded share of its shared Redis connection:
/// 256 requests waiting on Redis while the size of its replies is unknown, then about
/// 8 MiB of replies' worth, not thousands of requests. Without the bound, every read of
/// the pipeline below waits on the paused Redis at once, past the upstream's in-flight
/// allowance (the bulkhead refuses some of them), and whoever shares the connection waits
/// behind 75 MB of replies.
#[test]
fn a_client_pipelining_large_reads_holds_a_bounded_share_of_its_connection() {
    let redis = RedisServer::start();
    let value = "x".repeat(50 * 1024);
    for reply in set_big_values(&redis, 100, value.len()) {
        assert_eq!(reply, b"+OK\r\n");
    }
    let dir = TempDir::new("limits");
    // Redis is paused below: no health probe, no breaker and no timeout get in the way.
    let config = dir.write(
        "redfuse.toml",
        &format!(
            "upstream = \"{}\"\nupstream_connections = 1\nmax_inflight_per_upstream = 1000\n\
             health_probe_interval_ms = 0\ncommand_timeout_ms = 30000\n[breaker]\nmode = \"disabled\"\n",
            redis.addr()
        ),
    );
    let rf = start_with_config(&config);
    let in_flight = || {
        support::admin::get_json(&rf.admin_addr(), "/ready")["upstreams"][0]["in_flight"]
            .as_u64()
            .expect("in_flight in /ready")
    };
    let mut bystander = rf.client();
    assert_eq!(bystander.cmd(&["SET", "mine", "1"]), b"+OK\r\n");
    let mut hog = rf.client();
    let n = 1500;
    // Distinct reads: identical ones in flight would share one upstream request.
    let pipeline = |round: usize| {
        let mut p = Vec::new();
        for i in 0..n {
            p.extend(resp_cmd(&[
                "GETRANGE",
                &format!("big:{}", i % 100),
                "0",
                &(100_000 + round * n + i).to_string(),
            ]));
        }
        p
    };
    // The value's bulk string: `$51200\r\n` and the value.
    let reply_len = value.len() + 10;
    // First the size of its replies is unknown: 256 requests; then 8 MiB / 51,210 bytes.
    for (round, most) in [(0, 256), (1, (8u64 << 20).div_ceil(reply_len as u64))] {
        let mut pause = redis.client();
        assert_eq!(pause.cmd(&["CLIENT", "PAUSE", "3000", "ALL"]), b"+OK\r\n");
        hog.send(&pipeline(round));
        bystander.send_cmd(&["GET", "mine"]);
        eventually("the pipeline waits on the paused Redis", secs(2), || {
            in_flight() >= most / 2
        });
        // Long enough for redfuse to read the whole pipeline, had it no bound.
        thread::sleep(ms(300));
        let seen = in_flight();
        assert!(
            seen <= most + 1,
            "round {round}: {seen} requests wait on Redis, more than the client's share ({most}) and the bystander's GET"
        );
        assert_eq!(pause.cmd(&["CLIENT", "UNPAUSE"]), b"+OK\r\n");
        for i in 0..n {
            let f = hog.read_frame();
            assert_eq!(
                f.len(),
                reply_len,
                "round {round}, reply {i}: {}",
                esc(&f[..f.len().min(80)])
            );
        }
        assert_eq!(bystander.read_frame(), b"$1\r\n1\r\n");
    }
    assert_eq!(
        metric_sum(&rf.metrics(), "redfuse_bulkhead_overflow_total", &[]),
        0.0,
        "the upstream's in-flight allowance ran out"
    );
}
