//! Child processes: a real `redis-server` and the `redfuse` binary under test.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::client::RawClient;

/// Poll `f` every few milliseconds until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Like `wait_until` but panics with `what` on timeout.
pub fn eventually(what: &str, timeout: Duration, f: impl FnMut() -> bool) {
    if !wait_until(timeout, f) {
        panic!("timed out after {timeout:?} waiting for: {what}");
    }
}

/// A port that was free a moment ago (bind 127.0.0.1:0, then release).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// A per-test scratch directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!(
            "redfuse-test-{prefix}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Write a file in the directory and return its path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, contents).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const REDIS_START_TIMEOUT: Duration = Duration::from_secs(10);

/// A `redis-server` child process on an ephemeral port.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    extra: Vec<String>,
    password: Option<String>,
    dir: TempDir,
    starts: usize,
}

enum StartError {
    PortTaken(String),
    Failed(String),
}

impl RedisServer {
    /// Start on a fresh free port with default settings.
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// Start on a fresh free port with extra arguments, e.g. `["--requirepass", "secret"]`.
    pub fn start_with(extra: &[&str]) -> RedisServer {
        let mut last = String::new();
        for _ in 0..10 {
            let mut s = Self::new(free_port(), extra);
            match s.spawn() {
                Ok(()) => return s,
                Err(StartError::PortTaken(log)) => last = log,
                Err(StartError::Failed(msg)) => panic!("{msg}"),
            }
        }
        panic!("redis-server: could not find a free port after 10 attempts; last log:\n{last}");
    }

    /// Start on a specific port (e.g. one redfuse was already pointed at).
    /// Retries for a few seconds if the port is momentarily taken.
    pub fn start_on(port: u16, extra: &[&str]) -> RedisServer {
        let mut s = Self::new(port, extra);
        s.spawn_retrying();
        s
    }

    fn new(port: u16, extra: &[&str]) -> RedisServer {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let password = extra
            .iter()
            .position(|a| a == "--requirepass")
            .and_then(|i| extra.get(i + 1).cloned());
        RedisServer {
            port,
            child: None,
            extra,
            password,
            dir: TempDir::new("redis"),
            starts: 0,
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("redis-{}.log", self.starts))
    }

    /// The current log file's contents.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn spawn(&mut self) -> Result<(), StartError> {
        self.starts += 1;
        let log_path = self.log_path();
        let log = std::fs::File::create(&log_path).expect("create redis log");
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args([
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ])
            // DEBUG SLEEP etc. are used to make commands slow; allowed from loopback only.
            .args(["--enable-debug-command", "local"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn redis-server (is it installed?): {e}"));
        let deadline = Instant::now() + REDIS_START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = self.log();
                if log.contains("Address already in use") {
                    return Err(StartError::PortTaken(log));
                }
                return Err(StartError::Failed(format!(
                    "redis-server on port {} exited during startup with {status}; log:\n{log}",
                    self.port
                )));
            }
            // Our own log saying it's ready proves *our* process owns the port.
            if self.log().contains("Ready to accept connections") && ping_ok(self.port) {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(StartError::Failed(format!(
                    "redis-server on port {} did not answer PING within {REDIS_START_TIMEOUT:?}; log:\n{}",
                    self.port,
                    self.log()
                )));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn spawn_retrying(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(StartError::PortTaken(log)) => {
                    if Instant::now() >= deadline {
                        panic!(
                            "redis-server: port {} still taken after 10s; log:\n{log}",
                            self.port
                        );
                    }
                    thread::sleep(Duration::from_millis(50));
                }
                Err(StartError::Failed(msg)) => panic!("{msg}"),
            }
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGKILL the server and wait for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again on the SAME port with the same arguments (kills first if running).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn_retrying();
    }

    /// A raw client connected straight to Redis (authenticated if the server
    /// was started with `--requirepass`).
    pub fn client(&self) -> RawClient {
        let mut c = RawClient::connect(&self.addr());
        if let Some(pw) = &self.password {
            let r = c.cmd(&["AUTH", pw.as_str()]);
            assert_eq!(r, b"+OK\r\n", "direct AUTH to redis failed");
        }
        c
    }

    /// Run one command directly against Redis and return the raw reply.
    pub fn cmd<A: AsRef<[u8]>>(&self, args: &[A]) -> Vec<u8> {
        self.client().cmd(args)
    }

    /// Wait (bounded, 5s) until Redis itself reports `n` blocked clients, i.e.
    /// a blocking command sent through the proxy is in flight upstream.
    #[track_caller]
    pub fn wait_blocked_clients(&self, n: usize) {
        eventually(
            &format!("redis INFO blocked_clients == {n}"),
            Duration::from_secs(5),
            || self.info_field("blocked_clients").as_deref() == Some(n.to_string().as_str()),
        );
    }

    /// Read one field from `INFO` (e.g. `blocked_clients`), directly from Redis.
    pub fn info_field(&self, field: &str) -> Option<String> {
        let raw = self.cmd(&["INFO"]);
        let text = String::from_utf8_lossy(&raw).into_owned();
        text.lines().find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.trim().to_string())
        })
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn ping_ok(port: u16) -> bool {
    let Ok(mut s) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500))
    else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(n) if n > 0 => buf[..n].starts_with(b"+PONG") || buf[..n].starts_with(b"-NOAUTH"),
        _ => false,
    }
}

