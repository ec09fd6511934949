//! Names and ports that are unique per test, also across test processes that
//! run at the same time (other engineers' suites, CI jobs on one host).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicU32, Ordering};

/// First and last port handed out. Below the kernel's ephemeral range
/// (32768–60999) and the master's default worker range (20000–29999).
pub const PORT_FIRST: u16 = 10_000;
pub const PORT_LAST: u16 = 19_999;

static NEXT_NAME: AtomicU32 = AtomicU32::new(0);
static NEXT_PORT: AtomicU32 = AtomicU32::new(0);

/// A cluster name unique to this process and call: `t<pid>-<n>-<prefix>`,
/// within the CLI's rules (letters, digits, '-', '_'; at most 64 characters).
pub fn cluster_name(prefix: &str) -> String {
    let n = NEXT_NAME.fetch_add(1, Ordering::Relaxed);
    let clean: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    format!("t{}-{n}-{clean}", std::process::id())
}

/// TCP ports reserved for one test. Each port is checked free for TCP on
/// 0.0.0.0 and [::] and held by a UDP socket on the same number until this value
/// is dropped: the UDP binding is the reservation other test processes respect
/// (they use this module too), so a public port that nobody listens on
/// cannot be handed to two tests at once.
pub struct Ports {
    ports: Vec<u16>,
    _reservations: Vec<UdpSocket>,
}

impl Ports {
    /// Reserve `count` ports. Panics when the range is exhausted.
    pub fn reserve(count: usize) -> Ports {
        let span = u32::from(PORT_LAST - PORT_FIRST) + 1;
        // Processes start at different offsets, then walk the range.
        let start = (std::process::id().wrapping_mul(7919)) % span;
        let mut ports = Vec::with_capacity(count);
        let mut reservations = Vec::with_capacity(count);
        let mut tried = 0;
        while ports.len() < count {
            assert!(
                tried < span,
                "no {count} free ports left in {PORT_FIRST}-{PORT_LAST}"
            );
            tried += 1;
            let step = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
            let port = PORT_FIRST + ((start + step) % span) as u16;
            if let Some(reservation) = try_reserve(port) {
                ports.push(port);
                reservations.push(reservation);
            }
        }
        Ports {
            ports,
            _reservations: reservations,
        }
    }

    /// The reserved ports, in order.
    pub fn all(&self) -> &[u16] {
        &self.ports
    }

    /// The `i`-th reserved port.
    pub fn get(&self, i: usize) -> u16 {
        self.ports[i]
    }

    /// Split off ports `range` as a plain vector (e.g. one worker port per band).
    pub fn slice(&self, range: std::ops::Range<usize>) -> Vec<u16> {
        self.ports[range].to_vec()
    }
}

fn try_reserve(port: u16) -> Option<UdpSocket> {
    let udp = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))).ok()?;
    // Free for TCP too: nobody listens on it or is bound to it right now.
    TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))).ok()?;
    // [::] may be unavailable (IPv6 disabled): then only IPv4 is checked.
    if let Err(e) = TcpListener::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))
        && e.kind() == std::io::ErrorKind::AddrInUse
    {
        return None;
    }
    Some(udp)
}
