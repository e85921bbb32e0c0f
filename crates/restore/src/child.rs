//! The new task's own preparations, run in the `clone3` child before it is frozen.
//!
//! The child is a copy of the (single-threaded) restoring stasis, so it may run ordinary code:
//! it opens every dumped file description and puts every descriptor at its number
//! (`files`), opens the helper descriptors the plan refers to, sets cwd, umask, session and
//! signal handlers, closes everything else, reports "OK" (or what failed) on the ready pipe and
//! blocks until the host has seized it. Every signal stays blocked from the first instruction:
//! the handlers it installs belong to the restored program, not to stasis.

use crate::fds::Helpers;
use crate::files::{self, check, cstr, dup_at_least, open_path};
use crate::spawn::Spawn;
use anyhow::{bail, Context, Result};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow};
use nix::sys::stat::Mode;
use nix::unistd::Pid;
use stasis_image::model::*;
use std::os::fd::{AsRawFd, BorrowedFd, IntoRawFd, OwnedFd, RawFd};

/// Task `i` of the tree: prepares itself, then creates its own children (each of which runs
/// this in turn), reports, and blocks until it is seized.
pub(crate) fn child_main(spawn: &Spawn<'_>, i: usize) -> ! {
    let t = &spawn.tasks[i];
    let h = t.helpers;
    let (ready_fd, hold_fd) = spawn.plumbing.ends[i];
    let parent = !t.children.is_empty() || !t.zombies.is_empty();
    let outcome = prepare(spawn, i, ready_fd, hold_fd).and_then(|()| {
        if parent {
            make_children(spawn, i)?;
            // What the children needed from the restoring stasis: they have it now.
            let base = spawn.plumbing.base as u32;
            stasis_sys::fs::close_range(base, u32::MAX).context("close_range")?;
        }
        Ok(())
    });
    let msg = match &outcome {
        Ok(()) => "OK".to_string(),
        Err(e) => format!("{e:#}"),
    };
    // The handshake descriptors are kept by number (never as `OwnedFd`s: the numbers they
    // had may be image numbers by now); _exit ends the child without running stasis's
    // destructors (which belong to the parent).
    let fd = if outcome.is_ok() {
        h.ready_fd
    } else {
        ready_fd_now(ready_fd, h)
    };
    // SAFETY: fd is the ready pipe, at its helper number or still at its original one (see
    // `ready_fd_now`), open until the close just below.
    let _ = nix::unistd::write(unsafe { BorrowedFd::borrow_raw(fd) }, msg.as_bytes());
    let _ = nix::unistd::close(fd);
    if outcome.is_err() {
        stasis_sys::process::exit_now(1);
    }
    // SAFETY: the hold pipe stays at its helper number until the host has seized this task
    // (and the plan closes it); nothing here closes it.
    let hold = unsafe { BorrowedFd::borrow_raw(h.hold_fd) };
    let mut b = [0u8; 1];
    loop {
        if let Ok(0) = nix::unistd::read(hold, &mut b) {
            // The host went away without seizing us.
            stasis_sys::process::exit_now(1);
        }
    }
}

/// Where the ready pipe is when `prepare` failed part-way (it may or may not have moved).
fn ready_fd_now(orig: RawFd, h: &Helpers) -> RawFd {
    if stasis_sys::fs::is_open(h.ready_fd) {
        h.ready_fd
    } else {
        orig
    }
}

/// Moves `fd` to exactly `target` (closing `fd`), close-on-exec.
fn place_helper(fd: OwnedFd, target: RawFd) -> Result<()> {
    if fd.as_raw_fd() == target {
        let _ = fd.into_raw_fd();
        return Ok(());
    }
    // Onto a helper number, kept by number from here on; whatever was there was stasis's and
    // must go anyway.
    check(stasis_sys::fs::dup_onto(&fd, target, true), || {
        format!("dup3 {} -> {target}", fd.as_raw_fd())
    })?;
    Ok(())
}

