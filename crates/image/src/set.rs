//! A whole image loaded at once and checked as a whole: every record's own checks (magic,
//! version, checksums) and then the cross-record ones an edited image could break — page runs
//! inside their VMA and inside pages.img, VMAs sorted and disjoint, thread ids agreeing, the
//! page file belonging to this inventory. Restore and `stasis show` use nothing else.

use crate::model::*;
use crate::{read_record, ImageDir, ImageError, PageReader, Result, PAGE_SIZE};

/// The kernel's `struct termios` on x86_64 (as `TCGETS` gives it).
const KERNEL_TERMIOS_LEN: usize = 36;
/// Most a pty may hold queued each way in an image (its line discipline holds 4 KiB).
const MAX_PTY_QUEUE: usize = 64 * 1024;

fn inconsistent(dir: &ImageDir, why: String) -> ImageError {
    ImageError::Inconsistent {
        dir: dir.path().to_path_buf(),
        why,
    }
}

/// A whole image, loaded and checked.
pub struct Image {
    pub dir: ImageDir,
    pub inventory: Inventory,
    /// One per thread, in `inventory.threads` order: the leader first.
    pub cores: Vec<Core>,
    pub mm: Mm,
    pub process: Process,
    pub files: Files,
    pub vdso: VdsoRecord,
    pub pages: PageReader,
    /// The page files of `inventory.parents`, in order (`PageRun::src` k is `parents[k - 1]`),
    /// each checked against what the inventory says it holds and verified.
    pub parents: Vec<PageReader>,
}

/// Loads every record and verifies every checksum. Nothing is created.
pub fn load(dir: &std::path::Path) -> Result<Image> {
    load_with(dir, true)
}

/// `load`, with the page data verified only if `verify_pages` (else the caller verifies each
/// page before it is used: `PageReader::digests` and `verify_range`).
fn load_with(dir: &std::path::Path, verify_pages: bool) -> Result<Image> {
    let d = ImageDir::open(dir)?;
    let inventory: Inventory = read_record(&d, INVENTORY, KIND_INVENTORY)?;
    if inventory.threads.first() != Some(&inventory.pid) {
        return Err(inconsistent(
            &d,
            "the thread list does not start with the process's own id".into(),
        ));
    }
    if inventory.threads.len() > MAX_THREADS {
        return Err(inconsistent(
            &d,
            format!(
                "{} threads, more than the {MAX_THREADS} this stasis restores",
                inventory.threads.len()
            ),
        ));
    }
    let mut cores = Vec::with_capacity(inventory.threads.len());
    for &tid in &inventory.threads {
        cores.push(read_record::<Core>(&d, &core_name(tid), KIND_CORE)?);
    }
    let mm: Mm = read_record(&d, MM, KIND_MM)?;
    let process: Process = read_record(&d, PROCESS, KIND_PROCESS)?;
    let files: Files = read_record(&d, FILES, KIND_FILES)?;
    let vdso: VdsoRecord = read_record(&d, VDSO, KIND_VDSO)?;
    let pages = PageReader::open(&d)?;
    if pages.data_len() != inventory.page_data_len || pages.checksum() != inventory.page_data_xxh3 {
        return Err(inconsistent(
            &d,
            "pages.img does not belong to this inventory".into(),
        ));
    }
    if verify_pages {
        pages.verify()?;
    }
    let parents = load_parents(&d, &inventory, verify_pages)?;
    let img = Image {
        dir: d,
        inventory,
        cores,
        mm,
        process,
        files,
        vdso,
        pages,
        parents,
    };
    check_consistency(&img)?;
    Ok(img)
}

/// The page files an incremental image takes pages from: each must be there and hold exactly
/// the data the inventory names (length and checksum), verified like the image's own.
fn load_parents(d: &ImageDir, inventory: &Inventory, verify: bool) -> Result<Vec<PageReader>> {
    if inventory.parents.len() > MAX_PARENTS {
        return Err(inconsistent(
            d,
            format!(
                "a chain of {} parent images, more than the {MAX_PARENTS} this stasis follows",
                inventory.parents.len()
            ),
        ));
    }
    let mut out = Vec::with_capacity(inventory.parents.len());
    for (k, p) in inventory.parents.iter().enumerate() {
        let path = d.path().join(p.dir.as_path());
        let broken = |why: String| {
            inconsistent(
                d,
                format!(
                    "its parent image {} ({}, image {}) {why}: the chain is broken",
                    k + 1,
                    path.display(),
                    p.image_id
                ),
            )
        };
        let pd = ImageDir::open(&path).map_err(|e| broken(format!("cannot be opened ({e})")))?;
        let pages = PageReader::open(&pd).map_err(|e| broken(format!("is unreadable ({e})")))?;
        if pages.data_len() != p.page_data_len || pages.checksum() != p.page_data_xxh3 {
            return Err(broken(
                "holds other pages than when this image was made".into(),
            ));
        }
        if verify {
            pages
                .verify()
                .map_err(|e| broken(format!("is damaged ({e})")))?;
        }
        out.push(pages);
    }
    Ok(out)
}

