//! `cargo xtask …`: the one entry point for everything that is not the `stasis` binary itself.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::Command;

mod bench;
mod bench_cr;
mod bench_redis;
mod cross;
mod fuzz;
mod programs;
mod servers;

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
    Test {
        /// Instead: the cross-kernel matrix (images made under one kernel, restored under
        /// another, in QEMU guests; needs root and ../shared/tools).
        #[arg(long)]
        cross_kernel: bool,
        /// Instead: real multi-threaded programs (Python, Node.js, Go, Java) dumped and restored
        /// twice each, which must carry on exactly (needs root; missing toolchains are installed
        /// with apt-get).
        #[arg(long, conflicts_with = "cross_kernel")]
        programs: bool,
    },
    /// `cargo fmt --check` and `cargo clippy --all-targets -- -D warnings`.
    Lint,
    /// What CI runs: lint, then test.
    Ci,
    /// Benchmarks: `infect` (seize → vDSO report → cure → detach round trip), `dump-restore`.
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
    /// Start a small built-in workload and show what stasis sees inside it.
    Demo,
    /// Restore mutated images of a real program: no panic, hang, crash or stray write.
    Fuzz(fuzz::Args),
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::BuildParasite => build_parasite(),
        Cmd::Test {
            cross_kernel,
            programs,
        } => {
            if programs {
                programs::run()
            } else if cross_kernel {
                cross::run()
            } else {
                test()
            }
        }
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
        Cmd::Fuzz(args) => fuzz::run(args),
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
    let skip_log = repo_root().join("target").join("skipped-tests.log");
    let _ = std::fs::remove_file(&skip_log);
    let mut c = cargo();
    c.args(["test", "--workspace", "--all-targets"])
        .env("STASIS_SKIP_LOG", &skip_log);
    let mut totals = run_counted(c)?;
    let skipped = std::fs::read_to_string(&skip_log).unwrap_or_default();
    for line in skipped.lines() {
        println!("SKIPPED {line}");
    }
    // A skipped privileged test counts as "passed" in libtest's own total.
    totals.skipped = skipped.lines().count() as u64;
    totals.passed = totals.passed.saturating_sub(totals.skipped);
    println!(
        "stasis tests: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.skipped
    );
    if totals.failed > 0 || !totals.ok {
        bail!("tests failed");
    }
    if totals.passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

#[derive(Default)]
struct Totals {
    passed: u64,
    failed: u64,
    skipped: u64,
    ok: bool,
}

/// Runs a `cargo test` command, passing its output through while adding up libtest's
/// "test result" lines.
fn run_counted(mut cmd: Command) -> Result<Totals> {
    use std::io::{BufRead, BufReader, Write};
    use std::process::Stdio;
    use std::sync::{Arc, Mutex};
    let totals = Arc::new(Mutex::new(Totals::default()));
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let pump = |stream: Box<dyn std::io::Read + Send>, to_stderr: bool| {
        let totals = totals.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream)
                .lines()
                .map_while(std::result::Result::ok)
            {
                if to_stderr {
                    let _ = writeln!(std::io::stderr(), "{line}");
                } else {
                    let _ = writeln!(std::io::stdout(), "{line}");
                }
                let mut t = totals.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(rest) = line.strip_prefix("test result: ") {
                    let num = |key: &str| {
                        rest.split(';')
                            .find_map(|part| {
                                part.trim()
                                    .strip_suffix(key)?
                                    .trim()
                                    .rsplit(' ')
                                    .next()?
                                    .parse::<u64>()
                                    .ok()
                            })
                            .unwrap_or(0)
                    };
                    t.passed += num(" passed");
                    t.failed += num(" failed");
                }
            }
        })
    };
    let out = pump(
        Box::new(child.stdout.take().context("cargo test stdout")?),
        false,
    );
    let err = pump(
        Box::new(child.stderr.take().context("cargo test stderr")?),
        true,
    );
    let status = child.wait().context("waiting for cargo test")?;
    let _ = out.join();
    let _ = err.join();
    let mut t = std::mem::take(&mut *totals.lock().unwrap_or_else(|e| e.into_inner()));
    t.ok = status.success();
    Ok(t)
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
    run(p)?;
    // The blob is linted for its own target with its own flags (but without the link step).
    let mut pc = cargo();
    pc.current_dir(repo_root().join("parasite"))
        .env_remove("RUSTFLAGS")
        .env("CARGO_ENCODED_RUSTFLAGS", "")
        .args([
            "clippy",
            "--release",
            "--target",
            stasis_blobbuild::TARGET,
            "--target-dir",
        ])
        .arg(repo_root().join("target/parasite-build"))
        .args(["--", "-D", "warnings"]);
    run(pc)
}

fn demo() -> Result<()> {
    use std::os::unix::process::CommandExt;
    use std::time::Duration;
    let mut b = cargo();
    b.args(["build", "--release", "--quiet", "--bin", "stasis"]);
    run(b)?;
    let root = repo_root();
    let stasis = root.join("target/release/stasis");
    let img = root.join("target/demo/image");
    let _ = std::fs::remove_dir_all(&img);
    std::fs::create_dir_all(&img)?;
    let stasis_do = |args: &[&str]| -> Result<()> {
        let mut c = Command::new(&stasis);
        c.args(args);
        run(c)
    };

    println!(
        "== starting the demo workload: it prints a tick with the time (read through its vDSO)"
    );
    // SAFETY: setsid in the child before exec: the workload gets a session of its own, as a
    // real service would, so it does not share our terminal's job control.
    let mut child = unsafe {
        Command::new(&stasis)
            .arg("demo-workload")
            .stdin(std::process::Stdio::null())
            .pre_exec(|| {
                libc::setsid();
                // Only the standard descriptors: whatever our caller leaked would be refused.
                libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
                Ok(())
            })
            .spawn()
            .context("starting the demo workload")?
    };
    let pid = child.id().to_string();
    std::thread::sleep(Duration::from_millis(1100));

    println!("\n== stasis vdso --pid {pid}   (a parasite reports from inside the process)");
    stasis_do(&["vdso", "--pid", &pid])?;

    println!(
        "\n== stasis dump -t {pid} -D {} --shell-job   (frozen, written, killed)",
        img.display()
    );
    let dumped = stasis_do(&[
        "dump",
        "-t",
        &pid,
        "-D",
        &img.to_string_lossy(),
        "--shell-job",
    ]);
    // The workload is our child: reap it so its pid is free for the restore.
    let _ = child.wait();
    dumped?;
    println!("\n== stasis show {}", img.display());
    stasis_do(&["show", &img.to_string_lossy()])?;

    std::thread::sleep(Duration::from_millis(800));
    println!(
        "\n== stasis restore -D {} --detach --shell-job   (same pid; the ticks carry on)",
        img.display()
    );
    stasis_do(&[
        "restore",
        "-D",
        &img.to_string_lossy(),
        "--detach",
        "--shell-job",
    ])?;
    std::thread::sleep(Duration::from_millis(1300));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let state = status
        .lines()
        .find(|l| l.starts_with("State:"))
        .unwrap_or("State: gone")
        .to_string();
    println!("\n== the restored workload (pid {pid}) is running: {state}; stopping it");
    // SAFETY: signalling the restored demo workload.
    unsafe { libc::kill(pid.parse().unwrap_or(0), libc::SIGTERM) };
    Ok(())
}
