//! Scale figures for `cargo xtask bench` (it collects the lines that start with
//! `BENCH `): table publish time by band count for both backends, the ingress
//! program's per-packet cost from `BPF_PROG_TEST_RUN`, the verifier's figures,
//! and the flow table's memory per entry. Each test also checks something real
//! (tables read back equal, figures positive); timings are printed, never asserted.
//! Run as root: `cargo test --release -p ipcluster-tests --test bench_scale -- --nocapture --test-threads=1`
//!
//! Line format: `BENCH <name> key=value key=value…`.

mod ebpf_support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd as _, AsRawFd as _};
use std::time::{Duration, Instant};

use aya::maps::{Map, MapData};
use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions};
use aya::{Ebpf, EbpfLoader};
use ipcluster::steering::ebpf::{SteeringMaps, object};
use ipcluster::steering::{BackendKind, SteeringConfig, SteeringTable, backend};
use ipcluster_common::{map_names, program_names};
use ipcluster_tests::guard::defer;
use ipcluster_tests::require_root;
use ipcluster_tests::unique::{Ports, cluster_name};

/// One `BENCH` line.
fn bench(name: &str, fields: &[(&str, String)]) {
    let fields: Vec<String> = fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("BENCH {name} {}", fields.join(" "));
}

fn micros(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

// ---------------------------------------------------------------- publish

/// Publish time of a one-service table of 16, 64 and 256 bands, alternating
/// two tables so that every publish changes every band; median and min of
/// `runs` publishes. The table read back must equal the last one published.
fn publish_times(kind: BackendKind, runs: usize) {
    require_root();
    for bands in [16u16, 64, 256] {
        let ports = Ports::reserve(1);
        let public = SocketAddr::from(([127, 0, 0, 1], ports.get(0)));
        let config = SteeringConfig {
            cluster: cluster_name(&format!("bench-{kind}-{bands}")),
            services: vec![public],
            interfaces: vec!["lo".to_owned()],
            flow_entries: ipcluster_common::DEFAULT_FLOW_ENTRIES,
        };
        let guard_config = config.clone();
        let _teardown = defer(move || {
            let cluster = guard_config.cluster.clone();
            match backend(kind, guard_config) {
                Ok(mut b) => {
                    if let Err(e) = b.teardown() {
                        eprintln!("cleanup: teardown of {cluster} failed: {e}");
                    }
                }
                Err(e) => eprintln!("cleanup: no {kind} backend for {cluster}: {e}"),
            }
        });
        let mut steering = backend(kind, config).expect("build the backend");
        assert_eq!(steering.install().expect("install"), None);
        // Worker ports are only numbers in the table: nothing needs to listen.
        let tables: Vec<SteeringTable> = (0..2u16)
            .map(|generation| {
                let ports: Vec<u16> = (0..bands).map(|b| 30_000 + generation * 1000 + b).collect();
                SteeringTable::uniform(&[public], 0, &[ports])
            })
            .collect();
        let mut times: Vec<Duration> = (0..runs)
            .map(|i| {
                let start = Instant::now();
                steering.publish(&tables[i % 2]).expect("publish");
                start.elapsed()
            })
            .collect();
        let read_start = Instant::now();
        let read = steering.read_table().expect("read_table");
        let read_time = read_start.elapsed();
        assert_eq!(
            read,
            Some(tables[(runs - 1) % 2].clone()),
            "{kind}: the table read back is not the one published last"
        );
        times.sort();
        assert!(times.iter().all(|t| !t.is_zero()));
        bench(
            &format!("publish_{kind}"),
            &[
                ("bands", bands.to_string()),
                ("median_us", micros(times[runs / 2])),
                ("min_us", micros(times[0])),
                ("max_us", micros(times[runs - 1])),
                ("runs", runs.to_string()),
                ("read_back_us", micros(read_time)),
            ],
        );
        steering.teardown().expect("teardown");
    }
}

#[test]
fn publish_time_ebpf() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    publish_times(BackendKind::Ebpf, 21);
}

#[test]
fn publish_time_iptables() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    publish_times(BackendKind::Iptables, 11);
}

