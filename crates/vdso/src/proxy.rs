//! Restoring a process under a kernel whose vDSO differs from the one it was dumped with.
//!
//! Two strategies:
//!
//! - **Remap**: the runtime kernel's own vDSO set (every `[vvar…]` and `[vdso]`) is moved whole to
//!   where the dumped one was. Correct only when the two are interchangeable for code that kept
//!   pointers into the old one (libc caches the vDSO function addresses at startup).
//! - **Proxy**: the dumped vDSO bytes stay at their old address as plain code, every exported
//!   function in them is patched to reach the runtime kernel's function of the same name and
//!   version (the runtime vDSO is mapped elsewhere), and the old vvar addresses get read-only
//!   zero placeholder pages.
//!
//! # The decision ([`decide`])
//!
//! Remap iff all of these hold, otherwise Proxy with one human-readable reason per difference
//! (at most [`MAX_REASONS`], then "and N more"):
//!
//! 1. The vDSO-related area lists are identical: same count, names, sizes, in the same order
//!    (this includes the `[vdso]` size). Old code reaches vvar at a fixed RIP-relative distance,
//!    so any layout change breaks it.
//! 2. Every exported symbol of the image exists in the runtime vDSO with the same name, version
//!    and offset: a caller's cached pointer must land on the same function.
//! 3. The runtime exports no symbol the image lacks: a new symbol means a different build, whose
//!    other functions may have moved code inside them that nobody checked.
//!
//! # The proxy image ([`build_proxy`])
//!
//! Exported symbols are grouped by offset (`clock_gettime` and `__vdso_clock_gettime` are one
//! function) and each group is patched once:
//!
//! - Runtime has a function of the same name and version → a jump to it ([`PatchKind::Jump`]).
//! - No counterpart, and the old code reaches vvar (or anything else outside the image) → a
//!   stub: the equivalent syscall for the known time/cpu/random functions
//!   ([`PatchKind::Syscall`]), else `-ENOSYS` ([`PatchKind::Enosys`]). Running the old code
//!   would read the zero placeholder pages and return wrong values (`clock_getres` → 0 ns).
//! - No counterpart and self-contained code → left as it is ([`PatchKind::Untouched`]).
//!
//! Invariants of every `Ok` result:
//!
//! - A patch lies in executable code of the old image, within its symbol's `st_size` (or, when
//!   `st_size` is 0, before the next symbol and the end of the code), never covers another
//!   symbol's entry, and is followed by `int3` up to the next instruction boundary of the old
//!   code, so no partial instruction remains.
//! - Bytes outside the patched ranges are the old image's; in particular the ELF headers and the
//!   exported symbols read back identical (checked after patching).
//! - The image comes from an untrusted process: anything that would break these is a
//!   `VdsoError`, never a panic and never a half-patched image.

pub mod header;
mod x86;

use std::ops::Range;

use crate::elf::Segments;
use crate::{human_size, symbols_from_image, VdsoError, VdsoSymbol};

/// How a dumped vDSO is brought back on the runtime kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Move the runtime kernel's vDSO set whole to where the dumped one was.
    Remap,
    /// Keep the dumped vDSO as patched code; `reasons` say why Remap is not safe.
    Proxy { reasons: Vec<String> },
}

/// Reasons listed before the rest are summarised as "and N more".
pub const MAX_REASONS: usize = 5;

/// Chooses between Remap and Proxy (rule in the module doc).
///
/// `image_areas`/`runtime_areas` are the vDSO-related areas in maps order as (name, size);
/// the symbols are as `symbols_from_image` exports them.
pub fn decide(
    image_areas: &[(String, u64)],
    image_syms: &[VdsoSymbol],
    runtime_areas: &[(String, u64)],
    runtime_syms: &[VdsoSymbol],
) -> Strategy {
    let mut reasons = area_differences(image_areas, runtime_areas);
    reasons.extend(symbol_differences(image_syms, runtime_syms));
    if reasons.is_empty() {
        return Strategy::Remap;
    }
    if reasons.len() > MAX_REASONS {
        let more = reasons.len() - MAX_REASONS;
        reasons.truncate(MAX_REASONS);
        reasons.push(format!("and {more} more"));
    }
    Strategy::Proxy { reasons }
}

