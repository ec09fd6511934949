//! Finding the workers a previous master left.
//!
//! First from the registry (`workers.json` in the state directory, written by
//! root): an entry is adopted when its pid still runs with the recorded start
//! time, uid and session, and a pidfd is opened for it at once (checked against
//! the start time again, so the pidfd names that very process). The
//! environment (`IPCLUSTER_NAME`…) is only a cross-check for those, and a
//! fallback for session leaders the registry does not list (a master that
//! died between spawning a worker and writing the registry, or a cluster
//! started by a version without registry): such a process is adopted only if
//! it runs as the cluster's worker uid and claims no generation newer than
//! the newest one a master started. Anything else is logged and left alone.

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::OwnedFd;

use super::pidfd;
use super::process_tree::ProcessTable;
use super::registry::{Registry, RegistryEntry};
use crate::protocol::env as vars;

/// A worker found in /proc.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundWorker {
    pub pid: i32,
    pub band: u32,
    pub generation: u64,
    /// `$PORT`.
    pub port: u16,
    /// `IPCLUSTER_PORT_<public>` → worker port.
    pub ports: HashMap<u16, u16>,
}

impl FoundWorker {
    /// The worker's port for public port `public` (`$PORT` when not named).
    pub fn port_for(&self, public: u16) -> u16 {
        self.ports.get(&public).copied().unwrap_or(self.port)
    }

    fn from_entry(e: &RegistryEntry) -> FoundWorker {
        FoundWorker {
            pid: e.pid,
            band: e.band,
            generation: e.generation,
            port: e.ports.first().map_or(0, |(_, local)| *local),
            ports: e.ports.iter().copied().collect(),
        }
    }
}

/// Where an adopted worker was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Registry,
    Environment,
}

/// A worker verified and held by a pidfd.
#[derive(Debug)]
pub struct Adopted {
    pub worker: FoundWorker,
    pub pidfd: OwnedFd,
    pub start_time: u64,
    pub uid: u32,
    pub source: Source,
}

/// What adoption expects of a cluster's workers.
#[derive(Clone, Copy, Debug)]
pub struct Expect<'a> {
    pub cluster: &'a str,
    /// The registry, when there is one.
    pub registry: Option<&'a Registry>,
    /// The uid a worker found only by its environment must run as.
    pub worker_uid: u32,
    /// The newest generation a master of this cluster started, if known: a
    /// process claiming a newer one forged it.
    pub newest_generation: Option<u64>,
}

/// What /proc says about one process, for verification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub start_time: u64,
    pub uid: u32,
    pub session: i32,
    pub pgid: i32,
}

/// The identity of `pid`, if it runs (zombies do not).
pub fn identity(pid: i32) -> Option<Identity> {
    let process = procfs::process::Process::new(pid).ok()?;
    let stat = process.stat().ok()?;
    if stat.state == 'Z' || stat.state == 'X' {
        return None;
    }
    let status = process.status().ok()?;
    Some(Identity {
        start_time: stat.starttime,
        uid: status.ruid,
        session: stat.session,
        pgid: stat.pgrp,
    })
}

/// Why a registry entry is not adopted, or `Ok` with what /proc says.
pub fn check_entry(
    entry: &RegistryEntry,
    found: Option<Identity>,
) -> Result<Identity, &'static str> {
    let found = found.ok_or("it is gone")?;
    if found.start_time != entry.start_time {
        return Err("its pid now belongs to another process (start time differs)");
    }
    if found.uid != entry.uid {
        return Err("it runs as another uid than recorded");
    }
    if found.session != entry.session {
        return Err("it left the session it led");
    }
    Ok(found)
}

