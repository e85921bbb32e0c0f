//! The page file `pages.img`: a one-page header, then page data at page-aligned offsets (layout
//! in the crate doc).
//!
//! Writing streams: chunks go through a bounded buffer (large chunks straight to the file) and
//! through a running XXH3, so memory use does not grow with the amount dumped. The header, which
//! needs the final length and checksum, is written last, into the first page kept free for it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::Xxh3;

use crate::dir::TempFile;
use crate::header::{self, get_u64, put_u64};
use crate::{ImageDir, ImageError, Result, PAGE_SIZE};

/// Name of the page file in the image directory.
pub const PAGES_FILE: &str = "pages.img";
/// File offset of the first byte of page data: the header fills the first page.
pub const DATA_OFFSET: u64 = PAGE_SIZE as u64;

pub(crate) const PAGES_MAGIC: &[u8; 8] = b"STASISPG";
pub(crate) const HEADER_LEN: usize = PAGE_SIZE;
pub(crate) const DATA_LEN_AT: usize = 16;
pub(crate) const DATA_XXH3_AT: usize = 24;
pub(crate) const HEADER_XXH3_AT: usize = 32;

/// Chunks smaller than this are gathered before being written; larger ones are written as they
/// come. Bounds the writer's memory.
const WRITE_BUFFER: usize = 4 << 20;
/// Read size of [`PageReader::verify`]: small enough that the hash reads what pread just copied
/// while it is still in the core's L2 cache (1 MiB verified 1 GiB in ~100 ms here, 8 MiB in
/// ~175 ms).
const VERIFY_CHUNK: usize = 1 << 20;
/// Page data is checksummed in chunks of this size (the last may be shorter): the file's
/// checksum is the XXH3 of the chunks' XXH3s, little-endian, in order. Chunks can then be
/// verified in parallel.
pub const HASH_CHUNK: usize = 64 << 20;

/// The two-level checksum, fed sequentially.
#[derive(Default)]
struct TreeHasher {
    current: Xxh3,
    in_chunk: usize,
    digests: Vec<u64>,
}

impl TreeHasher {
    fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let take = (HASH_CHUNK - self.in_chunk).min(data.len());
            self.current.update(&data[..take]);
            self.in_chunk += take;
            data = &data[take..];
            if self.in_chunk == HASH_CHUNK {
                self.digests.push(self.current.digest());
                self.current = Xxh3::new();
                self.in_chunk = 0;
            }
        }
    }

    fn finish(mut self) -> u64 {
        if self.in_chunk > 0 {
            self.digests.push(self.current.digest());
        }
        combine(&self.digests)
    }
}

fn combine(digests: &[u64]) -> u64 {
    let bytes: Vec<u8> = digests.iter().flat_map(|d| d.to_le_bytes()).collect();
    xxhash_rust::xxh3::xxh3_64(&bytes)
}

/// What [`PageWriter::finish`] wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageFileSummary {
    /// Bytes of page data (after the header page).
    pub data_len: u64,
    /// XXH3-64 of the page data, as stored in the header.
    pub checksum: u64,
}

/// Writes `pages.img`. The file appears only on [`PageWriter::finish`]; a writer dropped before
/// that (an error, a panic) removes what it wrote. After an error from [`PageWriter::append`],
/// drop the writer: the dump has failed.
pub struct PageWriter {
    temp: TempFile,
    /// Pending small chunks; never holds more than `WRITE_BUFFER` bytes.
    buf: Vec<u8>,
    /// Page data bytes written to the file so far (the buffer not included).
    flushed: u64,
    /// XXH3 of all page data accepted so far, buffer included.
    hasher: TreeHasher,
}

/// Chunks at least this large are written without passing through the buffer.
const DIRECT_WRITE: usize = 64 * 1024;

impl PageWriter {
    pub fn create(dir: &ImageDir) -> Result<PageWriter> {
        Ok(PageWriter {
            temp: dir.create_temp(PAGES_FILE)?,
            buf: Vec::with_capacity(WRITE_BUFFER),
            flushed: 0,
            hasher: TreeHasher::default(),
        })
    }

