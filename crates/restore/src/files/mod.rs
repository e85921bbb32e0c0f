//! Opening the dumped open file descriptions again, inside the new task (which still runs
//! stasis's code, see `child.rs`).
//!
//! Each kind of file is one module with one [`Open`]: what it must wait for and how to open
//! its description. This engine knows no kind: it takes over the descriptors the restoring
//! stasis lends (a shell job's terminal, outside pipes), opens every other description in an
//! order that respects each kind's `after`, and only then puts each descriptor at its number,
//! as a duplicate of its description, so descriptors that shared a description (and its offset
//! and flags) share it again.
//!
//! Invariant: until [`place`], every descriptor the engine holds sits at or above
//! `stage_base`, above every number the image uses, so opening one never lands on (or
//! `dup3` over) a descriptor already placed; stasis's own descriptors never reach the
//! restored process because everything not placed is closed at the end (`close_unplaced`).

mod chardev;
mod epoll;
mod eventfd;
mod fifo;
mod inotify;
pub(crate) mod lock;
mod path;
mod pipe;
mod pty;
mod socket;
mod timers;
mod tty;
mod unnamed;

use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag};
use stasis_image::model::*;
use stasis_image::Image;
use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

/// One kind of file, as the restore opens it.
pub(crate) trait Open: Sync {
    /// Descriptions that must be open before this one can be.
    fn after(&self, _d: &FileDesc, _cx: &OpenCx) -> Vec<u32> {
        Vec::new()
    }
    /// Opens the description (anywhere: the engine moves it to the staging range).
    fn open(&self, d: &FileDesc, cx: &mut OpenCx) -> Result<OwnedFd>;
    /// Runs once every descriptor is at its number (`fd` is this description, staged).
    fn after_place(&self, _d: &FileDesc, _fd: BorrowedFd<'_>, _cx: &OpenCx) -> Result<()> {
        Ok(())
    }
}

/// The one dispatch from a dumped kind to its operations.
fn ops(kind: &FileKind) -> &'static dyn Open {
    match kind {
        FileKind::Path { .. } => &path::PATH,
        FileKind::Unnamed { .. } => &unnamed::UNNAMED,
        FileKind::CharDev { .. } => &chardev::CHARDEV,
        FileKind::Pipe { .. } => &pipe::PIPE,
        FileKind::Tty { .. } => &tty::TTY,
        FileKind::Pty { .. } => &pty::PTY,
        FileKind::EventFd { .. } => &eventfd::EVENTFD,
        FileKind::Epoll { .. } => &epoll::EPOLL,
        FileKind::Socket(_) => &socket::SOCKET,
        FileKind::TimerFd { .. } => &timers::TIMERFD,
        FileKind::SignalFd { .. } => &timers::SIGNALFD,
        FileKind::Inotify { .. } => &inotify::INOTIFY,
        FileKind::Fifo { .. } => &fifo::FIFO,
    }
}

/// What the new task needs from pages.img, read by the parent before the task exists (the
/// task closes every descriptor of stasis's, the image reader's among them): pipe buffers and
/// the contents of unnamed files.
#[derive(Default)]
pub struct FileData {
    pub pipes: HashMap<u64, Vec<u8>>,
    pub unnamed: HashMap<(u64, u64), Vec<u8>>,
    /// Sockets' receive queues, by inode.
    pub socks: HashMap<u64, Vec<u8>>,
    /// Named pipes' data, by (dev, inode).
    pub fifos: HashMap<(u64, u64), Vec<u8>>,
    /// TCP connections' send queues, by inode.
    pub tcp_send: HashMap<u64, Vec<u8>>,
    /// Ptys' queues (slave's input, master's input), by pty number.
    pub ptys: HashMap<u32, (Vec<u8>, Vec<u8>)>,
}

