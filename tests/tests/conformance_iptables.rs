//! The steering conformance suite against the iptables backend, plus checks
//! only this backend has: the nat table after teardown is as before, and
//! foreign rules are never touched. Run as root, one test thread:
//! `cargo test -p ipcluster-tests --test conformance_iptables -- --test-threads=1`

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use ipcluster::steering::iptables::chain_name;
use ipcluster::steering::iptables::rules::{Family, jump_lines};
use ipcluster::steering::{BackendKind, Steering, SteeringConfig, SteeringTable, backend};
use ipcluster_tests::client::worker_port_from;
use ipcluster_tests::conformance;
use ipcluster_tests::guard::defer;
use ipcluster_tests::unique::{Ports, cluster_name};
use ipcluster_tests::worker::Worker;

fn iptables(config: SteeringConfig) -> Box<dyn Steering> {
    backend(BackendKind::Iptables, config).expect("build the iptables backend")
}

#[test]
fn sticky_bands() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    conformance::sticky_bands(&iptables);
}

#[test]
fn sticky_bands_with_shift() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    conformance::sticky_bands_with_shift(&iptables);
}

#[test]
fn two_services() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    conformance::two_services(&iptables);
}

#[test]
fn flip_under_open_connections() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    conformance::flip_under_open_connections(&iptables);
}

#[test]
fn survives_drop_and_reads_back() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    conformance::survives_drop_and_reads_back(&iptables);
}

#[test]
fn set_band_moves_one_band() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    conformance::set_band_moves_one_band(&iptables);
}

#[test]
fn invalid_publish_keeps_previous() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    conformance::invalid_publish_keeps_previous(&iptables);
}

#[test]
fn teardown_leaves_nothing() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    conformance::teardown_leaves_nothing(&iptables, &leftovers);
}

/// Lines of `iptables-save -t nat` / `ip6tables-save -t nat` that name the
/// cluster's chain or carry its comment.
fn leftovers(cluster: &str) -> Vec<String> {
    let chain = chain_name(cluster);
    let comment = format!("ipcluster:{cluster}");
    let mut found = Vec::new();
    for save in ["iptables-save", "ip6tables-save"] {
        for line in nat_dump(save).lines() {
            let names_chain = line
                .split(|c: char| c.is_whitespace() || c == ':')
                .any(|word| word == chain);
            let has_comment =
                line.contains(&format!("\"{comment}\"")) || line.contains(&format!("\"{comment}:"));
            if names_chain || has_comment {
                found.push(format!("{save}: {line}"));
            }
        }
    }
    found
}

