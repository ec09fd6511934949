//! What the tc data path guarantees on real sockets: forged SYNs do not take
//! over live connections (before and right after a generation flip), and a
//! wildcard service steers only connections to this host, never traffic the
//! host forwards (client namespace → forwarding namespace running the
//! cluster → remote namespace with its own server on the public port).
//! Run as root: `cargo test -p ipcluster-tests --test ebpf_datapath -- --test-threads=1`

mod ebpf_support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use ebpf_support::ebpf;
use ipcluster::steering::{BackendKind, Steering, SteeringConfig, SteeringTable, backend};
use ipcluster_tests::client::{Conversation, connect_from};
use ipcluster_tests::cluster::{Cluster, ClusterSpec};
use ipcluster_tests::conformance::{assert_none_wrong, teardown_guard, test_config};
use ipcluster_tests::guard::defer;
use ipcluster_tests::invoke::{poll, wait_for_text};
use ipcluster_tests::netns::NetNs;
use ipcluster_tests::raw::{self, FIN, RST, SYN};
use ipcluster_tests::topology::{BridgedHost, Guest, LineSpec, RoutedLine, TunPair};
use ipcluster_tests::unique::{Ports, cluster_name};
use ipcluster_tests::worker::Worker;
use ipcluster_tests::{loopback_clients, require_root};

/// A wildcard service `any`:P of a new cluster, steered (on `interfaces`)
/// to four band workers on the four ports after P (one band each).
struct BandService {
    ports: Ports,
    public: SocketAddr,
    config: SteeringConfig,
    table: SteeringTable,
}

impl BandService {
    fn new(prefix: &str, any: IpAddr, interfaces: &[&str]) -> BandService {
        let ports = Ports::reserve(5);
        let public = SocketAddr::new(any, ports.get(0));
        let config = SteeringConfig {
            interfaces: interfaces.iter().map(|&i| i.to_owned()).collect(),
            ..test_config(&cluster_name(prefix), vec![public])
        };
        let table = SteeringTable::uniform(&[public], 0, &[ports.slice(1..5)]);
        BandService {
            ports,
            public,
            config,
            table,
        }
    }

    /// In `ns`: install `steering` (panicking with `what.0`), publish the
    /// table and start the band workers (panicking with `what.1`).
    fn steer(&self, ns: &NetNs, steering: &mut dyn Steering, what: (&str, &str)) -> Vec<Worker> {
        let (install, worker) = what;
        ns.run(|| {
            steering
                .install()
                .unwrap_or_else(|e| panic!("{install}: {e:?}"));
            steering.publish(&self.table).expect("publish");
            self.ports
                .slice(1..5)
                .into_iter()
                .map(|p| {
                    Worker::start_on(SocketAddr::new(self.public.ip(), p))
                        .unwrap_or_else(|e| panic!("{worker}: {e:?}"))
                })
                .collect()
        })
    }

    /// The band worker's port for connections from `client`.
    fn band_port(&self, client: IpAddr) -> Option<u16> {
        self.table.worker_port_for(0, client)
    }
}

/// A server that `ns` runs itself on `addr` (another host's own service on
/// the public port, which steering must leave alone).
fn own_server(ns: &NetNs, addr: SocketAddr, what: &str) -> Worker {
    ns.run(|| Worker::start_on(addr).unwrap_or_else(|e| panic!("{what}: {e:?}")))
}

