//! End-to-end: systemd's notification protocol. A Unix datagram socket stands
//! in for systemd's `NOTIFY_SOCKET` and records every message with its
//! sender's pid (SCM_CREDENTIALS, as systemd reads it). Start: the master
//! says READY=1 once generation 1 serves, with STATUS= and WATCHDOG=1 every
//! half WATCHDOG_USEC. Reload the way the unit's ExecReload does (`run
//! --detach`, no WATCHDOG_USEC): the new master says RELOADING=1 and
//! MAINPID=<itself> before the old one exits, READY=1 once generation 2
//! serves, and keeps the watchdog going; `--detach` returns then. Stop:
//! STOPPING=1.
//! Root, one test thread: `cargo test -p ipcluster-tests --test systemd_notify -- --test-threads=1`

use std::io::IoSliceMut;
use std::os::fd::AsRawFd as _;
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipcluster_tests::cluster::{Cluster, ClusterSpec, ipcluster};
use ipcluster_tests::guard::defer;
use ipcluster_tests::invoke::{self, assert_failed_cleanly, poll, run_words};
use ipcluster_tests::unique::{Ports, cluster_name};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg, setsockopt, sockopt};

/// One datagram: who sent it, its lines and when it was read.
#[derive(Clone, Debug)]
struct Notification {
    pid: i32,
    lines: Vec<String>,
    at: Instant,
}

impl Notification {
    fn has(&self, line: &str) -> bool {
        self.lines.iter().any(|l| l == line)
    }
    fn value(&self, key: &str) -> Option<&str> {
        self.lines
            .iter()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
    }
}

/// The stand-in for systemd: a bound datagram socket and a reader thread.
struct FakeSystemd {
    path: std::path::PathBuf,
    received: Arc<Mutex<Vec<Notification>>>,
}

