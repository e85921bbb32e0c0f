//! A killed stasis harms nothing: stasis is SIGKILLed at every step that changes a traced
//! process (`STASIS_KILL_AT=N`, see `stasis_sys::fault`), N = 1, 2, … until a run gets
//! through, in a dump (leaving the target running, and killing it), in `stasis vdso` and in a
//! restore; then at random moments from outside. After each kill the target must run on
//! exactly as before — its threads' signal masks, its code, no region or memfd of ours left,
//! untraced — and at the end its own verdict (registers, memory, every blocking call
//! invisible) must be PASS. A restore killed mid-way must leave no task holding the pid.

mod common;

use common::*;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// What must not change in the target across a killed stasis.
#[derive(Debug, PartialEq)]
struct Shape {
    /// (tid, SigBlk) of every thread.
    masks: Vec<(i32, String)>,
    /// The first page of every executable mapping (the injection site is the first one).
    code: Vec<(u64, Vec<u8>)>,
    /// Its children, dead or alive (a dump's copy-on-write snapshot is one while it lasts).
    children: Vec<i32>,
}

fn shape(pid: i32) -> Shape {
    let mut masks = Vec::new();
    let mut tids: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("task dir")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort();
    for tid in tids {
        let st =
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap_or_default();
        let blk = st
            .lines()
            .find_map(|l| l.strip_prefix("SigBlk:"))
            .unwrap_or("")
            .trim()
            .to_string();
        masks.push((tid, blk));
    }
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("mem");
    let mut code = Vec::new();
    for l in maps.lines() {
        let mut f = l.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        if !perms.contains('x') || l.contains("[vdso]") || l.contains("[vsyscall]") {
            continue;
        }
        let start = u64::from_str_radix(range.split('-').next().unwrap_or("0"), 16).unwrap_or(0);
        let mut page = vec![0u8; 4096];
        if std::os::unix::fs::FileExt::read_exact_at(&mem, &mut page, start).is_ok() {
            code.push((start, page));
        }
    }
    let children = children_of(pid);
    Shape {
        masks,
        code,
        children,
    }
}

/// The shape once it holds still (a thread that has just started, or just been let go, is
/// still settling into its wait).
fn settled_shape(pid: i32) -> Shape {
    let mut last = shape(pid);
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(20));
        let now = shape(pid);
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("pid {pid} never holds still: {:?}", last.masks);
}

/// Anything of ours left in the target: a mapping or a descriptor of the region's memfd.
fn leftovers(pid: i32) -> Vec<String> {
    let mut left: Vec<String> = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("memfd:stasis"))
        .map(str::to_string)
        .collect();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in dir.flatten() {
            if let Ok(l) = std::fs::read_link(e.path()) {
                // The region's memfd, or a userfaultfd a pre-dump had the process make.
                let l_s = l.to_string_lossy();
                if l_s.contains("memfd:stasis") || l_s == "anon_inode:[userfaultfd]" {
                    left.push(format!("fd {:?} -> {}", e.file_name(), l.display()));
                }
            }
        }
    }
    left
}

/// VMAs of `pid` registered with a userfaultfd for write protection (smaps `uw`).
fn tracked_vmas(pid: i32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("VmFlags:") && l.split_whitespace().any(|f| f == "uw"))
        .count()
}

