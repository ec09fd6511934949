//! The command line (docs/design.md, "Contracts"). Parsing and validation only: every bad
//! value is rejected here with a message that names it and says what is allowed.

use std::{net::SocketAddr, ops::RangeInclusive, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::steering::BackendKind;

/// Default public listen address when no `--listen` is given.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

#[derive(Debug, Parser)]
#[command(
    name = "ipcluster",
    version,
    about = "Run a server as a power-of-two group of worker processes with sticky sessions by client IP \
             and zero-downtime reloads.",
    long_about = "Run a server as a power-of-two group of worker processes with sticky sessions by client IP \
                  and zero-downtime reloads.\n\n\
                  Every connection from one client address reaches the same worker (its band), steered in the \
                  kernel by a tc eBPF program (or iptables REDIRECT rules). Running `ipcluster run` again with \
                  the same --name is a reload: a new generation of workers takes new connections while the old \
                  one keeps the connections it has."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start (or reload) a cluster: the master runs in the foreground and logs to stderr.
    Run(Box<RunArgs>),
    /// Show the workers, the steering table and the counters of a running cluster.
    Status(StatusArgs),
    /// Stop a cluster: end every worker and the master, remove all steering state.
    Stop(NameArg),
    /// Kill every retired (old-generation) worker of a cluster, spaced by the spawn delay.
    KillRetired(NameArg),
    /// The built-in demo worker (what `run` starts without a command).
    #[command(hide = true)]
    DemoWorker,
    /// Write the man pages into a folder (`cargo xtask man` and `dist` run it).
    #[command(hide = true)]
    Man(crate::docgen::ManArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(hide = true)]
    Completions(crate::docgen::CompletionsArgs),
}

#[derive(Debug, Args, Clone)]
pub struct NameArg {
    /// Cluster name: names the state directory /run/ipcluster/<NAME>/, the pin folder
    /// /sys/fs/bpf/ipcluster/<NAME>/, the iptables chain and the control socket. 1 to 64
    /// letters, digits, '-' or '_', not starting with '-'.
    #[arg(long, short = 'n', default_value = "default", value_parser = parse_name)]
    pub name: String,
}

#[derive(Debug, Args, Clone)]
pub struct StatusArgs {
    #[command(flatten)]
    pub name: NameArg,
    /// Print machine-readable JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Order in which retired workers are asked to die or killed under memory pressure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KillStrategy {
    /// Fewest connections first, then largest RSS, then oldest.
    ConnRssTime,
    /// Largest RSS first, then fewest connections, then oldest.
    RssConnTime,
    /// Oldest first.
    Time,
}

