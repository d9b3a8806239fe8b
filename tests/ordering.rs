//! Ordering a client can observe across connections, and a server kept busy by a script.
//!
//! A blocking command needs a connection of its own; if getting one took a connect and a
//! handshake, another client's command sent right after could reach Redis first. These
//! tests send the blocking command and the other client's command back to back, as Redis's
//! own test suite does, and require Redis's outcome every time.

mod support;

use std::time::{Duration, Instant};

use support::*;

/// Client A sends `BLPOP k 0`, client B then immediately sends `LPUSH k v`: A gets the
/// value, every time, as it does talking to Redis directly. Each A is a new client, as in
/// Redis's own test suite, so each needs a connection of its own upstream.
#[test]
fn a_blocking_pop_sent_before_a_push_always_gets_it() {
    let (_redis, rf) = setup(&[]);
    // The race is won by a dedicated connection opened ahead of need (see
    // `upstream::dedicated`); right after start-up they are still being opened, and a first
    // BLPOP that has to connect could lose it. Start once redfuse says one is warm.
    eventually("a warm dedicated connection", secs(10), || {
        let (_, ready) = http::http_get(&rf.admin_addr(), "/ready");
        !ready.contains("\"warm_dedicated_connections\":0")
            && ready.contains("\"warm_dedicated_connections\":")
    });
    let mut pusher = answered_client(&rf);
    let mut hangs = Vec::new();
    for i in 0..1000 {
        let mut a = rf.client();
        // Connected and answered: the session exists before the race starts.
        assert_eq!(a.cmd(&["PING"]), b"+PONG\r\n");
        if let Some(del) = pop_then_push(&mut a, &mut pusher, &format!("order:{i}"), i) {
            hangs.push((i, del));
        }
    }
    assert!(
        hangs.is_empty(),
        "the push overtook the blocking pop in {} of 1000 trials (trial, DEL reply): {:?}",
        hangs.len(),
        &hangs[..hangs.len().min(20)]
    );
}

/// As above, but the pop's client is one more than the warm dedicated connections: its
/// connection is opened when the pop arrives (a connect and a handshake), and the push,
/// ready to go on a shared connection, must still wait behind it.
#[test]
fn a_blocking_pop_that_must_open_its_connection_still_beats_the_push() {
    let (_redis, rf) = setup(&[]);
    let hangs = pop_then_push_past_the_warm_set(&rf, 50);
    assert!(
        hangs.is_empty(),
        "the push overtook the blocking pop in {} of 50 trials (trial, DEL reply): {:?}",
        hangs.len(),
        &hangs[..hangs.len().min(20)]
    );
}

/// Runs `trials` rounds of: four clients block on keys nobody pushes to (taking the warm
/// dedicated connections and those the refill opens for them), one more sends `BLPOP`, and
/// another client at once pushes to its key and deletes it. Returns the trials where the
/// push overtook the pop, with the `DEL` reply that tells.
fn pop_then_push_past_the_warm_set(rf: &Redfuse, trials: usize) -> Vec<(usize, String)> {
    let mut pusher = answered_client(rf);
    let mut hangs = Vec::new();
    for i in 0..trials {
        let mut blockers = Vec::new();
        for _ in 0..4 {
            let mut b = rf.client();
            assert_eq!(b.cmd(&["PING"]), b"+PONG\r\n");
            blockers.push(b);
        }
        let mut a = rf.client();
        assert_eq!(a.cmd(&["PING"]), b"+PONG\r\n");
        for (j, b) in blockers.iter_mut().enumerate() {
            b.send_cmd(&["BLPOP", &format!("idle:{i}:{j}"), "0"]);
        }
        if let Some(del) = pop_then_push(&mut a, &mut pusher, &format!("open:{i}"), i) {
            hangs.push((i, del));
        }
    }
    hangs
}

/// `a` sends `BLPOP key 0`, then `pusher` pushes to `key` and deletes it in one write.
/// `None` when the pop got the value (its reply checked); else the `DEL` reply that shows
/// the push overtook the pop. The DEL's reply tells the order, however slow the machine:
/// Redis hands a pushed value to a pop already waiting before it runs the next command, so
/// the DEL finds nothing left (as with Redis directly) unless the push overtook the pop,
/// which then waits forever.
fn pop_then_push(a: &mut RawClient, pusher: &mut RawClient, key: &str, i: usize) -> Option<String> {
    a.send_cmd(&["BLPOP", key, "0"]);
    let mut both = resp_cmd(&["LPUSH", key, "v"]);
    both.extend(resp_cmd(&["DEL", key]));
    pusher.send(&both);
    assert_eq!(pusher.read_frame(), b":1\r\n", "trial {i}: LPUSH reply");
    let del = pusher.read_frame();
    if del != b":0\r\n" {
        return Some(String::from_utf8_lossy(&del).into_owned());
    }
    match a.try_read_frame(Duration::from_secs(30)) {
        Ok(reply) => {
            let want = resp_cmd(&[key, "v"]);
            assert_frame(&reply, &want, &format!("trial {i}: BLPOP reply"));
        }
        Err(e) => panic!("trial {i}: the pop got the value but no reply came: {e:?}"),
    }
    None
}

/// A client redfuse has already answered once. The client that pushes (or deletes) is a
/// long-lived one, as an application's producer is: its session is set up before the
/// trials. With a fresh one, trial 0 failed in about 3 of 30 runs of this file (under the
/// load of its other tests starting), 0 of 16 with the client answered first: redfuse's
/// log showed the push read from its socket before the pop, although the pop was written
/// first. Why a session's first read can come first is not established (see the note on
/// issue 9); redfuse can only order what it has read.
fn answered_client(rf: &Redfuse) -> RawClient {
    let mut c = rf.client();
    assert_eq!(c.cmd(&["PING"]), b"+PONG\r\n");
    c
}

