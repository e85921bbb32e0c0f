//! Incremental dumps: which pages changed since an earlier image, without soft-dirty bits.
//!
//! The kernel tells, per page, whether it was written since it was write-protected through a
//! userfaultfd in async mode (`PAGEMAP_SCAN`'s `PAGE_IS_WRITTEN`: the page's uffd-wp bit is
//! gone; the kernel clears it on the first write and lets the write through, nobody waits).
//! A dump that goes on tracking *arms* the tracker while the process is frozen, right after
//! its pages were planned: every private anonymous VMA is registered for write protection
//! and every page the image holds (or takes from its parents) is protected. The next dump,
//! given that image as `--prev-images-dir`, takes a page from it when the page is still
//! protected, was in the image at that address, and its VMA is still registered (a VMA moved
//! by `mremap`, or one mapped since, is not: all of it is dumped).
//!
//! The userfaultfd is made by the process itself (the parasite calls `userfaultfd`; the
//! kernel ties it to its caller's memory), taken by the host and closed in the process at
//! once. Its registrations last only as long as the descriptor: a *holder* process
//! (`stasis __hold-uffd PID START`, in a session of its own) keeps it open between dumps and
//! exits when the process does. Which image the protection was armed for (the *baseline*)
//! is kept in `/run/stasis/track/<pid>.json`, root's alone: it is cleared before the tracker
//! is armed again and set once the new image is complete, so a dump that fails in between
//! leaves no baseline, and the dump after it saves every page rather than trust it.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use stasis_image::model::{Backing, Bytes, Inventory, Mm, ParentPages, MAX_PARENTS};
use stasis_image::PAGE_SIZE;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The hidden subcommand a holder runs as.
pub const HOLDER_ARG: &str = "__hold-uffd";
/// The descriptor number of the userfaultfd in a holder.
const HOLDER_FD: i32 = 3;
const RUN_DIR: &str = "/run/stasis/track";

#[derive(Serialize, Deserialize)]
struct State {
    pid: i32,
    start_time: u64,
    holder: i32,
    holder_start: u64,
    /// The image the protection was last armed for; none while it is being armed again (or
    /// after a dump that armed it failed).
    baseline: Option<String>,
}

/// A tracker of one process's writes: the userfaultfd, and the holder keeping it (none yet
/// for one this dump made).
pub(crate) struct Tracker {
    pid: i32,
    start_time: u64,
    uffd: OwnedFd,
    holder: Option<(i32, u64)>,
    baseline: Option<String>,
}

fn state_path(pid: i32) -> PathBuf {
    Path::new(RUN_DIR).join(format!("{pid}.json"))
}

/// The state directory, made root's alone if it is not there; refused if anyone else could
/// write it (they could then name a baseline and make a dump trust stale pages).
fn run_dir() -> Result<PathBuf> {
    let dir = PathBuf::from(RUN_DIR);
    for d in [Path::new("/run/stasis"), dir.as_path()] {
        match std::fs::create_dir(d) {
            Ok(()) => std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("making {} private", d.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("making {}", d.display())),
        }
        let m = std::fs::symlink_metadata(d).with_context(|| format!("stat of {}", d.display()))?;
        if !m.is_dir() || m.uid() != 0 || m.mode() & 0o022 != 0 {
            bail!(
                "{} is not a directory only root may write: memory tracking refuses to use it",
                d.display()
            );
        }
    }
    Ok(dir)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no failure mode.
    unsafe { libc::geteuid() == 0 }
}

/// Whether `holder` is a live holder for (pid, start).
fn holder_is(holder: i32, holder_start: u64, pid: i32, start: u64) -> bool {
    let alive = stasis_proc::stat(holder).is_ok_and(|s| s.start_time == holder_start);
    let cmdline = std::fs::read(format!("/proc/{holder}/cmdline")).unwrap_or_default();
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let owner_root = std::fs::metadata(format!("/proc/{holder}")).is_ok_and(|m| m.uid() == 0);
    alive
        && owner_root
        && args.get(1) == Some(&HOLDER_ARG.as_bytes())
        && args.get(2) == Some(&pid.to_string().as_bytes())
        && args.get(3) == Some(&start.to_string().as_bytes())
}