/// An image of a process and its descendants: the root's image (the top-level directory) and
/// each descendant's, in the order they are created again. A single-process image is a tree
/// of one.
pub struct TreeImage {
    pub root: Image,
    pub tasks: Vec<(TreeTask, Image)>,
    pub zombies: Vec<TreeZombie>,
}

/// Processes a tree image may hold (an image naming more is implausible).
pub const MAX_TASKS: usize = 4096;

impl TreeImage {
    /// Every process's image, the root first.
    pub fn images(&self) -> impl Iterator<Item = &Image> {
        std::iter::once(&self.root).chain(self.tasks.iter().map(|(_, i)| i))
    }
}

/// Loads and checks the root's image, then `tree.img` (if any) and every descendant's image:
/// each one whole, and the tree as a whole — distinct pids, every parent created before its
/// children, sessions and groups a restore can make, one kind for each shared description.
pub fn load_tree(dir: &std::path::Path) -> Result<TreeImage> {
    load_tree_with(dir, true)
}

/// `load_tree` without verifying any page data: for a lazy restore, which verifies each page
/// before it serves it (and what it does not serve lazily before anything is created).
pub fn load_tree_deferred(dir: &std::path::Path) -> Result<TreeImage> {
    load_tree_with(dir, false)
}

fn load_tree_with(dir: &std::path::Path, verify_pages: bool) -> Result<TreeImage> {
    let root = load_with(dir, verify_pages)?;
    let tree_path = root.dir.join(TREE);
    if !tree_path.exists() {
        return Ok(TreeImage {
            root,
            tasks: Vec::new(),
            zombies: Vec::new(),
        });
    }
    let tree: Tree = read_record(&root.dir, TREE, KIND_TREE)?;
    let top = root.dir.clone();
    let bad = |why: String| inconsistent(&top, why);
    if tree.tasks.len() + tree.zombies.len() > MAX_TASKS {
        return Err(bad(format!(
            "{} processes, more than the {MAX_TASKS} this stasis restores",
            tree.tasks.len()
        )));
    }
    let root_pid = root.inventory.pid;
    let mut made: std::collections::HashMap<i32, (i32, i32, i32)> =
        std::collections::HashMap::from([(root_pid, (0, root.process.pgid, root.process.sid))]);
    for z in &tree.zombies {
        let parent = if z.ppid == root_pid {
            Some((root.process.pgid, root.process.sid))
        } else {
            tree.tasks
                .iter()
                .find(|t| t.pid == z.ppid)
                .map(|t| (t.pgid, t.sid))
        };
        let Some((ppgid, psid)) = parent else {
            return Err(bad(format!(
                "zombie {} has no parent {} in the tree",
                z.pid, z.ppid
            )));
        };
        let status_ok = match z.status & 0x7f {
            0 => z.status & !0xff00 == 0,
            sig => (1..=64).contains(&sig) && z.status & !0xff == 0,
        };
        if z.pid <= 0
            || made.contains_key(&z.pid)
            || tree.tasks.iter().any(|t| t.pid == z.pid)
            || root.inventory.threads.contains(&z.pid)
            || !status_ok
            || (z.sid != z.pid && z.sid != psid)
            || (z.pgid != z.pid && z.pgid != ppgid)
        {
            return Err(bad(format!(
                "zombie {}: repeated pid, bad status {:#x}, or a group or session that cannot be made",
                z.pid, z.status
            )));
        }
        made.insert(z.pid, (z.ppid, z.pgid, z.sid));
    }
    let mut tasks = Vec::with_capacity(tree.tasks.len());
    for t in &tree.tasks {
        let Some(&(_, ppgid, psid)) = made.get(&t.ppid) else {
            return Err(bad(format!(
                "pid {} comes before its parent {}",
                t.pid, t.ppid
            )));
        };
        if t.pid <= 0 || made.contains_key(&t.pid) {
            return Err(bad(format!("pid {} is invalid or repeated", t.pid)));
        }
        let (sid_ok, pgid_ok) = match t.helper {
            Some(h) => {
                let free = h > 0
                    && h != t.pid
                    && !made.contains_key(&h)
                    && !tree.tasks.iter().any(|x| x.pid == h)
                    && !tree.zombies.iter().any(|z| z.pid == h);
                let ok = if t.helper_session {
                    t.sid == h && (t.pgid == h || t.pgid == t.pid)
                } else {
                    t.pgid == h && t.sid == psid
                };
                if free && ok {
                    // Later members of its group join it.
                    made.insert(h, (t.ppid, h, t.sid));
                }
                (free && ok, free && ok)
            }
            None => (
                t.sid == t.pid || t.sid == psid,
                t.pgid == t.pid
                    || t.pgid == ppgid
                    || made
                        .get(&t.pgid)
                        .is_some_and(|&(_, g, s)| g == t.pgid && s == t.sid),
            ),
        };
        if !sid_ok || !pgid_ok {
            return Err(bad(format!(
                "pid {}: session {} / group {} cannot be made again",
                t.pid, t.sid, t.pgid
            )));
        }
        let img = load_with(&root.dir.path().join(task_dir_name(t.pid)), verify_pages)?;
        if img.inventory.pid != t.pid || img.process.pgid != t.pgid || img.process.sid != t.sid {
            return Err(bad(format!(
                "the image of pid {} belongs to pid {} or disagrees with tree.img",
                t.pid, img.inventory.pid
            )));
        }
        made.insert(t.pid, (t.ppid, t.pgid, t.sid));
        tasks.push((*t, img));
    }
    let all = TreeImage {
        root,
        tasks,
        zombies: tree.zombies.clone(),
    };
    let mut ids = std::collections::HashSet::new();
    for img in all.images() {
        for &tid in &img.inventory.threads {
            if !ids.insert(tid) {
                return Err(bad(format!("thread id {tid} appears twice in the tree")));
            }
        }
    }
    for z in &all.zombies {
        if !ids.insert(z.pid) {
            return Err(bad(format!("zombie {} has the id of a thread", z.pid)));
        }
    }
    for (t, _) in &all.tasks {
        if let Some(h) = t.helper {
            if !ids.insert(h) {
                return Err(bad(format!(
                    "helper {h} has the id of a thread or another helper"
                )));
            }
        }
    }
    let mut shared: std::collections::HashMap<u32, std::mem::Discriminant<FileKind>> =
        std::collections::HashMap::new();
    for img in all.images() {
        for d in &img.files.descs {
            if let Some(id) = d.tree_id {
                let kind = std::mem::discriminant(&d.kind);
                let allowed = matches!(
                    d.kind,
                    FileKind::Path { .. }
                        | FileKind::CharDev { .. }
                        | FileKind::Pipe { inherit: None, .. }
                        | FileKind::Pty { .. }
                        | FileKind::Unnamed { .. }
                        | FileKind::EventFd { .. }
                        | FileKind::Socket(_)
                        | FileKind::TimerFd { .. }
                        | FileKind::SignalFd { .. }
                );
                if !allowed || *shared.entry(id).or_insert(kind) != kind {
                    return Err(bad(format!(
                        "shared description {id} is of a kind that cannot be shared, or of two kinds"
                    )));
                }
            }
        }
    }
    // Every pty a description or a controlling terminal names is in the set.
    let mut ptys = std::collections::HashSet::new();
    for img in all.images() {
        ptys.extend(img.files.ptys.iter().map(|p| p.index));
    }
    for img in all.images() {
        let named = img
            .files
            .descs
            .iter()
            .filter_map(|d| match d.kind {
                FileKind::Pty { index, .. } => Some(index),
                _ => None,
            })
            .chain(img.process.ctty_pty.map(|c| c.index));
        for index in named {
            if !ptys.contains(&index) {
                return Err(bad(format!(
                    "pid {} uses pty {index}, whose master's state is in no image of the set",
                    img.inventory.pid
                )));
            }
        }
    }
    Ok(all)
}

