//! The progress bar of a dump or a restore: page bytes written into pages.img, or filled into
//! the restored processes, against the bytes planned so far. Drawn on stderr only when it is
//! a terminal and only once the work reaches `SHOWN_FROM` (a small process is done before a
//! bar would be read); otherwise every call costs an atomic add.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// Work below this is not shown.
pub const SHOWN_FROM: u64 = 256 << 20;

static BAR: OnceLock<ProgressBar> = OnceLock::new();
static SHOWN: AtomicBool = AtomicBool::new(false);

/// Turns the bar on for this process (`what`: "dump", "restore"), if stderr is a terminal.
pub fn enable(what: &'static str) {
    if !std::io::stderr().is_terminal() {
        return;
    }
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::hidden());
    if let Ok(style) = ProgressStyle::with_template(
        "{prefix} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(what);
    let _ = BAR.set(bar);
}

/// `n` more bytes of work are planned.
pub fn grow(n: u64) {
    let Some(bar) = BAR.get() else { return };
    bar.inc_length(n);
    if bar.length().unwrap_or(0) >= SHOWN_FROM && !SHOWN.swap(true, Ordering::Relaxed) {
        // The rate counts from here, not from the checks before the pages.
        bar.reset_elapsed();
        bar.reset_eta();
        bar.set_draw_target(ProgressDrawTarget::stderr());
    }
}

/// `n` bytes of work are done.
pub fn advance(n: u64) {
    if let Some(bar) = BAR.get() {
        bar.inc(n);
    }
}

/// The work is over: the bar goes away (the summary line follows it).
pub fn finish() {
    if let Some(bar) = BAR.get() {
        bar.finish_and_clear();
    }
}
