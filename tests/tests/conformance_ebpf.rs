//! The steering conformance suite against the ebpf backend. Run as root, one
//! test thread:
//! `cargo test -p ipcluster-tests --test conformance_ebpf -- --test-threads=1`

mod ebpf_support;

use ebpf_support::{ebpf, leftovers};
use ipcluster_tests::conformance;

#[test]
fn sticky_bands() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    conformance::sticky_bands(&ebpf);
}

#[test]
fn sticky_bands_with_shift() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    conformance::sticky_bands_with_shift(&ebpf);
}

#[test]
fn two_services() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    conformance::two_services(&ebpf);
}

#[test]
fn flip_under_open_connections() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    conformance::flip_under_open_connections(&ebpf);
}

#[test]
fn survives_drop_and_reads_back() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    conformance::survives_drop_and_reads_back(&ebpf);
}

#[test]
fn set_band_moves_one_band() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    conformance::set_band_moves_one_band(&ebpf);
}

#[test]
fn invalid_publish_keeps_previous() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    conformance::invalid_publish_keeps_previous(&ebpf);
}

#[test]
fn teardown_leaves_nothing() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    conformance::teardown_leaves_nothing(&ebpf, &leftovers);
}
