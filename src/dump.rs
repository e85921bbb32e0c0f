//! `stasis dump`: freeze a process, collect everything the image model holds, write the image,
//! then kill the process (or, with `--leave-running`, let it go on).
//!
//! Order matters for safety: everything that can refuse the dump (unsupported files, threads)
//! is checked while the process is frozen but before anything in it is changed, so a refused
//! dump leaves the process exactly as it was. Memory is read after the parasite is cured, with
//! the process still frozen, so the image never contains our region. The inventory is written
//! last: an image without one is incomplete and `restore` refuses it.

use crate::collect::{self, CollectError};
use anyhow::{bail, Context, Result};
use stasis_abi::{CommandId, TaskState};
use stasis_image::model::*;
use stasis_image::{write_record, ImageDir, PageWriter, PAGE_SIZE};
use stasis_infect::{sys, Parasite, RegionSize, Seized};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::time::{Duration, Instant};

pub struct DumpOptions {
    pub leave_running: bool,
    /// Accept a terminal among the process's files (CRIU's `--shell-job`).
    pub shell_job: bool,
}

/// What a dump did, for the user and the benchmark.
#[derive(Debug, Default)]
pub struct DumpSummary {
    pub pages: u64,
    pub bytes: u64,
    pub vmas: usize,
    pub fds: usize,
    /// How long the process was frozen.
    pub frozen: Duration,
    pub total: Duration,
}

pub fn dump(pid: i32, dir: &std::path::Path, opts: &DumpOptions) -> Result<DumpSummary> {
    let t0 = Instant::now();
    stasis_infect::check_target(pid)?;
    let images = ImageDir::create(dir)
        .with_context(|| format!("preparing image directory {}", dir.display()))?;
    let mut seized = Seized::seize(pid)?;
    let frozen_at = Instant::now();
    if seized.threads().len() > 1 {
        bail!(
            "pid {pid} has {} threads; this version dumps single-threaded processes only",
            seized.threads().len()
        );
    }
    let tid = nix::unistd::Pid::from_raw(pid);
    // A thread inside a vDSO function is stepped out of it first (CRIU issue #512).
    if let Some(vdso) = stasis_vdso::VdsoLayout::of_pid(pid)?.vdso() {
        let moved = seized.step_out_of((vdso.start, vdso.end), 100_000)?;
        if !moved.is_empty() {
            tracing::info!(pid, threads = ?moved, "stepped out of the vDSO before dumping");
        }
    }

    // Everything that could refuse the dump comes first, before the process is changed.
    let mut pages = PageWriter::create(&images).context("creating pages.img")?;
    let files = collect_files(pid, &mut pages)?;
    if !opts.shell_job {
        if let Some(f) = files
            .fds
            .iter()
            .find(|f| matches!(f.kind, FdKind::Tty { .. }))
        {
            bail!(
                "pid {pid} has a terminal open on fd {} (a shell job); dump it with --shell-job",
                f.fd
            );
        }
    }
    let mut core = collect_core(pid)?;
    let shared_pending = pending(tid, true).context("reading pending signals")?;

    let blob = crate::blobs::parasite()?;
    let proc_timers = stasis_proc::timers(pid)?;
    let ids: Vec<u8> = proc_timers
        .iter()
        .flat_map(|t| t.id.to_le_bytes())
        .collect();
    let size = RegionSize {
        plan_cap: ids.len().max(64),
        ..RegionSize::default()
    };
    let mut parasite = Parasite::infect(&mut seized, blob, size)?;
    let asked = collect::ask_vdso(&mut parasite)?;
    let task_raw = parasite.run(CommandId::TaskState, collect::COMMAND_TIMEOUT)?;
    let times = if ids.is_empty() {
        Vec::new()
    } else {
        parasite.run_plan(
            CommandId::TimerState,
            &ids,
            ids.len(),
            collect::COMMAND_TIMEOUT,
        )?
    };
    parasite.cure()?;
    let vdso_info = asked.verify()?;
    let task = decode_task_state(pid, &task_raw)?;
    core.altstack = AltStack {
        sp: task.altstack[0],
        flags: task.altstack[1] as i32,
        size: task.altstack[2],
    };
    core.clear_child_tid = task.tid_address;

    // Still frozen, parasite gone: the address space as the process knows it.
    // /proc/PID/stat is read once, frozen, for both the mm fields and the session/pgid.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let stat = stat_fields(&stat).with_context(|| format!("parsing /proc/{pid}/stat"))?;
    let (mm, vdso) = collect_mm(pid, &task, &vdso_info, &stat, &mut pages)?;
    let mut process = collect_process(pid, &task, &stat, shared_pending)?;
    process.posix_timers = posix_timers(pid, &proc_timers, &times)?;

    let frozen;
    if opts.leave_running {
        seized.release()?;
        frozen = frozen_at.elapsed();
    } else {
        // Killed while still frozen: it never runs past the moment the image describes.
        nix::sys::signal::kill(tid, nix::sys::signal::Signal::SIGKILL)
            .context("killing the dumped process")?;
        frozen = frozen_at.elapsed();
        drop(seized);
    }

    let summary_pages = pages.finish().context("finishing pages.img")?;
    let xcr0 = core
        .xsave
        .get(464..472)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0);
    let inventory = Inventory {
        pid,
        threads: vec![pid],
        comm: process.comm.clone(),
        kernel: kernel_release(),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        stasis_version: env!("CARGO_PKG_VERSION").to_string(),
        xsave_size: core.xsave.len() as u32,
        xcr0,
        xsave_layout: crate::xsave::layout(),
        monotonic_ns: clock_ns(libc::CLOCK_MONOTONIC),
        boottime_ns: clock_ns(libc::CLOCK_BOOTTIME),
        page_data_len: summary_pages.data_len,
        page_data_xxh3: summary_pages.checksum,
    };
    let vmas = mm.vmas.len();
    let fds = files.fds.len();
    write_record(&images, &core_name(pid), KIND_CORE, &core)?;
    write_record(&images, MM, KIND_MM, &mm)?;
    write_record(&images, PROCESS, KIND_PROCESS, &process)?;
    write_record(&images, FILES, KIND_FILES, &files)?;
    write_record(&images, VDSO, KIND_VDSO, &vdso)?;
    write_record(&images, INVENTORY, KIND_INVENTORY, &inventory)?;
    let s = DumpSummary {
        pages: summary_pages.data_len / PAGE_SIZE as u64,
        bytes: summary_pages.data_len,
        vmas,
        fds,
        frozen,
        total: t0.elapsed(),
    };
    tracing::info!(pid, ?s, "dumped");
    Ok(s)
}

