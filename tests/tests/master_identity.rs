//! End-to-end: worker identity with servers that overwrite their environment.
//! nginx sets its process title over argv and environ, so
//! /proc/PID/environ no longer says which cluster a worker belongs to: the
//! master must adopt, retire, report and stop such workers from its registry.
//! Real nginx processes (one master + one worker process each), a real reload,
//! real HTTP through the steering.
//! Root, one test thread: `cargo test -p ipcluster-tests --test master_identity -- --test-threads=1`

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ipcluster_tests::cluster::{Cluster, ClusterSpec, http_get, ipcluster, workers_in};
use ipcluster_tests::guard::defer;
use ipcluster_tests::loopback_client;
use ipcluster_tests::unique::{Ports, cluster_name};

const WORKERS: u32 = 2;

/// One nginx per worker: its own prefix folder (pid file, temp paths) under
/// `dir`, listening on the worker's `{port}`.
const NGINX_CONF: &str = "\
worker_processes 1;
pid nginx.pid;
error_log stderr;
events { worker_connections 64; }
http {
    access_log off;
    client_body_temp_path body;
    proxy_temp_path proxy;
    fastcgi_temp_path fastcgi;
    uwsgi_temp_path uwsgi;
    scgi_temp_path scgi;
    server {
        listen PORT;
        location / { return 200 \"nginx PORT\\n\"; }
    }
}
";

fn nginx_command(dir: &Path) -> Vec<String> {
    let d = dir.display();
    vec![
        "sh".into(),
        "-c".into(),
        format!(
            "mkdir -p {d}/w{{port}} && sed s/PORT/{{port}}/g {d}/nginx.conf.in > {d}/w{{port}}/nginx.conf \
             && exec nginx -e stderr -p {d}/w{{port}} -c {d}/w{{port}}/nginx.conf -g 'daemon off;'"
        ),
    ]
}

/// An empty temporary directory for cluster `name` (what was left there by
/// an earlier run is removed first).
fn fresh_cluster_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ipcluster-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// (pid, session, command line) of every process.
fn processes() -> Vec<(i32, i32, String)> {
    let mut all = Vec::new();
    for pid in ipcluster_tests::cluster::proc_pids() {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After the command name: state ppid pgrp session …
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        if fields.first() == Some(&"Z") {
            continue;
        }
        let Some(session) = fields.get(3).and_then(|s| s.parse().ok()) else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default();
        all.push((pid, session, cmdline));
    }
    all
}

/// nginx processes of this test: in a worker's session, or naming `dir`.
fn nginx_processes(sessions: &BTreeSet<i64>, dir: &Path) -> Vec<(i32, String)> {
    let needle = dir.display().to_string();
    processes()
        .into_iter()
        .filter(|(_, session, cmd)| {
            cmd.starts_with("nginx")
                && (sessions.contains(&i64::from(*session)) || cmd.contains(&needle))
        })
        .map(|(pid, _, cmd)| (pid, cmd))
        .collect()
}

fn pids_of(workers: &[serde_json::Value]) -> BTreeSet<i64> {
    workers.iter().filter_map(|w| w["pid"].as_i64()).collect()
}

fn wait_until(
    what: &str,
    timeout: Duration,
    mut done: impl FnMut() -> bool,
    logs: &dyn Fn() -> String,
) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} within {timeout:?}\n{}", logs());
}

