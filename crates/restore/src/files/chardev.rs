//! A stateless character device, opened again by path; the device number must be the dumped one.

use super::{open_path, Open, OpenCx};
use anyhow::{bail, Result};
use stasis_image::model::*;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

pub(crate) struct CharDev;
pub(crate) static CHARDEV: CharDev = CharDev;

impl Open for CharDev {
    fn open(&self, d: &FileDesc, _: &mut OpenCx) -> Result<OwnedFd> {
        let FileKind::CharDev { path, rdev } = &d.kind else {
            unreachable!("dispatched by kind")
        };
        let fd = open_path(path.as_bytes(), d.flags | libc::O_NOCTTY as u32)?;
        let m = std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
        if m.rdev() != *rdev {
            bail!(
                "{path} is device {}:{} here, {}:{} at the dump",
                libc::major(m.rdev()),
                libc::minor(m.rdev()),
                libc::major(*rdev),
                libc::minor(*rdev)
            );
        }
        Ok(fd)
    }
}
