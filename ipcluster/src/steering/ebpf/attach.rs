//! Which interfaces carry the programs, and attaching them so that they stay
//! attached while no master runs: pinned tcx links where the kernel has tcx
//! (6.6+), netlink cls_bpf filters (recorded in the pin folder) otherwise.
//! A new master swaps its freshly loaded programs into the existing links or
//! filters, so there is no moment without a program.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;

use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle};
use aya::programs::{Link as _, LinkOrder, SchedClassifier, TcAttachType};
use aya::util::KernelVersion;
use nix::ifaddrs::getifaddrs;
use nix::net::if_::InterfaceFlags;

use super::bpf_error;
use super::pins::{self, EGRESS_LINK, INGRESS_LINK, NETLINK_RECORD};
use crate::steering::{SteeringConfig, SteeringError};

/// How the programs are attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// A tcx link (kernel 6.6+), pinned as `ingress_<if>` / `egress_<if>`.
    Tcx,
    /// A netlink cls_bpf filter on the clsact qdisc, recorded as a
    /// `netlink_<direction>_<if>` symlink.
    Netlink,
}

impl AttachMode {
    /// tcx where the kernel has it.
    pub fn for_this_kernel() -> AttachMode {
        match KernelVersion::current() {
            Ok(v) if v >= KernelVersion::new(6, 6, 0) => AttachMode::Tcx,
            _ => AttachMode::Netlink,
        }
    }
}

/// One hook of an interface: ingress or egress.
#[derive(Clone, Copy, Debug)]
pub struct Direction {
    pub program: &'static str,
    pub attach_type: TcAttachType,
    /// Prefix of the tcx link pin.
    pub link_prefix: &'static str,
    pub name: &'static str,
}

pub const DIRECTIONS: [Direction; 2] = [
    Direction {
        program: ipcluster_common::program_names::INGRESS,
        attach_type: TcAttachType::Ingress,
        link_prefix: INGRESS_LINK,
        name: "ingress",
    },
    Direction {
        program: ipcluster_common::program_names::EGRESS,
        attach_type: TcAttachType::Egress,
        link_prefix: EGRESS_LINK,
        name: "egress",
    },
];

/// The interfaces to attach to: `--iface` when given; else `lo` plus every
/// interface holding a listen address, or every up interface when a listen
/// address is a wildcard.
pub fn choose_interfaces(config: &SteeringConfig) -> Result<Vec<String>, SteeringError> {
    if !config.interfaces.is_empty() {
        return Ok(config.interfaces.clone());
    }
    let mut chosen: BTreeSet<String> = BTreeSet::from(["lo".to_owned()]);
    let addrs: Vec<_> = getifaddrs()
        .map_err(|errno| SteeringError::Io {
            what: "listing the network interfaces".into(),
            source: errno.into(),
        })?
        .collect();
    for listen in &config.services {
        let ip = listen.ip();
        for ifa in &addrs {
            let holds = if ip.is_unspecified() {
                ifa.flags.contains(InterfaceFlags::IFF_UP)
            } else {
                ifa.address.as_ref().and_then(address_of) == Some(ip)
            };
            if holds {
                chosen.insert(ifa.interface_name.clone());
            }
        }
    }
    Ok(chosen.into_iter().collect())
}

fn address_of(addr: &nix::sys::socket::SockaddrStorage) -> Option<IpAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(IpAddr::V4(v4.ip()));
    }
    addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
}

fn link_name(direction: &Direction, iface: &str) -> String {
    format!("{}{iface}", direction.link_prefix)
}

fn record_name(direction: &Direction, iface: &str) -> String {
    format!("{NETLINK_RECORD}{}_{iface}", direction.name)
}

/// A netlink record: `netlink_<direction>_<if>` → `<priority>:<handle>`.
struct NetlinkRecord {
    iface: String,
    attach_type: TcAttachType,
    priority: u16,
    handle: u32,
}

fn read_records(dir: &Path) -> Result<Vec<(String, Option<NetlinkRecord>)>, SteeringError> {
    let mut records = Vec::new();
    for name in pins::entries(dir)? {
        let Some(rest) = name.strip_prefix(NETLINK_RECORD) else {
            continue;
        };
        let parsed = DIRECTIONS.iter().find_map(|d| {
            let iface = rest.strip_prefix(d.name)?.strip_prefix('_')?;
            let target = std::fs::read_link(dir.join(&name)).ok()?;
            let target = target.to_str()?;
            let (priority, handle) = target.split_once(':')?;
            Some(NetlinkRecord {
                iface: iface.to_owned(),
                attach_type: d.attach_type,
                priority: priority.parse().ok()?,
                handle: handle.parse().ok()?,
            })
        });
        records.push((name, parsed));
    }
    Ok(records)
}

