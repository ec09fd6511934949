//! Watching workers with pidfds: a pidfd becomes readable when its process
//! exits, whoever its parent is (adopted workers are not our children).

use std::os::fd::{FromRawFd as _, OwnedFd};

use tokio::io::unix::AsyncFd;

/// Open a pidfd for `pid` (close-on-exec, as all pidfds).
pub fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| std::io::Error::other("fd out of range"))?;
    // SAFETY: the kernel just gave us this fd and nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Resolves when process `pid` has exited (at once if it is already gone).
pub async fn exited(pid: i32) {
    let Ok(fd) = pidfd_open(pid) else { return };
    // SAFETY: `fd` is an OwnedFd moved into the AsyncFd: it stays open and the
    // same for the AsyncFd's whole life.
    let Ok(fd) = (unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) })
    else {
        return;
    };
    let _ = fd.readable().await;
}

/// Reap `pid` if it is our child and has exited; its exit status, described.
pub fn reap(pid: i32) -> Option<String> {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    match waitpid(nix::unistd::Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::Exited(_, code)) => Some(format!("exit status {code}")),
        Ok(WaitStatus::Signaled(_, signal, _)) => Some(format!("killed by {signal}")),
        _ => None,
    }
}
