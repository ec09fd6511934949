//! End-to-end: promises of the README that no other test covers, each checked
//! on what clients and processes observe.
//!
//! - A reload that changes `--workers` (4 → 8, then 8 → 2) under load, with an
//!   open stream on every band: every answer from the client's band of the old
//!   or new shape, one-step switch, streams flowing to the end.
//! - A SYN that reuses a client port after a republish follows the new table.
//! - SIGTERM to the master leaves traffic flowing; the next `run` adopts it.
//! - `stop` escalates to SIGKILL after `--soft-kill-timeout` for workers that
//!   ignore SIGTERM.
//! - Several `--listen` addresses; `--band-shift`; an IPv6 listen reached from
//!   eight IPv6 client addresses inside a test namespace.
//! - Aware workers: `retire` reaches them; `--retired-idle-exit` ends idle
//!   retired workers but not one with an open connection; `busy` gets a worker
//!   replaced; a hello claiming another band or generation does not change the
//!   master's view; `--kill-strategy` decides which retired worker is asked to
//!   die above the low watermark (the idle one by default, the oldest with `time`).
//! - Admin requests (`stop`, `kill-retired`) from a non-root user are refused.
//!
//! Root, one test thread:
//! `cargo test -p ipcluster-tests --test master_promises -- --test-threads=1`

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ipcluster::steering::band_of;
use ipcluster_tests::cluster::{
    Cluster, ClusterSpec, DemoReply, StreamWatch, demo_get, finish_streams, http_get, ipcluster,
    ipcluster_bin, live_workers, signal, wait_for, workers_in,
};
use ipcluster_tests::loopback_client;
use ipcluster_tests::reload::{Generation, Load, check_samples};
use ipcluster_tests::unique::{Ports, cluster_name};
use serde_json::Value;

fn listen_on(ports: &Ports, i: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], ports.get(i)))
}

/// Is `pid` running (not a zombie)?
fn running(pid: i64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with(['Z', 'X']))
    })
}

/// One `read`, again when it is interrupted: a read with a timeout may end
/// with EINTR when the test process is stopped and continued (signal(7)),
/// which is no news about the stream.
fn read_some(stream: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match stream.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// The worker with this pid in a status report.
fn worker(status: &Value, pid: i64) -> Option<Value> {
    status["workers"]
        .as_array()?
        .iter()
        .find(|w| w["pid"] == pid)
        .cloned()
}

// ---- reloads that change the shape -------------------------------------------

/// One reload to `workers` bands under load from 64 addresses, with one open
/// stream on every band of the current generation; checks everything the
/// clients saw. Returns the new generation.
fn reload_to(cluster: &mut Cluster, listen: SocketAddr, workers: u32) -> Generation {
    let status = cluster.status();
    let old_number = status["generation"].as_u64().unwrap_or(0);
    let old = Generation::from_status(&status, old_number, cluster.spec.workers);
    assert_eq!(
        old.pid_by_band.len(),
        cluster.spec.workers as usize,
        "{status}"
    );
    // A stream on every band of the old shape (127.0.0.96 + band has that band).
    let streams: Vec<StreamWatch> = (0..cluster.spec.workers)
        .map(|b| {
            let client = loopback_client(96 + u8::try_from(b).unwrap_or(0));
            assert_eq!(band_of(client, 0, cluster.spec.workers), b);
            let s = StreamWatch::open(client, listen).expect("open /stream");
            assert_eq!(s.first.pid, old.pid_by_band[&b], "{:?}", s.first);
            s
        })
        .collect();
    let clients: Vec<IpAddr> = (2..66).map(loopback_client).collect();
    let load = Load::start(&clients, 4, listen);
    // Load on the old shape before the reload: 300 ms, and at least a request
    // per address, however slow the machine.
    std::thread::sleep(Duration::from_millis(300));
    load.wait_for_requests(64, Duration::from_secs(20));
    cluster.spec.workers = workers;
    cluster.start_master();
    let after = cluster.wait_generation_live(old_number + 1, Duration::from_secs(30));
    // Half a second more, and at least 64 requests after the switch (at most
    // 4 of them were already in flight).
    std::thread::sleep(Duration::from_millis(500));
    load.wait_for_requests(64, Duration::from_secs(20));
    let samples = load.finish();
    let new = Generation::from_status(&after, old_number + 1, workers);
    assert_eq!(new.pid_by_band.len(), workers as usize, "{after}");
    assert_eq!(after["bands"], workers, "{after}");
    let verdict = check_samples(&samples, &old, &new);
    println!(
        "reload {} -> {workers} workers: {} requests, {} by the old generation, {} by the new, {} problems",
        old.workers,
        samples.len(),
        verdict.answered_by_old,
        verdict.answered_by_new,
        verdict.problems.len()
    );
    assert!(
        verdict.problems.is_empty(),
        "reload {} -> {workers}: {} of {} requests went wrong:\n  {}\n{}",
        old.workers,
        verdict.problems.len(),
        samples.len(),
        verdict.first_problems(10),
        cluster.logs()
    );
    assert!(verdict.answered_by_new > 0, "{verdict:?}");
    let switched_at = verdict.switched_at.expect("the new generation answered");
    // Every client now reaches its band of the new shape.
    for n in 2..66 {
        let client = loopback_client(n);
        let reply = demo_get(client, listen).expect("GET / after the reload");
        let band = band_of(client, 0, workers);
        assert_eq!(
            (reply.band, reply.pid),
            (band, new.pid_by_band[&band]),
            "{client} after the reload to {workers}: {reply:?}"
        );
    }
    let problems = finish_streams(streams, switched_at);
    assert!(
        problems.is_empty(),
        "streams on every band of the old shape:\n  {}",
        problems.join("\n  ")
    );
    new
}

fn reload_changes_the_worker_count(backend: &str) {
    let ports = Ports::reserve(1);
    let listen = listen_on(&ports, 0);
    let mut cluster = Cluster::start(
        &cluster_name(&format!("shape-{backend}")),
        ClusterSpec::demo(backend, 4, listen),
    );
    reload_to(&mut cluster, listen, 8);
    reload_to(&mut cluster, listen, 2);
    cluster.stop();
}

// ---- a reused client port ----------------------------------------------------

/// `GET /` from `source`:`port` exactly (SO_REUSEADDR, so the port can be
/// bound again once the previous connection is closed).
fn demo_get_from_port(source: IpAddr, port: u16, target: SocketAddr) -> std::io::Result<DemoReply> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&SockAddr::from(SocketAddr::new(source, port)))?;
    socket.connect_timeout(&SockAddr::from(target), Duration::from_secs(3))?;
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    DemoReply::parse(body.trim())
        .ok_or_else(|| std::io::Error::other(format!("unexpected answer {response:?}")))
}

