//! The supervision policy: pure decisions over a snapshot of the cluster.
//! No I/O here — the master measures (procfs, control socket), calls
//! [`decide`], and carries out the returned [`Action`]s. "When is a worker
//! retired?" is answered in this file and nowhere else.
//!
//! [`decide`] applies these rules, in this order, and never acts twice on the
//! same pid in one decision:
//!
//! 1. [`dying_past_soft_kill_timeout`]: a `Dying` worker still there after the
//!    soft-kill timeout is killed.
//! 2. High watermark ([`HIGH_WATERMARK_PERCENT`] of the cluster memory limit):
//!    retired and dying workers are killed, most killable first, until the
//!    projected total is at or below it.
//! 3. Health of live workers, first matching rule wins the reason:
//!    [`rss_over_limit`] ("low watermark breach"), [`too_busy`],
//!    [`retirement_requested`], [`silent_past_ping_timeout`]. Each match is
//!    retired and replaced, at most `retire_rate` per sliding `retire_window`;
//!    the refused ones are named in one [`Action::Log`].
//! 4. [`idle_past_retired_idle_exit`]: a retired worker without connections is
//!    asked to die, since no new client can ever reach it.
//! 5. Low watermark ([`LOW_WATERMARK_PERCENT`]): retired workers are asked to
//!    die, most killable first, until the projected total is at or below it.
//!
//! A threshold is breached only when it is exceeded: RSS equal to the limit,
//! or silence exactly as long as the timeout, is still fine.
//!
//! The "projected total" is the cluster RSS (master and every worker in any
//! state) minus what this decision already frees. For the high watermark only
//! kills count as freed: a worker shutting down after SIGTERM still holds its
//! memory, and above 95 % we cannot wait for it. For the low watermark the
//! workers already `Dying` (and those asked to die in this decision) count as
//! gone too: they are on their way out, and asking more workers to die would
//! not make them leave faster.

use std::{
    cmp::Ordering,
    collections::HashSet,
    time::{Duration, Instant},
};

use crate::cli::{KillStrategy, RunArgs};

/// Where a worker is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    /// Spawned, not yet listening on its port (nor said hello).
    Starting,
    /// Ready and in the published steering table: receives new connections.
    Live,
    /// Out of the steering table; keeps serving its established connections.
    Retired,
    /// Asked to exit (SIGTERM or `die`); SIGKILL follows after the soft-kill timeout.
    Dying,
}

/// The policy reads the master's own worker type (the supervisor core's).
pub use crate::master::supervisor::Worker;

/// The settings the policy applies (from the CLI).
#[derive(Clone, Debug, PartialEq)]
pub struct PolicySettings {
    pub worker_rss_limit: u64,
    pub cluster_memory_limit: u64,
    pub ping_timeout: Duration,
    pub retire_rate: u32,
    pub retire_window: Duration,
    pub kill_strategy: KillStrategy,
    pub retired_idle_exit: Duration,
    pub soft_kill_timeout: Duration,
}

/// The whole cluster at one instant.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterSnapshot {
    pub now: Instant,
    /// Resident memory of the master itself.
    pub master_rss: u64,
    pub workers: Vec<Worker>,
    /// When the recent health retirements happened (for the rate limit).
    pub recent_retirements: Vec<Instant>,
}

/// What the master should do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Take `pid` out of the table and start a replacement for its band.
    RetireAndReplace { pid: i32, band: u32, reason: String },
    /// Ask a worker to exit (SIGTERM, or `die` to aware workers).
    AskToDie { pid: i32, reason: String },
    /// SIGKILL.
    Kill { pid: i32, reason: String },
    /// Nothing is done, but the operator should know (e.g. rate limit hit).
    Log { message: String },
}

impl Action {
    /// The worker this action is about (`None` for [`Action::Log`]).
    pub fn pid(&self) -> Option<i32> {
        match self {
            Action::RetireAndReplace { pid, .. }
            | Action::AskToDie { pid, .. }
            | Action::Kill { pid, .. } => Some(*pid),
            Action::Log { .. } => None,
        }
    }
}

/// Above this share of `cluster_memory_limit`, retired workers are asked to die.
pub const LOW_WATERMARK_PERCENT: u64 = 80;
/// Above this share of `cluster_memory_limit`, retired workers are killed.
pub const HIGH_WATERMARK_PERCENT: u64 = 95;

impl PolicySettings {
    /// The settings of `ipcluster run`.
    pub fn from_run_args(args: &RunArgs) -> Self {
        PolicySettings {
            worker_rss_limit: args.worker_rss_limit,
            cluster_memory_limit: args.cluster_memory_limit,
            ping_timeout: args.ping_timeout,
            retire_rate: args.retire_rate,
            retire_window: args.retire_window,
            kill_strategy: args.kill_strategy,
            retired_idle_exit: args.retired_idle_exit,
            soft_kill_timeout: args.soft_kill_timeout,
        }
    }

    /// 80 % of the cluster memory limit, in bytes.
    pub fn low_watermark(&self) -> u64 {
        percent_of(self.cluster_memory_limit, LOW_WATERMARK_PERCENT)
    }

    /// 95 % of the cluster memory limit, in bytes.
    pub fn high_watermark(&self) -> u64 {
        percent_of(self.cluster_memory_limit, HIGH_WATERMARK_PERCENT)
    }
}

impl ClusterSnapshot {
    /// Resident memory of the master and of every worker, whatever its state.
    pub fn total_rss(&self) -> u64 {
        self.workers
            .iter()
            .fold(self.master_rss, |sum, w| sum.saturating_add(w.rss))
    }
}

