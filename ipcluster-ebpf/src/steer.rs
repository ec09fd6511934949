//! The two tc programs.
//!
//! Ingress: a TCP packet to a configured service (destination address and
//! public port, or the wildcard entry of its family, then only when the
//! routing table delivers it to this host) gets its destination port
//! rewritten to the worker port of the client's band. The connection's flow
//! entry decides first; a new connection (a plain SYN) is steered by the
//! active slot of the steering table and recorded, unless its flow entry
//! names a connection still alive in the socket table (then the SYN is
//! refused the take-over); a later packet whose flow entry was evicted asks
//! the socket table which generation's worker owns it, among the last
//! `HISTORY` published tables. An ICMP/ICMPv6 error about a steered
//! connection gets the worker port back in its quote.
//!
//! Egress: a reply from a worker port gets its source port rewritten back to
//! the public port when the flow table says this very connection was steered
//! to that worker port. A direct connection to a worker (a health check) is
//! recorded under its own key on its SYN and never rewritten. Without any
//! flow entry (evicted), a reply sent by a local socket is rewritten when a
//! remembered table gives the client's band that worker port.
//!
//! Both programs test a port bitmap first: packets of unrelated ports pass
//! after one array lookup. Everything else (UDP, fragments, malformed or
//! truncated headers) passes untouched. Verdicts are `TC_ACT_UNSPEC`
//! (`TCX_NEXT`): the next program or filter on the hook, if any, still runs.
//! The docs: `docs/ebpf-datapath.md`.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NOT_FWDED,
        TC_ACT_UNSPEC, bpf_fib_lookup, bpf_hdr_start_off::BPF_HDR_START_NET, bpf_sock_tuple,
    },
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray},
    helpers::{bpf_fib_lookup, bpf_sk_release, bpf_skb_load_bytes_relative, bpf_skc_lookup_tcp},
    macros::{btf_map, classifier},
    programs::TcContext,
};
use aya_log_ebpf::{debug, info, warn};
use ipcluster_common::{
    ACTIVE_PUBLISHED, BandShape, HISTORY, HISTORY_ENTRIES, HISTORY_SHAPE_ENTRIES, history_index,
};
use ipcluster_common::{
    COUNTER_COUNT, Counter, DEFAULT_FLOW_ENTRIES, FAMILY_V4, FAMILY_V6, FlowKey, FlowValue,
    MAX_BANDS, MAX_SERVICES, MAX_WORKER_PORTS, PORT_ENTRIES, PORT_KIND_PUBLIC, PORT_KIND_WORKER,
    ServiceValue, WorkerPortValue, port_bit,
};

use crate::table::{self, ACTIVE, slot_port};

// The steering table (`meta`, `services`, `steering`, `active`) is declared in
// `table.rs`, shared with the sk_lookup object; the maps below are the tc
// programs' own.
#[btf_map(name = "flows")]
static FLOWS: LruHashMap<FlowKey, FlowValue, { DEFAULT_FLOW_ENTRIES as usize }> = LruHashMap::new();
#[btf_map(name = "worker_ports")]
static WORKER_PORTS: HashMap<u32, WorkerPortValue, { MAX_WORKER_PORTS as usize }> = HashMap::new();
#[btf_map(name = "counters")]
static COUNTERS: PerCpuArray<u64, { COUNTER_COUNT as usize }> = PerCpuArray::new();
#[btf_map(name = "history")]
static HISTORY_PORTS: Array<u32, { HISTORY_ENTRIES as usize }> = Array::new();
#[btf_map(name = "history_shapes")]
static HISTORY_SHAPES: Array<BandShape, { HISTORY_SHAPE_ENTRIES as usize }> = Array::new();
#[btf_map(name = "ports")]
static PORTS: Array<u32, { PORT_ENTRIES as usize }> = Array::new();

/// Let the next program (tcx) or filter (cls_bpf) decide: we never drop.
const NEXT: i32 = TC_ACT_UNSPEC;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
/// ICMP and ICMPv6 headers of error messages: type, code, checksum, 4 bytes.
const ICMP_HLEN: usize = 8;
const ICMP_CHECK: usize = 2;
const IPV6_HLEN: usize = 40;
/// IPv6 extension headers skipped before giving up on a packet.
const MAX_IPV6_EXTENSIONS: usize = 4;
/// Byte offsets inside the TCP header.
const TCP_SPORT: usize = 0;
const TCP_DPORT: usize = 2;
const TCP_CHECK: usize = 16;
const TCP_HLEN: usize = 20;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;
/// `sk_state` of a listening socket (include/net/tcp_states.h).
const TCP_LISTEN: u32 = 10;
const TCP_TIME_WAIT: u32 = 6;
const TCP_CLOSE: u32 = 7;
const TCP_FLAG_FIN: u8 = 0x01;
const TCP_FLAG_RST: u8 = 0x04;
/// `skb->pkt_type` of a frame for another host's MAC address.
const PACKET_OTHERHOST: u32 = 3;
/// `lo` has this index in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;
/// `BPF_F_HDR_FIELD_MASK` size of a 16-bit field for `l4_csum_replace`.
const CSUM_FIELD_16: u64 = 2;

