//! Fault scenarios (issue 10): redfuse's documented defaults, breaker polling, RSS sampling,
//! and the mixed workload driver the failure catalogue in `tests/faults.rs` runs.
//!
//! # The workload
//!
//! [`Workload::start`] runs N client threads against redfuse. Client `i` only touches its own
//! keys, so every reply can be judged by the client that asked:
//!
//! | key            | commands                   | while the upstream cannot answer        |
//! |----------------|----------------------------|-----------------------------------------|
//! | `fk:<i>:<n>`   | `GET` (cached), `SET`      | reads from the cache, SET: `error` rule |
//! | `fu:<i>:<n>`   | `GET` (uncached), `SET`    | reads: miss error, SET: `error` rule    |
//! | `fr:<i>`       | `INCR`                     | `reply` rule (`:1`)                     |
//! | `fq:<i>`       | `RPUSH fq:<i> <seq>`       | `queue` rule (`:0`), replayed later     |
//! | -              | `PING <token>`             | answered by redfuse itself              |
//!
//! A value written to `fk:<i>:<n>` is `fk:<i>:<n>:<version>`, versions increasing per key, so
//! a reply names the key and client it belongs to. Commands go one at a time or as pipelines
//! of 2-6, and every reply is checked against the request in the same position:
//!
//! - **Ownership and order**: a value must name the key that was asked for (never another
//!   client's or another key's value), a `PING` must echo its own token, a write must get a
//!   write's reply; anything else is a reply out of order.
//! - **No older value than an acknowledged write**: a value's version must have been written
//!   by this client, and be at least the last version Redis acknowledged (unless that version
//!   may have been lost, see [`Workload::mark_loss`], or a later write's outcome is unknown).
//!   A version a rule refused must never appear. `nil` is allowed only while no durable
//!   acknowledged write exists (misses are configured to be errors, so `nil` is Redis's).
//! - **Fresh cached reads never error**: a key is *fresh* from a successful `GET` of it
//!   until the client next sends a write to it, or redfuse restarts (the cache is in memory).
//!   The catalogue runs for seconds, far inside `max_stale_ms`, so every fresh key is one the
//!   cache must answer while Redis cannot: an error for it is a violation.
//! - **Latency**: no reply may arrive later than `bound` after its batch was sent.
//! - **Connections**: redfuse must not close a client connection, except while the scenario
//!   says redfuse itself is restarting ([`Workload::redfuse_down`]).
//! - **Queued writes**: every acknowledged push is in Redis exactly once and in order after
//!   recovery ([`check_queues`]).
//! - **Recovery**: after [`Workload::mark_recovered`], every client gets writes through again.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::client::{RawClient, ReadError};
use super::http::{http_get, metric_value};
use super::procs::Redfuse;
use super::resp::{esc, resp_cmd};

/// `command_timeout_ms` when unset (README: "timed out after 5000 ms"; config/redfuse.toml).
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_millis(5000);
/// `connect_timeout_ms` when unset (config/redfuse.toml).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);
/// `health_probe_interval_ms` when unset.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_millis(1000);

/// `redfuse_breaker_state` values.
pub const CLOSED: f64 = 0.0;
pub const HALF_OPEN: f64 = 1.0;
pub const OPEN: f64 = 2.0;

/// `redfuse_breaker_state{upstream}` from `/metrics`; -1 when absent or unreadable.
pub fn breaker_state(admin_addr: &str, upstream: &str) -> f64 {
    let (status, body) = http_get(admin_addr, "/metrics");
    if status != 200 {
        return -1.0;
    }
    metric_value(&body, "redfuse_breaker_state", &[("upstream", upstream)]).unwrap_or(-1.0)
}

/// `redfuse_breaker_transitions_total{upstream,to="open"}` summed over reasons.
pub fn opens(rf: &Redfuse, upstream: &str) -> f64 {
    super::http::metric_sum(
        &rf.metrics(),
        "redfuse_breaker_transitions_total",
        &[("upstream", upstream), ("to", "open")],
    )
}

