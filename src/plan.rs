//! The restore plan: every decision about the restored address space, made on the host and
//! encoded as a flat list of system calls (`stasis_abi::PlanOp`) for the restorer to execute.
//!
//! Pointer arguments refer to data appended after the operations; `encode` resolves them once
//! the address of the plan area in the task is known.

use crate::restore::{Child, Image};
use anyhow::{bail, Context, Result};
use stasis_abi::{
    PlanOp, RestoreResult, EXPECT_ANY, EXPECT_ARG0, EXPECT_ARG4, EXPECT_COPY, EXPECT_OK,
    EXPECT_PREAD_ALL,
};
use stasis_image::model::*;
use stasis_image::PAGE_SIZE;
use std::collections::BTreeMap;

const PAGE: u64 = PAGE_SIZE as u64;

/// An argument: a plain value, or the address of plan data at an offset.
#[derive(Clone, Copy, Debug)]
enum Arg {
    V(u64),
    D(usize),
}
use Arg::{D, V};

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("operation {index} ({what}) failed: {err}")]
    OpFailed {
        index: usize,
        what: String,
        err: String,
    },
    #[error("the restorer's reply is malformed ({0} bytes)")]
    BadReply(usize),
    #[error("the restorer stopped after {done} of {total} operations")]
    Incomplete { done: u64, total: usize },
}

pub struct Plan {
    ops: Vec<([Arg; 6], u64, u32, String)>,
    data: Vec<u8>,
    /// Pointers inside the data to other data: (offset of the 8-byte slot, offset pointed at).
    fixups: Vec<(usize, usize)>,
    /// Address ranges the plan itself uses as scratch space: the restorer's region must not.
    pub reserved: Vec<(u64, u64)>,
    /// Shared anonymous objects mapped so far: id → (address, offset in the object, length).
    shm: std::collections::HashMap<u64, (u64, u64, u64)>,
}

fn errno_text(r: i64) -> String {
    if (-4095..0).contains(&r) {
        format!("{} ({})", nix::errno::Errno::from_raw(-r as i32), -r)
    } else {
        format!("unexpected result {r:#x}")
    }
}

impl Plan {
    fn new() -> Plan {
        Plan {
            ops: Vec::new(),
            data: Vec::new(),
            fixups: Vec::new(),
            reserved: Vec::new(),
            shm: std::collections::HashMap::new(),
        }
    }

    fn op(&mut self, nr: i64, args: [Arg; 6], expect: u32, what: impl Into<String>) {
        self.ops.push((args, nr as u64, expect, what.into()));
    }

    fn put(&mut self, bytes: &[u8]) -> Arg {
        let off = self.data.len().next_multiple_of(8);
        self.data.resize(off, 0);
        self.data.extend_from_slice(bytes);
        D(off)
    }

    fn put_u64s(&mut self, words: &[u64]) -> Arg {
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        self.put(&bytes)
    }

    fn ops_len(&self) -> usize {
        self.ops.len() * std::mem::size_of::<PlanOp>()
    }

    pub fn log(&self) {
        for (i, o) in self.ops.iter().enumerate() {
            tracing::debug!("plan op {i}: {}", o.3);
        }
    }

