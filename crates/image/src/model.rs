//! What a checkpoint image holds, record by record. Serialized as the JSON payload of a record
//! file (see the crate doc for the container); page contents live in `pages.img` and are
//! referenced by `PageRun`s.
//!
//! Per-thread state (registers, signal mask, pending signals, sigaltstack, rseq, robust list,
//! credentials, name, scheduling) is in one `Core` per thread; process-wide state is in
//! `Process` and `Mm`. Open files are open file *descriptions*, each once with an id, and the
//! descriptors that refer to them, so fds that shared one description (dup, fork) share it again.
//!
//! Paths and names are the kernel's bytes ([`Bytes`]): a file name need not be UTF-8.

use serde::{Deserialize, Serialize};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

pub const KIND_INVENTORY: u32 = 1;
pub const KIND_CORE: u32 = 2;
pub const KIND_MM: u32 = 3;
pub const KIND_PROCESS: u32 = 4;
pub const KIND_FILES: u32 = 5;
pub const KIND_VDSO: u32 = 6;
pub const KIND_TREE: u32 = 7;

pub const INVENTORY: &str = "inventory.img";
pub const MM: &str = "mm.img";
pub const PROCESS: &str = "process.img";
pub const FILES: &str = "files.img";
pub const VDSO: &str = "vdso.img";
pub const TREE: &str = "tree.img";

/// The subdirectory of a tree image holding the image of descendant `pid`.
pub fn task_dir_name(pid: i32) -> String {
    format!("task-{pid}")
}

pub fn core_name(tid: i32) -> String {
    format!("core-{tid}.img")
}

/// Bytes as the kernel gave them: a path, a file or thread name. Stored as a JSON string when
/// they are UTF-8 (readable, diffable) and as `{"hex": "…"}` when they are not, so nothing is
/// ever rewritten the way a lossy conversion would.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bytes(pub Vec<u8>);

impl Bytes {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn as_os_str(&self) -> &OsStr {
        OsStr::from_bytes(&self.0)
    }

    pub fn as_path(&self) -> &std::path::Path {
        std::path::Path::new(self.as_os_str())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn starts_with(&self, prefix: &[u8]) -> bool {
        self.0.starts_with(prefix)
    }

    pub fn ends_with(&self, suffix: &[u8]) -> bool {
        self.0.ends_with(suffix)
    }

    /// Without the " (deleted)" the kernel appends to the name of an unlinked file.
    pub fn without_deleted(&self) -> Bytes {
        Bytes(
            self.0
                .strip_suffix(DELETED_SUFFIX)
                .unwrap_or(&self.0)
                .to_vec(),
        )
    }
}

/// What /proc appends to the path of a file that has been unlinked.
pub const DELETED_SUFFIX: &[u8] = b" (deleted)";

impl From<&str> for Bytes {
    fn from(s: &str) -> Bytes {
        Bytes(s.as_bytes().to_vec())
    }
}

impl From<&[u8]> for Bytes {
    fn from(s: &[u8]) -> Bytes {
        Bytes(s.to_vec())
    }
}

impl From<&OsStr> for Bytes {
    fn from(s: &OsStr) -> Bytes {
        Bytes(s.as_bytes().to_vec())
    }
}

impl From<std::path::PathBuf> for Bytes {
    fn from(p: std::path::PathBuf) -> Bytes {
        Bytes(p.into_os_string().into_vec())
    }
}

impl std::fmt::Display for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", String::from_utf8_lossy(&self.0))
    }
}

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match std::str::from_utf8(&self.0) {
            Ok(s) => write!(f, "{s:?}"),
            Err(_) => write!(f, "{}", self.0.escape_ascii()),
        }
    }
}

impl Serialize for Bytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(&self.0) {
            Ok(text) => s.serialize_str(text),
            Err(_) => {
                use serde::ser::SerializeMap;
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("hex", &hex_bytes::encode(&self.0))?;
                m.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Text(String),
            Hex { hex: String },
        }
        match Form::deserialize(d)? {
            Form::Text(t) => Ok(Bytes(t.into_bytes())),
            Form::Hex { hex } => hex_bytes::decode(&hex)
                .map(Bytes)
                .map_err(serde::de::Error::custom),
        }
    }
}

use std::os::unix::ffi::OsStringExt;

