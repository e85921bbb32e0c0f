//! File locks: POSIX record locks, OFD locks and flock locks the process holds, read from the
//! `lock:` lines of each description's fdinfo (the kernel lists there the locks taken through
//! that description, and for POSIX ones only the process's own). A lock of another kind (a
//! lease, a delegation), or one on a file that is not a regular file, is refused; so is a
//! flock the process holds that no descriptor reaches (a mapping can keep a description alive
//! after its last fd is closed). A process blocked waiting for a lock (`F_SETLKW`) holds
//! nothing yet: its system call is restarted after the restore and waits again.

use anyhow::{bail, Result};
use stasis_image::model::*;

/// Parses one `lock:` line of fdinfo, as the kernel prints it:
/// `1: POSIX  ADVISORY  WRITE 1234 fe:00:5678 10 19` (the range is inclusive, `EOF` for the
/// end of the file; an OFD lock has pid -1; a flock lists `0 EOF`).
pub(crate) fn parse(pid: i32, fd: i32, line: &str) -> Result<FileLock> {
    let cut: String = line.chars().take(160).collect();
    let bad = || anyhow::anyhow!("fd {fd} of pid {pid}: cannot read the file lock {cut:?}");
    let w: Vec<&str> = line.split_whitespace().collect();
    let [_id, class, mode, access, owner, _inode, start, end] = w[..] else {
        return Err(bad());
    };
    let kind = match class {
        "POSIX" => LockKind::Posix,
        "OFDLCK" => LockKind::Ofd,
        "FLOCK" => LockKind::Flock,
        other => bail!(
            "pid {pid} holds a {} on fd {fd} ({cut}); only POSIX, OFD and flock locks are dumped",
            match other {
                "LEASE" => "lease",
                "DELEG" => "delegation",
                _ => "lock of an unknown kind",
            }
        ),
    };
    if mode != "ADVISORY" {
        bail!("pid {pid} holds a {mode} lock on fd {fd} ({cut}); only advisory locks are dumped");
    }
    let write = match access {
        "WRITE" => true,
        "READ" => false,
        _ => return Err(bad()),
    };
    if kind == LockKind::Posix && owner.parse::<i32>().ok() != Some(pid) {
        bail!("a POSIX lock on fd {fd} of pid {pid} belongs to process {owner} (a shared fd table); not supported yet");
    }
    let start: u64 = start.parse().map_err(|_| bad())?;
    let len = match end {
        "EOF" => 0,
        e => {
            let last: u64 = e.parse().map_err(|_| bad())?;
            last.checked_sub(start)
                .and_then(|n| n.checked_add(1))
                .ok_or_else(bad)?
        }
    };
    if start > i64::MAX as u64 || start.checked_add(len).is_none_or(|e| e > i64::MAX as u64) {
        return Err(bad());
    }
    Ok(FileLock {
        fd,
        kind,
        write,
        start,
        len,
    })
}

/// Cross-checks the locks found through descriptors against `/proc/locks`: a flock or POSIX
/// lock listed with this pid on a file none of its locks was found on is held where no
/// descriptor reaches. A flock on a file the process maps is held by the mapping's
/// description (its last fd closed since): returned, to be taken again through the mapping's
/// descriptor. Anything else would be lost: refused. (An OFD lock lists no owner there, so an
/// OFD lock kept alive only by a mapping cannot be told from another process's.)
/// `found`: the (major, minor, inode) of every file a lock was found on.
/// /proc/locks, read once for the whole frozen tree, in the background from the start of the
/// dump: each read(2) of it takes the kernel's file-lock rwsem for writing, which waits for
/// an RCU grace period (10–15 ms here, even when the list is empty) — time the process
/// would otherwise spend frozen. The locks of frozen processes do not change meanwhile.
pub(crate) struct ProcLocks<'s> {
    pending: std::sync::Mutex<Option<std::thread::ScopedJoinHandle<'s, std::io::Result<String>>>>,
    text: std::sync::OnceLock<Result<String, String>>,
}

impl<'s> ProcLocks<'s> {
    pub(crate) fn start(scope: &'s std::thread::Scope<'s, '_>) -> Self {
        let reader = scope.spawn(|| std::fs::read_to_string("/proc/locks"));
        ProcLocks {
            pending: std::sync::Mutex::new(Some(reader)),
            text: std::sync::OnceLock::new(),
        }
    }

