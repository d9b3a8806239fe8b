//! One Prometheus registry for the process, with handles resolved up front.
//!
//! Label lookups hash and lock, so nothing on the per-command path calls
//! `with_label_values`: per-command counters live in a vector indexed by the command
//! table's dense id, and per-upstream handles are resolved once when the upstream is built.
//! No globals: the registry is owned by [`Metrics`] and passed to whoever registers more.
//!
//! Besides redfuse's own metrics: `redfuse_build_info{version,commit}` and the process's
//! resident memory, open file descriptors and CPU time (`redfuse_process_*`, read from
//! `/proc` at each scrape). Every name starts with `redfuse_`; counters end in `_total` and
//! nothing else does (a unit test walks the registry).

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Counter, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
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
    /// `redfuse_command_duration_seconds{command}`, by command id.
    durations: LazyHistograms,
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

    fn inc_by(&self, id: usize, result: usize, n: u64) {
        let Some(row) = self.cells.get(id) else {
            return;
        };
        let name = command::COMMANDS.get(id).map_or("unknown", |c| c.name);
        row[result]
            .get_or_init(|| self.vec.with_label_values(&[name, self.results[result]]))
            .inc_by(n);
    }
}

/// A histogram per command, resolved on first use like [`LazyCounters`].
struct LazyHistograms {
    vec: HistogramVec,
    cells: Vec<OnceLock<Histogram>>,
}

impl LazyHistograms {
    fn new(vec: HistogramVec) -> Self {
        let cells = (0..=command::COMMANDS.len())
            .map(|_| OnceLock::new())
            .collect();
        LazyHistograms { vec, cells }
    }

    /// A local (unsynchronised) view of command `id`'s histogram.
    fn local(&self, id: usize) -> Option<prometheus::local::LocalHistogram> {
        let cell = self.cells.get(id)?;
        let name = command::COMMANDS.get(id).map_or("unknown", |c| c.name);
        Some(
            cell.get_or_init(|| self.vec.with_label_values(&[name]))
                .local(),
        )
    }
}

/// One client writer's command counts and latencies, added to the shared metrics when it
/// writes to its socket ([`CommandTally::flush`]) instead of four or five atomic updates
/// per reply: replies written together (a pipeline) cost one update per command.
pub struct CommandTally<'a> {
    metrics: &'a Metrics,
    /// (command, result, operations label, replies) not yet added.
    counts: Vec<(usize, CommandResult, usize, u64)>,
    /// Per command the client used: its histogram, locally.
    durations: Vec<(usize, prometheus::local::LocalHistogram)>,
}

impl<'a> CommandTally<'a> {
    pub fn new(metrics: &'a Metrics) -> CommandTally<'a> {
        CommandTally {
            metrics,
            counts: Vec::new(),
            durations: Vec::new(),
        }
    }

    /// Counts one reply to client command `id` (from the command table, or
    /// [`command::UNKNOWN`]) in `redfuse_commands_total` and `redfuse_operations_total`,
    /// and its duration in `redfuse_command_duration_seconds`.
    pub fn record(&mut self, id: usize, result: CommandResult, origin: Origin, seconds: f64) {
        let op = operation(origin, result);
        match self
            .counts
            .iter_mut()
            .find(|c| c.0 == id && c.1 == result && c.2 == op)
        {
            Some(c) => c.3 += 1,
            None => self.counts.push((id, result, op, 1)),
        }
        match self.durations.iter().find(|d| d.0 == id) {
            Some((_, h)) => h.observe(seconds),
            None => {
                if let Some(h) = self.metrics.durations.local(id) {
                    h.observe(seconds);
                    self.durations.push((id, h));
                }
            }
        }
    }

    pub fn metrics(&self) -> &'a Metrics {
        self.metrics
    }

    /// Adds what was recorded to the shared metrics.
    pub fn flush(&mut self) {
        for (id, result, op, n) in self.counts.drain(..) {
            self.metrics.commands.inc_by(id, result as usize, n);
            self.metrics.operations.inc_by(id, op, n);
        }
        for (_, h) in &self.durations {
            h.flush();
        }
    }
}

impl Drop for CommandTally<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

/// The `redfuse_operations_total` result of a reply: 0 `ok` (Redis answered), 1
/// `fallback` (degraded mode answered), 2 `error`.
fn operation(origin: Origin, result: CommandResult) -> usize {
    match (origin, result) {
        (Origin::Upstream, CommandResult::Ok) => 0,
        (Origin::Fallback, _) => 1,
        _ => 2,
    }
}

