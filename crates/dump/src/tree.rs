//! The process tree: seizing a process and every descendant, and what the processes of a tree
//! share — open file descriptions inherited across fork, pipes between them, process groups
//! and sessions — checked as a whole once every process has been read.
//!
//! A zombie child (exited, not yet waited for) is recorded with its exit status; it is made
//! again and exits at once. Shared anonymous memory several processes map is one object
//! again on restore (`crates/restore/src/shm.rs`). What this does not bring back yet is
//! refused, naming the pid and the thing: a group or session whose leader is not in the tree
//! (or has exited), an epoll instance, a deleted file or memfd shared between processes.

use crate::TaskDump;
use anyhow::{bail, Context, Result};
use stasis_image::model::*;
use stasis_infect::Seized;
use std::collections::{HashMap, HashSet};

/// The tree of an ancestor of this stasis (the shell it runs in, init) would hold stasis
/// itself: refused before anything is frozen.
pub(crate) fn not_an_ancestor_of_ours(pid: i32) -> Result<()> {
    let mut p = std::process::id() as i32;
    for _ in 0..4096 {
        let Ok(st) = stasis_proc::stat(p) else {
            return Ok(());
        };
        if st.ppid == pid {
            bail!("pid {pid} is an ancestor of this stasis: its tree would hold stasis itself; dump a process stasis does not descend from");
        }
        if st.ppid <= 1 {
            return Ok(());
        }
        p = st.ppid;
    }
    Ok(())
}

/// One seized process of the tree.
pub(crate) struct Task {
    pub pid: i32,
    pub ppid: i32,
    pub seized: Seized,
}

/// Seizes `root` and every descendant. A frozen process cannot fork, so the children of every
/// seized process are listed (again) until a pass finds none new; a child that forked before
/// its parent froze is found when its own children are listed after it is frozen in turn.
/// Zombies cannot be seized (nor change): they are returned apart, read from /proc.
pub(crate) fn seize(root: i32) -> Result<(Vec<Task>, Vec<TreeZombie>)> {
    let ppid = stasis_proc::stat(root)?.ppid;
    let mut tasks = vec![Task {
        pid: root,
        ppid,
        seized: Seized::seize(root)?,
    }];
    let mut seen: HashSet<i32> = HashSet::from([root]);
    let mut zombies = Vec::new();
    loop {
        let mut fresh = Vec::new();
        for t in &tasks {
            for &tid in t.seized.threads() {
                let path = format!("/proc/{}/task/{tid}/children", t.pid);
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading the children of pid {}", t.pid))?;
                for c in text.split_whitespace() {
                    let c: i32 = c
                        .parse()
                        .with_context(|| format!("{path}: a child that is not a pid: {c:?}"))?;
                    if seen.insert(c) {
                        fresh.push((c, t.pid));
                    }
                }
            }
        }
        if fresh.is_empty() {
            break;
        }
        for (pid, ppid) in fresh {
            let st = stasis_proc::stat(pid)
                .with_context(|| format!("pid {pid}, a child of pid {ppid}"))?;
            if st.state == 'Z' || st.state == 'X' {
                zombies.push(zombie(pid, ppid)?);
                continue;
            }
            let seized = match Seized::seize(pid) {
                Ok(s) => s,
                Err(e) => {
                    // A child exiting at this very moment cannot be traced (EPERM) or has
                    // just gone: its parent is frozen, so it is about to be a zombie.
                    match exited(pid) {
                        Some(true) => {
                            zombies.push(zombie(pid, ppid)?);
                            continue;
                        }
                        Some(false) => continue,
                        None => {
                            return Err(anyhow::Error::from(e).context(format!(
                                "freezing pid {pid}, a child of pid {ppid}, with the tree of pid {root}"
                            )))
                        }
                    }
                }
            };
            tasks.push(Task { pid, ppid, seized });
        }
    }
    Ok((tasks, zombies))
}

/// For a child that could not be seized: `Some(true)` once it is a zombie, `Some(false)` if it
/// is gone altogether, `None` if it still runs (the failure was something else). An exiting
/// task becomes a zombie within moments; it is given 200 ms.
fn exited(pid: i32) -> Option<bool> {
    let t = std::time::Instant::now();
    loop {
        match stasis_proc::stat(pid) {
            Err(_) => return Some(false),
            Ok(st) if st.state == 'Z' || st.state == 'X' => return Some(true),
            Ok(_) if t.elapsed() > std::time::Duration::from_millis(200) => return None,
            Ok(_) => std::thread::sleep(std::time::Duration::from_millis(1)),
        }
    }
}

