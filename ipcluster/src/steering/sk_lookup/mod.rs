//! The sk-lookup steering backend: an `sk_lookup` program (its own object,
//! `ipcluster-sk-lookup`) attached to the master's network namespace hands
//! each new TCP connection to a service to the listening socket of its band's
//! worker, taken from a SOCKHASH keyed by worker port. The steering table
//! (`meta`, `services`, `steering`, `active`) is the tc backend's own layout
//! and code ([`SteeringMaps`]); there is no flow table and nothing is rewritten.
//!
//! Pins in `/sys/fs/bpf/ipcluster/<cluster>/`: those maps, `sockets`,
//! `sk_counters`, and the link `sk_lookup_link`. A new master loads its
//! program, attaches it next to the old one (both run for a moment; the
//! program assigns with `BPF_SK_LOOKUP_F_REPLACE`, so whichever runs last
//! makes the same choice), then renames its link's pin over the old one,
//! which drops and so detaches the old link: there is no gap.
//!
//! - [`listener`]: taking a worker's listening socket with `pidfd_getfd`.

pub mod listener;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use aya::maps::{Map, MapData, MapType, PerCpuArray, SockHash};
use aya::programs::SkLookup;
use aya::programs::links::{FdLink, PinnedLink};
use aya::{Ebpf, EbpfLoader};
use ipcluster_common::sk_lookup::{self as sk, SkCounter};
use ipcluster_common::{LAYOUT_VERSION, Meta, program_names};

use super::ebpf::pins::{self, Existing, MapShape};
use super::ebpf::{SteeringMaps, bpf_error};
use super::{
    BackendKind, Counters, Steering, SteeringConfig, SteeringError, SteeringTable, WorkerListener,
};
use crate::paths;

/// The compiled sk_lookup program (built by `build.rs` with aya-build).
static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ipcluster-sk-lookup"));

/// The embedded sk_lookup object.
pub fn object() -> &'static [u8] {
    OBJECT
}

/// The pinned maps of this backend and their kernel shapes.
pub fn expected_maps() -> Vec<MapShape> {
    let mut maps: Vec<MapShape> = pins::expected_maps()[..4].to_vec();
    maps.push((sk::SOCKETS, MapType::SockHash, 4, 4));
    maps.push((sk::COUNTERS, MapType::PerCpuArray, 4, 8));
    maps
}

/// Load the object against the maps pinned (or to be pinned) in `dir`.
pub fn load_object(dir: &Path) -> Result<Ebpf, SteeringError> {
    let mut loader = EbpfLoader::new();
    let paths: Vec<(&'static str, PathBuf)> = sk::MAPS
        .iter()
        .map(|name| (*name, dir.join(name)))
        .collect();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    loader.load(OBJECT).map_err(|e| {
        bpf_error(
            format!(
                "loading the sk_lookup object with maps pinned in {}",
                dir.display()
            ),
            e,
        )
    })
}

/// The maps of one cluster: the steering table plus the sockets and counters.
struct SkMaps {
    table: SteeringMaps,
    sockets: SockHash<MapData, u32>,
    counters: PerCpuArray<MapData, u64>,
}

impl SkMaps {
    fn take_from(ebpf: &mut Ebpf) -> Result<Self, SteeringError> {
        let table = SteeringMaps::take_table_from(ebpf)?;
        let mut take = |name: &str| {
            ebpf.take_map(name).ok_or_else(|| {
                SteeringError::Ebpf(format!("the sk_lookup object has no map named {name}"))
            })
        };
        let sockets = take(sk::SOCKETS)?;
        let counters = take(sk::COUNTERS)?;
        Self::typed(table, sockets, counters)
    }

    fn open_pinned(dir: &Path) -> Result<Self, SteeringError> {
        let table = SteeringMaps::open_pinned_table(dir)?;
        let open = |name: &str| -> Result<Map, SteeringError> {
            let path = dir.join(name);
            let data = MapData::from_pin(&path)
                .map_err(|e| bpf_error(format!("opening pinned map {}", path.display()), e))?;
            Map::from_map_data(data).map_err(|e| bpf_error(format!("map {}", path.display()), e))
        };
        Self::typed(table, open(sk::SOCKETS)?, open(sk::COUNTERS)?)
    }

    fn typed(table: SteeringMaps, sockets: Map, counters: Map) -> Result<Self, SteeringError> {
        let typed = |name: &'static str| {
            move |e| bpf_error(format!("map {name} has an unexpected type or layout"), e)
        };
        Ok(SkMaps {
            table,
            sockets: SockHash::try_from(sockets).map_err(typed(sk::SOCKETS))?,
            counters: PerCpuArray::try_from(counters).map_err(typed(sk::COUNTERS))?,
        })
    }

    fn counters(&self) -> Result<Counters, SteeringError> {
        let mut sums = [0u64; sk::COUNTER_COUNT as usize];
        for counter in SkCounter::ALL {
            let values = self
                .counters
                .get(&(counter as u32), 0)
                .map_err(|e| bpf_error(format!("reading sk_lookup counter {counter:?}"), e))?;
            sums[counter as usize] = values.iter().sum();
        }
        Ok(Counters {
            assigned: sums[SkCounter::Assigned as usize],
            fallbacks: sums[SkCounter::Fallbacks as usize],
            misses: sums[SkCounter::Misses as usize],
            ..Counters::default()
        })
    }

    /// Worker ports that have a listening socket in the map now.
    fn registered_ports(&self) -> Vec<u16> {
        self.sockets
            .keys()
            .filter_map(Result::ok)
            .filter_map(|k| u16::try_from(k).ok())
            .collect()
    }
}

