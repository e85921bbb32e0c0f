//! Mapping every dumped VMA in the new task and filling its pages from pages.img: by the
//! restorer's own `pread` into the mapping, or — for private anonymous memory, when the new
//! task has a userfaultfd — by the host (`fill.rs`), between the plan that registers the
//! mapping with the userfaultfd and the plan that unregisters it.

use crate::fds::Helpers;
use crate::plan::{Arg::V, Plan, SYS_MMAP};
use anyhow::{Context, Result};
use stasis_abi::{EXPECT_ANY, EXPECT_ARG0, EXPECT_ARG4, EXPECT_OK, EXPECT_PREAD_ALL};
use stasis_image::model::*;
use stasis_image::PAGE_SIZE;

const PAGE: u64 = PAGE_SIZE as u64;
const MADV_POPULATE_WRITE: u64 = 23;
use stasis_sys::uffd::{UFFDIO_REGISTER, UFFDIO_REGISTER_MODE_MISSING, UFFDIO_UNREGISTER};

/// How the pages of a VMA get their contents.
#[derive(Clone, Copy)]
pub(crate) enum Fill {
    /// The restorer reads them from pages.img.
    Pread,
    /// The host copies them in through this userfaultfd (a descriptor number in the task).
    Uffd(i32),
}

/// Whether `v` is filled by the host through a userfaultfd (private anonymous memory with
/// dumped pages), given one.
pub(crate) fn host_fills(v: &Vma, fill: Fill) -> bool {
    matches!(fill, Fill::Uffd(_)) && matches!(v.backing, Backing::Anon) && !v.pages.is_empty()
}

