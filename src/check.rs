//! `stasis check`: probe the kernel interfaces stasis relies on and report the vDSO layout.
//!
//! Every probe really exercises the interface on this machine — no version-number guessing — and
//! leaves nothing behind: fds are `OwnedFd`s, mappings are unmapped on drop, and every child is
//! killed and reaped on drop, with bounded waits so a misbehaving kernel cannot hang `check`.
//!
//! | feature            | req. | why stasis needs it                                                   |
//! |--------------------|------|-----------------------------------------------------------------------|
//! | `ptrace_seize`     | yes  | freeze a target without SIGSTOP (SEIZE + INTERRUPT, event stop) and   |
//! |                    |      | save/restore its signal mask (`PTRACE_GETSIGMASK`)                    |
//! | `nt_x86_xstate`    | yes  | save/restore the full FPU/SSE/AVX state around parasite code          |
//! | `memfd_create`     | yes  | the shared region between host and parasite/restorer blobs            |
//! | `pr_get_auxv`      | no   | the parasite finds the vDSO (`AT_SYSINFO_EHDR`); falls back to        |
//! |                    |      | `/proc/self/auxv`                                                     |
//! | `clone3_set_tid`   | yes  | restore processes and threads with their original pids                |
//! | `pr_set_mm_map`    | yes  | restore the mm layout fields (code/data/brk/stack/args/env/auxv)      |
//! | `arch_map_vdso_64` | yes  | map a fresh vDSO at restore time when the image has none to move      |
//! | `userfaultfd`      | no   | the host fills restored memory (UFFDIO_COPY; else the restorer reads) |
//! | `pagemap_scan`     | no   | fast scan of present/written pages when dumping                       |
//! | `soft_dirty`       | no   | incremental dumps via pagemap bit 55 (not compiled into every kernel) |
//! | `process_vm_readv` | yes  | read target memory from the host without injected code                |
//! | `kcmp`             | yes  | tell descriptors that share one open file description (dup, fork)     |
//! | `pidfd_getfd`      | yes  | a copy of a target's descriptor (terminal modes) and of the restored  |
//! |                    |      | task's userfaultfd, through which the host fills its memory           |
//! | `tcp_repair`       | no   | `--tcp-established`: TCP repair mode (needs CAP_NET_ADMIN)            |
//! | `nft_netlock`      | no   | `--tcp-established`: the nftables table that holds the connections    |
//! |                    |      | from dump to restore (the `nft` program, package nftables)           |
//!
//! The vDSO layout is every `[vvar*]`/`[vdso]` area of our own `/proc/self/maps`, in order: its
//! count, order and sizes differ between kernels, so it is read, never assumed.
//!
//! Forked children run in a copy of a possibly multi-threaded process: their bodies only make raw
//! system calls (no allocation, no locks, no std I/O) and end in `_exit`.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use libc::{c_int, c_ulong, c_void, pid_t};

/// One probed kernel feature.
#[derive(Debug, serde::Serialize)]
pub struct Feature {
    pub name: &'static str,
    /// stasis cannot checkpoint/restore without it.
    pub required: bool,
    pub ok: bool,
    /// What the probe saw: sizes, masks, or why it failed.
    pub detail: String,
}

/// Everything `stasis check` found.
#[derive(Debug, serde::Serialize)]
pub struct CheckReport {
    /// `uname -r`.
    pub kernel: String,
    pub features: Vec<Feature>,
    /// `(name, start, size)` of every vDSO/vvar area of this process, in address order.
    pub vdso_layout: Vec<(String, u64, u64)>,
}

impl CheckReport {
    /// True when every feature marked `required` was found working.
    pub fn all_required_ok(&self) -> bool {
        self.features.iter().all(|f| f.ok || !f.required)
    }

    fn missing_required(&self) -> impl Iterator<Item = &Feature> {
        self.features.iter().filter(|f| f.required && !f.ok)
    }
}

/// Outcome of one probe: `Ok(detail)` when the feature works, `Err(detail)` when it does not.
type Probe = Result<String, String>;

impl Feature {
    fn from_probe(name: &'static str, required: bool, probe: Probe) -> Self {
        let (ok, detail) = match probe {
            Ok(d) => (true, d),
            Err(d) => (false, d),
        };
        Feature {
            name,
            required,
            ok,
            detail,
        }
    }
}

/// Runs every probe. Never fails: a probe that cannot run reports the reason in its `detail`.
pub fn run_checks() -> CheckReport {
    let started = std::time::Instant::now();
    let vdso_layout = read_vdso_layout();
    let vdso_span = vdso_span(&vdso_layout);
    let (seize, xstate) = probe_ptrace();
    let features = vec![
        Feature::from_probe("ptrace_seize", true, seize),
        Feature::from_probe("nt_x86_xstate", true, xstate),
        Feature::from_probe("memfd_create", true, probe_memfd()),
        Feature::from_probe("pr_get_auxv", false, probe_pr_get_auxv(&vdso_layout)),
        Feature::from_probe("clone3_set_tid", true, probe_clone3_set_tid()),
        Feature::from_probe("pr_set_mm_map", true, probe_pr_set_mm_map()),
        Feature::from_probe("arch_map_vdso_64", true, probe_arch_map_vdso(vdso_span)),
        Feature::from_probe("userfaultfd", false, probe_userfaultfd()),
        Feature::from_probe("pagemap_scan", false, probe_pagemap_scan()),
        Feature::from_probe("soft_dirty", false, probe_soft_dirty()),
        Feature::from_probe("mem_tracking", false, probe_mem_tracking()),
        Feature::from_probe("process_vm_readv", true, probe_process_vm_readv()),
        Feature::from_probe("kcmp", true, probe_kcmp()),
        Feature::from_probe("pidfd_getfd", true, probe_pidfd_getfd()),
        Feature::from_probe("tcp_repair", false, probe_tcp_repair()),
        Feature::from_probe("nft_netlock", false, probe_nft_netlock()),
    ];
    tracing::debug!(elapsed = ?started.elapsed(), "kernel checks done");
    CheckReport {
        kernel: kernel_release(),
        features,
        vdso_layout,
    }
}

