//! Benchmarks. Figures are medians (and p95) over many runs, measured in-process.

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use std::process::{Child, Command};
use std::time::Duration;

#[derive(Subcommand)]
pub enum Which {
    /// Whole round trip on a sleeping process: seize → vDSO report → cure → detach.
    Infect {
        /// Number of measured runs.
        #[arg(long, default_value_t = 200)]
        runs: usize,
    },
    /// Dump and restore of a process holding N MiB of distinct pages, against CRIU if found.
    DumpRestore {
        /// Sizes in MiB.
        #[arg(long, value_delimiter = ',', default_value = "16,256,1024")]
        sizes: Vec<u64>,
        /// Measured runs per size and tool.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Threads of the workload (all but one nap in nanosleep).
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Processes of the workload: a parent and N-1 children, each with the threads and
        /// 1/N of the memory.
        #[arg(long, default_value_t = 1)]
        processes: usize,
        /// A CRIU (>= 4.1) binary to measure in the same run; default: `criu` on PATH.
        #[arg(long)]
        criu: Option<std::path::PathBuf>,
        /// After the dump/restore table, the same sizes through `leave-running`,
        /// `incremental` and `lazy`: every figure of the speed goals in one run.
        #[arg(long)]
        all: bool,
    },
    /// `--leave-running` dumps of a process holding N MiB: the freeze the process itself sees
    /// (the longest gap between its 1 ms wake-ups) and the dump's wall time, for stasis (with
    /// its copy-on-write snapshot and with `--no-snapshot`) and CRIU if found. The last
    /// snapshot image of each size is restored and its memory verified.
    LeaveRunning {
        /// Sizes in MiB.
        #[arg(long, value_delimiter = ',', default_value = "256,1024")]
        sizes: Vec<u64>,
        /// Measured dumps per size and tool.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// A CRIU (>= 4.1) binary to measure in the same run; default: `criu` on PATH.
        #[arg(long)]
        criu: Option<std::path::PathBuf>,
    },
    /// Incremental dumps: a pre-dump of a process holding N MiB, 16 MiB rewritten, then a
    /// `--leave-running` dump with `--prev-images-dir`: bytes written and the freeze, beside
    /// a full dump after the same writes, and CRIU's pre-dump tried. The last incremental
    /// image is restored and its memory verified.
    Incremental {
        /// Sizes in MiB.
        #[arg(long, value_delimiter = ',', default_value = "256,1024")]
        sizes: Vec<u64>,
        /// Measured runs per size.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// A CRIU (>= 4.1) binary to try in the same run; default: `criu` on PATH.
        #[arg(long)]
        criu: Option<std::path::PathBuf>,
    },
    /// Time until a restored process runs, and until the restore is done: a plain restore
    /// and `--lazy-pages`, and CRIU's restore, of a process holding N MiB.
    Lazy {
        /// Sizes in MiB.
        #[arg(long, value_delimiter = ',', default_value = "256,1024")]
        sizes: Vec<u64>,
        /// Measured restores per size and tool.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// A CRIU (>= 4.1) binary to measure in the same run; default: `criu` on PATH.
        #[arg(long)]
        criu: Option<std::path::PathBuf>,
    },
    /// redis-server with N MiB of values and C open client connections: dump with
    /// `--tcp-established` and restore, and how long the connections are held; CRIU tried on
    /// the same server.
    Redis {
        #[arg(long, default_value_t = 256)]
        mib: u64,
        #[arg(long, default_value_t = 100)]
        conns: usize,
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// How long a `--leave-running` dump keeps the process frozen, by thread count: the cost
    /// of each further thread.
    Freeze {
        /// Thread counts to measure.
        #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
        threads: Vec<usize>,
        /// Measured dumps per thread count.
        #[arg(long, default_value_t = 9)]
        runs: usize,
    },
}

pub fn run(which: Which) -> Result<()> {
    match which {
        Which::Infect { runs } => infect(runs),
        Which::DumpRestore {
            sizes,
            runs,
            threads,
            processes,
            criu,
            all,
        } => {
            let criu = crate::bench_cr::find_criu(criu);
            crate::bench_cr::run(
                &sizes,
                runs,
                crate::bench_cr::Shape { threads, processes },
                criu.clone(),
            )?;
            if all {
                crate::bench_cr::leave_running(&sizes, runs, criu.clone())?;
                crate::bench_cr::incremental(&sizes, runs, criu.clone())?;
                crate::bench_cr::lazy(&sizes, runs, criu)?;
            }
            Ok(())
        }
        Which::Freeze { threads, runs } => crate::bench_cr::freeze(&threads, runs),
        Which::LeaveRunning { sizes, runs, criu } => {
            crate::bench_cr::leave_running(&sizes, runs, crate::bench_cr::find_criu(criu))
        }
        Which::Incremental { sizes, runs, criu } => {
            crate::bench_cr::incremental(&sizes, runs, crate::bench_cr::find_criu(criu))
        }
        Which::Lazy { sizes, runs, criu } => {
            crate::bench_cr::lazy(&sizes, runs, crate::bench_cr::find_criu(criu))
        }
        Which::Redis { mib, conns, runs } => crate::bench_redis::run(mib, conns, runs),
    }
}

struct Target(Child);

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn infect(runs: usize) -> Result<()> {
    if runs < 1 {
        bail!("--runs must be at least 1");
    }
    let target = Target(
        Command::new("sleep")
            .arg("600")
            .spawn()
            .context("starting `sleep 600`")?,
    );
    let pid = target.0.id() as i32;
    std::thread::sleep(Duration::from_millis(100));
    // Warm-up: page cache, the parsed blob, the first fault-ins.
    for _ in 0..5 {
        stasis_dump::vdso_report::vdso_report(pid)?;
    }
    let mut total = Vec::with_capacity(runs);
    let mut phases = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = std::time::Instant::now();
        let (_, ph) = stasis_dump::vdso_report::vdso_report(pid)?;
        total.push(t.elapsed());
        phases.push(ph);
    }
    let med = |mut v: Vec<Duration>| -> (Duration, Duration) {
        v.sort();
        (v[v.len() / 2], v[(v.len() * 95 / 100).min(v.len() - 1)])
    };
    let (m, p95) = med(total);
    println!(
        "bench infect: {runs} runs on `sleep` (pid {pid}), whole round trip incl. host cross-check"
    );
    println!("  median {:>8.1} µs   p95 {:>8.1} µs", us(m), us(p95));
    let phase = |name: &str, f: fn(&stasis_dump::vdso_report::Timings) -> Duration| {
        let (m, p) = med(phases.iter().map(f).collect());
        println!(
            "  {name:<8} median {:>8.1} µs   p95 {:>8.1} µs",
            us(m),
            us(p)
        );
    };
    phase("seize", |t| t.seize);
    phase("infect", |t| t.infect);
    phase("command", |t| t.command);
    phase("cure", |t| t.cure);
    phase("release", |t| t.release);
    phase("verify", |t| t.verify);
    Ok(())
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