/// The parts of a TCP/IP packet the programs look at. Ports in host order,
/// addresses as in `ipcluster_common` (IPv4 in the first four bytes).
struct Tcp {
    family: u16,
    src: [u8; 16],
    dst: [u8; 16],
    /// Offset of the TCP header from the start of the frame.
    l4: usize,
    sport: u16,
    dport: u16,
    /// The sequence number as read (network order).
    seq: u32,
    flags: u8,
}

impl Tcp {
    /// The low 32 bits of the source address, the band's input.
    #[inline(always)]
    fn src_low32(&self) -> u32 {
        table::low32(self.family, &self.src)
    }

    /// A plain SYN. SYN|ACK, SYN|RST and SYN|FIN never open a connection.
    #[inline(always)]
    fn is_new_connection(&self) -> bool {
        self.flags & (TCP_FLAG_SYN | TCP_FLAG_ACK | TCP_FLAG_RST | TCP_FLAG_FIN) == TCP_FLAG_SYN
    }
}

/// Kernel-side log records for rare events, through aya-log (the master
/// forwards them into its own log with `--ebpf-log`; without it the level is
/// patched to off at load and each call costs one global read).
#[derive(Clone, Copy)]
enum Event {
    RefusedHijack,
    TableMiss,
    Fallback,
}

/// A subprogram: its code (and the verifier's walk of it) is not repeated at
/// every call site.
#[inline(never)]
fn log_event(ctx: &TcContext, event: Event, pkt: &Tcp, port: u16) {
    let v4 = u32::from_be_bytes([pkt.src[0], pkt.src[1], pkt.src[2], pkt.src[3]]);
    let client_port = pkt.sport;
    match (event, pkt.family == FAMILY_V4) {
        (Event::RefusedHijack, true) => info!(
            ctx,
            "refused a SYN from {:i}:{} that would take over a live connection on worker port {}",
            v4,
            client_port,
            port
        ),
        (Event::RefusedHijack, false) => info!(
            ctx,
            "refused a SYN from [{:i}]:{} that would take over a live connection on worker port {}",
            pkt.src,
            client_port,
            port
        ),
        (Event::TableMiss, _) => warn!(
            ctx,
            "table miss: no worker for the band of a client of public port {}", port
        ),
        (Event::Fallback, true) => debug!(
            ctx,
            "no flow entry for {:i}:{}: the socket table names worker port {}",
            v4,
            client_port,
            port
        ),
        (Event::Fallback, false) => debug!(
            ctx,
            "no flow entry for [{:i}]:{}: the socket table names worker port {}",
            pkt.src,
            client_port,
            port
        ),
    }
}

#[inline(always)]
fn count(counter: Counter) {
    if let Some(c) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: a per-CPU slot; programs do not migrate CPUs while running.
        unsafe { *c += 1 };
    }
}

/// `size_of::<T>()` bytes of the packet at `offset`, read in place. They
/// lie in the skb's linear data for the headers of packets on `lo` and of
/// locally sent ones; a paged header is first made linear with
/// `bpf_skb_pull_data` (as the kernel's own parsers pull headers). Reading
/// in place saves a helper call per header on the hot path.
#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, offset: usize) -> Option<T> {
    if let Some(value) = read_linear(ctx, offset) {
        return Some(value);
    }
    ctx.pull_data((offset + core::mem::size_of::<T>()) as u32)
        .ok()?;
    read_linear(ctx, offset)
}

#[inline(always)]
fn read_linear<T: Copy>(ctx: &TcContext, offset: usize) -> Option<T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() <= end {
        // SAFETY: the bytes lie between `data` and `data_end` (checked just
        // above, as the verifier demands); `T` is plain bytes or integers.
        Some(unsafe { core::ptr::read_unaligned((start + offset) as *const T) })
    } else {
        None
    }
}

/// Where the IP header starts: after an Ethernet header (Ethernet devices and
/// `lo`), or at once on L3 devices (tun, WireGuard) that carry no link-layer
/// header. The IP version comes from the skb's protocol, never from the
/// bytes. `None` for anything but IPv4 and IPv6.
#[inline(always)]
fn network_offset(ctx: &TcContext) -> Option<(u16, usize)> {
    let protocol = u16::from_be(ctx.skb.protocol() as u16);
    let version = match protocol {
        ETH_P_IP => 4,
        ETH_P_IPV6 => 6,
        _ => return None,
    };
    // Two bytes, not one: the verifier finds no range in `data_end > data`,
    // which is what a one-byte bounds check at offset 0 compiles to.
    let first: [u8; 2] = read(ctx, 0)?;
    if first[0] >> 4 != version {
        // Not an IP header at offset 0: a link-layer header comes first.
        return Some((protocol, ETH_HLEN));
    }
    let at_ethertype = u16::from_be(read::<u16>(ctx, 12)?);
    if at_ethertype != protocol {
        // No ethertype where an Ethernet header has one: an L3 device.
        return Some((protocol, 0));
    }
    // Both readings are possible (a MAC address starting like an IP header):
    // ask the kernel where the network header is and compare.
    let mut net = [0u8; 8];
    // SAFETY: the helper writes at most `net.len()` bytes into `net`.
    let loaded = unsafe {
        bpf_skb_load_bytes_relative(
            ctx.skb.skb.cast::<c_void>(),
            0,
            net.as_mut_ptr().cast::<c_void>(),
            net.len() as u32,
            BPF_HDR_START_NET,
        )
    };
    if loaded < 0 {
        return None;
    }
    let at_eth_hlen: [u8; 8] = read(ctx, ETH_HLEN)?;
    if net == at_eth_hlen {
        Some((protocol, ETH_HLEN))
    } else {
        Some((protocol, 0))
    }
}