    fn text(&self) -> Result<&str> {
        let text = self.text.get_or_init(|| {
            let reader = self
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            match reader.map(|r| r.join()) {
                Some(Ok(Ok(t))) => Ok(t),
                Some(Ok(Err(e))) => Err(format!("reading /proc/locks: {e}")),
                Some(Err(_)) => Err("the /proc/locks reader panicked".into()),
                None => Err("/proc/locks was not read".into()),
            }
        });
        text.as_deref().map_err(|e| anyhow::anyhow!("{e}"))
    }
}

pub(crate) fn check_unreached(
    pid: i32,
    found: &[(u32, u32, u64)],
    maps: &[stasis_proc::Vma],
    proc_locks: &ProcLocks<'_>,
) -> Result<Vec<MappedLock>> {
    let mut mapped = Vec::new();
    let text = proc_locks.text()?;
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        // Waiters are listed as "N: -> POSIX …": not held.
        if w.get(1) == Some(&"->") {
            continue;
        }
        let (Some(class), Some(owner), Some(inode)) = (w.get(1), w.get(4), w.get(5)) else {
            continue;
        };
        if !matches!(*class, "FLOCK" | "POSIX") || owner.parse::<i32>().ok() != Some(pid) {
            continue;
        }
        let Some(file) = parse_inode(inode) else {
            continue;
        };
        if found.contains(&file) {
            continue;
        }
        let (major, minor, ino) = file;
        let in_map = maps
            .iter()
            .any(|v| v.dev == (major, minor) && v.inode == ino && v.name.starts_with(b"/"));
        if *class == "FLOCK" && in_map {
            let write = w.get(3) == Some(&"WRITE");
            let l = MappedLock {
                dev: kdev(major, minor),
                inode: ino,
                write,
            };
            if !mapped.contains(&l) {
                mapped.push(l);
            }
            continue;
        }
        let cut: String = line.chars().take(160).collect();
        bail!("pid {pid} holds a file lock no descriptor of it reaches ({cut}); not supported yet");
    }
    Ok(mapped)
}

/// `fe:00:10018965`: major and minor in hex, inode in decimal.
fn parse_inode(s: &str) -> Option<(u32, u32, u64)> {
    let mut p = s.split(':');
    let major = u32::from_str_radix(p.next()?, 16).ok()?;
    let minor = u32::from_str_radix(p.next()?, 16).ok()?;
    let inode = p.next()?.parse().ok()?;
    p.next().is_none().then_some((major, minor, inode))
}

/// Refuses a dump with `--no-file-locks` when the process holds one.
pub(crate) fn refuse(pid: i32, l: &FileLock, link: &Bytes) -> Result<()> {
    bail!("pid {pid} holds a {l} ({link}) and --no-file-locks was given")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_lines_parse_to_locks() {
        let l = parse(7, 3, "1: POSIX  ADVISORY  WRITE 7 fe:00:10018965 10 19").unwrap();
        assert_eq!(
            (l.kind, l.write, l.start, l.len),
            (LockKind::Posix, true, 10, 10)
        );
        let l = parse(7, 3, "2: POSIX  ADVISORY  READ 7 fe:00:10018965 100 EOF").unwrap();
        assert_eq!((l.write, l.start, l.len), (false, 100, 0));
        let l = parse(7, 4, "1: OFDLCK ADVISORY  WRITE -1 fe:00:10018966 0 99").unwrap();
        assert_eq!((l.kind, l.len), (LockKind::Ofd, 100));
        let l = parse(7, 5, "1: FLOCK  ADVISORY  READ 7 fe:00:10018967 0 EOF").unwrap();
        assert_eq!((l.kind, l.write, l.len), (LockKind::Flock, false, 0));
    }

    #[test]
    fn leases_other_owners_and_garbage_are_refused() {
        let e = parse(7, 3, "1: LEASE  ACTIVE    READ 7 fe:00:1 0 EOF").unwrap_err();
        assert!(e.to_string().contains("lease"), "{e}");
        let e = parse(7, 3, "1: POSIX  ADVISORY  WRITE 8 fe:00:1 0 EOF").unwrap_err();
        assert!(e.to_string().contains("process 8"), "{e}");
        assert!(parse(7, 3, "1: POSIX  ADVISORY  WRITE 7 fe:00:1 20 10").is_err());
        assert!(parse(7, 3, "1: POSIX ADVISORY WRITE 7").is_err());
        assert!(parse(
            7,
            3,
            "1: POSIX  ADVISORY  WRITE 7 fe:00:1 0 99999999999999999999"
        )
        .is_err());
        assert_eq!(parse_inode("fe:00:10018965"), Some((0xfe, 0, 10018965)));
        assert_eq!(parse_inode("<none>:0"), None);
    }
}