/// Prints the report on stdout: a table for people, or the report as JSON.
pub fn print_report(r: &CheckReport, json: bool) {
    if json {
        match serde_json::to_string_pretty(r) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("stasis check: cannot encode the report as JSON: {e}"),
        }
    } else {
        print!("{}", render_table(r));
    }
}

fn render_table(r: &CheckReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "kernel {}", r.kernel);
    for f in &r.features {
        let status = match (f.ok, f.required) {
            (true, _) => "ok",
            (false, true) => "MISSING",
            (false, false) => "absent (optional)",
        };
        let _ = writeln!(out, "{status:<18} {:<17} {}", f.name, f.detail);
    }
    let areas: Vec<String> = r
        .vdso_layout
        .iter()
        .map(|(name, _, size)| format!("{name} {}", human_size(*size)))
        .collect();
    if areas.is_empty() {
        let _ = writeln!(out, "vDSO layout: none mapped");
    } else {
        let _ = writeln!(out, "vDSO layout: {}", areas.join(", "));
    }
    let missing: Vec<&str> = r.missing_required().map(|f| f.name).collect();
    if missing.is_empty() {
        let _ = writeln!(out, "all required features present");
    } else {
        let _ = writeln!(out, "missing required features: {}", missing.join(", "));
    }
    out
}

/// `16384` → `16K`; sizes that are not whole KiB stay in bytes.
fn human_size(bytes: u64) -> String {
    const K: u64 = 1024;
    match bytes {
        0 => "0".to_string(),
        b if b % (K * K) == 0 => format!("{}M", b / (K * K)),
        b if b % K == 0 => format!("{}K", b / K),
        b => format!("{b}B"),
    }
}

fn kernel_release() -> String {
    match nix::sys::utsname::uname() {
        Ok(u) => u.release().to_string_lossy().into_owned(),
        Err(e) => format!("unknown (uname: {e})"),
    }
}

// ---------------------------------------------------------------------------------------------
// vDSO layout
// ---------------------------------------------------------------------------------------------

fn read_vdso_layout() -> Vec<(String, u64, u64)> {
    match stasis_proc::maps(std::process::id() as i32) {
        Ok(vmas) => vmas
            .into_iter()
            .filter(|v| stasis_abi::is_vdso_area_name(&v.name))
            .map(|v| {
                let size = v.len();
                (v.name_lossy().into_owned(), v.start, size)
            })
            .collect(),
        Err(e) => {
            tracing::warn!("cannot read our own maps: {e}");
            Vec::new()
        }
    }
}

/// `[lowest start, highest end)` of the vDSO areas: the whole set that must move (or be unmapped)
/// together.
fn vdso_span(layout: &[(String, u64, u64)]) -> Option<(u64, u64)> {
    let lo = layout.iter().map(|(_, start, _)| *start).min()?;
    let hi = layout
        .iter()
        .map(|(_, start, size)| start.saturating_add(*size))
        .max()?;
    Some((lo, hi))
}

fn vdso_text_start(layout: &[(String, u64, u64)]) -> Option<u64> {
    layout
        .iter()
        .find(|(name, _, _)| name == "[vdso]")
        .map(|(_, start, _)| *start)
}

// ---------------------------------------------------------------------------------------------
// Probes
// ---------------------------------------------------------------------------------------------

/// How long a probe waits for a child's stop or exit before giving up.
const CHILD_TIMEOUT: Duration = Duration::from_secs(5);

const NT_X86_XSTATE: usize = 0x202;
/// Offset of the XCR0 word in the `NT_X86_XSTATE` regset (start of the fxsave `sw_reserved` area).
const USER_XSTATE_XCR0_OFFSET: usize = 464;

/// Seizes a sleeping child and checks the event stop, the signal mask and the XSAVE regset.
/// Returns `(ptrace_seize, nt_x86_xstate)`: the second needs the stopped child of the first.
fn probe_ptrace() -> (Probe, Probe) {
    let mut child = match sys::fork_sleeper() {
        Ok(c) => c,
        Err(e) => {
            let e = format!("fork: {e}");
            return (Err(e.clone()), Err(e));
        }
    };
    let pid = child.pid;
    let seize = seize_and_interrupt(&mut child);
    let xstate = match &seize {
        Ok(_) => read_xstate(pid),
        Err(_) => Err("not probed: no ptrace-stopped child".to_string()),
    };
    // Dropping `child` kills and reaps it (SIGKILL ends a ptrace-stopped tracee too).
    drop(child);
    (seize, xstate)
}

