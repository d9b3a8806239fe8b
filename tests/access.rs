//! Access control (issue 7): who a client is at redfuse, which upstream identity its commands
//! (and its queued writes) run as, and what it may read while Redis is down.
//!
//! Every test runs against a real redis-server (requirepass or an ACL file). Client
//! authentication at redfuse uses `--requirepass` / `REDFUSE_REQUIREPASS` / `requirepass` and
//! `[[users]]`; refused replays land in `GET /write-queue/dead-letters`.

mod support;

use std::time::{Duration, Instant};

use support::acl::*;
use support::*;

const NOAUTH: &str = "-NOAUTH Authentication required.\r\n";
const WRONGPASS: &str = "-WRONGPASS invalid username-password pair or user is disabled.\r\n";
const HELLO_NOAUTH: &str = "-NOAUTH HELLO must be called with the client already authenticated, \
     otherwise the HELLO AUTH <user> <pass> option can be used to authenticate the \
     client and select the RESP protocol version at the same time\r\n";

fn s(frame: &[u8]) -> String {
    String::from_utf8_lossy(frame).into_owned()
}

fn wait_open(rf: &Redfuse) {
    eventually("breaker of `main` open", secs(5), || {
        breaker_gauge(rf, "main") == OPEN
    });
}

/// Sends `args` every 50 ms until the reply is `+OK` or `timeout` passes; returns the last
/// reply and every distinct reply seen, in order.
fn until_ok(c: &mut RawClient, args: &[&str], timeout: Duration) -> (String, Vec<String>) {
    let deadline = Instant::now() + timeout;
    let mut seen: Vec<String> = Vec::new();
    loop {
        let reply = c.cmd_str(args);
        if !seen.contains(&reply) {
            seen.push(reply.clone());
        }
        if reply == "+OK\r\n" || Instant::now() >= deadline {
            return (reply, seen);
        }
        std::thread::sleep(ms(50));
    }
}

// ---------------------------------------------------------------------------------------
// Client authentication at redfuse's listener
// ---------------------------------------------------------------------------------------

#[test]
fn requirepass_gates_unauthenticated_clients_exactly_like_redis() {
    let redis = RedisServer::start();
    let rf = Redfuse::start(&redis.addr(), &["--requirepass", "clientpw"]);
    // What a Redis that requires the same password answers, for comparison.
    let reference = RedisServer::start_with(&["--requirepass", "clientpw"]);
    let probes: &[&[&str]] = &[
        &["GET", "k"],
        &["SET", "k", "v"],
        &["PING"],
        &["SELECT", "1"],
        &["MULTI"],
        &["BLPOP", "l", "1"],
        &["CLIENT", "SETNAME", "x"],
        &["SUBSCRIBE", "ch"],
        &["AUTH", "wrong"],
        &["AUTH", "nobody", "wrong"],
        // A failed AUTH leaves the client unauthenticated.
        &["GET", "k"],
        &["HELLO", "3"],
        &["HELLO", "3", "AUTH", "default", "wrong"],
        &["GET", "k"],
    ];
    let mut theirs = RawClient::connect(&reference.addr());
    let mut ours = rf.client();
    for p in probes {
        let want = theirs.cmd(p);
        let got = ours.cmd(p);
        assert_eq!(esc(&got), esc(&want), "{p:?}: redfuse vs redis-server");
    }
    assert_eq!(s(&theirs.cmd(&["GET", "k"])), NOAUTH);
    assert_eq!(s(&theirs.cmd(&["AUTH", "wrong"])), WRONGPASS);
    assert_eq!(s(&theirs.cmd(&["HELLO", "3"])), HELLO_NOAUTH);
    assert_eq!(
        redis.cmd(&["EXISTS", "k"]),
        b":0\r\n",
        "an unauthenticated SET reached Redis"
    );

    assert_eq!(s(&ours.cmd(&["AUTH", "clientpw"])), "+OK\r\n");
    assert_eq!(s(&ours.cmd(&["SET", "k", "v"])), "+OK\r\n");
    assert_eq!(s(&ours.cmd(&["GET", "k"])), "$1\r\nv\r\n");
    assert_eq!(redis.cmd(&["GET", "k"]), b"$1\r\nv\r\n");

    let mut h = rf.client();
    let hello = h.cmd(&["HELLO", "3", "AUTH", "default", "clientpw"]);
    assert!(hello.starts_with(b"%"), "HELLO 3 AUTH: {}", esc(&hello));
    assert_eq!(s(&h.cmd(&["GET", "k"])), "$1\r\nv\r\n");

    let mut q = rf.client();
    assert_eq!(s(&q.cmd(&["QUIT"])), "+OK\r\n");
}

