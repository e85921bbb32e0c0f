//! The one layer of raw system-call glue for the stasis host: every bare request number,
//! `struct` the kernel reads, and `unsafe` call that nix does not cover lives here, behind typed
//! functions returning `Result`s. The rest of stasis uses these or nix, never `libc::syscall`.

pub mod clone;
pub mod fault;
pub mod fs;
pub mod netlock;
pub mod process;
pub mod ptrace;
pub mod pty;
pub mod sched;
pub mod signal;
pub mod sock;
pub mod uffd;

/// A clock's reading in ns (0 if it cannot be read).
pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime into a valid timespec.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