/// The sk-lookup backend of one cluster.
pub struct SkLookupSteering {
    config: SteeringConfig,
    dir: PathBuf,
    maps: Option<SkMaps>,
}

impl SkLookupSteering {
    pub fn new(config: SteeringConfig) -> Result<Self, SteeringError> {
        let dir = pins::cluster_pin_dir(&config.cluster)?;
        Ok(SkLookupSteering {
            config,
            dir,
            maps: None,
        })
    }

    /// The cluster's pin folder.
    pub fn pin_dir(&self) -> &Path {
        &self.dir
    }

    /// Worker ports whose listening socket is registered now.
    pub fn registered_ports(&self) -> Result<Vec<u16>, SteeringError> {
        match &self.maps {
            Some(maps) => Ok(maps.registered_ports()),
            None => Ok(self
                .open_maps()?
                .map(|m| m.registered_ports())
                .unwrap_or_default()),
        }
    }

    fn open_maps(&self) -> Result<Option<SkMaps>, SteeringError> {
        match pins::check_layout_of(&self.config.cluster, &self.dir, &expected_maps())? {
            Existing::Nothing => Ok(None),
            Existing::Compatible(_) => SkMaps::open_pinned(&self.dir).map(Some),
        }
    }

    fn maps_mut(&mut self) -> Result<&mut SkMaps, SteeringError> {
        if self.maps.is_none() {
            self.maps = self.open_maps()?;
        }
        self.maps
            .as_mut()
            .ok_or_else(|| pins::not_installed(&self.config.cluster, &self.dir))
    }

    fn check_config(&self) -> Result<(), SteeringError> {
        pins::check_service_count(self.config.services.len())
    }

    /// Build the cluster's state in a temporary folder and rename it into
    /// place. `Ok(false)`: another master created the folder meanwhile.
    fn install_fresh(&mut self) -> Result<bool, SteeringError> {
        let root = pins::ensure_pin_root()?;
        let tmp = pins::temporary_dir(&root, &self.config.cluster)?;
        let built = (|| {
            let mut ebpf = load_object(&tmp)?;
            let mut maps = SkMaps::take_from(&mut ebpf)?;
            maps.table.write_meta(Meta {
                layout_version: LAYOUT_VERSION,
                flow_entries: 0,
            })?;
            attach(&mut ebpf, &tmp.join(sk::LINK))?;
            Ok::<_, SteeringError>(maps)
        })();
        let placed = built.and_then(|maps| Ok((maps, pins::publish_dir(&tmp, &self.dir)?)));
        match placed {
            Ok((maps, true)) => {
                self.maps = Some(maps);
                Ok(true)
            }
            Ok((_, false)) => {
                discard(&tmp);
                Ok(false)
            }
            Err(e) => {
                discard(&tmp);
                Err(e)
            }
        }
    }

    /// Load this binary's program against the pinned maps, attach it next to
    /// the old link, then put its link's pin in place of the old one.
    fn adopt(&mut self) -> Result<(), SteeringError> {
        let mut ebpf = load_object(&self.dir)?;
        let maps = SkMaps::take_from(&mut ebpf)?;
        let next = self.dir.join(sk::NEXT_LINK);
        let _ = std::fs::remove_file(&next);
        attach(&mut ebpf, &next)?;
        let link = self.dir.join(sk::LINK);
        if let Err(e) = std::fs::rename(&next, &link) {
            let _ = std::fs::remove_file(&next);
            return Err(SteeringError::Io {
                what: format!(
                    "replacing the pinned link {} with {}",
                    link.display(),
                    next.display()
                ),
                source: e,
            });
        }
        self.maps = Some(maps);
        Ok(())
    }
}

