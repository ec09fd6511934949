//! Handing workers' listening sockets to the steering backend (sk-lookup
//! takes them; the other backends do nothing), at readiness and again on
//! every monitor pass, so that a listener that disappeared from the kernel's
//! map (the worker re-created it) is registered again.

use super::process_tree::{self, ProcessTable, SocketTable};
use super::{Master, WorkerState};
use crate::steering::{Steering, SteeringError, WorkerListener};

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
    /// Register every LISTEN socket of worker `pid` on its ports, from the loop.
    fn register_listeners(
        &mut self,
        pid: i32,
        processes: &ProcessTable,
        sockets: &SocketTable,
    ) -> Result<(), SteeringError> {
        let Some(w) = self.core.workers.get(&pid) else {
            return Ok(());
        };
        let ports = w.ports.clone();
        register(
            self.steering().as_mut(),
            pid,
            &processes.tree(pid),
            &ports,
            sockets,
        )
    }

    /// Re-register the listeners of every worker that may be steered to
    /// (ready, live, or retired but still in the previous slot).
    pub(super) fn reregister_listeners(&mut self, processes: &ProcessTable, sockets: &SocketTable) {
        let candidates: Vec<(i32, Vec<u16>)> = self
            .core
            .workers
            .values()
            .filter(|w| {
                !w.killed
                    && (w.ready || matches!(w.state, WorkerState::Live | WorkerState::Retired))
            })
            .map(|w| (w.pid, w.ports.clone()))
            .collect();
        // One look at the map for every worker's ports together.
        let all: Vec<u16> = candidates.iter().flat_map(|(_, p)| p.clone()).collect();
        let missing = self.steering().unregistered_ports(&all);
        if missing.is_empty() {
            return;
        }
        let pids = candidates
            .into_iter()
            .filter(|(_, ports)| ports.iter().any(|p| missing.contains(p)))
            .map(|(pid, _)| pid);
        for pid in pids {
            if let Err(e) = self.register_listeners(pid, processes, sockets) {
                log::warn!("{e}");
            }
        }
    }
}
