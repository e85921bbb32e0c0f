//! The guardian: a second process that cures the target if this stasis dies mid-way.
//!
//! When a tracer dies, the kernel lets its tracees go wherever they are. The injection is built
//! so that "wherever" is harmless (see `parasite.rs`): a thread running injected code ends up
//! in a park loop, every signal but SIGTRAP blocked. What it cannot do is put the thread's own
//! registers, XSAVE area and signal mask back, unmap the region or restore the site's bytes:
//! the guardian does. `stasis` starts it (`start`, a re-exec of itself) before touching any
//! process and sends it, over a pipe and *before* each change, what it needs to undo it
//! (`Note`). If the pipe closes without an `End`, stasis died: the guardian waits until the
//! kernel has let the targets go, seizes each one that was changed, moves its parked threads
//! back into their saved state, removes the region and the memfd, puts the site's bytes back
//! and lets it run on.
//!
//! Invariant: every change a `Parasite` makes to a thread, its code or its address space is
//! announced here first; a `Released` note ends the guardian's interest in a process.

use crate::parasite::{Parasite, Saved, ALL_BUT_TRAP, MEMFD_NAME, SITE_CODE, SITE_LEN};
use crate::seize::Seized;
use crate::{InfectError, Result};
use nix::unistd::Pid;
use stasis_sys::ptrace::{self as sys, Regs, Wait};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The hidden `stasis` subcommand that runs `serve`.
pub const COMMAND: &str = "guardian";

/// What the guardian is told, before the change it describes is made.
pub(crate) enum Note {
    /// Thread `tid`'s state as it was, before any change to it.
    Thread {
        pid: i32,
        tid: i32,
        saved: Box<Saved>,
    },
    /// Thread `tid` has its saved state back.
    ThreadBack { pid: i32, tid: i32 },
    /// The injection site and its own bytes, before it is first written.
    Site {
        pid: i32,
        addr: u64,
        orig: [u8; SITE_LEN],
    },
    /// Where the region's park loop is, once the region is mapped.
    Park { pid: i32, addr: u64 },
    /// The peek offset of socket `inode` (the target's fd `fd`) is about to be changed; it was
    /// `value`.
    PeekOff {
        pid: i32,
        fd: i32,
        inode: u64,
        value: i32,
    },
    /// That socket's peek offset is back.
    PeekOffBack { pid: i32, inode: u64 },
    /// The network lock `table` (nftables) of the dump of `pid` is about to be made.
    NetLock { pid: i32, table: String },
    /// TCP socket `inode`, the target's fd `fd`, is about to enter repair mode.
    Repair { pid: i32, fd: i32, inode: u64 },
    /// Every socket is out of repair mode and the lock is gone (a failed dump undid them).
    NetReleased,
    /// The process is cured (or killed): nothing to do for it any more.
    Released { pid: i32 },
    /// A copy-on-write snapshot of `pid` is about to be forked (`child` 0), or was (`child`):
    /// until `SnapshotGone`, it must be killed and reaped by `pid`.
    Snapshot { pid: i32, child: i32 },
    /// The snapshots of `pid` are dead and reaped.
    SnapshotGone { pid: i32 },
    /// The image of a kill-mode dump is whole and sealed, and its processes (pid, start
    /// time) are about to be killed: if this stasis dies now, the guardian kills the rest.
    Killing { procs: Vec<(i32, u64)> },
    /// The process is about to make a userfaultfd for the host, on descriptor `fd` (its
    /// lowest free one), and close it again at once: until `UffdGone`, a descriptor `fd` that
    /// is a userfaultfd is stasis's, to be closed.
    Uffd { pid: i32, fd: i32 },
    /// That descriptor is closed.
    UffdGone { pid: i32 },
    /// This stasis is finishing normally.
    End,
}

const REGS_LEN: usize = std::mem::size_of::<Regs>();

