//! Raw system calls for the blob: the only place that knows syscall numbers.

use core::arch::asm;

pub const SYS_READ: usize = 0;
pub const SYS_OPEN: usize = 2;
pub const SYS_CLOSE: usize = 3;
pub const SYS_PRCTL: usize = 157;

pub const PR_GET_AUXV: usize = 0x4155_5856;
pub const O_RDONLY: usize = 0;
pub const O_CLOEXEC: usize = 0o2_000_000;

/// Returns the raw kernel result: `>= 0` on success, `-errno` on failure.
#[inline(always)]
pub unsafe fn syscall3(nr: usize, a: usize, b: usize, c: usize) -> isize {
    let ret: isize;
    // SAFETY: the caller passes arguments valid for `nr`; rcx/r11 are clobbered by `syscall`.
    unsafe {
        asm!("syscall", inlateout("rax") nr as isize => ret, in("rdi") a, in("rsi") b,
            in("rdx") c, lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    ret
}

#[inline(always)]
pub unsafe fn syscall5(nr: usize, a: usize, b: usize, c: usize, d: usize, e: usize) -> isize {
    let ret: isize;
    // SAFETY: as for `syscall3`.
    unsafe {
        asm!("syscall", inlateout("rax") nr as isize => ret, in("rdi") a, in("rsi") b,
            in("rdx") c, in("r10") d, in("r8") e, lateout("rcx") _, lateout("r11") _,
            options(nostack));
    }
    ret
}

/// A file descriptor closed on drop.
pub struct Fd(usize);

impl Fd {
    /// `path` must be NUL-terminated.
    pub fn open(path: &[u8]) -> Result<Fd, u32> {
        // SAFETY: path is a NUL-terminated byte string in our image.
        let r = unsafe { syscall3(SYS_OPEN, path.as_ptr() as usize, O_RDONLY | O_CLOEXEC, 0) };
        if r < 0 {
            Err((-r) as u32)
        } else {
            Ok(Fd(r as usize))
        }
    }

    /// Reads until `buf` is full or EOF; retries EINTR.
    pub fn read(&self, buf: &mut [u8]) -> Result<usize, u32> {
        loop {
            // SAFETY: buf is a valid writable slice.
            let r = unsafe { syscall3(SYS_READ, self.0, buf.as_mut_ptr() as usize, buf.len()) };
            if r == -4 {
                continue;
            }
            return if r < 0 {
                Err((-r) as u32)
            } else {
                Ok(r as usize)
            };
        }
    }
}

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: we own this descriptor.
        unsafe { syscall3(SYS_CLOSE, self.0, 0, 0) };
    }
}

#[inline(always)]
pub unsafe fn syscall6(
    nr: usize,
    a: usize,
    b: usize,
    c: usize,
    d: usize,
    e: usize,
    f: usize,
) -> isize {
    let ret: isize;
    // SAFETY: as for `syscall3`.
    unsafe {
        asm!("syscall", inlateout("rax") nr as isize => ret, in("rdi") a, in("rsi") b,
            in("rdx") c, in("r10") d, in("r8") e, in("r9") f, lateout("rcx") _, lateout("r11") _,
            options(nostack));
    }
    ret
}
