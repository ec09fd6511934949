//! The steering conformance suite against the sk-lookup backend. Run as
//! root, one test thread:
//! `cargo test -p ipcluster-tests --test conformance_sk_lookup -- --test-threads=1`
//!
//! The suite's stand-in workers listen in this test process; the factory's
//! objects register those listeners (with `pidfd_getfd` on this process, as
//! the master does for its workers) before each publish.

mod sk_lookup_support;

use std::collections::BTreeSet;
use std::sync::Mutex;

use ipcluster_tests::conformance;
use sk_lookup_support::{leftovers_with, sk_lookup};

#[test]
fn sticky_bands() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    conformance::sticky_bands(&sk_lookup);
}

#[test]
fn sticky_bands_with_shift() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    conformance::sticky_bands_with_shift(&sk_lookup);
}

#[test]
fn two_services() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    conformance::two_services(&sk_lookup);
}

#[test]
fn flip_under_open_connections() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    conformance::flip_under_open_connections(&sk_lookup);
}

#[test]
fn survives_drop_and_reads_back() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    conformance::survives_drop_and_reads_back(&sk_lookup);
}

#[test]
fn set_band_moves_one_band() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    conformance::set_band_moves_one_band(&sk_lookup);
}

#[test]
fn invalid_publish_keeps_previous() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    conformance::invalid_publish_keeps_previous(&sk_lookup);
}

#[test]
fn teardown_leaves_nothing() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let ids = Mutex::new(BTreeSet::new());
    conformance::teardown_leaves_nothing(&sk_lookup, &leftovers_with(&ids));
}
