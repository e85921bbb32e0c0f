//! Open files: every descriptor, the open file description behind it, and what that refers to.
//!
//! Each kind of file is one module with one [`Kind`]: whether it claims a descriptor, and how to
//! dump the description. This file only walks the table, groups descriptors into descriptions
//! (`kcmp`: dup'd and inherited descriptors share one description, hence one offset and one
//! set of flags) and runs the checks that need the whole table. A descriptor no kind claims is
//! refused, naming the pid, the fd and what it is: stasis never drops a file silently. File
//! locks are read with each description (`lock`).

mod chardev;
mod epoll;
mod eventfd;
mod fifo;
mod inotify;
mod lock;
mod path;
mod pipe;
mod socket;
mod tcp;
mod timers;
mod tty;
mod unnamed;

use anyhow::{bail, Context, Result};
use stasis_image::model::*;
use stasis_image::{PageWriter, PAGE_SIZE};
use std::fs::Metadata;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

pub(crate) use lock::ProcLocks;
pub(crate) use socket::autobound;
pub(crate) use tcp::NetLock;
pub(crate) use unnamed::{collect_mapped, is_unnamed_mapping};

/// What is known about one descriptor before its kind is chosen.
pub(crate) struct Probe {
    pub pid: i32,
    pub fd: i32,
    /// `/proc/PID/fd/N`: opening it opens the file itself, even one without a name.
    pub proc_path: PathBuf,
    /// What the magic link says (`/path`, `pipe:[123]`, `socket:[456]`, `anon_inode:[eventfd]`).
    pub link: Bytes,
    /// `stat` through the link: the file itself.
    pub meta: Metadata,
    /// open(2) status flags, without O_CLOEXEC.
    pub flags: u32,
    pub pos: u64,
    /// The whole of `/proc/PID/fdinfo/N`, for kinds that report their state there.
    pub fdinfo: String,
}

impl Probe {
    /// The value after `key` on a line of fdinfo (`eventfd-count:` …).
    pub fn info_field(&self, key: &str) -> Option<&str> {
        self.fdinfo
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
    }

    pub fn file_type(&self) -> u32 {
        self.meta.mode() & libc::S_IFMT
    }

    pub fn dev(&self) -> u64 {
        kdev(libc::major(self.meta.dev()), libc::minor(self.meta.dev()))
    }

    pub fn is_deleted(&self) -> bool {
        self.meta.nlink() == 0 || self.link.ends_with(DELETED_SUFFIX)
    }
}

/// One kind of file, as the dump sees it.
pub(crate) trait Kind: Sync {
    /// Whether this kind handles the descriptor.
    fn claims(&self, p: &Probe) -> bool;
    /// Records the description (called for the first descriptor of each description).
    fn dump(&self, p: &Probe, cx: &mut Cx) -> Result<FileKind>;
}

/// Every kind, in the order they are asked; the first that claims a descriptor owns it.
static KINDS: &[&dyn Kind] = &[
    &pipe::PIPE,
    &fifo::FIFO,
    &eventfd::EVENTFD,
    &epoll::EPOLL,
    &timers::TIMERFD,
    &timers::SIGNALFD,
    &inotify::INOTIFY,
    &socket::SOCKET,
    &tty::TTY,
    &chardev::CHARDEV,
    &unnamed::UNNAMED,
    &path::PATH,
];

/// State shared by the kinds while one process's files are dumped.
pub(crate) struct Cx<'a> {
    pub pages: &'a mut PageWriter,
    pub files: Files,
    /// Every epoll registration seen, checked
    /// against the whole table once it is read.
    pub epoll_watches: Vec<epoll::Registration>,
    /// Established TCP connections are dumped (`--tcp-established`), under this lock.
    pub tcp_established: bool,
    /// Established TCP connections come back closed (`--tcp-close`).
    pub tcp_close: bool,
    pub net: &'a mut NetLock,
    /// (description id, fd, a copy of the socket) of each connection found, read once the
    /// whole table is (`tcp::settle`).
    pub tcp_pending: Vec<(u32, i32, std::os::fd::OwnedFd)>,
}

pub(crate) struct Options {
    /// File locks are dumped (else a lock refuses the dump: `--no-file-locks`).
    pub file_locks: bool,
    /// Established TCP connections are dumped (`--tcp-established`).
    pub tcp_established: bool,
    /// Established TCP connections come back closed (`--tcp-close`).
    pub tcp_close: bool,
}

