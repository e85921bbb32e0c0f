//! Files without a name: regular files deleted while open or mapped (a log rotated away, a
//! binary replaced by an upgrade) and memfds. Their contents are saved once per file (by
//! `(dev, inode)`), for every description and every mapping of it, so that after a restore a
//! write through one descriptor is still seen through the others and through the mappings.

use super::{append_file, Cx, Kind, Probe};
use anyhow::{Context, Result};
use stasis_image::model::*;
use stasis_image::PageWriter;
use std::os::unix::fs::MetadataExt;

pub(crate) struct UnnamedKind;
pub(crate) static UNNAMED: UnnamedKind = UnnamedKind;

const MEMFD_PREFIX: &[u8] = b"/memfd:";
/// The internal shmem mount memfds live on.
const SHMEM_DEV: (u32, u32) = (0, 1);

impl Kind for UnnamedKind {
    fn claims(&self, p: &Probe) -> bool {
        p.file_type() == libc::S_IFREG && p.link.starts_with(b"/") && p.is_deleted()
    }

    fn dump(&self, p: &Probe, cx: &mut Cx) -> Result<FileKind> {
        let (dev, inode) = (p.dev(), p.meta.ino());
        let memfd = p.link.starts_with(MEMFD_PREFIX)
            && (libc::major(p.meta.dev()), libc::minor(p.meta.dev())) == SHMEM_DEV;
        if cx.files.unnamed(dev, inode).is_none() {
            let u =
                save(&p.proc_path, &p.link, memfd, dev, inode, cx.pages).with_context(|| {
                    format!(
                        "saving the contents of fd {} ({}) of pid {}",
                        p.fd, p.link, p.pid
                    )
                })?;
            cx.files.unnamed.push(u);
        }
        Ok(FileKind::Unnamed { dev, inode })
    }
}

/// Reads the file through `opener` (a /proc magic link, which opens it without a name).
fn save(
    opener: &std::path::Path,
    link: &Bytes,
    memfd: bool,
    dev: u64,
    inode: u64,
    pages: &mut PageWriter,
) -> Result<UnnamedFile> {
    let mut f = std::fs::File::open(opener)?;
    let mode = f.metadata()?.mode() & 0o7777;
    let what = if memfd {
        // A memfd that cannot tell its seals is saved without any.
        let seals = nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_GET_SEALS).unwrap_or(0);
        let name = link.without_deleted();
        Unnamed::Memfd {
            name: Bytes::from(name.as_bytes().strip_prefix(MEMFD_PREFIX).unwrap_or(b"")),
            seals: seals.max(0) as u32,
        }
    } else {
        Unnamed::Deleted {
            path: link.without_deleted(),
        }
    };
    let (data_off, len) = append_file(pages, &mut f)?;
    Ok(UnnamedFile {
        dev,
        inode,
        what,
        mode,
        data_off,
        len,
    })
}

/// Deleted files and memfds that are mapped, read through /proc/PID/map_files (once per file;
/// one already saved for a descriptor is not saved again).
pub(crate) fn collect_mapped(
    pid: i32,
    vmas: &[stasis_proc::Vma],
    files: &mut Files,
    pages: &mut PageWriter,
) -> Result<()> {
    for v in vmas.iter().filter(|v| is_unnamed_mapping(v)) {
        let dev = kdev(v.dev.0, v.dev.1);
        if files.unnamed(dev, v.inode).is_some() {
            continue;
        }
        let opener = format!("/proc/{pid}/map_files/{:x}-{:x}", v.start, v.end);
        let memfd = v.name.starts_with(MEMFD_PREFIX) && v.dev == SHMEM_DEV;
        let u = save(
            std::path::Path::new(&opener),
            &Bytes(v.name.clone()),
            memfd,
            dev,
            v.inode,
            pages,
        )
        .with_context(|| format!("saving the contents of {v}, mapped by pid {pid}"))?;
        files.unnamed.push(u);
    }
    Ok(())
}

/// A mapping of a file that no longer has a name: a deleted file, or a memfd. (Shared
/// anonymous memory, also on the shmem mount, is `/dev/zero (deleted)`; SysV segments are
/// `/SYSV…`: neither is a file stasis recreates.)
pub(crate) fn is_unnamed_mapping(v: &stasis_proc::Vma) -> bool {
    v.inode != 0
        && v.name.starts_with(b"/")
        && v.name.ends_with(DELETED_SUFFIX)
        && (v.dev != SHMEM_DEV || v.name.starts_with(MEMFD_PREFIX))
}
