//! What /proc says about workers' process trees: which processes belong to a
//! worker (its session and its descendants, so `sh -c 'python3 …'` counts),
//! whether the tree listens on the worker's port (readiness), how many
//! established connections it holds on that port, and its resident memory.

use std::collections::{HashMap, HashSet};

use procfs::net::TcpState;
use procfs::process::FDTarget;

#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("cannot read {what} from /proc: {source}")]
    Read {
        what: &'static str,
        source: procfs::ProcError,
    },
}

/// One process, as far as the master cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcInfo {
    pub ppid: i32,
    pub session: i32,
    pub rss: u64,
    pub nice: i64,
}

/// Every process on the host at one instant.
#[derive(Clone, Debug, Default)]
pub struct ProcessTable {
    procs: HashMap<i32, ProcInfo>,
    children: HashMap<i32, Vec<i32>>,
}

impl ProcessTable {
    pub fn read() -> Result<ProcessTable, ProcError> {
        ProcessTable::read_with(&mut StatReader::default(), &HashSet::new())
    }

    /// Every process, through `reader`, which keeps the stat files of `keep` open.
    fn read_with(reader: &mut StatReader, keep: &HashSet<i32>) -> Result<ProcessTable, ProcError> {
        let procs = list_pids()
            .map_err(list_error)?
            .into_iter()
            // Processes come and go while we read: skip the ones that vanished.
            .filter_map(|pid| Some((pid, reader.read(pid, keep.contains(&pid))?)))
            .collect();
        Ok(ProcessTable::from_procs(procs))
    }

    pub fn from_procs(procs: HashMap<i32, ProcInfo>) -> ProcessTable {
        let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
        for (&pid, info) in &procs {
            children.entry(info.ppid).or_default().push(pid);
        }
        ProcessTable { procs, children }
    }

    pub fn get(&self, pid: i32) -> Option<&ProcInfo> {
        self.procs.get(&pid)
    }

    pub fn contains(&self, pid: i32) -> bool {
        self.procs.contains_key(&pid)
    }

    /// `root`, its descendants, and the members of the session it leads
    /// (workers are session leaders; a grandchild whose parent died is
    /// re-parented to init but stays in the session).
    pub fn tree(&self, root: i32) -> Vec<i32> {
        if !self.procs.contains_key(&root) {
            return Vec::new();
        }
        let mut seen: HashSet<i32> = HashSet::from([root]);
        let mut stack = vec![root];
        for (&pid, info) in &self.procs {
            if info.session == root && seen.insert(pid) {
                stack.push(pid);
            }
        }
        while let Some(pid) = stack.pop() {
            for &child in self.children.get(&pid).into_iter().flatten() {
                if seen.insert(child) {
                    stack.push(child);
                }
            }
        }
        let mut tree: Vec<i32> = seen.into_iter().collect();
        tree.sort_unstable();
        tree
    }

    /// Which of `roots` owns `pid`: `pid` itself, the session it belongs to,
    /// or its nearest ancestor among `roots`.
    pub fn owner_of(&self, pid: i32, roots: &HashSet<i32>) -> Option<i32> {
        if roots.contains(&pid) {
            return Some(pid);
        }
        let info = self.procs.get(&pid)?;
        if roots.contains(&info.session) {
            return Some(info.session);
        }
        let mut current = info.ppid;
        for _ in 0..64 {
            if roots.contains(&current) {
                return Some(current);
            }
            current = self.procs.get(&current)?.ppid;
            if current <= 1 {
                return None;
            }
        }
        None
    }

    /// Resident memory of a set of processes, bytes.
    pub fn rss(&self, pids: &[i32]) -> u64 {
        pids.iter()
            .filter_map(|pid| self.procs.get(pid))
            .map(|p| p.rss)
            .sum()
    }
}

