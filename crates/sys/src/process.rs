//! Process-wide calls nix lacks: another process's resource limits (`prlimit64` on a pid), and
//! ending the calling process at once (`_exit`).

use nix::errno::Errno;

/// The (soft, hard) limit of `resource` of process `pid` (`prlimit64`, nothing set).
pub fn limit_of(pid: i32, resource: u32) -> Result<(u64, u64), Errno> {
    let mut old = libc::rlimit64 {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit64 query only (new = NULL); it writes one struct rlimit64 into old.
    let r = unsafe { libc::prlimit64(pid, resource as _, std::ptr::null(), &mut old) };
    Errno::result(r).map(|_| (old.rlim_cur, old.rlim_max))
}

/// Ends the calling process with `code` at once (`_exit`): no atexit handlers, no destructors,
/// no stdio flush. For a forked or cloned copy whose state belongs to its parent.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit takes an integer and never returns.
    unsafe { libc::_exit(code) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_limits_read_back() {
        let me = std::process::id() as i32;
        let (cur, max) = limit_of(me, libc::RLIMIT_NOFILE).expect("prlimit64");
        assert!(cur <= max);
        assert_eq!(limit_of(me, 1000), Err(Errno::EINVAL));
    }
}