/// A description's identity for comparing it with other processes' (`kcmp`): its id, one of
/// its descriptors, and its file's (dev, inode).
#[derive(Clone, Copy, Debug)]
pub(crate) struct DescKey {
    pub id: u32,
    pub fd: i32,
    pub file: (u64, u64),
}

/// Dumps every descriptor of `pid` into `files` (which may already hold unnamed files found
/// in the memory map). Refuses what cannot be restored faithfully. Pipes whose other end is
/// elsewhere, and terminals, are settled by the caller, who knows the whole tree
/// (`settle_pipes`, `settle_shell_job`).
pub(crate) fn collect(
    pid: i32,
    opts: &Options,
    files: Files,
    pages: &mut PageWriter,
    net: &mut NetLock,
) -> Result<(Files, Vec<DescKey>, LocksToCheck)> {
    let dir = format!("/proc/{pid}/fd");
    let mut fds: Vec<i32> = std::fs::read_dir(&dir)
        .with_context(|| format!("listing {dir}"))?
        .filter_map(|e| {
            std::str::from_utf8(e.ok()?.file_name().as_bytes())
                .ok()?
                .parse()
                .ok()
        })
        .collect();
    fds.sort_unstable();
    let mut cx = Cx {
        pages,
        files,
        epoll_watches: Vec::new(),
        tcp_established: opts.tcp_established,
        tcp_close: opts.tcp_close,
        net,
        tcp_pending: Vec::new(),
    };
    // (description id, a descriptor of it, its (dev, inode)) for the kcmp comparisons.
    let mut reps: Vec<(u32, i32, (u64, u64))> = Vec::new();
    // (major, minor, inode) of every file a lock was found on.
    let mut locked = Vec::new();
    for fd in fds {
        let (probe, info) = probe(pid, fd)?;
        let key = (probe.meta.dev(), probe.meta.ino());
        let cloexec = info.cloexec;
        if let Some(id) = same_as_earlier(pid, fd, key, &reps)? {
            cx.files.fds.push(Fd {
                fd,
                cloexec,
                desc: id,
            });
            continue;
        }
        let Some(kind) = KINDS.iter().find(|k| k.claims(&probe)) else {
            bail!(
                "fd {fd} of pid {pid} is {}: this kind of file is not supported yet",
                probe.link
            );
        };
        let kind = kind.dump(&probe, &mut cx)?;
        // The locks of a description are listed on each of its descriptors: read them once.
        for line in &info.locks {
            let l = lock::parse(pid, fd, line)?;
            if !opts.file_locks {
                lock::refuse(pid, &l, &probe.link)?;
            }
            if !matches!(kind, FileKind::Path { .. } | FileKind::Unnamed { .. }) {
                bail!(
                    "pid {pid} holds a {l} ({}), which is not a regular file; not supported yet",
                    probe.link
                );
            }
            cx.files.locks.push(l);
            let dev = probe.meta.dev();
            locked.push((libc::major(dev), libc::minor(dev), probe.meta.ino()));
        }
        let id = cx.files.descs.len() as u32;
        cx.files.descs.push(FileDesc {
            id,
            tree_id: None,
            flags: probe.flags,
            pos: probe.pos,
            kind,
        });
        cx.files.fds.push(Fd {
            fd,
            cloexec,
            desc: id,
        });
        reps.push((id, fd, key));
    }
    epoll::check_watches(pid, &cx.epoll_watches, &mut cx.files)?;
    tcp::settle(pid, &mut cx)?;
    let files = cx.files;
    let keys = reps
        .into_iter()
        .map(|(id, fd, file)| DescKey { id, fd, file })
        .collect();
    Ok((
        files,
        keys,
        LocksToCheck {
            locked,
            file_locks: opts.file_locks,
        },
    ))
}

/// The locks found through descriptors, to check /proc/locks against once it is read (see
/// `ProcLocks`): done late in the freeze, while the parasite's work hides the read.
pub(crate) struct LocksToCheck {
    locked: Vec<(u32, u32, u64)>,
    file_locks: bool,
}

impl LocksToCheck {
    /// Nothing to check (a pre-dump reads no descriptors).
    pub(crate) fn none() -> LocksToCheck {
        LocksToCheck {
            locked: Vec::new(),
            file_locks: true,
        }
    }

