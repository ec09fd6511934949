//! The steering conformance suite: the same behaviour, checked the same way,
//! for every backend. Each function is one test; a backend's test file calls
//! each with its factory, e.g.
//!
//! ```ignore
//! fn iptables(config: SteeringConfig) -> Box<dyn Steering> {
//!     ipcluster::steering::backend(BackendKind::Iptables, config).expect("iptables backend")
//! }
//! #[test]
//! fn sticky_bands() { conformance::sticky_bands(&iptables) }
//! ```
//!
//! Every function uses its own cluster name and ports, clients 127.0.0.2…65
//! against a public service on 127.0.0.1 (interface `lo`), stand-in
//! [`Worker`]s, and a guard that tears the cluster down (with a fresh backend
//! object) even when the test panics. The contract checked, beyond the
//! trait's documentation:
//! - `install()` of a never-installed cluster returns `Ok(None)`;
//! - `read_table()` after `publish(t)` returns exactly `t`, also from a new object;
//! - `teardown()` is idempotent, and afterwards a new object reads `Ok(None)`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ipcluster::steering::{Steering, SteeringConfig, SteeringTable, band_of};

use crate::client::{Conversation, worker_port_from};
use crate::guard::{Defer, defer};
use crate::unique::{Ports, cluster_name};
use crate::worker::Worker;
use crate::{loopback_clients, require_root};

/// Builds a backend object for a config (panicking on error is fine here).
pub type Factory<'a> = &'a dyn Fn(SteeringConfig) -> Box<dyn Steering>;

/// Number of client addresses (127.0.0.2…65) the suite connects from.
pub const CLIENTS: u8 = 64;
/// Connections per client address in the stickiness checks.
pub const ROUNDS: usize = 3;
/// Long-lived connections held open across a flip.
pub const OPEN_CONNECTIONS: usize = 32;

/// The config the suite installs: `services` on `lo`.
pub fn test_config(cluster: &str, services: Vec<SocketAddr>) -> SteeringConfig {
    SteeringConfig {
        cluster: cluster.to_owned(),
        services,
        interfaces: vec!["lo".to_owned()],
        flow_entries: ipcluster_common::DEFAULT_FLOW_ENTRIES,
    }
}

/// A guard that tears the cluster of `config` down with a fresh backend
/// object when dropped (printing, not panicking on, errors).
pub fn teardown_guard<'a>(factory: Factory<'a>, config: &SteeringConfig) -> Defer<'a> {
    let config = config.clone();
    defer(move || {
        let cluster = config.cluster.clone();
        if let Err(e) = factory(config).teardown() {
            eprintln!("cleanup: teardown of cluster {cluster} failed: {e}");
        }
    })
}

/// Connect `rounds` times from each client to service `service` of `table`
/// and list every connection that failed or reached another worker than
/// `band_of` says (empty = all steered right). A wildcard listen is
/// reached through 127.0.0.1 (or ::1).
pub fn mismatches(
    table: &SteeringTable,
    service: usize,
    clients: &[IpAddr],
    rounds: usize,
) -> Vec<String> {
    let route = &table.services[service];
    let target = reachable(route.listen);
    let bands = route.worker_ports.len() as u32;
    let mut wrong = Vec::new();
    for round in 0..rounds {
        for &client in clients {
            let band = band_of(client, table.band_shift, bands);
            let expected = route.worker_ports[band as usize];
            match worker_port_from(client, target) {
                Ok(port) if port == expected => {}
                Ok(port) => wrong.push(format!(
                    "round {round}: {client} (band {band}) -> {target} reached worker {port}, expected {expected}"
                )),
                Err(e) => wrong.push(format!(
                    "round {round}: {client} (band {band}) -> {target} failed: {e}"
                )),
            }
        }
    }
    wrong
}

/// Panic with a readable list unless `wrong` is empty.
pub fn assert_none_wrong(what: &str, wrong: &[String]) {
    assert!(
        wrong.is_empty(),
        "{what}: {} connection(s) went wrong:\n  {}",
        wrong.len(),
        wrong.join("\n  ")
    );
}

