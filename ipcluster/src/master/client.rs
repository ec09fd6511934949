//! The operator's side of the control socket: `ipcluster status`, `stop`
//! and `kill-retired`, and a reloading master's `shutdown` request. When no
//! master runs, `status` and `stop` work from the state file and /proc.

use std::io::Write as _;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use super::adopt;
use super::kill::{self, stop_workers};
use super::lock::ClusterLock;
use super::process_tree::ProcessTable;
use super::state::ClusterState;
use super::status;
use crate::cli::StatusArgs;
use crate::paths;
use crate::protocol::{self, AdminReply, AdminRequest, LineReader, StatusReport};
use crate::steering;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no master answers on {path}: {source}")]
    NoMaster {
        path: String,
        source: std::io::Error,
    },
    #[error("talking to the master on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("the master on {path} closed the connection without answering")]
    NoReply { path: String },
    #[error("the master on {path} answered with {source}")]
    BadReply {
        path: String,
        source: protocol::LineError,
    },
}

/// Send one request and return the master's one-line reply.
pub fn request(
    cluster: &str,
    request: &AdminRequest,
    timeout: Duration,
) -> Result<String, ClientError> {
    request_at(&paths::control_socket(cluster), request, timeout)
}

/// [`request`] on the control socket at `path`.
fn request_at(
    path: &std::path::Path,
    request: &AdminRequest,
    timeout: Duration,
) -> Result<String, ClientError> {
    let shown = path.display().to_string();
    let io = |source| ClientError::Io {
        path: shown.clone(),
        source,
    };
    let mut stream = UnixStream::connect(path).map_err(|source| ClientError::NoMaster {
        path: shown.clone(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = protocol::to_line(request).map_err(|e| io(std::io::Error::other(e)))?;
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io)?;
    let reply = match LineReader::for_replies(&stream).read_line() {
        Ok(Some(reply)) if !reply.trim().is_empty() => reply,
        Ok(_) => return Err(ClientError::NoReply { path: shown }),
        Err(protocol::LineError::Io(source)) => return Err(io(source)),
        Err(source) => {
            return Err(ClientError::BadReply {
                path: shown,
                source,
            });
        }
    };
    Ok(reply)
}

fn ok_or_bail(reply: &str) -> Result<String> {
    match serde_json::from_str::<AdminReply>(reply) {
        Ok(AdminReply::Ok { message }) => Ok(message),
        Ok(AdminReply::Error { message }) => bail!("the master refused: {message}"),
        Err(e) => bail!("unexpected reply from the master ({e}): {reply}"),
    }
}

/// `ipcluster status [--json]`.
pub fn status_command(args: &StatusArgs) -> Result<()> {
    let cluster = &args.name.name;
    let report = match request(cluster, &AdminRequest::Status, Duration::from_secs(10)) {
        Ok(reply) => serde_json::from_str::<StatusReport>(&reply)
            .with_context(|| format!("unexpected status reply from the master: {reply}"))?,
        Err(e) => {
            let Some(state) = ClusterState::load(&paths::state_file(cluster))? else {
                bail!(
                    "cluster {cluster:?} is not running: no state in {} ({e}); start it with \
                     `ipcluster run --name {cluster}`, or check the name",
                    paths::state_dir(cluster).display()
                );
            };
            log::warn!(
                "no master of cluster {cluster:?} answers ({e}); reading /proc and the kernel"
            );
            status::offline_report(&state)?
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", status::render(&report));
    }
    Ok(())
}

/// `ipcluster kill-retired`.
pub fn kill_retired_command(cluster: &str) -> Result<()> {
    let reply = request(cluster, &AdminRequest::KillRetired, Duration::from_secs(10))
        .with_context(|| {
            format!(
                "cluster {cluster:?} has no running master (start one with `ipcluster run --name {cluster}`)"
            )
        })?;
    println!("{}", ok_or_bail(&reply)?);
    Ok(())
}

/// `ipcluster stop`: through the master when one runs, by ourselves otherwise.
pub fn stop_command(cluster: &str) -> Result<()> {
    let dir = paths::state_dir(cluster);
    let state = ClusterState::load(&paths::state_file(cluster))?;
    if dir.exists() {
        let lock = ClusterLock::try_acquire(cluster)?;
        if lock.is_none() {
            let timeout =
                Duration::from_millis(state.as_ref().map_or(5000, |s| s.soft_kill_timeout_ms))
                    + Duration::from_secs(30);
            let reply = request(cluster, &AdminRequest::Stop, timeout)
                .with_context(|| format!("asking the master of cluster {cluster:?} to stop"))?;
            println!("{}", ok_or_bail(&reply)?);
            // The master exits right after answering: return when it is gone.
            let master = state.as_ref().map(|s| s.master_pid);
            for _ in 0..250 {
                if !dir.exists() && master.is_none_or(|pid| !super::kill::is_running(pid)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            return Ok(());
        }
        stop_without_master(cluster, state.as_ref())?;
        drop(lock);
        return Ok(());
    }
    let strays = find_offline(cluster, None)?;
    if strays.is_empty() {
        bail!(
            "cluster {cluster:?} is not running: no state in {} and no workers",
            dir.display()
        );
    }
    stop_without_master(cluster, None)
}

fn stop_without_master(cluster: &str, state: Option<&ClusterState>) -> Result<()> {
    let workers = find_offline(cluster, state)?;
    let pids: Vec<i32> = workers.iter().map(|a| a.worker.pid).collect();
    let targets: Vec<kill::Target<'_>> = workers
        .iter()
        .map(|a| kill::Target {
            pid: a.worker.pid,
            pidfd: &a.pidfd,
        })
        .collect();
    let soft_kill = Duration::from_millis(state.map_or(5000, |s| s.soft_kill_timeout_ms));
    log::info!(
        "cluster {cluster:?}: no master runs; stopping {} workers {pids:?}",
        pids.len()
    );
    let killed = stop_workers(&targets, soft_kill);
    if let Some(state) = state {
        let mut steering =
            steering::backend(state.backend, state.steering_config()).with_context(|| {
                format!(
                    "opening the {} steering of cluster {cluster:?}",
                    state.backend
                )
            })?;
        steering.teardown().with_context(|| {
            format!(
                "removing the {} steering of cluster {cluster:?}",
                state.backend
            )
        })?;
    } else {
        log::warn!("cluster {cluster:?} has no state file: no steering state to remove");
    }
    let dir = paths::state_dir(cluster);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    println!(
        "cluster {cluster:?} stopped: {} workers ended ({killed} with SIGKILL), steering removed",
        pids.len()
    );
    Ok(())
}

/// The cluster's workers when no master runs: from the registry, else (or in
/// addition) by environment from processes of the recorded worker uid (root's
/// when there is no registry).
pub fn find_offline(cluster: &str, state: Option<&ClusterState>) -> Result<Vec<adopt::Adopted>> {
    let registry = super::identity::load_registry(cluster);
    let newest = super::identity::newest_generation(state.map(|s| s.generation), registry.as_ref());
    let worker_uid = registry
        .as_ref()
        .map_or_else(|| super::identity::worker_uid(None), |r| r.worker_uid);
    Ok(adopt::discover(
        &adopt::Expect {
            cluster,
            registry: registry.as_ref(),
            worker_uid,
            newest_generation: newest,
        },
        &ProcessTable::read()?,
        &[],
    ))
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead as _, BufReader};
    use std::os::unix::net::UnixListener;

    use super::*;
    use crate::protocol::MAX_REPLY;

    /// A master that answers one request with `reply` (and a newline).
    fn answer_with(reply: Vec<u8>) -> Result<String, ClientError> {
        let dir = std::env::temp_dir().join(format!("ipcluster-client-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(format!("control-{}.sock", reply.len()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind");
        let master = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("accept");
            let mut request = String::new();
            BufReader::new(&stream)
                .read_line(&mut request)
                .expect("request");
            assert_eq!(request, "{\"type\":\"status\"}\n");
            let _ = stream.write_all(&reply);
            let _ = stream.write_all(b"\n");
        });
        let answer = request_at(&path, &AdminRequest::Status, Duration::from_secs(10));
        master.join().expect("fake master");
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_dir(&dir);
        answer
    }

    #[test]
    fn replies_are_read_up_to_the_protocol_limit() {
        let at_limit = answer_with(vec![b'x'; MAX_REPLY]).expect("a reply at the limit");
        assert_eq!(at_limit.len(), MAX_REPLY);
        let e = answer_with(vec![b'x'; MAX_REPLY + 1]).expect_err("one byte over");
        assert!(matches!(e, ClientError::BadReply { .. }), "{e:?}");
        let shown = e.to_string();
        assert!(
            shown.contains(&format!("a line longer than {MAX_REPLY} bytes"))
                && shown.contains(".sock"),
            "{shown}"
        );
        let e = answer_with(Vec::new()).expect_err("an empty reply");
        assert!(matches!(e, ClientError::NoReply { .. }), "{e:?}");
    }
}
