//! Types and constants shared by the ipcluster tc programs (`ipcluster-ebpf`)
//! and the user side (`ipcluster`).
//!
//! Every map key and value is a plain `#[repr(C)]` struct with explicit padding
//! fields, so that both sides agree on the layout byte for byte and `bpftool
//! map dump` prints readable, BTF-typed entries. With the `user` feature they
//! derive `bytemuck::Pod`, which refuses to compile a type with implicit padding. Ports are stored in host byte
//! order; addresses as the 16 bytes of an IPv6 address (IPv4 in the first four
//! bytes, the rest zero), in network byte order.
#![no_std]

/// Bumped whenever a map's key, value, size or meaning changes. A master that
/// finds pinned maps of another layout refuses to reuse them.
pub const LAYOUT_VERSION: u32 = 2;

/// How many (address, public port) services one cluster can steer.
pub const MAX_SERVICES: u32 = 16;
/// The largest number of bands (workers) a cluster can have.
pub const MAX_BANDS: u32 = 256;
/// The steering table is double-buffered: two slots, one active.
pub const SLOTS: u32 = 2;
/// Entries in the steering array: `SLOTS × MAX_SERVICES × MAX_BANDS`.
pub const STEERING_ENTRIES: u32 = SLOTS * MAX_SERVICES * MAX_BANDS;
/// Worker ports the egress side may have to rewrite: every port of both slots.
pub const MAX_WORKER_PORTS: u32 = STEERING_ENTRIES;
/// Tables remembered for the evicted-flow fallback: the last `HISTORY`
/// published tables, newest first, so that a connection whose flow entry was
/// evicted finds its worker among every generation still running (as long as
/// it was in one of the last `HISTORY` tables), not only in the two slots.
pub const HISTORY: u32 = 8;
/// Entries of the `history` array: `HISTORY × MAX_SERVICES × MAX_BANDS` worker ports.
pub const HISTORY_ENTRIES: u32 = HISTORY * MAX_SERVICES * MAX_BANDS;
/// Entries of the `history_shapes` array: `HISTORY × MAX_SERVICES` band shapes.
pub const HISTORY_SHAPE_ENTRIES: u32 = HISTORY * MAX_SERVICES;
/// Index of the publish count in the `active` array (entry 0 is the active
/// slot): the newest table of `history` is at `(count - 1) % HISTORY`.
pub const ACTIVE_PUBLISHED: u32 = 1;
/// Entries of the `active` array.
pub const ACTIVE_ENTRIES: u32 = 2;

/// Default size of the LRU flow table (entries).
pub const DEFAULT_FLOW_ENTRIES: u32 = 262_144;

/// `ServiceKey::family` for IPv4 (the kernel's `AF_INET`).
pub const FAMILY_V4: u16 = 2;
/// `ServiceKey::family` for IPv6 (the kernel's `AF_INET6`).
pub const FAMILY_V6: u16 = 10;

/// Names of the maps, which are also their file names in the pin folder
/// `/sys/fs/bpf/ipcluster/<cluster>/`.
pub mod map_names {
    pub const META: &str = "meta";
    pub const SERVICES: &str = "services";
    pub const STEERING: &str = "steering";
    pub const ACTIVE: &str = "active";
    pub const FLOWS: &str = "flows";
    pub const WORKER_PORTS: &str = "worker_ports";
    pub const COUNTERS: &str = "counters";
    pub const PORTS: &str = "ports";
    pub const HISTORY: &str = "history";
    pub const HISTORY_SHAPES: &str = "history_shapes";
    /// Every pinned map, in the order they are checked when a master re-opens.
    pub const ALL: [&str; 10] = [
        META,
        SERVICES,
        STEERING,
        ACTIVE,
        FLOWS,
        WORKER_PORTS,
        COUNTERS,
        PORTS,
        HISTORY,
        HISTORY_SHAPES,
    ];
}

/// Names of the two tc programs in the object file.
pub mod program_names {
    pub const INGRESS: &str = "ipcluster_ingress";
    pub const EGRESS: &str = "ipcluster_egress";
    /// The sk_lookup program (its own object, see [`crate::sk_lookup`]).
    pub const SK_LOOKUP: &str = "ipcluster_sk_lookup";
}

