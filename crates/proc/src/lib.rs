//! Typed readers for `/proc/PID/{maps,stat,status,task}`.
//!
//! Everything read here comes from the kernel about a process we do not trust; parsers return
//! `ProcError::Parse` on anything unexpected and never panic.

use std::fmt;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("no process with pid {0}")]
    NoProcess(i32),
    // The OS error is in the message, not also a `source` (a chain would print it twice).
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: cannot parse {what}")]
    Parse { path: PathBuf, what: String },
}

pub type Result<T> = std::result::Result<T, ProcError>;

pub const PROT_READ: u32 = 1;
pub const PROT_WRITE: u32 = 2;
pub const PROT_EXEC: u32 = 4;

/// `rwx`-style text for PROT_* bits, as /proc/PID/maps shows them.
pub fn prot_string(p: u32) -> String {
    let bit = |b: u32, c: char| if p & b != 0 { c } else { '-' };
    [
        bit(PROT_READ, 'r'),
        bit(PROT_WRITE, 'w'),
        bit(PROT_EXEC, 'x'),
    ]
    .iter()
    .collect()
}

/// One line of /proc/PID/maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    /// PROT_* bits.
    pub prot: u32,
    /// `p` (private) or `s` (shared) in the permissions column.
    pub shared: bool,
    pub offset: u64,
    pub dev: (u32, u32),
    pub inode: u64,
    /// Path or special name (`[heap]`, `[vdso]`…), the kernel's bytes (a path need not be
    /// UTF-8); empty for anonymous memory.
    pub name: Vec<u8>,
}

impl Vma {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    /// The name for messages (lossy where it is not UTF-8).
    pub fn name_lossy(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.name)
    }
}

impl fmt::Display for Vma {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}-{:x} {}", self.start, self.end, self.name_lossy())
    }
}

fn path(pid: i32, file: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{file}"))
}

fn read_bytes(pid: i32, file: &str) -> Result<Vec<u8>> {
    let p = path(pid, file);
    std::fs::read(&p).map_err(|e| match e.raw_os_error() {
        Some(libc_enoent) if libc_enoent == 2 || libc_enoent == 3 => ProcError::NoProcess(pid),
        _ => ProcError::Io { path: p, err: e },
    })
}

fn read(pid: i32, file: &str) -> Result<String> {
    let bytes = read_bytes(pid, file)?;
    String::from_utf8(bytes).map_err(|_| ProcError::Parse {
        path: path(pid, file),
        what: "text that is not UTF-8".into(),
    })
}

/// Parses a maps file. Names are kept as bytes: only they can be other than ASCII.
pub fn parse_maps(text: &[u8]) -> std::result::Result<Vec<Vma>, String> {
    text.split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(parse_maps_line)
        .collect()
}

fn parse_maps_line(raw: &[u8]) -> std::result::Result<Vma, String> {
    let bad = || format!("maps line {:?}", String::from_utf8_lossy(raw));
    let mut it = raw.splitn(6, |&b| b == b' ');
    let mut field = || -> std::result::Result<&str, String> {
        std::str::from_utf8(it.next().ok_or_else(bad)?).map_err(|_| bad())
    };
    let range = field()?;
    let perms = field()?.as_bytes();
    let offset = field()?;
    let dev = field()?;
    let inode = field()?;
    let name_at = range.len() + perms.len() + offset.len() + dev.len() + inode.len() + 5;
    let name = raw
        .get(name_at..)
        .unwrap_or(b"")
        .iter()
        .skip_while(|&&b| b == b' ')
        .copied()
        .collect();
    let (s, e) = range.split_once('-').ok_or_else(bad)?;
    let start = u64::from_str_radix(s, 16).map_err(|_| bad())?;
    let end = u64::from_str_radix(e, 16).map_err(|_| bad())?;
    if end < start || perms.len() != 4 {
        return Err(bad());
    }
    let (maj, min) = dev.split_once(':').ok_or_else(bad)?;
    let mut prot = 0;
    if perms[0] == b'r' {
        prot |= PROT_READ;
    }
    if perms[1] == b'w' {
        prot |= PROT_WRITE;
    }
    if perms[2] == b'x' {
        prot |= PROT_EXEC;
    }
    Ok(Vma {
        start,
        end,
        prot,
        shared: perms[3] == b's',
        offset: u64::from_str_radix(offset, 16).map_err(|_| bad())?,
        dev: (
            u32::from_str_radix(maj, 16).map_err(|_| bad())?,
            u32::from_str_radix(min, 16).map_err(|_| bad())?,
        ),
        inode: inode.parse().map_err(|_| bad())?,
        name,
    })
}

