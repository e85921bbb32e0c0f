//! The wire between the stasis host and its blobs.
//!
//! Everything here is `#[repr(C)]` and `no_std`: the parasite is compiled against this very crate,
//! so host and blob cannot disagree about a layout. The shared region the host maps into the
//! target looks like this (offsets from its start, all page-aligned):
//!
//! ```text
//! +------------------+  0
//! | blob image       |  PT_LOAD of the parasite ELF, relocated by the host
//! +------------------+  blob_pages
//! | Command          |  written by the host before the blob runs
//! | Reply header     |  written by the blob
//! | reply payload... |  `Command::reply_cap` bytes the blob may fill
//! +------------------+
//! | stack            |  the blob's stack; rsp starts at its top, 16-byte aligned
//! +------------------+  region end
//! ```
//!
//! The target is untrusted: another task sharing its memory may rewrite this region at any time.
//! The host therefore copies a reply out of the region before it reads a single field, and
//! bounds-checks every count, offset and length in that private copy.
#![no_std]

/// "STAS" — the first word of every command and reply.
pub const MAGIC: u32 = 0x5341_5453;
/// Bumped whenever a struct below changes shape.
pub const PROTOCOL_VERSION: u32 = 3;

/// What the host asks the parasite to do. One screen, like the table it is.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandId {
    /// Answer with `VdsoReport` + areas + symbols + strings.
    VdsoReport = 1,
    /// Answer with `TaskState`: what only the process itself can read (handlers, timers, brk…).
    TaskState = 2,
    /// Execute the `PlanOp` list at `Command::plan_off`; answer with `RestoreResult`.
    Restore = 3,
    /// For each `i32` POSIX timer id at `Command::plan_off`, answer its `timer_gettime`
    /// (`[i64; 4]`: interval sec/nsec, value sec/nsec), in the same order.
    TimerState = 4,
    /// Answer with `ThreadState`: what only the calling thread itself can read (its
    /// sigaltstack, its clear-child-tid address). Run in every thread.
    ThreadState = 5,
}

impl CommandId {
    pub fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::VdsoReport),
            2 => Some(Self::TaskState),
            3 => Some(Self::Restore),
            4 => Some(Self::TimerState),
            5 => Some(Self::ThreadState),
            _ => None,
        }
    }
}

/// Written by the host at the start of the command area.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Command {
    pub magic: u32,
    pub version: u32,
    pub id: u32,
    pub _pad: u32,
    /// Bytes available for the reply payload after the `ReplyHeader`.
    pub reply_cap: u64,
    /// Offset of the plan (for `Restore`) from the start of the command area, and its length
    /// in bytes: `plan_len / size_of::<PlanOp>()` operations.
    pub plan_off: u64,
    pub plan_len: u64,
    /// Bytes in the whole command area (reply and plan included).
    pub area_len: u64,
}

/// Written by the blob right after the `Command`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ReplyHeader {
    pub magic: u32,
    /// 0 on success, otherwise a `Status` value.
    pub status: u32,
    /// errno (positive) of the failing system call, when there is one.
    pub errno: u32,
    /// Bytes of payload that follow this header.
    pub len: u32,
}

/// Offset of the reply header from the start of the command area.
pub const REPLY_OFFSET: usize = 64;
/// Offset of the "done" word (a `u32`) from the start of the command area: the host clears
/// it, the blob sets it to 1 once its reply is written and it is parked (see `PARK_CODE`).
pub const DONE_OFFSET: usize = 56;
const _: () = assert!(core::mem::size_of::<Command>() <= DONE_OFFSET);
const _: () = assert!(DONE_OFFSET + 4 <= REPLY_OFFSET);

/// Where injected code waits when it has nothing to do: `1: mov eax, SYS_pause; syscall;
/// jmp 1b`. With every signal but SIGTRAP blocked it never gets past it, traced or not — so
/// a thread whose tracer died there waits, harmless, to be cured (stasis's guardian does).
/// The blob ends every command in it, at `PARK_OFFSET` from its entry; the injection site
/// has it right after its `syscall`.
pub const PARK_CODE: [u8; 9] = [0xb8, 0x22, 0x00, 0x00, 0x00, 0x0f, 0x05, 0xeb, 0xf7];
/// Offset of the blob's park loop from its entry point.
pub const PARK_OFFSET: u64 = 8;

/// Why a blob could not answer.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok = 0,
    BadCommand = 1,
    /// The reply did not fit in `reply_cap`.
    NoSpace = 2,
    /// A system call failed; `errno` says which error.
    Syscall = 3,
    /// The vDSO ELF found in memory does not parse.
    BadVdso = 4,
    /// /proc/self/maps had a line the blob could not parse.
    BadMaps = 5,
    /// A plan operation failed; the reply's `RestoreResult` says which.
    PlanFailed = 6,
    /// The plan is malformed (misaligned, outside the region, unknown operation).
    BadPlan = 7,
}

impl Status {
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            0 => Self::Ok,
            1 => Self::BadCommand,
            2 => Self::NoSpace,
            3 => Self::Syscall,
            4 => Self::BadVdso,
            5 => Self::BadMaps,
            6 => Self::PlanFailed,
            7 => Self::BadPlan,
            _ => return None,
        })
    }
}

/// Where the parasite learnt `AT_SYSINFO_EHDR`.
pub const AUXV_FROM_PRCTL: u32 = 1;
pub const AUXV_FROM_PROC: u32 = 2;

/// Flags in `VdsoReport::flags`.
pub const VDSO_MAPPED: u32 = 1 << 0;
/// `AT_SYSINFO_EHDR` points at the `[vdso]` area found in maps.
pub const VDSO_AUXV_MATCHES: u32 = 1 << 1;

