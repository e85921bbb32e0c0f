//! epoll instances. The instance is made while the files are opened; its registrations are
//! added once every descriptor is at its number, since epoll knows a watched file by its
//! descriptor number. Level-triggered readiness is the kernel's to recompute; an edge-triggered
//! watch whose file is ready reports that once more after the restore.

use super::{check, Open, OpenCx};
use anyhow::{bail, Result};
use nix::sys::epoll::{Epoll as Instance, EpollCreateFlags};
use stasis_image::model::*;
use std::os::fd::{BorrowedFd, OwnedFd};

pub(crate) struct Epoll;
pub(crate) static EPOLL: Epoll = Epoll;

impl Open for Epoll {
    fn open(&self, _: &FileDesc, _: &mut OpenCx) -> Result<OwnedFd> {
        let ep = check(Instance::new(EpollCreateFlags::EPOLL_CLOEXEC), || {
            "epoll_create1".into()
        })?;
        Ok(ep.0)
    }

    fn after_place(&self, d: &FileDesc, epfd: BorrowedFd<'_>) -> Result<()> {
        let FileKind::Epoll { watches } = &d.kind else {
            unreachable!("dispatched by kind")
        };
        for w in watches {
            // The watched number is the placed fd.
            if let Err(e) = stasis_sys::fs::epoll_add(epfd, w.fd, w.events, w.data) {
                bail!("adding fd {} to epoll: {}", w.fd, std::io::Error::from(e));
            }
        }
        Ok(())
    }
}
