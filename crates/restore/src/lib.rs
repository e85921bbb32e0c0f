//! `stasis restore`: bring a dumped process back inside a task stasis creates and freezes.
//!
//! 1. Load and check the whole image (every checksum, architecture, XSAVE compatibility, the
//!    pid being free, the vDSO matching this kernel) before anything is created.
//! 2. `clone3` with `set_tid` = the dumped pid. The child, still running stasis's code, sets up
//!    what plain system calls can: files at their numbers, cwd, umask, session, signal
//!    handlers, and the helper descriptors the plan needs; then it blocks, and is seized.
//! 3. The host plans the address space (`plan.rs`): unmap the child's own mappings, move the
//!    kernel's vDSO areas onto the dumped addresses, map every VMA, fill pages from pages.img,
//!    mm fields, rseq, robust list, timers, pending signals, limits, credentials. The restorer
//!    (the parasite's `Restore` command) executes it from a region placed where the restored
//!    process has nothing.
//! 4. The host sets registers, XSAVE and the signal mask, removes the region, and detaches.
//!
//! Anything that fails before step 4 kills the half-made task: no stray process is left.

mod child;
mod fds;
mod files;
mod fill;
mod lazy;
mod mm;
mod plan;
mod rebuild;
mod shm;
mod spawn;
mod thread;
mod vdso;

pub use vdso::{VdsoMode, VdsoPlan};

use anyhow::{bail, Context, Result};
use plan::PlanError;
use spawn::{spawn_tree, Plumbing, Spawn, TaskPlan, TreeGuard};
use stasis_image::model::*;
use stasis_image::{load_tree, Image};
use stasis_infect::{Parasite, RegionSize, Seized};
use stasis_sys::ptrace as sys;
use std::time::{Duration, Instant};

pub struct RestoreOptions {
    pub detach: bool,
    /// Restore an image that carries no valid MAC of this host's key (`--trust-image`).
    pub trust_image: bool,
    /// Give terminals in the image this stasis's own (CRIU's `--shell-job`).
    pub shell_job: bool,
    pub vdso: VdsoMode,
    /// Every process comes back stopped, as if by SIGSTOP (`--leave-stopped`).
    pub leave_stopped: bool,
    /// The processes run before their private anonymous memory is in: it is served on
    /// fault and pushed in the background (`--lazy-pages`, `lazy.rs`).
    pub lazy_pages: bool,
}

