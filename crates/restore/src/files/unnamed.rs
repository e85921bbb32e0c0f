//! Files without a name — deleted while in use, or memfds — are recreated once per file from
//! their saved contents; every description (and mapping) of one is opened from that one file,
//! so they stay one file. A deleted file is recreated under its old path (so /proc shows the
//! same "path (deleted)") and unlinked at once; when another file has taken that name, an
//! unnamed file (O_TMPFILE) in the same directory stands in. A memfd gets its name, contents
//! and seals back.

use super::{check, cstr, open_path, reopen, seek, write_all, Open, OpenCx};
use anyhow::{bail, Context, Result};
use nix::fcntl::{FcntlArg, OFlag, SealFlag};
use nix::sys::memfd::MFdFlags;
use nix::sys::stat::Mode;
use stasis_image::model::*;
use std::os::fd::OwnedFd;

pub(crate) struct UnnamedKind;
pub(crate) static UNNAMED: UnnamedKind = UnnamedKind;

impl Open for UnnamedKind {
    fn open(&self, d: &FileDesc, cx: &mut OpenCx) -> Result<OwnedFd> {
        let FileKind::Unnamed { dev, inode } = d.kind else {
            unreachable!("dispatched by kind")
        };
        let file = cx.unnamed_fd(dev, inode)?;
        let fd = reopen(file, d.flags)?;
        seek(&fd, d.pos)?;
        Ok(fd)
    }
}

/// Makes the file (dev, inode) again, read-write, filled with its saved contents.
pub(crate) fn recreate(cx: &OpenCx, dev: u64, inode: u64) -> Result<OwnedFd> {
    recreate_from(cx.img, cx.data, dev, inode)
}

/// `recreate`, from an image and its file data.
pub(crate) fn recreate_from(
    img: &stasis_image::Image,
    data: &super::FileData,
    dev: u64,
    inode: u64,
) -> Result<OwnedFd> {
    let Some(u) = img.files.unnamed(dev, inode) else {
        bail!("no saved contents for unnamed file {inode}");
    };
    let contents = data
        .unnamed
        .get(&(dev, inode))
        .map_or(&[][..], Vec::as_slice);
    match &u.what {
        Unnamed::Deleted { path } => {
            let file = create_deleted(path.as_bytes(), u.mode)?;
            write_all(&file, contents)?;
            Ok(file)
        }
        Unnamed::Memfd { name, seals } => memfd(name.as_bytes(), *seals, u.mode, contents),
    }
}

fn create_deleted(path: &[u8], mode: u32) -> Result<OwnedFd> {
    let c = cstr(path)?;
    // O_EXCL never touches an existing file.
    let created = nix::fcntl::open(
        c.as_c_str(),
        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR | OFlag::O_CLOEXEC,
        Mode::from_bits_retain(mode),
    );
    let file = if let Ok(file) = created {
        // Removing the name just created.
        let _ = nix::unistd::unlink(c.as_c_str());
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
    // O_CREAT's mode was filtered by the umask.
    let _ = nix::sys::stat::fchmod(&file, Mode::from_bits_retain(mode));
    Ok(file)
}

use std::os::unix::ffi::OsStrExt;

fn memfd(name: &[u8], seals: u32, mode: u32, contents: &[u8]) -> Result<OwnedFd> {
    let c = cstr(name)?;
    // A memfd made without MFD_ALLOW_SEALING carries F_SEAL_SEAL and nothing else.
    let sealable = seals != SealFlag::F_SEAL_SEAL.bits() as u32;
    let mut flags = MFdFlags::MFD_CLOEXEC;
    if sealable {
        flags |= MFdFlags::MFD_ALLOW_SEALING;
    }
    let fd = check(nix::sys::memfd::memfd_create(c.as_c_str(), flags), || {
        format!("memfd_create({})", String::from_utf8_lossy(name))
    })?;
    write_all(&fd, contents)?;
    let _ = nix::sys::stat::fchmod(&fd, Mode::from_bits_retain(mode));
    if sealable && seals != 0 {
        // The dumped seals as they are.
        let seals = SealFlag::from_bits_retain(seals as i32);
        check(nix::fcntl::fcntl(&fd, FcntlArg::F_ADD_SEALS(seals)), || {
            format!("sealing memfd {}", String::from_utf8_lossy(name))
        })?;
    }
    Ok(fd)
}