/// Load and attach the program in the master's network namespace and pin the
/// link at `pin`. On error nothing stays attached.
fn attach(ebpf: &mut Ebpf, pin: &Path) -> Result<(), SteeringError> {
    let program: &mut SkLookup = ebpf
        .program_mut(program_names::SK_LOOKUP)
        .ok_or_else(|| {
            SteeringError::Ebpf(format!(
                "the sk_lookup object has no program named {}",
                program_names::SK_LOOKUP
            ))
        })?
        .try_into()
        .map_err(|e| bpf_error("the sk_lookup program has the wrong type", e))?;
    program.load().map_err(|e| {
        bpf_error(
            "loading the sk_lookup program (the sk-lookup backend needs kernel 5.9 or later)",
            e,
        )
    })?;
    // The calling thread's namespace, as for every other backend (tc and
    // iptables act in the namespace of the thread that runs them); the same
    // as /proc/self in the master, whose threads share one namespace.
    let netns = File::open("/proc/thread-self/ns/net").map_err(|source| SteeringError::Io {
        what: "opening /proc/thread-self/ns/net".into(),
        source,
    })?;
    let id = program.attach(&netns).map_err(|e| {
        bpf_error(
            "attaching the sk_lookup program to the network namespace (kernel 5.9 or later)",
            e,
        )
    })?;
    let what = || format!("pinning the sk_lookup link at {}", pin.display());
    let link = program.take_link(id).map_err(|e| bpf_error(what(), e))?;
    let fd_link = FdLink::from(link);
    // If pinning fails the link is dropped here, which detaches it.
    let pinned: PinnedLink = fd_link.pin(pin).map_err(|e| bpf_error(what(), e))?;
    // Dropping our handle closes an fd; the pin keeps the link attached.
    drop(pinned);
    Ok(())
}

/// Detach the link pinned at `pin` now and remove the pin. (Dropping the last
/// reference of a link detaches it too, but later, from a kernel work queue:
/// connections made meanwhile would still be steered.)
fn detach_pinned(pin: &Path) -> Result<(), SteeringError> {
    if !pin.exists() {
        return Ok(());
    }
    let what = || format!("detaching the sk_lookup link pinned at {}", pin.display());
    let fd = link_fd_from_pin(pin).map_err(|source| SteeringError::Io {
        what: what(),
        source,
    })?;
    // BPF_LINK_DETACH (kernel 5.9+, like sk_lookup itself): `union bpf_attr`
    // starts with the link fd; the rest is zero.
    const BPF_LINK_DETACH: libc::c_long = 34;
    let mut attr = [0u8; 64];
    attr[..4].copy_from_slice(&fd.as_raw_fd().to_ne_bytes());
    // SAFETY: `attr` is a valid `union bpf_attr` for this command. Raw
    // because aya 0.14 has no BPF_LINK_DETACH (dropping its link only closes
    // an fd), and neither nix nor rustix wraps bpf(2).
    let rc = unsafe { bpf_syscall(BPF_LINK_DETACH, &mut attr) };
    if rc < 0 {
        return Err(SteeringError::Io {
            what: what(),
            source: std::io::Error::last_os_error(),
        });
    }
    std::fs::remove_file(pin).map_err(|source| SteeringError::Io {
        what: format!("removing {}", pin.display()),
        source,
    })
}

/// The bpf(2) system call with a zero-padded 64-byte `union bpf_attr`.
///
/// # Safety
/// `attr` must be a valid `union bpf_attr` for `cmd`, and every pointer it
/// holds must stay valid for the call.
unsafe fn bpf_syscall(cmd: libc::c_long, attr: &mut [u8; 64]) -> libc::c_long {
    // SAFETY: the caller vouches for `attr`; its length is passed with it.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            attr.len() as libc::c_uint,
        )
    }
}

