//! The ebpf steering backend: tc programs (`ipcluster-ebpf`) on the chosen
//! interfaces, steered through maps pinned in `/sys/fs/bpf/ipcluster/<cluster>/`.
//!
//! - [`pins`]: bpffs, the pin folder, the layout check, atomic creation.
//! - [`attach`]: interface choice, tcx links / netlink filters, swap and detach.
//! - [`maps`]: the typed maps, publishing a table into the idle slot and the flip.
//!
//! Dropping an [`EbpfSteering`] leaves everything in the kernel: links and maps
//! are pinned, so traffic keeps being steered while no master runs. Only
//! [`Steering::teardown`] removes them.

pub mod attach;
mod batch;
pub mod maps;
pub mod pins;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use aya::{Ebpf, EbpfLoader};
use ipcluster_common::{LAYOUT_VERSION, Meta, map_names};

pub use attach::AttachMode;
pub use maps::SteeringMaps;
use pins::Existing;

use super::{BackendKind, Counters, Steering, SteeringConfig, SteeringError, SteeringTable};
use crate::paths;

/// The compiled tc programs (built by `build.rs` with aya-build).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ipcluster"));

/// The embedded eBPF object, e.g. for `BPF_PROG_TEST_RUN` fixtures.
pub fn object() -> &'static [u8] {
    OBJECT
}

/// Wrap any BPF-side error with what was being done.
pub(crate) fn bpf_error(
    what: impl Into<String>,
    source: impl std::error::Error + Send + Sync + 'static,
) -> SteeringError {
    SteeringError::Bpf {
        what: what.into(),
        source: Box::new(source),
    }
}

/// Whether the programs loaded by this process log their rare events
/// (refused take-overs, table misses, evicted-flow fallbacks, ICMP
/// translations) through aya-log (`--ebpf-log`). Off: the programs' log
/// level is patched to nothing at load.
static KERNEL_LOG: AtomicBool = AtomicBool::new(false);

/// Turn the kernel-side log on or off for programs loaded from now on.
pub fn set_kernel_log(enabled: bool) {
    KERNEL_LOG.store(enabled, Ordering::Relaxed);
}

/// The aya-log level the programs get: debug when the log is on, off otherwise.
fn kernel_log_level() -> u8 {
    if KERNEL_LOG.load(Ordering::Relaxed) {
        4 // aya_log_common::Level::Debug
    } else {
        0
    }
}

/// The name of the global variable that holds the programs' aya-log level.
const LOG_LEVEL_GLOBAL: &str = "AYA_LOG_LEVEL";

/// A reader of the programs' log records, when `--ebpf-log` is on.
type KernelLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// Start reading the log of `ebpf`'s programs (before they are loaded: the
/// reader owns the log map they refer to, so it must outlive their loading).
fn kernel_logger(ebpf: &mut Ebpf) -> Option<KernelLogger> {
    if !KERNEL_LOG.load(Ordering::Relaxed) {
        return None;
    }
    match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => Some(logger),
        Err(e) => {
            log::warn!("--ebpf-log: cannot read the programs' log: {e}");
            None
        }
    }
}

