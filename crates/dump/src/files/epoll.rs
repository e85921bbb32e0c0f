//! epoll instances: every registration (descriptor number, events with their flags, data),
//! from fdinfo. Which file each registration is of is asked of the kernel (`kcmp`): a file the
//! process closed at that number (or replaced there) but still has open at another is named by
//! its description; one it has open nowhere is refused.

use super::{Cx, Kind, Probe};
use anyhow::{bail, Result};
use stasis_image::model::*;

pub(crate) struct Epoll;
pub(crate) static EPOLL: Epoll = Epoll;

impl Kind for Epoll {
    fn claims(&self, p: &Probe) -> bool {
        p.link.as_bytes() == b"anon_inode:[eventpoll]"
    }

    fn dump(&self, p: &Probe, cx: &mut Cx) -> Result<FileKind> {
        let mut watches = Vec::new();
        for line in p.fdinfo.lines().filter(|l| l.starts_with("tfd:")) {
            let Some(w) = parse_watch(line) else {
                bail!(
                    "fd {} of pid {}: cannot parse the epoll registration {line:?}",
                    p.fd,
                    p.pid
                );
            };
            let (w, ino) = w;
            let toff = watches
                .iter()
                .filter(|x: &&EpollWatch| x.fd == w.fd)
                .count() as u32;
            cx.epoll_watches.push(Registration {
                epfd: p.fd,
                tfd: w.fd,
                toff,
                ino,
                index: watches.len(),
            });
            watches.push(w);
        }
        Ok(FileKind::Epoll { watches })
    }
}

/// `tfd: 5 events: 19 data: 7f0000000005  pos:0 ino:3d1 sdev:f` → the watch and the inode.
fn parse_watch(line: &str) -> Option<(EpollWatch, u64)> {
    let mut words = line.split_whitespace();
    let mut field = |key: &str| -> Option<&str> {
        loop {
            let w = words.next()?;
            if let Some(v) = w.strip_prefix(key) {
                return Some(if v.is_empty() { words.next()? } else { v });
            }
        }
    };
    let fd = field("tfd:")?.parse().ok()?;
    let events = u32::from_str_radix(field("events:")?, 16).ok()?;
    let data = u64::from_str_radix(field("data:")?, 16).ok()?;
    let ino = u64::from_str_radix(field("ino:")?, 16).ok()?;
    Some((
        EpollWatch {
            fd,
            events,
            data,
            file: None,
        },
        ino,
    ))
}

/// One registration seen in an epoll instance's fdinfo.
pub(crate) struct Registration {
    epfd: i32,
    tfd: i32,
    /// Registrations before it under the same number.
    toff: u32,
    ino: u64,
    /// Its place in the instance's `watches`.
    index: usize,
}

/// Every registered file must be one the process has open: at the number it was registered
/// with, or (closed or replaced there since) at another, which the watch then names.
pub(crate) fn check_watches(pid: i32, regs: &[Registration], files: &mut Files) -> Result<()> {
    let same = |fd: i32, r: &Registration| {
        stasis_sys::fs::is_epoll_target(pid, fd, pid, r.epfd, r.tfd, r.toff).map_err(|e| {
            anyhow::anyhow!(
                "epoll fd {} of pid {pid}: cannot tell which file it watches at fd {} (kcmp: {e}; the kernel needs CONFIG_CHECKPOINT_RESTORE)",
                r.epfd,
                r.tfd
            )
        })
    };
    for r in regs {
        if files.fds.iter().any(|f| f.fd == r.tfd) && same(r.tfd, r)? {
            continue;
        }
        let mut found = None;
        for f in &files.fds {
            if same(f.fd, r)? {
                found = Some(f.desc);
                break;
            }
        }
        let Some(desc) = found else {
            bail!(
                "epoll fd {} of pid {pid} watches a file (inode {}) that is no longer open at fd {} nor at any other; not supported yet",
                r.epfd,
                r.ino,
                r.tfd
            );
        };
        let ep = files.fds.iter().find(|f| f.fd == r.epfd).map(|f| f.desc);
        let Some(FileKind::Epoll { watches }) = ep
            .and_then(|id| files.descs.iter_mut().find(|d| d.id == id))
            .map(|d| &mut d.kind)
        else {
            bail!(
                "epoll fd {} of pid {pid}: its description is missing",
                r.epfd
            );
        };
        if let Some(w) = watches.get_mut(r.index) {
            w.file = Some(desc);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fdinfo_registrations() {
        let (w, ino) = parse_watch(
            "tfd:        4 events: 80000019 data:                4  pos:0 ino:19efe sdev:f",
        )
        .expect("parses");
        assert_eq!(
            w,
            EpollWatch {
                fd: 4,
                events: 0x8000_0019,
                data: 4,
                file: None,
            }
        );
        assert_eq!(ino, 0x19efe);
        assert!(parse_watch("tfd: x events: 1").is_none());
    }
}