/// 64 client addresses × 3 connections each reach the worker of their band
/// (8 bands, shift 0), and the table reads back equal.
pub fn sticky_bands(factory: Factory) {
    let fx = Fixture::new(factory, "sticky", 1, 8);
    let mut steering = factory(fx.config.clone());
    let before = steering.install().expect("install");
    assert_eq!(before, None, "a fresh cluster has no table yet");
    let table = fx.table(0, 0, 8);
    let _workers = Worker::start_all(&table.services[0].worker_ports).expect("start workers");
    publish_and_read_back(steering.as_mut(), &table);
    let wrong = mismatches(&table, 0, &loopback_clients(CLIENTS), ROUNDS);
    assert_none_wrong("sticky bands", &wrong);
}

/// Bands taken above a shift: shift 2 and 4 bands, so 127.0.0.4…7 share a band.
pub fn sticky_bands_with_shift(factory: Factory) {
    let fx = Fixture::new(factory, "shift", 1, 4);
    let mut steering = factory(fx.config.clone());
    steering.install().expect("install");
    let table = fx.table(0, 2, 4);
    let _workers = Worker::start_all(&table.services[0].worker_ports).expect("start workers");
    publish_and_read_back(steering.as_mut(), &table);
    let wrong = mismatches(&table, 0, &loopback_clients(CLIENTS), ROUNDS);
    assert_none_wrong("sticky bands with shift 2", &wrong);
}

/// Two public ports, each with its own worker ports, steered independently.
pub fn two_services(factory: Factory) {
    let fx = Fixture::new(factory, "two", 2, 8);
    let mut steering = factory(fx.config.clone());
    steering.install().expect("install");
    let ports = fx.ports.slice(2..10);
    let table = SteeringTable::uniform(
        &fx.config.services,
        0,
        &[ports[..4].to_vec(), ports[4..].to_vec()],
    );
    let _workers = Worker::start_all(&ports).expect("start workers");
    publish_and_read_back(steering.as_mut(), &table);
    let clients = loopback_clients(CLIENTS);
    assert_none_wrong("first service", &mismatches(&table, 0, &clients, 1));
    assert_none_wrong("second service", &mismatches(&table, 1, &clients, 1));
}

/// Publish `table` and check that the backend reads exactly it back.
pub fn publish_and_read_back(steering: &mut dyn Steering, table: &SteeringTable) {
    steering.publish(table).expect("publish");
    assert_eq!(
        steering.read_table().expect("read_table"),
        Some(table.clone())
    );
}

/// Keep every connection of `open` echoing on a background thread while
/// `table` is published, until `rounds_after` full rounds have passed after the
/// publish (20 s at most). Returns what went wrong: empty means no connection
/// was reset or stalled across the flip.
pub fn echo_across_publish(
    steering: &mut dyn Steering,
    open: &mut [Conversation],
    table: &SteeringTable,
    rounds_after: u64,
) -> Vec<String> {
    let flipped = AtomicBool::new(false);
    let after_flip = AtomicU64::new(0);
    std::thread::scope(|s| {
        let talker = s.spawn(|| {
            let mut errors = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut round = 0u64;
            while after_flip.load(Ordering::Relaxed) < rounds_after && Instant::now() < deadline {
                let was_flipped = flipped.load(Ordering::Acquire);
                for conv in open.iter_mut() {
                    if let Err(e) = conv.echo(&format!("round {round} from {}", conv.source())) {
                        errors.push(format!("{} round {round}: {e}", conv.source()));
                    }
                    // After the flip, ask who answers: still the worker that
                    // greeted the connection.
                    if was_flipped {
                        match conv.current_worker_port() {
                            Ok(port) if port == conv.worker_port() => {}
                            Ok(port) => errors.push(format!(
                                "{} round {round}: answered by worker {port} after the flip, \
                                 opened on worker {}",
                                conv.source(),
                                conv.worker_port()
                            )),
                            Err(e) => errors.push(format!("{} round {round}: {e}", conv.source())),
                        }
                    }
                }
                if was_flipped {
                    after_flip.fetch_add(1, Ordering::Relaxed);
                }
                round += 1;
                if !errors.is_empty() {
                    break;
                }
            }
            if after_flip.load(Ordering::Relaxed) < rounds_after && errors.is_empty() {
                errors.push(format!(
                    "the connections did not finish {rounds_after} rounds after the flip"
                ));
            }
            errors
        });
        std::thread::sleep(Duration::from_millis(50));
        let published = steering.publish(table);
        flipped.store(true, Ordering::Release);
        let mut errors = talker
            .join()
            .unwrap_or_else(|_| vec!["talker panicked".into()]);
        if let Err(e) = published {
            errors.push(format!("publish the new table: {e}"));
        }
        errors
    })
}

