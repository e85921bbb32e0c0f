//! Signal dispositions as the kernel stores them: `rt_sigaction` with the kernel's
//! `struct sigaction` (handler, flags, restorer, mask), not the C library's, so a dumped
//! action (restorer and SA_RESTORER included) goes back exactly as it was read.

use nix::errno::Errno;
use stasis_abi::KSigAction;

/// The kernel's `sigset_t` is one 64-bit word on x86_64.
const KERNEL_SIGSET_SIZE: usize = 8;

/// Sets the action of signal `sig` to `act` (`rt_sigaction`, the old action not read).
///
/// The handler is an address the kernel jumps to when the signal is delivered: installing one
/// that belongs to another program is only harmless while `sig` stays blocked, as it does in the
/// restore's new task until the restored program's own mask is put back.
pub fn set_kernel_action(sig: i32, act: &KSigAction) -> Result<(), Errno> {
    // SAFETY: rt_sigaction reads one kernel struct sigaction (4 × u64, the layout KSigAction
    // has) from act and writes nothing (oldact is NULL).
    let r = unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            sig,
            act as *const KSigAction,
            0usize,
            KERNEL_SIGSET_SIZE,
        )
    };
    Errno::result(r).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigkill_cannot_be_changed() {
        let act = KSigAction {
            handler: 1, // SIG_IGN
            flags: 0,
            restorer: 0,
            mask: 0,
        };
        assert_eq!(set_kernel_action(libc::SIGKILL, &act), Err(Errno::EINVAL));
    }
}
