//! `GET /`: a status page for people. One self-contained HTML document (inline CSS, no
//! script, no external asset), rendered on the server and reloading itself every 2 s:
//! each upstream's breaker state and its recent transitions, request and error rates,
//! the degraded-mode cache, and the write queue.
//!
//! Rates come from a sampler that reads the command counters once a second; everything
//! else is read when the page is asked for.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::breaker::State;
use crate::config::Role;
use crate::metrics::GIT_COMMIT;
use crate::server::Server;

/// The window request and error rates are averaged over.
const RATE_WINDOW: Duration = Duration::from_secs(10);

#[derive(Clone, Copy)]
struct Sample {
    at: Instant,
    commands: u64,
    errors: u64,
}

/// Command counts once a second, for rates.
pub struct Sampler {
    started: Instant,
    samples: Mutex<VecDeque<Sample>>,
}

impl Default for Sampler {
    fn default() -> Self {
        Sampler::new()
    }
}

impl Sampler {
    pub fn new() -> Sampler {
        Sampler {
            started: Instant::now(),
            samples: Mutex::new(VecDeque::new()),
        }
    }

    pub async fn run(self: Arc<Self>, server: Arc<Server>, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.record(&server),
                _ = shutdown.changed() => return,
            }
        }
    }

    fn record(&self, server: &Server) {
        let (commands, errors) = server.metrics.command_totals();
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        samples.push_back(Sample {
            at: Instant::now(),
            commands,
            errors,
        });
        while samples
            .front()
            .is_some_and(|s| s.at.elapsed() > RATE_WINDOW + Duration::from_secs(2))
        {
            samples.pop_front();
        }
    }

    /// Commands and errors per second over about the last [`RATE_WINDOW`], once two
    /// samples exist.
    fn rates(&self) -> Option<(f64, f64)> {
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let last = *samples.back()?;
        let first = samples
            .iter()
            .find(|s| last.at.duration_since(s.at) <= RATE_WINDOW)?;
        let secs = last.at.duration_since(first.at).as_secs_f64();
        if secs < 0.5 {
            return None;
        }
        Some((
            last.commands.saturating_sub(first.commands) as f64 / secs,
            last.errors.saturating_sub(first.errors) as f64 / secs,
        ))
    }
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn bytes(n: f64) -> String {
    if n >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", n / (1024.0 * 1024.0))
    } else if n >= 1024.0 {
        format!("{:.1} KiB", n / 1024.0)
    } else {
        format!("{n} B")
    }
}

fn duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d {}h", s / 86400, (s % 86400) / 3600),
    }
}

