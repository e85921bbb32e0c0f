//! `VdsoReport`: where the vDSO and its vvar areas are, and every symbol the vDSO exports,
//! found from inside the process.
//!
//! Sources, in order of trust: /proc/self/maps is the truth about what is mapped;
//! `AT_SYSINFO_EHDR` (from `prctl(PR_GET_AUXV)`, else /proc/self/auxv) is what the kernel
//! originally announced and may be stale when the process moved or unmapped its vDSO. The ELF is
//! only parsed at an address maps says is a `[vdso]` area, and every read is bounds-checked
//! against that area's size.

use crate::reply::Reply;
use crate::sys::{self, Fd};
use stasis_abi::{
    is_exported_symbol, is_vdso_area_name, Status, StrRef, VdsoArea, VdsoReport, VdsoSymbol,
    AUXV_FROM_PRCTL, AUXV_FROM_PROC, VDSO_AUXV_MATCHES, VDSO_MAPPED,
};

const MAX_AREAS: usize = 16;
const AT_NULL: u64 = 0;
const AT_SYSINFO_EHDR: u64 = 33;

/// Area names gathered from maps, kept until the string table is written.
struct Areas {
    list: [VdsoArea; MAX_AREAS],
    names: [[u8; 32]; MAX_AREAS],
    n: usize,
}

pub fn report(out: &mut Reply) {
    match build(out) {
        Ok(len) => out.finish_len(Status::Ok, 0, len),
        Err((status, errno)) => out.finish(status, errno),
    }
}

type Fail = (Status, u32);

fn build(out: &mut Reply) -> Result<usize, Fail> {
    let (auxv_ehdr, auxv_source) = sysinfo_ehdr()?;
    let mut areas = Areas {
        list: [VdsoArea::default(); MAX_AREAS],
        names: [[0; 32]; MAX_AREAS],
        n: 0,
    };
    read_maps(&mut areas)?;

    let mut rep = VdsoReport {
        auxv_ehdr,
        auxv_source,
        n_areas: areas.n as u32,
        ..VdsoReport::default()
    };
    // The [vdso] to parse: the one auxv names if maps agrees, else the first one maps shows.
    let mut vdso: Option<(u64, u64)> = None;
    for a in &areas.list[..areas.n] {
        let name = &areas.names[idx_of(&areas, a)][..a.name.len as usize];
        if name == b"[vdso]" && (vdso.is_none() || a.start == auxv_ehdr) {
            vdso = Some((a.start, a.end));
        }
    }

    let hdr = core::mem::size_of::<VdsoReport>();
    let areas_off = hdr;
    let syms_off = areas_off + areas.n * core::mem::size_of::<VdsoArea>();

    let elf = match vdso {
        Some((start, end)) => {
            rep.flags |= VDSO_MAPPED;
            rep.vdso_base = start;
            if start == auxv_ehdr {
                rep.flags |= VDSO_AUXV_MATCHES;
            }
            // SAFETY: maps says [start, end) is mapped readable ([vdso] is r-x).
            Some(unsafe { core::slice::from_raw_parts(start as *const u8, (end - start) as usize) })
        }
        None => None,
    };
    let dynsyms = match elf {
        Some(image) => Some(Dynsyms::parse(image).ok_or((Status::BadVdso, 0))?),
        None => None,
    };
    let n_syms = dynsyms.as_ref().map_or(0, |d| d.count_exported());
    rep.n_symbols = n_syms as u32;
    let strtab_off = syms_off + n_syms * core::mem::size_of::<VdsoSymbol>();

    // String table: area names first, then symbol names and versions as met.
    let mut strings = Strings {
        out,
        base: strtab_off,
        len: 0,
    };
    for i in 0..areas.n {
        let len = areas.list[i].name.len as usize;
        let name = areas.names[i];
        areas.list[i].name = strings.push(&name[..len]).map_err(|s| (s, 0))?;
    }
    if let Some(d) = &dynsyms {
        let mut k = 0;
        for i in 0..d.count {
            let Some(sym) = d.exported(i) else { continue };
            let name = strings.push(sym.name).map_err(|s| (s, 0))?;
            let version = strings.push(sym.version).map_err(|s| (s, 0))?;
            let entry = VdsoSymbol {
                offset: sym.offset,
                size: sym.size,
                name,
                version,
                info: sym.info,
                _pad: [0; 7],
            };
            strings
                .out
                .put(syms_off + k * core::mem::size_of::<VdsoSymbol>(), &entry)
                .map_err(|s| (s, 0))?;
            k += 1;
        }
    }
    rep.strtab_len = strings.len as u32;
    let total = strtab_off + strings.len;
    for (i, a) in areas.list[..areas.n].iter().enumerate() {
        out.put(areas_off + i * core::mem::size_of::<VdsoArea>(), a)
            .map_err(|s| (s, 0))?;
    }
    out.put(0, &rep).map_err(|s| (s, 0))?;
    Ok(total)
}

