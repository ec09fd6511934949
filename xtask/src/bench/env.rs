//! The benchmark's surroundings: one fresh network namespace per path (so that
//! conntrack, switched on by iptables NAT, and TIME_WAIT sockets of one path do
//! not tax the next), processes started inside it, and busy CPU from /proc/stat.

use std::{
    fs,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// A network namespace that is deleted (with everything running in it) on drop.
pub struct Netns {
    pub name: String,
    children: Vec<Child>,
}

impl Netns {
    pub fn create(name: &str) -> Result<Self> {
        // A namespace left by an interrupted run.
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        let status = Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .context("ip netns add")?;
        if !status.success() {
            bail!("ip netns add {name} failed");
        }
        let ns = Netns {
            name: name.to_owned(),
            children: Vec::new(),
        };
        ns.run(&["ip", "link", "set", "lo", "up"])?;
        // One-request-per-connection runs leave TIME_WAIT sockets whose reuse makes
        // SYNs collide; none are kept in this namespace (BENCHMARKING.md).
        ns.run(&["sysctl", "-q", "-w", "net.ipv4.tcp_max_tw_buckets=0"])?;
        Ok(ns)
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
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
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        self.children.push(child);
        Ok(())
    }

    /// Run `f` on a thread that has entered this namespace (threads it spawns inherit it).
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let path = PathBuf::from("/run/netns").join(&self.name);
        let file = fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        std::thread::spawn(move || -> Result<T> {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .context("setns")?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("load thread panicked"))?
    }

    /// Wait until something accepts TCP connections on 127.0.0.1:`port` in the namespace.
    pub fn wait_port(&self, port: u16, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let ok = self
                .enter(move || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
                .unwrap_or(false);
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "nothing listens on 127.0.0.1:{port} in netns {} after {timeout:?}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        std::thread::sleep(Duration::from_millis(200));
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Anything else still in the namespace (workers in their own sessions).
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
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

    pub fn steal_pct_until(&self, later: &CpuSample) -> f64 {
        let total = later.total.saturating_sub(self.total).max(1) as f64;
        later.steal.saturating_sub(self.steal) as f64 * 100.0 / total
    }
}
