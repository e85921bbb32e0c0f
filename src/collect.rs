//! Collecting state from a frozen process. First and so far only item: the vDSO, as the
//! parasite sees it from inside, cross-checked against the host's own reading.
//!
//! The parasite's reply is untrusted (the target may share its memory with a process we did not
//! freeze). It is decoded from a private copy with every count, offset and length checked, then
//! compared with what the host reads itself: the areas with /proc/PID/maps, the symbols with a
//! goblin parse of the `[vdso]` bytes read through /proc/PID/mem. Any disagreement is an error.

use serde::Serialize;
use stasis_abi::{StrRef, VdsoArea as WireArea, VdsoReport, VdsoSymbol as WireSymbol};
use stasis_infect::{InfectError, Parasite, RegionSize, Seized};
use stasis_vdso::{VdsoArea, VdsoLayout, VdsoSymbol};
use std::time::{Duration, Instant};

/// How long the parasite may take for one command before it is stopped.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// What `stasis vdso` reports.
#[derive(Clone, Debug, Serialize)]
pub struct VdsoInfo {
    pub pid: i32,
    /// `AT_SYSINFO_EHDR` from the process's auxiliary vector (0: none).
    pub auxv_ehdr: u64,
    /// Where the parasite read the auxv: `prctl` or `/proc/self/auxv`.
    pub auxv_source: &'static str,
    /// Whether a `[vdso]` area is mapped.
    pub vdso_mapped: bool,
    /// Start of the `[vdso]` the symbols were read from (0: none).
    pub vdso_base: u64,
    /// Whether `AT_SYSINFO_EHDR` points at the mapped `[vdso]` (false after a move or unmap).
    pub auxv_matches: bool,
    pub layout: VdsoLayout,
    pub symbols: Vec<VdsoSymbol>,
}

#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error(transparent)]
    Infect(#[from] InfectError),
    #[error("pid {pid}: the parasite's vDSO report disagrees with the host's reading: {why}")]
    Mismatch { pid: i32, why: String },
    #[error("pid {pid}: reading the vDSO from the host: {source}")]
    Vdso {
        pid: i32,
        #[source]
        source: stasis_vdso::VdsoError,
    },
    #[error(transparent)]
    Proc(#[from] stasis_proc::ProcError),
}

/// Phase durations of one `vdso` round trip, for logs and the benchmark.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timings {
    pub seize: Duration,
    pub infect: Duration,
    pub command: Duration,
    pub cure: Duration,
    pub release: Duration,
    pub verify: Duration,
}

/// Seize → infect → ask for the vDSO report → cure → detach, then cross-check.
pub fn vdso_report(pid: i32) -> Result<(VdsoInfo, Timings), CollectError> {
    let mut t = Timings::default();
    let blob = crate::blobs::parasite()?;
    let t0 = Instant::now();
    let mut seized = Seized::seize(pid)?;
    t.seize = t0.elapsed();

    let t1 = Instant::now();
    let mut parasite = Parasite::infect(&mut seized, blob, RegionSize::default())?;
    t.infect = t1.elapsed();

    let t2 = Instant::now();
    let reply = parasite.run(stasis_abi::CommandId::VdsoReport, COMMAND_TIMEOUT);
    t.command = t2.elapsed();

    // The host reads maps and the vDSO bytes while the process is still frozen, so both views
    // describe the same moment. The parasite's region is excluded (it is about to go).
    let host = host_view(pid);

    let t3 = Instant::now();
    parasite.cure()?;
    t.cure = t3.elapsed();
    let t4 = Instant::now();
    seized.release()?;
    t.release = t4.elapsed();

    let t5 = Instant::now();
    let reply = reply?;
    let (layout, image_syms) = host?;
    let info = decode(pid, &reply)?;
    cross_check(pid, &info, &layout, image_syms.as_deref())?;
    t.verify = t5.elapsed();
    tracing::info!(pid, ?t, "vdso report");
    Ok((info, t))
}

type HostView = (VdsoLayout, Option<Vec<VdsoSymbol>>);

fn host_view(pid: i32) -> Result<HostView, CollectError> {
    let vmas = stasis_proc::maps(pid)?;
    let layout = VdsoLayout::from_vmas(&vmas);
    let syms = match layout.vdso() {
        Some(area) => {
            let image = stasis_vdso::read_image(pid, area)
                .map_err(|source| CollectError::Vdso { pid, source })?;
            Some(
                stasis_vdso::symbols_from_image(&image)
                    .map_err(|source| CollectError::Vdso { pid, source })?,
            )
        }
        None => None,
    };
    Ok((layout, syms))
}

fn bad(pid: i32, why: impl Into<String>) -> CollectError {
    CollectError::Infect(InfectError::BadReply {
        pid,
        why: why.into(),
    })
}

/// Reads a plain `#[repr(C)]` integer struct at `off`; None when it does not fit.
fn read_at<T: Copy>(bytes: &[u8], off: usize) -> Option<T> {
    let end = off.checked_add(std::mem::size_of::<T>())?;
    let src = bytes.get(off..end)?;
    // SAFETY: T is one of the abi structs, made only of integers, so any bit pattern is valid;
    // the slice holds exactly size_of::<T>() bytes; read_unaligned needs no alignment.
    Some(unsafe { std::ptr::read_unaligned(src.as_ptr() as *const T) })
}

