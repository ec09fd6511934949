//! The control protocol, in one place: the messages exchanged on the control
//! socket (worker ↔ master, operator ↔ master), their framing, and the names of
//! the environment variables a worker is started with. The master
//! (`master::control`, `master::requests`), the operator's client
//! (`master::client`), the Rust worker API (`worker_api`) and the demo worker
//! (through `worker_api`) all use what is defined here; docs/protocol.md
//! describes it for workers in other languages.
//!
//! Framing: newline-delimited JSON objects over a Unix stream socket in the
//! cluster's state directory, each object with a `type`, each line at most
//! [`MAX_LINE`] bytes — except the master's replies to operators, at most
//! [`MAX_REPLY`] (a `status` of a large cluster). The master reads with tokio-util's `LinesCodec`
//! ([`LineCodec`]); blocking clients read with [`LineReader`], which runs the
//! same codec; every writer builds its lines with [`to_line`]. The master
//! identifies a peer by `SO_PEERCRED`, never by a pid in a message.

use std::io::{self, Read};

use bytes::BytesMut;
use serde::{Deserialize, Serialize};
use tokio_util::codec::{Decoder, LinesCodec, LinesCodecError};

/// The names of the variables ipcluster sets in each worker's environment
/// (a contract: unmodified servers read `PORT`, aware ones the rest).
pub mod env {
    /// The worker's local port for the first public port.
    pub const PORT: &str = "PORT";
    /// `IPCLUSTER_PORT_<public>=<local>`: the local port for each public port.
    pub const PORT_PREFIX: &str = "IPCLUSTER_PORT_";
    /// The worker's band.
    pub const BAND: &str = "IPCLUSTER_BAND";
    /// How many bands (workers per generation) the cluster has.
    pub const WORKERS: &str = "IPCLUSTER_WORKERS";
    /// The worker's generation.
    pub const GENERATION: &str = "IPCLUSTER_GENERATION";
    /// The cluster's name (`--name`).
    pub const NAME: &str = "IPCLUSTER_NAME";
    /// The path of the control socket.
    pub const CONTROL: &str = "IPCLUSTER_CONTROL";
    /// Not a worker's: the pipe a master started by `run --detach` reports on.
    pub const READY_FD: &str = "IPCLUSTER_READY_FD";
    /// Every variable of ipcluster's own starts with this.
    pub const PREFIX: &str = "IPCLUSTER_";

    /// `IPCLUSTER_PORT_<public>`.
    pub fn port_var(public: u16) -> String {
        format!("{PORT_PREFIX}{public}")
    }

    /// Variables ipcluster sets itself, which `--env` may not name.
    pub fn is_reserved(key: &str) -> bool {
        key == PORT || key.starts_with(PREFIX)
    }
}

/// The longest line, in bytes without its newline, that anyone on the control
/// socket sends or accepts — except the master's replies to operators
/// ([`MAX_REPLY`]). The master closes the connection of a peer that sends a
/// longer line; [`to_line`] refuses to build one. It bounds what the master
/// buffers per peer.
pub const MAX_LINE: usize = 256 * 1024;

/// The longest reply the master sends to an operator's request (and the CLI
/// accepts): a `status` of two full generations of 256 bands takes about
/// 140 KiB, plus up to 2 × [`MAX_REPORTED`] per worker for what workers
/// report. Only the master writes such lines, so nobody buffers this much
/// for a stranger.
pub const MAX_REPLY: usize = 4 * 1024 * 1024;

/// The most of a worker's `stats` or `app` (as compact JSON) the master keeps
/// and shows in `status`: a larger object is replaced by
/// `{"omitted_bytes": N}`, so that one chatty worker cannot make `status`
/// too large to send.
pub const MAX_REPORTED: usize = 1024;

/// What the master keeps of a worker's `stats` or `app`: the value itself, or
/// `{"omitted_bytes": N}` when its compact JSON is longer than
/// [`MAX_REPORTED`] bytes.
pub fn reported(value: serde_json::Value) -> serde_json::Value {
    let len = serde_json::to_string(&value).map_or(usize::MAX, |s| s.len());
    if len <= MAX_REPORTED {
        value
    } else {
        serde_json::json!({ "omitted_bytes": len })
    }
}