/// The process table kept between monitor passes and refreshed
/// incrementally: a pass lists /proc (one directory read) and reads the stat
/// of new processes and of the workers' tree members only (memory, nice,
/// parent); other processes keep what was read when they appeared. A process
/// outside every tree cannot join one except by being forked into it (then
/// it is new), so the trees stay right; every [`FULL_EVERY`] passes the whole
/// table is read again all the same (a pid reused between two passes).
///
/// No process can be new, nor reuse a pid, unless a pid was allocated: when
/// the newest pid of our pid namespace (/proc/loadavg) is the one seen at the
/// last listing, a pass only reads the members again (a member that is gone
/// leaves the table), and no full read is due either unless a listing came
/// after the last one. The members' stat files stay open between passes and
/// are read again in place (one pread each, see [`StatReader`]).
#[derive(Debug, Default)]
pub struct ProcessCache {
    table: ProcessTable,
    members: HashSet<i32>,
    reader: StatReader,
    /// Passes since the last full read.
    since_full: u32,
    /// The newest pid when /proc was last listed.
    listed_at: Option<u64>,
    /// /proc was listed since the last full read.
    listed_since_full: bool,
    loadavg: Option<std::fs::File>,
    /// Passes that listed /proc (the others read only the members).
    pub listings: u64,
}

/// A full /proc read every this many passes.
pub const FULL_EVERY: u32 = 10;

impl ProcessCache {
    /// The table, brought up to date (a copy: the caller keeps it for the pass).
    pub fn refresh(&mut self) -> Result<ProcessTable, ProcError> {
        let newest = self.newest_pid();
        self.refresh_with(newest)
    }

    /// [`ProcessCache::refresh`], knowing the newest pid allocated (read
    /// before anything else: a process created during the pass moves it).
    fn refresh_with(&mut self, newest: Option<u64>) -> Result<ProcessTable, ProcError> {
        let quiet = newest.is_some() && newest == self.listed_at;
        self.since_full = self.since_full.saturating_add(1);
        let full_due = self.listings == 0
            || (self.since_full >= FULL_EVERY && (self.listed_since_full || !quiet));
        if full_due {
            self.table = ProcessTable::read_with(&mut self.reader, &self.members)?;
            (self.since_full, self.listed_since_full) = (0, false);
            self.listed_at = newest;
            self.listings += 1;
        } else if quiet {
            let mut procs = std::mem::take(&mut self.table.procs);
            for &pid in &self.members {
                match self.reader.read(pid, true) {
                    Some(info) => procs.insert(pid, info),
                    None => procs.remove(&pid),
                };
            }
            self.table = ProcessTable::from_procs(procs);
        } else {
            let listed = list_pids().map_err(list_error)?;
            let mut procs = std::mem::take(&mut self.table.procs);
            procs.retain(|pid, _| listed.contains(pid));
            for pid in listed {
                if procs.contains_key(&pid) && !self.members.contains(&pid) {
                    continue;
                }
                match self.reader.read(pid, self.members.contains(&pid)) {
                    Some(info) => procs.insert(pid, info),
                    // Gone while we read.
                    None => procs.remove(&pid),
                };
            }
            self.table = ProcessTable::from_procs(procs);
            self.listed_since_full = true;
            self.listed_at = newest;
            self.listings += 1;
        }
        Ok(self.table.clone())
    }

    /// The processes to read again on every pass (the workers' trees).
    pub fn set_members(&mut self, members: impl IntoIterator<Item = i32>) {
        self.members = members.into_iter().collect();
        self.reader.keep_only(&self.members);
    }

    /// The last pid allocated in our pid namespace (the last field of
    /// /proc/loadavg, kept open), if it can be read.
    fn newest_pid(&mut self) -> Option<u64> {
        if self.loadavg.is_none() {
            self.loadavg = std::fs::File::open("/proc/loadavg").ok();
        }
        let file = self.loadavg.as_ref()?;
        read_from_start(file, &mut self.reader.buf)?;
        std::str::from_utf8(&self.reader.buf)
            .ok()?
            .split_whitespace()
            .nth(4)?
            .parse()
            .ok()
    }
}

