//! Functional behaviour of redfuse as a transparent Redis proxy: pipelining,
//! concurrency, binary safety, transactions, pub/sub, RESP3, auth, inline
//! commands, QUIT, and byte-exact error replies that come from Redis itself.

mod support;

use std::collections::BTreeSet;
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use support::*;

#[test]
fn pipeline_10k_commands_in_one_write_replies_in_order() {
    let (redis, rf) = setup(&[]);
    let mut c = rf.client();
    let mut buf = Vec::new();
    let mut expected: Vec<Vec<u8>> = Vec::new();
    let mut counter = 0;
    for i in 0..10_000 {
        match i % 5 {
            0 => {
                buf.extend(resp_cmd(&["SET", &format!("pk:{i}"), &format!("v{i}")]));
                expected.push(b"+OK\r\n".to_vec());
            }
            1 => {
                buf.extend(resp_cmd(&["GET", &format!("pk:{}", i - 1)]));
                expected.push(bulk(format!("v{}", i - 1)));
            }
            2 => {
                counter += 1;
                buf.extend(resp_cmd(&["INCR", "pctr"]));
                expected.push(format!(":{counter}\r\n").into_bytes());
            }
            3 => {
                buf.extend(resp_cmd(&["GET", &format!("missing:{i}")]));
                expected.push(b"$-1\r\n".to_vec());
            }
            _ => {
                buf.extend(resp_cmd(&["ECHO", &format!("e{i}")]));
                expected.push(bulk(format!("e{i}")));
            }
        }
    }
    c.send(&buf);
    for (i, want) in expected.iter().enumerate() {
        let got = c.read_frame();
        assert_frame(&got, want, &format!("reply #{i} of 10000"));
    }
    assert_frame(&c.cmd(&["PING"]), b"+PONG\r\n", "PING after the pipeline");
    assert!(
        c.pending_bytes().is_empty(),
        "extra bytes after pipeline: {}",
        esc(c.pending_bytes())
    );
    assert_frame(
        &redis.cmd(&["GET", "pctr"]),
        &bulk(counter.to_string()),
        "counter seen directly in redis",
    );
}

