//! Which descriptors the new task takes over from the restoring stasis, and the helper
//! descriptors it opens for the plan.

use anyhow::Result;
use stasis_image::model::*;
use stasis_image::Image;
use std::collections::BTreeMap;

/// The fds the restoring stasis passes on by number: terminals, and stdio ends of pipes whose
/// other side was outside the process (the image holds no read end, or no write end).
pub fn inherited(img: &Image) -> Vec<i32> {
    img.files
        .fds
        .iter()
        .filter(|f| is_inherited(img, f))
        .map(|f| f.fd)
        .collect()
}

pub fn is_inherited(img: &Image, f: &Fd) -> bool {
    match f.kind {
        FdKind::Tty { .. } => true,
        FdKind::Pipe { id, .. } if f.fd <= 2 => {
            let ends = |mode: u32| {
                img.files.fds.iter().any(|g| {
                    matches!(g.kind, FdKind::Pipe { id: i, .. } if i == id)
                        && g.flags & libc::O_ACCMODE as u32 == mode
                })
            };
            !(ends(libc::O_RDONLY as u32) && ends(libc::O_WRONLY as u32))
        }
        _ => false,
    }
}

/// Descriptors the child opens for the plan, at numbers chosen here (above every fd the
/// image uses), and closed by the plan's last operations.
pub struct Helpers {
    pub base: i32,
    pub pages_fd: i32,
    pub exe_fd: i32,
    pub ready_fd: i32,
    pub hold_fd: i32,
    /// (path, writable) → fd, for file mappings.
    pub files: BTreeMap<(String, bool), i32>,
    /// Where inherited stdio/tty fds wait before they are put at their numbers.
    pub inherit_base: i32,
}

impl Helpers {
    pub fn new(img: &Image) -> Result<Helpers> {
        let max_fd = img.files.fds.iter().map(|f| f.fd).max().unwrap_or(2);
        let base = (max_fd + 16).max(100);
        let mut files = BTreeMap::new();
        let mut next = base + 8;
        for v in &img.mm.vmas {
            if let Backing::File { path, .. } = &v.backing {
                let writable = v.shared && v.prot & libc::PROT_WRITE as u32 != 0;
                files.entry((path.clone(), writable)).or_insert_with(|| {
                    next += 1;
                    next - 1
                });
            }
        }
        Ok(Helpers {
            base,
            pages_fd: base,
            exe_fd: base + 1,
            ready_fd: base + 2,
            hold_fd: base + 3,
            inherit_base: next + 8,
            files,
        })
    }

    /// The highest fd number the child will use.
    pub fn max_fd(&self) -> i32 {
        self.inherit_base + 3
    }
}

pub(crate) fn same_file(a: &str, b: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}
