//! The fd table after a restore is exactly the dumped one — numbers, kinds, flags, offsets,
//! shared descriptions — however the restoring stasis's own descriptors are numbered; and
//! whatever stasis does not save is refused before the process is touched.

mod common;

use common::*;
use std::os::unix::process::CommandExt;

/// Runs `stasis ARGS…` with descriptors 3..=40 of its own already open (a log, a pipe, the
/// image's files land above them or among them): none of them may reach the restored process.
fn stasis_with_crowded_fds(args: &[&str], log: &std::path::Path) -> std::process::Output {
    let log = log.to_path_buf();
    let mut c = std::process::Command::new(stasis_bin());
    c.args(args).arg("--log-file").arg(&log).arg("-v");
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        c.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            let mut p = [0; 2];
            libc::pipe(p.as_mut_ptr());
            let null = libc::open(c"/dev/zero".as_ptr(), libc::O_RDONLY);
            for fd in 3..=40 {
                if fd != p[0] && fd != p[1] && fd != null {
                    libc::dup2(if fd % 2 == 0 { p[1] } else { null }, fd);
                }
            }
            Ok(())
        });
    }
    c.output().expect("running stasis")
}

/// The fixture sets up its files at low numbers (3, 4, 5…, where stasis's own log and image
/// descriptors are): a deleted file at fd 3, a memfd with seals, dup'd descriptors sharing an
/// offset, separate opens of one file, pipe ends with different O_NONBLOCK, close-on-exec
/// and not, holes, a shared mapping of a file opened read-write (mprotect-able writable after
/// the restore), and a deleted cwd. It checks the exact table all along and at the end.
#[test]
fn fd_table_comes_back_exactly_with_colliding_stasis_fds() {
    if !require_root("fd_table_comes_back_exactly_with_colliding_stasis_fds") {
        return;
    }
    let d = Daemon::start("fdtable", &[]);
    let pid = d.pid.to_string();
    for n in 1..=2 {
        let img = d.image(n);
        let log = d.dir.path().join(format!("dump{n}.log"));
        let o = stasis_with_crowded_fds(&["dump", "-t", &pid, "-D", &img.to_string_lossy()], &log);
        assert!(o.status.success(), "dump: {}", stderr_of(&o));
        wait_gone(d.pid);
        let log = d.dir.path().join(format!("restore{n}.log"));
        let o = stasis_with_crowded_fds(&["restore", "-D", &img.to_string_lossy(), "-d"], &log);
        assert!(
            o.status.success(),
            "restore: {}\n{}",
            stderr_of(&o),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    let v = assert_pass(&d.finish());
    assert!(detail(&v, "fds") >= 14, "{v}");
}

/// The files fixture (offsets, O_APPEND, a deleted file, a pipe with data, /dev/null at a
/// fixed number, a directory fd) restored by a stasis whose own descriptors crowd low numbers.
#[test]
fn files_fixture_comes_back_with_colliding_stasis_fds() {
    if !require_root("files_fixture_comes_back_with_colliding_stasis_fds") {
        return;
    }
    let d = Daemon::start("files", &[]);
    d.dump(1);
    let log = d.dir.path().join("restore.log");
    let o = stasis_with_crowded_fds(
        &["restore", "-D", &d.image(1).to_string_lossy(), "-d"],
        &log,
    );
    assert!(o.status.success(), "restore: {}", stderr_of(&o));
    assert_pass(&d.finish());
}

/// `stasis dump` must refuse, in one line naming the pid and the thing, and leave the
/// process exactly as it was (the fixture checks its state is intact afterwards).
fn refused(option: &str, needle: &str) {
    let d = Daemon::start("refusals", &[option]);
    let img = d.image(1);
    let o = stasis(&[
        "dump",
        "-t",
        &d.pid.to_string(),
        "-D",
        &img.to_string_lossy(),
    ]);
    let e = stderr_of(&o);
    assert_eq!(o.status.code(), Some(1), "{option}: {e}");
    assert_eq!(e.trim().lines().count(), 1, "one-line error: {e}");
    assert!(e.contains(&d.pid.to_string()), "names the pid: {e}");
    assert!(
        e.contains(needle),
        "{option}: {e:?} should mention {needle:?}"
    );
    assert!(
        !img.join("inventory.img").exists(),
        "a refused dump leaves no image"
    );
    assert!(
        matches!(stasis_state(d.pid), 'S' | 'R'),
        "the refused process runs on"
    );
    assert_eq!(tracer_of(d.pid), 0, "and is not traced");
    let v = assert_pass(&d.finish());
    assert!(v.contains(&option[2..]), "{v}");
}

#[test]
fn a_process_with_children_is_refused() {
    if require_root("a_process_with_children_is_refused") {
        refused("--child", "child processes");
    }
}

#[test]
fn posix_ofd_and_flock_locks_are_refused() {
    if require_root("posix_ofd_and_flock_locks_are_refused") {
        refused("--posix-lock", "POSIX");
        refused("--ofd-lock", "OFDLCK");
        refused("--flock", "FLOCK");
    }
}

#[test]
fn sysv_shared_memory_is_refused() {
    if require_root("sysv_shared_memory_is_refused") {
        refused("--sysv-shm", "SysV shared memory");
    }
}

#[test]
fn a_pty_the_program_opened_is_refused() {
    if require_root("a_pty_the_program_opened_is_refused") {
        refused("--pty", "pseudo-terminal");
    }
}

/// An fd kind stasis does not handle (a socket) is refused, not dropped.
#[test]
fn an_unsupported_fd_kind_is_refused() {
    if !require_root("an_unsupported_fd_kind_is_refused") {
        return;
    }
    // A Python process holding a socketpair: a real program, a kind not supported yet.
    let dir = tempdir::Dir::new("socket");
    let pidfile = dir.path().join("pid");
    let script = format!(
        "import socket,os,time\na,b=socket.socketpair()\nopen('{}','w').write(str(os.getpid()))\ntime.sleep(60)\n",
        pidfile.display()
    );
    let mut cmd = std::process::Command::new("python3");
    cmd.args(["-c", &script]);
    // SAFETY: close_range is async-signal-safe; only the standard descriptors go along.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("python3");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !pidfile.exists() {
        assert!(std::time::Instant::now() < deadline, "python did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let pid = child.id().to_string();
    let o = stasis(&[
        "dump",
        "-t",
        &pid,
        "-D",
        &dir.path().join("img").to_string_lossy(),
    ]);
    let e = stderr_of(&o);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("socket:[") && e.contains("not supported"), "{e}");
}
