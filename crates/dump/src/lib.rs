//! `stasis dump`: freeze a process, collect everything the image model holds, write the image,
//! then kill the process (or, with `--leave-running`, let it go on).
//!
//! Order matters for safety: everything that can refuse the dump (`preflight`, unsupported
//! files and mappings) is checked while the process is frozen but before anything in it is
//! changed, so a refused dump leaves the process exactly as it was. Memory is read after the parasite is cured, with
//! the process still frozen, so the image never contains our region. The inventory is written
//! last: an image without one is incomplete and `restore` refuses it.

mod files;
mod mm;
mod preflight;
mod task;
mod thread;
pub mod track;
mod tree;
pub mod vdso_report;

use anyhow::{bail, Context, Result};
use stasis_abi::{CommandId, TaskState};
use stasis_image::model::*;
use stasis_image::{write_record, ImageDir, PageWriter, PAGE_SIZE};
use stasis_infect::{Parasite, RegionSize, Seized};
use std::time::{Duration, Instant};
use vdso_report::CollectError;

pub struct DumpOptions {
    pub leave_running: bool,
    /// Accept a terminal among the process's files (CRIU's `--shell-job`).
    pub shell_job: bool,
    /// Dump file locks (CRIU needs `--file-locks`); `false` refuses a process holding one.
    pub file_locks: bool,
    /// Dump established TCP connections, locked from the dump to the restore
    /// (`--tcp-established`); `false` refuses a process with one.
    pub tcp_established: bool,
    /// Let established TCP connections come back closed (`--tcp-close`).
    pub tcp_close: bool,
    /// With `leave_running`: copy memory from a copy-on-write snapshot after the process runs
    /// on, so the freeze does not grow with memory (`--no-snapshot`: copy while frozen).
    pub snapshot: bool,
    /// `stasis pre-dump`: memory only, the process left running, its writes tracked from
    /// now on (implies `leave_running`).
    pub pre_dump: bool,
    /// An earlier image of the process (relative to the new image's directory, as CRIU's
    /// `--prev-images-dir`): pages the memory tracker saw unwritten since it are taken from it.
    pub prev_images_dir: Option<std::path::PathBuf>,
    /// With `leave_running`: track the process's writes from this dump on, for the next
    /// incremental one.
    pub track_mem: bool,
}

/// What a dump did, for the user and the benchmark.
#[derive(Debug, Default)]
pub struct DumpSummary {
    pub pages: u64,
    pub bytes: u64,
    pub vmas: usize,
    pub fds: usize,
    pub threads: usize,
    /// Processes (the root and its descendants).
    pub processes: usize,
    /// How long the process was frozen.
    pub frozen: Duration,
    /// Processes whose memory was read from a copy-on-write snapshot after they ran on.
    pub snapshots: usize,
    /// The longest second freeze of one of them, to reap its snapshot.
    pub reap_frozen: Duration,
    /// Pages an incremental image takes from its parents (not written again).
    pub parent_pages: u64,
    pub total: Duration,
}

pub fn dump(pid: i32, dir: &std::path::Path, opts: &DumpOptions) -> Result<DumpSummary> {
    let t0 = Instant::now();
    stasis_infect::check_target(pid)?;
    tree::not_an_ancestor_of_ours(pid)?;
    let images = ImageDir::create(dir)
        .with_context(|| format!("preparing image directory {}", dir.display()))?;
    // A dump that fails leaves no half image behind (and no directory it made).
    dump_into(pid, &images, opts, t0).inspect_err(|_| images.discard())
}

