//! Collected figures, medians and spreads, and the report (markdown + SVG chart).

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use anyhow::{Context as _, Result};

use super::{PathKind, load::LoadResult};

#[derive(Clone, Copy, Debug)]
struct Sample {
    rate: f64,
    p50: f64,
    p99: f64,
    cpu_us: f64,
    steal: f64,
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
    pub attempted: u64,
    pub failed: u64,
    pub switch_time: Duration,
    pub unsticky: usize,
}

#[derive(Default)]
pub struct Figures {
    pub machine: String,
    single: BTreeMap<(PathKind, bool), Vec<Sample>>,
    many: BTreeMap<(PathKind, bool), Vec<ManySample>>,
    pub reloads: Vec<Reload>,
    pub scale: Vec<String>,
    pub errors: Vec<String>,
    pub wall: Duration,
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

fn fmt_stat(s: Option<(f64, f64, f64)>, decimals: usize) -> String {
    match s {
        None => "—".into(),
        Some((m, lo, hi)) if (hi - lo).abs() < f64::EPSILON => format!("{m:.decimals$}"),
        Some((m, lo, hi)) => format!("{m:.decimals$} ({lo:.decimals$}–{hi:.decimals$})"),
    }
}

fn ratio(value: Option<(f64, f64, f64)>, base: Option<(f64, f64, f64)>) -> String {
    match (value, base) {
        (Some((v, ..)), Some((b, ..))) if b > 0.0 => format!("{:.2}", v / b),
        _ => "—".into(),
    }
}

impl Figures {
    #[expect(clippy::too_many_arguments, reason = "one row of figures")]
    pub fn add_single(
        &mut self,
        kind: PathKind,
        new_conn: bool,
        rate: f64,
        p50: f64,
        p99: f64,
        cpu_us: f64,
        steal: f64,
    ) {
        self.single
            .entry((kind, new_conn))
            .or_default()
            .push(Sample {
                rate,
                p50,
                p99,
                cpu_us,
                steal,
            });
    }

