//! End-to-end: memory and health governance, with real workers that allocate
//! memory on request (`ipcluster/examples/aware_worker.rs`).
//!
//! - A live worker pushed over `--worker-rss-limit` is retired and replaced:
//!   its open `/stream` keeps receiving after the replacement went live, and
//!   its band's new connections reach the replacement (both backends). Prints
//!   `BENCH governance_rss_replace` (from `/alloc` returning to the band
//!   serving from the replacement).
//! - Cluster RSS over the low watermark: the retired worker holding the memory
//!   is asked to die (it gets `die` and exits 0); over the high watermark it is
//!   killed (SIGKILL). The memory sits in a child of the worker (`sh` runs the
//!   server), so the master must measure the whole process tree.
//! - SIGUSR1 to the master ends every retired worker, open connection or not,
//!   and no live one.
//! - Retirements are rate-limited: with `--retire-rate 1`, the second worker over
//!   its limit keeps serving until the window has passed; the refusal is logged
//!   once, not once per decision.
//! - A worker that said hello and then stops pinging is replaced.
//! - (ignored, slow) the master's own CPU and RSS while it supervises 64 workers
//!   for 60 s.
//!
//! The worker is `$IPCLUSTER_EXAMPLES/aware_worker` (set by `cargo xtask test`),
//! else `examples/aware_worker` next to the ipcluster binary under test.
//! Root, one test thread:
//! `cargo test -p ipcluster-tests --test master_governance -- --test-threads=1`

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ipcluster::steering::band_of;
use ipcluster_tests::client::connect_from;
use ipcluster_tests::cluster::{
    Cluster, ClusterSpec, http_get, ipcluster, ipcluster_bin, live_workers, signal, wait_for,
    workers_in,
};
use ipcluster_tests::guard::defer;
use ipcluster_tests::loopback_client;
use ipcluster_tests::unique::{Ports, cluster_name};
use serde_json::Value;

const MIB: u64 = 1024 * 1024;

// ---- the worker --------------------------------------------------------------

/// The aware example worker: `$IPCLUSTER_EXAMPLES/aware_worker`, else
/// `examples/aware_worker` next to the ipcluster binary under test.
fn aware_worker() -> PathBuf {
    let (path, from) = match std::env::var_os("IPCLUSTER_EXAMPLES") {
        Some(dir) => (
            PathBuf::from(dir).join("aware_worker"),
            "$IPCLUSTER_EXAMPLES",
        ),
        None => (
            ipcluster_bin()
                .with_file_name("examples")
                .join("aware_worker"),
            "the ipcluster binary's folder",
        ),
    };
    assert!(
        path.is_file(),
        "the example worker is missing at {} (from {from}): build it with \
         `cargo build -p ipcluster --bins --examples` (same profile and target dir as the \
         binary under test), or set IPCLUSTER_EXAMPLES to the folder that holds it",
        path.display()
    );
    path
}

/// `CMD ARGS` for the aware worker, optionally under `sh` so that the process
/// the master started (the worker's root) is not the one that holds the memory.
fn worker_command(under_shell: bool) -> Vec<String> {
    let worker = aware_worker().display().to_string();
    if under_shell {
        // `; exit $?` keeps sh from exec'ing the server: it stays the parent.
        vec![
            "/bin/sh".into(),
            "-c".into(),
            "\"$0\"; exit $?".into(),
            worker,
        ]
    } else {
        vec![worker]
    }
}

fn spec(
    backend: &str,
    workers: u32,
    listen: SocketAddr,
    flags: &[&str],
    shell: bool,
) -> ClusterSpec {
    ClusterSpec {
        backend: backend.into(),
        workers,
        listens: vec![listen],
        flags: flags.iter().map(|f| (*f).to_owned()).collect(),
        command: worker_command(shell),
    }
}

fn listen_on(ports: &Ports) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], ports.get(0)))
}

/// What the aware worker answers on `/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Reply {
    band: u32,
    pid: i32,
    generation: u64,
}

fn parse_reply(body: &str) -> std::io::Result<Reply> {
    let v: Value = serde_json::from_str(body.trim())
        .map_err(|e| std::io::Error::other(format!("not JSON ({e}): {body:?}")))?;
    let field = |k: &str| {
        v[k].as_u64()
            .ok_or_else(|| std::io::Error::other(format!("no {k} in {body:?}")))
    };
    Ok(Reply {
        band: u32::try_from(field("band")?).unwrap_or(u32::MAX),
        pid: i32::try_from(field("pid")?).unwrap_or(0),
        generation: field("generation")?,
    })
}

/// `GET /` from `client`.
fn get(client: IpAddr, target: SocketAddr) -> std::io::Result<Reply> {
    let (code, body) = http_get(client, target, "/")?;
    if code != 200 {
        return Err(std::io::Error::other(format!("HTTP {code}: {body}")));
    }
    parse_reply(&body)
}

