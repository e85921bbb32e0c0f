//! The on-disk checkpoint image: one directory, a few small metadata record files and one page
//! file.
//!
//! An image holds everything a process had in memory, its secrets included, so the directory is
//! created `0700` and every file `0600`. An image is untrusted input to restore: every file is
//! checked (magic, format version, architecture, header checksum, length, data checksum) and
//! refused with an [`ImageError`] naming the file before restore creates anything. Files are
//! written to a hidden temporary name and renamed into place when complete, so a dump that fails
//! half-way leaves no file that looks valid.
//!
//! All integers are little-endian. Both kinds of file start with the same 16 bytes (magic,
//! format version, architecture): they are the only fields every future format version keeps in
//! place, so a reader checks them first and can tell "another version" from "damaged".
//! `header_xxh3` is the XXH3-64 of the whole header with the `header_xxh3` field itself read as
//! zero, so no header byte — reserved ones and padding included — can change unnoticed.
//!
//! # Record file: `<name>.img` (inventory, cores, mm, files, vDSO, …)
//!
//! ```text
//!  offset  size
//!        0 +--------------------------------------------------+
//!          | magic             b"STASISIM"                 8  |
//!        8 | format_version    u32 = FORMAT_VERSION        4  |
//!       12 | arch              u32 = ARCH_X86_64           4  |
//!       16 | kind              u32, chosen by the caller   4  |
//!       20 | reserved          u32 = 0                     4  |
//!       24 | payload_len       u64                         8  |
//!       32 | payload_xxh3      u64 = XXH3-64(payload)      8  |
//!       40 | header_xxh3       u64                         8  |
//!       48 | zero padding                                 16  |
//!       64 +--------------------------------------------------+
//!          | payload: the record as JSON        payload_len   |
//!          +--------------------------------------------------+  file length = 64 + payload_len
//! ```
//!
//! # Page file: `pages.img`
//!
//! ```text
//!  offset  size
//!        0 +--------------------------------------------------+
//!          | magic             b"STASISPG"                 8  |
//!        8 | format_version    u32 = FORMAT_VERSION        4  |
//!       12 | arch              u32 = ARCH_X86_64           4  |
//!       16 | data_len          u64, a multiple of 4096     8  |
//!       24 | data_xxh3   u64 = XXH3-64 of the XXH3-64s of    8  |
//!          |             each 4 KiB page, LE, in order    |
//!       32 | header_xxh3       u64                         8  |
//!       40 | zero padding to the end of the first page  4056  |
//!     4096 +--------------------------------------------------+
//!          | page data: chunks of whole pages, in the order   |
//!          | they were appended; each chunk starts at a       |
//!          | page-aligned file offset, so restore can pread   |
//!          | or mmap it directly.                 data_len    |
//!          +--------------------------------------------------+  file length = 4096 + data_len
//! ```
//!
//! The page file carries no index: [`PageWriter::append`] returns each chunk's file offset and the
//! caller records it in a metadata record (e.g. per VMA). The page file is written as a stream
//! through a bounded buffer and hashed on the way, so dumping memory never holds all of it.
//! [`PageReader::open`] checks the header and the file length; [`PageReader::verify`] reads the
//! whole data once to check its checksum, which restore must do before creating anything.
//!
//! Beside the page file, `pages.sum` ([`DIGESTS_FILE`]) holds the XXH3-64 of every page, LE, in
//! order: exactly the bytes whose XXH3-64 is `data_xxh3`. With it ([`PageReader::digests`]) a
//! page can be verified on its own when it is used ([`PageReader::verify_range`]), as a lazy
//! restore does; an image without it is verified whole.

pub mod auth;
mod dir;
mod error;
mod header;
pub mod model;
mod pages;
pub mod progress;
mod record;
mod set;
#[cfg(test)]
mod testutil;

pub use dir::ImageDir;
pub use error::{ImageError, Result};
pub use pages::{
    page_digest, PageDigests, PageFileSummary, PageReader, PageSink, PageWriter, DATA_OFFSET,
    DIGESTS_FILE, PAGES_FILE,
};
pub use record::{read_raw_record, read_record, write_raw_record, write_record};
pub use set::{
    load, load_tree, load_tree_deferred, Image, TreeImage, MAX_INOTIFY_WATCHES, MAX_INOTIFY_WD,
    MAX_TASKS,
};

/// Size of one page; page data is stored and aligned in units of it.
pub const PAGE_SIZE: usize = 4096;

/// The format version this code writes and the only one it reads. Bump it on any change to a
/// header or to the meaning of a record.
pub const FORMAT_VERSION: u32 = 5;

/// Architecture id of an x86_64 image, the only architecture stasis checkpoints.
pub const ARCH_X86_64: u32 = 1;