impl Note {
    fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; 4];
        let head = |b: &mut Vec<u8>, kind: u8, pid: i32, tid: i32| {
            b.push(kind);
            b.extend_from_slice(&pid.to_le_bytes());
            b.extend_from_slice(&tid.to_le_bytes());
        };
        match self {
            Note::Thread { pid, tid, saved } => {
                head(&mut b, 1, *pid, *tid);
                b.extend_from_slice(regs_bytes(&saved.regs));
                b.extend_from_slice(&saved.sigmask.to_le_bytes());
                b.extend_from_slice(&saved.xstate);
            }
            Note::ThreadBack { pid, tid } => head(&mut b, 2, *pid, *tid),
            Note::Site { pid, addr, orig } => {
                head(&mut b, 3, *pid, 0);
                b.extend_from_slice(&addr.to_le_bytes());
                b.extend_from_slice(orig);
            }
            Note::Park { pid, addr } => {
                head(&mut b, 4, *pid, 0);
                b.extend_from_slice(&addr.to_le_bytes());
            }
            Note::Released { pid } => head(&mut b, 5, *pid, 0),
            Note::End => head(&mut b, 6, 0, 0),
            Note::PeekOff {
                pid,
                fd,
                inode,
                value,
            } => {
                head(&mut b, 7, *pid, *fd);
                b.extend_from_slice(&inode.to_le_bytes());
                b.extend_from_slice(&value.to_le_bytes());
            }
            Note::PeekOffBack { pid, inode } => {
                head(&mut b, 8, *pid, 0);
                b.extend_from_slice(&inode.to_le_bytes());
            }
            Note::NetLock { pid, table } => {
                head(&mut b, 9, *pid, 0);
                b.extend_from_slice(table.as_bytes());
            }
            Note::Repair { pid, fd, inode } => {
                head(&mut b, 10, *pid, *fd);
                b.extend_from_slice(&inode.to_le_bytes());
            }
            Note::NetReleased => head(&mut b, 11, 0, 0),
            Note::Snapshot { pid, child } => head(&mut b, 12, *pid, *child),
            Note::SnapshotGone { pid } => head(&mut b, 13, *pid, 0),
            Note::Uffd { pid, fd } => head(&mut b, 15, *pid, *fd),
            Note::UffdGone { pid } => head(&mut b, 16, *pid, 0),
            Note::Killing { procs } => {
                head(&mut b, 14, 0, procs.len() as i32);
                for (pid, start) in procs {
                    b.extend_from_slice(&pid.to_le_bytes());
                    b.extend_from_slice(&start.to_le_bytes());
                }
            }
        }
        let len = (b.len() - 4) as u32;
        b[..4].copy_from_slice(&len.to_le_bytes());
        b
    }

    /// Decodes one frame body; `None` for anything malformed (a frame cut short by a death).
    fn decode(f: &[u8]) -> Option<Note> {
        let kind = *f.first()?;
        let int = |at: usize| Some(i32::from_le_bytes(f.get(at..at + 4)?.try_into().ok()?));
        let u64_at = |at: usize| Some(u64::from_le_bytes(f.get(at..at + 8)?.try_into().ok()?));
        let (pid, tid) = (int(1)?, int(5)?);
        let body = 9;
        Some(match kind {
            1 => {
                let raw = f.get(body..body + REGS_LEN)?;
                let sigmask = u64_at(body + REGS_LEN)?;
                let xstate = f.get(body + REGS_LEN + 8..)?.to_vec();
                Note::Thread {
                    pid,
                    tid,
                    saved: Box::new(Saved {
                        regs: regs_from(raw)?,
                        xstate,
                        sigmask,
                    }),
                }
            }
            2 => Note::ThreadBack { pid, tid },
            3 => Note::Site {
                pid,
                addr: u64_at(body)?,
                orig: f.get(body + 8..body + 8 + SITE_LEN)?.try_into().ok()?,
            },
            4 => Note::Park {
                pid,
                addr: u64_at(body)?,
            },
            5 => Note::Released { pid },
            6 => Note::End,
            7 => Note::PeekOff {
                pid,
                fd: tid,
                inode: u64_at(body)?,
                value: int(body + 8)?,
            },
            8 => Note::PeekOffBack {
                pid,
                inode: u64_at(body)?,
            },
            9 => Note::NetLock {
                pid,
                table: String::from_utf8(f.get(body..)?.to_vec()).ok()?,
            },
            10 => Note::Repair {
                pid,
                fd: tid,
                inode: u64_at(body)?,
            },
            11 => Note::NetReleased,
            12 => Note::Snapshot { pid, child: tid },
            13 => Note::SnapshotGone { pid },
            14 => {
                let n = usize::try_from(tid).ok()?;
                if f.len() != body + n.checked_mul(12)? {
                    return None;
                }
                let procs = (0..n)
                    .map(|k| Some((int(body + 12 * k)?, u64_at(body + 12 * k + 4)?)))
                    .collect::<Option<Vec<_>>>()?;
                Note::Killing { procs }
            }
            15 => Note::Uffd { pid, fd: tid },
            16 => Note::UffdGone { pid },
            _ => return None,
        })
    }
}