#[test]
fn nginx_workers_are_adopted_retired_and_stopped_across_a_reload() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    assert!(
        ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .iter()
            .any(|p| Path::new(p).is_file()),
        "nginx is not installed: `cargo xtask setup` installs it (apt-get install nginx)"
    );
    let name = cluster_name("nginx-identity");
    let dir = fresh_cluster_dir(&name);
    std::fs::write(dir.join("nginx.conf.in"), NGINX_CONF).expect("nginx config");

    // Every worker session seen, for the cleanup below and the final check.
    let sessions = std::cell::RefCell::new(BTreeSet::<i64>::new());
    let _cleanup = defer(|| {
        for (pid, _) in nginx_processes(&sessions.borrow(), &dir) {
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = std::fs::remove_dir_all(&dir);
    });

    let ports = Ports::reserve(1);
    let listen = SocketAddr::from(([127, 0, 0, 1], ports.get(0)));
    let spec = ClusterSpec {
        backend: "ebpf".into(),
        workers: WORKERS,
        listens: vec![listen],
        flags: vec!["--soft-kill-timeout".into(), "3s".into()],
        command: nginx_command(&dir),
    };
    let mut cluster = Cluster::start(&name, spec);
    let status = cluster.status();
    let old = pids_of(&workers_in(&status, "live", Some(1)));
    assert_eq!(old.len(), WORKERS as usize, "{status}");
    sessions.borrow_mut().extend(old.iter().copied());

    // The premise: nginx overwrote its environment, so it cannot say whose it is.
    for &pid in &old {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let environ = String::from_utf8_lossy(&environ);
        assert!(
            !environ.contains(&format!("IPCLUSTER_NAME={name}")),
            "worker {pid} still shows its environment; this nginx does not set its title"
        );
    }
    // Ready means listening: the nginx master listens before it forks its
    // worker process, which may not exist yet.
    wait_until(
        "expected an nginx master and worker per band",
        Duration::from_secs(10),
        || nginx_processes(&sessions.borrow(), &dir).len() >= 2 * WORKERS as usize,
        &|| format!("{:?}", nginx_processes(&sessions.borrow(), &dir)),
    );
    let (code, body) = http_get(loopback_client(2), listen, "/").expect("GET through the steering");
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("nginx "), "{body:?}");

    // Reload: the new master adopts the old nginx workers and retires them.
    cluster.start_master();
    let status = cluster.wait_generation_live(2, Duration::from_secs(30));
    let retired = pids_of(&workers_in(&status, "retired", Some(1)));
    assert_eq!(
        retired,
        old,
        "the old nginx workers must be adopted and shown retired: {status}\n{}",
        cluster.logs()
    );
    let new = pids_of(&workers_in(&status, "live", Some(2)));
    assert_eq!(new.len(), WORKERS as usize, "{status}");
    sessions.borrow_mut().extend(new.iter().copied());
    assert!(
        cluster.master_log(2).contains("adopted worker"),
        "{}",
        cluster.logs()
    );
    let (code, body) = http_get(loopback_client(3), listen, "/").expect("GET after the reload");
    assert_eq!(code, 200, "{body}");

    // kill-retired ends the old nginx masters and their worker processes.
    let out = ipcluster(&["kill-retired", "--name", &name], Duration::from_secs(10));
    assert!(
        out.status.success(),
        "kill-retired: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let old_sessions = old.clone();
    wait_until(
        "the retired nginx workers (and their children) did not exit",
        Duration::from_secs(15),
        || {
            processes()
                .iter()
                .all(|(_, session, _)| !old_sessions.contains(&i64::from(*session)))
        },
        &|| cluster.logs(),
    );
    // Gone from /proc (zombies are skipped) is not yet reaped by the master:
    // wait for it to notice the exits.
    let mut status = cluster.status();
    wait_until(
        "retired workers still reported",
        Duration::from_secs(10),
        || {
            status = cluster.status();
            workers_in(&status, "retired", None).is_empty()
        },
        &|| cluster.logs(),
    );
    assert_eq!(
        pids_of(&workers_in(&status, "live", Some(2))),
        new,
        "{status}"
    );

    // stop ends the new generation: no nginx of the cluster is left.
    cluster.stop();
    let left = nginx_processes(&sessions.borrow(), &dir);
    assert!(
        left.is_empty(),
        "nginx processes left after stop: {left:?}\n{}",
        cluster.logs()
    );
    assert!(
        !ipcluster::paths::state_dir(&name).exists(),
        "the state directory is left"
    );
}

/// The worker ports the table in force gives each band of the first service.
fn table_ports(status: &serde_json::Value) -> Vec<u16> {
    status["table"]["services"][0]["worker_ports"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p.as_u64().and_then(|p| u16::try_from(p).ok()))
                .collect()
        })
        .unwrap_or_default()
}

