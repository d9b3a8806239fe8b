//! Helpers for the access-control and correctness tests (issue 7): a Redis whose users come
//! from an ACL file (so they survive a restart), authenticated direct clients, the Redis
//! process id for SIGSTOP/SIGCONT, admin JSON, and redfuse config text with short timers.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::client::{RawClient, ReadError};
use super::http::{http_get, metric_value};
use super::procs::{Redfuse, RedisServer, TempDir};
use super::resp::{esc, resp_cmd};

/// A redis-server started with `--aclfile`: user `default` has `admin_password`, the other
/// users are the given ACL file lines. The file outlives restarts, so the users do too.
pub struct AclRedis {
    // Declared first: dropped (killed) before its ACL file's directory goes.
    pub server: RedisServer,
    admin_password: String,
    _dir: TempDir,
}

impl AclRedis {
    /// `users`: ACL file lines such as `user alice on >alicepw ~alice:* +@all`.
    pub fn start(admin_password: &str, users: &[&str], extra: &[&str]) -> AclRedis {
        let dir = TempDir::new("acl");
        let path = dir.write("users.acl", &acl_text(admin_password, users));
        let path = path.to_string_lossy().into_owned();
        let mut args: Vec<&str> = vec!["--aclfile", &path];
        args.extend_from_slice(extra);
        let server = RedisServer::start_with(&args);
        AclRedis {
            server,
            admin_password: admin_password.to_string(),
            _dir: dir,
        }
    }

    pub fn addr(&self) -> String {
        self.server.addr()
    }

    pub fn port(&self) -> u16 {
        self.server.port()
    }

    pub fn kill(&mut self) {
        self.server.kill();
    }

    /// Same port, same ACL file.
    pub fn restart(&mut self) {
        self.server.restart();
    }

    /// A direct client authenticated as `default`.
    pub fn admin(&self) -> RawClient {
        authed(&self.addr(), None, &self.admin_password)
    }

    /// A direct client authenticated as `user`.
    pub fn client_as(&self, user: &str, password: &str) -> RawClient {
        authed(&self.addr(), Some(user), password)
    }

    /// One command straight to Redis as `default`.
    pub fn cmd<A: AsRef<[u8]>>(&self, args: &[A]) -> Vec<u8> {
        self.admin().cmd(args)
    }
}

fn acl_text(admin_password: &str, users: &[&str]) -> String {
    let mut text = format!("user default on >{admin_password} ~* &* +@all\n");
    for u in users {
        text.push_str(u);
        text.push('\n');
    }
    text
}

/// Connect to `addr` and AUTH (`AUTH pw` when `user` is None); panics unless `+OK`.
pub fn authed(addr: &str, user: Option<&str>, password: &str) -> RawClient {
    let mut c = RawClient::connect(addr);
    let reply = match user {
        Some(u) => c.cmd(&["AUTH", u, password]),
        None => c.cmd(&["AUTH", password]),
    };
    assert_eq!(
        esc(&reply),
        "+OK\\r\\n",
        "AUTH to {addr} as {user:?} failed"
    );
    c
}

/// Redis's own pid (`INFO server` process_id), asked on an already connected client.
pub fn redis_pid(direct: &mut RawClient) -> u32 {
    let text = String::from_utf8_lossy(&direct.cmd(&["INFO", "server"])).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no process_id in INFO server: {text}"))
}

/// `kill -SIG pid` (`STOP`, `CONT`, ...).
pub fn signal_pid(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill(1)");
    assert!(st.success(), "kill -{sig} {pid} failed: {st}");
}

/// An error reply (simple or blob).
pub fn is_error(frame: &[u8]) -> bool {
    matches!(frame.first(), Some(b'-') | Some(b'!'))
}

/// A nil reply in either protocol.
pub fn is_nil(frame: &[u8]) -> bool {
    frame == b"$-1\r\n" || frame == b"_\r\n" || frame == b"*-1\r\n"
}

