//! Running the real `ipcluster` binary in end-to-end tests: start a master
//! (and more masters: reloads) for a uniquely named cluster, read
//! `status --json`, talk HTTP to the demo worker from 127.0.0.N, and check
//! that `ipcluster stop` leaves nothing behind: [`Cluster::stop`] (or the drop
//! of a cluster the test did not stop) fails the test when a process, pin,
//! eBPF map/program/link, iptables rule or the state directory outlives
//! `stop`. A test that panics for another reason still cleans up (SIGKILL for
//! anything of the cluster left) without a second panic.
//!
//! The binary: `$IPCLUSTER_BIN` if set, else `ipcluster` next to the test
//! executable's `deps/` folder (`target/<profile>/ipcluster`, built by
//! `cargo build -p ipcluster` with the same profile, which `cargo xtask test`
//! does first).

use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::client::connect_from;

/// The `ipcluster` binary under test.
pub fn ipcluster_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("IPCLUSTER_BIN") {
        let bin = PathBuf::from(bin);
        assert!(
            bin.is_file(),
            "IPCLUSTER_BIN={} does not exist",
            bin.display()
        );
        return bin;
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    // target/<profile>/deps/<test>-<hash> → target/<profile>/ipcluster
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lives in target/<profile>/deps");
    let bin = profile_dir.join("ipcluster");
    assert!(
        bin.is_file(),
        "the ipcluster binary is missing at {}: build it first with \
         `cargo build -p ipcluster` (same profile and target dir as the tests), \
         or point IPCLUSTER_BIN at it",
        bin.display()
    );
    bin
}

/// Run `ipcluster ARGS` to completion (with a timeout) and return its output.
pub fn ipcluster(args: &[&str], timeout: Duration) -> Output {
    crate::invoke::finish(crate::invoke::command(args), timeout)
}

static NEXT_RANGE: AtomicU32 = AtomicU32::new(0);

/// A slice of the worker port range 20000-29999 for one cluster, different per
/// test process and per call (the master also checks each port is free).
pub fn worker_port_range() -> (u16, u16) {
    let slot =
        (std::process::id().wrapping_mul(13) + NEXT_RANGE.fetch_add(1, Ordering::Relaxed)) % 49;
    let first = 20_000 + slot * 200;
    (first as u16, (first + 199) as u16)
}

/// How to start a cluster.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    pub backend: String,
    pub workers: u32,
    pub listens: Vec<SocketAddr>,
    /// Extra `run` flags.
    pub flags: Vec<String>,
    /// `CMD ARGS`; empty = the demo worker.
    pub command: Vec<String>,
}

impl ClusterSpec {
    pub fn demo(backend: &str, workers: u32, listen: SocketAddr) -> ClusterSpec {
        ClusterSpec {
            backend: backend.into(),
            workers,
            listens: vec![listen],
            flags: Vec::new(),
            command: Vec::new(),
        }
    }
}

/// A cluster under test; dropping it removes everything it made.
pub struct Cluster {
    pub name: String,
    pub spec: ClusterSpec,
    port_range: (u16, u16),
    /// Every master started, oldest first.
    pub masters: Vec<Child>,
    log_dir: PathBuf,
    /// Ids of the eBPF maps seen pinned for this cluster (empty for iptables):
    /// how its programs and links are recognised once its pins are gone.
    map_ids: std::sync::Mutex<BTreeSet<u32>>,
    /// `stop` was run and checked (by [`Cluster::stop`]).
    stopped: bool,
    /// The network namespace every `ipcluster` command of this cluster runs
    /// in (`nsenter --net`), if not the test's own.
    netns: Option<PathBuf>,
    /// Extra environment of every master this value starts.
    pub master_env: Vec<(String, String)>,
}

impl Cluster {
    /// Start a master and wait until generation 1 is live on every band.
    pub fn start(name: &str, spec: ClusterSpec) -> Cluster {
        Cluster::start_maybe_in(name, spec, None, Vec::new())
    }

