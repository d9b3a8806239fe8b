//! The admin HTTP port: `/` (a status page for people), `/metrics`, `/healthz`, `/ready`,
//! `/breakers`, `/write-queue`, `/config`.
//!
//! `/ready` stays 200 while redfuse can serve, even with every upstream down (degraded mode
//! is still service), unless `ready_requires_upstream` is set: a Redis outage should not pull
//! every application pod out of its load balancer.
//!
//! [`http`] serves the router with a header-read timeout and a connection cap; [`status`]
//! renders the status page; [`fleet`] serves `/fleet` and the fleet-wide scope of breaker
//! actions; [`faults`] serves the drills (`/faults`).

pub mod faults;
pub mod fleet;
pub mod http;
pub mod status;

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::constant_time_eq;
use crate::server::Server;

/// What the admin port serves besides the [`Server`]: the optional subsystems.
#[derive(Clone, Default)]
pub struct Ops {
    pub fleet: Option<crate::fleet::Fleet>,
    /// `None` unless `[drills] enabled`.
    pub drills: Option<crate::drill::Drills>,
}

pub fn router(server: Arc<Server>, ops: Ops, sampler: Arc<status::Sampler>) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/config", get(config))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/breakers", get(breakers))
        .route("/breakers/{name}/{action}", post(breaker_action))
        .route("/write-queue", get(write_queue))
        .route("/write-queue/dead-letters", get(dead_letters))
        .route("/write-queue/dead-letters/drain", post(drain_dead_letters))
        .route("/fleet", get(fleet::status))
        .route(
            "/faults",
            get(faults::list).post(faults::start).delete(faults::clear),
        )
        .layer(Extension(sampler))
        .layer(Extension(ops))
        .with_state(server)
}

pub async fn serve(
    server: Arc<Server>,
    ops: Ops,
    listener: TcpListener,
    shutdown: watch::Receiver<bool>,
) {
    let sampler = Arc::new(status::Sampler::new());
    tokio::spawn(sampler.clone().run(server.clone(), shutdown.clone()));
    let rejected = prometheus::IntCounter::new(
        "redfuse_admin_connections_rejected_total",
        "Admin connections closed at once because admin_max_connections were being served",
    )
    .expect("a valid metric");
    let _ = server.metrics.registry.register(Box::new(rejected.clone()));
    let limits = http::Limits {
        header_timeout: server.config.admin_header_timeout,
        max_connections: server.config.admin_max_connections,
        rejected,
    };
    let app = router(server, ops, sampler);
    http::serve(app, listener, limits, shutdown).await;
}

async fn status_page(
    State(server): State<Arc<Server>>,
    Extension(sampler): Extension<Arc<status::Sampler>>,
) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        status::render(&server, &sampler),
    )
        .into_response()
}

/// The effective configuration as last (re)loaded, secrets redacted (as `--check-config`
/// prints it).
async fn config(State(server): State<Arc<Server>>) -> Response {
    json(server.current_config().effective_json())
}

async fn metrics(State(server): State<Arc<Server>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        server.metrics.render(),
    )
        .into_response()
}

fn upstream_states(server: &Server) -> serde_json::Value {
    let list: Vec<_> = server
        .upstreams
        .iter()
        .map(|u| {
            json!({
                "name": &*u.ctx.name,
                "addr": u.ctx.addr,
                "role": match u.ctx.role() { crate::config::Role::Primary => "primary", crate::config::Role::Replica => "replica" },
                "connected": u.is_connected(),
                "breaker": u.breaker.state().as_str(),
                // Up, but refusing redfuse's own credentials.
                "misconfigured": u.ctx.misconfigured(),
                "warm_dedicated_connections": u.warm_dedicated(),
                // Requests waiting on it, against `max_inflight_per_upstream`.
                "in_flight": u.inflight(),
            })
        })
        .collect();
    serde_json::Value::Array(list)
}

async fn ready(State(server): State<Arc<Server>>) -> Response {
    let upstreams = upstream_states(&server);
    let any_up = server.upstreams.iter().any(|u| u.is_connected());
    let ok = any_up || !server.config.ready_requires_upstream;
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({ "status": if ok { "ready" } else { "not ready" }, "upstreams": upstreams });
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn breakers(State(server): State<Arc<Server>>) -> Response {
    let map: serde_json::Map<String, serde_json::Value> = server
        .upstreams
        .iter()
        .map(|u| {
            (
                u.ctx.name.to_string(),
                serde_json::to_value(u.breaker.snapshot()).unwrap_or_default(),
            )
        })
        .collect();
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::Value::Object(map).to_string(),
    )
        .into_response()
}

/// Mutating endpoints need `admin_token`, presented as `Authorization: Bearer <token>`.
/// `None` when allowed, else the refusal to send.
pub(crate) fn refuse(server: &Server, headers: &HeaderMap) -> Option<Response> {
    let Some(token) = server.config.admin_token.as_deref() else {
        return Some(
            (
                StatusCode::FORBIDDEN,
                "mutating admin endpoints are disabled: set admin_token\n",
            )
                .into_response(),
        );
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if !presented.is_some_and(|p| constant_time_eq(p.as_bytes(), token.as_bytes())) {
        return Some((StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n").into_response());
    }
    None
}

pub(crate) fn json(body: serde_json::Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn write_queue(State(server): State<Arc<Server>>) -> Response {
    let q = &server.degrade.queue;
    json(json!({
        "depth": q.journal.len(),
        "writing": q.journal.writing(),
        "bytes": q.journal.bytes(),
        "replay_stalled": q.is_stalled(),
        "dead_letters": q.dead_letters().len(),
        "journal_path": q.journal.path().map(|p| p.display().to_string()),
    }))
}

async fn dead_letters(State(server): State<Arc<Server>>) -> Response {
    json(serde_json::to_value(server.degrade.queue.dead_letters()).unwrap_or_default())
}

async fn drain_dead_letters(State(server): State<Arc<Server>>, headers: HeaderMap) -> Response {
    if let Some(denied) = refuse(&server, &headers) {
        return denied;
    }
    let drained = server.degrade.queue.drain_dead_letters();
    json(json!({ "drained": drained }))
}

async fn breaker_action(
    State(server): State<Arc<Server>>,
    Extension(ops): Extension<Ops>,
    Path((name, action)): Path<(String, String)>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if let Some(denied) = refuse(&server, &headers) {
        return denied;
    }
    let scope = match fleet::Scope::of(&uri, &ops) {
        Ok(s) => s,
        Err(refused) => return *refused,
    };
    let Some(upstream) = server.upstreams.iter().find(|u| *u.ctx.name == *name) else {
        return (
            StatusCode::NOT_FOUND,
            format!("no upstream named '{name}'\n"),
        )
            .into_response();
    };
    let b = &upstream.breaker;
    let action = match action.parse::<crate::breaker::Action>() {
        Ok(a) => a,
        Err(msg) => return (StatusCode::BAD_REQUEST, format!("{msg}\n")).into_response(),
    };
    action.apply(b);
    let mut snap = serde_json::to_value(b.snapshot()).unwrap_or_default();
    if let fleet::Scope::Fleet(f) = scope {
        snap["fleet"] = fleet::broadcast(&f, &name, action).await;
    }
    (
        [(header::CONTENT_TYPE, "application/json")],
        snap.to_string(),
    )
        .into_response()
}
