//! Starting a worker: its command line (`{port}`, `{band}` replaced), its
//! environment (docs/design.md, "A worker's environment"), its own session (so it outlives the
//! master), its user (groups, then gid, then uid), and free ports for it.

use std::collections::HashSet;
use std::ffi::CString;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::ops::RangeInclusive;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use rustix::process::{Gid, Uid};

use crate::protocol::env as vars;

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error(
        "worker command {0:?} not found: it is neither an executable path nor a program in PATH"
    )]
    NotFound(String),
    #[error(
        "worker command {0:?} is not executable: make it executable (chmod +x) or run it through its interpreter"
    )]
    NotExecutable(String),
    #[error(
        "user {0:?} does not exist: give --user an existing user (`getent passwd` lists them) or create it"
    )]
    NoSuchUser(String),
    #[error("cannot look up user {user:?}: {source}")]
    UserLookup { user: String, source: nix::Error },
    #[error("cannot start worker {program} for band {band}: {source}")]
    Start {
        program: String,
        band: u32,
        source: std::io::Error,
    },
    #[error("no free port left in {first}-{last}")]
    NoFreePort { first: u16, last: u16 },
    #[error("--env {0:?}: {1}")]
    BadEnv(String, &'static str),
    #[error(
        "--env {0}: {0} is not set in the master's environment; give it a value with --env {0}=VALUE"
    )]
    EnvNotSet(String),
    #[error("cannot read the directory `run` was started in: {0}")]
    NoWorkingDirectory(std::io::Error),
}

/// Variables a worker gets from the master's environment when set there
/// (besides every `LC_*`): what servers commonly need. Everything else
/// comes only through `--env` (and ipcluster's own variables).
pub const KEPT_VARIABLES: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "RUST_LOG",
    "RUST_BACKTRACE",
];

/// The worker environment taken from `master_env`: [`KEPT_VARIABLES`] and
/// `LC_*`, then each `--env KEY=VALUE` (or `--env KEY`, the master's value).
pub fn base_environment(
    master_env: &[(String, String)],
    extra: &[String],
) -> Result<Vec<(String, String)>, SpawnError> {
    let mut env: Vec<(String, String)> = master_env
        .iter()
        .filter(|(k, _)| KEPT_VARIABLES.contains(&k.as_str()) || k.starts_with("LC_"))
        .cloned()
        .collect();
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()));
    }
    for item in extra {
        let (key, value) = match item.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => {
                let value = master_env
                    .iter()
                    .find(|(k, _)| k == item)
                    .map(|(_, v)| v.clone())
                    .ok_or_else(|| SpawnError::EnvNotSet(item.clone()))?;
                (item.clone(), value)
            }
        };
        if key.is_empty() || key.contains('\0') || value.contains('\0') {
            return Err(SpawnError::BadEnv(item.clone(), "not a KEY or KEY=VALUE"));
        }
        if vars::is_reserved(&key) {
            return Err(SpawnError::BadEnv(
                item.clone(),
                "PORT and IPCLUSTER_* are set by ipcluster for each worker",
            ));
        }
        env.retain(|(k, _)| *k != key);
        env.push((key, value));
    }
    Ok(env)
}

/// The program every worker runs, resolved once at start-up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerCommand {
    pub program: PathBuf,
    /// Arguments with `{port}` and `{band}` still in them.
    pub args: Vec<String>,
    /// The directory `run` was started in: the workers' working directory
    /// (`/` for a worker user that may not enter it).
    pub dir: PathBuf,
    /// The environment every worker starts from ([`base_environment`]).
    pub env: Vec<(String, String)>,
}

impl WorkerCommand {
    /// `CMD ARGS` from the command line, or the built-in demo worker
    /// (this binary's hidden `demo-worker` subcommand) when empty.
    pub fn from_cli(command: &[String], extra_env: &[String]) -> Result<WorkerCommand, SpawnError> {
        let dir = std::env::current_dir().map_err(SpawnError::NoWorkingDirectory)?;
        let master_env: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect();
        let env = base_environment(&master_env, extra_env)?;
        let Some((program, args)) = command.split_first() else {
            let exe = std::env::current_exe()
                .map_err(|_| SpawnError::NotFound("/proc/self/exe".into()))?;
            return Ok(WorkerCommand {
                program: exe,
                args: vec!["demo-worker".into()],
                dir,
                env,
            });
        };
        let program = resolve_program(program, std::env::var_os("PATH").as_deref())?;
        Ok(WorkerCommand {
            // `./server` means the one in the directory `run` was started in.
            program: dir.join(program),
            args: args.to_vec(),
            dir,
            env,
        })
    }

