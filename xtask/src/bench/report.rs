//! Collected figures, medians and spreads, and the report (markdown + SVG chart).

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use anyhow::{Context as _, Result};

use super::{PathKind, load::LoadResult};

#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub rate: f64,
    pub p50: f64,
    pub p99: f64,
    /// CPU of the path's processes (+ ksoftirqd, + the load generator) per request, µs.
    pub cpu_us: f64,
    /// Busy CPU of the whole machine per request, µs (docs/benchmarks.md).
    pub machine_us: f64,
    pub steal: f64,
    pub errors: u64,
}

#[derive(Clone, Debug)]
struct ManySample {
    sample: Sample,
    failures: u64,
    unsticky: usize,
    spread: BTreeMap<String, u64>,
}

#[derive(Clone, Debug)]
pub struct Reload {
    pub backend: String,
    /// How hard the clients pushed, e.g. "paced, 3150 conn/s".
    pub load: String,
    pub attempted: u64,
    pub failed: u64,
    /// From starting the new master until its status shows every band on a live
    /// new-generation worker.
    pub switch_time: Duration,
    /// From starting the new master until every band had answered a client from
    /// the new generation.
    pub clients_switched: Option<Duration>,
    /// The last answer from an old-generation worker, after the reload started.
    pub last_old_answer: Option<Duration>,
    pub bands_per_source_max: usize,
    pub error_kinds: BTreeMap<String, u64>,
}

/// CPU µs by process role, and the requests they served.
type Breakdown = (BTreeMap<String, f64>, f64);
/// Program name → (run ns, runs, requests).
type ProgramCost = BTreeMap<String, (u64, u64, f64)>;

#[derive(Default)]
pub struct Figures {
    pub machine: String,
    single: BTreeMap<(PathKind, bool), Vec<Sample>>,
    many: BTreeMap<(PathKind, bool), Vec<ManySample>>,
    pub reloads: Vec<Reload>,
    pub scale: Vec<String>,
    pub errors: Vec<String>,
    pub wall: Duration,
    pub load_before: f64,
    pub load_after: f64,
    pub steal_overall: f64,
    pub cleanup: String,
    pub rounds: usize,
    pub duration: Duration,
    /// (path, new connections, many addresses) → (µs by role, requests), summed over rounds.
    breakdown: BTreeMap<(PathKind, bool, bool), Breakdown>,
    /// (path, many addresses) → steering counters summed over the measurements.
    counters: BTreeMap<(PathKind, bool), BTreeMap<String, u64>>,
    /// (path, many addresses, new connections) → program name → (run ns, runs,
    /// requests), summed over the measurements (`kernel.bpf_stats_enabled`).
    program_cost: BTreeMap<(PathKind, bool, bool), ProgramCost>,
    /// Over all measurements of cases 1 and 2: machine busy µs, the paths' own µs, capacity µs.
    background: (f64, f64, f64),
}

/// Median and (min, max) of a non-empty list.
fn stats(values: impl Iterator<Item = f64>) -> Option<(f64, f64, f64)> {
    let mut v: Vec<f64> = values.filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    let median = if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    };
    Some((median, v[0], v[v.len() - 1]))
}

type Stat = Option<(f64, f64, f64)>;

fn fmt_stat(s: Stat, decimals: usize) -> String {
    match s {
        None => "—".into(),
        Some((m, lo, hi)) if (hi - lo).abs() < f64::EPSILON => format!("{m:.decimals$}"),
        Some((m, lo, hi)) => format!("{m:.decimals$} ({lo:.decimals$}–{hi:.decimals$})"),
    }
}

fn ratio_value(value: Stat, base: Stat) -> Option<f64> {
    match (value, base) {
        (Some((v, ..)), Some((b, ..))) if b > 0.0 => Some(v / b),
        _ => None,
    }
}

fn ratio(value: Stat, base: Stat) -> String {
    ratio_value(value, base).map_or("—".into(), |r| format!("{r:.2}"))
}

/// `key=value` of a scale line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|t| t.strip_prefix(key)?.strip_prefix('='))
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

impl Figures {
    /// Add the change of the steering counters over one measurement.
    pub fn add_counters(
        &mut self,
        kind: PathKind,
        many: bool,
        before: &Option<serde_json::Value>,
        after: &Option<serde_json::Value>,
    ) {
        let (Some(before), Some(after)) = (before, after) else {
            return;
        };
        let Some(fields) = after.as_object() else {
            return;
        };
        let sums = self.counters.entry((kind, many)).or_default();
        for (name, value) in fields {
            let (Some(a), b) = (value.as_u64(), before[name].as_u64().unwrap_or(0)) else {
                continue;
            };
            *sums.entry(name.clone()).or_default() += a.saturating_sub(b);
        }
    }

    /// Add one measurement's run statistics of a path's eBPF programs.
    pub fn add_program_cost(
        &mut self,
        kind: PathKind,
        many: bool,
        new_conn: bool,
        delta: &BTreeMap<String, (u64, u64)>,
        requests: f64,
    ) {
        let sums = self.program_cost.entry((kind, many, new_conn)).or_default();
        for (name, &(ns, runs)) in delta {
            let e = sums.entry(name.clone()).or_default();
            e.0 += ns;
            e.1 += runs;
            e.2 += requests;
        }
    }

