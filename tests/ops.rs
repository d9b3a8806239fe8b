//! Operating redfuse: configuration from the environment and URLs, `--check-config` and
//! `GET /config` (the same effective configuration, secrets redacted), the status page
//! (HTML over HTTP and a headless Chromium screenshot while an upstream is down), the admin
//! port's header timeout and connection cap, the metrics operators expect, and the README's
//! configuration reference (generated from the code's key list).

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use support::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

// ---------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------

#[test]
fn check_config_and_get_config_show_the_same_effective_configuration_without_secrets() {
    let redis = RedisServer::start_with(&["--requirepass", "up-secret"]);
    let dir = TempDir::new("ops-config");
    let file = dir.write(
        "redfuse.toml",
        "admin_token = \"file-token-secret\"\n\
         [breaker]\nconsecutive_failures = 7\n\
         [[users]]\nname = \"alice\"\npassword = \"alice-secret\"\n",
    );
    let upstream = format!("redis://:up-secret@{}", redis.addr());
    let flags = [
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--upstream",
        &upstream,
        "--requirepass",
        "client-secret",
        "--config",
        &file.to_string_lossy(),
    ];
    let env = [
        ("REDFUSE_CACHE__MAX_BYTES", "1048576"),
        ("REDFUSE_BREAKER__WINDOW_MS", "20000"),
        (
            "REDFUSE_FAIL_OPEN__RULES",
            "[{commands=[\"INCR\"], keys=[\"c:*\"], action=\"queue\", reply=\":0\"}]",
        ),
    ];

    // --check-config with the same flags and environment validates and prints it.
    let mut check = vec!["--check-config"];
    check.extend_from_slice(&flags);
    let o = run_redfuse(&check, &env, secs(10));
    assert!(o.status.success(), "{}", stderr(&o));
    let printed = stdout(&o);
    let printed_toml: toml::Table =
        toml::from_str(&printed).unwrap_or_else(|e| panic!("{e}:\n{printed}"));

    // The running process serves the same configuration on /config.
    let rf = Redfuse::spawn_args(&args(&flags), &env).unwrap();
    let (status, body) = http_get(&rf.admin_addr(), "/config");
    assert_eq!(status, 200, "{body}");
    let served: serde_json::Value = serde_json::from_str(&body).unwrap();
    let printed_json = serde_json::to_value(&printed_toml).unwrap();
    assert_eq!(served, printed_json, "/config vs --check-config");

    for secret in [
        "up-secret",
        "file-token-secret",
        "alice-secret",
        "client-secret",
    ] {
        assert!(
            !printed.contains(secret),
            "--check-config prints {secret}:\n{printed}"
        );
        assert!(!body.contains(secret), "/config serves {secret}: {body}");
    }
    assert!(!rf.logs_text().contains("up-secret"), "{}", rf.logs_text());
    assert_eq!(served["password"], "<redacted>");
    assert_eq!(served["requirepass"], "<redacted>");
    assert_eq!(served["admin_token"], "<redacted>");
    assert_eq!(served["users"][0]["password"], "<redacted>");
    // Flags, environment and file all show, over the defaults.
    assert_eq!(served["upstreams"][0]["addr"], redis.addr().as_str());
    assert_eq!(served["breaker"]["consecutive_failures"], 7);
    assert_eq!(served["breaker"]["window_ms"], 20000);
    assert_eq!(served["cache"]["max_bytes"], 1048576);
    assert_eq!(served["fail_open"]["rules"][0]["action"], "queue");
    assert_eq!(served["write_queue"]["fsync"], "everysec");

    // The URL's password is what redfuse authenticates with.
    let mut c = rf.client();
    assert_frame(&c.cmd(&["AUTH", "client-secret"]), b"+OK\r\n", "AUTH");
    let mut last = Vec::new();
    assert!(
        wait_until(secs(10), || {
            last = c.cmd(&["SET", "k", "v"]);
            last == b"+OK\r\n"
        }),
        "SET through a redis:// URL with a password: {}",
        esc(&last)
    );
}

