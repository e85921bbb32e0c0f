//! Running a blob inside a frozen process, and curing the process afterwards.
//!
//! Sequence (all system calls run by the target's main thread through `syscall` + a park loop
//! written at the start of its first executable mapping, stepped with `PTRACE_SYSCALL`):
//!
//! 1. save GPRs, the XSAVE area and the signal mask; block every signal but SIGTRAP;
//! 2. `memfd_create` + `ftruncate` in the target; the host opens `/proc/PID/fd/N` and maps it
//!    too; the target maps it `MAP_SHARED` RWX and closes the fd; the thread is moved to the
//!    blob's park loop and the site's original bytes are put back;
//! 3. the host copies the relocated blob into its view; for each command it writes a `Command`,
//!    points rip at the blob entry (rsp at the region's own stack, rdi at the command area),
//!    lets it run until the blob sets the done word, and interrupts it in its park loop;
//! 4. cure: the target unmaps the region, then XSAVE, the signal mask and last the GPRs are
//!    put back, then the site's bytes.
//!
//! Invariants. From the first change to the target until `cure` returns, `Parasite` owns the
//! undo: dropping it without curing cures (best effort), so an error anywhere leaves the process
//! as it was. Injected contexts carry `orig_rax = -1` so the kernel never "restarts" them; the
//! saved registers carry the original `orig_rax`/`rax`, so a thread stopped inside an
//! interruptible system call restarts it exactly as if it had never been touched.
//!
//! If this stasis dies at any instant, the kernel lets the thread go where it is, and it must
//! come to no harm: injected code never ends in a trap (a fatal SIGTRAP once untraced) but in a
//! park loop that waits, with signals blocked, for the guardian (`guardian.rs`) to cure it; the
//! site keeps its park loop while the thread may be inside it; and what the guardian needs to
//! cure (saved registers, the site's bytes) is sent to it before each change is made.

use crate::blob::Blob;
use crate::error::{InfectError, Result};
use crate::guardian::{self, Note};
use nix::errno::Errno;
use nix::unistd::Pid;
use stasis_abi::{
    Command, CommandId, ReplyHeader, Status, DONE_OFFSET, MAGIC, PARK_CODE, PARK_OFFSET,
    PROTOCOL_VERSION, REPLY_OFFSET,
};
use stasis_sys::ptrace::{self as sys, Regs, Wait};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

const PAGE: usize = 4096;
pub(crate) const SITE_LEN: usize = 32;
/// The name of the region's memfd, as the target's maps and fd links show it (the guardian
/// finds what a dead stasis left by it).
pub(crate) const MEMFD_NAME: &[u8] = b"stasis-parasite";
/// `syscall`, the park loop, `int3` padding, then the memfd name `memfd_create` is given.
pub(crate) const SITE_CODE: [u8; SITE_LEN] = site_code();
const MEMFD_NAME_OFF: u64 = 16;
const STACK_SIZE: usize = 64 * 1024;

const fn site_code() -> [u8; SITE_LEN] {
    let mut c = [0xccu8; SITE_LEN];
    c[0] = 0x0f;
    c[1] = 0x05;
    let mut i = 0;
    while i < PARK_CODE.len() {
        c[2 + i] = PARK_CODE[i];
        i += 1;
    }
    let mut j = 0;
    while j < MEMFD_NAME.len() {
        c[MEMFD_NAME_OFF as usize + j] = MEMFD_NAME[j];
        j += 1;
    }
    c[MEMFD_NAME_OFF as usize + MEMFD_NAME.len()] = 0;
    c
}
const _: () = assert!(2 + PARK_CODE.len() <= MEMFD_NAME_OFF as usize);
const _: () = assert!(MEMFD_NAME_OFF as usize + MEMFD_NAME.len() < SITE_LEN);

const SIGTRAP: i32 = libc::SIGTRAP;
/// The signal mask of a thread running injected code: everything blocked but SIGTRAP.
pub(crate) const ALL_BUT_TRAP: u64 = !(1u64 << (SIGTRAP - 1));

/// How the region is sized and placed. The reply area bounds what one command can return;
/// the plan area what a restore plan can carry.
#[derive(Clone, Copy, Debug)]
pub struct RegionSize {
    pub reply_cap: usize,
    pub plan_cap: usize,
    /// Map the region exactly here (`MAP_FIXED_NOREPLACE`) instead of where the kernel likes:
    /// a restore must keep it clear of every address the restored process will use.
    pub at: Option<u64>,
}

impl Default for RegionSize {
    fn default() -> Self {
        RegionSize {
            reply_cap: 64 * 1024,
            plan_cap: 0,
            at: None,
        }
    }
}

impl RegionSize {
    /// Bytes the region will take for `blob`, so a caller can find room for it.
    pub fn total_len(&self, blob: &Blob) -> usize {
        let (blob_len, cmd_len) = self.parts(blob);
        blob_len + cmd_len + STACK_SIZE
    }

