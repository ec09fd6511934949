//! ipcluster: a supervisor that runs a server as a power-of-two group of worker
//! processes with sticky sessions by client IP and zero-downtime reloads.
//!
//! - [`cli`]: the command line.
//! - [`steering`]: the `Steering` trait, the steering table and the two backends.
//! - [`protocol`]: the control-socket messages between master and workers.
//! - [`paths`]: where a cluster keeps its state.
//! - [`cluster_name`]: the one rule for cluster names.
//! - [`policy`]: pure supervision decisions (retire, ask to die, kill).
//! - [`master`]: the master: spawning, readiness, generations, adoption, reload,
//!   the control socket, `status`/`stop`/`kill-retired`.
//! - [`demo`]: the built-in demo worker (`run` without a command).
//! - [`docgen`]: man pages and shell completions from the clap definitions.

pub mod cli;
pub mod cluster_name;
pub mod demo;
pub mod docgen;
pub mod errors;
pub mod master;
pub mod paths;
pub mod policy;
pub mod protocol;
pub mod steering;
pub mod worker_api;
