//! `restore --lazy-pages`: the restored processes run before their private anonymous memory
//! is in. Each process's memory stays registered with the userfaultfd it made (missing-page
//! mode, with fork, mremap, remove and unmap events); this stasis serves every fault from
//! the image (already verified whole) and pushes the rest in the background, in file order,
//! until every page is in; then the userfaultfds are closed and the processes let go.
//!
//! Until then this stasis stays their tracer, with `PTRACE_O_EXITKILL`, and follows every new
//! thread and child: if it dies (killed, or a crash), the kernel kills them all. A process is
//! never left waiting on a fault nobody serves, nor given a zero page where the image had
//! data (which is what the kernel would do once the userfaultfd is gone). While traced, its
//! signals pass through this stasis, which hands each one straight back.
//!
//! What the process does to its memory meanwhile is followed through the events: pages it
//! drops or unmaps are never pushed (they read as zeros, or are gone, as they should), pages
//! it moves are pushed where they went, and a child it forks gets the pages not yet pushed
//! through a userfaultfd of its own. Events are read with no copy in flight (`copying`
//! write-locked), and a copy the kernel refuses while an event is unread (EAGAIN) is put back
//! and tried again after it: so no page is ever pushed into a range the process has dropped.

use anyhow::{bail, Context, Result};
use stasis_image::model::{Backing, PageRun, ADVICE_LOCKED};
use stasis_image::{Image, PageReader, DATA_OFFSET, PAGE_SIZE};
use stasis_sys::uffd;
use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

const PAGE: u64 = PAGE_SIZE as u64;
/// Served around a fault: the faulting thread waits for it, so it is small.
const FAULT_CHUNK: u64 = 64 << 10;
/// Pushed at a time in the background.
const PUSH_CHUNK: u64 = 1 << 20;

/// Pages not in yet: where their data is (page file, offset).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Piece {
    len: u64,
    src: u32,
    off: u64,
}

type Pending = BTreeMap<u64, Piece>;

/// Removes and returns [s, e) of the piece at `key`, putting back what is left of it.
fn cut(map: &mut Pending, key: u64, s: u64, e: u64) -> Option<(u64, Piece)> {
    let p = map.remove(&key)?;
    let end = key + p.len;
    let (s, e) = (s.max(key), e.min(end));
    if s >= e {
        map.insert(key, p);
        return None;
    }
    if s > key {
        map.insert(key, Piece { len: s - key, ..p });
    }
    if e < end {
        map.insert(
            e,
            Piece {
                len: end - e,
                src: p.src,
                off: p.off + (e - key),
            },
        );
    }
    Some((
        s,
        Piece {
            len: e - s,
            src: p.src,
            off: p.off + (s - key),
        },
    ))
}

/// The pending pages around `addr` (at most `max` bytes, aligned to `max`), taken out.
fn take_at(map: &mut Pending, addr: u64, max: u64) -> Option<(u64, Piece)> {
    let (&key, p) = map.range(..=addr).next_back()?;
    if key + p.len <= addr {
        return None;
    }
    let s = (addr & !(max - 1)).max(key);
    cut(map, key, s, s + max)
}

/// The first pending pages (at most `max` bytes), taken out.
fn take_first(map: &mut Pending, max: u64) -> Option<(u64, Piece)> {
    let (&key, _) = map.iter().next()?;
    cut(map, key, key, key + max)
}

/// Every pending page in [start, end) taken out.
fn take_range(map: &mut Pending, start: u64, end: u64) -> Vec<(u64, Piece)> {
    let mut out = Vec::new();
    let keys: Vec<u64> = map
        .range(..end)
        .rev()
        .take_while(|(&k, p)| k + p.len > start)
        .map(|(&k, _)| k)
        .collect();
    for k in keys {
        if let Some(x) = cut(map, k, start, end) {
            out.push(x);
        }
    }
    out
}

/// One mm the server fills: a restored process's, or a child's it forked since.
struct Target {
    pid: i32,
    uffd: OwnedFd,
    pending: Pending,
    /// Its memory is gone (the process exited or exec'd).
    gone: bool,
}

/// For each page file of an image (its own, then its parents'): the digest of every page, to
/// check each one against as it is served; `None` for a file verified whole already.
pub(crate) type Digests = Vec<Option<Arc<Vec<u64>>>>;