#[test]
fn requirepass_from_the_environment_gates_clients() {
    let redis = RedisServer::start();
    redis.cmd(&["SET", "k", "v"]);
    let rf = Redfuse::start_with_env(&redis.addr(), &[], &[("REDFUSE_REQUIREPASS", "envpw")]);
    let mut c = rf.client();
    assert_eq!(
        s(&c.cmd(&["GET", "k"])),
        NOAUTH,
        "REDFUSE_REQUIREPASS is set: an unauthenticated GET must be refused"
    );
    assert_eq!(s(&c.cmd(&["AUTH", "nope"])), WRONGPASS);
    assert_eq!(s(&c.cmd(&["AUTH", "envpw"])), "+OK\r\n");
    assert_eq!(s(&c.cmd(&["GET", "k"])), "$1\r\nv\r\n");
}

#[test]
fn requirepass_from_the_config_file_gates_clients() {
    let redis = RedisServer::start();
    redis.cmd(&["SET", "k", "v"]);
    let dir = TempDir::new("access");
    let rf = start_rf(
        &dir,
        &rf_config(&redis.addr(), "requirepass = \"filepw\"", ""),
    );
    let mut c = rf.client();
    assert_eq!(s(&c.cmd(&["GET", "k"])), NOAUTH);
    assert_eq!(s(&c.cmd(&["AUTH", "default", "filepw"])), "+OK\r\n");
    assert_eq!(s(&c.cmd(&["GET", "k"])), "$1\r\nv\r\n");
}

#[test]
fn config_users_authenticate_and_run_as_their_upstream_identity() {
    let redis = AclRedis::start("adminpw", &["user ro on >ropw ~* +@read +@connection"], &[]);
    // sha256("opspw")
    let users = r#"
[[users]]
name = "web"
password = "webpw"
upstream_username = "ro"
upstream_password = "ropw"

[[users]]
name = "ops"
password_sha256 = "03dec7bdea4ddc55b6dee093329746fe614a95b555054997c213100b238f6958"

[[users]]
name = "old"
password = "oldpw"
enabled = false
"#;
    let dir = TempDir::new("access");
    let rf = start_rf(
        &dir,
        &rf_config(&redis.addr(), "password = \"adminpw\"", users),
    );

    let mut anon = rf.client();
    assert_eq!(s(&anon.cmd(&["GET", "acl:k"])), NOAUTH);
    assert_eq!(s(&anon.cmd(&["AUTH", "web", "wrong"])), WRONGPASS);
    assert_eq!(s(&anon.cmd(&["AUTH", "old", "oldpw"])), WRONGPASS);
    assert_eq!(s(&anon.cmd(&["GET", "acl:k"])), NOAUTH);

    // ops: sha256 password, runs as redfuse's own upstream identity (default/adminpw).
    let mut ops = rf.client();
    assert_eq!(s(&ops.cmd(&["AUTH", "ops", "opspw"])), "+OK\r\n");
    assert_eq!(s(&ops.cmd(&["SET", "acl:k", "v"])), "+OK\r\n");
    assert_eq!(redis.cmd(&["GET", "acl:k"]), b"$1\r\nv\r\n");

    // web: runs as Redis user `ro`, which may read but not write.
    let mut web = rf.client();
    assert_eq!(s(&web.cmd(&["AUTH", "web", "webpw"])), "+OK\r\n");
    assert_eq!(s(&web.cmd(&["GET", "acl:k"])), "$1\r\nv\r\n");
    let denied = s(&web.cmd(&["SET", "acl:k", "w"]));
    assert!(
        denied.starts_with("-NOPERM"),
        "user web must run as Redis user ro: {denied}"
    );
    assert_eq!(redis.cmd(&["GET", "acl:k"]), b"$1\r\nv\r\n");

    let mut web3 = rf.client();
    let hello = web3.cmd(&["HELLO", "3", "AUTH", "web", "webpw"]);
    assert!(hello.starts_with(b"%"), "HELLO 3 AUTH web: {}", esc(&hello));
    assert_eq!(s(&web3.cmd(&["GET", "acl:k"])), "$1\r\nv\r\n");
    assert!(s(&web3.cmd(&["DEL", "acl:k"])).starts_with("-NOPERM"));
}