#[derive(Debug, Args, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub name: NameArg,

    /// Steering backend: `ebpf` (tc programs and BPF maps), `iptables` (nat REDIRECT rules) or
    /// `sk-lookup` (an sk_lookup program hands connections to the workers' own sockets).
    #[arg(long, value_enum, default_value_t = BackendKind::Ebpf)]
    pub backend: BackendKind,

    /// Public address to serve, IP:PORT (repeatable; [::]:PORT and 0.0.0.0:PORT listen on every
    /// local address). Default: 127.0.0.1:8080.
    #[arg(long = "listen", short = 'l', value_name = "IP:PORT", value_parser = parse_listen)]
    pub listen: Vec<SocketAddr>,

    /// Number of workers (bands); a power of two. Default: the largest power of two ≤ the CPU count.
    #[arg(long, short = 'w', value_parser = parse_workers)]
    pub workers: Option<u32>,

    /// Interface to attach the tc programs to (repeatable, ebpf backend). Default: lo plus every
    /// interface that holds a --listen address (all up interfaces for a wildcard listen).
    #[arg(long = "iface", value_name = "IF")]
    pub iface: Vec<String>,

    /// Shift applied to the client address before taking the band bits:
    /// band = (low 32 bits of client IP >> S) & (workers - 1). Use 8 to keep a /24 on one worker.
    #[arg(long, value_name = "S", default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=31))]
    pub band_shift: u8,

    /// A live worker whose resident memory (its whole process tree) exceeds SIZE is retired and
    /// replaced. Accepts 448MiB, 1GiB, plain bytes.
    #[arg(long, value_name = "SIZE", default_value = "448MiB", value_parser = parse_size)]
    pub worker_rss_limit: u64,

    /// Memory budget of the whole cluster (master and all workers). Above 80 % retired workers are
    /// asked to die; above 95 % they are killed.
    #[arg(long, value_name = "SIZE", default_value = "512MiB", value_parser = parse_size)]
    pub cluster_memory_limit: u64,

    /// Run workers as this user (its groups are set first). Default: the master's user.
    #[arg(long, short = 'u', value_name = "USER")]
    pub user: Option<String>,

    /// Pass KEY=VALUE to every worker, or KEY with the master's value (repeatable). Workers get
    /// only PATH, HOME, USER, LOGNAME, SHELL, LANG, LANGUAGE, LC_*, TZ, TMPDIR, RUST_LOG and
    /// RUST_BACKTRACE from the master's environment, plus PORT and the IPCLUSTER_* variables.
    #[arg(long = "env", value_name = "KEY[=VALUE]")]
    pub env: Vec<String>,

    /// First and last worker port, FIRST-LAST; ports in use are skipped.
    #[arg(long, value_name = "FIRST-LAST", default_value = "20000-29999", value_parser = parse_port_range)]
    pub port_range: RangeInclusive<u16>,

    /// Pause between spawning two workers, and between two kills of `kill-retired`.
    #[arg(long, value_name = "DURATION", default_value = "100ms", value_parser = parse_duration)]
    pub spawn_delay: Duration,

    /// A worker that is not listening on its port (or has not said hello) within this time is
    /// killed and respawned with backoff.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// Time between SIGTERM (or `die`) and SIGKILL when a worker is stopped.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub soft_kill_timeout: Duration,

    /// A worker that said hello and then stays silent for this long is retired and replaced.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub ping_timeout: Duration,

    /// How often the master measures memory and connections and applies the policy.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub monitor_interval: Duration,

    /// Nice value added to retired workers, so new-generation workers win the CPU.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub retire_renice: i32,

    /// At most this many health retirements per --retire-window.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub retire_rate: u32,

    /// Window of the retirement rate limit.
    #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = parse_duration)]
    pub retire_window: Duration,

    /// Which retired workers die first under memory pressure.
    #[arg(long, value_enum, default_value_t = KillStrategy::ConnRssTime)]
    pub kill_strategy: KillStrategy,

    /// A retired worker with no connections for this long is stopped (no client can reach it).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub retired_idle_exit: Duration,

    /// Size of the eBPF flow table (connections remembered per cluster).
    #[arg(long, value_name = "N", default_value_t = ipcluster_common::DEFAULT_FLOW_ENTRIES,
          value_parser = clap::value_parser!(u32).range(1..=(1 << 24)))]
    pub flow_entries: u32,

    /// Serve Prometheus metrics on http://IP:PORT/metrics (workers by state and generation, RSS
    /// and connections per worker, steering counters, publishes, retirements, kills, reloads).
    #[arg(long, value_name = "IP:PORT", value_parser = parse_listen)]
    pub metrics_listen: Option<SocketAddr>,

    /// Start the master in the background and exit once it serves: 0 when its generation is
    /// published, non-zero (with its error) when it gave up. For systemd's ExecReload, which waits
    /// for its command to finish.
    #[arg(long)]
    pub detach: bool,

    /// Forward the tc programs' records of rare events (a SYN refused because it would take
    /// over a live connection, a table miss, an evicted-flow fallback, an ICMP error
    /// translated) into the master's log (ebpf backend).
    #[arg(long)]
    pub ebpf_log: bool,

    /// The worker command and its arguments; `{port}` and `{band}` are replaced. Without it, the
    /// built-in demo HTTP worker runs.
    #[arg(last = true, value_name = "CMD ARGS")]
    pub command: Vec<String>,
}

impl RunArgs {
    /// The listen addresses, with the default when none was given.
    pub fn listens(&self) -> Vec<SocketAddr> {
        if self.listen.is_empty() {
            vec![
                DEFAULT_LISTEN
                    .parse()
                    .expect("DEFAULT_LISTEN is a valid socket address"),
            ]
        } else {
            self.listen.clone()
        }
    }

