//! Pipes: each end is a description; the data buffered in the pipe is saved once per pipe,
//! read without consuming it. A pipe whose other end is outside the process can only come
//! back on the standard descriptors, taken over from the restoring stasis (as a shell job's
//! terminal is); anywhere else it is refused, since a fresh pipe would have nobody at the
//! other end.

use super::{append_padded, Cx, Kind, Probe};
use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, SpliceFFlags};
use stasis_image::model::*;
use stasis_image::PageWriter;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};

pub(crate) struct Pipe;
pub(crate) static PIPE: Pipe = Pipe;

impl Kind for Pipe {
    fn claims(&self, p: &Probe) -> bool {
        p.file_type() == libc::S_IFIFO && p.link.starts_with(b"pipe:[")
    }

    fn dump(&self, p: &Probe, cx: &mut Cx) -> Result<FileKind> {
        let inode = p.meta.ino();
        if p.flags & libc::O_ACCMODE as u32 == libc::O_RDWR as u32 {
            // Opened again through /proc for reading and writing: both ends in one description.
            bail!(
                "fd {} of pid {} is a pipe open for reading and writing at once; not supported yet",
                p.fd,
                p.pid
            );
        }
        if cx.files.pipe(inode).is_none() {
            let (data_off, len, size) = contents(&p.proc_path, cx.pages).with_context(|| {
                format!(
                    "reading the buffered data of pipe fd {} of pid {}",
                    p.fd, p.pid
                )
            })?;
            cx.files.pipes.push(PipeBuf {
                inode,
                data_off,
                len,
                size,
            });
        }
        Ok(FileKind::Pipe {
            inode,
            inherit: None,
        })
    }
}

/// (read end, write end) of a pipe description with these flags.
pub(crate) fn ends(flags: u32) -> (bool, bool) {
    match flags & libc::O_ACCMODE as u32 {
        a if a == libc::O_RDONLY as u32 => (true, false),
        a if a == libc::O_WRONLY as u32 => (false, true),
        _ => (true, true),
    }
}

/// Marks the descriptions of pipes with an end outside the dumped processes as taken over
/// from the restoring stasis's standard descriptor of the same number, or refuses. `internal`:
/// pipes (by inode) with a read end and a write end among the dumped processes.
pub(crate) fn settle_outside_ends(
    pid: i32,
    files: &mut Files,
    internal: &std::collections::HashSet<u64>,
) -> Result<()> {
    let mut inodes: Vec<u64> = files
        .descs
        .iter()
        .filter_map(|d| match d.kind {
            FileKind::Pipe { inode, .. } => Some(inode),
            _ => None,
        })
        .collect();
    inodes.sort_unstable();
    inodes.dedup();
    for inode in inodes {
        let of_pipe =
            |d: &FileDesc| matches!(d.kind, FileKind::Pipe { inode: i, .. } if i == inode);
        if internal.contains(&inode) {
            continue;
        }
        for d in files.descs.iter_mut().filter(|d| of_pipe(d)) {
            let lowest = files
                .fds
                .iter()
                .filter(|f| f.desc == d.id)
                .map(|f| f.fd)
                .min();
            match lowest {
                Some(fd @ 0..=2) => {
                    d.kind = FileKind::Pipe {
                        inode,
                        inherit: Some(fd),
                    }
                }
                _ => bail!(
                    "fd {} of pid {pid} is one end of a pipe whose other end is outside the dumped processes; only the standard descriptors 0-2 of such a pipe can be taken over on restore",
                    lowest.unwrap_or(-1)
                ),
            }
        }
    }
    Ok(())
}

/// The bytes buffered in a pipe, read without consuming them: open another reader on the same
/// pipe through /proc, and `tee` its contents into a pipe of our own.
pub(crate) fn contents(
    proc_fd: &std::path::Path,
    pages: &mut PageWriter,
) -> Result<(u64, u64, u32)> {
    let src = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(proc_fd)
        .with_context(|| format!("opening {}", proc_fd.display()))?;
    let size = match nix::fcntl::fcntl(&src, FcntlArg::F_GETPIPE_SZ) {
        Ok(size) => size,
        Err(e) => bail!("F_GETPIPE_SZ: {}", std::io::Error::from(e)),
    };
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)?;
    // Make it as large as the source so tee can copy it all.
    let _ = nix::fcntl::fcntl(&w, FcntlArg::F_SETPIPE_SZ(size));
    // tee copies without consuming.
    let n = match nix::fcntl::tee(&src, &w, size as usize, SpliceFFlags::SPLICE_F_NONBLOCK) {
        Ok(n) => n,
        // An empty pipe.
        Err(Errno::EAGAIN) => return Ok((0, 0, size as u32)),
        Err(e) => bail!("tee: {}", std::io::Error::from(e)),
    };
    let mut data = vec![0u8; n];
    let mut got = 0;
    while got < data.len() {
        let k = nix::unistd::read(&r, &mut data[got..])?;
        if k == 0 {
            break;
        }
        got += k;
    }
    data.truncate(got);
    let (off, len) = append_padded(pages, &data)?;
    Ok((off, len, size as u32))
}
