//! epoll instances. The instance is made while the files are opened; its registrations are
//! added once every descriptor is at its number, since epoll knows a watched file by its
//! descriptor number. Level-triggered readiness is the kernel's to recompute; an edge-triggered
//! watch whose file is ready reports that once more after the restore.

use super::{check, own, Open, OpenCx};
use anyhow::{bail, Result};
use stasis_image::model::*;
use std::os::fd::{OwnedFd, RawFd};

pub(crate) struct Epoll;
pub(crate) static EPOLL: Epoll = Epoll;

impl Open for Epoll {
    fn open(&self, _: &FileDesc, _: &mut OpenCx) -> Result<OwnedFd> {
        // SAFETY: epoll_create1 returns a new descriptor we own.
        Ok(own(check(
            unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) },
            || "epoll_create1".into(),
        )?))
    }

    fn after_place(&self, d: &FileDesc, epfd: RawFd) -> Result<()> {
        let FileKind::Epoll { watches } = &d.kind else {
            unreachable!("dispatched by kind")
        };
        for w in watches {
            let mut ev = libc::epoll_event {
                events: w.events,
                u64: w.data,
            };
            // SAFETY: epoll_ctl with a valid event; the watched number is the placed fd.
            let r = unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, w.fd, &mut ev) };
            if r < 0 {
                bail!(
                    "adding fd {} to epoll: {}",
                    w.fd,
                    std::io::Error::last_os_error()
                );
            }
        }
        Ok(())
    }
}
