//! Taking a worker's listening socket without its help: find the fd number
//! that holds the LISTEN socket's inode under `/proc/<pid>/fd`, duplicate it
//! into the master with `pidfd_getfd`, and check what it is before anything
//! uses it: a TCP listener (`SO_ACCEPTCONN`), in the master's own network
//! namespace (the kernel would accept a socket of another namespace and the
//! connections would then hang), bound to the worker's port.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use nix::sys::socket::{SockaddrLike, SockaddrStorage, getsockname};
use rustix::net::sockopt::{socket_acceptconn, socket_protocol};
use rustix::process::{Pid, PidfdFlags, PidfdGetfdFlags};

use crate::steering::{SteeringError, WorkerListener};

/// `ioctl` that opens the network namespace of a socket (linux/sockios.h).
const SIOCGSKNS: libc::c_ulong = 0x894C;

fn refuse(l: &WorkerListener, cause: impl Into<String>) -> SteeringError {
    SteeringError::Listener {
        pid: l.pid,
        port: l.port,
        cause: cause.into(),
    }
}

/// A duplicate of the worker's listening socket on `l.port`, checked. The
/// caller must close it as soon as it is registered.
pub fn take(l: &WorkerListener) -> Result<OwnedFd, SteeringError> {
    let (holder, fd) = find_fd(l)?;
    let socket = pidfd_getfd(holder, fd).map_err(|e| {
        let why = match e.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => format!(
                "pidfd_getfd of fd {fd} of process {holder} was refused ({e}); the master needs \
                 ptrace access to its workers (Yama kernel.yama.ptrace_scope below 3, no LSM denying it)"
            ),
            Some(libc::ENOSYS) => format!(
                "this kernel has no pidfd_getfd ({e}); the sk-lookup backend needs Linux 5.6 or later"
            ),
            Some(libc::ESRCH) | Some(libc::EBADF) => {
                format!("process {holder} or its fd {fd} went away meanwhile ({e})")
            }
            _ => format!("pidfd_getfd of fd {fd} of process {holder} failed: {e}"),
        };
        refuse(l, why)
    })?;
    check(&socket, l)?;
    Ok(socket)
}

/// The (process, fd number) of the tree that holds one of `l.inodes`.
fn find_fd(l: &WorkerListener) -> Result<(i32, i32), SteeringError> {
    for &pid in &l.holders {
        let dir = format!("/proc/{pid}/fd");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(target) = std::fs::read_link(entry.path()) else {
                continue;
            };
            let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok())
            else {
                continue;
            };
            if !l.inodes.contains(&inode) {
                continue;
            }
            if let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
                return Ok((pid, fd));
            }
        }
    }
    Err(refuse(
        l,
        format!(
            "no process of its tree ({:?}) holds the LISTEN socket (inode {:?}) any more",
            l.holders, l.inodes
        ),
    ))
}

/// Duplicate fd `fd` of process `pid` into this process.
fn pidfd_getfd(pid: i32, fd: i32) -> std::io::Result<OwnedFd> {
    let pid = Pid::from_raw(pid).ok_or_else(|| std::io::Error::from_raw_os_error(libc::ESRCH))?;
    let pidfd = rustix::process::pidfd_open(pid, PidfdFlags::empty())?;
    Ok(rustix::process::pidfd_getfd(
        &pidfd,
        fd,
        PidfdGetfdFlags::empty(),
    )?)
}

/// The (device, inode) of a network namespace file.
fn netns_id(meta: &std::fs::Metadata) -> (u64, u64) {
    (meta.dev(), meta.ino())
}

/// Is `socket` a TCP listener in this thread's network namespace, bound to `l.port`?
fn check(socket: &OwnedFd, l: &WorkerListener) -> Result<(), SteeringError> {
    let protocol = socket_protocol(socket)
        .map_err(|e| refuse(l, format!("it is not a socket the master can inspect: {e}")))?;
    let listening = socket_acceptconn(socket)
        .map_err(|e| refuse(l, format!("reading SO_ACCEPTCONN failed: {e}")))?;
    if protocol != Some(rustix::net::ipproto::TCP) || !listening {
        return Err(refuse(
            l,
            format!(
                "the socket is not a listening TCP socket (protocol {}, SO_ACCEPTCONN {})",
                protocol.map_or(0, |p| p.as_raw().get()),
                u8::from(listening)
            ),
        ));
    }
    // SAFETY: SIOCGSKNS takes no argument and returns a new fd (or -1). Raw
    // because neither nix nor rustix wraps this ioctl (rustix's generic
    // `ioctl` is as unsafe and needs an `Ioctl` impl for one call).
    let ns = unsafe { libc::ioctl(socket.as_raw_fd(), SIOCGSKNS as _) };
    if ns < 0 {
        let e = std::io::Error::last_os_error();
        return Err(refuse(
            l,
            format!("finding the socket's network namespace (SIOCGSKNS) failed: {e}"),
        ));
    }
    // SAFETY: a fresh fd we own.
    let ns = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(ns) });
    let theirs = ns
        .metadata()
        .map_err(|e| refuse(l, format!("reading the socket's network namespace: {e}")))?;
    // The calling thread's namespace (the one the program is attached to):
    // /proc/self is the main thread's, which differs in a test that moved
    // its thread into a namespace of its own.
    let ours = std::fs::metadata("/proc/thread-self/ns/net")
        .map_err(|e| refuse(l, format!("reading /proc/thread-self/ns/net: {e}")))?;
    if netns_id(&theirs) != netns_id(&ours) {
        return Err(refuse(
            l,
            format!(
                "the socket lives in another network namespace (net:[{}], the master is in net:[{}]); \
                 run the worker in the master's network namespace",
                theirs.ino(),
                ours.ino()
            ),
        ));
    }
    let bound = getsockname::<SockaddrStorage>(socket.as_raw_fd())
        .map_err(|e| refuse(l, format!("getsockname failed: {e}")))?;
    let port = bound
        .as_sockaddr_in()
        .map(|a| a.port())
        .or_else(|| bound.as_sockaddr_in6().map(|a| a.port()));
    if port != Some(l.port) {
        return Err(refuse(
            l,
            format!(
                "the socket is bound to {} (family {:?}), not to port {}",
                bound,
                bound.family(),
                l.port
            ),
        ));
    }
    Ok(())
}
