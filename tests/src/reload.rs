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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ipcluster::steering::band_of;
use serde_json::Value;

use crate::cluster::{DemoReply, demo_get, live_band_pids};

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
        let pid_by_band = live_band_pids(status, Some(number)).into_iter().collect();
        Generation {
            number,
            workers,
            pid_by_band,
        }
    }
}

/// Continuous `GET /` from `clients`, spread over `threads` threads, until
/// [`Load::finish`] (or 120 s, or the value is dropped).
pub struct Load {
    stop: Arc<AtomicBool>,
    /// Requests finished so far, answered or failed (the samples say which).
    finished: Arc<AtomicU64>,
    threads: Vec<JoinHandle<Vec<Sample>>>,
}

impl Load {
    pub fn start(clients: &[IpAddr], threads: usize, target: SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let finished = Arc::new(AtomicU64::new(0));
        let threads = (0..threads)
            .map(|t| {
                let mine: Vec<IpAddr> = clients.iter().copied().skip(t).step_by(threads).collect();
                let (stop, finished) = (stop.clone(), finished.clone());
                std::thread::spawn(move || {
                    let mut samples = Vec::new();
                    let deadline = Instant::now() + Duration::from_secs(120);
                    let mut i = 0usize;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        let client = mine[i % mine.len()];
                        i += 1;
                        let started = Instant::now();
                        let reply = demo_get(client, target).map_err(|e| e.to_string());
                        finished.fetch_add(1, Ordering::Relaxed);
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
        Load {
            stop,
            finished,
            threads,
        }
    }

    /// Wait until `more` requests have finished from now on (answered or
    /// not: [`check_samples`] judges them): the load is seen running (and,
    /// after a switch, meeting what it switched to), however slow the
    /// machine, instead of a fixed sleep. Panics after `timeout` (the load
    /// stops with the value).
    pub fn wait_for_requests(&self, more: u64, timeout: Duration) {
        let from = self.finished.load(Ordering::Relaxed);
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.finished.load(Ordering::Relaxed);
            if now >= from + more {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the load finished {} requests in {timeout:?}, {more} were awaited",
                now - from
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stop the load and return every sample, in no particular order.
    pub fn finish(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        std::mem::take(&mut self.threads)
            .into_iter()
            .flat_map(|t| t.join().unwrap_or_default())
            .collect()
    }
}

impl Drop for Load {
    /// A test that failed before [`Load::finish`] does not leave the load
    /// running against whatever comes next.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
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

impl Verdict {
    /// The first `n` problems, one per line (indented), for a failure message.
    pub fn first_problems(&self, n: usize) -> String {
        self.problems
            .iter()
            .take(n)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n  ")
    }
}

/// Check every sample: answered, by the worker of the client's band in the old
/// or the new generation, and nobody reaching the old generation after the
/// first answer from the new one.
pub fn check_samples(samples: &[Sample], old: &Generation, new: &Generation) -> Verdict {
    let mut verdict = Verdict {
        switched_at: samples
            .iter()
            .filter(|s| s.reply.as_ref().is_ok_and(|r| r.generation == new.number))
            .map(|s| s.ended)
            .min(),
        ..Verdict::default()
    };
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn client(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
    }

    fn generation(number: u64, pids: &[i32]) -> Generation {
        Generation {
            number,
            workers: pids.len() as u32,
            pid_by_band: pids
                .iter()
                .enumerate()
                .map(|(b, &p)| (b as u32, p))
                .collect(),
        }
    }

    /// A request from 127.0.0.`n` started `at` ms after `t0`, lasting 1 ms,
    /// answered by `generation`'s worker of band `band` (pid from `g`).
    fn sample(t0: Instant, at: u64, n: u8, g: &Generation, band: u32) -> Sample {
        let started = t0 + Duration::from_millis(at);
        Sample {
            client: client(n),
            started,
            ended: started + Duration::from_millis(1),
            reply: Ok(DemoReply {
                band,
                pid: g.pid_by_band[&band],
                generation: g.number,
                port: 0,
                client: format!("{}:40000", client(n)),
            }),
        }
    }

    #[test]
    fn a_clean_switch_passes() {
        let (old, new) = (generation(1, &[10, 11]), generation(2, &[20, 21]));
        let t0 = Instant::now();
        // 127.0.0.2 is band 0, 127.0.0.3 band 1 (of 2).
        let samples = vec![
            sample(t0, 0, 2, &old, 0),
            sample(t0, 5, 3, &old, 1),
            sample(t0, 10, 2, &new, 0),
            sample(t0, 15, 3, &new, 1),
        ];
        let verdict = check_samples(&samples, &old, &new);
        assert!(verdict.problems.is_empty(), "{verdict:?}");
        assert_eq!((verdict.answered_by_old, verdict.answered_by_new), (2, 2));
    }

    #[test]
    fn bands_switching_one_at_a_time_are_caught() {
        let (old, new) = (generation(1, &[10, 11]), generation(2, &[20, 21]));
        let t0 = Instant::now();
        let samples = vec![
            sample(t0, 10, 2, &new, 0),
            // Band 1 still on generation 1, started after band 0 got generation 2.
            sample(t0, 15, 3, &old, 1),
        ];
        let verdict = check_samples(&samples, &old, &new);
        assert_eq!(verdict.problems.len(), 1, "{verdict:?}");
        assert!(
            verdict.problems[0].contains("did not switch at once"),
            "{verdict:?}"
        );
    }

    #[test]
    fn another_bands_worker_or_a_failure_is_caught() {
        let (old, new) = (generation(1, &[10, 11]), generation(2, &[20, 21]));
        let t0 = Instant::now();
        // 127.0.0.2 (band 0) answered by band 1's worker; one failure; one
        // answer from a generation that is neither.
        let mut wrong_band = sample(t0, 0, 2, &old, 1);
        wrong_band.client = client(2);
        let mut failed = sample(t0, 1, 3, &old, 1);
        failed.reply = Err("connection reset".into());
        let third = sample(t0, 2, 3, &generation(3, &[30, 31]), 1);
        let verdict = check_samples(&[wrong_band, failed, third], &old, &new);
        assert_eq!(verdict.problems.len(), 3, "{verdict:?}");
    }
}
