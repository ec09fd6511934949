//! What the master does with what its control-socket peers say: workers'
//! hello, ping and request_retire (identified by SO_PEERCRED and their process
//! tree, never by a field in the message), and the operator's status, stop,
//! kill-retired and shutdown (root or the master's own user only).

use std::collections::HashSet;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use super::process_tree::ProcessTable;
use super::{Event, Exit, Master, adopt, identity, kill, own_rss};
use crate::paths;
use crate::policy::WorkerState;
use crate::protocol::{
    self, AdminReply, AdminRequest, Incoming, MasterMessage, MemoryLimits, StatusReport,
    WorkerMessage, WorkerStatus,
};
use crate::steering::{Counters, Steering};

impl Master {
    /// Send one message as one line. A message over the protocol's line limit
    /// (a status report of a huge cluster) is replaced by an `error` reply that
    /// says so: the peer would refuse the line, and must not wait for it.
    pub(super) fn send<T: serde::Serialize>(&self, conn: u64, message: &T) {
        let Some(peer) = self.peers.get(&conn) else {
            return;
        };
        let (line, refused) = protocol::reply_line(message);
        if let Some(e) = refused {
            log::error!("control socket: cannot answer connection {conn}: {e}");
        }
        let _ = peer.outgoing.send(line);
    }

    pub(super) fn on_line(&mut self, conn: u64, line: &str) {
        let Some(peer) = self.peers.get(&conn) else {
            return;
        };
        let who = format!(
            "pid {} uid {}",
            peer.pid.map_or("?".into(), |p| p.to_string()),
            peer.uid
        );
        match Incoming::parse(line) {
            Err(e) => {
                let shown: String = line.chars().take(120).collect();
                log::warn!("control socket ({who}): {e}; dropped: {shown:?}");
            }
            Ok(Incoming::Admin(request)) => {
                let euid = rustix::process::geteuid().as_raw();
                if peer.uid != 0 && peer.uid != euid {
                    log::warn!("control socket ({who}): {request:?} refused: not root");
                    self.send(
                        conn,
                        &AdminReply::Error {
                            message: "only root may do this".into(),
                        },
                    );
                    return;
                }
                self.on_admin(conn, request);
            }
            Ok(Incoming::Worker(message)) => {
                let worker = match peer.worker {
                    Some(pid) if self.core.workers.contains_key(&pid) => Some(pid),
                    _ => self.identify(peer.pid),
                };
                let Some(pid) = worker else {
                    log::warn!(
                        "control socket ({who}): not a process of a worker of cluster {:?}; closing the connection",
                        self.cfg.name
                    );
                    self.peers.remove(&conn);
                    return;
                };
                if let Some(peer) = self.peers.get_mut(&conn) {
                    peer.worker = Some(pid);
                }
                self.on_worker_message(conn, pid, message);
            }
        }
    }

    /// Which worker's process tree `pid` belongs to.
    fn identify(&self, pid: Option<i32>) -> Option<i32> {
        let pid = pid?;
        if self.core.workers.contains_key(&pid) {
            return Some(pid);
        }
        let roots: HashSet<i32> = self.core.workers.keys().copied().collect();
        ProcessTable::read().ok()?.owner_of(pid, &roots)
    }

