//! Helpers shared by the ebpf test files (`mod ebpf_support;` in each): the
//! backend factory and the kernel-side leftover check.

#![allow(dead_code, reason = "each test file uses a different part")]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use aya::maps::MapData;
use aya::programs::{SchedClassifier, TcAttachType};
use ipcluster::paths::pin_dir;
use ipcluster::steering::{BackendKind, Steering, SteeringConfig, backend};
use ipcluster_common::map_names;
use ipcluster_tests::bpf_objects::pin_folder_leftover;

/// The ebpf backend for `config`.
/// Load (verify) the classifier `name` of `ebpf` into the kernel, without attaching it.
pub fn load_classifier<'a>(ebpf: &'a mut aya::Ebpf, name: &str) -> &'a mut SchedClassifier {
    let program: &mut SchedClassifier = ebpf
        .program_mut(name)
        .expect("program in the object")
        .try_into()
        .expect("a classifier");
    program.load().expect("the verifier accepts the program");
    program
}

pub fn ebpf(config: SteeringConfig) -> Box<dyn Steering> {
    backend(BackendKind::Ebpf, config).expect("build the ebpf backend")
}

/// Map ids seen per cluster while its pins existed, so that programs using
/// them are still recognised after the pins are gone.
static MAP_IDS: Mutex<BTreeMap<String, BTreeSet<u32>>> = Mutex::new(BTreeMap::new());

/// Ids of the maps pinned for `cluster` (remembered for later calls).
pub fn cluster_map_ids(cluster: &str) -> BTreeSet<u32> {
    let dir = pin_dir(cluster);
    let mut ids = BTreeSet::new();
    for name in map_names::ALL {
        if let Ok(map) = MapData::from_pin(dir.join(name))
            && let Ok(info) = map.info()
        {
            ids.insert(info.id());
        }
    }
    let mut known = MAP_IDS.lock().unwrap_or_else(|p| p.into_inner());
    let entry = known.entry(cluster.to_owned()).or_default();
    entry.extend(ids);
    entry.clone()
}

/// tcx programs on `iface` (both directions): (direction, id, name, map ids).
pub fn tcx_programs(iface: &str) -> Vec<(&'static str, u32, String, Vec<u32>)> {
    let mut found = Vec::new();
    for (direction, attach_type) in [
        ("ingress", TcAttachType::Ingress),
        ("egress", TcAttachType::Egress),
    ] {
        let (_, programs) =
            SchedClassifier::query_tcx(iface, attach_type).expect("query the tcx programs");
        for program in programs {
            let name = program.name_as_str().unwrap_or("?").to_owned();
            let maps = program.map_ids().ok().flatten().unwrap_or_default();
            found.push((direction, program.id(), name, maps));
        }
    }
    found
}

/// What of `cluster` is still in the kernel: its pin folder and entries, and
/// tcx programs on `lo` that use its maps.
pub fn leftovers(cluster: &str) -> Vec<String> {
    let mut left: Vec<String> = pin_folder_leftover(cluster).into_iter().collect();
    let ids = cluster_map_ids(cluster);
    for (direction, id, name, maps) in tcx_programs("lo") {
        if maps.iter().any(|m| ids.contains(m)) {
            left.push(format!("tcx {direction} program {name} (id {id}) on lo"));
        }
    }
    left
}
