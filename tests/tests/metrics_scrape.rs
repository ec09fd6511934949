//! End-to-end: `--metrics-listen` serves Prometheus metrics from the real
//! master. Scrape after traffic (workers by state and generation, RSS and
//! connections per worker, the steering counters, publishes and their
//! duration), keep scraping through a reload (the new master takes the port
//! over; the figures follow the new generation), check the retirements and
//! reloads it counted, and validate the text with `promtool check metrics`.
//! Root, one test thread: `cargo test -p ipcluster-tests --test metrics_scrape -- --test-threads=1`

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipcluster_tests::cluster::{Cluster, ClusterSpec, demo_get, ipcluster, live_workers};
use ipcluster_tests::invoke::{self, assert_failed_cleanly, poll, run_words};
use ipcluster_tests::loopback_client;
use ipcluster_tests::unique::{Ports, cluster_name};

/// `GET /metrics` with optional extra headers: (status, content type, body).
fn scrape(addr: SocketAddr, headers: &str) -> std::io::Result<(u16, String, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{headers}\r\n"
    )?;
    let mut response = String::new();
    s.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {response:?}")))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    Ok((code, content_type, body.to_owned()))
}

/// Sample lines `name{labels} value` → value, keyed by `name{labels}`.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The sum of the connection gauges of all workers.
fn connections(s: &HashMap<String, f64>) -> f64 {
    s.iter()
        .filter(|(k, _)| k.starts_with("ipcluster_worker_connections{"))
        .map(|(_, v)| v)
        .sum()
}

fn value(s: &HashMap<String, f64>, key: &str, text: &str) -> f64 {
    *s.get(key)
        .unwrap_or_else(|| panic!("no sample {key} in\n{text}"))
}

fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) is missing: `cargo xtask setup` installs it");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn scrape_through_a_reload() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let name = cluster_name("metrics");
    let ports = Ports::reserve(2);
    let listen: SocketAddr = format!("127.0.0.1:{}", ports.get(0)).parse().expect("addr");
    let metrics: SocketAddr = format!("127.0.0.1:{}", ports.get(1)).parse().expect("addr");
    let mut spec = ClusterSpec::demo("ebpf", 2, listen);
    spec.flags = vec!["--metrics-listen".into(), metrics.to_string()];
    drop(ports); // the master binds the metrics port itself
    let mut cluster = Cluster::start(&name, spec);

    for i in 0..8 {
        demo_get(loopback_client(2 + i), listen).expect("request to the demo worker");
    }
    // A held connection shows up in the connection gauge of its worker.
    let held = ipcluster_tests::cluster::DemoStream::open(loopback_client(2), listen)
        .expect("a long request");
    let status = cluster.status();
    // Scrape until the held connection is counted (the gauge follows the
    // workers' reports), or give up after 20 s with the last scrape.
    let mut text = String::new();
    poll(Duration::from_secs(20), Duration::from_millis(100), || {
        let (code, content_type, body) = scrape(metrics, "").expect("scrape");
        assert_eq!(code, 200, "{body}");
        assert!(
            content_type.starts_with("text/plain; version=0.0.4"),
            "{content_type}"
        );
        text = body;
        (connections(&samples(&text)) >= 1.0).then_some(())
    });
    let s = samples(&text);
    assert_eq!(value(&s, "ipcluster_generation", &text), 1.0);
    assert_eq!(
        value(
            &s,
            "ipcluster_workers{state=\"live\",generation=\"1\"}",
            &text
        ),
        2.0
    );
    for w in live_workers(&status, Some(1)) {
        let key = format!(
            "ipcluster_worker_rss_bytes{{pid=\"{}\",band=\"{}\",generation=\"1\",state=\"live\"}}",
            w["pid"], w["band"]
        );
        assert!(value(&s, &key, &text) > 0.0, "{key}\n{text}");
    }
    assert!(
        connections(&s) >= 1.0,
        "the held connection is not counted within 20 s:\n{text}"
    );
    assert!(
        value(
            &s,
            "ipcluster_steering_packets_total{backend=\"ebpf\",counter=\"steered\"}",
            &text
        ) >= 8.0,
        "{text}"
    );
    assert_eq!(
        value(&s, "ipcluster_publishes_total{kind=\"table\"}", &text),
        1.0
    );
    assert_eq!(
        value(
            &s,
            "ipcluster_publish_duration_seconds_count{kind=\"table\"}",
            &text
        ),
        1.0
    );
    promtool_check(&text);
    drop(held);

    // Scrape every 50 ms through a reload.
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<Result<f64, String>>>> = Arc::new(Mutex::new(Vec::new()));
    let scraper = {
        let (stop, seen) = (Arc::clone(&stop), Arc::clone(&seen));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let r =
                    scrape(metrics, "")
                        .map_err(|e| e.to_string())
                        .and_then(|(code, _, body)| {
                            if code != 200 {
                                return Err(format!("HTTP {code}: {body}"));
                            }
                            samples(&body)
                                .get("ipcluster_generation")
                                .copied()
                                .ok_or_else(|| format!("no generation in {body}"))
                        });
                seen.lock().expect("scrapes").push(r);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    // The first scrape must reach the old master before the new one starts:
    // once the hand-over has begun, the old master answers 503.
    let answered = poll(Duration::from_secs(10), Duration::from_millis(10), || {
        let seen = seen.lock().expect("scrapes");
        seen.iter()
            .any(|r| r.as_ref().ok() == Some(&1.0))
            .then_some(())
    });
    assert!(
        answered.is_some(),
        "no scrape answered before the reload: {:?}",
        seen.lock().expect("scrapes")
    );
    cluster.start_master();
    cluster.wait_generation_live(2, Duration::from_secs(30));
    // Keep scraping until a scrape answered with generation 2 (the new master
    // serves the metrics port once it took it over).
    let answered = poll(Duration::from_secs(20), Duration::from_millis(20), || {
        let seen = seen.lock().expect("scrapes");
        seen.iter()
            .any(|r| r.as_ref().ok() == Some(&2.0))
            .then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    scraper.join().expect("scraper thread");
    let seen = seen.lock().expect("scrapes").clone();
    assert!(
        answered.is_some(),
        "no scrape answered with generation 2 within 20 s of it being live: {seen:?}"
    );
    let generations: Vec<f64> = seen
        .iter()
        .filter_map(|r| r.as_ref().ok().copied())
        .collect();
    let failed: Vec<&String> = seen.iter().filter_map(|r| r.as_ref().err()).collect();
    eprintln!(
        "scrapes during the reload: {} answered, {} failed {:?}",
        generations.len(),
        failed.len(),
        failed
    );
    assert!(
        generations.windows(2).all(|w| w[0] <= w[1]),
        "the generation went backwards: {generations:?}"
    );
    assert_eq!(generations.last(), Some(&2.0), "{seen:?}");
    assert!(generations.contains(&1.0), "{seen:?}");

    let (code, _, text) = scrape(metrics, "").expect("scrape after the reload");
    assert_eq!(code, 200);
    let s = samples(&text);
    assert_eq!(value(&s, "ipcluster_generation", &text), 2.0);
    assert_eq!(value(&s, "ipcluster_reloads_total", &text), 1.0);
    assert_eq!(
        value(
            &s,
            "ipcluster_workers{state=\"live\",generation=\"2\"}",
            &text
        ),
        2.0
    );
    let retired_gen1: f64 = ["retired", "dying"]
        .iter()
        .filter_map(|st| {
            s.get(&format!(
                "ipcluster_workers{{state=\"{st}\",generation=\"1\"}}"
            ))
        })
        .sum();
    assert_eq!(retired_gen1, 2.0, "{text}");
    assert_eq!(
        value(
            &s,
            "ipcluster_retirements_total{reason=\"new_generation\"}",
            &text
        ),
        2.0
    );
    promtool_check(&text);

    // kill-retired: two retired workers asked to die, counted by reason.
    let out = ipcluster(&["kill-retired", "--name", &name], Duration::from_secs(10));
    assert!(
        out.status.success(),
        "kill-retired failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The kills are spaced by --spawn-delay: scrape until both are counted
    // (then still exactly 2), at most 20 s.
    let mut text = String::new();
    let mut asked = 0.0;
    poll(Duration::from_secs(20), Duration::from_millis(100), || {
        let (code, _, body) = scrape(metrics, "").expect("scrape after kill-retired");
        assert_eq!(code, 200, "{body}");
        text = body;
        asked = samples(&text)
            .iter()
            .filter(|(k, _)| k.starts_with("ipcluster_kills_total{reason=\"kill_retired\""))
            .map(|(_, v)| v)
            .sum();
        (asked >= 2.0).then_some(())
    });
    assert_eq!(
        asked, 2.0,
        "kills counted for kill-retired (within 20 s):\n{text}"
    );

    // A scraper that asks for OpenMetrics gets it as prometheus-client writes it.
    let (code, content_type, body) = scrape(
        metrics,
        "Accept: application/openmetrics-text; version=1.0.0\r\n",
    )
    .expect("openmetrics scrape");
    assert_eq!(code, 200);
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    cluster.stop();
}

#[test]
fn metrics_port_in_use_is_a_clean_error() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let name = cluster_name("metrics-busy");
    let ports = Ports::reserve(2);
    let listen = format!("127.0.0.1:{}", ports.get(0));
    let busy = std::net::TcpListener::bind(("127.0.0.1", ports.get(1))).expect("hold a port");
    let metrics = busy.local_addr().expect("addr").to_string();
    let words = run_words(&name, "iptables", &listen, &["--metrics-listen", &metrics]);
    let out = invoke::finish(invoke::command(&words), Duration::from_secs(30));
    assert_failed_cleanly(
        &out,
        &name,
        &[&format!("cannot listen on --metrics-listen {metrics}")],
    );
}
