//! The descriptors the new task is given besides the dumped ones: the helpers the plan uses
//! (pages.img, the exe, each mapped file, the handshake pipes) at numbers chosen here, above
//! every number the image uses, and the restoring stasis's own descriptors it takes over.

use anyhow::{bail, Result};
use stasis_image::model::*;
use stasis_image::Image;
use std::collections::BTreeMap;

/// A file the plan maps: by (dev, inode), opened by `path` unless it is an unnamed file, for
/// writing when a shared mapping of it is or may become writable.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct MapFile {
    pub dev: u64,
    pub inode: u64,
    pub writable: bool,
    pub path: Bytes,
}

impl MapFile {
    pub fn of(v: &Vma) -> Option<MapFile> {
        match &v.backing {
            Backing::File {
                path, dev, inode, ..
            } => Some(MapFile {
                dev: *dev,
                inode: *inode,
                // A shared mapping needs its file open for writing to be writable, now
                // (PROT_WRITE) or later (VM_MAYWRITE: mprotect may make it so).
                writable: v.shared && (v.prot & libc::PROT_WRITE as u32 != 0 || v.maywrite),
                path: path.clone(),
            }),
            _ => None,
        }
    }
}

/// Descriptors the child opens for the plan, at numbers chosen here (above every fd the
/// image uses), and closed by the plan's last operations.
pub struct Helpers {
    pub pages_fd: i32,
    pub exe_fd: i32,
    pub ready_fd: i32,
    pub hold_fd: i32,
    /// The task's userfaultfd, for the host's fill of its anonymous memory (if the kernel
    /// lets the child make one).
    pub uffd_fd: i32,
    /// Every file the plan maps → the descriptor it maps it from.
    pub maps: BTreeMap<MapFile, i32>,
    /// Shared anonymous memory shared with other processes of the tree: its object (by id)
    /// → the descriptor the plan maps it from (made once by the restoring stasis).
    pub shm: BTreeMap<u64, i32>,
    /// Where the child stages descriptions before it puts them at their numbers.
    pub stage_base: i32,
}

impl Helpers {
    /// `tree_shm`: the shared anonymous objects several processes of the tree map.
    pub fn new(img: &Image, tree_shm: &std::collections::HashSet<u64>) -> Result<Helpers> {
        let max_fd = img.files.fds.iter().map(|f| f.fd).max().unwrap_or(2);
        let base = (max_fd + 16).max(100);
        let mut maps = BTreeMap::new();
        let mut shm = BTreeMap::new();
        let mut next = base + 5;
        for v in &img.mm.vmas {
            if let Some(m) = MapFile::of(v) {
                maps.entry(m).or_insert_with(|| {
                    next += 1;
                    next - 1
                });
            }
            if let Backing::AnonShared { id, .. } = v.backing {
                if tree_shm.contains(&id) {
                    shm.entry(id).or_insert_with(|| {
                        next += 1;
                        next - 1
                    });
                }
            }
        }
        Ok(Helpers {
            pages_fd: base,
            exe_fd: base + 1,
            ready_fd: base + 2,
            hold_fd: base + 3,
            uffd_fd: base + 4,
            stage_base: next + 8,
            maps,
            shm,
        })
    }

    /// Every helper number (the child keeps these open; the plan closes them at its end).
    pub fn numbers(&self) -> Vec<i32> {
        let mut v = vec![
            self.pages_fd,
            self.exe_fd,
            self.ready_fd,
            self.hold_fd,
            self.uffd_fd,
        ];
        v.extend(self.maps.values());
        v.extend(self.shm.values());
        v
    }

    /// The descriptor limit the child needs while it stages every description.
    pub fn fd_limit(&self, img: &Image) -> u64 {
        (self.stage_base as u64) + img.files.descs.len() as u64 + 64
    }

    pub fn map_fd(&self, v: &Vma) -> Option<i32> {
        MapFile::of(v).and_then(|m| self.maps.get(&m).copied())
    }
}

/// Checks that every descriptor the new task takes over from this stasis is open and of the
/// kind the image expects: a terminal for a shell job's terminal, a pipe for an outside pipe.
pub fn check_lent(img: &Image) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    for d in &img.files.descs {
        let (n, want_tty) = match d.kind {
            FileKind::Tty {
                inherit: Some(n), ..
            } => (n, true),
            FileKind::Pipe {
                inherit: Some(n), ..
            } => (n, false),
            _ => continue,
        };
        let what = if want_tty {
            "a terminal (a shell job's)"
        } else {
            "a pipe leading outside the process"
        };
        let ft = std::fs::metadata(format!("/proc/self/fd/{n}")).map(|m| m.file_type());
        let is_tty = || {
            // SAFETY: n is one of stasis's own descriptors, found open just above; nothing
            // closes it while isatty asks about it.
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(n) };
            matches!(nix::unistd::isatty(fd), Ok(true))
        };
        let ok = match ft {
            Ok(t) if want_tty => t.is_char_device() && is_tty(),
            Ok(t) => t.is_fifo(),
            Err(_) => false,
        };
        if !ok {
            bail!(
                "image {}: fd {n} was {what}, taken over from stasis's own fd {n}, which is {}",
                img.dir.path().display(),
                if ft.is_err() {
                    "not open"
                } else {
                    "of another kind"
                }
            );
        }
    }
    Ok(())
}

/// Whether two paths name the same file.
pub(crate) fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}
