//! Creating the tasks with the dumped pids (`clone3` with `set_tid`) and the handshake with
//! them while they prepare themselves (`child.rs`); the guard that kills half-made tasks.
//!
//! The root task is created by this stasis; every other task by its own parent task, so that
//! the parent links are the dumped ones. What several processes of the tree share — one open
//! file description inherited across fork, the ends of a pipe between them — and what the
//! restoring stasis lends (a shell job's terminal, outside pipes on fds 0-2) is opened here,
//! once, before the root exists (`Plumbing`), at numbers above anything any task uses: every
//! task inherits them through fork, takes what it needs, and closes the rest.

use crate::fds::Helpers;
use crate::files::FileData;
use anyhow::{bail, Context, Result};
use stasis_image::Image;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// Kills the half-made tasks unless the restore got to the end (the root is ours to reap; the
/// others die with it or are reaped by whoever inherits them).
pub(crate) struct TreeGuard {
    pub(crate) pids: Vec<i32>,
    pub(crate) armed: bool,
}

impl Drop for TreeGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        for &p in self.pids.iter().rev() {
            let pid = nix::unistd::Pid::from_raw(p);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        // Reap the root. Its threads we trace must be reaped first (by us, their tracer), or
        // the root's death is never reported: reap whatever dies, until the root has.
        let Some(&root) = self.pids.first() else {
            return;
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            // SAFETY: waitpid with no status pointer.
            let r =
                unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG | libc::__WALL) };
            if r == root || (r == -1 && nix::errno::Errno::last() == nix::errno::Errno::ECHILD) {
                return;
            }
            if r == 0 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        tracing::warn!("pid {root} was killed but is not reaped yet");
    }
}

/// The descriptors every task inherits from this stasis (see the module doc).
pub(crate) struct Plumbing {
    /// Where they are: above every number any task uses.
    pub base: RawFd,
    /// `tree_id` → its description.
    pub shared: HashMap<u32, RawFd>,
    /// This stasis's own descriptor lent to the tree (fd n, as the image names it) → its copy.
    pub lent: HashMap<RawFd, RawFd>,
    /// Per task: the task's ends of its ready pipe (it writes) and hold pipe (it reads).
    pub ends: Vec<(RawFd, RawFd)>,
    /// Shared anonymous memory several processes map: object id → a descriptor of it.
    pub shm: HashMap<u64, RawFd>,
    /// Deleted files and memfds more than one process uses, by (dev, inode): made once here,
    /// so the processes share one file again.
    pub unnamed: HashMap<(u64, u64), RawFd>,
    /// All of the above, held until the root has inherited them.
    owned: Vec<OwnedFd>,
}

/// One task of the tree to create: its image, its helpers, what it needs from pages.img, and
/// the tasks it creates in turn (indexes, in creation order).
pub(crate) struct TaskPlan<'a> {
    pub img: &'a Image,
    pub helpers: &'a Helpers,
    pub data: &'a FileData,
    pub children: Vec<usize>,
    /// The dumped process group of its parent (`None` for the root).
    pub parent_pgid: Option<i32>,
    /// A helper task that makes its group or session first (`TreeTask::helper`).
    pub helper: Option<(i32, bool)>,
    /// Its children that were zombies: made first, each exits at once with its status.
    pub zombies: Vec<stasis_image::model::TreeZombie>,
}

/// Everything the tasks need while they make themselves; each task is a copy of this stasis,
/// so each reads its part from its own copy.
pub(crate) struct Spawn<'a> {
    pub tasks: Vec<TaskPlan<'a>>,
    pub plumbing: Plumbing,
    /// A shell job (`--shell-job`): the root joins this stasis's session and process group,
    /// whose terminal it is given (as CRIU does), instead of making its own.
    pub shell_job: bool,
    /// `--lazy-pages`: each task's userfaultfd reports forks, moves, drops and unmaps too.
    pub lazy: bool,
}