    /// [`Cluster::start`] inside the network namespace `netns`
    /// (`/run/netns/<name>`): the master, its workers, `status` and `stop` all
    /// run there (through `nsenter --net`, so the bpffs pins stay shared).
    pub fn start_in(name: &str, spec: ClusterSpec, netns: &Path) -> Cluster {
        Cluster::start_maybe_in(name, spec, Some(netns), Vec::new())
    }

    /// [`Cluster::start`] with extra environment variables for the masters.
    pub fn start_with_env(
        name: &str,
        spec: ClusterSpec,
        master_env: Vec<(String, String)>,
    ) -> Cluster {
        Cluster::start_maybe_in(name, spec, None, master_env)
    }

    fn start_maybe_in(
        name: &str,
        spec: ClusterSpec,
        netns: Option<&Path>,
        master_env: Vec<(String, String)>,
    ) -> Cluster {
        crate::require_root();
        let log_dir = std::env::temp_dir().join("ipcluster-tests").join(name);
        let _ = std::fs::remove_dir_all(&log_dir);
        std::fs::create_dir_all(&log_dir).expect("log dir");
        let mut cluster = Cluster {
            name: name.into(),
            spec,
            port_range: worker_port_range(),
            masters: Vec::new(),
            log_dir,
            map_ids: std::sync::Mutex::new(BTreeSet::new()),
            stopped: false,
            netns: netns.map(Path::to_path_buf),
            master_env,
        };
        cluster.start_master();
        cluster.wait_generation_live(1, Duration::from_secs(30));
        cluster
    }

    /// The `run` arguments of this cluster.
    pub fn run_args(&self) -> Vec<String> {
        let mut args = vec![
            "run".to_owned(),
            "--name".into(),
            self.name.clone(),
            "--backend".into(),
            self.spec.backend.clone(),
            "--workers".into(),
            self.spec.workers.to_string(),
            "--port-range".into(),
            format!("{}-{}", self.port_range.0, self.port_range.1),
            "--spawn-delay".into(),
            "20ms".into(),
        ];
        for l in &self.spec.listens {
            args.push("--listen".into());
            args.push(l.to_string());
        }
        args.extend(self.spec.flags.iter().cloned());
        if !self.spec.command.is_empty() {
            args.push("--".into());
            args.extend(self.spec.command.iter().cloned());
        }
        args
    }

    /// Start one more master (the first, or a reload); its stderr goes to a log file.
    pub fn start_master(&mut self) -> u32 {
        let n = self.masters.len() + 1;
        let log =
            std::fs::File::create(self.log_dir.join(format!("master-{n}.log"))).expect("log file");
        let child = self
            .command()
            .args(self.run_args())
            .env("RUST_LOG", "info")
            .envs(self.master_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("start the ipcluster master");
        let pid = child.id();
        self.masters.push(child);
        pid
    }

    /// The `ipcluster` binary, to run in this cluster's network namespace.
    pub fn command(&self) -> Command {
        match &self.netns {
            Some(netns) => {
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net={}", netns.display()))
                    .arg("--")
                    .arg(ipcluster_bin());
                cmd
            }
            None => Command::new(ipcluster_bin()),
        }
    }

    /// Run `ipcluster ARGS` in this cluster's network namespace, to completion.
    pub fn ipcluster(&self, args: &[&str], timeout: Duration) -> Output {
        let mut cmd = self.command();
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        crate::invoke::finish(cmd, timeout)
    }

    /// A log file for a master started by the test itself (`run --detach`).
    pub fn log_file(&self, file: &str) -> PathBuf {
        self.log_dir.join(file)
    }

    /// The log of master `n` (1-based).
    pub fn master_log(&self, n: usize) -> String {
        std::fs::read_to_string(self.log_dir.join(format!("master-{n}.log"))).unwrap_or_default()
    }

    /// `status --json`, or the error output.
    pub fn try_status(&self) -> Result<Value, String> {
        let out = self.ipcluster(
            &["status", "--name", &self.name, "--json"],
            Duration::from_secs(10),
        );
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("status is not JSON: {e}"))
    }

