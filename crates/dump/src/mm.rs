//! The address space: every VMA with its backing, the pages that must be dumped (chosen from
//! pagemap), their contents copied into pages.img, the mm fields and auxv, the vDSO record
//! (or the original vDSO behind a proxy an earlier restore left).

use crate::vdso_report::VdsoInfo;
use anyhow::{bail, Context, Result};
use stasis_abi::TaskState;
use stasis_image::model::*;
use stasis_image::{PageWriter, PAGE_SIZE};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::time::{Duration, Instant};

const PM_PRESENT: u64 = 1 << 63;

const PM_SWAPPED: u64 = 1 << 62;

const PM_FILE: u64 = 1 << 61;

/// Pages are read and written in chunks of at most this many bytes: bounds peak memory.
const CHUNK: usize = 1 << 20;

/// What smaps `VmFlags` says about one VMA.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct VmFlags {
    growsdown: bool,
    maywrite: bool,
    advice: u32,
    /// hugetlbfs memory (`ht`), device memory (`io`, `pf`), userfaultfd-registered for
    /// missing or minor faults (`um`, `ui`): kinds stasis does not restore.
    unsupported: Option<&'static str>,
    /// Registered for write protection (`uw`): by stasis's memory tracker, if the process
    /// has one (`track.rs`), else something stasis does not restore.
    uffd_wp: bool,
}

fn parse_vm_flags(flags: &str) -> VmFlags {
    let mut f = VmFlags::default();
    for flag in flags.split_whitespace() {
        match flag {
            "gd" => f.growsdown = true,
            "mw" => f.maywrite = true,
            "hg" => f.advice |= ADVICE_HUGEPAGE,
            "nh" => f.advice |= ADVICE_NOHUGEPAGE,
            "dc" => f.advice |= ADVICE_DONTFORK,
            "wf" => f.advice |= ADVICE_WIPEONFORK,
            "dd" => f.advice |= ADVICE_DONTDUMP,
            "mg" => f.advice |= ADVICE_MERGEABLE,
            "lo" => f.advice |= ADVICE_LOCKED,
            "ht" => f.unsupported = Some("hugetlbfs memory"),
            "io" | "pf" => f.unsupported = Some("a device mapping (VM_IO/VM_PFNMAP)"),
            "um" | "ui" => f.unsupported = Some("memory registered with userfaultfd"),
            "uw" => f.uffd_wp = true,
            _ => {}
        }
    }
    f
}

/// smaps `VmFlags` of every VMA, by start address.
fn vm_flags(pid: i32) -> Result<VmFlagsMap> {
    let raw = std::fs::read(format!("/proc/{pid}/smaps"))
        .with_context(|| format!("reading /proc/{pid}/smaps"))?;
    let mut out = std::collections::HashMap::new();
    let mut current = None;
    for line in raw.split(|&b| b == b'\n') {
        if let Some(flags) = line.strip_prefix(b"VmFlags:") {
            if let Some(start) = current.take() {
                out.insert(start, parse_vm_flags(&String::from_utf8_lossy(flags)));
            }
        } else if let Some(range) = line.split(|&b| b == b' ').next() {
            // A VMA's first line starts with its range; other lines with a "Key:".
            if let Some(dash) = range.iter().position(|&b| b == b'-') {
                if let Some(start) = std::str::from_utf8(&range[..dash])
                    .ok()
                    .and_then(|h| u64::from_str_radix(h, 16).ok())
                {
                    current = Some(start);
                }
            }
        }
    }
    Ok(out)
}

/// smaps flags by VMA start, read once per dump (smaps walks every page table: not cheap).
pub(crate) type VmFlagsMap = std::collections::HashMap<u64, VmFlags>;

/// Everything about the memory map that would make the dump refuse, checked before the
/// process is touched: every VMA must have a backing stasis restores faithfully. Returns the
/// smaps flags, which the memory map of the process keeps while it is frozen. `tracked`: the
/// process has a memory tracker of stasis's, whose registrations (`uw`) are no obstacle.
pub(crate) fn preflight(pid: i32, tracked: bool) -> Result<VmFlagsMap> {
    let vmas = stasis_proc::maps(pid)?;
    let flags = vm_flags(pid)?;
    let mem = File::open(format!("/proc/{pid}/mem"))
        .with_context(|| format!("opening /proc/{pid}/mem"))?;
    let proxy = find_proxy(pid, &vmas, &mem);
    for v in &vmas {
        let backing = backing_of(pid, v, proxy.as_ref())?;
        // The kernel's own special mappings (vvar is VM_PFNMAP) are rebuilt, not restored.
        let special = matches!(backing, None | Some(Backing::Vdso { .. }));
        let what = flags.get(&v.start).and_then(|f| {
            f.unsupported.or((f.uffd_wp && !tracked)
                .then_some("memory registered with userfaultfd (write protection)"))
        });
        if let Some(what) = what {
            if !special {
                bail!("pid {pid}: mapping {v} is {what}; not supported yet");
            }
        }
    }
    Ok(flags)
}

/// What a proxied restore (by an earlier stasis) left in a process: the proxy at the old
/// `[vdso]` address, placeholders at the old vvar addresses, and the pristine copy whose header
/// page (`stasis_vdso::proxy::header`) describes them all.
struct ProxyFound {
    copy: (u64, u64),
    proxy: (u64, u64),
    placeholders: Vec<(String, u64, u64)>,
}

