//! The cluster's bpffs folder `/sys/fs/bpf/ipcluster/<cluster>/`: mounting
//! bpffs, checking the layout of pinned maps before anything reuses them,
//! creating the folder atomically, and removing it.
//!
//! Folder content: one pin per map (named as in `ipcluster_common::map_names`),
//! `ingress_<ifname>` / `egress_<ifname>` pinned tcx links, and on kernels
//! without tcx `netlink_<ingress|egress>_<ifname>` symlinks whose target
//! `<priority>:<handle>` finds the cls_bpf filter again (bpffs holds no
//! regular files, but it holds symlinks).

use std::io;
use std::path::{Path, PathBuf};

use aya::maps::{MapData, MapType};
use ipcluster_common::{
    BandShape, FlowKey, FlowValue, LAYOUT_VERSION, META_INDEX, Meta, ServiceKey, ServiceValue,
    WorkerPortValue, map_names,
};
use nix::mount::{MsFlags, mount};
use nix::sys::statfs::{BPF_FS_MAGIC, statfs};

use super::bpf_error;
use crate::paths::{BPFFS, PIN_ROOT};
use crate::steering::SteeringError;

/// Pin-name prefixes of tcx links and of netlink filter records.
pub const INGRESS_LINK: &str = "ingress_";
pub const EGRESS_LINK: &str = "egress_";
pub const NETLINK_RECORD: &str = "netlink_";
/// Temporary folders are `~tmp~<pid>~<cluster>` until renamed into place.
const TMP_PREFIX: &str = "~tmp~";

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> SteeringError {
    let what = what.into();
    move |source| SteeringError::Io { what, source }
}

/// Mount bpffs on /sys/fs/bpf unless it is there already.
pub fn ensure_bpffs() -> Result<(), SteeringError> {
    let mounted = statfs(BPFFS).is_ok_and(|fs| fs.filesystem_type() == BPF_FS_MAGIC);
    if mounted {
        return Ok(());
    }
    log::info!("bpffs is not mounted on {BPFFS}; mounting it (mode 0700)");
    // Closed to others: the pins steer the cluster's traffic.
    mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0700"),
    )
    .map_err(|errno| SteeringError::Io {
        what: format!("mounting bpffs on {BPFFS} (needs root)"),
        source: io::Error::from(errno),
    })
}

/// The root folder of all clusters' pins, created when missing; refused
/// unless root owns it and nobody else may write in it.
pub fn ensure_pin_root() -> Result<PathBuf, SteeringError> {
    let root = PathBuf::from(PIN_ROOT);
    match crate::master::files::ensure_dir(&root) {
        Ok(_) => Ok(root),
        Err(crate::master::files::DirError::Io { path, source }) => Err(SteeringError::Io {
            what: format!("creating {path}"),
            source,
        }),
        Err(e) => Err(SteeringError::Io {
            what: e.to_string(),
            source: io::Error::from(io::ErrorKind::PermissionDenied),
        }),
    }
}

/// The pin folder of `cluster`, refused when the name breaks the cluster-name
/// rule (both kernel backends pin under it).
pub fn cluster_pin_dir(cluster: &str) -> Result<PathBuf, SteeringError> {
    let cluster = crate::cluster_name::ClusterName::new(cluster)?;
    Ok(crate::paths::pin_dir(&cluster))
}

/// The error for a cluster whose pin folder holds no maps to steer with.
pub fn not_installed(cluster: &str, dir: &Path) -> SteeringError {
    SteeringError::NotInstalled {
        cluster: cluster.to_owned(),
        path: dir.display().to_string(),
    }
}

/// Refuse more listen addresses than the service map holds.
pub fn check_service_count(count: usize) -> Result<(), SteeringError> {
    if count > ipcluster_common::MAX_SERVICES as usize {
        return Err(SteeringError::OverCapacity {
            what: format!("{count} listen addresses"),
            count,
            capacity: ipcluster_common::MAX_SERVICES,
        });
    }
    Ok(())
}

/// What a pin folder holds, judged before any map is reused.
#[derive(Debug)]
pub enum Existing {
    /// No folder (or an empty one): start fresh.
    Nothing,
    /// Every map of this binary's layout, with its `meta`.
    Compatible(Meta),
}

