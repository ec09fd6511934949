//! The benchmark's surroundings: one fresh network namespace per path (so that
//! conntrack, switched on by iptables NAT, and TIME_WAIT sockets of one path do
//! not tax the next), processes started inside it, CPU accounting, and the
//! sweep that removes whatever a run (or an interrupted earlier run) left behind.
//!
//! Processes enter the namespace with `setns(CLONE_NEWNET)` only, never through
//! `ip netns exec`: that one also gives each command a private mount namespace
//! with a fresh /sys, where the bpffs pins of `ipcluster run` would be invisible
//! to `ipcluster status`/`stop` and to the next master (the reload).

use std::{
    fs,
    os::{
        fd::{AsFd as _, AsRawFd as _, OwnedFd},
        unix::{fs::MetadataExt as _, process::CommandExt as _},
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// Every namespace, cluster and state directory of the benchmark starts with this.
pub const PREFIX: &str = "ipcb-";

/// A network namespace that is deleted (with everything running in it) on drop.
pub struct Netns {
    pub name: String,
    fd: OwnedFd,
    inode: u64,
    children: Vec<Child>,
}

fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

impl Netns {
    pub fn create(name: &str) -> Result<Self> {
        // A namespace left by an interrupted run.
        remove_netns(name);
        let status = Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .context("ip netns add")?;
        if !status.success() {
            bail!("ip netns add {name} failed");
        }
        let path = netns_path(name);
        let file = fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let inode = file.metadata()?.ino();
        let ns = Netns {
            name: name.to_owned(),
            fd: file.into(),
            inode,
            children: Vec::new(),
        };
        ns.run(&["ip", "link", "set", "lo", "up"])?;
        // One-request-per-connection runs leave TIME_WAIT sockets whose reuse makes
        // SYNs collide; none are kept in this namespace (docs/benchmarks.md).
        ns.run(&["sysctl", "-q", "-w", "net.ipv4.tcp_max_tw_buckets=0"])?;
        Ok(ns)
    }

    /// A command that runs inside the namespace (network namespace only).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        let fd = self.fd.as_raw_fd();
        // SAFETY: between fork and exec only setns(2) is called, which is
        // async-signal-safe; the fd stays open as long as `self`, which outlives
        // the spawn (the Command borrows nothing, but callers spawn right away
        // and the fd is only closed when the Netns is dropped).
        unsafe {
            c.pre_exec(move || {
                if libc_setns(fd) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        c
    }

    pub fn run(&self, argv: &[&str]) -> Result<()> {
        let (program, args) = argv.split_first().context("empty command")?;
        let status = self
            .command(program)
            .args(args)
            .status()
            .with_context(|| format!("running {argv:?} in {}", self.name))?;
        if !status.success() {
            bail!("{argv:?} in netns {} failed: {status}", self.name);
        }
        Ok(())
    }

    /// Start a long-running process in the namespace; it is killed on drop.
    pub fn spawn(&mut self, mut cmd: Command, log: &Path) -> Result<()> {
        let out = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        self.children.push(child);
        Ok(())
    }

    /// Run `f` on a thread that has entered this namespace (threads it spawns inherit it).
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        self.enter_thread(f)?
            .join()
            .map_err(|_| anyhow::anyhow!("thread in netns panicked"))?
            .context("the thread did not enter the namespace")
    }

    /// Start `f` on a thread that has entered this namespace.
    pub fn enter_thread<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<std::thread::JoinHandle<Option<T>>> {
        let fd = self.fd.try_clone()?;
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || {
            let entered = nix::sched::setns(fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET);
            let ok = entered.is_ok();
            let _ = tx.send(entered);
            ok.then(f)
        });
        rx.recv()
            .context("netns thread")?
            .context("setns into the benchmark namespace")?;
        Ok(handle)
    }

    /// Wait until something accepts TCP connections on 127.0.0.1:`port` in the namespace.
    pub fn wait_port(&self, port: u16, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let ok = self
                .enter(move || {
                    std::net::TcpStream::connect_timeout(
                        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                        Duration::from_secs(1),
                    )
                    .is_ok()
                })
                .unwrap_or(false);
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "nothing answers on 127.0.0.1:{port} in netns {} after {timeout:?}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Pids of every process in this namespace.
    pub fn pids(&self) -> Vec<i32> {
        pids_in_netns(self.inode)
    }

    /// Is a direct child still running?
    pub fn children_alive(&mut self) -> usize {
        let mut alive = 0;
        for c in &mut self.children {
            if matches!(c.try_wait(), Ok(None)) {
                alive += 1;
            }
        }
        alive
    }
}

fn libc_setns(fd: i32) -> i32 {
    // SAFETY: setns(2) with a namespace fd; no memory is passed.
    unsafe { nix::libc::setns(fd, nix::libc::CLONE_NEWNET) }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for child in &self.children {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.children_alive() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Anything else still in the namespace (workers run in their own sessions).
        kill_all_in(self.inode);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// The namespace inode a process is in, from /proc/<pid>/ns/net ("net:[N]").
fn netns_inode_of(pid: i32) -> Option<u64> {
    let link = fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
    let s = link.to_str()?;
    s.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

fn all_pids() -> Vec<i32> {
    fs::read_dir("/proc")
        .map(|r| {
            r.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn pids_in_netns(inode: u64) -> Vec<i32> {
    let me = std::process::id() as i32;
    all_pids()
        .into_iter()
        .filter(|&p| p != me && netns_inode_of(p) == Some(inode))
        .collect()
}

/// SIGKILL every process in the namespace and wait (up to 3 s) until none is left.
fn kill_all_in(inode: u64) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let pids = pids_in_netns(inode);
        if pids.is_empty() || Instant::now() > deadline {
            return;
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kill what runs in netns `name` and delete it (no error when it does not exist).
fn remove_netns(name: &str) {
    if let Ok(meta) = fs::metadata(netns_path(name)) {
        kill_all_in(meta.ino());
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Remove everything a benchmark run may have left: namespaces named `ipcb-*`
/// and their processes, clusters `ipcb-*` (stopped with `ipcluster stop`, then
/// pins and state folders removed), and bench_scale's test clusters. Returns
/// what had to be removed (empty after a clean run).
pub fn sweep(bin: &Path) -> Vec<String> {
    let mut found = Vec::new();
    if let Ok(dir) = fs::read_dir("/run/netns") {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(PREFIX) {
                found.push(format!("network namespace {name}"));
                remove_netns(&name);
            }
        }
    }
    for (root, what) in [
        (ipcluster_state_root(), "state folder"),
        (PathBuf::from("/sys/fs/bpf/ipcluster"), "bpffs pin folder"),
    ] {
        let Ok(dir) = fs::read_dir(&root) else {
            continue;
        };
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with(PREFIX) {
                continue;
            }
            found.push(format!("{what} {}", entry.path().display()));
            let _ = Command::new(bin)
                .args(["stop", "--name", &name])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if entry.path().exists() {
                let _ = remove_tree(&entry.path());
            }
        }
    }
    for pid in all_pids() {
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if text.contains(super::WORK_DIR) || text.contains(&format!("--name {PREFIX}")) {
            found.push(format!("process {pid}: {}", text.trim()));
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    found
}

fn ipcluster_state_root() -> PathBuf {
    PathBuf::from("/run/ipcluster")
}

/// Remove a folder's entries (bpffs pins are unlinked one by one), then the folder.
fn remove_tree(path: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(path)?.flatten() {
        let p = entry.path();
        if entry.file_type()?.is_dir() {
            remove_tree(&p)?;
        } else {
            fs::remove_file(&p)?;
        }
    }
    fs::remove_dir(path)
}

/// What is left of the benchmark on the host: namespaces, processes, state and
/// pin folders, iptables chains. Empty = clean.
pub fn leftovers() -> Vec<String> {
    let mut left = Vec::new();
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if line.starts_with(PREFIX) {
                left.push(format!("netns {line}"));
            }
        }
    }
    for root in [
        ipcluster_state_root(),
        PathBuf::from("/sys/fs/bpf/ipcluster"),
    ] {
        if let Ok(dir) = fs::read_dir(&root) {
            for entry in dir.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(PREFIX) {
                    left.push(entry.path().display().to_string());
                }
            }
        }
    }
    for pid in all_pids() {
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if text.contains(super::WORK_DIR)
            || text.contains(&format!("--name {PREFIX}"))
            || text.starts_with("wrk ")
        {
            left.push(format!("process {pid}: {}", text.trim()));
        }
    }
    for tool in ["iptables-save", "ip6tables-save"] {
        if let Ok(out) = Command::new(tool).output() {
            let text = String::from_utf8_lossy(&out.stdout);
            for line in text.lines().filter(|l| l.contains("ipcb")) {
                left.push(format!("{tool}: {line}"));
            }
        }
    }
    left
}

/// CPU time, in microseconds, of a set of processes plus the machine's softirq
/// threads: what one path costs, without the rest of a shared machine.
///
/// The kernel here uses tick-based accounting (no IRQ_TIME_ACCOUNTING): softirq
/// work, where loopback receive and the tc ingress program run, is charged to
/// the task that was interrupted — on loopback almost always the sending process
/// itself, or `ksoftirqd` — so the sum of the path's processes and ksoftirqd
/// covers the kernel's share too.
#[derive(Clone, Debug, Default)]
pub struct PathCpu {
    /// pid → (command name, utime + stime in ticks).
    per_pid: std::collections::BTreeMap<i32, (String, u64)>,
    /// The client: this process and its reaped children, µs.
    self_us: u64,
}

fn ticks_of(pid: i32) -> Option<(String, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, after) = stat.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_owned();
    let f: Vec<&str> = after.split_whitespace().collect();
    Some((
        comm,
        f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?,
    ))
}

fn ksoftirqd_pids() -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|p| {
            fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.starts_with("ksoftirqd/"))
        })
        .collect()
}

/// CPU of this process (whose threads are the own load generator) and of its
/// waited-for children (wrk), in microseconds.
fn client_cpu_us() -> u64 {
    use nix::sys::resource::{UsageWho, getrusage};
    [UsageWho::RUSAGE_SELF, UsageWho::RUSAGE_CHILDREN]
        .into_iter()
        .filter_map(|who| getrusage(who).ok())
        .map(|u| {
            let t =
                |tv: nix::sys::time::TimeVal| tv.tv_sec() as u64 * 1_000_000 + tv.tv_usec() as u64;
            t(u.user_time()) + t(u.system_time())
        })
        .sum()
}

/// A process's name for the CPU breakdown.
fn role(comm: &str) -> String {
    if comm.starts_with("ksoftirqd") {
        "ksoftirqd".into()
    } else if comm == "ipcluster" {
        "master".into()
    } else {
        comm.to_owned()
    }
}

impl PathCpu {
    /// Sample the processes of `ns`, ksoftirqd, and the client: this process
    /// (the own load generator's threads) and its reaped children (wrk, which
    /// has exited by the time of the second sample).
    pub fn sample(ns: &Netns) -> PathCpu {
        let mut per_pid = std::collections::BTreeMap::new();
        for pid in ns.pids().into_iter().chain(ksoftirqd_pids()) {
            if let Some(t) = ticks_of(pid) {
                per_pid.insert(pid, t);
            }
        }
        PathCpu {
            per_pid,
            self_us: client_cpu_us(),
        }
    }

    /// Microseconds of CPU used between `self` and `later`, by role (client,
    /// nginx, haproxy, master, ksoftirqd). USER_HZ = 100;
    /// processes that started in between count from zero.
    pub fn breakdown_until(&self, later: &PathCpu) -> std::collections::BTreeMap<String, f64> {
        let mut by_role = std::collections::BTreeMap::new();
        for (pid, (comm, t)) in &later.per_pid {
            let before = self.per_pid.get(pid).map_or(0, |(_, t)| *t);
            *by_role.entry(role(comm)).or_insert(0.0) += t.saturating_sub(before) as f64 * 10_000.0;
        }
        let own = later.self_us.saturating_sub(self.self_us);
        if own > 0 {
            by_role.insert("client".into(), own as f64);
        }
        by_role
    }
}

/// Busy and steal jiffies of the whole machine.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuSample {
    pub busy: u64,
    pub steal: u64,
    pub total: u64,
}

pub fn cpu_sample() -> Result<CpuSample> {
    let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    if v.len() < 8 {
        bail!("unexpected /proc/stat line {line:?}");
    }
    // user nice system idle iowait irq softirq steal
    let busy = v[0] + v[1] + v[2] + v[5] + v[6];
    Ok(CpuSample {
        busy,
        steal: v[7],
        total: v.iter().take(8).sum(),
    })
}

impl CpuSample {
    /// Busy CPU in microseconds between `self` and `later` (USER_HZ = 100).
    pub fn busy_us_until(&self, later: &CpuSample) -> f64 {
        (later.busy.saturating_sub(self.busy)) as f64 * 10_000.0
    }

    /// All CPU time (busy, idle, steal, …) between the samples, µs: the capacity.
    pub fn total_us_until(&self, later: &CpuSample) -> f64 {
        later.total.saturating_sub(self.total) as f64 * 10_000.0
    }

    pub fn steal_pct_until(&self, later: &CpuSample) -> f64 {
        let total = later.total.saturating_sub(self.total).max(1) as f64;
        later.steal.saturating_sub(self.steal) as f64 * 100.0 / total
    }
}

/// The 1-minute load average.
pub fn load_average() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_interrupt(_: nix::libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// From now on SIGINT and SIGTERM only set a flag: the benchmark stops after
/// the current measurement and removes everything it started. (The processes
/// of the paths get the terminal's SIGINT too; the cleanup does not need them.)
pub fn catch_interrupts() {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(on_interrupt),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        let _ = unsafe { sigaction(signal, &action) };
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed)
}

pub fn check_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}
