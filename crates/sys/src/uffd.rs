//! userfaultfd: the restore fills anonymous memory of the new task from the host with
//! `UFFDIO_COPY` (a page is allocated and filled in one step, never zeroed first, and several
//! host threads can fill at once).

use nix::errno::Errno;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

pub const UFFD_API: u64 = 0xaa;
/// `_IOWR(0xAA, 0x3F, struct uffdio_api)`
pub const UFFDIO_API: u64 = 0xc018_aa3f;
/// `_IOWR(0xAA, 0x00, struct uffdio_register)`
pub const UFFDIO_REGISTER: u64 = 0xc020_aa00;
/// `_IOR(0xAA, 0x01, struct uffdio_range)`
pub const UFFDIO_UNREGISTER: u64 = 0x8010_aa01;
/// `_IOWR(0xAA, 0x03, struct uffdio_copy)`
pub const UFFDIO_COPY: u64 = 0xc028_aa03;
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;

/// A userfaultfd of the calling process's mm, handshaken (`UFFDIO_API`, no features).
pub fn create() -> Result<OwnedFd, Errno> {
    // SAFETY: userfaultfd takes flags and returns a new descriptor we own.
    let fd = Errno::result(unsafe {
        libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK)
    })?;
    // SAFETY: fd is a fresh descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let mut api = [UFFD_API, 0, 0];
    // SAFETY: UFFDIO_API reads and writes one struct uffdio_api (3 × u64).
    Errno::result(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, api.as_mut_ptr()) })?;
    Ok(fd)
}

/// Copies `len` bytes at `src` (in this process) to `dst` in the mm behind `uffd`, as new
/// pages. Retries what the kernel reports as partly done or interrupted.
pub fn copy(uffd: RawFd, dst: u64, src: *const u8, len: u64) -> Result<(), Errno> {
    let mut done = 0u64;
    while done < len {
        // struct uffdio_copy: dst, src, len, mode, copy (out)
        let mut c: [i64; 5] = [
            (dst + done) as i64,
            (src as u64 + done) as i64,
            (len - done) as i64,
            0,
            0,
        ];
        // SAFETY: UFFDIO_COPY reads [src, src + len) of our memory (the caller guarantees it
        // is mapped and readable) and writes pages into the other mm; it writes c[4].
        let r = unsafe { libc::ioctl(uffd, UFFDIO_COPY, c.as_mut_ptr()) };
        let copied = c[4];
        if copied > 0 {
            done += copied as u64;
        }
        if r == 0 {
            continue;
        }
        match Errno::last() {
            Errno::EAGAIN | Errno::EINTR => continue,
            e => return Err(e),
        }
    }
    Ok(())
}

/// `_IOWR(0xAA, 0x06, struct uffdio_writeprotect)`
pub const UFFDIO_WRITEPROTECT: u64 = 0xc018_aa06;
pub const UFFDIO_REGISTER_MODE_WP: u64 = 2;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;

/// Handshakes `uffd` for write-protect tracking in async mode: a write to a protected page
/// is let through by the kernel itself, which only clears the page's protection bit (what
/// `PAGEMAP_SCAN` reports as `PAGE_IS_WRITTEN`). The kernel wants `WP_UNPOPULATED` beside it.
pub fn api_wp_async(uffd: RawFd) -> Result<(), Errno> {
    let mut api = [
        UFFD_API,
        UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED,
        0,
    ];
    // SAFETY: UFFDIO_API reads and writes one struct uffdio_api (3 × u64).
    Errno::result(unsafe { libc::ioctl(uffd, UFFDIO_API, api.as_mut_ptr()) })?;
    Ok(())
}

/// Registers [start, start + len) of the mm behind `uffd` for write protection.
pub fn register_wp(uffd: RawFd, start: u64, len: u64) -> Result<(), Errno> {
    // struct uffdio_register: range (start, len), mode, ioctls (out)
    let mut r = [start, len, UFFDIO_REGISTER_MODE_WP, 0];
    // SAFETY: UFFDIO_REGISTER reads and writes one struct uffdio_register (4 × u64).
    Errno::result(unsafe { libc::ioctl(uffd, UFFDIO_REGISTER, r.as_mut_ptr()) })?;
    Ok(())
}

/// Write-protects the pages of [start, start + len) (registered with `register_wp`); the next
/// write to each clears its protection. A page not there gets a marker (`WP_UNPOPULATED`),
/// which pagemap reports as swapped out: callers protect only pages that are there.
pub fn write_protect(uffd: RawFd, start: u64, len: u64) -> Result<(), Errno> {
    // struct uffdio_writeprotect: range (start, len), mode
    let mut w = [start, len, UFFDIO_WRITEPROTECT_MODE_WP];
    // SAFETY: UFFDIO_WRITEPROTECT reads one struct uffdio_writeprotect (3 × u64).
    Errno::result(unsafe { libc::ioctl(uffd, UFFDIO_WRITEPROTECT, w.as_mut_ptr()) })?;
    Ok(())
}

