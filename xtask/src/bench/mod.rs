//! `cargo xtask bench`: what steering costs, measured side by side in one run.
//!
//! Every path to the same kind of nginx worker runs in a fresh network namespace
//! (conntrack and TIME_WAIT state of one path cannot tax another), the paths are
//! interleaved and their order reversed every other round, and every figure is
//! reported as the median with its spread, beside CPU per request from /proc/stat
//! (steal excluded), as ratios to the direct connection measured in the same run.

mod env;
mod load;
mod report;

use std::{
    fmt::Write as _,
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{is_root, run_checked, say};
use env::{Netns, cpu_sample};
use load::{LoadSpec, Mode};
pub use report::Figures;

const PUBLIC_PORT: u16 = 8080;
const BACKEND_PORT: u16 = 21000;
const WORK_DIR: &str = "/tmp/ipcluster-bench";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PathKind {
    Direct,
    Ebpf,
    Iptables,
    Haproxy,
    NginxStream,
}

impl PathKind {
    pub const ALL: [PathKind; 5] = [
        PathKind::Direct,
        PathKind::Ebpf,
        PathKind::Iptables,
        PathKind::Haproxy,
        PathKind::NginxStream,
    ];

    pub fn label(self) -> &'static str {
        match self {
            PathKind::Direct => "direct to the worker port",
            PathKind::Ebpf => "ipcluster, eBPF backend",
            PathKind::Iptables => "ipcluster, iptables backend",
            PathKind::Haproxy => "HAProxy TCP, balance source",
            PathKind::NginxStream => "nginx stream, hash $remote_addr",
        }
    }

    fn short(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::Ebpf => "ebpf",
            PathKind::Iptables => "iptables",
            PathKind::Haproxy => "haproxy",
            PathKind::NginxStream => "nginx",
        }
    }
}

pub struct BenchOptions {
    pub quick: bool,
    pub bin: PathBuf,
    pub root: PathBuf,
}

struct Settings {
    rounds: usize,
    duration: Duration,
    master_watch: Duration,
}

/// One path stood up in its own namespace, ready for load on 127.0.0.1:`port`.
struct Stand {
    ns: Netns,
    port: u16,
    cluster: Option<String>,
    bin: PathBuf,
}

impl Drop for Stand {
    fn drop(&mut self) {
        if let Some(name) = &self.cluster {
            let _ = self
                .ns
                .command(&self.bin)
                .args(["stop", "--name", name])
                .output();
        }
    }
}

fn write_worker_files() -> Result<PathBuf> {
    let dir = PathBuf::from(WORK_DIR);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let conf = "daemon off;\nmaster_process off;\nworker_processes 1;\npid @DIR@/nginx-@PORT@.pid;\n\
                error_log stderr warn;\nevents { worker_connections 8192; }\n\
                http {\n  access_log off;\n  keepalive_requests 10000000;\n  default_type text/plain;\n\
                \x20 server {\n    listen 127.0.0.1:@PORT@;\n    location / { return 200 \"$server_port\\n\"; }\n  }\n}\n";
    fs::write(
        dir.join("nginx-worker.conf.in"),
        conf.replace("@DIR@", WORK_DIR),
    )?;
    let script = format!(
        "#!/bin/sh\n# One single-process nginx that answers its own port: the benchmark's worker.\nset -e\n\
         port=\"$1\"\nsed \"s/@PORT@/$port/g\" {WORK_DIR}/nginx-worker.conf.in > {WORK_DIR}/nginx-$port.conf\n\
         exec nginx -e stderr -p {WORK_DIR} -c {WORK_DIR}/nginx-$port.conf\n"
    );
    let path = dir.join("nginx-worker.sh");
    fs::write(&path, script)?;
    run_checked(Command::new("chmod").arg("+x").arg(&path))?;
    Ok(path)
}

fn backend_ports(workers: u16) -> Vec<u16> {
    (0..workers).map(|i| BACKEND_PORT + i).collect()
}