// ---------------------------------------------------------------- packets
// A few lines of tests/tests/ebpf_packets.rs: Ethernet + IPv4 + TCP with
// correct checksums.

const TCP: u8 = 6;
const UDP: u8 = 17;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
/// `TC_ACT_UNSPEC` (tcx: `TCX_NEXT`): the programs never drop.
const NEXT: u32 = u32::MAX;
const PUBLIC: u16 = 8080;
const WORKERS: [u16; 4] = [9000, 9001, 9002, 9003];

fn sum16(data: &[u8], mut sum: u32) -> u32 {
    for chunk in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]));
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn l4_segment(src: SocketAddr, dst: SocketAddr, proto: u8, flags: u8) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ip(), dst.ip()) else {
        panic!("IPv4 only")
    };
    let mut seg = Vec::new();
    seg.extend_from_slice(&src.port().to_be_bytes());
    seg.extend_from_slice(&dst.port().to_be_bytes());
    if proto == TCP {
        seg.extend_from_slice(&0x1234_5678u32.to_be_bytes());
        let ack = if flags & ACK != 0 { 0x0abc_def0u32 } else { 0 };
        seg.extend_from_slice(&ack.to_be_bytes());
        seg.extend_from_slice(&[5 << 4, flags]);
        seg.extend_from_slice(&64240u16.to_be_bytes());
        seg.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
        seg.extend_from_slice(b"hello");
        let mut sum = sum16(&s.octets(), 0);
        sum = sum16(&d.octets(), sum) + u32::from(TCP) + seg.len() as u32;
        let check = !fold(sum16(&seg, sum));
        seg[16..18].copy_from_slice(&check.to_be_bytes());
    } else {
        seg.extend_from_slice(&9u16.to_be_bytes());
        seg.extend_from_slice(&[0, 0, b'x']);
    }
    let total = 20 + seg.len();
    let mut frame = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&(total as u16).to_be_bytes());
    ip.extend_from_slice(&[0x4d, 0x2e, 0, 0, 64, proto, 0, 0]);
    ip.extend_from_slice(&s.octets());
    ip.extend_from_slice(&d.octets());
    let check = !fold(sum16(&ip, 0));
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    frame.extend(ip);
    frame.extend(seg);
    frame
}

fn tcp4(src: SocketAddr, dst: SocketAddr, flags: u8) -> Vec<u8> {
    l4_segment(src, dst, TCP, flags)
}

fn v4(a: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::from(a)), port)
}

/// The programs' aya-log level as the master patches it without `--ebpf-log`.
const LOG_OFF: u8 = 0;

/// The object loaded without pins (nothing is attached or pinned: dropping it
/// leaves nothing in the kernel), a table published into its maps.
fn load_programs(flow_entries: u32) -> (Ebpf, SteeringMaps) {
    require_root();
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(map_names::FLOWS, flow_entries)
        .override_global("AYA_LOG_LEVEL", &LOG_OFF, false)
        .load(object())
        .expect("load the eBPF object");
    let mut maps = SteeringMaps::take_from(&mut ebpf).expect("take the maps");
    let table = SteeringTable::uniform(&[v4([127, 0, 0, 1], PUBLIC)], 0, &[WORKERS.to_vec()]);
    maps.publish(&table).expect("publish the table");
    for name in [program_names::INGRESS, program_names::EGRESS] {
        ebpf_support::load_classifier(&mut ebpf, name);
    }
    (ebpf, maps)
}

fn classifier<'a>(ebpf: &'a Ebpf, name: &str) -> &'a SchedClassifier {
    ebpf.program(name)
        .expect("program in the object")
        .try_into()
        .expect("a classifier")
}

/// One `BPF_PROG_TEST_RUN`: (verdict, output packet, kernel-measured duration
/// per run, averaged over `repeat`).
fn test_run(program: &SchedClassifier, packet: &[u8], repeat: u32) -> (u32, Vec<u8>, Duration) {
    let mut out = vec![0u8; packet.len() + 256];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            repeat,
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out, result.duration)
}

fn dst_port(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[36], frame[37]])
}

fn src_port(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[34], frame[35]])
}

