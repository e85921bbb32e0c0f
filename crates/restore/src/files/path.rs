//! A file with a name: opened again by that name, with the dumped flags, at the dumped offset.
//! A different file found under the name (replaced since the dump) is opened only with the
//! restored process's own rights (`open_identified`).

use super::{open_identified, seek, Open, OpenCx};
use anyhow::Result;
use stasis_image::model::*;
use std::os::fd::OwnedFd;

pub(crate) struct Path;
pub(crate) static PATH: Path = Path;

impl Open for Path {
    fn open(&self, d: &FileDesc, _: &mut OpenCx) -> Result<OwnedFd> {
        let FileKind::Path { path, dev, inode } = &d.kind else {
            unreachable!("dispatched by kind")
        };
        let fd = open_identified(path.as_bytes(), d.flags, *dev, *inode)?;
        seek(&fd, d.pos)?;
        Ok(fd)
    }
}
