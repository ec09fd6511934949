//! `ipcluster status`: the report as a table for people (the JSON form is
//! [`StatusReport`] itself), and the report built without a master, from the
//! state file, /proc and the kernel, when the master is gone.

use std::fmt::Write as _;
use std::time::Instant;

use anyhow::{Context as _, Result};

use super::process_tree::{self, ProcessTable, SocketTable};
use super::state::ClusterState;
use super::supervisor::Worker;
use crate::policy::WorkerState;
use crate::protocol::{StatusReport, WorkerStatus};
use crate::steering;

/// What `status` says of a worker the master supervises.
pub(super) fn worker_status(w: &Worker, now: Instant) -> WorkerStatus {
    WorkerStatus {
        pid: w.pid,
        band: w.band,
        generation: w.generation,
        state: w.state,
        port: w.ports.first().copied().unwrap_or(0),
        ports: w.ports.clone(),
        rss: w.rss,
        connections: w.connections,
        uptime: now.duration_since(w.started_at).as_secs(),
        nice: w.nice,
        aware: w.hello_at.is_some() || w.last_ping.is_some(),
        last_ping_ago: w.last_ping.map(|t| now.duration_since(t).as_secs_f64()),
        reason: w.reason.clone(),
        stats: w.stats.clone(),
        app: w.app.clone(),
    }
}

/// The table people read.
pub fn render(report: &StatusReport) -> String {
    let mut out = String::new();
    let master = report.master_pid.map_or(
        "none (traffic keeps flowing; run `ipcluster run` to adopt)".into(),
        |p| p.to_string(),
    );
    let listens: Vec<String> = report.listens.iter().map(|l| l.to_string()).collect();
    let _ = writeln!(
        out,
        "cluster {}  backend {}  generation {}  master {}",
        report.name, report.backend, report.generation, master
    );
    let _ = writeln!(
        out,
        "listen {}  bands {}  band shift {}  memory: master {}  cluster {}",
        listens.join(" "),
        report.bands,
        report.band_shift,
        size(report.master_rss),
        size(report.cluster_rss)
    );
    if let Some(l) = &report.limits {
        let _ = writeln!(
            out,
            "limits: worker rss {}  cluster {} (ask retired workers to die above {}, kill above {})",
            size(l.worker_rss_limit),
            size(l.cluster_memory_limit),
            size(l.low_watermark),
            size(l.high_watermark)
        );
    }
    let _ = writeln!(
        out,
        "\n{:>8} {:>5} {:>4} {:<9} {:>6} {:>10} {:>6} {:>8} {:>5}  WHY",
        "PID", "BAND", "GEN", "STATE", "PORT", "RSS", "CONNS", "UPTIME", "NICE"
    );
    for w in &report.workers {
        let state = match w.state {
            WorkerState::Starting => "starting",
            WorkerState::Live => "live",
            WorkerState::Retired => "retired",
            WorkerState::Dying => "dying",
        };
        let line = format!(
            "{:>8} {:>5} {:>4} {:<9} {:>6} {:>10} {:>6} {:>8} {:>5}  {}",
            w.pid,
            w.band,
            w.generation,
            state,
            w.port,
            size(w.rss),
            w.connections,
            duration(w.uptime),
            w.nice,
            w.reason.as_deref().unwrap_or("")
        );
        let _ = writeln!(out, "{}", line.trim_end());
        if let Some(reported) = reported(w) {
            let _ = writeln!(out, "{:>8} {reported}", "");
        }
    }
    match &report.table {
        Some(table) => {
            let _ = writeln!(out, "\nsteering table (band → worker port):");
            for service in &table.services {
                let bands: Vec<String> = service
                    .worker_ports
                    .iter()
                    .enumerate()
                    .map(|(band, port)| format!("{band}→{port}"))
                    .collect();
                let _ = writeln!(
                    out,
                    "  {:<22} {}",
                    service.listen.to_string(),
                    bands.join(" ")
                );
            }
        }
        None => {
            let _ = writeln!(out, "\nsteering table: none published yet");
        }
    }
    if let Some(c) = &report.counters
        && report.backend == crate::steering::BackendKind::SkLookup
    {
        let _ = writeln!(
            out,
            "counters: assigned {}  fallbacks {}  misses {}",
            c.assigned, c.fallbacks, c.misses
        );
    } else if let Some(c) = &report.counters {
        let _ = writeln!(
            out,
            "counters: steered {}  new flows {}  flow hits {}  table misses {}  egress rewrites {}  passed {}",
            c.steered, c.new_flows, c.flow_hits, c.table_misses, c.egress_rewrites, c.passed
        );
    }
    out
}

