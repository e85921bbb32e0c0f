//! Opening the dumped open file descriptions again, inside the new task (which still runs
//! stasis's code, see `child.rs`).
//!
//! Each kind of file is one module with one [`Open`]: what it must wait for and how to open
//! its description. This engine knows no kind: it takes over the descriptors the restoring
//! stasis lends (a shell job's terminal, outside pipes), opens every other description in an
//! order that respects each kind's `after`, and only then puts each descriptor at its number,
//! as a duplicate of its description, so descriptors that shared a description (and its offset
//! and flags) share it again.
//!
//! Invariant: until [`place`], every descriptor the engine holds sits at or above
//! `stage_base`, above every number the image uses, so opening one never lands on (or
//! `dup3` over) a descriptor already placed; stasis's own descriptors never reach the
//! restored process because everything not placed is closed at the end (`close_unplaced`).

mod chardev;
mod epoll;
mod eventfd;
mod path;
mod pipe;
mod tty;
mod unnamed;

use anyhow::{bail, Context, Result};
use stasis_image::model::*;
use stasis_image::Image;
use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// One kind of file, as the restore opens it.
pub(crate) trait Open: Sync {
    /// Descriptions that must be open before this one can be.
    fn after(&self, _d: &FileDesc, _cx: &OpenCx) -> Vec<u32> {
        Vec::new()
    }
    /// Opens the description (anywhere: the engine moves it to the staging range).
    fn open(&self, d: &FileDesc, cx: &mut OpenCx) -> Result<OwnedFd>;
    /// Runs once every descriptor is at its number (`fd` is this description, staged).
    fn after_place(&self, _d: &FileDesc, _fd: RawFd) -> Result<()> {
        Ok(())
    }
}

/// The one dispatch from a dumped kind to its operations.
fn ops(kind: &FileKind) -> &'static dyn Open {
    match kind {
        FileKind::Path { .. } => &path::PATH,
        FileKind::Unnamed { .. } => &unnamed::UNNAMED,
        FileKind::CharDev { .. } => &chardev::CHARDEV,
        FileKind::Pipe { .. } => &pipe::PIPE,
        FileKind::Tty { .. } => &tty::TTY,
        FileKind::EventFd { .. } => &eventfd::EVENTFD,
        FileKind::Epoll { .. } => &epoll::EPOLL,
    }
}

/// What the new task needs from pages.img, read by the parent before the task exists (the
/// task closes every descriptor of stasis's, the image reader's among them): pipe buffers and
/// the contents of unnamed files.
#[derive(Default)]
pub struct FileData {
    pub pipes: HashMap<u64, Vec<u8>>,
    pub unnamed: HashMap<(u64, u64), Vec<u8>>,
}

impl FileData {
    /// Reads it all; every range was checked against pages.img when the image was loaded.
    pub fn read(img: &Image) -> Result<FileData> {
        let read = |off: u64, len: u64| -> Result<Vec<u8>> {
            let mut buf = vec![0u8; len as usize];
            if len > 0 {
                img.pages.read_at(off, &mut buf)?;
            }
            Ok(buf)
        };
        let mut out = FileData::default();
        for p in &img.files.pipes {
            out.pipes.insert(p.inode, read(p.data_off, p.len)?);
        }
        for u in &img.files.unnamed {
            out.unnamed
                .insert((u.dev, u.inode), read(u.data_off, u.len)?);
        }
        Ok(out)
    }
}

/// The engine's state while one task's files are opened.
pub(crate) struct OpenCx<'a> {
    pub img: &'a Image,
    pub data: &'a FileData,
    /// Where staged descriptors go: above the image's numbers and the helpers.
    pub stage_base: RawFd,
    /// Description id → its staged descriptor.
    pub staged: HashMap<u32, OwnedFd>,
    /// Unnamed files recreated so far, by (dev, inode).
    pub unnamed: HashMap<(u64, u64), OwnedFd>,
    /// Pipes created so far, by inode.
    pub pipes: HashMap<u64, pipe::Pair>,
}

