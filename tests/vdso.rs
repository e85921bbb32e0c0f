//! `stasis vdso` against real processes: the report itself, survival of many infections, a
//! hostile target, and every kind of bad input.

mod common;

use common::*;

/// The survivor runs and the races against the scribbling sibling each want both CPUs: run
/// them one at a time, or a starved scribbler loses every race and the race tests prove
/// nothing.
static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}
use std::time::Duration;

fn json_report(pid: i32) -> serde_json::Value {
    let o = stasis(&["vdso", "--pid", &pid.to_string(), "--json"]);
    assert!(o.status.success(), "stasis vdso failed: {}", stderr_of(&o));
    serde_json::from_slice(&o.stdout).expect("stasis vdso --json prints JSON")
}

/// The vDSO-related areas of `pid` as the test itself reads them from maps.
fn maps_areas(pid: i32) -> Vec<(String, u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("reading maps");
    text.lines()
        .filter_map(|l| {
            let name = l.split_whitespace().nth(5)?;
            if name != "[vdso]" && !name.starts_with("[vvar") {
                return None;
            }
            let (s, e) = l.split_whitespace().next()?.split_once('-')?;
            Some((
                name.to_string(),
                u64::from_str_radix(s, 16).ok()?,
                u64::from_str_radix(e, 16).ok()?,
            ))
        })
        .collect()
}

