//! Handing workers' listening sockets to the steering backend (sk-lookup
//! takes them; the other backends do nothing), at readiness and again on
//! every monitor pass, so that a listener that disappeared from the kernel's
//! map (the worker re-created it) is registered again.

use super::process_tree::{self, ProcessTable, SocketTable};
use super::{Event, Master, WorkerState};
use crate::steering::{BackendKind, Steering, SteeringError, WorkerListener};

/// Register every LISTEN socket of worker `pid` (held by its process tree
/// `holders`) on those of `ports` not registered yet. Only sk-lookup takes
/// listeners: for the others `unregistered_ports` is empty and nothing is
/// read. It reads the tree's fds from /proc and writes the backend's map, so
/// at readiness it runs on the steering writer thread.
pub(super) fn register(
    steering: &mut dyn Steering,
    pid: i32,
    holders: &[i32],
    ports: &[u16],
    sockets: &SocketTable,
) -> Result<(), SteeringError> {
    let ports = steering.unregistered_ports(ports);
    if ports.is_empty() {
        return Ok(());
    }
    let inodes = process_tree::socket_inodes(holders);
    for port in ports {
        let listening = sockets.listening_inodes(&inodes, port);
        if listening.is_empty() {
            // Not listening (yet, or any more): readiness decides.
            continue;
        }
        let listener = WorkerListener {
            pid,
            holders: holders.to_vec(),
            port,
            inodes: listening,
        };
        steering.register_listener(&listener)?;
    }
    Ok(())
}

impl Master {
    /// Register again the listeners of every worker that may be steered to
    /// (ready, live, or retired but still in the previous slot) whose
    /// listener is missing from the backend's map (the worker re-created it).
    /// Only sk-lookup takes listeners. The steering writer looks at the map
    /// for every worker's ports together and, when one is missing, reads the
    /// sockets and the tree's fds and registers them: nothing of it on the
    /// loop. One such job at a time.
    pub(super) fn reregister_listeners(&mut self, processes: &ProcessTable) {
        if self.cfg.backend != BackendKind::SkLookup || self.reregistering {
            return;
        }
        let candidates: Vec<(i32, Vec<u16>, Vec<i32>)> = self
            .core
            .workers
            .values()
            .filter(|w| {
                !w.killed
                    && (w.ready || matches!(w.state, WorkerState::Live | WorkerState::Retired))
            })
            .map(|w| (w.pid, w.ports.clone(), processes.tree(w.pid)))
            .collect();
        if candidates.is_empty() {
            return;
        }
        self.reregistering = true;
        self.write_steering(Box::new(move |steering| {
            let all: Vec<u16> = candidates.iter().flat_map(|(_, p, _)| p.clone()).collect();
            let missing = steering.unregistered_ports(&all);
            let mut errors = Vec::new();
            if !missing.is_empty() {
                match SocketTable::read_ports(&missing) {
                    Ok(sockets) => {
                        let workers = candidates
                            .iter()
                            .filter(|(_, ports, _)| ports.iter().any(|p| missing.contains(p)));
                        for (pid, ports, holders) in workers {
                            if let Err(e) = register(steering, *pid, holders, ports, &sockets) {
                                errors.push(e.to_string());
                            }
                        }
                    }
                    Err(e) => errors.push(format!(
                        "cannot read the sockets of ports {missing:?} to register their \
                         listeners again: {e}"
                    )),
                }
            }
            Event::Reregistered { errors }
        }));
    }
}