/// The image's table of contents, written last: an image without it is incomplete.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Inventory {
    pub pid: i32,
    /// Thread ids, the leader first; one `core-<tid>.img` each.
    pub threads: Vec<i32>,
    pub comm: Bytes,
    /// `uname -r` of the kernel the image was made under.
    pub kernel: String,
    /// Unix time of the dump.
    pub created: u64,
    pub stasis_version: String,
    /// Size of the XSAVE area on the dumping CPU, and its XCR0.
    pub xsave_size: u32,
    pub xcr0: u64,
    /// Where the dumping CPU puts each extended XSAVE component (standard format):
    /// (component, offset, size) from CPUID leaf 0xD, for translating to another CPU.
    #[serde(default)]
    pub xsave_layout: Vec<(u32, u32, u32)>,
    /// CLOCK_MONOTONIC and CLOCK_BOOTTIME at the dump, in ns: a restore on a machine whose
    /// clocks are behind (booted later) shifts them forward with a time namespace, so the
    /// process never sees them go backwards. 0 in images that predate these fields.
    #[serde(default)]
    pub monotonic_ns: u64,
    #[serde(default)]
    pub boottime_ns: u64,
    /// Bytes of page data and their checksum (cross-checked with pages.img's own header).
    pub page_data_len: u64,
    pub page_data_xxh3: u64,
    /// The root's only: the network lock (an nftables table) that holds the dumped TCP
    /// connections until the restore has them back.
    #[serde(default)]
    pub netlock: Option<String>,
    /// Random, one per image: what an incremental dump's `ParentPages` names, and what the
    /// memory tracker records as the image it tracks writes since.
    #[serde(default)]
    pub image_id: String,
    /// A pre-dump: memory only (no descriptors), a parent for the dumps after it, never
    /// restored itself.
    #[serde(default)]
    pub pre_dump: bool,
    /// The page files this image takes unchanged pages from (`PageRun::src`): its parent's
    /// first, then the parent's own, and so on.
    #[serde(default)]
    pub parents: Vec<ParentPages>,
}

/// General-purpose registers as `struct user_regs_struct` orders them.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Gpr {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub orig_rax: u64,
    pub rip: u64,
    pub cs: u64,
    pub eflags: u64,
    pub rsp: u64,
    pub ss: u64,
    pub fs_base: u64,
    pub gs_base: u64,
    pub ds: u64,
    pub es: u64,
    pub fs: u64,
    pub gs: u64,
}

/// A raw `siginfo_t` (128 bytes) of a pending signal.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PendingSignal {
    pub signo: i32,
    #[serde(with = "hex_bytes")]
    pub siginfo: Vec<u8>,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AltStack {
    pub sp: u64,
    pub flags: i32,
    pub size: u64,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Rseq {
    pub addr: u64,
    pub len: u32,
    pub sig: u32,
}

/// One thread: `core-<tid>.img`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Core {
    pub tid: i32,
    pub gpr: Gpr,
    /// The XSAVE area exactly as `PTRACE_GETREGSET(NT_X86_XSTATE)` gave it.
    #[serde(with = "hex_bytes")]
    pub xsave: Vec<u8>,
    pub sigmask: u64,
    /// Signals pending for this thread only.
    pub pending: Vec<PendingSignal>,
    pub altstack: AltStack,
    pub rseq: Option<Rseq>,
    /// `set_robust_list` head and length (0 when none).
    pub robust_list: u64,
    pub robust_list_len: u64,
    /// `set_tid_address` value.
    pub clear_child_tid: u64,
    /// `PR_SET_PDEATHSIG`: the signal the thread gets when its parent dies (0: none).
    pub pdeathsig: i32,
    /// The thread's name (`/proc/PID/task/TID/comm`).
    pub comm: Bytes,
    /// Credentials: per thread in the kernel, set on every thread on restore.
    pub creds: Creds,
    pub sched: Sched,
    /// CPUs the thread may run on, as a bit mask in 64-bit words; None: every CPU there was.
    pub affinity: Option<Vec<u64>>,
    /// `PR_SET_NO_NEW_PRIVS` (one-way, per thread).
    pub no_new_privs: bool,
}

