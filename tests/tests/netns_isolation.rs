//! The isolation every root test stands on ([`NetNsGuard`]): a cluster started
//! in a test's own network namespace installs its steering (iptables rules,
//! tcx programs on `lo`, the sk_lookup link) there and nowhere else — the
//! host's namespace sees none of it; two tests' namespaces are independent
//! (both bind the same address and port at once); and the guard leaves no
//! namespace and no process behind, reporting a process a test leaked.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use aya::programs::SchedClassifier;
use aya::programs::tc::TcAttachType;
use ipcluster_tests::bpf_objects::pinned_map_ids;
use ipcluster_tests::cluster::{Cluster, ClusterSpec, cluster_processes, demo_get};
use ipcluster_tests::netns::{NetNs, run_ok};
use ipcluster_tests::netns_guard::{NetNsId, host_netns_path, processes_in};
use ipcluster_tests::unique::{Ports, cluster_name};
use ipcluster_tests::{NetNsGuard, loopback_client};
use nix::sched::{CloneFlags, setns};

/// Run `f` on a thread in the host's network namespace (what another test or
/// the host would see).
fn in_host<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    let path = host_netns_path();
    let host = File::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    std::thread::scope(|s| {
        s.spawn(move || {
            setns(&host, CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns into {}: {e}", path.display()));
            f()
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// `iptables-save -t nat` of the calling thread's namespace, or of the host's.
fn nat_rules(host: bool) -> String {
    let mut cmd = Command::new("nsenter");
    if host {
        cmd.arg(format!("--net={}", host_netns_path().display()));
    }
    let out = run_ok(cmd.args(["--", "iptables-save", "-t", "nat"]));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Ids of the tcx programs on `lo` of the calling thread's namespace that use
/// one of `maps` (both directions).
fn tcx_programs_on_lo(maps: &std::collections::BTreeSet<u32>) -> Vec<u32> {
    let mut ids = Vec::new();
    for attach_type in [TcAttachType::Ingress, TcAttachType::Egress] {
        let (_, programs) =
            SchedClassifier::query_tcx("lo", attach_type).expect("query the tcx programs on lo");
        for program in programs {
            let uses = program.map_ids().ok().flatten().unwrap_or_default();
            if uses.iter().any(|m| maps.contains(m)) {
                ids.push(program.id());
            }
        }
    }
    ids
}

/// The `netns_ino` of the pinned sk_lookup link of `cluster` (bpftool's view).
fn sk_lookup_link_netns(cluster: &str) -> u64 {
    let pin = ipcluster::paths::pin_dir(cluster).join("sk_lookup_link");
    let out = run_ok(Command::new("bpftool").args([
        "-j",
        "link",
        "show",
        "pinned",
        &pin.display().to_string(),
    ]));
    let link: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("bpftool -j link show is JSON");
    link["netns_ino"]
        .as_u64()
        .unwrap_or_else(|| panic!("no netns_ino in the sk_lookup link: {link}"))
}

/// A cluster on `backend`, started in the test's namespace: it serves there,
/// every process of it is there, and its steering is there and not in the
/// host's namespace.
fn steering_stays_in_the_tests_namespace(backend: &str) {
    let ours = NetNsId::current();
    let host = NetNsId::host();
    assert_ne!(ours, host, "the test runs in a namespace of its own");
    let ports = Ports::reserve(1);
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, ports.get(0)));
    let mut cluster = Cluster::start(
        &cluster_name("isolated"),
        ClusterSpec::demo(backend, 2, listen),
    );
    // Where the steering is (the host's view first).
    match backend {
        "iptables" => {
            let chain = ipcluster::steering::iptables::chain_name(&cluster.name);
            let there = nat_rules(true);
            assert!(
                !there.contains(&chain),
                "the host's namespace has the test's chain {chain}:\n{there}"
            );
            let here = nat_rules(false);
            assert!(
                here.contains(&chain),
                "the chain {chain} is in the test's namespace:\n{here}"
            );
        }
        "ebpf" => {
            let maps = pinned_map_ids(&cluster.name);
            assert!(!maps.is_empty(), "the cluster pinned its maps");
            let there = in_host(|| tcx_programs_on_lo(&maps));
            assert!(
                there.is_empty(),
                "programs {there:?} of the test's cluster are attached to the host's lo"
            );
            let here = tcx_programs_on_lo(&maps);
            assert!(
                here.len() >= 2,
                "ingress and egress programs of the cluster on the test's lo: {here:?}"
            );
        }
        "sk-lookup" => {
            let ino = sk_lookup_link_netns(&cluster.name);
            assert_eq!(
                ino, ours.ino,
                "the sk_lookup link is attached to the test's namespace {ours} \
                 (the host's is {host})"
            );
        }
        other => panic!("unknown backend {other}"),
    }

    // It serves, from processes all in the test's namespace.
    let reply = demo_get(loopback_client(2), listen)
        .unwrap_or_else(|e| panic!("GET {listen}: {e}\n{}", cluster.logs()));

    let workers = cluster_processes(&cluster.name);
    assert!(workers.len() >= 2, "2 workers: {workers:?}");
    assert!(
        workers.contains(&reply.pid),
        "served by a worker of the cluster ({workers:?}): {reply:?}"
    );
    let master = cluster.masters[0].id() as i32;
    for pid in workers.into_iter().chain([master]) {
        let theirs = NetNsId::of(Path::new(&format!("/proc/{pid}/ns/net")));
        assert_eq!(
            theirs.ok(),
            Some(ours),
            "process {pid} of the cluster runs in the test's namespace {ours}"
        );
    }

    cluster.stop();
}

ipcluster_tests::for_each_backend!(steering_stays_in_the_tests_namespace);

/// Two tests at once: each in its own namespace, both listen on the same
/// address and port at the same time (in one namespace the second bind would
/// fail), and each one's client reaches its own listener.
#[test]
fn two_tests_namespaces_are_independent() {
    let _netns = NetNsGuard::enter();
    let ports = Ports::reserve(1);
    let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, ports.get(0));
    let both_bound = Barrier::new(2);
    let one_test = |both_bound: &Barrier| -> Result<NetNsId, String> {
        let guard = NetNsGuard::enter();
        let bound = TcpListener::bind(addr);
        // Both threads reach the barrier, whatever bind said, so none waits forever.
        both_bound.wait();
        let listener = bound.map_err(|e| format!("bind {addr} in {}: {e}", guard.id()))?;
        let client = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
        let (_conn, peer) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        let client_addr = client.local_addr().map_err(|e| e.to_string())?;
        if peer != client_addr {
            return Err(format!(
                "the listener in {} accepted {peer}, not its own client {client_addr}",
                guard.id()
            ));
        }
        Ok(guard.id())
    };
    let results: Vec<Result<NetNsId, String>> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..2).map(|_| s.spawn(|| one_test(&both_bound))).collect();
        threads
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    });
    let ids: Vec<NetNsId> = results
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("{e}")))
        .collect();
    assert_ne!(ids[0], ids[1], "two namespaces");
    assert!(!ids.contains(&NetNsId::host()), "neither is the host's");
}

