//! What a reply or an error says about an upstream's health.

use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::resp::ErrorCode;

/// Why a call counted as a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    ConnectRefused,
    ConnectReset,
    ConnectTimeout,
    /// The per-command timeout expired.
    CommandTimeout,
    /// The connection closed while replies were still pending.
    ConnectionClosed,
    MalformedReply,
    Loading,
    Busy,
    MasterDown,
    ClusterDown,
    TryAgain,
    /// `-READONLY` to a write.
    ReadOnly,
    /// `-OOM` to a write.
    Oom,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::ConnectRefused => "connect_refused",
            FailureKind::ConnectReset => "connect_reset",
            FailureKind::ConnectTimeout => "connect_timeout",
            FailureKind::CommandTimeout => "command_timeout",
            FailureKind::ConnectionClosed => "connection_closed",
            FailureKind::MalformedReply => "malformed_reply",
            FailureKind::Loading => "loading",
            FailureKind::Busy => "busy",
            FailureKind::MasterDown => "masterdown",
            FailureKind::ClusterDown => "clusterdown",
            FailureKind::TryAgain => "tryagain",
            FailureKind::ReadOnly => "readonly",
            FailureKind::Oom => "oom",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the breaker should treat an error reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyClass {
    /// A well-formed reply the upstream was healthy enough to produce.
    Success,
    /// The upstream is unavailable or degraded.
    Failure(FailureKind),
    /// `-NOAUTH`, `-WRONGPASS`, `-NOPERM`: a configuration problem, not an
    /// availability one. The caller counts and logs it loudly; for the breaker
    /// it is a success (see [`ReplyClass::outcome`]).
    AuthProblem,
}

impl ReplyClass {
    /// The breaker outcome for this reply. An auth problem is a well-formed,
    /// prompt reply, so it counts as a success: tripping the breaker would only
    /// hide the misconfiguration behind "upstream unavailable".
    pub fn outcome(self, latency: Duration) -> Outcome {
        match self {
            ReplyClass::Success | ReplyClass::AuthProblem => Outcome::Success { latency },
            ReplyClass::Failure(kind) => Outcome::Failure(kind),
        }
    }
}

/// Classifies a raw reply for the breaker, by its error code (see `resp::errcode`):
/// `-LOADING`, `-BUSY`, `-MASTERDOWN`, `-CLUSTERDOWN`, `-TRYAGAIN` (and `-READONLY`,
/// `-OOM` for writes) are failures, `-NOAUTH`/`-WRONGPASS`/`-NOPERM` an auth problem,
/// everything else (other errors included) a success. A blob error whose length header
/// cannot be parsed is a malformed reply.
pub fn classify_error_reply(reply: &[u8], is_write: bool) -> ReplyClass {
    use ErrorCode::*;
    match ErrorCode::of(reply) {
        Malformed => ReplyClass::Failure(FailureKind::MalformedReply),
        Loading => ReplyClass::Failure(FailureKind::Loading),
        Busy => ReplyClass::Failure(FailureKind::Busy),
        MasterDown => ReplyClass::Failure(FailureKind::MasterDown),
        ClusterDown => ReplyClass::Failure(FailureKind::ClusterDown),
        TryAgain => ReplyClass::Failure(FailureKind::TryAgain),
        ReadOnly if is_write => ReplyClass::Failure(FailureKind::ReadOnly),
        Oom if is_write => ReplyClass::Failure(FailureKind::Oom),
        NoAuth | WrongPass | NoPerm => ReplyClass::AuthProblem,
        _ => ReplyClass::Success,
    }
}

/// The result of an admitted call, as classified by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success {
        latency: Duration,
    },
    Failure(FailureKind),
    /// Neither success nor failure: client cancellation, blocking-command wait.
    Ignored,
}