/// `GET path` from `client`, expecting 200 and a JSON body.
fn get_json(client: IpAddr, target: SocketAddr, path: &str) -> Value {
    let (code, body) = http_get(client, target, path)
        .unwrap_or_else(|e| panic!("GET {path} from {client} to {target}: {e}"));
    assert_eq!(code, 200, "GET {path}: {body}");
    serde_json::from_str(body.trim()).unwrap_or_else(|e| panic!("GET {path}: {e}: {body:?}"))
}

/// A worker's own port (a direct connection, never steered).
fn direct(port: u64) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], u16::try_from(port).unwrap_or(0)))
}

/// A long-lived `/stream` of the aware worker: `tick=N band=B pid=P generation=G`
/// every 100 ms.
struct Stream {
    reader: BufReader<TcpStream>,
}

impl Stream {
    fn open(client: IpAddr, target: SocketAddr) -> std::io::Result<Stream> {
        let mut stream = connect_from(client, target)?;
        write!(stream, "GET /stream HTTP/1.1\r\nHost: test\r\n\r\n")?;
        let mut reader = BufReader::new(stream);
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 {
                return Err(std::io::Error::other("stream closed in the headers"));
            }
            if header.trim().is_empty() {
                return Ok(Stream { reader });
            }
        }
    }

    /// The next line: (pid, tick).
    fn next(&mut self) -> std::io::Result<(i32, u64)> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the stream ended",
            ));
        }
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| std::io::Error::other(format!("no {k} in {line:?}")))
        };
        Ok((i32::try_from(field("pid")?).unwrap_or(0), field("tick")?))
    }

    /// Read for `how_long`: every line from `pid`, ticks without a gap.
    /// Returns the last tick.
    fn keeps_receiving(&mut self, pid: i32, how_long: Duration, what: &str) -> u64 {
        let until = Instant::now() + how_long;
        let (first_pid, mut last) = self
            .next()
            .unwrap_or_else(|e| panic!("{what}: the stream broke: {e}"));
        assert_eq!(
            first_pid, pid,
            "{what}: the stream is served by another worker"
        );
        while Instant::now() < until {
            let (p, tick) = self
                .next()
                .unwrap_or_else(|e| panic!("{what}: the stream broke after tick {last}: {e}"));
            assert_eq!(p, pid, "{what}: the stream moved to worker {p}");
            assert_eq!(tick, last + 1, "{what}: ticks jumped from {last} to {tick}");
            last = tick;
        }
        last
    }
}

// ---- the cluster, from outside ----------------------------------------------

/// The worker with this pid in a status report.
fn worker(status: &Value, pid: i64) -> Option<Value> {
    status["workers"]
        .as_array()?
        .iter()
        .find(|w| w["pid"] == pid)
        .cloned()
}

fn pids(workers: &[Value]) -> Vec<i64> {
    let mut pids: Vec<i64> = workers.iter().filter_map(|w| w["pid"].as_i64()).collect();
    pids.sort_unstable();
    pids
}

/// Live worker pid of each band.
fn live_by_band(status: &Value) -> BTreeMap<u64, i64> {
    live_workers(status, None)
        .iter()
        .map(|w| {
            (
                w["band"].as_u64().unwrap_or(99),
                w["pid"].as_i64().unwrap_or(0),
            )
        })
        .collect()
}

/// Is `pid` running (not a zombie)?
fn running(pid: i64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with(['Z', 'X']))
    })
}

fn master_pid(cluster: &Cluster) -> i32 {
    i32::try_from(cluster.masters[0].id()).unwrap_or(0)
}

/// Ask the live worker of `client`'s band to be retired (`/retire`), and wait
/// until the band is served by its replacement. Returns (old, new) as the
/// master knows them (status pids).
fn retire_band(cluster: &Cluster, listen: SocketAddr, client: IpAddr) -> (i64, i64) {
    let band = u64::from(band_of(client, 0, cluster.spec.workers));
    let before = live_by_band(&cluster.status());
    let old = before[&band];
    let reply = get_json(client, listen, "/retire?reason=test-retire");
    assert_eq!(reply["retire_requested"], true, "{reply}");
    let new = wait_for(cluster, Duration::from_secs(10), "the replacement", || {
        let status = cluster.status();
        let new = *live_by_band(&status).get(&band)?;
        let retired = worker(&status, old).is_some_and(|w| w["state"] == "retired");
        (new != old && retired).then_some(new)
    });
    (old, new)
}

/// SIGSTOP the master for the duration of `f`, SIGCONT after (even on panic):
/// what `f` does happens between two of the master's measurements, like a
/// memory spike faster than `--monitor-interval`.
/// Wait until the master logs how `victim` ended (`how`: "exit status " or
/// "killed by ") and its whole tree, `server` included, is gone; the master's
/// log at that point. SIGKILL goes to the whole tree, and a process holding a
/// lot of memory takes a moment to be torn down.
fn wait_for_exit(cluster: &Cluster, victim: i64, server: i64, how: &str) -> String {
    let logs = wait_for(
        cluster,
        Duration::from_secs(10),
        "the victim's exit",
        || {
            let logs = cluster.logs();
            log_line(&logs, &[&format!("worker {victim} (band "), how]).map(|_| logs)
        },
    );
    wait_for(
        cluster,
        Duration::from_secs(5),
        "the whole tree gone",
        || (!running(victim) && !running(server)).then_some(()),
    );
    logs
}

