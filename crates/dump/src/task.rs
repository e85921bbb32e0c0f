//! Process-wide state: credentials, limits, cwd, signal handlers, timers, session.

use anyhow::{bail, Context, Result};
use stasis_abi::TaskState;
use stasis_image::model::*;

/// CLOCK_MONOTONIC and CLOCK_BOOTTIME as the process sees them: this machine's, plus the
/// offsets of its time namespace (one an earlier restore may have made).
pub(crate) fn clocks_seen_by(pid: i32) -> Result<(u64, u64)> {
    let mut mono = stasis_sys::clock_ns(libc::CLOCK_MONOTONIC) as i128;
    let mut boot = stasis_sys::clock_ns(libc::CLOCK_BOOTTIME) as i128;
    let path = format!("/proc/{pid}/timens_offsets");
    // Absent on kernels without time namespaces: the clocks are the host's.
    if let Ok(text) = std::fs::read_to_string(&path) {
        for line in text.lines() {
            let w: Vec<&str> = line.split_whitespace().collect();
            let [clock, secs, nsecs] = w[..] else {
                continue;
            };
            let num = |x: &str| {
                x.parse::<i128>()
                    .with_context(|| format!("{path}: cannot parse {line:?}"))
            };
            let off = num(secs)? * 1_000_000_000 + num(nsecs)?;
            match clock {
                "monotonic" | "1" => mono += off,
                "boottime" | "7" => boot += off,
                _ => {}
            }
        }
    }
    Ok((mono.max(0) as u64, boot.max(0) as u64))
}

pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Numeric fields of /proc/PID/stat after the comm, numbered as in proc(5) (field 3 = state
/// is returned as 0).
pub(crate) fn stat_fields(stat: &str) -> Option<Vec<u64>> {
    let close = stat.rfind(')')?;
    let pid: u64 = stat.split_whitespace().next()?.parse().ok()?;
    let mut v = vec![pid, 0];
    for (i, tok) in stat.get(close + 2..)?.split_whitespace().enumerate() {
        v.push(if i == 0 {
            0
        } else {
            tok.parse::<i128>().ok()? as u64
        });
    }
    Some(v)
}

pub(crate) fn collect_process(
    pid: i32,
    task: &TaskState,
    stat: &[u64],
    shared_pending: Vec<PendingSignal>,
) -> Result<Process> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let line = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or("")
            .trim()
            .to_string()
    };
    let umask = u32::from_str_radix(&line("Umask:"), 8).unwrap_or(0o022);
    let f = stat;
    let mut rlimits = Vec::new();
    for resource in 0..16u32 {
        if let Ok((cur, max)) = stasis_sys::process::limit_of(pid, resource) {
            rlimits.push(Rlimit { resource, cur, max });
        }
    }
    let link = |what: &str| -> Result<Bytes> {
        Ok(std::fs::read_link(format!("/proc/{pid}/{what}"))
            .with_context(|| format!("reading /proc/{pid}/{what}"))?
            .into())
    };
    let personality = std::fs::read_to_string(format!("/proc/{pid}/personality"))
        .with_context(|| format!("reading /proc/{pid}/personality"))?;
    let personality = u32::from_str_radix(personality.trim(), 16)
        .with_context(|| format!("/proc/{pid}/personality: cannot parse {personality:?}"))?;
    let mut comm = std::fs::read(format!("/proc/{pid}/comm"))
        .with_context(|| format!("reading /proc/{pid}/comm"))?;
    if comm.last() == Some(&b'\n') {
        comm.pop();
    }
    let cwd = link("cwd")?;
    let cwd_deleted_mode = deleted_cwd_mode(pid, &cwd)?;
    let itimer = |t: &[i64; 4]| ITimer {
        interval_sec: t[0],
        interval_usec: t[1],
        value_sec: t[2],
        value_usec: t[3],
    };
    Ok(Process {
        sigactions: task
            .sigactions
            .iter()
            .map(|a| SigAction {
                handler: a.handler,
                flags: a.flags,
                restorer: a.restorer,
                mask: a.mask,
            })
            .collect(),
        shared_pending,
        posix_timers: Vec::new(),
        itimers: [
            itimer(&task.itimers[0]),
            itimer(&task.itimers[1]),
            itimer(&task.itimers[2]),
        ],
        rlimits,
        umask,
        cwd: if cwd_deleted_mode.is_some() {
            cwd.without_deleted()
        } else {
            cwd
        },
        cwd_deleted_mode,
        root: link("root")?,
        personality,
        comm: Bytes(comm),
        dumpable: task.dumpable as i32,
        pgid: f.get(4).copied().unwrap_or(0) as i32,
        sid: f.get(5).copied().unwrap_or(0) as i32,
        job_stop: None,
        child_subreaper: task.child_subreaper != 0,
        tty_nr: f.get(6).copied().unwrap_or(0),
        ctty_pty: None,
    })
}

