//! `/faults`: fault injection drills. `GET` lists the active ones; `POST` (a JSON [`Spec`])
//! starts one and `DELETE` ends them all, with the admin token. Off unless
//! `[drills] enabled = true`: then every route answers 404 saying so.

use std::sync::Arc;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{Ops, refuse};
use crate::drill::{DrillError, Drills, Spec};
use crate::server::Server;

fn enabled(ops: &Ops) -> Result<&Drills, Box<Response>> {
    ops.drills.as_ref().ok_or_else(|| {
        Box::new(
            (
                StatusCode::NOT_FOUND,
                "fault injection drills are disabled: set [drills] enabled = true (drills need admin_token)\n",
            )
                .into_response(),
        )
    })
}

pub async fn list(Extension(ops): Extension<Ops>) -> Response {
    let drills = match enabled(&ops) {
        Ok(d) => d,
        Err(r) => return *r,
    };
    let list: Vec<_> = drills.list().iter().map(|d| d.view()).collect();
    super::json(json!({ "drills": list }))
}

pub async fn start(
    State(server): State<Arc<Server>>,
    Extension(ops): Extension<Ops>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let drills = match enabled(&ops) {
        Ok(d) => d,
        Err(r) => return *r,
    };
    if let Some(denied) = refuse(&server, &headers) {
        return denied;
    }
    let spec: Spec = match serde_json::from_slice(&body) {
        Ok(s) => s,
        Err(e) => {
            let msg = format!(
                "invalid drill: {e}; expected {{\"upstream\": \"<name>\", \"kind\": \"delay|error|refuse\", \
                 \"share\": 0.5, \"duration_ms\": 60000, \"delay_ms\": 200 (delay), \"reply\": \"-ERR ...\" (error)}}\n"
            );
            return (StatusCode::BAD_REQUEST, msg).into_response();
        }
    };
    let set = server.upstreams.load();
    let names: Vec<&str> = set.list.iter().map(|u| &*u.ctx.name).collect();
    match drills.add(spec, &names) {
        Ok(d) => (StatusCode::CREATED, super::json(d.view())).into_response(),
        Err(e @ DrillError::UnknownUpstream(_)) => {
            (StatusCode::NOT_FOUND, format!("{e}\n")).into_response()
        }
        Err(e @ DrillError::TooMany) => (StatusCode::CONFLICT, format!("{e}\n")).into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    }
}

pub async fn clear(
    State(server): State<Arc<Server>>,
    Extension(ops): Extension<Ops>,
    headers: HeaderMap,
) -> Response {
    let drills = match enabled(&ops) {
        Ok(d) => d,
        Err(r) => return *r,
    };
    if let Some(denied) = refuse(&server, &headers) {
        return denied;
    }
    super::json(json!({ "cleared": drills.clear() }))
}