#[test]
fn an_acl_user_and_percent_encoded_password_in_the_upstream_url() {
    let redis = RedisServer::start();
    assert_frame(
        &redis.cmd(&["ACL", "SETUSER", "app", "on", ">p@ss:w/rd", "~*", "+@all"]),
        b"+OK\r\n",
        "ACL SETUSER",
    );
    let url = format!("redis://app:p%40ss%3Aw%2Frd@{}/0", redis.addr());
    let rf = Redfuse::start(&url, &[]);
    let mut c = rf.client();
    let mut last = Vec::new();
    assert!(
        wait_until(secs(10), || {
            last = c.cmd(&["ACL", "WHOAMI"]);
            last == b"$3\r\napp\r\n"
        }),
        "ACL WHOAMI through redfuse: {}",
        esc(&last)
    );
    assert!(!rf.logs_text().contains("p@ss"), "{}", rf.logs_text());
}

#[test]
fn bad_environment_and_fields_are_each_named_with_exit_code_2() {
    let o = run_redfuse(
        &["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
        &[
            ("REDFUSE_BREAKER__CONSECUTIVE_FAILUERS", "3"),
            ("REDFUSE_CACHE__MAX_BYTES", "lots"),
        ],
        secs(10),
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("REDFUSE_BREAKER__CONSECUTIVE_FAILUERS"),
        "{err}"
    );
    assert!(
        err.contains("REDFUSE_BREAKER__CONSECUTIVE_FAILURES?"),
        "{err}"
    );
    assert!(err.contains("REDFUSE_CACHE__MAX_BYTES"), "{err}");

    // Several bad fields at once: every one is named.
    let dir = TempDir::new("ops-bad");
    let file = dir.write(
        "bad.toml",
        "max_clients = 0\nlog_level = \"loud[\"\n[breaker]\nbucket_ms = 0\n",
    );
    let o = run_redfuse(
        &[
            "--check-config",
            &file.to_string_lossy(),
            "--command-timeout-ms",
            "0",
        ],
        &[],
        secs(10),
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    for field in ["max_clients", "log_level", "breaker", "command_timeout_ms"] {
        assert!(
            err.contains(&format!("`{field}`")),
            "{field} not named:\n{err}"
        );
    }

    // A database other than 0 in the URL is refused rather than ignored.
    let o = run_redfuse(
        &["--check-config", "--upstream", "redis://h:1/5"],
        &[],
        secs(10),
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("database 5"), "{}", stderr(&o));
}

#[test]
fn readme_configuration_reference_is_generated_from_the_code() {
    let start = "<!-- configuration-reference:start -->";
    let end = "<!-- configuration-reference:end -->";
    let path = repo().join("README.md");
    let readme = std::fs::read_to_string(&path).unwrap();
    let (Some(a), Some(b)) = (readme.find(start), readme.find(end)) else {
        panic!("README.md lacks the {start} ... {end} markers");
    };
    let section = &readme[a..b];
    let table_start = section
        .find("| key |")
        .expect("no reference table in the section");
    let table_len = section[table_start..]
        .lines()
        .take_while(|l| l.starts_with('|'))
        .map(|l| l.len() + 1)
        .sum::<usize>();
    let have = &section[table_start..table_start + table_len];
    let want = redfuse::config::keys::reference_table();
    if std::env::var_os("UPDATE_README").is_some() {
        let at = a + table_start;
        let updated = format!("{}{want}{}", &readme[..at], &readme[at + table_len..]);
        std::fs::write(&path, updated).unwrap();
        return;
    }
    assert!(
        have == want,
        "README.md's configuration reference is out of date: run \
         `UPDATE_README=1 cargo test --test ops readme` and commit README.md"
    );
    // Every key the code knows is a row; every row is a key the code knows.
    let rows: Vec<&str> = have
        .lines()
        .filter(|l| l.starts_with("| `"))
        .filter_map(|l| l.split('`').nth(1))
        .collect();
    let keys: Vec<&str> = redfuse::config::keys::KEYS.iter().map(|k| k.path).collect();
    assert_eq!(rows, keys);
    assert!(
        readme[b..].contains("## Layout"),
        "the reference goes before ## Layout"
    );
    assert!(
        section.contains("docs/status-page.png"),
        "the status page screenshot"
    );
}

// ---------------------------------------------------------------------------------------
// Admin port
// ---------------------------------------------------------------------------------------

/// Raises this process's open-file limit (the flood below needs thousands of sockets).
fn raise_fd_limit(want: u64) {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on a struct owned here.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < want {
            l.rlim_cur = want.min(l.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

/// Whether the server closed the connection before `deadline`.
fn closed_by(s: &mut TcpStream, deadline: Instant) -> bool {
    let mut buf = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let _ = s.set_read_timeout(Some(left));
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn admin_port_closes_half_sent_requests_and_caps_connections() {
    raise_fd_limit(8192);
    let (_redis, rf) = setup(&[]);
    let admin = rf.admin_addr();

    // One connection that stops half-way through its headers is closed after the header
    // timeout (5 s by default), not kept forever.
    let started = Instant::now();
    let mut one = TcpStream::connect(&admin).unwrap();
    one.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    assert!(
        closed_by(&mut one, started + secs(9)),
        "half-sent request kept open"
    );
    let took = started.elapsed();
    assert!(
        took >= ms(4500),
        "closed after {took:?}, before the header timeout"
    );

    // 3,000 of them at once, from 8 threads: the first 64 are served until the timeout,
    // the rest are closed as soon as they are accepted, and all are gone within seconds.
    let started = Instant::now();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let admin = admin.clone();
            std::thread::spawn(move || {
                let mut socks = Vec::with_capacity(375);
                for _ in 0..375 {
                    match TcpStream::connect(&admin) {
                        Ok(mut s) => {
                            let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ");
                            socks.push(s);
                        }
                        // Closed so fast that the connect raced the close: fine.
                        Err(e) => assert!(
                            matches!(
                                e.kind(),
                                std::io::ErrorKind::ConnectionReset
                                    | std::io::ErrorKind::ConnectionRefused
                            ),
                            "connect: {e}"
                        ),
                    }
                }
                socks
            })
        })
        .collect();
    let mut flood: Vec<TcpStream> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let connected = started.elapsed();
    // Every connection is closed within the header timeout (5 s) of the last one opening.
    let deadline = Instant::now() + secs(8);
    let open = flood
        .iter_mut()
        .map(|s| closed_by(s, deadline))
        .filter(|closed| !closed)
        .count();
    let took = started.elapsed();
    assert_eq!(
        open,
        0,
        "{open} of {} half-sent requests still open after {took:?} (connecting took {connected:?})",
        flood.len()
    );
    assert!(took < secs(25), "the flood took {took:?} to clear");
    eprintln!("3000 half-sent requests: connected in {connected:?}, all closed after {took:?}");
    drop(flood);

    // The admin port serves again, and counted what it refused.
    let mut m = String::new();
    assert!(
        wait_until(secs(5), || {
            let (status, body) = http_get(&admin, "/metrics");
            m = body;
            status == 200
        }),
        "admin port unusable after the flood"
    );
    let rejected = metric_sum(&m, "redfuse_admin_connections_rejected_total", &[]);
    assert!(rejected >= 2000.0, "rejected {rejected}:\n{m}");
    // And its own descriptors went back down.
    let fds = metric_sum(&m, "redfuse_process_open_fds", &[]);
    assert!(
        fds < 200.0,
        "redfuse holds {fds} descriptors after the flood"
    );
}

#[test]
fn metrics_operators_expect_in_a_live_scrape() {
    let (redis, rf) = setup(&["--connect-timeout-ms", "200"]);
    let mut c = rf.client();
    assert_frame(&c.cmd(&["SET", "k", "v"]), b"+OK\r\n", "SET");
    c.cmd(&["GET", "k"]);
    c.cmd(&["NOSUCHCOMMAND"]);
    drop(redis);
    for _ in 0..10 {
        c.cmd(&["GET", "k"]);
    }
    let text = rf.metrics();
    // TYPE lines: counters end in _total, nothing else does; every name is redfuse_.
    let mut types = std::collections::BTreeMap::new();
    for l in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut w = l.split_whitespace().skip(2);
        let (name, kind) = (w.next().unwrap(), w.next().unwrap());
        assert!(name.starts_with("redfuse_"), "{l}");
        assert_eq!(
            kind == "counter",
            name.ends_with("_total"),
            "{name} is a {kind}: only counters end in _total"
        );
        types.insert(name.to_owned(), kind.to_owned());
    }
    for (name, kind) in [
        ("redfuse_build_info", "gauge"),
        ("redfuse_process_resident_memory_bytes", "gauge"),
        ("redfuse_process_open_fds", "gauge"),
        ("redfuse_process_cpu_seconds_total", "counter"),
        ("redfuse_breaker_state", "gauge"),
    ] {
        assert_eq!(types.get(name).map(String::as_str), Some(kind), "{name}");
    }
    let info = parse_metrics(&text)
        .into_iter()
        .find(|s| s.name == "redfuse_build_info")
        .unwrap();
    let label = |k: &str| info.labels.iter().find(|(n, _)| n == k).unwrap().1.clone();
    assert_eq!(label("version"), env!("CARGO_PKG_VERSION"));
    let commit = label("commit");
    assert!(
        commit == "unknown" || (commit.len() >= 7 && commit.chars().all(|c| c.is_ascii_hexdigit())),
        "commit label {commit:?}"
    );
    assert!(metric_sum(&text, "redfuse_process_resident_memory_bytes", &[]) > 1e6);
}

// ---------------------------------------------------------------------------------------
// Status page
// ---------------------------------------------------------------------------------------

/// The `<tr>` of one upstream in the status page.
fn upstream_row<'a>(html: &'a str, name: &str) -> &'a str {
    let at = html
        .find(&format!("data-upstream=\"{name}\""))
        .unwrap_or_else(|| panic!("no row for {name}:\n{html}"));
    let end = html[at..].find("</tr>").unwrap() + at;
    &html[at..end]
}

/// Width and height from a PNG's IHDR chunk.
fn png_size(data: &[u8]) -> (u32, u32) {
    assert!(data.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert_eq!(&data[12..16], b"IHDR");
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    (be(&data[16..20]), be(&data[20..24]))
}

fn chromium() -> String {
    for c in ["chromium", "chromium-browser", "google-chrome"] {
        if Command::new(c)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            return c.to_owned();
        }
    }
    panic!("headless Chromium is needed: run scripts/install-deps.sh (apt-get install chromium)");
}

/// A headless Chromium screenshot of `url` into `out`, bounded in time.
fn screenshot(url: &str, out: &Path, profile: &Path) {
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--screenshot={}", out.display()))
        .arg("--window-size=1200,900")
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn chromium");
    let deadline = Instant::now() + secs(90);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "chromium exited with {status}");
            return;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium took longer than 90 s");
        }
        std::thread::sleep(ms(50));
    }
}

