//! Several hosts in front of one service address, in network namespaces the
//! test creates: a client namespace holding many addresses, a router, and two
//! server hosts that each hold the service address and run their own
//! ipcluster master (the real binary, started inside the host's namespace
//! with `nsenter --net`, so its bpffs pins stay visible to `status`/`stop`).
//!
//! ```text
//!  clients 10.77.0.10…  ──c0── r0  router  ra ──── h0  host A (10.78.1.2, service 10.79.0.1)
//!                                          rb ──── h0  host B (10.78.2.2, service 10.79.0.1)
//! ```
//!
//! The router reaches the service address through a [`Front`]: an ECMP route
//! with the L3 (source, destination) hash, or a split by the lowest bit of
//! the client address (policy routing on an iptables mark), the kind of front
//! that needs `--band-shift` on the hosts.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster::{self, ipcluster_bin, live_workers, worker_port_range};
use crate::netns::{NetNs, veth};

/// The address both hosts hold and clients connect to.
pub const SERVICE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 79, 0, 1);

/// How the router spreads clients over the hosts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Front {
    /// One route with two next hops; `fib_multipath_hash_policy=0` hashes the
    /// source and destination addresses, so a client always takes one path.
    EcmpL3Hash,
    /// Clients whose address is even go to host A, odd ones to host B: a front
    /// that splits clients by the same low bits the hosts use for bands.
    LowBit,
}

/// The namespaces, links, addresses and routes of the topology; removed on drop
/// (deleting a namespace deletes its veth ends, routes and iptables rules).
pub struct Topology {
    pub clients: NetNs,
    pub router: NetNs,
    /// Host A, then host B.
    pub hosts: [NetNs; 2],
    client_addrs: Vec<IpAddr>,
}

impl Topology {
    /// Build it with `client_count` client addresses 10.77.0.10, 10.77.0.11, …
    pub fn new(front: Front, client_count: u8) -> Topology {
        crate::require_root();
        assert!(client_count <= 200, "at most 200 client addresses");
        let clients = NetNs::new("clients");
        let router = NetNs::new("router");
        let hosts = [NetNs::new("hosta"), NetNs::new("hostb")];

        veth(&clients, "c0", &router, "r0");
        let client_addrs: Vec<IpAddr> = (0..client_count)
            .map(|i| IpAddr::V4(Ipv4Addr::new(10, 77, 0, 10 + i)))
            .collect();
        let mut batch: Vec<String> = client_addrs
            .iter()
            .map(|a| format!("addr add {a}/24 dev c0"))
            .collect();
        batch.push("route add default via 10.77.0.1".into());
        clients.ip_batch(&batch);

        router.sysctl("net.ipv4.ip_forward", "1");
        router.sysctl("net.ipv4.fib_multipath_hash_policy", "0");
        for conf in ["all", "default"] {
            router.sysctl(&format!("net.ipv4.conf.{conf}.rp_filter"), "0");
        }
        router.ip(&["addr", "add", "10.77.0.1/24", "dev", "r0"]);
        for (i, (host, router_if)) in hosts.iter().zip(["ra", "rb"]).enumerate() {
            let net = i + 1;
            veth(&router, router_if, host, "h0");
            router.ip(&[
                "addr",
                "add",
                &format!("10.78.{net}.1/24"),
                "dev",
                router_if,
            ]);
            host.ip_batch(&[
                format!("addr add 10.78.{net}.2/24 dev h0"),
                format!("addr add {SERVICE_ADDR}/32 dev h0"),
                format!("route add default via 10.78.{net}.1"),
            ]);
        }
        let service = format!("{SERVICE_ADDR}/32");
        match front {
            Front::EcmpL3Hash => {
                router.ip(&[
                    "route",
                    "add",
                    &service,
                    "nexthop",
                    "via",
                    "10.78.1.2",
                    "dev",
                    "ra",
                    "nexthop",
                    "via",
                    "10.78.2.2",
                    "dev",
                    "rb",
                ]);
            }
            Front::LowBit => {
                router.ip(&["route", "add", &service, "via", "10.78.1.2", "dev", "ra"]);
                router.ip(&[
                    "route",
                    "add",
                    &service,
                    "via",
                    "10.78.2.2",
                    "dev",
                    "rb",
                    "table",
                    "101",
                ]);
                router.ip(&["rule", "add", "fwmark", "1", "table", "101"]);
                crate::netns::run_ok(router.command("iptables").args([
                    "-t",
                    "mangle",
                    "-A",
                    "PREROUTING",
                    "-s",
                    "0.0.0.1/0.0.0.1",
                    "-d",
                    &service,
                    "-j",
                    "MARK",
                    "--set-mark",
                    "1",
                ]));
            }
        }
        Topology {
            clients,
            router,
            hosts,
            client_addrs,
        }
    }

    /// The client addresses, in order.
    pub fn client_addrs(&self) -> &[IpAddr] {
        &self.client_addrs
    }
}

