//! Scheduler queries about one thread (by tid) that nix lacks: its policy, real-time priority
//! and nice value.

use nix::errno::Errno;

/// The policy of `tid` as `sched_getscheduler` reports it (SCHED_RESET_ON_FORK included).
pub fn policy(tid: i32) -> Result<i32, Errno> {
    // SAFETY: sched_getscheduler takes a tid and touches no memory of ours.
    Errno::result(unsafe { libc::sched_getscheduler(tid) })
}

/// The real-time priority of `tid` (`sched_getparam`; 0 under the normal policies).
pub fn rt_priority(tid: i32) -> Result<i32, Errno> {
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_getparam writes one struct sched_param into param.
    Errno::result(unsafe { libc::sched_getparam(tid, &mut param) })?;
    Ok(param.sched_priority)
}

/// The nice value of `tid` (`getpriority(PRIO_PROCESS)`, which takes a tid on Linux).
pub fn nice(tid: i32) -> Result<i32, Errno> {
    // getpriority may return -1 as a value: clear errno first to tell.
    Errno::clear();
    // SAFETY: getpriority takes integers and touches no memory of ours.
    let n = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) };
    if n == -1 && Errno::last_raw() != 0 {
        return Err(Errno::last());
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_thread_reads_back() {
        let me = nix::unistd::gettid().as_raw();
        assert!(policy(me).is_ok());
        assert!(rt_priority(me).is_ok());
        assert!((-20..20).contains(&nice(me).expect("nice")));
        assert_eq!(policy(-1), Err(Errno::EINVAL));
    }
}