    /// Appends whole pages and returns the file offset they start at: page-aligned, and greater
    /// than that of every earlier chunk. Restore reads (or maps) them from there.
    pub fn append(&mut self, data: &[u8]) -> Result<u64> {
        if !data.len().is_multiple_of(PAGE_SIZE) {
            return Err(ImageError::NotPageAligned {
                file: self.temp.final_path().into(),
                len: data.len() as u64,
            });
        }
        let offset = DATA_OFFSET + self.data_len();
        // Big chunks go straight to the file: copying them into the buffer first would cost a
        // second pass over the data for nothing. Small ones (a pipe's contents) are gathered.
        // Either way whatever is buffered goes out first: the file keeps the append order.
        let direct = data.len() >= DIRECT_WRITE;
        if direct || self.buf.len() + data.len() > WRITE_BUFFER {
            self.flush()?;
        }
        if direct {
            self.write_data(data)?;
            self.flushed += data.len() as u64;
        } else {
            self.buf.extend_from_slice(data);
        }
        // Only accepted data is hashed, so the checksum always matches what the file will hold.
        self.hasher.update(data);
        Ok(offset)
    }

    /// Bytes of page data appended so far.
    pub fn data_len(&self) -> u64 {
        self.flushed + self.buf.len() as u64
    }

    /// Writes the header and gives the file its name `pages.img`.
    pub fn finish(mut self) -> Result<PageFileSummary> {
        self.flush()?;
        let summary = PageFileSummary {
            data_len: self.flushed,
            checksum: self.hasher.finish(),
        };
        let mut header = vec![0u8; HEADER_LEN];
        put_u64(&mut header, DATA_LEN_AT, summary.data_len);
        put_u64(&mut header, DATA_XXH3_AT, summary.checksum);
        header::seal(&mut header, PAGES_MAGIC, HEADER_XXH3_AT);
        self.temp
            .file
            .write_all_at(&header, 0)
            .map_err(|e| ImageError::io(self.temp.final_path(), e))?;
        self.temp.commit()?;
        Ok(summary)
    }

    fn flush(&mut self) -> Result<()> {
        if !self.buf.is_empty() {
            self.write_data(&self.buf)?;
            self.flushed += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }

    /// Writes `data` right after the data already flushed.
    fn write_data(&self, data: &[u8]) -> Result<()> {
        self.temp
            .file
            .write_all_at(data, DATA_OFFSET + self.flushed)
            .map_err(|e| ImageError::io(self.temp.final_path(), e))
    }
}

/// Reads `pages.img`. [`PageReader::open`] checks the header and the length;
/// [`PageReader::verify`] checks the data against its checksum.
#[derive(Debug)]
pub struct PageReader {
    file: File,
    path: PathBuf,
    data_len: u64,
    checksum: u64,
}

impl PageReader {
    /// Opens the page file and checks magic, format version, header checksum, architecture,
    /// that the data is whole pages and that the file holds exactly the data the header
    /// announces (a truncated file is refused here, not half-way through a restore).
    pub fn open(dir: &ImageDir) -> Result<PageReader> {
        let path = dir.join(PAGES_FILE);
        let file = File::open(&path).map_err(|e| ImageError::open(&path, e))?;
        let mut header = vec![0u8; HEADER_LEN];
        header::read_and_check(&file, &path, &mut header, PAGES_MAGIC, HEADER_XXH3_AT)?;
        let data_len = get_u64(&header, DATA_LEN_AT);
        if !data_len.is_multiple_of(PAGE_SIZE as u64) {
            return Err(ImageError::NotPageAligned {
                file: path,
                len: data_len,
            });
        }
        header::check_len(&file, &path, DATA_OFFSET.saturating_add(data_len))?;
        Ok(PageReader {
            file,
            path,
            data_len,
            checksum: get_u64(&header, DATA_XXH3_AT),
        })
    }

