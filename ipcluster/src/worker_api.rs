//! The worker side of the control socket, for workers written in Rust: a small
//! blocking client, std only (one background thread), no async runtime needed.
//!
//! ```no_run
//! use ipcluster::{protocol::MasterMessage, worker_api::Worker};
//!
//! let worker = Worker::from_env()?; // fails clearly when not run by ipcluster
//! // ... bind worker.port() and start serving, then:
//! let messages = worker.hello()?; // pings every 500 ms from now on
//! worker.set_stats(serde_json::json!({ "sessions": 12 }));
//! for message in messages {
//!     match message {
//!         MasterMessage::Retire { .. } => {} // no new clients; keep the current ones
//!         MasterMessage::Die { .. } => break, // stop accepting, finish, exit
//!         MasterMessage::Info { .. } => {}
//!     }
//! }
//! # Ok::<(), ipcluster::worker_api::WorkerApiError>(())
//! ```
//!
//! The background thread pings the master every [`PING_INTERVAL`] with the
//! current stats and busy flag, delivers the master's messages, and reconnects
//! (saying hello again) when the master goes away: a reload replaces the master
//! while the workers keep running.

use std::{
    collections::BTreeMap,
    io::{self, ErrorKind, Write},
    os::unix::net::UnixStream,
    path::PathBuf,
    sync::{
        Arc, Condvar, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::{self, Receiver, Sender},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::protocol::{self, LineError, LineReader, MasterMessage, WorkerMessage, env};

/// How often the bundled client pings the master.
pub const PING_INTERVAL: Duration = Duration::from_millis(500);
/// Longest `request_retire` reason sent; longer ones are cut.
const MAX_REASON: usize = 1024;
/// First and longest pause between two attempts to reach a master that went away.
const RECONNECT_FIRST: Duration = Duration::from_millis(50);
const RECONNECT_MAX: Duration = Duration::from_secs(1);
/// A master that does not read for this long is treated as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors of the worker-side API.
#[derive(Debug, thiserror::Error)]
pub enum WorkerApiError {
    #[error(
        "not running under ipcluster: {var} is not set (start this program with \
         `ipcluster run -- <command>`, which sets IPCLUSTER_CONTROL, IPCLUSTER_BAND, \
         IPCLUSTER_GENERATION and PORT)"
    )]
    NotUnderIpcluster { var: &'static str },
    #[error("invalid {var}={value:?}: {expected}")]
    BadEnv {
        var: String,
        value: String,
        expected: &'static str,
    },
    #[error("cannot connect to the ipcluster control socket {}: {source}", path.display())]
    Connect { path: PathBuf, source: io::Error },
    #[error("cannot send {what} to the ipcluster master: {source}")]
    Send {
        what: &'static str,
        source: io::Error,
    },
    #[error("cannot start the control-socket thread: {0}")]
    Thread(io::Error),
    #[error("hello() was already called for this worker")]
    AlreadyStarted,
    #[error("not connected to the master: call hello() first")]
    NotStarted,
}

/// What ipcluster tells a worker through its environment (docs/design.md, "A worker's environment").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerEnv {
    /// `IPCLUSTER_CONTROL`: the master's control socket.
    pub control: PathBuf,
    /// `IPCLUSTER_BAND`.
    pub band: u32,
    /// `IPCLUSTER_GENERATION`.
    pub generation: u64,
    /// `IPCLUSTER_NAME`: the cluster's name.
    pub name: Option<String>,
    /// `IPCLUSTER_WORKERS`: how many bands the cluster has.
    pub workers: Option<u32>,
    /// `PORT`: the local port for the first public port.
    pub port: Option<u16>,
    /// `IPCLUSTER_PORT_<public>=<local>`: the local port for each public port.
    pub ports: BTreeMap<u16, u16>,
}

impl WorkerEnv {
    /// Read the process environment.
    pub fn from_env() -> Result<Self, WorkerApiError> {
        Self::from_vars(
            std::env::vars_os().filter_map(|(k, v)| {
                Some((k.into_string().ok()?, v.to_string_lossy().into_owned()))
            }),
        )
    }

