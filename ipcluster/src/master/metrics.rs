//! Prometheus metrics on `--metrics-listen IP:PORT` (see docs/metrics.md).
//!
//! A small HTTP server thread (tiny_http) answers `GET /metrics`: it asks the
//! master's event loop for the text through the event channel, and the loop
//! encodes it from its own state at that moment, so nothing is shared
//! between threads but the request and the answer. Counters and the publish
//! histogram live in [`Metrics`], owned by the master; gauges (workers by
//! state and generation, RSS and connections per worker, the steering
//! counters of the backend) are built from a [`Snapshot`] at each scrape.

use std::net::{SocketAddr, TcpListener};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::policy::WorkerState;
use crate::steering::Counters;

/// The exposition for a scraper that asks for OpenMetrics (Prometheus does),
/// as prometheus-client writes it.
pub const OPENMETRICS_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The classic Prometheus text format, for everyone else (curl, promtool).
pub const PROMETHEUS_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// How long a scrape waits for the master's event loop.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a new master retries binding a port the old one may still hold.
const BIND_RETRY: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(
        "cannot listen on --metrics-listen {addr}: {source}; choose a free address and port \
         (`ss -ltnp` shows what listens)"
    )]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot serve HTTP on --metrics-listen {addr}: {message}")]
    Serve { addr: SocketAddr, message: String },
}

/// A scrape: the master answers with the exposition text.
#[derive(Debug)]
pub struct ScrapeRequest {
    pub reply: std_mpsc::SyncSender<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KillLabels {
    reason: &'static str,
    /// `die` (control message), `SIGTERM` or `SIGKILL`.
    signal: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    /// `table` (a generation's whole table) or `band` (one band's worker).
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
    generation: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabels {
    pid: i32,
    band: u32,
    generation: u64,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SteeringLabels {
    backend: &'static str,
    counter: &'static str,
}

/// One worker at scrape time.
#[derive(Clone, Debug)]
pub struct WorkerSample {
    pub pid: i32,
    pub band: u32,
    pub generation: u64,
    pub state: WorkerState,
    pub rss: u64,
    pub connections: u32,
}

/// The master's state at scrape time.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub backend: &'static str,
    pub generation: u64,
    pub bands: u32,
    pub published: bool,
    pub master_rss: u64,
    pub workers: Vec<WorkerSample>,
    pub counters: Option<Counters>,
}

type HistogramFamily = Family<KindLabels, Histogram, fn() -> Histogram>;

fn publish_histogram() -> Histogram {
    // 100 µs … about 3 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// The master's counters, kept for its lifetime.
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    publishes: Family<KindLabels, Counter>,
    publish_failures: Family<KindLabels, Counter>,
    publish_seconds: HistogramFamily,
    retirements: Family<ReasonLabels, Counter>,
    kills: Family<KillLabels, Counter>,
    crashes: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            started: Instant::now(),
            publishes: Family::default(),
            publish_failures: Family::default(),
            publish_seconds: Family::new_with_constructor(publish_histogram),
            retirements: Family::default(),
            kills: Family::default(),
            crashes: Counter::default(),
        }
    }
}

impl Metrics {
    /// A steering update: `table` (a generation's table) or `band` (one band).
    pub fn published(&self, kind: &'static str, took: Duration, ok: bool) {
        let labels = KindLabels { kind };
        if ok {
            self.publishes.get_or_create(&labels).inc();
            self.publish_seconds
                .get_or_create(&labels)
                .observe(took.as_secs_f64());
        } else {
            self.publish_failures.get_or_create(&labels).inc();
        }
    }

    pub fn retired(&self, reason: &str) {
        self.retirements
            .get_or_create(&ReasonLabels {
                reason: reason_kind(reason),
            })
            .inc();
    }

    /// `signal`: `die`, `SIGTERM` or `SIGKILL`.
    pub fn killed(&self, reason: &str, signal: &'static str) {
        self.kills
            .get_or_create(&KillLabels {
                reason: reason_kind(reason),
                signal,
            })
            .inc();
    }

    /// A live worker exited on its own.
    pub fn crashed(&self) {
        self.crashes.inc();
    }