/// Parse the link-layer header (if any), IPv4/IPv6 and the TCP header.
/// An error for anything that is not a complete, unfragmented TCP header
/// (saying whether it is ICMP).
#[inline(always)]
fn parse_tcp(ctx: &TcContext) -> Result<Tcp, NotTcp> {
    let (protocol, l3) = network_offset(ctx).ok_or(NotTcp::Other)?;
    let (family, src, dst, l4) = if protocol == ETH_P_IP {
        parse_ipv4(ctx, l3)?
    } else {
        parse_ipv6(ctx, l3)?
    };
    let tcp: [u8; TCP_HLEN] = read(ctx, l4).ok_or(NotTcp::Other)?;
    if tcp[12] >> 4 < 5 {
        return Err(NotTcp::Other);
    }
    Ok(Tcp {
        family,
        src,
        dst,
        l4,
        sport: u16::from_be_bytes([tcp[0], tcp[1]]),
        dport: u16::from_be_bytes([tcp[2], tcp[3]]),
        seq: u32::from_ne_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        flags: tcp[13],
    })
}

#[inline(always)]
fn parse_ipv4(ctx: &TcContext, l3: usize) -> Result<(u16, [u8; 16], [u8; 16], usize), NotTcp> {
    let ip: [u8; 20] = read(ctx, l3).ok_or(NotTcp::Other)?;
    if ip[0] >> 4 != 4 {
        return Err(NotTcp::Other);
    }
    if ip[9] != IPPROTO_TCP {
        return Err(if ip[9] == IPPROTO_ICMP {
            NotTcp::Icmp
        } else {
            NotTcp::Other
        });
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ihl < 20 {
        return Err(NotTcp::Other);
    }
    // More-fragments flag or a fragment offset: only a whole datagram is steered.
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
        return Err(NotTcp::Other);
    }
    // The total length must hold the TCP header. 0 is what a BIG TCP (GSO
    // larger than 64 KiB) packet carries: steer and restore it too.
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if total != 0 && total < ihl + TCP_HLEN {
        return Err(NotTcp::Other);
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src[..4].copy_from_slice(&ip[12..16]);
    dst[..4].copy_from_slice(&ip[16..20]);
    Ok((FAMILY_V4, src, dst, l3 + ihl))
}

#[inline(always)]
fn parse_ipv6(ctx: &TcContext, l3: usize) -> Result<(u16, [u8; 16], [u8; 16], usize), NotTcp> {
    let ip: [u8; IPV6_HLEN] = read(ctx, l3).ok_or(NotTcp::Other)?;
    if ip[0] >> 4 != 6 {
        return Err(NotTcp::Other);
    }
    if ip[6] == IPPROTO_ICMPV6 {
        return Err(NotTcp::Icmp);
    }
    let mut next = ip[6];
    let mut offset = l3 + IPV6_HLEN;
    for _ in 0..MAX_IPV6_EXTENSIONS {
        match next {
            // Hop-by-hop, routing, destination options: length in 8-byte units.
            0 | 43 | 60 => {
                let ext: [u8; 2] = read(ctx, offset).ok_or(NotTcp::Other)?;
                next = ext[0];
                offset += (usize::from(ext[1]) + 1) * 8;
            }
            // Authentication header: length in 4-byte units, minus 2.
            51 => {
                let ext: [u8; 2] = read(ctx, offset).ok_or(NotTcp::Other)?;
                next = ext[0];
                offset += (usize::from(ext[1]) + 2) * 4;
            }
            // TCP, or anything we do not steer (fragment, ESP, UDP, ICMPv6…).
            _ => break,
        }
    }
    if next != IPPROTO_TCP {
        return Err(NotTcp::Other);
    }
    // The payload length must cover the extension headers and the TCP
    // header; 0 is a jumbogram or a BIG TCP packet.
    let payload = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    if payload != 0 && payload < offset - l3 - IPV6_HLEN + TCP_HLEN {
        return Err(NotTcp::Other);
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&ip[8..24]);
    dst.copy_from_slice(&ip[24..40]);
    Ok((FAMILY_V6, src, dst, offset))
}

/// The service a packet is addressed to (see [`table::find_service`]); the
/// flag is true when a wildcard entry matched (the destination address was
/// not checked against the host's own addresses).
#[inline(always)]
fn find_service(pkt: &Tcp) -> Option<(ServiceValue, bool)> {
    table::find_service(pkt.family, pkt.dst, pkt.dport)
}

/// Whether the `ports` bitmap has the bit of `port` of `kind`
/// (`PORT_KIND_PUBLIC`, `PORT_KIND_WORKER`): one array lookup.
#[inline(always)]
fn port_is(kind: u32, port: u16) -> bool {
    let (index, bit) = port_bit(kind, port);
    matches!(PORTS.get(index), Some(word) if *word & bit != 0)
}

/// Whether the routing table delivers this packet to the host itself, as the
/// kernel's own input route lookup decides: `bpf_fib_lookup` answers "not
/// forwarded" for a local destination, and "forwarding disabled" when the
/// receiving device does not route (a packet not for this host is dropped
/// there anyway — frames for other hosts' MAC addresses, which a bridge
/// port carries, are told apart before). Packets received on `lo` are local
/// by definition.
#[inline(always)]
fn is_local_destination(ctx: &TcContext, pkt: &Tcp) -> bool {
    // SAFETY: reading a field of the program's own context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if ifindex == LOOPBACK_IFINDEX {
        return true;
    }
    // A frame addressed to another host's MAC address (a bridge port, a
    // device in promiscuous mode) is never delivered locally by this device:
    // IP drops it, and a bridge passes what is for this host up through the
    // bridge device, whose own hook sees it as the host's.
    // SAFETY: reading a field of the program's own context.
    if unsafe { (*ctx.skb.skb).pkt_type } == PACKET_OTHERHOST {
        return false;
    }
    // SAFETY: bpf_fib_lookup is plain integers; all-zero is a valid value.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = pkt.family as u8;
    params.l4_protocol = IPPROTO_TCP;
    params.sport = pkt.sport.to_be();
    params.dport = pkt.dport.to_be();
    params.ifindex = ifindex;
    // SAFETY: writing plain integer fields of the unions.
    unsafe {
        if pkt.family == FAMILY_V4 {
            params.__bindgen_anon_3.ipv4_src =
                u32::from_ne_bytes([pkt.src[0], pkt.src[1], pkt.src[2], pkt.src[3]]);
            params.__bindgen_anon_4.ipv4_dst =
                u32::from_ne_bytes([pkt.dst[0], pkt.dst[1], pkt.dst[2], pkt.dst[3]]);
        } else {
            for i in 0..4 {
                let j = i * 4;
                params.__bindgen_anon_3.ipv6_src[i] = u32::from_ne_bytes([
                    pkt.src[j],
                    pkt.src[j + 1],
                    pkt.src[j + 2],
                    pkt.src[j + 3],
                ]);
                params.__bindgen_anon_4.ipv6_dst[i] = u32::from_ne_bytes([
                    pkt.dst[j],
                    pkt.dst[j + 1],
                    pkt.dst[j + 2],
                    pkt.dst[j + 3],
                ]);
            }
        }
    }
    // SAFETY: the helper reads and writes `params`, of the size given.
    let verdict = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb.cast::<c_void>(),
            &mut params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    // An error (which the helper reports only for malformed parameters)
    // keeps the behaviour of a host-only service.
    verdict < 0
        || verdict == i64::from(BPF_FIB_LKUP_RET_NOT_FWDED)
        || verdict == i64::from(BPF_FIB_LKUP_RET_FWD_DISABLED)
}

