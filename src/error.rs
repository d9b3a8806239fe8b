//! Errors that reach a client, each knowing where it came from, and the one function that
//! turns them into a RESP reply.
//!
//! Upstream errors are cloned to every request that was waiting on a broken connection, so
//! they hold `Arc<str>` rather than owned strings.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::protocol::{ProtocolError, reply};

/// Why an upstream could not answer a request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// Could not connect, or the connection is down and reconnecting.
    #[error("upstream '{upstream}' unavailable: {reason}")]
    Unavailable {
        upstream: Arc<str>,
        reason: Arc<str>,
    },
    /// The per-command deadline passed; the connection is reset because a FIFO pipeline
    /// cannot skip a reply.
    #[error("upstream '{upstream}' timed out after {} ms", timeout.as_millis())]
    Timeout {
        upstream: Arc<str>,
        timeout: Duration,
    },
    /// The connection closed while the reply was pending.
    #[error("upstream '{upstream}' closed the connection with the reply pending")]
    Closed { upstream: Arc<str> },
    /// The upstream sent bytes that are not RESP.
    #[error("upstream '{upstream}' sent a malformed reply: {reason}")]
    Malformed {
        upstream: Arc<str>,
        reason: Arc<str>,
    },
    /// The upstream refused redfuse's own credentials (the raw error reply is kept).
    #[error("upstream '{upstream}' rejected redfuse's credentials: {reply}")]
    Auth { upstream: Arc<str>, reply: Arc<str> },
    /// The circuit breaker rejected the request without trying.
    #[error("upstream '{upstream}' unavailable (circuit open)")]
    CircuitOpen { upstream: Arc<str> },
    /// Too many requests are in flight or queued for this upstream.
    #[error("upstream '{upstream}' overloaded: too many requests in flight")]
    Overloaded { upstream: Arc<str> },
}

impl UpstreamError {
    /// Whether the upstream could not answer at all (as opposed to answering "no"): only then
    /// may degraded mode answer instead. An auth failure must reach the client as Redis's own
    /// `NOAUTH`/`WRONGPASS`, or it could never authenticate.
    pub fn is_unavailability(&self) -> bool {
        !matches!(self, UpstreamError::Auth { .. })
    }

    pub fn unavailable(upstream: &Arc<str>, reason: impl std::fmt::Display) -> UpstreamError {
        UpstreamError::Unavailable {
            upstream: upstream.clone(),
            reason: reason.to_string().into(),
        }
    }
}

/// Anything that ends in an error reply to a client.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The client sent something malformed; the connection is closed after the reply.
    #[error(transparent)]
    Client(#[from] ProtocolError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// A bug or resource problem inside redfuse.
    #[error("internal error: {0}")]
    Internal(Arc<str>),
}

/// The reply a client gets for an error: Redis's own text for protocol errors, and a message
/// naming redfuse (and the upstream) for everything redfuse caused.
pub fn error_reply(err: &Error) -> Bytes {
    match err {
        Error::Client(e) => reply::error(&format!("ERR {e}")),
        // Redis's own words (`NOAUTH ...`, `WRONGPASS ...`): the client must see what it would
        // see talking to Redis, so it can authenticate.
        Error::Upstream(UpstreamError::Auth { reply: text, .. }) => reply::error(text),
        other => reply::error(&format!("ERR redfuse: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_name_the_source() {
        let up: Arc<str> = "primary".into();
        let r = error_reply(&UpstreamError::unavailable(&up, "connection refused").into());
        assert_eq!(
            &r[..],
            b"-ERR redfuse: upstream 'primary' unavailable: connection refused\r\n"
        );
        let r = error_reply(&Error::Client(ProtocolError("invalid bulk length".into())));
        assert_eq!(&r[..], b"-ERR Protocol error: invalid bulk length\r\n");
        let r = error_reply(&UpstreamError::CircuitOpen { upstream: up }.into());
        assert_eq!(
            &r[..],
            b"-ERR redfuse: upstream 'primary' unavailable (circuit open)\r\n"
        );
    }
}