fn worker(status: &serde_json::Value, state: &str, generation: u64, band: u64) -> (i32, u16) {
    let w = workers_in(status, state, Some(generation))
        .into_iter()
        .find(|w| w["band"] == band)
        .unwrap_or_else(|| {
            panic!("no {state} worker of generation {generation} band {band}: {status}")
        });
    (
        w["pid"]
            .as_i64()
            .and_then(|p| i32::try_from(p).ok())
            .unwrap_or(0),
        w["port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or(0),
    )
}

/// A crashed worker's port leaves the table at once: while its replacement
/// starts (slowly, on purpose), band 0 is served by the old generation's
/// worker of band 0, and once that one is gone too, by the live worker of
/// band 1; a client of band 0 is answered throughout.
#[test]
fn a_crashed_workers_band_is_served_by_a_stand_in_until_its_replacement_is_ready() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let name = cluster_name("stand-in");
    let dir = fresh_cluster_dir(&name);
    let slow = dir.join("slow");
    let _cleanup = defer(|| {
        let _ = std::fs::remove_dir_all(&dir);
    });
    let ports = Ports::reserve(1);
    let listen = SocketAddr::from(([127, 0, 0, 1], ports.get(0)));
    let spec = ClusterSpec {
        backend: "ebpf".into(),
        workers: WORKERS,
        listens: vec![listen],
        flags: Vec::new(),
        // While `slow` exists, a new worker does not start listening.
        command: slow_demo_command(&slow),
    };
    let mut cluster = Cluster::start(&name, spec);
    cluster.start_master();
    let status = cluster.wait_generation_live(2, Duration::from_secs(30));
    let (old0, old0_port) = worker(&status, "retired", 1, 0);
    let (new0, _) = worker(&status, "live", 2, 0);
    let (_, new1_port) = worker(&status, "live", 2, 1);
    // 127.0.0.4 is in band 0 of 2 (band = low bits of the address).
    let band0_client = loopback_client(4);

    std::fs::write(&slow, b"").expect("slow marker");
    let killed_at = Instant::now();
    ipcluster_tests::cluster::signal(new0, libc::SIGKILL);
    let logs = || cluster.logs();
    // The replacement waits for `slow` to go: nothing but the stand-in can
    // take band 0 meanwhile, however long the machine takes to get there.
    wait_until(
        "band 0 was not steered to the retired worker of band 0",
        Duration::from_secs(10),
        || {
            cluster
                .try_status()
                .is_ok_and(|s| table_ports(&s).first() == Some(&old0_port))
        },
        &logs,
    );
    println!(
        "stand-in: band 0 steered to the retired worker {:?} after the SIGKILL (status polled)",
        killed_at.elapsed()
    );
    let reply = ipcluster_tests::cluster::demo_get(band0_client, listen)
        .unwrap_or_else(|e| panic!("band 0 while its worker restarts: {e}\n{}", logs()));
    assert_eq!((reply.pid, reply.generation), (old0, 1), "{reply:?}");

    // The stand-in goes too: the live worker of band 1 takes band 0.
    ipcluster_tests::cluster::signal(old0, libc::SIGKILL);
    wait_until(
        "band 0 was not steered to the live worker of band 1",
        Duration::from_secs(10),
        || {
            cluster
                .try_status()
                .is_ok_and(|s| table_ports(&s) == [new1_port, new1_port])
        },
        &logs,
    );
    let reply = ipcluster_tests::cluster::demo_get(band0_client, listen)
        .unwrap_or_else(|e| panic!("band 0 served by band 1: {e}\n{}", logs()));
    assert_eq!((reply.band, reply.generation), (1, 2), "{reply:?}");

    // The replacement arrives and takes its band back.
    let _ = std::fs::remove_file(&slow);
    let status = cluster.wait_generation_live(2, Duration::from_secs(20));
    let (replacement, replacement_port) = worker(&status, "live", 2, 0);
    assert_ne!(replacement, new0);
    assert_eq!(
        table_ports(&status),
        [replacement_port, new1_port],
        "{status}"
    );
    cluster.stop();
}

