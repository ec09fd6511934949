//! The supervisor core, without I/O: every worker the master knows, as the one
//! [`Worker`] type (the policy decides over it, `status` reports it, the
//! registry record is computed from it), the transitions of a worker's life,
//! and the [`Schedule`] of what is due when (spawns, the kill-retired queue,
//! soft-kill deadlines, the monitor pass), with [`Supervisor::next_deadline`]
//! telling the event loop when to wake. Time is always passed in (`now`), so
//! the unit tests drive it with a fake clock.
//!
//! [`Supervisor::handle`] takes an [`Event`] and returns the [`Effect`]s
//! (spawn, steer a band to a ready worker, retire, signals, `die` messages,
//! log lines, kill and crash counts, the registry save, the stand-in for a
//! band left without a worker, giving up on a fresh start) for the runtime to
//! carry out, in order:
//!
//! - a tick: the due band is spawned ([`Effect::Spawn`], one per
//!   `--spawn-delay`; a band the generation lacks is not replaced), a ready
//!   worker whose band write failed is steered to again, then the soft-kill
//!   deadlines and the kill-retired queue;
//! - `Spawned`: the worker is starting; `SpawnFailed`: its band backs off;
//! - `Adopted`: a reload's worker of an earlier generation, live if the table
//!   in force points at it, retired if not;
//! - `Ready` (listening, or said hello) and `NotReady` (what the readiness
//!   poll saw): ready once, and steered to ([`Effect::Promote`]) once the
//!   generation is published; not listening past `--connect-timeout`, killed
//!   with its band's back-off (or `run` gives up on a fresh start);
//! - `Published`: the generation's table is in force: its workers live, the
//!   live workers it no longer points at retired ([`Effect::Retire`]);
//! - `Promoted`: a band steered to its ready worker: live, and the band's old
//!   live worker retired;
//! - `AskToDie`, `Exited`: `die` or SIGTERM, SIGKILL after the soft-kill
//!   timeout; an exit forgotten, a live worker's crash replaced at once, a
//!   starting worker's exit a failed attempt of its band;
//! - `Policy`: what [`crate::policy::decide`] decided at a monitor pass (a
//!   health retirement starts the replacement; a live worker asked to die or
//!   killed is replaced at once; its notes go to the runtime's log).
//!
//! The `host_tests` run it against an in-memory world of processes that
//! carries out the effects and feeds the outcomes back. Still done by the
//! runtime (`master/mod.rs`) on the core's workers directly, not as events:
//! the monitor pass's measurements (RSS, connections, idle since), and the
//! bookkeeping of what a worker says on the control socket (pings, `busy`,
//! `request_retire`; its hello's readiness is an event). The runtime reads
//! /proc, signals through pidfds, has the steering writer publish tables and
//! bands, and writes files.
//!
//! # When is a worker retired?
//!
//! `Retired` means: out of the steering table in force, still running, keeping
//! its established connections. A worker becomes retired in exactly three
//! cases, and a retired worker never becomes live again:
//!
//! 1. **A reload publishes its table**: every live worker the new generation's
//!    table no longer points at is retired ("a new generation took over").
//! 2. **Its band's replacement is promoted**: when a starting worker of the
//!    same band becomes ready and is steered to, the band's previous live
//!    worker is retired ("replaced by worker N", after the reason the
//!    replacement was started for). A replacement is started for a live worker
//!    only by the health rules of [`crate::policy`] (RSS over
//!    `--worker-rss-limit`, busy, `request_retire`, silent past
//!    `--ping-timeout`; at most `--retire-rate` per `--retire-window`).
//! 3. **Adoption**: a worker of an earlier generation found at start-up that
//!    the table in force does not point at is adopted as retired.
//!
//! A live worker that crashes, or that the policy asks to die or kills, is not
//! retired: it becomes gone or `Dying`, and its band gets a replacement at once
//! (and a stand-in until then, see `fallback`). A retired worker leaves when it
//! has been idle past `--retired-idle-exit`, when the cluster is over the low
//! (asked to die) or high (killed) watermark, on `kill-retired` or SIGUSR1 (one
//! every `--spawn-delay`), or by itself.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::policy::{Action, WorkerState};
use crate::protocol::MasterMessage;

/// A band whose first workers keep failing before any table was ever
/// published makes `run` give up (the command is broken, not unlucky).
pub const FRESH_START_ATTEMPTS: u32 = 3;
/// Longest pause between two attempts of a failing band.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Why the live workers a new generation's table no longer points at are retired.
pub const NEW_GENERATION: &str = "a new generation took over";
/// How often /proc is polled for the readiness of starting workers (and, before
/// the first publish, the start-up steps are retried). An idle cluster has no
/// poll: the loop sleeps until [`Supervisor::next_deadline`].
pub const STARTING_POLL: Duration = Duration::from_millis(20);

/// One worker, as the master tracks it.
#[derive(Clone, Debug, PartialEq)]
pub struct Worker {
    pub pid: i32,
    /// /proc/PID/stat `starttime`, for the registry.
    pub start_time: u64,
    /// The real uid it runs as.
    pub uid: u32,
    pub band: u32,
    pub generation: u64,
    pub state: WorkerState,
    /// One per public port (in `--listen` order of first appearance); the
    /// first is `$PORT`.
    pub ports: Vec<u16>,
    pub started_at: Instant,
    /// Listening (or said hello); a `Starting` worker waits for the table.
    pub ready: bool,
    /// This master spawned it (and reaps it).
    pub own_child: bool,
    /// When the worker said hello on the control socket (aware workers only).
    pub hello_at: Option<Instant>,
    pub last_ping: Option<Instant>,
    /// The worker's last ping said it is too busy.
    pub busy: bool,
    /// The worker asked to be retired (`request_retire`).
    pub retire_requested: bool,
    /// When it entered `Retired`.
    pub retired_at: Option<Instant>,
    /// Since when it has had no connections (retired workers), if it has none now.
    pub idle_since: Option<Instant>,
    /// When it was asked to die (`Dying`).
    pub dying_since: Option<Instant>,
    /// Resident memory of the worker's whole process tree, measured from /proc.
    pub rss: u64,
    /// Established TCP connections owned by the worker's process tree.
    pub connections: u32,
    pub nice: i64,
    /// Its control-socket connection, if it spoke.
    pub conn: Option<u64>,
    /// SIGKILL was sent (connect timeout, soft-kill timeout or the policy).
    pub killed: bool,
    /// Why it is being replaced, retired, asked to die or killed (the latest),
    /// with the figures acted on; `status` shows it.
    pub reason: Option<String>,
    /// `stats` and `app` of its latest ping (`Null` until it pings).
    pub stats: serde_json::Value,
    pub app: serde_json::Value,
}

impl Worker {
    /// A worker just known: nothing measured, nothing heard.
    pub fn new(
        pid: i32,
        band: u32,
        generation: u64,
        state: WorkerState,
        ports: Vec<u16>,
        started_at: Instant,
    ) -> Worker {
        Worker {
            pid,
            start_time: 0,
            uid: 0,
            band,
            generation,
            state,
            ports,
            started_at,
            ready: false,
            own_child: false,
            hello_at: None,
            last_ping: None,
            busy: false,
            retire_requested: false,
            retired_at: None,
            idle_since: None,
            dying_since: None,
            rss: 0,
            connections: 0,
            nice: 0,
            conn: None,
            killed: false,
            reason: None,
            stats: serde_json::Value::Null,
            app: serde_json::Value::Null,
        }
    }

    /// `band 2, generation 1, 3 connections, rss 101.2 MiB`: the figures logged
    /// with every action on a worker.
    pub fn describe(&self) -> String {
        format!(
            "band {}, generation {}, {} connections, rss {:.1} MiB",
            self.band,
            self.generation,
            self.connections,
            self.rss as f64 / (1024.0 * 1024.0)
        )
    }

    /// Waiting to be ready (not killed for its connect timeout), or ready and
    /// waiting to be promoted: the readiness poll is needed.
    fn needs_poll(&self) -> bool {
        self.state == WorkerState::Starting && (self.ready || !self.killed)
    }

    /// When this dying worker is past its soft-kill timeout (strictly past it).
    fn soft_kill_deadline(&self, timeout: Duration) -> Option<Instant> {
        (self.state == WorkerState::Dying && !self.killed)
            .then_some(self.dying_since?)
            .map(|t| t + timeout + Duration::from_millis(1))
    }
}

/// What happens to a band whose starting worker failed (exited or timed out
/// before it was ready, or could not be spawned).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BandFailure {
    /// Try again after `backoff` (attempt `attempt` failed).
    Retry { attempt: u32, backoff: Duration },
    /// The cluster never served and the band failed this often: give up.
    GiveUp { attempts: u32 },
}

/// The back-off after `failures` consecutive failures of a band:
/// 200 ms, 400 ms, 800 ms … up to [`MAX_BACKOFF`].
pub fn backoff(failures: u32) -> Duration {
    Duration::from_millis(100)
        .saturating_mul(1 << failures.min(10))
        .min(MAX_BACKOFF)
}

/// What is due when, apart from the workers themselves.
#[derive(Debug)]
pub struct Schedule {
    /// Bands to (re)spawn and from when.
    pub pending_spawns: BTreeMap<u32, Instant>,
    /// No spawn before this (`--spawn-delay` after the previous one).
    pub next_spawn_at: Instant,
    /// Consecutive failures (exit or timeout before ready) per band.
    pub failures: HashMap<u32, u32>,
    /// Retired workers to end one by one (SIGUSR1, `kill-retired`), and why.
    pub kill_queue: VecDeque<(i32, &'static str)>,
    pub next_kill_at: Instant,
    /// When the policy's recent health retirements happened (its rate limit).
    pub recent_retirements: Vec<Instant>,
    /// Crashed bands and when, to log how long the band went unserved.
    pub crashed_at: HashMap<u32, Instant>,
    /// The next monitor pass (measurement and policy).
    pub next_monitor: Instant,
}

/// How a worker's exit is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    /// A live worker: its band's replacement is scheduled at once.
    Crashed,
    /// A starting worker, before it was ready: a failed attempt of its band.
    StartFailed,
    /// A starting worker killed for its connect timeout: the failure was
    /// counted when it was killed.
    StartKilled,
    /// A retired or dying worker: it was on its way out.
    Left,
}

/// A worker was promoted: its band's other live workers to retire, and how
/// long the band had been without its own worker after a crash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Promotion {
    pub crashed_for: Option<Duration>,
    /// Each replaced worker and the reason it is retired with.
    pub retire: Vec<(i32, String)>,
}

/// The workers and the schedule.
#[derive(Debug)]
pub struct Supervisor {
    pub workers: BTreeMap<i32, Worker>,
    pub schedule: Schedule,
    /// `--spawn-delay`: between two spawns, and two kills of the kill-retired queue.
    pub spawn_delay: Duration,
    /// `--soft-kill-timeout`: from `die`/SIGTERM to SIGKILL.
    pub soft_kill_timeout: Duration,
    /// The generation this master spawns, and its number of bands (a band
    /// of an older generation at or above it is not replaced).
    pub generation: u64,
    pub bands: u32,
    /// `--connect-timeout`: a starting worker not listening by then is killed.
    pub connect_timeout: Duration,
    /// This generation's table has been published: a ready worker is steered
    /// to at once ([`Effect::Promote`]).
    pub published: bool,
}