/// Registers a 64-bit user process can run with: its own code and stack segments, flags a
/// user may hold (interrupts on, no I/O privilege, no virtual-8086 mode), canonical user
/// addresses. Anything else would be refused by the kernel after the process is made, or
/// kill it at its first instruction.
fn check_gpr(g: &Gpr) -> std::result::Result<(), String> {
    const USER_CS: u64 = 0x33;
    const USER_DS: u64 = 0x2b;
    // CF PF AF ZF SF TF IF DF OF NT RF AC ID, and bit 1, which is always set.
    const USER_FLAGS: u64 = 0x1
        | 0x2
        | 0x4
        | 0x10
        | 0x40
        | 0x80
        | 0x100
        | 0x200
        | 0x400
        | 0x800
        | 0x4000
        | 0x1_0000
        | 0x4_0000
        | 0x20_0000;
    const USER_TOP: u64 = 0x0000_8000_0000_0000;
    if g.cs != USER_CS || g.ss != USER_DS {
        return Err(format!(
            "code/stack segments {:#x}/{:#x} are not 64-bit user ones",
            g.cs, g.ss
        ));
    }
    if [g.ds, g.es, g.fs, g.gs]
        .iter()
        .any(|&s| s != 0 && s != USER_DS)
    {
        return Err("a data segment that is not a user one".into());
    }
    if g.eflags & !USER_FLAGS != 0 || g.eflags & 0x202 != 0x202 {
        return Err(format!(
            "flags {:#x} a user process cannot run with",
            g.eflags
        ));
    }
    if g.rip >= USER_TOP || g.fs_base >= USER_TOP || g.gs_base >= USER_TOP {
        return Err("an instruction pointer or TLS base outside user space".into());
    }
    Ok(())
}