fn idx_of(areas: &Areas, a: &VdsoArea) -> usize {
    // Areas are stored in one array; recover the index from the address.
    let base = areas.list.as_ptr() as usize;
    (a as *const VdsoArea as usize - base) / core::mem::size_of::<VdsoArea>()
}

/// Appends strings to the reply's string table.
struct Strings<'a> {
    out: &'a mut Reply,
    base: usize,
    len: usize,
}

impl Strings<'_> {
    fn push(&mut self, s: &[u8]) -> Result<StrRef, Status> {
        let r = StrRef {
            off: self.len as u32,
            len: s.len() as u32,
        };
        self.out.put_bytes(self.base + self.len, s)?;
        self.len += s.len();
        Ok(r)
    }
}

/// `AT_SYSINFO_EHDR` and where it came from; 0 when the auxv has none.
fn sysinfo_ehdr() -> Result<(u64, u32), Fail> {
    let mut buf = [0u64; 128];
    let bytes = buf.len() * 8;
    // SAFETY: buf is writable for `bytes` bytes.
    let r = unsafe {
        sys::syscall5(
            sys::SYS_PRCTL,
            sys::PR_GET_AUXV,
            buf.as_mut_ptr() as usize,
            bytes,
            0,
            0,
        )
    };
    let (n, source) = if r > 0 {
        ((r as usize).min(bytes), AUXV_FROM_PRCTL)
    } else {
        // Older kernels (< 6.4) have no PR_GET_AUXV.
        let fd = Fd::open(b"/proc/self/auxv\0").map_err(|e| (Status::Syscall, e))?;
        // SAFETY: viewing the u64 buffer as bytes to read into it.
        let raw = unsafe { core::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut u8, bytes) };
        let mut got = 0;
        while got < raw.len() {
            let k = fd.read(&mut raw[got..]).map_err(|e| (Status::Syscall, e))?;
            if k == 0 {
                break;
            }
            got += k;
        }
        (got, AUXV_FROM_PROC)
    };
    let words = &buf[..n / 8];
    for pair in words.chunks_exact(2) {
        match pair[0] {
            AT_NULL => break,
            AT_SYSINFO_EHDR => return Ok((pair[1], source)),
            _ => {}
        }
    }
    Ok((0, source))
}

/// Streams /proc/self/maps and keeps every vDSO-related line, in order.
fn read_maps(areas: &mut Areas) -> Result<(), Fail> {
    let fd = Fd::open(b"/proc/self/maps\0").map_err(|e| (Status::Syscall, e))?;
    let mut buf = [0u8; 4096];
    let mut line = [0u8; 512];
    let mut line_len = 0usize;
    let mut overlong = false;
    loop {
        let n = fd.read(&mut buf).map_err(|e| (Status::Syscall, e))?;
        if n == 0 {
            break;
        }
        for &b in &buf[..n] {
            if b == b'\n' {
                if !overlong {
                    parse_line(&line[..line_len], areas)?;
                }
                line_len = 0;
                overlong = false;
            } else if line_len < line.len() {
                line[line_len] = b;
                line_len += 1;
            } else {
                // Long lines are file paths; no special mapping name is that long.
                overlong = true;
            }
        }
    }
    Ok(())
}

