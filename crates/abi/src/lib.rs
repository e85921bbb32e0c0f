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
pub const PROTOCOL_VERSION: u32 = 1;

/// What the host asks the parasite to do. One screen, like the table it is.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandId {
    /// Answer with `VdsoReport` + areas + symbols + strings.
    VdsoReport = 1,
}

impl CommandId {
    pub fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::VdsoReport),
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
const _: () = assert!(core::mem::size_of::<Command>() <= REPLY_OFFSET);

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
