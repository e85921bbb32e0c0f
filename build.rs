//! Builds what the integration tests run: the C test fixtures in `tests/fixtures/*.c`, each
//! linked with the shared helper `tests/fixtures/lib/fixture.c`, into `$OUT_DIR/fixtures/`.
//! (The parasite blob is built by `crates/blobs`.)

use std::path::{Path, PathBuf};

fn main() {
    let repo =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));

    build_fixtures(&repo, &out);
}

fn build_fixtures(repo: &Path, out: &Path) {
    let dir = repo.join("tests").join("fixtures");
    println!("cargo:rerun-if-changed={}", dir.display());
    let lib = dir.join("lib").join("fixture.c");
    println!("cargo:rerun-if-changed={}", lib.display());
    println!(
        "cargo:rerun-if-changed={}",
        dir.join("lib").join("fixture.h").display()
    );
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    let bin_dir = out.join("fixtures");
    std::fs::create_dir_all(&bin_dir).expect("creating the fixtures output directory");
    let compiler = cc::Build::new().opt_level(1).get_compiler();
    for entry in entries.flatten() {
        let src = entry.path();
        if src.extension().and_then(|e| e.to_str()) != Some("c") {
            continue;
        }
        println!("cargo:rerun-if-changed={}", src.display());
        let name = src
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("fixture file name");
        let exe = bin_dir.join(name);
        let status = compiler
            .to_command()
            .args([
                "-O1", "-g", "-pthread", "-mavx2", "-Wall", "-Wextra", "-Werror", "-o",
            ])
            .arg(&exe)
            .arg(&lib)
            .arg(&src)
            .status()
            .expect("running the C compiler for a test fixture");
        assert!(status.success(), "compiling fixture {}", src.display());
    }
}