    fn program_cost_markdown(&self, many: bool) -> String {
        let mut md = String::new();
        for ((kind, m, new_conn), programs) in &self.program_cost {
            if *m != many || programs.is_empty() {
                continue;
            }
            let parts: Vec<String> = programs
                .iter()
                .map(|(name, &(ns, runs, requests))| {
                    let per_run = if runs > 0 { ns as f64 / runs as f64 } else { 0.0 };
                    let requests = requests.max(1.0);
                    format!(
                        "`{name}` {per_run:.0} ns per run × {:.2} runs per request = {:.0} ns per request",
                        runs as f64 / requests,
                        ns as f64 / requests
                    )
                })
                .collect();
            let _ = writeln!(
                md,
                "Per-program cost of {} ({}, kernel run statistics `run_time_ns / run_cnt`): {}.\n",
                kind.label(),
                if *new_conn {
                    "new connections"
                } else {
                    "keep-alive"
                },
                parts.join("; ")
            );
        }
        md
    }

    fn counters_markdown(&self, many: bool) -> String {
        let mut md = self.program_cost_markdown(many);
        for kind in [PathKind::Ebpf, PathKind::SkLookup, PathKind::Iptables] {
            let Some(sums) = self.counters.get(&(kind, many)) else {
                continue;
            };
            let text: Vec<String> = sums.iter().map(|(k, v)| format!("{k} {v}")).collect();
            let _ = writeln!(
                md,
                "Steering counters of {} over all measurements above (`ipcluster status --json`): {}.\n",
                kind.label(),
                text.join(", ")
            );
        }
        md
    }

    /// Account one measurement's machine-wide busy time, the path's own share
    /// and the capacity, to report how busy the rest of the machine was.
    pub fn add_background(&mut self, machine_us: f64, path_us: f64, capacity_us: f64) {
        self.background.0 += machine_us;
        self.background.1 += path_us;
        self.background.2 += capacity_us;
    }

    pub fn add_breakdown(
        &mut self,
        kind: PathKind,
        new_conn: bool,
        many: bool,
        by_role: &BTreeMap<String, f64>,
        requests: f64,
    ) {
        let (roles, total) = self.breakdown.entry((kind, new_conn, many)).or_default();
        for (role, us) in by_role {
            *roles.entry(role.clone()).or_default() += us;
        }
        *total += requests;
    }

    fn breakdown_markdown(&self, many: bool) -> String {
        let mut md = String::new();
        let _ = writeln!(
            md,
            "Where the CPU goes (µs per request, all rounds together; kernel work is charged to the \
             process it interrupted):\n"
        );
        let _ = writeln!(md, "| path | mode | by process |\n|---|---|---|");
        for new_conn in [true, false] {
            for kind in PathKind::ALL {
                let Some((roles, requests)) = self.breakdown.get(&(kind, new_conn, many)) else {
                    continue;
                };
                let mut parts: Vec<(&String, f64)> = roles
                    .iter()
                    .map(|(r, us)| (r, us / requests.max(1.0)))
                    .filter(|(_, v)| *v >= 0.05)
                    .collect();
                parts.sort_by(|a, b| b.1.total_cmp(&a.1));
                let text: Vec<String> = parts.iter().map(|(r, v)| format!("{r} {v:.1}")).collect();
                let _ = writeln!(
                    md,
                    "| {} | {} | {} |",
                    kind.label(),
                    if new_conn { "new conn" } else { "keep-alive" },
                    text.join(", ")
                );
            }
        }
        md.push('\n');
        md
    }

    pub fn add_single(&mut self, kind: PathKind, new_conn: bool, sample: Sample) {
        self.single
            .entry((kind, new_conn))
            .or_default()
            .push(sample);
    }

    pub fn add_many(
        &mut self,
        kind: PathKind,
        new_conn: bool,
        r: &mut LoadResult,
        cpu_us: f64,
        machine_us: f64,
        steal: f64,
    ) {
        let sample = Sample {
            rate: r.rate(),
            p50: r.percentile_ms(0.50),
            p99: r.percentile_ms(0.99),
            cpu_us,
            machine_us,
            steal,
            errors: r.failures,
        };
        self.many
            .entry((kind, new_conn))
            .or_default()
            .push(ManySample {
                sample,
                failures: r.failures,
                unsticky: r.unsticky_sources(),
                spread: r.spread(),
            });
    }

    fn single_stat(&self, kind: PathKind, new_conn: bool, f: impl Fn(&Sample) -> f64) -> Stat {
        stats(self.single.get(&(kind, new_conn))?.iter().map(f))
    }

    fn many_stat(&self, kind: PathKind, new_conn: bool, f: impl Fn(&Sample) -> f64) -> Stat {
        stats(
            self.many
                .get(&(kind, new_conn))?
                .iter()
                .map(|m| f(&m.sample)),
        )
    }

    fn scale_line(&self, name: &str, pred: impl Fn(&str) -> bool) -> Option<&str> {
        self.scale.iter().find_map(|l| {
            let (n, rest) = l.split_once(' ').unwrap_or((l, ""));
            (n == name && pred(rest)).then_some(rest)
        })
    }

