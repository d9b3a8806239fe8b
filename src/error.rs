//! Errors that reach a client, each knowing where it came from, and the one function that
//! turns them into a RESP reply.
//!
//! Upstream errors are cloned to every request that was waiting on a broken connection, so
//! they hold `Arc<str>` rather than owned strings.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::resp::{ProtocolError, reply};

/// The reply to one request sent upstream: Redis's reply frame, or why there is none.
pub type Reply = Result<Bytes, UpstreamError>;

/// How a connection attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    /// Nothing listens there (or a firewall says so).
    Refused,
    /// Reset or aborted while connecting.
    Reset,
    /// No answer within the connect timeout (a black hole, a frozen host).
    Timeout,
    /// Anything else: unreachable network, a name that does not resolve ...
    Other,
}

impl ConnectFailure {
    pub fn of(e: &std::io::Error) -> ConnectFailure {
        use std::io::ErrorKind::*;
        match e.kind() {
            ConnectionRefused => ConnectFailure::Refused,
            ConnectionReset | ConnectionAborted | BrokenPipe => ConnectFailure::Reset,
            TimedOut => ConnectFailure::Timeout,
            _ => ConnectFailure::Other,
        }
    }
}

/// Why an upstream could not answer a request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// A connection could not be made.
    #[error("upstream '{upstream}' unavailable: {reason}")]
    Connect {
        upstream: Arc<str>,
        failure: ConnectFailure,
        reason: Arc<str>,
    },
    /// The connection is down and reconnecting, or it broke.
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
    /// The server stopped answering (a silent health probe opened the breaker) while the
    /// reply was pending: like a timeout, the command may still run when the server wakes,
    /// so the text says "timed out" and not "circuit open" (which promises it did not run).
    #[error(
        "upstream '{upstream}' timed out: it stopped answering (silent health probe); the command may still run"
    )]
    Silent { upstream: Arc<str> },
    /// The connection closed while the reply was pending.
    #[error("upstream '{upstream}' closed the connection with the reply pending")]
    Closed { upstream: Arc<str> },
    /// The upstream sent bytes that are not RESP.
    #[error("upstream '{upstream}' sent a malformed reply: {reason}")]
    Malformed {
        upstream: Arc<str>,
        reason: Arc<str>,
    },
    /// The upstream refused the credentials a connection was opened with (Redis's words).
    #[error("{reply}")]
    Auth { upstream: Arc<str>, reply: Arc<str> },
    /// Redis answered, and refused this one connection or its setup (`max number of
    /// clients reached`, a refused `SELECT`): up, but not for this (Redis's words).
    #[error("{reply}")]
    Refused { upstream: Arc<str>, reply: Arc<str> },
    /// The circuit breaker rejected the request without trying.
    #[error("upstream '{upstream}' unavailable (circuit open)")]
    CircuitOpen { upstream: Arc<str> },
    /// The circuit breaker rejected the request, and the upstream cannot work as configured
    /// (its address does not resolve, it refuses redfuse's credentials): degraded reads
    /// that miss say so rather than answer as if the key did not exist.
    #[error("upstream '{upstream}' unavailable (circuit open): misconfigured: {reason}")]
    Misconfigured {
        upstream: Arc<str>,
        reason: Arc<str>,
    },
    /// Too many requests are in flight or queued for this upstream.
    #[error("upstream '{upstream}' overloaded: too many requests in flight")]
    Overloaded { upstream: Arc<str> },
    /// The upstream failed a cacheable read (`cause`), and degraded mode answered it the
    /// moment the failure was known, before the effects of the requests behind it.
    #[error("{cause}")]
    Answered {
        answer: Bytes,
        cause: Box<UpstreamError>,
    },
}

impl UpstreamError {
    /// Whether the upstream could not answer at all (as opposed to answering "no"): only
    /// then may degraded mode answer instead. A refusal must reach the client in Redis's own
    /// words (`NOAUTH`, `WRONGPASS`, `max number of clients reached`).
    pub fn is_unavailability(&self) -> bool {
        match self {
            UpstreamError::Auth { .. } | UpstreamError::Refused { .. } => false,
            UpstreamError::Answered { cause, .. } => cause.is_unavailability(),
            _ => true,
        }
    }

    pub fn unavailable(upstream: &Arc<str>, reason: impl std::fmt::Display) -> UpstreamError {
        UpstreamError::Unavailable {
            upstream: upstream.clone(),
            reason: reason.to_string().into(),
        }
    }

    pub fn connect(upstream: &Arc<str>, e: &std::io::Error) -> UpstreamError {
        UpstreamError::Connect {
            upstream: upstream.clone(),
            failure: ConnectFailure::of(e),
            reason: e.to_string().into(),
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

/// The reply a client gets for an error: Redis's own text for protocol errors and for what
/// Redis itself refused, and a message naming redfuse (and the upstream) for everything
/// redfuse caused.
pub fn error_reply(err: &Error) -> Bytes {
    match err {
        Error::Client(e) => reply::error(&format!("ERR {e}")),
        // Redis's own words (`NOAUTH ...`, `WRONGPASS ...`, `ERR max number of clients
        // reached`): the client must see what it would see talking to Redis.
        Error::Upstream(UpstreamError::Auth { reply: text, .. })
        | Error::Upstream(UpstreamError::Refused { reply: text, .. }) => reply::error(text),
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
        let r = error_reply(
            &UpstreamError::CircuitOpen {
                upstream: up.clone(),
            }
            .into(),
        );
        assert_eq!(
            &r[..],
            b"-ERR redfuse: upstream 'primary' unavailable (circuit open)\r\n"
        );
        let refused = UpstreamError::Refused {
            upstream: up,
            reply: "ERR max number of clients reached".into(),
        };
        assert!(!refused.is_unavailability());
        assert_eq!(
            &error_reply(&refused.into())[..],
            b"-ERR max number of clients reached\r\n"
        );
    }

    #[test]
    fn connect_failures_are_told_apart() {
        use std::io::{Error as IoError, ErrorKind};
        let kind = |k| ConnectFailure::of(&IoError::from(k));
        assert_eq!(kind(ErrorKind::ConnectionRefused), ConnectFailure::Refused);
        assert_eq!(kind(ErrorKind::ConnectionReset), ConnectFailure::Reset);
        assert_eq!(kind(ErrorKind::TimedOut), ConnectFailure::Timeout);
        assert_eq!(kind(ErrorKind::NotFound), ConnectFailure::Other);
    }
}