/// All mappings of `pid`, in address order.
pub fn maps(pid: i32) -> Result<Vec<Vma>> {
    let text = read_bytes(pid, "maps")?;
    parse_maps(&text).map_err(|what| ProcError::Parse {
        path: path(pid, "maps"),
        what,
    })
}

/// Fields of /proc/PID/stat that stasis needs.
#[derive(Clone, Debug)]
pub struct Stat {
    pub comm: String,
    /// R, S, D, T, t, Z, X, I…
    pub state: char,
    pub ppid: i32,
    /// `task->flags` (PF_*).
    pub flags: u64,
    /// When it started, in clock ticks since boot: with the pid, names one process for good
    /// (a pid is used again once its process is reaped).
    pub start_time: u64,
}

/// Set in `Stat::flags` for kernel threads.
pub const PF_KTHREAD: u64 = 0x0020_0000;

impl Stat {
    pub fn is_kernel_thread(&self) -> bool {
        self.flags & PF_KTHREAD != 0
    }

    pub fn is_zombie(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }
}

pub fn stat(pid: i32) -> Result<Stat> {
    let text = read(pid, "stat")?;
    parse_stat(&text).ok_or_else(|| ProcError::Parse {
        path: path(pid, "stat"),
        what: "stat".into(),
    })
}

fn parse_stat(text: &str) -> Option<Stat> {
    // comm may contain spaces and parentheses: it runs from the first '(' to the last ')'.
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    let rest: Vec<&str> = text.get(close + 2..)?.split(' ').collect();
    // rest[0] = state (field 3), rest[1] = ppid (4), rest[6] = flags (9), rest[19] =
    // starttime (22)
    Some(Stat {
        comm,
        state: rest.first()?.chars().next()?,
        ppid: rest.get(1)?.parse().ok()?,
        flags: rest.get(6)?.parse().ok()?,
        start_time: rest.get(19)?.parse().ok()?,
    })
}

/// `TracerPid` from /proc/PID/status: 0 when nobody traces the process.
pub fn tracer_pid(pid: i32) -> Result<i32> {
    let text = read(pid, "status")?;
    text.lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| ProcError::Parse {
            path: path(pid, "status"),
            what: "TracerPid".into(),
        })
}

/// Thread ids in /proc/PID/task, sorted.
pub fn tasks(pid: i32) -> Result<Vec<i32>> {
    let p = path(pid, "task");
    let dir = std::fs::read_dir(&p).map_err(|e| match e.raw_os_error() {
        Some(2) | Some(3) => ProcError::NoProcess(pid),
        _ => ProcError::Io {
            path: p.clone(),
            err: e,
        },
    })?;
    let mut tids = Vec::new();
    for entry in dir {
        let entry = entry.map_err(|e| ProcError::Io {
            path: p.clone(),
            err: e,
        })?;
        if let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
            tids.push(tid);
        }
    }
    tids.sort_unstable();
    Ok(tids)
}

/// One entry of /proc/PID/timers (POSIX timers; needs CONFIG_CHECKPOINT_RESTORE).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcTimer {
    pub id: i32,
    pub signo: i32,
    pub sigval: u64,
    /// SIGEV_* notification, with SIGEV_THREAD_ID (4) added for "tid" targets.
    pub notify: i32,
    /// The pid or tid named by the notify line.
    pub target: i32,
    pub clock: i32,
}

pub fn timers(pid: i32) -> Result<Vec<ProcTimer>> {
    let text = read(pid, "timers")?;
    parse_timers(&text).ok_or_else(|| ProcError::Parse {
        path: path(pid, "timers"),
        what: "timers".into(),
    })
}

