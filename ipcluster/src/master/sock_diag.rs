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

/// Every IPv4 and IPv6 TCP socket whose state is in `states` (TCP_* values).
pub fn tcp_sockets(states: &[u8]) -> io::Result<Vec<TcpSocket>> {
    let mask = states.iter().fold(0u32, |m, &s| m | (1 << s));
    let mut sockets = dump(libc::AF_INET as u8, mask)?;
    // IPv6 may be disabled: then there is nothing to list.
    match dump(libc::AF_INET6 as u8, mask) {
        Ok(v6) => sockets.extend(v6),
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {}
        Err(e) => return Err(e),
    }
    Ok(sockets)
}

fn dump(family: u8, state_mask: u32) -> io::Result<Vec<TcpSocket>> {
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

    let mut request = Vec::with_capacity(NLMSG_HDRLEN + 56);
    request.extend_from_slice(&((NLMSG_HDRLEN + 56) as u32).to_ne_bytes());
    request.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    request.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    request.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    request.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    // struct inet_diag_req_v2: family, protocol, ext, pad, states, sockid (zeros).
    request.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, 0, 0]);
    request.extend_from_slice(&state_mask.to_ne_bytes());
    request.extend_from_slice(&[0u8; 48]);
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
}