/// Waits until `pid` is gone, reaping it if it became ours (this test is a subreaper: what a
/// killed stasis leaves is reparented here, not to an init that reaps every few seconds).
fn reap_gone(pid: i32, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        // SAFETY: waitpid on a pid, no status wanted.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG | libc::__WALL) };
        assert!(
            Instant::now() < deadline,
            "{what}: pid {pid} is still there ({})",
            stasis_state(pid)
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Runs stasis with `args`, killing itself at step `at` (0: never).
fn stasis_killed_at(args: &[&str], at: u32) -> Output {
    let mut c = Command::new(stasis_bin());
    c.args(args);
    if at > 0 {
        c.env("STASIS_KILL_AT", at.to_string());
    }
    // `output` returns once stderr is closed: the guardian holds it until it has finished.
    c.output().expect("running stasis")
}

fn was_killed(o: &Output) -> bool {
    o.status.signal() == Some(libc::SIGKILL)
}

/// After a killed stasis: the target is untraced, as it was, with nothing of ours left.
fn check_unharmed(pid: i32, before: &Shape, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tracer_of(pid) != 0 {
        assert!(Instant::now() < deadline, "{what}: pid {pid} stays traced");
        std::thread::sleep(Duration::from_millis(2));
    }
    let st = stasis_state(pid);
    assert!(
        matches!(st, 'S' | 'R' | 'D'),
        "{what}: pid {pid} is in state {st}"
    );
    let left = leftovers(pid);
    assert!(left.is_empty(), "{what}: left in pid {pid}: {left:?}");
    // A thread in sigsuspend shows its temporary mask; for a moment after it is let go (before
    // the call is restarted) it shows its own: give it that moment.
    let mut now = shape(pid);
    for _ in 0..50 {
        if now.masks == before.masks {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
        now = shape(pid);
    }
    assert_eq!(now.masks, before.masks, "{what}: signal masks changed");
    assert_eq!(
        now.children, before.children,
        "{what}: children changed (a snapshot left?)"
    );
    assert_eq!(
        now.code.len(),
        before.code.len(),
        "{what}: executable mappings changed"
    );
    for ((a, x), (b, y)) in now.code.iter().zip(&before.code) {
        assert_eq!(a, b, "{what}: executable mappings moved");
        assert!(x == y, "{what}: code at {a:#x} changed");
    }
}

/// Kills `stasis <args>` at every step in turn; returns the number of kills. `after_kill`
/// runs after each; the walk ends when a run gets through (its output goes to `done`).
fn walk(
    args: &[&str],
    mut after_kill: impl FnMut(u32, &Output),
    done: impl FnOnce(&Output),
) -> u32 {
    for at in 1..400 {
        let o = stasis_killed_at(args, at);
        if !was_killed(&o) {
            done(&o);
            return at - 1;
        }
        after_kill(at, &o);
    }
    panic!("stasis {args:?} still had steps left after 400 kills");
}

#[test]
fn a_killed_stasis_leaves_its_target_unharmed() {
    if !require_root("a_killed_stasis_leaves_its_target_unharmed") {
        return;
    }
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) has no memory effects.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let mut kills = 0;
    let mut report = Vec::new();
    for threads in ["1", "3"] {
        let (n, r) = kill_everywhere(threads);
        kills += n;
        report.push(format!("survivor --threads {threads}: {n} kills: {r}"));
    }
    eprintln!("{}", report.join("\n"));
    assert!(kills >= 300, "only {kills} kills: {}", report.join("; "));
}

/// The walks and the random kills for one survivor; returns the kills and a summary.
fn kill_everywhere(threads: &str) -> (u32, String) {
    let d = Daemon::start("survivor", &["--threads", threads]);
    let pid = d.pid;
    let p = pid.to_string();
    let before = settled_shape(pid);
    let mut kills = 0;
    let mut report = Vec::new();
    let t0 = Instant::now();

    // stasis vdso: every kill leaves it running.
    let n = walk(
        &["vdso", "-t", &p],
        |at, o| {
            check_unharmed(
                pid,
                &before,
                &format!("vdso killed at step {at}: {}", stderr_of(o)),
            )
        },
        |o| assert!(o.status.success(), "vdso: {}", stderr_of(o)),
    );
    check_unharmed(pid, &before, "after vdso");
    report.push(format!("vdso {n} in {:?}", t0.elapsed()));
    kills += n;

    // A dump that leaves it running.
    let img = d.image(1);
    let img_s = img.to_string_lossy().to_string();
    let n = walk(
        &["dump", "-t", &p, "-D", &img_s, "--leave-running"],
        |at, o| {
            check_unharmed(
                pid,
                &before,
                &format!("dump --leave-running killed at step {at}: {}", stderr_of(o)),
            );
            let _ = std::fs::remove_dir_all(&img);
        },
        |o| assert!(o.status.success(), "dump --leave-running: {}", stderr_of(o)),
    );
    check_unharmed(pid, &before, "after dump --leave-running");
    let _ = std::fs::remove_dir_all(&img);
    report.push(format!("dump --leave-running {n} at {:?}", t0.elapsed()));
    kills += n;

    // A pre-dump, which also has the process make a userfaultfd and registers its memory:
    // a killed one leaves neither (the tracker is handed to its holder only at the end).
    let n = walk(
        &["pre-dump", "-t", &p, "-D", &img_s],
        |at, o| {
            let what = format!("pre-dump killed at step {at}: {}", stderr_of(o));
            check_unharmed(pid, &before, &what);
            assert_eq!(tracked_vmas(pid), 0, "{what}: memory left registered");
            let _ = std::fs::remove_dir_all(&img);
        },
        |o| assert!(o.status.success(), "pre-dump: {}", stderr_of(o)),
    );
    check_unharmed(pid, &before, "after pre-dump");
    assert!(
        tracked_vmas(pid) > 0,
        "a pre-dump that got through tracks nothing"
    );
    let _ = std::fs::remove_dir_all(&img);
    // A --leave-running dump without --track-mem ends the tracking.
    let o = stasis(&["dump", "-t", &p, "-D", &img_s, "--leave-running"]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let deadline = Instant::now() + Duration::from_secs(5);
    while tracked_vmas(pid) > 0 {
        assert!(Instant::now() < deadline, "tracking did not end");
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = std::fs::remove_dir_all(&img);
    report.push(format!("pre-dump {n} at {:?}", t0.elapsed()));
    kills += n;

    // A dump that kills it: until the image is whole the target lives on; after, it may be
    // dead, and then the image is complete (it is restored and the walk goes on).
    let mut restored = 0;
    let n = walk(
        &["dump", "-t", &p, "-D", &img_s],
        |at, o| {
            if stasis_state(pid) == '?' || stasis_state(pid) == 'Z' {
                reap_gone(pid, &format!("dump killed at step {at}"));
                let r = stasis(&["restore", "-D", &img_s, "--detach"]);
                assert!(
                    r.status.success(),
                    "dump killed at step {at} killed the target without a whole image: {}",
                    stderr_of(&r)
                );
                let st = stasis_state(pid);
                assert!(
                    matches!(st, 'S' | 'R' | 'D'),
                    "the image of a dump killed at step {at}, restored, is in state {st}: the dump said {:?}; the restore said {:?}; its verdict: {:?}",
                    stderr_of(o),
                    stderr_of(&r),
                    std::fs::read_to_string(d.dir.path().join("out")).unwrap_or_default()
                );
                restored += 1;
            } else {
                check_unharmed(
                    pid,
                    &before,
                    &format!("dump killed at step {at}: {}", stderr_of(o)),
                );
            }
            let _ = std::fs::remove_dir_all(&img);
        },
        |o| assert!(o.status.success(), "dump: {}", stderr_of(o)),
    );
    reap_gone(pid, "after the dump");
    report.push(format!(
        "dump {n} ({restored} after the kill, restored) at {:?}",
        t0.elapsed()
    ));
    kills += n;

    // A restore killed mid-way leaves nothing holding the pid; the next one works.
    let n = walk(
        &["restore", "-D", &img_s, "--detach"],
        |at, o| {
            reap_gone(
                pid,
                &format!("restore killed at step {at}: {}", stderr_of(o)),
            )
        },
        |o| assert!(o.status.success(), "restore: {}", stderr_of(o)),
    );
    report.push(format!("restore {n} at {:?}", t0.elapsed()));
    kills += n;
    let before = settled_shape(pid);

    // And at random moments, from outside.
    let mut seed = 0x2545_f491_4f6c_dd1du64 ^ u64::from(std::process::id());
    let mut outside = 0;
    for i in 0..80 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = Duration::from_micros(seed % 12_000);
        let args: &[&str] = if i % 2 == 0 {
            &["vdso", "-t", &p]
        } else {
            &["dump", "-t", &p, "-D", &img_s, "--leave-running"]
        };
        let mut c = Command::new(stasis_bin())
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("stasis");
        std::thread::sleep(delay);
        let _ = c.kill();
        let o = c.wait_with_output().expect("stasis output");
        if was_killed(&o) {
            outside += 1;
        }
        check_unharmed(pid, &before, &format!("{args:?} killed after {delay:?}"));
        let _ = std::fs::remove_dir_all(&img);
    }
    report.push(format!(
        "from outside {outside} of 80 at {:?}",
        t0.elapsed()
    ));
    kills += outside;

    // A lazy restore killed at any step: the process, made or already running on pages yet
    // to come, dies with it (never left waiting on a fault, nor running on with zeros); the
    // next one works.
    let o = stasis(&["dump", "-t", &p, "-D", &img_s]);
    assert!(o.status.success(), "dump: {}", stderr_of(&o));
    reap_gone(pid, "after the dump for the lazy restores");
    let n = walk(
        &["restore", "-D", &img_s, "--detach", "--lazy-pages"],
        |at, o| {
            reap_gone(
                pid,
                &format!("restore --lazy-pages killed at step {at}: {}", stderr_of(o)),
            )
        },
        |o| assert!(o.status.success(), "restore --lazy-pages: {}", stderr_of(o)),
    );
    report.push(format!("restore --lazy-pages {n} at {:?}", t0.elapsed()));
    kills += n;

    let verdict = d.finish();
    assert_pass(&verdict);
    (kills, report.join(", "))
}

/// The peek offset of a socket of the target's, as the kernel has it (-1: none).
fn peek_off(pid: i32, fd: i32) -> i32 {
    // SAFETY: pidfd_open and pidfd_getfd take no pointers; the fds returned are closed below.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    assert!(pidfd >= 0, "pidfd_open({pid})");
    // SAFETY: as above.
    let sock = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) } as i32;
    assert!(sock >= 0, "pidfd_getfd({pid}, {fd})");
    let mut v: i32 = 0;
    let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
    // SAFETY: getsockopt into a valid i32 with its length.
    let r = unsafe {
        libc::getsockopt(
            sock,
            libc::SOL_SOCKET,
            libc::SO_PEEK_OFF,
            (&mut v as *mut i32).cast(),
            &mut len,
        )
    };
    // SAFETY: closing the two descriptors opened above.
    unsafe {
        libc::close(sock);
        libc::close(pidfd);
    }
    assert_eq!(r, 0, "getsockopt(SO_PEEK_OFF)");
    v
}

/// The dump reads a socket's queue from its start by moving its peek offset: killed at any
/// step, the offset is put back (one socket had none, one had its own), and the queues are
/// whole — the program reads them itself at the end.
#[test]
fn a_killed_dump_puts_a_socket_s_peek_offset_back() {
    if !require_root("a_killed_dump_puts_a_socket_s_peek_offset_back") {
        return;
    }
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) has no memory effects.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let dir = tempdir::Dir::new("killed-sock");
    let pidfile = dir.path().join("pid");
    let script = format!(
        r#"
import os, socket, sys, time, signal
a, b = socket.socketpair()
a.send(b'one' * 100); b.send(b'two' * 50)
b.setsockopt(socket.SOL_SOCKET, 42, 7)  # SO_PEEK_OFF: its own offset
open('{fds}', 'w').write('%d %d' % (a.fileno(), b.fileno()))
done = []
signal.signal(signal.SIGTERM, lambda *x: done.append(1))
open('{pid}', 'w').write(str(os.getpid()))
while not done:
    time.sleep(0.01)
b.setsockopt(socket.SOL_SOCKET, 42, -1)
ok = a.recv(1000) == b'two' * 50 and b.recv(1000) == b'one' * 100
open('{out}', 'w').write('PASS\n' if ok else 'FAIL: queues\n')
"#,
        fds = dir.path().join("fds").display(),
        pid = pidfile.display(),
        out = dir.path().join("out").display(),
    );
    let mut child = python(&script, &pidfile, None, true);
    let pid = child.id() as i32;
    let fds: Vec<i32> = std::fs::read_to_string(dir.path().join("fds"))
        .expect("fds")
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    let before = settled_shape(pid);
    let img = dir.path().join("img");
    let img_s = img.to_string_lossy().to_string();
    let p = pid.to_string();
    let n = walk(
        &["dump", "-t", &p, "-D", &img_s, "--leave-running"],
        |at, o| {
            check_unharmed(
                pid,
                &before,
                &format!("killed at step {at}: {}", stderr_of(o)),
            );
            assert_eq!(
                peek_off(pid, fds[0]),
                -1,
                "killed at step {at}: fd {}",
                fds[0]
            );
            assert_eq!(
                peek_off(pid, fds[1]),
                7,
                "killed at step {at}: fd {}",
                fds[1]
            );
            let _ = std::fs::remove_dir_all(&img);
        },
        |o| assert!(o.status.success(), "dump: {}", stderr_of(o)),
    );
    assert!(n > 10, "only {n} steps");
    // SAFETY: signalling our python.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let _ = child.wait();
    let v = std::fs::read_to_string(dir.path().join("out")).unwrap_or_default();
    assert_eq!(v, "PASS\n", "after {n} kills");
}

