//! Small topologies of test hosts (network namespaces), built in one call
//! and removed on drop (deleting a namespace deletes its links, addresses
//! and routes):
//!
//! - [`RoutedLine`]: three hosts in a row, the middle one routing between
//!   two subnets (IPv4 or IPv6);
//! - [`BridgedHost`]: a host whose bridge joins one or more guests (as on a
//!   KVM host);
//! - [`TunPair`]: two hosts joined by an L3 point-to-point link of two tun
//!   devices.

use crate::netns::{NetNs, bridge, veth};
use crate::tun::TunLink;

/// Add `address` ("10.1.2.3/24" or "fd00::1/64", without duplicate address
/// detection for IPv6 so that it is usable at once) to `dev` in `ns`.
fn add_address(ns: &NetNs, dev: &str, address: &str) {
    if address.contains(':') {
        ns.ip(&["-6", "addr", "add", address, "dev", dev, "nodad"]);
    } else {
        ns.ip(&["addr", "add", address, "dev", dev]);
    }
}

/// A default route in `ns` via `gateway` (an address with or without its
/// prefix length).
fn default_route(ns: &NetNs, gateway: &str) {
    let gateway = gateway.split('/').next().unwrap_or(gateway);
    if gateway.contains(':') {
        ns.ip(&["-6", "route", "add", "default", "via", gateway]);
    } else {
        ns.ip(&["route", "add", "default", "via", gateway]);
    }
}

/// What [`RoutedLine::new`] builds.
#[derive(Clone, Copy, Debug)]
pub struct LineSpec<'a> {
    /// The roles (namespace names) of the left, middle and right host.
    pub roles: [&'a str; 3],
    /// The interfaces: the left host's, the middle host's towards the left,
    /// the middle host's towards the right, the right host's.
    pub interfaces: [&'a str; 4],
    /// Their addresses with prefix length, in the same order: all IPv4 or
    /// all IPv6.
    pub addresses: [&'a str; 4],
}

/// Three hosts in a row, `left` — `middle` — `right`, joined by two veth
/// pairs. The middle host forwards (`ip_forward`, or IPv6 forwarding) and
/// is the default route of both ends.
#[derive(Debug)]
pub struct RoutedLine {
    pub left: NetNs,
    pub middle: NetNs,
    pub right: NetNs,
}

impl RoutedLine {
    pub fn new(spec: LineSpec) -> RoutedLine {
        crate::require_root();
        let [left_role, middle_role, right_role] = spec.roles;
        let [left_if, middle_left_if, middle_right_if, right_if] = spec.interfaces;
        let [left_addr, middle_left_addr, middle_right_addr, right_addr] = spec.addresses;
        let line = RoutedLine {
            left: NetNs::new(left_role),
            middle: NetNs::new(middle_role),
            right: NetNs::new(right_role),
        };
        veth(&line.left, left_if, &line.middle, middle_left_if);
        veth(&line.middle, middle_right_if, &line.right, right_if);
        for (ns, dev, address) in [
            (&line.left, left_if, left_addr),
            (&line.middle, middle_left_if, middle_left_addr),
            (&line.middle, middle_right_if, middle_right_addr),
            (&line.right, right_if, right_addr),
        ] {
            add_address(ns, dev, address);
        }
        default_route(&line.left, middle_left_addr);
        default_route(&line.right, middle_right_addr);
        if spec.addresses.iter().any(|a| a.contains(':')) {
            line.middle.sysctl("net.ipv6.conf.all.forwarding", "1");
        } else {
            line.middle.sysctl("net.ipv4.ip_forward", "1");
        }
        line
    }
}

/// One guest of a [`BridgedHost`].
#[derive(Clone, Copy, Debug)]
pub struct Guest<'a> {
    /// The guest namespace's role (name).
    pub role: &'a str,
    /// The guest's end of its veth pair.
    pub interface: &'a str,
    /// The host's end, a port of the bridge.
    pub port: &'a str,
    /// The guest's address, with prefix length.
    pub address: &'a str,
}

/// A host with bridge `br0` (holding the host's address) and guests, each
/// joined to the bridge by a veth pair whose host end is a bridge port. No
/// routes: the guests and the host share one subnet.
#[derive(Debug)]
pub struct BridgedHost {
    pub host: NetNs,
    /// In the order given.
    pub guests: Vec<NetNs>,
}

impl BridgedHost {
    /// The bridge's name in the host.
    pub const BRIDGE: &'static str = "br0";

    pub fn new(host_role: &str, host_address: &str, guests: &[Guest]) -> BridgedHost {
        crate::require_root();
        let host = NetNs::new(host_role);
        let guest_ns: Vec<NetNs> = guests.iter().map(|g| NetNs::new(g.role)).collect();
        for (guest, ns) in guests.iter().zip(&guest_ns) {
            veth(ns, guest.interface, &host, guest.port);
        }
        let ports: Vec<&str> = guests.iter().map(|g| g.port).collect();
        bridge(&host, Self::BRIDGE, &ports);
        add_address(&host, Self::BRIDGE, host_address);
        for (guest, ns) in guests.iter().zip(&guest_ns) {
            add_address(ns, guest.interface, guest.address);
        }
        BridgedHost {
            host,
            guests: guest_ns,
        }
    }
}

/// Two hosts joined by a [`TunLink`]: `client_if` (`client_ip`) in `client`,
/// `host_if` (`host_ip`) in `host`, each the other's point-to-point peer.
pub struct TunPair {
    // Declared first: the link (its pump threads, its devices) goes before
    // the namespaces it joins.
    _link: TunLink,
    pub client: NetNs,
    pub host: NetNs,
}

impl TunPair {
    /// `roles`: (client, host); `client` and `host`: (interface, address).
    pub fn new(roles: (&str, &str), client: (&str, &str), host: (&str, &str)) -> TunPair {
        crate::require_root();
        let client_ns = NetNs::new(roles.0);
        let host_ns = NetNs::new(roles.1);
        let link = TunLink::new(&client_ns, client.0, client.1, &host_ns, host.0, host.1);
        TunPair {
            _link: link,
            client: client_ns,
            host: host_ns,
        }
    }
}