/// The sk-lookup backend's object: an `sk_lookup` program that assigns a new
/// connection to its band's worker's own listening socket. It shares `meta`,
/// `services`, `steering` and `active` with the tc object's layout (not its
/// flow table) and adds the maps named here.
pub mod sk_lookup {
    /// SOCKHASH of the workers' listening sockets, keyed by worker port (`u32`).
    pub const SOCKETS: &str = "sockets";
    /// Per-CPU counters, indexed by [`SkCounter`].
    pub const COUNTERS: &str = "sk_counters";
    /// Every pinned map of the sk-lookup backend.
    pub const MAPS: [&str; 6] = [
        super::map_names::META,
        super::map_names::SERVICES,
        super::map_names::STEERING,
        super::map_names::ACTIVE,
        SOCKETS,
        COUNTERS,
    ];
    /// Pin name of the program's link (attached to the network namespace).
    pub const LINK: &str = "sk_lookup_link";
    /// Pin name of a new link while it replaces the old one.
    pub const NEXT_LINK: &str = "sk_lookup_link_next";
    /// Listening sockets the SOCKHASH holds (worker ports of every generation).
    pub const MAX_SOCKETS: u32 = 16_384;

    /// Indices of the per-CPU `sk_counters` array.
    #[repr(u32)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum SkCounter {
        /// New connections given to the active slot's worker.
        Assigned = 0,
        /// New connections given to the previous slot's worker, because the
        /// active slot's worker has no listening socket in the map.
        Fallbacks = 1,
        /// New connections to a service whose band has no socket in either
        /// slot: the kernel's own lookup goes on (as with no listener).
        Misses = 2,
    }

    /// Number of entries of the `sk_counters` array.
    pub const COUNTER_COUNT: u32 = 3;

    impl SkCounter {
        pub const ALL: [SkCounter; COUNTER_COUNT as usize] =
            [SkCounter::Assigned, SkCounter::Fallbacks, SkCounter::Misses];
    }
}

/// The `ports` array is a bitmap per kind of port, 32 ports per entry:
/// entry `kind * PORT_WORDS + port / 32`, bit `port % 32`. It lets both
/// programs pass a packet of an unrelated port after one array lookup,
/// before any hash lookup. A set bit only means "look further": bits may
/// stay set after a port stops being used.
pub const PORT_WORDS: u32 = 65_536 / 32;
/// Port kind of the `ports` bitmap: a public port of some service.
pub const PORT_KIND_PUBLIC: u32 = 0;
/// Port kind of the `ports` bitmap: a worker port (in `worker_ports`).
pub const PORT_KIND_WORKER: u32 = 1;
/// Entries of the `ports` array.
pub const PORT_ENTRIES: u32 = 2 * PORT_WORDS;

/// Index and bit of `port` of `kind` in the `ports` bitmap.
#[inline(always)]
pub const fn port_bit(kind: u32, port: u16) -> (u32, u32) {
    (
        kind * PORT_WORDS + (port as u32) / 32,
        1u32 << ((port as u32) % 32),
    )
}

/// Index of the only entry of the `meta` array.
pub const META_INDEX: u32 = 0;

/// The `meta` map's value: what layout the pinned maps have.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Meta {
    pub layout_version: u32,
    /// Size the flow table was created with (pinned maps keep their size).
    pub flow_entries: u32,
}

/// Key of the `services` hash: a listening address and public port.
/// The wildcard entry of a family has an all-zero `addr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ServiceKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub family: u16,
}

/// How the band of a client address is computed in one slot:
/// `band = (low 32 bits of the address >> band_shift) & band_mask`.
/// `present` is 1 when the service is part of that slot's table, and
/// `position` is its place in that table (so a table reads back in order even
/// when service indices are reused across generations).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct BandShape {
    pub band_mask: u32,
    pub band_shift: u32,
    pub present: u32,
    pub position: u32,
}

/// Value of the `services` hash. The band shape is kept per slot so that a
/// generation with another number of workers switches with the same single
/// write to `active` as everything else.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ServiceValue {
    pub index: u32,
    pub _pad: u32,
    pub shapes: [BandShape; SLOTS as usize],
}

