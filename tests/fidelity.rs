//! Regression tests for connection-state fidelity: what a client does on its connection must
//! have the effect it would have talking to Redis directly, and nothing more.

mod support;

use support::*;

fn blocked_clients(redis: &RedisServer) -> u64 {
    redis
        .info_field("blocked_clients")
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX)
}

#[test]
fn a_vanished_clients_blocking_command_stops_waiting() {
    let (redis, rf) = setup(&[]);
    let mut consumer = rf.client();
    consumer.send_cmd(&["BLPOP", "jobs", "0"]);
    redis.wait_blocked_clients(1);
    // The consumer goes away (timeout, restart) while blocked.
    drop(consumer);
    eventually("Redis no longer holds the blocked pop", secs(5), || {
        blocked_clients(&redis) == 0
    });
    let mut producer = rf.client();
    assert_frame(
        &producer.cmd(&["RPUSH", "jobs", "job-1"]),
        b":1\r\n",
        "RPUSH",
    );
    assert_frame(
        &producer.cmd(&["LLEN", "jobs"]),
        b":1\r\n",
        "the job is still queued",
    );
}

#[test]
fn select_inside_multi_moves_the_client_and_no_one_else() {
    let (redis, rf) = setup(&[]);
    let mut a = rf.client();
    assert_frame(&a.cmd(&["MULTI"]), b"+OK\r\n", "MULTI");
    assert_frame(&a.cmd(&["SELECT", "1"]), b"+QUEUED\r\n", "SELECT queued");
    assert_frame(&a.cmd(&["EXEC"]), b"*1\r\n+OK\r\n", "EXEC");
    assert_frame(&a.cmd(&["SET", "a_key", "1"]), b"+OK\r\n", "SET after EXEC");
    drop(a);
    // Another client, which never selected, must stay in db 0 even on a reused connection.
    let mut b = rf.client();
    assert_frame(&b.cmd(&["MULTI"]), b"+OK\r\n", "MULTI");
    assert_frame(&b.cmd(&["SET", "b_key", "1"]), b"+QUEUED\r\n", "SET queued");
    assert_frame(&b.cmd(&["EXEC"]), b"*1\r\n+OK\r\n", "EXEC");
    let mut direct = redis.client();
    assert_frame(
        &direct.cmd(&["EXISTS", "b_key"]),
        b":1\r\n",
        "b_key in db 0",
    );
    assert_frame(
        &direct.cmd(&["EXISTS", "a_key"]),
        b":0\r\n",
        "a_key not in db 0",
    );
    direct.cmd(&["SELECT", "1"]);
    assert_frame(
        &direct.cmd(&["EXISTS", "a_key"]),
        b":1\r\n",
        "a_key in db 1",
    );
}

#[test]
fn a_refused_select_leaves_the_client_where_it_was() {
    let (redis, rf) = setup(&[]);
    let mut c = rf.client();
    let err = c.cmd(&["SELECT", "99"]);
    assert!(err.starts_with(b"-ERR"), "{}", esc(&err));
    assert_frame(&c.cmd(&["SET", "sk", "v"]), b"+OK\r\n", "SET");
    assert_frame(
        &redis.cmd(&["GET", "sk"]),
        b"$1\r\nv\r\n",
        "the write landed in db 0",
    );
    assert_frame(
        &c.cmd(&["GET", "sk"]),
        b"$1\r\nv\r\n",
        "and the client reads it there",
    );
}

#[test]
fn a_subscriber_is_disconnected_when_redis_drops_its_connection() {
    let (redis, rf) = setup(&[]);
    let mut sub = rf.client();
    let frame = sub.cmd(&["SUBSCRIBE", "ch"]);
    assert!(
        frame.starts_with(b"*3\r\n$9\r\nsubscribe"),
        "{}",
        esc(&frame)
    );
    let killed = redis.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert_frame(&killed, b":1\r\n", "CLIENT KILL");
    assert!(
        sub.wait_closed(secs(5)),
        "the client must see its connection close, as with Redis"
    );
}

#[test]
fn quit_inside_a_pipe_is_answered_after_everything_before_it() {
    let (_redis, rf) = setup(&[]);
    let mut sub = rf.client();
    sub.cmd(&["SUBSCRIBE", "x"]);
    let mut both = resp_cmd(&["UNSUBSCRIBE", "x"]);
    both.extend_from_slice(&resp_cmd(&["QUIT"]));
    sub.send(&both);
    let unsub = sub.read_frame();
    assert!(
        unsub.starts_with(b"*3\r\n$11\r\nunsubscribe"),
        "{}",
        esc(&unsub)
    );
    assert_frame(&sub.read_frame(), b"+OK\r\n", "QUIT");
    assert!(sub.wait_closed(secs(5)));
}

