//! A small HTTP load generator that, unlike wrk, can bind each connection to a
//! chosen source address (127.0.0.N), so that one machine looks like many
//! clients and the band spread and stickiness can be checked under load.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use socket2::{Domain, Protocol, Socket, Type};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// One request per connection (`Connection: close`).
    NewConnection,
    /// Requests on long-lived connections.
    KeepAlive,
}

#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub target: SocketAddr,
    pub mode: Mode,
    /// Source addresses; connection `i` binds `sources[i % len]`. Empty: the kernel chooses.
    pub sources: Vec<IpAddr>,
    pub connections: usize,
    pub duration: Duration,
    /// At most one request per connection slot every `pace` (None: back to back).
    pub pace: Option<Duration>,
    /// When set, each source connects straight to the port of its band
    /// (`ports[low bits of the address & (len-1)]`) instead of `target`'s port:
    /// the spread steering would give, without steering (the baseline).
    pub band_ports: Option<Vec<u16>>,
}

/// When an answer was first and last received.
#[derive(Clone, Copy, Debug)]
pub struct Seen {
    pub first: Instant,
    pub last: Instant,
}

/// What one run saw.
#[derive(Clone, Debug, Default)]
pub struct LoadResult {
    pub requests: u64,
    pub failures: u64,
    pub elapsed: Duration,
    /// Per-request latencies in microseconds (every request).
    pub latencies_us: Vec<u32>,
    /// For each source address, the distinct answers (the body's first line
    /// without the `client=` token, which names the client port) seen.
    pub answers_by_source: BTreeMap<IpAddr, BTreeMap<String, u64>>,
    /// For each distinct answer, when it was first and last received.
    pub seen: BTreeMap<String, Seen>,
    /// Failures by kind (connect refused, reset, timeout, …).
    pub error_kinds: BTreeMap<String, u64>,
}

impl LoadResult {
    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn percentile_ms(&mut self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        self.latencies_us.sort_unstable();
        let idx = ((self.latencies_us.len() - 1) as f64 * p).round() as usize;
        f64::from(self.latencies_us[idx]) / 1000.0
    }

    /// Sources that were answered by more than one distinct body (stickiness broken).
    pub fn unsticky_sources(&self) -> usize {
        self.answers_by_source
            .values()
            .filter(|a| a.len() > 1)
            .count()
    }

    /// The largest number of distinct `band=` values one source was answered
    /// with (1 = every source stayed on its band; answers without `band=` count as 1).
    pub fn bands_per_source_max(&self) -> usize {
        self.answers_by_source
            .values()
            .map(|answers| {
                let bands: std::collections::BTreeSet<&str> = answers
                    .keys()
                    .map(|a| {
                        a.split_whitespace()
                            .find(|t| t.starts_with("band="))
                            .unwrap_or("")
                    })
                    .collect();
                bands.len()
            })
            .max()
            .unwrap_or(0)
    }

    /// Requests per distinct answer (the band spread).
    pub fn spread(&self) -> BTreeMap<String, u64> {
        let mut spread = BTreeMap::new();
        for answers in self.answers_by_source.values() {
            for (answer, n) in answers {
                *spread.entry(answer.clone()).or_default() += n;
            }
        }
        spread
    }

    fn merge(&mut self, other: LoadResult) {
        self.requests += other.requests;
        self.failures += other.failures;
        self.latencies_us.extend(other.latencies_us);
        for (answer, seen) in other.seen {
            self.seen
                .entry(answer)
                .and_modify(|s| {
                    s.first = s.first.min(seen.first);
                    s.last = s.last.max(seen.last);
                })
                .or_insert(seen);
        }
        for (kind, n) in other.error_kinds {
            *self.error_kinds.entry(kind).or_default() += n;
        }
        for (src, answers) in other.answers_by_source {
            let mine = self.answers_by_source.entry(src).or_default();
            for (a, n) in answers {
                *mine.entry(a).or_default() += n;
            }
        }
    }
}

