//! Copy-on-write snapshot dumps: `dump --leave-running` freezes the process only while all
//! but its memory is read, then lets it run on while its memory is read from a forked
//! snapshot. The fixture (tests/fixtures/scribbler.c) writes its memory as fast as it can —
//! private, shared, MADV_DONTFORK and MADV_WIPEONFORK memory — and checks every page
//! against where its writer is: an image holding any page from after the freeze instant (or
//! a page of the snapshot where the snapshot does not have the process's memory) makes the
//! restored process fail its own check. The process dumped runs on unharmed, and no
//! snapshot is left behind (alive or as a zombie child).

mod common;

use common::*;

/// `dump --leave-running` of `d` into image `n` with extra `args`; returns stasis's summary.
fn dump_running(d: &Daemon, n: u32, args: &[&str]) -> String {
    let img = d.image(n);
    let pid = d.pid.to_string();
    let img_s = img.to_string_lossy().into_owned();
    let mut a = vec!["dump", "-t", &pid, "-D", &img_s, "--leave-running"];
    a.extend(args);
    let o = stasis(&a);
    let e = stderr_of(&o);
    assert!(o.status.success(), "dump {n}: {e}");
    assert_eq!(tracer_of(d.pid), 0, "still traced after dump {n}");
    assert!(
        children_of(d.pid).is_empty(),
        "dump {n} left children of pid {}: {:?}",
        d.pid,
        children_of(d.pid)
    );
    e
}

/// Frozen milliseconds from the summary line.
fn frozen_ms(summary: &str) -> f64 {
    summary
        .split("frozen ")
        .nth(1)
        .and_then(|r| r.split(" ms").next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no freeze time in {summary:?}"))
}

#[test]
fn a_snapshot_dump_is_the_freeze_instant_while_the_process_writes_on() {
    if !require_root("a_snapshot_dump_is_the_freeze_instant_while_the_process_writes_on") {
        return;
    }
    let d = Daemon::start("scribbler", &["--mib", "96", "--shared-mib", "8"]);
    let mut summaries = Vec::new();
    for n in 1..=3 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let e = dump_running(&d, n, &[]);
        assert!(
            e.contains("memory copied from a snapshot after"),
            "dump {n} used no snapshot: {e}"
        );
        summaries.push(e);
    }
    // A dump that keeps the process frozen while its memory is copied, for comparison.
    let plain = dump_running(&d, 4, &["--no-snapshot"]);
    assert!(!plain.contains("snapshot"), "{plain}");
    let snap_ms: Vec<f64> = summaries.iter().map(|e| frozen_ms(e)).collect();
    eprintln!(
        "frozen with a snapshot: {snap_ms:?} ms; without: {} ms",
        frozen_ms(&plain)
    );
    // The process ran on through every dump, its memory as its writer expects.
    let v = assert_pass(&d.finish_keep());
    let ran = detail(&v, "passes");
    wait_gone(d.pid);
    // Each image is the process at its freeze: restored, it writes on from there and checks
    // every page it comes to; then all of memory once more at its end.
    for n in [1, 3, 4] {
        d.restore(n);
        std::thread::sleep(std::time::Duration::from_millis(400));
        let v = assert_pass(&d.finish_keep());
        assert!(detail(&v, "passes") > 2, "image {n}: {v}");
        wait_gone(d.pid);
    }
    assert!(ran > 3, "the original wrote {ran} passes");
}