    /// Read the given variables (the environment of a process, or a test's).
    pub fn from_vars<K, V>(vars: impl IntoIterator<Item = (K, V)>) -> Result<Self, WorkerApiError>
    where
        K: Into<String>,
        V: Into<String>,
    {
        let vars: BTreeMap<String, String> = vars
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        let required = |var: &'static str| {
            vars.get(var)
                .filter(|v| !v.is_empty())
                .ok_or(WorkerApiError::NotUnderIpcluster { var })
        };
        let control = PathBuf::from(required(env::CONTROL)?);
        let band = parse_var(env::BAND, required(env::BAND)?, "a band number")?;
        let generation = parse_var(
            env::GENERATION,
            required(env::GENERATION)?,
            "a generation number",
        )?;
        let optional = |var: &'static str| vars.get(var).filter(|v| !v.is_empty());
        let workers = optional(env::WORKERS)
            .map(|v| parse_var(env::WORKERS, v, "a worker count"))
            .transpose()?;
        let port = optional(env::PORT)
            .map(|v| parse_var(env::PORT, v, "a TCP port number"))
            .transpose()?;
        let mut ports = BTreeMap::new();
        for (var, value) in &vars {
            if let Some(public) = var.strip_prefix(env::PORT_PREFIX) {
                let public = parse_var(var, public, "IPCLUSTER_PORT_<public port>")?;
                ports.insert(public, parse_var(var, value, "a TCP port number")?);
            }
        }
        Ok(WorkerEnv {
            control,
            band,
            generation,
            name: optional(env::NAME).cloned(),
            workers,
            port,
            ports,
        })
    }

    /// The local ports this worker listens on: one per public port (in the order
    /// of the public ports), or `PORT` alone.
    pub fn local_ports(&self) -> Vec<u16> {
        let mut local: Vec<u16> = Vec::new();
        for &port in self.ports.values() {
            if !local.contains(&port) {
                local.push(port);
            }
        }
        if local.is_empty() {
            local.extend(self.port);
        }
        local
    }
}

fn parse_var<T: std::str::FromStr>(
    var: &str,
    value: &str,
    expected: &'static str,
) -> Result<T, WorkerApiError> {
    value.trim().parse().map_err(|_| WorkerApiError::BadEnv {
        var: var.to_owned(),
        value: value.to_owned(),
        expected,
    })
}

/// What the master said about the cluster in its `info` message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterInfo {
    pub name: String,
    pub generation: u64,
    pub band: u32,
    pub workers: u32,
}

/// A worker's link to its master. Cheap to clone; every clone drives the same
/// connection, and the background thread stops when the last clone is dropped.
#[derive(Clone)]
pub struct Worker {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

type StatsFn = dyn Fn() -> Value + Send + Sync;

/// State shared by the user's threads and the control thread.
struct Shared {
    env: WorkerEnv,
    ping_interval_ms: AtomicU64,
    busy: AtomicBool,
    pings_paused: AtomicBool,
    started: AtomicBool,
    retired: AtomicBool,
    dying: AtomicBool,
    stats: Mutex<Value>,
    stats_fn: Mutex<Option<Arc<StatsFn>>>,
    app: Mutex<Value>,
    info: Mutex<Option<ClusterInfo>>,
    /// A retirement the worker asked for, sent again after a reconnect.
    retire_request: Mutex<Option<String>>,
    /// The write half of the current connection, if connected.
    writer: Mutex<Option<UnixStream>>,
    stopped: Mutex<bool>,
    stop_signal: Condvar,
}

/// A poisoned lock only means another thread panicked while holding it; the
/// data (a flag, a JSON value) is still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Worker {
    /// The worker of this process, from the environment ipcluster sets; an
    /// error names the missing variable when not run under ipcluster.
    pub fn from_env() -> Result<Self, WorkerApiError> {
        Ok(Self::new(WorkerEnv::from_env()?))
    }

