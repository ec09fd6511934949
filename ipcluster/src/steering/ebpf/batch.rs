//! `BPF_MAP_UPDATE_BATCH`: many entries of one map written by one `bpf()`
//! call. aya 0.14 has no batch operations, and a 256-band publish writes
//! about 800 array and hash entries: one syscall each cost most of its time.
//! The kernel (5.6+) applies the entries in order and reports how many it
//! wrote; the caller falls back to single updates when the call fails.

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::Pod;
use aya::maps::MapData;

/// `BPF_MAP_UPDATE_BATCH` (include/uapi/linux/bpf.h, `enum bpf_cmd`).
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// The `batch` member of `union bpf_attr`; the kernel accepts a shorter
/// attribute than its own union when the fields after it are zero.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Write `entries` into `map` with one call. `Err` carries the OS error and
/// how many entries were written before it (the rest were not).
pub(crate) fn update<K: Pod, V: Pod>(
    map: &MapData,
    entries: &[(K, V)],
) -> Result<(), (std::io::Error, usize)> {
    if entries.is_empty() {
        return Ok(());
    }
    let keys: Vec<K> = entries.iter().map(|(k, _)| *k).collect();
    let values: Vec<V> = entries.iter().map(|(_, v)| *v).collect();
    let count = u32::try_from(entries.len())
        .map_err(|_| (std::io::Error::from_raw_os_error(libc::E2BIG), 0))?;
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count,
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    // SAFETY: `attr` points at `count` keys and values of the map's sizes
    // (the typed map checked them), all alive until the call returns; the
    // kernel only reads them and writes `attr.count`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            &mut attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        let error = std::io::Error::last_os_error();
        return Err((error, (attr.count as usize).min(entries.len())));
    }
    Ok(())
}