impl Supervisor {
    pub fn new(now: Instant, spawn_delay: Duration, soft_kill_timeout: Duration) -> Supervisor {
        Supervisor {
            workers: BTreeMap::new(),
            schedule: Schedule {
                pending_spawns: BTreeMap::new(),
                next_spawn_at: now,
                failures: HashMap::new(),
                kill_queue: VecDeque::new(),
                next_kill_at: now,
                recent_retirements: Vec::new(),
                crashed_at: HashMap::new(),
                next_monitor: now,
            },
            spawn_delay,
            soft_kill_timeout,
            generation: 0,
            bands: u32::MAX,
            connect_timeout: Duration::MAX,
            published: false,
        }
    }

    /// A starting worker not listening after `timeout` is killed.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Supervisor {
        self.connect_timeout = timeout;
        self
    }

    /// The starting workers whose readiness the runtime is to look at (not
    /// ready yet, not killed for their connect timeout): it reports each as
    /// [`Event::Ready`] or [`Event::NotReady`].
    pub fn awaiting_readiness(&self) -> Vec<i32> {
        self.workers
            .values()
            .filter(|w| w.state == WorkerState::Starting && !w.ready && !w.killed)
            .map(|w| w.pid)
            .collect()
    }

    /// This master spawns `generation`, of `bands` bands.
    pub fn for_generation(mut self, generation: u64, bands: u32) -> Supervisor {
        (self.generation, self.bands) = (generation, bands);
        self
    }

    /// The worker of this generation starting for `band`, if any.
    pub fn starting_for(&self, band: u32) -> Option<i32> {
        self.workers
            .values()
            .find(|w| w.band == band && w.state == WorkerState::Starting)
            .map(|w| w.pid)
    }

    /// Start a worker for `band` from `at` on.
    pub fn schedule_spawn(&mut self, band: u32, at: Instant) {
        self.schedule.pending_spawns.insert(band, at);
    }

    /// A live worker of `band` crashed (or was made to exit): a replacement at
    /// once, without back-off and ahead of the spawn delay, unless one is
    /// starting already.
    pub fn replace_at_once(&mut self, band: u32, now: Instant) {
        self.schedule.crashed_at.insert(band, now);
        if self.starting_for(band).is_none() {
            self.schedule.pending_spawns.insert(band, now);
            self.schedule.next_spawn_at = self.schedule.next_spawn_at.min(now);
        }
    }

    /// The band to spawn now, if one is due and the spawn delay has passed.
    /// `None` also when the due band already has a worker starting (it is
    /// dropped from the schedule). A band whose starting worker was killed (its
    /// connect timeout) waits for that worker's exit instead: it stays
    /// scheduled. [`Event::Tick`] spawns it ([`Effect::Spawn`]).
    pub fn due_spawn(&mut self, now: Instant) -> Option<u32> {
        if now < self.schedule.next_spawn_at {
            return None;
        }
        let band = self
            .schedule
            .pending_spawns
            .iter()
            .find(|&(&band, due)| *due <= now && !self.waits_for_exit(band))
            .map(|(&band, _)| band)?;
        self.schedule.pending_spawns.remove(&band);
        self.starting_for(band).is_none().then_some(band)
    }

    /// `band`'s starting worker was killed and has not exited yet: its next
    /// worker waits for the exit (an event), not for a deadline.
    fn waits_for_exit(&self, band: u32) -> bool {
        self.workers
            .values()
            .any(|w| w.band == band && w.state == WorkerState::Starting && w.killed)
    }

    /// A spawn was attempted at `now`: the next waits for the spawn delay.
    pub fn spawned_at(&mut self, now: Instant) {
        self.schedule.next_spawn_at = now + self.spawn_delay;
    }

    /// A starting worker of `band` failed: back-off, or give up when the
    /// cluster never served (`may_give_up`) and the band failed
    /// [`FRESH_START_ATTEMPTS`] times.
    pub fn band_failed(&mut self, band: u32, now: Instant, may_give_up: bool) -> BandFailure {
        let failures = self.schedule.failures.entry(band).or_insert(0);
        *failures += 1;
        let attempt = *failures;
        if may_give_up && attempt >= FRESH_START_ATTEMPTS {
            return BandFailure::GiveUp { attempts: attempt };
        }
        let backoff = backoff(attempt);
        self.schedule.pending_spawns.insert(band, now + backoff);
        BandFailure::Retry { attempt, backoff }
    }

    /// A worker of `band` became ready: its band's failures are forgotten.
    pub fn band_ready(&mut self, band: u32) {
        self.schedule.failures.remove(&band);
    }

    /// Whether `band` failed since its last ready worker.
    pub fn band_has_failed(&self, band: u32) -> bool {
        self.schedule.failures.get(&band).is_some_and(|&f| f > 0)
    }

    /// Queue every retired worker (not queued yet) to be asked to die, one
    /// every spawn delay. Returns how many were queued.
    pub fn queue_kill_retired(&mut self, why: &'static str) -> usize {
        let queue = &mut self.schedule.kill_queue;
        let retired: Vec<i32> = self
            .workers
            .values()
            .filter(|w| w.state == WorkerState::Retired && !queue.iter().any(|(p, _)| *p == w.pid))
            .map(|w| w.pid)
            .collect();
        queue.extend(retired.iter().map(|&pid| (pid, why)));
        retired.len()
    }

    /// The next queued worker to ask to die, if its turn has come (workers no
    /// longer retired are skipped). The next turn is a spawn delay later.
    pub fn next_kill(&mut self, now: Instant) -> Option<(i32, &'static str)> {
        if now < self.schedule.next_kill_at {
            return None;
        }
        while let Some((pid, why)) = self.schedule.kill_queue.pop_front() {
            if self
                .workers
                .get(&pid)
                .is_some_and(|w| w.state == WorkerState::Retired)
            {
                self.schedule.next_kill_at = now + self.spawn_delay;
                return Some((pid, why));
            }
        }
        None
    }

    /// Dying workers still there after the soft-kill timeout (not killed yet),
    /// with how long they have been dying.
    pub fn late_dying(&self, now: Instant) -> Vec<(i32, Duration)> {
        self.workers
            .values()
            .filter(|w| w.soft_kill_deadline(self.soft_kill_timeout).is_some())
            .filter_map(|w| {
                let dying_for = now.duration_since(w.dying_since?);
                (dying_for > self.soft_kill_timeout).then_some((w.pid, dying_for))
            })
            .collect()
    }

    /// Worker `pid` exited: it is forgotten, and its band replaced when it
    /// was live. Returns the worker as it was, and how its exit is taken.
    pub fn exited(&mut self, pid: i32, now: Instant) -> Option<(Worker, ExitKind)> {
        let w = self.workers.remove(&pid)?;
        let kind = match w.state {
            WorkerState::Live => {
                // A crash is not a start-up failure: no back-off, at once.
                self.replace_at_once(w.band, now);
                ExitKind::Crashed
            }
            WorkerState::Starting if w.killed => ExitKind::StartKilled,
            WorkerState::Starting => ExitKind::StartFailed,
            WorkerState::Retired | WorkerState::Dying => ExitKind::Left,
        };
        Some((w, kind))
    }

    /// Worker `pid` is out of the table in force: retired from `now`, for
    /// `reason` (see the module documentation for when this happens).
    pub fn retire(&mut self, pid: i32, now: Instant, reason: &str) -> Option<&Worker> {
        let w = self.workers.get_mut(&pid)?;
        w.state = WorkerState::Retired;
        w.retired_at = Some(now);
        w.reason = Some(reason.to_owned());
        Some(w)
    }

    /// Worker `pid` is asked to die from `now`; `None` when it is unknown or
    /// was asked already (it is not asked twice).
    pub fn ask_to_die(&mut self, pid: i32, now: Instant, reason: &str) -> Option<&Worker> {
        let w = self.workers.get_mut(&pid)?;
        if w.state == WorkerState::Dying {
            return None;
        }
        w.state = WorkerState::Dying;
        w.dying_since = Some(now);
        w.reason = Some(reason.to_owned());
        Some(w)
    }

    /// Worker `pid` is steered to for its band: it is live, and the band's
    /// other live workers are to be retired ("replaced by worker N", after
    /// the reason their replacement was started for).
    pub fn promoted(&mut self, pid: i32, now: Instant) -> Option<Promotion> {
        let w = self.workers.get_mut(&pid)?;
        w.state = WorkerState::Live;
        let band = w.band;
        let crashed_for = self
            .schedule
            .crashed_at
            .remove(&band)
            .map(|t| now.saturating_duration_since(t));
        let retire = self
            .workers
            .values()
            .filter(|o| o.pid != pid && o.band == band && o.state == WorkerState::Live)
            .map(|o| {
                let why = match o.reason.as_deref() {
                    Some(reason) => format!("{reason}; replaced by worker {pid}"),
                    None => format!("replaced by worker {pid}"),
                };
                (o.pid, why)
            })
            .collect();
        Some(Promotion {
            crashed_for,
            retire,
        })
    }

    /// Forget the health retirements older than `window` (the rate limit's).
    pub fn forget_retirements_before(&mut self, now: Instant, window: Duration) {
        self.schedule
            .recent_retirements
            .retain(|t| now.duration_since(*t) < window);
    }

    /// When something is due next: the earliest of the monitor pass, the
    /// readiness poll while a worker is starting (and every step before the
    /// first publish), the due spawn, the soft-kill
    /// deadline of a dying worker and the next kill of the queue. `extra` adds
    /// the runtime's own deadlines (the systemd watchdog). The event loop
    /// sleeps until then, or until an event (an exit, a control line, a
    /// signal) wakes it earlier.
    pub fn next_deadline(&self, now: Instant, extra: impl IntoIterator<Item = Instant>) -> Instant {
        let s = &self.schedule;
        let poll = now + STARTING_POLL;
        let starting = self.workers.values().any(Worker::needs_poll);
        let spawn = s
            .pending_spawns
            .iter()
            .filter(|&(&band, _)| !self.waits_for_exit(band))
            .map(|(_, &due)| due)
            .min()
            .map(|due| due.max(s.next_spawn_at));
        let soft_kill = self
            .workers
            .values()
            .filter_map(|w| w.soft_kill_deadline(self.soft_kill_timeout))
            .min();
        let kill = (!s.kill_queue.is_empty()).then_some(s.next_kill_at);
        [
            Some(s.next_monitor),
            (starting || !self.published).then_some(poll),
            spawn,
            soft_kill,
            kill,
        ]
        .into_iter()
        .flatten()
        .chain(extra)
        .min()
        .unwrap_or(s.next_monitor)
    }
}

/// How a state is named in the log and in `status`.
pub fn state_name(state: WorkerState) -> &'static str {
    match state {
        WorkerState::Starting => "starting",
        WorkerState::Live => "live",
        WorkerState::Retired => "retired",
        WorkerState::Dying => "dying",
    }
}

