//! Connections per worker, from one socket dump per monitor pass for the
//! whole cluster (filtered by the kernel to the cluster's ports, see
//! [`super::sock_diag`]), without walking every fd of every worker each pass.
//!
//! - An established socket whose local port is a worker's own port belongs to
//!   that worker: ports are never shared between workers (the allocator skips
//!   every port a worker still holds), and the eBPF and iptables backends
//!   deliver every connection to the worker port. No /proc read at all.
//! - An established socket on a public port (the sk-lookup backend hands the
//!   connection to the worker's own listener, so the accepted socket keeps the
//!   public port) is attributed by its inode, through a cached inode → worker
//!   view built from the fds of the workers' process trees. The view is rebuilt
//!   only when the dump shows such a socket that it does not know, so idle
//!   connections cost nothing after the first pass. A socket still unknown
//!   after a rebuild (in a listener's accept queue, or held by a process that
//!   is not a worker) triggers another rebuild only after [`RECHECK`].

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use super::process_tree::{ProcError, SocketTable, TcpSocket};

/// How long a socket that no worker held at the last rebuild waits before it
/// may trigger another one.
pub const RECHECK: Duration = Duration::from_secs(5);

/// What the census needs to know of one worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerKey {
    pub pid: i32,
    /// The worker's own ports (one per public port).
    pub ports: Vec<u16>,
    /// Its process tree (the worker and its descendants), for the fd view.
    pub tree: Vec<i32>,
}

/// The result of matching one dump against the workers.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Attribution {
    /// Established connections per worker pid (every worker has an entry).
    pub counts: HashMap<i32, u32>,
    /// Inodes of established sockets on public ports that no worker is known
    /// to hold.
    pub unknown: Vec<u64>,
}

/// Match established sockets to workers: by the worker's own port, or by
/// inode (`owners`) for sockets on a public port.
pub fn attribute(
    sockets: &[TcpSocket],
    workers: &[WorkerKey],
    publics: &[u16],
    owners: &HashMap<u64, i32>,
) -> Attribution {
    let mut by_port: HashMap<u16, i32> = HashMap::new();
    let mut counts: HashMap<i32, u32> = HashMap::new();
    for w in workers {
        counts.insert(w.pid, 0);
        for &port in &w.ports {
            by_port.insert(port, w.pid);
        }
    }
    let mut unknown = Vec::new();
    for s in sockets.iter().filter(|s| s.established) {
        let owner = match by_port.get(&s.local_port) {
            Some(&pid) => Some(pid),
            None if publics.contains(&s.local_port) => match owners.get(&s.inode) {
                Some(pid) if counts.contains_key(pid) => Some(*pid),
                _ => {
                    unknown.push(s.inode);
                    None
                }
            },
            None => None,
        };
        if let Some(count) = owner.and_then(|pid| counts.get_mut(&pid)) {
            *count = count.saturating_add(1);
        }
    }
    Attribution { counts, unknown }
}

/// Reads the TCP counters of this network namespace (the values line of `Tcp:` in
/// /proc/net/snmp: opens, resets, established, segments in and out…). No
/// socket enters or leaves ESTABLISHED, and none is half-closed by its peer,
/// without one of them moving.
///
/// /proc/net/snmp is kept open between passes and read again from its start
/// (the kernel writes it anew): one or two preads a pass instead of open,
/// size probe, reads and close.
#[derive(Debug, Default)]
struct SnmpReader {
    file: Option<std::fs::File>,
    buf: Vec<u8>,
    /// Times the file was opened.
    opens: u64,
}

impl SnmpReader {
    /// The values line of `Tcp:`, if /proc/net/snmp can be read.
    fn tcp_counters(&mut self) -> Option<String> {
        use std::os::unix::fs::FileExt as _;
        if self.file.is_none() {
            self.file = std::fs::File::open("/proc/net/snmp").ok();
            self.opens += 1;
        }
        let file = self.file.as_ref()?;
        self.buf.clear();
        loop {
            let at = self.buf.len();
            self.buf.resize(at + 4096, 0);
            let Ok(n) = file.read_at(&mut self.buf[at..], at as u64) else {
                self.file = None;
                return None;
            };
            self.buf.truncate(at + n);
            if n == 0 {
                break;
            }
        }
        std::str::from_utf8(&self.buf)
            .ok()?
            .lines()
            .filter(|l| l.starts_with("Tcp:"))
            .nth(1)
            .map(str::to_owned)
    }
}

/// The last dump, and the counters and ports it was taken with.
#[derive(Debug)]
struct Dump {
    counters: String,
    ports: Vec<u16>,
    sockets: SocketTable,
}

