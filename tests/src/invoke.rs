//! Running the `ipcluster` binary to completion from a test, and waiting for
//! something to show up (a log line, a notification, a count):
//!
//! - [`command`] + [`finish`]: `ipcluster ARGS` with whatever environment or
//!   stderr file the test sets on the [`Command`], killed after a timeout;
//! - [`run_words`]: the command line of `ipcluster run` for one cluster;
//! - [`assert_failed_cleanly`]: a `run` that must fail did, said why, and left
//!   nothing of its cluster behind;
//! - [`poll`] and [`wait_for_text`]: retry a probe until it answers or time is up.

use std::ffi::OsStr;
use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use crate::cluster::{ipcluster_bin, leftovers};

/// How long the pipes are still read after the command exited (or was
/// killed): a process it started and left running may hold them open.
const PIPE_GRACE: Duration = Duration::from_secs(5);

/// `ipcluster ARGS`, stdin from /dev/null, stdout and stderr piped (set
/// another stderr, e.g. a log file, on the returned command if need be).
pub fn command<S: AsRef<OsStr>>(args: &[S]) -> Command {
    let mut cmd = Command::new(ipcluster_bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Run `cmd` to completion and return its output; panic (after killing it)
/// with its stderr when it outlives `timeout`. See [`try_finish`].
pub fn finish(cmd: Command, timeout: Duration) -> Output {
    try_finish(cmd, timeout).unwrap_or_else(|e| panic!("{e}"))
}

/// Run `cmd` to completion and return its output, or why not (it could not
/// start, or it outlived `timeout` and was killed: its stderr is in the
/// error). Its stdout and stderr are read while it runs (a chatty command
/// never blocks on a full pipe), and at most [`PIPE_GRACE`] after it ended
/// (what was read by then is returned).
pub fn try_finish(mut cmd: Command, timeout: Duration) -> Result<Output, String> {
    let what = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ");
    let mut child = cmd.spawn().map_err(|e| format!("starting `{what}`: {e}"))?;
    let stdout = Drain::start(child.stdout.take());
    let stderr = Drain::start(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => break Err(format!("did not finish within {timeout:?}")),
            Err(e) => break Err(format!("could not be waited for ({e})")),
        }
    };
    if status.is_err() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let until = Instant::now() + PIPE_GRACE;
    let stdout = stdout.take(until, &what, "stdout");
    let stderr = stderr.take(until, &what, "stderr");
    match status {
        Ok(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        Err(why) => Err(format!(
            "`{what}` {why}; stderr:\n{}",
            String::from_utf8_lossy(&stderr)
        )),
    }
}

/// A thread reading a child's pipe as it is written, into a buffer that can
/// be taken at any time.
struct Drain {
    read: Arc<Mutex<Vec<u8>>>,
    ended: mpsc::Receiver<()>,
}

impl Drain {
    fn start(pipe: Option<impl Read + Send + 'static>) -> Drain {
        let read = Arc::new(Mutex::new(Vec::new()));
        let (tx, ended) = mpsc::channel();
        let sink = Arc::clone(&read);
        std::thread::spawn(move || {
            if let Some(mut pipe) = pipe {
                let mut chunk = [0u8; 8192];
                while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                    sink.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .extend_from_slice(&chunk[..n]);
                }
            }
            let _ = tx.send(());
        });
        Drain { read, ended }
    }

    /// What was read, once the pipe ended or at `until` (saying so on the
    /// test's stderr when the pipe is still open then).
    fn take(self, until: Instant, what: &str, pipe: &str) -> Vec<u8> {
        let wait = until.saturating_duration_since(Instant::now());
        if self.ended.recv_timeout(wait).is_err() {
            eprintln!(
                "`{what}`: its {pipe} is still open {PIPE_GRACE:?} after it ended \
                 (a process it started holds it); using what was read"
            );
        }
        std::mem::take(
            &mut *self
                .read
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

/// `run --name NAME --backend BACKEND --listen LISTEN`, then `more` (further
/// flags, `--` and the worker command).
pub fn run_words(name: &str, backend: &str, listen: &str, more: &[&str]) -> Vec<String> {
    [
        "run",
        "--name",
        name,
        "--backend",
        backend,
        "--listen",
        listen,
    ]
    .iter()
    .chain(more)
    .map(|w| (*w).to_owned())
    .collect()
}

/// `out` is a failure (non-zero exit) whose stderr contains every `needles`,
/// and nothing of cluster `name` is left (process, pin, rule, state). Returns
/// the stderr.
pub fn assert_failed_cleanly(out: &Output, name: &str, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "it succeeded:\n{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "no {needle:?} in:\n{stderr}");
    }
    let left = leftovers(name);
    assert!(left.is_empty(), "{left:?}\n{stderr}");
    stderr
}

/// Call `probe` every `every` until it gives a value, at most until
/// `timeout` has passed (and once more then): the value, or `None`.
pub fn poll<T>(
    timeout: Duration,
    every: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// Read a text (a log file) every 50 ms until it contains `needle`: the
/// text, or after `timeout` the last text read.
pub fn wait_for_text(
    timeout: Duration,
    needle: &str,
    mut read: impl FnMut() -> String,
) -> Result<String, String> {
    let mut last = String::new();
    poll(timeout, Duration::from_millis(50), || {
        last = read();
        last.contains(needle).then(|| last.clone())
    })
    .ok_or(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    #[test]
    fn finish_reads_more_than_a_pipe_holds_while_waiting() {
        // 1 MiB on each pipe (a pipe holds 64 KiB): the command blocks
        // unless both are read while it runs.
        let out = finish(
            sh("head -c 1048576 /dev/zero; head -c 1048576 /dev/zero >&2"),
            Duration::from_secs(30),
        );
        assert!(out.status.success());
        assert_eq!(out.stdout.len(), 1 << 20);
        assert_eq!(out.stderr.len(), 1 << 20);
    }

    #[test]
    fn finish_returns_when_a_leftover_process_holds_the_pipes() {
        let started = Instant::now();
        let out = finish(
            sh("echo said; sleep 10 & echo done >&2"),
            Duration::from_secs(20),
        );
        assert!(out.status.success());
        assert_eq!(out.stdout, b"said\n");
        assert_eq!(out.stderr, b"done\n");
        assert!(
            started.elapsed() < Duration::from_secs(9),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    #[should_panic(expected = "did not finish within 200ms; stderr:\nstarted")]
    fn finish_kills_a_command_that_takes_too_long() {
        finish(
            sh("echo started >&2; exec sleep 30"),
            Duration::from_millis(200),
        );
    }

    #[test]
    fn run_words_put_the_cluster_flags_first() {
        assert_eq!(
            run_words("c1", "ebpf", "127.0.0.1:80", &["--", "srv", "{port}"]),
            [
                "run",
                "--name",
                "c1",
                "--backend",
                "ebpf",
                "--listen",
                "127.0.0.1:80",
                "--",
                "srv",
                "{port}"
            ]
        );
    }

    #[test]
    fn poll_returns_the_first_answer() {
        let mut calls = 0;
        let got = poll(Duration::from_secs(5), Duration::from_millis(1), || {
            calls += 1;
            (calls == 3).then_some(calls)
        });
        assert_eq!(got, Some(3));
    }

    #[test]
    fn poll_gives_up_after_the_timeout() {
        let started = Instant::now();
        let got: Option<()> = poll(Duration::from_millis(50), Duration::from_millis(5), || None);
        assert_eq!(got, None);
        assert!(started.elapsed() >= Duration::from_millis(50));
    }

    #[test]
    fn wait_for_text_returns_the_last_text_read() {
        let mut n = 0;
        let found = wait_for_text(Duration::from_secs(5), "line 2", || {
            n += 1;
            format!("line {n}")
        });
        assert_eq!(found, Ok("line 2".to_owned()));
        let missing = wait_for_text(Duration::from_millis(60), "never", || {
            "only this".to_owned()
        });
        assert_eq!(missing, Err("only this".to_owned()));
    }
}
