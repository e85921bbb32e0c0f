//! File-descriptor glue nix does not cover: comparing open file descriptions across processes
//! (`kcmp`), copying a descriptor out of another process (`pidfd_getfd`), closing ranges, the
//! kernel's own terminal settings ioctls, and the calls that work on descriptor *numbers* a
//! caller keeps on purpose without an `OwnedFd` (placing a duplicate at a number, asking
//! whether a number is open, adding a watched number to an epoll instance).

use nix::errno::Errno;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

const KCMP_FILE: libc::c_int = 0;

/// Whether fd `a` of `pid_a` and fd `b` of `pid_b` are one open file description
/// (`kcmp(KCMP_FILE)`; needs ptrace access to both, and a kernel with CONFIG_KCMP).
pub fn same_description(pid_a: i32, a: RawFd, pid_b: i32, b: RawFd) -> Result<bool, Errno> {
    // SAFETY: kcmp takes only integers.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, pid_a, pid_b, KCMP_FILE, a, b) };
    Errno::result(r).map(|v| v == 0)
}

/// Whether fd `fd` of `pid` is the file registered with epoll instance `epfd` of `epoll_pid`
/// under the number `tfd` (the `toff`-th registration with that number):
/// `kcmp(KCMP_EPOLL_TFD)`, which needs CONFIG_CHECKPOINT_RESTORE.
pub fn is_epoll_target(
    pid: i32,
    fd: RawFd,
    epoll_pid: i32,
    epfd: RawFd,
    tfd: RawFd,
    toff: u32,
) -> Result<bool, Errno> {
    const KCMP_EPOLL_TFD: libc::c_int = 7;
    let slot: [u32; 3] = [epfd as u32, tfd as u32, toff];
    // SAFETY: kcmp reads the slot (efd, tfd, toff) through the pointer.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid,
            epoll_pid,
            KCMP_EPOLL_TFD,
            fd,
            slot.as_ptr(),
        )
    };
    Errno::result(r).map(|v| v == 0)
}

/// What two processes may share without being threads of one another (`kcmp` types).
#[derive(Clone, Copy, Debug)]
pub enum Shared {
    /// The address space (CLONE_VM: a vfork child before it execs).
    Vm = 1,
    /// The descriptor table (CLONE_FILES).
    Files = 2,
    /// cwd, root and umask (CLONE_FS).
    Fs = 3,
    /// The signal handlers (CLONE_SIGHAND).
    Sighand = 4,
}

/// Whether `pid_a` and `pid_b` share `what` (`kcmp`).
pub fn shares(pid_a: i32, pid_b: i32, what: Shared) -> Result<bool, Errno> {
    // SAFETY: kcmp takes only integers.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, pid_a, pid_b, what as i32, 0, 0) };
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

/// A duplicate of `fd` at the lowest free number ≥ `base`, close-on-exec (`F_DUPFD_CLOEXEC`).
pub fn dup_at_least(fd: impl AsFd, base: RawFd) -> Result<OwnedFd, Errno> {
    let r = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(base))?;
    // SAFETY: on success r is a new descriptor nobody else holds.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

/// Makes number `target` a duplicate of `fd` (`dup3`; close-on-exec or not), closing whatever
/// was there. The caller keeps `target` by number, as the restore does with every descriptor
/// it places: it must not be (nor become) some `OwnedFd`'s, which would close it when
/// dropped. Like `close_range`, this only changes this process's descriptor table.
pub fn dup_onto(fd: impl AsFd, target: RawFd, cloexec: bool) -> Result<(), Errno> {
    let flags = if cloexec { libc::O_CLOEXEC } else { 0 };
    // SAFETY: dup3 takes descriptor numbers and flags and touches no memory of ours.
    let r = unsafe { libc::dup3(fd.as_fd().as_raw_fd(), target, flags) };
    Errno::result(r).map(drop)
}

/// Whether a descriptor is open at number `fd` (`F_GETFD`, which only reads its flags).
pub fn is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD takes a number and touches no memory; a free number gives EBADF.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

/// Adds number `fd` to the interest list of the epoll instance `epfd` (`EPOLL_CTL_ADD`) with
/// the kernel's own event bits and data word. epoll knows a watched file by its number, which
/// is what the caller has (nix's `Epoll::add` wants it borrowed, and the instance owned).
pub fn epoll_add(epfd: impl AsFd, fd: RawFd, events: u32, data: u64) -> Result<(), Errno> {
    let mut ev = libc::epoll_event { events, u64: data };
    // SAFETY: EPOLL_CTL_ADD reads one struct epoll_event from ev.
    let r = unsafe { libc::epoll_ctl(epfd.as_fd().as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
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

/// `open_by_handle_at(mount_fd, handle, O_PATH)`: the file a file handle (as fdinfo shows an
/// inotify watch's) names, on the filesystem `mount_fd` is on. Needs CAP_DAC_READ_SEARCH.
pub fn open_by_handle(
    mount_fd: impl AsFd,
    handle_type: i32,
    handle: &[u8],
) -> Result<OwnedFd, Errno> {
    if handle.len() > 128 {
        return Err(Errno::EINVAL);
    }
    // struct file_handle { u32 handle_bytes; i32 handle_type; u8 f_handle[]; }
    let mut buf = [0u64; (8 + 128) / 8];
    // SAFETY: buf is 136 bytes, enough for the header and up to 128 handle bytes.
    let bytes = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u8>(), 136) };
    bytes[0..4].copy_from_slice(&(handle.len() as u32).to_ne_bytes());
    bytes[4..8].copy_from_slice(&handle_type.to_ne_bytes());
    bytes[8..8 + handle.len()].copy_from_slice(handle);
    // SAFETY: the kernel reads the handle from buf; on success the descriptor is ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount_fd.as_fd().as_raw_fd(),
            buf.as_ptr(),
            libc::O_PATH | libc::O_CLOEXEC,
        )
    };
    // SAFETY: on success r is a fresh descriptor.
    Errno::result(r).map(|fd| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn duplicates_land_where_asked() {
        let me = std::process::id() as i32;
        let a = std::fs::File::open("/proc/self/stat").expect("open");
        let high = dup_at_least(&a, 700).expect("F_DUPFD_CLOEXEC");
        assert!(high.as_raw_fd() >= 700);
        // A number no other test uses; kept by number, as the restore keeps placed ones.
        let target = 977;
        assert!(!is_open(target));
        dup_onto(&a, target, true).expect("dup3");
        assert!(is_open(target));
        if let Ok(same) = same_description(me, a.as_raw_fd(), me, target) {
            assert!(same);
        }
        close_range(target as u32, target as u32).expect("close_range");
        assert!(!is_open(target));
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
