//! Per-thread state: through ptrace (registers, XSAVE, signal mask, thread-directed pending
//! signals, rseq, robust list), through /proc/PID/task/TID (name, credentials, capabilities,
//! no_new_privs, seccomp) and the scheduler calls (policy, priority, nice, affinity). What only
//! the thread itself can tell (sigaltstack, clear-child-tid) comes from the parasite's
//! `ThreadState`, run in each thread.

use anyhow::{bail, Context, Result};
use stasis_image::model::*;
use stasis_infect::Seized;
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

/// `/proc/PID/task/TID/status`, the lines a dump needs.
pub(crate) struct ThreadStatus {
    pub creds: Creds,
    /// CapInh, CapPrm, CapEff, CapBnd, CapAmb.
    pub caps: [u64; 5],
    pub no_new_privs: bool,
    /// 0: none, 1: strict, 2: filter.
    pub seccomp: u32,
}

pub(crate) fn thread_status(pid: i32, tid: i32) -> Result<ThreadStatus> {
    let path = format!("/proc/{pid}/task/{tid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let line = |key: &str| -> &str {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or("")
            .trim()
    };
    let ids = |key: &str| -> Result<[u32; 4]> {
        let v: Vec<u32> = line(key)
            .split_whitespace()
            .map(|x| x.parse())
            .collect::<std::result::Result<_, _>>()
            .with_context(|| format!("{path}: cannot parse {key}"))?;
        v.try_into()
            .map_err(|_| anyhow::anyhow!("{path}: cannot parse {key}"))
    };
    let hex = |key: &str| -> Result<u64> {
        u64::from_str_radix(line(key), 16).with_context(|| format!("{path}: cannot parse {key}"))
    };
    Ok(ThreadStatus {
        creds: Creds {
            uids: ids("Uid:")?,
            gids: ids("Gid:")?,
            groups: line("Groups:")
                .split_whitespace()
                .map(|x| x.parse())
                .collect::<std::result::Result<_, _>>()
                .with_context(|| format!("{path}: cannot parse Groups"))?,
        },
        caps: [
            hex("CapInh:")?,
            hex("CapPrm:")?,
            hex("CapEff:")?,
            hex("CapBnd:")?,
            hex("CapAmb:")?,
        ],
        no_new_privs: line("NoNewPrivs:") == "1",
        // No line at all: a kernel without seccomp.
        seccomp: match line("Seccomp:") {
            "" => 0,
            v => v
                .parse()
                .with_context(|| format!("{path}: cannot parse Seccomp"))?,
        },
    })
}

/// The online CPUs, as `sched_getaffinity` words (`/sys/devices/system/cpu/online`: "0-3,8").
fn online_cpus() -> Option<Vec<u64>> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/online").ok()?;
    let mut words = Vec::new();
    for part in text.trim().split(',') {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<usize>().ok()?, b.parse::<usize>().ok()?),
            None => {
                let a = part.parse::<usize>().ok()?;
                (a, a)
            }
        };
        if b >= 1 << 16 {
            return None;
        }
        for cpu in a..=b {
            if words.len() <= cpu / 64 {
                words.resize(cpu / 64 + 1, 0);
            }
            words[cpu / 64] |= 1 << (cpu % 64);
        }
    }
    Some(words)
}

/// The CPUs `tid` may run on; None when that is every online CPU (the default, which should
/// stay "every CPU" on a machine with more of them).
fn affinity(tid: i32) -> Result<Option<Vec<u64>>> {
    use nix::sched::{sched_getaffinity, CpuSet};
    let set = sched_getaffinity(nix::unistd::Pid::from_raw(tid))
        .map_err(|e| os_error("sched_getaffinity", tid, e))?;
    // The set as sched_getaffinity words: CPU n is bit n % 64 of word n / 64.
    let mut mask = vec![0u64; CpuSet::count() / 64];
    for cpu in 0..CpuSet::count() {
        if set.is_set(cpu) == Ok(true) {
            mask[cpu / 64] |= 1 << (cpu % 64);
        }
    }
    while mask.last() == Some(&0) {
        mask.pop();
    }
    Ok((Some(&mask) != online_cpus().as_ref()).then_some(mask))
}

/// Policy (with SCHED_RESET_ON_FORK), real-time priority and nice value of `tid`.
fn sched(tid: i32) -> Result<Sched> {
    use stasis_sys::sched;
    const SCHED_DEADLINE: i32 = 6;
    let policy = sched::policy(tid).map_err(|e| os_error("sched_getscheduler", tid, e))?;
    if policy & !libc::SCHED_RESET_ON_FORK == SCHED_DEADLINE {
        bail!("thread {tid} runs under SCHED_DEADLINE; not supported yet");
    }
    let priority = sched::rt_priority(tid).map_err(|e| os_error("sched_getparam", tid, e))?;
    let nice = sched::nice(tid).map_err(|e| os_error("getpriority", tid, e))?;
    Ok(Sched {
        policy,
        priority,
        nice,
    })
}