/// Path of the binary under test.
pub fn redfuse_bin() -> &'static str {
    env!("CARGO_BIN_EXE_redfuse")
}

const REDFUSE_START_TIMEOUT: Duration = Duration::from_secs(15);

/// Shared, continuously-growing log of a child's stderr+stdout lines.
pub type LogLines = Arc<Mutex<Vec<String>>>;

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c2 in chars.by_ref() {
                    if c2.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

fn drain_lines(
    reader: impl Read + Send + 'static,
    sink: LogLines,
    tag: &'static str,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut r = BufReader::new(reader);
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let s = String::from_utf8_lossy(&line);
                    let s = strip_ansi(s.trim_end_matches(['\n', '\r']));
                    let s = if tag.is_empty() {
                        s
                    } else {
                        format!("{tag}{s}")
                    };
                    sink.lock().unwrap().push(s);
                }
            }
        }
    })
}

/// Pull `key=VALUE` (text format) or `"key":"VALUE"` (JSON format) out of a log line.
pub fn log_field(line: &str, key: &str) -> Option<String> {
    let mut search = line;
    while let Some(i) = search.find(key) {
        let rest = &search[i + key.len()..];
        let trimmed = rest.trim_start_matches(['"', '=', ':', ' ']);
        if trimmed.len() < rest.len()
            && !rest.starts_with(|c: char| c.is_alphanumeric() || c == '_')
        {
            let v: String = trimmed
                .chars()
                .take_while(|c| !matches!(c, '"' | ' ' | ',' | '}' | '\t'))
                .collect();
            if !v.is_empty() {
                return Some(v);
            }
        }
        search = rest;
    }
    None
}

/// A running `redfuse` process.
pub struct Redfuse {
    child: Child,
    addr: String,
    admin_addr: String,
    logs: LogLines,
    status: Option<ExitStatus>,
}

impl Redfuse {
    /// Start with `--listen 127.0.0.1:0 --upstream UPSTREAM --admin-listen 127.0.0.1:0` plus `extra`.
    pub fn start(upstream: &str, extra: &[&str]) -> Redfuse {
        Self::start_with_env(upstream, extra, &[])
    }

