//! File locks: POSIX, OFD and flock locks are dumped and taken again by the restored process,
//! so they still block other processes; a lock someone else took while the process was away
//! makes the restore fail rather than bring it back without; a thread blocked in F_SETLKW waits
//! again and gets the lock once it is free; `--no-file-locks` and leases refuse the dump. The
//! fixture checks itself (tests/fixtures/locks.c); these tests also look from outside.
//!
//! The tests run one at a time (`one_at_a_time`): each fixture checks /proc/locks every 10 ms
//! against the locks it holds, and /proc/locks is read in pieces that see a list another
//! test's locks change between them (entries seen twice, or not at all).

mod common;

use common::*;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

/// What `F_GETLK` (or `F_OFD_GETLK`) tells this process about byte `at` of `path`:
/// (type, pid).
fn getlk(path: &std::path::Path, at: i64, ofd: bool) -> (i16, i32) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("opening a lock file");
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = at;
    fl.l_len = 1;
    let cmd = if ofd {
        libc::F_OFD_GETLK
    } else {
        libc::F_GETLK
    };
    // SAFETY: fcntl with a valid struct flock on an open file.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), cmd, &mut fl) };
    assert_eq!(r, 0, "GETLK: {}", std::io::Error::last_os_error());
    (fl.l_type, fl.l_pid)
}

/// Whether `flock(LOCK_EX | LOCK_NB)` on a new description of `path` is refused.
fn flock_blocked(path: &std::path::Path) -> bool {
    let f = std::fs::File::open(path).expect("opening a lock file");
    // SAFETY: flock on an open file; dropped (and so released) at once.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) != 0 }
}

/// The other processes are blocked exactly as before the dump.
fn still_locked(d: &Daemon) {
    let p = |f: &str| d.dir.path().join(f);
    let w = libc::F_WRLCK as i16;
    let r = libc::F_RDLCK as i16;
    assert_eq!(getlk(&p("posix"), 15, false), (w, d.pid), "posix 10-19");
    assert_eq!(getlk(&p("posix"), 5000, false), (r, d.pid), "posix 100-EOF");
    assert_eq!(getlk(&p("ofd"), 50, true), (w, -1), "ofd 0-99");
    assert_eq!(getlk(&p("ofd"), 250, true), (r, -1), "ofd 200-299");
    assert_eq!(getlk(&p("mapped"), 0, false), (w, d.pid), "mapped 0-4095");
    assert!(flock_blocked(&p("flock_ex")), "flock_ex");
    assert!(flock_blocked(&p("flock_sh")), "flock_sh");
    assert!(flock_blocked(&p("maplock")), "maplock (held by a mapping)");
}

#[test]
fn every_kind_of_lock_is_held_again_after_restore() {
    if !require_root("every_kind_of_lock_is_held_again_after_restore") {
        return;
    }
    let _one = one_at_a_time();
    // --half-read: the fixture holds /proc/locks read up to its first line; the restore must
    // leave it there (in entries, not only bytes), or the fixture sees the list start over.
    let d = Daemon::start("locks", &["--dir", "{dir}", "--half-read"]);
    still_locked(&d);
    for n in 1..=2 {
        d.dump(n);
        // Killed: its locks are gone while it is away.
        assert_eq!(
            getlk(&d.dir.path().join("posix"), 15, false).0,
            libc::F_UNLCK as i16,
            "the dumped process is gone, and its locks with it"
        );
        d.restore(n);
        still_locked(&d);
    }
    let v = assert_pass(&d.finish());
    assert_eq!(detail(&v, "locks"), 8, "{v}");
}

/// Another process took a lock while the dumped one was away: the restore must fail, naming
/// the lock, and leave nothing behind; once the lock is free again, the restore works.
#[test]
fn a_lock_taken_by_another_process_meanwhile_fails_the_restore() {
    if !require_root("a_lock_taken_by_another_process_meanwhile_fails_the_restore") {
        return;
    }
    let _one = one_at_a_time();
    let d = Daemon::start("locks", &["--dir", "{dir}"]);
    d.dump(1);
    let thief = std::fs::File::open(d.dir.path().join("flock_ex")).expect("flock_ex");
    // SAFETY: flock on an open file.
    assert_eq!(unsafe { libc::flock(thief.as_raw_fd(), libc::LOCK_EX) }, 0);
    let o = stasis(&["restore", "-D", &d.image(1).to_string_lossy(), "-d"]);
    let e = stderr_of(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("flock write lock on fd") && e.contains("another process may hold it"),
        "{e}"
    );
    wait_gone(d.pid);
    drop(thief);
    d.restore(1);
    still_locked(&d);
    assert_pass(&d.finish());
}