/// Wait until `pid` (started as `setsid sleep …`) runs `sleep` as the leader
/// of its own session, which setsid makes it before it execs sleep.
fn wait_until_sleeping(pid: i64, logs: &dyn Fn() -> String) {
    wait_until(
        &format!("process {pid} did not become a session leader running sleep"),
        Duration::from_secs(10),
        || {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let session = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    // After the command name: state ppid pgrp session …
                    stat.rsplit(')')
                        .next()?
                        .split_whitespace()
                        .nth(3)?
                        .parse::<i64>()
                        .ok()
                });
            comm.trim_end() == "sleep" && session == Some(pid)
        },
        logs,
    );
}

/// A session leader with forged variables of the cluster.
fn forged_process(cluster: &str, uid: Option<u32>, generation: &str) -> std::process::Child {
    use std::os::unix::process::CommandExt as _;
    let mut cmd = std::process::Command::new("setsid");
    cmd.args(["sleep", "120"])
        .env("IPCLUSTER_NAME", cluster)
        .env("IPCLUSTER_BAND", "0")
        .env("IPCLUSTER_GENERATION", generation)
        .env("IPCLUSTER_WORKERS", "2")
        .env("PORT", "29999")
        .stdin(std::process::Stdio::null());
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    cmd.spawn().expect("start a forged worker")
}

/// Adoption trusts only what it can verify: a process of another user with
/// the cluster's `IPCLUSTER_*` variables, and a root process claiming a
/// generation no master started (u64::MAX: it would overflow the counter),
/// are ignored and logged, never reported, retired or signalled.
#[test]
fn forged_workers_are_ignored_and_logged() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let name = cluster_name("forged");
    let ports = Ports::reserve(1);
    let listen = SocketAddr::from(([127, 0, 0, 1], ports.get(0)));
    let mut cluster = Cluster::start(&name, ClusterSpec::demo("ebpf", WORKERS, listen));
    let children = std::cell::RefCell::new(vec![
        forged_process(&name, Some(65534), "1"),
        forged_process(&name, None, &u64::MAX.to_string()),
    ]);
    let _cleanup = defer(|| {
        for child in children.borrow_mut().iter_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    });
    let forged: BTreeSet<i64> = children
        .borrow()
        .iter()
        .map(|c| i64::from(c.id()))
        .collect();
    // Both must be session leaders running `sleep` before the master looks
    // (setsid runs first, then execs sleep).
    for &pid in &forged {
        wait_until_sleeping(pid, &|| cluster.logs());
    }

    cluster.start_master();
    let status = cluster.wait_generation_live(2, Duration::from_secs(30));
    let reported: BTreeSet<i64> = pids_of(status["workers"].as_array().map_or(&[][..], |v| v));
    assert!(
        reported.is_disjoint(&forged),
        "forged processes {forged:?} were adopted: {status}"
    );
    let log = cluster.master_log(2);
    for pid in &forged {
        assert!(
            log.contains(&format!("process {pid} carries the variables")),
            "no log line about forged process {pid}:\n{log}"
        );
    }
    assert!(log.contains("runs as uid 65534"), "{log}");
    assert!(
        log.contains("claims generation 18446744073709551615"),
        "{log}"
    );

    let out = cluster.ipcluster(&["stop", "--name", &name], Duration::from_secs(60));
    assert!(out.status.success(), "ipcluster stop failed: {out:?}");
    for child in children.borrow_mut().iter_mut() {
        assert!(
            matches!(child.try_wait(), Ok(None)),
            "forged process {} was signalled by stop",
            child.id()
        );
        // Ours to end: they carry the cluster's variables, so the leftover
        // check below would count them.
        let _ = child.kill();
        let _ = child.wait();
    }
    cluster.assert_stopped();
}