/// A zombie child of a frozen parent, from /proc/PID/stat (which a zombie keeps until it is
/// waited for): group, session, and the exit status its parent's wait would report.
fn zombie(pid: i32, ppid: i32) -> Result<TreeZombie> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let rest = text
        .rfind(')')
        .and_then(|i| text.get(i + 2..))
        .with_context(|| format!("{path}: no command name"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is f[0]: pgrp is field 5, session 6, exit_code 52.
    let num = |field: usize| -> Result<i32> {
        f.get(field - 3)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{path}: field {field} missing or not a number"))
    };
    Ok(TreeZombie {
        pid,
        ppid,
        pgid: num(5)?,
        sid: num(6)?,
        status: num(52)?,
    })
}

/// Checks the tree as a whole and records what its processes share; returns the restore order
/// of the descendants. `tasks` and `dumps` are in the same order, the root first.
pub(crate) fn settle(
    tasks: &[Task],
    zombies: Vec<TreeZombie>,
    dumps: &mut [TaskDump],
    shell_job: bool,
) -> Result<Tree> {
    separate(dumps)?;
    settle_ptys(dumps, shell_job)?;
    settle_pipes(dumps)?;
    settle_sockets(dumps)?;
    accepted_ends(dumps)?;
    share_descriptions(dumps)?;
    refuse_shared(dumps)?;
    let (order, helpers) = restore_order(tasks, &zombies, dumps)?;
    Ok(Tree {
        zombies,
        tasks: order
            .into_iter()
            .skip(1)
            .map(|i| TreeTask {
                pid: dumps[i].pid,
                ppid: tasks[i].ppid,
                pgid: dumps[i].process.pgid,
                sid: dumps[i].process.sid,
                helper: helpers.get(&i).map(|h| h.0),
                helper_session: helpers.get(&i).is_some_and(|h| h.1),
            })
            .collect(),
    })
}

/// Processes made with `clone` flags that share what fork copies (a vfork child that has not
/// exec'd shares the address space; CLONE_FILES, CLONE_FS, CLONE_SIGHAND) would come back as
/// separate copies: refused.
fn separate(dumps: &[TaskDump]) -> Result<()> {
    use stasis_sys::fs::Shared;
    for (i, a) in dumps.iter().enumerate() {
        for b in &dumps[..i] {
            for (what, name) in [
                (
                    Shared::Vm,
                    "its address space (a vfork child that has not exec'd yet)",
                ),
                (Shared::Files, "its descriptor table (CLONE_FILES)"),
                (Shared::Fs, "its cwd and umask (CLONE_FS)"),
                (Shared::Sighand, "its signal handlers (CLONE_SIGHAND)"),
            ] {
                match stasis_sys::fs::shares(a.pid, b.pid, what) {
                    Ok(false) => {}
                    Ok(true) => bail!(
                        "pid {} shares {name} with pid {}; not supported yet",
                        a.pid,
                        b.pid
                    ),
                    Err(e) => bail!("kcmp of pids {} and {}: {e}", a.pid, b.pid),
                }
            }
        }
    }
    Ok(())
}

/// Terminals, once the whole tree is known. A slave of a pty whose master is in the tree is
/// that pty's (it comes back with it); any other terminal is a shell job's, or refused. Every
/// controlling terminal must come back: a pty of the tree (its session in the tree, led by a
/// process holding its slave, its foreground group one of the tree's), or with `--shell-job`
/// the job's terminal for the root's session; anything else is refused.
fn settle_ptys(dumps: &mut [TaskDump], shell_job: bool) -> Result<()> {
    let mut ptys: HashMap<u32, (Option<i32>, i32)> = HashMap::new();
    for d in dumps.iter() {
        for p in &d.files.ptys {
            ptys.insert(p.index, (p.session, p.foreground));
        }
    }
    for d in dumps.iter_mut() {
        for desc in d.files.descs.iter_mut() {
            if let FileKind::Tty { rdev, .. } = desc.kind {
                if let Some(index) =
                    crate::files::slave_index(rdev).filter(|i| ptys.contains_key(i))
                {
                    desc.kind = FileKind::Pty {
                        index,
                        master: false,
                    };
                }
            }
        }
        crate::files::settle_shell_job(d.pid, shell_job, &mut d.files)?;
    }
    let root_sid = dumps.first().map_or(0, |d| d.process.sid);
    for (&index, &(session, fg)) in &ptys {
        let Some(s) = session else { continue };
        let Some(leader) = dumps.iter().find(|d| d.pid == s && d.process.sid == s) else {
            bail!("pty {index} is the controlling terminal of session {s}, whose leader is not among the dumped processes; not supported yet");
        };
        if fg != 0
            && !dumps
                .iter()
                .any(|d| d.process.pgid == fg && d.process.sid == s)
        {
            bail!("the foreground process group {fg} of pty {index} has no member among the dumped processes; not supported yet");
        }
        if shell_job && s == root_sid {
            bail!("pid {s} leads a session with pty {index} as its terminal, and --shell-job would give it the job's; not supported together");
        }
        let holds_slave = leader.files.descs.iter().any(|x| {
            matches!(x.kind, FileKind::Pty { index: i, master: false } if i == index)
                && leader.files.fds.iter().any(|f| f.desc == x.id)
        });
        if !holds_slave {
            bail!("pid {s} has pty {index} as its controlling terminal but holds no descriptor of its slave; not supported yet");
        }
    }
    for d in dumps.iter_mut() {
        let pr = &mut d.process;
        if pr.tty_nr == 0 {
            continue;
        }
        let t = pr.tty_nr;
        let (major, minor) = ((t >> 8) & 0xfff, (t & 0xff) | ((t >> 12) & 0xfff00));
        let rdev = libc::makedev(major as u32, minor as u32);
        if let Some(index) = crate::files::slave_index(rdev) {
            if let Some(&(session, fg)) = ptys.get(&index) {
                if session != Some(pr.sid) {
                    bail!(
                        "pid {} has pty {index} as its controlling terminal, but the pty says session {session:?}, not {}",
                        d.pid,
                        pr.sid
                    );
                }
                pr.ctty_pty = Some(CttyPty {
                    index,
                    foreground: fg,
                });
                continue;
            }
        }
        if shell_job && pr.sid == root_sid {
            // The job's terminal: the root's session is the restoring stasis's, with its
            // terminal.
            continue;
        }
        bail!(
            "pid {} has a controlling terminal (device {major}:{minor}) that would not come back: {}",
            d.pid,
            if shell_job {
                "it is not the shell job's (the root's session's) nor a pty of the dumped processes; not supported yet"
            } else {
                "dump it as a shell job (--shell-job) if it is the terminal it was started from"
            }
        );
    }
    Ok(())
}

/// A pipe with a read end and a write end somewhere in the tree comes back whole; one with an
/// end outside it is taken over from the restoring stasis on fds 0-2, or refused.
fn settle_pipes(dumps: &mut [TaskDump]) -> Result<()> {
    let mut ends: HashMap<u64, (bool, bool)> = HashMap::new();
    for d in dumps.iter() {
        for desc in &d.files.descs {
            if let FileKind::Pipe { inode, .. } = desc.kind {
                let (r, w) = crate::files::pipe_ends(desc.flags);
                let e = ends.entry(inode).or_default();
                e.0 |= r;
                e.1 |= w;
            }
        }
    }
    let mut internal: HashSet<u64> = ends
        .iter()
        .filter(|(_, (r, w))| *r && *w)
        .map(|(&i, _)| i)
        .collect();
    // A pipe with one kind of end in the tree whose other end nobody holds (closed, as a
    // parent closes its end after forking) comes back whole too: its other end is made and
    // closed again, so reads see the end of the data and writes get EPIPE, as before.
    let lonely: HashSet<u64> = ends
        .keys()
        .filter(|i| !internal.contains(i))
        .copied()
        .collect();
    if !lonely.is_empty() {
        let tree: HashSet<i32> = dumps.iter().map(|d| d.pid).collect();
        let held = held_elsewhere(&lonely, &tree);
        internal.extend(lonely.difference(&held));
    }
    for d in dumps.iter_mut() {
        crate::files::settle_pipes(d.pid, &mut d.files, &internal)?;
    }
    Ok(())
}

/// The pipes (by inode) of `inodes` that a process outside `tree` has a descriptor of.
fn held_elsewhere(inodes: &HashSet<u64>, tree: &HashSet<i32>) -> HashSet<u64> {
    let mut held = HashSet::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        // Cannot tell: every such pipe counts as held outside (taken over or refused).
        return inodes.clone();
    };
    for e in procs.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if tree.contains(&pid) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(link) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let ino = link
                .to_str()
                .and_then(|l| l.strip_prefix("pipe:["))
                .and_then(|l| l.strip_suffix(']'))
                .and_then(|n| n.parse::<u64>().ok());
            if let Some(ino) = ino.filter(|i| inodes.contains(i)) {
                held.insert(ino);
            }
        }
    }
    held
}

