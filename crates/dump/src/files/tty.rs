//! Terminals. A shell job's (`--shell-job`): the terminal on the standard descriptors is taken
//! over from the restoring stasis (its own terminal), further descriptions of it are opened
//! again through that one, and its modes (termios) are saved and set again once the process is
//! back. `/dev/tty` (the controlling terminal) is opened again by name. A pseudo-terminal
//! whose master is among the dumped processes (as `script`, tmux or expect make them) comes
//! back whole: its master is dumped here with the pty's modes, window size and queues (see
//! `stasis_sys::pty`), its slave descriptions are told from a shell job's terminal once the
//! whole tree is known (`settle_ptys`). Any other terminal is refused.

use super::{Cx, Kind, Probe};
use anyhow::{bail, Context, Result};
use stasis_image::model::*;
use stasis_sys::pty;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};

pub(crate) struct Tty;
pub(crate) static TTY: Tty = Tty;

/// `/dev/tty`: whatever the opener's controlling terminal is.
pub(crate) const CTTY: (u32, u32) = (5, 0);
const PTMX: (u32, u32) = (5, 2);

fn is_tty_major(major: u32) -> bool {
    matches!(major, 4 | 5 | 136..=143)
}

impl Kind for Tty {
    fn claims(&self, p: &Probe) -> bool {
        p.file_type() == libc::S_IFCHR && is_tty_major(libc::major(p.meta.rdev()))
    }

    fn dump(&self, p: &Probe, cx: &mut Cx) -> Result<FileKind> {
        let rdev = p.meta.rdev();
        let dev = (libc::major(rdev), libc::minor(rdev));
        if dev == PTMX || p.link.starts_with(b"/dev/pts/ptmx") {
            return master(p, cx);
        }
        let termios = if dev == CTTY {
            Vec::new()
        } else {
            modes(p)?.to_vec()
        };
        Ok(FileKind::Tty {
            path: p.link.clone(),
            rdev,
            inherit: None,
            termios,
        })
    }
}

/// The terminal's modes, read through a copy of the process's own descriptor (opening the
/// device again could make it stasis's controlling terminal), or else through /proc.
fn modes(p: &Probe) -> Result<[u8; stasis_sys::fs::KERNEL_TERMIOS_LEN]> {
    let copy = stasis_sys::fs::pidfd_open(p.pid)
        .and_then(|pidfd| stasis_sys::fs::pidfd_getfd(&pidfd, p.fd));
    let t = match copy {
        Ok(fd) => stasis_sys::fs::tty_get_attr(fd.as_raw_fd()),
        Err(_) => {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
                .open(&p.proc_path)?;
            stasis_sys::fs::tty_get_attr(f.as_raw_fd())
        }
    };
    t.map_err(|e| {
        anyhow::anyhow!(
            "reading the modes of terminal fd {} ({}) of pid {}: {e}",
            p.fd,
            p.link,
            p.pid
        )
    })
}

/// Decides which terminal descriptions are taken over from the restoring stasis (those on the
/// standard descriptors), and refuses terminals that are not the shell job's.
pub(crate) fn settle_shell_job(pid: i32, shell_job: bool, files: &mut Files) -> Result<()> {
    let first_tty = files.fds.iter().find(|f| {
        files
            .desc(f.desc)
            .is_some_and(|d| matches!(d.kind, FileKind::Tty { .. }))
    });
    let Some(first) = first_tty else {
        return Ok(());
    };
    if !shell_job {
        bail!(
            "pid {pid} has a terminal open on fd {} (a shell job); dump it with --shell-job",
            first.fd
        );
    }
    let fds = files.fds.clone();
    let mut job_terminals = Vec::new();
    for d in files.descs.iter_mut() {
        if let FileKind::Tty { rdev, inherit, .. } = &mut d.kind {
            let lowest = fds.iter().filter(|f| f.desc == d.id).map(|f| f.fd).min();
            if let Some(fd @ 0..=2) = lowest {
                *inherit = Some(fd);
                job_terminals.push(*rdev);
            }
        }
    }
    for d in &files.descs {
        if let FileKind::Tty {
            path,
            rdev,
            inherit: None,
            ..
        } = &d.kind
        {
            let dev = (libc::major(*rdev), libc::minor(*rdev));
            if dev != CTTY && !job_terminals.contains(rdev) {
                let fd = fds.iter().find(|f| f.desc == d.id).map_or(-1, |f| f.fd);
                bail!(
                    "fd {fd} of pid {pid} is a terminal ({path}) other than the one of its shell job; not supported yet"
                );
            }
        }
    }
    Ok(())
}