/// From `source`, inside `ns`: four connections to each of `targets`
/// (what, address), each echoing one line: (what, number, the port that
/// answered).
fn four_to_each<'a>(
    ns: &NetNs,
    source: IpAddr,
    targets: &[(&'a str, SocketAddr)],
) -> Vec<(&'a str, usize, std::io::Result<u16>)> {
    ns.run(|| {
        let mut results = Vec::new();
        for &(what, target) in targets {
            for i in 0..4 {
                let got = Conversation::open(source, target)
                    .and_then(|mut c| c.echo(&format!("{what} {i}")).map(|()| c.worker_port()));
                results.push((what, i, got));
            }
        }
        results
    })
}

/// The results of [`four_to_each`] that did not reach port `expected(what)`,
/// described.
fn wrong_ports(
    results: Vec<(&str, usize, std::io::Result<u16>)>,
    expected: impl Fn(&str) -> Option<u16>,
) -> Vec<String> {
    let mut wrong = Vec::new();
    for (what, i, got) in results {
        let expected = expected(what);
        match got {
            Ok(port) if Some(port) == expected => {}
            Ok(port) => wrong.push(format!(
                "connection {i} to {what} reached port {port}, expected {expected:?}"
            )),
            Err(e) => wrong.push(format!("connection {i} to {what}: {e}")),
        }
    }
    wrong
}

/// Forge, for every open connection, a SYN with its client address and port
/// to the public port and to the worker port it lives on (plus SYN|RST and
/// SYN|FIN to the public port); then every connection must still echo on its
/// own worker. Returns what went wrong.
fn forge_and_check(open: &mut [Conversation], public: SocketAddr, round: &str) -> Vec<String> {
    let mut errors = Vec::new();
    for conv in open.iter() {
        let client = conv.local_addr().expect("client address");
        let worker = SocketAddr::new(public.ip(), conv.worker_port());
        // A sequence number far from the connection's own.
        let seq = 0x5eed_0000 ^ u32::from(client.port());
        for (target, flags) in [
            (public, SYN),
            (worker, SYN),
            (public, SYN | RST),
            (public, SYN | FIN),
        ] {
            if let Err(e) = raw::send_tcp(client, target, flags, seq) {
                errors.push(format!("forging {flags:#x} {client} -> {target}: {e}"));
            }
        }
    }
    // Let the challenge ACKs and anything a broken flow would cause arrive.
    std::thread::sleep(Duration::from_millis(100));
    for conv in open.iter_mut() {
        if let Err(e) = conv.echo(&format!("{round} from {}", conv.source())) {
            errors.push(format!(
                "{} after forged SYNs ({round}): {e}",
                conv.source()
            ));
        }
    }
    errors
}

#[test]
fn forged_syns_do_not_take_over_live_connections() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let ports = Ports::reserve(9);
    let public = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), ports.get(0));
    let config = test_config(&cluster_name("hijack"), vec![public]);
    let _teardown = teardown_guard(&ebpf, &config);
    let mut steering = ebpf(config.clone());
    steering.install().expect("install");
    let old = SteeringTable::uniform(&[public], 0, &[ports.slice(1..5)]);
    let new = SteeringTable::uniform(&[public], 0, &[ports.slice(5..9)]);
    let _workers = Worker::start_all(ports.slice(1..9).as_slice()).expect("workers");
    steering.publish(&old).expect("publish generation 1");

    let mut open: Vec<Conversation> = loopback_clients(16)
        .into_iter()
        .map(|c| Conversation::open(c, public).expect("open a connection"))
        .collect();
    let before = steering.counters().expect("counters");
    assert_none_wrong(
        "connections under forged SYNs",
        &forge_and_check(&mut open, public, "before the flip"),
    );
    steering.publish(&new).expect("publish generation 2");
    assert_none_wrong(
        "connections under forged SYNs right after a flip",
        &forge_and_check(&mut open, public, "after the flip"),
    );
    for conv in &open {
        assert_eq!(
            Some(conv.worker_port()),
            old.worker_port_for(0, conv.source()),
            "{} moved",
            conv.source()
        );
    }
    // Every forged SYN (to the public port and to the worker port, before and
    // after the flip) reuses a live connection's addresses: 16 × 2 × 2.
    // SYN|RST and SYN|FIN are no new connections and are not counted. The
    // counters are read until all 64 are in (at most 20 s), then must be
    // exactly 64.
    let mut after = steering.counters().expect("counters");
    poll(Duration::from_secs(20), Duration::from_millis(50), || {
        after = steering.counters().expect("counters");
        (after.refused_hijacks - before.refused_hijacks >= 64).then_some(())
    });
    let refused = after.refused_hijacks - before.refused_hijacks;
    assert_eq!(refused, 64, "refused take-overs (within 20 s): {after:?}");
}

