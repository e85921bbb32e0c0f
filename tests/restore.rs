//! `stasis dump` and `stasis restore` on real processes. Each fixture checks its own state
//! after restore and reports PASS or FAIL with the reason.

mod common;

use common::*;

fn roundtrip(name: &str, args: &[&str]) -> String {
    let d = Daemon::start(name, args);
    d.dump(1);
    d.restore(1);
    assert_pass(&d.finish())
}

#[test]
fn sleeper_comes_back() {
    if require_root("sleeper_comes_back") {
        roundtrip("sleeper", &[]);
    }
}

#[test]
fn same_image_restored_twice() {
    if !require_root("same_image_restored_twice") {
        return;
    }
    let d = Daemon::start("sleeper", &[]);
    d.dump(1);
    d.restore(1);
    // SAFETY: killing the first copy.
    unsafe { libc::kill(d.pid, libc::SIGKILL) };
    wait_gone(d.pid);
    d.restore(1);
    assert_pass(&d.finish());
}

#[test]
fn dump_restore_dump_restore() {
    if !require_root("dump_restore_dump_restore") {
        return;
    }
    let d = Daemon::start("sleeper", &[]);
    d.dump(1);
    d.restore(1);
    d.dump(2);
    d.restore(2);
    assert_pass(&d.finish());
}

#[test]
fn leave_running_keeps_the_process() {
    if !require_root("leave_running_keeps_the_process") {
        return;
    }
    let d = Daemon::start("sleeper", &[]);
    let img = d.image(1);
    let o = stasis(&[
        "dump",
        "-t",
        &d.pid.to_string(),
        "-D",
        &img.to_string_lossy(),
        "--leave-running",
    ]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(
        matches!(stasis_state(d.pid), 'S' | 'R'),
        "the process should still run"
    );
    // Its pid is taken: a restore must refuse cleanly and create nothing.
    let o = stasis(&["restore", "-D", &img.to_string_lossy(), "--detach"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr_of(&o).contains("in use"), "{}", stderr_of(&o));
    assert_pass(&d.finish());
}

#[test]
fn restore_without_detach_waits_and_passes_the_exit_status() {
    if !require_root("restore_without_detach_waits_and_passes_the_exit_status") {
        return;
    }
    let d = Daemon::start("sleeper", &[]);
    d.dump(1);
    let mut restore = std::process::Command::new(stasis_bin())
        .args(["restore", "-D", &d.image(1).to_string_lossy()])
        .spawn()
        .expect("stasis restore");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while stasis_state(d.pid) == '?' || tracer_of(d.pid) != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the restored process never ran"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let pid = d.pid;
    let verdict = d.finish();
    let status = restore.wait().expect("waiting for stasis restore");
    assert_pass(&verdict);
    assert_eq!(
        status.code(),
        Some(0),
        "stasis restore exits with the restored process's status (pid {pid})"
    );
}

#[test]
fn vdso_calls_through_cached_pointers_agree_with_syscalls() {
    if require_root("vdso_calls_through_cached_pointers_agree_with_syscalls") {
        roundtrip("vdso_calls", &[]);
    }
}

#[test]
fn memory_of_every_vma_kind_comes_back() {
    if require_root("memory_of_every_vma_kind_comes_back") {
        roundtrip("memory", &[]);
    }
}