impl FileData {
    /// Reads it all; every range was checked against pages.img when the image was loaded.
    pub fn read(img: &Image) -> Result<FileData> {
        let read = |off: u64, len: u64| -> Result<Vec<u8>> {
            let mut buf = vec![0u8; len as usize];
            if len > 0 {
                img.pages.read_at(off, &mut buf)?;
            }
            Ok(buf)
        };
        let mut out = FileData::default();
        for p in &img.files.pipes {
            out.pipes.insert(p.inode, read(p.data_off, p.len)?);
        }
        for u in &img.files.unnamed {
            out.unnamed
                .insert((u.dev, u.inode), read(u.data_off, u.len)?);
        }
        for f in &img.files.fifos {
            out.fifos.insert((f.dev, f.inode), read(f.data_off, f.len)?);
        }
        for p in &img.files.ptys {
            out.ptys.insert(
                p.index,
                (
                    read(p.input_off, p.input_len)?,
                    read(p.output_off, p.output_len)?,
                ),
            );
        }
        for d in &img.files.descs {
            if let FileKind::Socket(s) = &d.kind {
                out.socks
                    .insert(s.inode, read(s.queue.data_off, s.queue.len)?);
                if let Some(t) = &s.tcp {
                    out.tcp_send
                        .insert(s.inode, read(t.send.data_off, t.send.len)?);
                }
            }
        }
        Ok(out)
    }
}

/// The engine's state while one task's files are opened.
pub(crate) struct OpenCx<'a> {
    pub img: &'a Image,
    pub data: &'a FileData,
    /// Where staged descriptors go: above the image's numbers and the helpers.
    pub stage_base: RawFd,
    /// Description id → its staged descriptor.
    pub staged: HashMap<u32, OwnedFd>,
    /// Unnamed files recreated so far, by (dev, inode).
    pub unnamed: HashMap<(u64, u64), OwnedFd>,
    /// Pipes created so far, by inode.
    pub pipes: HashMap<u64, pipe::Pair>,
    /// Both ends of every unix pair made so far, by each end's dumped inode.
    pub socks: HashMap<u64, OwnedFd>,
    /// Each named pipe's anchor (open for reading and writing), by (dev, inode).
    pub fifos: HashMap<(u64, u64), OwnedFd>,
    /// Ptys made so far, by their number at the dump.
    pub ptys: HashMap<u32, pty::Made>,
    /// What each pty this engine may make is made from, by its number at the dump.
    pub pty_sources: HashMap<u32, pty::Source>,
}

impl<'a> OpenCx<'a> {
    /// Moves `fd` into the staging range (close-on-exec) and closes the original.
    pub fn stage(&self, fd: OwnedFd) -> Result<OwnedFd> {
        if fd.as_raw_fd() >= self.stage_base {
            return Ok(fd);
        }
        dup_at_least(&fd, self.stage_base)
    }

    /// The descriptor of an unnamed file, recreating it on first use.
    pub fn unnamed_fd(&mut self, dev: u64, inode: u64) -> Result<RawFd> {
        if let Some(fd) = self.unnamed.get(&(dev, inode)) {
            return Ok(fd.as_raw_fd());
        }
        let fd = unnamed::recreate(self, dev, inode)?;
        let fd = self.stage(fd)?;
        let raw = fd.as_raw_fd();
        self.unnamed.insert((dev, inode), fd);
        Ok(raw)
    }
}