fn dump_into(pid: i32, images: &ImageDir, opts: &DumpOptions, t0: Instant) -> Result<DumpSummary> {
    let dir = images.path();
    if opts.pre_dump && !opts.leave_running {
        bail!("a pre-dump leaves the process running");
    }
    // SAFETY: geteuid has no failure mode.
    if (opts.pre_dump || opts.track_mem) && unsafe { libc::geteuid() } != 0 {
        bail!("tracking memory between dumps (pre-dump, --track-mem) needs root: its state is root's alone");
    }
    if opts.leave_running && opts.tcp_established {
        bail!("--tcp-established cannot be used with --leave-running: the connections would carry on past the image");
    }
    let (mut tasks, zombies) = tree::seize(pid)?;
    let frozen_at = Instant::now();
    // Dropped on any failure: every connection goes on as before.
    let mut net = files::NetLock::new(pid);
    let net = &mut net;
    let mut s = DumpSummary::default();
    // Every process is read while the whole tree is frozen; nothing is killed or let go before
    // every one of them has been read and the tree as a whole checked. The memory of each is
    // copied in the background while the next ones are read; with snapshots, the tree is let
    // go as soon as all else is read, and the copies finish from the snapshots.
    let mut snapshots: Vec<(i32, i32)> = Vec::new();
    let dumped = std::thread::scope(|scope| -> Result<(Vec<TaskDump>, Tree)> {
        let proc_locks = files::ProcLocks::start(scope);
        let mut pending = Vec::with_capacity(tasks.len());
        for t in tasks.iter_mut() {
            let dir = if t.pid == pid {
                images.clone()
            } else {
                ImageDir::create(dir.join(task_dir_name(t.pid)))
                    .with_context(|| format!("preparing the image directory of pid {}", t.pid))?
            };
            let p = start_task(scope, t.pid, &mut t.seized, dir, opts, t.pid == pid, net)?;
            if let Some(child) = p.work.snapshot {
                snapshots.push((t.pid, child));
            }
            pending.push(p);
        }
        let mut dumps = Vec::with_capacity(pending.len());
        let mut copies = Vec::with_capacity(pending.len());
        for p in pending {
            let (d, c) = finish_task(p, &proc_locks)?;
            dumps.push(d);
            copies.push(c);
        }
        // A pre-dump has no descriptors, sessions or terminals to settle: only memory.
        let tree = if opts.pre_dump {
            Tree::default()
        } else {
            tree::settle(&tasks, zombies, &mut dumps, opts.shell_job)?
        };
        if opts.leave_running {
            for c in &copies {
                c.frozen_part_done();
            }
            for t in tasks.iter_mut() {
                t.seized.release()?;
            }
            s.frozen = frozen_at.elapsed();
        }
        for (d, c) in dumps.iter_mut().zip(copies) {
            c.finish(d)?;
        }
        Ok((dumps, tree))
    });
    // Whatever happened, no snapshot outlives the dump.
    let ended = end_snapshots(&mut tasks, &snapshots);
    let (mut dumps, tree) = dumped?;
    s.reap_frozen = ended?;
    s.snapshots = snapshots.len();

    if !opts.leave_running {
        if let Some(root) = dumps.iter_mut().find(|d| d.pid == pid) {
            // The connections stay locked for the restore (the processes are killed below).
            root.inventory.netlock = net.table();
        }
    }
    // In a kill-mode dump the image is written and sealed while every process is still
    // frozen, before any is killed: whenever this stasis may die, either the processes live
    // on (the guardian cures them) or a whole image of them exists.
    // The root's inventory last: an image without one is incomplete and restore refuses it.
    for d in dumps.iter_mut().rev() {
        let written = d.write()?;
        s.pages += written.pages;
        s.bytes += written.bytes;
        s.vmas += written.vmas;
        s.fds += written.fds;
        s.threads += written.threads;
        s.parent_pages += d.parent_pages;
        if d.pid != pid {
            d.write_inventory()?;
            continue;
        }
        if !tree.tasks.is_empty() || !tree.zombies.is_empty() {
            write_record(images, TREE, KIND_TREE, &tree)?;
        }
        d.write_inventory()?;
    }
    // The image is complete: seal it with the host key, so a root restore can tell it was
    // made here, by root, and not altered since.
    match stasis_image::auth::host_key(true)? {
        Some(key) => stasis_image::auth::seal(dir, &key)?,
        None => tracing::warn!(
            "the image key {} cannot be read by this user: the image carries no MAC, and a restore as root will refuse it unless told --trust-image",
            stasis_image::auth::key_path().display()
        ),
    }

    if !opts.leave_running {
        // Killed while still frozen: none of them runs past the moment the image describes.
        // They are reaped (as their tracer) while they die.
        s.frozen = frozen_at.elapsed();
        // If this stasis dies in the loop below, the guardian kills the rest.
        let procs = tasks
            .iter()
            .map(|t| {
                let st = stasis_proc::stat(t.pid)
                    .with_context(|| format!("reading the state of dumped pid {}", t.pid))?;
                Ok((t.pid, st.start_time))
            })
            .collect::<Result<Vec<_>>>()?;
        stasis_infect::guardian::note_killing(procs)?;
        for t in tasks.iter_mut() {
            t.seized
                .kill()
                .with_context(|| format!("killing dumped pid {}", t.pid))?;
        }
        net.killed();
    }
    net.commit();
    if !opts.leave_running {
        for t in tasks.iter_mut() {
            t.seized
                .reap_killed()
                .with_context(|| format!("waiting for dumped pid {} to die", t.pid))?;
        }
    }
    drop(tasks);
    // The image is whole: the trackers armed for it track it now; one this dump does not go
    // on with ends (a kill-mode dump's end with their processes).
    for d in dumps.iter_mut() {
        match d.tracking.take() {
            Some((t, true)) => {
                if let Err(e) = t.commit(&d.inventory.image_id) {
                    tracing::warn!(
                        pid = d.pid,
                        "the image is whole, but its memory tracking cannot go on: {e:#}"
                    );
                }
            }
            Some((t, false)) if opts.leave_running => t.stop(),
            _ => {}
        }
    }
    s.processes = dumps.len();
    s.total = t0.elapsed();
    tracing::info!(pid, ?s, "dumped");
    Ok(s)
}