fn seize_and_interrupt(child: &mut sys::Child) -> Probe {
    let pid = child.pid;
    sys::ptrace(libc::PTRACE_SEIZE, pid, 0, 0).map_err(|e| format!("PTRACE_SEIZE: {e}"))?;
    sys::ptrace(libc::PTRACE_INTERRUPT, pid, 0, 0).map_err(|e| format!("PTRACE_INTERRUPT: {e}"))?;
    let status = child
        .wait(CHILD_TIMEOUT)
        .map_err(|e| format!("waitpid: {e}"))?
        .ok_or_else(|| format!("no stop within {CHILD_TIMEOUT:?} after PTRACE_INTERRUPT"))?;
    let event = status >> 16;
    if !libc::WIFSTOPPED(status) || event != libc::PTRACE_EVENT_STOP {
        return Err(format!(
            "waitpid status {status:#x}: not a PTRACE_EVENT_STOP"
        ));
    }
    let mut mask: u64 = 0;
    // The kernel's sigset is 8 bytes on x86_64 (not libc's 128-byte sigset_t).
    sys::ptrace(
        libc::PTRACE_GETSIGMASK,
        pid,
        std::mem::size_of::<u64>(),
        &mut mask as *mut u64 as usize,
    )
    .map_err(|e| format!("PTRACE_GETSIGMASK: {e}"))?;
    Ok(format!(
        "SEIZE + INTERRUPT gave PTRACE_EVENT_STOP; GETSIGMASK ok (mask {mask:#x})"
    ))
}

fn read_xstate(pid: pid_t) -> Probe {
    // Larger than any XSAVE area the kernel has (AMX included); it reports the real size.
    let mut buf = vec![0u8; 64 * 1024];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    sys::ptrace(
        libc::PTRACE_GETREGSET,
        pid,
        NT_X86_XSTATE,
        &mut iov as *mut libc::iovec as usize,
    )
    .map_err(|e| format!("PTRACE_GETREGSET(NT_X86_XSTATE): {e}"))?;
    let len = iov.iov_len.min(buf.len());
    if len == 0 {
        return Err("PTRACE_GETREGSET(NT_X86_XSTATE) returned 0 bytes".to_string());
    }
    let mut detail = format!("{len} bytes");
    // For ptrace the kernel puts its XCR0 in the first sw_reserved word (USER_XSTATE_XCR0_WORD,
    // GDB's I386_LINUX_XSAVE_XCR0_OFFSET). Restoring on another CPU needs both sides' XCR0.
    if let Some(xcr0) = le_u64(&buf[..len], USER_XSTATE_XCR0_OFFSET) {
        let _ = write!(detail, ", XCR0 {xcr0:#x}");
    }
    Ok(detail)
}

fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// memfd + ftruncate + MAP_SHARED, and a write through the mapping is seen through the fd.
fn probe_kcmp() -> Probe {
    use std::os::fd::AsRawFd;
    let me = std::process::id() as i32;
    let a = File::open("/proc/self/stat").map_err(|e| format!("open: {e}"))?;
    let b = a.try_clone().map_err(|e| format!("dup: {e}"))?;
    match stasis_sys::fs::same_description(me, a.as_raw_fd(), me, b.as_raw_fd()) {
        Ok(true) => Ok("KCMP_FILE tells a dup'd descriptor".into()),
        Ok(false) => Err("KCMP_FILE says a dup'd descriptor is another file".into()),
        Err(e) => Err(format!("kcmp: {e} (CONFIG_KCMP?)")),
    }
}

fn probe_pidfd_getfd() -> Probe {
    use std::os::fd::AsRawFd;
    let a = File::open("/proc/self/stat").map_err(|e| format!("open: {e}"))?;
    let pidfd = stasis_sys::fs::pidfd_open(std::process::id() as i32)
        .map_err(|e| format!("pidfd_open: {e}"))?;
    let copy = stasis_sys::fs::pidfd_getfd(&pidfd, a.as_raw_fd())
        .map_err(|e| format!("pidfd_getfd: {e}"))?;
    Ok(format!(
        "copied fd {} as {}",
        a.as_raw_fd(),
        copy.as_raw_fd()
    ))
}

fn probe_tcp_repair() -> Probe {
    use stasis_sys::sock;
    let s = sock::socket(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_TCP)
        .map_err(|e| format!("socket: {e}"))?;
    sock::setsockopt_int(&s, libc::IPPROTO_TCP, sock::TCP_REPAIR, 1)
        .map_err(|e| format!("TCP_REPAIR: {e} (needs CAP_NET_ADMIN)"))?;
    Ok("a TCP socket entered repair mode".into())
}

/// A table of our own made and deleted, as a dump and its restore do.
fn probe_nft_netlock() -> Probe {
    use stasis_sys::netlock;
    let nft = netlock::nft_path().ok_or("nft not found (install nftables)")?;
    let table = netlock::new_name(std::process::id() as i32);
    netlock::lock(&table, true, &[])?;
    netlock::unlock(&table)?;
    Ok(format!("{} made and removed a table", nft.display()))
}