/// The network locks of ours on this machine (nftables tables `stasis_<pid>_<n>`).
fn our_locks(pid: i32) -> Vec<String> {
    let out = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .expect("nft (nftables) must be installed: .ci/run installs it");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!("stasis_{pid}_")))
        .map(str::to_string)
        .collect()
}

/// A `--tcp-established` dump killed at every step: while the process lives, its connection
/// is out of repair mode and unlocked (the guardian undoes both); once it is killed, the
/// image is whole and restores it with its connection. At the end every byte in flight has
/// arrived once, in order (the fixture's own check).
#[test]
fn a_killed_tcp_dump_gives_the_connection_back_or_a_whole_image() {
    if !require_root("a_killed_tcp_dump_gives_the_connection_back_or_a_whole_image") {
        return;
    }
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) has no memory effects.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let d = Daemon::start("tcpconn", &[]);
    let pid = d.pid;
    let before = settled_shape(pid);
    let img = d.image(1);
    let img_s = img.to_string_lossy().to_string();
    let p = pid.to_string();
    let mut restored = 0;
    let n = walk(
        &["dump", "-t", &p, "-D", &img_s, "--tcp-established"],
        |at, o| {
            let what = format!("killed at step {at}: {}", stderr_of(o));
            if stasis_state(pid) == '?' || stasis_state(pid) == 'Z' {
                reap_gone(pid, &what);
                let r = stasis(&["restore", "-D", &img_s, "--detach"]);
                assert!(r.status.success(), "{what}: restore: {}", stderr_of(&r));
                restored += 1;
            } else {
                check_unharmed(pid, &before, &what);
            }
            assert!(our_locks(pid).is_empty(), "{what}: {:?}", our_locks(pid));
            let _ = std::fs::remove_dir_all(&img);
        },
        |o| assert!(o.status.success(), "dump: {}", stderr_of(o)),
    );
    reap_gone(pid, "after the dump");
    let r = stasis(&["restore", "-D", &img_s, "--detach"]);
    assert!(r.status.success(), "restore: {}", stderr_of(&r));
    assert!(our_locks(pid).is_empty(), "{:?}", our_locks(pid));
    assert!(n > 20, "only {n} steps ({restored} after the kill)");
    let v = assert_pass(&d.finish());
    assert_eq!(detail(&v, "bytes"), 203_008, "{v} after {n} kills");
}

