//! The kernel objects of one cluster's eBPF steering, found from the kernel
//! itself (not from the pin folder, which a buggy teardown could remove while
//! leaving programs attached): its maps are the ones pinned under
//! `/sys/fs/bpf/ipcluster/<name>/` while it runs; its programs are the loaded
//! programs that use any of those maps; its links (tcx) and netlink filters
//! hold those programs, so a link or filter left behind shows up as a program
//! left behind, and the link is named too.
//!
//! Map ids are unique for the kernel's uptime (never reused soon), so ids
//! remembered while the cluster ran identify its objects after its pins are gone.

use std::collections::BTreeSet;

use aya::maps::MapData;
use ipcluster::paths::pin_dir;
use ipcluster_common::map_names;

/// Ids of the maps pinned for `cluster` right now (empty without pins, e.g.
/// for the iptables backend).
pub fn pinned_map_ids(cluster: &str) -> BTreeSet<u32> {
    let dir = pin_dir(cluster);
    map_names::ALL
        .iter()
        .filter_map(|name| MapData::from_pin(dir.join(name)).ok())
        .filter_map(|map| map.info().ok().map(|info| info.id()))
        .collect()
}

/// `cluster`'s pin folder and the names in it, when the folder is still there.
pub fn pin_folder_leftover(cluster: &str) -> Option<String> {
    let dir = pin_dir(cluster);
    if !dir.exists() {
        return None;
    }
    let names: Vec<String> = std::fs::read_dir(&dir)
        .map(|r| {
            r.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    Some(format!(
        "pin folder {} ({})",
        dir.display(),
        names.join(", ")
    ))
}

/// Everything still in the kernel that belongs to the maps `map_ids`: the maps
/// themselves, programs that use them, links that hold those programs.
/// Described for a failure message; empty = nothing left.
pub fn leftovers(map_ids: &BTreeSet<u32>) -> Vec<String> {
    let mut left = Vec::new();
    if map_ids.is_empty() {
        return left;
    }
    for map in aya::maps::loaded_maps().flatten() {
        if map_ids.contains(&map.id()) {
            left.push(format!(
                "map {} (id {})",
                map.name_as_str().unwrap_or("?"),
                map.id()
            ));
        }
    }
    let mut programs = BTreeSet::new();
    for program in aya::programs::loaded_programs().flatten() {
        let maps = program.map_ids().ok().flatten().unwrap_or_default();
        if maps.iter().any(|m| map_ids.contains(m)) {
            programs.insert(program.id());
            left.push(format!(
                "program {} (id {}, maps {maps:?})",
                program.name_as_str().unwrap_or("?"),
                program.id()
            ));
        }
    }
    for link in aya::programs::loaded_links().flatten() {
        if programs.contains(&link.program_id()) {
            left.push(format!(
                "link id {} of program {}",
                link.id(),
                link.program_id()
            ));
        }
    }
    left
}