pub(crate) fn map_vma(p: &mut Plan, v: &Vma, h: &Helpers, fill: Fill) -> Result<()> {
    let len = v.end - v.start;
    if host_fills(v, fill) {
        return map_for_host_fill(p, v, fill);
    }
    let needs_fill = !v.pages.is_empty();
    let prot = v.prot as u64
        | if needs_fill {
            libc::PROT_WRITE as u64
        } else {
            0
        };
    let mut flags = libc::MAP_FIXED_NOREPLACE as u64;
    if v.growsdown {
        flags |= libc::MAP_GROWSDOWN as u64;
    }
    let what = format!("map {:#x}-{:#x} {}", v.start, v.end, v.name);
    match &v.backing {
        Backing::Vdso { .. } => return Ok(()),
        Backing::Anon => {
            flags |= (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
            p.op(
                SYS_MMAP,
                [V(v.start), V(len), V(prot), V(flags), V(u64::MAX), V(0)],
                EXPECT_ARG0,
                what,
            );
        }
        Backing::AnonShared { id, offset } if h.shm.contains_key(id) => {
            // Shared with other processes of the tree: the one object the restoring stasis
            // made and filled, mapped from its descriptor; nothing to fill here.
            let fd = h.shm[id];
            flags |= libc::MAP_SHARED as u64;
            p.op(
                SYS_MMAP,
                [
                    V(v.start),
                    V(len),
                    V(v.prot as u64),
                    V(flags),
                    V(fd as u64),
                    V(*offset),
                ],
                EXPECT_ARG0,
                format!("{what} (shared memory {id} of the tree)"),
            );
            return Ok(());
        }
        Backing::AnonShared { id, offset } => {
            // A further view of a shared object already mapped: duplicate that mapping
            // (mremap with old size 0), so both views stay one object, as they were.
            let first =
                p.shm.get(id).copied().filter(|&(_, off, flen)| {
                    *id != 0 && *offset >= off && offset + len <= off + flen
                });
            if let Some((fstart, foff, _)) = first {
                let from = fstart + (offset - foff);
                let dup = (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64;
                p.op(
                    libc::SYS_mremap,
                    [V(from), V(0), V(len), V(dup), V(v.start), V(0)],
                    EXPECT_ARG4,
                    format!("{what} (another view of shared object {id})"),
                );
                p.op(
                    libc::SYS_mprotect,
                    [V(v.start), V(len), V(prot), V(0), V(0), V(0)],
                    EXPECT_OK,
                    format!("protect the view at {:#x}", v.start),
                );
            } else {
                flags |= (libc::MAP_SHARED | libc::MAP_ANONYMOUS) as u64;
                p.op(
                    SYS_MMAP,
                    [V(v.start), V(len), V(prot), V(flags), V(u64::MAX), V(0)],
                    EXPECT_ARG0,
                    what,
                );
                if *id != 0 {
                    p.shm.entry(*id).or_insert((v.start, *offset, len));
                }
            }
        }
        Backing::File { path, offset, .. } => {
            let fd = h
                .map_fd(v)
                .with_context(|| format!("no helper fd for {path}"))?;
            flags |= if v.shared {
                libc::MAP_SHARED
            } else {
                libc::MAP_PRIVATE
            } as u64;
            p.op(
                SYS_MMAP,
                [
                    V(v.start),
                    V(len),
                    V(prot),
                    V(flags),
                    V(fd as u64),
                    V(*offset),
                ],
                EXPECT_ARG0,
                what,
            );
        }
    }
    for r in &v.pages {
        if r.src != 0 {
            // Only the host's fill reads a parent's page file (the restorer holds one).
            anyhow::bail!(
                "the pages at {:#x} are in a parent image, which only a restore with userfaultfd fills (this kernel gave the new task none)",
                r.addr
            );
        }
        // Fault the destination in first, in one batch: far cheaper than taking one page
        // fault per 4 KiB inside the copy. Only the dumped pages: sparse memory stays sparse.
        // (Best effort: kernels before 5.14 lack MADV_POPULATE_WRITE; the read still works.)
        p.op(
            libc::SYS_madvise,
            [
                V(r.addr),
                V(r.pages * PAGE),
                V(MADV_POPULATE_WRITE),
                V(0),
                V(0),
                V(0),
            ],
            EXPECT_ANY,
            format!("populate {} pages at {:#x}", r.pages, r.addr),
        );
        p.op(
            0,
            [
                V(h.pages_fd as u64),
                V(r.addr),
                V(r.pages * PAGE),
                V(r.file_off),
                V(0),
                V(0),
            ],
            EXPECT_PREAD_ALL,
            format!("fill {} pages at {:#x}", r.pages, r.addr),
        );
    }
    if prot != v.prot as u64 {
        p.op(
            libc::SYS_mprotect,
            [V(v.start), V(len), V(v.prot as u64), V(0), V(0), V(0)],
            EXPECT_OK,
            format!("protect {:#x}-{:#x}", v.start, v.end),
        );
    }
    advise(p, v);
    Ok(())
}

/// A private anonymous VMA mapped with its own protection (UFFDIO_COPY fills read-only and
/// PROT_NONE memory as well) and registered with the userfaultfd; `after_host_fill` follows.
fn map_for_host_fill(p: &mut Plan, v: &Vma, fill: Fill) -> Result<()> {
    let Fill::Uffd(uffd) = fill else {
        unreachable!("host_fills checked the fill")
    };
    let len = v.end - v.start;
    let mut flags = (libc::MAP_FIXED_NOREPLACE | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
    if v.growsdown {
        flags |= libc::MAP_GROWSDOWN as u64;
    }
    p.op(
        SYS_MMAP,
        [
            V(v.start),
            V(len),
            V(v.prot as u64),
            V(flags),
            V(u64::MAX),
            V(0),
        ],
        EXPECT_ARG0,
        format!("map {:#x}-{:#x} {}", v.start, v.end, v.name),
    );
    // struct uffdio_register: range (start, len), mode, ioctls (out).
    let reg = p.put_u64s(&[v.start, len, UFFDIO_REGISTER_MODE_MISSING, 0]);
    p.op(
        libc::SYS_ioctl,
        [V(uffd as u64), V(UFFDIO_REGISTER), reg, V(0), V(0), V(0)],
        EXPECT_OK,
        format!("register {:#x}-{:#x} for the host's fill", v.start, v.end),
    );
    Ok(())
}

/// After the host filled `v`: the userfaultfd lets go of it (a page never dumped must fault
/// in as zeroes again, not wait for a fill), then its madvise and mlock state. `lazy`: it
/// stays registered, for the lazy server, which lets go of it when every page is in.
pub(crate) fn after_host_fill(p: &mut Plan, v: &Vma, fill: Fill, lazy: bool) {
    let Fill::Uffd(uffd) = fill else {
        return;
    };
    if lazy {
        advise(p, v);
        return;
    }
    let range = p.put_u64s(&[v.start, v.end - v.start]);
    p.op(
        libc::SYS_ioctl,
        [
            V(uffd as u64),
            V(UFFDIO_UNREGISTER),
            range,
            V(0),
            V(0),
            V(0),
        ],
        EXPECT_OK,
        format!("unregister {:#x}-{:#x}", v.start, v.end),
    );
    advise(p, v);
}

/// The madvise and mlock state of the VMA. What changes behaviour (fork, core dumps, locking)
/// must take; what only tunes (huge pages, merging) is best effort, as kernels differ.
fn advise(p: &mut Plan, v: &Vma) {
    const ADVICE: &[(u32, u64, bool, &str)] = &[
        (
            ADVICE_DONTFORK,
            libc::MADV_DONTFORK as u64,
            true,
            "MADV_DONTFORK",
        ),
        (
            ADVICE_WIPEONFORK,
            libc::MADV_WIPEONFORK as u64,
            true,
            "MADV_WIPEONFORK",
        ),
        (
            ADVICE_DONTDUMP,
            libc::MADV_DONTDUMP as u64,
            true,
            "MADV_DONTDUMP",
        ),
        (
            ADVICE_HUGEPAGE,
            libc::MADV_HUGEPAGE as u64,
            false,
            "MADV_HUGEPAGE",
        ),
        (
            ADVICE_NOHUGEPAGE,
            libc::MADV_NOHUGEPAGE as u64,
            false,
            "MADV_NOHUGEPAGE",
        ),
        (
            ADVICE_MERGEABLE,
            libc::MADV_MERGEABLE as u64,
            false,
            "MADV_MERGEABLE",
        ),
    ];
    let len = v.end - v.start;
    for &(bit, advice, must, name) in ADVICE {
        if v.advice & bit != 0 {
            p.op(
                libc::SYS_madvise,
                [V(v.start), V(len), V(advice), V(0), V(0), V(0)],
                if must { EXPECT_OK } else { EXPECT_ANY },
                format!("{name} {:#x}-{:#x}", v.start, v.end),
            );
        }
    }
    if v.advice & ADVICE_LOCKED != 0 {
        p.op(
            libc::SYS_mlock,
            [V(v.start), V(len), V(0), V(0), V(0), V(0)],
            EXPECT_OK,
            format!("mlock {:#x}-{:#x}", v.start, v.end),
        );
    }
}
