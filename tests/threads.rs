//! Multi-threaded processes, dumped (killed) and restored with the same thread ids: every
//! thread's registers, sigaltstack, blocked mask, pending signals, name, scheduling, affinity,
//! robust list and clear-child-tid come back, and a thread that was blocked in a system call
//! carries on with it. The fixtures check themselves (see tests/fixtures/threads.c).

mod common;

use common::*;

/// Dump and restore twice, then the verdict.
fn twice(name: &str, args: &[&str]) -> String {
    let d = Daemon::start(name, args);
    let tids = threads_of(d.pid);
    d.dump(1);
    d.restore(1);
    assert_eq!(threads_of(d.pid), tids, "the same thread ids after restore");
    d.dump(2);
    d.restore(2);
    assert_eq!(
        threads_of(d.pid),
        tids,
        "the same thread ids after a second restore"
    );
    assert_pass(&d.finish())
}

fn threads_of(pid: i32) -> Vec<i32> {
    let mut t: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("task dir")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    t.sort_unstable();
    t
}

#[test]
fn one_thread_with_its_state_comes_back() {
    if require_root("one_thread_with_its_state_comes_back") {
        let d = twice("threads", &["--threads", "1"]);
        assert!(d.contains("threads=1"), "{d}");
    }
}

#[test]
fn four_threads_each_with_its_own_state_come_back() {
    if require_root("four_threads_each_with_its_own_state_come_back") {
        let d = twice("threads", &["--threads", "4"]);
        assert!(d.contains("threads=4"), "{d}");
        assert!(d.contains("epoll_eintr=0"), "a freeze showed as EINTR: {d}");
    }
}

#[test]
fn sixty_four_threads_blocked_in_every_kind_of_call_come_back() {
    if require_root("sixty_four_threads_blocked_in_every_kind_of_call_come_back") {
        let d = twice("threads", &["--threads", "64", "--strict-epoll"]);
        assert!(d.contains("threads=64"), "{d}");
    }
}

/// Each blocking call on its own, every thread in it at the dump.
#[test]
fn threads_all_blocked_in_one_call_resume_it() {
    if !require_root("threads_all_blocked_in_one_call_resume_it") {
        return;
    }
    for mode in ["futex", "nanosleep", "read", "poll", "epoll"] {
        let d = twice(
            "threads",
            &["--threads", "4", "--block", mode, "--strict-epoll"],
        );
        assert!(d.contains(&format!("mode={mode}")), "{d}");
    }
}

/// The survivor (per-thread POSIX timers, futex, poll, read, registers) with workers on
/// several threads, dumped and restored while signals keep arriving.
#[test]
fn survivor_with_four_workers_comes_back() {
    if require_root("survivor_with_four_workers_comes_back") {
        twice("survivor", &["--threads", "4"]);
    }
}

/// Threads are created and exit thousands of times a second while stasis freezes the process:
/// every freeze must catch a consistent set (none missed, none half-made), the process must
/// carry on unharmed after each, and a dump of it must restore.
#[test]
fn threads_created_and_exiting_during_the_freeze() {
    if !require_root("threads_created_and_exiting_during_the_freeze") {
        return;
    }
    let d = Daemon::start("thread_churn", &["--workers", "4", "--pause-us", "50"]);
    for n in 0..20 {
        d.dump_leave_running(100 + n);
    }
    d.dump(1);
    d.restore(1);
    let v = assert_pass(&d.finish());
    assert!(detail(&v, "created") > 1000, "the threads churned: {v}");
}