impl<'a> OpenCx<'a> {
    /// Moves `fd` into the staging range (close-on-exec) and closes the original.
    pub fn stage(&self, fd: OwnedFd) -> Result<OwnedFd> {
        if fd.as_raw_fd() >= self.stage_base {
            return Ok(fd);
        }
        dup_at_least(fd.as_raw_fd(), self.stage_base)
    }

    /// The descriptor of an unnamed file, recreating it on first use.
    pub fn unnamed_fd(&mut self, dev: u64, inode: u64) -> Result<RawFd> {
        if let Some(fd) = self.unnamed.get(&(dev, inode)) {
            return Ok(fd.as_raw_fd());
        }
        let fd = unnamed::recreate(self, dev, inode)?;
        let fd = self.stage(fd)?;
        let raw = fd.as_raw_fd();
        self.unnamed.insert((dev, inode), fd);
        Ok(raw)
    }
}

/// Takes over the descriptors the restoring stasis lends (each description with `inherit`),
/// then opens every other description. Returns the engine state holding them all, staged.
pub(crate) fn open_all<'a>(
    img: &'a Image,
    data: &'a FileData,
    stage_base: RawFd,
) -> Result<OpenCx<'a>> {
    let mut cx = OpenCx {
        img,
        data,
        stage_base,
        staged: HashMap::new(),
        unnamed: HashMap::new(),
        pipes: HashMap::new(),
    };
    for d in &img.files.descs {
        if let Some(n) = inherited_from(&d.kind) {
            let fd = dup_at_least(n, stage_base)
                .with_context(|| format!("taking over fd {n} from stasis"))?;
            set_status_flags(fd.as_raw_fd(), d.flags)?;
            cx.staged.insert(d.id, fd);
        }
    }
    let mut left: Vec<&FileDesc> = img
        .files
        .descs
        .iter()
        .filter(|d| !cx.staged.contains_key(&d.id))
        .collect();
    while !left.is_empty() {
        let before = left.len();
        let mut i = 0;
        while i < left.len() {
            let d = left[i];
            let ops = ops(&d.kind);
            if ops
                .after(d, &cx)
                .iter()
                .all(|id| cx.staged.contains_key(id))
            {
                let fd = ops
                    .open(d, &mut cx)
                    .with_context(|| format!("opening {}", describe(img, d)))?;
                let fd = cx.stage(fd)?;
                cx.staged.insert(d.id, fd);
                left.remove(i);
            } else {
                i += 1;
            }
        }
        if left.len() == before {
            bail!(
                "the open files wait on each other in a circle ({})",
                describe(img, left[0])
            );
        }
    }
    Ok(cx)
}

/// The restoring stasis's descriptor a description is taken over from, if it is.
pub(crate) fn inherited_from(kind: &FileKind) -> Option<RawFd> {
    match kind {
        FileKind::Pipe { inherit, .. } | FileKind::Tty { inherit, .. } => *inherit,
        _ => None,
    }
}

/// Puts every dumped descriptor at its number, as a duplicate of its staged description.
pub(crate) fn place(cx: &OpenCx) -> Result<()> {
    for f in &cx.img.files.fds {
        let Some(src) = cx.staged.get(&f.desc) else {
            bail!("fd {}: its description was not opened", f.fd);
        };
        let flags = if f.cloexec { libc::O_CLOEXEC } else { 0 };
        // SAFETY: dup3 onto a number the image uses; nothing of ours is there (see the
        // module invariant), the source is a staged descriptor we hold.
        check(unsafe { libc::dup3(src.as_raw_fd(), f.fd, flags) }, || {
            format!("placing fd {}", f.fd)
        })?;
    }
    for d in &cx.img.files.descs {
        if let Some(fd) = cx.staged.get(&d.id) {
            ops(&d.kind)
                .after_place(d, fd.as_raw_fd())
                .with_context(|| format!("completing {}", describe(cx.img, d)))?;
        }
    }
    Ok(())
}

/// Closes every descriptor whose number is not in `keep`: stasis's own, staged ones, and any
/// temporaries. Nothing of the restoring tool may reach the restored process.
pub(crate) fn close_unplaced(keep: &[RawFd]) -> Result<()> {
    let mut keep: Vec<u32> = keep.iter().map(|&k| k as u32).collect();
    keep.sort_unstable();
    keep.dedup();
    let mut from = 0u32;
    for k in keep {
        if k > from {
            stasis_sys::fs::close_range(from, k - 1).context("close_range")?;
        }
        from = k + 1;
    }
    stasis_sys::fs::close_range(from, u32::MAX).context("close_range")?;
    Ok(())
}

