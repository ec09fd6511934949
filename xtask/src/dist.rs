//! `cargo xtask man` and `cargo xtask dist`: the man pages, the shell
//! completions and the Debian package.
//!
//! xtask does not link the `ipcluster` crate (its build script needs the
//! bpf-linker that xtask installs), so the pages and scripts are produced by
//! the freshly built binary's hidden `man` and `completions` subcommands,
//! which render the clap definitions. They are written under
//! `target/release/dist/`, where `[package.metadata.deb]` of
//! `ipcluster/Cargo.toml` picks them up (cargo-deb resolves `target/release/`
//! to the real target folder).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{cargo, run_checked, say, setup};

/// Completion scripts: (shell, file name under dist/completions/).
const COMPLETIONS: [(&str, &str); 3] = [
    ("bash", "ipcluster.bash"),
    ("zsh", "_ipcluster"),
    ("fish", "ipcluster.fish"),
];

/// The root test that installs the package `cargo xtask test` builds.
pub const PACKAGE_TEST: &str = "dist_package_installs_into_a_scratch_root";

/// The systemd unit the package ships (from the repository).
pub const UNIT_FILE: &str = "ipcluster/systemd/ipcluster@.service";

/// `<release dir>/dist/`, next to the binary `bin`.
fn dist_dir(bin: &Path) -> PathBuf {
    bin.with_file_name("dist")
}

/// Write the man pages and completion scripts of `bin` into `<release dir>/dist/`;
/// returns that folder.
pub fn man(bin: &Path) -> Result<PathBuf> {
    let dist = dist_dir(bin);
    let man_dir = dist.join("man");
    if man_dir.exists() {
        fs::remove_dir_all(&man_dir).with_context(|| format!("clearing {}", man_dir.display()))?;
    }
    say("man", &format!("man pages into {}", man_dir.display()));
    run_checked(Command::new(bin).arg("man").arg("--out-dir").arg(&man_dir))?;
    let completions = dist.join("completions");
    fs::create_dir_all(&completions)
        .with_context(|| format!("creating {}", completions.display()))?;
    for (shell, file) in COMPLETIONS {
        let out = Command::new(bin)
            .args(["completions", shell])
            .output()
            .with_context(|| format!("running {} completions {shell}", bin.display()))?;
        if !out.status.success() || out.stdout.is_empty() {
            bail!(
                "{} completions {shell} failed ({}): {}",
                bin.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let path = completions.join(file);
        fs::write(&path, &out.stdout).with_context(|| format!("writing {}", path.display()))?;
    }
    say(
        "man",
        &format!(
            "{} completion scripts into {}",
            shell_names(),
            completions.display()
        ),
    );
    Ok(dist)
}

fn shell_names() -> String {
    COMPLETIONS.map(|(shell, _)| shell).join(", ")
}

/// `page.1` → `page.1.gz` beside it (`gzip -9n`: no name or time stamp inside, so
/// the package does not change when nothing else did). Debian wants man pages
/// compressed; cargo-deb leaves files from the target folder as they are.
fn gzip_man_pages(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let page = entry
            .with_context(|| format!("reading {}", dir.display()))?
            .path();
        if page.extension().is_some_and(|x| x == "1") {
            run_checked(Command::new("gzip").args(["-9nkf"]).arg(&page))?;
        }
    }
    Ok(())
}

/// Build the Debian package from the release binary `bin` (already built):
/// man pages and completions, then `cargo deb --no-build`. Returns the .deb.
pub fn package(root: &Path, bin: &Path) -> Result<PathBuf> {
    let unit = root.join(UNIT_FILE);
    if !unit.is_file() {
        bail!(
            "the systemd unit {} is missing; the package ships it as \
             /lib/systemd/system/ipcluster@.service",
            unit.display()
        );
    }
    let dist = man(bin)?;
    gzip_man_pages(&dist.join("man"))?;
    setup::cargo_deb()?;
    let out_dir = dist.join("deb");
    if out_dir.exists() {
        fs::remove_dir_all(&out_dir).with_context(|| format!("clearing {}", out_dir.display()))?;
    }
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    say("dist", "cargo deb -p ipcluster --no-build");
    run_checked(
        cargo(root)
            .args(["deb", "-p", "ipcluster", "--no-build", "--output"])
            .arg(&out_dir),
    )?;
    let debs: Vec<PathBuf> = fs::read_dir(&out_dir)
        .with_context(|| format!("reading {}", out_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    match debs.as_slice() {
        [deb] => Ok(deb.clone()),
        other => bail!(
            "cargo deb should leave one package in {}, found {other:?}",
            out_dir.display()
        ),
    }
}