#[test]
fn open_listener_with_upstream_credentials_and_no_client_auth_refuses_to_start() {
    let redis = RedisServer::start_with(&["--requirepass", "pw"]);
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "--listen",
            "0.0.0.0:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--upstream",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.push(redis.addr());
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    // Control: without upstream credentials an open listener gives nothing away.
    let plain = Redfuse::spawn_args(&args(&[]), &[]);
    assert!(plain.is_ok(), "{:?}", plain.err());
    drop(plain);

    for (what, extra, env) in [
        ("--password", vec!["--password", "pw"], vec![]),
        ("REDFUSE_PASSWORD", vec![], vec![("REDFUSE_PASSWORD", "pw")]),
    ] {
        match Redfuse::spawn_args(&args(&extra), &env) {
            Ok(mut rf) => {
                let mut c = RawClient::connect(&rf.addr());
                let served = c.cmd_str(&["PING"]);
                rf.signal("KILL");
                let _ = rf.wait_exit(secs(5));
                panic!(
                    "redfuse with {what} and no client auth started on 0.0.0.0 (an \
                     unauthenticated client got {served:?}); it must refuse with exit code 2"
                );
            }
            Err(msg) => {
                assert!(msg.contains("exit status: 2"), "{what}: {msg}");
                assert!(msg.contains("--requirepass"), "{what}: {msg}");
                assert!(
                    msg.contains("--allow-unauthenticated-clients"),
                    "{what}: {msg}"
                );
            }
        }
    }
}

#[test]
fn open_listener_starts_with_client_auth_or_an_explicit_opt_out() {
    let redis = RedisServer::start_with(&["--requirepass", "pw"]);
    redis.cmd(&["SET", "k", "v"]);
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "--listen",
            "0.0.0.0:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--password",
            "pw",
            "--upstream",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.push(redis.addr());
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let rf = Redfuse::spawn_args(&args(&["--allow-unauthenticated-clients"]), &[])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        rf.wait_for_log("WARN", secs(2)),
        "an explicit opt-out must be logged as a warning:\n{}",
        rf.logs_text()
    );
    assert_eq!(s(&rf.client().cmd(&["GET", "k"])), "$1\r\nv\r\n");
    drop(rf);

    let rf = Redfuse::spawn_args(&args(&["--requirepass", "clientpw"]), &[])
        .unwrap_or_else(|e| panic!("{e}"));
    let mut c = rf.client();
    assert_eq!(s(&c.cmd(&["GET", "k"])), NOAUTH);
    assert_eq!(s(&c.cmd(&["AUTH", "clientpw"])), "+OK\r\n");
    assert_eq!(s(&c.cmd(&["GET", "k"])), "$1\r\nv\r\n");
}

// ---------------------------------------------------------------------------------------
// Sidecar mode: a failed AUTH
// ---------------------------------------------------------------------------------------