fn reused_client_port_follows_the_active_table(backend: &str) {
    let ports = Ports::reserve(2);
    let listen = listen_on(&ports, 0);
    // The client port: reserved (free, and no other test takes it).
    let client_port = ports.get(1);
    let mut cluster = Cluster::start(
        &cluster_name(&format!("reuse-{backend}")),
        ClusterSpec::demo(backend, 2, listen),
    );
    let client = loopback_client(9);
    let first = demo_get_from_port(client, client_port, listen).expect("GET / from a fixed port");
    assert_eq!(first.generation, 1, "{first:?}");
    assert!(
        first.client.ends_with(&format!(":{client_port}")),
        "{first:?}"
    );
    cluster.start_master();
    let status = cluster.wait_generation_live(2, Duration::from_secs(30));
    let new = Generation::from_status(&status, 2, 2);
    // Same 4-tuple as before (the old flow may still be recorded): the SYN
    // follows the active table.
    let again = demo_get_from_port(client, client_port, listen).expect("GET / from the same port");
    assert!(
        again.client.ends_with(&format!(":{client_port}")),
        "{again:?}"
    );
    let band = band_of(client, 0, 2);
    assert_eq!(
        (again.generation, again.pid),
        (2, new.pid_by_band[&band]),
        "a reused client port stuck to the old generation: before {first:?}, after {again:?}"
    );
    cluster.stop();
}

// ---- the master's own life ----------------------------------------------------

