//! ptrace and wait: the one place that talks ptrace with bare request numbers.
//!
//! nix 0.32 covers seize/interrupt/cont/detach/getregs, but not the signal-mask requests nor a
//! regset of the kernel's own size (`NT_X86_XSTATE`); those are wrapped here once, with typed
//! arguments and `Result`s, so no other code sees a request number.

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::unistd::Pid;

pub type Regs = libc::user_regs_struct;

const PTRACE_GETSIGMASK: libc::c_uint = 0x420a;
const PTRACE_SETSIGMASK: libc::c_uint = 0x420b;
const NT_X86_XSTATE: libc::c_int = 0x202;
/// Larger than any XSAVE area the kernel reports today (AMX makes it ~11 KiB).
const XSTATE_MAX: usize = 64 * 1024;

/// `status >> 16` of the stop a traced `clone` makes (with `PTRACE_O_TRACECLONE`).
pub const PTRACE_EVENT_CLONE: i32 = 3;

/// `si_code` of the SIGTRAP an `int3` raises.
pub const SI_KERNEL: i32 = 0x80;
/// `status >> 16` of a stop caused by `PTRACE_INTERRUPT` or a group stop under SEIZE.
pub const PTRACE_EVENT_STOP: i32 = 128;

/// `WSTOPSIG` of a system-call stop (`PTRACE_O_TRACESYSGOOD`, always set by `seize`).
pub const SYSCALL_STOP: i32 = libc::SIGTRAP | 0x80;

/// Seizes `tid`. System-call stops are told apart from SIGTRAPs (`SYSCALL_STOP`); with
/// `exit_kill` the kernel kills the thread if we die while tracing it (`PTRACE_O_EXITKILL`:
/// for the half-made tasks of a restore, never for a process being dumped).
pub fn seize(tid: Pid, exit_kill: bool) -> Result<(), Errno> {
    ptrace::seize(tid, base_options(exit_kill))
}

fn base_options(exit_kill: bool) -> ptrace::Options {
    let mut o = ptrace::Options::PTRACE_O_TRACESYSGOOD;
    if exit_kill {
        o |= ptrace::Options::PTRACE_O_EXITKILL;
    }
    o
}

/// Makes every thread `tid` creates start traced by us, stopped before its first instruction
/// (`PTRACE_O_TRACECLONE`; under SEIZE the new thread reports a `PTRACE_EVENT_STOP`). New
/// threads inherit the options, `exit_kill` included (see `seize`).
pub fn trace_clones(tid: Pid, exit_kill: bool) -> Result<(), Errno> {
    ptrace::setoptions(
        tid,
        base_options(exit_kill) | ptrace::Options::PTRACE_O_TRACECLONE,
    )
}

/// Resumes a stopped thread until its next system-call entry or exit (`PTRACE_SYSCALL`).
pub fn syscall_step(tid: Pid) -> Result<(), Errno> {
    crate::fault::point();
    ptrace::syscall(tid, None)
}

/// The message of the last ptrace event (for `PTRACE_EVENT_CLONE`: the new thread's id).
pub fn event_msg(tid: Pid) -> Result<i32, Errno> {
    ptrace::getevent(tid).map(|v| v as i32)
}

pub fn interrupt(tid: Pid) -> Result<(), Errno> {
    crate::fault::point();
    ptrace::interrupt(tid)
}

/// Resumes a stopped thread, delivering signal `sig` (0: none). A raw number, not nix's
/// `Signal`: that enum cannot represent real-time signals, and a signal that cannot be
/// represented must never turn into "no signal" (the tracee would silently lose it).
pub fn cont(tid: Pid, sig: i32) -> Result<(), Errno> {
    crate::fault::point();
    // SAFETY: PTRACE_CONT takes no pointers; `data` is the signal number.
    let r = unsafe { libc::ptrace(libc::PTRACE_CONT, tid.as_raw(), 0usize, sig as libc::c_long) };
    Errno::result(r).map(drop)
}

pub fn detach(tid: Pid) -> Result<(), Errno> {
    crate::fault::point();
    ptrace::detach(tid, None)
}

pub fn get_regs(tid: Pid) -> Result<Regs, Errno> {
    ptrace::getregs(tid)
}