fn stand_up(
    kind: PathKind,
    workers: u16,
    tag: &str,
    opts: &BenchOptions,
    worker_script: &Path,
) -> Result<Stand> {
    let mut ns = Netns::create(&format!("ipcb-{}-{tag}", kind.short()))?;
    let log =
        |what: &str| PathBuf::from(WORK_DIR).join(format!("{}-{tag}-{what}.log", kind.short()));
    let start_backends = |ns: &mut Netns| -> Result<()> {
        for port in backend_ports(workers) {
            let mut c = ns.command(worker_script);
            c.arg(port.to_string());
            ns.spawn(c, &log(&format!("nginx-{port}")))?;
        }
        for port in backend_ports(workers) {
            ns.wait_port(port, Duration::from_secs(10))?;
        }
        Ok(())
    };
    let mut cluster = None;
    let port = match kind {
        PathKind::Direct => {
            start_backends(&mut ns)?;
            BACKEND_PORT
        }
        PathKind::Haproxy => {
            start_backends(&mut ns)?;
            let mut cfg = String::from(
                "global\n  maxconn 8000\n  nbthread 1\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
                 timeout client 60s\n  timeout server 60s\nlisten bench\n",
            );
            let _ = writeln!(cfg, "  bind 127.0.0.1:{PUBLIC_PORT}\n  balance source");
            for p in backend_ports(workers) {
                let _ = writeln!(cfg, "  server w{p} 127.0.0.1:{p}");
            }
            let path = PathBuf::from(WORK_DIR).join(format!("haproxy-{tag}.cfg"));
            fs::write(&path, cfg)?;
            let mut c = ns.command("haproxy");
            c.arg("-db").arg("-f").arg(&path);
            ns.spawn(c, &log("haproxy"))?;
            PUBLIC_PORT
        }
        PathKind::NginxStream => {
            start_backends(&mut ns)?;
            let mut cfg = format!(
                "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\ndaemon off;\nworker_processes 1;\n\
                 pid {WORK_DIR}/stream-{tag}.pid;\nerror_log stderr warn;\nevents {{ worker_connections 8192; }}\n\
                 stream {{\n  upstream workers {{\n    hash $remote_addr consistent;\n"
            );
            for p in backend_ports(workers) {
                let _ = writeln!(cfg, "    server 127.0.0.1:{p};");
            }
            let _ = write!(
                cfg,
                "  }}\n  server {{ listen 127.0.0.1:{PUBLIC_PORT}; proxy_pass workers; }}\n}}\n"
            );
            let path = PathBuf::from(WORK_DIR).join(format!("stream-{tag}.conf"));
            fs::write(&path, cfg)?;
            let mut c = ns.command("nginx");
            c.args(["-e", "stderr", "-p", WORK_DIR, "-c"]).arg(&path);
            ns.spawn(c, &log("nginx-stream"))?;
            PUBLIC_PORT
        }
        PathKind::Ebpf | PathKind::Iptables => {
            let name = format!("ipcb-{}-{tag}", kind.short());
            let backend = if kind == PathKind::Ebpf {
                "ebpf"
            } else {
                "iptables"
            };
            let mut c = ns.command(&opts.bin);
            c.args([
                "run",
                "--name",
                &name,
                "--backend",
                backend,
                "--workers",
                &workers.to_string(),
            ])
            .args(["--listen", &format!("127.0.0.1:{PUBLIC_PORT}")])
            .args([
                "--port-range",
                &format!("{BACKEND_PORT}-{}", BACKEND_PORT + 999),
            ])
            .arg("--")
            .arg(worker_script)
            .arg("{port}");
            ns.spawn(c, &log("master"))?;
            cluster = Some(name.clone());
            wait_cluster_live(
                &ns,
                &opts.bin,
                &name,
                workers.into(),
                Duration::from_secs(30),
            )?;
            PUBLIC_PORT
        }
    };
    ns.wait_port(port, Duration::from_secs(10))?;
    Ok(Stand {
        ns,
        port,
        cluster,
        bin: opts.bin.clone(),
    })
}

