//! Scratch directories and file surgery for the tests.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::header::{header_checksum, put_u64};

/// A fresh directory under the system temp dir, removed (with its content) when dropped.
pub(crate) struct TestDir(PathBuf);

impl TestDir {
    pub(crate) fn new(test: &str) -> TestDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "stasis-image-test-{}-{n}-{test}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).expect("create test dir");
        TestDir(path)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o7777
}

/// Flips every bit of the byte at `at`.
pub(crate) fn flip_byte(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).expect("read");
    bytes[at] ^= 0xff;
    std::fs::write(path, bytes).expect("write");
}

/// Lets `edit` change the first `header_len` bytes, then recomputes the header checksum so the
/// edit is the only thing wrong with the file.
pub(crate) fn edit_header(
    path: &Path,
    header_len: usize,
    checksum_at: usize,
    edit: impl FnOnce(&mut [u8]),
) {
    let mut bytes = std::fs::read(path).expect("read");
    let header = &mut bytes[..header_len];
    edit(header);
    let checksum = header_checksum(header, checksum_at);
    put_u64(header, checksum_at, checksum);
    std::fs::write(path, bytes).expect("write");
}

pub(crate) fn truncate(path: &Path, len: u64) {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open");
    file.set_len(len).expect("truncate");
}