    /// Adds the flocks only mappings hold to `files`, or refuses a lock nothing reaches.
    pub(crate) fn check(
        self,
        pid: i32,
        files: &mut Files,
        proc_locks: &ProcLocks<'_>,
    ) -> Result<()> {
        let maps = stasis_proc::maps(pid)?;
        let mapped_locks = lock::check_unreached(pid, &self.locked, &maps, proc_locks)?;
        if !self.file_locks && !mapped_locks.is_empty() {
            bail!(
                "pid {pid} holds a flock on a file it maps (inode {}) and --no-file-locks was given",
                mapped_locks[0].inode
            );
        }
        files.mapped_locks = mapped_locks;
        Ok(())
    }
}

pub(crate) use pipe::{ends as pipe_ends, settle_outside_ends as settle_pipes};
pub(crate) use tty::{settle_shell_job, slave_index};

/// The parts of `/proc/PID/fdinfo/N` the dump uses.
struct FdInfo {
    cloexec: bool,
    locks: Vec<String>,
}

fn probe(pid: i32, fd: i32) -> Result<(Probe, FdInfo)> {
    let proc_path = PathBuf::from(format!("/proc/{pid}/fd/{fd}"));
    let link: Bytes = std::fs::read_link(&proc_path)
        .with_context(|| format!("reading {}", proc_path.display()))?
        .into();
    let text = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
        .with_context(|| format!("reading fdinfo of fd {fd} of pid {pid}"))?;
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    let pos: u64 = field("pos:")
        .parse()
        .with_context(|| format!("fdinfo of fd {fd} of pid {pid}: no position"))?;
    let raw_flags = u32::from_str_radix(&field("flags:"), 8)
        .with_context(|| format!("fdinfo of fd {fd} of pid {pid}: no flags"))?;
    let meta = std::fs::metadata(&proc_path)
        .with_context(|| format!("stat of fd {fd} ({link}) of pid {pid}"))?;
    let locks = text
        .lines()
        .filter_map(|l| l.strip_prefix("lock:"))
        .map(|l| l.trim().to_string())
        .collect();
    Ok((
        Probe {
            pid,
            fd,
            proc_path,
            link,
            meta,
            flags: raw_flags & !(libc::O_CLOEXEC as u32),
            pos,
            fdinfo: text.clone(),
        },
        FdInfo {
            cloexec: raw_flags & libc::O_CLOEXEC as u32 != 0,
            locks,
        },
    ))
}

/// The description an earlier descriptor of the same file already has, if this one shares it.
fn same_as_earlier(
    pid: i32,
    fd: i32,
    key: (u64, u64),
    reps: &[(u32, i32, (u64, u64))],
) -> Result<Option<u32>> {
    for &(id, other, _) in reps.iter().filter(|r| r.2 == key) {
        match stasis_sys::fs::same_description(pid, other, pid, fd) {
            Ok(true) => return Ok(Some(id)),
            Ok(false) => {}
            Err(e) => bail!(
                "pid {pid}: cannot tell whether fds {other} and {fd} share one open file \
                 (kcmp: {e}); the kernel needs CONFIG_KCMP"
            ),
        }
    }
    Ok(None)
}

/// Appends `data` padded to whole pages; returns (file offset, unpadded length).
pub(crate) fn append_padded(pages: &mut PageWriter, data: &[u8]) -> Result<(u64, u64)> {
    if data.is_empty() {
        return Ok((0, 0));
    }
    let mut padded = data.to_vec();
    padded.resize(data.len().next_multiple_of(PAGE_SIZE), 0);
    Ok((pages.append(&padded)?, data.len() as u64))
}

/// Streams a whole file into pages.img (in chunks, so a big file never sits in memory);
/// returns (file offset, length).
pub(crate) fn append_file(pages: &mut PageWriter, file: &mut std::fs::File) -> Result<(u64, u64)> {
    use std::io::Read;
    const CHUNK: usize = 1 << 20;
    let mut buf = vec![0u8; CHUNK];
    let (mut first, mut total) = (None, 0u64);
    loop {
        let mut got = 0;
        while got < CHUNK {
            match file.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        if got == 0 {
            break;
        }
        let padded = got.next_multiple_of(PAGE_SIZE);
        buf[got..padded].fill(0);
        let off = pages.append(&buf[..padded])?;
        first.get_or_insert(off);
        total += got as u64;
        if got < CHUNK {
            break;
        }
    }
    Ok((first.unwrap_or(0), total))
}
