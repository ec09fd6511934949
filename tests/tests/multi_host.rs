//! More than one host (docs/multi-host.md): clients reach a service address
//! held by two hosts through a router; each host runs its own ipcluster
//! master (ebpf backend on the host's interface). Checked end to end with real
//! TCP connections from many client addresses:
//!
//! - behind an ECMP route with the L3 hash, every client stays on one host and
//!   one worker, and each host's clients spread over all of its bands, also
//!   across a reload of one host;
//! - behind a front that splits clients by the lowest address bit, each host
//!   serves a single band without `--band-shift` (the failure mode), and all
//!   of its bands with `--band-shift 1`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use ipcluster::steering::band_of;
use ipcluster_tests::cluster::demo_get;
use ipcluster_tests::multihost::{Front, HostCluster, SERVICE_ADDR, Topology};
use ipcluster_tests::unique::{Ports, cluster_name};

/// Requests per client address.
const ROUNDS: usize = 3;

/// Where one client's requests landed.
#[derive(Debug)]
struct Landing {
    client: IpAddr,
    /// 0 = host A, 1 = host B.
    host: usize,
    band: u32,
}

/// Send `ROUNDS` requests from every client address; check that each client
/// always reached the same live worker of one host, that the worker saw the
/// client's own address, and that the band is the one `band_shift` gives.
fn survey(
    topology: &Topology,
    listen: SocketAddr,
    hosts: &[HostCluster; 2],
    band_shift: u8,
) -> Vec<Landing> {
    // pid → (host, band) of every live worker.
    let mut owner: BTreeMap<i32, (usize, u32)> = BTreeMap::new();
    for (h, cluster) in hosts.iter().enumerate() {
        for (band, pid) in cluster.live_pids() {
            owner.insert(pid, (h, band));
        }
    }
    let bands = hosts[0].workers;
    let addrs = topology.client_addrs().to_vec();
    let replies = topology.clients.run(|| {
        let mut replies = Vec::new();
        for _ in 0..ROUNDS {
            for &addr in &addrs {
                replies.push((addr, demo_get(addr, listen)));
            }
        }
        replies
    });
    let mut by_client: BTreeMap<IpAddr, BTreeSet<i32>> = BTreeMap::new();
    let mut failures = Vec::new();
    for (addr, reply) in replies {
        match reply {
            Ok(reply) => {
                assert!(
                    reply.client.starts_with(&format!("{addr}:")),
                    "the worker saw {} for client {addr}: the address must arrive untouched",
                    reply.client
                );
                assert_eq!(
                    reply.band,
                    band_of(addr, band_shift, bands),
                    "client {addr} reached band {} (shift {band_shift})",
                    reply.band
                );
                by_client.entry(addr).or_default().insert(reply.pid);
            }
            Err(e) => failures.push(format!("{addr}: {e}")),
        }
    }
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    by_client
        .into_iter()
        .map(|(client, pids)| {
            assert_eq!(
                pids.len(),
                1,
                "client {client} reached several workers: {pids:?} (owners {owner:?})"
            );
            let pid = *pids.first().expect("one pid");
            let &(host, band) = owner
                .get(&pid)
                .unwrap_or_else(|| panic!("client {client} reached pid {pid}, not a live worker of either host ({owner:?})"));
            Landing { client, host, band }
        })
        .collect()
}

/// Bands seen on each host.
fn bands_per_host(landings: &[Landing]) -> [BTreeSet<u32>; 2] {
    let mut seen = [BTreeSet::new(), BTreeSet::new()];
    for l in landings {
        seen[l.host].insert(l.band);
    }
    seen
}

fn start_hosts(
    topology: &Topology,
    listen: SocketAddr,
    workers: u32,
    flags: &[&str],
) -> [HostCluster; 2] {
    [
        HostCluster::start(
            &topology.hosts[0],
            &cluster_name("mh-a"),
            workers,
            listen,
            flags,
        ),
        HostCluster::start(
            &topology.hosts[1],
            &cluster_name("mh-b"),
            workers,
            listen,
            flags,
        ),
    ]
}