impl FakeSystemd {
    fn bind(name: &str) -> FakeSystemd {
        let path = std::env::temp_dir().join(format!("{name}.notify"));
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        setsockopt(&socket, sockopt::PassCred, &true).expect("SO_PASSCRED");
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&received);
        std::thread::spawn(move || {
            loop {
                let mut buf = vec![0u8; 4096];
                let mut iov = [IoSliceMut::new(&mut buf)];
                // Room for the credentials and for the descriptor of BARRIER=1
                // (dropped, which closes it: what systemd does).
                let mut cmsg = nix::cmsg_space!(libc::ucred, [std::os::fd::RawFd; 4]);
                let Ok(msg) = recvmsg::<()>(
                    socket.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                ) else {
                    return;
                };
                let mut pid = 0;
                let mut fds = Vec::new();
                if let Ok(cmsgs) = msg.cmsgs() {
                    for c in cmsgs {
                        match c {
                            ControlMessageOwned::ScmCredentials(cred) => pid = cred.pid(),
                            ControlMessageOwned::ScmRights(f) => fds.extend(f),
                            _ => {}
                        }
                    }
                }
                let len = msg.bytes;
                for fd in fds {
                    // SAFETY: the descriptor was just received and is ours.
                    unsafe { libc::close(fd) };
                }
                let text = String::from_utf8_lossy(&buf[..len]).into_owned();
                let lines = text.lines().map(str::to_owned).collect();
                sink.lock().expect("notification list").push(Notification {
                    pid,
                    lines,
                    at: Instant::now(),
                });
            }
        });
        FakeSystemd { path, received }
    }

    fn all(&self) -> Vec<Notification> {
        self.received.lock().expect("notification list").clone()
    }

    /// Wait for a message from `pid` with `line`; returns its index.
    fn wait_for(&self, pid: i32, line: &str, timeout: Duration) -> usize {
        poll(timeout, Duration::from_millis(20), || {
            self.all().iter().position(|n| n.pid == pid && n.has(line))
        })
        .unwrap_or_else(|| {
            panic!(
                "no {line:?} from pid {pid} within {timeout:?}; received:\n{}",
                self.describe()
            )
        })
    }

    fn describe(&self) -> String {
        self.all()
            .iter()
            .map(|n| format!("  pid {}: {}", n.pid, n.lines.join(" | ")))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for FakeSystemd {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// An iptables cluster of two demo workers whose master is told to notify
/// `systemd` (with `env` besides `NOTIFY_SOCKET`); the pid of that master.
fn start_notifying(
    name: &str,
    systemd: &FakeSystemd,
    env: &[(&str, &str)],
) -> (Cluster, i32, Ports) {
    let ports = Ports::reserve(1);
    let listen = format!("127.0.0.1:{}", ports.get(0))
        .parse()
        .expect("listen address");
    let mut vars = vec![("NOTIFY_SOCKET".into(), systemd.path.display().to_string())];
    vars.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    let cluster = Cluster::start_with_env(name, ClusterSpec::demo("iptables", 2, listen), vars);
    let first = i32::try_from(cluster.masters[0].id()).expect("pid");
    (cluster, first, ports)
}

/// How many `WATCHDOG=1` in a row [`assert_watchdog_interval`] waits for.
const BEATS: usize = 12;

/// From the message at index `from` on, `pid` sends `WATCHDOG=1` regularly
/// every half of `watchdog` (its `WATCHDOG_USEC`): [`BEATS`] of them arrive
/// within 30 s (the pings did not stop), and the median time between two is
/// between a quarter and the whole of `watchdog` (neither a flood nor slower
/// than systemd allows). The median, taken from the times they were read, does not move
/// when the machine holds the master or the reader back for a while.
fn assert_watchdog_interval(systemd: &FakeSystemd, pid: i32, from: usize, watchdog: Duration) {
    let beats = poll(Duration::from_secs(30), Duration::from_millis(20), || {
        let beats: Vec<Instant> = systemd.all()[from..]
            .iter()
            .filter(|m| m.pid == pid && m.has("WATCHDOG=1"))
            .map(|m| m.at)
            .collect();
        (beats.len() >= BEATS).then_some(beats)
    })
    .unwrap_or_else(|| {
        panic!(
            "fewer than {BEATS} WATCHDOG=1 from pid {pid} within 30 s (one every {:?} expected):\n{}",
            watchdog / 2,
            systemd.describe()
        )
    });
    let mut gaps: Vec<Duration> = beats
        .windows(2)
        .map(|w| w[1].saturating_duration_since(w[0]))
        .collect();
    gaps.sort();
    let median = gaps[gaps.len() / 2];
    assert!(
        (watchdog / 4..=watchdog).contains(&median),
        "WATCHDOG=1 from pid {pid} every {median:?} (median of {gaps:?}), expected about {:?}:\n{}",
        watchdog / 2,
        systemd.describe()
    );
}

#[test]
fn start_reload_stop() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let name = cluster_name("notify");
    let systemd = FakeSystemd::bind(&name);
    // 400 ms: a WATCHDOG=1 every 200 ms.
    let watchdog = Duration::from_millis(400);
    let (mut cluster, first, _ports) =
        start_notifying(&name, &systemd, &[("WATCHDOG_USEC", "400000")]);

    // Start: READY=1 from the master, naming itself and generation 1.
    let ready1 = systemd.wait_for(first, "READY=1", Duration::from_secs(10));
    let all = systemd.all();
    assert_eq!(
        all[ready1].value("MAINPID"),
        Some(first.to_string().as_str())
    );
    let status = all[ready1].value("STATUS").unwrap_or_default();
    assert!(
        status.starts_with("generation 1: 2 live workers"),
        "{status}"
    );
    assert!(
        all[..ready1]
            .iter()
            .all(|n| !n.has("READY=1") && !n.has("RELOADING=1") && !n.has("STOPPING=1")),
        "messages before READY=1:\n{}",
        systemd.describe()
    );
    assert_watchdog_interval(&systemd, first, 0, watchdog);

    // Reload as ExecReload does: `run --detach`, NOTIFY_SOCKET but no watchdog.
    let log = std::fs::File::create(cluster.log_file("master-detached.log")).expect("log file");
    let mut args = cluster.run_args();
    args.push("--detach".into());
    let mut detach = invoke::command(&args);
    detach
        .env("RUST_LOG", "info")
        .env("NOTIFY_SOCKET", &systemd.path)
        .stderr(log);
    let started = Instant::now();
    let out = invoke::finish(detach, Duration::from_secs(60));
    let detach_took = started.elapsed();
    let detached_log =
        std::fs::read_to_string(cluster.log_file("master-detached.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "run --detach failed:\n{detached_log}\n{}",
        cluster.logs()
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("serves generation 2"), "{stdout}");
    // --detach returned once generation 2 serves: its master is the cluster's.
    let status = cluster.status();
    let second = status["master_pid"]
        .as_i64()
        .and_then(|p| i32::try_from(p).ok())
        .expect("master_pid");
    let _kill_second = defer(move || {
        // SAFETY: kill has no memory preconditions; only if the test failed early.
        unsafe { libc::kill(second, libc::SIGKILL) };
    });
    assert_ne!(second, first);
    assert_eq!(status["generation"], 2, "{status}");
    assert!(
        cluster.master_exited(1),
        "the first master still runs after the reload"
    );

    let reloading = systemd.wait_for(second, "RELOADING=1", Duration::from_secs(10));
    let ready2 = systemd.wait_for(second, "READY=1", Duration::from_secs(10));
    // Taken after the waits, so that the positions they returned are in it.
    let all = systemd.all();
    assert_eq!(
        all[reloading].value("MAINPID"),
        Some(second.to_string().as_str()),
        "RELOADING=1 comes with MAINPID:\n{}",
        systemd.describe()
    );
    assert!(
        all[reloading].value("MONOTONIC_USEC").is_some(),
        "{:?}",
        all[reloading]
    );
    assert!(
        ready1 < reloading && reloading < ready2,
        "{}",
        systemd.describe()
    );
    // MAINPID came before the old master's last message (it exits after it).
    let last_of_first = all
        .iter()
        .rposition(|n| n.pid == first)
        .expect("first master's messages");
    assert!(
        reloading < last_of_first || all[reloading + 1..].iter().all(|n| n.pid != first),
        "{}",
        systemd.describe()
    );
    assert!(
        all.iter().any(|n| n.pid == second && n.has("BARRIER=1")),
        "the new master waits for systemd to read MAINPID (BARRIER=1):\n{}",
        systemd.describe()
    );
    let status2 = all[ready2].value("STATUS").unwrap_or_default();
    assert!(
        status2.starts_with("generation 2: 2 live workers"),
        "{status2}"
    );
    assert!(
        all.iter().all(|n| n.pid != first || !n.has("STOPPING=1")),
        "the replaced master must not say STOPPING=1 (the service goes on):\n{}",
        systemd.describe()
    );
    // The watchdog goes on from the new master, at the inherited interval.
    assert_watchdog_interval(&systemd, second, ready2, watchdog);
    eprintln!("run --detach returned after {detach_took:?}");

    // Stop: STOPPING=1 from the master in charge, after its READY=1.
    let out = ipcluster(&["stop", "--name", &name], Duration::from_secs(30));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stopping = systemd.wait_for(second, "STOPPING=1", Duration::from_secs(5));
    assert!(ready2 < stopping, "{}", systemd.describe());
    let kinds: Vec<(i32, &str)> = systemd
        .all()
        .iter()
        .filter_map(|n| {
            ["READY=1", "RELOADING=1", "STOPPING=1"]
                .into_iter()
                .find(|k| n.has(k))
                .map(|k| (n.pid, k))
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            (first, "READY=1"),
            (second, "RELOADING=1"),
            (second, "READY=1"),
            (second, "STOPPING=1")
        ],
        "{}",
        systemd.describe()
    );
    cluster.assert_stopped();
}

#[test]
fn detach_reports_a_master_that_fails() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let name = cluster_name("detach-fail");
    let ports = Ports::reserve(1);
    let listen = format!("127.0.0.1:{}", ports.get(0));
    let words = run_words(
        &name,
        "iptables",
        &listen,
        &["--detach", "--connect-timeout", "300ms", "--", "/bin/false"],
    );
    let out = invoke::finish(invoke::command(&words), Duration::from_secs(60));
    assert_failed_cleanly(&out, &name, &["exited (exit status: 1) before it served"]);
}

/// A new master started without `NOTIFY_SOCKET` (by hand, outside the unit)
/// cannot announce itself: the old master names it (`MAINPID=`, from the
/// hand-over request's peer credentials) before it exits, so that systemd
/// follows it instead of taking the old master's exit for the service's.
#[test]
fn old_master_names_a_successor_that_cannot_notify() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let name = cluster_name("notify-handover");
    let systemd = FakeSystemd::bind(&name);
    let (mut cluster, first, _ports) = start_notifying(&name, &systemd, &[]);
    systemd.wait_for(first, "READY=1", Duration::from_secs(10));
    cluster.master_env.clear();
    let second = i32::try_from(cluster.start_master()).expect("pid");
    cluster.wait_generation_live(2, Duration::from_secs(30));
    let named = systemd.wait_for(first, &format!("MAINPID={second}"), Duration::from_secs(5));
    let all = systemd.all();
    assert!(
        all[named..]
            .iter()
            .all(|n| n.pid != first || !n.has("STOPPING=1")),
        "{}",
        systemd.describe()
    );
    assert!(
        all.iter().all(|n| n.pid != second),
        "the master without NOTIFY_SOCKET sent notifications:\n{}",
        systemd.describe()
    );
    cluster.stop();
}
