//! The Debian package of `cargo xtask dist`: its control fields and contents
//! (`dpkg-deb -I`, `-c`), then a real install with `dpkg --root` into a scratch
//! root: the binary runs from there, the man page documents every flag of
//! `run` (the list comes from clap), the completions and the unit are in place,
//! and a purge removes every file again.
//!
//! The package: `$IPCLUSTER_DEB` (set by `cargo xtask test`), else the one
//! `cargo xtask dist` left in `target/release/dist/deb/`.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ipcluster_tests::guard::defer;

fn deb() -> PathBuf {
    if let Some(deb) = std::env::var_os("IPCLUSTER_DEB") {
        let deb = PathBuf::from(deb);
        assert!(
            deb.is_file(),
            "IPCLUSTER_DEB={} does not exist",
            deb.display()
        );
        return deb;
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    // target/<profile>/deps/<test> → target/release/dist/deb/
    let target = exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .expect("the test executable lives in target/<profile>/deps");
    let dir = target.join("release").join("dist").join("deb");
    let found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "deb"))
                .collect()
        })
        .unwrap_or_default();
    match found.as_slice() {
        [deb] => deb.clone(),
        _ => panic!(
            "no single package in {}: build it with `cargo xtask dist` or point IPCLUSTER_DEB at one",
            dir.display()
        ),
    }
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Files the package must install (paths relative to the root).
const EXPECTED: [&str; 12] = [
    "usr/bin/ipcluster",
    "lib/systemd/system/ipcluster@.service",
    "usr/share/man/man1/ipcluster.1.gz",
    "usr/share/man/man1/ipcluster-run.1.gz",
    "usr/share/man/man1/ipcluster-status.1.gz",
    "usr/share/man/man1/ipcluster-stop.1.gz",
    "usr/share/man/man1/ipcluster-kill-retired.1.gz",
    "usr/share/bash-completion/completions/ipcluster",
    "usr/share/zsh/vendor-completions/_ipcluster",
    "usr/share/fish/vendor_completions.d/ipcluster.fish",
    "usr/share/doc/ipcluster/copyright",
    "usr/share/doc/ipcluster/docs/operations.md",
];

fn gunzip(path: &Path) -> String {
    let out = run(Command::new("gzip").arg("-dc").arg(path));
    let mut s = String::new();
    out.stdout
        .as_slice()
        .read_to_string(&mut s)
        .unwrap_or_else(|e| panic!("{} is not text: {e}", path.display()));
    s
}

#[test]
fn dist_package_installs_into_a_scratch_root() {
    let _netns = ipcluster_tests::NetNsGuard::enter();
    let deb = deb();

    let info = text(&run(Command::new("dpkg-deb").arg("-I").arg(&deb)));
    for field in [
        "Package: ipcluster",
        &format!("Version: {}", env!("CARGO_PKG_VERSION")),
        "Depends: libc6",
        "Section: net",
    ] {
        assert!(info.contains(field), "dpkg-deb -I lacks {field:?}:\n{info}");
    }
    let listing = text(&run(Command::new("dpkg-deb").arg("-c").arg(&deb)));
    for path in EXPECTED {
        assert!(
            listing.contains(&format!("./{path}")),
            "the package lacks {path}:\n{listing}"
        );
    }

    // A scratch root with an empty dpkg database, removed even if the test fails.
    let root = std::env::temp_dir().join(format!("ipcluster-deb-root-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let _cleanup = defer(|| {
        let _ = std::fs::remove_dir_all(&root);
    });
    for dir in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "var/log"] {
        std::fs::create_dir_all(root.join(dir)).expect("scratch root");
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").expect("dpkg status");
    // libc6 is not in the scratch database: install without checking dependencies.
    let dpkg = |args: &[&str]| {
        let mut cmd = Command::new("dpkg");
        cmd.arg(format!("--root={}", root.display()))
            .arg("--force-depends")
            .arg("--force-script-chrootless")
            .args(args);
        cmd
    };
    run(dpkg(&["--install"]).arg(&deb));
    for path in EXPECTED {
        assert!(root.join(path).is_file(), "{path} was not installed");
    }

    // The installed binary runs and knows its version.
    let version = text(&run(
        Command::new(root.join("usr/bin/ipcluster")).arg("--version")
    ));
    assert_eq!(
        version.trim(),
        format!("ipcluster {}", env!("CARGO_PKG_VERSION"))
    );

    // The installed man page documents every flag clap knows for `run`.
    let flags = ipcluster::docgen::flags_of("run");
    assert!(flags.len() >= 20, "clap lists the flags of run: {flags:?}");
    let page = gunzip(&root.join("usr/share/man/man1/ipcluster-run.1.gz")).replace("\\-", "-");
    for flag in &flags {
        assert!(
            page.contains(flag.as_str()),
            "ipcluster-run(1) lacks {flag}"
        );
    }
    let top = gunzip(&root.join("usr/share/man/man1/ipcluster.1.gz"));
    assert!(
        top.contains("IPCLUSTER_CONTROL"),
        "ipcluster(1) documents the environment"
    );

    let bash =
        std::fs::read_to_string(root.join("usr/share/bash-completion/completions/ipcluster"))
            .expect("bash completion");
    assert!(bash.contains("--band-shift") && bash.contains("kill-retired"));
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/ipcluster@.service"))
        .expect("unit file");
    assert!(
        unit.contains("ExecStart=/usr/bin/ipcluster run"),
        "the unit runs the packaged binary:\n{unit}"
    );

    // Purging removes every file the package installed.
    run(&mut dpkg(&["--purge", "ipcluster"]));
    for path in EXPECTED {
        assert!(!root.join(path).exists(), "{path} is left after purge");
    }
}
