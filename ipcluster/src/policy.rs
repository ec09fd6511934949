//! The supervision policy: pure decisions over a snapshot of the cluster.
//! No I/O here — the master measures (procfs, control socket), calls
//! [`decide`], and carries out the returned [`Action`]s. "When is a worker
//! retired?" is answered in this file and nowhere else.

use std::time::{Duration, Instant};

use crate::cli::KillStrategy;

/// Where a worker is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    /// Spawned, not yet listening on its port (nor said hello).
    Starting,
    /// Ready and in the published steering table: receives new connections.
    Live,
    /// Out of the steering table; keeps serving its established connections.
    Retired,
    /// Asked to exit (SIGTERM or `die`); SIGKILL follows after the soft-kill timeout.
    Dying,
}

/// What the master knows about one worker at one instant.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerSnapshot {
    pub pid: i32,
    pub band: u32,
    pub generation: u64,
    pub state: WorkerState,
    /// Resident memory of the worker's whole process tree, measured from /proc.
    pub rss: u64,
    /// Established TCP connections owned by the worker's process tree.
    pub connections: u32,
    pub started_at: Instant,
    /// When the worker said hello on the control socket (aware workers only).
    pub hello_at: Option<Instant>,
    pub last_ping: Option<Instant>,
    /// The worker's last ping said it is too busy.
    pub busy: bool,
    /// The worker asked to be retired (`request_retire`).
    pub retire_requested: bool,
    /// When it entered `Retired`.
    pub retired_at: Option<Instant>,
    /// Since when it has had no connections (retired workers), if it has none now.
    pub idle_since: Option<Instant>,
    /// When it was asked to die (`Dying`).
    pub dying_since: Option<Instant>,
}

/// The settings the policy applies (from the CLI).
#[derive(Clone, Debug, PartialEq)]
pub struct PolicySettings {
    pub worker_rss_limit: u64,
    pub cluster_memory_limit: u64,
    pub ping_timeout: Duration,
    pub retire_rate: u32,
    pub retire_window: Duration,
    pub kill_strategy: KillStrategy,
    pub retired_idle_exit: Duration,
    pub soft_kill_timeout: Duration,
}

/// The whole cluster at one instant.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterSnapshot {
    pub now: Instant,
    /// Resident memory of the master itself.
    pub master_rss: u64,
    pub workers: Vec<WorkerSnapshot>,
    /// When the recent health retirements happened (for the rate limit).
    pub recent_retirements: Vec<Instant>,
}

/// What the master should do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Take `pid` out of the table and start a replacement for its band.
    RetireAndReplace { pid: i32, band: u32, reason: String },
    /// Ask a worker to exit (SIGTERM, or `die` to aware workers).
    AskToDie { pid: i32, reason: String },
    /// SIGKILL.
    Kill { pid: i32, reason: String },
    /// Nothing is done, but the operator should know (e.g. rate limit hit).
    Log { message: String },
}

/// Decide what to do about `snapshot` under `settings`.
pub fn decide(snapshot: &ClusterSnapshot, settings: &PolicySettings) -> Vec<Action> {
    let _ = (snapshot, settings);
    Vec::new()
}
