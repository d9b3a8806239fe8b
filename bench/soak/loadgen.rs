//! Load generator and fault relay for bench/soak.sh. Standard library only, so it builds
//! with a bare `rustc -O --edition 2021 loadgen.rs`.
//!
//! ```text
//! loadgen load  --redfuse ADDR --redis ADDR --admin ADDR --duration SECS --clients N
//!               --think-ms N --bound-ms N --out DIR
//! loadgen relay --target ADDR --control FILE --port-file FILE
//! ```
//!
//! `load` runs N client threads against redfuse, each on its own keys (see `Op`), single
//! commands and pipelines of 2-6. Every second it appends one line to DIR/timeline.csv
//! (requests answered, latency p50/p99/max, errors by class). At the end it waits for the
//! write queue to drain (GET /write-queue on the admin port), reads every client's queue list
//! straight from Redis and checks that each acknowledged push is there exactly once and in
//! order, then writes DIR/summary.txt.
//!
//! `relay` forwards 127.0.0.1:<ephemeral> to ADDR and rereads FILE every 50 ms: `pass`,
//! `blackhole` (connections accepted and read, nothing forwarded either way), `delay MS`
//! (every chunk from Redis held MS milliseconds).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, rest) = args.split_first().expect("usage: loadgen load|relay ...");
    let mut opts = HashMap::new();
    let mut it = rest.iter();
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        opts.insert(k.trim_start_matches("--").to_string(), v.clone());
    }
    let get = |k: &str| -> String {
        opts.get(k)
            .cloned()
            .unwrap_or_else(|| panic!("missing --{k}"))
    };
    match cmd.as_str() {
        "load" => load(LoadOpts {
            redfuse: get("redfuse"),
            redis: get("redis"),
            admin: get("admin"),
            duration: Duration::from_secs(get("duration").parse().unwrap()),
            clients: get("clients").parse().unwrap(),
            think: Duration::from_millis(get("think-ms").parse().unwrap()),
            bound: Duration::from_millis(get("bound-ms").parse().unwrap()),
            out: get("out"),
        }),
        "relay" => relay(&get("target"), &get("control"), &get("port-file")),
        other => panic!("unknown command {other}"),
    }
}

// ---------------------------------------------------------------------------------------
// RESP
// ---------------------------------------------------------------------------------------

fn encode(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Length of the complete frame at the start of `buf`, if there is one.
fn frame_len(buf: &[u8]) -> Option<usize> {
    fn line(buf: &[u8], from: usize) -> Option<usize> {
        buf.get(from..)?
            .windows(2)
            .position(|w| w == b"\r\n")
            .map(|p| from + p)
    }
    fn at(buf: &[u8], pos: usize) -> Option<usize> {
        let t = *buf.get(pos)?;
        let eol = line(buf, pos + 1)?;
        let n = || {
            std::str::from_utf8(&buf[pos + 1..eol])
                .ok()?
                .parse::<i64>()
                .ok()
        };
        match t {
            b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => Some(eol + 2),
            b'$' | b'!' | b'=' => {
                let n = n()?;
                if n < 0 {
                    return Some(eol + 2);
                }
                let end = eol + 2 + n as usize + 2;
                (buf.len() >= end).then_some(end)
            }
            b'*' | b'~' | b'>' | b'%' | b'|' => {
                let n = n()?;
                let items = if t == b'%' || t == b'|' { n * 2 } else { n };
                let mut p = eol + 2;
                for _ in 0..items.max(0) {
                    p = at(buf, p)?;
                }
                Some(p)
            }
            _ => None,
        }
    }
    at(buf, 0)
}

struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn connect(addr: &str) -> std::io::Result<Conn> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        Ok(Conn {
            s,
            buf: Vec::new(),
        })
    }

    /// One frame, or None on timeout / close / error.
    fn read(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(n) = frame_len(&self.buf) {
                return Some(self.buf.drain(..n).collect());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            self.s
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .ok()?;
            let mut chunk = [0u8; 65536];
            match self.s.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return None,
            }
        }
    }

    fn cmd(&mut self, args: &[&str]) -> Option<Vec<u8>> {
        self.s.write_all(&encode(args)).ok()?;
        self.read(Duration::from_secs(30))
    }
}

// ---------------------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------------------

struct LoadOpts {
    redfuse: String,
    redis: String,
    admin: String,
    duration: Duration,
    clients: usize,
    think: Duration,
    bound: Duration,
    out: String,
}

const CLASSES: [&str; 11] = [
    "circuit_open",
    "timeout",
    "rule_refused",
    "queue_full",
    "replay_gate",
    "oom",
    "other_error",
    "wrong_reply",
    "conn_lost",
    "no_reply",
    "over_bound",
];

