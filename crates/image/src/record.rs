//! Metadata record files: a 64-byte header and a JSON payload (layout in the crate doc).

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::header::{self, get_u32, get_u64, put_u32, put_u64};
use crate::{ImageDir, ImageError, Result, PAGES_FILE};

pub(crate) const RECORD_MAGIC: &[u8; 8] = b"STASISIM";
pub(crate) const HEADER_LEN: usize = 64;
pub(crate) const KIND_AT: usize = 16;
pub(crate) const PAYLOAD_LEN_AT: usize = 24;
pub(crate) const PAYLOAD_XXH3_AT: usize = 32;
pub(crate) const HEADER_XXH3_AT: usize = 40;

/// Writes `value` as the record file `name` (e.g. `"mm.img"`) of kind `kind`, mode 0600. The file
/// appears under its name only once complete; an existing file of that name is replaced.
pub fn write_record<T: Serialize>(dir: &ImageDir, name: &str, kind: u32, value: &T) -> Result<()> {
    check_name(name)?;
    let temp = dir.create_temp(name)?;
    let payload = serde_json::to_vec(value).map_err(|err| ImageError::Encode {
        file: temp.final_path().into(),
        err,
    })?;
    let mut header = [0u8; HEADER_LEN];
    put_u32(&mut header, KIND_AT, kind);
    put_u64(&mut header, PAYLOAD_LEN_AT, payload.len() as u64);
    put_u64(
        &mut header,
        PAYLOAD_XXH3_AT,
        header::data_checksum(&payload),
    );
    header::seal(&mut header, RECORD_MAGIC, HEADER_XXH3_AT);
    let mut out = &temp.file;
    out.write_all(&header)
        .and_then(|()| out.write_all(&payload))
        .map_err(|e| ImageError::io(temp.final_path(), e))?;
    temp.commit()
}

/// Reads the record file `name`, checking everything the header promises and that it is of kind
/// `kind`, then decodes its payload.
pub fn read_record<T: DeserializeOwned>(dir: &ImageDir, name: &str, kind: u32) -> Result<T> {
    check_name(name)?;
    let path = dir.join(name);
    let payload = read_payload(&path, kind)?;
    serde_json::from_slice(&payload).map_err(|err| ImageError::BadPayload { file: path, err })
}

/// Opens `path`, checks header, kind, length and payload checksum, and returns the payload.
fn read_payload(path: &Path, kind: u32) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).map_err(|e| ImageError::open(path, e))?;
    let mut header = [0u8; HEADER_LEN];
    header::read_and_check(&file, path, &mut header, RECORD_MAGIC, HEADER_XXH3_AT)?;
    let found = get_u32(&header, KIND_AT);
    if found != kind {
        return Err(ImageError::WrongKind {
            file: path.into(),
            expected: kind,
            found,
        });
    }
    let payload_len = get_u64(&header, PAYLOAD_LEN_AT);
    let file_len = payload_len.saturating_add(HEADER_LEN as u64);
    // Checked against the real file size before allocating: payload_len is untrusted.
    header::check_len(&file, path, file_len)?;
    let len = usize::try_from(payload_len).map_err(|_| {
        let too_big = std::io::Error::from(std::io::ErrorKind::OutOfMemory);
        ImageError::io(path, too_big)
    })?;
    let mut payload = vec![0u8; len];
    if let Err(e) = file.read_exact_at(&mut payload, HEADER_LEN as u64) {
        // UnexpectedEof: the file shrank after we measured it; say by how much.
        return Err(header::check_len(&file, path, file_len)
            .err()
            .unwrap_or_else(|| ImageError::io(path, e)));
    }
    if header::data_checksum(&payload) != get_u64(&header, PAYLOAD_XXH3_AT) {
        return Err(ImageError::PayloadChecksum { file: path.into() });
    }
    Ok(payload)
}

/// For tools that edit images (the fuzzer, tests): the kind and JSON payload of the record file
/// `path`, every checksum checked.
pub fn read_raw_record(path: &Path) -> Result<(u32, Vec<u8>)> {
    let file = std::fs::File::open(path).map_err(|e| ImageError::open(path, e))?;
    let mut header = [0u8; HEADER_LEN];
    header::read_and_check(&file, path, &mut header, RECORD_MAGIC, HEADER_XXH3_AT)?;
    let kind = get_u32(&header, KIND_AT);
    Ok((kind, read_payload(path, kind)?))
}

