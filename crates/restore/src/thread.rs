//! One thread of the restored process: creating it with its tid, the plan it runs inside
//! itself (what only a thread can set for itself: sigaltstack, robust list, clear-child-tid,
//! rseq, its pending signals, name, scheduling, affinity, and credentials, which the kernel
//! keeps per thread), and the registers and XSAVE area it resumes with.

use crate::plan::{Arg::D, Arg::V, Plan};
use anyhow::{bail, Result};
use stasis_abi::{EXPECT_ANY, EXPECT_CLONE, EXPECT_OK};
use stasis_image::model::*;
use stasis_image::Image;
use stasis_sys::ptrace as sys;

/// `struct clone_args` (CLONE_ARGS_SIZE_VER2) for a thread with exactly `tid`: the flags of
/// a pthread, no stack (it never runs before the host has set its registers), no exit signal.
pub(crate) fn create(p: &mut Plan, tid: i32) {
    let flags = (libc::CLONE_VM
        | libc::CLONE_FS
        | libc::CLONE_FILES
        | libc::CLONE_SIGHAND
        | libc::CLONE_THREAD
        | libc::CLONE_SYSVSEM) as u64;
    let set_tid = p.put(&(tid as u64).to_le_bytes());
    // flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls, set_tid,
    // set_tid_size, cgroup
    let args = p.put_u64s(&[flags, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    let (D(args_off), D(set_tid_off)) = (args, set_tid) else {
        unreachable!("put returns data")
    };
    p.fixups.push((args_off + 8 * 8, set_tid_off));
    p.op(
        0,
        [args, V(11 * 8), V(tid as u64), V(0), V(0), V(0)],
        EXPECT_CLONE,
        format!("create thread {tid}"),
    );
}

/// What the thread `c` sets for itself, run in that thread (the leader runs it in its plan).
pub(crate) fn own_state(p: &mut Plan, pid: i32, c: &Core) {
    let ss_flags = (c.altstack.flags & !1) as u64; // SS_ONSTACK is a state, not a setting
    let ss = p.put_u64s(&[c.altstack.sp, ss_flags, c.altstack.size]);
    p.op(
        libc::SYS_sigaltstack,
        [ss, V(0), V(0), V(0), V(0), V(0)],
        EXPECT_OK,
        format!("thread {}: sigaltstack", c.tid),
    );
    if c.robust_list != 0 {
        p.op(
            libc::SYS_set_robust_list,
            [
                V(c.robust_list),
                V(c.robust_list_len),
                V(0),
                V(0),
                V(0),
                V(0),
            ],
            EXPECT_OK,
            format!("thread {}: set_robust_list", c.tid),
        );
    }
    p.op(
        libc::SYS_set_tid_address,
        [V(c.clear_child_tid), V(0), V(0), V(0), V(0), V(0)],
        EXPECT_ANY,
        format!("thread {}: set_tid_address", c.tid),
    );
    if let Some(r) = c.rseq {
        p.op(
            libc::SYS_rseq,
            [
                V(r.addr),
                V(r.len as u64),
                V(0),
                V(r.sig as u64),
                V(0),
                V(0),
            ],
            EXPECT_OK,
            format!("thread {}: register rseq", c.tid),
        );
    }
    // Only the thread itself may queue a kill()-style signal (si_code >= 0) at itself.
    for s in &c.pending {
        let info = p.put(&s.siginfo);
        p.op(
            libc::SYS_rt_tgsigqueueinfo,
            [
                V(pid as u64),
                V(c.tid as u64),
                V(s.signo as u64),
                info,
                V(0),
                V(0),
            ],
            EXPECT_OK,
            format!("thread {}: queue pending signal {}", c.tid, s.signo),
        );
    }
    let mut comm = c.comm.as_bytes().to_vec();
    comm.truncate(15);
    comm.push(0);
    let name = p.put(&comm);
    p.op(
        libc::SYS_prctl,
        [V(libc::PR_SET_NAME as u64), name, V(0), V(0), V(0), V(0)],
        EXPECT_OK,
        format!("thread {}: name", c.tid),
    );
    let param = p.put_u64s(&[c.sched.priority as u32 as u64]);
    p.op(
        libc::SYS_sched_setscheduler,
        [
            V(0),
            V(c.sched.policy as u32 as u64),
            param,
            V(0),
            V(0),
            V(0),
        ],
        EXPECT_OK,
        format!("thread {}: scheduling policy {}", c.tid, c.sched.policy),
    );
    p.op(
        libc::SYS_setpriority,
        [
            V(libc::PRIO_PROCESS as u64),
            V(0),
            V(c.sched.nice as i64 as u64),
            V(0),
            V(0),
            V(0),
        ],
        EXPECT_OK,
        format!("thread {}: nice {}", c.tid, c.sched.nice),
    );
    if let Some(mask) = &c.affinity {
        let m = p.put_u64s(mask);
        p.op(
            libc::SYS_sched_setaffinity,
            [V(0), V(mask.len() as u64 * 8), m, V(0), V(0), V(0)],
            EXPECT_OK,
            format!("thread {}: CPU affinity", c.tid),
        );
    }
}

/// The thread's credentials (per thread in the kernel: each thread sets its own), then the
/// one-way no_new_privs, then dumpability, which a change of credentials resets.
pub(crate) fn credentials(p: &mut Plan, c: &Core, dumpable: i32) {
    let cr = &c.creds;
    let groups: Vec<u8> = cr.groups.iter().flat_map(|g| g.to_le_bytes()).collect();
    let groups_arg = if groups.is_empty() {
        V(0)
    } else {
        p.put(&groups)
    };
    let t = c.tid;
    p.op(
        libc::SYS_setgroups,
        [
            V(cr.groups.len() as u64),
            groups_arg,
            V(0),
            V(0),
            V(0),
            V(0),
        ],
        EXPECT_OK,
        format!("thread {t}: setgroups"),
    );
    let ids = |v: [u32; 4]| {
        [
            V(v[0] as u64),
            V(v[1] as u64),
            V(v[2] as u64),
            V(0),
            V(0),
            V(0),
        ]
    };
    p.op(
        libc::SYS_setresgid,
        ids(cr.gids),
        EXPECT_OK,
        format!("thread {t}: setresgid"),
    );
    p.op(
        libc::SYS_setresuid,
        ids(cr.uids),
        EXPECT_OK,
        format!("thread {t}: setresuid"),
    );
    // The filesystem ids follow the effective ones unless they differed; setfs*id return the
    // old value, never an error.
    p.op(
        libc::SYS_setfsgid,
        [V(cr.gids[3] as u64), V(0), V(0), V(0), V(0), V(0)],
        EXPECT_ANY,
        format!("thread {t}: setfsgid"),
    );
    p.op(
        libc::SYS_setfsuid,
        [V(cr.uids[3] as u64), V(0), V(0), V(0), V(0), V(0)],
        EXPECT_ANY,
        format!("thread {t}: setfsuid"),
    );
    if c.no_new_privs {
        p.op(
            libc::SYS_prctl,
            [
                V(libc::PR_SET_NO_NEW_PRIVS as u64),
                V(1),
                V(0),
                V(0),
                V(0),
                V(0),
            ],
            EXPECT_OK,
            format!("thread {t}: no_new_privs"),
        );
    }
    p.op(
        libc::SYS_prctl,
        [
            V(libc::PR_SET_DUMPABLE as u64),
            V(dumpable.clamp(0, 1) as u64),
            V(0),
            V(0),
            V(0),
            V(0),
        ],
        EXPECT_OK,
        "PR_SET_DUMPABLE",
    );
}

/// The plan a thread other than the leader runs inside itself once it exists.
pub(crate) fn plan(img: &Image, c: &Core) -> Plan {
    let mut p = Plan::new();
    own_state(&mut p, img.inventory.pid, c);
    credentials(&mut p, c, img.process.dumpable);
    parent_death_signal(&mut p, c);
    p
}

/// `PR_SET_PDEATHSIG`, after the credentials: changing them clears it.
pub(crate) fn parent_death_signal(p: &mut Plan, c: &Core) {
    if c.pdeathsig != 0 {
        p.op(
            libc::SYS_prctl,
            [
                V(libc::PR_SET_PDEATHSIG as u64),
                V(c.pdeathsig as u64),
                V(0),
                V(0),
                V(0),
                V(0),
            ],
            EXPECT_OK,
            format!("thread {}: parent-death signal {}", c.tid, c.pdeathsig),
        );
    }
}

/// The image's XSAVE area made fit for this CPU: as is when the layouts agree, else moved
/// component by component (`xsave::translate`). Refused when the thread holds state of a
/// feature this CPU/kernel does not enable. `runtime` is the XSAVE area of the freshly created task: its
/// size and XCR0 (bytes 464..472) are this kernel's own.
pub(crate) fn xsave_for_here(img: &Image, core: &Core, runtime: &[u8]) -> Result<Vec<u8>> {
    let xcr0 = runtime
        .get(464..472)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0);
    // Only state the thread actually holds (XSTATE_BV) must fit; a feature the dumping CPU
    // merely enabled does not matter. (Code that chose instructions for that CPU at start-up
    // may still use some this one lacks: that is the user's call, as with CRIU's --cpu-cap.)
    let in_use = core
        .xsave
        .get(512..520)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0);
    if in_use & !xcr0 != 0 {
        bail!(
            "image {}: thread {} holds XSAVE state {:#x} that this CPU does not enable ({:#x})",
            img.dir.path().display(),
            core.tid,
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
    if core.xsave.len() == runtime.len()
        && (img.inventory.xsave_layout.is_empty() || img.inventory.xsave_layout == here)
    {
        return Ok(core.xsave.clone());
    }
    if img.inventory.xsave_layout.is_empty() {
        bail!(
            "image {}: XSAVE area of {} bytes, {} here, and no layout recorded to translate it",
            img.dir.path().display(),
            core.xsave.len(),
            runtime.len()
        );
    }
    let x = stasis_infect::xsave::translate(
        &core.xsave,
        &img.inventory.xsave_layout,
        &here,
        runtime.len(),
    )?;
    tracing::info!(
        from = core.xsave.len(),
        to = x.len(),
        "XSAVE area translated for this CPU"
    );
    Ok(x)
}

/// Registers for the resumed thread. A thread stopped inside a system call carries
/// `orig_rax` = the call and `rax` = -ERESTART*; detaching lets the kernel restart it, except
/// for -ERESTART_RESTARTBLOCK, whose restart state (`restart_block`) belonged to the old task:
/// that call is re-issued from the start with its original arguments (still in the registers).
pub(crate) fn regs_for_resume(g: &Gpr) -> sys::Regs {
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