impl ProxyFound {
    /// Whether `v` is (part of) what the proxy made. By containment: adjacent placeholders
    /// with the same protection are merged into one VMA by the kernel.
    fn owns(&self, v: &stasis_proc::Vma) -> bool {
        let mut parts: Vec<(u64, u64)> = self.placeholders.iter().map(|p| (p.1, p.2)).collect();
        parts.push(self.copy);
        parts.push((self.proxy.0, self.proxy.0 + self.proxy.1));
        parts.sort_unstable();
        // Merge touching ranges, then look for one that holds all of v.
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (s, e) in parts {
            match merged.last_mut() {
                Some(last) if last.1 >= s => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        merged.iter().any(|&(s, e)| v.start >= s && v.end <= e)
    }
}

/// Looks for a pristine copy: a small read-only private anonymous mapping starting with the
/// magic. Reading 16 bytes of a handful of candidates is cheap.
fn find_proxy(pid: i32, vmas: &[stasis_proc::Vma], mem: &File) -> Option<ProxyFound> {
    for v in vmas.iter().filter(|v| {
        v.prot == stasis_proc::PROT_READ && !v.shared && v.inode == 0 && v.len() <= 1 << 20
    }) {
        let mut page = vec![0u8; PAGE_SIZE];
        if mem.read_exact_at(&mut page, v.start).is_err()
            || !page.starts_with(stasis_vdso::proxy::header::PROXY_MAGIC)
        {
            continue;
        }
        let (proxy, placeholders) = stasis_vdso::proxy::header::parse_proxy_header(&page)?;
        tracing::info!(
            pid,
            "found stasis's vDSO proxy at {:#x}; recording the original vDSO",
            proxy.0
        );
        return Some(ProxyFound {
            copy: (v.start, v.end),
            proxy,
            placeholders,
        });
    }
    None
}

/// A process restored with a vDSO proxy still knows its original vDSO, at the proxy's address.
/// Record that vDSO — the one its cached pointers refer to — with the pristine copy's bytes, so
/// the next restore builds one proxy for the new kernel (or remaps, if it is the original
/// kernel) instead of stacking a proxy on a proxy. The kernel's current areas are left behind.
fn proxied_vdso(found: &ProxyFound, mem: &File, auxv_ehdr: u64) -> Result<VdsoRecord> {
    let mut bytes = vec![0u8; found.proxy.1 as usize];
    mem.read_exact_at(&mut bytes, found.copy.0 + PAGE_SIZE as u64)
        .context("reading the pristine vDSO copy")?;
    let symbols =
        stasis_vdso::symbols_from_image(&bytes).context("parsing the pristine vDSO copy")?;
    let mut areas = found.placeholders.clone();
    areas.push((
        "[vdso]".into(),
        found.proxy.0,
        found.proxy.0 + found.proxy.1,
    ));
    areas.sort_by_key(|a| a.1);
    Ok(VdsoRecord {
        auxv_ehdr,
        areas,
        symbols: symbols
            .iter()
            .map(|s| (s.name.clone(), s.version.clone(), s.offset, s.size))
            .collect(),
        vdso_bytes: bytes,
    })
}

fn backing_of(
    pid: i32,
    v: &stasis_proc::Vma,
    proxy: Option<&ProxyFound>,
) -> Result<Option<Backing>> {
    if proxy.is_some_and(|p| p.owns(v)) {
        // Rebuilt from the vDSO record on restore, never restored as plain memory.
        return Ok(Some(Backing::Vdso {
            name: format!("{} (stasis vDSO proxy)", v.name_lossy()),
        }));
    }
    if stasis_abi::is_vdso_area_name(&v.name) {
        return Ok(Some(Backing::Vdso {
            name: v.name_lossy().into_owned(),
        }));
    }
    if v.name == b"[vsyscall]" {
        return Ok(None);
    }
    if crate::files::is_unnamed_mapping(v)
        || (v.inode != 0 && v.name.starts_with(b"/") && v.dev != SHMEM_DEV)
    {
        // A file, with a name or (deleted, memfd) without: `files::collect_mapped` saved the
        // contents of the latter, found again on restore by (dev, inode).
        return Ok(Some(Backing::File {
            path: Bytes(v.name.clone()).without_deleted(),
            offset: v.offset,
            dev: kdev(v.dev.0, v.dev.1),
            inode: v.inode,
        }));
    }
    if v.dev == SHMEM_DEV && v.name.starts_with(b"/SYSV") {
        bail!("pid {pid} is attached to a SysV shared memory segment ({v}); not supported yet");
    }
    // MAP_SHARED|MAP_ANONYMOUS: shmem shown as "/dev/zero (deleted)"; its contents are dumped
    // like anonymous memory, and its views stay one object (by inode).
    let anon_shared = v.inode == 0 || (v.dev == SHMEM_DEV && v.name == b"/dev/zero (deleted)");
    if v.shared && anon_shared {
        return Ok(Some(Backing::AnonShared {
            id: v.inode,
            offset: v.offset,
        }));
    }
    if v.inode != 0 || v.shared {
        bail!("pid {pid}: mapping {v} is of a kind stasis does not restore yet");
    }
    Ok(Some(Backing::Anon))
}

/// Which pages of shared anonymous mapping `v` its shmem object holds (`SEEK_DATA` and
/// `SEEK_HOLE` on the object, opened through /proc/PID/map_files).
fn shmem_pages(pid: i32, v: &stasis_proc::Vma, npages: usize) -> Result<Vec<bool>> {
    use std::os::fd::AsRawFd;
    let path = format!("/proc/{pid}/map_files/{:x}-{:x}", v.start, v.end);
    let f = File::open(&path).with_context(|| format!("opening {path} (shared memory {v})"))?;
    let mut bits = vec![false; npages];
    let (lo, hi) = (v.offset, v.offset + v.len());
    let page = PAGE_SIZE as u64;
    let mut pos = lo;
    while pos < hi {
        // SAFETY: lseek on our own descriptor.
        let data = unsafe { libc::lseek(f.as_raw_fd(), pos as i64, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data from pos on
            }
            bail!("SEEK_DATA on {path}: {e}");
        }
        let data = data as u64;
        if data >= hi {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(f.as_raw_fd(), data as i64, libc::SEEK_HOLE) };
        let hole = if hole < 0 { hi } else { (hole as u64).min(hi) };
        let first = ((data - lo) / page) as usize;
        let last = (hole - lo).div_ceil(page) as usize;
        for b in bits.iter_mut().take(last.min(npages)).skip(first) {
            *b = true;
        }
        pos = hole.max(data + page);
    }
    Ok(bits)
}

/// The internal shmem mount: shared anonymous memory, memfds, SysV segments.
const SHMEM_DEV: (u32, u32) = (0, 1);

const PM_PFN: u64 = (1 << 55) - 1;

/// The page frame of the kernel's shared zero page: a private anonymous page that was only
/// ever read maps it, and pagemap reports it present. Such pages hold nothing and must not be
/// dumped (restoring them would turn them into real pages). None when PFNs are hidden
/// (unprivileged) or the probe fails: then nothing is skipped, which is merely wasteful.
fn zero_page_pfn() -> Option<u64> {
    // SAFETY: a private anonymous page of our own, read once and unmapped.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            PAGE_SIZE,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return None;
        }
        std::ptr::read_volatile(p as *const u8);
        let pagemap = File::open("/proc/self/pagemap").ok();
        let mut e = [0u8; 8];
        let ok = pagemap.is_some_and(|f| {
            f.read_exact_at(&mut e, p as u64 / PAGE_SIZE as u64 * 8)
                .is_ok()
        });
        libc::munmap(p, PAGE_SIZE);
        let e = u64::from_le_bytes(e);
        (ok && e & PM_PRESENT != 0 && e & PM_PFN != 0).then_some(e & PM_PFN)
    }
}

