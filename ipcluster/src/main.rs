use anyhow::Result;
use clap::Parser as _;
use ipcluster::cli::{Cli, Command};

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(_) | Command::Status(_) | Command::Stop(_) | Command::KillRetired(_) => {
            anyhow::bail!("this subcommand is not implemented yet (see README.md, \"Status\")")
        }
    }
}
