//! A no_std blob as the host sees it: an ELF static PIE with one load segment at 0 and only
//! `R_X86_64_RELATIVE` relocations, which the host applies for the address the blob will run at.

use crate::error::{InfectError, Result};
use goblin::elf::{program_header::PT_LOAD, reloc::R_X86_64_RELATIVE, Elf};

/// A parsed blob, ready to be copied into a region at any page-aligned address.
#[derive(Clone, Debug)]
pub struct Blob {
    /// The loaded image (file bytes of every PT_LOAD placed at its vaddr, bss zeroed).
    image: Vec<u8>,
    /// Image offsets of 8-byte slots that receive `base + addend`.
    relocs: Vec<(u64, i64)>,
    entry: u64,
    /// Named global functions of the blob, for `xtask build-parasite` to print.
    pub exports: Vec<(String, u64)>,
}

fn bad(why: impl Into<String>) -> InfectError {
    InfectError::BadBlob(why.into())
}

impl Blob {
    pub fn parse(bytes: &[u8]) -> Result<Blob> {
        let elf = Elf::parse(bytes).map_err(|e| bad(format!("not an ELF: {e}")))?;
        if !elf.is_64 || elf.header.e_machine != goblin::elf::header::EM_X86_64 {
            return Err(bad("not an x86_64 ELF"));
        }
        let mut image = Vec::new();
        for ph in elf.program_headers.iter().filter(|p| p.p_type == PT_LOAD) {
            let end = ph
                .p_vaddr
                .checked_add(ph.p_memsz)
                .ok_or_else(|| bad("segment overflow"))?;
            if end > 16 << 20 {
                return Err(bad("segment beyond 16 MiB"));
            }
            if image.len() < end as usize {
                image.resize(end as usize, 0);
            }
            let src = bytes
                .get(ph.p_offset as usize..(ph.p_offset + ph.p_filesz) as usize)
                .ok_or_else(|| bad("segment outside the file"))?;
            image[ph.p_vaddr as usize..(ph.p_vaddr + ph.p_filesz) as usize].copy_from_slice(src);
        }
        if image.is_empty() {
            return Err(bad("no PT_LOAD segment"));
        }
        let mut relocs = Vec::new();
        for r in elf.dynrelas.iter().chain(elf.dynrels.iter()) {
            if r.r_type != R_X86_64_RELATIVE {
                return Err(bad(format!("unsupported relocation type {}", r.r_type)));
            }
            if r.r_offset + 8 > image.len() as u64 {
                return Err(bad("relocation outside the image"));
            }
            relocs.push((r.r_offset, r.r_addend.unwrap_or(0)));
        }
        if elf.entry >= image.len() as u64 {
            return Err(bad("entry point outside the image"));
        }
        let exports = elf
            .syms
            .iter()
            .filter(|s| s.is_function() && s.st_bind() == goblin::elf::sym::STB_GLOBAL)
            .filter_map(|s| Some((elf.strtab.get_at(s.st_name)?.to_string(), s.st_value)))
            .collect();
        Ok(Blob {
            image,
            relocs,
            entry: elf.entry,
            exports,
        })
    }

    /// Bytes the loaded image occupies.
    pub fn len(&self) -> usize {
        self.image.len()
    }

    pub fn is_empty(&self) -> bool {
        self.image.is_empty()
    }

    pub fn entry(&self) -> u64 {
        self.entry
    }

    pub fn reloc_count(&self) -> usize {
        self.relocs.len()
    }

    /// Copies the image into `dst` with relocations applied for running at `base`.
    /// Refuses a blob whose park loop is not where the host will point a parked thread.
    pub(crate) fn check_park(&self) -> Result<()> {
        let at = self.entry().saturating_add(stasis_abi::PARK_OFFSET) as usize;
        match self.image.get(at..at + stasis_abi::PARK_CODE.len()) {
            Some(code) if code == stasis_abi::PARK_CODE => Ok(()),
            _ => Err(bad("no park loop at its entry + PARK_OFFSET")),
        }
    }

    pub fn load_into(&self, dst: &mut [u8], base: u64) -> Result<()> {
        let n = self.image.len();
        let dst = dst
            .get_mut(..n)
            .ok_or_else(|| bad("region smaller than the blob"))?;
        dst.copy_from_slice(&self.image);
        for &(off, addend) in &self.relocs {
            let v = base.wrapping_add(addend as u64);
            dst[off as usize..off as usize + 8].copy_from_slice(&v.to_le_bytes());
        }
        Ok(())
    }
}