fn parse_line(line: &[u8], areas: &mut Areas) -> Result<(), Fail> {
    let bad = (Status::BadMaps, 0);
    let mut fields = line.splitn(6, |&c| c == b' ');
    let range = fields.next().ok_or(bad)?;
    let perms = fields.next().ok_or(bad)?;
    // offset, dev, inode
    for _ in 0..3 {
        fields.next().ok_or(bad)?;
    }
    let name = trim_start(fields.next().unwrap_or(b""));
    if !is_vdso_area_name(name) {
        return Ok(());
    }
    if areas.n == MAX_AREAS || name.len() > 32 {
        return Err(bad);
    }
    let dash = range.iter().position(|&c| c == b'-').ok_or(bad)?;
    let start = parse_hex(&range[..dash]).ok_or(bad)?;
    let end = parse_hex(&range[dash + 1..]).ok_or(bad)?;
    if end <= start || perms.len() < 3 {
        return Err(bad);
    }
    let mut prot = 0;
    if perms[0] == b'r' {
        prot |= 1;
    }
    if perms[1] == b'w' {
        prot |= 2;
    }
    if perms[2] == b'x' {
        prot |= 4;
    }
    let i = areas.n;
    areas.names[i][..name.len()].copy_from_slice(name);
    areas.list[i] = VdsoArea {
        start,
        end,
        prot,
        name: StrRef {
            off: 0,
            len: name.len() as u32,
        },
    };
    areas.n += 1;
    Ok(())
}

fn trim_start(s: &[u8]) -> &[u8] {
    let k = s.iter().position(|&c| c != b' ').unwrap_or(s.len());
    &s[k..]
}

fn parse_hex(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 16 {
        return None;
    }
    let mut v = 0u64;
    for &c in s {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => return None,
        };
        v = (v << 4) | d as u64;
    }
    Some(v)
}

/// The dynamic symbol table of a vDSO image in memory.
struct Dynsyms<'a> {
    image: &'a [u8],
    /// Link-time address of the image's first byte (lowest PT_LOAD vaddr − its file offset).
    link_base: u64,
    symtab: usize,
    strtab: usize,
    strsz: usize,
    versym: Option<usize>,
    verdef: Option<usize>,
    count: usize,
}

struct Sym<'a> {
    name: &'a [u8],
    version: &'a [u8],
    offset: u64,
    size: u64,
    info: u8,
}

const SYMENT: usize = 24;

impl<'a> Dynsyms<'a> {
    fn parse(image: &'a [u8]) -> Option<Self> {
        if image.get(..4)? != b"\x7fELF" || *image.get(4)? != 2 {
            return None;
        }
        let phoff = rd64(image, 32)? as usize;
        let phentsize = rd16(image, 54)? as usize;
        let phnum = rd16(image, 56)? as usize;
        if phentsize < 56 {
            return None;
        }
        let mut link_base = None;
        let mut dynamic = None;
        for i in 0..phnum {
            let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
            let p_type = rd32(image, ph)?;
            let p_offset = rd64(image, ph + 8)?;
            let p_vaddr = rd64(image, ph + 16)?;
            let p_filesz = rd64(image, ph + 32)?;
            match p_type {
                1 if link_base.is_none() => link_base = Some(p_vaddr.checked_sub(p_offset)?),
                2 => dynamic = Some((p_offset as usize, p_filesz as usize)),
                _ => {}
            }
        }
        let link_base = link_base?;
        let (dyn_off, dyn_size) = dynamic?;
        let to_off = |addr: u64| -> Option<usize> {
            let o = addr.checked_sub(link_base)? as usize;
            (o < image.len()).then_some(o)
        };
        let (mut symtab, mut strtab, mut strsz, mut hash, mut gnu_hash) =
            (None, None, 0, None, None);
        let (mut versym, mut verdef) = (None, None);
        let mut off = dyn_off;
        while off + 16 <= dyn_off.checked_add(dyn_size)? {
            let tag = rd64(image, off)?;
            let val = rd64(image, off + 8)?;
            match tag {
                0 => break,
                4 => hash = to_off(val),
                5 => strtab = to_off(val),
                6 => symtab = to_off(val),
                10 => strsz = val as usize,
                11 if val as usize != SYMENT => return None,
                0x6fff_fef5 => gnu_hash = to_off(val),
                0x6fff_fff0 => versym = to_off(val),
                0x6fff_fffc => verdef = to_off(val),
                _ => {}
            }
            off += 16;
        }
        let mut d = Dynsyms {
            image,
            link_base,
            symtab: symtab?,
            strtab: strtab?,
            strsz,
            versym,
            verdef,
            count: 0,
        };
        d.count = match (hash, gnu_hash) {
            (Some(h), _) => rd32(image, h + 4)? as usize,
            (None, Some(g)) => gnu_hash_count(image, g)?,
            (None, None) => return None,
        };
        // Every symbol entry must lie inside the image.
        d.symtab
            .checked_add(d.count.checked_mul(SYMENT)?)
            .filter(|&e| e <= image.len())?;
        Some(d)
    }

