//! The vDSO in the restored task: remap this kernel's areas onto the dumped addresses when the
//! vDSOs match, proxy the dumped one into this kernel's otherwise (`stasis_vdso::proxy`), and
//! find free address ranges for scratch space and the restorer's region.

use crate::plan::{Arg::V, Plan, SYS_MMAP};
use anyhow::{bail, Context, Result};
use stasis_abi::{EXPECT_ANY, EXPECT_ARG0, EXPECT_ARG4, EXPECT_COPY, EXPECT_OK};
use stasis_image::model::*;
use stasis_image::{Image, PAGE_SIZE};
use stasis_vdso::proxy::header::{proxy_header, ORIGINAL_NAME, PLACEHOLDER_PREFIX, PROXY_NAME};

const PAGE: u64 = PAGE_SIZE as u64;

/// How to bring back the vDSO: `--vdso=auto|remap|proxy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VdsoMode {
    /// Remap when this kernel's vDSO matches the image's, proxy otherwise.
    Auto,
    /// Only remap; fail when the vDSOs differ.
    Remap,
    /// Always proxy, even on the same kernel.
    Proxy,
}

/// This kernel's vDSO as the new task will have it (it is a fork of stasis, so stasis's own).
pub struct RuntimeVdso {
    pub areas: Vec<(String, u64, u64)>,
    pub symbols: Vec<stasis_vdso::VdsoSymbol>,
}

impl RuntimeVdso {
    pub fn of_self() -> Result<RuntimeVdso> {
        let me = std::process::id() as i32;
        let layout =
            stasis_vdso::VdsoLayout::of_pid(me).context("reading this process's vDSO layout")?;
        let symbols = match layout.vdso() {
            Some(area) => stasis_vdso::symbols_from_image(&stasis_vdso::read_image(me, area)?)?,
            None => Vec::new(),
        };
        Ok(RuntimeVdso {
            areas: layout
                .areas
                .iter()
                .map(|a| (a.name.clone(), a.start, a.end))
                .collect(),
            symbols,
        })
    }
}

/// What to do with the kernel's vDSO areas in the new task.
pub enum VdsoPlan {
    /// Same kernel vDSO: move each runtime area onto the dumped address of the same area;
    /// `drop` lists runtime areas the process did not have (a `[vdso]` it had unmapped while
    /// keeping vvar, as valgrind leaves it).
    Remap {
        moves: Vec<(String, u64, u64, u64)>,
        drop: Vec<(u64, u64)>,
    },
    /// The process had no vDSO and no vvar: remove the runtime ones.
    Unmap { areas: Vec<(u64, u64)> },
    /// A different vDSO: the program keeps the dumped vDSO code at its old address with every
    /// exported entry patched to jump into this kernel's vDSO, which lives elsewhere; the old
    /// vvar addresses hold read-only placeholders so nothing else lands there.
    Proxy {
        runtime: RuntimeVdso,
        reasons: Vec<String>,
    },
}