fn wants_page(backing: &Backing, shared: bool, entry: u64, zero_pfn: Option<u64>) -> bool {
    if entry & PM_PRESENT != 0 && zero_pfn.is_some_and(|z| entry & PM_PFN == z) {
        return false;
    }
    match backing {
        Backing::Anon | Backing::AnonShared { .. } => entry & (PM_PRESENT | PM_SWAPPED) != 0,
        // A private file mapping: only pages that became anonymous (written: COW) differ from
        // the file. A shared one lives in the file itself.
        Backing::File { .. } if !shared => {
            entry & PM_SWAPPED != 0 || (entry & PM_PRESENT != 0 && entry & PM_FILE == 0)
        }
        Backing::File { .. } | Backing::Vdso { .. } => false,
    }
}

/// Runs of pages [i, j) of a mapping, by page index, and whether they may have been written
/// since the memory tracker protected them (always, for a mapping not tracked).
type PageRuns = Vec<(usize, usize, bool)>;

/// Whether any page of a mapping with this backing may need dumping (as `wants_page`).
fn wants_any(backing: &Backing, shared: bool) -> bool {
    match backing {
        Backing::Anon | Backing::AnonShared { .. } => true,
        Backing::File { .. } => !shared,
        Backing::Vdso { .. } => false,
    }
}

/// `PAGEMAP_SCAN` (Linux 6.7): the page table walked in the kernel, which hands back runs of
/// pages alike instead of one pagemap entry per page.
struct Scanner<'f> {
    pagemap: &'f File,
    regions: Vec<[u64; 3]>,
    /// Cleared once the kernel says it has no such ioctl.
    works: bool,
}

const PAGEMAP_SCAN: u64 = 0xc060_6610; // _IOWR('f', 16, struct pm_scan_arg): 96 bytes
const PAGE_IS_WRITTEN: u64 = 1 << 1;
const PAGE_IS_FILE: u64 = 1 << 2;
const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_SWAPPED: u64 = 1 << 4;
const PAGE_IS_PFNZERO: u64 = 1 << 5;

impl<'f> Scanner<'f> {
    fn new(pagemap: &'f File) -> Self {
        Scanner {
            pagemap,
            regions: vec![[0; 3]; 4096],
            // STASIS_NO_PAGEMAP_SCAN: the older kernels' way, for tests on a kernel that has it.
            works: std::env::var_os("STASIS_NO_PAGEMAP_SCAN").is_none(),
        }
    }

