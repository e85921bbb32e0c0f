//! Lazy restore (`restore --lazy-pages`): the restored process runs before its private
//! anonymous memory is in; stasis serves every page on its first touch and pushes the rest
//! meanwhile, as the process's tracer, and lets it go once every page is in. The pushes are
//! slowed down here (`STASIS_LAZY_PUSH_DELAY_MS`) so that the process surely runs, forks,
//! moves and drops memory while most of it is still missing.

mod common;

use common::*;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `stasis restore -D img --lazy-pages -d` started, not waited for.
fn restore_lazily(img: &std::path::Path, delay_ms: u32) -> Child {
    let mut c = Command::new(stasis_bin());
    c.args(["restore", "-d", "--lazy-pages", "-D"])
        .arg(img)
        .env("STASIS_LAZY_PUSH_DELAY_MS", delay_ms.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    only_stdio(&mut c);
    c.spawn().expect("starting stasis restore")
}

/// Waits until `pid` runs traced by `tracer`: restored, its memory still coming.
fn wait_running_lazily(pid: i32, tracer: i32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = stasis_state(pid);
        if tracer_of(pid) == tracer && matches!(st, 'R' | 'S') {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pid {pid} never ran traced by {tracer} (state {st})"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn finish_restore(c: Child) -> String {
    let o = c.wait_with_output().expect("waiting for stasis restore");
    let e = stderr_of(&o);
    assert!(o.status.success(), "restore --lazy-pages: {e}");
    e
}

#[test]
fn a_lazily_restored_process_reads_its_memory_from_several_threads_at_once() {
    if !require_root("a_lazily_restored_process_reads_its_memory_from_several_threads_at_once") {
        return;
    }
    let d = Daemon::start(
        "toucher",
        &[
            "--mib",
            "64",
            "--threads",
            "3",
            "--progress",
            "{dir}/progress",
        ],
    );
    let progress = d.dir.path().join("progress");
    let wait_progress = |want: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::fs::read_to_string(&progress).ok().as_deref() != Some(want) {
            assert!(
                Instant::now() < deadline,
                "the fixture never got to {want:?}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    std::thread::sleep(Duration::from_millis(100));
    d.dump(1);
    // About 80 pieces of 1 MiB, 30 ms apart for each of two pushers: more than a second in
    // which the readers fault pages in, the process forks and moves and drops memory.
    let c = restore_lazily(&d.image(1), 30);
    let server = c.id() as i32;
    wait_running_lazily(d.pid, server);
    // The move and the drop first, then the fork.
    // (The pushers go from the lowest address up, 30 ms per MiB: B, C and D, above A, are
    // not pushed for a second; A's pages come in as the readers fault them.)
    // SAFETY: signalling the fixture's pid.
    unsafe { libc::kill(d.pid, libc::SIGUSR2) };
    wait_progress("forks=0 moves=1\n");
    // The child reads D, which nobody touched yet: it gets it through its own userfaultfd.
    // SAFETY: as above.
    unsafe { libc::kill(d.pid, libc::SIGUSR1) };
    wait_progress("forks=1 moves=1\n");
    finish_restore(c);
    assert_eq!(tracer_of(d.pid), 0, "still traced after the lazy restore");
    let v = assert_pass(&d.finish_keep());
    assert_eq!(detail(&v, "forks"), 1, "{v}");
    assert_eq!(detail(&v, "moves"), 1, "{v}");
    assert!(detail(&v, "sweeps") > 0, "{v}");
}

#[test]
fn a_killed_page_server_takes_its_processes_with_it() {
    if !require_root("a_killed_page_server_takes_its_processes_with_it") {
        return;
    }
    let d = Daemon::start("toucher", &["--mib", "64", "--threads", "2"]);
    d.dump(1);
    let mut c = restore_lazily(&d.image(1), 200);
    let server = c.id() as i32;
    wait_running_lazily(d.pid, server);
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(tracer_of(d.pid), server, "the memory came in too fast");
    c.kill().expect("killing the page server");
    let _ = c.wait();
    // Killed with it (the kernel's PTRACE_O_EXITKILL), not left waiting on a fault nobody
    // serves, nor running on with zeros where its memory was.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !matches!(stasis_state(d.pid), 'Z' | '?') {
        assert!(
            Instant::now() < deadline,
            "pid {} lives on (state {}) after its page server was killed",
            d.pid,
            stasis_state(d.pid)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = std::fs::read_to_string(d.dir.path().join("out")).unwrap_or_default();
    assert!(!out.contains("FAIL"), "it ran on with wrong memory: {out}");
    wait_gone(d.pid);
}

#[test]
fn a_tree_from_an_incremental_chain_is_restored_lazily() {
    if !require_root("a_tree_from_an_incremental_chain_is_restored_lazily") {
        return;
    }
    let d = Daemon::start(
        "phases",
        &["--mib", "16", "--fork", "--phase-file", "{dir}/phase"],
    );
    let pid = d.pid.to_string();
    let child = children_of(d.pid);
    assert_eq!(child.len(), 1);
    let img1 = d.image(1).to_string_lossy().into_owned();
    let img2 = d.image(2).to_string_lossy().into_owned();
    let o = stasis(&["pre-dump", "-t", &pid, "-D", &img1]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    next_phase(&d, 2);
    let o = stasis(&[
        "dump",
        "-t",
        &pid,
        "-D",
        &img2,
        "--prev-images-dir",
        "../img1",
    ]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(stderr_of(&o).contains("unchanged"), "{}", stderr_of(&o));
    wait_gone(d.pid);
    wait_gone(child[0]);
    let c = restore_lazily(&d.image(2), 5);
    let server = c.id() as i32;
    wait_running_lazily(d.pid, server);
    wait_running_lazily(child[0], server);
    next_phase(&d, 3);
    finish_restore(c);
    next_phase(&d, 4);
    let v = assert_pass(&d.finish_keep());
    assert_eq!(detail(&v, "phase"), 4, "{v}");
}

#[test]
fn a_damaged_page_is_never_served_and_the_process_dies_before_it_gets_it() {
    if !require_root("a_damaged_page_is_never_served_and_the_process_dies_before_it_gets_it") {
        return;
    }
    let d = Daemon::start("toucher", &["--mib", "32", "--threads", "2"]);
    d.dump(1);
    // A byte of page data in the middle of the page file: the readers' area, served lazily
    // and so checked only when served.
    let pages = d.image(1).join("pages.img");
    let mut bytes = std::fs::read(&pages).expect("pages.img");
    let at = bytes.len() / 2 + 123;
    bytes[at] ^= 0x10;
    std::fs::write(&pages, &bytes).expect("write pages.img");
    let c = restore_lazily(&d.image(1), 0);
    let o = c.wait_with_output().expect("waiting for the restore");
    let e = stderr_of(&o);
    assert!(!o.status.success(), "a damaged image was restored: {e}");
    assert!(e.contains("does not match its checksum"), "{e}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !matches!(stasis_state(d.pid), 'Z' | '?') {
        assert!(Instant::now() < deadline, "pid {} lives on", d.pid);
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = std::fs::read_to_string(d.dir.path().join("out")).unwrap_or_default();
    assert!(
        out.is_empty(),
        "the process got to a verdict with a damaged page: {out}"
    );
    wait_gone(d.pid);
}