/// Creates task `i`'s children with their pids; each joins its process group at once (from
/// here, so a sibling that joins the same group next finds it made).
fn make_children(spawn: &Spawn<'_>, i: usize) -> Result<()> {
    let me = &spawn.tasks[i].img.process;
    for z in &spawn.tasks[i].zombies {
        make_zombie(z)?;
    }
    for &c in &spawn.tasks[i].children {
        let child = spawn.tasks[c].img;
        let (pid, pr) = (child.inventory.pid, &child.process);
        if let Some((h, session)) = spawn.tasks[c].helper {
            make_through_helper(spawn, c, h, session)?;
            continue;
        }
        // SAFETY: this task is single-threaded (a copy of the single-threaded stasis).
        let r = unsafe { stasis_sys::clone::clone3_with_pid(pid) };
        match r {
            Ok(0) => child_main(spawn, c),
            Ok(_) => {}
            Err(e) => bail!(
                "creating pid {pid} with clone3(set_tid): {}",
                std::io::Error::from(e)
            ),
        }
        if pr.sid != pid && pr.pgid != me.pgid {
            let (p, g) = (Pid::from_raw(pid), Pid::from_raw(pr.pgid));
            check(nix::unistd::setpgid(p, g), || {
                format!("putting pid {pid} into process group {}", pr.pgid)
            })?;
        }
    }
    if !spawn.tasks[i].zombies.is_empty()
        || spawn.tasks[i]
            .children
            .iter()
            .any(|&c| spawn.tasks[c].helper.is_some())
    {
        // The SIGCHLDs of the zombies were the process's long ago (any it had not taken yet is
        // in the image, queued again by the plan), the helpers' never were: take them away.
        let set = SigSet::from(nix::sys::signal::Signal::SIGCHLD);
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: rt_sigtimedwait with a valid set, no siginfo, and a zero timeout.
        while unsafe {
            libc::syscall(
                libc::SYS_rt_sigtimedwait,
                set.as_ref() as *const libc::sigset_t,
                std::ptr::null_mut::<libc::siginfo_t>(),
                &zero as *const libc::timespec,
                8usize,
            )
        } > 0
        {}
    }
    Ok(())
}

/// Child `c`, whose group (or session) `h` lost its leader: a helper task with pid `h` makes it
/// (setpgid, or setsid), creates `c` inside it as this task's child (CLONE_PARENT) and exits;
/// this task reaps the helper. The group lives on in `c`.
fn make_through_helper(spawn: &Spawn<'_>, c: usize, h: i32, session: bool) -> Result<()> {
    let pid = spawn.tasks[c].img.inventory.pid;
    // SAFETY: this task is single-threaded (a copy of the single-threaded stasis).
    match unsafe { stasis_sys::clone::clone3_with_pid(h) } {
        Ok(0) => {
            let me = Pid::from_raw(0);
            let made = if session {
                nix::unistd::setsid().map(drop)
            } else {
                nix::unistd::setpgid(me, me)
            };
            if made.is_err() {
                stasis_sys::process::exit_now(2);
            }
            // SAFETY: the helper is single-threaded too.
            match unsafe {
                stasis_sys::clone::clone3_with_pid_flags(pid, libc::CLONE_PARENT as u64)
            } {
                Ok(0) => child_main(spawn, c),
                Ok(_) => stasis_sys::process::exit_now(0),
                Err(_) => stasis_sys::process::exit_now(3),
            }
        }
        Ok(_) => {}
        Err(e) => bail!(
            "creating helper pid {h} (to make {} {h} again) with clone3(set_tid): {}",
            if session { "session" } else { "process group" },
            std::io::Error::from(e)
        ),
    }
    match nix::sys::wait::waitpid(Pid::from_raw(h), None) {
        Ok(nix::sys::wait::WaitStatus::Exited(_, 0)) => Ok(()),
        other => bail!(
            "the helper making {} {h} failed to create pid {pid}: {other:?}",
            if session { "session" } else { "process group" }
        ),
    }
}

/// A child that had exited and not been waited for: made with its pid, in its group and
/// session, it ends at once as it ended then; this task (its parent) waits until it has,
/// without reaping it (`WNOWAIT`), so the group it may lead exists for its siblings.
fn make_zombie(z: &stasis_image::model::TreeZombie) -> Result<()> {
    // SAFETY: this task is single-threaded (a copy of the single-threaded stasis).
    match unsafe { stasis_sys::clone::clone3_with_pid(z.pid) } {
        Ok(0) => {
            let me = Pid::from_raw(0);
            if z.sid == z.pid {
                let _ = nix::unistd::setsid();
            } else if z.pgid == z.pid {
                let _ = nix::unistd::setpgid(me, me);
            }
            let sig = z.status & 0x7f;
            if sig == 0 {
                stasis_sys::process::exit_now((z.status >> 8) & 0xff);
            }
            // No core file: RLIMIT_CORE 0 (so the status lacks the core flag, if it had one).
            let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0);
            let act = stasis_abi::KSigAction::default();
            let _ = stasis_sys::signal::set_kernel_action(sig, &act);
            if let Ok(s) = nix::sys::signal::Signal::try_from(sig) {
                let _ = sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&SigSet::from(s)), None);
                let _ = nix::sys::signal::raise(s);
            }
            // A signal that does not kill by default (the image said it did).
            stasis_sys::process::exit_now(128 + sig)
        }
        Ok(_) => {}
        Err(e) => bail!(
            "creating zombie pid {} with clone3(set_tid): {}",
            z.pid,
            std::io::Error::from(e)
        ),
    }
    let flags = nix::sys::wait::WaitPidFlag::WEXITED | nix::sys::wait::WaitPidFlag::WNOWAIT;
    check(
        nix::sys::wait::waitid(nix::sys::wait::Id::Pid(Pid::from_raw(z.pid)), flags),
        || format!("waiting for zombie {} to exit", z.pid),
    )?;
    Ok(())
}