    /// Bytes the encoded plan takes (operations + data).
    pub fn byte_len(&self) -> usize {
        self.ops_len().next_multiple_of(8) + self.data.len()
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Encodes the plan for the area at `base`; returns the bytes and the operations' length.
    pub fn encode(&self, base: u64) -> (Vec<u8>, usize) {
        let data_at = base + self.ops_len().next_multiple_of(8) as u64;
        let mut out = Vec::with_capacity(self.byte_len());
        for (args, nr, expect, _) in &self.ops {
            let mut op = PlanOp {
                nr: *nr,
                expect: *expect,
                ..PlanOp::default()
            };
            for (slot, a) in op.args.iter_mut().zip(args) {
                *slot = match *a {
                    V(v) => v,
                    D(off) => data_at + off as u64,
                };
            }
            // SAFETY: PlanOp is plain integers; its bytes are its wire form.
            out.extend_from_slice(unsafe {
                std::slice::from_raw_parts(
                    &op as *const PlanOp as *const u8,
                    std::mem::size_of::<PlanOp>(),
                )
            });
        }
        let ops_len = out.len();
        out.resize(ops_len.next_multiple_of(8), 0);
        let data_start = out.len();
        out.extend_from_slice(&self.data);
        for &(slot, target) in &self.fixups {
            let at = data_start + slot;
            out[at..at + 8].copy_from_slice(&(data_at + target as u64).to_le_bytes());
        }
        (out, ops_len)
    }

    fn result(reply: &[u8]) -> Option<RestoreResult> {
        (reply.len() == std::mem::size_of::<RestoreResult>())
            // SAFETY: RestoreResult is plain integers and the slice has its exact size.
            .then(|| unsafe { std::ptr::read_unaligned(reply.as_ptr() as *const RestoreResult) })
    }

    /// Checks a successful reply ran every operation.
    pub fn check_result(&self, reply: &[u8]) -> Result<(), PlanError> {
        let r = Self::result(reply).ok_or(PlanError::BadReply(reply.len()))?;
        if r.done as usize != self.ops.len() {
            return Err(PlanError::Incomplete {
                done: r.done,
                total: self.ops.len(),
            });
        }
        Ok(())
    }

    /// Names the operation a failed reply points at.
    pub fn describe_failure(&self, reply: &[u8]) -> String {
        match Self::result(reply) {
            Some(r) => {
                let i = r.failed_op as usize;
                let what = self
                    .ops
                    .get(i)
                    .map_or("unknown operation", |o| o.3.as_str())
                    .to_string();
                PlanError::OpFailed {
                    index: i,
                    what,
                    err: errno_text(r.result),
                }
                .to_string()
            }
            None => PlanError::BadReply(reply.len()).to_string(),
        }
    }
}

/// Descriptors the child opens for the plan, at numbers chosen here (above every fd the
/// image uses), and closed by the plan's last operations.
pub struct Helpers {
    pub base: i32,
    pub pages_fd: i32,
    pub exe_fd: i32,
    pub ready_fd: i32,
    pub hold_fd: i32,
    /// (path, writable) → fd, for file mappings.
    pub files: BTreeMap<(String, bool), i32>,
    /// Where inherited stdio/tty fds wait before they are put at their numbers.
    pub inherit_base: i32,
}

impl Helpers {
    pub fn new(img: &Image) -> Result<Helpers> {
        let max_fd = img.files.fds.iter().map(|f| f.fd).max().unwrap_or(2);
        let base = (max_fd + 16).max(100);
        let mut files = BTreeMap::new();
        let mut next = base + 8;
        for v in &img.mm.vmas {
            if let Backing::File { path, .. } = &v.backing {
                let writable = v.shared && v.prot & libc::PROT_WRITE as u32 != 0;
                files.entry((path.clone(), writable)).or_insert_with(|| {
                    next += 1;
                    next - 1
                });
            }
        }
        Ok(Helpers {
            base,
            pages_fd: base,
            exe_fd: base + 1,
            ready_fd: base + 2,
            hold_fd: base + 3,
            inherit_base: next + 8,
            files,
        })
    }

