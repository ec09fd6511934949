//! What a master persists in its state directory (`state.json`), so that
//! `status`, `stop` and the next master know the cluster's configuration and
//! generation even when no master runs.

use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::registry::{JsonFileError, read_json, write_json_atomically};
use crate::steering::{BackendKind, SteeringConfig};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterState {
    pub name: String,
    pub backend: BackendKind,
    pub listens: Vec<SocketAddr>,
    pub bands: u32,
    pub band_shift: u8,
    pub interfaces: Vec<String>,
    pub flow_entries: u32,
    /// The newest generation a master started.
    pub generation: u64,
    /// The master that holds the lock (it may have died since).
    pub master_pid: i32,
    /// SIGTERM → SIGKILL delay used by `stop` when no master runs.
    pub soft_kill_timeout_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot parse {path}: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

impl ClusterState {
    /// The steering configuration this state describes.
    pub fn steering_config(&self) -> SteeringConfig {
        SteeringConfig {
            cluster: self.name.clone(),
            services: self.listens.clone(),
            interfaces: self.interfaces.clone(),
            flow_entries: self.flow_entries,
        }
    }

    /// `Ok(None)` when the file does not exist.
    pub fn load(path: &Path) -> Result<Option<ClusterState>, StateError> {
        read_json(path).map_err(|e| match e {
            JsonFileError::Read(source) => StateError::Read {
                path: path.display().to_string(),
                source,
            },
            JsonFileError::Parse(source) => StateError::Parse {
                path: path.display().to_string(),
                source,
            },
        })
    }

    /// Write atomically (a temporary file of unpredictable name, then rename).
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        write_json_atomically(path, self).map_err(|source| StateError::Write {
            path: path.display().to_string(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_through_a_file() {
        let dir = std::env::temp_dir().join(format!("ipcluster-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("state.json");
        assert_eq!(ClusterState::load(&path).expect("missing is fine"), None);
        let state = ClusterState {
            name: "chat".into(),
            backend: BackendKind::Iptables,
            listens: vec!["127.0.0.1:8080".parse().expect("addr")],
            bands: 4,
            band_shift: 0,
            interfaces: vec![],
            flow_entries: 1024,
            generation: 7,
            master_pid: 42,
            soft_kill_timeout_ms: 5000,
        };
        state.save(&path).expect("save");
        assert_eq!(ClusterState::load(&path).expect("load"), Some(state));
        std::fs::write(&path, "{").expect("write");
        assert!(matches!(
            ClusterState::load(&path),
            Err(StateError::Parse { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
