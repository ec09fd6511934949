//! Steering: how a new connection to a public port reaches the worker of its
//! client's band. One trait, three backends (`ebpf`, `iptables`, `sk-lookup`); nothing outside
//! this module names a BPF map or an iptables rule.

pub mod ebpf;
pub mod iptables;
pub mod sk_lookup;
pub mod table;

use std::net::SocketAddr;

pub use table::{Band, ServiceRoute, SteeringTable, TableError, band_of};

/// Which steering backend a cluster uses.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// tc programs on the listening interfaces, steered through pinned BPF maps.
    Ebpf,
    /// nat REDIRECT rules by source-address bitmask (the original ipcluster's way).
    Iptables,
    /// An sk_lookup program hands each new connection to its worker's own
    /// listening socket (no rewrite, no flow table; kernel 5.9+).
    #[serde(rename = "sk-lookup")]
    #[value(name = "sk-lookup")]
    SkLookup,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Ebpf => "ebpf",
            BackendKind::Iptables => "iptables",
            BackendKind::SkLookup => "sk-lookup",
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a backend needs to know to install a cluster's steering.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SteeringConfig {
    /// The cluster name (`--name`): names the pin folder and the iptables chain.
    pub cluster: String,
    /// The public listen addresses (`--listen`), in order: service index = position.
    pub services: Vec<SocketAddr>,
    /// Interfaces to attach to (ebpf); empty = the backend's default choice.
    pub interfaces: Vec<String>,
    /// Size of the flow table (ebpf).
    pub flow_entries: u32,
}

/// Packet counters, summed over CPUs. Backends that have no counters report zeros.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    pub steered: u64,
    pub new_flows: u64,
    pub flow_hits: u64,
    pub table_misses: u64,
    pub egress_rewrites: u64,
    pub passed: u64,
    pub flow_fallbacks: u64,
    /// sk-lookup: new connections given to the active slot's worker.
    #[serde(default)]
    pub assigned: u64,
    /// sk-lookup: new connections given to the previous slot's worker (the
    /// active one had no listening socket registered).
    #[serde(default)]
    pub fallbacks: u64,
    /// sk-lookup: new connections to a service whose band had no socket at all.
    #[serde(default)]
    pub misses: u64,
    /// SYNs refused because they would have taken over a live connection (ebpf).
    #[serde(default)]
    pub refused_hijacks: u64,
    /// Packets to a wildcard service that the host forwards elsewhere (ebpf).
    #[serde(default)]
    pub forwarded: u64,
    /// ICMP errors about steered connections translated for the worker (ebpf).
    #[serde(default)]
    pub icmp_translated: u64,
}

/// Errors of the steering backends.
#[derive(Debug, thiserror::Error)]
pub enum SteeringError {
    #[error(transparent)]
    Table(#[from] TableError),
    /// The cluster name cannot name a pin folder, a chain or a state directory.
    #[error(transparent)]
    ClusterName(#[from] crate::cluster_name::ClusterNameError),
    #[error("{0}")]
    Ebpf(String),
    /// A BPF operation (load, attach, pin, map access) failed.
    #[error("{what}: {source}")]
    Bpf {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "cluster {cluster:?} has no steering state at {path}; the master installs it (`ipcluster run --name {cluster}`)"
    )]
    NotInstalled { cluster: String, path: String },
    #[error("{what}: {count} do not fit, the maps hold at most {capacity}")]
    OverCapacity {
        what: String,
        count: usize,
        capacity: u32,
    },
    #[error("{0}")]
    Iptables(String),
    /// `set_band` before any table was published.
    #[error(
        "no steering table has been published yet: publish a whole table before setting a band"
    )]
    NoTable,
    /// An iptables tool is not installed.
    #[error(
        "`{command}` was not found; the iptables backend needs the Debian package `{package}` \
         (apt-get install {package})"
    )]
    IptablesMissing {
        command: String,
        package: &'static str,
    },
    /// An iptables tool ran but was not allowed to read or change the rules.
    #[error(
        "`{command}` was not permitted: {message}; the iptables backend needs CAP_NET_ADMIN (run it as root)"
    )]
    IptablesNotPermitted { command: String, message: String },
    /// An iptables tool (or the kernel behind it) refused what it was asked: its own message.
    #[error("`{command}` failed: {message}")]
    IptablesFailed { command: String, message: String },
    /// A worker's listening socket could not be taken for steering.
    #[error("worker {pid}: its listener on port {port} cannot be steered to: {cause}")]
    Listener { pid: i32, port: u16, cause: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "steering state of cluster {cluster:?} at {path} has layout {found}, this binary uses layout {expected}; \
         run `ipcluster stop --name {cluster}` to remove it, then start again"
    )]
    IncompatibleLayout {
        cluster: String,
        path: String,
        found: String,
        expected: u32,
    },
}