fn lent(kind: &FileKind) -> bool {
    matches!(
        kind,
        FileKind::Pipe {
            inherit: Some(_),
            ..
        } | FileKind::Tty {
            inherit: Some(_),
            ..
        }
    )
}

/// Gives one `tree_id` to the descriptions of different processes that are one description
/// (`kcmp`), and one to every end of a pipe used by more than one process.
fn share_descriptions(dumps: &mut [TaskDump]) -> Result<()> {
    let mut next = 0u32;
    // (dev, inode) → (process index, description id, fd) of every earlier description.
    type Holder = (usize, u32, i32);
    let mut earlier: HashMap<(u64, u64), Vec<Holder>> = HashMap::new();
    for q in 0..dumps.len() {
        let keys = dumps[q].desc_keys.clone();
        for k in keys {
            let Some(desc) = dumps[q].files.descs.iter().find(|d| d.id == k.id) else {
                continue;
            };
            if lent(&desc.kind) {
                continue;
            }
            let mut same = None;
            for &(p, pid_desc, pfd) in earlier.get(&k.file).into_iter().flatten() {
                let (ppid, qpid) = (dumps[p].pid, dumps[q].pid);
                match stasis_sys::fs::same_description(ppid, pfd, qpid, k.fd) {
                    Ok(true) => {
                        same = Some((p, pid_desc));
                        break;
                    }
                    Ok(false) => {}
                    Err(e) => bail!(
                        "cannot tell whether fd {pfd} of pid {ppid} and fd {} of pid {qpid} share one open file (kcmp: {e})",
                        k.fd
                    ),
                }
            }
            if let Some((p, pid_desc)) = same {
                let id = match dumps[p]
                    .files
                    .descs
                    .iter()
                    .find(|d| d.id == pid_desc)
                    .and_then(|d| d.tree_id)
                {
                    Some(id) => id,
                    None => {
                        next += 1;
                        set_tree_id(&mut dumps[p], pid_desc, next - 1);
                        next - 1
                    }
                };
                set_tree_id(&mut dumps[q], k.id, id);
            } else {
                earlier.entry(k.file).or_default().push((q, k.id, k.fd));
            }
        }
    }
    // A pipe between processes: every end of it, shared or not, is made by the restoring
    // stasis, so both ends belong to one pipe.
    let mut holders: HashMap<u64, HashSet<usize>> = HashMap::new();
    for (i, d) in dumps.iter().enumerate() {
        for desc in &d.files.descs {
            if let FileKind::Pipe {
                inode,
                inherit: None,
            } = desc.kind
            {
                holders.entry(inode).or_default().insert(i);
            }
        }
    }
    for d in dumps.iter_mut() {
        for desc in d.files.descs.iter_mut() {
            if let FileKind::Pipe {
                inode,
                inherit: None,
            } = desc.kind
            {
                if desc.tree_id.is_none() && holders.get(&inode).is_some_and(|h| h.len() > 1) {
                    desc.tree_id = Some(next);
                    next += 1;
                }
            }
        }
    }
    // A pty used by more than one process: every end of it is made by the restoring stasis,
    // so all belong to one pty.
    let mut holders: HashMap<u32, HashSet<usize>> = HashMap::new();
    for (i, d) in dumps.iter().enumerate() {
        for desc in &d.files.descs {
            if let FileKind::Pty { index, .. } = desc.kind {
                holders.entry(index).or_default().insert(i);
            }
        }
    }
    for d in dumps.iter_mut() {
        for desc in d.files.descs.iter_mut() {
            if let FileKind::Pty { index, .. } = desc.kind {
                if desc.tree_id.is_none() && holders.get(&index).is_some_and(|h| h.len() > 1) {
                    desc.tree_id = Some(next);
                    next += 1;
                }
            }
        }
    }
    // A unix pair between processes: both ends are made by the restoring stasis from one
    // socketpair, so each end is a shared description.
    let pair_key = |desc: &FileDesc| match &desc.kind {
        FileKind::Socket(s) => s
            .unix
            .as_ref()
            .and_then(|u| u.pair)
            .map(|peer| s.inode.min(peer)),
        _ => None,
    };
    let mut holders: HashMap<u64, HashSet<usize>> = HashMap::new();
    for (i, d) in dumps.iter().enumerate() {
        for key in d.files.descs.iter().filter_map(pair_key) {
            holders.entry(key).or_default().insert(i);
        }
    }
    for d in dumps.iter_mut() {
        for desc in d.files.descs.iter_mut() {
            let Some(key) = pair_key(desc) else { continue };
            if desc.tree_id.is_none() && holders.get(&key).is_some_and(|h| h.len() > 1) {
                desc.tree_id = Some(next);
                next += 1;
            }
        }
    }
    Ok(())
}