fn median_ns(mut v: Vec<Duration>) -> (u128, u128) {
    v.sort();
    (v[v.len() / 2].as_nanos(), v[0].as_nanos())
}

/// Per-packet cost of the programs, from the kernel's own timing in
/// `BPF_PROG_TEST_RUN`. Caveats (also in the report):
/// - With `repeat` > 1 the kernel runs the program again and again on the same
///   buffer: a packet the program rewrites is, after the first run, addressed to
///   a worker port and takes another path. So rewritten packets are timed with
///   single runs (median of many), and `repeat` is only used for packets that
///   pass untouched.
/// - A single run's duration includes the test harness's fixed overhead (timer
///   reads, context setup); `nonservice_single` shows that floor next to the
///   `repeat` average of the same packet.
/// - No real socket, no GRO, no cache pressure from a busy machine.
#[test]
fn per_packet_cost() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let (ebpf, _maps) = load_programs(65_536);
    let ingress = classifier(&ebpf, program_names::INGRESS);
    let egress = classifier(&ebpf, program_names::EGRESS);
    let service = v4([127, 0, 0, 1], PUBLIC);
    const SINGLE: u16 = 2000;

    // New connections: a SYN from a new client port each time records a flow.
    let mut syn_times = Vec::new();
    for i in 0..SINGLE {
        let client = v4([10, 1, 2, 5], 20_000 + i);
        let (verdict, out, took) = test_run(ingress, &tcp4(client, service, SYN), 1);
        assert_eq!(verdict, NEXT);
        assert!(WORKERS.contains(&dst_port(&out)), "SYN not steered");
        syn_times.push(took);
    }
    // Established: an ACK that hits its flow and is rewritten.
    let client = v4([10, 1, 2, 5], 20_000);
    let ack = tcp4(client, service, ACK);
    let mut ack_times = Vec::new();
    let mut worker = 0;
    for _ in 0..SINGLE {
        let (verdict, out, took) = test_run(ingress, &ack, 1);
        assert_eq!(verdict, NEXT);
        worker = dst_port(&out);
        assert!(WORKERS.contains(&worker), "ACK not steered");
        ack_times.push(took);
    }
    // The reply: egress gives it the public port back.
    let reply = tcp4(v4([127, 0, 0, 1], worker), client, ACK);
    let mut egress_times = Vec::new();
    for _ in 0..SINGLE {
        let (verdict, out, took) = test_run(egress, &reply, 1);
        assert_eq!(verdict, NEXT);
        assert_eq!(src_port(&out), PUBLIC, "reply not rewritten");
        egress_times.push(took);
    }
    // Not for a service: passes untouched, so `repeat` is meaningful.
    let other = tcp4(client, v4([127, 0, 0, 1], 5432), ACK);
    let mut other_single = Vec::new();
    for _ in 0..SINGLE {
        let (verdict, out, took) = test_run(ingress, &other, 1);
        assert_eq!(verdict, NEXT);
        assert_eq!(out, other, "a non-service packet was changed");
        other_single.push(took);
    }
    let (_, _, other_repeat) = test_run(ingress, &other, 1_000_000);
    let udp = l4_segment(client, service, UDP, 0);
    let (_, out, udp_repeat) = test_run(ingress, &udp, 1_000_000);
    assert_eq!(out, udp);

    let (syn, syn_min) = median_ns(syn_times);
    let (hit, hit_min) = median_ns(ack_times);
    let (eg, eg_min) = median_ns(egress_times);
    let (other_med, other_min) = median_ns(other_single);
    bench(
        "packet_ingress_new_flow",
        &[
            ("median_ns", syn.to_string()),
            ("min_ns", syn_min.to_string()),
            ("method", format!("single_runs={SINGLE}")),
        ],
    );
    bench(
        "packet_ingress_flow_hit_rewrite",
        &[
            ("median_ns", hit.to_string()),
            ("min_ns", hit_min.to_string()),
            ("method", format!("single_runs={SINGLE}")),
        ],
    );
    bench(
        "packet_egress_rewrite",
        &[
            ("median_ns", eg.to_string()),
            ("min_ns", eg_min.to_string()),
            ("method", format!("single_runs={SINGLE}")),
        ],
    );
    bench(
        "packet_ingress_nonservice_tcp",
        &[
            ("repeat_avg_ns", other_repeat.as_nanos().to_string()),
            ("single_median_ns", other_med.to_string()),
            ("single_min_ns", other_min.to_string()),
            ("method", "repeat=1000000".into()),
        ],
    );
    bench(
        "packet_ingress_udp",
        &[
            ("repeat_avg_ns", udp_repeat.as_nanos().to_string()),
            ("method", "repeat=1000000".into()),
        ],
    );
    assert!(syn > 0 && hit > 0 && eg > 0 && other_med > 0);

    // Load (verification) time and the verifier's figures of each program,
    // from a fresh object loaded as the master loads it: the aya-log level
    // patched to off (the default; the verifier then skips the log code, the
    // level being a constant of a frozen map) and to debug (`--ebpf-log`).
    for (log, level) in [("off", LOG_OFF), ("debug", 4u8)] {
        // The loader parses the kernel's BTF when it is made; the object's
        // maps are created by `load`: both are a starting master's work too.
        let start = Instant::now();
        let mut loader = EbpfLoader::new();
        let loader_time = start.elapsed();
        let start = Instant::now();
        let mut fresh = loader
            .map_max_entries(map_names::FLOWS, 65_536)
            .override_global("AYA_LOG_LEVEL", &level, false)
            .load(object())
            .expect("load the eBPF object");
        bench(
            &format!("object_load_log_{log}"),
            &[
                (
                    "loader_new_ms",
                    format!("{:.1}", loader_time.as_secs_f64() * 1e3),
                ),
                (
                    "object_ms",
                    format!("{:.1}", start.elapsed().as_secs_f64() * 1e3),
                ),
            ],
        );
        for name in [program_names::INGRESS, program_names::EGRESS] {
            let start = Instant::now();
            ebpf_support::load_classifier(&mut fresh, name);
            let load_time = start.elapsed();
            let info = classifier(&fresh, name).info().expect("program info");
            let verified = info.verified_instruction_count().unwrap_or(0);
            assert!(verified > 0, "{name}: no verified instruction count");
            let line = if log == "off" {
                format!("verifier_{name}")
            } else {
                format!("verifier_{name}_ebpf_log")
            };
            bench(
                &line,
                &[
                    ("verified_insns", verified.to_string()),
                    (
                        "xlated_bytes",
                        info.size_translated().unwrap_or(0).to_string(),
                    ),
                    ("jited_bytes", info.size_jitted().to_string()),
                    ("load_ms", format!("{:.1}", load_time.as_secs_f64() * 1e3)),
                    ("log", log.to_owned()),
                ],
            );
        }
    }
}

