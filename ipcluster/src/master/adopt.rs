//! Finding the workers a previous master left: processes that lead their own
//! session and carry this cluster's `IPCLUSTER_NAME` in their environment.
//! Their band, generation and ports come from the same environment.

use std::collections::HashMap;
use std::ffi::OsString;

use super::process_tree::ProcessTable;

/// A worker found in /proc.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundWorker {
    pub pid: i32,
    pub band: u32,
    pub generation: u64,
    /// `$PORT`.
    pub port: u16,
    /// `IPCLUSTER_PORT_<public>` → worker port.
    pub ports: HashMap<u16, u16>,
}

impl FoundWorker {
    /// The worker's port for public port `public` (`$PORT` when not named).
    pub fn port_for(&self, public: u16) -> u16 {
        self.ports.get(&public).copied().unwrap_or(self.port)
    }
}

/// What a worker's environment says about it, if it belongs to `cluster`.
pub fn parse_environment(
    pid: i32,
    env: &HashMap<OsString, OsString>,
    cluster: &str,
) -> Option<FoundWorker> {
    let get = |key: &str| env.get(&OsString::from(key)).and_then(|v| v.to_str());
    if get("IPCLUSTER_NAME")? != cluster {
        return None;
    }
    let band = get("IPCLUSTER_BAND")?.parse().ok()?;
    let generation = get("IPCLUSTER_GENERATION")?.parse().ok()?;
    let port = get("PORT")?.parse().ok()?;
    let ports = env
        .iter()
        .filter_map(|(k, v)| {
            let public = k.to_str()?.strip_prefix("IPCLUSTER_PORT_")?.parse().ok()?;
            Some((public, v.to_str()?.parse().ok()?))
        })
        .collect();
    Some(FoundWorker {
        pid,
        band,
        generation,
        port,
        ports,
    })
}

/// Every worker of `cluster` now running, sorted by pid. Only session
/// leaders count: a worker's children inherit its environment.
pub fn find_workers(cluster: &str, processes: &ProcessTable, skip: &[i32]) -> Vec<FoundWorker> {
    let mut found = Vec::new();
    let Ok(all) = procfs::process::all_processes() else {
        return found;
    };
    for process in all.flatten() {
        let pid = process.pid();
        if skip.contains(&pid) || processes.get(pid).is_none_or(|p| p.session != pid) {
            continue;
        }
        // Zombies and kernel threads have no readable environment.
        let Ok(env) = process.environ() else { continue };
        if let Some(worker) = parse_environment(pid, &env, cluster) {
            found.push(worker);
        }
    }
    found.sort_by_key(|w| w.pid);
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<OsString, OsString> {
        pairs
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect()
    }

    #[test]
    fn workers_are_recognised_by_their_environment() {
        let e = env(&[
            ("IPCLUSTER_NAME", "chat"),
            ("IPCLUSTER_BAND", "3"),
            ("IPCLUSTER_GENERATION", "12"),
            ("PORT", "20003"),
            ("IPCLUSTER_PORT_8080", "20003"),
            ("IPCLUSTER_PORT_8443", "20004"),
            ("HOME", "/root"),
        ]);
        let w = parse_environment(77, &e, "chat").expect("a worker of chat");
        assert_eq!((w.pid, w.band, w.generation, w.port), (77, 3, 12, 20003));
        assert_eq!(w.port_for(8443), 20004);
        assert_eq!(w.port_for(9999), 20003);
        assert_eq!(parse_environment(77, &e, "other"), None);
        let broken = env(&[("IPCLUSTER_NAME", "chat"), ("IPCLUSTER_BAND", "x")]);
        assert_eq!(parse_environment(77, &broken, "chat"), None);
    }
}
