//! The registry of a cluster's workers, `/run/ipcluster/<name>/workers.json`:
//! for each worker its pid and start time (together they name one process for
//! the host's uptime), band, generation, ports, uid, process group and session.
//! The master rewrites it atomically on every change; the next master adopts
//! from it, `stop` and `status` read it when no master runs. Unlike a
//! process's environment, which servers that set their title (nginx,
//! postgres) overwrite, nobody but root can change it (the state directory is
//! root's and closed to others).

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// One worker as the registry records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryEntry {
    pub pid: i32,
    /// /proc/PID/stat `starttime` (clock ticks after boot).
    pub start_time: u64,
    pub band: u32,
    pub generation: u64,
    /// (public port, worker port), one per public port; the first is `$PORT`.
    pub ports: Vec<(u16, u16)>,
    /// The real uid it runs as.
    pub uid: u32,
    /// Its process group and session (it leads both: the same as `pid`).
    pub pgid: i32,
    pub session: i32,
}

/// Every worker of one cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registry {
    pub cluster: String,
    /// The uid workers of this cluster are started as (`--user`, else the
    /// master's): a process found only by its environment must have it.
    pub worker_uid: u32,
    /// The newest generation a master of this cluster started.
    pub generation: u64,
    pub workers: Vec<RegistryEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot read the worker registry {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "the worker registry {path} is damaged ({source}); move it away to adopt by environment only"
    )]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

impl Registry {
    /// `Ok(None)` when there is no registry (a cluster of an older version,
    /// or none at all).
    pub fn load(path: &Path) -> Result<Option<Registry>, RegistryError> {
        read_json(path).map_err(|e| match e {
            JsonFileError::Read(source) => RegistryError::Read {
                path: path.display().to_string(),
                source,
            },
            JsonFileError::Parse(source) => RegistryError::Parse {
                path: path.display().to_string(),
                source,
            },
        })
    }

    /// Replace the file at `path` atomically.
    pub fn save(&self, path: &Path) -> Result<(), RegistryError> {
        write_json_atomically(path, self).map_err(|source| RegistryError::Write {
            path: path.display().to_string(),
            source,
        })
    }

    pub fn entry(&self, pid: i32) -> Option<&RegistryEntry> {
        self.workers.iter().find(|e| e.pid == pid)
    }
}

/// Why a master's JSON file (the registry, the cluster state) could not be read.
#[derive(Debug)]
pub enum JsonFileError {
    Read(std::io::Error),
    Parse(serde_json::Error),
}

/// Read a master's JSON file; `Ok(None)` when it does not exist.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, JsonFileError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(JsonFileError::Read(source)),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(JsonFileError::Parse)
}

/// Write `value` as pretty JSON with a final newline, atomically
/// (see [`write_atomically`]).
pub fn write_json_atomically<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
    write_atomically(path, format!("{text}\n").as_bytes())
}

/// Write `bytes` to `path` so that readers see the old file or the new one,
/// never a part: a temporary file beside it with an unpredictable name,
/// created exclusively (mode 0600), synced, then renamed over `path`.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other(format!("{} has no directory", path.display())))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for _ in 0..8 {
        let tmp = dir.join(format!(".{name}.{:016x}", random_u64()?));
        let mut file = match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
        {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        };
        let written = file
            .write_all(bytes)
            .and_then(|()| file.sync_data())
            .and_then(|()| std::fs::rename(&tmp, path));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        return written;
    }
    Err(std::io::Error::other(format!(
        "no free temporary name beside {}",
        path.display()
    )))
}

/// 64 bits from the kernel's random source (temporary file names).
fn random_u64() -> std::io::Result<u64> {
    let mut bytes = [0u8; 8];
    let n = rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty())?;
    if n != bytes.len() {
        return Err(std::io::Error::other(format!(
            "getrandom gave {n} bytes, not {}",
            bytes.len()
        )));
    }
    Ok(u64::from_ne_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "ipcluster-registry-{tag}-{}-{:x}",
            std::process::id(),
            random_u64().expect("random")
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    #[test]
    fn registry_round_trips_and_leaves_no_temporary_file() {
        let dir = temp_dir("roundtrip");
        let path = dir.join("workers.json");
        assert_eq!(Registry::load(&path).expect("missing is fine"), None);
        let registry = Registry {
            cluster: "chat".into(),
            worker_uid: 33,
            generation: 4,
            workers: vec![RegistryEntry {
                pid: 4242,
                start_time: 123_456,
                band: 1,
                generation: 4,
                ports: vec![(8080, 20001), (8443, 20002)],
                uid: 33,
                pgid: 4242,
                session: 4242,
            }],
        };
        registry.save(&path).expect("save");
        registry.save(&path).expect("save again over it");
        let loaded = Registry::load(&path).expect("load").expect("present");
        assert_eq!(loaded, registry);
        assert_eq!(loaded.entry(4242).map(|e| e.band), Some(1));
        let names: Vec<String> = std::fs::read_dir(&dir)
            .expect("list")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["workers.json".to_owned()]);
        std::fs::write(&path, "{\"cluster\":").expect("write");
        assert!(matches!(
            Registry::load(&path),
            Err(RegistryError::Parse { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_write_that_cannot_finish_leaves_the_old_file() {
        let dir = temp_dir("fail");
        let path = dir.join("workers.json");
        write_atomically(&path, b"old\n").expect("first write");
        // A directory in the way of the rename: the write fails, the file stays.
        let blocked = dir.join("sub");
        std::fs::create_dir_all(blocked.join("x")).expect("dir");
        assert!(write_atomically(&blocked, b"new\n").is_err());
        assert_eq!(std::fs::read(&path).expect("read"), b"old\n");
        assert_eq!(
            std::fs::read_dir(&dir).expect("list").flatten().count(),
            2,
            "the temporary file was removed"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
