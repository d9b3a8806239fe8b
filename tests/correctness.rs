//! Correctness under faults (issue 7): a degraded read is never wrong (expired values, typed
//! misses, read-your-writes across kills and stops), and one client cannot open the shared
//! breaker for everyone (deep script replies, a client that never reads, clients beyond
//! Redis's maxclients).
//!
//! The breaker keeps its default thresholds here; only the open periods are shortened, which
//! speeds up recovery and nothing else.

mod support;

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use support::acl::*;
use support::*;

fn outage_config(upstream: &str) -> String {
    rf_config(upstream, "command_timeout_ms = 1000", FAST_RECOVERY)
}

fn wait_open(rf: &Redfuse) {
    eventually("breaker of `main` open", secs(5), || {
        breaker_gauge(rf, "main") == OPEN
    });
}

/// Stops the bystanders and asserts that none of them saw a refusal.
fn assert_bystanders_unharmed(bystanders: Vec<Bystander>, what: &str) {
    let mut total = 0;
    let mut all_bad = Vec::new();
    for (i, b) in bystanders.into_iter().enumerate() {
        let (ops, bad) = b.finish();
        total += ops;
        all_bad.extend(bad.into_iter().map(|b| format!("bystander {i}: {b}")));
    }
    eprintln!("{what}: bystanders made {total} requests");
    assert!(
        all_bad.is_empty(),
        "{what}: bystanders on their own keys were refused:\n{}",
        all_bad.join("\n")
    );
    assert!(total > 0, "{what}: bystanders made no requests");
}

// ---------------------------------------------------------------------------------------
// A degraded read is never wrong
// ---------------------------------------------------------------------------------------

#[test]
fn degraded_reads_never_serve_a_value_redis_has_expired() {
    let mut redis = RedisServer::start();
    let dir = TempDir::new("correctness");
    let rf = start_rf(&dir, &outage_config(&redis.addr()));
    let mut c = rf.client();
    let now_ms: u64 = {
        let t = parse_resp(&redis.cmd(&["TIME"]));
        let items = t.items().unwrap().to_vec();
        let s: u64 = items[0].text().unwrap().parse().unwrap();
        let us: u64 = items[1].text().unwrap().parse().unwrap();
        s * 1000 + us / 1000
    };
    let at = (now_ms + 1200).to_string();
    // Each way of giving a key a time to live, through redfuse, before the read that caches it.
    let setups: Vec<Vec<Vec<String>>> = vec![
        vec![vec!["SET", "e:ex", "v", "EX", "1"]],
        vec![vec!["SET", "e:px", "v", "PX", "1200"]],
        vec![vec!["SETEX", "e:setex", "1", "v"]],
        vec![vec!["PSETEX", "e:psetex", "1200", "v"]],
        vec![
            vec!["SET", "e:expire", "v"],
            vec!["EXPIRE", "e:expire", "1"],
        ],
        vec![
            vec!["SET", "e:pexpire", "v"],
            vec!["PEXPIRE", "e:pexpire", "1200"],
        ],
        vec![
            vec!["SET", "e:pexpireat", "v"],
            vec!["PEXPIREAT", "e:pexpireat", &at],
        ],
        vec![
            vec!["SET", "e:getex", "v"],
            vec!["GETEX", "e:getex", "PX", "1200"],
        ],
        vec![
            vec!["HSET", "e:hash", "f", "v"],
            vec!["EXPIRE", "e:hash", "1"],
        ],
    ]
    .into_iter()
    .map(|cmds| {
        cmds.into_iter()
            .map(|c| c.into_iter().map(String::from).collect())
            .collect()
    })
    .collect();
    for cmds in &setups {
        for cmd in cmds {
            let r = c.cmd(cmd);
            assert!(!r.starts_with(b"-"), "{cmd:?}: {}", esc(&r));
        }
    }
    let reads: Vec<Vec<&str>> = vec![
        vec!["GET", "e:ex"],
        vec!["GET", "e:px"],
        vec!["GET", "e:setex"],
        vec!["GET", "e:psetex"],
        vec!["GET", "e:expire"],
        vec!["GET", "e:pexpire"],
        vec!["GET", "e:pexpireat"],
        vec!["GET", "e:getex"],
        vec!["HGETALL", "e:hash"],
        vec!["HGET", "e:hash", "f"],
    ];
    let before: Vec<Vec<u8>> = reads.iter().map(|r| c.cmd(r)).collect();
    for (r, b) in reads.iter().zip(&before) {
        assert!(
            b.windows(1).any(|w| w == b"v"),
            "{r:?} before expiry: {}",
            esc(b)
        );
    }
    // A key without a TTL: the cache must still serve it (the test is not vacuous).
    assert_eq!(c.cmd(&["SET", "keep", "v"]), b"+OK\r\n");
    assert_eq!(c.cmd(&["GET", "keep"]), b"$1\r\nv\r\n");

    let keys = [
        "e:ex",
        "e:px",
        "e:setex",
        "e:psetex",
        "e:expire",
        "e:pexpire",
        "e:pexpireat",
        "e:getex",
        "e:hash",
    ];
    let mut exists = vec!["EXISTS"];
    exists.extend_from_slice(&keys);
    eventually("Redis has expired every key", secs(5), || {
        redis.cmd(&exists) == b":0\r\n"
    });
    redis.kill();
    wait_open(&rf);

    let mut wrong = Vec::new();
    for (r, b) in reads.iter().zip(&before) {
        let got = c.cmd(r);
        if got == *b {
            wrong.push(format!("{r:?} -> {}", esc(&got)));
        }
    }
    assert!(
        wrong.is_empty(),
        "served values Redis had already expired:\n{}",
        wrong.join("\n")
    );
    assert_eq!(c.cmd(&["GET", "keep"]), b"$1\r\nv\r\n");
}