/// `<save> -t nat` without its comment lines (they hold a timestamp).
fn nat_dump(save: &str) -> String {
    let out = std::process::Command::new(save)
        .args(["-t", "nat"])
        .output()
        .unwrap_or_else(|e| panic!("run {save}: {e}"));
    assert!(
        out.status.success(),
        "{save} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// `<save> -t nat` with counters blanked, for before/after comparisons, and
/// without the lines of other ipcluster clusters (other engineers' masters
/// may run while these tests do): only `cluster`'s and foreign lines stay.
fn nat_without_counters(save: &str, cluster: &str) -> String {
    let chain = chain_name(cluster);
    let comment = format!("\"ipcluster:{cluster}");
    nat_dump(save)
        .lines()
        .filter(|line| {
            let any_cluster = line.contains("IPCLUSTER-") || line.contains("\"ipcluster:");
            !any_cluster || line.contains(&chain) || line.contains(&comment)
        })
        .map(|line| match (line.find('['), line.rfind(']')) {
            (Some(a), Some(b))
                if a < b && line[a + 1..b].split(':').all(|n| n.parse::<u64>().is_ok()) =>
            {
                format!("{}[-]{}\n", &line[..a], &line[b + 1..])
            }
            _ => format!("{line}\n"),
        })
        .collect()
}

fn run(program: &str, args: &[&str]) {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Foreign rules in nat OUTPUT and PREROUTING, before and after our jumps,
/// survive install, publish and teardown unchanged and in order; afterwards
/// `iptables-save -t nat` is exactly as before (apart from counters).
#[test]
fn teardown_restores_the_nat_table_and_keeps_foreign_rules() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let ports = Ports::reserve(3);
    let cluster = cluster_name("foreign");
    let public = SocketAddr::from(([127, 0, 0, 1], ports.get(0)));
    let config = conformance::test_config(&cluster, vec![public]);
    let _teardown = conformance::teardown_guard(&iptables, &config);
    let tag = format!("foreign-{cluster}");
    let foreign = |chain: &str, n: u16| {
        vec![
            chain.to_owned(),
            "-p".into(),
            "tcp".into(),
            "--dport".into(),
            (ports.get(0) + n).to_string(),
            "-m".into(),
            "comment".into(),
            "--comment".into(),
            tag.clone(),
            "-j".into(),
            "RETURN".into(),
        ]
    };
    let add = |chain: &str, n: u16| {
        let mut args = vec!["-t".to_owned(), "nat".into(), "-A".into()];
        args.extend(foreign(chain, n));
        run(
            "iptables",
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
    };
    let remove_foreign = defer(|| {
        for (chain, n) in [("OUTPUT", 1), ("OUTPUT", 2), ("PREROUTING", 1)] {
            let mut args = vec!["-t".to_owned(), "nat".into(), "-D".into()];
            args.extend(foreign(chain, n));
            let _ = std::process::Command::new("iptables").args(&args).output();
        }
    });

    add("OUTPUT", 1);
    add("PREROUTING", 1);
    let before = nat_without_counters("iptables-save", &cluster);
    let before_v6 = nat_without_counters("ip6tables-save", &cluster);

    let mut steering = iptables(config.clone());
    steering.install().expect("install");
    add("OUTPUT", 2);
    let with_foreign_after = nat_without_counters("iptables-save", &cluster);
    let table = SteeringTable::uniform(&[public], 0, &[ports.slice(1..3)]);
    steering.publish(&table).expect("publish");
    steering.publish(&table).expect("publish again");
    let ours_removed = |dump: &str| -> String {
        let chain = chain_name(&cluster);
        dump.lines()
            .filter(|l| !l.contains(&chain))
            .map(|l| format!("{l}\n"))
            .collect()
    };
    assert_eq!(
        ours_removed(&nat_without_counters("iptables-save", &cluster)),
        ours_removed(&with_foreign_after),
        "publishing changed something outside our chain and jumps"
    );

    steering.teardown().expect("teardown");
    // The rule added after install stays, right after the first foreign
    // OUTPUT rule.
    let second_line = format!(
        "-A OUTPUT -p tcp -m tcp --dport {} -m comment --comment {tag} -j RETURN",
        ports.get(0) + 2
    );
    let mut expected_after = String::new();
    for line in before.lines() {
        expected_after += &format!("{line}\n");
        if line.starts_with("-A OUTPUT ") && line.contains(&tag) {
            expected_after += &format!("{second_line}\n");
        }
    }
    assert_eq!(
        nat_without_counters("iptables-save", &cluster),
        expected_after
    );
    assert_eq!(
        nat_without_counters("ip6tables-save", &cluster),
        before_v6,
        "ip6tables was touched"
    );

    drop(remove_foreign);
    assert!(
        !nat_dump("iptables-save").contains(&tag),
        "foreign test rules left behind"
    );
}

/// Installing twice adds the jumps once, in exactly the form iptables-save
/// prints them (so publish never churns them), and install returns the table.
#[test]
fn jumps_are_idempotent_and_canonical() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let ports = Ports::reserve(4);
    let cluster = cluster_name("jumps");
    let listens = vec![
        SocketAddr::from(([127, 0, 0, 1], ports.get(0))),
        SocketAddr::from(([127, 0, 0, 1], ports.get(1))),
    ];
    let config = conformance::test_config(&cluster, listens.clone());
    let _teardown = conformance::teardown_guard(&iptables, &config);
    let chain = chain_name(&cluster);
    let jumps = || -> Vec<String> {
        nat_dump("iptables-save")
            .lines()
            .filter(|l| l.ends_with(&format!("-j {chain}")))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(iptables(config.clone()).install().expect("install"), None);
    let wanted = jump_lines(&chain, &cluster, Family::V4, &listens);
    assert_eq!(jumps(), wanted);
    let table = SteeringTable::uniform(&listens, 0, &[ports.slice(2..4), ports.slice(2..4)]);
    iptables(config.clone()).publish(&table).expect("publish");
    assert_eq!(
        iptables(config.clone()).install().expect("install again"),
        Some(table)
    );
    assert_eq!(jumps(), wanted);
}

/// A wildcard listen (0.0.0.0) matches any local destination, through the
/// `addrtype LOCAL` jump in OUTPUT; it reads back as 0.0.0.0.
#[test]
fn wildcard_listen_is_steered() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let ports = Ports::reserve(5);
    let cluster = cluster_name("wild");
    let public = SocketAddr::from(([0, 0, 0, 0], ports.get(0)));
    let config = conformance::test_config(&cluster, vec![public]);
    let _teardown = conformance::teardown_guard(&iptables, &config);
    let mut steering = iptables(config.clone());
    steering.install().expect("install");
    let table = SteeringTable::uniform(&[public], 1, &[ports.slice(1..5)]);
    let _workers = Worker::start_all(&ports.slice(1..5)).expect("workers");
    steering.publish(&table).expect("publish");
    assert_eq!(steering.read_table().expect("read"), Some(table.clone()));
    let wrong = conformance::mismatches(&table, 0, &ipcluster_tests::loopback_clients(64), 1);
    conformance::assert_none_wrong("wildcard listen", &wrong);
    // Another local address of 127/8 is a local destination too.
    let other_local = SocketAddr::from(([127, 0, 0, 200], ports.get(0)));
    let client = ipcluster_tests::loopback_client(7);
    assert_eq!(
        worker_port_from(client, other_local).expect("connect to 127.0.0.200"),
        table.worker_port_for(0, client).expect("port")
    );
}

/// Counters count the connections steered since the publish.
#[test]
fn counters_count_steered_connections() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let ports = Ports::reserve(3);
    let cluster = cluster_name("counters");
    let public = SocketAddr::from(([127, 0, 0, 1], ports.get(0)));
    let config = conformance::test_config(&cluster, vec![public]);
    let _teardown = conformance::teardown_guard(&iptables, &config);
    let mut steering = iptables(config.clone());
    steering.install().expect("install");
    let table = SteeringTable::uniform(&[public], 0, &[ports.slice(1..3)]);
    let _workers = Worker::start_all(&ports.slice(1..3)).expect("workers");
    steering.publish(&table).expect("publish");
    assert_eq!(steering.counters().expect("counters").steered, 0);
    let wrong = conformance::mismatches(&table, 0, &ipcluster_tests::loopback_clients(10), 1);
    conformance::assert_none_wrong("counted connections", &wrong);
    let counters = steering.counters().expect("counters");
    assert_eq!((counters.steered, counters.new_flows), (10, 10));
}

/// One real ip6tables round trip: install, publish, read back, a connection
/// from ::1 reaches its band's worker on [::1], teardown leaves nothing.
#[test]
fn ipv6_round_trip() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let ports = Ports::reserve(5);
    let cluster = cluster_name("v6");
    let public = SocketAddr::from((Ipv6Addr::LOCALHOST, ports.get(0)));
    let config = conformance::test_config(&cluster, vec![public]);
    let _teardown = conformance::teardown_guard(&iptables, &config);
    let before = nat_without_counters("ip6tables-save", &cluster);
    let before_v4 = nat_without_counters("iptables-save", &cluster);
    let mut steering = iptables(config.clone());
    assert_eq!(steering.install().expect("install"), None);
    let table = SteeringTable::uniform(&[public], 0, &[ports.slice(1..5)]);
    let workers: Vec<Worker> = ports
        .slice(1..5)
        .iter()
        .map(|&p| Worker::start_on(SocketAddr::from((Ipv6Addr::LOCALHOST, p))).expect("v6 worker"))
        .collect();
    steering.publish(&table).expect("publish");
    assert_eq!(
        iptables(config.clone()).read_table().expect("read"),
        Some(table.clone())
    );
    let client = IpAddr::V6(Ipv6Addr::LOCALHOST);
    let expected = table.worker_port_for(0, client).expect("port");
    assert_eq!(expected, ports.get(1 + 1), "::1 is band 1 of 4");
    for _ in 0..3 {
        assert_eq!(
            worker_port_from(client, public).expect("connect over v6"),
            expected
        );
    }
    drop(workers);
    assert_eq!(
        nat_without_counters("iptables-save", &cluster),
        before_v4,
        "iptables (v4) was touched"
    );
    steering.teardown().expect("teardown");
    assert_eq!(nat_without_counters("ip6tables-save", &cluster), before);
    assert!(leftovers(&cluster).is_empty());
}