/// A clock's reading in ns (0 if it cannot be read).
pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime into a valid timespec.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn pending(tid: nix::unistd::Pid, shared: bool) -> Result<Vec<PendingSignal>> {
    Ok(sys::pending_signals(tid, shared)?
        .into_iter()
        .map(|raw| PendingSignal {
            signo: i32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]),
            siginfo: raw.to_vec(),
        })
        .collect())
}

fn gpr_of(r: &sys::Regs) -> Gpr {
    Gpr {
        r15: r.r15,
        r14: r.r14,
        r13: r.r13,
        r12: r.r12,
        rbp: r.rbp,
        rbx: r.rbx,
        r11: r.r11,
        r10: r.r10,
        r9: r.r9,
        r8: r.r8,
        rax: r.rax,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        orig_rax: r.orig_rax,
        rip: r.rip,
        cs: r.cs,
        eflags: r.eflags,
        rsp: r.rsp,
        ss: r.ss,
        fs_base: r.fs_base,
        gs_base: r.gs_base,
        ds: r.ds,
        es: r.es,
        fs: r.fs,
        gs: r.gs,
    }
}

fn collect_core(tid: i32) -> Result<Core> {
    let t = nix::unistd::Pid::from_raw(tid);
    let regs = sys::get_regs(t).with_context(|| format!("registers of thread {tid}"))?;
    let rseq = sys::rseq_config(t)
        .with_context(|| format!("rseq of thread {tid}"))?
        .map(|(addr, len, sig)| Rseq { addr, len, sig });
    let (robust_list, robust_list_len) =
        sys::robust_list(t).with_context(|| format!("robust list of thread {tid}"))?;
    Ok(Core {
        tid,
        gpr: gpr_of(&regs),
        xsave: sys::get_xstate(t).with_context(|| format!("XSAVE state of thread {tid}"))?,
        sigmask: sys::get_sigmask(t).with_context(|| format!("signal mask of thread {tid}"))?,
        pending: pending(t, false)?,
        altstack: AltStack::default(),
        rseq,
        robust_list,
        robust_list_len,
        clear_child_tid: 0,
    })
}

