//! The new task's own preparations, run in the `clone3` child before it is frozen.
//!
//! The child is a copy of the (single-threaded) restoring stasis, so it may run ordinary code:
//! it puts every file at its number, sets cwd, umask, session and signal handlers, opens the
//! helper descriptors the plan refers to, reports "OK" (or what failed) on the ready pipe and
//! blocks until the host has seized it. Every signal stays blocked from the first instruction:
//! the handlers it installs belong to the restored program, not to stasis.

use crate::fds::{is_inherited, Helpers};
use anyhow::{bail, Context, Result};
use stasis_image::model::*;
use stasis_image::Image;
use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

/// fd numbers (inside the child) that the plan must close at the end.
pub fn leftover_fds() -> Vec<RawFd> {
    Vec::new()
}

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

fn cstr(s: &str) -> Result<CString> {
    CString::new(s).with_context(|| format!("{s:?} contains a NUL byte"))
}

fn check(r: libc::c_int, what: impl FnOnce() -> String) -> Result<libc::c_int> {
    if r < 0 {
        bail!("{}: {}", what(), std::io::Error::last_os_error());
    }
    Ok(r)
}

/// Moves `fd` to exactly `target` (closing `fd`), with or without close-on-exec.
fn place(fd: RawFd, target: RawFd, cloexec: bool) -> Result<()> {
    if fd == target {
        if !cloexec {
            // SAFETY: fcntl on a descriptor we own.
            check(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, || {
                format!("clearing FD_CLOEXEC on {fd}")
            })?;
        }
        return Ok(());
    }
    let flags = if cloexec { libc::O_CLOEXEC } else { 0 };
    // SAFETY: dup3 onto a number we decided to use; the source is ours.
    check(unsafe { libc::dup3(fd, target, flags) }, || {
        format!("dup3 {fd} -> {target}")
    })?;
    // SAFETY: closing the temporary descriptor.
    unsafe { libc::close(fd) };
    Ok(())
}

fn open_at(path: &str, flags: i32, mode: u32, target: RawFd, cloexec: bool) -> Result<()> {
    let c = cstr(path)?;
    // SAFETY: open with a valid NUL-terminated path.
    let fd = check(
        unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, mode) },
        || format!("opening {path}"),
    )?;
    place(fd, target, cloexec)
}