    /// The arguments for one worker.
    pub fn args_for(&self, port: u16, band: u32) -> Vec<String> {
        self.args
            .iter()
            .map(|a| {
                a.replace("{port}", &port.to_string())
                    .replace("{band}", &band.to_string())
            })
            .collect()
    }
}

/// Find `program` like a shell would: a path with a slash as is, otherwise
/// the first executable file of that name in `path`.
pub fn resolve_program(
    program: &str,
    path: Option<&std::ffi::OsStr>,
) -> Result<PathBuf, SpawnError> {
    if program.is_empty() {
        return Err(SpawnError::NotFound(program.into()));
    }
    if program.contains('/') {
        let p = PathBuf::from(program);
        return if !p.is_file() {
            Err(SpawnError::NotFound(program.into()))
        } else if !is_executable(&p) {
            Err(SpawnError::NotExecutable(program.into()))
        } else {
            Ok(p)
        };
    }
    let path = path.unwrap_or_else(|| std::ffi::OsStr::new("/usr/local/bin:/usr/bin:/bin"));
    std::env::split_paths(path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file() && is_executable(candidate))
        .ok_or_else(|| SpawnError::NotFound(program.into()))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o111 != 0)
}

/// Who workers run as (`--user`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl RunAs {
    pub fn lookup(name: &str) -> Result<RunAs, SpawnError> {
        let user = nix::unistd::User::from_name(name)
            .map_err(|source| SpawnError::UserLookup {
                user: name.into(),
                source,
            })?
            .ok_or_else(|| SpawnError::NoSuchUser(name.into()))?;
        let cname = CString::new(name).map_err(|_| SpawnError::NoSuchUser(name.into()))?;
        let groups = nix::unistd::getgrouplist(&cname, user.gid)
            .map_err(|source| SpawnError::UserLookup {
                user: name.into(),
                source,
            })?
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        Ok(RunAs {
            name: name.into(),
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            groups,
        })
    }
}

/// Everything that differs between two workers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerSpec {
    pub cluster: String,
    pub band: u32,
    pub bands: u32,
    pub generation: u64,
    pub control_socket: PathBuf,
    /// (public port, worker port), one per distinct public port; the first is `$PORT`.
    pub ports: Vec<(u16, u16)>,
}

impl WorkerSpec {
    /// The worker's environment (docs/design.md, "A worker's environment").
    pub fn environment(&self) -> Vec<(String, String)> {
        let mut env = Vec::new();
        if let Some((_, first)) = self.ports.first() {
            env.push((vars::PORT.into(), first.to_string()));
        }
        for (public, local) in &self.ports {
            env.push((vars::port_var(*public), local.to_string()));
        }
        env.push((vars::BAND.into(), self.band.to_string()));
        env.push((vars::WORKERS.into(), self.bands.to_string()));
        env.push((vars::GENERATION.into(), self.generation.to_string()));
        env.push((vars::NAME.into(), self.cluster.clone()));
        env.push((
            vars::CONTROL.into(),
            self.control_socket.display().to_string(),
        ));
        env
    }
}

/// A worker just started, held by a pidfd opened before anyone could reap it.
#[derive(Debug)]
pub struct Spawned {
    pub pid: i32,
    pub pidfd: std::os::fd::OwnedFd,
    /// /proc/PID/stat `starttime` (0 if it exited at once).
    pub start_time: u64,
}

