//! Freezing a whole process with `PTRACE_SEIZE` + `PTRACE_INTERRUPT`.
//!
//! No SIGSTOP is sent, so job control and the process's own view of signals are untouched. New
//! threads can appear while we freeze the others: `/proc/PID/task` is rescanned until a pass
//! finds none. A signal whose delivery stop wins the race against our interrupt is delivered
//! (continued with that signal), never swallowed; the interrupt stays pending and stops the
//! thread right after.
//!
//! Invariant: once `Seized::seize` returns, every thread of the process is in a ptrace stop and
//! traced by this thread of ours; dropping `Seized` detaches all of them.

use crate::error::{InfectError, Result};
use nix::errno::Errno;
use nix::unistd::Pid;
use stasis_sys::ptrace::{self as sys, Wait};
use std::time::Instant;

/// A process whose every thread is frozen under our ptrace.
pub struct Seized {
    pid: i32,
    /// Seized threads; the leader first.
    threads: Vec<i32>,
    /// Signals delivered (not lost) while freezing, for the log.
    pub signals_passed: Vec<(i32, i32)>,
    /// The signal that had stopped the process by job control (SIGSTOP, SIGTSTP, SIGTTIN,
    /// SIGTTOU), as the leader's stop reports it; `None`: it was running.
    job_stop: Option<i32>,
    released: bool,
    /// The kernel kills the process if we die while it is seized (see `seize_owned`).
    exit_kill: bool,
    /// Threads found waiting in `restart_syscall` just before they were stopped, with the
    /// call it restarts (`Err`: the kernel stack's frames, no call stasis knows).
    restarting: Vec<(i32, std::result::Result<i64, String>)>,
}

/// `restart_syscall` on x86_64.
pub const SYS_RESTART_SYSCALL: u64 = 219;

/// A thread waiting in `restart_syscall` (a timed wait an earlier stop interrupted, resumed by
/// the kernel from its `restart_block`): the call it restarts, from the restart function on its
/// kernel stack — readable only while it waits there; once stopped, its stack is the stop's.
/// `None`: not in `restart_syscall` (or gone).
fn restarting_call(pid: i32, tid: i32) -> Option<std::result::Result<i64, String>> {
    let task = format!("/proc/{pid}/task/{tid}");
    let mut last = String::new();
    // A thread that is not asleep shows no frames: look again a few times.
    for _ in 0..20 {
        let syscall = std::fs::read_to_string(format!("{task}/syscall")).ok()?;
        let mut words = syscall.split_whitespace();
        if words.next() != Some("219") {
            return None;
        }
        let rdi_is_pointer = words
            .next()
            .and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok())
            .is_some_and(|a| a >= 4096);
        let stack = match std::fs::read_to_string(format!("{task}/stack")) {
            Ok(s) => s,
            Err(e) => return Some(Err(format!("its kernel stack cannot be read: {e}"))),
        };
        let frames: Vec<&str> = stack
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .map(|f| f.split('+').next().unwrap_or(f))
            .collect();
        let asleep = stasis_proc::stat(tid).is_ok_and(|st| st.state == 'S');
        // nanosleep(req, rem) or clock_nanosleep(clock, flags, req, rem): a clock id is small.
        let nanosleep = if rdi_is_pointer {
            libc::SYS_nanosleep
        } else {
            libc::SYS_clock_nanosleep
        };
        let named = frames.iter().find_map(|&f| match f {
            "futex_wait_restart" => Some(libc::SYS_futex),
            "do_restart_poll" => Some(libc::SYS_poll),
            "hrtimer_nanosleep_restart" => Some(nanosleep),
            "posix_cpu_nsleep_restart" | "alarm_timer_nsleep_restart" => {
                Some(libc::SYS_clock_nanosleep)
            }
            _ => None,
        });
        if let Some(nr) = named {
            return Some(Ok(nr));
        }
        // The nanosleep restart leaves no frame of its own (it sleeps straight from the
        // restart call): asleep with nothing above the system-call entry, it is that one.
        let bare = frames
            .iter()
            .all(|f| matches!(*f, "do_syscall_64" | "entry_SYSCALL_64_after_hwframe"));
        if asleep && bare && !frames.is_empty() {
            return Some(Ok(nanosleep));
        }
        last = frames.join(" < ");
        std::thread::sleep(std::time::Duration::from_micros(100));
    }
    Some(Err(last))
}