#[test]
fn failed_auth_in_sidecar_mode_drops_redfuses_identity() {
    let redis = RedisServer::start_with(&["--requirepass", "pw"]);
    redis.cmd(&["SET", "k", "v"]);
    let rf = Redfuse::start(&redis.addr(), &["--password", "pw"]);

    let mut c = rf.client();
    assert_eq!(
        s(&c.cmd(&["GET", "k"])),
        "$1\r\nv\r\n",
        "sidecar: served as redfuse"
    );
    assert_eq!(s(&c.cmd(&["AUTH", "alice", "wrong"])), WRONGPASS);
    let after = s(&c.cmd(&["GET", "k"]));
    assert!(
        after.starts_with("-NOAUTH"),
        "after a failed AUTH the client must not keep redfuse's rights; GET got {after:?}"
    );
    let set = s(&c.cmd(&["SET", "written", "1"]));
    assert!(set.starts_with("-NOAUTH"), "SET after failed AUTH: {set:?}");
    assert_eq!(redis.cmd(&["EXISTS", "written"]), b":0\r\n");
    // A successful AUTH restores access.
    assert_eq!(s(&c.cmd(&["AUTH", "pw"])), "+OK\r\n");
    assert_eq!(s(&c.cmd(&["GET", "k"])), "$1\r\nv\r\n");

    let mut h = rf.client();
    assert_eq!(
        s(&h.cmd(&["HELLO", "3", "AUTH", "alice", "wrong"])),
        WRONGPASS
    );
    let after = s(&h.cmd(&["GET", "k"]));
    assert!(
        after.starts_with("-NOAUTH"),
        "after a failed HELLO AUTH: {after:?}"
    );
}

// ---------------------------------------------------------------------------------------
// AUTH and reads while Redis is down
// ---------------------------------------------------------------------------------------

fn outage_config(upstream: &str, top: &str, tables: &str) -> String {
    rf_config(
        upstream,
        &format!("command_timeout_ms = 1000\n{top}"),
        &format!("{FAST_RECOVERY}{tables}"),
    )
}

#[test]
fn auth_during_an_outage_accepts_known_credentials_and_refuses_unknown_ones() {
    let mut redis = RedisServer::start_with(&["--requirepass", "pw"]);
    let dir = TempDir::new("access");
    let rf = start_rf(&dir, &outage_config(&redis.addr(), "", ""));
    let mut first = rf.client();
    assert_eq!(s(&first.cmd(&["AUTH", "pw"])), "+OK\r\n");
    assert_eq!(s(&first.cmd(&["SET", "k", "v"])), "+OK\r\n");
    assert_eq!(s(&first.cmd(&["GET", "k"])), "$1\r\nv\r\n");

    redis.kill();
    wait_open(&rf);
    // The same credentials Redis accepted, in every spelling: AUTH pw, AUTH default pw,
    // HELLO 3 AUTH default pw.
    let mut a = rf.client();
    assert_eq!(
        s(&a.cmd(&["AUTH", "pw"])),
        "+OK\r\n",
        "AUTH pw during outage"
    );
    let mut b = rf.client();
    assert_eq!(
        s(&b.cmd(&["AUTH", "default", "pw"])),
        "+OK\r\n",
        "AUTH default pw during outage"
    );
    let mut h = rf.client();
    let hello = h.cmd(&["HELLO", "3", "AUTH", "default", "pw"]);
    assert!(
        hello.starts_with(b"%"),
        "HELLO 3 AUTH default pw during outage: {}",
        esc(&hello)
    );

    // A password Redis never accepted is refused (redfuse cannot tell a wrong password from
    // a right one it never saw while Redis is down, so it says Redis is unavailable rather
    // than call it wrong), never accepted, and gives no access.
    let mut m = rf.client();
    let wrong = s(&m.cmd(&["AUTH", "guess"]));
    assert!(
        wrong.starts_with("-WRONGPASS")
            || wrong.starts_with("-ERR redfuse: upstream 'main' unavailable"),
        "unknown password during outage: {wrong:?}"
    );
    let read = m.cmd(&["GET", "k"]);
    assert!(
        read.starts_with(b"-NOAUTH"),
        "after a refused AUTH: {}",
        esc(&read)
    );
    let wrong = s(&a.cmd(&["AUTH", "default", "guess"]));
    assert!(
        wrong.starts_with("-WRONGPASS")
            || wrong.starts_with("-ERR redfuse: upstream 'main' unavailable"),
        "unknown password during outage: {wrong:?}"
    );
}