    /// The page runs of `v` to dump, as `wants_page` decides for each page; `None` if the
    /// kernel cannot scan (then pagemap is read instead). `written`: runs are cut where
    /// `PAGE_IS_WRITTEN` changes, and say it (else every run counts as written).
    fn runs(
        &mut self,
        v: &stasis_proc::Vma,
        backing: &Backing,
        written: bool,
    ) -> Result<Option<PageRuns>> {
        if !self.works {
            return Ok(None);
        }
        let page = PAGE_SIZE as u64;
        let mut out: PageRuns = Vec::new();
        let mut at = v.start;
        while at < v.end {
            // struct pm_scan_arg: size, flags, start, end, walk_end, vec, vec_len, max_pages,
            // category_inverted, category_mask, category_anyof_mask, return_mask.
            let mut arg: [u64; 12] = [
                96,
                0,
                at,
                v.end,
                0,
                self.regions.as_mut_ptr() as u64,
                self.regions.len() as u64,
                0,
                0,
                0,
                PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                PAGE_IS_PRESENT
                    | PAGE_IS_SWAPPED
                    | PAGE_IS_FILE
                    | PAGE_IS_PFNZERO
                    | if written { PAGE_IS_WRITTEN } else { 0 },
            ];
            // SAFETY: PAGEMAP_SCAN reads `arg` and writes at most vec_len regions into
            // `self.regions`, which has that many; `walk_end` into `arg`.
            let n = unsafe {
                libc::ioctl(
                    std::os::fd::AsRawFd::as_raw_fd(self.pagemap),
                    PAGEMAP_SCAN as _,
                    arg.as_mut_ptr(),
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if matches!(e.raw_os_error(), Some(libc::ENOTTY | libc::EINVAL))
                    && out.is_empty()
                    && at == v.start
                {
                    tracing::debug!("no PAGEMAP_SCAN ({e}): pagemap is read page by page");
                    self.works = false;
                    return Ok(None);
                }
                return Err(e).with_context(|| format!("PAGEMAP_SCAN of {v}"));
            }
            let n = (n as usize).min(self.regions.len());
            let mut seen = at;
            for &[start, end, cat] in &self.regions[..n] {
                if start < seen || end > v.end || start >= end {
                    bail!("PAGEMAP_SCAN of {v} returned {start:#x}-{end:#x} after {seen:#x}");
                }
                seen = end;
                let dump = cat & PAGE_IS_PFNZERO == 0
                    && match backing {
                        Backing::File { .. } => {
                            cat & PAGE_IS_SWAPPED != 0
                                || (cat & PAGE_IS_PRESENT != 0 && cat & PAGE_IS_FILE == 0)
                        }
                        _ => cat & (PAGE_IS_PRESENT | PAGE_IS_SWAPPED) != 0,
                    };
                if !dump {
                    continue;
                }
                let (i, j) = (
                    ((start - v.start) / page) as usize,
                    ((end - v.start) / page) as usize,
                );
                let w = !written || cat & PAGE_IS_WRITTEN != 0;
                match out.last_mut() {
                    Some(last) if last.1 == i && last.2 == w => last.1 = j,
                    _ => out.push((i, j, w)),
                }
            }
            // A buffer not filled means the walk got to the end. (`walk_end` is where it
            // stopped only when it stopped early: after a walk the kernel resumed
            // internally and finished, it still holds the earlier stop, behind the last
            // region. Going on from the later of the two is right either way: everything
            // before both was reported, and a region cut at the buffer's end goes on in the
            // next call, merged above.)
            if n < self.regions.len() {
                break;
            }
            let next = arg[4].max(seen);
            if next <= at || next > v.end {
                bail!("PAGEMAP_SCAN of {v} stopped at {:#x}", arg[4]);
            }
            at = next;
        }
        Ok(Some(out))
    }
}

/// One stretch of pages to copy into pages.img, in file order.
#[derive(Clone, Copy, Debug)]
struct Chunk {
    /// Index into `MemPlan::maps`, and into `MemPlan::vmas` (the model VMA it belongs to).
    map: usize,
    vma: usize,
    addr: u64,
    len: usize,
    /// Copied only once the parasite is gone (it holds the injection site's page).
    after_cure: bool,
    /// Read from the copy-on-write snapshot (if there is one) after the process runs on:
    /// private memory the snapshot has as it was. Shared memory (the snapshot sees every
    /// later write) and `MADV_DONTFORK`/`MADV_WIPEONFORK` areas (it has none or zeros) are
    /// read from the frozen process.
    from_snapshot: bool,
}

/// Which pages of which VMA go where in pages.img, decided from maps and pagemap while the
/// process is frozen and before anything in it changes, so the copy can run while the
/// parasite does its work (it changes nothing of the process's memory but the injection
/// site's page, copied last, once cured).
pub(crate) struct MemPlan {
    maps: Vec<stasis_proc::Vma>,
    vmas: Vec<Vma>,
    chunks: Vec<Chunk>,
    proxy: Option<ProxyFound>,
    parents: Vec<ParentPages>,
}

/// Address ranges [start, end).
pub(crate) type Ranges = Vec<(u64, u64)>;

/// What the image's memory records are made of, apart from the copy: the model VMAs (with
/// where their pages go in pages.img) and the proxy found.
pub(crate) struct MemModel {
    vmas: Vec<Vma>,
    proxy: Option<ProxyFound>,
    /// The page files of earlier images its runs name (`PageRun::src`).
    parents: Vec<ParentPages>,
}

impl MemModel {
    /// What the memory tracker arms: the private anonymous VMAs, and the ranges of them the
    /// image holds (its own pages and its parents'), touching ones merged.
    pub(crate) fn tracked_ranges(&self) -> (Ranges, Ranges) {
        let anon = self
            .vmas
            .iter()
            .filter(|v| matches!(v.backing, Backing::Anon));
        let vmas = anon.clone().map(|v| (v.start, v.end)).collect();
        let mut pages: Vec<(u64, u64)> = Vec::new();
        for r in anon.flat_map(|v| v.pages.iter()) {
            let end = r.addr + r.pages * PAGE_SIZE as u64;
            match pages.last_mut() {
                Some(last) if last.1 == r.addr => last.1 = end,
                _ => pages.push((r.addr, end)),
            }
        }
        (vmas, pages)
    }