/// Whether `observer` still has interface `name`.
fn has_link(observer: &NetNs, name: &str) -> bool {
    observer
        .command("ip")
        .args(["link", "show", name])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Wait up to 10 s for `observer` to lose interface `name`.
fn wait_link_gone(observer: &NetNs, name: &str) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if !has_link(observer, name) {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// A veth pair from the calling thread's namespace to `observer`: the
/// observer's end lives exactly as long as that namespace does.
fn tie_to(observer: &NetNs, here: &str, there: &str) {
    run_ok(Command::new("ip").args([
        "link",
        "add",
        here,
        "type",
        "veth",
        "peer",
        "name",
        there,
        "netns",
        observer.name(),
    ]));
    assert!(has_link(observer, there), "{there} in {}", observer.name());
}

/// Whether `child` exits within `timeout`; killed (and reaped) if it does not.
fn wait_exit(child: &mut std::process::Child, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

/// The guard returns the thread to where it was and the namespace is freed;
/// a process left in it is SIGKILLed and reported as a failure, and then the
/// namespace is freed too.
#[test]
fn the_guard_leaves_no_namespace_behind() {
    let _netns = NetNsGuard::enter();
    let outer = NetNsId::current();
    let observer = NetNs::new("observer");

    let inner = NetNsGuard::enter();
    let inner_id = inner.id();
    assert_ne!(inner_id, outer);
    tie_to(&observer, "in0", "obs0");
    drop(inner);
    assert_eq!(NetNsId::current(), outer, "back in the namespace it left");
    let freed = wait_link_gone(&observer, "obs0");
    assert!(
        freed.is_some(),
        "the namespace {inner_id} outlived its guard (the veth end tied to it is still there)"
    );
    eprintln!("namespace freed {:?} after the guard's drop", freed);

    // A test that leaks a process: the guard's drop fails the test, and the
    // process is killed, so the namespace does not live on.
    let mut sleeper = None;
    let mut leaked_id = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let guard = NetNsGuard::enter();
        leaked_id = Some(guard.id());
        tie_to(&observer, "in1", "obs1");
        sleeper = Some(
            Command::new("sleep")
                .arg("600")
                .spawn()
                .expect("start sleep"),
        );
        drop(guard);
    }));
    let mut sleeper = sleeper.expect("sleep was started");
    let killed = wait_exit(&mut sleeper, Duration::from_secs(5));
    let message = match result {
        Ok(()) => panic!("the guard let a process outlive the test"),
        Err(panic) => panic
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_else(|| "a panic without a message".into()),
    };
    assert!(
        message.contains("processes left") && message.contains("sleep"),
        "the failure names the process: {message}"
    );
    assert!(killed, "the guard killed the leaked sleep");
    assert_eq!(NetNsId::current(), outer);
    let leaked_id = leaked_id.expect("the guard was entered");
    assert!(processes_in(leaked_id).is_empty());
    assert!(
        wait_link_gone(&observer, "obs1").is_some(),
        "the namespace {leaked_id} outlived the guard that killed its process"
    );
}