/// Signals whose default action stops a process (job control).
pub const STOP_SIGNALS: [i32; 4] = [libc::SIGSTOP, libc::SIGTSTP, libc::SIGTTIN, libc::SIGTTOU];

/// Refuses targets stasis must not or cannot freeze, with a reason the user can act on.
pub fn check_target(pid: i32) -> Result<()> {
    if pid <= 0 {
        return Err(InfectError::InvalidPid(pid));
    }
    if pid == std::process::id() as i32 {
        return Err(InfectError::SelfTarget(pid));
    }
    let stat = stasis_proc::stat(pid)?;
    if stat.is_kernel_thread() {
        return Err(InfectError::KernelThread(pid));
    }
    if stat.is_zombie() {
        return Err(InfectError::Zombie(pid));
    }
    // /proc/PID also resolves thread ids that are not leaders.
    let leader_ok = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Tgid:"))
                .and_then(|v| v.trim().parse::<i32>().ok())
        })
        .map(|tgid| tgid == pid)
        .unwrap_or(true);
    if !leader_ok {
        return Err(InfectError::NotLeader(pid));
    }
    let tracer = stasis_proc::tracer_pid(pid)?;
    if tracer != 0 {
        return Err(InfectError::AlreadyTraced { pid, tracer });
    }
    // A 32-bit program (its ELF class) would run our 64-bit parasite as garbage.
    let mut ident = [0u8; 5];
    if std::fs::File::open(format!("/proc/{pid}/exe"))
        .and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut ident, 0))
        .is_ok()
        && &ident[..4] == b"\x7fELF"
        && ident[4] != 2
    {
        return Err(InfectError::NotX86_64 {
            pid,
            what: "runs a 32-bit program".into(),
        });
    }
    Ok(())
}

/// The code segment of 64-bit user mode on x86_64 Linux (`__USER_CS`); 32-bit code runs
/// with `__USER32_CS` (0x23).
pub const USER_CS_64: u64 = 0x33;

impl Seized {
    /// Freezes every thread of `pid`.
    pub fn seize(pid: i32) -> Result<Seized> {
        Self::seize_with(pid, false)
    }

    /// Like `seize`, for a task stasis made itself (a restore's): if this stasis dies while
    /// the task is seized, the kernel kills it, so no half-made task is left holding the pid.
    pub fn seize_owned(pid: i32) -> Result<Seized> {
        Self::seize_with(pid, true)
    }

    fn seize_with(pid: i32, exit_kill: bool) -> Result<Seized> {
        let t0 = Instant::now();
        check_target(pid)?;
        let mut s = Seized {
            pid,
            threads: Vec::new(),
            signals_passed: Vec::new(),
            job_stop: None,
            released: false,
            exit_kill,
            restarting: Vec::new(),
        };
        // Until every thread is stopped, any of them may create more; rescan until stable.
        loop {
            let tids = stasis_proc::tasks(pid)?;
            let fresh: Vec<i32> = tids
                .into_iter()
                .filter(|t| !s.threads.contains(t))
                .collect();
            if fresh.is_empty() {
                break;
            }
            for tid in fresh {
                s.seize_thread(tid)?;
            }
        }
        for &tid in &s.threads {
            make_restartable(tid)?;
        }
        if s.threads.first() != Some(&pid) {
            // The leader exited (or was never seen): nothing sensible to freeze.
            return Err(InfectError::TargetGone {
                pid,
                how: "its main thread is gone".into(),
            });
        }
        tracing::debug!(pid, threads = s.threads.len(), elapsed = ?t0.elapsed(), "seized");
        Ok(s)
    }

