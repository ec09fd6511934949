//! The built-in demo worker (`ipcluster run` without `CMD`): a small HTTP
//! server on `$PORT` (and every `IPCLUSTER_PORT_*`). `/` answers with its
//! band, pid, generation, port and the client's address; `/stream` sends one
//! such line every 100 ms until the client goes away. It speaks the control
//! protocol through [`crate::worker_api`], as any Rust worker would: hello once
//! it listens, a ping every 500 ms with its request counts, a note on stderr
//! when it is retired, and it exits on `die`.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use crate::protocol::{MasterMessage, env};
use crate::worker_api::{Worker, WorkerApiError, WorkerEnv};

/// Who this worker is, from the environment the master gave it.
#[derive(Clone, Debug)]
struct Identity {
    band: u32,
    generation: u64,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    open_streams: AtomicU64,
    retired: AtomicBool,
}

/// How long to wait before trying again to reach a master that is not there.
const HELLO_RETRY: Duration = Duration::from_secs(1);

/// Run the demo worker until it is killed or told to die.
pub fn run() -> Result<()> {
    let worker_env =
        WorkerEnv::from_env().context("the demo worker is started by `ipcluster run`")?;
    let Some(port) = worker_env.port else {
        bail!(
            "{} is not set: the demo worker is started by `ipcluster run`",
            env::PORT
        );
    };
    // `$PORT` first, then the other public ports' local ports.
    let mut ports = vec![port];
    for local in worker_env.local_ports() {
        if !ports.contains(&local) {
            ports.push(local);
        }
    }
    let identity = Arc::new(Identity {
        band: worker_env.band,
        generation: worker_env.generation,
    });
    let counters = Arc::new(Counters::default());
    let mut acceptors = Vec::new();
    for &port in &ports {
        let listener = bind_everywhere(port)?;
        let (identity, counters) = (identity.clone(), counters.clone());
        acceptors.push(
            std::thread::Builder::new()
                .name(format!("accept-{port}"))
                .spawn(move || accept_loop(&listener, &identity, &counters))
                .context("starting an accept thread")?,
        );
    }
    let worker = Worker::new(worker_env);
    let stats = counters.clone();
    worker.set_stats_fn(move || {
        serde_json::json!({
            "requests": stats.requests.load(Ordering::Relaxed),
            "open_streams": stats.open_streams.load(Ordering::Relaxed),
            "retired": stats.retired.load(Ordering::Relaxed),
        })
    });
    worker.set_app(
        serde_json::json!({ "name": "ipcluster demo", "version": env!("CARGO_PKG_VERSION") }),
    );
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || control(&worker, &counters))
        .context("starting the control thread")?;
    for acceptor in acceptors {
        let _ = acceptor.join();
    }
    Ok(())
}

/// Say hello (retrying until a master answers; `worker_api` reconnects by
/// itself after that), then obey what the master says.
fn control(worker: &Worker, counters: &Counters) {
    let messages = loop {
        match worker.hello() {
            Ok(messages) => break messages,
            Err(e @ (WorkerApiError::Connect { .. } | WorkerApiError::Send { .. })) => {
                log::debug!("demo worker: {e}; trying again in {HELLO_RETRY:?}");
                std::thread::sleep(HELLO_RETRY);
            }
            // It keeps serving, unsupervised by the control socket.
            Err(e) => {
                log::warn!("demo worker: {e}");
                return;
            }
        }
    };
    for message in messages {
        match message {
            MasterMessage::Die { reason } => {
                say_line(&format!(
                    "demo worker {}: told to die ({reason})",
                    std::process::id()
                ));
                std::process::exit(0);
            }
            MasterMessage::Retire { reason } => {
                say_line(&format!(
                    "demo worker {}: retired ({reason})",
                    std::process::id()
                ));
                counters.retired.store(true, Ordering::Relaxed);
            }
            MasterMessage::Info { .. } => {}
        }
    }
}

/// Listen on every address: `[::]` (dual-stack) if IPv6 is there, else 0.0.0.0.
fn bind_everywhere(port: u16) -> Result<TcpListener> {
    TcpListener::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))
        .or_else(|_| TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))))
        .with_context(|| format!("demo worker: cannot listen on port {port}"))
}

fn accept_loop(listener: &TcpListener, identity: &Arc<Identity>, counters: &Arc<Counters>) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let (identity, counters) = (identity.clone(), counters.clone());
        let _ = std::thread::Builder::new()
            .name("conn".into())
            .spawn(move || {
                let _ = serve(stream, &identity, &counters);
            });
    }
}

fn describe(identity: &Identity, stream: &TcpStream) -> String {
    let client = stream.peer_addr().map_or("unknown".into(), |a| {
        SocketAddr::new(a.ip().to_canonical(), a.port()).to_string()
    });
    let port = stream.local_addr().map_or(0, |a| a.port());
    format!(
        "band={} pid={} generation={} port={} client={}",
        identity.band,
        std::process::id(),
        identity.generation,
        port,
        client
    )
}

fn serve(mut stream: TcpStream, identity: &Identity, counters: &Counters) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?.take(16 * 1024));
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Skip the headers.
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
    }
    counters.requests.fetch_add(1, Ordering::Relaxed);
    let path = request_line.split_whitespace().nth(1).unwrap_or("/");
    let about = describe(identity, &stream);
    match path {
        "/" => {
            let body = format!("{about}\n");
            write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        }
        "/stream" => {
            stream.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n",
            )?;
            counters.open_streams.fetch_add(1, Ordering::Relaxed);
            let result = (0u64..).try_for_each(|seq| {
                stream.write_all(format!("{about} seq={seq}\n").as_bytes())?;
                std::thread::sleep(Duration::from_millis(100));
                Ok(())
            });
            counters.open_streams.fetch_sub(1, Ordering::Relaxed);
            result
        }
        _ => stream.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\nConnection: close\r\n\r\nnot found\n",
        ),
    }
}

/// One line on stderr in one write (`eprintln!` writes it in pieces, which
/// interleave with the other workers' lines in a shared log).
fn say_line(line: &str) {
    use std::io::Write as _;
    let _ = std::io::stderr()
        .lock()
        .write_all(format!("{line}\n").as_bytes());
}