    /// Like `start`, with extra environment variables (e.g. `REDFUSE_PASSWORD`).
    /// Inherited `REDFUSE_*` variables are removed first.
    pub fn start_with_env(upstream: &str, extra: &[&str], env: &[(&str, &str)]) -> Redfuse {
        let mut args: Vec<String> = vec![
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--upstream".into(),
            upstream.into(),
            "--admin-listen".into(),
            "127.0.0.1:0".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn_args(&args, env).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Spawn with exactly `args` (no defaults added) and wait for the
    /// listening line. Err holds a description including the collected logs.
    pub fn spawn_args(args: &[String], env: &[(&str, &str)]) -> Result<Redfuse, String> {
        let mut cmd = redfuse_command(args, env);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot spawn {}: {e}", redfuse_bin()))?;
        let logs: LogLines = Arc::new(Mutex::new(Vec::new()));
        drain_lines(child.stderr.take().unwrap(), logs.clone(), "");
        drain_lines(child.stdout.take().unwrap(), logs.clone(), "[stdout] ");

        let deadline = Instant::now() + REDFUSE_START_TIMEOUT;
        loop {
            let found = logs.lock().unwrap().iter().find_map(|l| {
                if !l.contains("listening") {
                    return None;
                }
                Some((log_field(l, "client_addr")?, log_field(l, "admin_addr")?))
            });
            if let Some((addr, admin_addr)) = found {
                return Ok(Redfuse {
                    child,
                    addr,
                    admin_addr,
                    logs,
                    status: None,
                });
            }
            if let Ok(Some(status)) = child.try_wait() {
                // Give the drain threads a moment to collect the last lines.
                thread::sleep(Duration::from_millis(100));
                return Err(format!(
                    "redfuse {args:?} exited with {status} before logging its listening line; output:\n{}",
                    logs.lock().unwrap().join("\n")
                ));
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "redfuse {args:?} did not log `listening client_addr=... admin_addr=...` within \
                     {REDFUSE_START_TIMEOUT:?}; output:\n{}",
                    logs.lock().unwrap().join("\n")
                ));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Client address, `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        self.addr.clone()
    }

    /// Admin HTTP address, `127.0.0.1:PORT`.
    pub fn admin_addr(&self) -> String {
        self.admin_addr.clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A raw client connected to the proxy.
    pub fn client(&self) -> RawClient {
        RawClient::connect(&self.addr)
    }

    /// Snapshot of all log lines so far (stderr; stdout lines prefixed `[stdout] `).
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    pub fn logs_text(&self) -> String {
        self.logs().join("\n")
    }

    pub fn logs_contain(&self, needle: &str) -> bool {
        self.logs.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    /// Wait (bounded) for a log line containing `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.logs_contain(needle))
    }

    /// Send SIGTERM.
    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    /// Send a named signal (`TERM`, `INT`, `HUP`, ...) via `kill(1)`.
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill(1)");
        assert!(st.success(), "kill -{sig} {} failed: {st}", self.child.id());
    }

    /// Wait for the process to exit; None if still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.status {
            return Some(s);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                self.status = Some(s);
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.status.is_none() && matches!(self.child.try_wait(), Ok(None))
    }

    /// GET /metrics on the admin port; panics unless 200.
    pub fn metrics(&self) -> String {
        let (status, body) = super::http::http_get(&self.admin_addr, "/metrics");
        assert_eq!(status, 200, "GET /metrics returned {status}: {body}");
        body
    }
}

impl Drop for Redfuse {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            eprintln!(
                "---- redfuse logs ({}) ----\n{}\n---- end redfuse logs ----",
                self.addr,
                self.logs_text()
            );
        }
    }
}

/// Run the redfuse binary to completion with `args` (no defaults added),
/// killing it and panicking if it runs longer than `timeout`.
pub fn run_redfuse(args: &[&str], env: &[(&str, &str)], timeout: Duration) -> Output {
    let mut cmd = redfuse_command(args, env);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", redfuse_bin()));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let to = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let te = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = te.join().unwrap_or_default();
            panic!(
                "redfuse {args:?} still running after {timeout:?} (killed); stderr:\n{}",
                String::from_utf8_lossy(&stderr)
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: to.join().unwrap_or_default(),
        stderr: te.join().unwrap_or_default(),
    }
}

/// The redfuse binary with `args`, piped output, and an environment free of inherited
/// `REDFUSE_*`/`RUST_LOG` settings except those in `env`.
fn redfuse_command<S: AsRef<std::ffi::OsStr>>(args: &[S], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(redfuse_bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, _) in std::env::vars() {
        if k.starts_with("REDFUSE_") {
            cmd.env_remove(k);
        }
    }
    cmd.env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}
