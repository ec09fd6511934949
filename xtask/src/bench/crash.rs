//! Crash recovery: how soon a band is steered away from a SIGKILLed worker
//! (its port leaves the table, a stand-in serves the band) and how soon its
//! replacement is live and steered to — the figures the README quotes, read
//! from `ipcluster status --json` polled as fast as it answers.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::env::{self, Netns};
use super::{BenchOptions, WORK_DIR, ipcluster_run, status_json, stop_cluster, wait_cluster_live};

/// Crashes per backend.
const CRASHES: usize = 5;
const WORKERS: usize = 4;
const BAND: u64 = 0;

/// The port the table steers `BAND` of the first service to.
fn steered_port(status: &serde_json::Value) -> Option<u64> {
    status["table"]["services"][0]["worker_ports"][BAND as usize].as_u64()
}

/// The live worker of `BAND` (pid, port).
fn live_worker(status: &serde_json::Value) -> Option<(i32, u64)> {
    status["workers"].as_array()?.iter().find_map(|w| {
        (w["state"] == "live" && w["band"].as_u64() == Some(BAND))
            .then(|| Some((i32::try_from(w["pid"].as_i64()?).ok()?, w["port"].as_u64()?)))
            .flatten()
    })
}

fn median_ms(mut v: Vec<Duration>) -> String {
    v.sort();
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    match (v.first(), v.get(v.len() / 2), v.last()) {
        (Some(min), Some(mid), Some(max)) => {
            format!("{:.0} ms median ({:.0}–{:.0})", ms(mid), ms(min), ms(max))
        }
        _ => "no sample".into(),
    }
}

/// SIGKILL band 0's live worker `CRASHES` times on `backend`; one line of figures.
pub fn crash_recovery(opts: &BenchOptions, backend: &str) -> Result<String> {
    let mut ns = Netns::create(&format!("{}crash-{backend}", env::PREFIX))?;
    let name = format!("{}crash-{backend}", env::PREFIX);
    let c = ipcluster_run(&ns, &opts.bin, &name, backend, WORKERS);
    ns.spawn(
        c,
        &PathBuf::from(WORK_DIR).join(format!("crash-{backend}.log")),
    )?;
    let mut away = Vec::new();
    let mut replaced = Vec::new();
    let result = (|| -> Result<()> {
        let mut status =
            wait_cluster_live(&ns, &opts.bin, &name, WORKERS, Duration::from_secs(30))?;
        for _ in 0..CRASHES {
            env::check_interrupted()?;
            let (victim, victim_port) =
                live_worker(&status).context("no live worker of band 0 in status")?;
            kill(Pid::from_raw(victim), Signal::SIGKILL)
                .with_context(|| format!("SIGKILL to worker {victim}"))?;
            let killed = Instant::now();
            let mut steered_away = None;
            loop {
                if killed.elapsed() > Duration::from_secs(30) {
                    bail!(
                        "band 0 not served by a replacement within 30 s of the crash of {victim}"
                    );
                }
                let Ok(s) = status_json(&ns, &opts.bin, &name) else {
                    continue;
                };
                let steered = steered_port(&s);
                if steered_away.is_none() && steered.is_some_and(|p| p != victim_port) {
                    steered_away = Some(killed.elapsed());
                }
                if let Some((pid, port)) = live_worker(&s)
                    && pid != victim
                    && steered == Some(port)
                {
                    replaced.push(killed.elapsed());
                    away.push(steered_away.unwrap_or_else(|| killed.elapsed()));
                    status = s;
                    break;
                }
            }
            // Let the cluster settle before the next crash.
            std::thread::sleep(Duration::from_millis(500));
        }
        Ok(())
    })();
    stop_cluster(&ns, &opts.bin, &name);
    result?;
    Ok(format!(
        "crash_recovery_{backend} {WORKERS} workers, {CRASHES} SIGKILLs of band 0's live worker, `status` polled: \
         band steered away from the dead port after {}; replacement live and steered to after {}",
        median_ms(away),
        median_ms(replaced)
    ))
}
