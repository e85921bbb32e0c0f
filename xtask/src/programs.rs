//! `cargo xtask test --programs`: real programs that nobody here wrote — the Python, Node.js, Go
//! and Java runtimes — are dumped, restored, dumped and restored again, and must carry on exactly.
//! So are four servers driven by their real clients (redis with `redis-cli`, Python's
//! `http.server` and nginx with `curl`, a Python asyncio echo server with a connection kept
//! open) and a Python program holding socket pairs with data queued, compared with CRIU on
//! the same program: see `servers.rs`.
//!
//! What is proven, per workload (sources in `xtask/programs/`, each multi-threaded):
//!
//! - **Execution continues exactly where it stopped.** Each program appends `tick <n>` to a tick
//!   file every ~100 ms, one `write` per line, n = 0, 1, 2, … After each restore the harness
//!   reads the whole file: every line well-formed, n strictly consecutive from 0, no gap and no
//!   repeat across either dump/restore boundary. While the process is dumped (killed), the file
//!   must not grow.
//! - **Memory and threads survive.** Each program builds state deterministically at start (4 MiB
//!   of seeded pseudo-random data with a hash per 64 KiB block, a dict/Map/map/HashMap of 50 000
//!   entries) and worker threads (a `threading.Thread`; the libuv pool via `crypto.pbkdf2`;
//!   goroutines on several OS threads; Java threads) keep running checksums over it. On SIGTERM
//!   the program stops its workers, regenerates the data from the seed and compares every byte,
//!   replays every checksum chain, requires every worker to have advanced within the last 20
//!   ticks (so the workers really run after the restore: the harness waits 25 ticks after the
//!   last restore), cross-checks the tick file against its in-memory counter, and writes
//!   `PASS: …` or `FAIL: reason` to a verdict file. The harness requires `PASS`.
//! - **File locks hold across the trip.** Two more Python workloads (`sqlite`, `sqlite-wal`)
//!   also insert one row per tick into an sqlite database inside one `BEGIN IMMEDIATE`
//!   transaction held open from start to SIGTERM, in rollback-journal and in WAL mode (where the
//!   locks are on the `-shm` file, which is also mapped shared). Before the first dump and after
//!   every restore a second writer (another `python3`) must be locked out at once ("database
//!   is locked"); on SIGTERM the program commits — which must succeed — and a new connection
//!   must read back exactly one row per tick.
//! - **A process tree comes back whole.** The `pipeline` workload is a bash pipeline —
//!   `while …; do echo "tick $i"; sleep 0.1; done | grep --line-buffered | cat > TICKS`: the
//!   shell, the counting subshell (forking `sleep` every tick), grep and cat, linked by two
//!   pipes — dumped as a tree and restored with every pid; the ticks must be continuous (no
//!   orphan writes while it is dumped: the file must not grow), and at the end the whole
//!   session is killed.
//! - **The runtimes are unmodified.** The machine's `python3`, `node` (18+), `go` (the binary
//!   is built at test time, standard library only, no module downloads) and `java` (compiled
//!   with `javac` at test time), started as a service would be: own session, stdin
//!   `/dev/null`, stdout and stderr into a log file, no inherited descriptors.
//!
//! How, per workload: make sure the toolchain is there (as root, missing ones are installed with
//! `apt-get`; without root a missing toolchain skips the workload outside CI and fails it under
//! `CI=true`; so does not being root at all, which ptrace and `clone3(set_tid)` need), build it,
//! start it, wait for its pid file and a few ticks, then twice: `stasis dump -t PID -D DIR`
//! (which kills it), wait until the pid is gone (this process is made a child subreaper, so the
//! original and every restored copy are its children and are reaped at once), check the ticks,
//! sleep a second, `stasis restore -D DIR --detach` (same pid), wait for more ticks, check them
//! again. Then SIGTERM and the program's own verdict. On a failure the stasis error output, the
//! program's log and the end of its tick file are shown, the process is stopped (SIGTERM first,
//! and its verdict shown: a refused dump leaves it running, and its verdict tells whether it was
//! harmed), and the next workload runs. A table and `programs: N passed, N failed, N skipped`
//! close the run; any failure makes it an error. Work files are in `target/programs/<name>/`
//! (removed after a pass).
//!
//! **Programs on terminals.** vim with an unsaved buffer, `top`, the `sqlite3` shell with an
//! open transaction and a bash pipeline, each in a tmux pane, are dumped as shell jobs and
//! restored on another pane, then driven by keystrokes sent through tmux; `script` runs a
//! counter on a pty of its own and is dumped and restored with it. These are the tests of
//! `tests/terminals.rs` and `tests/pty.rs` (`TERMINAL_PROGRAMS`), run here one by one, each a
//! row of the table; their tools (tmux, vim, sqlite3, procps, bsdutils) are installed with
//! `apt-get` as root when missing.
//!
//! Self-tests of the harness, not for normal use: `STASIS_PROGRAMS=python,go` runs only those;
//! `STASIS_PROGRAMS_SINGLE_THREAD=1` runs the Python workload without its worker thread (to
//! exercise the whole cycle on a stasis that only handles single-threaded processes);
//! `STASIS_PROGRAMS_CORRUPT=data|map|worker` makes every program damage that part of its own
//! state at tick 5, so its verdict must be a `FAIL`.

use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A tool a workload needs, and the Debian package that brings it.
struct Tool {
    bin: &'static str,
    package: &'static str,
    /// Lowest major version (of `bin --version`'s `vN.…`), if it matters.
    min_major: Option<u32>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Python,
    Node,
    Go,
    Java,
    /// A bash pipeline: a tree of processes (see `PIPELINE`).
    Shell,
    /// A server driven by its own client (`servers.rs`).
    Server(crate::servers::Server),
}

/// The pipeline workload, run as `bash -c PIPELINE TICKS PIDFILE VERDICT` ($0 $1 $2): the
/// shell, a subshell counting (forking `sleep` each time), grep and cat — four processes and
/// a transient fifth — writing `tick <n>` lines through two pipes into the tick file.
const PIPELINE: &str = r#"echo $$ > "$1.tmp" && mv "$1.tmp" "$1"
i=0; while :; do echo "tick $i"; i=$((i+1)); sleep 0.1; done | grep --line-buffered '^tick' | cat > "$0""#;

