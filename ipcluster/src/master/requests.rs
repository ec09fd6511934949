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
use super::supervisor::Worker;
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
        // The common case first: a ping of a worker already identified.
        if let Some(peer) = self.peers.get_mut(&conn)
            && let Some(pid) = peer.worker
            && let Some(w) = self.core.workers.get_mut(&pid)
            && take_ping(&mut peer.last_ping, w, line, Instant::now())
        {
            w.conn = Some(conn);
            return;
        }
        let Some(peer) = self.peers.get(&conn) else {
            return;
        };
        let who = || {
            format!(
                "pid {} uid {}",
                peer.pid.map_or("?".into(), |p| p.to_string()),
                peer.uid
            )
        };
        match Incoming::parse(line) {
            Err(e) => {
                let shown: String = line.chars().take(120).collect();
                log::warn!("control socket ({}): {e}; dropped: {shown:?}", who());
            }
            Ok(Incoming::Admin(request)) => {
                let euid = rustix::process::geteuid().as_raw();
                if peer.uid != 0 && peer.uid != euid {
                    log::warn!("control socket ({}): {request:?} refused: not root", who());
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
                        "control socket ({}): not a process of a worker of cluster {:?}; closing the connection",
                        who(),
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
            WorkerMessage::Ping { busy, stats, app } => apply_ping(w, now, stats, busy, app),
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

/// The ping line a peer last sent, as applied to its worker. An idle worker
/// sends the same line every time, and the same line can only set the same
/// `stats`, `app` and `busy` again (nothing else writes them): a repeat moves
/// the worker's last ping without being parsed.
#[derive(Debug)]
pub(super) struct LastPing {
    pid: i32,
    line: String,
}

/// A line from the peer of worker `w`: a ping is applied (without parsing
/// when it repeats the last one applied) and `true` returned; for anything
/// else the memo is forgotten and `false` returned (the caller parses the line).
fn take_ping(memo: &mut Option<LastPing>, w: &mut Worker, line: &str, now: Instant) -> bool {
    if memo
        .as_ref()
        .is_some_and(|m| m.pid == w.pid && m.line == line)
    {
        w.last_ping = Some(now);
        return true;
    }
    *memo = None;
    let Ok(Incoming::Worker(WorkerMessage::Ping { stats, busy, app })) = Incoming::parse(line)
    else {
        return false;
    };
    apply_ping(w, now, stats, busy, app);
    *memo = Some(LastPing {
        pid: w.pid,
        line: line.to_owned(),
    });
    true
}

fn apply_ping(
    w: &mut Worker,
    now: Instant,
    stats: serde_json::Value,
    busy: bool,
    app: serde_json::Value,
) {
    w.last_ping = Some(now);
    (w.stats, w.app) = (protocol::reported(stats), protocol::reported(app));
    if busy && !w.busy {
        log::info!("worker {} (band {}) says it is busy", w.pid, w.band);
    }
    w.busy = busy;
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: &str = r#"{"type":"ping","stats":{"requests":0},"busy":false,"app":{"v":"1"}}"#;
    const BUSY: &str = r#"{"type":"ping","stats":{"requests":7},"busy":true,"app":{"v":"1"}}"#;

    #[test]
    fn a_repeated_ping_only_moves_the_last_ping_and_a_changed_one_is_applied() {
        let t0 = Instant::now();
        let mut w = Worker::new(100, 0, 1, WorkerState::Live, vec![20000], t0);
        let mut memo = None;
        assert!(take_ping(&mut memo, &mut w, IDLE, t0));
        assert_eq!(w.stats, serde_json::json!({"requests": 0}));
        assert_eq!(w.app, serde_json::json!({"v": "1"}));
        assert!(!w.busy);

        // The same line again is not parsed: a value set behind the memo's back stays.
        w.stats = serde_json::json!("sentinel");
        let t1 = t0 + Duration::from_millis(500);
        assert!(take_ping(&mut memo, &mut w, IDLE, t1));
        assert_eq!(w.last_ping, Some(t1));
        assert_eq!(w.stats, serde_json::json!("sentinel"));
        w.stats = serde_json::json!({"requests": 0});

        // A changed line is applied, and becomes the one remembered.
        let t2 = t1 + Duration::from_millis(500);
        assert!(take_ping(&mut memo, &mut w, BUSY, t2));
        assert_eq!(w.stats, serde_json::json!({"requests": 7}));
        assert!(w.busy);
        assert_eq!(w.last_ping, Some(t2));

        // Back to the first line: applied again (not mistaken for a repeat).
        let t3 = t2 + Duration::from_millis(500);
        assert!(take_ping(&mut memo, &mut w, IDLE, t3));
        assert_eq!(w.stats, serde_json::json!({"requests": 0}));
        assert!(!w.busy);
        assert_eq!(w.last_ping, Some(t3));
    }

    #[test]
    fn the_memo_belongs_to_one_worker_and_other_lines_forget_it() {
        let t0 = Instant::now();
        let mut first = Worker::new(100, 0, 1, WorkerState::Live, vec![20000], t0);
        let mut other = Worker::new(200, 1, 1, WorkerState::Live, vec![20001], t0);
        let mut memo = None;
        assert!(take_ping(&mut memo, &mut first, BUSY, t0));
        // The same line for another worker is applied to it, not skipped.
        assert!(take_ping(&mut memo, &mut other, BUSY, t0));
        assert!(other.busy);
        assert_eq!(other.stats, serde_json::json!({"requests": 7}));

        // A line that is not a ping is left to the caller and forgets the memo.
        let hello = r#"{"type":"hello","band":1,"generation":1}"#;
        assert!(!take_ping(&mut memo, &mut other, hello, t0));
        assert!(memo.is_none());
        assert!(!take_ping(&mut memo, &mut other, "not json", t0));
        other.stats = serde_json::Value::Null;
        assert!(take_ping(&mut memo, &mut other, BUSY, t0));
        assert_eq!(other.stats, serde_json::json!({"requests": 7}));
    }
}
