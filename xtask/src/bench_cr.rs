//! `cargo xtask bench dump-restore`: dump and restore of a process holding N MiB of distinct
//! pages, stasis and (when found) CRIU measured in the same run on the same workload.
//!
//! Each round: start `memhold N` in its own session, wait until it is ready, time the dump
//! (as a separate process, so its peak RSS is its own), reap the killed original, time the
//! restore (`-d`), then ask the restored process to verify every word of its memory. A round
//! whose restored copy does not verify is an error, not a figure.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub struct Tool {
    pub name: &'static str,
    pub bin: PathBuf,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Round {
    pub dump: Duration,
    pub restore: Duration,
    pub dump_rss_kib: u64,
    pub restore_rss_kib: u64,
}

fn memhold(work: &Path) -> Result<PathBuf> {
    let src = crate::repo_root().join("xtask/workloads/memhold.c");
    let exe = work.join("memhold");
    let status = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args(["-O2", "-Wall", "-pthread", "-o"])
        .arg(&exe)
        .arg(&src)
        .status()
        .context("compiling memhold")?;
    if !status.success() {
        bail!("compiling {} failed", src.display());
    }
    Ok(exe)
}

/// Runs a command to completion; returns its wall time and peak RSS (KiB). Its stderr goes to
/// `log` and is shown if it fails.
fn timed(cmd: &mut Command, what: &str, log: &Path) -> Result<(Duration, u64)> {
    cmd.stderr(std::fs::File::create(log)?);
    let t = Instant::now();
    let child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    let mut status = 0;
    // SAFETY: rusage is plain data, filled by wait4 for our own child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for the child we just spawned.
    let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    let elapsed = t.elapsed();
    if r < 0 || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        bail!("{what} failed (status {status:#x}): {}", text.trim());
    }
    Ok((elapsed, ru.ru_maxrss as u64))
}

/// Like `start_memhold`, with its ticker thread (`MEMHOLD_TICK`).
fn start_memhold_ticking(memhold: &Path, mib: u64, state: &Path) -> Result<i32> {
    std::env::set_var("MEMHOLD_TICK", "1");
    let pid = start_memhold(
        memhold,
        mib,
        Shape {
            threads: 1,
            processes: 1,
        },
        state,
    );
    std::env::remove_var("MEMHOLD_TICK");
    pid
}

/// The longest gap memhold's ticker saw since it was last asked (and it starts over).
fn ticker_gap(pid: i32, state: &Path) -> Result<Duration> {
    let gap = state.with_extension("gap");
    let _ = std::fs::remove_file(&gap);
    // SAFETY: asking our own workload for its figure.
    unsafe { libc::kill(pid, libc::SIGUSR2) };
    let read = || std::fs::read_to_string(&gap).unwrap_or_default();
    wait_until(
        Duration::from_secs(30),
        || read().ends_with('\n'),
        "memhold's ticker",
    )?;
    let us: u64 = read()
        .trim()
        .trim_start_matches("GAP us=")
        .parse()
        .context("memhold's gap line")?;
    Ok(Duration::from_micros(us))
}

/// `cargo build --release --bin stasis`: what every benchmark measures.
fn build_release_stasis(root: &Path) -> Result<()> {
    let mut b = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    b.current_dir(root)
        .args(["build", "--release", "--quiet", "--bin", "stasis"]);
    if !b.status()?.success() {
        bail!("building stasis");
    }
    Ok(())
}