fn prepare(spawn: &Spawn<'_>, i: usize, ready: RawFd, hold: RawFd) -> Result<()> {
    let t = &spawn.tasks[i];
    let (img, h, data) = (t.img, t.helpers, t.data);
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::all()), None);
    // Files that are not the ones the process had are opened with its own rights.
    if let Some(main) = img.cores.iter().find(|c| c.tid == img.inventory.pid) {
        files::set_open_as(&main.creds);
    }
    let want = h.fd_limit(img);
    let (cur, max) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((0, 0));
    if cur < want {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, want, max.max(want));
    }
    // The handshake pipes go to their helper numbers first: nothing below may land on them.
    {
        // SAFETY: ready and hold are the pipes' original numbers, held by number since
        // child_main and open until closed just below (the helper numbers written over are
        // above every number stasis had open).
        let (r, w) = unsafe { (BorrowedFd::borrow_raw(ready), BorrowedFd::borrow_raw(hold)) };
        place_helper(dup_at_least(r, h.stage_base)?, h.ready_fd)?;
        place_helper(dup_at_least(w, h.stage_base)?, h.hold_fd)?;
    }
    // The originals are ours; their numbers may be image numbers.
    let _ = nix::unistd::close(ready);
    let _ = nix::unistd::close(hold);

    // The userfaultfd through which the host fills the anonymous memory. Best effort: without
    // one (a kernel or policy that forbids it) the restorer reads the pages itself.
    let uffd = if spawn.lazy {
        stasis_sys::uffd::create_with(stasis_sys::uffd::LAZY_FEATURES)
    } else {
        stasis_sys::uffd::create()
    };
    if let Ok(uffd) = uffd {
        place_helper(dup_at_least(&uffd, h.stage_base)?, h.uffd_fd)?;
    }
    let cx = files::open_all(img, data, h.stage_base, &spawn.plumbing)?;
    files::place(&cx)?;

    open_at(
        &img.dir.path().join(stasis_image::PAGES_FILE),
        libc::O_RDONLY as u32,
        h.pages_fd,
    )?;
    let mut cx = cx;
    // The exe and every mapped file, by path, or from the recreated file when it has no name.
    let exe = crate::fds::MapFile {
        dev: img.mm.exe_dev,
        inode: img.mm.exe_inode,
        writable: false,
        path: img.mm.exe.without_deleted(),
    };
    let mut wanted: Vec<(&crate::fds::MapFile, i32)> =
        h.maps.iter().map(|(m, &fd)| (m, fd)).collect();
    wanted.push((&exe, h.exe_fd));
    for (m, target) in wanted {
        let flags = if m.writable {
            libc::O_RDWR
        } else {
            libc::O_RDONLY
        } as u32;
        let fd = if img.files.unnamed(m.dev, m.inode).is_some() {
            let file = cx.unnamed_fd(m.dev, m.inode)?;
            files::reopen(file, flags)?
        } else {
            files::open_identified(m.path.as_bytes(), flags, m.dev, m.inode)?
        };
        place_helper(fd, target)?;
    }
    drop(cx);
    for (id, &target) in &h.shm {
        let Some(&obj) = spawn.plumbing.shm.get(id) else {
            bail!("shared memory {id} was not made for the tree");
        };
        // SAFETY: made by the restoring stasis for the tree (`Plumbing`), inherited, open.
        let obj = unsafe { BorrowedFd::borrow_raw(obj) };
        place_helper(dup_at_least(obj, h.stage_base)?, target)?;
    }
    let mut keep: Vec<RawFd> = img.files.fds.iter().map(|f| f.fd).collect();
    keep.extend(h.numbers());
    if !t.children.is_empty() {
        // The children take theirs from what the restoring stasis opened for the tree.
        keep.extend(spawn.plumbing.shared.values());
        keep.extend(spawn.plumbing.lent.values());
        keep.extend(spawn.plumbing.shm.values());
        keep.extend(spawn.plumbing.unnamed.values());
        for (j, e) in spawn.plumbing.ends.iter().enumerate() {
            if j != i {
                keep.extend([e.0, e.1]);
            }
        }
    }
    files::close_unplaced(&keep)?;

    let pr = &img.process;
    enter_cwd(pr)?;
    nix::sys::stat::umask(Mode::from_bits_retain(pr.umask));
    // The dumped persona as it is (the kernel keeps 32 bits of it).
    let persona = nix::sys::personality::Persona::from_bits_retain(pr.personality as i32);
    let _ = nix::sys::personality::set(persona);
    let pid = img.inventory.pid;
    let me = Pid::from_raw(0);
    if i == 0 && spawn.shell_job {
        // The job's terminal is this stasis's: its session and group are the job's now.
    } else if pr.sid == pid {
        check(nix::unistd::setsid(), || "setsid".into())?;
    } else if pr.pgid == pid {
        check(nix::unistd::setpgid(me, me), || "setpgid".into())?;
    } else if t.parent_pgid.is_some_and(|g| g != pr.pgid) {
        // A group its parent made or joined (the root's own group and session, when their
        // leaders are not in the image, are those of the restoring stasis, as before).
        check(nix::unistd::setpgid(me, Pid::from_raw(pr.pgid)), || {
            format!("joining process group {}", pr.pgid)
        })?;
    }
    if let Some(c) = pr.ctty_pty {
        take_terminal(img, pid, c)?;
    }
    if pr.root.as_bytes() != b"/" {
        bail!("the process ran chrooted in {}; not supported yet", pr.root);
    }
    for (i, a) in pr.sigactions.iter().enumerate() {
        let sig = i as i32 + 1;
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        let act = stasis_abi::KSigAction {
            handler: a.handler,
            flags: a.flags,
            restorer: a.restorer,
            mask: a.mask,
        };
        // Every signal is blocked, so the handler (an address in the restored program) cannot
        // run in this child.
        if let Err(e) = stasis_sys::signal::set_kernel_action(sig, &act) {
            bail!("rt_sigaction({sig}): {}", std::io::Error::from(e));
        }
    }
    Ok(())
}