/// Payload of `CommandId::VdsoReport`: this header, then `n_areas` × `VdsoArea`, then
/// `n_symbols` × `VdsoSymbol`, then `strtab_len` bytes of names (not NUL-terminated; every name is
/// an (offset, length) pair into that table).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VdsoReport {
    /// `AT_SYSINFO_EHDR` from the auxiliary vector, 0 when absent.
    pub auxv_ehdr: u64,
    /// Start of the `[vdso]` area parsed, 0 when none is mapped.
    pub vdso_base: u64,
    pub auxv_source: u32,
    pub flags: u32,
    pub n_areas: u32,
    pub n_symbols: u32,
    pub strtab_len: u32,
    pub _pad: u32,
}

/// One `[vvar*]` or `[vdso]` line of /proc/self/maps, in maps order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VdsoArea {
    pub start: u64,
    pub end: u64,
    /// PROT_* bits from the maps permissions.
    pub prot: u32,
    pub name: StrRef,
}

/// One defined dynamic symbol of the vDSO.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VdsoSymbol {
    /// Offset from the start of the `[vdso]` mapping.
    pub offset: u64,
    pub size: u64,
    pub name: StrRef,
    /// Version name (e.g. `LINUX_2.6`); empty when the symbol has none.
    pub version: StrRef,
    /// ELF `st_info` (binding << 4 | type).
    pub info: u8,
    pub _pad: [u8; 7],
}

/// A string in the report's string table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StrRef {
    pub off: u32,
    pub len: u32,
}

/// The one rule both sides use to decide which dynamic symbols a vDSO "exports": defined (not
/// `SHN_UNDEF`, not `SHN_ABS` — the latter are version-definition markers such as `LINUX_2.6`),
/// named, and a function or data object.
pub fn is_exported_symbol(st_info: u8, st_shndx: u16, name_len: usize) -> bool {
    const SHN_UNDEF: u16 = 0;
    const SHN_ABS: u16 = 0xfff1;
    const STT_OBJECT: u8 = 1;
    const STT_FUNC: u8 = 2;
    const STT_NOTYPE: u8 = 0;
    let kind = st_info & 0xf;
    let bind = st_info >> 4;
    // STB_GLOBAL = 1, STB_WEAK = 2
    name_len > 0
        && st_shndx != SHN_UNDEF
        && st_shndx != SHN_ABS
        && (bind == 1 || bind == 2)
        && matches!(kind, STT_FUNC | STT_OBJECT | STT_NOTYPE)
}

/// True for the names /proc/PID/maps gives the kernel's vDSO-related special mappings: `[vdso]`
/// and every `[vvar…]` (`[vvar]`, `[vvar_vclock]`, and whatever a future kernel adds).
pub fn is_vdso_area_name(name: &[u8]) -> bool {
    name == b"[vdso]" || (name.starts_with(b"[vvar") && name.ends_with(b"]"))
}

/// A kernel `struct sigaction` as `rt_sigaction` reads and writes it on x86_64.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KSigAction {
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

/// Payload of `CommandId::TaskState`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TaskState {
    /// Index `i` is signal `i + 1`.
    pub sigactions: [KSigAction; 64],
    /// Bit `i` set: `rt_sigaction` for signal `i + 1` succeeded.
    pub sigactions_ok: u64,
    /// ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF as `struct itimerval` (4 × i64 each).
    pub itimers: [[i64; 4]; 3],
    /// `brk(0)`.
    pub brk: u64,
    /// `prctl(PR_GET_DUMPABLE)`.
    pub dumpable: i64,
    /// `prctl(PR_GET_CHILD_SUBREAPER)`.
    pub child_subreaper: i64,
}

/// Payload of `CommandId::ThreadState`, about the thread that ran the command.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ThreadState {
    /// `stack_t`: ss_sp, ss_flags (low 32 bits), ss_size.
    pub altstack: [u64; 3],
    /// `prctl(PR_GET_TID_ADDRESS)`.
    pub tid_address: u64,
    /// `prctl(PR_GET_PDEATHSIG)`: the signal this thread gets when its parent dies.
    pub pdeathsig: i64,
}

/// One step of a restore plan: run system call `nr` with `args`, and check its result.
/// The host encodes every pointer argument as an address inside the shared region.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PlanOp {
    pub nr: u64,
    pub args: [u64; 6],
    /// One of the `EXPECT_*` rules.
    pub expect: u32,
    pub _pad: u32,
}

/// The result must be non-negative.
pub const EXPECT_OK: u32 = 0;
/// The result must equal `args[0]` (mmap/mremap at a fixed address).
pub const EXPECT_ARG0: u32 = 1;
/// The result must equal `args[4]` (the destination of mremap).
pub const EXPECT_ARG4: u32 = 2;
/// Any result is fine (best-effort cleanup).
pub const EXPECT_ANY: u32 = 3;
/// A pread loop: `nr` is ignored; args = (fd, addr, len, file_off); read until `len` bytes.
pub const EXPECT_PREAD_ALL: u32 = 4;
/// A copy inside the task: `nr` is ignored; args = (dst, src, len). Used to place bytes the
/// host prepared in the plan (a proxied vDSO) into freshly mapped memory.
pub const EXPECT_COPY: u32 = 5;
/// `clone3` of a thread: `nr` is ignored; args = (clone_args, size, expected tid). The result
/// must be the expected tid. The new thread must never run the plan: the host traces clones,
/// so it is stopped before it runs a single instruction; should it run regardless, it exits.
pub const EXPECT_CLONE: u32 = 6;

/// Payload of `CommandId::Restore`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RestoreResult {
    /// Operations completed.
    pub done: u64,
    /// Index of the failing operation (meaningful when status is `PlanFailed`).
    pub failed_op: u64,
    /// The raw result of the failing operation.
    pub result: i64,
}
