//! `clone3` with `set_tid`: creating a task with a chosen pid.

use nix::errno::Errno;

/// `struct clone_args` up to `set_tid_size` and `cgroup` (CLONE_ARGS_SIZE_VER2, 88 bytes).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}
const _: () = assert!(std::mem::size_of::<CloneArgs>() == 88);

/// A fork-like `clone3` whose child gets exactly pid `tid` (needs CAP_CHECKPOINT_RESTORE and
/// the pid free). Returns the child's pid in the parent and 0 in the child.
///
/// # Safety
/// As for fork(2): in a multi-threaded caller, the child may only call async-signal-safe
/// functions. The child returns into the caller on a copy of its memory.
pub unsafe fn clone3_with_pid(tid: i32) -> Result<i32, Errno> {
    // SAFETY: as the caller promised.
    unsafe { clone3_with_pid_flags(tid, 0) }
}

/// `clone3_with_pid` with clone `flags` (e.g. CLONE_PARENT: the child's parent is the
/// caller's parent).
///
/// # Safety
/// As for `clone3_with_pid`.
pub unsafe fn clone3_with_pid_flags(tid: i32, flags: u64) -> Result<i32, Errno> {
    let mut want = [tid];
    let args = CloneArgs {
        flags,
        exit_signal: if flags & libc::CLONE_PARENT as u64 != 0 {
            0
        } else {
            libc::SIGCHLD as u64
        },
        set_tid: want.as_mut_ptr() as u64,
        set_tid_size: 1,
        ..CloneArgs::default()
    };
    // SAFETY: args is a valid clone_args of the size passed; no CLONE_VM, no new stack.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    Errno::result(r).map(|pid| pid as i32)
}
