//! The master (docs/design.md, "Lifecycle of a master"): take the cluster lock and
//! stop the previous master, adopt its workers, install or re-open the
//! steering, spawn a new generation band by band, publish its table once the
//! bands are ready, retire the old generation, then supervise: readiness,
//! crashes, the policy's decisions, the control socket and signals.
//!
//! One tokio current-thread loop owns all state; /proc is read in short
//! synchronous steps. What can block for long goes to the steering writer
//! thread (`writer`): every write to the steering backend (a generation's
//! table, a band's promotion or stand-in), the reads of its counters (for
//! `status` and scrapes: `iptables-save`), and `stop`; each outcome comes back
//! to the loop as an event, in the order asked for, and what depends on it
//! (retiring the old generation, answering `status`) happens then. The loop
//! has no fixed tick: it sleeps until the next deadline of the supervisor
//! core ([`supervisor::Supervisor::next_deadline`]: a due spawn, the
//! readiness poll while a worker starts, a soft-kill deadline, the
//! kill-retired queue, the monitor pass) or the systemd watchdog, and events
//! (exits, control lines, signals, scrapes, steering outcomes) wake it.
//!
//! - `start`: start-up (lock, adopt, install the steering, the control
//!   socket); this module is the runtime that follows: it gathers facts,
//!   feeds them to the core as events and carries out its effects.
//! - [`supervisor`]: the core without I/O: the one `Worker` type, the schedule
//!   and "when is a worker retired?"; its transitions take events and return
//!   effects ([`supervisor::Supervisor::handle`]).
//! - `writer`: the steering writer thread.
//! - [`lock`]: the cluster lock and handing over from the previous master.
//! - [`registry`], `identity`: the registry of workers (pid, start time, band,
//!   generation, ports, uid) the next master adopts from.
//! - [`adopt`]: finding the previous generations' workers (registry first,
//!   environment as a checked fallback), each held by a pidfd.
//! - [`spawn`]: a worker's command, environment, session, user and ports.
//! - [`process_tree`], [`sock_diag`]: readiness, connections and RSS of a worker's tree;
//!   `census`: connections per worker from one filtered dump per monitor pass.
//! - [`pidfd`], [`kill`]: noticing exits; every signal through a pidfd.
//! - `fallback`: a band whose worker is gone is served by a stand-in at once.
//! - [`files`]: the state and pin directories must be closed to others.
//! - [`generation`]: when a generation's table is published (pure).
//! - [`control`], `requests`: the control socket and what peers may say on it.
//! - [`state`], [`status`], [`client`]: what persists, `status`, `stop`, `kill-retired`.
//! - the supervision rules themselves are [`crate::policy::decide`].

pub mod adopt;
mod boost;
mod census;
pub mod client;
pub mod control;
pub mod detach;
mod fallback;
pub mod files;
pub mod generation;
mod identity;
pub mod kill;
mod listeners;
pub mod lock;
pub mod metrics;
pub mod notify;
pub mod pidfd;
pub mod process_tree;
pub mod registry;
mod requests;
pub mod sock_diag;
pub mod spawn;
mod start;
pub mod state;
pub mod status;
pub mod supervisor;
mod writer;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use nix::sys::signal::Signal;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::cli::RunArgs;
use crate::paths;
use crate::policy::{self, ClusterSnapshot, PolicySettings, WorkerState};
use crate::protocol::MasterMessage;
use crate::steering::{self, BackendKind, Steering, SteeringConfig, SteeringTable};

use control::ControlEvent;
use lock::ClusterLock;
use process_tree::{ProcessTable, SocketTable};
use spawn::{PortAllocator, RunAs, WorkerCommand, WorkerSpec};
use state::ClusterState;
use supervisor::{Effect, Supervisor};

/// A policy note of the same shape is written at most this often.
const POLICY_LOG_REPEAT: Duration = Duration::from_secs(10);
/// Why a master exits when a new master (a reload) asks it to.
const HANDED_OVER: &str = "a new master took over";

/// The distinct public ports of `listens`, in order of first appearance: a
/// worker gets one port for each.
pub fn public_ports(listens: &[SocketAddr]) -> Vec<u16> {
    let mut ports = Vec::new();
    for l in listens {
        if !ports.contains(&l.port()) {
            ports.push(l.port());
        }
    }
    ports
}

