//! The embedded eBPF object loads, both programs attach to `lo` as tcx links,
//! the kernel lists them there, and after detaching they are gone.
//! Run as root: `cargo test -p ipcluster-tests --test ebpf_attach -- --test-threads=1`

mod ebpf_support;

use aya::EbpfLoader;
use aya::programs::{SchedClassifier, TcAttachType};
use ebpf_support::tcx_programs;
use ipcluster::steering::ebpf::object;
use ipcluster_common::program_names;

#[test]
fn programs_attach_to_lo_and_detach() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(ipcluster_common::map_names::FLOWS, 1024)
        .load(object())
        .expect("load the eBPF object");
    let mut ids = Vec::new();
    let mut links = Vec::new();
    for (name, attach_type) in [
        (program_names::INGRESS, TcAttachType::Ingress),
        (program_names::EGRESS, TcAttachType::Egress),
    ] {
        let program = ebpf_support::load_classifier(&mut ebpf, name);
        ids.push(program.info().expect("program info").id());
        links.push((
            name,
            program.attach("lo", attach_type).expect("attach to lo"),
        ));
    }

    let attached = tcx_programs("lo");
    for (id, (direction, name)) in ids.iter().zip([
        ("ingress", program_names::INGRESS),
        ("egress", program_names::EGRESS),
    ]) {
        assert!(
            attached
                .iter()
                // The kernel keeps the first 15 bytes of a program name.
                .any(|(d, i, n, _)| d == &direction && i == id && name.starts_with(n.as_str())),
            "{name} (id {id}) is not attached to lo {direction}: {attached:?}"
        );
    }

    for (name, link) in links {
        let program: &mut SchedClassifier = ebpf
            .program_mut(name)
            .expect("program in the object")
            .try_into()
            .expect("a classifier");
        program.detach(link).expect("detach");
    }
    let attached = tcx_programs("lo");
    assert!(
        !attached.iter().any(|(_, id, _, _)| ids.contains(id)),
        "still attached after detach: {attached:?}"
    );
}