    pub fn new(env: WorkerEnv) -> Self {
        let shared = Shared {
            env,
            ping_interval_ms: AtomicU64::new(millis(PING_INTERVAL)),
            busy: AtomicBool::new(false),
            pings_paused: AtomicBool::new(false),
            started: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            dying: AtomicBool::new(false),
            stats: Mutex::new(Value::Null),
            stats_fn: Mutex::new(None),
            app: Mutex::new(Value::Null),
            info: Mutex::new(None),
            retire_request: Mutex::new(None),
            writer: Mutex::new(None),
            stopped: Mutex::new(false),
            stop_signal: Condvar::new(),
        };
        Worker {
            inner: Arc::new(Inner {
                shared: Arc::new(shared),
                thread: Mutex::new(None),
            }),
        }
    }

    pub fn env(&self) -> &WorkerEnv {
        &self.inner.shared.env
    }

    pub fn band(&self) -> u32 {
        self.env().band
    }

    pub fn generation(&self) -> u64 {
        self.env().generation
    }

    /// `PORT`, else the first local port.
    pub fn port(&self) -> Option<u16> {
        self.env()
            .port
            .or_else(|| self.env().local_ports().first().copied())
    }

    /// Connect to the master, say hello (band, generation, local ports) and
    /// start pinging. Call it once the server listens. Returns the master's
    /// messages; the channel closes when the last [`Worker`] clone is dropped.
    pub fn hello(&self) -> Result<Receiver<MasterMessage>, WorkerApiError> {
        let shared = &self.inner.shared;
        if shared.started.swap(true, Ordering::SeqCst) {
            return Err(WorkerApiError::AlreadyStarted);
        }
        let stream = match shared.connect() {
            Ok(stream) => stream,
            Err(e) => {
                shared.started.store(false, Ordering::SeqCst);
                return Err(e);
            }
        };
        let (tx, rx) = mpsc::channel();
        let thread_shared = Arc::clone(shared);
        let thread = std::thread::Builder::new()
            .name("ipcluster-control".into())
            .spawn(move || control_loop(&thread_shared, stream, &tx))
            .map_err(WorkerApiError::Thread)?;
        *lock(&self.inner.thread) = Some(thread);
        Ok(rx)
    }

    /// Report (in the next pings) that the worker is overloaded: the master
    /// retires it and starts a replacement, which takes the new clients.
    pub fn set_busy(&self, busy: bool) {
        self.inner.shared.busy.store(busy, Ordering::Relaxed);
    }

    pub fn is_busy(&self) -> bool {
        self.inner.shared.busy.load(Ordering::Relaxed)
    }

    /// The statistics sent with every ping (shown by `ipcluster status`).
    pub fn set_stats(&self, stats: Value) {
        *lock(&self.inner.shared.stats) = stats;
    }

    /// Compute the statistics at every ping instead (replaces [`Worker::set_stats`]).
    pub fn set_stats_fn(&self, stats: impl Fn() -> Value + Send + Sync + 'static) {
        *lock(&self.inner.shared.stats_fn) = Some(Arc::new(stats));
    }

    /// Application info sent with every ping (version, build).
    pub fn set_app(&self, app: Value) {
        *lock(&self.inner.shared.app) = app;
    }

    /// Ping every `interval` instead of [`PING_INTERVAL`].
    pub fn set_ping_interval(&self, interval: Duration) {
        let ms = millis(interval).max(1);
        self.inner
            .shared
            .ping_interval_ms
            .store(ms, Ordering::Relaxed);
    }

    /// Stop (or resume) pinging while staying connected: the master takes a
    /// silent worker for a hung one. For tests of the ping timeout.
    pub fn pause_pings(&self, paused: bool) {
        self.inner
            .shared
            .pings_paused
            .store(paused, Ordering::Relaxed);
    }

