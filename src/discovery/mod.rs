//! Where the upstream list comes from at run time: the configuration (and its reloads), a
//! watched file ([`file`]), DNS ([`dns`]) and Redis Sentinel ([`sentinel`]).
//!
//! # Design
//!
//! Every source feeds one [`Discovery`], which composes them into one list and hands it to
//! the set's single reconciliation API (`upstream::set::Manager::apply`): no source touches
//! upstreams itself, so draining, breaker generations and probing behave the same whatever
//! changed the list. Composition, in order: the configuration's `[[upstreams]]`; replaced
//! by the watched file's list when there is one; replaced by what Sentinel reports when a
//! Sentinel group is configured; then every upstream given by a host name is expanded to
//! the addresses DNS last gave for it (when DNS discovery is on). A source that cannot be
//! read, or gives an invalid list, keeps its previous contribution: a bad file or a DNS
//! outage never empties the set.

pub mod dns;
pub mod file;
pub mod sentinel;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::config::UpstreamConfig;
use crate::upstream::set::{Applied, Manager, SetError};

/// The contributions of every source.
#[derive(Default)]
struct Sources {
    config: Vec<UpstreamConfig>,
    file: Option<Vec<UpstreamConfig>>,
    sentinel: Option<Vec<UpstreamConfig>>,
    /// `host:port` -> the addresses it resolved to last (DNS discovery on).
    resolved: Option<HashMap<String, Vec<SocketAddr>>>,
}

/// Composes the sources and applies the result.
pub struct Discovery {
    manager: Arc<Manager>,
    sources: Mutex<Sources>,
    /// One composition and application at a time, in the order they were asked for.
    applying: tokio::sync::Mutex<()>,
}

impl Discovery {
    pub fn new(manager: Arc<Manager>, config: Vec<UpstreamConfig>) -> Arc<Discovery> {
        Arc::new(Discovery {
            manager,
            sources: Mutex::new(Sources {
                config,
                ..Sources::default()
            }),
            applying: tokio::sync::Mutex::new(()),
        })
    }

    pub fn manager(&self) -> &Arc<Manager> {
        &self.manager
    }

    fn sources(&self) -> std::sync::MutexGuard<'_, Sources> {
        self.sources.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The list before DNS expansion: the configuration's, the file's or Sentinel's.
    pub fn declared(&self) -> Vec<UpstreamConfig> {
        let s = self.sources();
        s.sentinel
            .clone()
            .or_else(|| s.file.clone())
            .unwrap_or_else(|| s.config.clone())
    }

    /// The configuration's list (at start and after a reload).
    pub async fn set_config(&self, list: Vec<UpstreamConfig>) -> Result<Applied, SetError> {
        crate::upstream::set::validate(&list)?;
        self.update(|s| s.config = list).await
    }

    /// The watched file's list (validated by the caller).
    pub async fn set_file(&self, list: Vec<UpstreamConfig>) -> Result<Applied, SetError> {
        crate::upstream::set::validate(&list)?;
        self.update(|s| s.file = Some(list)).await
    }

    /// What Sentinel reports for its group.
    pub async fn set_sentinel(&self, list: Vec<UpstreamConfig>) -> Result<Applied, SetError> {
        crate::upstream::set::validate(&list)?;
        self.update(|s| s.sentinel = Some(list)).await
    }

    /// What DNS gave for each `host:port` (DNS discovery on).
    pub async fn set_resolved(
        &self,
        resolved: HashMap<String, Vec<SocketAddr>>,
    ) -> Result<Applied, SetError> {
        self.update(|s| s.resolved = Some(resolved)).await
    }

    async fn update(&self, change: impl FnOnce(&mut Sources)) -> Result<Applied, SetError> {
        let _one = self.applying.lock().await;
        let list = {
            let mut s = self.sources();
            let before = (
                s.config.clone(),
                s.file.clone(),
                s.sentinel.clone(),
                s.resolved.clone(),
            );
            change(&mut s);
            let declared = s
                .sentinel
                .clone()
                .or_else(|| s.file.clone())
                .unwrap_or_else(|| s.config.clone());
            let list = match &s.resolved {
                Some(resolved) => dns::expand(&declared, resolved),
                None => declared,
            };
            if let Err(e) = crate::upstream::set::validate(&list) {
                (s.config, s.file, s.sentinel, s.resolved) = before;
                return Err(e);
            }
            list
        };
        self.manager.apply(&list).await
    }
}