/// `cargo xtask bench leave-running`: see `Which::LeaveRunning`.
pub fn leave_running(sizes: &[u64], runs: usize, criu: Option<PathBuf>) -> Result<()> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let root = crate::repo_root();
    build_release_stasis(&root)?;
    let stasis = root.join("target/release/stasis");
    let work = root.join("target/bench");
    std::fs::create_dir_all(&work)?;
    let memhold = memhold(&work)?;
    // (name, binary, arguments after `dump -t PID -D IMG`)
    let mut tools: Vec<(&str, PathBuf, Vec<&str>)> = vec![
        ("stasis", stasis.clone(), vec!["--leave-running"]),
        (
            "stasis-nosnap",
            stasis.clone(),
            vec!["--leave-running", "--no-snapshot"],
        ),
    ];
    match criu {
        Some(bin) => tools.push(("criu", bin, vec!["--leave-running", "-o", "dump.log"])),
        None => println!(
            "(no CRIU >= 4.1 found: pass --criu PATH or put it on PATH to measure the peer)"
        ),
    }
    println!(
        "bench leave-running: {runs} dumps per size and tool, medians; freeze = the longest gap the process saw between its 1 ms wake-ups"
    );
    println!(
        "{:<8} {:<14} {:>12} {:>12}",
        "size", "tool", "freeze", "dump"
    );
    for &mib in sizes {
        let dir = work.join(format!("leave-running-{mib}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let state = dir.join("state");
        let pid = start_memhold_ticking(&memhold, mib, &state)?;
        let kill = |pid: i32| {
            // SAFETY: stopping our own workload.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        };
        let one = |tool: &(&str, PathBuf, Vec<&str>), img: &Path| -> Result<(Duration, Duration)> {
            let _ = std::fs::remove_dir_all(img);
            std::fs::create_dir_all(img)?;
            ticker_gap(pid, &state)?;
            let mut c = Command::new(&tool.1);
            c.args(["dump", "-t", &pid.to_string(), "-D"])
                .arg(img)
                .args(&tool.2)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null());
            let (t, _) = timed(
                &mut c,
                &format!("{} dump of pid {pid}", tool.0),
                &dir.join("dump.err"),
            )?;
            let gap = ticker_gap(pid, &state)?;
            Ok((gap, t))
        };
        let result = (|| -> Result<()> {
            for tool in &tools {
                one(tool, &dir.join("warm"))?;
            }
            let mut figures: Vec<Vec<(Duration, Duration)>> = vec![Vec::new(); tools.len()];
            for run in 0..runs {
                for k in 0..tools.len() {
                    let t = if run % 2 == 0 { k } else { tools.len() - 1 - k };
                    // SAFETY: sync has no preconditions.
                    unsafe { libc::sync() };
                    let img = dir.join(format!("img-{}", tools[t].0));
                    figures[t].push(one(&tools[t], &img)?);
                }
            }
            let mut medians = Vec::new();
            for (tool, f) in tools.iter().zip(&figures) {
                let gap = median(f.iter().map(|x| x.0).collect());
                let dump = median(f.iter().map(|x| x.1).collect());
                println!(
                    "{:<8} {:<14} {:>9.1} ms {:>9.3} s",
                    format!("{mib}MiB"),
                    tool.0,
                    gap.as_secs_f64() * 1e3,
                    dump.as_secs_f64()
                );
                medians.push((tool.0, gap, dump));
            }
            if let (Some(s), Some(c)) = (
                medians.iter().find(|m| m.0 == "stasis"),
                medians.iter().find(|m| m.0 == "criu"),
            ) {
                println!(
                    "{:<8} ratio          stasis/criu: freeze {:.3}x, dump {:.2}x",
                    format!("{mib}MiB"),
                    s.1.as_secs_f64() / c.1.as_secs_f64(),
                    s.2.as_secs_f64() / c.2.as_secs_f64()
                );
            }
            // The last snapshot image is the process: restored, it verifies every word.
            kill(pid);
            restore_and_verify(
                &stasis,
                &dir.join("img-stasis"),
                pid,
                &state,
                &dir,
                "snapshot",
            )?;
            println!(
                "{:<8} (the last snapshot image restored: every word verified)",
                format!("{mib}MiB")
            );
            Ok(())
        })();
        end_workload(pid, &dir);
        result?;
    }
    Ok(())
}

/// Starts `memhold MIB STATE THREADS` on its own and waits until it has filled its memory;
/// returns its pid.
fn start_memhold(memhold: &Path, mib: u64, shape: Shape, state: &Path) -> Result<i32> {
    let threads = shape.threads;
    let status = workload_launcher()
        .arg(memhold)
        .arg(mib.to_string())
        .arg(state)
        .arg(threads.to_string())
        .arg(shape.processes.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()?;
    if !status.success() {
        bail!("starting memhold ({mib} MiB, {threads} threads)");
    }
    let read_state = || std::fs::read_to_string(state).unwrap_or_default();
    wait_until(
        Duration::from_secs(120),
        || read_state().starts_with("READY"),
        "memhold to fill its memory",
    )?;
    read_state()
        .trim()
        .trim_start_matches("READY pid=")
        .parse()
        .context("memhold state")
}

/// `setsid -f …`: the workload in a session of its own, with only the standard descriptors
/// (anything our caller leaked would be in the image, or refused).
fn workload_launcher() -> Command {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new("setsid");
    c.arg("-f");
    // SAFETY: close_range is async-signal-safe; it runs between fork and exec.
    unsafe {
        c.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    c
}

fn wait_until(deadline: Duration, mut f: impl FnMut() -> bool, what: &str) -> Result<()> {
    let end = Instant::now() + deadline;
    while !f() {
        if Instant::now() > end {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn gone(pid: i32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// The workload's shape: threads per process, processes.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub threads: usize,
    pub processes: usize,
}

/// `pid` and its descendants.
fn tree(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        out.push(p);
        let kids =
            std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")).unwrap_or_default();
        todo.extend(
            kids.split_whitespace()
                .filter_map(|k| k.parse::<i32>().ok()),
        );
    }
    out
}

/// One dump + restore of a fresh `memhold mib` of this shape with `tool`.
pub fn round(tool: &Tool, memhold: &Path, work: &Path, mib: u64, shape: Shape) -> Result<Round> {
    let dir = work.join(format!("{}-{mib}", tool.name));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let state = dir.join("state");
    let img = dir.join("img");
    std::fs::create_dir_all(&img)?;
    let pid = start_memhold(memhold, mib, shape, &state)?;
    let members = tree(pid);
    if members.len() != shape.processes {
        bail!(
            "memhold made {} processes, not {}",
            members.len(),
            shape.processes
        );
    }
    let read_state = || std::fs::read_to_string(&state).unwrap_or_default();

    let img_s = img.to_string_lossy().into_owned();
    let pid_s = pid.to_string();
    let mut dump = Command::new(&tool.bin);
    let mut restore = Command::new(&tool.bin);
    if tool.name == "criu" {
        dump.args(["dump", "-t", &pid_s, "-D", &img_s, "-o", "dump.log"]);
        restore.args(["restore", "-D", &img_s, "-d", "-o", "restore.log"]);
    } else {
        dump.args(["dump", "-t", &pid_s, "-D", &img_s]);
        restore.args(["restore", "-D", &img_s, "-d"]);
    }
    for c in [&mut dump, &mut restore] {
        c.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
    }
    let (dump_t, dump_rss) = timed(
        &mut dump,
        &format!("{} dump of pid {pid}", tool.name),
        &dir.join("dump.err"),
    )?;
    wait_until(
        Duration::from_secs(60),
        || members.iter().all(|&p| gone(p)),
        "the dumped processes to be reaped",
    )?;
    let (restore_t, restore_rss) = timed(
        &mut restore,
        &format!("{} restore of pid {pid}", tool.name),
        &dir.join("restore.err"),
    )?;
    let _ = std::fs::remove_file(&state);
    // SAFETY: asking our restored workload to verify itself.
    unsafe { libc::kill(pid, libc::SIGUSR1) };
    wait_until(
        Duration::from_secs(120),
        || !read_state().is_empty(),
        "the restored process to verify its memory",
    )?;
    let verdict = read_state();
    for &p in &members {
        // SAFETY: the workload's job is done.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    if !verdict.starts_with("OK") {
        bail!("{}: restored memory did not verify: {verdict}", tool.name);
    }
    wait_until(
        Duration::from_secs(60),
        || members.iter().all(|&p| gone(p)),
        "the restored processes to be reaped",
    )?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Round {
        dump: dump_t,
        restore: restore_t,
        dump_rss_kib: dump_rss,
        restore_rss_kib: restore_rss,
    })
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

pub fn run(sizes: &[u64], runs: usize, shape: Shape, criu: Option<PathBuf>) -> Result<()> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let root = crate::repo_root();
    build_release_stasis(&root)?;
    let work = root.join("target/bench");
    std::fs::create_dir_all(&work)?;
    let memhold = memhold(&work)?;
    let mut tools = vec![Tool {
        name: "stasis",
        bin: root.join("target/release/stasis"),
    }];
    match criu {
        Some(bin) => tools.push(Tool { name: "criu", bin }),
        None => println!(
            "(no CRIU >= 4.1 found: pass --criu PATH or put it on PATH to measure the peer)"
        ),
    }
    println!(
        "bench dump-restore: {runs} runs per size, medians; {} process(es) × {} thread(s); memory verified after every restore",
        shape.processes, shape.threads
    );
    println!(
        "{:<8} {:<7} {:>10} {:>10} {:>13} {:>13}",
        "size", "tool", "dump", "restore", "dump peak RSS", "restore RSS"
    );
    for &mib in sizes {
        // One warm-up round per tool: the first touch of fresh memory is far slower on this VM.
        for tool in &tools {
            round(tool, &memhold, &work, mib.min(64), shape)?;
        }
        // The tools take turns, round by round (the order alternating), and every round starts
        // with nothing left to write back: whatever the machine does meanwhile (page cache
        // writeback, a neighbour) falls on both alike.
        let mut rounds: Vec<Vec<Round>> = vec![Vec::new(); tools.len()];
        for run in 0..runs {
            for k in 0..tools.len() {
                let t = if run % 2 == 0 { k } else { tools.len() - 1 - k };
                // SAFETY: sync has no preconditions.
                unsafe { libc::sync() };
                rounds[t].push(round(&tools[t], &memhold, &work, mib, shape)?);
            }
        }
        let mut medians = Vec::new();
        for (tool, rounds) in tools.iter().zip(&rounds) {
            let d = median(rounds.iter().map(|r| r.dump).collect());
            let r = median(rounds.iter().map(|r| r.restore).collect());
            let drss = rounds.iter().map(|r| r.dump_rss_kib).max().unwrap_or(0);
            let rrss = rounds.iter().map(|r| r.restore_rss_kib).max().unwrap_or(0);
            println!(
                "{:<8} {:<7} {:>9.3}s {:>9.3}s {:>10.1} MiB {:>10.1} MiB",
                format!("{mib}MiB"),
                tool.name,
                d.as_secs_f64(),
                r.as_secs_f64(),
                drss as f64 / 1024.0,
                rrss as f64 / 1024.0
            );
            medians.push((d, r));
        }
        if let [(sd, sr), (cd, cr)] = medians[..] {
            println!(
                "{:<8} ratio   stasis/criu: dump {:.2}x, restore {:.2}x",
                format!("{mib}MiB"),
                sd.as_secs_f64() / cd.as_secs_f64(),
                sr.as_secs_f64() / cr.as_secs_f64()
            );
        }
    }
    Ok(())
}

/// A CRIU >= 4.1 to compare with: `--criu PATH`, else `criu` on PATH if its version fits.
pub fn find_criu(explicit: Option<PathBuf>) -> Option<PathBuf> {
    if explicit.is_some() {
        return explicit;
    }
    let out = Command::new("criu").arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))?
        .trim()
        .to_string();
    let mut parts = version.split('.').map(|x| x.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    ((major, minor) >= (4, 1)).then(|| PathBuf::from("criu"))
}

/// `cargo xtask bench freeze`: how long a `--leave-running` dump keeps a process with N
/// threads frozen (as stasis reports it: from the first thread seized to the last released),
/// and what each thread beyond the first costs.
pub fn freeze(thread_counts: &[usize], runs: usize) -> Result<()> {
    if runs == 0 || thread_counts.is_empty() {
        bail!("--runs and --threads must not be empty");
    }
    let root = crate::repo_root();
    build_release_stasis(&root)?;
    let stasis = root.join("target/release/stasis");
    let work = root.join("target/bench");
    std::fs::create_dir_all(&work)?;
    let memhold = memhold(&work)?;
    println!("bench freeze: 16 MiB, --leave-running dumps, median of {runs}");
    println!(
        "{:>8} {:>12} {:>16}",
        "threads", "frozen", "per extra thread"
    );
    let mut first: Option<(usize, f64)> = None;
    for &n in thread_counts {
        let dir = work.join(format!("freeze-{n}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let shape = Shape {
            threads: n,
            processes: 1,
        };
        let pid = start_memhold(&memhold, 16, shape, &dir.join("state"))?;
        let mut frozen = Vec::new();
        for i in 0..=runs {
            let img = dir.join(format!("img{i}"));
            let o = Command::new(&stasis)
                .args(["dump", "--leave-running", "-t", &pid.to_string(), "-D"])
                .arg(&img)
                .output()?;
            let err = String::from_utf8_lossy(&o.stderr);
            if !o.status.success() {
                // SAFETY: stopping our own workload.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                bail!("dump of {n} threads failed: {}", err.trim());
            }
            let ms: f64 = err
                .split("frozen ")
                .nth(1)
                .and_then(|r| r.split(" ms").next())
                .and_then(|v| v.parse().ok())
                .context("no frozen time in stasis's summary")?;
            let _ = std::fs::remove_dir_all(&img);
            if i > 0 {
                frozen.push(Duration::from_secs_f64(ms / 1e3));
            }
        }
        // SAFETY: the workload's job is done.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let m = median(frozen).as_secs_f64() * 1e3;
        let per = match first {
            Some((n0, m0)) if n > n0 => format!("{:.0} µs", (m - m0) * 1e3 / (n - n0) as f64),
            _ => "-".into(),
        };
        first.get_or_insert((n, m));
        println!("{n:>8} {m:>9.2} ms {per:>16}");
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

/// Kills the workload `pid` (if still there), waits until it is reaped and removes its work
/// directory: the end of each size of a bench, whatever happened.
fn end_workload(pid: i32, dir: &Path) {
    // SAFETY: stopping our own workload.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = wait_until(
        Duration::from_secs(60),
        || gone(pid),
        "the workload to be reaped",
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Once the workload `pid` (killed) is reaped: restores image `img` and has the restored
/// process verify every word of its memory.
fn restore_and_verify(
    stasis: &Path,
    img: &Path,
    pid: i32,
    state: &Path,
    dir: &Path,
    what: &str,
) -> Result<()> {
    wait_until(
        Duration::from_secs(60),
        || gone(pid),
        "the workload to be reaped",
    )?;
    let _ = std::fs::remove_file(state);
    let mut r = Command::new(stasis);
    r.args(["restore", "-d", "-D"])
        .arg(img)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    timed(
        &mut r,
        &format!("restore of the last {what} image"),
        &dir.join("restore.err"),
    )?;
    // SAFETY: asking the restored workload to verify itself.
    unsafe { libc::kill(pid, libc::SIGUSR1) };
    let read = || std::fs::read_to_string(state).unwrap_or_default();
    wait_until(
        Duration::from_secs(120),
        || !read().is_empty(),
        "the restored workload to verify",
    )?;
    if !read().starts_with("OK") {
        bail!(
            "the restored {what} image of pid {pid} did not verify: {}",
            read().trim()
        );
    }
    Ok(())
}

/// Bytes of every file under an image directory: its records, page data and digests (and its
/// descendants', for a tree).
fn image_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        match e.metadata() {
            Ok(m) if m.is_dir() => total += image_bytes(&e.path()),
            Ok(m) => total += m.len(),
            Err(_) => {}
        }
    }
    total
}

/// `cargo xtask bench incremental`: a pre-dump of a process holding N MiB, 16 MiB of it
/// rewritten, then a `--leave-running` dump with `--prev-images-dir`: what that second dump
/// writes and the freeze it imposes, beside a full `--leave-running` dump after the same
/// writes. CRIU is tried the same way (`pre-dump`, then `dump --prev-images-dir
/// --track-mem`). The last incremental image is restored and its memory verified.
pub fn incremental(sizes: &[u64], runs: usize, criu: Option<PathBuf>) -> Result<()> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let root = crate::repo_root();
    build_release_stasis(&root)?;
    let stasis = root.join("target/release/stasis");
    let work = root.join("target/bench");
    std::fs::create_dir_all(&work)?;
    let memhold = memhold(&work)?;
    println!(
        "bench incremental: {runs} runs per size, medians; 16 MiB rewritten between the pre-dump and the dump; freeze = the longest gap the process saw between its 1 ms wake-ups"
    );
    println!(
        "{:<8} {:<26} {:>12} {:>10} {:>10}",
        "size", "dump", "written", "freeze", "time"
    );
    for &mib in sizes {
        let dir = work.join(format!("incremental-{mib}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let state = dir.join("state");
        let pid = start_memhold_ticking(&memhold, mib, &state)?;
        let kill = |pid: i32| {
            // SAFETY: stopping our own workload.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        };
        let rewritten = std::cell::Cell::new(0u64);
        let rewrite = || -> Result<()> {
            let rw = state.with_extension("rw");
            rewritten.set(rewritten.get() + 1);
            let want = format!("REWRITTEN gen={}\n", rewritten.get());
            // SAFETY: asking our own workload to write.
            unsafe { libc::kill(pid, libc::SIGHUP) };
            wait_until(
                Duration::from_secs(30),
                || std::fs::read_to_string(&rw).unwrap_or_default() == want,
                "memhold to rewrite its memory",
            )
        };
        // (freeze, time, bytes) of `bin dump-args…` into `img`.
        let dump = |bin: &Path,
                    args: &[&str],
                    img: &Path,
                    what: &str|
         -> Result<(Duration, Duration, u64)> {
            let _ = std::fs::remove_dir_all(img);
            std::fs::create_dir_all(img)?;
            ticker_gap(pid, &state)?;
            let mut c = Command::new(bin);
            c.args(args)
                .args(["-t", &pid.to_string(), "-D"])
                .arg(img)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null());
            let (t, _) = timed(&mut c, what, &dir.join("dump.err"))?;
            let gap = ticker_gap(pid, &state)?;
            Ok((gap, t, image_bytes(img)))
        };
        let result = (|| -> Result<()> {
            let (mut pres, mut inc, mut full) = (Vec::new(), Vec::new(), Vec::new());
            for run in 0..runs {
                // SAFETY: sync has no preconditions.
                unsafe { libc::sync() };
                let pre = dir.join(format!("pre-{run}"));
                pres.push(dump(&stasis, &["pre-dump"], &pre, "stasis pre-dump")?);
                rewrite()?;
                // SAFETY: sync has no preconditions.
                unsafe { libc::sync() };
                let img = dir.join(format!("inc-{run}"));
                let prev = format!("../pre-{run}");
                inc.push(dump(
                    &stasis,
                    &["dump", "--leave-running", "--prev-images-dir", &prev],
                    &img,
                    "stasis incremental dump",
                )?);
                // SAFETY: sync has no preconditions.
                unsafe { libc::sync() };
                full.push(dump(
                    &stasis,
                    &["dump", "--leave-running"],
                    &dir.join("full"),
                    "stasis full dump",
                )?);
                if run + 1 < runs {
                    let _ = std::fs::remove_dir_all(&pre);
                    let _ = std::fs::remove_dir_all(&img);
                }
            }
            let show = |name: &str, f: &[(Duration, Duration, u64)]| {
                let mut bytes: Vec<u64> = f.iter().map(|x| x.2).collect();
                bytes.sort_unstable();
                println!(
                    "{:<8} {:<26} {:>8.1} MiB {:>7.1} ms {:>8.3} s",
                    format!("{mib}MiB"),
                    name,
                    bytes[bytes.len() / 2] as f64 / (1 << 20) as f64,
                    median(f.iter().map(|x| x.0).collect()).as_secs_f64() * 1e3,
                    median(f.iter().map(|x| x.1).collect()).as_secs_f64()
                );
            };
            show("stasis pre-dump", &pres);
            show("stasis incremental", &inc);
            show("stasis full (same writes)", &full);
            if let Some(criu) = &criu {
                let pre = dir.join("criu-pre");
                match dump(criu, &["pre-dump", "-o", "dump.log"], &pre, "criu pre-dump") {
                    Ok(_) => {
                        rewrite()?;
                        let f = dump(
                            criu,
                            &[
                                "dump",
                                "--leave-running",
                                "--track-mem",
                                "--prev-images-dir",
                                "../criu-pre",
                                "-o",
                                "dump.log",
                            ],
                            &dir.join("criu-inc"),
                            "criu incremental dump",
                        )?;
                        show("criu incremental (1 run)", &[f]);
                    }
                    Err(e) => {
                        // Its reason is in its log (-o, in the image directory).
                        let log = std::fs::read_to_string(pre.join("dump.log")).unwrap_or_default();
                        let why = log
                            .lines()
                            .rev()
                            .find(|l| l.contains("Error") || l.contains("BUG"))
                            .map(str::to_string)
                            .unwrap_or_else(|| e.to_string());
                        println!(
                            "{:<8} criu pre-dump fails here: {}",
                            format!("{mib}MiB"),
                            why.trim()
                        );
                    }
                }
            }
            // The last incremental image, with its parent, is the process: restored, it
            // verifies every word (the rewritten ones included).
            kill(pid);
            let last = dir.join(format!("inc-{}", runs - 1));
            restore_and_verify(&stasis, &last, pid, &state, &dir, "incremental")?;
            println!(
                "{:<8} (the last incremental image restored with its parent: every word verified)",
                format!("{mib}MiB")
            );
            Ok(())
        })();
        end_workload(pid, &dir);
        result?;
    }
    Ok(())
}

/// Whether `pid` is the restored workload running its own code: its name is memhold's, it is
/// not in a (ptrace) stop, and no restorer region of stasis's is mapped in it. (A signal
/// before that would reach a task still being made, and kill it.)
fn restored_and_running(pid: i32) -> bool {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rfind(')')
        .and_then(|i| stat.get(i + 2..i + 3))
        .unwrap_or("?");
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    comm.trim() == "memhold" && matches!(state, "R" | "S" | "D") && !maps.contains("memfd:stasis")
}

/// `cargo xtask bench lazy`: time until a restored process runs, and until its restore is
/// done, for a plain restore and for `--lazy-pages` (stasis), and for CRIU's plain restore,
/// of a process holding N MiB (killed by the dump). "Runs" is when the process, asked again
/// and again with SIGUSR2 from the moment the restore starts, first answers (its ticker
/// thread writes a file). Every restored copy verifies its memory.
pub fn lazy(sizes: &[u64], runs: usize, criu: Option<PathBuf>) -> Result<()> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let root = crate::repo_root();
    build_release_stasis(&root)?;
    let stasis = root.join("target/release/stasis");
    let work = root.join("target/bench");
    std::fs::create_dir_all(&work)?;
    let memhold = memhold(&work)?;
    // (name, binary, dump arguments, restore arguments) — `-t PID -D IMG` added.
    let mut tools: Vec<(&str, PathBuf, Vec<&str>, Vec<&str>)> = vec![
        (
            "stasis",
            stasis.clone(),
            vec!["dump"],
            vec!["restore", "-d"],
        ),
        (
            "stasis --lazy-pages",
            stasis.clone(),
            vec!["dump"],
            vec!["restore", "-d", "--lazy-pages"],
        ),
    ];
    if let Some(bin) = criu {
        tools.push((
            "criu",
            bin,
            vec!["dump", "-o", "dump.log"],
            vec!["restore", "-d", "-o", "restore.log"],
        ));
    }
    println!("bench lazy: {runs} runs per size and tool, medians; running = the restored process answered a signal; done = the restore command returned");
    println!(
        "{:<8} {:<22} {:>12} {:>9} {:>13}",
        "size", "restore", "running", "done", "peak RSS"
    );
    for &mib in sizes {
        let dir = work.join(format!("lazy-{mib}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let state = dir.join("state");
        let gap = state.with_extension("gap");
        let one =
            |tool: &(&str, PathBuf, Vec<&str>, Vec<&str>)| -> Result<(Duration, Duration, u64)> {
                let img = dir.join("img");
                let _ = std::fs::remove_dir_all(&img);
                std::fs::create_dir_all(&img)?;
                let pid = start_memhold_ticking(&memhold, mib, &state)?;
                let mut d = Command::new(&tool.1);
                d.args(&tool.2)
                    .args(["-t", &pid.to_string(), "-D"])
                    .arg(&img)
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null());
                timed(&mut d, &format!("{} dump", tool.0), &dir.join("dump.err"))?;
                wait_until(
                    Duration::from_secs(60),
                    || gone(pid),
                    "the dumped process to be reaped",
                )?;
                let _ = std::fs::remove_file(&gap);
                // SAFETY: sync has no preconditions.
                unsafe { libc::sync() };
                let mut r = Command::new(&tool.1);
                r.args(&tool.3)
                    .arg("-D")
                    .arg(&img)
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::fs::File::create(dir.join("restore.err"))?);
                let t = Instant::now();
                let child = r.spawn().context("starting the restore")?;
                let mut running = None;
                let (done, rss_kib) = loop {
                    if running.is_none() {
                        if gap.exists() {
                            running = Some(t.elapsed());
                        } else if restored_and_running(pid) {
                            // SAFETY: asking the restored workload for its figure.
                            unsafe { libc::kill(pid, libc::SIGUSR2) };
                        }
                    }
                    let mut status = 0;
                    // SAFETY: rusage is plain data, filled by wait4 for our own child.
                    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
                    // SAFETY: polling for the child we spawned.
                    let r = unsafe {
                        libc::wait4(child.id() as i32, &mut status, libc::WNOHANG, &mut ru)
                    };
                    if r > 0 {
                        if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
                            let e = std::fs::read_to_string(dir.join("restore.err"))
                                .unwrap_or_default();
                            bail!("{} restore failed: {}", tool.0, e.trim());
                        }
                        break (t.elapsed(), ru.ru_maxrss as u64);
                    }
                    std::thread::sleep(Duration::from_micros(250));
                };
                wait_until(
                    Duration::from_secs(30),
                    || {
                        if gap.exists() {
                            return true;
                        }
                        // SAFETY: as above.
                        unsafe { libc::kill(pid, libc::SIGUSR2) };
                        false
                    },
                    "the restored process to answer",
                )?;
                let running = running.unwrap_or(done);
                let _ = std::fs::remove_file(&state);
                // SAFETY: asking the restored workload to verify itself.
                unsafe { libc::kill(pid, libc::SIGUSR1) };
                let read = || std::fs::read_to_string(&state).unwrap_or_default();
                wait_until(
                    Duration::from_secs(120),
                    || !read().is_empty(),
                    "the restored workload to verify",
                )?;
                // SAFETY: the workload's job is done.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                if !read().starts_with("OK") {
                    bail!(
                        "{}: restored memory did not verify: {}",
                        tool.0,
                        read().trim()
                    );
                }
                wait_until(
                    Duration::from_secs(60),
                    || gone(pid),
                    "the restored workload to be reaped",
                )?;
                Ok((running, done, rss_kib))
            };
        let mut figures: Vec<Vec<(Duration, Duration, u64)>> = vec![Vec::new(); tools.len()];
        for run in 0..runs {
            for k in 0..tools.len() {
                let t = if run % 2 == 0 { k } else { tools.len() - 1 - k };
                figures[t].push(one(&tools[t])?);
            }
        }
        for (tool, f) in tools.iter().zip(&figures) {
            let peak = f.iter().map(|x| x.2).max().unwrap_or(0);
            println!(
                "{:<8} {:<22} {:>9.1} ms {:>7.3} s {:>9.1} MiB",
                format!("{mib}MiB"),
                tool.0,
                median(f.iter().map(|x| x.0).collect()).as_secs_f64() * 1e3,
                median(f.iter().map(|x| x.1).collect()).as_secs_f64(),
                peak as f64 / 1024.0
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}