pub fn restore(dir: &std::path::Path, opts: &RestoreOptions) -> Result<i32> {
    let t0 = Instant::now();
    // A lazy restore verifies the pages it serves lazily one by one, as it serves them.
    let tree = if opts.lazy_pages {
        stasis_image::load_tree_deferred(dir)?
    } else {
        load_tree(dir)?
    };
    if tree.root.inventory.pre_dump {
        bail!(
            "{} is a pre-dump: it holds memory only, as a parent for the dumps after it; restore the last dump of the chain (`stasis dump --prev-images-dir …`)",
            dir.display()
        );
    }
    authenticate(dir, opts.trust_image)?;
    let digests = if opts.lazy_pages {
        tree.images()
            .map(lazy::verify_all_but_lazy)
            .collect::<Result<Vec<_>>>()?
    } else {
        Vec::new()
    };
    tracing::info!(elapsed = ?t0.elapsed(), processes = tree.tasks.len() + 1, "image loaded and verified");
    let imgs: Vec<&Image> = tree.images().collect();
    for img in &imgs {
        let pid = img.inventory.pid;
        for &tid in &img.inventory.threads {
            if std::path::Path::new(&format!("/proc/{tid}")).exists() {
                let what = if tid == pid { "pid" } else { "thread id" };
                bail!("{what} {tid} is in use: the restored process needs its old ids (kill the process using it, or wait for it to be reaped)");
            }
        }
        if !opts.shell_job {
            if let Some(f) = img.files.fds.iter().find(|f| {
                img.files
                    .desc(f.desc)
                    .is_some_and(|d| matches!(d.kind, FileKind::Tty { .. }))
            }) {
                bail!("pid {pid} had a terminal on fd {}; restore it with --shell-job to give it this one", f.fd);
            }
        }
        fds::check_lent(img)?;
    }
    let vdso = imgs
        .iter()
        .map(|img| VdsoPlan::decide(&img.vdso, opts.vdso))
        .collect::<Result<Vec<_>>>()?;
    tracing::info!(
        pid = tree.root.inventory.pid,
        "vDSO: {}",
        vdso[0].describe()
    );
    let tree_shm = shm::shared_by_several(&imgs);
    let helpers = imgs
        .iter()
        .map(|img| fds::Helpers::new(img, &tree_shm))
        .collect::<Result<Vec<_>>>()?;
    let file_data = imgs
        .iter()
        .map(|img| files::FileData::read(img))
        .collect::<Result<Vec<_>>>()?;
    let mut plans: Vec<TaskPlan<'_>> = imgs
        .iter()
        .zip(&helpers)
        .zip(&file_data)
        .map(|((img, helpers), data)| TaskPlan {
            img,
            helpers,
            data,
            children: Vec::new(),
            parent_pgid: None,
            helper: None,
            zombies: Vec::new(),
        })
        .collect();
    for z in &tree.zombies {
        if std::path::Path::new(&format!("/proc/{}", z.pid)).exists() {
            bail!(
                "pid {} (a zombie child of pid {}) is in use: the restored zombie needs its old id",
                z.pid,
                z.ppid
            );
        }
        let Some(p) = imgs.iter().position(|img| img.inventory.pid == z.ppid) else {
            bail!(
                "zombie {}: its parent {} is not in the image",
                z.pid,
                z.ppid
            );
        };
        plans[p].zombies.push(*z);
    }
    for (i, (t, _)) in tree.tasks.iter().enumerate() {
        let Some(p) = imgs.iter().position(|img| img.inventory.pid == t.ppid) else {
            bail!("pid {}: its parent {} is not in the image", t.pid, t.ppid);
        };
        plans[p].children.push(i + 1);
        plans[i + 1].parent_pgid = Some(imgs[p].process.pgid);
        if let Some(h) = t.helper {
            if std::path::Path::new(&format!("/proc/{h}")).exists() {
                bail!("pid {h} is in use: a helper needs it to make the process group (or session) {h} of pid {} again", t.pid);
            }
            plans[i + 1].helper = Some((h, t.helper_session));
        }
    }
    let plumbing = Plumbing::new(&plans, &tree_shm)?;
    let loaded = t0.elapsed();

    // From here on things are made: whatever happens, the dumped TCP connections' lock goes
    // (after the restore has them back, or when it fails).
    let mut netlock = NetUnlock(tree.root.inventory.netlock.clone());
    let shift = shift_clocks_if_behind(&tree.root.inventory)?;
    let mut guard = TreeGuard {
        pids: Vec::new(),
        armed: false,
    };
    let spawned = spawn_tree(
        Spawn {
            tasks: plans,
            plumbing,
            shell_job: opts.shell_job,
            lazy: opts.lazy_pages,
        },
        &mut guard,
    );
    if let Some(shift) = shift {
        shift.back()?;
    }
    let children = spawned?;
    let t1 = Instant::now();
    let mut seized = Vec::with_capacity(imgs.len());
    let mut servers = Vec::new();
    for (k, ((img, h), vdso)) in imgs.iter().zip(&helpers).zip(&vdso).enumerate() {
        let lazy = digests.get(k).cloned();
        let (s, server) = rebuild_task(img, h, vdso, lazy)?;
        seized.push(s);
        servers.extend(server);
    }
    // Every process is back: each one stopped by job control is stopped again, then all go.
    for (img, s) in imgs.iter().zip(seized.iter_mut()) {
        let pid = img.inventory.pid;
        if opts.leave_stopped && img.process.job_stop.is_none() {
            // As for a job stop below: the first thing it does once released is stop.
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGSTOP,
            )
            .with_context(|| format!("leaving pid {pid} stopped"))?;
        }
        if let Some(sig) = img.process.job_stop {
            // Queued while every thread is still in a ptrace stop: the first thing the
            // process does once released is stop, before any instruction of its own. SIGSTOP,
            // whatever stopped it (it cannot be caught).
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGSTOP,
            )
            .with_context(|| {
                format!("stopping pid {pid} again (it was stopped by signal {sig})")
            })?;
        }
        let _ = s;
    }
    // The bar goes before any process runs (a shell job's writes to this same terminal).
    stasis_image::progress::finish();
    // The terminal's modes before any process runs: a key typed at once is read in them.
    for img in &imgs {
        set_terminal_modes(img);
    }
    // The connections' packets flow again before any process runs, and each connection
    // tells its peer where it stands: the window probe it sent on leaving repair mode went
    // into the lock, and a peer that last saw a zero window would otherwise wait for its
    // own backed-off probe timer (seconds, up to two minutes) before sending again.
    netlock.release();
    for img in &imgs {
        announce_connections(img);
    }
    let pid = tree.root.inventory.pid;
    let mut ended = None;
    if opts.lazy_pages {
        tracing::info!(pid, processes = imgs.len(), loaded = ?loaded, frozen = ?t1.elapsed(), total = ?t0.elapsed(), "restored; memory to come");
        let tids: Vec<i32> = seized.iter().flat_map(|s| s.threads().to_vec()).collect();
        // From here the processes run, traced by this stasis (which they die with) until
        // every page is in.
        ended = lazy::run_traced(tids, servers, pid)?;
        for s in seized.iter_mut() {
            s.forget();
        }
    } else {
        for s in seized.iter_mut() {
            s.release()?;
        }
    }
    guard.armed = false;
    drop(children);
    tracing::info!(pid, processes = imgs.len(), loaded = ?loaded, frozen = ?t1.elapsed(), total = ?t0.elapsed(), "restored");
    if opts.detach {
        return Ok(0);
    }
    match ended {
        Some(status) => Ok(status),
        None => wait_exit(pid),
    }
}

