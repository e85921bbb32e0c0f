//! `TaskState`: what only the process itself can read — signal handlers, interval timers, the
//! current brk, dumpability, child-subreaper flag; `ThreadState`: what only the thread itself
//! can read — its sigaltstack, its clear-child-tid address, its parent-death signal.
//! Read-only system calls.

use crate::reply::Reply;
use crate::sys;
use stasis_abi::{KSigAction, Status, TaskState, ThreadState};

const SYS_RT_SIGACTION: usize = 13;
const SYS_SIGALTSTACK: usize = 131;
const SYS_GETITIMER: usize = 36;
const SYS_BRK: usize = 12;
const PR_GET_DUMPABLE: usize = 3;
const PR_GET_TID_ADDRESS: usize = 40;
const PR_GET_PDEATHSIG: usize = 2;
const PR_GET_CHILD_SUBREAPER: usize = 37;

pub fn report(out: &mut Reply) {
    let mut st = TaskState {
        sigactions: [KSigAction::default(); 64],
        sigactions_ok: 0,
        itimers: [[0; 4]; 3],
        brk: 0,
        dumpable: 0,
        child_subreaper: 0,
    };
    for sig in 1..=64usize {
        let slot = &mut st.sigactions[sig - 1];
        // SAFETY: query only (act = NULL); oldact is a valid KSigAction; sigsetsize 8.
        let r = unsafe {
            sys::syscall5(
                SYS_RT_SIGACTION,
                sig,
                0,
                slot as *mut KSigAction as usize,
                8,
                0,
            )
        };
        if r == 0 {
            st.sigactions_ok |= 1 << (sig - 1);
        }
    }
    for (which, t) in st.itimers.iter_mut().enumerate() {
        // SAFETY: getitimer writes one struct itimerval (4 × i64) into t.
        let r = unsafe { sys::syscall3(SYS_GETITIMER, which, t.as_mut_ptr() as usize, 0) };
        if r < 0 {
            return out.finish(Status::Syscall, (-r) as u32);
        }
    }
    // SAFETY: brk(0) only reports the current break.
    st.brk = unsafe { sys::syscall3(SYS_BRK, 0, 0, 0) } as u64;
    // SAFETY: PR_GET_DUMPABLE takes no pointers.
    st.dumpable = unsafe { sys::syscall5(sys::SYS_PRCTL, PR_GET_DUMPABLE, 0, 0, 0, 0) } as i64;
    match prctl_get_int(PR_GET_CHILD_SUBREAPER) {
        Ok(flag) => st.child_subreaper = flag as i64,
        Err(errno) => return out.finish(Status::Syscall, errno),
    }
    match out.put(0, &st) {
        Ok(()) => out.finish_len(Status::Ok, 0, core::mem::size_of::<TaskState>()),
        Err(s) => out.finish(s, 0),
    }
}

/// A `prctl` query that writes one int to its second argument (PR_GET_PDEATHSIG,
/// PR_GET_CHILD_SUBREAPER); Err: the errno.
fn prctl_get_int(option: usize) -> Result<i32, u32> {
    let mut v: i32 = 0;
    // SAFETY: these queries write one int to the given address, a local of ours.
    let r = unsafe { sys::syscall5(sys::SYS_PRCTL, option, &mut v as *mut i32 as usize, 0, 0, 0) };
    if r < 0 {
        Err((-r) as u32)
    } else {
        Ok(v)
    }
}

/// `ThreadState` for the calling thread.
pub fn thread_report(out: &mut Reply) {
    let mut st = ThreadState::default();
    // SAFETY: query only; the out-pointer is a valid stack_t-sized array.
    let r = unsafe { sys::syscall3(SYS_SIGALTSTACK, 0, st.altstack.as_mut_ptr() as usize, 0) };
    if r < 0 {
        return out.finish(Status::Syscall, (-r) as u32);
    }
    // SAFETY: PR_GET_TID_ADDRESS writes one pointer-sized value to the given address.
    let r = unsafe {
        sys::syscall5(
            sys::SYS_PRCTL,
            PR_GET_TID_ADDRESS,
            &mut st.tid_address as *mut u64 as usize,
            0,
            0,
            0,
        )
    };
    if r < 0 {
        return out.finish(Status::Syscall, (-r) as u32);
    }
    match prctl_get_int(PR_GET_PDEATHSIG) {
        Ok(sig) => st.pdeathsig = sig as i64,
        Err(errno) => return out.finish(Status::Syscall, errno),
    }
    match out.put(0, &st) {
        Ok(()) => out.finish_len(Status::Ok, 0, core::mem::size_of::<ThreadState>()),
        Err(s) => out.finish(s, 0),
    }
}

const SYS_TIMER_GETTIME: usize = 224;

/// `TimerState`: `timer_gettime` for each timer id in the input.
///
/// # Safety
/// `ids` points to `len` readable bytes inside the shared region.
pub unsafe fn timers(out: &mut Reply, ids: *const u8, len: usize) {
    if !len.is_multiple_of(4) {
        return out.finish(Status::BadPlan, 0);
    }
    for i in 0..len / 4 {
        // SAFETY: i * 4 + 4 <= len.
        let id = unsafe { core::ptr::read_volatile(ids.add(i * 4) as *const i32) };
        let mut spec = [0i64; 4];
        // SAFETY: timer_gettime writes one struct itimerspec into spec.
        let r = unsafe {
            sys::syscall3(
                SYS_TIMER_GETTIME,
                id as usize,
                spec.as_mut_ptr() as usize,
                0,
            )
        };
        if r < 0 {
            return out.finish(Status::Syscall, (-r) as u32);
        }
        if let Err(s) = out.put(i * 32, &spec) {
            return out.finish(s, 0);
        }
    }
    out.finish_len(Status::Ok, 0, len / 4 * 32)
}