/// What a restore would do with a socket must make sense before anything is created: a family
/// and type stasis restores, addresses no longer than a `sockaddr`, known options of
/// plausible size, and a queue inside pages.img whose messages add up to it.
fn check_socket(s: &Socket, data_ok: &dyn Fn(u64, u64) -> bool) -> std::result::Result<(), String> {
    const MAX_ADDR: usize = 128;
    const MAX_OPT: usize = 64;
    let netlink = s.family == 16 && s.protocol == 0 && [2, 3].contains(&s.sock_type);
    if !netlink && (![1, 2, 10].contains(&s.family) || ![1, 2, 5].contains(&s.sock_type)) {
        return Err(format!("family {} type {}", s.family, s.sock_type));
    }
    if (s.family == 1) != s.unix.is_some() {
        return Err("unix details on a socket of another family, or none on a unix one".into());
    }
    if s.local.len() > MAX_ADDR || s.remote.len() > MAX_ADDR {
        return Err("an address longer than a sockaddr".into());
    }
    for o in &s.opts {
        if sock_opt_name(o.level, o.name).is_none() || o.value.len() > MAX_OPT {
            return Err(format!(
                "option {}:{} is not one stasis restores",
                o.level, o.name
            ));
        }
    }
    if s.unix.as_ref().is_some_and(|u| {
        u.backlog.len() > 65536 || (u.pending && (s.remote.is_empty() || u.pair.is_some()))
    }) {
        return Err("an implausible backlog or pending connection".into());
    }
    if s.groups.len() > 1024 || (!s.groups.is_empty() && !netlink) {
        return Err("multicast groups on a socket that is no netlink socket".into());
    }
    let q = &s.queue;
    if !data_ok(q.data_off, q.len) {
        return Err("its queue lies outside pages.img".into());
    }
    let sum = q
        .msgs
        .iter()
        .try_fold(0u64, |a, &m| a.checked_add(m as u64));
    if s.sock_type != 1 && sum != Some(q.len) || s.sock_type == 1 && !q.msgs.is_empty() {
        return Err("its messages do not add up to its queue".into());
    }
    Ok(())
}

/// Watches of one inotify instance, and the highest watch number, a restore takes on (making
/// a number costs one add and one remove of a watch).
pub const MAX_INOTIFY_WATCHES: usize = 65536;
pub const MAX_INOTIFY_WD: usize = 1 << 20;

/// Threads a restore will create at most (the kernel's own limit is far higher; an image that
/// names more is implausible and would make us allocate per thread before anything fails).
pub const MAX_THREADS: usize = 16384;

impl Image {
    /// The leader's core (`load` guarantees there is one).
    pub fn leader(&self) -> &Core {
        &self.cores[0]
    }
}