    fn parts(&self, blob: &Blob) -> (usize, usize) {
        let blob_len = blob.len().next_multiple_of(PAGE);
        let cmd_len = (self.plan_off() + self.plan_cap).next_multiple_of(PAGE);
        (blob_len, cmd_len)
    }

    /// Offset of the plan area inside the command area.
    fn plan_off(&self) -> usize {
        (REPLY_OFFSET + std::mem::size_of::<ReplyHeader>() + self.reply_cap).next_multiple_of(64)
    }
}

/// What a thread looked like before we touched it.
#[derive(Clone)]
pub(crate) struct Saved {
    pub(crate) regs: Regs,
    pub(crate) xstate: Vec<u8>,
    pub(crate) sigmask: u64,
}

impl Saved {
    /// Thread `tid`'s state now.
    fn read(tid: Pid) -> Result<Saved> {
        let perr = |op| {
            move |errno| InfectError::Ptrace {
                op,
                tid: tid.as_raw(),
                errno,
            }
        };
        Ok(Saved {
            regs: sys::get_regs(tid).map_err(perr("GETREGS"))?,
            xstate: sys::get_xstate(tid).map_err(perr("GETREGSET(XSTATE)"))?,
            sigmask: sys::get_sigmask(tid).map_err(perr("GETSIGMASK"))?,
        })
    }
}

/// The host's view of the shared memfd region.
struct HostMap {
    ptr: *mut u8,
    len: usize,
}

impl HostMap {
    fn slice_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr/len describe a live MAP_SHARED mapping owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// Copies `len` bytes at `off` out of the region. Volatile: the target may be writing.
    fn copy_out(&self, off: usize, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        let end = off.saturating_add(len).min(self.len);
        for (i, slot) in v.iter_mut().enumerate().take(end.saturating_sub(off)) {
            // SAFETY: off + i < end <= self.len, inside the mapping.
            *slot = unsafe { std::ptr::read_volatile(self.ptr.add(off + i)) };
        }
        v
    }
}

impl Drop for HostMap {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping exactly once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

struct Region {
    host: HostMap,
    /// Where the target sees the region.
    remote: u64,
    len: usize,
    cmd_off: usize,
    cmd_len: usize,
    reply_cap: usize,
    plan_off: usize,
    plan_cap: usize,
    stack_top: usize,
}

/// A blob living in a frozen process. Create with `Parasite::infect`, finish with `cure`.
pub struct Parasite<'s> {
    pid: i32,
    tid: Pid,
    _seized: &'s mut crate::Seized,
    mem: File,
    saved: Saved,
    site: u64,
    site_orig: [u8; SITE_LEN],
    /// memfd number in the target while it is open there.
    remote_fd: Option<i32>,
    region: Option<Region>,
    entry: u64,
    /// The site holds `SITE_CODE`, not its own bytes.
    site_dirty: bool,
    gone: bool,
    cured: bool,
    /// Threads the blob created (traced clones), not yet adopted.
    cloned: Vec<i32>,
}

impl<'s> Parasite<'s> {
    /// Puts `blob` into the frozen process `seized`.
    pub fn infect(seized: &'s mut crate::Seized, blob: &Blob, size: RegionSize) -> Result<Self> {
        let pid = seized.pid();
        let regs = Saved::read(Pid::from_raw(pid))?.regs;
        if regs.cs != crate::seize::USER_CS_64 {
            // Nothing is changed yet: the process is let go as it was.
            return Err(InfectError::NotX86_64 {
                pid,
                what: format!("runs 32-bit code (code segment {:#x})", regs.cs),
            });
        }
        let mut p = Self::at_site(seized, None)?;
        p.entry = blob.entry();
        blob.check_park()?;
        // From here on, Drop undoes whatever was done; the guardian is told first.
        p.tell_guardian()?;
        p.block_signals()?;
        p.map_region(blob, size)?;
        if let Some(r) = p.region.as_ref() {
            guardian::note(&Note::Park {
                pid,
                addr: r.remote + p.entry + PARK_OFFSET,
            })?;
        }
        p.park_in_region()?;
        Ok(p)
    }

