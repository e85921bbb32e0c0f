//! File-descriptor glue nix does not cover: comparing open file descriptions across processes
//! (`kcmp`), copying a descriptor out of another process (`pidfd_getfd`), closing ranges, and
//! the kernel's own terminal settings ioctls.

use nix::errno::Errno;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

const KCMP_FILE: libc::c_int = 0;

/// Whether fd `a` of `pid_a` and fd `b` of `pid_b` are one open file description
/// (`kcmp(KCMP_FILE)`; needs ptrace access to both, and a kernel with CONFIG_KCMP).
pub fn same_description(pid_a: i32, a: RawFd, pid_b: i32, b: RawFd) -> Result<bool, Errno> {
    // SAFETY: kcmp takes only integers.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, pid_a, pid_b, KCMP_FILE, a, b) };
    Errno::result(r).map(|v| v == 0)
}

/// A pidfd for `pid` (`pidfd_open`).
pub fn pidfd_open(pid: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: pidfd_open takes a pid and flags; it returns a new descriptor we own.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: on success r is a fresh descriptor.
    Errno::result(r).map(|fd| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// A copy of descriptor `fd` of the process behind `pidfd`: the same open file description,
/// so reading through it moves the target's offset (use pread, or only query it).
pub fn pidfd_getfd(pidfd: &OwnedFd, fd: RawFd) -> Result<OwnedFd, Errno> {
    use std::os::fd::AsRawFd;
    // SAFETY: pidfd_getfd takes descriptors and flags; it returns a new descriptor we own.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    // SAFETY: on success r is a fresh descriptor.
    Errno::result(r).map(|fd| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Closes every descriptor from `first` to `last` inclusive (`close_range`).
pub fn close_range(first: u32, last: u32) -> Result<(), Errno> {
    // SAFETY: close_range only closes descriptors of this process.
    let r = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
    Errno::result(r).map(drop)
}

/// The kernel's `struct termios` (x86_64: four flag words, the line discipline, 19 control
/// characters), read with `TCGETS`. Independent of the C library's larger `struct termios`.
pub const KERNEL_TERMIOS_LEN: usize = 36;

pub fn tty_get_attr(fd: RawFd) -> Result<[u8; KERNEL_TERMIOS_LEN], Errno> {
    let mut t = [0u8; KERNEL_TERMIOS_LEN];
    // SAFETY: TCGETS writes one kernel struct termios (36 bytes on x86_64) into t.
    let r = unsafe { libc::ioctl(fd, libc::TCGETS, t.as_mut_ptr()) };
    Errno::result(r).map(|_| t)
}

/// Sets a terminal's modes at once (`TCSETS`, like `tcsetattr(TCSANOW)`).
pub fn tty_set_attr(fd: RawFd, t: &[u8; KERNEL_TERMIOS_LEN]) -> Result<(), Errno> {
    // SAFETY: TCSETS reads one kernel struct termios from t.
    let r = unsafe { libc::ioctl(fd, libc::TCSETS, t.as_ptr()) };
    Errno::result(r).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn kcmp_tells_dups_from_separate_opens() {
        let me = std::process::id() as i32;
        let a = std::fs::File::open("/proc/self/stat").expect("open");
        let b = a.try_clone().expect("dup");
        let c = std::fs::File::open("/proc/self/stat").expect("open");
        match same_description(me, a.as_raw_fd(), me, b.as_raw_fd()) {
            Err(Errno::ENOSYS) => return, // a kernel without CONFIG_KCMP
            r => assert_eq!(r, Ok(true)),
        }
        assert_eq!(
            same_description(me, a.as_raw_fd(), me, c.as_raw_fd()),
            Ok(false)
        );
    }

    #[test]
    fn pidfd_getfd_gives_the_same_description() {
        let me = std::process::id() as i32;
        let a = std::fs::File::open("/proc/self/stat").expect("open");
        let pidfd = pidfd_open(me).expect("pidfd_open");
        let copy = pidfd_getfd(&pidfd, a.as_raw_fd()).expect("pidfd_getfd");
        if let Ok(same) = same_description(me, a.as_raw_fd(), me, copy.as_raw_fd()) {
            assert!(same);
        }
    }
}
