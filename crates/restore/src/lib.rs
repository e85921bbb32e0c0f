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
mod mm;
mod plan;
mod rebuild;
mod spawn;
mod vdso;

pub use vdso::{VdsoMode, VdsoPlan};

use anyhow::{bail, Context, Result};
use fds::inherited;
use plan::PlanError;
use spawn::{spawn_child, ChildGuard};
use stasis_image::model::*;
use stasis_image::{load, Image};
use stasis_infect::{Parasite, RegionSize, Seized};
use stasis_sys::ptrace as sys;
use std::time::{Duration, Instant};

pub struct RestoreOptions {
    pub detach: bool,
    /// Give terminals in the image this stasis's own (CRIU's `--shell-job`).
    pub shell_job: bool,
    pub vdso: VdsoMode,
}

/// The image's XSAVE area made fit for this CPU: as is when the layouts agree, else moved
/// component by component (`xsave::translate`). Refused when the thread holds state of a
/// feature this CPU/kernel does not enable. `runtime` is the XSAVE area of the freshly created task: its
/// size and XCR0 (bytes 464..472) are this kernel's own.
fn xsave_for_here(img: &Image, runtime: &[u8]) -> Result<Vec<u8>> {
    let xcr0 = runtime
        .get(464..472)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0);
    // Only state the thread actually holds (XSTATE_BV) must fit; a feature the dumping CPU
    // merely enabled does not matter. (Code that chose instructions for that CPU at start-up
    // may still use some this one lacks: that is the user's call, as with CRIU's --cpu-cap.)
    let in_use = img
        .core
        .xsave
        .get(512..520)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0);
    if in_use & !xcr0 != 0 {
        bail!(
            "image {}: the thread holds XSAVE state {:#x} that this CPU does not enable ({:#x})",
            img.dir.path().display(),
            in_use & !xcr0,
            xcr0
        );
    }
    if img.inventory.xcr0 != xcr0 {
        tracing::warn!(
            "the image was made on a CPU with XSAVE features {:#x}, this one has {xcr0:#x}: code tuned for that CPU may not run here",
            img.inventory.xcr0
        );
    }
    let here = stasis_infect::xsave::layout();
    if img.core.xsave.len() == runtime.len()
        && (img.inventory.xsave_layout.is_empty() || img.inventory.xsave_layout == here)
    {
        return Ok(img.core.xsave.clone());
    }
    if img.inventory.xsave_layout.is_empty() {
        bail!(
            "image {}: XSAVE area of {} bytes, {} here, and no layout recorded to translate it",
            img.dir.path().display(),
            img.core.xsave.len(),
            runtime.len()
        );
    }
    let x = stasis_infect::xsave::translate(
        &img.core.xsave,
        &img.inventory.xsave_layout,
        &here,
        runtime.len(),
    )?;
    tracing::info!(
        from = img.core.xsave.len(),
        to = x.len(),
        "XSAVE area translated for this CPU"
    );
    Ok(x)
}

pub fn restore(dir: &std::path::Path, opts: &RestoreOptions) -> Result<i32> {
    let t0 = Instant::now();
    let img = load(dir)?;
    tracing::info!(elapsed = ?t0.elapsed(), "image loaded and verified");
    let pid = img.inventory.pid;
    if std::path::Path::new(&format!("/proc/{pid}")).exists() {
        bail!("pid {pid} is in use: the restored process needs its old pid (kill the process using it, or wait for it to be reaped)");
    }
    let vdso = VdsoPlan::decide(&img.vdso, opts.vdso)?;
    tracing::info!(pid, "vDSO: {}", vdso.describe());
    if !opts.shell_job {
        if let Some(f) = img
            .files
            .fds
            .iter()
            .find(|f| matches!(f.kind, FdKind::Tty { .. }))
        {
            bail!("pid {pid} had a terminal on fd {}; restore it with --shell-job to give it this one", f.fd);
        }
    }
    for fd in inherited(&img) {
        // SAFETY: fcntl(F_GETFD) only checks that the descriptor exists.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            bail!("image {}: fd {fd} is a terminal or an outside pipe, taken over from stasis's own fd {fd}, which is not open", dir.display());
        }
    }
    let helpers = fds::Helpers::new(&img)?;
    let file_data = child::file_data(&img)?;
    let loaded = t0.elapsed();

    shift_clocks_if_behind(&img.inventory)?;
    let child = spawn_child(&img, &helpers, &file_data)?;
    let mut guard = ChildGuard { pid, armed: true };
    let t1 = Instant::now();
    let mut seized = Seized::seize(pid)?;
    let xsave = xsave_for_here(&img, &sys::get_xstate(nix::unistd::Pid::from_raw(pid))?)?;
    let child_maps = stasis_proc::maps(pid)?;
    let child_rseq = sys::rseq_config(nix::unistd::Pid::from_raw(pid))?;

    let blob = stasis_blobs::parasite()?;
    let plan = rebuild::build(&img, &helpers, &vdso, &child_maps, child_rseq, &child)?;
    let mut size = RegionSize {
        reply_cap: 4096,
        plan_cap: plan.byte_len(),
        at: None,
    };
    size.at = Some(vdso::free_range(
        &img.mm,
        &child_maps,
        &plan.reserved,
        size.total_len(blob) as u64,
    )?);
    let mut parasite = Parasite::infect(&mut seized, blob, size)?;
    let base = parasite.plan_base().context("no plan area")?;
    let (bytes, ops_len) = plan.encode(base);
    tracing::debug!(region = ?parasite.remote_region(), "restorer region");
    plan.log();
    let t_plan = Instant::now();
    let reply = parasite.run_plan(
        stasis_abi::CommandId::Restore,
        &bytes,
        ops_len,
        Duration::from_secs(60),
    );
    tracing::info!(pid, elapsed = ?t_plan.elapsed(), ops = plan.len(), "restorer ran the plan");
    if reply.is_err() {
        tracing::debug!(maps = %std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default(), "task at failure");
    }
    let reply = match reply {
        Ok(r) => r,
        Err(stasis_infect::InfectError::ParasiteStatus { .. })
        | Err(stasis_infect::InfectError::BadReply { .. }) => {
            // The reply carries which operation failed; fetch it for the message.
            let why = plan.describe_failure(&parasite.last_reply());
            // The task is half rebuilt and will be killed: there is nothing to cure.
            parasite.abandon();
            bail!("pid {pid}: the restorer failed: {why}")
        }
        Err(e) => return Err(e.into()),
    };
    plan.check_result(&reply)
        .map_err(|e: PlanError| anyhow::anyhow!("pid {pid}: {e}"))?;

    let regs = regs_for_resume(&img.core.gpr);
    parasite.cure_into(regs, xsave, img.core.sigmask)?;
    seized.release()?;
    guard.armed = false;
    drop(child);
    tracing::info!(pid, loaded = ?loaded, frozen = ?t1.elapsed(), total = ?t0.elapsed(), "restored");
    if opts.detach {
        return Ok(0);
    }
    wait_exit(pid)
}

