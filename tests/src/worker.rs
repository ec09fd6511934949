//! A stand-in worker: a threaded TCP server on one port that greets every
//! connection with `worker <port>\n`, then echoes each line it receives
//! (except `?who`, answered with the greeting again).
//! Dropping it closes the listener and every open connection.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Start of the greeting line; the port follows.
pub const GREETING_PREFIX: &str = "worker ";

/// A line the worker answers with its greeting again instead of echoing it:
/// which worker holds this connection *now*.
pub const WHO_ARE_YOU: &str = "?who";

pub struct Worker {
    port: u16,
    address: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    open: Arc<Mutex<HashMap<u64, TcpStream>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl Worker {
    /// Listen on 127.0.0.1:`port` (where both backends deliver on `lo`).
    pub fn start(port: u16) -> io::Result<Worker> {
        Worker::start_on(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
    }

    /// Listen on `address` (e.g. `[::1]:port`, or `0.0.0.0:port`).
    pub fn start_on(address: SocketAddr) -> io::Result<Worker> {
        let listener = TcpListener::bind(address)?;
        let port = listener.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let open = Arc::new(Mutex::new(HashMap::new()));
        let acceptor = {
            let (stop, accepted, open) = (stop.clone(), accepted.clone(), open.clone());
            std::thread::Builder::new()
                .name(format!("worker-{port}"))
                .spawn(move || accept_loop(listener, port, &stop, &accepted, &open))?
        };
        Ok(Worker {
            port,
            address: SocketAddr::new(address.ip(), port),
            stop,
            accepted,
            open,
            acceptor: Some(acceptor),
        })
    }

    /// Start one worker per port.
    pub fn start_all(ports: &[u16]) -> io::Result<Vec<Worker>> {
        ports.iter().map(|&p| Worker::start(p)).collect()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Connections open right now.
    pub fn open_connections(&self) -> usize {
        self.open.lock().map_or(0, |open| open.len())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the blocking accept(); failure means it is gone already.
        let wake = match self.address.ip() {
            ip if ip.is_unspecified() => {
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), self.port)
            }
            _ => self.address,
        };
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        if let Ok(open) = self.open.lock() {
            for stream in open.values() {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    port: u16,
    stop: &AtomicBool,
    accepted: &AtomicU64,
    open: &Arc<Mutex<HashMap<u64, TcpStream>>>,
) {
    for stream in listener.incoming() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let id = accepted.fetch_add(1, Ordering::Relaxed);
        // Kept so that dropping the worker can shut the connection down.
        if let (Ok(mut open), Ok(clone)) = (open.lock(), stream.try_clone()) {
            open.insert(id, clone);
        }
        // Connection threads end when the peer closes or the worker is dropped.
        let open = open.clone();
        let _ = std::thread::Builder::new()
            .name(format!("worker-{port}-conn"))
            .spawn(move || {
                let _ = serve(stream, port);
                if let Ok(mut open) = open.lock() {
                    open.remove(&id);
                }
            });
    }
}

fn serve(mut stream: TcpStream, port: u16) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.write_all(format!("{GREETING_PREFIX}{port}\n").as_bytes())?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if line.trim_end() == WHO_ARE_YOU {
            stream.write_all(format!("{GREETING_PREFIX}{port}\n").as_bytes())?;
        } else {
            stream.write_all(line.as_bytes())?;
        }
    }
}