    fn on_worker_message(&mut self, conn: u64, pid: i32, message: WorkerMessage) {
        let now = Instant::now();
        let Some(w) = self.core.workers.get_mut(&pid) else {
            return;
        };
        w.conn = Some(conn);
        match message {
            WorkerMessage::Hello {
                band, generation, ..
            } => {
                w.hello_at = Some(now);
                w.last_ping = Some(now);
                if band != w.band || generation != w.generation {
                    log::warn!(
                        "worker {pid} says hello as band {band} generation {generation}, but it is band {} \
                         generation {}: the master's view wins",
                        w.band,
                        w.generation
                    );
                }
                let (state, band, generation) = (w.state, w.band, w.generation);
                log::debug!("worker {pid} said hello");
                self.send(
                    conn,
                    &MasterMessage::Info {
                        name: self.cfg.name.clone(),
                        generation,
                        band,
                        workers: self.cfg.bands,
                    },
                );
                match state {
                    WorkerState::Starting => self.ready(pid, super::supervisor::Readiness::Hello),
                    WorkerState::Retired => self.send(
                        conn,
                        &MasterMessage::Retire {
                            reason: "an older generation".into(),
                        },
                    ),
                    WorkerState::Dying => self.send(
                        conn,
                        &MasterMessage::Die {
                            reason: "asked to die".into(),
                        },
                    ),
                    WorkerState::Live => {}
                }
            }
            WorkerMessage::Ping { busy, stats, app } => {
                w.last_ping = Some(now);
                (w.stats, w.app) = (protocol::reported(stats), protocol::reported(app));
                if busy && !w.busy {
                    log::info!("worker {pid} (band {}) says it is busy", w.band);
                }
                w.busy = busy;
            }
            WorkerMessage::RequestRetire { reason } => {
                log::info!(
                    "worker {pid} (band {}) asks to be retired: {}",
                    w.band,
                    super::control::printable(&reason, 200)
                );
                w.retire_requested = true;
            }
        }
    }

    fn on_admin(&mut self, conn: u64, request: AdminRequest) {
        match request {
            // The counters are read by the steering writer (iptables-save can
            // take long), behind the writes asked for before: the report then
            // shows the table the kernel steers by.
            AdminRequest::Status => self.read_counters(super::CountersFor::Status(conn)),
            AdminRequest::KillRetired => {
                let n = self.core.queue_kill_retired("`ipcluster kill-retired`");
                log::info!("kill-retired: asking {n} retired workers to die");
                self.send(
                    conn,
                    &AdminReply::Ok {
                        message: format!(
                            "asking {n} retired workers to die, one every {:?}",
                            self.cfg.spawn_delay
                        ),
                    },
                );
            }
            AdminRequest::Shutdown => {
                if let Some(successor) = self.peers.get(&conn).and_then(|p| p.pid) {
                    self.notifier.hand_over(successor);
                }
                log::info!("a new master takes over: exiting without touching workers or steering");
                self.send(
                    conn,
                    &AdminReply::Ok {
                        message: "the master exits".into(),
                    },
                );
                self.exit = Some(Exit::Handover(super::HANDED_OVER.into()));
            }
            AdminRequest::Stop => {
                if self.stopping {
                    self.send(
                        conn,
                        &AdminReply::Error {
                            message: "the cluster is being stopped already".into(),
                        },
                    );
                    return;
                }
                self.notifier.stopping("ipcluster stop");
                self.begin_stop(conn);
            }
        }
    }

