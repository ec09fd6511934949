//! Builds the tc programs (`ipcluster-ebpf`) for `bpfel-unknown-none` with the
//! nightly toolchain and bpf-linker, and leaves the object in `OUT_DIR` where
//! `src/steering/ebpf.rs` embeds it. `cargo xtask setup` installs what this needs.
use std::path::PathBuf;

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .ok_or_else(|| anyhow!("CARGO_MANIFEST_DIR not set"))?;
    let root_dir = PathBuf::from(manifest_dir)
        .join("..")
        .join("ipcluster-ebpf");
    let root_dir = root_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", root_dir.display()))?;
    aya_build::build_ebpf(
        [Package {
            name: "ipcluster-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context(
        "building the eBPF programs failed; run `cargo xtask setup` to install \
         the nightly rust-src component and bpf-linker",
    )
}