/// Takes over the descriptors the restoring stasis lends (each description with `inherit`),
/// then opens every other description. Returns the engine state holding them all, staged.
pub(crate) fn open_all<'a>(
    img: &'a Image,
    data: &'a FileData,
    stage_base: RawFd,
    plumbing: &crate::spawn::Plumbing,
) -> Result<OpenCx<'a>> {
    let mut cx = OpenCx {
        img,
        data,
        stage_base,
        staged: HashMap::new(),
        unnamed: HashMap::new(),
        pipes: HashMap::new(),
        socks: HashMap::new(),
        fifos: HashMap::new(),
        ptys: HashMap::new(),
        pty_sources: pty_sources(&[(img, data)]),
    };
    seed_unnamed(&mut cx, &plumbing.unnamed)?;
    for d in &img.files.descs {
        if let Some(n) = inherited_from(&d.kind) {
            let Some(&copy) = plumbing.lent.get(&n) else {
                bail!("fd {n} of the restoring stasis was not lent to the tree");
            };
            // SAFETY: copy is the restoring stasis's fd n duplicated above every number the
            // task uses (`Plumbing`), inherited and not closed before `close_unplaced`.
            let lent = unsafe { BorrowedFd::borrow_raw(copy) };
            let fd = dup_at_least(lent, stage_base)
                .with_context(|| format!("taking over fd {n} from stasis"))?;
            set_status_flags(&fd, d.flags)?;
            cx.staged.insert(d.id, fd);
        } else if let Some(t) = d.tree_id {
            let Some(&shared) = plumbing.shared.get(&t) else {
                bail!("shared description {t} was not opened for the tree");
            };
            // SAFETY: as above: opened by the restoring stasis for the tree, inherited.
            let fd = dup_at_least(unsafe { BorrowedFd::borrow_raw(shared) }, stage_base)
                .with_context(|| format!("taking the shared {}", describe(img, d)))?;
            cx.staged.insert(d.id, fd);
        }
    }
    let mut left: Vec<&FileDesc> = img
        .files
        .descs
        .iter()
        .filter(|d| !cx.staged.contains_key(&d.id))
        .collect();
    while !left.is_empty() {
        let before = left.len();
        let mut i = 0;
        while i < left.len() {
            let d = left[i];
            let ops = ops(&d.kind);
            if ops
                .after(d, &cx)
                .iter()
                .all(|id| cx.staged.contains_key(id))
            {
                let fd = ops
                    .open(d, &mut cx)
                    .with_context(|| format!("opening {}", describe(img, d)))?;
                let fd = cx.stage(fd)?;
                cx.staged.insert(d.id, fd);
                left.remove(i);
            } else {
                i += 1;
            }
        }
        if left.len() == before {
            bail!(
                "the open files wait on each other in a circle ({})",
                describe(img, left[0])
            );
        }
    }
    Ok(cx)
}

/// Opens, in the restoring stasis, every description shared by processes of the tree (each
/// once, from the image of the first process holding it; the ends of one pipe from one pipe),
/// at numbers ≥ `base`. `load_tree` allowed only kinds that need no task of their own.
pub(crate) fn open_shared(
    imgs: &[(&Image, &FileData)],
    base: RawFd,
    unnamed: &HashMap<(u64, u64), RawFd>,
) -> Result<Vec<(u32, OwnedFd)>> {
    let mut out: Vec<(u32, OwnedFd)> = Vec::new();
    let mut pipes = HashMap::new();
    let mut socks = HashMap::new();
    let mut ptys = HashMap::new();
    let mut sources = pty_sources(imgs);
    for &(img, data) in imgs {
        let mut cx = OpenCx {
            img,
            data,
            stage_base: base,
            staged: HashMap::new(),
            unnamed: HashMap::new(),
            pipes: std::mem::take(&mut pipes),
            socks: std::mem::take(&mut socks),
            fifos: HashMap::new(),
            ptys: std::mem::take(&mut ptys),
            pty_sources: std::mem::take(&mut sources),
        };
        seed_unnamed(&mut cx, unnamed)?;
        for d in &img.files.descs {
            let Some(t) = d.tree_id else { continue };
            if out.iter().any(|(id, _)| *id == t) {
                continue;
            }
            let fd = ops(&d.kind)
                .open(d, &mut cx)
                .with_context(|| format!("opening the shared {}", describe(img, d)))?;
            out.push((t, cx.stage(fd)?));
        }
        pipes = std::mem::take(&mut cx.pipes);
        socks = std::mem::take(&mut cx.socks);
        ptys = std::mem::take(&mut cx.ptys);
        sources = std::mem::take(&mut cx.pty_sources);
    }
    Ok(out)
}

/// Makes, in the restoring stasis, every deleted file or memfd that more than one process of
/// the tree uses (by descriptor or mapping), once, from the first image holding it.
pub(crate) fn make_shared_unnamed(
    imgs: &[(&Image, &FileData)],
    base: RawFd,
) -> Result<Vec<((u64, u64), OwnedFd)>> {
    let mut users: HashMap<(u64, u64), usize> = HashMap::new();
    for (img, _) in imgs {
        for u in &img.files.unnamed {
            *users.entry((u.dev, u.inode)).or_default() += 1;
        }
    }
    let mut out = Vec::new();
    for &(img, data) in imgs {
        for u in &img.files.unnamed {
            let key = (u.dev, u.inode);
            if users.get(&key).is_some_and(|&n| n > 1) && !out.iter().any(|(k, _)| *k == key) {
                let fd = unnamed::recreate_from(img, data, u.dev, u.inode)
                    .with_context(|| format!("making the shared unnamed file {}", u.inode))?;
                out.push((key, dup_at_least(&fd, base)?));
            }
        }
    }
    Ok(out)
}

