//! One error per way an image file or directory can be bad. Each message names the file, so the
//! user knows which one to look at.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{}: no such image file", file.display())]
    Missing { file: PathBuf },
    // The OS error is in the message, and so not also a `source` (an error chain printed
    // whole would say it twice).
    #[error("{}: {err}", file.display())]
    Io { file: PathBuf, err: std::io::Error },
    #[error("{}: not a stasis image file (bad magic)", file.display())]
    BadMagic { file: PathBuf },
    #[error(
        "{}: image format version {found}, this stasis reads only version {supported}",
        file.display()
    )]
    UnsupportedVersion {
        file: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error(
        "{}: image of architecture id {found}, this stasis handles only x86_64 (id {})",
        file.display(),
        crate::ARCH_X86_64
    )]
    WrongArch { file: PathBuf, found: u32 },
    #[error("{}: header checksum mismatch (file damaged)", file.display())]
    HeaderChecksum { file: PathBuf },
    #[error("{}: data checksum mismatch (file damaged)", file.display())]
    PayloadChecksum { file: PathBuf },
    #[error("{}: truncated: {found} bytes, expected {expected}", file.display())]
    Truncated {
        file: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("{}: {found} bytes, expected only {expected}", file.display())]
    TrailingData {
        file: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("{}: record kind {found}, expected kind {expected}", file.display())]
    WrongKind {
        file: PathBuf,
        expected: u32,
        found: u32,
    },
    #[error("{}: cannot decode the record: {err}", file.display())]
    BadPayload {
        file: PathBuf,
        err: serde_json::Error,
    },
    #[error("{}: cannot encode the record: {err}", file.display())]
    Encode {
        file: PathBuf,
        err: serde_json::Error,
    },
    #[error(
        "{}: image directory is not empty; refusing to mix a new image with old files",
        dir.display()
    )]
    DirNotEmpty { dir: PathBuf },
    #[error("image {}: {why}", dir.display())]
    Inconsistent { dir: PathBuf, why: String },
    #[error("{}: not a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error("image not authenticated: {why}")]
    Auth { why: String },
    #[error("{}: a reserved header field is not zero (not an image stasis wrote)", file.display())]
    ReservedNotZero { file: PathBuf },
    #[error("{}: {why}; another user could swap the image's files (give a directory of your own, or one stasis can make)", dir.display())]
    NotOurs { dir: PathBuf, why: String },
    #[error("{name:?}: not a valid image file name (a plain name, not hidden, not {pages:?})",
        pages = crate::PAGES_FILE)]
    InvalidName { name: String },
    #[error(
        "{}: {len} bytes at offset {offset} lie outside the page data {data_start}..{data_end}",
        file.display()
    )]
    PageOutOfRange {
        file: PathBuf,
        offset: u64,
        len: u64,
        data_start: u64,
        data_end: u64,
    },
    #[error(
        "{}: {len} bytes of page data is not a whole number of {} byte pages",
        file.display(),
        crate::PAGE_SIZE
    )]
    NotPageAligned { file: PathBuf, len: u64 },
}

pub type Result<T> = std::result::Result<T, ImageError>;

impl ImageError {
    pub(crate) fn io(file: impl Into<PathBuf>, err: std::io::Error) -> Self {
        ImageError::Io {
            file: file.into(),
            err,
        }
    }

    /// Like [`ImageError::io`] for opening a file that must exist: "not found" becomes
    /// [`ImageError::Missing`].
    pub(crate) fn open(file: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let file = file.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            ImageError::Missing { file }
        } else {
            ImageError::Io { file, err: source }
        }
    }
}