/// Kills every snapshot of the dumped processes (those noted in `made`, and any found by the
/// region they map) and has each process reap its own, seizing it again for that if it was
/// let go. Returns the longest of those second freezes.
fn end_snapshots(tasks: &mut [tree::Task], made: &[(i32, i32)]) -> Result<Duration> {
    let mut longest = Duration::ZERO;
    let mut first_err = None;
    for t in tasks.iter_mut() {
        let mut kids = stasis_infect::snapshots_of(t.pid);
        for &(pid, child) in made {
            if pid == t.pid && !kids.contains(&child) {
                kids.push(child);
            }
        }
        if kids.is_empty() {
            continue;
        }
        // A step of its own for the kill test: dying here leaves a live snapshot beside a
        // running process, for the guardian to end.
        stasis_sys::fault::point();
        stasis_infect::guardian::kill_snapshots(&kids);
        let t0 = Instant::now();
        let reaped = if t.seized.is_released() {
            match Seized::seize(t.pid) {
                Ok(mut s) => stasis_infect::Parasite::reap_children(&mut s, &kids)
                    .and_then(|()| s.release())
                    .map_err(anyhow::Error::from),
                // It exited while its memory was copied: its children, the snapshot with
                // them, went to its reaper.
                Err(_) if stasis_proc::stat(t.pid).map_or(true, |st| st.is_zombie()) => Ok(()),
                Err(e) => Err(e.into()),
            }
        } else {
            stasis_infect::Parasite::reap_children(&mut t.seized, &kids)
                .map_err(anyhow::Error::from)
        };
        let frozen = t0.elapsed();
        match reaped {
            Ok(()) => {
                longest = longest.max(frozen);
                tracing::info!(pid = t.pid, snapshots = ?kids, frozen = ?frozen, "snapshot reaped");
                stasis_infect::guardian::note_snapshot_gone(t.pid)?;
            }
            Err(e) => {
                first_err.get_or_insert(e.context(format!(
                    "pid {}: reaping its memory snapshot {kids:?}",
                    t.pid
                )));
            }
        }
    }
    first_err.map_or(Ok(longest), Err)
}

/// One process of the tree, read and its pages written, its records not yet.
pub(crate) struct TaskDump {
    pub pid: i32,
    images: ImageDir,
    pub cores: Vec<Core>,
    pub mm: Mm,
    pub process: Process,
    pub files: Files,
    pub desc_keys: Vec<files::DescKey>,
    vdso: VdsoRecord,
    inventory: Inventory,
    parent_pages: u64,
    /// Its memory tracker, and whether it goes on tracking from this image (else it ends).
    tracking: Option<(track::Tracker, bool)>,
}

struct Written {
    pages: u64,
    bytes: u64,
    vmas: usize,
    fds: usize,
    threads: usize,
}

impl TaskDump {
    fn write(&self) -> Result<Written> {
        let images = &self.images;
        for core in &self.cores {
            write_record(images, &core_name(core.tid), KIND_CORE, core)?;
        }
        write_record(images, MM, KIND_MM, &self.mm)?;
        write_record(images, PROCESS, KIND_PROCESS, &self.process)?;
        write_record(images, FILES, KIND_FILES, &self.files)?;
        write_record(images, VDSO, KIND_VDSO, &self.vdso)?;
        Ok(Written {
            pages: self.inventory.page_data_len / PAGE_SIZE as u64,
            bytes: self.inventory.page_data_len,
            vmas: self.mm.vmas.len(),
            fds: self.files.fds.len(),
            threads: self.cores.len(),
        })
    }

