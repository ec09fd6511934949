//! End-to-end: reload under load. Clients from 32 addresses connect
//! continuously while a second master starts: no connection may fail, each is
//! answered by its band's worker of the old or the new generation, and all
//! bands switch at once (no connection reaches generation 1 after another
//! one got generation 2); 16 long-lived `/stream` connections opened before
//! the reload keep receiving from their old worker from the switch to the end
//! of the test; afterwards every band's new connections reach the new
//! generation, the old master has exited and the old workers are reniced.
//! Root, one test thread: `cargo test -p ipcluster-tests --test master_reload -- --test-threads=1`

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ipcluster::steering::band_of;
use ipcluster_tests::cluster::{
    Cluster, ClusterSpec, StreamWatch, demo_get, finish_streams, live_workers, nice_of, workers_in,
};
use ipcluster_tests::loopback_client;
use ipcluster_tests::reload::{Generation, Load, check_samples};
use ipcluster_tests::unique::{Ports, cluster_name};

const WORKERS: u32 = 4;

fn reload_under_load(backend: &str) {
    let ports = Ports::reserve(1);
    let listen = SocketAddr::from(([127, 0, 0, 1], ports.get(0)));
    let mut cluster = Cluster::start(
        &cluster_name(&format!("reload-{backend}")),
        ClusterSpec::demo(backend, WORKERS, listen),
    );
    let before = cluster.status();
    let old = Generation::from_status(&before, 1, WORKERS);
    assert_eq!(old.pid_by_band.len(), WORKERS as usize, "{before}");

    // 16 long-lived streams from 127.0.0.100…115, opened before the reload and
    // read line by line until the end of the test.
    let streams: Vec<StreamWatch> = (100..116)
        .map(|n| {
            StreamWatch::open(loopback_client(n), listen).unwrap_or_else(|e| {
                panic!("open /stream from 127.0.0.{n}: {e}\n{}", cluster.logs())
            })
        })
        .collect();
    for s in &streams {
        assert_eq!(s.first.generation, 1, "{:?}", s.first);
    }

    // Continuous load from 32 addresses (127.0.0.2…33), four threads; every
    // answer is kept.
    let clients: Vec<_> = (2..34).map(loopback_client).collect();
    let load = Load::start(&clients, 4, listen);
    // Half a second of load on generation 1 before the reload, and at least a
    // request per address, however slow the machine.
    std::thread::sleep(Duration::from_millis(500));
    load.wait_for_requests(32, Duration::from_secs(20));

    let reload_started = Instant::now();
    cluster.start_master();
    let after = cluster.wait_generation_live(2, Duration::from_secs(30));
    let reload_time = reload_started.elapsed();
    // A second more, and at least 64 requests after the switch (at most 4 of
    // them were already in flight).
    std::thread::sleep(Duration::from_millis(1000));
    load.wait_for_requests(64, Duration::from_secs(20));
    let samples = load.finish();
    let new = Generation::from_status(&after, 2, WORKERS);
    assert_eq!(new.pid_by_band.len(), WORKERS as usize, "{after}");
    let verdict = check_samples(&samples, &old, &new);
    let during = samples
        .iter()
        .filter(|s| s.started >= reload_started)
        .count();
    println!(
        "reload ({backend}): generation 2 live {reload_time:?} after the second master started; \
         {} connections ({during} from the reload on): {} answered by generation 1, {} by generation 2, \
         {} problems",
        samples.len(),
        verdict.answered_by_old,
        verdict.answered_by_new,
        verdict.problems.len()
    );
    assert!(
        verdict.problems.is_empty(),
        "{} of {} requests went wrong during the reload, first ones:\n  {}\n{}",
        verdict.problems.len(),
        samples.len(),
        verdict.first_problems(10),
        cluster.logs()
    );
    assert!(
        verdict.answered_by_old > 0 && verdict.answered_by_new > 0,
        "the load saw both generations: {verdict:?}"
    );
    let switched_at = verdict
        .switched_at
        .expect("some request reached generation 2");

    // New connections: generation 2, on every band.
    for n in 2..34 {
        let client = loopback_client(n);
        let reply = demo_get(client, listen).expect("GET / after the reload");
        assert_eq!(reply.generation, 2, "{client} after the reload: {reply:?}");
        assert_eq!(
            Some(reply.pid),
            new.pid_by_band.get(&band_of(client, 0, WORKERS)).copied(),
            "{client} after the reload: {reply:?}"
        );
    }

    // The old master exited; the old workers are retired and reniced.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cluster.master_exited(1) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        cluster.master_exited(1),
        "the old master still runs\n{}",
        cluster.logs()
    );
    let retired = workers_in(&after, "retired", Some(1));
    assert_eq!(retired.len(), WORKERS as usize, "{after}");
    for pid in old.pid_by_band.values() {
        let nice = nice_of(*pid);
        assert!(
            nice.is_some_and(|n| n >= 1),
            "old worker {pid} has nice {nice:?}"
        );
    }

    // The streams kept flowing from their generation-1 worker from the switch
    // to now, without a gap.
    let problems = finish_streams(streams, switched_at);
    assert!(
        problems.is_empty(),
        "streams opened before the reload:\n  {}\n{}",
        problems.join("\n  "),
        cluster.logs()
    );
    cluster.stop();
}

