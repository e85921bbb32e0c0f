//! inotify instances: every watch with its number and mask, from fdinfo. fdinfo names the
//! watched file by a file handle; the dump opens it (`open_by_handle_at`, on a mount of its
//! filesystem) to learn its path now, and checks the path leads to that very inode. Events
//! queued and not read are not saved (a warning says how many bytes): the kernel offers no way
//! to read them without consuming them.

use super::{Cx, Kind, Probe};
use anyhow::{bail, Context, Result};
use stasis_image::model::*;
use std::os::unix::fs::MetadataExt;

pub(crate) struct Inotify;
pub(crate) static INOTIFY: Inotify = Inotify;

/// One `inotify wd:… ino:… sdev:… mask:… … fhandle-type:… f_handle:…` line.
#[derive(Debug, PartialEq, Eq)]
struct Line {
    wd: i32,
    ino: u64,
    sdev: u64,
    mask: u32,
    handle_type: i32,
    handle: Vec<u8>,
}

fn parse(line: &str) -> Option<Line> {
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .map(str::to_string)
    };
    let hex = |s: &str| -> Option<Vec<u8>> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
            .collect()
    };
    Some(Line {
        wd: field("wd:")?.parse().ok()?,
        ino: u64::from_str_radix(&field("ino:")?, 16).ok()?,
        sdev: u64::from_str_radix(&field("sdev:")?, 16).ok()?,
        mask: u32::from_str_radix(&field("mask:")?, 16).ok()?,
        handle_type: field("fhandle-type:")?.parse().ok()?,
        handle: hex(&field("f_handle:")?)?,
    })
}

impl Kind for Inotify {
    fn claims(&self, p: &Probe) -> bool {
        p.link.as_bytes() == b"anon_inode:inotify"
    }

    fn dump(&self, p: &Probe, _: &mut Cx) -> Result<FileKind> {
        let here = || format!("fd {} of pid {} (inotify)", p.fd, p.pid);
        let mut watches = Vec::new();
        for text in p.fdinfo.lines().filter(|l| l.starts_with("inotify ")) {
            let Some(l) = parse(text) else {
                bail!("{}: cannot parse the watch {text:?}", here());
            };
            if l.wd <= 0 || l.wd as usize > stasis_image::MAX_INOTIFY_WD {
                bail!(
                    "{}: watch number {} is beyond what a restore makes again",
                    here(),
                    l.wd
                );
            }
            let path = watched_path(&l).with_context(|| format!("{}: watch {}", here(), l.wd))?;
            watches.push(InotifyWatch {
                wd: l.wd,
                mask: l.mask,
                path,
                dev: l.sdev,
                inode: l.ino,
            });
        }
        watches.sort_by_key(|w| w.wd);
        if watches.len() > stasis_image::MAX_INOTIFY_WATCHES {
            bail!(
                "{}: {} watches, more than a restore takes on",
                here(),
                watches.len()
            );
        }
        let queued = stasis_sys::fs::pidfd_open(p.pid)
            .and_then(|pidfd| stasis_sys::fs::pidfd_getfd(&pidfd, p.fd))
            .ok()
            .and_then(|fd| stasis_sys::sock::ioctl_int(&fd, stasis_sys::sock::SIOCINQ).ok())
            .unwrap_or(0);
        if queued > 0 {
            tracing::warn!(
                pid = p.pid,
                fd = p.fd,
                "{queued} bytes of inotify events were queued and are not saved"
            );
        }
        Ok(FileKind::Inotify { watches })
    }
}

/// The path of the watched file now: its handle opened on a mount of its filesystem.
fn watched_path(l: &Line) -> Result<Bytes> {
    let (major, minor) = ((l.sdev >> 20) as u32, (l.sdev & 0xfffff) as u32);
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").context("mountinfo")?;
    let want = format!("{major}:{minor}");
    let mut last_err = None;
    for m in mountinfo.lines() {
        let f: Vec<&str> = m.split_whitespace().collect();
        if f.get(2) != Some(&want.as_str()) {
            continue;
        }
        let Some(point) = f.get(4) else { continue };
        let Ok(mount) = std::fs::File::open(unescape(point)) else {
            continue;
        };
        match stasis_sys::fs::open_by_handle(&mount, l.handle_type, &l.handle) {
            Ok(fd) => {
                let link = std::fs::read_link(format!(
                    "/proc/self/fd/{}",
                    std::os::fd::AsRawFd::as_raw_fd(&fd)
                ))?;
                let meta = std::fs::metadata(&link).ok();
                if meta.is_none_or(|m| m.ino() != l.ino) {
                    bail!(
                        "the watched file (inode {}) is no longer reachable by a path ({})",
                        l.ino,
                        link.display()
                    );
                }
                return Ok(Bytes::from(link));
            }
            Err(e) => last_err = Some(e),
        }
    }
    bail!(
        "the watched file (inode {} on {want}) cannot be found{}",
        l.ino,
        last_err.map_or(String::new(), |e| format!(": open_by_handle_at: {e}"))
    )
}

/// mountinfo escapes spaces and the like as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_watch() {
        let l = parse("inotify wd:2 ino:98e12e sdev:fe00000 mask:fff ignored_mask:0 fhandle-bytes:8 fhandle-type:1 f_handle:2ee19800e69ddb69").expect("parses");
        assert_eq!(
            l,
            Line {
                wd: 2,
                ino: 0x98e12e,
                sdev: 0xfe00000,
                mask: 0xfff,
                handle_type: 1,
                handle: vec![0x2e, 0xe1, 0x98, 0x00, 0xe6, 0x9d, 0xdb, 0x69],
            }
        );
        assert_eq!(unescape("/mnt/a\\040b"), "/mnt/a b");
    }
}
