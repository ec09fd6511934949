//! Start-up of a master (lifecycle steps 1-3 of docs/design.md): take the
//! cluster lock (stopping the previous master), find the previous
//! generations' workers and hand them to the core as adopted, install or
//! re-open the steering, open the control socket and the metrics listener,
//! save the state, and schedule this generation's bands. What follows is the
//! runtime's (`mod.rs`).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use tokio::sync::mpsc;

use super::lock::ClusterLock;
use super::process_tree::{self, ProcessTable};
use super::spawn::PortAllocator;
use super::state::ClusterState;
use super::supervisor::{self, Supervisor};
use super::{
    Config, Event, Master, SharedSteering, adopt, boost, census, control, describe_table, files,
    generation, identity, kill, metrics, notify, writer,
};
use crate::cli::RunArgs;
use crate::paths;
use crate::steering::{self, SteeringTable};

/// How long a new master waits for the previous one to hand over.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(10);

impl Master {
    /// Lifecycle steps 1-3: lock (stopping the previous master), adopt,
    /// install the steering, open the control socket.
    pub(super) async fn start(args: RunArgs) -> Result<Master> {
        let cfg = Config::from_args(&args)?;
        let name = cfg.name.clone();
        let euid = rustix::process::geteuid().as_raw();
        match &cfg.run_as {
            None if euid == 0 => {
                log::warn!("workers will run as root; use --user USER to run them unprivileged")
            }
            Some(r) if r.uid == 0 => {
                log::warn!("--user {} is root: workers will run as root", r.name)
            }
            _ => {}
        }

        let root = PathBuf::from(paths::STATE_ROOT);
        if let Some(parent) = root.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        // Only root may write where the registry and the control socket live.
        files::ensure_dir(&root)?;
        let dir = paths::state_dir(&name);
        let created_dir = files::ensure_dir(&dir)?;
        let result = Master::start_in_dir(cfg, created_dir).await;
        if result.is_err() && created_dir {
            let _ = std::fs::remove_dir_all(&dir);
        }
        result
    }

