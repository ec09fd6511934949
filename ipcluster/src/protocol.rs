//! The control socket protocol: newline-delimited JSON objects over a Unix
//! stream socket in the cluster's state directory. Each object has a `type`.
//! The master identifies a peer by `SO_PEERCRED`, never by a pid in a message.

use serde::{Deserialize, Serialize};

/// Longest line the master accepts; longer lines are logged and dropped.
pub const MAX_LINE: usize = 64 * 1024;

/// Worker → master.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum WorkerMessage {
    /// First message of an aware worker: it is up and listening on `ports`.
    Hello {
        band: u32,
        generation: u64,
        #[serde(default)]
        ports: Vec<u16>,
    },
    /// Sent periodically (every 500 ms by the bundled worker API).
    Ping {
        /// Free-form statistics the worker wants shown in `status`.
        #[serde(default)]
        stats: serde_json::Value,
        /// The worker is overloaded: the master retires and replaces it.
        #[serde(default)]
        busy: bool,
        /// Free-form application info (version, build).
        #[serde(default)]
        app: serde_json::Value,
    },
    /// The worker asks to be retired (e.g. it detected a leak).
    RequestRetire { reason: String },
}

/// Master → worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MasterMessage {
    /// No new connections will reach you; keep serving the ones you have.
    Retire { reason: String },
    /// Finish up and exit; SIGKILL follows after the soft-kill timeout.
    Die { reason: String },
    /// Facts about the cluster, sent after hello.
    Info {
        name: String,
        generation: u64,
        band: u32,
        workers: u32,
    },
}

/// Operator → master (the `ipcluster` CLI, or a new master taking over).
/// Accepted only from root or the master's own user (`SO_PEERCRED`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AdminRequest {
    /// Answered with one [`StatusReport`] line.
    Status,
    /// End every worker, remove the steering state and the state directory, exit.
    Stop,
    /// Ask every retired worker to die, spaced by the spawn delay.
    KillRetired,
    /// Exit the master only (a new master takes over): workers and steering stay.
    Shutdown,
}

/// Master → operator, for every request but `status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AdminReply {
    Ok { message: String },
    Error { message: String },
}

/// Any line a peer may send on the control socket.
#[derive(Clone, Debug, PartialEq)]
pub enum Incoming {
    Worker(WorkerMessage),
    Admin(AdminRequest),
}

impl Incoming {
    /// Parse one line; the error says why it was not understood.
    pub fn parse(line: &str) -> Result<Incoming, String> {
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
        let kind = value
            .get("type")
            .and_then(|t| t.as_str())
            .ok_or("no \"type\" field")?
            .to_owned();
        match kind.as_str() {
            "hello" | "ping" | "request_retire" => serde_json::from_value(value)
                .map(Incoming::Worker)
                .map_err(|e| format!("bad {kind} message: {e}")),
            "status" | "stop" | "kill_retired" | "shutdown" => serde_json::from_value(value)
                .map(Incoming::Admin)
                .map_err(|e| format!("bad {kind} request: {e}")),
            other => Err(format!("unknown message type {other:?}")),
        }
    }
}

/// One worker in `ipcluster status --json` (field names are a contract).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub pid: i32,
    pub band: u32,
    pub generation: u64,
    pub state: crate::policy::WorkerState,
    /// The worker's port for the first public port (`$PORT`).
    pub port: u16,
    /// The worker's port for each public port, in `--listen` order of first appearance.
    pub ports: Vec<u16>,
    /// Resident memory of the worker's process tree, bytes.
    pub rss: u64,
    /// Established TCP connections on the worker's ports owned by its process tree.
    pub connections: u32,
    /// Seconds since the worker started.
    pub uptime: u64,
    /// Nice value of the worker's main process (retired workers are reniced).
    pub nice: i64,
    /// The worker spoke on the control socket (hello or ping) to this master.
    pub aware: bool,
    /// Seconds since its last ping, if it pings.
    #[serde(default)]
    pub last_ping_ago: Option<f64>,
    /// Why it is retired, dying or killed, with the figures the master acted on
    /// (e.g. `low watermark breach: rss 101.2 MiB > limit 64.0 MiB`).
    #[serde(default)]
    pub reason: Option<String>,
    /// The `stats` of its latest ping, as sent (`null` when it never pinged).
    #[serde(default)]
    pub stats: serde_json::Value,
    /// The `app` of its latest ping, as sent (`null` when it never pinged).
    #[serde(default)]
    pub app: serde_json::Value,
}

