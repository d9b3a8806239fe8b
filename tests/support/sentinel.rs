//! Redis Sentinels for tests: `redis-server --sentinel` processes on loopback ports chosen
//! by binding 127.0.0.1:0 first, each with a config file in a temp dir (Sentinel rewrites
//! it), monitoring one master with quick failover settings.

use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::client::RawClient;
use super::procs::{RedisServer, TempDir, free_port};

/// The master name the Sentinels monitor.
pub const MASTER_NAME: &str = "mymaster";

pub struct Sentinels {
    children: Vec<Child>,
    pub ports: Vec<u16>,
    dir: TempDir,
}

impl Sentinels {
    /// `n` Sentinels (quorum 2) monitoring `master`, with `down-after-milliseconds 1000` and
    /// `failover-timeout 3000`; returns once each knows the other Sentinels and `replicas`
    /// replicas.
    pub fn start(master: &RedisServer, n: usize, replicas: usize) -> Sentinels {
        let dir = TempDir::new("sentinel");
        let mut out = Sentinels {
            children: Vec::new(),
            ports: Vec::new(),
            dir,
        };
        for i in 0..n {
            let port = free_port();
            let conf = out.dir.write(
                &format!("sentinel-{i}.conf"),
                &format!(
                    "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                     sentinel monitor {MASTER_NAME} 127.0.0.1 {mport} 2\n\
                     sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                     sentinel failover-timeout {MASTER_NAME} 3000\n\
                     sentinel parallel-syncs {MASTER_NAME} 1\n",
                    dir = out.dir.path().display(),
                    mport = master.port()
                ),
            );
            let log = std::fs::File::create(out.dir.path().join(format!("sentinel-{i}.log")))
                .expect("a log file");
            let child = Command::new("redis-server")
                .arg(&conf)
                .arg("--sentinel")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot spawn redis-server --sentinel: {e}"));
            out.children.push(child);
            out.ports.push(port);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for &port in &out.ports {
            loop {
                let ready = RawClient::try_connect(&format!("127.0.0.1:{port}"))
                    .ok()
                    .map(|mut c| {
                        let sentinels = count(&c.cmd(&["SENTINEL", "SENTINELS", MASTER_NAME]));
                        let known = count(&c.cmd(&["SENTINEL", "REPLICAS", MASTER_NAME]));
                        sentinels >= n - 1 && known >= replicas
                    })
                    .unwrap_or(false);
                if ready {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "Sentinel on {port} did not discover its peers and replicas; logs:\n{}",
                    out.logs()
                );
                thread::sleep(Duration::from_millis(100));
            }
        }
        out
    }

    /// `host:port` of every Sentinel, comma-separated (for a `sentinel://` URL).
    pub fn addrs(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn logs(&self) -> String {
        (0..self.ports.len())
            .map(|i| {
                let p = self.dir.path().join(format!("sentinel-{i}.log"));
                format!(
                    "--- sentinel {i}\n{}",
                    std::fs::read_to_string(p).unwrap_or_default()
                )
            })
            .collect()
    }
}

/// Elements of a RESP array reply (`*<n>`).
fn count(reply: &[u8]) -> usize {
    std::str::from_utf8(reply)
        .ok()
        .and_then(|s| s.strip_prefix('*'))
        .and_then(|s| s.split("\r\n").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

impl Drop for Sentinels {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}
