//! Round-by-round ratios of case 1, so that a reader can tell a real
//! difference between two runs from noise: each path's CPU per request is
//! divided by the direct path's **of the same round** (they ran minutes
//! apart at most, in alternation), and a round is flagged when the machine
//! was disturbed while either of the two ran (steal, or much work outside the
//! measured processes) or its ratio lies far from the others.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::PathKind;
use super::report::Sample;

/// Steal above this (percent of the machine) makes a round unreliable.
pub const MAX_STEAL_PCT: f64 = 5.0;
/// Work of other processes above this share of the machine's busy time.
pub const MAX_BACKGROUND: f64 = 0.30;
/// A ratio further than this from the median of the rounds.
pub const MAX_DEVIATION: f64 = 0.10;

/// One round's paired ratio and why it is not to be trusted (empty: fine).
#[derive(Clone, Debug, PartialEq)]
pub struct Round {
    pub ratio: f64,
    pub flags: Vec<String>,
}

/// Share of the machine's busy time spent outside the path's processes.
fn background(s: &Sample) -> f64 {
    if s.machine_us <= 0.0 {
        return 0.0;
    }
    ((s.machine_us - s.cpu_us) / s.machine_us).clamp(0.0, 1.0)
}

fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some(values[values.len() / 2])
}

/// Paired ratios path ÷ direct, round by round, with flags.
pub fn rounds(path: &[Sample], direct: &[Sample]) -> Vec<Round> {
    let mut out: Vec<Round> = path
        .iter()
        .zip(direct)
        .filter(|(p, d)| p.cpu_us > 0.0 && d.cpu_us > 0.0)
        .map(|(p, d)| {
            let mut flags = Vec::new();
            let steal = p.steal.max(d.steal);
            if steal > MAX_STEAL_PCT {
                flags.push(format!("steal {steal:.0} %"));
            }
            let other = background(p).max(background(d));
            if other > MAX_BACKGROUND {
                flags.push(format!("other work {:.0} %", other * 100.0));
            }
            Round {
                ratio: p.cpu_us / d.cpu_us,
                flags,
            }
        })
        .collect();
    let mut all: Vec<f64> = out.iter().map(|r| r.ratio).collect();
    if let Some(m) = median(&mut all) {
        for r in &mut out {
            if (r.ratio - m).abs() > MAX_DEVIATION * m {
                r.flags.push(format!(
                    "{:+.0} % off the median",
                    (r.ratio / m - 1.0) * 100.0
                ));
            }
        }
    }
    out
}

/// Median of the unflagged rounds (of all rounds when every one is flagged),
/// spread (max − min) of the same, and how many rounds it uses.
pub fn summary(rounds: &[Round]) -> Option<(f64, f64, usize)> {
    let mut clean: Vec<f64> = rounds
        .iter()
        .filter(|r| r.flags.is_empty())
        .map(|r| r.ratio)
        .collect();
    if clean.is_empty() {
        clean = rounds.iter().map(|r| r.ratio).collect();
    }
    let n = clean.len();
    let m = median(&mut clean)?;
    let spread = clean.last()? - clean.first()?;
    Some((m, spread, n))
}

/// The repeatability section of the report.
pub fn markdown(single: &BTreeMap<(PathKind, bool), Vec<Sample>>) -> String {
    let mut md = String::new();
    let mut rows = Vec::new();
    for (new_conn, mode) in [(true, "new connection"), (false, "keep-alive")] {
        let Some(direct) = single.get(&(PathKind::Direct, new_conn)) else {
            continue;
        };
        for kind in PathKind::ALL {
            if kind == PathKind::Direct {
                continue;
            }
            let Some(path) = single.get(&(kind, new_conn)) else {
                continue;
            };
            let rounds = rounds(path, direct);
            let Some((m, spread, used)) = summary(&rounds) else {
                continue;
            };
            let each: Vec<String> = rounds
                .iter()
                .map(|r| {
                    if r.flags.is_empty() {
                        format!("{:.2}", r.ratio)
                    } else {
                        format!("~~{:.2}~~ ({})", r.ratio, r.flags.join(", "))
                    }
                })
                .collect();
            rows.push(format!(
                "| {} | {mode} | **{m:.2}** | {spread:.2} | {used} of {} | {} |",
                kind.label(),
                rounds.len(),
                each.join("; ")
            ));
        }
    }
    if rows.is_empty() {
        return md;
    }
    let _ = writeln!(
        md,
        "### Repeatability: CPU per request ÷ direct, round by round (case 1)\n\n\
         Each round's ratio divides a path's CPU per request by the direct path's of the **same round**. \
         A round is struck out when, while the path or direct ran, steal exceeded {MAX_STEAL_PCT:.0} %, \
         processes outside the measured ones took more than {:.0} % of the machine's busy time, or its ratio \
         lies more than {:.0} % from the median; the median and spread are over the rounds left. Two runs \
         agree when their medians differ by less than their spreads; when they do not, the struck-out rounds \
         and the machine line at the top say why.\n",
        MAX_BACKGROUND * 100.0,
        MAX_DEVIATION * 100.0
    );
    let _ = writeln!(
        md,
        "| path | mode | median × direct | spread | rounds used | each round |\n|---|---|---|---|---|---|"
    );
    for r in rows {
        let _ = writeln!(md, "{r}");
    }
    md.push('\n');
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(cpu_us: f64, machine_us: f64, steal: f64) -> Sample {
        Sample {
            rate: 1000.0,
            p50: 1.0,
            p99: 2.0,
            cpu_us,
            machine_us,
            steal,
            errors: 0,
        }
    }

    #[test]
    fn paired_ratios_flag_disturbed_rounds() {
        let direct = vec![
            sample(100.0, 110.0, 0.0),
            sample(100.0, 110.0, 0.0),
            sample(100.0, 110.0, 12.0),
            sample(100.0, 200.0, 0.0),
            sample(100.0, 110.0, 0.0),
        ];
        let path = vec![
            sample(110.0, 120.0, 0.0),
            sample(112.0, 120.0, 0.0),
            sample(140.0, 150.0, 0.0),
            sample(111.0, 120.0, 0.0),
            sample(150.0, 160.0, 0.0),
        ];
        let r = rounds(&path, &direct);
        assert_eq!(r.len(), 5);
        assert!(r[0].flags.is_empty() && r[1].flags.is_empty());
        assert!(
            r[2].flags.iter().any(|f| f.starts_with("steal")),
            "{:?}",
            r[2]
        );
        assert!(
            r[3].flags.iter().any(|f| f.starts_with("other work")),
            "{:?}",
            r[3]
        );
        assert!(
            r[4].flags.iter().any(|f| f.contains("off the median")),
            "{:?}",
            r[4]
        );
        let (m, spread, used) = summary(&r).expect("a summary");
        assert_eq!(used, 2);
        assert!((m - 1.12).abs() < 1e-9, "{m}");
        assert!((spread - 0.02).abs() < 1e-9, "{spread}");
    }

    #[test]
    fn every_round_flagged_still_gives_a_median() {
        let direct = vec![sample(100.0, 110.0, 20.0); 3];
        let path = vec![sample(120.0, 130.0, 20.0); 3];
        let (m, spread, used) = summary(&rounds(&path, &direct)).expect("a summary");
        assert_eq!(used, 3);
        assert!((m - 1.2).abs() < 1e-9);
        assert_eq!(spread, 0.0);
    }
}