#[test]
fn self_authenticating_clients_get_their_cached_reads_during_an_outage() {
    let mut redis = AclRedis::start("pw", &["user bob on >bobpw ~* +@all"], &[]);
    let dir = TempDir::new("access");
    // redfuse holds no credentials: the application authenticates itself.
    let rf = start_rf(&dir, &outage_config(&redis.addr(), "", ""));
    let mut app = rf.client();
    assert_eq!(s(&app.cmd(&["AUTH", "pw"])), "+OK\r\n");
    assert_eq!(s(&app.cmd(&["SET", "k", "v"])), "+OK\r\n");
    assert_eq!(s(&app.cmd(&["GET", "k"])), "$1\r\nv\r\n");
    let mut bob = rf.client();
    assert_eq!(s(&bob.cmd(&["AUTH", "bob", "bobpw"])), "+OK\r\n");
    assert_eq!(s(&bob.cmd(&["SET", "bk", "bv"])), "+OK\r\n");
    assert_eq!(s(&bob.cmd(&["GET", "bk"])), "$2\r\nbv\r\n");
    let mut anon = rf.client();

    redis.kill();
    wait_open(&rf);
    let got = app.cmd(&["GET", "k"]);
    assert_eq!(
        esc(&got),
        esc(b"$1\r\nv\r\n"),
        "the client that read k gets the cached value"
    );
    let mut app2 = rf.client();
    assert_eq!(s(&app2.cmd(&["AUTH", "pw"])), "+OK\r\n");
    assert_eq!(
        esc(&app2.cmd(&["GET", "k"])),
        esc(b"$1\r\nv\r\n"),
        "another client on the same credentials gets the cached value"
    );
    assert_eq!(
        esc(&bob.cmd(&["GET", "bk"])),
        esc(b"$2\r\nbv\r\n"),
        "bob gets what bob read"
    );
    let cross = bob.cmd(&["GET", "k"]);
    assert!(
        cross != b"$1\r\nv\r\n",
        "bob was served what another identity's read cached"
    );
    for key in ["k", "bk"] {
        let r = anon.cmd(&["GET", key]);
        assert!(
            r.starts_with(b"-NOAUTH"),
            "a client that never authenticated against a Redis that requires it: GET {key} -> {}",
            esc(&r)
        );
    }
}

// ---------------------------------------------------------------------------------------
// Queued writes and identities
// ---------------------------------------------------------------------------------------

const ALICE: &str = "user alice on >alicepw ~alice:* ~counter:alice:* +@all";

#[test]
fn queued_writes_replay_with_the_rights_of_the_client_that_queued_them() {
    let mut redis = AclRedis::start("adminpw", &[ALICE], &[]);
    let dir = TempDir::new("access");
    let rf = start_rf(
        &dir,
        &outage_config(&redis.addr(), "password = \"adminpw\"", COUNTERS_RULE),
    );
    let mut alice = rf.client();
    assert_eq!(s(&alice.cmd(&["AUTH", "alice", "alicepw"])), "+OK\r\n");
    assert_eq!(s(&alice.cmd(&["SET", "alice:k", "1"])), "+OK\r\n");
    let denied = s(&alice.cmd(&["INCR", "counter:bob:x"]));
    assert!(
        denied.starts_with("-NOPERM"),
        "Redis refuses alice this key: {denied}"
    );

    redis.kill();
    wait_open(&rf);
    let mut replies = Vec::new();
    for _ in 0..4 {
        replies.push(s(&alice.cmd(&["INCR", "counter:bob:x"])));
    }
    for _ in 0..2 {
        replies.push(s(&alice.cmd(&["INCR", "counter:alice:x"])));
    }
    eprintln!("alice's INCRs during the outage: {replies:?}");

    redis.restart();
    // Replay is in order: once alice's own counter is there, bob's entries were handled.
    eventually("alice's queued INCRs replayed", secs(10), || {
        redis.cmd(&["GET", "counter:alice:x"]) == b"$1\r\n2\r\n"
    });
    let bob = redis.cmd(&["GET", "counter:bob:x"]);
    assert_eq!(
        esc(&bob),
        esc(b"$-1\r\n"),
        "alice's queued INCRs on a key her ACL forbids were replayed with redfuse's rights"
    );
}