/// Why a line was not read or not sent.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    #[error("a line longer than {max} bytes, the control protocol's limit")]
    TooLong { max: usize },
    #[error("a line that is not UTF-8")]
    NotUtf8,
    #[error("a message of {len} bytes is longer than the control protocol's limit of {max} bytes")]
    MessageTooLong { len: usize, max: usize },
    #[error("cannot write the message as JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// One message as one line (without its newline), or an error when it would
/// be longer than [`MAX_LINE`]. Compact JSON never holds a raw newline.
pub fn to_line<T: Serialize>(message: &T) -> Result<String, LineError> {
    line_within(message, MAX_LINE)
}

fn line_within<T: Serialize>(message: &T, max: usize) -> Result<String, LineError> {
    let line = serde_json::to_string(message)?;
    if line.len() > max {
        return Err(LineError::MessageTooLong {
            len: line.len(),
            max,
        });
    }
    Ok(line)
}

/// The line to answer an operator with: `message`, or, when it is longer than
/// [`MAX_REPLY`], an `error` reply that says so (with the reason, for the
/// log): a peer waiting for an answer gets one it can read.
pub fn reply_line<T: Serialize>(message: &T) -> (String, Option<LineError>) {
    match line_within(message, MAX_REPLY) {
        Ok(line) => (line, None),
        Err(e) => {
            let reply = AdminReply::Error {
                message: format!("the master cannot send its answer: {e}"),
            };
            // A short message of our own: it always fits.
            let line = serde_json::to_string(&reply).unwrap_or_default();
            (line, Some(e))
        }
    }
}

/// The framing: tokio-util's `LinesCodec` with a limit ([`MAX_LINE`] unless
/// said otherwise). A trailing `\r` is dropped. After [`LineError::TooLong`]
/// it skips the rest of that line; after [`LineError::NotUtf8`] the next line
/// decodes normally.
#[derive(Debug)]
pub struct LineCodec {
    codec: LinesCodec,
    max: usize,
}

impl Default for LineCodec {
    fn default() -> Self {
        LineCodec::with_max(MAX_LINE)
    }
}

impl LineCodec {
    /// Lines of at most `max` bytes.
    pub fn with_max(max: usize) -> Self {
        LineCodec {
            codec: LinesCodec::new_with_max_length(max),
            max,
        }
    }
}

fn line_error(e: LinesCodecError, max: usize) -> LineError {
    match e {
        LinesCodecError::MaxLineLengthExceeded => LineError::TooLong { max },
        // The only I/O error the codec itself makes: the line was not UTF-8.
        LinesCodecError::Io(e) if e.kind() == io::ErrorKind::InvalidData => LineError::NotUtf8,
        LinesCodecError::Io(e) => LineError::Io(e),
    }
}

impl Decoder for LineCodec {
    type Item = String;
    type Error = LineError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<String>, LineError> {
        self.codec.decode(buf).map_err(|e| line_error(e, self.max))
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<String>, LineError> {
        self.codec
            .decode_eof(buf)
            .map_err(|e| line_error(e, self.max))
    }
}

/// Reads lines from a blocking reader (a `UnixStream`, `&UnixStream`) with
/// [`LineCodec`]: the same framing and limit as the master. A read that
/// fails, for instance on a socket read timeout, keeps the part of the line
/// read so far, so the caller may simply call again. An over-long line is
/// reported once ([`LineError::TooLong`]) and skipped; the caller decides
/// whether to go on reading.
pub struct LineReader<R> {
    reader: R,
    codec: LineCodec,
    buf: BytesMut,
    eof: bool,
}

impl<R: Read> LineReader<R> {
    /// Lines of at most [`MAX_LINE`] bytes.
    pub fn new(reader: R) -> Self {
        LineReader::with_max(reader, MAX_LINE)
    }

    /// The master's replies to an operator: at most [`MAX_REPLY`] bytes.
    pub fn for_replies(reader: R) -> Self {
        LineReader::with_max(reader, MAX_REPLY)
    }

    fn with_max(reader: R, max: usize) -> Self {
        LineReader {
            reader,
            codec: LineCodec::with_max(max),
            buf: BytesMut::new(),
            eof: false,
        }
    }