#[test]
fn concurrent_200_clients_interleaved_pipelines() {
    let (_redis, rf) = setup(&[]);
    const CLIENTS: usize = 200;
    const ROUNDS: usize = 5;
    const KEYS: usize = 20;
    let addr = rf.addr();
    let barrier = Barrier::new(CLIENTS);
    let errors: Vec<String> = thread::scope(|s| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|id| {
                let addr = addr.clone();
                let barrier = &barrier;
                s.spawn(move || -> Result<(), String> {
                    let mut c = RawClient::connect(&addr);
                    c.set_timeout(secs(30));
                    barrier.wait();
                    for round in 0..ROUNDS {
                        let mut buf = Vec::new();
                        let mut expected = Vec::new();
                        for k in 0..KEYS {
                            let v = format!("c{id}-r{round}-k{k}");
                            buf.extend(resp_cmd(&["SET", &format!("cc:{id}:{k}"), &v]));
                            expected.push(b"+OK\r\n".to_vec());
                        }
                        for k in 0..KEYS {
                            buf.extend(resp_cmd(&["GET", &format!("cc:{id}:{k}")]));
                            expected.push(bulk(format!("c{id}-r{round}-k{k}")));
                        }
                        buf.extend(resp_cmd(&["INCR", &format!("cc:{id}:n")]));
                        expected.push(format!(":{}\r\n", round + 1).into_bytes());
                        // Split the pipeline in two writes to interleave more.
                        let mid = buf.len() / 2;
                        c.send(&buf[..mid]);
                        thread::yield_now();
                        c.send(&buf[mid..]);
                        for (i, want) in expected.iter().enumerate() {
                            let got = c.read_frame();
                            if &got != want {
                                return Err(format!(
                                    "client {id} round {round} reply {i}: expected {} got {}",
                                    esc(want),
                                    esc(&got)
                                ));
                            }
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| match h.join() {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(p) => Some(
                    p.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "client thread panicked".into()),
                ),
            })
            .collect()
    });
    assert!(
        errors.is_empty(),
        "{} of {CLIENTS} clients failed; first errors:\n{}",
        errors.len(),
        errors
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn binary_safe_keys_and_values() {
    let (redis, rf) = setup(&[]);
    let mut c = rf.client();
    let all_bytes: Vec<u8> = (0..=255u8).collect();
    let cases: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (b"nul\0key".to_vec(), b"nul\0value\0".to_vec()),
        (b"crlf\r\nkey".to_vec(), b"\r\n\r\n$3\r\nabc\r\n".to_vec()),
        (
            b"*1\r\n$4\r\nPING\r\n".to_vec(),
            b"*2\r\n$3\r\nGET\r\n$1\r\nx\r\n".to_vec(),
        ),
        (b"\xff\xfe\x00\x01".to_vec(), all_bytes.clone()),
        (b"empty".to_vec(), Vec::new()),
        (
            b" spaces and \"quotes\" ".to_vec(),
            b"-ERR not an error\r\n".to_vec(),
        ),
        (all_bytes.clone(), b"+OK\r\n".to_vec()),
    ];
    for (k, v) in &cases {
        let r = c.cmd(&[&b"SET"[..], k, v]);
        assert_frame(&r, b"+OK\r\n", &format!("SET {}", esc(k)));
    }
    for (k, v) in &cases {
        let r = c.cmd(&[&b"GET"[..], k]);
        assert_frame(&r, &bulk(v), &format!("GET {}", esc(k)));
        // And Redis itself stored exactly these bytes.
        assert_frame(
            &redis.cmd(&[&b"GET"[..], k]),
            &bulk(v),
            &format!("direct GET {}", esc(k)),
        );
    }
    // MGET of all keys in one command, pipelined with a STRLEN.
    let mut args: Vec<&[u8]> = vec![b"MGET"];
    args.extend(cases.iter().map(|(k, _)| k.as_slice()));
    c.send(&resp_cmd(&args));
    c.send(&resp_cmd(&[&b"STRLEN"[..], &all_bytes]));
    let mget = parse_resp(&c.read_frame());
    let want: Vec<Resp> = cases.iter().map(|(_, v)| Resp::Bulk(v.clone())).collect();
    assert_eq!(mget, Resp::Array(want), "MGET of binary keys");
    assert_frame(&c.read_frame(), b":5\r\n", "STRLEN");
}

#[test]
fn large_64mb_value_roundtrip() {
    let (redis, rf) = setup(&[]);
    let mut c = rf.client();
    c.set_timeout(secs(60));
    let size = 64 << 20;
    let value: Vec<u8> = (0..size)
        .map(|i| (i * 31 % 251) as u8 ^ if i % 1000 == 0 { b'\r' } else { 0 })
        .collect();
    let started = Instant::now();
    let r = c.cmd(&[&b"SET"[..], b"big", &value]);
    assert_frame(&r, b"+OK\r\n", "SET of a 64 MB value");
    assert_frame(
        &redis.cmd(&["STRLEN", "big"]),
        format!(":{size}\r\n").as_bytes(),
        "STRLEN directly in redis",
    );
    let got = c.cmd(&["GET", "big"]);
    let header = format!("${size}\r\n");
    assert!(
        got.starts_with(header.as_bytes()),
        "GET big: bad header {}",
        esc(&got[..got.len().min(40)])
    );
    assert_eq!(got.len(), header.len() + size + 2, "GET big: frame length");
    let payload = &got[header.len()..header.len() + size];
    if payload != value.as_slice() {
        let first = payload
            .iter()
            .zip(&value)
            .position(|(a, b)| a != b)
            .unwrap();
        panic!("GET big: payload differs from what was SET, first difference at byte {first}");
    }
    assert_frame(&c.cmd(&["PING"]), b"+PONG\r\n", "PING after the big value");
    eprintln!("64 MB SET+GET through redfuse took {:?}", started.elapsed());
}

#[test]
fn multi_exec_and_discard() {
    let (redis, rf) = setup(&[]);
    let mut c = rf.client();
    assert_frame(&c.cmd(&["MULTI"]), b"+OK\r\n", "MULTI");
    assert_frame(&c.cmd(&["SET", "tx", "1"]), b"+QUEUED\r\n", "SET in MULTI");
    assert_frame(&c.cmd(&["INCR", "tx"]), b"+QUEUED\r\n", "INCR in MULTI");
    assert_frame(&c.cmd(&["GET", "tx"]), b"+QUEUED\r\n", "GET in MULTI");
    assert_frame(&c.cmd(&["EXEC"]), b"*3\r\n+OK\r\n:2\r\n$1\r\n2\r\n", "EXEC");

    assert_frame(&c.cmd(&["MULTI"]), b"+OK\r\n", "MULTI");
    assert_frame(
        &c.cmd(&["SET", "tx", "discarded"]),
        b"+QUEUED\r\n",
        "SET in MULTI",
    );
    assert_frame(&c.cmd(&["DISCARD"]), b"+OK\r\n", "DISCARD");
    assert_frame(&c.cmd(&["GET", "tx"]), b"$1\r\n2\r\n", "GET after DISCARD");

    // Pipelined transaction in a single write.
    let mut p = resp_cmd(&["MULTI"]);
    p.extend(resp_cmd(&["INCR", "tx"]));
    p.extend(resp_cmd(&["INCR", "tx"]));
    p.extend(resp_cmd(&["EXEC"]));
    c.send(&p);
    let frames = c.read_frames(4);
    assert_eq!(
        frames,
        vec![
            b"+OK\r\n".to_vec(),
            b"+QUEUED\r\n".to_vec(),
            b"+QUEUED\r\n".to_vec(),
            b"*2\r\n:3\r\n:4\r\n".to_vec()
        ],
        "pipelined MULTI/INCR/INCR/EXEC"
    );

    // Errors outside a transaction are Redis's own.
    let direct_exec = redis.cmd(&["EXEC"]);
    assert_frame(
        &c.cmd(&["EXEC"]),
        &direct_exec,
        "EXEC without MULTI (same as redis)",
    );
    let direct_discard = redis.cmd(&["DISCARD"]);
    assert_frame(
        &c.cmd(&["DISCARD"]),
        &direct_discard,
        "DISCARD without MULTI (same as redis)",
    );

    // A queued command with a syntax error aborts EXEC with EXECABORT, like redis.
    assert_frame(&c.cmd(&["MULTI"]), b"+OK\r\n", "MULTI");
    let bad = c.cmd(&["GET"]);
    assert!(
        bad.starts_with(b"-ERR wrong number of arguments"),
        "GET without key in MULTI: {}",
        esc(&bad)
    );
    let exec = c.cmd(&["EXEC"]);
    assert!(
        exec.starts_with(b"-EXECABORT"),
        "EXEC after queued error: {}",
        esc(&exec)
    );
}

#[test]
fn watch_aborts_exec_when_another_client_modifies_key() {
    let (redis, rf) = setup(&[]);
    let mut a = rf.client();
    let mut b = rf.client();
    assert_frame(&a.cmd(&["SET", "w", "orig"]), b"+OK\r\n", "SET w");

    // Unmodified WATCH: EXEC runs.
    assert_frame(&a.cmd(&["WATCH", "w"]), b"+OK\r\n", "WATCH");
    assert_frame(&a.cmd(&["MULTI"]), b"+OK\r\n", "MULTI");
    assert_frame(&a.cmd(&["SET", "w", "first"]), b"+QUEUED\r\n", "SET queued");
    assert_frame(
        &a.cmd(&["EXEC"]),
        b"*1\r\n+OK\r\n",
        "EXEC with untouched WATCH",
    );

    // Modified by client B between WATCH and EXEC: EXEC returns a nil array.
    assert_frame(&a.cmd(&["WATCH", "w"]), b"+OK\r\n", "WATCH");
    assert_frame(&a.cmd(&["GET", "w"]), b"$5\r\nfirst\r\n", "GET w");
    assert_frame(&b.cmd(&["SET", "w", "changed"]), b"+OK\r\n", "B: SET w");
    assert_frame(&a.cmd(&["MULTI"]), b"+OK\r\n", "MULTI");
    assert_frame(&a.cmd(&["SET", "w", "mine"]), b"+QUEUED\r\n", "SET queued");
    assert_frame(
        &a.cmd(&["EXEC"]),
        b"*-1\r\n",
        "EXEC after the watched key was modified",
    );
    assert_frame(
        &a.cmd(&["GET", "w"]),
        b"$7\r\nchanged\r\n",
        "GET w after aborted EXEC",
    );
    assert_frame(
        &redis.cmd(&["GET", "w"]),
        b"$7\r\nchanged\r\n",
        "direct GET w",
    );

    // UNWATCH clears it.
    assert_frame(&a.cmd(&["WATCH", "w"]), b"+OK\r\n", "WATCH");
    assert_frame(&b.cmd(&["SET", "w", "again"]), b"+OK\r\n", "B: SET w");
    assert_frame(&a.cmd(&["UNWATCH"]), b"+OK\r\n", "UNWATCH");
    assert_frame(&a.cmd(&["MULTI"]), b"+OK\r\n", "MULTI");
    assert_frame(&a.cmd(&["SET", "w", "mine"]), b"+QUEUED\r\n", "SET queued");
    assert_frame(&a.cmd(&["EXEC"]), b"*1\r\n+OK\r\n", "EXEC after UNWATCH");
}

#[test]
fn select_isolation_between_clients() {
    let (redis, rf) = setup(&[]);
    let mut a = rf.client();
    let mut b = rf.client();
    assert_frame(&a.cmd(&["SELECT", "1"]), b"+OK\r\n", "A: SELECT 1");
    assert_frame(&a.cmd(&["SET", "k", "a"]), b"+OK\r\n", "A: SET k a (db 1)");
    assert_frame(
        &b.cmd(&["GET", "k"]),
        b"$-1\r\n",
        "B on db 0 must not see db 1's k",
    );
    assert_frame(&a.cmd(&["GET", "k"]), b"$1\r\na\r\n", "A sees k in db 1");
    assert_frame(&b.cmd(&["SET", "k", "b"]), b"+OK\r\n", "B: SET k b (db 0)");
    assert_frame(
        &a.cmd(&["GET", "k"]),
        b"$1\r\na\r\n",
        "A still sees db 1's k",
    );
    // Many interleaved commands on both, to shake out shared upstream state.
    for i in 0..50 {
        assert_frame(
            &a.cmd(&["GET", "k"]),
            b"$1\r\na\r\n",
            &format!("A GET k #{i}"),
        );
        assert_frame(
            &b.cmd(&["GET", "k"]),
            b"$1\r\nb\r\n",
            &format!("B GET k #{i}"),
        );
    }
    drop(a);
    // A fresh client starts on db 0, whatever A did.
    for i in 0..5 {
        let mut c = rf.client();
        assert_frame(
            &c.cmd(&["GET", "k"]),
            b"$1\r\nb\r\n",
            &format!("new client #{i} is on db 0"),
        );
    }
    assert_frame(&b.cmd(&["SELECT", "1"]), b"+OK\r\n", "B: SELECT 1");
    assert_frame(&b.cmd(&["GET", "k"]), b"$1\r\na\r\n", "B on db 1 sees a");
    let mut d = redis.client();
    assert_frame(&d.cmd(&["GET", "k"]), b"$1\r\nb\r\n", "direct db 0");
    assert_frame(&d.cmd(&["SELECT", "1"]), b"+OK\r\n", "direct SELECT 1");
    assert_frame(&d.cmd(&["GET", "k"]), b"$1\r\na\r\n", "direct db 1");
    let bad = b.cmd(&["SELECT", "99999"]);
    assert_frame(
        &bad,
        &redis.cmd(&["SELECT", "99999"]),
        "SELECT out of range (same as redis)",
    );
}

#[test]
fn blpop_served_by_push_from_another_client() {
    let (redis, rf) = setup(&[]);
    let mut a = rf.client();
    let mut b = rf.client();
    a.send_cmd(&["BLPOP", "bq", "10"]);
    redis.wait_blocked_clients(1);
    // B is not stuck behind A's blocking command.
    let t = Instant::now();
    assert_frame(
        &b.cmd(&["PING"]),
        b"+PONG\r\n",
        "B: PING while A is blocked",
    );
    assert!(
        t.elapsed() < secs(2),
        "B's PING took {:?} while A was blocked",
        t.elapsed()
    );
    assert_frame(&b.cmd(&["RPUSH", "bq", "x"]), b":1\r\n", "B: RPUSH");
    let got = a.read_frame_timeout(secs(5));
    assert_frame(&got, b"*2\r\n$2\r\nbq\r\n$1\r\nx\r\n", "A: BLPOP result");
    // Timeout path returns a nil array, like redis.
    let t = Instant::now();
    assert_frame(
        &a.cmd(&["BLPOP", "empty", "0.2"]),
        b"*-1\r\n",
        "BLPOP timeout",
    );
    assert!(
        t.elapsed() >= ms(150),
        "BLPOP 0.2 returned after only {:?}",
        t.elapsed()
    );
    assert_frame(&a.cmd(&["PING"]), b"+PONG\r\n", "A: PING after BLPOP");
}

#[test]
fn subscribe_psubscribe_and_publish_resp2() {
    let (_redis, rf) = setup(&[]);
    let mut sub = rf.client();
    let mut publ = rf.client();
    assert_frame(
        &sub.cmd(&["SUBSCRIBE", "ch1"]),
        b"*3\r\n$9\r\nsubscribe\r\n$3\r\nch1\r\n:1\r\n",
        "SUBSCRIBE ch1",
    );
    assert_frame(
        &publ.cmd(&["PUBLISH", "ch1", "hello"]),
        b":1\r\n",
        "PUBLISH ch1",
    );
    assert_frame(
        &sub.read_frame(),
        b"*3\r\n$7\r\nmessage\r\n$3\r\nch1\r\n$5\r\nhello\r\n",
        "message on ch1",
    );
    assert_frame(
        &sub.cmd(&["PSUBSCRIBE", "news.*"]),
        b"*3\r\n$10\r\npsubscribe\r\n$6\r\nnews.*\r\n:2\r\n",
        "PSUBSCRIBE news.*",
    );
    assert_frame(
        &publ.cmd(&["PUBLISH", "news.tech", "hi"]),
        b":1\r\n",
        "PUBLISH news.tech",
    );
    assert_frame(
        &sub.read_frame(),
        b"*4\r\n$8\r\npmessage\r\n$6\r\nnews.*\r\n$9\r\nnews.tech\r\n$2\r\nhi\r\n",
        "pmessage",
    );
    // Binary payload and many messages in order.
    let payload = b"bin\0\r\n$1\r\n".to_vec();
    assert_frame(
        &publ.cmd(&[&b"PUBLISH"[..], b"ch1", &payload]),
        b":1\r\n",
        "PUBLISH binary",
    );
    let mut want = b"*3\r\n$7\r\nmessage\r\n$3\r\nch1\r\n".to_vec();
    want.extend(bulk(&payload));
    assert_frame(&sub.read_frame(), &want, "binary message");
    for i in 0..100 {
        publ.send_cmd(&["PUBLISH", "ch1", &format!("m{i}")]);
    }
    for i in 0..100 {
        assert_frame(&publ.read_frame(), b":1\r\n", &format!("PUBLISH #{i}"));
    }
    for i in 0..100 {
        let mut want = b"*3\r\n$7\r\nmessage\r\n$3\r\nch1\r\n".to_vec();
        want.extend(bulk(format!("m{i}")));
        assert_frame(&sub.read_frame(), &want, &format!("message #{i}"));
    }
    // Subscribed-mode rules are Redis's.
    assert_frame(
        &sub.cmd(&["PING"]),
        b"*2\r\n$4\r\npong\r\n$0\r\n\r\n",
        "PING in RESP2 subscribed mode",
    );
    let err = sub.cmd(&["GET", "x"]);
    assert!(
        err.starts_with(b"-ERR Can't execute 'get'"),
        "GET in RESP2 subscribed mode should be rejected like redis does, got {}",
        esc(&err)
    );
    assert_frame(
        &sub.cmd(&["UNSUBSCRIBE", "ch1"]),
        b"*3\r\n$11\r\nunsubscribe\r\n$3\r\nch1\r\n:1\r\n",
        "UNSUBSCRIBE ch1",
    );
    assert_frame(
        &sub.cmd(&["PUNSUBSCRIBE", "news.*"]),
        b"*3\r\n$12\r\npunsubscribe\r\n$6\r\nnews.*\r\n:0\r\n",
        "PUNSUBSCRIBE news.*",
    );
    assert_frame(
        &publ.cmd(&["PUBLISH", "ch1", "nobody"]),
        b":0\r\n",
        "PUBLISH after unsubscribe",
    );
    assert_frame(
        &sub.cmd(&["SET", "after", "sub"]),
        b"+OK\r\n",
        "normal command after leaving pub/sub",
    );
    assert_frame(
        &sub.cmd(&["GET", "after"]),
        b"$3\r\nsub\r\n",
        "GET after leaving pub/sub",
    );
}

#[test]
fn hello_3_map_and_resp3_push_for_subscription() {
    let (redis, rf) = setup(&[]);
    let direct = parse_resp(&redis.cmd(&["HELLO", "3"]));
    let mut c = rf.client();
    let raw = c.cmd(&["HELLO", "3"]);
    assert!(
        raw.starts_with(b"%7\r\n"),
        "HELLO 3 should return a 7-entry map, got {}",
        esc(&raw)
    );
    let hello = parse_resp(&raw);
    let keys: BTreeSet<String> = hello
        .pairs()
        .unwrap()
        .iter()
        .map(|(k, _)| k.text().unwrap())
        .collect();
    let want: BTreeSet<String> = [
        "server", "version", "proto", "id", "mode", "role", "modules",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(keys, want, "HELLO 3 keys");
    assert_eq!(hello.get("proto"), Some(Resp::Int(3)), "proto");
    assert_eq!(
        hello.get("server"),
        direct.get("server"),
        "server (vs redis)"
    );
    assert_eq!(
        hello.get("version"),
        direct.get("version"),
        "version (vs redis)"
    );
    assert_eq!(hello.get("mode"), direct.get("mode"), "mode (vs redis)");
    assert_eq!(hello.get("role"), direct.get("role"), "role (vs redis)");
    assert!(
        hello.get("id").and_then(|v| v.int()).is_some(),
        "id is an integer"
    );
    assert!(
        matches!(hello.get("modules"), Some(Resp::Array(_))),
        "modules is an array"
    );

    // RESP3 types flow through.
    assert_frame(
        &c.cmd(&["GET", "missing"]),
        b"_\r\n",
        "RESP3 null for a missing key",
    );
    assert_frame(&c.cmd(&["HSET", "h", "f", "v"]), b":1\r\n", "HSET");
    assert_frame(
        &c.cmd(&["HGETALL", "h"]),
        b"%1\r\n$1\r\nf\r\n$1\r\nv\r\n",
        "HGETALL as RESP3 map",
    );
    assert_frame(&c.cmd(&["SADD", "s", "m"]), b":1\r\n", "SADD");
    assert_frame(
        &c.cmd(&["SMEMBERS", "s"]),
        b"~1\r\n$1\r\nm\r\n",
        "SMEMBERS as RESP3 set",
    );

    // A subscription after HELLO 3 delivers push frames.
    assert_frame(
        &c.cmd(&["SUBSCRIBE", "ch"]),
        b">3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n",
        "SUBSCRIBE confirmation as a push",
    );
    let mut p = rf.client();
    assert_frame(&p.cmd(&["PUBLISH", "ch", "hello"]), b":1\r\n", "PUBLISH ch");
    assert_frame(
        &c.read_frame(),
        b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\nhello\r\n",
        "message as a RESP3 push",
    );
    // In RESP3 a subscribed connection can still run ordinary commands.
    assert_frame(
        &c.cmd(&["PING"]),
        b"+PONG\r\n",
        "PING while subscribed (RESP3)",
    );
    assert_frame(
        &c.cmd(&["GET", "missing"]),
        b"_\r\n",
        "GET while subscribed (RESP3)",
    );
    assert_frame(
        &p.cmd(&["PUBLISH", "ch", "again"]),
        b":1\r\n",
        "PUBLISH ch again",
    );
    assert_frame(
        &c.read_frame(),
        b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\nagain\r\n",
        "second push",
    );
    // Another client on RESP2 is unaffected.
    assert_frame(
        &p.cmd(&["GET", "missing"]),
        b"$-1\r\n",
        "RESP2 client still gets $-1",
    );
}

#[test]
fn hello_2_returns_flat_array_and_switches_back() {
    let (redis, rf) = setup(&[]);
    let mut c = rf.client();
    let raw = c.cmd(&["HELLO", "2"]);
    assert!(
        raw.starts_with(b"*14\r\n"),
        "HELLO 2 should return *14, got {}",
        esc(&raw)
    );
    let hello = parse_resp(&raw);
    assert_eq!(hello.get("proto"), Some(Resp::Int(2)), "proto");
    let direct = parse_resp(&redis.cmd(&["HELLO", "2"]));
    assert_eq!(
        hello.get("version"),
        direct.get("version"),
        "version (vs redis)"
    );
    assert_frame(&c.cmd(&["GET", "missing"]), b"$-1\r\n", "RESP2 nil");
    let raw3 = c.cmd(&["HELLO", "3"]);
    assert!(raw3.starts_with(b"%7\r\n"), "HELLO 3: {}", esc(&raw3));
    assert_frame(
        &c.cmd(&["GET", "missing"]),
        b"_\r\n",
        "RESP3 null after HELLO 3",
    );
    let raw2 = c.cmd(&["HELLO", "2"]);
    assert!(
        raw2.starts_with(b"*14\r\n"),
        "HELLO 2 again: {}",
        esc(&raw2)
    );
    assert_frame(
        &c.cmd(&["GET", "missing"]),
        b"$-1\r\n",
        "RESP2 nil after switching back",
    );
    // Unsupported protocol version: Redis's own error.
    let direct_err = redis.cmd(&["HELLO", "4"]);
    assert_frame(
        &c.cmd(&["HELLO", "4"]),
        &direct_err,
        "HELLO 4 (same as redis)",
    );
}

#[test]
fn client_name_setinfo_select_ping() {
    let (redis, rf) = setup(&[]);
    let mut c = rf.client();
    assert_frame(&c.cmd(&["PING"]), b"+PONG\r\n", "PING");
    assert_frame(&c.cmd(&["PING", "hello"]), b"$5\r\nhello\r\n", "PING hello");
    assert_frame(&c.cmd(&["ECHO", "e"]), b"$1\r\ne\r\n", "ECHO");
    assert_frame(
        &c.cmd(&["CLIENT", "GETNAME"]),
        b"$-1\r\n",
        "GETNAME before SETNAME",
    );
    assert_frame(
        &c.cmd(&["CLIENT", "SETNAME", "myname"]),
        b"+OK\r\n",
        "SETNAME",
    );
    assert_frame(
        &c.cmd(&["CLIENT", "GETNAME"]),
        b"$6\r\nmyname\r\n",
        "GETNAME",
    );
    let mut other = rf.client();
    assert_frame(
        &other.cmd(&["CLIENT", "GETNAME"]),
        b"$-1\r\n",
        "another client's name is its own",
    );
    assert_frame(
        &other.cmd(&["CLIENT", "SETNAME", "other"]),
        b"+OK\r\n",
        "SETNAME other",
    );
    assert_frame(
        &c.cmd(&["CLIENT", "GETNAME"]),
        b"$6\r\nmyname\r\n",
        "GETNAME unchanged by other client",
    );
    let bad_name = c.cmd(&["CLIENT", "SETNAME", "has space"]);
    assert_frame(
        &bad_name,
        &redis.cmd(&["CLIENT", "SETNAME", "has space"]),
        "invalid name (same as redis)",
    );

    // CLIENT SETINFO (sent by modern client libraries on connect). Redis < 7.2
    // doesn't know it; either the proxy accepts it or the reply is Redis's own.
    for (attr, val) in [("lib-name", "redfuse-test"), ("lib-ver", "1.2.3")] {
        let got = c.cmd(&["CLIENT", "SETINFO", attr, val]);
        let direct = redis.cmd(&["CLIENT", "SETINFO", attr, val]);
        assert!(
            got == b"+OK\r\n" || got == direct,
            "CLIENT SETINFO {attr}: got {}, redis says {}",
            esc(&got),
            esc(&direct)
        );
    }
    assert_frame(&c.cmd(&["SELECT", "0"]), b"+OK\r\n", "SELECT 0");
    assert_frame(&c.cmd(&["SET", "k", "v"]), b"+OK\r\n", "SET");
    assert_frame(&c.cmd(&["GET", "k"]), b"$1\r\nv\r\n", "GET");
    assert_frame(
        &c.cmd(&["CLIENT", "GETNAME"]),
        b"$6\r\nmyname\r\n",
        "GETNAME still set",
    );
}

#[test]
fn errors_from_redis_are_passed_through_verbatim() {
    let (redis, rf) = setup(&[]);
    let mut c = rf.client();
    let mut d = redis.client();
    assert_frame(&c.cmd(&["SET", "str", "abc"]), b"+OK\r\n", "SET str");
    let cases: Vec<Vec<&str>> = vec![
        vec!["GET"],
        vec!["SET", "onlykey"],
        vec!["NOSUCHCMD", "a", "b"],
        vec!["INCR", "str"],
        vec!["LPUSH", "str", "x"],
        vec!["SET", "k", "v", "EX", "-1"],
        vec!["CONFIG", "NOSUCHSUB"],
        vec!["OBJECT", "ENCODING", "nokey"],
    ];
    for args in cases {
        let want = d.cmd(&args);
        let got = c.cmd(&args);
        assert!(
            want.starts_with(b"-") || want == b"$-1\r\n",
            "direct {args:?}: {}",
            esc(&want)
        );
        assert_frame(&got, &want, &format!("{args:?} (must equal redis's reply)"));
    }
    // The connection stays usable after errors.
    assert_frame(
        &c.cmd(&["GET", "str"]),
        b"$3\r\nabc\r\n",
        "GET after errors",
    );
}

#[test]
fn auth_passthrough_to_password_protected_upstream() {
    let redis = RedisServer::start_with(&["--requirepass", "secret"]);
    let rf = Redfuse::start(&redis.addr(), &[]);
    let mut c = rf.client();
    let noauth = c.cmd(&["GET", "k"]);
    assert!(
        noauth.starts_with(b"-NOAUTH"),
        "command before AUTH: {}",
        esc(&noauth)
    );
    let wrong = c.cmd(&["AUTH", "wrong"]);
    assert!(
        wrong.starts_with(b"-WRONGPASS"),
        "AUTH with a wrong password: {}",
        esc(&wrong)
    );
    let still = c.cmd(&["GET", "k"]);
    assert!(
        still.starts_with(b"-NOAUTH"),
        "command after failed AUTH: {}",
        esc(&still)
    );
    assert_frame(&c.cmd(&["AUTH", "secret"]), b"+OK\r\n", "AUTH secret");
    assert_frame(&c.cmd(&["SET", "k", "v"]), b"+OK\r\n", "SET after AUTH");
    assert_frame(&c.cmd(&["GET", "k"]), b"$1\r\nv\r\n", "GET after AUTH");

    // Two-argument form (default user), on a separate connection.
    let mut c2 = rf.client();
    assert_frame(
        &c2.cmd(&["AUTH", "default", "secret"]),
        b"+OK\r\n",
        "AUTH default secret",
    );
    assert_frame(
        &c2.cmd(&["GET", "k"]),
        b"$1\r\nv\r\n",
        "GET on second client",
    );

    // Authentication is per client: a new connection is not authenticated.
    let mut c3 = rf.client();
    let noauth = c3.cmd(&["GET", "k"]);
    assert!(
        noauth.starts_with(b"-NOAUTH"),
        "new client must not inherit AUTH: {}",
        esc(&noauth)
    );

    // HELLO with AUTH.
    let mut c4 = rf.client();
    let h = c4.cmd(&["HELLO", "3", "AUTH", "default", "wrong"]);
    assert!(
        h.starts_with(b"-WRONGPASS"),
        "HELLO AUTH wrong: {}",
        esc(&h)
    );
    let h = c4.cmd(&["HELLO", "3", "AUTH", "default", "secret"]);
    assert!(
        h.starts_with(b"%7\r\n"),
        "HELLO 3 AUTH default secret: {}",
        esc(&h)
    );
    assert_frame(
        &c4.cmd(&["GET", "k"]),
        b"$1\r\nv\r\n",
        "GET after HELLO AUTH",
    );
}

#[test]
fn configured_password_serves_unauthenticated_client() {
    let redis = RedisServer::start_with(&["--requirepass", "secret"]);
    let rf = Redfuse::start(&redis.addr(), &["--password", "secret"]);
    let mut c = rf.client();
    assert_frame(
        &c.cmd(&["SET", "k", "v"]),
        b"+OK\r\n",
        "SET without client AUTH",
    );
    assert_frame(
        &c.cmd(&["GET", "k"]),
        b"$1\r\nv\r\n",
        "GET without client AUTH",
    );
    assert_frame(&redis.cmd(&["GET", "k"]), b"$1\r\nv\r\n", "direct GET");
    assert!(
        !rf.logs_text().contains("secret"),
        "the password must not appear in redfuse's logs:\n{}",
        rf.logs_text()
    );
}

#[test]
fn configured_password_via_env_var() {
    let redis = RedisServer::start_with(&["--requirepass", "envsecret"]);
    let rf = Redfuse::start_with_env(&redis.addr(), &[], &[("REDFUSE_PASSWORD", "envsecret")]);
    let mut c = rf.client();
    assert_frame(
        &c.cmd(&["SET", "k", "v"]),
        b"+OK\r\n",
        "SET with REDFUSE_PASSWORD",
    );
    assert_frame(
        &c.cmd(&["GET", "k"]),
        b"$1\r\nv\r\n",
        "GET with REDFUSE_PASSWORD",
    );
}

#[test]
fn configured_acl_username_and_password() {
    let redis = RedisServer::start_with(&[
        "--requirepass",
        "adminpw",
        "--user",
        "alice",
        "on",
        ">alicepw",
        "~*",
        "&*",
        "+@all",
    ]);
    let rf = Redfuse::start(
        &redis.addr(),
        &["--username", "alice", "--password", "alicepw"],
    );
    let mut c = rf.client();
    assert_frame(
        &c.cmd(&["ACL", "WHOAMI"]),
        b"$5\r\nalice\r\n",
        "ACL WHOAMI through redfuse",
    );
    assert_frame(&c.cmd(&["SET", "k", "v"]), b"+OK\r\n", "SET as alice");
    assert_frame(&c.cmd(&["GET", "k"]), b"$1\r\nv\r\n", "GET as alice");
}

#[test]
fn inline_commands() {
    let (redis, rf) = setup(&[]);
    let mut c = rf.client();
    c.send(b"PING\r\n");
    assert_frame(&c.read_frame(), b"+PONG\r\n", "inline PING");
    c.send(b"SET a b\r\n");
    assert_frame(&c.read_frame(), b"+OK\r\n", "inline SET a b");
    c.send(b"GET a\r\n");
    assert_frame(&c.read_frame(), b"$1\r\nb\r\n", "inline GET a");
    // Several inline commands in one write, mixed with RESP.
    let mut p = b"PING\r\nECHO hi\r\n".to_vec();
    p.extend(resp_cmd(&["GET", "a"]));
    p.extend(b"INCR n\r\n");
    c.send(&p);
    assert_eq!(
        c.read_frames(4),
        vec![
            b"+PONG\r\n".to_vec(),
            b"$2\r\nhi\r\n".to_vec(),
            b"$1\r\nb\r\n".to_vec(),
            b":1\r\n".to_vec()
        ],
        "mixed inline/RESP pipeline"
    );
    // Quoted arguments, like redis-cli/telnet users type them.
    c.send(b"SET \"key with space\" \"hello world\"\r\n");
    assert_frame(&c.read_frame(), b"+OK\r\n", "inline SET with quoted args");
    assert_frame(
        &c.cmd(&["GET", "key with space"]),
        b"$11\r\nhello world\r\n",
        "GET of the quoted key",
    );
    // Empty lines are ignored and a bare LF terminates an inline command, like redis.
    c.send(b"\r\nPING\r\n");
    assert_frame(&c.read_frame(), b"+PONG\r\n", "empty inline line then PING");
    c.send(b"PING\n");
    assert_frame(&c.read_frame(), b"+PONG\r\n", "LF-terminated inline PING");
    // Inline arity errors are Redis's.
    c.send(b"GET\r\n");
    assert_frame(
        &c.read_frame(),
        &redis.cmd(&["GET"]),
        "inline GET without key (same as redis)",
    );
    assert_frame(&redis.cmd(&["GET", "a"]), b"$1\r\nb\r\n", "direct GET a");
}

#[test]
fn quit_replies_ok_closes_and_drops_pipelined_commands() {
    let (redis, rf) = setup(&[]);
    let mut a = rf.client();
    assert_frame(
        &a.cmd(&["SET", "before", "1"]),
        b"+OK\r\n",
        "SET before QUIT",
    );
    let mut p = resp_cmd(&["QUIT"]);
    p.extend(resp_cmd(&["SET", "quitkey", "x"]));
    p.extend(resp_cmd(&["INCR", "quitctr"]));
    a.send(&p);
    assert_frame(&a.read_frame(), b"+OK\r\n", "QUIT reply");
    let rest = a.read_until_closed_timeout(secs(5));
    assert!(
        rest.is_empty(),
        "nothing may follow QUIT's +OK, got {}",
        esc(&rest)
    );
    let mut b = rf.client();
    assert_frame(
        &b.cmd(&["GET", "before"]),
        b"$1\r\n1\r\n",
        "command before QUIT ran",
    );
    assert_frame(
        &b.cmd(&["GET", "quitkey"]),
        b"$-1\r\n",
        "SET pipelined after QUIT must not run",
    );
    assert_frame(
        &b.cmd(&["GET", "quitctr"]),
        b"$-1\r\n",
        "INCR pipelined after QUIT must not run",
    );
    assert_frame(
        &redis.cmd(&["EXISTS", "quitkey", "quitctr"]),
        b":0\r\n",
        "direct EXISTS",
    );
    // Inline QUIT too.
    let mut c = rf.client();
    c.send(b"QUIT\r\nSET quitkey y\r\n");
    assert_frame(&c.read_frame(), b"+OK\r\n", "inline QUIT reply");
    let rest = c.read_until_closed_timeout(secs(5));
    assert!(
        rest.is_empty(),
        "nothing may follow inline QUIT's +OK, got {}",
        esc(&rest)
    );
    assert_frame(
        &b.cmd(&["GET", "quitkey"]),
        b"$-1\r\n",
        "inline SET after QUIT must not run",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_crate_multiplexed_mixed_workload() {
    use redis::AsyncCommands;
    let (_redis, rf) = setup(&[]);
    let addr = rf.addr();
    let work = async move {
        for proto in ["", "?protocol=resp3"] {
            let client = redis::Client::open(format!("redis://{addr}/{proto}")).unwrap();
            let mut con = client
                .get_multiplexed_async_connection()
                .await
                .unwrap_or_else(|e| panic!("connect via redis crate ({proto}): {e}"));
            let p = if proto.is_empty() { "r2" } else { "r3" };
            let _: () = con.set(format!("{p}:s"), "v").await.unwrap();
            let v: String = con.get(format!("{p}:s")).await.unwrap();
            assert_eq!(v, "v");
            let missing: Option<String> = con.get(format!("{p}:missing")).await.unwrap();
            assert_eq!(missing, None);
            let bin: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
            let _: () = con.set(format!("{p}:bin"), &bin).await.unwrap();
            let back: Vec<u8> = con.get(format!("{p}:bin")).await.unwrap();
            assert!(back == bin, "binary roundtrip via redis crate");
            let _: () = con
                .hset_multiple(format!("{p}:h"), &[("a", 1), ("b", 2)])
                .await
                .unwrap();
            let h: std::collections::HashMap<String, i64> =
                con.hgetall(format!("{p}:h")).await.unwrap();
            assert_eq!(h.get("a"), Some(&1));
            assert_eq!(h.get("b"), Some(&2));
            let _: () = con.rpush(format!("{p}:l"), &[1, 2, 3]).await.unwrap();
            let l: Vec<i64> = con.lrange(format!("{p}:l"), 0, -1).await.unwrap();
            assert_eq!(l, vec![1, 2, 3]);
            let (a, b): (i64, i64) = redis::pipe()
                .atomic()
                .incr(format!("{p}:n"), 5)
                .incr(format!("{p}:n"), 5)
                .query_async(&mut con)
                .await
                .unwrap();
            assert_eq!((a, b), (5, 10));
            let err = redis::cmd("INCR")
                .arg(format!("{p}:s"))
                .query_async::<i64>(&mut con)
                .await;
            assert!(err.is_err(), "INCR on a string must fail");

            // Many concurrent tasks sharing the multiplexed connection.
            let mut tasks = Vec::new();
            for t in 0..16 {
                let mut con = con.clone();
                let p = p.to_string();
                tasks.push(tokio::spawn(async move {
                    for i in 0..100 {
                        let key = format!("{p}:t{t}:{i}");
                        let val = format!("val-{t}-{i}");
                        let _: () = con.set(&key, &val).await.unwrap();
                        let got: String = con.get(&key).await.unwrap();
                        assert_eq!(got, val);
                        let n: i64 = con.incr(format!("{p}:t{t}:ctr"), 1).await.unwrap();
                        assert_eq!(n, i + 1);
                    }
                }));
            }
            for t in tasks {
                t.await.expect("task panicked");
            }
            let total: i64 = con.get(format!("{p}:t7:ctr")).await.unwrap();
            assert_eq!(total, 100);
        }
    };
    tokio::time::timeout(Duration::from_secs(60), work)
        .await
        .expect("redis crate workload did not finish within 60s");
}

/// A reply redfuse has made goes out while a later command of the same pipeline waits on
/// Redis: here `SELECT` needs its answer before the next command may go on, and Redis
/// (behind a relay) answers it late. The `CLIENT SETNAME` reply before it is not held back.
#[test]
fn a_ready_reply_is_not_held_back_by_a_later_command_that_waits() {
    let redis = RedisServer::start();
    let relay = FaultRelay::start(&redis.addr());
    // A slow Redis, not a failing one: no health probe or slow-call rule opens the breaker,
    // and no connection is timed out while opening (under the full suite the relay, in
    // this process, once made the pool's handshake take over the default 1 s).
    let rf = Redfuse::start_with_env(
        &relay.addr(),
        &[
            "--command-timeout-ms",
            "10000",
            "--connect-timeout-ms",
            "10000",
        ],
        &[
            ("REDFUSE_HEALTH_PROBE_INTERVAL_MS", "0"),
            ("REDFUSE_BREAKER__SLOW_CALL_THRESHOLD_MS", "60000"),
        ],
    );
    let mut c = rf.client();
    assert_eq!(c.cmd(&["PING"]), b"+PONG\r\n");
    relay.set_mode(FaultMode::Delay(ms(1500)));
    let mut pipeline = resp_cmd(&["CLIENT", "SETNAME", "early"]);
    pipeline.extend_from_slice(&resp_cmd(&["SELECT", "1"]));
    let sent = Instant::now();
    c.send(&pipeline);
    assert_eq!(c.read_frame_timeout(secs(10)), b"+OK\r\n");
    let first = sent.elapsed();
    assert_eq!(c.read_frame_timeout(secs(10)), b"+OK\r\n");
    let second = sent.elapsed();
    assert!(
        second >= ms(1500) && first < ms(750),
        "SETNAME answered after {first:?}, SELECT after {second:?}"
    );
}
