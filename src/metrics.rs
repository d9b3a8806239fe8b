//! One Prometheus registry for the process, with handles resolved up front.
//!
//! Label lookups hash and lock, so nothing on the per-command path calls
//! `with_label_values`: per-command counters live in a vector indexed by the command
//! table's dense id, and per-upstream handles are resolved once when the upstream is built.
//! No globals: the registry is owned by [`Metrics`] and passed to whoever registers more.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use std::sync::OnceLock;

use crate::command;
use crate::degrade::Origin;
use crate::upstream::probe::ProbeMetrics;

/// The result label of `redfuse_commands_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandResult {
    Ok = 0,
    Error = 1,
}

pub struct Metrics {
    pub registry: Registry,
    pub client_connections: IntGauge,
    pub client_connections_total: IntCounter,
    pub client_rejected_total: IntCounter,
    pub client_protocol_errors: IntCounter,
    /// Clients disconnected for exceeding their output buffer limit.
    pub client_output_overflows: IntCounter,
    pub upstream_protocol_errors: IntCounter,
    pub bytes_received: IntCounter,
    pub bytes_sent: IntCounter,
    /// `[command id][ok, error]`; the last row is for names the table does not know.
    commands: LazyCounters<2>,
    /// `[command id][success, fallback, error]`.
    operations: LazyCounters<3>,
    upstream_latency: HistogramVec,
    upstream_connections: IntGaugeVec,
    upstream_errors: IntCounterVec,
    health_probes: IntCounterVec,
    bulkhead_overflow: IntCounterVec,
    misconfigured: IntGaugeVec,
    dedicated: IntCounterVec,
}

/// Per-command counters whose label sets are resolved on first use, so `/metrics` lists the
/// commands actually seen rather than hundreds of zeros, and later increments are one atomic add.
struct LazyCounters<const N: usize> {
    vec: IntCounterVec,
    results: [&'static str; N],
    cells: Vec<[OnceLock<IntCounter>; N]>,
}

impl<const N: usize> LazyCounters<N> {
    fn new(vec: IntCounterVec, results: [&'static str; N]) -> Self {
        let cells = (0..=command::COMMANDS.len())
            .map(|_| std::array::from_fn(|_| OnceLock::new()))
            .collect();
        LazyCounters {
            vec,
            results,
            cells,
        }
    }

    fn inc(&self, id: usize, result: usize) {
        let Some(row) = self.cells.get(id) else {
            return;
        };
        let name = command::COMMANDS.get(id).map_or("unknown", |c| c.name);
        row[result]
            .get_or_init(|| self.vec.with_label_values(&[name, self.results[result]]))
            .inc();
    }
}

/// Per-upstream handles, resolved once.
#[derive(Clone)]
pub struct UpstreamMetrics {
    pub latency: Histogram,
    pub connections: IntGauge,
    pub connect_errors: IntCounter,
    pub timeouts: IntCounter,
    pub disconnects: IntCounter,
    pub auth_errors: IntCounter,
    pub protocol_errors: IntCounter,
    pub bulkhead_overflow: IntCounter,
    pub probe: ProbeMetrics,
    /// 1 while the upstream answers but refuses redfuse's own credentials.
    pub misconfigured: IntGauge,
    /// Dedicated connections taken ready from the warm set, and opened on demand.
    pub dedicated_warm_hits: IntCounter,
    pub dedicated_opened: IntCounter,
}

impl Metrics {
    pub fn new() -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let client_connections =
            IntGauge::new("redfuse_client_connections", "Client connections open now")?;
        let client_connections_total = IntCounter::new(
            "redfuse_client_connections_total",
            "Client connections accepted",
        )?;
        let client_rejected_total = IntCounter::new(
            "redfuse_client_connections_rejected_total",
            "Client connections refused because max_clients was reached",
        )?;
        let protocol_errors = IntCounterVec::new(
            Opts::new(
                "redfuse_protocol_errors_total",
                "Malformed RESP frames, by who sent them",
            ),
            &["source"],
        )?;
        let bytes = IntCounterVec::new(
            Opts::new("redfuse_client_bytes_total", "Bytes exchanged with clients"),
            &["direction"],
        )?;
        let commands_vec = IntCounterVec::new(
            Opts::new(
                "redfuse_commands_total",
                "Client commands by command name and result",
            ),
            &["command", "result"],
        )?;
        let upstream_latency = HistogramVec::new(
            HistogramOpts::new(
                "redfuse_upstream_request_duration_seconds",
                "Time from writing a command upstream to reading its reply",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0,
            ]),
            &["upstream"],
        )?;
        let upstream_connections = IntGaugeVec::new(
            Opts::new("redfuse_upstream_connections", "Open upstream connections"),
            &["upstream"],
        )?;
        let upstream_errors = IntCounterVec::new(
            Opts::new(
                "redfuse_upstream_errors_total",
                "Upstream connection problems by kind",
            ),
            &["upstream", "kind"],
        )?;
        let health_probes = IntCounterVec::new(
            Opts::new(
                "redfuse_health_probe_total",
                "Active health probes by result",
            ),
            &["upstream", "result"],
        )?;
        let bulkhead_overflow = IntCounterVec::new(
            Opts::new(
                "redfuse_bulkhead_overflow_total",
                "Requests refused because an upstream had too many in flight",
            ),
            &["upstream"],
        )?;
        let operations_vec = IntCounterVec::new(
            Opts::new(
                "redfuse_operations_total",
                "Client operations by how they were answered: by Redis, in degraded mode, or with an error",
            ),
            &["operation", "result"],
        )?;
        let misconfigured = IntGaugeVec::new(
            Opts::new(
                "redfuse_upstream_misconfigured",
                "1 while the upstream answers but refuses redfuse's own credentials (NOAUTH, WRONGPASS)",
            ),
            &["upstream"],
        )?;
        let dedicated = IntCounterVec::new(
            Opts::new(
                "redfuse_dedicated_connections_total",
                "Dedicated connections given to clients, by whether one was ready (warm) or opened then (opened)",
            ),
            &["upstream", "source"],
        )?;
        registry.register(Box::new(misconfigured.clone()))?;
        registry.register(Box::new(dedicated.clone()))?;
        registry.register(Box::new(operations_vec.clone()))?;
        registry.register(Box::new(health_probes.clone()))?;
        registry.register(Box::new(bulkhead_overflow.clone()))?;
        registry.register(Box::new(client_connections.clone()))?;
        registry.register(Box::new(client_connections_total.clone()))?;
        registry.register(Box::new(client_rejected_total.clone()))?;
        let client_output_overflows = IntCounter::new(
            "redfuse_client_output_limit_disconnects_total",
            "Clients disconnected because their unwritten replies exceeded the output buffer limit",
        )?;
        registry.register(Box::new(client_output_overflows.clone()))?;
        registry.register(Box::new(protocol_errors.clone()))?;
        registry.register(Box::new(bytes.clone()))?;
        registry.register(Box::new(commands_vec.clone()))?;
        registry.register(Box::new(upstream_latency.clone()))?;
        registry.register(Box::new(upstream_connections.clone()))?;
        registry.register(Box::new(upstream_errors.clone()))?;

