//! The infection engine: freeze a live process, run a `no_std` blob inside it, cure it.
//!
//! Layers, bottom up: `stasis_sys::ptrace` (raw ptrace/wait glue, the only place with request
//! numbers), `seize` (freezing every thread), `blob` (the blob ELF as the host loads it),
//! `parasite` (injected system calls, the shared memfd region, commands, cure), and `xsave`
//! (the thread's FPU/vector state across CPUs whose XSAVE layouts differ).

mod blob;
mod error;
pub mod guardian;
mod parasite;
mod seize;
pub mod xsave;

pub use blob::Blob;
pub use error::{InfectError, Result};
pub use parasite::{site_of as injection_site, snapshots_of, Parasite, RegionSize};
pub use seize::{check_target, Seized, SYS_RESTART_SYSCALL};