fn sigterm_to_the_master(backend: &str) {
    let ports = Ports::reserve(1);
    let listen = listen_on(&ports, 0);
    let mut cluster = Cluster::start(
        &cluster_name(&format!("sigterm-{backend}")),
        ClusterSpec::demo(backend, 2, listen),
    );
    let clients: Vec<IpAddr> = (2..10).map(loopback_client).collect();
    let before: Vec<DemoReply> = clients
        .iter()
        .map(|&c| demo_get(c, listen).expect("GET / before"))
        .collect();
    let stream = StreamWatch::open(loopback_client(20), listen).expect("open /stream");
    let master = i32::try_from(cluster.masters[0].id()).unwrap_or(0);
    let signalled = Instant::now();
    signal(master, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cluster.master_exited(1) {
        assert!(
            Instant::now() < deadline,
            "the master ignored SIGTERM\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Workers and steering stay: the same workers answer, the stream flows.
    for (client, was) in clients.iter().zip(&before) {
        let reply = demo_get(*client, listen).expect("GET / without a master");
        assert_eq!(reply.pid, was.pid, "{client}: {reply:?}, was {was:?}");
    }
    let offline = cluster.status();
    assert!(offline["master_pid"].is_null(), "{offline}");
    assert_eq!(live_workers(&offline, Some(1)).len(), 2, "{offline}");
    std::thread::sleep(Duration::from_millis(500));
    let problems = stream.finish().problems(signalled, Instant::now());
    assert!(problems.is_empty(), "{problems:?}");
    // The next run adopts everything.
    cluster.start_master();
    let status = cluster.wait_generation_live(2, Duration::from_secs(30));
    assert_eq!(workers_in(&status, "retired", Some(1)).len(), 2, "{status}");
    for &c in &clients {
        assert_eq!(demo_get(c, listen).expect("GET / after").generation, 2);
    }
    cluster.stop();
}

/// Workers that ignore SIGTERM (`trap '' TERM` survives `exec`): `stop` waits
/// `--soft-kill-timeout`, then SIGKILLs them.
fn stop_escalates_to_sigkill(backend: &str) {
    let ports = Ports::reserve(1);
    let listen = listen_on(&ports, 0);
    let spec = ClusterSpec {
        flags: vec!["--soft-kill-timeout".into(), "1500ms".into()],
        command: vec![
            "/bin/sh".into(),
            "-c".into(),
            "trap '' TERM; exec \"$0\" demo-worker".into(),
            ipcluster_bin().display().to_string(),
        ],
        ..ClusterSpec::demo(backend, 2, listen)
    };
    let mut cluster = Cluster::start(&cluster_name(&format!("softkill-{backend}")), spec);
    let pids: Vec<i64> = live_workers(&cluster.status(), None)
        .iter()
        .filter_map(|w| w["pid"].as_i64())
        .collect();
    assert_eq!(pids.len(), 2);
    let name = cluster.name.clone();
    let started = Instant::now();
    let stopper =
        std::thread::spawn(move || ipcluster(&["stop", "--name", &name], Duration::from_secs(30)));
    // Half way through the timeout: SIGTERM was sent and ignored.
    std::thread::sleep(Duration::from_millis(700));
    let alive_meanwhile = pids.iter().all(|&p| running(p));
    let out = stopper.join().expect("the stop thread");
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "stop failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        alive_meanwhile,
        "the workers were gone 0.7 s into a 1.5 s soft-kill timeout, though they ignore SIGTERM"
    );
    for &p in &pids {
        assert!(!running(p), "worker {p} survived stop");
    }
    assert!(
        took >= Duration::from_millis(1500),
        "stop returned after {took:?}, before the soft-kill timeout: the workers were not given it"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("(2 needed SIGKILL)"), "{stdout}");
    println!("stop with workers ignoring SIGTERM took {took:?}: {stdout}");
    cluster.assert_stopped();
}

// ---- listen addresses and band shapes -------------------------------------------

fn several_listen_addresses(backend: &str) {
    let ports = Ports::reserve(2);
    let listens = [listen_on(&ports, 0), listen_on(&ports, 1)];
    let spec = ClusterSpec {
        listens: listens.to_vec(),
        ..ClusterSpec::demo(backend, 4, listens[0])
    };
    let mut cluster = Cluster::start(&cluster_name(&format!("listens-{backend}")), spec);
    let status = cluster.status();
    let by_band = Generation::from_status(&status, 1, 4).pid_by_band;
    for n in 2..18 {
        let client = loopback_client(n);
        let band = band_of(client, 0, 4);
        for listen in listens {
            let reply = demo_get(client, listen)
                .unwrap_or_else(|e| panic!("GET / from {client} to {listen}: {e}"));
            assert_eq!(
                (reply.band, reply.pid),
                (band, by_band[&band]),
                "{client} -> {listen}: {reply:?}"
            );
        }
    }
    cluster.stop();
}

fn band_shift(backend: &str) {
    const SHIFT: u8 = 2;
    let ports = Ports::reserve(1);
    let listen = listen_on(&ports, 0);
    let spec = ClusterSpec {
        flags: vec!["--band-shift".into(), SHIFT.to_string()],
        ..ClusterSpec::demo(backend, 4, listen)
    };
    let mut cluster = Cluster::start(&cluster_name(&format!("shift-{backend}")), spec);
    let status = cluster.status();
    assert_eq!(status["band_shift"], SHIFT, "{status}");
    let by_band = Generation::from_status(&status, 1, 4).pid_by_band;
    // 127.0.0.16…47: four consecutive addresses share a band.
    let mut seen = BTreeMap::new();
    for n in 16..48u8 {
        let client = loopback_client(n);
        let band = band_of(client, SHIFT, 4);
        assert_eq!(band, u32::from((n >> SHIFT) & 3));
        let reply = demo_get(client, listen).expect("GET /");
        assert_eq!(
            (reply.band, reply.pid),
            (band, by_band[&band]),
            "{client} with --band-shift {SHIFT}: {reply:?}"
        );
        *seen.entry(band).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 4, "{seen:?}");
    cluster.stop();
}

// ---- aware workers -------------------------------------------------------------

/// The aware example worker (see master_governance.rs).
fn aware_worker() -> PathBuf {
    let path = match std::env::var_os("IPCLUSTER_EXAMPLES") {
        Some(dir) => PathBuf::from(dir).join("aware_worker"),
        None => ipcluster_bin()
            .with_file_name("examples")
            .join("aware_worker"),
    };
    assert!(
        path.is_file(),
        "the example worker is missing at {}: build it with \
         `cargo build -p ipcluster --bins --examples`, or set IPCLUSTER_EXAMPLES",
        path.display()
    );
    path
}

fn aware_spec(backend: &str, workers: u32, listen: SocketAddr, flags: &[&str]) -> ClusterSpec {
    ClusterSpec {
        backend: backend.into(),
        workers,
        listens: vec![listen],
        flags: flags.iter().map(|f| (*f).to_owned()).collect(),
        command: vec![aware_worker().display().to_string()],
    }
}

/// `GET path` as JSON (200 expected).
fn get_json(client: IpAddr, target: SocketAddr, path: &str) -> std::io::Result<Value> {
    let (code, body) = http_get(client, target, path)?;
    if code != 200 {
        return Err(std::io::Error::other(format!("HTTP {code}: {body}")));
    }
    serde_json::from_str(body.trim()).map_err(|e| std::io::Error::other(format!("{e}: {body:?}")))
}

fn direct(port: u64) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], u16::try_from(port).unwrap_or(0)))
}

