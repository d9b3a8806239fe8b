//! TLS to upstreams against a real `redis-server --port 0 --tls-port <p>` with certificates
//! made here (rcgen): commands over TLS on every kind of connection, a wrong CA, client
//! certificates (`--tls-auth-clients yes`), and `rediss://` never falling back to plain text.

mod support;

use support::tls::{Pki, TlsRedis};
use support::*;

fn path(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Retries a command until it answers `want` (the first connections are being made).
fn eventually_answers(rf: &Redfuse, args: &[&str], want: &[u8]) {
    let mut c = rf.client();
    let mut last = Vec::new();
    let ok = wait_until(secs(10), || {
        last = c.cmd(args);
        last == want
    });
    assert!(ok, "{args:?}: expected {}, got {}", esc(want), esc(&last));
}

#[test]
fn commands_flow_over_tls_on_shared_dedicated_and_tunnelled_connections() {
    let pki = Pki::new();
    let redis = TlsRedis::start(&pki, false);
    let url = format!("rediss://localhost:{}", redis.port);
    let ca = path(&pki.ca);
    let rf = Redfuse::start(&url, &["--tls-ca-cert-file", &ca]);

    eventually_answers(&rf, &["SET", "k", "v"], b"+OK\r\n");
    let mut c = rf.client();
    assert_frame(&c.cmd(&["GET", "k"]), b"$1\r\nv\r\n", "GET over TLS");

    // Large values and a deep pipeline: TLS records are flushed, none held back.
    let big = "x".repeat(1 << 20);
    assert_frame(&c.cmd(&["SET", "big", &big]), b"+OK\r\n", "SET 1 MiB");
    let got = c.cmd(&["GET", "big"]);
    assert!(
        got == format!("${}\r\n{big}\r\n", big.len()).as_bytes(),
        "GET 1 MiB over TLS: {} bytes",
        got.len()
    );
    let mut pipeline = Vec::new();
    for i in 0..500 {
        pipeline.extend(resp_cmd(&["INCR", "counter"]));
        pipeline.extend(resp_cmd(&["GET", &format!("missing{i}")]));
    }
    c.send(&pipeline);
    for i in 0..500 {
        assert_frame(
            &c.read_frame(),
            format!(":{}\r\n", i + 1).as_bytes(),
            "INCR",
        );
        assert_frame(&c.read_frame(), b"$-1\r\n", "GET missing");
    }

    // A transaction and a blocking command run on dedicated connections.
    assert_frame(&c.cmd(&["MULTI"]), b"+OK\r\n", "MULTI");
    assert_frame(&c.cmd(&["SET", "t", "1"]), b"+QUEUED\r\n", "queued");
    assert_frame(&c.cmd(&["EXEC"]), b"*1\r\n+OK\r\n", "EXEC");
    assert_frame(&c.cmd(&["RPUSH", "q", "a"]), b":1\r\n", "RPUSH");
    assert_frame(
        &c.cmd(&["BLPOP", "q", "1"]),
        b"*2\r\n$1\r\nq\r\n$1\r\na\r\n",
        "BLPOP over TLS",
    );

    // Pub/sub turns the client's connection into a raw pipe to Redis.
    let mut sub = rf.client();
    assert_frame(
        &sub.cmd(&["SUBSCRIBE", "news"]),
        b"*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n",
        "SUBSCRIBE over TLS",
    );
    assert_frame(&c.cmd(&["PUBLISH", "news", "hi"]), b":1\r\n", "PUBLISH");
    assert_frame(
        &sub.read_frame(),
        b"*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$2\r\nhi\r\n",
        "message through the TLS tunnel",
    );

    // The upstream is named by host:port, and shows as connected.
    let (status, body) = http_get(&rf.admin_addr(), "/ready");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"connected\":true"), "{body}");
    assert!(
        body.contains(&format!("localhost:{}", redis.port)),
        "{body}"
    );
}

#[test]
fn an_ip_address_upstream_with_the_tls_flag_and_a_client_certificate() {
    let pki = Pki::new();
    let redis = TlsRedis::start(&pki, true);
    let addr = format!("127.0.0.1:{}", redis.port);
    let ca = path(&pki.ca);

    // Without a client certificate Redis refuses the handshake: a clear error, no data.
    let rf = Redfuse::start(
        &addr,
        &[
            "--tls",
            "--tls-ca-cert-file",
            &ca,
            "--connect-timeout-ms",
            "1000",
        ],
    );
    let mut c = rf.client();
    let reply = c.cmd(&["SET", "k", "v"]);
    assert!(
        reply.starts_with(b"-ERR redfuse: upstream"),
        "SET without a client certificate: {}",
        esc(&reply)
    );
    assert!(
        rf.wait_for_log("requires a client certificate", secs(10)),
        "no TLS handshake error naming the client certificate logged:\n{}",
        rf.logs_text()
    );
    drop(rf);

    // With --tls-cert-file/--tls-key-file it works.
    let rf = Redfuse::start(
        &addr,
        &[
            "--tls",
            "--tls-ca-cert-file",
            &ca,
            "--tls-cert-file",
            &path(&pki.client_cert),
            "--tls-key-file",
            &path(&pki.client_key),
        ],
    );
    eventually_answers(&rf, &["SET", "k", "v"], b"+OK\r\n");
    assert_frame(&rf.client().cmd(&["GET", "k"]), b"$1\r\nv\r\n", "GET");
}