struct Program {
    name: &'static str,
    kind: Kind,
    tools: &'static [Tool],
    /// Time allowed from start to the pid file.
    startup: Duration,
    /// Time allowed for the ticks awaited after a restore.
    resume: Duration,
    /// Time allowed from SIGTERM to the verdict.
    verdict: Duration,
    /// The Python workload also holds an sqlite transaction open (in this journal mode): a
    /// second writer must be locked out before the first dump and after every restore.
    sqlite: Option<&'static str>,
}

const PYTHON: &[Tool] = &[Tool {
    bin: "python3",
    package: "python3",
    min_major: None,
}];

const PROGRAMS: &[Program] = &[
    Program {
        name: "python",
        kind: Kind::Python,
        tools: PYTHON,
        startup: Duration::from_secs(20),
        resume: Duration::from_secs(20),
        verdict: Duration::from_secs(15),
        sqlite: None,
    },
    Program {
        name: "sqlite",
        kind: Kind::Python,
        tools: PYTHON,
        startup: Duration::from_secs(20),
        resume: Duration::from_secs(20),
        verdict: Duration::from_secs(15),
        sqlite: Some("delete"),
    },
    Program {
        name: "sqlite-wal",
        kind: Kind::Python,
        tools: PYTHON,
        startup: Duration::from_secs(20),
        resume: Duration::from_secs(20),
        verdict: Duration::from_secs(15),
        sqlite: Some("wal"),
    },
    Program {
        name: "pipeline",
        kind: Kind::Shell,
        tools: &[Tool {
            bin: "bash",
            package: "bash",
            min_major: None,
        }],
        startup: Duration::from_secs(20),
        resume: Duration::from_secs(20),
        verdict: Duration::from_secs(15),
        sqlite: None,
    },
    Program {
        name: "node",
        kind: Kind::Node,
        tools: &[Tool {
            bin: "node",
            package: "nodejs",
            min_major: Some(18),
        }],
        startup: Duration::from_secs(20),
        resume: Duration::from_secs(20),
        verdict: Duration::from_secs(15),
        sqlite: None,
    },
    Program {
        name: "go",
        kind: Kind::Go,
        tools: &[Tool {
            bin: "go",
            package: "golang-go",
            min_major: None,
        }],
        startup: Duration::from_secs(20),
        resume: Duration::from_secs(20),
        verdict: Duration::from_secs(15),
        sqlite: None,
    },
    Program {
        name: "java",
        kind: Kind::Java,
        tools: &[
            Tool {
                bin: "java",
                package: "default-jdk-headless",
                min_major: None,
            },
            Tool {
                bin: "javac",
                package: "default-jdk-headless",
                min_major: None,
            },
        ],
        startup: Duration::from_secs(45),
        resume: Duration::from_secs(40),
        verdict: Duration::from_secs(30),
        sqlite: None,
    },
    Program {
        name: "redis",
        kind: Kind::Server(crate::servers::Server::Redis),
        tools: &[
            Tool {
                bin: "redis-server",
                package: "redis-server",
                min_major: None,
            },
            Tool {
                bin: "redis-cli",
                package: "redis-tools",
                min_major: None,
            },
        ],
        startup: Duration::from_secs(20),
        resume: Duration::from_secs(20),
        verdict: Duration::from_secs(15),
        sqlite: None,
    },
    Program {
        name: "http.server",
        kind: Kind::Server(crate::servers::Server::PythonHttp),
        tools: &[
            Tool {
                bin: "python3",
                package: "python3",
                min_major: None,
            },
            Tool {
                bin: "curl",
                package: "curl",
                min_major: None,
            },
        ],
        startup: Duration::from_secs(20),
        resume: Duration::from_secs(20),
        verdict: Duration::from_secs(15),
        sqlite: None,
    },
    Program {
        name: "asyncio",
        kind: Kind::Server(crate::servers::Server::AsyncioEcho),
        tools: PYTHON,
        startup: Duration::from_secs(20),
        resume: Duration::from_secs(20),
        verdict: Duration::from_secs(15),
        sqlite: None,
    },
    Program {
        name: "socketpair",
        kind: Kind::Server(crate::servers::Server::SocketPair),
        tools: PYTHON,
        startup: Duration::from_secs(20),
        resume: Duration::from_secs(20),
        verdict: Duration::from_secs(15),
        sqlite: None,
    },
    Program {
        name: "nginx",
        kind: Kind::Server(crate::servers::Server::Nginx),
        tools: &[
            Tool {
                bin: "nginx",
                package: "nginx",
                min_major: None,
            },
            Tool {
                bin: "curl",
                package: "curl",
                min_major: None,
            },
        ],
        startup: Duration::from_secs(20),
        resume: Duration::from_secs(20),
        verdict: Duration::from_secs(15),
        sqlite: None,
    },
];

/// Dump/restore cycles per workload.
const CYCLES: usize = 2;
/// Ticks awaited before the first dump.
const FIRST_TICKS: usize = 5;
/// New ticks awaited after a restore; after the last one more than the programs' stall limit
/// (20 ticks), so a worker that did not come back is caught by the program's own verdict.
const RESUMED_TICKS: usize = 10;
const FINAL_TICKS: usize = 25;
/// How long a dumped process stays dead before it is restored.
const DEAD_TIME: Duration = Duration::from_secs(1);
/// Limits for one stasis command and for a killed process to disappear.
const STASIS_TIMEOUT: Duration = Duration::from_secs(120);
const GONE_TIMEOUT: Duration = Duration::from_secs(15);
/// Lines of the tick file shown after a failure.
const TAIL_LINES: usize = 8;

enum Outcome {
    Pass(String),
    Fail(String),
    Skipped(String),
}

/// Options of the harness's own self-tests (see the module doc).
struct SelfTest {
    single_thread: bool,
    corrupt: Option<String>,
}

struct Ctx {
    stasis: PathBuf,
    sources: PathBuf,
    work: PathBuf,
    self_test: SelfTest,
}