    /// The goals of issue 7, each with its verdict and margin.
    fn goals(&self) -> Vec<String> {
        let mut out = Vec::new();
        let rate = |k, nc| self.single_stat(k, nc, |s| s.rate);
        let cpu = |k, nc| self.single_stat(k, nc, |s| s.cpu_us);
        match (
            ratio_value(rate(PathKind::Ebpf, true), rate(PathKind::Direct, true)),
            ratio_value(cpu(PathKind::Ebpf, true), cpu(PathKind::Direct, true)),
        ) {
            (Some(r), c) => out.push(format!(
                "eBPF keeps ≥ 97 % of the direct new-connection rate: **{}** — {:.1} % of direct \
                 ({:+.1} points against the goal); CPU per new connection {} direct",
                if r >= 0.97 { "met" } else { "missed" },
                r * 100.0,
                (r - 0.97) * 100.0,
                c.map_or("—".into(), |c| format!("{:.2} ×", c)),
            )),
            _ => out.push("eBPF vs direct new-connection rate: not measured".into()),
        }
        for proxy in [PathKind::Haproxy, PathKind::NginxStream] {
            let mut parts = Vec::new();
            let mut all = true;
            let mut measured = false;
            for (nc, mode) in [(true, "new connections"), (false, "keep-alive")] {
                if let (Some(e), Some(p)) = (
                    ratio_value(rate(PathKind::Ebpf, nc), rate(proxy, nc)),
                    ratio_value(cpu(PathKind::Ebpf, nc), cpu(proxy, nc)),
                ) {
                    all &= e > 1.0 && p < 1.0;
                    measured = true;
                    parts.push(format!(
                        "{mode}: {:.2} × its rate at {:.2} × its CPU per request",
                        e, p
                    ));
                } else {
                    all = false;
                    parts.push(format!("{mode}: not measured"));
                }
            }
            out.push(format!(
                "eBPF beats {}: **{}** — {}",
                proxy.label(),
                match (measured, all) {
                    (false, _) => "not measured",
                    (true, true) => "met",
                    (true, false) => "missed",
                },
                parts.join("; ")
            ));
        }
        out.extend(self.sk_lookup_goals());
        if self.reloads.is_empty() {
            out.push("zero failed connections in every reload: not measured".into());
        } else {
            let failed: Vec<String> = self
                .reloads
                .iter()
                .map(|r| format!("{} ({}) {} of {}", r.backend, r.load, r.failed, r.attempted))
                .collect();
            let ok = self.reloads.iter().all(|r| r.failed == 0) && self.reloads.len() >= 2;
            out.push(format!(
                "zero failed connections in every reload: **{}** — failed: {}",
                if ok { "met" } else { "missed" },
                failed.join(", ")
            ));
        }
        match self
            .scale_line("publish_ebpf", |r| field(r, "bands") == Some("256"))
            .and_then(|r| field(r, "median_us")?.parse::<f64>().ok())
        {
            Some(us) => out.push(format!(
                "256-band publish under 1 ms: **{}** — median {:.0} µs (eBPF backend)",
                if us < 1000.0 { "met" } else { "missed" },
                us
            )),
            None => out.push("256-band publish: not measured".into()),
        }
        out
    }

    /// The sk-lookup goals: CPU per request at most 1.02 × direct, below the
    /// eBPF and iptables backends, for keep-alive and new connections (case 1).
    fn sk_lookup_goals(&self) -> Vec<String> {
        let cpu = |k, nc| self.single_stat(k, nc, |s| s.cpu_us);
        let mut out = Vec::new();
        for (nc, mode) in [(false, "keep-alive"), (true, "new connections")] {
            let Some(direct) = ratio_value(cpu(PathKind::SkLookup, nc), cpu(PathKind::Direct, nc))
            else {
                out.push(format!(
                    "sk-lookup CPU per request ≤ 1.02 × direct ({mode}): not measured"
                ));
                continue;
            };
            let others: Vec<(PathKind, Option<f64>)> = [PathKind::Ebpf, PathKind::Iptables]
                .into_iter()
                .map(|k| (k, ratio_value(cpu(PathKind::SkLookup, nc), cpu(k, nc))))
                .collect();
            let beats = others.iter().all(|(_, r)| r.is_none_or(|r| r < 1.0));
            let text: Vec<String> = others
                .iter()
                .map(|(k, r)| match r {
                    Some(r) => format!("{r:.2} × {}", k.label()),
                    None => format!("{} not measured", k.label()),
                })
                .collect();
            out.push(format!(
                "sk-lookup CPU per request ≤ 1.02 × direct and below the other backends ({mode}): **{}** — {:.3} × direct; {}",
                if direct <= 1.02 && beats { "met" } else { "missed" },
                direct,
                text.join(", ")
            ));
        }
        out
    }

