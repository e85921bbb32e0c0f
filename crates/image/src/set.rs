//! A whole image loaded at once and checked as a whole: every record's own checks (magic,
//! version, checksums) and then the cross-record ones an edited image could break — page runs
//! inside their VMA and inside pages.img, VMAs sorted and disjoint, thread ids agreeing, the
//! page file belonging to this inventory. Restore and `stasis show` use nothing else.

use crate::model::*;
use crate::{read_record, ImageDir, ImageError, PageReader, Result, PAGE_SIZE};

fn inconsistent(dir: &ImageDir, why: String) -> ImageError {
    ImageError::Inconsistent {
        dir: dir.path().to_path_buf(),
        why,
    }
}

/// A whole image, loaded and checked.
pub struct Image {
    pub dir: ImageDir,
    pub inventory: Inventory,
    pub core: Core,
    pub mm: Mm,
    pub process: Process,
    pub files: Files,
    pub vdso: VdsoRecord,
    pub pages: PageReader,
}

/// Loads every record and verifies every checksum. Nothing is created.
pub fn load(dir: &std::path::Path) -> Result<Image> {
    let d = ImageDir::open(dir)?;
    let inventory: Inventory = read_record(&d, INVENTORY, KIND_INVENTORY)?;
    if inventory.threads != [inventory.pid] {
        return Err(inconsistent(
            &d,
            format!(
                "{} threads; this version restores single-threaded processes only",
                inventory.threads.len()
            ),
        ));
    }
    let core: Core = read_record(&d, &core_name(inventory.pid), KIND_CORE)?;
    let mm: Mm = read_record(&d, MM, KIND_MM)?;
    let process: Process = read_record(&d, PROCESS, KIND_PROCESS)?;
    let files: Files = read_record(&d, FILES, KIND_FILES)?;
    let vdso: VdsoRecord = read_record(&d, VDSO, KIND_VDSO)?;
    let pages = PageReader::open(&d)?;
    if pages.data_len() != inventory.page_data_len || pages.checksum() != inventory.page_data_xxh3 {
        return Err(inconsistent(
            &d,
            "pages.img does not belong to this inventory".into(),
        ));
    }
    pages.verify()?;
    let img = Image {
        dir: d,
        inventory,
        core,
        mm,
        process,
        files,
        vdso,
        pages,
    };
    check_consistency(&img)?;
    Ok(img)
}

/// Cross-record checks an attacker-made image could break: every page run inside its VMA and
/// inside pages.img, VMAs sorted and disjoint, the thread's ids agreeing.
fn check_consistency(img: &Image) -> Result<()> {
    let bad = |why: String| inconsistent(&img.dir, why);
    if img.core.tid != img.inventory.pid {
        return Err(bad("core record belongs to another thread".into()));
    }
    let page = PAGE_SIZE as u64;
    let data_end = crate::DATA_OFFSET + img.pages.data_len();
    let mut prev_end = 0;
    for v in &img.mm.vmas {
        if v.start % page != 0 || v.end % page != 0 || v.end <= v.start || v.start < prev_end {
            return Err(bad(format!(
                "VMA {:#x}-{:#x} is misaligned or overlaps",
                v.start, v.end
            )));
        }
        prev_end = v.end;
        for r in &v.pages {
            let len = r
                .pages
                .checked_mul(page)
                .ok_or_else(|| bad("page run overflow".into()))?;
            let in_vma = r.addr >= v.start && r.addr.checked_add(len).is_some_and(|e| e <= v.end);
            let in_file = r.file_off >= crate::DATA_OFFSET
                && r.file_off % page == 0
                && r.file_off.checked_add(len).is_some_and(|e| e <= data_end);
            if !in_vma || !in_file {
                return Err(bad(format!(
                    "page run at {:#x} lies outside its VMA or pages.img",
                    r.addr
                )));
            }
        }
    }
    if img.process.sigactions.len() != 64 {
        return Err(bad("signal handler table of the wrong size".into()));
    }
    Ok(())
}