    /// The next line, without its newline; `Ok(None)` at the end of the
    /// stream (an unterminated last line is returned first).
    pub fn read_line(&mut self) -> Result<Option<String>, LineError> {
        let mut chunk = [0u8; 8192];
        loop {
            if self.eof {
                return self.codec.decode_eof(&mut self.buf);
            }
            if let Some(line) = self.codec.decode(&mut self.buf)? {
                return Ok(Some(line));
            }
            match self.reader.read(&mut chunk) {
                Ok(0) => self.eof = true,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(LineError::Io(e)),
            }
        }
    }
}

/// Worker → master.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum WorkerMessage {
    /// First message of an aware worker: it is up and listening on `ports`.
    Hello {
        band: u32,
        generation: u64,
        #[serde(default)]
        ports: Vec<u16>,
    },
    /// Sent periodically (every 500 ms by the bundled worker API).
    Ping {
        /// Free-form statistics the worker wants shown in `status`.
        #[serde(default)]
        stats: serde_json::Value,
        /// The worker is overloaded: the master retires and replaces it.
        #[serde(default)]
        busy: bool,
        /// Free-form application info (version, build).
        #[serde(default)]
        app: serde_json::Value,
    },
    /// The worker asks to be retired (e.g. it detected a leak).
    RequestRetire { reason: String },
}

/// Master → worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MasterMessage {
    /// No new connections will reach you; keep serving the ones you have.
    Retire { reason: String },
    /// Finish up and exit; SIGKILL follows after the soft-kill timeout.
    Die { reason: String },
    /// Facts about the cluster, sent after hello.
    Info {
        name: String,
        generation: u64,
        band: u32,
        workers: u32,
    },
}

/// Operator → master (the `ipcluster` CLI, or a new master taking over).
/// Accepted only from root or the master's own user (`SO_PEERCRED`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AdminRequest {
    /// Answered with one [`StatusReport`] line.
    Status,
    /// End every worker, remove the steering state and the state directory, exit.
    Stop,
    /// Ask every retired worker to die, spaced by the spawn delay.
    KillRetired,
    /// Exit the master only (a new master takes over): workers and steering stay.
    Shutdown,
}

/// Master → operator, for every request but `status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AdminReply {
    Ok { message: String },
    Error { message: String },
}

/// Any line a peer may send on the control socket.
#[derive(Clone, Debug, PartialEq)]
pub enum Incoming {
    Worker(WorkerMessage),
    Admin(AdminRequest),
}

impl Incoming {
    /// Parse one line; the error says why it was not understood.
    pub fn parse(line: &str) -> Result<Incoming, String> {
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
        let kind = value
            .get("type")
            .and_then(|t| t.as_str())
            .ok_or("no \"type\" field")?
            .to_owned();
        match kind.as_str() {
            "hello" | "ping" | "request_retire" => serde_json::from_value(value)
                .map(Incoming::Worker)
                .map_err(|e| format!("bad {kind} message: {e}")),
            "status" | "stop" | "kill_retired" | "shutdown" => serde_json::from_value(value)
                .map(Incoming::Admin)
                .map_err(|e| format!("bad {kind} request: {e}")),
            other => Err(format!("unknown message type {other:?}")),
        }
    }
}

/// One worker in `ipcluster status --json` (field names are a contract).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub pid: i32,
    pub band: u32,
    pub generation: u64,
    pub state: crate::policy::WorkerState,
    /// The worker's port for the first public port (`$PORT`).
    pub port: u16,
    /// The worker's port for each public port, in `--listen` order of first appearance.
    pub ports: Vec<u16>,
    /// Resident memory of the worker's process tree, bytes.
    pub rss: u64,
    /// Established TCP connections on the worker's ports owned by its process tree.
    pub connections: u32,
    /// Seconds since the worker started.
    pub uptime: u64,
    /// Nice value of the worker's main process (retired workers are reniced).
    pub nice: i64,
    /// The worker spoke on the control socket (hello or ping) to this master.
    pub aware: bool,
    /// Seconds since its last ping, if it pings.
    #[serde(default)]
    pub last_ping_ago: Option<f64>,
    /// Why it is retired, dying or killed, with the figures the master acted on
    /// (e.g. `low watermark breach: rss 101.2 MiB > limit 64.0 MiB`).
    #[serde(default)]
    pub reason: Option<String>,
    /// The `stats` of its latest ping, as sent (`null` when it never pinged).
    #[serde(default)]
    pub stats: serde_json::Value,
    /// The `app` of its latest ping, as sent (`null` when it never pinged).
    #[serde(default)]
    pub app: serde_json::Value,
}

