//! The control socket: a Unix stream socket in the state directory carrying
//! newline-delimited JSON, framed by [`crate::protocol::LineCodec`]. Each
//! connection's peer is identified by `SO_PEERCRED` (pid, uid); the event
//! loop decides what a peer may say. A line over the protocol's limit closes
//! that peer's connection (logged with its pid and uid); invalid UTF-8 and
//! (later) bad JSON are logged and dropped; nothing a peer sends ends the
//! master.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::codec::Decoder as _;

use crate::protocol::{LineCodec, LineError};

/// Connections of non-root peers open at once; more are refused (a
/// misbehaving client must not exhaust the master's file descriptors). Root's
/// connections are never refused, so `status` and `stop` always get through.
const MAX_CONNECTIONS: usize = 1024;
/// Connections one non-root uid may hold at once: one user's flood cannot
/// take the whole budget from the others.
const MAX_PER_UID: usize = 256;
/// A peer must send its first line (hello, or an operator's request) this
/// soon after connecting, or it is disconnected.
pub const IDENTIFY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// `text` from a peer, safe for logs and terminals: control characters
/// (escape sequences, newlines, carriage returns) and bidirectional
/// overrides are shown escaped, and it is cut to `max` characters.
pub fn printable(text: &str, max: usize) -> String {
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == max {
            out.push('…');
            break;
        }
        let bidi = matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if c.is_control() || bidi {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Who may open another connection: root always; another uid while it holds
/// fewer than [`MAX_PER_UID`] and non-root peers fewer than [`MAX_CONNECTIONS`].
pub fn admit(uid: u32, open_by_uid: usize, open_non_root: usize) -> Result<(), String> {
    if uid == 0 {
        return Ok(());
    }
    if open_by_uid >= MAX_PER_UID {
        return Err(format!(
            "uid {uid} already has {open_by_uid} connections open (at most {MAX_PER_UID} per user)"
        ));
    }
    if open_non_root >= MAX_CONNECTIONS {
        return Err(format!(
            "{open_non_root} connections of non-root peers are open (at most {MAX_CONNECTIONS})"
        ));
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot create the control socket {path}: {source}")]
    Bind {
        path: String,
        source: std::io::Error,
    },
}

/// What happens on the control socket, for the event loop.
#[derive(Debug)]
pub enum ControlEvent {
    Connected {
        conn: u64,
        pid: Option<i32>,
        uid: u32,
        /// Lines to send to this peer (without newline). Dropping it closes the connection.
        outgoing: mpsc::UnboundedSender<String>,
    },
    Line {
        conn: u64,
        line: String,
    },
    Disconnected {
        conn: u64,
    },
}

/// Bind the socket at `path` (replacing a stale one) so that only root and
/// `owner` (the workers' user, if not root) can connect: mode 0600, owned by `owner`.
pub fn bind(path: &Path, owner: Option<(u32, u32)>) -> Result<UnixListener, ControlError> {
    let err = |source| ControlError::Bind {
        path: path.display().to_string(),
        source,
    };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(err)?;
    }
    Ok(listener)
}

/// Accept connections forever, one task each.
pub async fn serve(listener: UnixListener, events: mpsc::UnboundedSender<ControlEvent>) {
    let open_non_root = Arc::new(AtomicUsize::new(0));
    let per_uid: Arc<Mutex<HashMap<u32, usize>>> = Arc::default();
    let mut next_conn: u64 = 1;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                log::warn!("control socket: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(cred) = stream.peer_cred() else {
            log::warn!("control socket: a connection without peer credentials; closing it");
            continue;
        };
        let uid = cred.uid();
        let open_by_uid = per_uid
            .lock()
            .map(|m| m.get(&uid).copied().unwrap_or(0))
            .unwrap_or(0);
        if let Err(why) = admit(uid, open_by_uid, open_non_root.load(Ordering::Relaxed)) {
            log::warn!(
                "control socket: refusing a connection of pid {}: {why}",
                cred.pid().map_or("?".into(), |p| p.to_string())
            );
            continue;
        }
        if let Ok(mut m) = per_uid.lock() {
            *m.entry(uid).or_insert(0) += 1;
        }
        if uid != 0 {
            open_non_root.fetch_add(1, Ordering::Relaxed);
        }
        let conn = next_conn;
        next_conn += 1;
        let (events, open_non_root, per_uid) =
            (events.clone(), open_non_root.clone(), per_uid.clone());
        tokio::spawn(async move {
            connection(stream, conn, &events).await;
            let _ = events.send(ControlEvent::Disconnected { conn });
            if uid != 0 {
                open_non_root.fetch_sub(1, Ordering::Relaxed);
            }
            if let Ok(mut m) = per_uid.lock()
                && let Some(n) = m.get_mut(&uid)
            {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&uid);
                }
            }
        });
    }
}