/// Longest `stats`/`app` text shown per worker in the table.
const REPORTED_MAX: usize = 160;

/// `stats {"requests":3}  app {"version":"1.4.2"}`: what the worker's latest
/// ping said, compact JSON on one line, when it said anything.
fn reported(w: &WorkerStatus) -> Option<String> {
    let parts: Vec<String> = [("stats", &w.stats), ("app", &w.app)]
        .into_iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(name, v)| {
            format!(
                "{name} {}",
                super::control::printable(&v.to_string(), REPORTED_MAX)
            )
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join("  "))
}

fn size(bytes: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    if bytes >= 1 << 30 {
        format!("{:.1}GiB", bytes as f64 / (MIB * 1024.0))
    } else {
        format!("{:.1}MiB", bytes as f64 / MIB)
    }
}

fn duration(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s => format!("{}h", s / 3600),
    }
}

/// The report of a cluster whose master is gone: workers from /proc (live
/// when the table in force points at them), the table read from the kernel.
pub fn offline_report(state: &ClusterState) -> Result<StatusReport> {
    let processes = ProcessTable::read()?;
    let sockets = SocketTable::read()?;
    let steering = steering::backend(state.backend, state.steering_config())
        .with_context(|| format!("opening the {} steering", state.backend))?;
    let table = steering.read_table().unwrap_or_else(|e| {
        log::warn!("cannot read the steering table: {e}");
        None
    });
    let counters = steering.counters().ok();
    let publics = super::public_ports(&state.listens);
    let live_ports: Vec<u16> = table
        .iter()
        .flat_map(|t| {
            t.services
                .iter()
                .flat_map(|s| s.worker_ports.iter().copied())
        })
        .collect();
    let mut workers = Vec::new();
    for adopted in super::client::find_offline(&state.name, Some(state))? {
        let found = adopted.worker;
        let ports: Vec<u16> = publics.iter().map(|&p| found.port_for(p)).collect();
        let m = process_tree::measure(&processes, &sockets, found.pid, &ports, &publics);
        let state = if live_ports.contains(&found.port) {
            WorkerState::Live
        } else {
            WorkerState::Retired
        };
        workers.push(WorkerStatus {
            pid: found.pid,
            band: found.band,
            generation: found.generation,
            state,
            port: found.port,
            ports,
            rss: m.rss,
            connections: m.connections,
            uptime: process_tree::age_secs(found.pid).unwrap_or(0.0) as u64,
            nice: m.nice,
            aware: false,
            last_ping_ago: None,
            reason: None,
            stats: serde_json::Value::Null,
            app: serde_json::Value::Null,
        });
    }
    let cluster_rss = workers.iter().map(|w| w.rss).sum();
    Ok(StatusReport {
        name: state.name.clone(),
        backend: state.backend,
        generation: state.generation,
        master_pid: None,
        listens: state.listens.clone(),
        bands: state.bands,
        band_shift: state.band_shift,
        workers,
        table,
        counters,
        master_rss: 0,
        cluster_rss,
        limits: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn worker(pid: i32, stats: Value, app: Value) -> WorkerStatus {
        WorkerStatus {
            pid,
            band: 0,
            generation: 1,
            state: WorkerState::Live,
            port: 20000,
            ports: vec![20000],
            rss: 0,
            connections: 0,
            uptime: 5,
            nice: 0,
            aware: !stats.is_null() || !app.is_null(),
            last_ping_ago: None,
            reason: None,
            stats,
            app,
        }
    }

    fn report(workers: Vec<WorkerStatus>) -> StatusReport {
        StatusReport {
            name: "web".into(),
            backend: steering::BackendKind::Ebpf,
            generation: 1,
            master_pid: Some(1),
            listens: vec!["127.0.0.1:8080".parse().expect("address")],
            bands: 1,
            band_shift: 0,
            workers,
            table: None,
            counters: None,
            master_rss: 0,
            cluster_rss: 0,
            limits: None,
        }
    }

    /// The lines of the worker table after the worker line of `pid`, up to the next one.
    fn lines_after(text: &str, pid: i32) -> Vec<String> {
        let mut lines = text
            .lines()
            .skip_while(|l| !l.trim_start().starts_with(&format!("{pid} ")));
        lines.next();
        lines
            .take_while(|l| l.starts_with("         ") && !l.trim().is_empty())
            .map(|l| l.trim().to_owned())
            .collect()
    }

    #[test]
    fn what_workers_report_is_one_compact_line_under_their_own() {
        let long = "x".repeat(REPORTED_MAX * 2);
        let cases: [(Value, Value, Option<String>); 5] = [
            (Value::Null, Value::Null, None),
            (
                json!({"requests": 3}),
                Value::Null,
                Some(r#"stats {"requests":3}"#.into()),
            ),
            (
                Value::Null,
                json!({"version": "1.4.2"}),
                Some(r#"app {"version":"1.4.2"}"#.into()),
            ),
            (
                json!({"sessions": 12, "queue": [1, 2]}),
                json!({"version": "1.4.2"}),
                Some(r#"stats {"queue":[1,2],"sessions":12}  app {"version":"1.4.2"}"#.into()),
            ),
            (
                json!({"note": "a\nb", "long": long}),
                Value::Null,
                Some(format!(
                    "stats {}…",
                    &format!(r#"{{"long":"{long}","note":"a\nb"}}"#)[..REPORTED_MAX]
                )),
            ),
        ];
        for (stats, app, expected) in cases {
            let text = render(&report(vec![
                worker(101, stats.clone(), app.clone()),
                worker(102, Value::Null, Value::Null),
            ]));
            let under = lines_after(&text, 101);
            assert_eq!(
                under,
                expected.clone().into_iter().collect::<Vec<_>>(),
                "stats {stats} app {app}:\n{text}"
            );
            assert!(lines_after(&text, 102).is_empty(), "{text}");
            assert!(text.lines().all(|l| !l.contains('\n')), "{text}");
        }
    }

    #[test]
    fn a_supervised_worker_is_reported_with_its_latest_ping() {
        let start = Instant::now();
        let mut w = Worker::new(42, 3, 2, WorkerState::Live, vec![20001, 20002], start);
        let quiet = worker_status(&w, start + std::time::Duration::from_secs(7));
        assert_eq!((quiet.port, quiet.uptime, quiet.aware), (20001, 7, false));
        assert_eq!((quiet.stats, quiet.app), (Value::Null, Value::Null));
        w.last_ping = Some(start + std::time::Duration::from_secs(5));
        (w.stats, w.app) = (json!({"requests": 9}), json!({"version": "2"}));
        let pinged = worker_status(&w, start + std::time::Duration::from_secs(7));
        assert!(pinged.aware);
        assert_eq!(pinged.last_ping_ago, Some(2.0));
        assert_eq!(pinged.stats, json!({"requests": 9}));
        assert_eq!(pinged.app, json!({"version": "2"}));
    }

    #[test]
    fn stats_and_app_are_null_in_json_when_never_pinged() {
        let json = serde_json::to_value(worker(7, Value::Null, Value::Null)).expect("json");
        assert_eq!(json["stats"], Value::Null);
        assert_eq!(json["app"], Value::Null);
        let json = serde_json::to_value(worker(7, json!({"a": 1}), json!("v2"))).expect("json");
        assert_eq!(json["stats"], json!({"a": 1}));
        assert_eq!(json["app"], json!("v2"));
    }
}