/// Worker start: a relative program (`./worker.sh`) runs from the directory
/// `run` was started in, with stdin from /dev/null, that directory as its
/// working directory, and only the documented environment plus `--env`.
#[test]
fn workers_start_in_the_run_directory_with_the_documented_environment() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let name = cluster_name("worker-start");
    let dir = fresh_cluster_dir(&name);
    let bin = ipcluster_tests::cluster::ipcluster_bin();
    let script = dir.join("worker.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n{{ echo \"cwd=$(pwd)\"; echo \"stdin=$(readlink /proc/$$/fd/0)\"; \
             echo \"mode=$MODE\"; echo \"token=${{API_TOKEN-unset}}\"; \
             echo \"secret=${{SECRET_TOKEN-unset}}\"; }} > facts-$IPCLUSTER_BAND.tmp\n\
             mv facts-$IPCLUSTER_BAND.tmp facts-$IPCLUSTER_BAND\nexec {} demo-worker\n",
            bin.display()
        ),
    )
    .expect("worker script");
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let ports = Ports::reserve(1);
    let listen = SocketAddr::from(([127, 0, 0, 1], ports.get(0)));
    let (first, last) = ipcluster_tests::cluster::worker_port_range();
    let mut master = std::process::Command::new(&bin)
        .args([
            "run",
            "--name",
            &name,
            "--backend",
            "iptables",
            "--workers",
            "1",
            "--port-range",
            &format!("{first}-{last}"),
            "--listen",
            &listen.to_string(),
            "--env",
            "MODE=test",
            "--env",
            "API_TOKEN",
            "--",
            "./worker.sh",
        ])
        .current_dir(&dir)
        .env("API_TOKEN", "t0k3n")
        .env("SECRET_TOKEN", "do-not-pass")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("master.log")).expect("log"))
        .spawn()
        .expect("start the master");
    let log = || std::fs::read_to_string(dir.join("master.log")).unwrap_or_default();
    let _cleanup = defer(|| {
        let _ = ipcluster(&["stop", "--name", &name], Duration::from_secs(30));
        let _ = master.kill();
        let _ = master.wait();
        let _ = std::fs::remove_dir_all(&dir);
    });
    let facts_file = dir.join("facts-0");
    wait_until(
        "the worker did not start",
        Duration::from_secs(20),
        || facts_file.exists(),
        &log,
    );
    let facts = std::fs::read_to_string(&facts_file).expect("facts");
    let expected = format!(
        "cwd={}\nstdin=/dev/null\nmode=test\ntoken=t0k3n\nsecret=unset\n",
        dir.display()
    );
    assert_eq!(facts, expected, "{}", log());
    wait_until(
        "the worker was not served",
        Duration::from_secs(20),
        || ipcluster_tests::cluster::demo_get(loopback_client(2), listen).is_ok(),
        &log,
    );
}

/// `--env` naming a variable ipcluster sets, or one the master does not
/// have, is refused before anything is created.
#[test]
fn bad_env_flags_are_refused() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    for (flag, says) in [
        ("PORT=1", "PORT and IPCLUSTER_* are set by ipcluster"),
        (
            "IPCLUSTER_NAME=x",
            "PORT and IPCLUSTER_* are set by ipcluster",
        ),
        (
            "IPCLUSTER_TEST_SURELY_UNSET",
            "is not set in the master's environment",
        ),
    ] {
        let name = cluster_name("bad-env");
        let out = ipcluster(
            &[
                "run",
                "--name",
                &name,
                "--backend",
                "iptables",
                "--workers",
                "1",
                "--env",
                flag,
            ],
            Duration::from_secs(20),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--env {flag} was accepted");
        assert!(stderr.contains(says), "--env {flag}: {stderr}");
        assert!(
            !ipcluster::paths::state_dir(&name).exists(),
            "--env {flag} left its state directory"
        );
    }
}