impl Tracker {
    /// The tracker of `pid`, if one holds its memory: its state file is sound, it names this
    /// very process (pid and start time) and a live holder of ours, whose descriptor is a
    /// userfaultfd. A stale one is removed (and its holder, if alive, ended).
    pub(crate) fn find(pid: i32) -> Result<Option<Tracker>> {
        if !is_root() {
            return Ok(None);
        }
        let path = state_path(pid);
        let raw = match std::fs::read(&path) {
            Ok(raw) => raw,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        run_dir()?;
        let start_time = stasis_proc::stat(pid)?.start_time;
        let state: Option<State> = serde_json::from_slice(&raw).ok();
        let Some(state) = state.filter(|s| s.pid == pid && s.start_time == start_time) else {
            tracing::info!(pid, "a stale memory tracker state is removed");
            let _ = std::fs::remove_file(&path);
            return Ok(None);
        };
        if !holder_is(state.holder, state.holder_start, pid, start_time) {
            tracing::info!(
                pid,
                holder = state.holder,
                "the memory tracker's holder is gone"
            );
            let _ = std::fs::remove_file(&path);
            return Ok(None);
        }
        let uffd = stasis_sys::fs::pidfd_open(state.holder)
            .and_then(|pidfd| stasis_sys::fs::pidfd_getfd(&pidfd, HOLDER_FD))
            .with_context(|| format!("taking the userfaultfd of holder {}", state.holder))?;
        let link =
            std::fs::read_link(format!("/proc/self/fd/{}", uffd.as_raw_fd())).unwrap_or_default();
        if link.as_os_str() != "anon_inode:[userfaultfd]" {
            bail!(
                "holder {} of pid {pid}'s memory tracker holds {} where its userfaultfd should be",
                state.holder,
                link.display()
            );
        }
        Ok(Some(Tracker {
            pid,
            start_time,
            uffd,
            holder: Some((state.holder, state.holder_start)),
            baseline: state.baseline,
        }))
    }

    /// A tracker on a userfaultfd the process just made (`Parasite::make_userfaultfd`).
    pub(crate) fn new(pid: i32, uffd: OwnedFd) -> Result<Tracker> {
        if !is_root() {
            bail!("pid {pid}: tracking memory between dumps needs root");
        }
        run_dir()?;
        stasis_sys::uffd::api_wp_async(uffd.as_raw_fd()).with_context(|| {
            format!("pid {pid}: this kernel has no async write-protect userfaultfd (UFFD_FEATURE_WP_ASYNC): memory cannot be tracked")
        })?;
        Ok(Tracker {
            pid,
            start_time: stasis_proc::stat(pid)?.start_time,
            uffd,
            holder: None,
            baseline: None,
        })
    }

    /// The image the protection was armed for.
    pub(crate) fn baseline(&self) -> Option<&str> {
        self.baseline.as_deref()
    }

    fn save(&self) -> Result<()> {
        let Some((holder, holder_start)) = self.holder else {
            return Ok(());
        };
        let state = State {
            pid: self.pid,
            start_time: self.start_time,
            holder,
            holder_start,
            baseline: self.baseline.clone(),
        };
        let dir = run_dir()?;
        let tmp = dir.join(format!(".{}.json.tmp", self.pid));
        std::fs::write(&tmp, serde_json::to_vec(&state)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, state_path(self.pid))
            .with_context(|| format!("writing {}", state_path(self.pid).display()))?;
        Ok(())
    }

    /// Arms the tracker, the process frozen and its pages planned: `vmas` (its private
    /// anonymous VMAs) registered, `pages` (the ranges of them the image holds) protected.
    /// The baseline is cleared first: until `commit`, no image is what it tracks.
    pub(crate) fn arm(&mut self, vmas: &[(u64, u64)], pages: &[(u64, u64)]) -> Result<()> {
        self.baseline = None;
        self.save()?;
        let fd = self.uffd.as_raw_fd();
        let mut unregistered = 0;
        for &(start, end) in vmas {
            // A VMA the kernel will not register (EINVAL) is simply not tracked: all of it is
            // dumped each time (its smaps flags show it is not registered).
            if let Err(e) = stasis_sys::uffd::register_wp(fd, start, end - start) {
                tracing::debug!(pid = self.pid, "{start:#x}-{end:#x} not tracked: {e}");
                unregistered += 1;
            }
        }
        let mut protected = 0u64;
        for &(start, end) in pages {
            // Unprotected pages read as written: the next dump copies them, nothing is lost.
            match stasis_sys::uffd::write_protect(fd, start, end - start) {
                Ok(()) => protected += end - start,
                Err(e) => tracing::debug!(pid = self.pid, "{start:#x}-{end:#x} not protected: {e}"),
            }
        }
        tracing::info!(
            pid = self.pid,
            vmas = vmas.len(),
            unregistered,
            protected_mib = protected >> 20,
            "memory tracker armed"
        );
        Ok(())
    }

    /// The image `image_id` is complete and is what the tracker tracks from now on; a new
    /// tracker gets its holder now.
    pub(crate) fn commit(mut self, image_id: &str) -> Result<()> {
        if self.holder.is_none() {
            self.holder = Some(spawn_holder(self.pid, self.start_time, &self.uffd)?);
        }
        self.baseline = Some(image_id.to_string());
        self.save()
    }

    /// Tracking ends: the holder goes, and with its descriptor every registration (the
    /// process's memory is as it was before it was tracked).
    pub(crate) fn stop(self) {
        if let Some((holder, holder_start)) = self.holder {
            if holder_is(holder, holder_start, self.pid, self.start_time) {
                // SAFETY: a signal to a process checked just now to be our holder.
                unsafe { libc::kill(holder, libc::SIGKILL) };
            }
            let _ = std::fs::remove_file(state_path(self.pid));
        }
    }
}

fn spawn_holder(pid: i32, start: u64, uffd: &OwnedFd) -> Result<(i32, u64)> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("finding the stasis binary for the tracker")?;
    let raw = uffd.as_raw_fd();
    let mut cmd = std::process::Command::new(exe);
    cmd.args([HOLDER_ARG, &pid.to_string(), &start.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: between fork and exec only async-signal-safe calls on descriptors.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            if raw == HOLDER_FD {
                if libc::fcntl(raw, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(raw, HOLDER_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::syscall(libc::SYS_close_range, HOLDER_FD + 1, u32::MAX, 0);
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .context("starting the memory tracker's holder")?;
    let holder = child.id() as i32;
    // The holder names itself in the state file (no baseline yet) before anything else, so
    // that whatever becomes of this stasis, the next dump finds it (and may end it).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let state = std::fs::read(state_path(pid))
            .ok()
            .and_then(|raw| serde_json::from_slice::<State>(&raw).ok());
        if let Some(st) = state.filter(|st| st.holder == holder) {
            tracing::info!(pid, holder, "memory tracker holder started");
            return Ok((holder, st.holder_start));
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("the memory tracker's holder exited at once ({status})");
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            bail!("the memory tracker's holder did not start");
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// `stasis __hold-uffd PID START`: keeps descriptor 3 (the userfaultfd of process PID) open
/// until that process ends, then removes its state file (if it still names this holder).
pub fn hold(pid: i32, start: u64) -> Result<()> {
    let pidfd = stasis_sys::fs::pidfd_open(pid).with_context(|| format!("pidfd of {pid}"))?;
    if stasis_proc::stat(pid)?.start_time != start {
        return Ok(());
    }
    let me = std::process::id() as i32;
    let state = State {
        pid,
        start_time: start,
        holder: me,
        holder_start: stasis_proc::stat(me)?.start_time,
        baseline: None,
    };
    let dir = run_dir()?;
    let tmp = dir.join(format!(".{pid}.json.holder"));
    std::fs::write(&tmp, serde_json::to_vec(&state)?)?;
    std::fs::rename(&tmp, state_path(pid))?;
    loop {
        let mut p = libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd of ours.
        let n = unsafe { libc::poll(&mut p, 1, -1) };
        if n > 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e).context("waiting for the tracked process");
        }
    }
    let path = state_path(pid);
    let ours = std::fs::read(&path)
        .ok()
        .and_then(|raw| serde_json::from_slice::<State>(&raw).ok())
        .is_some_and(|s| s.holder == me);
    if ours {
        let _ = std::fs::remove_file(&path);
    }
    Ok(())
}

/// A page of the parent image: where the new image finds it.
#[derive(Clone, Copy, Debug)]
struct ParentRun {
    addr: u64,
    pages: u64,
    /// Relative to the new image: 1 the parent's own page file, k + 1 its `parents[k - 1]`.
    src: u32,
    file_off: u64,
}

/// [start, end) of a range, and where the parent has its pages (page file, offset), if it does.
pub(crate) type Piece = (u64, u64, Option<(u32, u64)>);

/// The image an incremental dump takes unchanged pages from.
pub(crate) struct Parent {
    pub image_id: String,
    /// The page files the new image may name, as its inventory lists them: the parent's,
    /// then the parent's own parents, each directory as seen from the new image's.
    chain: Vec<ParentPages>,
    /// Private anonymous pages of the parent, by address.
    runs: Vec<ParentRun>,
}

/// Directory `dir` (of an image in `base`, relative to it unless absolute) as seen from an
/// image in `from`, where `base` is `rel` from `from`.
fn rebase(rel: &Path, dir: &Path) -> PathBuf {
    if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        rel.join(dir)
    }
}

impl Parent {
    /// The parent image of process `pid` at `rel`, as seen from the new image's directory
    /// `new_dir` (relative to it unless absolute). Its records are read and checked; its
    /// page file only for its header (the restore verifies it whole).
    pub(crate) fn load(new_dir: &Path, rel: &Path, pid: i32) -> Result<Parent> {
        let dir = new_dir.join(rel);
        let d = stasis_image::ImageDir::open(&dir)
            .with_context(|| format!("opening the parent image {}", dir.display()))?;
        let inv: Inventory = stasis_image::read_record(
            &d,
            stasis_image::model::INVENTORY,
            stasis_image::model::KIND_INVENTORY,
        )?;
        if inv.pid != pid {
            bail!(
                "the parent image {} is of pid {}, not of pid {pid}",
                dir.display(),
                inv.pid
            );
        }
        if inv.image_id.is_empty() {
            bail!("the parent image {} has no image id", dir.display());
        }
        let mm: Mm =
            stasis_image::read_record(&d, stasis_image::model::MM, stasis_image::model::KIND_MM)?;
        let pages = stasis_image::PageReader::open(&d)?;
        if pages.data_len() != inv.page_data_len || pages.checksum() != inv.page_data_xxh3 {
            bail!(
                "the parent image {}: pages.img does not belong to its inventory",
                dir.display()
            );
        }
        let mut chain = vec![ParentPages {
            dir: Bytes(rel.as_os_str().as_encoded_bytes().to_vec()),
            image_id: inv.image_id.clone(),
            page_data_len: inv.page_data_len,
            page_data_xxh3: inv.page_data_xxh3,
        }];
        for p in inv.parents.iter().take(MAX_PARENTS - 1) {
            chain.push(ParentPages {
                dir: Bytes(
                    rebase(rel, p.dir.as_path())
                        .as_os_str()
                        .as_encoded_bytes()
                        .to_vec(),
                ),
                ..p.clone()
            });
        }
        let page = PAGE_SIZE as u64;
        let mut runs: Vec<ParentRun> = mm
            .vmas
            .iter()
            .filter(|v| matches!(v.backing, Backing::Anon))
            .flat_map(|v| v.pages.iter())
            .filter(|r| (r.src as usize) < chain.len())
            .map(|r| ParentRun {
                addr: r.addr,
                pages: r.pages,
                src: r.src + 1,
                file_off: r.file_off,
            })
            .collect();
        runs.sort_by_key(|r| r.addr);
        if runs
            .windows(2)
            .any(|w| w[0].addr + w[0].pages * page > w[1].addr)
        {
            bail!("the parent image {}: its page runs overlap", dir.display());
        }
        Ok(Parent {
            image_id: inv.image_id,
            chain,
            runs,
        })
    }

    /// [addr, end) cut where the parent's pages start and stop: each piece with where the
    /// parent has it (page file, offset), or `None`.
    pub(crate) fn pieces(&self, addr: u64, end: u64) -> Vec<Piece> {
        let page = PAGE_SIZE as u64;
        let mut out = Vec::new();
        let mut at = addr;
        let first = self
            .runs
            .partition_point(|r| r.addr + r.pages * page <= addr);
        for r in &self.runs[first..] {
            if r.addr >= end {
                break;
            }
            let (s, e) = (r.addr.max(at), (r.addr + r.pages * page).min(end));
            if s > at {
                out.push((at, s, None));
            }
            out.push((s, e, Some((r.src, r.file_off + (s - r.addr)))));
            at = e;
        }
        if at < end {
            out.push((at, end, None));
        }
        out
    }

    /// The chain the new image's inventory lists, with only the page files its runs name
    /// (`used[k]`: file k + 1 is named), and how each old number maps to the new one.
    pub(crate) fn chain_used(&self, used: &[bool]) -> (Vec<ParentPages>, Vec<u32>) {
        let mut chain = Vec::new();
        let mut renumber = vec![0u32; self.chain.len() + 1];
        for (k, p) in self.chain.iter().enumerate() {
            if used.get(k).copied().unwrap_or(false) {
                chain.push(p.clone());
                renumber[k + 1] = chain.len() as u32;
            }
        }
        (chain, renumber)
    }

    pub(crate) fn chain_len(&self) -> usize {
        self.chain.len()
    }
}

/// A fresh image id: 16 random bytes, in hex.
pub(crate) fn new_image_id() -> String {
    let mut b = [0u8; 16];
    let mut got = 0;
    while got < b.len() {
        // SAFETY: getrandom writes at most the given length into the buffer.
        let r = unsafe { libc::getrandom(b[got..].as_mut_ptr().cast(), b.len() - got, 0) };
        if r > 0 {
            got += r as usize;
        } else if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            // No randomness: the time and pid still make a collision implausible.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let v = t ^ ((std::process::id() as u128) << 96);
            b = v.to_le_bytes();
            break;
        }
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parent(runs: &[(u64, u64, u32, u64)]) -> Parent {
        Parent {
            image_id: "p".into(),
            chain: Vec::new(),
            runs: runs
                .iter()
                .map(|&(addr, pages, src, file_off)| ParentRun {
                    addr,
                    pages,
                    src,
                    file_off,
                })
                .collect(),
        }
    }

    #[test]
    fn pieces_cut_where_the_parent_has_pages() {
        let p = parent(&[(0x1000, 2, 1, 0x5000), (0x5000, 1, 2, 0x9000)]);
        assert_eq!(
            p.pieces(0x0, 0x7000),
            vec![
                (0x0, 0x1000, None),
                (0x1000, 0x3000, Some((1, 0x5000))),
                (0x3000, 0x5000, None),
                (0x5000, 0x6000, Some((2, 0x9000))),
                (0x6000, 0x7000, None),
            ]
        );
        assert_eq!(
            p.pieces(0x2000, 0x3000),
            vec![(0x2000, 0x3000, Some((1, 0x6000)))]
        );
        assert_eq!(p.pieces(0x3000, 0x4000), vec![(0x3000, 0x4000, None)]);
    }

    #[test]
    fn the_chain_keeps_only_what_is_named() {
        let mut p = parent(&[]);
        for k in 0..3 {
            p.chain.push(ParentPages {
                dir: Bytes(format!("p{k}").into_bytes()),
                image_id: format!("{k}"),
                page_data_len: 0,
                page_data_xxh3: 0,
            });
        }
        let (chain, renumber) = p.chain_used(&[true, false, true]);
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[1].image_id, "2");
        assert_eq!(renumber, vec![0, 1, 0, 2]);
    }

    #[test]
    fn parents_of_parents_are_seen_from_the_new_image() {
        assert_eq!(
            rebase(Path::new("../a"), Path::new("../b")),
            Path::new("../a/../b")
        );
        assert_eq!(
            rebase(Path::new("../a"), Path::new("/x/b")),
            Path::new("/x/b")
        );
    }
}