/// The memory rules in force (`ipcluster run` flags), bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLimits {
    /// `--worker-rss-limit`: a live worker above it is retired and replaced.
    pub worker_rss_limit: u64,
    /// `--cluster-memory-limit`.
    pub cluster_memory_limit: u64,
    /// Above it (80 % of the cluster limit), retired workers are asked to die.
    pub low_watermark: u64,
    /// Above it (95 %), retired and dying workers are killed.
    pub high_watermark: u64,
}

/// `ipcluster status --json` (field names are a contract, docs/design.md).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub name: String,
    pub backend: crate::steering::BackendKind,
    /// The generation of the master that answers (its new workers).
    pub generation: u64,
    /// The master's pid; `None` when no master runs (the CLI read /proc itself).
    pub master_pid: Option<i32>,
    pub listens: Vec<std::net::SocketAddr>,
    /// Workers (bands) per generation.
    pub bands: u32,
    pub band_shift: u8,
    pub workers: Vec<WorkerStatus>,
    /// The steering table in force.
    pub table: Option<crate::steering::SteeringTable>,
    pub counters: Option<crate::steering::Counters>,
    /// Resident memory of the master and of all workers, bytes.
    pub master_rss: u64,
    pub cluster_rss: u64,
    /// The limits the master applies; `None` when no master runs.
    #[serde(default)]
    pub limits: Option<MemoryLimits>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_messages_round_trip() {
        let hello: WorkerMessage =
            serde_json::from_str(r#"{"type":"hello","band":3,"generation":7,"ports":[20001]}"#)
                .expect("hello");
        assert_eq!(
            hello,
            WorkerMessage::Hello {
                band: 3,
                generation: 7,
                ports: vec![20001]
            }
        );
        let ping: WorkerMessage =
            serde_json::from_str(r#"{"type":"ping","busy":true}"#).expect("ping");
        assert!(matches!(ping, WorkerMessage::Ping { busy: true, .. }));
        let rr: WorkerMessage =
            serde_json::from_str(r#"{"type":"request_retire","reason":"leak"}"#)
                .expect("request_retire");
        assert_eq!(
            rr,
            WorkerMessage::RequestRetire {
                reason: "leak".into()
            }
        );
    }

    #[test]
    fn unknown_or_malformed_messages_are_errors() {
        assert!(serde_json::from_str::<WorkerMessage>(r#"{"type":"reboot"}"#).is_err());
        assert!(serde_json::from_str::<WorkerMessage>(r#"{"type":"hello"}"#).is_err());
        assert!(serde_json::from_str::<WorkerMessage>("not json").is_err());
    }

    #[test]
    fn incoming_lines_are_worker_messages_or_admin_requests() {
        assert_eq!(
            Incoming::parse(r#"{"type":"status"}"#),
            Ok(Incoming::Admin(AdminRequest::Status))
        );
        assert_eq!(
            Incoming::parse(r#"{"type":"kill_retired"}"#),
            Ok(Incoming::Admin(AdminRequest::KillRetired))
        );
        assert!(matches!(
            Incoming::parse(r#"{"type":"ping"}"#),
            Ok(Incoming::Worker(WorkerMessage::Ping { .. }))
        ));
        for bad in [
            "garbage",
            "{}",
            r#"{"type":"reboot"}"#,
            r#"{"type":"hello","band":1,"generation":1,"pid":1}"#,
            "[1,2]",
        ] {
            assert!(Incoming::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn master_messages_are_tagged() {
        let s = serde_json::to_string(&MasterMessage::Retire {
            reason: "reload".into(),
        })
        .expect("json");
        assert_eq!(s, r#"{"type":"retire","reason":"reload"}"#);
    }
}
