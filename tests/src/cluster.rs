//! Running the real `ipcluster` binary in end-to-end tests: start a master
//! (and more masters: reloads) for a uniquely named cluster, read
//! `status --json`, talk HTTP to the demo worker from 127.0.0.N, and clean up
//! on drop — `ipcluster stop`, then SIGKILL for anything of the cluster left —
//! even when the test panics.
//!
//! The binary: `$IPCLUSTER_BIN` if set, else `ipcluster` next to the test
//! executable's `deps/` folder (`target/<profile>/ipcluster`, built by
//! `cargo build -p ipcluster` with the same profile, which `cargo xtask test`
//! does first).

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
    let child = Command::new(ipcluster_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ipcluster");
    wait_output(child, timeout, &format!("ipcluster {}", args.join(" ")))
}

fn wait_output(child: Child, timeout: Duration, what: &str) -> Output {
    match try_wait_output(child, timeout) {
        Ok(out) => out,
        Err(stderr) => panic!("`{what}` did not finish within {timeout:?}; stderr:\n{stderr}"),
    }
}

/// The output of `child`, or (after killing it) its stderr when it outlives `timeout`.
/// Pipes are drained by threads, so a chatty child cannot block on a full pipe.
fn try_wait_output(mut child: Child, timeout: Duration) -> Result<Output, String> {
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    match status {
        Some(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        None => Err(String::from_utf8_lossy(&stderr).into_owned()),
    }
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
    /// Extra environment of every master this value starts.
    pub master_env: Vec<(String, String)>,
}

impl Cluster {
    /// Start a master and wait until generation 1 is live on every band.
    pub fn start(name: &str, spec: ClusterSpec) -> Cluster {
        Cluster::start_with_env(name, spec, Vec::new())
    }

    /// [`Cluster::start`] with extra environment variables for the masters.
    pub fn start_with_env(
        name: &str,
        spec: ClusterSpec,
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
        let child = Command::new(ipcluster_bin())
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
        let out = ipcluster(
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

    /// `ipcluster stop`; panics if it fails.
    pub fn stop(&mut self) {
        let out = ipcluster(&["stop", "--name", &self.name], Duration::from_secs(30));
        assert!(
            out.status.success(),
            "ipcluster stop failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        for master in &mut self.masters {
            let _ = wait_child(master, Duration::from_secs(5));
        }
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

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        // Never panic here: a panic while unwinding aborts the test binary.
        let out = Command::new(ipcluster_bin())
            .args(["stop", "--name", &self.name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())
            .and_then(|c| try_wait_output(c, Duration::from_secs(30)));
        match out {
            Ok(out) if out.status.success() => {}
            Ok(out) => {
                let stderr = String::from_utf8_lossy(&out.stderr);
                if !stderr.contains("is not running") {
                    eprintln!("cleanup: ipcluster stop --name {}: {stderr}", self.name);
                }
            }
            Err(e) => eprintln!("cleanup: ipcluster stop --name {} hung: {e}", self.name),
        }
        for master in &mut self.masters {
            if !wait_child(master, Duration::from_secs(2)) {
                let _ = master.kill();
                let _ = master.wait();
            }
        }
        kill_cluster_processes(&self.name);
        let _ = std::fs::remove_dir_all(ipcluster::paths::state_dir(&self.name));
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

/// Processes (not zombies) carrying `IPCLUSTER_NAME=<cluster>`.
pub fn cluster_processes(cluster: &str) -> Vec<i32> {
    let needle = format!("IPCLUSTER_NAME={cluster}");
    let mut pids = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
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
/// iptables chain, no process. Returns what is left, described.
pub fn leftovers(cluster: &str) -> Vec<String> {
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
        if let Ok(out) = Command::new(tool).args(["-t", "nat"]).output() {
            let text = String::from_utf8_lossy(&out.stdout);
            if let Some(line) = text.lines().find(|l| l.contains(&chain)) {
                left.push(format!("{tool}: {line}"));
            }
        }
    }
    let procs = cluster_processes(cluster);
    if !procs.is_empty() {
        left.push(format!("processes {procs:?}"));
    }
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