/// The pty number of a slave device (`/dev/pts/N`: majors 136-143), if `rdev` is one.
pub(crate) fn slave_index(rdev: u64) -> Option<u32> {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    (136..=143)
        .contains(&major)
        .then(|| (major - 136) * 256 + minor)
}

/// A pty master: its pty's state, read through a copy of the process's descriptor and a slave
/// of stasis's own. Its queues are taken out and put back at once: whatever becomes of the
/// dump, the process finds its pty as it was.
fn master(p: &Probe, cx: &mut Cx) -> Result<FileKind> {
    let what = || format!("fd {} of pid {} (a pty master)", p.fd, p.pid);
    let m = stasis_sys::fs::pidfd_open(p.pid)
        .and_then(|pidfd| stasis_sys::fs::pidfd_getfd(&pidfd, p.fd))
        .map_err(std::io::Error::from)
        .with_context(|| format!("copying {}", what()))?;
    let m = m.as_raw_fd();
    let index = pty::index(m)
        .map_err(std::io::Error::from)
        .with_context(what)?;
    if pty::locked(m)
        .map_err(std::io::Error::from)
        .with_context(what)?
    {
        bail!(
            "fd {} of pid {} is the master of pty {index}, whose slave is still locked (unlockpt not called); not supported yet",
            p.fd,
            p.pid
        );
    }
    if !slave_held_open(index) {
        // Opening and closing a slave of stasis's own would be its last close: the master
        // would see the other side hang up.
        bail!(
            "fd {} of pid {} is the master of pty {index}, whose slave no process holds open; not supported yet",
            p.fd,
            p.pid
        );
    }
    let state = (|| -> Result<PtyState> {
        let slave = pty::open_slave(m, libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC)?;
        let s = slave.as_raw_fd();
        let termios = stasis_sys::fs::tty_get_attr(s)?;
        let packet = pty::packet(m)?;
        let q = pty::take(m, s, packet)?;
        pty::put_back(m, s, &termios, packet, &q).with_context(|| {
            format!(
                "putting the queued data back into pty {index} ({} bytes in, {} out: the process may have lost them)",
                q.input.len(),
                q.output.len()
            )
        })?;
        let (input_off, input_len) = super::append_padded(cx.pages, &q.input)?;
        let (output_off, output_len) = super::append_padded(cx.pages, &q.output)?;
        Ok(PtyState {
            index,
            termios: termios.to_vec(),
            winsize: pty::winsize(m)?,
            packet,
            slave_exclusive: pty::exclusive(s)?,
            input_off,
            input_len,
            lines: q
                .lines
                .iter()
                .map(|l| PtyLine {
                    len: l.len as u32,
                    eof: l.eof,
                })
                .collect(),
            output_off,
            output_len,
            session: pty::session(m)?,
            foreground: pty::foreground(m)?,
        })
    })()
    .with_context(|| format!("reading pty {index} through {}", what()))?;
    cx.files.ptys.push(state);
    Ok(FileKind::Pty {
        index,
        master: true,
    })
}

/// Whether some process (stasis aside) has a descriptor of slave `index` open.
fn slave_held_open(index: u32) -> bool {
    let want = format!("/dev/pts/{index}");
    let me = std::process::id().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    for e in procs.flatten() {
        let name = e.file_name();
        let Some(n) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if n == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(e.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == want.as_str()) {
                return true;
            }
        }
    }
    false
}