/// The memory rules in force (`ipcluster run` flags), bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLimits {
    /// `--worker-rss-limit`: a live worker above it is retired and replaced.
    pub worker_rss_limit: u64,
    /// `--cluster-memory-limit`.
    pub cluster_memory_limit: u64,
    /// Above it (80 % of the cluster limit), retired workers are asked to die.
    pub low_watermark: u64,
    /// Above it (95 %), retired and dying workers are killed.
    pub high_watermark: u64,
}

/// `ipcluster status --json` (field names are a contract, docs/design.md).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub name: String,
    pub backend: crate::steering::BackendKind,
    /// The generation of the master that answers (its new workers).
    pub generation: u64,
    /// The master's pid; `None` when no master runs (the CLI read /proc itself).
    pub master_pid: Option<i32>,
    pub listens: Vec<std::net::SocketAddr>,
    /// Workers (bands) per generation.
    pub bands: u32,
    pub band_shift: u8,
    pub workers: Vec<WorkerStatus>,
    /// The steering table in force.
    pub table: Option<crate::steering::SteeringTable>,
    pub counters: Option<crate::steering::Counters>,
    /// Resident memory of the master and of all workers, bytes.
    pub master_rss: u64,
    pub cluster_rss: u64,
    /// The limits the master applies; `None` when no master runs.
    #[serde(default)]
    pub limits: Option<MemoryLimits>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_messages_round_trip() {
        let hello: WorkerMessage =
            serde_json::from_str(r#"{"type":"hello","band":3,"generation":7,"ports":[20001]}"#)
                .expect("hello");
        assert_eq!(
            hello,
            WorkerMessage::Hello {
                band: 3,
                generation: 7,
                ports: vec![20001]
            }
        );
        let ping: WorkerMessage =
            serde_json::from_str(r#"{"type":"ping","busy":true}"#).expect("ping");
        assert!(matches!(ping, WorkerMessage::Ping { busy: true, .. }));
        let rr: WorkerMessage =
            serde_json::from_str(r#"{"type":"request_retire","reason":"leak"}"#)
                .expect("request_retire");
        assert_eq!(
            rr,
            WorkerMessage::RequestRetire {
                reason: "leak".into()
            }
        );
    }

    #[test]
    fn unknown_or_malformed_messages_are_errors() {
        assert!(serde_json::from_str::<WorkerMessage>(r#"{"type":"reboot"}"#).is_err());
        assert!(serde_json::from_str::<WorkerMessage>(r#"{"type":"hello"}"#).is_err());
        assert!(serde_json::from_str::<WorkerMessage>("not json").is_err());
    }

    #[test]
    fn incoming_lines_are_worker_messages_or_admin_requests() {
        assert_eq!(
            Incoming::parse(r#"{"type":"status"}"#),
            Ok(Incoming::Admin(AdminRequest::Status))
        );
        assert_eq!(
            Incoming::parse(r#"{"type":"kill_retired"}"#),
            Ok(Incoming::Admin(AdminRequest::KillRetired))
        );
        assert!(matches!(
            Incoming::parse(r#"{"type":"ping"}"#),
            Ok(Incoming::Worker(WorkerMessage::Ping { .. }))
        ));
        for bad in [
            "garbage",
            "{}",
            r#"{"type":"reboot"}"#,
            r#"{"type":"hello","band":1,"generation":1,"pid":1}"#,
            "[1,2]",
        ] {
            assert!(Incoming::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn master_messages_are_tagged() {
        let s = serde_json::to_string(&MasterMessage::Retire {
            reason: "reload".into(),
        })
        .expect("json");
        assert_eq!(s, r#"{"type":"retire","reason":"reload"}"#);
    }

    /// Lines read, or the errors' messages.
    type Lines = Vec<Result<String, String>>;

    /// What `LineCodec` makes of `chunks` arriving one by one, then the end of the stream.
    fn decoded(chunks: &[&[u8]]) -> Lines {
        let mut codec = LineCodec::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut drain = |codec: &mut LineCodec, buf: &mut BytesMut, eof: bool| loop {
            let next = if eof {
                codec.decode_eof(buf)
            } else {
                codec.decode(buf)
            };
            match next {
                Ok(Some(line)) => out.push(Ok(line)),
                Ok(None) => break,
                Err(e) => out.push(Err(e.to_string())),
            }
        };
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            drain(&mut codec, &mut buf, false);
        }
        drain(&mut codec, &mut buf, true);
        out
    }

    /// A blocking reader that hands out scripted reads: bytes, or a timeout.
    struct Scripted(std::collections::VecDeque<Option<Vec<u8>>>);

    impl Read for Scripted {
        fn read(&mut self, into: &mut [u8]) -> io::Result<usize> {
            match self.0.pop_front() {
                None => Ok(0),
                Some(None) => Err(io::Error::from(io::ErrorKind::WouldBlock)),
                Some(Some(mut bytes)) => {
                    let n = bytes.len().min(into.len());
                    into[..n].copy_from_slice(&bytes[..n]);
                    if n < bytes.len() {
                        self.0.push_front(Some(bytes.split_off(n)));
                    }
                    Ok(n)
                }
            }
        }
    }

    /// What `LineReader` makes of the same chunks (timeouts retried).
    fn read_blocking(chunks: &[&[u8]]) -> Lines {
        let mut script = std::collections::VecDeque::new();
        for chunk in chunks {
            script.push_back(Some(chunk.to_vec()));
            script.push_back(None);
        }
        let mut reader = LineReader::new(Scripted(script));
        let mut out = Vec::new();
        loop {
            match reader.read_line() {
                Ok(Some(line)) => out.push(Ok(line)),
                Ok(None) => return out,
                Err(LineError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => out.push(Err(e.to_string())),
            }
        }
    }

    #[test]
    fn framing_limit_is_exact_and_both_readers_agree() {
        let at_limit = format!("{}\n", "a".repeat(MAX_LINE));
        let over = format!("{}\n", "b".repeat(MAX_LINE + 1));
        let too_long = Err(format!(
            "a line longer than {MAX_LINE} bytes, the control protocol's limit"
        ));
        let not_utf8 = Err("a line that is not UTF-8".to_owned());
        let half = MAX_LINE / 2;
        let cases: Vec<(Vec<&[u8]>, Lines)> = vec![
            (
                vec![b"{\"type\":", b"\"ping\"}\n{\"a\":1}\npart", b"ial"],
                vec![
                    Ok("{\"type\":\"ping\"}".into()),
                    Ok("{\"a\":1}".into()),
                    Ok("partial".into()),
                ],
            ),
            (
                vec![b"crlf\r\n", b"\n"],
                vec![Ok("crlf".into()), Ok("".into())],
            ),
            (
                vec![b"\xff\xfe\n", b"next\n"],
                vec![not_utf8, Ok("next".into())],
            ),
            (
                vec![at_limit.as_bytes(), b"after\n"],
                vec![Ok("a".repeat(MAX_LINE)), Ok("after".into())],
            ),
            (
                vec![over.as_bytes(), b"after\n"],
                vec![too_long.clone(), Ok("after".into())],
            ),
            // Over-long across reads: refused once, skipped to its newline.
            (
                vec![
                    &over.as_bytes()[..half],
                    &over.as_bytes()[half..MAX_LINE],
                    &over.as_bytes()[MAX_LINE..],
                    b"after\n",
                ],
                vec![too_long, Ok("after".into())],
            ),
        ];
        for (chunks, expected) in cases {
            let shown = |v: &[Result<String, String>]| {
                v.iter()
                    .map(|r| match r {
                        Ok(l) => format!("Ok({} bytes)", l.len()),
                        Err(e) => format!("Err({e})"),
                    })
                    .collect::<Vec<_>>()
            };
            let codec = decoded(&chunks);
            assert!(codec == expected, "codec: {:?}", shown(&codec));
            let blocking = read_blocking(&chunks);
            assert!(blocking == expected, "reader: {:?}", shown(&blocking));
        }
    }

    #[test]
    fn writers_refuse_what_readers_would_refuse() {
        let fits = WorkerMessage::RequestRetire {
            reason: "r".repeat(MAX_LINE - r#"{"type":"request_retire","reason":""}"#.len()),
        };
        let line = to_line(&fits).expect("exactly at the limit");
        assert_eq!(line.len(), MAX_LINE);
        assert_eq!(
            decoded(&[line.as_bytes(), b"\n"]).len(),
            1,
            "the master reads what to_line built"
        );
        let over = WorkerMessage::RequestRetire {
            reason: "r".repeat(MAX_LINE),
        };
        let e = to_line(&over).expect_err("over the limit");
        assert!(
            matches!(e, LineError::MessageTooLong { len, max: MAX_LINE } if len > MAX_LINE),
            "{e}"
        );
        assert!(e.to_string().contains(&MAX_LINE.to_string()), "{e}");
        let line = to_line(&MasterMessage::Die {
            reason: "a\nb".into(),
        })
        .expect("die");
        assert!(!line.contains('\n'), "{line}");
    }

    #[test]
    fn the_status_of_two_full_generations_fits_in_one_line() {
        let bands = ipcluster_common::MAX_BANDS;
        let worker = |i: u32, state, reason: Option<&str>| WorkerStatus {
            pid: 4_194_000 + i as i32,
            band: i % bands,
            generation: 1_000_000 + u64::from(i / bands),
            state,
            port: 29_000 + (i % 1000) as u16,
            ports: vec![29_000 + (i % 1000) as u16, 30_000 + (i % 1000) as u16],
            rss: 448 << 20,
            connections: 100_000,
            uptime: 10_000_000,
            nice: 19,
            aware: true,
            last_ping_ago: Some(0.123_456_789),
            reason: reason.map(str::to_owned),
            // The most the master keeps of what a worker reports.
            stats: reported(serde_json::json!({ "s": "x".repeat(MAX_REPORTED - 8) })),
            app: reported(serde_json::json!({ "a": "y".repeat(MAX_REPORTED - 8) })),
        };
        let workers: Vec<WorkerStatus> = (0..bands)
            .map(|i| worker(i, crate::policy::WorkerState::Live, None))
            .chain((bands..2 * bands).map(|i| {
                worker(
                    i,
                    crate::policy::WorkerState::Retired,
                    Some("low watermark breach: rss 470.2 MiB > limit 448.0 MiB; replaced by worker 4194303"),
                )
            }))
            .collect();
        let listens: Vec<std::net::SocketAddr> = (0..2)
            .map(|i| std::net::SocketAddr::from(([10, 0, 0, i], 8080)))
            .collect();
        let ports: Vec<Vec<u16>> = (0..2)
            .map(|s| (0..bands).map(|b| 29_000 + (s * 1000 + b) as u16).collect())
            .collect();
        let report = StatusReport {
            name: "c".repeat(crate::cluster_name::ClusterName::MAX_LEN),
            backend: crate::steering::BackendKind::Ebpf,
            generation: 1_000_001,
            master_pid: Some(4_194_303),
            listens: listens.clone(),
            bands,
            band_shift: 31,
            workers,
            table: Some(crate::steering::SteeringTable::uniform(
                &listens, 31, &ports,
            )),
            counters: Some(crate::steering::Counters::default()),
            master_rss: 1 << 40,
            cluster_rss: 1 << 40,
            limits: None,
        };
        assert!(report.workers[0].stats.get("s").is_some(), "kept whole");
        let (line, refused) = reply_line(&report);
        assert!(refused.is_none(), "{refused:?}");
        assert!(
            line.len() < MAX_REPLY * 3 / 4,
            "{} bytes for {} workers",
            line.len(),
            report.workers.len()
        );
        // Far more workers than a cluster can have do not fit: the answer
        // says so instead.
        let mut huge = report.clone();
        for _ in 0..3 {
            huge.workers.extend(report.workers.iter().cloned());
        }
        let (answer, error) = reply_line(&huge);
        assert!(
            matches!(
                error,
                Some(LineError::MessageTooLong { max: MAX_REPLY, .. })
            ),
            "{error:?}"
        );
        let AdminReply::Error { message } = serde_json::from_str(&answer).expect("an error reply")
        else {
            panic!("not an error reply: {answer}");
        };
        assert!(
            message.contains(&format!("limit of {MAX_REPLY} bytes")),
            "{message}"
        );
    }

    #[test]
    fn what_workers_report_is_kept_up_to_the_limit() {
        let at_limit = serde_json::json!({ "k": "v".repeat(MAX_REPORTED - 8) });
        assert_eq!(
            serde_json::to_string(&at_limit).map(|s| s.len()).ok(),
            Some(MAX_REPORTED)
        );
        assert_eq!(reported(at_limit.clone()), at_limit);
        let over = serde_json::json!({ "k": "v".repeat(MAX_REPORTED - 7) });
        assert_eq!(
            reported(over),
            serde_json::json!({ "omitted_bytes": MAX_REPORTED + 1 })
        );
        assert_eq!(reported(serde_json::Value::Null), serde_json::Value::Null);
    }
}