/// The operations every backend provides. A master calls `install` once, then
/// `publish` for every generation; `teardown` only happens on `ipcluster stop`.
/// Dropping a backend object never removes anything from the kernel: traffic
/// keeps flowing while no master runs.
pub trait Steering: Send {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;

    /// Create whatever is missing (maps, programs, links, chains) and adopt what
    /// is already there. Returns the table in force before this call, if any,
    /// so that a new master continues from it.
    fn install(&mut self) -> Result<Option<SteeringTable>, SteeringError>;

    /// Switch every band of every service to `table` at once. On error the
    /// previous table stays in force.
    fn publish(&mut self, table: &SteeringTable) -> Result<(), SteeringError>;

    /// Point one band of one service at another worker port, leaving the rest.
    /// Done as a whole-table publish, so it is as atomic as a generation switch
    /// (and the eBPF backend's previous slot keeps the band's old worker for
    /// connections whose flow entry was evicted).
    fn set_band(
        &mut self,
        service: usize,
        band: Band,
        worker_port: u16,
    ) -> Result<(), SteeringError> {
        let mut table = self.read_table()?.ok_or(SteeringError::NoTable)?;
        table.set_band(service, band, worker_port)?;
        self.publish(&table)
    }

    /// The table currently in force, read back from the kernel.
    fn read_table(&self) -> Result<Option<SteeringTable>, SteeringError>;

    /// Packet counters (zeros where the backend has none).
    fn counters(&self) -> Result<Counters, SteeringError>;

    /// Remove everything this cluster installed (links, programs, pins, rules).
    fn teardown(&mut self) -> Result<(), SteeringError>;

    /// Forward what the kernel side logged since the last call into this
    /// process's log (the ebpf backend with `--ebpf-log`); cheap, called often.
    fn poll_kernel_log(&mut self) {}

    /// Make sure new connections for `listener.port` can reach the worker's
    /// own listening socket. Only backends that hand connections to the
    /// workers' sockets (sk-lookup) have anything to do; they take the socket
    /// when it is not registered yet (first time, or the worker re-created
    /// it). Returns whether it registered something now.
    fn register_listener(&mut self, listener: &WorkerListener) -> Result<bool, SteeringError> {
        let _ = listener;
        Ok(false)
    }

    /// Which of `ports` have no listener registered yet, so that a caller
    /// only looks for the sockets it must hand over (always empty for the
    /// backends that take no listeners).
    fn unregistered_ports(&self, ports: &[u16]) -> Vec<u16> {
        let _ = ports;
        Vec::new()
    }
}

/// A worker's LISTEN socket on one of its ports, as readiness found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerListener {
    /// The worker (its process tree's root), for messages.
    pub pid: i32,
    /// The processes of its tree, one of which holds the socket.
    pub holders: Vec<i32>,
    /// The worker port it listens on.
    pub port: u16,
    /// Inodes of the LISTEN sockets on `port` that the tree holds.
    pub inodes: Vec<u64>,
}

/// Build the backend `kind` for `config`. Nothing touches the kernel until
/// [`Steering::install`] (or another operation) is called.
pub fn backend(
    kind: BackendKind,
    config: SteeringConfig,
) -> Result<Box<dyn Steering>, SteeringError> {
    Ok(match kind {
        BackendKind::Ebpf => Box::new(ebpf::EbpfSteering::new(config)?),
        BackendKind::Iptables => Box::new(iptables::IptablesSteering::new(config)?),
        BackendKind::SkLookup => Box::new(sk_lookup::SkLookupSteering::new(config)?),
    })
}
