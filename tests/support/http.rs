//! A tiny blocking HTTP/1.1 client (Connection: close) and Prometheus text helpers.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// `GET path` → (status, body). Panics on connection/parse errors.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    http_request(addr, "GET", path, &[], b"")
}

/// `POST path` with an empty body and an optional `Authorization: Bearer TOKEN`.
pub fn http_post(addr: &str, path: &str, bearer: Option<&str>) -> (u16, String) {
    let auth = bearer.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    http_request(addr, "POST", path, &headers, b"")
}

/// Generic request; returns (status, body as lossy UTF-8).
pub fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let (status, _headers, body) = http_request_full(addr, method, path, headers, body);
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Generic request returning (status, lower-cased headers, raw body).
pub fn http_request_full(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let sa = addr
        .to_socket_addrs()
        .unwrap_or_else(|e| panic!("resolve {addr}: {e}"))
        .next()
        .unwrap();
    let mut s = TcpStream::connect_timeout(&sa, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("HTTP connect to {addr} failed: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut raw_req = req.into_bytes();
    raw_req.extend_from_slice(body);
    s.write_all(&raw_req)
        .unwrap_or_else(|e| panic!("HTTP write to {addr} failed: {e}"));
    let mut raw = Vec::new();
    if let Err(e) = s.read_to_end(&mut raw)
        && raw.is_empty()
    {
        panic!("HTTP {method} {addr}{path}: read failed: {e}");
    }
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| {
            panic!(
                "HTTP {method} {addr}{path}: no header terminator in {:?}",
                String::from_utf8_lossy(&raw)
            )
        });
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("HTTP {method} {addr}{path}: bad status line {status_line:?}"));
    let hdrs: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[head_end + 4..].to_vec();
    let chunked = hdrs
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        body = dechunk(&body);
    } else if let Some(len) = hdrs
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
    {
        body.truncate(len);
    }
    (status, hdrs, body)
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size_str = String::from_utf8_lossy(&data[..eol]);
        let size =
            usize::from_str_radix(size_str.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        data = &data[eol + 2..];
        if size == 0 || data.len() < size {
            out.extend_from_slice(&data[..size.min(data.len())]);
            break;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[(size + 2).min(data.len())..];
    }
    out
}

/// One parsed Prometheus sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// Parse Prometheus text exposition format (comments skipped).
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, labels, rest) = if let Some(b) = line.find('{') {
            let Some(e) = line.rfind('}') else { continue };
            (&line[..b], parse_labels(&line[b + 1..e]), &line[e + 1..])
        } else {
            let Some((n, r)) = line.split_once(char::is_whitespace) else {
                continue;
            };
            (n, Vec::new(), r)
        };
        let Some(v) = rest.split_whitespace().next() else {
            continue;
        };
        let value = match v {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            _ => match v.parse::<f64>() {
                Ok(x) => x,
                Err(_) => continue,
            },
        };
        out.push(Sample {
            name: name.trim().to_string(),
            labels,
            value,
        });
    }
    out
}

fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while matches!(chars.peek(), Some(',') | Some(' ')) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if chars.next() != Some('=') || chars.next() != Some('"') {
            break;
        }
        let mut val = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => val.push('\n'),
                    Some(o) => val.push(o),
                    None => break,
                },
                '"' => break,
                o => val.push(o),
            }
        }
        out.push((key.trim().to_string(), val));
    }
    out
}

fn labels_match(sample: &Sample, want: &[(&str, &str)]) -> bool {
    want.iter()
        .all(|(k, v)| sample.labels.iter().any(|(sk, sv)| sk == k && sv == v))
}

/// Value of the first series named `name` whose labels include all of `labels`.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    parse_metrics(text)
        .into_iter()
        .find(|s| s.name == name && labels_match(s, labels))
        .map(|s| s.value)
}

/// Sum of all series named `name` whose labels include all of `labels`
/// (0.0 if there are none).
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    parse_metrics(text)
        .into_iter()
        .filter(|s| s.name == name && labels_match(s, labels))
        .map(|s| s.value)
        .fold(0.0, |a, b| a + b)
}

/// Whether any series (or HELP/TYPE line) mentions the metric family `name`.
pub fn metric_exists(text: &str, name: &str) -> bool {
    parse_metrics(text).iter().any(|s| {
        s.name == name
            || s.name
                .strip_prefix(name)
                .is_some_and(|r| matches!(r, "_total" | "_bucket" | "_sum" | "_count"))
    }) || text.lines().any(|l| {
        (l.starts_with("# TYPE ") || l.starts_with("# HELP "))
            && l.split_whitespace().nth(2) == Some(name)
    })
}