/// `ipcluster status --json` of a cluster.
fn status_json(ns: &Netns, bin: &Path, name: &str) -> Result<serde_json::Value> {
    let out = ns
        .command(bin)
        .args(["status", "--json", "--name", name])
        .output()?;
    if !out.status.success() {
        bail!(
            "ipcluster status failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn live_workers(status: &serde_json::Value, generation: Option<u64>) -> usize {
    status["workers"].as_array().map_or(0, |ws| {
        ws.iter()
            .filter(|w| w["state"] == "live")
            .filter(|w| generation.is_none_or(|g| w["generation"].as_u64() == Some(g)))
            .count()
    })
}

fn wait_cluster_live(
    ns: &Netns,
    bin: &Path,
    name: &str,
    workers: usize,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(s) = status_json(ns, bin, name)
            && live_workers(&s, None) >= workers
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("cluster {name} did not get {workers} live workers within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Run wrk inside the namespace; returns (requests/s, p50 ms, p99 ms, requests).
fn wrk(
    ns: &Netns,
    port: u16,
    new_connections: bool,
    duration: Duration,
) -> Result<(f64, f64, f64, f64)> {
    let mut c = ns.command("wrk");
    c.args(["-t1", "-c32", "--latency", "-d"])
        .arg(format!("{}s", duration.as_secs().max(1)))
        .arg(format!("http://127.0.0.1:{port}/"));
    if new_connections {
        c.args(["-H", "Connection: close"]);
    }
    let out = c.output().context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    report::parse_wrk(&text)
}

fn sources(n: u8) -> Vec<IpAddr> {
    (2..2 + n)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)))
        .collect()
}

pub fn bench(opts: &BenchOptions) -> Result<()> {
    if !is_root() {
        bail!(
            "the benchmark creates network namespaces and steering state: run it as root (or via sudo -E)"
        );
    }
    install_tools()?;
    let settings = if opts.quick {
        Settings {
            rounds: 1,
            duration: Duration::from_secs(2),
            master_watch: Duration::from_secs(10),
        }
    } else {
        Settings {
            rounds: 3,
            duration: Duration::from_secs(10),
            master_watch: Duration::from_secs(60),
        }
    };
    let worker_script = write_worker_files()?;
    let started = Instant::now();
    let mut figures = Figures::default();
    figures.machine = report::describe_machine();

    // Cases 1 and 2: every path, interleaved, order reversed every other round.
    for round in 0..settings.rounds {
        let mut order = PathKind::ALL.to_vec();
        if !round.is_multiple_of(2) {
            order.reverse();
        }
        for kind in order {
            say(
                "bench",
                &format!("round {}/{}: {}", round + 1, settings.rounds, kind.label()),
            );
            let result = (|| -> Result<()> {
                let stand = stand_up(kind, 1, &format!("r{round}"), opts, &worker_script)?;
                for new_conn in [false, true] {
                    let before = cpu_sample()?;
                    let (rate, p50, p99, requests) =
                        wrk(&stand.ns, stand.port, new_conn, settings.duration)?;
                    let after = cpu_sample()?;
                    figures.add_single(
                        kind,
                        new_conn,
                        rate,
                        p50,
                        p99,
                        before.busy_us_until(&after) / requests.max(1.0),
                        before.steal_pct_until(&after),
                    );
                }
                drop(stand);
                let stand = stand_up(kind, 4, &format!("m{round}"), opts, &worker_script)?;
                for mode in [Mode::KeepAlive, Mode::NewConnection] {
                    let spec = LoadSpec {
                        target: SocketAddr::from(([127, 0, 0, 1], stand.port)),
                        mode,
                        sources: sources(64),
                        connections: 64,
                        duration: settings.duration,
                    };
                    let before = cpu_sample()?;
                    let mut r = stand.ns.enter(move || load::run(&spec))?;
                    let after = cpu_sample()?;
                    let cpu = before.busy_us_until(&after) / (r.requests.max(1) as f64);
                    figures.add_many(kind, mode == Mode::NewConnection, &mut r, cpu);
                }
                Ok(())
            })();
            if let Err(e) = result {
                say("bench", &format!("{} failed: {e:#}", kind.label()));
                figures
                    .errors
                    .push(format!("{} (round {}): {e:#}", kind.label(), round + 1));
            }
        }
    }

    // Case 3: reload under load, both backends, the demo worker (it reports its generation).
    for backend in ["ebpf", "iptables"] {
        say("bench", &format!("reload under load, {backend} backend"));
        match reload_under_load(opts, backend, settings.duration) {
            Ok(r) => figures.reloads.push(r),
            Err(e) => figures.errors.push(format!("reload ({backend}): {e:#}")),
        }
    }

    // Case 4: scale.
    say(
        "bench",
        "scale: table publish, per-packet cost, flow memory (root test bench_scale)",
    );
    match scale_figures(opts) {
        Ok(lines) => figures.scale.extend(lines),
        Err(e) => figures.errors.push(format!("scale: {e:#}")),
    }
    say(
        "bench",
        &format!(
            "scale: master CPU and RSS with 64 workers for {:?}",
            settings.master_watch
        ),
    );
    match master_cost(opts, settings.master_watch) {
        Ok(line) => figures.scale.push(line),
        Err(e) => figures
            .errors
            .push(format!("master with 64 workers: {e:#}")),
    }

    figures.wall = started.elapsed();
    let out_dir = opts.root.join("target").join("bench");
    fs::create_dir_all(&out_dir)?;
    let md = figures.markdown(opts.quick);
    fs::write(out_dir.join("report.md"), &md)?;
    fs::write(out_dir.join("chart.svg"), figures.svg())?;
    println!("{md}");
    say(
        "bench",
        &format!("wrote {0}/report.md and {0}/chart.svg", out_dir.display()),
    );
    Ok(())
}

fn install_tools() -> Result<()> {
    let missing: Vec<&str> = [("nginx", "nginx"), ("haproxy", "haproxy"), ("wrk", "wrk")]
        .iter()
        .filter(|(bin, _)| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {bin}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|(_, pkg)| *pkg)
        .collect();
    let stream_module = Path::new("/usr/lib/nginx/modules/ngx_stream_module.so").exists();
    if missing.is_empty() && stream_module {
        say("bench", "nginx (+ stream module), haproxy, wrk: present");
        return Ok(());
    }
    say(
        "bench",
        "installing nginx, libnginx-mod-stream, haproxy, wrk with apt-get",
    );
    run_checked(Command::new("apt-get").args(["update", "-q"]))?;
    run_checked(
        Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "nginx",
                "libnginx-mod-stream",
                "haproxy",
                "wrk",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// Reload a demo cluster while 32 client addresses open connections continuously.
fn reload_under_load(
    opts: &BenchOptions,
    backend: &str,
    duration: Duration,
) -> Result<report::Reload> {
    let mut ns = Netns::create(&format!("ipcb-reload-{backend}"))?;
    let name = format!("ipcb-reload-{backend}");
    let workers = 4usize;
    let master = |ns: &mut Netns, what: &str| -> Result<()> {
        let mut c = ns.command(&opts.bin);
        c.args([
            "run",
            "--name",
            &name,
            "--backend",
            backend,
            "--workers",
            &workers.to_string(),
        ])
        .args(["--listen", &format!("127.0.0.1:{PUBLIC_PORT}")]);
        ns.spawn(
            c,
            &PathBuf::from(WORK_DIR).join(format!("reload-{backend}-{what}.log")),
        )
    };
    master(&mut ns, "first")?;
    wait_cluster_live(&ns, &opts.bin, &name, workers, Duration::from_secs(30))?;
    let first_gen = status_json(&ns, &opts.bin, &name)?["generation"]
        .as_u64()
        .context("no generation in status")?;
    let spec = LoadSpec {
        target: SocketAddr::from(([127, 0, 0, 1], PUBLIC_PORT)),
        mode: Mode::NewConnection,
        sources: sources(32),
        connections: 32,
        duration: duration.max(Duration::from_secs(4)) + Duration::from_secs(4),
    };
    let load = {
        let spec = spec.clone();
        let path = PathBuf::from("/run/netns").join(&ns.name);
        std::thread::spawn(move || -> Result<load::LoadResult> {
            let file = fs::File::open(&path)?;
            nix::sched::setns(
                std::os::fd::AsFd::as_fd(&file),
                nix::sched::CloneFlags::CLONE_NEWNET,
            )?;
            Ok(load::run(&spec))
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    let reload_started = Instant::now();
    master(&mut ns, "second")?;
    let deadline = reload_started + Duration::from_secs(60);
    let switched = loop {
        if let Ok(s) = status_json(&ns, &opts.bin, &name)
            && s["generation"].as_u64().is_some_and(|g| g > first_gen)
            && live_workers(&s, s["generation"].as_u64()) >= workers
        {
            break reload_started.elapsed();
        }
        if Instant::now() > deadline {
            bail!("the new generation did not become live within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let result = load
        .join()
        .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
    let _ = ns
        .command(&opts.bin)
        .args(["stop", "--name", &name])
        .output();
    Ok(report::Reload {
        backend: backend.to_owned(),
        attempted: result.requests + result.failures,
        failed: result.failures,
        switch_time: switched,
        unsticky: result.unsticky_sources(),
    })
}

/// Figures that need the library: run the `bench_scale` root test and keep its `BENCH` lines.
fn scale_figures(opts: &BenchOptions) -> Result<Vec<String>> {
    let out = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(&opts.root)
        .env("PATH", crate::setup::path_with_cargo_bin())
        .args([
            "test",
            "--release",
            "-p",
            "ipcluster-tests",
            "--test",
            "bench_scale",
            "--",
            "--nocapture",
            "--test-threads=1",
        ])
        .output()
        .context("running the bench_scale test")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("BENCH "))
        .map(str::to_owned)
        .collect();
    if !out.status.success() || lines.is_empty() {
        bail!(
            "bench_scale failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    Ok(lines)
}

/// The master's own CPU and RSS while it supervises 64 demo workers.
fn master_cost(opts: &BenchOptions, watch: Duration) -> Result<String> {
    let mut ns = Netns::create("ipcb-master64")?;
    let name = "ipcb-master64";
    let mut c = ns.command(&opts.bin);
    c.args([
        "run",
        "--name",
        name,
        "--workers",
        "64",
        "--spawn-delay",
        "20ms",
    ])
    .args(["--listen", &format!("127.0.0.1:{PUBLIC_PORT}")]);
    ns.spawn(c, &PathBuf::from(WORK_DIR).join("master64.log"))?;
    let result = (|| -> Result<String> {
        wait_cluster_live(&ns, &opts.bin, name, 64, Duration::from_secs(120))?;
        let pid = master_pid(name)?;
        let ticks = |pid: i32| -> Result<u64> {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
            let after = stat.rsplit_once(')').map(|(_, r)| r).context("bad stat")?;
            let f: Vec<&str> = after.split_whitespace().collect();
            Ok(f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
                + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0))
        };
        let t0 = ticks(pid)?;
        let start = Instant::now();
        std::thread::sleep(watch);
        let t1 = ticks(pid)?;
        // USER_HZ is 100: one tick is 10 ms of CPU.
        let cpu_pct = (t1 - t0) as f64 * 1000.0 / start.elapsed().as_millis().max(1) as f64;
        let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
        let rss_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        Ok(format!(
            "master_64_workers cpu_pct={cpu_pct:.2} rss_mib={:.1} watch_s={}",
            rss_kib as f64 / 1024.0,
            watch.as_secs()
        ))
    })();
    let _ = ns
        .command(&opts.bin)
        .args(["stop", "--name", name])
        .output();
    result
}

/// The master's pid: the process whose cmdline is `ipcluster run … --name NAME`.
fn master_pid(name: &str) -> Result<i32> {
    for entry in fs::read_dir("/proc")?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_master = args.first().is_some_and(|a| a.ends_with("ipcluster"))
            && args.get(1).is_some_and(|a| a == "run")
            && args.windows(2).any(|w| w[0] == "--name" && w[1] == name);
        if is_master {
            return Ok(pid);
        }
    }
    bail!("no master process found for cluster {name}")
}