/// What the runtime does on the core's behalf ([`Supervisor::handle`]).
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// Spawn a worker of this generation for `band` now, and report it as
    /// [`Event::Spawned`] (or [`Event::SpawnFailed`]).
    Spawn {
        band: u32,
    },
    /// Steer the band of ready worker `pid` to it (unless that write is under
    /// way), and report it as [`Event::Promoted`].
    Promote {
        pid: i32,
    },
    /// Send `signal` to the worker (through its pidfd), for `reason`.
    Signal {
        pid: i32,
        signal: Signal,
        reason: String,
    },
    /// Write `message` to the worker's control connection.
    Send {
        pid: i32,
        message: MasterMessage,
    },
    /// A worker is made to exit: why, and how (`die`, `SIGTERM`, `SIGKILL`),
    /// for the metrics.
    CountKill {
        reason: String,
        how: &'static str,
    },
    Log {
        level: log::Level,
        text: String,
    },
    /// A live worker crashed, for the metrics.
    CountCrash,
    /// Write the registry of workers (one left or came).
    SaveRegistry,
    /// Point every band left without a worker at a stand-in until its
    /// replacement is ready (`fallback`): a gone worker's port must leave the
    /// table now.
    CoverUnservedBands,
    /// The worker's control connection `conn` is forgotten.
    ForgetConn {
        conn: u64,
    },
    /// Worker `pid` is out of the table in force: retire it for `reason`
    /// ([`Supervisor::retire`], then tell it and renice its tree).
    Retire {
        pid: i32,
        reason: String,
    },
    /// A note of the policy for the operator (the runtime leaves out repeats).
    PolicyNote {
        message: String,
    },
    /// `band` failed `attempts` times before the cluster ever served: `run`
    /// gives up (the command is broken, not unlucky).
    GiveUp {
        band: u32,
        attempts: u32,
        why: String,
    },
}

/// How a starting worker showed it is ready ([`Event::Ready`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// It said hello on the control socket.
    Hello,
    /// A LISTEN socket on each of its ports, owned by its process tree (and
    /// handed to the steering backend), with what its tree measured.
    Listening {
        rss: u64,
        connections: u32,
        nice: i64,
    },
}

impl Readiness {
    fn how(&self) -> &'static str {
        match self {
            Readiness::Hello => "hello",
            Readiness::Listening { .. } => "listening",
        }
    }
}

/// What a readiness poll saw of a starting worker that is not ready
/// ([`Event::NotReady`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotReady {
    /// Listening, but its listeners could not be handed to the steering
    /// backend (`cause`): not ready for steering yet.
    NotSteerable { cause: String },
    /// Not listening on its ports (yet). `foreign_netns`: the inode of a
    /// network namespace of its tree other than the master's, where it
    /// would listen unseen.
    NotListening { foreign_netns: Option<u64> },
}

/// What happens to the core ([`Supervisor::handle`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Time passed: the due spawn (one per tick, the spawn delay apart), the
    /// soft-kill deadlines, then the kill-retired queue.
    Tick,
    /// The worker asked for by [`Effect::Spawn`] runs: `pid`, one port per
    /// public port, its /proc `starttime` and its real uid. It is starting.
    Spawned {
        band: u32,
        pid: i32,
        ports: Vec<u16>,
        start_time: u64,
        uid: u32,
    },
    /// Worker `pid` is to exit: `die` if it speaks the protocol, SIGTERM
    /// otherwise; SIGKILL after the soft-kill timeout.
    AskToDie { pid: i32, reason: String },
    /// Worker `pid` exited (`status`: how, as the reaper told it).
    /// `may_give_up`: the cluster never served (nothing published, no previous
    /// table), so a band failing [`FRESH_START_ATTEMPTS`] times ends `run`.
    Exited {
        pid: i32,
        status: String,
        may_give_up: bool,
    },
    /// Starting worker `pid` is ready (`how`): its band's failures are
    /// forgotten, and once the table is published it is steered to.
    Ready { pid: i32, how: Readiness },
    /// The readiness poll found starting worker `pid` not ready (`seen`).
    /// Not listening past the connect timeout: SIGKILL, and its band backs
    /// off (or, see `Exited`, `run` gives up); its exit comes as `Exited`.
    NotReady {
        pid: i32,
        seen: NotReady,
        may_give_up: bool,
    },
    /// A worker of an earlier generation found at start-up (a reload), held
    /// by a pidfd: `port` is its `$PORT`, `ports` one per public port of
    /// this generation, `age` how long it has run. It is adopted live if the
    /// table in force points at it for its band (`in_table`), retired if not.
    Adopted {
        pid: i32,
        band: u32,
        generation: u64,
        port: u16,
        ports: Vec<u16>,
        start_time: u64,
        uid: u32,
        nice: i64,
        age: Duration,
        in_table: bool,
    },
    /// This generation's table is in force (the steering writer wrote it):
    /// `ready`, the starting workers it points at, go live; every live
    /// worker none of whose ports is among `steered` (the worker ports of
    /// the table) is retired ([`NEW_GENERATION`]).
    Published { ready: Vec<i32>, steered: Vec<u16> },
    /// Starting worker `pid` is steered to for its band now (on `port`): it
    /// is live, and the band's previous live worker is retired.
    Promoted { pid: i32, port: u16 },
    /// The policy decided `action` ([`crate::policy::decide`]) at a monitor pass.
    Policy(Action),
    /// A worker for `band` could not be spawned (`error`): its band backs off.
    SpawnFailed {
        band: u32,
        error: String,
        may_give_up: bool,
    },
}

impl Supervisor {
    /// Take `event` at `now`; the effects are for the runtime to carry out, in order.
    pub fn handle(&mut self, now: Instant, event: Event) -> Vec<Effect> {
        let mut effects = Vec::new();
        match event {
            Event::Tick => {
                self.spawn_due_effects(now, &mut effects);
                // A ready worker whose band's write failed (or was lost) is
                // steered to again.
                if self.published {
                    effects.extend(
                        self.workers
                            .values()
                            .filter(|w| w.state == WorkerState::Starting && w.ready)
                            .map(|w| Effect::Promote { pid: w.pid }),
                    );
                }
                self.enforce_soft_kill(now, &mut effects);
                if let Some((pid, why)) = self.next_kill(now) {
                    self.ask_to_die_effects(pid, now, why, &mut effects);
                }
            }
            Event::AskToDie { pid, reason } => {
                self.ask_to_die_effects(pid, now, &reason, &mut effects);
            }
            Event::Spawned {
                band,
                pid,
                ports,
                start_time,
                uid,
            } => {
                let port = ports.first().copied().unwrap_or(0);
                let worker = Worker {
                    start_time,
                    uid,
                    own_child: true,
                    ..Worker::new(
                        pid,
                        band,
                        self.generation,
                        WorkerState::Starting,
                        ports,
                        now,
                    )
                };
                self.workers.insert(pid, worker);
                effects.push(Effect::SaveRegistry);
                effects.push(Effect::Log {
                    level: log::Level::Info,
                    text: format!(
                        "spawned worker {pid} for band {band} (generation {}, port {port})",
                        self.generation
                    ),
                });
            }
            Event::Exited {
                pid,
                status,
                may_give_up,
            } => self.exited_effects(pid, now, &status, may_give_up, &mut effects),
            Event::Ready { pid, how } => self.ready_effects(pid, now, &how, &mut effects),
            Event::Policy(action) => self.policy_effects(action, now, &mut effects),
            Event::Adopted {
                pid,
                band,
                generation,
                port,
                ports,
                start_time,
                uid,
                nice,
                age,
                in_table,
            } => {
                let state = if in_table {
                    WorkerState::Live
                } else {
                    WorkerState::Retired
                };
                effects.push(Effect::Log {
                    level: log::Level::Info,
                    text: format!(
                        "adopted worker {pid} (band {band}, generation {generation}, port {port}) as {}",
                        state_name(state)
                    ),
                });
                let started_at = now.checked_sub(age).unwrap_or(now);
                let worker = Worker {
                    start_time,
                    uid,
                    ready: true,
                    retired_at: (!in_table).then_some(now),
                    nice,
                    ..Worker::new(pid, band, generation, state, ports, started_at)
                };
                self.workers.insert(pid, worker);
            }
            Event::Published { ready, steered } => {
                self.published_effects(now, &ready, &steered, &mut effects);
            }
            Event::NotReady {
                pid,
                seen,
                may_give_up,
            } => self.not_ready_effects(pid, now, seen, may_give_up, &mut effects),
            Event::Promoted { pid, port } => self.promoted_effects(pid, now, port, &mut effects),
            Event::SpawnFailed {
                band,
                error,
                may_give_up,
            } => {
                effects.push(Effect::Log {
                    level: log::Level::Error,
                    text: format!("cannot spawn a worker for band {band}: {error}"),
                });
                self.band_failed_effects(band, now, &error, may_give_up, &mut effects);
            }
        }
        effects
    }

    /// The band due now, if any, is spawned (the next spawn waits for the
    /// spawn delay); a band this generation does not have (a reload that
    /// lowered `--workers`, an old worker of it gone) is not replaced.
    fn spawn_due_effects(&mut self, now: Instant, out: &mut Vec<Effect>) {
        let Some(band) = self.due_spawn(now) else {
            return;
        };
        if band >= self.bands {
            out.push(Effect::Log {
                level: log::Level::Info,
                text: format!(
                    "band {band} is not part of generation {} ({} bands): not replaced",
                    self.generation, self.bands
                ),
            });
            return;
        }
        self.spawned_at(now);
        out.push(Effect::Spawn { band });
    }

    /// A promotion: logged (with how long the band went without its own
    /// worker after a crash), then the band's other live workers retired.
    /// Nothing when the worker exited, or was made to, while its band was
    /// written.
    fn promoted_effects(&mut self, pid: i32, now: Instant, port: u16, out: &mut Vec<Effect>) {
        let Some(band) = self
            .workers
            .get(&pid)
            .filter(|w| w.state == WorkerState::Starting)
            .map(|w| w.band)
        else {
            return;
        };
        let Some(promotion) = self.promoted(pid, now) else {
            return;
        };
        let since = promotion
            .crashed_for
            .map(|d| format!(" ({d:?} after the crash)"))
            .unwrap_or_default();
        out.push(Effect::Log {
            level: log::Level::Info,
            text: format!("band {band} now served by worker {pid} on port {port}{since}"),
        });
        out.extend(
            promotion
                .retire
                .into_iter()
                .map(|(pid, reason)| Effect::Retire { pid, reason }),
        );
    }

    /// What the policy decided: a health retirement starts the replacement
    /// (its old worker retires when the replacement is promoted); a live
    /// worker asked to die or killed leaves its band to a replacement.
    fn policy_effects(&mut self, action: Action, now: Instant, out: &mut Vec<Effect>) {
        match action {
            Action::RetireAndReplace { pid, band, reason } => {
                // A replacement already starting, or waiting to (a spawn delay,
                // the back-off of a failing band), is not a new retirement: it
                // would count twice against the rate limit and reset the back-off.
                let replacing = self.starting_for(band).is_some()
                    || self.schedule.pending_spawns.contains_key(&band);
                let Some(w) = self.workers.get_mut(&pid) else {
                    return;
                };
                if w.state != WorkerState::Live || replacing {
                    return;
                }
                out.push(Effect::Log {
                    level: log::Level::Info,
                    text: format!(
                        "retiring worker {pid} ({}): {reason}; starting its replacement",
                        w.describe()
                    ),
                });
                w.reason = Some(reason);
                self.schedule.recent_retirements.push(now);
                self.schedule.pending_spawns.insert(band, now);
            }
            Action::AskToDie { pid, reason } => {
                self.replace_if_live(pid, now, out);
                self.ask_to_die_effects(pid, now, &reason, out);
            }
            Action::Kill { pid, reason } => {
                self.replace_if_live(pid, now, out);
                let Some(w) = self.workers.get_mut(&pid) else {
                    return;
                };
                if w.killed {
                    return;
                }
                w.state = WorkerState::Dying;
                w.dying_since.get_or_insert(now);
                kill_effects(w, pid, reason, out);
            }
            Action::Log { message } => out.push(Effect::PolicyNote { message }),
        }
    }