/// Time to publish a table of 16, 64 and 256 bands (median of 11 publishes,
/// alternating two tables so every publish changes every rule). Prints the
/// figures; `--nocapture` shows them.
#[test]
fn publish_time_by_bands() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let mut report = format!("iptables publish time (median of {PUBLISHES}):");
    for bands in [16usize, 64, 256] {
        let ports = Ports::reserve(1 + 2 * bands);
        let cluster = cluster_name("bench");
        let public = SocketAddr::from(([127, 0, 0, 1], ports.get(0)));
        let config = conformance::test_config(&cluster, vec![public]);
        let _teardown = conformance::teardown_guard(&iptables, &config);
        let mut steering = iptables(config.clone());
        steering.install().expect("install");
        let tables = [
            SteeringTable::uniform(&[public], 0, &[ports.slice(1..1 + bands)]),
            SteeringTable::uniform(&[public], 0, &[ports.slice(1 + bands..1 + 2 * bands)]),
        ];
        let mut times: Vec<Duration> = (0..PUBLISHES)
            .map(|i| {
                let start = Instant::now();
                steering.publish(&tables[i % 2]).expect("publish");
                start.elapsed()
            })
            .collect();
        times.sort();
        let read_start = Instant::now();
        assert_eq!(
            steering.read_table().expect("read"),
            Some(tables[0].clone())
        );
        let read = read_start.elapsed();
        report += &format!(
            "\n  {bands:>3} bands: publish {:>6.1} ms (min {:.1}, max {:.1}); read_table {:.1} ms",
            ms(times[PUBLISHES / 2]),
            ms(times[0]),
            ms(times[PUBLISHES - 1]),
            ms(read)
        );
    }
    println!("{report}");
}