/// The worker port of the client's band in the remembered table at history
/// `position`, 0 when the service was not in that table.
#[inline(always)]
fn history_port(index: u32, position: u32, low32: u32) -> u16 {
    let index = index % MAX_SERVICES;
    let position = position % HISTORY;
    let Some(shape) = HISTORY_SHAPES.get(position * MAX_SERVICES + index) else {
        return 0;
    };
    if shape.present == 0 {
        return 0;
    }
    let band = (low32.checked_shr(shape.band_shift).unwrap_or(0) & shape.band_mask) % MAX_BANDS;
    match HISTORY_PORTS.get(history_index(position, index, band)) {
        Some(port) => *port as u16,
        None => 0,
    }
}

/// The number of tables published so far (the newest remembered one is at
/// position `(published - 1) % HISTORY`).
#[inline(always)]
fn published() -> u32 {
    match ACTIVE.get(ACTIVE_PUBLISHED) {
        Some(n) => *n,
        None => 0,
    }
}

/// The worker port, among the remembered tables (newest first), that holds
/// this packet's connection. `tried` was looked up already.
#[inline(always)]
fn owner_in_history(ctx: &TcContext, pkt: &Tcp, index: u32, low32: u32, tried: u16) -> Option<u16> {
    let published = published();
    let mut last = tried;
    for age in 0..HISTORY {
        if age >= published {
            break;
        }
        let port = history_port(index, published.wrapping_sub(1 + age), low32);
        if port == 0 || port == last || port == tried {
            continue;
        }
        last = port;
        if has_connection(ctx, pkt, port) {
            return Some(port);
        }
    }
    None
}