/// Differences between two area lists. Areas are paired by name and occurrence (the second
/// `[vvar]` of one list with the second of the other), so an area missing on one side is named
/// as such instead of shifting every later comparison.
fn area_differences(image: &[(String, u64)], runtime: &[(String, u64)]) -> Vec<String> {
    let image = with_occurrence(image);
    let runtime = with_occurrence(runtime);
    let find = |list: &[AreaKey], key: &AreaKey| list.iter().position(|a| a.same_area(key));
    let mut out = Vec::new();
    for a in &image {
        match find(&runtime, a) {
            None => out.push(format!(
                "{} {} exists in the image only",
                a.name,
                human_size(a.size)
            )),
            Some(i) if runtime[i].size != a.size => out.push(format!(
                "{} {} in the image, {} here",
                a.name,
                human_size(a.size),
                human_size(runtime[i].size)
            )),
            Some(_) => {}
        }
    }
    for a in &runtime {
        if find(&image, a).is_none() {
            out.push(format!(
                "{} {} exists on this kernel only",
                a.name,
                human_size(a.size)
            ));
        }
    }
    // Areas present on both sides must also come in the same order.
    let common = |list: &[AreaKey], other: &[AreaKey]| -> Vec<String> {
        list.iter()
            .filter(|a| find(other, a).is_some())
            .map(|a| a.name.clone())
            .collect()
    };
    let (image_order, runtime_order) = (common(&image, &runtime), common(&runtime, &image));
    if image_order != runtime_order {
        out.push(format!(
            "area order {} in the image, {} here",
            image_order.join(" "),
            runtime_order.join(" ")
        ));
    }
    out
}

struct AreaKey {
    name: String,
    /// How many areas of the same name come before this one.
    occurrence: usize,
    size: u64,
}

impl AreaKey {
    fn same_area(&self, other: &AreaKey) -> bool {
        self.name == other.name && self.occurrence == other.occurrence
    }
}

fn with_occurrence(areas: &[(String, u64)]) -> Vec<AreaKey> {
    areas
        .iter()
        .enumerate()
        .map(|(i, (name, size))| AreaKey {
            name: name.clone(),
            occurrence: areas[..i].iter().filter(|(n, _)| n == name).count(),
            size: *size,
        })
        .collect()
}

/// One symbol-level difference; aliases with the same difference are merged into one reason.
#[derive(PartialEq, Eq)]
enum SymbolChange {
    /// In the image at this offset, absent here.
    Missing {
        offset: u64,
    },
    /// Here at this offset, absent from the image.
    New {
        offset: u64,
    },
    /// Same name, different version.
    Version {
        image: String,
        runtime: String,
    },
    Moved {
        image: u64,
        runtime: u64,
    },
}