/// A thread's scheduling: policy (`SCHED_*`, with `SCHED_RESET_ON_FORK` or'ed in), its
/// real-time priority, and its nice value.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Sched {
    pub policy: i32,
    pub priority: i32,
    pub nice: i32,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SigAction {
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ITimer {
    pub interval_sec: i64,
    pub interval_usec: i64,
    pub value_sec: i64,
    pub value_usec: i64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Creds {
    /// real, effective, saved, filesystem
    pub uids: [u32; 4],
    pub gids: [u32; 4],
    pub groups: Vec<u32>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Rlimit {
    pub resource: u32,
    pub cur: u64,
    pub max: u64,
}

/// A POSIX timer (`timer_create`), as /proc/PID/timers and `timer_gettime` describe it.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PosixTimer {
    pub id: i32,
    pub clock: i32,
    pub signo: i32,
    pub sigval: u64,
    /// SIGEV_SIGNAL (0), SIGEV_NONE (1), SIGEV_THREAD (2), possibly | SIGEV_THREAD_ID (4).
    pub notify: i32,
    /// The thread signalled with SIGEV_THREAD_ID.
    pub tid: i32,
    /// Remaining time and reload interval (`struct itimerspec`).
    pub interval_sec: i64,
    pub interval_nsec: i64,
    pub value_sec: i64,
    pub value_nsec: i64,
}

/// Process-wide state: `process.img`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Process {
    /// Index `i` is signal `i + 1`.
    pub sigactions: Vec<SigAction>,
    /// Signals pending for the whole process.
    pub shared_pending: Vec<PendingSignal>,
    /// ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF.
    pub itimers: [ITimer; 3],
    pub posix_timers: Vec<PosixTimer>,
    pub rlimits: Vec<Rlimit>,
    pub umask: u32,
    pub cwd: Bytes,
    /// The cwd had been removed (rmdir) while the process sat in it: its mode, so a directory
    /// can be made, entered and removed again on restore.
    pub cwd_deleted_mode: Option<u32>,
    pub root: Bytes,
    pub personality: u32,
    pub comm: Bytes,
    pub dumpable: i32,
    pub pgid: i32,
    pub sid: i32,
    /// Stopped by job control at the dump, by this signal (SIGSTOP, SIGTSTP, SIGTTIN,
    /// SIGTTOU): it comes back stopped.
    pub job_stop: Option<i32>,
    /// `PR_SET_CHILD_SUBREAPER`.
    pub child_subreaper: bool,
    /// The controlling terminal (`tty_nr` of /proc/PID/stat: its device, 0 for none).
    #[serde(default)]
    pub tty_nr: u64,
    /// The controlling terminal is pty `index` of the image (not the shell job's terminal):
    /// the session leader makes it so again, a member of group `foreground` makes that the
    /// foreground group.
    #[serde(default)]
    pub ctty_pty: Option<CttyPty>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CttyPty {
    pub index: u32,
    pub foreground: i32,
}

/// What backs a VMA.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Backing {
    /// Private anonymous memory (heap, stack, malloc arenas, …).
    Anon,
    /// Shared anonymous memory (`MAP_SHARED|MAP_ANONYMOUS`, shmem). `id` names the shmem
    /// object (its inode): VMAs with the same id are views of one object, at `offset` in it.
    AnonShared {
        #[serde(default)]
        id: u64,
        #[serde(default)]
        offset: u64,
    },
    /// A file mapping; private ones also carry their modified pages. When `(dev, inode)` is
    /// one of `Files::unnamed` (a deleted file, e.g. a binary replaced by an upgrade, or a
    /// memfd), the file is recreated from its saved contents.
    File {
        path: Bytes,
        offset: u64,
        dev: u64,
        inode: u64,
    },
    /// A kernel vDSO-related special mapping (`[vdso]`, `[vvar]`, `[vvar_vclock]`, …).
    Vdso { name: String },
}

/// `dev` as the kernel encodes it internally and /proc/PID/maps shows it (major:minor).
pub fn kdev(major: u32, minor: u32) -> u64 {
    ((major as u64) << 20) | minor as u64
}

/// Consecutive dumped pages of one VMA, stored contiguously in a page file: this image's
/// pages.img, or (an incremental dump's pages that did not change) an earlier image's.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PageRun {
    pub addr: u64,
    pub pages: u64,
    /// Offset of the first page in its page file (page-aligned).
    pub file_off: u64,
    /// Which page file: 0 this image's, `k` the one of `Inventory::parents[k - 1]`. Only
    /// private anonymous memory refers to a parent.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub src: u32,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// An earlier image whose page file an incremental image takes pages from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ParentPages {
    /// The earlier image's directory: relative to this image's directory (as
    /// `--prev-images-dir` names it), or absolute.
    pub dir: Bytes,
    /// Its `Inventory::image_id`.
    pub image_id: String,
    /// What its pages.img holds, as its inventory says: a restore refuses a parent whose page
    /// file is not exactly this.
    pub page_data_len: u64,
    pub page_data_xxh3: u64,
}

/// Most earlier images an incremental image may take pages from.
pub const MAX_PARENTS: usize = 16;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    /// PROT_* bits.
    pub prot: u32,
    pub shared: bool,
    pub growsdown: bool,
    /// `VM_MAYWRITE` (smaps `mw`): the mapping may be made writable; a shared file mapping
    /// needs its file opened for writing for that.
    pub maywrite: bool,
    /// `ADVICE_*` bits: madvise/mlock state to apply again.
    pub advice: u32,
    /// The name /proc/PID/maps showed (`[heap]`, a path, empty…), for humans.
    pub name: Bytes,
    pub backing: Backing,
    pub pages: Vec<PageRun>,
}

/// `Vma::advice` bits, from smaps `VmFlags`.
pub const ADVICE_HUGEPAGE: u32 = 1 << 0;
pub const ADVICE_NOHUGEPAGE: u32 = 1 << 1;
pub const ADVICE_DONTFORK: u32 = 1 << 2;
pub const ADVICE_WIPEONFORK: u32 = 1 << 3;
pub const ADVICE_DONTDUMP: u32 = 1 << 4;
pub const ADVICE_MERGEABLE: u32 = 1 << 5;
pub const ADVICE_LOCKED: u32 = 1 << 6;

/// `struct prctl_mm_map` fields.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MmFields {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
}

/// The address space: `mm.img`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Mm {
    pub vmas: Vec<Vma>,
    pub fields: MmFields,
    pub auxv: Vec<u64>,
    pub exe: Bytes,
    /// The exe's `(dev, inode)`, to find it among `Files::unnamed` when it was deleted.
    pub exe_dev: u64,
    pub exe_inode: u64,
}