/// "`call` of thread `tid`: <the OS error>".
fn os_error(call: &str, tid: i32, e: nix::errno::Errno) -> anyhow::Error {
    anyhow::anyhow!("{call} of thread {tid}: {}", std::io::Error::from(e))
}

/// A thread stopped inside `restart_syscall` — a timed wait (futex, nanosleep, poll) an earlier
/// stop interrupted and the kernel resumed — has only `restart_syscall` in `orig_rax`, which in
/// a new task fails with EINTR: its restart state (`restart_block`) is the kernel's and dies
/// with the task. The call it restarts was read from its kernel stack as it was seized; its
/// arguments are still in the registers, so the restore issues that call again from the start
/// (a relative timeout starts over, as for a thread caught in the first wait). A call stasis
/// cannot tell is refused, naming the thread.
fn restarted_call(pid: i32, tid: i32, seized: &Seized) -> Result<u64> {
    match seized.restarting_call(tid) {
        Some(Ok(nr)) => {
            tracing::debug!(pid, tid, nr, "a restarted call, issued again on restore");
            Ok(*nr as u64)
        }
        Some(Err(frames)) => bail!(
            "thread {tid} of pid {pid} waits in restart_syscall for a call stasis cannot tell ({frames}); not supported"
        ),
        None => bail!(
            "thread {tid} of pid {pid} waits in restart_syscall, entered as it was being stopped: the call it restarts is unknown; try again"
        ),
    }
}

pub(crate) fn collect_core(pid: i32, tid: i32, seized: &Seized) -> Result<Core> {
    const ERESTART_RESTARTBLOCK: i64 = -516;
    let t = nix::unistd::Pid::from_raw(tid);
    let regs = sys::get_regs(t).with_context(|| format!("registers of thread {tid}"))?;
    let mut gpr = gpr_of(&regs);
    if gpr.orig_rax == stasis_infect::SYS_RESTART_SYSCALL && gpr.rax as i64 == ERESTART_RESTARTBLOCK
    {
        gpr.orig_rax = restarted_call(pid, tid, seized)?;
    }
    let rseq = sys::rseq_config(t)
        .with_context(|| format!("rseq of thread {tid}"))?
        .map(|(addr, len, sig)| Rseq { addr, len, sig });
    let (robust_list, robust_list_len) =
        sys::robust_list(t).with_context(|| format!("robust list of thread {tid}"))?;
    let status = thread_status(pid, tid)?;
    let comm_path = format!("/proc/{pid}/task/{tid}/comm");
    let mut comm = std::fs::read(&comm_path).with_context(|| format!("reading {comm_path}"))?;
    if comm.last() == Some(&b'\n') {
        comm.pop();
    }
    Ok(Core {
        tid,
        gpr,
        xsave: sys::get_xstate(t).with_context(|| format!("XSAVE state of thread {tid}"))?,
        sigmask: sys::get_sigmask(t).with_context(|| format!("signal mask of thread {tid}"))?,
        pending: pending(t, false)?,
        altstack: AltStack::default(),
        rseq,
        robust_list,
        robust_list_len,
        clear_child_tid: 0,
        pdeathsig: 0,
        comm: Bytes(comm),
        creds: status.creds,
        sched: sched(tid)?,
        affinity: affinity(tid)?,
        no_new_privs: status.no_new_privs,
    })
}

/// Decodes the parasite's `ThreadState` reply (untrusted bytes: exact size or an error).
pub(crate) fn decode_thread_state(tid: i32, raw: &[u8]) -> Result<stasis_abi::ThreadState> {
    if raw.len() != std::mem::size_of::<stasis_abi::ThreadState>() {
        bail!(
            "thread {tid}: bad reply from the parasite: thread state of {} bytes",
            raw.len()
        );
    }
    // SAFETY: ThreadState is plain integers (any bit pattern is valid); raw has its exact size.
    Ok(unsafe { std::ptr::read_unaligned(raw.as_ptr() as *const stasis_abi::ThreadState) })
}

/// Puts what the thread reported about itself into its core.
pub(crate) fn apply_thread_state(core: &mut Core, st: &stasis_abi::ThreadState) {
    core.altstack = AltStack {
        sp: st.altstack[0],
        flags: st.altstack[1] as i32,
        size: st.altstack[2],
    };
    core.clear_child_tid = st.tid_address;
    core.pdeathsig = st.pdeathsig as i32;
}
