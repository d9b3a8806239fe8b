//! What this instance last heard from each other instance, per upstream.
//!
//! A report arrives twice as a rule (on the channel, then again in every catch-up read of
//! the hash), and catch-up keeps re-reading it for as long as it stands: only news may reach
//! the breaker, or an old "open" would make it probe every few seconds forever.

use std::collections::BTreeMap;

use serde::Serialize;

use super::report::Report;

/// How a report arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    Channel,
    CatchUp,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Channel => "channel",
            Via::CatchUp => "catch_up",
        }
    }
}

/// The latest report of one instance, as shown by `GET /fleet`.
#[derive(Debug, Clone, Serialize)]
pub struct Heard {
    #[serde(flatten)]
    pub report: Report,
    /// When it arrived here, ms since the Unix epoch: minus `ts`, the propagation delay.
    pub received_unix_ms: u64,
    pub via: Via,
}

/// upstream -> instance -> latest report.
#[derive(Debug, Default)]
pub struct Peers {
    by_upstream: BTreeMap<String, BTreeMap<String, Heard>>,
}

impl Peers {
    /// Keeps `report` if it is news from `instance` about `upstream`; returns whether it was.
    pub fn note(
        &mut self,
        upstream: &str,
        instance: &str,
        report: &Report,
        received_unix_ms: u64,
        via: Via,
    ) -> bool {
        let instances = self.by_upstream.entry(upstream.to_owned()).or_default();
        if let Some(seen) = instances.get(instance)
            && !report.newer_than(&seen.report)
        {
            return false;
        }
        instances.insert(
            instance.to_owned(),
            Heard {
                report: report.clone(),
                received_unix_ms,
                via,
            },
        );
        true
    }

    /// Forgets reports older than `ttl_ms` (instances that went away: pods are replaced
    /// under new names, and this map must not grow with every one that ever existed).
    pub fn prune(&mut self, now_unix_ms: u64, ttl_ms: u64) {
        for instances in self.by_upstream.values_mut() {
            instances.retain(|_, h| now_unix_ms.saturating_sub(h.report.ts) <= ttl_ms);
        }
        self.by_upstream
            .retain(|_, instances| !instances.is_empty());
    }

    /// Everything heard, for `GET /fleet`.
    pub fn snapshot(&self) -> BTreeMap<String, BTreeMap<String, Heard>> {
        self.by_upstream.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::report::RemoteState;

    fn r(generation: u64, ts: u64) -> Report {
        Report {
            state: RemoteState::Open,
            from: RemoteState::Closed,
            generation,
            reason: "consecutive_failures".into(),
            ts,
        }
    }

    #[test]
    fn only_news_passes_whichever_way_it_came() {
        let mut p = Peers::default();
        assert!(p.note("primary", "a", &r(1, 100), 101, Via::Channel));
        assert!(
            !p.note("primary", "a", &r(1, 100), 2_000, Via::CatchUp),
            "the same, re-read"
        );
        assert!(
            !p.note("primary", "a", &r(0, 90), 2_001, Via::Channel),
            "older, late"
        );
        assert!(
            p.note("primary", "b", &r(1, 100), 102, Via::CatchUp),
            "another instance"
        );
        assert!(
            p.note("replica", "a", &r(1, 100), 102, Via::CatchUp),
            "another upstream"
        );
        assert!(p.note("primary", "a", &r(2, 150), 151, Via::CatchUp));
        let snap = p.snapshot();
        let heard = &snap["primary"]["a"];
        assert_eq!((heard.report.generation, heard.via), (2, Via::CatchUp));
        let json = serde_json::to_value(heard).unwrap();
        assert_eq!(json["state"], "open");
        assert_eq!(json["received_unix_ms"], 151);

        p.prune(1_120, 1_000);
        let snap = p.snapshot();
        assert_eq!(
            snap["primary"].keys().collect::<Vec<_>>(),
            ["a"],
            "b's is too old"
        );
        assert!(!snap.contains_key("replica"));
        p.prune(10_000, 1_000);
        assert!(p.snapshot().is_empty());
    }
}