/// What an open file description refers to.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FileKind {
    /// A file with a name (regular file or directory), opened again by that name.
    Path { path: Bytes, dev: u64, inode: u64 },
    /// A file without a name (deleted while open, or a memfd): `Files::unnamed` has its
    /// contents, under the same `(dev, inode)`.
    Unnamed { dev: u64, inode: u64 },
    /// A character device opened by path (`/dev/null`, …); the device number must match.
    CharDev { path: Bytes, rdev: u64 },
    /// One end of a pipe (read or write per the description's access mode). `inherit`: the
    /// other end is outside the process, so the restoring stasis's own descriptor of that
    /// number (a pipe) stands in, as for a shell job.
    Pipe { inode: u64, inherit: Option<i32> },
    /// `eventfd`: its counter and whether it counts as a semaphore.
    EventFd { count: u64, semaphore: bool },
    /// An epoll instance and everything registered with it (added once every descriptor is
    /// back at its number).
    Epoll { watches: Vec<EpollWatch> },
    /// A terminal of a shell job (`--shell-job`): `inherit` is the restoring stasis's own
    /// descriptor of that number (its terminal) to take over; `None`: a further description of
    /// the same terminal, opened again through the inherited one. `termios` (a raw
    /// `struct termios`) is set on the terminal once the process is back.
    Tty {
        path: Bytes,
        rdev: u64,
        inherit: Option<i32>,
        #[serde(with = "hex_bytes")]
        termios: Vec<u8>,
    },
    /// A pseudo-terminal end the process opened itself: the master (`/dev/ptmx`) or the
    /// slave (`/dev/pts/N`) of pty `index` (N at the dump); the pty's modes and queues are in
    /// `Files::ptys` of the process holding its master.
    Pty { index: u32, master: bool },
    /// A socket: its family, type, addresses, state, options and receive queue.
    Socket(Box<Socket>),
    /// `timerfd_create(clockid)`: `value` is what was left to run at the dump (an absolute
    /// deadline on `clockid` for a `TFD_TIMER_ABSTIME` timer), `interval` its period, `ticks`
    /// the expirations not read yet. Zero `value`: disarmed.
    TimerFd {
        clockid: i32,
        abstime: bool,
        value: (i64, i64),
        interval: (i64, i64),
        ticks: u64,
    },
    /// `signalfd` with its signal mask (bit n-1 for signal n).
    SignalFd { mask: u64 },
    /// An inotify instance and its watches, each with its number (programs keep them).
    Inotify { watches: Vec<InotifyWatch> },
    /// A named pipe (FIFO), either end or both, opened again by its path; the data it held is
    /// in `Files::fifos` under the same `(dev, inode)`.
    Fifo { path: Bytes, dev: u64, inode: u64 },
}

/// The data buffered in a named pipe, once per FIFO, read without consuming it.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FifoBuf {
    pub dev: u64,
    pub inode: u64,
    pub data_off: u64,
    pub len: u64,
    /// `F_GETPIPE_SZ`.
    pub size: u32,
}

/// One inotify watch: its number, its mask as `inotify_add_watch` takes it, and the file
/// watched (found from the kernel's file handle when dumped).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct InotifyWatch {
    pub wd: i32,
    pub mask: u32,
    pub path: Bytes,
    pub dev: u64,
    pub inode: u64,
}

/// A socket as the dump found it. Addresses are the kernel's `struct sockaddr` bytes (empty:
/// none). The receive queue is in pages.img: what the process had not read yet.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Socket {
    pub inode: u64,
    /// AF_UNIX, AF_INET or AF_INET6.
    pub family: i32,
    /// SOCK_STREAM, SOCK_DGRAM or SOCK_SEQPACKET.
    #[serde(rename = "type")]
    pub sock_type: i32,
    pub protocol: i32,
    pub state: SockState,
    /// The address it is bound to; empty: not bound.
    #[serde(with = "hex_bytes")]
    pub local: Vec<u8>,
    /// The address a datagram socket is connected to; empty: none.
    #[serde(with = "hex_bytes")]
    pub remote: Vec<u8>,
    /// Unix sockets only.
    pub unix: Option<UnixSock>,
    /// `SHUT_RD` (bit 0) and `SHUT_WR` (bit 1) done on it.
    pub shutdown: u8,
    /// Options that differ from what a new socket has, each from [`SOCK_OPTS`].
    pub opts: Vec<SockOpt>,
    /// `SO_PEEK_OFF` (-1: not set).
    pub peek_off: i32,
    /// A netlink socket's multicast groups (`NETLINK_LIST_MEMBERSHIPS`).
    #[serde(default)]
    pub groups: Vec<u32>,
    pub queue: SockQueue,
    /// An established TCP connection (`--tcp-established`), in the kernel's repair terms.
    #[serde(default)]
    pub tcp: Option<TcpConn>,
    /// A TCP connection dumped with `--tcp-close`: it comes back as a new socket that is
    /// neither bound nor connected (the program sees its connection gone).
    #[serde(default)]
    pub closed: bool,
}