/// Load both programs of `ebpf` and make them the ones that run: swapped into
/// every link or filter recorded in `dir`, and attached (and recorded) on each
/// of `interfaces` that has none yet.
pub fn attach_all(
    ebpf: &mut aya::Ebpf,
    dir: &Path,
    interfaces: &[String],
    mode: AttachMode,
) -> Result<(), SteeringError> {
    let names = pins::entries(dir)?;
    let records = read_records(dir)?;
    for direction in &DIRECTIONS {
        let program: &mut SchedClassifier = ebpf
            .program_mut(direction.program)
            .ok_or_else(|| {
                SteeringError::Ebpf(format!(
                    "the eBPF object has no program {}",
                    direction.program
                ))
            })?
            .try_into()
            .map_err(|e| bpf_error(format!("program {}", direction.program), e))?;
        program
            .load()
            .map_err(|e| bpf_error(format!("loading program {}", direction.program), e))?;

        let mut covered: BTreeSet<String> = BTreeSet::new();
        // Existing tcx links: swap the new program in (one link update).
        for name in names
            .iter()
            .filter(|n| n.starts_with(direction.link_prefix))
        {
            let iface = &name[direction.link_prefix.len()..];
            let path = dir.join(name);
            match swap_into_pinned_link(program, &path) {
                Ok(()) => {
                    covered.insert(iface.to_owned());
                }
                Err(e) => {
                    // The interface went away (the link is defunct) or the
                    // pin is damaged: drop it and attach afresh if wanted.
                    log::warn!("replacing pinned link {}: {e}", path.display());
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        // Existing netlink filters: replace the program in place.
        for (name, record) in &records {
            let Some(record) = record else { continue };
            if record.attach_type != direction.attach_type {
                continue;
            }
            let link = SchedClassifierLink::attached(
                &record.iface,
                record.attach_type,
                record.priority,
                TcHandle::from(record.handle),
                None,
            );
            let swapped = link
                .map_err(|e| bpf_error(format!("interface {}", record.iface), e))
                .and_then(|link| {
                    program.attach_to_link(link).map_err(|e| {
                        bpf_error(format!("replacing the filter on {}", record.iface), e)
                    })
                })
                .and_then(|id| {
                    program
                        .take_link(id)
                        .map_err(|e| bpf_error("taking the netlink link", e))
                });
            match swapped {
                // A netlink link detaches its filter when dropped; the filter
                // must outlive us, and the link owns nothing else.
                Ok(link) => {
                    std::mem::forget(link);
                    covered.insert(record.iface.clone());
                }
                Err(e) => {
                    log::warn!("replacing netlink filter {name}: {e}");
                    let _ = std::fs::remove_file(dir.join(name));
                }
            }
        }
        for iface in interfaces.iter().filter(|i| !covered.contains(*i)) {
            attach_new(program, dir, direction, iface, mode)?;
        }
    }
    Ok(())
}

fn swap_into_pinned_link(program: &mut SchedClassifier, path: &Path) -> Result<(), SteeringError> {
    let what = || format!("pinned link {}", path.display());
    let pinned = PinnedLink::from_pin(path).map_err(|e| bpf_error(what(), e))?;
    let link =
        SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|e| bpf_error(what(), e))?;
    let id = program
        .attach_to_link(link)
        .map_err(|e| bpf_error(format!("updating {}", what()), e))?;
    // Dropping our handle closes an fd; the pin keeps the link attached.
    drop(program.take_link(id).map_err(|e| bpf_error(what(), e))?);
    Ok(())
}

fn attach_new(
    program: &mut SchedClassifier,
    dir: &Path,
    direction: &Direction,
    iface: &str,
    mode: AttachMode,
) -> Result<(), SteeringError> {
    let what = || format!("attaching {} to {iface} ({:?})", direction.program, mode);
    match mode {
        AttachMode::Tcx => {
            let id = program
                .attach_with_options(
                    iface,
                    direction.attach_type,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(|e| bpf_error(what(), e))?;
            let link = program.take_link(id).map_err(|e| bpf_error(what(), e))?;
            let fd_link = FdLink::try_from(link).map_err(|e| bpf_error(what(), e))?;
            let path = dir.join(link_name(direction, iface));
            // If pinning fails the link is dropped here, which detaches it.
            fd_link
                .pin(&path)
                .map_err(|e| bpf_error(format!("pinning {}", path.display()), e))?;
        }
        AttachMode::Netlink => {
            if let Err(e) = aya::programs::tc::qdisc_add_clsact(iface) {
                // "File exists" is the usual case: the qdisc is there already.
                log::debug!("adding clsact to {iface}: {e}");
            }
            let id = program
                .attach_with_options(
                    iface,
                    direction.attach_type,
                    TcAttachOptions::Netlink(NlOptions::default()),
                )
                .map_err(|e| bpf_error(what(), e))?;
            let link = program.take_link(id).map_err(|e| bpf_error(what(), e))?;
            let priority = link.priority().map_err(|e| bpf_error(what(), e))?;
            let handle = u32::from(link.handle().map_err(|e| bpf_error(what(), e))?);
            let path = dir.join(record_name(direction, iface));
            // On error `link` is dropped, which detaches the filter again.
            std::os::unix::fs::symlink(format!("{priority}:{handle}"), &path).map_err(
                |source| SteeringError::Io {
                    what: format!("recording the filter of {iface} at {}", path.display()),
                    source,
                },
            )?;
            std::mem::forget(link);
        }
    }
    Ok(())
}

/// Detach everything `dir` records: unpin tcx links (the kernel detaches a
/// link when its last reference goes) and delete netlink filters.
pub fn detach_all(dir: &Path) -> Result<(), SteeringError> {
    for name in pins::entries(dir)? {
        if !DIRECTIONS.iter().any(|d| name.starts_with(d.link_prefix)) {
            continue;
        }
        let path = dir.join(&name);
        match PinnedLink::from_pin(&path) {
            Ok(pinned) => {
                let fd_link = pinned.unpin().map_err(|source| SteeringError::Io {
                    what: format!("unpinning {}", path.display()),
                    source,
                })?;
                drop(fd_link);
            }
            Err(e) => {
                log::warn!("{} is not a link ({e}); removing it", path.display());
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    for (name, record) in read_records(dir)? {
        if let Some(record) = record {
            let detached = SchedClassifierLink::attached(
                &record.iface,
                record.attach_type,
                record.priority,
                TcHandle::from(record.handle),
                None,
            )
            .map_err(|e| bpf_error(format!("interface {}", record.iface), e))
            .and_then(|link| {
                link.detach()
                    .map_err(|e| bpf_error(format!("detaching the filter on {}", record.iface), e))
            });
            if let Err(e) = detached {
                // The interface or the filter is gone already.
                log::warn!("{name}: {e}");
            }
        }
        let _ = std::fs::remove_file(dir.join(&name));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(listens: &[&str], interfaces: &[&str]) -> SteeringConfig {
        SteeringConfig {
            cluster: "t".into(),
            services: listens
                .iter()
                .map(|s| s.parse().expect("address"))
                .collect(),
            interfaces: interfaces.iter().map(|s| s.to_string()).collect(),
            flow_entries: 16,
        }
    }

    #[test]
    fn explicit_interfaces_win() {
        let c = config(&["0.0.0.0:80"], &["eth7"]);
        assert_eq!(choose_interfaces(&c).expect("interfaces"), ["eth7"]);
    }

    #[test]
    fn loopback_listen_means_lo_only() {
        let c = config(&["127.0.0.1:8080", "[::1]:8080"], &[]);
        assert_eq!(choose_interfaces(&c).expect("interfaces"), ["lo"]);
    }

    #[test]
    fn wildcard_listen_means_every_up_interface() {
        let c = config(&["0.0.0.0:8080"], &[]);
        let chosen = choose_interfaces(&c).expect("interfaces");
        assert!(chosen.contains(&"lo".to_owned()), "{chosen:?}");
        let up: BTreeSet<String> = getifaddrs()
            .expect("getifaddrs")
            .filter(|i| i.flags.contains(InterfaceFlags::IFF_UP))
            .map(|i| i.interface_name)
            .collect();
        for iface in up {
            assert!(chosen.contains(&iface), "{iface} missing from {chosen:?}");
        }
    }
}
