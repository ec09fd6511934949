//! The ebpf backend with real sockets on `lo`: stickiness, a flip under open
//! connections (also with a deliberately tiny flow table), persistence across
//! the user-side object, the layout check, the netlink fallback, teardown.
//! Also measures the publish time of a 256-band table (`--nocapture`).
//! Run as root: `cargo test -p ipcluster-tests --test ebpf_steering -- --test-threads=1`

mod ebpf_support;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use ebpf_support::{ebpf, leftovers};
use ipcluster::paths::pin_dir;
use ipcluster::steering::ebpf::{AttachMode, EbpfSteering, SteeringMaps};
use ipcluster::steering::{Steering, SteeringConfig, SteeringError, SteeringTable, band_of};
use ipcluster_common::{LAYOUT_VERSION, Meta, map_names};
use ipcluster_tests::client::{Conversation, worker_port_from};
use ipcluster_tests::conformance::{
    assert_none_wrong, echo_across_publish, mismatches, teardown_guard, test_config,
};
use ipcluster_tests::guard::Defer;
use ipcluster_tests::unique::{Ports, cluster_name};
use ipcluster_tests::worker::Worker;
use ipcluster_tests::{loopback_clients, require_root};

/// A cluster on `lo` with `services` public ports on 127.0.0.1 and `workers`
/// more ports, torn down (by a fresh object) when dropped.
struct Cluster {
    config: SteeringConfig,
    ports: Ports,
    services: usize,
    _teardown: Defer<'static>,
}

impl Cluster {
    fn new(what: &str, services: usize, workers: usize, flow_entries: u32) -> Cluster {
        require_root();
        let ports = Ports::reserve(services + workers);
        let listens = (0..services)
            .map(|i| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), ports.get(i)))
            .collect();
        let mut config = test_config(&cluster_name(what), listens);
        config.flow_entries = flow_entries;
        let teardown = teardown_guard(&ebpf, &config);
        Cluster {
            config,
            ports,
            services,
            _teardown: teardown,
        }
    }

    fn public(&self) -> SocketAddr {
        self.config.services[0]
    }

    /// A one-service table of `bands` worker ports from worker port `first`.
    fn table(&self, first: usize, bands: usize) -> SteeringTable {
        let start = self.services + first;
        SteeringTable::uniform(
            &self.config.services[..1],
            0,
            &[self.ports.slice(start..start + bands)],
        )
    }

    fn backend(&self) -> Box<dyn Steering> {
        ebpf(self.config.clone())
    }
}

/// The maps of a cluster, opened from its pins.
fn pinned_maps(cluster: &str) -> SteeringMaps {
    SteeringMaps::open_pinned(&pin_dir(cluster)).expect("open the pinned maps")
}

#[test]
fn sixty_four_clients_three_times_each_reach_their_band() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let cluster = Cluster::new("sticky64", 1, 8, ipcluster_common::DEFAULT_FLOW_ENTRIES);
    let mut steering = cluster.backend();
    assert_eq!(steering.install().expect("install"), None);
    let table = cluster.table(0, 8);
    let _workers = Worker::start_all(&table.services[0].worker_ports).expect("workers");
    steering.publish(&table).expect("publish");
    let wrong = mismatches(&table, 0, &loopback_clients(64), 3);
    assert_none_wrong("64 clients x 3 connections", &wrong);
    let counters = steering.counters().expect("counters");
    assert!(counters.new_flows >= 192, "{counters:?}");
    assert!(counters.steered >= 192 * 3, "{counters:?}");
    assert!(counters.egress_rewrites >= 192 * 2, "{counters:?}");
    assert_eq!(counters.table_misses, 0, "{counters:?}");
    let flows = pinned_maps(&cluster.config.cluster).flows().expect("flows");
    assert!(flows.len() >= 192, "{} flows recorded", flows.len());
    // What an operator sees (`--nocapture`): BTF-typed dumps of the pins.
    let dir = pin_dir(&cluster.config.cluster);
    for map in [map_names::SERVICES, map_names::ACTIVE, map_names::FLOWS] {
        let dump = Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(dir.join(map))
            .output()
            .expect("run bpftool");
        let text = String::from_utf8_lossy(&dump.stdout);
        let head: Vec<&str> = text.lines().take(40).collect();
        println!(
            "$ bpftool map dump pinned {}\n{}",
            dir.join(map).display(),
            head.join("\n")
        );
    }
}