/// Which end of each connected pair with names a listener accepted: the one whose name is a
/// listener's in the tree, or (the listener closed since) the one with a name of its own when
/// the other has none or one the kernel chose. Refused: two ends with names of their own and
/// no listener to tell them apart, and a client bound to a path (its file would not come back
/// as it was).
fn accepted_ends(dumps: &mut [TaskDump]) -> Result<()> {
    let named = |a: &[u8]| a.len() > 2 && !crate::files::autobound(a);
    let mut listening: HashSet<Vec<u8>> = HashSet::new();
    let mut by_inode: HashMap<u64, (Vec<u8>, bool)> = HashMap::new();
    for d in dumps.iter() {
        for desc in &d.files.descs {
            if let FileKind::Socket(s) = &desc.kind {
                if matches!(s.state, SockState::Listening { .. }) && !s.local.is_empty() {
                    listening.insert(s.local.clone());
                }
                let file = s.unix.as_ref().is_some_and(|u| u.file.is_some());
                by_inode.insert(s.inode, (s.local.clone(), file));
            }
        }
    }
    for d in dumps.iter_mut() {
        let pid = d.pid;
        let fds = d.files.fds.clone();
        for desc in d.files.descs.iter_mut() {
            let id = desc.id;
            let FileKind::Socket(s) = &mut desc.kind else {
                continue;
            };
            let Some(peer) = s.unix.as_ref().and_then(|u| u.pair) else {
                continue;
            };
            let Some((peer_local, peer_file)) = by_inode.get(&peer).cloned() else {
                continue;
            };
            let fd = fds.iter().find(|f| f.desc == id).map_or(-1, |f| f.fd);
            let mine = !s.local.is_empty() && listening.contains(&s.local);
            let theirs = !peer_local.is_empty() && listening.contains(&peer_local);
            let accepted = match (mine, theirs) {
                (true, false) => true,
                (false, true) => false,
                (true, true) => bail!(
                    "fd {fd} of pid {pid}: both ends of a unix connection have a listener's name; not supported yet"
                ),
                (false, false) => match (named(&s.local), named(&peer_local)) {
                    (true, true) => bail!(
                        "fd {fd} of pid {pid}: the unix socket {} is connected to {}, both named, and no listener tells which accepted the other; not supported yet",
                        sockaddr_text(&s.local),
                        sockaddr_text(&peer_local)
                    ),
                    (mine, _) => mine,
                },
            };
            let client_file = if accepted {
                peer_file
            } else {
                s.unix.as_ref().is_some_and(|u| u.file.is_some())
            };
            let is_accepted_pair = accepted || theirs || named(&peer_local);
            if is_accepted_pair && client_file {
                bail!(
                    "fd {fd} of pid {pid}: a unix connection whose client is bound to a path; not supported yet"
                );
            }
            if let Some(u) = s.unix.as_mut() {
                u.accepted = accepted;
                u.client = !accepted && (theirs || (!mine && named(&peer_local)));
            }
        }
    }
    Ok(())
}

