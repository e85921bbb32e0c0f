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

use std::sync::atomic::{AtomicU64, Ordering};

use crate::dir::TempFile;
use crate::header::{self, get_u64, put_u64};
use crate::{ImageDir, ImageError, Result, PAGE_SIZE};

/// Name of the page file in the image directory.
pub const PAGES_FILE: &str = "pages.img";
/// Beside it: the digest of every page, in order (u64 LE each). Its own XXH3-64 is the page
/// file's checksum, so it is checked against the header; with it a page can be verified on
/// its own, when it is used (a lazy restore's), instead of all the data up front.
pub const DIGESTS_FILE: &str = "pages.sum";
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
/// while it is still in the core's L2 cache.
const VERIFY_CHUNK: usize = 1 << 20;

/// The checksum of one page of data: XXH3-64 (the SIMD variant the CPU has, chosen at run time;
/// the digest is the same on every CPU).
pub fn page_digest(page: &[u8]) -> u64 {
    twox_hash::XxHash3_64::oneshot(page)
}

/// The page file's checksum: the XXH3-64 of every page's digest, little-endian, in order. Any
/// thread can hash any page, while dumping as while verifying.
fn combine(digests: &[u64]) -> u64 {
    let bytes: Vec<u8> = digests.iter().flat_map(|d| d.to_le_bytes()).collect();
    twox_hash::XxHash3_64::oneshot(&bytes)
}

fn digest_pages(data: &[u8], out: &mut Vec<u64>) {
    out.extend(data.chunks(PAGE_SIZE).map(page_digest));
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
    sink: PageSink,
    /// One digest per page appended so far.
    digests: Vec<u64>,
    dir: ImageDir,
}

/// The file half of a [`PageWriter`]: appends page data without hashing it.
pub struct PageSink {
    temp: TempFile,
    /// Pending small chunks; never holds more than `WRITE_BUFFER` bytes.
    buf: Vec<u8>,
    /// Page data bytes written to the file so far (the buffer not included).
    flushed: u64,
}

/// Digests of pages the pipeline of [`PageWriter::pipelined`] appends, one slot per page, in
/// file order; any thread may fill any slot (each exactly once).
pub struct PageDigests<'a> {
    slots: &'a [AtomicU64],
    /// File offset of the first slot's page.
    first: u64,
}

impl PageDigests<'_> {
    /// Hashes `data`, which is (or will be) appended at file offset `at`.
    pub fn hash(&self, at: u64, data: &[u8]) {
        let first = ((at - self.first) / PAGE_SIZE as u64) as usize;
        for (k, page) in data.chunks(PAGE_SIZE).enumerate() {
            if let Some(slot) = self.slots.get(first + k) {
                slot.store(page_digest(page), Ordering::Relaxed);
            }
        }
    }
}

/// Chunks at least this large are written without passing through the buffer.
const DIRECT_WRITE: usize = 64 * 1024;

impl PageWriter {
    pub fn create(dir: &ImageDir) -> Result<PageWriter> {
        Ok(PageWriter {
            sink: PageSink {
                temp: dir.create_temp(PAGES_FILE)?,
                buf: Vec::with_capacity(WRITE_BUFFER),
                flushed: 0,
            },
            digests: Vec::new(),
            dir: dir.clone(),
        })
    }

    /// Appends whole pages and returns the file offset they start at: page-aligned, and greater
    /// than that of every earlier chunk. Restore reads (or maps) them from there.
    pub fn append(&mut self, data: &[u8]) -> Result<u64> {
        let offset = self.sink.append(data)?;
        // Only accepted data is hashed, so the checksum always matches what the file will hold.
        digest_pages(data, &mut self.digests);
        Ok(offset)
    }