/// 32 long-lived connections echo across a flip to new worker ports: no
/// resets, each stays on its old worker; new connections reach the new ones.
fn flip_under_open_connections(what: &str, flow_entries: u32) -> ipcluster::steering::Counters {
    let cluster = Cluster::new(what, 1, 8, flow_entries);
    let mut steering = cluster.backend();
    steering.install().expect("install");
    let old = cluster.table(0, 4);
    let new = cluster.table(4, 4);
    let _old_workers = Worker::start_all(&old.services[0].worker_ports).expect("old workers");
    let _new_workers = Worker::start_all(&new.services[0].worker_ports).expect("new workers");
    steering.publish(&old).expect("publish the old table");

    let mut open: Vec<Conversation> = loopback_clients(32)
        .into_iter()
        .map(|c| Conversation::open(c, cluster.public()).expect("open a connection"))
        .collect();
    for conv in &open {
        assert_eq!(
            Some(conv.worker_port()),
            old.worker_port_for(0, conv.source())
        );
    }

    let errors = echo_across_publish(steering.as_mut(), &mut open, &new, 10);
    assert_none_wrong("open connections across the flip", &errors);
    assert_none_wrong(
        "new connections after the flip",
        &mismatches(&new, 0, &loopback_clients(64), 1),
    );
    for conv in open.iter_mut() {
        conv.echo("still there").expect("old connection alive");
        let now = conv
            .current_worker_port()
            .expect("old connection answers who serves it");
        assert_eq!(
            Some(now),
            old.worker_port_for(0, conv.source()),
            "{} stays on its old worker",
            conv.source()
        );
    }
    steering.counters().expect("counters")
}

#[test]
fn flip_under_open_connections_keeps_them() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let counters = flip_under_open_connections("flip", ipcluster_common::DEFAULT_FLOW_ENTRIES);
    assert!(counters.flow_hits > 0, "{counters:?}");
}

#[test]
fn flip_with_a_tiny_flow_table_resets_nothing() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    // 4 entries for 32 long-lived connections (and 64 new ones): flows are
    // evicted all the time, so packets take the socket-table fallback.
    let counters = flip_under_open_connections("tinyflip", 4);
    println!("tiny flow table: {counters:?}");
    assert!(
        counters.flow_fallbacks > 0,
        "the fallback was never needed: {counters:?}"
    );
}

/// The worker ports the pinned `worker_ports` map holds, with their public port.
fn worker_port_index(cluster: &str) -> std::collections::BTreeMap<u64, u64> {
    let path = pin_dir(cluster).join(map_names::WORKER_PORTS);
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&path)
        .output()
        .expect("run bpftool map dump");
    assert!(out.status.success(), "bpftool map dump {}", path.display());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    json.as_array()
        .expect("a list of entries")
        .iter()
        .map(|e| {
            let port = e["formatted"]["key"].as_u64();
            let public = e["formatted"]["value"]["public_port"].as_u64();
            match (port, public) {
                (Some(port), Some(public)) => (port, public),
                _ => panic!("unexpected worker_ports entry (no BTF?): {e}"),
            }
        })
        .collect()
}