    /// A live worker that is made to exit leaves its band to a replacement.
    fn replace_if_live(&mut self, pid: i32, now: Instant, out: &mut Vec<Effect>) {
        let Some(w) = self.workers.get(&pid) else {
            return;
        };
        if w.state == WorkerState::Live && self.starting_for(w.band).is_none() {
            let band = w.band;
            out.push(Effect::Log {
                level: log::Level::Warn,
                text: format!("worker {pid} is live: starting a replacement for band {band}"),
            });
            self.schedule.crashed_at.insert(band, now);
            self.schedule.pending_spawns.insert(band, now);
        }
    }

    /// A generation's table is in force: its workers live, the live workers
    /// it no longer points at retired, and a band whose worker exited while
    /// the table was written covered by a stand-in.
    fn published_effects(
        &mut self,
        now: Instant,
        ready: &[i32],
        steered: &[u16],
        out: &mut Vec<Effect>,
    ) {
        self.published = true;
        // Measure the new generation at once (status shows it).
        self.schedule.next_monitor = now;
        for pid in ready {
            if let Some(w) = self.workers.get_mut(pid)
                && w.state == WorkerState::Starting
            {
                w.state = WorkerState::Live;
            }
        }
        out.extend(
            self.workers
                .values()
                .filter(|w| {
                    w.state == WorkerState::Live && !w.ports.iter().any(|p| steered.contains(p))
                })
                .map(|w| Effect::Retire {
                    pid: w.pid,
                    reason: NEW_GENERATION.to_owned(),
                }),
        );
        out.push(Effect::CoverUnservedBands);
    }

    /// A starting worker is ready: logged, its band's failures forgotten, and
    /// steered to once the table is published. Once only.
    fn ready_effects(&mut self, pid: i32, now: Instant, how: &Readiness, out: &mut Vec<Effect>) {
        let Some(w) = self.workers.get_mut(&pid) else {
            return;
        };
        if w.ready || w.killed || w.state != WorkerState::Starting {
            return;
        }
        if let &Readiness::Listening {
            rss,
            connections,
            nice,
        } = how
        {
            (w.rss, w.connections, w.nice) = (rss, connections, nice);
            w.reason = None;
        }
        w.ready = true;
        let band = w.band;
        out.push(Effect::Log {
            level: log::Level::Info,
            text: format!(
                "worker {pid} (band {band}, generation {}) is ready ({} on port {}) after {:?}",
                w.generation,
                how.how(),
                w.ports.first().copied().unwrap_or(0),
                now.saturating_duration_since(w.started_at)
            ),
        });
        self.band_ready(band);
        if self.published {
            out.push(Effect::Promote { pid });
        }
    }

    /// A starting worker not ready at a readiness poll: a listener the
    /// steering backend refused is its reason (logged once); not listening
    /// past the connect timeout, it is killed once, and its band's failure
    /// counted now (not again at its exit).
    fn not_ready_effects(
        &mut self,
        pid: i32,
        now: Instant,
        seen: NotReady,
        may_give_up: bool,
        out: &mut Vec<Effect>,
    ) {
        let timeout = self.connect_timeout;
        let Some(w) = self.workers.get_mut(&pid) else {
            return;
        };
        if w.state != WorkerState::Starting || w.ready || w.killed {
            return;
        }
        let why = match seen {
            NotReady::NotSteerable { cause } => {
                // The connect timeout does not apply while it listens.
                if w.reason.as_deref() != Some(cause.as_str()) {
                    out.push(Effect::Log {
                        level: log::Level::Error,
                        text: cause.clone(),
                    });
                    w.reason = Some(cause);
                }
                return;
            }
            _ if now.saturating_duration_since(w.started_at) <= timeout => return,
            // A worker in another network namespace listens where the
            // master can neither see nor steer to: say so.
            NotReady::NotListening {
                foreign_netns: Some(ns),
            } => format!(
                "it runs in another network namespace (net:[{ns}]); \
                 start workers in the master's network namespace"
            ),
            NotReady::NotListening {
                foreign_netns: None,
            } => w
                .reason
                .clone()
                .unwrap_or_else(|| "not ready in time".to_owned()),
        };
        let band = w.band;
        out.push(Effect::Log {
            level: log::Level::Warn,
            text: format!(
                "worker {pid} (band {band}) is not listening on port {} after {timeout:?} ({why}): killing it",
                w.ports.first().copied().unwrap_or(0)
            ),
        });
        w.killed = true;
        out.push(Effect::CountKill {
            reason: "not listening in time".to_owned(),
            how: "SIGKILL",
        });
        out.push(Effect::Signal {
            pid,
            signal: Signal::SIGKILL,
            reason: why.clone(),
        });
        self.band_failed_effects(band, now, &why, may_give_up, out);
    }

    /// A worker's exit: forgotten, the registry saved, its band covered by a
    /// stand-in, then logged; a crash of a live worker is replaced at once, a
    /// starting worker's exit is a failed attempt of its band.
    fn exited_effects(
        &mut self,
        pid: i32,
        now: Instant,
        status: &str,
        may_give_up: bool,
        out: &mut Vec<Effect>,
    ) {
        let Some((w, kind)) = self.exited(pid, now) else {
            return;
        };
        out.push(Effect::SaveRegistry);
        out.push(Effect::CoverUnservedBands);
        if let Some(conn) = w.conn {
            out.push(Effect::ForgetConn { conn });
        }
        match kind {
            ExitKind::Crashed => {
                out.push(Effect::Log {
                    level: log::Level::Warn,
                    text: format!(
                        "live worker {pid} (band {}, generation {}) {status}: replacing it",
                        w.band, w.generation
                    ),
                });
                out.push(Effect::CountCrash);
            }
            ExitKind::StartFailed | ExitKind::StartKilled => {
                out.push(Effect::Log {
                    level: log::Level::Warn,
                    text: format!(
                        "starting worker {pid} (band {}) {status} before it was ready",
                        w.band
                    ),
                });
                // A worker killed for its connect timeout was counted already.
                if kind == ExitKind::StartFailed {
                    self.band_failed_effects(w.band, now, status, may_give_up, out);
                }
            }
            ExitKind::Left => out.push(Effect::Log {
                level: log::Level::Info,
                text: format!(
                    "{} worker {pid} (band {}, generation {}) {status} after {:?}",
                    state_name(w.state),
                    w.band,
                    w.generation,
                    now.saturating_duration_since(w.started_at)
                ),
            }),
        }
    }

    /// A starting worker of `band` failed (`why`): the back-off, or giving up.
    fn band_failed_effects(
        &mut self,
        band: u32,
        now: Instant,
        why: &str,
        may_give_up: bool,
        out: &mut Vec<Effect>,
    ) {
        out.push(match self.band_failed(band, now, may_give_up) {
            BandFailure::GiveUp { attempts } => Effect::GiveUp {
                band,
                attempts,
                why: why.to_owned(),
            },
            BandFailure::Retry { attempt, backoff } => Effect::Log {
                level: log::Level::Info,
                text: format!(
                    "band {band}: attempt {attempt} failed ({why}); next attempt in {backoff:?}"
                ),
            },
        });
    }

    fn ask_to_die_effects(&mut self, pid: i32, now: Instant, reason: &str, out: &mut Vec<Effect>) {
        let Some(w) = self.ask_to_die(pid, now, reason) else {
            return;
        };
        let aware = w.conn.is_some();
        out.push(Effect::CountKill {
            reason: reason.to_owned(),
            how: if aware { "die" } else { "SIGTERM" },
        });
        out.push(Effect::Log {
            level: log::Level::Info,
            text: format!(
                "asking worker {pid} ({}) to die{}: {reason}",
                w.describe(),
                if aware { " (`die`)" } else { " (SIGTERM)" }
            ),
        });
        out.push(if aware {
            Effect::Send {
                pid,
                message: MasterMessage::Die {
                    reason: reason.into(),
                },
            }
        } else {
            Effect::Signal {
                pid,
                signal: Signal::SIGTERM,
                reason: reason.to_owned(),
            }
        });
    }

    /// SIGKILL to every dying worker past its soft-kill timeout.
    fn enforce_soft_kill(&mut self, now: Instant, out: &mut Vec<Effect>) {
        for (pid, dying_for) in self.late_dying(now) {
            let timeout = self.soft_kill_timeout;
            let Some(w) = self.workers.get_mut(&pid) else {
                continue;
            };
            let reason = format!(
                "still running {dying_for:?} after it was asked to die (soft-kill timeout {timeout:?})"
            );
            kill_effects(w, pid, reason, out);
        }
    }
}

