//! ipcluster: a supervisor that runs a server as a power-of-two group of worker
//! processes with sticky sessions by client IP and zero-downtime reloads.
//!
//! - [`cli`]: the command line.
//! - [`steering`]: the `Steering` trait, the steering table and the two backends.
//! - [`protocol`]: the control-socket messages between master and workers.
//! - [`paths`]: where a cluster keeps its state.
//! - [`policy`]: pure supervision decisions (retire, ask to die, kill).
//! - [`worker_api`]: the client side of the control socket, for Rust workers.

pub mod cli;
pub mod paths;
pub mod policy;
pub mod protocol;
pub mod steering;
pub mod worker_api;