    /// The parent page files the image names.
    pub(crate) fn parents(&self) -> Vec<ParentPages> {
        self.parents.clone()
    }

    /// Pages the image takes from its parents.
    pub(crate) fn parent_pages(&self) -> u64 {
        self.vmas
            .iter()
            .flat_map(|v| v.pages.iter())
            .filter(|r| r.src != 0)
            .map(|r| r.pages)
            .sum()
    }
}

impl MemPlan {
    /// The copy's part (maps and chunks) and the records' part, used apart: the records are
    /// completed while the process is frozen, the copy may go on after it runs again.
    pub(crate) fn split(self) -> (MemPlan, MemModel) {
        let MemPlan {
            maps,
            vmas,
            chunks,
            proxy,
            parents,
        } = self;
        (
            MemPlan {
                maps,
                vmas: Vec::new(),
                chunks,
                proxy: None,
                parents: Vec::new(),
            },
            MemModel {
                vmas,
                proxy,
                parents,
            },
        )
    }
}

/// Pagemap entries read at a time: a huge reservation (a JVM heap, a Go arena) is scanned in
/// windows, never with a buffer sized by the VMA.
const PAGEMAP_WINDOW: usize = 64 * 1024;

/// Pass 1. `hold_back` is the injection site (a page the parasite rewrites while it runs);
/// `data_start` the file offset where the first chunk will be appended; `snapshot`: the pages
/// that can be will be read from a copy-on-write snapshot; `parent`: the image the memory
/// tracker protected the pages for (an incremental dump), whose pages not written since are
/// taken from it instead.
pub(crate) fn plan(
    pid: i32,
    flags: impl FnOnce() -> Result<VmFlagsMap>,
    hold_back: u64,
    data_start: u64,
    snapshot: bool,
    parent: Option<&crate::track::Parent>,
) -> Result<MemPlan> {
    let maps = stasis_proc::maps(pid)?;
    let pagemap = File::open(format!("/proc/{pid}/pagemap"))
        .with_context(|| format!("opening /proc/{pid}/pagemap"))?;
    let mem = File::open(format!("/proc/{pid}/mem"))
        .with_context(|| format!("opening /proc/{pid}/mem"))?;
    let held_page = hold_back & !(PAGE_SIZE as u64 - 1);
    let mut vmas = Vec::with_capacity(maps.len());
    let mut chunks: Vec<Chunk> = Vec::new();
    let mut entries = vec![0u8; PAGEMAP_WINDOW * 8];
    let zero_pfn = zero_page_pfn();
    let mut scanner = Scanner::new(&pagemap);
    let proxy = find_proxy(pid, &maps, &mem);
    // Pass 1a: which pages of each mapping, from the page tables (what costs, in the kernel,
    // in proportion to memory: done while smaps, which costs as much, is read beside it).
    let mut found: Vec<(usize, Backing, PageRuns)> = Vec::with_capacity(maps.len());
    for (mi, v) in maps.iter().enumerate() {
        let Some(backing) = backing_of(pid, v, proxy.as_ref())? else {
            continue;
        };
        let npages = (v.len() / PAGE_SIZE as u64) as usize;
        let mut window = (0, 0); // pages [window.0, window.1) are in `entries`
        let mut entry = |k: usize| -> Result<u64> {
            if k < window.0 || k >= window.1 {
                let n = PAGEMAP_WINDOW.min(npages - k);
                pagemap
                    .read_exact_at(
                        &mut entries[..n * 8],
                        (v.start / PAGE_SIZE as u64 + k as u64) * 8,
                    )
                    .with_context(|| format!("reading the pagemap of {v}"))?;
                window = (k, k + n);
            }
            let at = (k - window.0) * 8;
            Ok(u64::from_le_bytes(
                entries[at..at + 8].try_into().unwrap_or([0; 8]),
            ))
        };
        // Shared anonymous memory: the pages the object holds, mapped here or not (a page
        // another process wrote, or one whose mapping was dropped, is in the object but not
        // in this page table, which is all pagemap tells).
        let in_object = match backing {
            Backing::AnonShared { .. } => Some(shmem_pages(pid, v, npages)?),
            _ => None,
        };
        // The runs of pages to dump, [i, j) in pages: from PAGEMAP_SCAN where the kernel has
        // it (runs come whole), else page by page from pagemap entries.
        let scanned = match (&in_object, wants_any(&backing, v.shared)) {
            (None, false) => Some(Vec::new()),
            (None, true) => {
                let written = parent.is_some() && matches!(backing, Backing::Anon);
                scanner.runs(v, &backing, written)?
            }
            (Some(_), _) => None,
        };
        let runs = match scanned {
            Some(runs) => runs,
            None => {
                let mut want = |k: usize| -> Result<bool> {
                    match &in_object {
                        Some(bits) => Ok(bits[k]),
                        None => Ok(wants_page(&backing, v.shared, entry(k)?, zero_pfn)),
                    }
                };
                let mut runs = Vec::new();
                let mut i = 0;
                while i < npages {
                    if !want(i)? {
                        i += 1;
                        continue;
                    }
                    let mut j = i + 1;
                    while j < npages && want(j)? {
                        j += 1;
                    }
                    runs.push((i, j, true));
                    i = j;
                }
                runs
            }
        };
        found.push((mi, backing, runs));
    }
    // Pass 1b: with the flags, the model VMAs and their chunks.
    let flags = flags()?;
    // (vma, addr, len, file offset, page file) of the pages taken from parents.
    let mut from_parent: Vec<(usize, u64, u64, u64, u32)> = Vec::new();
    for (mi, backing, runs) in found {
        let v = &maps[mi];
        let vf = flags
            .get(&v.start)
            .copied()
            .with_context(|| format!("pid {pid}: mapping {v} has no entry in smaps"))?;
        let vma = vmas.len();
        let in_snapshot =
            snapshot && !v.shared && vf.advice & (ADVICE_DONTFORK | ADVICE_WIPEONFORK) == 0;
        // Pages the tracker saw unwritten since the parent image, which holds them at the
        // same address, come from it; all others are copied.
        let tracked = vf.uffd_wp && matches!(backing, Backing::Anon);
        let page = PAGE_SIZE as u64;
        let mut fresh: Vec<(usize, usize)> = Vec::with_capacity(runs.len());
        for (i, j, written) in runs {
            let Some(p) = parent.filter(|_| tracked && !written) else {
                fresh.push((i, j));
                continue;
            };
            let (a, e) = (v.start + i as u64 * page, v.start + j as u64 * page);
            for (s, e, at) in p.pieces(a, e) {
                match at {
                    Some((src, off)) => from_parent.push((vma, s, e - s, off, src)),
                    None => fresh.push((
                        ((s - v.start) / page) as usize,
                        ((e - v.start) / page) as usize,
                    )),
                }
            }
        }
        let pieces = fresh.into_iter().flat_map(|(i, j)| {
            (i..j)
                .step_by(CHUNK / PAGE_SIZE)
                .map(move |a| (a, (a + CHUNK / PAGE_SIZE).min(j)))
        });
        for (i, j) in pieces {
            let addr = v.start + (i * PAGE_SIZE) as u64;
            let end = v.start + (j * PAGE_SIZE) as u64;
            // The injection site's page becomes a chunk of its own, copied after the cure.
            let mut cuts = vec![addr];
            if held_page > addr && held_page < end {
                cuts.push(held_page);
            }
            if held_page + (PAGE_SIZE as u64) > addr && held_page + (PAGE_SIZE as u64) < end {
                cuts.push(held_page + PAGE_SIZE as u64);
            }
            cuts.push(end);
            for w in cuts.windows(2) {
                chunks.push(Chunk {
                    map: mi,
                    vma,
                    addr: w[0],
                    len: (w[1] - w[0]) as usize,
                    after_cure: w[0] == held_page,
                    from_snapshot: in_snapshot && w[0] != held_page,
                });
            }
        }
        vmas.push(Vma {
            start: v.start,
            end: v.end,
            prot: v.prot,
            shared: v.shared,
            growsdown: vf.growsdown,
            maywrite: vf.maywrite,
            advice: vf.advice,
            name: Bytes(v.name.clone()),
            backing,
            pages: Vec::new(),
        });
    }
    // File order: what is read from the frozen process first, the held-back page after the
    // rest of it, what comes from a snapshot last.
    chunks.sort_by_key(|c| (c.from_snapshot, c.after_cure));
    let mut next_off = data_start;
    let mut placed: Vec<(usize, u64, u64, u64, u32)> =
        Vec::with_capacity(chunks.len() + from_parent.len());
    for c in &chunks {
        placed.push((c.vma, c.addr, c.len as u64, next_off, 0));
        next_off += c.len as u64;
    }
    // Only the parent page files the runs name go into the image's chain, numbered anew.
    let mut parents = Vec::new();
    if let Some(p) = parent {
        let mut used = vec![false; p.chain_len()];
        for &(.., src) in &from_parent {
            if let Some(u) = used.get_mut(src as usize - 1) {
                *u = true;
            }
        }
        let (chain, renumber) = p.chain_used(&used);
        parents = chain;
        for (vma, addr, len, off, src) in from_parent {
            placed.push((vma, addr, len, off, renumber[src as usize]));
        }
    }
    placed.sort_unstable();
    for (vma, addr, len, file_off, src) in placed {
        let runs = &mut vmas[vma].pages;
        let pages = len / PAGE_SIZE as u64;
        match runs.last_mut() {
            Some(r)
                if r.addr + r.pages * PAGE_SIZE as u64 == addr
                    && r.file_off + r.pages * PAGE_SIZE as u64 == file_off
                    && r.src == src =>
            {
                r.pages += pages;
            }
            _ => runs.push(PageRun {
                addr,
                pages,
                file_off,
                src,
            }),
        }
    }
    tracing::debug!(pid, chunks = chunks.len(), "memory planned");
    Ok(MemPlan {
        maps,
        vmas,
        chunks,
        proxy,
        parents,
    })
}

/// Pass 2: copies the planned pages into `pages`. `source` says, once the parasite is cured,
/// where the snapshot's pages are read from: a snapshot's pid, or `None` (the process itself,
/// still frozen). The held-back chunk and the snapshot's wait for that message (the channel
/// closing stops the copy with an error). `frozen_done` is dropped once nothing more is read
/// from the process itself, so it can be let go.
pub(crate) fn copy(
    pid: i32,
    plan: &MemPlan,
    pages: &mut PageWriter,
    source: &std::sync::mpsc::Receiver<Option<i32>>,
    frozen_done: std::sync::mpsc::Sender<()>,
) -> Result<()> {
    let mem = File::open(format!("/proc/{pid}/mem"))
        .with_context(|| format!("opening /proc/{pid}/mem"))?;
    let (t_read, t_write) = copy_chunks(pid, &mem, plan, pages, source, frozen_done)?;
    tracing::info!(pid, read = ?t_read, write = ?t_write, "memory copied");
    Ok(())
}

/// The rest of the address space, once the parasite is gone: mm fields, auxv, exe, and the
/// vDSO record.
pub(crate) fn finish(
    pid: i32,
    plan: MemModel,
    task: &TaskState,
    vdso_info: &VdsoInfo,
    stat: &[u64],
) -> Result<(Mm, VdsoRecord)> {
    let mem = File::open(format!("/proc/{pid}/mem"))
        .with_context(|| format!("opening /proc/{pid}/mem"))?;
    let MemModel {
        vmas: out, proxy, ..
    } = plan;
    let field = |n: usize| stat.get(n - 1).copied().unwrap_or(0);
    let fields = MmFields {
        start_code: field(26),
        end_code: field(27),
        start_stack: field(28),
        start_data: field(45),
        end_data: field(46),
        start_brk: field(47),
        brk: task.brk,
        arg_start: field(48),
        arg_end: field(49),
        env_start: field(50),
        env_end: field(51),
    };
    let raw_auxv = std::fs::read(format!("/proc/{pid}/auxv"))
        .with_context(|| format!("reading /proc/{pid}/auxv"))?;
    let auxv: Vec<u64> = raw_auxv
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect();
    let exe_link = format!("/proc/{pid}/exe");
    let exe: Bytes = std::fs::read_link(&exe_link)
        .with_context(|| format!("reading {exe_link}"))?
        .into();
    let exe_meta = std::fs::metadata(&exe_link).with_context(|| format!("stat of {exe_link}"))?;

    let vdso_bytes = match vdso_info.layout.vdso() {
        Some(area) => stasis_vdso::read_image(pid, area)?,
        None => Vec::new(),
    };
    let kernel_vdso = VdsoRecord {
        auxv_ehdr: vdso_info.auxv_ehdr,
        areas: vdso_info
            .layout
            .areas
            .iter()
            .map(|a| (a.name.clone(), a.start, a.end))
            .collect(),
        symbols: vdso_info
            .symbols
            .iter()
            .map(|s| (s.name.clone(), s.version.clone(), s.offset, s.size))
            .collect(),
        vdso_bytes,
    };
    let vdso = match &proxy {
        Some(found) => proxied_vdso(found, &mem, vdso_info.auxv_ehdr)?,
        None => kernel_vdso,
    };
    Ok((
        Mm {
            vmas: out,
            fields,
            auxv,
            exe,
            exe_dev: kdev(libc::major(exe_meta.dev()), libc::minor(exe_meta.dev())),
            exe_inode: exe_meta.ino(),
        },
        vdso,
    ))
}

/// Copies `chunks` of the target's memory into `pages`: a reader (this thread: out of the
/// target) and a writer thread (into the page cache) hand a few buffers back and forth, and
/// each hashes half of every chunk, so both cores do about the same work. Returns the time
/// each side spent working.
fn copy_chunks(
    pid: i32,
    mem: &File,
    plan: &MemPlan,
    pages: &mut PageWriter,
    source: &std::sync::mpsc::Receiver<Option<i32>>,
    frozen_done: std::sync::mpsc::Sender<()>,
) -> Result<(Duration, Duration)> {
    use std::sync::mpsc::sync_channel;
    const BUFFERS: usize = 3;
    let total: u64 = plan.chunks.iter().map(|c| c.len as u64).sum();
    stasis_image::progress::grow(total);
    let first_off = stasis_image::DATA_OFFSET + pages.data_len();
    // The first part of each chunk is hashed by the reader, the rest by the writer.
    let split = |len: usize| (len / 2).next_multiple_of(PAGE_SIZE).min(len);
    pages.pipelined(total, |sink, digests| {
        let (full_tx, full_rx) = sync_channel::<(Vec<u8>, usize, u64)>(BUFFERS);
        let (empty_tx, empty_rx) = sync_channel::<Vec<u8>>(BUFFERS);
        for _ in 0..BUFFERS {
            empty_tx
                .send(vec![0u8; CHUNK])
                .map_err(|_| anyhow::anyhow!("buffer pool"))?;
        }
        std::thread::scope(|s| {
            let writer = s.spawn(move || -> Result<Duration> {
                let mut busy = Duration::ZERO;
                for (buf, len, at) in full_rx {
                    let t = Instant::now();
                    let h = split(len);
                    digests.hash(at + h as u64, &buf[h..len]);
                    sink.append(&buf[..len])?;
                    stasis_image::progress::advance(len as u64);
                    busy += t.elapsed();
                    // The reader may have finished and dropped its end: nothing to recycle.
                    let _ = empty_tx.send(buf);
                }
                Ok(busy)
            });
            let mut reading = Duration::ZERO;
            let mut result = Ok(());
            let mut at = first_off;
            // Set once the parasite is cured: the snapshot (pid, memory) or None.
            let mut told: Option<Option<(i32, File)>> = None;
            let mut frozen_done = Some(frozen_done);
            for c in &plan.chunks {
                if (c.after_cure || c.from_snapshot) && told.is_none() {
                    let Ok(snap) = source.recv() else {
                        result = Err(anyhow::anyhow!("pid {pid}: the parasite was not cured"));
                        break;
                    };
                    let snap = match snap.map(|s| (s, File::open(format!("/proc/{s}/mem")))) {
                        None => None,
                        Some((s, Ok(f))) => Some((s, f)),
                        Some((s, Err(e))) => {
                            result = Err(anyhow::anyhow!(
                                "opening the memory of pid {pid}'s snapshot {s}: {e}"
                            ));
                            break;
                        }
                    };
                    told = Some(snap);
                }
                let from_snapshot = match (c.from_snapshot, &told) {
                    (true, Some(Some((_, f)))) => {
                        // Everything from the frozen process is read: it may go.
                        frozen_done.take();
                        Some(f)
                    }
                    _ => None,
                };
                let Ok(mut buf) = empty_rx.recv() else {
                    break; // the writer stopped early: its error is reported below
                };
                let (addr, len) = (c.addr, c.len);
                let t = Instant::now();
                let v = &plan.maps[c.map];
                let read = match from_snapshot {
                    // Through /proc/PID/mem, which takes page references: process_vm_readv
                    // pins them, and a read-only pin of a page shared copy-on-write makes
                    // the kernel copy it into the snapshot first (the whole snapshot would
                    // be copied, and its memory doubled).
                    Some(f) => f.read_exact_at(&mut buf[..len], addr).with_context(|| {
                        let snap = told.as_ref().and_then(|t| t.as_ref()).map_or(0, |t| t.0);
                        // A snapshot killed (by the OOM killer) takes a moment to die.
                        let gone = || stasis_proc::stat(snap).map_or(true, |st| st.is_zombie());
                        let t = Instant::now();
                        while !gone() && t.elapsed() < Duration::from_millis(200) {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        let dead = gone();
                        format!(
                            "reading pid {pid}'s memory snapshot {snap} at {addr:#x} of {v}{}",
                            if dead {
                                " (it was killed: out of memory? it is the first the kernel kills)"
                            } else {
                                ""
                            }
                        )
                    }),
                    None => read_remote(pid, mem, v, addr, &mut buf[..len]),
                };
                if let Err(e) = read {
                    result = Err(e);
                    break;
                }
                digests.hash(at, &buf[..split(len)]);
                reading += t.elapsed();
                if full_tx.send((buf, len, at)).is_err() {
                    break;
                }
                at += len as u64;
            }
            drop(full_tx);
            drop(frozen_done);
            let writing = writer
                .join()
                .map_err(|_| anyhow::anyhow!("the page writer thread panicked"))??;
            result.map(|()| (reading, writing))
        })
    })
}

/// Reads target memory: `process_vm_readv` (one copy, pages pinned in batches) where the VMA
/// is readable, /proc/PID/mem (which may read through PROT_NONE) where it is not.
fn read_remote(
    pid: i32,
    mem: &File,
    v: &stasis_proc::Vma,
    addr: u64,
    buf: &mut [u8],
) -> Result<()> {
    if v.prot & stasis_proc::PROT_READ != 0 {
        let local = [std::io::IoSliceMut::new(buf)];
        let len = local[0].len();
        let remote = [nix::sys::uio::RemoteIoVec {
            base: addr as usize,
            len,
        }];
        match nix::sys::uio::process_vm_readv(
            nix::unistd::Pid::from_raw(pid),
            &mut [std::io::IoSliceMut::new(buf)],
            &remote,
        ) {
            Ok(n) if n == len => return Ok(()),
            _ => {}
        }
    }
    mem.read_exact_at(buf, addr)
        .with_context(|| format!("reading memory at {addr:#x} of {v}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ZERO: u64 = 0x1234;

    fn file(shared: bool) -> (Backing, bool) {
        (
            Backing::File {
                path: "/f".into(),
                offset: 0,
                dev: 0,
                inode: 1,
            },
            shared,
        )
    }

    #[test]
    fn which_pages_are_dumped() {
        let present = PM_PRESENT | 0x99;
        let swapped = PM_SWAPPED;
        let file_page = PM_PRESENT | PM_FILE | 0x99;
        let zero = PM_PRESENT | ZERO;
        let anon = (Backing::Anon, false);
        let shm = (Backing::AnonShared { id: 1, offset: 0 }, true);
        let cases = [
            (&anon, present, true),
            (&anon, swapped, true),
            (&anon, 0, false),
            (&anon, zero, false),
            (&shm, present, true),
            (&shm, file_page, true),
            (&file(false), file_page, false),
            (&file(false), present, true),
            (&file(false), swapped, true),
            (&file(true), present, false),
            (
                &(
                    Backing::Vdso {
                        name: "[vdso]".into(),
                    },
                    false,
                ),
                present,
                false,
            ),
        ];
        for (i, ((b, shared), entry, want)) in cases.iter().enumerate() {
            assert_eq!(
                wants_page(b, *shared, *entry, Some(ZERO)),
                *want,
                "case {i}"
            );
        }
        assert!(
            wants_page(&Backing::Anon, false, zero, None),
            "no zero pfn known"
        );
    }
}
