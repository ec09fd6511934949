//! The steering table as both programs read it: the `services` hash, the
//! double-buffered `steering` array, the `active` slot index and `meta`.
//! The tc programs (`steer.rs`) and the sk_lookup program (`sk_lookup.rs`)
//! compute a client's band and worker port with these same functions, each in
//! its own object with its own copy of these maps.

use aya_ebpf::{
    btf_maps::{Array, HashMap},
    macros::btf_map,
};
use ipcluster_common::{
    ACTIVE_ENTRIES, FAMILY_V4, FAMILY_V6, MAX_BANDS, MAX_SERVICES, Meta, SLOTS, STEERING_ENTRIES,
    ServiceKey, ServiceValue, steering_index,
};

#[btf_map(name = "meta")]
pub static META: Array<Meta, 1> = Array::new();
#[btf_map(name = "services")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue, { MAX_SERVICES as usize }> = HashMap::new();
#[btf_map(name = "steering")]
pub static STEERING: Array<u32, { STEERING_ENTRIES as usize }> = Array::new();
/// Entry 0: the active slot; entry `ACTIVE_PUBLISHED`: tables published so
/// far (the tc programs find the newest remembered table with it).
#[btf_map(name = "active")]
pub static ACTIVE: Array<u32, { ACTIVE_ENTRIES as usize }> = Array::new();

/// The slot the programs read now (0 or 1).
#[inline(always)]
pub fn active_slot() -> u32 {
    match ACTIVE.get(0) {
        Some(a) => *a & 1,
        None => 0,
    }
}

/// The low 32 bits of an address (IPv4 in the first four bytes), the band's input.
#[inline(always)]
pub fn low32(family: u16, addr: &[u8; 16]) -> u32 {
    if family == FAMILY_V4 {
        u32::from_be_bytes([addr[0], addr[1], addr[2], addr[3]])
    } else {
        u32::from_be_bytes([addr[12], addr[13], addr[14], addr[15]])
    }
}

/// The service a connection to (`addr`, `port`) belongs to: the exact
/// (address, port) entry, else the wildcard of its family, else (IPv4) the
/// IPv6 wildcard, which a dual-stack `[::]` listener also serves. The flag is
/// true when a wildcard entry matched (the destination address was not
/// checked against the host's own addresses).
#[inline(always)]
pub fn find_service(family: u16, addr: [u8; 16], port: u16) -> Option<(ServiceValue, bool)> {
    let mut key = ServiceKey { addr, port, family };
    if let Some(v) = SERVICES.get_ptr(key) {
        // SAFETY: a valid map value pointer; we copy it out.
        return Some((unsafe { *v }, false));
    }
    key.addr = [0; 16];
    if let Some(v) = SERVICES.get_ptr(key) {
        // SAFETY: as above.
        return Some((unsafe { *v }, true));
    }
    if family == FAMILY_V4 {
        key.family = FAMILY_V6;
        if let Some(v) = SERVICES.get_ptr(key) {
            // SAFETY: as above.
            return Some((unsafe { *v }, true));
        }
    }
    None
}

/// The worker port of the client's band in `slot`, 0 when the service is not
/// in that slot's table or the band is empty.
#[inline(always)]
pub fn slot_port(service: &ServiceValue, slot: u32, low32: u32) -> u16 {
    let shape = if slot == 0 {
        service.shapes[0]
    } else {
        service.shapes[1]
    };
    if shape.present == 0 {
        return 0;
    }
    let band = (low32.checked_shr(shape.band_shift).unwrap_or(0) & shape.band_mask) % MAX_BANDS;
    let index = steering_index(slot % SLOTS, service.index % MAX_SERVICES, band);
    match STEERING.get(index) {
        Some(port) => *port as u16,
        None => 0,
    }
}