// ------------------------------------------------------- packets by kind

/// The ping-pong table of [`per_packet_cost_by_kind`]: two services whose
/// public ports are each other's worker ports, so that a packet the program
/// rewrites is, on the next run, a packet of the same kind again (8080 → 9000
/// → 8080 …) and `repeat` times every run on the path being measured.
const PING: u16 = 8080;
const PONG: u16 = 9000;

fn load_ping_pong() -> (Ebpf, SteeringMaps) {
    require_root();
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(map_names::FLOWS, 65_536)
        .override_global("AYA_LOG_LEVEL", &LOG_OFF, false)
        .load(object())
        .expect("load the eBPF object");
    let mut maps = SteeringMaps::take_from(&mut ebpf).expect("take the maps");
    let table = SteeringTable::uniform(
        &[v4([127, 0, 0, 1], PING), v4([127, 0, 0, 1], PONG)],
        0,
        &[vec![PONG], vec![PING]],
    );
    maps.publish(&table).expect("publish the ping-pong table");
    for name in [program_names::INGRESS, program_names::EGRESS] {
        ebpf_support::load_classifier(&mut ebpf, name);
    }
    (ebpf, maps)
}

/// Batches of `repeat` runs of `packet`: (min, median) of the per-run
/// nanoseconds the kernel measured, and the output of the last batch. The
/// minimum is the figure least touched by a busy machine (interrupts and
/// steal only ever add time; the kernel stops its clock while the test run
/// yields the CPU), and many short batches make an undisturbed one likely.
fn timed_batches(program: &SchedClassifier, packet: &[u8], repeat: u32) -> (u128, u128, Vec<u8>) {
    const BATCHES: usize = 25;
    let mut times = Vec::with_capacity(BATCHES);
    let mut out = Vec::new();
    for _ in 0..BATCHES {
        let (verdict, o, took) = test_run(program, packet, repeat);
        assert_eq!(verdict, NEXT);
        times.push(took);
        out = o;
    }
    let (median, min) = median_ns(times);
    (min, median, out)
}