    fn seize_thread(&mut self, tid: i32) -> Result<()> {
        let t = Pid::from_raw(tid);
        match sys::seize(t, self.exit_kill) {
            Ok(()) => {}
            // The thread exited between listing and seizing.
            Err(Errno::ESRCH) => return Ok(()),
            // A thread that has exited but is not yet released gives EPERM, not ESRCH.
            Err(Errno::EPERM) if tid != self.pid && thread_is_gone(self.pid, tid) => return Ok(()),
            Err(Errno::EPERM) => {
                return Err(match stasis_proc::tracer_pid(tid) {
                    Ok(tracer) if tracer != 0 => InfectError::AlreadyTraced {
                        pid: self.pid,
                        tracer,
                    },
                    _ => InfectError::PermissionDenied(self.pid),
                })
            }
            Err(errno) => {
                return Err(InfectError::Ptrace {
                    op: "SEIZE",
                    tid,
                    errno,
                })
            }
        }
        if let Some(call) = restarting_call(self.pid, tid) {
            self.restarting.push((tid, call));
        }
        if let Err(errno) = sys::interrupt(t) {
            let _ = sys::detach(t);
            if errno == Errno::ESRCH {
                return Ok(());
            }
            return Err(InfectError::Ptrace {
                op: "INTERRUPT",
                tid,
                errno,
            });
        }
        if self.wait_interrupt_stop(tid)? {
            if tid == self.pid {
                self.threads.insert(0, tid);
            } else {
                self.threads.push(tid);
            }
        }
        Ok(())
    }