fn symbol_differences(image: &[VdsoSymbol], runtime: &[VdsoSymbol]) -> Vec<String> {
    let mut changes: Vec<(SymbolChange, Vec<String>)> = Vec::new();
    let mut note =
        |change: SymbolChange, name: &str| match changes.iter_mut().find(|(c, _)| *c == change) {
            Some((_, names)) => names.push(name.to_string()),
            None => changes.push((change, vec![name.to_string()])),
        };
    for s in image {
        match same_symbol(runtime, s) {
            Some(r) if r.offset != s.offset => note(
                SymbolChange::Moved {
                    image: s.offset,
                    runtime: r.offset,
                },
                &s.name,
            ),
            Some(_) => {}
            None => match runtime.iter().find(|r| r.name == s.name) {
                Some(r) => note(
                    SymbolChange::Version {
                        image: s.version.clone(),
                        runtime: r.version.clone(),
                    },
                    &s.name,
                ),
                None => note(SymbolChange::Missing { offset: s.offset }, &s.name),
            },
        }
    }
    for r in runtime {
        // A name the image has under another version was reported above.
        if !image.iter().any(|s| s.name == r.name) {
            note(SymbolChange::New { offset: r.offset }, &r.name);
        }
    }
    // Most telling first: what disappears, what appears, then what moved.
    let rank = |c: &SymbolChange| match c {
        SymbolChange::Missing { .. } => 0,
        SymbolChange::New { .. } => 1,
        SymbolChange::Version { .. } => 2,
        SymbolChange::Moved { .. } => 3,
    };
    changes.sort_by_key(|(c, _)| rank(c));
    changes
        .into_iter()
        .map(|(change, mut names)| {
            // Same order whatever the dynsym order: `__vdso_time/time`.
            names.sort_by_key(|n| (!n.starts_with("__vdso_"), n.clone()));
            let names = names.join("/");
            match change {
                SymbolChange::Missing { .. } => format!("{names} missing here"),
                SymbolChange::New { .. } => format!("{names} exists on this kernel only"),
                SymbolChange::Version { image, runtime } => {
                    format!("{names} has version {image:?} in the image, {runtime:?} here")
                }
                SymbolChange::Moved { image, runtime } => {
                    format!("{names} at +{image:#x} in the image, +{runtime:#x} here")
                }
            }
        })
        .collect()
}

/// The symbol of `syms` with the name and version of `s`.
fn same_symbol<'a>(syms: &'a [VdsoSymbol], s: &VdsoSymbol) -> Option<&'a VdsoSymbol> {
    syms.iter()
        .find(|r| r.name == s.name && r.version == s.version)
}

/// A patched copy of a dumped vDSO, ready to be written at its old address.
#[derive(Clone, Debug)]
pub struct ProxyBuild {
    /// The old image with every exported function patched; same length as the old image.
    pub image: Vec<u8>,
    /// One entry per exported function offset, in offset order.
    pub patches: Vec<Patch>,
    /// One line per symbol that did not get a jump (stub, untouched, not a function).
    pub notes: Vec<String>,
}

/// What was done at one exported function of the old image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Patch {
    /// Offset from the old image start.
    pub offset: u64,
    /// Bytes replaced from `offset`: the patch plus the `int3` fill up to the next instruction
    /// boundary of the old code; 0 for `Untouched`. A thread whose saved rip lies strictly
    /// inside `offset..offset + len` cannot be resumed in this image.
    pub len: u64,
    /// Every exported name at this offset (aliases), in dynsym order.
    pub names: Vec<String>,
    pub kind: PatchKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PatchKind {
    /// Jumps to this address: the runtime vDSO's function of the same name and version.
    Jump { target: u64 },
    /// `mov eax, nr; syscall; ret`: no runtime counterpart, the old code reads vvar.
    Syscall { nr: u32 },
    /// `mov rax, -ENOSYS; ret`: no runtime counterpart or syscall, the old code reads vvar.
    Enosys,
    /// No runtime counterpart, does not read vvar: the old code is left to run.
    Untouched,
}

