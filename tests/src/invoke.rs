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
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::cluster::{ipcluster_bin, leftovers, try_wait_output};

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
/// with its stderr when it outlives `timeout`.
pub fn finish(mut cmd: Command, timeout: Duration) -> Output {
    let what = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ");
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("starting `{what}`: {e}"));
    try_wait_output(child, timeout).unwrap_or_else(|stderr| {
        panic!("`{what}` did not finish within {timeout:?}; stderr:\n{stderr}")
    })
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
