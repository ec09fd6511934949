//! systemd's notification protocol (`Type=notify`, see docs/systemd.md): the
//! master says `READY=1` once its first generation is published, `STATUS=`
//! with the generation and its live workers whenever they change,
//! `WATCHDOG=1` every half `WATCHDOG_USEC`, and `STOPPING=1` when it stops the
//! cluster. A master that replaces a running one (a reload) first says
//! `RELOADING=1` and `MAINPID=<its pid>` and waits (`BARRIER=1`) until systemd
//! has read that, so that the old master's exit is not taken for the
//! service's; it says `READY=1` once its own generation is published. The
//! old master also names its successor (`MAINPID=`, from the peer
//! credentials of the hand-over request) before it exits, which covers a new
//! master started without `NOTIFY_SOCKET`.
//!
//! systemd gives `WATCHDOG_USEC` only to the process it started; a master
//! that a reload started inherits the interval through a file in the state
//! directory. Without `NOTIFY_SOCKET` all of this does nothing.
//!
//! `run --detach` (the unit's `ExecReload`) waits on a pipe whose write end
//! the new master gets as `IPCLUSTER_READY_FD`: one line once the generation
//! is published, or end-of-file if the master exits first.

use std::fs::File;
use std::io::Write as _;
use std::os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

/// The variable naming the write end of the `--detach` pipe.
pub const READY_FD_ENV: &str = crate::protocol::env::READY_FD;
/// Where a master writes the watchdog interval (µs) for the masters after it.
const WATCHDOG_FILE: &str = "watchdog-usec";
/// How long a master waits for systemd to read its `MAINPID=`.
const BARRIER_TIMEOUT: Duration = Duration::from_secs(5);

/// What the master tells systemd, and the `--detach` pipe.
#[derive(Debug)]
pub struct Notifier {
    /// `NOTIFY_SOCKET`, when set.
    socket: Option<String>,
    watchdog: Option<Duration>,
    next_watchdog: Instant,
    ready_pipe: Option<File>,
    ready_sent: bool,
    /// What the last `STATUS=` said, as (generation, published, live, retired).
    last_status: Option<(u64, bool, usize, usize)>,
}

impl Notifier {
    /// From the environment; `state_dir` holds an inherited watchdog interval.
    pub fn from_env(state_dir: &Path) -> Notifier {
        let socket = std::env::var("NOTIFY_SOCKET")
            .ok()
            .filter(|s| !s.is_empty());
        let watchdog = sd_notify::watchdog_enabled().or_else(|| {
            socket.as_ref()?;
            let usec = std::fs::read_to_string(watchdog_file(state_dir)).ok()?;
            let usec: u64 = usec.trim().parse().ok().filter(|&u| u > 0)?;
            log::info!("watchdog interval {usec} µs inherited from the previous master");
            Some(Duration::from_micros(usec))
        });
        Notifier {
            socket,
            watchdog,
            next_watchdog: Instant::now(),
            ready_pipe: ready_pipe_from_env(),
            ready_sent: false,
            last_status: None,
        }
    }

    fn send(&self, states: &[NotifyState]) {
        if self.socket.is_none() {
            return;
        }
        if let Err(e) = sd_notify::notify(states) {
            log::warn!(
                "cannot notify systemd on {}: {e}",
                self.socket.as_deref().unwrap_or_default()
            );
        }
    }

    /// Keep the watchdog interval for the masters that a reload starts
    /// (systemd gives it to the first one only).
    pub fn remember_watchdog(&self, state_dir: &Path) {
        let (Some(_), Some(w)) = (&self.socket, self.watchdog) else {
            return;
        };
        if let Err(e) = std::fs::write(watchdog_file(state_dir), w.as_micros().to_string()) {
            log::warn!(
                "cannot keep the watchdog interval in {}: {e}",
                state_dir.display()
            );
        }
    }

    /// A new master replaces the running `previous` one: announce ourselves
    /// as the main process before the previous master exits.
    pub fn reloading(&self, previous: i32) {
        if self.socket.is_none() {
            return;
        }
        let status = format!("reloading: replacing master {previous}");
        let mut states = vec![
            NotifyState::Reloading,
            NotifyState::MainPid(std::process::id()),
            NotifyState::Status(&status),
        ];
        if let Ok(now) = NotifyState::monotonic_usec_now() {
            states.push(now);
        }
        self.send(&states);
        if let Some(socket) = &self.socket
            && let Err(e) = barrier(socket, BARRIER_TIMEOUT)
        {
            log::warn!(
                "systemd did not confirm MAINPID={}: {e}",
                std::process::id()
            );
        }
    }

    /// A new master asked us to hand over: name it as the main process
    /// ourselves, for a new master that cannot (started by hand, without
    /// `NOTIFY_SOCKET`), before we exit; the same `MAINPID=` again is harmless.
    pub fn hand_over(&self, successor: i32) {
        let Some(socket) = &self.socket else {
            return;
        };
        let Ok(pid) = u32::try_from(successor) else {
            return;
        };
        let status = format!("handing over to master {successor}");
        self.send(&[NotifyState::MainPid(pid), NotifyState::Status(&status)]);
        if let Err(e) = barrier(socket, BARRIER_TIMEOUT) {
            log::warn!("systemd did not confirm MAINPID={successor}: {e}");
        }
    }

