//! Bench case `master-scale`: what supervision costs the master with many idle
//! connections. Eight workers (a Python server that greets each connection
//! and then holds it, idle) behind one public port in a fresh namespace; the
//! bench opens 10k, 50k, then 100k connections from 64 client addresses
//! (127.0.0.2-65), waits until `status --json` counts them all, then reports
//! the master's CPU (utime + stime from /proc/<pid>/stat over a window, at the
//! default 1 s monitor interval) and the wall time of `ipcluster status --json`.
//! The clients are Python processes of 10k connections each (a process may
//! hold at most RLIMIT_NOFILE files, whose hard limit only CAP_SYS_RESOURCE
//! raises); this process raises its soft limit to the hard one first, and the
//! master and its workers inherit it.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::sys::resource::{Resource, getrlimit, setrlimit};

use super::env::{self, Netns};
use super::{BenchOptions, PUBLIC_PORT, WORK_DIR, ipcluster_run, status_json, wait_cluster_live};
use crate::say;

/// Connection counts measured, in order (each step adds to the last).
pub const LOADS: [usize; 3] = [10_000, 50_000, 100_000];
const WORKERS: usize = 8;
const SOURCES: u8 = 64;
/// `status --json` runs timed per load.
const STATUS_RUNS: usize = 20;

/// Greets each connection with its pid, then holds it until the client
/// closes (the root test master_connections runs the same file).
const IDLE_SERVER: &str = include_str!("../../../tests/idle_server.py");

/// One client process: opens `count` connections to 127.0.0.1:`port` from
/// the 64 client addresses (connection `i` from 127.0.0.(2 + i % 64)), says
/// `open`, then holds them until its stdin closes.
const CLIENT: &str = r#"import socket, sys
port, first, count, sources = (int(a) for a in sys.argv[1:5])
held = []
for i in range(first, first + count):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.%d" % (2 + i % sources), 0))
    s.settimeout(5)
    s.connect(("127.0.0.1", port))
    held.append(s)
print("open", flush=True)
sys.stdin.read()
"#;

/// Connections per client process: a process may hold at most
/// RLIMIT_NOFILE files (20000 here, and only CAP_SYS_RESOURCE may raise the
/// hard limit), so the load is spread over several.
const PER_CLIENT: usize = 10_000;

/// Raise the soft RLIMIT_NOFILE to the hard one: the master and its workers
/// inherit it (12.5k connections per worker at 100k).
fn raise_fd_limit() -> Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit(RLIMIT_NOFILE)")?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
            .with_context(|| format!("raising RLIMIT_NOFILE from {soft} to {hard}"))?;
    }
    Ok(hard)
}

/// Client processes holding connections; closing their stdin ends them.
struct Clients {
    children: Vec<Child>,
}