/// A restore as root makes processes with whatever credentials, files and program the image
/// names: it must be an image this host's root made and nobody altered (its MAC), unless the
/// user says to trust it. A restore by another user can give the processes nothing that user
/// does not have (the kernel sees to that), and cannot read the key: it is not checked.
fn authenticate(dir: &std::path::Path, trust: bool) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    if trust {
        tracing::warn!(
            "restoring {} without checking its MAC (--trust-image)",
            dir.display()
        );
        return Ok(());
    }
    let Some(key) = stasis_image::auth::host_key(false)? else {
        bail!(
            "image not authenticated: there is no image key on this machine ({}), so {} cannot have been dumped here; restore it with --trust-image if you trust it",
            stasis_image::auth::key_path().display(),
            dir.display()
        );
    };
    stasis_image::auth::verify(dir, &key)
        .map_err(|e| anyhow::anyhow!("{e}; restore it with --trust-image if you trust it"))
}

/// Makes each restored established TCP connection of `img` (its process still frozen, so
/// nothing else uses the socket) send a window probe, as leaving repair mode does: repair
/// mode on and off again through a copy of its descriptor, then `SO_REUSEADDR` set again if
/// the process had it (leaving repair mode clears it). A failure only costs the peer's wait.
fn announce_connections(img: &Image) {
    let pid = img.inventory.pid;
    let files = &img.files;
    let conns: Vec<(i32, &Socket)> = files
        .fds
        .iter()
        .filter_map(|f| match files.desc(f.desc).map(|d| &d.kind) {
            Some(FileKind::Socket(s)) if s.tcp.is_some() => Some((f.fd, &**s)),
            _ => None,
        })
        .collect();
    if conns.is_empty() {
        return;
    }
    let pidfd = match stasis_sys::fs::pidfd_open(pid) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(pid, "cannot reach the restored connections: {e}");
            return;
        }
    };
    use stasis_sys::sock;
    for (fd, s) in conns {
        let r = stasis_sys::fs::pidfd_getfd(&pidfd, fd).and_then(|copy| {
            sock::setsockopt_int(&copy, libc::IPPROTO_TCP, sock::TCP_REPAIR, 1)?;
            sock::setsockopt_int(&copy, libc::IPPROTO_TCP, sock::TCP_REPAIR, 0)?;
            match s
                .opts
                .iter()
                .find(|o| (o.level, o.name) == (libc::SOL_SOCKET, libc::SO_REUSEADDR))
            {
                Some(o) => sock::setsockopt(&copy, o.level, o.name, &o.value),
                None => Ok(()),
            }
        });
        match r {
            Ok(()) => tracing::debug!(pid, fd, "connection announced"),
            Err(e) => tracing::warn!(pid, fd, "announcing the restored connection: {e}"),
        }
    }
}