/// Decide what to do about `snapshot` under `settings`: the rules of the module
/// documentation, in that order. The master carries the actions out in order,
/// and records `snapshot.now` in `recent_retirements` for every
/// [`Action::RetireAndReplace`] it performs. Actions repeat from one decision to
/// the next until the snapshot changes (a `Kill` of a pid that is already gone
/// is harmless).
pub fn decide(snapshot: &ClusterSnapshot, settings: &PolicySettings) -> Vec<Action> {
    let mut decision = Decision {
        snapshot,
        settings,
        now: snapshot.now,
        actions: Vec::new(),
        acted: HashSet::new(),
        killed_rss: 0,
        asked_rss: 0,
    };
    decision.kill_dying_past_soft_kill_timeout();
    decision.relieve_high_watermark();
    decision.retire_unhealthy_live_workers();
    decision.stop_idle_retired_workers();
    decision.relieve_low_watermark();
    decision.actions
}

// --- The rules about one worker -------------------------------------------------

/// A `Dying` worker that is still there after the soft-kill timeout is killed.
pub fn dying_past_soft_kill_timeout(
    w: &Worker,
    settings: &PolicySettings,
    now: Instant,
) -> Option<String> {
    let since = w.dying_since.filter(|_| w.state == WorkerState::Dying)?;
    let dying_for = now.saturating_duration_since(since);
    (dying_for > settings.soft_kill_timeout).then(|| {
        format!(
            "still running {} after it was asked to die (soft-kill timeout {})",
            secs(dying_for),
            secs(settings.soft_kill_timeout)
        )
    })
}

/// "Low watermark breach": the worker's process tree uses more memory than
/// `--worker-rss-limit`. The RSS is measured from /proc, never self-reported.
pub fn rss_over_limit(w: &Worker, settings: &PolicySettings) -> Option<String> {
    (w.rss > settings.worker_rss_limit).then(|| {
        format!(
            "low watermark breach: rss {} > limit {}",
            mib(w.rss),
            mib(settings.worker_rss_limit)
        )
    })
}

/// The worker's last ping said it is too busy.
pub fn too_busy(w: &Worker) -> Option<String> {
    w.busy
        .then(|| format!("too busy (its last ping said so); rss {}", mib(w.rss)))
}

/// The worker asked to be retired (`request_retire`).
pub fn retirement_requested(w: &Worker) -> Option<String> {
    w.retire_requested
        .then(|| format!("the worker asked to be retired; rss {}", mib(w.rss)))
}

/// A worker that said hello and has been silent (no ping, nor the hello itself)
/// for longer than `--ping-timeout` is hung. A worker that never said hello is
/// an unmodified server: it never talks, so it never times out.
pub fn silent_past_ping_timeout(
    w: &Worker,
    settings: &PolicySettings,
    now: Instant,
) -> Option<String> {
    let hello_at = w.hello_at?;
    let last_heard = w.last_ping.map_or(hello_at, |ping| ping.max(hello_at));
    let silent_for = now.saturating_duration_since(last_heard);
    (silent_for > settings.ping_timeout).then(|| {
        format!(
            "ping timeout: silent for {} > {}",
            secs(silent_for),
            secs(settings.ping_timeout)
        )
    })
}

/// Why a live worker should be retired and replaced, if it should: the health
/// rules in priority order (memory first: it hurts every worker on the host).
fn retirement_reason(w: &Worker, settings: &PolicySettings, now: Instant) -> Option<String> {
    if w.state != WorkerState::Live {
        return None;
    }
    rss_over_limit(w, settings)
        .or_else(|| too_busy(w))
        .or_else(|| retirement_requested(w))
        .or_else(|| silent_past_ping_timeout(w, settings, now))
}

/// A retired worker without connections for longer than `--retired-idle-exit`
/// is asked to die: it is out of the steering table, so no new client can ever
/// reach it. Idleness counts from its retirement at the earliest, so a worker
/// that was idle while live still gets the whole grace period.
pub fn idle_past_retired_idle_exit(
    w: &Worker,
    settings: &PolicySettings,
    now: Instant,
) -> Option<String> {
    if w.state != WorkerState::Retired || w.connections > 0 {
        return None;
    }
    let idle_since = w.idle_since?;
    let idle_since = w.retired_at.map_or(idle_since, |r| r.max(idle_since));
    let idle_for = now.saturating_duration_since(idle_since);
    (idle_for > settings.retired_idle_exit).then(|| {
        format!(
            "retired and idle: no connections for {} > {}",
            secs(idle_for),
            secs(settings.retired_idle_exit)
        )
    })
}

/// Timed out: dying past the soft-kill timeout, or silent past the ping
/// timeout. Such workers are the most killable of all.
fn timed_out(w: &Worker, settings: &PolicySettings, now: Instant) -> bool {
    dying_past_soft_kill_timeout(w, settings, now).is_some()
        || silent_past_ping_timeout(w, settings, now).is_some()
}

/// Sort `workers` from most to least killable: timed-out workers first, then
/// those already dying (so nobody is hard-killed before having been asked to
/// die, when a dying one could go instead), then `--kill-strategy`, then pid.
pub fn sort_most_killable_first(workers: &mut [&Worker], settings: &PolicySettings, now: Instant) {
    let strategy = settings.kill_strategy;
    workers.sort_by(|a, b| {
        let dying = |w: &Worker| w.state == WorkerState::Dying;
        timed_out(b, settings, now)
            .cmp(&timed_out(a, settings, now))
            .then(dying(b).cmp(&dying(a)))
            .then_with(|| by_kill_strategy(strategy, a, b))
            .then(a.pid.cmp(&b.pid))
    });
}

/// `Less` when `a` should go before `b`.
fn by_kill_strategy(strategy: KillStrategy, a: &Worker, b: &Worker) -> Ordering {
    let fewer_connections = a.connections.cmp(&b.connections);
    let larger_rss = b.rss.cmp(&a.rss);
    let older = a.started_at.cmp(&b.started_at);
    match strategy {
        KillStrategy::ConnRssTime => fewer_connections.then(larger_rss).then(older),
        KillStrategy::RssConnTime => larger_rss.then(fewer_connections).then(older),
        KillStrategy::Time => older,
    }
}

