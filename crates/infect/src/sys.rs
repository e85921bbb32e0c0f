//! Raw ptrace and wait glue: the one place that talks to the kernel with bare request numbers.
//!
//! nix 0.32 covers seize/interrupt/cont/detach/getregs, but not the signal-mask requests nor a
//! regset of the kernel's own size (`NT_X86_XSTATE`); those are wrapped here once, with typed
//! arguments and `Result`s, so the rest of the crate never sees a request number.

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::unistd::Pid;

pub type Regs = libc::user_regs_struct;

const PTRACE_GETSIGMASK: libc::c_uint = 0x420a;
const PTRACE_SETSIGMASK: libc::c_uint = 0x420b;
const NT_X86_XSTATE: libc::c_int = 0x202;
/// Larger than any XSAVE area the kernel reports today (AMX makes it ~11 KiB).
const XSTATE_MAX: usize = 64 * 1024;

/// `si_code` of the SIGTRAP an `int3` raises.
pub const SI_KERNEL: i32 = 0x80;
/// `status >> 16` of a stop caused by `PTRACE_INTERRUPT` or a group stop under SEIZE.
pub const PTRACE_EVENT_STOP: i32 = 128;

pub fn seize(tid: Pid) -> Result<(), Errno> {
    ptrace::seize(tid, ptrace::Options::empty())
}

pub fn interrupt(tid: Pid) -> Result<(), Errno> {
    ptrace::interrupt(tid)
}

pub fn cont(tid: Pid, sig: Option<nix::sys::signal::Signal>) -> Result<(), Errno> {
    ptrace::cont(tid, sig)
}

pub fn detach(tid: Pid) -> Result<(), Errno> {
    ptrace::detach(tid, None)
}

pub fn get_regs(tid: Pid) -> Result<Regs, Errno> {
    ptrace::getregs(tid)
}

pub fn set_regs(tid: Pid, regs: &Regs) -> Result<(), Errno> {
    ptrace::setregs(tid, *regs)
}

pub fn get_siginfo(tid: Pid) -> Result<libc::siginfo_t, Errno> {
    ptrace::getsiginfo(tid)
}

pub fn get_sigmask(tid: Pid) -> Result<u64, Errno> {
    let mut mask: u64 = 0;
    // SAFETY: PTRACE_GETSIGMASK writes `addr` (= size) bytes to `data`, a valid u64.
    let r = unsafe {
        libc::ptrace(
            PTRACE_GETSIGMASK,
            tid.as_raw(),
            8usize,
            &mut mask as *mut u64,
        )
    };
    Errno::result(r).map(|_| mask)
}

pub fn set_sigmask(tid: Pid, mask: u64) -> Result<(), Errno> {
    // SAFETY: PTRACE_SETSIGMASK reads 8 bytes from `data`, a valid u64.
    let r = unsafe { libc::ptrace(PTRACE_SETSIGMASK, tid.as_raw(), 8usize, &mask as *const u64) };
    Errno::result(r).map(drop)
}

/// The thread's XSAVE area, exactly as long as the kernel says it is.
pub fn get_xstate(tid: Pid) -> Result<Vec<u8>, Errno> {
    let mut buf = vec![0u8; XSTATE_MAX];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: the kernel writes at most iov_len bytes into buf and shrinks iov_len to the size.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_GETREGSET,
            tid.as_raw(),
            NT_X86_XSTATE,
            &mut iov as *mut libc::iovec,
        )
    };
    Errno::result(r)?;
    buf.truncate(iov.iov_len);
    Ok(buf)
}

pub fn set_xstate(tid: Pid, xstate: &[u8]) -> Result<(), Errno> {
    let mut iov = libc::iovec {
        iov_base: xstate.as_ptr() as *mut libc::c_void,
        iov_len: xstate.len(),
    };
    // SAFETY: the kernel only reads iov_len bytes from the buffer.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_SETREGSET,
            tid.as_raw(),
            NT_X86_XSTATE,
            &mut iov as *mut libc::iovec,
        )
    };
    Errno::result(r).map(drop)
}

/// What `waitpid(tid, __WALL)` saw, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// A ptrace stop: the stop signal and the event (`status >> 16`, 0 for a signal stop).
    Stopped {
        sig: i32,
        event: i32,
    },
    Exited(i32),
    Killed(i32),
    /// `WNOHANG` and nothing happened yet.
    Running,
}

pub fn wait(tid: Pid, nohang: bool) -> Result<Wait, Errno> {
    let mut status = 0;
    let flags = libc::__WALL | if nohang { libc::WNOHANG } else { 0 };
    loop {
        // SAFETY: plain waitpid on a pid; status is a valid out-pointer.
        let r = unsafe { libc::waitpid(tid.as_raw(), &mut status, flags) };
        if r == -1 {
            let e = Errno::last();
            if e == Errno::EINTR {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Ok(Wait::Running);
        }
        break;
    }
    Ok(if libc::WIFSTOPPED(status) {
        Wait::Stopped {
            sig: libc::WSTOPSIG(status),
            event: status >> 16,
        }
    } else if libc::WIFEXITED(status) {
        Wait::Exited(libc::WEXITSTATUS(status))
    } else {
        Wait::Killed(libc::WTERMSIG(status))
    })
}
