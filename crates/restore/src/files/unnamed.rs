//! Files without a name — deleted while in use, or memfds — are recreated once per file from
//! their saved contents; every description (and mapping) of one is opened from that one file,
//! so they stay one file. A deleted file is recreated under its old path (so /proc shows the
//! same "path (deleted)") and unlinked at once; when another file has taken that name, an
//! unnamed file (O_TMPFILE) in the same directory stands in. A memfd gets its name, contents
//! and seals back.

use super::{check, cstr, open_path, own, reopen, seek, write_all, Open, OpenCx};
use anyhow::{bail, Context, Result};
use stasis_image::model::*;
use std::os::fd::{AsRawFd, OwnedFd};

pub(crate) struct UnnamedKind;
pub(crate) static UNNAMED: UnnamedKind = UnnamedKind;

impl Open for UnnamedKind {
    fn open(&self, d: &FileDesc, cx: &mut OpenCx) -> Result<OwnedFd> {
        let FileKind::Unnamed { dev, inode } = d.kind else {
            unreachable!("dispatched by kind")
        };
        let file = cx.unnamed_fd(dev, inode)?;
        let fd = reopen(file, d.flags)?;
        seek(fd.as_raw_fd(), d.pos)?;
        Ok(fd)
    }
}

/// Makes the file (dev, inode) again, read-write, filled with its saved contents.
pub(crate) fn recreate(cx: &OpenCx, dev: u64, inode: u64) -> Result<OwnedFd> {
    let Some(u) = cx.img.files.unnamed(dev, inode) else {
        bail!("no saved contents for unnamed file {inode}");
    };
    let contents = cx
        .data
        .unnamed
        .get(&(dev, inode))
        .map_or(&[][..], Vec::as_slice);
    match &u.what {
        Unnamed::Deleted { path } => {
            let file = create_deleted(path.as_bytes(), u.mode)?;
            write_all(file.as_raw_fd(), contents)?;
            Ok(file)
        }
        Unnamed::Memfd { name, seals } => memfd(name.as_bytes(), *seals, u.mode, contents),
    }
}

fn create_deleted(path: &[u8], mode: u32) -> Result<OwnedFd> {
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
        let p = std::path::Path::new(std::ffi::OsStr::from_bytes(path));
        let dir = p
            .parent()
            .map_or(&b"/tmp"[..], |d| d.as_os_str().as_bytes());
        open_path(dir, (libc::O_TMPFILE | libc::O_RDWR) as u32).with_context(|| {
            format!(
                "creating an unnamed file in {} for deleted {}",
                String::from_utf8_lossy(dir),
                String::from_utf8_lossy(path)
            )
        })?
    };
    // SAFETY: fchmod on our file: O_CREAT's mode was filtered by the umask.
    unsafe { libc::fchmod(file.as_raw_fd(), mode as libc::mode_t) };
    Ok(file)
}

use std::os::unix::ffi::OsStrExt;

fn memfd(name: &[u8], seals: u32, mode: u32, contents: &[u8]) -> Result<OwnedFd> {
    let c = cstr(name)?;
    // A memfd made without MFD_ALLOW_SEALING carries F_SEAL_SEAL and nothing else.
    let sealable = seals != libc::F_SEAL_SEAL as u32;
    let flags = libc::MFD_CLOEXEC | if sealable { libc::MFD_ALLOW_SEALING } else { 0 };
    // SAFETY: memfd_create with a valid name.
    let fd = own(check(
        unsafe { libc::memfd_create(c.as_ptr(), flags) },
        || format!("memfd_create({})", String::from_utf8_lossy(name)),
    )?);
    write_all(fd.as_raw_fd(), contents)?;
    // SAFETY: fchmod and F_ADD_SEALS on our own memfd.
    unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) };
    if sealable && seals != 0 {
        // SAFETY: as above.
        check(
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals as libc::c_int) },
            || format!("sealing memfd {}", String::from_utf8_lossy(name)),
        )?;
    }
    Ok(fd)
}