/// The last dump (reused while nothing changed), and the cached inode →
/// worker view and when it was last rebuilt.
#[derive(Debug, Default)]
pub struct Census {
    last_dump: Option<Dump>,
    /// The last [`Census::sockets`] returned the dump before it again.
    reused: bool,
    /// The workers and counts of the last [`Census::count`].
    last_counts: Option<(Vec<WorkerKey>, HashMap<i32, u32>)>,
    /// Dumps taken so far (the other passes reused the last one).
    pub dumps: u64,
    owners: HashMap<u64, i32>,
    /// Sockets no worker held at the last rebuild.
    unresolved: HashSet<u64>,
    last_rebuild: Option<Instant>,
    /// Rebuilds so far (each reads the fds of every worker tree).
    pub rebuilds: u64,
    snmp: SnmpReader,
}

impl Census {
    /// The cluster's sockets (LISTEN and ESTABLISHED on `ports`): the last dump
    /// again when the namespace's TCP counters have not moved since and the
    /// ports are the same (idle connections cost one small file read), a new
    /// dump otherwise.
    pub fn sockets(&mut self, ports: &[u16]) -> Result<SocketTable, ProcError> {
        let mut ports = ports.to_vec();
        ports.sort_unstable();
        ports.dedup();
        let counters = self.snmp.tcp_counters();
        if let (Some(last), Some(now)) = (&self.last_dump, &counters)
            && &last.counters == now
            && last.ports == ports
        {
            self.reused = true;
            return Ok(last.sockets.clone());
        }
        self.reused = false;
        let sockets = SocketTable::read_ports(&ports)?;
        self.dumps += 1;
        self.last_dump = counters.map(|counters| Dump {
            counters,
            ports,
            sockets: sockets.clone(),
        });
        Ok(sockets)
    }

    /// Connections per worker in `sockets` (one dump of the cluster's ports).
    /// `socket_inodes` lists the socket inodes that a set of processes holds
    /// (the /proc fd walk); it is called only when the view must be rebuilt.
    pub fn count(
        &mut self,
        now: Instant,
        sockets: &[TcpSocket],
        workers: &[WorkerKey],
        publics: &[u16],
        socket_inodes: impl FnMut(&[i32]) -> HashSet<u64>,
    ) -> HashMap<i32, u32> {
        // The same dump as last time and the same workers: the same counts,
        // unless a socket no worker held is due for another look.
        let reused = std::mem::take(&mut self.reused);
        let recheck_due = !self.unresolved.is_empty()
            && self
                .last_rebuild
                .is_none_or(|t| now.duration_since(t) >= RECHECK);
        if reused
            && !recheck_due
            && let Some((keys, counts)) = &self.last_counts
            && keys.as_slice() == workers
        {
            return counts.clone();
        }
        let counts = self.attribute_now(now, sockets, workers, publics, socket_inodes);
        self.last_counts = Some((workers.to_vec(), counts.clone()));
        counts
    }

    fn attribute_now(
        &mut self,
        now: Instant,
        sockets: &[TcpSocket],
        workers: &[WorkerKey],
        publics: &[u16],
        mut socket_inodes: impl FnMut(&[i32]) -> HashSet<u64>,
    ) -> HashMap<i32, u32> {
        let mut result = attribute(sockets, workers, publics, &self.owners);
        let new_unknown = result.unknown.iter().any(|i| !self.unresolved.contains(i));
        let recheck = !result.unknown.is_empty()
            && self
                .last_rebuild
                .is_none_or(|t| now.duration_since(t) >= RECHECK);
        if new_unknown || recheck {
            self.owners.clear();
            for w in workers {
                for inode in socket_inodes(&w.tree) {
                    self.owners.insert(inode, w.pid);
                }
            }
            self.rebuilds += 1;
            self.last_rebuild = Some(now);
            result = attribute(sockets, workers, publics, &self.owners);
            // Keep only what the next passes can use: the sockets on public ports.
            let on_publics: HashSet<u64> = sockets
                .iter()
                .filter(|s| s.established && publics.contains(&s.local_port))
                .map(|s| s.inode)
                .collect();
            self.owners.retain(|inode, _| on_publics.contains(inode));
        }
        self.unresolved = result.unknown.into_iter().collect();
        result.counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn est(local_port: u16, inode: u64) -> TcpSocket {
        TcpSocket {
            local_port,
            listening: false,
            established: true,
            inode,
        }
    }

    fn listen(local_port: u16, inode: u64) -> TcpSocket {
        TcpSocket {
            local_port,
            listening: true,
            established: false,
            inode,
        }
    }

    fn key(pid: i32, ports: &[u16]) -> WorkerKey {
        WorkerKey {
            pid,
            ports: ports.to_vec(),
            tree: vec![pid, pid + 1],
        }
    }

    #[test]
    fn a_reused_dump_never_hides_a_new_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let port = listener.local_addr().expect("addr").port();
        let mut census = Census::default();
        let first = census.sockets(&[port]).expect("dump");
        assert!(
            first
                .sockets()
                .iter()
                .any(|s| s.listening && s.local_port == port)
        );
        assert_eq!(first.sockets().iter().filter(|s| s.established).count(), 0);
        assert!(
            census
                .snmp
                .tcp_counters()
                .is_some_and(|c| c.starts_with("Tcp:"))
        );
        let before = census.snmp.tcp_counters().expect("counters");
        let _client = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        // The kept file reads the counters anew (ActiveOpens moved).
        let after = census.snmp.tcp_counters().expect("counters read again");
        assert_ne!(after, before);
        assert_eq!(census.snmp.opens, 1, "one open for every read");
        let after = census.sockets(&[port]).expect("dump");
        let established = |t: &SocketTable| t.sockets().iter().filter(|s| s.established).count();
        assert_eq!(established(&after), 1, "{:?}", after.sockets());
        drop(server);
        let closed = census.sockets(&[port]).expect("dump");
        assert_eq!(established(&closed), 0, "{:?}", closed.sockets());
        assert!(census.dumps >= 3, "every change was dumped again");
    }

