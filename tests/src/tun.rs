//! A point-to-point L3 link between two namespaces made of two tun devices
//! (no link-layer header, as on WireGuard or a VPN) and two threads of this
//! test process that carry every packet from one device to the other.
//! Dropping the link stops the threads and closes the devices (a tun device
//! that is not persistent goes away with its last file descriptor).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use crate::netns::NetNs;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Create tun device `name` in the calling thread's network namespace.
fn open_tun(name: &str) -> io::Result<File> {
    let file = File::options()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {name:?} is too long"),
        ));
    }
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is
    // (name, flags, and the union's remaining bytes).
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// Copy packets from `from` to `to` until `stop` is set.
fn pump(mut from: File, mut to: File, stop: &AtomicBool) {
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        let mut fds = libc::pollfd {
            fd: from.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut fds, 1, 100) };
        if ready <= 0 {
            continue;
        }
        match from.read(&mut buf) {
            // A write error (the other side is going away) drops the packet,
            // as a lossy link would.
            Ok(n) => {
                let _ = to.write(&buf[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Two tun devices, `a_if` in `a` (address `a_ip`) and `b_if` in `b`
/// (`b_ip`), each the other's point-to-point peer, both up.
pub struct TunLink {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl TunLink {
    pub fn new(a: &NetNs, a_if: &str, a_ip: &str, b: &NetNs, b_if: &str, b_ip: &str) -> TunLink {
        let tun_a = a
            .run(|| open_tun(a_if))
            .unwrap_or_else(|e| panic!("creating tun {a_if} in {}: {e}", a.name()));
        let tun_b = b
            .run(|| open_tun(b_if))
            .unwrap_or_else(|e| panic!("creating tun {b_if} in {}: {e}", b.name()));
        for (ns, name, ip, peer) in [(a, a_if, a_ip, b_ip), (b, b_if, b_ip, a_ip)] {
            ns.ip(&[
                "addr",
                "add",
                &format!("{ip}/32"),
                "peer",
                peer,
                "dev",
                name,
            ]);
            ns.ip(&["link", "set", name, "up"]);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let clone = |f: &File| f.try_clone().expect("duplicate a tun descriptor");
        let mut threads = Vec::new();
        for (from, to) in [(clone(&tun_a), clone(&tun_b)), (tun_b, tun_a)] {
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || pump(from, to, &stop)));
        }
        TunLink { stop, threads }
    }
}

impl Drop for TunLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
