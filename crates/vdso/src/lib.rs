//! Host-side understanding of a process's vDSO: which special mappings make it up, what its
//! ELF image exports, and reading that image from a live process.
//!
//! Invariants the rest of stasis relies on:
//!
//! - A `VdsoLayout` is exactly what /proc/PID/maps lists, in maps order; no count, order or size
//!   of `[vvar…]`/`[vdso]` areas is assumed anywhere (kernels 6.1, 6.13 and 6.15+ all differ).
//! - "Exported symbol" means `stasis_abi::is_exported_symbol`, counted the parasite's way
//!   (`DT_HASH` nchain, else `DT_GNU_HASH`), so the host and the parasite can be cross-checked
//!   symbol for symbol.
//! - Images are untrusted input: parsing returns `VdsoError` on anything malformed and never
//!   panics; every returned symbol lies inside the image.
//! - Only `[vdso]` is ever read: vvar contents are per-kernel data and never dumped.

mod elf;
mod layout;
pub mod proxy;

use std::fs::File;
use std::os::unix::fs::FileExt;

pub use elf::{symbols_from_image, VdsoSymbol};
pub use layout::{human_size, VdsoArea, VdsoLayout};
pub use proxy::{build_proxy, decide, Patch, PatchKind, ProxyBuild, Strategy};

/// Everything that can go wrong reading or parsing a vDSO.
#[derive(Debug, thiserror::Error)]
pub enum VdsoError {
    // --- the live process ---
    #[error("pid {pid}: cannot read its maps")]
    Maps {
        pid: i32,
        #[source]
        source: stasis_proc::ProcError,
    },
    #[error("pid {pid}: {name} at {start:#x} is not the [vdso]; only the vDSO image is read")]
    NotVdsoArea { pid: i32, name: String, start: u64 },
    #[error("pid {pid}: [vdso] area {start:#x}-{end:#x} is empty or implausibly large")]
    BadArea { pid: i32, start: u64, end: u64 },
    #[error("pid {pid}: cannot open /proc/{pid}/mem")]
    OpenMem {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("pid {pid}: cannot read /proc/{pid}/mem at {addr:#x}")]
    ReadMem {
        pid: i32,
        addr: u64,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "pid {pid}: /proc/{pid}/mem ended at {addr:#x}, {missing} bytes short of the [vdso] end"
    )]
    ShortRead { pid: i32, addr: u64, missing: u64 },

    // --- the image (offsets are from the image start) ---
    #[error("vDSO image does not start with the ELF magic")]
    NotElf,
    #[error("vDSO image is not ELF64 little-endian x86-64: {what}")]
    UnsupportedElf { what: String },
    #[error("vDSO image: cannot parse the {what}")]
    Elf {
        what: &'static str,
        #[source]
        source: goblin::error::Error,
    },
    #[error("vDSO image has no PT_LOAD segment")]
    NoLoadSegment,
    #[error("vDSO image: first PT_LOAD has p_vaddr {vaddr:#x} below p_offset {offset:#x}")]
    BadLoadSegment { vaddr: u64, offset: u64 },
    #[error("vDSO image has no PT_DYNAMIC segment")]
    NoDynamic,
    #[error("vDSO image: the dynamic section has no {0}")]
    MissingDynamicTag(&'static str),
    #[error("vDSO image: DT_SYMENT is {0}, expected 24")]
    BadSymEnt(u64),
    #[error("vDSO image: {what} address {addr:#x} is outside the {image_len}-byte image")]
    AddressOutsideImage {
        what: &'static str,
        addr: u64,
        image_len: usize,
    },
    #[error("vDSO image: {what} ({len} bytes at offset {offset:#x}) is outside the {image_len}-byte image")]
    TableOutsideImage {
        what: &'static str,
        offset: u64,
        len: u64,
        image_len: usize,
    },
    #[error("vDSO image: DT_HASH counts {nchain} symbols but DT_GNU_HASH counts {gnu}")]
    HashCountMismatch { nchain: usize, gnu: usize },
    #[error(
        "vDSO image: dynamic symbol {index} has a bad name (string table offset {st_name:#x})"
    )]
    BadSymbolName { index: usize, st_name: u64 },
    #[error("vDSO image: symbol {name} (value {value:#x}, size {size}) is outside the {image_len}-byte image")]
    SymbolOutsideImage {
        name: String,
        value: u64,
        size: u64,
        image_len: usize,
    },
    #[error("vDSO image: symbol {name} has version index {ndx}, which no DT_VERDEF entry defines")]
    BadVersionIndex { name: String, ndx: u16 },
    #[error("vDSO image: bad DT_VERDEF entry at offset {offset:#x}")]
    BadVerdef { offset: u64 },

    // --- building a proxy vDSO (offsets from the old image start) ---
    #[error("vDSO proxy: {names} at +{offset:#x} is not in an executable segment's code")]
    SymbolNotInCode { names: String, offset: u64 },
    #[error("vDSO proxy: the {patch_len}-byte patch for {names} at +{offset:#x} does not fit: {room} bytes up to {bound}")]
    PatchDoesNotFit {
        names: String,
        offset: u64,
        patch_len: usize,
        room: u64,
        bound: String,
    },
    #[error("vDSO proxy: the old code of {names} at +{offset:#x} has no instruction boundary between the patch end +{patch_end:#x} and {bound}")]
    NoInstructionBoundary {
        names: String,
        offset: u64,
        patch_end: u64,
        bound: String,
    },
    #[error("vDSO proxy: {what} address {base:#x} + {offset:#x} overflows 64 bits")]
    AddressOverflow {
        what: &'static str,
        base: u64,
        offset: u64,
    },
    #[error("vDSO proxy: cannot encode the patch for {names} at +{offset:#x}")]
    Encode {
        names: String,
        offset: u64,
        #[source]
        source: iced_x86::IcedError,
    },
    #[error("vDSO proxy: patching would change the image's exported symbols (a symbol table lies inside patched code)")]
    PatchChangedSymbols,
}

/// Upper bound on a `[vdso]` area read into memory. Real images are a few pages; this only keeps
/// a bogus area (a hand-built or corrupted `VdsoArea`) from causing a huge allocation. It is not
/// a layout assumption: nothing else depends on it.
pub const MAX_IMAGE_SIZE: u64 = 16 << 20;

/// Reads the `[vdso]` bytes of a live process through /proc/PID/mem (pread at the area's
/// address). Reading another process needs ptrace access to it (same rules as PTRACE_ATTACH).
pub fn read_image(pid: i32, area: &VdsoArea) -> Result<Vec<u8>, VdsoError> {
    if !area.is_vdso() {
        return Err(VdsoError::NotVdsoArea {
            pid,
            name: area.name.clone(),
            start: area.start,
        });
    }
    let size = area.size();
    if size == 0 || size > MAX_IMAGE_SIZE {
        return Err(VdsoError::BadArea {
            pid,
            start: area.start,
            end: area.end,
        });
    }
    let mem = File::open(format!("/proc/{pid}/mem"))
        .map_err(|source| VdsoError::OpenMem { pid, source })?;
    // Bounded by MAX_IMAGE_SIZE above, so the cast cannot truncate.
    let mut image = vec![0u8; size as usize];
    let mut done = 0usize;
    while done < image.len() {
        let addr = area.start + done as u64;
        match mem.read_at(&mut image[done..], addr) {
            Ok(0) => {
                return Err(VdsoError::ShortRead {
                    pid,
                    addr,
                    missing: size - done as u64,
                });
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => return Err(VdsoError::ReadMem { pid, addr, source }),
        }
    }
    Ok(image)
}

#[cfg(test)]
mod tests;
