//! The built-in demo worker (`ipcluster run` without `CMD`): a small HTTP
//! server on `$PORT` (and every `IPCLUSTER_PORT_*`). `/` answers with its
//! band, pid, generation, port and the client's address; `/stream` sends one
//! such line every 100 ms until the client goes away. It also speaks the
//! control protocol: hello, a ping every 500 ms, and it exits on `die`.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use crate::protocol::{MasterMessage, WorkerMessage};

/// Who this worker is, from the environment the master gave it.
#[derive(Clone, Debug)]
struct Identity {
    band: u32,
    generation: u64,
    ports: Vec<u16>,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    open_streams: AtomicU64,
    retired: AtomicBool,
}

fn env_number<T: std::str::FromStr>(key: &str) -> Option<T> {
    std::env::var(key).ok()?.parse().ok()
}

/// Run the demo worker until it is killed or told to die.
pub fn run() -> Result<()> {
    let Some(port) = env_number::<u16>("PORT") else {
        bail!("PORT is not set: the demo worker is started by `ipcluster run`");
    };
    let mut ports = vec![port];
    for (key, value) in std::env::vars() {
        if key.starts_with("IPCLUSTER_PORT_")
            && let Ok(p) = value.parse::<u16>()
            && !ports.contains(&p)
        {
            ports.push(p);
        }
    }
    let identity = Arc::new(Identity {
        band: env_number("IPCLUSTER_BAND").unwrap_or(0),
        generation: env_number("IPCLUSTER_GENERATION").unwrap_or(0),
        ports: ports.clone(),
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
    if let Ok(control) = std::env::var("IPCLUSTER_CONTROL") {
        let (identity, counters) = (identity.clone(), counters.clone());
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || control_loop(&control, &identity, &counters))
            .context("starting the control thread")?;
    }
    for acceptor in acceptors {
        let _ = acceptor.join();
    }
    Ok(())
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

/// Say hello, ping every 500 ms, obey `die`; reconnect when the master changes.
fn control_loop(path: &str, identity: &Identity, counters: &Arc<Counters>) {
    loop {
        if let Err(e) = control_session(path, identity, counters) {
            log::debug!("demo worker: control socket {path}: {e}");
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn control_session(
    path: &str,
    identity: &Identity,
    counters: &Arc<Counters>,
) -> std::io::Result<()> {
    let mut stream = UnixStream::connect(path)?;
    let send = |stream: &mut UnixStream, msg: &WorkerMessage| -> std::io::Result<()> {
        let mut line = serde_json::to_string(msg).map_err(std::io::Error::other)?;
        line.push('\n');
        stream.write_all(line.as_bytes())
    };
    send(
        &mut stream,
        &WorkerMessage::Hello {
            band: identity.band,
            generation: identity.generation,
            ports: identity.ports.clone(),
        },
    )?;
    let reader = BufReader::new(stream.try_clone()?);
    let flags = counters.clone();
    let listener = std::thread::Builder::new()
        .name("control-read".into())
        .spawn(move || {
            for line in reader.lines() {
                let Ok(line) = line else { return };
                match serde_json::from_str::<MasterMessage>(&line) {
                    Ok(MasterMessage::Die { reason }) => {
                        say_line(&format!(
                            "demo worker {}: told to die ({reason})",
                            std::process::id()
                        ));
                        std::process::exit(0);
                    }
                    Ok(MasterMessage::Retire { reason }) => {
                        say_line(&format!(
                            "demo worker {}: retired ({reason})",
                            std::process::id()
                        ));
                        flags.retired.store(true, Ordering::Relaxed);
                    }
                    Ok(MasterMessage::Info { .. }) | Err(_) => {}
                }
            }
        })?;
    loop {
        if listener.is_finished() {
            return Ok(());
        }
        let retired = counters.retired.load(Ordering::Relaxed);
        send(
            &mut stream,
            &WorkerMessage::Ping {
                stats: serde_json::json!({
                    "requests": counters.requests.load(Ordering::Relaxed),
                    "open_streams": counters.open_streams.load(Ordering::Relaxed),
                    "retired": retired,
                }),
                busy: false,
                app: serde_json::json!({ "name": "ipcluster demo", "version": env!("CARGO_PKG_VERSION") }),
            },
        )?;
        std::thread::sleep(Duration::from_millis(500));
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