fn class_of(frame: &[u8]) -> usize {
    let s = String::from_utf8_lossy(frame);
    if s.contains("circuit open") {
        0
    } else if s.contains("timed out") {
        1
    } else if s.contains("soak: write refused") {
        2
    } else if s.contains("write queue full") {
        3
    } else if s.contains("being replayed") || s.contains("replayed yet") {
        4
    } else if s.starts_with("-OOM") {
        5
    } else {
        6
    }
}

/// Counters of the current second, and of the whole run.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    errors: [u64; CLASSES.len()],
}

struct Shared {
    now: Mutex<Tally>,
    total: Mutex<Tally>,
    stop: AtomicBool,
    requests: AtomicU64,
}

/// What happened to one queued-rule push.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Push {
    /// Redis answered with the length, or the queue rule with `:0`.
    Acked,
    Refused,
    /// No reply, or an error that may have come after the push ran.
    Unknown,
}

fn load(o: LoadOpts) {
    let shared = Arc::new(Shared {
        now: Mutex::new(Tally::default()),
        total: Mutex::new(Tally::default()),
        stop: AtomicBool::new(false),
        requests: AtomicU64::new(0),
    });
    let started = Instant::now();
    let mut timeline = std::fs::File::create(format!("{}/timeline.csv", o.out)).unwrap();
    writeln!(
        timeline,
        "t,requests,p50_ms,p99_ms,max_ms,{}",
        CLASSES.join(",")
    )
    .unwrap();
    let clients: Vec<_> = (0..o.clients)
        .map(|id| {
            let shared = shared.clone();
            let addr = o.redfuse.clone();
            let (think, bound) = (o.think, o.bound);
            thread::spawn(move || client(id, &addr, think, bound, &shared))
        })
        .collect();
    let mut second = 1u64;
    while started.elapsed() < o.duration {
        let next = started + Duration::from_secs(second);
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            thread::sleep(d);
        }
        let tally = std::mem::take(&mut *shared.now.lock().unwrap());
        let mut l = tally.latencies_us.clone();
        l.sort_unstable();
        let q = |p: f64| -> f64 {
            if l.is_empty() {
                0.0
            } else {
                l[((l.len() - 1) as f64 * p) as usize] as f64 / 1000.0
            }
        };
        let errs: Vec<String> = tally.errors.iter().map(|e| e.to_string()).collect();
        writeln!(
            timeline,
            "{second},{},{:.3},{:.3},{:.3},{}",
            l.len(),
            q(0.5),
            q(0.99),
            q(1.0),
            errs.join(",")
        )
        .unwrap();
        let mut total = shared.total.lock().unwrap();
        total.latencies_us.extend_from_slice(&tally.latencies_us);
        for (t, e) in total.errors.iter_mut().zip(tally.errors) {
            *t += e;
        }
        second += 1;
    }
    shared.stop.store(true, Ordering::SeqCst);
    let pushes: Vec<Vec<(u64, Push)>> = clients.into_iter().map(|h| h.join().unwrap()).collect();
    let elapsed = started.elapsed();

    // The queue drains by itself, then every acknowledged push is in Redis once, in order.
    let drain_started = Instant::now();
    let mut queue = String::new();
    while drain_started.elapsed() < Duration::from_secs(120) {
        queue = http_get(&o.admin, "/write-queue").unwrap_or_default();
        if queue.contains("\"depth\":0,") || queue.contains("\"depth\":0}") {
            break;
        }
        thread::sleep(Duration::from_millis(250));
    }
    let drained_in = drain_started.elapsed();
    let mut direct = Conn::connect(&o.redis).expect("connect to Redis");
    let (mut acked, mut missing, mut disorder, mut refused_present) = (0u64, 0u64, 0u64, 0u64);
    let mut examples = Vec::new();
    for (id, log) in pushes.iter().enumerate() {
        let key = format!("sq:{id}");
        let frame = direct.cmd(&["LRANGE", &key, "0", "-1"]).unwrap_or_default();
        let list = parse_int_array(&frame);
        let outcome: HashMap<u64, Push> = log.iter().copied().collect();
        if let Some(w) = list.windows(2).find(|w| w[0] >= w[1]) {
            disorder += 1;
            if examples.len() < 5 {
                examples.push(format!(
                    "{key}: {} before {} (duplicate or out of order); their pushes were {:?} \
                     and {:?}",
                    w[0],
                    w[1],
                    outcome.get(&w[0]),
                    outcome.get(&w[1])
                ));
            }
        }
        for v in &list {
            if outcome.get(v) == Some(&Push::Refused) {
                refused_present += 1;
            }
        }
        let present: std::collections::HashSet<u64> = list.iter().copied().collect();
        for (seq, p) in log {
            if *p == Push::Acked {
                acked += 1;
                if !present.contains(seq) {
                    missing += 1;
                    if examples.len() < 5 {
                        examples.push(format!("{key}: acknowledged push {seq} missing"));
                    }
                }
            }
        }
    }

    let total = shared.total.lock().unwrap();
    let mut l = total.latencies_us.clone();
    l.sort_unstable();
    let q = |p: f64| -> f64 {
        if l.is_empty() {
            0.0
        } else {
            l[((l.len() - 1) as f64 * p) as usize] as f64 / 1000.0
        }
    };
    let mut s = String::new();
    s.push_str(&format!("duration_s={:.1}\n", elapsed.as_secs_f64()));
    s.push_str(&format!("clients={}\n", o.clients));
    s.push_str(&format!("requests={}\n", l.len()));
    s.push_str(&format!(
        "throughput_rps={:.0}\n",
        l.len() as f64 / elapsed.as_secs_f64()
    ));
    s.push_str(&format!(
        "latency_ms=p50 {:.3}, p99 {:.3}, p99.9 {:.3}, max {:.3}\n",
        q(0.5),
        q(0.99),
        q(0.999),
        q(1.0)
    ));
    for (c, n) in CLASSES.iter().zip(total.errors) {
        s.push_str(&format!("errors.{c}={n}\n"));
    }
    s.push_str(&format!(
        "queue_drained_after_s={:.1}\nqueue_at_end={queue}\n",
        drained_in.as_secs_f64()
    ));
    s.push_str(&format!(
        "pushes_acknowledged={acked}\npushes_missing={missing}\nlists_out_of_order={disorder}\n\
         refused_pushes_present={refused_present}\n"
    ));
    for e in examples {
        s.push_str(&format!("example: {e}\n"));
    }
    std::fs::write(format!("{}/summary.txt", o.out), &s).unwrap();
    print!("{s}");
}

