//! Open files: every fd, what it refers to, its flags and offset; pipe buffers and deleted
//! files' contents go into pages.img.

use anyhow::{bail, Context, Result};
use stasis_image::model::*;
use stasis_image::{PageWriter, PAGE_SIZE};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};

pub(crate) fn collect_files(pid: i32, pages: &mut PageWriter) -> Result<Files> {
    let dir = format!("/proc/{pid}/fd");
    let mut fds: Vec<i32> = std::fs::read_dir(&dir)
        .with_context(|| format!("listing {dir}"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    let mut seen_pipes = std::collections::HashSet::new();
    let mut out = Vec::new();
    for fd in fds {
        let path = format!("{dir}/{fd}");
        let link = std::fs::read_link(&path)
            .with_context(|| format!("reading {path}"))?
            .to_string_lossy()
            .into_owned();
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
            .with_context(|| format!("reading fdinfo of fd {fd}"))?;
        let field = |k: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        let pos: u64 = field("pos:").parse().unwrap_or(0);
        let raw_flags = u32::from_str_radix(&field("flags:"), 8).unwrap_or(0);
        let cloexec = raw_flags & libc::O_CLOEXEC as u32 != 0;
        let flags = raw_flags & !(libc::O_CLOEXEC as u32);
        let meta = std::fs::metadata(&path)
            .with_context(|| format!("stat of fd {fd} ({link}) of pid {pid}"))?;
        let ft = meta.mode() & libc::S_IFMT;
        let kind = if let Some(rest) = link.strip_prefix("pipe:[") {
            let id: u64 = rest.trim_end_matches(']').parse().unwrap_or(meta.ino());
            let (data_off, len, size) = if seen_pipes.insert(id) {
                pipe_contents(&path, pages).with_context(|| {
                    format!("reading the buffered data of pipe fd {fd} of pid {pid}")
                })?
            } else {
                (0, 0, 0)
            };
            FdKind::Pipe {
                id,
                data_off,
                len,
                size,
            }
        } else if ft == libc::S_IFCHR {
            let major = libc::major(meta.rdev());
            if matches!(major, 4 | 5 | 136..=143) {
                FdKind::Tty { path: link.clone() }
            } else {
                FdKind::CharDev {
                    path: link.clone(),
                    rdev: meta.rdev(),
                }
            }
        } else if (ft == libc::S_IFREG || ft == libc::S_IFDIR) && link.starts_with('/') {
            if meta.nlink() == 0 {
                if ft != libc::S_IFREG {
                    bail!("fd {fd} of pid {pid}: a deleted directory; not supported");
                }
                let data = std::fs::read(&path)
                    .with_context(|| format!("reading deleted file behind fd {fd}"))?;
                let (data_off, len) = append_padded(pages, &data)?;
                FdKind::Deleted {
                    path: link.trim_end_matches(" (deleted)").to_string(),
                    data_off,
                    len,
                    mode: meta.mode() & 0o7777,
                }
            } else {
                FdKind::Path { path: link.clone() }
            }
        } else {
            bail!("fd {fd} of pid {pid} is {link}: this kind of file is not supported yet");
        };
        out.push(Fd {
            fd,
            flags,
            cloexec,
            pos,
            kind,
        });
    }
    Ok(Files { fds: out })
}

/// Appends `data` padded to whole pages; returns (file offset, unpadded length).
pub(crate) fn append_padded(pages: &mut PageWriter, data: &[u8]) -> Result<(u64, u64)> {
    if data.is_empty() {
        return Ok((0, 0));
    }
    let mut padded = data.to_vec();
    padded.resize(data.len().next_multiple_of(PAGE_SIZE), 0);
    Ok((pages.append(&padded)?, data.len() as u64))
}

/// The bytes buffered in a pipe, read without consuming them: open another reader on the same
/// pipe through /proc, and `tee` its contents into a pipe of our own.
fn pipe_contents(proc_fd: &str, pages: &mut PageWriter) -> Result<(u64, u64, u32)> {
    use std::os::fd::AsRawFd;
    let src = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(proc_fd)
        .with_context(|| format!("opening {proc_fd}"))?;
    // SAFETY: fcntl on a descriptor we own.
    let size = unsafe { libc::fcntl(src.as_raw_fd(), libc::F_GETPIPE_SZ) };
    if size < 0 {
        bail!("F_GETPIPE_SZ: {}", std::io::Error::last_os_error());
    }
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)?;
    // SAFETY: fcntl on our own pipe; make it as large as the source so tee can copy it all.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, size) };
    // SAFETY: tee between two pipe descriptors we hold; it copies without consuming.
    let n = unsafe {
        libc::tee(
            src.as_raw_fd(),
            w.as_raw_fd(),
            size as usize,
            libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EAGAIN) {
            bail!("tee: {e}");
        }
        return Ok((0, 0, size as u32));
    }
    let mut data = vec![0u8; n as usize];
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