/// The runs of `img` a lazy restore serves: private anonymous memory, but locked memory
/// (as `rebuild::build` decides).
fn lazy_runs(img: &Image) -> impl Iterator<Item = &PageRun> {
    img.mm
        .vmas
        .iter()
        .filter(|v| matches!(v.backing, Backing::Anon) && v.advice & ADVICE_LOCKED == 0)
        .flat_map(|v| v.pages.iter())
}

/// Verifies, before anything is made, every page of `img`'s page files but those served
/// lazily, which are checked one by one as they are served (against the digests returned).
/// A page file without digests (an older image) is verified whole.
pub(crate) fn verify_all_but_lazy(img: &Image) -> Result<Digests> {
    let mut out = Vec::with_capacity(img.parents.len() + 1);
    for (k, r) in std::iter::once(&img.pages).chain(&img.parents).enumerate() {
        let Some(d) = r.digests()? else {
            r.verify()?;
            out.push(None);
            continue;
        };
        let mut skip: Vec<(u64, u64)> = lazy_runs(img)
            .filter(|run| run.src as usize == k)
            .map(|run| (run.file_off, run.file_off + run.pages * PAGE))
            .collect();
        skip.sort_unstable();
        let end = DATA_OFFSET + r.data_len();
        let mut at = DATA_OFFSET;
        for (s, e) in skip {
            if s > at {
                r.verify_range(&d, at, s.min(end) - at)?;
            }
            at = at.max(e);
        }
        if at < end {
            r.verify_range(&d, at, end - at)?;
        }
        out.push(Some(Arc::new(d)));
    }
    Ok(out)
}

struct Shared {
    /// The page files: the image's own, then its parents'.
    files: Vec<File>,
    digests: Digests,
    targets: Mutex<Vec<Target>>,
    /// Held (shared) by every copy; taken alone to read events.
    copying: RwLock<()>,
    stop: AtomicBool,
    failed: Mutex<Option<String>>,
    faults: AtomicU64,
    pushed: AtomicU64,
    /// Milliseconds each pusher waits between pieces (`STASIS_LAZY_PUSH_DELAY_MS`: for the
    /// tests that kill a restore half-way).
    delay: u64,
}

/// The lazy pages of one restored process, served and pushed by threads of this stasis.
pub(crate) struct Server {
    pid: i32,
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
    started: Instant,
}

enum Copied {
    Done,
    /// Refused while an event is unread: put back what is left.
    Again(u64, Piece),
    /// The mm is gone.
    Gone,
}