/// An established TCP connection as repair mode shows it. `queue` (the socket's) holds what
/// was received and not read; `send` what was written and not yet acknowledged, its last
/// `unsent` bytes never sent.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TcpConn {
    /// The sequence number after the last byte written (`write_seq`).
    pub snd_seq: u32,
    /// The sequence number after the last byte received (`rcv_nxt`).
    pub rcv_seq: u32,
    pub mss: u32,
    pub timestamps: bool,
    pub sack: bool,
    /// Window scaling, with the two shifts (sending, receiving).
    pub wscale: Option<(u8, u8)>,
    /// The connection's timestamp clock (`TCP_TIMESTAMP`).
    pub timestamp: u32,
    /// `TCP_REPAIR_WINDOW`: snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup.
    pub window: [u32; 5],
    pub send: SockQueue,
    pub unsent: u32,
    /// `SO_SNDBUF` and `SO_RCVBUF` as the kernel had grown them: the queues must fit again.
    #[serde(default)]
    pub bufs: (u32, u32),
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum SockState {
    /// Neither listening nor connected (bound or not).
    Unconnected,
    /// `listen(backlog)`, with no connection waiting to be accepted.
    Listening { backlog: u32 },
    /// Connected: a unix pair (`UnixSock::pair`), or a datagram socket with a default peer.
    Connected,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct UnixSock {
    /// The inode of the other end of a connected pair of unnamed sockets: both come back as
    /// one `socketpair`, with what each had queued.
    pub pair: Option<u64>,
    /// The other end is closed: this end comes back with its queue, its peer gone.
    pub pair_gone: bool,
    /// The socket file a path name made (not for abstract names).
    pub file: Option<SockFile>,
    /// A client connected to a listener (`remote`) that has not accepted it yet: it connects
    /// again once the listener is back, in the listener's `backlog` order.
    #[serde(default)]
    pub pending: bool,
    /// A listener's connections waiting to be accepted: their clients' inodes, in order.
    #[serde(default)]
    pub backlog: Vec<u64>,
    /// This end of the pair is a connection a listener accepted (its name, `local`, is the
    /// listener's; `remote` is its client's): the pair is made again through a listener of
    /// that name, so both ends have their names.
    #[serde(default)]
    pub accepted: bool,
    /// This end is the client of such a pair: it connected to a listener (`remote`) that
    /// accepted the other end.
    #[serde(default)]
    pub client: bool,
}

/// The file `bind` made for a unix socket's path, as it was at the dump.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SockFile {
    pub dev: u64,
    pub inode: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Its change time (ns): with the inode, it tells the very file from a new one that
    /// took its inode number.
    #[serde(default)]
    pub ctime_ns: i64,
    /// Unlinked since: made again by `bind` and unlinked again.
    pub deleted: bool,
}

/// One socket option as `getsockopt` gave it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SockOpt {
    pub level: i32,
    pub name: i32,
    #[serde(with = "hex_bytes")]
    pub value: Vec<u8>,
}

/// The options a socket is dumped and restored with: (level, name, what it is called).
/// `SO_RCVBUF`/`SO_SNDBUF` are kept as the kernel reports them (twice what was set).
pub const SOCK_OPTS: &[(i32, i32, &str)] = &[
    (1, 2, "SO_REUSEADDR"),
    (1, 15, "SO_REUSEPORT"),
    (1, 9, "SO_KEEPALIVE"),
    (1, 6, "SO_BROADCAST"),
    (1, 10, "SO_OOBINLINE"),
    (1, 13, "SO_LINGER"),
    (1, 12, "SO_PRIORITY"),
    (1, 36, "SO_MARK"),
    (1, 18, "SO_RCVLOWAT"),
    (1, 20, "SO_RCVTIMEO"),
    (1, 21, "SO_SNDTIMEO"),
    (1, 7, "SO_SNDBUF"),
    (1, 8, "SO_RCVBUF"),
    (1, 16, "SO_PASSCRED"),
    (1, 34, "SO_PASSSEC"),
    (1, 29, "SO_TIMESTAMP"),
    (1, 25, "SO_BINDTODEVICE"),
    (0, 1, "IP_TOS"),
    (0, 2, "IP_TTL"),
    (0, 15, "IP_FREEBIND"),
    (0, 19, "IP_TRANSPARENT"),
    (0, 12, "IP_RECVTTL"),
    (0, 13, "IP_RECVTOS"),
    (0, 8, "IP_PKTINFO"),
    (0, 33, "IP_MULTICAST_TTL"),
    (0, 34, "IP_MULTICAST_LOOP"),
    (41, 26, "IPV6_V6ONLY"),
    (41, 16, "IPV6_UNICAST_HOPS"),
    (41, 67, "IPV6_TCLASS"),
    (41, 49, "IPV6_RECVPKTINFO"),
    (6, 1, "TCP_NODELAY"),
    (6, 3, "TCP_CORK"),
    (6, 4, "TCP_KEEPIDLE"),
    (6, 5, "TCP_KEEPINTVL"),
    (6, 6, "TCP_KEEPCNT"),
    (6, 9, "TCP_DEFER_ACCEPT"),
    (6, 18, "TCP_USER_TIMEOUT"),
    (6, 23, "TCP_FASTOPEN"),
    (6, 13, "TCP_CONGESTION"),
    (6, 2, "TCP_MAXSEG"),
];

