//! Named pipes (FIFOs). The first description of a FIFO opens it for reading and writing at
//! once, without blocking (an anchor: with both ends held, no later open of it waits for a
//! partner), puts back the data it held if it is empty, and every description is then opened
//! through the anchor with its own flags. The anchor is closed with everything else stasis
//! holds before the process runs.

use super::{check, open_path, reopen, write_all, Open, OpenCx};
use anyhow::{bail, Context, Result};
use nix::fcntl::FcntlArg;
use stasis_image::model::*;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;

pub(crate) struct Fifo;
pub(crate) static FIFO: Fifo = Fifo;

impl Open for Fifo {
    fn open(&self, d: &FileDesc, cx: &mut OpenCx) -> Result<OwnedFd> {
        let FileKind::Fifo { path, dev, inode } = &d.kind else {
            unreachable!("dispatched by kind")
        };
        if !cx.fifos.contains_key(&(*dev, *inode)) {
            let anchor = open_path(path.as_bytes(), (libc::O_RDWR | libc::O_NONBLOCK) as u32)?;
            let meta = std::fs::metadata(format!("/proc/self/fd/{}", anchor.as_raw_fd()))
                .with_context(|| format!("stat of {path}"))?;
            if !meta.file_type().is_fifo() {
                bail!("{path} is no longer a FIFO");
            }
            if let Some(buf) = cx.img.files.fifo(*dev, *inode) {
                if buf.size > 0 {
                    let _ = nix::fcntl::fcntl(&anchor, FcntlArg::F_SETPIPE_SZ(buf.size as i32));
                }
                let held =
                    stasis_sys::sock::ioctl_int(&anchor, stasis_sys::sock::SIOCINQ).unwrap_or(0);
                if let Some(data) = cx.data.fifos.get(&(*dev, *inode)) {
                    // Nobody else had it open at the dump: what it holds now is someone's
                    // since; the saved data goes in only where nothing is.
                    if held == 0 {
                        write_all(&anchor, data)?;
                    }
                }
            }
            let anchor = cx.stage(anchor)?;
            cx.fifos.insert((*dev, *inode), anchor);
        }
        let Some(anchor) = cx.fifos.get(&(*dev, *inode)) else {
            bail!("FIFO {path} vanished");
        };
        let fd = reopen(anchor.as_raw_fd(), d.flags)?;
        check(
            nix::fcntl::fcntl(
                &fd,
                FcntlArg::F_SETFL(nix::fcntl::OFlag::from_bits_retain(d.flags as i32)),
            ),
            || "setting the FIFO's flags".into(),
        )?;
        Ok(fd)
    }
}