/// The pids in /proc (the names that are numbers).
fn list_pids() -> std::io::Result<HashSet<i32>> {
    let mut pids = HashSet::new();
    for entry in std::fs::read_dir("/proc")? {
        if let Some(pid) = entry?.file_name().to_str().and_then(|n| n.parse().ok()) {
            pids.insert(pid);
        }
    }
    Ok(pids)
}

fn list_error(source: std::io::Error) -> ProcError {
    ProcError::Read {
        what: "the process list",
        source: procfs::ProcError::Io(source, Some("/proc".into())),
    }
}

/// Reads processes' /proc/<pid>/stat, as every monitor pass does for every
/// member of every worker's tree, into a buffer kept between reads, then
/// through procfs's parser. The stat file of a process read on every pass
/// stays open: reading it again from offset 0 makes the kernel write it anew
/// (one pread, instead of open, read and close), and an open stat file stays
/// bound to its process, so once that process is gone it reads nothing (a new
/// process with the same pid is opened afresh). At most [`MAX_KEPT_OPEN`]
/// files are kept: the master's descriptors are for its peers first.
#[derive(Debug)]
struct StatReader {
    buf: Vec<u8>,
    path: String,
    open: HashMap<i32, std::fs::File>,
    /// Stat files opened so far.
    opens: u64,
    /// Files kept open at most.
    keep_at_most: usize,
}

/// Stat files kept open at most (64 workers of four processes each); the
/// processes beyond are read with an open and a close each time.
const MAX_KEPT_OPEN: usize = 256;

impl Default for StatReader {
    fn default() -> Self {
        StatReader {
            buf: Vec::new(),
            path: String::new(),
            open: HashMap::new(),
            opens: 0,
            keep_at_most: MAX_KEPT_OPEN,
        }
    }
}

impl StatReader {
    /// Process `pid`'s stat; its file stays open for the next read if `keep`.
    fn read(&mut self, pid: i32, keep: bool) -> Option<ProcInfo> {
        if let Some(file) = self.open.get(&pid) {
            if let Some(info) = read_stat(file, &mut self.buf) {
                return Some(info);
            }
            self.open.remove(&pid);
        }
        use std::fmt::Write as _;
        self.path.clear();
        write!(self.path, "/proc/{pid}/stat").ok()?;
        let file = std::fs::File::open(&self.path).ok()?;
        self.opens += 1;
        let info = read_stat(&file, &mut self.buf)?;
        if keep && self.open.len() < self.keep_at_most {
            self.open.insert(pid, file);
        }
        Some(info)
    }

    /// Close the stat files of every process not in `pids`.
    fn keep_only(&mut self, pids: &HashSet<i32>) {
        self.open.retain(|pid, _| pids.contains(pid));
    }
}

/// Read a one-line /proc file from its start into `buf` (the kernel writes
/// it anew). The line ends with a newline: a read that ends with one is the
/// whole file.
fn read_from_start(file: &std::fs::File, buf: &mut Vec<u8>) -> Option<()> {
    use std::os::unix::fs::FileExt as _;
    buf.clear();
    loop {
        let at = buf.len();
        buf.resize(at + 1024, 0);
        let n = file.read_at(&mut buf[at..], at as u64).ok()?;
        buf.truncate(at + n);
        if n == 0 || buf.ends_with(b"\n") {
            return Some(());
        }
    }
}

/// Read a stat file from its start into `buf` and parse it.
fn read_stat(file: &std::fs::File, buf: &mut Vec<u8>) -> Option<ProcInfo> {
    use procfs::FromRead as _;
    read_from_start(file, buf)?;
    let stat = procfs::process::Stat::from_read(buf.as_slice()).ok()?;
    Some(ProcInfo {
        ppid: stat.ppid,
        session: stat.session,
        rss: stat.rss.saturating_mul(procfs::page_size()),
        nice: stat.nice,
    })
}

/// One TCP socket of /proc/net/tcp{,6}.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSocket {
    pub local_port: u16,
    pub listening: bool,
    pub established: bool,
    pub inode: u64,
}