#[test]
fn degraded_misses_are_typed_like_redis_for_a_missing_key() {
    let mut redis = RedisServer::start();
    let reads: &[&[&str]] = &[
        &["GET", "m:str"],
        &["EXISTS", "m:any"],
        &["STRLEN", "m:str"],
        &["SCARD", "m:set"],
        &["HLEN", "m:hash"],
        &["LLEN", "m:list"],
        &["ZCARD", "m:zset"],
        &["SISMEMBER", "m:set", "x"],
        &["HEXISTS", "m:hash", "f"],
        &["TYPE", "m:any"],
        &["HGETALL", "m:hash"],
        &["HKEYS", "m:hash"],
        &["LRANGE", "m:list", "0", "-1"],
        &["SMEMBERS", "m:set"],
        &["ZRANGE", "m:zset", "0", "-1"],
        &["HGET", "m:hash", "f"],
        &["MGET", "m:a", "m:b"],
    ];
    // What Redis itself answers for these missing keys, in both protocols.
    let mut d2 = redis.client();
    let mut d3 = redis.client();
    assert!(d3.cmd(&["HELLO", "3"]).starts_with(b"%"));
    let want2: Vec<Vec<u8>> = reads.iter().map(|r| d2.cmd(r)).collect();
    let want3: Vec<Vec<u8>> = reads.iter().map(|r| d3.cmd(r)).collect();
    assert_eq!(want2[1], b":0\r\n");
    assert_eq!(want3[10], b"%0\r\n");
    assert_eq!(want3[13], b"~0\r\n");

    let dir = TempDir::new("correctness");
    let rf = start_rf(&dir, &outage_config(&redis.addr()));
    let mut c2 = rf.client();
    let mut c3 = rf.client();
    assert!(c3.cmd(&["HELLO", "3"]).starts_with(b"%"));
    assert_eq!(c2.cmd(&["PING"]), b"+PONG\r\n");
    redis.kill();
    wait_open(&rf);

    let mut wrong = Vec::new();
    for (i, r) in reads.iter().enumerate() {
        for (proto, c, want) in [(2, &mut c2, &want2[i]), (3, &mut c3, &want3[i])] {
            let got = c.cmd(r);
            if got != *want {
                wrong.push(format!(
                    "RESP{proto} {r:?}: Redis {} but redfuse {}",
                    esc(want),
                    esc(&got)
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "degraded misses typed unlike Redis:\n{}",
        wrong.join("\n")
    );
}

/// One verifying client: `SET mykey:<n> <i>` and `GET mykey:<n>` in one write, over and over.
/// A GET after a `+OK` must return `i` or an error.
fn verifier(addr: String, n: usize, stop: Arc<AtomicBool>) -> (u64, u64, Vec<String>) {
    let key = format!("mykey:{n}");
    let mut client: Option<RawClient> = None;
    let (mut rounds, mut acked) = (0u64, 0u64);
    let mut bad = Vec::new();
    let started = Instant::now();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let c = match client.as_mut() {
            Some(c) => c,
            None => match RawClient::try_connect(&addr) {
                Ok(c) => client.insert(c),
                Err(_) => {
                    thread::sleep(ms(20));
                    continue;
                }
            },
        };
        i += 1;
        let v = i.to_string();
        let mut req = resp_cmd(&["SET", key.as_str(), v.as_str()]);
        req.extend_from_slice(&resp_cmd(&["GET", key.as_str()]));
        if c.try_send(&req).is_err() {
            client = None;
            continue;
        }
        let (Ok(set), Ok(get)) = (c.try_read_frame(secs(10)), c.try_read_frame(secs(10))) else {
            client = None;
            continue;
        };
        rounds += 1;
        if set == b"+OK\r\n" {
            acked += 1;
            if get != bulk(&v) && !is_error(&get) {
                bad.push(format!(
                    "{:?} client {n}: SET {key} {v} -> +OK, then GET -> {}",
                    started.elapsed(),
                    esc(&get)
                ));
            }
        }
    }
    (rounds, acked, bad)
}

#[test]
fn reads_follow_a_clients_own_acknowledged_writes_through_kills_restarts_and_stops() {
    let mut redis = RedisServer::start();
    let dir = TempDir::new("correctness");
    let rf = start_rf(
        &dir,
        &rf_config(
            &redis.addr(),
            "command_timeout_ms = 500",
            // Short open periods: more recoveries (each one a half-open phase) per second.
            "[breaker]\nopen_base_ms = 100\nopen_max_ms = 200\nhalf_open_max_wait_ms = 1000\n",
        ),
    );
    let addr = rf.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let verifiers: Vec<_> = (0..12)
        .map(|n| {
            let (addr, stop) = (addr.clone(), stop.clone());
            thread::spawn(move || verifier(addr, n, stop))
        })
        .collect();
    // Background load on other keys: replies are not checked.
    let load_ops = Arc::new(AtomicU64::new(0));
    let loaders: Vec<_> = (0..2)
        .map(|t| {
            let (addr, stop, ops) = (addr.clone(), stop.clone(), load_ops.clone());
            thread::spawn(move || {
                let mut x: u64 = 0x9e37_79b9 ^ t;
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut c) = RawClient::try_connect(&addr) else {
                        thread::sleep(ms(20));
                        continue;
                    };
                    while !stop.load(Ordering::Relaxed) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let key = format!("load:{}", x % 1000);
                        let req = match x % 4 {
                            0 => resp_cmd(&["SET", key.as_str(), "x"]),
                            _ => resp_cmd(&["GET", key.as_str()]),
                        };
                        if c.try_send(&req).is_err() || c.try_read_frame(secs(10)).is_err() {
                            break;
                        }
                        ops.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();

    let admin = |redis: &RedisServer| redis_pid(&mut redis.client());
    let wait_state = |state: f64, timeout: Duration| {
        wait_until(timeout, || breaker_gauge(&rf, "main") == state);
    };
    let started = Instant::now();
    thread::sleep(ms(500));
    let mut events = Vec::new();
    let mut round = 0;
    while started.elapsed() < secs(11) {
        round += 1;
        match round % 4 {
            // SIGKILL; back once the breaker has opened.
            1 | 3 => {
                redis.kill();
                wait_state(OPEN, secs(3));
                redis.restart();
                events.push("kill+restart");
            }
            // Frozen until the breaker opens, then thawed.
            2 => {
                let pid = admin(&redis);
                signal_pid(pid, "STOP");
                wait_state(OPEN, secs(3));
                signal_pid(pid, "CONT");
                events.push("stop until open");
            }
            // SIGKILL and back at once; then a short freeze.
            _ => {
                redis.kill();
                thread::sleep(ms(100));
                redis.restart();
                wait_state(CLOSED, secs(3));
                let pid = admin(&redis);
                signal_pid(pid, "STOP");
                thread::sleep(ms(300));
                signal_pid(pid, "CONT");
                events.push("quick kill+restart, stop 300 ms");
            }
        }
        wait_state(CLOSED, secs(3));
        thread::sleep(ms(200));
    }
    stop.store(true, Ordering::Relaxed);
    let mut bad = Vec::new();
    let (mut rounds, mut acked) = (0, 0);
    for v in verifiers {
        let (r, a, b) = v.join().expect("verifier thread");
        rounds += r;
        acked += a;
        bad.extend(b);
    }
    for l in loaders {
        l.join().expect("load thread");
    }
    let half_opens = metric_sum(
        &rf.metrics(),
        "redfuse_breaker_transitions_total",
        &[("to", "half_open")],
    );
    eprintln!(
        "{events:?} in {:?} ({half_opens} half-opens): {rounds} SET+GET rounds, {acked} \
         acknowledged SETs, {} background requests, {} violations",
        started.elapsed(),
        load_ops.load(Ordering::Relaxed),
        bad.len()
    );
    assert!(acked > 100, "too few acknowledged writes to judge: {acked}");
    assert!(
        bad.is_empty(),
        "a GET right after the client's own acknowledged SET returned nil or an older value \
         ({} times):\n{}",
        bad.len(),
        bad.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// One client does not open the shared breaker for everyone
// ---------------------------------------------------------------------------------------

/// A 200-deep nested array, deeper than redfuse's default `max_nesting_depth` (128).
const NESTED_SCRIPT: &str = "local t = {} local cur = t \
     for i = 1, 199 do local n = {} cur[1] = n cur = n end \
     cur[1] = 1 return t";

#[test]
fn a_deeply_nested_script_reply_does_not_refuse_other_clients() {
    let redis = RedisServer::start();
    let direct = redis.cmd(&["EVAL", NESTED_SCRIPT, "0"]);
    assert_eq!(
        direct.windows(4).filter(|w| w == b"*1\r\n").count(),
        200,
        "Redis answers the script with 200 nested arrays"
    );
    let dir = TempDir::new("correctness");
    let rf = start_rf(&dir, &rf_config(&redis.addr(), "", FAST_RECOVERY));
    let bystanders: Vec<Bystander> = (0..4)
        .map(|i| Bystander::start(&rf.addr(), &format!("lua{i}")))
        .collect();
    let mut script_client = rf.client();
    let mut replies: Vec<String> = Vec::new();
    let started = Instant::now();
    // Six calls a second for four seconds.
    for i in 0..24u32 {
        script_client.send_cmd(&["EVAL", NESTED_SCRIPT, "0"]);
        let r = match script_client.try_read_frame(secs(10)) {
            Ok(f) => esc(&f[..f.len().min(60)]),
            Err(e) => {
                script_client = rf.client();
                format!("{e:?}")
            }
        };
        if !replies.contains(&r) {
            replies.push(r);
        }
        let next = started + ms(167) * (i + 1);
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            thread::sleep(d);
        }
    }
    eprintln!("the script's caller got: {replies:?}");
    assert_bystanders_unharmed(bystanders, "200-deep EVAL reply, 6 calls/s");
}

/// Rounds of 200 distinct 100 KB reads the hog sends: 600 MB of replies it never reads.
const HOG_ROUNDS: usize = 30;

#[test]
fn a_client_that_never_reads_its_replies_does_not_refuse_other_clients() {
    let redis = RedisServer::start();
    let value = vec![b'x'; 100 * 1024];
    {
        let mut d = redis.client();
        // `SET big:i value` for 200 keys, pipelined.
        let mut set = Vec::new();
        for i in 0..200 {
            set.extend_from_slice(&resp_cmd(&[
                b"SET".as_slice(),
                format!("big:{i}").as_bytes(),
                &value[..],
            ]));
        }
        d.send(&set);
        for _ in 0..200 {
            assert_eq!(d.read_frame(), b"+OK\r\n");
        }
    }
    let dir = TempDir::new("correctness");
    let rf = start_rf(&dir, &rf_config(&redis.addr(), "", FAST_RECOVERY));
    let bystanders: Vec<Bystander> = (0..4)
        .map(|i| Bystander::start(&rf.addr(), &format!("hog{i}")))
        .collect();

    // The hog pipelines reads of the 100 KB values and never reads a reply. Each read is a
    // distinct command (GETRANGE to a different end past the value's length), so identical
    // reads in flight cannot share one upstream request.
    let rounds = |r: usize| {
        let mut out = Vec::new();
        for i in 0..200 {
            let end = (200_000 + r).to_string();
            out.extend_from_slice(&resp_cmd(&[
                "GETRANGE",
                format!("big:{i}").as_str(),
                "0",
                end.as_str(),
            ]));
        }
        out
    };
    let mut hog = TcpStream::connect(rf.addr()).expect("hog connects");
    hog.set_write_timeout(Some(ms(200))).unwrap();
    let started = Instant::now();
    let mut sent = 0;
    while started.elapsed() < secs(4) {
        if sent < HOG_ROUNDS {
            match hog.write_all(&rounds(sent)) {
                Ok(()) => sent += 1,
                Err(_) => thread::sleep(ms(50)),
            }
        } else {
            thread::sleep(ms(50));
        }
    }
    eprintln!(
        "the hog wrote {sent} rounds of 200 reads ({} MB of replies, none read)",
        sent * 200 / 10
    );
    assert_bystanders_unharmed(
        bystanders,
        "a client pipelining 100 KB reads and never reading",
    );
    drop(hog);
}

#[test]
fn blocked_clients_beyond_redis_maxclients_do_not_refuse_other_clients() {
    let redis = RedisServer::start_with(&["--maxclients", "200"]);
    let dir = TempDir::new("correctness");
    let rf = start_rf(&dir, &rf_config(&redis.addr(), "", FAST_RECOVERY));
    let bystanders: Vec<Bystander> = (0..4)
        .map(|i| Bystander::start(&rf.addr(), &format!("max{i}")))
        .collect();
    let mut blocked = Vec::new();
    for _ in 0..300 {
        let mut c = rf.client();
        c.send_cmd(&["BLPOP", "somekey", "0"]);
        blocked.push(c);
    }
    thread::sleep(secs(2));
    let mut answers: Vec<(String, usize)> = Vec::new();
    for c in blocked.iter_mut() {
        if let Ok(f) = c.try_read_frame(ms(1)) {
            let text = String::from_utf8_lossy(&f).trim_end().to_string();
            match answers.iter_mut().find(|(t, _)| *t == text) {
                Some((_, n)) => *n += 1,
                None => answers.push((text, 1)),
            }
        }
    }
    eprintln!("clients in BLPOP were answered: {answers:?}");
    assert_bystanders_unharmed(bystanders, "300 BLPOP clients against maxclients 200");
    drop(blocked);
}