/// The pids of `root`'s tree, root first.
fn tree_pids(root: i32) -> Vec<i32> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        let kids =
            std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")).unwrap_or_default();
        out.extend(
            kids.split_whitespace()
                .filter_map(|k| k.parse::<i32>().ok()),
        );
        i += 1;
    }
    out
}

/// A tree of five processes (groups, a session, a pipe between two, shared memory and a
/// shared file) dumped `--leave-running` with stasis killed at every step: every process
/// of it is cured, and the tree's own verdict at the end is a pass.
#[test]
fn a_killed_tree_dump_leaves_every_process_unharmed() {
    if !require_root("a_killed_tree_dump_leaves_every_process_unharmed") {
        return;
    }
    let d = Daemon::start("tree", &[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while tree_pids(d.pid).len() < 5 {
        assert!(Instant::now() < deadline, "the tree did not grow to 5");
        std::thread::sleep(Duration::from_millis(10));
    }
    let pids = tree_pids(d.pid);
    let before: Vec<Shape> = pids.iter().map(|&p| settled_shape(p)).collect();
    let img = d.image(1);
    let img_s = img.to_string_lossy().to_string();
    let p = d.pid.to_string();
    let n = walk(
        &["dump", "-t", &p, "-D", &img_s, "--leave-running"],
        |at, o| {
            for (pid, b) in pids.iter().zip(&before) {
                check_unharmed(*pid, b, &format!("killed at step {at}: {}", stderr_of(o)));
            }
            let _ = std::fs::remove_dir_all(&img);
        },
        |o| assert!(o.status.success(), "dump: {}", stderr_of(o)),
    );
    assert!(n > 50, "only {n} steps");
    assert_eq!(tree_pids(d.pid), pids, "the tree changed");
    let v = assert_pass(&d.finish());
    assert_eq!(detail(&v, "procs"), 5, "{v} after {n} kills");
}

/// The same tree dumped in kill mode, stasis killed at every step: after each kill either
/// every process lives on unharmed (the dump had not got to killing them), or every one is
/// dead and the image is whole — it restores, and the walk goes on with the restored tree.
/// Never some of each: a stasis killed half-way through killing them leaves the rest to the
/// guardian.
#[test]
fn a_killed_kill_mode_tree_dump_leaves_all_or_none() {
    if !require_root("a_killed_kill_mode_tree_dump_leaves_all_or_none") {
        return;
    }
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) has no memory effects.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let d = Daemon::start("tree", &[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while tree_pids(d.pid).len() < 5 {
        assert!(Instant::now() < deadline, "the tree did not grow to 5");
        std::thread::sleep(Duration::from_millis(10));
    }
    let pids = tree_pids(d.pid);
    let mut before: Vec<Shape> = pids.iter().map(|&p| settled_shape(p)).collect();
    let img = d.image(1);
    let img_s = img.to_string_lossy().to_string();
    let p = d.pid.to_string();
    let mut restored = 0;
    let alive = |pid: i32| !matches!(stasis_state(pid), '?' | 'Z' | 'X');
    let n = walk(
        &["dump", "-t", &p, "-D", &img_s],
        |at, o| {
            let what = format!("killed at step {at}: {}", stderr_of(o));
            let living: Vec<i32> = pids.iter().copied().filter(|&q| alive(q)).collect();
            if living.is_empty() {
                for &q in &pids {
                    reap_gone(q, &what);
                }
                let r = stasis(&["restore", "-D", &img_s, "--detach"]);
                assert!(r.status.success(), "{what}: restore: {}", stderr_of(&r));
                assert_eq!(tree_pids(d.pid), pids, "{what}: the restored tree");
                before = pids.iter().map(|&q| settled_shape(q)).collect();
                restored += 1;
            } else {
                assert_eq!(living, pids, "{what}: some of the tree killed, some not");
                for (pid, b) in pids.iter().zip(&before) {
                    check_unharmed(*pid, b, &what);
                }
            }
            let _ = std::fs::remove_dir_all(&img);
        },
        |o| assert!(o.status.success(), "dump: {}", stderr_of(o)),
    );
    for &q in &pids {
        reap_gone(q, "after the dump");
    }
    let r = stasis(&["restore", "-D", &img_s, "--detach"]);
    assert!(r.status.success(), "restore: {}", stderr_of(&r));
    assert!(
        restored >= 5,
        "only {restored} kills came after the kill loop began"
    );
    assert!(n > 50, "only {n} steps");
    let v = assert_pass(&d.finish());
    assert_eq!(
        detail(&v, "procs"),
        5,
        "{v} after {n} kills ({restored} restored)"
    );
}

/// A thread caught inside the vDSO is moved out of it before the dump reads it. A stasis killed
/// at each of the first steps of that, many times over (the fixture is inside the vDSO most of
/// the time), leaves the process alive and unharmed: moving it out never leaves it in a
/// single-step trap, whose SIGTRAP the kernel would deliver once stasis is gone.
#[test]
fn a_killed_stasis_moving_a_thread_out_of_the_vdso_leaves_it_alive() {
    if !require_root("a_killed_stasis_moving_a_thread_out_of_the_vdso_leaves_it_alive") {
        return;
    }
    let d = Daemon::start("vdso_spin", &[]);
    let pid = d.pid;
    let p = pid.to_string();
    let before = settled_shape(pid);
    let img = d.image(1);
    let img_s = img.to_string_lossy().to_string();
    let mut caught = 0;
    for round in 0..12 {
        for at in 1..=4 {
            let o = stasis_killed_at(&["dump", "-t", &p, "-D", &img_s, "--leave-running"], at);
            check_unharmed(pid, &before, &format!("round {round}, killed at step {at}"));
            let _ = std::fs::remove_dir_all(&img);
            if !was_killed(&o) {
                break;
            }
        }
        let o = stasis(&["dump", "-t", &p, "-D", &img_s, "--leave-running", "-v"]);
        assert!(o.status.success(), "{}", stderr_of(&o));
        caught += stderr_of(&o).contains("stepped out of the vDSO") as u32;
        let _ = std::fs::remove_dir_all(&img);
    }
    assert!(
        caught > 0,
        "the thread was never caught inside the vDSO: the case was not exercised"
    );
    assert_pass(&d.finish());
}