    /// Appends exactly `len` bytes through `work`, which gets the file half (`PageSink`, for
    /// one thread) and one digest slot per page (`PageDigests`, for any thread: every page
    /// appended must be hashed there, at its offset). Checks that it was all done.
    pub fn pipelined<T, E: From<ImageError>>(
        &mut self,
        len: u64,
        work: impl FnOnce(&mut PageSink, &PageDigests<'_>) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let pages = (len / PAGE_SIZE as u64) as usize;
        let first = DATA_OFFSET + self.data_len();
        // A digest of u64::MAX marks a slot nobody filled (a real page digest is that value
        // with probability 2^-64, which would only make this check refuse a good dump).
        let slots: Vec<AtomicU64> = (0..pages).map(|_| AtomicU64::new(u64::MAX)).collect();
        let digests = PageDigests {
            slots: &slots,
            first,
        };
        self.expect(len);
        let out = work(&mut self.sink, &digests)?;
        let wrote = DATA_OFFSET + self.data_len() - first;
        let filled: Vec<u64> = slots.into_iter().map(AtomicU64::into_inner).collect();
        if wrote != len || filled.contains(&u64::MAX) {
            return Err(E::from(ImageError::io(
                self.sink.temp.final_path(),
                std::io::Error::other(format!(
                    "a pipelined append wrote {wrote} of {len} bytes or left pages unhashed"
                )),
            )));
        }
        self.digests.extend(filled);
        Ok(out)
    }

    /// Bytes of page data appended so far.
    pub fn data_len(&self) -> u64 {
        self.sink.data_len()
    }

    /// Tells the file system that `len` more bytes are coming (best effort: allocating the
    /// blocks at once is cheaper than block by block as writes arrive).
    pub fn expect(&self, len: u64) {
        let at = DATA_OFFSET + self.data_len();
        // SAFETY: fallocate on our own file; KEEP_SIZE leaves the length to the writes.
        unsafe {
            libc::fallocate(
                self.sink.temp.file.as_raw_fd(),
                libc::FALLOC_FL_KEEP_SIZE,
                at as libc::off_t,
                len as libc::off_t,
            )
        };
    }

    /// Writes the header and gives the file its name `pages.img`.
    pub fn finish(self) -> Result<PageFileSummary> {
        let PageWriter {
            mut sink,
            digests,
            dir,
        } = self;
        sink.flush()?;
        let bytes: Vec<u8> = digests.iter().flat_map(|d| d.to_le_bytes()).collect();
        let sums = dir.create_temp(DIGESTS_FILE)?;
        sums.file
            .write_all_at(&bytes, 0)
            .map_err(|e| ImageError::io(sums.final_path(), e))?;
        sums.commit()?;
        let summary = PageFileSummary {
            data_len: sink.flushed,
            checksum: combine(&digests),
        };
        let mut header = vec![0u8; HEADER_LEN];
        put_u64(&mut header, DATA_LEN_AT, summary.data_len);
        put_u64(&mut header, DATA_XXH3_AT, summary.checksum);
        header::seal(&mut header, PAGES_MAGIC, HEADER_XXH3_AT);
        sink.temp
            .file
            .write_all_at(&header, 0)
            .map_err(|e| ImageError::io(sink.temp.final_path(), e))?;
        sink.temp.commit()?;
        Ok(summary)
    }
}

impl PageSink {
    /// Appends whole pages, unhashed (see [`PageWriter::pipelined`]); returns their offset.
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
        Ok(offset)
    }

    fn data_len(&self) -> u64 {
        self.flushed + self.buf.len() as u64
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
        // Every page hashes on its own: the data is shared out between threads in equal parts
        // of whole read chunks; the digest of all page digests, in order, is the checksum.
        // (The digest vector is sized by the file's real length, checked at open.)
        let pages = (self.data_len as usize) / PAGE_SIZE;
        let per_chunk = VERIFY_CHUNK / PAGE_SIZE;
        let chunks = pages.div_ceil(per_chunk);
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 4)
            .min(chunks.max(1));
        let mut digests = vec![0u64; pages];
        let per = chunks.div_ceil(threads).max(1) * per_chunk;
        // Hashing straight from a mapping saves a copy of all the data; reading is the fallback.
        let map = MappedData::new(self).ok();
        let map = map.as_ref();
        std::thread::scope(|s| -> Result<()> {
            let workers: Vec<_> = digests
                .chunks_mut(per)
                .enumerate()
                .map(|(t, out)| {
                    s.spawn(move || match map {
                        Some(m) => m
                            .hash_pages(t * per, out)
                            .or_else(|_| self.hash_pages(t * per, out)),
                        None => self.hash_pages(t * per, out),
                    })
                })
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

    /// The digest of every page, from pages.sum beside the page file, checked against the
    /// header's checksum. `None` if the image has no such file (made before it existed).
    pub fn digests(&self) -> Result<Option<Vec<u64>>> {
        let path = self.path.with_file_name(DIGESTS_FILE);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ImageError::open(&path, e)),
        };
        let pages = self.data_len / PAGE_SIZE as u64;
        // Sized by the page file's real length (checked at open), not by this file.
        header::check_len(&file, &path, pages * 8)?;
        let mut bytes = vec![0u8; (pages * 8) as usize];
        file.read_exact_at(&mut bytes, 0)
            .map_err(|e| ImageError::io(&path, e))?;
        if twox_hash::XxHash3_64::oneshot(&bytes) != self.checksum {
            return Err(ImageError::PayloadChecksum { file: path });
        }
        Ok(Some(
            bytes
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
        ))
    }