/// Publishes write each map with one batch call; when the worker-port index
/// is full (every reload brings new worker ports), the batch stops and the
/// rest is written entry by entry after ports nothing uses any more are
/// forgotten. Four generations of 16 services × 256 bands (16,384 ports, the
/// index holds 8,192): every publish succeeds, reads back, and the index
/// holds every port of the table in force with its public port.
#[test]
fn publishes_fill_and_collect_the_worker_port_index() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let cluster = Cluster::new("wpfull", 16, 0, 4096);
    let mut steering = ebpf(cluster.config.clone());
    assert_eq!(steering.install().expect("install"), None);
    for generation in 0..4u16 {
        let ports: Vec<Vec<u16>> = (0..16u16)
            .map(|s| {
                (0..256u16)
                    .map(|b| 20_000 + generation * 4096 + s * 256 + b)
                    .collect()
            })
            .collect();
        let table = SteeringTable::uniform(&cluster.config.services, 0, &ports);
        steering
            .publish(&table)
            .unwrap_or_else(|e| panic!("publish of generation {generation}: {e}"));
        assert_eq!(
            steering.read_table().expect("read back"),
            Some(table.clone()),
            "generation {generation} does not read back"
        );
        let index = worker_port_index(&cluster.config.cluster);
        for (service, route) in table.services.iter().enumerate() {
            for &port in &route.worker_ports {
                assert_eq!(
                    index.get(&u64::from(port)),
                    Some(&u64::from(route.listen.port())),
                    "generation {generation}: worker port {port} of service {service} \
                     missing from the index ({} entries)",
                    index.len()
                );
            }
        }
    }
}

#[test]
fn state_survives_the_object_and_reads_back() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let cluster = Cluster::new("persist", 1, 4, ipcluster_common::DEFAULT_FLOW_ENTRIES);
    let table = cluster.table(0, 4);
    let _workers = Worker::start_all(&table.services[0].worker_ports).expect("workers");
    {
        let mut first = cluster.backend();
        first.install().expect("install");
        first.publish(&table).expect("publish");
    } // dropped, as when a master exits
    let clients = loopback_clients(16);
    assert_none_wrong("without a master", &mismatches(&table, 0, &clients, 1));

    let dir = pin_dir(&cluster.config.cluster);
    for name in map_names::ALL {
        assert!(dir.join(name).exists(), "map {name} is not pinned");
    }
    for link in ["ingress_lo", "egress_lo"] {
        assert!(dir.join(link).exists(), "link {link} is not pinned");
    }
    // BTF makes the dump structured.
    let dump = Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(dir.join(map_names::SERVICES))
        .output()
        .expect("run bpftool");
    let text = String::from_utf8_lossy(&dump.stdout);
    assert!(
        dump.status.success() && text.contains("band_mask") && text.contains("\"port\""),
        "bpftool map dump is not BTF-typed:\n{text}{}",
        String::from_utf8_lossy(&dump.stderr)
    );

    let mut second = cluster.backend();
    assert_eq!(
        second.read_table().expect("read before install"),
        Some(table.clone())
    );
    assert_eq!(second.install().expect("adopt"), Some(table.clone()));
    assert_eq!(
        second.read_table().expect("read after adopt"),
        Some(table.clone())
    );
    assert_none_wrong("after adoption", &mismatches(&table, 0, &clients, 1));
    // Adoption swapped the programs into the same links: still one of each.
    let programs: Vec<_> = ebpf_support::tcx_programs("lo")
        .into_iter()
        .filter(|(_, _, _, maps)| {
            let ids = ebpf_support::cluster_map_ids(&cluster.config.cluster);
            maps.iter().any(|m| ids.contains(m))
        })
        .collect();
    assert_eq!(programs.len(), 2, "{programs:?}");
}

#[test]
fn teardown_removes_links_pins_and_folder() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let cluster = Cluster::new("teardown", 1, 2, ipcluster_common::DEFAULT_FLOW_ENTRIES);
    {
        let mut steering = cluster.backend();
        steering.install().expect("install");
        steering.publish(&cluster.table(0, 2)).expect("publish");
    }
    assert!(!leftovers(&cluster.config.cluster).is_empty());
    // What the kernel holds for this cluster, found from its maps' ids: the
    // checks below must see it while it is installed, or they check nothing.
    let map_ids = ipcluster_tests::bpf_objects::pinned_map_ids(&cluster.config.cluster);
    assert_eq!(map_ids.len(), map_names::ALL.len(), "{map_ids:?}");
    let installed = ipcluster_tests::bpf_objects::leftovers(&map_ids);
    let programs = programs_on_lo_using(&map_ids);
    assert_eq!(programs.len(), 2, "ingress and egress on lo: {programs:?}");
    assert!(
        installed.iter().filter(|l| l.starts_with("link ")).count() >= 2,
        "the tcx links are visible: {installed:?}"
    );

    // As `ipcluster stop` does it: a fresh object.
    cluster.backend().teardown().expect("teardown");
    let left = leftovers(&cluster.config.cluster);
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(!pin_dir(&cluster.config.cluster).exists());
    // No link, program or map of the cluster left in the kernel (freed after an
    // RCU grace period: up to 10 s on a busy machine), and nothing attached to lo.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut kernel_left = ipcluster_tests::bpf_objects::leftovers(&map_ids);
    while !kernel_left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        kernel_left = ipcluster_tests::bpf_objects::leftovers(&map_ids);
    }
    assert!(
        kernel_left.is_empty(),
        "teardown left in the kernel: {kernel_left:?}"
    );
    // (bpftool 7.1's `net show` does not list tcx programs: ask the kernel.)
    let attached: Vec<u32> = ebpf_support::tcx_programs("lo")
        .into_iter()
        .map(|(_, id, _, _)| id)
        .collect();
    for id in &programs {
        assert!(
            !attached.contains(id),
            "program {id} is still attached to lo"
        );
    }
    assert_eq!(cluster.backend().read_table().expect("read"), None);
    cluster.backend().teardown().expect("a second teardown");
}

