use std::process::ExitCode;

use clap::Parser as _;
use ipcluster::cli::{Cli, Command};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    ipcluster::errors::install_panic_hook();
    // Bad flags: clap prints the problem and the usage, and exits with status 2.
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => ipcluster::master::run(*args),
        Command::Status(args) => ipcluster::master::client::status_command(&args),
        Command::Stop(name) => ipcluster::master::client::stop_command(&name.name),
        Command::KillRetired(name) => ipcluster::master::client::kill_retired_command(&name.name),
        Command::DemoWorker => ipcluster::demo::run(),
        Command::Man(args) => ipcluster::docgen::man_command(&args),
        Command::Completions(args) => ipcluster::docgen::completions_command(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", ipcluster::errors::report(&e));
            ExitCode::FAILURE
        }
    }
}
