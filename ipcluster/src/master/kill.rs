//! Ending workers. A worker leads its own session and process group, so a
//! signal to the group reaches a `sh -c 'server …'` and its server alike.

use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

use super::process_tree::ProcessTable;

/// Send `signal` to worker `pid`'s process group and to every other process of
/// its tree (children that moved to another group). Errors mean "already gone".
pub fn signal_worker(pid: i32, signal: Signal) {
    let _ = killpg(Pid::from_raw(pid), signal);
    let _ = kill(Pid::from_raw(pid), signal);
    if let Ok(table) = ProcessTable::read() {
        for member in table.tree(pid) {
            let _ = kill(Pid::from_raw(member), signal);
        }
    }
}

/// Is `pid` still running (a zombie counts as gone)?
pub fn is_running(pid: i32) -> bool {
    match procfs::process::Process::new(pid).and_then(|p| p.stat()) {
        Ok(stat) => stat.state != 'Z' && stat.state != 'X',
        Err(_) => false,
    }
}

/// SIGTERM every worker, wait up to `soft_kill_timeout`, SIGKILL the rest,
/// and wait for them to go. Blocking: for `stop`, not for the event loop.
/// Returns how many needed SIGKILL.
pub fn stop_workers(pids: &[i32], soft_kill_timeout: Duration) -> usize {
    for &pid in pids {
        signal_worker(pid, Signal::SIGTERM);
    }
    let deadline = Instant::now() + soft_kill_timeout;
    let mut left: Vec<i32> = pids.to_vec();
    while !left.is_empty() && Instant::now() < deadline {
        reap_all(&left);
        left.retain(|&pid| is_running(pid));
        std::thread::sleep(Duration::from_millis(20));
    }
    let killed = left.len();
    for &pid in &left {
        log::warn!("worker {pid} did not exit within {soft_kill_timeout:?} of SIGTERM: SIGKILL");
        signal_worker(pid, Signal::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !left.is_empty() && Instant::now() < deadline {
        reap_all(&left);
        left.retain(|&pid| is_running(pid));
        std::thread::sleep(Duration::from_millis(10));
    }
    // Whatever is left in the workers' process groups goes too.
    for &pid in pids {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
    reap_all(pids);
    killed
}

fn reap_all(pids: &[i32]) {
    for &pid in pids {
        let _ = super::pidfd::reap(pid);
    }
}