impl Clients {
    /// Add `count` connections, numbered from `first`, in processes of at most [`PER_CLIENT`].
    fn open(&mut self, ns: &Netns, script: &Path, first: usize, count: usize) -> Result<()> {
        let mut started = Vec::new();
        let mut at = first;
        while at < first + count {
            let n = PER_CLIENT.min(first + count - at);
            let child = ns
                .command("python3")
                .arg(script)
                .args([
                    PUBLIC_PORT.to_string(),
                    at.to_string(),
                    n.to_string(),
                    SOURCES.to_string(),
                ])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .context("starting a python3 client")?;
            started.push(self.children.len());
            self.children.push(child);
            at += n;
        }
        for i in started {
            let child = &mut self.children[i];
            let out = child.stdout.take().context("client stdout")?;
            let mut line = String::new();
            BufReader::new(out).read_line(&mut line)?;
            if line.trim() != "open" {
                bail!("a client process could not open its connections (see its stderr above)");
            }
        }
        Ok(())
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        for child in &mut self.children {
            drop(child.stdin.take());
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Connections counted by `status --json`, over every worker.
fn counted(ns: &Netns, bin: &Path, name: &str) -> Result<u64> {
    let status = status_json(ns, bin, name)?;
    Ok(status["workers"].as_array().map_or(0, |ws| {
        ws.iter().filter_map(|w| w["connections"].as_u64()).sum()
    }))
}

/// A process's CPU time so far (user + system), in ticks of 10 ms.
fn cpu_ticks(pid: i32) -> Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let after = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("bad /proc/pid/stat")?;
    let f: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime (fields 14 and 15; 12 and 13 after the command name).
    Ok(field(11) + field(12))
}

/// The master's CPU over `watch`, percent of one CPU (USER_HZ is 100).
pub(super) fn master_cpu(pid: i32, watch: Duration) -> Result<f64> {
    let t0 = cpu_ticks(pid)?;
    let start = Instant::now();
    std::thread::sleep(watch);
    let t1 = cpu_ticks(pid)?;
    Ok(t1.saturating_sub(t0) as f64 * 1000.0 / start.elapsed().as_millis().max(1) as f64)
}

/// A memory figure of `/proc/<pid>/status` (`key` is e.g. `VmRSS:`), MiB;
/// 0 when the process or the line is gone.
pub(super) fn status_mib(pid: i32, key: &str) -> f64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0
}

/// Wall time of `status --json` runs: median and max, milliseconds.
fn status_latency(ns: &Netns, bin: &Path, name: &str) -> Result<(f64, f64)> {
    let mut ms = Vec::with_capacity(STATUS_RUNS);
    for _ in 0..STATUS_RUNS {
        let start = Instant::now();
        status_json(ns, bin, name)?;
        ms.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(f64::total_cmp);
    Ok((ms[ms.len() / 2], ms[ms.len() - 1]))
}

/// One `BENCH`-style line per load, for the report's scale table.
pub fn run(opts: &BenchOptions, backend: &str, watch: Duration) -> Result<Vec<String>> {
    let limit = raise_fd_limit()?;
    let per_worker = LOADS[LOADS.len() - 1] / WORKERS + 256;
    if limit < per_worker as u64 {
        bail!("RLIMIT_NOFILE is {limit}: each worker needs {per_worker} files");
    }
    let dir = PathBuf::from(WORK_DIR);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let script = dir.join("idle-server.py");
    fs::write(&script, IDLE_SERVER).with_context(|| format!("writing {}", script.display()))?;
    let client = dir.join("idle-client.py");
    fs::write(&client, CLIENT).with_context(|| format!("writing {}", client.display()))?;
    let short = backend.replace('-', "");
    let name = format!("{}idle{short}", env::PREFIX);
    let mut ns = Netns::create(&name)?;
    // Room for the accept queues while 100k connections arrive.
    ns.run(&["sysctl", "-q", "-w", "net.core.somaxconn=4096"])?;
    ns.run(&["sysctl", "-q", "-w", "net.ipv4.tcp_max_syn_backlog=8192"])?;
    let mut c = ipcluster_run(&ns, &opts.bin, &name, backend, WORKERS);
    c.args([
        "--spawn-delay",
        "20ms",
        "--cluster-memory-limit",
        "8GiB",
        "--",
    ])
    .arg("python3")
    .arg(&script);
    ns.spawn(c, &dir.join(format!("idle-{short}.log")))?;
    let result = (|| -> Result<Vec<String>> {
        let status = wait_cluster_live(&ns, &opts.bin, &name, WORKERS, Duration::from_secs(60))?;
        let pid = status["master_pid"]
            .as_i64()
            .and_then(|p| i32::try_from(p).ok())
            .context("no master_pid in status")?;
        let mut clients = Clients {
            children: Vec::new(),
        };
        let mut open = 0;
        let mut lines = Vec::new();
        for load in LOADS {
            env::check_interrupted()?;
            say(
                "bench",
                &format!("master-scale ({backend}): {load} idle connections on {WORKERS} workers"),
            );
            let opened = Instant::now();
            clients.open(&ns, &client, open, load - open)?;
            open = load;
            let open_s = opened.elapsed().as_secs_f64();
            // Every connection counted by the master (accepted, one monitor pass).
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut seen = counted(&ns, &opts.bin, &name)?;
            while seen != load as u64 {
                if Instant::now() > deadline {
                    bail!("status counts {seen} connections, {load} are open");
                }
                std::thread::sleep(Duration::from_millis(500));
                seen = counted(&ns, &opts.bin, &name)?;
            }
            // Let the pass that saw them finish, then watch the steady state.
            std::thread::sleep(Duration::from_millis(1500));
            let cpu = master_cpu(pid, watch)?;
            let (p50, max_ms) = status_latency(&ns, &opts.bin, &name)?;
            let rss = status_mib(pid, "VmRSS:");
            lines.push(format!(
                "master_idle_connections backend={backend} connections={load} workers={WORKERS} \
                 counted={seen} cpu_pct={cpu:.2} status_p50_ms={p50:.1} status_max_ms={max_ms:.1} \
                 master_rss_mib={rss:.1} open_s={open_s:.1} watch_s={}",
                watch.as_secs()
            ));
            say("bench", lines.last().map_or("", String::as_str));
        }
        drop(clients);
        Ok(lines)
    })();
    super::stop_cluster(&ns, &opts.bin, &name);
    result
}
