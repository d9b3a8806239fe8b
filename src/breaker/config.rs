//! Breaker settings, `[breaker]` in the config file.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::machine::Mode;

/// Breaker configuration. Deserializes from snake_case fields; every field is
/// optional (missing ones take the default) and unknown fields are rejected so
/// a typo is not silently ignored. Durations are integer milliseconds in
/// fields named `*_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Initial mode. [`Breaker::reset`] always returns to `Normal`.
    pub mode: Mode,
    /// Consecutive failures that open the breaker (default 5).
    pub consecutive_failures: u32,
    /// Failure rate in (0, 1] over the window that opens it (default 0.5).
    pub failure_rate_threshold: f64,
    /// Slow-call rate in (0, 1] over the window that opens it (default 0.8).
    pub slow_call_rate_threshold: f64,
    /// A success strictly slower than this is a slow call (default 250).
    pub slow_call_threshold_ms: u64,
    /// Calls the window must hold before the rates are judged (default 20).
    pub minimum_calls: u32,
    /// Rolling window length (default 10000).
    pub window_ms: u64,
    /// Window bucket length; must divide `window_ms` (default 1000).
    pub bucket_ms: u64,
    /// First open duration (default 5000).
    pub open_base_ms: u64,
    /// Cap of the doubling open duration, before jitter (default 60000).
    pub open_max_ms: u64,
    /// Extra random fraction in [0, jitter] added to each open duration
    /// (default 0.2).
    pub jitter: f64,
    /// Concurrent probes admitted in HalfOpen (default 3).
    pub half_open_permits: u32,
    /// Probe successes that close the breaker (default 3).
    pub success_threshold: u32,
    /// Longest HalfOpen may last before re-opening; set it to the command
    /// timeout (default 5000).
    pub half_open_max_wait_ms: u64,
    /// Health probes failing in a row that open a Closed breaker (default 1): a frozen or
    /// black-holed Redis answers nothing, so client traffic alone may take a command timeout
    /// per failure to notice.
    pub probe_failures_to_open: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            mode: Mode::Normal,
            consecutive_failures: 5,
            failure_rate_threshold: 0.5,
            slow_call_rate_threshold: 0.8,
            slow_call_threshold_ms: 250,
            minimum_calls: 20,
            window_ms: 10_000,
            bucket_ms: 1_000,
            open_base_ms: 5_000,
            open_max_ms: 60_000,
            jitter: 0.2,
            half_open_permits: 3,
            success_threshold: 3,
            half_open_max_wait_ms: 5_000,
            probe_failures_to_open: 1,
        }
    }
}

/// Upper bound for every `*_ms` field: keeps `Instant + Duration` far from
/// overflow (which panics) whatever the back-off arithmetic does.
const MAX_DURATION_MS: u64 = 86_400_000;
/// Bounds the memory and the rotation work of one window.
const MAX_BUCKETS: u64 = 1_000;

impl BreakerConfig {
    /// Checks every field; the error names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        fn at_least_one(field: &str, v: u64) -> Result<(), String> {
            if v == 0 {
                return Err(format!("{field} must be at least 1, got 0"));
            }
            Ok(())
        }
        fn duration(field: &str, v: u64) -> Result<(), String> {
            at_least_one(field, v)?;
            if v > MAX_DURATION_MS {
                return Err(format!(
                    "{field} must be at most {MAX_DURATION_MS} (one day), got {v}"
                ));
            }
            Ok(())
        }
        fn rate(field: &str, v: f64) -> Result<(), String> {
            if !(v > 0.0 && v <= 1.0) {
                return Err(format!("{field} must be in (0, 1], got {v}"));
            }
            Ok(())
        }
        at_least_one("consecutive_failures", self.consecutive_failures.into())?;
        rate("failure_rate_threshold", self.failure_rate_threshold)?;
        rate("slow_call_rate_threshold", self.slow_call_rate_threshold)?;
        duration("slow_call_threshold_ms", self.slow_call_threshold_ms)?;
        at_least_one("minimum_calls", self.minimum_calls.into())?;
        duration("window_ms", self.window_ms)?;
        duration("bucket_ms", self.bucket_ms)?;
        if self.bucket_ms > self.window_ms || !self.window_ms.is_multiple_of(self.bucket_ms) {
            return Err(format!(
                "bucket_ms must divide window_ms ({}), got {}",
                self.window_ms, self.bucket_ms
            ));
        }
        if self.window_ms / self.bucket_ms > MAX_BUCKETS {
            return Err(format!(
                "bucket_ms too small: window_ms / bucket_ms must be at most {MAX_BUCKETS}, got {}",
                self.window_ms / self.bucket_ms
            ));
        }
        duration("open_base_ms", self.open_base_ms)?;
        duration("open_max_ms", self.open_max_ms)?;
        if self.open_max_ms < self.open_base_ms {
            return Err(format!(
                "open_max_ms ({}) must be at least open_base_ms ({})",
                self.open_max_ms, self.open_base_ms
            ));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(format!("jitter must be in [0, 1], got {}", self.jitter));
        }
        at_least_one("half_open_permits", self.half_open_permits.into())?;
        at_least_one("success_threshold", self.success_threshold.into())?;
        duration("half_open_max_wait_ms", self.half_open_max_wait_ms)?;
        at_least_one("probe_failures_to_open", self.probe_failures_to_open.into())?;
        Ok(())
    }

    pub fn slow_call_threshold(&self) -> Duration {
        Duration::from_millis(self.slow_call_threshold_ms)
    }
    pub fn window(&self) -> Duration {
        Duration::from_millis(self.window_ms)
    }
    pub fn bucket(&self) -> Duration {
        Duration::from_millis(self.bucket_ms)
    }
    pub fn open_base(&self) -> Duration {
        Duration::from_millis(self.open_base_ms)
    }
    pub fn open_max(&self) -> Duration {
        Duration::from_millis(self.open_max_ms)
    }
    pub fn half_open_max_wait(&self) -> Duration {
        Duration::from_millis(self.half_open_max_wait_ms)
    }
    /// Whether a success with this latency is a slow call.
    pub fn is_slow(&self, latency: Duration) -> bool {
        latency > self.slow_call_threshold()
    }
}
