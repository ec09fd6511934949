//! Network namespaces that a test creates and removes: the test hosts of a
//! topology (clients, a forwarding host, a router, remote servers), joined by
//! veth pairs and bridges.
//!
//! Commands are run inside a namespace with `nsenter --net=/run/netns/<name>`,
//! never `ip netns exec`: the latter also gives the command a private `/sys`,
//! which hides the bpffs pins a master and its `status`/`stop` must share.
//! Code of the test itself enters a namespace on a scoped thread ([`NetNs::run`]),
//! since a network namespace is a per-thread property.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sched::{CloneFlags, setns};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A named network namespace (`ip netns add`), deleted on drop. Its `lo` is up.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Create `ipct<pid>-<n>-<role>` (unique across test processes).
    pub fn new(role: &str) -> NetNs {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let role: String = role
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(16)
            .collect();
        let name = format!("ipct{}-{n}-{role}", std::process::id());
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, the bind mount that keeps the namespace alive.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `program` to be run inside this namespace (through `nsenter --net`).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Run `ip ARGS` inside this namespace; panic with its stderr if it fails.
    pub fn ip(&self, args: &[&str]) -> Output {
        run_ok(self.command("ip").args(args))
    }

    /// Run many `ip` commands in one process (`ip -batch -`), e.g. dozens of
    /// `addr add` lines; panic with its stderr if one fails.
    pub fn ip_batch(&self, lines: &[String]) -> Output {
        use std::io::Write as _;
        let mut child = self
            .command("ip")
            .args(["-batch", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("running ip -batch in {}: {e}", self.name));
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(lines.join("\n").as_bytes())
                .unwrap_or_else(|e| panic!("writing to ip -batch in {}: {e}", self.name));
        }
        let out = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("waiting for ip -batch in {}: {e}", self.name));
        assert!(
            out.status.success(),
            "ip -batch in {} failed ({}): {}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        out
    }

    /// Run `sysctl -qw KEY=VALUE` inside this namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        run_ok(
            self.command("sysctl")
                .args(["-qw", &format!("{key}={value}")]),
        );
    }

    /// Run `f` on a thread that has entered this namespace: sockets it opens
    /// belong to the namespace. Panics in `f` propagate.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = File::open(self.path())
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.path().display()));
        std::thread::scope(|s| {
            s.spawn(move || {
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns into {}: {e}", self.name));
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace also deletes the veth ends and bridges inside it.
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "cleanup: `ip netns del {}` failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("cleanup: running `ip netns del {}`: {e}", self.name),
        }
    }
}

/// Join `a` and `b` with a veth pair: `a_if` inside `a`, `b_if` inside `b`,
/// both up. Interface names are at most 15 characters.
pub fn veth(a: &NetNs, a_if: &str, b: &NetNs, b_if: &str) {
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ]);
    a.ip(&["link", "set", a_if, "up"]);
    b.ip(&["link", "set", b_if, "up"]);
}

/// Create bridge `bridge` inside `ns`, enslave `ports` (interfaces already in
/// `ns`) to it, and bring it up. The bridge goes away with the namespace.
pub fn bridge(ns: &NetNs, bridge: &str, ports: &[&str]) {
    ns.ip(&["link", "add", bridge, "type", "bridge"]);
    for port in ports {
        ns.ip(&["link", "set", port, "master", bridge]);
    }
    ns.ip(&["link", "set", bridge, "up"]);
}

/// Run `cmd`, panic with its stderr unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    out
}
