//! Hand-made TCP segments sent through a raw IPv4 socket: what an attacker
//! (or a confused middlebox) can put on the wire, e.g. a SYN that reuses the
//! addresses and ports of someone else's established connection. The kernel
//! adds the IP header; the segment carries a correct checksum.

use std::io;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;

fn sum16(data: &[u8], mut sum: u32) -> u32 {
    for chunk in data.chunks(2) {
        let hi = u32::from(chunk[0]) << 8;
        let lo = chunk.get(1).map_or(0, |b| u32::from(*b));
        sum += hi | lo;
    }
    sum
}

/// A 20-byte TCP header from `src` to `dst` with `flags` and `seq`, checksum
/// included (IPv4 pseudo-header).
pub fn tcp_segment(src: SocketAddrV4, dst: SocketAddrV4, flags: u8, seq: u32) -> Vec<u8> {
    let mut seg = Vec::with_capacity(20);
    seg.extend_from_slice(&src.port().to_be_bytes());
    seg.extend_from_slice(&dst.port().to_be_bytes());
    seg.extend_from_slice(&seq.to_be_bytes());
    seg.extend_from_slice(&0u32.to_be_bytes());
    seg.push(5 << 4);
    seg.push(flags);
    seg.extend_from_slice(&65535u16.to_be_bytes());
    seg.extend_from_slice(&[0, 0, 0, 0]);
    let mut sum = sum16(&src.ip().octets(), 0);
    sum = sum16(&dst.ip().octets(), sum);
    sum += 6 + seg.len() as u32;
    sum = sum16(&seg, sum);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let check = !(sum as u16);
    seg[16..18].copy_from_slice(&check.to_be_bytes());
    seg
}

/// Send one TCP segment from `src` (an address of this host, any port) to
/// `dst` through a raw socket bound to `src`'s address.
pub fn send_tcp(src: SocketAddr, dst: SocketAddr, flags: u8, seq: u32) -> io::Result<()> {
    let (SocketAddr::V4(src), SocketAddr::V4(dst)) = (src, dst) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("raw segments are IPv4 only ({src} -> {dst})"),
        ));
    };
    let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP))?;
    socket.bind(&SockAddr::from(SocketAddr::new(IpAddr::V4(*src.ip()), 0)))?;
    let segment = tcp_segment(src, dst, flags, seq);
    let sent = socket.send_to(&segment, &SockAddr::from(SocketAddr::V4(dst)))?;
    if sent == segment.len() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "sent {sent} of {} bytes",
            segment.len()
        )))
    }
}