/// A socket option's name, if it is one stasis dumps.
pub fn sock_opt_name(level: i32, name: i32) -> Option<&'static str> {
    SOCK_OPTS
        .iter()
        .find(|o| o.0 == level && o.1 == name)
        .map(|o| o.2)
}

/// A socket's receive queue: `len` bytes at `data_off` in pages.img; for a datagram or
/// seqpacket socket, `msgs` are the lengths of its messages in order (they add up to `len`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SockQueue {
    pub data_off: u64,
    pub len: u64,
    pub msgs: Vec<u32>,
}

/// A `struct sockaddr` as text: a unix path (`@name` for an abstract one), `a.b.c.d:port`,
/// `[v6]:port`; `-` for none.
pub fn sockaddr_text(a: &[u8]) -> String {
    if a.len() < 2 {
        return "-".into();
    }
    let family = u16::from_ne_bytes([a[0], a[1]]);
    let port = |b: &[u8]| b.get(2..4).map_or(0, |p| u16::from_be_bytes([p[0], p[1]]));
    match family {
        1 => {
            let path = &a[2..];
            match path.split_first() {
                None => "(unnamed)".into(),
                Some((0, rest)) => format!("@{}", String::from_utf8_lossy(rest)),
                Some(_) => {
                    let end = path.iter().position(|&c| c == 0).unwrap_or(path.len());
                    String::from_utf8_lossy(&path[..end]).into_owned()
                }
            }
        }
        2 if a.len() >= 8 => format!("{}.{}.{}.{}:{}", a[4], a[5], a[6], a[7], port(a)),
        10 if a.len() >= 24 => {
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&a[8..24]);
            format!("[{}]:{}", std::net::Ipv6Addr::from(ip), port(a))
        }
        16 if a.len() >= 12 => {
            let pid = u32::from_ne_bytes([a[4], a[5], a[6], a[7]]);
            let groups = u32::from_ne_bytes([a[8], a[9], a[10], a[11]]);
            format!("port id {pid}, groups {groups:#x}")
        }
        f => format!("(family {f})"),
    }
}

/// One registration of an epoll instance: the descriptor number it was added with (epoll keys
/// registrations by file and number), the events (EPOLLET, EPOLLONESHOT… included) and the
/// user data.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EpollWatch {
    pub fd: i32,
    pub events: u32,
    pub data: u64,
    /// The registered file, when the descriptor `fd` no longer refers to it (closed, or
    /// replaced, while the file lives on at another number): this description. The restore
    /// puts it at `fd` for as long as it takes to register it.
    #[serde(default)]
    pub file: Option<u32>,
}

/// One open file description, recorded once however many descriptors refer to it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileDesc {
    pub id: u32,
    /// In a process tree: descriptions of several processes with the same `tree_id` are one
    /// description (inherited across fork), and so are the ends of a pipe between processes
    /// (each end its own id). The restoring stasis opens them once; every process inherits
    /// them. `None`: this process's alone.
    #[serde(default)]
    pub tree_id: Option<u32>,
    /// open(2) status flags from fdinfo (access mode, O_APPEND, O_NONBLOCK…; no O_CLOEXEC,
    /// which belongs to a descriptor).
    pub flags: u32,
    pub pos: u64,
    pub kind: FileKind,
}

/// One descriptor: its number, close-on-exec, and the description it refers to.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Fd {
    pub fd: i32,
    pub cloexec: bool,
    pub desc: u32,
}

/// The data buffered in a pipe, once per pipe (`inode`), read without consuming it.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PipeBuf {
    pub inode: u64,
    pub data_off: u64,
    pub len: u64,
    /// `F_GETPIPE_SZ`.
    pub size: u32,
}

/// A file that has no name any more — deleted while open or mapped, or a memfd — whose
/// contents are saved once (in pages.img) for every description and mapping of it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct UnnamedFile {
    pub dev: u64,
    pub inode: u64,
    pub what: Unnamed,
    /// Permission bits.
    pub mode: u32,
    pub data_off: u64,
    pub len: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Unnamed {
    /// A regular file unlinked while in use; recreated under its old path and unlinked again.
    Deleted { path: Bytes },
    /// `memfd_create(name)`, with its seals (`F_GET_SEALS`).
    Memfd { name: Bytes, seals: u32 },
}