/// The first time the socket dump fails, say so: counting from /proc/net/tcp
/// works but costs the master far more CPU with many connections. Later
/// failures are only debug lines.
fn sock_diag_fell_back(e: &dyn std::fmt::Display) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        log::debug!("sock_diag failed ({e}); reading /proc/net/tcp");
    } else {
        log::warn!(
            "sock_diag failed ({e}); counting connections from /proc/net/tcp instead, \
             which costs much more CPU with many connections"
        );
    }
}

/// Every TCP socket of this network namespace (IPv4 and IPv6).
#[derive(Clone, Debug, Default)]
pub struct SocketTable {
    sockets: Vec<TcpSocket>,
}

impl SocketTable {
    /// LISTEN and ESTABLISHED sockets: through sock_diag (the kernel filters by
    /// state), or /proc/net/tcp{,6} when netlink is not available.
    pub fn read() -> Result<SocketTable, ProcError> {
        use super::sock_diag::{TCP_ESTABLISHED, TCP_LISTEN, tcp_sockets};
        match tcp_sockets(&[TCP_LISTEN, TCP_ESTABLISHED]) {
            Ok(sockets) => Ok(SocketTable { sockets }),
            Err(e) => {
                sock_diag_fell_back(&e);
                SocketTable::read_procfs()
            }
        }
    }

    /// LISTEN and ESTABLISHED sockets whose local port is one of `ports`,
    /// filtered by the kernel; /proc/net/tcp{,6} (then filtered here) when
    /// netlink is not available.
    pub fn read_ports(ports: &[u16]) -> Result<SocketTable, ProcError> {
        use super::sock_diag::{TCP_ESTABLISHED, TCP_LISTEN, tcp_sockets_filtered};
        match tcp_sockets_filtered(&[TCP_LISTEN, TCP_ESTABLISHED], ports) {
            Ok(sockets) => Ok(SocketTable { sockets }),
            Err(e) => {
                sock_diag_fell_back(&e);
                let mut table = SocketTable::read_procfs()?;
                table.sockets.retain(|s| ports.contains(&s.local_port));
                Ok(table)
            }
        }
    }

    /// The sockets, in no particular order.
    pub fn sockets(&self) -> &[TcpSocket] {
        &self.sockets
    }

    /// Every TCP socket, from /proc/net/tcp and /proc/net/tcp6.
    pub fn read_procfs() -> Result<SocketTable, ProcError> {
        let mut sockets = Vec::new();
        let v4 = procfs::net::tcp().map_err(|source| ProcError::Read {
            what: "/proc/net/tcp",
            source,
        })?;
        // IPv6 may be disabled: then there is no tcp6 table.
        let v6 = procfs::net::tcp6().unwrap_or_default();
        for entry in v4.into_iter().chain(v6) {
            sockets.push(TcpSocket {
                local_port: entry.local_address.port(),
                listening: entry.state == TcpState::Listen,
                established: entry.state == TcpState::Established,
                inode: entry.inode,
            });
        }
        Ok(SocketTable { sockets })
    }

    pub fn from_sockets(sockets: Vec<TcpSocket>) -> SocketTable {
        SocketTable { sockets }
    }

    /// Does a socket in `inodes` listen on `port`?
    pub fn listens(&self, inodes: &HashSet<u64>, port: u16) -> bool {
        self.sockets
            .iter()
            .any(|s| s.listening && s.local_port == port && inodes.contains(&s.inode))
    }

    /// Inodes of the sockets in `inodes` that listen on `port`.
    pub fn listening_inodes(&self, inodes: &HashSet<u64>, port: u16) -> Vec<u64> {
        self.sockets
            .iter()
            .filter(|s| s.listening && s.local_port == port && inodes.contains(&s.inode))
            .map(|s| s.inode)
            .collect()
    }

    /// Established sockets in `inodes` whose local port is one of `ports`.
    pub fn established(&self, inodes: &HashSet<u64>, ports: &[u16]) -> u32 {
        let count = self
            .sockets
            .iter()
            .filter(|s| s.established && ports.contains(&s.local_port) && inodes.contains(&s.inode))
            .count();
        u32::try_from(count).unwrap_or(u32::MAX)
    }
}