async fn connection(stream: UnixStream, conn: u64, events: &mpsc::UnboundedSender<ControlEvent>) {
    let Ok(cred) = stream.peer_cred() else {
        log::warn!("control socket: connection {conn} has no peer credentials; closing it");
        return;
    };
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<String>();
    if events
        .send(ControlEvent::Connected {
            conn,
            pid: cred.pid(),
            uid: cred.uid(),
            outgoing: out_tx,
        })
        .is_err()
    {
        return;
    }
    let who = format!(
        "{}, uid {}",
        cred.pid()
            .map_or("unknown pid".into(), |p| format!("pid {p}")),
        cred.uid()
    );
    let (mut reader, mut writer) = stream.into_split();
    let mut codec = LineCodec::default();
    let mut buf = BytesMut::with_capacity(8192);
    let identify_by = tokio::time::Instant::now() + IDENTIFY_TIMEOUT;
    let mut identified = false;
    loop {
        // Room for the next read (read_buf alone would grow the buffer by 64 bytes).
        buf.reserve(8192);
        tokio::select! {
            _ = tokio::time::sleep_until(identify_by), if !identified => {
                log::warn!(
                    "control socket ({who}): said nothing within {IDENTIFY_TIMEOUT:?} of \
                     connecting; closing the connection"
                );
                return;
            }
            read = reader.read_buf(&mut buf) => {
                // The end of the stream or a broken one: a last unterminated line is dropped.
                if matches!(read, Ok(0) | Err(_)) {
                    return;
                }
                loop {
                    match codec.decode(&mut buf) {
                        Ok(Some(line)) if line.trim().is_empty() => {}
                        Ok(Some(line)) => {
                            identified = true;
                            if events.send(ControlEvent::Line { conn, line }).is_err() {
                                return;
                            }
                        }
                        Ok(None) => break,
                        Err(e @ LineError::TooLong { .. }) => {
                            log::warn!("control socket ({who}): {e}; closing the connection");
                            return;
                        }
                        Err(e) => log::warn!("control socket ({who}): {e}; line dropped"),
                    }
                }
            }
            out = out_rx.recv() => {
                let Some(mut line) = out else { return };
                line.push('\n');
                if writer.write_all(line.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_text_is_escaped_and_cut() {
        assert_eq!(printable("leak", 10), "leak");
        assert_eq!(
            printable("a\nb\r\u{1b}[31mred\u{202e}x", 100),
            "a\\nb\\r\\u{1b}[31mred\\u{202e}x"
        );
        assert_eq!(printable("abcdef", 3), "abc…");
    }

    #[test]
    fn one_user_cannot_lock_root_out() {
        assert!(admit(0, 10_000, 10_000).is_ok());
        assert!(admit(1000, MAX_PER_UID - 1, 0).is_ok());
        let why = admit(1000, MAX_PER_UID, 0).expect_err("per-uid cap");
        assert!(why.contains("uid 1000"), "{why}");
        assert!(admit(1001, 0, MAX_CONNECTIONS).is_err());
    }

    /// A peer that sends a line over the limit is disconnected; the lines before
    /// it (one exactly at the limit) reach the event loop, nothing after it does.
    #[tokio::test]
    async fn an_over_long_line_closes_that_connection() {
        use crate::protocol::MAX_LINE;
        let (server, mut client) = UnixStream::pair().expect("socketpair");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let served = tokio::spawn(async move { connection(server, 7, &tx).await });
        let mut bytes = b"{\"type\":\"status\"}\n".to_vec();
        bytes.extend(std::iter::repeat_n(b'a', MAX_LINE));
        bytes.push(b'\n');
        bytes.extend(std::iter::repeat_n(b'b', MAX_LINE + 1));
        bytes.extend_from_slice(b"\n{\"type\":\"stop\"}\n");
        let writer = tokio::spawn(async move {
            // The master hangs up in the middle: the rest cannot be written.
            let _ = client.write_all(&bytes).await;
            let mut rest = Vec::new();
            let _ = client.read_to_end(&mut rest).await;
            rest
        });
        tokio::time::timeout(std::time::Duration::from_secs(10), served)
            .await
            .expect("the connection was not closed")
            .expect("connection task");
        let rest = writer.await.expect("writer task");
        assert!(rest.is_empty(), "the master wrote {rest:?}");
        let mut lines = Vec::new();
        while let Ok(event) = rx.try_recv() {
            match event {
                ControlEvent::Connected { conn, .. } => assert_eq!(conn, 7),
                ControlEvent::Line { line, .. } => lines.push(line),
                ControlEvent::Disconnected { .. } => {}
            }
        }
        assert_eq!(
            lines.len(),
            2,
            "{:?}",
            lines.iter().map(String::len).collect::<Vec<_>>()
        );
        assert_eq!(lines[0], "{\"type\":\"status\"}");
        assert_eq!(lines[1].len(), MAX_LINE);
    }
}