/// Latency buckets from 100 µs to 5 s.
const LATENCY_BUCKETS: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// The commit redfuse was built from (`build.rs`), "unknown" outside a git checkout.
pub const GIT_COMMIT: &str = match option_env!("BUILD_GIT_COMMIT") {
    Some(c) => c,
    None => "unknown",
};

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
            .buckets(LATENCY_BUCKETS.to_vec()),
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
        let durations_vec = HistogramVec::new(
            HistogramOpts::new(
                "redfuse_command_duration_seconds",
                "Client-side latency: from a command's bytes arriving to its reply going to the client, by command",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["command"],
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new(
                "redfuse_build_info",
                "Always 1; the labels say which build is running",
            ),
            &["version", "commit"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), GIT_COMMIT])
            .set(1);
        registry.register(Box::new(build_info))?;
        registry.register(Box::new(durations_vec.clone()))?;
        registry.register(Box::new(ProcessCollector::new()?))?;
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
            durations: LazyHistograms::new(durations_vec),
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
    /// Commands answered so far and how many of them were errors, summed over
    /// `redfuse_commands_total` (for the status page; not for the per-command path).
    pub fn command_totals(&self) -> (u64, u64) {
        let mut total = 0.0;
        let mut errors = 0.0;
        for family in self.commands.vec.collect() {
            for m in family.get_metric() {
                let v = m.get_counter().get_value();
                total += v;
                if m.get_label()
                    .iter()
                    .any(|l| l.name() == "result" && l.value() == "error")
                {
                    errors += v;
                }
            }
        }
        (total as u64, errors as u64)
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

/// `redfuse_process_*`: the process's resources, read from `/proc/self` at each scrape.
/// Elsewhere than Linux it reports nothing.
struct ProcessCollector {
    descs: Vec<Desc>,
    cpu: Counter,
    resident: Gauge,
    virtual_memory: Gauge,
    open_fds: Gauge,
    max_fds: Gauge,
    start_time: Gauge,
    threads: Gauge,
    /// CPU seconds already added to `cpu` (a counter only goes up by increments).
    cpu_seen: std::sync::Mutex<f64>,
}

impl ProcessCollector {
    fn new() -> prometheus::Result<ProcessCollector> {
        let cpu = Counter::new(
            "redfuse_process_cpu_seconds_total",
            "User and system CPU time spent by the process",
        )?;
        let resident = Gauge::new(
            "redfuse_process_resident_memory_bytes",
            "Resident memory of the process",
        )?;
        let virtual_memory = Gauge::new(
            "redfuse_process_virtual_memory_bytes",
            "Virtual memory of the process",
        )?;
        let open_fds = Gauge::new(
            "redfuse_process_open_fds",
            "Open file descriptors (sockets included)",
        )?;
        let max_fds = Gauge::new(
            "redfuse_process_max_fds",
            "The process's limit on open file descriptors",
        )?;
        let start_time = Gauge::new(
            "redfuse_process_start_time_seconds",
            "When the process started, in seconds since the Unix epoch",
        )?;
        let threads = Gauge::new("redfuse_process_threads", "Threads of the process")?;
        let descs = [
            cpu.desc(),
            resident.desc(),
            virtual_memory.desc(),
            open_fds.desc(),
            max_fds.desc(),
            start_time.desc(),
            threads.desc(),
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
        Ok(ProcessCollector {
            descs,
            cpu,
            resident,
            virtual_memory,
            open_fds,
            max_fds,
            start_time,
            threads,
            cpu_seen: std::sync::Mutex::new(0.0),
        })
    }

    fn update(&self) -> Option<()> {
        let stat = ProcStat::read()?;
        {
            let mut seen = self.cpu_seen.lock().unwrap_or_else(|e| e.into_inner());
            if stat.cpu_seconds > *seen {
                self.cpu.inc_by(stat.cpu_seconds - *seen);
                *seen = stat.cpu_seconds;
            }
        }
        self.resident.set(stat.resident_bytes);
        self.virtual_memory.set(stat.virtual_bytes);
        self.threads.set(stat.threads);
        if let Some(start) = stat.start_time {
            self.start_time.set(start);
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            // Minus the descriptor that reads the directory.
            self.open_fds.set(dir.count().saturating_sub(1) as f64);
        }
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit only writes the struct it is given.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
            self.max_fds.set(limit.rlim_cur as f64);
        }
        Some(())
    }
}

impl Collector for ProcessCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        if self.update().is_none() {
            return Vec::new();
        }
        [
            self.cpu.collect(),
            self.resident.collect(),
            self.virtual_memory.collect(),
            self.open_fds.collect(),
            self.max_fds.collect(),
            self.start_time.collect(),
            self.threads.collect(),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

/// What `/proc/self/stat` says, in units.
#[derive(Debug)]
pub struct ProcStat {
    pub cpu_seconds: f64,
    pub resident_bytes: f64,
    pub virtual_bytes: f64,
    pub threads: f64,
    pub start_time: Option<f64>,
}

impl ProcStat {
    pub fn read() -> Option<ProcStat> {
        let text = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name is in parentheses and may contain spaces.
        let rest = &text[text.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // Field numbers of proc(5), counted from `state` (field 3) at index 0.
        let field = |n: usize| -> Option<f64> { fields.get(n - 3)?.parse().ok() };
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as f64;
        let boot_time = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<f64>().ok())
        });
        Some(ProcStat {
            cpu_seconds: (field(14)? + field(15)?) / ticks,
            threads: field(20)?,
            start_time: boot_time.map(|b| b + field(22).unwrap_or(0.0) / ticks),
            virtual_bytes: field(23)?,
            resident_bytes: field(24)? * page,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    /// Registers what the rest of redfuse registers too, so the walk sees every family.
    fn full_registry() -> Metrics {
        let m = Metrics::new().unwrap();
        let cache = crate::cache::CacheMetrics::register(&m.registry).unwrap();
        cache.count(crate::cache::CacheResult::Hit);
        let breakers = crate::breaker::BreakerMetrics::register(&m.registry).unwrap();
        let _ = breakers.for_upstream("u");
        let _queue = crate::writequeue::WriteQueue::open(
            &Default::default(),
            std::sync::Arc::new(crate::auth::Identities::new()),
            &m.registry,
        )
        .unwrap();
        let u = m.for_upstream("u");
        u.timeouts.inc();
        u.probe.success.inc();
        u.dedicated_opened.inc();
        {
            let mut tally = CommandTally::new(&m);
            tally.record(0, CommandResult::Ok, Origin::Upstream, 0.001);
            tally.record(0, CommandResult::Error, Origin::Fallback, 0.001);
        }
        m
    }

    #[test]
    fn metric_names_follow_the_conventions() {
        let m = full_registry();
        let families = m.registry.gather();
        let mut types: BTreeMap<String, prometheus::proto::MetricType> = BTreeMap::new();
        for f in &families {
            types.insert(f.name().to_owned(), f.get_field_type());
        }
        use prometheus::proto::MetricType::*;
        for (name, t) in &types {
            assert!(
                name.starts_with("redfuse_"),
                "{name}: not prefixed redfuse_"
            );
            match t {
                COUNTER => assert!(
                    name.ends_with("_total"),
                    "counter {name} must end in _total"
                ),
                _ => assert!(
                    !name.ends_with("_total"),
                    "{name} is a {t:?} but is named like a counter"
                ),
            }
            if *t == HISTOGRAM {
                assert!(
                    name.ends_with("_seconds") || name.ends_with("_bytes"),
                    "histogram {name} should name its unit"
                );
            }
        }
        // No family's exposed series collide with another's (a histogram's `_bucket`,
        // `_sum`, `_count`).
        let mut series: BTreeSet<String> = BTreeSet::new();
        for (name, t) in &types {
            let names: Vec<String> = if *t == HISTOGRAM {
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .map(|s| format!("{name}{s}"))
                    .collect()
            } else {
                vec![name.clone()]
            };
            for n in names {
                assert!(series.insert(n.clone()), "{n} is exposed twice");
            }
        }
        for want in [
            "redfuse_build_info",
            "redfuse_process_resident_memory_bytes",
            "redfuse_process_open_fds",
            "redfuse_process_cpu_seconds_total",
            "redfuse_command_duration_seconds",
            "redfuse_cache_requests_total",
            "redfuse_breaker_state",
            "redfuse_write_queue_depth",
        ] {
            assert!(types.contains_key(want), "{want} missing: {types:?}");
        }
    }

    #[test]
    fn build_info_and_process_metrics_have_values() {
        let m = full_registry();
        let text = m.render();
        let version = env!("CARGO_PKG_VERSION");
        assert!(
            text.contains(&format!(
                "redfuse_build_info{{commit=\"{GIT_COMMIT}\",version=\"{version}\"}} 1"
            )),
            "{text}"
        );
        let value = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .unwrap_or_else(|| panic!("{name} missing"))
                .parse()
                .unwrap()
        };
        assert!(value("redfuse_process_resident_memory_bytes") > 1e6);
        assert!(value("redfuse_process_open_fds") >= 3.0);
        assert!(value("redfuse_process_max_fds") >= value("redfuse_process_open_fds"));
        assert!(value("redfuse_process_start_time_seconds") > 1.6e9);
        assert!(value("redfuse_process_cpu_seconds_total") >= 0.0);
        assert_eq!(m.command_totals(), (2, 1));
        assert!(
            text.contains("redfuse_command_duration_seconds_count{command=\""),
            "{text}"
        );
    }
}