/// Every unix pair must have both ends among the dumped processes (or its other end closed).
fn settle_sockets(dumps: &[TaskDump]) -> Result<()> {
    let inodes: HashSet<u64> = dumps
        .iter()
        .flat_map(|d| d.files.descs.iter())
        .filter_map(|desc| match &desc.kind {
            FileKind::Socket(s) => Some(s.inode),
            _ => None,
        })
        .collect();
    // Connections a listener has not accepted yet come back by connecting again: listener
    // and client in one process.
    for d in dumps {
        let fd_of = |id: u32| {
            d.files
                .fds
                .iter()
                .find(|f| f.desc == id)
                .map_or(-1, |f| f.fd)
        };
        let socks: Vec<(u32, &Socket)> = d
            .files
            .descs
            .iter()
            .filter_map(|desc| match &desc.kind {
                FileKind::Socket(s) => Some((desc.id, &**s)),
                _ => None,
            })
            .collect();
        let waiting: HashSet<u64> = socks
            .iter()
            .flat_map(|(_, s)| s.unix.iter().flat_map(|u| u.backlog.iter().copied()))
            .collect();
        for &(id, s) in &socks {
            if s.unix.as_ref().is_some_and(|u| u.pending) && !waiting.contains(&s.inode) {
                bail!(
                    "fd {} of pid {} is connected to the listener {}, which has not accepted it yet and is not in this process; not supported yet",
                    fd_of(id),
                    d.pid,
                    sockaddr_text(&s.remote)
                );
            }
        }
        for &(id, s) in &socks {
            for client in s.unix.iter().flat_map(|u| u.backlog.iter()) {
                let ours = socks.iter().any(|(_, c)| {
                    c.inode == *client
                        && c.unix.as_ref().is_some_and(|u| u.pending)
                        && c.remote == s.local
                });
                if !ours {
                    bail!(
                        "fd {} of pid {} is the unix listener {}, with a connection waiting to be accepted from a socket outside this process; not supported yet",
                        fd_of(id),
                        d.pid,
                        sockaddr_text(&s.local)
                    );
                }
            }
        }
    }
    for d in dumps {
        for desc in &d.files.descs {
            let FileKind::Socket(s) = &desc.kind else {
                continue;
            };
            let Some(peer) = s.unix.as_ref().and_then(|u| u.pair) else {
                continue;
            };
            let fd = d
                .files
                .fds
                .iter()
                .find(|f| f.desc == desc.id)
                .map_or(-1, |f| f.fd);
            if !inodes.contains(&peer) {
                bail!(
                    "fd {fd} of pid {} is a unix socket connected to socket {peer}, which is outside the dumped processes; not supported yet",
                    d.pid
                );
            }
        }
    }
    Ok(())
}

