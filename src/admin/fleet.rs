//! `GET /fleet` and `?scope=fleet` on breaker actions.

use axum::Extension;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::Ops;
use crate::breaker::Action;
use crate::fleet::Fleet;

/// Where a breaker action applies.
pub enum Scope {
    Local,
    /// Here, then published to every instance.
    Fleet(Fleet),
}

impl Scope {
    /// `?scope=local` (the default) or `?scope=fleet`; the refusal to send otherwise.
    pub fn of(uri: &Uri, ops: &Ops) -> Result<Scope, Box<Response>> {
        let scope = uri
            .query()
            .unwrap_or("")
            .split('&')
            .find_map(|kv| kv.strip_prefix("scope="));
        match scope {
            None | Some("local") => Ok(Scope::Local),
            Some("fleet") => match &ops.fleet {
                Some(f) => Ok(Scope::Fleet(f.clone())),
                None => Err(Box::new(
                    (
                        StatusCode::BAD_REQUEST,
                        "scope=fleet needs breaker state sharing: set [fleet] enabled = true\n",
                    )
                        .into_response(),
                )),
            },
            Some(other) => Err(Box::new(
                (
                    StatusCode::BAD_REQUEST,
                    format!("unknown scope '{other}': use local or fleet\n"),
                )
                    .into_response(),
            )),
        }
    }
}

/// Publishes an action applied here; what the response says about the fleet.
pub async fn broadcast(fleet: &Fleet, upstream: &str, action: Action) -> serde_json::Value {
    match fleet.broadcast(upstream, action).await {
        Ok(receivers) => json!({ "published": true, "receivers": receivers }),
        Err(e) => json!({ "published": false, "error": e.to_string() }),
    }
}

pub async fn status(Extension(ops): Extension<Ops>) -> Response {
    let body = match &ops.fleet {
        Some(f) => f.status_json(),
        None => json!({ "enabled": false }),
    };
    super::json(body)
}