    /// `ipcluster stop`: every worker, the steering, the state directory, in
    /// the steering writer's thread (waiting for the workers takes up to the soft-kill
    /// timeout). From now on the loop supervises nothing: the workers are
    /// forgotten at once, so that their exits start no replacement.
    fn begin_stop(&mut self, conn: u64) {
        self.stopping = true;
        let pids: Vec<i32> = self.core.workers.keys().copied().collect();
        log::info!(
            "stopping cluster {:?}: {} workers",
            self.cfg.name,
            pids.len()
        );
        let plan = StopPlan {
            name: self.cfg.name.clone(),
            backend: self.cfg.backend,
            worker_uid: identity::worker_uid(self.cfg.run_as.as_ref()),
            generation: self.generation,
            soft_kill_timeout: self.cfg.soft_kill_timeout,
            pids,
            pidfds: self.pidfds.drain().collect(),
        };
        self.core.workers.clear();
        // Behind the steering writes asked for before: the teardown comes last.
        self.write_steering(Box::new(move |steering| {
            // A panic must still end in a reply and the master's exit.
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| plan.carry_out(steering)))
                    .unwrap_or_else(|_| {
                        Err(anyhow::anyhow!(
                            "stopping the cluster panicked; see the master's log"
                        ))
                    });
            Event::Stopped { conn, result }
        }));
    }

    /// `stop` is done: answer, and exit.
    pub(super) fn on_stopped(&mut self, conn: u64, result: Result<String>) {
        let message = match result {
            Ok(message) => AdminReply::Ok { message },
            Err(e) => AdminReply::Error {
                message: format!("{e:#}"),
            },
        };
        self.send(conn, &message);
        self.exit = Some(Exit::Stopped);
    }

    pub(super) fn status_report(&self, counters: Option<Counters>) -> StatusReport {
        let now = Instant::now();
        let mut workers: Vec<WorkerStatus> = self
            .core
            .workers
            .values()
            .map(|w| super::status::worker_status(w, now))
            .collect();
        workers.sort_by_key(|w| (std::cmp::Reverse(w.generation), w.band, w.pid));
        let master_rss = own_rss();
        StatusReport {
            name: self.cfg.name.clone(),
            backend: self.cfg.backend,
            generation: self.generation,
            master_pid: i32::try_from(std::process::id()).ok(),
            listens: self.cfg.listens.clone(),
            bands: self.cfg.bands,
            band_shift: self.cfg.band_shift,
            cluster_rss: master_rss + workers.iter().map(|w| w.rss).sum::<u64>(),
            workers,
            table: self.table.clone(),
            counters,
            master_rss,
            limits: Some(MemoryLimits {
                worker_rss_limit: self.cfg.policy.worker_rss_limit,
                cluster_memory_limit: self.cfg.policy.cluster_memory_limit,
                low_watermark: self.cfg.policy.low_watermark(),
                high_watermark: self.cfg.policy.high_watermark(),
            }),
        }
    }
}

/// What `stop` needs, moved to the blocking task that carries it out.
struct StopPlan {
    name: String,
    backend: crate::steering::BackendKind,
    worker_uid: u32,
    generation: u64,
    soft_kill_timeout: Duration,
    pids: Vec<i32>,
    pidfds: Vec<(i32, Arc<OwnedFd>)>,
}

impl StopPlan {
    /// Blocking: SIGTERM, wait, SIGKILL; then the steering and the state directory.
    fn carry_out(self, steering: &mut dyn Steering) -> Result<String> {
        let targets: Vec<kill::Target<'_>> = self
            .pidfds
            .iter()
            .map(|(pid, pidfd)| kill::Target {
                pid: *pid,
                pidfd: pidfd.as_ref(),
            })
            .collect();
        let killed = kill::stop_workers(&targets, self.soft_kill_timeout);
        // Workers of this cluster we did not know of (e.g. spawned by a master that died
        // while starting them) go too, if they are verifiably ours.
        let registry = identity::load_registry(&self.name);
        let strays: Vec<adopt::Adopted> = ProcessTable::read()
            .map(|t| {
                adopt::discover(
                    &adopt::Expect {
                        cluster: &self.name,
                        registry: registry.as_ref(),
                        worker_uid: self.worker_uid,
                        newest_generation: Some(self.generation),
                    },
                    &t,
                    &self.pids,
                )
            })
            .unwrap_or_default();
        if !strays.is_empty() {
            let targets: Vec<kill::Target<'_>> = strays
                .iter()
                .map(|a| kill::Target {
                    pid: a.worker.pid,
                    pidfd: &a.pidfd,
                })
                .collect();
            kill::stop_workers(&targets, self.soft_kill_timeout);
        }
        steering
            .teardown()
            .with_context(|| format!("removing the {} steering", self.backend))?;
        let dir = paths::state_dir(&self.name);
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        let message = format!(
            "cluster {:?} stopped: {} workers ended ({killed} needed SIGKILL), steering removed",
            self.name,
            self.pids.len() + strays.len()
        );
        log::info!("{message}");
        Ok(message)
    }
}