const PUBLISHES: usize = 11;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The suite can fail: a backend that publishes every band to the wrong
/// worker (ports reversed) must not pass `sticky_bands`.
#[test]
fn suite_catches_a_backend_that_steers_wrong() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    struct Reversed(Box<dyn Steering>);
    impl Steering for Reversed {
        fn kind(&self) -> BackendKind {
            self.0.kind()
        }
        fn install(&mut self) -> Result<Option<SteeringTable>, ipcluster::steering::SteeringError> {
            self.0.install()
        }
        fn publish(
            &mut self,
            table: &SteeringTable,
        ) -> Result<(), ipcluster::steering::SteeringError> {
            let mut wrong = table.clone();
            for route in &mut wrong.services {
                route.worker_ports.reverse();
            }
            self.0.publish(&wrong)
        }
        fn set_band(
            &mut self,
            service: usize,
            band: u32,
            worker_port: u16,
        ) -> Result<(), ipcluster::steering::SteeringError> {
            self.0.set_band(service, band, worker_port)
        }
        fn read_table(&self) -> Result<Option<SteeringTable>, ipcluster::steering::SteeringError> {
            // Read back what was asked, so only the traffic check can notice.
            let mut table = self.0.read_table()?;
            for route in table.iter_mut().flat_map(|t| t.services.iter_mut()) {
                route.worker_ports.reverse();
            }
            Ok(table)
        }
        fn counters(
            &self,
        ) -> Result<ipcluster::steering::Counters, ipcluster::steering::SteeringError> {
            self.0.counters()
        }
        fn teardown(&mut self) -> Result<(), ipcluster::steering::SteeringError> {
            self.0.teardown()
        }
    }
    let reversed =
        |config: SteeringConfig| -> Box<dyn Steering> { Box::new(Reversed(iptables(config))) };
    let outcome = std::panic::catch_unwind(|| conformance::sticky_bands(&reversed));
    let message = outcome
        .as_ref()
        .err()
        .and_then(|p| p.downcast_ref::<String>())
        .cloned()
        .unwrap_or_default();
    assert!(
        message.contains("went wrong"),
        "expected the traffic check to fail, got {message:?}"
    );
    assert!(
        outcome.is_err(),
        "sticky_bands passed a backend that steers every band wrong"
    );
}

/// A rule of ours edited by hand makes read-back fail with a message that
/// says so (never a guessed table); publishing a table repairs the chain.
#[test]
fn hand_edited_rule_is_reported_and_publish_repairs_it() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let ports = Ports::reserve(3);
    let cluster = cluster_name("edited");
    let public = SocketAddr::from(([127, 0, 0, 1], ports.get(0)));
    let config = conformance::test_config(&cluster, vec![public]);
    let _teardown = conformance::teardown_guard(&iptables, &config);
    let mut steering = iptables(config.clone());
    steering.install().expect("install");
    let table = SteeringTable::uniform(&[public], 0, &[ports.slice(1..3)]);
    steering.publish(&table).expect("publish");
    // Band 0's comment on band 1's source match.
    let comment = format!("ipcluster:{cluster}:0:0/2:shift=0");
    let dport = ports.get(0).to_string();
    let worker = ports.get(1).to_string();
    run(
        "iptables",
        &[
            "-t",
            "nat",
            "-R",
            &chain_name(&cluster),
            "1",
            "-s",
            "0.0.0.1/0.0.0.1",
            "-d",
            "127.0.0.1/32",
            "-p",
            "tcp",
            "--dport",
            &dport,
            "-m",
            "comment",
            "--comment",
            &comment,
            "-j",
            "REDIRECT",
            "--to-ports",
            &worker,
        ],
    );
    let error = steering
        .read_table()
        .expect_err("a damaged chain must not read back");
    assert!(error.to_string().contains("changed by hand"), "{error}");
    assert!(
        iptables(config.clone()).install().is_err(),
        "install reports it too"
    );
    steering
        .publish(&table)
        .expect("publish over the damaged chain");
    assert_eq!(steering.read_table().expect("read"), Some(table));
}
