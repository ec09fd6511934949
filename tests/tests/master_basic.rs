//! End-to-end: a real master with real workers. Sticky bands for 64 client
//! addresses over 4 demo workers, `status --json` fields, an unmodified
//! `python3 -m http.server {port}` cluster, workers run as another user.
//! Root, one test thread: `cargo test -p ipcluster-tests --test master_basic -- --test-threads=1`

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ipcluster::steering::band_of;
use ipcluster_tests::cluster::{Cluster, ClusterSpec, demo_get, http_get, live_workers};
use ipcluster_tests::unique::{Ports, cluster_name};
use ipcluster_tests::{loopback_client, loopback_clients};

fn listen(ports: &Ports) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], ports.get(0)))
}

fn sticky_64_clients(backend: &str) {
    let ports = Ports::reserve(1);
    let cluster = Cluster::start(
        &cluster_name(&format!("sticky-{backend}")),
        ClusterSpec::demo(backend, 4, listen(&ports)),
    );
    let status = cluster.status();
    for key in [
        "name",
        "backend",
        "generation",
        "workers",
        "table",
        "counters",
    ] {
        assert!(status.get(key).is_some(), "status has no {key:?}: {status}");
    }
    assert_eq!(status["backend"], backend);
    assert_eq!(status["name"], cluster.name.as_str());
    let live = live_workers(&status, Some(1));
    assert_eq!(live.len(), 4, "{status}");
    let pid_of_band: HashMap<u64, i64> = live
        .iter()
        .map(|w| {
            for key in [
                "pid",
                "band",
                "generation",
                "state",
                "port",
                "rss",
                "connections",
                "uptime",
            ] {
                assert!(w.get(key).is_some(), "worker has no {key:?}: {w}");
            }
            assert!(w["rss"].as_u64().unwrap_or(0) > 0, "rss measured: {w}");
            (
                w["band"].as_u64().unwrap_or(99),
                w["pid"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(pid_of_band.len(), 4, "one live worker per band: {status}");
    let table_ports: Vec<u64> = status["table"]["services"][0]["worker_ports"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p.as_u64()).collect())
        .unwrap_or_default();
    assert_eq!(table_ports.len(), 4, "table: {}", status["table"]);

    let mut seen = HashSet::new();
    for client in loopback_clients(64) {
        let band = band_of(client, 0, 4);
        let first = demo_get(client, listen(&ports))
            .unwrap_or_else(|e| panic!("GET / from {client}: {e}\n{}", cluster.logs()));
        for _ in 0..2 {
            let again = demo_get(client, listen(&ports)).expect("GET / again");
            assert_eq!(again.pid, first.pid, "{client} moved between workers");
        }
        assert_eq!(
            first.band, band,
            "{client} reached band {} instead of {band}",
            first.band
        );
        assert_eq!(
            i64::from(first.pid),
            pid_of_band[&u64::from(band)],
            "{client}"
        );
        // The worker reports its accepted socket's local port: the worker
        // port where the kernel rewrote or redirected it, the public port
        // where sk_lookup handed the connection to the worker's own socket.
        let local_port = if backend == "sk-lookup" {
            u64::from(listen(&ports).port())
        } else {
            table_ports[band as usize]
        };
        assert_eq!(first.port as u64, local_port);
        assert_eq!(
            first.client.split(':').next(),
            Some(client.to_string().as_str())
        );
        assert_eq!(first.generation, 1);
        seen.insert(first.pid);
    }
    assert_eq!(seen.len(), 4, "all four workers served");
    // Connections are counted per worker while they are open.
    let held: Vec<_> = (0..3)
        .map(|_| {
            ipcluster_tests::client::connect_from(loopback_client(2), listen(&ports))
                .expect("connect")
        })
        .collect();
    let band = band_of(loopback_client(2), 0, 4);
    // Counted by a monitor pass; `status` itself may take long on a busy
    // machine, so wait by the clock, not by a number of polls.
    let mut counted = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let status = cluster.status();
        counted = live_workers(&status, Some(1))
            .iter()
            .find(|w| w["band"] == band)
            .and_then(|w| w["connections"].as_u64())
            .unwrap_or(0);
        if counted >= 3 {
            break;
        }
    }
    assert!(
        counted >= 3,
        "status counts the 3 open connections of band {band}: {counted}"
    );
    drop(held);
}

fn python_http_server(backend: &str) {
    let ports = Ports::reserve(1);
    let mut spec = ClusterSpec::demo(backend, 2, listen(&ports));
    spec.command = ["python3", "-m", "http.server", "{port}"]
        .map(String::from)
        .to_vec();
    let cluster = Cluster::start(&cluster_name(&format!("py-{backend}")), spec);
    for client in loopback_clients(8) {
        let (code, body) = http_get(client, listen(&ports), "/")
            .unwrap_or_else(|e| panic!("GET / from {client}: {e}\n{}", cluster.logs()));
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("Directory listing"), "{body}");
    }
}

/// Readiness follows the process tree: the server is a child of a shell.
fn shell_wrapped_server(backend: &str) {
    let ports = Ports::reserve(1);
    let mut spec = ClusterSpec::demo(backend, 2, listen(&ports));
    spec.command = ["sh", "-c", "python3 -m http.server $PORT; exit 1"]
        .map(String::from)
        .to_vec();
    let cluster = Cluster::start(&cluster_name(&format!("sh-{backend}")), spec);
    let (code, _) = http_get(loopback_client(3), listen(&ports), "/").expect("GET /");
    assert_eq!(code, 200);
    drop(cluster);
}

fn workers_run_as_another_user(backend: &str) {
    let ports = Ports::reserve(1);
    let mut spec = ClusterSpec::demo(backend, 1, listen(&ports));
    spec.flags = vec!["--user".into(), "nobody".into()];
    let cluster = Cluster::start(&cluster_name(&format!("user-{backend}")), spec);
    let status = cluster.status();
    let pid = live_workers(&status, Some(1))[0]["pid"]
        .as_i64()
        .unwrap_or(0);
    let proc_status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("worker status");
    let uid_line = proc_status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap_or("");
    assert!(
        uid_line
            .split_whitespace()
            .nth(1)
            .is_some_and(|uid| uid != "0"),
        "{uid_line}"
    );
    demo_get(loopback_client(2), listen(&ports)).expect("GET / from a worker running as nobody");
    // The demo worker, running as nobody, reached the control socket.
    let mut aware = false;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let status = cluster.status();
        if live_workers(&status, Some(1))[0]["aware"] == true {
            aware = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        aware,
        "the worker (as nobody) said hello on the control socket\n{}",
        cluster.logs()
    );
    let _ = IpAddr::from([127, 0, 0, 1]);
}

ipcluster_tests::for_each_backend!(
    sticky_64_clients,
    python_http_server,
    shell_wrapped_server,
    workers_run_as_another_user
);