/// A third master adopts both older generations.
fn reload_twice(backend: &str) {
    let ports = Ports::reserve(1);
    let listen = SocketAddr::from(([127, 0, 0, 1], ports.get(0)));
    let mut cluster = Cluster::start(
        &cluster_name(&format!("twice-{backend}")),
        ClusterSpec::demo(backend, 2, listen),
    );
    cluster.start_master();
    cluster.wait_generation_live(2, Duration::from_secs(30));
    cluster.start_master();
    let status = cluster.wait_generation_live(3, Duration::from_secs(30));
    assert_eq!(workers_in(&status, "retired", None).len(), 4, "{status}");
    assert_eq!(
        demo_get(loopback_client(7), listen)
            .expect("GET /")
            .generation,
        3
    );
    // kill-retired ends both old generations.
    let out = ipcluster_tests::cluster::ipcluster(
        &["kill-retired", "--name", &cluster.name],
        Duration::from_secs(10),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = cluster.status();
        let workers = status["workers"].as_array().map_or(0, |w| w.len());
        if workers == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "retired workers still there: {status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    cluster.stop();
}

/// During a reload, band 1's new worker never listens: generation 2 is
/// published with band 1 still on its generation-1 worker, which stays live;
/// SIGUSR1 then kills the retired workers only.
fn failed_band_keeps_old_worker(backend: &str) {
    let ports = Ports::reserve(1);
    let listen = SocketAddr::from(([127, 0, 0, 1], ports.get(0)));
    let bin = ipcluster_tests::cluster::ipcluster_bin();
    let mut spec = ClusterSpec::demo(backend, 2, listen);
    spec.command = vec![
        "sh".into(),
        "-c".into(),
        format!(
            "if [ \"$IPCLUSTER_GENERATION\" = 2 ] && [ \"$IPCLUSTER_BAND\" = 1 ]; then sleep 30; \
             else exec {} demo-worker; fi",
            bin.display()
        ),
    ];
    spec.flags = vec!["--connect-timeout".into(), "1s".into()];
    let mut cluster = Cluster::start(&cluster_name(&format!("fail-{backend}")), spec);
    let band1_client = loopback_client(3);
    assert_eq!(band_of(band1_client, 0, 2), 1);
    let old_band1 = demo_get(band1_client, listen).expect("GET / band 1");
    cluster.start_master();
    // Published once band 0 is ready and band 1 has timed out once.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let status = cluster.status();
        let published = status["generation"] == 2
            && live_workers(&status, Some(2))
                .iter()
                .any(|w| w["band"] == 0);
        if published {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "generation 2 not published: {status}\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let old_live = live_workers(&status, Some(1));
    assert_eq!(old_live.len(), 1, "band 1 keeps its old worker: {status}");
    assert_eq!(old_live[0]["pid"], old_band1.pid);
    assert_eq!(
        demo_get(band1_client, listen).expect("GET / band 1").pid,
        old_band1.pid
    );
    assert_eq!(
        demo_get(loopback_client(2), listen)
            .expect("GET / band 0")
            .generation,
        2
    );
    assert!(
        cluster.master_log(2).contains("keep their previous worker"),
        "{}",
        cluster.master_log(2)
    );

    // SIGUSR1: the retired band-0 worker goes, the live old band-1 worker stays.
    let retired: Vec<i64> = workers_in(&status, "retired", Some(1))
        .iter()
        .filter_map(|w| w["pid"].as_i64())
        .collect();
    assert_eq!(retired.len(), 1, "{status}");
    let master = i32::try_from(cluster.masters[1].id()).unwrap_or(0);
    ipcluster_tests::cluster::signal(master, libc::SIGUSR1);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = cluster.status();
        let gone = !status
            .to_string()
            .contains(&format!("\"pid\":{},", retired[0]));
        if gone {
            assert_eq!(live_workers(&status, Some(1)).len(), 1, "{status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SIGUSR1 did not kill {retired:?}: {status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        demo_get(band1_client, listen).expect("GET / band 1").pid,
        old_band1.pid
    );
    cluster.stop();
}

ipcluster_tests::for_each_backend!(
    reload_under_load,
    reload_twice,
    failed_band_keeps_old_worker
);