fn describe(img: &Image, d: &FileDesc) -> String {
    let fds: Vec<String> = img
        .files
        .fds
        .iter()
        .filter(|f| f.desc == d.id)
        .map(|f| f.fd.to_string())
        .collect();
    let what = match &d.kind {
        FileKind::Path { path, .. } => path.to_string(),
        FileKind::Unnamed { dev, inode } => {
            match img.files.unnamed(*dev, *inode).map(|u| &u.what) {
                Some(Unnamed::Deleted { path }) => format!("{path} (deleted)"),
                Some(Unnamed::Memfd { name, .. }) => format!("memfd:{name}"),
                None => format!("unnamed file {inode}"),
            }
        }
        FileKind::CharDev { path, .. } | FileKind::Tty { path, .. } => path.to_string(),
        FileKind::Pipe { inode, .. } => format!("pipe:[{inode}]"),
        FileKind::EventFd { .. } => "eventfd".into(),
        FileKind::Epoll { .. } => "epoll".into(),
    };
    format!("fd {} ({what})", fds.join(", "))
}

// ---- descriptor glue shared by the kinds and the child --------------------------------------

pub(crate) fn cstr(b: &[u8]) -> Result<CString> {
    CString::new(b)
        .with_context(|| format!("{:?} contains a NUL byte", b.escape_ascii().to_string()))
}

pub(crate) fn check(r: libc::c_int, what: impl FnOnce() -> String) -> Result<libc::c_int> {
    if r < 0 {
        bail!("{}: {}", what(), std::io::Error::last_os_error());
    }
    Ok(r)
}

/// Takes ownership of a descriptor returned by a system call.
pub(crate) fn own(fd: RawFd) -> OwnedFd {
    // SAFETY: callers pass descriptors they just got and nobody else closes.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// A duplicate of `fd` at the lowest free number ≥ `base`, close-on-exec.
pub(crate) fn dup_at_least(fd: RawFd, base: RawFd) -> Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor we own.
    let r = check(
        unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, base) },
        || format!("duplicating fd {fd}"),
    )?;
    Ok(own(r))
}

/// open(2) with `flags` (plus O_CLOEXEC; creation flags never), returning an owned descriptor.
pub(crate) fn open_path(path: &[u8], flags: u32) -> Result<OwnedFd> {
    let c = cstr(path)?;
    let flags = flags as i32 & !(libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL) | libc::O_CLOEXEC;
    // SAFETY: open with a valid NUL-terminated path.
    let fd = check(unsafe { libc::open(c.as_ptr(), flags, 0) }, || {
        format!("opening {}", String::from_utf8_lossy(path))
    })?;
    Ok(own(fd))
}

/// A new description of the file behind `fd` (through /proc/self/fd), with `flags`.
pub(crate) fn reopen(fd: RawFd, flags: u32) -> Result<OwnedFd> {
    open_path(format!("/proc/self/fd/{fd}").as_bytes(), flags)
}

pub(crate) fn seek(fd: RawFd, pos: u64) -> Result<()> {
    // SAFETY: lseek on a descriptor we hold; ESPIPE (not seekable) and EBADF (O_PATH) are fine.
    let r = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_SET) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::ESPIPE) | Some(libc::EBADF)) {
            bail!("seeking fd {fd} to {pos}: {e}");
        }
    }
    Ok(())
}

/// Sets the status flags (O_NONBLOCK, O_APPEND…) of the description behind `fd`.
pub(crate) fn set_status_flags(fd: RawFd, flags: u32) -> Result<()> {
    // SAFETY: F_SETFL on a descriptor we hold; the kernel ignores the access mode bits.
    check(
        unsafe { libc::fcntl(fd, libc::F_SETFL, flags as libc::c_int) },
        || format!("setting the flags of fd {fd}"),
    )
    .map(drop)
}

pub(crate) fn write_all(fd: RawFd, mut data: &[u8]) -> Result<()> {
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