pub fn run() -> Result<()> {
    let t_all = Instant::now();
    let ci = std::env::var("CI").map(|v| v == "true").unwrap_or(false);
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let selected = select()?;
    let self_test = SelfTest {
        single_thread: std::env::var("STASIS_PROGRAMS_SINGLE_THREAD").is_ok_and(|v| v == "1"),
        corrupt: std::env::var("STASIS_PROGRAMS_CORRUPT").ok(),
    };
    if let Some(kind) = &self_test.corrupt {
        if !["data", "map", "worker"].contains(&kind.as_str()) {
            bail!("STASIS_PROGRAMS_CORRUPT must be data, map or worker, not {kind:?}");
        }
    }
    let repo = crate::repo_root();
    let work = repo.join("target/programs");
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;

    let mut outcomes: Vec<(&'static str, Outcome)> = Vec::new();
    let mut runnable = Vec::new();
    for (p, ready) in toolchains(&selected, root, &work) {
        match ready {
            Err(why) if !root && !ci => outcomes.push((p.name, Outcome::Skipped(why))),
            Err(why) => outcomes.push((p.name, Outcome::Fail(why))),
            Ok(()) if !root => {
                let why = "needs root (ptrace of the workload, clone3 with set_tid)".to_string();
                outcomes.push((
                    p.name,
                    if ci {
                        Outcome::Fail(why)
                    } else {
                        Outcome::Skipped(why)
                    },
                ));
            }
            Ok(()) => runnable.push(p),
        }
    }
    for (name, o) in &outcomes {
        match o {
            Outcome::Skipped(why) => println!("SKIPPED {name}: {why}; not under CI, so skipping"),
            Outcome::Fail(why) => println!("FAILED {name}: {why}"),
            Outcome::Pass(_) => {}
        }
    }

    if !runnable.is_empty() {
        let mut b = crate::cargo();
        b.args(["build", "--release", "--quiet", "--bin", "stasis"]);
        crate::run(b).context("building stasis")?;
        // The restored processes are re-parented to the nearest subreaper when `stasis restore
        // --detach` exits: make that us, so each one is reaped the moment a dump kills it.
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
            bail!(
                "prctl(PR_SET_CHILD_SUBREAPER): {}",
                std::io::Error::last_os_error()
            );
        }
        let ctx = Ctx {
            stasis: repo.join("target/release/stasis"),
            sources: repo.join("xtask/programs"),
            work: work.clone(),
            self_test,
        };
        for p in runnable {
            let outcome = run_program(p, &ctx);
            outcomes.push((p.name, outcome));
        }
    }

    outcomes.extend(run_terminal_programs(root, ci, &work));
    // In the order of PROGRAMS, then TERMINAL_PROGRAMS, whatever became of each.
    outcomes.sort_by_key(|(name, _)| {
        PROGRAMS.iter().position(|p| p.name == *name).or_else(|| {
            TERMINAL_PROGRAMS
                .iter()
                .position(|t| t.0 == *name)
                .map(|i| 1000 + i)
        })
    });
    println!();
    println!("{:<9} {:<8} detail", "program", "result");
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for (name, o) in &outcomes {
        let (result, detail) = match o {
            Outcome::Pass(d) => {
                passed += 1;
                ("PASS", d)
            }
            Outcome::Fail(d) => {
                failed += 1;
                ("FAIL", d)
            }
            Outcome::Skipped(d) => {
                skipped += 1;
                ("SKIPPED", d)
            }
        };
        println!("{name:<9} {result:<8} {detail}");
    }
    println!("(whole run {:.1} s)", t_all.elapsed().as_secs_f64());
    println!("programs: {passed} passed, {failed} failed, {skipped} skipped");
    if failed > 0 {
        bail!("{failed} of {} programs failed", outcomes.len());
    }
    Ok(())
}

/// Programs on terminals, run as the integration tests that drive them: (name in the table,
/// test file, test function, tools).
const TERMINAL_PROGRAMS: &[(&str, &str, &str, &[Tool])] = &[
    (
        "vim",
        "terminals",
        "vim_in_tmux_keeps_its_unsaved_buffer_and_saves_it_after_restore",
        &[
            TMUX,
            Tool {
                bin: "vim",
                package: "vim",
                min_major: None,
            },
        ],
    ),
    (
        "top",
        "terminals",
        "top_in_tmux_comes_back_on_another_pane_and_takes_keystrokes_at_once",
        &[
            TMUX,
            Tool {
                bin: "top",
                package: "procps",
                min_major: None,
            },
        ],
    ),
    (
        "sqlite3",
        "terminals",
        "sqlite3_in_tmux_keeps_its_transaction_and_commits_after_restore",
        &[
            TMUX,
            Tool {
                bin: "sqlite3",
                package: "sqlite3",
                min_major: None,
            },
        ],
    ),
    (
        "tmux-pipe",
        "terminals",
        "a_shell_pipeline_in_tmux_carries_on_on_another_pane",
        &[TMUX],
    ),
    (
        "script",
        "pty",
        "script_running_a_counter_carries_on_after_restore",
        &[Tool {
            bin: "script",
            package: "bsdutils",
            min_major: None,
        }],
    ),
];

const TMUX: Tool = Tool {
    bin: "tmux",
    package: "tmux",
    min_major: None,
};

/// Runs the terminal programs that `STASIS_PROGRAMS` selects (all without it).
fn run_terminal_programs(root: bool, ci: bool, work: &Path) -> Vec<(&'static str, Outcome)> {
    let wanted: Option<Vec<String>> = std::env::var("STASIS_PROGRAMS")
        .ok()
        .map(|l| l.split(',').map(|s| s.trim().to_string()).collect());
    let mut out = Vec::new();
    // The tests wait for their dumped processes to be reaped by init (or their own parents):
    // orphans must not come to this process (a subreaper for the workloads above), which
    // would not reap them while it waits for the test.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0) };
    for &(name, file, test, tools) in TERMINAL_PROGRAMS {
        if wanted
            .as_ref()
            .is_some_and(|w| !w.iter().any(|n| n == name))
        {
            continue;
        }
        let missing: Vec<&str> = tools
            .iter()
            .filter(|t| usable(t).is_err())
            .map(|t| t.package)
            .collect();
        if !missing.is_empty() && root {
            let log = work.join(format!("{name}-apt.log"));
            if let Err(e) = apt_install(&missing, &log) {
                out.push((
                    name,
                    Outcome::Fail(format!("installing {missing:?}: {e:#}")),
                ));
                continue;
            }
        }
        if let Some(t) = tools.iter().find(|t| usable(t).is_err()) {
            let why = format!("{} is not installed", t.bin);
            out.push((
                name,
                if ci {
                    Outcome::Fail(why)
                } else {
                    Outcome::Skipped(why)
                },
            ));
            continue;
        }
        let t0 = Instant::now();
        let o = crate::cargo()
            .args(["test", "--quiet", "--test", file, test, "--", "--exact"])
            .stdin(Stdio::null())
            .output();
        let outcome = match o {
            Err(e) => Outcome::Fail(format!("running cargo test: {e}")),
            Ok(o) => {
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
                let ran = text.contains("test result: ok. 1 passed");
                if let Some(line) = text.lines().find(|l| l.starts_with("SKIPPED")) {
                    if ci {
                        Outcome::Fail(line.to_string())
                    } else {
                        Outcome::Skipped(line.to_string())
                    }
                } else if o.status.success() && ran {
                    Outcome::Pass(format!(
                        "tests/{file}.rs {test} ({:.1} s)",
                        t0.elapsed().as_secs_f64()
                    ))
                } else {
                    print_indented(&tail(&text, 30));
                    Outcome::Fail(format!("tests/{file}.rs {test} failed ({})", o.status))
                }
            }
        };
        if let Outcome::Fail(why) = &outcome {
            println!("FAILED {name}: {why}");
        }
        out.push((name, outcome));
    }
    out
}

