//! The sk_lookup program: when the kernel looks up the listening socket for a
//! new TCP connection to a configured service, hand it to the listening socket
//! of the client's band's worker (the active slot of the steering table), or
//! to the previous slot's worker when the active one has no socket in the map.
//! Anything else (UDP, other ports, a band with no socket) returns at once and
//! the kernel's own lookup goes on. Established connections never get here:
//! the kernel finds them in its established table first.

use aya_ebpf::{
    bindings::{BPF_SK_LOOKUP_F_REPLACE, sk_action::SK_PASS},
    btf_maps::{PerCpuArray, SockHash},
    macros::{btf_map, sk_lookup},
    programs::SkLookupContext,
};
use core::ptr::read_volatile;
use ipcluster_common::{
    FAMILY_V4, FAMILY_V6,
    sk_lookup::{COUNTER_COUNT, MAX_SOCKETS, SkCounter},
};

use crate::table::{active_slot, find_service, low32, slot_port};

#[btf_map(name = "sockets")]
static SOCKETS: SockHash<u32, { MAX_SOCKETS as usize }> = SockHash::new();
#[btf_map(name = "sk_counters")]
static SK_COUNTERS: PerCpuArray<u64, { COUNTER_COUNT as usize }> = PerCpuArray::new();

const IPPROTO_TCP: u32 = 6;

#[inline(always)]
fn count(counter: SkCounter) {
    if let Some(c) = SK_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: a per-CPU slot; programs do not migrate CPUs while running.
        unsafe { *c += 1 };
    }
}

#[sk_lookup]
pub fn ipcluster_sk_lookup(ctx: SkLookupContext) -> u32 {
    steer(&ctx);
    // Always let the lookup go on: with a socket assigned the kernel uses it,
    // without one it answers as it would have anyway.
    SK_PASS
}

/// Copy the four 32-bit words of an IPv6 address field (the context allows
/// loads of at most four bytes there).
#[inline(always)]
fn ip6_bytes(words: *const [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for i in 0..4 {
        // SAFETY: `words` points into the program's context.
        let w = unsafe { read_volatile((words as *const u32).add(i)) }.to_ne_bytes();
        out[i * 4..i * 4 + 4].copy_from_slice(&w);
    }
    out
}

#[inline(always)]
fn steer(ctx: &SkLookupContext) {
    let l = ctx.lookup;
    // SAFETY: the kernel passes a valid context; fields are read one by one
    // with loads of their own size, as the verifier requires.
    let (protocol, family) =
        unsafe { (read_volatile(&(*l).protocol), read_volatile(&(*l).family)) };
    if protocol != IPPROTO_TCP {
        return;
    }
    let mut remote = [0u8; 16];
    let mut local = [0u8; 16];
    let family = family as u16;
    if family == FAMILY_V4 {
        // SAFETY: as above; IPv4 addresses are in network byte order in memory.
        let (r, a) = unsafe {
            (
                read_volatile(&(*l).remote_ip4),
                read_volatile(&(*l).local_ip4),
            )
        };
        remote[..4].copy_from_slice(&r.to_ne_bytes());
        local[..4].copy_from_slice(&a.to_ne_bytes());
    } else if family == FAMILY_V6 {
        // SAFETY: as above.
        unsafe {
            remote = ip6_bytes(&(*l).remote_ip6);
            local = ip6_bytes(&(*l).local_ip6);
        }
    } else {
        return;
    }
    // SAFETY: as above; the local port is in host byte order.
    let port = unsafe { read_volatile(&(*l).local_port) } as u16;
    // A wildcard service needs no local-destination check here: the kernel
    // runs sk_lookup only for packets it delivers to this host.
    let Some((service, _)) = find_service(family, local, port) else {
        return;
    };
    let low = low32(family, &remote);
    let active = active_slot();
    // REPLACE: while a new program takes over from an old one both run, and
    // the later one must be able to confirm (or change) the earlier choice.
    let flags = BPF_SK_LOOKUP_F_REPLACE as u64;
    let first = slot_port(&service, active, low);
    if first != 0
        && SOCKETS
            .redirect_sk_lookup(ctx, u32::from(first), flags)
            .is_ok()
    {
        count(SkCounter::Assigned);
        return;
    }
    let second = slot_port(&service, 1 - active, low);
    if second != 0
        && second != first
        && SOCKETS
            .redirect_sk_lookup(ctx, u32::from(second), flags)
            .is_ok()
    {
        count(SkCounter::Fallbacks);
        return;
    }
    count(SkCounter::Misses);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