/// The parent's ends of the handshakes: a task blocks reading its hold pipe until it is
/// seized; dropping these lets any task that was not seized exit.
pub struct Children {
    _hold_w: Vec<OwnedFd>,
}

impl Plumbing {
    pub(crate) fn new(
        tasks: &[TaskPlan<'_>],
        tree_shm: &std::collections::HashSet<u64>,
    ) -> Result<Plumbing> {
        let top = tasks
            .iter()
            .map(|t| t.helpers.fd_limit(t.img))
            .max()
            .unwrap_or(1024);
        let base = i32::try_from(top + 64).context("descriptor numbers out of range")?;
        let shared_n: usize = tasks.iter().map(|t| t.img.files.descs.len()).sum();
        let need = base as u64 + shared_n as u64 + 3 * tasks.len() as u64 + 64;
        raise_fd_limit(need)?;
        let mut p = Plumbing {
            base,
            shared: HashMap::new(),
            lent: HashMap::new(),
            ends: Vec::new(),
            shm: HashMap::new(),
            unnamed: HashMap::new(),
            owned: Vec::new(),
        };
        let imgs: Vec<&Image> = tasks.iter().map(|t| t.img).collect();
        for id in tree_shm {
            let fd = crate::shm::make(*id, &imgs, base)?;
            p.shm.insert(*id, fd.as_raw_fd());
            p.owned.push(fd);
        }
        let with_data: Vec<(&Image, &FileData)> = tasks.iter().map(|t| (t.img, t.data)).collect();
        for (key, fd) in crate::files::make_shared_unnamed(&with_data, base)? {
            p.unnamed.insert(key, fd.as_raw_fd());
            p.owned.push(fd);
        }
        for (id, fd) in crate::files::open_shared(&with_data, base, &p.unnamed)? {
            p.shared.insert(id, fd.as_raw_fd());
            p.owned.push(fd);
        }
        for t in tasks {
            for d in &t.img.files.descs {
                if let Some(n) = crate::files::inherited_from(&d.kind) {
                    if p.lent.contains_key(&n) {
                        continue;
                    }
                    // SAFETY: n is one of this stasis's own descriptors, found open by
                    // `check_lent`; it stays open while it is duplicated.
                    let lent = unsafe { std::os::fd::BorrowedFd::borrow_raw(n) };
                    let copy = crate::files::dup_at_least(lent, base)
                        .with_context(|| format!("lending fd {n} to the restored tree"))?;
                    p.lent.insert(n, copy.as_raw_fd());
                    p.owned.push(copy);
                }
            }
        }
        Ok(p)
    }
}

/// The session of the root, when its leader is gone and its number free: made again by a
/// helper task with that pid (a session outlives its leader; its number is taken while any
/// member uses it). Only the simple shape — the root in the session leader's own group, as a
/// daemon that forked twice is — is made this way; otherwise, or when the number is in use
/// (a shell job's session), the root joins the restoring stasis's session, as before.
fn session_helper(root: &Image) -> Option<i32> {
    let pr = &root.process;
    let pid = root.inventory.pid;
    let ours = nix::unistd::getsid(None).map(|s| s.as_raw()).unwrap_or(0);
    if pr.sid == pid || pr.sid <= 0 || pr.sid == ours || pr.pgid != pr.sid {
        return None;
    }
    if std::path::Path::new(&format!("/proc/{}", pr.sid)).exists() {
        return None;
    }
    Some(pr.sid)
}

/// Raises RLIMIT_NOFILE to at least `want` (the hard limit too: we are root).
fn raise_fd_limit(want: u64) -> Result<()> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (cur, max) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit(RLIMIT_NOFILE)")?;
    if cur >= want {
        return Ok(());
    }
    setrlimit(Resource::RLIMIT_NOFILE, want, max.max(want))
        .with_context(|| format!("raising RLIMIT_NOFILE to {want} for the restore"))
}