impl Shared {
    fn fail(&self, why: String) {
        tracing::error!("lazy pages: {why}");
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(why);
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Copies `piece` to `dst` through `fd`. A page that is already there is skipped; a
    /// range whose mapping is gone (ENOENT) is copied page by page, and only the pages
    /// whose mapping is really gone are left out.
    fn copy(&self, fd: i32, dst: u64, piece: Piece) -> Result<Copied> {
        let Some(file) = self.files.get(piece.src as usize) else {
            bail!(
                "a page run names page file {}, which is not loaded",
                piece.src
            );
        };
        let map = crate::fill::FileMap::new(file, piece.off, piece.len as usize)?;
        if let Some(Some(d)) = self.digests.get(piece.src as usize) {
            // Each page against its digest before the process gets it.
            // SAFETY: the window just mapped, piece.len bytes, read-only.
            let data = unsafe { std::slice::from_raw_parts(map.ptr, piece.len as usize) };
            let first = ((piece.off - DATA_OFFSET) / PAGE) as usize;
            for (i, page) in data.chunks(PAGE_SIZE).enumerate() {
                if d.get(first + i) != Some(&stasis_image::page_digest(page)) {
                    bail!(
                        "the page at offset {:#x} of page file {} does not match its checksum: the image is damaged",
                        piece.off + (i * PAGE_SIZE) as u64,
                        piece.src
                    );
                }
            }
        }
        let mut done = 0;
        let mut page_by_page = false;
        while done < piece.len {
            let len = if page_by_page { PAGE } else { piece.len - done };
            // SAFETY: done + len <= piece.len: inside the window just mapped.
            let src = unsafe { map.ptr.add(done as usize) };
            let (n, r) = uffd::copy_some(fd, dst + done, src, len);
            done += n;
            match r {
                Ok(()) => {}
                Err(nix::errno::Errno::EEXIST) => done += PAGE,
                Err(nix::errno::Errno::EAGAIN) => {
                    return Ok(Copied::Again(
                        dst + done,
                        Piece {
                            len: piece.len - done,
                            src: piece.src,
                            off: piece.off + done,
                        },
                    ))
                }
                Err(nix::errno::Errno::ESRCH) => return Ok(Copied::Gone),
                Err(nix::errno::Errno::ENOENT) if !page_by_page => page_by_page = true,
                Err(nix::errno::Errno::ENOENT) => done += PAGE,
                Err(e) => bail!("UFFDIO_COPY of {len} bytes to {:#x}: {e}", dst + done),
            }
        }
        Ok(Copied::Done)
    }

    /// The event reader: waits for messages on every target's userfaultfd, reads them with
    /// no copy in flight, follows the events, serves the faults.
    fn read_events(&self) {
        let mut faults: Vec<(usize, u64)> = Vec::new();
        while !self.stop.load(Ordering::SeqCst) {
            let fds: Vec<libc::pollfd> = {
                let t = self.targets.lock().unwrap_or_else(|p| p.into_inner());
                t.iter()
                    .map(|t| libc::pollfd {
                        fd: if t.gone { -1 } else { t.uffd.as_raw_fd() },
                        events: libc::POLLIN,
                        revents: 0,
                    })
                    .collect()
            };
            let mut fds = fds;
            // SAFETY: poll on our own descriptors, in a buffer of that length.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 20) };
            if n <= 0 && faults.is_empty() {
                continue;
            }
            let _alone = self.copying.write().unwrap_or_else(|p| p.into_inner());
            let mut targets = self.targets.lock().unwrap_or_else(|p| p.into_inner());
            let mut msgs = Vec::new();
            let mut forked = Vec::new();
            for i in 0..targets.len() {
                if targets[i].gone {
                    continue;
                }
                msgs.clear();
                if let Err(e) = uffd::read_msgs(targets[i].uffd.as_raw_fd(), &mut msgs) {
                    tracing::debug!(pid = targets[i].pid, "reading the userfaultfd: {e}");
                    continue;
                }
                for m in &msgs {
                    if m.event != uffd::EVENT_PAGEFAULT {
                        tracing::debug!(event = m.event, args = ?m.args, "userfaultfd event");
                    }
                    let t = &mut targets[i];
                    match m.event {
                        uffd::EVENT_PAGEFAULT => faults.push((i, m.args[1] & !(PAGE - 1))),
                        uffd::EVENT_FORK => {
                            // The child's userfaultfd, now a descriptor of ours; its memory
                            // misses what the parent's misses.
                            // SAFETY: the kernel installed this descriptor for us.
                            let fd = unsafe { OwnedFd::from_raw_fd(m.args[0] as u32 as i32) };
                            forked.push(Target {
                                pid: 0,
                                uffd: fd,
                                pending: t.pending.clone(),
                                gone: false,
                            });
                        }
                        uffd::EVENT_REMAP => {
                            let (from, to, len) = (m.args[0], m.args[1], m.args[2]);
                            let moved = take_range(&mut t.pending, from, from + len);
                            for (a, p) in moved {
                                t.pending.insert(a - from + to, p);
                            }
                        }
                        uffd::EVENT_REMOVE | uffd::EVENT_UNMAP => {
                            take_range(&mut t.pending, m.args[0], m.args[1]);
                        }
                        other => tracing::debug!(event = other, "userfaultfd event ignored"),
                    }
                }
            }
            targets.extend(forked);
            // Every event is read: serve the faults.
            let mut again = Vec::new();
            for (i, addr) in faults.drain(..) {
                let t = &mut targets[i];
                if t.gone {
                    continue;
                }
                let fd = t.uffd.as_raw_fd();
                match take_at(&mut t.pending, addr, FAULT_CHUNK) {
                    Some((dst, piece)) => match self.copy(fd, dst, piece) {
                        Ok(Copied::Done) => {}
                        Ok(Copied::Again(d, p)) => {
                            t.pending.insert(d, p);
                            again.push((i, addr));
                        }
                        Ok(Copied::Gone) => t.gone = true,
                        Err(e) => return self.fail(format!("{e:#}")),
                    },
                    // Not in the image (never dumped, dropped since) or already pushed.
                    None => match uffd::zeropage(fd, addr, PAGE) {
                        Ok(()) => {}
                        Err(nix::errno::Errno::EEXIST) => {
                            let _ = uffd::wake(fd, addr, PAGE);
                        }
                        Err(nix::errno::Errno::EAGAIN) => again.push((i, addr)),
                        Err(nix::errno::Errno::ESRCH) => t.gone = true,
                        Err(e) => {
                            tracing::debug!("zero page at {addr:#x}: {e}");
                            let _ = uffd::wake(fd, addr, PAGE);
                        }
                    },
                }
                self.faults.fetch_add(1, Ordering::Relaxed);
            }
            faults = again;
        }
    }

    /// A pusher: takes the first pending pages of a target at a time and copies them in.
    fn push(&self) {
        // Behind the restored processes (and the fault server) for the CPU, at the lowest
        // priority: what they touch comes first, the rest when there is room. (Best effort.)
        // SAFETY: setpriority on this thread only (tid 0 is the caller).
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
        let mut next = 0usize;
        while !self.stop.load(Ordering::SeqCst) {
            // How long to wait before the next piece.
            let pause = {
                let _copying = self.copying.read().unwrap_or_else(|p| p.into_inner());
                let job = {
                    let mut targets = self.targets.lock().unwrap_or_else(|p| p.into_inner());
                    let n = targets.len();
                    (0..n).find_map(|k| {
                        let i = (next + k) % n;
                        let t = &mut targets[i];
                        if t.gone {
                            return None;
                        }
                        take_first(&mut t.pending, PUSH_CHUNK)
                            .map(|(dst, p)| (i, t.uffd.as_raw_fd(), dst, p))
                    })
                };
                match job {
                    None => Duration::from_millis(2),
                    Some((i, fd, dst, piece)) => {
                        next = i + 1;
                        match self.copy(fd, dst, piece) {
                            Ok(Copied::Done) => {
                                self.pushed.fetch_add(piece.len, Ordering::Relaxed);
                                Duration::from_millis(self.delay)
                            }
                            Ok(Copied::Again(d, p)) => {
                                // Put back before the event is read (it needs `copying`).
                                let mut targets =
                                    self.targets.lock().unwrap_or_else(|p| p.into_inner());
                                targets[i].pending.insert(d, p);
                                Duration::from_micros(200)
                            }
                            Ok(Copied::Gone) => {
                                let mut targets =
                                    self.targets.lock().unwrap_or_else(|p| p.into_inner());
                                targets[i].gone = true;
                                Duration::ZERO
                            }
                            Err(e) => return self.fail(format!("{e:#}")),
                        }
                    }
                }
            };
            if !pause.is_zero() {
                std::thread::sleep(pause);
            }
        }
    }
}

impl Server {
    /// Starts serving the lazy `runs` of process `pid` through `uffd`, from `pages` (and its
    /// parents' page files).
    pub(crate) fn start(
        pid: i32,
        uffd: OwnedFd,
        pages: &PageReader,
        parents: &[PageReader],
        runs: &[PageRun],
        digests: Digests,
    ) -> Result<Server> {
        let mut files = Vec::with_capacity(parents.len() + 1);
        for r in std::iter::once(pages).chain(parents) {
            files.push(
                r.file()
                    .try_clone()
                    .with_context(|| format!("reopening {}", r.path().display()))?,
            );
        }
        let mut pending = Pending::new();
        for r in runs {
            pending.insert(
                r.addr,
                Piece {
                    len: r.pages * PAGE,
                    src: r.src,
                    off: r.file_off,
                },
            );
        }
        let shared = Arc::new(Shared {
            files,
            digests,
            targets: Mutex::new(vec![Target {
                pid,
                uffd,
                pending,
                gone: false,
            }]),
            copying: RwLock::new(()),
            stop: AtomicBool::new(false),
            failed: Mutex::new(None),
            faults: AtomicU64::new(0),
            pushed: AtomicU64::new(0),
            delay: std::env::var("STASIS_LAZY_PUSH_DELAY_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        });
        let mut threads = Vec::new();
        let s = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("lazy-events".into())
                .spawn(move || s.read_events())
                .context("starting the lazy pages' event reader")?,
        );
        let pushers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 2);
        for _ in 0..pushers {
            let s = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("lazy-push".into())
                    .spawn(move || s.push())
                    .context("starting a lazy pages pusher")?,
            );
        }
        Ok(Server {
            pid,
            shared,
            threads,
            started: Instant::now(),
        })
    }