    /// Reads all page data once and checks it against the header's checksum. Restore calls this
    /// before creating anything.
    pub fn verify(&self) -> Result<()> {
        // Advice only: doubles the kernel's read-ahead; failure changes nothing but speed.
        // SAFETY: plain syscall on a file descriptor we own; no memory is passed.
        unsafe { libc::posix_fadvise(self.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
        // Every HASH_CHUNK of data hashes on its own, so the chunks are shared out between
        // threads; the digest of their digests, in order, is the file's checksum.
        let chunks = (self.data_len as usize).div_ceil(HASH_CHUNK);
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 4)
            .min(chunks.max(1));
        let mut digests = vec![0u64; chunks];
        let per = chunks.div_ceil(threads).max(1);
        std::thread::scope(|s| -> Result<()> {
            let workers: Vec<_> = digests
                .chunks_mut(per)
                .enumerate()
                .map(|(t, out)| s.spawn(move || self.hash_chunks(t * per, out)))
                .collect();
            for w in workers {
                w.join().map_err(|_| ImageError::PayloadChecksum {
                    file: self.path.clone(),
                })??;
            }
            Ok(())
        })?;
        if combine(&digests) == self.checksum {
            Ok(())
        } else {
            Err(ImageError::PayloadChecksum {
                file: self.path.clone(),
            })
        }
    }

    /// Hashes data chunks `first..first + out.len()` into `out`.
    fn hash_chunks(&self, first: usize, out: &mut [u64]) -> Result<()> {
        let mut buf = vec![0u8; VERIFY_CHUNK];
        let end = self.data_end();
        for (k, slot) in out.iter_mut().enumerate() {
            let mut offset = DATA_OFFSET + ((first + k) * HASH_CHUNK) as u64;
            let stop = (offset + HASH_CHUNK as u64).min(end);
            let mut h = Xxh3::new();
            while offset < stop {
                let n = buf.len().min((stop - offset) as usize);
                self.read_exact(&mut buf[..n], offset)?;
                h.update(&buf[..n]);
                offset += n as u64;
            }
            *slot = h.digest();
        }
        Ok(())
    }

    /// Fills `buf` from file offset `offset` (as returned by [`PageWriter::append`]); the whole
    /// range must lie within the page data.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        let in_range = offset >= DATA_OFFSET
            && offset
                .checked_add(len)
                .is_some_and(|end| end <= self.data_end());
        if !in_range {
            return Err(ImageError::PageOutOfRange {
                file: self.path.clone(),
                offset,
                len,
                data_start: DATA_OFFSET,
                data_end: self.data_end(),
            });
        }
        self.read_exact(buf, offset)
    }

    /// The open page file, for restore to map or splice from directly. Page data lies at
    /// [`DATA_OFFSET`]`..`[`DATA_OFFSET`]` + data_len()`.
    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes of page data.
    pub fn data_len(&self) -> u64 {
        self.data_len
    }

    /// XXH3-64 of the page data, as the header states it.
    pub fn checksum(&self) -> u64 {
        self.checksum
    }

    fn data_end(&self) -> u64 {
        DATA_OFFSET + self.data_len
    }