/// The workloads to run: all, or those named in `STASIS_PROGRAMS` (comma-separated).
fn select() -> Result<Vec<&'static Program>> {
    let Ok(list) = std::env::var("STASIS_PROGRAMS") else {
        return Ok(PROGRAMS.iter().collect());
    };
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty() && !TERMINAL_PROGRAMS.iter().any(|t| t.0 == *s))
        .map(|name| {
            PROGRAMS.iter().find(|p| p.name == name).with_context(|| {
                let known: Vec<_> = PROGRAMS.iter().map(|p| p.name).collect();
                format!(
                    "STASIS_PROGRAMS: no workload {name:?} (known: {})",
                    known.join(", ")
                )
            })
        })
        .collect()
}

/// For each program: Ok when its tools are usable, else why not. As root, missing tools are
/// installed first (one `apt-get update` and one `apt-get install` for all of them).
fn toolchains<'a>(
    selected: &[&'a Program],
    root: bool,
    work: &Path,
) -> Vec<(&'a Program, std::result::Result<(), String>)> {
    let mut missing_packages: Vec<&str> = Vec::new();
    for p in selected {
        for t in p.tools {
            if usable(t).is_err() && !missing_packages.contains(&t.package) {
                missing_packages.push(t.package);
            }
        }
    }
    let mut install_error = None;
    if root && !missing_packages.is_empty() {
        println!("== installing with apt-get: {}", missing_packages.join(" "));
        let t = Instant::now();
        match apt_install(&missing_packages, &work.join("apt-get.log")) {
            Ok(()) => println!("   installed in {:.1} s", t.elapsed().as_secs_f64()),
            Err(e) => {
                println!("   apt-get failed: {e:#}");
                install_error = Some(format!("{e:#}"));
            }
        }
    }
    selected
        .iter()
        .map(|&p| {
            let ready = p.tools.iter().try_for_each(|t| {
                usable(t)
                    .map(drop)
                    .map_err(|why| match (&install_error, root) {
                        (Some(e), _) => format!("{why}; installing {} failed: {e}", t.package),
                        (None, true) => format!("{why}, even after apt-get install {}", t.package),
                        (None, false) => format!(
                            "{why} (Debian package {}); not root, so it cannot be installed",
                            t.package
                        ),
                    })
            });
            (p, ready)
        })
        .collect()
}

fn apt_install(packages: &[&str], log: &Path) -> Result<()> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    for args in [
        vec!["update", "-qq"],
        [&["install", "-y", "-qq"][..], packages].concat(),
    ] {
        let status = Command::new("apt-get")
            .args(&args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out.try_clone()?)
            .status()
            .context("running apt-get")?;
        if !status.success() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            bail!(
                "apt-get {} ({status}): {}",
                args.join(" "),
                tail(&text, 5).trim()
            );
        }
    }
    Ok(())
}

/// The tool's path when it is on PATH (and recent enough), else why not.
fn usable(tool: &Tool) -> std::result::Result<PathBuf, String> {
    let path = which(tool.bin).ok_or_else(|| format!("{} is not on PATH", tool.bin))?;
    if let Some(min) = tool.min_major {
        let out = Command::new(&path)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{} --version: {e}", path.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let major = text
            .trim()
            .trim_start_matches('v')
            .split('.')
            .next()
            .and_then(|m| m.parse::<u32>().ok());
        match major {
            Some(m) if m >= min => {}
            _ => return Err(format!("{} is {}, need {min}+", tool.bin, text.trim())),
        }
    }
    Ok(path)
}

fn which(bin: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(bin))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// One workload from build to verdict; never returns early without cleaning up.
fn run_program(p: &Program, ctx: &Ctx) -> Outcome {
    let t0 = Instant::now();
    println!("\n== {}", p.name);
    let dir = ctx.work.join(p.name);
    let mut att = Attempt {
        dir: dir.clone(),
        running: None,
        last_stasis_err: None,
    };
    let result = std::fs::remove_dir_all(&dir)
        .or_else(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Ok(())
            } else {
                Err(e)
            }
        })
        .and_then(|()| std::fs::create_dir_all(&dir))
        .with_context(|| format!("preparing {}", dir.display()))
        .and_then(|()| match p.kind {
            Kind::Server(which) => crate::servers::cycle(which, &ctx.stasis, &dir),
            _ => att.cycle(p, ctx),
        });
    let secs = t0.elapsed().as_secs_f64();
    match result {
        Ok(detail) => {
            println!("   {}: PASS in {secs:.1} s", p.name);
            let _ = std::fs::remove_dir_all(&dir);
            Outcome::Pass(format!("{secs:.1} s; {detail}"))
        }
        Err(e) => {
            let msg = format!("{e:#}");
            println!("   {}: FAIL after {secs:.1} s: {msg}", p.name);
            let own = att.diagnose_and_stop(p);
            let detail = match own {
                Some(v) => format!("{msg} (its own verdict when stopped: {v})"),
                None => msg,
            };
            Outcome::Fail(format!("{secs:.1} s; {detail}"))
        }
    }
}

/// State of one workload's run, kept outside the fallible part so a failure can be cleaned up.
struct Attempt {
    dir: PathBuf,
    running: Option<Running>,
    last_stasis_err: Option<PathBuf>,
}

