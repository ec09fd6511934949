//! Developer tasks: `cargo xtask setup | build | run | test | bench | man | dist`.
//! Compiling the eBPF object is not done here: `ipcluster/build.rs` does it
//! through aya-build; xtask only makes sure the toolchain pieces exist.

mod bench;
mod dist;
mod setup;

use std::{
    ffi::OsString,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "ipcluster developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (nightly rust-src, bpf-linker, bpffs,
    /// iptables, bpftool). Idempotent.
    Setup,
    /// Setup, then build the release binary target/release/ipcluster.
    Build,
    /// Build, then run ipcluster as root (via sudo -E when not root). With only flags,
    /// `run` is implied: `cargo xtask run -- --backend ebpf` starts a demo cluster.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Build, then measure steering cost against a direct connection, iptables, HAProxy
    /// and nginx stream (installs nginx, haproxy, wrk when missing); writes
    /// target/bench/report.md and target/bench/chart.svg and prints the table. Needs root.
    Bench {
        /// A shorter run (two rounds of 1 s per measurement; about 5 minutes with the
        /// idle-connection case, builds not counted).
        #[arg(long)]
        quick: bool,
        /// Only these paths in cases 1 and 2 (comma-separated: direct, ebpf, iptables,
        /// haproxy, nginx). Default: all.
        #[arg(long, value_delimiter = ',')]
        paths: Vec<String>,
        /// Run only this case: `crash` (how soon a crashed worker's band is steered away and
        /// served by its replacement, every backend) or `master-scale` (master CPU and `status` latency with
        /// 10k/50k/100k idle connections on 8 workers, and with 64 idle workers) or `reload`
        /// (reloads under paced and saturating load of the backends among --paths).
        #[arg(long)]
        case: Option<String>,
    },
    /// Build, then write the man pages and shell completions (generated from the clap
    /// definitions) into target/release/dist/.
    Man,
    /// Build, then the Debian package (cargo-deb, installed when missing): the binary,
    /// the systemd unit, the man pages and completions, in target/release/dist/deb/.
    Dist,
    /// Setup, then the whole suite: fmt and clippy checks, unit tests, the Debian
    /// package, then the root tests (kernel, iptables, end-to-end), each in a network
    /// namespace of its own.
    Test {
        /// Skip `cargo fmt --check` and clippy.
        #[arg(long)]
        no_lint: bool,
        /// How many root tests run at once (each is in its own network namespace, so
        /// they cannot meet each other's rules or ports; more threads mainly add CPU
        /// contention to the timing-sensitive ones).
        #[arg(long, default_value_t = ROOT_TEST_THREADS, value_parser = clap::value_parser!(u32).range(1..=64))]
        test_threads: u32,
        /// Only run root tests whose name contains this filter.
        filter: Option<String>,
    },
}

pub(crate) fn say(step: &str, message: &str) {
    eprintln!("[xtask {step}] {message}");
}

pub(crate) fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

pub(crate) fn run_checked(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .context("CARGO_MANIFEST_DIR not set: run through `cargo xtask`")?;
    Path::new(&manifest)
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root)
        .env("PATH", setup::path_with_cargo_bin());
    cmd
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

fn build(root: &Path) -> Result<PathBuf> {
    setup::setup()?;
    say(
        "build",
        "cargo build --release -p ipcluster (binary and example workers)",
    );
    run_checked(cargo(root).args([
        "build",
        "--release",
        "-p",
        "ipcluster",
        "--bins",
        "--examples",
    ]))?;
    let bin = target_dir(root).join("release").join("ipcluster");
    if !bin.is_file() {
        bail!("the build succeeded but {} is missing", bin.display());
    }
    Ok(bin)
}

/// With no subcommand among the arguments, `run` is implied.
fn ipcluster_args(args: Vec<OsString>) -> Vec<OsString> {
    const SUBCOMMANDS: [&str; 8] = [
        "run",
        "status",
        "stop",
        "kill-retired",
        "help",
        "demo-worker",
        "man",
        "completions",
    ];
    let first = args.first().and_then(|a| a.to_str());
    let has_subcommand = first.is_some_and(|a| SUBCOMMANDS.contains(&a));
    let top_level_flag = first.is_some_and(|a| matches!(a, "--help" | "-h" | "--version" | "-V"));
    if has_subcommand || top_level_flag {
        args
    } else {
        std::iter::once(OsString::from("run")).chain(args).collect()
    }
}