fn parse_int_array(frame: &[u8]) -> Vec<u64> {
    let text = String::from_utf8_lossy(frame);
    let mut lines = text.split("\r\n");
    let _ = lines.next();
    let mut out = Vec::new();
    while let (Some(_len), Some(v)) = (lines.next(), lines.next()) {
        if let Ok(n) = v.parse() {
            out.push(n);
        }
    }
    out
}

fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body.split("\r\n\r\n").nth(1)?.to_string())
}

#[derive(Debug)]
enum Op {
    Get(String),
    Set(String, String),
    Incr(String),
    Push(String, u64),
    Ping(String),
}

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// One client: keys `sk:<id>:<n>` (GET cached, SET under an `error` rule), `sr:<id>` (INCR,
/// `reply` rule), `sq:<id>` (RPUSH of increasing numbers, `queue` rule), PING tokens.
fn client(
    id: usize,
    addr: &str,
    think: Duration,
    bound: Duration,
    shared: &Shared,
) -> Vec<(u64, Push)> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (id as u64 + 1) * 0x1000_0001);
    let mut pushes = Vec::new();
    let (mut seq, mut ver, mut ping) = (0u64, 0u64, 0u64);
    let mut conn: Option<Conn> = None;
    let give_up = bound + Duration::from_secs(10);
    while !shared.stop.load(Ordering::Relaxed) {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match Conn::connect(addr) {
                Ok(c) => conn.insert(c),
                Err(_) => {
                    thread::sleep(Duration::from_millis(50));
                    continue;
                }
            },
        };
        let n = if rng.below(10) < 3 {
            1
        } else {
            2 + rng.below(5)
        };
        let ops: Vec<Op> = (0..n)
            .map(|_| match rng.below(100) {
                0..=44 => Op::Get(format!("sk:{id}:{}", rng.below(8))),
                45..=64 => {
                    ver += 1;
                    let k = format!("sk:{id}:{}", rng.below(8));
                    let v = format!("{k}:{ver}");
                    Op::Set(k, v)
                }
                65..=74 => Op::Incr(format!("sr:{id}")),
                75..=86 => {
                    seq += 1;
                    Op::Push(format!("sq:{id}"), seq)
                }
                _ => {
                    ping += 1;
                    Op::Ping(format!("p{id}.{ping}"))
                }
            })
            .collect();
        let mut bytes = Vec::new();
        for op in &ops {
            bytes.extend_from_slice(&match op {
                Op::Get(k) => encode(&["GET", k]),
                Op::Set(k, v) => encode(&["SET", k, v]),
                Op::Incr(k) => encode(&["INCR", k]),
                Op::Push(k, s) => encode(&["RPUSH", k, &s.to_string()]),
                Op::Ping(t) => encode(&["PING", t]),
            });
        }
        let sent = Instant::now();
        let mut lat = Vec::with_capacity(ops.len());
        let mut errors = [0u64; CLASSES.len()];
        let mut lost_at = None;
        if c.s.write_all(&bytes).is_err() {
            lost_at = Some(0);
        } else {
            for (i, op) in ops.iter().enumerate() {
                let Some(f) = c.read(give_up) else {
                    lost_at = Some(i);
                    break;
                };
                let took = sent.elapsed();
                lat.push(took.as_micros().min(u32::MAX as u128) as u32);
                if took > bound {
                    errors[10] += 1;
                }
                let is_err = f.first() == Some(&b'-');
                if is_err {
                    errors[class_of(&f)] += 1;
                }
                let ok = match op {
                    Op::Get(k) => {
                        is_err
                            || f == b"$-1\r\n"
                            || String::from_utf8_lossy(&f).contains(&format!("{k}:"))
                    }
                    Op::Set(..) => is_err || f == b"+OK\r\n",
                    Op::Incr(_) => is_err || f.first() == Some(&b':'),
                    Op::Push(_, s) => {
                        let p = if f.first() == Some(&b':') {
                            Push::Acked
                        } else if is_err && matches!(class_of(&f), 0 | 2 | 3 | 4 | 5) {
                            Push::Refused
                        } else {
                            Push::Unknown
                        };
                        pushes.push((*s, p));
                        is_err || f.first() == Some(&b':')
                    }
                    Op::Ping(t) => f == format!("${}\r\n{t}\r\n", t.len()).into_bytes(),
                };
                if !ok {
                    errors[7] += 1;
                }
            }
        }
        if let Some(i) = lost_at {
            for op in &ops[i..] {
                if let Op::Push(_, s) = op {
                    pushes.push((*s, Push::Unknown));
                }
            }
            errors[8] += 1;
            conn = None;
        }
        {
            let mut t = shared.now.lock().unwrap();
            t.latencies_us.extend_from_slice(&lat);
            for (a, b) in t.errors.iter_mut().zip(errors) {
                *a += b;
            }
        }
        shared.requests.fetch_add(lat.len() as u64, Ordering::Relaxed);
        if !think.is_zero() {
            thread::sleep(think);
        }
    }
    pushes
}

