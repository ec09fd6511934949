//! Running `iptables-save` and `iptables-restore` (or their ip6tables
//! twins), and turning their failures into errors that say what to do.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::steering::SteeringError;

/// The Debian package that provides every tool used here.
pub const PACKAGE: &str = "iptables";

/// Run `program args…`, feeding `stdin` if given; return its stdout.
pub fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, SteeringError> {
    let command = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| spawn_error(&command, program, e))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A tool that exits early closes the pipe: its stderr says why, so a
        // write error here is not the interesting one.
        let _ = pipe.write_all(input.as_bytes());
    }
    let output = child
        .wait_with_output()
        .map_err(|source| SteeringError::Io {
            what: format!("waiting for `{command}`"),
            source,
        })?;
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let message = if stderr.is_empty() {
        format!("it exited with {}", output.status)
    } else {
        stderr
    };
    Err(failure(command, message, stdin))
}

fn spawn_error(command: &str, program: &str, e: std::io::Error) -> SteeringError {
    match e.kind() {
        std::io::ErrorKind::NotFound => SteeringError::IptablesMissing {
            command: program.to_owned(),
            package: PACKAGE,
        },
        _ => SteeringError::Io {
            what: format!("starting `{command}`"),
            source: e,
        },
    }
}

/// Classify a failed run by iptables' own message, quoting the offending
/// line of our input when the tool names one.
pub fn failure(command: String, message: String, stdin: Option<&str>) -> SteeringError {
    if is_permission_problem(&message) {
        return SteeringError::IptablesNotPermitted { command, message };
    }
    let message = match (stdin, failed_line(&message)) {
        (Some(input), Some(n)) => match input.lines().nth(n.saturating_sub(1)) {
            Some(line) => format!("{message}\n(line {n} of the input: {line})"),
            None => message,
        },
        _ => message,
    };
    SteeringError::IptablesFailed { command, message }
}

fn is_permission_problem(message: &str) -> bool {
    [
        "Permission denied",
        "you must be root",
        "Operation not permitted",
    ]
    .iter()
    .any(|m| message.contains(m))
}

/// The input line a restore failed at: `Error occurred at line: 3` (nf_tables)
/// or `line 3 failed` (legacy).
fn failed_line(message: &str) -> Option<usize> {
    if let Some((_, rest)) = message.split_once("Error occurred at line: ") {
        return rest
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok();
    }
    let (_, rest) = message.split_once("line ")?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_permitted_names_the_capability() {
        let e = failure(
            "iptables-save -t nat".into(),
            "iptables-save v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)".into(),
            None,
        );
        assert!(matches!(e, SteeringError::IptablesNotPermitted { .. }));
        assert!(e.to_string().contains("CAP_NET_ADMIN"), "{e}");
    }

    #[test]
    fn kernel_refusal_shows_the_message_and_our_line() {
        let input = "*nat\n-A C -p udp -m addrtype --dst-type FOO -j REDIRECT\nCOMMIT\n";
        let e = failure(
            "iptables-restore --noflush".into(),
            "iptables-restore v1.8.9 (nf_tables): addrtype: bad type \"FOO\"\nError occurred at line: 2".into(),
            Some(input),
        );
        let text = e.to_string();
        assert!(text.contains("bad type \"FOO\""), "{text}");
        assert!(text.contains("line 2 of the input: -A C -p udp"), "{text}");
        let legacy = failure(
            "r".into(),
            "iptables-restore: line 3 failed".into(),
            Some(input),
        );
        assert!(
            legacy.to_string().contains("line 3 of the input: COMMIT"),
            "{legacy}"
        );
    }

    #[test]
    fn missing_tool_names_the_package() {
        let e = run("ipcluster-no-such-iptables-save", &[], None).expect_err("no such program");
        assert!(matches!(e, SteeringError::IptablesMissing { .. }));
        assert!(e.to_string().contains("apt-get install iptables"), "{e}");
    }
}