/// The forwarding topology: client (10.211.1.2) — host (10.211.1.1 |
/// 10.211.2.1, forwarding) — remote (10.211.2.2), or its IPv6 version
/// (fd00:211:1::/64 and fd00:211:2::/64, same host numbers).
fn forwarding_line(ipv6: bool) -> RoutedLine {
    if ipv6 {
        RoutedLine::new(LineSpec {
            roles: ["client6", "fwdhost6", "remote6"],
            interfaces: ["c0", "h0", "h1", "r0"],
            addresses: [
                "fd00:211:1::2/64",
                "fd00:211:1::1/64",
                "fd00:211:2::1/64",
                "fd00:211:2::2/64",
            ],
        })
    } else {
        RoutedLine::new(LineSpec {
            roles: ["client", "fwdhost", "remote"],
            interfaces: ["c0", "h0", "h1", "r0"],
            addresses: [
                "10.211.1.2/24",
                "10.211.1.1/24",
                "10.211.2.1/24",
                "10.211.2.2/24",
            ],
        })
    }
}

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 211, 1, 2);
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 211, 1, 1);
const REMOTE_IP: Ipv4Addr = Ipv4Addr::new(10, 211, 2, 2);

fn forwarded_traffic_is_never_steered(kind: BackendKind) {
    require_root();
    let line = forwarding_line(false);
    let (client_ns, host_ns, remote_ns) = (&line.left, &line.middle, &line.right);
    let service = BandService::new("forwarding", IpAddr::V4(Ipv4Addr::UNSPECIFIED), &[]);
    let public_port = service.public.port();
    let config = service.config.clone();
    let mut steering: Box<dyn Steering> = backend(kind, config.clone()).expect("backend");
    // Torn down inside the host namespace (iptables rules live there).
    let _teardown = defer(|| {
        host_ns.run(|| {
            if let Err(e) = backend(kind, config.clone()).and_then(|mut b| b.teardown()) {
                eprintln!("cleanup of {}: {e}", config.cluster);
            }
        })
    });
    let workers = service.steer(
        host_ns,
        steering.as_mut(),
        (
            "install in the host namespace",
            "worker in the host namespace",
        ),
    );
    let remote_server = own_server(
        remote_ns,
        SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), public_port),
        "the remote's own server",
    );

    let (to_remote, to_host) = client_ns.run(|| {
        let client = IpAddr::V4(CLIENT_IP);
        let mut to_remote = Vec::new();
        let mut to_host = Vec::new();
        for i in 0..8 {
            to_remote.push(
                Conversation::open(client, SocketAddr::new(IpAddr::V4(REMOTE_IP), public_port))
                    .and_then(|mut c| c.echo(&format!("remote {i}")).map(|()| c.worker_port())),
            );
            to_host.push(
                Conversation::open(client, SocketAddr::new(IpAddr::V4(HOST_IP), public_port))
                    .and_then(|mut c| c.echo(&format!("host {i}")).map(|()| c.worker_port())),
            );
        }
        (to_remote, to_host)
    });
    let band_port = service.band_port(IpAddr::V4(CLIENT_IP));
    let mut wrong = Vec::new();
    for (i, got) in to_remote.iter().enumerate() {
        match got {
            Ok(port) if *port == public_port => {}
            Ok(port) => wrong.push(format!(
                "connection {i} to the remote server was answered by port {port}"
            )),
            Err(e) => wrong.push(format!("connection {i} to the remote server: {e}")),
        }
    }
    for (i, got) in to_host.iter().enumerate() {
        match got {
            Ok(port) if Some(*port) == band_port => {}
            Ok(port) => wrong.push(format!(
                "connection {i} to the host went to port {port}, expected {band_port:?}"
            )),
            Err(e) => wrong.push(format!("connection {i} to the host: {e}")),
        }
    }
    if kind == BackendKind::Ebpf {
        let steering = &mut steering;
        let counters = host_ns.run(move || steering.counters().expect("counters"));
        if counters.forwarded == 0 {
            wrong.push(format!("no packet counted as forwarded: {counters:?}"));
        }
    }
    remote_ns.run(|| drop(remote_server));
    host_ns.run(|| drop(workers));
    assert_none_wrong("client -> forwarding host -> remote", &wrong);
}

#[test]
fn ebpf_forwarded_traffic_is_never_steered() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    forwarded_traffic_is_never_steered(BackendKind::Ebpf);
}

#[test]
fn iptables_forwarded_traffic_is_never_steered() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    forwarded_traffic_is_never_steered(BackendKind::Iptables);
}

