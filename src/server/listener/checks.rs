//! Start-up checks for settings that only the running machine can judge: how many worker
//! threads make sense, whether the journal's place is usable (see
//! `WriteQueueConfig::check_journal_path`), whether upstream hosts resolve.
//!
//! Meant for `--check-config` and for the start of `main`: each returns a message naming
//! the field, like `Config`'s own validation.

use std::net::ToSocketAddrs;

use crate::config::{Config, UpstreamConfig};

/// Most worker threads accepted: far beyond any useful count, low enough that a typo
/// (`--threads 100000`) is an error rather than a process that spawns a hundred thousand.
pub const MAX_THREADS: usize = 1024;

/// `threads` (0: one per core). `Err` above [`MAX_THREADS`]; `Ok(Some(warning))` above
/// the number of cores, where extra workers only share cores and add cross-thread
/// wake-ups.
pub fn check_threads(threads: usize) -> Result<Option<String>, String> {
    if threads > MAX_THREADS {
        return Err(format!(
            "threads must be at most {MAX_THREADS}, got {threads}"
        ));
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads > cores {
        return Ok(Some(format!(
            "threads = {threads} is more than the {cores} cores available: the extra workers \
             share cores and add cross-thread wake-ups (1, the default, is usually fastest)"
        )));
    }
    Ok(None)
}

/// Resolves one upstream's address (blocking: DNS). The error names the upstream, its
/// address and what the resolver said.
pub fn check_upstream_resolves(upstream: &UpstreamConfig) -> Result<(), String> {
    let shown = if upstream.name.is_empty() || upstream.name == upstream.addr {
        format!("`{}`", upstream.addr)
    } else {
        format!("'{}' (`{}`)", upstream.name, upstream.addr)
    };
    match upstream.addr.to_socket_addrs() {
        Ok(mut addrs) => {
            if addrs.next().is_some() {
                Ok(())
            } else {
                Err(format!(
                    "upstreams.addr: upstream {shown} resolves to no address"
                ))
            }
        }
        Err(e) => Err(format!(
            "upstreams.addr: upstream {shown} does not resolve: {e}"
        )),
    }
}

/// Every upstream that does not resolve, one message each (empty: all resolve).
pub fn unresolved_upstreams(config: &Config) -> Vec<String> {
    config
        .upstreams
        .iter()
        .filter_map(|u| check_upstream_resolves(u).err())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(name: &str, addr: &str) -> UpstreamConfig {
        toml::from_str(&format!("name = \"{name}\"\naddr = \"{addr}\"")).expect("upstream")
    }

    #[test]
    fn threads_are_bounded_and_warned_about_above_the_cores() {
        assert_eq!(check_threads(0), Ok(None));
        assert_eq!(check_threads(1), Ok(None));
        let err = check_threads(MAX_THREADS + 1).unwrap_err();
        assert!(err.starts_with("threads must be at most 1024"), "{err}");
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let warning = check_threads(cores + 1).unwrap().expect("a warning");
        assert!(warning.contains("cores"), "{warning}");
        assert_eq!(check_threads(cores), Ok(None));
    }

    #[test]
    fn upstreams_that_do_not_resolve_are_named() {
        assert_eq!(
            check_upstream_resolves(&upstream("main", "127.0.0.1:6379")),
            Ok(())
        );
        assert_eq!(
            check_upstream_resolves(&upstream("", "localhost:6379")),
            Ok(())
        );
        // `.invalid` never resolves (RFC 2606).
        let err =
            check_upstream_resolves(&upstream("cache", "redis.nowhere.invalid:6379")).unwrap_err();
        assert!(err.starts_with("upstreams.addr: upstream 'cache'"), "{err}");
        assert!(err.contains("redis.nowhere.invalid:6379"), "{err}");
        assert!(err.contains("does not resolve"), "{err}");
        let err = check_upstream_resolves(&upstream("x", "no-port")).unwrap_err();
        assert!(err.contains("no-port"), "{err}");
    }
}
