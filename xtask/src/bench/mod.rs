//! `cargo xtask bench`: what steering costs, measured side by side in one run.
//!
//! Every path to the same kind of nginx worker runs in a fresh network namespace
//! (conntrack and TIME_WAIT state of one path cannot tax another), the paths are
//! interleaved and their order reversed every other round, and every figure is
//! reported as the median with its spread, beside CPU per request (the path's
//! own processes and ksoftirqd, so that other work on a shared machine does not
//! count), as ratios to the direct connection measured in the same run.

mod bpf_stats;
mod crash;
mod env;
mod load;
mod master_scale;
mod repeatability;
mod report;

use std::{
    fmt::Write as _,
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{is_root, run_checked, say};
use env::{Netns, PathCpu, cpu_sample};
use load::{LoadSpec, Mode};
pub use report::Figures;

const PUBLIC_PORT: u16 = 8080;
const BACKEND_PORT: u16 = 21000;
const WORK_DIR: &str = "/tmp/ipcluster-bench";
/// Reload under paced load: each of the 32 client slots opens at most one
/// connection per 10 ms (≤ 3200 connections/s).
const RELOAD_PACE: Duration = Duration::from_millis(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PathKind {
    Direct,
    Ebpf,
    Iptables,
    Haproxy,
    NginxStream,
    SkLookup,
}

impl PathKind {
    pub const ALL: [PathKind; 6] = [
        PathKind::Direct,
        PathKind::Ebpf,
        PathKind::SkLookup,
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
            PathKind::SkLookup => "ipcluster, sk-lookup backend",
        }
    }

    fn short(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::Ebpf => "ebpf",
            PathKind::Iptables => "iptables",
            PathKind::Haproxy => "haproxy",
            PathKind::NginxStream => "nginx",
            PathKind::SkLookup => "sk-lookup",
        }
    }
}

pub struct BenchOptions {
    pub quick: bool,
    pub bin: PathBuf,
    pub root: PathBuf,
    /// The paths of cases 1 and 2.
    pub paths: Vec<PathKind>,
    /// Only this case (`--case`); every case when `None`.
    pub case: Option<Case>,
}

/// A case that can run alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Case {
    /// Master CPU and `status` latency with many idle connections, and with 64 workers.
    MasterScale,
    /// How soon a crashed worker's band is steered away and served by its replacement.
    Crash,
    /// Reload under paced and saturating load, for the backends among `--paths`.
    Reload,
}

/// `--case master-scale`.
pub fn parse_case(name: &str) -> Result<Case> {
    match name.trim() {
        "master-scale" => Ok(Case::MasterScale),
        "crash" => Ok(Case::Crash),
        "reload" => Ok(Case::Reload),
        other => bail!("unknown case {other:?}: use master-scale, crash or reload"),
    }
}

/// `--paths direct,ebpf,…` (empty: all of them).
pub fn parse_paths(names: &[String]) -> Result<Vec<PathKind>> {
    if names.is_empty() {
        return Ok(PathKind::ALL.to_vec());
    }
    names
        .iter()
        .map(|n| {
            PathKind::ALL
                .into_iter()
                .find(|k| k.short() == n.trim())
                .with_context(|| {
                    format!(
                        "unknown path {n:?}: use direct, ebpf, sk-lookup, iptables, haproxy, nginx"
                    )
                })
        })
        .collect()
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
            stop_cluster(&self.ns, &self.bin, name);
        }
    }
}

impl Stand {
    /// The steering counters of an ipcluster path (`status --json`), if any.
    fn counters(&self) -> Option<serde_json::Value> {
        let name = self.cluster.as_ref()?;
        let status = status_json(&self.ns, &self.bin, name).ok()?;
        let counters = status.get("counters")?.clone();
        (!counters.is_null()).then_some(counters)
    }
}

