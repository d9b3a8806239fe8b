//! Shared integration-test harness for redfuse.
//!
//! Every integration test file does `mod support;` and uses what it needs:
//! - [`RedisServer`]: a real `redis-server` on an ephemeral port.
//! - [`Redfuse`]: the binary under test, started on ephemeral ports.
//! - [`RawClient`] + [`resp_cmd`]: byte-exact RESP2/RESP3 client.
//! - [`Load`]: client tasks (the `redis` crate) looping `SET`/`GET` and checking every answer.
//! - [`sentinel::Sentinels`]: `redis-server --sentinel` processes monitoring a master.
//! - [`FaultRelay`]: TCP relay with switchable faults, to put between redfuse and Redis.
//! - [`http_get`] / [`http_post`] + [`metric_value`] / [`metric_sum`]: admin endpoint helpers;
//!   [`admin`]: the same with JSON bodies and bearer tokens.
#![allow(dead_code, unused_imports)]

pub mod acl;
pub mod admin;
pub mod client;
pub mod faults;
pub mod http;
pub mod load;
pub mod procs;
pub mod relay;
pub mod resp;
pub mod sentinel;
pub mod tls;

pub use client::{RawClient, ReadError};
pub use http::{
    Sample, http_get, http_post, http_request, http_request_full, metric_exists, metric_sum,
    metric_value, parse_metrics,
};
pub use load::{Load, Tally};
pub use procs::{
    LogLines, Redfuse, RedisServer, TempDir, eventually, free_port, log_field, redfuse_bin,
    run_redfuse, wait_until,
};
pub use relay::{FaultMode, FaultRelay};
pub use resp::{Resp, bulk, esc, frame_len, parse_resp, resp_cmd, split_frames};

use std::time::Duration;

/// Shorthand for `Duration::from_millis`.
pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Shorthand for `Duration::from_secs`.
pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// A fresh redis-server and a redfuse in front of it, started with `extra` flags.
pub fn setup(extra: &[&str]) -> (RedisServer, Redfuse) {
    let redis = RedisServer::start();
    let rf = Redfuse::start(&redis.addr(), extra);
    (redis, rf)
}

/// redfuse on ephemeral ports with everything else from a config file.
pub fn start_with_config(path: &std::path::Path) -> Redfuse {
    let args: Vec<String> = [
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--config",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(std::iter::once(path.to_string_lossy().into_owned()))
    .collect();
    Redfuse::spawn_args(&args, &[]).unwrap_or_else(|e| panic!("{e}"))
}

/// Byte-exact frame comparison with a readable failure message.
#[track_caller]
pub fn assert_frame(got: &[u8], want: &[u8], what: &str) {
    assert!(
        got == want,
        "{what}: expected {} but got {}",
        esc(want),
        esc(got)
    );
}
