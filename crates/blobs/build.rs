//! Builds the parasite blob through the one recipe shared with `cargo xtask build-parasite`
//! (cheap when nothing changed) and puts it in `$OUT_DIR` for `include_bytes!`.

use std::path::PathBuf;

fn main() {
    let crate_dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let repo = crate_dir
        .parent()
        .and_then(|p| p.parent())
        .expect("crates/blobs lives two levels below the repository root")
        .to_path_buf();
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    for p in stasis_blobbuild::source_paths(&repo) {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    let blob = match stasis_blobbuild::build_parasite(&repo) {
        Ok(p) => p,
        Err(e) => panic!("building the parasite blob: {e}"),
    };
    std::fs::copy(&blob, out.join("parasite.elf")).expect("copying the parasite blob to OUT_DIR");
}
