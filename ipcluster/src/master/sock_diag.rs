//! TCP sockets in chosen states through `NETLINK_SOCK_DIAG`. The kernel
//! filters by state, so a host with tens of thousands of TIME_WAIT sockets
//! (every reload under load makes them) costs almost nothing, where
//! formatting and parsing /proc/net/tcp6 would take the master's whole CPU.
//!
//! The request, the framing and the replies go through the netlink crates
//! (`netlink-packet-sock-diag` on `netlink-packet-core`, over a
//! `netlink-sys` socket). Only the port filter is ours: the crate's
//! `InetRequest` has no attributes, so the inet_diag bytecode
//! ([`local_port_filter`]) is appended to the request it serialized as one
//! `INET_DIAG_REQ_BYTECODE` attribute, and the message length updated.

use std::io;

use netlink_packet_core::{
    DefaultNla, Emitable as _, NLM_F_DUMP, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader,
    NetlinkMessage, NetlinkPayload, Parseable as _,
};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP, SOCK_DIAG_BY_FAMILY};
pub use netlink_packet_sock_diag::constants::{TCP_ESTABLISHED, TCP_LISTEN};
use netlink_packet_sock_diag::inet::{
    ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags,
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

use super::process_tree::TcpSocket;

/// `INET_DIAG_REQ_BYTECODE`: the filter attribute of a dump request.
const INET_DIAG_REQ_BYTECODE: u16 = 1;
/// Filter operations (`enum inet_diag_bc_op_code`); the port of a comparison
/// is the `no` field of the operation that follows it.
const INET_DIAG_BC_JMP: u8 = 1;
const INET_DIAG_BC_S_GE: u8 = 2;
const INET_DIAG_BC_S_LE: u8 = 3;
const INET_DIAG_BC_S_EQ: u8 = 11;
/// A comparison: one `struct inet_diag_bc_op` (code, yes, no) and its port operand.
const BC_CMP_LEN: usize = 8;
/// A jump: one `struct inet_diag_bc_op`.
const BC_JMP_LEN: usize = 4;
/// Receive buffer for one datagram of the dump.
const RECV_BUFFER: usize = 64 * 1024;

/// Every IPv4 and IPv6 TCP socket whose state is in `states` (TCP_* values).
pub fn tcp_sockets(states: &[u8]) -> io::Result<Vec<TcpSocket>> {
    tcp_sockets_filtered(states, &[])
}

/// The IPv4 and IPv6 TCP sockets whose state is in `states` and whose local
/// port is one of `ports` (every port when `ports` is empty). The kernel
/// applies the port filter (inet_diag bytecode): the sockets of the rest of
/// the host, and the client ends of connections to the cluster, are never
/// copied out.
pub fn tcp_sockets_filtered(states: &[u8], ports: &[u16]) -> io::Result<Vec<TcpSocket>> {
    let mask = states.iter().fold(0u32, |m, &s| m | (1 << s));
    let filter = local_port_filter(ports);
    let mut sockets = dump(AF_INET, mask, &filter)?;
    // IPv6 may be disabled: then there is nothing to list.
    match dump(AF_INET6, mask, &filter) {
        Ok(v6) => sockets.extend(v6),
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {}
        Err(e) => return Err(e),
    }
    Ok(sockets)
}

/// Inet_diag bytecode accepting a socket whose local port is in `ports`;
/// empty when `ports` is empty (no filter). Consecutive ports become one range
/// (`S_GE lo`, `S_LE hi`), a lone port one `S_EQ`; each block ends with a
/// `JMP` to the end of the program (accept), which a failed test skips to
/// reach the next block; after the last block a `JMP` 4 bytes past the end
/// rejects. Every `yes` is the length of its operation (the kernel's audit
/// walks the program that way, and `yes` is one byte), long jumps use `no`.
pub fn local_port_filter(ports: &[u16]) -> Vec<u8> {
    let mut sorted = ports.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut ranges: Vec<(u16, u16)> = Vec::new();
    for port in sorted {
        match ranges.last_mut() {
            Some((_, hi)) if u32::from(*hi) + 1 == u32::from(port) => *hi = port,
            _ => ranges.push((port, port)),
        }
    }
    if ranges.is_empty() {
        return Vec::new();
    }
    let block_len = |&(lo, hi): &(u16, u16)| -> usize {
        if lo == hi {
            BC_CMP_LEN + BC_JMP_LEN
        } else {
            2 * BC_CMP_LEN + BC_JMP_LEN
        }
    };
    let total = ranges.iter().map(block_len).sum::<usize>() + BC_JMP_LEN;
    // Jump offsets are u16: a longer program cannot be written; then nothing
    // is filtered in the kernel (the caller matches ports anyway).
    if u16::try_from(total + 4).is_err() {
        return Vec::new();
    }
    let mut code = Vec::with_capacity(total);
    for range in &ranges {
        let (lo, hi) = *range;
        if lo == hi {
            compare(&mut code, INET_DIAG_BC_S_EQ, BC_CMP_LEN + BC_JMP_LEN, lo);
        } else {
            compare(
                &mut code,
                INET_DIAG_BC_S_GE,
                2 * BC_CMP_LEN + BC_JMP_LEN,
                lo,
            );
            compare(&mut code, INET_DIAG_BC_S_LE, BC_CMP_LEN + BC_JMP_LEN, hi);
        }
        let to_end = total - code.len();
        jump(&mut code, to_end);
    }
    // Past the end: reject.
    jump(&mut code, BC_JMP_LEN + 4);
    code
}

/// `struct inet_diag_bc_op` and its port operand: true goes on to the next
/// operation, false jumps `miss` bytes.
fn compare(code: &mut Vec<u8>, kind: u8, miss: usize, port: u16) {
    code.extend_from_slice(&[kind, BC_CMP_LEN as u8]);
    code.extend_from_slice(&u16::try_from(miss).unwrap_or(u16::MAX).to_ne_bytes());
    code.extend_from_slice(&[0, 0]);
    code.extend_from_slice(&port.to_ne_bytes());
}

/// An unconditional jump of `by` bytes.
fn jump(code: &mut Vec<u8>, by: usize) {
    code.extend_from_slice(&[INET_DIAG_BC_JMP, BC_JMP_LEN as u8]);
    code.extend_from_slice(&u16::try_from(by).unwrap_or(u16::MAX).to_ne_bytes());
}

/// The dump request for `family`: the crate's `InetRequest` in a netlink
/// message, then `filter` (when not empty) as an `INET_DIAG_REQ_BYTECODE`
/// attribute.
fn request(family: u8, state_mask: u32, filter: &[u8]) -> io::Result<Vec<u8>> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = 1;
    let socket_id = if family == AF_INET6 {
        SocketId::new_v6()
    } else {
        SocketId::new_v4()
    };
    let mut message = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::from_bits_retain(state_mask),
            socket_id,
        })
        .into(),
    );
    message.finalize();
    let mut bytes = vec![0u8; message.buffer_len()];
    message.serialize(&mut bytes);
    if !filter.is_empty() {
        let attribute = DefaultNla::new(INET_DIAG_REQ_BYTECODE, filter.to_vec());
        let len = bytes.len() + attribute.buffer_len();
        // An attribute's length is a u16 (local_port_filter stays below it).
        let len = u32::try_from(len)
            .ok()
            .filter(|_| u16::try_from(filter.len() + 4).is_ok())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("sock_diag filter of {} bytes is too long", filter.len()),
                )
            })?;
        let at = bytes.len();
        bytes.resize(at + attribute.buffer_len(), 0);
        attribute.emit(&mut bytes[at..]);
        NetlinkBuffer::new(&mut bytes).set_length(len);
    }
    Ok(bytes)
}