/// The network lock of an image's TCP connections, removed once (when released, or dropped).
struct NetUnlock(Option<String>);

impl NetUnlock {
    fn release(&mut self) {
        let Some(t) = self.0.take() else { return };
        if !stasis_sys::netlock::exists(&t) {
            tracing::info!("the network lock {t} is not on this machine");
            return;
        }
        match stasis_sys::netlock::unlock(&t) {
            Ok(()) => tracing::info!("network lock {t} released"),
            Err(e) => tracing::error!("releasing the network lock {t}: {e}"),
        }
    }
}

impl Drop for NetUnlock {
    fn drop(&mut self) {
        self.release();
    }
}

/// Rebuilds one prepared task into its dumped process: seize it, run the restorer's plan,
/// fill its memory, make its threads, set every thread's registers. Returns it still seized
/// (cured), so that the whole tree is let go together.
fn rebuild_task(
    img: &Image,
    helpers: &fds::Helpers,
    vdso: &VdsoPlan,
    mut lazy_digests: Option<lazy::Digests>,
) -> Result<(Seized, Option<lazy::Server>)> {
    let lazy = lazy_digests.is_some();
    let pid = img.inventory.pid;
    let mut seized = Seized::seize_owned(pid)?;
    seized.trace_clones()?;
    let leader = nix::unistd::Pid::from_raw(pid);
    let runtime_xsave = sys::get_xstate(leader)?;
    let xsaves = img
        .cores
        .iter()
        .map(|c| thread::xsave_for_here(img, c, &runtime_xsave))
        .collect::<Result<Vec<_>>>()?;
    let child_maps = stasis_proc::maps(pid)?;
    let child_rseq = sys::rseq_config(leader)?;

    let blob = stasis_blobs::parasite()?;
    let mut uffd = fill::take_uffd(pid, helpers.uffd_fd);
    let how = match uffd {
        Some(_) => mm::Fill::Uffd(helpers.uffd_fd),
        None if lazy => bail!("pid {pid}: --lazy-pages needs a userfaultfd with fork, remap, remove and unmap events, which the new task could not make (not root, or a kernel without them)"),
        None => mm::Fill::Pread,
    };
    let plan = rebuild::build(img, helpers, vdso, &child_maps, child_rseq, how, lazy)?;
    let mut server = None;
    let thread_plans: Vec<plan::Plan> = img.cores[1..]
        .iter()
        .map(|c| thread::plan(img, c))
        .collect();
    let mut size = RegionSize {
        reply_cap: 4096,
        plan_cap: thread_plans
            .iter()
            .chain([&plan.before, &plan.after])
            .map(plan::Plan::byte_len)
            .fold(0, usize::max),
        at: None,
    };
    size.at = Some(vdso::free_range(
        &img.mm,
        &child_maps,
        &plan.before.reserved,
        size.total_len(blob) as u64,
    )?);
    let mut parasite = Parasite::infect(&mut seized, blob, size)?;
    tracing::debug!(region = ?parasite.remote_region(), "restorer region");
    plan.before.log();
    plan.after.log();
    let t_plan = Instant::now();
    // Once the plan runs, the task's old address space (and the injection site) is going:
    // on failure there is nothing to cure, and the guard kills the task.
    let rebuilt = (|parasite: &mut Parasite<'_>| -> Result<()> {
        run_plan(parasite, pid, pid, &plan.before)?;
        let t_fill = Instant::now();
        if let Some(uffd) = &uffd {
            fill::fill(uffd, &img.pages, &img.parents, &plan.host_runs)
                .with_context(|| format!("filling the memory of pid {pid}"))?;
        }
        if lazy && !plan.lazy_runs.is_empty() {
            // Served from now on: the rest of the restore may touch lazy memory already
            // (the kernel writes a thread's rseq area on its way back to user mode).
            if let (Some(u), Some(d)) = (uffd.take(), lazy_digests.take()) {
                server = Some(lazy::Server::start(
                    pid,
                    u,
                    &img.pages,
                    &img.parents,
                    &plan.lazy_runs,
                    d,
                )?);
            }
        }
        let filled = t_fill.elapsed();
        run_plan(parasite, pid, pid, &plan.after)?;
        tracing::info!(
            pid,
            elapsed = ?t_plan.elapsed(),
            host_fill = ?filled,
            ops = plan.before.len() + plan.after.len(),
            "restorer ran the plan"
        );
        // The threads the plan created: each the one the image names, each runs its own plan.
        let created = parasite.adopt_clones()?;
        let expected: Vec<i32> = img.cores[1..].iter().map(|c| c.tid).collect();
        if created != expected {
            bail!("pid {pid}: the restorer created threads {created:?}, expected {expected:?}");
        }
        for (c, p) in img.cores[1..].iter().zip(&thread_plans) {
            run_plan(parasite, pid, c.tid, p)?;
        }
        Ok(())
    })(&mut parasite);
    drop(uffd);
    if let Err(e) = rebuilt {
        parasite.abandon();
        return Err(e);
    }
    tracing::info!(pid, threads = img.cores.len(), elapsed = ?t_plan.elapsed(), "threads restored");

    // Every thread into its dumped state; the leader last, as it removes the region.
    for (c, x) in img.cores.iter().zip(&xsaves).skip(1) {
        let t = nix::unistd::Pid::from_raw(c.tid);
        let what = |op: &str, e| anyhow::anyhow!("thread {} of pid {pid}: {op}: {e}", c.tid);
        sys::set_regs(t, &thread::regs_for_resume(&c.gpr)).map_err(|e| what("SETREGS", e))?;
        sys::set_xstate(t, x).map_err(|e| what("SETREGSET(XSTATE)", e))?;
        sys::set_sigmask(t, c.sigmask).map_err(|e| what("SETSIGMASK", e))?;
    }
    let l = img.leader();
    parasite.cure_into(
        thread::regs_for_resume(&l.gpr),
        xsaves[0].clone(),
        l.sigmask,
    )?;
    Ok((seized, server))
}