    pub fn status(&self) -> Value {
        self.try_status()
            .unwrap_or_else(|e| panic!("status of {} failed: {e}\n{}", self.name, self.logs()))
    }

    /// Wait until `generation` has a live worker on every band and is published.
    pub fn wait_generation_live(&self, generation: u64, timeout: Duration) -> Value {
        let status = self.wait_generation_live_quiet(generation, timeout);
        self.remember_kernel_objects();
        status
    }

    /// Remember the ids of the maps pinned for this cluster now.
    pub fn remember_kernel_objects(&self) {
        let ids = crate::bpf_objects::pinned_map_ids(&self.name);
        self.map_ids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(ids);
    }

    fn wait_generation_live_quiet(&self, generation: u64, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            match self.try_status() {
                Ok(status) => {
                    let live = live_workers(&status, Some(generation));
                    if status["generation"] == generation
                        && live.len() == self.spec.workers as usize
                    {
                        return status;
                    }
                    last = status.to_string();
                }
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "generation {generation} of {} not live within {timeout:?}; last status: {last}\n{}",
            self.name,
            self.logs()
        );
    }

    /// All master logs, for failure messages.
    pub fn logs(&self) -> String {
        (1..=self.masters.len())
            .map(|n| format!("---- master {n} log ----\n{}", self.master_log(n)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `ipcluster stop`; panics if it fails or leaves anything of the cluster
    /// behind (see [`Cluster::leftovers`]).
    pub fn stop(&mut self) {
        self.remember_kernel_objects();
        self.stopped = true;
        let out = self.ipcluster(&["stop", "--name", &self.name], Duration::from_secs(60));
        assert!(
            out.status.success(),
            "ipcluster stop failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        self.assert_nothing_left_after_stop();
    }

    /// Wait for the masters to exit, then panic if anything of the cluster is
    /// left (what [`Cluster::stop`] and [`Cluster::assert_stopped`] check).
    fn assert_nothing_left_after_stop(&mut self) {
        for master in &mut self.masters {
            let _ = wait_child(master, Duration::from_secs(5));
        }
        let left = self.leftovers_after_stop();
        assert!(
            left.is_empty(),
            "`ipcluster stop --name {}` left behind:\n  {}\n{}",
            self.name,
            left.join("\n  "),
            self.logs()
        );
    }

    /// For a test that ran `ipcluster stop` itself: check what [`Cluster::stop`]
    /// checks (nothing left), and do not stop again on drop.
    pub fn assert_stopped(&mut self) {
        self.stopped = true;
        self.assert_nothing_left_after_stop();
    }

    /// What of this cluster is left, waiting up to 10 s (a busy machine) for
    /// the kernel to free programs and maps (freed after an RCU grace period)
    /// and for the last signalled processes to be gone.
    fn leftovers_after_stop(&self) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = self.leftovers();
            if left.is_empty() || Instant::now() >= deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Everything of this cluster that exists now: processes, state directory,
    /// pin folder, iptables chain and jumps, and the eBPF maps, programs and
    /// links of the maps it pinned while it ran. Empty after a good `stop`.
    pub fn leftovers(&self) -> Vec<String> {
        let map_ids = self
            .map_ids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        leftovers_in(&self.name, &map_ids, self.netns.as_deref())
    }

    /// Has master `n` (1-based) exited?
    pub fn master_exited(&mut self, n: usize) -> bool {
        matches!(self.masters[n - 1].try_wait(), Ok(Some(_)))
    }
}

fn wait_child(child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

impl Cluster {
    /// Steering that a failed test or a broken `stop` left (pins, links,
    /// filters, the iptables chain): removed with a fresh backend object of
    /// each kind, so no other test meets it. Errors are printed.
    fn remove_steering_left(&self) {
        use ipcluster::steering::{BackendKind, backend};
        let chain = ipcluster::steering::iptables::chain_name(&self.name);
        // In a test's own namespace, deleting the namespace removes its rules.
        let chain_left = self.netns.is_none()
            && leftovers_with(&self.name, &BTreeSet::new())
                .iter()
                .any(|l| l.contains(&chain));
        let pins_left = ipcluster::paths::pin_dir(&self.name).exists();
        if pins_left && self.netns.is_some() {
            // The links live in the test's namespace: unpinning releases them,
            // and a fresh backend here would look at the wrong interfaces.
            let _ = std::fs::remove_dir_all(ipcluster::paths::pin_dir(&self.name));
            return;
        }
        for (kind, left) in [
            (BackendKind::Ebpf, pins_left),
            (BackendKind::Iptables, chain_left),
        ] {
            if !left {
                continue;
            }
            let config = crate::conformance::test_config(&self.name, self.spec.listens.clone());
            match backend(kind, config).and_then(|mut b| b.teardown()) {
                Ok(()) => eprintln!("cleanup: removed the {kind} steering left by {}", self.name),
                Err(e) => eprintln!("cleanup: the {kind} steering of {}: {e}", self.name),
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        if panicking {
            eprintln!("{}", self.logs());
        }
        // A test that ended without `stop`: stop here and check like `stop` does.
        let mut failure = None;
        if !self.stopped {
            self.remember_kernel_objects();
            let mut stop = self.command();
            stop.args(["stop", "--name", &self.name])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            let out = crate::invoke::try_finish(stop, Duration::from_secs(60));
            for master in &mut self.masters {
                let _ = wait_child(master, Duration::from_secs(2));
            }
            let problem = match out {
                Ok(out) if out.status.success() => {
                    let left = self.leftovers_after_stop();
                    (!left.is_empty()).then(|| format!("left behind:\n  {}", left.join("\n  ")))
                }
                Ok(out) => Some(format!("failed: {}", String::from_utf8_lossy(&out.stderr))),
                Err(e) => Some(format!("hung: {e}")),
            };
            if let Some(problem) = problem {
                let message = format!("`ipcluster stop --name {}` {problem}", self.name);
                eprintln!("{message}");
                failure = Some(message);
            }
        }
        // Whatever happened, leave nothing for the next test.
        for master in &mut self.masters {
            if !wait_child(master, Duration::from_millis(100)) {
                let _ = master.kill();
                let _ = master.wait();
            }
        }
        kill_cluster_processes(&self.name);
        let _ = std::fs::remove_dir_all(ipcluster::paths::state_dir(&self.name));
        self.remove_steering_left();
        // Never panic while unwinding: that aborts the test binary.
        if let Some(message) = failure
            && !panicking
        {
            panic!("{message}\n{}", self.logs());
        }
    }
}

/// Poll `probe` every 20 ms until it gives a value; panic with the logs after `timeout`.
pub fn wait_for<T>(
    cluster: &Cluster,
    timeout: Duration,
    what: &str,
    mut probe: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {timeout:?}\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGKILL every process whose environment says it belongs to `cluster`.
pub fn kill_cluster_processes(cluster: &str) -> usize {
    let pids = cluster_processes(cluster);
    for &pid in &pids {
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    pids.len()
}

/// The pid of every process /proc lists now (none when /proc is unreadable).
pub fn proc_pids() -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .collect()
}

/// Processes (not zombies) carrying `IPCLUSTER_NAME=<cluster>`.
pub fn cluster_processes(cluster: &str) -> Vec<i32> {
    let needle = format!("IPCLUSTER_NAME={cluster}");
    let mut pids = Vec::new();
    for pid in proc_pids() {
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(true);
        if !zombie && env.split(|&b| b == 0).any(|v| v == needle.as_bytes()) {
            pids.push(pid);
        }
    }
    pids
}

/// Live workers of `generation` (or of any), from a status report.
pub fn live_workers(status: &Value, generation: Option<u64>) -> Vec<Value> {
    workers_in(status, "live", generation)
}

/// (band, pid) of every live worker (of `generation`, if given) in a status
/// report, in the report's order.
pub fn live_band_pids(status: &Value, generation: Option<u64>) -> Vec<(u32, i32)> {
    live_workers(status, generation)
        .iter()
        .filter_map(|w| {
            Some((
                u32::try_from(w["band"].as_u64()?).ok()?,
                i32::try_from(w["pid"].as_i64()?).ok()?,
            ))
        })
        .collect()
}

/// Workers in `state` of `generation` (or of any).
pub fn workers_in(status: &Value, state: &str, generation: Option<u64>) -> Vec<Value> {
    status["workers"]
        .as_array()
        .map(|ws| {
            ws.iter()
                .filter(|w| w["state"] == state)
                .filter(|w| generation.is_none_or(|g| w["generation"] == g))
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// What the demo worker answers on `/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DemoReply {
    pub band: u32,
    pub pid: i32,
    pub generation: u64,
    pub port: u16,
    pub client: String,
}

impl DemoReply {
    pub fn parse(line: &str) -> Option<DemoReply> {
        let field = |key: &str| {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        };
        Some(DemoReply {
            band: field("band")?.parse().ok()?,
            pid: field("pid")?.parse().ok()?,
            generation: field("generation")?.parse().ok()?,
            port: field("port")?.parse().ok()?,
            client: field("client")?.to_owned(),
        })
    }
}

/// `GET path` from `source` to `target`; the status code and body.
pub fn http_get(source: IpAddr, target: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = connect_from(source, target)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {response:?}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((code, body))
}

/// `GET /` from the demo worker, parsed.
pub fn demo_get(source: IpAddr, target: SocketAddr) -> std::io::Result<DemoReply> {
    let (code, body) = http_get(source, target, "/")?;
    if code != 200 {
        return Err(std::io::Error::other(format!("HTTP {code}: {body}")));
    }
    DemoReply::parse(body.trim())
        .ok_or_else(|| std::io::Error::other(format!("unexpected body {body:?}")))
}

/// A long-lived `/stream` connection to the demo worker.
pub struct DemoStream {
    reader: BufReader<TcpStream>,
    pub first: DemoReply,
}

impl DemoStream {
    pub fn open(source: IpAddr, target: SocketAddr) -> std::io::Result<DemoStream> {
        let mut stream = connect_from(source, target)?;
        write!(stream, "GET /stream HTTP/1.1\r\nHost: test\r\n\r\n")?;
        let mut reader = BufReader::new(stream);
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 {
                return Err(std::io::Error::other("stream closed in the headers"));
            }
            if header.trim().is_empty() {
                break;
            }
        }
        let mut s = DemoStream {
            reader,
            first: DemoReply {
                band: 0,
                pid: 0,
                generation: 0,
                port: 0,
                client: String::new(),
            },
        };
        s.first = s.next_line()?.0;
        Ok(s)
    }

    /// The next line: who sent it and its sequence number.
    pub fn next_line(&mut self) -> std::io::Result<(DemoReply, u64)> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the stream ended",
            ));
        }
        let reply = DemoReply::parse(line.trim())
            .ok_or_else(|| std::io::Error::other(format!("unexpected stream line {line:?}")))?;
        let seq = line
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("seq="))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("no seq in {line:?}")))?;
        Ok((reply, seq))
    }
}

/// Nothing of `cluster` is left: no state directory, no pin folder, no
/// iptables chain or jump, no process, no eBPF object of the maps pinned for
/// it now. Returns what is left, described.
pub fn leftovers(cluster: &str) -> Vec<String> {
    leftovers_with(cluster, &crate::bpf_objects::pinned_map_ids(cluster))
}

/// [`leftovers`], also looking for the eBPF objects of the maps `map_ids`
/// (remembered while the cluster ran).
pub fn leftovers_with(cluster: &str, map_ids: &BTreeSet<u32>) -> Vec<String> {
    leftovers_in(cluster, map_ids, None)
}

/// [`leftovers_with`], reading the iptables rules of the network namespace
/// `netns` (`/run/netns/<name>`) instead of the test's own.
pub fn leftovers_in(cluster: &str, map_ids: &BTreeSet<u32>, netns: Option<&Path>) -> Vec<String> {
    let mut left = Vec::new();
    let state = ipcluster::paths::state_dir(cluster);
    if state.exists() {
        left.push(format!("state directory {}", state.display()));
    }
    let pins = ipcluster::paths::pin_dir(cluster);
    if pins.exists() {
        left.push(format!("pin folder {}", pins.display()));
    }
    let chain = ipcluster::steering::iptables::chain_name(cluster);
    for tool in ["iptables-save", "ip6tables-save"] {
        let mut cmd = match netns {
            Some(netns) => {
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net={}", netns.display()))
                    .arg("--")
                    .arg(tool);
                cmd
            }
            None => Command::new(tool),
        };
        if let Ok(out) = cmd.args(["-t", "nat"]).output() {
            let text = String::from_utf8_lossy(&out.stdout);
            for line in text.lines().filter(|l| l.contains(&chain)) {
                left.push(format!("{tool}: {line}"));
            }
        }
    }
    let procs = cluster_processes(cluster);
    if !procs.is_empty() {
        left.push(format!("processes {procs:?}"));
    }
    left.extend(crate::bpf_objects::leftovers(map_ids));
    left
}

/// Send `signal` to `pid`.
pub fn signal(pid: i32, signal: i32) {
    // SAFETY: kill has no memory preconditions.
    unsafe { libc::kill(pid, signal) };
}

/// Nice value of process `pid` (field 19 of /proc/<pid>/stat).
pub fn nice_of(pid: i32) -> Option<i64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(16)?
        .parse()
        .ok()
}

/// One line of a watched `/stream`: when it arrived, who sent it, its sequence number.
#[derive(Clone, Debug)]
pub struct StreamLine {
    pub at: Instant,
    pub reply: DemoReply,
    pub seq: u64,
}

/// A demo `/stream` read continuously by its own thread, every line kept,
/// until [`StreamWatch::finish`]: what a client saw, line by line, through
/// whatever the test does meanwhile.
pub struct StreamWatch {
    pub first: DemoReply,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    reader: std::thread::JoinHandle<(Vec<StreamLine>, Option<String>)>,
}

/// What a watched stream received.
#[derive(Debug)]
pub struct StreamRecord {
    pub first: DemoReply,
    pub lines: Vec<StreamLine>,
    /// Why reading stopped before `finish`, if it did (reset, end, timeout).
    pub error: Option<String>,
}

impl StreamWatch {
    /// Open `/stream` from `source` and start reading it.
    pub fn open(source: IpAddr, target: SocketAddr) -> std::io::Result<StreamWatch> {
        let mut stream = DemoStream::open(source, target)?;
        let first = stream.first.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut lines = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match stream.next_line() {
                        Ok((reply, seq)) => lines.push(StreamLine {
                            at: Instant::now(),
                            reply,
                            seq,
                        }),
                        Err(e) => return (lines, Some(e.to_string())),
                    }
                }
                (lines, None)
            })
        };
        Ok(StreamWatch {
            first,
            stop,
            reader,
        })
    }

    /// Stop reading (the connection closes) and return what was received.
    pub fn finish(self) -> StreamRecord {
        self.stop.store(true, Ordering::Relaxed);
        let (lines, error) = self
            .reader
            .join()
            .unwrap_or_else(|_| (Vec::new(), Some("the reader thread panicked".into())));
        StreamRecord {
            first: self.first,
            lines,
            error,
        }
    }
}