/// Whether the kernel has a non-listening socket (established, SYN-received,
/// closing…) for this packet's connection on `port`, i.e. the connection
/// lives (or lingers) on that worker.
#[inline(always)]
fn has_connection(ctx: &TcContext, pkt: &Tcp, port: u16) -> bool {
    matches!(socket_state(ctx, pkt, port), Some(state) if state != TCP_LISTEN)
}

/// Whether a connection with this packet's addresses and ports lives on
/// `port`: a socket that is neither listening nor closed (`TIME_WAIT` and
/// `CLOSE` sockets let the client reuse its port for a new connection).
#[inline(always)]
fn is_alive(ctx: &TcContext, pkt: &Tcp, port: u16) -> bool {
    matches!(
        socket_state(ctx, pkt, port),
        Some(state) if state != TCP_LISTEN && state != TCP_TIME_WAIT && state != TCP_CLOSE
    )
}

/// The state of the socket the kernel would deliver this packet to if its
/// destination port were `port` (`None`: no socket at all).
#[inline(always)]
fn socket_state(ctx: &TcContext, pkt: &Tcp, port: u16) -> Option<u32> {
    // SAFETY: bpf_sock_tuple is plain integers; all-zero is a valid value.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = if pkt.family == FAMILY_V4 {
        // SAFETY: writing plain integer fields of the union.
        unsafe {
            let t = &mut tuple.__bindgen_anon_1.ipv4;
            t.saddr = u32::from_ne_bytes([pkt.src[0], pkt.src[1], pkt.src[2], pkt.src[3]]);
            t.daddr = u32::from_ne_bytes([pkt.dst[0], pkt.dst[1], pkt.dst[2], pkt.dst[3]]);
            t.sport = pkt.sport.to_be();
            t.dport = port.to_be();
        }
        12
    } else {
        // SAFETY: as above.
        unsafe {
            let t = &mut tuple.__bindgen_anon_1.ipv6;
            for i in 0..4 {
                let j = i * 4;
                t.saddr[i] = u32::from_ne_bytes([
                    pkt.src[j],
                    pkt.src[j + 1],
                    pkt.src[j + 2],
                    pkt.src[j + 3],
                ]);
                t.daddr[i] = u32::from_ne_bytes([
                    pkt.dst[j],
                    pkt.dst[j + 1],
                    pkt.dst[j + 2],
                    pkt.dst[j + 3],
                ]);
            }
            t.sport = pkt.sport.to_be();
            t.dport = port.to_be();
        }
        36
    };
    // SAFETY: the helper reads `size` bytes of `tuple`; a non-null result is
    // released before returning, as the verifier demands.
    unsafe {
        let sk = bpf_skc_lookup_tcp(
            ctx.skb.skb.cast::<c_void>(),
            &mut tuple,
            size,
            BPF_F_CURRENT_NETNS as u64,
            0,
        );
        if sk.is_null() {
            return None;
        }
        let state = (*sk).state;
        bpf_sk_release(sk.cast::<c_void>());
        Some(state)
    }
}

/// Rewrite the 16-bit port at `offset` (from `old` to `new`, host order) and
/// fix the TCP checksum. With `CHECKSUM_PARTIAL` (loopback) the kernel leaves
/// the checksum field alone, which is right: ports are not in the pseudo-header.
#[inline(always)]
fn rewrite_port(ctx: &TcContext, l4: usize, offset: usize, old: u16, new: u16) -> bool {
    let old_raw = old.to_be();
    let new_raw = new.to_be();
    ctx.l4_csum_replace(
        l4 + TCP_CHECK,
        u64::from(old_raw),
        u64::from(new_raw),
        CSUM_FIELD_16,
    )
    .is_ok()
        && ctx.store(l4 + offset, &new_raw, 0).is_ok()
}

#[classifier]
pub fn ipcluster_ingress(ctx: TcContext) -> i32 {
    ingress(&ctx);
    NEXT
}

/// Two subprograms, so that the TCP path and the ICMP path each get their
/// own stack frame (the verifier allows 512 bytes along a call chain).
#[inline(always)]
fn ingress(ctx: &TcContext) {
    match ingress_tcp(ctx) {
        NotTcp::Icmp => {
            translate_icmp_error(ctx);
            count(Counter::Passed);
        }
        NotTcp::Other => count(Counter::Passed),
        NotTcp::No => {}
    }
}

/// What a packet was when it was not steered as TCP.
#[derive(Clone, Copy, PartialEq, Eq)]
enum NotTcp {
    /// It was TCP (and handled).
    No,
    /// ICMP or ICMPv6: maybe an error about a steered connection.
    Icmp,
    /// Anything else: passes.
    Other,
}

#[inline(never)]
fn ingress_tcp(ctx: &TcContext) -> NotTcp {
    match parse_tcp(ctx) {
        Ok(pkt) => {
            ingress_steer(ctx, &pkt);
            NotTcp::No
        }
        Err(kind) => kind,
    }
}