pub fn set_regs(tid: Pid, regs: &Regs) -> Result<(), Errno> {
    crate::fault::point();
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
    crate::fault::point();
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
    crate::fault::point();
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

const PTRACE_PEEKSIGINFO: libc::c_uint = 0x4209;
const PTRACE_PEEKSIGINFO_SHARED: u32 = 1;
const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;

/// Executes one instruction of a stopped thread (it stops again with SIGTRAP).
pub fn singlestep(tid: Pid) -> Result<(), Errno> {
    crate::fault::point();
    ptrace::step(tid, None)
}

/// The pending signals of a thread (`shared`: of its whole process), as raw 128-byte siginfos.
pub fn pending_signals(tid: Pid, shared: bool) -> Result<Vec<[u8; 128]>, Errno> {
    #[repr(C)]
    struct PeekArgs {
        off: u64,
        flags: u32,
        nr: i32,
    }
    let mut out = Vec::new();
    let mut buf = [[0u8; 128]; 32];
    loop {
        let args = PeekArgs {
            off: out.len() as u64,
            flags: if shared { PTRACE_PEEKSIGINFO_SHARED } else { 0 },
            nr: buf.len() as i32,
        };
        // SAFETY: the kernel writes at most `nr` siginfos (128 bytes each) into buf.
        let r = unsafe {
            libc::ptrace(
                PTRACE_PEEKSIGINFO,
                tid.as_raw(),
                &args as *const PeekArgs,
                buf.as_mut_ptr(),
            )
        };
        let n = Errno::result(r)? as usize;
        out.extend_from_slice(&buf[..n.min(buf.len())]);
        if n < buf.len() {
            return Ok(out);
        }
    }
}

/// The thread's rseq registration: (area address, area size, signature); None when none.
pub fn rseq_config(tid: Pid) -> Result<Option<(u64, u32, u32)>, Errno> {
    #[repr(C)]
    #[derive(Default)]
    struct Conf {
        ptr: u64,
        size: u32,
        sig: u32,
        flags: u32,
        pad: u32,
    }
    let mut c = Conf::default();
    // SAFETY: the kernel writes one struct of `addr` bytes into c.
    let r = unsafe {
        libc::ptrace(
            PTRACE_GET_RSEQ_CONFIGURATION,
            tid.as_raw(),
            std::mem::size_of::<Conf>(),
            &mut c as *mut Conf,
        )
    };
    Errno::result(r)?;
    Ok((c.ptr != 0).then_some((c.ptr, c.size, c.sig)))
}

/// The thread's robust futex list head and length (`get_robust_list`).
pub fn robust_list(tid: Pid) -> Result<(u64, u64), Errno> {
    let mut head: u64 = 0;
    let mut len: usize = 0;
    // SAFETY: get_robust_list writes one pointer and one size_t.
    let r = unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            tid.as_raw(),
            &mut head as *mut u64,
            &mut len as *mut usize,
        )
    };
    Errno::result(r)?;
    Ok((head, len as u64))
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

#[cfg(test)]
mod tests {
    use super::*;

    static PIPE_W: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

    extern "C" fn on_rt(_: libc::c_int) {
        let b = 1u8;
        // SAFETY: write(2) is async-signal-safe; the fd was set before the signal can arrive.
        unsafe {
            libc::write(
                PIPE_W.load(std::sync::atomic::Ordering::Relaxed),
                (&b as *const u8).cast(),
                1,
            )
        };
    }

    /// Regression: re-injecting a real-time signal from a signal-delivery stop must deliver it.
    /// (nix's `Signal` cannot represent RT signals; going through it dropped them silently.)
    #[test]
    fn realtime_signal_is_delivered_when_reinjected() {
        let mut fds = [0; 2];
        // SAFETY: plain pipe(2) into a valid array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        PIPE_W.store(fds[1], std::sync::atomic::Ordering::Relaxed);
        let sig = libc::SIGRTMIN() + 1;
        // SAFETY: the child only calls async-signal-safe functions, then loops in pause().
        let child = unsafe { libc::fork() };
        if child == 0 {
            unsafe {
                libc::signal(sig, on_rt as *const () as libc::sighandler_t);
                loop {
                    libc::pause();
                }
            }
        }
        let t = Pid::from_raw(child);
        // Let the child install its handler before any signal is sent.
        std::thread::sleep(std::time::Duration::from_millis(100));
        seize(t, false).expect("seize our own child");
        let val = libc::sigval {
            sival_ptr: std::ptr::null_mut(),
        };
        // SAFETY: signalling our own child.
        assert_eq!(unsafe { libc::sigqueue(child, sig, val) }, 0);
        let stop = wait(t, false).expect("wait");
        assert_eq!(
            stop,
            Wait::Stopped { sig, event: 0 },
            "a signal-delivery stop for the RT signal"
        );
        cont(t, sig).expect("re-inject");
        let mut pfd = libc::pollfd {
            fd: fds[0],
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one valid descriptor.
        let ready = unsafe { libc::poll(&mut pfd, 1, 5000) };
        // SAFETY: cleaning up our own child and descriptors.
        unsafe {
            libc::kill(child, libc::SIGKILL);
            libc::waitpid(child, std::ptr::null_mut(), libc::__WALL);
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        assert_eq!(
            ready, 1,
            "the re-injected RT signal never reached the handler"
        );
    }
}
