//! The exported symbols of a vDSO image, read from its dynamic symbol table.
//!
//! The parasite reports the same list from inside the target and the host compares the two, so
//! this module follows the parasite's reading rules, not goblin's defaults:
//!
//! - Tables are found through `PT_DYNAMIC` (`DT_SYMTAB`, `DT_STRTAB`, `DT_VERSYM`, `DT_VERDEF`),
//!   never through section headers, which a loader does not need and an image may lack.
//! - Addresses are turned into image offsets with one link base: the first `PT_LOAD`'s
//!   `p_vaddr - p_offset`, the same base symbol offsets are reported against.
//! - The symbol count is `DT_HASH`'s `nchain` when present, else found by walking
//!   `DT_GNU_HASH`. goblin's `Elf::parse` prefers `DT_GNU_HASH`, reports 0 symbols when no
//!   symbol is hashed, and takes versions from section headers only, so only its header,
//!   program-header, dynamic-array and symbol-entry readers are used here.
//! - A symbol is exported iff `stasis_abi::is_exported_symbol` says so; order is dynsym index
//!   order.
//!
//! The image comes from an untrusted process: every offset and count is checked against the
//! image before it is used, and a bad image is an `Err`, never a panic. Where the parasite
//! silently drops an odd symbol (a name outside the string table, a value below the link base)
//! or ignores a table (an address outside the image, an unknown version index), this side
//! reports an error instead: the host is the one that must explain a broken vDSO. Every
//! returned symbol lies inside the image (`offset + size <= image.len()`), so later code may
//! patch at `offset` without checking again.

use goblin::container::{Container, Ctx, Endian};
use goblin::elf::dynamic::{
    DT_GNU_HASH, DT_HASH, DT_NULL, DT_STRSZ, DT_STRTAB, DT_SYMENT, DT_SYMTAB, DT_VERDEF,
    DT_VERDEFNUM, DT_VERSYM,
};
use goblin::elf::header::{EI_CLASS, EI_DATA, ELFCLASS64, ELFDATA2LSB, ELFMAG, EM_X86_64};
use goblin::elf::program_header::{PF_X, PT_LOAD};
use goblin::elf::{Dynamic, Elf, Header, ProgramHeader, Symtab};
use serde::Serialize;
use std::ops::Range;

use crate::VdsoError;

/// One exported symbol of a vDSO.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VdsoSymbol {
    pub name: String,
    /// Version name from `DT_VERDEF` (`LINUX_2.6`); empty when the symbol is unversioned.
    pub version: String,
    /// Offset from the start of the `[vdso]` mapping (`st_value` minus the link base).
    pub offset: u64,
    pub size: u64,
    /// ELF `st_info` (binding << 4 | type).
    pub info: u8,
}

impl VdsoSymbol {
    /// `STT_FUNC`: code a trampoline can redirect. Data objects cannot be proxied that way.
    pub fn is_function(&self) -> bool {
        self.info & 0xf == goblin::elf::sym::STT_FUNC
    }
}

/// Size of one `Elf64_Sym`; the only `DT_SYMENT` an ELF64 image may have.
const SYMENT: u64 = 24;
/// Size of one `Elf64_Verdef`.
const VERDEF_SIZE: u64 = 20;
/// `Elf64_Versym` values below this mean "local" (0) and "global, unversioned" (1).
const FIRST_DEFINED_VERSION: u16 = 2;
/// The top bit of a versym entry marks a hidden (non-default) version; the index is the rest.
const VERSYM_INDEX_MASK: u16 = 0x7fff;