/// Index into the `history` array (`slot` is the history position here).
#[inline(always)]
pub const fn history_index(position: u32, service: u32, band: u32) -> u32 {
    (position * MAX_SERVICES + service) * MAX_BANDS + band
}

/// Index into the `steering` array (value: the worker port as `u32`, 0 when empty).
#[inline(always)]
pub const fn steering_index(slot: u32, service: u32, band: u32) -> u32 {
    (slot * MAX_SERVICES + service) * MAX_BANDS + band
}

/// Key of the `flows` LRU hash: one entry per connection, named by both of its
/// ends as the client addressed them (client address and port, the local
/// address and the port it connected to), so that the egress side can build the
/// same key from a reply without knowing the service index.
///
/// A steered connection's key holds the public port; a direct connection to a
/// worker port (a health check) is keyed by that worker port. Public and worker
/// ports never coincide, so the two kinds cannot overwrite each other.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FlowKey {
    pub client_addr: [u8; 16],
    pub local_addr: [u8; 16],
    pub client_port: u16,
    pub public_port: u16,
    pub family: u16,
    pub _pad: u16,
}

/// Value of the `flows` LRU hash: which worker the connection went to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FlowValue {
    /// The worker port of a steered connection; 0 for a direct connection.
    pub worker_port: u16,
    /// The service index (for `bpftool map dump` readers; not used to steer).
    pub service: u16,
    /// Sequence number of the SYN that created the entry (network order as
    /// read): the same SYN seen again on a second attached device (a bridge
    /// over its port) is recognised and changes nothing.
    pub syn_seq: u32,
}

/// Value of the `worker_ports` hash (key: the worker port as `u32`): which
/// service a worker port belongs to, for the egress rewrite.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct WorkerPortValue {
    pub service: u16,
    pub public_port: u16,
}

/// Indices of the per-CPU `counters` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Ingress packets whose destination port was rewritten.
    Steered = 0,
    /// Connections recorded in the flow table (first packet seen).
    NewFlows = 1,
    /// Ingress packets that found their connection in the flow table.
    FlowHits = 2,
    /// Packets to a service whose band has no worker port in the active slot.
    TableMisses = 3,
    /// Egress packets whose source port was rewritten back to the public port.
    EgressRewrites = 4,
    /// Packets that matched nothing and passed untouched.
    Passed = 5,
    /// Non-SYN packets of a service with no flow entry (evicted or pre-existing),
    /// steered by the fallback rule.
    FlowFallbacks = 6,
    /// SYNs that would have replaced the flow entry of a connection still
    /// alive in the socket table (forged or stray), kept on the old worker.
    RefusedHijacks = 7,
    /// SYNs (and flow-less packets) to a wildcard service that the routing
    /// table forwards elsewhere: passed untouched.
    Forwarded = 8,
    /// ICMP / ICMPv6 errors quoting a steered connection's packet whose quoted
    /// TCP source port was put back to the worker port (path-MTU discovery).
    IcmpTranslated = 9,
}

/// Number of entries of the `counters` array.
pub const COUNTER_COUNT: u32 = 10;

impl Counter {
    pub const ALL: [Counter; COUNTER_COUNT as usize] = [
        Counter::Steered,
        Counter::NewFlows,
        Counter::FlowHits,
        Counter::TableMisses,
        Counter::EgressRewrites,
        Counter::Passed,
        Counter::FlowFallbacks,
        Counter::RefusedHijacks,
        Counter::Forwarded,
        Counter::IcmpTranslated,
    ];

