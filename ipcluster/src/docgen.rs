//! The man pages and shell completion scripts, generated from the clap
//! definitions of [`crate::cli`] so that they never drift from `--help`.
//!
//! The binary exposes them through two hidden subcommands, `ipcluster man
//! --out-dir DIR` and `ipcluster completions SHELL`; `cargo xtask man` and
//! `cargo xtask dist` run those after the build (xtask cannot link this crate:
//! its build script needs the bpf-linker that xtask installs).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use clap::{Args, CommandFactory as _};
use clap_complete::Shell;

use crate::cli::Cli;

/// `ipcluster man`.
#[derive(Debug, Args, Clone)]
pub struct ManArgs {
    /// Folder to write ipcluster.1 and one page per subcommand (ipcluster-run.1, …) into;
    /// created when missing.
    #[arg(long, value_name = "DIR")]
    pub out_dir: PathBuf,
}

/// `ipcluster completions`.
#[derive(Debug, Args, Clone)]
pub struct CompletionsArgs {
    /// The shell to print a completion script for.
    #[arg(value_enum)]
    pub shell: Shell,
}

#[derive(Debug, thiserror::Error)]
pub enum DocgenError {
    #[error("cannot create the man page folder {path}: {source} (choose a writable --out-dir)")]
    CreateDir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// The sections appended to `ipcluster.1`: what `--help` does not say.
const TOP_PAGE_EXTRA: &str = r#".SH "WORKER ENVIRONMENT"
Each worker runs CMD ARGS with {port} and {band} replaced, in its own session, with:
.TP
.B PORT
the worker's port for the first public port;
.TP
.B IPCLUSTER_PORT_<public>
the worker's port for each public port;
.TP
.B IPCLUSTER_BAND, IPCLUSTER_WORKERS, IPCLUSTER_GENERATION, IPCLUSTER_NAME
its band, the number of bands, its generation and the cluster name;
.TP
.B IPCLUSTER_CONTROL
the path of the control socket (newline\-delimited JSON), for workers that want health checks.
.PP
A worker is ready when its process tree listens on its port, or when it said hello on the control socket.
.SH RELOAD
Running
.B ipcluster run
again with the same
.B \-\-name
is the reload: the new master takes over from the old one, starts a new generation and switches every band to it at once; the old generation keeps its open connections.
.SH SIGNALS
SIGTERM and SIGINT end the master only: workers and steering stay and the next
.B ipcluster run
adopts them. SIGUSR1 ends the retired workers, like
.BR "ipcluster kill\-retired" .
SIGHUP is ignored.
.SH FILES
.TP
.I /run/ipcluster/<name>/
state directory: master lock, control socket, state.json
.TP
.I /sys/fs/bpf/ipcluster/<name>/
pinned maps and tc links of the ebpf backend
.TP
.B IPCLUSTER\-<name>
the nat chain of the iptables backend
.SH "EXIT STATUS"
0 on success; non\-zero with one error message on stderr otherwise.
.SH "SEE ALSO"
.BR ipcluster\-run (1),
.BR ipcluster\-status (1),
.BR ipcluster\-stop (1),
.BR ipcluster\-kill\-retired (1),
.BR systemctl (1),
.BR tc (8),
.BR bpftool (8),
.BR iptables (8).
The documentation in /usr/share/doc/ipcluster/docs/ (design, control protocol, operations, systemd, metrics, multi\-host).
"#;

/// The pages' date, `YYYY-MM-DD`: `SOURCE_DATE_EPOCH` when set (reproducible
/// packages), else today. An empty date would shift the other `.TH` fields.
fn page_date() -> String {
    let epoch = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    date_of(epoch)
}

fn date_of(epoch_seconds: Option<u64>) -> String {
    let when = epoch_seconds.map_or_else(std::time::SystemTime::now, |secs| {
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs)
    });
    humantime::format_rfc3339_seconds(when)
        .to_string()
        .chars()
        .take(10)
        .collect()
}

/// Every man page: `(file name, roff text)`, the top page first, then one per
/// visible subcommand (`ipcluster-run.1`, …).
pub fn man_pages() -> Result<Vec<(String, Vec<u8>)>, std::io::Error> {
    let mut top = Cli::command().disable_help_subcommand(true);
    top.build();
    let mut pages = Vec::new();
    let date = page_date();
    let source = format!("ipcluster {}", env!("CARGO_PKG_VERSION"));
    let man = clap_mangen::Man::new(top.clone())
        .manual("ipcluster manual")
        .source(&source)
        .date(&date);
    let mut text = Vec::new();
    man.render(&mut text)?;
    text.extend_from_slice(TOP_PAGE_EXTRA.as_bytes());
    pages.push((man.get_filename(), text));
    for sub in top.get_subcommands().filter(|s| !s.is_hide_set()) {
        let man = clap_mangen::Man::new(sub.clone())
            .manual("ipcluster manual")
            .source(&source)
            .date(&date);
        let mut text = Vec::new();
        man.render(&mut text)?;
        writeln!(text, ".SH \"SEE ALSO\"\n.BR ipcluster (1)")?;
        pages.push((man.get_filename(), text));
    }
    Ok(pages)
}

