//! Advice from the fleet: what other instances' breakers said about the same upstream.
//!
//! Remote state is advice, never the only signal. Another instance may sit behind a broken
//! network path this one does not share, so its "open" must not silence a healthy upstream
//! here by itself; but it is strong evidence, and waiting for `consecutive_failures` local
//! failures (or for the next health probe) to confirm it wastes the time the fleet just
//! saved. So:
//!
//! * A remote "open" makes the local breaker *suspect* the upstream for the fleet window:
//!   the caller probes at once ([`AdviceEffect::Suspect`]), and while the suspicion lasts the
//!   first local failure trips ([`Reason::FleetAdvice`]), from client traffic or a probe.
//!   With a quorum configured, that many instances reporting open within the window open
//!   the breaker outright ([`Reason::FleetQuorum`]).
//! * A remote "closed" that is newer than this breaker's opening means the upstream answers
//!   someone again: an Open breaker starts probing now instead of waiting out its back-off
//!   ([`Reason::FleetRecovered`]). The probes still decide whether it closes.
//!
//! Only first-hand reports count: a transition caused by an operator (`manual`) or by the
//! fleet itself (a quorum opening) says nothing new about the upstream, and counting quorum
//! openings would let one instance's evidence echo around the fleet until it met any quorum.
//! Forced modes ignore advice; `MetricsOnly` follows it like `Normal`, as for every rule.
//!
//! Nothing here reads a clock: reports carry the instant they were made at (the sync layer
//! converts the remote wall-clock time), and every rule compares instants passed in.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{Breaker, FailureKind, Reason, State, Transition};

/// How the fleet's reports weigh, from `[fleet]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdvicePolicy {
    /// How long a remote "open" counts: toward the quorum, and as the suspicion that makes
    /// the first local failure trip.
    pub window: Duration,
    /// Other instances reporting open within `window` that open this breaker outright;
    /// `None`: never outright.
    pub quorum: Option<u32>,
}

/// One report from another instance about this upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Advice {
    /// Its breaker opened at `at`. `first_hand`: on its own evidence (not an operator's
    /// action, not a quorum of others).
    Opened {
        instance: Arc<str>,
        at: Instant,
        first_hand: bool,
    },
    /// Its breaker closed at `at`; `first_hand` when its own probes closed it.
    Closed {
        instance: Arc<str>,
        at: Instant,
        first_hand: bool,
    },
}

/// What a report did, for the caller's metrics and wake-ups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdviceEffect {
    /// No policy, stale, not first hand, or a forced mode: nothing.
    Ignored,
    /// Remembered (toward the quorum), no change now.
    Noted,
    /// Closed and now suspecting the upstream: probe at once.
    Suspect,
    /// The quorum opened the breaker.
    QuorumOpen,
    /// Open, and probing starts now.
    Recovered,
}

impl AdviceEffect {
    pub fn as_str(self) -> &'static str {
        match self {
            AdviceEffect::Ignored => "ignored",
            AdviceEffect::Noted => "noted",
            AdviceEffect::Suspect => "probe_now",
            AdviceEffect::QuorumOpen => "quorum_open",
            AdviceEffect::Recovered => "recovery_probe",
        }
    }

    /// Whether the health probe should run now rather than at its next tick. (A move to
    /// HalfOpen wakes it by itself.)
    pub fn probe_now(self) -> bool {
        self == AdviceEffect::Suspect
    }
}

/// The result of [`Breaker::advise`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Advised {
    pub effect: AdviceEffect,
    pub transition: Option<Transition>,
}

/// The fleet's view kept inside the machine.
#[derive(Debug, Default)]
pub(super) struct FleetView {
    policy: Option<AdvicePolicy>,
    /// Instances whose latest first-hand report is "open", with when it was made.
    open: Vec<(Arc<str>, Instant)>,
    /// While Closed and before this, the first local failure trips.
    suspect_until: Option<Instant>,
    /// When this breaker last opened: a remote recovery older than that is no news.
    opened_at: Option<Instant>,
}