fn regs_bytes(r: &Regs) -> &[u8] {
    // SAFETY: user_regs_struct is plain old data (27 u64s); viewing it as bytes is sound.
    unsafe { std::slice::from_raw_parts(r as *const Regs as *const u8, REGS_LEN) }
}

fn regs_from(raw: &[u8]) -> Option<Regs> {
    if raw.len() != REGS_LEN {
        return None;
    }
    // SAFETY: exactly REGS_LEN bytes; every bit pattern is a valid user_regs_struct.
    Some(unsafe { std::ptr::read_unaligned(raw.as_ptr() as *const Regs) })
}

/// The pipe to the running guardian, if this stasis started one.
static CHANNEL: Mutex<Option<ChildStdin>> = Mutex::new(None);

/// Tells the guardian, if there is one, about a change about to be made. A guardian that
/// cannot be told fails the operation: nothing is changed unprotected.
pub(crate) fn note(n: &Note) -> Result<()> {
    let mut ch = CHANNEL.lock().unwrap_or_else(|p| p.into_inner());
    let Some(pipe) = ch.as_mut() else {
        return Ok(());
    };
    // One write: a frame up to PIPE_BUF arrives whole or not at all.
    pipe.write_all(&n.encode()).map_err(|err| InfectError::Io {
        pid: 0,
        what: "telling the guardian process",
        err,
    })
}

/// For the dump of a socket's queue, which it reads from the start: the peek offset of the
/// target's fd `fd` (socket `inode`) is about to be changed from `value`.
pub fn note_peek_off(pid: i32, fd: i32, inode: u64, value: i32) -> Result<()> {
    note(&Note::PeekOff {
        pid,
        fd,
        inode,
        value,
    })
}

/// The peek offset `note_peek_off` announced is back.
pub fn note_peek_off_back(pid: i32, inode: u64) -> Result<()> {
    note(&Note::PeekOffBack { pid, inode })
}

/// For `--tcp-established`: the network lock `table` of the dump of `pid` is about to be made.
pub fn note_net_lock(pid: i32, table: &str) -> Result<()> {
    note(&Note::NetLock {
        pid,
        table: table.to_string(),
    })
}

/// TCP socket `inode`, fd `fd` of `pid`, is about to enter repair mode.
pub fn note_repair(pid: i32, fd: i32, inode: u64) -> Result<()> {
    note(&Note::Repair { pid, fd, inode })
}

/// The dump took every socket out of repair mode and removed its lock.
/// The processes `procs` (pid, start time) of a whole, sealed image are about to be killed.
pub fn note_killing(procs: Vec<(i32, u64)>) -> Result<()> {
    note(&Note::Killing { procs })
}

/// The snapshots of `pid` are dead and reaped.
pub fn note_snapshot_gone(pid: i32) -> Result<()> {
    note(&Note::SnapshotGone { pid })
}

pub fn note_net_released() -> Result<()> {
    note(&Note::NetReleased)
}

/// A running guardian; dropping it ends it (normally).
pub struct Guardian {
    child: Child,
}

