//! `eventfd`, with its counter and semaphore mode.

use super::{check, own, set_status_flags, write_all, Open, OpenCx};
use anyhow::Result;
use stasis_image::model::*;
use std::os::fd::{AsRawFd, OwnedFd};

pub(crate) struct EventFd;
pub(crate) static EVENTFD: EventFd = EventFd;

impl Open for EventFd {
    fn open(&self, d: &FileDesc, _: &mut OpenCx) -> Result<OwnedFd> {
        let FileKind::EventFd { count, semaphore } = d.kind else {
            unreachable!("dispatched by kind")
        };
        let flags = libc::EFD_CLOEXEC | if semaphore { libc::EFD_SEMAPHORE } else { 0 };
        // SAFETY: eventfd2 returns a new descriptor we own.
        let fd = own(check(unsafe { libc::eventfd(0, flags) }, || {
            "eventfd".into()
        })?);
        // The initial value of eventfd2 is 32 bits wide; the counter is 64: write it.
        if count > 0 {
            write_all(fd.as_raw_fd(), &count.to_ne_bytes())?;
        }
        set_status_flags(fd.as_raw_fd(), d.flags)?;
        Ok(fd)
    }
}
