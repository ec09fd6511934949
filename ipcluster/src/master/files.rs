//! The directories ipcluster keeps its state in (`/run/ipcluster`, each
//! cluster's state directory, the bpffs pin root) decide what the next master
//! adopts and signals: whoever may write there could plant a registry or
//! swap a socket. So they must be owned by root (or the master's user) and
//! not writable by group or others, and must not be symlinks; otherwise
//! ipcluster refuses to use them rather than trust them.

use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("cannot create or inspect {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "refusing to use {path}: {why}; it must be a directory owned by root and writable by \
         its owner only (fix: `chown root:root {path} && chmod 755 {path}`, or remove it)"
    )]
    Unsafe { path: String, why: String },
}

/// Why a directory with these properties is not safe, if it is not.
pub fn judge(is_dir: bool, is_symlink: bool, uid: u32, mode: u32, euid: u32) -> Option<String> {
    if is_symlink {
        return Some("it is a symbolic link".into());
    }
    if !is_dir {
        return Some("it is not a directory".into());
    }
    if uid != 0 && uid != euid {
        return Some(format!("it is owned by uid {uid}"));
    }
    if mode & 0o022 != 0 {
        return Some(format!(
            "it is writable by {} (mode {:04o})",
            if mode & 0o002 != 0 {
                "anyone"
            } else {
                "its group"
            },
            mode & 0o7777
        ));
    }
    None
}

/// Check that `path` is a safe directory (see the module documentation).
pub fn check_dir(path: &Path) -> Result<(), DirError> {
    let meta = std::fs::symlink_metadata(path).map_err(|source| DirError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let euid = rustix::process::geteuid().as_raw();
    match judge(
        meta.is_dir(),
        meta.file_type().is_symlink(),
        meta.uid(),
        meta.mode(),
        euid,
    ) {
        None => Ok(()),
        Some(why) => Err(DirError::Unsafe {
            path: path.display().to_string(),
            why,
        }),
    }
}

/// Create `path` (mode 0755) if missing, then [`check_dir`] it. Returns
/// whether it was created.
pub fn ensure_dir(path: &Path) -> Result<bool, DirError> {
    let created = match std::fs::DirBuilder::new().mode(0o755).create(path) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
        Err(source) => {
            return Err(DirError::Io {
                path: path.display().to_string(),
                source,
            });
        }
    };
    check_dir(path)?;
    Ok(created)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_private_directories_of_root_are_trusted() {
        assert_eq!(judge(true, false, 0, 0o40755, 0), None);
        assert_eq!(
            judge(true, false, 1000, 0o40700, 1000),
            None,
            "the master's own user"
        );
        assert!(judge(true, false, 1000, 0o40755, 0).is_some_and(|w| w.contains("uid 1000")));
        assert!(judge(true, false, 0, 0o40777, 0).is_some_and(|w| w.contains("anyone")));
        assert!(judge(true, false, 0, 0o41777, 0).is_some_and(|w| w.contains("1777")));
        assert!(judge(true, false, 0, 0o40775, 0).is_some_and(|w| w.contains("group")));
        assert!(judge(true, true, 0, 0o40755, 0).is_some_and(|w| w.contains("symbolic")));
        assert!(judge(false, false, 0, 0o100644, 0).is_some());
    }

    #[test]
    fn a_directory_open_to_others_is_refused_by_name() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("ipcluster-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(ensure_dir(&dir).expect("created"));
        assert!(!ensure_dir(&dir).expect("exists and is fine"));
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let err = check_dir(&dir).expect_err("world-writable");
        let shown = err.to_string();
        assert!(shown.contains(&dir.display().to_string()), "{shown}");
        assert!(shown.contains("writable by anyone"), "{shown}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