fn decode_task_state(pid: i32, raw: &[u8]) -> Result<TaskState, CollectError> {
    if raw.len() != std::mem::size_of::<TaskState>() {
        return Err(CollectError::Infect(stasis_infect::InfectError::BadReply {
            pid,
            why: format!(
                "task state of {} bytes, expected {}",
                raw.len(),
                std::mem::size_of::<TaskState>()
            ),
        }));
    }
    // SAFETY: TaskState is plain integers (any bit pattern is valid) and raw has its exact size.
    Ok(unsafe { std::ptr::read_unaligned(raw.as_ptr() as *const TaskState) })
}

// ---- memory ---------------------------------------------------------------------------------

const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;
/// Pages are read and written in chunks of at most this many bytes: bounds peak memory.
const CHUNK: usize = 1 << 20;

fn growsdown_set(pid: i32) -> Result<std::collections::HashSet<u64>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .with_context(|| format!("reading /proc/{pid}/smaps"))?;
    let mut set = std::collections::HashSet::new();
    let mut current = None;
    for line in text.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if flags.split_whitespace().any(|f| f == "gd") {
                if let Some(start) = current {
                    set.insert(start);
                }
            }
        } else if let Some((range, _)) = line.split_once(' ') {
            if let Some((s, _)) = range.split_once('-') {
                if let Ok(start) = u64::from_str_radix(s, 16) {
                    current = Some(start);
                }
            }
        }
    }
    Ok(set)
}

/// What a proxied restore (by an earlier stasis) left in a process: the proxy at the old
/// `[vdso]` address, placeholders at the old vvar addresses, and the pristine copy whose header
/// page (`plan::proxy_header`) describes them all.
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

/// Saves the contents of every deleted file that is still mapped (once per file), read
/// through /proc/PID/map_files, which opens the file itself even though it has no name.
fn collect_ghosts(
    pid: i32,
    vmas: &[stasis_proc::Vma],
    pages: &mut PageWriter,
) -> Result<std::collections::HashMap<u64, Ghost>> {
    let mut ghosts = std::collections::HashMap::new();
    for v in vmas.iter().filter(|v| {
        v.inode != 0 && v.name.starts_with('/') && v.name.ends_with(" (deleted)") && v.dev != (0, 1)
    }) {
        if ghosts.contains_key(&v.inode) {
            continue;
        }
        let link = format!("/proc/{pid}/map_files/{:x}-{:x}", v.start, v.end);
        let data = std::fs::read(&link).with_context(|| {
            format!(
                "reading deleted file {} mapped at {:#x} ({link})",
                v.name, v.start
            )
        })?;
        let mode = std::fs::metadata(&link)
            .map(|m| m.mode() & 0o7777)
            .unwrap_or(0o644);
        let (data_off, len) = append_padded(pages, &data)?;
        ghosts.insert(
            v.inode,
            Ghost {
                data_off,
                len,
                mode,
            },
        );
    }
    Ok(ghosts)
}

