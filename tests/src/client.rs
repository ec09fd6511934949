//! TCP clients that bind a chosen source address (port 0) before connecting,
//! so that one host can play many client hosts (127.0.0.N all route to `lo`).
//! Every operation has a timeout: a steering bug shows up as an error, never
//! as a hung test.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Connect and read/write timeout of the helpers.
pub const TIMEOUT: Duration = Duration::from_secs(3);

/// Open a TCP connection from `source` (any free port) to `target`.
pub fn connect_from(source: IpAddr, target: SocketAddr) -> io::Result<TcpStream> {
    let domain = match target {
        SocketAddr::V4(_) => Domain::IPV4,
        SocketAddr::V6(_) => Domain::IPV6,
    };
    let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    socket.bind(&SockAddr::from(SocketAddr::new(source, 0)))?;
    socket.connect_timeout(&SockAddr::from(target), TIMEOUT)?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Connect from `source` to `target`, read the worker's greeting and return
/// the port the worker says it listens on (see [`crate::worker`]).
pub fn worker_port_from(source: IpAddr, target: SocketAddr) -> io::Result<u16> {
    Ok(Conversation::open(source, target)?.worker_port())
}

/// A long-lived connection to a [`crate::worker::Worker`]: remembers which
/// worker answered and exchanges echo lines, failing on any reset or timeout.
pub struct Conversation {
    source: IpAddr,
    worker_port: u16,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conversation {
    /// Connect from `source` to `target` and read the greeting.
    pub fn open(source: IpAddr, target: SocketAddr) -> io::Result<Conversation> {
        let writer = connect_from(source, target)?;
        let mut reader = BufReader::new(writer.try_clone()?);
        let greeting = read_line(&mut reader)?;
        let worker_port = parse_greeting(&greeting)?;
        Ok(Conversation {
            source,
            worker_port,
            reader,
            writer,
        })
    }

    /// The client address this connection was opened from.
    pub fn source(&self) -> IpAddr {
        self.source
    }

    /// The client's own end of the connection (address and port).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.writer.local_addr()
    }

    /// The port of the worker that answered (from its greeting).
    pub fn worker_port(&self) -> u16 {
        self.worker_port
    }

    /// Ask the worker at the other end which port it serves, now (not the
    /// greeting remembered from the start of the connection).
    pub fn current_worker_port(&mut self) -> io::Result<u16> {
        self.writer
            .write_all(format!("{}\n", crate::worker::WHO_ARE_YOU).as_bytes())?;
        parse_greeting(&read_line(&mut self.reader)?)
    }

    /// Send `line` and expect the worker to echo it back.
    pub fn echo(&mut self, line: &str) -> io::Result<()> {
        self.writer.write_all(format!("{line}\n").as_bytes())?;
        let back = read_line(&mut self.reader)?;
        if back == line {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("sent {line:?}, the worker echoed {back:?}"),
            ))
        }
    }
}

/// One line without its newline; end of stream is an error (`UnexpectedEof`).
fn read_line(reader: &mut impl BufRead) -> io::Result<String> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the peer closed the connection",
        ));
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

fn parse_greeting(greeting: &str) -> io::Result<u16> {
    greeting
        .strip_prefix(crate::worker::GREETING_PREFIX)
        .and_then(|port| port.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected greeting {greeting:?}"),
            )
        })
}