    /// Waits for the stop our interrupt causes. Returns false if the thread exited instead.
    fn wait_interrupt_stop(&mut self, tid: i32) -> Result<bool> {
        let t = Pid::from_raw(tid);
        loop {
            match sys::wait(t, false) {
                Ok(Wait::Stopped { event, sig }) if event == sys::PTRACE_EVENT_STOP => {
                    // A seized thread's stop reports the job-control signal when a group
                    // stop is in effect (it was stopped, or stopping), SIGTRAP otherwise; a
                    // detach puts a process in a group stop back into it.
                    if tid == self.pid && STOP_SIGNALS.contains(&sig) {
                        self.job_stop = Some(sig);
                    }
                    return Ok(true);
                }
                Ok(Wait::Stopped { sig, .. }) => {
                    // A signal-delivery stop won the race: deliver the signal as the kernel
                    // would have, then ask for the stop again. The first interrupt is usually
                    // still pending, but not always: since 6.12 dequeuing a POSIX timer's
                    // signal briefly drops the signal lock, and an interrupt landing in that
                    // window is consumed by the signal stop. A second interrupt costs nothing
                    // (a leftover interrupt stop is tolerated, and detaching clears it).
                    self.signals_passed.push((tid, sig));
                    tracing::debug!(
                        pid = self.pid,
                        tid,
                        sig,
                        "signal stop raced the interrupt; delivering it"
                    );
                    sys::cont(t, sig).map_err(|errno| InfectError::Ptrace {
                        op: "CONT",
                        tid,
                        errno,
                    })?;
                    match sys::interrupt(t) {
                        Ok(()) | Err(Errno::ESRCH) => {}
                        Err(errno) => {
                            return Err(InfectError::Ptrace {
                                op: "INTERRUPT",
                                tid,
                                errno,
                            })
                        }
                    }
                }
                Ok(Wait::Exited(_)) | Ok(Wait::Killed(_)) | Err(Errno::ECHILD) => return Ok(false),
                Ok(Wait::Running) => continue,
                Err(errno) => {
                    return Err(InfectError::Ptrace {
                        op: "wait",
                        tid,
                        errno,
                    })
                }
            }
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Moves every thread whose rip lies in `range` (the vDSO) out of it, at most `max_rounds`
    /// rounds each. A thread frozen in the middle of a vDSO function would otherwise resume in
    /// the middle of that code after a restore, which is wrong when the vDSO is proxied (its
    /// old code would read placeholder vvar pages). Returns the threads moved.
    ///
    /// Each round lets the thread run and stops it again at once (`PTRACE_INTERRUPT`): vDSO
    /// functions take nanoseconds. Not single steps: a stasis that dies while a thread sits in
    /// a single-step trap leaves the trap's SIGTRAP to the kernel, which delivers it to the
    /// process once untraced, and kills it. Signals that arrive meanwhile are delivered (see
    /// `wait_interrupt_stop`).
    pub fn step_out_of(&mut self, range: (u64, u64), max_rounds: u32) -> Result<Vec<i32>> {
        let mut moved = Vec::new();
        for tid in self.threads.clone() {
            let t = Pid::from_raw(tid);
            let perr = |op| move |errno| InfectError::Ptrace { op, tid, errno };
            let inside = |t| -> Result<bool> {
                let rip = sys::get_regs(t).map_err(perr("GETREGS"))?.rip;
                Ok(rip >= range.0 && rip < range.1)
            };
            if !inside(t)? {
                continue;
            }
            let mut rounds = 0;
            while inside(t)? {
                if rounds == max_rounds {
                    return Err(InfectError::TargetGone {
                        pid: self.pid,
                        how: format!("thread {tid} did not leave the vDSO in {max_rounds} tries"),
                    });
                }
                sys::cont(t, 0).map_err(perr("CONT"))?;
                match sys::interrupt(t) {
                    Ok(()) | Err(Errno::ESRCH) => {}
                    Err(errno) => return Err(perr("INTERRUPT")(errno)),
                }
                if !self.wait_interrupt_stop(tid)? {
                    return Err(InfectError::TargetGone {
                        pid: self.pid,
                        how: format!("thread {tid} exited"),
                    });
                }
                rounds += 1;
            }
            moved.push(tid);
        }
        Ok(moved)
    }

    pub fn threads(&self) -> &[i32] {
        &self.threads
    }

    /// The signal that had stopped the process by job control, if it was stopped.
    pub fn job_stop(&self) -> Option<i32> {
        self.job_stop
    }

    /// Makes threads the leader creates from now on start traced (and stopped) by us.
    pub fn trace_clones(&self) -> Result<()> {
        sys::trace_clones(Pid::from_raw(self.pid), self.exit_kill).map_err(|errno| {
            InfectError::Ptrace {
                op: "SETOPTIONS(TRACECLONE)",
                tid: self.pid,
                errno,
            }
        })
    }

    /// Takes a thread that started traced (a traced clone) into the set released at the end.
    pub(crate) fn adopt(&mut self, tid: i32) {
        if !self.threads.contains(&tid) {
            self.threads.push(tid);
        }
    }

    /// Kills the process while it is frozen, and waits, as its tracer, until every thread has
    /// died: then the kernel hands the dead process to its real parent with a SIGCHLD, as if
    /// it had never been traced (a tracer that just goes away leaves the parent of a
    /// multi-threaded process without one).
    pub fn kill_and_reap(&mut self) -> Result<()> {
        self.kill()?;
        self.reap_killed()
    }

    /// The first half of `kill_and_reap`: SIGKILL, while every thread is frozen.
    pub fn kill(&mut self) -> Result<()> {
        stasis_sys::fault::point();
        nix::sys::signal::kill(Pid::from_raw(self.pid), nix::sys::signal::Signal::SIGKILL)
            .map_err(|errno| InfectError::Ptrace {
                op: "kill",
                tid: self.pid,
                errno,
            })?;
        self.released = true;
        stasis_sys::fault::point();
        Ok(())
    }

    /// The second half: waits until every thread of the killed process has died.
    pub fn reap_killed(&mut self) -> Result<()> {
        // The leader's death is reported last, once its group is empty.
        let mut order: Vec<i32> = self
            .threads
            .iter()
            .copied()
            .filter(|&t| t != self.pid)
            .collect();
        order.push(self.pid);
        for tid in order {
            loop {
                match sys::wait(Pid::from_raw(tid), false) {
                    Ok(Wait::Exited(_)) | Ok(Wait::Killed(_)) | Err(Errno::ECHILD) => break,
                    Ok(_) => continue,
                    Err(errno) => {
                        return Err(InfectError::Ptrace {
                            op: "wait",
                            tid,
                            errno,
                        })
                    }
                }
            }
        }
        Ok(())
    }

    /// For a thread that was waiting in `restart_syscall` when it was stopped: the call it
    /// restarts (`Err`: what its kernel stack showed instead). `None`: it was not seen there.
    pub fn restarting_call(&self, tid: i32) -> Option<&std::result::Result<i64, String>> {
        self.restarting
            .iter()
            .find(|(t, _)| *t == tid)
            .map(|(_, c)| c)
    }

    /// Whether the process is let go (or killed): it is no longer frozen by this `Seized`.
    pub fn is_released(&self) -> bool {
        self.released
    }

    /// The threads were let go by someone else (a lazy restore's tracer, which detached them
    /// itself): nothing to detach any more.
    pub fn forget(&mut self) {
        self.released = true;
    }

    /// Detaches every thread, letting the process run on. Idempotent.
    pub fn release(&mut self) -> Result<()> {
        if self.released {
            return Ok(());
        }
        self.released = true;
        let mut first_err = None;
        for &tid in &self.threads {
            match sys::detach(Pid::from_raw(tid)) {
                Ok(()) => {}
                // Gone, or not in a stop (then it was let go already): nothing to detach.
                Err(Errno::ESRCH) => tracing::debug!(tid, "detach: no such stopped thread"),
                Err(errno) => {
                    first_err.get_or_insert(InfectError::Ptrace {
                        op: "DETACH",
                        tid,
                        errno,
                    });
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// Whether thread `tid` of `pid` has exited (gone from /proc, or a zombie on its way out).
fn thread_is_gone(pid: i32, tid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat.get(i + 2..i + 3))
            .is_none_or(|state| matches!(state, "Z" | "X")),
    }
}

/// System calls that fail with EINTR, never restarting, when their thread is stopped (by our
/// interrupt as by SIGSTOP, see signal(7)): epoll_wait, epoll_pwait, epoll_pwait2,
/// io_getevents, io_pgetevents, semop, semtimedop, rt_sigtimedwait.
const EINTR_ON_STOP: &[u64] = &[232, 281, 441, 208, 333, 65, 220, 128];
const EINTR: u64 = (-4i64) as u64;
const ERESTARTNOHAND: u64 = (-514i64) as u64;

/// A thread our interrupt took out of one of `EINTR_ON_STOP` would see an EINTR nobody sent.
/// Its result is turned into -ERESTARTNOHAND, which the kernel resolves when the thread runs
/// again exactly as it would have without us: restart the call, or EINTR if a signal handler
/// runs first. So a freeze, a dump or a restore is invisible to it.
fn make_restartable(tid: i32) -> Result<()> {
    let t = Pid::from_raw(tid);
    let perr = |op| move |errno| InfectError::Ptrace { op, tid, errno };
    let mut regs = sys::get_regs(t).map_err(perr("GETREGS"))?;
    if regs.rax == EINTR && EINTR_ON_STOP.contains(&regs.orig_rax) {
        regs.rax = ERESTARTNOHAND;
        sys::set_regs(t, &regs).map_err(perr("SETREGS"))?;
        tracing::debug!(tid, nr = regs.orig_rax, "interrupted call made restartable");
    }
    Ok(())
}

impl Drop for Seized {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            tracing::warn!("releasing pid {}: {e}", self.pid);
        }
    }
}
