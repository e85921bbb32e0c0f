//! The stasis parasite: a position-independent `no_std` blob run inside a frozen target.
//!
//! Invariants this code lives by (it runs on a borrowed thread, in someone else's process):
//! - The host jumps to `parasite_entry` with `rdi` = the command area of the shared region and
//!   `rsp` at the top of the blob's own stack; every signal but SIGTRAP is blocked.
//! - The blob ends a command by setting the command area's done word and parking in a
//!   `pause` loop (`stasis_abi::PARK_CODE`), where the host interrupts it; it never returns
//!   into target code and never traps, so a thread whose tracer died mid-command waits there,
//!   unharmed, to be cured. A fault in the blob still traps (the host reports it).
//! - No libc, no allocator, no TLS, no statics holding addresses (the host relocates the image,
//!   but nothing here should need it), and no panics that do anything but trap: a panic is an
//!   park without a valid reply, which the host reports as a failed command.
//! - For the dump commands, the target's memory other than the shared region is only read,
//!   never written, and only system calls that read process state are made. The restore
//!   command runs the host's plan, which rebuilds the address space around the region.
#![no_std]
#![no_main]

mod reply;
mod restore;
mod sys;
mod task;
mod vdso;

use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use stasis_abi::{Command, CommandId, Status, DONE_OFFSET, MAGIC, PROTOCOL_VERSION, REPLY_OFFSET};

/// The command area of the command running (set at entry; read by `finish` and on panic).
static AREA: AtomicUsize = AtomicUsize::new(0);

// The park loop sits at `PARK_OFFSET` from the entry (the host checks its bytes).
core::arch::global_asm!(
    ".section .text.entry,\"ax\",@progbits",
    ".globl parasite_entry",
    ".balign 16",
    "parasite_entry:",
    "    jmp 2f",
    "    .balign 8, 0xcc",
    ".globl parasite_park",
    "parasite_park:",
    "3:",
    "    mov eax, 34",
    "    syscall",
    "    jmp 3b",
    "2:",
    "    cld",
    "    and rsp, -16",
    "    mov [rip + {area}], rdi",
    "    call {main}",
    "    jmp {finish}",
    main = sym parasite_main,
    area = sym AREA,
    finish = sym finish,
);

extern "C" {
    fn parasite_park() -> !;
}

/// Tells the host the command is over and parks.
extern "C" fn finish() -> ! {
    let area = AREA.load(Ordering::Relaxed);
    if area != 0 {
        // SAFETY: `area` is the command area the host passed; DONE_OFFSET is inside it and
        // 4-aligned (the area is page-aligned).
        let done = unsafe { &*((area + DONE_OFFSET) as *const AtomicU32) };
        done.store(1, Ordering::Release);
    }
    // SAFETY: the park loop never returns and touches nothing.
    unsafe { parasite_park() }
}

/// Reads the command at `area` and writes a reply after it.
///
/// # Safety
/// `area` is the command area of the shared region, at least `REPLY_OFFSET + reply_cap` bytes.
unsafe extern "C" fn parasite_main(area: *mut u8) {
    // SAFETY: the host placed a `Command` at the start of the area; read it once, unaligned,
    // into a local so later rewrites by a hostile sibling cannot change our view mid-command.
    let cmd: Command = unsafe { core::ptr::read_volatile(area as *const Command) };
    let mut out = unsafe { reply::Reply::new(area.add(REPLY_OFFSET), cmd.reply_cap as usize) };
    if cmd.magic != MAGIC || cmd.version != PROTOCOL_VERSION {
        out.finish(Status::BadCommand, 0);
        return;
    }
    match CommandId::from_u32(cmd.id) {
        Some(CommandId::VdsoReport) => vdso::report(&mut out),
        Some(CommandId::TaskState) => task::report(&mut out),
        Some(CommandId::ThreadState) => task::thread_report(&mut out),
        Some(id @ (CommandId::Restore | CommandId::TimerState)) => {
            // The input must lie inside the command area the host gave us, after the reply.
            let reply_end = REPLY_OFFSET as u64 + 16 + cmd.reply_cap;
            match cmd.plan_off.checked_add(cmd.plan_len) {
                Some(end) if cmd.plan_off >= reply_end && end <= cmd.area_len => {
                    // SAFETY: [plan_off, plan_off + plan_len) is inside the area (checked above).
                    let input = unsafe { area.add(cmd.plan_off as usize) };
                    let len = cmd.plan_len as usize;
                    if id == CommandId::Restore {
                        // SAFETY: as above.
                        unsafe { restore::run(&mut out, input, len) }
                    } else {
                        // SAFETY: as above.
                        unsafe { task::timers(&mut out, input, len) }
                    }
                }
                _ => out.finish(Status::BadPlan, 0),
            }
        }
        None => out.finish(Status::BadCommand, 0),
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    // Whatever the reply said, it is void: the host sees a command over without a reply.
    let area = AREA.load(Ordering::Relaxed);
    if area != 0 {
        // SAFETY: the reply header's magic, inside the command area (see `finish`).
        unsafe { core::ptr::write_volatile((area + REPLY_OFFSET) as *mut u32, 0) };
    }
    finish()
}

// `core` lowers copies and fills to these symbols; there is no libc to provide them.
// `rep movsb`/`rep stosb` are short and fast on every CPU this runs on.

#[no_mangle]
unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: caller guarantees non-overlapping valid ranges (memcpy contract); DF is clear.
    unsafe {
        core::arch::asm!("rep movsb", inout("rdi") dst => _, inout("rsi") src => _,
            inout("rcx") n => _, options(nostack, preserves_flags));
    }
    dst
}

#[no_mangle]
unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize).wrapping_sub(src as usize) >= n {
        // Forward copy is safe: dst is below src or the ranges do not overlap.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: backwards byte copy with DF set for the duration, cleared again afterwards.
    unsafe {
        core::arch::asm!("std", "rep movsb", "cld",
            inout("rdi") dst.add(n).wrapping_sub(1) => _,
            inout("rsi") src.add(n).wrapping_sub(1) => _,
            inout("rcx") n => _, options(nostack));
    }
    dst
}

#[no_mangle]
unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: memset contract; DF is clear.
    unsafe {
        core::arch::asm!("rep stosb", inout("rdi") dst => _, inout("rcx") n => _,
            in("al") c as u8, options(nostack, preserves_flags));
    }
    dst
}

#[no_mangle]
unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: memcmp contract: both ranges are n readable bytes.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

#[no_mangle]
unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    unsafe { memcmp(a, b, n) }
}
