//! `timerfd` and `signalfd`, from fdinfo. A timer keeps what it had left to run (or, set with
//! `TFD_TIMER_ABSTIME`, its deadline on its clock), its period, and its expirations not yet
//! read; a signalfd its mask (the signals themselves are the process's, dumped with it).

use super::{Cx, Kind, Probe};
use anyhow::{bail, Result};
use stasis_image::model::*;

pub(crate) struct TimerFd;
pub(crate) static TIMERFD: TimerFd = TimerFd;
pub(crate) struct SignalFd;
pub(crate) static SIGNALFD: SignalFd = SignalFd;

/// `(4, 999866997)` → (4, 999866997).
fn pair(v: &str) -> Option<(i64, i64)> {
    let (a, b) = v
        .trim()
        .strip_prefix('(')?
        .strip_suffix(')')?
        .split_once(',')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

impl Kind for TimerFd {
    fn claims(&self, p: &Probe) -> bool {
        p.link.as_bytes() == b"anon_inode:[timerfd]"
    }

    fn dump(&self, p: &Probe, _: &mut Cx) -> Result<FileKind> {
        let bad = || {
            anyhow::anyhow!(
                "fd {} of pid {}: cannot read the timerfd's state from fdinfo",
                p.fd,
                p.pid
            )
        };
        let clockid: i32 = p
            .info_field("clockid:")
            .and_then(|v| v.parse().ok())
            .ok_or_else(bad)?;
        let ticks: u64 = p
            .info_field("ticks:")
            .and_then(|v| v.parse().ok())
            .ok_or_else(bad)?;
        let flags = p
            .info_field("settime flags:")
            .and_then(|v| u32::from_str_radix(v, 8).ok())
            .ok_or_else(bad)?;
        let mut value = p.info_field("it_value:").and_then(pair).ok_or_else(bad)?;
        let interval = p
            .info_field("it_interval:")
            .and_then(pair)
            .ok_or_else(bad)?;
        let abstime = flags & libc::TFD_TIMER_ABSTIME as u32 != 0;
        if ![
            libc::CLOCK_REALTIME,
            libc::CLOCK_MONOTONIC,
            libc::CLOCK_BOOTTIME,
            libc::CLOCK_REALTIME_ALARM,
            libc::CLOCK_BOOTTIME_ALARM,
        ]
        .contains(&clockid)
        {
            bail!("fd {} of pid {}: a timerfd on clock {clockid}", p.fd, p.pid);
        }
        if abstime && value != (0, 0) {
            // The deadline it was set to: the clock now plus what is left.
            let now = stasis_sys::clock_ns(clockid) as i64;
            let left = value.0 * 1_000_000_000 + value.1;
            let at = now + left;
            value = (at / 1_000_000_000, at % 1_000_000_000);
        }
        Ok(FileKind::TimerFd {
            clockid,
            abstime,
            value,
            interval,
            ticks,
        })
    }
}

impl Kind for SignalFd {
    fn claims(&self, p: &Probe) -> bool {
        p.link.as_bytes() == b"anon_inode:[signalfd]"
    }

    fn dump(&self, p: &Probe, _: &mut Cx) -> Result<FileKind> {
        let Some(mask) = p
            .info_field("sigmask:")
            .and_then(|v| u64::from_str_radix(v, 16).ok())
        else {
            bail!(
                "fd {} of pid {}: the signalfd's mask is not in fdinfo",
                p.fd,
                p.pid
            );
        };
        Ok(FileKind::SignalFd { mask })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_fdinfo_times() {
        assert_eq!(super::pair(" (4, 999866997)"), Some((4, 999_866_997)));
        assert_eq!(super::pair("(0, 0)"), Some((0, 0)));
        assert_eq!(super::pair("4, 5"), None);
    }
}
