//! End-to-end: the control socket's framing against a real master. A line of
//! exactly the protocol's limit is served; a longer one closes that peer's
//! connection (logged with the peer's pid and uid) while the master keeps
//! serving everyone else: another open connection, `ipcluster status`, the
//! workers (which said hello through `worker_api`) and their clients.
//! The control socket does not depend on the steering backend: one backend.
//! Root, one test thread: `cargo test -p ipcluster-tests --test control_protocol -- --test-threads=1`

use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use ipcluster::protocol::{LineError, LineReader, MAX_LINE, StatusReport};
use ipcluster_tests::cluster::{Cluster, ClusterSpec, demo_get, live_workers};
use ipcluster_tests::unique::{Ports, cluster_name};
use ipcluster_tests::{loopback_client, require_root};

const PATIENCE: Duration = Duration::from_secs(10);

/// A `status` request padded with spaces (valid JSON) to `len` bytes, then a newline.
fn status_request_of(len: usize) -> Vec<u8> {
    let mut line = br#"{"type":"status"}"#.to_vec();
    assert!(len >= line.len());
    line.resize(len, b' ');
    line.push(b'\n');
    line
}

fn connect(socket: &std::path::Path) -> UnixStream {
    let stream = UnixStream::connect(socket).expect("connect to the control socket");
    stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
    stream.set_write_timeout(Some(PATIENCE)).expect("timeout");
    stream
}

/// Send a `status` request of `len` bytes on `stream` and read the report.
fn status_on(stream: &UnixStream, len: usize) -> StatusReport {
    let mut writer = stream;
    writer
        .write_all(&status_request_of(len))
        .expect("send a status request");
    let reply = LineReader::new(stream)
        .read_line()
        .expect("read the reply")
        .expect("a reply before the master hung up");
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("not a status report ({e}): {reply}"))
}

#[test]
fn an_over_long_line_closes_only_that_peer() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    require_root();
    let ports = Ports::reserve(1);
    let listen = SocketAddr::from(([127, 0, 0, 1], ports.get(0)));
    let mut cluster = Cluster::start(
        &cluster_name("overlong"),
        ClusterSpec::demo("ebpf", 2, listen),
    );
    let socket = ipcluster::paths::control_socket(&cluster.name);
    let before = cluster.status();
    let pids: Vec<_> = live_workers(&before, Some(1))
        .iter()
        .map(|w| w["pid"].clone())
        .collect();
    assert_eq!(pids.len(), 2, "{before}");

    // A peer that stays connected throughout.
    let bystander = connect(&socket);
    assert_eq!(status_on(&bystander, 20).name, cluster.name);

    // Exactly at the limit: read and answered.
    let at_limit = connect(&socket);
    assert_eq!(status_on(&at_limit, MAX_LINE).name, cluster.name);

    // One byte over: no answer, the connection is closed, even though a
    // well-formed request follows on the same connection.
    let over = connect(&socket);
    let mut bytes = status_request_of(MAX_LINE + 1);
    bytes.extend_from_slice(b"{\"type\":\"status\"}\n");
    // The master may hang up before it has read everything: a failed write is expected.
    let _ = (&over).write_all(&bytes);
    match LineReader::new(&over).read_line() {
        Ok(None) => {}
        Err(LineError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Ok(Some(reply)) => panic!(
            "the master answered a line over the limit: {}",
            &reply[..reply.len().min(200)]
        ),
        Err(e) => panic!("the connection was not closed: {e}"),
    }

    // The master says why, naming this process as the peer.
    let who = format!("pid {}, uid 0", std::process::id());
    let deadline = Instant::now() + PATIENCE;
    loop {
        let log = cluster.master_log(1);
        let refused = log.lines().find(|l| {
            l.contains(&format!("a line longer than {MAX_LINE} bytes"))
                && l.contains("closing the connection")
        });
        if let Some(line) = refused {
            assert!(line.contains(&who), "the log does not name {who}: {line}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the master did not log the over-long line\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Everyone else is still served: the open connection, the CLI, the
    // workers (aware: they said hello through worker_api) and their clients.
    assert_eq!(status_on(&bystander, 20).name, cluster.name);
    let after = cluster.status();
    let live = live_workers(&after, Some(1));
    let pids_after: Vec<_> = live.iter().map(|w| w["pid"].clone()).collect();
    assert_eq!(pids, pids_after, "the workers changed: {after}");
    // Aware once their hello is in (they say it right after they listen, which
    // may be after the master saw the socket).
    let deadline = Instant::now() + PATIENCE;
    loop {
        let status = cluster.status();
        if live_workers(&status, Some(1))
            .iter()
            .all(|w| w["aware"] == true)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a demo worker did not say hello: {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    demo_get(loopback_client(2), listen).expect("the cluster still serves");
    assert!(
        !cluster.master_exited(1),
        "the master died\n{}",
        cluster.logs()
    );
    cluster.stop();
}
