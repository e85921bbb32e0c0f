//! Shared anonymous memory (`MAP_SHARED|MAP_ANONYMOUS`, inherited across fork) that several
//! processes of the tree map: one object again, made by the restoring stasis and filled from
//! every process's dumped pages of it (each dumped what the object held; views may cover
//! different parts), then handed to each process as a descriptor it maps. The object is a
//! real shared anonymous one (opened through /proc/self/map_files), so it shows as
//! `/dev/zero (deleted)` in the restored processes, as before.

use anyhow::{bail, Context, Result};
use stasis_image::model::*;
use stasis_image::{Image, PAGE_SIZE};
use std::collections::{HashMap, HashSet};
use std::os::fd::{OwnedFd, RawFd};

/// The objects (by id, their inode at the dump) that more than one process maps.
pub(crate) fn shared_by_several(imgs: &[&Image]) -> HashSet<u64> {
    let mut seen: HashMap<u64, usize> = HashMap::new();
    for img in imgs {
        let mine: HashSet<u64> = img
            .mm
            .vmas
            .iter()
            .filter_map(|v| match v.backing {
                Backing::AnonShared { id, .. } if id != 0 => Some(id),
                _ => None,
            })
            .collect();
        for id in mine {
            *seen.entry(id).or_default() += 1;
        }
    }
    seen.into_iter()
        .filter(|&(_, n)| n > 1)
        .map(|(id, _)| id)
        .collect()
}

/// The largest object a restore makes (an image may not make us map more).
const MAX_OBJECT: u64 = 1 << 40;

/// Makes object `id` and fills it; returns a descriptor of it at a number ≥ `base`.
pub(crate) fn make(id: u64, imgs: &[&Image], base: RawFd) -> Result<OwnedFd> {
    let views: Vec<(&Image, &Vma, u64)> = imgs
        .iter()
        .flat_map(|img| {
            img.mm.vmas.iter().filter_map(move |v| match v.backing {
                Backing::AnonShared { id: i, offset } if i == id => Some((*img, v, offset)),
                _ => None,
            })
        })
        .collect();
    let size = views
        .iter()
        .map(|(_, v, off)| off.saturating_add(v.end - v.start))
        .max()
        .unwrap_or(0);
    if size == 0 || size > MAX_OBJECT || size % PAGE_SIZE as u64 != 0 {
        bail!("shared memory {id}: an object of {size} bytes cannot be made");
    }
    // SAFETY: a fresh shared anonymous mapping of our own, unmapped below.
    let at = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if at == libc::MAP_FAILED {
        bail!(
            "shared memory {id}: mmap of {size} bytes: {}",
            std::io::Error::last_os_error()
        );
    }
    let unmap = Unmap(at, size as usize);
    for (img, v, offset) in &views {
        for r in &v.pages {
            let len = r.pages * PAGE_SIZE as u64;
            // Within the view: `load` checked every run lies inside its VMA.
            let obj_off = offset + (r.addr - v.start);
            // SAFETY: obj_off + len <= offset + (v.end - v.start) <= size: inside our mapping.
            let dst = unsafe {
                std::slice::from_raw_parts_mut((at as *mut u8).add(obj_off as usize), len as usize)
            };
            img.pages.read_at(r.file_off, dst).with_context(|| {
                format!("filling shared memory {id} from pid {}", img.inventory.pid)
            })?;
        }
    }
    let path = format!(
        "/proc/self/map_files/{:x}-{:x}",
        at as u64,
        at as u64 + size
    );
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {path} (shared memory {id})"))?;
    drop(unmap);
    crate::files::dup_at_least(&f, base)
}

struct Unmap(*mut libc::c_void, usize);

impl Drop for Unmap {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        unsafe { libc::munmap(self.0, self.1) };
    }
}