// --- One decision --------------------------------------------------------------

struct Decision<'a> {
    snapshot: &'a ClusterSnapshot,
    settings: &'a PolicySettings,
    now: Instant,
    actions: Vec<Action>,
    /// Pids that already have an action in this decision.
    acted: HashSet<i32>,
    /// RSS of the workers killed in this decision.
    killed_rss: u64,
    /// RSS of the workers asked to die in this decision.
    asked_rss: u64,
}

impl<'a> Decision<'a> {
    fn kill_dying_past_soft_kill_timeout(&mut self) {
        for w in &self.snapshot.workers {
            if let Some(reason) = dying_past_soft_kill_timeout(w, self.settings, self.now) {
                self.kill(w, reason);
            }
        }
    }

    /// Above the high watermark, kill retired and dying workers until the
    /// projected total (minus what is killed) is at or below it.
    fn relieve_high_watermark(&mut self) {
        let high = self.settings.high_watermark();
        let total = self.snapshot.total_rss();
        let mut projected = total.saturating_sub(self.killed_rss);
        if projected <= high {
            return;
        }
        let settings = self.settings;
        for w in
            self.most_killable(|w| matches!(w.state, WorkerState::Retired | WorkerState::Dying))
        {
            if projected <= high {
                break;
            }
            let reason = format!(
                "high watermark breach: cluster rss {} > {} ({HIGH_WATERMARK_PERCENT} % of {}); \
                 this worker: rss {}, {} connections",
                mib(projected),
                mib(high),
                mib(settings.cluster_memory_limit),
                mib(w.rss),
                w.connections
            );
            self.kill(w, reason);
            projected = projected.saturating_sub(w.rss);
        }
    }

    /// Retire the unhealthy live workers, within the rate limit.
    fn retire_unhealthy_live_workers(&mut self) {
        let candidates: Vec<(&Worker, String)> = self
            .snapshot
            .workers
            .iter()
            .filter(|w| !self.acted.contains(&w.pid))
            .filter_map(|w| Some((w, retirement_reason(w, self.settings, self.now)?)))
            .collect();
        if candidates.is_empty() {
            return;
        }
        let mut window =
            RetireWindow::new(&self.snapshot.recent_retirements, self.settings, self.now);
        let mut refused = Vec::new();
        for (w, reason) in candidates {
            if window.try_take() {
                self.acted.insert(w.pid);
                self.actions.push(Action::RetireAndReplace {
                    pid: w.pid,
                    band: w.band,
                    reason,
                });
            } else {
                refused.push(format!("pid {} (band {}: {reason})", w.pid, w.band));
            }
        }
        if !refused.is_empty() {
            let message = window.refusal_message(&refused);
            self.actions.push(Action::Log { message });
        }
    }

    fn stop_idle_retired_workers(&mut self) {
        for w in &self.snapshot.workers {
            if let Some(reason) = idle_past_retired_idle_exit(w, self.settings, self.now) {
                self.ask_to_die(w, reason);
            }
        }
    }

    /// Above the low watermark, ask retired workers to die until the projected
    /// total (minus what is killed, dying or asked to die) is at or below it.
    fn relieve_low_watermark(&mut self) {
        let low = self.settings.low_watermark();
        let already_dying: u64 = self
            .snapshot
            .workers
            .iter()
            .filter(|w| w.state == WorkerState::Dying && !self.acted.contains(&w.pid))
            .map(|w| w.rss)
            .sum();
        let mut projected = self
            .snapshot
            .total_rss()
            .saturating_sub(self.killed_rss)
            .saturating_sub(self.asked_rss)
            .saturating_sub(already_dying);
        if projected <= low {
            return;
        }
        let settings = self.settings;
        for w in self.most_killable(|w| w.state == WorkerState::Retired) {
            if projected <= low {
                break;
            }
            let reason = format!(
                "low watermark breach: cluster rss {} > {} ({LOW_WATERMARK_PERCENT} % of {}); \
                 this worker: rss {}, {} connections",
                mib(projected),
                mib(low),
                mib(settings.cluster_memory_limit),
                mib(w.rss),
                w.connections
            );
            self.ask_to_die(w, reason);
            projected = projected.saturating_sub(w.rss);
        }
    }

    /// The workers matching `eligible` and not acted upon yet, most killable first.
    fn most_killable(&self, eligible: impl Fn(&Worker) -> bool) -> Vec<&'a Worker> {
        let mut workers: Vec<&Worker> = self
            .snapshot
            .workers
            .iter()
            .filter(|w| eligible(w) && !self.acted.contains(&w.pid))
            .collect();
        sort_most_killable_first(&mut workers, self.settings, self.now);
        workers
    }

    fn kill(&mut self, w: &Worker, reason: String) {
        if self.acted.insert(w.pid) {
            self.killed_rss = self.killed_rss.saturating_add(w.rss);
            self.actions.push(Action::Kill { pid: w.pid, reason });
        }
    }

    fn ask_to_die(&mut self, w: &Worker, reason: String) {
        if self.acted.insert(w.pid) {
            self.asked_rss = self.asked_rss.saturating_add(w.rss);
            self.actions.push(Action::AskToDie { pid: w.pid, reason });
        }
    }
}

/// The sliding window of the retirement rate limit: at most `retire_rate`
/// retirements in any `retire_window`. A retirement at `t` counts while
/// `now - t < retire_window`.
struct RetireWindow<'a> {
    settings: &'a PolicySettings,
    now: Instant,
    /// Retirements still in the window, oldest first (including this decision's).
    in_window: Vec<Instant>,
}

impl<'a> RetireWindow<'a> {
    fn new(recent: &[Instant], settings: &'a PolicySettings, now: Instant) -> Self {
        let mut in_window: Vec<Instant> = recent
            .iter()
            .copied()
            .filter(|&t| now.saturating_duration_since(t) < settings.retire_window)
            .collect();
        in_window.sort();
        RetireWindow {
            settings,
            now,
            in_window,
        }
    }

