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
        !img.exists(),
        "a refused dump leaves no image, nor the directory it made"
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
fn sysv_shared_memory_is_refused() {
    if require_root("sysv_shared_memory_is_refused") {
        refused("--sysv-shm", "SysV shared memory");
    }
}

/// A pty master whose slave nobody holds open cannot be read without a last close of the
/// slave (which would hang the pty up): refused. A pair in raw mode comes back (tests/pty.rs
/// has the rest): the same slave device, the same modes, data passing both ways.
#[test]
fn a_pty_the_program_opened_comes_back_or_is_refused() {
    if !require_root("a_pty_the_program_opened_comes_back_or_is_refused") {
        return;
    }
    refused("--lonely-pty", "whose slave no process holds open");
    let d = Daemon::start("refusals", &["--pty"]);
    d.dump(1);
    d.restore(1);
    let v = assert_pass(&d.finish());
    assert!(v.contains("pty"), "{v}");
}

/// An fd stasis does not handle — a netlink socket of another protocol than route, a packet
/// socket, a raw IP socket, a pipe open for reading and writing at once — is refused, not
/// dropped, and the process runs on.
#[test]
fn an_unsupported_fd_kind_is_refused() {
    if !require_root("an_unsupported_fd_kind_is_refused") {
        return;
    }
    for (what, needle) in [
        (
            "s=socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 15)",
            "netlink socket",
        ),
        (
            "s=socket.socket(socket.AF_PACKET, socket.SOCK_RAW)",
            "packet socket",
        ),
        (
            "s=socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)",
            "inet socket of type 3",
        ),
        (
            "r,w=os.pipe(); x=os.open('/proc/self/fd/%d' % r, os.O_RDWR)",
            "reading and writing at once",
        ),
    ] {
        let dir = tempdir::Dir::new("unsupported");
        let pidfile = dir.path().join("pid");
        let script = format!(
            "import socket,os,select,time\n{what}\nopen('{p}.tmp','w').write(str(os.getpid())); os.rename('{p}.tmp','{p}')\ntime.sleep(60)\n",
            p = pidfile.display()
        );
        let mut child = python(&script, &pidfile, None, false);
        let pid = child.id().to_string();
        let o = stasis(&[
            "dump",
            "-t",
            &pid,
            "-D",
            &dir.path().join("img").to_string_lossy(),
        ]);
        let e = stderr_of(&o);
        let alive = stasis_state(child.id() as i32);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(o.status.code(), Some(1), "{e}");
        assert!(e.contains(needle) && e.contains("not supported"), "{e}");
        assert!(matches!(alive, 'S' | 'R'), "the refused process runs on");
    }
}

/// A file and a cwd whose names are not UTF-8 come back under the very same bytes.
#[test]
fn names_that_are_not_utf8_come_back_byte_for_byte() {
    use std::os::unix::ffi::OsStrExt;
    if !require_root("names_that_are_not_utf8_come_back_byte_for_byte") {
        return;
    }
    let dir = tempdir::Dir::new("bytes");
    let base = dir.path().to_string_lossy().into_owned();
    let pidfile = dir.path().join("pid");
    let script = format!(
        "import os,time,mmap\n\
         d=b'{base}/dir-\\xff\\xfe'\n\
         os.mkdir(d); os.chdir(d)\n\
         fd=os.open(b'file-\\xe9\\x80', os.O_RDWR|os.O_CREAT, 0o600)\n\
         os.write(fd, b'x'*8192)\n\
         m=mmap.mmap(fd, 8192)\n\
         open('{base}/pid.tmp','w').write(str(os.getpid())); os.rename('{base}/pid.tmp','{}')\n\
         time.sleep(120)\n",
        pidfile.display()
    );
    let mut child = python(&script, &pidfile, None, false);
    let pid = child.id() as i32;
    let links = |pid: i32| -> (Vec<u8>, Vec<u8>) {
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).expect("cwd");
        let fd = std::fs::read_link(format!("/proc/{pid}/fd/3")).expect("fd 3");
        (
            cwd.as_os_str().as_bytes().to_vec(),
            fd.as_os_str().as_bytes().to_vec(),
        )
    };
    let before = links(pid);
    assert!(
        String::from_utf8(before.1.clone()).is_err(),
        "a name that is not UTF-8"
    );
    let img = dir.path().join("img");
    let o = stasis(&["dump", "-t", &pid.to_string(), "-D", &img.to_string_lossy()]);
    assert!(o.status.success(), "dump: {}", stderr_of(&o));
    let _ = child.wait();
    wait_gone(pid);
    let o = stasis(&["restore", "-D", &img.to_string_lossy(), "-d"]);
    assert!(o.status.success(), "restore: {}", stderr_of(&o));
    let after = links(pid);
    let maps = std::fs::read(format!("/proc/{pid}/maps")).expect("maps");
    // SAFETY: the restored copy is not our child; stop it.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert_eq!(after, before, "cwd and fd 3 name the same bytes");
    assert!(
        maps.windows(before.1.len())
            .any(|w| w == before.1.as_slice()),
        "the mapping names the same bytes"
    );
}