/// Creates every task — the root here, each other one by its parent task — and waits until
/// each has prepared itself and blocks, waiting to be seized.
pub(crate) fn spawn_tree(mut spawn: Spawn<'_>, guard: &mut TreeGuard) -> Result<Children> {
    let mut host_ends = Vec::with_capacity(spawn.tasks.len());
    for _ in &spawn.tasks {
        let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let (hold_r, hold_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let base = spawn.plumbing.base;
        let w = crate::files::dup_at_least(&ready_w, base)?;
        let r = crate::files::dup_at_least(&hold_r, base)?;
        spawn.plumbing.ends.push((w.as_raw_fd(), r.as_raw_fd()));
        spawn.plumbing.owned.push(w);
        spawn.plumbing.owned.push(r);
        host_ends.push((ready_r, hold_w));
    }
    let root = spawn.tasks[0].img.inventory.pid;
    let session = if spawn.shell_job {
        None
    } else {
        session_helper(spawn.tasks[0].img)
    };
    if let Some(s) = session {
        // The helper's children come back to us when it exits.
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
            bail!(
                "prctl(PR_SET_CHILD_SUBREAPER): {}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: as below, for the helper.
        match unsafe { stasis_sys::clone::clone3_with_pid(s) } {
            Ok(0) => {
                // The helper: leader of a new session (and group) with the old number, it
                // creates the root inside it and leaves; the session lives on in the root.
                if nix::unistd::setsid().is_err() {
                    stasis_sys::process::exit_now(1);
                }
                // SAFETY: this task is single-threaded.
                match unsafe { stasis_sys::clone::clone3_with_pid(root) } {
                    Ok(0) => {
                        drop(host_ends);
                        crate::child::child_main(&spawn, 0)
                    }
                    Ok(_) => stasis_sys::process::exit_now(0),
                    Err(_) => stasis_sys::process::exit_now(2),
                }
            }
            Ok(_) => {}
            Err(e) => bail!("creating a helper with pid {s} to make session {s} again: {e}"),
        }
        let helper = nix::unistd::Pid::from_raw(s);
        let status = nix::sys::wait::waitpid(helper, None);
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0) };
        guard.pids = spawn.tasks.iter().map(|t| t.img.inventory.pid).collect();
        guard.armed = true;
        if !matches!(status, Ok(nix::sys::wait::WaitStatus::Exited(_, 0))) {
            bail!(
                "the helper that makes session {s} again failed ({status:?}) creating pid {root}"
            );
        }
    }
    // SAFETY: stasis is single-threaded here, so the child may keep running ordinary Rust
    // code, like after fork (it never returns from child_main).
    let r = match session {
        Some(_) => Ok(root),
        None => unsafe { stasis_sys::clone::clone3_with_pid(root) },
    };
    let r = match r {
        Ok(r) => r,
        Err(e) => bail!(
            "creating pid {root} with clone3(set_tid): {e}{}",
            if e == nix::errno::Errno::EPERM {
                " (needs root or CAP_CHECKPOINT_RESTORE)"
            } else {
                ""
            }
        ),
    };
    if r == 0 {
        drop(host_ends);
        crate::child::child_main(&spawn, 0);
    }
    guard.pids = spawn.tasks.iter().map(|t| t.img.inventory.pid).collect();
    guard.armed = true;
    // The root has them all now; our copies would keep the ready pipes from ending.
    spawn.plumbing.owned.clear();
    let mut holds = Vec::with_capacity(host_ends.len());
    for (t, (ready_r, hold_w)) in spawn.tasks.iter().zip(host_ends) {
        let pid = t.img.inventory.pid;
        // Each task reports "OK" or an error message, then blocks.
        let mut msg = Vec::new();
        let mut f = std::fs::File::from(ready_r);
        use std::io::Read;
        let _ = f.read_to_end(&mut msg);
        let text = String::from_utf8_lossy(&msg).into_owned();
        if text != "OK" {
            bail!(
                "preparing pid {pid}: {}",
                if text.is_empty() {
                    "the new task died"
                } else {
                    text.as_str()
                }
            );
        }
        holds.push(hold_w);
    }
    Ok(Children { _hold_w: holds })
}
