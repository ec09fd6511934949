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
    fn master_messages_are_tagged() {
        let s = serde_json::to_string(&MasterMessage::Retire {
            reason: "reload".into(),
        })
        .expect("json");
        assert_eq!(s, r#"{"type":"retire","reason":"reload"}"#);
    }
}