/// A shell job's terminal modes (raw, no echo) come back on the terminal the restoring stasis
/// lends: here a fresh pseudo-terminal in its default (cooked) modes.
#[test]
fn a_shell_jobs_terminal_modes_come_back() {
    if !require_root("a_shell_jobs_terminal_modes_come_back") {
        return;
    }
    let pty = || -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
        use std::os::fd::FromRawFd;
        let (mut m, mut s) = (0, 0);
        // SAFETY: openpty fills two descriptors we then own.
        let r = unsafe {
            libc::openpty(
                &mut m,
                &mut s,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(r, 0, "openpty");
        // SAFETY: fresh descriptors from openpty.
        unsafe {
            (
                std::os::fd::OwnedFd::from_raw_fd(m),
                std::os::fd::OwnedFd::from_raw_fd(s),
            )
        }
    };
    use std::os::fd::AsRawFd;
    let dir = tempdir::Dir::new("tty");
    let pidfile = dir.path().join("pid");
    let report = dir.path().join("modes");
    let (_m1, s1) = pty();
    let script = format!(
        "import os,sys,time,tty,termios,signal\n\
         tty.setraw(0)\n\
         def rep(*a):\n\
         \x20   l=termios.tcgetattr(0)[3]\n\
         \x20   open('{}','w').write('echo=%d icanon=%d' % (bool(l & termios.ECHO), bool(l & termios.ICANON)))\n\
         signal.signal(signal.SIGUSR1, rep)\n\
         open('{}.tmp','w').write(str(os.getpid())); os.rename('{}.tmp','{}')\n\
         while True: time.sleep(1)\n",
        report.display(),
        pidfile.display(),
        pidfile.display(),
        pidfile.display()
    );
    let mut child = python(&script, &pidfile, Some(s1.as_raw_fd()), false);
    let pid = child.id() as i32;
    let img = dir.path().join("img");
    let o = stasis(&[
        "dump",
        "-t",
        &pid.to_string(),
        "-D",
        &img.to_string_lossy(),
        "--shell-job",
    ]);
    assert!(o.status.success(), "dump: {}", stderr_of(&o));
    let _ = child.wait();
    wait_gone(pid);
    // The restoring stasis's own terminal: a new pty, cooked and echoing.
    let (_m2, s2) = pty();
    let fd = s2.as_raw_fd();
    let mut cmd = std::process::Command::new(stasis_bin());
    cmd.args(["restore", "-D", &img.to_string_lossy(), "-d", "--shell-job"]);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            for n in 0..=2 {
                libc::dup2(fd, n);
            }
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    let o = cmd.output().expect("stasis restore");
    assert!(o.status.success(), "restore failed ({})", o.status);
    // SAFETY: asking the restored process for its report.
    unsafe { libc::kill(pid, libc::SIGUSR1) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !report.exists() {
        assert!(std::time::Instant::now() < deadline, "no report");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(50));
    let modes = std::fs::read_to_string(&report).expect("report");
    // SAFETY: the restored copy is not our child; stop it.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert_eq!(modes, "echo=0 icanon=0", "raw mode on the new terminal");
}

/// A dump killed half-way leaves its temporary files behind (`.pages.img.tmp`): the next dump
/// into that directory takes it, removing them, and the image restores; a refused dump into a
/// directory the user made leaves it there, empty.
#[test]
fn a_killed_dumps_leftovers_do_not_block_the_next_dump() {
    if !require_root("a_killed_dumps_leftovers_do_not_block_the_next_dump") {
        return;
    }
    let d = Daemon::start("sleeper", &[]);
    let img = d.image(1);
    std::fs::create_dir(&img).expect("image dir");
    std::fs::write(img.join(".pages.img.tmp"), b"left by a killed dump").expect("stale file");
    d.dump(1);
    assert!(
        !img.join(".pages.img.tmp").exists(),
        "the stale file is gone"
    );
    d.restore(1);
    assert_pass(&d.finish());

    let r = Daemon::start("refusals", &["--sysv-shm"]);
    let target = r.dir.path().join("mine");
    std::fs::create_dir(&target).expect("image dir");
    let o = stasis(&[
        "dump",
        "-t",
        &r.pid.to_string(),
        "-D",
        &target.to_string_lossy(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    let left: Vec<_> = std::fs::read_dir(&target).expect("still there").collect();
    assert!(left.is_empty(), "a refused dump left {left:?}");
    assert_pass(&r.finish());
}

/// The tree of an ancestor of stasis (the shell it runs in) would hold stasis itself: refused
/// before anything is frozen.
#[test]
fn an_ancestor_of_stasis_is_refused() {
    if !require_root("an_ancestor_of_stasis_is_refused") {
        return;
    }
    // `sh -c 'stasis dump -t $$'`: the shell is stasis's parent.
    let dir = tempdir::Dir::new("ancestor");
    let o = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{} dump -t $$ -D {}/img; echo rc=$?",
            stasis_bin(),
            dir.path().display()
        ))
        .output()
        .expect("sh");
    let e = stderr_of(&o);
    assert!(String::from_utf8_lossy(&o.stdout).contains("rc=1"), "{e}");
    assert!(e.contains("ancestor of this stasis"), "{e}");
    assert!(!dir.path().join("img").exists());
}

/// `tail -f` (coreutils, following its file with inotify) is dumped and restored: it still
/// follows the file, and prints what was appended while it was away and after.
#[test]
fn tail_f_follows_its_file_across_a_restore() {
    if !require_root("tail_f_follows_its_file_across_a_restore") {
        return;
    }
    let dir = tempdir::Dir::new("tailf");
    let log = dir.path().join("log");
    let out = dir.path().join("out");
    std::fs::write(&log, "first\n").expect("log");
    let out_f = std::fs::File::create(&out).expect("out");
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new("tail");
    cmd.arg("-f").arg(&log).stdin(std::process::Stdio::null());
    cmd.stdout(out_f.try_clone().expect("dup")).stderr(out_f);
    // SAFETY: only close_range and setsid between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("tail");
    let pid = child.id() as i32;
    let wait_for = |what: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !std::fs::read_to_string(&out)
            .unwrap_or_default()
            .contains(what)
        {
            assert!(
                std::time::Instant::now() < deadline,
                "tail did not print {what:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    wait_for("first");
    // tail has its inotify watch once it waits.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !(3..8).any(|fd| {
        std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
            .is_ok_and(|l| l.to_string_lossy() == "anon_inode:inotify")
    }) {
        assert!(std::time::Instant::now() < deadline, "tail uses no inotify");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let img = dir.path().join("img");
    let o = stasis(&["dump", "-t", &pid.to_string(), "-D", &img.to_string_lossy()]);
    assert!(o.status.success(), "dump: {}", stderr_of(&o));
    let _ = child.wait();
    let append = |s: &str| {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .expect("log");
        f.write_all(s.as_bytes()).expect("append");
    };
    append("while away\n");
    let o = stasis(&["restore", "-D", &img.to_string_lossy(), "--detach"]);
    assert!(o.status.success(), "restore: {}", stderr_of(&o));
    append("after\n");
    wait_for("after");
    assert_eq!(
        std::fs::read_to_string(&out).unwrap_or_default(),
        "first\nwhile away\nafter\n"
    );
    // SAFETY: the restored tail has our child's pid.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_gone(pid);
}

/// inotify watches keep their numbers, masks and files, gaps between the numbers included,
/// and events come with the old number after the restore.
#[test]
fn inotify_watches_keep_their_numbers() {
    if !require_root("inotify_watches_keep_their_numbers") {
        return;
    }
    let dir = tempdir::Dir::new("inotify");
    let d = dir.path().display().to_string();
    std::fs::create_dir_all(dir.path().join("a")).expect("a");
    std::fs::create_dir_all(dir.path().join("b")).expect("b");
    let pidfile = dir.path().join("pid");
    let script = format!(
        "import ctypes,os,signal,time,struct\n\
         libc=ctypes.CDLL(None, use_errno=True)\n\
         fd=libc.inotify_init1(os.O_NONBLOCK)\n\
         w1=libc.inotify_add_watch(fd, b'{d}', 0x100)\n\
         w2=libc.inotify_add_watch(fd, b'{d}/a', 0x100|0x200)\n\
         libc.inotify_rm_watch(fd, w1)\n\
         for i in range(5):\n\
         \x20   x=libc.inotify_add_watch(fd, b'/', 1); libc.inotify_rm_watch(fd, x)\n\
         w3=libc.inotify_add_watch(fd, b'{d}/b', 0x100)\n\
         os.read(fd, 65536)\n\
         def term(*_):\n\
         \x20   ev=os.read(fd, 65536); wds=set()\n\
         \x20   while ev:\n\
         \x20       wd,mask,c,n=struct.unpack('iIII', ev[:16]); wds.add(wd); ev=ev[16+n:]\n\
         \x20   open('{d}/verdict','w').write('ok' if (w2, w3) == (2, 8) and wds == {{2, 8}} else repr((w2, w3, wds)))\n\
         \x20   os._exit(0)\n\
         signal.signal(signal.SIGTERM, term)\n\
         open('{d}/pid.tmp','w').write(str(os.getpid())); os.rename('{d}/pid.tmp','{p}')\n\
         while True: time.sleep(1)\n",
        p = pidfile.display()
    );
    let mut child = python(&script, &pidfile, None, false);
    let pid = child.id() as i32;
    let watches = |pid: i32| -> Vec<String> {
        let mut out = Vec::new();
        for fd in 3..16 {
            let info =
                std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default();
            out.extend(info.lines().filter(|l| l.starts_with("inotify")).map(|l| {
                // wd, inode and mask (the handle is the same file's).
                l.split_whitespace().take(5).collect::<Vec<_>>().join(" ")
            }));
        }
        out.sort();
        out
    };
    let before = watches(pid);
    assert_eq!(before.len(), 2, "{before:?}");
    let img = dir.path().join("img");
    let o = stasis(&["dump", "-t", &pid.to_string(), "-D", &img.to_string_lossy()]);
    assert!(o.status.success(), "dump: {}", stderr_of(&o));
    let _ = child.wait();
    let o = stasis(&["restore", "-D", &img.to_string_lossy(), "--detach"]);
    assert!(o.status.success(), "restore: {}", stderr_of(&o));
    assert_eq!(watches(pid), before, "the same watches");
    std::fs::write(dir.path().join("a/new"), "x").expect("create in a");
    std::fs::write(dir.path().join("b/new"), "x").expect("create in b");
    std::thread::sleep(std::time::Duration::from_millis(200));
    // SAFETY: the restored process has our child's pid.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_gone(pid);
    let verdict = std::fs::read_to_string(dir.path().join("verdict")).unwrap_or_default();
    assert_eq!(verdict, "ok");
}

/// Named pipes: a FIFO held at both ends (a reader, non-blocking, and a writer) with data in
/// it, and one opened for reading and writing at once, come back with their data and flags; a
/// FIFO another process also holds is refused.
#[test]
fn named_pipes_come_back_with_their_data() {
    if !require_root("named_pipes_come_back_with_their_data") {
        return;
    }
    let dir = tempdir::Dir::new("fifo");
    let d = dir.path().display().to_string();
    let pidfile = dir.path().join("pid");
    let script = format!(
        "import os,signal,time,fcntl\n\
         os.mkfifo('{d}/f1'); os.mkfifo('{d}/f2')\n\
         r=os.open('{d}/f1', os.O_RDONLY|os.O_NONBLOCK); w=os.open('{d}/f1', os.O_WRONLY)\n\
         os.write(w, b'queued in f1')\n\
         rw=os.open('{d}/f2', os.O_RDWR); os.write(rw, b'f2 data')\n\
         def term(*_):\n\
         \x20   ok = os.read(r, 100) == b'queued in f1' and fcntl.fcntl(r, fcntl.F_GETFL) & os.O_NONBLOCK\n\
         \x20   os.write(w, b'more'); ok = ok and os.read(r, 100) == b'more'\n\
         \x20   ok = ok and os.read(rw, 100) == b'f2 data'\n\
         \x20   open('{d}/verdict','w').write('ok' if ok else 'bad'); os._exit(0)\n\
         signal.signal(signal.SIGTERM, term)\n\
         open('{d}/pid.tmp','w').write(str(os.getpid())); os.rename('{d}/pid.tmp','{p}')\n\
         while True: time.sleep(1)\n",
        p = pidfile.display()
    );
    let mut child = python(&script, &pidfile, None, false);
    let pid = child.id() as i32;
    let img = dir.path().join("img");
    let o = stasis(&["dump", "-t", &pid.to_string(), "-D", &img.to_string_lossy()]);
    assert!(o.status.success(), "dump: {}", stderr_of(&o));
    let _ = child.wait();
    let o = stasis(&["restore", "-D", &img.to_string_lossy(), "--detach"]);
    assert!(o.status.success(), "restore: {}", stderr_of(&o));
    // Someone else opens f2 now: the next dump must refuse.
    let other = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.path().join("f2"))
        .expect("f2");
    let o = stasis(&[
        "dump",
        "-t",
        &pid.to_string(),
        "-D",
        &dir.path().join("img2").to_string_lossy(),
    ]);
    let e = stderr_of(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("also has open") && e.contains(&std::process::id().to_string()),
        "{e}"
    );
    drop(other);
    // SAFETY: the restored process has our child's pid.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_gone(pid);
    let verdict = std::fs::read_to_string(dir.path().join("verdict")).unwrap_or_default();
    assert_eq!(verdict, "ok");
}

/// A 32-bit i386 program, made here byte by byte (an ELF header, one loadable segment, and a
/// loop of `nanosleep` through `int 0x80`): stasis must refuse it before injecting anything
/// (it would run the 64-bit parasite as garbage), for `dump` and for `vdso`, and leave it
/// running untraced.
fn i386_sleeper(path: &std::path::Path) {
    const BASE: u32 = 0x0804_8000;
    const CODE: u32 = 84;
    let ts = BASE + CODE + 16;
    let mut f: Vec<u8> = Vec::new();
    f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    for v in [2u16, 3] {
        f.extend_from_slice(&v.to_le_bytes()); // ET_EXEC, EM_386
    }
    for v in [1u32, BASE + CODE, 52, 0, 0] {
        f.extend_from_slice(&v.to_le_bytes()); // version, entry, phoff, shoff, flags
    }
    for v in [52u16, 32, 1, 0, 0, 0] {
        f.extend_from_slice(&v.to_le_bytes()); // ehsize, phentsize, phnum, sh*
    }
    let size = CODE + 16 + 8;
    for v in [1u32, 0, BASE, BASE, size, size, 5, 0x1000] {
        f.extend_from_slice(&v.to_le_bytes()); // PT_LOAD r-x of the whole file
    }
    assert_eq!(f.len(), CODE as usize);
    f.extend_from_slice(&[0xb8, 162, 0, 0, 0]); // mov eax, __NR_nanosleep
    f.push(0xbb);
    f.extend_from_slice(&ts.to_le_bytes()); // mov ebx, &ts
    f.extend_from_slice(&[0x31, 0xc9, 0xcd, 0x80, 0xeb, 0xf0]); // xor ecx,ecx; int 0x80; jmp
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&0u32.to_le_bytes()); // ts = { 1 s, 0 }
    std::fs::write(path, &f).expect("writing the i386 program");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

#[test]
fn a_32_bit_process_is_refused_before_anything_is_injected() {
    if !require_root("a_32_bit_process_is_refused_before_anything_is_injected") {
        return;
    }
    let dir = tempdir::Dir::new("i386");
    let bin = dir.path().join("sleeper32");
    i386_sleeper(&bin);
    let mut child = std::process::Command::new(&bin)
        .spawn()
        .expect("running the i386 program (does the kernel have IA32 emulation?)");
    let pid = child.id() as i32;
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(stasis_state(pid), 'S', "the i386 program sleeps");
    for args in [
        vec![
            "dump",
            "-t",
            &pid.to_string(),
            "-D",
            &dir.path().join("img").to_string_lossy(),
        ],
        vec!["vdso", "--pid", &pid.to_string()],
    ] {
        let args: Vec<&str> = args.iter().map(|s| &**s).collect();
        let o = stasis(&args);
        let e = stderr_of(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {e}");
        assert!(e.contains("32-bit") && e.contains(&pid.to_string()), "{e}");
        assert_eq!(tracer_of(pid), 0, "left untraced");
        assert_eq!(stasis_state(pid), 'S', "and running its loop");
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A directory another user controls is refused as a place for an image, before anything is
/// frozen: an empty directory that user owns, a symbolic link to one of ours, a directory in
/// a directory that user owns. The process runs on untouched.
#[test]
fn an_image_directory_another_user_controls_is_refused() {
    if !require_root("an_image_directory_another_user_controls_is_refused") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let d = Daemon::start("sleeper", &[]);
    let base = d.dir.path();
    let theirs = base.join("theirs");
    std::fs::create_dir(&theirs).expect("mkdir");
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).expect("chown");
    let ours = base.join("ours");
    std::fs::create_dir(&ours).expect("mkdir");
    let link = base.join("link");
    std::os::unix::fs::symlink(&ours, &link).expect("symlink");
    let their_parent = base.join("their-parent");
    std::fs::create_dir(&their_parent).expect("mkdir");
    std::fs::set_permissions(&their_parent, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::os::unix::fs::chown(&their_parent, Some(65534), Some(65534)).expect("chown");
    for (dir, needle) in [
        (theirs.clone(), "belongs to uid 65534"),
        (link.clone(), "symbolic link"),
        (their_parent.join("img"), "owned by uid 65534"),
    ] {
        let o = stasis(&[
            "dump",
            "-t",
            &d.pid.to_string(),
            "-D",
            &dir.to_string_lossy(),
        ]);
        let e = stderr_of(&o);
        assert_eq!(o.status.code(), Some(1), "{}: {e}", dir.display());
        assert!(
            e.contains(needle) && e.contains("another user could swap"),
            "{e}"
        );
        assert!(
            matches!(stasis_state(d.pid), 'S' | 'R'),
            "the process runs on"
        );
        assert_eq!(tracer_of(d.pid), 0, "untraced");
    }
    assert!(
        std::fs::read_dir(&theirs).expect("theirs").next().is_none(),
        "nothing written"
    );
    assert!(!their_parent.join("img").exists());
    assert_pass(&d.finish());
}

/// Python's `tempfile.TemporaryFile` (O_TMPFILE, opened with O_NOFOLLOW, which the kernel keeps
/// in the description's flags) and a `NamedTemporaryFile` deleted while open come back with
/// their contents and offsets: the restore opens them again through /proc/self/fd, a magic
/// link that O_NOFOLLOW would refuse (ELOOP).
#[test]
fn python_temporary_files_come_back() {
    if !require_root("python_temporary_files_come_back") {
        return;
    }
    let dir = tempdir::Dir::new("tempfile");
    let pidfile = dir.path().join("pid");
    let state = dir.path().join("state");
    let script = format!(
        r#"
import os, tempfile, time
a = tempfile.TemporaryFile(dir='{d}')
a.write(b'a' * 10000); a.seek(123)
b = tempfile.NamedTemporaryFile(dir='{d}', delete=False)
b.write(b'b' * 5000); b.flush(); os.unlink(b.name); b.seek(77)
open('{p}.tmp', 'w').write(str(os.getpid())); os.rename('{p}.tmp', '{p}')
n = 0
while True:
    ok = (a.tell() == 123 and os.pread(a.fileno(), 20000, 0) == b'a' * 10000
          and b.tell() == 77 and os.pread(b.fileno(), 20000, 0) == b'b' * 5000)
    n += 1
    open('{s}.tmp', 'w').write('%s %d' % ('ok' if ok else 'BAD', n)); os.rename('{s}.tmp', '{s}')
    time.sleep(0.02)
"#,
        d = dir.path().display(),
        p = pidfile.display(),
        s = state.display()
    );
    let mut child = python(&script, &pidfile, None, false);
    let pid = child.id() as i32;
    let read = || std::fs::read_to_string(&state).unwrap_or_default();
    let checks_after = |n: u64| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let s = read();
            let mut it = s.split_whitespace();
            let (verdict, k) = (
                it.next().unwrap_or("").to_string(),
                it.next().and_then(|k| k.parse::<u64>().ok()).unwrap_or(0),
            );
            if k > n {
                assert_eq!(verdict, "ok", "the files as the process sees them");
                return k;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no check after {n}: {s:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    let n = checks_after(0);
    let img = dir.path().join("img");
    let o = stasis(&["dump", "-t", &pid.to_string(), "-D", &img.to_string_lossy()]);
    assert!(o.status.success(), "dump: {}", stderr_of(&o));
    let _ = child.wait();
    let o = stasis(&["restore", "-D", &img.to_string_lossy(), "-d"]);
    assert!(o.status.success(), "restore: {}", stderr_of(&o));
    let m = checks_after(n + 1);
    checks_after(m + 2);
    // SAFETY: the restored copy is not our child; stop it.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}