/// Gives the engine the tree's shared unnamed files that its image uses (duplicates, staged).
fn seed_unnamed(cx: &mut OpenCx, shared: &HashMap<(u64, u64), RawFd>) -> Result<()> {
    for u in &cx.img.files.unnamed {
        if let Some(&fd) = shared.get(&(u.dev, u.inode)) {
            // SAFETY: made by the restoring stasis for the tree (`Plumbing`), open until the
            // tree is made.
            let copy = dup_at_least(unsafe { BorrowedFd::borrow_raw(fd) }, cx.stage_base)?;
            cx.unnamed.insert((u.dev, u.inode), copy);
        }
    }
    Ok(())
}

/// The ptys whose masters these images hold, with their queues.
fn pty_sources(imgs: &[(&Image, &FileData)]) -> HashMap<u32, pty::Source> {
    let mut out = HashMap::new();
    for &(img, data) in imgs {
        for p in &img.files.ptys {
            let (input, output) = data.ptys.get(&p.index).cloned().unwrap_or_default();
            out.insert(
                p.index,
                pty::Source {
                    state: p.clone(),
                    input,
                    output,
                },
            );
        }
    }
    out
}

/// The restoring stasis's descriptor a description is taken over from, if it is.
pub(crate) fn inherited_from(kind: &FileKind) -> Option<RawFd> {
    match kind {
        FileKind::Pipe { inherit, .. } | FileKind::Tty { inherit, .. } => *inherit,
        _ => None,
    }
}

/// Puts every dumped descriptor at its number, as a duplicate of its staged description.
pub(crate) fn place(cx: &OpenCx) -> Result<()> {
    for f in &cx.img.files.fds {
        let Some(src) = cx.staged.get(&f.desc) else {
            bail!("fd {}: its description was not opened", f.fd);
        };
        // Onto a number the image uses: nothing of ours is there (see the module invariant),
        // and the placed descriptor is kept by number from here on.
        check(stasis_sys::fs::dup_onto(src, f.fd, f.cloexec), || {
            format!("placing fd {}", f.fd)
        })?;
    }
    for d in &cx.img.files.descs {
        if let Some(fd) = cx.staged.get(&d.id) {
            ops(&d.kind)
                .after_place(d, fd.as_fd(), cx)
                .with_context(|| format!("completing {}", describe(cx.img, d)))?;
        }
    }
    Ok(())
}

/// Closes every descriptor whose number is not in `keep`: stasis's own, staged ones, and any
/// temporaries. Nothing of the restoring tool may reach the restored process.
pub(crate) fn close_unplaced(keep: &[RawFd]) -> Result<()> {
    let mut keep: Vec<u32> = keep.iter().map(|&k| k as u32).collect();
    keep.sort_unstable();
    keep.dedup();
    let mut from = 0u32;
    for k in keep {
        if k > from {
            stasis_sys::fs::close_range(from, k - 1).context("close_range")?;
        }
        from = k + 1;
    }
    stasis_sys::fs::close_range(from, u32::MAX).context("close_range")?;
    Ok(())
}

