//! Character devices that hold no state of their own (`/dev/null`, `/dev/zero`, `/dev/full`,
//! `/dev/random`, `/dev/urandom`): opened again by path, the device number checked. Any other
//! device (a tun interface, `/dev/fuse`, `/dev/kmsg` with its read position…) would come back
//! as a fresh, different device: refused.

use super::{Cx, Kind, Probe};
use anyhow::{bail, Result};
use stasis_image::model::*;
use std::os::unix::fs::MetadataExt;

pub(crate) struct CharDev;
pub(crate) static CHARDEV: CharDev = CharDev;

/// (major, minor) of the stateless memory devices.
const STATELESS: &[(u32, u32)] = &[(1, 3), (1, 5), (1, 7), (1, 8), (1, 9)];

impl Kind for CharDev {
    fn claims(&self, p: &Probe) -> bool {
        p.file_type() == libc::S_IFCHR && p.link.starts_with(b"/")
    }

    fn dump(&self, p: &Probe, _: &mut Cx) -> Result<FileKind> {
        let rdev = p.meta.rdev();
        let (major, minor) = (libc::major(rdev), libc::minor(rdev));
        if !STATELESS.contains(&(major, minor)) {
            bail!(
                "fd {} of pid {} is the device {} ({major}:{minor}), whose state would not come back; not supported yet",
                p.fd,
                p.pid,
                p.link
            );
        }
        Ok(FileKind::CharDev {
            path: p.link.clone(),
            rdev,
        })
    }
}