#[test]
fn ecmp_keeps_each_client_on_one_host_and_one_worker() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let topology = Topology::new(Front::EcmpL3Hash, 64);
    let ports = Ports::reserve(1);
    let listen = SocketAddr::new(IpAddr::V4(SERVICE_ADDR), ports.get(0));
    let mut hosts = start_hosts(&topology, listen, 4, &[]);

    let landings = survey(&topology, listen, &hosts, 0);
    assert_eq!(landings.len(), 64);
    let per_host = [0, 1].map(|h| landings.iter().filter(|l| l.host == h).count());
    let bands = bands_per_host(&landings);
    eprintln!("ECMP: clients per host {per_host:?}, bands per host {bands:?}");
    assert!(
        per_host.iter().all(|&n| n > 0),
        "the ECMP route sent every client to one host: {per_host:?}"
    );
    let all: BTreeSet<u32> = (0..4).collect();
    for (h, seen) in bands.iter().enumerate() {
        assert_eq!(
            seen, &all,
            "host {h}'s clients do not cover all its bands (the L3 hash is independent of the low bits)"
        );
    }
    // A second survey finds every client where it was: the path and the band hold.
    let again = survey(&topology, listen, &hosts, 0);
    for (first, second) in landings.iter().zip(&again) {
        assert_eq!(
            (first.client, first.host, first.band),
            (second.client, second.host, second.band),
            "a client moved"
        );
    }

    // Reloading host A changes its workers, not the hosts' clients: the front
    // never sees a reload. New connections reach generation 2 of host A.
    let before = hosts[0].live_pids();
    hosts[0].reload();
    let after_pids = hosts[0].live_pids();
    assert!(
        before.iter().all(|p| !after_pids.contains(p)),
        "host A's live workers are new after the reload: {before:?} → {after_pids:?}"
    );
    let after = survey(&topology, listen, &hosts, 0);
    for (first, later) in landings.iter().zip(&after) {
        assert_eq!(
            (first.client, first.host, first.band),
            (later.client, later.host, later.band),
            "a client moved when host A was reloaded"
        );
    }
}

#[test]
fn low_bit_front_leaves_one_band_per_host_without_band_shift() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let topology = Topology::new(Front::LowBit, 32);
    let ports = Ports::reserve(1);
    let listen = SocketAddr::new(IpAddr::V4(SERVICE_ADDR), ports.get(0));
    let parity = |l: &Landing| match l.client {
        IpAddr::V4(v4) => usize::from(v4.octets()[3] & 1),
        IpAddr::V6(_) => unreachable!("IPv4 clients only"),
    };

    // Start both hosts with `flags`, survey every client, check that the front
    // sent it by the parity of its address; the bands each host served.
    let bands_per_host_with = |flags: &[&str], band_shift: u8| {
        let hosts = start_hosts(&topology, listen, 2, flags);
        let landings = survey(&topology, listen, &hosts, band_shift);
        for l in &landings {
            assert_eq!(
                l.host,
                parity(l),
                "the front sends {} to host {}",
                l.client,
                l.host
            );
        }
        bands_per_host(&landings)
    };

    // Without --band-shift the hosts take the band from the same bit the front
    // used: host A sees only even clients (band 0), host B only odd ones (band 1).
    let bands = bands_per_host_with(&[], 0);
    eprintln!("low-bit front, --band-shift 0: bands per host {bands:?}");
    assert_eq!(bands, [BTreeSet::from([0]), BTreeSet::from([1])]);

    // --band-shift 1 skips the bit the front used: every band of each host serves.
    let bands = bands_per_host_with(&["--band-shift", "1"], 1);
    eprintln!("low-bit front, --band-shift 1: bands per host {bands:?}");
    assert_eq!(bands, [BTreeSet::from([0, 1]), BTreeSet::from([0, 1])]);
}