impl Attempt {
    /// Build, start, dump/restore CYCLES times, verdict. Ok: a one-line summary.
    fn cycle(&mut self, p: &Program, ctx: &Ctx) -> Result<String> {
        let t = Instant::now();
        let mut cmd = self.prepare(p, ctx)?;
        let built = t.elapsed();
        let ticks = self.dir.join("ticks");
        let pidfile = self.dir.join("pid");
        let verdict = self.dir.join("verdict");
        let log = self.dir.join("program.log");
        cmd.arg(&ticks).arg(&pidfile).arg(&verdict);
        let db = self.dir.join("ticks.db");
        if let Some(journal) = p.sqlite {
            cmd.arg("--sqlite").arg(&db).args(["--journal", journal]);
        }
        let locked_out = |when: &str| -> Result<()> {
            match p.sqlite {
                Some(_) => second_writer_locked_out(&db).with_context(|| when.to_string()),
                None => Ok(()),
            }
        };
        let single_thread = ctx.self_test.single_thread && p.kind == Kind::Python;
        if single_thread {
            cmd.arg("--single-thread");
        }
        if let Some(kind) = &ctx.self_test.corrupt {
            cmd.args(["--corrupt", kind]);
        }
        println!(
            "   {}{:?}",
            if built > Duration::from_millis(50) {
                format!("built in {:.1} s; ", built.as_secs_f64())
            } else {
                String::new()
            },
            cmd
        );

        let t = Instant::now();
        let child_pid = spawn_in_session(&mut cmd, &log)?;
        let run = Running {
            pid: child_pid,
            marker: ticks.to_string_lossy().into_owned(),
            tree: p.kind == Kind::Shell,
            ticks,
            verdict,
            log,
        };
        self.running = Some(run.clone());
        let pid = run.wait_pidfile(&pidfile, child_pid, p.startup)?;
        run.wait_ticks(FIRST_TICKS, p.startup)?;
        let (threads0, names) = threads(pid);
        println!(
            "   pid {pid} ready in {:.1} s; {threads0} thread(s): {names}",
            t.elapsed().as_secs_f64()
        );
        let shell = p.kind == Kind::Shell;
        if shell {
            let n = tree(pid).len();
            if n < 4 {
                bail!("the pipeline of pid {pid} has {n} process(es), expected at least 4");
            }
            println!("   a tree of {n} processes: {:?}", tree(pid));
        } else if threads0 < 2 && !single_thread {
            bail!("pid {pid} has {threads0} thread(s): this workload must be multi-threaded");
        }
        locked_out("before the first dump")?;

        let mut marks: Vec<(String, usize)> = Vec::new();
        let mut thread_counts = vec![threads0.to_string()];
        let mut timings = Vec::new();
        for c in 1..=CYCLES {
            let img = self.dir.join(format!("img{c}"));
            std::fs::create_dir_all(&img).with_context(|| format!("creating {}", img.display()))?;
            let (out, dump_t) = self.stasis(
                ctx,
                &format!("dump {c}"),
                &[
                    "dump".into(),
                    "-t".into(),
                    pid.to_string().into(),
                    "-D".into(),
                    img.clone().into(),
                ],
            )?;
            let t_gone = Instant::now();
            let members = tree(pid);
            run.wait_gone(GONE_TIMEOUT)
                .with_context(|| format!("after dump {c}"))?;
            if shell {
                // Every member was killed: each pid must be free for the restore (orphans come
                // to us, the subreaper, and are reaped here).
                wait_all_gone(&members, GONE_TIMEOUT).with_context(|| format!("after dump {c}"))?;
            }
            let lines = read_ticks(&run.ticks, true)?;
            check_ticks(&lines, &marks)?;
            println!(
                "   dump {c} after tick {}: {:.2} s, gone {:.2} s later: {}",
                last_tick(&lines),
                dump_t.as_secs_f64(),
                t_gone.elapsed().as_secs_f64(),
                out.trim()
            );
            marks.push((format!("dump {c}"), lines.len()));
            std::thread::sleep(DEAD_TIME);
            let still = read_ticks(&run.ticks, false)?;
            if still.len() != lines.len() {
                bail!(
                    "the tick file grew from {} to {} lines while pid {pid} was dumped",
                    lines.len(),
                    still.len()
                );
            }

            let (out, restore_t) = self.stasis(
                ctx,
                &format!("restore {c}"),
                &[
                    "restore".into(),
                    "-D".into(),
                    img.clone().into(),
                    "--detach".into(),
                ],
            )?;
            if !run.is_ours() {
                bail!("restore {c} succeeded but pid {pid} is not running");
            }
            let (n, names) = threads(pid);
            thread_counts.push(n.to_string());
            let want = lines.len()
                + if c == CYCLES {
                    FINAL_TICKS
                } else {
                    RESUMED_TICKS
                };
            run.wait_ticks(want, p.resume)
                .with_context(|| format!("after restore {c}"))?;
            locked_out(&format!("after restore {c}"))?;
            let lines = read_ticks(&run.ticks, false)?;
            check_ticks(&lines, &marks)?;
            println!(
                "   restore {c}: {:.2} s{}; {n} thread(s): {names}; continuous to tick {}",
                restore_t.as_secs_f64(),
                if out.trim().is_empty() {
                    String::new()
                } else {
                    format!(" ({})", out.trim())
                },
                last_tick(&lines)
            );
            timings.push(format!(
                "{:.2}/{:.2}",
                dump_t.as_secs_f64(),
                restore_t.as_secs_f64()
            ));
        }

        if !run.is_ours() {
            bail!(
                "pid {pid} stopped running before SIGTERM{}",
                run.reaped_status()
            );
        }
        if shell {
            // No verdict of its own: the tick file is the proof. Then the whole session goes.
            let members = tree(pid);
            let lines = read_ticks(&run.ticks, true)?;
            check_ticks(&lines, &marks)?;
            // SAFETY: signalling our workload's process group (it leads it: own session).
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            wait_all_gone(&members, GONE_TIMEOUT).context("killing the pipeline")?;
            self.running = None;
            let dumps: Vec<String> = marks.iter().map(|(_, n)| (n - 1).to_string()).collect();
            return Ok(format!(
                "ticks 0..={} continuous across dumps after ticks {}; {} processes; dump/restore s {}",
                last_tick(&lines),
                dumps.join(", "),
                members.len(),
                timings.join(", ")
            ));
        }
        // SAFETY: signalling our workload (checked to be it just above, by its command line).
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let t = Instant::now();
        let verdict = run.wait_verdict(p.verdict)?;
        let verdict_t = t.elapsed();
        let status = run.wait_gone(GONE_TIMEOUT).context("after its verdict")?;
        self.running = None;
        println!(
            "   verdict {:.2} s after SIGTERM, {}: {verdict}",
            verdict_t.as_secs_f64(),
            status.map_or_else(|| "not our child".to_string(), describe_status)
        );
        let lines = read_ticks(&run.ticks, true)?;
        check_ticks(&lines, &marks)?;
        if !verdict.starts_with("PASS") {
            bail!("its own verdict: {verdict}");
        }
        let dumps: Vec<String> = marks.iter().map(|(_, n)| (n - 1).to_string()).collect();
        Ok(format!(
            "ticks 0..={} continuous across dumps after ticks {}; threads {}; dump/restore s {}; PASS",
            last_tick(&lines),
            dumps.join(", "),
            thread_counts.join("/"),
            timings.join(", ")
        ))
    }