/// An ipcluster master (and its workers) on one host of the topology, with the
/// demo worker and the ebpf backend; `ipcluster stop` (run in the host's
/// namespace) and SIGKILL for anything left, on drop.
pub struct HostCluster {
    pub name: String,
    pub workers: u32,
    netns: PathBuf,
    /// The `run` arguments; a reload runs them again.
    run_args: Vec<String>,
    /// Every master started, oldest first.
    masters: Vec<Child>,
    /// All masters log here, one after the other.
    log: PathBuf,
}

impl HostCluster {
    /// Start a master in `host` serving `listen`, with extra `run` flags, and
    /// wait until generation 1 is live on every band.
    pub fn start(
        host: &NetNs,
        name: &str,
        workers: u32,
        listen: SocketAddr,
        flags: &[&str],
    ) -> HostCluster {
        let log_dir = std::env::temp_dir().join("ipcluster-tests").join(name);
        let _ = std::fs::remove_dir_all(&log_dir);
        std::fs::create_dir_all(&log_dir).expect("log dir");
        let (first, last) = worker_port_range();
        let mut run_args: Vec<String> = [
            "run",
            "--name",
            name,
            "--backend",
            "ebpf",
            "--workers",
            &workers.to_string(),
            "--listen",
            &listen.to_string(),
            "--port-range",
            &format!("{first}-{last}"),
            "--spawn-delay",
            "20ms",
        ]
        .map(String::from)
        .to_vec();
        run_args.extend(flags.iter().map(|f| (*f).to_owned()));
        let mut cluster = HostCluster {
            name: name.to_owned(),
            workers,
            netns: host.path(),
            run_args,
            masters: Vec::new(),
            log: log_dir.join("master.log"),
        };
        cluster.start_master();
        cluster.wait_live(1, Duration::from_secs(30));
        cluster
    }

    /// Start one more master with the same arguments (the first, or a reload).
    fn start_master(&mut self) {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let args: Vec<&str> = self.run_args.iter().map(String::as_str).collect();
        let master = self
            .command(&args)
            .env("RUST_LOG", "info")
            .stdout(log_file.try_clone().expect("log file"))
            .stderr(log_file)
            .spawn()
            .expect("start the ipcluster master in its host");
        self.masters.push(master);
    }

    /// Reload: run the same command again and wait until the next generation
    /// is live on every band.
    pub fn reload(&mut self) {
        self.start_master();
        let generation = self.masters.len() as u64;
        self.wait_live(generation, Duration::from_secs(30));
    }

    /// `ipcluster ARGS` inside this host's namespace.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns.display()))
            .arg("--")
            .arg(ipcluster_bin())
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `status --json` of this cluster.
    pub fn try_status(&self) -> Result<Value, String> {
        let out = self
            .command(&["status", "--name", &self.name, "--json"])
            .output()
            .map_err(|e| format!("running status: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("status is not JSON: {e}"))
    }

    fn wait_live(&self, generation: u64, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            match self.try_status() {
                Ok(status)
                    if live_workers(&status, Some(generation)).len() == self.workers as usize =>
                {
                    return status;
                }
                Ok(status) => last = status.to_string(),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "generation {generation} of {} not live within {timeout:?}; last status: {last}\n---- master log ----\n{}",
            self.name,
            self.log()
        );
    }

    /// The pids of the live workers, by band.
    pub fn live_pids(&self) -> Vec<(u32, i32)> {
        let status = self
            .try_status()
            .unwrap_or_else(|e| panic!("status of {}: {e}\n{}", self.name, self.log()));
        let mut pids = cluster::live_band_pids(&status, None);
        pids.sort_unstable();
        pids
    }
}

impl Drop for HostCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- master log of {} ----\n{}", self.name, self.log());
        }
        // Never panic here: a panic while unwinding aborts the test binary.
        // `stop` gets 30 s; its messages go to the test's stderr.
        let stop = self
            .command(&["stop", "--name", &self.name])
            .stdout(Stdio::null())
            .spawn();
        match stop {
            Ok(mut child) => {
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    match child.try_wait() {
                        Ok(Some(status)) if status.success() => break,
                        Ok(Some(status)) => {
                            eprintln!("cleanup: ipcluster stop --name {}: {status}", self.name);
                            break;
                        }
                        Ok(None) if Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        _ => {
                            eprintln!("cleanup: ipcluster stop --name {} hung", self.name);
                            let _ = child.kill();
                            let _ = child.wait();
                            break;
                        }
                    }
                }
            }
            Err(e) => eprintln!("cleanup: running ipcluster stop --name {}: {e}", self.name),
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for master in &mut self.masters {
            while !matches!(master.try_wait(), Ok(Some(_))) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = master.kill();
            let _ = master.wait();
        }
        cluster::kill_cluster_processes(&self.name);
        let _ = std::fs::remove_dir_all(ipcluster::paths::state_dir(&self.name));
    }
}