/// Looks for a pristine copy: a small read-only private anonymous mapping starting with the
/// magic. Reading 16 bytes of a handful of candidates is cheap.
fn find_proxy(pid: i32, vmas: &[stasis_proc::Vma], mem: &File) -> Option<ProxyFound> {
    for v in vmas.iter().filter(|v| {
        v.prot == stasis_proc::PROT_READ && !v.shared && v.inode == 0 && v.len() <= 1 << 20
    }) {
        let mut page = vec![0u8; PAGE_SIZE];
        if mem.read_exact_at(&mut page, v.start).is_err()
            || !page.starts_with(crate::plan::PROXY_MAGIC)
        {
            continue;
        }
        let (proxy, placeholders) = crate::plan::parse_proxy_header(&page)?;
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

fn backing_of(v: &stasis_proc::Vma, proxy: Option<&ProxyFound>) -> Result<Option<Backing>> {
    if proxy.is_some_and(|p| p.owns(v)) {
        // Rebuilt from the vDSO record on restore, never restored as plain memory.
        return Ok(Some(Backing::Vdso {
            name: format!("{} (stasis vDSO proxy)", v.name),
        }));
    }
    if stasis_abi::is_vdso_area_name(v.name.as_bytes()) {
        return Ok(Some(Backing::Vdso {
            name: v.name.clone(),
        }));
    }
    if v.name == "[vsyscall]" {
        return Ok(None);
    }
    // shmem (dev 00:01): MAP_SHARED|MAP_ANONYMOUS shows as "/dev/zero (deleted)", SysV shm,
    // memfd mappings. Their contents are dumped like anonymous memory.
    let shmem = v.dev == (0, 1);
    if v.shared && (v.inode == 0 || shmem) {
        return Ok(Some(Backing::AnonShared {
            id: v.inode,
            offset: v.offset,
        }));
    }
    if v.inode != 0 && v.name.starts_with('/') && !shmem {
        // A deleted file (its contents are saved by `collect_ghosts`) keeps its old path.
        let path = v
            .name
            .strip_suffix(" (deleted)")
            .unwrap_or(&v.name)
            .to_string();
        let dev = ((v.dev.0 as u64) << 20) | v.dev.1 as u64;
        return Ok(Some(Backing::File {
            path,
            offset: v.offset,
            dev,
            inode: v.inode,
            ghost: None,
        }));
    }
    if v.shared {
        bail!("mapping {v}: shared mapping of an unknown kind");
    }
    Ok(Some(Backing::Anon))
}

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

fn collect_mm(
    pid: i32,
    task: &TaskState,
    vdso_info: &collect::VdsoInfo,
    stat: &[u64],
    pages: &mut PageWriter,
) -> Result<(Mm, VdsoRecord)> {
    let vmas = stasis_proc::maps(pid)?;
    let gd = growsdown_set(pid)?;
    let pagemap = File::open(format!("/proc/{pid}/pagemap"))
        .with_context(|| format!("opening /proc/{pid}/pagemap"))?;
    let mem = File::open(format!("/proc/{pid}/mem"))
        .with_context(|| format!("opening /proc/{pid}/mem"))?;
    // Pass 1: which pages of which VMA go where in pages.img. Appends are sequential, so every
    // chunk's file offset is known before a byte is copied.
    let mut out = Vec::with_capacity(vmas.len());
    let mut chunks: Vec<(usize, u64, usize)> = Vec::new(); // (index into vmas, address, length)
    let mut entries = Vec::new();
    let zero_pfn = zero_page_pfn();
    let proxy = find_proxy(pid, &vmas, &mem);
    // Deleted files' contents go first, so page offsets computed below stay right.
    let ghosts = collect_ghosts(pid, &vmas, pages)?;
    let mut next_off = stasis_image::DATA_OFFSET + pages.data_len();
    for (vi, v) in vmas.iter().enumerate() {
        let Some(mut backing) = backing_of(v, proxy.as_ref())? else {
            continue;
        };
        if let Backing::File { inode, ghost, .. } = &mut backing {
            if v.name.ends_with(" (deleted)") {
                *ghost = ghosts.get(inode).copied();
            }
        }
        let npages = (v.len() / PAGE_SIZE as u64) as usize;
        entries.resize(npages * 8, 0);
        pagemap
            .read_exact_at(&mut entries, v.start / PAGE_SIZE as u64 * 8)
            .with_context(|| format!("reading the pagemap of {v}"))?;
        let e =
            |k: usize| u64::from_le_bytes(entries[k * 8..k * 8 + 8].try_into().unwrap_or([0; 8]));
        let mut runs: Vec<PageRun> = Vec::new();
        let mut i = 0;
        while i < npages {
            if !wants_page(&backing, v.shared, e(i), zero_pfn) {
                i += 1;
                continue;
            }
            let mut j = i;
            while j < npages
                && j - i < CHUNK / PAGE_SIZE
                && wants_page(&backing, v.shared, e(j), zero_pfn)
            {
                j += 1;
            }
            let addr = v.start + (i * PAGE_SIZE) as u64;
            let len = (j - i) * PAGE_SIZE;
            chunks.push((vi, addr, len));
            match runs.last_mut() {
                Some(r)
                    if r.addr + r.pages * PAGE_SIZE as u64 == addr
                        && r.file_off + r.pages * PAGE_SIZE as u64 == next_off =>
                {
                    r.pages += (j - i) as u64;
                }
                _ => runs.push(PageRun {
                    addr,
                    pages: (j - i) as u64,
                    file_off: next_off,
                }),
            }
            next_off += len as u64;
            i = j;
        }
        out.push(Vma {
            start: v.start,
            end: v.end,
            prot: v.prot,
            shared: v.shared,
            growsdown: gd.contains(&v.start),
            name: v.name.clone(),
            backing,
            pages: runs,
        });
    }
    // Pass 2: copy, reading on this thread and writing on another, so both cores work.
    let (t_read, t_write) = copy_chunks(pid, &mem, &vmas, &chunks, pages)?;
    tracing::info!(pid, read = ?t_read, write = ?t_write, "memory copied");
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
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .with_context(|| format!("reading /proc/{pid}/exe"))?
        .to_string_lossy()
        .into_owned();

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
        },
        vdso,
    ))
}

