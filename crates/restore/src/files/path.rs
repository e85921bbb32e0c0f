//! A file with a name: opened again by that name, with the dumped flags, at the dumped offset.
//! A different file found under the name (replaced since the dump) is reported in the log.

use super::{open_path, seek, Open, OpenCx};
use anyhow::Result;
use stasis_image::model::*;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

pub(crate) struct Path;
pub(crate) static PATH: Path = Path;

impl Open for Path {
    fn open(&self, d: &FileDesc, _: &mut OpenCx) -> Result<OwnedFd> {
        let FileKind::Path { path, dev, inode } = &d.kind else {
            unreachable!("dispatched by kind")
        };
        let fd = open_path(path.as_bytes(), d.flags)?;
        seek(&fd, d.pos)?;
        if let Ok(m) = std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd())) {
            if (kdev(libc::major(m.dev()), libc::minor(m.dev())), m.ino()) != (*dev, *inode) {
                tracing::warn!("{path} is not the file it was at the dump (another inode)");
            }
        }
        Ok(fd)
    }
}
