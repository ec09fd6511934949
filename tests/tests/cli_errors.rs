//! End-to-end: every command that fails prints one `error:` line (and a few
//! `caused by:` lines), names the bad value and exits non-zero, and never a
//! stack dump, with `RUST_BACKTRACE=1` and `RUST_LIB_BACKTRACE=1` set.
//! Root, one test thread: `cargo test -p ipcluster-tests --test cli_errors -- --test-threads=1`

use std::time::Duration;

use ipcluster_tests::cluster::leftovers;
use ipcluster_tests::invoke::{self, run_words};
use ipcluster_tests::unique::{Ports, cluster_name};

/// Run `ipcluster ARGS` with backtraces asked for; returns (exit code, stderr).
fn failing(args: &[&str]) -> (i32, String) {
    let mut cmd = invoke::command(args);
    cmd.env("RUST_BACKTRACE", "1")
        .env("RUST_LIB_BACKTRACE", "1");
    let out = invoke::finish(cmd, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), stderr)
}

/// The error is clean: non-zero exit, exactly one `error:` line that contains
/// every `needles`, at most `max_lines` lines from it on, no stack dump.
fn assert_clean_error<S: AsRef<str>>(args: &[S], needles: &[&str], max_lines: usize) {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let (code, stderr) = failing(&args);
    let what = format!("`ipcluster {}`", args.join(" "));
    assert_ne!(code, 0, "{what} succeeded:\n{stderr}");
    let lower = stderr.to_lowercase();
    for dump in ["backtrace", "panicked", "\n   0: ", "rust_begin_unwind"] {
        assert!(
            !lower.contains(dump),
            "{what} printed a stack dump ({dump:?}):\n{stderr}"
        );
    }
    let errors: Vec<usize> = stderr
        .lines()
        .enumerate()
        .filter(|(_, l)| l.starts_with("error:"))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "{what}: expected one `error:` line:\n{stderr}"
    );
    let report: Vec<&str> = stderr.lines().skip(errors[0]).collect();
    assert!(
        report.len() <= max_lines,
        "{what}: the error takes {} lines (at most {max_lines}):\n{stderr}",
        report.len()
    );
    let report = report.join("\n");
    for needle in needles {
        assert!(
            report.contains(needle),
            "{what}: the error does not name {needle:?}:\n{stderr}"
        );
    }
}

#[test]
fn status_of_a_missing_cluster() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let name = cluster_name("missing");
    assert_clean_error(
        &["status", "--name", &name],
        &[&format!("cluster {name:?} is not running"), "ipcluster run"],
        3,
    );
    assert_clean_error(
        &["stop", "--name", &name],
        &[&format!("cluster {name:?} is not running")],
        3,
    );
    assert_clean_error(
        &["kill-retired", "--name", &name],
        &[&format!("cluster {name:?} has no running master")],
        3,
    );
}

/// `run` of a new iptables cluster on a free port, with `more` after its
/// `--listen`, fails with a clean error naming `needles` and leaves nothing.
fn run_fails_cleanly(prefix: &str, more: &[&str], needles: &[&str]) {
    let name = cluster_name(prefix);
    let ports = Ports::reserve(1);
    let listen = format!("127.0.0.1:{}", ports.get(0));
    assert_clean_error(&run_words(&name, "iptables", &listen, more), needles, 3);
    assert_eq!(leftovers(&name), Vec::<String>::new());
}

#[test]
fn worker_program_that_does_not_exist() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    run_fails_cleanly(
        "noprog",
        &["--", "/nonexistent/ipcluster-test-server", "{port}"],
        &["\"/nonexistent/ipcluster-test-server\" not found", "PATH"],
    );
}

#[test]
fn unknown_user() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    run_fails_cleanly(
        "nouser",
        &["--user", "no-such-user-ipcluster"],
        &["\"no-such-user-ipcluster\" does not exist", "--user"],
    );
}

#[test]
fn bad_flag_values() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    // clap's own report: the bad value, the rule, a pointer to --help (status 2).
    assert_clean_error(
        &["run", "--workers", "3"],
        &["'3'", "--workers", "power of two", "try 2"],
        4,
    );
    assert_clean_error(&["run", "--spawn-delay", "soon"], &["\"soon\"", "500ms"], 4);
    assert_clean_error(
        &["status", "--name", "a/b"],
        &["invalid cluster name \"a/b\""],
        4,
    );
    assert_clean_error(&["run", "--no-such-flag"], &["--no-such-flag"], 8);
}
