//! Root tests of what only the sk-lookup backend does: taking listeners
//! (refusing one of another network namespace, a non-listener, a socket on
//! the wrong port), a dead worker's socket leaving the map with its band
//! falling back to the previous slot's worker, the counters, and replacing
//! the program on re-install without a gap. Run as root, one test thread:
//! `cargo test -p ipcluster-tests --test sk_lookup -- --test-threads=1`

mod sk_lookup_support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ipcluster::steering::sk_lookup::SkLookupSteering;
use ipcluster::steering::{Steering, SteeringConfig, SteeringError, SteeringTable, WorkerListener};
use ipcluster_tests::client::worker_port_from;
use ipcluster_tests::conformance::{assert_none_wrong, mismatches, teardown_guard, test_config};
use ipcluster_tests::netns::NetNs;
use ipcluster_tests::unique::{Ports, cluster_name};
use ipcluster_tests::worker::Worker;
use ipcluster_tests::{loopback_clients, require_root};
use sk_lookup_support::{attached_links, own_listener, plain, sk_lookup};

/// One public port on 127.0.0.1 and `workers` worker ports after it.
fn setup(what: &str, workers: usize) -> (SteeringConfig, Ports) {
    require_root();
    let ports = Ports::reserve(1 + workers);
    let public = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), ports.get(0));
    (test_config(&cluster_name(what), vec![public]), ports)
}

fn sk(config: &SteeringConfig) -> SkLookupSteering {
    SkLookupSteering::new(config.clone()).expect("build the sk-lookup backend")
}

/// The inode of a socket this process holds.
fn inode_of(fd: &impl AsRawFd) -> u64 {
    std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .expect("stat the socket fd")
        .ino()
}

fn listener_error(result: Result<bool, SteeringError>) -> String {
    match result {
        Err(e @ SteeringError::Listener { .. }) => e.to_string(),
        other => panic!("expected a listener error, got {other:?}"),
    }
}

#[test]
fn listener_in_another_netns_is_refused() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let (config, ports) = setup("sknetns", 1);
    let _guard = teardown_guard(&plain, &config);
    let mut steering = sk(&config);
    steering.install().expect("install");
    let port = ports.get(1);
    let ns = NetNs::new("sklisten");
    let foreign =
        ns.run(|| TcpListener::bind(("127.0.0.1", port)).expect("listen inside the netns"));
    let listener = WorkerListener {
        pid: std::process::id() as i32,
        holders: vec![std::process::id() as i32],
        port,
        inodes: vec![inode_of(&foreign)],
    };
    let message = listener_error(steering.register_listener(&listener));
    assert!(
        message.contains("another network namespace") && message.contains(&port.to_string()),
        "the error names the cause and the port: {message}"
    );
    assert!(
        !steering
            .registered_ports()
            .expect("read the map")
            .contains(&port),
        "a refused listener must not be in the map"
    );
    // The same port in this namespace is taken.
    let _worker = Worker::start(port).expect("worker");
    assert!(
        steering
            .register_listener(&own_listener(port))
            .expect("register")
    );
    assert!(
        steering
            .registered_ports()
            .expect("read the map")
            .contains(&port)
    );
    // Already there: nothing to do.
    assert!(
        !steering
            .register_listener(&own_listener(port))
            .expect("register again")
    );
}

#[test]
fn non_listeners_and_wrong_ports_are_refused() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let (config, ports) = setup("skbad", 2);
    let _guard = teardown_guard(&plain, &config);
    let mut steering = sk(&config);
    steering.install().expect("install");
    let me = std::process::id() as i32;

    let udp = UdpSocket::bind("127.0.0.1:0").expect("udp socket");
    let message = listener_error(steering.register_listener(&WorkerListener {
        pid: me,
        holders: vec![me],
        port: ports.get(1),
        inodes: vec![inode_of(&udp)],
    }));
    assert!(message.contains("not a listening TCP socket"), "{message}");

    let tcp = TcpListener::bind(("127.0.0.1", ports.get(2))).expect("listener");
    let message = listener_error(steering.register_listener(&WorkerListener {
        pid: me,
        holders: vec![me],
        port: ports.get(1),
        inodes: vec![inode_of(&tcp)],
    }));
    assert!(message.contains("not to port"), "{message}");

    let message = listener_error(steering.register_listener(&WorkerListener {
        pid: me,
        holders: vec![me],
        port: ports.get(1),
        inodes: vec![u64::MAX],
    }));
    assert!(message.contains("holds the LISTEN socket"), "{message}");
    assert!(steering.registered_ports().expect("map").is_empty());
}