fn probe_memfd() -> Probe {
    const LEN: usize = 4096;
    const PATTERN: &[u8] = b"stasis-check memfd";
    // SAFETY: the name is a NUL-terminated literal; the returned fd is owned right away.
    let fd = unsafe { libc::memfd_create(c"stasis-check".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!("memfd_create: {}", io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(LEN as u64)
        .map_err(|e| format!("ftruncate: {e}"))?;
    let map = sys::Mapping::new(LEN, libc::MAP_SHARED, Some(file.as_raw_fd()))
        .map_err(|e| format!("mmap(MAP_SHARED): {e}"))?;
    // SAFETY: the mapping is LEN >= PATTERN.len() bytes, readable and writable, and ours alone.
    unsafe {
        std::ptr::copy_nonoverlapping(PATTERN.as_ptr(), map.addr().cast::<u8>(), PATTERN.len())
    };
    let mut back = [0u8; PATTERN.len()];
    file.read_exact_at(&mut back, 0)
        .map_err(|e| format!("pread: {e}"))?;
    if back != PATTERN {
        return Err("a write through the MAP_SHARED mapping is not visible through the fd".into());
    }
    Ok(format!(
        "{LEN}-byte memfd mapped MAP_SHARED; writes through the mapping reach the fd"
    ))
}

const PR_GET_AUXV: c_int = 0x4155_5856;
const AT_NULL: u64 = 0;
const AT_SYSINFO_EHDR: u64 = 33;

fn probe_pr_get_auxv(layout: &[(String, u64, u64)]) -> Probe {
    let mut auxv = [0u64; 256];
    let cap = std::mem::size_of_val(&auxv);
    // SAFETY: the kernel writes at most `cap` bytes into `auxv`.
    let r = unsafe {
        libc::prctl(
            PR_GET_AUXV,
            auxv.as_mut_ptr() as c_ulong,
            cap as c_ulong,
            0 as c_ulong,
            0 as c_ulong,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EINVAL) => "PR_GET_AUXV unknown (EINVAL): kernel older than 6.4".to_string(),
            _ => format!("PR_GET_AUXV: {e}"),
        });
    }
    // The kernel returns the size of its whole saved auxv, and copies min(that, cap) bytes.
    let copied = (r as usize).min(cap) / 8;
    let pairs: Vec<(u64, u64)> = auxv[..copied]
        .chunks_exact(2)
        .map(|p| (p[0], p[1]))
        .take_while(|&(key, _)| key != AT_NULL)
        .collect();
    if pairs.is_empty() {
        return Err(format!("PR_GET_AUXV returned {r} but no entries"));
    }
    let ehdr = pairs
        .iter()
        .find(|&&(key, _)| key == AT_SYSINFO_EHDR)
        .map(|&(_, v)| v);
    match (ehdr, vdso_text_start(layout)) {
        (Some(at), Some(vdso)) if at == vdso => Ok(format!(
            "{} entries; AT_SYSINFO_EHDR {at:#x} = [vdso] start",
            pairs.len()
        )),
        (Some(at), Some(vdso)) => Ok(format!(
            "{} entries; AT_SYSINFO_EHDR {at:#x} but [vdso] is at {vdso:#x} (moved?)",
            pairs.len()
        )),
        (None, Some(_)) => Err(format!(
            "{} entries but no AT_SYSINFO_EHDR although a [vdso] is mapped",
            pairs.len()
        )),
        (Some(at), None) => Ok(format!(
            "{} entries; AT_SYSINFO_EHDR {at:#x} (no [vdso] mapped)",
            pairs.len()
        )),
        (None, None) => Ok(format!("{} entries (no vDSO in this process)", pairs.len())),
    }
}

/// Asks clone3 for a pid that is free right now; ok when the child gets exactly that pid.
fn probe_clone3_set_tid() -> Probe {
    const ATTEMPTS: u32 = 5;
    let mut last = String::new();
    for attempt in 0..ATTEMPTS {
        let want = free_pid_candidate(attempt);
        // SAFETY: the child only calls `_exit`, which is async-signal-safe.
        let r = unsafe { stasis_sys::clone::clone3_with_pid(want) };
        let r = match r {
            Ok(0) => {
                // SAFETY: child side of the raw clone; no Rust runtime work may happen here.
                unsafe { libc::_exit(0) }
            }
            Ok(pid) => pid as i64,
            Err(errno) => match errno {
                // Someone took the pid between our check and the call: try another one.
                nix::errno::Errno::EEXIST => {
                    last = format!("pid {want} taken meanwhile");
                    continue;
                }
                nix::errno::Errno::EPERM => return Err("needs CAP_CHECKPOINT_RESTORE".to_string()),
                nix::errno::Errno::ENOSYS => {
                    return Err("clone3 not implemented (ENOSYS)".to_string())
                }
                e => return Err(format!("clone3(set_tid={want}): {e}")),
            },
        };
        let got = r as pid_t;
        let mut child = sys::Child::new(got);
        let status = child
            .wait(CHILD_TIMEOUT)
            .map_err(|e| format!("waitpid({got}): {e}"))?;
        if got != want {
            return Err(format!("asked for pid {want}, child got {got}"));
        }
        return match status {
            Some(st) if libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0 => {
                Ok(format!("child got the requested pid {want}"))
            }
            Some(st) => Err(format!("child {got} ended with status {st:#x}")),
            None => Err(format!("child {got} did not exit within {CHILD_TIMEOUT:?}")),
        };
    }
    Err(format!("no free pid after {ATTEMPTS} attempts ({last})"))
}

/// A pid well past the last allocated one that has no `/proc` entry (threads included: lookup of
/// `/proc/TID` works for every task even if `readdir` lists only leaders).
fn free_pid_candidate(attempt: u32) -> pid_t {
    const FIRST_USER_PID: i64 = 301;
    let read_num =
        |p: &str| -> Option<i64> { std::fs::read_to_string(p).ok()?.trim().parse().ok() };
    let last =
        read_num("/proc/sys/kernel/ns_last_pid").unwrap_or(i64::from(std::process::id() as i32));
    let pid_max = read_num("/proc/sys/kernel/pid_max")
        .unwrap_or(32768)
        .max(FIRST_USER_PID + 1);
    let mut c = last + 1000 + i64::from(attempt) * 97;
    for _ in 0..1000 {
        c = FIRST_USER_PID + (c - FIRST_USER_PID).rem_euclid(pid_max - FIRST_USER_PID);
        if !Path::new(&format!("/proc/{c}")).exists() {
            break;
        }
        c += 1;
    }
    c as pid_t
}

/// `PR_SET_MM_MAP_SIZE` returns `sizeof(struct prctl_mm_map)`: the interface is compiled in
/// (CONFIG_CHECKPOINT_RESTORE). Our own mm is left alone.
fn probe_pr_set_mm_map() -> Probe {
    let mut size: u32 = 0;
    // SAFETY: the kernel writes one u32 to `size`.
    let r = unsafe {
        libc::prctl(
            libc::PR_SET_MM,
            libc::PR_SET_MM_MAP_SIZE as c_ulong,
            &mut size as *mut u32 as c_ulong,
            0 as c_ulong,
            0 as c_ulong,
        )
    };
    if r < 0 {
        return Err(format!(
            "PR_SET_MM_MAP_SIZE: {}",
            io::Error::last_os_error()
        ));
    }
    if size == 0 {
        return Err("PR_SET_MM_MAP_SIZE reported a 0-byte struct".to_string());
    }
    Ok(format!("struct prctl_mm_map is {size} bytes"))
}

const ARCH_MAP_VDSO_64: c_int = 0x2003;

// Exit codes of the ARCH_MAP_VDSO_64 child. 1..=120 carry the errno of the first call.
const VDSO_EXIT_MAPPED_TWICE: c_int = 121;
const VDSO_EXIT_MUNMAP: c_int = 122;
/// 128 + errno: the second call (after unmapping) failed.
const VDSO_EXIT_REMAP_BASE: c_int = 128;

/// In a child: with the vDSO mapped the call must fail with EEXIST (the interface exists); after
/// unmapping the whole vvar+vdso set it must map a fresh one (what the restorer does).
fn probe_arch_map_vdso(span: Option<(u64, u64)>) -> Probe {
    // A hint only: the kernel may map elsewhere. 64 MiB below the current set is usually free.
    let hint = span.map_or(0x1000_0000, |(lo, _)| lo.saturating_sub(64 << 20)) as c_ulong;
    let body = move || -> c_int {
        let errno = || io::Error::last_os_error().raw_os_error().unwrap_or(0);
        // SAFETY (whole closure): raw syscalls in the forked child, nothing else.
        let r = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_MAP_VDSO_64, hint) };
        let Some((lo, hi)) = span else {
            // Nothing was mapped: success is the proof.
            return if r >= 0 { 0 } else { errno().clamp(1, 120) };
        };
        if r >= 0 {
            return VDSO_EXIT_MAPPED_TWICE;
        }
        let e = errno();
        if e != libc::EEXIST {
            return e.clamp(1, 120);
        }
        if unsafe { libc::munmap(lo as *mut c_void, (hi - lo) as usize) } != 0 {
            return VDSO_EXIT_MUNMAP;
        }
        let r = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_MAP_VDSO_64, hint) };
        if r < 0 {
            return VDSO_EXIT_REMAP_BASE + errno().clamp(1, 127);
        }
        0
    };
    // SAFETY: `body` only makes raw system calls and reads errno.
    let mut child = unsafe { sys::fork_child(body) }.map_err(|e| format!("fork: {e}"))?;
    let status = child
        .wait(CHILD_TIMEOUT)
        .map_err(|e| format!("waitpid: {e}"))?
        .ok_or_else(|| format!("child did not exit within {CHILD_TIMEOUT:?}"))?;
    if libc::WIFSIGNALED(status) {
        return Err(format!("child killed by signal {}", libc::WTERMSIG(status)));
    }
    let code = libc::WEXITSTATUS(status);
    let errno_name = |e: c_int| io::Error::from_raw_os_error(e).to_string();
    match code {
        0 if span.is_some() => Ok(
            "EEXIST while a vDSO is mapped; after unmapping it, a fresh vDSO+vvar was mapped"
                .into(),
        ),
        0 => Ok("mapped a vDSO into a process that had none".into()),
        libc::ENOSYS | libc::EINVAL => Err(format!(
            "absent: arch_prctl(ARCH_MAP_VDSO_64): {}",
            errno_name(code)
        )),
        VDSO_EXIT_MAPPED_TWICE => {
            Err("succeeded although a vDSO was already mapped (expected EEXIST)".into())
        }
        VDSO_EXIT_MUNMAP => Err("child could not unmap its vDSO areas".into()),
        c if c > VDSO_EXIT_REMAP_BASE => Err(format!(
            "EEXIST as expected, but mapping after unmap failed: {}",
            errno_name(c - VDSO_EXIT_REMAP_BASE)
        )),
        c => Err(format!("arch_prctl(ARCH_MAP_VDSO_64): {}", errno_name(c))),
    }
}