fn with_master_frozen<T>(cluster: &Cluster, f: impl FnOnce() -> T) -> T {
    let master = master_pid(cluster);
    signal(master, libc::SIGSTOP);
    let _thaw = defer(move || signal(master, libc::SIGCONT));
    f()
}

/// Allocate `mib` MiB in the worker listening on `port` (a direct connection).
fn alloc_direct(port: u64, mib: u64) {
    let client = loopback_client(1);
    let v = get_json(client, direct(port), &format!("/alloc?mb={mib}"));
    assert_eq!(v["allocated_mib"], mib, "{v}");
}

fn log_has(cluster: &Cluster, needle: &str) -> bool {
    cluster.logs().contains(needle)
}

/// The first log line that contains every one of `needles`.
fn log_line(logs: &str, needles: &[&str]) -> Option<String> {
    logs.lines()
        .find(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_owned)
}

// ---- the tests ---------------------------------------------------------------

/// A live worker over its RSS limit is replaced, three times in a row on one
/// band: each replacement serves the band (different pid, same band) while the
/// first victim's open stream keeps receiving through all of it.
fn rss_limit_replaces_the_worker(backend: &str) {
    const WORKERS: u32 = 4;
    let ports = Ports::reserve(1);
    let listen = listen_on(&ports);
    let cluster = Cluster::start(
        &cluster_name(&format!("gov-rss-{backend}")),
        spec(
            backend,
            WORKERS,
            listen,
            &["--worker-rss-limit", "64MiB", "--monitor-interval", "200ms"],
            false,
        ),
    );
    let client = loopback_client(6);
    let band = band_of(client, 0, WORKERS);
    let before = live_by_band(&cluster.status());
    let first = get(client, listen).expect("GET / before");
    assert_eq!(first.band, band);
    assert_eq!(i64::from(first.pid), before[&u64::from(band)]);

    let mut stream = Stream::open(client, listen).expect("open /stream");
    let mut victim = first;
    let mut victims = Vec::new();
    let mut times = Vec::new();
    for round in 1..=3 {
        let alloc = get_json(client, listen, "/alloc?mb=96");
        assert_eq!(alloc["allocated_mib"], 96, "{alloc}");
        let allocated = Instant::now();
        let mut failures = Vec::new();
        let replacement = wait_for(
            &cluster,
            Duration::from_secs(10),
            "the band served by a replacement",
            || match get(client, listen) {
                Ok(r) if r.pid != victim.pid => Some(r),
                Ok(_) => None,
                Err(e) => {
                    failures.push(e.to_string());
                    None
                }
            },
        );
        let took = allocated.elapsed();
        times.push(took);
        println!(
            "BENCH governance_rss_replace backend={backend} round={round} ms={:.1}",
            took.as_secs_f64() * 1000.0
        );
        assert!(
            failures.is_empty(),
            "round {round}: requests failed while band {band} was replaced: {failures:?}"
        );
        assert_eq!(replacement.band, band, "round {round}: {replacement:?}");
        assert_eq!(replacement.generation, 1, "round {round}: {replacement:?}");
        // Every later connection of the band sticks to the replacement.
        for _ in 0..5 {
            assert_eq!(
                get(client, listen).expect("GET / after").pid,
                replacement.pid
            );
        }
        victims.push(victim.pid);
        victim = replacement;
    }
    // The first victim's stream kept flowing through three table changes of its band.
    stream.keeps_receiving(
        victims[0],
        Duration::from_millis(800),
        "first victim's stream",
    );

    // The status shows what was measured: the victims retired with their memory
    // (from /proc) and the stream counted on the first one.
    let status = cluster.status();
    for (i, &pid) in victims.iter().enumerate() {
        let w = worker(&status, i64::from(pid))
            .unwrap_or_else(|| panic!("victim {pid} not in status: {status}"));
        assert_eq!(w["state"], "retired", "{w}");
        assert_eq!(w["band"], band, "{w}");
        assert!(
            w["rss"].as_u64().unwrap_or(0) > 96 * MIB,
            "rss from /proc: {w}"
        );
        if i == 0 {
            assert_eq!(w["connections"], 1, "the open stream: {w}");
        }
        let why = w["reason"].as_str().unwrap_or_default();
        assert!(
            why.starts_with("low watermark breach: rss ")
                && why.contains("> limit 64.0 MiB; replaced by worker "),
            "status says why: {w}"
        );
        assert!(
            log_line(
                &cluster.logs(),
                &[
                    &format!("retiring worker {pid} (band {band}, generation 1, "),
                    "): low watermark breach: rss ",
                    "> limit 64.0 MiB; starting its replacement"
                ]
            )
            .is_some(),
            "no log line for the retirement of {pid}\n{}",
            cluster.logs()
        );
    }
    assert_eq!(status["limits"]["worker_rss_limit"], 64 * MIB, "{status}");
    let table = ipcluster(
        &["status", "--name", &cluster.name],
        Duration::from_secs(10),
    );
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("limits: worker rss 64.0MiB"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.contains(&victims[0].to_string()) && l.contains("low watermark breach")),
        "{table}"
    );
    let after = live_by_band(&status);
    assert_eq!(after[&u64::from(band)], i64::from(victim.pid), "{status}");
    for (b, pid) in &before {
        if *b != u64::from(band) {
            assert_eq!(after[b], *pid, "band {b} was not concerned: {status}");
        }
    }
    let mean = times.iter().map(Duration::as_secs_f64).sum::<f64>() / times.len() as f64;
    println!(
        "rss limit ({backend}): replacement serving {:?} after /alloc returned (mean {:.0} ms)",
        times,
        mean * 1000.0
    );
}

