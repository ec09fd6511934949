//! The ebpf steering backend. (Being written: every operation fails for now.)

use super::{BackendKind, Band, Counters, Steering, SteeringConfig, SteeringError, SteeringTable};

pub struct EbpfSteering {
    config: SteeringConfig,
}

impl EbpfSteering {
    pub fn new(config: SteeringConfig) -> Result<Self, SteeringError> {
        Ok(Self { config })
    }

    fn not_yet(&self) -> SteeringError {
        SteeringError::Ebpf(format!(
            "the ebpf backend is not built yet (cluster {})",
            self.config.cluster
        ))
    }
}

impl Steering for EbpfSteering {
    fn kind(&self) -> BackendKind {
        BackendKind::Ebpf
    }
    fn install(&mut self) -> Result<Option<SteeringTable>, SteeringError> {
        Err(self.not_yet())
    }
    fn publish(&mut self, _table: &SteeringTable) -> Result<(), SteeringError> {
        Err(self.not_yet())
    }
    fn set_band(
        &mut self,
        _service: usize,
        _band: Band,
        _worker_port: u16,
    ) -> Result<(), SteeringError> {
        Err(self.not_yet())
    }
    fn read_table(&self) -> Result<Option<SteeringTable>, SteeringError> {
        Err(self.not_yet())
    }
    fn counters(&self) -> Result<Counters, SteeringError> {
        Err(self.not_yet())
    }
    fn teardown(&mut self) -> Result<(), SteeringError> {
        Err(self.not_yet())
    }
}