/// Decodes the wire report; every count, offset and string is bounds-checked.
fn decode(pid: i32, bytes: &[u8]) -> Result<VdsoInfo, CollectError> {
    let hdr: VdsoReport =
        read_at(bytes, 0).ok_or_else(|| bad(pid, "report shorter than its header"))?;
    let area_sz = std::mem::size_of::<WireArea>();
    let sym_sz = std::mem::size_of::<WireSymbol>();
    // Counts are u32; in usize these products cannot overflow on 64-bit.
    let areas_off = std::mem::size_of::<VdsoReport>();
    let syms_off = areas_off + hdr.n_areas as usize * area_sz;
    let strtab_off = syms_off + hdr.n_symbols as usize * sym_sz;
    let strtab_end = strtab_off + hdr.strtab_len as usize;
    if strtab_end != bytes.len() {
        return Err(bad(
            pid,
            format!(
                "report length {} does not match its counts ({strtab_end})",
                bytes.len()
            ),
        ));
    }
    let strtab = &bytes[strtab_off..strtab_end];
    let string = |r: StrRef, what: &str| -> Result<String, CollectError> {
        let start = r.off as usize;
        let s = strtab
            .get(start..start + r.len as usize)
            .ok_or_else(|| bad(pid, format!("{what} outside the string table")))?;
        String::from_utf8(s.to_vec()).map_err(|_| bad(pid, format!("{what} is not UTF-8")))
    };
    let mut areas = Vec::with_capacity(hdr.n_areas as usize);
    for i in 0..hdr.n_areas as usize {
        let a: WireArea = read_at(bytes, areas_off + i * area_sz)
            .ok_or_else(|| bad(pid, "area out of bounds"))?;
        let name = string(a.name, "area name")?;
        if !stasis_abi::is_vdso_area_name(name.as_bytes()) || a.end <= a.start {
            return Err(bad(
                pid,
                format!("implausible area {name:?} {:#x}-{:#x}", a.start, a.end),
            ));
        }
        areas.push(VdsoArea {
            name,
            start: a.start,
            end: a.end,
            prot: a.prot,
        });
    }
    let mut symbols = Vec::with_capacity(hdr.n_symbols as usize);
    for i in 0..hdr.n_symbols as usize {
        let s: WireSymbol = read_at(bytes, syms_off + i * sym_sz)
            .ok_or_else(|| bad(pid, "symbol out of bounds"))?;
        symbols.push(VdsoSymbol {
            name: string(s.name, "symbol name")?,
            version: string(s.version, "symbol version")?,
            offset: s.offset,
            size: s.size,
            info: s.info,
        });
    }
    let auxv_source = match hdr.auxv_source {
        stasis_abi::AUXV_FROM_PRCTL => "prctl",
        stasis_abi::AUXV_FROM_PROC => "/proc/self/auxv",
        other => return Err(bad(pid, format!("unknown auxv source {other}"))),
    };
    let vdso_mapped = hdr.flags & stasis_abi::VDSO_MAPPED != 0;
    if vdso_mapped != (hdr.vdso_base != 0) {
        return Err(bad(pid, "vDSO flag and base disagree"));
    }
    Ok(VdsoInfo {
        pid,
        auxv_ehdr: hdr.auxv_ehdr,
        auxv_source,
        vdso_mapped,
        vdso_base: hdr.vdso_base,
        auxv_matches: hdr.flags & stasis_abi::VDSO_AUXV_MATCHES != 0,
        layout: VdsoLayout { areas },
        symbols,
    })
}

fn cross_check(
    pid: i32,
    info: &VdsoInfo,
    host_layout: &VdsoLayout,
    host_syms: Option<&[VdsoSymbol]>,
) -> Result<(), CollectError> {
    let mismatch = |why: String| CollectError::Mismatch { pid, why };
    if info.layout != *host_layout {
        return Err(mismatch(format!(
            "areas: parasite says {}, /proc/{pid}/maps says {}",
            info.layout.describe(),
            host_layout.describe()
        )));
    }
    let host_vdso = host_layout.vdso().map(|a| a.start).unwrap_or(0);
    if info.vdso_base != host_vdso {
        return Err(mismatch(format!(
            "[vdso] at {:#x} per the parasite, {host_vdso:#x} per maps",
            info.vdso_base
        )));
    }
    match host_syms {
        Some(h) if h != info.symbols.as_slice() => {
            let first = h
                .iter()
                .zip(&info.symbols)
                .find(|(a, b)| a != b)
                .map(|(a, b)| format!("host {a:?} vs parasite {b:?}"))
                .unwrap_or_else(|| format!("{} symbols vs {}", h.len(), info.symbols.len()));
            Err(mismatch(format!("symbols: {first}")))
        }
        None if !info.symbols.is_empty() => {
            Err(mismatch("symbols reported without a [vdso]".into()))
        }
        _ => Ok(()),
    }
}