/// A cluster of 2 bands whose first generation was retired by `/retire`
/// (2 retired, 2 live). The server runs under `sh`, so each worker is a tree.
struct Retired {
    cluster: Cluster,
    listen: SocketAddr,
    /// (status pid, port) of the retired workers.
    retired: Vec<(i64, u64)>,
    live: Vec<i64>,
    _ports: Ports,
}

const LIMIT_MIB: u64 = 256;

fn cluster_with_retired_workers(prefix: &str) -> Retired {
    let ports = Ports::reserve(1);
    let listen = listen_on(&ports);
    let limit = format!("{LIMIT_MIB}MiB");
    let flags = [
        "--cluster-memory-limit",
        &limit,
        "--monitor-interval",
        "200ms",
        "--retired-idle-exit",
        "10m",
    ];
    let cluster = Cluster::start(&cluster_name(prefix), spec("ebpf", 2, listen, &flags, true));
    let mut retired = Vec::new();
    for client in [loopback_client(2), loopback_client(3)] {
        let (old, _new) = retire_band(&cluster, listen, client);
        retired.push(old);
    }
    let status = cluster.status();
    let retired: Vec<(i64, u64)> = retired
        .into_iter()
        .map(|pid| {
            let w = worker(&status, pid).expect("retired worker in status");
            assert_eq!(w["state"], "retired", "{w}");
            (pid, w["port"].as_u64().unwrap_or(0))
        })
        .collect();
    let live = pids(&live_workers(&status, None));
    assert_eq!(live.len(), 2, "{status}");
    assert!(
        log_has(&cluster, "asks to be retired: test-retire"),
        "{}",
        cluster.logs()
    );
    Retired {
        cluster,
        listen,
        retired,
        live,
        _ports: ports,
    }
}

/// The cluster RSS (master and workers) that `status` reports, bytes.
fn cluster_rss(cluster: &Cluster) -> u64 {
    let status = cluster.status();
    status["cluster_rss"].as_u64().unwrap_or(0)
}

/// How many MiB to add to reach `target` bytes of cluster RSS, from the
/// measured baseline; fails clearly when the baseline leaves no room.
fn mib_to_reach(cluster: &Cluster, target: u64, why: &str) -> u64 {
    let baseline = cluster_rss(cluster);
    assert!(
        baseline + 32 * MIB < target,
        "the cluster's baseline RSS {} MiB leaves no room under {} MiB ({why})",
        baseline / MIB,
        target / MIB
    );
    println!(
        "{why}: baseline cluster RSS {:.1} MiB, adding {} MiB",
        baseline as f64 / MIB as f64,
        (target - baseline).div_ceil(MIB)
    );
    (target - baseline).div_ceil(MIB)
}