    pub fn markdown(&self, quick: bool) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# ipcluster benchmark\n");
        let _ = writeln!(
            md,
            "{} — {}; {} mode ({} rounds, {} s per measurement), wall time {:.0} s (builds not counted). \
             Load average {:.2} before the run, {:.2} after (it counts the benchmark's own threads too). \
             Other work on this shared machine (other engineers compiling) kept {:.0} % of its CPU busy during \
             the measurements of cases 1 and 2 (machine busy time minus the measured paths' own); \
             steal {:.1} % over the run.\n",
            chrono_like_now(),
            self.machine,
            if quick { "quick" } else { "full" },
            self.rounds,
            self.duration.as_secs(),
            self.wall.as_secs_f64(),
            self.load_before,
            self.load_after,
            (self.background.0 - self.background.1).max(0.0) * 100.0 / self.background.2.max(1.0),
            self.steal_overall,
        );
        let _ = writeln!(
            md,
            "Every path runs in a fresh network namespace (own conntrack, `tcp_max_tw_buckets=0`: no TIME_WAIT \
             carried over); all paths are stood up at once and measured in alternation (order rotated every \
             round, reversed every other), so that drift in the machine's background load falls on all of them \
             alike; figures are medians with (min–max) over rounds. **CPU µs/req** = CPU time of the path's own processes (the client — wrk \
             or the own load generator —, proxy, workers, master) plus ksoftirqd, ÷ requests: this kernel charges softirq work (loopback receive, \
             the tc programs) to the interrupted task, so the figure includes the kernel's share and excludes \
             other work on the shared machine. **machine µs/req** = busy jiffies of the whole machine (steal \
             and idle excluded) ÷ requests, which also counts whatever else ran.\n"
        );
        let _ = writeln!(md, "## Goals\n");
        for g in self.goals() {
            let _ = writeln!(md, "- {g}");
        }
        md.push('\n');
        for (new_conn, title) in [(true, "New connection per request"), (false, "Keep-alive")] {
            let _ = writeln!(
                md,
                "## 1. {title}: one nginx worker (1 process), wrk -t1 -c32\n"
            );
            let _ = writeln!(
                md,
                "| path | req/s | × direct | p50 ms | p99 ms | CPU µs/req | × direct | machine µs/req | steal % | errors |"
            );
            let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|");
            let base_rate = self.single_stat(PathKind::Direct, new_conn, |s| s.rate);
            let base_cpu = self.single_stat(PathKind::Direct, new_conn, |s| s.cpu_us);
            for kind in PathKind::ALL {
                let rate = self.single_stat(kind, new_conn, |s| s.rate);
                let cpu = self.single_stat(kind, new_conn, |s| s.cpu_us);
                let errors: u64 = self
                    .single
                    .get(&(kind, new_conn))
                    .map_or(0, |v| v.iter().map(|s| s.errors).sum());
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {errors} |",
                    kind.label(),
                    fmt_stat(rate, 0),
                    ratio(rate, base_rate),
                    fmt_stat(self.single_stat(kind, new_conn, |s| s.p50), 2),
                    fmt_stat(self.single_stat(kind, new_conn, |s| s.p99), 2),
                    fmt_stat(cpu, 1),
                    ratio(cpu, base_cpu),
                    fmt_stat(self.single_stat(kind, new_conn, |s| s.machine_us), 1),
                    fmt_stat(self.single_stat(kind, new_conn, |s| s.steal), 0),
                );
            }
            md.push('\n');
        }
        md.push_str(&super::repeatability::markdown(&self.single));
        md.push_str(&self.breakdown_markdown(false));
        md.push_str(&self.counters_markdown(false));
        let _ = writeln!(
            md,
            "## 2. 64 client addresses (127.0.0.2–65), 4 workers, own load generator, 64 connections\n"
        );
        let _ = writeln!(
            md,
            "| path | mode | req/s | × direct | p50 ms | p99 ms | CPU µs/req | × direct | failures | sources not sticky | requests per worker |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|");
        for new_conn in [true, false] {
            let base = self.many_stat(PathKind::Direct, new_conn, |s| s.rate);
            let base_cpu = self.many_stat(PathKind::Direct, new_conn, |s| s.cpu_us);
            for kind in PathKind::ALL {
                let Some(samples) = self.many.get(&(kind, new_conn)) else {
                    continue;
                };
                let failures: u64 = samples.iter().map(|m| m.failures).sum();
                let unsticky: usize = samples.iter().map(|m| m.unsticky).max().unwrap_or(0);
                let spread = samples
                    .last()
                    .map(|m| {
                        m.spread
                            .values()
                            .map(u64::to_string)
                            .collect::<Vec<_>>()
                            .join(" / ")
                    })
                    .unwrap_or_default();
                let rate = self.many_stat(kind, new_conn, |s| s.rate);
                let cpu = self.many_stat(kind, new_conn, |s| s.cpu_us);
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {failures} | {unsticky} | {spread} |",
                    kind.label(),
                    if new_conn { "new conn" } else { "keep-alive" },
                    fmt_stat(rate, 0),
                    ratio(rate, base),
                    fmt_stat(self.many_stat(kind, new_conn, |s| s.p50), 2),
                    fmt_stat(self.many_stat(kind, new_conn, |s| s.p99), 2),
                    fmt_stat(cpu, 1),
                    ratio(cpu, base_cpu),
                );
            }
        }
        let _ = writeln!(
            md,
            "\n\"direct\": each client address connects straight to the port of its band's worker (band = low \
             bits of the address, as ipcluster computes it) — the spread steering gives, without steering. \
             \"requests per worker\" is the last round's. \"sources not sticky\" counts client addresses that \
             were answered by more than one worker in one run (0 = stickiness held). The load generator runs \
             64 blocking threads in the benchmark's own process (\"client\" below); its CPU is part of CPU µs/req.\n"
        );
        md.push_str(&self.breakdown_markdown(true));
        md.push_str(&self.counters_markdown(true));
        let _ = writeln!(
            md,
            "## 3. Reload under load (32 client addresses opening a new connection per request, 4 demo workers)\n"
        );
        let _ = writeln!(
            md,
            "| backend | load | connections attempted | failed | master: all bands on the new generation after | clients: every band answered by the new generation after | last old-generation answer | most bands seen by one source |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
        for r in &self.reloads {
            let kinds = if r.error_kinds.is_empty() {
                String::new()
            } else {
                format!(
                    " ({})",
                    r.error_kinds
                        .iter()
                        .map(|(k, n)| format!("{n} {k}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {}{kinds} | {} | {} | {} | {} |",
                r.backend,
                r.load,
                r.attempted,
                r.failed,
                ms(r.switch_time),
                r.clients_switched.map_or("—".into(), ms),
                r.last_old_answer.map_or("—".into(), ms),
                r.bands_per_source_max
            );
        }
        let _ = writeln!(
            md,
            "\nTimes count from starting the second `ipcluster run` (which spawns the new generation band by \
             band, 100 ms apart, waits until each listens, then publishes the whole table). The master's time \
             comes from polling `ipcluster status --json` every 20 ms; the clients' from the demo worker's \
             answers (`band=… generation=…`). \"most bands seen by one source\" = 1 means every client address \
             stayed on its band across the reload. \"Paced\": each of the 32 client slots opens at most one connection \
             per 10 ms; \"saturating\": back to back, which on 2 vCPUs also starves the new workers' start-up \
             and so stretches the switch time.\n"
        );
        md.push_str(&self.scale_markdown());
        if !self.errors.is_empty() {
            let _ = writeln!(md, "\n## Errors\n");
            for e in &self.errors {
                let _ = writeln!(md, "- {e}");
            }
        }
        if !self.cleanup.is_empty() {
            let _ = writeln!(md, "\n{}", self.cleanup);
        }
        md
    }

    fn scale_markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "## 4. Scale\n");
        let _ = writeln!(
            md,
            "Table publish (one service, alternating two tables so every band changes; release build):\n"
        );
        let _ = writeln!(
            md,
            "| backend | 16 bands | 64 bands | 256 bands |\n|---|---|---|---|"
        );
        for kind in ["ebpf", "iptables"] {
            let cells: Vec<String> = ["16", "64", "256"]
                .iter()
                .map(|b| {
                    self.scale_line(&format!("publish_{kind}"), |r| field(r, "bands") == Some(b))
                        .map_or("—".into(), |r| {
                            format!(
                                "{} µs (min {}, {} runs)",
                                field(r, "median_us").unwrap_or("?"),
                                field(r, "min_us").unwrap_or("?"),
                                field(r, "runs").unwrap_or("?")
                            )
                        })
                })
                .collect();
            let _ = writeln!(md, "| {kind} | {} |", cells.join(" | "));
        }
        let _ = writeln!(
            md,
            "\nPer-packet cost of the tc programs (`BPF_PROG_TEST_RUN`, kernel-timed):\n"
        );
        let _ = writeln!(md, "| packet | cost | how |\n|---|---|---|");
        for (name, what) in [
            (
                "packet_ingress_new_flow",
                "ingress: SYN to the service (new flow recorded, port rewritten)",
            ),
            (
                "packet_ingress_flow_hit_rewrite",
                "ingress: ACK of an established flow (flow hit, port rewritten)",
            ),
            (
                "packet_egress_rewrite",
                "egress: reply from the worker (public port restored)",
            ),
            (
                "packet_ingress_nonservice_tcp",
                "ingress: TCP to another port (passes untouched)",
            ),
            ("packet_ingress_udp", "ingress: UDP (passes untouched)"),
        ] {
            if let Some(r) = self.scale_line(name, |_| true) {
                let cost = match (field(r, "median_ns"), field(r, "repeat_avg_ns")) {
                    (Some(m), _) => format!(
                        "{m} ns median (min {} ns)",
                        field(r, "min_ns").unwrap_or("?")
                    ),
                    (None, Some(a)) => match field(r, "single_median_ns") {
                        Some(s) => format!("{a} ns average (single runs: {s} ns median)"),
                        None => format!("{a} ns average"),
                    },
                    _ => r.to_owned(),
                };
                let how = match field(r, "method") {
                    Some(m) if m.starts_with("single_runs=") => {
                        format!("{} single runs", &m["single_runs=".len()..])
                    }
                    Some(m) if m.starts_with("repeat=") => {
                        format!("one run with repeat={}", &m["repeat=".len()..])
                    }
                    _ => String::new(),
                };
                let _ = writeln!(md, "| {what} | {cost} | {how} |");
            }
        }
        md.push_str(&self.packet_kinds_markdown());
        let _ = writeln!(
            md,
            "\nCaveats: with `repeat` the kernel reruns the program on the same buffer, so a packet the \
             program rewrites would, from the second run on, be addressed to the worker port and take another \
             path; rewritten packets are therefore timed one run per syscall (median of 2000), and those \
             figures include the test-run harness's fixed per-call overhead — compare the untouched TCP \
             packet's single-run median with its `repeat` average to see that floor. No real socket, no cache \
             pressure.\n"
        );
        let mut rows = Vec::new();
        for l in &self.scale {
            let (name, rest) = l.split_once(' ').unwrap_or((l, ""));
            if let Some(program) = name.strip_prefix("verifier_") {
                rows.push(format!(
                    "| verifier, {program} | {} instructions processed; {} bytes translated, {} bytes JITed; loaded in {} ms |",
                    field(rest, "verified_insns").unwrap_or("?"),
                    field(rest, "xlated_bytes").unwrap_or("?"),
                    field(rest, "jited_bytes").unwrap_or("?"),
                    field(rest, "load_ms").unwrap_or("?")
                ));
            } else if name == "flow_table_memory" {
                rows.push(format!(
                    "| flow table memory | {} bytes per entry (kernel `memlock` of the map at {} entries); {} MiB at the default {} entries |",
                    field(rest, "bytes_per_entry").unwrap_or("?"),
                    field(rest, "entries_compared").unwrap_or("?"),
                    field(rest, "default_mib").unwrap_or("?"),
                    field(rest, "default_entries").unwrap_or("?")
                ));
            } else if name == "master_64_workers" {
                rows.push(format!(
                    "| master with 64 demo workers | {} % of one CPU over {} s (steady state; goal < 1 %); RSS {} MiB (peak {} MiB); all 64 live after {} s; workers' RSS {} MiB in total |",
                    field(rest, "cpu_pct").unwrap_or("?"),
                    field(rest, "watch_s").unwrap_or("?"),
                    field(rest, "rss_mib").unwrap_or("?"),
                    field(rest, "rss_peak_mib").unwrap_or("?"),
                    field(rest, "startup_s").unwrap_or("?"),
                    field(rest, "cluster_rss_mib").unwrap_or("?")
                ));
            } else if name == "master_idle_connections" {
                rows.push(master_idle_row(rest));
            } else if !name.starts_with("publish_") && !name.starts_with("packet_") {
                rows.push(format!("| {name} | {rest} |"));
            }
        }
        if !rows.is_empty() {
            let _ = writeln!(md, "| measurement | figures |\n|---|---|");
            for r in rows {
                let _ = writeln!(md, "{r}");
            }
        }
        md
    }

    /// Per-packet cost by kind (`packet_kind_*` lines of bench_scale).
    fn packet_kinds_markdown(&self) -> String {
        let mut md = String::new();
        let rows: Vec<String> = [
            (
                "packet_kind_ingress_syn_new",
                "ingress: SYN of a new connection (flow recorded, port rewritten)",
            ),
            (
                "packet_kind_ingress_syn_known",
                "ingress: SYN whose flow is recorded (retransmission, second hook)",
            ),
            (
                "packet_kind_ingress_ack_steered",
                "ingress: ACK of a steered flow (flow hit, port rewritten)",
            ),
            (
                "packet_kind_egress_restore",
                "egress: reply of a steered flow (public port restored)",
            ),
            (
                "packet_kind_ingress_other_tcp",
                "ingress: TCP not for a service (passes)",
            ),
            (
                "packet_kind_egress_other_tcp",
                "egress: TCP not from a worker port (passes)",
            ),
            ("packet_kind_ingress_udp", "ingress: UDP (passes)"),
        ]
        .iter()
        .filter_map(|(name, what)| {
            let r = self.scale_line(name, |_| true)?;
            let ns = field(r, "ns").unwrap_or("?");
            let how = match field(r, "floor_ns") {
                Some(floor) => format!(
                    "single runs: median {} ns less the harness floor {floor} ns",
                    field(r, "single_median_ns").unwrap_or("?")
                ),
                None => format!(
                    "min of 25 batches with repeat (median {} ns; {})",
                    field(r, "median_ns").unwrap_or("?"),
                    field(r, "method").unwrap_or("?")
                ),
            };
            Some(format!("| {what} | **{ns} ns** | {how} |"))
        })
        .collect();
        if !rows.is_empty() {
            let _ = writeln!(
                md,
                "\nBy packet kind (`BPF_PROG_TEST_RUN` with `repeat`, run statistics off; a ping-pong table \
                 keeps a rewritten packet on the path measured, and the programs' counters check every run's \
                 path; the minimum of 25 batches is the figure least disturbed by other work):\n"
            );
            let _ = writeln!(md, "| packet | ns per packet | how |\n|---|---|---|");
            for r in rows {
                let _ = writeln!(md, "{r}");
            }
        }
        md
    }

    /// Bar chart: CPU per request and request rate, × direct, for each path and mode.
    pub fn svg(&self) -> String {
        let kinds: Vec<PathKind> = PathKind::ALL
            .iter()
            .copied()
            .filter(|k| *k != PathKind::Direct)
            .collect();
        let series = [
            ("new-conn CPU/req", true, true, "#d62728"),
            ("keep-alive CPU/req", false, true, "#ff9896"),
            ("new-conn req/s", true, false, "#1f77b4"),
            ("keep-alive req/s", false, false, "#aec7e8"),
        ];
        let (w, h, left, top, bottom) = (760.0, 400.0, 60.0, 60.0, 70.0);
        let plot_h = h - top - bottom;
        // The scale: the largest ratio, rounded up to a multiple of 0.5 (at least 2, at most 6).
        let largest = kinds
            .iter()
            .flat_map(|k| {
                series.iter().filter_map(move |(_, nc, cpu, _)| {
                    let pick = |k| {
                        if *cpu {
                            self.single_stat(k, *nc, |s| s.cpu_us)
                        } else {
                            self.single_stat(k, *nc, |s| s.rate)
                        }
                    };
                    ratio_value(pick(*k), pick(PathKind::Direct))
                })
            })
            .fold(0.0_f64, f64::max);
        let max = ((largest * 2.0).ceil() / 2.0).clamp(2.0, 6.0);
        let group_w = (w - left - 20.0) / kinds.len() as f64;
        let bar_w = group_w / (series.len() as f64 + 1.5);
        let mut svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"{left}\" y=\"20\" font-size=\"14\">Cost of each path relative to a direct connection to the worker (dashed line = direct)</text>\n\
             <text x=\"{left}\" y=\"38\">One nginx worker, wrk -t1 -c32, medians. CPU per request: lower is better; requests/s: higher is better.</text>\n"
        );
        let steps = (max * 2.0).round() as i32;
        for i in 0..=steps {
            let v = f64::from(i) * 0.5;
            let y = top + plot_h * (1.0 - v / max);
            let _ = writeln!(
                svg,
                "<line x1=\"{left}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.1}</text>",
                w - 20.0,
                left - 5.0,
                y + 4.0
            );
        }
        let y1 = top + plot_h * (1.0 - 1.0 / max);
        let _ = writeln!(
            svg,
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{y1:.1}\" y2=\"{y1:.1}\" stroke=\"black\" stroke-dasharray=\"4 3\"/>",
            w - 20.0
        );
        for (gi, kind) in kinds.iter().enumerate() {
            let gx = left + group_w * gi as f64 + bar_w * 0.75;
            for (si, (_, new_conn, cpu, color)) in series.iter().enumerate() {
                let pick = |k| {
                    if *cpu {
                        self.single_stat(k, *new_conn, |s| s.cpu_us)
                    } else {
                        self.single_stat(k, *new_conn, |s| s.rate)
                    }
                };
                let (Some((v, ..)), Some((b, ..))) = (pick(*kind), pick(PathKind::Direct)) else {
                    continue;
                };
                if b <= 0.0 {
                    continue;
                }
                let r = (v / b).min(max);
                let x = gx + bar_w * si as f64;
                let y = top + plot_h * (1.0 - r / max);
                let _ = writeln!(
                    svg,
                    "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{color}\"><title>{:.2}</title></rect>\
                     <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"9\">{:.2}</text>",
                    bar_w * 0.9,
                    top + plot_h - y,
                    v / b,
                    x + bar_w * 0.45,
                    y - 3.0,
                    v / b
                );
            }
            let _ = writeln!(
                svg,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                gx + bar_w * 2.0,
                h - bottom + 16.0,
                kind.short_label()
            );
        }
        for (si, (name, _, _, color)) in series.iter().enumerate() {
            let x = left + 175.0 * si as f64;
            let _ = writeln!(
                svg,
                "<rect x=\"{x}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{color}\"/><text x=\"{}\" y=\"{}\">{name}</text>",
                h - 30.0,
                x + 16.0,
                h - 20.0
            );
        }
        svg.push_str("</svg>\n");
        svg
    }
}