/// Start one worker in its own session. The child is not waited for here:
/// the master watches it with its pidfd and reaps it.
pub fn spawn_worker(
    command: &WorkerCommand,
    spec: &WorkerSpec,
    run_as: Option<&RunAs>,
) -> Result<Spawned, SpawnError> {
    let first_port = spec.ports.first().map_or(0, |(_, local)| *local);
    let mut cmd = Command::new(&command.program);
    cmd.args(command.args_for(first_port, spec.band))
        .stdin(Stdio::null())
        .current_dir("/");
    // Only the documented environment: nothing of the master's leaks through
    // (least of all another cluster's IPCLUSTER_* identity).
    cmd.env_clear();
    cmd.envs(command.env.iter().map(|(k, v)| (k, v)));
    cmd.envs(spec.environment());
    let dir = CString::new(command.dir.as_os_str().as_encoded_bytes()).ok();
    let ids = run_as.map(|r| {
        let groups: Vec<Gid> = r.groups.iter().map(|&g| Gid::from_raw(g)).collect();
        (Uid::from_raw(r.uid), Gid::from_raw(r.gid), groups)
    });
    if let Some(r) = run_as
        && let Some(home) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(r.uid))
            .ok()
            .flatten()
    {
        cmd.env("HOME", home.dir)
            .env("USER", &r.name)
            .env("LOGNAME", &r.name);
    }
    // SAFETY: pre_exec is unsafe by std's contract (the closure runs in the
    // forked child). It only makes system calls, which are async-signal-safe,
    // on data prepared before the fork (no allocation). rustix's set*id calls
    // change the calling thread only: the child has no other thread.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::setsid()?;
            if let Some((uid, gid, groups)) = &ids {
                rustix::thread::set_thread_groups(groups)?;
                rustix::thread::set_thread_gid(*gid)?;
                rustix::thread::set_thread_uid(*uid)?;
            }
            // As the worker's user: the run directory if it may enter it.
            if let Some(dir) = &dir
                && rustix::process::chdir(dir.as_c_str()).is_err()
            {
                let _ = rustix::process::chdir(c"/");
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|source| SpawnError::Start {
        program: command.program.display().to_string(),
        band: spec.band,
        source,
    })?;
    // Dropping `Child` neither kills nor waits: the master reaps by pid. Until
    // then the pid stays ours, so the pidfd opened here names this child.
    let start_err = |source| SpawnError::Start {
        program: command.program.display().to_string(),
        band: spec.band,
        source,
    };
    let pid = i32::try_from(child.id())
        .map_err(|_| start_err(std::io::Error::other("pid out of range")))?;
    let pidfd = match super::pidfd::pidfd_open(pid) {
        Ok(fd) => fd,
        Err(e) => {
            // Without a pidfd it could never be signalled: end it now.
            let _ = child.kill();
            let _ = child.wait();
            return Err(start_err(e));
        }
    };
    let start_time = super::pidfd::start_time(pid).unwrap_or(0);
    Ok(Spawned {
        pid,
        pidfd,
        start_time,
    })
}

/// Hands out worker ports from `--port-range`, walking the range so that a
/// port freed a moment ago is not handed out again at once.
#[derive(Clone, Debug)]
pub struct PortAllocator {
    range: RangeInclusive<u16>,
    cursor: u32,
}

impl PortAllocator {
    /// `offset` spreads consecutive masters over the range (e.g. the generation).
    pub fn new(range: RangeInclusive<u16>, offset: u32) -> PortAllocator {
        let span = u32::from(*range.end() - *range.start()) + 1;
        PortAllocator {
            range,
            cursor: offset % span,
        }
    }

    /// The next port that is not in `taken` and that `is_free` accepts.
    pub fn allocate_with(
        &mut self,
        taken: &HashSet<u16>,
        mut is_free: impl FnMut(u16) -> bool,
    ) -> Result<u16, SpawnError> {
        let first = *self.range.start();
        let span = u32::from(*self.range.end() - first) + 1;
        for _ in 0..span {
            let port = first + (self.cursor % span) as u16;
            self.cursor = (self.cursor + 1) % span;
            if !taken.contains(&port) && is_free(port) {
                return Ok(port);
            }
        }
        Err(SpawnError::NoFreePort {
            first,
            last: *self.range.end(),
        })
    }

    /// Like [`Self::allocate_with`], checking that TCP can bind the port on
    /// every IPv4 and IPv6 address.
    pub fn allocate(&mut self, taken: &HashSet<u16>) -> Result<u16, SpawnError> {
        self.allocate_with(taken, port_is_free)
    }
}