/// Starts the guardian: `exe` (this stasis's own binary) run with `COMMAND`.
pub fn start(exe: &std::path::Path) -> Result<Guardian> {
    let mut child = std::process::Command::new(exe)
        .arg(COMMAND)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .env_remove(stasis_sys::fault::ENV)
        .spawn()
        .map_err(|err| InfectError::Io {
            pid: 0,
            what: "starting the guardian process",
            err,
        })?;
    let pipe = child.stdin.take();
    *CHANNEL.lock().unwrap_or_else(|p| p.into_inner()) = pipe;
    Ok(Guardian { child })
}

impl Drop for Guardian {
    fn drop(&mut self) {
        let _ = note(&Note::End);
        CHANNEL.lock().unwrap_or_else(|p| p.into_inner()).take();
        let _ = self.child.wait();
    }
}

/// What the guardian knows of one process.
#[derive(Default)]
struct Watch {
    threads: BTreeMap<i32, Saved>,
    site: Option<(u64, [u8; SITE_LEN])>,
    park: Option<u64>,
    /// Sockets whose peek offset is changed: inode → (fd, the offset to put back).
    peek_offs: BTreeMap<u64, (i32, i32)>,
    /// A descriptor the process may hold for stasis: a userfaultfd being handed over.
    uffd: Option<i32>,
}