/// `ipcluster stop` inside the namespace (ends the workers, removes steering).
fn stop_cluster(ns: &Netns, bin: &Path, name: &str) {
    match ns.command(bin).args(["stop", "--name", name]).output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => say(
            "bench",
            &format!(
                "ipcluster stop --name {name}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
        ),
        Err(e) => say("bench", &format!("ipcluster stop --name {name}: {e}")),
    }
}

fn write_worker_files() -> Result<PathBuf> {
    let dir = PathBuf::from(WORK_DIR);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // Logs of an earlier run would be mistaken for this one's.
    for entry in fs::read_dir(&dir)?.flatten() {
        if entry.path().extension().is_some_and(|e| e == "log") {
            let _ = fs::remove_file(entry.path());
        }
    }
    let conf = "daemon off;\nmaster_process off;\nworker_processes 1;\npid @DIR@/nginx-@PORT@.pid;\n\
                error_log stderr warn;\nworker_rlimit_nofile 16384;\nevents { worker_connections 8192; }\n\
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
    let mut ns = Netns::create(&format!("{}{}-{tag}", env::PREFIX, kind.short()))?;
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
                "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\ndaemon off;\nmaster_process off;\n\
                 worker_processes 1;\nworker_rlimit_nofile 16384;\n\
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
        PathKind::Ebpf | PathKind::Iptables | PathKind::SkLookup => {
            let name = format!("{}{}-{tag}", env::PREFIX, kind.short());
            let backend = kind.short();
            let mut c = ipcluster_run(&ns, &opts.bin, &name, backend, workers.into());
            c.args([
                "--port-range",
                &format!("{BACKEND_PORT}-{}", BACKEND_PORT + 999),
            ])
            .arg("--")
            .arg(worker_script)
            .arg("{port}");
            ns.spawn(c, &log("master"))?;
            // From here on, a failure still stops the cluster (Stand's drop).
            let stand = Stand {
                ns,
                port: PUBLIC_PORT,
                cluster: Some(name.clone()),
                bin: opts.bin.clone(),
            };
            wait_cluster_live(
                &stand.ns,
                &opts.bin,
                &name,
                workers.into(),
                Duration::from_secs(30),
            )?;
            stand.ns.wait_port(PUBLIC_PORT, Duration::from_secs(10))?;
            return Ok(stand);
        }
    };
    ns.wait_port(port, Duration::from_secs(10))?;
    Ok(Stand {
        ns,
        port,
        cluster: None,
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
) -> Result<serde_json::Value> {
    let deadline = Instant::now() + timeout;
    let mut last;
    loop {
        match status_json(ns, bin, name) {
            Ok(s) if live_workers(&s, None) >= workers && !s["table"].is_null() => return Ok(s),
            Ok(s) => last = format!("{} live", live_workers(&s, None)),
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!(
                "cluster {name} did not get {workers} live workers within {timeout:?} (last: {last})"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What one wrk run reported.
struct WrkResult {
    rate: f64,
    p50: f64,
    p99: f64,
    requests: f64,
    errors: u64,
}

/// Run wrk inside the namespace.
fn wrk(ns: &Netns, port: u16, new_connections: bool, duration: Duration) -> Result<WrkResult> {
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
    let (rate, p50, p99, requests) = report::parse_wrk(&text)?;
    Ok(WrkResult {
        rate,
        p50,
        p99,
        requests,
        errors: report::parse_wrk_errors(&text),
    })
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
    // Ctrl-C / SIGTERM: finish the current measurement, then clean up as usual.
    env::catch_interrupts();
    let swept = env::sweep(&opts.bin);
    if !swept.is_empty() {
        say(
            "bench",
            &format!("removed leftovers of an earlier run: {}", swept.join("; ")),
        );
    }
    // Built before the clock starts: build time is not part of the wall time.
    // A case run alone (`--case`) does not need it.
    let scale_test = if opts.case.is_none() {
        say(
            "bench",
            "building the bench_scale root test (cargo test --no-run --release)",
        );
        build_scale_test(opts)
    } else {
        Err(anyhow::anyhow!("not built: --case runs one case"))
    };
    let result = (|| -> Result<Figures> {
        let worker_script = write_worker_files()?;
        match opts.case {
            Some(Case::MasterScale) => master_scale_case(opts),
            Some(Case::Crash) => crash_case(opts),
            Some(Case::Reload) => reload_case(opts),
            None => run_cases(opts, &worker_script, scale_test),
        }
    })();
    // Whatever happened above: nothing of the benchmark stays behind.
    let swept = env::sweep(&opts.bin);
    let left = env::leftovers();
    let mut figures = match result {
        Ok(figures) => figures,
        Err(e) if left.is_empty() => {
            say("bench", "stopped; everything it started is removed");
            return Err(e);
        }
        Err(e) => return Err(e.context(format!("and it left behind: {}", left.join("; ")))),
    };
    figures.cleanup = if swept.is_empty() && left.is_empty() {
        "after the run: no namespace, process, state or pin folder, or iptables rule of the \
         benchmark is left (checked)"
            .into()
    } else {
        format!(
            "after the run the sweep had to remove: {}; still left: {}",
            if swept.is_empty() {
                "nothing".into()
            } else {
                swept.join("; ")
            },
            if left.is_empty() {
                "nothing".into()
            } else {
                left.join("; ")
            }
        )
    };
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
    if !left.is_empty() {
        bail!("the benchmark left things behind: {}", left.join("; "));
    }
    Ok(())
}

fn run_cases(
    opts: &BenchOptions,
    worker_script: &Path,
    scale_test: Result<PathBuf>,
) -> Result<Figures> {
    let settings = if opts.quick {
        Settings {
            rounds: 2,
            duration: Duration::from_secs(1),
            master_watch: Duration::from_secs(5),
        }
    } else {
        Settings {
            rounds: 5,
            duration: Duration::from_secs(4),
            master_watch: Duration::from_secs(30),
        }
    };
    timed_run(|figures| {
        figures.rounds = settings.rounds;
        figures.duration = settings.duration;
        all_cases(opts, worker_script, scale_test, &settings, figures)
    })
}

/// The start and finish steps every run shares, around `body` (which adds
/// its figures): the machine line, the load average before and after, the
/// machine's steal time over the run and the wall time.
fn timed_run(body: impl FnOnce(&mut Figures) -> Result<()>) -> Result<Figures> {
    let started = Instant::now();
    let mut figures = Figures::default();
    figures.machine = report::describe_machine();
    figures.load_before = env::load_average();
    let machine_before = cpu_sample()?;
    body(&mut figures)?;
    let machine_after = cpu_sample()?;
    figures.steal_overall = machine_before.steal_pct_until(&machine_after);
    figures.load_after = env::load_average();
    figures.wall = started.elapsed();
    Ok(figures)
}

/// Every case, one after the other (the run without `--case`).
fn all_cases(
    opts: &BenchOptions,
    worker_script: &Path,
    scale_test: Result<PathBuf>,
    settings: &Settings,
    figures: &mut Figures,
) -> Result<()> {
    // Cases 1 and 2: every path stood up at once (each in its own namespace),
    // then measured in alternation, path order rotated every round, so that a
    // change in the machine's background load falls on every path alike.
    // The kernel's per-program run statistics, on for the bench only.
    let bpf_stats_on = bpf_stats::StatsEnabled::enable()
        .map_err(|e| figures.errors.push(format!("per-program cost: {e:#}")))
        .ok();
    for workers in [1u16, 4] {
        measure_paths(opts, worker_script, settings, workers, figures);
        env::check_interrupted()?;
    }
    // Off again before the reloads and the `BPF_PROG_TEST_RUN` timings: with
    // the statistics on, every program run also reads the clock twice
    // (about 100 ns per run on this kind of VM), which is not steering's cost.
    drop(bpf_stats_on);

    // Case 3: reload under load, every backend, the demo worker (it reports its generation).
    reload_figures(opts, &["ebpf", "sk-lookup", "iptables"], figures)?;

    env::check_interrupted()?;
    // Case 4: scale.
    say(
        "bench",
        "scale: table publish, per-packet cost, flow memory (root test bench_scale)",
    );
    match scale_test.and_then(|exe| scale_figures(&exe)) {
        Ok(lines) => figures.scale.extend(lines),
        Err(e) => figures.errors.push(format!("scale: {e:#}")),
    }
    master_scale_figures(opts, settings.master_watch, figures)?;
    crash_figures(opts, figures)
}

/// What the load of one measurement reported.
enum Outcome {
    Many(load::LoadResult),
    Wrk(WrkResult),
}

/// One measurement of one path: wrk with one worker (case 1), the own load
/// generator from 64 addresses with four (case 2).
fn measure_once(
    kind: PathKind,
    stand: &Stand,
    workers: u16,
    new_conn: bool,
    duration: Duration,
    figures: &mut Figures,
) -> Result<()> {
    let many = workers > 1;
    let counters_before = stand.counters();
    let programs_before = stand.cluster.as_deref().map(bpf_stats::sample);
    let path_before = PathCpu::sample(&stand.ns);
    let before = cpu_sample()?;
    // The load: the own generator from 64 addresses (many), or wrk.
    let mut outcome = if many {
        let spec = LoadSpec {
            target: SocketAddr::from(([127, 0, 0, 1], stand.port)),
            mode: if new_conn {
                Mode::NewConnection
            } else {
                Mode::KeepAlive
            },
            sources: sources(64),
            connections: 64,
            duration,
            pace: None,
            band_ports: (kind == PathKind::Direct).then(|| backend_ports(workers)),
        };
        Outcome::Many(stand.ns.enter(move || load::run(&spec))?)
    } else {
        Outcome::Wrk(wrk(&stand.ns, stand.port, new_conn, duration)?)
    };
    let after = cpu_sample()?;
    let path_after = PathCpu::sample(&stand.ns);
    let requests = match &outcome {
        Outcome::Many(r) => r.requests.max(1) as f64,
        Outcome::Wrk(w) => w.requests.max(1.0),
    };
    let by_role = path_before.breakdown_until(&path_after);
    let cpu: f64 = by_role.values().sum();
    let machine_us = before.busy_us_until(&after) / requests;
    let steal = before.steal_pct_until(&after);
    match &mut outcome {
        Outcome::Many(r) => figures.add_many(kind, new_conn, r, cpu / requests, machine_us, steal),
        Outcome::Wrk(w) => figures.add_single(
            kind,
            new_conn,
            report::Sample {
                rate: w.rate,
                p50: w.p50,
                p99: w.p99,
                cpu_us: cpu / requests,
                machine_us,
                steal,
                errors: w.errors,
            },
        ),
    }
    figures.add_breakdown(kind, new_conn, many, &by_role, requests);
    figures.add_counters(kind, many, &counters_before, &stand.counters());
    add_program_cost(
        figures,
        stand,
        kind,
        many,
        new_conn,
        &programs_before,
        requests,
    );
    figures.add_background(
        before.busy_us_until(&after),
        cpu,
        before.total_us_until(&after),
    );
    Ok(())
}

/// Account the run statistics of the stand's eBPF programs over one measurement.
fn add_program_cost(
    figures: &mut Figures,
    stand: &Stand,
    kind: PathKind,
    many: bool,
    new_conn: bool,
    before: &Option<bpf_stats::ProgramStats>,
    requests: f64,
) {
    let (Some(before), Some(cluster)) = (before, stand.cluster.as_deref()) else {
        return;
    };
    let delta = bpf_stats::delta(before, &bpf_stats::sample(cluster));
    figures.add_program_cost(kind, many, new_conn, &delta, requests);
}

/// Stand every path up with `workers` workers, measure them round by round in
/// alternation, then tear them all down.
fn measure_paths(
    opts: &BenchOptions,
    worker_script: &Path,
    settings: &Settings,
    workers: u16,
    figures: &mut Figures,
) {
    let tag = format!("w{workers}");
    let mut stands = Vec::new();
    for &kind in &opts.paths {
        say(
            "bench",
            &format!("{workers} worker(s): standing up {}", kind.label()),
        );
        match stand_up(kind, workers, &tag, opts, worker_script) {
            Ok(stand) => stands.push((kind, stand)),
            Err(e) => {
                say("bench", &format!("{} failed: {e:#}", kind.label()));
                figures
                    .errors
                    .push(format!("{} with {workers} worker(s): {e:#}", kind.label()));
            }
        }
    }
    let what = if workers > 1 {
        "64 addresses, own load generator"
    } else {
        "wrk -t1 -c32"
    };
    for round in 0..settings.rounds {
        let mut order: Vec<usize> = (0..stands.len()).collect();
        if !order.is_empty() {
            order.rotate_left(round % stands.len());
        }
        if !round.is_multiple_of(2) {
            order.reverse();
        }
        for new_conn in [false, true] {
            let mode = if new_conn { "new conn" } else { "keep-alive" };
            for &i in &order {
                if env::interrupted() {
                    break;
                }
                let (kind, stand) = &stands[i];
                say(
                    "bench",
                    &format!(
                        "round {}/{}, {what}, {mode}: {}",
                        round + 1,
                        settings.rounds,
                        kind.label()
                    ),
                );
                if let Err(e) =
                    measure_once(*kind, stand, workers, new_conn, settings.duration, figures)
                {
                    say("bench", &format!("{} failed: {e:#}", kind.label()));
                    figures.errors.push(format!(
                        "{} ({what}, {mode}, round {}): {e:#}",
                        kind.label(),
                        round + 1
                    ));
                }
            }
        }
    }
    say("bench", &format!("{workers} worker(s): tearing down"));
    drop(stands);
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
    )?;
    // The Debian packages start system services; the benchmark runs its own.
    for service in ["nginx", "haproxy"] {
        let _ = Command::new("sh")
            .args([
                "-c",
                &format!(
                    "systemctl stop {service} 2>/dev/null || service {service} stop 2>/dev/null"
                ),
            ])
            .status();
    }
    Ok(())
}

/// `ipcluster run --name NAME --backend BACKEND --workers N --listen 127.0.0.1:PUBLIC_PORT`
/// in the namespace; callers add their own flags and worker command.
fn ipcluster_run(ns: &Netns, bin: &Path, name: &str, backend: &str, workers: usize) -> Command {
    let mut c = ns.command(bin);
    c.args(["run", "--name", name, "--backend", backend, "--workers"])
        .arg(workers.to_string())
        .args(["--listen", &format!("127.0.0.1:{PUBLIC_PORT}")]);
    c
}

/// Reload a demo cluster while 32 client addresses open connections
/// continuously: start a second `ipcluster run` with the same name, watch the
/// switch from the master's status and from the clients' answers, keep the
/// load on for 2 s after the switch.
fn reload_under_load(
    opts: &BenchOptions,
    backend: &str,
    pace: Option<Duration>,
) -> Result<report::Reload> {
    let mut ns = Netns::create(&format!("{}reload-{backend}", env::PREFIX))?;
    let name = format!("{}reload-{backend}", env::PREFIX);
    let workers = 4usize;
    let master = |ns: &mut Netns, what: &str| -> Result<()> {
        let c = ipcluster_run(ns, &opts.bin, &name, backend, workers);
        ns.spawn(
            c,
            &PathBuf::from(WORK_DIR).join(format!("reload-{backend}-{what}.log")),
        )
    };
    let result = (|| -> Result<report::Reload> {
        master(&mut ns, "first")?;
        let first = wait_cluster_live(&ns, &opts.bin, &name, workers, Duration::from_secs(30))?;
        let first_gen = first["generation"]
            .as_u64()
            .context("no generation in status")?;
        ns.wait_port(PUBLIC_PORT, Duration::from_secs(10))?;
        let spec = LoadSpec {
            target: SocketAddr::from(([127, 0, 0, 1], PUBLIC_PORT)),
            mode: Mode::NewConnection,
            sources: sources(32),
            connections: 32,
            duration: Duration::from_secs(60),
            pace,
            band_ports: None,
        };
        let stop_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
        let give_up = Arc::new(AtomicBool::new(false));
        let load = {
            let (stop_at, give_up) = (Arc::clone(&stop_at), Arc::clone(&give_up));
            ns.enter_thread(move || {
                load::run_until(&spec, |started| {
                    give_up.load(Ordering::Relaxed)
                        || started.elapsed() > spec.duration
                        || stop_at
                            .lock()
                            .ok()
                            .and_then(|s| *s)
                            .is_some_and(|t| Instant::now() >= t)
                })
            })?
        };
        std::thread::sleep(Duration::from_secs(2));
        let reload_started = Instant::now();
        let waited = (|| -> Result<(Duration, u64)> {
            master(&mut ns, "second")?;
            let deadline = reload_started + Duration::from_secs(45);
            loop {
                if let Ok(s) = status_json(&ns, &opts.bin, &name)
                    && let Some(g) = s["generation"].as_u64()
                    && g > first_gen
                    && live_workers(&s, Some(g)) >= workers
                    && s["table"]["services"][0]["worker_ports"]
                        .as_array()
                        .is_some_and(|ports| {
                            let live: Vec<u64> = s["workers"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .filter(|w| w["generation"].as_u64() == Some(g))
                                .filter_map(|w| w["port"].as_u64())
                                .collect();
                            ports
                                .iter()
                                .all(|p| p.as_u64().is_some_and(|p| live.contains(&p)))
                        })
                {
                    return Ok((reload_started.elapsed(), g));
                }
                if Instant::now() > deadline {
                    bail!("the new generation was not steered to within 45 s");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })();
        match &waited {
            Ok(_) => {
                if let Ok(mut s) = stop_at.lock() {
                    *s = Some(Instant::now() + Duration::from_secs(2));
                }
            }
            Err(_) => give_up.store(true, Ordering::Relaxed),
        }
        let result = load
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))?
            .context("load thread did not run")?;
        let (switch_time, new_gen) = waited?;
        // Client side: when each band first answered from the new generation,
        // and the last time any band answered from an old one.
        let since_reload = |t: Instant| t.saturating_duration_since(reload_started);
        let mut first_new_by_band = std::collections::BTreeMap::new();
        let mut last_old: Option<Instant> = None;
        for (answer, seen) in &result.seen {
            let field = |k: &str| {
                answer
                    .split_whitespace()
                    .find_map(|t| t.strip_prefix(k))
                    .and_then(|v| v.parse::<u64>().ok())
            };
            let (Some(band), Some(generation)) = (field("band="), field("generation=")) else {
                continue;
            };
            if generation >= new_gen {
                let e = first_new_by_band.entry(band).or_insert(seen.first);
                *e = (*e).min(seen.first);
            } else {
                last_old = Some(last_old.map_or(seen.last, |l: Instant| l.max(seen.last)));
            }
        }
        let clients_switched = (first_new_by_band.len() == workers)
            .then(|| first_new_by_band.values().map(|t| since_reload(*t)).max())
            .flatten();
        Ok(report::Reload {
            backend: backend.to_owned(),
            load: match pace {
                Some(p) => format!(
                    "paced, {:.0} conn/s",
                    result.rate().min(32.0 / p.as_secs_f64())
                ),
                None => format!("saturating, {:.0} conn/s", result.rate()),
            },
            attempted: result.requests + result.failures,
            failed: result.failures,
            switch_time,
            clients_switched,
            last_old_answer: last_old.map(since_reload),
            bands_per_source_max: result.bands_per_source_max(),
            error_kinds: result.error_kinds.clone(),
        })
    })();
    stop_cluster(&ns, &opts.bin, &name);
    result
}

/// Build the bench_scale test binary and return its path.
fn build_scale_test(opts: &BenchOptions) -> Result<PathBuf> {
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
            "--no-run",
            "--message-format=json",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("building the bench_scale test")?;
    if !out.status.success() {
        bail!("building the bench_scale test failed");
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["target"]["name"] == "bench_scale")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .context("cargo did not report the bench_scale executable")
}

/// Figures that need the library: run the `bench_scale` root test in a fresh
/// namespace (its tc programs attach to that namespace's `lo`) and keep its
/// `BENCH` lines.
fn scale_figures(exe: &Path) -> Result<Vec<String>> {
    let ns = Netns::create(&format!("{}scale", env::PREFIX))?;
    let out = ns
        .command(exe)
        .args(["--nocapture", "--test-threads=1"])
        .output()
        .context("running the bench_scale test")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<String> = text
        .lines()
        // The first line of a test shares its line with libtest's "test name ... ".
        .filter_map(|l| l.split_once("BENCH ").map(|(_, rest)| rest))
        .map(str::to_owned)
        .collect();
    if !out.status.success() || lines.is_empty() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let failures: Vec<&str> = text
            .lines()
            .chain(stderr.lines())
            .filter(|l| l.contains("panicked") || l.contains("FAILED"))
            .take(6)
            .collect();
        bail!("bench_scale failed: {}", failures.join(" | "));
    }
    Ok(lines)
}

/// `--case master-scale` alone: its figures, in an otherwise empty report.
fn master_scale_case(opts: &BenchOptions) -> Result<Figures> {
    let watch = if opts.quick {
        Duration::from_secs(5)
    } else {
        Duration::from_secs(30)
    };
    timed_run(|figures| master_scale_figures(opts, watch, figures))
}

/// `--case crash`: crash recovery on every backend.
fn crash_case(opts: &BenchOptions) -> Result<Figures> {
    timed_run(|figures| crash_figures(opts, figures))
}

/// `--case reload`: the reloads under load of the backends among `--paths`,
/// each second master's log kept in `target/bench/` (it times the reload's
/// steps: lock take-over, steering install, each worker's readiness, publish).
fn reload_case(opts: &BenchOptions) -> Result<Figures> {
    let backends: Vec<&str> = opts
        .paths
        .iter()
        .filter_map(|k| match k {
            PathKind::Ebpf => Some("ebpf"),
            PathKind::SkLookup => Some("sk-lookup"),
            PathKind::Iptables => Some("iptables"),
            _ => None,
        })
        .collect();
    timed_run(|figures| reload_figures(opts, &backends, figures))
}

/// Reloads under paced, then saturating load, of `backends`; each second
/// master's log is kept in `target/bench/` (it times the reload's steps: lock
/// take-over, steering install, each worker's readiness, publish).
fn reload_figures(opts: &BenchOptions, backends: &[&str], figures: &mut Figures) -> Result<()> {
    for pace in [Some(RELOAD_PACE), None] {
        for &backend in backends {
            env::check_interrupted()?;
            let load = if pace.is_some() {
                "paced"
            } else {
                "saturating"
            };
            say(
                "bench",
                &format!("reload under {load} load, {backend} backend"),
            );
            match reload_under_load(opts, backend, pace) {
                Ok(r) => figures.reloads.push(r),
                Err(e) => figures
                    .errors
                    .push(format!("reload ({backend}, {load} load): {e:#}")),
            }
            let log = PathBuf::from(WORK_DIR).join(format!("reload-{backend}-second.log"));
            let kept =
                PathBuf::from("target/bench").join(format!("reload-{backend}-{load}-master.log"));
            if let Err(e) =
                std::fs::create_dir_all("target/bench").and_then(|()| std::fs::copy(&log, &kept))
            {
                figures
                    .errors
                    .push(format!("keeping {}: {e}", log.display()));
            }
        }
    }
    Ok(())
}

/// Crash recovery on every backend (see [`crash`]).
fn crash_figures(opts: &BenchOptions, figures: &mut Figures) -> Result<()> {
    for backend in ["ebpf", "sk-lookup", "iptables"] {
        env::check_interrupted()?;
        say("bench", &format!("crash recovery ({backend})"));
        match crash::crash_recovery(opts, backend) {
            Ok(line) => figures.scale.push(line),
            Err(e) => figures
                .errors
                .push(format!("crash recovery ({backend}): {e:#}")),
        }
    }
    Ok(())
}

/// The master's cost: with 10k/50k/100k idle connections on 8 workers (eBPF
/// and sk-lookup backends), and with 64 idle workers.
fn master_scale_figures(opts: &BenchOptions, watch: Duration, figures: &mut Figures) -> Result<()> {
    for backend in ["ebpf", "sk-lookup"] {
        env::check_interrupted()?;
        match master_scale::run(opts, backend, watch) {
            Ok(lines) => figures.scale.extend(lines),
            Err(e) => figures
                .errors
                .push(format!("master with idle connections ({backend}): {e:#}")),
        }
    }
    say(
        "bench",
        &format!("scale: master CPU and RSS with 64 workers for {watch:?}"),
    );
    env::check_interrupted()?;
    match master_cost(opts, watch) {
        Ok(line) => figures.scale.push(line),
        Err(e) => figures
            .errors
            .push(format!("master with 64 workers: {e:#}")),
    }
    Ok(())
}

/// The master's own CPU and RSS while it supervises 64 demo workers.
fn master_cost(opts: &BenchOptions, watch: Duration) -> Result<String> {
    let mut ns = Netns::create(&format!("{}master64", env::PREFIX))?;
    let name = format!("{}master64", env::PREFIX);
    let mut c = ipcluster_run(&ns, &opts.bin, &name, "ebpf", 64);
    // 64 demo workers of ~4 MiB each must not trip the default 512 MiB budget.
    c.args(["--spawn-delay", "20ms", "--cluster-memory-limit", "2GiB"]);
    let spawned = Instant::now();
    ns.spawn(c, &PathBuf::from(WORK_DIR).join("master64.log"))?;
    let result = (|| -> Result<String> {
        let status = wait_cluster_live(&ns, &opts.bin, &name, 64, Duration::from_secs(120))?;
        let startup = spawned.elapsed();
        let pid = status["master_pid"]
            .as_i64()
            .and_then(|p| i32::try_from(p).ok())
            .context("no master_pid in status")?;
        // Let the start-up settle, then watch the steady state.
        std::thread::sleep(Duration::from_secs(1));
        let cpu_pct = master_scale::master_cpu(pid, watch)?;
        let rss = master_scale::status_mib(pid, "VmRSS:");
        let rss_peak = master_scale::status_mib(pid, "VmHWM:");
        let after = status_json(&ns, &opts.bin, &name)?;
        let live = live_workers(&after, None);
        Ok(format!(
            "master_64_workers cpu_pct={cpu_pct:.2} rss_mib={rss:.1} rss_peak_mib={rss_peak:.1} \
             cluster_rss_mib={:.0} live_after={live} startup_s={:.1} watch_s={}",
            after["cluster_rss"].as_f64().unwrap_or(0.0) / (1024.0 * 1024.0),
            startup.as_secs_f64(),
            watch.as_secs()
        ))
    })();
    stop_cluster(&ns, &opts.bin, &name);
    result
}