/// Control socket: one user's flood of connections that never identify
/// themselves is capped per uid and timed out, and root's `status` gets
/// through all along.
#[test]
fn a_connection_flood_neither_locks_root_out_nor_lasts() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let name = cluster_name("flood");
    let ports = Ports::reserve(1);
    let listen = SocketAddr::from(([127, 0, 0, 1], ports.get(0)));
    let mut spec = ClusterSpec::demo("iptables", 1, listen);
    // The control socket belongs to the workers' user, who may connect.
    spec.flags = vec!["--user".into(), "nobody".into()];
    let cluster = Cluster::start(&name, spec);
    let socket = ipcluster::paths::control_socket(&name);
    // As nobody: 300 silent connections; count the ones the master closed at
    // once (once at least 44 are closed, or 8 s passed, and 1 s more for any
    // further ones: a busy master takes a while to get through 300 accepts),
    // then the ones still open 12 s later.
    let script = format!(
        "import socket, time\n\
         conns = []\n\
         for _ in range(300):\n\
         \x20   s = socket.socket(socket.AF_UNIX)\n\
         \x20   s.connect({socket:?})\n\
         \x20   conns.append(s)\n\
         def closed(s):\n\
         \x20   s.setblocking(False)\n\
         \x20   try:\n\
         \x20       return s.recv(1) == b''\n\
         \x20   except BlockingIOError:\n\
         \x20       return False\n\
         deadline = time.monotonic() + 8\n\
         while sum(closed(s) for s in conns) < 44 and time.monotonic() < deadline:\n\
         \x20   time.sleep(0.1)\n\
         time.sleep(1)\n\
         print('refused', sum(closed(s) for s in conns), flush=True)\n\
         time.sleep(12)\n\
         print('open', sum(not closed(s) for s in conns), flush=True)\n",
        socket = socket.display().to_string()
    );
    use std::os::unix::process::CommandExt as _;
    let flood = std::process::Command::new("python3")
        .args(["-c", &script])
        .uid(65534)
        .gid(65534)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the flood");
    let pid = flood.id();
    let _cleanup = defer(move || ipcluster_tests::cluster::signal(pid as i32, libc::SIGKILL));
    std::thread::sleep(Duration::from_secs(3));
    // Root is never refused, while the flood holds its 256 connections.
    let status = cluster.status();
    assert_eq!(status["name"], name.as_str(), "{status}");
    let out = flood.wait_with_output().expect("the flood's output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let refused: Option<u32> = stdout
        .lines()
        .find_map(|l| l.strip_prefix("refused ")?.parse().ok());
    // 256 per uid: the demo worker (also nobody) may hold one of them.
    assert!(
        matches!(refused, Some(44 | 45)) && stdout.contains("open 0\n"),
        "expected 44 refused at once (45 with the worker's own connection) and none left \
         after the timeout: {stdout}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.logs()
    );
    let log = cluster.master_log(1);
    assert!(
        log.contains("uid 65534 already has 256 connections open"),
        "{log}"
    );
    assert!(log.contains("said nothing within 10s"), "{log}");
}

/// A state directory others may write in (where a registry could be planted)
/// is refused by name, and nothing is created in it or elsewhere.
#[test]
fn a_state_directory_open_to_others_is_refused() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    use std::os::unix::fs::PermissionsExt as _;
    ipcluster_tests::require_root();
    let name = cluster_name("open-dir");
    let dir = ipcluster::paths::state_dir(&name);
    std::fs::create_dir_all(&dir).expect("state dir");
    let _cleanup = defer(|| {
        let _ = std::fs::remove_dir_all(ipcluster::paths::state_dir(&name));
    });
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod 777");
    let ports = Ports::reserve(1);
    let listen = SocketAddr::from(([127, 0, 0, 1], ports.get(0)));
    let out = ipcluster(
        &[
            "run",
            "--name",
            &name,
            "--backend",
            "ebpf",
            "--workers",
            "1",
            "--listen",
            &listen.to_string(),
        ],
        Duration::from_secs(20),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "run accepted a world-writable state directory"
    );
    assert!(
        stderr.contains(&format!("refusing to use {}", dir.display()))
            && stderr.contains("writable by anyone"),
        "{stderr}"
    );
    let inside: Vec<_> = std::fs::read_dir(&dir).expect("list").flatten().collect();
    assert!(inside.is_empty(), "files were created: {inside:?}");
    assert!(
        !ipcluster::paths::pin_dir(&name).exists(),
        "steering was installed"
    );
}