impl PathKind {
    fn short_label(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::Ebpf => "ipcluster eBPF",
            PathKind::Iptables => "ipcluster iptables",
            PathKind::Haproxy => "HAProxy source",
            PathKind::NginxStream => "nginx stream hash",
            PathKind::SkLookup => "ipcluster sk-lookup",
        }
    }
}

fn chrono_like_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

pub fn describe_machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    format!("{cpus} vCPU ({model}), Linux {kernel}, loopback")
}

fn parse_duration_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, factor) = if let Some(v) = s.strip_suffix("us") {
        (v, 0.001)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1000.0)
    } else {
        return None;
    };
    num.trim().parse::<f64>().ok().map(|n| n * factor)
}

/// Socket errors and non-2xx/3xx responses reported by wrk.
pub fn parse_wrk_errors(text: &str) -> u64 {
    let mut errors = 0;
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("Socket errors:") {
            errors += rest
                .split(',')
                .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            errors += rest.trim().parse::<u64>().unwrap_or(0);
        }
    }
    errors
}

/// (requests/s, p50 ms, p99 ms, total requests) from `wrk --latency` output.
pub fn parse_wrk(text: &str) -> Result<(f64, f64, f64, f64)> {
    let rate = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .context("no Requests/sec in wrk output")?;
    let pct = |p: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(p).and_then(parse_duration_ms))
            .unwrap_or(f64::NAN)
    };
    let requests = text
        .lines()
        .find_map(|l| {
            l.trim()
                .split_once(" requests in ")
                .and_then(|(n, _)| n.trim().parse::<f64>().ok())
        })
        .context("no request count in wrk output")?;
    Ok((rate, pct("50%"), pct("99%"), requests))
}