const UFFD_USER_MODE_ONLY: c_int = 1;
const UFFD_API: u64 = 0xAA;
const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}
const UFFDIO_API: u64 = iowr(0xAA, 0x3F, std::mem::size_of::<UffdioApi>());

/// `_IOWR(ty, nr, size)` on x86_64: dir (read|write = 3) at bit 30, size at 16, type at 8.
const fn iowr(ty: u8, nr: u8, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64
}

fn probe_userfaultfd() -> Probe {
    let base = libc::O_CLOEXEC | libc::O_NONBLOCK;
    let (fd, mode) = match sys::userfaultfd(base) {
        Ok(fd) => (fd, "all faults"),
        // vm.unprivileged_userfaultfd=0 without CAP_SYS_PTRACE: only user-mode faults allowed.
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            match sys::userfaultfd(base | UFFD_USER_MODE_ONLY) {
                Ok(fd) => (fd, "UFFD_USER_MODE_ONLY"),
                Err(e2) => return Err(format!("userfaultfd: {e}; with UFFD_USER_MODE_ONLY: {e2}")),
            }
        }
        Err(e) => return Err(format!("userfaultfd: {e}")),
    };
    let mut api = UffdioApi {
        api: UFFD_API,
        features: 0,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes one `struct uffdio_api`.
    if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api as *mut UffdioApi) } < 0 {
        return Err(format!("UFFDIO_API: {}", io::Error::last_os_error()));
    }
    let yes_no = |bit: u64| if api.features & bit != 0 { "yes" } else { "no" };
    Ok(format!(
        "features {:#x} ({mode}); PAGEFAULT_FLAG_WP {}, WP_ASYNC {}",
        api.features,
        yes_no(UFFD_FEATURE_PAGEFAULT_FLAG_WP),
        yes_no(UFFD_FEATURE_WP_ASYNC)
    ))
}