    /// For the guardian, after a stasis died: with the main thread's own state back (or never
    /// changed), unmaps `regions` and closes `fds` (what is left of the region) through the
    /// site, then puts the site's own bytes back. `site`: where the dead stasis had written
    /// and the bytes it found there, if it got that far.
    pub(crate) fn recover(
        seized: &'s mut crate::Seized,
        site: Option<(u64, [u8; SITE_LEN])>,
        regions: &[(u64, u64)],
        fds: &[i32],
    ) -> Result<()> {
        let mut p = Self::at_site(seized, site)?;
        if regions.is_empty() && fds.is_empty() && !p.site_dirty {
            p.cured = true;
            return Ok(());
        }
        // Blocked while the calls run, as in `infect`; `cure_inner` puts the mask back.
        p.block_signals()?;
        for &(start, end) in regions {
            p.remote_syscall("munmap", libc::SYS_munmap, [start, end - start, 0, 0, 0, 0])?;
        }
        for &fd in fds {
            p.remote_syscall("close", libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0])?;
        }
        p.cure_inner()
    }

    /// The process `seized` (frozen, no region of ours in it) ready for system calls through
    /// its injection site: `site` is where a dead stasis had written and the bytes it found
    /// there, if it got that far; otherwise the site is found afresh.
    fn at_site(seized: &'s mut crate::Seized, site: Option<(u64, [u8; SITE_LEN])>) -> Result<Self> {
        let pid = seized.pid();
        let tid = Pid::from_raw(pid);
        let saved = Saved::read(tid)?;
        let mem = open_proc_rw(pid, "mem", "opening memory")?;
        let read_at = |addr: u64| -> Result<[u8; SITE_LEN]> {
            let mut b = [0u8; SITE_LEN];
            mem.read_exact_at(&mut b, addr)
                .map_err(|err| InfectError::Io {
                    pid,
                    what: "reading code at the injection site",
                    err,
                })?;
            Ok(b)
        };
        let (site, site_orig, site_dirty) = match site {
            Some((addr, orig)) => {
                let cur = read_at(addr)?;
                if guardian::site_is_injected(&cur) {
                    (addr, orig, true)
                } else {
                    (addr, cur, false)
                }
            }
            None => {
                let addr = injection_site(pid, None)?;
                (addr, read_at(addr)?, false)
            }
        };
        Ok(Parasite {
            pid,
            tid,
            _seized: seized,
            mem,
            saved,
            site,
            site_orig,
            remote_fd: None,
            region: None,
            entry: 0,
            site_dirty,
            gone: false,
            cured: false,
            cloned: Vec::new(),
        })
    }

    /// Tells the guardian what undoes the changes about to be made: the main thread's state
    /// and the site's own bytes.
    fn tell_guardian(&self) -> Result<()> {
        let pid = self.pid;
        guardian::note(&Note::Thread {
            pid,
            tid: pid,
            saved: Box::new(self.saved.clone()),
        })?;
        guardian::note(&Note::Site {
            pid,
            addr: self.site,
            orig: self.site_orig,
        })
    }

    fn block_signals(&mut self) -> Result<()> {
        let pid = self.pid;
        sys::set_sigmask(self.tid, ALL_BUT_TRAP).map_err(|errno| InfectError::Ptrace {
            op: "SETSIGMASK",
            tid: pid,
            errno,
        })
    }

    /// Forks the frozen process into a copy-on-write snapshot of its memory, for the host to
    /// read while the process itself runs on. The snapshot is the main thread's copy, made
    /// with `clone(CLONE_FILES | CLONE_FS | CLONE_UNTRACED)` and no exit signal: it shares the
    /// descriptor table (so it holds no file of the process open on its own), its death sends
    /// the process no SIGCHLD, and only a `__WALL` wait sees it. It starts in the site's park
    /// loop with every signal but SIGTRAP blocked, and waits there until it is killed; it maps
    /// the region too, which is how a guardian finds it (`snapshots_of`). The caller kills it
    /// and has the process reap it (`reap_children`).
    pub fn fork_snapshot(&mut self) -> Result<i32> {
        let pid = self.pid;
        guardian::note(&Note::Snapshot { pid, child: 0 })?;
        let flags = (libc::CLONE_FILES | libc::CLONE_FS | libc::CLONE_UNTRACED) as u64;
        let child =
            self.remote_syscall("clone (snapshot)", libc::SYS_clone, [flags, 0, 0, 0, 0, 0])?;
        let child = i32::try_from(child).map_err(|_| InfectError::BadReply {
            pid,
            why: format!("clone returned {child:#x}"),
        })?;
        guardian::note(&Note::Snapshot { pid, child })?;
        // Out of the site again: between commands no byte of the process's code is changed
        // (the snapshot keeps its own copy of the site's page, with the park loop).
        self.park_in_region()?;
        Ok(child)
    }

    /// A userfaultfd of the frozen process's memory, made by the process itself (the kernel
    /// ties one to the mm of its caller) and handed to the host: the process's own
    /// descriptor is closed again at once, so its table is as it was. Its ioctls, made by the
    /// host, act on the process's memory.
    pub fn make_userfaultfd(&mut self) -> Result<std::os::fd::OwnedFd> {
        let pid = self.pid;
        // UFFD_USER_MODE_ONLY: no privilege needed; write-protect tracking in async mode
        // never delivers a fault to anyone.
        const UFFD_USER_MODE_ONLY: u64 = 1;
        let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64 | UFFD_USER_MODE_ONLY;
        // The kernel gives the lowest free number: the guardian closes it if this stasis
        // dies before it does.
        guardian::note(&Note::Uffd {
            pid,
            fd: lowest_free_fd(pid),
        })?;
        let fd =
            self.remote_syscall("userfaultfd", libc::SYS_userfaultfd, [flags, 0, 0, 0, 0, 0])?;
        let taken = stasis_sys::fs::pidfd_open(pid)
            .and_then(|pidfd| stasis_sys::fs::pidfd_getfd(&pidfd, fd as i32));
        let closed = self.remote_syscall("close", libc::SYS_close, [fd, 0, 0, 0, 0, 0]);
        self.park_in_region()?;
        closed?;
        guardian::note(&Note::UffdGone { pid })?;
        taken.map_err(|errno| InfectError::Ptrace {
            op: "pidfd_getfd (userfaultfd)",
            tid: pid,
            errno,
        })
    }

    /// Has the frozen process `seized` reap its dead snapshot children `children` (each one a
    /// zombie by now, or already reaped by the process itself: ECHILD is fine).
    pub fn reap_children(seized: &'s mut crate::Seized, children: &[i32]) -> Result<()> {
        let mut p = Self::at_site(seized, None)?;
        p.tell_guardian()?;
        p.block_signals()?;
        for &child in children {
            match p.remote_syscall(
                "wait4 (snapshot)",
                libc::SYS_wait4,
                [child as u64, 0, libc::__WALL as u64, 0, 0, 0],
            ) {
                Ok(_)
                | Err(InfectError::RemoteSyscall {
                    errno: Errno::ECHILD,
                    ..
                }) => {}
                Err(e) => {
                    let _ = p.cure_inner();
                    return Err(e);
                }
            }
        }
        p.cure_inner()
    }

    /// Moves the main thread from the site's park loop to the region's, and puts the site's
    /// bytes back: between commands no byte of the target's own code is changed.
    fn park_in_region(&mut self) -> Result<()> {
        let Some(r) = self.region.as_ref() else {
            return Ok(());
        };
        let mut regs = self.saved.regs;
        regs.rip = r.remote + self.entry + PARK_OFFSET;
        regs.orig_rax = u64::MAX;
        let pid = self.pid;
        sys::set_regs(self.tid, &regs).map_err(|errno| InfectError::Ptrace {
            op: "SETREGS",
            tid: pid,
            errno,
        })?;
        self.clean_site()
    }

    fn clean_site(&mut self) -> Result<()> {
        if self.site_dirty {
            self.write_site(&self.site_orig.clone())?;
            self.site_dirty = false;
        }
        Ok(())
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Address of the shared region in the target, and its length.
    pub fn remote_region(&self) -> Option<(u64, usize)> {
        self.region.as_ref().map(|r| (r.remote, r.len))
    }

    fn map_region(&mut self, blob: &Blob, size: RegionSize) -> Result<()> {
        let (blob_len, cmd_len) = size.parts(blob);
        let len = size.total_len(blob);

        let fd = self.remote_syscall(
            "memfd_create",
            libc::SYS_memfd_create,
            [
                self.site + MEMFD_NAME_OFF,
                libc::MFD_CLOEXEC as u64,
                0,
                0,
                0,
                0,
            ],
        )? as i32;
        self.remote_fd = Some(fd);
        self.remote_syscall(
            "ftruncate",
            libc::SYS_ftruncate,
            [fd as u64, len as u64, 0, 0, 0, 0],
        )?;

        let pid = self.pid;
        let file = open_proc_rw(pid, &format!("fd/{fd}"), "opening the shared memfd")?;
        // SAFETY: a fresh shared mapping of a file we hold open; nothing else aliases it here.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(InfectError::Io {
                pid,
                what: "mapping the shared memfd",
                err: std::io::Error::last_os_error(),
            });
        }
        let mut host = HostMap {
            ptr: ptr.cast(),
            len,
        };

        let prot = (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64;
        let (addr, flags) = match size.at {
            Some(at) => (at, libc::MAP_SHARED | libc::MAP_FIXED_NOREPLACE),
            None => (0, libc::MAP_SHARED),
        };
        let remote = self.remote_syscall(
            "mmap",
            libc::SYS_mmap,
            [addr, len as u64, prot, flags as u64, fd as u64, 0],
        )?;
        if size.at.is_some_and(|at| at != remote) {
            // Old kernels ignore MAP_FIXED_NOREPLACE and treat the address as a hint.
            let _ =
                self.remote_syscall("munmap", libc::SYS_munmap, [remote, len as u64, 0, 0, 0, 0]);
            return Err(InfectError::RemoteSyscall {
                pid,
                name: "mmap (fixed)",
                errno: Errno::EEXIST,
            });
        }
        blob.load_into(host.slice_mut(), remote)?;
        self.region = Some(Region {
            host,
            remote,
            len,
            cmd_off: blob_len,
            cmd_len,
            reply_cap: size.reply_cap,
            plan_off: size.plan_off(),
            plan_cap: size.plan_cap,
            stack_top: len,
        });
        self.remote_syscall("close", libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0])?;
        self.remote_fd = None;
        Ok(())
    }

    /// Runs one system call in the target's main thread and returns its result. The thread
    /// is left in the site's park loop, which stays written until it is moved out.
    pub fn remote_syscall(&mut self, name: &'static str, nr: i64, args: [u64; 6]) -> Result<u64> {
        let mut regs = self.saved.regs;
        regs.rip = self.site;
        regs.rax = nr as u64;
        regs.orig_rax = u64::MAX;
        regs.rdi = args[0];
        regs.rsi = args[1];
        regs.rdx = args[2];
        regs.r10 = args[3];
        regs.r8 = args[4];
        regs.r9 = args[5];
        if !self.site_dirty {
            self.write_site(&SITE_CODE)?;
            self.site_dirty = true;
        }
        let pid = self.pid;
        let tid = self.tid;
        let perr = |op| {
            move |errno| InfectError::Ptrace {
                op,
                tid: pid,
                errno,
            }
        };
        sys::set_regs(tid, &regs).map_err(perr("SETREGS"))?;
        // Entry, then exit: two system-call stops.
        for _ in 0..2 {
            sys::syscall_step(tid).map_err(perr("SYSCALL"))?;
            self.wait_syscall_stop(tid)?;
        }
        let after = sys::get_regs(tid).map_err(perr("GETREGS"))?;
        let ret = after.rax as i64;
        if (-4095..0).contains(&ret) {
            return Err(InfectError::RemoteSyscall {
                pid: self.pid,
                name,
                errno: Errno::from_raw(-ret as i32),
            });
        }
        Ok(after.rax)
    }

    fn wait_syscall_stop(&mut self, tid: Pid) -> Result<()> {
        let pid = self.pid;
        loop {
            let w = sys::wait(tid, false).map_err(|errno| InfectError::Ptrace {
                op: "wait",
                tid: pid,
                errno,
            })?;
            match w {
                Wait::Stopped {
                    sig: sys::SYSCALL_STOP,
                    ..
                } => return Ok(()),
                // A leftover interrupt: step on.
                Wait::Stopped { event, .. } if event == sys::PTRACE_EVENT_STOP => {
                    sys::syscall_step(tid).map_err(|errno| InfectError::Ptrace {
                        op: "SYSCALL",
                        tid: pid,
                        errno,
                    })?;
                }
                other => return Err(self.unexpected(tid, other)),
            }
        }
    }

    /// The error for a stop injected code should not have made.
    fn unexpected(&mut self, tid: Pid, w: Wait) -> InfectError {
        let pid = self.pid;
        match w {
            Wait::Stopped { sig, event: 0 } => match sys::get_siginfo(tid) {
                Ok(info) => self.fault(sig, &info),
                Err(errno) => InfectError::Ptrace {
                    op: "GETSIGINFO",
                    tid: pid,
                    errno,
                },
            },
            Wait::Stopped { sig, event } => InfectError::UnexpectedStop { pid, sig, event },
            Wait::Exited(code) => {
                self.gone = true;
                InfectError::TargetGone {
                    pid,
                    how: format!("exit status {code}"),
                }
            }
            Wait::Killed(sig) => {
                self.gone = true;
                InfectError::TargetGone {
                    pid,
                    how: format!("killed by signal {sig}"),
                }
            }
            Wait::Running => InfectError::UnexpectedStop {
                pid,
                sig: 0,
                event: 0,
            },
        }
    }

    fn write_site(&mut self, code: &[u8; SITE_LEN]) -> Result<()> {
        let pid = self.pid;
        stasis_sys::fault::point();
        self.mem
            .write_all_at(code, self.site)
            .map_err(|err| InfectError::Io {
                pid,
                what: "writing the injection site",
                err,
            })
    }

    /// Sets `regs` on thread `tid`, lets it run until the blob sets the done word at `done`
    /// in the host's view, then stops it in its park loop. Threads the code creates are noted
    /// in `cloned`.
    fn run_until_done(
        &mut self,
        tid: Pid,
        regs: &Regs,
        done: *const u32,
        timeout: Duration,
    ) -> Result<()> {
        let pid = self.pid;
        let perr = |op| {
            move |errno| InfectError::Ptrace {
                op,
                tid: pid,
                errno,
            }
        };
        sys::set_regs(tid, regs).map_err(perr("SETREGS"))?;
        // The thread is out of the site's park loop now (if it was there).
        self.clean_site()?;
        sys::cont(tid, 0).map_err(perr("CONT"))?;
        let deadline = Instant::now() + timeout;
        let mut spins = 0u32;
        // SAFETY: `done` points into the host's live mapping of the region; volatile because
        // the target writes it.
        let is_done = || unsafe { std::ptr::read_volatile(done) } != 0;
        loop {
            match sys::wait(tid, true).map_err(perr("wait"))? {
                Wait::Running => {
                    if is_done() {
                        break;
                    }
                    if Instant::now() >= deadline {
                        return Err(self.stop_runaway(tid, timeout));
                    }
                    // Yield first (a command takes ~100 µs), then sleep briefly.
                    spins += 1;
                    if spins < 2000 {
                        std::thread::yield_now();
                    } else {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
                // A leftover interrupt (e.g. after a timeout): keep going.
                Wait::Stopped { event, .. } if event == sys::PTRACE_EVENT_STOP => {
                    if is_done() {
                        return Ok(());
                    }
                    sys::cont(tid, 0).map_err(perr("CONT"))?;
                }
                // The code created a thread: it starts traced and stopped; note it, go on.
                Wait::Stopped {
                    sig: SIGTRAP,
                    event: sys::PTRACE_EVENT_CLONE,
                } => {
                    self.cloned
                        .push(sys::event_msg(tid).map_err(perr("GETEVENTMSG"))?);
                    sys::cont(tid, 0).map_err(perr("CONT"))?;
                }
                other => return Err(self.unexpected(tid, other)),
            }
        }
        // Parked (or about to be): stop it there.
        sys::interrupt(tid).map_err(perr("INTERRUPT"))?;
        match sys::wait(tid, false).map_err(perr("wait"))? {
            Wait::Stopped { event, .. } if event == sys::PTRACE_EVENT_STOP => Ok(()),
            other => Err(self.unexpected(tid, other)),
        }
    }

    fn fault(&self, sig: i32, info: &libc::siginfo_t) -> InfectError {
        // SAFETY: si_addr is valid to read for the fault signals; for others it is junk we only print.
        let addr = unsafe { info.si_addr() } as u64;
        InfectError::ParasiteFault {
            pid: self.pid,
            sig,
            addr,
        }
    }

    /// Stops a blob that ran past its deadline.
    fn stop_runaway(&mut self, tid: Pid, timeout: Duration) -> InfectError {
        let pid = self.pid;
        if sys::interrupt(tid).is_ok() {
            // The next stop is either the interrupt or a signal that raced it; both leave the
            // thread stopped, which is all cure needs.
            match sys::wait(tid, false) {
                Ok(Wait::Exited(_)) | Ok(Wait::Killed(_)) => self.gone = true,
                _ => {}
            }
        }
        InfectError::ParasiteTimeout {
            pid,
            ms: timeout.as_millis() as u64,
        }
    }

    /// Remote address where a plan passed to `run_plan` will start: plans encode pointers to
    /// their own data relative to it.
    pub fn plan_base(&self) -> Option<u64> {
        self.region
            .as_ref()
            .map(|r| r.remote + (r.cmd_off + r.plan_off) as u64)
    }

    /// Bytes a plan may take.
    pub fn plan_cap(&self) -> usize {
        self.region.as_ref().map_or(0, |r| r.plan_cap)
    }

    /// Runs one blob command and returns its reply payload (a private copy, not yet trusted).
    pub fn run(&mut self, id: CommandId, timeout: Duration) -> Result<Vec<u8>> {
        self.run_plan(id, &[], 0, timeout)
    }

    /// Like `run`, with `plan` copied to `plan_base()` first; the blob executes its first
    /// `ops_len` bytes as operations (the rest is data the operations point at).
    pub fn run_plan(
        &mut self,
        id: CommandId,
        plan: &[u8],
        ops_len: usize,
        timeout: Duration,
    ) -> Result<Vec<u8>> {
        let (tid, base) = (self.tid, self.saved.regs);
        self.run_command(tid, &base, id, plan, ops_len, timeout)
    }

    /// Runs a command in thread `tid` of the process (the main thread runs `run_plan`). The
    /// thread's registers, XSAVE area and signal mask are saved first and put back afterwards,
    /// whatever happens; meanwhile every signal but SIGTRAP is blocked in it. The region's one
    /// stack serves every thread: commands run one at a time.
    pub fn run_plan_in(
        &mut self,
        tid: i32,
        id: CommandId,
        plan: &[u8],
        ops_len: usize,
        timeout: Duration,
    ) -> Result<Vec<u8>> {
        if tid == self.pid {
            return self.run_plan(id, plan, ops_len, timeout);
        }
        let t = Pid::from_raw(tid);
        let perr = |op| move |errno| InfectError::Ptrace { op, tid, errno };
        let saved = Saved::read(t)?;
        guardian::note(&Note::Thread {
            pid: self.pid,
            tid,
            saved: Box::new(saved.clone()),
        })?;
        sys::set_sigmask(t, ALL_BUT_TRAP).map_err(perr("SETSIGMASK"))?;
        let reply = self.run_command(t, &saved.regs, id, plan, ops_len, timeout);
        if self.gone {
            return reply;
        }
        // The registers last: until they are back, the thread is in the park loop, where the
        // guardian knows to put everything back.
        let back = sys::set_xstate(t, &saved.xstate)
            .map_err(perr("SETREGSET(XSTATE)"))
            .and_then(|()| sys::set_sigmask(t, saved.sigmask).map_err(perr("SETSIGMASK")))
            .and_then(|()| sys::set_regs(t, &saved.regs).map_err(perr("SETREGS")));
        if back.is_ok() {
            guardian::note(&Note::ThreadBack { pid: self.pid, tid })?;
        }
        let reply = reply?;
        back?;
        Ok(reply)
    }

    /// Threads the blob created since the last call (traced clones, see `Seized::trace_clones`):
    /// waits until each is in its first stop, and adds it to the threads released at the end.
    pub fn adopt_clones(&mut self) -> Result<Vec<i32>> {
        let cloned = std::mem::take(&mut self.cloned);
        for &tid in &cloned {
            let t = Pid::from_raw(tid);
            loop {
                match sys::wait(t, false) {
                    Ok(Wait::Stopped { event, .. }) if event == sys::PTRACE_EVENT_STOP => break,
                    Ok(Wait::Stopped { sig, event }) => {
                        return Err(InfectError::UnexpectedStop {
                            pid: self.pid,
                            sig,
                            event,
                        })
                    }
                    Ok(Wait::Running) => continue,
                    Ok(Wait::Exited(_) | Wait::Killed(_)) | Err(_) => {
                        return Err(InfectError::TargetGone {
                            pid: self.pid,
                            how: format!("its new thread {tid} exited"),
                        })
                    }
                }
            }
            self._seized.adopt(tid);
        }
        Ok(cloned)
    }

    fn run_command(
        &mut self,
        tid: Pid,
        base: &Regs,
        id: CommandId,
        plan: &[u8],
        ops_len: usize,
        timeout: Duration,
    ) -> Result<Vec<u8>> {
        let pid = self.pid;
        let region = self.region.as_mut().ok_or_else(|| InfectError::BadReply {
            pid,
            why: "no region mapped".into(),
        })?;
        if plan.len() > region.plan_cap || ops_len > plan.len() {
            return Err(InfectError::BadReply {
                pid,
                why: format!(
                    "plan of {} bytes does not fit the plan area ({})",
                    plan.len(),
                    region.plan_cap
                ),
            });
        }
        let cmd = Command {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            id: id as u32,
            _pad: 0,
            reply_cap: region.reply_cap as u64,
            plan_off: region.plan_off as u64,
            plan_len: ops_len as u64,
            area_len: region.cmd_len as u64,
        };
        let cmd_off = region.cmd_off;
        let plan_at = cmd_off + region.plan_off;
        region.host.slice_mut()[plan_at..plan_at + plan.len()].copy_from_slice(plan);
        let area = &mut region.host.slice_mut()[cmd_off..];
        // SAFETY: the command area starts page-aligned and is larger than both structs.
        unsafe {
            std::ptr::write_volatile(area.as_mut_ptr() as *mut Command, cmd);
            std::ptr::write_volatile(
                area.as_mut_ptr().add(REPLY_OFFSET) as *mut ReplyHeader,
                ReplyHeader::default(),
            );
            std::ptr::write_volatile(area.as_mut_ptr().add(DONE_OFFSET) as *mut u32, 0);
        }
        let done = area[DONE_OFFSET..].as_ptr() as *const u32;
        let mut regs = *base;
        regs.rip = region.remote + self.entry;
        regs.rsp = region.remote + region.stack_top as u64;
        regs.rdi = region.remote + cmd_off as u64;
        regs.orig_rax = u64::MAX;
        // Clear TF (single-step) and DF (string direction) for code compiled for the ABI.
        regs.eflags &= !(0x100 | 0x400);
        let reply_cap = region.reply_cap;
        self.run_until_done(tid, &regs, done, timeout)?;

        let region = self.region.as_ref().ok_or_else(|| InfectError::BadReply {
            pid,
            why: "no region mapped".into(),
        })?;
        // One copy out of shared memory; everything after works on private bytes.
        let hdr_len = std::mem::size_of::<ReplyHeader>();
        let raw = region.host.copy_out(cmd_off + REPLY_OFFSET, hdr_len);
        let field = |i: usize| u32::from_le_bytes([raw[i], raw[i + 1], raw[i + 2], raw[i + 3]]);
        let (magic, status, errno, len) = (field(0), field(4), field(8), field(12) as usize);
        if magic == 0 {
            return Err(InfectError::BadReply {
                pid,
                why: "the parasite stopped without a reply (it panicked)".into(),
            });
        }
        if magic != MAGIC {
            return Err(InfectError::BadReply {
                pid,
                why: format!("bad magic {magic:#x}"),
            });
        }
        match Status::from_u32(status) {
            Some(Status::Ok) => {}
            Some(s) => {
                return Err(InfectError::ParasiteStatus {
                    pid,
                    status: format!("{s:?}"),
                    errno: errno as i32,
                })
            }
            None => {
                return Err(InfectError::BadReply {
                    pid,
                    why: format!("unknown status {status}"),
                })
            }
        }
        if len > reply_cap {
            return Err(InfectError::BadReply {
                pid,
                why: format!("length {len} exceeds the reply area ({reply_cap})"),
            });
        }
        Ok(region.host.copy_out(cmd_off + REPLY_OFFSET + hdr_len, len))
    }

    /// The payload of the last reply whatever its status, bounded by the reply area: for
    /// commands whose failure replies carry details (e.g. which plan operation failed).
    pub fn last_reply(&self) -> Vec<u8> {
        let Some(r) = self.region.as_ref() else {
            return Vec::new();
        };
        let hdr_len = std::mem::size_of::<ReplyHeader>();
        let raw = r.host.copy_out(r.cmd_off + REPLY_OFFSET, hdr_len);
        let len = u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]) as usize;
        r.host
            .copy_out(r.cmd_off + REPLY_OFFSET + hdr_len, len.min(r.reply_cap))
    }

    /// Gives up the undo: for a task that is about to be killed anyway (a failed restore),
    /// where curing would only fail noisily against a half-rebuilt address space.
    pub fn abandon(mut self) {
        self.cured = true;
    }

    /// Removes every trace of the parasite and puts the main thread back as it was.
    pub fn cure(mut self) -> Result<()> {
        self.cure_inner()
    }

    /// For a restore: the address space was rebuilt under the blob, so the thread must come
    /// out of the cure in a new state. Injection now uses the first executable mapping of the
    /// new layout (its original bytes are put back after each call, as always).
    pub fn cure_into(mut self, regs: Regs, xstate: Vec<u8>, sigmask: u64) -> Result<()> {
        let pid = self.pid;
        let site = injection_site(pid, self.remote_region())?;
        let mut orig = [0u8; SITE_LEN];
        self.mem
            .read_exact_at(&mut orig, site)
            .map_err(|err| InfectError::Io {
                pid,
                what: "reading code at the injection site",
                err,
            })?;
        guardian::note(&Note::Site {
            pid,
            addr: site,
            orig,
        })?;
        self.site = site;
        self.site_orig = orig;
        self.site_dirty = false;
        self.saved = Saved {
            regs,
            xstate,
            sigmask,
        };
        self.cure_inner()
    }

    fn cure_inner(&mut self) -> Result<()> {
        if self.cured {
            return Ok(());
        }
        self.cured = true;
        if self.gone {
            return Ok(());
        }
        let mut first: Option<InfectError> = None;
        let mut note = |r: Result<u64>| {
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        };
        if let Some(fd) = self.remote_fd.take() {
            note(self.remote_syscall("close", libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0]));
        }
        if let Some(region) = self.region.take() {
            note(self.remote_syscall(
                "munmap",
                libc::SYS_munmap,
                [region.remote, region.len as u64, 0, 0, 0, 0],
            ));
        }
        let (pid, tid) = (self.pid, self.tid);
        let perr = |op| {
            move |errno| InfectError::Ptrace {
                op,
                tid: pid,
                errno,
            }
        };
        // The registers last (see `run_plan_in`), then the site, which the thread has left.
        note(
            sys::set_xstate(tid, &self.saved.xstate)
                .map(|_| 0)
                .map_err(perr("SETREGSET(XSTATE)")),
        );
        note(
            sys::set_sigmask(tid, self.saved.sigmask)
                .map(|_| 0)
                .map_err(perr("SETSIGMASK")),
        );
        note(
            sys::set_regs(tid, &self.saved.regs)
                .map(|_| 0)
                .map_err(perr("SETREGS")),
        );
        note(self.clean_site().map(|_| 0));
        if first.is_none() {
            guardian::note(&Note::Released { pid })?;
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for Parasite<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.cure_inner() {
            tracing::error!("curing pid {} failed: {e}", self.pid);
        }
    }
}