/// Nobody is bound to `port` on `0.0.0.0` or `[::]` (IPv6 may be disabled).
pub fn port_is_free(port: u16) -> bool {
    if TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))).is_err() {
        return false;
    }
    match TcpListener::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))) {
        Ok(_) => true,
        Err(e) => e.kind() != std::io::ErrorKind::AddrInUse,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_replaced() {
        let c = WorkerCommand {
            dir: "/".into(),
            env: Vec::new(),
            program: "/usr/bin/python3".into(),
            args: vec![
                "-m".into(),
                "http.server".into(),
                "{port}".into(),
                "b{band}-{port}".into(),
            ],
        };
        assert_eq!(
            c.args_for(20001, 3),
            vec!["-m", "http.server", "20001", "b3-20001"]
        );
    }

    #[test]
    fn environment_names_every_port() {
        let spec = WorkerSpec {
            cluster: "chat".into(),
            band: 2,
            bands: 4,
            generation: 9,
            control_socket: "/run/ipcluster/chat/control.sock".into(),
            ports: vec![(8080, 20002), (8443, 20003)],
        };
        let env = spec.environment();
        let get = |k: &str| {
            env.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("PORT"), Some("20002"));
        assert_eq!(get("IPCLUSTER_PORT_8080"), Some("20002"));
        assert_eq!(get("IPCLUSTER_PORT_8443"), Some("20003"));
        assert_eq!(get("IPCLUSTER_BAND"), Some("2"));
        assert_eq!(get("IPCLUSTER_WORKERS"), Some("4"));
        assert_eq!(get("IPCLUSTER_GENERATION"), Some("9"));
        assert_eq!(get("IPCLUSTER_NAME"), Some("chat"));
        assert_eq!(
            get("IPCLUSTER_CONTROL"),
            Some("/run/ipcluster/chat/control.sock")
        );
    }

    #[test]
    fn the_environment_is_the_documented_one_plus_env_flags() {
        let master: Vec<(String, String)> = [
            ("PATH", "/bin"),
            ("LC_ALL", "C.UTF-8"),
            ("SECRET_TOKEN", "x"),
            ("DATABASE_URL", "pg://db"),
            ("IPCLUSTER_NAME", "other"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        let env = base_environment(
            &master,
            &["DATABASE_URL".into(), "MODE=prod".into(), "EMPTY=".into()],
        )
        .expect("valid --env");
        let get = |k: &str| {
            env.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("PATH"), Some("/bin"));
        assert_eq!(get("LC_ALL"), Some("C.UTF-8"));
        assert_eq!(get("SECRET_TOKEN"), None, "not passed unless asked");
        assert_eq!(get("IPCLUSTER_NAME"), None);
        assert_eq!(get("DATABASE_URL"), Some("pg://db"));
        assert_eq!(get("MODE"), Some("prod"));
        assert_eq!(get("EMPTY"), Some(""));
        assert!(matches!(
            base_environment(&master, &["NOT_SET".into()]),
            Err(SpawnError::EnvNotSet(k)) if k == "NOT_SET"
        ));
        for bad in ["PORT=1", "IPCLUSTER_BAND=3", "=x"] {
            assert!(
                matches!(
                    base_environment(&master, &[bad.into()]),
                    Err(SpawnError::BadEnv(..))
                ),
                "{bad}"
            );
        }
        let bare = base_environment(&[], &[]).expect("empty");
        assert_eq!(
            bare,
            vec![("PATH".to_owned(), "/usr/local/bin:/usr/bin:/bin".to_owned())]
        );
    }

    #[test]
    fn programs_are_resolved_in_path() {
        let path = std::ffi::OsStr::new("/nonexistent:/bin:/usr/bin");
        assert!(resolve_program("sh", Some(path)).is_ok());
        assert!(matches!(
            resolve_program("no-such-program-ipcluster", Some(path)),
            Err(SpawnError::NotFound(p)) if p == "no-such-program-ipcluster"
        ));
        assert!(matches!(
            resolve_program("/no/such/file", Some(path)),
            Err(SpawnError::NotFound(_))
        ));
        let plain = std::env::temp_dir().join(format!("ipcluster-plain-{}", std::process::id()));
        std::fs::write(&plain, "not a program").expect("temp file");
        let shown = plain.display().to_string();
        assert!(matches!(
            resolve_program(&shown, Some(path)),
            Err(SpawnError::NotExecutable(p)) if p == shown
        ));
        let _ = std::fs::remove_file(&plain);
    }

    #[test]
    fn ports_walk_the_range_and_skip_taken_ones() {
        let mut ports = PortAllocator::new(100..=103, 1);
        let taken = HashSet::from([102]);
        assert_eq!(ports.allocate_with(&taken, |_| true).ok(), Some(101));
        assert_eq!(ports.allocate_with(&taken, |_| true).ok(), Some(103));
        assert_eq!(ports.allocate_with(&taken, |p| p != 100).ok(), Some(101));
        assert!(matches!(
            ports.allocate_with(&taken, |_| false),
            Err(SpawnError::NoFreePort {
                first: 100,
                last: 103
            })
        ));
    }
}