/// When this machine's CLOCK_MONOTONIC or CLOCK_BOOTTIME is behind the image's (it booted
/// more recently than the dumping one), the restored process must not see them go backwards:
/// put it in a new time namespace whose offsets make both clocks continue from the dumped
/// values. `unshare(CLONE_NEWTIME)` leaves stasis where it is and places its next child in
/// the new namespace; the offsets must be written before that child exists.
fn shift_clocks_if_behind(inv: &Inventory) -> Result<()> {
    let mono = stasis_sys::clock_ns(libc::CLOCK_MONOTONIC);
    let boot = stasis_sys::clock_ns(libc::CLOCK_BOOTTIME);
    if inv.monotonic_ns <= mono && inv.boottime_ns <= boot {
        return Ok(());
    }
    let ahead = |dumped: u64, now: u64| dumped.saturating_sub(now);
    let (m, b) = (ahead(inv.monotonic_ns, mono), ahead(inv.boottime_ns, boot));
    // SAFETY: unshare only affects this process's future children.
    if unsafe { libc::unshare(libc::CLONE_NEWTIME) } != 0 {
        bail!(
            "this machine's clocks are behind the image's (booted later) and a time namespace cannot be made to shift them: {}",
            std::io::Error::last_os_error()
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
    Ok(())
}

/// Registers for the resumed thread. A thread stopped inside a system call carries
/// `orig_rax` = the call and `rax` = -ERESTART*; detaching lets the kernel restart it, except
/// for -ERESTART_RESTARTBLOCK, whose restart state (`restart_block`) belonged to the old task:
/// that call is re-issued from the start with its original arguments (still in the registers).
fn regs_for_resume(g: &Gpr) -> sys::Regs {
    const ERESTART_RESTARTBLOCK: i64 = -516;
    // SAFETY: user_regs_struct is plain integers; all-zero is a valid value.
    let mut r: sys::Regs = unsafe { std::mem::zeroed() };
    r.r15 = g.r15;
    r.r14 = g.r14;
    r.r13 = g.r13;
    r.r12 = g.r12;
    r.rbp = g.rbp;
    r.rbx = g.rbx;
    r.r11 = g.r11;
    r.r10 = g.r10;
    r.r9 = g.r9;
    r.r8 = g.r8;
    r.rax = g.rax;
    r.rcx = g.rcx;
    r.rdx = g.rdx;
    r.rsi = g.rsi;
    r.rdi = g.rdi;
    r.orig_rax = g.orig_rax;
    r.rip = g.rip;
    r.cs = g.cs;
    r.eflags = g.eflags;
    r.rsp = g.rsp;
    r.ss = g.ss;
    r.fs_base = g.fs_base;
    r.gs_base = g.gs_base;
    r.ds = g.ds;
    r.es = g.es;
    r.fs = g.fs;
    r.gs = g.gs;
    if (g.orig_rax as i64) >= 0 && g.rax as i64 == ERESTART_RESTARTBLOCK {
        r.rax = g.orig_rax;
        r.rip = g.rip.wrapping_sub(2);
        r.orig_rax = u64::MAX;
    }
    r
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