fn prepare(img: &Image, h: &Helpers, data: &FileData, ready: RawFd, hold: RawFd) -> Result<()> {
    // SAFETY: plain libc calls on our own process; arguments are valid.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
        let want = (h.max_fd() + 64) as u64;
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        if lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max.max(want));
            lim.rlim_max = lim.rlim_max.max(want);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    place(ready, h.ready_fd, true)?;
    place(hold, h.hold_fd, true)?;
    // Terminals and outside pipes are taken over from our own descriptors of the same number.
    let mut inherit = HashMap::new();
    for f in &img.files.fds {
        if is_inherited(img, f) {
            let tmp = h.inherit_base + f.fd;
            // SAFETY: duplicating a descriptor we inherited from stasis.
            check(
                unsafe { libc::fcntl(f.fd, libc::F_DUPFD_CLOEXEC, tmp) },
                || format!("taking over fd {}", f.fd),
            )?;
            inherit.insert(f.fd, tmp);
        }
    }
    // Nothing of stasis's below the helpers survives.
    // SAFETY: close_range on our own table.
    unsafe { libc::syscall(libc::SYS_close_range, 0u32, (h.base - 1) as u32, 0u32) };

    let mut pipes: HashMap<u64, (RawFd, RawFd)> = HashMap::new();
    for f in &img.files.fds {
        let access = (f.flags & libc::O_ACCMODE as u32) as i32;
        let status =
            f.flags as i32 & !(libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL | libc::O_NOCTTY);
        match &f.kind {
            FdKind::Path { path } | FdKind::CharDev { path, .. } => {
                open_at(path, status, 0, f.fd, f.cloexec)?;
                seek(f.fd, f.pos)?;
            }
            FdKind::Deleted { path, mode, .. } => {
                restore_deleted(f, path, data_of(data, f.fd), *mode, status)?;
            }
            FdKind::Tty { .. } => {
                let tmp = inherit[&f.fd];
                place(tmp, f.fd, f.cloexec)?;
            }
            FdKind::Pipe { id, size, .. } => {
                if let Some(&tmp) = inherit.get(&f.fd) {
                    place(tmp, f.fd, f.cloexec)?;
                    continue;
                }
                let (r, w) = match pipes.get(id) {
                    Some(&ends) => ends,
                    None => {
                        let ends = new_pipe(data_of(data, f.fd), *size, h)?;
                        pipes.insert(*id, ends);
                        ends
                    }
                };
                let end = if access == libc::O_WRONLY { w } else { r };
                // SAFETY: duplicating our own pipe end to its final number, then its flags.
                let fd = check(
                    unsafe { libc::fcntl(end, libc::F_DUPFD_CLOEXEC, 0) },
                    || "dup of a pipe end".into(),
                )?;
                place(fd, f.fd, f.cloexec)?;
                // SAFETY: set O_NONBLOCK etc. as dumped.
                check(unsafe { libc::fcntl(f.fd, libc::F_SETFL, status) }, || {
                    format!("flags of pipe fd {}", f.fd)
                })?;
            }
        }
    }
    for (r, w) in pipes.values() {
        // SAFETY: the temporary pipe ends, above h.base, are ours.
        unsafe {
            libc::close(*r);
            libc::close(*w);
        }
    }

    open_at(
        &img.dir
            .path()
            .join(stasis_image::PAGES_FILE)
            .to_string_lossy(),
        libc::O_RDONLY,
        0,
        h.pages_fd,
        true,
    )?;
    // Files to map (and the exe), by path; a deleted one is recreated once, unlinked, and
    // opened through /proc as often as needed, so all its mappings share one file again.
    let mut recreated: HashMap<String, OwnedFd> = HashMap::new();
    let mut open_mapped = |path: &str, flags: i32, target: RawFd| -> Result<()> {
        let Some((contents, mode)) = data.ghosts.get(path) else {
            return open_at(path, flags, 0, target, true);
        };
        if !recreated.contains_key(path) {
            recreated.insert(path.to_string(), recreate_deleted(path, contents, *mode)?);
        }
        let fd = recreated.get(path).map(|f| f.as_raw_fd()).unwrap_or(-1);
        open_at(&format!("/proc/self/fd/{fd}"), flags, 0, target, true)
    };
    open_mapped(
        img.mm.exe.strip_suffix(" (deleted)").unwrap_or(&img.mm.exe),
        libc::O_RDONLY,
        h.exe_fd,
    )?;
    for ((path, writable), fd) in &h.files {
        let flags = if *writable {
            libc::O_RDWR
        } else {
            libc::O_RDONLY
        };
        open_mapped(path, flags, *fd)?;
    }

    let pr = &img.process;
    let cwd = cstr(&pr.cwd)?;
    // SAFETY: plain libc calls with valid arguments.
    unsafe {
        check(libc::chdir(cwd.as_ptr()), || format!("chdir {}", pr.cwd))?;
        libc::umask(pr.umask as libc::mode_t);
        libc::personality(pr.personality as libc::c_ulong);
        let pid = img.inventory.pid;
        if pr.sid == pid {
            check(libc::setsid(), || "setsid".into())?;
        } else if pr.pgid == pid {
            check(libc::setpgid(0, 0), || "setpgid".into())?;
        }
    }
    if pr.root != "/" {
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

fn seek(fd: RawFd, pos: u64) -> Result<()> {
    // SAFETY: lseek on a descriptor we just opened; ESPIPE (not seekable) is fine.
    let r = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_SET) };
    if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::ESPIPE) {
        bail!(
            "seeking fd {fd} to {pos}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// What the child needs from pages.img, read by the parent before the child exists (the child
/// closes every low descriptor, the image reader's among them): buffered pipe data and deleted
/// files' contents by fd, and the contents and mode of deleted files that are mapped, by path.
#[derive(Default)]
pub struct FileData {
    pub fds: HashMap<i32, Vec<u8>>,
    pub ghosts: HashMap<String, (Vec<u8>, u32)>,
}

pub fn file_data(img: &Image) -> Result<FileData> {
    let read = |off: u64, len: u64| -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        if len > 0 {
            img.pages.read_at(off, &mut buf)?;
        }
        Ok(buf)
    };
    let mut out = FileData::default();
    for f in &img.files.fds {
        if let FdKind::Pipe { data_off, len, .. } | FdKind::Deleted { data_off, len, .. } = f.kind {
            out.fds.insert(f.fd, read(data_off, len)?);
        }
    }
    for v in &img.mm.vmas {
        if let Backing::File {
            path,
            ghost: Some(g),
            ..
        } = &v.backing
        {
            if !out.ghosts.contains_key(path) {
                out.ghosts
                    .insert(path.clone(), (read(g.data_off, g.len)?, g.mode));
            }
        }
    }
    Ok(out)
}

fn data_of(data: &FileData, fd: i32) -> &[u8] {
    data.fds.get(&fd).map_or(&[], Vec::as_slice)
}

fn write_all(fd: RawFd, mut data: &[u8]) -> Result<()> {
    while !data.is_empty() {
        // SAFETY: writing from a valid buffer.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n <= 0 {
            bail!("writing to fd {fd}: {}", std::io::Error::last_os_error());
        }
        data = &data[n as usize..];
    }
    Ok(())
}

