//! A band whose worker is gone must not keep pointing at that worker's port:
//! a worker port is an unprivileged port, and any local user who binds it
//! once it is free would receive the band's new clients. So the moment a
//! worker exits (and when a master starts and finds a table pointing at ports
//! no worker holds), each band it served is steered to a stand-in until its
//! replacement is ready:
//!
//! 1. a retired worker of the same band, newest generation first: the
//!    clients of that band were its clients before the reload, so whatever
//!    per-client state it kept (sessions, caches) is still valid there;
//! 2. otherwise the live worker of the nearest band above (wrapping around):
//!    a live worker of the current generation, which can serve anyone, only
//!    without the band's in-memory state; the nearest-band rule is
//!    deterministic and spreads two crashed bands over different workers.
//!
//! Dying workers and workers not ready yet are never stand-ins. With no
//! worker left at all, the table cannot point anywhere better and is left
//! as is (logged). Stickiness resumes when the replacement is promoted.

use std::collections::HashSet;

use super::supervisor::Worker;
use crate::policy::WorkerState;

/// The worker to serve `band` (of `bands`) for now, by the rules above.
pub fn stand_in<'a>(
    band: u32,
    bands: u32,
    candidates: impl Iterator<Item = &'a Worker> + Clone,
) -> Option<i32> {
    let usable = |c: &&Worker| c.ready && !c.killed;
    let same_band = candidates
        .clone()
        .filter(usable)
        .filter(|c| c.band == band && c.state == WorkerState::Retired)
        .max_by_key(|c| (c.generation, c.pid));
    if let Some(c) = same_band {
        return Some(c.pid);
    }
    let bands = bands.max(1);
    candidates
        .filter(usable)
        .filter(|c| c.state == WorkerState::Live)
        .min_by_key(|c| ((c.band + bands - band % bands) % bands, c.generation, c.pid))
        .map(|c| c.pid)
}

impl super::Master {
    /// Steer every band whose port no known worker holds to a stand-in.
    /// Not while a generation's table is being written: the bands are
    /// looked at again once it is in force.
    pub(super) fn cover_unserved_bands(&mut self) {
        if self.publishing || self.stopping {
            return;
        }
        let Some(table) = self.table.clone() else {
            return;
        };
        if table.services.len() != self.cfg.listens.len() {
            return;
        }
        let held: HashSet<u16> = self
            .core
            .workers
            .values()
            .flat_map(|w| w.ports.iter().copied())
            .collect();
        let bands = u32::try_from(table.bands()).unwrap_or(u32::MAX);
        for (service, route) in table.services.iter().enumerate() {
            for (band, &port) in route.worker_ports.iter().enumerate() {
                let band = u32::try_from(band).unwrap_or(u32::MAX);
                if held.contains(&port) {
                    continue;
                }
                let Some(pid) = stand_in(band, bands, self.core.workers.values()) else {
                    log::warn!(
                        "band {band} of {}: port {port} has no worker and no worker is left \
                         to stand in",
                        route.listen
                    );
                    continue;
                };
                let Some(w) = self.core.workers.get(&pid) else {
                    continue;
                };
                let Some(&to) = self.cfg.service_ports(&w.ports).get(service) else {
                    continue;
                };
                let who = format!(
                    "worker {pid} ({} band {}, generation {})",
                    state_word(w.state),
                    w.band,
                    w.generation
                );
                if !self.covering.insert((service, band)) {
                    continue;
                }
                let purpose = super::BandPurpose::StandIn { who, from: port };
                self.write_steering(Box::new(move |steering| {
                    super::Event::BandSet(super::BandWrite::make(
                        steering,
                        pid,
                        band,
                        vec![(service, to)],
                        purpose,
                    ))
                }));
            }
        }
    }
}

fn state_word(state: WorkerState) -> &'static str {
    match state {
        WorkerState::Retired => "retired",
        WorkerState::Live => "live",
        WorkerState::Starting => "starting",
        WorkerState::Dying => "dying",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn c(pid: i32, band: u32, generation: u64, state: WorkerState) -> Worker {
        Worker {
            ready: true,
            ..Worker::new(pid, band, generation, state, vec![], Instant::now())
        }
    }

    #[test]
    fn a_retired_worker_of_the_band_comes_first_newest_generation_first() {
        let workers = [
            c(10, 0, 1, WorkerState::Retired),
            c(11, 0, 2, WorkerState::Retired),
            c(20, 1, 3, WorkerState::Live),
        ];
        assert_eq!(stand_in(0, 2, workers.iter()), Some(11));
    }

    #[test]
    fn otherwise_the_live_worker_of_the_nearest_band_above() {
        let workers = [
            c(20, 1, 3, WorkerState::Live),
            c(21, 2, 3, WorkerState::Live),
            c(23, 0, 3, WorkerState::Live),
            c(30, 3, 2, WorkerState::Retired),
        ];
        assert_eq!(
            stand_in(1, 4, workers.iter()),
            Some(20),
            "its own band's live worker"
        );
        assert_eq!(
            stand_in(3, 4, workers.iter()),
            Some(30),
            "retired of band 3"
        );
        let without_retired = &workers[..3];
        // Band 3: band 0 is next (wrapping), before bands 1 and 2.
        assert_eq!(stand_in(3, 4, without_retired.iter()), Some(23));
    }

    #[test]
    fn leaving_or_unready_workers_never_stand_in() {
        let mut dying = c(10, 0, 1, WorkerState::Dying);
        let mut killed = c(11, 0, 1, WorkerState::Retired);
        killed.killed = true;
        let mut starting = c(12, 1, 2, WorkerState::Live);
        starting.ready = false;
        assert_eq!(
            stand_in(0, 2, [&dying, &killed, &starting].into_iter()),
            None
        );
        dying.state = WorkerState::Live;
        assert_eq!(stand_in(0, 2, [&dying].into_iter()), Some(10));
    }
}
