//! The recipe that turns `parasite/` into a position-independent `no_std` ELF blob.
//!
//! Used by both `build.rs` (so a plain `cargo build` on a fresh clone works) and
//! `cargo xtask build-parasite`: one implementation, so the two can never drift apart.
//!
//! The blob is built by a nested `cargo build` of the separate `parasite/` workspace with its own
//! target directory (the outer build holds the lock on ours), with every inherited `CARGO_*` build
//! setting and `RUSTFLAGS` cleared so host flags (e.g. `+crt-static`) do not leak into the blob.
//! Link flags make it a static PIE with one RWX load segment at address 0 (see `parasite/blob.ld`);
//! the host applies the remaining `R_X86_64_RELATIVE` relocations when it loads the blob.

use std::path::{Path, PathBuf};
use std::process::Command;

pub const TARGET: &str = "x86_64-unknown-linux-gnu";

/// Where a built blob ends up, relative to the repository root.
pub fn blob_dir(repo: &Path) -> PathBuf {
    repo.join("target").join("blobs")
}

/// The parasite's sources, for `rerun-if-changed`.
pub fn source_paths(repo: &Path) -> Vec<PathBuf> {
    let p = repo.join("parasite");
    vec![
        p.join("src"),
        p.join("Cargo.toml"),
        p.join("blob.ld"),
        repo.join("crates").join("abi").join("src"),
        repo.join("crates").join("abi").join("Cargo.toml"),
    ]
}

fn rustflags(repo: &Path) -> Vec<String> {
    let script = repo.join("parasite").join("blob.ld");
    let mut f: Vec<String> = [
        "-Crelocation-model=pie",
        "-Cpanic=abort",
        "-Ctarget-cpu=x86-64",
        "-Clink-arg=-nostartfiles",
        "-Clink-arg=-nostdlib",
        "-Clink-arg=-static-pie",
        "-Clink-arg=-Wl,--gc-sections",
        "-Clink-arg=-Wl,--build-id=none",
        "-Clink-arg=-Wl,-z,norelro",
        "-Clink-arg=-Wl,--no-dynamic-linker",
        "-Clink-arg=-Wl,-z,noexecstack",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    f.push(format!("-Clink-arg=-Wl,-T,{}", script.display()));
    f
}

/// Builds the parasite and copies it to `blob_dir(repo)/parasite.elf`; returns that path.
/// Cheap when nothing changed (cargo's own incremental check).
pub fn build_parasite(repo: &Path) -> Result<PathBuf, String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = repo.join("target").join("parasite-build");
    let mut cmd = Command::new(cargo);
    cmd.current_dir(repo.join("parasite"))
        .args([
            "build",
            "--release",
            "--quiet",
            "--target",
            TARGET,
            "--target-dir",
        ])
        .arg(&target_dir);
    // Inherited build settings belong to the outer build, not to the blob.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        let inherited = k == "RUSTFLAGS"
            || k == "RUSTC_WRAPPER"
            || k == "RUSTC_WORKSPACE_WRAPPER"
            || k == "RUSTDOCFLAGS"
            || (k.starts_with("CARGO_")
                && !matches!(k.as_str(), "CARGO_HOME" | "CARGO_NET_OFFLINE"))
            || k.starts_with("DEP_")
            || k == "TARGET"
            || k == "HOST"
            || k == "OUT_DIR"
            || k == "OPT_LEVEL"
            || k == "PROFILE"
            || k == "DEBUG";
        if inherited {
            cmd.env_remove(&k);
        }
    }
    cmd.env("CARGO_ENCODED_RUSTFLAGS", rustflags(repo).join("\x1f"));
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run cargo for the parasite: {e}"))?;
    if !status.success() {
        return Err(format!("building the parasite failed ({status})"));
    }
    let built = target_dir
        .join(TARGET)
        .join("release")
        .join("stasis-parasite");
    let out = blob_dir(repo);
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let dest = out.join("parasite.elf");
    let bytes = std::fs::read(&built).map_err(|e| format!("{}: {e}", built.display()))?;
    // Only rewrite when the bytes changed, so dependants are not rebuilt for nothing.
    if std::fs::read(&dest).ok().as_deref() != Some(bytes.as_slice()) {
        std::fs::write(&dest, &bytes).map_err(|e| format!("{}: {e}", dest.display()))?;
    }
    Ok(dest)
}