fn open_at(path: &std::path::Path, flags: u32, target: RawFd) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    place_helper(open_path(path.as_os_str().as_bytes(), flags)?, target)
}

/// The dumped cwd. One that had been removed while the process sat in it is made again,
/// entered and removed, so the process is once more in a deleted directory of that name; when
/// something else has taken the name, a fresh directory beside it stands in.
fn enter_cwd(pr: &Process) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    let cwd = cstr(pr.cwd.as_bytes())?;
    let Some(mode) = pr.cwd_deleted_mode else {
        check(nix::unistd::chdir(cwd.as_c_str()), || {
            format!("chdir {}", pr.cwd)
        })?;
        return Ok(());
    };
    let mut dir = cwd.clone();
    // It fails harmlessly when the name is taken.
    if nix::unistd::mkdir(cwd.as_c_str(), Mode::from_bits_retain(mode)).is_err() {
        let stand_in = format!("{}.stasis-{}", pr.cwd, std::process::id());
        tracing::warn!(
            "{} exists again; the deleted cwd is recreated as {stand_in}",
            pr.cwd
        );
        dir = cstr(stand_in.as_bytes())?;
        check(
            nix::unistd::mkdir(dir.as_c_str(), Mode::from_bits_retain(mode)),
            || format!("making a stand-in for the deleted cwd {}", pr.cwd),
        )?;
    }
    // Enter the directory just made, then remove it: we stay inside it.
    let entered = nix::unistd::chdir(dir.as_c_str());
    let _ = std::fs::remove_dir(std::ffi::OsStr::from_bytes(dir.as_bytes()));
    if let Err(e) = entered {
        bail!(
            "entering the recreated cwd {}: {}",
            pr.cwd,
            std::io::Error::from(e)
        );
    }
    let _ = std::fs::set_permissions(".", std::fs::Permissions::from_mode(mode));
    Ok(())
}

/// The pty `c` is this task's controlling terminal again: its session leader makes it so
/// (through a slave descriptor it holds; its children, made after this, inherit it), and a
/// member of its foreground group makes that group the foreground one.
fn take_terminal(img: &stasis_image::Image, pid: i32, c: CttyPty) -> Result<()> {
    let pr = &img.process;
    if pr.sid == pid {
        let slave = img.files.fds.iter().find(|f| {
            img.files.desc(f.desc).is_some_and(
                |d| matches!(d.kind, FileKind::Pty { index, master: false } if index == c.index),
            )
        });
        let Some(slave) = slave else {
            bail!(
                "pid {pid} leads the session of pty {} but holds no slave of it",
                c.index
            );
        };
        check(stasis_sys::pty::make_controlling(slave.fd), || {
            format!(
                "making pty {} the controlling terminal of session {pid}",
                c.index
            )
        })?;
    }
    if c.foreground != 0 && c.foreground == pr.pgid {
        let tty = open_path(
            b"/dev/tty",
            (libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) as u32,
        )
        .with_context(|| {
            format!(
                "pid {pid}: opening its controlling terminal (pty {})",
                c.index
            )
        })?;
        check(
            stasis_sys::pty::set_foreground(tty.as_raw_fd(), pr.pgid),
            || format!("making group {} the foreground of pty {}", pr.pgid, c.index),
        )?;
    }
    Ok(())
}