/// A pinned map's expected kernel shape: (name, type, key size, value size).
pub type MapShape = (&'static str, MapType, usize, usize);

/// The expected kernel shape of each pinned map: (name, type, key size, value
/// size). The first four (`meta`, `services`, `steering`, `active`) are the
/// steering table, which the sk-lookup backend pins too.
pub fn expected_maps() -> [MapShape; 10] {
    use std::mem::size_of;
    [
        (map_names::META, MapType::Array, 4, size_of::<Meta>()),
        (
            map_names::SERVICES,
            MapType::Hash,
            size_of::<ServiceKey>(),
            size_of::<ServiceValue>(),
        ),
        (map_names::STEERING, MapType::Array, 4, 4),
        (map_names::ACTIVE, MapType::Array, 4, 4),
        (
            map_names::FLOWS,
            MapType::LruHash,
            size_of::<FlowKey>(),
            size_of::<FlowValue>(),
        ),
        (
            map_names::WORKER_PORTS,
            MapType::Hash,
            4,
            size_of::<WorkerPortValue>(),
        ),
        (map_names::COUNTERS, MapType::PerCpuArray, 4, 8),
        (map_names::PORTS, MapType::Array, 4, 4),
        (map_names::HISTORY, MapType::Array, 4, 4),
        (
            map_names::HISTORY_SHAPES,
            MapType::Array,
            4,
            size_of::<BandShape>(),
        ),
    ]
}

/// Names of the entries of `dir` (empty when it does not exist).
pub fn entries(dir: &Path) -> Result<Vec<String>, SteeringError> {
    let read = match std::fs::read_dir(dir) {
        Ok(read) => read,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(format!("listing {}", dir.display()))(e)),
    };
    let mut names = Vec::new();
    for entry in read {
        let entry = entry.map_err(io_error(format!("listing {}", dir.display())))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// Check the folder of `cluster` before reusing anything in it: the `meta`
/// map must carry this binary's layout version, and every map must have the
/// type and sizes this binary expects.
pub fn check_layout(cluster: &str, dir: &Path) -> Result<Existing, SteeringError> {
    check_layout_of(cluster, dir, &expected_maps())
}

/// [`check_layout`] against another backend's list of maps.
pub fn check_layout_of(
    cluster: &str,
    dir: &Path,
    expected: &[MapShape],
) -> Result<Existing, SteeringError> {
    let names = entries(dir)?;
    if names.is_empty() {
        return Ok(Existing::Nothing);
    }
    let incompatible = |found: String| SteeringError::IncompatibleLayout {
        cluster: cluster.to_owned(),
        path: dir.display().to_string(),
        found,
        expected: LAYOUT_VERSION,
    };
    if !names.iter().any(|n| n == map_names::META) {
        return Err(incompatible(format!(
            "unknown (no meta map among {})",
            names.join(", ")
        )));
    }
    let mut meta = None;
    for &(name, map_type, key_size, value_size) in expected {
        let path = dir.join(name);
        if !path.exists() {
            return Err(incompatible(format!("incomplete (map {name} is missing)")));
        }
        let data = MapData::from_pin(&path)
            .map_err(|e| bpf_error(format!("opening pinned map {}", path.display()), e))?;
        let info = data
            .info()
            .map_err(|e| bpf_error(format!("reading map info of {}", path.display()), e))?;
        let found_type = info.map_type().ok();
        if found_type != Some(map_type)
            || info.key_size() as usize != key_size
            || info.value_size() as usize != value_size
        {
            return Err(incompatible(format!(
                "other (map {name} is {found_type:?} with key {} / value {} bytes, \
                 expected {map_type:?} with {key_size} / {value_size})",
                info.key_size(),
                info.value_size()
            )));
        }
        if name == map_names::META {
            let array = aya::maps::Array::<MapData, Meta>::try_from(
                aya::maps::Map::from_map_data(data)
                    .map_err(|e| bpf_error(format!("opening {}", path.display()), e))?,
            )
            .map_err(|e| bpf_error(format!("opening {}", path.display()), e))?;
            let value = array
                .get(&META_INDEX, 0)
                .map_err(|e| bpf_error(format!("reading {}", path.display()), e))?;
            if value.layout_version != LAYOUT_VERSION {
                return Err(incompatible(value.layout_version.to_string()));
            }
            meta = Some(value);
        }
    }
    meta.map(Existing::Compatible)
        .ok_or_else(|| incompatible("unknown (meta unreadable)".into()))
}

/// A fresh, private folder to build a cluster's state in before it is
/// renamed into place.
pub fn temporary_dir(root: &Path, cluster: &str) -> Result<PathBuf, SteeringError> {
    // bpffs refuses names with a dot; `~` is outside the cluster-name alphabet.
    let tmp = root.join(format!("{TMP_PREFIX}{}~{cluster}", std::process::id()));
    if tmp.exists() {
        remove_folder(&tmp)?;
    }
    std::fs::create_dir(&tmp).map_err(io_error(format!("creating {}", tmp.display())))?;
    Ok(tmp)
}

/// Move a fully built folder into place. `Ok(false)` when another master
/// created the cluster's folder first.
pub fn publish_dir(tmp: &Path, dir: &Path) -> Result<bool, SteeringError> {
    // rename(2) of a directory onto an existing non-empty one fails, so only
    // one creator wins. An empty leftover folder is replaced.
    if dir.exists() && entries(dir)?.is_empty() {
        let _ = std::fs::remove_dir(dir);
    }
    match std::fs::rename(tmp, dir) {
        Ok(()) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EEXIST) | Some(libc::ENOTEMPTY)) => {
            Ok(false)
        }
        Err(e) => Err(io_error(format!(
            "renaming {} to {}",
            tmp.display(),
            dir.display()
        ))(e)),
    }
}

/// Leftover temporary folders of `cluster` (a master that died mid-install).
pub fn temporary_leftovers(root: &Path, cluster: &str) -> Result<Vec<PathBuf>, SteeringError> {
    Ok(entries(root)?
        .into_iter()
        .filter(|n| {
            n.strip_prefix(TMP_PREFIX)
                .and_then(|rest| rest.split_once('~'))
                .is_some_and(|(pid, name)| {
                    name == cluster && pid.chars().all(|c| c.is_ascii_digit())
                })
        })
        .map(|n| root.join(n))
        .collect())
}

/// Remove every remaining pin of a folder, then the folder. Links must have
/// been detached first (see `attach::detach_all`).
pub fn remove_folder(dir: &Path) -> Result<(), SteeringError> {
    for name in entries(dir)? {
        let path = dir.join(&name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(format!("removing {}", path.display()))(e)),
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error(format!("removing {}", dir.display()))(e)),
    }
}