/// Runs one plan in thread `tid`; on failure names the operation, and gives the task up (the
/// guard kills it: a half-rebuilt task has nothing to cure).
fn run_plan(parasite: &mut Parasite<'_>, pid: i32, tid: i32, plan: &plan::Plan) -> Result<()> {
    let base = parasite.plan_base().context("no plan area")?;
    let (bytes, ops_len) = plan.encode(base);
    let reply = parasite.run_plan_in(
        tid,
        stasis_abi::CommandId::Restore,
        &bytes,
        ops_len,
        Duration::from_secs(60),
    );
    if reply.is_err() {
        tracing::debug!(maps = %std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default(), "task at failure");
    }
    let reply = match reply {
        Ok(r) => r,
        Err(stasis_infect::InfectError::ParasiteStatus { .. })
        | Err(stasis_infect::InfectError::BadReply { .. }) => {
            // The reply carries which operation failed; fetch it for the message.
            let why = plan.describe_failure(&parasite.last_reply());
            bail!("pid {pid}: the restorer failed in thread {tid}: {why}")
        }
        Err(e) => return Err(e.into()),
    };
    plan.check_result(&reply)
        .map_err(|e: PlanError| anyhow::anyhow!("pid {pid}, thread {tid}: {e}"))
}

/// The shell job's terminal gets the modes the process had set (raw mode, no echo…) once the
/// process is back: it is this stasis's own terminal, lent to the process.
fn set_terminal_modes(img: &Image) {
    for d in &img.files.descs {
        if let FileKind::Tty {
            inherit: Some(n),
            termios,
            ..
        } = &d.kind
        {
            let Ok(t) = <[u8; stasis_sys::fs::KERNEL_TERMIOS_LEN]>::try_from(termios.as_slice())
            else {
                continue;
            };
            if let Err(e) = stasis_sys::fs::tty_set_attr(*n, &t) {
                tracing::warn!("setting the terminal modes on fd {n}: {e}");
            }
        }
    }
}