// ---------------------------------------------------------------------------------------
// Relay
// ---------------------------------------------------------------------------------------

/// 0 pass, 1 black hole, 2 delay.
struct Mode {
    kind: AtomicU64,
    delay_ms: AtomicU64,
}

fn relay(target: &str, control: &str, port_file: &str) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("relay bind");
    let port = listener.local_addr().unwrap().port();
    std::fs::write(port_file, port.to_string()).unwrap();
    let mode = Arc::new(Mode {
        kind: AtomicU64::new(0),
        delay_ms: AtomicU64::new(0),
    });
    {
        let mode = mode.clone();
        let control = control.to_string();
        thread::spawn(move || {
            loop {
                let text = std::fs::read_to_string(&control).unwrap_or_default();
                let mut words = text.split_whitespace();
                match words.next() {
                    Some("blackhole") => mode.kind.store(1, Ordering::SeqCst),
                    Some("delay") => {
                        let ms = words.next().and_then(|w| w.parse().ok()).unwrap_or(100);
                        mode.delay_ms.store(ms, Ordering::SeqCst);
                        mode.kind.store(2, Ordering::SeqCst);
                    }
                    _ => mode.kind.store(0, Ordering::SeqCst),
                }
                thread::sleep(Duration::from_millis(50));
            }
        });
    }
    for client in listener.incoming() {
        let Ok(client) = client else { continue };
        let _ = client.set_nodelay(true);
        let mode = mode.clone();
        let target = target.to_string();
        thread::spawn(move || {
            if mode.kind.load(Ordering::SeqCst) == 1 {
                let mut c = client;
                let mut buf = [0u8; 65536];
                while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
                return;
            }
            let Ok(upstream) = TcpStream::connect(&target) else {
                return;
            };
            let _ = upstream.set_nodelay(true);
            let (c2, u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
            let m2 = mode.clone();
            thread::spawn(move || pump(c2, u2, false, &m2));
            pump(upstream, client, true, &mode);
        });
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, from_upstream: bool, mode: &Mode) {
    let mut buf = vec![0u8; 65536];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        match mode.kind.load(Ordering::SeqCst) {
            1 => continue,
            2 if from_upstream => {
                thread::sleep(Duration::from_millis(mode.delay_ms.load(Ordering::SeqCst)))
            }
            _ => {}
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}
