//! End-to-end: bad input. Bad flags, a command that does not exist, a command
//! that always fails: `run` exits non-zero naming the problem and leaves no
//! process, pin, rule or state directory. Garbage, over-long lines and
//! spoofed identities on the control socket leave the master running.
//! Root, one test thread: `cargo test -p ipcluster-tests --test master_bad_input -- --test-threads=1`

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use ipcluster_tests::cluster::{
    Cluster, ClusterSpec, DemoStream, demo_get, ipcluster, leftovers, live_workers, workers_in,
};
use ipcluster_tests::unique::{Ports, cluster_name};
use ipcluster_tests::{loopback_client, require_root};

fn rejected(backend: &str, what: &str, flags: &[&str], needle: &str) {
    let name = cluster_name(&format!("bad-{what}"));
    let ports = Ports::reserve(1);
    let listen = format!("127.0.0.1:{}", ports.get(0));
    let mut args = vec![
        "run",
        "--name",
        &name,
        "--backend",
        backend,
        "--listen",
        &listen,
    ];
    args.extend_from_slice(flags);
    let out = ipcluster(&args, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{what}: `run` succeeded\n{stderr}");
    assert!(
        stderr.contains(needle),
        "{what}: the error does not name {needle:?}:\n{stderr}"
    );
    let left = leftovers(&name);
    assert!(left.is_empty(), "{what}: left behind {left:?}\n{stderr}");
}

fn bad_input(backend: &str) {
    require_root();
    rejected(
        backend,
        "workers",
        &["--workers", "3"],
        "invalid worker count 3",
    );
    rejected(
        backend,
        "listen",
        &["--listen", "localhost:80"],
        "invalid listen address \"localhost:80\"",
    );
    rejected(
        backend,
        "size",
        &["--worker-rss-limit", "lots"],
        "invalid size \"lots\"",
    );
    rejected(
        backend,
        "command",
        &["--", "no-such-program-ipcluster", "{port}"],
        "no-such-program-ipcluster",
    );
    rejected(
        backend,
        "user",
        &["--user", "no-such-user-ipcluster"],
        "no-such-user-ipcluster",
    );
    // A command that exists but never serves: given up after a few tries, cleaned up.
    rejected(
        backend,
        "false",
        &["--workers", "2", "--", "false"],
        "false",
    );
}

fn unknown_backend(_backend: &str) {
    require_root();
    let name = cluster_name("bad-backend");
    let out = ipcluster(
        &["run", "--name", &name, "--backend", "nftables"],
        Duration::from_secs(10),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("nftables"), "{stderr}");
    assert!(leftovers(&name).is_empty());
}

fn missing_cluster(_backend: &str) {
    require_root();
    let name = cluster_name("missing");
    for cmd in ["status", "stop", "kill-retired"] {
        let out = ipcluster(&[cmd, "--name", &name], Duration::from_secs(10));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{cmd} of a missing cluster succeeded"
        );
        assert!(stderr.contains(&name), "{cmd}: {stderr}");
        assert!(leftovers(&name).is_empty(), "{cmd} left something behind");
    }
}

fn control_socket_garbage(backend: &str) {
    let ports = Ports::reserve(1);
    let listen = SocketAddr::from(([127, 0, 0, 1], ports.get(0)));
    let mut cluster = Cluster::start(
        &cluster_name(&format!("garbage-{backend}")),
        ClusterSpec {
            flags: vec!["--monitor-interval".into(), "200ms".into()],
            ..ClusterSpec::demo(backend, 2, listen)
        },
    );
    let before = cluster.status();
    let pids: Vec<_> = live_workers(&before, Some(1))
        .iter()
        .map(|w| w["pid"].clone())
        .collect();
    let socket = ipcluster::paths::control_socket(&cluster.name);

    let send = |bytes: &[u8]| {
        let mut s = UnixStream::connect(&socket).expect("connect to the control socket");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let _ = s.write_all(bytes);
        s
    };
    let _ = send(b"garbage\n{\"type\":\"reboot\"}\n[1,2,3]\n{}\n\xff\xfe\n");
    let mut huge = vec![b'x'; 1 << 20];
    huge.push(b'\n');
    let _ = send(&huge);
    // A hello that names a worker's pid: identity comes from SO_PEERCRED, so the
    // field is refused and this process (not a worker) is not taken for one.
    let spoof = format!(
        "{{\"type\":\"hello\",\"band\":0,\"generation\":1,\"pid\":{}}}\n{{\"type\":\"ping\"}}\n\
         {{\"type\":\"request_retire\",\"reason\":\"spoof\"}}\n",
        pids[0]
    );
    let mut s = send(spoof.as_bytes());
    // The master closes a connection from a non-worker that speaks as a worker
    // (a reset if it closed before reading every line: closed all the same).
    let mut reply = String::new();
    let closed = match BufReader::new(&mut s).read_line(&mut reply) {
        Ok(n) => n == 0,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    assert!(closed, "the master answered a non-worker: {reply:?}");
    // Half a line, then hang up.
    let _ = send(b"{\"type\":\"ping\"");

    // Synchronise on what the master did, not on a sleep: it logged every kind
    // of garbage, then ran two monitor passes (each one where a retirement would
    // be decided) — seen as a stream opened after the garbage counted in
    // `status`, then no longer counted once closed.
    let deadline = Instant::now() + Duration::from_secs(10);
    let wanted = ["not JSON", "longer than", "not a process of a worker"];
    while !wanted.iter().all(|w| cluster.master_log(1).contains(w)) {
        assert!(
            Instant::now() < deadline,
            "the master did not log every kind of garbage: {wanted:?}\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let stream = DemoStream::open(loopback_client(2), listen).expect("open /stream");
    let worker_pid = i64::from(stream.first.pid);
    let connections_of = |cluster: &Cluster| {
        let status = cluster.status();
        status["workers"]
            .as_array()
            .and_then(|ws| ws.iter().find(|w| w["pid"] == worker_pid).cloned())
            .and_then(|w| w["connections"].as_u64())
    };
    wait_until(&cluster, "a monitor pass counts the stream", || {
        connections_of(&cluster) == Some(1)
    });
    drop(stream);
    wait_until(&cluster, "a later monitor pass sees it closed", || {
        connections_of(&cluster) == Some(0)
    });
    assert!(
        !cluster.master_exited(1),
        "the master died\n{}",
        cluster.logs()
    );
    let after = cluster.status();
    let pids_after: Vec<_> = live_workers(&after, Some(1))
        .iter()
        .map(|w| w["pid"].clone())
        .collect();
    assert_eq!(pids, pids_after, "the workers changed: {after}");
    assert!(
        workers_in(&after, "retired", None).is_empty(),
        "the spoofed request_retire retired a worker: {after}"
    );
    demo_get(loopback_client(2), listen).expect("still serving");
    cluster.stop();
}

/// Poll `condition` every 20 ms for up to 10 s; panic with the logs otherwise.
fn wait_until(cluster: &Cluster, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "{what}: not within 10 s\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

ipcluster_tests::for_each_backend!(
    bad_input,
    unknown_backend,
    missing_cluster,
    control_socket_garbage
);
