//! `cargo xtask setup`: make this machine able to build, load and test ipcluster.
//! Every step checks first and skips what is already there, so a second run
//! takes seconds.

use std::{
    ffi::OsString,
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::{is_root, run_checked, say};

/// The bpf-linker release that builds against the nightly toolchain's LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The toolchain aya-build uses for the eBPF crate.
const NIGHTLY: &str = "nightly";

pub fn setup() -> Result<()> {
    nightly_rust_src()?;
    bpf_linker()?;
    bpffs()?;
    debian_tools()?;
    say("setup", "done");
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nightly_rust_src() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to build the eBPF programs")?;
    if !toolchains.lines().any(|l| l.starts_with(NIGHTLY)) {
        bail!(
            "no nightly toolchain: the eBPF programs are built with nightly (-Z build-std). \
             Install it with `rustup toolchain install nightly --component rust-src`"
        );
    }
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        NIGHTLY,
    ]))?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        say("setup", "nightly rust-src: present");
        return Ok(());
    }
    say(
        "setup",
        "nightly rust-src: installing (rustup component add)",
    );
    run_checked(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        NIGHTLY,
    ]))
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

/// PATH with cargo's bin folder first, so that rustc finds a freshly installed
/// bpf-linker even when the caller's PATH lacks ~/.cargo/bin.
pub fn path_with_cargo_bin() -> OsString {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::iter::once(cargo_home().join("bin")).chain(std::env::split_paths(&path));
    std::env::join_paths(dirs).unwrap_or(path)
}

fn bpf_linker_works() -> bool {
    let candidates = [
        PathBuf::from("bpf-linker"),
        cargo_home().join("bin").join("bpf-linker"),
    ];
    candidates.iter().any(|bin| {
        Command::new(bin).arg("--version").output().is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        })
    })
}

/// bpf-linker has no reachable prebuilt binaries here; build it against the
/// libLLVM that ships inside the nightly toolchain, the LLVM that emits the
/// eBPF crate's bitcode.
fn bpf_linker() -> Result<()> {
    if bpf_linker_works() {
        say(
            "setup",
            &format!("bpf-linker {BPF_LINKER_VERSION}: present"),
        );
        return Ok(());
    }
    let sysroot =
        output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "--print", "sysroot"]))?;
    let sysroot = PathBuf::from(sysroot.trim());
    let version = output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "-vV"]))?;
    let llvm_major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .ok_or_else(|| anyhow!("cannot find the LLVM version in `rustc +nightly -vV`"))?
        .to_owned();
    let lib_dir = sysroot.join("lib");
    let libllvm = fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with(&format!("libLLVM.so.{llvm_major}")))
        .ok_or_else(|| {
            anyhow!(
                "no libLLVM.so.{llvm_major}* in {}; the nightly toolchain should ship it",
                lib_dir.display()
            )
        })?;
    let prefix = cache_dir().join(format!("llvm-{llvm_major}"));
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    // One link for the linker (-lLLVM), one with the soname so the finished
    // binary finds the library at run time.
    for name in ["libLLVM.so", libllvm.as_str()] {
        let link = prefix_lib.join(name);
        let _ = fs::remove_file(&link);
        symlink(lib_dir.join(&libllvm), &link)
            .with_context(|| format!("linking {} to {}", link.display(), libllvm))?;
    }
    say(
        "setup",
        &format!(
            "bpf-linker {BPF_LINKER_VERSION}: building against nightly's LLVM {llvm_major} \
             (cargo install, about 1-4 minutes)"
        ),
    );
    run_checked(
        Command::new("cargo")
            .args([
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--locked",
                "--no-default-features",
                "--features",
                &format!("llvm-{llvm_major}"),
            ])
            .env("LLVM_PREFIX", &prefix),
    )?;
    if !bpf_linker_works() {
        bail!(
            "bpf-linker was installed but `bpf-linker --version` fails; is {} on PATH?",
            cargo_home().join("bin").display()
        );
    }
    Ok(())
}

fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/root/.cache"))
        .join("ipcluster")
}

fn bpffs_mounted() -> Result<bool> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    Ok(mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_dev, dir, fstype) = (f.next(), f.next(), f.next());
        dir == Some("/sys/fs/bpf") && fstype == Some("bpf")
    }))
}

fn bpffs() -> Result<()> {
    if bpffs_mounted()? {
        say("setup", "bpffs on /sys/fs/bpf: mounted");
        return Ok(());
    }
    if !is_root() {
        say(
            "setup",
            "bpffs is not mounted; as root run: mount -t bpf bpf /sys/fs/bpf (ipcluster run also does it)",
        );
        return Ok(());
    }
    say("setup", "bpffs: mounting on /sys/fs/bpf");
    run_checked(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

fn found_in_path(program: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .any(|dir| dir.join(program).is_file())
}

/// Debian packages the tests and the iptables backend use (promtool: Debian's prometheus).
fn debian_tools() -> Result<()> {
    let wanted = [
        ("iptables", "iptables"),
        ("bpftool", "bpftool"),
        ("curl", "curl"),
        // The worker-identity tests run real nginx workers (they overwrite
        // /proc/PID/environ with their process title).
        ("nginx", "nginx"),
        // promtool validates the /metrics text in the metrics root test.
        ("promtool", "prometheus"),
        // systemd-analyze verifies the template unit in the systemd_unit root test.
        ("systemd-analyze", "systemd"),
    ];
    install_missing(&wanted)
}

/// Install, with apt-get, the Debian package of every `(program, package)` of
/// `wanted` whose program is not found (or say how to, when not root on Debian).
pub fn install_missing(wanted: &[(&str, &str)]) -> Result<()> {
    let programs: Vec<&str> = wanted.iter().map(|(bin, _)| *bin).collect();
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(bin, _)| !found_in_path(bin))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        say("setup", &format!("{}: present", programs.join(", ")));
        return Ok(());
    }
    let debian = Path::new("/etc/debian_version").exists();
    if !(is_root() && debian) {
        say(
            "setup",
            &format!(
                "missing: {}; install them with: sudo apt-get install -y {}",
                missing.join(", "),
                missing.join(" ")
            ),
        );
        return Ok(());
    }
    say(
        "setup",
        &format!("installing with apt-get: {}", missing.join(" ")),
    );
    run_checked(Command::new("apt-get").args(["update", "-q"]))?;
    run_checked(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// The cargo-deb release `cargo xtask dist` uses.
const CARGO_DEB_VERSION: &str = "3.8.0";

/// cargo-deb (for `cargo xtask dist`), installed with `cargo install` when
/// missing, and the Debian tools it calls (dpkg-shlibdeps for the
/// dependencies, strip).
pub fn cargo_deb() -> Result<()> {
    install_missing(&[("dpkg-shlibdeps", "dpkg-dev"), ("strip", "binutils")])?;
    let works = Command::new("cargo")
        .args(["deb", "--version"])
        .env("PATH", path_with_cargo_bin())
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(CARGO_DEB_VERSION)
        });
    if works {
        say("setup", &format!("cargo-deb {CARGO_DEB_VERSION}: present"));
        return Ok(());
    }
    say(
        "setup",
        &format!(
            "cargo-deb {CARGO_DEB_VERSION}: installing (cargo install, a few minutes the first time)"
        ),
    );
    run_checked(Command::new("cargo").args([
        "install",
        &format!("cargo-deb@{CARGO_DEB_VERSION}"),
        "--locked",
    ]))
}