#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}
const _: () = assert!(std::mem::size_of::<PmScanArg>() == 96);

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

const PAGEMAP_SCAN: u64 = iowr(b'f', 16, std::mem::size_of::<PmScanArg>());
const PAGE_IS_PRESENT: u64 = 1 << 3;

/// One `PAGEMAP_SCAN` of our own [start, end) for pages in all of `category_mask`, into
/// `regions`; returns the regions found.
fn scan_self(
    start: u64,
    end: u64,
    category_mask: u64,
    regions: &mut [PageRegion],
) -> Result<&[PageRegion], String> {
    let pagemap =
        File::open("/proc/self/pagemap").map_err(|e| format!("/proc/self/pagemap: {e}"))?;
    let mut arg = PmScanArg {
        size: std::mem::size_of::<PmScanArg>() as u64,
        flags: 0,
        start,
        end,
        walk_end: 0,
        vec: regions.as_mut_ptr() as u64,
        vec_len: regions.len() as u64,
        max_pages: 0,
        category_inverted: 0,
        category_mask,
        category_anyof_mask: 0,
        return_mask: category_mask,
    };
    // SAFETY: the kernel reads `arg` and writes at most `vec_len` regions into `regions`.
    let r = unsafe {
        libc::ioctl(
            pagemap.as_raw_fd(),
            PAGEMAP_SCAN as _,
            &mut arg as *mut PmScanArg,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::ENOTTY) => {
                "no PAGEMAP_SCAN ioctl (ENOTTY): kernel older than 6.7".to_string()
            }
            _ => format!("PAGEMAP_SCAN: {e}"),
        });
    }
    let n = (r as usize).min(regions.len());
    Ok(&regions[..n])
}

/// Scans a 4-page anonymous mapping with pages 0 and 2 touched for present pages.
fn probe_pagemap_scan() -> Probe {
    let page = sys::page_size();
    let map = sys::Mapping::new(4 * page, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, None)
        .map_err(|e| format!("mmap: {e}"))?;
    let base = map.addr() as u64;
    // SAFETY: both offsets are inside our 4-page read/write mapping.
    unsafe {
        map.addr().cast::<u8>().write_volatile(1);
        map.addr().cast::<u8>().add(2 * page).write_volatile(1);
    }
    let mut regions = [PageRegion::default(); 8];
    let found = scan_self(base, base + 4 * page as u64, PAGE_IS_PRESENT, &mut regions)?;
    let r = found.len();
    let expected = [
        (base, base + page as u64),
        (base + 2 * page as u64, base + 3 * page as u64),
    ];
    let matches = found.len() == expected.len()
        && found
            .iter()
            .zip(expected)
            .all(|(f, (s, e))| f.start == s && f.end == e);
    let verdict = if matches {
        "as expected"
    } else {
        "expected pages 0 and 2 (large folios?)"
    };
    Ok(format!(
        "{r} present region(s) in a 4-page mapping with pages 0 and 2 touched, {verdict}"
    ))
}

const PAGE_IS_WRITTEN: u64 = 1 << 1;

/// What incremental dumps (`pre-dump`, `--prev-images-dir`) rely on, the way they use it: a
/// 4-page mapping, written, registered with an async write-protect userfaultfd and
/// protected; then page 1 is written, and `PAGEMAP_SCAN` must report page 1 alone written.
fn probe_mem_tracking() -> Probe {
    let page = sys::page_size();
    let map = sys::Mapping::new(4 * page, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, None)
        .map_err(|e| format!("mmap: {e}"))?;
    let base = map.addr() as u64;
    let poke = |k: usize| {
        // SAFETY: page k < 4 of our read/write mapping.
        unsafe {
            map.addr()
                .cast::<u8>()
                .add(k * page)
                .write_volatile(k as u8 + 1)
        }
    };
    (0..4).for_each(poke);
    let uffd = sys::userfaultfd(libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY)
        .map_err(|e| format!("userfaultfd: {e}"))?;
    let fd = uffd.as_raw_fd();
    let len = 4 * page as u64;
    stasis_sys::uffd::api_wp_async(fd)
        .map_err(|e| format!("UFFDIO_API with WP_ASYNC | WP_UNPOPULATED: {e}"))?;
    stasis_sys::uffd::register_wp(fd, base, len)
        .map_err(|e| format!("UFFDIO_REGISTER (write protect): {e}"))?;
    stasis_sys::uffd::write_protect(fd, base, len)
        .map_err(|e| format!("UFFDIO_WRITEPROTECT: {e}"))?;
    poke(1);
    let mut regions = [PageRegion::default(); 8];
    let found = scan_self(base, base + len, PAGE_IS_WRITTEN, &mut regions)?;
    let one = base + page as u64;
    if found.len() == 1 && found[0].start == one && found[0].end == one + page as u64 {
        Ok("async write-protect userfaultfd + PAGEMAP_SCAN PAGE_IS_WRITTEN: the one page written since it was protected, and only it, reads as written".into())
    } else {
        Err(format!(
            "after protecting 4 pages and writing page 1, PAGEMAP_SCAN reports {} written region(s) instead of page 1 alone",
            found.len()
        ))
    }
}