/// A restore needs every thread id free, not only the pid.
#[test]
fn restore_refuses_when_a_thread_id_is_taken() {
    if !require_root("restore_refuses_when_a_thread_id_is_taken") {
        return;
    }
    let d = Daemon::start("threads", &["--threads", "2"]);
    let tids = threads_of(d.pid);
    d.dump(1);
    // Take the second thread's id with a process of our own.
    let mut taker = None;
    for _ in 0..3 {
        // SAFETY: a child that only sleeps, created with the wanted pid (root).
        let r = unsafe { clone_with_pid(tids[1]) };
        if r > 0 {
            taker = Some(r);
            break;
        }
        wait_gone(tids[1]);
    }
    let taker = taker.expect("could not take the thread id");
    let o = stasis(&["restore", "-D", &d.image(1).to_string_lossy(), "--detach"]);
    // SAFETY: our own child.
    unsafe {
        libc::kill(taker, libc::SIGKILL);
        libc::waitpid(taker, std::ptr::null_mut(), 0);
    }
    assert_eq!(o.status.code(), Some(1));
    let e = stderr_of(&o);
    assert!(
        e.contains(&format!("thread id {} is in use", tids[1])),
        "{e}"
    );
    assert!(!std::path::Path::new(&format!("/proc/{}", d.pid)).exists());
}

/// fork() whose child has pid `pid` and waits to be killed; returns the pid or -1.
unsafe fn clone_with_pid(pid: i32) -> i32 {
    // SAFETY: a fork-like clone3; the child only pauses until it is killed.
    match unsafe { stasis_sys::clone::clone3_with_pid(pid) } {
        Ok(0) => loop {
            // SAFETY: the child waits to be killed.
            unsafe { libc::pause() };
        },
        Ok(child) => child,
        Err(_) => -1,
    }
}

/// Every thread's state letter, e.g. "TTTTT".
fn states_of(pid: i32) -> String {
    threads_of(pid)
        .iter()
        .map(|t| {
            let s =
                std::fs::read_to_string(format!("/proc/{pid}/task/{t}/stat")).unwrap_or_default();
            s.rfind(')')
                .and_then(|i| s[i + 2..].chars().next())
                .unwrap_or('?')
        })
        .collect()
}

fn wait_states(pid: i32, want: char) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let s = states_of(pid);
        if !s.is_empty() && s.chars().all(|c| c == want) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pid {pid}: thread states {s}, waiting for all {want}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// A process stopped by job control (SIGSTOP: the daemon's process group is orphaned, so the
/// kernel would discard a SIGTSTP) stays stopped through a
/// `--leave-running` dump, comes back stopped from a restore — every thread, and it runs no
/// further: its thread ids and CPU time do not move — and carries on when continued.
#[test]
fn a_stopped_process_comes_back_stopped() {
    if !require_root("a_stopped_process_comes_back_stopped") {
        return;
    }
    let d = Daemon::start("threads", &["--threads", "4"]);
    // SAFETY: signalling the fixture.
    unsafe { libc::kill(d.pid, libc::SIGSTOP) };
    wait_states(d.pid, 'T');
    d.dump_leave_running(1);
    wait_states(d.pid, 'T');
    let o = stasis(&[
        "dump",
        "-t",
        &d.pid.to_string(),
        "-D",
        &d.image(2).to_string_lossy(),
    ]);
    assert!(o.status.success(), "dump: {}", stderr_of(&o));
    wait_gone(d.pid);
    let o = stasis(&["restore", "-D", &d.image(2).to_string_lossy(), "-d"]);
    assert!(o.status.success(), "restore: {}", stderr_of(&o));
    wait_states(d.pid, 'T');
    assert_eq!(tracer_of(d.pid), 0, "not traced");
    let cpu = |pid: i32| {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let f: Vec<String> = s[s.rfind(')').unwrap_or(0) + 2..]
            .split_whitespace()
            .map(str::to_string)
            .collect();
        (f.get(11).cloned(), f.get(12).cloned())
    };
    let before = cpu(d.pid);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(states_of(d.pid).chars().filter(|&c| c != 'T').count(), 0);
    assert_eq!(cpu(d.pid), before, "a stopped process used CPU");
    // SAFETY: signalling the fixture.
    unsafe { libc::kill(d.pid, libc::SIGCONT) };
    wait_states(d.pid, 'S');
    let v = assert_pass(&d.finish());
    assert!(v.contains("threads=4"), "{v}");
}