    /// The inventory of a descendant is written with its records; the root's comes last.
    fn write_inventory(&self) -> Result<()> {
        write_record(&self.images, INVENTORY, KIND_INVENTORY, &self.inventory)?;
        Ok(())
    }
}

/// One process read but for its memory, whose copy runs on in the background.
struct PendingTask<'s> {
    pid: i32,
    root: bool,
    pre_dump: bool,
    images: ImageDir,
    files: Files,
    desc_keys: Vec<files::DescKey>,
    locks_to_check: files::LocksToCheck,
    work: FrozenWork,
    job_stop: Option<i32>,
    model: mm::MemModel,
    copy: PendingCopy<'s>,
    tracking: Option<(track::Tracker, bool)>,
}

/// A process's memory copy, running in the background.
struct PendingCopy<'s> {
    pid: i32,
    /// Closed once nothing more is read from the process itself.
    frozen_done: std::sync::mpsc::Receiver<()>,
    copier: std::thread::ScopedJoinHandle<'s, (PageWriter, Result<()>)>,
}

impl PendingCopy<'_> {
    /// Waits until the copy needs nothing more from the frozen process (the rest, if any,
    /// comes from its snapshot).
    fn frozen_part_done(&self) {
        // Only ever dropped, never sent on: recv returns when the copier lets go of it.
        let _ = self.frozen_done.recv();
    }

    /// Waits for the copy and completes `d`'s inventory with what pages.img holds.
    fn finish(self, d: &mut TaskDump) -> Result<()> {
        let pid = self.pid;
        let (pages, copied) = self
            .copier
            .join()
            .map_err(|_| anyhow::anyhow!("the memory copy thread of pid {pid} panicked"))?;
        copied?;
        let summary = pages.finish().context("finishing pages.img")?;
        d.inventory.page_data_len = summary.data_len;
        d.inventory.page_data_xxh3 = summary.checksum;
        Ok(())
    }
}