impl FleetView {
    /// Called by every transition.
    pub(super) fn entered(&mut self, to: State, now: Instant) {
        match to {
            State::Open => self.opened_at = Some(now),
            // Local probes just proved the upstream healthy: newer than any report so far.
            State::Closed => self.suspect_until = None,
            State::HalfOpen => {}
        }
    }

    fn window(&self) -> Duration {
        self.policy.map_or(Duration::ZERO, |p| p.window)
    }

    /// Instances reporting open within the window at `now`.
    pub(super) fn open_reports(&self, now: Instant) -> u32 {
        let window = self.window();
        self.open
            .iter()
            .filter(|(_, at)| *at + window > now)
            .count() as u32
    }

    fn prune(&mut self, now: Instant) {
        let window = self.window();
        self.open.retain(|(_, at)| *at + window > now);
    }
}

impl Breaker {
    /// Enables advice (the fleet is configured). Without a policy every report is ignored.
    pub fn set_advice_policy(&mut self, policy: AdvicePolicy) {
        self.fleet.policy = Some(policy);
    }

    /// Takes one report from another instance; see the module docs for the rules.
    pub fn advise(&mut self, advice: Advice, now: Instant) -> Advised {
        self.init_clock(now);
        let ignored = Advised {
            effect: AdviceEffect::Ignored,
            transition: None,
        };
        let Some(policy) = self.fleet.policy else {
            return ignored;
        };
        match advice {
            Advice::Opened {
                instance,
                at,
                first_hand,
            } => {
                if !first_hand || at + policy.window <= now {
                    return ignored;
                }
                match self.fleet.open.iter_mut().find(|(i, _)| *i == instance) {
                    Some((_, seen)) => *seen = (*seen).max(at),
                    None => self.fleet.open.push((instance, at)),
                }
                self.fleet.prune(now);
                if self.state != State::Closed || !self.mode.evaluates() {
                    return Advised {
                        effect: AdviceEffect::Noted,
                        transition: None,
                    };
                }
                let until = at + policy.window;
                self.fleet.suspect_until =
                    Some(self.fleet.suspect_until.map_or(until, |u| u.max(until)));
                let instances = self.fleet.open.len() as u32;
                match policy.quorum {
                    Some(quorum) if instances >= quorum => {
                        self.maybe_reset_backoff(now);
                        let reason = Reason::FleetQuorum { instances, quorum };
                        Advised {
                            effect: AdviceEffect::QuorumOpen,
                            transition: Some(self.transition(State::Open, reason, now)),
                        }
                    }
                    _ => Advised {
                        effect: AdviceEffect::Suspect,
                        transition: None,
                    },
                }
            }
            Advice::Closed {
                instance,
                at,
                first_hand,
            } => {
                self.fleet.open.retain(|(i, _)| *i != instance);
                if self.fleet.open.is_empty() {
                    self.fleet.suspect_until = None;
                }
                let newer = self.fleet.opened_at.is_some_and(|o| at > o);
                // `open_until` is set only by the rules' own openings (not under ForceOpen).
                if first_hand
                    && newer
                    && self.state == State::Open
                    && self.mode.evaluates()
                    && self.open_until.is_some()
                {
                    return Advised {
                        effect: AdviceEffect::Recovered,
                        transition: Some(self.transition(
                            State::HalfOpen,
                            Reason::FleetRecovered,
                            now,
                        )),
                    };
                }
                Advised {
                    effect: if first_hand {
                        AdviceEffect::Noted
                    } else {
                        AdviceEffect::Ignored
                    },
                    transition: None,
                }
            }
        }
    }

    /// The reason a local failure of `kind` trips the breaker on the fleet's word, if the
    /// breaker suspects the upstream at `now`.
    pub(super) fn fleet_advice(&self, kind: FailureKind, now: Instant) -> Option<Reason> {
        let suspect = self.state == State::Closed
            && self.mode.evaluates()
            && self.fleet.suspect_until.is_some_and(|u| now < u);
        suspect.then(|| Reason::FleetAdvice {
            kind,
            instances: self.fleet.open_reports(now),
        })
    }
}

#[cfg(test)]
mod tests;
