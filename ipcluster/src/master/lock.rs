//! The cluster lock: one master per cluster holds an exclusive `flock` on
//! `/run/ipcluster/<name>/master.lock`. A new master (a reload) asks the
//! holder to exit (`shutdown` on the control socket, then SIGTERM, then
//! SIGKILL); the old master exits without touching workers or steering.

use std::fs::File;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

use crate::paths;
use crate::protocol::AdminRequest;

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot open the lock file {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot lock {path}: {source}")]
    Lock { path: String, source: nix::Error },
    #[error(
        "the master of cluster {cluster:?} (pid {pid:?}) still holds {path} after {waited:?}; \
         it did not exit on shutdown, SIGTERM or SIGKILL"
    )]
    PreviousMasterStuck {
        cluster: String,
        pid: Option<i32>,
        path: String,
        waited: Duration,
    },
}

/// Held for the master's lifetime; released when dropped or when the process exits.
#[derive(Debug)]
pub struct ClusterLock {
    _lock: Flock<File>,
    path: PathBuf,
}

impl ClusterLock {
    /// Take the lock if nobody holds it. The state directory must exist.
    pub fn try_acquire(cluster: &str) -> Result<Option<ClusterLock>, LockError> {
        let path = paths::lock_file(cluster);
        // A `stop` may remove the directory (and the lock file in it) between our
        // open and our flock: then lock again, on the new file.
        for _ in 0..10 {
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|source| LockError::Open {
                    path: path.display().to_string(),
                    source,
                })?;
            let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => lock,
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Ok(None),
                Err((_, source)) => {
                    return Err(LockError::Lock {
                        path: path.display().to_string(),
                        source,
                    });
                }
            };
            if same_file(&lock, &path) {
                return Ok(Some(ClusterLock { _lock: lock, path }));
            }
            if let Some(dir) = path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
        }
        Err(LockError::Lock {
            path: path.display().to_string(),
            source: nix::errno::Errno::EAGAIN,
        })
    }

    /// Take the lock, making the previous master exit if one holds it.
    /// Returns the lock and whether a previous master had to be stopped.
    pub fn take_over(
        cluster: &str,
        previous_pid: Option<i32>,
        timeout: Duration,
    ) -> Result<(ClusterLock, bool), LockError> {
        if let Some(lock) = ClusterLock::try_acquire(cluster)? {
            return Ok((lock, false));
        }
        log::info!(
            "cluster {cluster:?}: a master (pid {}) is running; asking it to hand over",
            previous_pid.map_or("unknown".into(), |p| p.to_string())
        );
        match super::client::request(cluster, &AdminRequest::Shutdown, Duration::from_secs(3)) {
            Ok(reply) => log::debug!("previous master answered shutdown: {reply}"),
            Err(e) => log::warn!("cannot ask the previous master to shut down: {e:#}"),
        }
        let start = Instant::now();
        let mut sent_term = false;
        let mut sent_kill = false;
        loop {
            if let Some(lock) = ClusterLock::try_acquire(cluster)? {
                log::info!(
                    "cluster {cluster:?}: the previous master exited after {:?}",
                    start.elapsed()
                );
                return Ok((lock, true));
            }
            let waited = start.elapsed();
            // The pid comes from our own state file and is checked to be an
            // ipcluster process before any signal is sent.
            let master = previous_pid.filter(|&pid| is_ipcluster_master(pid));
            if waited > timeout / 2 && !sent_term {
                sent_term = true;
                if let Some(pid) = master {
                    log::warn!("previous master {pid} did not exit on shutdown; sending SIGTERM");
                    signal_master(pid, nix::sys::signal::Signal::SIGTERM);
                }
            }
            if waited > timeout && !sent_kill {
                sent_kill = true;
                if let Some(pid) = master {
                    log::warn!("previous master {pid} did not exit on SIGTERM; sending SIGKILL");
                    signal_master(pid, nix::sys::signal::Signal::SIGKILL);
                }
            }
            if waited > timeout + Duration::from_secs(3) {
                return Err(LockError::PreviousMasterStuck {
                    cluster: cluster.into(),
                    pid: previous_pid,
                    path: paths::lock_file(cluster).display().to_string(),
                    waited,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The locked file is still the one at `path` (not unlinked by a `stop`).
fn same_file(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
        _ => false,
    }
}

/// Signal the previous master through a pidfd, opened first and then checked
/// to name an ipcluster master: a pid recycled meanwhile is never signalled.
fn signal_master(pid: i32, signal: nix::sys::signal::Signal) {
    let Ok(fd) = super::pidfd::pidfd_open(pid) else {
        return;
    };
    if !is_ipcluster_master(pid) {
        return;
    }
    if let Err(e) = super::pidfd::send_signal(&fd, signal) {
        log::warn!("{signal} to the previous master {pid}: {e}");
    }
}

/// `pid` runs this program's `run` subcommand (guards signals against pid reuse).
fn is_ipcluster_master(pid: i32) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    args.iter().any(|a| a.ends_with(b"ipcluster")) && args.iter().any(|a| *a == b"run")
}
