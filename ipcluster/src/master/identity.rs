//! The master's side of worker identity: which uid its workers run as, the
//! registry it keeps (rewritten on every spawn, adoption and exit), how the
//! next generation number is chosen, and signals by pidfd.

use std::os::fd::OwnedFd;

use anyhow::{Result, bail};
use nix::sys::signal::Signal;

use super::registry::{Registry, RegistryEntry};
use super::{Master, adopt, kill, pidfd};
use crate::paths;

/// The uid workers are started as: `--user`'s, else the master's.
pub fn worker_uid(run_as: Option<&super::spawn::RunAs>) -> u32 {
    run_as.map_or_else(|| rustix::process::geteuid().as_raw(), |r| r.uid)
}

/// The registry of `cluster`, or `None` (with a warning) when it is missing,
/// unreadable, or in a directory others may write in: adoption then relies
/// on the environment alone.
pub fn load_registry(cluster: &str) -> Option<Registry> {
    // A registry others could have written would steer root's signals.
    for dir in [
        std::path::PathBuf::from(paths::STATE_ROOT),
        paths::state_dir(cluster),
    ] {
        match super::files::check_dir(&dir) {
            Ok(()) => {}
            Err(super::files::DirError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                return None;
            }
            Err(e) => {
                log::error!("{e}; the worker registry in it is not read");
                return None;
            }
        }
    }
    match Registry::load(&paths::registry_file(cluster)) {
        Ok(r) => r.filter(|r| {
            if r.cluster != cluster {
                log::warn!(
                    "{} names cluster {:?}, not {cluster:?}: ignored",
                    paths::registry_file(cluster).display(),
                    r.cluster
                );
            }
            r.cluster == cluster
        }),
        Err(e) => {
            log::warn!("{e}");
            None
        }
    }
}

/// The newest generation known to have been started, from the state file and
/// the registry (`None` when neither exists).
pub fn newest_generation(state: Option<u64>, registry: Option<&Registry>) -> Option<u64> {
    state
        .into_iter()
        .chain(registry.map(|r| r.generation))
        .max()
}

/// The generation after every one found or recorded; refused when the counter
/// is exhausted rather than wrapped around to an old number.
pub fn next_generation(found: &[adopt::Adopted], newest: Option<u64>) -> Result<u64> {
    let highest = found
        .iter()
        .map(|a| a.worker.generation)
        .chain(newest)
        .max()
        .unwrap_or(0);
    match highest.checked_add(1) {
        Some(g) => Ok(g),
        None => bail!(
            "generation {highest} is the last one there is; run `ipcluster stop` and start the \
             cluster afresh"
        ),
    }
}

impl Master {
    /// Send `signal` to worker `pid` through its pidfd (its group and tree).
    pub(super) fn signal(&self, pid: i32, signal: Signal) {
        if let Some(pidfd) = self.pidfds.get(&pid) {
            kill::signal_worker(kill::Target { pid, pidfd }, signal);
        }
    }

    /// Rewrite the registry from the workers now known.
    pub(super) fn save_registry(&self) {
        let registry = Registry {
            cluster: self.cfg.name.clone(),
            worker_uid: worker_uid(self.cfg.run_as.as_ref()),
            generation: self.generation,
            workers: self
                .core
                .workers
                .values()
                .map(|w| RegistryEntry {
                    pid: w.pid,
                    start_time: w.start_time,
                    band: w.band,
                    generation: w.generation,
                    ports: self
                        .cfg
                        .publics
                        .iter()
                        .copied()
                        .zip(w.ports.iter().copied())
                        .collect(),
                    uid: w.uid,
                    pgid: w.pid,
                    session: w.pid,
                })
                .collect(),
        };
        if let Err(e) = registry.save(&paths::registry_file(&self.cfg.name)) {
            log::error!("{e}: the next master may not adopt every worker");
        }
    }

    /// A pidfd for `pid`'s exit watch, duplicated from the worker's own.
    pub(super) fn watch_fd(&self, pid: i32) -> Option<OwnedFd> {
        match self.pidfds.get(&pid)?.try_clone() {
            Ok(fd) => Some(fd),
            Err(e) => {
                log::warn!("cannot duplicate worker {pid}'s pidfd: {e}; /proc will tell its exit");
                None
            }
        }
    }

    /// Whether worker `pid` has exited, by its pidfd.
    pub(super) fn has_exited(&self, pid: i32) -> bool {
        self.pidfds.get(&pid).is_none_or(|fd| pidfd::has_exited(fd))
    }
}
