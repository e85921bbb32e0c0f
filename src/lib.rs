//! stasis: checkpoint/restore for live Linux x86_64 processes.
//!
//! Pipeline: seize → infect → collect → (image → plan → restore, coming). This crate holds the
//! drivers that tie the stage crates together; the binary (`main.rs`) is only the CLI.

pub mod blobs;
pub mod check;
mod child;
pub mod collect;
pub mod dump;
pub mod plan;
pub mod restore;
pub mod show;
pub mod xsave;