/// When this machine's CLOCK_MONOTONIC or CLOCK_BOOTTIME is behind the image's (it booted
/// more recently than the dumping one), the restored process must not see them go backwards:
/// put it in a new time namespace whose offsets make both clocks continue from the dumped
/// values. `unshare(CLONE_NEWTIME)` leaves stasis where it is and places its next child in
/// the new namespace; the offsets must be written before that child exists.
///
/// Returns our own time namespace when it made a new one: once the child exists, stasis goes
/// back to it (`ClockShift::back`), for the kernel refuses new threads (`CLONE_VM`) to a
/// process whose children's time namespace is not its own.
fn shift_clocks_if_behind(inv: &Inventory) -> Result<Option<ClockShift>> {
    let mono = stasis_sys::clock_ns(libc::CLOCK_MONOTONIC);
    let boot = stasis_sys::clock_ns(libc::CLOCK_BOOTTIME);
    if inv.monotonic_ns <= mono && inv.boottime_ns <= boot {
        return Ok(None);
    }
    let ours = std::fs::File::open("/proc/self/ns/time").context("opening /proc/self/ns/time")?;
    let ahead = |dumped: u64, now: u64| dumped.saturating_sub(now);
    let (m, b) = (ahead(inv.monotonic_ns, mono), ahead(inv.boottime_ns, boot));
    // Only this process's future children go to the new namespace.
    if let Err(e) = nix::sched::unshare(new_time_namespace()) {
        bail!(
            "this machine's clocks are behind the image's (booted later) and a time namespace cannot be made to shift them: {}",
            std::io::Error::from(e)
        );
    }
    let offsets = format!(
        "{} {} {}\n{} {} {}\n",
        libc::CLOCK_MONOTONIC,
        m / 1_000_000_000,
        m % 1_000_000_000,
        libc::CLOCK_BOOTTIME,
        b / 1_000_000_000,
        b % 1_000_000_000
    );
    std::fs::write("/proc/self/timens_offsets", &offsets)
        .context("writing /proc/self/timens_offsets")?;
    tracing::info!(
        monotonic_ns = m,
        boottime_ns = b,
        "clocks shifted forward in a new time namespace"
    );
    Ok(Some(ClockShift(ours)))
}

/// `CLONE_NEWTIME`, which nix's `CloneFlags` does not name.
fn new_time_namespace() -> nix::sched::CloneFlags {
    nix::sched::CloneFlags::from_bits_retain(libc::CLONE_NEWTIME)
}

/// Our own time namespace, left for the restored process's new one.
struct ClockShift(std::fs::File);

impl ClockShift {
    /// Makes our own time namespace the one of our future children again.
    fn back(self) -> Result<()> {
        // Stasis is single-threaded here.
        if let Err(e) = nix::sched::setns(&self.0, new_time_namespace()) {
            bail!(
                "returning to our own time namespace: {}",
                std::io::Error::from(e)
            );
        }
        Ok(())
    }
}

fn wait_exit(pid: i32) -> Result<i32> {
    use nix::sys::wait::{waitpid, WaitStatus};
    loop {
        match waitpid(nix::unistd::Pid::from_raw(pid), None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => bail!("waiting for restored pid {pid}: {e}"),
        }
    }
}