/// 32 long-lived connections keep exchanging data while a table with new
/// worker ports is published: zero resets, each stays on its old worker, and
/// new connections after the flip reach the new workers.
pub fn flip_under_open_connections(factory: Factory) {
    let fx = Fixture::new(factory, "flip", 1, 8);
    let mut steering = factory(fx.config.clone());
    steering.install().expect("install");
    let old = fx.table(0, 0, 4);
    let new = fx.table(4, 0, 4);
    let _old_workers = Worker::start_all(&old.services[0].worker_ports).expect("old workers");
    let _new_workers = Worker::start_all(&new.services[0].worker_ports).expect("new workers");
    steering.publish(&old).expect("publish the old table");

    let clients = loopback_clients(OPEN_CONNECTIONS as u8);
    let mut open: Vec<Conversation> = clients
        .iter()
        .map(|&c| Conversation::open(c, fx.public()).expect("open a long-lived connection"))
        .collect();
    for conv in &open {
        let expected = old.worker_port_for(0, conv.source());
        assert_eq!(
            Some(conv.worker_port()),
            expected,
            "{} before the flip",
            conv.source()
        );
    }

    let errors = echo_across_publish(steering.as_mut(), &mut open, &new, 5);
    assert_none_wrong("open connections across the flip", &errors);

    assert_none_wrong(
        "new connections after the flip",
        &mismatches(&new, 0, &loopback_clients(CLIENTS), 1),
    );
    // The old connections still talk to their old workers.
    for conv in open.iter_mut() {
        conv.echo("after the new connections")
            .expect("old connection still alive");
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
}

/// Steering outlives the user-side object: after it is dropped traffic is
/// still steered, and a new object's `install()` and `read_table()` return
/// the same table, and it can publish the next one.
pub fn survives_drop_and_reads_back(factory: Factory) {
    let fx = Fixture::new(factory, "adopt", 1, 8);
    let table = fx.table(0, 0, 4);
    let next = fx.table(4, 0, 4);
    let _workers = Worker::start_all(&fx.ports.slice(1..9)).expect("start workers");
    {
        let mut first = factory(fx.config.clone());
        first.install().expect("install");
        first.publish(&table).expect("publish");
    }
    let clients = loopback_clients(CLIENTS);
    assert_none_wrong(
        "after the object was dropped",
        &mismatches(&table, 0, &clients, 1),
    );

    let mut second = factory(fx.config.clone());
    assert_eq!(
        second.read_table().expect("read_table"),
        Some(table.clone())
    );
    assert_eq!(
        second.install().expect("install again"),
        Some(table.clone())
    );
    assert_eq!(
        second.read_table().expect("read_table"),
        Some(table.clone())
    );
    assert_none_wrong("after adoption", &mismatches(&table, 0, &clients, 1));

    second
        .publish(&next)
        .expect("publish from the adopting object");
    drop(second);
    let third = factory(fx.config.clone());
    assert_eq!(third.read_table().expect("read_table"), Some(next.clone()));
    assert_none_wrong("after the next publish", &mismatches(&next, 0, &clients, 1));
}

/// `set_band` moves one band and leaves the others.
pub fn set_band_moves_one_band(factory: Factory) {
    let fx = Fixture::new(factory, "setband", 1, 5);
    let mut steering = factory(fx.config.clone());
    steering.install().expect("install");
    let table = fx.table(0, 0, 4);
    let _workers = Worker::start_all(&fx.ports.slice(1..6)).expect("start workers");
    steering.publish(&table).expect("publish");
    let moved_to = fx.ports.get(5);
    steering.set_band(0, 2, moved_to).expect("set_band");
    let mut expected = table.clone();
    expected.set_band(0, 2, moved_to).expect("test table");
    assert_eq!(
        steering.read_table().expect("read_table"),
        Some(expected.clone())
    );
    assert_none_wrong(
        "after set_band",
        &mismatches(&expected, 0, &loopback_clients(CLIENTS), 1),
    );
    assert!(
        steering.set_band(0, 4, moved_to).is_err(),
        "band 4 of 4 does not exist"
    );
    assert!(
        steering.set_band(1, 0, moved_to).is_err(),
        "service 1 does not exist"
    );
}

/// Publishing an invalid table fails and leaves the previous table in force.
pub fn invalid_publish_keeps_previous(factory: Factory) {
    let fx = Fixture::new(factory, "invalid", 1, 4);
    let mut steering = factory(fx.config.clone());
    steering.install().expect("install");
    let table = fx.table(0, 0, 4);
    let _workers = Worker::start_all(&table.services[0].worker_ports).expect("start workers");
    steering.publish(&table).expect("publish");

    let mut zero_port = table.clone();
    zero_port.services[0].worker_ports[1] = 0;
    let mut three_bands = table.clone();
    three_bands.services[0].worker_ports.truncate(3);
    for bad in [zero_port, three_bands] {
        assert!(
            steering.publish(&bad).is_err(),
            "publish({bad:?}) must fail"
        );
        assert_eq!(
            steering.read_table().expect("read_table"),
            Some(table.clone())
        );
    }
    assert_none_wrong(
        "after failed publishes",
        &mismatches(&table, 0, &loopback_clients(CLIENTS), 1),
    );
}

/// Teardown removes everything: `leftovers(cluster)` (the backend-specific
/// check: rules, pins, links… that still name the cluster) is empty, a new
/// object reads no table, the public port is no longer steered, and a
/// second teardown succeeds.
pub fn teardown_leaves_nothing(factory: Factory, leftovers: &dyn Fn(&str) -> Vec<String>) {
    let fx = Fixture::new(factory, "teardown", 1, 4);
    let mut steering = factory(fx.config.clone());
    steering.install().expect("install");
    let table = fx.table(0, 0, 4);
    let _workers = Worker::start_all(&table.services[0].worker_ports).expect("start workers");
    steering.publish(&table).expect("publish");
    let clients = loopback_clients(8);
    assert_none_wrong("before teardown", &mismatches(&table, 0, &clients, 1));
    assert!(
        !leftovers(&fx.config.cluster).is_empty(),
        "the leftover check finds nothing even while the cluster is installed: it checks the wrong thing"
    );

    steering.teardown().expect("teardown");
    let left = leftovers(&fx.config.cluster);
    assert!(left.is_empty(), "teardown left:\n  {}", left.join("\n  "));
    assert_eq!(
        factory(fx.config.clone()).read_table().expect("read_table"),
        None
    );
    for &client in &clients {
        assert!(
            worker_port_from(client, fx.public()).is_err(),
            "{client} still reached a worker through the public port after teardown"
        );
    }
    steering.teardown().expect("a second teardown");
    factory(fx.config.clone())
        .teardown()
        .expect("teardown by a new object");
}

/// One test's cluster: a unique name, `services` public ports on 127.0.0.1
/// (ports 0..services), `workers` worker ports after them, and the teardown guard.
struct Fixture<'f> {
    config: SteeringConfig,
    ports: Ports,
    services: usize,
    _teardown: Defer<'f>,
}

impl<'f> Fixture<'f> {
    fn new(factory: Factory<'f>, what: &str, services: usize, workers: usize) -> Fixture<'f> {
        require_root();
        let ports = Ports::reserve(services + workers);
        let listens = (0..services)
            .map(|i| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), ports.get(i)))
            .collect();
        let config = test_config(&cluster_name(what), listens);
        let teardown = teardown_guard(factory, &config);
        Fixture {
            config,
            ports,
            services,
            _teardown: teardown,
        }
    }

    /// The first public address.
    fn public(&self) -> SocketAddr {
        self.config.services[0]
    }

    /// A one-service table with `bands` worker ports starting at worker port `first`.
    fn table(&self, first: usize, band_shift: u8, bands: usize) -> SteeringTable {
        let start = self.services + first;
        SteeringTable::uniform(
            &self.config.services[..1],
            band_shift,
            &[self.ports.slice(start..start + bands)],
        )
    }
}

/// Where a client connects to reach `listen` (wildcards through loopback).
fn reachable(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), listen.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST), listen.port())
        }
        _ => listen,
    }
}