/// Cross-record checks an attacker-made image could break: every page run inside its VMA and
/// inside pages.img, VMAs sorted and disjoint, thread ids agreeing and distinct, every fd
/// naming a description, every saved file's data inside pages.img.
fn check_consistency(img: &Image) -> Result<()> {
    let bad = |why: String| inconsistent(&img.dir, why);
    let mut tids = std::collections::HashSet::new();
    for (core, &tid) in img.cores.iter().zip(&img.inventory.threads) {
        if core.tid != tid || tid <= 0 || !tids.insert(tid) {
            return Err(bad(format!(
                "core record of thread {tid} belongs to thread {} or repeats one",
                core.tid
            )));
        }
        if let Err(why) = check_gpr(&core.gpr) {
            return Err(bad(format!("thread {tid}: {why}")));
        }
    }
    let page = PAGE_SIZE as u64;
    let data_end = crate::DATA_OFFSET + img.pages.data_len();
    // Saved file data is read into memory before restore creates anything: it must lie in
    // pages.img, whose size is real, before a byte of it is allocated.
    let data_ok = |off: u64, len: u64| {
        len == 0
            || (off >= crate::DATA_OFFSET
                && off.is_multiple_of(page)
                && off.checked_add(len).is_some_and(|e| e <= data_end))
    };
    let mut prev_end = 0;
    for v in &img.mm.vmas {
        if v.start % page != 0 || v.end % page != 0 || v.end <= v.start || v.start < prev_end {
            return Err(bad(format!(
                "VMA {:#x}-{:#x} is misaligned or overlaps",
                v.start, v.end
            )));
        }
        prev_end = v.end;
        if v.shared && matches!(v.backing, Backing::File { .. }) && !v.pages.is_empty() {
            // The pages of a shared file mapping live in the file: a dump never saves them,
            // and a restore must never write an image's bytes into a file.
            return Err(bad(format!(
                "shared file mapping {:#x}-{:#x} carries page data",
                v.start, v.end
            )));
        }
        for r in &v.pages {
            let len = r
                .pages
                .checked_mul(page)
                .ok_or_else(|| bad("page run overflow".into()))?;
            let in_vma = r.addr >= v.start && r.addr.checked_add(len).is_some_and(|e| e <= v.end);
            let data_end = match r.src as usize {
                0 => data_end,
                k => {
                    let Some(parent) = img.parents.get(k - 1) else {
                        return Err(bad(format!(
                            "page run at {:#x} names parent image {k}, which the inventory lacks",
                            r.addr
                        )));
                    };
                    if !matches!(v.backing, Backing::Anon) {
                        return Err(bad(format!(
                            "page run at {:#x} of a mapping other than private anonymous memory lies in a parent image",
                            r.addr
                        )));
                    }
                    crate::DATA_OFFSET + parent.data_len()
                }
            };
            let in_file = r.file_off >= crate::DATA_OFFSET
                && r.file_off % page == 0
                && r.file_off.checked_add(len).is_some_and(|e| e <= data_end);
            if !in_vma || !in_file {
                return Err(bad(format!(
                    "page run at {:#x} lies outside its VMA or pages.img",
                    r.addr
                )));
            }
        }
    }
    if img
        .process
        .job_stop
        .is_some_and(|s| ![19, 20, 21, 22].contains(&s))
    {
        // SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU.
        return Err(bad("stopped by a signal that does not stop".into()));
    }
    if img.process.sigactions.len() != 64 {
        return Err(bad("signal handler table of the wrong size".into()));
    }
    let f = &img.files;
    let mut ids = std::collections::HashSet::new();
    if !f.descs.iter().all(|d| ids.insert(d.id)) {
        return Err(bad("two open file descriptions share an id".into()));
    }
    let mut numbers = std::collections::HashSet::new();
    for fd in &f.fds {
        if fd.fd < 0 || !numbers.insert(fd.fd) || !ids.contains(&fd.desc) {
            return Err(bad(format!(
                "fd {} is negative, repeated, or names no description",
                fd.fd
            )));
        }
    }
    for p in &f.pipes {
        if !data_ok(p.data_off, p.len) || p.len > p.size as u64 {
            return Err(bad(format!(
                "the data of pipe {} lies outside pages.img or exceeds its size",
                p.inode
            )));
        }
    }
    for p in &f.fifos {
        if !data_ok(p.data_off, p.len) || p.len > p.size as u64 {
            return Err(bad(format!(
                "the data of FIFO {} lies outside pages.img or exceeds its size",
                p.inode
            )));
        }
    }
    let mut pty_numbers = std::collections::HashSet::new();
    for p in &f.ptys {
        let lines: u64 = p.lines.iter().map(|l| l.len as u64).sum();
        let bounded = |len: u64| len <= MAX_PTY_QUEUE as u64;
        if !pty_numbers.insert(p.index)
            || p.termios.len() != KERNEL_TERMIOS_LEN
            || !bounded(p.input_len)
            || !bounded(p.output_len)
            || !data_ok(p.input_off, p.input_len)
            || !data_ok(p.output_off, p.output_len)
            || lines > p.input_len
            || p.lines.len() > MAX_PTY_QUEUE
        {
            return Err(bad(format!(
                "pty {}: repeated, its modes malformed, or its queues too large or outside pages.img",
                p.index
            )));
        }
    }
    for d in &f.descs {
        if let FileKind::Pty { index, .. } = d.kind {
            if d.tree_id.is_none() && !pty_numbers.contains(&index) {
                return Err(bad(format!(
                    "pty {index} is used but its master's state is not in this image"
                )));
            }
        }
    }
    if let Some(c) = img.process.ctty_pty {
        let holds = f
            .descs
            .iter()
            .any(|d| matches!(d.kind, FileKind::Pty { index, .. } if index == c.index));
        if img.process.sid == img.inventory.pid && !holds {
            return Err(bad(format!(
                "the session leader has pty {} as its terminal but no descriptor of it",
                c.index
            )));
        }
    }
    for u in &f.unnamed {
        if !data_ok(u.data_off, u.len) {
            return Err(bad(format!(
                "the contents of unnamed file {} lie outside pages.img",
                u.inode
            )));
        }
    }
    for l in &f.locks {
        let desc = f
            .fds
            .iter()
            .find(|fd| fd.fd == l.fd)
            .and_then(|fd| f.desc(fd.desc));
        let regular = desc
            .is_some_and(|d| matches!(d.kind, FileKind::Path { .. } | FileKind::Unnamed { .. }));
        let fits = l.start <= i64::MAX as u64
            && l.len <= i64::MAX as u64
            && l.start
                .checked_add(l.len)
                .is_some_and(|e| e <= i64::MAX as u64)
            && (l.kind != LockKind::Flock || (l.start == 0 && l.len == 0));
        if !regular || !fits {
            return Err(bad(format!(
                "{l}: no such fd, not a regular file, or a range out of bounds"
            )));
        }
    }
    for l in &f.mapped_locks {
        let mapped = img.mm.vmas.iter().any(|v| {
            matches!(v.backing, Backing::File { dev, inode, .. } if dev == l.dev && inode == l.inode)
        });
        if !mapped {
            return Err(bad(format!(
                "a flock on inode {} held through a mapping the process does not have",
                l.inode
            )));
        }
    }
    for d in &f.descs {
        if let FileKind::TimerFd {
            clockid,
            value,
            interval,
            ..
        } = d.kind
        {
            let ns_ok = |(s, ns): (i64, i64)| s >= 0 && (0..1_000_000_000).contains(&ns);
            if ![0, 1, 7, 8, 9].contains(&clockid) || !ns_ok(value) || !ns_ok(interval) {
                return Err(bad(format!(
                    "timerfd {}: a clock or time out of range",
                    d.id
                )));
            }
        }
        if let FileKind::Epoll { watches } = &d.kind {
            if watches
                .iter()
                .any(|w| w.file.is_some_and(|id| !ids.contains(&id)))
            {
                return Err(bad(format!(
                    "epoll instance {}: a watch names a description that does not exist",
                    d.id
                )));
            }
        }
        if let FileKind::Inotify { watches } = &d.kind {
            let ok = watches.len() <= MAX_INOTIFY_WATCHES
                && watches.iter().all(|w| {
                    w.wd > 0
                        && w.wd as usize <= MAX_INOTIFY_WD
                        && w.path.as_bytes().first() == Some(&b'/')
                })
                && watches.windows(2).all(|p| p[0].wd < p[1].wd);
            if !ok {
                return Err(bad(format!(
                    "inotify instance {}: implausible watches",
                    d.id
                )));
            }
        }
        if let FileKind::Socket(s) = &d.kind {
            check_socket(s, &data_ok).map_err(|why| bad(format!("socket {}: {why}", s.inode)))?;
        }
    }
    for d in &f.descs {
        if let FileKind::Unnamed { dev, inode } = d.kind {
            if f.unnamed(dev, inode).is_none() {
                return Err(bad(format!(
                    "description {} refers to an unnamed file that has no saved contents",
                    d.id
                )));
            }
        }
    }
    Ok(())
}
