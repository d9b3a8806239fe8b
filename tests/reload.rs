//! Hot reload (issue 11): a change of the configuration file or SIGHUP applies fail-open
//! rules, breaker thresholds and the upstream list to a running redfuse under client load,
//! without losing a client connection or a command; an invalid file is rejected, naming the
//! field, and the running configuration stays.

mod support;

use std::path::Path;
use std::time::Duration;

use support::{
    Load, RawClient, Redfuse, RedisServer, TempDir, http_get, http_post, metric_value, secs,
};

/// Replaces the file in one step, so the poller never reads half of it.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn reloads(rf: &Redfuse, result: &str) -> f64 {
    metric_value(
        &rf.metrics(),
        "redfuse_config_reload_total",
        &[("result", result)],
    )
    .unwrap_or(0.0)
}

async fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let until = std::time::Instant::now() + timeout;
    while !f() {
        assert!(
            std::time::Instant::now() < until,
            "timed out after {timeout:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn config(addr: &str, incr_reply: &str, extra: &str) -> String {
    format!(
        "admin_token = \"tok\"\nupstream_drain_timeout_ms = 1000\nhealth_probe_interval_ms = 200\n{extra}\n\
         [[upstreams]]\nname = \"main\"\naddr = \"{addr}\"\n\
         [[fail_open.rules]]\nname = \"counters\"\ncommands = [\"INCR\"]\naction = \"reply\"\nreply = \"{incr_reply}\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_lose_no_connection_and_no_command() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    let dir = TempDir::new("reload");
    let path = dir.write("redfuse.toml", &config(&a.addr(), ":1", ""));
    let rf = support::start_with_config(&path);
    let load = Load::start_lenient(&rf.addr(), 4, "reload").await;
    load.progress(200, secs(10)).await;

    // An invalid file: rejected, the field named, the old configuration kept.
    write_atomically(
        &path,
        &config(&b.addr(), ":7", "[breaker]\nconsecutive_failures = 0"),
    );
    eventually("the invalid file is rejected", secs(10), || {
        reloads(&rf, "error") == 1.0
    })
    .await;
    // The log is read from the process's stderr by a thread: it may lag the metric.
    assert!(
        rf.wait_for_log("consecutive_failures", secs(5))
            && rf.logs_contain("configuration reload rejected"),
        "the rejection names the field:\n{}",
        rf.logs_text()
    );
    let (_, shown) = http_get(&rf.admin_addr(), "/config");
    assert!(
        shown.contains(&a.addr()) && !shown.contains(&b.addr()),
        "{shown}"
    );
    load.progress(200, secs(10)).await;

    // A valid file: the upstream moves to the second server, the rule's reply changes, and a
    // setting fixed at start says it needs a restart.
    write_atomically(&path, &config(&b.addr(), ":7", "max_clients = 5000"));
    eventually("the valid file is applied", secs(10), || {
        reloads(&rf, "ok") == 1.0
    })
    .await;
    assert!(
        rf.wait_for_log("`max_clients` changed", secs(5)) && rf.logs_contain("restart"),
        "{}",
        rf.logs_text()
    );
    let (_, shown) = http_get(&rf.admin_addr(), "/config");
    assert!(
        shown.contains(&b.addr()) && !shown.contains(&a.addr()),
        "{shown}"
    );
    assert!(
        shown.contains("\":7\""),
        "GET /config shows the new rule: {shown}"
    );
    assert!(!shown.contains("\"tok\""), "secrets stay redacted: {shown}");
    let mut c = RawClient::connect(&rf.addr());
    assert_eq!(c.cmd(&["SET", "reload:probe", "moved"]), b"+OK\r\n");
    assert_eq!(b.cmd(&["GET", "reload:probe"]), b"$5\r\nmoved\r\n");
    assert_eq!(a.cmd(&["GET", "reload:probe"]), b"$-1\r\n");
    load.progress(400, secs(10)).await;
    // The client load pauses while the breaker is forced open below: its writes would get
    // the default error then, by design.
    let first = load.stop().await;
    assert_eq!(first.failed, 0, "commands lost: {:?}", first.errors);

    // The new fail-open rule answers while the breaker is open.
    let (status, body) = http_post(&rf.admin_addr(), "/breakers/main/force-open", Some("tok"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(c.cmd(&["INCR", "counter"]), b":7\r\n");
    let (status, body) = http_post(&rf.admin_addr(), "/breakers/main/normal", Some("tok"));
    assert_eq!(status, 200, "{body}");
    eventually("the breaker closes again", secs(10), || {
        c.cmd(&["INCR", "counter"]) == b":1\r\n" || b.cmd(&["GET", "counter"]) != b"$-1\r\n"
    })
    .await;

    // SIGHUP reloads too (it used to terminate the process).
    let load = Load::start_lenient(&rf.addr(), 4, "reload").await;
    load.progress(200, secs(10)).await;
    rf.signal("HUP");
    eventually("SIGHUP reloads", secs(10), || reloads(&rf, "ok") == 2.0).await;
    assert!(
        rf.wait_for_log("trigger=\"sighup\"", secs(5)),
        "{}",
        rf.logs_text()
    );
    load.progress(200, secs(10)).await;

    for line in rf.logs() {
        if line.contains("configuration reloaded") {
            eprintln!("reload: {line}");
        }
    }
    let tally = load.stop().await;
    assert_eq!(tally.failed, 0, "commands lost: {:?}", tally.errors);
    assert_eq!(reloads(&rf, "error"), 1.0);
    let open = metric_value(&rf.metrics(), "redfuse_client_connections_total", &[]).unwrap_or(0.0);
    // 4 + 4 load clients and the one raw client: nobody had to reconnect.
    assert_eq!(open, 9.0, "clients had to reconnect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_upstream_policy_falls_back_to_the_global_sections_and_reloads_in_place() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    let dir = TempDir::new("reload-policy");
    let file = |replica_breaker: &str| {
        format!(
            "admin_token = \"tok\"\nhealth_probe_interval_ms = 200\n\
             [[fail_open.rules]]\ncommands = [\"INCR\"]\naction = \"reply\"\nreply = \":1\"\n\
             [[upstreams]]\nname = \"main\"\naddr = \"{}\"\ncommand_timeout_ms = 300\n\
             fail_open = {{ rules = [{{ commands = [\"INCR\"], action = \"reply\", reply = \":5\" }}] }}\n\
             [[upstreams]]\nname = \"r\"\naddr = \"{}\"\nrole = \"replica\"\nbreaker = {replica_breaker}\n",
            a.addr(),
            b.addr()
        )
    };
    let path = dir.write("redfuse.toml", &file("{ mode = \"force_open\" }"));
    let rf = support::start_with_config(&path);
    let state = |name: &str| {
        let (_, body) = http_get(&rf.admin_addr(), "/breakers");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v[name]["state"].as_str().unwrap_or_default().to_owned()
    };
    assert_eq!(state("r"), "open", "the replica's own breaker mode");
    assert_eq!(state("main"), "closed", "the global breaker settings");

    // The primary's own command timeout.
    let mut c = RawClient::connect(&rf.addr());
    let reply = String::from_utf8_lossy(&c.cmd(&["DEBUG", "SLEEP", "0.8"])).into_owned();
    assert!(reply.contains("timed out after 300 ms"), "{reply}");

    // The primary's own fail-open rules, instead of the global ones.
    let (status, body) = http_post(&rf.admin_addr(), "/breakers/main/force-open", Some("tok"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(c.cmd(&["INCR", "n"]), b":5\r\n");
    let (status, body) = http_post(&rf.admin_addr(), "/breakers/main/normal", Some("tok"));
    assert_eq!(status, 200, "{body}");

    // A reload changes the replica's breaker in place: back to the normal mode.
    write_atomically(&path, &file("{ consecutive_failures = 2 }"));
    eventually("the replica's breaker leaves force_open", secs(10), || {
        state("r") == "closed"
    })
    .await;
    assert_eq!(reloads(&rf, "ok"), 1.0);
}