    /// Whether every page is in (or was dropped, or its process is gone).
    pub(crate) fn drained(&self) -> bool {
        let targets = self
            .shared
            .targets
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        targets.iter().all(|t| t.gone || t.pending.is_empty())
    }

    pub(crate) fn failure(&self) -> Option<String> {
        self.shared
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stops the threads and checks that every page is in; dropping the server then closes
    /// the userfaultfds, and a fault from then on is the kernel's (a page never dumped reads
    /// as zeros, as it should).
    pub(crate) fn stop_and_check(&mut self) -> Result<()> {
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(why) = self.failure() {
            bail!("pid {}: lazy pages: {why}", self.pid);
        }
        let targets = self
            .shared
            .targets
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let left: u64 = targets
            .iter()
            .filter(|t| !t.gone)
            .flat_map(|t| t.pending.values())
            .map(|p| p.len)
            .sum();
        if left > 0 {
            bail!(
                "pid {}: {left} bytes of lazy pages were never pushed",
                self.pid
            );
        }
        tracing::info!(
            pid = self.pid,
            faults = self.shared.faults.load(Ordering::Relaxed),
            pushed_mib = self.shared.pushed.load(Ordering::Relaxed) >> 20,
            processes = targets.len(),
            elapsed = ?self.started.elapsed(),
            "lazy pages all in"
        );
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A child of this stasis that shares its descriptor table (`CLONE_FILES`) and does nothing
/// but outlive it: if this stasis dies, its descriptors — the userfaultfds — stay open until
/// the kernel has killed the processes it traced (`PTRACE_O_EXITKILL`). A dying process
/// closes its files before it lets go of its tracees: without the keeper, a thread waiting
/// on a fault would be woken into a zero page for the moment before its SIGKILL lands. It
/// exits once those processes are gone; after a normal end it is killed.
struct Keeper(i32);

impl Keeper {
    fn start(watch: &[i32]) -> Result<Keeper> {
        let me = stasis_sys::fs::pidfd_open(std::process::id() as i32)
            .context("pidfd of this stasis")?;
        let fds: Vec<OwnedFd> = watch
            .iter()
            .filter_map(|&p| stasis_sys::fs::pidfd_open(p).ok())
            .collect();
        let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let me_raw = me.as_raw_fd();
        // SAFETY: a fork that shares the descriptor table. This process has threads: the
        // child runs only async-signal-safe calls (no allocation) and never returns.
        let r = unsafe {
            libc::syscall(
                libc::SYS_clone,
                (libc::CLONE_FILES | libc::SIGCHLD) as u64,
                0u64,
                0u64,
                0u64,
                0u64,
            )
        };
        if r == 0 {
            // SAFETY: as above: signal dispositions, poll and _exit only.
            unsafe {
                for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
                    libc::signal(sig, libc::SIG_IGN);
                }
                let mut p = libc::pollfd {
                    fd: me_raw,
                    events: libc::POLLIN,
                    revents: 0,
                };
                while libc::poll(&mut p, 1, -1) <= 0 {}
                // This stasis died: wait (a while at most) for the processes to die too.
                for &fd in &raw {
                    let mut p = libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    libc::poll(&mut p, 1, 5000);
                }
                libc::usleep(50_000);
                libc::_exit(0);
            }
        }
        if r < 0 {
            bail!(
                "starting the descriptor keeper: {}",
                std::io::Error::last_os_error()
            );
        }
        drop(fds);
        Ok(Keeper(r as i32))
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        // SAFETY: our own child, killed and reaped.
        unsafe {
            libc::kill(self.0, libc::SIGKILL);
            libc::waitpid(self.0, std::ptr::null_mut(), libc::__WALL);
        }
    }
}

/// Kills every tracee (while their memory is still held: the keeper and the servers keep the
/// userfaultfds open), for a lazy restore that cannot go on.
fn kill_all(live: &std::collections::BTreeSet<i32>) {
    for &t in live {
        // SAFETY: SIGKILL to a thread of ours (tgkill is not needed: any thread kills all).
        unsafe { libc::kill(t, libc::SIGKILL) };
    }
}

/// Lets the restored processes run while `servers` fill their memory, staying the tracer of
/// every thread (`tracees`) and of every thread and child they make, with
/// `PTRACE_O_EXITKILL`; once every page is in, closes the userfaultfds and detaches. Returns
/// the exit status of `root` if it ended meanwhile (this stasis, its parent, reaped it).
pub(crate) fn run_traced(
    tracees: Vec<i32>,
    servers: Vec<Server>,
    root: i32,
) -> Result<Option<i32>> {
    let mut live: std::collections::BTreeSet<i32> = tracees.iter().copied().collect();
    let keeper = Keeper::start(&tracees)?;
    let mut root_status = None;
    // The processes die before any userfaultfd closes (the servers', on drop): on failure
    // they are killed first.
    let served = serve_traced(&tracees, &servers, root, &mut live, &mut root_status);
    let mut servers = servers;
    let checked = served.and_then(|()| servers.iter_mut().try_for_each(|s| s.stop_and_check()));
    if let Err(e) = checked {
        kill_all(&live);
        drop(servers);
        drop(keeper);
        return Err(e);
    }
    // Every page is in: the userfaultfds close.
    drop(servers);
    let r = let_go(&mut live, &mut root_status, root);
    drop(keeper);
    r.map(|()| root_status)
}

/// Runs the processes, traced, until every server has all its pages in.
fn serve_traced(
    tracees: &[i32],
    servers: &[Server],
    root: i32,
    live: &mut std::collections::BTreeSet<i32>,
    root_status: &mut Option<i32>,
) -> Result<()> {
    use nix::sys::ptrace;
    use nix::unistd::Pid;
    let options = ptrace::Options::PTRACE_O_TRACESYSGOOD
        | ptrace::Options::PTRACE_O_EXITKILL
        | ptrace::Options::PTRACE_O_TRACECLONE
        | ptrace::Options::PTRACE_O_TRACEFORK
        | ptrace::Options::PTRACE_O_TRACEVFORK;
    for &t in tracees {
        ptrace::setoptions(Pid::from_raw(t), options)
            .with_context(|| format!("PTRACE_SETOPTIONS on thread {t}"))?;
    }
    for &t in tracees {
        stasis_sys::ptrace::cont(Pid::from_raw(t), 0)
            .with_context(|| format!("letting thread {t} run"))?;
    }
    tracing::info!(root, "restored processes run; their memory comes in lazily");
    let t0 = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: waitpid on any child or tracee, status into our variable.
        let p = unsafe { libc::waitpid(-1, &mut status, libc::__WALL | libc::WNOHANG) };
        if p > 0 {
            handle_stop(p, status, live, root_status, root);
            continue;
        }
        if p < 0 && nix::errno::Errno::last() == nix::errno::Errno::ECHILD {
            break;
        }
        if let Some(why) = servers.iter().find_map(|s| s.failure()) {
            bail!("lazy pages: {why}");
        }
        if servers.iter().all(|s| s.drained()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    tracing::info!(elapsed = ?t0.elapsed(), "every lazy page is in; the processes are let go");
    Ok(())
}

/// Lets go of every tracee (every page is in).
fn let_go(
    live: &mut std::collections::BTreeSet<i32>,
    root_status: &mut Option<i32>,
    root: i32,
) -> Result<()> {
    use nix::sys::ptrace;
    use nix::unistd::Pid;
    // Let go of every tracee: each is stopped (interrupted) and detached, with the signal it
    // was about to get, if any.
    for &t in live.iter() {
        let _ = stasis_sys::ptrace::interrupt(Pid::from_raw(t));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !live.is_empty() {
        let mut status = 0;
        // SAFETY: as above.
        let p = unsafe { libc::waitpid(-1, &mut status, libc::__WALL | libc::WNOHANG) };
        if p > 0 {
            if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
                live.remove(&p);
                note_exit(p, status, root_status, root);
                continue;
            }
            if libc::WIFSTOPPED(status) {
                let event = status >> 16;
                let sig = libc::WSTOPSIG(status);
                if event != 0 {
                    if let Ok(child) = ptrace::getevent(Pid::from_raw(p)) {
                        if matches!(event, 1..=3) {
                            // A thread or child made just now: let go too.
                            live.insert(child as i32);
                        }
                    }
                }
                // A signal about to be delivered goes with the detach.
                let pass = if event == 0 { sig } else { 0 };
                // SAFETY: PTRACE_DETACH takes the signal as data, no pointers.
                unsafe {
                    libc::ptrace(libc::PTRACE_DETACH, p, 0usize, pass as libc::c_long);
                }
                live.remove(&p);
            }
            continue;
        }
        if p < 0 && nix::errno::Errno::last() == nix::errno::Errno::ECHILD {
            break;
        }
        if Instant::now() > deadline {
            bail!("threads {live:?} could not be let go");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(())
}

fn note_exit(p: i32, status: i32, root_status: &mut Option<i32>, root: i32) {
    if p == root {
        *root_status = Some(if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            128 + libc::WTERMSIG(status)
        });
    }
}

/// One stop (or end) of a tracee while the processes run.
fn handle_stop(
    p: i32,
    status: i32,
    live: &mut std::collections::BTreeSet<i32>,
    root_status: &mut Option<i32>,
    root: i32,
) {
    use nix::sys::ptrace;
    use nix::unistd::Pid;
    if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
        live.remove(&p);
        note_exit(p, status, root_status, root);
        return;
    }
    if !libc::WIFSTOPPED(status) {
        return;
    }
    live.insert(p);
    let sig = libc::WSTOPSIG(status);
    let event = status >> 16;
    let pid = Pid::from_raw(p);
    let r = match event {
        0 => {
            // A signal for the process: it gets it, as if nobody were tracing it.
            stasis_sys::ptrace::cont(pid, sig)
        }
        e if e == stasis_sys::ptrace::PTRACE_EVENT_STOP => {
            if matches!(
                sig,
                libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU
            ) {
                // A job-control stop: the process stays stopped until a SIGCONT.
                // SAFETY: PTRACE_LISTEN takes no pointers.
                nix::errno::Errno::result(unsafe {
                    libc::ptrace(libc::PTRACE_LISTEN, p, 0usize, 0usize)
                })
                .map(drop)
            } else {
                // A new thread's or child's first stop, or our interrupt.
                stasis_sys::ptrace::cont(pid, 0)
            }
        }
        _ => {
            // Clone, fork, vfork: the new task is traced already (it reports its own stop).
            if let Ok(child) = ptrace::getevent(pid) {
                if (1..=3).contains(&event) {
                    live.insert(child as i32);
                }
            }
            stasis_sys::ptrace::cont(pid, 0)
        }
    };
    if let Err(e) = r {
        tracing::debug!(tid = p, "resuming a tracee: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(len: u64, off: u64) -> Piece {
        Piece { len, src: 0, off }
    }

    #[test]
    fn pieces_are_cut_where_asked() {
        let mut m = Pending::new();
        m.insert(0x10000, piece(0x40000, 0x1000));
        let (a, p) = take_at(&mut m, 0x23000, 0x10000).unwrap();
        assert_eq!((a, p), (0x20000, piece(0x10000, 0x11000)));
        assert_eq!(m.get(&0x10000), Some(&piece(0x10000, 0x1000)));
        assert_eq!(m.get(&0x30000), Some(&piece(0x20000, 0x21000)));
        assert!(take_at(&mut m, 0x24000, 0x10000).is_none(), "taken already");
        let (a, p) = take_first(&mut m, 0x8000).unwrap();
        assert_eq!((a, p), (0x10000, piece(0x8000, 0x1000)));
        let gone = take_range(&mut m, 0x14000, 0x34000);
        assert_eq!(gone.len(), 2);
        assert_eq!(m.get(&0x34000), Some(&piece(0x1c000, 0x25000)));
        assert!(!m.contains_key(&0x18000));
    }
}