#[test]
fn a_queued_write_does_not_change_what_another_identity_reads() {
    let mut redis = AclRedis::start("adminpw", &[ALICE], &[]);
    let dir = TempDir::new("access");
    let rules = format!(
        "{COUNTERS_RULE}\n[[fail_open.rules]]\nname = \"shared-writes\"\ncommands = [\"SET\"]\n\
         keys = [\"shared:*\"]\naction = \"queue\"\nreply = \"+OK\"\n"
    );
    let rf = start_rf(
        &dir,
        &outage_config(&redis.addr(), "password = \"adminpw\"", &rules),
    );
    // The sidecar client runs as redfuse's identity and fills the cache.
    let mut app = rf.client();
    assert_eq!(s(&app.cmd(&["SET", "counter:bob:x", "10"])), "+OK\r\n");
    assert_eq!(s(&app.cmd(&["GET", "counter:bob:x"])), "$2\r\n10\r\n");
    assert_eq!(s(&app.cmd(&["SET", "shared:k", "good"])), "+OK\r\n");
    assert_eq!(s(&app.cmd(&["GET", "shared:k"])), "$4\r\ngood\r\n");
    let mut alice = rf.client();
    assert_eq!(s(&alice.cmd(&["AUTH", "alice", "alicepw"])), "+OK\r\n");

    redis.kill();
    wait_open(&rf);
    let incr = s(&alice.cmd(&["INCR", "counter:bob:x"]));
    let set = s(&alice.cmd(&["SET", "shared:k", "evil"]));
    eprintln!("alice during the outage: INCR -> {incr:?}, SET -> {set:?}");
    let counter = s(&app.cmd(&["GET", "counter:bob:x"]));
    let shared = s(&app.cmd(&["GET", "shared:k"]));
    assert!(
        counter == "$2\r\n10\r\n" && shared == "$4\r\ngood\r\n",
        "alice's queued writes changed what redfuse's own identity reads: \
         GET counter:bob:x -> {counter:?} (was 10), GET shared:k -> {shared:?} (was good)"
    );
}

#[test]
fn a_replay_redis_refuses_does_not_stop_newer_writes() {
    let mut redis = RedisServer::start_with(&["--requirepass", "pw"]);
    let dir = TempDir::new("access");
    let rf = start_rf(&dir, &outage_config(&redis.addr(), "", COUNTERS_RULE));
    let mut c = rf.client();
    assert_eq!(s(&c.cmd(&["AUTH", "pw"])), "+OK\r\n");
    assert_eq!(s(&c.cmd(&["SET", "before", "1"])), "+OK\r\n");
    redis.kill();
    wait_open(&rf);
    assert_eq!(s(&c.cmd(&["INCR", "counter:c"])), ":0\r\n");
    redis.restart();
    let started = Instant::now();
    let (last, seen) = until_ok(&mut c, &["SET", "after", "1"], secs(10));
    assert_eq!(
        last,
        "+OK\r\n",
        "newer writes still refused {:?} after Redis came back; replies seen: {seen:?}",
        started.elapsed()
    );
    eprintln!("writes flow again after {:?}", started.elapsed());
    // The queued INCR was applied (as the client that queued it) or dead-lettered; never lost.
    let counter = redis.cmd(&["GET", "counter:c"]);
    if counter != b"$1\r\n1\r\n" {
        let dead = admin_json(&rf, "/write-queue/dead-letters");
        assert!(
            dead.to_string().contains("counter:c"),
            "INCR counter:c neither applied ({}) nor dead-lettered: {dead}",
            esc(&counter)
        );
    }
}