    /// The worker count, with the default (largest power of two ≤ CPUs) when none was given.
    pub fn worker_count(&self) -> u32 {
        self.workers.unwrap_or_else(default_workers)
    }
}

/// The largest power of two ≤ the number of CPUs (at least 1).
pub fn default_workers() -> u32 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpus = u32::try_from(cpus)
        .unwrap_or(u32::MAX)
        .clamp(1, ipcluster_common::MAX_BANDS);
    1 << (31 - cpus.leading_zeros())
}

/// Cluster names become file names, a chain name and a socket path: the rule
/// is [`crate::cluster_name`]'s, shared with the steering backends.
pub fn parse_name(s: &str) -> Result<String, String> {
    crate::cluster_name::ClusterName::new(s)
        .map(String::from)
        .map_err(|e| e.to_string())
}

pub fn parse_workers(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|_| {
        format!("invalid worker count {s:?}: expected a power of two such as 1, 2, 4, 8")
    })?;
    if n == 0 || !n.is_power_of_two() || n > ipcluster_common::MAX_BANDS {
        let lower = if n == 0 {
            1
        } else {
            1u32 << (31 - n.leading_zeros())
        };
        return Err(format!(
            "invalid worker count {n}: it must be a power of two between 1 and {} (try {})",
            ipcluster_common::MAX_BANDS,
            lower.min(ipcluster_common::MAX_BANDS)
        ));
    }
    Ok(n)
}

pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s.parse().map_err(|_| {
        format!("invalid listen address {s:?}: expected IP:PORT such as 127.0.0.1:8080, 0.0.0.0:80 or [::1]:8080")
    })?;
    if addr.port() == 0 {
        return Err(format!(
            "invalid listen address {s:?}: port 0 is not a public port"
        ));
    }
    Ok(addr)
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    let bytes = s
        .trim()
        .parse::<bytesize::ByteSize>()
        .map_err(|_| {
            format!("invalid size {s:?}: expected a size such as 448MiB, 1GiB or a number of bytes")
        })?
        .as_u64();
    if bytes == 0 {
        return Err(format!("invalid size {s:?}: it must be larger than zero"));
    }
    Ok(bytes)
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        format!("invalid duration {s:?} ({e}): expected a duration such as 500ms, 10s or 2m")
    })
}

