//! The set of upstreams changes at run time (`Running::apply_upstreams`, the API that reload,
//! discovery and Sentinel go through): traffic moves, in-flight commands finish where they
//! started, retired upstreams are drained, and no client command or connection is lost.

mod support;

use std::time::Duration;

use redfuse::config::{Cli, Config, Role, UpstreamConfig};
use support::{Load, RedisServer, TempDir, ms, secs};

fn upstream(name: &str, addr: &str, role: Role) -> UpstreamConfig {
    let mut u = UpstreamConfig::new(addr);
    u.name = name.to_owned();
    u.role = role;
    u
}

async fn start(dir: &TempDir, toml: &str) -> redfuse::Running {
    let path = dir.write(
        "redfuse.toml",
        &format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nhealth_probe_interval_ms = 100\n{toml}"
        ),
    );
    let config = Config::load(&Cli::default(), Some(&path), Vec::new()).expect("a valid config");
    redfuse::start(config).await.expect("redfuse starts")
}

fn connected_clients(r: &RedisServer) -> u64 {
    r.info_field("connected_clients")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let until = std::time::Instant::now() + timeout;
    while !f() {
        assert!(
            std::time::Instant::now() < until,
            "timed out after {timeout:?}: {what}"
        );
        tokio::time::sleep(ms(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_change_moves_traffic_and_drains_the_old_address() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    let dir = TempDir::new("dyn-move");
    let running = start(
        &dir,
        &format!(
            "upstream_drain_timeout_ms = 1500\n[[upstreams]]\nname = \"main\"\naddr = \"{}\"\n",
            a.addr()
        ),
    )
    .await;
    let addr = running.client_addr.to_string();
    // Lenient: a read right after the move may go to the new server, which does not have
    // the value the write before it left on the old one.
    let load = Load::start_lenient(&addr, 4, "move").await;
    load.progress(200, secs(10)).await;

    // A command in flight on the old address when it moves finishes there.
    let slow = {
        let client = redis::Client::open(format!("redis://{addr}/")).unwrap();
        let mut con = client.get_multiplexed_async_connection().await.unwrap();
        tokio::spawn(async move {
            redis::cmd("DEBUG")
                .arg("SLEEP")
                .arg("0.3")
                .query_async::<String>(&mut con)
                .await
        })
    };
    tokio::time::sleep(ms(100)).await;
    let applied = running
        .apply_upstreams(&[upstream("main", &b.addr(), Role::Primary)])
        .await
        .expect("a valid list");
    assert_eq!(applied.moved, vec!["main".to_owned()], "{applied:?}");
    assert_eq!(
        slow.await.unwrap().expect("DEBUG SLEEP answered"),
        "OK",
        "the in-flight command finished on the old address"
    );

    load.progress(400, secs(10)).await;
    let mut c = support::RawClient::connect(&addr);
    assert_eq!(c.cmd(&["SET", "moved:probe", "b"]), b"+OK\r\n");
    assert_eq!(
        b.cmd(&["GET", "moved:probe"]),
        b"$1\r\nb\r\n",
        "writes reach the new address"
    );
    assert_eq!(
        a.cmd(&["GET", "moved:probe"]),
        b"$-1\r\n",
        "not the old one"
    );

    // Sessions let go of the old address, the drain deadline closes the rest: only the
    // INFO client itself is left on the old server.
    eventually("the old address drained", secs(6), || {
        connected_clients(&a) == 1
    })
    .await;

    let tally = load.stop().await;
    assert_eq!(tally.failed, 0, "commands lost: {:?}", tally.errors);
    assert!(tally.ok > 600, "{tally:?}");
    running.shutdown().await;
}

fn get_calls(r: &RedisServer) -> u64 {
    let raw = r.cmd(&["INFO", "commandstats"]);
    let text = String::from_utf8_lossy(&raw).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("cmdstat_get:calls="))
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_replicas_take_reads_and_removed_ones_are_drained() {
    let a = RedisServer::start();
    let port = a.port().to_string();
    let b = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port]);
    let dir = TempDir::new("dyn-add");
    let running = start(
        &dir,
        &format!(
            "read_policy = \"prefer-replica\"\nupstream_drain_timeout_ms = 1000\n[[upstreams]]\nname = \"main\"\naddr = \"{}\"\n",
            a.addr()
        ),
    )
    .await;
    let addr = running.client_addr.to_string();
    let load = Load::start_lenient(&addr, 2, "add").await;
    load.progress(100, secs(10)).await;

    // A bad list changes nothing.
    let bad = running
        .apply_upstreams(&[
            upstream("main", &a.addr(), Role::Primary),
            upstream("r", &b.addr(), Role::Primary),
        ])
        .await;
    assert_eq!(bad, Err(redfuse::SetError::Primaries(2)));

    let before = get_calls(&b);
    let applied = running
        .apply_upstreams(&[
            upstream("main", &a.addr(), Role::Primary),
            upstream("r", &b.addr(), Role::Replica),
        ])
        .await
        .unwrap();
    assert_eq!(applied.added, vec!["r".to_owned()], "{applied:?}");
    let mut c = support::RawClient::connect(&addr);
    eventually("reads reach the added replica", secs(5), || {
        c.cmd(&["GET", "some-key"]);
        get_calls(&b) > before
    })
    .await;

    let applied = running
        .apply_upstreams(&[upstream("main", &a.addr(), Role::Primary)])
        .await
        .unwrap();
    assert_eq!(applied.removed, vec!["r".to_owned()], "{applied:?}");
    eventually("the removed replica drained", secs(5), || {
        connected_clients(&b) == 1
    })
    .await;
    let after = get_calls(&b);
    for _ in 0..50 {
        c.cmd(&["GET", "some-key"]);
    }
    assert_eq!(get_calls(&b), after, "no reads reach a removed replica");

    load.progress(100, secs(10)).await;
    let tally = load.stop().await;
    assert_eq!(tally.failed, 0, "commands lost: {:?}", tally.errors);
    running.shutdown().await;
}

/// A subscriber's raw pipe to an upstream that moved stays until the drain deadline, then
/// closes like a connection Redis closed; subscribing again reaches the new address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_on_a_moved_upstream_is_closed_at_the_drain_deadline() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    let dir = TempDir::new("dyn-pubsub");
    let running = start(
        &dir,
        &format!(
            "upstream_drain_timeout_ms = 500\n[[upstreams]]\nname = \"main\"\naddr = \"{}\"\n",
            a.addr()
        ),
    )
    .await;
    let addr = running.client_addr.to_string();
    let mut sub = support::RawClient::connect(&addr);
    sub.send_cmd(&["SUBSCRIBE", "news"]);
    assert_eq!(
        sub.read_frame(),
        b"*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n"
    );
    assert_eq!(a.cmd(&["PUBLISH", "news", "1"]), b":1\r\n");

    running
        .apply_upstreams(&[upstream("main", &b.addr(), Role::Primary)])
        .await
        .expect("a valid list");
    // Within the deadline the old pipe still carries messages...
    assert_eq!(a.cmd(&["PUBLISH", "news", "2"]), b":1\r\n");
    // ...and after it the connection ends (EOF for the client, no subscriber left on A).
    let started = std::time::Instant::now();
    let rest = tokio::task::spawn_blocking(move || sub.read_until_closed_timeout(secs(5)))
        .await
        .unwrap();
    assert!(
        started.elapsed() < secs(4),
        "closed after {:?}",
        started.elapsed()
    );
    assert!(
        rest.ends_with(b"$1\r\n2\r\n"),
        "the messages before the deadline arrived: {}",
        String::from_utf8_lossy(&rest)
    );
    eventually("no subscriber left on the old address", secs(3), || {
        a.cmd(&["PUBSUB", "NUMSUB", "news"]) == b"*2\r\n$4\r\nnews\r\n:0\r\n"
    })
    .await;

    let mut again = support::RawClient::connect(&addr);
    again.send_cmd(&["SUBSCRIBE", "news"]);
    again.read_frame();
    assert_eq!(b.cmd(&["PUBLISH", "news", "3"]), b":1\r\n");
    running.shutdown().await;
}