/// A veth enslaved to a bridge, both attached: the client's packets cross
/// the veth's hook and then the bridge's, replies the bridge's and then the
/// veth's. Each connection must be steered once and restored once: it reaches
/// its band's worker and keeps echoing; forged SYNs (which cross both hooks
/// too) still change nothing.
#[test]
fn stacked_hooks_on_a_bridge_steer_once() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let net = BridgedHost::new(
        "brhost",
        "10.212.0.1/24",
        &[Guest {
            role: "brclient",
            interface: "c0",
            port: "h0",
            address: "10.212.0.2/24",
        }],
    );
    let (host, client) = (&net.host, &net.guests[0]);
    let service = BandService::new(
        "bridge",
        IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        &["lo", "h0", "br0"],
    );
    let _teardown = teardown_guard(&ebpf, &service.config);
    let mut steering = ebpf(service.config.clone());
    let workers = service.steer(host, steering.as_mut(), ("install on h0 and br0", "worker"));
    let target = SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(10, 212, 0, 1)),
        service.public.port(),
    );
    let source = IpAddr::V4(Ipv4Addr::new(10, 212, 0, 2));
    let expected = service.band_port(source);
    let errors = client.run(|| {
        let mut errors = Vec::new();
        let mut open = Vec::new();
        for i in 0..8 {
            match Conversation::open(source, target) {
                Ok(conv) if Some(conv.worker_port()) == expected => open.push(conv),
                Ok(conv) => errors.push(format!(
                    "connection {i} reached port {}, expected {expected:?}",
                    conv.worker_port()
                )),
                Err(e) => errors.push(format!("connection {i}: {e}")),
            }
        }
        for conv in open.iter_mut() {
            if let Err(e) = conv.echo("through the bridge") {
                errors.push(format!("echo: {e}"));
            }
        }
        errors.extend(forge_and_check(&mut open, target, "through the bridge"));
        errors
    });
    let steering = &mut steering;
    let counters = host.run(move || steering.counters().expect("counters"));
    host.run(|| drop(workers));
    assert_none_wrong("connections across two attached hooks", &errors);
    // Every connection's SYN was recorded once (no direct entry at the
    // bridge's hook) and every forged SYN to the public or worker port was
    // refused once per hook that saw it with a live flow.
    assert_eq!(counters.new_flows, 8, "{counters:?}");
}

/// A 4-entry flow table, three generations published one after the other
/// with connections open on each (generation 1 is then in neither slot of the
/// steering table), and a flood of new connections evicting every flow entry
/// between rounds: every connection keeps echoing on its own worker.
#[test]
fn evicted_flows_find_every_running_generation() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let ports = Ports::reserve(13);
    let public = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), ports.get(0));
    let mut config = test_config(&cluster_name("threegen"), vec![public]);
    config.flow_entries = 4;
    let _teardown = teardown_guard(&ebpf, &config);
    let mut steering = ebpf(config.clone());
    steering.install().expect("install");
    let _workers = Worker::start_all(ports.slice(1..13).as_slice()).expect("workers");
    let clients = loopback_clients(24);
    let mut open: Vec<(Conversation, u16)> = Vec::new();
    for (generation, first) in [(1usize, 1usize), (2, 5), (3, 9)] {
        let table = SteeringTable::uniform(&[public], 0, &[ports.slice(first..first + 4)]);
        steering
            .publish(&table)
            .unwrap_or_else(|e| panic!("publish generation {generation}: {e}"));
        for &client in &clients[(generation - 1) * 8..generation * 8] {
            let conv = Conversation::open(client, public).expect("open a connection");
            let expected = table.worker_port_for(0, client).expect("a band port");
            assert_eq!(conv.worker_port(), expected, "generation {generation}");
            open.push((conv, expected));
        }
    }
    let flood_source = IpAddr::V4(Ipv4Addr::new(127, 0, 1, 1));
    let mut errors = Vec::new();
    for round in 0..5 {
        for _ in 0..16 {
            if let Err(e) = Conversation::open(flood_source, public) {
                errors.push(format!("flood connection in round {round}: {e}"));
            }
        }
        for (conv, expected) in open.iter_mut() {
            if let Err(e) = conv.echo(&format!("round {round}")) {
                errors.push(format!(
                    "{} (worker {expected}) in round {round}: {e}",
                    conv.source()
                ));
            }
        }
        if !errors.is_empty() {
            break;
        }
    }
    let counters = steering.counters().expect("counters");
    assert_none_wrong("connections of three generations under eviction", &errors);
    assert!(
        counters.flow_fallbacks > 0,
        "the fallback was never needed: {counters:?}"
    );
}