/// One worker's tree at one instant.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TreeMeasurement {
    /// Resident memory of the whole tree, bytes.
    pub rss: u64,
    /// Established connections on the worker's ports.
    pub connections: u32,
    /// The tree listens on every one of the worker's ports.
    pub listening: bool,
    /// Nice value of the worker's main process.
    pub nice: i64,
    /// The worker (tree root) is still there.
    pub alive: bool,
}

/// Measure the tree of worker `pid` serving `ports` for the public ports
/// `publics`. Connections are counted on both: a connection handed to the
/// worker's own socket by sk_lookup has the public port as its local port.
pub fn measure(
    processes: &ProcessTable,
    sockets: &SocketTable,
    pid: i32,
    ports: &[u16],
    publics: &[u16],
) -> TreeMeasurement {
    let tree = processes.tree(pid);
    if tree.is_empty() {
        return TreeMeasurement::default();
    }
    let inodes = socket_inodes(&tree);
    TreeMeasurement {
        rss: processes.rss(&tree),
        connections: sockets.established(
            &inodes,
            &ports.iter().chain(publics).copied().collect::<Vec<u16>>(),
        ),
        listening: !ports.is_empty() && ports.iter().all(|&p| sockets.listens(&inodes, p)),
        nice: processes.get(pid).map_or(0, |p| p.nice),
        alive: true,
    }
}

/// The network namespace (inode of `/proc/<pid>/ns/net`) of the first
/// process of `pids` that is not in this process's namespace, if any. Its
/// listeners are invisible to the master and cannot be steered to.
pub fn foreign_netns(pids: &[i32]) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let ours = std::fs::metadata("/proc/self/ns/net").ok()?.ino();
    pids.iter()
        .filter_map(|pid| std::fs::metadata(format!("/proc/{pid}/ns/net")).ok())
        .map(|m| m.ino())
        .find(|&ino| ino != ours)
}

/// The socket inodes that the processes `pids` hold open.
pub fn socket_inodes(pids: &[i32]) -> HashSet<u64> {
    let mut inodes = HashSet::new();
    for &pid in pids {
        let Ok(process) = procfs::process::Process::new(pid) else {
            continue;
        };
        let Ok(fds) = process.fd() else { continue };
        for fd in fds.flatten() {
            if let FDTarget::Socket(inode) = fd.target {
                inodes.insert(inode);
            }
        }
    }
    inodes
}

/// Add `increment` to the nice value of every thread of every process in `pids`
/// (threads have their own nice value on Linux). Returns the threads changed.
pub fn renice(table: &ProcessTable, pids: &[i32], increment: i32) -> usize {
    let mut changed = 0;
    for &pid in pids {
        let current = table.get(pid).map_or(0, |p| p.nice);
        let nice = i32::try_from(current)
            .unwrap_or(0)
            .saturating_add(increment)
            .min(19);
        let tids: Vec<i32> = procfs::process::Process::new(pid)
            .and_then(|p| p.tasks())
            .map(|tasks| tasks.flatten().map(|t| t.tid).collect())
            .unwrap_or_else(|_| vec![pid]);
        for tid in tids {
            let Some(who) = rustix::process::Pid::from_raw(tid) else {
                continue;
            };
            if rustix::process::setpriority_process(Some(who), nice).is_ok() {
                changed += 1;
            }
        }
    }
    changed
}

