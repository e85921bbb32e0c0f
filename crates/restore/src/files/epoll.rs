//! epoll instances. The instance is made while the files are opened; its registrations are
//! added once every descriptor is at its number, since epoll knows a watched file by its
//! descriptor number. Level-triggered readiness is the kernel's to recompute; an edge-triggered
//! watch whose file is ready reports that once more after the restore.

use super::{check, Open, OpenCx};
use anyhow::{bail, Result};
use nix::sys::epoll::{Epoll as Instance, EpollCreateFlags};
use stasis_image::model::*;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};

pub(crate) struct Epoll;
pub(crate) static EPOLL: Epoll = Epoll;

impl Open for Epoll {
    fn open(&self, _: &FileDesc, _: &mut OpenCx) -> Result<OwnedFd> {
        let ep = check(Instance::new(EpollCreateFlags::EPOLL_CLOEXEC), || {
            "epoll_create1".into()
        })?;
        Ok(ep.0)
    }

    fn after_place(&self, d: &FileDesc, epfd: BorrowedFd<'_>, cx: &OpenCx) -> Result<()> {
        let FileKind::Epoll { watches } = &d.kind else {
            unreachable!("dispatched by kind")
        };
        for w in watches {
            match w.file {
                None => add(epfd, w)?,
                Some(id) => {
                    let Some(file) = cx.staged.get(&id) else {
                        bail!("the file epoll watches at fd {} was not opened", w.fd);
                    };
                    register_at(epfd, w, file, cx)?;
                }
            }
        }
        Ok(())
    }
}

fn add(epfd: BorrowedFd<'_>, w: &EpollWatch) -> Result<()> {
    // The watched number is the placed fd.
    if let Err(e) = stasis_sys::fs::epoll_add(epfd, w.fd, w.events, w.data) {
        bail!("adding fd {} to epoll: {}", w.fd, std::io::Error::from(e));
    }
    Ok(())
}

/// Registers `file` under the number `w.fd`, where the process has another file now (or
/// none): the file is put there for the time of `epoll_ctl`, then whatever was there goes
/// back. The registration stays, as it did in the dumped process, while the file is open.
fn register_at(epfd: BorrowedFd<'_>, w: &EpollWatch, file: &OwnedFd, cx: &OpenCx) -> Result<()> {
    let placed = cx.img.files.fds.iter().find(|f| f.fd == w.fd);
    let saved = match placed {
        // SAFETY: w.fd is a placed descriptor of the image, open until the process runs.
        Some(_) => Some(super::dup_at_least(
            unsafe { BorrowedFd::borrow_raw(w.fd) },
            cx.stage_base,
        )?),
        None => None,
    };
    check(stasis_sys::fs::dup_onto(file, w.fd, true), || {
        format!("putting the watched file at fd {}", w.fd)
    })?;
    let added = add(epfd, w);
    match (saved, placed) {
        (Some(s), Some(f)) => check(stasis_sys::fs::dup_onto(&s, w.fd, f.cloexec), || {
            format!("putting fd {} back", w.fd)
        })?,
        _ => {
            // Nothing was there: the number is free again.
            // SAFETY: w.fd is the duplicate made just above, ours to close.
            drop(unsafe { OwnedFd::from_raw_fd(w.fd) });
        }
    }
    added
}
