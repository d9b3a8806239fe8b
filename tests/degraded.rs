//! Degraded mode end to end: a real redis-server is filled through redfuse, killed and
//! restarted; reads come from the cache, writes follow the fail-open rules, queued writes are
//! replayed in order.

mod support;

use std::time::Duration;

use support::*;

const RULES: &str = r#"
[cache]
max_stale_ms = 60000
[[cache.patterns]]
keys = "recs:*"
miss = "[]"
[[cache.patterns]]
keys = "strict:*"
miss = "error"

[fail_open]
[[fail_open.rules]]
name = "rate-limit"
commands = ["INCR", "EXPIRE"]
keys = ["ratelimit:*"]
action = "reply"
reply = ":1"
[[fail_open.rules]]
name = "sessions"
commands = ["SET", "DEL"]
keys = ["session:*"]
action = "reply"
reply = "+OK"
[[fail_open.rules]]
name = "queued-counter"
commands = ["INCR"]
keys = ["q:*"]
action = "queue"
reply = ":0"
[[fail_open.rules]]
name = "queued-writes"
commands = ["SET", "DEL", "HSET"]
keys = ["q:*"]
action = "queue"
reply = "+OK"
"#;

struct Setup {
    redis: RedisServer,
    rf: Redfuse,
    dir: TempDir,
}

fn config_text(redis: &RedisServer, dir: &TempDir, write_queue: &str) -> String {
    let journal = dir.path().join("journal.bin");
    format!(
        "command_timeout_ms = 500\nconnect_timeout_ms = 300\nhealth_probe_interval_ms = 100\n\
         [[upstreams]]\nname = \"main\"\naddr = \"{}\"\nrole = \"primary\"\n\
         [breaker]\nopen_base_ms = 300\nopen_max_ms = 600\nhalf_open_max_wait_ms = 500\n\
         [write_queue]\njournal_path = \"{}\"\nfsync = \"always\"\n{write_queue}\n{RULES}",
        redis.addr(),
        journal.display()
    )
}

fn setup(write_queue: &str) -> Setup {
    let redis = RedisServer::start();
    let dir = TempDir::new("degraded");
    let path = dir.write("redfuse.toml", &config_text(&redis, &dir, write_queue));
    let rf = start_with_config(&path);
    Setup { redis, rf, dir }
}

fn breaker_state(rf: &Redfuse) -> f64 {
    metric_value(
        &rf.metrics(),
        "redfuse_breaker_state",
        &[("upstream", "main")],
    )
    .unwrap_or(-1.0)
}

fn wait_open(rf: &Redfuse) {
    eventually("breaker open", secs(5), || breaker_state(rf) == 2.0);
}

fn hello3(c: &mut RawClient) {
    let r = c.cmd(&["HELLO", "3"]);
    assert!(r.starts_with(b"%"), "{}", esc(&r));
}

#[test]
fn cached_reads_survive_an_outage_byte_for_byte_in_both_protocols() {
    let mut s = setup("");
    let mut c2 = s.rf.client();
    let mut c3 = s.rf.client();
    hello3(&mut c3);
    assert_eq!(c2.cmd(&["SET", "user:1", "alice"]), b"+OK\r\n");
    assert_eq!(c2.cmd(&["SET", "user:2", "bob"]), b"+OK\r\n");
    c2.cmd(&["HSET", "h", "f1", "v1", "f2", "v2"]);
    c2.cmd(&["ZADD", "z", "1", "a", "2", "b", "3", "c"]);
    let reads: Vec<Vec<&str>> = vec![
        vec!["GET", "user:1"],
        vec!["HGETALL", "h"],
        vec!["ZRANGE", "z", "0", "-1", "WITHSCORES"],
        vec!["MGET", "user:1", "user:2", "nothing"],
        vec!["GET", "nothing"],
    ];
    let before2: Vec<Vec<u8>> = reads.iter().map(|r| c2.cmd(r)).collect();
    let before3: Vec<Vec<u8>> = reads.iter().map(|r| c3.cmd(r)).collect();
    // RESP3 encodes these differently (map, doubles, null), so the cache keeps both.
    assert_ne!(before2[1], before3[1]);

    s.redis.kill();
    wait_open(&s.rf);
    for (i, r) in reads.iter().enumerate() {
        assert_eq!(esc(&c2.cmd(r)), esc(&before2[i]), "RESP2 {r:?}");
        assert_eq!(esc(&c3.cmd(r)), esc(&before3[i]), "RESP3 {r:?}");
    }
    // MGET is answered per key from GET entries, and a GET from an MGET entry.
    let mget = c2.cmd(&["MGET", "user:2", "user:1"]);
    assert_eq!(esc(&mget), esc(b"*2\r\n$3\r\nbob\r\n$5\r\nalice\r\n"));
    assert_eq!(c2.cmd(&["GET", "user:2"]), b"$3\r\nbob\r\n");
    let m = s.rf.metrics();
    assert!(
        metric_value(&m, "redfuse_cache_requests_total", &[("result", "hit")]).unwrap() >= 10.0
    );
    assert!(metric_sum(&m, "redfuse_operations_total", &[("result", "fallback")]) >= 10.0);
}

