//! Client load with a real client library (the `redis` crate): a few tasks, each on its own
//! connection, looping `SET k n` / `GET k` and checking every answer, so a test can change
//! redfuse under them and then assert that no command and no connection was lost.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

/// What the clients saw.
#[derive(Debug, Default)]
pub struct Tally {
    /// Commands answered as expected.
    pub ok: u64,
    /// Every unexpected answer or error, with the command (the first 20).
    pub errors: Vec<String>,
    /// Errors in all.
    pub failed: u64,
}

pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<Tally>>,
}

impl Load {
    /// `clients` connections to `addr` (host:port), keys under `prefix`; a `GET` must
    /// return the value just set.
    pub async fn start(addr: &str, clients: usize, prefix: &str) -> Load {
        Load::spawn(addr, clients, prefix, true).await
    }

    /// Like [`Load::start`], for reads that may go to another server than the write
    /// before them (a replica, or the new address of an upstream that moved): a `GET` may
    /// return an older value or nil, but never an error.
    pub async fn start_lenient(addr: &str, clients: usize, prefix: &str) -> Load {
        Load::spawn(addr, clients, prefix, false).await
    }

    async fn spawn(addr: &str, clients: usize, prefix: &str, strict: bool) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for c in 0..clients {
            let client = redis::Client::open(format!("redis://{addr}/")).expect("a redis URL");
            let mut con = client
                .get_multiplexed_async_connection()
                .await
                .unwrap_or_else(|e| panic!("client {c} cannot connect to {addr}: {e}"));
            let stop = stop.clone();
            let ok = ok.clone();
            let key = format!("{prefix}:{c}");
            tasks.push(tokio::spawn(async move {
                let mut tally = Tally::default();
                let mut n: u64 = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let set: redis::RedisResult<String> = redis::cmd("SET")
                        .arg(&key)
                        .arg(n)
                        .query_async(&mut con)
                        .await;
                    match set {
                        Ok(s) if s == "OK" => {
                            tally.ok += 1;
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        other => {
                            tally.failed += 1;
                            if tally.errors.len() < 20 {
                                tally.errors.push(format!("SET {key} {n}: {other:?}"));
                            }
                            continue;
                        }
                    }
                    let got: redis::RedisResult<Option<u64>> =
                        redis::cmd("GET").arg(&key).query_async(&mut con).await;
                    match got {
                        Ok(Some(v)) if v == n || (!strict && v <= n) => {
                            tally.ok += 1;
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(None) if !strict => {
                            tally.ok += 1;
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        other => {
                            tally.failed += 1;
                            if tally.errors.len() < 20 {
                                tally
                                    .errors
                                    .push(format!("GET {key} (after SET {n}): {other:?}"));
                            }
                        }
                    }
                }
                tally
            }));
        }
        Load { stop, ok, tasks }
    }

    /// Commands answered as expected so far, by every client.
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Waits until `n` more commands have been answered as expected (panics after
    /// `timeout`): the load goes on.
    pub async fn progress(&self, n: u64, timeout: Duration) {
        let start = self.ok();
        let until = Instant::now() + timeout;
        while self.ok() < start + n {
            assert!(
                Instant::now() < until,
                "the client load made {} of {n} commands in {timeout:?}",
                self.ok() - start
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the clients and adds up what they saw.
    pub async fn stop(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Tally::default();
        for t in self.tasks {
            let t = t.await.expect("a client task");
            all.ok += t.ok;
            all.failed += t.failed;
            all.errors.extend(t.errors);
        }
        all
    }
}