    /// Ask the master to retire this worker (it is leaking, or wants a fresh
    /// start). Sent now if connected, and again after a reconnect until the
    /// master retires it; the master rate-limits retirements.
    pub fn request_retire(&self, reason: impl Into<String>) -> Result<(), WorkerApiError> {
        let shared = &self.inner.shared;
        if !shared.started.load(Ordering::SeqCst) {
            return Err(WorkerApiError::NotStarted);
        }
        let mut reason: String = reason.into();
        truncate_at_char(&mut reason, MAX_REASON);
        *lock(&shared.retire_request) = Some(reason.clone());
        // A failed write means the connection is gone: the control thread
        // reconnects and sends the request again.
        let _ = shared.send(&WorkerMessage::RequestRetire { reason });
        Ok(())
    }

    /// The master said `retire`: no new client will reach this worker.
    pub fn is_retired(&self) -> bool {
        self.inner.shared.retired.load(Ordering::SeqCst)
    }

    /// The master said `die`.
    pub fn is_dying(&self) -> bool {
        self.inner.shared.dying.load(Ordering::SeqCst)
    }

    /// The last `info` from the master.
    pub fn info(&self) -> Option<ClusterInfo> {
        lock(&self.inner.shared.info).clone()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.stop();
        if let Some(thread) = lock(&self.thread).take() {
            // The thread only ends by returning; a panic in it is not ours to re-raise.
            let _ = thread.join();
        }
    }
}

impl Shared {
    fn ping_interval(&self) -> Duration {
        Duration::from_millis(self.ping_interval_ms.load(Ordering::Relaxed))
    }

    fn is_stopped(&self) -> bool {
        *lock(&self.stopped)
    }

