//! Helpers shared by the sk-lookup test files (`mod sk_lookup_support;`): a
//! backend factory whose objects register this test process's listening
//! sockets (the suite's stand-in workers live here) before every publish,
//! through the backend's own `pidfd_getfd` path, and the leftover check.

#![allow(dead_code, reason = "each test file uses a different part")]

use std::collections::BTreeSet;

use aya::maps::MapData;
use aya::programs::links::LinkType;
use aya::programs::{loaded_links, loaded_programs};
use ipcluster::paths::pin_dir;
use ipcluster::steering::{
    BackendKind, Counters, Steering, SteeringConfig, SteeringError, SteeringTable, WorkerListener,
    backend,
};
use ipcluster_common::sk_lookup::MAPS;
use ipcluster_tests::bpf_objects::pin_folder_leftover;

/// Inodes of the LISTEN sockets on `port` in this thread's network namespace
/// (/proc/thread-self/net/tcp and tcp6; state 0A is LISTEN). Not /proc/net:
/// that is the main thread's namespace, and the test runs in its own.
pub fn listening_inodes(port: u16) -> Vec<u64> {
    let mut inodes = Vec::new();
    for table in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 10 || fields[3] != "0A" {
                continue;
            }
            let local_port = fields[1]
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port)
                && let Ok(inode) = fields[9].parse::<u64>()
            {
                inodes.push(inode);
            }
        }
    }
    inodes
}

/// The listener of this process on `port`, as the master would describe it.
pub fn own_listener(port: u16) -> WorkerListener {
    WorkerListener {
        pid: std::process::id() as i32,
        holders: vec![std::process::id() as i32],
        port,
        inodes: listening_inodes(port),
    }
}

/// The sk-lookup backend, registering this process's listeners on the
/// worker ports of every table before it publishes it.
pub struct Registering(pub Box<dyn Steering>);

impl Registering {
    fn register_table(&mut self, table: &SteeringTable) -> Result<(), SteeringError> {
        for route in &table.services {
            for &port in &route.worker_ports {
                let listener = own_listener(port);
                // Ports without a listener here (invalid tables, port 0) are
                // left to the backend's own checks.
                if port != 0 && !listener.inodes.is_empty() {
                    self.0.register_listener(&listener)?;
                }
            }
        }
        Ok(())
    }
}

impl Steering for Registering {
    fn kind(&self) -> BackendKind {
        self.0.kind()
    }
    fn install(&mut self) -> Result<Option<SteeringTable>, SteeringError> {
        self.0.install()
    }
    fn publish(&mut self, table: &SteeringTable) -> Result<(), SteeringError> {
        if table.validate().is_ok() {
            self.register_table(table)?;
        }
        self.0.publish(table)
    }
    fn read_table(&self) -> Result<Option<SteeringTable>, SteeringError> {
        self.0.read_table()
    }
    fn counters(&self) -> Result<Counters, SteeringError> {
        self.0.counters()
    }
    fn teardown(&mut self) -> Result<(), SteeringError> {
        self.0.teardown()
    }
    fn register_listener(&mut self, listener: &WorkerListener) -> Result<bool, SteeringError> {
        self.0.register_listener(listener)
    }
}

/// The plain sk-lookup backend for `config`.
pub fn plain(config: SteeringConfig) -> Box<dyn Steering> {
    backend(BackendKind::SkLookup, config).expect("build the sk-lookup backend")
}

/// The sk-lookup backend that registers this process's listeners on publish.
pub fn sk_lookup(config: SteeringConfig) -> Box<dyn Steering> {
    Box::new(Registering(plain(config)))
}

/// Ids of the maps pinned for `cluster` now.
fn cluster_map_ids(cluster: &str) -> BTreeSet<u32> {
    let dir = pin_dir(cluster);
    MAPS.iter()
        .filter_map(|name| MapData::from_pin(dir.join(name)).ok())
        .filter_map(|map| map.info().ok().map(|i| i.id()))
        .collect()
}

/// Ids of the maps used by the programs of every attached netns (sk_lookup) link.
fn netns_links() -> Vec<(u32, u32, Vec<u32>)> {
    let programs: Vec<(u32, Vec<u32>)> = loaded_programs()
        .filter_map(Result::ok)
        .map(|p| (p.id(), p.map_ids().ok().flatten().unwrap_or_default()))
        .collect();
    loaded_links()
        .filter_map(Result::ok)
        .filter(|l| l.link_type().is_ok_and(|t| t == LinkType::Netns))
        .map(|l| {
            let maps = programs
                .iter()
                .find(|(id, _)| *id == l.program_id())
                .map(|(_, m)| m.clone())
                .unwrap_or_default();
            (l.id(), l.program_id(), maps)
        })
        .collect()
}

/// What of `cluster` is still in the kernel: its pin folder and entries, and
/// sk_lookup links whose program uses its maps. Map ids are remembered from
/// the first call (made while the cluster is installed).
pub fn leftovers_with(ids: &std::sync::Mutex<BTreeSet<u32>>) -> impl Fn(&str) -> Vec<String> {
    move |cluster: &str| {
        let mut known = ids.lock().unwrap_or_else(|p| p.into_inner());
        known.extend(cluster_map_ids(cluster));
        let mut left: Vec<String> = pin_folder_leftover(cluster).into_iter().collect();
        for (link, program, maps) in netns_links() {
            if maps.iter().any(|m| known.contains(m)) {
                left.push(format!("sk_lookup link {link} (program {program})"));
            }
        }
        left
    }
}

/// The sk_lookup links of `cluster` attached now (by its pinned maps).
pub fn attached_links(cluster: &str) -> Vec<u32> {
    let ids = cluster_map_ids(cluster);
    netns_links()
        .into_iter()
        .filter(|(_, _, maps)| maps.iter().any(|m| ids.contains(m)))
        .map(|(link, _, _)| link)
        .collect()
}
