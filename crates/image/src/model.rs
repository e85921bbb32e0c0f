//! What a checkpoint image holds, record by record. Serialized as the JSON payload of a record
//! file (see the crate doc for the container); page contents live in `pages.img` and are
//! referenced by `PageRun`s.
//!
//! Shaped for several threads from the start: per-thread state (registers, signal mask, pending
//! signals, sigaltstack, rseq, robust list) is in one `Core` per thread; process-wide state is in
//! `Process` and `Mm`.

use serde::{Deserialize, Serialize};

pub const KIND_INVENTORY: u32 = 1;
pub const KIND_CORE: u32 = 2;
pub const KIND_MM: u32 = 3;
pub const KIND_PROCESS: u32 = 4;
pub const KIND_FILES: u32 = 5;
pub const KIND_VDSO: u32 = 6;

pub const INVENTORY: &str = "inventory.img";
pub const MM: &str = "mm.img";
pub const PROCESS: &str = "process.img";
pub const FILES: &str = "files.img";
pub const VDSO: &str = "vdso.img";

pub fn core_name(tid: i32) -> String {
    format!("core-{tid}.img")
}

/// The image's table of contents, written last: an image without it is incomplete.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Inventory {
    pub pid: i32,
    /// Thread ids, the leader first; one `core-<tid>.img` each.
    pub threads: Vec<i32>,
    pub comm: String,
    /// `uname -r` of the kernel the image was made under.
    pub kernel: String,
    /// Unix time of the dump.
    pub created: u64,
    pub stasis_version: String,
    /// Size of the XSAVE area on the dumping CPU, and its XCR0.
    pub xsave_size: u32,
    pub xcr0: u64,
    /// Where the dumping CPU puts each extended XSAVE component (standard format):
    /// (component, offset, size) from CPUID leaf 0xD, for translating to another CPU.
    #[serde(default)]
    pub xsave_layout: Vec<(u32, u32, u32)>,
    /// CLOCK_MONOTONIC and CLOCK_BOOTTIME at the dump, in ns: a restore on a machine whose
    /// clocks are behind (booted later) shifts them forward with a time namespace, so the
    /// process never sees them go backwards. 0 in images that predate these fields.
    #[serde(default)]
    pub monotonic_ns: u64,
    #[serde(default)]
    pub boottime_ns: u64,
    /// Bytes of page data and their checksum (cross-checked with pages.img's own header).
    pub page_data_len: u64,
    pub page_data_xxh3: u64,
}

/// General-purpose registers as `struct user_regs_struct` orders them.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Gpr {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub orig_rax: u64,
    pub rip: u64,
    pub cs: u64,
    pub eflags: u64,
    pub rsp: u64,
    pub ss: u64,
    pub fs_base: u64,
    pub gs_base: u64,
    pub ds: u64,
    pub es: u64,
    pub fs: u64,
    pub gs: u64,
}

/// A raw `siginfo_t` (128 bytes) of a pending signal.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PendingSignal {
    pub signo: i32,
    #[serde(with = "hex_bytes")]
    pub siginfo: Vec<u8>,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AltStack {
    pub sp: u64,
    pub flags: i32,
    pub size: u64,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Rseq {
    pub addr: u64,
    pub len: u32,
    pub sig: u32,
}

/// One thread: `core-<tid>.img`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Core {
    pub tid: i32,
    pub gpr: Gpr,
    /// The XSAVE area exactly as `PTRACE_GETREGSET(NT_X86_XSTATE)` gave it.
    #[serde(with = "hex_bytes")]
    pub xsave: Vec<u8>,
    pub sigmask: u64,
    /// Signals pending for this thread only.
    pub pending: Vec<PendingSignal>,
    pub altstack: AltStack,
    pub rseq: Option<Rseq>,
    /// `set_robust_list` head and length (0 when none).
    pub robust_list: u64,
    pub robust_list_len: u64,
    /// `set_tid_address` value.
    pub clear_child_tid: u64,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SigAction {
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ITimer {
    pub interval_sec: i64,
    pub interval_usec: i64,
    pub value_sec: i64,
    pub value_usec: i64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Creds {
    /// real, effective, saved, filesystem
    pub uids: [u32; 4],
    pub gids: [u32; 4],
    pub groups: Vec<u32>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Rlimit {
    pub resource: u32,
    pub cur: u64,
    pub max: u64,
}

/// A POSIX timer (`timer_create`), as /proc/PID/timers and `timer_gettime` describe it.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PosixTimer {
    pub id: i32,
    pub clock: i32,
    pub signo: i32,
    pub sigval: u64,
    /// SIGEV_SIGNAL (0), SIGEV_NONE (1), SIGEV_THREAD (2), possibly | SIGEV_THREAD_ID (4).
    pub notify: i32,
    /// The thread signalled with SIGEV_THREAD_ID.
    pub tid: i32,
    /// Remaining time and reload interval (`struct itimerspec`).
    pub interval_sec: i64,
    pub interval_nsec: i64,
    pub value_sec: i64,
    pub value_nsec: i64,
}

/// Process-wide state: `process.img`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Process {
    /// Index `i` is signal `i + 1`.
    pub sigactions: Vec<SigAction>,
    /// Signals pending for the whole process.
    pub shared_pending: Vec<PendingSignal>,
    /// ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF.
    pub itimers: [ITimer; 3],
    pub posix_timers: Vec<PosixTimer>,
    pub rlimits: Vec<Rlimit>,
    pub creds: Creds,
    pub umask: u32,
    pub cwd: String,
    pub root: String,
    pub personality: u32,
    pub comm: String,
    pub dumpable: i32,
    pub pgid: i32,
    pub sid: i32,
}

/// What backs a VMA.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Backing {
    /// Private anonymous memory (heap, stack, malloc arenas, …).
    Anon,
    /// Shared anonymous memory (`MAP_SHARED|MAP_ANONYMOUS`, shmem). `id` names the shmem
    /// object (its inode): VMAs with the same id are views of one object, at `offset` in it.
    AnonShared {
        #[serde(default)]
        id: u64,
        #[serde(default)]
        offset: u64,
    },
    /// A file mapping; private ones also carry their modified pages. `ghost`: the file had
    /// been deleted (e.g. a binary replaced by an upgrade); its contents are in pages.img.
    File {
        path: String,
        offset: u64,
        dev: u64,
        inode: u64,
        #[serde(default)]
        ghost: Option<Ghost>,
    },
    /// A kernel vDSO-related special mapping (`[vdso]`, `[vvar]`, `[vvar_vclock]`, …).
    Vdso { name: String },
}

/// The contents of a deleted file that is still mapped, stored once per file in pages.img.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ghost {
    pub data_off: u64,
    pub len: u64,
    pub mode: u32,
}