    fn stop(&self) {
        *lock(&self.stopped) = true;
        self.stop_signal.notify_all();
        if let Some(writer) = lock(&self.writer).take() {
            // Wakes the control thread from its read.
            let _ = writer.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Sleep for `pause` unless stopped first; returns whether still running.
    fn pause(&self, pause: Duration) -> bool {
        let stopped = lock(&self.stopped);
        let (stopped, _) = self
            .stop_signal
            .wait_timeout_while(stopped, pause, |stopped| !*stopped)
            .unwrap_or_else(PoisonError::into_inner);
        !*stopped
    }

    /// Connect, say hello (and repeat a pending retirement request), and make
    /// the connection the current one.
    fn connect(&self) -> Result<UnixStream, WorkerApiError> {
        let path = &self.env.control;
        let connect_error = |source| WorkerApiError::Connect {
            path: path.clone(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(connect_error)?;
        let writer = stream.try_clone().map_err(connect_error)?;
        writer
            .set_write_timeout(Some(WRITE_TIMEOUT))
            .map_err(connect_error)?;
        *lock(&self.writer) = Some(writer);
        let hello = WorkerMessage::Hello {
            band: self.env.band,
            generation: self.env.generation,
            ports: self.env.local_ports(),
        };
        self.send(&hello).map_err(|source| WorkerApiError::Send {
            what: "hello",
            source,
        })?;
        let pending = lock(&self.retire_request).clone();
        if let Some(reason) = pending.filter(|_| !self.retired.load(Ordering::SeqCst)) {
            self.send(&WorkerMessage::RequestRetire { reason })
                .map_err(|source| WorkerApiError::Send {
                    what: "request_retire",
                    source,
                })?;
        }
        Ok(stream)
    }

    /// Write one message as one line on the current connection.
    fn send(&self, message: &WorkerMessage) -> io::Result<()> {
        let mut line = protocol::to_line(message).map_err(|e| match e {
            LineError::MessageTooLong { .. } => {
                io::Error::new(ErrorKind::InvalidInput, e.to_string())
            }
            other => io::Error::other(other),
        })?;
        line.push('\n');
        let mut writer = lock(&self.writer);
        let stream = writer
            .as_mut()
            .ok_or_else(|| io::Error::from(ErrorKind::NotConnected))?;
        let written = stream.write_all(line.as_bytes());
        if written.is_err() {
            *writer = None;
        }
        written
    }

    fn ping(&self) -> io::Result<()> {
        let stats_fn = lock(&self.stats_fn).clone();
        let stats = match stats_fn {
            Some(stats_fn) => stats_fn(),
            None => lock(&self.stats).clone(),
        };
        let busy = self.busy.load(Ordering::Relaxed);
        let app = lock(&self.app).clone();
        match self.send(&WorkerMessage::Ping { stats, busy, app }) {
            Err(e) if e.kind() == ErrorKind::InvalidInput => {
                // Stats too large for one line: still ping, or the master would
                // take the worker for a hung one.
                let stats =
                    serde_json::json!({ "error": "stats larger than the control line limit" });
                self.send(&WorkerMessage::Ping {
                    stats,
                    busy,
                    app: Value::Null,
                })
            }
            other => other,
        }
    }

    fn deliver(&self, line: &str, tx: &Sender<MasterMessage>) {
        // Unknown or malformed messages are skipped: a newer master may say more.
        let Ok(message) = serde_json::from_str::<MasterMessage>(line) else {
            log::debug!("ipcluster worker: ignoring control message {line:?}");
            return;
        };
        match &message {
            MasterMessage::Retire { .. } => {
                self.retired.store(true, Ordering::SeqCst);
                *lock(&self.retire_request) = None;
            }
            MasterMessage::Die { .. } => self.dying.store(true, Ordering::SeqCst),
            MasterMessage::Info {
                name,
                generation,
                band,
                workers,
            } => {
                *lock(&self.info) = Some(ClusterInfo {
                    name: name.clone(),
                    generation: *generation,
                    band: *band,
                    workers: *workers,
                });
            }
        }
        // Nobody listening any more is fine: the flags above still tell.
        let _ = tx.send(message);
    }
}

/// The control thread: serve the connection, and when it breaks, reconnect
/// with backoff until the worker is dropped.
fn control_loop(shared: &Shared, mut stream: UnixStream, tx: &Sender<MasterMessage>) {
    loop {
        serve_connection(shared, &stream, tx);
        *lock(&shared.writer) = None;
        let mut backoff = RECONNECT_FIRST;
        stream = loop {
            if !shared.pause(backoff) {
                return;
            }
            match shared.connect() {
                Ok(stream) => break stream,
                Err(e) => log::debug!("ipcluster worker: {e}; retrying"),
            }
            backoff = (backoff * 2).min(RECONNECT_MAX);
        };
    }
}

/// Ping on time and deliver the master's lines, until the connection breaks
/// or the worker is dropped.
fn serve_connection(shared: &Shared, stream: &UnixStream, tx: &Sender<MasterMessage>) {
    let mut lines = LineReader::new(stream);
    let mut next_ping = Instant::now() + shared.ping_interval();
    loop {
        if shared.is_stopped() {
            return;
        }
        let now = Instant::now();
        if now >= next_ping {
            if !shared.pings_paused.load(Ordering::Relaxed) && shared.ping().is_err() {
                return;
            }
            next_ping = now + shared.ping_interval();
        }
        let wait = next_ping
            .saturating_duration_since(now)
            .max(Duration::from_millis(1));
        if stream.set_read_timeout(Some(wait)).is_err() {
            return;
        }
        // A timeout keeps the part of a line read so far: the next call goes on.
        match lines.read_line() {
            Ok(Some(line)) => shared.deliver(&line, tx),
            Ok(None) => return,
            Err(LineError::Io(e))
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(LineError::Io(_)) => return,
            // Skipped whole; the connection stays usable.
            Err(e) => log::warn!("ipcluster worker: control socket: {e}; ignored"),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn truncate_at_char(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead, BufReader},
        os::unix::net::UnixListener,
        path::Path,
        sync::atomic::AtomicUsize,
    };

    use super::*;

    const PATIENCE: Duration = Duration::from_secs(5);

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::SeqCst);
            let dir = std::env::temp_dir()
                .join(format!("ipcluster-worker-api-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("create temp dir");
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn env_for(control: &Path) -> WorkerEnv {
        WorkerEnv::from_vars([
            ("IPCLUSTER_CONTROL", control.to_str().expect("utf-8 path")),
            ("IPCLUSTER_BAND", "3"),
            ("IPCLUSTER_GENERATION", "7"),
            ("IPCLUSTER_NAME", "test"),
            ("IPCLUSTER_WORKERS", "8"),
            ("PORT", "20001"),
            ("IPCLUSTER_PORT_8080", "20001"),
            ("IPCLUSTER_PORT_8443", "20002"),
        ])
        .expect("env")
    }

    /// The master's end of one connection.
    struct FakeMaster {
        lines: BufReader<UnixStream>,
        stream: UnixStream,
    }

    impl FakeMaster {
        fn accept(listener: &UnixListener) -> Self {
            listener.set_nonblocking(true).expect("nonblocking");
            let deadline = Instant::now() + PATIENCE;
            let stream = loop {
                match listener.accept() {
                    Ok((stream, _)) => break stream,
                    Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("no worker connected: {e}"),
                }
            };
            stream.set_nonblocking(false).expect("blocking");
            stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
            FakeMaster {
                lines: BufReader::new(stream.try_clone().expect("clone")),
                stream,
            }
        }

        fn next(&mut self) -> WorkerMessage {
            let mut line = String::new();
            self.lines
                .read_line(&mut line)
                .expect("a line from the worker");
            assert!(line.ends_with('\n'), "unterminated line {line:?}");
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad line {line:?}: {e}"))
        }

        /// The next message that is not a ping.
        fn next_non_ping(&mut self) -> WorkerMessage {
            loop {
                let message = self.next();
                if !matches!(message, WorkerMessage::Ping { .. }) {
                    return message;
                }
            }
        }

        fn say(&mut self, line: &str) {
            self.stream.write_all(line.as_bytes()).expect("write");
            self.stream.write_all(b"\n").expect("write");
        }
    }

    fn started(
        interval_ms: u64,
    ) -> (
        TempDir,
        UnixListener,
        Worker,
        Receiver<MasterMessage>,
        FakeMaster,
    ) {
        let dir = TempDir::new();
        let path = dir.0.join("control.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let worker = Worker::new(env_for(&path));
        worker.set_ping_interval(Duration::from_millis(interval_ms));
        let messages = worker.hello().expect("hello");
        let master = FakeMaster::accept(&listener);
        (dir, listener, worker, messages, master)
    }

    #[test]
    fn environment_is_read_and_checked() {
        let env = env_for(Path::new("/run/ipcluster/test/control.sock"));
        assert_eq!(env.band, 3);
        assert_eq!(env.generation, 7);
        assert_eq!(env.name.as_deref(), Some("test"));
        assert_eq!(env.workers, Some(8));
        assert_eq!(env.port, Some(20001));
        assert_eq!(env.local_ports(), vec![20001, 20002]);

        let only_port = WorkerEnv::from_vars([
            ("IPCLUSTER_CONTROL", "/c"),
            ("IPCLUSTER_BAND", "0"),
            ("IPCLUSTER_GENERATION", "1"),
            ("PORT", "20005"),
        ])
        .expect("env");
        assert_eq!(only_port.local_ports(), vec![20005]);

        let e = WorkerEnv::from_vars([("PORT", "8080")]).expect_err("not under ipcluster");
        assert!(matches!(
            e,
            WorkerApiError::NotUnderIpcluster {
                var: "IPCLUSTER_CONTROL"
            }
        ));
        assert!(e.to_string().contains("not running under ipcluster"), "{e}");

        let e = WorkerEnv::from_vars([("IPCLUSTER_CONTROL", "/c"), ("IPCLUSTER_GENERATION", "1")])
            .expect_err("no band");
        assert!(e.to_string().contains("IPCLUSTER_BAND is not set"), "{e}");

        for (var, value) in [
            ("IPCLUSTER_BAND", "three"),
            ("PORT", "70000"),
            ("IPCLUSTER_PORT_http", "20001"),
        ] {
            let mut vars = vec![
                ("IPCLUSTER_CONTROL", "/c"),
                ("IPCLUSTER_BAND", "3"),
                ("IPCLUSTER_GENERATION", "1"),
            ];
            vars.retain(|(k, _)| *k != var);
            vars.push((var, value));
            let e = WorkerEnv::from_vars(vars).expect_err(var);
            assert!(e.to_string().starts_with(&format!("invalid {var}=")), "{e}");
        }
    }

    #[test]
    fn hello_comes_first_then_pings_with_stats_and_busy() {
        let (_dir, _listener, worker, _messages, mut master) = started(20);
        let counter = Arc::new(AtomicU64::new(0));
        let sessions = Arc::clone(&counter);
        worker.set_stats_fn(
            move || serde_json::json!({ "sessions": sessions.load(Ordering::SeqCst) }),
        );
        worker.set_app(serde_json::json!({ "version": "1.2" }));
        assert_eq!(
            master.next(),
            WorkerMessage::Hello {
                band: 3,
                generation: 7,
                ports: vec![20001, 20002]
            }
        );
        let begin = Instant::now();
        let mut pings = 0;
        counter.store(42, Ordering::SeqCst);
        loop {
            let WorkerMessage::Ping { stats, busy, app } = master.next() else {
                panic!("expected only pings");
            };
            assert!(!busy);
            if stats["sessions"] == 42 && app["version"] == "1.2" {
                pings += 1;
            }
            if pings == 3 {
                break;
            }
        }
        assert!(
            begin.elapsed() >= Duration::from_millis(40),
            "pings too fast: {:?}",
            begin.elapsed()
        );
        worker.set_busy(true);
        assert!(worker.is_busy());
        let deadline = Instant::now() + PATIENCE;
        while !matches!(master.next(), WorkerMessage::Ping { busy: true, .. }) {
            assert!(Instant::now() < deadline, "busy never reported");
        }
    }

    #[test]
    fn fixed_stats_are_sent_and_pings_can_pause() {
        let (_dir, _listener, worker, _messages, mut master) = started(10);
        worker.set_stats(serde_json::json!({ "rooms": 5 }));
        assert!(matches!(master.next(), WorkerMessage::Hello { .. }));
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let WorkerMessage::Ping { stats, .. } = master.next()
                && stats["rooms"] == 5
            {
                break;
            }
            assert!(Instant::now() < deadline, "stats never sent");
        }
        worker.pause_pings(true);
        // Drain what was in flight, then expect silence.
        std::thread::sleep(Duration::from_millis(50));
        master.stream.set_nonblocking(true).expect("nonblocking");
        let mut drained = String::new();
        while master.lines.read_line(&mut drained).is_ok_and(|n| n > 0) {}
        std::thread::sleep(Duration::from_millis(100));
        let mut line = String::new();
        assert!(
            matches!(master.lines.read_line(&mut line), Err(e) if e.kind() == ErrorKind::WouldBlock),
            "pinged while paused: {line:?}"
        );
        master.stream.set_nonblocking(false).expect("blocking");
        worker.pause_pings(false);
        assert!(matches!(master.next(), WorkerMessage::Ping { .. }));
    }

    #[test]
    fn request_retire_is_sent() {
        let (_dir, _listener, worker, _messages, mut master) = started(50);
        assert!(matches!(master.next(), WorkerMessage::Hello { .. }));
        worker.request_retire("heap grows").expect("request");
        assert_eq!(
            master.next_non_ping(),
            WorkerMessage::RequestRetire {
                reason: "heap grows".into()
            }
        );
    }

    #[test]
    fn master_messages_reach_the_worker() {
        let (_dir, _listener, worker, messages, mut master) = started(50);
        assert!(matches!(master.next(), WorkerMessage::Hello { .. }));
        master.say(r#"{"type":"info","name":"test","generation":7,"band":3,"workers":8}"#);
        master.say("not json");
        master.say(r#"{"type":"reboot"}"#);
        master.say(&format!(
            r#"{{"type":"retire","reason":"{}"}}"#,
            "x".repeat(protocol::MAX_LINE)
        ));
        master.say(r#"{"type":"retire","reason":"reload"}"#);
        master.say(r#"{"type":"die","reason":"low watermark"}"#);
        let next = || messages.recv_timeout(PATIENCE).expect("a message");
        assert_eq!(
            next(),
            MasterMessage::Info {
                name: "test".into(),
                generation: 7,
                band: 3,
                workers: 8
            }
        );
        assert_eq!(
            next(),
            MasterMessage::Retire {
                reason: "reload".into()
            }
        );
        assert_eq!(
            next(),
            MasterMessage::Die {
                reason: "low watermark".into()
            }
        );
        assert!(worker.is_retired());
        assert!(worker.is_dying());
        assert_eq!(
            worker.info(),
            Some(ClusterInfo {
                name: "test".into(),
                generation: 7,
                band: 3,
                workers: 8
            })
        );
    }

    #[test]
    fn a_new_master_gets_hello_and_the_pending_retirement_request() {
        let (_dir, listener, worker, _messages, mut master) = started(20);
        assert!(matches!(master.next(), WorkerMessage::Hello { .. }));
        worker.request_retire("leak").expect("request");
        assert!(matches!(
            master.next_non_ping(),
            WorkerMessage::RequestRetire { .. }
        ));
        drop(master); // the master is replaced (a reload)
        let mut master = FakeMaster::accept(&listener);
        assert!(matches!(
            master.next(),
            WorkerMessage::Hello {
                band: 3,
                generation: 7,
                ..
            }
        ));
        assert_eq!(
            master.next_non_ping(),
            WorkerMessage::RequestRetire {
                reason: "leak".into()
            }
        );
        // Once retired, the request is not repeated to the next master.
        master.say(r#"{"type":"retire","reason":"requested"}"#);
        let deadline = Instant::now() + PATIENCE;
        while !worker.is_retired() {
            assert!(Instant::now() < deadline, "retire never delivered");
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(master);
        let mut master = FakeMaster::accept(&listener);
        assert!(matches!(master.next(), WorkerMessage::Hello { .. }));
        assert!(matches!(master.next(), WorkerMessage::Ping { .. }));
    }

    #[test]
    fn misuse_and_missing_master_are_clear_errors() {
        let dir = TempDir::new();
        let path = dir.0.join("control.sock");
        let worker = Worker::new(env_for(&path));
        assert!(matches!(
            worker.request_retire("x"),
            Err(WorkerApiError::NotStarted)
        ));
        let e = worker.hello().expect_err("no master");
        assert!(matches!(e, WorkerApiError::Connect { .. }), "{e:?}");
        assert!(e.to_string().contains("control.sock"), "{e}");
        let _listener = UnixListener::bind(&path).expect("bind");
        let _messages = worker.hello().expect("hello once the master is there");
        assert!(matches!(
            worker.hello(),
            Err(WorkerApiError::AlreadyStarted)
        ));
    }

    #[test]
    fn dropping_the_worker_closes_the_connection() {
        let (_dir, _listener, worker, messages, mut master) = started(20);
        assert!(matches!(master.next(), WorkerMessage::Hello { .. }));
        let clone = worker.clone();
        drop(worker);
        assert!(matches!(
            master.next(),
            WorkerMessage::Hello { .. } | WorkerMessage::Ping { .. }
        ));
        drop(clone);
        let mut rest = String::new();
        let deadline = Instant::now() + PATIENCE;
        loop {
            rest.clear();
            match master.lines.read_line(&mut rest) {
                Ok(0) => break,
                Ok(_) => assert!(Instant::now() < deadline, "connection never closed"),
                Err(e) => panic!("read: {e}"),
            }
        }
        assert!(
            messages.recv_timeout(PATIENCE).is_err(),
            "channel closes with the worker"
        );
    }
}