/// Poll `f` until it is true (10 s at most: a link is released from a kernel
/// work queue, later on a busy machine).
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn dead_worker_leaves_the_map_and_its_band_falls_back() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let (config, ports) = setup("skfallback", 8);
    let _guard = teardown_guard(&plain, &config);
    let mut steering = sk_lookup(config.clone());
    steering.install().expect("install");
    let public = config.services[0];
    let old = SteeringTable::uniform(&config.services, 0, &[ports.slice(1..5)]);
    let new = SteeringTable::uniform(&config.services, 0, &[ports.slice(5..9)]);
    let mut old_workers = Worker::start_all(&ports.slice(1..5)).expect("old workers");
    let mut new_workers = Worker::start_all(&ports.slice(5..9)).expect("new workers");
    steering.publish(&old).expect("publish old");
    steering.publish(&new).expect("publish new");
    let clients = loopback_clients(16);
    assert_none_wrong("new table", &mismatches(&new, 0, &clients, 1));
    let before = steering.counters().expect("counters");
    assert!(before.assigned >= 16, "assigned counted: {before:?}");

    // Band 1's new worker dies: its socket leaves the map by itself, and
    // band 1 falls back to its old worker (the previous slot).
    let dead = new_workers.remove(1);
    let dead_port = dead.port();
    drop(dead);
    let inspect = sk(&config);
    eventually("the dead worker's socket leaves the map", || {
        !inspect
            .registered_ports()
            .expect("map")
            .contains(&dead_port)
    });
    let mut expected = new.clone();
    expected
        .set_band(0, 1, ports.get(2))
        .expect("expected table");
    assert_none_wrong("band 1 falls back", &mismatches(&expected, 0, &clients, 1));
    let after = steering.counters().expect("counters");
    let band1 = clients
        .iter()
        .filter(|c| new.worker_port_for(0, **c) == Some(dead_port))
        .count() as u64;
    assert!(band1 > 0, "some client is in band 1");
    assert_eq!(
        after.fallbacks - before.fallbacks,
        band1,
        "fallbacks: {after:?}"
    );
    assert_eq!(after.misses, before.misses, "no miss yet: {after:?}");

    // Its old worker dies too: band 1 has no socket at all; the kernel
    // answers as with no listener, and it counts as a miss.
    drop(old_workers.remove(1));
    eventually("the old worker's socket leaves the map", || {
        !inspect
            .registered_ports()
            .expect("map")
            .contains(&ports.get(2))
    });
    let client = clients
        .iter()
        .copied()
        .find(|c| new.worker_port_for(0, *c) == Some(dead_port))
        .expect("a band 1 client");
    assert!(
        worker_port_from(client, public).is_err(),
        "band 1 has no worker left: the connection is refused"
    );
    let last = steering.counters().expect("counters");
    assert!(last.misses > after.misses, "miss counted: {last:?}");
}

