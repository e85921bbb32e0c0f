//! The blobs embedded in the stasis binary (built by `build.rs` through `stasis-blobbuild`).

use stasis_infect::{Blob, Result};
use std::sync::OnceLock;

static PARASITE_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/parasite.elf"));

/// The raw parasite ELF as embedded.
pub fn parasite_elf() -> &'static [u8] {
    PARASITE_ELF
}

/// The parasite, parsed once per process.
pub fn parasite() -> Result<&'static Blob> {
    static PARSED: OnceLock<Blob> = OnceLock::new();
    if let Some(b) = PARSED.get() {
        return Ok(b);
    }
    let blob = Blob::parse(PARASITE_ELF)?;
    Ok(PARSED.get_or_init(|| blob))
}