/// `XREADGROUP ... BLOCK` then `DEL` of the stream from another connection: Redis wakes the
/// reader with "the stream key no longer exists"; if the DEL overtook the read, the reader
/// would get `NOGROUP` instead.
#[test]
fn a_blocked_group_read_sees_its_stream_deleted() {
    let (redis, rf) = setup(&[]);
    let mut deleter = answered_client(&rf);
    for i in 0..200 {
        let stream = format!("stream:{i}");
        redis.cmd(&["XGROUP", "CREATE", &stream, "g", "$", "MKSTREAM"]);
        let mut reader = rf.client();
        assert_eq!(reader.cmd(&["PING"]), b"+PONG\r\n");
        reader.send_cmd(&[
            "XREADGROUP",
            "GROUP",
            "g",
            "c",
            "BLOCK",
            "0",
            "STREAMS",
            &stream,
            ">",
        ]);
        deleter.send_cmd(&["DEL", &stream]);
        let got = reader
            .try_read_frame(Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("trial {i}: XREADGROUP never woke up: {e:?}"));
        assert_frame(
            &got,
            b"-UNBLOCKED the stream key no longer exists\r\n",
            &format!("trial {i}"),
        );
        assert_eq!(deleter.read_frame(), b":1\r\n");
    }
}

/// A Lua loop that runs until killed (or 20 s): Redis answers `-BUSY` to everyone else after
/// `busy-reply-threshold`.
const BUSY_SCRIPT: &str = "local t = redis.call('TIME') local s = tonumber(t[1]) \
     while true do local n = redis.call('TIME') if tonumber(n[1]) - s > 20 then break end end \
     return 1";

fn busy_redis() -> RedisServer {
    RedisServer::start_with(&["--busy-reply-threshold", "100"])
}

/// Waits until Redis reports a script running (answers `-BUSY`).
fn wait_busy(redis: &RedisServer) {
    eventually("redis busy with the script", secs(5), || {
        let mut c = RawClient::connect(&redis.addr());
        c.cmd(&["PING"]).starts_with(b"-BUSY")
    });
}

/// While a script keeps Redis busy, the breaker opens (`-BUSY` is a failure), but `SCRIPT
/// KILL` still reaches Redis, the script's own client gets Redis's answer rather than a
/// redfuse timeout, and the breaker heals as soon as Redis answers again.
#[test]
fn script_kill_reaches_a_busy_redis_and_the_breaker_heals_at_once() {
    let redis = busy_redis();
    // A command timeout far shorter than the script, and a long open period: healing must
    // not wait for it.
    let dir = TempDir::new("ordering");
    let config = dir.write(
        "redfuse.toml",
        &format!(
            "upstream = \"{}\"\ncommand_timeout_ms = 1000\n[breaker]\nopen_base_ms = 30000\nopen_max_ms = 60000\nhalf_open_max_wait_ms = 1000\n",
            redis.addr()
        ),
    );
    let rf = start_with_config(&config);
    let mut setter = rf.client();
    assert_eq!(setter.cmd(&["SET", "k", "before"]), b"+OK\r\n");

    let mut script = rf.client();
    script.send_cmd(&["EVAL", BUSY_SCRIPT, "0"]);
    wait_busy(&redis);
    // Bystanders meet -BUSY (or degraded answers once the breaker is open).
    let mut bystander = rf.client();
    eventually("breaker open on -BUSY", secs(5), || {
        bystander.cmd(&["GET", "k"]);
        http_get(&rf.admin_addr(), "/breakers")
            .1
            .contains("\"state\":\"open\"")
    });
    // The script's client is still waiting on Redis, past its command timeout.
    std::thread::sleep(ms(1500));
    let mut killer = rf.client();
    let killed = killer.cmd_str(&["SCRIPT", "KILL"]);
    assert_eq!(killed, "+OK\r\n", "SCRIPT KILL through an open breaker");
    let answer = script
        .try_read_frame(secs(5))
        .expect("the script's client gets an answer");
    let answer = String::from_utf8_lossy(&answer).into_owned();
    assert!(
        answer.starts_with("-ERR") && answer.contains("killed") && !answer.contains("redfuse"),
        "the script's client must get Redis's answer, not a redfuse timeout: {answer:?}"
    );
    // Healed as soon as Redis answers: far sooner than the 30 s open period.
    let started = Instant::now();
    eventually("writes reach Redis again", secs(5), || {
        setter.cmd(&["SET", "k", "after"]) == b"+OK\r\n"
    });
    assert_eq!(redis.cmd(&["GET", "k"]), b"$5\r\nafter\r\n");
    eprintln!("healed {:?} after the kill", started.elapsed());
}

/// `SHUTDOWN NOSAVE` from a client reaches a Redis busy with a script, as it would directly.
#[test]
fn shutdown_nosave_reaches_a_busy_redis() {
    let mut redis = busy_redis();
    let rf = Redfuse::start(&redis.addr(), &["--command-timeout-ms", "1000"]);
    let mut script = rf.client();
    script.send_cmd(&["EVAL", BUSY_SCRIPT, "0"]);
    wait_busy(&redis);
    let mut admin = rf.client();
    admin.send_cmd(&["SHUTDOWN", "NOSAVE"]);
    eventually("redis-server exited", secs(5), || !redis.is_running());
}
