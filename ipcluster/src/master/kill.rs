//! Ending workers. A worker leads its own session and process group, so a
//! signal to the group reaches a `sh -c 'server …'` and its server alike.
//! Every signal goes through a pidfd (see [`super::pidfd`]): to the group the
//! worker leads, and to the other processes of its tree (children that moved
//! to another group) after each one's pidfd is opened and checked to be still
//! that child. Nothing is sent to a bare pid number.

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::pidfd;
use super::process_tree::ProcessTable;

/// A worker to signal: its pid (for logs and /proc) and the pidfd that names it.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    pub pid: i32,
    pub pidfd: &'a OwnedFd,
}

/// Send `signal` to the worker's process group and to every other process of
/// its tree. Failures mean "already gone" and are logged at debug level.
pub fn signal_worker(target: Target<'_>, signal: Signal) {
    let Target { pid, pidfd: fd } = target;
    if let Err(e) = pidfd::signal_group(fd, pid, signal) {
        log::debug!("{signal} to the process group of worker {pid}: {e}");
    }
    if let Err(e) = pidfd::send_signal(fd, signal) {
        log::debug!("{signal} to worker {pid}: {e}");
    }
    // The tree is looked up by pid: only while the worker itself runs is that
    // pid still the worker.
    if pidfd::has_exited(fd) {
        return;
    }
    let Ok(table) = ProcessTable::read() else {
        return;
    };
    if pidfd::has_exited(fd) {
        return;
    }
    let tree = table.tree(pid);
    for &member in &tree {
        if member == pid {
            continue;
        }
        let Ok(stat) = procfs::process::Process::new(member).and_then(|p| p.stat()) else {
            continue;
        };
        // Already reached through the group.
        if stat.pgrp == pid {
            continue;
        }
        // Still in the worker's session or a child of its tree, with the same
        // start time once its pidfd is open: the same process.
        if stat.session != pid && !tree.contains(&stat.ppid) {
            continue;
        }
        let Ok(member_fd) = pidfd::open_verified(member, stat.starttime) else {
            continue;
        };
        if let Err(e) = pidfd::send_signal(&member_fd, signal) {
            log::debug!("{signal} to process {member} of worker {pid}: {e}");
        }
    }
}

/// Is `pid` still running (a zombie counts as gone)? A check only: nothing is
/// ever sent on its strength.
pub fn is_running(pid: i32) -> bool {
    pidfd::start_time(pid).is_some()
}

/// SIGTERM every worker, wait up to `soft_kill_timeout`, SIGKILL the rest,
/// and wait for them to go. Blocking: for `stop`, not for the event loop.
/// Returns how many needed SIGKILL.
pub fn stop_workers(targets: &[Target<'_>], soft_kill_timeout: Duration) -> usize {
    for &t in targets {
        signal_worker(t, Signal::SIGTERM);
    }
    let deadline = Instant::now() + soft_kill_timeout;
    let mut left: Vec<Target<'_>> = targets.to_vec();
    while !left.is_empty() && Instant::now() < deadline {
        reap_all(&left);
        left.retain(|t| !pidfd::has_exited(t.pidfd));
        std::thread::sleep(Duration::from_millis(20));
    }
    let killed = left.len();
    for &t in &left {
        log::warn!(
            "worker {} did not exit within {soft_kill_timeout:?} of SIGTERM: SIGKILL",
            t.pid
        );
        signal_worker(t, Signal::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !left.is_empty() && Instant::now() < deadline {
        reap_all(&left);
        left.retain(|t| !pidfd::has_exited(t.pidfd));
        std::thread::sleep(Duration::from_millis(10));
    }
    // Whatever is left in the workers' process groups goes too (the pidfd
    // still names each group after its leader exited).
    for t in targets {
        if let Err(e) = pidfd::signal_group(t.pidfd, t.pid, Signal::SIGKILL) {
            log::debug!("SIGKILL to what is left of worker {}'s group: {e}", t.pid);
        }
    }
    reap_all(targets);
    killed
}

fn reap_all(targets: &[Target<'_>]) {
    for t in targets {
        let _ = pidfd::reap(t.pid);
    }
}
