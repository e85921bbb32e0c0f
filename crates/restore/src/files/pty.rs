//! Pseudo-terminals the process had made: a new pty, numbered as the old one when that number
//! is free here, with the old one's modes, window size, queues (`stasis_sys::pty::put_back`),
//! exclusive and packet modes; the master description is the pty's own, each slave
//! description a new open of its slave. A pty used by several processes of a tree is made by
//! the restoring stasis (`open_shared`), one used by one process inside it.

use super::{check, set_status_flags, Open, OpenCx};
use anyhow::{bail, Context, Result};
use stasis_image::model::*;
use stasis_sys::pty;
use std::os::fd::{AsRawFd, OwnedFd};

pub(crate) struct Pty;
pub(crate) static PTY: Pty = Pty;

/// A pty made for the restore: its master, a slave of stasis's own (kept open until the
/// process's slaves are, so no last close hangs the pty up), and whether the master
/// description has been given out.
pub(crate) struct Made {
    master: OwnedFd,
    _slave: OwnedFd,
    given: bool,
}

/// What a pty is made from: its state and its two queues.
pub(crate) struct Source {
    pub state: PtyState,
    pub input: Vec<u8>,
    pub output: Vec<u8>,
}

impl Open for Pty {
    fn open(&self, d: &FileDesc, cx: &mut OpenCx) -> Result<OwnedFd> {
        let FileKind::Pty { index, master } = d.kind else {
            unreachable!("dispatched by kind")
        };
        if !cx.ptys.contains_key(&index) {
            let Some(src) = cx.pty_sources.remove(&index) else {
                bail!("pty {index}: its master's state is not in the image");
            };
            let mut made = make(&src)?;
            // Held to the end: in the staging range, like every descriptor the engine holds.
            made.master = cx.stage(made.master)?;
            made._slave = cx.stage(made._slave)?;
            cx.ptys.insert(index, made);
        }
        let Some(made) = cx.ptys.get_mut(&index) else {
            bail!("pty {index} vanished");
        };
        let fd = if master {
            if made.given {
                bail!("pty {index} has two master descriptions");
            }
            made.given = true;
            check(nix::unistd::dup(&made.master), || {
                format!("dup of pty {index}'s master")
            })?
        } else {
            // Access mode and the status flags the open takes; the rest set below.
            let flags = (d.flags as i32) & (libc::O_ACCMODE | libc::O_NONBLOCK) | libc::O_CLOEXEC;
            check(pty::open_slave(made.master.as_raw_fd(), flags), || {
                format!("opening the slave of pty {index}")
            })?
        };
        set_status_flags(&fd, d.flags)?;
        Ok(fd)
    }
}

fn make(src: &Source) -> Result<Made> {
    let st = &src.state;
    let old = st.index;
    let (master, index) = check(pty::open_numbered(old), || "opening /dev/ptmx".into())?;
    if index != old {
        tracing::warn!("pty {old} is taken on this machine: the process gets pty {index} instead");
    }
    let m = master.as_raw_fd();
    let slave = check(
        pty::open_slave(m, libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC),
        || format!("opening the slave of the new pty {index}"),
    )?;
    let Ok(termios) = <pty::Termios>::try_from(st.termios.as_slice()) else {
        bail!("pty {old}: its modes are {} bytes long", st.termios.len());
    };
    check(pty::set_winsize(m, st.winsize), || {
        format!("setting the window size of pty {index}")
    })?;
    let queues = pty::Queues {
        input: src.input.clone(),
        lines: st
            .lines
            .iter()
            .map(|l| pty::Line {
                len: l.len as usize,
                eof: l.eof,
            })
            .collect(),
        output: src.output.clone(),
    };
    pty::put_back(m, slave.as_raw_fd(), &termios, st.packet, &queues)
        .with_context(|| format!("giving pty {index} its modes and queued data"))?;
    if st.slave_exclusive {
        check(pty::set_exclusive(slave.as_raw_fd()), || {
            format!("TIOCEXCL on pty {index}")
        })?;
    }
    Ok(Made {
        master,
        _slave: slave,
        given: false,
    })
}