fn low_watermark_asks_retired_workers_to_die() {
    let r = cluster_with_retired_workers("gov-low");
    let cluster = &r.cluster;
    let (victim, port) = r.retired[0];
    let (spared, _) = r.retired[1];
    // Between the watermarks: 80 % and 95 % of the limit.
    let target = LIMIT_MIB * MIB * 875 / 1000;
    let mib = mib_to_reach(cluster, target, "low watermark");
    let server = get_json(loopback_client(1), direct(port), "/")["pid"]
        .as_i64()
        .unwrap_or(0);
    assert_ne!(
        server, victim,
        "the server runs under sh: the memory is in a child"
    );
    with_master_frozen(cluster, || alloc_direct(port, mib));

    // The master reports the exit as it saw it (its own child's wait status).
    let logs = wait_for_exit(cluster, victim, server, "exit status ");
    let asked = log_line(
        &logs,
        &[
            &format!("asking worker {victim} (band "),
            "to die (`die`): low watermark breach: cluster rss ",
        ],
    );
    assert!(asked.is_some(), "no ask-to-die line for {victim}\n{logs}");
    println!("{}", asked.unwrap_or_default());
    // It was asked, and left by itself: `die` reached the server, which exited 0.
    assert!(
        logs.contains(&format!(
            "aware_worker {server}: asked to die (low watermark breach"
        )),
        "{logs}"
    );
    assert!(
        log_line(
            &logs,
            &[&format!("worker {victim} (band "), "exit status 0 after"]
        )
        .is_some(),
        "the master saw the worker exit 0 by itself\n{logs}"
    );
    assert!(
        !logs.contains(&format!("killing worker {victim}")),
        "{logs}"
    );
    assert!(!logs.contains("high watermark breach"), "{logs}");
    // Only as many as needed: the other retired worker and the live ones stay.
    let status = cluster.status();
    assert_eq!(
        worker(&status, spared).map(|w| w["state"].clone()),
        Some("retired".into())
    );
    assert!(
        !logs.contains(&format!("asking worker {spared} ")),
        "{logs}"
    );
    assert_eq!(pids(&live_workers(&status, None)), r.live, "{status}");
    for client in [loopback_client(2), loopback_client(3)] {
        get(client, r.listen).expect("the live workers still serve");
    }
}

fn high_watermark_kills_retired_workers() {
    let r = cluster_with_retired_workers("gov-high");
    let cluster = &r.cluster;
    let (victim, port) = r.retired[1];
    let (spared, _) = r.retired[0];
    // Well above 95 % of the limit, in one step between two measurements: the
    // master never sees the cluster between the watermarks.
    let target = LIMIT_MIB * MIB + 24 * MIB;
    let mib = mib_to_reach(cluster, target, "high watermark");
    let server = get_json(loopback_client(1), direct(port), "/")["pid"]
        .as_i64()
        .unwrap_or(0);
    with_master_frozen(cluster, || alloc_direct(port, mib));

    let logs = wait_for_exit(cluster, victim, server, "killed by ");
    let killed = log_line(
        &logs,
        &[
            &format!("killing worker {victim}"),
            "high watermark breach: cluster rss ",
        ],
    );
    assert!(killed.is_some(), "no kill line for {victim}\n{logs}");
    println!("{}", killed.unwrap_or_default());
    assert!(
        log_line(
            &logs,
            &[
                &format!("worker {victim} (band "),
                "killed by SIGKILL after"
            ]
        )
        .is_some(),
        "the master saw the worker end by SIGKILL\n{logs}"
    );
    // Killed, not asked: no `die`, no SIGTERM.
    assert!(
        !logs.contains(&format!("asking worker {victim} ")),
        "{logs}"
    );
    assert!(
        !logs.contains(&format!("aware_worker {server}: asked to die")),
        "{logs}"
    );
    let status = cluster.status();
    assert_eq!(
        worker(&status, spared).map(|w| w["state"].clone()),
        Some("retired".into())
    );
    // Only as many as needed: the other retired worker is still running.
    assert!(
        running(spared),
        "the retired worker {spared} was killed too, though one kill was enough\n{logs}"
    );
    assert!(
        !logs.contains(&format!("killing worker {spared} ")),
        "{logs}"
    );
    assert_eq!(pids(&live_workers(&status, None)), r.live, "{status}");
}