/// Ids of the loaded programs that use any of `map_ids`, among those attached to lo.
fn programs_on_lo_using(map_ids: &std::collections::BTreeSet<u32>) -> Vec<u32> {
    ebpf_support::tcx_programs("lo")
        .into_iter()
        .filter(|(_, _, _, maps)| maps.iter().any(|m| map_ids.contains(m)))
        .map(|(_, id, _, _)| id)
        .collect()
}

#[test]
fn another_layout_is_refused_with_a_clear_error() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let cluster = Cluster::new("layout", 1, 2, ipcluster_common::DEFAULT_FLOW_ENTRIES);
    cluster.backend().install().expect("install");
    let mut maps = pinned_maps(&cluster.config.cluster);
    maps.write_meta(Meta {
        layout_version: LAYOUT_VERSION + 41,
        flow_entries: ipcluster_common::DEFAULT_FLOW_ENTRIES,
    })
    .expect("pretend another layout");
    drop(maps);
    let err = cluster
        .backend()
        .install()
        .expect_err("another layout must be refused");
    assert!(
        matches!(err, SteeringError::IncompatibleLayout { .. }),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains(&format!("ipcluster stop --name {}", cluster.config.cluster)),
        "{text}"
    );
    assert!(cluster.backend().read_table().is_err());
    cluster
        .backend()
        .teardown()
        .expect("teardown removes it anyway");
    assert!(leftovers(&cluster.config.cluster).is_empty());
}

#[test]
fn bad_tables_and_too_many_services_are_rejected() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let cluster = Cluster::new("reject", 1, 4, ipcluster_common::DEFAULT_FLOW_ENTRIES);
    let mut steering = cluster.backend();
    steering.install().expect("install");
    let good = cluster.table(0, 4);
    steering.publish(&good).expect("publish");

    let mut zero = good.clone();
    zero.services[0].worker_ports[2] = 0;
    assert!(matches!(
        steering.publish(&zero),
        Err(SteeringError::Table(_))
    ));
    let mut missing = good.clone();
    missing.services[0].worker_ports.pop();
    assert!(matches!(
        steering.publish(&missing),
        Err(SteeringError::Table(_))
    ));
    assert_eq!(steering.read_table().expect("read"), Some(good.clone()));

    // Sixteen more services than the table in force leaves room for: the
    // union of the active and the new table must fit the services map.
    let others: Vec<SocketAddr> = (0..16)
        .map(|i| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 1, i + 1)), 8080))
        .collect();
    let ports: Vec<Vec<u16>> = others.iter().map(|_| vec![cluster.ports.get(1)]).collect();
    let crowded = SteeringTable::uniform(&others, 0, &ports);
    let err = steering.publish(&crowded).expect_err("over capacity");
    assert!(matches!(err, SteeringError::OverCapacity { .. }), "{err:?}");
    assert_eq!(steering.read_table().expect("read"), Some(good));

    let mut config = cluster.config.clone();
    config.cluster = cluster_name("reject-config");
    config.services = (0..17)
        .map(|i| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 20_000 + i))
        .collect();
    let err = ebpf(config).install().expect_err("17 listen addresses");
    assert!(matches!(err, SteeringError::OverCapacity { .. }), "{err:?}");
}