    /// A table was published (the first one makes us ready) or the workers
    /// changed: `READY=1` once, `STATUS=` when it changed.
    pub fn update(&mut self, generation: u64, published: bool, live: usize, retired: usize) {
        let counts = (generation, published, live, retired);
        let ready_now = published && !self.ready_sent;
        if !ready_now && self.last_status == Some(counts) {
            return;
        }
        let status = if published {
            format!("generation {generation}: {live} live workers, {retired} retired")
        } else {
            format!("generation {generation} starting: {live} live workers, {retired} retired")
        };
        if ready_now {
            self.ready_sent = true;
            self.send(&[
                NotifyState::Ready,
                NotifyState::MainPid(std::process::id()),
                NotifyState::Status(&status),
            ]);
            if let Some(mut pipe) = self.ready_pipe.take() {
                // The `--detach` command that started us returns now.
                let _ = writeln!(pipe, "ready generation={generation}");
            }
        } else {
            self.send(&[NotifyState::Status(&status)]);
        }
        self.last_status = Some(counts);
    }

    /// Whether anyone listens to [`Notifier::update`]: systemd or a
    /// `--detach` command waiting for the first publish.
    pub fn wants_updates(&self) -> bool {
        self.socket.is_some() || self.ready_pipe.is_some()
    }

    /// The cluster is being stopped (`ipcluster stop`, SIGTERM).
    pub fn stopping(&self, why: &str) {
        let status = format!("stopping: {why}");
        self.send(&[NotifyState::Stopping, NotifyState::Status(&status)]);
    }

    /// Start-up failed: the reason, for `systemctl status`.
    pub fn failed(&self, why: &str) {
        let status = format!("failed: {why}");
        self.send(&[NotifyState::Status(&status)]);
    }

    /// When the next watchdog keep-alive is due, if systemd wants them: the
    /// event loop wakes for it.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.watchdog
            .filter(|_| self.socket.is_some())
            .map(|_| self.next_watchdog)
    }

    /// `WATCHDOG=1` every half interval; called from the event loop's tick,
    /// so a stuck loop stops it.
    pub fn tick(&mut self, now: Instant) {
        let Some(interval) = self.watchdog else {
            return;
        };
        if self.socket.is_none() || now < self.next_watchdog {
            return;
        }
        self.next_watchdog = now + interval / 2;
        self.send(&[NotifyState::Watchdog]);
    }
}

impl super::Master {
    /// systemd: `READY=1` after the first publish, `STATUS=` on change, the watchdog.
    /// It runs after every event, so without a listener it only ticks.
    pub(super) fn notify(&mut self, now: Instant) {
        if self.notifier.wants_updates() {
            let (mut live, mut retired) = (0, 0);
            for w in self.core.workers.values() {
                match w.state {
                    crate::policy::WorkerState::Live => live += 1,
                    crate::policy::WorkerState::Retired => retired += 1,
                    _ => {}
                }
            }
            self.notifier
                .update(self.generation, self.core.published, live, retired);
        }
        self.notifier.tick(now);
    }
}

fn watchdog_file(state_dir: &Path) -> PathBuf {
    state_dir.join(WATCHDOG_FILE)
}

/// The `--detach` pipe's write end, made close-on-exec so workers do not hold it.
fn ready_pipe_from_env() -> Option<File> {
    let raw = std::env::var(READY_FD_ENV).ok()?;
    let Ok(fd) = raw.trim().parse::<i32>() else {
        log::warn!("{READY_FD_ENV}={raw:?} is not a file descriptor number; ignored");
        return None;
    };
    // SAFETY: only a number from our environment, borrowed for one F_GETFD
    // that checks it is open; no crate can check a descriptor number it does
    // not own without this step.
    if fd < 3 || rustix::io::fcntl_getfd(unsafe { BorrowedFd::borrow_raw(fd) }).is_err() {
        log::warn!("{READY_FD_ENV}={fd} is not an open file descriptor; ignored");
        return None;
    }
    // SAFETY: the descriptor is open, was handed to us by `run --detach` for
    // this purpose only, and nothing else in this process owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    if let Err(e) = rustix::io::fcntl_setfd(&file, rustix::io::FdFlags::CLOEXEC) {
        log::warn!("making {READY_FD_ENV}={fd} close-on-exec failed ({e}); workers may hold it");
    }
    Some(file)
}

/// `BARRIER=1` (sd_notify_barrier): send the write end of a pipe and wait
/// until systemd has processed every message before it and closed the pipe.
fn barrier(socket: &str, timeout: Duration) -> std::io::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};
    let (read, write): (OwnedFd, OwnedFd) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)?;
    let addr = match socket.strip_prefix('@') {
        Some(name) => UnixAddr::new_abstract(name.as_bytes()),
        None => UnixAddr::new(socket),
    }
    .map_err(std::io::Error::from)?;
    let sock = std::os::unix::net::UnixDatagram::unbound()?;
    let message = b"BARRIER=1\n";
    let fds = [write.as_raw_fd()];
    sendmsg(
        sock.as_raw_fd(),
        &[std::io::IoSlice::new(message)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        Some(&addr),
    )
    .map_err(std::io::Error::from)?;
    drop(write);
    let mut pfd = [nix::poll::PollFd::new(
        std::os::fd::AsFd::as_fd(&read),
        nix::poll::PollFlags::POLLHUP,
    )];
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    match nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(ms)) {
        Ok(0) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer to BARRIER=1 within {timeout:?}"),
        )),
        Ok(_) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