/// SIGKILL to a worker (the policy's kill, the soft-kill timeout): logged and
/// counted under `reason`, which the worker keeps.
fn kill_effects(w: &mut Worker, pid: i32, reason: String, out: &mut Vec<Effect>) {
    out.push(Effect::Log {
        level: log::Level::Warn,
        text: format!("killing worker {pid} ({}): {reason}", w.describe()),
    });
    out.push(Effect::CountKill {
        reason: reason.clone(),
        how: "SIGKILL",
    });
    w.killed = true;
    w.reason = Some(reason.clone());
    out.push(Effect::Signal {
        pid,
        signal: Signal::SIGKILL,
        reason,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Far enough for the monitor pass not to hide the deadline under test.
    const MONITOR: Duration = Duration::from_secs(60);
    const SPAWN_DELAY: Duration = Duration::from_millis(50);
    const SOFT_KILL: Duration = Duration::from_secs(5);

    /// The fake clock: `t(ms)` is `ms` milliseconds after the start.
    fn clock() -> impl Fn(u64) -> Instant {
        let zero = Instant::now();
        move |ms| zero + Duration::from_millis(ms)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn supervisor(t: &impl Fn(u64) -> Instant) -> Supervisor {
        let mut s = Supervisor::new(t(0), SPAWN_DELAY, SOFT_KILL);
        s.schedule.next_monitor = t(0) + MONITOR;
        s.published = true;
        s
    }

    fn add(s: &mut Supervisor, pid: i32, band: u32, state: WorkerState, at: Instant) {
        let mut w = Worker::new(pid, band, 1, state, vec![20000 + pid as u16], at);
        w.ready = state != WorkerState::Starting;
        s.workers.insert(pid, w);
    }

    #[test]
    fn an_idle_cluster_sleeps_until_its_monitor_pass() {
        let t = clock();
        let mut s = supervisor(&t);
        for (pid, band) in [(10, 0), (11, 1)] {
            add(&mut s, pid, band, WorkerState::Live, t(0));
        }
        add(&mut s, 9, 0, WorkerState::Retired, t(0));
        s.schedule.next_monitor = t(1000);
        assert_eq!(s.next_deadline(t(10), []), t(1000));
        // The watchdog (or any deadline of the runtime) comes first when earlier.
        assert_eq!(s.next_deadline(t(10), [t(400)]), t(400));
        // Before the first publish, the start-up steps are polled.
        s.published = false;
        assert_eq!(s.next_deadline(t(10), []), t(10) + STARTING_POLL);
    }

    #[test]
    fn deadlines_table() {
        let t = clock();
        struct Row {
            name: &'static str,
            setup: fn(&mut Supervisor, &dyn Fn(u64) -> Instant),
            now: u64,
            expect: u64,
        }
        #[rustfmt::skip]
        let rows = [
            Row { name: "starting worker: readiness poll", now: 100, expect: 120,
                setup: |s, t| add(s, 1, 0, WorkerState::Starting, t(0)) },
            Row { name: "ready, waiting for promotion: poll", now: 100, expect: 120,
                setup: |s, t| { add(s, 1, 0, WorkerState::Starting, t(0)); s.workers.get_mut(&1).unwrap().ready = true; } },
            Row { name: "killed for its connect timeout: wait for its exit", now: 100, expect: 60_000,
                setup: |s, t| { add(s, 1, 0, WorkerState::Starting, t(0)); s.workers.get_mut(&1).unwrap().killed = true; } },
            Row { name: "spawn due now", now: 100, expect: 100,
                setup: |s, t| s.schedule_spawn(3, t(100)) },
            Row { name: "spawn after its back-off", now: 100, expect: 500,
                setup: |s, t| s.schedule_spawn(3, t(500)) },
            Row { name: "spawn due, spawn delay not over", now: 100, expect: 130,
                setup: |s, t| { s.schedule_spawn(3, t(0)); s.schedule.next_spawn_at = t(130); } },
            Row { name: "dying: strictly after the soft-kill timeout", now: 100, expect: 5_051,
                setup: |s, t| { add(s, 1, 0, WorkerState::Dying, t(0)); s.workers.get_mut(&1).unwrap().dying_since = Some(t(50)); } },
            Row { name: "dying and killed: nothing more to do", now: 100, expect: 60_000,
                setup: |s, t| { add(s, 1, 0, WorkerState::Dying, t(0)); let w = s.workers.get_mut(&1).unwrap(); w.dying_since = Some(t(50)); w.killed = true; } },
            Row { name: "kill queue: next turn", now: 100, expect: 300,
                setup: |s, t| { s.schedule.kill_queue.push_back((1, "test")); s.schedule.next_kill_at = t(300); } },
        ];
        for row in rows {
            let mut s = supervisor(&t);
            (row.setup)(&mut s, &t);
            assert_eq!(
                s.next_deadline(t(row.now), []),
                t(row.expect),
                "{}",
                row.name
            );
        }
    }

    #[test]
    fn start_up_spawns_one_band_per_spawn_delay() {
        let t = clock();
        let mut s = supervisor(&t);
        for band in 0..3 {
            s.schedule_spawn(band, t(0));
        }
        let mut spawned = Vec::new();
        let mut now = t(0);
        while spawned.len() < 3 {
            now = s.next_deadline(now, []).max(now);
            if let Some(band) = s.due_spawn(now) {
                add(&mut s, 100 + band as i32, band, WorkerState::Starting, now);
                s.spawned_at(now);
                spawned.push((band, now));
            } else {
                now += STARTING_POLL;
            }
        }
        assert_eq!(spawned, vec![(0, t(0)), (1, t(50)), (2, t(100))]);
        // A band that has a worker starting is not spawned twice.
        s.schedule_spawn(1, now);
        assert_eq!(s.due_spawn(now + SPAWN_DELAY), None);
        assert!(s.schedule.pending_spawns.is_empty());
    }

    #[test]
    fn a_failing_band_backs_off_and_a_fresh_start_gives_up() {
        let t = clock();
        let mut s = supervisor(&t);
        // Once the cluster served (or with a previous table), it never gives up.
        let mut seen = Vec::new();
        for _ in 0..8 {
            match s.band_failed(2, t(0), false) {
                BandFailure::Retry { attempt, backoff } => seen.push((attempt, backoff)),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            seen,
            vec![
                (1, ms(200)),
                (2, ms(400)),
                (3, ms(800)),
                (4, ms(1600)),
                (5, ms(3200)),
                (6, ms(6400)),
                (7, MAX_BACKOFF),
                (8, MAX_BACKOFF),
            ]
        );
        assert_eq!(
            s.schedule.pending_spawns.get(&2),
            Some(&(t(0) + MAX_BACKOFF))
        );
        assert!(s.band_has_failed(2));
        // Ready: the back-off starts over.
        s.band_ready(2);
        assert!(!s.band_has_failed(2));
        assert_eq!(
            s.band_failed(2, t(0), false),
            BandFailure::Retry {
                attempt: 1,
                backoff: ms(200)
            }
        );
        // A fresh start (nothing ever served) gives up at the third failure.
        let mut s = supervisor(&t);
        assert!(matches!(
            s.band_failed(0, t(0), true),
            BandFailure::Retry { attempt: 1, .. }
        ));
        assert!(matches!(
            s.band_failed(0, t(0), true),
            BandFailure::Retry { attempt: 2, .. }
        ));
        assert_eq!(
            s.band_failed(0, t(0), true),
            BandFailure::GiveUp {
                attempts: FRESH_START_ATTEMPTS
            }
        );
    }

    #[test]
    fn a_band_whose_killed_worker_has_not_exited_yet_is_spawned_after_the_exit() {
        let t = clock();
        let mut s = supervisor(&t);
        // Killed for its connect timeout at t(1000), back-off 200 ms.
        add(&mut s, 7, 0, WorkerState::Starting, t(0));
        s.workers.get_mut(&7).unwrap().killed = true;
        assert!(matches!(
            s.band_failed(0, t(1000), false),
            BandFailure::Retry { .. }
        ));
        // Its exit is late (a loaded host): the band is neither spawned twice
        // nor dropped, and the loop does not spin on a past deadline.
        assert_eq!(s.due_spawn(t(1300)), None);
        assert_eq!(s.schedule.pending_spawns.get(&0), Some(&t(1200)));
        assert_eq!(s.next_deadline(t(1300), []), t(60_000));
        // The exit comes: the band is due.
        s.workers.remove(&7);
        assert_eq!(s.next_deadline(t(1400), []), t(1200));
        assert_eq!(s.due_spawn(t(1400)), Some(0));
    }

    #[test]
    fn exits_table() {
        let t = clock();
        struct Row {
            name: &'static str,
            state: WorkerState,
            killed: bool,
            /// A replacement of band 0 is starting already.
            replacing: bool,
            kind: ExitKind,
            scheduled: bool,
        }
        #[rustfmt::skip]
        let rows = [
            Row { name: "live worker crashes", state: WorkerState::Live, killed: false, replacing: false, kind: ExitKind::Crashed, scheduled: true },
            Row { name: "live worker crashes, replacement starting", state: WorkerState::Live, killed: false, replacing: true, kind: ExitKind::Crashed, scheduled: false },
            Row { name: "starting worker exits", state: WorkerState::Starting, killed: false, replacing: false, kind: ExitKind::StartFailed, scheduled: false },
            Row { name: "starting worker killed for its timeout", state: WorkerState::Starting, killed: true, replacing: false, kind: ExitKind::StartKilled, scheduled: false },
            Row { name: "retired worker leaves", state: WorkerState::Retired, killed: false, replacing: false, kind: ExitKind::Left, scheduled: false },
            Row { name: "dying worker leaves", state: WorkerState::Dying, killed: true, replacing: false, kind: ExitKind::Left, scheduled: false },
        ];
        for row in rows {
            let mut s = supervisor(&t);
            add(&mut s, 1, 0, row.state, t(0));
            s.workers.get_mut(&1).unwrap().killed = row.killed;
            if row.replacing {
                add(&mut s, 2, 0, WorkerState::Starting, t(0));
            }
            let (w, kind) = s.exited(1, t(500)).expect(row.name);
            assert_eq!((w.pid, kind), (1, row.kind), "{}", row.name);
            assert!(!s.workers.contains_key(&1), "{}", row.name);
            assert_eq!(
                s.schedule.pending_spawns.get(&0).copied(),
                row.scheduled.then_some(t(500)),
                "{}",
                row.name
            );
            assert_eq!(s.exited(1, t(600)), None, "{}: twice", row.name);
        }
    }

    #[test]
    fn promotion_retires_the_bands_old_live_worker_with_its_reason() {
        let t = clock();
        let mut s = supervisor(&t);
        add(&mut s, 1, 0, WorkerState::Live, t(0));
        s.workers.get_mut(&1).unwrap().reason = Some("low watermark breach".into());
        add(&mut s, 2, 1, WorkerState::Live, t(0));
        add(&mut s, 3, 0, WorkerState::Retired, t(0));
        add(&mut s, 4, 0, WorkerState::Starting, t(0));
        let p = s.promoted(4, t(900)).expect("known");
        assert_eq!(
            p,
            Promotion {
                crashed_for: None,
                retire: vec![(1, "low watermark breach; replaced by worker 4".into())],
            }
        );
        assert_eq!(s.workers[&4].state, WorkerState::Live);
        let w = s.retire(1, t(900), &p.retire[0].1).expect("known").clone();
        assert_eq!(w.state, WorkerState::Retired);
        assert_eq!(w.retired_at, Some(t(900)));
        // After a crash: how long the band went without its own worker.
        s.workers.remove(&4);
        s.replace_at_once(0, t(1000));
        add(&mut s, 5, 0, WorkerState::Starting, t(1000));
        let p = s.promoted(5, t(1250)).expect("known");
        assert_eq!(p.crashed_for, Some(ms(250)));
        assert!(p.retire.is_empty(), "{p:?}");
        assert_eq!(s.promoted(99, t(1300)), None);
    }

    #[test]
    fn a_starting_worker_killed_for_its_connect_timeout_never_becomes_ready() {
        let t = clock();
        let mut s = supervisor(&t);
        add(&mut s, 1, 0, WorkerState::Starting, t(0));
        s.workers.get_mut(&1).unwrap().killed = true;
        // Its listeners were being registered when it was killed.
        let how = Readiness::Listening {
            rss: 1,
            connections: 0,
            nice: 0,
        };
        assert!(s.handle(t(10), Event::Ready { pid: 1, how }).is_empty());
        assert!(!s.workers[&1].ready);
        assert!(s.awaiting_readiness().is_empty());
    }

    #[test]
    fn a_worker_is_asked_to_die_once() {
        let t = clock();
        let mut s = supervisor(&t);
        add(&mut s, 1, 0, WorkerState::Retired, t(0));
        let w = s.ask_to_die(1, t(10), "idle").expect("first time").clone();
        assert_eq!((w.state, w.dying_since), (WorkerState::Dying, Some(t(10))));
        assert_eq!(s.ask_to_die(1, t(20), "again").map(|w| w.pid), None);
        assert_eq!(s.workers[&1].dying_since, Some(t(10)));
        assert_eq!(s.workers[&1].reason.as_deref(), Some("idle"));
    }

    #[test]
    fn a_crash_is_replaced_at_once_without_back_off() {
        let t = clock();
        let mut s = supervisor(&t);
        add(&mut s, 10, 0, WorkerState::Live, t(0));
        // A spawn just happened: the next would wait for the spawn delay.
        s.spawned_at(t(1000));
        s.workers.remove(&10);
        s.replace_at_once(0, t(1010));
        assert_eq!(s.next_deadline(t(1010), []), t(1010));
        assert_eq!(s.due_spawn(t(1010)), Some(0));
        assert_eq!(s.schedule.crashed_at.get(&0), Some(&t(1010)));
        // Not when its replacement is starting already.
        let mut s = supervisor(&t);
        add(&mut s, 11, 0, WorkerState::Starting, t(0));
        s.replace_at_once(0, t(10));
        assert!(s.schedule.pending_spawns.is_empty());
    }

    #[test]
    fn kill_retired_ends_one_retired_worker_per_spawn_delay() {
        let t = clock();
        let mut s = supervisor(&t);
        for pid in [1, 2, 3] {
            add(&mut s, pid, pid as u32, WorkerState::Retired, t(0));
        }
        add(&mut s, 4, 0, WorkerState::Live, t(0));
        assert_eq!(s.queue_kill_retired("kill-retired"), 3);
        // Queued already: not twice.
        assert_eq!(s.queue_kill_retired("SIGUSR1"), 0);
        // Worker 2 exits by itself meanwhile: skipped.
        s.workers.remove(&2);
        let mut ended = Vec::new();
        let mut now = t(0);
        for _ in 0..10 {
            now = s.next_deadline(now, []).max(now);
            if let Some((pid, why)) = s.next_kill(now) {
                assert_eq!(why, "kill-retired");
                if let Some(w) = s.workers.get_mut(&pid) {
                    w.state = WorkerState::Dying;
                    w.dying_since = Some(now);
                }
                ended.push((pid, now));
            } else {
                break;
            }
        }
        assert_eq!(ended, vec![(1, t(0)), (3, t(50))]);
        assert!(s.schedule.kill_queue.is_empty());
        assert_eq!(s.workers[&4].state, WorkerState::Live);
    }

    #[test]
    fn the_soft_kill_deadline_is_strictly_after_the_timeout() {
        let t = clock();
        let mut s = supervisor(&t);
        add(&mut s, 1, 0, WorkerState::Dying, t(0));
        s.workers.get_mut(&1).unwrap().dying_since = Some(t(0));
        assert!(
            s.late_dying(t(5000)).is_empty(),
            "exactly the timeout is not late"
        );
        let deadline = s.next_deadline(t(100), []);
        assert!(deadline > t(5000) && deadline <= t(5001), "{deadline:?}");
        assert_eq!(s.late_dying(deadline), vec![(1, deadline - t(0))]);
        s.workers.get_mut(&1).unwrap().killed = true;
        assert!(s.late_dying(t(6000)).is_empty(), "SIGKILL is sent once");
    }
}

/// The core against a fake host: an in-memory world of worker processes
/// that carries out the effects (a signal kills or is ignored, `die` ends an
/// aware worker) and feeds what happened back (exits) into the core.
#[cfg(test)]
mod host_tests {
    use std::collections::BTreeSet;

    use super::*;

    const SPAWN_DELAY: Duration = Duration::from_millis(50);
    const SOFT_KILL: Duration = Duration::from_secs(5);

    struct Host {
        core: Supervisor,
        zero: Instant,
        /// Running worker processes.
        alive: BTreeSet<i32>,
        /// Workers that ignore SIGTERM and `die`.
        stubborn: BTreeSet<i32>,
        /// What was done, as (ms, pid, what).
        done: Vec<(u64, i32, String)>,
        kills_counted: Vec<&'static str>,
        /// The log lines, in order.
        logs: Vec<String>,
        /// Other effects carried out (`SaveRegistry`, `CountCrash` …), in order.
        other: Vec<String>,
        next_pid: i32,
        /// The latest time an event was fed at (ms): `run_until` goes on from there.
        now_ms: u64,
        /// Workers that listen on their ports (the others never do).
        listening: BTreeSet<i32>,
        /// Workers that listen but whose listeners the backend refuses.
        unsteerable: BTreeSet<i32>,
    }

    impl Host {
        fn new() -> Host {
            let zero = Instant::now();
            let mut core = Supervisor::new(zero, SPAWN_DELAY, SOFT_KILL).for_generation(2, 4);
            core.schedule.next_monitor = zero + Duration::from_secs(3600);
            // A table was published (no giving up then).
            core.published = true;
            Host {
                core,
                zero,
                alive: BTreeSet::new(),
                stubborn: BTreeSet::new(),
                done: Vec::new(),
                kills_counted: Vec::new(),
                logs: Vec::new(),
                other: Vec::new(),
                next_pid: 100,
                now_ms: 0,
                listening: BTreeSet::new(),
                unsteerable: BTreeSet::new(),
            }
        }

        fn t(&self, ms: u64) -> Instant {
            self.zero + Duration::from_millis(ms)
        }

        fn worker(&mut self, pid: i32, band: u32, state: WorkerState, aware: bool) {
            self.worker_of(pid, band, 1, state, aware);
        }

        fn worker_of(
            &mut self,
            pid: i32,
            band: u32,
            generation: u64,
            state: WorkerState,
            aware: bool,
        ) {
            let mut w = Worker::new(
                pid,
                band,
                generation,
                state,
                vec![20000 + band as u16],
                self.zero,
            );
            w.ready = true;
            w.conn = aware.then_some(pid as u64);
            self.core.workers.insert(pid, w);
            self.alive.insert(pid);
        }

        /// Feed `event` at `ms`, carry out the effects, feed the exits back.
        fn at(&mut self, ms: u64, event: Event) {
            self.now_ms = self.now_ms.max(ms);
            let now = self.t(ms);
            // Processes end after the effects are carried out, as on a real
            // host, where the exit is an event of its own.
            let mut exits = Vec::new();
            let mut spawns = Vec::new();
            let mut promotes = Vec::new();
            for effect in self.core.handle(now, event) {
                match effect {
                    Effect::Signal { pid, signal, .. } => {
                        self.done.push((ms, pid, signal.as_str().to_owned()));
                        if signal == Signal::SIGKILL || !self.stubborn.contains(&pid) {
                            exits.push(pid);
                        }
                    }
                    Effect::Send { pid, message } => {
                        self.done.push((ms, pid, format!("{message:?}")));
                        if matches!(message, MasterMessage::Die { .. })
                            && !self.stubborn.contains(&pid)
                        {
                            exits.push(pid);
                        }
                    }
                    Effect::CountKill { how, .. } => self.kills_counted.push(how),
                    Effect::Log { text, .. } => self.logs.push(text),
                    Effect::Retire { pid, reason } => {
                        self.core.retire(pid, now, &reason);
                        self.done.push((ms, pid, format!("retired: {reason}")));
                    }
                    Effect::Spawn { band } => spawns.push(band),
                    Effect::Promote { pid } => promotes.push(pid),
                    other => self.other.push(format!("{other:?}")),
                }
            }
            for band in spawns {
                self.spawn(ms, band);
            }
            // The band's write succeeds at once.
            for pid in promotes {
                let port = self.core.workers.get(&pid).map_or(0, |w| w.ports[0]);
                self.done.push((ms, pid, "steered to".to_owned()));
                self.at(ms, Event::Promoted { pid, port });
            }
            for pid in exits {
                self.exit(ms, pid);
            }
        }

        /// The runtime's spawn: a process runs, and the core hears of it.
        fn spawn(&mut self, ms: u64, band: u32) {
            let pid = self.next_pid;
            self.next_pid += 1;
            self.alive.insert(pid);
            self.done
                .push((ms, pid, format!("spawned for band {band}")));
            self.at(
                ms,
                Event::Spawned {
                    band,
                    pid,
                    ports: vec![21000 + band as u16],
                    start_time: 0,
                    uid: 0,
                },
            );
        }

        /// Worker `pid` exits (as it was: live, retired …).
        fn exit(&mut self, ms: u64, pid: i32) {
            if self.alive.remove(&pid) {
                let state = self.core.workers[&pid].state;
                self.done
                    .push((ms, pid, format!("exited ({})", state_name(state))));
                self.at(
                    ms,
                    Event::Exited {
                        pid,
                        status: "exited".into(),
                        may_give_up: !self.core.published,
                    },
                );
            }
        }

        /// The runtime's readiness poll: what it sees of each starting worker.
        fn check_starting(&mut self, ms: u64) {
            for pid in self.core.awaiting_readiness() {
                let event = if self.unsteerable.contains(&pid) {
                    Event::NotReady {
                        pid,
                        seen: NotReady::NotSteerable {
                            cause: format!("worker {pid}: the backend refuses its listener"),
                        },
                        may_give_up: !self.core.published,
                    }
                } else if self.listening.contains(&pid) {
                    Event::Ready {
                        pid,
                        how: Readiness::Listening {
                            rss: 1 << 20,
                            connections: 0,
                            nice: 0,
                        },
                    }
                } else {
                    Event::NotReady {
                        pid,
                        seen: NotReady::NotListening {
                            foreign_netns: None,
                        },
                        may_give_up: !self.core.published,
                    }
                };
                self.at(ms, event);
            }
        }

        /// Tick at every deadline the core names, from the latest event on
        /// up to `until` ms (overdue ones at once).
        fn run_until(&mut self, until: u64) {
            let mut now = self.t(self.now_ms);
            let mut last: Option<Instant> = None;
            loop {
                let mut next = self.core.next_deadline(now, []).max(now);
                // Something due that a tick does not take (a spawn): move on.
                if let Some(last) = last
                    && next <= last
                {
                    next = last + Duration::from_millis(1);
                }
                if next > self.t(until) {
                    return;
                }
                let ms = u64::try_from(next.duration_since(self.zero).as_millis()).unwrap_or(0);
                self.at(ms, Event::Tick);
                self.check_starting(ms);
                (now, last) = (next, Some(next));
            }
        }
    }

    fn what(done: &[(u64, i32, String)]) -> Vec<(u64, i32, &str)> {
        done.iter()
            .map(|(ms, pid, w)| (*ms, *pid, w.as_str()))
            .collect()
    }

    #[test]
    fn kill_retired_ends_the_retired_workers_one_spawn_delay_apart() {
        let mut h = Host::new();
        h.worker(1, 0, WorkerState::Retired, false);
        h.worker(2, 1, WorkerState::Retired, true);
        h.worker(3, 2, WorkerState::Retired, false);
        h.worker(4, 0, WorkerState::Live, false);
        assert_eq!(h.core.queue_kill_retired("kill-retired"), 3);
        h.run_until(1000);
        assert_eq!(
            what(&h.done),
            [
                (0, 1, "SIGTERM"),
                (0, 1, "exited (dying)"),
                (50, 2, "Die { reason: \"kill-retired\" }"),
                (50, 2, "exited (dying)"),
                (100, 3, "SIGTERM"),
                (100, 3, "exited (dying)"),
            ]
        );
        assert_eq!(h.kills_counted, ["SIGTERM", "die", "SIGTERM"]);
        // The live worker is untouched.
        assert_eq!(h.alive, BTreeSet::from([4]));
        assert_eq!(h.core.workers[&4].state, WorkerState::Live);
    }

    #[test]
    fn a_worker_that_ignores_die_is_killed_strictly_after_the_soft_kill_timeout() {
        let mut h = Host::new();
        h.worker(7, 0, WorkerState::Retired, true);
        h.stubborn.insert(7);
        h.at(
            100,
            Event::AskToDie {
                pid: 7,
                reason: "over the low watermark".into(),
            },
        );
        // Asked once only.
        h.at(
            200,
            Event::AskToDie {
                pid: 7,
                reason: "again".into(),
            },
        );
        h.run_until(100 + 5_000);
        assert_eq!(
            h.alive,
            BTreeSet::from([7]),
            "not killed at the timeout itself"
        );
        h.run_until(60_000);
        assert_eq!(
            what(&h.done),
            [
                (100, 7, "Die { reason: \"over the low watermark\" }"),
                (5_101, 7, "SIGKILL"),
                (5_101, 7, "exited (dying)"),
            ]
        );
        assert_eq!(h.kills_counted, ["die", "SIGKILL"]);
        assert!(h.core.workers.is_empty());
    }

    #[test]
    fn a_crash_while_a_retired_worker_is_dying_replaces_its_band_at_once() {
        let mut h = Host::new();
        h.worker(1, 0, WorkerState::Retired, false);
        h.worker(2, 0, WorkerState::Live, false);
        h.stubborn.insert(1);
        h.at(
            0,
            Event::AskToDie {
                pid: 1,
                reason: "idle".into(),
            },
        );
        // The live worker of the same band crashes.
        h.exit(10, 2);
        assert_eq!(h.core.due_spawn(h.t(10)), Some(0), "replaced at once");
        // The dying one is still killed on time.
        h.run_until(60_000);
        assert_eq!(
            what(&h.done),
            [
                (0, 1, "SIGTERM"),
                (10, 2, "exited (live)"),
                (5_001, 1, "SIGKILL"),
                (5_001, 1, "exited (dying)"),
            ]
        );
    }

    #[test]
    fn a_live_workers_crash_during_a_reload_replaces_its_band_and_leaves_the_retired_alone() {
        let mut h = Host::new();
        // Generation 1 retired by the reload, generation 2 live.
        h.worker_of(1, 0, 1, WorkerState::Retired, false);
        h.worker_of(2, 1, 1, WorkerState::Retired, true);
        h.worker_of(11, 0, 2, WorkerState::Live, true);
        h.worker_of(12, 1, 2, WorkerState::Live, false);
        h.at(0, Event::Tick);
        h.exit(500, 11);
        assert_eq!(
            h.logs,
            ["live worker 11 (band 0, generation 2) exited: replacing it"]
        );
        assert_eq!(
            h.other,
            [
                "SaveRegistry",
                "CoverUnservedBands",
                "ForgetConn { conn: 11 }",
                "CountCrash"
            ]
        );
        assert_eq!(h.core.schedule.crashed_at.get(&0), Some(&h.t(500)));
        h.run_until(60_000);
        assert_eq!(
            what(&h.done),
            [(500, 11, "exited (live)"), (500, 100, "spawned for band 0"),],
            "the band is replaced at once, nothing else is done"
        );
        assert_eq!(h.alive, BTreeSet::from([1, 2, 12, 100]));
        for pid in [1, 2] {
            let w = &h.core.workers[&pid];
            assert_eq!((w.state, w.dying_since), (WorkerState::Retired, None));
        }
        assert_eq!(h.core.workers[&100].state, WorkerState::Starting);
        assert!(h.kills_counted.is_empty());
        // An exit already taken is not taken twice.
        assert!(
            h.core
                .handle(
                    h.t(600),
                    Event::Exited {
                        pid: 11,
                        status: "exited".into(),
                        may_give_up: false
                    }
                )
                .is_empty()
        );
    }

    #[test]
    fn a_worker_never_ready_is_killed_backs_off_longer_each_time_and_a_fresh_start_gives_up() {
        let mut h = Host::new();
        h.core.published = false;
        h.core.connect_timeout = Duration::from_millis(1000);
        h.core.schedule_spawn(0, h.t(0));
        h.run_until(60_000);
        // Killed strictly after the connect timeout (at the next readiness
        // poll), then spawned again after 200 ms, then 400 ms; the third
        // failure before any publish gives up.
        assert_eq!(
            what(&h.done),
            [
                (0, 100, "spawned for band 0"),
                (1_020, 100, "SIGKILL"),
                (1_020, 100, "exited (starting)"),
                (1_220, 101, "spawned for band 0"),
                (2_240, 101, "SIGKILL"),
                (2_240, 101, "exited (starting)"),
                (2_640, 102, "spawned for band 0"),
                (3_660, 102, "SIGKILL"),
                (3_660, 102, "exited (starting)"),
            ]
        );
        assert_eq!(h.kills_counted, ["SIGKILL"; 3]);
        assert_eq!(
            h.logs,
            [
                "spawned worker 100 for band 0 (generation 2, port 21000)",
                "worker 100 (band 0) is not listening on port 21000 after 1s (not ready in time): killing it",
                "band 0: attempt 1 failed (not ready in time); next attempt in 200ms",
                "starting worker 100 (band 0) exited before it was ready",
                "spawned worker 101 for band 0 (generation 2, port 21000)",
                "worker 101 (band 0) is not listening on port 21000 after 1s (not ready in time): killing it",
                "band 0: attempt 2 failed (not ready in time); next attempt in 400ms",
                "starting worker 101 (band 0) exited before it was ready",
                "spawned worker 102 for band 0 (generation 2, port 21000)",
                "worker 102 (band 0) is not listening on port 21000 after 1s (not ready in time): killing it",
                "starting worker 102 (band 0) exited before it was ready",
            ]
        );
        assert!(
            h.other.contains(
                &"GiveUp { band: 0, attempts: 3, why: \"not ready in time\" }".to_owned()
            ),
            "{:?}",
            h.other
        );
        // The kill's exit is not a second failure: three in all.
        assert_eq!(h.core.schedule.failures.get(&0), Some(&3));
        assert!(h.core.schedule.pending_spawns.is_empty());
        assert!(h.alive.is_empty());
    }

    #[test]
    fn once_the_cluster_served_a_band_never_ready_backs_off_up_to_the_maximum() {
        let mut h = Host::new();
        h.core.connect_timeout = Duration::from_millis(100);
        h.core.schedule_spawn(1, h.t(0));
        h.run_until(120_000);
        let backoffs: Vec<&str> = h
            .logs
            .iter()
            .filter_map(|l| l.split("next attempt in ").nth(1))
            .collect();
        assert_eq!(
            &backoffs[..8],
            [
                "200ms", "400ms", "800ms", "1.6s", "3.2s", "6.4s", "10s", "10s"
            ]
        );
        assert!(
            !h.other.iter().any(|o| o.starts_with("GiveUp")),
            "{:?}",
            h.other
        );
    }

    #[test]
    fn a_crashed_bands_replacement_is_promoted_and_a_health_replacement_retires_the_old_worker() {
        let mut h = Host::new();
        h.worker_of(1, 0, 1, WorkerState::Retired, false);
        h.worker_of(11, 0, 2, WorkerState::Live, false);
        h.worker_of(12, 1, 2, WorkerState::Live, false);
        h.core.workers.get_mut(&12).expect("worker 12").reason = Some("rss over the limit".into());
        // Band 0's live worker crashes; its replacement is ready and steered
        // to 300 ms later.
        h.exit(100, 11);
        h.at(100, Event::Tick);
        h.at(
            400,
            Event::Promoted {
                pid: 100,
                port: 21000,
            },
        );
        // Band 1 got a replacement for its worker's memory (the policy).
        h.worker_of(13, 1, 2, WorkerState::Starting, false);
        h.at(
            500,
            Event::Promoted {
                pid: 13,
                port: 20001,
            },
        );
        // A promotion that arrives after the worker left changes nothing.
        assert!(
            h.core
                .handle(h.t(600), Event::Promoted { pid: 99, port: 1 })
                .is_empty()
        );
        assert!(
            h.core
                .handle(
                    h.t(600),
                    Event::Promoted {
                        pid: 100,
                        port: 21000
                    }
                )
                .is_empty(),
            "once"
        );
        assert_eq!(
            h.logs,
            [
                "live worker 11 (band 0, generation 2) exited: replacing it",
                "spawned worker 100 for band 0 (generation 2, port 21000)",
                "band 0 now served by worker 100 on port 21000 (300ms after the crash)",
                "band 1 now served by worker 13 on port 20001",
            ]
        );
        assert_eq!(
            what(&h.done),
            [
                (100, 11, "exited (live)"),
                (100, 100, "spawned for band 0"),
                (
                    500,
                    12,
                    "retired: rss over the limit; replaced by worker 13"
                ),
            ]
        );
        let state = |pid: i32| h.core.workers[&pid].state;
        assert_eq!(
            [state(1), state(100), state(12), state(13)],
            [
                WorkerState::Retired,
                WorkerState::Live,
                WorkerState::Retired,
                WorkerState::Live
            ]
        );
        assert_eq!(h.core.workers[&12].retired_at, Some(h.t(500)));
        assert_eq!(
            h.core.workers[&1].retired_at, None,
            "the old generation is untouched"
        );
    }

    #[test]
    fn spawns_are_effects_one_spawn_delay_apart_and_a_band_the_generation_lacks_is_not_replaced() {
        let mut h = Host::new();
        // A reload lowered --workers to 4: an old live worker of band 5 crashes.
        h.worker_of(1, 5, 1, WorkerState::Live, false);
        for band in 0..3 {
            h.core.schedule_spawn(band, h.t(0));
        }
        h.exit(0, 1);
        h.run_until(1_000);
        assert_eq!(
            what(&h.done),
            [
                (0, 1, "exited (live)"),
                (0, 100, "spawned for band 0"),
                (50, 101, "spawned for band 1"),
                (100, 102, "spawned for band 2"),
            ]
        );
        assert!(
            h.logs
                .contains(&"band 5 is not part of generation 2 (4 bands): not replaced".to_owned()),
            "{:?}",
            h.logs
        );
        assert!(
            h.logs
                .contains(&"spawned worker 101 for band 1 (generation 2, port 21001)".to_owned()),
            "{:?}",
            h.logs
        );
        // Each spawned worker is known as a starting worker of this
        // generation, the master's own child, and the registry is saved.
        let w = &h.core.workers[&102];
        assert_eq!(
            (w.band, w.generation, w.state, w.own_child, w.ports.clone()),
            (2, 2, WorkerState::Starting, true, vec![21002])
        );
        assert_eq!(
            h.other.iter().filter(|o| *o == "SaveRegistry").count(),
            1 + 3,
            "{:?}",
            h.other
        );
    }

    #[test]
    fn a_replacement_is_steered_to_when_it_listens_and_before_the_publish_it_waits() {
        let mut h = Host::new();
        h.worker_of(11, 0, 2, WorkerState::Live, false);
        // Band 0's worker crashes; its replacement (pid 100) listens 300 ms
        // after the poll at 300 ms, and is steered to at the next one.
        h.exit(100, 11);
        h.run_until(300);
        h.listening.insert(100);
        h.run_until(1_000);
        assert_eq!(
            what(&h.done),
            [
                (100, 11, "exited (live)"),
                (100, 100, "spawned for band 0"),
                (320, 100, "steered to"),
            ]
        );
        assert_eq!(
            h.logs[1..],
            [
                "spawned worker 100 for band 0 (generation 2, port 21000)",
                "worker 100 (band 0, generation 2) is ready (listening on port 21000) after 220ms",
                "band 0 now served by worker 100 on port 21000 (220ms after the crash)",
            ]
        );
        let w = &h.core.workers[&100];
        assert_eq!(
            (w.state, w.ready, w.rss),
            (WorkerState::Live, true, 1 << 20)
        );
        // A hello later changes nothing: ready once.
        assert!(
            h.core
                .handle(
                    h.t(1_000),
                    Event::Ready {
                        pid: 100,
                        how: Readiness::Hello
                    }
                )
                .is_empty()
        );

        // Before the first publish a ready worker waits for the table (the
        // runtime publishes it): no band write, not live.
        let mut h = Host::new();
        h.core.published = false;
        h.core.schedule_spawn(0, h.t(0));
        h.at(0, Event::Tick);
        h.at(
            40,
            Event::Ready {
                pid: 100,
                how: Readiness::Hello,
            },
        );
        h.run_until(1_000);
        assert_eq!(what(&h.done), [(0, 100, "spawned for band 0")]);
        assert_eq!(
            h.logs[1],
            "worker 100 (band 0, generation 2) is ready (hello on port 21000) after 40ms"
        );
        assert_eq!(h.core.workers[&100].state, WorkerState::Starting);
        // Published: the next tick steers to it.
        h.core.published = true;
        h.at(1_000, Event::Tick);
        assert_eq!(h.core.workers[&100].state, WorkerState::Live);
    }

    #[test]
    fn a_refused_listener_is_logged_once_and_a_worker_in_another_netns_is_killed_saying_so() {
        let mut h = Host::new();
        h.core.connect_timeout = Duration::from_millis(500);
        h.core.schedule_spawn(0, h.t(0));
        h.core.schedule_spawn(1, h.t(0));
        h.unsteerable.insert(100);
        h.run_until(2_000);
        // Worker 100 listens but cannot be steered to: one error line, its
        // reason kept, never killed for the connect timeout.
        assert_eq!(
            h.logs
                .iter()
                .filter(|l| *l == "worker 100: the backend refuses its listener")
                .count(),
            1,
            "{:?}",
            h.logs
        );
        assert!(h.alive.contains(&100));
        assert_eq!(
            h.core.workers[&100].reason.as_deref(),
            Some("worker 100: the backend refuses its listener")
        );
        // Worker 101 (spawned at 50 ms) never listened: killed at the first
        // poll strictly after 500 ms.
        assert!(
            what(&h.done).contains(&(570, 101, "SIGKILL")),
            "{:?}",
            h.done
        );
        // Seen in another network namespace, the kill says why.
        let mut h = Host::new();
        h.core.connect_timeout = Duration::from_millis(500);
        h.core.schedule_spawn(0, h.t(0));
        h.at(0, Event::Tick);
        h.at(
            400,
            Event::NotReady {
                pid: 100,
                seen: NotReady::NotListening {
                    foreign_netns: Some(4026532999),
                },
                may_give_up: false,
            },
        );
        assert!(h.alive.contains(&100), "not before the timeout");
        h.at(
            501,
            Event::NotReady {
                pid: 100,
                seen: NotReady::NotListening {
                    foreign_netns: Some(4026532999),
                },
                may_give_up: false,
            },
        );
        assert_eq!(
            h.logs[1],
            "worker 100 (band 0) is not listening on port 21000 after 500ms (it runs in another \
             network namespace (net:[4026532999]); start workers in the master's network namespace): \
             killing it"
        );
        assert!(!h.alive.contains(&100));
    }

    #[test]
    fn a_published_table_makes_its_workers_live_and_retires_the_old_generation_it_no_longer_steers_to()
     {
        let mut h = Host::new();
        h.core.published = false;
        // Generation 1: bands 0-2 live on ports 20000-20002.
        for band in 0..3 {
            h.worker_of(1 + band as i32, band, 1, WorkerState::Live, false);
        }
        // Generation 2: bands 0 and 1 ready; band 2 failed, so the table
        // keeps generation 1's worker for it.
        for band in 0..2 {
            h.core.schedule_spawn(band, h.t(0));
        }
        h.listening.extend([100, 101]);
        h.run_until(100);
        assert_eq!(h.core.workers[&100].state, WorkerState::Starting);
        h.at(
            200,
            Event::Published {
                ready: vec![100, 101],
                steered: vec![21000, 21001, 20002],
            },
        );
        let state = |h: &Host, pid: i32| h.core.workers[&pid].state;
        assert_eq!(
            [1, 2, 3, 100, 101].map(|pid| state(&h, pid)),
            [
                WorkerState::Retired,
                WorkerState::Retired,
                WorkerState::Live,
                WorkerState::Live,
                WorkerState::Live
            ]
        );
        assert_eq!(
            what(&h.done)[2..],
            [
                (200, 1, "retired: a new generation took over"),
                (200, 2, "retired: a new generation took over"),
            ]
        );
        assert!(h.core.published);
        assert_eq!(h.core.schedule.next_monitor, h.t(200), "measured at once");
        assert_eq!(
            h.other.last().map(String::as_str),
            Some("CoverUnservedBands")
        );
        // Band 2's late worker is promoted later: then the old one retires.
        h.listening.insert(102);
        h.worker_of(102, 2, 2, WorkerState::Starting, false);
        h.core.workers.get_mut(&102).expect("worker 102").ready = false;
        h.run_until(400);
        assert_eq!(state(&h, 3), WorkerState::Retired);
        assert_eq!(
            h.core.workers[&3].reason.as_deref(),
            Some("replaced by worker 102")
        );
    }

    #[test]
    fn a_reloads_workers_are_adopted_live_if_the_table_points_at_them_and_retired_if_not() {
        let mut h = Host::new();
        h.core.published = false;
        let adopted = |pid: i32, band: u32, generation: u64, in_table: bool| Event::Adopted {
            pid,
            band,
            generation,
            port: 20000 + pid as u16,
            ports: vec![20000 + pid as u16],
            start_time: 77,
            uid: 1000,
            nice: 5,
            age: Duration::from_secs(30),
            in_table,
        };
        h.at(1_000_000, adopted(1, 0, 1, true));
        h.at(1_000_000, adopted(2, 0, 0, false));
        assert_eq!(
            h.logs,
            [
                "adopted worker 1 (band 0, generation 1, port 20001) as live",
                "adopted worker 2 (band 0, generation 0, port 20002) as retired",
            ]
        );
        let (live, retired) = (&h.core.workers[&1], &h.core.workers[&2]);
        assert_eq!(
            (live.state, live.ready, live.retired_at, live.own_child),
            (WorkerState::Live, true, None, false)
        );
        assert_eq!(
            (retired.state, retired.retired_at),
            (WorkerState::Retired, Some(h.t(1_000_000)))
        );
        assert_eq!(
            (live.start_time, live.uid, live.nice, live.started_at),
            (77, 1000, 5, h.t(1_000_000 - 30_000))
        );
        // The new generation's table takes over: the adopted live worker retires.
        h.at(
            1_000_100,
            Event::Published {
                ready: vec![],
                steered: vec![21000],
            },
        );
        assert_eq!(h.core.workers[&1].state, WorkerState::Retired);
        assert_eq!(h.core.workers[&2].retired_at, Some(h.t(1_000_000)));
    }

    #[test]
    fn the_policys_actions_table() {
        struct Row {
            name: &'static str,
            action: Action,
            /// Band 0's replacement is starting already.
            replacing: bool,
            done: &'static [(u64, i32, &'static str)],
            /// Band 0 is due for a spawn afterwards.
            scheduled: bool,
            logs: &'static [&'static str],
        }
        let retire = |reason: &str| Action::RetireAndReplace {
            pid: 1,
            band: 0,
            reason: reason.into(),
        };
        let rows = [
            Row {
                name: "health retirement: the replacement starts, the worker stays live",
                action: retire("rss over the limit"),
                replacing: false,
                done: &[],
                scheduled: true,
                logs: &[
                    "retiring worker 1 (band 0, generation 1, 0 connections, rss 0.0 MiB): rss over the limit; starting its replacement",
                ],
            },
            Row {
                name: "health retirement while a replacement starts: nothing",
                action: retire("busy"),
                replacing: true,
                done: &[],
                scheduled: false,
                logs: &[],
            },
            Row {
                name: "a live worker killed: replaced at once",
                action: Action::Kill {
                    pid: 1,
                    reason: "over the high watermark".into(),
                },
                replacing: false,
                done: &[(0, 1, "SIGKILL"), (0, 1, "exited (dying)")],
                scheduled: true,
                logs: &[
                    "worker 1 is live: starting a replacement for band 0",
                    "killing worker 1 (band 0, generation 1, 0 connections, rss 0.0 MiB): over the high watermark",
                ],
            },
            Row {
                name: "a live worker asked to die: replaced at once",
                action: Action::AskToDie {
                    pid: 1,
                    reason: "silent".into(),
                },
                replacing: false,
                done: &[(0, 1, "SIGTERM"), (0, 1, "exited (dying)")],
                scheduled: true,
                logs: &[
                    "worker 1 is live: starting a replacement for band 0",
                    "asking worker 1 (band 0, generation 1, 0 connections, rss 0.0 MiB) to die (SIGTERM): silent",
                ],
            },
        ];
        for row in rows {
            let mut h = Host::new();
            h.worker(1, 0, WorkerState::Live, false);
            if row.replacing {
                h.worker_of(2, 0, 2, WorkerState::Starting, false);
            }
            h.at(0, Event::Policy(row.action));
            assert_eq!(what(&h.done), row.done, "{}", row.name);
            assert_eq!(
                h.logs[..row.logs.len().min(h.logs.len())],
                *row.logs,
                "{}",
                row.name
            );
            assert_eq!(
                h.core.schedule.pending_spawns.contains_key(&0),
                row.scheduled,
                "{}",
                row.name
            );
        }
        // A health retirement counts against the rate limit; the worker stays
        // live (it retires when its replacement is promoted) with its reason.
        let mut h = Host::new();
        h.worker(1, 0, WorkerState::Live, false);
        h.at(7, Event::Policy(retire("busy")));
        assert_eq!(h.core.schedule.recent_retirements, [h.t(7)]);
        assert_eq!(h.core.workers[&1].state, WorkerState::Live);
        assert_eq!(h.core.workers[&1].reason.as_deref(), Some("busy"));
        // A note is the runtime's to write.
        h.at(
            8,
            Event::Policy(Action::Log {
                message: "rate limit".into(),
            }),
        );
        assert_eq!(
            h.other.last().map(String::as_str),
            Some("PolicyNote { message: \"rate limit\" }")
        );
    }
}