/// Whether /proc/locks shows `pid` waiting for a lock.
fn waiting(pid: i32) -> bool {
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    locks.lines().any(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        w.get(1) == Some(&"->") && w.get(5) == Some(&pid.to_string().as_str())
    })
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A thread blocked in F_SETLKW at the dump waits again after the restore (the harness holds
/// the lock throughout), and gets the lock once the harness lets it go.
#[test]
fn a_thread_waiting_for_a_lock_waits_again_and_gets_it() {
    if !require_root("a_thread_waiting_for_a_lock_waits_again_and_gets_it") {
        return;
    }
    let _one = one_at_a_time();
    let dir = tempdir::Dir::new("lockwait");
    let wait = dir.path().join("wait");
    let holder = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&wait)
        .expect("creating the wait file");
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as i16;
    // SAFETY: an OFD lock on our own open file.
    assert_eq!(
        unsafe { libc::fcntl(holder.as_raw_fd(), libc::F_OFD_SETLK, &fl) },
        0
    );
    let d = Daemon::start("locks", &["--dir", &dir.path().to_string_lossy(), "--wait"]);
    wait_for("the fixture to wait for the lock", || waiting(d.pid));
    for n in 1..=2 {
        d.dump(n);
        d.restore(n);
        wait_for("the restored fixture to wait again", || waiting(d.pid));
    }
    drop(holder);
    let verdict = d.dir.path().join("out");
    wait_for("the waiter to get the lock", || {
        let v = std::fs::read_to_string(&verdict).unwrap_or_default();
        assert!(
            v.is_empty(),
            "the fixture ended before it got the lock: {v}"
        );
        getlk(&wait, 0, true) == (libc::F_WRLCK as i16, d.pid)
    });
    let v = assert_pass(&d.finish());
    assert_eq!(detail(&v, "waited"), 1, "{v}");
}

/// `--no-file-locks` restores the old refusal, and a lease is refused as such.
#[test]
fn no_file_locks_and_leases_refuse_the_dump() {
    if !require_root("no_file_locks_and_leases_refuse_the_dump") {
        return;
    }
    let _one = one_at_a_time();
    for (fixture, args, extra, needle) in [
        (
            "locks",
            vec!["--dir", "{dir}"],
            vec!["--no-file-locks"],
            "--no-file-locks",
        ),
        ("refusals", vec!["--lease"], vec![], "lease"),
    ] {
        let d = Daemon::start(fixture, &args);
        let img = d.image(1);
        let pid = d.pid.to_string();
        let mut a = vec!["dump", "-t", &pid, "-D"];
        let img_s = img.to_string_lossy().into_owned();
        a.push(&img_s);
        a.extend(extra);
        let o = stasis(&a);
        let e = stderr_of(&o);
        assert_eq!(o.status.code(), Some(1), "{e}");
        assert_eq!(e.trim().lines().count(), 1, "one-line error: {e}");
        assert!(e.contains(&pid) && e.contains(needle), "{e}");
        assert!(matches!(stasis_state(d.pid), 'S' | 'R'), "runs on");
        assert_eq!(tracer_of(d.pid), 0, "and is not traced");
        assert_pass(&d.finish());
    }
}

/// An edited image whose lock names a descriptor the process did not have, or a range past
/// what a file offset can be, is refused before anything is created; the intact image then
/// restores.
#[test]
fn an_edited_lock_record_is_refused_before_anything_is_created() {
    if !require_root("an_edited_lock_record_is_refused_before_anything_is_created") {
        return;
    }
    let _one = one_at_a_time();
    let d = Daemon::start("locks", &["--dir", "{dir}"]);
    d.dump(1);
    let files = d.image(1).join("files.img");
    let original = std::fs::read(&files).expect("files.img");
    for (field, value) in [
        ("fd", serde_json::json!(99)),
        ("start", serde_json::json!(u64::MAX - 5)),
        ("len", serde_json::json!(1u64 << 63)),
        ("kind", serde_json::json!("lease")),
    ] {
        std::fs::write(&files, &original).expect("files.img");
        edit_record(&files, |v| v["locks"][0][field] = value.clone());
        let o = stasis(&["restore", "-D", &d.image(1).to_string_lossy(), "-d"]);
        let e = stderr_of(&o);
        assert_eq!(o.status.code(), Some(1), "{field}: {e}");
        assert!(
            !std::path::Path::new(&format!("/proc/{}", d.pid)).exists(),
            "{field}: nothing was created"
        );
        assert!(e.lines().count() == 1 && e.len() < 400, "{field}: {e}");
    }
    std::fs::write(&files, &original).expect("files.img");
    d.restore(1);
    still_locked(&d);
    assert_pass(&d.finish());
}