/// What a lazy restore needs to hear of: the process forking (the child gets a userfaultfd
/// of its own), moving memory (`mremap`), dropping it (`MADV_DONTNEED`/`MADV_REMOVE`) and
/// unmapping it.
pub const LAZY_FEATURES: u64 = (1 << 1) | (1 << 2) | (1 << 3) | (1 << 6);
pub const EVENT_PAGEFAULT: u8 = 0x12;
pub const EVENT_FORK: u8 = 0x13;
pub const EVENT_REMAP: u8 = 0x14;
pub const EVENT_REMOVE: u8 = 0x15;
pub const EVENT_UNMAP: u8 = 0x16;
/// `_IOR(0xAA, 0x02, struct uffdio_range)`
const UFFDIO_WAKE: u64 = 0x8010_aa02;
/// `_IOWR(0xAA, 0x04, struct uffdio_zeropage)`
const UFFDIO_ZEROPAGE: u64 = 0xc020_aa04;

/// A userfaultfd of the calling process's mm, handshaken with `features`.
pub fn create_with(features: u64) -> Result<OwnedFd, Errno> {
    // SAFETY: userfaultfd takes flags and returns a new descriptor we own.
    let fd = Errno::result(unsafe {
        libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK)
    })?;
    // SAFETY: fd is a fresh descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let mut api = [UFFD_API, features, 0];
    // SAFETY: UFFDIO_API reads and writes one struct uffdio_api (3 × u64).
    Errno::result(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, api.as_mut_ptr()) })?;
    Ok(fd)
}

/// One `UFFDIO_COPY` of `len` bytes from `src` (ours) to `dst`: the bytes it copied, and
/// the error that stopped it short, if one did.
pub fn copy_some(uffd: RawFd, dst: u64, src: *const u8, len: u64) -> (u64, Result<(), Errno>) {
    let mut c: [i64; 5] = [dst as i64, src as i64, len as i64, 0, 0];
    // SAFETY: UFFDIO_COPY reads [src, src + len) of our memory (the caller guarantees it is
    // mapped and readable) and writes pages into the other mm; it writes c[4].
    let r = unsafe { libc::ioctl(uffd, UFFDIO_COPY, c.as_mut_ptr()) };
    let copied = c[4].max(0) as u64;
    if r == 0 {
        (len, Ok(()))
    } else {
        (copied.min(len), Err(Errno::last()))
    }
}

/// Maps the zero page at [dst, dst + len) and wakes who waits there.
pub fn zeropage(uffd: RawFd, dst: u64, len: u64) -> Result<(), Errno> {
    // struct uffdio_zeropage: range (start, len), mode, zeropage (out)
    let mut z: [i64; 4] = [dst as i64, len as i64, 0, 0];
    // SAFETY: UFFDIO_ZEROPAGE reads and writes one struct uffdio_zeropage (4 × u64).
    Errno::result(unsafe { libc::ioctl(uffd, UFFDIO_ZEROPAGE, z.as_mut_ptr()) })?;
    Ok(())
}

/// Wakes the threads waiting on faults in [start, start + len).
pub fn wake(uffd: RawFd, start: u64, len: u64) -> Result<(), Errno> {
    let mut r = [start, len];
    // SAFETY: UFFDIO_WAKE reads one struct uffdio_range (2 × u64).
    Errno::result(unsafe { libc::ioctl(uffd, UFFDIO_WAKE, r.as_mut_ptr()) })?;
    Ok(())
}

/// One `struct uffd_msg`, decoded: the event and its first three argument words.
#[derive(Clone, Copy, Debug)]
pub struct Msg {
    pub event: u8,
    pub args: [u64; 3],
}

/// Reads the messages waiting on `uffd` (it is non-blocking): none when there are none.
pub fn read_msgs(uffd: RawFd, out: &mut Vec<Msg>) -> Result<(), Errno> {
    let mut buf = [0u8; 32 * 16];
    loop {
        // SAFETY: read into our buffer of that length.
        let n = unsafe { libc::read(uffd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return match Errno::last() {
                Errno::EAGAIN => Ok(()),
                Errno::EINTR => continue,
                e => Err(e),
            };
        }
        if n == 0 {
            return Ok(());
        }
        for m in buf[..n as usize].chunks_exact(32) {
            let word = |at: usize| u64::from_le_bytes(m[at..at + 8].try_into().unwrap_or([0; 8]));
            out.push(Msg {
                event: m[0],
                args: [word(8), word(16), word(24)],
            });
        }
    }
}