/// Parses the dynamic symbol table of a vDSO image (bytes as mapped, starting at the ELF header).
///
/// Returns every symbol passing `stasis_abi::is_exported_symbol`, in dynsym index order, with
/// its version name and its offset from the start of the image.
pub fn symbols_from_image(image: &[u8]) -> Result<Vec<VdsoSymbol>, VdsoError> {
    let tables = DynTables::parse(image)?;
    let versions = tables.version_definitions()?;
    let count = tables.symbol_count()?;
    // The whole table must be inside the image before goblin is asked to index it (no
    // overflow: count comes from 32-bit table fields).
    let symtab_len = count as u64 * SYMENT;
    tables.bytes(tables.symtab as u64, symtab_len, "dynamic symbol table")?;
    let symtab = Symtab::parse(image, tables.symtab, count, tables.ctx).map_err(|source| {
        VdsoError::Elf {
            what: "dynamic symbol table",
            source,
        }
    })?;

    let mut out = Vec::new();
    for index in 0..count {
        // Cannot fail: the table was bounds-checked for `count` entries above.
        let Some(sym) = symtab.get(index) else {
            let offset = tables.symtab as u64 + index as u64 * SYMENT;
            return Err(tables.outside("dynamic symbol", offset, SYMENT));
        };
        let name = tables
            .string(sym.st_name as u64)
            .ok_or(VdsoError::BadSymbolName {
                index,
                st_name: sym.st_name as u64,
            })?;
        // st_shndx was read from a 16-bit field; the fallback is unreachable.
        let shndx = u16::try_from(sym.st_shndx).unwrap_or(u16::MAX);
        if !stasis_abi::is_exported_symbol(sym.st_info, shndx, name.len()) {
            continue;
        }
        let name = std::str::from_utf8(name)
            .map_err(|_| VdsoError::BadSymbolName {
                index,
                st_name: sym.st_name as u64,
            })?
            .to_string();
        let outside = || VdsoError::SymbolOutsideImage {
            name: name.clone(),
            value: sym.st_value,
            size: sym.st_size,
            image_len: image.len(),
        };
        let offset = sym
            .st_value
            .checked_sub(tables.link_base)
            .ok_or_else(outside)?;
        let end = offset.checked_add(sym.st_size).ok_or_else(outside)?;
        if end > image.len() as u64 {
            return Err(outside());
        }
        let version = tables.version_of(index, &name, &versions)?;
        out.push(VdsoSymbol {
            name,
            version,
            offset,
            size: sym.st_size,
            info: sym.st_info,
        });
    }
    Ok(out)
}

/// The ELF header and program headers of an image, checked: the start of every reader.
pub(crate) struct Segments {
    ctx: Ctx,
    header: Header,
    phdrs: Vec<ProgramHeader>,
    /// Link address of image byte 0: first `PT_LOAD`'s `p_vaddr - p_offset`.
    link_base: u64,
}

impl Segments {
    pub(crate) fn parse(image: &[u8]) -> Result<Self, VdsoError> {
        if image.get(..ELFMAG.len()) != Some(ELFMAG.as_slice()) {
            return Err(VdsoError::NotElf);
        }
        // Checked before goblin reads the rest so the error says what is wrong, not just "bad".
        match (image.get(EI_CLASS), image.get(EI_DATA)) {
            (Some(&ELFCLASS64), Some(&ELFDATA2LSB)) => {}
            (class, data) => {
                let show = |b: Option<&u8>| b.map_or("missing".to_string(), |b| b.to_string());
                return Err(VdsoError::UnsupportedElf {
                    what: format!("ELF class {}, data encoding {}", show(class), show(data)),
                });
            }
        }
        let header = Elf::parse_header(image).map_err(|source| VdsoError::Elf {
            what: "ELF header",
            source,
        })?;
        if header.e_machine != EM_X86_64 {
            return Err(VdsoError::UnsupportedElf {
                what: format!("machine {}", header.e_machine),
            });
        }
        let ctx = Ctx::new(Container::Big, Endian::Little);
        if header.e_phnum != 0 && header.e_phentsize as usize != ProgramHeader::size(ctx) {
            return Err(VdsoError::UnsupportedElf {
                what: format!("program header size {}", header.e_phentsize),
            });
        }
        let phoff = usize::try_from(header.e_phoff).map_err(|_| VdsoError::TableOutsideImage {
            what: "program headers",
            offset: header.e_phoff,
            len: u64::from(header.e_phnum) * u64::from(header.e_phentsize),
            image_len: image.len(),
        })?;
        let phdrs =
            ProgramHeader::parse(image, phoff, header.e_phnum as usize, ctx).map_err(|source| {
                VdsoError::Elf {
                    what: "program headers",
                    source,
                }
            })?;

        let load = phdrs
            .iter()
            .find(|p| p.p_type == PT_LOAD)
            .ok_or(VdsoError::NoLoadSegment)?;
        let link_base =
            load.p_vaddr
                .checked_sub(load.p_offset)
                .ok_or(VdsoError::BadLoadSegment {
                    vaddr: load.p_vaddr,
                    offset: load.p_offset,
                })?;
        Ok(Segments {
            ctx,
            header,
            phdrs,
            link_base,
        })
    }