    /// The exposition text: these counters and the gauges of `snap`.
    pub fn encode(&self, snap: &Snapshot) -> String {
        let mut r = Registry::with_prefix("ipcluster");
        r.register(
            "publishes",
            "Steering updates written: a generation's table, or one band's worker",
            self.publishes.clone(),
        );
        r.register(
            "publish_failures",
            "Steering updates that failed (retried)",
            self.publish_failures.clone(),
        );
        r.register(
            "publish_duration_seconds",
            "Time to write a steering update into the kernel",
            self.publish_seconds.clone(),
        );
        r.register(
            "retirements",
            "Live workers taken out of the steering table, by reason",
            self.retirements.clone(),
        );
        r.register(
            "kills",
            "Workers asked to exit (die, SIGTERM) or killed (SIGKILL), by reason",
            self.kills.clone(),
        );
        r.register(
            "worker_crashes",
            "Live workers that exited on their own (each is replaced)",
            self.crashes.clone(),
        );

        let reloads = Counter::<u64>::default();
        reloads.inc_by(snap.generation.saturating_sub(1));
        r.register(
            "reloads",
            "Masters started for this cluster after its first one (reloads, and restarts after a crash)",
            reloads,
        );
        let gauge = |v: u64| {
            let g = Gauge::<i64>::default();
            g.set(i64::try_from(v).unwrap_or(i64::MAX));
            g
        };
        r.register(
            "generation",
            "The master's generation",
            gauge(snap.generation),
        );
        r.register(
            "generation_published",
            "1 once the master's generation has been published",
            gauge(u64::from(snap.published)),
        );
        r.register(
            "bands",
            "Bands (workers per generation)",
            gauge(u64::from(snap.bands)),
        );
        r.register(
            "master_rss_bytes",
            "Resident memory of the master",
            gauge(snap.master_rss),
        );
        r.register(
            "master_uptime_seconds",
            "Time since this master started",
            gauge(self.started.elapsed().as_secs()),
        );

        let by_state = Family::<StateLabels, Gauge>::default();
        let rss = Family::<WorkerLabels, Gauge>::default();
        let conns = Family::<WorkerLabels, Gauge>::default();
        for w in &snap.workers {
            let state = state_label(w.state);
            by_state
                .get_or_create(&StateLabels {
                    state,
                    generation: w.generation,
                })
                .inc();
            let labels = WorkerLabels {
                pid: w.pid,
                band: w.band,
                generation: w.generation,
                state,
            };
            rss.get_or_create(&labels)
                .set(i64::try_from(w.rss).unwrap_or(i64::MAX));
            conns.get_or_create(&labels).set(i64::from(w.connections));
        }
        r.register("workers", "Workers by state and generation", by_state);
        r.register(
            "worker_rss_bytes",
            "Resident memory of each worker's process tree",
            rss,
        );
        r.register(
            "worker_connections",
            "Established connections on each worker's ports",
            conns,
        );

        if let Some(c) = snap.counters {
            let steering = Family::<SteeringLabels, Counter>::default();
            for (counter, value) in [
                ("steered", c.steered),
                ("new_flows", c.new_flows),
                ("flow_hits", c.flow_hits),
                ("table_misses", c.table_misses),
                ("egress_rewrites", c.egress_rewrites),
                ("passed", c.passed),
                ("flow_fallbacks", c.flow_fallbacks),
            ] {
                steering
                    .get_or_create(&SteeringLabels {
                        backend: snap.backend,
                        counter,
                    })
                    .inc_by(value);
            }
            r.register(
                "steering_packets",
                "Packet counters of the steering backend in use, by counter",
                steering,
            );
        }

        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &r) {
            log::warn!("encoding the metrics failed: {e}");
        }
        text
    }
}

/// OpenMetrics text → Prometheus text format 0.0.4: a counter family is
/// named with its `_total` suffix in HELP and TYPE, and there is no `# EOF`.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 64);
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

