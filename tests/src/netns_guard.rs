//! Every root test runs in a network namespace of its own: [`NetNsGuard::enter`]
//! moves the calling thread (the test's thread) into a fresh, empty network
//! namespace with `lo` up, and moves it back on drop.
//!
//! A network namespace is a property of each thread, and everything started
//! from the thread inherits it: the `ipcluster` master and its workers,
//! `iptables`, `tc`, `ip`, client sockets, threads the test spawns. So a
//! cluster's tc programs on `lo`, its iptables rules and its sk_lookup link
//! exist only in the test's namespace: another test (of this process, of
//! another test process, or the host) sees none of them, and tests can run in
//! parallel without meeting each other's rules, filters or ports. What is
//! still shared: the file system (bpffs pins, state directories: the names are
//! unique per test), process ids, and the CPU.
//!
//! Drop order matters: declare the guard first in the test, so it is dropped
//! last, after every [`crate::cluster::Cluster`] (whose drop runs `ipcluster
//! stop` and checks for leftovers inside the namespace). On drop the guard
//! also checks that no process is left in the namespace (a process would keep
//! it alive): it waits a little for them to exit, then SIGKILLs and reports
//! them. The namespace has no name and no bind mount; the kernel frees it
//! once nothing refers to it any more.
//!
//! Code that reads per-namespace state from this process must use
//! `/proc/thread-self/...`: `/proc/self/net` and `/proc/self/ns/net` are those
//! of the process's main thread, which stays in the host's namespace.

use std::fs::File;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns, unshare};

/// How a network namespace is told apart: the device and inode of its nsfs
/// file (`/proc/<pid>/ns/net`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NetNsId {
    pub dev: u64,
    pub ino: u64,
}

impl NetNsId {
    /// The namespace `path` (a `/proc/.../ns/net` file or a bind mount of one) refers to.
    pub fn of(path: &Path) -> std::io::Result<NetNsId> {
        let meta = std::fs::metadata(path)?;
        Ok(NetNsId {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    /// The network namespace of the calling thread.
    pub fn current() -> NetNsId {
        NetNsId::of(Path::new("/proc/thread-self/ns/net"))
            .unwrap_or_else(|e| panic!("reading /proc/thread-self/ns/net: {e}"))
    }

    /// The host's network namespace: the one this test process was started
    /// in, where other test runs and the machine's services live. It is the
    /// namespace of the process's main thread, which libtest keeps waiting
    /// while each test runs on a thread of its own.
    pub fn host() -> NetNsId {
        let path = host_netns_path();
        NetNsId::of(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
    }
}

impl std::fmt::Display for NetNsId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "net:[{}]", self.ino)
    }
}

/// The host's network namespace ([`NetNsId::host`]) as a path that other
/// processes can open too, for `nsenter --net=` and `setns`.
pub fn host_netns_path() -> PathBuf {
    PathBuf::from(format!("/proc/{}/ns/net", std::process::id()))
}

/// The calling thread is in a namespace of its own, not the host's.
pub fn in_own_netns() -> bool {
    NetNsId::current() != NetNsId::host()
}

/// The calling thread inside a fresh network namespace until dropped.
#[must_use = "the test leaves its network namespace when the guard is dropped; \
              bind it first in the test: `let _netns = NetNsGuard::enter();`"]
#[derive(Debug)]
pub struct NetNsGuard {
    /// The thread's namespace before `enter`, to go back to.
    original: File,
    original_id: NetNsId,
    /// The fresh namespace `enter` made.
    id: NetNsId,
}

impl NetNsGuard {
    /// Move the calling thread into a new network namespace and bring its `lo`
    /// up (127.0.0.0/8 and ::1 then work as on the host). Panics (the test
    /// fails) when not root or when the kernel refuses.
    pub fn enter() -> NetNsGuard {
        crate::assert_root();
        assert_ne!(
            nix::unistd::gettid(),
            nix::unistd::getpid(),
            "NetNsGuard::enter on the main thread: the host's namespace is known as the \
             main thread's, so a test must run on a thread of its own (libtest does that)"
        );
        let original = File::open("/proc/thread-self/ns/net")
            .unwrap_or_else(|e| panic!("opening /proc/thread-self/ns/net: {e}"));
        let original_id = NetNsId::of(Path::new("/proc/thread-self/ns/net"))
            .unwrap_or_else(|e| panic!("reading /proc/thread-self/ns/net: {e}"));
        unshare(CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| {
            panic!("unshare(CLONE_NEWNET) failed: {e}; root tests need CAP_SYS_ADMIN")
        });
        let id = NetNsId::current();
        // The drop kills every process left in `id`: it must be the new
        // namespace, never the one the thread came from or the host's.
        assert!(
            id != original_id && id != NetNsId::host(),
            "unshare(CLONE_NEWNET) left the thread in {id} (it came from {original_id}, \
             the host's is {})",
            NetNsId::host()
        );
        let guard = NetNsGuard {
            original,
            original_id,
            id,
        };
        // From here on a failure drops `guard`, which returns the thread.
        crate::netns::run_ok(Command::new("ip").args(["link", "set", "lo", "up"]));
        guard
    }