    /// The highest fd number the child will use.
    pub fn max_fd(&self) -> i32 {
        self.inherit_base + 3
    }
}

fn same_file(a: &str, b: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// How to bring back the vDSO: `--vdso=auto|remap|proxy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
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

/// Names given (PR_SET_VMA_ANON_NAME, where the kernel has it) to what a proxy maps.
pub const PROXY_NAME: &str = "stasis-vdso-proxy";
pub const ORIGINAL_NAME: &str = "stasis-vdso-original";
pub const PLACEHOLDER_PREFIX: &str = "stasis-vvar-";

/// The pristine copy of a proxied vDSO starts with a page that describes the proxy, so the
/// next dump recognises it on every kernel (anonymous mapping names need CONFIG_ANON_VMA_NAME):
///
/// ```text
/// 0   magic  b"STASIS-VDSO-PRXY"              16
/// 16  proxy address, proxy length (u64 each)  16
/// 32  number of placeholders n (u64)           8
/// 40  n × { name [u8; 24] NUL-padded, start u64, end u64 }
/// 4096  the dumped vDSO's bytes, unpatched
/// ```
pub const PROXY_MAGIC: &[u8; 16] = b"STASIS-VDSO-PRXY";

/// The header page of the pristine copy.
pub fn proxy_header(proxy: (u64, u64), placeholders: &[(String, u64, u64)]) -> Vec<u8> {
    let mut h = Vec::with_capacity(PAGE as usize);
    h.extend_from_slice(PROXY_MAGIC);
    h.extend_from_slice(&proxy.0.to_le_bytes());
    h.extend_from_slice(&proxy.1.to_le_bytes());
    h.extend_from_slice(&(placeholders.len() as u64).to_le_bytes());
    for (name, s, e) in placeholders.iter().take(64) {
        let mut n = [0u8; 24];
        let b = name.as_bytes();
        n[..b.len().min(23)].copy_from_slice(&b[..b.len().min(23)]);
        h.extend_from_slice(&n);
        h.extend_from_slice(&s.to_le_bytes());
        h.extend_from_slice(&e.to_le_bytes());
    }
    h.resize(PAGE as usize, 0);
    h
}

/// A vDSO-related area as (name, start, end).
pub type Area = (String, u64, u64);

/// Parses a header page into the proxy's (address, length) and its placeholders; None unless
/// it is one.
pub fn parse_proxy_header(h: &[u8]) -> Option<((u64, u64), Vec<Area>)> {
    let u = |o: usize| Some(u64::from_le_bytes(h.get(o..o + 8)?.try_into().ok()?));
    if h.get(..16)? != PROXY_MAGIC {
        return None;
    }
    let n = u(32)? as usize;
    if n > 64 {
        return None;
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let o = 40 + i * 40;
        let raw = h.get(o..o + 24)?;
        let name =
            String::from_utf8(raw.iter().take_while(|&&c| c != 0).copied().collect()).ok()?;
        out.push((name, u(o + 24)?, u(o + 32)?));
    }
    Some(((u(16)?, u(24)?), out))
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
    let top = 0x7ff0_0000_0000u64;
    let mut hi = top;
    for &(s, e) in busy.iter().rev() {
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

const SYS_MMAP: i64 = libc::SYS_mmap;
const MADV_POPULATE_WRITE: u64 = 23;

impl Plan {
    pub fn build(
        img: &Image,
        h: &Helpers,
        vdso: &VdsoPlan,
        child_maps: &[stasis_proc::Vma],
        child_rseq: Option<(u64, u32, u32)>,
        child: &Child,
    ) -> Result<Plan> {
        let mut p = Plan::new();
        // 1. The child's rseq area is about to disappear: unregister it first, or the kernel
        //    would fault writing the cpu id into unmapped memory on the next return to user.
        if let Some((addr, len, sig)) = child_rseq {
            p.op(
                libc::SYS_rseq,
                [V(addr), V(len as u64), V(1), V(sig as u64), V(0), V(0)],
                EXPECT_OK,
                "unregister the new task's rseq",
            );
        }
        // 2. Unmap the child's own memory (it was a copy of stasis), all but the vDSO set.
        for v in child_maps {
            if stasis_abi::is_vdso_area_name(v.name.as_bytes()) || v.name == "[vsyscall]" {
                continue;
            }
            p.op(
                libc::SYS_munmap,
                [V(v.start), V(v.len()), V(0), V(0), V(0), V(0)],
                EXPECT_OK,
                format!("unmap stasis's {v}"),
            );
        }
        // 3. The vDSO: each special mapping moves whole, first to a scratch range (targets may
        //    overlap where another runtime area still is), then to its dumped address.
        match vdso {
            VdsoPlan::Remap { moves, drop } => {
                for (s, e) in drop {
                    p.op(
                        libc::SYS_munmap,
                        [V(*s), V(e - s), V(0), V(0), V(0), V(0)],
                        EXPECT_OK,
                        "unmap the runtime [vdso] (the process had none)",
                    );
                }
                let span: u64 = moves.iter().map(|m| m.2).sum();
                let mut busy: Vec<(u64, u64)> =
                    img.mm.vmas.iter().map(|v| (v.start, v.end)).collect();
                busy.extend(child_maps.iter().map(|v| (v.start, v.end)));
                let scratch = free_range_in(&mut busy, span)?;
                p.reserved.push((scratch, scratch + span));
                let flags = (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64;
                let mut at = scratch;
                for (name, from, len, _) in moves {
                    p.op(
                        libc::SYS_mremap,
                        [V(*from), V(*len), V(*len), V(flags), V(at), V(0)],
                        EXPECT_ARG4,
                        format!("move {name} aside"),
                    );
                    at += len;
                }
                let mut at = scratch;
                for (name, _, len, to) in moves {
                    p.op(
                        libc::SYS_mremap,
                        [V(at), V(*len), V(*len), V(flags), V(*to), V(0)],
                        EXPECT_ARG4,
                        format!("move {name} to {to:#x}"),
                    );
                    at += len;
                }
            }
            VdsoPlan::Proxy { runtime, .. } => p.proxy(img, runtime, child_maps)?,
            VdsoPlan::Unmap { areas } => {
                for (s, e) in areas {
                    p.op(
                        libc::SYS_munmap,
                        [V(*s), V(e - s), V(0), V(0), V(0), V(0)],
                        EXPECT_OK,
                        "unmap the runtime vDSO (the process had none)",
                    );
                }
            }
        }
        // 4. Every dumped VMA, its pages, its final protection.
        for v in &img.mm.vmas {
            p.map_vma(v, h)?;
        }
        // 5. mm fields (code/data/brk/stack/args/env), auxv and the exe link in one call.
        let f = &img.mm.fields;
        let auxv = p.put_u64s(&img.mm.auxv);
        let mut map = vec![
            f.start_code,
            f.end_code,
            f.start_data,
            f.end_data,
            f.start_brk,
            f.brk,
            f.start_stack,
            f.arg_start,
            f.arg_end,
            f.env_start,
            f.env_end,
            0,
        ];
        let auxv_size = (img.mm.auxv.len() * 8) as u64;
        // The kernel refuses to replace the exe link while the old exe is still mapped (EBUSY).
        // When the dumped program is the very binary the new task started as (stasis), the
        // link is already right: pass -1 to leave it.
        let exe_fd = if same_file(&img.mm.exe, "/proc/self/exe") {
            u32::MAX
        } else {
            h.exe_fd as u32
        };
        map.push(auxv_size | ((exe_fd as u64) << 32));
        let map_arg = p.put_u64s(&map);
        let D(map_off) = map_arg else {
            unreachable!("put returns data")
        };
        let D(auxv_off) = auxv else {
            unreachable!("put returns data")
        };
        p.fixups.push((map_off + 11 * 8, auxv_off));
        p.op(
            libc::SYS_prctl,
            [
                V(libc::PR_SET_MM as u64),
                V(libc::PR_SET_MM_MAP as u64),
                map_arg,
                V(13 * 8),
                V(0),
                V(0),
            ],
            EXPECT_OK,
            "PR_SET_MM_MAP (mm fields, auxv, exe)",
        );
        // 6. Per-thread kernel state.
        let c = &img.core;
        let ss_flags = (c.altstack.flags & !1) as u64; // SS_ONSTACK is a state, not a setting
        let ss = p.put_u64s(&[c.altstack.sp, ss_flags, c.altstack.size]);
        p.op(
            libc::SYS_sigaltstack,
            [ss, V(0), V(0), V(0), V(0), V(0)],
            EXPECT_OK,
            "sigaltstack",
        );
        if c.robust_list != 0 {
            p.op(
                libc::SYS_set_robust_list,
                [
                    V(c.robust_list),
                    V(c.robust_list_len),
                    V(0),
                    V(0),
                    V(0),
                    V(0),
                ],
                EXPECT_OK,
                "set_robust_list",
            );
        }
        p.op(
            libc::SYS_set_tid_address,
            [V(c.clear_child_tid), V(0), V(0), V(0), V(0), V(0)],
            EXPECT_ANY,
            "set_tid_address",
        );
        if let Some(r) = c.rseq {
            p.op(
                libc::SYS_rseq,
                [
                    V(r.addr),
                    V(r.len as u64),
                    V(0),
                    V(r.sig as u64),
                    V(0),
                    V(0),
                ],
                EXPECT_OK,
                "register rseq",
            );
        }
        // 7. Process-wide state: timers, pending signals, name, limits.
        let pr = &img.process;
        for (which, t) in pr.itimers.iter().enumerate() {
            if t.value_sec != 0 || t.value_usec != 0 {
                let tv = p.put_u64s(&[
                    t.interval_sec as u64,
                    t.interval_usec as u64,
                    t.value_sec as u64,
                    t.value_usec as u64,
                ]);
                p.op(
                    libc::SYS_setitimer,
                    [V(which as u64), tv, V(0), V(0), V(0), V(0)],
                    EXPECT_OK,
                    format!("setitimer {which}"),
                );
            }
        }
        p.posix_timers(&pr.posix_timers)?;
        let pid = img.inventory.pid as u64;
        for s in &pr.shared_pending {
            let info = p.put(&s.siginfo);
            p.op(
                libc::SYS_rt_sigqueueinfo,
                [V(pid), V(s.signo as u64), info, V(0), V(0), V(0)],
                EXPECT_OK,
                format!("queue pending signal {}", s.signo),
            );
        }
        for s in &c.pending {
            let info = p.put(&s.siginfo);
            p.op(
                libc::SYS_rt_tgsigqueueinfo,
                [V(pid), V(c.tid as u64), V(s.signo as u64), info, V(0), V(0)],
                EXPECT_OK,
                format!("queue pending thread signal {}", s.signo),
            );
        }
        let mut comm = pr.comm.as_bytes().to_vec();
        comm.truncate(15);
        comm.push(0);
        let name = p.put(&comm);
        p.op(
            libc::SYS_prctl,
            [V(libc::PR_SET_NAME as u64), name, V(0), V(0), V(0), V(0)],
            EXPECT_OK,
            "PR_SET_NAME",
        );
        for l in &pr.rlimits {
            let r = p.put_u64s(&[l.cur, l.max]);
            p.op(
                libc::SYS_prlimit64,
                [V(0), V(l.resource as u64), r, V(0), V(0), V(0)],
                EXPECT_OK,
                format!("rlimit {}", l.resource),
            );
        }
        // 8. Close the helpers and the handshake pipe.
        let mut helper_fds = vec![h.pages_fd, h.exe_fd, h.hold_fd];
        helper_fds.extend(h.files.values());
        helper_fds.extend(&child.leftover_fds);
        for fd in helper_fds {
            p.op(
                libc::SYS_close,
                [V(fd as u64), V(0), V(0), V(0), V(0), V(0)],
                EXPECT_ANY,
                format!("close helper fd {fd}"),
            );
        }
        // 9. Credentials last: dropping them earlier would forbid the calls above.
        let cr = &pr.creds;
        let groups: Vec<u8> = cr.groups.iter().flat_map(|g| g.to_le_bytes()).collect();
        let groups_arg = if groups.is_empty() {
            V(0)
        } else {
            p.put(&groups)
        };
        p.op(
            libc::SYS_setgroups,
            [
                V(cr.groups.len() as u64),
                groups_arg,
                V(0),
                V(0),
                V(0),
                V(0),
            ],
            EXPECT_OK,
            "setgroups",
        );
        p.op(
            libc::SYS_setresgid,
            [
                V(cr.gids[0] as u64),
                V(cr.gids[1] as u64),
                V(cr.gids[2] as u64),
                V(0),
                V(0),
                V(0),
            ],
            EXPECT_OK,
            "setresgid",
        );
        p.op(
            libc::SYS_setresuid,
            [
                V(cr.uids[0] as u64),
                V(cr.uids[1] as u64),
                V(cr.uids[2] as u64),
                V(0),
                V(0),
                V(0),
            ],
            EXPECT_OK,
            "setresuid",
        );
        // Changing credentials resets dumpability; set it afterwards.
        p.op(
            libc::SYS_prctl,
            [
                V(libc::PR_SET_DUMPABLE as u64),
                V(pr.dumpable.clamp(0, 1) as u64),
                V(0),
                V(0),
                V(0),
                V(0),
            ],
            EXPECT_OK,
            "PR_SET_DUMPABLE",
        );
        Ok(p)
    }

    /// POSIX timers with their old ids. With PR_TIMER_CREATE_RESTORE_IDS (6.15+) each
    /// timer_create takes the id it is given; before, ids come in sequence from 0 in the new
    /// task, so fillers are created to reach each id and deleted afterwards.
    fn posix_timers(&mut self, timers: &[PosixTimer]) -> Result<()> {
        const PR_TIMER_CREATE_RESTORE_IDS: u64 = 77;
        if timers.is_empty() {
            return Ok(());
        }
        let mut sorted = timers.to_vec();
        sorted.sort_by_key(|t| t.id);
        // SAFETY: querying the setting for ourselves (GET = 2) changes nothing.
        let by_id = unsafe { libc::prctl(PR_TIMER_CREATE_RESTORE_IDS as i32, 2, 0, 0, 0) } >= 0;
        if by_id {
            self.op(
                libc::SYS_prctl,
                [V(PR_TIMER_CREATE_RESTORE_IDS), V(1), V(0), V(0), V(0), V(0)],
                EXPECT_OK,
                "timer ids: restore mode on",
            );
        }
        let mut next = 0i32;
        let mut fillers = Vec::new();
        for t in &sorted {
            if !by_id {
                if t.id < next {
                    bail!("POSIX timer ids out of order");
                }
                while next < t.id {
                    // SIGEV_NONE filler to advance the kernel's id counter.
                    let sev = self.put_u64s(&[0, 1u64 << 32, 0, 0, 0, 0, 0, 0]);
                    let slot = self.put(&[0u8; 8]);
                    self.op(
                        libc::SYS_timer_create,
                        [V(libc::CLOCK_MONOTONIC as u64), sev, slot, V(0), V(0), V(0)],
                        EXPECT_OK,
                        format!("filler timer {next}"),
                    );
                    fillers.push(next);
                    next += 1;
                }
                next = t.id + 1;
            }
            // struct sigevent: sigev_value, sigev_signo, sigev_notify, sigev_notify_thread_id.
            let sev = self.put_u64s(&[
                t.sigval,
                (t.signo as u32 as u64) | ((t.notify as u32 as u64) << 32),
                t.tid as u32 as u64,
                0,
                0,
                0,
                0,
                0,
            ]);
            let slot = self.put(&(t.id as i64).to_le_bytes());
            self.op(
                libc::SYS_timer_create,
                [V(t.clock as u64), sev, slot, V(0), V(0), V(0)],
                EXPECT_OK,
                format!("create POSIX timer {}", t.id),
            );
            if t.value_sec != 0 || t.value_nsec != 0 {
                let its = self.put_u64s(&[
                    t.interval_sec as u64,
                    t.interval_nsec as u64,
                    t.value_sec as u64,
                    t.value_nsec as u64,
                ]);
                self.op(
                    libc::SYS_timer_settime,
                    [V(t.id as u64), V(0), its, V(0), V(0), V(0)],
                    EXPECT_OK,
                    format!("arm POSIX timer {}", t.id),
                );
            }
        }
        for id in fillers {
            self.op(
                libc::SYS_timer_delete,
                [V(id as u64), V(0), V(0), V(0), V(0), V(0)],
                EXPECT_OK,
                format!("delete filler timer {id}"),
            );
        }
        if by_id {
            self.op(
                libc::SYS_prctl,
                [V(PR_TIMER_CREATE_RESTORE_IDS), V(0), V(0), V(0), V(0), V(0)],
                EXPECT_OK,
                "timer ids: restore mode off",
            );
        }
        Ok(())
    }

    /// Gives the mapping at `addr` a name in /proc/PID/maps (`[anon:NAME]`). Best effort:
    /// kernels without CONFIG_ANON_VMA_NAME refuse, and only recognition on a later dump is lost.
    fn name_vma(&mut self, addr: u64, len: u64, name: &str) {
        let mut bytes = name.as_bytes().to_vec();
        bytes.push(0);
        let n = self.put(&bytes);
        self.op(
            libc::SYS_prctl,
            [V(0x5356_4d41), V(0), V(addr), V(len), n, V(0)],
            EXPECT_ANY,
            format!("name {addr:#x} {name}"),
        );
    }

    /// Maps anonymous memory at `addr` and copies `bytes` into it, then sets `prot`.
    fn place_bytes(&mut self, addr: u64, len: u64, bytes: &[u8], prot: u64, what: &str) {
        let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64;
        let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
        self.op(
            SYS_MMAP,
            [V(addr), V(len), V(rw), V(flags), V(u64::MAX), V(0)],
            EXPECT_ARG0,
            format!("map {what} at {addr:#x}"),
        );
        let src = self.put(bytes);
        self.op(
            0,
            [V(addr), src, V(bytes.len() as u64), V(0), V(0), V(0)],
            EXPECT_COPY,
            format!("copy {what}"),
        );
        self.op(
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
    fn proxy(
        &mut self,
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
        self.reserved.push((home, home + span + copy_len));
        let flags = (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64;
        for (name, s, e) in &runtime.areas {
            let to = home + (s - span_start);
            self.op(
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
            self.place_bytes(*vstart, len, &build.image, rx, "the vDSO proxy");
            self.name_vma(*vstart, len, PROXY_NAME);
            let orig_at = home + span;
            let placeholders: Vec<(String, u64, u64)> = rec
                .areas
                .iter()
                .filter(|a| a.0 != "[vdso]")
                .cloned()
                .collect();
            let mut copy = proxy_header((*vstart, len), &placeholders);
            copy.extend_from_slice(&rec.vdso_bytes);
            self.place_bytes(
                orig_at,
                PAGE + orig_len,
                &copy,
                libc::PROT_READ as u64,
                "the dumped vDSO's pristine copy",
            );
            self.name_vma(orig_at, PAGE + orig_len, ORIGINAL_NAME);
        }
        for (name, s, e) in rec.areas.iter().filter(|a| a.0 != "[vdso]") {
            let ro = libc::PROT_READ as u64;
            let anon = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64;
            self.op(
                SYS_MMAP,
                [V(*s), V(e - s), V(ro), V(anon), V(u64::MAX), V(0)],
                EXPECT_ARG0,
                format!("placeholder for {name} at {s:#x}"),
            );
            let bare = name.trim_start_matches('[').trim_end_matches(']');
            self.name_vma(*s, e - s, &format!("{PLACEHOLDER_PREFIX}{bare}"));
        }
        Ok(())
    }

    fn map_vma(&mut self, v: &Vma, h: &Helpers) -> Result<()> {
        let len = v.end - v.start;
        let needs_fill = !v.pages.is_empty();
        let prot = v.prot as u64
            | if needs_fill {
                libc::PROT_WRITE as u64
            } else {
                0
            };
        let mut flags = libc::MAP_FIXED_NOREPLACE as u64;
        if v.growsdown {
            flags |= libc::MAP_GROWSDOWN as u64;
        }
        let what = format!("map {:#x}-{:#x} {}", v.start, v.end, v.name);
        match &v.backing {
            Backing::Vdso { .. } => return Ok(()),
            Backing::Anon => {
                flags |= (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
                self.op(
                    SYS_MMAP,
                    [V(v.start), V(len), V(prot), V(flags), V(u64::MAX), V(0)],
                    EXPECT_ARG0,
                    what,
                );
            }
            Backing::AnonShared { id, offset } => {
                // A further view of a shared object already mapped: duplicate that mapping
                // (mremap with old size 0), so both views stay one object, as they were.
                let first = self.shm.get(id).copied().filter(|&(_, off, flen)| {
                    *id != 0 && *offset >= off && offset + len <= off + flen
                });
                if let Some((fstart, foff, _)) = first {
                    let from = fstart + (offset - foff);
                    let dup = (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64;
                    self.op(
                        libc::SYS_mremap,
                        [V(from), V(0), V(len), V(dup), V(v.start), V(0)],
                        EXPECT_ARG4,
                        format!("{what} (another view of shared object {id})"),
                    );
                    self.op(
                        libc::SYS_mprotect,
                        [V(v.start), V(len), V(prot), V(0), V(0), V(0)],
                        EXPECT_OK,
                        format!("protect the view at {:#x}", v.start),
                    );
                } else {
                    flags |= (libc::MAP_SHARED | libc::MAP_ANONYMOUS) as u64;
                    self.op(
                        SYS_MMAP,
                        [V(v.start), V(len), V(prot), V(flags), V(u64::MAX), V(0)],
                        EXPECT_ARG0,
                        what,
                    );
                    if *id != 0 {
                        self.shm.entry(*id).or_insert((v.start, *offset, len));
                    }
                }
            }
            Backing::File { path, offset, .. } => {
                let writable = v.shared && v.prot & libc::PROT_WRITE as u32 != 0;
                let fd = *h
                    .files
                    .get(&(path.clone(), writable))
                    .with_context(|| format!("no helper fd for {path}"))?;
                flags |= if v.shared {
                    libc::MAP_SHARED
                } else {
                    libc::MAP_PRIVATE
                } as u64;
                self.op(
                    SYS_MMAP,
                    [
                        V(v.start),
                        V(len),
                        V(prot),
                        V(flags),
                        V(fd as u64),
                        V(*offset),
                    ],
                    EXPECT_ARG0,
                    what,
                );
            }
        }
        for r in &v.pages {
            // Fault the destination in first, in one batch: far cheaper than taking one page
            // fault per 4 KiB inside the copy. Only the dumped pages: sparse memory stays sparse.
            // (Best effort: kernels before 5.14 lack MADV_POPULATE_WRITE; the read still works.)
            self.op(
                libc::SYS_madvise,
                [
                    V(r.addr),
                    V(r.pages * PAGE),
                    V(MADV_POPULATE_WRITE),
                    V(0),
                    V(0),
                    V(0),
                ],
                EXPECT_ANY,
                format!("populate {} pages at {:#x}", r.pages, r.addr),
            );
            self.op(
                0,
                [
                    V(h.pages_fd as u64),
                    V(r.addr),
                    V(r.pages * PAGE),
                    V(r.file_off),
                    V(0),
                    V(0),
                ],
                EXPECT_PREAD_ALL,
                format!("fill {} pages at {:#x}", r.pages, r.addr),
            );
        }
        if prot != v.prot as u64 {
            self.op(
                libc::SYS_mprotect,
                [V(v.start), V(len), V(v.prot as u64), V(0), V(0), V(0)],
                EXPECT_OK,
                format!("protect {:#x}-{:#x}", v.start, v.end),
            );
        }
        Ok(())
    }
}