    #[test]
    fn worker_ports_count_without_any_fd_view() {
        let workers = [key(100, &[20000, 20001]), key(200, &[20002, 20003])];
        let sockets = [
            listen(20000, 1),
            est(20000, 2),
            est(20001, 3),
            est(20002, 4),
            // A client end elsewhere, and a port of no worker.
            est(41000, 5),
            est(20009, 6),
        ];
        let a = attribute(&sockets, &workers, &[8080, 8081], &HashMap::new());
        assert_eq!(a.counts, HashMap::from([(100, 2), (200, 1)]));
        assert!(a.unknown.is_empty());
    }

    #[test]
    fn public_ports_count_by_inode() {
        let workers = [key(100, &[20000]), key(200, &[20001])];
        let sockets = [est(8080, 10), est(8080, 11), est(8080, 12), est(20001, 13)];
        let owners = HashMap::from([(10, 100), (11, 200), (12, 999)]);
        let a = attribute(&sockets, &workers, &[8080], &owners);
        // 12 belongs to a pid that is no worker (any more): unknown.
        assert_eq!(a.counts, HashMap::from([(100, 1), (200, 2)]));
        assert_eq!(a.unknown, vec![12]);
    }

    /// A fake host: which socket inodes each process holds, and how many fd
    /// walks the census asked for.
    struct FakeHost {
        fds: HashMap<i32, Vec<u64>>,
        walks: usize,
    }

    impl FakeHost {
        fn inodes(&mut self, pids: &[i32]) -> HashSet<u64> {
            self.walks += 1;
            pids.iter()
                .flat_map(|p| self.fds.get(p).cloned().unwrap_or_default())
                .collect()
        }
    }

    #[test]
    fn the_view_is_rebuilt_only_for_new_sockets_and_rechecked_late() {
        let workers = [key(100, &[20000]), key(200, &[20001])];
        let publics = [8080];
        let mut host = FakeHost {
            // 101 is in worker 100's tree (a child holding a connection).
            fds: HashMap::from([(100, vec![1, 10]), (101, vec![11]), (200, vec![2, 20])]),
            walks: 0,
        };
        let mut census = Census::default();
        let t0 = Instant::now();
        let mut sockets = vec![
            listen(20000, 1),
            listen(20001, 2),
            est(8080, 10),
            est(8080, 11),
        ];
        sockets.push(est(8080, 20));
        let c = census.count(t0, &sockets, &workers, &publics, |p| host.inodes(p));
        assert_eq!(c, HashMap::from([(100, 2), (200, 1)]));
        assert_eq!(host.walks, 2, "one rebuild: one walk per worker tree");

        // Idle connections: no walk, same counts.
        for i in 1..10 {
            let now = t0 + Duration::from_secs(i);
            let c = census.count(now, &sockets, &workers, &publics, |p| host.inodes(p));
            assert_eq!(c, HashMap::from([(100, 2), (200, 1)]));
        }
        assert_eq!(host.walks, 2);

        // A closed connection needs no walk either.
        sockets.retain(|s| s.inode != 11);
        let t1 = t0 + Duration::from_secs(10);
        let c = census.count(t1, &sockets, &workers, &publics, |p| host.inodes(p));
        assert_eq!(c, HashMap::from([(100, 1), (200, 1)]));
        assert_eq!(host.walks, 2);

        // A new one, not accepted yet (no fd): one rebuild, then quiet until RECHECK.
        sockets.push(est(8080, 21));
        let c = census.count(t1, &sockets, &workers, &publics, |p| host.inodes(p));
        assert_eq!(c, HashMap::from([(100, 1), (200, 1)]));
        assert_eq!(host.walks, 4);
        host.fds.entry(200).or_default().push(21);
        let c = census.count(
            t1 + Duration::from_secs(1),
            &sockets,
            &workers,
            &publics,
            |p| host.inodes(p),
        );
        assert_eq!(
            c,
            HashMap::from([(100, 1), (200, 1)]),
            "no walk before RECHECK"
        );
        assert_eq!(host.walks, 4);
        let c = census.count(t1 + RECHECK, &sockets, &workers, &publics, |p| {
            host.inodes(p)
        });
        assert_eq!(
            c,
            HashMap::from([(100, 1), (200, 2)]),
            "found at the recheck"
        );
        assert_eq!(host.walks, 6);
        assert_eq!(census.rebuilds, 3);
    }
}