fn parse_timers(text: &str) -> Option<Vec<ProcTimer>> {
    let mut out = Vec::new();
    let mut cur: Option<ProcTimer> = None;
    for line in text.lines() {
        let (key, value) = line.split_once(':')?;
        let value = value.trim();
        match key {
            "ID" => {
                out.extend(cur.take());
                cur = Some(ProcTimer {
                    id: value.parse().ok()?,
                    signo: 0,
                    sigval: 0,
                    notify: 0,
                    target: 0,
                    clock: 0,
                });
            }
            "signal" => {
                let t = cur.as_mut()?;
                let (signo, val) = value.split_once('/')?;
                t.signo = signo.parse().ok()?;
                t.sigval = u64::from_str_radix(val, 16).ok()?;
            }
            "notify" => {
                // "signal/pid.123", "signal/tid.123", "none/pid.123", "thread/pid.123"
                let t = cur.as_mut()?;
                let (kind, who) = value.split_once('/')?;
                let base = match kind {
                    "signal" => 0,
                    "none" => 1,
                    "thread" => 2,
                    _ => return None,
                };
                let (scope, id) = who.split_once('.')?;
                t.notify = base | if scope == "tid" { 4 } else { 0 };
                t.target = id.parse().ok()?;
            }
            "ClockID" => cur.as_mut()?.clock = value.parse().ok()?,
            _ => {}
        }
    }
    out.extend(cur);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_maps_lines() {
        let text = b"7ffd1000-7ffd5000 r--p 00000000 00:00 0                          [vvar]\n\
                    55e0a000-55e0b000 r-xp 00001000 fd:01 1234  /usr/bin/a b\n\
                    7f00-8000 rw-s 00000000 00:05 77 /memfd:x (deleted)\n\
                    9000-a000 ---p 00000000 00:00 0 \n\
                    a000-b000 r--p 00000000 fd:01 99 /tmp/\xff\xfename\n";
        let v = parse_maps(text).unwrap();
        assert_eq!(v[0].name, b"[vvar]");
        assert_eq!(v[0].prot, PROT_READ);
        assert_eq!(v[1].name, b"/usr/bin/a b");
        assert_eq!(v[1].offset, 0x1000);
        assert_eq!(v[1].dev, (0xfd, 1));
        assert!(v[2].shared);
        assert_eq!(v[3].name, b"");
        assert_eq!(v[3].prot, 0);
        assert_eq!(
            v[4].name, b"/tmp/\xff\xfename",
            "a name that is not UTF-8 is kept"
        );
    }

    #[test]
    fn rejects_garbage_maps() {
        assert!(parse_maps(b"zz-1 r-xp 0 0:0 0\n").is_err());
        assert!(parse_maps(b"2000-1000 r-xp 0 0:0 0\n").is_err());
        assert!(parse_maps(b"1000-2000 r-x 0 0:0 0\n").is_err());
    }

    #[test]
    fn parses_stat_with_odd_comm() {
        let s = parse_stat(
            "42 (a) b (c)) S 1 42 42 0 -1 4194560 0 0 0 0 5 6 0 0 20 0 1 0 987654 1000 100",
        )
        .unwrap();
        assert_eq!(s.comm, "a) b (c)");
        assert_eq!(s.state, 'S');
        assert_eq!(s.ppid, 1);
        assert_eq!(s.flags, 4194560);
        assert_eq!(s.start_time, 987654);
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn parses_timers() {
        let t = parse_timers("ID: 0\nsignal: 34/00000000000000ab\nnotify: signal/tid.77\nClockID: 1\nID: 3\nsignal: 14/0000000000000000\nnotify: none/pid.5\nClockID: 0\n").unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(
            t[0],
            ProcTimer {
                id: 0,
                signo: 34,
                sigval: 0xab,
                notify: 4,
                target: 77,
                clock: 1
            }
        );
        assert_eq!((t[1].id, t[1].notify, t[1].target), (3, 1, 5));
        assert!(parse_timers("ID: x\n").is_none());
        assert!(parse_timers("notify: signal/pid.1\n").is_none());
    }

    #[test]
    fn reads_own_process() {
        let me = std::process::id() as i32;
        assert!(!stat(me).unwrap().is_zombie());
        assert!(tasks(me).unwrap().contains(&me));
        assert!(maps(me).unwrap().iter().any(|v| v.prot & PROT_EXEC != 0));
    }
}