fn dump(family: u8, state_mask: u32, filter: &[u8]) -> io::Result<Vec<TcpSocket>> {
    let socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.connect(&SocketAddr::new(0, 0))?;
    socket.send(&request(family, state_mask, filter)?, 0)?;

    let mut sockets = Vec::new();
    let mut buf: Vec<u8> = Vec::with_capacity(RECV_BUFFER);
    loop {
        buf.clear();
        let n = match socket.recv(&mut buf, 0) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(sockets);
        }
        if n > buf.len() {
            return Err(io::Error::other(format!(
                "sock_diag datagram of {n} bytes does not fit the {RECV_BUFFER}-byte buffer"
            )));
        }
        match parse(&buf, &mut sockets)? {
            Parsed::Done => return Ok(sockets),
            Parsed::More => {}
        }
    }
}

enum Parsed {
    More,
    Done,
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("malformed sock_diag reply: {e}"),
    )
}

/// Parse one datagram of netlink messages, appending sockets. A socket's
/// message is read with the crate's `InetResponseHeader` (the fixed
/// `inet_diag_msg`): the attributes the kernel appends to it are not used,
/// and parsing them would allocate a list per socket. Every other message
/// (done, error) goes through the crate's full `NetlinkMessage` parser.
fn parse(mut data: &[u8], sockets: &mut Vec<TcpSocket>) -> io::Result<Parsed> {
    while !data.is_empty() {
        let message = NetlinkBuffer::new_checked(data).map_err(invalid)?;
        let len = usize::try_from(message.length()).map_err(invalid)?;
        if message.message_type() == SOCK_DIAG_BY_FAMILY {
            let socket = InetResponseHeader::parse(message.payload()).map_err(invalid)?;
            sockets.push(TcpSocket {
                local_port: socket.socket_id.source_port,
                listening: socket.state == TCP_LISTEN,
                established: socket.state == TCP_ESTABLISHED,
                inode: u64::from(socket.inode),
            });
        } else {
            let whole = data.get(..len).unwrap_or(data);
            match NetlinkMessage::<SockDiagMessage>::deserialize(whole)
                .map_err(invalid)?
                .payload
            {
                NetlinkPayload::Done(_) => return Ok(Parsed::Done),
                NetlinkPayload::Error(e) if e.code.is_none() => return Ok(Parsed::Done),
                NetlinkPayload::Error(e) => return Err(e.to_io()),
                _ => {}
            }
        }
        data = data.get(len.next_multiple_of(4)..).unwrap_or(&[]);
    }
    Ok(Parsed::More)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn u16_ne(b: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes([b[at], b[at + 1]])
    }

    #[test]
    fn finds_our_own_listening_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let port = listener.local_addr().expect("addr").port();
        let sockets = tcp_sockets(&[TCP_LISTEN]).expect("sock_diag dump");
        assert!(
            sockets
                .iter()
                .any(|s| s.local_port == port && s.listening && s.inode != 0),
            "port {port} not among {} listening sockets",
            sockets.len()
        );
        assert!(sockets.iter().all(|s| s.listening));
    }

    /// The kernel's `inet_diag_bc_run` for the operations the filter uses:
    /// does a socket with local port `port` pass?
    fn run(code: &[u8], port: u16) -> bool {
        let mut at = 0usize;
        let mut len = code.len() as isize;
        while len > 0 {
            let op = &code[at..];
            let (kind, yes, no) = (op[0], op[1] as usize, u16_ne(op, 2) as usize);
            let pass = match kind {
                INET_DIAG_BC_JMP => false,
                INET_DIAG_BC_S_EQ => port == u16_ne(op, 6),
                INET_DIAG_BC_S_GE => port >= u16_ne(op, 6),
                INET_DIAG_BC_S_LE => port <= u16_ne(op, 6),
                other => panic!("unexpected operation {other}"),
            };
            let by = if pass { yes } else { no };
            len -= by as isize;
            at += by;
        }
        len == 0
    }

    /// The kernel's `inet_diag_bc_audit` rules: offsets in range, multiples
    /// of 4, and every `no` target an operation boundary on the `yes` walk.
    fn audit(code: &[u8]) {
        let boundaries: Vec<usize> = {
            let mut b = vec![0];
            let mut at = 0;
            while at < code.len() {
                at += code[at + 1] as usize;
                b.push(at);
            }
            b
        };
        let mut at = 0;
        while at < code.len() {
            let len = code.len() - at;
            let (kind, yes, no) = (
                code[at],
                code[at + 1] as usize,
                u16_ne(code, at + 2) as usize,
            );
            let min = if kind == INET_DIAG_BC_JMP { 4 } else { 8 };
            assert!(
                yes >= min && yes <= len + 4 && yes % 4 == 0,
                "bad yes at {at}"
            );
            assert!(no >= min && no <= len + 4 && no % 4 == 0, "bad no at {at}");
            if no < len {
                assert!(
                    boundaries.contains(&(at + no)),
                    "no at {at} lands inside an operation"
                );
            }
            at += yes;
        }
    }

    #[test]
    fn port_filter_accepts_exactly_its_ports() {
        let cases: [&[u16]; 6] = [
            &[8080],
            &[20000, 20001, 20002, 20003],
            &[8080, 20000, 20001, 20005, 20007, 20008, 443],
            &[1, 65535],
            &[0, 65534, 65535],
            &[30000, 30000, 30001],
        ];
        for ports in cases {
            let code = local_port_filter(ports);
            audit(&code);
            for port in (0..=u16::MAX).step_by(1) {
                assert_eq!(
                    run(&code, port),
                    ports.contains(&port),
                    "port {port} with the filter for {ports:?}"
                );
            }
        }
        assert!(local_port_filter(&[]).is_empty());
        // Every other port from 10000: 64 workers × a few public ports stay short.
        let many: Vec<u16> = (0..600).map(|i| 10000 + 2 * i).collect();
        let code = local_port_filter(&many);
        audit(&code);
        assert!(run(&code, 10000) && run(&code, 11198) && !run(&code, 10001));
    }

    #[test]
    fn the_kernel_refuses_a_bad_filter_and_the_error_comes_back() {
        // An operation code the kernel does not know: its audit answers EINVAL
        // in an NLMSG_ERROR message.
        let bad = [0xff, BC_JMP_LEN as u8, BC_JMP_LEN as u8, 0];
        let err = dump(AF_INET, 1 << TCP_LISTEN, &bad).expect_err("the kernel refuses it");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
    }

    #[test]
    fn the_kernel_filters_by_port() {
        let a = TcpListener::bind("127.0.0.1:0").expect("listen");
        let b = TcpListener::bind("127.0.0.1:0").expect("listen");
        let (pa, pb) = (
            a.local_addr().expect("addr").port(),
            b.local_addr().expect("addr").port(),
        );
        let sockets = tcp_sockets_filtered(&[TCP_LISTEN], &[pa]).expect("filtered dump");
        assert!(sockets.iter().any(|s| s.local_port == pa));
        assert!(sockets.iter().all(|s| s.local_port == pa), "{sockets:?}");
        let both = tcp_sockets_filtered(&[TCP_LISTEN], &[pb, pa]).expect("filtered dump");
        assert!(both.iter().any(|s| s.local_port == pb));
        assert!(
            both.iter()
                .all(|s| s.local_port == pa || s.local_port == pb)
        );
        // An established pair: only the accepted end has the listener's port locally.
        let _client = std::net::TcpStream::connect(("127.0.0.1", pa)).expect("connect");
        let (_server, _) = a.accept().expect("accept");
        let est = tcp_sockets_filtered(&[TCP_ESTABLISHED], &[pa]).expect("filtered dump");
        assert_eq!(est.len(), 1, "{est:?}");
    }
}