/// Open the BPF object pinned at `pin` (BPF_OBJ_GET).
fn link_fd_from_pin(pin: &Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    const BPF_OBJ_GET: libc::c_long = 7;
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // `union bpf_attr` for BPF_OBJ_GET: u64 pathname, u32 bpf_fd, u32 file_flags.
    let mut attr = [0u8; 64];
    attr[..8].copy_from_slice(&(path.as_ptr() as u64).to_ne_bytes());
    // SAFETY: `attr` is a valid `union bpf_attr`; `path` outlives the call.
    // Raw because aya's `PinnedLink::from_pin` keeps the fd private, and the
    // detach above needs it.
    let fd = unsafe { bpf_syscall(BPF_OBJ_GET, &mut attr) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Remove a half-built temporary folder, detaching its link first.
fn discard(tmp: &Path) {
    for name in [sk::LINK, sk::NEXT_LINK] {
        if let Err(e) = detach_pinned(&tmp.join(name)) {
            log::warn!("cleaning up {}: {e}", tmp.display());
        }
    }
    if let Err(e) = pins::remove_folder(tmp) {
        log::warn!("cleaning up {}: {e}", tmp.display());
    }
}

impl Steering for SkLookupSteering {
    fn kind(&self) -> BackendKind {
        BackendKind::SkLookup
    }

    fn install(&mut self) -> Result<Option<SteeringTable>, SteeringError> {
        self.check_config()?;
        pins::ensure_bpffs()?;
        log::info!(
            "sk-lookup steering of cluster {} in the master's network namespace, pins in {}",
            self.config.cluster,
            self.dir.display()
        );
        let expected = expected_maps();
        for _attempt in 0..2 {
            match pins::check_layout_of(&self.config.cluster, &self.dir, &expected)? {
                Existing::Compatible(_) => {
                    self.adopt()?;
                    return self.read_table();
                }
                Existing::Nothing => {
                    if self.install_fresh()? {
                        return Ok(None);
                    }
                }
            }
        }
        Err(SteeringError::Ebpf(format!(
            "the pin folder {} keeps appearing and disappearing; is another master installing?",
            self.dir.display()
        )))
    }

    fn publish(&mut self, table: &SteeringTable) -> Result<(), SteeringError> {
        table.validate()?;
        self.maps_mut()?.table.publish(table)
    }

    fn read_table(&self) -> Result<Option<SteeringTable>, SteeringError> {
        match &self.maps {
            Some(maps) => maps.table.read_table(),
            None => match self.open_maps()? {
                Some(maps) => maps.table.read_table(),
                None => Ok(None),
            },
        }
    }

    fn counters(&self) -> Result<Counters, SteeringError> {
        match &self.maps {
            Some(maps) => maps.counters(),
            None => match self.open_maps()? {
                Some(maps) => maps.counters(),
                None => Ok(Counters::default()),
            },
        }
    }

    fn teardown(&mut self) -> Result<(), SteeringError> {
        self.maps = None;
        for name in [sk::LINK, sk::NEXT_LINK] {
            detach_pinned(&self.dir.join(name))?;
        }
        // The maps go with their last reference, and the sockets leave the
        // SOCKHASH with it.
        pins::remove_folder(&self.dir)?;
        for tmp in pins::temporary_leftovers(Path::new(paths::PIN_ROOT), &self.config.cluster)? {
            discard(&tmp);
        }
        Ok(())
    }

    fn unregistered_ports(&self, ports: &[u16]) -> Vec<u16> {
        match self.registered_ports() {
            Ok(registered) => ports
                .iter()
                .copied()
                .filter(|p| !registered.contains(p))
                .collect(),
            // Unreadable map: let register_listener report the error.
            Err(_) => ports.to_vec(),
        }
    }

    fn register_listener(&mut self, l: &WorkerListener) -> Result<bool, SteeringError> {
        let maps = self.maps_mut()?;
        if maps.registered_ports().contains(&l.port) {
            return Ok(false);
        }
        let socket = listener::take(l)?;
        maps.sockets
            .insert(u32::from(l.port), socket.as_raw_fd(), 0)
            .map_err(|e| SteeringError::Listener {
                pid: l.pid,
                port: l.port,
                cause: format!("inserting it into the socket map failed: {e}"),
            })?;
        // `socket` (our duplicate) closes here: the map alone must not keep a
        // dead worker's listener alive.
        drop(socket);
        log::info!(
            "worker {}: listening socket on port {} registered for sk_lookup",
            l.pid,
            l.port
        );
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_name_on_the_command_line_and_in_json() {
        use clap::ValueEnum as _;
        assert_eq!(
            BackendKind::from_str("sk-lookup", false),
            Ok(BackendKind::SkLookup)
        );
        assert_eq!(
            serde_json::to_string(&BackendKind::SkLookup).expect("json"),
            "\"sk-lookup\""
        );
        assert_eq!(
            serde_json::from_str::<BackendKind>("\"sk-lookup\"").expect("json"),
            BackendKind::SkLookup
        );
        assert_eq!(BackendKind::SkLookup.to_string(), "sk-lookup");
    }

    #[test]
    fn pinned_maps_are_the_shared_table_plus_sockets_and_counters() {
        let names: Vec<&str> = expected_maps().iter().map(|m| m.0).collect();
        assert_eq!(names, sk::MAPS.to_vec());
        assert!(!names.contains(&ipcluster_common::map_names::FLOWS));
    }

    #[test]
    fn cluster_names_that_cannot_name_a_pin_folder_are_refused() {
        for bad in ["", "a.b", "a/b", "~x"] {
            let config = SteeringConfig {
                cluster: bad.into(),
                services: Vec::new(),
                interfaces: Vec::new(),
                flow_entries: 1,
            };
            assert!(SkLookupSteering::new(config).is_err(), "{bad:?}");
        }
    }
}