    /// The namespace this guard entered.
    pub fn id(&self) -> NetNsId {
        self.id
    }
}

impl Drop for NetNsGuard {
    fn drop(&mut self) {
        // Processes are looked for (and killed) only in a namespace that is
        // neither the one the thread came from nor the host's, checked again
        // here and per process right before the signal: a mistake must never
        // turn this into a kill of everything on the machine.
        let own = NetNsId::of(Path::new(&host_netns_path()))
            .is_ok_and(|host| self.id != host && self.id != self.original_id);
        let left = if own {
            processes_left_in(self.id, Duration::from_secs(3))
        } else {
            eprintln!(
                "NetNsGuard: {} is not a namespace of its own; no process check",
                self.id
            );
            Vec::new()
        };
        for (pid, _) in &left {
            let still_ours =
                NetNsId::of(Path::new(&format!("/proc/{pid}/ns/net"))).is_ok_and(|n| n == self.id);
            if still_ours {
                // SAFETY: kill has no memory preconditions.
                unsafe { libc::kill(*pid, libc::SIGKILL) };
            }
        }
        let back = setns(&self.original, CloneFlags::CLONE_NEWNET);
        let mut problems = Vec::new();
        if !left.is_empty() {
            let listed: Vec<String> = left.iter().map(|(p, c)| format!("{p} ({c})")).collect();
            problems.push(format!(
                "processes left in the test's network namespace {} (now SIGKILLed): {}",
                self.id,
                listed.join(", ")
            ));
        }
        if let Err(e) = back {
            problems.push(format!(
                "setns back to the thread's original network namespace failed: {e}"
            ));
        }
        if problems.is_empty() {
            return;
        }
        let message = problems.join("; ");
        // Never panic while unwinding: that aborts the test binary.
        if std::thread::panicking() {
            eprintln!("{message}");
        } else {
            panic!("{message}");
        }
    }
}

/// Processes (other than this one) in namespace `id`, after waiting up to
/// `grace` for them to be gone (SIGKILLed workers take a moment to exit).
fn processes_left_in(id: NetNsId, grace: Duration) -> Vec<(i32, String)> {
    let deadline = Instant::now() + grace;
    loop {
        let left = processes_in(id);
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every process other than this one whose main thread is in namespace `id`,
/// with its command name. Zombies have no namespace any more and are not listed.
pub fn processes_in(id: NetNsId) -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    crate::cluster::proc_pids()
        .into_iter()
        .filter(|&pid| pid != me)
        .filter(|pid| NetNsId::of(Path::new(&format!("/proc/{pid}/ns/net"))).is_ok_and(|n| n == id))
        .map(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            (pid, comm.trim().to_owned())
        })
        .collect()
}