    /// The image byte ranges (offsets from the image start, as symbol offsets are) that hold
    /// executable code: each executable `PT_LOAD`'s file bytes, clipped to the image, minus the
    /// ELF header and program header table (which a vDSO's single `PT_LOAD` also maps). A patch
    /// may only ever be written inside one of these.
    pub(crate) fn code_ranges(&self, image_len: usize) -> Vec<Range<u64>> {
        let image_len = image_len as u64;
        let table_end = self
            .header
            .e_phoff
            .saturating_add(u64::from(self.header.e_phnum) * u64::from(self.header.e_phentsize));
        let headers_end = table_end.max(u64::from(self.header.e_ehsize));
        self.phdrs
            .iter()
            .filter(|p| p.p_type == PT_LOAD && p.p_flags & PF_X != 0)
            .filter_map(|p| {
                let start = p.p_vaddr.checked_sub(self.link_base)?;
                let end = start.saturating_add(p.p_filesz).min(image_len);
                let start = start.max(headers_end);
                (start < end).then_some(start..end)
            })
            .collect()
    }
}

/// Where the dynamic tables of an image are, as image offsets.
struct DynTables<'a> {
    image: &'a [u8],
    ctx: Ctx,
    /// Link address of image byte 0: first `PT_LOAD`'s `p_vaddr - p_offset`.
    link_base: u64,
    symtab: usize,
    strtab: usize,
    strsz: u64,
    hash: Option<usize>,
    gnu_hash: Option<usize>,
    versym: Option<usize>,
    verdef: Option<usize>,
    verdefnum: Option<u64>,
}

/// One `Elf64_Verdef` entry reduced to what symbol lookup needs.
struct VersionDef<'a> {
    ndx: u16,
    name: &'a [u8],
}

