//! Writes a reply into the shared region, never past `reply_cap`.

use stasis_abi::{ReplyHeader, Status, MAGIC};

pub struct Reply {
    header: *mut ReplyHeader,
    payload: *mut u8,
    cap: usize,
}

impl Reply {
    /// # Safety
    /// `at` points to `size_of::<ReplyHeader>() + cap` writable bytes.
    pub unsafe fn new(at: *mut u8, cap: usize) -> Reply {
        let hdr = core::mem::size_of::<ReplyHeader>();
        Reply {
            header: at as *mut ReplyHeader,
            payload: unsafe { at.add(hdr) },
            cap,
        }
    }

    /// Copies `value` to payload offset `off`. Fails (without writing) if it would not fit.
    pub fn put<T: Copy>(&mut self, off: usize, value: &T) -> Result<(), Status> {
        let n = core::mem::size_of::<T>();
        self.put_bytes(off, unsafe {
            // SAFETY: T is a plain #[repr(C)] Copy struct; viewing it as bytes is fine.
            core::slice::from_raw_parts(value as *const T as *const u8, n)
        })
    }

    pub fn put_bytes(&mut self, off: usize, bytes: &[u8]) -> Result<(), Status> {
        match off.checked_add(bytes.len()) {
            Some(end) if end <= self.cap => {
                // SAFETY: [off, end) lies inside the payload we were given.
                unsafe {
                    core::ptr::copy_nonoverlapping(
                        bytes.as_ptr(),
                        self.payload.add(off),
                        bytes.len(),
                    )
                };
                Ok(())
            }
            _ => Err(Status::NoSpace),
        }
    }

    pub fn finish(&mut self, status: Status, errno: u32) {
        self.finish_len(status, errno, 0)
    }

    pub fn finish_len(&mut self, status: Status, errno: u32, len: usize) {
        let h = ReplyHeader {
            magic: MAGIC,
            status: status as u32,
            errno,
            len: len as u32,
        };
        // SAFETY: the header slot is ours (see `new`).
        unsafe { core::ptr::write_volatile(self.header, h) };
    }
}