/// Counters of the maps now.
fn counters(maps: &SteeringMaps) -> ipcluster::steering::Counters {
    maps.counters().expect("read the counters")
}

/// Per-packet cost by kind with `repeat` (the kernel's own ns/run over
/// hundreds of thousands of runs, no per-call harness overhead): the counters
/// prove that every run took the path named (a steered ACK is a flow hit and a
/// rewrite every time, and so on).
#[test]
fn per_packet_cost_by_kind() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    const REPEAT: u32 = 40_000;
    let (ebpf, maps) = load_ping_pong();
    let ingress = classifier(&ebpf, program_names::INGRESS);
    let egress = classifier(&ebpf, program_names::EGRESS);
    let client = v4([10, 1, 2, 5], 20_000);
    let ping = v4([127, 0, 0, 1], PING);
    let pong = v4([127, 0, 0, 1], PONG);
    let runs = u64::from(REPEAT) * 25;

    // Two SYNs record the two flows of the ping-pong (client → PING steered
    // to PONG, client → PONG steered to PING).
    for (to, worker) in [(ping, PONG), (pong, PING)] {
        let (verdict, out, _) = test_run(ingress, &tcp4(client, to, SYN), 1);
        assert_eq!(verdict, NEXT);
        assert_eq!(dst_port(&out), worker, "priming SYN to {to} not steered");
    }
    let mut figures: Vec<(&str, &str, u128, u128)> = Vec::new();

    // ACK of a steered flow: a flow hit and a rewrite on every run.
    let before = counters(&maps);
    let (min, med, out) = timed_batches(ingress, &tcp4(client, ping, ACK), REPEAT);
    let after = counters(&maps);
    assert_eq!(
        after.flow_hits - before.flow_hits,
        runs,
        "not a flow hit every run"
    );
    assert_eq!(
        after.steered - before.steered,
        runs,
        "not rewritten every run"
    );
    assert_eq!(
        dst_port(&out),
        PING,
        "an even number of rewrites ends where it began"
    );
    figures.push(("packet_kind_ingress_ack_steered", "ack", min, med));

    // SYN again (retransmission, or the same SYN on a second hook): the flow
    // is recorded with this sequence number, the SYN follows it.
    let before = counters(&maps);
    let (min, med, _) = timed_batches(ingress, &tcp4(client, ping, SYN), REPEAT);
    let after = counters(&maps);
    assert_eq!(
        after.steered - before.steered,
        runs,
        "SYN not rewritten every run"
    );
    assert_eq!(
        after.new_flows, before.new_flows,
        "a known SYN recorded a new flow"
    );
    figures.push(("packet_kind_ingress_syn_known", "syn", min, med));

    // Egress restore: the reply from the worker port gets the public port
    // back on every run.
    let before = counters(&maps);
    let (min, med, out) = timed_batches(egress, &tcp4(pong, client, ACK), REPEAT);
    let after = counters(&maps);
    assert_eq!(
        after.egress_rewrites - before.egress_rewrites,
        runs,
        "reply not restored every run"
    );
    assert_eq!(src_port(&out), PONG);
    figures.push(("packet_kind_egress_restore", "reply", min, med));

    // Passed through: TCP to a port no service or worker has, both hooks;
    // UDP to the service's port.
    let other = tcp4(client, v4([127, 0, 0, 1], 5432), ACK);
    let before = counters(&maps);
    let (min, med, out) = timed_batches(ingress, &other, REPEAT);
    assert_eq!(out, other, "a non-service packet was changed");
    figures.push(("packet_kind_ingress_other_tcp", "other_tcp", min, med));
    let other_reply = tcp4(v4([127, 0, 0, 1], 5432), client, ACK);
    let (min, med, out) = timed_batches(egress, &other_reply, REPEAT);
    assert_eq!(out, other_reply, "a non-worker reply was changed");
    figures.push(("packet_kind_egress_other_tcp", "other_tcp", min, med));
    let udp = l4_segment(client, ping, UDP, 0);
    let (min, med, out) = timed_batches(ingress, &udp, REPEAT);
    assert_eq!(out, udp);
    figures.push(("packet_kind_ingress_udp", "udp", min, med));
    let after = counters(&maps);
    assert_eq!(
        after.passed - before.passed,
        3 * runs,
        "not passed every run"
    );
    assert_eq!(after.steered, before.steered);

    // A new flow cannot repeat (the second run finds the flow): single runs
    // with a new client port each, less the harness's per-call floor (the
    // untouched packet's single-run median minus its repeat average).
    let mut syn_times = Vec::new();
    let mut floor_times = Vec::new();
    for i in 0..2000u16 {
        let fresh = v4([10, 1, 3, 5], 20_000 + i);
        let (_, out, took) = test_run(ingress, &tcp4(fresh, ping, SYN), 1);
        assert_eq!(dst_port(&out), PONG, "new SYN not steered");
        syn_times.push(took);
        floor_times.push(test_run(ingress, &other, 1).2);
    }
    let (syn_single, _) = median_ns(syn_times);
    let (other_single, _) = median_ns(floor_times);
    let other_repeat = figures
        .iter()
        .find(|f| f.0 == "packet_kind_ingress_other_tcp")
        .map_or(0, |f| f.2);
    let floor = other_single.saturating_sub(other_repeat);
    bench(
        "packet_kind_ingress_syn_new",
        &[
            ("kind", "syn_new".into()),
            ("ns", syn_single.saturating_sub(floor).to_string()),
            ("single_median_ns", syn_single.to_string()),
            ("floor_ns", floor.to_string()),
            ("method", "single_runs=2000".into()),
        ],
    );
    for (name, kind, min, med) in figures {
        assert!(min > 0, "{name}: no time measured");
        bench(
            name,
            &[
                ("kind", kind.into()),
                ("ns", min.to_string()),
                ("median_ns", med.to_string()),
                ("method", format!("repeat={REPEAT}x25")),
            ],
        );
    }
}