    fn count_exported(&self) -> usize {
        (0..self.count)
            .filter(|&i| self.exported(i).is_some())
            .count()
    }

    fn exported(&self, i: usize) -> Option<Sym<'a>> {
        let e = self.symtab + i * SYMENT;
        let st_name = rd32(self.image, e)? as usize;
        let info = *self.image.get(e + 4)?;
        let shndx = rd16(self.image, e + 6)?;
        let value = rd64(self.image, e + 8)?;
        let size = rd64(self.image, e + 16)?;
        let name = self.string(st_name)?;
        if !is_exported_symbol(info, shndx, name.len()) {
            return None;
        }
        Some(Sym {
            name,
            version: self.version_of(i).unwrap_or(b""),
            offset: value.checked_sub(self.link_base)?,
            size,
            info,
        })
    }

    fn string(&self, off: usize) -> Option<&'a [u8]> {
        if off >= self.strsz {
            return None;
        }
        let start = self.strtab.checked_add(off)?;
        let end_limit = self.strtab.checked_add(self.strsz)?.min(self.image.len());
        let bytes = self.image.get(start..end_limit)?;
        let len = bytes.iter().position(|&c| c == 0)?;
        Some(&bytes[..len])
    }

    /// The version name (from DT_VERDEF) of symbol `i`, when it has one.
    fn version_of(&self, i: usize) -> Option<&'a [u8]> {
        let ndx = rd16(self.image, self.versym? + i * 2)? & 0x7fff;
        if ndx < 2 {
            return None; // local / global: unversioned
        }
        let mut vd = self.verdef?;
        for _ in 0..64 {
            let vd_ndx = rd16(self.image, vd + 4)?;
            let vd_aux = rd32(self.image, vd + 12)? as usize;
            let vd_next = rd32(self.image, vd + 16)? as usize;
            if vd_ndx == ndx {
                let vda_name = rd32(self.image, vd.checked_add(vd_aux)?)? as usize;
                return self.string(vda_name);
            }
            if vd_next == 0 {
                return None;
            }
            vd = vd.checked_add(vd_next)?;
        }
        None
    }
}

fn gnu_hash_count(image: &[u8], g: usize) -> Option<usize> {
    let nbuckets = rd32(image, g)? as usize;
    let symoffset = rd32(image, g + 4)? as usize;
    let bloom_size = rd32(image, g + 8)? as usize;
    let buckets = g + 16 + bloom_size * 8;
    let chains = buckets + nbuckets * 4;
    let mut max = 0usize;
    for b in 0..nbuckets {
        max = max.max(rd32(image, buckets + b * 4)? as usize);
    }
    if max < symoffset {
        return Some(symoffset);
    }
    let mut i = max;
    loop {
        let h = rd32(image, chains + (i - symoffset) * 4)?;
        i += 1;
        if h & 1 == 1 {
            return Some(i);
        }
        if i > 1 << 16 {
            return None;
        }
    }
}

fn rd16(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(off..off.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn rd32(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn rd64(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(off..off.checked_add(8)?)?.try_into().ok()?,
    ))
}
