//! What clients see during a reload: continuous load whose every answer is
//! kept (who answered, when the request started and ended) and checked
//! against the two generations' workers, band by band.
//!
//! A request during a reload must be answered by its band's worker of the old
//! or of the new generation — never by another band's worker, never by a
//! third process — and the switch must be one step for every band: once any
//! client got an answer from the new generation, a connection started after
//! that answer never reaches the old generation again, on any band.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ipcluster::steering::band_of;
use serde_json::Value;

use crate::cluster::{DemoReply, demo_get, live_workers};

/// One request of the load: from whom, when, and what came back.
#[derive(Clone, Debug)]
pub struct Sample {
    pub client: IpAddr,
    /// Before `connect()`.
    pub started: Instant,
    pub ended: Instant,
    pub reply: Result<DemoReply, String>,
}

/// A generation as the load checks it: its number, its band count and the
/// pid of its live worker on each band.
#[derive(Clone, Debug)]
pub struct Generation {
    pub number: u64,
    pub workers: u32,
    pub pid_by_band: BTreeMap<u32, i32>,
}

impl Generation {
    /// The live workers of generation `number` in a status report.
    pub fn from_status(status: &Value, number: u64, workers: u32) -> Generation {
        let pid_by_band = live_workers(status, Some(number))
            .iter()
            .filter_map(|w| {
                Some((
                    u32::try_from(w["band"].as_u64()?).ok()?,
                    i32::try_from(w["pid"].as_i64()?).ok()?,
                ))
            })
            .collect();
        Generation {
            number,
            workers,
            pid_by_band,
        }
    }
}

/// Continuous `GET /` from `clients`, spread over `threads` threads, until
/// [`Load::finish`] (or 120 s).
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Vec<Sample>>>,
}

impl Load {
    pub fn start(clients: &[IpAddr], threads: usize, target: SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..threads)
            .map(|t| {
                let mine: Vec<IpAddr> = clients.iter().copied().skip(t).step_by(threads).collect();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut samples = Vec::new();
                    let deadline = Instant::now() + Duration::from_secs(120);
                    let mut i = 0usize;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        let client = mine[i % mine.len()];
                        i += 1;
                        let started = Instant::now();
                        let reply = demo_get(client, target).map_err(|e| e.to_string());
                        samples.push(Sample {
                            client,
                            started,
                            ended: Instant::now(),
                            reply,
                        });
                    }
                    samples
                })
            })
            .collect();
        Load { stop, threads }
    }

    /// Stop the load and return every sample, in no particular order.
    pub fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .flat_map(|t| t.join().unwrap_or_default())
            .collect()
    }
}

/// The result of checking a reload's samples.
#[derive(Debug, Default)]
pub struct Verdict {
    pub problems: Vec<String>,
    /// End of the first request answered by the new generation.
    pub switched_at: Option<Instant>,
    pub answered_by_old: usize,
    pub answered_by_new: usize,
}

/// Check every sample: answered, by the worker of the client's band in the old
/// or the new generation, and nobody reaching the old generation after the
/// first answer from the new one.
pub fn check_samples(samples: &[Sample], old: &Generation, new: &Generation) -> Verdict {
    let mut verdict = Verdict::default();
    verdict.switched_at = samples
        .iter()
        .filter(|s| {
            s.reply
                .as_ref()
                .is_ok_and(|r| r.generation == new.number)
        })
        .map(|s| s.ended)
        .min();
    for s in samples {
        let reply = match &s.reply {
            Ok(reply) => reply,
            Err(e) => {
                verdict.problems.push(format!("{}: failed: {e}", s.client));
                continue;
            }
        };
        let generation = if reply.generation == old.number {
            verdict.answered_by_old += 1;
            old
        } else if reply.generation == new.number {
            verdict.answered_by_new += 1;
            new
        } else {
            verdict.problems.push(format!(
                "{}: answered by generation {} (expected {} or {}): {reply:?}",
                s.client, reply.generation, old.number, new.number
            ));
            continue;
        };
        let band = band_of(s.client, 0, generation.workers);
        let expected = generation.pid_by_band.get(&band).copied();
        if reply.band != band || Some(reply.pid) != expected {
            verdict.problems.push(format!(
                "{}: band {band} of generation {} is worker {expected:?}, but {reply:?} answered",
                s.client, generation.number
            ));
        }
        if !reply.client.starts_with(&format!("{}:", s.client)) {
            verdict.problems.push(format!(
                "{}: the worker saw the client as {}",
                s.client, reply.client
            ));
        }
        if reply.generation == old.number
            && let Some(switched) = verdict.switched_at
            && s.started > switched
        {
            verdict.problems.push(format!(
                "{}: band {band} still reached generation {} {:?} after another client got \
                 generation {} (bands did not switch at once): {reply:?}",
                s.client,
                old.number,
                s.started - switched,
                new.number
            ));
        }
    }
    verdict
}