#[test]
fn ipv6_loopback_service_is_steered() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let cluster = Cluster::new("ipv6", 0, 3, ipcluster_common::DEFAULT_FLOW_ENTRIES);
    let public = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), cluster.ports.get(0));
    let mut config = cluster.config.clone();
    config.services = vec![public];
    let _guard = teardown_guard(&ebpf, &config);
    let mut steering = ebpf(config);
    steering.install().expect("install");
    let ports = cluster.ports.slice(1..3);
    let table = SteeringTable::uniform(&[public], 0, std::slice::from_ref(&ports));
    let _workers: Vec<Worker> = ports
        .iter()
        .map(|&p| Worker::start_on(SocketAddr::new(public.ip(), p)).expect("worker"))
        .collect();
    steering.publish(&table).expect("publish");
    let expected = ports[band_of(public.ip(), 0, 2) as usize];
    for _ in 0..3 {
        let got = worker_port_from(public.ip(), public).expect("connect over IPv6");
        assert_eq!(got, expected);
    }
}

#[test]
fn wildcard_listen_is_steered() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let cluster = Cluster::new("wildcard", 0, 5, ipcluster_common::DEFAULT_FLOW_ENTRIES);
    let public = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), cluster.ports.get(0));
    let mut config = cluster.config.clone();
    config.services = vec![public];
    let _guard = teardown_guard(&ebpf, &config);
    let mut steering = ebpf(config);
    steering.install().expect("install");
    let table = SteeringTable::uniform(&[public], 0, &[cluster.ports.slice(1..5)]);
    let _workers = Worker::start_all(&cluster.ports.slice(1..5)).expect("workers");
    steering.publish(&table).expect("publish");
    assert_none_wrong("wildcard", &mismatches(&table, 0, &loopback_clients(16), 2));
}

/// On kernels without tcx the backend attaches netlink cls_bpf filters;
/// forced here so the path is covered on a new kernel too. Other clusters may
/// have filters on `lo` at the same time: this test recognises its own by the
/// program ids that use its maps, and removes the `clsact` qdisc only if it
/// was not there before and holds no filter at the end (nobody else's).
#[test]
fn netlink_fallback_attaches_adopts_and_tears_down() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let cluster = Cluster::new("netlink", 1, 4, ipcluster_common::DEFAULT_FLOW_ENTRIES);
    let clsact_before = qdisc_has_clsact("lo");
    let _qdisc = ipcluster_tests::guard::defer(move || {
        let unused = filter_prog_ids("lo", "ingress").is_empty()
            && filter_prog_ids("lo", "egress").is_empty();
        if !clsact_before && unused {
            let _ = Command::new("tc")
                .args(["qdisc", "del", "dev", "lo", "clsact"])
                .status();
        }
    });
    let netlink = |config: SteeringConfig| {
        EbpfSteering::new(config)
            .expect("backend")
            .with_attach_mode(AttachMode::Netlink)
    };
    let table = cluster.table(0, 4);
    let _workers = Worker::start_all(&table.services[0].worker_ports).expect("workers");
    {
        let mut first = netlink(cluster.config.clone());
        first.install().expect("install with netlink");
        first.publish(&table).expect("publish");
    }
    let clients = loopback_clients(16);
    assert_none_wrong("netlink, no master", &mismatches(&table, 0, &clients, 1));
    let dir = pin_dir(&cluster.config.cluster);
    // A symlink whose target is no path: check the link itself.
    assert!(std::fs::symlink_metadata(dir.join("netlink_ingress_lo")).is_ok());
    let map_ids = ipcluster_tests::bpf_objects::pinned_map_ids(&cluster.config.cluster);
    let ours = |direction: &str| -> Vec<u32> {
        let mine = programs_using(&map_ids);
        filter_prog_ids("lo", direction)
            .into_iter()
            .filter(|id| mine.contains(id))
            .collect()
    };
    assert_eq!(ours("ingress").len(), 1, "our ingress filter on lo");
    assert_eq!(ours("egress").len(), 1, "our egress filter on lo");
    assert!(
        ebpf_support::tcx_programs("lo")
            .iter()
            .all(|(_, _, _, maps)| !maps.iter().any(|m| map_ids.contains(m))),
        "netlink mode attached a tcx program too"
    );

    let mut second = netlink(cluster.config.clone());
    assert_eq!(second.install().expect("adopt"), Some(table.clone()));
    assert_none_wrong("netlink, adopted", &mismatches(&table, 0, &clients, 1));
    assert_eq!(ours("ingress").len(), 1, "adoption replaced, not added");
    assert_eq!(ours("egress").len(), 1, "adoption replaced, not added");
    second.teardown().expect("teardown");
    assert!(!dir.exists());
    assert!(ours("ingress").is_empty(), "our ingress filter is left");
    assert!(ours("egress").is_empty(), "our egress filter is left");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut left = ipcluster_tests::bpf_objects::leftovers(&map_ids);
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        left = ipcluster_tests::bpf_objects::leftovers(&map_ids);
    }
    assert!(left.is_empty(), "teardown left in the kernel: {left:?}");
}

