//! `eventfd`, with its counter and semaphore mode.

use super::{check, set_status_flags, write_all, Open, OpenCx};
use anyhow::Result;
use nix::sys::eventfd::{EfdFlags, EventFd as Counter};
use stasis_image::model::*;
use std::os::fd::OwnedFd;

pub(crate) struct EventFd;
pub(crate) static EVENTFD: EventFd = EventFd;

impl Open for EventFd {
    fn open(&self, d: &FileDesc, _: &mut OpenCx) -> Result<OwnedFd> {
        let FileKind::EventFd { count, semaphore } = d.kind else {
            unreachable!("dispatched by kind")
        };
        let mut flags = EfdFlags::EFD_CLOEXEC;
        if semaphore {
            flags |= EfdFlags::EFD_SEMAPHORE;
        }
        let fd = OwnedFd::from(check(Counter::from_value_and_flags(0, flags), || {
            "eventfd".into()
        })?);
        // The initial value of eventfd2 is 32 bits wide; the counter is 64: write it.
        if count > 0 {
            write_all(&fd, &count.to_ne_bytes())?;
        }
        set_status_flags(&fd, d.flags)?;
        Ok(fd)
    }
}
