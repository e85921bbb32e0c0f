//! `cargo xtask …`: the one entry point for everything that is not the `stasis` binary itself.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::Command;

mod bench;

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the no_std parasite blob and describe it.
    BuildParasite,
    /// Run every test (unit and integration; privileged ones need root, and must run under CI).
    Test,
    /// `cargo fmt --check` and `cargo clippy --all-targets -- -D warnings`.
    Lint,
    /// What CI runs: lint, then test.
    Ci,
    /// Benchmarks: `infect` (seize → vDSO report → cure → detach round trip).
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
    /// Start a small built-in workload and show what stasis sees inside it.
    Demo,
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::BuildParasite => build_parasite(),
        Cmd::Test => test(),
        Cmd::Lint => lint(),
        Cmd::Ci => {
            lint()?;
            test()
        }
        Cmd::Bench { which } => {
            // Figures from an unoptimised build mean nothing: re-run this command in release.
            if cfg!(debug_assertions) {
                let mut c = cargo();
                c.args(["run", "--release", "--quiet", "--package", "xtask", "--"])
                    .args(std::env::args_os().skip(1));
                return run(c);
            }
            bench::run(which)
        }
        Cmd::Demo => demo(),
    }
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(repo_root());
    c
}

fn run(mut cmd: Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("running {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

fn build_parasite() -> Result<()> {
    let root = repo_root();
    let path = stasis_blobbuild::build_parasite(&root).map_err(anyhow::Error::msg)?;
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let blob = stasis_infect::Blob::parse(&bytes)?;
    println!("parasite: {}", path.display());
    println!("  file size      {} bytes", bytes.len());
    println!("  loaded size    {} bytes", blob.len());
    println!("  entry          +{:#x}", blob.entry());
    println!(
        "  relocations    {} (R_X86_64_RELATIVE, applied by the host)",
        blob.reloc_count()
    );
    for (name, off) in &blob.exports {
        println!("  export         +{off:#06x} {name}");
    }
    Ok(())
}

fn test() -> Result<()> {
    let mut c = cargo();
    c.args(["test", "--workspace", "--all-targets"]);
    run(c)?;
    let mut d = cargo();
    d.args(["test", "--workspace", "--doc"]);
    run(d)
}

fn lint() -> Result<()> {
    let mut f = cargo();
    f.args(["fmt", "--all", "--check"]);
    run(f)?;
    let mut c = cargo();
    c.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    run(c)?;
    let mut p = cargo();
    p.current_dir(repo_root().join("parasite"))
        .args(["fmt", "--check"]);
    run(p)
}

fn demo() -> Result<()> {
    let mut b = cargo();
    b.args(["build", "--release", "--quiet", "--bin", "stasis"]);
    run(b)?;
    let stasis = repo_root().join("target/release/stasis");
    println!("== starting the demo workload (a process that reads the clock through its vDSO)");
    let mut child = Command::new(&stasis)
        .arg("demo-workload")
        .spawn()
        .context("starting the demo workload")?;
    std::thread::sleep(std::time::Duration::from_millis(600));
    let pid = child.id().to_string();
    println!("== stasis vdso --pid {pid}");
    let result = run({
        let mut c = Command::new(&stasis);
        c.args(["vdso", "--pid", &pid]);
        c
    });
    std::thread::sleep(std::time::Duration::from_millis(600));
    println!("== the workload kept running; stopping it");
    let _ = child.kill();
    let _ = child.wait();
    result
}
