//! End-to-end: crashes. A SIGKILLed live worker is replaced and its band is
//! served again (the time it took is printed), while the other bands never
//! notice: their open streams keep flowing from the same worker and their new
//! connections reach the same worker throughout; a SIGKILLed master leaves traffic flowing, and a
//! new master adopts everything and brings up a new generation.
//! Root, one test thread: `cargo test -p ipcluster-tests --test master_crash -- --test-threads=1`

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ipcluster::steering::band_of;
use ipcluster_tests::cluster::{
    Cluster, ClusterSpec, DemoReply, StreamWatch, demo_get, finish_streams, live_workers, signal,
    workers_in,
};
use ipcluster_tests::unique::{Ports, cluster_name};
use ipcluster_tests::{loopback_client, loopback_clients};

fn sigkill_live_worker(backend: &str) {
    const WORKERS: u32 = 4;
    let ports = Ports::reserve(1);
    let listen = SocketAddr::from(([127, 0, 0, 1], ports.get(0)));
    let mut cluster = Cluster::start(
        &cluster_name(&format!("crash-{backend}")),
        ClusterSpec::demo(backend, WORKERS, listen),
    );
    let client = loopback_client(5);
    let band = band_of(client, 0, WORKERS);
    let victim = demo_get(client, listen).expect("GET / before the crash");
    assert_eq!(victim.band, band);
    // The other bands: a client and an open stream on each, watched through the crash.
    let others: Vec<(IpAddr, DemoReply)> = (10..14)
        .map(loopback_client)
        .filter(|&c| band_of(c, 0, WORKERS) != band)
        .map(|c| (c, demo_get(c, listen).expect("GET / on another band")))
        .collect();
    assert_eq!(others.len(), 3, "{others:?}");
    let streams: Vec<StreamWatch> = others
        .iter()
        .map(|(c, _)| StreamWatch::open(*c, listen).expect("open /stream on another band"))
        .collect();

    let killed_at = Instant::now();
    signal(victim.pid, libc::SIGKILL);
    let mut failures = 0;
    let mut other_problems = Vec::new();
    let mut round = 0usize;
    // Until the replacement is ready another worker stands in for the band
    // (its port leaves the table at once): answered, but not by band `band`.
    let mut stand_ins = 0;
    let served = loop {
        match demo_get(client, listen) {
            Ok(reply) if reply.pid != victim.pid && reply.band == band => break reply,
            Ok(reply) if reply.pid != victim.pid => stand_ins += 1,
            Ok(_) => {}
            Err(_) => failures += 1,
        }
        // Meanwhile, new connections on the other bands reach their same worker.
        let (other, before) = &others[round % others.len()];
        round += 1;
        match demo_get(*other, listen) {
            Ok(reply) if reply.pid == before.pid => {}
            Ok(reply) => other_problems.push(format!("{other}: {reply:?}, was {before:?}")),
            Err(e) => other_problems.push(format!("{other}: {e}")),
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(10),
            "band {band} not served again within 10 s\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let downtime = killed_at.elapsed();
    println!(
        "crash ({backend}): band {band} served again by worker {} {downtime:?} after SIGKILL of worker {} \
         ({failures} failed requests meanwhile; {round} requests on the other bands; {stand_ins} answered by a stand-in)",
        served.pid, victim.pid
    );
    assert_eq!(served.band, band);
    assert_eq!(
        served.generation, 1,
        "a crash replacement belongs to the same generation"
    );
    assert!(
        other_problems.is_empty(),
        "the other bands noticed the crash:\n  {}",
        other_problems.join("\n  ")
    );
    // The status shows the replacement live, the other bands unchanged.
    let status = cluster.status();
    let live = live_workers(&status, Some(1));
    assert_eq!(live.len(), WORKERS as usize, "{status}");
    assert!(
        live.iter()
            .any(|w| w["pid"] == served.pid && w["band"] == band)
    );
    for (_, before) in &others {
        assert!(
            live.iter()
                .any(|w| w["pid"] == before.pid && w["band"] == before.band),
            "band {} changed worker: {status}",
            before.band
        );
    }
    assert!(
        !status
            .to_string()
            .contains(&format!("\"pid\":{},", victim.pid)),
        "{status}"
    );
    // The other bands' streams flowed from their worker through all of it.
    std::thread::sleep(Duration::from_millis(500));
    let problems = finish_streams(streams, killed_at);
    assert!(
        problems.is_empty(),
        "streams on the other bands:\n  {}",
        problems.join("\n  ")
    );
    cluster.stop();
}

fn sigkill_master(backend: &str) {
    let ports = Ports::reserve(1);
    let listen = SocketAddr::from(([127, 0, 0, 1], ports.get(0)));
    let mut cluster = Cluster::start(
        &cluster_name(&format!("mkill-{backend}")),
        ClusterSpec::demo(backend, 2, listen),
    );
    let first: Vec<_> = loopback_clients(8)
        .into_iter()
        .map(|c| demo_get(c, listen).expect("GET / before"))
        .collect();
    let master = i32::try_from(cluster.masters[0].id()).unwrap_or(0);
    signal(master, libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cluster.master_exited(1) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(cluster.master_exited(1));
    // Traffic flows without a master, to the same workers.
    for (client, before) in loopback_clients(8).into_iter().zip(&first) {
        let reply = demo_get(client, listen).expect("GET / without a master");
        assert_eq!(reply.pid, before.pid);
    }
    // status still answers, from /proc and the kernel.
    let offline = cluster.status();
    assert!(offline["master_pid"].is_null(), "{offline}");
    assert_eq!(live_workers(&offline, Some(1)).len(), 2, "{offline}");

    // A new master adopts them and brings up generation 2.
    cluster.start_master();
    let status = cluster.wait_generation_live(2, Duration::from_secs(30));
    assert_eq!(workers_in(&status, "retired", Some(1)).len(), 2, "{status}");
    for client in loopback_clients(8) {
        assert_eq!(demo_get(client, listen).expect("GET / after").generation, 2);
    }
    cluster.stop();
}

ipcluster_tests::for_each_backend!(sigkill_live_worker, sigkill_master);
