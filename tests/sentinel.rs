//! Redis Sentinel (issue 12), with real processes on loopback: three Sentinels, a master and
//! a replica. The master is killed; Sentinel fails over; writes through redfuse resume on the
//! new master within 2 s of Sentinel announcing the switch (measured from the test's own
//! `+switch-master` subscription to the first write the new master served), and reads never
//! stop (replica or cache).

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use support::sentinel::{MASTER_NAME, Sentinels};
use support::{RedisServer, TempDir, metric_value, secs};

/// The target of issue 12.
const TARGET: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_resume_on_the_new_master_within_two_seconds_and_reads_never_stop() {
    let mut master = RedisServer::start();
    let port = master.port().to_string();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port]);
    support::eventually("the replica is in sync", secs(10), || {
        replica.info_field("master_link_status").as_deref() == Some("up")
    });
    let sentinels = Sentinels::start(&master, 3, 1);
    let dir = TempDir::new("sentinel-rf");
    let config = dir.write(
        "redfuse.toml",
        &format!(
            "health_probe_interval_ms = 100\nconnect_timeout_ms = 300\nupstream_drain_timeout_ms = 1000\n\
             [sentinel]\nurl = \"sentinel://{}/{MASTER_NAME}\"\nrefresh_ms = 1000\n",
            sentinels.addrs()
        ),
    );
    let rf = support::start_with_config(&config);
    let mut c = support::RawClient::connect(&rf.addr());
    assert_eq!(c.cmd(&["SET", "stable", "v"]), b"+OK\r\n");
    assert_eq!(
        master.cmd(&["GET", "stable"]),
        b"$1\r\nv\r\n",
        "writes go to the master"
    );
    assert_eq!(c.cmd(&["GET", "stable"]), b"$1\r\nv\r\n");
    support::eventually("the replica has the key", secs(5), || {
        replica.cmd(&["GET", "stable"]) == b"$1\r\nv\r\n"
    });

    // The test's own subscription: when Sentinel announces the switch.
    let switched: Arc<Mutex<Option<Instant>>> = Arc::default();
    {
        let client =
            redis::Client::open(format!("redis://127.0.0.1:{}/", sentinels.ports[0])).unwrap();
        let mut pubsub = client.get_async_pubsub().await.unwrap();
        pubsub.subscribe("+switch-master").await.unwrap();
        let switched = switched.clone();
        tokio::spawn(async move {
            let mut messages = pubsub.into_on_message();
            if messages.next().await.is_some() {
                *switched.lock().unwrap() = Some(Instant::now());
            }
        });
    }

    // A writer and a reader through redfuse, every few milliseconds.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = redis::Client::open(format!("redis://{}/", rf.addr())).unwrap();
    let writes: Arc<Mutex<Vec<(u64, Instant, bool)>>> = Arc::default();
    let writer = {
        let mut con = client.get_multiplexed_async_connection().await.unwrap();
        let (stop, writes) = (stop.clone(), writes.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let r: redis::RedisResult<String> = redis::cmd("SET")
                    .arg(format!("fo:{i}"))
                    .arg(i)
                    .query_async(&mut con)
                    .await;
                writes.lock().unwrap().push((i, Instant::now(), r.is_ok()));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let reader = {
        let mut con = client.get_multiplexed_async_connection().await.unwrap();
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut ok, mut bad) = (0u64, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r: redis::RedisResult<Option<String>> =
                    redis::cmd("GET").arg("stable").query_async(&mut con).await;
                match r {
                    Ok(Some(v)) if v == "v" => ok += 1,
                    other => bad.push(format!("{other:?}")),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (ok, bad)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    master.kill();
    let killed = Instant::now();
    let switch_at = loop {
        if let Some(t) = *switched.lock().unwrap() {
            break t;
        }
        assert!(
            killed.elapsed() < secs(30),
            "Sentinel did not switch masters; logs:\n{}",
            sentinels.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Writes resume: the first write sent after the announcement that succeeded (the old
    // master is dead, so the new one served it).
    let resumed = loop {
        let first = writes
            .lock()
            .unwrap()
            .iter()
            .find(|(_, at, ok)| *ok && *at > switch_at)
            .copied();
        if let Some(w) = first {
            break w;
        }
        assert!(
            switch_at.elapsed() < secs(10),
            "no write succeeded within 10 s of the switch; redfuse logs:\n{}",
            rf.logs_text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    let (reads, read_errors) = reader.await.unwrap();

    let (i, answered, _) = resumed;
    let took = answered.duration_since(switch_at);
    eprintln!(
        "failover: master killed -> +switch-master {:?}; +switch-master -> first write served by the new master {:?}",
        switch_at.duration_since(killed),
        took
    );
    assert_eq!(
        replica.cmd(&["GET", &format!("fo:{i}")]),
        format!("${}\r\n{i}\r\n", i.to_string().len()).into_bytes(),
        "the write was served by the new master"
    );
    assert!(
        took <= TARGET,
        "writes resumed {took:?} after Sentinel announced the switch (target {TARGET:?}); logs:\n{}",
        rf.logs_text()
    );
    assert!(
        read_errors.is_empty(),
        "reads stopped ({reads} ok): {read_errors:?}"
    );
    assert!(reads > 50, "{reads}");
    let m = rf.metrics();
    eprintln!(
        "redfuse_failover_seconds (master reported down -> new master taking writes): {:?}",
        metric_value(&m, "redfuse_failover_seconds_sum", &[])
    );
    assert_eq!(
        metric_value(&m, "redfuse_failover_total", &[]),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "redfuse_failover_seconds_count", &[]),
        Some(1.0)
    );
    // Writes after the failover go to the new master.
    assert_eq!(c.cmd(&["SET", "after", "1"]), b"+OK\r\n");
    assert_eq!(replica.cmd(&["GET", "after"]), b"$1\r\n1\r\n");
}

/// `--upstream sentinel://...` on the command line: clap splits the flag at commas, the same
/// commas that separate the Sentinels. The first Sentinel of the list is down; redfuse asks
/// the next, finds the master, and writes reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_url_in_the_upstream_flag_is_followed() {
    let master = RedisServer::start();
    let sentinels = Sentinels::start(&master, 2, 0);
    let dead = format!("127.0.0.1:{}", support::free_port());
    let url = format!("sentinel://{dead},{}/{MASTER_NAME}", sentinels.addrs());
    let rf = support::Redfuse::start(&url, &[]);
    let mut c = support::RawClient::connect(&rf.addr());
    support::eventually("writes reach the master Sentinel names", secs(10), || {
        c.cmd(&["SET", "via-flag", "1"]) == b"+OK\r\n"
    });
    assert_eq!(master.cmd(&["GET", "via-flag"]), b"$1\r\n1\r\n");
    let (status, breakers) = support::http::http_get(&rf.admin_addr(), "/breakers");
    assert_eq!(status, 200);
    assert!(
        breakers.contains(&format!("127.0.0.1:{}", master.port())),
        "{breakers}"
    );
}
