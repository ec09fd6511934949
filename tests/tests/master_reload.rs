//! End-to-end: reload under load. Clients from 32 addresses connect
//! continuously while a second master starts: no connection may fail; 16
//! long-lived `/stream` connections opened before the reload keep receiving
//! from their old worker; afterwards every band's new connections reach the
//! new generation, the old master has exited and the old workers are reniced.
//! Root, one test thread: `cargo test -p ipcluster-tests --test master_reload -- --test-threads=1`

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ipcluster::steering::band_of;
use ipcluster_tests::cluster::{
    Cluster, ClusterSpec, DemoStream, demo_get, live_workers, nice_of, workers_in,
};
use ipcluster_tests::loopback_client;
use ipcluster_tests::unique::{Ports, cluster_name};

const WORKERS: u32 = 4;

#[derive(Default)]
struct Load {
    attempted: AtomicU64,
    failed: AtomicU64,
    new_generation: AtomicU64,
    stop: AtomicBool,
}

fn reload_under_load(backend: &str) {
    let ports = Ports::reserve(1);
    let listen = SocketAddr::from(([127, 0, 0, 1], ports.get(0)));
    let mut cluster = Cluster::start(
        &cluster_name(&format!("reload-{backend}")),
        ClusterSpec::demo(backend, WORKERS, listen),
    );
    let before = cluster.status();
    let old_pids: Vec<i64> = live_workers(&before, Some(1))
        .iter()
        .filter_map(|w| w["pid"].as_i64())
        .collect();

    // 16 long-lived streams from 127.0.0.100…115, opened before the reload.
    let mut streams: Vec<DemoStream> = (100..116)
        .map(|n| {
            DemoStream::open(loopback_client(n), listen).unwrap_or_else(|e| {
                panic!("open /stream from 127.0.0.{n}: {e}\n{}", cluster.logs())
            })
        })
        .collect();
    let opened = Instant::now();

    // Continuous load from 32 addresses (127.0.0.2…33), four threads.
    let load = Arc::new(Load::default());
    let errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let (load, errors) = (load.clone(), errors.clone());
            std::thread::spawn(move || {
                let mut i = 0u8;
                let deadline = Instant::now() + Duration::from_secs(60);
                while !load.stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let client = loopback_client(2 + t * 8 + i % 8);
                    i = i.wrapping_add(1);
                    load.attempted.fetch_add(1, Ordering::Relaxed);
                    match demo_get(client, listen) {
                        Ok(reply) if reply.generation == 2 => {
                            load.new_generation.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            load.failed.fetch_add(1, Ordering::Relaxed);
                            if let Ok(mut errors) = errors.lock() {
                                errors.push(format!("{client}: {e}"));
                            }
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let attempted_before = load.attempted.load(Ordering::Relaxed);

    let reload_started = Instant::now();
    cluster.start_master();
    let after = cluster.wait_generation_live(2, Duration::from_secs(30));
    let reload_time = reload_started.elapsed();
    std::thread::sleep(Duration::from_millis(1000));
    load.stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let attempted = load.attempted.load(Ordering::Relaxed);
    let failed = load.failed.load(Ordering::Relaxed);
    println!(
        "reload ({backend}): generation 2 live {reload_time:?} after the second master started; \
         {attempted} connections attempted ({} during the reload window), {failed} failed, {} reached generation 2",
        attempted - attempted_before,
        load.new_generation.load(Ordering::Relaxed)
    );
    assert_eq!(
        failed,
        0,
        "connections failed during the reload: {:?}\n{}",
        errors
            .lock()
            .map(|e| e.iter().take(10).cloned().collect::<Vec<_>>())
            .unwrap_or_default(),
        cluster.logs()
    );
    assert!(attempted > 100, "the load ran: {attempted} connections");

    // The streams still come from their old worker, and are current.
    for stream in &mut streams {
        let expected_seq = (opened.elapsed().as_millis() / 100) as u64;
        let mut last_seq = 0;
        while last_seq + 15 < expected_seq {
            let (reply, seq) = stream.next_line().unwrap_or_else(|e| {
                panic!(
                    "stream from {} broke: {e}\n{}",
                    stream.first.client,
                    cluster.logs()
                )
            });
            assert_eq!(
                reply.pid, stream.first.pid,
                "a stream moved to another worker"
            );
            last_seq = seq;
        }
        assert_eq!(stream.first.generation, 1);
    }

    // New connections: generation 2, on every band.
    let new_by_band: HashMap<u64, i64> = live_workers(&after, Some(2))
        .iter()
        .map(|w| {
            (
                w["band"].as_u64().unwrap_or(99),
                w["pid"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(new_by_band.len(), WORKERS as usize);
    for n in 2..34 {
        let client = loopback_client(n);
        let reply = demo_get(client, listen).expect("GET / after the reload");
        assert_eq!(reply.generation, 2, "{client} after the reload: {reply:?}");
        assert_eq!(
            i64::from(reply.pid),
            new_by_band[&u64::from(band_of(client, 0, WORKERS))]
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
    for pid in old_pids {
        let nice = nice_of(i32::try_from(pid).unwrap_or(0));
        assert!(
            nice.is_some_and(|n| n >= 1),
            "old worker {pid} has nice {nice:?}"
        );
    }
    drop(streams);
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