/// A process that cannot fork (its pids cgroup is full) is dumped as before: frozen while its
/// memory is copied, with a warning saying so, and its image is as exact.
#[test]
fn a_process_that_cannot_fork_is_dumped_frozen_instead() {
    if !require_root("a_process_that_cannot_fork_is_dumped_frozen_instead") {
        return;
    }
    let base = std::path::Path::new("/sys/fs/cgroup/pids");
    assert!(
        base.join("cgroup.procs").exists(),
        "this test needs the cgroup v1 pids controller at {}",
        base.display()
    );
    let d = Daemon::start("scribbler", &["--mib", "16", "--shared-mib", "1"]);
    let cg = base.join(format!("stasis-test-nofork-{}", d.pid));
    std::fs::create_dir(&cg).expect("making a pids cgroup");
    struct Remove(std::path::PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _cg = Remove(cg.clone());
    // Both of its threads in the group, and not one task more allowed.
    for tid in std::fs::read_dir(format!("/proc/{}/task", d.pid))
        .expect("tasks")
        .flatten()
    {
        std::fs::write(
            cg.join("tasks"),
            tid.file_name().to_string_lossy().as_bytes(),
        )
        .expect("moving a thread into the cgroup");
    }
    std::fs::write(cg.join("pids.max"), "2").expect("pids.max");
    let e = dump_running(&d, 1, &[]);
    assert!(
        e.contains("no copy-on-write snapshot") && !e.contains("copied from a snapshot"),
        "{e}"
    );
    // Out of the group again (its tasks go back to the root group) before it is removed.
    for tid in std::fs::read_dir(format!("/proc/{}/task", d.pid))
        .expect("tasks")
        .flatten()
    {
        let _ = std::fs::write(
            base.join("tasks"),
            tid.file_name().to_string_lossy().as_bytes(),
        );
    }
    assert_pass(&d.finish_keep());
    wait_gone(d.pid);
    d.restore(1);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_pass(&d.finish_keep());
}

/// A real interpreter whose heap never holds still: Python rewrites a dict of 200 000 entries
/// in a loop and keeps a running total of its values. It is dumped `--leave-running` twice
/// while it does; each image, restored, must be one consistent instant of it — the dict's
/// values sum to the total (checked on its next 100 000th step and at the end) — and the
/// original runs on unharmed through both dumps.
#[test]
fn python_rewriting_its_heap_is_dumped_at_one_instant() {
    if !require_root("python_rewriting_its_heap_is_dumped_at_one_instant") {
        return;
    }
    let dir = tempdir::Dir::new("snapshot-python");
    let pidfile = dir.path().join("pid");
    let verdict = dir.path().join("verdict");
    let script = format!(
        r#"import os, signal
stop = False
def term(*a):
    global stop
    stop = True
signal.signal(signal.SIGTERM, term)
d = {{}}
total = 0
n = 0
bad = 0
open('{p}.tmp', 'w').write(str(os.getpid())); os.rename('{p}.tmp', '{p}')
while not stop:
    k = n % 200000
    v = (n * 7919) % 1000003
    total += v - d.get(k, 0)
    d[k] = v
    n += 1
    if n % 100000 == 0 and sum(d.values()) != total:
        bad += 1
ok = not bad and sum(d.values()) == total and len(d) == min(n, 200000)
open('{v}.tmp', 'w').write('%s n=%d bad=%d\n' % ('OK' if ok else 'BAD', n, bad))
os.rename('{v}.tmp', '{v}')
"#,
        p = pidfile.display(),
        v = verdict.display()
    );
    let mut child = python(&script, &pidfile, None, true);
    let pid = child.id() as i32;
    let finish = |what: &str| -> u64 {
        let _ = std::fs::remove_file(&verdict);
        // SAFETY: signalling the interpreter this test started (or restored).
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let v = loop {
            if let Ok(v) = std::fs::read_to_string(&verdict) {
                break v;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: no verdict (state {})",
                stasis_state(pid)
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert!(v.starts_with("OK"), "{what}: {v}");
        v.split("n=")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    // Until its dict is whole: 200 000 entries (and the first checks done).
    std::thread::sleep(std::time::Duration::from_millis(1500));
    for n in 1..=2 {
        let img = dir.path().join(format!("img{n}"));
        let o = stasis(&[
            "dump",
            "-t",
            &pid.to_string(),
            "-D",
            &img.to_string_lossy(),
            "--leave-running",
        ]);
        let e = stderr_of(&o);
        assert!(o.status.success(), "dump {n}: {e}");
        assert!(e.contains("copied from a snapshot"), "dump {n}: {e}");
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    let ran = finish("the original");
    let _ = child.wait();
    for n in 1..=2 {
        let img = dir.path().join(format!("img{n}"));
        let o = stasis(&["restore", "-D", &img.to_string_lossy(), "--detach"]);
        assert!(o.status.success(), "restore {n}: {}", stderr_of(&o));
        // Long enough for several checks of the whole dict.
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let got = finish(&format!("image {n}, restored"));
        assert!(got > 200_000, "image {n} ran {got} steps");
        wait_gone(pid);
    }
    assert!(ran > 200_000, "the original ran {ran} steps");
}

/// While a snapshot lives, every page the process writes is copied. When that runs a memory
/// cgroup out of memory, the snapshot is the one the kernel kills (its OOM score is the
/// highest there is): the dump fails, saying so, and the process runs on unharmed.
#[test]
fn a_snapshot_out_of_memory_fails_the_dump_not_the_process() {
    if !require_root("a_snapshot_out_of_memory_fails_the_dump_not_the_process") {
        return;
    }
    let base = std::path::Path::new("/sys/fs/cgroup/memory");
    assert!(
        base.join("cgroup.procs").exists(),
        "this test needs the cgroup v1 memory controller at {}",
        base.display()
    );
    let cg = base.join(format!("stasis-test-oom-{}", std::process::id()));
    std::fs::create_dir(&cg).expect("making a memory cgroup");
    struct Leave(std::path::PathBuf);
    impl Drop for Leave {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _cg = Leave(cg.clone());
    // Started inside the group, so that all its memory is charged there (charges do not move
    // with a process); then the limit is what it uses and 32 MiB more.
    let dir = tempdir::Dir::new("snapshot-oom");
    let pidfile = dir.path().join("pid");
    let status = {
        let mut c = std::process::Command::new("sh");
        c.arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec \"$0\" \"$@\"",
                cg.display()
            ))
            .arg(fixture_bin("scribbler"))
            .args(["--pidfile", &pidfile.to_string_lossy()])
            .args(["--out", &dir.path().join("out").to_string_lossy()])
            .args(["--daemon", "--mib", "192", "--shared-mib", "0"]);
        only_stdio(&mut c);
        c.status().expect("starting scribbler in the cgroup")
    };
    assert!(status.success(), "scribbler did not get ready");
    let d = Daemon {
        pid: std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .expect("scribbler's pid"),
        dir,
        name: "scribbler".into(),
    };
    let used: u64 = std::fs::read_to_string(cg.join("memory.usage_in_bytes"))
        .ok()
        .and_then(|u| u.trim().parse().ok())
        .expect("memory.usage_in_bytes");
    assert!(used > 190 << 20, "only {used} bytes charged to the group");
    std::fs::write(
        cg.join("memory.limit_in_bytes"),
        (used + (32 << 20)).to_string(),
    )
    .expect("memory.limit_in_bytes");
    let pid = d.pid.to_string();
    let img = d.image(1);
    let o = stasis(&[
        "dump",
        "-t",
        &pid,
        "-D",
        &img.to_string_lossy(),
        "--leave-running",
    ]);
    let e = stderr_of(&o);
    assert_eq!(o.status.code(), Some(1), "the dump went through: {e}");
    assert!(e.contains("snapshot"), "{e}");
    assert!(!img.exists(), "a failed dump left {}", img.display());
    assert_eq!(tracer_of(d.pid), 0, "still traced");
    assert!(
        children_of(d.pid).is_empty(),
        "children left: {:?}",
        children_of(d.pid)
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_pass(&d.finish_keep());
    wait_gone(d.pid);
}

/// On a terminal, a dump and a restore of 400 MiB draw a progress bar of the page bytes (and
/// clear it before the summary line); with stderr not a terminal, no bar. `script` gives
/// stasis its terminal.
#[test]
fn a_big_dump_and_restore_show_progress_on_a_terminal_only() {
    if !require_root("a_big_dump_and_restore_show_progress_on_a_terminal_only") {
        return;
    }
    let dir = tempdir::Dir::new("progress");
    let pidfile = dir.path().join("pid");
    let script = format!(
        "import os, time\nb = bytearray(b'\\x01') * (400 << 20)\nopen('{p}.tmp', 'w').write(str(os.getpid())); os.rename('{p}.tmp', '{p}')\ntime.sleep(120)\n",
        p = pidfile.display()
    );
    let mut child = python(&script, &pidfile, None, true);
    let pid = child.id() as i32;
    let img = dir.path().join("img");
    let on_terminal = |args: String, typescript: &std::path::Path| -> String {
        let o = std::process::Command::new("script")
            .args(["-q", "-e", "-c", &args])
            .arg(typescript)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("running script");
        assert!(
            o.status.success(),
            "{args}: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&std::fs::read(typescript).expect("the typescript")).into_owned()
    };
    let bin = stasis_bin();
    let shown = on_terminal(
        format!("{bin} dump -t {pid} -D {}", img.display()),
        &dir.path().join("dump.ts"),
    );
    let _ = child.wait();
    assert!(
        shown.contains("dump [") && shown.contains(" MiB/40"),
        "a bar of about 400 MiB: {}",
        &shown[..shown.len().min(400)]
    );
    assert!(
        shown.contains("\u{1b}[2Kdumped pid"),
        "cleared before the summary"
    );
    let shown = on_terminal(
        format!("{bin} restore -D {} -d", img.display()),
        &dir.path().join("restore.ts"),
    );
    assert!(
        shown.contains("restore ["),
        "{}",
        &shown[..shown.len().min(400)]
    );
    // SAFETY: the restored copy is not our child; stop it.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_gone(pid);
    // Not a terminal: no bar.
    let mut child = python(&script, &pidfile, None, true);
    let pid = child.id() as i32;
    let img2 = dir.path().join("img2");
    let o = stasis(&[
        "dump",
        "-t",
        &pid.to_string(),
        "-D",
        &img2.to_string_lossy(),
    ]);
    let _ = child.wait();
    let e = stderr_of(&o);
    assert!(o.status.success(), "{e}");
    assert!(!e.contains('['), "no bar off a terminal: {e}");
}
