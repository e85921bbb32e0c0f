//! Terminals of a shell job. Descriptions on the standard descriptors are taken over from the
//! restoring stasis (the engine does that); a further description of the same terminal is
//! opened again through the taken-over one; `/dev/tty` is opened by name (the task's
//! controlling terminal). The modes are set by the host once the process is back.

use super::{open_path, reopen, Open, OpenCx};
use anyhow::{bail, Result};
use stasis_image::model::*;
use std::os::fd::{AsRawFd, OwnedFd};

pub(crate) struct Tty;
pub(crate) static TTY: Tty = Tty;

const CTTY: (u32, u32) = (5, 0);

/// The taken-over description of the terminal `rdev`, if one is.
fn job_terminal(cx: &OpenCx, rdev: u64) -> Option<u32> {
    cx.img.files.descs.iter().find_map(|d| match d.kind {
        FileKind::Tty {
            rdev: r,
            inherit: Some(_),
            ..
        } if r == rdev => Some(d.id),
        _ => None,
    })
}

impl Open for Tty {
    fn after(&self, d: &FileDesc, cx: &OpenCx) -> Vec<u32> {
        match d.kind {
            FileKind::Tty { rdev, .. } => job_terminal(cx, rdev).into_iter().collect(),
            _ => Vec::new(),
        }
    }

    fn open(&self, d: &FileDesc, cx: &mut OpenCx) -> Result<OwnedFd> {
        let FileKind::Tty { path, rdev, .. } = &d.kind else {
            unreachable!("dispatched by kind")
        };
        if (libc::major(*rdev), libc::minor(*rdev)) == CTTY {
            return open_path(path.as_bytes(), d.flags | libc::O_NOCTTY as u32);
        }
        let Some(id) = job_terminal(cx, *rdev) else {
            bail!("{path} is not the shell job's terminal");
        };
        let Some(job) = cx.staged.get(&id) else {
            bail!("the shell job's terminal is not open yet");
        };
        reopen(job.as_raw_fd(), d.flags | libc::O_NOCTTY as u32)
    }
}