    async fn start_in_dir(cfg: Config, created_dir: bool) -> Result<Master> {
        let name = cfg.name.clone();
        let state_path = paths::state_file(&name);
        let previous_state = ClusterState::load(&state_path)?;
        if let Some(prev) = &previous_state
            && prev.backend != cfg.backend
        {
            bail!(
                "cluster {name:?} runs with the {} backend; a reload cannot switch to {} \
                 (run `ipcluster stop --name {name}` first)",
                prev.backend,
                cfg.backend
            );
        }
        // A reload: tell systemd who the main process is before the old one exits.
        let notifier = notify::Notifier::from_env(&paths::state_dir(&name));
        if let Some(prev) = previous_state
            .as_ref()
            .filter(|s| kill::is_running(s.master_pid))
        {
            notifier.reloading(prev.master_pid);
        }
        let takeover_started = std::time::Instant::now();
        let (lock, replaced_master) = ClusterLock::take_over(
            &name,
            previous_state.as_ref().map(|s| s.master_pid),
            TAKEOVER_TIMEOUT,
        )?;
        log::info!(
            "cluster {name:?}: lock {} taken after {:?}",
            lock.path().display(),
            takeover_started.elapsed()
        );
        notifier.remember_watchdog(&paths::state_dir(&name));
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        if let Some(addr) = cfg.metrics_listen {
            let scrapes = events_tx.clone();
            metrics::serve(metrics::bind(addr)?, move |request| {
                scrapes.send(Event::Scrape(request)).is_ok()
            })?;
        }

        // Step 2: the workers the previous master left.
        let processes = ProcessTable::read()?;
        let registry = identity::load_registry(&name);
        let newest = identity::newest_generation(
            previous_state.as_ref().map(|s| s.generation),
            registry.as_ref(),
        );
        let found = adopt::discover(
            &adopt::Expect {
                cluster: &name,
                registry: registry.as_ref(),
                worker_uid: identity::worker_uid(cfg.run_as.as_ref()),
                newest_generation: newest,
            },
            &processes,
            &[],
        );
        let generation = identity::next_generation(&found, newest)?;
        if !found.is_empty() || replaced_master {
            log::info!(
                "reload of cluster {name:?}: found {} workers of earlier generations: {:?}",
                found.len(),
                found
                    .iter()
                    .map(|a| (a.worker.pid, a.worker.band, a.worker.generation))
                    .collect::<Vec<_>>()
            );
        }

        // Step 3: the steering state, and the table in force.
        steering::ebpf::set_kernel_log(cfg.ebpf_log);
        let mut steering = steering::backend(cfg.backend, cfg.steering_config())
            .with_context(|| format!("creating the {} steering backend", cfg.backend))?;
        let fresh = previous_state.is_none() && found.is_empty() && !replaced_master;
        let install_started = std::time::Instant::now();
        let installed = {
            // Loading the programs is CPU-bound and on the reload's critical path.
            let _boost = boost::Boost::raise();
            steering.install()
        };
        let install_time = install_started.elapsed();
        let previous_table = match installed {
            Ok(table) => table,
            Err(e) => {
                if fresh && let Err(t) = steering.teardown() {
                    log::warn!("removing the half-installed steering failed: {t}");
                }
                return Err(e).with_context(|| {
                    format!(
                        "installing the {} steering of cluster {name:?}",
                        cfg.backend
                    )
                });
            }
        };
        match &previous_table {
            Some(t) => log::info!(
                "steering ({}) re-opened in {install_time:?}; table in force: {}",
                cfg.backend,
                describe_table(t)
            ),
            None => log::info!(
                "steering ({}) installed in {install_time:?}; no table yet",
                cfg.backend
            ),
        }
        let fresh = fresh && previous_table.is_none();

        let owner = cfg.run_as.as_ref().map(|r| (r.uid, r.gid));
        let listener = match control::bind(&paths::control_socket(&name), owner) {
            Ok(l) => l,
            Err(e) => {
                if fresh {
                    let _ = steering.teardown();
                }
                return Err(e.into());
            }
        };
        let control_events = events_tx.clone();
        tokio::spawn(async move {
            let (tx, mut rx) = mpsc::unbounded_channel();
            tokio::spawn(control::serve(listener, tx));
            while let Some(ev) = rx.recv().await {
                if control_events.send(Event::Control(ev)).is_err() {
                    return;
                }
            }
        });

        let state = ClusterState {
            name: name.clone(),
            backend: cfg.backend,
            listens: cfg.listens.clone(),
            bands: cfg.bands,
            band_shift: cfg.band_shift,
            interfaces: cfg.interfaces.clone(),
            flow_entries: cfg.flow_entries,
            generation,
            master_pid: i32::try_from(std::process::id()).unwrap_or(0),
            soft_kill_timeout_ms: u64::try_from(cfg.soft_kill_timeout.as_millis())
                .unwrap_or(u64::MAX),
        };
        if let Err(e) = state.save(&state_path) {
            if fresh {
                let _ = steering.teardown();
            }
            return Err(e.into());
        }

        let now = Instant::now();
        // A previous table helps a band that fails only if it has our shape.
        let shape = generation::Shape {
            listens: &cfg.listens,
            band_shift: cfg.band_shift,
            bands: cfg.bands,
        };
        let usable_previous = previous_table.clone().filter(|t| shape.fits(t));
        let core = Supervisor::new(now, cfg.spawn_delay, cfg.soft_kill_timeout)
            .for_generation(generation, cfg.bands)
            .with_connect_timeout(cfg.connect_timeout);
        let steering: SharedSteering = Arc::new(std::sync::Mutex::new(steering));
        let mut master = Master {
            ports: PortAllocator::new(
                cfg.port_range.clone(),
                u32::try_from(generation % 64).unwrap_or(0) * cfg.bands * 2,
            ),
            cfg,
            generation,
            core,
            pidfds: HashMap::new(),
            writer: writer::SteeringWriter::start(Arc::clone(&steering), events_tx.clone())
                .context("starting the steering writer thread")?,
            steering,
            publishing: false,
            promoting: HashSet::new(),
            registering: HashSet::new(),
            reregistering: false,
            covering: HashSet::new(),
            stopping: false,
            table: previous_table.clone(),
            previous_table: usable_previous,
            next_publish_try: now,
            last_policy_log: None,
            peers: HashMap::new(),
            events_tx,
            events_rx,
            fresh,
            created_dir,
            census: census::Census::default(),
            processes: process_tree::ProcessCache::default(),
            exit: None,
            notifier,
            metrics: metrics::Metrics::default(),
            _lock: lock,
        };
        master.adopt(found, &processes, previous_table.as_ref());
        master.save_registry();
        master.cover_unserved_bands();
        for band in 0..master.cfg.bands {
            master.core.schedule_spawn(band, now);
        }
        log::info!(
            "cluster {name:?}: generation {generation}: {} workers of `{}` on {}, backend {}",
            master.cfg.bands,
            master.command_line(),
            master
                .cfg
                .listens
                .iter()
                .map(|l| l.to_string())
                .collect::<Vec<_>>()
                .join(" "),
            master.cfg.backend
        );
        Ok(master)
    }

    /// Take over the previous generations: each worker is watched (its
    /// pidfd) and the core adopts it, live if the table in force points at it.
    fn adopt(
        &mut self,
        found: Vec<adopt::Adopted>,
        processes: &ProcessTable,
        table: Option<&SteeringTable>,
    ) {
        for adopted in found {
            let w = &adopted.worker;
            let ports: Vec<u16> = self.cfg.publics.iter().map(|&p| w.port_for(p)).collect();
            let in_table = table.is_some_and(|t| {
                t.services.iter().any(|s| {
                    s.worker_ports.get(w.band as usize) == Some(&w.port_for(s.listen.port()))
                })
            });
            let age = process_tree::age_secs(w.pid).unwrap_or(0.0);
            let event = supervisor::Event::Adopted {
                pid: w.pid,
                band: w.band,
                generation: w.generation,
                port: w.port,
                ports,
                start_time: adopted.start_time,
                uid: adopted.uid,
                nice: processes.get(w.pid).map_or(0, |p| p.nice),
                age: Duration::try_from_secs_f64(age).unwrap_or_default(),
                in_table,
            };
            self.pidfds.insert(w.pid, Arc::new(adopted.pidfd));
            self.watch(w.pid);
            let effects = self.core.handle(Instant::now(), event);
            self.carry_out_effects(effects);
        }
    }
}