/// Load the object against the maps pinned (or to be pinned) in `dir`; the
/// flow table gets `flow_entries` entries when it is created.
pub fn load_object(dir: &Path, flow_entries: u32) -> Result<Ebpf, SteeringError> {
    let mut loader = EbpfLoader::new();
    let level = kernel_log_level();
    loader.override_global(LOG_LEVEL_GLOBAL, &level, false);
    let paths: Vec<(&'static str, PathBuf)> = map_names::ALL
        .iter()
        .map(|name| (*name, dir.join(name)))
        .collect();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    loader.map_max_entries(map_names::FLOWS, flow_entries);
    loader.load(OBJECT).map_err(|e| {
        bpf_error(
            format!(
                "loading the eBPF object with maps pinned in {}",
                dir.display()
            ),
            e,
        )
    })
}

/// The ebpf backend of one cluster.
pub struct EbpfSteering {
    config: SteeringConfig,
    dir: PathBuf,
    mode: AttachMode,
    maps: Option<SteeringMaps>,
    logger: Option<KernelLogger>,
}

impl EbpfSteering {
    pub fn new(config: SteeringConfig) -> Result<Self, SteeringError> {
        let dir = pins::cluster_pin_dir(&config.cluster)?;
        Ok(EbpfSteering {
            config,
            dir,
            mode: AttachMode::for_this_kernel(),
            maps: None,
            logger: None,
        })
    }

    /// Attach with netlink cls_bpf instead of tcx (older kernels do this by
    /// themselves; tests use it to cover that path on a new kernel).
    pub fn with_attach_mode(mut self, mode: AttachMode) -> Self {
        self.mode = mode;
        self
    }

    /// The cluster's pin folder.
    pub fn pin_dir(&self) -> &Path {
        &self.dir
    }

    /// The maps, opened from the pins when this object did not install them.
    /// `None` when the cluster has no pin folder.
    fn open_maps(&self) -> Result<Option<SteeringMaps>, SteeringError> {
        match pins::check_layout(&self.config.cluster, &self.dir)? {
            Existing::Nothing => Ok(None),
            Existing::Compatible(_) => SteeringMaps::open_pinned(&self.dir).map(Some),
        }
    }

    fn maps_mut(&mut self) -> Result<&mut SteeringMaps, SteeringError> {
        if self.maps.is_none() {
            self.maps = self.open_maps()?;
        }
        self.maps
            .as_mut()
            .ok_or_else(|| pins::not_installed(&self.config.cluster, &self.dir))
    }

    fn check_config(&self) -> Result<(), SteeringError> {
        pins::check_service_count(self.config.services.len())?;
        if self.config.flow_entries == 0 {
            return Err(SteeringError::Ebpf(
                "the flow table needs at least one entry (--flow-entries)".into(),
            ));
        }
        Ok(())
    }

    /// Build the cluster's state in a temporary folder and rename it into
    /// place. `Ok(false)`: another master created the folder meanwhile.
    fn install_fresh(&mut self, interfaces: &[String]) -> Result<bool, SteeringError> {
        let root = pins::ensure_pin_root()?;
        let tmp = pins::temporary_dir(&root, &self.config.cluster)?;
        let built = (|| {
            let mut ebpf = load_object(&tmp, self.config.flow_entries)?;
            self.logger = kernel_logger(&mut ebpf);
            let mut maps = SteeringMaps::take_from(&mut ebpf)?;
            maps.write_meta(Meta {
                layout_version: LAYOUT_VERSION,
                flow_entries: self.config.flow_entries,
            })?;
            attach::attach_all(&mut ebpf, &tmp, interfaces, self.mode)?;
            Ok::<_, SteeringError>(maps)
        })();
        let placed = built.and_then(|maps| Ok((maps, pins::publish_dir(&tmp, &self.dir)?)));
        match placed {
            Ok((maps, true)) => {
                // The pins moved with the folder; the handles stay valid.
                self.maps = Some(maps);
                Ok(true)
            }
            Ok((_, false)) => {
                discard(&tmp);
                Ok(false)
            }
            Err(e) => {
                discard(&tmp);
                Err(e)
            }
        }
    }

    /// Load this binary's programs against the existing pinned maps and swap
    /// them into the existing links; attach where links are missing.
    fn adopt(&mut self, meta: Meta, interfaces: &[String]) -> Result<(), SteeringError> {
        if meta.flow_entries != self.config.flow_entries {
            log::warn!(
                "the pinned flow table of cluster {} keeps its {} entries (asked for {}); \
                 `ipcluster stop --name {}` recreates it",
                self.config.cluster,
                meta.flow_entries,
                self.config.flow_entries,
                self.config.cluster
            );
        }
        let mut ebpf = load_object(&self.dir, meta.flow_entries)?;
        self.logger = kernel_logger(&mut ebpf);
        let maps = SteeringMaps::take_from(&mut ebpf)?;
        attach::attach_all(&mut ebpf, &self.dir, interfaces, self.mode)?;
        self.maps = Some(maps);
        Ok(())
    }
}

/// Remove a half-built temporary folder (detaching what it recorded).
fn discard(tmp: &Path) {
    if let Err(e) = attach::detach_all(tmp).and_then(|()| pins::remove_folder(tmp)) {
        log::warn!("cleaning up {}: {e}", tmp.display());
    }
}

impl Steering for EbpfSteering {
    fn kind(&self) -> BackendKind {
        BackendKind::Ebpf
    }

    fn install(&mut self) -> Result<Option<SteeringTable>, SteeringError> {
        self.check_config()?;
        pins::ensure_bpffs()?;
        let interfaces = attach::choose_interfaces(&self.config)?;
        log::info!(
            "ebpf steering of cluster {} on {} ({:?}), pins in {}",
            self.config.cluster,
            interfaces.join(", "),
            self.mode,
            self.dir.display()
        );
        for _attempt in 0..2 {
            match pins::check_layout(&self.config.cluster, &self.dir)? {
                Existing::Compatible(meta) => {
                    self.adopt(meta, &interfaces)?;
                    return self.read_table();
                }
                Existing::Nothing => {
                    if self.install_fresh(&interfaces)? {
                        return Ok(None);
                    }
                    // Lost the race to another creator: adopt its folder.
                }
            }
        }
        Err(SteeringError::Ebpf(format!(
            "the pin folder {} keeps appearing and disappearing; is another master installing?",
            self.dir.display()
        )))
    }

    fn publish(&mut self, table: &SteeringTable) -> Result<(), SteeringError> {
        table.validate()?;
        self.maps_mut()?.publish(table)
    }

    fn read_table(&self) -> Result<Option<SteeringTable>, SteeringError> {
        match &self.maps {
            Some(maps) => maps.read_table(),
            None => match self.open_maps()? {
                Some(maps) => maps.read_table(),
                None => Ok(None),
            },
        }
    }

    fn counters(&self) -> Result<Counters, SteeringError> {
        match &self.maps {
            Some(maps) => maps.counters(),
            None => match self.open_maps()? {
                Some(maps) => maps.counters(),
                None => Ok(Counters::default()),
            },
        }
    }

    fn poll_kernel_log(&mut self) {
        if let Some(logger) = &mut self.logger {
            logger.flush();
        }
    }

    fn teardown(&mut self) -> Result<(), SteeringError> {
        self.maps = None;
        self.logger = None;
        // Works whatever the layout: this is how incompatible state is removed.
        attach::detach_all(&self.dir)?;
        pins::remove_folder(&self.dir)?;
        // Half-built folders of masters that died while installing.
        for tmp in pins::temporary_leftovers(Path::new(paths::PIN_ROOT), &self.config.cluster)? {
            discard(&tmp);
        }
        Ok(())
    }
}
