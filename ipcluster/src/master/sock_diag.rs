//! TCP sockets in chosen states through `NETLINK_SOCK_DIAG`. The kernel
//! filters by state, so a host with tens of thousands of TIME_WAIT sockets
//! (every reload under load makes them) costs almost nothing, where
//! formatting and parsing /proc/net/tcp6 would take the master's whole CPU.

use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use super::process_tree::TcpSocket;

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_HDRLEN: usize = 16;
/// `struct inet_diag_msg`: family, state, timer, retrans, sockid (48), expires,
/// rqueue, wqueue, uid, inode.
const INET_DIAG_MSG_LEN: usize = 72;
pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_LISTEN: u8 = 10;

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
    let mut sockets = dump(libc::AF_INET as u8, mask, &filter)?;
    // IPv6 may be disabled: then there is nothing to list.
    match dump(libc::AF_INET6 as u8, mask, &filter) {
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

fn dump(family: u8, state_mask: u32, filter: &[u8]) -> io::Result<Vec<TcpSocket>> {
    // SAFETY: plain socket(2) call; the fd is owned right after.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };

    // The filter travels as one netlink attribute after the request.
    let attr_len = if filter.is_empty() {
        0
    } else {
        4 + filter.len()
    };
    let len = NLMSG_HDRLEN + 56 + attr_len.next_multiple_of(4);
    let mut request = Vec::with_capacity(len);
    request.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_ne_bytes());
    request.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    request.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    request.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    request.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    // struct inet_diag_req_v2: family, protocol, ext, pad, states, sockid (zeros).
    request.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, 0, 0]);
    request.extend_from_slice(&state_mask.to_ne_bytes());
    request.extend_from_slice(&[0u8; 48]);
    if !filter.is_empty() {
        let attr_len = u16::try_from(attr_len).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, "sock_diag filter too long")
        })?;
        request.extend_from_slice(&attr_len.to_ne_bytes());
        request.extend_from_slice(&INET_DIAG_REQ_BYTECODE.to_ne_bytes());
        request.extend_from_slice(filter);
        request.resize(len, 0);
    }
    // SAFETY: the buffer is valid for its length; the kernel is the peer.
    let sent = unsafe { libc::send(fd.as_raw_fd(), request.as_ptr().cast(), request.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }

    let mut sockets = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: recv writes at most buf.len() bytes into buf.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let n = usize::try_from(n).unwrap_or(0);
        if n == 0 {
            return Ok(sockets);
        }
        match parse(&buf[..n], &mut sockets)? {
            Parsed::Done => return Ok(sockets),
            Parsed::More => {}
        }
    }
}

enum Parsed {
    More,
    Done,
}

fn u16_ne(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_ne(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parse one datagram of netlink messages, appending sockets.
fn parse(mut data: &[u8], sockets: &mut Vec<TcpSocket>) -> io::Result<Parsed> {
    while data.len() >= NLMSG_HDRLEN {
        let len = u32_ne(data, 0) as usize;
        let kind = u16_ne(data, 4);
        if len < NLMSG_HDRLEN || len > data.len() {
            return Err(io::Error::other("truncated sock_diag message"));
        }
        let body = &data[NLMSG_HDRLEN..len];
        match kind {
            NLMSG_DONE => return Ok(Parsed::Done),
            NLMSG_ERROR => {
                let errno = if body.len() >= 4 {
                    -(u32_ne(body, 0) as i32)
                } else {
                    libc::EIO
                };
                if errno == 0 {
                    return Ok(Parsed::Done);
                }
                return Err(io::Error::from_raw_os_error(errno));
            }
            SOCK_DIAG_BY_FAMILY if body.len() >= INET_DIAG_MSG_LEN => {
                let state = body[1];
                // sockid.sport is big-endian.
                let local_port = u16::from_be_bytes([body[4], body[5]]);
                let inode = u64::from(u32_ne(body, 68));
                sockets.push(TcpSocket {
                    local_port,
                    listening: state == TCP_LISTEN,
                    established: state == TCP_ESTABLISHED,
                    inode,
                });
            }
            _ => {}
        }
        let aligned = (len + 3) & !3;
        data = data.get(aligned..).unwrap_or(&[]);
    }
    Ok(Parsed::More)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

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
