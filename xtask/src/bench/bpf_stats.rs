//! Per-program cost of the eBPF programs during the measurements, from the
//! kernel's own run statistics (`kernel.bpf_stats_enabled`: every program
//! accumulates `run_time_ns` and `run_cnt`). Enabled for the bench and
//! restored afterwards; the programs of a cluster are found through the links
//! pinned in its folder, so that other programs on the machine do not count.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result};

const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Keeps `kernel.bpf_stats_enabled` at 1; restores the previous value on drop.
pub struct StatsEnabled {
    previous: String,
}

impl StatsEnabled {
    pub fn enable() -> Result<StatsEnabled> {
        let previous = std::fs::read_to_string(SYSCTL)
            .with_context(|| format!("reading {SYSCTL} (the kernel has no BPF run statistics)"))?
            .trim()
            .to_owned();
        std::fs::write(SYSCTL, "1")
            .with_context(|| format!("writing 1 to {SYSCTL} (needs root)"))?;
        Ok(StatsEnabled { previous })
    }
}

impl Drop for StatsEnabled {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(SYSCTL, &self.previous) {
            eprintln!("bench: restoring {SYSCTL} to {}: {e}", self.previous);
        }
    }
}

/// Program name → (run_time_ns, run_cnt), summed over every program that a
/// link pinned in `/sys/fs/bpf/ipcluster/<cluster>/` runs.
pub type ProgramStats = BTreeMap<String, (u64, u64)>;

fn bpftool_json(args: &[&str]) -> Option<serde_json::Value> {
    let out = Command::new("bpftool").arg("-j").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// The statistics of the programs of `cluster` now (empty without pins).
pub fn sample(cluster: &str) -> ProgramStats {
    let dir = PathBuf::from("/sys/fs/bpf/ipcluster").join(cluster);
    let mut stats = ProgramStats::new();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return stats;
    };
    for entry in entries.flatten() {
        let path: PathBuf = entry.path();
        let Some(prog_id) = link_program(&path) else {
            continue;
        };
        let Some(prog) = bpftool_json(&["prog", "show", "id", &prog_id.to_string()]) else {
            continue;
        };
        let name = prog["name"].as_str().unwrap_or("?").to_owned();
        let ns = prog["run_time_ns"].as_u64().unwrap_or(0);
        let cnt = prog["run_cnt"].as_u64().unwrap_or(0);
        let e = stats.entry(name).or_default();
        e.0 += ns;
        e.1 += cnt;
    }
    stats
}

/// The program id of the link pinned at `path` (`None` for map pins).
fn link_program(path: &Path) -> Option<u64> {
    let path = path.to_str()?;
    bpftool_json(&["link", "show", "pinned", path])?["prog_id"].as_u64()
}

/// The change from `before` to `after`, per program.
pub fn delta(before: &ProgramStats, after: &ProgramStats) -> ProgramStats {
    after
        .iter()
        .map(|(name, &(ns, cnt))| {
            let (ns0, cnt0) = before.get(name).copied().unwrap_or((0, 0));
            (
                name.clone(),
                (ns.saturating_sub(ns0), cnt.saturating_sub(cnt0)),
            )
        })
        .collect()
}