#[test]
fn report_matches_maps_and_exports_every_vdso_function() {
    if !require_root("report_matches_maps_and_exports_every_vdso_function") {
        return;
    }
    let fx = Fixture::start("sleeper", &[]);
    let before = maps_areas(fx.pid);
    let r = json_report(fx.pid);
    let areas: Vec<(String, u64, u64)> = r["layout"]["areas"]
        .as_array()
        .expect("areas")
        .iter()
        .map(|a| {
            (
                a["name"].as_str().unwrap_or_default().to_string(),
                a["start"].as_u64().unwrap_or(0),
                a["end"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(areas, before, "report areas vs /proc/PID/maps");
    assert!(areas.iter().any(|a| a.0 == "[vdso]"));
    assert!(r["vdso_mapped"].as_bool().unwrap_or(false));
    assert!(r["auxv_matches"].as_bool().unwrap_or(false));
    let names: Vec<&str> = r["symbols"]
        .as_array()
        .expect("symbols")
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    for want in [
        "__vdso_clock_gettime",
        "__vdso_gettimeofday",
        "__vdso_time",
        "__vdso_getcpu",
        "__vdso_clock_getres",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    // getrandom is exported from 6.11 on.
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut v = release
        .trim()
        .split(['.', '-'])
        .map(|x| x.parse::<u32>().unwrap_or(0));
    let (major, minor) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
    if (major, minor) >= (6, 11) {
        assert!(
            names.contains(&"__vdso_getrandom"),
            "getrandom missing on {release}"
        );
    }
    // The target carries on, untouched.
    assert_eq!(tracer_of(fx.pid), 0);
    assert_eq!(maps_areas(fx.pid), before);
    assert_pass(&fx.finish());
}

#[test]
fn human_report_names_layout() {
    if !require_root("human_report_names_layout") {
        return;
    }
    let fx = Fixture::start("sleeper", &[]);
    let o = stasis(&["vdso", "--pid", &fx.pid.to_string()]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("layout: "), "{text}");
    assert!(text.contains("__vdso_clock_gettime"), "{text}");
    for (name, start, end) in maps_areas(fx.pid) {
        let size = format!("{}K", (end - start) / 1024);
        assert!(
            text.contains(&format!("{name} {size}")),
            "{name} {size} not in {text}"
        );
    }
    assert_pass(&fx.finish());
}

/// 200 infections in a row, while signals keep arriving; the fixture checks memory, ymm and
/// callee-saved registers, nanosleep, a blocked pipe read and its signal counts all along.
fn survive(threads: &str) {
    let _one_at_a_time = heavy();
    let fx = Fixture::start("survivor", &["--threads", threads]);
    let pid = fx.pid;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut usr2, mut rt1) = (0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // SAFETY: signalling a process we started.
                unsafe {
                    if libc::kill(pid, libc::SIGUSR2) == 0 {
                        usr2 += 1;
                    }
                    let val = libc::sigval {
                        sival_ptr: std::ptr::null_mut(),
                    };
                    if libc::sigqueue(pid, libc::SIGRTMIN() + 1, val) == 0 {
                        rt1 += 1;
                    }
                }
                std::thread::sleep(Duration::from_micros(700));
            }
            (usr2, rt1)
        })
    };
    let mut log = String::new();
    for i in 0..200 {
        let o = stasis(&["vdso", "--pid", &pid.to_string(), "-vv"]);
        log.push_str(&stderr_of(&o));
        assert!(
            o.status.success(),
            "infection {i} failed: {}",
            stderr_of(&o)
        );
        assert!(fx.state() != 'Z', "fixture died after infection {i}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (usr2, rt1) = sender.join().expect("signal sender");
    let verdict = fx.finish();
    if !verdict.starts_with("PASS") {
        let raced: Vec<&str> = log.lines().filter(|l| l.contains("raced")).collect();
        eprintln!("stasis log, signal races:\n{}", raced.join("\n"));
    }
    let d = assert_pass(&verdict);
    // SIGUSR2 is a standard signal: several sent while it is pending merge into one, so the
    // fixture sees at most as many. SIGRTMIN+1 queues: every one must arrive.
    assert!(
        detail(&d, "usr2") <= usr2 && detail(&d, "usr2") > 0,
        "usr2 {d} vs sent {usr2}"
    );
    assert_eq!(detail(&d, "rt1"), rt1, "queued real-time signals lost: {d}");
    assert!(
        detail(&d, "iterations") > 0,
        "the fixture made no progress: {d}"
    );
}

#[test]
fn survivor_single_thread_survives_200_infections() {
    if require_root("survivor_single_thread_survives_200_infections") {
        survive("1");
    }
}

#[test]
fn survivor_four_threads_survives_200_infections() {
    if require_root("survivor_four_threads_survives_200_infections") {
        survive("4");
    }
}

#[test]
fn survivor_sixty_four_threads_survives_200_infections() {
    if require_root("survivor_sixty_four_threads_survives_200_infections") {
        survive("64");
    }
}

/// The target shares its memory with a process stasis does not freeze, which scribbles 0xCC
/// over the shared region as soon as it appears. stasis must fail cleanly (never report
/// garbage, never crash the target), and the target must carry on intact.
#[test]
fn hostile_target_gets_a_clean_error() {
    if !require_root("hostile_target_gets_a_clean_error") {
        return;
    }
    let _one_at_a_time = heavy();
    let fx = Fixture::start("hostile", &["--sibling-pidfile", "{dir}/sibling"]);
    let pid = fx.pid.to_string();
    let mut errors = Vec::new();
    for _ in 0..200 {
        let o = stasis(&["vdso", "--pid", &pid, "--json"]);
        match o.status.code() {
            Some(0) => {
                // A run the scribbler missed must still be a correct, cross-checked report.
                let r: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
                assert!(r["vdso_mapped"].as_bool().unwrap_or(false));
            }
            Some(1) => {
                let e = stderr_of(&o);
                assert_eq!(e.trim().lines().count(), 1, "error is one line: {e}");
                assert!(e.contains(&pid), "error names the pid: {e}");
                errors.push(e);
            }
            other => panic!("stasis exited with {other:?}: {}", stderr_of(&o)),
        }
        assert!(fx.state() != 'Z', "hostile fixture died");
        assert_eq!(tracer_of(fx.pid), 0, "left traced");
        if errors.len() >= 5 {
            break;
        }
    }
    let d = assert_pass(&fx.finish());
    assert!(
        detail(&d, "scribbles") > 0,
        "the sibling never scribbled: {d}"
    );
    assert!(!errors.is_empty(), "no run noticed the scribbling ({d})");
    eprintln!(
        "hostile: {} clean errors, e.g. {}",
        errors.len(),
        errors[0].trim()
    );
}

/// The scribbler writes `jmp $` over the region: the parasite, if it runs at all, spins. stasis
/// must stop it at its deadline, cure, and report a timeout (or another clean error).
#[test]
fn runaway_parasite_is_stopped_and_cured() {
    if !require_root("runaway_parasite_is_stopped_and_cured") {
        return;
    }
    let _one_at_a_time = heavy();
    let fx = Fixture::start(
        "hostile",
        &[
            "--sibling-pidfile",
            "{dir}/sibling",
            "--fill",
            "loop",
            "--fill-pages",
            "1",
        ],
    );
    let pid = fx.pid.to_string();
    let mut errors = Vec::new();
    // A run the scribbler misses takes milliseconds; the first timeout ends the loop.
    for _ in 0..100 {
        let o = stasis(&["vdso", "--pid", &pid]);
        if o.status.code() == Some(1) {
            errors.push(stderr_of(&o));
            if errors.iter().any(|e| e.contains("did not answer")) {
                break;
            }
        } else {
            assert!(o.status.success(), "{}", stderr_of(&o));
        }
        assert_eq!(tracer_of(fx.pid), 0, "left traced");
    }
    let d = assert_pass(&fx.finish());
    assert!(detail(&d, "scribbles") > 0, "{d}");
    assert!(
        errors.iter().any(|e| e.contains("did not answer within")),
        "no run hit the timeout: {errors:?}"
    );
}

// ---- bad input -------------------------------------------------------------------------------

fn assert_refused(args: &[&str], code: i32, needle: &str) -> String {
    let o = stasis(args);
    let e = stderr_of(&o);
    assert_eq!(o.status.code(), Some(code), "stasis {args:?}: {e}");
    assert_eq!(e.trim().lines().count(), 1, "one-line error expected: {e}");
    assert!(
        e.to_lowercase().contains(needle),
        "{e:?} should mention {needle:?}"
    );
    e
}

fn free_pid() -> i32 {
    let max: i32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(32768);
    (1000..max)
        .rev()
        .find(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
        .expect("a free pid")
}

#[test]
fn refuses_nonexistent_pid() {
    let pid = free_pid().to_string();
    assert_refused(&["vdso", "--pid", &pid], 1, "no process");
}

#[test]
fn refuses_non_positive_pid() {
    assert_refused(&["vdso", "--pid", "0"], 2, "invalid pid");
    assert_refused(&["vdso", "--pid", "-5"], 2, "invalid pid");
    // dump too: a usage error, and no image directory made.
    let dir = std::env::temp_dir().join(format!("stasis-test-dump0-{}", std::process::id()));
    let d = dir.to_string_lossy().into_owned();
    assert_refused(&["dump", "-t", "0", "-D", &d], 2, "invalid pid");
    assert_refused(&["dump", "-t", "-5", "-D", &d], 2, "invalid pid");
    assert!(!dir.exists(), "a refused dump made {d}");
}

#[test]
fn refuses_its_own_pid() {
    // `exec` keeps the shell's pid, so $$ is stasis's own pid.
    let o = std::process::Command::new("sh")
        .args(["-c", &format!("exec {} vdso --pid $$", stasis_bin())])
        .output()
        .expect("sh");
    let e = stderr_of(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("stasis itself"), "{e}");
}

#[test]
fn refuses_a_zombie() {
    let mut child = std::process::Command::new("true").spawn().expect("true");
    let pid = child.id() as i32;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while stasis_state(pid) != 'Z' {
        assert!(
            std::time::Instant::now() < deadline,
            "child never became a zombie"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_refused(&["vdso", "--pid", &pid.to_string()], 1, "zombie");
    assert_eq!(
        stasis_state(pid),
        'Z',
        "the zombie is still there, unreaped"
    );
    let _ = child.wait();
}

#[test]
fn refuses_a_kernel_thread() {
    // kthreadd is pid 2 in every pid namespace that sees kernel threads.
    let pid = (2..200)
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit(')')
                        .next()
                        .and_then(|r| r.split_whitespace().nth(6)?.parse::<u64>().ok())
                })
                .is_some_and(|flags| flags & 0x0020_0000 != 0)
        })
        .expect("a kernel thread");
    assert_refused(&["vdso", "--pid", &pid.to_string()], 1, "kernel thread");
}

#[test]
fn refuses_an_already_traced_process() {
    if !require_root("refuses_an_already_traced_process") {
        return;
    }
    let fx = Fixture::start("sleeper", &[]);
    let target = nix::unistd::Pid::from_raw(fx.pid);
    nix::sys::ptrace::seize(target, nix::sys::ptrace::Options::empty())
        .expect("seize as the other tracer");
    // TracerPid names the tracing thread: this test's thread.
    // SAFETY: gettid has no preconditions.
    let me = unsafe { libc::gettid() }.to_string();
    let e = assert_refused(&["vdso", "--pid", &fx.pid.to_string()], 1, "already traced");
    assert!(e.contains(&me), "names the tracer {me}: {e}");
    // Still ours, untouched; let go and check it finishes fine.
    // SAFETY: as above.
    assert_eq!(tracer_of(fx.pid), unsafe { libc::gettid() });
    nix::sys::ptrace::detach(target, None).ok();
    // A seized but never stopped tracee cannot be detached with PTRACE_DETACH; interrupt first.
    if tracer_of(fx.pid) != 0 {
        nix::sys::ptrace::interrupt(target).expect("interrupt");
        nix::sys::wait::waitpid(target, Some(nix::sys::wait::WaitPidFlag::__WALL)).expect("wait");
        nix::sys::ptrace::detach(target, None).expect("detach");
    }
    assert_pass(&fx.finish());
}

#[test]
fn refuses_a_process_it_may_not_trace() {
    if !require_root("refuses_a_process_it_may_not_trace") {
        return;
    }
    let fx = Fixture::start("sleeper", &[]);
    // stasis as an unprivileged user against a root process.
    let o = {
        use std::os::unix::process::CommandExt;
        let mut c = std::process::Command::new(stasis_bin());
        c.args(["vdso", "--pid", &fx.pid.to_string()]);
        c.uid(65534).gid(65534);
        c.output().expect("stasis as nobody")
    };
    let e = stderr_of(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("not permitted"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    assert_eq!(tracer_of(fx.pid), 0);
    assert_pass(&fx.finish());
}

// ---- a process that rearranged its vDSO ------------------------------------------------------

#[test]
fn reports_an_unmapped_vdso_as_such() {
    if !require_root("reports_an_unmapped_vdso_as_such") {
        return;
    }
    let fx = Fixture::start("vdso_mover", &["--mode", "unmap"]);
    assert!(
        maps_areas(fx.pid).is_empty(),
        "the fixture should have unmapped everything"
    );
    let r = json_report(fx.pid);
    assert_eq!(r["layout"]["areas"].as_array().map(Vec::len), Some(0));
    assert_eq!(r["vdso_mapped"].as_bool(), Some(false));
    assert_eq!(r["symbols"].as_array().map(Vec::len), Some(0));
    assert_ne!(
        r["auxv_ehdr"].as_u64(),
        Some(0),
        "the auxv still names the old vDSO"
    );
    let o = stasis(&["vdso", "--pid", &fx.pid.to_string()]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("no vDSO or vvar area is mapped"), "{text}");
    assert!(text.contains("stale: the vDSO was unmapped"), "{text}");
    assert_pass(&fx.finish());
}

#[test]
fn follows_a_moved_vdso() {
    if !require_root("follows_a_moved_vdso") {
        return;
    }
    let fx = Fixture::start("vdso_mover", &["--mode", "move"]);
    let areas = maps_areas(fx.pid);
    let r = json_report(fx.pid);
    let vdso = areas
        .iter()
        .find(|a| a.0 == "[vdso]")
        .expect("moved [vdso] still mapped");
    assert_eq!(r["vdso_base"].as_u64(), Some(vdso.1));
    assert_eq!(r["vdso_mapped"].as_bool(), Some(true));
    assert_eq!(
        r["auxv_matches"].as_bool(),
        Some(false),
        "auxv is stale after the move"
    );
    assert!(r["symbols"].as_array().is_some_and(|s| s.len() >= 5));
    assert_pass(&fx.finish());
}

// ---- stasis check ----------------------------------------------------------------------------

#[test]
fn check_reports_required_features() {
    if !require_root("check_reports_required_features") {
        return;
    }
    let o = stasis(&["check", "--json"]);
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).expect("check --json prints JSON");
    let features = r["features"].as_array().expect("features");
    for name in [
        "ptrace_seize",
        "nt_x86_xstate",
        "memfd_create",
        "clone3_set_tid",
        "pr_set_mm_map",
        "arch_map_vdso_64",
    ] {
        let f = features
            .iter()
            .find(|f| f["name"] == name)
            .unwrap_or_else(|| panic!("{name} not probed"));
        assert_eq!(f["required"].as_bool(), Some(true), "{name}");
    }
    let all_ok = features
        .iter()
        .all(|f| f["ok"].as_bool() == Some(true) || f["required"].as_bool() == Some(false));
    assert_eq!(
        o.status.success(),
        all_ok,
        "exit status follows the required features: {r}"
    );
    assert!(r["vdso_layout"]
        .as_array()
        .is_some_and(|l| l.iter().any(|a| a[0] == "[vdso]")));
}

#[test]
fn check_fails_without_the_privileges_it_needs() {
    if !require_root("check_fails_without_the_privileges_it_needs") {
        return;
    }
    // As an unprivileged user clone3 with set_tid is refused: a required feature is missing.
    use std::os::unix::process::CommandExt;
    let o = std::process::Command::new(stasis_bin())
        .arg("check")
        .uid(65534)
        .gid(65534)
        .output()
        .expect("stasis check as nobody");
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(text.contains("MISSING"), "{text}");
}

/// An OS error is said once, however many layers pass it on (the image directory's, here: the
/// dump stops there, before the process is touched).
#[test]
fn an_os_error_is_said_once() {
    let mut sleeper = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("sleep");
    let pid = sleeper.id().to_string();
    let e = assert_refused(
        &["dump", "-t", &pid, "-D", "/nonexistent-stasis-dir/img"],
        1,
        "no such file or directory",
    );
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert_eq!(e.matches("No such file or directory").count(), 1, "{e}");
    let e = assert_refused(
        &["restore", "-D", "/nonexistent-stasis-dir/img"],
        1,
        "no such",
    );
    assert_eq!(e.matches("/nonexistent-stasis-dir/img").count(), 1, "{e}");
}