    fn limit(&self) -> usize {
        usize::try_from(self.settings.retire_rate).unwrap_or(usize::MAX)
    }

    /// Count one more retirement now, if the limit allows it.
    fn try_take(&mut self) -> bool {
        if self.in_window.len() >= self.limit() {
            return false;
        }
        self.in_window.push(self.now);
        true
    }

    /// When the next retirement will be allowed, if ever.
    fn next_free_in(&self) -> Option<Duration> {
        let limit = self.limit();
        if limit == 0 {
            return None;
        }
        // The slot frees when the retirement that makes the window full expires.
        let blocking = self
            .in_window
            .get(self.in_window.len().checked_sub(limit)?)?;
        let expires = *blocking + self.settings.retire_window;
        Some(expires.saturating_duration_since(self.now))
    }

    fn refusal_message(&self, refused: &[String]) -> String {
        let settings = self.settings;
        let when = match self.next_free_in() {
            Some(wait) => format!("the next retirement is allowed in {}", secs(wait)),
            None => "retirements are disabled (--retire-rate 0)".to_owned(),
        };
        format!(
            "retire rate limit reached ({} retirements in the last {}, limit {}): refused {} \
             retirement(s): {}; {when}",
            self.in_window.len(),
            secs(settings.retire_window),
            settings.retire_rate,
            refused.len(),
            refused.join(", ")
        )
    }
}

fn percent_of(bytes: u64, percent: u64) -> u64 {
    let share = u128::from(bytes) * u128::from(percent) / 100;
    u64::try_from(share).unwrap_or(u64::MAX)
}

/// `470.2 MiB`.
fn mib(bytes: u64) -> String {
    // Precision loss above 2^53 bytes is irrelevant for a log line.
    let mib = bytes as f64 / (1024.0 * 1024.0);
    format!("{mib:.1} MiB")
}