impl super::Master {
    /// The master's state for a scrape of `/metrics`.
    pub(super) fn metrics_snapshot(&self, counters: Option<Counters>) -> Snapshot {
        Snapshot {
            backend: self.cfg.backend.as_str(),
            generation: self.generation,
            bands: self.cfg.bands,
            published: self.core.published,
            master_rss: super::own_rss(),
            workers: self
                .core
                .workers
                .values()
                .map(|w| WorkerSample {
                    pid: w.pid,
                    band: w.band,
                    generation: w.generation,
                    state: w.state,
                    rss: w.rss,
                    connections: w.connections,
                })
                .collect(),
            counters,
        }
    }
}

fn state_label(state: WorkerState) -> &'static str {
    match state {
        WorkerState::Starting => "starting",
        WorkerState::Live => "live",
        WorkerState::Retired => "retired",
        WorkerState::Dying => "dying",
    }
}

/// A few stable reason labels from the master's reason texts (which carry
/// figures and pids, too many distinct values for a label).
pub fn reason_kind(reason: &str) -> &'static str {
    const KINDS: [(&str, &str); 13] = [
        ("a new generation took over", "new_generation"),
        ("low watermark breach: rss", "worker_rss_limit"),
        ("low watermark breach: cluster", "low_watermark"),
        ("high watermark breach", "high_watermark"),
        ("too busy", "busy"),
        ("asked to be retired", "requested"),
        ("ping timeout", "ping_timeout"),
        ("retired and idle", "idle"),
        ("after it was asked to die", "soft_kill_timeout"),
        ("SIGUSR1", "kill_retired"),
        ("kill-retired", "kill_retired"),
        ("not listening", "connect_timeout"),
        ("replaced by worker", "replaced"),
    ];
    KINDS
        .iter()
        .find(|(needle, _)| reason.contains(needle))
        .map_or("other", |(_, kind)| kind)
}

/// Bind `--metrics-listen`; a previous master that is exiting may still hold
/// the port for a moment.
pub fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    let deadline = Instant::now() + BIND_RETRY;
    loop {
        match TcpListener::bind(addr) {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(source) => return Err(MetricsError::Bind { addr, source }),
        }
    }
}

/// Serve `/metrics` on `listener` from a thread; each scrape goes to the
/// master through `scrape` (which wraps it in the master's event type).
pub fn serve<F>(listener: TcpListener, scrape: F) -> Result<(), MetricsError>
where
    F: Fn(ScrapeRequest) -> bool + Send + 'static,
{
    let addr = listener.local_addr().map_err(|source| MetricsError::Bind {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    let server =
        tiny_http::Server::from_listener(listener, None).map_err(|e| MetricsError::Serve {
            addr,
            message: e.to_string(),
        })?;
    log::info!("serving Prometheus metrics on http://{addr}/metrics");
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                let response = answer(&request, &scrape);
                if let Err(e) = request.respond(response) {
                    log::debug!("metrics: answering a scrape failed: {e}");
                }
            }
        })
        .map_err(|e| MetricsError::Serve {
            addr,
            message: format!("cannot start its thread: {e}"),
        })?;
    Ok(())
}