// ---------------------------------------------------------------- memory

/// `memlock` of a map as the kernel reports it in /proc/self/fdinfo.
fn memlock(data: &MapData) -> u64 {
    let fd = data.fd().as_fd().as_raw_fd();
    let info =
        std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).expect("read the map's fdinfo");
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("memlock in fdinfo")
}

fn flows_memlock(flow_entries: u32) -> u64 {
    require_root();
    let ebpf = EbpfLoader::new()
        .map_max_entries(map_names::FLOWS, flow_entries)
        .load(object())
        .expect("load the eBPF object");
    match ebpf.map(map_names::FLOWS).expect("the flows map") {
        Map::LruHashMap(data) | Map::HashMap(data) | Map::PerCpuLruHashMap(data) => memlock(data),
        other => panic!("flows is not a hash map: {other:?}"),
    }
}

/// Memory per flow entry: the kernel's accounting of the flow map at two sizes,
/// the difference divided by the difference in entries (fixed overhead cancels).
#[test]
fn flow_table_memory_per_entry() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let (small, large) = (65_536u32, ipcluster_common::DEFAULT_FLOW_ENTRIES);
    let (m_small, m_large) = (flows_memlock(small), flows_memlock(large));
    assert!(
        m_large > m_small,
        "the flow map does not grow with its size: {m_small} vs {m_large} bytes"
    );
    let per_entry = (m_large - m_small) as f64 / f64::from(large - small);
    bench(
        "flow_table_memory",
        &[
            ("bytes_per_entry", format!("{per_entry:.1}")),
            ("default_entries", large.to_string()),
            (
                "default_mib",
                format!("{:.1}", m_large as f64 / (1024.0 * 1024.0)),
            ),
            ("entries_compared", format!("{small}/{large}")),
        ],
    );
}
