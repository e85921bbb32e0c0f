//! Per-thread state read through ptrace: registers, XSAVE, signal mask, thread-directed pending
//! signals, rseq, robust list.

use anyhow::{Context, Result};
use stasis_image::model::*;
use stasis_sys::ptrace as sys;

pub(crate) fn pending(tid: nix::unistd::Pid, shared: bool) -> Result<Vec<PendingSignal>> {
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

pub(crate) fn collect_core(tid: i32) -> Result<Core> {
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