#[inline(always)]
fn ingress_steer(ctx: &TcContext, pkt: &Tcp) {
    // One bitmap lookup for a packet of a steered flow or of another port;
    // the worker-port bit matters only for a SYN (a direct connection).
    if port_is(PORT_KIND_PUBLIC, pkt.dport) && steer(ctx, pkt) {
        return;
    }
    if pkt.is_new_connection() && port_is(PORT_KIND_WORKER, pkt.dport) {
        record_direct_connection(ctx, pkt);
    }
    count(Counter::Passed);
}

/// Steer a packet to a public port. `false` when no service has this
/// (address, port), so that the packet can still be a direct one. A rare
/// event on the way is logged once, after the decision (one call site keeps
/// the verifier's walk short).
#[inline(always)]
fn steer(ctx: &TcContext, pkt: &Tcp) -> bool {
    let mut note: Option<(Event, u16)> = None;
    let handled = decide(ctx, pkt, &mut note);
    if let Some((event, port)) = note {
        log_event(ctx, event, pkt, port);
    }
    handled
}

#[inline(always)]
fn decide(ctx: &TcContext, pkt: &Tcp, note: &mut Option<(Event, u16)>) -> bool {
    let flow_key = FlowKey {
        client_addr: pkt.src,
        local_addr: pkt.dst,
        client_port: pkt.sport,
        public_port: pkt.dport,
        family: pkt.family,
        _pad: 0,
    };
    let new_connection = pkt.is_new_connection();
    if !new_connection {
        // The common case: one flow lookup decides, no service lookup.
        if let Some(port) = flow_worker_port(&flow_key) {
            count(Counter::FlowHits);
            rewrite_dport(ctx, pkt, port);
            return true;
        }
    }
    let Some((service, wildcard)) = find_service(pkt) else {
        return false;
    };
    // Only a connection to this host is steered: a wildcard service must not
    // touch traffic the host routes elsewhere (a container's or a routed
    // client's connection to a remote server's port).
    if wildcard && !is_local_destination(ctx, pkt) {
        count(Counter::Forwarded);
        return true;
    }
    let active = table::active_slot();
    let low32 = pkt.src_low32();
    let worker_port = if new_connection {
        // A new connection follows the active table (a reused client port
        // must not stick to a worker of an older generation)...
        let port = slot_port(&service, active, low32);
        if port == 0 {
            count(Counter::TableMisses);
            *note = Some((Event::TableMiss, pkt.dport));
            return true;
        }
        match FLOWS.get_ptr_mut(flow_key) {
            // ...unless its flow entry names a connection that is still alive:
            // then this SYN is forged or stray, and the live connection keeps
            // its worker (whose socket answers the SYN with a challenge ACK).
            Some(flow) => {
                // SAFETY: a valid map value pointer, read and written in place.
                let (old_port, old_seq) = unsafe { ((*flow).worker_port, (*flow).syn_seq) };
                if old_port == port {
                    if old_seq != pkt.seq {
                        if is_alive(ctx, pkt, port) {
                            count(Counter::RefusedHijacks);
                            *note = Some((Event::RefusedHijack, port));
                        } else {
                            // The client reuses its port for a new connection.
                            // SAFETY: as above.
                            unsafe { (*flow).syn_seq = pkt.seq };
                        }
                    }
                    port
                } else if old_port != 0 && is_alive(ctx, pkt, old_port) {
                    count(Counter::RefusedHijacks);
                    *note = Some((Event::RefusedHijack, old_port));
                    old_port
                } else {
                    record_flow(&flow_key, port, &service, pkt.seq);
                    port
                }
            }
            None => {
                record_flow(&flow_key, port, &service, pkt.seq);
                port
            }
        }
    } else {
        // No flow: evicted (tiny table, SYN flood) or older than the maps.
        // Ask the socket table which generation's worker has the connection:
        // the active table's first, then every remembered table's, newest first.
        let port_active = slot_port(&service, active, low32);
        let port = if port_active != 0 && has_connection(ctx, pkt, port_active) {
            port_active
        } else {
            match owner_in_history(ctx, pkt, service.index, low32, port_active) {
                Some(port) => port,
                None if port_active != 0 => port_active,
                None => slot_port(&service, 1 - active, low32),
            }
        };
        if port == 0 {
            count(Counter::TableMisses);
            *note = Some((Event::TableMiss, pkt.dport));
            return true;
        }
        count(Counter::FlowFallbacks);
        *note = Some((Event::Fallback, port));
        // Re-record the flow so that the replies keep being rewritten.
        let flow = FlowValue {
            worker_port: port,
            service: service.index as u16,
            syn_seq: 0,
        };
        let _ = FLOWS.insert(flow_key, flow, 0);
        port
    };
    rewrite_dport(ctx, pkt, worker_port);
    true
}