        let commands = LazyCounters::new(commands_vec, ["ok", "error"]);
        let operations = LazyCounters::new(operations_vec, ["success", "fallback", "error"]);
        Ok(Metrics {
            operations,
            registry,
            client_connections,
            client_connections_total,
            client_rejected_total,
            client_protocol_errors: protocol_errors.with_label_values(&["client"]),
            client_output_overflows,
            upstream_protocol_errors: protocol_errors.with_label_values(&["upstream"]),
            bytes_received: bytes.with_label_values(&["in"]),
            bytes_sent: bytes.with_label_values(&["out"]),
            commands,
            upstream_latency,
            upstream_connections,
            upstream_errors,
            health_probes,
            bulkhead_overflow,
            misconfigured,
            dedicated,
        })
    }

    /// Counts one reply to a client command. `id` comes from the command table (or
    /// [`command::UNKNOWN`]).
    pub fn count_command(&self, id: usize, result: CommandResult, origin: Origin) {
        self.commands.inc(id, result as usize);
        let op = match (origin, result) {
            (Origin::Upstream, CommandResult::Ok) => 0,
            (Origin::Fallback, _) => 1,
            _ => 2,
        };
        self.operations.inc(id, op);
    }

    pub fn for_upstream(&self, name: &str) -> UpstreamMetrics {
        let err = |kind: &str| self.upstream_errors.with_label_values(&[name, kind]);
        UpstreamMetrics {
            latency: self.upstream_latency.with_label_values(&[name]),
            connections: self.upstream_connections.with_label_values(&[name]),
            connect_errors: err("connect"),
            timeouts: err("timeout"),
            disconnects: err("disconnect"),
            auth_errors: err("auth"),
            protocol_errors: self.upstream_protocol_errors.clone(),
            bulkhead_overflow: self.bulkhead_overflow.with_label_values(&[name]),
            probe: ProbeMetrics {
                success: self.health_probes.with_label_values(&[name, "success"]),
                failure: self.health_probes.with_label_values(&[name, "failure"]),
                skipped: self.health_probes.with_label_values(&[name, "skipped"]),
            },
            misconfigured: self.misconfigured.with_label_values(&[name]),
            dedicated_warm_hits: self.dedicated.with_label_values(&[name, "warm"]),
            dedicated_opened: self.dedicated.with_label_values(&[name, "opened"]),
        }
    }

    /// The registry in Prometheus text exposition format.
    pub fn render(&self) -> String {
        let families = self.registry.gather();
        prometheus::TextEncoder::new()
            .encode_to_string(&families)
            .unwrap_or_else(|e| format!("# encode error: {e}\n"))
    }
}