/// Builds the proxy image (module doc): `old_image` is the dumped `[vdso]` to live at
/// `old_base`; `runtime_syms` are the runtime vDSO's exports, mapped at `runtime_base`.
pub fn build_proxy(
    old_image: &[u8],
    old_base: u64,
    runtime_syms: &[VdsoSymbol],
    runtime_base: u64,
) -> Result<ProxyBuild, VdsoError> {
    let old_syms = symbols_from_image(old_image)?;
    let code = Segments::parse(old_image)?.code_ranges(old_image.len());
    if old_base.checked_add(old_image.len() as u64).is_none() {
        return Err(VdsoError::AddressOverflow {
            what: "old vDSO end",
            base: old_base,
            offset: old_image.len() as u64,
        });
    }
    let old = x86::OldCode {
        image: old_image,
        base: old_base,
        code: &code,
    };
    let groups = SymbolGroup::collect(&old_syms);
    let mut build = ProxyBuild {
        image: old_image.to_vec(),
        patches: Vec::new(),
        notes: Vec::new(),
    };
    for (i, group) in groups.iter().enumerate() {
        if !group.is_function {
            build.notes.push(format!(
                "{}: not a function, left as is",
                group.names.join("/")
            ));
            continue;
        }
        let next = groups.get(i + 1).map(|g| g.offset);
        let room = group.room(next, &code)?;
        let kind = match group.counterpart(runtime_syms) {
            Some(r) => PatchKind::Jump {
                target: runtime_base
                    .checked_add(r.offset)
                    .ok_or(VdsoError::AddressOverflow {
                        what: "runtime symbol",
                        base: runtime_base,
                        offset: r.offset,
                    })?,
            },
            None if old.reaches_outside(group.offset, group.size) => match group.syscall_nr() {
                Some(nr) => PatchKind::Syscall { nr },
                None => PatchKind::Enosys,
            },
            None => PatchKind::Untouched,
        };
        if let Some(note) = group.note(&kind) {
            build.notes.push(note);
        }
        let len = apply(&mut build.image, old_image, old_base, group, &room, &kind)?;
        build.patches.push(Patch {
            offset: group.offset,
            len,
            names: group.names.clone(),
            kind,
        });
    }
    // The patches stay inside code by construction; this catches a crafted image whose symbol
    // or string tables lie inside a function, which patching would silently rewrite.
    if symbols_from_image(&build.image).ok().as_deref() != Some(old_syms.as_slice()) {
        return Err(VdsoError::PatchChangedSymbols);
    }
    Ok(build)
}

/// Writes the bytes for `kind` at the group's entry and `int3` up to the next instruction
/// boundary of the old code; returns how many bytes were replaced.
fn apply(
    image: &mut [u8],
    old_image: &[u8],
    old_base: u64,
    group: &SymbolGroup,
    room: &Room,
    kind: &PatchKind,
) -> Result<u64, VdsoError> {
    // `old_base + image length` was checked not to overflow.
    let ip = old_base + group.offset;
    let encoded = match *kind {
        PatchKind::Jump { target } => x86::jump(ip, target),
        PatchKind::Syscall { nr } => x86::syscall_stub(ip, nr),
        PatchKind::Enosys => x86::enosys_stub(ip),
        PatchKind::Untouched => return Ok(0),
    }
    .map_err(|source| VdsoError::Encode {
        names: group.names.join("/"),
        offset: group.offset,
        source,
    })?;
    let patch_len = encoded.len() as u64;
    if patch_len > room.end - group.offset {
        return Err(VdsoError::PatchDoesNotFit {
            names: group.names.join("/"),
            offset: group.offset,
            patch_len: encoded.len(),
            room: room.end - group.offset,
            bound: room.bound.clone(),
        });
    }
    // `room` lies inside a code range, which lies inside the image.
    let span = group.offset as usize..room.end as usize;
    let boundary = x86::instruction_boundary(&old_image[span.clone()], ip, encoded.len()).ok_or(
        VdsoError::NoInstructionBoundary {
            names: group.names.join("/"),
            offset: group.offset,
            patch_end: group.offset + patch_len,
            bound: room.bound.clone(),
        },
    )?;
    let patched = &mut image[span.start..span.start + boundary];
    patched[..encoded.len()].copy_from_slice(&encoded);
    patched[encoded.len()..].fill(INT3);
    Ok(boundary as u64)
}

const INT3: u8 = 0xcc;

/// Exported symbols sharing one offset: one function under several names.
struct SymbolGroup {
    offset: u64,
    names: Vec<String>,
    /// (name, version) of every member, for finding a runtime counterpart.
    members: Vec<(String, String)>,
    /// Smallest non-zero `st_size` of the members; `None` when all are 0 (unknown).
    size: Option<u64>,
    /// Every member is `STT_FUNC`; anything else is data and is never patched.
    is_function: bool,
}

