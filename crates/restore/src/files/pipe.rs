//! Pipes: a new pipe holding the saved data; the description pipe(2) made of each end is that
//! end, descriptions opened later through /proc are opened again the same way, so each keeps
//! its own flags (one may be non-blocking and another not, as dumped). A description taken over from
//! the restoring stasis (`inherit`) never gets here.

use super::{check, dup_at_least, reopen, set_status_flags, write_all, Open, OpenCx};
use anyhow::{bail, Result};
use nix::fcntl::{FcntlArg, OFlag};
use stasis_image::model::*;
use std::os::fd::{AsRawFd, OwnedFd};

pub(crate) struct Pipe;
pub(crate) static PIPE: Pipe = Pipe;

/// The two ends of a pipe made for the restore, and whether each has been given out.
pub(crate) struct Pair {
    ends: [OwnedFd; 2],
    given: [bool; 2],
}

impl Open for Pipe {
    fn open(&self, d: &FileDesc, cx: &mut OpenCx) -> Result<OwnedFd> {
        let FileKind::Pipe { inode, .. } = d.kind else {
            unreachable!("dispatched by kind")
        };
        if !cx.pipes.contains_key(&inode) {
            let pair = new_pipe(cx, inode)?;
            cx.pipes.insert(inode, pair);
        }
        let Some(pair) = cx.pipes.get_mut(&inode) else {
            bail!("pipe {inode} vanished");
        };
        let end = match d.flags & libc::O_ACCMODE as u32 {
            a if a == libc::O_RDONLY as u32 => 0,
            a if a == libc::O_WRONLY as u32 => 1,
            _ => bail!("a pipe end open for reading and writing is not supported"),
        };
        // pipe(2) makes its ends without O_LARGEFILE, open(2) (of /proc/PID/fd/N) always
        // with it: a description without it is the pipe's own end, one with it was opened
        // again, and is opened again here too.
        let own_end = d.flags & libc::O_LARGEFILE as u32 == 0;
        let fd = if own_end && !pair.given[end] {
            pair.given[end] = true;
            dup_at_least(&pair.ends[end], cx.stage_base)?
        } else {
            reopen(pair.ends[end].as_raw_fd(), d.flags)?
        };
        set_status_flags(&fd, d.flags)?;
        Ok(fd)
    }
}

fn new_pipe(cx: &OpenCx, inode: u64) -> Result<Pair> {
    let (r, w) = check(nix::unistd::pipe2(OFlag::O_CLOEXEC), || "pipe2".into())?;
    let (r, w) = (cx.stage(r)?, cx.stage(w)?);
    if let Some(buf) = cx.img.files.pipe(inode) {
        if buf.size > 0 {
            // The dumped buffer size, best effort.
            let _ = nix::fcntl::fcntl(&w, FcntlArg::F_SETPIPE_SZ(buf.size as i32));
        }
    }
    if let Some(data) = cx.data.pipes.get(&inode) {
        write_all(&w, data)?;
    }
    Ok(Pair {
        ends: [r, w],
        given: [false, false],
    })
}