    /// Builds what needs building; returns the command that starts the workload (without its
    /// three paths).
    fn prepare(&self, p: &Program, ctx: &Ctx) -> Result<Command> {
        let tool =
            |i: usize| -> Result<PathBuf> { usable(&p.tools[i]).map_err(anyhow::Error::msg) };
        let src = &ctx.sources;
        let build_log = self.dir.join("build.log");
        Ok(match p.kind {
            Kind::Python => {
                let mut c = Command::new(tool(0)?);
                c.arg(src.join("ticker.py"));
                c
            }
            Kind::Node => {
                let mut c = Command::new(tool(0)?);
                c.arg(src.join("ticker.js"));
                c
            }
            Kind::Go => {
                let exe = self.dir.join("ticker-go");
                let mut b = Command::new(tool(0)?);
                // Standard library only: no module mode surprises, no downloads, no toolchain
                // switch; a cache of our own, so a cold build needs nothing from $HOME.
                let cache = ctx.work.join("go-cache");
                b.current_dir(&self.dir)
                    .env_remove("GOFLAGS")
                    .env("GOPROXY", "off")
                    .env("GOTOOLCHAIN", "local")
                    .env("GOWORK", "off")
                    .env("CGO_ENABLED", "0")
                    .env("GOCACHE", cache.join("build"))
                    .env("GOPATH", cache.join("path"))
                    .arg("build")
                    .arg("-o")
                    .arg(&exe)
                    .arg(src.join("ticker.go"));
                build(b, &build_log, "go build")?;
                Command::new(exe)
            }
            Kind::Shell => {
                let mut c = Command::new(tool(0)?);
                c.args(["-c", PIPELINE]);
                c
            }
            Kind::Server(_) => bail!("servers are run by servers.rs"),
            Kind::Java => {
                let classes = self.dir.join("classes");
                let mut b = Command::new(tool(1)?);
                b.arg("-d").arg(&classes).arg(src.join("Ticker.java"));
                build(b, &build_log, "javac")?;
                let mut c = Command::new(tool(0)?);
                c.args(["-Xmx64m", "-XX:+UseSerialGC", "-cp"])
                    .arg(&classes)
                    .arg("Ticker");
                c
            }
        })
    }

    /// Runs one stasis command, `label` e.g. "dump 1" (stdout and stderr into `dump1.out` /
    /// `dump1.err` in the work dir). Ok: what it said (stasis reports on stderr), its wall time.
    fn stasis(&mut self, ctx: &Ctx, label: &str, args: &[OsString]) -> Result<(String, Duration)> {
        let file = label.replace(' ', "");
        let out_path = self.dir.join(format!("{file}.out"));
        let err_path = self.dir.join(format!("{file}.err"));
        let mut cmd = Command::new(&ctx.stasis);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(create(&out_path)?)
            .stderr(create(&err_path)?);
        close_inherited_fds(&mut cmd);
        self.last_stasis_err = Some(err_path.clone());
        let t = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", ctx.stasis.display()))?;
        let status = loop {
            if let Some(s) = child.try_wait().context("waiting for stasis")? {
                break s;
            }
            if t.elapsed() > STASIS_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "stasis {label} did not finish within {} s",
                    STASIS_TIMEOUT.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let elapsed = t.elapsed();
        let said = std::fs::read_to_string(&out_path).unwrap_or_default()
            + &std::fs::read_to_string(&err_path).unwrap_or_default();
        let first = said.lines().map(str::trim).find(|l| !l.is_empty());
        if !status.success() {
            bail!(
                "stasis {label} failed ({status}): {}",
                first.unwrap_or("(no output)")
            );
        }
        Ok((first.unwrap_or_default().to_string(), elapsed))
    }

    /// After a failure: show what there is to see, then stop the workload if it still runs.
    /// Returns the program's own verdict if stopping it produced one.
    fn diagnose_and_stop(&mut self, p: &Program) -> Option<String> {
        if let Some(err) = &self.last_stasis_err {
            let text = std::fs::read_to_string(err).unwrap_or_default();
            if !text.trim().is_empty() {
                println!("   ---- stasis stderr ({}):", err.display());
                print_indented(&text);
            }
        }
        let run = self.running.take()?;
        let log = std::fs::read_to_string(&run.log).unwrap_or_default();
        println!("   ---- program log ({}):", run.log.display());
        print_indented(if log.trim().is_empty() {
            "(empty)"
        } else {
            &log
        });
        let ticks = std::fs::read_to_string(&run.ticks).unwrap_or_default();
        println!(
            "   ---- last lines of the tick file ({}, {} lines):",
            run.ticks.display(),
            ticks.lines().count()
        );
        print_indented(&tail(&ticks, TAIL_LINES));
        let verdict = run.stop(p.verdict);
        if let Some(v) = &verdict {
            println!("   its own verdict when stopped: {v}");
        }
        verdict
    }
}

/// A workload process, known by pid. Not necessarily our child: after a restore it is whoever
/// `stasis restore` made it, re-parented to us (we are a subreaper).
#[derive(Clone)]
struct Running {
    pid: i32,
    /// A string in its command line (the tick file's path): tells it from a reused pid.
    marker: String,
    ticks: PathBuf,
    verdict: PathBuf,
    log: PathBuf,
    /// A tree of processes in a session of its own, stopped all at once.
    tree: bool,
}

impl Running {
    /// The pid runs (not a zombie) and is our workload.
    fn is_ours(&self) -> bool {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next());
        if matches!(state, None | Some('Z') | Some('X')) {
            return false;
        }
        std::fs::read(format!("/proc/{}/cmdline", self.pid))
            .map(|c| String::from_utf8_lossy(&c).contains(&self.marker))
            .unwrap_or(false)
    }

    /// Reaps the pid if it is our child and has exited. Returns its wait status if it did.
    fn reap(&self) -> Option<i32> {
        let mut status = 0;
        // SAFETY: WNOHANG wait for one specific pid; ECHILD when it is not our child.
        let r = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
        (r == self.pid).then_some(status)
    }