    /// The name used in logs and in `status --json`.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Steered => "steered",
            Counter::NewFlows => "new_flows",
            Counter::FlowHits => "flow_hits",
            Counter::TableMisses => "table_misses",
            Counter::EgressRewrites => "egress_rewrites",
            Counter::Passed => "passed",
            Counter::FlowFallbacks => "flow_fallbacks",
            Counter::RefusedHijacks => "refused_hijacks",
            Counter::Forwarded => "forwarded",
            Counter::IcmpTranslated => "icmp_translated",
        }
    }
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    /// Compiles only for a type that derives `bytemuck::Pod`.
    const fn derives_bytemuck_pod<T: bytemuck::Pod>() {}

    macro_rules! pod {
        ($($t:ty),* $(,)?) => {$(
            const _: () = derives_bytemuck_pod::<$t>();
            // SAFETY: aya::Pod asks what bytemuck::Pod does (plain old data:
            // any bit pattern valid, no padding), and the type derives
            // bytemuck::Pod, whose derive refuses to compile a type that is not
            // #[repr(C)], has a field that is not Pod, or has implicit padding.
            unsafe impl aya::Pod for $t {}
        )*};
    }
    pod!(
        Meta,
        ServiceKey,
        BandShape,
        ServiceValue,
        FlowKey,
        FlowValue,
        WorkerPortValue
    );
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::mem::{align_of, offset_of, size_of};

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<Meta>(), 8);
        assert_eq!(size_of::<ServiceKey>(), 20);
        assert_eq!(offset_of!(ServiceKey, addr), 0);
        assert_eq!(offset_of!(ServiceKey, port), 16);
        assert_eq!(offset_of!(ServiceKey, family), 18);
        assert_eq!(align_of::<ServiceKey>(), 2);

        assert_eq!(size_of::<BandShape>(), 16);
        assert_eq!(offset_of!(BandShape, band_mask), 0);
        assert_eq!(offset_of!(BandShape, band_shift), 4);
        assert_eq!(offset_of!(BandShape, present), 8);
        assert_eq!(offset_of!(BandShape, position), 12);
        assert_eq!(size_of::<ServiceValue>(), 40);
        assert_eq!(offset_of!(ServiceValue, index), 0);
        assert_eq!(offset_of!(ServiceValue, _pad), 4);
        assert_eq!(offset_of!(ServiceValue, shapes), 8);

        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(offset_of!(FlowKey, client_addr), 0);
        assert_eq!(offset_of!(FlowKey, local_addr), 16);
        assert_eq!(offset_of!(FlowKey, client_port), 32);
        assert_eq!(offset_of!(FlowKey, public_port), 34);
        assert_eq!(offset_of!(FlowKey, family), 36);
        assert_eq!(offset_of!(FlowKey, _pad), 38);

        assert_eq!(size_of::<FlowValue>(), 8);
        assert_eq!(offset_of!(FlowValue, worker_port), 0);
        assert_eq!(offset_of!(FlowValue, service), 2);
        assert_eq!(offset_of!(FlowValue, syn_seq), 4);

        assert_eq!(size_of::<WorkerPortValue>(), 4);
        assert_eq!(offset_of!(WorkerPortValue, service), 0);
        assert_eq!(offset_of!(WorkerPortValue, public_port), 2);
    }

    #[test]
    fn steering_index_covers_the_array_without_overlap() {
        assert_eq!(steering_index(0, 0, 0), 0);
        assert_eq!(steering_index(0, 0, MAX_BANDS - 1), MAX_BANDS - 1);
        assert_eq!(steering_index(0, 1, 0), MAX_BANDS);
        assert_eq!(steering_index(1, 0, 0), MAX_SERVICES * MAX_BANDS);
        assert_eq!(
            steering_index(SLOTS - 1, MAX_SERVICES - 1, MAX_BANDS - 1),
            STEERING_ENTRIES - 1
        );
    }

    #[test]
    fn port_bits_cover_both_kinds_without_overlap() {
        assert_eq!(port_bit(PORT_KIND_PUBLIC, 0), (0, 1));
        assert_eq!(port_bit(PORT_KIND_PUBLIC, 33), (1, 2));
        assert_eq!(
            port_bit(PORT_KIND_PUBLIC, u16::MAX),
            (PORT_WORDS - 1, 1 << 31)
        );
        assert_eq!(port_bit(PORT_KIND_WORKER, 0), (PORT_WORDS, 1));
        assert_eq!(
            port_bit(PORT_KIND_WORKER, u16::MAX),
            (PORT_ENTRIES - 1, 1 << 31)
        );
    }

    #[test]
    fn counters_are_dense() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }
}