fn connect_from(
    source: Option<IpAddr>,
    target: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream> {
    let Some(source) = source else {
        return Ok(TcpStream::connect_timeout(&target, timeout)?);
    };
    let socket = Socket::new(
        Domain::for_address(target),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    socket.connect_timeout(&target.into(), timeout)?;
    Ok(socket.into())
}

/// Read one HTTP/1.1 response; return its body's first line.
fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>, until_eof: bool) -> Result<String> {
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(head_end) = find(buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            if let Some(len) = length
                && buf.len() >= head_end + 4 + len
                && !until_eof
            {
                break;
            }
        }
    }
    let head_end = find(buf, b"\r\n\r\n").context("incomplete HTTP response")?;
    if !buf.starts_with(b"HTTP/1.1 200") && !buf.starts_with(b"HTTP/1.0 200") {
        anyhow::bail!("non-200 response");
    }
    let body = &buf[head_end + 4..];
    let first = String::from_utf8_lossy(body);
    let first = first.lines().next().unwrap_or("");
    // The demo worker names the client port: drop it, it differs per connection.
    Ok(first
        .split_whitespace()
        .filter(|t| !t.starts_with("client="))
        .collect::<Vec<_>>()
        .join(" "))
}

/// A short name for what went wrong with one request.
fn error_kind(e: &anyhow::Error) -> String {
    if let Some(io) = e.downcast_ref::<std::io::Error>() {
        return match io.kind() {
            std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
            std::io::ErrorKind::ConnectionReset => "connection reset".into(),
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => "timeout".into(),
            std::io::ErrorKind::AddrNotAvailable | std::io::ErrorKind::AddrInUse => {
                "no local port".into()
            }
            kind => format!("{kind:?}"),
        };
    }
    let text = e.to_string();
    if text.contains("incomplete") {
        "closed before a full response".into()
    } else {
        text
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn worker(spec: LoadSpec, index: usize, stop: Arc<AtomicBool>) -> LoadResult {
    let source = (!spec.sources.is_empty()).then(|| spec.sources[index % spec.sources.len()]);
    let key = source.unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let target = match (&spec.band_ports, key) {
        (Some(ports), IpAddr::V4(v4)) if ports.len().is_power_of_two() => {
            let band = (u32::from(v4) as usize) & (ports.len() - 1);
            SocketAddr::new(spec.target.ip(), ports[band])
        }
        _ => spec.target,
    };
    let mut result = LoadResult::default();
    let mut buf = Vec::with_capacity(8192);
    let timeout = Duration::from_secs(5);
    let close = spec.mode == Mode::NewConnection;
    let request: &[u8] = if close {
        b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    } else {
        b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
    };
    let mut conn: Option<TcpStream> = None;
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let outcome = (|| -> Result<String> {
            if conn.is_none() {
                let s = connect_from(source, target, timeout)?;
                s.set_read_timeout(Some(timeout))?;
                s.set_nodelay(true)?;
                conn = Some(s);
            }
            let s = conn.as_mut().context("no connection")?;
            s.write_all(request)?;
            read_response(s, &mut buf, close)
        })();
        match outcome {
            Ok(answer) => {
                result.requests += 1;
                let now = Instant::now();
                let us = u32::try_from((now - started).as_micros()).unwrap_or(u32::MAX);
                result.latencies_us.push(us);
                match result.seen.get_mut(&answer) {
                    Some(seen) => seen.last = now,
                    None => {
                        result.seen.insert(
                            answer.clone(),
                            Seen {
                                first: now,
                                last: now,
                            },
                        );
                    }
                }
                *result
                    .answers_by_source
                    .entry(key)
                    .or_default()
                    .entry(answer)
                    .or_default() += 1;
            }
            Err(e) => {
                result.failures += 1;
                *result.error_kinds.entry(error_kind(&e)).or_default() += 1;
                conn = None;
            }
        }
        if close {
            conn = None;
        }
        if let Some(pace) = spec.pace {
            let next = started + pace;
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            }
        }
    }
    result
}

/// Run `spec` with one thread per connection until `spec.duration` has passed.
pub fn run(spec: &LoadSpec) -> LoadResult {
    run_until(spec, |started| started.elapsed() >= spec.duration)
}

/// Run until `done(started)` says so (checked every 20 ms).
pub fn run_until(spec: &LoadSpec, mut done: impl FnMut(Instant) -> bool) -> LoadResult {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let handles: Vec<_> = (0..spec.connections)
        .map(|i| {
            let (spec, stop) = (spec.clone(), Arc::clone(&stop));
            std::thread::spawn(move || worker(spec, i, stop))
        })
        .collect();
    while !done(started) {
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = LoadResult::default();
    for h in handles {
        if let Ok(r) = h.join() {
            total.merge(r);
        }
    }
    total.elapsed = started.elapsed();
    total
}
