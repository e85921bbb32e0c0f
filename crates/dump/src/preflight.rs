//! What makes a dump refuse, checked while the process is frozen and before anything in it is
//! changed: whatever stasis could not bring back faithfully is named, with the pid, in a
//! one-line error, and the process is let go exactly as it was.

use crate::thread::{thread_status, ThreadStatus};
use anyhow::{bail, Context, Result};

/// Namespaces the restored process would silently change (it comes back in stasis's own).
/// The time namespace is not among them: the dump records the clocks as the process sees them.
const NAMESPACES: &[&str] = &["mnt", "pid", "net", "ipc", "uts", "user", "cgroup"];

/// The checks but the memory map's (`mm::preflight`, read beside them).
pub(crate) fn check(pid: i32, threads: &[i32]) -> Result<()> {
    for ns in NAMESPACES {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}"));
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}"));
        if let (Ok(t), Ok(o)) = (theirs, ours) {
            if t != o {
                bail!("pid {pid} runs in another {ns} namespace than stasis ({}); dumping namespaces is not supported yet", t.display());
            }
        }
    }
    let root = std::fs::read_link(format!("/proc/{pid}/root"))
        .with_context(|| format!("reading /proc/{pid}/root"))?;
    if root != std::path::Path::new("/") {
        bail!(
            "pid {pid} runs chrooted in {}; not supported yet",
            root.display()
        );
    }
    let me = std::process::id() as i32;
    let ours = thread_status(me, me)?.caps;
    for &tid in threads {
        let st = thread_status(pid, tid)?;
        if st.seccomp != 0 {
            bail!("thread {tid} of pid {pid} runs under seccomp (mode {}); seccomp filters are not dumped yet", st.seccomp);
        }
        if st.caps != caps_a_restore_gives(&st, ours) {
            bail!(
                "thread {tid} of pid {pid} has capabilities other than its user's defaults \
                 (inheritable {:#x}, permitted {:#x}, effective {:#x}, bounding {:#x}, ambient {:#x}); not supported yet",
                st.caps[0], st.caps[1], st.caps[2], st.caps[3], st.caps[4]
            );
        }
    }
    Ok(())
}

/// The capability sets (inheritable, permitted, effective, bounding, ambient) a restore gives a
/// thread with these credentials: the new task starts with stasis's own, and setresuid to a
/// user other than root clears the permitted, effective and ambient sets. Anything else was
/// set on purpose and would be lost.
fn caps_a_restore_gives(st: &ThreadStatus, ours: [u64; 5]) -> [u64; 5] {
    if st.creds.uids[1] == 0 {
        ours
    } else {
        [ours[0], 0, 0, ours[3], 0]
    }
}