fn run(root: &Path, args: Vec<OsString>) -> Result<()> {
    let bin = build(root)?;
    let args = ipcluster_args(args);
    let mut cmd = if is_root() {
        Command::new(&bin)
    } else {
        say("run", "not root: running through sudo -E");
        let mut c = Command::new("sudo");
        c.arg("-E").arg(&bin);
        c
    };
    cmd.args(&args);
    say(
        "run",
        &format!(
            "{} {}",
            bin.display(),
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        ),
    );
    // Replace xtask so that Ctrl-C and signals reach the master directly.
    let err = cmd.exec();
    Err(err).with_context(|| format!("executing {}", bin.display()))
}

/// Root tests run at once by default (`cargo xtask test --test-threads`): each
/// is in its own network namespace, and two at a time was reliable on a busy
/// 2-core machine (README, "Isolation of the root tests").
const ROOT_TEST_THREADS: u32 = 2;

fn test(root: &Path, no_lint: bool, threads: u32, filter: Option<String>) -> Result<()> {
    setup::setup()?;
    if !no_lint {
        say("test", "cargo fmt --all --check");
        run_checked(cargo(root).args(["fmt", "--all", "--check"]))?;
        say("test", "cargo clippy --all-targets -- -D warnings");
        run_checked(cargo(root).args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    }
    say("test", "unit tests (no root needed)");
    run_checked(cargo(root).args([
        "test",
        "--workspace",
        "--exclude",
        "ipcluster-tests",
        "--exclude",
        "ipcluster-ebpf",
    ]))?;
    let bin = build(root)?;
    // The package test (tests/tests/dist_package.rs) installs this .deb; it is
    // built only when the filter selects that test.
    let deb = if filter
        .as_deref()
        .is_none_or(|f| dist::PACKAGE_TEST.contains(f))
    {
        Some(dist::package(root, &bin)?)
    } else {
        None
    };
    say(
        "test",
        &format!(
            "root tests (kernel, iptables, end-to-end), each in its own network namespace, \
             {threads} at a time"
        ),
    );
    let mut cmd = if is_root() {
        cargo(root)
    } else {
        say("test", "not root: running the root tests through sudo -E");
        let mut c = Command::new("sudo");
        c.current_dir(root)
            .arg("-E")
            .arg(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        c
    };
    cmd.args(["test", "-p", "ipcluster-tests", "--"]);
    if let Some(filter) = filter {
        cmd.arg(filter);
    }
    // The end-to-end tests run the release binary and the example workers built next to it.
    let examples = bin.with_file_name("examples");
    cmd.arg(format!("--test-threads={threads}"))
        .env("IPCLUSTER_BIN", &bin)
        .env("IPCLUSTER_EXAMPLES", &examples);
    if let Some(deb) = deb {
        cmd.env("IPCLUSTER_DEB", deb);
    }
    run_checked(&mut cmd)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    match cli.task {
        Task::Setup => setup::setup(),
        Task::Build => build(&root).map(|bin| say("build", &format!("built {}", bin.display()))),
        Task::Run { args } => run(&root, args),
        Task::Test {
            no_lint,
            test_threads,
            filter,
        } => test(&root, no_lint, test_threads, filter),
        Task::Man => {
            let bin = build(&root)?;
            let dist = dist::man(&bin)?;
            say("man", &format!("done: {}", dist.display()));
            Ok(())
        }
        Task::Dist => {
            let bin = build(&root)?;
            let deb = dist::package(&root, &bin)?;
            say("dist", &format!("built {}", deb.display()));
            Ok(())
        }
        Task::Bench { quick, paths, case } => {
            let paths = bench::parse_paths(&paths)?;
            let case = case.map(|c| bench::parse_case(&c)).transpose()?;
            let bin = build(&root)?;
            bench::bench(&bench::BenchOptions {
                quick,
                bin,
                root,
                paths,
                case,
            })
        }
    }
}