const PM_SOFT_DIRTY: u64 = 1 << 55;
const PM_PRESENT: u64 = 1 << 63;

/// Clears our soft-dirty bits, writes a page and checks pagemap bit 55. A kernel without
/// CONFIG_MEM_SOFT_DIRTY accepts "4" in clear_refs but never sets the bit.
/// The only effect is on this process: its pages become write-protected until next written.
fn probe_soft_dirty() -> Probe {
    let page = sys::page_size();
    let map = sys::Mapping::new(page, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, None)
        .map_err(|e| format!("mmap: {e}"))?;
    let byte = map.addr().cast::<u8>();
    // SAFETY: `byte` is the first byte of our read/write page.
    unsafe { byte.write_volatile(1) };
    let mut clear_refs = std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/self/clear_refs")
        .map_err(|e| format!("/proc/self/clear_refs: {e}"))?;
    if let Err(e) = clear_refs.write_all(b"4") {
        return Err(match e.raw_os_error() {
            Some(libc::EINVAL) => "clear_refs rejects \"4\" (EINVAL)".to_string(),
            _ => format!("clear_refs: {e}"),
        });
    }
    let pagemap =
        File::open("/proc/self/pagemap").map_err(|e| format!("/proc/self/pagemap: {e}"))?;
    let entry_at = (map.addr() as u64 / page as u64) * 8;
    let entry = || -> Result<u64, String> {
        let mut b = [0u8; 8];
        pagemap
            .read_exact_at(&mut b, entry_at)
            .map_err(|e| format!("pagemap read: {e}"))?;
        Ok(u64::from_le_bytes(b))
    };
    let after_clear = entry()?;
    // SAFETY: as above.
    unsafe { byte.write_volatile(2) };
    let after_write = entry()?;
    if after_write & PM_PRESENT == 0 {
        return Err(format!(
            "written page not present in pagemap ({after_write:#x})"
        ));
    }
    match (after_clear & PM_SOFT_DIRTY != 0, after_write & PM_SOFT_DIRTY != 0) {
        (false, true) => Ok("pagemap bit 55 clear after clear_refs \"4\", set after a write".into()),
        (true, _) => Err("pagemap bit 55 still set right after clear_refs \"4\"".into()),
        (false, false) => {
            Err("clear_refs accepts \"4\" but a write never sets pagemap bit 55 (no CONFIG_MEM_SOFT_DIRTY)".into())
        }
    }
}

/// Reads a value out of a child's copy of our memory.
fn probe_process_vm_readv() -> Probe {
    let magic = Box::new(0x5354_4153_4953_u64 ^ u64::from(std::process::id()));
    // Make sure the store happens before fork: the child must inherit it.
    std::hint::black_box(&*magic);
    let child = sys::fork_sleeper().map_err(|e| format!("fork: {e}"))?;
    let mut got: u64 = 0;
    let local = libc::iovec {
        iov_base: (&mut got as *mut u64).cast(),
        iov_len: 8,
    };
    let remote = libc::iovec {
        iov_base: (&*magic as *const u64 as *mut u64).cast(),
        iov_len: 8,
    };
    // SAFETY: `local` points at our 8-byte `got`; `remote` is only read, in the child.
    let n = unsafe { libc::process_vm_readv(child.pid, &local, 1, &remote, 1, 0) };
    if n < 0 {
        return Err(format!("process_vm_readv: {}", io::Error::last_os_error()));
    }
    if n != 8 || got != *magic {
        return Err(format!(
            "read {n} bytes, value {got:#x}, expected {:#x}",
            *magic
        ));
    }
    Ok("read 8 bytes from a child; value matches".to_string())
}

// ---------------------------------------------------------------------------------------------
// Raw glue: children, waits, mappings, the syscalls nix lacks
// ---------------------------------------------------------------------------------------------

mod sys {
    use super::*;

    /// A child process we forked. Dropping it kills and reaps it unless it was already reaped.
    pub struct Child {
        pub pid: pid_t,
        reaped: bool,
    }

    impl Child {
        pub fn new(pid: pid_t) -> Self {
            Child { pid, reaped: false }
        }

        /// Waits (stops included, `__WALL`) at most `timeout`; `None` if nothing happened.
        pub fn wait(&mut self, timeout: Duration) -> io::Result<Option<c_int>> {
            let deadline = std::time::Instant::now() + timeout;
            loop {
                let mut status: c_int = 0;
                // SAFETY: plain waitpid on our own child.
                let r =
                    unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG | libc::__WALL) };
                if r < 0 {
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() == Some(libc::EINTR) {
                        continue;
                    }
                    return Err(e);
                }
                if r == self.pid {
                    if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
                        self.reaped = true;
                    }
                    return Ok(Some(status));
                }
                if std::time::Instant::now() >= deadline {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    impl Drop for Child {
        fn drop(&mut self) {
            if self.reaped {
                return;
            }
            // SAFETY: the pid is our unreaped child, so it cannot have been recycled.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            let deadline = std::time::Instant::now() + CHILD_TIMEOUT;
            while !self.reaped && std::time::Instant::now() < deadline {
                if self.wait(Duration::from_millis(100)).is_err() {
                    break;
                }
            }
            if !self.reaped {
                tracing::warn!(pid = self.pid, "probe child not reaped");
            }
        }
    }

    /// Forks; the child runs `body` and `_exit`s with its result.
    ///
    /// # Safety
    /// We may be multi-threaded: `body` must be async-signal-safe (raw syscalls only, no
    /// allocation, no locks) and must not panic.
    pub unsafe fn fork_child(body: impl FnOnce() -> c_int) -> io::Result<Child> {
        match libc::fork() {
            -1 => Err(io::Error::last_os_error()),
            0 => {
                let code = body();
                libc::_exit(code)
            }
            pid => Ok(Child::new(pid)),
        }
    }

    /// A child that sleeps for at most ~30 s and dies with the thread that forked it.
    pub fn fork_sleeper() -> io::Result<Child> {
        let body = || -> c_int {
            let tick = libc::timespec {
                tv_sec: 0,
                tv_nsec: 100_000_000,
            };
            // SAFETY: raw syscalls only.
            unsafe {
                libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as c_ulong,
                    0 as c_ulong,
                    0 as c_ulong,
                    0 as c_ulong,
                );
                for _ in 0..300 {
                    libc::nanosleep(&tick, std::ptr::null_mut());
                }
            }
            0
        };
        // SAFETY: `body` makes raw syscalls only.
        unsafe { fork_child(body) }
    }

