//! Process-wide state: credentials, limits, cwd, signal handlers, timers, session.

use anyhow::{bail, Context, Result};
use stasis_abi::TaskState;
use stasis_image::model::*;

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
    let ids = |key: &str| -> Result<[u32; 4]> {
        let v: Vec<u32> = line(key)
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        v.try_into()
            .map_err(|_| anyhow::anyhow!("pid {pid}: cannot parse {key} in status"))
    };
    let creds = Creds {
        uids: ids("Uid:")?,
        gids: ids("Gid:")?,
        groups: line("Groups:")
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect(),
    };
    let umask = u32::from_str_radix(&line("Umask:"), 8).unwrap_or(0o022);
    let f = stat;
    let mut rlimits = Vec::new();
    for resource in 0..16u32 {
        let mut old = libc::rlimit64 {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: prlimit64 query only (new = NULL); old is a valid out-pointer.
        let r = unsafe { libc::prlimit64(pid, resource as _, std::ptr::null(), &mut old) };
        if r == 0 {
            rlimits.push(Rlimit {
                resource,
                cur: old.rlim_cur,
                max: old.rlim_max,
            });
        }
    }
    let link = |what: &str| -> Result<String> {
        Ok(std::fs::read_link(format!("/proc/{pid}/{what}"))
            .with_context(|| format!("reading /proc/{pid}/{what}"))?
            .to_string_lossy()
            .into_owned())
    };
    let personality = std::fs::read_to_string(format!("/proc/{pid}/personality"))
        .ok()
        .and_then(|s| u32::from_str_radix(s.trim(), 16).ok())
        .unwrap_or(0);
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim_end_matches('\n')
        .to_string();
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
        creds,
        umask,
        cwd: link("cwd")?,
        root: link("root")?,
        personality,
        comm,
        dumpable: task.dumpable as i32,
        pgid: f.get(4).copied().unwrap_or(0) as i32,
        sid: f.get(5).copied().unwrap_or(0) as i32,
    })
}

/// POSIX timers: what /proc says about each, with the times the parasite read.
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