pub fn parse_port_range(s: &str) -> Result<RangeInclusive<u16>, String> {
    let bad = || {
        format!(
            "invalid port range {s:?}: expected FIRST-LAST with 1 ≤ FIRST ≤ LAST ≤ 65535, e.g. 20000-29999"
        )
    };
    let (first, last) = s.split_once('-').ok_or_else(bad)?;
    let first: u16 = first.trim().parse().map_err(|_| bad())?;
    let last: u16 = last.trim().parse().map_err(|_| bad())?;
    if first == 0 || first > last {
        return Err(bad());
    }
    Ok(first..=last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, String> {
        Cli::try_parse_from(std::iter::once("ipcluster").chain(args.iter().copied()))
            .map_err(|e| e.to_string())
    }

    fn run_args(args: &[&str]) -> RunArgs {
        match parse(args).expect("valid arguments").command {
            Command::Run(r) => *r,
            other => panic!("expected run, got {other:?}"),
        }
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults() {
        let r = run_args(&["run"]);
        assert_eq!(r.name.name, "default");
        assert_eq!(r.backend, BackendKind::Ebpf);
        assert_eq!(r.listens(), vec!["127.0.0.1:8080".parse().expect("addr")]);
        assert!(r.worker_count().is_power_of_two());
        assert_eq!(r.worker_rss_limit, 448 * 1024 * 1024);
        assert_eq!(r.cluster_memory_limit, 512 * 1024 * 1024);
        assert_eq!(r.retire_rate, 10);
        assert_eq!(r.retire_window, Duration::from_secs(120));
        assert_eq!(r.ping_timeout, Duration::from_secs(10));
        assert_eq!(r.retire_renice, 1);
        assert_eq!(r.flow_entries, 262_144);
        assert!(r.command.is_empty());
    }

    #[test]
    fn full_command_line() {
        let r = run_args(&[
            "run",
            "--name",
            "chat",
            "--backend",
            "iptables",
            "--listen",
            "0.0.0.0:80",
            "--listen",
            "[::1]:8443",
            "--workers",
            "8",
            "--iface",
            "eth0",
            "--band-shift",
            "8",
            "--worker-rss-limit",
            "1GiB",
            "--cluster-memory-limit",
            "4294967296",
            "--spawn-delay",
            "250ms",
            "--",
            "python3",
            "-m",
            "http.server",
            "{port}",
        ]);
        assert_eq!(r.name.name, "chat");
        assert_eq!(r.backend, BackendKind::Iptables);
        assert_eq!(r.listen.len(), 2);
        assert_eq!(r.worker_count(), 8);
        assert_eq!(r.iface, vec!["eth0"]);
        assert_eq!(r.band_shift, 8);
        assert_eq!(r.worker_rss_limit, 1 << 30);
        assert_eq!(r.cluster_memory_limit, 1 << 32);
        assert_eq!(r.spawn_delay, Duration::from_millis(250));
        assert_eq!(r.command, vec!["python3", "-m", "http.server", "{port}"]);
    }

    #[test]
    fn workers_must_be_a_power_of_two() {
        let e = parse(&["run", "--workers", "3"]).expect_err("3 is not a power of two");
        assert!(e.contains("invalid worker count 3"), "{e}");
        assert!(e.contains("power of two"), "{e}");
        assert!(e.contains("try 2"), "{e}");
        let e = parse(&["run", "--workers", "0"]).expect_err("0 workers");
        assert!(e.contains("invalid worker count 0"), "{e}");
        let e = parse(&["run", "--workers", "512"]).expect_err("too many");
        assert!(e.contains("between 1 and 256"), "{e}");
        let e = parse(&["run", "--workers", "four"]).expect_err("not a number");
        assert!(e.contains("\"four\""), "{e}");
    }

    #[test]
    fn listen_must_be_ip_and_port() {
        for bad in [
            "localhost:8080",
            "127.0.0.1",
            "127.0.0.1:99999",
            "300.0.0.1:80",
            ":80",
        ] {
            let e = parse(&["run", "--listen", bad]).expect_err(bad);
            assert!(
                e.contains(&format!("invalid listen address {bad:?}")),
                "{e}"
            );
        }
        let e = parse(&["run", "--listen", "127.0.0.1:0"]).expect_err("port 0");
        assert!(e.contains("port 0"), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("448MiB"), Ok(448 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        for bad in ["lots", "12XB", "-5MiB", "0", ""] {
            let flag = format!("--worker-rss-limit={bad}");
            let e = parse(&["run", &flag]).expect_err(bad);
            assert!(e.contains(&format!("invalid size {bad:?}")), "{bad}: {e}");
        }
    }

    #[test]
    fn backend_is_ebpf_or_iptables() {
        let e = parse(&["run", "--backend", "nftables"]).expect_err("unknown backend");
        assert!(e.contains("nftables"), "{e}");
        assert!(e.contains("ebpf") && e.contains("iptables"), "{e}");
    }

    #[test]
    fn names_durations_ranges() {
        let e = parse(&["status", "--name", "a/b"]).expect_err("slash");
        assert!(e.contains("invalid cluster name \"a/b\""), "{e}");
        let e = parse(&["run", "--spawn-delay", "soon"]).expect_err("duration");
        assert!(e.contains("invalid duration \"soon\""), "{e}");
        let e = parse(&["run", "--port-range", "3000-2000"]).expect_err("range");
        assert!(e.contains("invalid port range \"3000-2000\""), "{e}");
        let e = parse(&["run", "--band-shift", "32"]).expect_err("shift");
        assert!(e.contains("32"), "{e}");
        assert!(matches!(
            parse(&["kill-retired", "-n", "x"]).map(|c| c.command),
            Ok(Command::KillRetired(_))
        ));
        assert!(matches!(
            parse(&["stop"]).map(|c| c.command),
            Ok(Command::Stop(_))
        ));
        let s = parse(&["status", "--json"]).expect("status");
        assert!(matches!(
            s.command,
            Command::Status(StatusArgs { json: true, .. })
        ));
    }
}
