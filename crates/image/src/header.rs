//! What record and page headers share: the preamble every format version keeps in place (magic,
//! format version, architecture), the header checksum and little-endian field access.
//!
//! Headers are fixed-size byte arrays built and parsed field by field at documented offsets; the
//! offsets are constants, so indexing here cannot go out of bounds for any file content.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use crate::{ImageError, Result, ARCH_X86_64, FORMAT_VERSION};

pub(crate) const MAGIC_LEN: usize = 8;
pub(crate) const VERSION_AT: usize = 8;
pub(crate) const ARCH_AT: usize = 12;

pub(crate) fn put_u32(header: &mut [u8], at: usize, value: u32) {
    header[at..at + 4].copy_from_slice(&value.to_le_bytes());
}

pub(crate) fn put_u64(header: &mut [u8], at: usize, value: u64) {
    header[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

pub(crate) fn get_u32(header: &[u8], at: usize) -> u32 {
    let mut bytes = [0; 4];
    bytes.copy_from_slice(&header[at..at + 4]);
    u32::from_le_bytes(bytes)
}

pub(crate) fn get_u64(header: &[u8], at: usize) -> u64 {
    let mut bytes = [0; 8];
    bytes.copy_from_slice(&header[at..at + 8]);
    u64::from_le_bytes(bytes)
}

/// XXH3-64 of the whole header with the 8-byte checksum field at `checksum_at` read as zero.
pub(crate) fn header_checksum(header: &[u8], checksum_at: usize) -> u64 {
    let mut hasher = Xxh3::new();
    hasher.update(&header[..checksum_at]);
    hasher.update(&[0; 8]);
    hasher.update(&header[checksum_at + 8..]);
    hasher.digest()
}

/// Fills in the preamble and then the checksum; the caller has set every other field.
pub(crate) fn seal(header: &mut [u8], magic: &[u8; MAGIC_LEN], checksum_at: usize) {
    header[..MAGIC_LEN].copy_from_slice(magic);
    put_u32(header, VERSION_AT, FORMAT_VERSION);
    put_u32(header, ARCH_AT, ARCH_X86_64);
    let checksum = header_checksum(header, checksum_at);
    put_u64(header, checksum_at, checksum);
}

/// Reads `header.len()` bytes from the start of `file` and checks what every header has, in the
/// order that gives the most telling error: magic (is this ours at all?), format version (before
/// anything whose layout a version may change), header checksum, architecture.
pub(crate) fn read_and_check(
    file: &File,
    path: &Path,
    header: &mut [u8],
    magic: &[u8; MAGIC_LEN],
    checksum_at: usize,
) -> Result<()> {
    let got = read_prefix(file, path, header)?;
    let magic_seen = got.min(MAGIC_LEN);
    if header[..magic_seen] != magic[..magic_seen] {
        return Err(ImageError::BadMagic { file: path.into() });
    }
    if got < header.len() {
        return Err(ImageError::Truncated {
            file: path.into(),
            expected: header.len() as u64,
            found: got as u64,
        });
    }
    let version = get_u32(header, VERSION_AT);
    if version != FORMAT_VERSION {
        return Err(ImageError::UnsupportedVersion {
            file: path.into(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    if header_checksum(header, checksum_at) != get_u64(header, checksum_at) {
        return Err(ImageError::HeaderChecksum { file: path.into() });
    }
    let arch = get_u32(header, ARCH_AT);
    if arch != ARCH_X86_64 {
        return Err(ImageError::WrongArch {
            file: path.into(),
            found: arch,
        });
    }
    // Reserved fields and padding are zero in every header stasis writes: an image with any
    // other value there was made by something else, and is refused.
    if reserved_of(magic)
        .iter()
        .any(|&(a, b)| header.get(a..b).is_none_or(|r| r.iter().any(|&x| x != 0)))
    {
        return Err(ImageError::ReservedNotZero { file: path.into() });
    }
    Ok(())
}

/// The byte ranges of a header that must be zero (after the fields), by its magic.
fn reserved_of(magic: &[u8; MAGIC_LEN]) -> &'static [(usize, usize)] {
    if magic == crate::record::RECORD_MAGIC {
        &[(20, 24), (48, 64)]
    } else {
        &[(40, 4096)]
    }
}

/// Checks that a file whose header promises `expected` bytes has exactly that many.
pub(crate) fn check_len(file: &File, path: &Path, expected: u64) -> Result<()> {
    let found = file.metadata().map_err(|e| ImageError::io(path, e))?.len();
    if found < expected {
        Err(ImageError::Truncated {
            file: path.into(),
            expected,
            found,
        })
    } else if found > expected {
        Err(ImageError::TrailingData {
            file: path.into(),
            expected,
            found,
        })
    } else {
        Ok(())
    }
}

/// Checksum of a whole in-memory payload, the same function [`Xxh3`] streams.
pub(crate) fn data_checksum(data: &[u8]) -> u64 {
    xxh3_64(data)
}

/// Reads from offset 0 until `buf` is full or the file ends; returns the bytes read.
fn read_prefix(file: &File, path: &Path, buf: &mut [u8]) -> Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ImageError::io(path, e)),
        }
    }
    Ok(got)
}
