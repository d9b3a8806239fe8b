//! Upstream discovery (issue 12): a watched upstream file and DNS re-resolution change the
//! set of upstreams of a running redfuse under client load.

mod support;

use std::path::Path;
use std::time::Duration;

use support::{Load, RawClient, RedisServer, TempDir, http_get, secs};

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
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

fn upstreams_file(entries: &[(&str, &str, &str, u32, u32)]) -> String {
    let list: Vec<String> = entries
        .iter()
        .map(|(name, addr, role, priority, weight)| {
            format!(
                "{{\"name\": \"{name}\", \"addr\": \"{addr}\", \"role\": \"{role}\", \"priority\": {priority}, \"weight\": {weight}}}"
            )
        })
        .collect();
    format!("{{\"upstreams\": [{}]}}", list.join(", "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_upstream_file_moves_traffic_and_invalid_content_keeps_the_list() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    let dir = TempDir::new("discovery-file");
    let list = dir.write(
        "upstreams.json",
        &upstreams_file(&[("main", &a.addr(), "primary", 0, 1)]),
    );
    let config = dir.write(
        "redfuse.toml",
        &format!(
            "upstream_drain_timeout_ms = 1000\n[discovery]\nfile = \"{}\"\n",
            list.display()
        ),
    );
    let rf = support::start_with_config(&config);
    let mut c = RawClient::connect(&rf.addr());
    assert_eq!(c.cmd(&["SET", "file:k", "a"]), b"+OK\r\n");
    assert_eq!(
        a.cmd(&["GET", "file:k"]),
        b"$1\r\na\r\n",
        "the file's list from the start"
    );
    let load = Load::start_lenient(&rf.addr(), 3, "file").await;
    load.progress(200, secs(10)).await;

    write_atomically(
        &list,
        &upstreams_file(&[
            ("main", &b.addr(), "primary", 0, 1),
            ("r", &a.addr(), "replica", 2, 5),
        ]),
    );
    eventually("writes move to the file's new primary", secs(10), || {
        c.cmd(&["SET", "file:k", "b"]);
        b.cmd(&["GET", "file:k"]) == b"$1\r\nb\r\n"
    })
    .await;
    let (_, ready) = http_get(&rf.admin_addr(), "/ready");
    assert!(
        ready.contains("\"name\":\"r\"") && ready.contains(&a.addr()),
        "the replica joined: {ready}"
    );
    load.progress(200, secs(10)).await;

    // Invalid content: logged naming the file, the list stays.
    write_atomically(&list, "{\"upstreams\": [{\"addr\": \"no-port\"}]}");
    assert!(
        rf.wait_for_log("discovery.file", secs(10)),
        "{}",
        rf.logs_text()
    );
    assert_eq!(c.cmd(&["SET", "file:k", "still-b"]), b"+OK\r\n");
    assert_eq!(b.cmd(&["GET", "file:k"]), b"$7\r\nstill-b\r\n");
    let (_, ready) = http_get(&rf.admin_addr(), "/ready");
    assert!(ready.contains("\"name\":\"r\""), "{ready}");
    load.progress(200, secs(10)).await;

    let tally = load.stop().await;
    assert_eq!(tally.failed, 0, "commands lost: {:?}", tally.errors);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_given_by_name_is_resolved_to_its_addresses() {
    let a = RedisServer::start();
    let dir = TempDir::new("discovery-dns");
    let by_name = format!("localhost:{}", a.port());
    let config = dir.write(
        "redfuse.toml",
        &format!(
            "[discovery]\ndns_interval_ms = 200\n[[upstreams]]\nname = \"main\"\naddr = \"{by_name}\"\n"
        ),
    );
    let rf = support::start_with_config(&config);
    // `localhost` resolves to 127.0.0.1 (and ::1 where the resolver says so): the primary
    // takes the first address, in place of the name.
    let resolved: Vec<std::net::SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(&by_name)
        .unwrap()
        .collect();
    let mut first = resolved.clone();
    first.sort();
    let want = first[0].to_string();
    eventually("the name is replaced by its address", secs(10), || {
        let (_, ready) = http_get(&rf.admin_addr(), "/ready");
        ready.contains(&format!("\"addr\":\"{want}\""))
    })
    .await;
    let mut c = RawClient::connect(&rf.addr());
    assert_eq!(c.cmd(&["SET", "dns:k", "v"]), b"+OK\r\n");
    assert_eq!(a.cmd(&["GET", "dns:k"]), b"$1\r\nv\r\n");
}