impl VdsoPlan {
    /// The decision rule lives in `stasis_vdso::proxy::decide` (unit-tested on real kernels'
    /// vDSOs); this applies the user's `--vdso` choice to it.
    pub fn decide(rec: &VdsoRecord, mode: VdsoMode) -> Result<VdsoPlan> {
        let runtime = RuntimeVdso::of_self()?;
        if rec.areas.is_empty() {
            return Ok(VdsoPlan::Unmap {
                areas: runtime.areas.iter().map(|a| (a.1, a.2)).collect(),
            });
        }
        // vvar without a vDSO: nothing can call into the vDSO, so only the vvar areas matter;
        // when this kernel's have the same shape they move into place and its [vdso] goes.
        let has_vdso = |v: &[(String, u64, u64)]| v.iter().any(|a| a.0 == "[vdso]");
        if !has_vdso(&rec.areas) && mode != VdsoMode::Proxy {
            let vvars: Vec<&(String, u64, u64)> =
                runtime.areas.iter().filter(|a| a.0 != "[vdso]").collect();
            let same = vvars.len() == rec.areas.len()
                && vvars
                    .iter()
                    .zip(&rec.areas)
                    .all(|(r, i)| r.0 == i.0 && r.2 - r.1 == i.2 - i.1);
            if same {
                let moves = rec
                    .areas
                    .iter()
                    .zip(&vvars)
                    .map(|(want, have)| (want.0.clone(), have.1, have.2 - have.1, want.1))
                    .collect();
                let drop = runtime
                    .areas
                    .iter()
                    .filter(|a| a.0 == "[vdso]")
                    .map(|a| (a.1, a.2))
                    .collect();
                return Ok(VdsoPlan::Remap { moves, drop });
            }
        }
        let shape = |v: &[(String, u64, u64)]| {
            v.iter()
                .map(|a| (a.0.clone(), a.2 - a.1))
                .collect::<Vec<_>>()
        };
        let image_syms = if rec.vdso_bytes.is_empty() {
            Vec::new()
        } else {
            stasis_vdso::symbols_from_image(&rec.vdso_bytes).context("parsing the image's vDSO")?
        };
        let strategy = stasis_vdso::proxy::decide(
            &shape(&rec.areas),
            &image_syms,
            &shape(&runtime.areas),
            &runtime.symbols,
        );
        match (strategy, mode) {
            (stasis_vdso::proxy::Strategy::Remap, VdsoMode::Auto | VdsoMode::Remap) => {
                let moves = rec
                    .areas
                    .iter()
                    .zip(&runtime.areas)
                    .map(|(want, have)| (want.0.clone(), have.1, have.2 - have.1, want.1))
                    .collect();
                Ok(VdsoPlan::Remap {
                    moves,
                    drop: Vec::new(),
                })
            }
            (stasis_vdso::proxy::Strategy::Remap, VdsoMode::Proxy) => Ok(VdsoPlan::Proxy {
                runtime,
                reasons: vec!["forced by --vdso=proxy (this kernel's vDSO matches)".into()],
            }),
            (stasis_vdso::proxy::Strategy::Proxy { reasons }, VdsoMode::Auto | VdsoMode::Proxy) => {
                Ok(VdsoPlan::Proxy { runtime, reasons })
            }
            (stasis_vdso::proxy::Strategy::Proxy { reasons }, VdsoMode::Remap) => {
                bail!(
                    "--vdso=remap is impossible: this kernel's vDSO differs from the image's ({})",
                    reasons.join("; ")
                )
            }
        }
    }

    /// One line for `stasis show` and the log.
    pub fn describe(&self) -> String {
        match self {
            VdsoPlan::Remap { .. } => "remap: this kernel's vDSO matches the image's (areas, sizes, every symbol's offset); its areas move onto the dumped addresses".into(),
            VdsoPlan::Unmap { .. } => "none: the process had unmapped its vDSO; the new task's is removed".into(),
            VdsoPlan::Proxy { reasons, .. } => format!(
                "proxy: the dumped vDSO stays at its address with every exported symbol jumping into this kernel's vDSO; because {}",
                reasons.join("; ")
            ),
        }
    }
}

