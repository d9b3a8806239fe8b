//! DNS discovery: an upstream given by a host name is resolved again on an interval
//! (`discovery.dns_interval_ms`) and as soon as an upstream's breaker opens (a connection
//! failure may mean the name points elsewhere now).
//!
//! A name that resolves to several addresses (a Kubernetes headless Service) becomes a
//! group: one replica per address, named `<name>@<address>`, with the declared priority
//! and weight, balanced by the read policy like any replicas. A primary is one server: it
//! takes the first address (a warning says the name gave more). Addresses that disappear
//! leave the set and are drained; a failed lookup keeps the addresses the name had.
//!
//! The resolver is injectable ([`Resolver`]) so the reconciliation is tested with names
//! that resolve to whatever a test needs.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use super::Discovery;
use crate::breaker::State;
use crate::config::{Role, UpstreamConfig};
use crate::upstream::set::Upstreams;

/// Resolves `host:port` to its addresses.
pub type Resolver = Arc<
    dyn Fn(String) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>>
        + Send
        + Sync,
>;

/// The system's resolver (`getaddrinfo`, `/etc/hosts` included).
pub fn system_resolver() -> Resolver {
    Arc::new(|host_port: String| {
        Box::pin(async move { Ok(tokio::net::lookup_host(host_port).await?.collect()) })
    })
}

/// A lookup that takes longer failed (its previous addresses stay).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// At most one lookup round per this long when failures trigger them.
const MIN_GAP: Duration = Duration::from_secs(1);
/// How often breakers are checked for a failure that should trigger a lookup.
const FAILURE_CHECK: Duration = Duration::from_millis(250);

/// Whether `addr` names a host rather than an IP address.
pub fn is_name(addr: &str) -> bool {
    addr.parse::<SocketAddr>().is_err()
}

/// The declared list with every resolved name replaced by its addresses.
pub fn expand(
    declared: &[UpstreamConfig],
    resolved: &HashMap<String, Vec<SocketAddr>>,
) -> Vec<UpstreamConfig> {
    let mut out = Vec::with_capacity(declared.len());
    for u in declared {
        let mut addrs = match resolved.get(&u.addr) {
            Some(a) if !a.is_empty() => a.clone(),
            // An IP address, or a name never resolved yet: as declared.
            _ => {
                out.push(u.clone());
                continue;
            }
        };
        addrs.sort();
        addrs.dedup();
        if u.role == Role::Primary || addrs.len() == 1 {
            let mut one = u.clone();
            one.addr = addrs[0].to_string();
            out.push(one);
            continue;
        }
        for a in addrs {
            let mut member = u.clone();
            member.addr = a.to_string();
            member.name = format!("{}@{a}", u.name);
            out.push(member);
        }
    }
    out
}

/// Resolves every name of the declared list and applies the result when it changed, on
/// the interval and after a breaker opened; until shutdown.
pub async fn run(
    discovery: Arc<Discovery>,
    upstreams: Upstreams,
    resolver: Resolver,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut known: HashMap<String, Vec<SocketAddr>> = HashMap::new();
    let mut applied: Option<HashMap<String, Vec<SocketAddr>>> = None;
    let mut next = Instant::now();
    let mut last_round: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = tokio::time::sleep(FAILURE_CHECK) => {
                let failing = upstreams.iter().any(|u| u.breaker.state() == State::Open);
                if !failing || last_round.is_some_and(|t| t.elapsed() < MIN_GAP) {
                    continue;
                }
            }
            _ = shutdown.changed() => return,
        }
        last_round = Some(Instant::now());
        next = Instant::now() + interval;
        let declared = discovery.declared();
        let names: Vec<String> = declared
            .iter()
            .map(|u| u.addr.clone())
            .filter(|a| is_name(a))
            .collect();
        known.retain(|k, _| names.contains(k));
        for name in names {
            match tokio::time::timeout(LOOKUP_TIMEOUT, resolver(name.clone())).await {
                Ok(Ok(addrs)) if !addrs.is_empty() => {
                    if declared
                        .iter()
                        .any(|u| u.addr == name && u.role == Role::Primary)
                        && addrs.len() > 1
                    {
                        warn!(name = %name, addresses = ?addrs, "the primary's name resolves to several addresses; using the first");
                    }
                    known.insert(name, addrs);
                }
                Ok(Ok(_)) => warn!(name = %name, "DNS gave no address; keeping the previous ones"),
                Ok(Err(e)) => {
                    warn!(name = %name, "DNS lookup failed, keeping the previous addresses: {e}")
                }
                Err(_) => {
                    warn!(name = %name, "DNS lookup timed out, keeping the previous addresses")
                }
            }
        }
        if applied.as_ref() == Some(&known) {
            continue;
        }
        match discovery.set_resolved(known.clone()).await {
            Ok(changes) => {
                if !changes.is_empty() {
                    info!(resolved = ?known, "DNS changed the upstream set");
                }
                applied = Some(known.clone());
            }
            Err(e) => warn!("DNS results not applied: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(name: &str, addr: &str, role: Role) -> UpstreamConfig {
        let mut u = UpstreamConfig::new(addr);
        u.name = name.into();
        u.role = role;
        u
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn names_become_their_addresses_and_several_make_a_group() {
        let declared = vec![
            up("main", "redis-0.redis:6379", Role::Primary),
            up("ro", "redis-ro:6379", Role::Replica),
            up("lit", "10.0.0.9:6379", Role::Replica),
        ];
        let mut resolved = HashMap::new();
        resolved.insert(
            "redis-0.redis:6379".to_owned(),
            vec![sa("10.0.0.1:6379"), sa("10.0.0.5:6379")],
        );
        resolved.insert(
            "redis-ro:6379".to_owned(),
            vec![sa("[::1]:6379"), sa("10.0.0.3:6379"), sa("10.0.0.2:6379")],
        );
        let list = expand(&declared, &resolved);
        let got: Vec<(&str, &str)> = list
            .iter()
            .map(|u| (u.name.as_str(), u.addr.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("main", "10.0.0.1:6379"),
                ("ro@10.0.0.2:6379", "10.0.0.2:6379"),
                ("ro@10.0.0.3:6379", "10.0.0.3:6379"),
                ("ro@[::1]:6379", "[::1]:6379"),
                ("lit", "10.0.0.9:6379"),
            ]
        );
        assert!(list.iter().skip(1).all(|u| u.role == Role::Replica));
        crate::upstream::set::validate(&list).unwrap();

        // An address that disappears leaves the list (the set then drains it); one name
        // still unresolved stays as declared.
        resolved.insert("redis-ro:6379".to_owned(), vec![sa("10.0.0.3:6379")]);
        resolved.remove("redis-0.redis:6379");
        let list = expand(&declared, &resolved);
        let got: Vec<(&str, &str)> = list
            .iter()
            .map(|u| (u.name.as_str(), u.addr.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("main", "redis-0.redis:6379"),
                ("ro", "10.0.0.3:6379"),
                ("lit", "10.0.0.9:6379"),
            ]
        );
    }

    #[test]
    fn only_names_are_looked_up() {
        assert!(is_name("localhost:6379"));
        assert!(is_name("redis.svc.cluster.local:6379"));
        assert!(!is_name("127.0.0.1:6379"));
        assert!(!is_name("[::1]:6379"));
    }
}