    /// " (exit status N)" if the pid is our child and has ended, else "".
    fn reaped_status(&self) -> String {
        self.reap()
            .map(|s| format!(" ({})", describe_status(s)))
            .unwrap_or_default()
    }

    /// Waits until the pid no longer exists (reaping it if it is our child: then Ok holds its
    /// wait status).
    fn wait_gone(&self, timeout: Duration) -> Result<Option<i32>> {
        let t = Instant::now();
        let mut status = None;
        loop {
            status = self.reap().or(status);
            if !Path::new(&format!("/proc/{}", self.pid)).exists() {
                return Ok(status);
            }
            if t.elapsed() > timeout {
                bail!(
                    "pid {} still exists {} s after it should have ended",
                    self.pid,
                    timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for the pid file; the pid must be the process we started (no double fork).
    fn wait_pidfile(&self, pidfile: &Path, child: i32, timeout: Duration) -> Result<i32> {
        let t = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(pidfile) {
                let pid: i32 = text
                    .trim()
                    .parse()
                    .with_context(|| format!("{}: {text:?} is not a pid", pidfile.display()))?;
                if pid != child {
                    bail!("the pid file says {pid}, but the process started is {child}");
                }
                return Ok(pid);
            }
            if let Some(status) = self.reap() {
                bail!(
                    "pid {child} exited before writing its pid file ({})",
                    describe_status(status)
                );
            }
            if t.elapsed() > timeout {
                bail!("no pid file after {} s", timeout.as_secs());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the tick file has at least `n` complete lines.
    fn wait_ticks(&self, n: usize, timeout: Duration) -> Result<()> {
        let t = Instant::now();
        loop {
            // The pipeline's `cat > TICKS` may open the file only after the shell wrote its
            // pid file: not there yet is no ticks yet.
            let have = if self.ticks.exists() {
                read_ticks(&self.ticks, false)?.len()
            } else {
                0
            };
            if have >= n {
                return Ok(());
            }
            if !self.is_ours() {
                bail!(
                    "pid {} stopped running after {have} ticks{}",
                    self.pid,
                    self.reaped_status()
                );
            }
            if t.elapsed() > timeout {
                bail!(
                    "{have} ticks after {} s, waiting for {n}",
                    timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the last line of the verdict file (the program exits after writing it).
    fn wait_verdict(&self, timeout: Duration) -> Result<String> {
        let t = Instant::now();
        loop {
            let text = std::fs::read_to_string(&self.verdict).unwrap_or_default();
            if text.ends_with('\n') {
                if let Some(last) = text.lines().rev().find(|l| !l.trim().is_empty()) {
                    return Ok(last.trim().to_string());
                }
            }
            if !self.is_ours() && t.elapsed() > Duration::from_millis(500) {
                let text = std::fs::read_to_string(&self.verdict).unwrap_or_default();
                if let Some(last) = text.lines().rev().find(|l| !l.trim().is_empty()) {
                    return Ok(last.trim().to_string());
                }
                bail!(
                    "pid {} ended without a verdict{}",
                    self.pid,
                    self.reaped_status()
                );
            }
            if t.elapsed() > timeout {
                bail!("no verdict {} s after SIGTERM", timeout.as_secs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the workload after a failure: SIGTERM (its verdict is returned if it writes one
    /// within `grace`), then SIGKILL. Only if the pid is still our workload.
    fn stop(&self, grace: Duration) -> Option<String> {
        if !self.is_ours() {
            self.reap();
            return None;
        }
        let t = Instant::now();
        if self.tree {
            let members = tree(self.pid);
            // SAFETY: our workload's process group (it leads its own session).
            unsafe { libc::kill(-self.pid, libc::SIGKILL) };
            let _ = wait_all_gone(&members, GONE_TIMEOUT);
            return None;
        }
        // SAFETY: the pid is our workload (checked by its command line just above). SIGCONT
        // first, in case a failed stasis left it stopped.
        unsafe {
            libc::kill(self.pid, libc::SIGCONT);
            libc::kill(self.pid, libc::SIGTERM);
        }
        let verdict = self.wait_verdict(grace).ok();
        let verdict_t = t.elapsed();
        let status = match self.wait_gone(Duration::from_secs(2)) {
            Ok(status) => status,
            Err(_) => {
                if self.is_ours() {
                    // SAFETY: as above; it did not end on SIGTERM.
                    unsafe { libc::kill(self.pid, libc::SIGKILL) };
                }
                self.wait_gone(GONE_TIMEOUT).unwrap_or_else(|e| {
                    println!("   could not get rid of pid {}: {e:#}", self.pid);
                    None
                })
            }
        };
        verdict.map(|v| {
            format!(
                "{v} [{:.2} s after SIGTERM, {}]",
                verdict_t.as_secs_f64(),
                status.map_or_else(|| "not our child".to_string(), describe_status)
            )
        })
    }
}

/// Starts `cmd` in a session of its own, stdin `/dev/null`, stdout and stderr into `log`, no
/// descriptor but those three. Returns its pid; it is reaped with waitpid, not through Child.
/// A second sqlite writer, as another program would be: `BEGIN IMMEDIATE` on the workload's
/// database must fail at once with "database is locked" (the workload's transaction holds its
/// file locks). Never run while the workload is dumped: a writer finding no lock would treat
/// the open transaction's journal as hot and roll it back.
fn second_writer_locked_out(db: &Path) -> Result<()> {
    const SCRIPT: &str = r#"
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=0)
try:
    db.execute('BEGIN IMMEDIATE')
except sqlite3.OperationalError as e:
    print(e)
    sys.exit(0 if 'locked' in str(e) else 2)
db.execute('ROLLBACK')
print('a second writer got the write lock')
sys.exit(1)
"#;
    let mut cmd = Command::new("python3");
    cmd.args(["-c", SCRIPT]).arg(db).stdin(Stdio::null());
    close_inherited_fds(&mut cmd);
    let out = cmd.output().context("running a second sqlite writer")?;
    let said = String::from_utf8_lossy(&out.stdout).trim().to_string()
        + String::from_utf8_lossy(&out.stderr).trim();
    if !out.status.success() {
        bail!("the workload's transaction does not lock out a second writer: {said}");
    }
    println!("   a second sqlite writer is locked out: {said}");
    Ok(())
}

/// `pid` and every descendant.
fn tree(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        out.push(p);
        for t in std::fs::read_dir(format!("/proc/{p}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let kids = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            todo.extend(
                kids.split_whitespace()
                    .filter_map(|k| k.parse::<i32>().ok()),
            );
        }
    }
    out.sort_unstable();
    out
}

/// Reaps whatever children of ours have ended, until none of `pids` exists.
fn wait_all_gone(pids: &[i32], timeout: Duration) -> Result<()> {
    let t = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: a WNOHANG wait for any child of ours.
        while unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) } > 0 {}
        let left: Vec<i32> = pids
            .iter()
            .copied()
            .filter(|p| Path::new(&format!("/proc/{p}")).exists())
            .collect();
        if left.is_empty() {
            return Ok(());
        }
        if t.elapsed() > timeout {
            bail!("pids {left:?} still exist {} s later", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn spawn_in_session(cmd: &mut Command, log: &Path) -> Result<i32> {
    let f = create(log)?;
    cmd.stdin(Stdio::null())
        .stdout(f.try_clone().context("duplicating the log descriptor")?)
        .stderr(f);
    // SAFETY: only setsid and close_range (system calls) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    i32::try_from(child.id()).context("pid out of range")
}

/// Closes every descriptor above stderr in `cmd` before it starts (whatever this process
/// inherited: a jobserver pipe, a tool's descriptors).
fn close_inherited_fds(cmd: &mut Command) {
    // SAFETY: only close_range (a system call) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
}

fn build(mut cmd: Command, log: &Path, what: &str) -> Result<()> {
    let f = create(log)?;
    cmd.stdin(Stdio::null())
        .stdout(f.try_clone().context("duplicating the log descriptor")?)
        .stderr(f);
    let status = cmd.status().with_context(|| format!("running {what}"))?;
    if !status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        bail!("{what} failed ({status}):\n{}", text.trim_end());
    }
    Ok(())
}

fn create(path: &Path) -> Result<std::fs::File> {
    std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))
}

/// The tick numbers in the file, one per line. `complete`: the writer has stopped, so a last
/// line without its newline is an error; otherwise such a line is being written and is left out.
fn read_ticks(path: &Path, complete: bool) -> Result<Vec<u64>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    let mut lines: Vec<&str> = text.split('\n').collect();
    let partial = lines.pop().unwrap_or_default();
    if complete && !partial.is_empty() {
        bail!("the tick file ends in a torn line {partial:?}");
    }
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            l.strip_prefix("tick ")
                .and_then(|n| n.parse::<u64>().ok())
                .with_context(|| format!("tick file line {} is not `tick <n>`: {l:?}", i + 1))
        })
        .collect()
}

/// Line i must be `tick i`. `marks`: (event, number of lines written before it), to say where a
/// gap or a repeat sits.
fn check_ticks(ticks: &[u64], marks: &[(String, usize)]) -> Result<()> {
    for (i, &t) in ticks.iter().enumerate() {
        let want = i as u64;
        if t == want {
            continue;
        }
        let what = if t > want {
            format!("gap: ticks {want}..={} are missing", t - 1)
        } else {
            format!("repeat: tick {t} again")
        };
        let place = match marks.iter().rev().find(|(_, n)| *n <= i) {
            Some((event, n)) if *n == i => format!(", the first line after {event}"),
            Some((event, n)) => format!(", {} lines after {event}", i - n),
            None => String::from(", before the first dump"),
        };
        bail!("tick file line {}: `tick {t}` ({what}{place})", i + 1);
    }
    Ok(())
}

fn last_tick(ticks: &[u64]) -> String {
    ticks
        .last()
        .map_or_else(|| "(none)".to_string(), u64::to_string)
}

/// Thread count of `pid` and their names, e.g. `java×2, VM Thread, C2 CompilerThre`.
fn threads(pid: i32) -> (usize, String) {
    let mut names: Vec<(String, usize)> = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return (0, String::from("(gone)"));
    };
    let mut tids: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort_unstable();
    for tid in &tids {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
            .unwrap_or_default()
            .trim()
            .to_string();
        match names.iter_mut().find(|(n, _)| *n == comm) {
            Some((_, k)) => *k += 1,
            None => names.push((comm, 1)),
        }
    }
    let text: Vec<String> = names
        .into_iter()
        .map(|(n, k)| if k > 1 { format!("{n}×{k}") } else { n })
        .collect();
    (tids.len(), text.join(", "))
}

fn describe_status(status: i32) -> String {
    if libc::WIFEXITED(status) {
        format!("exit status {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("wait status {status:#x}")
    }
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn print_indented(text: &str) {
    for line in text.lines() {
        println!("   | {line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continuity_accepts_consecutive_ticks() {
        assert!(check_ticks(&[0, 1, 2, 3], &[("dump 1".into(), 2)]).is_ok());
        assert!(check_ticks(&[], &[]).is_ok());
    }

    #[test]
    fn continuity_names_gaps_and_repeats_and_where() {
        let marks = [("dump 1".to_string(), 3)];
        let gap = check_ticks(&[0, 1, 2, 4, 5], &marks)
            .unwrap_err()
            .to_string();
        assert!(gap.contains("gap: ticks 3..=3"), "{gap}");
        assert!(gap.contains("the first line after dump 1"), "{gap}");
        let repeat = check_ticks(&[0, 1, 2, 2, 3], &marks)
            .unwrap_err()
            .to_string();
        assert!(repeat.contains("repeat: tick 2"), "{repeat}");
        let early = check_ticks(&[0, 2], &marks).unwrap_err().to_string();
        assert!(early.contains("before the first dump"), "{early}");
        let later = check_ticks(&[0, 1, 2, 3, 4, 6], &marks)
            .unwrap_err()
            .to_string();
        assert!(later.contains("2 lines after dump 1"), "{later}");
        assert!(check_ticks(&[1], &[]).is_err());
    }

    #[test]
    fn tick_files_are_parsed_strictly() {
        let dir = std::env::temp_dir().join(format!("xtask-programs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("ticks");
        std::fs::write(&f, "tick 0\ntick 1\ntick 2").unwrap();
        assert_eq!(read_ticks(&f, false).unwrap(), vec![0, 1]);
        assert!(read_ticks(&f, true).is_err());
        std::fs::write(&f, "tick 0\ntock 1\n").unwrap();
        assert!(read_ticks(&f, false).is_err());
        std::fs::write(&f, "").unwrap();
        assert!(read_ticks(&f, true).unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a\nb\nc", 2), "b\nc");
        assert_eq!(tail("a\n", 5), "a");
        assert_eq!(tail("", 3), "");
    }
}