/// A `master_idle_connections` line of the master-scale case, with its goals
/// (at 100k connections: under 3 % of one CPU, `status` within 50 ms).
fn master_idle_row(rest: &str) -> String {
    let get = |k: &str| field(rest, k).unwrap_or("?");
    let at_goal_load = get("connections") == "100000";
    let verdict = |value: &str, limit: f64| match value.parse::<f64>() {
        Ok(v) if at_goal_load && v < limit => " (goal met)",
        Ok(_) if at_goal_load => " (goal missed)",
        _ => "",
    };
    format!(
        "| master, {} idle connections on {} workers, {} backend | {} % of one CPU over {} s{}; \
         `status --json` {} ms median, {} ms max{}; {} counted by status; master RSS {} MiB; \
         opened in {} s |",
        get("connections"),
        get("workers"),
        get("backend"),
        get("cpu_pct"),
        get("watch_s"),
        verdict(get("cpu_pct"), 3.0),
        get("status_p50_ms"),
        get("status_max_ms"),
        verdict(get("status_max_ms"), 50.0),
        get("counted"),
        get("master_rss_mib"),
        get("open_s"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_idle_rows_judge_the_goals_at_100k_only() {
        let met = master_idle_row(
            "backend=ebpf connections=100000 workers=8 counted=100000 cpu_pct=0.60 \
             status_p50_ms=4.7 status_max_ms=13.1 master_rss_mib=13.8 open_s=8.3 watch_s=5",
        );
        assert_eq!(met.matches("(goal met)").count(), 2, "{met}");
        assert!(met.contains("100000 idle connections on 8 workers, ebpf backend"));
        let missed = master_idle_row("connections=100000 cpu_pct=29.78 status_max_ms=509.1");
        assert_eq!(missed.matches("(goal missed)").count(), 2, "{missed}");
        let smaller = master_idle_row("connections=10000 cpu_pct=5.0 status_max_ms=60");
        assert!(!smaller.contains("goal"), "{smaller}");
    }

    #[test]
    fn parses_wrk_output() {
        let out = "Running 2s test @ http://127.0.0.1:8080/\n  1 threads and 32 connections\n  Latency Distribution\n     50%  421.00us\n     75%  500.00us\n     90%    1.10ms\n     99%    2.50ms\n  140000 requests in 2.00s, 20.00MB read\nRequests/sec:  70000.50\nTransfer/sec:     10.00MB\n";
        let (rate, p50, p99, n) = parse_wrk(out).expect("parse");
        assert!((rate - 70000.5).abs() < 1e-6);
        assert!((p50 - 0.421).abs() < 1e-9);
        assert!((p99 - 2.5).abs() < 1e-9);
        assert!((n - 140000.0).abs() < 1e-9);
        assert!(parse_wrk("garbage").is_err());
        assert_eq!(parse_wrk_errors(out), 0);
        let bad = "  Socket errors: connect 3, read 2, write 0, timeout 1\n  Non-2xx or 3xx responses: 4\n";
        assert_eq!(parse_wrk_errors(bad), 10);
    }

    #[test]
    fn packet_kinds_are_reported_from_bench_scale_lines() {
        let figures = Figures {
            scale: vec![
            "packet_kind_ingress_ack_steered kind=ack ns=229 median_ns=232 method=repeat=40000x25"
                .into(),
            "packet_kind_ingress_syn_new kind=syn_new ns=845 single_median_ns=922 floor_ns=77 \
             method=single_runs=2000"
                .into(),
            "verifier_ipcluster_ingress verified_insns=122072 xlated_bytes=52488 \
             jited_bytes=31057 load_ms=442.5"
                .into(),
            ],
            ..Figures::default()
        };
        let md = figures.scale_markdown();
        assert!(md.contains("| ingress: ACK of a steered flow (flow hit, port rewritten) | **229 ns** | min of 25 batches with repeat (median 232 ns; repeat=40000x25) |"), "{md}");
        assert!(
            md.contains("**845 ns** | single runs: median 922 ns less the harness floor 77 ns"),
            "{md}"
        );
        assert!(
            md.contains("122072 instructions processed") && md.contains("loaded in 442.5 ms"),
            "{md}"
        );
        assert!(
            !md.contains("| packet_kind_"),
            "a by-kind line fell into the generic rows: {md}"
        );
    }

    #[test]
    fn median_and_spread() {
        assert_eq!(stats([3.0, 1.0, 2.0].into_iter()), Some((2.0, 1.0, 3.0)));
        assert_eq!(stats([4.0, 1.0].into_iter()), Some((2.5, 1.0, 4.0)));
        assert_eq!(stats(std::iter::empty()), None);
    }
}