#[test]
fn reinstall_replaces_the_program_without_a_gap() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let (config, ports) = setup("skreplace", 4);
    let _guard = teardown_guard(&plain, &config);
    let mut first = sk_lookup(config.clone());
    first.install().expect("install");
    let table = SteeringTable::uniform(&config.services, 0, &[ports.slice(1..5)]);
    let _workers = Worker::start_all(&ports.slice(1..5)).expect("workers");
    first.publish(&table).expect("publish");
    drop(first);
    let links = attached_links(&config.cluster);
    assert_eq!(links.len(), 1, "one link attached: {links:?}");

    // Clients connect without pause while three masters re-install. Each
    // re-install (and the end) waits for a full round of the 16 clients after
    // the previous one, however slow the machine: connections are made before,
    // between and after all of them.
    let stop = AtomicBool::new(false);
    let failures = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let a_round_after = |since: u64| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while done.load(Ordering::Relaxed) < since + 16 {
            assert!(
                Instant::now() < deadline,
                "the clients made {} connections in 20 s, not a round of 16",
                done.load(Ordering::Relaxed) - since
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    std::thread::scope(|s| {
        // Stop the clients on the way out, also when an assertion fails here
        // (the scope waits for them).
        let _stop = ipcluster_tests::guard::defer(|| stop.store(true, Ordering::Relaxed));
        s.spawn(|| {
            let clients = loopback_clients(16);
            while !stop.load(Ordering::Relaxed) {
                for &c in &clients {
                    match worker_port_from(c, config.services[0]) {
                        Ok(p) if Some(p) == table.worker_port_for(0, c) => {}
                        _ => {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        for _ in 0..3 {
            a_round_after(done.load(Ordering::Relaxed));
            let mut next = sk_lookup(config.clone());
            assert_eq!(next.install().expect("re-install"), Some(table.clone()));
        }
        a_round_after(done.load(Ordering::Relaxed));
    });
    assert!(done.load(Ordering::Relaxed) > 50, "the clients ran");
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "connections failed during re-installs"
    );
    eventually("the old links are gone", || {
        attached_links(&config.cluster).len() == 1
    });
    let links_after = attached_links(&config.cluster);
    assert_ne!(links, links_after, "a re-install attaches a new link");
}

#[test]
fn ipv6_and_wildcard_services() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let ports = Ports::reserve(4);
    let v6 = SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST), ports.get(0));
    let wildcard = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), ports.get(1));
    let config = test_config(&cluster_name("skv6"), vec![v6, wildcard]);
    let _guard = teardown_guard(&plain, &config);
    let mut steering = sk_lookup(config.clone());
    steering.install().expect("install");
    let _v6_worker = Worker::start_on(SocketAddr::new(v6.ip(), ports.get(2))).expect("v6 worker");
    let _v4_worker = Worker::start(ports.get(3)).expect("v4 worker");
    let table = SteeringTable::uniform(
        &[v6, wildcard],
        0,
        &[vec![ports.get(2)], vec![ports.get(3)]],
    );
    steering.publish(&table).expect("publish");
    assert_eq!(
        worker_port_from(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST), v6).expect("IPv6 client"),
        ports.get(2)
    );
    // The wildcard service is served on any local address, e.g. 127.0.0.9.
    let local = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9)), ports.get(1));
    for client in loopback_clients(4) {
        assert_eq!(
            worker_port_from(client, local).expect("IPv4 client"),
            ports.get(3)
        );
    }
    let counters = steering.counters().expect("counters");
    assert!(counters.assigned >= 5, "{counters:?}");
}

#[test]
fn other_traffic_is_untouched() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let (_, ports) = setup("skother", 2);
    // The public port is one this UDP socket holds (the reserved ports are
    // held by the reservation's own UDP sockets).
    let server = UdpSocket::bind("127.0.0.1:0").expect("udp server");
    let public = server.local_addr().expect("udp address");
    let config = test_config(&cluster_name("skother"), vec![public]);
    let _guard = teardown_guard(&plain, &config);
    let mut steering = sk_lookup(config.clone());
    steering.install().expect("install");
    let _workers = Worker::start_all(&ports.slice(1..3)).expect("workers");
    let table = SteeringTable::uniform(&config.services, 0, &[ports.slice(1..3)]);
    steering.publish(&table).expect("publish");
    assert_eq!(
        worker_port_from(loopback_clients(1)[0], public)
            .map(|p| table.services[0].worker_ports.contains(&p))
            .ok(),
        Some(true),
        "TCP to the public port is steered"
    );
    let before = steering.counters().expect("counters");

    // UDP to the public port reaches the UDP socket bound there.
    server
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let client = UdpSocket::bind("127.0.0.2:0").expect("udp client");
    client.send_to(b"ping", public).expect("send");
    let mut buf = [0u8; 16];
    let (n, from) = server.recv_from(&mut buf).expect("the datagram arrives");
    assert_eq!(&buf[..n], b"ping");
    assert_eq!(from.ip(), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));

    // A direct connection to a worker port (a health check) reaches that worker.
    for client in loopback_clients(4) {
        let direct = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), ports.get(2));
        assert_eq!(
            worker_port_from(client, direct).expect("direct"),
            ports.get(2)
        );
    }
    let after = steering.counters().expect("counters");
    assert_eq!(after, before, "nothing of this counted as steering");
}
