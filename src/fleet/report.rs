//! What instances tell each other, on the wire: JSON in the hash fields and on the channel.
//!
//! A hash `<prefix>:<upstream>` holds one field per instance (its latest transition) and
//! the field [`FLEET_FIELD`] (the latest fleet-wide action); the channel carries the same
//! records tagged with their kind, instance and upstream. JSON keeps them readable with
//! `redis-cli HGETALL` during an incident, which matters more than their size.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::breaker::{Advice, State, Transition};

/// The hash field of the latest fleet-wide action (instance ids cannot start with `@`).
pub const FLEET_FIELD: &str = "@fleet";

/// A breaker state as reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RemoteState {
    Closed,
    HalfOpen,
    Open,
}

impl From<State> for RemoteState {
    fn from(s: State) -> Self {
        match s {
            State::Closed => RemoteState::Closed,
            State::HalfOpen => RemoteState::HalfOpen,
            State::Open => RemoteState::Open,
        }
    }
}

/// One instance's latest transition for one upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub state: RemoteState,
    pub from: RemoteState,
    /// The reporting breaker's generation (it restarts from 0 with the process).
    pub generation: u64,
    /// The transition's reason label (`consecutive_failures`, `manual`, ...).
    pub reason: String,
    /// Wall-clock time of the transition, ms since the Unix epoch.
    pub ts: u64,
}

impl Report {
    pub fn of(t: &Transition, ts: u64) -> Report {
        Report {
            state: t.to.into(),
            from: t.from.into(),
            generation: t.generation,
            reason: t.reason.as_str().to_owned(),
            ts,
        }
    }

    /// Whether this report is news after `seen` (from the same instance): later, or as late
    /// with a higher generation. A restarted instance starts its generations over, with a
    /// later time.
    pub fn newer_than(&self, seen: &Report) -> bool {
        (self.ts, self.generation) > (seen.ts, seen.generation)
    }

    /// On the instance's own evidence: not an operator's action, not the fleet's quorum.
    pub fn first_hand(&self) -> bool {
        !matches!(self.reason.as_str(), "manual" | "fleet_quorum")
    }

    /// The report as advice for the local breaker, given the wall clock and the monotonic
    /// clock read together. `None` for what advice does not use (half-open) and for reports
    /// older than the monotonic clock can express.
    pub fn advice(&self, instance: &str, now_unix_ms: u64, now: Instant) -> Option<Advice> {
        // A clock ahead of ours makes a report look future; it is then as fresh as can be.
        let age = Duration::from_millis(now_unix_ms.saturating_sub(self.ts));
        let at = now.checked_sub(age)?;
        let instance = instance.into();
        let first_hand = self.first_hand();
        match self.state {
            RemoteState::Open => Some(Advice::Opened {
                instance,
                at,
                first_hand,
            }),
            RemoteState::Closed => Some(Advice::Closed {
                instance,
                at,
                first_hand,
            }),
            RemoteState::HalfOpen => None,
        }
    }
}

/// A fleet-wide breaker action set through the admin port (`?scope=fleet`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// `force-open`, `force-closed`, `disabled`, `metrics-only`, `normal` or `reset`.
    pub action: String,
    /// The instance whose admin port it was set on.
    pub instance: String,
    pub ts: u64,
}

/// A message on the channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Message {
    State {
        instance: String,
        upstream: String,
        #[serde(flatten)]
        report: Report,
    },
    Command {
        upstream: String,
        #[serde(flatten)]
        command: Command,
    },
}

impl Message {
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn decode(text: &[u8]) -> Result<Message, serde_json::Error> {
        serde_json::from_slice(text)
    }
}

/// Wall-clock now, ms since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(state: RemoteState, reason: &str, generation: u64, ts: u64) -> Report {
        Report {
            state,
            from: RemoteState::Closed,
            generation,
            reason: reason.into(),
            ts,
        }
    }

    #[test]
    fn messages_round_trip_and_read_well() {
        let m = Message::State {
            instance: "pod-a".into(),
            upstream: "primary".into(),
            report: report(
                RemoteState::Open,
                "consecutive_failures",
                3,
                1_700_000_000_000,
            ),
        };
        let text = m.encode();
        assert_eq!(
            text,
            r#"{"kind":"state","instance":"pod-a","upstream":"primary","state":"open","from":"closed","generation":3,"reason":"consecutive_failures","ts":1700000000000}"#
        );
        assert_eq!(Message::decode(text.as_bytes()).unwrap(), m);
        let c = Message::Command {
            upstream: "primary".into(),
            command: Command {
                action: "force-open".into(),
                instance: "pod-a".into(),
                ts: 5,
            },
        };
        assert_eq!(Message::decode(c.encode().as_bytes()).unwrap(), c);
        assert!(Message::decode(b"{\"kind\":\"gossip\"}").is_err());
    }

    #[test]
    fn newer_is_later_or_a_higher_generation_at_the_same_time() {
        let a = report(RemoteState::Open, "x", 5, 100);
        assert!(
            report(RemoteState::Open, "x", 1, 101).newer_than(&a),
            "restarted later"
        );
        assert!(report(RemoteState::Open, "x", 6, 100).newer_than(&a));
        assert!(
            !report(RemoteState::Open, "x", 5, 100).newer_than(&a),
            "the same"
        );
        assert!(!report(RemoteState::Open, "x", 9, 99).newer_than(&a));
    }

    #[tokio::test(start_paused = true)]
    async fn advice_dates_the_report_on_the_local_clock() {
        let now = Instant::now() + Duration::from_secs(60);
        let r = report(RemoteState::Open, "health_probe", 1, 10_000);
        match r.advice("a", 10_250, now) {
            Some(Advice::Opened {
                at,
                first_hand: true,
                ..
            }) => assert_eq!(now - at, Duration::from_millis(250)),
            other => panic!("{other:?}"),
        }
        match r.advice("a", 9_000, now) {
            Some(Advice::Opened { at, .. }) => assert_eq!(at, now, "a clock ahead of ours"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            report(RemoteState::Open, "fleet_quorum", 1, 10_000).advice("a", 10_000, now),
            Some(Advice::Opened {
                first_hand: false,
                ..
            })
        ));
        assert!(matches!(
            report(RemoteState::Closed, "manual", 1, 10_000).advice("a", 10_000, now),
            Some(Advice::Closed {
                first_hand: false,
                ..
            })
        ));
        assert_eq!(
            report(RemoteState::HalfOpen, "open_timeout", 1, 1).advice("a", 1, now),
            None
        );
    }
}