    pub fn add_many(&mut self, kind: PathKind, new_conn: bool, r: &mut LoadResult, cpu_us: f64) {
        let sample = Sample {
            rate: r.rate(),
            p50: r.percentile_ms(0.50),
            p99: r.percentile_ms(0.99),
            cpu_us,
            steal: 0.0,
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

    fn single_stat(
        &self,
        kind: PathKind,
        new_conn: bool,
        f: impl Fn(&Sample) -> f64,
    ) -> Option<(f64, f64, f64)> {
        stats(self.single.get(&(kind, new_conn))?.iter().map(f))
    }

    fn many_stat(
        &self,
        kind: PathKind,
        new_conn: bool,
        f: impl Fn(&Sample) -> f64,
    ) -> Option<(f64, f64, f64)> {
        stats(
            self.many
                .get(&(kind, new_conn))?
                .iter()
                .map(|m| f(&m.sample)),
        )
    }

    pub fn markdown(&self, quick: bool) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# ipcluster benchmark\n");
        let _ = writeln!(
            md,
            "{} — {}; {} mode, wall time {:.0} s. Every path runs in a fresh network namespace; paths interleaved, \
             order reversed every other round; figures are medians with (min–max) over rounds. CPU/req = busy \
             jiffies (user+nice+system+irq+softirq, steal and idle excluded) of the whole machine ÷ requests.\n",
            chrono_like_now(),
            self.machine,
            if quick { "quick" } else { "full" },
            self.wall.as_secs_f64()
        );
        for (new_conn, title) in [(true, "New connection per request"), (false, "Keep-alive")] {
            let _ = writeln!(md, "## 1. {title}: one nginx worker, wrk -t1 -c32\n");
            let _ = writeln!(
                md,
                "| path | req/s | × direct | p50 ms | p99 ms | CPU µs/req | × direct | steal % |"
            );
            let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
            let base_rate = self.single_stat(PathKind::Direct, new_conn, |s| s.rate);
            let base_cpu = self.single_stat(PathKind::Direct, new_conn, |s| s.cpu_us);
            for kind in PathKind::ALL {
                let rate = self.single_stat(kind, new_conn, |s| s.rate);
                let cpu = self.single_stat(kind, new_conn, |s| s.cpu_us);
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} | {} | {} |",
                    kind.label(),
                    fmt_stat(rate, 0),
                    ratio(rate, base_rate),
                    fmt_stat(self.single_stat(kind, new_conn, |s| s.p50), 2),
                    fmt_stat(self.single_stat(kind, new_conn, |s| s.p99), 2),
                    fmt_stat(cpu, 1),
                    ratio(cpu, base_cpu),
                    fmt_stat(self.single_stat(kind, new_conn, |s| s.steal), 0),
                );
            }
            md.push('\n');
        }
        let _ = writeln!(
            md,
            "## 2. 64 client addresses (127.0.0.2–65), 4 workers, own load generator, 64 connections\n"
        );
        let _ = writeln!(
            md,
            "| path | mode | req/s | × direct | p50 ms | p99 ms | CPU µs/req | failures | sources not sticky | requests per worker |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|");
        for new_conn in [true, false] {
            let base = self.many_stat(PathKind::Direct, new_conn, |s| s.rate);
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
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} | {} | {failures} | {unsticky} | {spread} |",
                    kind.label(),
                    if new_conn { "new conn" } else { "keep-alive" },
                    fmt_stat(rate, 0),
                    ratio(rate, base),
                    fmt_stat(self.many_stat(kind, new_conn, |s| s.p50), 2),
                    fmt_stat(self.many_stat(kind, new_conn, |s| s.p99), 2),
                    fmt_stat(self.many_stat(kind, new_conn, |s| s.cpu_us), 1),
                );
            }
        }
        let _ = writeln!(
            md,
            "\n(\"direct\" with 64 addresses always reaches worker 0; its spread column is not a band spread.)\n"
        );
        let _ = writeln!(
            md,
            "## 3. Reload under load (32 client addresses opening connections continuously, 4 demo workers)\n"
        );
        let _ = writeln!(
            md,
            "| backend | connections attempted | failed | time until every band serves the new generation | sources not sticky |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|");
        for r in &self.reloads {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.0} ms | {} |",
                r.backend,
                r.attempted,
                r.failed,
                r.switch_time.as_secs_f64() * 1000.0,
                r.unsticky
            );
        }
        let _ = writeln!(
            md,
            "\n(A source is \"not sticky\" here when it was answered by more than one worker port or generation; \
             across a reload that is expected for *new* connections, which move to the new generation.)\n"
        );
        let _ = writeln!(md, "## 4. Scale\n");
        let _ = writeln!(md, "| measurement | figures |");
        let _ = writeln!(md, "|---|---|");
        for line in &self.scale {
            let (name, rest) = line.split_once(' ').unwrap_or((line, ""));
            let _ = writeln!(md, "| {name} | {rest} |");
        }
        if !self.errors.is_empty() {
            let _ = writeln!(md, "\n## Errors\n");
            for e in &self.errors {
                let _ = writeln!(md, "- {e}");
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
        let (w, h, left, top, bottom) = (760.0, 380.0, 60.0, 40.0, 70.0);
        let plot_h = h - top - bottom;
        let max = 3.0_f64;
        let group_w = (w - left - 20.0) / kinds.len() as f64;
        let bar_w = group_w / (series.len() as f64 + 1.5);
        let mut svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"{left}\" y=\"20\" font-size=\"14\">Steering cost relative to a direct connection (1.0 = direct; CPU: lower is better, req/s: higher is better)</text>\n"
        );
        for i in 0..=6 {
            let v = max * f64::from(i) / 6.0;
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
                    "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{color}\"><title>{:.2}</title></rect>",
                    bar_w * 0.9,
                    top + plot_h - y,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_output() {
        let out = "Running 2s test @ http://127.0.0.1:8080/\n  1 threads and 32 connections\n  Latency Distribution\n     50%  421.00us\n     75%  500.00us\n     90%    1.10ms\n     99%    2.50ms\n  140000 requests in 2.00s, 20.00MB read\nRequests/sec:  70000.50\nTransfer/sec:     10.00MB\n";
        let (rate, p50, p99, n) = parse_wrk(out).expect("parse");
        assert!((rate - 70000.5).abs() < 1e-6);
        assert!((p50 - 0.421).abs() < 1e-9);
        assert!((p99 - 2.5).abs() < 1e-9);
        assert!((n - 140000.0).abs() < 1e-9);
        assert!(parse_wrk("garbage").is_err());
    }

    #[test]
    fn median_and_spread() {
        assert_eq!(stats([3.0, 1.0, 2.0].into_iter()), Some((2.0, 1.0, 3.0)));
        assert_eq!(stats([4.0, 1.0].into_iter()), Some((2.5, 1.0, 4.0)));
        assert_eq!(stats(std::iter::empty()), None);
    }
}
