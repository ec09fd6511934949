//! An ipcluster-aware HTTP worker, built on `ipcluster::worker_api`. It serves:
//!
//! - `/`: its band, pid, generation and the client address (one JSON line);
//! - `/alloc?mb=N`: allocates and touches N MiB and keeps them (to push its RSS
//!   over `--worker-rss-limit`);
//! - `/busy?on=1` (or `on=0`): reports itself too busy in its pings;
//! - `/silence` (or `?on=0`): stops (resumes) pinging, like a hung worker;
//! - `/retire?reason=R`: asks the master to retire it;
//! - `/stream` (or `?n=N`): a line every 100 ms, for long-lived connections.
//!
//! Run it under ipcluster:
//! `cargo build --example aware_worker && ipcluster run -- target/debug/examples/aware_worker`.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use ipcluster::{protocol::MasterMessage, worker_api::Worker};
use serde_json::json;

/// What every connection thread shares.
struct App {
    worker: Worker,
    requests: AtomicU64,
    /// Memory kept by `/alloc`, so that it stays resident.
    allocated: Mutex<Vec<Vec<u8>>>,
}

impl App {
    fn allocated_mib(&self) -> usize {
        let kept = self
            .allocated
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        kept.iter().map(Vec::len).sum::<usize>() >> 20
    }
}

/// One line on stderr in one write: the workers of a cluster share the
/// master's log file, and `eprintln!` writes a line in pieces, which
/// interleave with the other workers' lines.
macro_rules! say {
    ($($arg:tt)*) => {{
        let line = format!("{}\n", format_args!($($arg)*));
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    }};
}

fn main() -> ExitCode {
    let worker = match Worker::from_env() {
        Ok(worker) => worker,
        Err(e) => {
            say!("aware_worker: {e}");
            return ExitCode::from(2);
        }
    };
    let ports = worker.env().local_ports();
    if ports.is_empty() {
        say!("aware_worker: neither PORT nor IPCLUSTER_PORT_<public> is set");
        return ExitCode::from(2);
    }
    let app = Arc::new(App {
        worker: worker.clone(),
        requests: AtomicU64::new(0),
        allocated: Mutex::new(Vec::new()),
    });
    for port in ports {
        let listener = match bind(port) {
            Ok(listener) => listener,
            Err(e) => {
                say!("aware_worker: cannot listen on port {port}: {e}");
                return ExitCode::from(1);
            }
        };
        let app = Arc::clone(&app);
        thread::spawn(move || accept_loop(&listener, &app));
    }
    let stats_app = Arc::clone(&app);
    worker.set_stats_fn(move || {
        json!({
            "requests": stats_app.requests.load(Ordering::Relaxed),
            "allocated_mib": stats_app.allocated_mib(),
        })
    });
    worker.set_app(json!({ "name": "aware_worker", "version": env!("CARGO_PKG_VERSION") }));

    // The master may be restarting (a reload): keep serving and try again.
    let messages = loop {
        match worker.hello() {
            Ok(messages) => break messages,
            Err(e) => {
                say!("aware_worker: {e}; trying again in 1s");
                thread::sleep(Duration::from_secs(1));
            }
        }
    };
    let pid = std::process::id();
    for message in messages {
        match message {
            MasterMessage::Info { name, workers, .. } => {
                say!("aware_worker {pid}: cluster {name}, {workers} workers");
            }
            MasterMessage::Retire { reason } => {
                say!("aware_worker {pid}: retired ({reason}); serving the current clients");
            }
            MasterMessage::Die { reason } => {
                // Stop accepting and leave; SIGKILL would follow after the soft-kill timeout.
                say!("aware_worker {pid}: asked to die ({reason}); exiting");
                return ExitCode::SUCCESS;
            }
        }
    }
    ExitCode::SUCCESS
}

/// Listen on every address (IPv6 and IPv4 when the host allows), so steered
/// connections reach the worker whatever public address they were sent to.
fn bind(port: u16) -> std::io::Result<TcpListener> {
    TcpListener::bind(SocketAddr::from(([0u16; 8], port)))
        .or_else(|_| TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))))
}

fn accept_loop(listener: &TcpListener, app: &Arc<App>) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let app = Arc::clone(app);
        thread::spawn(move || {
            if let Err(e) = serve(stream, &app) {
                say!("aware_worker: connection: {e}");
            }
        });
    }
}

/// Serve one request and close the connection.
fn serve(stream: TcpStream, app: &App) -> std::io::Result<()> {
    let client = stream
        .peer_addr()
        .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()).to_string())
        .unwrap_or_default();
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut header = String::new();
    while reader.read_line(&mut header)? > 2 {
        header.clear();
    }
    app.requests.fetch_add(1, Ordering::Relaxed);
    let target = request_line.split_whitespace().nth(1).unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let param = |name: &str| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_owned())
    };
    let worker = &app.worker;
    let mut out = stream;
    let body = match path {
        "/" => json!({
            "band": worker.band(),
            "pid": std::process::id(),
            "generation": worker.generation(),
            "client": client,
            "retired": worker.is_retired(),
        }),
        "/alloc" => {
            let mb: usize = param("mb").and_then(|v| v.parse().ok()).unwrap_or(0);
            let mut block = vec![0u8; mb << 20];
            // Touch every page, or the kernel never makes it resident.
            for page in block.chunks_mut(4096) {
                page[0] = 1;
            }
            app.allocated
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(block);
            json!({ "allocated_mib": app.allocated_mib() })
        }
        "/busy" => {
            let on = param("on").is_none_or(|v| v != "0");
            worker.set_busy(on);
            json!({ "busy": on })
        }
        "/silence" => {
            let on = param("on").is_none_or(|v| v != "0");
            worker.pause_pings(on);
            json!({ "silent": on })
        }
        "/retire" => {
            let reason = param("reason").unwrap_or_else(|| "asked over HTTP".to_owned());
            let sent = worker.request_retire(reason).is_ok();
            json!({ "retire_requested": sent })
        }
        "/stream" => {
            return stream_lines(&mut out, worker, param("n").and_then(|n| n.parse().ok()));
        }
        _ => return respond(&mut out, "404 Not Found", "not found\n"),
    };
    respond(&mut out, "200 OK", &format!("{body}\n"))
}

fn respond(out: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    let content_type = if body.starts_with('{') {
        "application/json"
    } else {
        "text/plain"
    };
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
}

/// A line every 100 ms until the client leaves (or `limit` lines).
fn stream_lines(out: &mut TcpStream, worker: &Worker, limit: Option<u64>) -> std::io::Result<()> {
    write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
    )?;
    let pid = std::process::id();
    let mut tick = 0u64;
    while limit.is_none_or(|n| tick < n) {
        writeln!(
            out,
            "tick={tick} band={} pid={pid} generation={}",
            worker.band(),
            worker.generation()
        )?;
        out.flush()?;
        tick += 1;
        thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}
