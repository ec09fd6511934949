//! Bench case `master-scale`: what supervision costs the master with many idle
//! connections. Eight workers (a Python server that greets each connection
//! and then holds it, idle) behind one public port in a fresh namespace; the
//! bench opens 10k, 50k, then 100k connections from 64 client addresses
//! (127.0.0.2-65), waits until `status --json` counts them all, then reports
//! the master's CPU (utime + stime from /proc/<pid>/stat over a window, at the
//! default 1 s monitor interval) and the wall time of `ipcluster status --json`.
//! The file limit (RLIMIT_NOFILE) of this process is raised first: the clients
//! live here and the master and its workers inherit it.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::env::{self, Netns};
use super::{BenchOptions, PUBLIC_PORT, WORK_DIR, ipcluster_run, status_json, wait_cluster_live};
use crate::say;

/// Connection counts measured, in order (each step adds to the last).
pub const LOADS: [usize; 3] = [10_000, 50_000, 100_000];
const WORKERS: usize = 8;
const SOURCES: u8 = 64;
/// `status --json` runs timed per load.
const STATUS_RUNS: usize = 20;

/// Greets each connection with its pid, then holds it until the client closes.
const IDLE_SERVER: &str = r#"import os, selectors, socket
port = int(os.environ["PORT"])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port))
s.listen(4096)
s.setblocking(False)
sel = selectors.DefaultSelector()
sel.register(s, selectors.EVENT_READ)
greeting = ("pid=%d\n" % os.getpid()).encode()
while True:
    for key, _ in sel.select():
        if key.fileobj is s:
            for _ in range(256):
                try:
                    c, _ = s.accept()
                except BlockingIOError:
                    break
                c.setblocking(False)
                try:
                    c.send(greeting)
                except OSError:
                    pass
                sel.register(c, selectors.EVENT_READ)
        else:
            c = key.fileobj
            try:
                data = c.recv(4096)
            except OSError:
                data = b""
            if not data:
                sel.unregister(c)
                c.close()
"#;

/// Raise RLIMIT_NOFILE (soft and hard) to at least `needed`.
fn raise_fd_limit(needed: u64) -> Result<()> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit(RLIMIT_NOFILE)")?;
    if soft >= needed && hard >= needed {
        return Ok(());
    }
    setrlimit(Resource::RLIMIT_NOFILE, needed.max(soft), needed.max(hard)).with_context(|| {
        format!(
            "raising RLIMIT_NOFILE to {needed} (it is {soft}/{hard}; as root this needs \
             fs.nr_open >= {needed})"
        )
    })
}

/// Open `count` connections to the public port from the 64 client addresses.
fn open_connections(ns: &Netns, first: usize, count: usize) -> Result<Vec<TcpStream>> {
    ns.enter(move || -> Result<Vec<TcpStream>> {
        let target = SockAddr::from(SocketAddr::from(([127, 0, 0, 1], PUBLIC_PORT)));
        let mut streams = Vec::with_capacity(count);
        for i in first..first + count {
            let n = 2 + u8::try_from(i % usize::from(SOURCES)).unwrap_or(0);
            let source = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, n)), 0);
            let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
            socket
                .bind(&SockAddr::from(source))
                .with_context(|| format!("binding a client socket to {source}"))?;
            socket
                .connect_timeout(&target, Duration::from_secs(5))
                .with_context(|| format!("connection {i} from {source}"))?;
            streams.push(socket.into());
        }
        Ok(streams)
    })?
}

/// Connections counted by `status --json`, over every worker.
fn counted(ns: &Netns, bin: &Path, name: &str) -> Result<u64> {
    let status = status_json(ns, bin, name)?;
    Ok(status["workers"].as_array().map_or(0, |ws| {
        ws.iter().filter_map(|w| w["connections"].as_u64()).sum()
    }))
}

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
fn master_cpu(pid: i32, watch: Duration) -> Result<f64> {
    let t0 = cpu_ticks(pid)?;
    let start = Instant::now();
    std::thread::sleep(watch);
    let t1 = cpu_ticks(pid)?;
    Ok(t1.saturating_sub(t0) as f64 * 1000.0 / start.elapsed().as_millis().max(1) as f64)
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
    let max = LOADS[LOADS.len() - 1];
    raise_fd_limit(2 * max as u64 + 16_384)?;
    let dir = PathBuf::from(WORK_DIR);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let script = dir.join("idle-server.py");
    fs::write(&script, IDLE_SERVER).with_context(|| format!("writing {}", script.display()))?;
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
        let mut streams: Vec<TcpStream> = Vec::with_capacity(max);
        let mut lines = Vec::new();
        for load in LOADS {
            env::check_interrupted()?;
            say(
                "bench",
                &format!("master-scale ({backend}): {load} idle connections on {WORKERS} workers"),
            );
            let opened = Instant::now();
            let more = open_connections(&ns, streams.len(), load - streams.len())?;
            streams.extend(more);
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
            let rss = fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("VmRSS:"))
                        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
                })
                .unwrap_or(0.0)
                / 1024.0;
            lines.push(format!(
                "master_idle_connections backend={backend} connections={load} workers={WORKERS} \
                 counted={seen} cpu_pct={cpu:.2} status_p50_ms={p50:.1} status_max_ms={max_ms:.1} \
                 master_rss_mib={rss:.1} open_s={open_s:.1} watch_s={}",
                watch.as_secs()
            ));
            say("bench", lines.last().map_or("", String::as_str));
        }
        drop(streams);
        Ok(lines)
    })();
    super::stop_cluster(&ns, &opts.bin, &name);
    result
}