/// What a worker's environment says about it, if it belongs to `cluster`.
pub fn parse_environment(
    pid: i32,
    env: &HashMap<OsString, OsString>,
    cluster: &str,
) -> Option<FoundWorker> {
    let get = |key: &str| env.get(&OsString::from(key)).and_then(|v| v.to_str());
    if get(vars::NAME)? != cluster {
        return None;
    }
    let band = get(vars::BAND)?.parse().ok()?;
    let generation = get(vars::GENERATION)?.parse().ok()?;
    let port = get(vars::PORT)?.parse().ok()?;
    let ports = env
        .iter()
        .filter_map(|(k, v)| {
            let public = k.to_str()?.strip_prefix(vars::PORT_PREFIX)?.parse().ok()?;
            Some((public, v.to_str()?.parse().ok()?))
        })
        .collect();
    Some(FoundWorker {
        pid,
        band,
        generation,
        port,
        ports,
    })
}

/// Should a process found by its environment alone be adopted? `Err` says why not.
pub fn judge_by_environment(
    worker: &FoundWorker,
    id: &Identity,
    expect: &Expect<'_>,
) -> Result<(), String> {
    if id.uid != expect.worker_uid {
        return Err(format!(
            "it runs as uid {} but workers of cluster {:?} run as uid {}: its IPCLUSTER_* \
             variables are not trusted",
            id.uid, expect.cluster, expect.worker_uid
        ));
    }
    if let Some(newest) = expect.newest_generation
        && worker.generation > newest
    {
        return Err(format!(
            "it claims generation {} but no master of cluster {:?} started one after {newest}",
            worker.generation, expect.cluster
        ));
    }
    Ok(())
}

/// Every worker of the cluster now running, verified and held by a pidfd,
/// sorted by pid; `skip` are pids the caller holds already.
pub fn discover(expect: &Expect<'_>, processes: &ProcessTable, skip: &[i32]) -> Vec<Adopted> {
    let mut adopted = Vec::new();
    let environ = |pid: i32| {
        procfs::process::Process::new(pid)
            .and_then(|p| p.environ())
            .ok()
    };
    for entry in expect.registry.iter().flat_map(|r| r.workers.iter()) {
        if skip.contains(&entry.pid) {
            continue;
        }
        let id = match check_entry(entry, identity(entry.pid)) {
            Ok(id) => id,
            Err(why) => {
                log::info!(
                    "registry: worker {} (band {}, generation {}) not adopted: {why}",
                    entry.pid,
                    entry.band,
                    entry.generation
                );
                continue;
            }
        };
        let pidfd = match pidfd::open_verified(entry.pid, entry.start_time) {
            Ok(fd) => fd,
            Err(e) => {
                log::info!("registry: worker {} not adopted: {e}", entry.pid);
                continue;
            }
        };
        let worker = FoundWorker::from_entry(entry);
        // Cross-check: an environment that is still readable should agree.
        if let Some(env) = environ(entry.pid)
            && let Some(claimed) = parse_environment(entry.pid, &env, expect.cluster)
            && (claimed.band, claimed.generation) != (worker.band, worker.generation)
        {
            log::warn!(
                "worker {}: its environment says band {} generation {}, the registry band {} \
                 generation {}; the registry wins",
                entry.pid,
                claimed.band,
                claimed.generation,
                worker.band,
                worker.generation
            );
        }
        adopted.push(Adopted {
            worker,
            pidfd,
            start_time: id.start_time,
            uid: id.uid,
            source: Source::Registry,
        });
    }
    let Ok(all) = procfs::process::all_processes() else {
        return sorted(adopted);
    };
    for process in all.flatten() {
        let pid = process.pid();
        if skip.contains(&pid)
            || expect.registry.is_some_and(|r| r.entry(pid).is_some())
            || processes.get(pid).is_none_or(|p| p.session != pid)
        {
            continue;
        }
        // Zombies, kernel threads and servers that rewrote their title have
        // no readable (or no useful) environment.
        let Ok(env) = process.environ() else { continue };
        let Some(worker) = parse_environment(pid, &env, expect.cluster) else {
            continue;
        };
        let Some(id) = identity(pid) else { continue };
        if let Err(why) = judge_by_environment(&worker, &id, expect) {
            log::warn!(
                "process {pid} carries the variables of a worker of cluster {:?} (band {}, \
                 generation {}) and is ignored: {why}",
                expect.cluster,
                worker.band,
                worker.generation
            );
            continue;
        }
        let pidfd = match pidfd::open_verified(pid, id.start_time) {
            Ok(fd) => fd,
            Err(e) => {
                log::info!("process {pid} not adopted: {e}");
                continue;
            }
        };
        log::info!(
            "worker {pid} (band {}, generation {}) is not in the registry; adopted by its environment",
            worker.band,
            worker.generation
        );
        adopted.push(Adopted {
            worker,
            pidfd,
            start_time: id.start_time,
            uid: id.uid,
            source: Source::Environment,
        });
    }
    sorted(adopted)
}

