//! `Restore`: execute the host's plan, a flat list of system calls with a check on each result.
//!
//! The host does every decision (what to unmap, where to map, which pages to read from where,
//! which vDSO areas to move); this loop only runs the list and stops at the first operation
//! whose result breaks its rule, reporting its index and raw result. Pointer arguments were
//! encoded by the host as addresses inside the shared region, which this blob never unmaps.
//!
//! Invariant: the plan is read once, op by op, into a local copy before it is executed, so a
//! concurrent rewrite of the region cannot make one op half old and half new.

use crate::reply::Reply;
use crate::sys;
use stasis_abi::{
    PlanOp, RestoreResult, Status, EXPECT_ANY, EXPECT_ARG0, EXPECT_ARG4, EXPECT_CLONE, EXPECT_COPY,
    EXPECT_OK, EXPECT_PREAD_ALL,
};

const SYS_PREAD64: usize = 17;
const SYS_EXIT: usize = 60;
const SYS_CLONE3: usize = 435;

/// # Safety
/// `plan` points to `len` readable bytes inside the shared region.
pub unsafe fn run(out: &mut Reply, plan: *const u8, len: usize) {
    let size = core::mem::size_of::<PlanOp>();
    let mut res = RestoreResult::default();
    if !len.is_multiple_of(size) {
        return out.finish(Status::BadPlan, 0);
    }
    let n = len / size;
    let mut status = Status::Ok;
    for i in 0..n {
        // SAFETY: i * size + size <= len; read_volatile copies the op out of shared memory.
        let op: PlanOp = unsafe { core::ptr::read_volatile(plan.add(i * size) as *const PlanOp) };
        let r = execute(&op);
        let ok = match op.expect {
            EXPECT_OK | EXPECT_PREAD_ALL | EXPECT_COPY => r >= 0,
            EXPECT_ARG0 => r as u64 == op.args[0],
            EXPECT_ARG4 => r as u64 == op.args[4],
            EXPECT_CLONE => r as u64 == op.args[2],
            EXPECT_ANY => true,
            _ => {
                status = Status::BadPlan;
                false
            }
        };
        if !ok {
            res.failed_op = i as u64;
            res.result = r as i64;
            if status == Status::Ok {
                status = Status::PlanFailed;
            }
            break;
        }
        res.done = i as u64 + 1;
    }
    match out.put(0, &res) {
        Ok(()) => out.finish_len(status, 0, core::mem::size_of::<RestoreResult>()),
        Err(s) => out.finish(s, 0),
    }
}

fn execute(op: &PlanOp) -> isize {
    let a = op.args;
    if op.expect == EXPECT_CLONE {
        // SAFETY: a[0] is a `struct clone_args` of a[1] bytes in the plan area, for a thread
        // (CLONE_VM | CLONE_THREAD …) without a stack of its own: it must not run here.
        let r = unsafe { sys::syscall3(SYS_CLONE3, a[0] as usize, a[1] as usize, 0) };
        if r == 0 {
            // The new thread. The host traces clones, so it is stopped before it gets here; if
            // it is not, it must not run the plan a second time on its parent's stack.
            loop {
                // SAFETY: exit(2) ends only this thread.
                unsafe { sys::syscall3(SYS_EXIT, 0, 0, 0) };
            }
        }
        return r;
    }
    if op.expect == EXPECT_COPY {
        // SAFETY: the host mapped [dst, dst + len) writable in an earlier op and put `len`
        // bytes at src inside the plan area; the ranges cannot overlap (different mappings).
        unsafe {
            core::ptr::copy_nonoverlapping(a[1] as *const u8, a[0] as *mut u8, a[2] as usize)
        };
        return 0;
    }
    if op.expect == EXPECT_PREAD_ALL {
        let (fd, mut addr, mut left, mut off) =
            (a[0] as usize, a[1] as usize, a[2] as usize, a[3] as usize);
        while left > 0 {
            // SAFETY: the host mapped [addr, addr + len) writable before this op.
            let r = unsafe { sys::syscall5(SYS_PREAD64, fd, addr, left, off, 0) };
            if r == -4 {
                continue;
            }
            if r <= 0 {
                return if r == 0 { -5 } else { r }; // EOF early: EIO
            }
            addr += r as usize;
            off += r as usize;
            left -= r as usize;
        }
        return 0;
    }
    // SAFETY: the host chose this call and its arguments; that is the whole point of the plan.
    unsafe {
        sys::syscall6(
            op.nr as usize,
            a[0] as usize,
            a[1] as usize,
            a[2] as usize,
            a[3] as usize,
            a[4] as usize,
            a[5] as usize,
        )
    }
}