fn set_tree_id(d: &mut TaskDump, desc: u32, id: u32) {
    if let Some(x) = d.files.descs.iter_mut().find(|x| x.id == desc) {
        x.tree_id = Some(id);
    }
}

/// What processes of the tree share but a restore cannot give back shared yet.
fn refuse_shared(dumps: &[TaskDump]) -> Result<()> {
    for d in dumps {
        for desc in d.files.descs.iter().filter(|x| x.tree_id.is_some()) {
            let what = match &desc.kind {
                FileKind::Socket(s)
                    if s.unix
                        .as_ref()
                        .is_some_and(|u| u.pending || !u.backlog.is_empty()) =>
                {
                    "a unix listener with connections waiting, or a client waiting on one,"
                }
                FileKind::Epoll { .. } => "an epoll instance",
                FileKind::Tty { .. } => "a terminal opened again",
                _ => continue,
            };
            let fd = d
                .files
                .fds
                .iter()
                .find(|f| f.desc == desc.id)
                .map_or(-1, |f| f.fd);
            bail!("fd {fd} of pid {} is {what} shared with another process of the tree; not supported yet", d.pid);
        }
    }
    Ok(())
}

/// Parents before children, siblings by pid; each process's session and group must be one a
/// restore can make: its own, its parent's, or (a group) one led by an ancestor or by a sibling
/// created before it — or one whose leader is gone and whose number is no process of the tree:
/// the first member made then gets a helper task that makes it (`TreeTask::helper`), and later
/// members of that group join it. Returns indexes into `dumps`, the root first, and the
/// helpers: index → (number, whether it is a session).
type Helpers = HashMap<usize, (i32, bool)>;

