//! How the binary reports a failure: one `error:` line naming what failed,
//! then one `caused by:` line per underlying cause, and never a stack dump,
//! whatever `RUST_BACKTRACE` or `RUST_LIB_BACKTRACE` say.

use std::fmt::Write as _;

/// `error: …` and the cause chain, one cause a line; a cause whose text the
/// line before already contains (errors that quote their source) is left out.
pub fn report(error: &anyhow::Error) -> String {
    let mut out = format!("error: {error}");
    let mut previous = error.to_string();
    for cause in error.chain().skip(1) {
        let text = cause.to_string();
        if text.is_empty() || previous.contains(&text) {
            continue;
        }
        let _ = write!(out, "\n  caused by: {text}");
        previous = text;
    }
    out
}

/// A panic is a bug: say where it happened in one line, without the stack
/// dump the default hook prints when `RUST_BACKTRACE` is set.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_owned());
        let place = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let thread = std::thread::current();
        eprintln!(
            "error: internal error in ipcluster (thread {}): {message}{place}; this is a bug, \
             please report it with the log above",
            thread.name().unwrap_or("unnamed")
        );
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot start worker /bin/nope for band 0: {source}")]
    struct Start {
        source: std::io::Error,
    }

    #[test]
    fn chain_on_a_few_lines_without_repeats() {
        let e = anyhow::Error::new(Start {
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "No such file"),
        })
        .context("starting band 0")
        .context("cluster \"web\"");
        let text = report(&e);
        assert_eq!(
            text,
            "error: cluster \"web\"\n  caused by: starting band 0\n  caused by: cannot start \
             worker /bin/nope for band 0: No such file"
        );
    }
}
