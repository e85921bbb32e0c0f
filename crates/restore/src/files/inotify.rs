//! inotify instances, each watch under its old number. The kernel numbers a new watch one
//! past the last it gave (it never reuses a number at once), so the numbers between two
//! watches are used up by adding and removing a stand-in watch (on a directory none of the
//! real watches is on) until the next number is the one wanted.

use super::{check, set_status_flags, Open, OpenCx};
use anyhow::{bail, Result};
use nix::errno::Errno;
use stasis_image::model::*;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

pub(crate) struct Inotify;
pub(crate) static INOTIFY: Inotify = Inotify;

fn add(fd: &OwnedFd, path: &[u8], mask: u32) -> Result<i32> {
    let c = super::cstr(path)?;
    // SAFETY: inotify_add_watch reads the path; returns a watch number.
    let r = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), mask) };
    check(Errno::result(r), || {
        format!("watching {}", String::from_utf8_lossy(path))
    })
}

impl Open for Inotify {
    fn open(&self, d: &FileDesc, _: &mut OpenCx) -> Result<OwnedFd> {
        let FileKind::Inotify { watches } = &d.kind else {
            unreachable!("dispatched by kind")
        };
        // SAFETY: inotify_init1 takes flags; on success the descriptor is ours.
        let raw = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        let fd = check(Errno::result(raw), || "inotify_init1".into())?;
        // SAFETY: a fresh descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let stand_in = ["/", "/proc", "/sys", "/dev", "/tmp", "/etc"]
            .into_iter()
            .find(|p| {
                std::fs::metadata(p).is_ok_and(|m| !watches.iter().any(|w| w.inode == m.ino()))
            });
        let mut last = 0;
        for w in watches {
            while last + 1 < w.wd {
                let Some(dir) = stand_in else {
                    bail!("no directory to stand in for watch numbers below {}", w.wd);
                };
                last = add(&fd, dir.as_bytes(), libc::IN_ACCESS)?;
                // SAFETY: removes the watch just added.
                let r = unsafe { libc::inotify_rm_watch(fd.as_raw_fd(), last) };
                check(Errno::result(r), || "removing a stand-in watch".into())?;
            }
            let got = add(&fd, w.path.as_bytes(), w.mask)?;
            if got != w.wd {
                bail!(
                    "watch {} came back as number {got} ({} is watched twice?)",
                    w.wd,
                    w.path
                );
            }
            last = got;
        }
        // Removing a watch queues IN_IGNORED for it: the stand-ins' must not reach the
        // process (nor does anything it had queued itself: see the dump).
        set_status_flags(&fd, d.flags | libc::O_NONBLOCK as u32)?;
        let mut buf = [0u8; 4096];
        loop {
            match nix::unistd::read(&fd, &mut buf) {
                Ok(n) if n > 0 => {}
                Ok(_) | Err(Errno::EAGAIN) => break,
                Err(e) => bail!("draining the stand-ins' events: {e}"),
            }
        }
        set_status_flags(&fd, d.flags)?;
        Ok(fd)
    }
}
