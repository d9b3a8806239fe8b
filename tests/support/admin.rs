//! Admin-port helpers that speak JSON: the endpoints' bodies parsed, bearer tokens added.

use std::time::{SystemTime, UNIX_EPOCH};

use super::http::http_request;

/// `GET path` → the JSON body; panics unless 200 with JSON.
pub fn get_json(admin: &str, path: &str) -> serde_json::Value {
    let (status, body) = http_request(admin, "GET", path, &[], b"");
    assert_eq!(status, 200, "GET {path}: {status} {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

/// `method path` with an optional bearer token and JSON body → (status, body).
pub fn send(
    admin: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&serde_json::Value>,
) -> (u16, String) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers: Vec<(&str, &str)> = Vec::new();
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    let text = body.map(|b| b.to_string()).unwrap_or_default();
    if body.is_some() {
        headers.push(("Content-Type", "application/json"));
    }
    http_request(admin, method, path, &headers, text.as_bytes())
}

/// `GET /breakers`' entry of one upstream.
pub fn breaker(admin: &str, upstream: &str) -> serde_json::Value {
    get_json(admin, "/breakers")[upstream].clone()
}

/// Wall-clock now in ms since the Unix epoch (what redfuse stamps reports with).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
