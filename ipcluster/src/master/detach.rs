//! `ipcluster run --detach`: start the master in the background and return
//! once it serves. systemd's `ExecReload` waits for its command to finish,
//! while a master runs for as long as the cluster: the unit's `ExecReload`
//! runs `run --detach`, which starts the new master (the same command line
//! without `--detach`) in its own session, waits on a pipe until that master
//! has published its generation and exits 0, or exits non-zero with the
//! master's exit status if the master gave up first. The new master stays in
//! the unit's cgroup and tells systemd `MAINPID=` itself (see [`super::notify`]).

use std::ffi::OsString;
use std::io::{BufRead as _, BufReader};
use std::os::fd::{AsFd as _, AsRawFd as _};
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

use super::notify::READY_FD_ENV;

/// The command line without `--detach` (only before `--`: after it, the
/// words belong to the worker command).
pub fn without_detach(args: &[OsString]) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut in_command = false;
    for a in args {
        if !in_command && a == "--" {
            in_command = true;
        }
        if in_command || a != "--detach" {
            out.push(a.clone());
        }
    }
    out
}

/// Start the master in the background and wait until it serves.
pub fn run_detached(cluster: &str) -> Result<()> {
    let exe = std::env::current_exe().context("finding this program's path (/proc/self/exe)")?;
    let args = without_detach(&std::env::args_os().skip(1).collect::<Vec<_>>());
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .context("creating the pipe on which the new master says it serves")?;
    let write_fd = write.as_raw_fd();
    let mut cmd = Command::new(&exe);
    // The master's stdout goes where our stderr goes: our caller reads our
    // stdout to its end, which must come when we exit, not when the master does.
    let stdout = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .context("duplicating stderr for the master's stdout")?;
    cmd.args(&args)
        .env(READY_FD_ENV, write_fd.to_string())
        .stdin(Stdio::null())
        .stdout(stdout);
    // SAFETY: pre_exec is unsafe by std's contract (the closure runs in the
    // forked child). It only makes two system calls (setsid, F_SETFD), which
    // are async-signal-safe, and borrows `write_fd`, open in the child since
    // the fork (`write` is dropped only after spawn returns).
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::setsid()?;
            let fd = std::os::fd::BorrowedFd::borrow_raw(write_fd);
            rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting the master {}", exe.display()))?;
    drop(write);
    let mut line = String::new();
    BufReader::new(std::fs::File::from(read))
        .read_line(&mut line)
        .context("waiting for the new master to serve")?;
    let pid = child.id();
    if let Some(generation) = line.trim().strip_prefix("ready generation=") {
        println!("cluster {cluster:?}: master {pid} serves generation {generation}");
        // The master runs on; it is not our child to wait for any more.
        return Ok(());
    }
    let status = child
        .wait()
        .map(|s| s.to_string())
        .unwrap_or_else(|e| format!("status unknown: {e}"));
    bail!(
        "the new master of cluster {cluster:?} (pid {pid}) exited ({status}) before it served; \
         its error is in the log above (`journalctl -u ipcluster@{cluster}` under systemd)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn detach_is_removed_only_before_the_worker_command() {
        assert_eq!(
            without_detach(&os(&[
                "run", "--detach", "--name", "a", "--", "srv", "--detach"
            ])),
            os(&["run", "--name", "a", "--", "srv", "--detach"])
        );
        assert_eq!(
            without_detach(&os(&["run", "-n", "a"])),
            os(&["run", "-n", "a"])
        );
    }
}