/// Write every man page into `dir`; returns the files written.
pub fn write_man_pages(dir: &Path) -> Result<Vec<PathBuf>, DocgenError> {
    std::fs::create_dir_all(dir).map_err(|source| DocgenError::CreateDir {
        path: dir.display().to_string(),
        source,
    })?;
    let pages = man_pages().map_err(|source| DocgenError::Write {
        path: dir.display().to_string(),
        source,
    })?;
    let mut written = Vec::new();
    for (name, text) in pages {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|source| DocgenError::Write {
            path: path.display().to_string(),
            source,
        })?;
        written.push(path);
    }
    Ok(written)
}

/// The completion script of `shell`.
pub fn completions(shell: Shell) -> Vec<u8> {
    let mut cmd = Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "ipcluster", &mut script);
    script
}

/// `ipcluster man --out-dir DIR`: write the pages, list them on stdout.
pub fn man_command(args: &ManArgs) -> anyhow::Result<()> {
    for path in write_man_pages(&args.out_dir)? {
        println!("{}", path.display());
    }
    Ok(())
}

/// `ipcluster completions SHELL`: the script on stdout.
pub fn completions_command(args: &CompletionsArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    std::io::stdout()
        .write_all(&completions(args.shell))
        .with_context(|| format!("writing the {} completion script to stdout", args.shell))
}

/// Long flags (`--band-shift`, …) and value names of the positional arguments
/// of subcommand `name`, as clap knows them.
pub fn flags_of(name: &str) -> Vec<String> {
    let cmd = Cli::command();
    let Some(sub) = cmd.find_subcommand(name) else {
        return Vec::new();
    };
    sub.get_arguments()
        .filter(|a| !a.is_hide_set())
        .map(|a| match a.get_long() {
            Some(long) => format!("--{long}"),
            None => a
                .get_value_names()
                .and_then(|v| v.first())
                .map_or_else(|| a.get_id().to_string(), ToString::to_string),
        })
        .collect()
}

/// Roff text as a reader sees it: `\-` is a plain `-`.
pub fn roff_plain(text: &[u8]) -> String {
    String::from_utf8_lossy(text).replace("\\-", "-")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(name: &str) -> String {
        let pages = man_pages().expect("render");
        let (_, text) = pages
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no page {name}"));
        roff_plain(text)
    }

    #[test]
    fn run_page_documents_every_flag_of_run() {
        let flags = flags_of("run");
        // The list comes from clap: it must hold the flags we know of, so that
        // an empty list cannot make the test pass.
        assert!(flags.len() >= 20, "{flags:?}");
        for known in ["--band-shift", "--listen", "--workers", "--flow-entries"] {
            assert!(flags.contains(&known.to_owned()), "{known} in {flags:?}");
        }
        let run = page("ipcluster-run.1");
        for flag in &flags {
            assert!(run.contains(flag.as_str()), "ipcluster-run.1 lacks {flag}");
        }
        assert!(run.contains("power of two"), "help text is rendered");
    }

    #[test]
    fn one_page_per_visible_subcommand_and_no_hidden_one() {
        let names: Vec<String> = man_pages()
            .expect("render")
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            names,
            [
                "ipcluster.1",
                "ipcluster-run.1",
                "ipcluster-status.1",
                "ipcluster-stop.1",
                "ipcluster-kill-retired.1"
            ]
        );
        let top = page("ipcluster.1");
        assert!(top.contains("IPCLUSTER_CONTROL") && top.contains("/run/ipcluster/"));
        assert!(!top.contains("demo-worker"), "hidden subcommands stay out");
    }

    #[test]
    fn title_line_has_every_field() {
        assert_eq!(date_of(Some(0)), "1970-01-01");
        assert_eq!(date_of(Some(1_764_547_200)), "2025-12-01");
        let run = page("ipcluster-run.1");
        let th = run
            .lines()
            .find(|l| l.starts_with(".TH "))
            .expect("a .TH line");
        let date = page_date();
        assert_eq!(
            th,
            format!(
                ".TH ipcluster-run 1 {date} \"ipcluster {}\" \"ipcluster manual\"",
                env!("CARGO_PKG_VERSION")
            )
        );
    }

    #[test]
    fn completions_know_the_subcommands_and_flags() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let script = String::from_utf8(completions(shell)).expect("utf-8");
            for word in ["kill-retired", "band-shift", "iptables"] {
                assert!(script.contains(word), "{shell}: no {word}");
            }
        }
    }

    #[test]
    fn unwritable_folder_is_named() {
        let e = write_man_pages(Path::new("/proc/no-such-folder/man")).expect_err("not writable");
        assert!(e.to_string().contains("/proc/no-such-folder/man"), "{e}");
    }
}
