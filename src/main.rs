//! The `stasis` command line. Verbs and options follow CRIU where the meaning is the same.
//! Exit codes: 0 success, 1 operation failed, 2 usage error.

mod check;
mod show;

use anyhow::Context;
use clap::{Parser, Subcommand};
use stasis_dump::vdso_report::{self as collect, CollectError, VdsoInfo};
use stasis_infect::InfectError;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "stasis",
    version,
    about = "Checkpoint/restore for live Linux x86_64 processes"
)]
struct Cli {
    /// More log output (-v: phases and timings, -vv: debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Write the log to FILE instead of stderr.
    #[arg(long, value_name = "FILE", global = true)]
    log_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Freeze a process, ask a parasite inside it where its vDSO is and what it exports, cure it.
    Vdso {
        /// The process to inspect.
        #[arg(short = 't', long = "pid", allow_negative_numbers = true)]
        pid: i32,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// A small workload for `cargo xtask demo`: prints a tick with the time (read through the
    /// vDSO) four times a second, for at most a minute.
    #[command(hide = true)]
    DemoWorkload,
    /// Started by `dump` and `vdso`: cures the process they work on if they die mid-way.
    #[command(hide = true, name = "guardian")]
    Guardian,
    /// Started by a dump that tracks memory: holds the process's userfaultfd (descriptor 3)
    /// until the process ends.
    #[command(hide = true, name = "__hold-uffd")]
    HoldUffd { pid: i32, start: u64 },
    /// Save a running process's memory (only) and track its writes from then on, so the dump
    /// after it (`dump --prev-images-dir`) writes only what changed. The process runs on.
    PreDump {
        /// The process (and its descendants) to pre-dump.
        #[arg(short = 't', long = "pid", allow_negative_numbers = true)]
        pid: i32,
        /// Where to write the image (created, or an existing empty directory).
        #[arg(short = 'D', long = "images-dir")]
        images_dir: PathBuf,
        /// An earlier pre-dump this one follows (relative to --images-dir, as in CRIU).
        #[arg(long, value_name = "DIR")]
        prev_images_dir: Option<PathBuf>,
        /// Keep the process frozen until its memory is copied (no copy-on-write snapshot).
        #[arg(long)]
        no_snapshot: bool,
    },
    /// Checkpoint a process into an image directory (the process is killed afterwards unless
    /// --leave-running).
    Dump {
        /// The process to dump.
        #[arg(short = 't', long = "pid", allow_negative_numbers = true)]
        pid: i32,
        /// Where to write the image (created, or an existing empty directory).
        #[arg(short = 'D', long = "images-dir")]
        images_dir: PathBuf,
        /// Let the process continue after the dump. Its memory is read from a copy-on-write
        /// snapshot while it runs on, so it is frozen only while the rest is read.
        #[arg(long)]
        leave_running: bool,
        /// With --leave-running: keep the process frozen until its memory is copied (no
        /// copy-on-write snapshot child).
        #[arg(long, requires = "leave_running")]
        no_snapshot: bool,
        /// Allow a process attached to a terminal (it is taken over on restore).
        #[arg(long)]
        shell_job: bool,
        /// Refuse a process that holds a file lock instead of dumping its locks.
        #[arg(long)]
        no_file_locks: bool,
        /// Accepted for CRIU's users: file locks are dumped by default.
        #[arg(long, hide = true, conflicts_with = "no_file_locks")]
        file_locks: bool,
        /// Dump established TCP connections and keep them: their packets are dropped (an
        /// nftables table) from the dump until the restore has them back.
        #[arg(long)]
        tcp_established: bool,
        /// Let established TCP connections come back closed instead (the program sees them
        /// gone; the peers see them closed at the dump).
        #[arg(long, conflicts_with = "tcp_established")]
        tcp_close: bool,
        /// An earlier image of the process (a pre-dump, or a dump with --track-mem), relative
        /// to --images-dir as in CRIU: pages not written since it are not written again, the
        /// new image takes them from it (a restore needs both).
        #[arg(long, value_name = "DIR")]
        prev_images_dir: Option<PathBuf>,
        /// With --leave-running: track the process's writes from this dump on, for the next
        /// incremental dump.
        #[arg(long, requires = "leave_running")]
        track_mem: bool,
    },
    /// Bring a dumped process back, with its pid, memory, registers and files.
    Restore {
        /// The image directory.
        #[arg(short = 'D', long = "images-dir")]
        images_dir: PathBuf,
        /// Return once the process runs, instead of waiting for it and exiting with its status.
        #[arg(short = 'd', long)]
        detach: bool,
        /// Give a process that was attached to a terminal this stasis's terminal.
        #[arg(long)]
        shell_job: bool,
        /// vDSO strategy: remap this kernel's vDSO into place (same vDSO only), proxy the
        /// dumped one into it, or choose (auto).
        #[arg(long, value_enum, default_value = "auto")]
        vdso: VdsoArg,
        /// Restore an image that carries no valid MAC of this machine's image key (made by
        /// another user, on another machine, or altered since): as root, its credentials,
        /// files and program are then taken as they are.
        #[arg(long)]
        trust_image: bool,
        /// Leave every restored process stopped (SIGSTOP) before it runs an instruction of
        /// its own; SIGCONT lets it go (CRIU's --leave-stopped).
        #[arg(long)]
        leave_stopped: bool,
        /// Let the processes run before their private anonymous memory is in: this stasis
        /// serves each page on its first touch and pushes the rest meanwhile, staying their
        /// tracer (they die with it) until every page is in; with -d it returns then.
        #[arg(long)]
        lazy_pages: bool,
    },
    /// Describe an image.
    Show {
        /// The image directory.
        dir: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Report the kernel features stasis relies on and the runtime vDSO layout.
    Check {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// `--vdso`: how to bring back the vDSO (see `stasis_restore::VdsoMode`).
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum VdsoArg {
    /// Remap when this kernel's vDSO matches the image's, proxy otherwise.
    Auto,
    /// Only remap; fail when the vDSOs differ.
    Remap,
    /// Always proxy, even on the same kernel.
    Proxy,
}

impl From<VdsoArg> for stasis_restore::VdsoMode {
    fn from(a: VdsoArg) -> Self {
        match a {
            VdsoArg::Auto => Self::Auto,
            VdsoArg::Remap => Self::Remap,
            VdsoArg::Proxy => Self::Proxy,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = init_logging(cli.verbose, cli.log_file.as_deref()) {
        eprintln!("stasis: {e:#}");
        return ExitCode::from(2);
    }
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("stasis: {}", cut(&format!("{e:#}")));
            ExitCode::from(exit_code_for(&e))
        }
    }
}

/// Starts the guardian that cures the target if this stasis is killed mid-way.
fn guardian() -> anyhow::Result<stasis_infect::guardian::Guardian> {
    let exe = std::env::current_exe().context("finding the stasis binary for its guardian")?;
    Ok(stasis_infect::guardian::start(&exe)?)
}

/// An error line at most `MAX_ERROR` characters long: names and paths come from images and
/// targets, and may be of any length; the middle of a longer line is left out, saying so.
fn cut(line: &str) -> String {
    const MAX_ERROR: usize = 2000;
    let chars: Vec<char> = line.chars().collect();
    if chars.len() <= MAX_ERROR {
        return line.to_string();
    }
    let head: String = chars[..MAX_ERROR / 2].iter().collect();
    let tail: String = chars[chars.len() - MAX_ERROR / 2..].iter().collect();
    format!(
        "{head}…({} characters left out)…{tail}",
        chars.len() - MAX_ERROR
    )
}

fn exit_code_for(e: &anyhow::Error) -> u8 {
    // An invalid pid is a usage error (exit 2) whichever command met it.
    let usage = matches!(
        e.downcast_ref::<CollectError>(),
        Some(CollectError::Infect(InfectError::InvalidPid(_)))
    ) || matches!(
        e.downcast_ref::<InfectError>(),
        Some(InfectError::InvalidPid(_))
    );
    if usage {
        2
    } else {
        1
    }
}

fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Guardian => Ok(ExitCode::from(
            stasis_infect::guardian::serve().clamp(0, 255) as u8,
        )),
        Command::Vdso { pid, json } => {
            let _guardian = guardian()?;
            let (info, _) = collect::vdso_report(pid)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&info).context("encoding JSON")?
                );
            } else {
                print_vdso(&info);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Dump {
            pid,
            images_dir,
            leave_running,
            no_snapshot,
            shell_job,
            no_file_locks,
            file_locks: _,
            tcp_established,
            tcp_close,
            prev_images_dir,
            track_mem,
        } => {
            let opts = stasis_dump::DumpOptions {
                leave_running,
                shell_job,
                file_locks: !no_file_locks,
                tcp_established,
                tcp_close,
                snapshot: !no_snapshot,
                pre_dump: false,
                prev_images_dir,
                track_mem,
            };
            dump(pid, &images_dir, &opts)
        }
        Command::PreDump {
            pid,
            images_dir,
            prev_images_dir,
            no_snapshot,
        } => {
            let opts = stasis_dump::DumpOptions {
                leave_running: true,
                shell_job: true,
                file_locks: true,
                tcp_established: false,
                tcp_close: false,
                snapshot: !no_snapshot,
                pre_dump: true,
                prev_images_dir,
                track_mem: true,
            };
            dump(pid, &images_dir, &opts)
        }
        Command::HoldUffd { pid, start } => {
            stasis_dump::track::hold(pid, start)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Restore {
            images_dir,
            detach,
            shell_job,
            vdso,
            trust_image,
            leave_stopped,
            lazy_pages,
        } => {
            let opts = stasis_restore::RestoreOptions {
                detach,
                trust_image,
                leave_stopped,
                lazy_pages,
                shell_job,
                vdso: vdso.into(),
            };
            stasis_image::progress::enable("restore");
            let status = stasis_restore::restore(&images_dir, &opts);
            stasis_image::progress::finish();
            let status = status?;
            Ok(ExitCode::from(status.clamp(0, 255) as u8))
        }
        Command::Show { dir, json } => {
            show::show(&dir, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::DemoWorkload => {
            let start = std::time::Instant::now();
            for tick in 0..240u32 {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                println!(
                    "demo workload (pid {}): tick {tick}, time {:.3}, up {:.2}s",
                    std::process::id(),
                    now.as_secs_f64(),
                    start.elapsed().as_secs_f64()
                );
                std::thread::sleep(std::time::Duration::from_millis(250));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { json } => {
            let report = check::run_checks();
            check::print_report(&report, json);
            Ok(if report.all_required_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

fn print_vdso(info: &VdsoInfo) {
    let comm = stasis_proc::stat(info.pid)
        .map(|s| s.comm)
        .unwrap_or_default();
    println!("pid {} ({comm})", info.pid);
    if info.layout.is_empty() {
        println!("  no vDSO or vvar area is mapped");
    } else {
        println!("  layout: {}", info.layout.describe());
        for a in &info.layout.areas {
            println!(
                "  {:<14} {:#014x}-{:#014x} {:>6} {}",
                a.name,
                a.start,
                a.end,
                stasis_vdso::human_size(a.size()),
                stasis_proc::prot_string(a.prot)
            );
        }
    }
    let auxv = match (info.auxv_ehdr, info.vdso_mapped, info.auxv_matches) {
        (0, _, _) => "none".to_string(),
        (a, true, true) => format!("{a:#x} (the [vdso] above)"),
        (a, true, false) => format!(
            "{a:#x} (stale: the [vdso] was moved to {:#x})",
            info.vdso_base
        ),
        (a, false, _) => format!("{a:#x} (stale: the vDSO was unmapped)"),
    };
    println!("  AT_SYSINFO_EHDR: {auxv}, read via {}", info.auxv_source);
    if !info.vdso_mapped {
        return;
    }
    println!("  {} exported symbols:", info.symbols.len());
    for s in &info.symbols {
        let version = if s.version.is_empty() {
            "-"
        } else {
            &s.version
        };
        println!(
            "    {:<40} {:<10} +{:#06x} {:>5} bytes",
            s.name, version, s.offset, s.size
        );
    }
}

fn init_logging(verbose: u8, file: Option<&std::path::Path>) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_env("STASIS_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    match file {
        Some(path) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening log file {}", path.display()))?;
            builder
                .with_writer(std::sync::Mutex::new(f))
                .with_ansi(false)
                .init();
        }
        None => builder.with_writer(std::io::stderr).init(),
    }
    Ok(())
}

/// `dump` and `pre-dump`: the dump, and its summary line.
fn dump(
    pid: i32,
    images_dir: &std::path::Path,
    opts: &stasis_dump::DumpOptions,
) -> anyhow::Result<ExitCode> {
    let _guardian = guardian()?;
    stasis_image::progress::enable("dump");
    let s = stasis_dump::dump(pid, images_dir, opts);
    stasis_image::progress::finish();
    let s = s?;
    let mib = |pages: u64| (pages * 4096) as f64 / (1 << 20) as f64;
    eprintln!(
        "{} pid {pid} into {}: {}{} thread{}, {} VMAs, {} pages ({:.1} MiB){}{}; frozen {:.1} ms{}, total {:.1} ms",
        if opts.pre_dump { "pre-dumped" } else { "dumped" },
        images_dir.display(),
        if s.processes > 1 {
            format!("{} processes, ", s.processes)
        } else {
            String::new()
        },
        s.threads,
        if s.threads == 1 { "" } else { "s" },
        s.vmas,
        s.pages,
        s.bytes as f64 / (1 << 20) as f64,
        if s.parent_pages > 0 {
            format!(
                " written, {} unchanged ({:.1} MiB) in the parent images",
                s.parent_pages,
                mib(s.parent_pages)
            )
        } else {
            String::new()
        },
        if opts.pre_dump {
            String::new()
        } else {
            format!(", {} fds", s.fds)
        },
        s.frozen.as_secs_f64() * 1e3,
        if s.snapshots > 0 {
            format!(
                " (memory copied from a snapshot after; {:.1} ms more to reap it)",
                s.reap_frozen.as_secs_f64() * 1e3
            )
        } else {
            String::new()
        },
        s.total.as_secs_f64() * 1e3
    );
    Ok(ExitCode::SUCCESS)
}