/// Reads one frozen process of the tree (nothing in it is changed but by the parasite, which
/// is cured before this returns) and starts the copy of its pages into `scope`.
fn start_task<'s>(
    scope: &'s std::thread::Scope<'s, '_>,
    pid: i32,
    seized: &mut Seized,
    images: ImageDir,
    opts: &DumpOptions,
    root: bool,
    net: &mut files::NetLock,
) -> Result<PendingTask<'s>> {
    let threads = seized.threads().to_vec();
    let t0 = Instant::now();
    // A thread inside a vDSO function is stepped out of it first (CRIU issue #512).
    if let Some(vdso) = stasis_vdso::VdsoLayout::of_pid(pid)?.vdso() {
        let moved = seized.step_out_of((vdso.start, vdso.end), 100_000)?;
        if !moved.is_empty() {
            tracing::info!(pid, threads = ?moved, "stepped out of the vDSO before dumping");
        }
    }

    // A memory tracker of an earlier dump, and the image it was armed for.
    let tracker = track::Tracker::find(pid)?;
    let tracked = tracker.is_some();
    let parent = match &opts.prev_images_dir {
        Some(prev) => {
            // Relative to the root's image directory, as CRIU has it; a descendant's parent
            // is the image of the same pid in it.
            let rel = if root {
                prev.clone()
            } else if prev.is_absolute() {
                prev.join(task_dir_name(pid))
            } else {
                std::path::Path::new("..")
                    .join(prev)
                    .join(task_dir_name(pid))
            };
            match track::Parent::load(images.path(), &rel, pid) {
                Ok(p) => Some((p, rel)),
                // A process of the tree the earlier image did not have.
                Err(e) if !root => {
                    tracing::info!(pid, "no parent image: {e:#}");
                    None
                }
                Err(e) => return Err(e),
            }
        }
        None => None,
    };
    // Pages come from the parent only if the tracker protected them for it.
    let parent = parent.and_then(|(p, rel)| {
        if tracker.as_ref().and_then(|t| t.baseline()) == Some(p.image_id.as_str()) {
            return Some(p);
        }
        tracing::warn!(
            pid,
            "pid {pid}'s memory was not tracked since {} (stasis pre-dump, or dump --leave-running --track-mem, arms the tracker): every page is dumped",
            rel.display()
        );
        None
    });
    // Everything that could refuse the dump comes first, before the process is changed. The
    // memory map's flags (smaps, which walks every page table) are read beside the rest.
    let smaps = scope.spawn(move || crate::mm::preflight(pid, tracked));
    let vm_flags = || -> Result<mm::VmFlagsMap> {
        smaps
            .join()
            .map_err(|_| anyhow::anyhow!("the smaps reader of pid {pid} panicked"))?
    };
    preflight::check(pid, &threads)?;
    let t_preflight = t0.elapsed();
    let mut pages = PageWriter::create(&images).context("creating pages.img")?;
    let mut files = Files::default();
    files::collect_mapped(pid, &stasis_proc::maps(pid)?, &mut files, &mut pages)?;
    let (files, desc_keys, locks_to_check) = if opts.pre_dump {
        (files, Vec::new(), files::LocksToCheck::none())
    } else {
        files::collect(
            pid,
            &files::Options {
                file_locks: opts.file_locks,
                tcp_established: opts.tcp_established,
                tcp_close: opts.tcp_close,
            },
            files,
            &mut pages,
            net,
        )?
    };
    // Memory is planned now and copied in the background while the threads are read and the
    // parasite does its work: neither changes the process's memory, but for the injection
    // site's page, which waits for the cure.
    let site = stasis_infect::injection_site(pid)?;
    let t_files = t0.elapsed();
    let snapshot = opts.leave_running && opts.snapshot;
    let (copy_plan, model) = mm::plan(
        pid,
        vm_flags,
        site,
        stasis_image::DATA_OFFSET + pages.data_len(),
        snapshot,
        parent.as_ref(),
    )?
    .split();
    // Tracking goes on from this image (armed while frozen, by `frozen_work`), or ends.
    let arms = opts.leave_running && (opts.pre_dump || opts.track_mem);
    let (arm, tracker) = if arms {
        let (vmas, pages) = model.tracked_ranges();
        (
            Some(ArmJob {
                tracker,
                vmas,
                pages,
            }),
            None,
        )
    } else {
        (None, tracker)
    };
    tracing::info!(pid, preflight = ?t_preflight, files = ?t_files, planned = ?t0.elapsed(), "files read, memory planned");
    let (source_tx, source_rx) = std::sync::mpsc::channel::<Option<i32>>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let copier = scope.spawn(move || {
        let r = mm::copy(pid, &copy_plan, &mut pages, &source_rx, done_tx);
        (pages, r)
    });
    let work = frozen_work(pid, &threads, seized, &source_tx, snapshot, arm);
    // If the work failed, the copier learns it when the channel closes.
    drop(source_tx);
    let mut work = match work {
        Ok(w) => w,
        Err(e) => {
            let _ = copier.join();
            return Err(e);
        }
    };
    let tracking = match (work.tracker.take(), tracker) {
        (Some(armed), _) => Some((armed, true)),
        (None, Some(found)) => Some((found, false)),
        (None, None) => None,
    };
    Ok(PendingTask {
        pid,
        root,
        pre_dump: opts.pre_dump,
        tracking,
        images,
        files,
        desc_keys,
        locks_to_check,
        work,
        job_stop: seized.job_stop(),
        model,
        copy: PendingCopy {
            pid,
            frozen_done: done_rx,
            copier,
        },
    })
}