fn sigusr1_kills_retired_workers_only() {
    let r = cluster_with_retired_workers("gov-usr1");
    let cluster = &r.cluster;
    // An open connection on a retired worker does not save it; one on a live
    // worker must not notice anything.
    let (retired_pid, retired_port) = r.retired[0];
    let mut on_retired = Stream::open(loopback_client(1), direct(retired_port)).expect("stream");
    on_retired.next().expect("a first line");
    let client = loopback_client(4);
    let mut on_live = Stream::open(client, r.listen).expect("stream to a live worker");
    let (live_server, _) = on_live.next().expect("a first line");
    wait_for(
        cluster,
        Duration::from_secs(5),
        "the connection counted",
        || {
            let status = cluster.status();
            (worker(&status, retired_pid)?["connections"] == 1).then_some(())
        },
    );

    signal(master_pid(cluster), libc::SIGUSR1);
    wait_for(
        cluster,
        Duration::from_secs(10),
        "retired workers gone",
        || {
            r.retired
                .iter()
                .all(|(pid, _)| !running(*pid))
                .then_some(())
        },
    );
    let logs = cluster.logs();
    assert!(
        logs.contains("SIGUSR1: killing 2 retired workers"),
        "{logs}"
    );
    for (pid, _) in &r.retired {
        assert!(
            log_line(
                &logs,
                &[
                    &format!("asking worker {pid} (band "),
                    "to die (`die`): SIGUSR1: kill the retired workers"
                ]
            )
            .is_some(),
            "{logs}"
        );
    }
    for pid in &r.live {
        assert!(!logs.contains(&format!("asking worker {pid} ")), "{logs}");
    }
    // The process is gone: what was in flight drains, then the stream ends
    // (end of file or reset, not a read timeout).
    let ended = (0..1000)
        .find_map(|_| on_retired.next().err())
        .expect("the retired worker's stream kept flowing");
    assert!(
        !matches!(
            ended.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "the retired worker's stream did not end: {ended}"
    );
    let status = wait_for(cluster, Duration::from_secs(5), "the exits seen", || {
        let status = cluster.status();
        (workers_in(&status, "retired", None).is_empty()
            && workers_in(&status, "dying", None).is_empty())
        .then_some(status)
    });
    assert_eq!(pids(&live_workers(&status, None)), r.live, "{status}");
    on_live.keeps_receiving(
        live_server,
        Duration::from_millis(500),
        "live worker's stream",
    );
    for c in [loopback_client(2), loopback_client(3)] {
        let reply = get(c, r.listen).expect("live workers serve");
        assert!(running(i64::from(reply.pid)));
    }
}

/// A leak that hits several workers at once does not restart them all: with
/// `--retire-rate 1 --retire-window 3s`, the second worker over its limit waits
/// for the window (it keeps serving meanwhile), and the refusal is logged once.
fn retirements_are_rate_limited() {
    const WORKERS: u32 = 4;
    let ports = Ports::reserve(1);
    let listen = listen_on(&ports);
    let cluster = Cluster::start(
        &cluster_name("gov-rate"),
        spec(
            "ebpf",
            WORKERS,
            listen,
            &[
                "--worker-rss-limit",
                "64MiB",
                "--monitor-interval",
                "200ms",
                "--retire-rate",
                "1",
                "--retire-window",
                "3s",
            ],
            false,
        ),
    );
    let clients = [loopback_client(8), loopback_client(9)];
    let victims: Vec<Reply> = clients
        .iter()
        .map(|&c| get(c, listen).expect("GET / before"))
        .collect();
    assert_ne!(victims[0].band, victims[1].band);
    for &c in &clients {
        let v = get_json(c, listen, "/alloc?mb=96");
        assert_eq!(v["allocated_mib"], 96, "{v}");
    }
    let started = Instant::now();
    let replacement = |i: usize| {
        get(clients[i], listen)
            .ok()
            .filter(|r| r.pid != victims[i].pid && r.band == victims[i].band)
    };
    let (first, first_replacement) = wait_for(
        &cluster,
        Duration::from_secs(10),
        "a first replacement",
        || (0..2).find_map(|i| Some((i, replacement(i)?))),
    );
    let first_at = started.elapsed();
    let second = 1 - first;
    // The other one waits for the window, serving its band meanwhile.
    let mut served_meanwhile = 0;
    let second_replacement = wait_for(
        &cluster,
        Duration::from_secs(15),
        "the second replacement",
        || {
            let reply = get(clients[second], listen).expect("the waiting band serves");
            assert_eq!(reply.band, victims[second].band);
            if reply.pid == victims[second].pid {
                served_meanwhile += 1;
                None
            } else {
                Some(reply)
            }
        },
    );
    let second_at = started.elapsed();
    // When each retirement was decided: its replacement is started right
    // then. (When a client first saw the replacement serve also counts how
    // long it took to start listening, which a busy machine stretches for
    // one and not the other.)
    let spawned_apart =
        start_time_secs(second_replacement.pid) - start_time_secs(first_replacement.pid);
    println!(
        "rate limit: first replacement serving after {first_at:?}, second after {second_at:?}; \
         started {spawned_apart:.2} s apart (window 3s; {served_meanwhile} requests served by \
         the waiting worker)"
    );
    assert!(
        spawned_apart > 2.5,
        "the second retirement did not wait for the window: its replacement started \
         {spawned_apart:.2} s after the first one's\n{}",
        cluster.logs()
    );
    assert!(served_meanwhile > 0);
    let logs = cluster.logs();
    let refusals: Vec<&str> = logs
        .lines()
        .filter(|l| {
            l.contains(
                "policy: retire rate limit reached (1 retirements in the last 3.0s, limit 1)",
            )
        })
        .collect();
    assert_eq!(
        refusals.len(),
        1,
        "one refusal line, not one per decision:\n{logs}"
    );
    assert!(
        refusals[0].contains(&format!("pid {} (band ", victims[second].pid))
            && refusals[0].contains("low watermark breach: rss "),
        "{}",
        refusals[0]
    );
    println!("{}", refusals[0]);
}

fn silent_worker_is_replaced() {
    const WORKERS: u32 = 4;
    let ports = Ports::reserve(1);
    let listen = listen_on(&ports);
    let cluster = Cluster::start(
        &cluster_name("gov-silent"),
        spec(
            "ebpf",
            WORKERS,
            listen,
            &["--ping-timeout", "2s", "--monitor-interval", "200ms"],
            false,
        ),
    );
    let client = loopback_client(7);
    let band = band_of(client, 0, WORKERS);
    let victim = get(client, listen).expect("GET / before");
    // It said hello and pings.
    let status = wait_for(&cluster, Duration::from_secs(5), "the worker pings", || {
        let status = cluster.status();
        let w = worker(&status, i64::from(victim.pid))?;
        (w["aware"] == true && w["last_ping_ago"].as_f64().is_some_and(|a| a < 1.0))
            .then_some(status)
    });
    let before = live_by_band(&status);

    let v = get_json(client, listen, "/silence");
    assert_eq!(v["silent"], true, "{v}");
    let silenced = Instant::now();
    let replacement = wait_for(&cluster, Duration::from_secs(10), "a replacement", || {
        get(client, listen).ok().filter(|r| r.pid != victim.pid)
    });
    println!(
        "silent worker: band {band} served by worker {} {:?} after /silence (ping timeout 2s)",
        replacement.pid,
        silenced.elapsed()
    );
    // Its last ping came up to one ping interval (500 ms) before /silence.
    // (2 s rather than 1 s: every other worker must not look silent either,
    // and a busy machine can hold a ping back by more than half a second.)
    assert!(
        silenced.elapsed() > Duration::from_millis(1500),
        "replaced before the ping timeout"
    );
    assert_eq!(replacement.band, band);
    let logs = cluster.logs();
    let line = log_line(
        &logs,
        &[
            &format!(
                "retiring worker {} (band {band}, generation 1, ",
                victim.pid
            ),
            "): ping timeout: silent for ",
            " > 2.0s; starting its replacement",
        ],
    );
    assert!(
        line.is_some(),
        "no retirement line for {}\n{logs}",
        victim.pid
    );
    println!("{}", line.unwrap_or_default());
    let status = cluster.status();
    let w = worker(&status, i64::from(victim.pid)).expect("the silent worker in status");
    assert_eq!(w["state"], "retired", "{w}");
    assert!(w["last_ping_ago"].as_f64().is_some_and(|a| a > 2.0), "{w}");
    assert!(
        w["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("ping timeout: silent for ")),
        "{w}"
    );
    let after = live_by_band(&status);
    for (b, pid) in &before {
        if *b != u64::from(band) {
            assert_eq!(after[b], *pid, "band {b} kept pinging: {status}");
        }
    }
}

/// The `stats` and `app` of each worker's latest ping are in `status --json`
/// (`workers[].stats`, `workers[].app`) and, one compact line under the
/// worker's own, in the text table.
fn status_shows_what_workers_report() {
    const WORKERS: u32 = 2;
    let ports = Ports::reserve(1);
    let listen = listen_on(&ports);
    let cluster = Cluster::start(
        &cluster_name("gov-report"),
        spec("ebpf", WORKERS, listen, &[], false),
    );
    let client = loopback_client(11);
    const REQUESTS: u64 = 3;
    let mut served = None;
    for _ in 0..REQUESTS {
        let reply = get(client, listen).expect("GET /");
        assert!(served.is_none_or(|pid| pid == reply.pid), "{reply:?}");
        served = Some(reply.pid);
    }
    let pid = served.expect("a reply");
    // The worker counts its requests in `stats` and names itself in `app`.
    let (status, w) = wait_for(&cluster, Duration::from_secs(5), "stats in status", || {
        let status = cluster.status();
        let w = worker(&status, i64::from(pid))?;
        (w["stats"]["requests"] == REQUESTS).then_some((status, w))
    });
    assert_eq!(w["stats"]["allocated_mib"], 0, "{w}");
    assert_eq!(w["app"]["name"], "aware_worker", "{w}");
    assert!(w["app"]["version"].is_string(), "{w}");
    let others: Vec<Value> = live_workers(&status, None)
        .into_iter()
        .filter(|o| o["pid"] != i64::from(pid))
        .collect();
    assert_eq!(others.len(), WORKERS as usize - 1, "{status}");
    for o in &others {
        // It pinged (it is aware), and nobody asked it anything.
        let other = wait_for(
            &cluster,
            Duration::from_secs(5),
            "the other's stats",
            || {
                let w = worker(&cluster.status(), o["pid"].as_i64()?)?;
                w["stats"].is_object().then_some(w)
            },
        );
        assert_eq!(other["stats"]["requests"], 0, "{other}");
        assert_eq!(other["app"]["name"], "aware_worker", "{other}");
    }

    let out = cluster.ipcluster(
        &["status", "--name", &cluster.name],
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    let own = lines
        .find(|l| l.split_whitespace().next() == Some(pid.to_string().as_str()))
        .unwrap_or_else(|| panic!("no line for worker {pid}:\n{text}"));
    let under = lines.next().unwrap_or_default().trim();
    assert!(
        under.starts_with(&format!(
            r#"stats {{"allocated_mib":0,"requests":{REQUESTS}}}  app {{"name":"aware_worker","version":""#
        )),
        "the line under `{own}` is {under:?}:\n{text}"
    );
}

/// Start time of process `pid`, in seconds since boot (field 22 of
/// /proc/<pid>/stat, clock ticks).
fn start_time_secs(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/stat: {e}"));
    let ticks: u64 = stat
        .rsplit(')')
        .next()
        .and_then(|r| r.split_whitespace().nth(19))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no start time in /proc/{pid}/stat: {stat}"));
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    ticks as f64 / hz as f64
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("master stat");
    let rest: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    // After the command: state is field 3, utime field 14, stime field 15.
    rest[11].parse::<u64>().unwrap_or(0) + rest[12].parse::<u64>().unwrap_or(0)
}

/// VmRSS of `pid`, KiB.
fn vm_rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// The master's own cost: utime+stime and VmRSS of the master process while
/// it supervises 64 pinging workers, each with one open `/stream`, for 60 s.
/// `--monitor-interval` is 1s (the default) or `$IPCLUSTER_GOV_MONITOR_INTERVAL`.
/// Run it against the release build for figures:
/// `IPCLUSTER_BIN=target/release/ipcluster IPCLUSTER_EXAMPLES=target/release/examples
/// cargo test -p ipcluster-tests --test master_governance -- --ignored --nocapture`
fn master_supervising_64_workers() {
    const WORKERS: u32 = 64;
    const WINDOW: Duration = Duration::from_secs(60);
    let interval =
        std::env::var("IPCLUSTER_GOV_MONITOR_INTERVAL").unwrap_or_else(|_| "1s".to_owned());
    let ports = Ports::reserve(1);
    let listen = listen_on(&ports);
    let cluster = Cluster::start(
        &cluster_name("gov-64"),
        spec(
            "ebpf",
            WORKERS,
            listen,
            &["--monitor-interval", &interval],
            false,
        ),
    );
    // One long-lived stream per band (127.0.0.64 … 127.0.0.127 cover every band).
    let mut streams: Vec<Stream> = (64..128u8)
        .map(|n| Stream::open(loopback_client(n), listen).expect("open /stream"))
        .collect();
    let master = master_pid(&cluster);
    wait_for(
        &cluster,
        Duration::from_secs(20),
        "64 pinging workers",
        || {
            let status = cluster.status();
            let live = live_workers(&status, None);
            (live.len() == 64
                && live
                    .iter()
                    .all(|w| w["aware"] == true && w["connections"] == 1))
            .then_some(())
        },
    );
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
    let start_ticks = cpu_ticks(master);
    let started = Instant::now();
    let mut rss = Vec::new();
    while started.elapsed() < WINDOW {
        std::thread::sleep(Duration::from_secs(1));
        rss.push(vm_rss_kib(master));
        // Keep the streams drained.
        for s in &mut streams {
            let _ = s.next();
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = (cpu_ticks(master) - start_ticks) as f64 / hz as f64;
    let cpu_pct = cpu / elapsed * 100.0;
    let max = rss.iter().copied().max().unwrap_or(0);
    let last = rss.last().copied().unwrap_or(0);
    println!(
        "BENCH governance_master_64 monitor_interval={interval} cpu_s={cpu:.2} elapsed_s={elapsed:.1} \
         cpu_pct={cpu_pct:.2} rss_kib_first={} rss_kib_max={max} rss_kib_last={last}",
        rss.first().copied().unwrap_or(0)
    );
    let status = cluster.status();
    assert_eq!(
        live_workers(&status, None).len(),
        64,
        "nothing was replaced"
    );
    assert!(workers_in(&status, "retired", None).is_empty(), "{status}");
}

ipcluster_tests::for_each_backend!(rss_limit_replaces_the_worker);

mod ebpf_only {
    #[test]
    fn low_watermark_asks_retired_workers_to_die() {
        let _netns = ipcluster_tests::NetNsGuard::enter();
        super::low_watermark_asks_retired_workers_to_die();
    }

    #[test]
    fn high_watermark_kills_retired_workers() {
        let _netns = ipcluster_tests::NetNsGuard::enter();
        super::high_watermark_kills_retired_workers();
    }

    #[test]
    fn sigusr1_kills_retired_workers_only() {
        let _netns = ipcluster_tests::NetNsGuard::enter();
        super::sigusr1_kills_retired_workers_only();
    }

    #[test]
    fn retirements_are_rate_limited() {
        let _netns = ipcluster_tests::NetNsGuard::enter();
        super::retirements_are_rate_limited();
    }

    #[test]
    fn status_shows_what_workers_report() {
        let _netns = ipcluster_tests::NetNsGuard::enter();
        super::status_shows_what_workers_report();
    }

    #[test]
    fn silent_worker_is_replaced() {
        let _netns = ipcluster_tests::NetNsGuard::enter();
        super::silent_worker_is_replaced();
    }

    #[test]
    #[ignore = "slow (60 s of supervision): a measurement, run with --ignored"]
    fn master_supervising_64_workers() {
        let _netns = ipcluster_tests::NetNsGuard::enter();
        super::master_supervising_64_workers();
    }
}