/// An L3 device (tun: no link-layer header) between a client and the host:
/// connections to the host's wildcard service are steered to their band's
/// worker and restored on the way back.
#[test]
fn l3_devices_are_steered() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let net = TunPair::new(
        ("tunclient", "tunhost"),
        ("tun0", "10.213.0.2"),
        ("tun1", "10.213.0.1"),
    );
    let (client, host) = (&net.client, &net.host);
    let service = BandService::new("tun", IpAddr::V4(Ipv4Addr::UNSPECIFIED), &["lo", "tun1"]);
    let _teardown = teardown_guard(&ebpf, &service.config);
    let mut steering = ebpf(service.config.clone());
    let workers = service.steer(host, steering.as_mut(), ("install on tun1", "worker"));
    let source = IpAddr::V4(Ipv4Addr::new(10, 213, 0, 2));
    let target = SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(10, 213, 0, 1)),
        service.public.port(),
    );
    let expected = service.band_port(source);
    let errors = client.run(|| {
        let mut errors = Vec::new();
        for i in 0..4 {
            match Conversation::open(source, target) {
                Ok(mut conv) => {
                    if Some(conv.worker_port()) != expected {
                        errors.push(format!(
                            "connection {i} reached port {}, expected {expected:?}",
                            conv.worker_port()
                        ));
                    }
                    if let Err(e) = conv.echo("over tun") {
                        errors.push(format!("connection {i} echo: {e}"));
                    }
                }
                Err(e) => errors.push(format!("connection {i}: {e}")),
            }
        }
        errors
    });
    host.run(|| drop(workers));
    assert_none_wrong("connections over an L3 device", &errors);
}

/// Path-MTU discovery through a low-MTU hop: client — router (its link
/// towards the client has MTU 1280) — host running the cluster. The
/// worker's large replies are refused by the router with ICMP
/// "fragmentation needed" quoting the public port; translated back to the
/// worker port, they reach the worker's socket, which resends smaller
/// segments: a 64 KiB echo arrives whole.
#[test]
fn icmp_fragmentation_needed_reaches_the_worker() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let line = RoutedLine::new(LineSpec {
        roles: ["mtuclient", "mturouter", "mtuhost"],
        interfaces: ["c0", "r0", "r1", "h0"],
        addresses: [
            "10.214.1.2/24",
            "10.214.1.1/24",
            "10.214.2.1/24",
            "10.214.2.2/24",
        ],
    });
    let (client, router, host) = (&line.left, &line.middle, &line.right);
    router.ip(&["link", "set", "r0", "mtu", "1280"]);
    let service = BandService::new("pmtu", IpAddr::V4(Ipv4Addr::UNSPECIFIED), &["lo", "h0"]);
    let _teardown = teardown_guard(&ebpf, &service.config);
    let mut steering = ebpf(service.config.clone());
    let workers = service.steer(host, steering.as_mut(), ("install on h0", "worker"));
    let source = IpAddr::V4(Ipv4Addr::new(10, 214, 1, 2));
    let target = SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(10, 214, 2, 2)),
        service.public.port(),
    );
    let big = "x".repeat(65_536);
    let result = client.run(|| {
        let mut conv = Conversation::open(source, target)?;
        conv.echo(&big).map(|()| conv.worker_port())
    });
    let steering = &mut steering;
    let counters = host.run(move || steering.counters().expect("counters"));
    host.run(|| drop(workers));
    match result {
        Ok(port) => assert_eq!(Some(port), service.band_port(source)),
        Err(e) => panic!("a 64 KiB echo through a 1280-byte hop failed: {e} ({counters:?})"),
    }
    assert!(
        counters.icmp_translated > 0,
        "no ICMP error was translated: {counters:?}"
    );
}

/// `--ebpf-log`: a rare kernel-side event (a refused take-over of a live
/// connection) shows up in the master's log, forwarded through aya-log.
#[test]
fn ebpf_log_reaches_the_master_log() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let ports = Ports::reserve(1);
    let public = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), ports.get(0));
    let mut spec = ClusterSpec::demo("ebpf", 2, public);
    spec.flags.push("--ebpf-log".into());
    let name = cluster_name("ebpflog");
    // Stopped (everything removed) when dropped, also on failure.
    let cluster = Cluster::start(&name, spec);
    let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 77));
    let stream = connect_from(source, public).expect("connect");
    let client = stream.local_addr().expect("client address");
    raw::send_tcp(client, public, SYN, 0x0bad_0001).expect("forge a SYN");
    let expected = format!("refused a SYN from {}:{}", client.ip(), client.port());
    let logged = wait_for_text(Duration::from_secs(20), &expected, || cluster.master_log(1));
    drop(stream);
    if let Err(log) = logged {
        panic!("the master log does not say {expected:?} within 20 s:\n{log}");
    }
}