/// A file lock held by the process, taken again through descriptor `fd` (of the description
/// the lock belongs to) after the restore has closed everything else it opened: closing any
/// descriptor of a file drops the POSIX locks the process holds on it.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileLock {
    pub fd: i32,
    pub kind: LockKind,
    /// A write (exclusive) lock; else a read (shared) one.
    pub write: bool,
    /// First byte locked (0 for flock, which locks the whole file).
    pub start: u64,
    /// Bytes locked; 0: up to the end of the file, however far it grows.
    pub len: u64,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LockKind {
    /// `fcntl(F_SETLK)`: owned by the process, dropped when it closes any fd of the file.
    Posix,
    /// `fcntl(F_OFD_SETLK)`: owned by the open file description.
    Ofd,
    /// `flock(2)`: owned by the open file description, whole file.
    Flock,
}

impl std::fmt::Display for FileLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            LockKind::Posix => "POSIX",
            LockKind::Ofd => "OFD",
            LockKind::Flock => "flock",
        };
        let mode = if self.write { "write" } else { "read" };
        write!(f, "{kind} {mode} lock on fd {}", self.fd)?;
        match (self.kind, self.len) {
            (LockKind::Flock, _) => Ok(()),
            (_, 0) => write!(f, " (bytes {} to the end)", self.start),
            (_, n) => write!(
                f,
                " (bytes {}-{})",
                self.start,
                self.start.saturating_add(n - 1)
            ),
        }
    }
}

/// `tree.img`, in the image of a process that had descendants: every descendant, in the
/// order they are created again (a parent before its children, a process-group leader before
/// the members that join its group). Each one's image is a whole single-process image in the
/// subdirectory [`task_dir_name`]; the top-level image is the root's.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Tree {
    pub tasks: Vec<TreeTask>,
    /// Children that had exited and were not yet waited for: each is made again (by its
    /// parent, before the parent's live children) and exits with its status at once.
    #[serde(default)]
    pub zombies: Vec<TreeZombie>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TreeZombie {
    pub pid: i32,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    /// The status its parent's wait will report (as waitpid encodes it).
    pub status: i32,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TreeTask {
    pub pid: i32,
    /// Its parent: the root or an earlier task.
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    /// Its group (or, with `helper_session`, its session) had a leader that is gone: a helper
    /// task with that number makes it, creates this task inside it as its parent's child
    /// (CLONE_PARENT), and exits.
    #[serde(default)]
    pub helper: Option<i32>,
    #[serde(default)]
    pub helper_session: bool,
}

/// Open files: `files.img`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Files {
    pub fds: Vec<Fd>,
    pub descs: Vec<FileDesc>,
    pub pipes: Vec<PipeBuf>,
    pub unnamed: Vec<UnnamedFile>,
    /// File locks the process holds, taken again once every descriptor is back.
    pub locks: Vec<FileLock>,
    /// flock locks held through a description that only a mapping keeps (its last fd closed:
    /// a JVM's hsperfdata file), taken again through the descriptor the file is mapped from.
    #[serde(default)]
    pub mapped_locks: Vec<MappedLock>,
    #[serde(default)]
    pub fifos: Vec<FifoBuf>,
    /// The ptys whose master this process holds.
    #[serde(default)]
    pub ptys: Vec<PtyState>,
}

/// A pty as it was: the slave's modes and window size, packet mode, and both queues (in
/// pages.img): the slave's unread input, its complete canonical lines first (`lines`), and
/// the master's unread input (what the slave's program wrote). `session`: the session whose
/// controlling terminal it is, `foreground` its foreground process group (0: none).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PtyState {
    pub index: u32,
    #[serde(with = "hex_bytes")]
    pub termios: Vec<u8>,
    pub winsize: [u16; 4],
    pub packet: bool,
    pub slave_exclusive: bool,
    pub input_off: u64,
    pub input_len: u64,
    pub lines: Vec<PtyLine>,
    pub output_off: u64,
    pub output_len: u64,
    pub session: Option<i32>,
    pub foreground: i32,
}

/// A complete line of a pty's canonical input: `len` bytes (with the character that ended
/// it), or ended by the end-of-file character (`eof`, not among its bytes).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PtyLine {
    pub len: u32,
    pub eof: bool,
}

/// A flock on a mapped file (`dev` as `Backing::File` has it), held by the mapping's
/// description.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MappedLock {
    pub dev: u64,
    pub inode: u64,
    pub write: bool,
}

impl Files {
    pub fn desc(&self, id: u32) -> Option<&FileDesc> {
        self.descs.iter().find(|d| d.id == id)
    }

    pub fn unnamed(&self, dev: u64, inode: u64) -> Option<&UnnamedFile> {
        self.unnamed
            .iter()
            .find(|u| u.dev == dev && u.inode == inode)
    }

    pub fn fifo(&self, dev: u64, inode: u64) -> Option<&FifoBuf> {
        self.fifos.iter().find(|f| f.dev == dev && f.inode == inode)
    }

    pub fn pipe(&self, inode: u64) -> Option<&PipeBuf> {
        self.pipes.iter().find(|p| p.inode == inode)
    }
}