fn describe(img: &Image, d: &FileDesc) -> String {
    let fds: Vec<String> = img
        .files
        .fds
        .iter()
        .filter(|f| f.desc == d.id)
        .map(|f| f.fd.to_string())
        .collect();
    let what = match &d.kind {
        FileKind::Path { path, .. } => path.to_string(),
        FileKind::Unnamed { dev, inode } => {
            match img.files.unnamed(*dev, *inode).map(|u| &u.what) {
                Some(Unnamed::Deleted { path }) => format!("{path} (deleted)"),
                Some(Unnamed::Memfd { name, .. }) => format!("memfd:{name}"),
                None => format!("unnamed file {inode}"),
            }
        }
        FileKind::CharDev { path, .. } | FileKind::Tty { path, .. } => path.to_string(),
        FileKind::Pipe { inode, .. } => format!("pipe:[{inode}]"),
        FileKind::Pty { index, master } => {
            format!("pty {index}'s {}", if *master { "master" } else { "slave" })
        }
        FileKind::EventFd { .. } => "eventfd".into(),
        FileKind::Epoll { .. } => "epoll".into(),
        FileKind::Socket(s) => format!("socket {}", sockaddr_text(&s.local)),
        FileKind::TimerFd { clockid, .. } => format!("timerfd on clock {clockid}"),
        FileKind::SignalFd { .. } => "signalfd".into(),
        FileKind::Inotify { .. } => "inotify".into(),
        FileKind::Fifo { path, .. } => format!("FIFO {path}"),
    };
    format!("fd {} ({what})", fds.join(", "))
}

// ---- descriptor glue shared by the kinds and the child --------------------------------------

pub(crate) fn cstr(b: &[u8]) -> Result<CString> {
    CString::new(b)
        .with_context(|| format!("{:?} contains a NUL byte", b.escape_ascii().to_string()))
}

/// A system call's result, its error named as `what: <the OS error>`.
pub(crate) fn check<T>(r: nix::Result<T>, what: impl FnOnce() -> String) -> Result<T> {
    r.map_err(|e| anyhow::anyhow!("{}: {}", what(), std::io::Error::from(e)))
}

/// A duplicate of `fd` at the lowest free number ≥ `base`, close-on-exec.
pub(crate) fn dup_at_least(fd: impl AsFd, base: RawFd) -> Result<OwnedFd> {
    let fd = fd.as_fd();
    check(stasis_sys::fs::dup_at_least(fd, base), || {
        format!("duplicating fd {}", fd.as_raw_fd())
    })
}

/// open(2) with `flags` (plus O_CLOEXEC; creation flags never), returning an owned descriptor.
pub(crate) fn open_path(path: &[u8], flags: u32) -> Result<OwnedFd> {
    let c = cstr(path)?;
    // Every other bit (O_PATH, O_TMPFILE, O_LARGEFILE…) goes to the kernel as dumped.
    let flags = OFlag::from_bits_retain(flags as i32)
        .difference(OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_EXCL)
        | OFlag::O_CLOEXEC;
    check(
        nix::fcntl::open(c.as_c_str(), flags, nix::sys::stat::Mode::empty()),
        || format!("opening {}", String::from_utf8_lossy(path)),
    )
}

/// Whom a file is opened as when it is not the one the process had at the dump: the restored
/// process's own file-system credentials. A file that is the one it had (same device and
/// inode) is opened with the restoring stasis's rights: the process had it open, and the
/// image that says so is authenticated. Any other file under that name — replaced since, or
/// a symbolic link planted to something else — the process gets only if it could open it
/// itself. `None`: the process is root's, or stasis is not root (the kernel already limits it).
#[derive(Clone, Debug)]
pub(crate) struct OpenAs {
    fsuid: u32,
    fsgid: u32,
    groups: Vec<u32>,
}

static OPEN_AS: std::sync::Mutex<Option<OpenAs>> = std::sync::Mutex::new(None);

/// Sets whom this task's files are opened as (see `OpenAs`), from its main thread's creds.
pub(crate) fn set_open_as(creds: &Creds) {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let who = (root && creds.uids[3] != 0).then(|| OpenAs {
        fsuid: creds.uids[3],
        fsgid: creds.gids[3],
        groups: creds.groups.clone(),
    });
    *OPEN_AS.lock().unwrap_or_else(|p| p.into_inner()) = who;
}

impl OpenAs {
    /// `open_path` with this task's credentials for the file system (this thread only:
    /// `setfsuid` is per thread, and a task being prepared has one).
    fn open(&self, path: &[u8], flags: u32) -> Result<OwnedFd> {
        let before = nix::unistd::getgroups().context("getgroups")?;
        let groups: Vec<nix::unistd::Gid> = self
            .groups
            .iter()
            .map(|&g| nix::unistd::Gid::from_raw(g))
            .collect();
        check(nix::unistd::setgroups(&groups), || "setgroups".into())?;
        nix::unistd::setfsgid(nix::unistd::Gid::from_raw(self.fsgid));
        nix::unistd::setfsuid(nix::unistd::Uid::from_raw(self.fsuid));
        let r = open_path(path, flags);
        nix::unistd::setfsuid(nix::unistd::Uid::from_raw(0));
        nix::unistd::setfsgid(nix::unistd::Gid::from_raw(0));
        check(nix::unistd::setgroups(&before), || "setgroups".into())?;
        r
    }
}