/// Finish every stream and list every problem each had from `since` to now
/// (see [`StreamRecord::problems`]).
pub fn finish_streams(streams: Vec<StreamWatch>, since: Instant) -> Vec<String> {
    let end = Instant::now();
    streams
        .into_iter()
        .flat_map(|s| s.finish().problems(since, end))
        .collect()
}

impl StreamRecord {
    /// Every problem with this stream over `[since, until]`: it must not have
    /// broken, every line must come from the worker that sent the first one
    /// with consecutive sequence numbers, and lines must have kept arriving
    /// after `since` up to `until` (the demo worker writes one every 100 ms;
    /// a silence of 2 s, or none in the last second, is a stall).
    pub fn problems(&self, since: Instant, until: Instant) -> Vec<String> {
        let who = format!("stream from {}", self.first.client);
        let mut problems = Vec::new();
        if let Some(e) = &self.error {
            problems.push(format!("{who} broke after {} lines: {e}", self.lines.len()));
        }
        let mut previous: Option<&StreamLine> = None;
        for line in &self.lines {
            if line.reply.pid != self.first.pid || line.reply.generation != self.first.generation {
                problems.push(format!(
                    "{who}: line {} came from {:?}, the stream started on pid {} generation {}",
                    line.seq, line.reply, self.first.pid, self.first.generation
                ));
            }
            if let Some(p) = previous
                && line.seq != p.seq + 1
            {
                problems.push(format!("{who}: seq jumped from {} to {}", p.seq, line.seq));
            }
            previous = Some(line);
        }
        let after: Vec<Instant> = self
            .lines
            .iter()
            .map(|l| l.at)
            .filter(|&at| at > since)
            .collect();
        let mut checkpoints = vec![since];
        checkpoints.extend(after.iter().copied());
        checkpoints.push(until);
        if let Some(gap) = checkpoints
            .windows(2)
            .map(|w| w[1].saturating_duration_since(w[0]))
            .max()
            && gap > Duration::from_secs(2)
        {
            problems.push(format!(
                "{who}: no line for {gap:?} in the watched window ({} lines in it)",
                after.len()
            ));
        }
        if after
            .last()
            .is_none_or(|&last| until.saturating_duration_since(last) > Duration::from_secs(1))
        {
            problems.push(format!(
                "{who}: nothing received in the last second of the watched window ({} lines in it)",
                after.len()
            ));
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(pid: i32) -> DemoReply {
        DemoReply {
            band: 0,
            pid,
            generation: 1,
            port: 0,
            client: "127.0.0.2:40000".into(),
        }
    }

    /// Lines every `every` ms from `t0`, seq from 0, from `pid`.
    fn record(t0: Instant, every: u64, count: u64, pid: i32) -> StreamRecord {
        StreamRecord {
            first: reply(pid),
            lines: (0..count)
                .map(|seq| StreamLine {
                    at: t0 + Duration::from_millis(every * seq),
                    reply: reply(pid),
                    seq,
                })
                .collect(),
            error: None,
        }
    }

    #[test]
    fn a_flowing_stream_passes() {
        let t0 = Instant::now();
        let r = record(t0, 100, 50, 7);
        let until = t0 + Duration::from_millis(4950);
        assert!(
            r.problems(t0, until).is_empty(),
            "{:?}",
            r.problems(t0, until)
        );
    }

    #[test]
    fn a_stall_a_move_a_jump_and_a_break_are_caught() {
        let t0 = Instant::now();
        // Stalled: nothing after 1 s, the test ran 5 s.
        let r = record(t0, 100, 10, 7);
        assert!(!r.problems(t0, t0 + Duration::from_secs(5)).is_empty());
        // A line from another worker.
        let mut r = record(t0, 100, 50, 7);
        r.lines[30].reply.pid = 8;
        assert_eq!(r.problems(t0, t0 + Duration::from_millis(4950)).len(), 1);
        // A sequence gap.
        let mut r = record(t0, 100, 50, 7);
        r.lines[30].seq = 99;
        assert!(!r.problems(t0, t0 + Duration::from_millis(4950)).is_empty());
        // Broken.
        let mut r = record(t0, 100, 50, 7);
        r.error = Some("reset".into());
        assert_eq!(r.problems(t0, t0 + Duration::from_millis(4950)).len(), 1);
    }
}