fn qdisc_has_clsact(iface: &str) -> bool {
    Command::new("tc")
        .args(["qdisc", "show", "dev", iface])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("clsact"))
        .unwrap_or(false)
}

/// Ids of the loaded programs that use any of `map_ids` (attached or not).
fn programs_using(map_ids: &std::collections::BTreeSet<u32>) -> Vec<u32> {
    aya::programs::loaded_programs()
        .flatten()
        .filter(|p| {
            p.map_ids()
                .ok()
                .flatten()
                .unwrap_or_default()
                .iter()
                .any(|m| map_ids.contains(m))
        })
        .map(|p| p.id())
        .collect()
}

/// Program ids of the tc filters on `iface` in `direction` (`tc -j filter show`).
fn filter_prog_ids(iface: &str, direction: &str) -> Vec<u32> {
    let Ok(out) = Command::new("tc")
        .args(["-j", "filter", "show", "dev", iface, direction])
        .output()
    else {
        return Vec::new();
    };
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let mut ids = Vec::new();
    collect_prog_ids(&json, &mut ids);
    ids
}

/// Every `"prog": {"id": N}` in a `tc -j` dump.
fn collect_prog_ids(value: &serde_json::Value, ids: &mut Vec<u32>) {
    match value {
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_prog_ids(v, ids)),
        serde_json::Value::Object(fields) => {
            for (key, v) in fields {
                if key == "prog"
                    && let Some(id) = v["id"].as_u64().and_then(|id| u32::try_from(id).ok())
                {
                    ids.push(id);
                }
                collect_prog_ids(v, ids);
            }
        }
        _ => {}
    }
}

/// Publish time of a whole 256-band table (idle slot + flip), median of 21.
#[test]
fn measure_publish_of_a_256_band_table() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let cluster = Cluster::new("publish256", 1, 0, ipcluster_common::DEFAULT_FLOW_ENTRIES);
    let mut steering = cluster.backend();
    steering.install().expect("install");
    let tables: Vec<SteeringTable> = (0..2u16)
        .map(|generation| {
            let ports: Vec<u16> = (0..256).map(|b| 30_000 + generation * 1000 + b).collect();
            SteeringTable::uniform(&cluster.config.services, 0, &[ports])
        })
        .collect();
    let mut times: Vec<Duration> = (0..21)
        .map(|i| {
            let table = &tables[i % 2];
            let start = Instant::now();
            steering.publish(table).expect("publish");
            start.elapsed()
        })
        .collect();
    times.sort();
    let median = times[times.len() / 2];
    println!(
        "publish of a 256-band table: median {} µs (min {} µs, max {} µs, 21 runs)",
        median.as_micros(),
        times[0].as_micros(),
        times[times.len() - 1].as_micros()
    );
    assert_eq!(
        steering.read_table().expect("read"),
        Some(tables[0].clone())
    );
    // A figure, printed only (`cargo xtask bench` reports it): the machine is
    // shared, so its timing is no verdict.
}