/// Consecutive dumped pages of one VMA, stored contiguously in pages.img.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PageRun {
    pub addr: u64,
    pub pages: u64,
    /// Offset of the first page in pages.img (page-aligned).
    pub file_off: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    /// PROT_* bits.
    pub prot: u32,
    pub shared: bool,
    pub growsdown: bool,
    /// The name /proc/PID/maps showed (`[heap]`, a path, empty…), for humans.
    pub name: String,
    pub backing: Backing,
    pub pages: Vec<PageRun>,
}

/// `struct prctl_mm_map` fields.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MmFields {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
}

/// The address space: `mm.img`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Mm {
    pub vmas: Vec<Vma>,
    pub fields: MmFields,
    pub auxv: Vec<u64>,
    pub exe: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FdKind {
    /// A file with a name (regular file or directory).
    Path { path: String },
    /// A regular file that was deleted while open; its contents are in pages.img.
    Deleted {
        path: String,
        data_off: u64,
        len: u64,
        mode: u32,
    },
    /// A character device opened by path (`/dev/null`, …).
    CharDev { path: String, rdev: u64 },
    /// One end of a pipe. `id` is the pipe inode, shared by both ends; the buffered data is
    /// recorded once per pipe, on the first end met.
    Pipe {
        id: u64,
        data_off: u64,
        len: u64,
        size: u32,
    },
    /// A terminal, taken over from the restoring stasis (`--shell-job`).
    Tty { path: String },
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Fd {
    pub fd: i32,
    /// open(2) flags from fdinfo (access mode, O_APPEND, O_NONBLOCK…).
    pub flags: u32,
    pub cloexec: bool,
    pub pos: u64,
    pub kind: FdKind,
}

/// Open files: `files.img`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Files {
    pub fds: Vec<Fd>,
}

/// The vDSO as the parasite reported it from inside, plus the `[vdso]` bytes: `vdso.img`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VdsoRecord {
    pub auxv_ehdr: u64,
    /// Areas in maps order: (name, start, end).
    pub areas: Vec<(String, u64, u64)>,
    /// Exported symbols: (name, version, offset, size).
    pub symbols: Vec<(String, String, u64, u64)>,
    /// The `[vdso]` text (vvar contents are per-kernel data and never dumped).
    #[serde(with = "hex_bytes")]
    pub vdso_bytes: Vec<u8>,
}

/// Byte vectors as lowercase hex strings: compact, diffable, and JSON has no bytes type.
mod hex_bytes {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(v.len() * 2);
        for b in v {
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 15) as usize] as char);
        }
        s.serialize_str(&out)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        if s.len() % 2 != 0 {
            return Err(D::Error::custom("odd-length hex string"));
        }
        let nib = |c: u8| match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            _ => Err(D::Error::custom("bad hex digit")),
        };
        s.as_bytes()
            .chunks_exact(2)
            .map(|p| Ok(nib(p[0])? << 4 | nib(p[1])?))
            .collect()
    }
}