#[inline(always)]
fn record_flow(key: &FlowKey, port: u16, service: &ServiceValue, seq: u32) {
    let flow = FlowValue {
        worker_port: port,
        service: service.index as u16,
        syn_seq: seq,
    };
    if FLOWS.insert(key, flow, 0).is_ok() {
        count(Counter::NewFlows);
    }
}

#[inline(always)]
fn rewrite_dport(ctx: &TcContext, pkt: &Tcp, worker_port: u16) {
    if worker_port != pkt.dport && rewrite_port(ctx, pkt.l4, TCP_DPORT, pkt.dport, worker_port) {
        count(Counter::Steered);
    }
}

/// The worker port a steered connection's flow entry names (`None` without
/// an entry).
#[inline(always)]
fn flow_worker_port(key: &FlowKey) -> Option<u16> {
    let flow = FLOWS.get_ptr(key)?;
    // SAFETY: a valid map value pointer.
    let port = unsafe { (*flow).worker_port };
    if port == 0 { None } else { Some(port) }
}

/// A SYN straight to a worker port (a health check, a debugging client) is
/// recorded under its own key (the worker port in place of the public port)
/// with worker port 0, so that its replies are never rewritten, even by the
/// egress fallback. It never changes a steered connection's entry: the same
/// SYN seen again on a second attached device (steered on the first) is
/// recognised by its sequence number, and a SYN reusing the addresses and
/// ports of a steered connection that is still alive is refused.
#[inline(always)]
fn record_direct_connection(ctx: &TcContext, pkt: &Tcp) {
    if !pkt.is_new_connection() {
        return;
    }
    let Some(worker) = WORKER_PORTS.get_ptr(u32::from(pkt.dport)) else {
        return;
    };
    // SAFETY: a valid map value pointer; we copy the fields out.
    let (public_port, service) = unsafe { ((*worker).public_port, (*worker).service) };
    let mut key = FlowKey {
        client_addr: pkt.src,
        local_addr: pkt.dst,
        client_port: pkt.sport,
        public_port,
        family: pkt.family,
        _pad: 0,
    };
    if let Some(steered) = FLOWS.get_ptr(key) {
        // SAFETY: a valid map value pointer; we copy the fields out.
        let (port, seq) = unsafe { ((*steered).worker_port, (*steered).syn_seq) };
        if port == pkt.dport {
            if seq == pkt.seq {
                return;
            }
            if is_alive(ctx, pkt, pkt.dport) {
                count(Counter::RefusedHijacks);
                log_event(ctx, Event::RefusedHijack, pkt, pkt.dport);
                return;
            }
            // A dead connection's entry: the addresses and ports are reused.
            let _ = FLOWS.remove(key);
        }
    }
    key.public_port = pkt.dport;
    let direct = FlowValue {
        worker_port: 0,
        service,
        syn_seq: pkt.seq,
    };
    let _ = FLOWS.insert(key, direct, 0);
}

/// An ICMP error (destination unreachable — fragmentation needed among them
/// —, time exceeded, parameter problem) or ICMPv6 error (packet too big…)
/// arriving for a packet this host sent on a steered connection quotes that
/// packet as the client saw it: from the public port. The worker's socket has
/// the worker port, so the kernel would not find it and path-MTU discovery
/// would stall. Put the quoted source port back to the worker port, as NAT
/// does, keeping the checksums right: the quoted TCP checksum when the quote
/// holds it (the ICMP checksum then stays valid as is), else the ICMP checksum.
#[inline(never)]
fn translate_icmp_error(ctx: &TcContext) -> Option<()> {
    let (protocol, l3) = network_offset(ctx)?;
    let (family, icmp, inner_l3) = if protocol == ETH_P_IP {
        let ip: [u8; 20] = ctx.load(l3).ok()?;
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        if ip[0] >> 4 != 4 || ip[9] != IPPROTO_ICMP || ihl < 20 {
            return None;
        }
        if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
            return None;
        }
        let icmp = l3 + ihl;
        let kind: u8 = ctx.load(icmp).ok()?;
        // Destination unreachable, time exceeded, parameter problem.
        if kind != 3 && kind != 11 && kind != 12 {
            return None;
        }
        (FAMILY_V4, icmp, icmp + ICMP_HLEN)
    } else {
        let ip: [u8; IPV6_HLEN] = ctx.load(l3).ok()?;
        if ip[6] != IPPROTO_ICMPV6 {
            return None;
        }
        let icmp = l3 + IPV6_HLEN;
        let kind: u8 = ctx.load(icmp).ok()?;
        // Destination unreachable, packet too big, time exceeded, parameter problem.
        if !(1..=4).contains(&kind) {
            return None;
        }
        (FAMILY_V6, icmp, icmp + ICMP_HLEN)
    };
    let mut local = [0u8; 16];
    let mut client = [0u8; 16];
    let inner_l4 = if family == FAMILY_V4 {
        let inner: [u8; 20] = ctx.load(inner_l3).ok()?;
        let ihl = usize::from(inner[0] & 0x0f) * 4;
        if inner[0] >> 4 != 4 || inner[9] != IPPROTO_TCP || ihl < 20 {
            return None;
        }
        local[..4].copy_from_slice(&inner[12..16]);
        client[..4].copy_from_slice(&inner[16..20]);
        inner_l3 + ihl
    } else {
        let inner: [u8; IPV6_HLEN] = ctx.load(inner_l3).ok()?;
        if inner[0] >> 4 != 6 || inner[6] != IPPROTO_TCP {
            return None;
        }
        local.copy_from_slice(&inner[8..24]);
        client.copy_from_slice(&inner[24..40]);
        inner_l3 + IPV6_HLEN
    };
    // Every ICMP error quotes at least the ports.
    let ports: [u8; 4] = ctx.load(inner_l4).ok()?;
    let public_port = u16::from_be_bytes([ports[0], ports[1]]);
    if !port_is(PORT_KIND_PUBLIC, public_port) {
        return None;
    }
    let key = FlowKey {
        client_addr: client,
        local_addr: local,
        client_port: u16::from_be_bytes([ports[2], ports[3]]),
        public_port,
        family,
        _pad: 0,
    };
    let worker_port = flow_worker_port(&key)?;
    let old = u64::from(public_port.to_be());
    let new = u64::from(worker_port.to_be());
    let checksum = if (ctx.len() as usize) >= inner_l4 + TCP_CHECK + 2 {
        inner_l4 + TCP_CHECK
    } else {
        icmp + ICMP_CHECK
    };
    ctx.l4_csum_replace(checksum, old, new, CSUM_FIELD_16)
        .ok()?;
    ctx.store(inner_l4 + TCP_SPORT, &worker_port.to_be(), 0)
        .ok()?;
    count(Counter::IcmpTranslated);
    debug!(
        ctx,
        "an ICMP error about a steered connection now names worker port {}", worker_port
    );
    Some(())
}