/// `HH:MM:SS UTC` of a Unix time in milliseconds.
fn clock(unix_ms: u64) -> String {
    let s = (unix_ms / 1000) % 86400;
    format!("{:02}:{:02}:{:02} UTC", s / 3600, (s % 3600) / 60, s % 60)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The registry's counters and gauges, read once per page.
struct Gathered(Vec<prometheus::proto::MetricFamily>);

impl Gathered {
    fn new(server: &Server) -> Gathered {
        Gathered(server.metrics.registry.gather())
    }

    /// The sum of a family's series whose `label` is `value` (any series when `None`).
    fn sum(&self, family: &str, label: Option<(&str, &str)>) -> f64 {
        self.0
            .iter()
            .filter(|f| f.name() == family)
            .flat_map(|f| {
                let gauge = f.get_field_type() == prometheus::proto::MetricType::GAUGE;
                f.get_metric().iter().map(move |m| (gauge, m))
            })
            .filter(|(_, m)| {
                label.is_none_or(|(k, v)| {
                    m.get_label()
                        .iter()
                        .any(|l| l.name() == k && l.value() == v)
                })
            })
            .map(|(gauge, m)| {
                if gauge {
                    m.get_gauge().get_value()
                } else {
                    m.get_counter().get_value()
                }
            })
            .sum()
    }
}

const STYLE: &str = r#"
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;background:#f4f5f7;color:#1d2433}
header{background:#1d2433;color:#fff;padding:12px 24px;display:flex;gap:24px;align-items:baseline;flex-wrap:wrap}
header h1{font-size:20px;margin:0}header span{opacity:.8}
main{padding:16px 24px;display:grid;grid-template-columns:repeat(auto-fit,minmax(330px,1fr));gap:16px}
section{background:#fff;border-radius:8px;padding:12px 16px;box-shadow:0 1px 2px rgba(0,0,0,.12)}
section.wide{grid-column:1/-1}
h2{font-size:15px;margin:0 0 8px;text-transform:uppercase;letter-spacing:.04em;color:#5a6275}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #e6e8ec;vertical-align:top}
th{font-weight:600;color:#5a6275;font-size:12px}
.badge{display:inline-block;padding:2px 10px;border-radius:10px;font-weight:700;font-size:12px;text-transform:uppercase;color:#fff}
.closed{background:#1f9d55}.open{background:#d64545}.half_open{background:#e3a008}
.yes{color:#1f9d55;font-weight:600}.no{color:#d64545;font-weight:600}
.big{font-size:26px;font-weight:700}.kv{display:grid;grid-template-columns:auto 1fr;gap:4px 16px}
.kv div:nth-child(odd){color:#5a6275}ol{margin:4px 0 8px;padding-left:20px}li{margin:2px 0}
small{color:#5a6275}
"#;

/// The page.
pub fn render(server: &Server, sampler: &Sampler) -> String {
    let mut h = String::with_capacity(16 * 1024);
    let uptime = duration(sampler.started.elapsed().as_secs());
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"2\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>redfuse status</title><style>{STYLE}</style></head><body>\
         <header><h1>redfuse</h1><span>version {} ({})</span>\
         <span>up {uptime}</span><span>{}</span></header><main>",
        env!("CARGO_PKG_VERSION"),
        escape(GIT_COMMIT),
        clock(now_ms()),
    );

    // Upstreams and their breakers.
    h.push_str(
        "<section class=\"wide\"><h2>Upstreams</h2><table><tr><th>upstream</th><th>role</th>\
         <th>address</th><th>connected</th><th>breaker</th><th>mode</th><th>failure rate</th>\
         <th>calls in window</th><th>next probe</th></tr>",
    );
    for u in &server.upstreams {
        let snap = u.breaker.snapshot();
        let state = snap.state.as_str();
        let connected = u.is_connected();
        let _ = write!(
            h,
            "<tr class=\"upstream\" data-upstream=\"{name}\" data-state=\"{state}\">\
             <td><b>{name}</b></td><td>{role}</td><td>{addr}{tls}</td>\
             <td class=\"{cc}\">{conn}</td><td><span class=\"badge {state}\">{label}</span></td>\
             <td>{mode}</td><td>{rate:.0}%</td><td>{calls}</td><td>{probe}</td></tr>",
            name = escape(&u.ctx.name),
            role = match u.ctx.role() {
                Role::Primary => "primary",
                Role::Replica => "replica",
            },
            addr = escape(&u.ctx.addr),
            tls = if u.ctx.tls.is_some() { " (TLS)" } else { "" },
            cc = if connected { "yes" } else { "no" },
            conn = if connected { "yes" } else { "no" },
            label = match snap.state {
                State::Closed => "closed",
                State::HalfOpen => "half-open",
                State::Open => "open",
            },
            mode = snap.mode.as_str(),
            rate = snap.failure_rate * 100.0,
            calls = snap.calls_in_window,
            probe = snap
                .next_probe_in_seconds
                .map_or("—".to_owned(), |s| format!("in {s:.1}s")),
        );
    }
    h.push_str("</table>");
    let now = now_ms();
    for u in &server.upstreams {
        let recent = u.breaker.recent_transitions();
        let _ = write!(
            h,
            "<p><b>{}</b>: recent transitions <small>(last {}, newest first)</small></p>",
            escape(&u.ctx.name),
            crate::breaker::shared::RECENT_TRANSITIONS
        );
        if recent.is_empty() {
            h.push_str("<p><small>none since start (closed)</small></p>");
            continue;
        }
        h.push_str("<ol class=\"transitions\">");
        for t in recent.iter().rev() {
            let _ = write!(
                h,
                "<li>{} <small>({} ago)</small>: <span class=\"badge {}\">{}</span> → \
                 <span class=\"badge {}\">{}</span> <small>{}</small></li>",
                clock(t.at_unix_ms),
                duration(now.saturating_sub(t.at_unix_ms) / 1000),
                t.from,
                t.from.replace('_', "-"),
                t.to,
                t.to.replace('_', "-"),
                escape(&t.reason),
            );
        }
        h.push_str("</ol>");
    }
    h.push_str("</section>");

    // Traffic.
    let (total, errors) = server.metrics.command_totals();
    let (rate, error_rate) = match sampler.rates() {
        Some((r, e)) => (format!("{r:.1}"), format!("{e:.1}")),
        None => ("—".to_owned(), "—".to_owned()),
    };
    let _ = write!(
        h,
        "<section><h2>Requests</h2><div class=\"kv\">\
         <div>requests/s <small>(last 10 s)</small></div><div class=\"big\" id=\"rate\">{rate}</div>\
         <div>errors/s</div><div class=\"big\" id=\"errors\">{error_rate}</div>\
         <div>commands answered</div><div>{total}</div>\
         <div>errors answered</div><div>{errors}</div>\
         <div>client connections</div><div>{}</div></div></section>",
        server.metrics.client_connections.get(),
    );

    // Cache.
    let metrics = Gathered::new(server);
    let count = |r: &str| metrics.sum("redfuse_cache_requests_total", Some(("result", r)));
    let hits = count("hit") + count("stale_hit");
    let lookups = hits + count("miss");
    let hit_rate = if lookups > 0.0 {
        format!("{:.0}%", hits * 100.0 / lookups)
    } else {
        "—".to_owned()
    };
    let _ = write!(
        h,
        "<section><h2>Degraded-mode cache</h2><div class=\"kv\">\
         <div>entries</div><div class=\"big\" id=\"cache-entries\">{}</div>\
         <div>bytes</div><div id=\"cache-bytes\">{} <small>of {}</small></div>\
         <div>hit rate <small>(reads during outages)</small></div><div id=\"hit-rate\">{hit_rate} \
         <small>{} of {} lookups</small></div><div>fills</div><div>{}</div></div></section>",
        metrics.sum("redfuse_cache_entries", None),
        bytes(metrics.sum("redfuse_cache_bytes", None)),
        bytes(server.config.cache.max_bytes as f64),
        hits,
        lookups,
        count("fill"),
    );

    // Write queue.
    let q = &server.degrade.queue;
    let depth = q.journal.len();
    let primary_state = server.primary().breaker.state();
    let replay = if q.is_stalled() {
        "stalled (see /write-queue/dead-letters and the log)"
    } else if depth == 0 {
        "idle"
    } else if primary_state == State::Closed {
        "replaying"
    } else {
        "waiting for the primary"
    };
    let _ = write!(
        h,
        "<section><h2>Write queue</h2><div class=\"kv\">\
         <div>queued writes</div><div class=\"big\" id=\"queue-depth\">{depth}</div>\
         <div>bytes</div><div>{}</div><div>replay</div><div id=\"replay\">{replay}</div>\
         <div>dead letters</div><div>{}</div><div>journal</div><div>{}</div></div></section>",
        bytes(q.journal.bytes() as f64),
        q.dead_letters().len(),
        q.journal
            .path()
            .map_or("memory only".to_owned(), |p| escape(
                &p.display().to_string()
            )),
    );

    h.push_str(
        "</main><footer style=\"padding:0 24px 16px\"><small>Reloads every 2 s. \
         Machine-readable: <a href=\"/metrics\">/metrics</a>, <a href=\"/breakers\">/breakers</a>, \
         <a href=\"/ready\">/ready</a>, <a href=\"/write-queue\">/write-queue</a>, \
         <a href=\"/config\">/config</a>.</small></footer></body></html>\n",
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting() {
        assert_eq!(escape("<a&\"b'>"), "&lt;a&amp;&quot;b&#39;&gt;");
        assert_eq!(bytes(2.0 * 1024.0 * 1024.0), "2.0 MiB");
        assert_eq!(bytes(10.0), "10 B");
        assert_eq!(duration(3725), "1h 2m");
        assert_eq!(clock(3_723_000), "01:02:03 UTC");
    }
}