/// The other half of `read_raw_record`: rewrites `path` as a record of `kind` holding `payload`,
/// its checksums made anew (what anyone who can write an image can do; the MAC is separate).
pub fn write_raw_record(path: &Path, kind: u32, payload: &[u8]) -> Result<()> {
    let mut header = [0u8; HEADER_LEN];
    put_u32(&mut header, KIND_AT, kind);
    put_u64(&mut header, PAYLOAD_LEN_AT, payload.len() as u64);
    put_u64(&mut header, PAYLOAD_XXH3_AT, header::data_checksum(payload));
    header::seal(&mut header, RECORD_MAGIC, HEADER_XXH3_AT);
    std::fs::write(path, [&header[..], payload].concat()).map_err(|e| ImageError::io(path, e))
}

/// A record name is a plain, visible file name in the image directory; `pages.img` is taken.
fn check_name(name: &str) -> Result<()> {
    let plain = !name.is_empty() && !name.starts_with('.') && !name.contains(['/', '\0']);
    if plain && name != PAGES_FILE {
        Ok(())
    } else {
        Err(ImageError::InvalidName { name: name.into() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{edit_header, flip_byte, mode_of, truncate, TestDir};
    use crate::ARCH_X86_64;
    use serde::Deserialize;
    use std::path::PathBuf;

    const KIND_MM: u32 = 7;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Mm {
        start_brk: u64,
        vmas: Vec<(u64, u64, String)>,
    }

    fn sample() -> Mm {
        Mm {
            start_brk: 0x5555_5555_0000,
            vmas: vec![
                (0x1000, 0x3000, "[heap]".into()),
                (0x7fff_0000, 0x7fff_2000, "[vdso]".into()),
            ],
        }
    }

    /// A fresh image with one valid `mm.img`; returns the scratch dir, the image and the file.
    fn image_with_record(test: &str) -> (TestDir, ImageDir, PathBuf) {
        let t = TestDir::new(test);
        let dir = ImageDir::create(t.path().join("img")).expect("create");
        write_record(&dir, "mm.img", KIND_MM, &sample()).expect("write");
        let file = dir.join("mm.img");
        (t, dir, file)
    }

    fn read_err(dir: &ImageDir) -> ImageError {
        read_record::<Mm>(dir, "mm.img", KIND_MM).expect_err("corrupt record must be refused")
    }

    #[test]
    fn round_trip() {
        let (_t, dir, file) = image_with_record("record-round-trip");
        let back: Mm = read_record(&dir, "mm.img", KIND_MM).expect("read");
        assert_eq!(back, sample());
        assert_eq!(mode_of(&file), 0o600);
        assert_eq!(mode_of(dir.path()), 0o700);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["mm.img"], "no temporary file is left behind");
    }

    #[test]
    fn rewrite_replaces_the_record() {
        let (_t, dir, _file) = image_with_record("record-rewrite");
        let other = Mm {
            start_brk: 1,
            vmas: vec![],
        };
        write_record(&dir, "mm.img", KIND_MM, &other).expect("rewrite");
        assert_eq!(
            read_record::<Mm>(&dir, "mm.img", KIND_MM).expect("read"),
            other
        );
    }

    #[test]
    fn invalid_names_are_refused() {
        let (_t, dir, _file) = image_with_record("record-names");
        for name in ["", ".hidden", "../escape.img", "a/b.img", "pages.img"] {
            let err = write_record(&dir, name, KIND_MM, &sample()).expect_err(name);
            assert!(matches!(err, ImageError::InvalidName { .. }), "{err}");
        }
    }

    #[test]
    fn flipped_payload_byte_is_a_payload_checksum_error() {
        let (_t, dir, file) = image_with_record("record-payload-flip");
        flip_byte(&file, HEADER_LEN + 3);
        let err = read_err(&dir);
        assert!(matches!(err, ImageError::PayloadChecksum { .. }), "{err}");
    }

    #[test]
    fn flipped_header_byte_is_a_header_checksum_error() {
        let (_t, dir, file) = image_with_record("record-header-flip");
        flip_byte(&file, PAYLOAD_LEN_AT);
        let err = read_err(&dir);
        assert!(matches!(err, ImageError::HeaderChecksum { .. }), "{err}");
    }

    #[test]
    fn flipped_padding_byte_is_a_header_checksum_error() {
        let (_t, dir, file) = image_with_record("record-padding-flip");
        flip_byte(&file, HEADER_LEN - 1);
        let err = read_err(&dir);
        assert!(matches!(err, ImageError::HeaderChecksum { .. }), "{err}");
    }

    #[test]
    fn flipped_magic_byte_is_bad_magic() {
        let (_t, dir, file) = image_with_record("record-magic-flip");
        flip_byte(&file, 2);
        let err = read_err(&dir);
        assert!(matches!(err, ImageError::BadMagic { .. }), "{err}");
    }

    #[test]
    fn other_format_version_is_unsupported() {
        let (_t, dir, file) = image_with_record("record-version");
        edit_header(&file, HEADER_LEN, HEADER_XXH3_AT, |h| {
            put_u32(h, header::VERSION_AT, crate::FORMAT_VERSION + 1)
        });
        let err = read_err(&dir);
        assert!(
            matches!(
                err,
                ImageError::UnsupportedVersion {
                    found,
                    supported: crate::FORMAT_VERSION,
                    ..
                } if found == crate::FORMAT_VERSION + 1
            ),
            "{err}"
        );
    }

    #[test]
    fn a_reserved_field_that_is_not_zero_is_refused() {
        for at in [20, 50, 63] {
            let (_t, dir, file) = image_with_record("record-reserved");
            edit_header(&file, HEADER_LEN, HEADER_XXH3_AT, |h| h[at] = 1);
            let err = read_err(&dir);
            assert!(
                matches!(err, ImageError::ReservedNotZero { .. }),
                "byte {at}: {err}"
            );
        }
    }

    #[test]
    fn other_architecture_is_refused() {
        let (_t, dir, file) = image_with_record("record-arch");
        edit_header(&file, HEADER_LEN, HEADER_XXH3_AT, |h| {
            put_u32(h, header::ARCH_AT, ARCH_X86_64 + 1)
        });
        let err = read_err(&dir);
        assert!(
            matches!(err, ImageError::WrongArch { found: 2, .. }),
            "{err}"
        );
    }

    #[test]
    fn wrong_kind_is_refused() {
        let (_t, dir, _file) = image_with_record("record-kind");
        let err = read_record::<Mm>(&dir, "mm.img", KIND_MM + 1).expect_err("wrong kind");
        assert!(
            matches!(
                err,
                ImageError::WrongKind {
                    expected: 8,
                    found: 7,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn deleted_file_is_missing() {
        let (_t, dir, file) = image_with_record("record-missing");
        std::fs::remove_file(&file).expect("rm");
        let err = read_err(&dir);
        assert!(matches!(err, ImageError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("mm.img"), "{err}");
    }

    #[test]
    fn truncated_payload_is_truncated() {
        let (_t, dir, file) = image_with_record("record-truncated");
        let len = std::fs::metadata(&file).expect("stat").len();
        truncate(&file, len - 5);
        let err = read_err(&dir);
        assert!(
            matches!(err, ImageError::Truncated { expected, found, .. }
                if expected == len && found == len - 5),
            "{err}"
        );
    }

    #[test]
    fn truncated_header_is_truncated() {
        let (_t, dir, file) = image_with_record("record-header-truncated");
        truncate(&file, HEADER_LEN as u64 - 1);
        let err = read_err(&dir);
        assert!(matches!(err, ImageError::Truncated { .. }), "{err}");
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let (_t, dir, file) = image_with_record("record-trailing");
        let mut bytes = std::fs::read(&file).expect("read");
        bytes.push(b'\n');
        std::fs::write(&file, bytes).expect("write");
        let err = read_err(&dir);
        assert!(matches!(err, ImageError::TrailingData { .. }), "{err}");
    }

    #[test]
    fn payload_with_valid_checksum_but_not_json_is_bad_payload() {
        let (_t, dir, file) = image_with_record("record-not-json");
        let garbage = b"\x00not json at all";
        let mut bytes = std::fs::read(&file).expect("read");
        bytes.truncate(HEADER_LEN);
        bytes.extend_from_slice(garbage);
        std::fs::write(&file, bytes).expect("write");
        edit_header(&file, HEADER_LEN, HEADER_XXH3_AT, |h| {
            put_u64(h, PAYLOAD_LEN_AT, garbage.len() as u64);
            put_u64(h, PAYLOAD_XXH3_AT, header::data_checksum(garbage));
        });
        let err = read_err(&dir);
        assert!(matches!(err, ImageError::BadPayload { .. }), "{err}");
    }

    #[test]
    fn huge_payload_len_is_truncated_not_an_allocation() {
        let (_t, dir, file) = image_with_record("record-huge-len");
        edit_header(&file, HEADER_LEN, HEADER_XXH3_AT, |h| {
            put_u64(h, PAYLOAD_LEN_AT, u64::MAX)
        });
        let err = read_err(&dir);
        assert!(matches!(err, ImageError::Truncated { .. }), "{err}");
    }
}