/// Copies `chunks` of the target's memory into `pages`: a reader (this thread) and a writer
/// thread hand a few buffers back and forth. Returns the time each side spent working.
fn copy_chunks(
    pid: i32,
    mem: &File,
    vmas: &[stasis_proc::Vma],
    chunks: &[(usize, u64, usize)],
    pages: &mut PageWriter,
) -> Result<(Duration, Duration)> {
    use std::sync::mpsc::sync_channel;
    const BUFFERS: usize = 3;
    let (full_tx, full_rx) = sync_channel::<(Vec<u8>, usize)>(BUFFERS);
    let (empty_tx, empty_rx) = sync_channel::<Vec<u8>>(BUFFERS);
    for _ in 0..BUFFERS {
        empty_tx
            .send(vec![0u8; CHUNK])
            .map_err(|_| anyhow::anyhow!("buffer pool"))?;
    }
    std::thread::scope(|s| {
        let writer = s.spawn(move || -> Result<Duration> {
            let mut busy = Duration::ZERO;
            for (buf, len) in full_rx {
                let t = Instant::now();
                pages.append(&buf[..len])?;
                busy += t.elapsed();
                // The reader may have finished and dropped its end: nothing left to recycle for.
                let _ = empty_tx.send(buf);
            }
            Ok(busy)
        });
        let mut reading = Duration::ZERO;
        let mut result = Ok(());
        for &(vi, addr, len) in chunks {
            let Ok(mut buf) = empty_rx.recv() else {
                break; // the writer stopped early: its error is reported below
            };
            let t = Instant::now();
            if let Err(e) = read_remote(pid, mem, &vmas[vi], addr, &mut buf[..len]) {
                result = Err(e);
                break;
            }
            reading += t.elapsed();
            if full_tx.send((buf, len)).is_err() {
                break;
            }
        }
        drop(full_tx);
        let writing = writer
            .join()
            .map_err(|_| anyhow::anyhow!("the page writer thread panicked"))??;
        result.map(|()| (reading, writing))
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

/// Numeric fields of /proc/PID/stat after the comm, numbered as in proc(5) (field 3 = state
/// is returned as 0).
fn stat_fields(stat: &str) -> Option<Vec<u64>> {
    let close = stat.rfind(')')?;
    let pid: u64 = stat.split_whitespace().next()?.parse().ok()?;
    let mut v = vec![pid, 0];
    for (i, tok) in stat.get(close + 2..)?.split_whitespace().enumerate() {
        v.push(if i == 0 {
            0
        } else {
            tok.parse::<i128>().ok()? as u64
        });
    }
    Some(v)
}

// ---- process-wide state ---------------------------------------------------------------------

fn collect_process(
    pid: i32,
    task: &TaskState,
    stat: &[u64],
    shared_pending: Vec<PendingSignal>,
) -> Result<Process> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let line = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or("")
            .trim()
            .to_string()
    };
    let ids = |key: &str| -> Result<[u32; 4]> {
        let v: Vec<u32> = line(key)
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        v.try_into()
            .map_err(|_| anyhow::anyhow!("pid {pid}: cannot parse {key} in status"))
    };
    let creds = Creds {
        uids: ids("Uid:")?,
        gids: ids("Gid:")?,
        groups: line("Groups:")
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect(),
    };
    let umask = u32::from_str_radix(&line("Umask:"), 8).unwrap_or(0o022);
    let f = stat;
    let mut rlimits = Vec::new();
    for resource in 0..16u32 {
        let mut old = libc::rlimit64 {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: prlimit64 query only (new = NULL); old is a valid out-pointer.
        let r = unsafe { libc::prlimit64(pid, resource as _, std::ptr::null(), &mut old) };
        if r == 0 {
            rlimits.push(Rlimit {
                resource,
                cur: old.rlim_cur,
                max: old.rlim_max,
            });
        }
    }
    let link = |what: &str| -> Result<String> {
        Ok(std::fs::read_link(format!("/proc/{pid}/{what}"))
            .with_context(|| format!("reading /proc/{pid}/{what}"))?
            .to_string_lossy()
            .into_owned())
    };
    let personality = std::fs::read_to_string(format!("/proc/{pid}/personality"))
        .ok()
        .and_then(|s| u32::from_str_radix(s.trim(), 16).ok())
        .unwrap_or(0);
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim_end_matches('\n')
        .to_string();
    let itimer = |t: &[i64; 4]| ITimer {
        interval_sec: t[0],
        interval_usec: t[1],
        value_sec: t[2],
        value_usec: t[3],
    };
    Ok(Process {
        sigactions: task
            .sigactions
            .iter()
            .map(|a| SigAction {
                handler: a.handler,
                flags: a.flags,
                restorer: a.restorer,
                mask: a.mask,
            })
            .collect(),
        shared_pending,
        posix_timers: Vec::new(),
        itimers: [
            itimer(&task.itimers[0]),
            itimer(&task.itimers[1]),
            itimer(&task.itimers[2]),
        ],
        rlimits,
        creds,
        umask,
        cwd: link("cwd")?,
        root: link("root")?,
        personality,
        comm,
        dumpable: task.dumpable as i32,
        pgid: f.get(4).copied().unwrap_or(0) as i32,
        sid: f.get(5).copied().unwrap_or(0) as i32,
    })
}

/// POSIX timers: what /proc says about each, with the times the parasite read.
fn posix_timers(
    pid: i32,
    timers: &[stasis_proc::ProcTimer],
    times: &[u8],
) -> Result<Vec<PosixTimer>> {
    if times.len() != timers.len() * 32 {
        bail!(
            "pid {pid}: timer state of {} bytes for {} timers",
            times.len(),
            timers.len()
        );
    }
    Ok(timers
        .iter()
        .zip(times.chunks_exact(32))
        .map(|(t, spec)| {
            let v =
                |k: usize| i64::from_le_bytes(spec[k * 8..k * 8 + 8].try_into().unwrap_or([0; 8]));
            PosixTimer {
                id: t.id,
                clock: t.clock,
                signo: t.signo,
                sigval: t.sigval,
                notify: t.notify,
                tid: t.target,
                interval_sec: v(0),
                interval_nsec: v(1),
                value_sec: v(2),
                value_nsec: v(3),
            }
        })
        .collect())
}

// ---- files ----------------------------------------------------------------------------------

fn collect_files(pid: i32, pages: &mut PageWriter) -> Result<Files> {
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
fn append_padded(pages: &mut PageWriter, data: &[u8]) -> Result<(u64, u64)> {
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

use std::os::unix::fs::OpenOptionsExt;