/// A page-aligned range of `len` bytes that neither the image nor `busy` uses, below the
/// usual top of the mmap area. Leaves a page of slack on both sides.
pub fn free_range_in(busy: &mut [(u64, u64)], len: u64) -> Result<u64> {
    busy.sort_unstable();
    // Disjoint, sorted ranges: a range that starts lower may end higher than the next one.
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(busy.len());
    for &(s, e) in busy.iter() {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    let top = 0x7ff0_0000_0000u64;
    let mut hi = top;
    for &(s, e) in merged.iter().rev() {
        if e >= hi {
            hi = hi.min(s);
            continue;
        }
        if hi - e >= len + 2 * PAGE {
            return Ok((hi - len - PAGE) & !(PAGE - 1));
        }
        hi = s;
    }
    if hi >= len + 2 * PAGE + 0x1000_0000 {
        return Ok((hi - len - PAGE) & !(PAGE - 1));
    }
    bail!("no free address range of {len} bytes for the restorer")
}

pub fn free_range(
    mm: &Mm,
    child: &[stasis_proc::Vma],
    reserved: &[(u64, u64)],
    len: u64,
) -> Result<u64> {
    let mut busy: Vec<(u64, u64)> = mm
        .vmas
        .iter()
        .map(|v| (v.start, v.end))
        .chain(child.iter().map(|v| (v.start, v.end)))
        .chain(reserved.iter().copied())
        .collect();
    free_range_in(&mut busy, len)
}

/// Gives the mapping at `addr` a name in /proc/PID/maps (`[anon:NAME]`). Best effort:
/// kernels without CONFIG_ANON_VMA_NAME refuse, and only recognition on a later dump is lost.
pub(crate) fn name_vma(p: &mut Plan, addr: u64, len: u64, name: &str) {
    let mut bytes = name.as_bytes().to_vec();
    bytes.push(0);
    let n = p.put(&bytes);
    p.op(
        libc::SYS_prctl,
        [V(0x5356_4d41), V(0), V(addr), V(len), n, V(0)],
        EXPECT_ANY,
        format!("name {addr:#x} {name}"),
    );
}

/// Maps anonymous memory at `addr` and copies `bytes` into it, then sets `prot`.
pub(crate) fn place_bytes(p: &mut Plan, addr: u64, len: u64, bytes: &[u8], prot: u64, what: &str) {
    let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64;
    let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
    p.op(
        SYS_MMAP,
        [V(addr), V(len), V(rw), V(flags), V(u64::MAX), V(0)],
        EXPECT_ARG0,
        format!("map {what} at {addr:#x}"),
    );
    let src = p.put(bytes);
    p.op(
        0,
        [V(addr), src, V(bytes.len() as u64), V(0), V(0), V(0)],
        EXPECT_COPY,
        format!("copy {what}"),
    );
    p.op(
        libc::SYS_mprotect,
        [V(addr), V(len), V(prot), V(0), V(0), V(0)],
        EXPECT_OK,
        format!("protect {what}"),
    );
}

/// The proxy: this kernel's vDSO set moves whole to a free range ("home"); the dumped vDSO
/// code goes back to its old address with every exported entry patched to jump there
/// (`stasis_vdso::proxy::build_proxy`); each old vvar address gets a read-only
/// placeholder; a pristine copy of the dumped vDSO stays beside home, named, so the next
/// dump can rebuild the proxy for yet another kernel instead of stacking proxies.
/// AT_SYSINFO_EHDR is left pointing at the old address: everything the program already
/// learnt from the vDSO (glibc parses it once at start-up) refers to that copy, and a
/// later reader of the auxv sees the same ELF with the same symbol offsets.
pub(crate) fn proxy(
    p: &mut Plan,
    img: &Image,
    runtime: &RuntimeVdso,
    child_maps: &[stasis_proc::Vma],
) -> Result<()> {
    let rec = &img.vdso;
    let (Some(first), Some(last)) = (runtime.areas.first(), runtime.areas.last()) else {
        bail!("this kernel maps no vDSO: nothing to proxy to");
    };
    let (span_start, span) = (first.1, last.2 - first.1);
    let orig_len = (rec.vdso_bytes.len() as u64).next_multiple_of(PAGE);
    let copy_len = if orig_len > 0 { PAGE + orig_len } else { 0 };
    let mut busy: Vec<(u64, u64)> = img.mm.vmas.iter().map(|v| (v.start, v.end)).collect();
    busy.extend(child_maps.iter().map(|v| (v.start, v.end)));
    busy.extend(rec.areas.iter().map(|a| (a.1, a.2)));
    let home = free_range_in(&mut busy, span + copy_len)?;
    p.reserved.push((home, home + span + copy_len));
    let flags = (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64;
    for (name, s, e) in &runtime.areas {
        let to = home + (s - span_start);
        p.op(
            libc::SYS_mremap,
            [V(*s), V(e - s), V(e - s), V(flags), V(to), V(0)],
            EXPECT_ARG4,
            format!("move this kernel's {name} to {to:#x}"),
        );
    }
    if let Some((_, vstart, vend)) = rec.areas.iter().find(|a| a.0 == "[vdso]") {
        let runtime_vdso = runtime
            .areas
            .iter()
            .find(|a| a.0 == "[vdso]")
            .context("this kernel maps no [vdso]")?;
        let runtime_base = home + (runtime_vdso.1 - span_start);
        let build = stasis_vdso::proxy::build_proxy(
            &rec.vdso_bytes,
            *vstart,
            &runtime.symbols,
            runtime_base,
        )
        .context("building the vDSO proxy")?;
        for note in &build.notes {
            tracing::info!("vDSO proxy: {note}");
        }
        let len = vend - vstart;
        let rx = (libc::PROT_READ | libc::PROT_EXEC) as u64;
        place_bytes(p, *vstart, len, &build.image, rx, "the vDSO proxy");
        name_vma(p, *vstart, len, PROXY_NAME);
        let orig_at = home + span;
        let placeholders: Vec<(String, u64, u64)> = rec
            .areas
            .iter()
            .filter(|a| a.0 != "[vdso]")
            .cloned()
            .collect();
        let mut copy = proxy_header((*vstart, len), &placeholders);
        copy.extend_from_slice(&rec.vdso_bytes);
        place_bytes(
            p,
            orig_at,
            PAGE + orig_len,
            &copy,
            libc::PROT_READ as u64,
            "the dumped vDSO's pristine copy",
        );
        name_vma(p, orig_at, PAGE + orig_len, ORIGINAL_NAME);
    }
    for (name, s, e) in rec.areas.iter().filter(|a| a.0 != "[vdso]") {
        let ro = libc::PROT_READ as u64;
        let anon = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64;
        p.op(
            SYS_MMAP,
            [V(*s), V(e - s), V(ro), V(anon), V(u64::MAX), V(0)],
            EXPECT_ARG0,
            format!("placeholder for {name} at {s:#x}"),
        );
        let bare = name.trim_start_matches('[').trim_end_matches(']');
        name_vma(p, *s, e - s, &format!("{PLACEHOLDER_PREFIX}{bare}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOP: u64 = 0x7ff0_0000_0000;

    #[test]
    fn free_range_is_below_the_top_and_clear_of_everything_busy() {
        let mut busy = vec![(0x1000, 0x5000), (TOP - 0x10_000, TOP + 0x1000)];
        let at = free_range_in(&mut busy, 0x3000).expect("room");
        assert_eq!(at % PAGE, 0);
        assert!(
            at + 0x3000 + PAGE <= TOP - 0x10_000,
            "a page of slack below the busy range"
        );
        assert!(at > 0x5000);
    }

    #[test]
    fn free_range_finds_a_gap_between_ranges_and_skips_small_ones() {
        // From the top down: a 2-page gap (too small for 1 page + 2 of slack), then a big one.
        let mut busy = vec![
            (0x10_0000, 0x20_0000),
            (0x30_0000, TOP - 0x3000),
            (TOP - 0x1000, TOP),
        ];
        let at = free_range_in(&mut busy, 0x1000).expect("room");
        assert!(
            at >= 0x20_0000 + PAGE && at + 0x2000 <= 0x30_0000,
            "{at:#x}"
        );
    }

    #[test]
    fn overlapping_busy_ranges_are_merged() {
        // The second range lies inside the first: the only room is below both.
        let mut busy = vec![(0x4000_0000, TOP), (0x5000_0000, 0x6000_0000)];
        let at = free_range_in(&mut busy, 0x1000).expect("room");
        assert!(at + 0x1000 <= 0x4000_0000, "{at:#x}");
    }

    #[test]
    fn no_room_is_an_error() {
        let mut busy = vec![(0x1000, TOP)];
        assert!(free_range_in(&mut busy, 0x1000).is_err());
    }
}