fn answer<F>(
    request: &tiny_http::Request,
    scrape: &F,
) -> tiny_http::Response<std::io::Cursor<Vec<u8>>>
where
    F: Fn(ScrapeRequest) -> bool,
{
    let text = |code: u16, body: String| {
        let header = tiny_http::Header::from_bytes("Content-Type", "text/plain; charset=utf-8")
            .map_err(|()| log::debug!("bad header"))
            .ok();
        let mut r = tiny_http::Response::from_string(body).with_status_code(code);
        if let Some(h) = header {
            r.add_header(h);
        }
        r
    };
    let path = request.url().split('?').next().unwrap_or("");
    let method = request.method();
    if !matches!(method, tiny_http::Method::Get | tiny_http::Method::Head) {
        return text(405, "only GET /metrics\n".into());
    }
    if path == "/" {
        return text(200, "ipcluster: metrics at /metrics\n".into());
    }
    if path != "/metrics" {
        return text(404, format!("no {path} here: metrics are at /metrics\n"));
    }
    let (tx, rx) = std_mpsc::sync_channel(1);
    if !scrape(ScrapeRequest { reply: tx }) {
        return text(503, "the master is exiting\n".into());
    }
    let openmetrics = request.headers().iter().any(|h| {
        h.field.equiv("Accept") && h.value.as_str().contains("application/openmetrics-text")
    });
    match rx.recv_timeout(SCRAPE_TIMEOUT) {
        Ok(body) => {
            let (body, kind) = if openmetrics {
                (body, OPENMETRICS_TYPE)
            } else {
                (to_prometheus_text(&body), PROMETHEUS_TYPE)
            };
            let mut r = tiny_http::Response::from_string(body);
            if let Ok(h) = tiny_http::Header::from_bytes("Content-Type", kind) {
                r.add_header(h);
            }
            r
        }
        Err(std_mpsc::RecvTimeoutError::Disconnected) => text(
            503,
            "the master is exiting (a reload or a stop): scrape again\n".into(),
        ),
        Err(std_mpsc::RecvTimeoutError::Timeout) => text(
            503,
            format!(
                "the master did not answer within {SCRAPE_TIMEOUT:?} (busy stopping workers?)\n"
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        let w = |pid, band, generation, state, rss, connections| WorkerSample {
            pid,
            band,
            generation,
            state,
            rss,
            connections,
        };
        Snapshot {
            backend: "ebpf",
            generation: 3,
            bands: 2,
            published: true,
            master_rss: 7 << 20,
            workers: vec![
                w(10, 0, 3, WorkerState::Live, 4 << 20, 2),
                w(11, 1, 3, WorkerState::Live, 5 << 20, 0),
                w(8, 0, 2, WorkerState::Retired, 6 << 20, 1),
            ],
            counters: Some(Counters {
                steered: 120,
                ..Counters::default()
            }),
        }
    }

    #[test]
    fn exposition_has_every_family() {
        let m = Metrics::default();
        m.published("table", Duration::from_micros(300), true);
        m.retired("a new generation took over");
        m.killed(
            "still running 6s after it was asked to die (soft-kill timeout 5s)",
            "SIGKILL",
        );
        let text = m.encode(&snapshot());
        for line in [
            "ipcluster_publishes_total{kind=\"table\"} 1",
            "ipcluster_publish_duration_seconds_count{kind=\"table\"} 1",
            "ipcluster_retirements_total{reason=\"new_generation\"} 1",
            "ipcluster_kills_total{reason=\"soft_kill_timeout\",signal=\"SIGKILL\"} 1",
            "ipcluster_reloads_total 2",
            "ipcluster_generation 3",
            "ipcluster_workers{state=\"live\",generation=\"3\"} 2",
            "ipcluster_workers{state=\"retired\",generation=\"2\"} 1",
            "ipcluster_worker_rss_bytes{pid=\"8\",band=\"0\",generation=\"2\",state=\"retired\"} 6291456",
            "ipcluster_worker_connections{pid=\"10\",band=\"0\",generation=\"3\",state=\"live\"} 2",
            "ipcluster_steering_packets_total{backend=\"ebpf\",counter=\"steered\"} 120",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn prometheus_text_names_counters_with_total() {
        let m = Metrics::default();
        m.published("table", Duration::from_micros(300), true);
        let text = to_prometheus_text(&m.encode(&snapshot()));
        assert!(
            text.contains("# HELP ipcluster_publishes_total Steering"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE ipcluster_publishes_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE ipcluster_publish_duration_seconds histogram\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE ipcluster_generation gauge\n"),
            "{text}"
        );
        assert!(!text.contains("# EOF"), "{text}");
    }

    #[test]
    fn reasons_become_few_labels() {
        assert_eq!(
            reason_kind(
                "low watermark breach: rss 470.2 MiB > limit 448.0 MiB; replaced by worker 8411"
            ),
            "worker_rss_limit"
        );
        assert_eq!(
            reason_kind("ping timeout: silent for 12s > 10s"),
            "ping_timeout"
        );
        assert_eq!(reason_kind("replaced by worker 12"), "replaced");
        assert_eq!(reason_kind("`ipcluster kill-retired`"), "kill_retired");
        assert_eq!(reason_kind("something new"), "other");
    }
}
