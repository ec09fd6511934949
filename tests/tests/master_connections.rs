//! Connection counts at scale, on every backend: a few thousand idle
//! connections held on a real cluster of four workers, and `status --json`
//! must count each worker's own (learned from the worker's greeting on every
//! connection), then follow when some of them close. The monitor's one
//! filtered socket dump per pass and its attribution (by worker port, or by
//! the cached inode view for sk-lookup, where accepted sockets keep the
//! public port) are what this checks. Run as root:
//! `cargo test -p ipcluster-tests --test master_connections -- --test-threads=1`

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use ipcluster_tests::client::connect_from;
use ipcluster_tests::cluster::{Cluster, ClusterSpec, live_workers};
use ipcluster_tests::invoke::poll;
use ipcluster_tests::loopback_clients;
use ipcluster_tests::unique::{Ports, cluster_name};
use nix::sys::resource::{Resource, getrlimit, setrlimit};

const CONNECTIONS: usize = 3000;

/// A worker that greets each connection with its pid and then holds it,
/// idle, until the client closes it (one thread, a selector); the bench case
/// master-scale runs the same file.
const IDLE_SERVER: &str = include_str!("../idle_server.py");

/// Room for the clients (this process) and the workers (they inherit it).
fn raise_fd_limit(needed: u64) {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    if soft >= needed {
        return;
    }
    let hard = hard.max(needed);
    setrlimit(Resource::RLIMIT_NOFILE, needed.max(soft), hard)
        .unwrap_or_else(|e| panic!("raising RLIMIT_NOFILE to {needed} (hard {hard}): {e}"));
}

/// One idle connection and the worker pid that greeted it.
fn open(source: IpAddr, target: SocketAddr) -> (TcpStream, u64) {
    let stream = connect_from(source, target)
        .unwrap_or_else(|e| panic!("connecting from {source} to {target}: {e}"));
    let mut reader = BufReader::new(stream.try_clone().expect("clone the stream"));
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("greeting from {target} (client {source}): {e}"));
    let pid = line
        .trim()
        .strip_prefix("pid=")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected greeting {line:?}"));
    (stream, pid)
}

/// Connections per live worker pid, from `status --json`.
fn counted(cluster: &Cluster) -> BTreeMap<u64, u64> {
    live_workers(&cluster.status(), None)
        .iter()
        .filter_map(|w| Some((w["pid"].as_u64()?, w["connections"].as_u64()?)))
        .collect()
}

/// Wait (a few monitor passes) until status counts `expected` per worker.
fn wait_counts(cluster: &Cluster, expected: &BTreeMap<u64, u64>, what: &str) {
    let mut got = BTreeMap::new();
    let settled = poll(Duration::from_secs(15), Duration::from_millis(200), || {
        got = counted(cluster);
        (&got == expected).then_some(())
    });
    assert!(
        settled.is_some(),
        "{what}: status counts {got:?}, the workers greeted {expected:?}"
    );
}

fn thousands_of_idle_connections(backend: &str) {
    raise_fd_limit(2 * CONNECTIONS as u64 + 1024);
    let ports = Ports::reserve(1);
    let public = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), ports.get(0));
    let mut spec = ClusterSpec::demo(backend, 4, public);
    spec.command = vec!["python3".into(), "-c".into(), IDLE_SERVER.into()];
    let mut cluster = Cluster::start(&cluster_name(&format!("conns-{backend}")), spec);
    let workers: Vec<u64> = counted(&cluster).into_keys().collect();
    assert_eq!(workers.len(), 4, "four live workers");

    // From 16 client addresses, so that every band gets its share.
    let sources = loopback_clients(16);
    let mut streams: Vec<(TcpStream, u64)> = (0..CONNECTIONS)
        .map(|i| open(sources[i % sources.len()], public))
        .collect();
    let mut expected: BTreeMap<u64, u64> = workers.iter().map(|&p| (p, 0)).collect();
    for (_, pid) in &streams {
        *expected
            .get_mut(pid)
            .unwrap_or_else(|| panic!("greeted by {pid}, not a live worker {workers:?}")) += 1;
    }
    assert!(
        expected.values().filter(|&&n| n > 0).count() >= 2,
        "the clients reached at least two workers: {expected:?}"
    );
    wait_counts(&cluster, &expected, "all connections open");

    // Close every connection of one worker and a third of the others.
    let victim = *expected
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(pid, _)| pid)
        .expect("a worker");
    let mut i = 0;
    streams.retain(|(_, pid)| {
        i += 1;
        *pid != victim && i % 3 != 0
    });
    let mut expected: BTreeMap<u64, u64> = workers.iter().map(|&p| (p, 0)).collect();
    for (_, pid) in &streams {
        if let Some(n) = expected.get_mut(pid) {
            *n += 1;
        }
    }
    wait_counts(&cluster, &expected, "after closing some");
    drop(streams);
    let zero: BTreeMap<u64, u64> = workers.iter().map(|&p| (p, 0)).collect();
    wait_counts(&cluster, &zero, "after closing all");
    // Counted from the kernel-filtered socket dump, not the /proc/net/tcp fallback.
    let logs = cluster.logs();
    assert!(
        !logs.contains("sock_diag failed"),
        "the master fell back to /proc/net/tcp:\n{logs}"
    );
    cluster.stop();
}

#[test]
fn ebpf_counts_thousands_of_idle_connections() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    thousands_of_idle_connections("ebpf");
}

#[test]
fn iptables_counts_thousands_of_idle_connections() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    thousands_of_idle_connections("iptables");
}

#[test]
fn sk_lookup_counts_thousands_of_idle_connections() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    thousands_of_idle_connections("sk-lookup");
}