#[test]
fn misses_and_writes_follow_the_configured_rules() {
    let mut s = setup("");
    let mut c = s.rf.client();
    let mut c3 = s.rf.client();
    hello3(&mut c3);
    assert_eq!(c.cmd(&["PING"]), b"+PONG\r\n");
    s.redis.kill();
    wait_open(&s.rf);
    // Misses: nil by default (per protocol), a configured default, or an error.
    assert_eq!(c.cmd(&["GET", "session:zz"]), b"$-1\r\n");
    assert_eq!(c3.cmd(&["GET", "session:zz"]), b"_\r\n");
    assert_eq!(c.cmd(&["LRANGE", "recs:7", "0", "9"]), b"*0\r\n");
    let strict = c.cmd_str(&["GET", "strict:1"]);
    assert!(
        strict.starts_with("-ERR redfuse: upstream 'main' unavailable"),
        "{strict}"
    );
    // Writes: rate limiter fails open, sessions accept, anything else is refused clearly.
    assert_eq!(c.cmd(&["INCR", "ratelimit:ip:1"]), b":1\r\n");
    assert_eq!(c.cmd(&["EXPIRE", "ratelimit:ip:1", "60"]), b":1\r\n");
    assert_eq!(c.cmd(&["SET", "session:abc", "data"]), b"+OK\r\n");
    let refused = c.cmd_str(&["SET", "other", "x"]);
    assert!(
        refused.starts_with("-ERR redfuse: upstream 'main' unavailable (circuit open)"),
        "{refused}"
    );
    // A multi-key write matches only if every key does.
    assert!(
        c.cmd_str(&["DEL", "session:a", "other"])
            .starts_with("-ERR")
    );
    assert_eq!(c.cmd(&["PING"]), b"+PONG\r\n");
    let m = s.rf.metrics();
    assert_eq!(
        metric_value(
            &m,
            "redfuse_failopen_replies_total",
            &[("command", "incr"), ("rule", "rate-limit")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &m,
            "redfuse_failopen_replies_total",
            &[("command", "set"), ("rule", "sessions")]
        ),
        Some(1.0)
    );
}

#[test]
fn queued_writes_replay_in_order_before_newer_writes() {
    let mut s = setup("");
    let mut c = s.rf.client();
    assert_eq!(c.cmd(&["SET", "q:order", "old"]), b"+OK\r\n");
    s.redis.kill();
    wait_open(&s.rf);
    assert_eq!(c.cmd(&["SET", "q:order", "first"]), b"+OK\r\n");
    for _ in 0..3 {
        assert_eq!(c.cmd(&["INCR", "q:counter"]), b":0\r\n");
    }
    assert_eq!(c.cmd(&["HSET", "q:h", "f", "v"]), b"+OK\r\n");
    assert_eq!(c.cmd(&["SET", "q:order", "second"]), b"+OK\r\n");
    // The application reads its own queued write during the outage.
    assert_eq!(c.cmd(&["GET", "q:order"]), b"$6\r\nsecond\r\n");
    assert_eq!(c.cmd(&["HGET", "q:h", "f"]), b"$1\r\nv\r\n");
    let m = s.rf.metrics();
    assert_eq!(
        metric_value(&m, "redfuse_write_queue_depth", &[]),
        Some(6.0)
    );

    s.redis.restart();
    // A write sent as soon as the breaker lets writes through again waits for the replay and
    // lands after it.
    eventually("breaker no longer open", secs(10), || {
        breaker_state(&s.rf) != 2.0
    });
    let reply = c.cmd(&["SET", "q:order", "newest"]);
    assert_eq!(esc(&reply), "+OK\\r\\n");
    let direct = |args: &[&str]| String::from_utf8_lossy(&s.redis.cmd(args)).into_owned();
    eventually("journal drained", secs(5), || {
        metric_value(&s.rf.metrics(), "redfuse_write_queue_depth", &[]) == Some(0.0)
    });
    assert_eq!(direct(&["GET", "q:counter"]), "$1\r\n3\r\n");
    assert!(direct(&["GET", "q:order"]).contains("newest"));
    assert!(direct(&["HGET", "q:h", "f"]).contains('v'));
    let m = s.rf.metrics();
    assert_eq!(
        metric_value(&m, "redfuse_write_queue_replayed_total", &[]),
        Some(6.0)
    );
}

#[test]
fn journal_overflow_is_refused_and_counted() {
    let mut s = setup("max_entries = 2");
    let mut c = s.rf.client();
    s.redis.kill();
    wait_open(&s.rf);
    assert_eq!(c.cmd(&["SET", "q:1", "a"]), b"+OK\r\n");
    assert_eq!(c.cmd(&["SET", "q:2", "b"]), b"+OK\r\n");
    let full = c.cmd_str(&["SET", "q:3", "c"]);
    assert!(full.starts_with("-ERR redfuse: write queue full"), "{full}");
    let m = s.rf.metrics();
    assert_eq!(
        metric_value(&m, "redfuse_write_queue_depth", &[]),
        Some(2.0)
    );
    assert!(metric_sum(&m, "redfuse_write_queue_rejected_total", &[]) >= 1.0);
    s.redis.restart();
    eventually("replayed", secs(10), || {
        String::from_utf8_lossy(&s.redis.cmd(&["GET", "q:2"])).contains('b')
    });
    assert_eq!(s.redis.cmd(&["EXISTS", "q:3"]), b":0\r\n");
}

#[test]
fn journal_survives_a_redfuse_crash_mid_outage() {
    let mut s = setup("");
    let mut c = s.rf.client();
    s.redis.kill();
    wait_open(&s.rf);
    assert_eq!(c.cmd(&["SET", "q:durable", "yes"]), b"+OK\r\n");
    assert_eq!(c.cmd(&["INCR", "q:n"]), b":0\r\n");
    drop(c);
    // SIGKILL: no shutdown path runs; fsync = "always" must have made the entries durable.
    drop(s.rf);
    let path = s.dir.path().join("redfuse.toml");
    let rf = start_with_config(&path);
    assert_eq!(
        metric_value(&rf.metrics(), "redfuse_write_queue_depth", &[]),
        Some(2.0)
    );
    s.redis.restart();
    eventually("replayed after restart", secs(10), || {
        String::from_utf8_lossy(&s.redis.cmd(&["GET", "q:durable"])).contains("yes")
    });
    assert!(String::from_utf8_lossy(&s.redis.cmd(&["GET", "q:n"])).contains('1'));
    eventually("journal empty", secs(5), || {
        metric_value(&rf.metrics(), "redfuse_write_queue_depth", &[]) == Some(0.0)
    });
    // The journal's disk thread truncates the file once the last ack reaches it.
    let journal = s.dir.path().join("journal.bin");
    let len = || std::fs::metadata(&journal).map(|m| m.len()).unwrap_or(0);
    let truncated = wait_until(secs(5), || len() == 0);
    assert!(
        truncated,
        "replayed entries are truncated from the journal file: {} bytes left",
        len()
    );
}

/// A value changed behind redfuse's back (another client of Redis) is what the next read
/// through redfuse stores, at once: a fill is skipped only when the reply is the one the
/// cache stored under the same key a moment ago, never because the key was filled
/// recently with something else. An MGET stores the keys whose value changed, wherever
/// they are among keys read a moment ago.
#[test]
fn a_value_changed_behind_redfuses_back_is_stored_by_the_next_read() {
    let mut s = setup("");
    let mut direct = s.redis.client();
    let mut c = s.rf.client();
    assert_eq!(direct.cmd(&["MSET", "k", "v1", "m", "w1"]), b"+OK\r\n");
    // Read twice: the second fill of each is skipped (the same reply, just stored).
    for _ in 0..2 {
        assert_eq!(c.cmd(&["GET", "k"]), b"$2\r\nv1\r\n");
        assert_eq!(
            esc(&c.cmd(&["MGET", "m", "k"])),
            esc(b"*2\r\n$2\r\nw1\r\n$2\r\nv1\r\n")
        );
    }
    assert_eq!(direct.cmd(&["MSET", "k", "v2", "m", "w2"]), b"+OK\r\n");
    assert_eq!(c.cmd(&["GET", "k"]), b"$2\r\nv2\r\n");
    assert_eq!(
        esc(&c.cmd(&["MGET", "m", "k"])),
        esc(b"*2\r\n$2\r\nw2\r\n$2\r\nv2\r\n")
    );
    assert_eq!(direct.cmd(&["SET", "m", "w3"]), b"+OK\r\n");
    assert_eq!(
        esc(&c.cmd(&["MGET", "k", "m", "k"])),
        esc(b"*3\r\n$2\r\nv2\r\n$2\r\nw3\r\n$2\r\nv2\r\n")
    );
    // A write takes the key's entries out before it is sent, even one Redis refuses: the
    // read after it stores the value again, though it is the one stored just before.
    let refused = c.cmd(&["HSET", "k", "f", "x"]);
    assert!(refused.starts_with(b"-WRONGTYPE"), "{}", esc(&refused));
    assert_eq!(c.cmd(&["GET", "k"]), b"$2\r\nv2\r\n");
    s.redis.kill();
    wait_open(&s.rf);
    assert_eq!(c.cmd(&["GET", "k"]), b"$2\r\nv2\r\n");
    assert_eq!(c.cmd(&["GET", "m"]), b"$2\r\nw3\r\n");
    assert_eq!(
        esc(&c.cmd(&["MGET", "k", "m"])),
        esc(b"*2\r\n$2\r\nv2\r\n$2\r\nw3\r\n")
    );
}

/// Pipelined reads are planned a run at a time before they are dispatched (a run ends
/// after its first command that is not a read): a read after a write, a transaction or a
/// SELECT in the same pipeline fills what it really read, in its own database.
#[test]
fn reads_planned_ahead_in_a_pipeline_fill_what_they_read() {
    let mut s = setup("");
    let mut direct = s.redis.client();
    assert_eq!(direct.cmd(&["SET", "j", "j0"]), b"+OK\r\n");
    assert_eq!(direct.cmd(&["SELECT", "1"]), b"+OK\r\n");
    assert_eq!(direct.cmd(&["SET", "j", "j1"]), b"+OK\r\n");
    let mut c = s.rf.client();
    let pipeline: [&[&str]; 11] = [
        &["SET", "k", "v0"],
        &["GET", "k"],
        &["GET", "j"],
        &["MULTI"],
        &["GET", "k"],
        &["SET", "k", "v1"],
        &["EXEC"],
        &["GET", "k"],
        &["SELECT", "1"],
        &["GET", "j"],
        &["SELECT", "0"],
    ];
    c.send(
        &pipeline
            .iter()
            .flat_map(|cmd| resp_cmd(cmd))
            .collect::<Vec<u8>>(),
    );
    let expected: [&[u8]; 11] = [
        b"+OK\r\n",
        b"$2\r\nv0\r\n",
        b"$2\r\nj0\r\n",
        b"+OK\r\n",
        b"+QUEUED\r\n",
        b"+QUEUED\r\n",
        b"*2\r\n$2\r\nv0\r\n+OK\r\n",
        b"$2\r\nv1\r\n",
        b"+OK\r\n",
        b"$2\r\nj1\r\n",
        b"+OK\r\n",
    ];
    for (got, want) in c.read_frames(expected.len()).iter().zip(expected) {
        assert_eq!(esc(got), esc(want));
    }
    s.redis.kill();
    wait_open(&s.rf);
    // Database 0 holds what its reads read: `k` as the transaction left it, and `j` as
    // read before the SELECT (the read of database 1's `j` filled nothing of database 0).
    assert_eq!(c.cmd(&["GET", "k"]), b"$2\r\nv1\r\n");
    assert_eq!(c.cmd(&["GET", "j"]), b"$2\r\nj0\r\n");
}

#[test]
fn a_write_through_redfuse_invalidates_the_cached_value() {
    let mut s = setup("");
    let mut c = s.rf.client();
    c.cmd(&["SET", "k", "v1"]);
    assert_eq!(c.cmd(&["GET", "k"]), b"$2\r\nv1\r\n");
    c.cmd(&["HSET", "hk", "f", "1"]);
    assert_eq!(c.cmd(&["HGET", "hk", "f"]), b"$1\r\n1\r\n");
    // Writes of every shape: plain, multi-key, and inside a transaction.
    assert_eq!(c.cmd(&["SET", "k", "v2"]), b"+OK\r\n");
    c.cmd(&["MULTI"]);
    c.cmd(&["HSET", "hk", "f", "2"]);
    c.cmd(&["EXEC"]);
    s.redis.kill();
    wait_open(&s.rf);
    // The old values are never served. A plain SET Redis acknowledged is its own value;
    // the transaction's HSET left a value redfuse does not hold, so the miss is an error,
    // not a nil that would contradict a write the client saw succeed.
    assert_eq!(c.cmd(&["GET", "k"]), b"$2\r\nv2\r\n");
    let hget = c.cmd_str(&["HGET", "hk", "f"]);
    assert!(hget.starts_with("-ERR redfuse:"), "{hget}");
    assert!(
        metric_value(&s.rf.metrics(), "redfuse_cache_invalidations_total", &[]).unwrap() >= 2.0
    );
}

#[test]
fn many_distinct_keys_stay_under_the_cache_byte_cap() {
    let s = setup("");
    drop(s.rf);
    // A small cap that redis-benchmark's random keys overflow many times over: 1000 keys,
    // about twice what fits, each read again and again. A full cache declines a key's first
    // read in a while and takes it in on the next (see `cache::admission`), evicting others.
    let text = std::fs::read_to_string(s.dir.path().join("redfuse.toml"))
        .unwrap()
        .replace("[cache]\n", "[cache]\nmax_bytes = 262144\n");
    let path = s.dir.write("small.toml", &text);
    let rf = start_with_config(&path);
    let port = rf.addr().rsplit(':').next().unwrap().to_string();
    let out = std::process::Command::new("redis-benchmark")
        .args([
            "-p", &port, "-t", "get", "-n", "60000", "-r", "1000", "-c", "20", "-q",
        ])
        .output()
        .expect("redis-benchmark runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = rf.metrics();
    let bytes = metric_value(&m, "redfuse_cache_bytes", &[]).unwrap();
    let fills = metric_value(&m, "redfuse_cache_requests_total", &[("result", "fill")]).unwrap();
    let evictions = metric_value(&m, "redfuse_cache_evictions_total", &[]).unwrap();
    let declined = metric_value(
        &m,
        "redfuse_cache_requests_total",
        &[("result", "declined")],
    )
    .unwrap();
    eprintln!(
        "cache: {bytes} bytes after {fills} fills, {evictions} evictions, {declined} declined"
    );
    assert!(bytes <= 262144.0, "cache holds {bytes} bytes, over its cap");
    assert!(
        fills > 10_000.0 && evictions > 5_000.0 && declined > 0.0,
        "fills {fills}, evictions {evictions}, declined {declined}"
    );
}

#[test]
fn single_flight_collapses_concurrent_identical_reads() {
    let redis = RedisServer::start();
    redis.cmd(&["SET", "hot", "value"]);
    let relay = FaultRelay::start(&redis.addr());
    let dir = TempDir::new("singleflight");
    let text = format!(
        "command_timeout_ms = 3000\nhealth_probe_interval_ms = 0\nupstream_connections = 1\n\
         [[upstreams]]\nname = \"main\"\naddr = \"{}\"\nrole = \"primary\"\n",
        relay.addr()
    );
    let rf = start_with_config(&dir.write("redfuse.toml", &text));
    let mut clients: Vec<RawClient> = (0..100).map(|_| rf.client()).collect();
    assert_eq!(clients[0].cmd(&["PING"]), b"+PONG\r\n");
    redis.cmd(&["CONFIG", "RESETSTAT"]);
    // Slow the upstream so that all 100 reads are in flight together.
    relay.set_mode(FaultMode::Delay(Duration::from_millis(400)));
    for c in clients.iter_mut() {
        c.send_cmd(&["GET", "hot"]);
    }
    for c in clients.iter_mut() {
        assert_eq!(c.read_frame(), b"$5\r\nvalue\r\n");
    }
    let stats = String::from_utf8_lossy(&redis.cmd(&["INFO", "commandstats"])).into_owned();
    let calls = stats
        .lines()
        .find(|l| l.starts_with("cmdstat_get:"))
        .and_then(|l| l.split("calls=").nth(1))
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.parse::<u64>().ok());
    assert_eq!(calls, Some(1), "GET calls reaching Redis: {stats}");
    let shared = metric_value(&rf.metrics(), "redfuse_singleflight_shared_total", &[]).unwrap();
    assert_eq!(shared, 99.0);
}

/// While the breaker is open, a pipelined run of reads is parsed ahead and answered from
/// the cache; its replies still come in request order, a queued write in the middle is
/// seen by the reads after it and not by those before, and a protocol error at the end is
/// answered after everything before it.
#[test]
fn a_pipeline_answered_from_the_cache_keeps_its_order() {
    let mut s = setup("");
    let mut c = s.rf.client();
    for i in 0..4 {
        let (k, v) = (format!("q:{i}"), format!("old{i}"));
        assert_eq!(c.cmd(&["SET", &k, &v]), b"+OK\r\n");
        assert_eq!(c.cmd(&["GET", &k]), bulk(&v));
    }
    s.redis.kill();
    wait_open(&s.rf);
    let mut pipeline = Vec::new();
    for args in [
        vec!["GET", "q:0"],
        vec!["MGET", "q:1", "q:2"],
        vec!["GET", "q:3"],
        vec!["SET", "q:3", "new3"],
        vec!["GET", "q:3"],
        vec!["MGET", "q:3", "q:0"],
    ] {
        pipeline.extend_from_slice(&resp_cmd(&args));
    }
    pipeline.extend_from_slice(b"*1\r\n$x\r\n");
    c.send(&pipeline);
    let want: [&[u8]; 6] = [
        b"$4\r\nold0\r\n",
        b"*2\r\n$4\r\nold1\r\n$4\r\nold2\r\n",
        b"$4\r\nold3\r\n",
        b"+OK\r\n",
        b"$4\r\nnew3\r\n",
        b"*2\r\n$4\r\nnew3\r\n$4\r\nold0\r\n",
    ];
    for (i, want) in want.iter().enumerate() {
        assert_eq!(esc(&c.read_frame()), esc(want), "reply {i}");
    }
    let err = c.read_frame();
    assert!(err.starts_with(b"-ERR Protocol error"), "{}", esc(&err));
    assert!(c.wait_closed(secs(5)));
}