#[test]
fn a_client_on_another_acl_user_never_sees_cached_replies() {
    let mut redis = RedisServer::start();
    redis.cmd(&["ACL", "SETUSER", "alice", "on", ">pw", "~public:*", "+@all"]);
    redis.cmd(&["SET", "secret:k", "TOPSECRET"]);
    let dir = TempDir::new("fidelity-acl");
    let text = format!(
        "command_timeout_ms = 500\nhealth_probe_interval_ms = 100\n\
         [[upstreams]]\nname = \"main\"\naddr = \"{}\"\nrole = \"primary\"\n\
         [breaker]\nopen_base_ms = 60000\n",
        redis.addr()
    );
    let rf = start_with_config(&dir.write("redfuse.toml", &text));
    let mut owner = rf.client();
    assert_frame(
        &owner.cmd(&["GET", "secret:k"]),
        b"$9\r\nTOPSECRET\r\n",
        "default user reads",
    );
    let mut alice = rf.client();
    assert_frame(
        &alice.cmd(&["AUTH", "alice", "pw"]),
        b"+OK\r\n",
        "AUTH alice",
    );
    let denied = alice.cmd(&["GET", "secret:k"]);
    assert!(denied.starts_with(b"-NOPERM"), "{}", esc(&denied));
    redis.kill();
    eventually("breaker open", secs(5), || {
        metric_value(
            &rf.metrics(),
            "redfuse_breaker_state",
            &[("upstream", "main")],
        ) == Some(2.0)
    });
    // The default user's reply is cached; alice must not be answered with it.
    assert_frame(
        &owner.cmd(&["GET", "secret:k"]),
        b"$9\r\nTOPSECRET\r\n",
        "owner, degraded",
    );
    let degraded = alice.cmd(&["GET", "secret:k"]);
    assert!(
        !String::from_utf8_lossy(&degraded).contains("TOPSECRET"),
        "{}",
        esc(&degraded)
    );
}

#[test]
fn wait_blocks_only_its_own_client() {
    let (redis, rf) = setup(&["--upstream-connections", "1"]);
    let mut a = rf.client();
    assert_frame(&a.cmd(&["SET", "w", "1"]), b"+OK\r\n", "SET");
    // No replica exists: WAIT 1 0 would wait forever.
    a.send_cmd(&["WAIT", "1", "0"]);
    redis.wait_blocked_clients(1);
    let mut b = rf.client();
    assert_frame(
        &b.cmd(&["GET", "w"]),
        b"$1\r\n1\r\n",
        "another client is not held up",
    );
    drop(a);
    eventually("the abandoned WAIT is dropped", secs(5), || {
        blocked_clients(&redis) == 0
    });
    let mut c = rf.client();
    assert_frame(&c.cmd(&["SET", "w", "2"]), b"+OK\r\n", "SET");
    assert_frame(
        &c.cmd(&["WAIT", "0", "100"]),
        b":0\r\n",
        "WAIT with no replicas",
    );
}

#[test]
fn a_client_leaving_without_reading_loses_none_of_its_writes() {
    let (redis, rf) = setup(&[]);
    for i in 0..20 {
        let mut c = rf.client();
        let mut pipeline = resp_cmd(&["SELECT", "2"]);
        pipeline.extend_from_slice(&resp_cmd(&["SET", &format!("k{i}"), "v"]));
        pipeline.extend_from_slice(&resp_cmd(&["MULTI"]));
        pipeline.extend_from_slice(&resp_cmd(&["SET", &format!("m{i}"), "v"]));
        pipeline.extend_from_slice(&resp_cmd(&["EXEC"]));
        c.send(&pipeline);
        drop(c);
    }
    let mut direct = redis.client();
    direct.cmd(&["SELECT", "2"]);
    eventually("all 40 writes landed in db 2", secs(5), || {
        direct.cmd(&["DBSIZE"]) == b":40\r\n"
    });
}

#[test]
fn a_blocked_client_leaving_mid_pipeline_does_not_steal_data() {
    let (redis, rf) = setup(&[]);
    let follow_ups: &[&[&[&str]]] = &[
        &[&["GET", "x"]],
        &[&["SELECT", "1"]],
        &[&["RESET"]],
        &[&["HELLO", "3"]],
        &[&["QUIT"]],
        &[&["MULTI"], &["SELECT", "1"], &["EXEC"]],
        &[&["SUBSCRIBE", "ch"]],
    ];
    for follow_up in follow_ups {
        let mut consumer = rf.client();
        let mut pipeline = resp_cmd(&["BLPOP", "jobs", "0"]);
        for cmd in follow_up.iter() {
            pipeline.extend_from_slice(&resp_cmd(cmd));
        }
        consumer.send(&pipeline);
        redis.wait_blocked_clients(1);
        drop(consumer);
        eventually("the blocked pop is dropped", secs(5), || {
            blocked_clients(&redis) == 0
        });
        let mut producer = rf.client();
        producer.cmd(&["RPUSH", "jobs", "job"]);
        assert_frame(
            &producer.cmd(&["LLEN", "jobs"]),
            b":1\r\n",
            &format!("after {follow_up:?}"),
        );
        producer.cmd(&["DEL", "jobs"]);
    }
}
