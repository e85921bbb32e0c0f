//! Fault injection for the kill tests: `STASIS_KILL_AT=N` makes this process SIGKILL itself
//! just before the N-th operation that changes a traced process (a register, signal-mask or
//! XSAVE write, a resume, a detach, a write into its memory). A test walks N = 1, 2, … until a
//! run gets through, so stasis dies once at every step of a dump, a vdso query or a restore.
//!
//! Without the variable `point` costs one relaxed load and compare.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The variable's name.
pub const ENV: &str = "STASIS_KILL_AT";

static COUNT: AtomicU64 = AtomicU64::new(0);

fn target() -> u64 {
    static AT: OnceLock<u64> = OnceLock::new();
    *AT.get_or_init(|| {
        std::env::var(ENV)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    })
}

/// One step that changes a traced process is about to happen.
pub fn point() {
    let at = target();
    if at == 0 {
        return;
    }
    if COUNT.fetch_add(1, Ordering::Relaxed) + 1 == at {
        // SAFETY: kill(getpid(), SIGKILL) has no memory effects; it does not return.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}
