//! File discovery: a watched file (JSON, or TOML for any other extension) lists the
//! upstreams with priority and weight, and replaces the configuration's list. It is
//! checked every second; a change is parsed and validated in full, then applied through
//! the set's reconciliation. Invalid content is logged, naming the file and the problem,
//! and the previous list stays.
//!
//! ```json
//! {"upstreams": [{"name": "main", "addr": "10.0.0.1:6379", "role": "primary"},
//!                {"name": "r1", "addr": "10.0.0.2:6379", "role": "replica", "priority": 1, "weight": 2}]}
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;
use tracing::{error, info};

use super::Discovery;
use crate::config::{Role, UpstreamConfig};
use crate::upstream::set::{SetError, validate};

/// How often the file is checked.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamsFile {
    upstreams: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    #[serde(default)]
    name: String,
    addr: String,
    #[serde(default)]
    role: Role,
    #[serde(default)]
    priority: u32,
    #[serde(default = "one")]
    weight: u32,
}

fn one() -> u32 {
    1
}

/// Why the file's contents were refused.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read upstream file {path} (`discovery.file`): {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid upstream file {path} (`discovery.file`): {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid upstream file {path} (`discovery.file`): {source}")]
    Invalid { path: PathBuf, source: SetError },
}

/// The upstreams the file lists, validated.
pub fn parse(path: &Path, text: &str) -> Result<Vec<UpstreamConfig>, FileError> {
    let parse_error = |message: String| FileError::Parse {
        path: path.to_owned(),
        message: message.trim().replace('\n', " "),
    };
    let file: UpstreamsFile = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(text).map_err(|e| parse_error(e.to_string()))?
    } else {
        toml::from_str(text).map_err(|e| parse_error(e.to_string()))?
    };
    let list: Vec<UpstreamConfig> = file
        .upstreams
        .into_iter()
        .map(|e| {
            let mut u = UpstreamConfig::new(&e.addr);
            if !e.name.is_empty() {
                u.name = e.name;
            }
            u.role = e.role;
            u.priority = e.priority;
            u.weight = e.weight;
            u
        })
        .collect();
    validate(&list).map_err(|source| FileError::Invalid {
        path: path.to_owned(),
        source,
    })?;
    Ok(list)
}

/// Reads and parses the file.
pub fn load(path: &Path) -> Result<Vec<UpstreamConfig>, FileError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text)
}

/// Applies the file's list whenever its contents change, until shutdown. `seen` is the
/// content already applied (at start).
pub async fn run(
    discovery: Arc<Discovery>,
    path: PathBuf,
    mut seen: Option<Vec<u8>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
            _ = shutdown.changed() => return,
        }
        let Ok(now) = tokio::fs::read(&path).await else {
            // Replaced at this moment, or gone: the list stays as it is.
            continue;
        };
        if seen.as_deref() == Some(&now[..]) {
            continue;
        }
        seen = Some(now.clone());
        let text = String::from_utf8_lossy(&now);
        match parse(&path, &text) {
            Ok(list) => match discovery.set_file(list).await {
                Ok(changes) => info!(path = %path.display(), ?changes, "upstream file applied"),
                Err(e) => {
                    error!(path = %path.display(), "upstream file not applied, keeping the previous list: {e}")
                }
            },
            Err(e) => error!("{e}; keeping the previous upstream list"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_toml_files_list_upstreams_with_priority_and_weight() {
        let json = r#"{"upstreams": [{"name": "main", "addr": "h:1"},
            {"name": "r", "addr": "h:2", "role": "replica", "priority": 2, "weight": 3}]}"#;
        let list = parse(Path::new("u.json"), json).unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(
            (list[1].role, list[1].priority, list[1].weight),
            (Role::Replica, 2, 3)
        );
        let toml = "[[upstreams]]\naddr = \"h:1\"\n";
        let list = parse(Path::new("u.toml"), toml).unwrap();
        assert_eq!(list[0].name, "h:1");
    }

    #[test]
    fn invalid_files_are_refused_naming_the_problem() {
        let e = parse(Path::new("u.json"), "{\"upstreams\": [{\"adr\": \"h:1\"}]}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("adr") && e.contains("discovery.file"), "{e}");
        let e = parse(
            Path::new("u.json"),
            r#"{"upstreams": [{"addr": "h:1"}, {"addr": "h:2"}]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("exactly one primary"), "{e}");
        assert!(parse(Path::new("u.json"), "{\"upstreams\": []}").is_err());
    }
}
