//! End-to-end tests of the master with `--backend sk-lookup`: status counters
//! and bpftool-readable pins, connection counts of a retired worker whose
//! accepted sockets have the public port as local port, a worker that
//! re-creates its listener, and `stop` removing everything. Run as root:
//! `cargo test -p ipcluster-tests --test master_sk_lookup -- --test-threads=1`

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use ipcluster::steering::band_of;
use ipcluster_tests::cluster::{
    Cluster, ClusterSpec, DemoStream, demo_get, http_get, ipcluster, kill_cluster_processes,
    leftovers, worker_port_range, workers_in,
};
use ipcluster_tests::guard::defer;
use ipcluster_tests::loopback_clients;
use ipcluster_tests::netns::NetNs;
use ipcluster_tests::unique::{Ports, cluster_name};

fn listen(ports: &Ports) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), ports.get(0))
}

fn bpftool(args: &[&str]) -> String {
    let out = Command::new("bpftool")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running bpftool (apt-get install bpftool): {e}"));
    assert!(
        out.status.success(),
        "bpftool {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Poll `f` until it returns `Some` (10 s at most).
fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn counters_pins_and_stop() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let ports = Ports::reserve(1);
    let mut cluster = Cluster::start(
        &cluster_name("skstatus"),
        ClusterSpec::demo("sk-lookup", 4, listen(&ports)),
    );
    let clients = loopback_clients(16);
    for &client in &clients {
        let reply = demo_get(client, listen(&ports))
            .unwrap_or_else(|e| panic!("GET from {client}: {e}\n{}", cluster.logs()));
        assert_eq!(reply.band, band_of(client, 0, 4), "{client}");
        assert_eq!(
            reply.port,
            listen(&ports).port(),
            "the worker sees the public port"
        );
    }
    let status = cluster.status();
    assert_eq!(status["backend"], "sk-lookup");
    let counters = &status["counters"];
    let assigned = counters["assigned"].as_u64().expect("counters.assigned");
    assert!(assigned >= 16, "assigned: {counters}");
    assert_eq!(counters["fallbacks"].as_u64(), Some(0), "{counters}");
    assert_eq!(counters["misses"].as_u64(), Some(0), "{counters}");

    // The pins are readable with bpftool: link, table, sockets.
    let dir = ipcluster::paths::pin_dir(&cluster.name);
    let link = bpftool(&[
        "link",
        "show",
        "pinned",
        &dir.join("sk_lookup_link").display().to_string(),
    ]);
    assert!(link.contains("netns"), "an sk_lookup (netns) link: {link}");
    let active = bpftool(&[
        "map",
        "dump",
        "pinned",
        &dir.join("active").display().to_string(),
    ]);
    assert!(active.contains("value"), "{active}");
    let sockets = bpftool(&[
        "map",
        "show",
        "pinned",
        &dir.join("sockets").display().to_string(),
    ]);
    assert!(sockets.contains("sockhash"), "{sockets}");
    assert!(!dir.join("flows").exists(), "no flow table for sk-lookup");

    cluster.stop();
    let left = leftovers(&cluster.name);
    assert!(left.is_empty(), "stop left: {left:?}");
    // Nothing steers the public port any more.
    assert!(demo_get(clients[0], listen(&ports)).is_err());
}

#[test]
fn retired_worker_counts_connections_on_the_public_port() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let ports = Ports::reserve(1);
    let mut cluster = Cluster::start(
        &cluster_name("skretired"),
        ClusterSpec::demo("sk-lookup", 2, listen(&ports)),
    );
    let client = loopback_clients(1)[0];
    let mut stream = DemoStream::open(client, listen(&ports)).expect("open /stream");
    let pid = u64::try_from(stream.first.pid).expect("a pid");
    cluster.start_master();
    cluster.wait_generation_live(2, Duration::from_secs(30));
    let counted = eventually("the retired worker counts its stream", || {
        let status = cluster.status();
        workers_in(&status, "retired", Some(1))
            .iter()
            .find(|w| w["pid"].as_u64() == Some(pid))
            .and_then(|w| w["connections"].as_u64())
            .filter(|&c| c >= 1)
    });
    assert!(counted >= 1);
    stream
        .next_line()
        .expect("the stream lives on across the reload");
    drop(stream);
    eventually("the retired worker is idle once the stream closed", || {
        let status = cluster.status();
        workers_in(&status, "retired", Some(1))
            .iter()
            .find(|w| w["pid"].as_u64() == Some(pid))
            .and_then(|w| w["connections"].as_u64())
            .filter(|&c| c == 0)
    });
    cluster.stop();
}

/// A server that closes its listener after every request and listens again:
/// the master notices the port missing from the map and registers the new one.
const RELISTEN: &str = r#"
import os, socket
port = int(os.environ["PORT"])
def listen():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(64)
    return s
s = listen()
while True:
    c, _ = s.accept()
    c.recv(4096)
    body = "pid=%d\n" % os.getpid()
    c.sendall(("HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)).encode())
    c.close()
    s.close()
    s = listen()
"#;

#[test]
fn recreated_listener_is_registered_again() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let ports = Ports::reserve(1);
    let mut spec = ClusterSpec::demo("sk-lookup", 1, listen(&ports));
    spec.command = vec!["python3".into(), "-c".into(), RELISTEN.into()];
    spec.flags = vec!["--monitor-interval".into(), "200ms".into()];
    let mut cluster = Cluster::start(&cluster_name("skrelisten"), spec);
    let client = loopback_clients(1)[0];
    for round in 0..3 {
        let (code, body) = eventually(&format!("request {round} is served"), || {
            http_get(client, listen(&ports), "/").ok()
        });
        assert_eq!(code, 200, "{body}");
    }
    // Round 2 was served once the third listener was in the map; the master
    // logs the registration just after it inserted the socket, so the line
    // may still be on its way.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = cluster.master_log(1);
        let registrations = log.matches("registered for sk_lookup").count();
        if registrations >= 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the listener was registered again after each re-creation ({registrations}):\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    cluster.stop();
}

/// Workers started in another network namespace listen where the master
/// cannot steer: the start fails with an error that says so.
#[test]
fn worker_in_another_netns_is_named() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let ports = Ports::reserve(1);
    let name = cluster_name("sknetns");
    let ns = NetNs::new("skworkers");
    let _cleanup = defer(|| {
        kill_cluster_processes(&name);
        let _ = ipcluster(&["stop", "--name", &name], Duration::from_secs(20));
    });
    let (first, last) = worker_port_range();
    let netns = format!("--net={}", ns.path().display());
    let listen = listen(&ports).to_string();
    let range = format!("{first}-{last}");
    let out = ipcluster(
        &[
            "run",
            "--name",
            &name,
            "--backend",
            "sk-lookup",
            "--workers",
            "1",
            "--listen",
            &listen,
            "--port-range",
            &range,
            "--connect-timeout",
            "1s",
            "--",
            "nsenter",
            &netns,
            "--",
            "python3",
            "-m",
            "http.server",
            "{port}",
        ],
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the start must fail:\n{stderr}");
    assert!(
        stderr.contains("another network namespace"),
        "the error names the cause:\n{stderr}"
    );
    let left = leftovers(&name);
    assert!(left.is_empty(), "a failed start left: {left:?}");
}