#[test]
fn status_page_shows_a_downed_upstream_open() {
    let mut primary = RedisServer::start();
    let port = primary.port().to_string();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port]);
    let dir = TempDir::new("ops-status");
    let config = dir.write(
        "redfuse.toml",
        &format!(
            "health_probe_interval_ms = 200\n\
             [[upstreams]]\nname = \"primary\"\naddr = \"{}\"\n\
             [[upstreams]]\nname = \"replica-1\"\naddr = \"{}\"\nrole = \"replica\"\n\
             [breaker]\nconsecutive_failures = 2\nopen_base_ms = 60000\n\
             [[fail_open.rules]]\nname = \"counters\"\ncommands = [\"INCR\"]\nkeys = [\"counter:*\"]\naction = \"queue\"\nreply = \":0\"\n",
            primary.addr(),
            replica.addr()
        ),
    );
    let rf = start_with_config(&config);
    let admin = rf.admin_addr();
    let mut c = rf.client();
    for i in 0..40 {
        let key = format!("user:{i}");
        assert_frame(&c.cmd(&["SET", &key, "alice"]), b"+OK\r\n", "SET");
        assert_frame(&c.cmd(&["GET", &key]), b"$5\r\nalice\r\n", "GET");
    }
    eventually("the replica has the data", secs(10), || {
        replica.cmd(&["GET", "user:39"]) == b"$5\r\nalice\r\n"
    });
    let (status, html) = http_get(&admin, "/");
    assert_eq!(status, 200);
    assert!(upstream_row(&html, "primary").contains("data-state=\"closed\""));

    // The primary goes down: its breaker opens, reads fail over to the replica, counters
    // queue.
    primary.kill();
    eventually("the primary's breaker opens", secs(15), || {
        let (_, body) = http_get(&admin, "/breakers");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["primary"]["state"] == "open"
    });
    for i in 0..20 {
        assert_frame(
            &c.cmd(&["GET", &format!("user:{i}")]),
            b"$5\r\nalice\r\n",
            "GET from the replica",
        );
        assert_frame(
            &c.cmd(&["INCR", "counter:visits"]),
            b":0\r\n",
            "queued INCR",
        );
    }
    std::thread::sleep(ms(1500)); // a rate sample or two

    let (status, headers, body) = http_request_full(&admin, "GET", "/", &[], b"");
    assert_eq!(status, 200);
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "content-type" && v.starts_with("text/html")),
        "{headers:?}"
    );
    let html = String::from_utf8(body).unwrap();
    // Self-contained and self-refreshing.
    assert!(
        html.contains("http-equiv=\"refresh\" content=\"2\""),
        "{html}"
    );
    assert!(
        !html.contains("src=\"http") && !html.contains("href=\"http"),
        "external asset"
    );
    let row = upstream_row(&html, "primary");
    assert!(
        row.contains("data-state=\"open\"") && row.contains(">open<"),
        "the downed primary is not shown open: {row}"
    );
    assert!(upstream_row(&html, "replica-1").contains("data-state=\"closed\""));
    assert!(
        html.contains("consecutive_failures") || html.contains("health_probe"),
        "no transition shown:\n{html}"
    );
    assert!(
        html.contains("id=\"queue-depth\">20<"),
        "write queue depth:\n{html}"
    );
    assert!(html.contains("waiting for the primary"), "{html}");
    assert!(html.contains("id=\"cache-entries\">"), "cache:\n{html}");
    assert!(html.contains("id=\"hit-rate\">"), "cache hit rate:\n{html}");

    // What a person sees: a headless Chromium screenshot of the page.
    let shot = dir.path().join("status.png");
    let profile = TempDir::new("chromium");
    screenshot(&format!("http://{admin}/"), &shot, profile.path());
    let png = std::fs::read(&shot).expect("no screenshot written");
    assert_eq!(png_size(&png), (1200, 900));
    assert!(
        png.len() > 20_000,
        "a near-empty screenshot: {} bytes",
        png.len()
    );
    if std::env::var_os("UPDATE_DOCS").is_some() {
        std::fs::create_dir_all(repo().join("docs")).unwrap();
        std::fs::copy(&shot, repo().join("docs/status-page.png")).unwrap();
    }
}