/// Seconds since process `pid` started.
pub fn age_secs(pid: i32) -> Option<f64> {
    let stat = procfs::process::Process::new(pid).ok()?.stat().ok()?;
    let uptime = std::fs::read_to_string("/proc/uptime").ok()?;
    let uptime: f64 = uptime.split_whitespace().next()?.parse().ok()?;
    let ticks = procfs::ticks_per_second() as f64;
    Some((uptime - stat.starttime as f64 / ticks).max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(ppid: i32, session: i32) -> ProcInfo {
        ProcInfo {
            ppid,
            session,
            rss: 4096,
            nice: 0,
        }
    }

    #[test]
    fn the_cache_sees_new_and_gone_processes_between_full_reads() {
        let mut cache = ProcessCache::default();
        let me = i32::try_from(std::process::id()).expect("pid");
        let first = cache.refresh().expect("full read");
        assert!(first.contains(me));
        cache.set_members([me]);
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = i32::try_from(child.id()).expect("pid");
        // An incremental pass (not the full read of pass 0) finds the new
        // child: its pid moved the newest pid, so /proc is listed again.
        let table = cache.refresh().expect("incremental read");
        assert_eq!(cache.listings, 2);
        assert_eq!(table.get(pid).map(|p| p.ppid), Some(me));
        assert!(table.tree(me).contains(&pid));
        // As the monitor pass does: the trees' processes are the members.
        cache.set_members(table.tree(me));
        child.kill().expect("kill sleep");
        child.wait().expect("reap sleep");
        let table = cache.refresh().expect("incremental read");
        assert!(!table.contains(pid), "a reaped process leaves the table");
        assert!(table.contains(me));
    }

    #[test]
    fn the_newest_pid_moves_with_every_new_process() {
        let mut cache = ProcessCache::default();
        let before = cache.newest_pid().expect("/proc/loadavg");
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let child_pid = u64::from(child.id());
        child.wait().expect("reap true");
        let after = cache.newest_pid().expect("/proc/loadavg");
        assert_ne!(before, after);
        // Other processes may have started since, never none.
        assert!(
            after >= child_pid || after < before,
            "{before} {child_pid} {after}"
        );
    }

    #[test]
    fn a_pass_without_a_new_pid_reads_only_the_members() {
        let mut cache = ProcessCache::default();
        let me = i32::try_from(std::process::id()).expect("pid");
        cache.refresh_with(Some(7)).expect("full read");
        cache.set_members([me]);
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = i32::try_from(child.id()).expect("pid");
        // Told that no pid was allocated: /proc is not listed (the child is
        // not seen), the members are read again.
        let table = cache.refresh_with(Some(7)).expect("quiet pass");
        assert_eq!(cache.listings, 1);
        assert!(table.contains(me) && !table.contains(pid));
        // A new newest pid: listed again, the child is found.
        let table = cache.refresh_with(Some(8)).expect("listing pass");
        assert_eq!(cache.listings, 2);
        assert!(table.tree(me).contains(&pid));
        cache.set_members(table.tree(me));
        child.kill().expect("kill sleep");
        child.wait().expect("reap sleep");
        // A member that is gone leaves the table on a quiet pass too.
        let table = cache.refresh_with(Some(8)).expect("quiet pass");
        assert!(!table.contains(pid) && table.contains(me));
        // The full read after that listing is still due, and then no more
        // while no pid is allocated.
        for _ in 0..FULL_EVERY {
            cache.refresh_with(Some(8)).expect("quiet pass");
        }
        assert_eq!(cache.listings, 3, "one full read after the listing");
        for _ in 0..2 * FULL_EVERY {
            cache.refresh_with(Some(8)).expect("quiet pass");
        }
        assert_eq!(cache.listings, 3);
        // Without the newest pid, every pass lists.
        cache.refresh_with(None).expect("listing pass");
        assert_eq!(cache.listings, 4);
    }

    #[test]
    fn a_kept_stat_file_reads_fresh_values_and_nothing_once_its_process_is_gone() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = i32::try_from(child.id()).expect("pid");
        let who = rustix::process::Pid::from_raw(pid).expect("pid");
        let mut reader = StatReader::default();
        let first = reader.read(pid, true).expect("first read");
        assert_eq!(first.ppid, i32::try_from(std::process::id()).expect("pid"));
        // Changed behind the open file: the next read sees it, from the same file.
        let nicer = i32::try_from(first.nice).expect("nice") + 3;
        rustix::process::setpriority_process(Some(who), nicer).expect("renice sleep");
        let second = reader.read(pid, true).expect("second read");
        assert_eq!(second.nice, i64::from(nicer.min(19)));
        assert_eq!(reader.opens, 1, "the second read reused the open file");
        child.kill().expect("kill sleep");
        child.wait().expect("reap sleep");
        assert_eq!(
            reader.read(pid, true),
            None,
            "a reaped process reads nothing"
        );
        assert!(reader.open.is_empty());
        // Not kept: every read opens the file.
        let me = i32::try_from(std::process::id()).expect("pid");
        assert!(reader.read(me, false).is_some() && reader.read(me, false).is_some());
        assert_eq!(reader.opens, 3);
        assert!(reader.open.is_empty());
        reader.read(me, true).expect("own stat");
        reader.keep_only(&HashSet::new());
        assert!(reader.open.is_empty());
    }

    #[test]
    fn no_more_stat_files_are_kept_open_than_allowed() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = i32::try_from(child.id()).expect("pid");
        let me = i32::try_from(std::process::id()).expect("pid");
        let mut reader = StatReader {
            keep_at_most: 1,
            ..StatReader::default()
        };
        for _ in 0..3 {
            assert!(reader.read(me, true).is_some() && reader.read(pid, true).is_some());
        }
        assert_eq!(reader.open.len(), 1);
        // The one kept is read in place, the other opened every time.
        assert_eq!(reader.opens, 4);
        child.kill().expect("kill sleep");
        child.wait().expect("reap sleep");
    }

    #[test]
    fn tree_follows_children_and_session() {
        // 100 is a worker (session leader), 101 its shell child, 102 the server the
        // shell started, 103 an orphan of the session re-parented to init.
        let table = ProcessTable::from_procs(HashMap::from([
            (1, info(0, 1)),
            (100, info(50, 100)),
            (101, info(100, 100)),
            (102, info(101, 100)),
            (103, info(1, 100)),
            (200, info(1, 200)),
        ]));
        assert_eq!(table.tree(100), vec![100, 101, 102, 103]);
        assert_eq!(table.tree(200), vec![200]);
        assert!(table.tree(999).is_empty());
        assert_eq!(table.rss(&table.tree(100)), 4 * 4096);
        let roots = HashSet::from([100, 200]);
        assert_eq!(table.owner_of(102, &roots), Some(100));
        assert_eq!(table.owner_of(103, &roots), Some(100));
        assert_eq!(table.owner_of(200, &roots), Some(200));
        assert_eq!(table.owner_of(1, &roots), None);
        assert_eq!(table.owner_of(4242, &roots), None);
    }

    #[test]
    fn listening_and_established_sockets_are_matched_by_inode_and_port() {
        let sockets = SocketTable::from_sockets(vec![
            TcpSocket {
                local_port: 20000,
                listening: true,
                established: false,
                inode: 1,
            },
            TcpSocket {
                local_port: 20000,
                listening: false,
                established: true,
                inode: 2,
            },
            TcpSocket {
                local_port: 20000,
                listening: false,
                established: true,
                inode: 3,
            },
            TcpSocket {
                local_port: 20001,
                listening: true,
                established: false,
                inode: 4,
            },
            TcpSocket {
                local_port: 40000,
                listening: false,
                established: true,
                inode: 5,
            },
        ]);
        let mine = HashSet::from([1, 2, 5]);
        assert!(sockets.listens(&mine, 20000));
        assert!(!sockets.listens(&mine, 20001));
        assert_eq!(sockets.established(&mine, &[20000]), 1);
        assert_eq!(sockets.established(&HashSet::from([2, 3]), &[20000]), 2);
        // Inode 5 is an accepted connection on public port 40000 (sk-lookup).
        assert_eq!(sockets.established(&mine, &[20000, 40000]), 2);
        assert_eq!(sockets.listening_inodes(&mine, 20000), vec![1]);
        assert!(sockets.listening_inodes(&mine, 20001).is_empty());
        assert_eq!(
            sockets.listening_inodes(&HashSet::from([1, 4]), 20001),
            vec![4]
        );
    }

    #[test]
    fn own_process_is_in_our_network_namespace() {
        assert_eq!(foreign_netns(&[std::process::id() as i32]), None);
        // A pid that does not exist is skipped.
        assert_eq!(foreign_netns(&[i32::MAX]), None);
    }
}