/// Opens `/proc/PID/<file>` for reading and writing.
fn open_proc_rw(pid: i32, file: &str, what: &'static str) -> Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{pid}/{file}"))
        .map_err(|err| InfectError::Io { pid, what, err })
}

/// The lowest descriptor number `pid` does not use (it is frozen: nothing opens one meanwhile).
fn lowest_free_fd(pid: i32) -> i32 {
    let used: std::collections::BTreeSet<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    (0..).find(|n| !used.contains(n)).unwrap_or(0)
}

/// The live snapshot children of `pid` (see `Parasite::fork_snapshot`): its children that
/// map the region's memfd.
pub fn snapshots_of(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for t in tasks.filter_map(|e| e.ok()) {
        let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        for c in children
            .split_whitespace()
            .filter_map(|c| c.parse::<i32>().ok())
        {
            let ours =
                stasis_proc::maps(c).is_ok_and(|m| m.iter().any(|v| guardian::is_ours(&v.name)));
            if ours && !out.contains(&c) {
                out.push(c);
            }
        }
    }
    out
}

/// Where `Parasite::infect` will write its system-call instruction in `pid` (it puts the
/// original bytes back after every call): the one page of the process a parasite changes.
pub fn site_of(pid: i32) -> Result<u64> {
    injection_site(pid, None)
}

/// The start of the first executable mapping that is ordinary code: not the vDSO (writing there
/// would turn a kernel page into a private copy), not `[vsyscall]`, not our own region (its
/// `munmap` would pull the instruction after the `syscall` out from under the thread).
fn injection_site(pid: i32, region: Option<(u64, usize)>) -> Result<u64> {
    let vmas = stasis_proc::maps(pid)?;
    vmas.iter()
        .find(|v| {
            v.prot & stasis_proc::PROT_EXEC != 0
                && region.is_none_or(|(start, len)| v.end <= start || v.start >= start + len as u64)
                && v.len() >= SITE_LEN as u64
                && !stasis_abi::is_vdso_area_name(&v.name)
                && v.name != b"[vsyscall]"
        })
        .map(|v| v.start)
        .ok_or(InfectError::NoInjectionSite(pid))
}
