//! Named pipes (FIFOs): either end, or both, opened again by path; the data the FIFO holds is
//! saved once per FIFO, read without consuming it (as a pipe's). A FIFO that another process
//! also has open — outside the dump, or another process of the tree — is refused: the data
//! in it is not this process's alone (the other may read it, or keep it, while this one is
//! away).

use super::{Cx, Kind, Probe};
use anyhow::{bail, Context, Result};
use stasis_image::model::*;
use std::os::unix::fs::MetadataExt;

pub(crate) struct Fifo;
pub(crate) static FIFO: Fifo = Fifo;

impl Kind for Fifo {
    fn claims(&self, p: &Probe) -> bool {
        p.file_type() == libc::S_IFIFO && p.link.starts_with(b"/")
    }

    fn dump(&self, p: &Probe, cx: &mut Cx) -> Result<FileKind> {
        let (dev, inode) = (p.dev(), p.meta.ino());
        if p.is_deleted() {
            bail!(
                "fd {} of pid {} is a FIFO whose name was removed ({}); not supported yet",
                p.fd,
                p.pid,
                p.link
            );
        }
        if cx.files.fifo(dev, inode).is_none() {
            if let Some(other) = other_holder(p.pid, p.meta.dev(), inode) {
                bail!(
                    "fd {} of pid {} is the FIFO {}, which pid {other} also has open; not supported yet",
                    p.fd,
                    p.pid,
                    p.link
                );
            }
            let (data_off, len, size) = super::pipe::contents(&p.proc_path, cx.pages)
                .with_context(|| format!("reading the data in FIFO {}", p.link))?;
            cx.files.fifos.push(FifoBuf {
                dev,
                inode,
                data_off,
                len,
                size,
            });
        }
        Ok(FileKind::Fifo {
            path: p.link.clone(),
            dev,
            inode,
        })
    }
}

/// A process other than `pid` with a descriptor of the FIFO (st_dev, inode), if any.
fn other_holder(pid: i32, st_dev: u64, inode: u64) -> Option<i32> {
    let procs = std::fs::read_dir("/proc").ok()?;
    for e in procs.flatten() {
        let Some(other) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if other == pid {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(format!("/proc/{other}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::metadata(fd.path()).is_ok_and(|m| m.dev() == st_dev && m.ino() == inode) {
                return Some(other);
            }
        }
    }
    None
}