/// The mode of the cwd when it has been removed (rmdir while the process sat in it), so the
/// restore can make, enter and remove it again; None for a cwd that still exists.
fn deleted_cwd_mode(pid: i32, cwd: &Bytes) -> Result<Option<u32>> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(format!("/proc/{pid}/cwd"))
        .with_context(|| format!("stat of the cwd of pid {pid}"))?;
    Ok((meta.nlink() == 0 || cwd.ends_with(DELETED_SUFFIX)).then_some(meta.mode() & 0o7777))
}

/// POSIX timers: what /proc says about each, with the times the parasite read.
/// The timer whose expiry queued `sig`, if it is a timer's signal (`SI_TIMER`: the timer id
/// at offset 16 of the siginfo).
fn timer_of(sig: &PendingSignal) -> Option<i32> {
    const SI_TIMER: i32 = -2;
    let int = |at: usize| {
        sig.siginfo
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map(i32::from_le_bytes)
    };
    (int(8)? == SI_TIMER).then_some(int(16)?)
}

/// A timer that expired while the process was frozen — after the signal queues were first read
/// (`before`) and after the timers were — shows armed, and its signal is in the second read of
/// the queues (`after`) only: restored as it is, that expiry would come twice. A one-shot
/// timer is then disarmed; a periodic one is put one interval later. (A signal of the timer
/// queued before is merged by the kernel, overrun counted: then the count does not grow.)
pub(crate) fn settle_timers(
    timers: &mut [PosixTimer],
    before: &[PendingSignal],
    after: &[&PendingSignal],
) {
    for t in timers.iter_mut() {
        let armed = t.value_sec != 0 || t.value_nsec != 0;
        let was = before.iter().filter(|s| timer_of(s) == Some(t.id)).count();
        let is = after.iter().filter(|s| timer_of(s) == Some(t.id)).count();
        if !armed || is <= was {
            continue;
        }
        if t.interval_sec == 0 && t.interval_nsec == 0 {
            t.value_sec = 0;
            t.value_nsec = 0;
        } else {
            let ns = t.value_nsec + t.interval_nsec;
            t.value_sec += t.interval_sec + ns / 1_000_000_000;
            t.value_nsec = ns % 1_000_000_000;
        }
        tracing::debug!(timer = t.id, "expired while frozen, after it was read");
    }
}

pub(crate) fn posix_timers(
    pid: i32,
    timers: &[stasis_proc::ProcTimer],
    times: &[u8],
) -> Result<Vec<PosixTimer>> {
    if times.len() != timers.len() * 32 {
        bail!(
            "pid {pid}: timer state of {} bytes for {} timers",
            times.len(),
            timers.len()
        );
    }
    Ok(timers
        .iter()
        .zip(times.chunks_exact(32))
        .map(|(t, spec)| {
            let v =
                |k: usize| i64::from_le_bytes(spec[k * 8..k * 8 + 8].try_into().unwrap_or([0; 8]));
            PosixTimer {
                id: t.id,
                clock: t.clock,
                signo: t.signo,
                sigval: t.sigval,
                notify: t.notify,
                tid: t.target,
                interval_sec: v(0),
                interval_nsec: v(1),
                value_sec: v(2),
                value_nsec: v(3),
            }
        })
        .collect())
}

#[cfg(test)]
mod timer_tests {
    use super::*;

    fn timer(id: i32, value: (i64, i64), interval: (i64, i64)) -> PosixTimer {
        PosixTimer {
            id,
            clock: 1,
            signo: 34,
            sigval: 0,
            notify: 4,
            tid: 1,
            interval_sec: interval.0,
            interval_nsec: interval.1,
            value_sec: value.0,
            value_nsec: value.1,
        }
    }

    fn signal_of(id: i32) -> PendingSignal {
        let mut siginfo = vec![0u8; 128];
        siginfo[0..4].copy_from_slice(&34i32.to_le_bytes());
        siginfo[8..12].copy_from_slice(&(-2i32).to_le_bytes());
        siginfo[16..20].copy_from_slice(&id.to_le_bytes());
        PendingSignal { signo: 34, siginfo }
    }

    #[test]
    fn an_expiry_between_the_reads_counts_once() {
        let mut ts = vec![
            timer(0, (0, 500), (0, 0)),
            timer(1, (0, 900_000_000), (0, 200_000_000)),
            timer(2, (0, 500), (0, 0)),
            timer(3, (1, 0), (0, 0)),
        ];
        let old = signal_of(2);
        let (s0, s1, s2) = (signal_of(0), signal_of(1), signal_of(2));
        settle_timers(&mut ts, std::slice::from_ref(&old), &[&s0, &s1, &s2]);
        // 0: one-shot, newly queued: disarmed. 1: periodic, newly queued: one interval on.
        assert_eq!((ts[0].value_sec, ts[0].value_nsec), (0, 0));
        assert_eq!((ts[1].value_sec, ts[1].value_nsec), (1, 100_000_000));
        // 2: its signal was queued before too (re-armed since): left armed. 3: no signal.
        assert_eq!((ts[2].value_sec, ts[2].value_nsec), (0, 500));
        assert_eq!((ts[3].value_sec, ts[3].value_nsec), (1, 0));
    }
}
