//! epoll instances: every registration (descriptor number, events with their flags, data),
//! from fdinfo. A registration of a file the process no longer has at that number (closed, or
//! replaced by another file) cannot be added again: refused.

use super::{Cx, Kind, Probe};
use anyhow::{bail, Result};
use stasis_image::model::*;
use std::collections::HashMap;

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
            cx.epoll_watches.push((p.fd, w.fd, ino));
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
    Some((EpollWatch { fd, events, data }, ino))
}

/// Every watched file must still be open at the number it was registered with.
pub(crate) fn check_watches(
    pid: i32,
    watches: &[(i32, i32, u64)],
    inodes: &HashMap<i32, u64>,
) -> Result<()> {
    for &(epfd, fd, ino) in watches {
        if inodes.get(&fd) != Some(&ino) {
            bail!(
                "epoll fd {epfd} of pid {pid} watches a file that is no longer open at fd {fd}; not supported yet"
            );
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
                data: 4
            }
        );
        assert_eq!(ino, 0x19efe);
        assert!(parse_watch("tfd: x events: 1").is_none());
    }
}