    pub fn ptrace(
        req: libc::c_uint,
        pid: pid_t,
        addr: usize,
        data: usize,
    ) -> io::Result<libc::c_long> {
        // SAFETY: every caller passes `data` pointing at memory sized for `req`, or 0.
        let r = unsafe { libc::ptrace(req, pid, addr as *mut c_void, data as *mut c_void) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }

    pub fn userfaultfd(flags: c_int) -> io::Result<OwnedFd> {
        // SAFETY: userfaultfd takes only flags; the returned fd is owned right away.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as c_int) })
    }

    pub fn page_size() -> usize {
        // SAFETY: sysconf has no preconditions.
        let r = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if r > 0 {
            r as usize
        } else {
            4096
        }
    }

    /// A read/write mapping, unmapped on drop.
    pub struct Mapping {
        addr: *mut c_void,
        len: usize,
    }

    impl Mapping {
        pub fn new(len: usize, flags: c_int, fd: Option<c_int>) -> io::Result<Self> {
            // SAFETY: a fresh mapping at an address of the kernel's choice; nothing is replaced.
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    flags,
                    fd.unwrap_or(-1),
                    0,
                )
            };
            if addr == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            Ok(Mapping { addr, len })
        }

        pub fn addr(&self) -> *mut c_void {
            self.addr
        }
    }

    impl Drop for Mapping {
        fn drop(&mut self) {
            // SAFETY: we mapped exactly this range and hand out no references that outlive us.
            unsafe { libc::munmap(self.addr, self.len) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feature(name: &'static str, required: bool, ok: bool) -> Feature {
        Feature {
            name,
            required,
            ok,
            detail: String::new(),
        }
    }

    fn report(features: Vec<Feature>) -> CheckReport {
        CheckReport {
            kernel: "test".into(),
            features,
            vdso_layout: Vec::new(),
        }
    }

    #[test]
    fn all_required_ok_ignores_missing_optional_features() {
        let r = report(vec![feature("a", true, true), feature("b", false, false)]);
        assert!(r.all_required_ok());
    }

    #[test]
    fn all_required_ok_fails_on_one_missing_required_feature() {
        let r = report(vec![
            feature("a", true, true),
            feature("b", true, false),
            feature("c", false, true),
        ]);
        assert!(!r.all_required_ok());
        assert_eq!(
            r.missing_required().map(|f| f.name).collect::<Vec<_>>(),
            ["b"]
        );
    }

    #[test]
    fn all_required_ok_on_empty_report() {
        assert!(report(Vec::new()).all_required_ok());
    }

    #[test]
    fn table_labels_each_status() {
        let mut r = report(vec![
            feature("a", true, true),
            feature("b", true, false),
            feature("c", false, false),
        ]);
        r.vdso_layout = vec![
            ("[vvar]".into(), 0x1000, 16384),
            ("[vdso]".into(), 0x5000, 8192),
        ];
        let t = render_table(&r);
        assert!(t.lines().any(|l| l.starts_with("ok ") && l.contains(" a ")));
        assert!(t
            .lines()
            .any(|l| l.starts_with("MISSING ") && l.contains(" b ")));
        assert!(t
            .lines()
            .any(|l| l.starts_with("absent (optional) ") && l.contains(" c ")));
        assert!(t.contains("vDSO layout: [vvar] 16K, [vdso] 8K"));
        assert!(t.contains("missing required features: b"));
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(16384), "16K");
        assert_eq!(human_size(2 << 20), "2M");
        assert_eq!(human_size(100), "100B");
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(UFFDIO_API, 0xC018_AA3F);
        assert_eq!(PAGEMAP_SCAN, 0xC060_6610);
    }

    #[test]
    fn run_checks_finds_the_vdso() {
        let r = run_checks();
        assert!(!r.kernel.is_empty());
        assert_eq!(r.features.len(), 16);
        assert!(r.features.iter().any(|x| x.name == "mem_tracking"));
        for f in ["kcmp", "pidfd_getfd"] {
            let probe = r.features.iter().find(|x| x.name == f).expect(f);
            assert!(probe.ok, "{f}: {}", probe.detail);
        }
        let vdso = r.vdso_layout.iter().find(|(name, _, _)| name == "[vdso]");
        let (_, start, size) = vdso.expect("no [vdso] in the layout");
        assert!(*start != 0 && *size > 0 && size % 4096 == 0);
        // JSON form stays serialisable.
        assert!(serde_json::to_string(&r).is_ok());
    }
}