    fn read_exact(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            // The file shrank after open() measured it: report it as the truncation it is.
            header::check_len(&self.file, &self.path, self.data_end())
                .err()
                .unwrap_or_else(|| ImageError::io(&self.path, e))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header::{put_u32, ARCH_AT, VERSION_AT};
    use crate::testutil::{edit_header, flip_byte, mode_of, truncate, TestDir};

    /// `pages` pages of a pattern that differs per page and per `seed`.
    fn pattern(seed: u8, pages: usize) -> Vec<u8> {
        (0..pages * PAGE_SIZE)
            .map(|i| (i / PAGE_SIZE) as u8 ^ (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    /// A fresh image holding a page file of chunks of 1, 3 and 2 pages; returns the scratch dir,
    /// the image, and the file path.
    fn image_with_pages(test: &str) -> (TestDir, ImageDir, PathBuf) {
        let t = TestDir::new(test);
        let dir = ImageDir::create(t.path().join("img")).expect("create");
        let mut w = PageWriter::create(&dir).expect("writer");
        for (seed, pages) in [(1, 1), (2, 3), (3, 2)] {
            w.append(&pattern(seed, pages)).expect("append");
        }
        w.finish().expect("finish");
        let file = dir.join(PAGES_FILE);
        (t, dir, file)
    }

    fn open_err(dir: &ImageDir) -> ImageError {
        PageReader::open(dir).expect_err("corrupt page file must be refused")
    }

    #[test]
    fn round_trip() {
        let t = TestDir::new("pages-round-trip");
        let dir = ImageDir::create(t.path().join("img")).expect("create");
        let mut w = PageWriter::create(&dir).expect("writer");
        // Small chunks (buffered), one larger than the buffer (written directly), small again.
        let chunks = [
            pattern(1, 1),
            pattern(2, 3),
            pattern(3, WRITE_BUFFER / PAGE_SIZE + 5),
            pattern(4, 2),
            Vec::new(),
            pattern(5, 1),
        ];
        let mut offsets = Vec::new();
        for chunk in &chunks {
            offsets.push(w.append(chunk).expect("append"));
        }
        let summary = w.finish().expect("finish");

        let mut expected = DATA_OFFSET;
        for (chunk, &offset) in chunks.iter().zip(&offsets) {
            assert_eq!(offset, expected);
            assert_eq!(offset % PAGE_SIZE as u64, 0);
            expected += chunk.len() as u64;
        }
        let total: usize = chunks.iter().map(Vec::len).sum();
        assert_eq!(summary.data_len, total as u64);

        let r = PageReader::open(&dir).expect("open");
        assert_eq!(r.data_len(), summary.data_len);
        assert_eq!(r.checksum(), summary.checksum);
        r.verify().expect("verify");
        for (chunk, &offset) in chunks.iter().zip(&offsets) {
            let mut back = vec![0u8; chunk.len()];
            r.read_at(offset, &mut back).expect("read_at");
            assert!(back == *chunk, "chunk at {offset} differs");
        }
        assert_eq!(mode_of(r.path()), 0o600);
        assert_eq!(
            r.file().metadata().expect("stat").len(),
            DATA_OFFSET + total as u64
        );
    }

    /// Regression: a chunk big enough to bypass the buffer, appended while smaller chunks were
    /// still buffered, used to reach the file before them (file order != checksum order).
    #[test]
    fn direct_write_after_buffered_chunk_keeps_order() {
        let t = TestDir::new("pages-direct-after-buffered");
        let dir = ImageDir::create(t.path().join("img")).expect("create");
        let mut w = PageWriter::create(&dir).expect("writer");
        let chunks = [
            pattern(1, 1),
            pattern(2, DIRECT_WRITE / PAGE_SIZE + 1),
            pattern(3, 2),
        ];
        let offsets: Vec<u64> = chunks
            .iter()
            .map(|c| w.append(c).expect("append"))
            .collect();
        w.finish().expect("finish");
        let r = PageReader::open(&dir).expect("open");
        r.verify()
            .expect("the checksum must match the file's order");
        for (chunk, &offset) in chunks.iter().zip(&offsets) {
            let mut back = vec![0u8; chunk.len()];
            r.read_at(offset, &mut back).expect("read_at");
            assert!(back == *chunk, "chunk at {offset} differs");
        }
    }

    #[test]
    fn empty_page_file_round_trips() {
        let t = TestDir::new("pages-empty");
        let dir = ImageDir::create(t.path().join("img")).expect("create");
        let summary = PageWriter::create(&dir)
            .expect("writer")
            .finish()
            .expect("finish");
        assert_eq!(summary.data_len, 0);
        let r = PageReader::open(&dir).expect("open");
        r.verify().expect("verify");
    }

    #[test]
    fn partial_page_chunk_is_refused() {
        let t = TestDir::new("pages-partial");
        let dir = ImageDir::create(t.path().join("img")).expect("create");
        let mut w = PageWriter::create(&dir).expect("writer");
        let err = w.append(&[0u8; PAGE_SIZE + 1]).expect_err("partial page");
        assert!(
            matches!(err, ImageError::NotPageAligned { len, .. } if len == PAGE_SIZE as u64 + 1),
            "{err}"
        );
    }

    #[test]
    fn unfinished_writer_leaves_no_file() {
        let t = TestDir::new("pages-unfinished");
        let dir = ImageDir::create(t.path().join("img")).expect("create");
        let mut w = PageWriter::create(&dir).expect("writer");
        w.append(&pattern(1, 2)).expect("append");
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 0);
        assert!(matches!(open_err(&dir), ImageError::Missing { .. }));
    }

    #[test]
    fn read_outside_the_data_is_refused() {
        let (_t, dir, _file) = image_with_pages("pages-out-of-range");
        let r = PageReader::open(&dir).expect("open");
        let end = DATA_OFFSET + r.data_len();
        let mut page = vec![0u8; PAGE_SIZE];
        for offset in [
            0,
            DATA_OFFSET - 1,
            end - PAGE_SIZE as u64 + 1,
            end,
            u64::MAX,
        ] {
            let err = r.read_at(offset, &mut page).expect_err("out of range");
            assert!(matches!(err, ImageError::PageOutOfRange { .. }), "{err}");
        }
        r.read_at(end - PAGE_SIZE as u64, &mut page)
            .expect("last page");
    }

    #[test]
    fn deleted_file_is_missing() {
        let (_t, dir, file) = image_with_pages("pages-missing");
        std::fs::remove_file(&file).expect("rm");
        let err = open_err(&dir);
        assert!(matches!(err, ImageError::Missing { .. }), "{err}");
        assert!(err.to_string().contains(PAGES_FILE), "{err}");
    }

    #[test]
    fn file_short_by_one_page_is_truncated() {
        let (_t, dir, file) = image_with_pages("pages-truncated");
        let len = std::fs::metadata(&file).expect("stat").len();
        truncate(&file, len - PAGE_SIZE as u64);
        let err = open_err(&dir);
        assert!(
            matches!(err, ImageError::Truncated { expected, found, .. }
                if expected == len && found == len - PAGE_SIZE as u64),
            "{err}"
        );
    }

    #[test]
    fn header_only_half_there_is_truncated() {
        let (_t, dir, file) = image_with_pages("pages-header-truncated");
        truncate(&file, 100);
        let err = open_err(&dir);
        assert!(matches!(err, ImageError::Truncated { .. }), "{err}");
    }

    #[test]
    fn extra_page_is_refused() {
        let (_t, dir, file) = image_with_pages("pages-trailing");
        let len = std::fs::metadata(&file).expect("stat").len();
        truncate(&file, len + PAGE_SIZE as u64);
        let err = open_err(&dir);
        assert!(matches!(err, ImageError::TrailingData { .. }), "{err}");
    }

    #[test]
    fn flipped_data_byte_fails_verify() {
        let (_t, dir, file) = image_with_pages("pages-data-flip");
        flip_byte(&file, DATA_OFFSET as usize + 2 * PAGE_SIZE + 17);
        let r = PageReader::open(&dir).expect("the header is intact");
        let err = r.verify().expect_err("data damaged");
        assert!(matches!(err, ImageError::PayloadChecksum { .. }), "{err}");
    }

    #[test]
    fn flipped_header_byte_is_a_header_checksum_error() {
        let (_t, dir, file) = image_with_pages("pages-header-flip");
        flip_byte(&file, DATA_XXH3_AT);
        let err = open_err(&dir);
        assert!(matches!(err, ImageError::HeaderChecksum { .. }), "{err}");
    }

    #[test]
    fn flipped_padding_byte_is_a_header_checksum_error() {
        let (_t, dir, file) = image_with_pages("pages-padding-flip");
        flip_byte(&file, HEADER_LEN - 1);
        let err = open_err(&dir);
        assert!(matches!(err, ImageError::HeaderChecksum { .. }), "{err}");
    }

    #[test]
    fn flipped_magic_byte_is_bad_magic() {
        let (_t, dir, file) = image_with_pages("pages-magic-flip");
        flip_byte(&file, 0);
        let err = open_err(&dir);
        assert!(matches!(err, ImageError::BadMagic { .. }), "{err}");
    }

    #[test]
    fn a_record_file_is_not_a_page_file() {
        let (_t, dir, file) = image_with_pages("pages-record-magic");
        crate::write_record(&dir, "mm.img", 1, &"x").expect("record");
        std::fs::rename(dir.join("mm.img"), &file).expect("mv");
        let err = open_err(&dir);
        assert!(matches!(err, ImageError::BadMagic { .. }), "{err}");
    }

    #[test]
    fn other_format_version_is_unsupported() {
        let (_t, dir, file) = image_with_pages("pages-version");
        edit_header(&file, HEADER_LEN, HEADER_XXH3_AT, |h| {
            put_u32(h, VERSION_AT, 7)
        });
        let err = open_err(&dir);
        assert!(
            matches!(
                err,
                ImageError::UnsupportedVersion {
                    found: 7,
                    supported: crate::FORMAT_VERSION,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn other_architecture_is_refused() {
        let (_t, dir, file) = image_with_pages("pages-arch");
        edit_header(&file, HEADER_LEN, HEADER_XXH3_AT, |h| {
            put_u32(h, ARCH_AT, 3)
        });
        let err = open_err(&dir);
        assert!(
            matches!(err, ImageError::WrongArch { found: 3, .. }),
            "{err}"
        );
    }

    #[test]
    fn data_len_of_partial_pages_is_refused() {
        let (_t, dir, file) = image_with_pages("pages-data-len");
        edit_header(&file, HEADER_LEN, HEADER_XXH3_AT, |h| {
            let len = get_u64(h, DATA_LEN_AT);
            put_u64(h, DATA_LEN_AT, len - 1)
        });
        let err = open_err(&dir);
        assert!(matches!(err, ImageError::NotPageAligned { .. }), "{err}");
    }
}