/// Polls every 20 ms until the breaker of `upstream` is in `state`; how long that took, or
/// None after `timeout`.
pub fn time_until_state(
    rf: &Redfuse,
    upstream: &str,
    state: f64,
    timeout: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    let admin = rf.admin_addr();
    loop {
        if breaker_state(&admin, upstream) == state {
            return Some(started.elapsed());
        }
        if started.elapsed() >= timeout {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// VmRSS of a process in KiB, from /proc/<pid>/status.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// `GET /write-queue` as JSON.
pub fn write_queue(rf: &Redfuse) -> serde_json::Value {
    let (status, body) = http_get(&rf.admin_addr(), "/write-queue");
    assert_eq!(status, 200, "GET /write-queue answered {status}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("/write-queue not JSON ({e}): {body}"))
}

/// One client doing `GET` in a loop until stopped; records the slowest reply and anything
/// that was not a reply at all.
pub struct GetLoop {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<GetLoopReport>,
}

#[derive(Debug, Default)]
pub struct GetLoopReport {
    pub requests: u64,
    pub errors: u64,
    pub slowest: Duration,
    /// `(time since start, latency, reply)` of the slowest request.
    pub slowest_at: Duration,
    pub slowest_reply: String,
    pub failures: Vec<String>,
}

impl GetLoop {
    pub fn start(addr: &str, key: &str, give_up: Duration) -> GetLoop {
        GetLoop::start_cmd(addr, &["GET", key], give_up)
    }

    /// The same loop with another command (`SET k v`, ...).
    pub fn start_cmd(addr: &str, cmd: &[&str], give_up: Duration) -> GetLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let mut c = RawClient::connect(addr);
        let frame = resp_cmd(cmd);
        let key = cmd.join(" ");
        let handle = thread::spawn(move || {
            let mut r = GetLoopReport::default();
            let started = Instant::now();
            while !flag.load(Ordering::Relaxed) {
                let t = Instant::now();
                c.send(&frame);
                match c.try_read_frame(give_up) {
                    Ok(f) => {
                        r.requests += 1;
                        if f.first() == Some(&b'-') {
                            r.errors += 1;
                        }
                        let took = t.elapsed();
                        if took > r.slowest {
                            r.slowest = took;
                            r.slowest_at = t - started;
                            r.slowest_reply = esc(&f);
                        }
                    }
                    Err(e) => {
                        r.failures.push(format!(
                            "{:?}: {key} -> {e:?} after {:?}",
                            t - started,
                            t.elapsed()
                        ));
                        break;
                    }
                }
                thread::sleep(Duration::from_millis(5));
            }
            r
        });
        GetLoop { stop, handle }
    }

    pub fn finish(self) -> GetLoopReport {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("GET loop thread")
    }
}

// ---------------------------------------------------------------------------------------
// The mixed workload
// ---------------------------------------------------------------------------------------

/// Message of the `error` rule the catalogue configures for `SET fk:* / fu:*`.
pub const REFUSED: &str = "ERR faults: write refused";

/// The fail-open rules and cache policy the workload's key families expect.
pub const WORKLOAD_RULES: &str = r#"
[cache]
max_bytes = 8388608
miss = "error"
exclude = ["fu:*"]

[fail_open]
[[fail_open.rules]]
name = "ratelimit"
commands = ["INCR"]
keys = ["fr:*"]
action = "reply"
reply = ":1"
[[fail_open.rules]]
name = "refuse"
commands = ["SET"]
keys = ["fk:*", "fu:*"]
action = "error"
message = "ERR faults: write refused"
[[fail_open.rules]]
name = "queue"
commands = ["RPUSH"]
keys = ["fq:*"]
action = "queue"
reply = ":0"
"#;

/// Cache and write-queue byte caps in [`WORKLOAD_RULES`] and the scenario configs.
pub const CACHE_MAX_BYTES: u64 = 8 * 1024 * 1024;
pub const QUEUE_MAX_BYTES: u64 = 4 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct WorkloadOptions {
    pub clients: usize,
    /// Pause between a client's batches.
    pub think: Duration,
    /// No reply may take longer than this after its batch was sent.
    pub bound: Duration,
    /// A reply not there after this long is given up on (a stall, reported).
    pub give_up: Duration,
}

/// State shared by the workload's threads and the scenario.
struct Shared {
    addr: Mutex<String>,
    pid: AtomicU32,
    t0: Instant,
    stop: AtomicBool,
    /// Nanoseconds since t0 (0: never). Writes sent before it may have been lost by Redis.
    loss: AtomicU64,
    /// Redis may be losing writes right now (evicting): no write is durable meanwhile.
    losing: AtomicBool,
    /// Reads before it no longer make a key fresh (redfuse restarted: empty cache).
    cache_epoch: AtomicU64,
    /// Writes sent after it must get through (0: not yet).
    recovered: AtomicU64,
    /// While set, redfuse itself may be down: closed connections and refused connects are
    /// expected.
    redfuse_down: AtomicBool,
    phase: Mutex<&'static str>,
    rss: Mutex<Vec<(Duration, u64)>>,
}

impl Shared {
    fn now(&self) -> Duration {
        self.t0.elapsed()
    }
    fn nanos(&self) -> u64 {
        self.t0.elapsed().as_nanos().max(1) as u64
    }
    fn mark(v: &AtomicU64) -> Option<Duration> {
        match v.load(Ordering::SeqCst) {
            0 => None,
            n => Some(Duration::from_nanos(n)),
        }
    }
    fn phase(&self) -> &'static str {
        *self.phase.lock().unwrap()
    }
}

/// What happened to one `RPUSH fq:<i> <seq>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Redis answered with the list's length.
    Stored { sent: Duration },
    /// The queue rule answered `:0`: journaled, to be replayed.
    Queued { sent: Duration },
    /// Refused before reaching Redis (queue full, circuit open, OOM...).
    Refused,
    /// Unknown: timed out, connection lost, or another error (its class).
    Unknown(&'static str),
}

/// Counters and findings of one client.
#[derive(Debug, Default, Clone)]
pub struct ClientReport {
    pub id: usize,
    pub requests: u64,
    pub batches: u64,
    pub errors: HashMap<&'static str, u64>,
    pub cached_hits_while_fresh: u64,
    pub max_latency: Duration,
    pub over_bound: u64,
    pub violations: Vec<String>,
    pub pushes: Vec<(u64, Push)>,
    /// Writes Redis acknowledged that were sent after the recovery mark.
    pub acked_after_recovery: u64,
    pub reconnects: u64,
}

#[derive(Default, Clone, Copy)]
struct KeyState {
    /// Highest version sent.
    max_sent: u64,
    /// Last version Redis acknowledged, with its send time.
    acked: Option<(u64, Duration)>,
    /// A successful read, not followed by a write since, and whether it was nil.
    fresh: Option<Duration>,
    fresh_nil: bool,
}

#[derive(Default)]
struct Keys {
    state: HashMap<String, KeyState>,
    /// Versions whose outcome is unknown (may or may not have been applied).
    unknown: HashSet<(String, u64)>,
    /// Versions a rule or the breaker refused: must never be seen.
    refused: HashSet<(String, u64)>,
    /// The last few requests on each key (sent, answered, request, reply), shown with the
    /// first freshness violation of the key.
    history: HashMap<String, std::collections::VecDeque<String>>,
    shown: HashSet<String>,
}

#[derive(Debug, Clone)]
enum Op {
    Get { key: String, cached: bool },
    Set { key: String, ver: u64 },
    Incr { key: String },
    Push { key: String, seq: u64 },
    Ping { token: String },
}

impl Op {
    fn args(&self) -> Vec<String> {
        match self {
            Op::Get { key, .. } => vec!["GET".into(), key.clone()],
            Op::Set { key, ver } => vec!["SET".into(), key.clone(), format!("{key}:{ver}")],
            Op::Incr { key } => vec!["INCR".into(), key.clone()],
            Op::Push { key, seq } => vec!["RPUSH".into(), key.clone(), seq.to_string()],
            Op::Ping { token } => vec!["PING".into(), token.clone()],
        }
    }
    fn describe(&self) -> String {
        self.args().join(" ")
    }
}

/// Error replies by class, for the summary.
pub fn error_class(frame: &[u8]) -> &'static str {
    let s = String::from_utf8_lossy(frame);
    if s.contains("circuit open") {
        "circuit_open"
    } else if s.contains("timed out") {
        "timeout"
    } else if s.contains("faults: write refused") {
        "rule_refused"
    } else if s.contains("write queue full") {
        "queue_full"
    } else if s.contains("still being replayed") || s.contains("cannot be replayed yet") {
        "replay_gate"
    } else if s.starts_with("-OOM") {
        "oom"
    } else if s.contains("overloaded") {
        "overloaded"
    } else if s.contains("unavailable") {
        "unavailable"
    } else {
        "other"
    }
}

/// An error that says the command certainly did not run.
fn certainly_refused(class: &str) -> bool {
    matches!(
        class,
        "circuit_open" | "rule_refused" | "queue_full" | "replay_gate" | "oom" | "overloaded"
    )
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const CACHED_KEYS: u64 = 4;
const UNCACHED_KEYS: u64 = 2;

struct Client {
    id: usize,
    shared: Arc<Shared>,
    opts: WorkloadOptions,
    rng: Rng,
    keys: Keys,
    push_seq: u64,
    ping_seq: u64,
    /// The batch being answered, for violation messages.
    batch: String,
    report: ClientReport,
}

impl Client {
    fn violation(&mut self, what: String) {
        if self.report.violations.len() < 20 {
            let at = self.shared.now();
            let phase = self.shared.phase();
            self.report
                .violations
                .push(format!("[{at:.2?} {phase}] client {}: {what}", self.id));
        }
    }

    fn next_op(&mut self) -> Op {
        let id = self.id;
        match self.rng.below(100) {
            0..=34 => Op::Get {
                key: format!("fk:{id}:{}", self.rng.below(CACHED_KEYS)),
                cached: true,
            },
            35..=44 => Op::Get {
                key: format!("fu:{id}:{}", self.rng.below(UNCACHED_KEYS)),
                cached: false,
            },
            45..=64 => {
                let key = if self.rng.below(4) == 0 {
                    format!("fu:{id}:{}", self.rng.below(UNCACHED_KEYS))
                } else {
                    format!("fk:{id}:{}", self.rng.below(CACHED_KEYS))
                };
                let st = self.keys.state.entry(key.clone()).or_default();
                st.max_sent += 1;
                Op::Set {
                    key,
                    ver: st.max_sent,
                }
            }
            65..=74 => Op::Incr {
                key: format!("fr:{id}"),
            },
            75..=86 => {
                self.push_seq += 1;
                Op::Push {
                    key: format!("fq:{id}"),
                    seq: self.push_seq,
                }
            }
            _ => {
                self.ping_seq += 1;
                Op::Ping {
                    token: format!("p{id}.{}", self.ping_seq),
                }
            }
        }
    }

    /// The batch's ops were sent at `sent` and this one got no reply (connection lost).
    fn unanswered(&mut self, op: &Op) {
        match op {
            Op::Set { key, ver } => {
                self.keys.unknown.insert((key.clone(), *ver));
                self.keys.state.entry(key.clone()).or_default().fresh = None;
            }
            Op::Push { seq, .. } => self.report.pushes.push((*seq, Push::Unknown("no reply"))),
            _ => {}
        }
    }

    fn check(&mut self, op: &Op, frame: &[u8], sent: Duration) {
        self.check_reply(op, frame, sent);
        if let Op::Get { key, .. } | Op::Set { key, .. } = op {
            let line = format!(
                "{sent:.2?}->{:.2?} {} = {}",
                self.shared.now(),
                op.describe(),
                esc(&frame[..frame.len().min(70)])
            );
            let h = self.keys.history.entry(key.clone()).or_default();
            if h.len() == 6 {
                h.pop_front();
            }
            h.push_back(line);
        }
    }

    fn check_reply(&mut self, op: &Op, frame: &[u8], sent: Duration) {
        let is_err = frame.first() == Some(&b'-');
        if is_err {
            *self.report.errors.entry(error_class(frame)).or_default() += 1;
        }
        let loss = Shared::mark(&self.shared.loss);
        let recovered = Shared::mark(&self.shared.recovered);
        let now = self.shared.now();
        match op {
            Op::Ping { token } => {
                let want = super::resp::bulk(token);
                if frame != want.as_slice() {
                    self.violation(format!(
                        "PING {token} answered {} (a reply out of order)",
                        esc(frame)
                    ));
                }
            }
            Op::Incr { key } => {
                if !is_err && frame.first() != Some(&b':') {
                    self.violation(format!("INCR {key} answered {}", esc(frame)));
                }
            }
            Op::Push { key, seq } => {
                let outcome = if is_err {
                    if certainly_refused(error_class(frame)) {
                        Push::Refused
                    } else {
                        Push::Unknown(error_class(frame))
                    }
                } else if frame == b":0\r\n" {
                    Push::Queued { sent }
                } else if frame.first() == Some(&b':') {
                    Push::Stored { sent }
                } else {
                    self.violation(format!("RPUSH {key} {seq} answered {}", esc(frame)));
                    Push::Unknown("wrong reply")
                };
                self.report.pushes.push((*seq, outcome));
            }
            Op::Set { key, ver } => {
                let st = self.keys.state.entry(key.clone()).or_default();
                st.fresh = None;
                if frame == b"+OK\r\n" {
                    st.acked = Some((*ver, sent));
                    if recovered.is_some_and(|r| sent > r) {
                        self.report.acked_after_recovery += 1;
                    }
                } else if is_err {
                    let entry = (key.clone(), *ver);
                    if certainly_refused(error_class(frame)) {
                        self.keys.refused.insert(entry);
                    } else {
                        self.keys.unknown.insert(entry);
                    }
                } else {
                    self.keys.unknown.insert((key.clone(), *ver));
                    self.violation(format!("SET {key} {ver} answered {}", esc(frame)));
                }
            }
            Op::Get { key, cached } => {
                let st = self.keys.state.get(key).copied().unwrap_or_default();
                // The last acknowledged write, unless Redis may have lost it since.
                let losing = self.shared.losing.load(Ordering::SeqCst);
                let durable = st
                    .acked
                    .filter(|(_, at)| !losing && loss.is_none_or(|l| *at > l));
                // Fresh: read successfully before this request was sent, by this redfuse
                // process, and not written since.
                let epoch = Shared::mark(&self.shared.cache_epoch);
                let fresh = st
                    .fresh
                    .filter(|since| *since < sent && epoch.is_none_or(|e| *since > e));
                if is_err {
                    if *cached && let Some(since) = fresh {
                        let history = if self.keys.shown.insert(key.clone()) {
                            let h = self.keys.history.get(key).cloned().unwrap_or_default();
                            format!(
                                "; this client's last requests on {key}: {}",
                                Vec::from(h).join(" ; ")
                            )
                        } else {
                            String::new()
                        };
                        self.violation(format!(
                            "GET {key} (fresh: read {} at {since:.2?}, not written since) \
                             answered {} [batch sent at {sent:.2?}: {}]{history}",
                            if st.fresh_nil { "nil" } else { "a value" },
                            esc(frame),
                            self.batch
                        ));
                    }
                    return;
                }
                if frame == b"$-1\r\n" {
                    if let Some((v, at)) = durable {
                        self.violation(format!(
                            "GET {key} answered nil after SET version {v} (sent at {at:.2?}) \
                             was acknowledged"
                        ));
                    }
                } else if let Some(value) = bulk_text(frame) {
                    let prefix = format!("{key}:");
                    match value
                        .strip_prefix(&prefix)
                        .and_then(|v| v.parse::<u64>().ok())
                    {
                        None => self.violation(format!(
                            "GET {key} answered {value:?}: not this client's value of this key"
                        )),
                        Some(v) => {
                            let entry = (key.clone(), v);
                            if v > st.max_sent {
                                self.violation(format!(
                                    "GET {key} answered version {v}, never written (last sent {})",
                                    st.max_sent
                                ));
                            } else if self.keys.refused.contains(&entry) {
                                self.violation(format!(
                                    "GET {key} answered version {v}, a write that was refused"
                                ));
                            } else if let Some((d, at)) = durable
                                && v < d
                                && !self.keys.unknown.iter().any(|(k, u)| k == key && *u >= v)
                            {
                                self.violation(format!(
                                    "GET {key} answered version {v}, older than version {d} \
                                     acknowledged (sent at {at:.2?})"
                                ));
                            }
                        }
                    }
                } else {
                    self.violation(format!(
                        "GET {key} answered {} (a reply out of order)",
                        esc(frame)
                    ));
                    return;
                }
                if *cached {
                    if fresh.is_some() {
                        self.report.cached_hits_while_fresh += 1;
                    }
                    if epoch.is_none_or(|e| sent > e) {
                        let st = self.keys.state.entry(key.clone()).or_default();
                        if st.fresh.is_none_or(|f| epoch.is_some_and(|e| f < e)) {
                            st.fresh = Some(now);
                            st.fresh_nil = frame == b"$-1\r\n";
                        }
                    }
                }
            }
        }
    }

    fn run(mut self) -> ClientReport {
        let mut conn: Option<RawClient> = None;
        // The redfuse process the connection was made to (0: unknown, made while it was
        // being restarted): a connection to a process that has since been killed may end
        // at any time, however late this thread notices.
        let mut conn_pid = 0;
        let mut refused_logged = false;
        while !self.shared.stop.load(Ordering::Relaxed) {
            let c = match conn.as_mut() {
                Some(c) => c,
                None => {
                    let addr = self.shared.addr.lock().unwrap().clone();
                    let down = self.shared.redfuse_down.load(Ordering::SeqCst);
                    let pid = self.shared.pid.load(Ordering::SeqCst);
                    match RawClient::try_connect(&addr) {
                        Ok(c) => {
                            self.report.reconnects += 1;
                            conn_pid = if down { 0 } else { pid };
                            conn.insert(c)
                        }
                        Err(e) => {
                            if !self.shared.redfuse_down.load(Ordering::SeqCst) && !refused_logged {
                                refused_logged = true;
                                self.violation(format!("cannot connect to redfuse: {e}"));
                            }
                            thread::sleep(Duration::from_millis(20));
                            continue;
                        }
                    }
                }
            };
            let n = if self.rng.below(10) < 3 {
                1
            } else {
                2 + self.rng.below(5) as usize
            };
            let ops: Vec<Op> = (0..n).map(|_| self.next_op()).collect();
            let mut bytes = Vec::new();
            for op in &ops {
                bytes.extend_from_slice(&resp_cmd(&op.args()));
            }
            self.batch = ops.iter().map(Op::describe).collect::<Vec<_>>().join(" | ");
            let sent_at = Instant::now();
            let sent = self.shared.now();
            let down_before = self.shared.redfuse_down.load(Ordering::SeqCst);
            if c.try_send(&bytes).is_err() {
                for op in &ops {
                    self.unanswered(op);
                }
                if !down_before
                    && !self.shared.redfuse_down.load(Ordering::SeqCst)
                    && conn_pid == self.shared.pid.load(Ordering::SeqCst)
                {
                    self.violation("redfuse closed the connection (write failed)".into());
                }
                conn = None;
                continue;
            }
            self.report.batches += 1;
            let mut lost = None;
            for (i, op) in ops.iter().enumerate() {
                let c = conn.as_mut().unwrap();
                match c.try_read_frame(self.opts.give_up) {
                    Ok(frame) => {
                        let took = sent_at.elapsed();
                        self.report.requests += 1;
                        if took > self.report.max_latency {
                            self.report.max_latency = took;
                        }
                        if took > self.opts.bound {
                            self.report.over_bound += 1;
                            self.violation(format!(
                                "{} (#{i} of a batch of {n}) answered after {took:.2?} (bound \
                                 {:?}): {}",
                                op.describe(),
                                self.opts.bound,
                                esc(&frame[..frame.len().min(80)])
                            ));
                        }
                        self.check(op, &frame, sent);
                    }
                    Err(e) => {
                        lost = Some((i, e));
                        break;
                    }
                }
            }
            if let Some((i, e)) = lost {
                for op in &ops[i..] {
                    self.unanswered(op);
                }
                let down = down_before
                    || self.shared.redfuse_down.load(Ordering::SeqCst)
                    || conn_pid != self.shared.pid.load(Ordering::SeqCst);
                let what = match &e {
                    ReadError::Timeout(_) => format!("no reply within {:?}", self.opts.give_up),
                    ReadError::Closed(_) => "connection closed by redfuse".to_string(),
                    ReadError::Protocol(p) => format!("invalid RESP: {p}"),
                    ReadError::Io(e) => format!("read error: {e}"),
                };
                if !(down && matches!(e, ReadError::Closed(_) | ReadError::Io(_))) {
                    *self.report.errors.entry("connection").or_default() += 1;
                    self.violation(format!(
                        "{} (#{i} of a batch of {n}): {what}",
                        ops[i].describe()
                    ));
                }
                conn = None;
                continue;
            }
            if !self.opts.think.is_zero() {
                thread::sleep(self.opts.think);
            }
        }
        self.report
    }
}

fn bulk_text(frame: &[u8]) -> Option<String> {
    if frame.first() != Some(&b'$') {
        return None;
    }
    let crlf = frame.windows(2).position(|w| w == b"\r\n")?;
    let body = frame.get(crlf + 2..frame.len().checked_sub(2)?)?;
    Some(String::from_utf8_lossy(body).into_owned())
}

/// The running workload.
pub struct Workload {
    shared: Arc<Shared>,
    clients: Vec<JoinHandle<ClientReport>>,
    sampler: Option<JoinHandle<()>>,
    pub opts: WorkloadOptions,
}

/// Everything the workload saw.
pub struct WorkloadReport {
    pub clients: Vec<ClientReport>,
    pub elapsed: Duration,
    pub rss: Vec<(Duration, u64)>,
    pub recovered_at: Option<Duration>,
    pub loss_at: Option<Duration>,
}

impl Workload {
    /// Starts `opts.clients` client threads against redfuse at `addr` (pid `pid`, whose RSS is
    /// sampled every 200 ms).
    pub fn start(addr: &str, pid: u32, opts: WorkloadOptions) -> Workload {
        let shared = Arc::new(Shared {
            addr: Mutex::new(addr.to_string()),
            pid: AtomicU32::new(pid),
            t0: Instant::now(),
            stop: AtomicBool::new(false),
            loss: AtomicU64::new(0),
            losing: AtomicBool::new(false),
            cache_epoch: AtomicU64::new(0),
            recovered: AtomicU64::new(0),
            redfuse_down: AtomicBool::new(false),
            phase: Mutex::new("warm-up"),
            rss: Mutex::new(Vec::new()),
        });
        let clients = (0..opts.clients)
            .map(|id| {
                let client = Client {
                    id,
                    shared: shared.clone(),
                    opts: opts.clone(),
                    rng: Rng(0x9E37_79B9_7F4A_7C15 ^ ((id as u64 + 1) * 0x1000_0001)),
                    keys: Keys::default(),
                    push_seq: 0,
                    ping_seq: 0,
                    batch: String::new(),
                    report: ClientReport {
                        id,
                        ..Default::default()
                    },
                };
                thread::Builder::new()
                    .name(format!("fault-client-{id}"))
                    .stack_size(256 * 1024)
                    .spawn(move || client.run())
                    .expect("spawn a workload client")
            })
            .collect();
        let s = shared.clone();
        let sampler = thread::spawn(move || {
            while !s.stop.load(Ordering::Relaxed) {
                if let Some(kib) = rss_kib(s.pid.load(Ordering::SeqCst)) {
                    s.rss.lock().unwrap().push((s.now(), kib));
                }
                thread::sleep(Duration::from_millis(200));
            }
        });
        Workload {
            shared,
            clients,
            sampler: Some(sampler),
            opts,
        }
    }

    /// Time since the workload started.
    pub fn now(&self) -> Duration {
        self.shared.now()
    }

    /// Labels the violations found from now on.
    pub fn phase(&self, name: &'static str) {
        *self.shared.phase.lock().unwrap() = name;
    }

    /// Redis may lose writes from now until [`Workload::mark_loss`] (an eviction storm):
    /// meanwhile a read may find any key gone.
    pub fn loss_begins(&self) {
        self.shared.losing.store(true, Ordering::SeqCst);
    }

    /// Redis may have lost every write sent before now (killed without persistence,
    /// evicted), and loses none from now on. Call it once the loss has happened (after the
    /// kill, when the eviction has stopped).
    pub fn mark_loss(&self) {
        self.shared
            .loss
            .store(self.shared.nanos(), Ordering::SeqCst);
        self.shared.losing.store(false, Ordering::SeqCst);
    }

    /// The fault is over and redfuse answers again: writes sent from now on must get
    /// through for every client.
    pub fn mark_recovered(&self) {
        self.shared
            .recovered
            .store(self.shared.nanos(), Ordering::SeqCst);
    }

    /// redfuse is about to be killed: closed connections and refused connects are expected
    /// until [`Workload::redfuse_up`].
    ///
    /// Its cache dies with it: no read before this is fresh any more, whichever process
    /// answers next (the new one listens on the same address, and clients may reach it
    /// before [`Workload::redfuse_up`] is called).
    pub fn redfuse_down(&self) {
        self.shared
            .cache_epoch
            .store(self.shared.nanos(), Ordering::SeqCst);
        self.shared.redfuse_down.store(true, Ordering::SeqCst);
    }

    /// A new redfuse process (`pid`) listens at `addr`; its cache starts empty.
    pub fn redfuse_up(&self, addr: &str, pid: u32) {
        *self.shared.addr.lock().unwrap() = addr.to_string();
        self.shared.pid.store(pid, Ordering::SeqCst);
        self.shared
            .cache_epoch
            .store(self.shared.nanos(), Ordering::SeqCst);
        self.shared.redfuse_down.store(false, Ordering::SeqCst);
    }

    pub fn stop(mut self) -> WorkloadReport {
        self.shared.stop.store(true, Ordering::SeqCst);
        let clients = self
            .clients
            .drain(..)
            .map(|h| h.join().expect("workload client thread"))
            .collect();
        if let Some(s) = self.sampler.take() {
            let _ = s.join();
        }
        WorkloadReport {
            clients,
            elapsed: self.shared.now(),
            rss: self.shared.rss.lock().unwrap().clone(),
            recovered_at: Shared::mark(&self.shared.recovered),
            loss_at: Shared::mark(&self.shared.loss),
        }
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }
}

impl WorkloadReport {
    pub fn requests(&self) -> u64 {
        self.clients.iter().map(|c| c.requests).sum()
    }

    pub fn max_latency(&self) -> Duration {
        self.clients
            .iter()
            .map(|c| c.max_latency)
            .max()
            .unwrap_or_default()
    }

    pub fn errors(&self) -> Vec<(&'static str, u64)> {
        let mut all: HashMap<&'static str, u64> = HashMap::new();
        for c in &self.clients {
            for (k, v) in &c.errors {
                *all.entry(k).or_default() += v;
            }
        }
        let mut v: Vec<_> = all.into_iter().collect();
        v.sort();
        v
    }

    pub fn violations(&self) -> Vec<String> {
        self.clients
            .iter()
            .flat_map(|c| c.violations.iter().cloned())
            .collect()
    }

    pub fn peak_rss_kib(&self) -> u64 {
        self.rss.iter().map(|(_, k)| *k).max().unwrap_or(0)
    }

    /// Clients with no write acknowledged by Redis since the recovery mark.
    pub fn not_recovered(&self) -> Vec<usize> {
        self.clients
            .iter()
            .filter(|c| c.acked_after_recovery == 0)
            .map(|c| c.id)
            .collect()
    }

    pub fn summary(&self) -> String {
        let pushes = |f: fn(&Push) -> bool| -> usize {
            self.clients
                .iter()
                .map(|c| c.pushes.iter().filter(|(_, p)| f(p)).count())
                .sum()
        };
        format!(
            "{} requests in {:.1?}, max latency {:.2?}, errors {:?}, fresh cached reads {}, \
             pushes stored/queued/refused/unknown {}/{}/{}/{}, reconnects {}, peak RSS {} KiB",
            self.requests(),
            self.elapsed,
            self.max_latency(),
            self.errors(),
            self.clients
                .iter()
                .map(|c| c.cached_hits_while_fresh)
                .sum::<u64>(),
            pushes(|p| matches!(p, Push::Stored { .. })),
            pushes(|p| matches!(p, Push::Queued { .. })),
            pushes(|p| matches!(p, Push::Refused)),
            pushes(|p| matches!(p, Push::Unknown(_))),
            self.clients
                .iter()
                .map(|c| c.reconnects.saturating_sub(1))
                .sum::<u64>(),
            self.peak_rss_kib(),
        )
    }

    /// Every acknowledged push is in `fq:<i>` exactly once and in order; nothing refused is.
    /// `lrange(key)` reads the list straight from Redis. Pushes sent before the loss mark
    /// may be missing (Redis lost them), never duplicated or reordered.
    pub fn check_queues(&self, mut lrange: impl FnMut(&str) -> Vec<u64>) -> Vec<String> {
        let mut bad = Vec::new();
        for c in &self.clients {
            let key = format!("fq:{}", c.id);
            let list = lrange(&key);
            let outcome: HashMap<u64, Push> = c.pushes.iter().copied().collect();
            if let Some(w) = list.windows(2).find(|w| w[0] >= w[1]) {
                bad.push(format!(
                    "{key}: {} before {} (duplicate or out of order; the client saw the push \
                     of {} {} and of {} {}) in {}",
                    w[0],
                    w[1],
                    w[0],
                    describe_push(outcome.get(&w[0])),
                    w[1],
                    describe_push(outcome.get(&w[1])),
                    short_list(&list)
                ));
            }
            let present: HashSet<u64> = list.iter().copied().collect();
            for v in &list {
                match outcome.get(v) {
                    None => bad.push(format!("{key}: {v} was never pushed")),
                    Some(Push::Refused) => bad.push(format!(
                        "{key}: {v} is in Redis although its push was refused"
                    )),
                    _ => {}
                }
            }
            let mut missing = Vec::new();
            for (seq, p) in &c.pushes {
                let sent = match p {
                    Push::Stored { sent } | Push::Queued { sent } => *sent,
                    _ => continue,
                };
                if self.loss_at.is_some_and(|l| sent <= l) {
                    continue;
                }
                if !present.contains(seq) {
                    missing.push(format!(
                        "{seq} ({})",
                        if matches!(p, Push::Queued { .. }) {
                            "queued"
                        } else {
                            "stored"
                        }
                    ));
                }
            }
            if !missing.is_empty() {
                bad.push(format!(
                    "{key}: acknowledged pushes missing: {} (list: {})",
                    missing.join(", "),
                    short_list(&list)
                ));
            }
        }
        bad
    }
}

fn describe_push(p: Option<&Push>) -> String {
    match p {
        None => "never sent".into(),
        Some(Push::Stored { sent }) => format!("answered by Redis (sent at {sent:.2?})"),
        Some(Push::Queued { sent }) => format!("queued by the rule (sent at {sent:.2?})"),
        Some(Push::Refused) => "refused".into(),
        Some(Push::Unknown(class)) => format!("end unknown ({class})"),
    }
}

fn short_list(list: &[u64]) -> String {
    if list.len() <= 30 {
        format!("{list:?}")
    } else {
        format!(
            "{:?} ... {:?} ({} items)",
            &list[..10],
            &list[list.len() - 10..],
            list.len()
        )
    }
}

/// `LRANGE key 0 -1` of integers on a direct Redis client.
pub fn lrange_ints(c: &mut RawClient, key: &str) -> Vec<u64> {
    let frame = c.cmd(&["LRANGE", key, "0", "-1"]);
    let v = super::resp::parse_resp(&frame);
    v.items()
        .unwrap_or_else(|| panic!("LRANGE {key}: {}", esc(&frame)))
        .iter()
        .map(|i| {
            i.text()
                .and_then(|t| t.parse().ok())
                .unwrap_or_else(|| panic!("LRANGE {key}: not an integer in {}", esc(&frame)))
        })
        .collect()
}
