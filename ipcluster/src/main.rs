use anyhow::Result;
use clap::Parser as _;
use ipcluster::cli::{Cli, Command};

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => ipcluster::master::run(*args),
        Command::Status(args) => ipcluster::master::client::status_command(&args),
        Command::Stop(name) => ipcluster::master::client::stop_command(&name.name),
        Command::KillRetired(name) => ipcluster::master::client::kill_retired_command(&name.name),
        Command::DemoWorker => ipcluster::demo::run(),
        Command::Man(args) => ipcluster::docgen::man_command(&args),
        Command::Completions(args) => ipcluster::docgen::completions_command(&args),
    }
}