#[test]
fn a_wrong_ca_fails_with_a_clear_error() {
    let pki = Pki::new();
    let redis = TlsRedis::start(&pki, false);
    let url = format!("rediss://localhost:{}", redis.port);
    let rf = Redfuse::start(
        &url,
        &[
            "--tls-ca-cert-file",
            &path(&pki.other_ca),
            "--connect-timeout-ms",
            "1000",
        ],
    );
    let mut c = rf.client();
    let reply = String::from_utf8_lossy(&c.cmd(&["SET", "k", "v"])).into_owned();
    assert!(reply.starts_with("-ERR redfuse: upstream"), "{reply}");
    assert!(
        reply.contains("TLS handshake") && reply.contains("certificate"),
        "the error should say the certificate was not trusted: {reply}"
    );
    assert!(
        rf.wait_for_log("tls_ca_cert_file", secs(10)),
        "the log should point at tls_ca_cert_file:\n{}",
        rf.logs_text()
    );
    let log = rf.logs_text();
    assert!(
        log.contains("UnknownIssuer") || log.contains("unknown issuer"),
        "{log}"
    );
    // Once the failed handshakes have opened the breaker, a client is still told why,
    // not just "circuit open".
    assert!(
        rf.wait_for_log("closed -> open", secs(10)),
        "the breaker should open:\n{}",
        rf.logs_text()
    );
    let reply = String::from_utf8_lossy(&c.cmd(&["SET", "k", "v"])).into_owned();
    assert!(
        reply.contains("TLS handshake") && reply.contains("certificate"),
        "with the breaker open: {reply}"
    );
}

#[test]
fn rediss_never_falls_back_to_plain_text() {
    // A plain Redis behind a rediss:// address: the handshake fails, nothing is sent.
    let redis = RedisServer::start();
    let url = format!("rediss://127.0.0.1:{}", redis.port());
    let pki = Pki::new();
    let rf = Redfuse::start(
        &url,
        &[
            "--tls-ca-cert-file",
            &path(&pki.ca),
            "--connect-timeout-ms",
            "1000",
        ],
    );
    let mut c = rf.client();
    for _ in 0..3 {
        let reply = c.cmd(&["SET", "leak", "v"]);
        assert!(
            reply.starts_with(b"-ERR redfuse: upstream"),
            "SET to a plain server behind rediss://: {}",
            esc(&reply)
        );
    }
    assert!(
        rf.wait_for_log("TLS handshake", secs(10)),
        "{}",
        rf.logs_text()
    );
    assert_frame(
        &redis.cmd(&["GET", "leak"]),
        b"$-1\r\n",
        "nothing reached the plain server",
    );
    let (status, body) = http_get(&rf.admin_addr(), "/ready");
    assert_eq!(status, 200);
    assert!(body.contains("\"connected\":false"), "{body}");
}

#[test]
fn tls_settings_are_checked_naming_the_field() {
    let pki = Pki::new();
    let ca = path(&pki.ca);
    let missing = path(&pki.dir.path().join("missing.crt"));
    let check = |args: &[&str]| {
        let mut all = vec!["--check-config"];
        all.extend_from_slice(args);
        run_redfuse(&all, &[], secs(10))
    };
    for (args, field) in [
        (
            vec!["--upstream", "rediss://h:1", "--tls-ca-cert-file", &missing],
            "tls_ca_cert_file",
        ),
        (
            vec![
                "--upstream",
                "rediss://h:1",
                "--tls-ca-cert-file",
                &path(&pki.server_key),
            ],
            "tls_ca_cert_file",
        ),
        (
            vec![
                "--upstream",
                "rediss://h:1",
                "--tls-ca-cert-file",
                &ca,
                "--tls-cert-file",
                &path(&pki.client_cert),
            ],
            "tls_key_file",
        ),
        // TLS settings without a TLS upstream would connect in plain text.
        (
            vec!["--upstream", "h:1", "--tls-ca-cert-file", &ca],
            "tls_ca_cert_file",
        ),
        (vec!["--upstream", "redis://h:1/2"], "upstream"),
    ] {
        let o = check(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?} accepted: {err}");
        assert!(err.contains(field), "{args:?} should name `{field}`: {err}");
    }
    let o = check(&[
        "--upstream",
        "rediss://app:s3cret@h:1",
        "--tls-ca-cert-file",
        &ca,
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("tls = true"), "{out}");
    assert!(out.contains("addr = \"h:1\""), "{out}");
    assert!(out.contains("username = \"app\""), "{out}");
    assert!(!out.contains("s3cret"), "the password is printed: {out}");
}