/// A pipe with the dumped data already in it; both ends above the helpers' base.
fn new_pipe(contents: &[u8], size: u32, h: &Helpers) -> Result<(RawFd, RawFd)> {
    let mut ends = [0; 2];
    // SAFETY: pipe2 into a valid array.
    check(
        unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) },
        || "pipe2".into(),
    )?;
    // SAFETY: moving our own pipe ends above the numbers the image uses.
    let (r, w) = unsafe {
        let r = libc::fcntl(ends[0], libc::F_DUPFD_CLOEXEC, h.base);
        let w = libc::fcntl(ends[1], libc::F_DUPFD_CLOEXEC, h.base);
        libc::close(ends[0]);
        libc::close(ends[1]);
        (r, w)
    };
    if size > 0 {
        // SAFETY: fcntl on our pipe.
        unsafe { libc::fcntl(w, libc::F_SETPIPE_SZ, size as libc::c_int) };
    }
    write_all(w, contents)?;
    Ok((r, w))
}

/// A deleted-but-open file: recreated under its old name (so /proc shows the same
/// "path (deleted)"), filled, opened with the dumped flags, and unlinked again. If another
/// file has taken that name meanwhile, an unnamed file in the same directory stands in.
fn restore_deleted(f: &Fd, path: &str, contents: &[u8], mode: u32, status: i32) -> Result<()> {
    let file = recreate_deleted(path, contents, mode)?;
    // Reopen with the dumped flags through /proc (works for unlinked files).
    open_at(
        &format!("/proc/self/fd/{}", file.as_raw_fd()),
        status,
        0,
        f.fd,
        f.cloexec,
    )?;
    seek(f.fd, f.pos)
}

/// A file with `contents` and `mode`, created under `path` (so /proc shows the same
/// "path (deleted)" as before) and unlinked at once; an unnamed file in the same directory
/// when another file has taken that name meanwhile.
fn recreate_deleted(path: &str, contents: &[u8], mode: u32) -> Result<OwnedFd> {
    let c = cstr(path)?;
    // SAFETY: open with a valid path; O_EXCL never touches an existing file.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_CREAT | libc::O_EXCL | libc::O_RDWR | libc::O_CLOEXEC,
            mode,
        )
    };
    let file = if fd >= 0 {
        let file = own(fd);
        // SAFETY: removing the name we just created.
        unsafe { libc::unlink(c.as_ptr()) };
        file
    } else {
        let dir = std::path::Path::new(path)
            .parent()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/tmp".into());
        let d = cstr(&dir)?;
        // SAFETY: open with O_TMPFILE on a valid directory path.
        let tmp = check(
            unsafe {
                libc::open(
                    d.as_ptr(),
                    libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC,
                    mode,
                )
            },
            || format!("creating an unnamed file in {dir} for deleted {path}"),
        )?;
        own(tmp)
    };
    write_all(file.as_raw_fd(), contents)?;
    // SAFETY: fchmod on our file: O_CREAT's mode was filtered by the umask.
    unsafe { libc::fchmod(file.as_raw_fd(), mode as libc::mode_t) };
    Ok(file)
}

/// Closes a raw fd we were handed by number.
pub fn own(fd: RawFd) -> OwnedFd {
    // SAFETY: callers pass descriptors they own and nobody else closes.
    unsafe { OwnedFd::from_raw_fd(fd) }
}