fn restore_order(
    tasks: &[Task],
    zombies: &[TreeZombie],
    dumps: &[TaskDump],
) -> Result<(Vec<usize>, Helpers)> {
    let mut helpers: Helpers = HashMap::new();
    // Groups made by helpers so far: (group, session).
    let mut lost: Vec<(i32, i32)> = Vec::new();
    let taken = |n: i32| {
        dumps
            .iter()
            .any(|d| d.pid == n || d.cores.iter().any(|c| c.tid == n))
            || zombies.iter().any(|z| z.pid == n)
    };
    let index: HashMap<i32, usize> = dumps.iter().enumerate().map(|(i, d)| (d.pid, i)).collect();
    let mut children: HashMap<i32, Vec<usize>> = HashMap::new();
    for (i, t) in tasks.iter().enumerate().skip(1) {
        children.entry(t.ppid).or_default().push(i);
    }
    for c in children.values_mut() {
        c.sort_by_key(|&i| dumps[i].pid);
    }
    let mut order = Vec::with_capacity(dumps.len());
    let mut stack = vec![0usize];
    while let Some(i) = stack.pop() {
        order.push(i);
        if let Some(c) = children.get(&dumps[i].pid) {
            stack.extend(c.iter().rev());
        }
    }
    // A zombie is made before its parent's live children (so a group it led exists for
    // them), in its parent's session and group or leading its own.
    for z in zombies {
        let parent = &dumps[index[&z.ppid]].process;
        if (z.sid != z.pid && z.sid != parent.sid) || (z.pgid != z.pid && z.pgid != parent.pgid) {
            bail!(
                "zombie pid {} (a child of pid {}) is in group {} / session {} that a restore cannot make; not supported yet",
                z.pid, z.ppid, z.pgid, z.sid
            );
        }
    }
    for &i in order.iter().skip(1) {
        let (pid, pr) = (dumps[i].pid, &dumps[i].process);
        let parent = &dumps[index[&tasks[i].ppid]].process;
        if pr.sid != pid
            && pr.sid != parent.sid
            && !taken(pr.sid)
            && !lost.iter().any(|&(_, s)| s == pr.sid)
            && (pr.pgid == pr.sid || pr.pgid == pid)
        {
            // A session whose leader is gone: a helper with its number makes it.
            helpers.insert(i, (pr.sid, true));
            lost.push((pr.sid, pr.sid));
            continue;
        }
        if pr.sid != pid && pr.sid != parent.sid {
            bail!(
                "pid {pid} is in session {}, whose leader is not in the tree of pid {} (or has exited); not supported yet",
                pr.sid,
                dumps[0].pid
            );
        }
        if pr.pgid == pid || pr.pgid == parent.pgid {
            continue;
        }
        if lost.contains(&(pr.pgid, pr.sid)) {
            continue; // a group a helper made for an earlier member: joined
        }
        if !taken(pr.pgid) && pr.sid == parent.sid && !index.contains_key(&pr.pgid) {
            helpers.insert(i, (pr.pgid, false));
            lost.push((pr.pgid, pr.sid));
            continue;
        }
        let zombie_sibling = zombies.iter().any(|z| {
            z.pid == pr.pgid && z.pgid == z.pid && z.ppid == tasks[i].ppid && z.sid == pr.sid
        });
        let leader = index.get(&pr.pgid).copied();
        let ok = zombie_sibling
            || leader.is_some_and(|l| {
                let lp = &dumps[l].process;
                let is_ancestor = {
                    let mut a = tasks[i].ppid;
                    loop {
                        if a == dumps[l].pid {
                            break true;
                        }
                        match index.get(&a) {
                            Some(&ai) if ai != 0 => a = tasks[ai].ppid,
                            _ => break false,
                        }
                    }
                };
                let earlier_sibling = tasks[l].ppid == tasks[i].ppid
                    && order.iter().position(|&x| x == l) < order.iter().position(|&x| x == i);
                lp.pgid == dumps[l].pid && lp.sid == pr.sid && (is_ancestor || earlier_sibling)
            });
        if !ok {
            bail!(
                "pid {pid} is in process group {}, whose leader is not in the tree of pid {} (or has exited, or is neither an ancestor nor an elder sibling); not supported yet",
                pr.pgid,
                dumps[0].pid
            );
        }
    }
    Ok((order, helpers))
}