impl<'a> DynTables<'a> {
    fn parse(image: &'a [u8]) -> Result<Self, VdsoError> {
        let Segments {
            ctx,
            phdrs,
            link_base,
            ..
        } = Segments::parse(image)?;
        let dynamic = Dynamic::parse(image, &phdrs, ctx)
            .map_err(|source| VdsoError::Elf {
                what: "dynamic section",
                source,
            })?
            .ok_or(VdsoError::NoDynamic)?;

        let to_offset = |what: &'static str, addr: u64| -> Result<usize, VdsoError> {
            addr.checked_sub(link_base)
                .and_then(|o| usize::try_from(o).ok())
                .filter(|&o| o < image.len())
                .ok_or(VdsoError::AddressOutsideImage {
                    what,
                    addr,
                    image_len: image.len(),
                })
        };
        let (mut symtab, mut strtab, mut strsz) = (None, None, None);
        let (mut hash, mut gnu_hash, mut versym, mut verdef, mut verdefnum) =
            (None, None, None, None, None);
        // goblin already stops at DT_NULL; a later duplicate tag wins, as in the parasite.
        for d in dynamic.dyns.iter().take_while(|d| d.d_tag != DT_NULL) {
            let v = d.d_val;
            match d.d_tag {
                DT_SYMTAB => symtab = Some(to_offset("DT_SYMTAB", v)?),
                DT_STRTAB => strtab = Some(to_offset("DT_STRTAB", v)?),
                DT_STRSZ => strsz = Some(v),
                DT_SYMENT if v != SYMENT => return Err(VdsoError::BadSymEnt(v)),
                DT_HASH => hash = Some(to_offset("DT_HASH", v)?),
                DT_GNU_HASH => gnu_hash = Some(to_offset("DT_GNU_HASH", v)?),
                DT_VERSYM => versym = Some(to_offset("DT_VERSYM", v)?),
                DT_VERDEF => verdef = Some(to_offset("DT_VERDEF", v)?),
                DT_VERDEFNUM => verdefnum = Some(v),
                _ => {}
            }
        }
        let tables = DynTables {
            image,
            ctx,
            link_base,
            symtab: symtab.ok_or(VdsoError::MissingDynamicTag("DT_SYMTAB"))?,
            strtab: strtab.ok_or(VdsoError::MissingDynamicTag("DT_STRTAB"))?,
            strsz: strsz.ok_or(VdsoError::MissingDynamicTag("DT_STRSZ"))?,
            hash,
            gnu_hash,
            versym,
            verdef,
            verdefnum,
        };
        // Checked once here so `string` can rely on it.
        tables.bytes(tables.strtab as u64, tables.strsz, "dynamic string table")?;
        Ok(tables)
    }

    /// The error for `len` bytes at `offset` (named `what`) not lying inside the image.
    fn outside(&self, what: &'static str, offset: u64, len: u64) -> VdsoError {
        VdsoError::TableOutsideImage {
            what,
            offset,
            len,
            image_len: self.image.len(),
        }
    }

    /// `len` bytes at `offset`, or an error naming `what` when they are not all in the image.
    fn bytes(&self, offset: u64, len: u64, what: &'static str) -> Result<&'a [u8], VdsoError> {
        let start = usize::try_from(offset).ok();
        let end = offset
            .checked_add(len)
            .and_then(|e| usize::try_from(e).ok());
        start
            .zip(end)
            .and_then(|(s, e)| self.image.get(s..e))
            .ok_or_else(|| self.outside(what, offset, len))
    }

    fn u16_at(&self, offset: u64, what: &'static str) -> Result<u16, VdsoError> {
        let b = self.bytes(offset, 2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32_at(&self, offset: u64, what: &'static str) -> Result<u32, VdsoError> {
        let b = self.bytes(offset, 4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// The NUL-terminated string at `off` in the dynamic string table (without the NUL).
    fn string(&self, off: u64) -> Option<&'a [u8]> {
        if off >= self.strsz {
            return None;
        }
        // The whole table was checked to lie inside the image in `parse`.
        let table = self
            .bytes(self.strtab as u64, self.strsz, "dynamic string table")
            .ok()?;
        let rest = table.get(usize::try_from(off).ok()?..)?;
        let len = rest.iter().position(|&c| c == 0)?;
        rest.get(..len)
    }

    /// Number of dynsym entries: `DT_HASH`'s nchain when present, else from `DT_GNU_HASH`
    /// (the parasite's order). When both exist they must agree, or one of them is corrupt and
    /// the parasite and a dynamic linker could see different symbol sets.
    fn symbol_count(&self) -> Result<usize, VdsoError> {
        let nchain = match self.hash {
            Some(h) => Some(self.u32_at(h as u64 + 4, "DT_HASH nchain")? as usize),
            None => None,
        };
        let gnu = match self.gnu_hash {
            Some(g) => Some(self.gnu_hash_count(g as u64)?),
            None => None,
        };
        match (nchain, gnu) {
            (Some(n), Some(g)) if n != g => Err(VdsoError::HashCountMismatch { nchain: n, gnu: g }),
            (Some(n), _) => Ok(n),
            (None, Some(g)) => Ok(g),
            (None, None) => Err(VdsoError::MissingDynamicTag("DT_HASH or DT_GNU_HASH")),
        }
    }

    /// Symbol count implied by a GNU hash table: one past the last symbol of the longest-indexed
    /// chain (chains end with an entry whose low bit is set). Symbols below `symoffset` are not
    /// hashed but are still in the table. Every read is bounds-checked, so the walk ends at the
    /// image end at the latest.
    fn gnu_hash_count(&self, g: u64) -> Result<usize, VdsoError> {
        const WHAT: &str = "DT_GNU_HASH table";
        let nbuckets = self.u32_at(g, WHAT)? as u64;
        let symoffset = self.u32_at(g + 4, WHAT)? as u64;
        let bloom_words = self.u32_at(g + 8, WHAT)? as u64;
        // Header is 4 words; bloom words are 8 bytes on ELF64 (all fit in u64: inputs < 2^32).
        let buckets = g + 16 + bloom_words * 8;
        let chains = buckets + nbuckets * 4;
        let mut last = 0u64;
        for b in 0..nbuckets {
            last = last.max(self.u32_at(buckets + b * 4, WHAT)? as u64);
        }
        if last < symoffset {
            return Ok(symoffset as usize);
        }
        let mut i = last;
        loop {
            let h = self.u32_at(chains + (i - symoffset) * 4, WHAT)?;
            i += 1;
            if h & 1 == 1 {
                return usize::try_from(i).map_err(|_| self.outside(WHAT, g, i));
            }
        }
    }

    /// Every `DT_VERDEF` entry, in chain order. The chain is bounded by `DT_VERDEFNUM` when given
    /// and in any case by how many entries fit in the image, so a looping chain ends.
    fn version_definitions(&self) -> Result<Vec<VersionDef<'a>>, VdsoError> {
        let Some(first) = self.verdef else {
            return Ok(Vec::new());
        };
        let fit = self.image.len() as u64 / VERDEF_SIZE + 1;
        let limit = self.verdefnum.map_or(fit, |n| n.min(fit));
        let mut defs = Vec::new();
        let mut vd = first as u64;
        for _ in 0..limit {
            let bad = || VdsoError::BadVerdef { offset: vd };
            self.bytes(vd, VERDEF_SIZE, "DT_VERDEF entry")?;
            let ndx = self.u16_at(vd + 4, "DT_VERDEF entry")?;
            let aux = self.u32_at(vd + 12, "DT_VERDEF entry")? as u64;
            let next = self.u32_at(vd + 16, "DT_VERDEF entry")? as u64;
            // The first Verdaux names the version itself; later ones name its parents.
            let vda_name = self.u32_at(vd + aux, "DT_VERDEF aux entry")? as u64;
            let name = self.string(vda_name).ok_or_else(bad)?;
            defs.push(VersionDef { ndx, name });
            if next == 0 {
                break;
            }
            vd = vd.checked_add(next).ok_or_else(bad)?;
        }
        Ok(defs)
    }

    /// The version name of dynsym entry `index`; empty when unversioned.
    fn version_of(
        &self,
        index: usize,
        name: &str,
        defs: &[VersionDef<'a>],
    ) -> Result<String, VdsoError> {
        let Some(versym) = self.versym else {
            return Ok(String::new());
        };
        let raw = self.u16_at(versym as u64 + index as u64 * 2, "DT_VERSYM entry")?;
        let ndx = raw & VERSYM_INDEX_MASK;
        if ndx < FIRST_DEFINED_VERSION {
            return Ok(String::new());
        }
        let bad = || VdsoError::BadVersionIndex {
            name: name.to_string(),
            ndx,
        };
        let def = defs.iter().find(|d| d.ndx == ndx).ok_or_else(bad)?;
        Ok(std::str::from_utf8(def.name)
            .map_err(|_| bad())?
            .to_string())
    }
}
