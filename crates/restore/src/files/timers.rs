//! `timerfd` and `signalfd`. A timer is armed again with what it had left (a relative timer
//! does not count the time the process was away; an absolute one keeps its deadline) and its
//! unread expirations are put back (`TFD_IOC_SET_TICKS`).

use super::{check, set_status_flags, Open, OpenCx};
use anyhow::{bail, Result};
use stasis_image::model::*;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub(crate) struct TimerFd;
pub(crate) static TIMERFD: TimerFd = TimerFd;
pub(crate) struct SignalFd;
pub(crate) static SIGNALFD: SignalFd = SignalFd;

/// `_IOW('T', 0, u64)`.
const TFD_IOC_SET_TICKS: u64 = 0x4008_5400;

fn timespec((sec, nsec): (i64, i64)) -> libc::timespec {
    libc::timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    }
}

impl Open for TimerFd {
    fn open(&self, d: &FileDesc, _: &mut OpenCx) -> Result<OwnedFd> {
        let FileKind::TimerFd {
            clockid,
            abstime,
            value,
            interval,
            ticks,
        } = d.kind
        else {
            unreachable!("dispatched by kind")
        };
        // SAFETY: timerfd_create takes integers; on success the descriptor is ours.
        let raw = unsafe { libc::timerfd_create(clockid, libc::TFD_CLOEXEC) };
        let fd = check(nix::errno::Errno::result(raw), || {
            format!("timerfd_create(clock {clockid})")
        })?;
        // SAFETY: a fresh descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        if value.1 < 0 || value.1 >= 1_000_000_000 || interval.1 < 0 || interval.1 >= 1_000_000_000
        {
            bail!("a timer value out of range");
        }
        if value != (0, 0) {
            let spec = libc::itimerspec {
                it_interval: timespec(interval),
                it_value: timespec(value),
            };
            let flags = if abstime { libc::TFD_TIMER_ABSTIME } else { 0 };
            // SAFETY: settime reads a valid itimerspec; the old value is not asked for.
            let r = unsafe {
                libc::timerfd_settime(fd.as_raw_fd(), flags, &spec, std::ptr::null_mut())
            };
            check(nix::errno::Errno::result(r), || "timerfd_settime".into())?;
        }
        if ticks > 0 {
            // SAFETY: the ioctl reads one u64.
            let r = unsafe { libc::ioctl(fd.as_raw_fd(), TFD_IOC_SET_TICKS as _, &ticks) };
            check(nix::errno::Errno::result(r), || {
                "putting back the timer's unread expirations (TFD_IOC_SET_TICKS: the kernel needs CONFIG_CHECKPOINT_RESTORE)".into()
            })?;
        }
        set_status_flags(&fd, d.flags)?;
        Ok(fd)
    }
}

impl Open for SignalFd {
    fn open(&self, d: &FileDesc, _: &mut OpenCx) -> Result<OwnedFd> {
        let FileKind::SignalFd { mask } = d.kind else {
            unreachable!("dispatched by kind")
        };
        // The kernel's sigset is 64 bits; glibc's sigset_t is larger and starts with it.
        // SAFETY: sigset_t is plain old data; zeroes are an empty set.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: the first 8 bytes of sigset_t are the kernel's mask.
        unsafe { std::ptr::write_unaligned((&mut set as *mut libc::sigset_t).cast::<u64>(), mask) };
        // SAFETY: signalfd reads the set; on success the descriptor is ours.
        let raw = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC) };
        let fd = check(nix::errno::Errno::result(raw), || "signalfd".into())?;
        // SAFETY: a fresh descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        set_status_flags(&fd, d.flags)?;
        Ok(fd)
    }
}