fn sorted(mut adopted: Vec<Adopted>) -> Vec<Adopted> {
    adopted.sort_by_key(|a| a.worker.pid);
    adopted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<OsString, OsString> {
        pairs
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect()
    }

    #[test]
    fn workers_are_recognised_by_their_environment() {
        let e = env(&[
            ("IPCLUSTER_NAME", "chat"),
            ("IPCLUSTER_BAND", "3"),
            ("IPCLUSTER_GENERATION", "12"),
            ("PORT", "20003"),
            ("IPCLUSTER_PORT_8080", "20003"),
            ("IPCLUSTER_PORT_8443", "20004"),
            ("HOME", "/root"),
        ]);
        let w = parse_environment(77, &e, "chat").expect("a worker of chat");
        assert_eq!((w.pid, w.band, w.generation, w.port), (77, 3, 12, 20003));
        assert_eq!(w.port_for(8443), 20004);
        assert_eq!(w.port_for(9999), 20003);
        assert_eq!(parse_environment(77, &e, "other"), None);
        let broken = env(&[("IPCLUSTER_NAME", "chat"), ("IPCLUSTER_BAND", "x")]);
        assert_eq!(parse_environment(77, &broken, "chat"), None);
    }

    fn entry() -> RegistryEntry {
        RegistryEntry {
            pid: 500,
            start_time: 9000,
            band: 1,
            generation: 3,
            ports: vec![(8080, 20001), (8443, 20002)],
            uid: 33,
            pgid: 500,
            session: 500,
        }
    }

    #[test]
    fn a_registry_entry_must_match_pid_start_time_uid_and_session() {
        let id = Identity {
            start_time: 9000,
            uid: 33,
            session: 500,
            pgid: 500,
        };
        assert_eq!(check_entry(&entry(), Some(id)), Ok(id));
        assert!(check_entry(&entry(), None).is_err());
        let recycled = Identity {
            start_time: 9100,
            ..id
        };
        assert!(check_entry(&entry(), Some(recycled)).is_err());
        let other_user = Identity { uid: 1000, ..id };
        assert!(check_entry(&entry(), Some(other_user)).is_err());
        let moved = Identity { session: 1, ..id };
        assert!(check_entry(&entry(), Some(moved)).is_err());
        let w = FoundWorker::from_entry(&entry());
        assert_eq!((w.port, w.port_for(8443)), (20001, 20002));
    }

    #[test]
    fn forged_environments_are_not_trusted() {
        let expect = Expect {
            cluster: "chat",
            registry: None,
            worker_uid: 33,
            newest_generation: Some(5),
        };
        let worker = FoundWorker {
            pid: 600,
            band: 0,
            generation: 5,
            port: 20000,
            ports: HashMap::new(),
        };
        let id = Identity {
            start_time: 1,
            uid: 33,
            session: 600,
            pgid: 600,
        };
        assert_eq!(judge_by_environment(&worker, &id, &expect), Ok(()));
        let stranger = Identity { uid: 1000, ..id };
        let why = judge_by_environment(&worker, &stranger, &expect).expect_err("another uid");
        assert!(why.contains("uid 1000"), "{why}");
        let future = FoundWorker {
            generation: u64::MAX,
            ..worker
        };
        let why = judge_by_environment(&future, &id, &expect).expect_err("a forged generation");
        assert!(why.contains("generation"), "{why}");
    }
}