/// `sh -c` that starts the demo worker once `slow` does not exist (or after
/// 60 s): the test decides when a new worker may start listening, instead of
/// racing a fixed delay on a busy machine.
fn slow_demo_command(slow: &Path) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        format!(
            "i=0; while [ -e {} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; \
             exec {} demo-worker",
            slow.display(),
            ipcluster_tests::cluster::ipcluster_bin().display()
        ),
    ]
}

/// A reload from 4 to 2 workers while an old worker of band 3 crashes: band 3
/// is not replaced (the new generation has no band 3) and generation 2 is
/// published with 2 bands.
#[test]
fn a_reload_to_fewer_workers_publishes_although_an_old_high_band_crashes() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let name = cluster_name("fewer");
    let dir = fresh_cluster_dir(&name);
    let slow = dir.join("slow");
    let _cleanup = defer(|| {
        let _ = std::fs::remove_dir_all(&dir);
    });
    let ports = Ports::reserve(1);
    let listen = SocketAddr::from(([127, 0, 0, 1], ports.get(0)));
    let spec = ClusterSpec {
        backend: "ebpf".into(),
        workers: 4,
        listens: vec![listen],
        flags: Vec::new(),
        command: slow_demo_command(&slow),
    };
    let mut cluster = Cluster::start(&name, spec);
    let (old3, _) = worker(&cluster.status(), "live", 1, 3);
    std::fs::write(&slow, b"").expect("slow marker");
    cluster.spec.workers = 2;
    cluster.start_master();
    wait_until(
        "the second master did not adopt the old workers",
        Duration::from_secs(15),
        || {
            cluster
                .master_log(2)
                .contains(&format!("adopted worker {old3}"))
        },
        &|| cluster.logs(),
    );
    ipcluster_tests::cluster::signal(old3, libc::SIGKILL);
    // Only now may generation 2 start listening: the crash comes first.
    let _ = std::fs::remove_file(&slow);
    let status = cluster.wait_generation_live(2, Duration::from_secs(30));
    assert_eq!(table_ports(&status).len(), 2, "{status}");
    let high: Vec<_> = status["workers"]
        .as_array()
        .map_or(&[][..], |v| v)
        .iter()
        .filter(|w| w["generation"] == 2 && w["band"].as_u64().is_some_and(|b| b >= 2))
        .collect();
    assert!(
        high.is_empty(),
        "generation 2 started workers for bands it has not: {high:?}"
    );
    cluster.stop();
}