    /// Verifies the pages of [`off`, `off + len`) (file offsets, page-aligned) against
    /// `digests` (from [`PageReader::digests`]).
    pub fn verify_range(&self, digests: &[u64], off: u64, len: u64) -> Result<()> {
        let bad = || ImageError::PayloadChecksum {
            file: self.path.clone(),
        };
        if off < DATA_OFFSET || off.checked_add(len).is_none_or(|e| e > self.data_end()) {
            return Err(bad());
        }
        let mut buf = vec![0u8; VERIFY_CHUNK];
        let mut at = off;
        while at < off + len {
            let n = (VERIFY_CHUNK as u64).min(off + len - at) as usize;
            self.read_exact(&mut buf[..n], at)?;
            let first = ((at - DATA_OFFSET) / PAGE_SIZE as u64) as usize;
            for (k, page) in buf[..n].chunks(PAGE_SIZE).enumerate() {
                if digests.get(first + k) != Some(&page_digest(page)) {
                    return Err(bad());
                }
            }
            at += n as u64;
        }
        Ok(())
    }

    /// Hashes pages `first..first + out.len()` into `out`, reading them.
    fn hash_pages(&self, first: usize, out: &mut [u64]) -> Result<()> {
        let mut buf = vec![0u8; VERIFY_CHUNK];
        for (k, slots) in out.chunks_mut(VERIFY_CHUNK / PAGE_SIZE).enumerate() {
            let offset = DATA_OFFSET + ((first * PAGE_SIZE) + k * VERIFY_CHUNK) as u64;
            let n = slots.len() * PAGE_SIZE;
            self.read_exact(&mut buf[..n], offset)?;
            for (slot, page) in slots.iter_mut().zip(buf[..n].chunks(PAGE_SIZE)) {
                *slot = page_digest(page);
            }
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

/// Verification straight from the page cache: each piece of page data is mapped read-only,
/// hashed and unmapped (so the process's RSS stays small). Another process that truncated the
/// file meanwhile would make reading a mapping raise SIGBUS: while a `MappedData` lives,
/// SIGBUS ends stasis with a clear message instead (restore verifies before it creates
/// anything, so exiting there leaves nothing behind).
struct MappedData {
    fd: std::os::fd::RawFd,
    len: usize,
    old_bus: libc::sigaction,
}

extern "C" fn on_bus_while_verifying(_: libc::c_int) {
    const MSG: &[u8] = b"stasis: pages.img changed size while it was being verified\n";
    // SAFETY: write and _exit are async-signal-safe.
    unsafe {
        libc::write(2, MSG.as_ptr().cast(), MSG.len());
        libc::_exit(1);
    }
}

impl MappedData {
    fn new(r: &PageReader) -> std::io::Result<MappedData> {
        // SAFETY: sigaction structs are plain data; we install a handler and keep the old one.
        let old_bus = unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_bus_while_verifying as *const () as usize;
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, &act, &mut old) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            old
        };
        Ok(MappedData {
            fd: r.file.as_raw_fd(),
            len: (DATA_OFFSET + r.data_len) as usize,
            old_bus,
        })
    }

    /// Hashes pages `first..first + out.len()` of the data into `out`.
    fn hash_pages(&self, first: usize, out: &mut [u64]) -> std::io::Result<()> {
        for (k, slots) in out.chunks_mut(VERIFY_CHUNK / PAGE_SIZE).enumerate() {
            let offset = DATA_OFFSET as usize + first * PAGE_SIZE + k * VERIFY_CHUNK;
            let n = slots.len() * PAGE_SIZE;
            if offset + n > self.len {
                return Err(std::io::Error::other("page range outside the data"));
            }
            // SAFETY: a fresh read-only mapping of [offset, offset + n) of a file we hold
            // open, its page tables made in one call, read, then unmapped.
            unsafe {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    n,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    self.fd,
                    offset as libc::off_t,
                );
                if p == libc::MAP_FAILED {
                    return Err(std::io::Error::last_os_error());
                }
                libc::madvise(p, n, MADV_POPULATE_READ);
                let data = std::slice::from_raw_parts(p as *const u8, n);
                for (slot, page) in slots.iter_mut().zip(data.chunks(PAGE_SIZE)) {
                    *slot = page_digest(page);
                }
                libc::munmap(p, n);
            }
        }
        Ok(())
    }
}

impl Drop for MappedData {
    fn drop(&mut self) {
        // SAFETY: putting the old SIGBUS action back.
        unsafe { libc::sigaction(libc::SIGBUS, &self.old_bus, std::ptr::null_mut()) };
    }
}

const MADV_POPULATE_READ: i32 = 22;

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
