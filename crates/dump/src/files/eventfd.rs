//! `eventfd`: the counter and the semaphore mode, from fdinfo.

use super::{Cx, Kind, Probe};
use anyhow::{bail, Result};
use stasis_image::model::*;

pub(crate) struct EventFd;
pub(crate) static EVENTFD: EventFd = EventFd;

impl Kind for EventFd {
    fn claims(&self, p: &Probe) -> bool {
        p.link.as_bytes() == b"anon_inode:[eventfd]"
    }

    fn dump(&self, p: &Probe, _: &mut Cx) -> Result<FileKind> {
        let Some(count) = p
            .info_field("eventfd-count:")
            .and_then(|v| u64::from_str_radix(v, 16).ok())
        else {
            bail!(
                "fd {} of pid {}: the eventfd counter is not in fdinfo",
                p.fd,
                p.pid
            );
        };
        // Kernels before 6.7 do not say whether the eventfd counts as a semaphore.
        let Some(semaphore) = p.info_field("eventfd-semaphore:") else {
            bail!(
                "fd {} of pid {} is an eventfd, and this kernel does not tell whether it is a semaphore",
                p.fd,
                p.pid
            );
        };
        Ok(FileKind::EventFd {
            count,
            semaphore: semaphore == "1",
        })
    }
}