/// The vDSO as the parasite reported it from inside, plus the `[vdso]` bytes: `vdso.img`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VdsoRecord {
    pub auxv_ehdr: u64,
    /// Areas in maps order: (name, start, end).
    pub areas: Vec<(String, u64, u64)>,
    /// Exported symbols: (name, version, offset, size).
    pub symbols: Vec<(String, String, u64, u64)>,
    /// The `[vdso]` text (vvar contents are per-kernel data and never dumped).
    #[serde(with = "hex_bytes")]
    pub vdso_bytes: Vec<u8>,
}

/// Byte vectors as lowercase hex strings: compact, diffable, and JSON has no bytes type.
mod hex_bytes {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn encode(v: &[u8]) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(v.len() * 2);
        for b in v {
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 15) as usize] as char);
        }
        out
    }

    pub fn decode(s: &str) -> Result<Vec<u8>, &'static str> {
        if !s.len().is_multiple_of(2) {
            return Err("odd-length hex string");
        }
        let nib = |c: u8| match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            _ => Err("bad hex digit"),
        };
        s.as_bytes()
            .chunks_exact(2)
            .map(|p| Ok(nib(p[0])? << 4 | nib(p[1])?))
            .collect()
    }

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        decode(&String::deserialize(d)?).map_err(D::Error::custom)
    }
}

impl std::fmt::Display for Socket {
    /// `tcp 127.0.0.1:8080 listening (backlog 5); options SO_REUSEADDR`, `unix stream
    /// (unnamed) pair of 1234; 12 bytes queued`…
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ty = match self.sock_type {
            1 => "stream",
            2 => "dgram",
            5 => "seqpacket",
            _ => "?",
        };
        let local = match (self.local.is_empty(), self.family) {
            (true, 1) => "(unnamed)".to_string(),
            (true, _) => "*".to_string(),
            _ => sockaddr_text(&self.local),
        };
        match self.family {
            1 => write!(f, "unix {ty} {local}")?,
            16 => write!(f, "netlink protocol {} {local}", self.protocol)?,
            _ => {
                let proto = match self.protocol {
                    6 => "tcp",
                    17 => "udp",
                    _ => "inet",
                };
                let v = if self.family == 10 { "6" } else { "" };
                write!(f, "{proto}{v} {local}")?
            }
        }
        match self.state {
            SockState::Listening { backlog } => {
                write!(f, " listening (backlog {backlog})")?;
                let waiting = self.unix.as_ref().map_or(0, |u| u.backlog.len());
                if waiting > 0 {
                    write!(f, ", {waiting} connection(s) waiting to be accepted")?;
                }
            }
            SockState::Unconnected if self.closed => write!(
                f,
                " was connected to {}, comes back closed (--tcp-close)",
                sockaddr_text(&self.remote)
            )?,
            SockState::Unconnected => write!(f, " unconnected")?,
            SockState::Connected => match self.unix.as_ref() {
                Some(UnixSock {
                    pair_gone: true, ..
                }) => write!(f, " connected, its peer closed")?,
                Some(UnixSock {
                    pair: Some(peer),
                    accepted: true,
                    ..
                }) => write!(
                    f,
                    " accepted from {} (socket {peer})",
                    if self.remote.len() > 2 {
                        sockaddr_text(&self.remote)
                    } else {
                        "an unnamed client".into()
                    }
                )?,
                Some(UnixSock {
                    pair: Some(peer), ..
                }) if self.remote.len() > 2 => write!(
                    f,
                    " connected to {} (socket {peer})",
                    sockaddr_text(&self.remote)
                )?,
                Some(UnixSock {
                    pair: Some(peer), ..
                }) => write!(f, " paired with socket {peer}")?,
                Some(UnixSock { pending: true, .. }) => write!(
                    f,
                    " connected to {}, not accepted yet",
                    sockaddr_text(&self.remote)
                )?,
                _ => write!(f, " connected to {}", sockaddr_text(&self.remote))?,
            },
        }
        if let Some(file) = self.unix.as_ref().and_then(|u| u.file) {
            if file.deleted {
                write!(f, " (its file deleted)")?;
            } else {
                write!(
                    f,
                    " (file mode {:o}, owner {}:{})",
                    file.mode, file.uid, file.gid
                )?;
            }
        }
        if self.shutdown & 1 != 0 {
            write!(f, "; shut down for reading")?;
        }
        if self.shutdown & 2 != 0 {
            write!(f, "; shut down for writing")?;
        }
        if self.queue.len > 0 || !self.queue.msgs.is_empty() {
            write!(f, "; {} bytes queued", self.queue.len)?;
            if self.sock_type != 1 {
                write!(f, " in {} messages", self.queue.msgs.len())?;
            }
        }
        if let Some(t) = &self.tcp {
            write!(
                f,
                "; established: {} bytes to send ({} not sent yet), seq {}/{}, mss {}",
                t.send.len, t.unsent, t.snd_seq, t.rcv_seq, t.mss
            )?;
        }
        if !self.opts.is_empty() {
            let names: Vec<&str> = self
                .opts
                .iter()
                .map(|o| sock_opt_name(o.level, o.name).unwrap_or("?"))
                .collect();
            write!(f, "; options {}", names.join(", "))?;
        }
        Ok(())
    }
}
