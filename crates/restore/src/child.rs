//! The new task's own preparations, run in the `clone3` child before it is frozen.
//!
//! The child is a copy of the (single-threaded) restoring stasis, so it may run ordinary code:
//! it opens every dumped file description and puts every descriptor at its number
//! (`files`), opens the helper descriptors the plan refers to, sets cwd, umask, session and
//! signal handlers, closes everything else, reports "OK" (or what failed) on the ready pipe and
//! blocks until the host has seized it. Every signal stays blocked from the first instruction:
//! the handlers it installs belong to the restored program, not to stasis.

use crate::fds::Helpers;
use crate::files::{self, check, cstr, dup_at_least, open_path, FileData};
use anyhow::{bail, Result};
use stasis_image::model::*;
use stasis_image::Image;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};

pub fn child_main(img: &Image, h: &Helpers, data: &FileData, ready: OwnedFd, hold: OwnedFd) -> ! {
    let ready_fd = ready.into_raw_fd();
    let hold_fd = hold.into_raw_fd();
    let outcome = prepare(img, h, data, ready_fd, hold_fd);
    let msg = match &outcome {
        Ok(()) => "OK".to_string(),
        Err(e) => format!("{e:#}"),
    };
    // SAFETY: raw writes and a blocking read on our own descriptors; _exit ends the child
    // without running stasis's destructors (which belong to the parent).
    unsafe {
        let fd = if outcome.is_ok() {
            h.ready_fd
        } else {
            ready_fd_now(ready_fd, h)
        };
        libc::write(fd, msg.as_ptr().cast(), msg.len());
        libc::close(fd);
        if outcome.is_err() {
            libc::_exit(1);
        }
        let mut b = 0u8;
        loop {
            let r = libc::read(h.hold_fd, (&mut b as *mut u8).cast(), 1);
            if r == 0 {
                // The host went away without seizing us.
                libc::_exit(1);
            }
        }
    }
}

/// Where the ready pipe is when `prepare` failed part-way (it may or may not have moved).
fn ready_fd_now(orig: RawFd, h: &Helpers) -> RawFd {
    // SAFETY: F_GETFD only probes.
    if unsafe { libc::fcntl(h.ready_fd, libc::F_GETFD) } >= 0 {
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
    // SAFETY: dup3 onto a helper number; whatever was there was stasis's and must go anyway.
    check(
        unsafe { libc::dup3(fd.as_raw_fd(), target, libc::O_CLOEXEC) },
        || format!("dup3 {} -> {target}", fd.as_raw_fd()),
    )?;
    Ok(())
}

fn prepare(img: &Image, h: &Helpers, data: &FileData, ready: RawFd, hold: RawFd) -> Result<()> {
    // SAFETY: plain libc calls on our own process; arguments are valid.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
        let want = h.fd_limit(img);
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        if lim.rlim_cur < want {
            lim.rlim_cur = want;
            lim.rlim_max = lim.rlim_max.max(want);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    // The handshake pipes go to their helper numbers first: nothing below may land on them.
    place_helper(dup_at_least(ready, h.stage_base)?, h.ready_fd)?;
    place_helper(dup_at_least(hold, h.stage_base)?, h.hold_fd)?;
    // SAFETY: the originals are ours; their numbers may be image numbers.
    unsafe {
        libc::close(ready);
        libc::close(hold);
    }

    // The userfaultfd through which the host fills the anonymous memory. Best effort: without
    // one (a kernel or policy that forbids it) the restorer reads the pages itself.
    if let Ok(uffd) = stasis_sys::uffd::create() {
        place_helper(dup_at_least(uffd.as_raw_fd(), h.stage_base)?, h.uffd_fd)?;
    }
    let cx = files::open_all(img, data, h.stage_base)?;
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
            open_path(m.path.as_bytes(), flags)?
        };
        place_helper(fd, target)?;
    }
    drop(cx);
    let mut keep: Vec<RawFd> = img.files.fds.iter().map(|f| f.fd).collect();
    keep.extend(h.numbers());
    files::close_unplaced(&keep)?;

    let pr = &img.process;
    enter_cwd(pr)?;
    // SAFETY: plain libc calls with valid arguments.
    unsafe {
        libc::umask(pr.umask as libc::mode_t);
        libc::personality(pr.personality as libc::c_ulong);
        let pid = img.inventory.pid;
        if pr.sid == pid {
            check(libc::setsid(), || "setsid".into())?;
        } else if pr.pgid == pid {
            check(libc::setpgid(0, 0), || "setpgid".into())?;
        }
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
        // SAFETY: rt_sigaction with a valid kernel sigaction; every signal is blocked, so the
        // handler (an address in the restored program) cannot run in this child.
        let r = unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                &act as *const _,
                0usize,
                8usize,
            )
        };
        if r < 0 {
            bail!("rt_sigaction({sig}): {}", std::io::Error::last_os_error());
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
    let cwd = cstr(pr.cwd.as_bytes())?;
    let Some(mode) = pr.cwd_deleted_mode else {
        // SAFETY: chdir with a valid path.
        check(unsafe { libc::chdir(cwd.as_ptr()) }, || {
            format!("chdir {}", pr.cwd)
        })?;
        return Ok(());
    };
    let mut dir = cwd.clone();
    // SAFETY: mkdir with a valid path; it fails harmlessly when the name is taken.
    if unsafe { libc::mkdir(cwd.as_ptr(), mode) } != 0 {
        let stand_in = format!("{}.stasis-{}", pr.cwd, std::process::id());
        tracing::warn!(
            "{} exists again; the deleted cwd is recreated as {stand_in}",
            pr.cwd
        );
        dir = cstr(stand_in.as_bytes())?;
        // SAFETY: as above.
        check(unsafe { libc::mkdir(dir.as_ptr(), mode) }, || {
            format!("making a stand-in for the deleted cwd {}", pr.cwd)
        })?;
    }
    // SAFETY: chdir into the directory just made, then remove it: we stay inside it.
    unsafe {
        let entered = libc::chdir(dir.as_ptr());
        let e = std::io::Error::last_os_error();
        libc::rmdir(dir.as_ptr());
        if entered != 0 {
            bail!("entering the recreated cwd {}: {e}", pr.cwd);
        }
        libc::chmod(c".".as_ptr(), mode);
    }
    Ok(())
}