/// Opens `path` for a process that had the file `(dev, inode)` open under that name: see
/// `OpenAs` for whose rights are used.
pub(crate) fn open_identified(path: &[u8], flags: u32, dev: u64, inode: u64) -> Result<OwnedFd> {
    let fd = open_path(path, flags)?;
    let same = nix::sys::stat::fstat(&fd).is_ok_and(|m| {
        let d = m.st_dev;
        (kdev(libc::major(d), libc::minor(d)), m.st_ino) == (dev, inode)
    });
    if same {
        return Ok(fd);
    }
    let name = String::from_utf8_lossy(path);
    let who = OPEN_AS.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let Some(who) = who else {
        tracing::warn!("{name} is not the file it was at the dump (another inode)");
        return Ok(fd);
    };
    drop(fd);
    who.open(path, flags).with_context(|| {
        format!(
            "{name} is not the file the process had open at the dump (another inode), and the process (uid {}) cannot open it itself",
            who.fsuid
        )
    })
}

/// A new description of the file behind `fd` (through /proc/self/fd), with `flags`. Of the
/// flags the kernel keeps in a description, those that only say how it was opened are left
/// out: O_NOFOLLOW (Python's tempfile uses it) would refuse the magic link (ELOOP), O_TMPFILE
/// (with its O_DIRECTORY) would ask for a directory (ENOTDIR); O_CREAT, O_EXCL and O_TRUNC
/// (never kept, never wanted here) to be sure.
pub(crate) fn reopen(fd: RawFd, flags: u32) -> Result<OwnedFd> {
    let how = libc::O_NOFOLLOW
        | libc::O_TMPFILE
        | libc::O_DIRECTORY
        | libc::O_CREAT
        | libc::O_EXCL
        | libc::O_TRUNC;
    open_path(
        format!("/proc/self/fd/{fd}").as_bytes(),
        flags & !(how as u32),
    )
}

pub(crate) fn seek(fd: impl AsFd, pos: u64) -> Result<()> {
    let fd = fd.as_fd();
    // ESPIPE (not seekable) and EBADF (O_PATH) are fine.
    match nix::unistd::lseek(fd, pos as i64, nix::unistd::Whence::SeekSet) {
        Ok(_) | Err(Errno::ESPIPE | Errno::EBADF) => Ok(()),
        Err(e) => bail!(
            "seeking fd {} to {pos}: {}",
            fd.as_raw_fd(),
            std::io::Error::from(e)
        ),
    }
}

/// Sets the status flags (O_NONBLOCK, O_APPEND…) of the description behind `fd`.
pub(crate) fn set_status_flags(fd: impl AsFd, flags: u32) -> Result<()> {
    let fd = fd.as_fd();
    // The dumped flags as they are: the kernel ignores the access mode bits.
    let flags = OFlag::from_bits_retain(flags as i32);
    check(nix::fcntl::fcntl(fd, FcntlArg::F_SETFL(flags)), || {
        format!("setting the flags of fd {}", fd.as_raw_fd())
    })
    .map(drop)
}

pub(crate) fn write_all(fd: impl AsFd, mut data: &[u8]) -> Result<()> {
    let fd = fd.as_fd();
    while !data.is_empty() {
        match nix::unistd::write(fd, data) {
            Ok(n) if n > 0 => data = &data[n..],
            // A write of nothing (never expected here) sets no errno; name whatever it holds.
            Ok(_) => bail!(
                "writing to fd {}: {}",
                fd.as_raw_fd(),
                std::io::Error::last_os_error()
            ),
            Err(e) => bail!(
                "writing to fd {}: {}",
                fd.as_raw_fd(),
                std::io::Error::from(e)
            ),
        }
    }
    Ok(())
}