/// `10.5s`, `1.04s`: to the millisecond, but at least one decimal, so that a
/// breach never reads "1.0s > 1.0s" when it was 1.04 s.
fn secs(d: Duration) -> String {
    let mut text = format!("{:.3}", d.as_secs_f64());
    while text.ends_with('0') && !text.ends_with(".0") {
        text.pop();
    }
    format!("{text}s")
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use super::*;

    const MIB: u64 = 1 << 20;

    /// The fake clock: a fixed base instant plus offsets in milliseconds.
    fn t(ms: u64) -> Instant {
        static BASE: OnceLock<Instant> = OnceLock::new();
        *BASE.get_or_init(Instant::now) + Duration::from_millis(ms)
    }

    fn s(secs: u64) -> u64 {
        secs * 1000
    }

    /// The CLI defaults.
    fn defaults() -> PolicySettings {
        PolicySettings {
            worker_rss_limit: 448 * MIB,
            cluster_memory_limit: 512 * MIB,
            ping_timeout: Duration::from_secs(10),
            retire_rate: 10,
            retire_window: Duration::from_secs(120),
            kill_strategy: KillStrategy::ConnRssTime,
            retired_idle_exit: Duration::from_secs(30),
            soft_kill_timeout: Duration::from_secs(5),
        }
    }

    /// Defaults, with so much cluster memory that the watermarks never matter.
    fn roomy() -> PolicySettings {
        PolicySettings {
            cluster_memory_limit: 1 << 40,
            ..defaults()
        }
    }

    /// Defaults with a 100 MiB cluster: low watermark 80 MiB, high 95 MiB.
    fn small_cluster(kill_strategy: KillStrategy) -> PolicySettings {
        PolicySettings {
            cluster_memory_limit: 100 * MIB,
            kill_strategy,
            ..defaults()
        }
    }

    /// A healthy live worker of an unmodified server: 100 MiB, 5 connections.
    fn live(pid: i32) -> Worker {
        Worker {
            rss: 100 * MIB,
            connections: 5,
            ready: true,
            ..Worker::new(
                pid,
                u32::try_from(pid).unwrap_or(0) % 8,
                2,
                WorkerState::Live,
                vec![20_000],
                t(0),
            )
        }
    }

    /// A worker of the previous generation, retired at `t(0)`.
    fn retired(pid: i32, rss_mib: u64, connections: u32) -> Worker {
        Worker {
            generation: 1,
            state: WorkerState::Retired,
            rss: rss_mib * MIB,
            connections,
            retired_at: Some(t(0)),
            ..live(pid)
        }
    }

    fn dying(pid: i32, rss_mib: u64, since: Instant) -> Worker {
        Worker {
            state: WorkerState::Dying,
            dying_since: Some(since),
            ..retired(pid, rss_mib, 1)
        }
    }

    fn cluster(now: Instant, master_rss_mib: u64, workers: Vec<Worker>) -> ClusterSnapshot {
        ClusterSnapshot {
            now,
            master_rss: master_rss_mib * MIB,
            workers,
            recent_retirements: Vec::new(),
        }
    }

    /// `decide`, plus the invariant every decision keeps: one action per pid.
    fn decide_checked(snapshot: &ClusterSnapshot, settings: &PolicySettings) -> Vec<Action> {
        let actions = decide(snapshot, settings);
        let mut seen = HashSet::new();
        for pid in actions.iter().filter_map(Action::pid) {
            assert!(seen.insert(pid), "two actions on pid {pid}: {actions:#?}");
        }
        actions
    }

    /// An action reduced to what a table row states: its kind and pid.
    #[derive(Debug, PartialEq, Eq, Clone, Copy)]
    enum Did {
        Retire(i32),
        AskToDie(i32),
        Kill(i32),
        Log,
    }

    fn did(actions: &[Action]) -> Vec<Did> {
        actions
            .iter()
            .map(|a| match a {
                Action::RetireAndReplace { pid, .. } => Did::Retire(*pid),
                Action::AskToDie { pid, .. } => Did::AskToDie(*pid),
                Action::Kill { pid, .. } => Did::Kill(*pid),
                Action::Log { .. } => Did::Log,
            })
            .collect()
    }

    fn text(action: &Action) -> &str {
        match action {
            Action::RetireAndReplace { reason, .. }
            | Action::AskToDie { reason, .. }
            | Action::Kill { reason, .. } => reason,
            Action::Log { message } => message,
        }
    }

    struct Row {
        name: &'static str,
        now: Instant,
        worker: Worker,
        /// `None`: no action; `Some(text)`: one action, whose reason contains `text`.
        expect: Option<(Did, &'static str)>,
    }

    fn check_rows(rows: Vec<Row>, settings: &PolicySettings) {
        for row in rows {
            let pid = row.worker.pid;
            let actions = decide_checked(&cluster(row.now, 10, vec![row.worker]), settings);
            match row.expect {
                None => assert!(actions.is_empty(), "{}: {actions:#?}", row.name),
                Some((kind, reason)) => {
                    assert_eq!(did(&actions), vec![kind], "{}: {actions:#?}", row.name);
                    assert_eq!(actions[0].pid(), Some(pid), "{}", row.name);
                    assert!(
                        text(&actions[0]).contains(reason),
                        "{}: {:?} does not contain {reason:?}",
                        row.name,
                        text(&actions[0])
                    );
                }
            }
        }
    }

    #[test]
    fn live_worker_health_rules_at_their_thresholds() {
        let limit = 448 * MIB;
        let said_hello = |ping: Option<Instant>| Worker {
            hello_at: Some(t(0)),
            last_ping: ping,
            ..live(7)
        };
        let retire = |reason| Some((Did::Retire(7), reason));
        #[rustfmt::skip]
        let rows = vec![
            Row { name: "healthy", now: t(s(60)), worker: live(7), expect: None },
            Row { name: "rss just below the limit", now: t(0), worker: Worker { rss: limit - 1, ..live(7) }, expect: None },
            Row { name: "rss at the limit", now: t(0), worker: Worker { rss: limit, ..live(7) }, expect: None },
            Row { name: "rss just above the limit", now: t(0), worker: Worker { rss: limit + 1, ..live(7) },
                  expect: retire("low watermark breach: rss 448.0 MiB > limit 448.0 MiB") },
            Row { name: "rss reason has figures", now: t(0), worker: Worker { rss: 470 * MIB + MIB / 5, ..live(7) },
                  expect: retire("low watermark breach: rss 470.2 MiB > limit 448.0 MiB") },
            Row { name: "busy", now: t(0), worker: Worker { busy: true, ..live(7) }, expect: retire("too busy") },
            Row { name: "retirement requested", now: t(0), worker: Worker { retire_requested: true, ..live(7) },
                  expect: retire("asked to be retired") },
            Row { name: "rss wins over busy", now: t(0), worker: Worker { busy: true, rss: limit + MIB, ..live(7) },
                  expect: retire("low watermark breach") },
            Row { name: "hello, no ping, just below the timeout", now: t(s(10) - 1), worker: said_hello(None), expect: None },
            Row { name: "hello, no ping, at the timeout", now: t(s(10)), worker: said_hello(None), expect: None },
            Row { name: "hello, no ping, just above the timeout", now: t(s(10) + 1), worker: said_hello(None),
                  expect: retire("ping timeout: silent for 10.001s > 10.0s") },
            Row { name: "pinged, at the timeout", now: t(s(15)), worker: said_hello(Some(t(s(5)))), expect: None },
            Row { name: "pinged, just above the timeout", now: t(s(15) + 1), worker: said_hello(Some(t(s(5)))),
                  expect: retire("ping timeout") },
            Row { name: "silent long past", now: t(s(25)), worker: said_hello(Some(t(s(5)))),
                  expect: retire("ping timeout: silent for 20.0s > 10.0s") },
            Row { name: "never said hello: never times out", now: t(s(3600)), worker: live(7), expect: None },
            Row { name: "starting worker is left to the connect timeout", now: t(s(3600)),
                  worker: Worker { state: WorkerState::Starting, busy: true, rss: limit + 1, ..said_hello(None) },
                  expect: None },
            Row { name: "retired worker is not retired again", now: t(s(1)),
                  worker: Worker { busy: true, rss: limit + 1, retire_requested: true, ..retired(7, 1, 3) },
                  expect: None },
        ];
        check_rows(rows, &roomy());
    }

    #[test]
    fn dying_and_idle_workers_at_their_thresholds() {
        let idle = |since: Instant, retired_at: Instant| Worker {
            idle_since: Some(since),
            retired_at: Some(retired_at),
            ..retired(9, 50, 0)
        };
        #[rustfmt::skip]
        let rows = vec![
            Row { name: "dying, just below the soft-kill timeout", now: t(s(5) - 1), worker: dying(9, 50, t(0)), expect: None },
            Row { name: "dying, at the soft-kill timeout", now: t(s(5)), worker: dying(9, 50, t(0)), expect: None },
            Row { name: "dying, just above the soft-kill timeout", now: t(s(5) + 1), worker: dying(9, 50, t(0)),
                  expect: Some((Did::Kill(9), "still running 5.001s after it was asked to die (soft-kill timeout 5.0s)")) },
            Row { name: "dying without a date is not killed", now: t(s(60)),
                  worker: Worker { dying_since: None, ..dying(9, 50, t(0)) }, expect: None },
            Row { name: "idle, just below", now: t(s(30) - 1), worker: idle(t(0), t(0)), expect: None },
            Row { name: "idle, at", now: t(s(30)), worker: idle(t(0), t(0)), expect: None },
            Row { name: "idle, just above", now: t(s(30) + 1), worker: idle(t(0), t(0)),
                  expect: Some((Did::AskToDie(9), "retired and idle: no connections for 30.001s > 30.0s")) },
            Row { name: "idle before retirement counts from the retirement", now: t(s(40)),
                  worker: idle(t(0), t(s(20))), expect: None },
            Row { name: "idle since after retirement", now: t(s(61)), worker: idle(t(s(30)), t(0)),
                  expect: Some((Did::AskToDie(9), "no connections for 31.0s")) },
            Row { name: "retired with connections is not idle", now: t(s(600)),
                  worker: Worker { connections: 1, ..idle(t(0), t(0)) }, expect: None },
            Row { name: "a live idle worker still gets new clients", now: t(s(600)),
                  worker: Worker { connections: 0, idle_since: Some(t(0)), ..live(9) }, expect: None },
        ];
        check_rows(rows, &roomy());
    }

    #[test]
    fn retirements_are_rate_limited_over_a_sliding_window() {
        let settings = roomy();
        let over = |pid| Worker {
            rss: 500 * MIB,
            ..live(pid)
        };
        struct Limit {
            name: &'static str,
            recent: Vec<Instant>,
            now: Instant,
            candidates: usize,
            expect: Vec<Did>,
            log: Option<&'static str>,
        }
        let ten_at_once = vec![t(s(1)); 10];
        let one_per_second: Vec<Instant> = (1..=10).map(|i| t(s(i))).collect();
        #[rustfmt::skip]
        let rows = vec![
            Limit { name: "9 in the window: the 10th is allowed", recent: vec![t(s(1)); 9], now: t(s(60)), candidates: 1,
                    expect: vec![Did::Retire(1)], log: None },
            Limit { name: "10 in the window: the 11th is refused", recent: ten_at_once.clone(), now: t(s(60)), candidates: 1,
                    expect: vec![Did::Log],
                    log: Some("retire rate limit reached (10 retirements in the last 120.0s, limit 10): refused 1 retirement(s): \
                               pid 1 (band 1: low watermark breach: rss 500.0 MiB > limit 448.0 MiB); \
                               the next retirement is allowed in 61.0s") },
            Limit { name: "just before the window passes", recent: ten_at_once.clone(), now: t(s(121) - 1), candidates: 1,
                    expect: vec![Did::Log], log: Some("allowed in 0.001s") },
            Limit { name: "once the window has passed", recent: ten_at_once.clone(), now: t(s(121)), candidates: 1,
                    expect: vec![Did::Retire(1)], log: None },
            Limit { name: "sliding: only the oldest has expired", recent: one_per_second.clone(), now: t(s(121)), candidates: 2,
                    expect: vec![Did::Retire(1), Did::Log], log: Some("refused 1 retirement(s): pid 2 (band 2") },
            Limit { name: "sliding: the next slot frees with the second oldest", recent: one_per_second, now: t(s(121)),
                    candidates: 3, expect: vec![Did::Retire(1), Did::Log],
                    log: Some("refused 2 retirement(s): pid 2 (band 2: low watermark breach: rss 500.0 MiB > limit 448.0 MiB), \
                               pid 3 (band 3: low watermark breach: rss 500.0 MiB > limit 448.0 MiB); \
                               the next retirement is allowed in 1.0s") },
            Limit { name: "several candidates share what is left, one log", recent: vec![t(s(1)); 8], now: t(s(60)),
                    candidates: 4, expect: vec![Did::Retire(1), Did::Retire(2), Did::Log],
                    log: Some("refused 2 retirement(s): pid 3 (band 3: low watermark breach: rss 500.0 MiB > limit 448.0 MiB), \
                               pid 4 (band 4") },
        ];
        for row in rows {
            let workers = (1..=row.candidates)
                .map(|i| over(i32::try_from(i).unwrap_or(0)))
                .collect();
            let snapshot = ClusterSnapshot {
                recent_retirements: row.recent,
                ..cluster(row.now, 10, workers)
            };
            let actions = decide_checked(&snapshot, &settings);
            assert_eq!(did(&actions), row.expect, "{}: {actions:#?}", row.name);
            let logs: Vec<&str> = actions
                .iter()
                .filter(|a| matches!(a, Action::Log { .. }))
                .map(text)
                .collect();
            match row.log {
                None => assert!(logs.is_empty(), "{}: {logs:?}", row.name),
                Some(expected) => {
                    assert_eq!(logs.len(), 1, "{}: {logs:?}", row.name);
                    assert!(
                        logs[0].contains(expected),
                        "{}: {:?} does not contain {expected:?}",
                        row.name,
                        logs[0]
                    );
                }
            }
        }
    }

    #[test]
    fn the_eleventh_retirement_in_a_window_waits_for_the_window() {
        // The master's loop: each decision, it retires what it is told and
        // records the time; the retired worker is replaced by a healthy one.
        let settings = roomy();
        let mut recent = Vec::new();
        for i in 0..10u64 {
            let now = t(s(i));
            let snapshot = ClusterSnapshot {
                recent_retirements: recent.clone(),
                ..cluster(
                    now,
                    10,
                    vec![Worker {
                        busy: true,
                        ..live(1)
                    }],
                )
            };
            assert_eq!(
                did(&decide_checked(&snapshot, &settings)),
                vec![Did::Retire(1)],
                "retirement {}",
                i + 1
            );
            recent.push(now);
        }
        let eleventh = |now| ClusterSnapshot {
            recent_retirements: recent.clone(),
            ..cluster(
                now,
                10,
                vec![Worker {
                    busy: true,
                    ..live(1)
                }],
            )
        };
        let refused = decide_checked(&eleventh(t(s(10))), &settings);
        assert_eq!(did(&refused), vec![Did::Log]);
        assert!(
            text(&refused[0]).contains("allowed in 110.0s"),
            "{refused:?}"
        );
        assert_eq!(
            did(&decide_checked(&eleventh(t(s(120) - 1)), &settings)),
            vec![Did::Log]
        );
        assert_eq!(
            did(&decide_checked(&eleventh(t(s(120))), &settings)),
            vec![Did::Retire(1)]
        );
    }

    #[test]
    fn a_zero_retire_rate_refuses_everything() {
        let settings = PolicySettings {
            retire_rate: 0,
            ..roomy()
        };
        let actions = decide_checked(
            &cluster(
                t(0),
                10,
                vec![Worker {
                    busy: true,
                    ..live(1)
                }],
            ),
            &settings,
        );
        assert_eq!(did(&actions), vec![Did::Log]);
        assert!(text(&actions[0]).contains("retirements are disabled (--retire-rate 0)"));
    }

    #[test]
    fn cluster_watermarks_at_their_thresholds() {
        // 100 MiB cluster: low watermark 80 MiB, high watermark 95 MiB.
        let settings = small_cluster(KillStrategy::ConnRssTime);
        assert_eq!(settings.low_watermark(), 80 * MIB);
        assert_eq!(settings.high_watermark(), 95 * MIB);
        let plus = |w: Worker, bytes: u64| Worker {
            rss: w.rss + bytes,
            ..w
        };
        let live30 = Worker {
            rss: 30 * MIB,
            ..live(1)
        };
        struct Pressure {
            name: &'static str,
            master_mib: u64,
            workers: Vec<Worker>,
            expect: Vec<Did>,
        }
        #[rustfmt::skip]
        let rows = vec![
            Pressure { name: "just below the low watermark", master_mib: 20,
                       workers: vec![live30.clone(), Worker { rss: 30 * MIB - 1, ..retired(2, 30, 3) }], expect: vec![] },
            Pressure { name: "at the low watermark", master_mib: 20, workers: vec![live30.clone(), retired(2, 30, 3)], expect: vec![] },
            Pressure { name: "just above the low watermark", master_mib: 20,
                       workers: vec![live30.clone(), plus(retired(2, 30, 3), 1)], expect: vec![Did::AskToDie(2)] },
            Pressure { name: "at the high watermark: asked, not killed", master_mib: 20,
                       workers: vec![live30.clone(), retired(2, 45, 3)], expect: vec![Did::AskToDie(2)] },
            Pressure { name: "just above the high watermark: killed", master_mib: 20,
                       workers: vec![live30.clone(), plus(retired(2, 45, 3), 1)], expect: vec![Did::Kill(2)] },
            Pressure { name: "low: only as many as needed", master_mib: 10,
                       workers: vec![live30.clone(), retired(2, 10, 1), retired(3, 10, 2), retired(4, 10, 3), retired(5, 11, 4)],
                       expect: vec![Did::AskToDie(2)] },
            Pressure { name: "low: until the projected total is at or below", master_mib: 20,
                       workers: vec![live30.clone(), retired(2, 10, 1), retired(3, 10, 2), retired(4, 10, 3), retired(5, 11, 4)],
                       expect: vec![Did::AskToDie(2), Did::AskToDie(3)] },
            Pressure { name: "high kills until at or below it, then low asks the rest", master_mib: 10,
                       workers: vec![live30.clone(), retired(2, 20, 0), retired(3, 26, 5), retired(4, 15, 6)],
                       expect: vec![Did::Kill(2), Did::AskToDie(3)] },
            Pressure { name: "dying workers count as gone for the low watermark", master_mib: 10,
                       workers: vec![live30.clone(), dying(2, 30, t(s(30))), retired(3, 20, 0)], expect: vec![] },
            Pressure { name: "but not for the high watermark: the dying one is killed first", master_mib: 10,
                       workers: vec![live30.clone(), dying(2, 30, t(s(30))), retired(3, 26, 0)], expect: vec![Did::Kill(2)] },
            Pressure { name: "live and starting workers are never stopped for memory", master_mib: 10,
                       workers: vec![Worker { rss: 80 * MIB, ..live(1) },
                                     Worker { state: WorkerState::Starting, rss: 20 * MIB, ..live(2) }],
                       expect: vec![] },
            Pressure { name: "a dying worker past its timeout is killed once, and counts as freed", master_mib: 10,
                       workers: vec![live30.clone(), dying(2, 50, t(0)), retired(3, 10, 0)], expect: vec![Did::Kill(2)] },
            Pressure { name: "an idle worker asked to die counts as freed", master_mib: 10,
                       workers: vec![live30.clone(), Worker { idle_since: Some(t(0)), ..retired(2, 40, 0) }, retired(3, 10, 0)],
                       expect: vec![Did::AskToDie(2)] },
        ];
        for row in rows {
            let actions =
                decide_checked(&cluster(t(s(31)), row.master_mib, row.workers), &settings);
            assert_eq!(did(&actions), row.expect, "{}: {actions:#?}", row.name);
        }
    }

    #[test]
    fn watermark_reasons_have_figures() {
        let settings = small_cluster(KillStrategy::ConnRssTime);
        let actions = decide_checked(&cluster(t(0), 20, vec![retired(2, 76, 3)]), &settings);
        assert_eq!(
            actions,
            vec![Action::Kill {
                pid: 2,
                reason:
                    "high watermark breach: cluster rss 96.0 MiB > 95.0 MiB (95 % of 100.0 MiB); \
                         this worker: rss 76.0 MiB, 3 connections"
                        .into()
            }]
        );
        let actions = decide_checked(&cluster(t(0), 20, vec![retired(2, 61, 3)]), &settings);
        assert_eq!(
            actions,
            vec![Action::AskToDie {
                pid: 2,
                reason:
                    "low watermark breach: cluster rss 81.0 MiB > 80.0 MiB (80 % of 100.0 MiB); \
                         this worker: rss 61.0 MiB, 3 connections"
                        .into()
            }]
        );
    }

    /// Five retired workers for the kill-order tables.
    fn five_retired() -> Vec<Worker> {
        let w = |pid, connections, rss_mib, started_s| Worker {
            started_at: t(s(started_s)),
            ..retired(pid, rss_mib, connections)
        };
        vec![
            w(1, 1, 30, 20),
            w(2, 0, 10, 30),
            w(3, 0, 20, 40),
            w(4, 1, 30, 10),
            w(5, 2, 50, 50),
        ]
    }

    #[test]
    fn kill_order_follows_the_strategy() {
        #[rustfmt::skip]
        let rows = [
            // fewest connections, then largest rss, then oldest
            (KillStrategy::ConnRssTime, [3, 2, 4, 1, 5], 3),
            // largest rss, then fewest connections, then oldest
            (KillStrategy::RssConnTime, [5, 4, 1, 3, 2], 5),
            // oldest
            (KillStrategy::Time, [4, 1, 2, 3, 5], 4),
        ];
        for (strategy, order, first_asked) in rows {
            let settings = small_cluster(strategy);
            // Way above the high watermark: every retired worker is killed, in order.
            let actions = decide_checked(&cluster(t(s(60)), 200, five_retired()), &settings);
            let expected: Vec<Did> = order.iter().map(|&pid| Did::Kill(pid)).collect();
            assert_eq!(did(&actions), expected, "{strategy:?}");
            // Just above the low watermark (145 MiB in a 180 MiB cluster, low watermark
            // 144 MiB): only the most killable is asked to die.
            let settings = PolicySettings {
                cluster_memory_limit: 180 * MIB,
                ..settings
            };
            let actions = decide_checked(&cluster(t(s(60)), 5, five_retired()), &settings);
            assert_eq!(
                did(&actions),
                vec![Did::AskToDie(first_asked)],
                "{strategy:?}"
            );
        }
    }

    #[test]
    fn timed_out_then_dying_workers_go_first() {
        for strategy in [
            KillStrategy::ConnRssTime,
            KillStrategy::RssConnTime,
            KillStrategy::Time,
        ] {
            let settings = small_cluster(strategy);
            let now = t(s(60));
            let mut workers = five_retired();
            // Hung: said hello, silent for 50 s; the least killable otherwise.
            workers.push(Worker {
                hello_at: Some(t(s(1))),
                last_ping: Some(t(s(10))),
                started_at: t(s(59)),
                ..retired(6, 1, 99)
            });
            // Asked to die 1 s ago, well within the soft-kill timeout.
            workers.push(Worker {
                connections: 98,
                started_at: t(s(58)),
                ..dying(7, 1, t(s(59)))
            });
            let actions = decide_checked(&cluster(now, 200, workers), &settings);
            let order: Vec<Did> = did(&actions);
            assert_eq!(
                order[..2],
                [Did::Kill(6), Did::Kill(7)],
                "{strategy:?}: {order:?}"
            );
            assert_eq!(order.len(), 7, "{strategy:?}: {order:?}");
        }
    }

    #[test]
    fn one_decision_applies_every_rule_in_order_and_acts_once_per_pid() {
        let settings = small_cluster(KillStrategy::ConnRssTime);
        let now = t(s(100));
        let workers = vec![
            // Live and healthy.
            Worker {
                rss: 20 * MIB,
                ..live(1)
            },
            // Live and over its limit (a tiny limit below).
            Worker {
                rss: 30 * MIB,
                ..live(2)
            },
            // Dying past its timeout: killed by rule 1 only, though above the high watermark too.
            dying(3, 25, t(s(10))),
            // Retired, idle for long: asked to die once (idle), not again for memory.
            Worker {
                idle_since: Some(t(s(1))),
                ..retired(4, 5, 0)
            },
            // Retired with clients: asked to die for the low watermark.
            retired(5, 12, 3),
            retired(6, 2, 9),
        ];
        let settings = PolicySettings {
            worker_rss_limit: 25 * MIB,
            ..settings
        };
        // total = 21 + 20 + 30 + 25 + 5 + 12 + 2 = 115 MiB. Killing 3 brings it to 90 (not above
        // the high watermark, 95); retiring 2 frees nothing yet; 4 leaving makes 85, still above
        // the low watermark (80), so 5 (fewer connections than 6) is asked to die: 73.
        let actions = decide_checked(&cluster(now, 21, workers), &settings);
        assert_eq!(
            did(&actions),
            vec![
                Did::Kill(3),
                Did::Retire(2),
                Did::AskToDie(4),
                Did::AskToDie(5)
            ],
            "{actions:#?}"
        );
    }

    #[test]
    fn durations_read_to_the_millisecond() {
        assert_eq!(secs(Duration::from_secs(10)), "10.0s");
        assert_eq!(secs(Duration::from_millis(1040)), "1.04s");
        assert_eq!(secs(Duration::from_millis(1043)), "1.043s");
        assert_eq!(secs(Duration::from_millis(120_500)), "120.5s");
        assert_eq!(secs(Duration::ZERO), "0.0s");
        let settings = PolicySettings {
            ping_timeout: Duration::from_secs(1),
            ..defaults()
        };
        let w = Worker {
            hello_at: Some(t(0)),
            last_ping: Some(t(0)),
            ..live(1)
        };
        assert_eq!(
            silent_past_ping_timeout(&w, &settings, t(1040)).as_deref(),
            Some("ping timeout: silent for 1.04s > 1.0s")
        );
    }

    #[test]
    fn settings_come_from_the_command_line() {
        use clap::Parser as _;
        let cli = crate::cli::Cli::try_parse_from(["ipcluster", "run", "--kill-strategy", "time"])
            .expect("cli");
        let crate::cli::Command::Run(args) = cli.command else {
            panic!("expected run");
        };
        let settings = PolicySettings::from_run_args(&args);
        assert_eq!(
            settings,
            PolicySettings {
                kill_strategy: KillStrategy::Time,
                ..defaults()
            }
        );
        assert_eq!(settings.low_watermark(), 429_496_729);
        assert_eq!(settings.high_watermark(), 510_027_366);
    }
}