/// Completes what is read of a process (still frozen) but its memory, whose copy goes on.
fn finish_task<'s>(
    p: PendingTask<'s>,
    proc_locks: &files::ProcLocks<'_>,
) -> Result<(TaskDump, PendingCopy<'s>)> {
    let PendingTask {
        pid,
        root,
        pre_dump,
        tracking,
        images,
        mut files,
        desc_keys,
        locks_to_check,
        work,
        job_stop,
        model,
        copy,
    } = p;
    let frozen_at = Instant::now();
    if !pre_dump {
        locks_to_check.check(pid, &mut files, proc_locks)?;
    }
    let threads: Vec<i32> = work.cores.iter().map(|c| c.tid).collect();
    let FrozenWork {
        mut cores,
        shared_pending,
        proc_timers,
        times,
        asked,
        task_raw,
        thread_raw,
        t_collected,
        t_parasite,
        snapshot: _,
        first_pending,
        tracker: _,
    } = work;
    let vdso_info = asked.verify()?;
    let task = decode_task_state(pid, &task_raw)?;
    for ((core, raw), &tid) in cores.iter_mut().zip(&thread_raw).zip(&threads) {
        thread::apply_thread_state(core, &thread::decode_thread_state(tid, raw)?);
    }
    if root {
        if let Some(c) = cores.iter().find(|c| c.pdeathsig != 0) {
            bail!(
                "thread {} of pid {pid} has a parent-death signal ({}) for a parent that is not dumped with it; not supported",
                c.tid,
                c.pdeathsig
            );
        }
    }

    // Still frozen, parasite gone: the address space as the process knows it.
    // /proc/PID/stat is read once, frozen, for both the mm fields and the session/pgid.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let stat = task::stat_fields(&stat).with_context(|| format!("parsing /proc/{pid}/stat"))?;
    let parents = model.parents();
    let parent_pages = model.parent_pages();
    let (mm, vdso) = mm::finish(pid, model, &task, &vdso_info, &stat)?;
    let t_mm_done = frozen_at.elapsed();
    if mm.exe.ends_with(DELETED_SUFFIX) && files.unnamed(mm.exe_dev, mm.exe_inode).is_none() {
        bail!(
            "pid {pid} runs a deleted program ({}) that it no longer maps; its contents cannot be saved",
            mm.exe
        );
    }
    let mut process = task::collect_process(pid, &task, &stat, shared_pending)?;
    process.job_stop = job_stop;
    tracing::debug!(elapsed = ?frozen_at.elapsed(), "process state collected");
    process.posix_timers = task::posix_timers(pid, &proc_timers, &times)?;
    let now: Vec<&PendingSignal> = cores
        .iter()
        .flat_map(|c| c.pending.iter())
        .chain(process.shared_pending.iter())
        .collect();
    task::settle_timers(&mut process.posix_timers, &first_pending, &now);
    let (monotonic_ns, boottime_ns) = task::clocks_seen_by(pid)?;
    tracing::info!(
        pid,
        threads = threads.len(),
        collected = ?t_collected,
        parasite = ?t_parasite,
        memory_done = ?t_mm_done,
        "frozen phases"
    );

    let leader = &cores[0];
    let xcr0 = leader
        .xsave
        .get(464..472)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0);
    let inventory = Inventory {
        pid,
        threads: threads.clone(),
        comm: process.comm.clone(),
        kernel: task::kernel_release(),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        stasis_version: env!("CARGO_PKG_VERSION").to_string(),
        xsave_size: leader.xsave.len() as u32,
        xcr0,
        xsave_layout: stasis_infect::xsave::layout(),
        monotonic_ns,
        boottime_ns,
        // Filled in when the copy is done (`PendingCopy::finish`).
        page_data_len: 0,
        page_data_xxh3: 0,
        netlock: None,
        image_id: track::new_image_id(),
        pre_dump,
        parents,
    };
    Ok((
        TaskDump {
            pid,
            images,
            cores,
            mm,
            process,
            files,
            desc_keys,
            vdso,
            inventory,
            parent_pages,
            tracking,
        },
        copy,
    ))
}

/// What is read from the frozen process beside its memory: through ptrace and /proc, and from
/// inside by the parasite (which is cured before this returns, successfully or not).
struct FrozenWork {
    cores: Vec<Core>,
    shared_pending: Vec<PendingSignal>,
    proc_timers: Vec<stasis_proc::ProcTimer>,
    times: Vec<u8>,
    asked: vdso_report::AskedVdso,
    task_raw: Vec<u8>,
    thread_raw: Vec<Vec<u8>>,
    t_collected: Duration,
    /// The copy-on-write snapshot child, if one was made.
    snapshot: Option<i32>,
    /// The signal queues as first read, before the timers (see `task::settle_timers`).
    first_pending: Vec<PendingSignal>,
    t_parasite: Duration,
    /// The memory tracker, armed for this image.
    tracker: Option<track::Tracker>,
}

/// What arms the memory tracker of a process (a new one if it has none): its private
/// anonymous VMAs and the ranges of them the image holds.
struct ArmJob {
    tracker: Option<track::Tracker>,
    vmas: Vec<(u64, u64)>,
    pages: Vec<(u64, u64)>,
}