/// GET an admin path, assert 200 and parse its JSON body.
pub fn admin_json(rf: &Redfuse, path: &str) -> serde_json::Value {
    let (status, body) = http_get(&rf.admin_addr(), path);
    assert_eq!(status, 200, "GET {path} answered {status}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {body}"))
}

/// `redfuse_breaker_state{upstream}`: 0 closed, 1 half-open, 2 open, -1 unknown.
pub fn breaker_gauge(rf: &Redfuse, upstream: &str) -> f64 {
    metric_value(
        &rf.metrics(),
        "redfuse_breaker_state",
        &[("upstream", upstream)],
    )
    .unwrap_or(-1.0)
}

pub const CLOSED: f64 = 0.0;
pub const OPEN: f64 = 2.0;

/// redfuse config text: probes every 100 ms, connect timeout 300 ms, the upstream named
/// `main`. `top` holds top-level keys, `tables` any tables (`[breaker]`, `[[users]]`, ...).
pub fn rf_config(upstream: &str, top: &str, tables: &str) -> String {
    format!(
        "health_probe_interval_ms = 100\nconnect_timeout_ms = 300\n{top}\n\
         [[upstreams]]\nname = \"main\"\naddr = \"{upstream}\"\nrole = \"primary\"\n{tables}\n"
    )
}

/// Open periods short enough that recovery takes well under a second; every other breaker
/// setting keeps its default.
pub const FAST_RECOVERY: &str =
    "[breaker]\nopen_base_ms = 300\nopen_max_ms = 600\nhalf_open_max_wait_ms = 1000\n";

/// The `counters` rule of config/redfuse.toml, verbatim.
pub const COUNTERS_RULE: &str = r#"
[[fail_open.rules]]
name = "counters"
commands = ["INCR", "INCRBY", "HINCRBY"]
keys = ["counter:*"]
action = "queue"
reply = ":0"
"#;

/// Write `text` as `redfuse.toml` in `dir` and start redfuse with it.
pub fn start_rf(dir: &TempDir, text: &str) -> Redfuse {
    let path: PathBuf = dir.write("redfuse.toml", text);
    super::start_with_config(&path)
}

/// A bystander: its own connection, SET then GET of its own key in a loop until stopped.
/// Every error reply, nil GET, wrong value or stall (no reply within 10 s) is recorded.
pub struct Bystander {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<(u64, Vec<String>)>,
}

impl Bystander {
    pub fn start(addr: &str, name: &str) -> Bystander {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let addr = addr.to_string();
        let key = format!("bystander:{name}");
        let mut c = RawClient::connect(&addr);
        // Its key exists before anything else happens.
        assert_eq!(c.cmd(&["SET", key.as_str(), "0"]), b"+OK\r\n");
        let handle = thread::spawn(move || {
            let mut ops = 0u64;
            let mut bad = Vec::new();
            let started = Instant::now();
            let mut i = 0u64;
            while !flag.load(Ordering::Relaxed) && bad.len() < 20 {
                i += 1;
                let v = i.to_string();
                let at = started.elapsed();
                let mut one = |args: &[&str], want: &[u8]| {
                    c.send(&resp_cmd(args));
                    match c.try_read_frame(Duration::from_secs(10)) {
                        Ok(f) if f == want => {}
                        Ok(f) => bad.push(format!("{at:?} {args:?} -> {}", esc(&f))),
                        Err(ReadError::Timeout(_)) => {
                            bad.push(format!("{at:?} {args:?} -> no reply within 10 s"))
                        }
                        Err(e) => bad.push(format!("{at:?} {args:?} -> {e:?}")),
                    }
                };
                one(&["SET", &key, &v], b"+OK\r\n");
                one(&["GET", &key], &super::resp::bulk(&v));
                ops += 2;
                if bad.iter().any(|b| b.contains("Closed")) {
                    break;
                }
            }
            (ops, bad)
        });
        Bystander { stop, handle }
    }

    /// Stop and return (operations, refusals).
    pub fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("bystander thread")
    }
}
