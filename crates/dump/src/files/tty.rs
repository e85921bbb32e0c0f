//! Terminals of a shell job (`--shell-job`): the terminal on the standard descriptors is taken
//! over from the restoring stasis (its own terminal), further descriptions of it are opened
//! again through that one, and its modes (termios) are saved and set again once the process is
//! back. `/dev/tty` (the controlling terminal) is opened again by name. Any other terminal —
//! a pseudo-terminal the program opened itself, or one it holds besides its own — is refused.

use super::{Cx, Kind, Probe};
use anyhow::{bail, Result};
use stasis_image::model::*;
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

    fn dump(&self, p: &Probe, _: &mut Cx) -> Result<FileKind> {
        let rdev = p.meta.rdev();
        let dev = (libc::major(rdev), libc::minor(rdev));
        if dev == PTMX || p.link.starts_with(b"/dev/pts/ptmx") {
            bail!(
                "fd {} of pid {} is a pseudo-terminal master ({}); ptys are not supported yet",
                p.fd,
                p.pid,
                p.link
            );
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