/// How far a patch at a group's entry may reach.
struct Room {
    /// Image offset the patch and its `int3` fill must stay below.
    end: u64,
    /// What set `end`, for error messages.
    bound: String,
}

impl SymbolGroup {
    /// Groups `syms` by offset, in offset order; members in dynsym order.
    fn collect(syms: &[VdsoSymbol]) -> Vec<SymbolGroup> {
        let mut groups: Vec<SymbolGroup> = Vec::new();
        for s in syms {
            let size = (s.size > 0).then_some(s.size);
            match groups.iter_mut().find(|g| g.offset == s.offset) {
                Some(g) => {
                    g.names.push(s.name.clone());
                    g.members.push((s.name.clone(), s.version.clone()));
                    g.size = match (g.size, size) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    g.is_function &= s.is_function();
                }
                None => groups.push(SymbolGroup {
                    offset: s.offset,
                    names: vec![s.name.clone()],
                    members: vec![(s.name.clone(), s.version.clone())],
                    size,
                    is_function: s.is_function(),
                }),
            }
        }
        groups.sort_by_key(|g| g.offset);
        groups
    }

    /// The runtime function with the name and version of a member, members tried in order.
    fn counterpart<'r>(&self, runtime: &'r [VdsoSymbol]) -> Option<&'r VdsoSymbol> {
        self.members.iter().find_map(|(name, version)| {
            runtime
                .iter()
                .find(|r| &r.name == name && &r.version == version && r.is_function())
        })
    }

    /// The bytes a patch may occupy: up to `st_size` (when known), the next group's entry and
    /// the end of the code range holding the entry, whichever comes first.
    fn room(&self, next: Option<u64>, code: &[Range<u64>]) -> Result<Room, VdsoError> {
        let range = code
            .iter()
            .find(|r| r.contains(&self.offset))
            .ok_or_else(|| VdsoError::SymbolNotInCode {
                names: self.names.join("/"),
                offset: self.offset,
            })?;
        let mut room = Room {
            end: range.end,
            bound: format!("the end of its code at +{:#x}", range.end),
        };
        let mut limit = |end: u64, bound: String| {
            if end < room.end {
                room = Room { end, bound };
            }
        };
        if let Some(next) = next {
            limit(next, format!("the next symbol at +{next:#x}"));
        }
        if let Some(size) = self.size {
            limit(
                self.offset.saturating_add(size),
                format!("its st_size of {size} bytes"),
            );
        }
        Ok(room)
    }

    /// The syscall doing this function's job, for the functions the kernel has one for.
    fn syscall_nr(&self) -> Option<u32> {
        self.names.iter().find_map(|name| {
            let plain = name.strip_prefix("__vdso_").unwrap_or(name);
            SYSCALLS
                .iter()
                .find(|(n, _)| *n == plain)
                .map(|&(_, nr)| nr)
        })
    }

    /// The note explaining a patch that is not a jump.
    fn note(&self, kind: &PatchKind) -> Option<String> {
        let names = self.names.join("/");
        let what = match kind {
            PatchKind::Jump { .. } => return None,
            PatchKind::Syscall { nr } => {
                format!("reads vvar: now makes syscall {nr} instead")
            }
            PatchKind::Enosys => {
                "reads vvar and has no syscall equivalent: now returns -ENOSYS".to_string()
            }
            PatchKind::Untouched => "reads no vvar: its old code is left to run".to_string(),
        };
        Some(format!("{names}: not exported on this kernel; {what}"))
    }
}

/// vDSO functions (without the `__vdso_` prefix) and the x86-64 syscall doing the same job
/// with the same arguments in the same registers.
const SYSCALLS: [(&str, u32); 6] = [
    ("gettimeofday", 96),
    ("time", 201),
    ("clock_gettime", 228),
    ("clock_getres", 229),
    ("getcpu", 309),
    ("getrandom", 318),
];

#[cfg(test)]
mod tests;