fn frozen_work(
    pid: i32,
    threads: &[i32],
    seized: &mut Seized,
    source: &std::sync::mpsc::Sender<Option<i32>>,
    snapshot: bool,
    arm: Option<ArmJob>,
) -> Result<FrozenWork> {
    let t0 = Instant::now();
    let cores = threads
        .iter()
        .map(|&tid| thread::collect_core(pid, tid, seized))
        .collect::<Result<Vec<Core>>>()?;
    let shared_pending = thread::pending(nix::unistd::Pid::from_raw(pid), true)
        .context("reading pending signals")?;
    let t_collected = t0.elapsed();

    let blob = stasis_blobs::parasite()?;
    let proc_timers = stasis_proc::timers(pid)?;
    let ids: Vec<u8> = proc_timers
        .iter()
        .flat_map(|t| t.id.to_le_bytes())
        .collect();
    let size = RegionSize {
        plan_cap: ids.len().max(64),
        ..RegionSize::default()
    };
    let mut parasite = Parasite::infect(seized, blob, size)?;
    let asked = vdso_report::ask_vdso(&mut parasite)?;
    let task_raw = parasite.run(CommandId::TaskState, vdso_report::COMMAND_TIMEOUT)?;
    let times = if ids.is_empty() {
        Vec::new()
    } else {
        parasite.run_plan(
            CommandId::TimerState,
            &ids,
            ids.len(),
            vdso_report::COMMAND_TIMEOUT,
        )?
    };
    // Timers run on while the process is frozen: one may have expired between the first
    // read of the signal queues (above) and the timers' (just now), its signal in no read.
    // The queues are read again; `task::settle_timers` counts each expiry once.
    let mut cores = cores;
    let mut shared_pending = shared_pending;
    let mut first_pending = Vec::new();
    if !ids.is_empty() {
        first_pending = cores
            .iter()
            .flat_map(|c| c.pending.iter().cloned())
            .chain(shared_pending.iter().cloned())
            .collect();
        for c in cores.iter_mut() {
            c.pending = thread::pending(nix::unistd::Pid::from_raw(c.tid), false)
                .with_context(|| format!("reading the pending signals of thread {}", c.tid))?;
        }
        shared_pending = thread::pending(nix::unistd::Pid::from_raw(pid), true)
            .context("reading pending signals")?;
    }
    // What only each thread can tell about itself: the parasite runs in every one of them.
    let mut thread_raw = Vec::with_capacity(threads.len());
    for &tid in threads {
        thread_raw.push(parasite.run_plan_in(
            tid,
            CommandId::ThreadState,
            &[],
            0,
            vdso_report::COMMAND_TIMEOUT,
        )?);
    }
    // Armed while frozen, after the pages were planned (the scan read what the last arming
    // tracked) and before the process runs on: every write from the freeze on is seen.
    let tracker = match arm {
        Some(job) => {
            let mut t = match job.tracker {
                Some(t) => t,
                None => track::Tracker::new(pid, parasite.make_userfaultfd()?)?,
            };
            t.arm(&job.vmas, &job.pages)?;
            Some(t)
        }
        None => None,
    };
    // Last, so that nothing the parasite does is in it (its region is, but not in the plan).
    let snapshot = if snapshot {
        let t_fork = Instant::now();
        match parasite.fork_snapshot() {
            Ok(child) => {
                tracing::info!(pid, child, took = ?t_fork.elapsed(), "snapshot forked");
                // While it lives, every page the process writes is copied: if memory runs
                // short, the copy is the one to go (the dump then fails; the process runs on).
                if let Err(e) = std::fs::write(format!("/proc/{child}/oom_score_adj"), "1000") {
                    tracing::warn!(
                        pid,
                        child,
                        "making the snapshot the first to go on OOM: {e}"
                    );
                }
                Some(child)
            }
            Err(e) => {
                tracing::warn!(
                    pid,
                    "no copy-on-write snapshot ({e}): the process stays frozen while its memory is copied"
                );
                None
            }
        }
    } else {
        None
    };
    parasite.cure()?;
    // The injection site's page holds its own bytes again: the copy may take it, and the
    // rest from the snapshot.
    let _ = source.send(snapshot);
    Ok(FrozenWork {
        cores,
        shared_pending,
        proc_timers,
        times,
        asked,
        task_raw,
        thread_raw,
        t_collected,
        t_parasite: t0.elapsed(),
        snapshot,
        first_pending,
        tracker,
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