/// After a reload the old aware workers hear `retire` (they say so on `/`);
/// with `--retired-idle-exit 1s` the idle ones are asked to die and exit, the
/// one with an open stream keeps running and streaming until the stream closes.
fn retired_idle_exit_and_retire_message() {
    let ports = Ports::reserve(1);
    let listen = listen_on(&ports, 0);
    let mut cluster = Cluster::start(
        &cluster_name("idle-exit"),
        aware_spec(
            "ebpf",
            2,
            listen,
            &["--retired-idle-exit", "1s", "--monitor-interval", "200ms"],
        ),
    );
    let status = cluster.status();
    let old: Vec<(i64, u64)> = live_workers(&status, Some(1))
        .iter()
        .map(|w| {
            (
                w["pid"].as_i64().unwrap_or(0),
                w["port"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    for &(_, port) in &old {
        let v = get_json(loopback_client(1), direct(port), "/").expect("GET / direct");
        assert_eq!(v["retired"], false, "{v}");
    }
    // An open stream on the worker of 127.0.0.2's band.
    let client = loopback_client(2);
    let (mut stream, held) = {
        let mut s = ipcluster_tests::client::connect_from(client, listen).expect("connect");
        write!(s, "GET /stream HTTP/1.1\r\nHost: test\r\n\r\n").expect("request");
        let mut first = [0u8; 256];
        let n = read_some(&mut s, &mut first).expect("first bytes of the stream");
        assert!(n > 0);
        let who = get_json(client, listen, "/").expect("GET /");
        (s, who["pid"].as_i64().unwrap_or(0))
    };
    let idle: Vec<(i64, u64)> = old.iter().copied().filter(|(p, _)| *p != held).collect();
    assert_eq!(idle.len(), 1, "{old:?} {held}");
    wait_for(
        &cluster,
        Duration::from_secs(5),
        "the stream counted",
        || (worker(&cluster.status(), held)?["connections"] == 1).then_some(()),
    );

    cluster.start_master();
    cluster.wait_generation_live(2, Duration::from_secs(30));
    // `retire` reached both old workers (before the idle one leaves).
    let retired_port = old.iter().find(|(p, _)| *p == held).map_or(0, |w| w.1);
    wait_for(
        &cluster,
        Duration::from_secs(5),
        "the held worker says it is retired",
        || {
            let v = get_json(loopback_client(1), direct(retired_port), "/").ok()?;
            (v["retired"] == true).then_some(())
        },
    );
    // The idle one is asked to die and exits; the held one stays while its stream is open.
    let gone_at = wait_for(
        &cluster,
        Duration::from_secs(10),
        "the idle worker exits",
        || (!running(idle[0].0)).then(Instant::now),
    );
    let logs = cluster.logs();
    assert!(
        logs.contains(&format!("aware_worker {}: retired (", idle[0].0)),
        "the idle worker heard `retire` before leaving\n{logs}"
    );
    while gone_at.elapsed() < Duration::from_millis(1500) {
        let mut buf = [0u8; 4096];
        let n = read_some(&mut stream, &mut buf).expect("the held stream keeps flowing");
        assert!(n > 0, "the held stream ended while open");
    }
    assert!(running(held), "the worker with an open stream was ended");
    let status = cluster.status();
    assert_eq!(
        worker(&status, held).map(|w| w["state"].clone()),
        Some("retired".into()),
        "{status}"
    );
    drop(stream);
    wait_for(
        &cluster,
        Duration::from_secs(10),
        "the held worker exits once idle",
        || (!running(held)).then_some(()),
    );
    cluster.stop();
}

/// A worker that reports `busy` in its pings is retired and replaced.
fn busy_worker_is_replaced() {
    let ports = Ports::reserve(1);
    let listen = listen_on(&ports, 0);
    let mut cluster = Cluster::start(
        &cluster_name("busy"),
        aware_spec("ebpf", 2, listen, &["--monitor-interval", "200ms"]),
    );
    let client = loopback_client(3);
    let before = get_json(client, listen, "/").expect("GET /");
    let victim = before["pid"].as_i64().unwrap_or(0);
    let v = get_json(client, listen, "/busy?on=1").expect("GET /busy");
    assert_eq!(v["busy"], true, "{v}");
    let replacement = wait_for(&cluster, Duration::from_secs(10), "a replacement", || {
        let r = get_json(client, listen, "/").ok()?;
        (r["pid"] != victim).then_some(r)
    });
    assert_eq!(replacement["band"], before["band"], "{replacement}");
    assert_eq!(replacement["generation"], 1, "{replacement}");
    let status = cluster.status();
    let w = worker(&status, victim).expect("the busy worker in status");
    assert_eq!(w["state"], "retired", "{w}");
    assert!(
        w["reason"].as_str().is_some_and(|r| r.contains("busy")),
        "{w}"
    );
    // The other band was not concerned.
    let other = loopback_client(2);
    assert_ne!(band_of(other, 0, 2), band_of(client, 0, 2));
    assert_eq!(live_workers(&status, Some(1)).len(), 2, "{status}");
    cluster.stop();
}

/// Every worker says hello as the other band and as generation 9: the master
/// keeps its own view (band by port, generation by spawn) and steers by it.
fn hello_claiming_another_band_changes_nothing() {
    let ports = Ports::reserve(1);
    let listen = listen_on(&ports, 0);
    let spec = ClusterSpec {
        command: vec![
            "/bin/sh".into(),
            "-c".into(),
            "IPCLUSTER_BAND=$(( (IPCLUSTER_BAND + 1) % 2 )) IPCLUSTER_GENERATION=9 exec \"$0\""
                .into(),
            aware_worker().display().to_string(),
        ],
        ..aware_spec("ebpf", 2, listen, &[])
    };
    let mut cluster = Cluster::start(&cluster_name("hello-lies"), spec);
    let status = wait_for(&cluster, Duration::from_secs(10), "both said hello", || {
        let status = cluster.status();
        (live_workers(&status, Some(1))
            .iter()
            .filter(|w| w["aware"] == true)
            .count()
            == 2)
            .then_some(status)
    });
    let logs = cluster.logs();
    assert!(logs.contains("the master's view wins"), "{logs}");
    let table = &status["table"]["services"][0]["worker_ports"];
    for w in live_workers(&status, Some(1)) {
        let band = w["band"].as_u64().unwrap_or(99);
        assert_eq!(w["generation"], 1, "{w}");
        assert_eq!(table[band as usize], w["port"], "band {band}: {status}");
    }
    let by_band = Generation::from_status(&status, 1, 2).pid_by_band;
    for n in 2..10 {
        let client = loopback_client(n);
        let band = band_of(client, 0, 2);
        let r = get_json(client, listen, "/").expect("GET /");
        assert_eq!(r["pid"], by_band[&band], "{client}: {r}");
        // The worker itself believes its lie (from its environment).
        assert_eq!(r["band"], (band + 1) % 2, "{r}");
        assert_eq!(r["generation"], 9, "{r}");
    }
    cluster.stop();
}

// ---- who may administer -----------------------------------------------------------

/// Admin requests from uid 65534 (nobody) are refused and change nothing:
/// through the CLI, and straight on the control socket, which the workers'
/// user may open (`--user nobody`) so that the master's own check is what
/// refuses them.
fn admin_requests_from_non_root_are_refused() {
    let ports = Ports::reserve(1);
    let listen = listen_on(&ports, 0);
    let spec = ClusterSpec {
        flags: vec!["--user".into(), "nobody".into()],
        ..ClusterSpec::demo("ebpf", 2, listen)
    };
    let mut cluster = Cluster::start(&cluster_name("nonroot"), spec);
    cluster.start_master();
    let before = cluster.wait_generation_live(2, Duration::from_secs(30));
    assert_eq!(workers_in(&before, "retired", Some(1)).len(), 2, "{before}");
    // A copy of the binary that nobody may run (the build folder may not be).
    let dir = std::env::temp_dir().join(format!("ipcluster-tests-{}", cluster.name));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let _cleanup = ipcluster_tests::guard::defer({
        let dir = dir.clone();
        move || {
            let _ = std::fs::remove_dir_all(&dir);
        }
    });
    let bin = dir.join("ipcluster");
    std::fs::copy(ipcluster_bin(), &bin).expect("copy the binary");
    let _ = Command::new("chmod")
        .arg("755")
        .arg(&dir)
        .arg(&bin)
        .status();
    let as_nobody = |program: &std::path::Path, args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run setpriv")
    };
    for request in ["stop", "kill-retired"] {
        let out = as_nobody(&bin, &[request, "--name", &cluster.name]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "`{request}` as nobody succeeded: {stderr}"
        );
        println!("ipcluster {request} as nobody: {}", stderr.trim());
        if request == "kill-retired" {
            // This one reaches the master (the socket is the workers' user's).
            assert!(stderr.contains("only root may do this"), "{stderr}");
        }
    }
    // Straight on the socket: the master answers, and refuses.
    let socket = ipcluster::paths::control_socket(&cluster.name);
    let script = "import socket, sys\n\
                  for req in sys.argv[2:]:\n\
                  \x20   s = socket.socket(socket.AF_UNIX)\n\
                  \x20   s.settimeout(5)\n\
                  \x20   s.connect(sys.argv[1])\n\
                  \x20   s.sendall((req + '\\n').encode())\n\
                  \x20   print(s.makefile().readline().strip())\n";
    let socket_arg = socket.display().to_string();
    let out = as_nobody(
        // The system interpreter (a per-user shim would not be reachable by nobody).
        std::path::Path::new("/usr/bin/python3"),
        &[
            "-c",
            script,
            &socket_arg,
            r#"{"type":"stop"}"#,
            r#"{"type":"kill_retired"}"#,
            r#"{"type":"shutdown"}"#,
        ],
    );
    let replies = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "nobody could not talk to the control socket: {}{replies}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = replies.lines().collect();
    assert_eq!(lines.len(), 3, "{replies}");
    for line in &lines {
        assert!(line.contains("only root may do this"), "{replies}");
    }
    println!("the master's replies to nobody: {lines:?}");
    // Nothing changed: same workers, retired ones still there, master running.
    let after = cluster.status();
    let pids = |s: &Value| {
        let mut p: Vec<i64> = s["workers"]
            .as_array()
            .map(|ws| ws.iter().filter_map(|w| w["pid"].as_i64()).collect())
            .unwrap_or_default();
        p.sort_unstable();
        p
    };
    assert_eq!(pids(&before), pids(&after), "{after}");
    assert!(!cluster.master_exited(2), "{}", cluster.logs());
    cluster.stop();
}

ipcluster_tests::for_both_backends!(
    reload_changes_the_worker_count,
    reused_client_port_follows_the_active_table,
    sigterm_to_the_master,
    stop_escalates_to_sigkill,
    several_listen_addresses,
    band_shift,
    ipv6_listen_with_several_client_addresses
);

mod ebpf_only {
    #[test]
    fn retired_idle_exit_and_retire_message() {
        let _netns = ipcluster_tests::NetNsGuard::enter();
        super::retired_idle_exit_and_retire_message();
    }

    #[test]
    fn busy_worker_is_replaced() {
        let _netns = ipcluster_tests::NetNsGuard::enter();
        super::busy_worker_is_replaced();
    }

    #[test]
    fn hello_claiming_another_band_changes_nothing() {
        let _netns = ipcluster_tests::NetNsGuard::enter();
        super::hello_claiming_another_band_changes_nothing();
    }

    #[test]
    fn kill_strategy_decides_who_is_asked_to_die() {
        let _netns = ipcluster_tests::NetNsGuard::enter();
        super::kill_strategy_decides_who_is_asked_to_die();
    }

    #[test]
    fn admin_requests_from_non_root_are_refused() {
        let _netns = ipcluster_tests::NetNsGuard::enter();
        super::admin_requests_from_non_root_are_refused();
    }
}

// ---- IPv6 ---------------------------------------------------------------------------

/// A cluster listening on an IPv6 address inside a test namespace, reached from
/// eight IPv6 client addresses added there: each client reaches its band's
/// worker (band from the last bytes of the address), every time.
fn ipv6_listen_with_several_client_addresses(backend: &str) {
    use ipcluster_tests::netns::NetNs;
    use std::net::Ipv6Addr;
    let host = NetNs::new("v6host");
    let listen_ip: Ipv6Addr = "fd00:1c::1".parse().expect("an IPv6 address");
    let clients: Vec<IpAddr> = (2..10u16)
        .map(|i| IpAddr::V6(Ipv6Addr::new(0xfd00, 0x1c, 0, 0, 0, 0, 0, i)))
        .collect();
    for ip in std::iter::once(IpAddr::V6(listen_ip)).chain(clients.iter().copied()) {
        host.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{ip}/128"),
            "dev",
            "lo",
            "nodad",
        ]);
    }
    let ports = Ports::reserve(1);
    let listen = SocketAddr::new(IpAddr::V6(listen_ip), ports.get(0));
    let mut cluster = Cluster::start_in(
        &cluster_name(&format!("v6-{backend}")),
        ClusterSpec::demo(backend, 4, listen),
        &host.path(),
    );
    let status = cluster.status();
    let by_band = Generation::from_status(&status, 1, 4).pid_by_band;
    let mut bands = std::collections::BTreeSet::new();
    let replies: Vec<(IpAddr, std::io::Result<DemoReply>)> = host.run(|| {
        clients
            .iter()
            .flat_map(|&c| [c, c])
            .map(|c| (c, demo_get(c, listen)))
            .collect()
    });
    for (client, reply) in replies {
        let reply =
            reply.unwrap_or_else(|e| panic!("GET / from [{client}]: {e}\n{}", cluster.logs()));
        let band = band_of(client, 0, 4);
        bands.insert(band);
        assert_eq!(
            (reply.band, reply.pid),
            (band, by_band[&band]),
            "[{client}] -> {listen}: {reply:?}"
        );
        assert!(
            reply.client.contains(&client.to_string()),
            "the worker saw [{client}] as {}",
            reply.client
        );
    }
    assert_eq!(bands.len(), 4, "the clients cover every band: {bands:?}");
    cluster.stop();
    drop(cluster);
    drop(host);
}

// ---- --kill-strategy ------------------------------------------------------------------

/// Start time of `pid` (field 22 of /proc/<pid>/stat, clock ticks since boot).
fn start_time(pid: i64) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()?
                .split_whitespace()
                .nth(19)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Two retired workers hold 100 MiB each, which puts the cluster between the
/// watermarks; asking one of them to die is enough. The older one has an open
/// connection, the younger one none. `conn-rss-time` (the default) asks the
/// younger, idle one; `time` asks the oldest, connection or not. The other one
/// keeps running. Returns (the older one was asked, the younger one was asked).
fn who_is_asked_to_die(strategy: Option<&str>) -> (bool, bool) {
    const LIMIT_MIB: u64 = 256;
    let ports = Ports::reserve(1);
    let listen = listen_on(&ports, 0);
    let limit = format!("{LIMIT_MIB}MiB");
    let mut flags = vec![
        "--cluster-memory-limit",
        &limit,
        "--monitor-interval",
        "200ms",
        "--retired-idle-exit",
        "10m",
    ];
    if let Some(strategy) = strategy {
        flags.extend(["--kill-strategy", strategy]);
    }
    let mut cluster = Cluster::start(
        &cluster_name(&format!("strategy-{}", strategy.unwrap_or("default"))),
        aware_spec("ebpf", 2, listen, &flags),
    );
    // Retire both generation-1 workers (they ask for it themselves).
    let first = cluster.status();
    let retired: Vec<(i64, u64)> = live_workers(&first, Some(1))
        .iter()
        .map(|w| {
            (
                w["pid"].as_i64().unwrap_or(0),
                w["port"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(retired.len(), 2, "{first}");
    for &(_, port) in &retired {
        let v =
            get_json(loopback_client(1), direct(port), "/retire?reason=test").expect("GET /retire");
        assert_eq!(v["retire_requested"], true, "{v}");
    }
    wait_for(
        &cluster,
        Duration::from_secs(10),
        "both retired and replaced",
        || {
            let status = cluster.status();
            (workers_in(&status, "retired", Some(1)).len() == 2
                && live_workers(&status, Some(1)).len() == 2)
                .then_some(())
        },
    );
    let (older, younger) = if start_time(retired[0].0) <= start_time(retired[1].0) {
        (retired[0], retired[1])
    } else {
        (retired[1], retired[0])
    };
    // The older one holds an open connection.
    let mut held = ipcluster_tests::client::connect_from(loopback_client(1), direct(older.1))
        .expect("connect to the older retired worker");
    write!(held, "GET /stream HTTP/1.1\r\nHost: test\r\n\r\n").expect("request");
    let mut buf = [0u8; 256];
    assert!(read_some(&mut held, &mut buf).expect("the stream starts") > 0);
    wait_for(
        &cluster,
        Duration::from_secs(5),
        "the connection counted",
        || (worker(&cluster.status(), older.0)?["connections"] == 1).then_some(()),
    );
    // 100 MiB in each retired worker: above the low watermark (80 %), below the high one.
    // With the master stopped meanwhile, so that no monitor pass sees the cluster
    // over the watermark while an /alloc is still being served: it would count as a
    // connection of the worker serving it (tying the idle one with the older one),
    // and the worker asked to die may exit before it answers (seen with `time`,
    // where the older one, allocated second, is the one asked).
    let master = i32::try_from(cluster.masters[0].id()).unwrap_or(0);
    signal(master, libc::SIGSTOP);
    let thaw = ipcluster_tests::guard::defer(move || signal(master, libc::SIGCONT));
    for (_, port) in [younger, older] {
        let v = get_json(loopback_client(1), direct(port), "/alloc?mb=100").expect("GET /alloc");
        assert_eq!(v["allocated_mib"], 100, "{v}");
    }
    drop(thaw);
    let asked = wait_for(
        &cluster,
        Duration::from_secs(10),
        "one of them leaves",
        || match (running(older.0), running(younger.0)) {
            (false, _) => Some(older.0),
            (_, false) => Some(younger.0),
            _ => None,
        },
    );
    // Only one was needed: the other stays, through several monitor passes.
    std::thread::sleep(Duration::from_millis(1000));
    let spared = if asked == older.0 { younger.0 } else { older.0 };
    assert!(
        running(spared),
        "both retired workers were ended; one was enough\n{}",
        cluster.logs()
    );
    let logs = cluster.logs();
    assert!(
        logs.contains(&format!("asking worker {asked} (band ")),
        "{logs}"
    );
    assert!(!logs.contains("high watermark breach"), "{logs}");
    println!(
        "--kill-strategy {}: asked worker {asked} ({}) to die, spared {spared}",
        strategy.unwrap_or("(default)"),
        if asked == older.0 {
            "older, with a connection"
        } else {
            "younger, idle"
        }
    );
    drop(held);
    cluster.stop();
    (asked == older.0, asked == younger.0)
}

fn kill_strategy_decides_who_is_asked_to_die() {
    let (older, _) = who_is_asked_to_die(None);
    assert!(
        !older,
        "conn-rss-time asked the worker with a connection, not the idle one"
    );
    let (older, _) = who_is_asked_to_die(Some("time"));
    assert!(older, "--kill-strategy time did not ask the oldest worker");
}
