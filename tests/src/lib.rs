//! Shared helpers for the root/kernel tests of ipcluster (run as root:
//! `cargo xtask test`, or `cargo test -p ipcluster-tests`).
//!
//! - [`NetNsGuard`]: the first line of every root test; the test's thread (and
//!   all it starts) runs in a fresh network namespace of its own.
//! - [`require_root`]: fail (never skip) when not root or not in a test's own
//!   network namespace.
//! - [`unique`]: cluster names and TCP ports that no other test (in this or
//!   another test process) uses at the same time.
//! - [`client`]: TCP clients bound to a chosen source address (127.0.0.N looks
//!   like a different client host), with timeouts.
//! - [`worker`]: a tiny threaded TCP server standing in for a worker: greets
//!   each connection with its port, then echoes lines.
//! - [`bpf_objects`]: a cluster's eBPF maps, programs and links, from the kernel.
//! - [`guard`]: run cleanup on drop, even when the test panics.
//! - [`invoke`]: run the binary to completion (with a timeout), check a run
//!   that must fail, and poll until something shows up (a log line).
//! - [`reload`]: load during a reload, every answer kept and checked per band.
//! - [`netns`]: network namespaces (test hosts) joined by veth pairs, removed on drop.
//! - [`multihost`]: clients, a router and two hosts each running a master, in
//!   network namespaces (ECMP or a low-bit split in front).
//! - [`tun`]: an L3 point-to-point link of two tun devices between namespaces.
//! - [`topology`]: small topologies of test hosts (a routed line, a bridge
//!   with guests, a tun pair) built in one call.
//! - [`raw`]: hand-made TCP segments (forged SYNs) sent through a raw socket.
//! - [`conformance`]: the backend-agnostic steering suite, run by
//!   `tests/conformance_<backend>.rs`.

pub mod bpf_objects;
pub mod client;
pub mod cluster;
pub mod conformance;
pub mod guard;
pub mod invoke;
pub mod multihost;
pub mod netns;
pub mod netns_guard;
pub mod raw;
pub mod reload;
pub mod topology;
pub mod tun;
pub mod unique;
pub mod worker;

use std::net::{IpAddr, Ipv4Addr};

pub use netns_guard::NetNsGuard;

/// Fail the test with a clear message unless it runs as root, in a network
/// namespace of its own (see [`NetNsGuard`]). Kernel tests are never skipped
/// silently: CI runs them as root. The helpers that start clusters, build
/// topologies or install steering call this, so a test that forgot its
/// [`NetNsGuard`] fails before it touches the host.
pub fn require_root() {
    assert_root();
    assert!(
        netns_guard::in_own_netns(),
        "this test would change the host's network namespace ({}): begin the test with \
         `let _netns = ipcluster_tests::NetNsGuard::enter();`",
        netns_guard::NetNsId::host()
    );
}

/// Fail the test with a clear message unless it runs as root.
pub(crate) fn assert_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test changes kernel state (iptables, tc, bpffs) and must run as root \
         (euid is {euid}); run it with sudo -E, or through `cargo xtask test`"
    );
}

/// The client address 127.0.0.`n`: every address of 127.0.0.0/8 routes to `lo`,
/// so a socket bound to it before `connect()` looks like another client host.
pub fn loopback_client(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

/// The `count` client addresses 127.0.0.2, 127.0.0.3, … used by the suites.
pub fn loopback_clients(count: u8) -> Vec<IpAddr> {
    (0..count).map(|i| loopback_client(2 + i)).collect()
}

/// Define one `#[test]` per backend for each named function `fn name(backend: &str)`:
/// `mod iptables { fn name() }` and `mod ebpf { fn name() }`, each run in a
/// network namespace of its own ([`NetNsGuard`]).
#[macro_export]
macro_rules! for_both_backends {
    ($($test:ident),* $(,)?) => {
        mod iptables {
            $(#[test] fn $test() {
                let _netns = $crate::NetNsGuard::enter();
                super::$test("iptables")
            })*
        }
        mod ebpf {
            $(#[test] fn $test() {
                let _netns = $crate::NetNsGuard::enter();
                super::$test("ebpf")
            })*
        }
    };
}

/// Like [`for_both_backends!`], plus `mod sk_lookup { fn name() }` running
/// `name("sk-lookup")`: for the tests that apply to every backend.
#[macro_export]
macro_rules! for_each_backend {
    ($($test:ident),* $(,)?) => {
        $crate::for_both_backends!($($test),*);
        mod sk_lookup {
            $(#[test] fn $test() {
                let _netns = $crate::NetNsGuard::enter();
                super::$test("sk-lookup")
            })*
        }
    };
}
