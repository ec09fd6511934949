//! Workers by pidfd: a pidfd names one process for as long as it is open, so
//! a signal sent through it can never reach a process that merely inherited a
//! recycled pid. It also becomes readable when its process exits, whoever its
//! parent is (adopted workers are not our children).
//!
//! Every signal the master sends to a worker goes through here:
//! [`send_signal`] to the process, [`signal_group`] to the process group it
//! leads (`PIDFD_SIGNAL_PROCESS_GROUP`, which keeps naming the same group
//! after its leader exited), and [`open_verified`] to get a pidfd for a pid
//! read from /proc or the registry, checked against the start time seen there.

use std::os::fd::{AsRawFd as _, OwnedFd};

use nix::sys::signal::Signal;
use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::process::{Pid, PidfdFlags};
use tokio::io::unix::AsyncFd;

/// `PIDFD_SIGNAL_PROCESS_GROUP` (linux/pidfd.h, Linux 6.9).
const PIDFD_SIGNAL_PROCESS_GROUP: libc::c_uint = 1 << 2;

/// Open a pidfd for `pid` (close-on-exec, as all pidfds).
pub fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    let pid = Pid::from_raw(pid)
        .filter(|p| p.as_raw_nonzero().get() > 0)
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{pid} is not a process id"),
            )
        })?;
    Ok(rustix::process::pidfd_open(pid, PidfdFlags::empty())?)
}

/// Why a pid could not be vouched for.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("process {pid} is gone")]
    Gone { pid: i32 },
    #[error(
        "pid {pid} now belongs to another process (start time {found}, expected {expected}): \
         the pid was recycled"
    )]
    Recycled { pid: i32, expected: u64, found: u64 },
    #[error("cannot open a pidfd for process {pid}: {source}")]
    Open { pid: i32, source: std::io::Error },
}

/// The start time of `pid` (clock ticks after boot, /proc/PID/stat field 22):
/// with the pid, it names one process for the whole uptime of the host.
pub fn start_time(pid: i32) -> Option<u64> {
    procfs::process::Process::new(pid)
        .and_then(|p| p.stat())
        .ok()
        .filter(|s| s.state != 'Z' && s.state != 'X')
        .map(|s| s.starttime)
}

/// A pidfd for the process that has pid `pid` and started at `expected_start`.
/// The start time is read again after the pidfd is open: if it still matches,
/// the pidfd names that process and not one that got its pid since.
pub fn open_verified(pid: i32, expected_start: u64) -> Result<OwnedFd, VerifyError> {
    let fd = pidfd_open(pid).map_err(|source| match source.raw_os_error() {
        Some(libc::ESRCH) => VerifyError::Gone { pid },
        _ => VerifyError::Open { pid, source },
    })?;
    match start_time(pid) {
        None => Err(VerifyError::Gone { pid }),
        Some(found) if found != expected_start => Err(VerifyError::Recycled {
            pid,
            expected: expected_start,
            found,
        }),
        Some(_) => Ok(fd),
    }
}

/// `pidfd_send_signal` with flags. SAFETY of the raw call below: neither
/// rustix (its `pidfd_send_signal` always passes flags 0) nor nix (no pidfd
/// at all) can send `PIDFD_SIGNAL_PROCESS_GROUP`.
fn group_send(fd: &OwnedFd, signal: i32, flags: libc::c_uint) -> std::io::Result<()> {
    // SAFETY: pidfd_send_signal takes an fd we own, a signal number, a null
    // siginfo (the kernel fills it in as for kill(2)) and flags; nothing is
    // written to our memory.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            flags,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Signal the process `fd` names. `ESRCH` (it exited) is not an error.
pub fn send_signal(fd: &OwnedFd, signal: Signal) -> std::io::Result<()> {
    let signal = rustix::process::Signal::from_named_raw(signal as i32).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{signal} cannot be sent through a pidfd"),
        )
    })?;
    match rustix::process::pidfd_send_signal(fd, signal) {
        Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Signal every process of the process group led by the process `fd` names
/// (workers lead their own group), even after that leader exited: the kernel
/// resolves the group from the pidfd, never from a pid number. On kernels
/// before 6.9 (no `PIDFD_SIGNAL_PROCESS_GROUP`) the group is signalled with
/// `killpg` only while its leader is alive, which keeps its number from being
/// reused. `ESRCH` (nobody left in the group) is not an error.
pub fn signal_group(fd: &OwnedFd, pid: i32, signal: Signal) -> std::io::Result<()> {
    match group_send(fd, signal as i32, PIDFD_SIGNAL_PROCESS_GROUP) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            if has_exited(fd) {
                return Ok(());
            }
            match nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), signal) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
                Err(e) => Err(e.into()),
            }
        }
        Err(e) => Err(e),
    }
}

/// The process `fd` names has exited (a zombie counts as exited).
pub fn has_exited(fd: &OwnedFd) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::IN)];
    let ready = rustix::event::poll(&mut fds, Some(&Timespec::default()));
    ready.is_ok_and(|n| n > 0)
        && fds[0]
            .revents()
            .intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR)
}

/// Resolves when the process `fd` names has exited (at once if it is gone).
pub async fn exited(fd: OwnedFd) {
    // SAFETY: `fd` is an OwnedFd moved into the AsyncFd: it stays open and the
    // same for the AsyncFd's whole life (tokio's safe constructor is deprecated
    // as unsound, this is its replacement).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recycled_pid_is_refused() {
        let me = i32::try_from(std::process::id()).expect("pid");
        let start = start_time(me).expect("our own start time");
        let fd = open_verified(me, start).expect("our own process");
        assert!(!has_exited(&fd));
        send_signal(&fd, Signal::SIGCHLD).expect("signal 0-like to ourselves");
        assert!(matches!(
            open_verified(me, start + 1),
            Err(VerifyError::Recycled { .. })
        ));
    }

    #[test]
    fn an_exited_child_is_seen_through_its_pidfd() {
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = i32::try_from(child.id()).expect("pid");
        let fd = pidfd_open(pid).expect("pidfd of our child");
        let _ = child.wait();
        assert!(has_exited(&fd));
        // Signals to a reaped process (or its empty group) are not errors.
        send_signal(&fd, Signal::SIGTERM).expect("ESRCH is fine");
        signal_group(&fd, pid, Signal::SIGTERM).expect("ESRCH is fine");
    }
}