/// The guardian's main: reads notes on stdin until `End` (exit 0) or until the pipe closes
/// without one, then cures every process left changed. Returns the exit code.
pub fn serve() -> i32 {
    // A ^C or a hang-up meant for stasis is not for us: stasis dying is what we wait for.
    for sig in [
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGPIPE,
    ] {
        // SAFETY: setting a signal to SIG_IGN has no memory effects.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
    let mut watched: BTreeMap<i32, Watch> = BTreeMap::new();
    let mut net = Net::default();
    let mut snapshots: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
    let mut killing: Vec<(i32, u64)> = Vec::new();
    let mut input = std::io::stdin().lock();
    loop {
        let mut len = [0u8; 4];
        if input.read_exact(&mut len).is_err() {
            break;
        }
        let len = u32::from_le_bytes(len) as usize;
        if len > 1 << 20 {
            break;
        }
        let mut frame = vec![0u8; len];
        if input.read_exact(&mut frame).is_err() {
            break;
        }
        match Note::decode(&frame) {
            Some(Note::End) => return 0,
            Some(Note::Thread { pid, tid, saved }) => {
                watched.entry(pid).or_default().threads.insert(tid, *saved);
            }
            Some(Note::ThreadBack { pid, tid }) => {
                if let Some(w) = watched.get_mut(&pid) {
                    w.threads.remove(&tid);
                }
            }
            Some(Note::Site { pid, addr, orig }) => {
                watched.entry(pid).or_default().site = Some((addr, orig));
            }
            Some(Note::Park { pid, addr }) => {
                watched.entry(pid).or_default().park = Some(addr);
            }
            Some(Note::Released { pid }) => {
                watched.remove(&pid);
            }
            Some(Note::PeekOff {
                pid,
                fd,
                inode,
                value,
            }) => {
                watched
                    .entry(pid)
                    .or_default()
                    .peek_offs
                    .insert(inode, (fd, value));
            }
            Some(Note::PeekOffBack { pid, inode }) => {
                if let Some(w) = watched.get_mut(&pid) {
                    w.peek_offs.remove(&inode);
                }
            }
            Some(Note::NetLock { pid, table }) => net.table = Some((pid, table)),
            Some(Note::Repair { pid, fd, inode }) => net.repaired.push((pid, fd, inode)),
            Some(Note::NetReleased) => net = Net::default(),
            Some(Note::Snapshot { pid, child }) => {
                let kids = snapshots.entry(pid).or_default();
                if child > 0 {
                    kids.push(child);
                }
            }
            Some(Note::SnapshotGone { pid }) => {
                snapshots.remove(&pid);
            }
            Some(Note::Killing { procs }) => killing = procs,
            Some(Note::Uffd { pid, fd }) => watched.entry(pid).or_default().uffd = Some(fd),
            Some(Note::UffdGone { pid }) => {
                if let Some(w) = watched.get_mut(&pid) {
                    w.uffd = None;
                }
            }
            None => break,
        }
    }
    let mut code = 0;
    // First of all (the dead stasis's tracees are let go a moment after its pipe closes):
    // the processes of a whole image that it was killing.
    let killed = kill_the_rest(&killing);
    if killed > 0 {
        eprintln!("stasis guardian: stasis died while killing the processes it had dumped (the image is whole); killed the {killed} left");
    }
    net.undo();
    for (pid, w) in watched {
        match cure(pid, &w) {
            Ok(true) => eprintln!("stasis guardian: stasis died while working on pid {pid}; pid {pid} is cured and runs on"),
            Ok(false) => {}
            Err(e) => {
                eprintln!("stasis guardian: stasis died while working on pid {pid}; curing it failed: {e}");
                code = 1;
            }
        }
    }
    for (pid, noted) in snapshots {
        match end_snapshots(pid, &noted) {
            Ok(0) => {}
            Ok(n) => eprintln!("stasis guardian: stasis died while copying pid {pid}'s memory; its snapshot ({n}) is killed and reaped"),
            Err(e) => {
                eprintln!("stasis guardian: pid {pid}'s memory snapshot could not be ended: {e}");
                code = 1;
            }
        }
    }
    code
}

/// SIGKILLs each of `procs` still alive (the same process: pid and start time), and waits
/// until each has died. Returns how many it killed.
fn kill_the_rest(procs: &[(i32, u64)]) -> usize {
    let same = |pid: i32, start: u64| {
        stasis_proc::stat(pid).is_ok_and(|st| st.start_time == start && !st.is_zombie())
    };
    let left: Vec<i32> = procs
        .iter()
        .filter(|&&(pid, start)| same(pid, start))
        .map(|&(pid, _)| pid)
        .collect();
    for &pid in &left {
        // SAFETY: kill(2) on a pid checked just above; no memory is involved.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && procs.iter().any(|&(pid, start)| same(pid, start)) {
        std::thread::sleep(Duration::from_micros(200));
    }
    left.len()
}

/// Kills the snapshot children of `pid` (those that map our region, and the ones noted that
/// are still its children, dead or not), and has `pid` reap them. Returns how many.
fn end_snapshots(pid: i32, noted: &[i32]) -> Result<usize> {
    let mut kids = crate::parasite::snapshots_of(pid);
    for &c in noted {
        let still = stasis_proc::stat(c).is_ok_and(|st| {
            st.ppid == pid
                && (st.is_zombie()
                    || stasis_proc::maps(c).is_ok_and(|m| m.iter().any(|v| is_ours(&v.name))))
        });
        if still && !kids.contains(&c) {
            kids.push(c);
        }
    }
    if kids.is_empty() {
        return Ok(0);
    }
    kill_snapshots(&kids);
    let Some(mut seized) = seize_when_free(pid)? else {
        return Ok(kids.len());
    };
    Parasite::reap_children(&mut seized, &kids)?;
    seized.release()?;
    Ok(kids.len())
}

/// SIGKILLs `kids` and waits (up to 5 s) until each is a zombie or gone.
pub fn kill_snapshots(kids: &[i32]) {
    for &c in kids {
        // SAFETY: kill(2) on a pid; no memory is involved.
        unsafe { libc::kill(c, libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline
        && kids
            .iter()
            .any(|&c| stasis_proc::stat(c).is_ok_and(|st| !st.is_zombie()))
    {
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// What a `--tcp-established` dump holds: its lock and the sockets it put in repair mode.
#[derive(Default)]
struct Net {
    table: Option<(i32, String)>,
    repaired: Vec<(i32, i32, u64)>,
}

impl Net {
    /// After a dead stasis: every socket of a process still alive leaves repair mode, and
    /// the lock goes if any of them is alive. When they are all dead, the dump got as far as
    /// killing them — after its image was sealed — and the lock stays for the restore.
    fn undo(&self) {
        let alive = |pid: i32| stasis_proc::stat(pid).is_ok_and(|s| !s.is_zombie());
        let mut any_alive = false;
        for &(pid, fd, inode) in &self.repaired {
            if !alive(pid) {
                continue;
            }
            any_alive = true;
            let out = their_socket(pid, fd, inode).map(|sock| {
                stasis_sys::sock::setsockopt_int(
                    &sock,
                    libc::IPPROTO_TCP,
                    stasis_sys::sock::TCP_REPAIR,
                    0,
                )
            });
            if !matches!(out, Some(Ok(()))) {
                eprintln!("stasis guardian: pid {pid}: the TCP socket on fd {fd} could not be taken out of repair mode");
            }
        }
        if let Some((pid, table)) = &self.table {
            if any_alive || alive(*pid) {
                match stasis_sys::netlock::unlock(table) {
                    Ok(()) => eprintln!("stasis guardian: removed the network lock {table}"),
                    Err(e) => eprintln!("stasis guardian: removing the network lock {table}: {e}"),
                }
            }
        }
    }
}

/// Seizes `pid` once the dead stasis's tracing has ended (in its exit, after its pipe
/// closed). `None`: the process is gone.
fn seize_when_free(pid: i32) -> Result<Option<Seized>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match stasis_proc::tracer_pid(pid) {
            Err(_) => return Ok(None),
            Ok(0) => match Seized::seize(pid) {
                Ok(s) => return Ok(Some(s)),
                Err(InfectError::Zombie(_) | InfectError::NoProcess(_)) => return Ok(None),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => {}
            },
            Ok(_) if Instant::now() >= deadline => {
                return Err(InfectError::TargetGone {
                    pid,
                    how: "it stayed traced by the dead stasis".into(),
                })
            }
            Ok(_) => {}
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Cures `pid` as `w` says. Ok(false): the process is gone, nothing to cure.
fn cure(pid: i32, w: &Watch) -> Result<bool> {
    let Some(mut seized) = seize_when_free(pid)? else {
        return Ok(false);
    };
    put_peek_offs_back(pid, w);
    let regions: Vec<(u64, u64)> = stasis_proc::maps(pid)?
        .iter()
        .filter(|v| is_ours(&v.name))
        .map(|v| (v.start, v.end))
        .collect();
    let site = w.site.map(|(a, _)| (a, a + SITE_LEN as u64));
    let injected = |rip: u64| {
        regions.iter().any(|&(s, e)| rip >= s && rip < e)
            || site.is_some_and(|(s, e)| rip >= s && rip < e)
    };
    for (&tid, saved) in &w.threads {
        if !seized.threads().contains(&tid) {
            continue;
        }
        let t = Pid::from_raw(tid);
        let perr = |op| move |errno| InfectError::Ptrace { op, tid, errno };
        let mut regs = sys::get_regs(t).map_err(perr("GETREGS"))?;
        if let Some(park) = w.park {
            // Mid-command when stasis died: let the blob finish into its park loop.
            let parked = |rip: u64| rip >= park && rip < park + stasis_abi::PARK_CODE.len() as u64;
            let mut tries = 0;
            while injected(regs.rip)
                && !parked(regs.rip)
                && !in_site(site, regs.rip)
                && tries < 2000
            {
                sys::cont(t, 0).map_err(perr("CONT"))?;
                std::thread::sleep(Duration::from_millis(1));
                sys::interrupt(t).map_err(perr("INTERRUPT"))?;
                wait_stop(t)?;
                regs = sys::get_regs(t).map_err(perr("GETREGS"))?;
                tries += 1;
            }
        }
        if injected(regs.rip) {
            // The registers last: see `Parasite::cure`.
            sys::set_xstate(t, &saved.xstate).map_err(perr("SETREGSET(XSTATE)"))?;
            sys::set_sigmask(t, saved.sigmask).map_err(perr("SETSIGMASK"))?;
            sys::set_regs(t, &saved.regs).map_err(perr("SETREGS"))?;
        } else if is_injected_mask(sys::get_sigmask(t).map_err(perr("GETSIGMASK"))?) {
            // Died between blocking signals and the first injected call, or after the
            // registers went back but before the mask did.
            sys::set_sigmask(t, saved.sigmask).map_err(perr("SETSIGMASK"))?;
        }
    }
    // Unmap the region and close the memfd wherever they are, with the site's own bytes known;
    // and a userfaultfd being handed over.
    let mut fds = our_fds(pid);
    if let Some(fd) = w.uffd {
        let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap_or_default();
        if link.as_os_str() == "anon_inode:[userfaultfd]" {
            fds.push(fd);
        }
    }
    Parasite::recover(&mut seized, w.site, &regions, &fds)?;
    seized.release()?;
    Ok(true)
}

/// The mask injected code runs with, as the kernel reports it (it never holds SIGKILL or
/// SIGSTOP blocked).
fn is_injected_mask(mask: u64) -> bool {
    let unblockable = (1u64 << (libc::SIGKILL - 1)) | (1u64 << (libc::SIGSTOP - 1));
    mask | unblockable == ALL_BUT_TRAP
}

/// Puts back the peek offsets of the sockets whose queue the dead stasis was reading, each on
/// the socket it was changed on (the fd must still lead to that inode).
fn put_peek_offs_back(pid: i32, w: &Watch) {
    for (&inode, &(fd, value)) in &w.peek_offs {
        let put = their_socket(pid, fd, inode).map(|sock| {
            stasis_sys::sock::setsockopt_int(&sock, libc::SOL_SOCKET, libc::SO_PEEK_OFF, value)
        });
        if !matches!(put, Some(Ok(()))) {
            eprintln!("stasis guardian: pid {pid}: the peek offset of socket {inode} (fd {fd}) could not be put back");
        }
    }
}

/// A copy of `pid`'s fd `fd` if it is still socket `inode` (the process may have run since
/// stasis died, and closed or reused the number).
fn their_socket(pid: i32, fd: i32, inode: u64) -> Option<std::os::fd::OwnedFd> {
    use std::os::unix::fs::MetadataExt;
    let sock = stasis_sys::fs::pidfd_open(pid)
        .and_then(|pidfd| stasis_sys::fs::pidfd_getfd(&pidfd, fd))
        .ok()?;
    let link = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&sock));
    std::fs::metadata(link)
        .is_ok_and(|m| m.ino() == inode)
        .then_some(sock)
}

fn in_site(site: Option<(u64, u64)>, rip: u64) -> bool {
    site.is_some_and(|(s, e)| rip >= s && rip < e)
}

fn wait_stop(t: Pid) -> Result<()> {
    loop {
        match sys::wait(t, false) {
            Ok(Wait::Stopped { event, .. }) if event == sys::PTRACE_EVENT_STOP => return Ok(()),
            Ok(Wait::Stopped { sig, .. }) => {
                // A signal the thread blocks cannot stop it; SIGSTOP or a fault can: pass it.
                sys::cont(t, sig).map_err(|errno| InfectError::Ptrace {
                    op: "CONT",
                    tid: t.as_raw(),
                    errno,
                })?;
                let _ = sys::interrupt(t);
            }
            Ok(Wait::Running) => {}
            Ok(Wait::Exited(_) | Wait::Killed(_)) | Err(_) => {
                return Err(InfectError::TargetGone {
                    pid: t.as_raw(),
                    how: "it exited while the guardian cured it".into(),
                })
            }
        }
    }
}

/// A mapping name or fd link of the region's memfd.
pub(crate) fn is_ours(name: &[u8]) -> bool {
    let mut want = b"memfd:".to_vec();
    want.extend_from_slice(MEMFD_NAME);
    name.windows(want.len()).any(|w| w == want.as_slice())
}

/// The target's descriptors of the region's memfd.
fn our_fds(pid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter(|e| {
            std::fs::read_link(e.path())
                .is_ok_and(|l| is_ours(std::os::unix::ffi::OsStrExt::as_bytes(l.as_os_str())))
        })
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// Whether the site bytes `cur` are still the injected code (not the target's own).
pub(crate) fn site_is_injected(cur: &[u8; SITE_LEN]) -> bool {
    *cur == SITE_CODE
}