/// A second `run` while the first is still starting: the first hands over
/// without removing the state directory (the lock, the registry) under the
/// second, which then serves.
#[test]
fn a_second_run_while_the_first_is_starting_hands_over_cleanly() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let name = cluster_name("early-reload");
    let dir = fresh_cluster_dir(&name);
    let slow = dir.join("slow");
    std::fs::write(&slow, b"").expect("slow marker");
    let ports = Ports::reserve(1);
    let listen = SocketAddr::from(([127, 0, 0, 1], ports.get(0)));
    let (first, last) = ipcluster_tests::cluster::worker_port_range();
    let bin = ipcluster_tests::cluster::ipcluster_bin();
    let start = |n: u32| {
        let mut args: Vec<String> = [
            "run",
            "--name",
            &name,
            "--backend",
            "iptables",
            "--workers",
            "1",
            "--port-range",
            &format!("{first}-{last}"),
            "--listen",
            &listen.to_string(),
            "--",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        args.extend(slow_demo_command(&slow));
        std::process::Command::new(&bin)
            .args(&args)
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("master-{n}.log"))).expect("log"))
            .spawn()
            .expect("start a master")
    };
    let masters = std::cell::RefCell::new(vec![start(1)]);
    let _cleanup = defer(|| {
        let _ = ipcluster(&["stop", "--name", &name], Duration::from_secs(30));
        for m in masters.borrow_mut().iter_mut() {
            let _ = m.kill();
            let _ = m.wait();
        }
        let _ = std::fs::remove_dir_all(&dir);
    });
    let logs = || {
        (1..=2)
            .map(|n| {
                std::fs::read_to_string(dir.join(format!("master-{n}.log"))).unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n---- master 2 ----\n")
    };
    wait_until(
        "the first master did not spawn its worker",
        Duration::from_secs(10),
        || logs().contains("spawned worker"),
        &logs,
    );
    masters.borrow_mut().push(start(2));
    wait_until(
        "the first master did not exit",
        Duration::from_secs(15),
        || matches!(masters.borrow_mut()[0].try_wait(), Ok(Some(_))),
        &logs,
    );
    let _ = std::fs::remove_file(&slow);
    wait_until(
        "the second master did not serve generation 2",
        Duration::from_secs(30),
        || {
            let out = ipcluster(
                &["status", "--name", &name, "--json"],
                Duration::from_secs(10),
            );
            serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .is_ok_and(|s| s["generation"] == 2 && workers_in(&s, "live", Some(2)).len() == 1)
        },
        &logs,
    );
    assert!(
        logs().contains("leaving the state directory and the steering to the new master"),
        "{}",
        logs()
    );
    assert!(
        ipcluster::paths::lock_file(&name).exists(),
        "the lock file is gone"
    );
    let (code, body) = http_get(loopback_client(2), listen, "/").expect("GET");
    assert_eq!(code, 200, "{body}");
}

/// Field 22 of /proc/PID/stat (start time in clock ticks).
fn start_time_of(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    stat.rsplit(')')
        .next()
        .and_then(|r| r.split_whitespace().nth(19))
        .and_then(|v| v.parse().ok())
        .expect("start time")
}

/// `stop` with no master running does not read a registry from a state
/// directory others may write in: an entry planted there for an unrelated
/// process (with its true pid, start time, uid and session) is not signalled,
/// while the cluster's real worker is still found and stopped.
#[test]
fn a_registry_in_a_directory_open_to_others_is_not_trusted() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    use std::os::unix::fs::PermissionsExt as _;
    ipcluster_tests::require_root();
    let name = cluster_name("planted");
    let ports = Ports::reserve(1);
    let listen = SocketAddr::from(([127, 0, 0, 1], ports.get(0)));
    let mut cluster = Cluster::start(&name, ClusterSpec::demo("iptables", 1, listen));
    let (worker_pid, _) = worker(&cluster.status(), "live", 1, 0);
    let victim = std::cell::RefCell::new(
        std::process::Command::new("setsid")
            .args(["sleep", "120"])
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("start the victim"),
    );
    let _cleanup = defer(|| {
        let _ = victim.borrow_mut().kill();
        let _ = victim.borrow_mut().wait();
    });
    let victim_pid = victim.borrow().id();
    // The planted entry names its session: it must be the one setsid made.
    wait_until_sleeping(i64::from(victim_pid), &|| cluster.logs());

    // No master: SIGKILL it (workers and steering stay).
    let _ = cluster.masters[0].kill();
    let _ = cluster.masters[0].wait();
    let registry_path = ipcluster::paths::registry_file(&name);
    let mut registry: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&registry_path).expect("registry"))
            .expect("registry JSON");
    registry["workers"]
        .as_array_mut()
        .expect("workers array")
        .push(serde_json::json!({
            "pid": victim_pid,
            "start_time": start_time_of(victim_pid),
            "band": 0,
            "generation": 1,
            "ports": [[listen.port(), 29998]],
            "uid": 0,
            "pgid": victim_pid,
            "session": victim_pid,
        }));
    std::fs::write(&registry_path, registry.to_string()).expect("plant the entry");
    let dir = ipcluster::paths::state_dir(&name);
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod 777");

    let out = ipcluster(&["stop", "--name", &name], Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stop failed: {stderr}");
    assert!(
        stderr.contains("the worker registry in it is not read"),
        "{stderr}"
    );
    assert!(
        matches!(victim.borrow_mut().try_wait(), Ok(None)),
        "the planted registry entry got process {victim_pid} signalled: {stderr}"
    );
    assert!(
        !Path::new(&format!("/proc/{worker_pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{worker_pid}/stat")).is_ok_and(|s| s
                .rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))),
        "the cluster's worker {worker_pid} survived stop: {stderr}"
    );
    cluster.assert_stopped();
}
