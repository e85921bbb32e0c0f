//! A regular file or directory that has a name: opened again by that name on restore.

use super::{Cx, Kind, Probe};
use anyhow::Result;
use stasis_image::model::*;

pub(crate) struct Path;
pub(crate) static PATH: Path = Path;

impl Kind for Path {
    fn claims(&self, p: &Probe) -> bool {
        matches!(p.file_type(), libc::S_IFREG | libc::S_IFDIR)
            && p.link.starts_with(b"/")
            && !p.is_deleted()
    }

    fn dump(&self, p: &Probe, _: &mut Cx) -> Result<FileKind> {
        use std::os::unix::fs::MetadataExt;
        Ok(FileKind::Path {
            path: p.link.clone(),
            dev: p.dev(),
            inode: p.meta.ino(),
        })
    }
}