/// `ipcluster run`.
pub fn run(args: RunArgs) -> Result<()> {
    if args.detach {
        return detach::run_detached(&args.name.name);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the master's event loop")?;
    runtime.block_on(async move {
        let mut master = Master::start(args).await?;
        master.run().await
    })
}

/// The settled command line.
struct Config {
    name: String,
    backend: BackendKind,
    listens: Vec<SocketAddr>,
    publics: Vec<u16>,
    bands: u32,
    band_shift: u8,
    interfaces: Vec<String>,
    flow_entries: u32,
    ebpf_log: bool,
    command: WorkerCommand,
    run_as: Option<RunAs>,
    policy: PolicySettings,
    spawn_delay: Duration,
    connect_timeout: Duration,
    soft_kill_timeout: Duration,
    monitor_interval: Duration,
    retire_renice: i32,
    port_range: std::ops::RangeInclusive<u16>,
    metrics_listen: Option<SocketAddr>,
}

impl Config {
    fn from_args(args: &RunArgs) -> Result<Config> {
        let listens = args.listens();
        for (i, l) in listens.iter().enumerate() {
            if listens[..i].contains(l) {
                bail!("--listen {l} is given twice");
            }
        }
        let publics = public_ports(&listens);
        let bands = args.worker_count();
        let command = WorkerCommand::from_cli(&args.command, &args.env)?;
        let run_as = args.user.as_deref().map(RunAs::lookup).transpose()?;
        let needed = u32::try_from(publics.len())
            .unwrap_or(u32::MAX)
            .saturating_mul(bands);
        let available = u32::from(*args.port_range.end() - *args.port_range.start()) + 1;
        if available < needed.saturating_mul(2) {
            bail!(
                "--port-range {}-{} has {available} ports; {bands} workers × {} public ports need at \
                 least {} (twice the workers, so that a reload has room)",
                args.port_range.start(),
                args.port_range.end(),
                publics.len(),
                needed * 2
            );
        }
        Ok(Config {
            name: args.name.name.clone(),
            backend: args.backend,
            listens,
            publics,
            bands,
            band_shift: args.band_shift,
            interfaces: args.iface.clone(),
            flow_entries: args.flow_entries,
            ebpf_log: args.ebpf_log,
            command,
            run_as,
            policy: PolicySettings::from_run_args(args),
            spawn_delay: args.spawn_delay,
            connect_timeout: args.connect_timeout,
            soft_kill_timeout: args.soft_kill_timeout,
            monitor_interval: args.monitor_interval,
            retire_renice: args.retire_renice,
            port_range: args.port_range.clone(),
            metrics_listen: args.metrics_listen,
        })
    }

    fn steering_config(&self) -> SteeringConfig {
        SteeringConfig {
            cluster: self.name.clone(),
            services: self.listens.clone(),
            interfaces: self.interfaces.clone(),
            flow_entries: self.flow_entries,
        }
    }

    /// Worker port of each service, from a worker's per-public-port ports.
    fn service_ports(&self, worker_ports: &[u16]) -> Vec<u16> {
        self.listens
            .iter()
            .map(|l| {
                let i = self
                    .publics
                    .iter()
                    .position(|&p| p == l.port())
                    .unwrap_or(0);
                worker_ports.get(i).copied().unwrap_or(0)
            })
            .collect()
    }
}

/// A control-socket peer.
struct Peer {
    pid: Option<i32>,
    uid: u32,
    outgoing: mpsc::UnboundedSender<String>,
    worker: Option<i32>,
    /// Its last ping line, applied (see `requests::take_ping`).
    last_ping: Option<requests::LastPing>,
}

/// The steering backend, shared by the loop and the steering writer.
type SharedSteering = Arc<std::sync::Mutex<Box<dyn Steering>>>;

enum Event {
    Control(ControlEvent),
    WorkerExited(i32),
    /// `GET /metrics` on `--metrics-listen`.
    Scrape(metrics::ScrapeRequest),
    /// The steering writer wrote (or failed to write) a generation's table.
    Published(Publication),
    /// The steering writer pointed a band at a worker (or failed to).
    BandSet(BandWrite),
    /// The steering writer carried out `ipcluster stop` asked on `conn`.
    Stopped {
        conn: u64,
        result: Result<String>,
    },
    /// The steering writer read the backend's counters for a status or a scrape.
    Counters {
        asker: CountersFor,
        counters: Option<steering::Counters>,
    },
    /// A steering write panicked: whatever it was for may be asked again.
    WriteLost,
    /// A retired worker's tree was reniced (off the loop).
    Reniced(Retired),
    /// The steering writer registered again the listeners missing from the
    /// backend's map (the errors, if any).
    Reregistered {
        errors: Vec<String>,
    },
    /// The steering writer handed a listening starting worker's sockets to
    /// the backend (sk-lookup), or failed to (`Err`: why).
    Registered {
        pid: i32,
        ready: supervisor::Readiness,
        result: Result<(), String>,
    },
}

/// A retirement, and how many threads of the worker's tree were reniced by
/// `increment`.
struct Retired {
    pid: i32,
    band: u32,
    generation: u64,
    reason: String,
    /// It was told on its control connection.
    told: bool,
    increment: i32,
    threads: usize,
}

/// Who the backend's counters are read for.
enum CountersFor {
    /// `status` asked on this connection.
    Status(u64),
    Scrape(metrics::ScrapeRequest),
}

/// Why a band is pointed at a worker.
enum BandPurpose {
    /// The band's ready worker takes it over.
    Promotion,
    /// The band's worker is gone; `who` serves it meanwhile.
    StandIn { who: String, from: u16 },
}

/// The outcome of pointing a band (of some services) at a worker.
struct BandWrite {
    pid: i32,
    band: u32,
    /// (service, worker port) in the order written.
    ports: Vec<(usize, u16)>,
    /// How long each write took, for those made.
    took: Vec<Duration>,
    /// The first failure; the writes before it were made.
    result: Result<(), steering::SteeringError>,
    purpose: BandPurpose,
}

impl BandWrite {
    /// Point `band` of each service at its port, stopping at the first failure.
    fn make(
        steering: &mut dyn Steering,
        pid: i32,
        band: u32,
        ports: Vec<(usize, u16)>,
        purpose: BandPurpose,
    ) -> BandWrite {
        let mut took = Vec::new();
        let mut result = Ok(());
        for &(service, port) in &ports {
            let started = Instant::now();
            let set = steering.set_band(service, band, port);
            took.push(started.elapsed());
            if let Err(e) = set {
                result = Err(e);
                break;
            }
        }
        BandWrite {
            pid,
            band,
            ports,
            took,
            result,
            purpose,
        }
    }
}

/// The outcome of writing a generation's table, back on the loop.
struct Publication {
    table: SteeringTable,
    /// The band's ready worker the table points at, by band.
    ready: BTreeMap<u32, i32>,
    took: Duration,
    result: Result<(), steering::SteeringError>,
}

/// Why the loop ended.
enum Exit {
    /// SIGTERM/SIGINT or a new master: workers and steering stay.
    Handover(String),
    /// `ipcluster stop`: everything was removed.
    Stopped,
    /// Start-up failed: what this master created was removed.
    Failed(anyhow::Error),
}

struct Master {
    cfg: Config,
    generation: u64,
    /// The workers and what is due when (no I/O in there).
    core: Supervisor,
    /// Each worker's pidfd: every signal to it goes through it.
    pidfds: HashMap<i32, Arc<OwnedFd>>,
    /// Shared with the steering writer, which makes every write to it: the
    /// loop reads from it (counters, listeners) and never waits for a write.
    steering: SharedSteering,
    writer: writer::SteeringWriter,
    /// A generation's table is being written by the steering writer.
    publishing: bool,
    /// The ready workers whose band is being pointed at them.
    promoting: HashSet<i32>,
    /// The listening starting workers whose sockets the steering writer is
    /// handing to the backend (sk-lookup).
    registering: HashSet<i32>,
    /// The steering writer is registering missing listeners again.
    reregistering: bool,
    /// The bands (service, band) a stand-in is being steered to.
    covering: HashSet<(usize, u32)>,
    /// `stop` is being carried out by the steering writer: nothing else happens.
    stopping: bool,
    /// The table in force, as we last wrote or read it.
    table: Option<SteeringTable>,
    /// The table found at install, if it fits this generation's shape.
    previous_table: Option<SteeringTable>,
    next_publish_try: Instant,
    ports: PortAllocator,
    /// The policy's last `Log` (its shape, digits left out) and when it was
    /// written, and how many like it were left out since.
    last_policy_log: Option<(String, Instant, u32)>,
    peers: HashMap<u64, Peer>,
    events_tx: mpsc::UnboundedSender<Event>,
    events_rx: mpsc::UnboundedReceiver<Event>,
    /// No cluster existed before us: on a failed start-up, remove everything.
    fresh: bool,
    created_dir: bool,
    /// Connections per worker from one filtered dump per monitor pass.
    census: census::Census,
    /// The process table between passes, refreshed incrementally.
    processes: process_tree::ProcessCache,
    exit: Option<Exit>,
    /// systemd's notifications and the `--detach` pipe.
    notifier: notify::Notifier,
    metrics: metrics::Metrics,
    _lock: ClusterLock,
}

impl Master {
    /// The steering backend, for what the loop does itself (sk-lookup
    /// listeners, the teardown after a failed start-up). A call waits for at
    /// most the write the steering writer is making.
    fn steering(&self) -> std::sync::MutexGuard<'_, Box<dyn Steering>> {
        lock_steering(&self.steering)
    }

    fn command_line(&self) -> String {
        std::iter::once(self.cfg.command.program.display().to_string())
            .chain(self.cfg.command.args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Report when `pid` exits (pidfd).
    fn watch(&self, pid: i32) {
        let Some(fd) = self.watch_fd(pid) else { return };
        let tx = self.events_tx.clone();
        tokio::spawn(async move {
            pidfd::exited(fd).await;
            let _ = tx.send(Event::WorkerExited(pid));
        });
    }

    async fn run(&mut self) -> Result<()> {
        let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        let mut sigusr1 = signal(SignalKind::user_defined1()).context("SIGUSR1 handler")?;
        let mut sighup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
        while self.exit.is_none() {
            let deadline = tokio::time::Instant::from_std(self.next_deadline(Instant::now()));
            tokio::select! {
                _ = sigterm.recv() => {
                    self.notifier.stopping("SIGTERM");
                    self.exit = Some(Exit::Handover("SIGTERM".into()));
                }
                _ = sigint.recv() => {
                    self.notifier.stopping("SIGINT");
                    self.exit = Some(Exit::Handover("SIGINT".into()));
                }
                _ = sighup.recv() => log::info!("SIGHUP ignored (reload = run `ipcluster run` again)"),
                _ = sigusr1.recv() => {
                    let n = self.core.queue_kill_retired("SIGUSR1: kill the retired workers");
                    log::info!(
                        "SIGUSR1: killing {n} retired workers, one every {:?}",
                        self.cfg.spawn_delay
                    );
                }
                Some(event) = self.events_rx.recv() => {
                    self.handle_event(event);
                    // A promotion or an exit changes what systemd is told.
                    self.notify(Instant::now());
                }
                _ = tokio::time::sleep_until(deadline) => self.on_tick(),
            }
        }
        // Let connection tasks write their last replies.
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The writes asked for are made before the master exits.
        self.writer.finish();
        match self.exit.take() {
            Some(Exit::Handover(why))
                if self.fresh && !self.core.published && why == HANDED_OVER =>
            {
                // A second `run` while this one was still starting: the state
                // directory (its lock, its registry) and the steering are the
                // new master's now. Only the workers that never served go.
                log::info!(
                    "master exits ({why}) before the cluster ever served: stopping the workers \
                     it started, leaving the state directory and the steering to the new master"
                );
                self.stop_own_workers();
                Ok(())
            }
            Some(Exit::Handover(why)) if self.fresh && !self.core.published => {
                log::info!(
                    "master exits ({why}) before the cluster ever served: removing what it created"
                );
                self.clean_up_failed_start();
                Ok(())
            }
            Some(Exit::Handover(why)) => {
                log::info!(
                    "master exits ({why}); {} workers and the steering stay (`ipcluster stop --name {}` ends them)",
                    self.core.workers.len(),
                    self.cfg.name
                );
                Ok(())
            }
            Some(Exit::Stopped) | None => Ok(()),
            Some(Exit::Failed(e)) => {
                self.notifier.failed(&format!("{e:#}"));
                self.clean_up_failed_start();
                Err(e)
            }
        }
    }

    fn handle_event(&mut self, event: Event) {
        match event {
            Event::WorkerExited(pid) => self.on_worker_exit(pid),
            Event::Published(publication) => self.on_published(publication),
            Event::BandSet(write) => self.on_band_set(write),
            Event::Stopped { conn, result } => self.on_stopped(conn, result),
            Event::Reniced(retired) => self.on_reniced(retired),
            Event::Registered { pid, ready, result } => self.on_registered(pid, ready, result),
            Event::Reregistered { errors } => {
                self.reregistering = false;
                for e in errors {
                    log::warn!("{e}");
                }
            }
            Event::WriteLost => {
                self.publishing = false;
                self.registering.clear();
                self.reregistering = false;
                self.promoting.clear();
                self.covering.clear();
            }
            Event::Scrape(request) => self.read_counters(CountersFor::Scrape(request)),
            Event::Counters { asker, counters } => self.on_counters(asker, counters),
            Event::Control(ControlEvent::Connected {
                conn,
                pid,
                uid,
                outgoing,
            }) => {
                self.peers.insert(
                    conn,
                    Peer {
                        pid,
                        uid,
                        outgoing,
                        worker: None,
                        last_ping: None,
                    },
                );
            }
            Event::Control(ControlEvent::Line { conn, line }) => self.on_line(conn, &line),
            Event::Control(ControlEvent::Disconnected { conn }) => {
                if let Some(peer) = self.peers.remove(&conn)
                    && let Some(w) = peer.worker.and_then(|pid| self.core.workers.get_mut(&pid))
                    && w.conn == Some(conn)
                {
                    w.conn = None;
                }
            }
        }
    }

    // ---- spawning and readiness -------------------------------------------------

    fn on_tick(&mut self) {
        if self.stopping {
            return;
        }
        // Never wait for a publish in flight for this.
        if let Ok(mut steering) = self.steering.try_lock() {
            steering.poll_kernel_log();
        }
        let now = Instant::now();
        // The due spawn, a ready worker's failed band write again, the
        // soft-kill deadlines, then the kill-retired queue.
        let effects = self.core.handle(now, supervisor::Event::Tick);
        self.carry_out_effects(effects);
        self.check_starting();
        self.try_publish(now);
        if now >= self.core.schedule.next_monitor {
            self.core.schedule.next_monitor = now + self.cfg.monitor_interval;
            self.monitor(now);
        }
        self.notify(now);
    }

    /// When [`Master::on_tick`] has something to do next: the core's next
    /// deadline ([`Supervisor::next_deadline`]), the systemd watchdog, and the
    /// kernel log poll with `--ebpf-log`.
    fn next_deadline(&self, now: Instant) -> Instant {
        let kernel_log = self.cfg.ebpf_log.then_some(now + supervisor::STARTING_POLL);
        self.core.next_deadline(
            now,
            [self.notifier.next_deadline(), kernel_log]
                .into_iter()
                .flatten(),
        )
    }

    /// Spawn a worker for `band` ([`Effect::Spawn`]) and tell the core how it went.
    fn spawn(&mut self, band: u32) {
        let event = match self.spawn_worker(band) {
            Ok(spawned) => spawned,
            Err(e) => supervisor::Event::SpawnFailed {
                band,
                error: format!("{e:#}"),
                may_give_up: self.may_give_up(),
            },
        };
        let effects = self.core.handle(Instant::now(), event);
        self.carry_out_effects(effects);
    }

    fn spawn_worker(&mut self, band: u32) -> Result<supervisor::Event> {
        let mut taken: HashSet<u16> = self
            .core
            .workers
            .values()
            .flat_map(|w| w.ports.clone())
            .collect();
        if let Some(t) = &self.table {
            taken.extend(
                t.services
                    .iter()
                    .flat_map(|s| s.worker_ports.iter().copied()),
            );
        }
        // port_is_free (a test bind) also refuses ports with TIME_WAIT sockets.
        let mut ports = Vec::new();
        for _ in &self.cfg.publics {
            let port = self.ports.allocate(&taken)?;
            taken.insert(port);
            ports.push(port);
        }
        let spec = WorkerSpec {
            cluster: self.cfg.name.clone(),
            band,
            bands: self.cfg.bands,
            generation: self.generation,
            control_socket: paths::control_socket(&self.cfg.name),
            ports: self
                .cfg
                .publics
                .iter()
                .copied()
                .zip(ports.iter().copied())
                .collect(),
        };
        let spawned = spawn::spawn_worker(&self.cfg.command, &spec, self.cfg.run_as.as_ref())?;
        let pid = spawned.pid;
        self.pidfds.insert(pid, Arc::new(spawned.pidfd));
        self.watch(pid);
        Ok(supervisor::Event::Spawned {
            band,
            pid,
            ports,
            start_time: spawned.start_time,
            uid: identity::worker_uid(self.cfg.run_as.as_ref()),
        })
    }

    /// Readiness (a LISTEN socket on every port of the worker, owned by its
    /// process tree, handed to the steering backend) of the starting workers:
    /// what is seen goes to the core, which decides (ready, the connect
    /// timeout).
    fn check_starting(&mut self) {
        let waiting = self.core.awaiting_readiness();
        if waiting.is_empty() {
            return;
        }
        // Readiness needs only the starting workers' own ports.
        let ports: Vec<u16> = waiting
            .iter()
            .filter_map(|pid| self.core.workers.get(pid))
            .flat_map(|w| w.ports.clone())
            .collect();
        let (Ok(processes), Ok(sockets)) = (ProcessTable::read(), SocketTable::read_ports(&ports))
        else {
            return;
        };
        for pid in waiting {
            let Some(w) = self.core.workers.get(&pid) else {
                continue;
            };
            let m = process_tree::measure(&processes, &sockets, pid, &w.ports, &self.cfg.publics);
            let listening = supervisor::Readiness::Listening {
                rss: m.rss,
                connections: m.connections,
                nice: m.nice,
            };
            let event = if !m.listening {
                supervisor::Event::NotReady {
                    pid,
                    seen: supervisor::NotReady::NotListening {
                        foreign_netns: process_tree::foreign_netns(&processes.tree(pid)),
                    },
                    may_give_up: self.may_give_up(),
                }
            } else if self.cfg.backend == BackendKind::SkLookup {
                // Ready for steering once its sockets are the backend's: the
                // steering writer registers them (/proc reads, map writes)
                // and reports back ([`Master::on_registered`]).
                if self.registering.insert(pid) {
                    let (holders, ports) = (processes.tree(pid), w.ports.clone());
                    let sockets = sockets.clone();
                    self.write_steering(Box::new(move |steering| Event::Registered {
                        pid,
                        result: listeners::register(steering, pid, &holders, &ports, &sockets)
                            .map_err(|e| e.to_string()),
                        ready: listening,
                    }));
                }
                continue;
            } else {
                supervisor::Event::Ready {
                    pid,
                    how: listening,
                }
            };
            let effects = self.core.handle(Instant::now(), event);
            self.carry_out_effects(effects);
        }
    }

    /// A listening starting worker's sockets were handed to the backend (it
    /// is ready), or not (not ready for steering yet; the cause is kept).
    fn on_registered(
        &mut self,
        pid: i32,
        ready: supervisor::Readiness,
        result: Result<(), String>,
    ) {
        self.registering.remove(&pid);
        let event = match result {
            Ok(()) => supervisor::Event::Ready { pid, how: ready },
            Err(cause) => supervisor::Event::NotReady {
                pid,
                seen: supervisor::NotReady::NotSteerable { cause },
                may_give_up: self.may_give_up(),
            },
        };
        let effects = self.core.handle(Instant::now(), event);
        self.carry_out_effects(effects);
    }

    /// Worker `pid` is ready (`how`).
    fn ready(&mut self, pid: i32, how: supervisor::Readiness) {
        let effects = self
            .core
            .handle(Instant::now(), supervisor::Event::Ready { pid, how });
        self.carry_out_effects(effects);
    }

    /// The cluster never served (nothing published, no previous table): a
    /// band that keeps failing ends `run`.
    fn may_give_up(&self) -> bool {
        !self.core.published && self.previous_table.is_none()
    }

    /// A band failed too often before the cluster ever served: `run` fails.
    fn give_up(&mut self, band: u32, attempts: u32, why: &str) {
        self.exit = Some(Exit::Failed(anyhow::anyhow!(
            "band {band}'s worker failed {attempts} times before the cluster ever served ({why}); \
             giving up: check the command `{}`",
            self.command_line()
        )));
    }

    // ---- publishing --------------------------------------------------------------

    /// Publish this generation's table when every band is ready, or (with a
    /// previous table of the same shape) when every band is ready or has failed
    /// at least once: those keep their old worker for now.
    fn try_publish(&mut self, now: Instant) {
        if self.core.published || self.publishing || now < self.next_publish_try {
            return;
        }
        let ready: BTreeMap<u32, i32> = self
            .core
            .workers
            .values()
            .filter(|w| {
                w.state == WorkerState::Starting
                    && w.ready
                    && w.generation == self.generation
                    && w.band < self.cfg.bands
            })
            .map(|w| (w.band, w.pid))
            .collect();
        let ready_ports: BTreeMap<u32, Vec<u16>> = ready
            .iter()
            .filter_map(|(&band, pid)| {
                Some((
                    band,
                    self.cfg.service_ports(&self.core.workers.get(pid)?.ports),
                ))
            })
            .collect();
        let shape = generation::Shape {
            listens: &self.cfg.listens,
            band_shift: self.cfg.band_shift,
            bands: self.cfg.bands,
        };
        let core = &self.core;
        let table = match generation::table_to_publish(
            &shape,
            &ready_ports,
            |band| core.band_has_failed(band),
            self.previous_table.as_ref(),
        ) {
            Ok(Some(table)) => table,
            Ok(None) => return,
            Err(e) => {
                log::error!(
                    "the table of generation {} is invalid: {e}",
                    self.generation
                );
                self.next_publish_try = now + Duration::from_secs(1);
                return;
            }
        };
        // iptables-restore can take long under load: the steering writer
        // writes the table, and the rest happens when it reports back
        // ([`Master::on_published`]): no worker is retired before that.
        self.publishing = true;
        self.write_steering(Box::new(move |steering| {
            let started = Instant::now();
            let result = steering.publish(&table);
            Event::Published(Publication {
                table,
                ready,
                took: started.elapsed(),
                result,
            })
        }));
    }

    /// Queue a write behind the ones asked for before.
    fn write_steering(&mut self, job: writer::Job) {
        if !self.writer.submit(job) {
            log::error!("the steering writer is gone: a steering write is lost");
        }
    }

    /// Have the steering writer read the counters (`iptables-save` can take
    /// long) after the writes asked for before; the answer goes out when they
    /// come back ([`Master::on_counters`]).
    fn read_counters(&mut self, asker: CountersFor) {
        self.write_steering(Box::new(move |steering| Event::Counters {
            asker,
            counters: steering
                .counters()
                .map_err(|e| log::debug!("counters: {e}"))
                .ok(),
        }));
    }

    fn on_counters(&mut self, asker: CountersFor, counters: Option<steering::Counters>) {
        match asker {
            CountersFor::Status(conn) => {
                let report = self.status_report(counters);
                self.send(conn, &report);
            }
            CountersFor::Scrape(request) => {
                let text = self.metrics.encode(&self.metrics_snapshot(counters));
                let _ = request.reply.try_send(text);
            }
        }
    }

    /// The generation's table is in force (or failed to be written): the new
    /// generation goes live and the workers it no longer steers to retire.
    fn on_published(&mut self, publication: Publication) {
        let Publication {
            table,
            ready,
            took,
            result,
        } = publication;
        self.publishing = false;
        let now = Instant::now();
        self.metrics.published("table", took, result.is_ok());
        if let Err(e) = result {
            log::error!(
                "publishing the table of generation {} failed: {e}; retrying in 1s",
                self.generation
            );
            self.next_publish_try = now + Duration::from_secs(1);
            return;
        }
        let all_ready = ready.len() == self.cfg.bands as usize;
        log::info!(
            "published generation {} in {took:?}: {}{}",
            self.generation,
            describe_table(&table),
            if all_ready {
                String::new()
            } else {
                let kept: Vec<u32> = (0..self.cfg.bands)
                    .filter(|b| !ready.contains_key(b))
                    .collect();
                format!(" (bands {kept:?} keep their previous worker for now)")
            }
        );
        let steered = table
            .services
            .iter()
            .flat_map(|s| s.worker_ports.iter().copied())
            .collect();
        self.table = Some(table);
        if let Err(e) = self.save_state() {
            log::warn!("{e:#}");
        }
        // The new generation goes live, the workers the table no longer
        // points at retire, and a worker of the table that exited while it
        // was written leaves a band to a stand-in.
        let effects = self.core.handle(
            now,
            supervisor::Event::Published {
                ready: ready.into_values().collect(),
                steered,
            },
        );
        self.carry_out_effects(effects);
    }

    /// A ready worker replaces its band's live worker (crash, health retirement,
    /// or a band that was late for the generation's table).
    fn promote(&mut self, pid: i32) {
        let Some(w) = self.core.workers.get(&pid) else {
            return;
        };
        if !self.promoting.insert(pid) {
            return;
        }
        let (band, ports) = (w.band, self.cfg.service_ports(&w.ports));
        let ports: Vec<(usize, u16)> = ports.into_iter().enumerate().collect();
        self.write_steering(Box::new(move |steering| {
            Event::BandSet(BandWrite::make(
                steering,
                pid,
                band,
                ports,
                BandPurpose::Promotion,
            ))
        }));
    }

    /// A band was pointed at a worker (or not): mirror it, and finish the
    /// promotion or the stand-in.
    fn on_band_set(&mut self, write: BandWrite) {
        let BandWrite {
            pid,
            band,
            ports,
            took,
            result,
            purpose,
        } = write;
        let made = took.len();
        for (i, took) in took.into_iter().enumerate() {
            let ok = i + 1 < made || result.is_ok();
            self.metrics.published("band", took, ok);
            let Some(&(service, port)) = ports.get(i) else {
                continue;
            };
            if ok
                && let Some(t) = &mut self.table
                && let Err(e) = t.set_band(service, band, port)
            {
                log::warn!("table mirror: {e}");
            }
        }
        match purpose {
            BandPurpose::Promotion => {
                self.promoting.remove(&pid);
                if let Err(e) = result {
                    log::error!("steering band {band} to worker {pid} failed: {e}; will retry");
                    return;
                }
                self.promoted(pid, ports.first().map_or(0, |&(_, p)| p));
            }
            BandPurpose::StandIn { who, from } => {
                let listens = self.cfg.listens.clone();
                for &(service, to) in &ports {
                    self.covering.remove(&(service, band));
                    let listen = listens
                        .get(service)
                        .map_or_else(String::new, ToString::to_string);
                    match &result {
                        Err(e) => log::error!(
                            "band {band} of {listen}: port {from} has no worker; steering it to \
                             {who} failed: {e}"
                        ),
                        Ok(()) => log::warn!(
                            "band {band} of {listen}: port {from} has no worker any more; {who} \
                             serves it on port {to} until its replacement is ready"
                        ),
                    }
                }
            }
        }
        // The worker written in may have exited meanwhile (after a failure
        // the band stays as it was: no retry from here).
        if result.is_ok() {
            self.cover_unserved_bands();
        }
    }

    /// Worker `pid` is steered to for its band now (on `port`).
    fn promoted(&mut self, pid: i32, port: u16) {
        let effects = self
            .core
            .handle(Instant::now(), supervisor::Event::Promoted { pid, port });
        self.carry_out_effects(effects);
    }

    /// Out of the table already: tell the worker, and renice its tree.
    fn retire(&mut self, pid: i32, reason: &str) {
        let Some(w) = self.core.retire(pid, Instant::now(), reason) else {
            return;
        };
        self.metrics.retired(reason);
        let (band, generation, conn) = (w.band, w.generation, w.conn);
        if let Some(conn) = conn {
            self.send(
                conn,
                &MasterMessage::Retire {
                    reason: reason.into(),
                },
            );
        }
        // Reading /proc and renicing every thread of the tree is blocking
        // work: off the event loop; the outcome comes back as an event.
        let retired = Retired {
            pid,
            band,
            generation,
            reason: reason.to_owned(),
            told: conn.is_some(),
            increment: self.cfg.retire_renice,
            threads: 0,
        };
        let events = self.events_tx.clone();
        tokio::task::spawn_blocking(move || {
            let threads = ProcessTable::read()
                .map(|t| process_tree::renice(&t, &t.tree(pid), retired.increment))
                .unwrap_or(0);
            // The loop is gone when the master exits: nobody to tell.
            let _ = events.send(Event::Reniced(Retired { threads, ..retired }));
        });
    }

    /// A retired worker's tree was reniced (`threads` threads).
    fn on_reniced(&self, r: Retired) {
        log::info!(
            "retired worker {} (band {}, generation {}): {}; reniced +{} ({} threads){}",
            r.pid,
            r.band,
            r.generation,
            r.reason,
            r.increment,
            r.threads,
            if r.told { "; told it to retire" } else { "" }
        );
    }

    // ---- exits, dying, killing ---------------------------------------------------

    fn on_worker_exit(&mut self, pid: i32) {
        let now = Instant::now();
        let Some(own_child) = self.core.workers.get(&pid).map(|w| w.own_child) else {
            return;
        };
        let pidfd = self.pidfds.remove(&pid);
        let status =
            if own_child { pidfd::reap(pid) } else { None }.unwrap_or_else(|| "exited".into());
        // Whatever the worker left in its process group is unsupervised now
        // (the pidfd still names that group, whatever became of the pid).
        if let Some(pidfd) = &pidfd
            && let Err(e) = pidfd::signal_group(pidfd, pid, Signal::SIGKILL)
        {
            log::debug!("SIGKILL to what is left of worker {pid}'s group: {e}");
        }
        let may_give_up = self.may_give_up();
        let effects = self.core.handle(
            now,
            supervisor::Event::Exited {
                pid,
                status,
                may_give_up,
            },
        );
        self.carry_out_effects(effects);
    }

    /// What the core asks for, in order.
    fn carry_out_effects(&mut self, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Spawn { band } => self.spawn(band),
                Effect::Promote { pid } => self.promote(pid),
                Effect::Signal { pid, signal, .. } => self.signal(pid, signal),
                Effect::Send { pid, message } => {
                    if let Some(conn) = self.core.workers.get(&pid).and_then(|w| w.conn) {
                        self.send(conn, &message);
                    }
                }
                Effect::CountKill { reason, how } => self.metrics.killed(&reason, how),
                Effect::Log { level, text } => log::log!(level, "{text}"),
                Effect::PolicyNote { message } => self.policy_log(message, Instant::now()),
                Effect::CountCrash => self.metrics.crashed(),
                Effect::SaveRegistry => self.save_registry(),
                Effect::CoverUnservedBands => self.cover_unserved_bands(),
                Effect::Retire { pid, reason } => self.retire(pid, &reason),
                Effect::ForgetConn { conn } => {
                    self.peers.remove(&conn);
                }
                Effect::GiveUp {
                    band,
                    attempts,
                    why,
                } => self.give_up(band, attempts, &why),
            }
        }
    }

    // ---- monitoring and the policy -------------------------------------------

    fn monitor(&mut self, now: Instant) {
        // One dump for the whole cluster: its workers' ports and the public ports.
        let mut ports: Vec<u16> = self
            .core
            .workers
            .values()
            .flat_map(|w| w.ports.clone())
            .collect();
        ports.extend(&self.cfg.publics);
        let (Ok(processes), Ok(sockets)) = (self.processes.refresh(), self.census.sockets(&ports))
        else {
            log::warn!("cannot read /proc this time");
            return;
        };
        let keys: Vec<census::WorkerKey> = self
            .core
            .workers
            .values()
            .map(|w| census::WorkerKey {
                pid: w.pid,
                ports: w.ports.clone(),
                tree: processes.tree(w.pid),
            })
            .collect();
        self.processes
            .set_members(keys.iter().flat_map(|k| k.tree.iter().copied()));
        let counts = self.census.count(
            now,
            sockets.sockets(),
            &keys,
            &self.cfg.publics,
            process_tree::socket_inodes,
        );
        let mut gone = Vec::new();
        for key in &keys {
            let Some(w) = self.core.workers.get_mut(&key.pid) else {
                continue;
            };
            if key.tree.is_empty() {
                gone.push(w.pid);
                continue;
            }
            let connections = counts.get(&w.pid).copied().unwrap_or(0);
            w.rss = processes.rss(&key.tree);
            w.connections = connections;
            w.nice = processes.get(w.pid).map_or(0, |p| p.nice);
            if matches!(w.state, WorkerState::Retired | WorkerState::Dying) && connections == 0 {
                w.idle_since.get_or_insert(now);
            } else {
                w.idle_since = None;
            }
        }
        self.reregister_listeners(&processes);
        // A pidfd that could not be opened never fires: /proc has the last word.
        for pid in gone {
            if self.has_exited(pid) {
                self.on_worker_exit(pid);
            }
        }
        self.core
            .forget_retirements_before(now, self.cfg.policy.retire_window);
        let snapshot = ClusterSnapshot {
            now,
            master_rss: own_rss(),
            workers: self.core.workers.values().cloned().collect(),
            recent_retirements: self.core.schedule.recent_retirements.clone(),
        };
        for action in policy::decide(&snapshot, &self.cfg.policy) {
            let effects = self.core.handle(now, supervisor::Event::Policy(action));
            self.carry_out_effects(effects);
        }
    }

    /// The policy repeats its notes every decision while nothing changes (a
    /// rate limit holds for minutes): write one, then leave out the ones of the
    /// same shape (the same text but for figures) for [`POLICY_LOG_REPEAT`].
    fn policy_log(&mut self, message: String, now: Instant) {
        let shape: String = message
            .chars()
            .filter(|c| !c.is_ascii_digit() && *c != '.')
            .collect();
        if let Some((last, at, left_out)) = &mut self.last_policy_log
            && *last == shape
            && now.duration_since(*at) < POLICY_LOG_REPEAT
        {
            *left_out += 1;
            return;
        }
        let left_out = match self.last_policy_log.take() {
            Some((last, _, n)) if last == shape && n > 0 => {
                format!(" ({n} like it in the last {POLICY_LOG_REPEAT:?} not shown)")
            }
            _ => String::new(),
        };
        log::warn!("policy: {message}{left_out}");
        self.last_policy_log = Some((shape, now, 0));
    }

    fn save_state(&self) -> Result<()> {
        let state = ClusterState {
            name: self.cfg.name.clone(),
            backend: self.cfg.backend,
            listens: self.cfg.listens.clone(),
            bands: self.cfg.bands,
            band_shift: self.cfg.band_shift,
            interfaces: self.cfg.interfaces.clone(),
            flow_entries: self.cfg.flow_entries,
            generation: self.generation,
            master_pid: i32::try_from(std::process::id()).unwrap_or(0),
            soft_kill_timeout_ms: u64::try_from(self.cfg.soft_kill_timeout.as_millis())
                .unwrap_or(u64::MAX),
        };
        state.save(&paths::state_file(&self.cfg.name))?;
        Ok(())
    }

    /// A start-up that never served: remove what this master created.
    fn clean_up_failed_start(&mut self) {
        self.stop_own_workers();
        if self.fresh {
            if let Err(e) = self.steering().teardown() {
                log::warn!("removing the steering failed: {e}");
            }
            if self.created_dir {
                let _ = std::fs::remove_dir_all(paths::state_dir(&self.cfg.name));
            }
        }
    }

    /// Stop the workers this master started (they never served).
    fn stop_own_workers(&mut self) {
        let own: Vec<kill::Target<'_>> = self
            .core
            .workers
            .values()
            .filter(|w| w.own_child)
            .filter_map(|w| {
                Some(kill::Target {
                    pid: w.pid,
                    pidfd: self.pidfds.get(&w.pid)?,
                })
            })
            .collect();
        log::warn!("stopping the {} workers this master started", own.len());
        kill::stop_workers(&own, Duration::from_secs(1));
    }
}

/// A panic in a blocking task leaves the backend as it was: go on with it.
fn lock_steering(steering: &SharedSteering) -> std::sync::MutexGuard<'_, Box<dyn Steering>> {
    steering
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `127.0.0.1:8080 [20000 20001 …]` per service.
fn describe_table(table: &SteeringTable) -> String {
    table
        .services
        .iter()
        .map(|s| {
            let ports: Vec<String> = s.worker_ports.iter().map(|p| p.to_string()).collect();
            format!("{} → [{}]", s.listen, ports.join(" "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn own_rss() -> u64 {
    procfs::process::Process::myself()
        .and_then(|p| p.stat())
        .map(|s| s.rss.saturating_mul(procfs::page_size()))
        .unwrap_or(0)
}
