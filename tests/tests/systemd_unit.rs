//! The template unit `ipcluster/systemd/ipcluster@.service`: the settings the
//! master's notifications and the reload rely on, command lines that the
//! real CLI accepts, and `systemd-analyze verify` (with the binary under test
//! in place of /usr/bin/ipcluster: the unit names the installed path).

use std::path::PathBuf;
use std::process::Command;

use clap::Parser as _;
use ipcluster::cli::{Cli, Command as Sub};
use ipcluster_tests::cluster::ipcluster_bin;

fn unit_text() -> String {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../ipcluster/systemd/ipcluster@.service");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// `Key=value` of the [Service] section (the last one wins, as in systemd).
fn setting(unit: &str, key: &str) -> String {
    unit.lines()
        .rev()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("the unit has no {key}="))
        .to_owned()
}

/// A unit command line as systemd runs it for instance `web`, with the
/// example flags of the unit's header in `$IPCLUSTER_RUN_ARGS`.
fn expand(unit: &str, command: &str) -> Vec<String> {
    let example = unit
        .lines()
        .find_map(|l| l.strip_prefix("#   IPCLUSTER_RUN_ARGS="))
        .expect("the unit's header shows an example IPCLUSTER_RUN_ARGS");
    command
        .split_whitespace()
        .flat_map(|w| match w {
            "$IPCLUSTER_RUN_ARGS" => example.split_whitespace().map(str::to_owned).collect(),
            w => vec![w.replace("%i", "web")],
        })
        .collect()
}

#[test]
fn unit_settings() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let unit = unit_text();
    assert_eq!(setting(&unit, "Type"), "notify");
    assert_eq!(setting(&unit, "NotifyAccess"), "all");
    assert_eq!(setting(&unit, "KillMode"), "process");
    assert_eq!(setting(&unit, "Restart"), "on-failure");

    let start = expand(&unit, &setting(&unit, "ExecStart"));
    let reload = expand(&unit, &setting(&unit, "ExecReload"));
    let stop = expand(&unit, &setting(&unit, "ExecStop"));
    for line in [&start, &reload, &stop] {
        assert_eq!(line[0], "/usr/bin/ipcluster", "{line:?}");
    }
    let parse = |line: &[String]| {
        Cli::try_parse_from(line).unwrap_or_else(|e| panic!("{line:?} does not parse: {e}"))
    };
    match parse(&start).command {
        Sub::Run(r) => {
            assert!(!r.detach, "ExecStart must run the master in the foreground");
            assert_eq!(r.name.name, "web");
            assert!(r.metrics_listen.is_some());
            assert_eq!(r.command[0], "/usr/local/bin/app");
        }
        other => panic!("ExecStart is not `run`: {other:?}"),
    }
    match parse(&reload).command {
        Sub::Run(r) => {
            assert!(
                r.detach,
                "ExecReload must return once the new master serves"
            );
            assert_eq!(r.name.name, "web");
        }
        other => panic!("ExecReload is not `run`: {other:?}"),
    }
    match parse(&stop).command {
        Sub::Stop(n) => assert_eq!(n.name, "web"),
        other => panic!("ExecStop is not `stop`: {other:?}"),
    }
}

#[test]
fn systemd_analyze_verify() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let dir = std::env::temp_dir().join(format!("ipcluster-unit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let _cleanup = ipcluster_tests::guard::defer(|| {
        let _ = std::fs::remove_dir_all(&dir);
    });
    let unit = unit_text()
        .replace("/usr/bin/ipcluster", &ipcluster_bin().display().to_string())
        .replace(
            "EnvironmentFile=/etc/ipcluster/%i.conf",
            &format!("EnvironmentFile={}/%i.conf", dir.display()),
        );
    std::fs::write(dir.join("web.conf"), "IPCLUSTER_RUN_ARGS=--workers 2\n").expect("conf");
    let path = dir.join("ipcluster@web.service");
    std::fs::write(&path, unit).expect("unit");
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian package systemd) is missing");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("ipcluster@web.service"),
        "systemd-analyze verify: {stderr}"
    );
}