#[test]
fn refused_replays_go_to_a_drainable_dead_letter_list() {
    let mut redis = RedisServer::start_with(&["--requirepass", "pw"]);
    let port = redis.port();
    let dir = TempDir::new("access");
    let rf = start_rf(
        &dir,
        &outage_config(&redis.addr(), "admin_token = \"tok\"", COUNTERS_RULE),
    );
    let mut c = rf.client();
    assert_eq!(s(&c.cmd(&["AUTH", "pw"])), "+OK\r\n");
    assert_eq!(s(&c.cmd(&["PING"])), "+PONG\r\n");
    redis.kill();
    wait_open(&rf);
    assert_eq!(s(&c.cmd(&["INCR", "counter:d"])), ":0\r\n");
    // Redis comes back with another password: the queued write can never be replayed as the
    // client that queued it.
    let redis2 = RedisServer::start_on(port, &["--requirepass", "pw2"]);
    let mut c2 = rf.client();
    assert_eq!(s(&c2.cmd(&["AUTH", "pw2"])), "+OK\r\n");
    let started = Instant::now();
    let (last, seen) = until_ok(&mut c2, &["SET", "after", "1"], secs(10));
    assert_eq!(
        last,
        "+OK\r\n",
        "newer writes still refused {:?} after Redis came back; replies seen: {seen:?}",
        started.elapsed()
    );
    assert_eq!(redis2.cmd(&["EXISTS", "counter:d"]), b":0\r\n");

    let dead = admin_json(&rf, "/write-queue/dead-letters");
    let items = dead
        .as_array()
        .unwrap_or_else(|| panic!("dead letters are a JSON array: {dead}"));
    assert_eq!(items.len(), 1, "{dead}");
    let item = &items[0];
    for field in ["seq", "reason", "command"] {
        assert!(
            item.get(field).is_some(),
            "dead letter lacks `{field}`: {item}"
        );
    }
    assert!(item["command"].to_string().contains("counter:d"), "{item}");
    let gauge = |rf: &Redfuse| metric_value(&rf.metrics(), "redfuse_write_queue_dead_letters", &[]);
    assert_eq!(gauge(&rf), Some(1.0));

    let (status, _) = http_post(&rf.admin_addr(), "/write-queue/dead-letters/drain", None);
    assert!(
        status == 401 || status == 403,
        "drain without the token: {status}"
    );
    assert_eq!(
        admin_json(&rf, "/write-queue/dead-letters")
            .as_array()
            .map(|a| a.len()),
        Some(1)
    );
    let (status, body) = http_post(
        &rf.admin_addr(),
        "/write-queue/dead-letters/drain",
        Some("tok"),
    );
    assert!((200..300).contains(&status), "drain: {status} {body}");
    assert_eq!(
        admin_json(&rf, "/write-queue/dead-letters")
            .as_array()
            .map(|a| a.len()),
        Some(0)
    );
    assert_eq!(gauge(&rf), Some(0.0));
}

#[test]
fn wrong_upstream_credentials_mark_the_upstream_misconfigured_not_open() {
    // The default user of a Redis without a password accepts any password: redfuse's
    // `wrong` works until Redis comes back requiring a real one.
    let mut redis = RedisServer::start();
    let port = redis.port();
    redis.cmd(&["SET", "k", "v"]);
    let dir = TempDir::new("access");
    let rf = start_rf(
        &dir,
        &outage_config(&redis.addr(), "password = \"wrong\"", ""),
    );
    assert_eq!(s(&rf.client().cmd(&["GET", "k"])), "$1\r\nv\r\n");
    redis.kill();
    wait_open(&rf);
    let _redis2 = RedisServer::start_on(port, &["--requirepass", "pw"]);

    let state = |rf: &Redfuse| -> String {
        admin_json(rf, "/breakers")["main"]["state"]
            .as_str()
            .unwrap_or("?")
            .to_string()
    };
    let mut seen = Vec::new();
    let closed = wait_until(secs(5), || {
        let st = state(&rf);
        if seen.last() != Some(&st) {
            seen.push(st.clone());
        }
        st == "closed"
    });
    assert!(
        closed,
        "Redis is up but rejects redfuse's credentials: the breaker must close, not cycle; \
         states seen: {seen:?}"
    );
    let started = Instant::now();
    while started.elapsed() < ms(1500) {
        let st = state(&rf);
        assert_eq!(st, "closed", "the breaker left closed again");
        std::thread::sleep(ms(50));
    }
    let ready = admin_json(&rf, "/ready");
    let main = ready["upstreams"]
        .as_array()
        .and_then(|a| a.iter().find(|u| u["name"] == "main"))
        .unwrap_or_else(|| panic!("no upstream `main` in /ready: {ready}"));
    assert!(
        main.get("misconfigured").is_some_and(|m| !m.is_null()),
        "/ready must say why `main` cannot be used: {main}"
    );
    assert_eq!(
        metric_value(
            &rf.metrics(),
            "redfuse_upstream_misconfigured",
            &[("upstream", "main")]
        ),
        Some(1.0)
    );
}
