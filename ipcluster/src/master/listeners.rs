//! Handing workers' listening sockets to the steering backend (sk-lookup
//! takes them; the other backends do nothing), at readiness and again on
//! every monitor pass, so that a listener that disappeared from the kernel's
//! map (the worker re-created it) is registered again.

use super::process_tree::{self, ProcessTable, SocketTable};
use super::{Master, WorkerState};
use crate::steering::{SteeringError, WorkerListener};

impl Master {
    /// Register every LISTEN socket of worker `pid` on its ports.
    pub(super) fn register_listeners(
        &mut self,
        pid: i32,
        processes: &ProcessTable,
        sockets: &SocketTable,
    ) -> Result<(), SteeringError> {
        let Some(w) = self.core.workers.get(&pid) else {
            return Ok(());
        };
        // Only sk-lookup takes listeners, and only those not registered yet:
        // no /proc scan otherwise.
        let ports = self.steering().unregistered_ports(&w.ports);
        if ports.is_empty() {
            return Ok(());
        }
        let holders = processes.tree(pid);
        let inodes = process_tree::socket_inodes(&holders);
        for port in ports {
            let listening = sockets.listening_inodes(&inodes, port);
            if listening.is_empty() {
                // Not listening (yet, or any more): readiness decides.
                continue;
            }
            let listener = WorkerListener {
                pid,
                holders: holders.clone(),
                port,
                inodes: listening,
            };
            self.steering().register_listener(&listener)?;
        }
        Ok(())
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