#[classifier]
pub fn ipcluster_egress(ctx: TcContext) -> i32 {
    egress(&ctx);
    NEXT
}

#[inline(always)]
fn egress(ctx: &TcContext) {
    let Ok(pkt) = parse_tcp(ctx) else {
        count(Counter::Passed);
        return;
    };
    if !port_is(PORT_KIND_WORKER, pkt.sport) {
        count(Counter::Passed);
        return;
    }
    let Some(worker) = WORKER_PORTS.get_ptr(u32::from(pkt.sport)) else {
        count(Counter::Passed);
        return;
    };
    // SAFETY: a valid map value pointer.
    let public_port = unsafe { (*worker).public_port };
    let mut flow_key = FlowKey {
        client_addr: pkt.dst,
        local_addr: pkt.src,
        client_port: pkt.dport,
        public_port,
        family: pkt.family,
        _pad: 0,
    };
    match FLOWS.get_ptr(flow_key) {
        // SAFETY: a valid map value pointer.
        Some(flow) if unsafe { (*flow).worker_port } == pkt.sport => {}
        // Steered to another worker: this reply is of another connection.
        Some(_) => {
            count(Counter::Passed);
            return;
        }
        None => {
            // A direct connection (a health check) keeps its worker port.
            flow_key.public_port = pkt.sport;
            if FLOWS.get_ptr(flow_key).is_some() {
                count(Counter::Passed);
                return;
            }
            // No flow at all: evicted (tiny table, SYN flood). The reply is
            // one of a steered connection if this host sent it (a forwarded
            // packet has no socket) and the table gives the client's band
            // this very worker port, in the active or the previous slot.
            if !sent_by_this_host(ctx) || !is_band_worker(&pkt, public_port) {
                count(Counter::Passed);
                return;
            }
            count(Counter::FlowFallbacks);
        }
    }
    if rewrite_port(ctx, pkt.l4, TCP_SPORT, pkt.sport, public_port) {
        count(Counter::EgressRewrites);
    }
}

/// Whether the packet comes from a local socket (a forwarded one has none).
#[inline(always)]
fn sent_by_this_host(ctx: &TcContext) -> bool {
    // SAFETY: reading the `sk` field of the program's own context.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    !sk.is_null()
}

/// Whether an egress packet's source (worker) port is what either slot of the
/// steering table, or one of the remembered tables, assigns its destination
/// (the client) for `public_port`.
#[inline(always)]
fn is_band_worker(pkt: &Tcp, public_port: u16) -> bool {
    // The service as ingress saw it: local address and public port.
    let as_ingress = Tcp {
        family: pkt.family,
        src: pkt.dst,
        dst: pkt.src,
        l4: pkt.l4,
        sport: pkt.dport,
        dport: public_port,
        seq: pkt.seq,
        flags: pkt.flags,
    };
    let Some((service, _)) = find_service(&as_ingress) else {
        return false;
    };
    let low32 = as_ingress.src_low32();
    if slot_port(&service, 0, low32) == pkt.sport || slot_port(&service, 1, low32) == pkt.sport {
        return true;
    }
    for position in 0..HISTORY {
        if history_port(service.index, position, low32) == pkt.sport {
            return true;
        }
    }
    false
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