/// The IPv6 version of the forwarding topology (ebpf): a cluster on `[::]:P`
/// in a forwarding host must not touch the client's connections to a remote
/// server's port P, and still serves clients that address the host.
#[test]
fn ebpf_forwarded_ipv6_traffic_is_never_steered() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let line = forwarding_line(true);
    let (client, host, remote) = (&line.left, &line.middle, &line.right);
    let service = BandService::new(
        "forwarding6",
        IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        &["lo", "h0", "h1"],
    );
    let public_port = service.public.port();
    let _teardown = teardown_guard(&ebpf, &service.config);
    let mut steering = ebpf(service.config.clone());
    let workers = service.steer(
        host,
        steering.as_mut(),
        (
            "install in the host namespace",
            "worker in the host namespace",
        ),
    );
    let remote_server = own_server(
        remote,
        SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), public_port),
        "the remote's own server",
    );
    let source: IpAddr = "fd00:211:1::2".parse().expect("address");
    let remote_ip: IpAddr = "fd00:211:2::2".parse().expect("address");
    let host_ip: IpAddr = "fd00:211:1::1".parse().expect("address");
    let results = four_to_each(
        client,
        source,
        &[
            ("the remote", SocketAddr::new(remote_ip, public_port)),
            ("the host", SocketAddr::new(host_ip, public_port)),
        ],
    );
    let steering = &mut steering;
    let counters = host.run(move || steering.counters().expect("counters"));
    remote.run(|| drop(remote_server));
    host.run(|| drop(workers));
    let band_port = service.band_port(source);
    let mut wrong = wrong_ports(results, |what| {
        if what == "the remote" {
            Some(public_port)
        } else {
            band_port
        }
    });
    if counters.forwarded == 0 {
        wrong.push(format!("no packet counted as forwarded: {counters:?}"));
    }
    assert_none_wrong("IPv6 client -> forwarding host -> remote", &wrong);
}

/// A bridge with two guests on it (as on a KVM host) and IP forwarding off
/// in the host: a wildcard cluster attached to the bridge and its ports must
/// leave guest-to-guest traffic to port P alone (it is bridged, not routed,
/// so the route lookup alone would say "forwarding disabled"), and still
/// steer the guests' connections to the host.
#[test]
fn bridged_traffic_between_guests_is_never_steered() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let net = BridgedHost::new(
        "kvmhost",
        "10.215.0.1/24",
        &[
            Guest {
                role: "guest1",
                interface: "g1",
                port: "p1",
                address: "10.215.0.2/24",
            },
            Guest {
                role: "guest2",
                interface: "g2",
                port: "p2",
                address: "10.215.0.3/24",
            },
        ],
    );
    let (host, guest1, guest2) = (&net.host, &net.guests[0], &net.guests[1]);
    host.sysctl("net.ipv4.ip_forward", "0");
    let service = BandService::new("kvmbridge", IpAddr::V4(Ipv4Addr::UNSPECIFIED), &[]);
    let public = service.public;
    let _teardown = teardown_guard(&ebpf, &service.config);
    let mut steering = ebpf(service.config.clone());
    let workers = service.steer(
        host,
        steering.as_mut(),
        ("install on every up interface", "worker"),
    );
    let guest_server = own_server(
        guest2,
        SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), public.port()),
        "guest 2's own server",
    );
    let source = IpAddr::V4(Ipv4Addr::new(10, 215, 0, 2));
    let at = |last: u8| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 215, 0, last)), public.port());
    let results = four_to_each(guest1, source, &[("guest 2", at(3)), ("the host", at(1))]);
    guest2.run(|| drop(guest_server));
    host.run(|| drop(workers));
    let band_port = service.band_port(source);
    let wrong = wrong_ports(results, |what| {
        if what == "the host" {
            band_port
        } else {
            Some(public.port())
        }
    });
    assert_none_wrong("guests on a bridge of a non-forwarding host", &wrong);
}
