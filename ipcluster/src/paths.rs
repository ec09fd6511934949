//! Where a cluster keeps its state. The names are part of the contract (docs/design.md).

use std::path::PathBuf;

/// Root of all clusters' state directories.
pub const STATE_ROOT: &str = "/run/ipcluster";
/// Root of all clusters' bpffs pin folders.
pub const PIN_ROOT: &str = "/sys/fs/bpf/ipcluster";
/// Where bpffs is mounted.
pub const BPFFS: &str = "/sys/fs/bpf";

/// `/run/ipcluster/<name>/`: lock file, control socket, master state.
pub fn state_dir(cluster: &str) -> PathBuf {
    PathBuf::from(STATE_ROOT).join(cluster)
}

/// The control socket (newline-delimited JSON) of a cluster.
pub fn control_socket(cluster: &str) -> PathBuf {
    state_dir(cluster).join("control.sock")
}

/// The lock file that only one master of a cluster holds.
pub fn lock_file(cluster: &str) -> PathBuf {
    state_dir(cluster).join("master.lock")
}

/// `/sys/fs/bpf/ipcluster/<name>/`: pinned maps and links of the ebpf and sk-lookup backends.
pub fn pin_dir(cluster: &str) -> PathBuf {
    PathBuf::from(PIN_ROOT).join(cluster)
}

/// What the master persists for `status`, `stop` and the next master (JSON).
pub fn state_file(cluster: &str) -> PathBuf {
    state_dir(cluster).join("state.json")
}

/// The registry of the cluster's workers (pid, start time, band, generation,
/// ports, uid), rewritten atomically by the master on every change.
pub fn registry_file(cluster: &str) -> PathBuf {
    state_dir(cluster).join("workers.json")
}
