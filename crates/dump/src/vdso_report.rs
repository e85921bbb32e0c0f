//! The vDSO as the parasite sees it from inside a frozen process, cross-checked against the
//! host's own reading (`stasis vdso`, and the vDSO record of every dump).
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
    // The vDSO error is in the message, not also a `source` (a chain would print it twice).
    #[error("pid {pid}: reading the vDSO from the host: {err}")]
    Vdso {
        pid: i32,
        err: stasis_vdso::VdsoError,
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
    let blob = stasis_blobs::parasite()?;
    let t0 = Instant::now();
    let mut seized = Seized::seize(pid)?;
    t.seize = t0.elapsed();

    let t1 = Instant::now();
    let mut parasite = Parasite::infect(&mut seized, blob, RegionSize::default())?;
    t.infect = t1.elapsed();

    let t2 = Instant::now();
    let asked = ask_vdso(&mut parasite);
    t.command = t2.elapsed();

    let t3 = Instant::now();
    parasite.cure()?;
    t.cure = t3.elapsed();
    let t4 = Instant::now();
    seized.release()?;
    t.release = t4.elapsed();

    let t5 = Instant::now();
    let info = asked.and_then(|a| a.verify())?;
    t.verify = t5.elapsed();
    tracing::info!(pid, ?t, "vdso report");
    Ok((info, t))
}

/// The parasite's answer and the host's own reading, taken while the process is frozen, so
/// both describe the same moment. Checked by `verify`, which may run after the cure.
pub struct AskedVdso {
    pid: i32,
    reply: Vec<u8>,
    host: HostView,
}

impl AskedVdso {
    pub fn verify(self) -> Result<VdsoInfo, CollectError> {
        let info = decode(self.pid, &self.reply)?;
        cross_check(self.pid, &info, &self.host.0, self.host.1.as_deref())?;
        Ok(info)
    }
}

/// Asks an infected process for its vDSO report and reads the host's view alongside.
pub fn ask_vdso(parasite: &mut Parasite<'_>) -> Result<AskedVdso, CollectError> {
    let pid = parasite.pid();
    let reply = parasite.run(stasis_abi::CommandId::VdsoReport, COMMAND_TIMEOUT)?;
    let host = host_view(pid)?;
    Ok(AskedVdso { pid, reply, host })
}

type HostView = (VdsoLayout, Option<Vec<VdsoSymbol>>);

fn host_view(pid: i32) -> Result<HostView, CollectError> {
    let vmas = stasis_proc::maps(pid)?;
    let layout = VdsoLayout::from_vmas(&vmas);
    let syms = match layout.vdso() {
        Some(area) => {
            let image = stasis_vdso::read_image(pid, area)
                .map_err(|err| CollectError::Vdso { pid, err })?;
            Some(
                stasis_vdso::symbols_from_image(&image)
                    .map_err(|err| CollectError::Vdso { pid, err })?,
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

#[cfg(test)]
mod tests {
    use super::*;
    use stasis_abi::{AUXV_FROM_PRCTL, VDSO_AUXV_MATCHES, VDSO_MAPPED};

    fn bytes_of<T: Copy>(v: &T) -> Vec<u8> {
        // SAFETY: abi structs are plain integers; reading their bytes is fine.
        unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) }
            .to_vec()
    }

    /// A well-formed reply: one [vvar], one [vdso], two symbols.
    fn good() -> Vec<u8> {
        let strtab = b"[vvar][vdso]__vdso_timeLINUX_2.6time".to_vec();
        let s = |off: u32, len: u32| StrRef { off, len };
        let hdr = VdsoReport {
            auxv_ehdr: 0x2000,
            vdso_base: 0x2000,
            auxv_source: AUXV_FROM_PRCTL,
            flags: VDSO_MAPPED | VDSO_AUXV_MATCHES,
            n_areas: 2,
            n_symbols: 2,
            strtab_len: strtab.len() as u32,
            _pad: 0,
        };
        let mut out = bytes_of(&hdr);
        out.extend(bytes_of(&WireArea {
            start: 0x1000,
            end: 0x2000,
            prot: 1,
            name: s(0, 6),
        }));
        out.extend(bytes_of(&WireArea {
            start: 0x2000,
            end: 0x4000,
            prot: 5,
            name: s(6, 6),
        }));
        for name in [s(12, 11), s(32, 4)] {
            out.extend(bytes_of(&WireSymbol {
                offset: 0xac0,
                size: 40,
                name,
                version: s(23, 9),
                info: 0x12,
                _pad: [0; 7],
            }));
        }
        out.extend(strtab);
        out
    }

    fn set_u32(b: &mut [u8], off: usize, v: u32) {
        b[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    const HDR: usize = std::mem::size_of::<VdsoReport>();
    const AREA: usize = std::mem::size_of::<WireArea>();

    fn err(b: &[u8]) -> String {
        match decode(7, b) {
            Ok(_) => panic!("corrupt reply accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn decodes_a_good_reply() {
        let info = decode(7, &good()).expect("good reply");
        assert_eq!(info.layout.describe(), "[vvar] 4K, [vdso] 8K");
        assert_eq!(info.symbols[0].name, "__vdso_time");
        assert_eq!(info.symbols[1].version, "LINUX_2.6");
        assert!(info.auxv_matches && info.vdso_mapped);
    }

    #[test]
    fn truncated_reply() {
        let g = good();
        for len in [0, 3, HDR - 1, HDR, g.len() - 1] {
            assert!(err(&g[..len]).contains("pid 7"));
        }
    }

    #[test]
    fn huge_counts() {
        let mut b = good();
        set_u32(&mut b, 24, u32::MAX); // n_areas
        assert!(err(&b).contains("does not match"));
        let mut b = good();
        set_u32(&mut b, 28, u32::MAX); // n_symbols
        assert!(err(&b).contains("does not match"));
        let mut b = good();
        set_u32(&mut b, 32, u32::MAX); // strtab_len
        assert!(err(&b).contains("does not match"));
    }

    #[test]
    fn string_outside_the_table() {
        let mut b = good();
        set_u32(&mut b, HDR + 20, 1000); // first area's name.off
        assert!(err(&b).contains("outside the string table"));
        let mut b = good();
        set_u32(&mut b, HDR + 2 * AREA + 16 + 4, u32::MAX); // first symbol's name.len
        assert!(err(&b).contains("outside the string table"));
    }

    #[test]
    fn not_utf8() {
        let mut b = good();
        let n = b.len();
        b[n - 1] = 0xff;
        assert!(err(&b).contains("UTF-8"));
    }

    #[test]
    fn implausible_area() {
        let mut b = good();
        b[HDR + 8..HDR + 16].copy_from_slice(&0u64.to_le_bytes()); // end < start
        assert!(err(&b).contains("implausible"));
        let mut b = good();
        let strtab = b.len() - 36;
        b[strtab + 1] = b'x'; // "[xvar]" is not a vDSO area name
        assert!(err(&b).contains("implausible"));
    }

    #[test]
    fn unknown_auxv_source_and_inconsistent_flags() {
        let mut b = good();
        set_u32(&mut b, 16, 99);
        assert!(err(&b).contains("auxv source"));
        let mut b = good();
        set_u32(&mut b, 20, 0); // VDSO_MAPPED cleared but a base given
        assert!(err(&b).contains("disagree"));
    }

    #[test]
    fn random_corruption_never_panics() {
        let g = good();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            let mut b = g.clone();
            for _ in 0..3 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x as usize) % b.len();
                b[i] = (x >> 32) as u8;
            }
            let _ = decode(7, &b);
        }
    }
}
