//! The restore plan: every decision about the restored address space, made on the host and
//! encoded as a flat list of system calls (`stasis_abi::PlanOp`) for the restorer to execute.
//!
//! Pointer arguments refer to data appended after the operations; `encode` resolves them once
//! the address of the plan area in the task is known.

use stasis_abi::{PlanOp, RestoreResult};

/// An argument: a plain value, or the address of plan data at an offset.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arg {
    V(u64),
    D(usize),
}
pub(crate) use Arg::{D, V};

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("operation {index} ({what}) failed: {err}")]
    OpFailed {
        index: usize,
        what: String,
        err: String,
    },
    #[error("the restorer's reply is malformed ({0} bytes)")]
    BadReply(usize),
    #[error("the restorer stopped after {done} of {total} operations")]
    Incomplete { done: u64, total: usize },
}

pub struct Plan {
    pub(crate) ops: Vec<([Arg; 6], u64, u32, String)>,
    pub(crate) data: Vec<u8>,
    /// Pointers inside the data to other data: (offset of the 8-byte slot, offset pointed at).
    pub(crate) fixups: Vec<(usize, usize)>,
    /// Address ranges the plan itself uses as scratch space: the restorer's region must not.
    pub reserved: Vec<(u64, u64)>,
    /// Shared anonymous objects mapped so far: id → (address, offset in the object, length).
    pub(crate) shm: std::collections::HashMap<u64, (u64, u64, u64)>,
}

fn errno_text(r: i64) -> String {
    if (-4095..0).contains(&r) {
        format!("{} ({})", nix::errno::Errno::from_raw(-r as i32), -r)
    } else {
        format!("unexpected result {r:#x}")
    }
}

impl Plan {
    pub(crate) fn new() -> Plan {
        Plan {
            ops: Vec::new(),
            data: Vec::new(),
            fixups: Vec::new(),
            reserved: Vec::new(),
            shm: std::collections::HashMap::new(),
        }
    }

    pub(crate) fn op(&mut self, nr: i64, args: [Arg; 6], expect: u32, what: impl Into<String>) {
        self.ops.push((args, nr as u64, expect, what.into()));
    }

    pub(crate) fn put(&mut self, bytes: &[u8]) -> Arg {
        let off = self.data.len().next_multiple_of(8);
        self.data.resize(off, 0);
        self.data.extend_from_slice(bytes);
        D(off)
    }

    pub(crate) fn put_u64s(&mut self, words: &[u64]) -> Arg {
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        self.put(&bytes)
    }

    fn ops_len(&self) -> usize {
        self.ops.len() * std::mem::size_of::<PlanOp>()
    }

    pub fn log(&self) {
        for (i, o) in self.ops.iter().enumerate() {
            tracing::debug!("plan op {i}: {}", o.3);
        }
    }

    /// Bytes the encoded plan takes (operations + data).
    pub fn byte_len(&self) -> usize {
        self.ops_len().next_multiple_of(8) + self.data.len()
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Encodes the plan for the area at `base`; returns the bytes and the operations' length.
    pub fn encode(&self, base: u64) -> (Vec<u8>, usize) {
        let data_at = base + self.ops_len().next_multiple_of(8) as u64;
        let mut out = Vec::with_capacity(self.byte_len());
        for (args, nr, expect, _) in &self.ops {
            let mut op = PlanOp {
                nr: *nr,
                expect: *expect,
                ..PlanOp::default()
            };
            for (slot, a) in op.args.iter_mut().zip(args) {
                *slot = match *a {
                    V(v) => v,
                    D(off) => data_at + off as u64,
                };
            }
            // SAFETY: PlanOp is plain integers; its bytes are its wire form.
            out.extend_from_slice(unsafe {
                std::slice::from_raw_parts(
                    &op as *const PlanOp as *const u8,
                    std::mem::size_of::<PlanOp>(),
                )
            });
        }
        let ops_len = out.len();
        out.resize(ops_len.next_multiple_of(8), 0);
        let data_start = out.len();
        out.extend_from_slice(&self.data);
        for &(slot, target) in &self.fixups {
            let at = data_start + slot;
            out[at..at + 8].copy_from_slice(&(data_at + target as u64).to_le_bytes());
        }
        (out, ops_len)
    }

    fn result(reply: &[u8]) -> Option<RestoreResult> {
        (reply.len() == std::mem::size_of::<RestoreResult>())
            // SAFETY: RestoreResult is plain integers and the slice has its exact size.
            .then(|| unsafe { std::ptr::read_unaligned(reply.as_ptr() as *const RestoreResult) })
    }

    /// Checks a successful reply ran every operation.
    pub fn check_result(&self, reply: &[u8]) -> Result<(), PlanError> {
        let r = Self::result(reply).ok_or(PlanError::BadReply(reply.len()))?;
        if r.done as usize != self.ops.len() {
            return Err(PlanError::Incomplete {
                done: r.done,
                total: self.ops.len(),
            });
        }
        Ok(())
    }

    /// Names the operation a failed reply points at.
    pub fn describe_failure(&self, reply: &[u8]) -> String {
        match Self::result(reply) {
            Some(r) => {
                let i = r.failed_op as usize;
                let what = self
                    .ops
                    .get(i)
                    .map_or("unknown operation", |o| o.3.as_str())
                    .to_string();
                PlanError::OpFailed {
                    index: i,
                    what,
                    err: errno_text(r.result),
                }
                .to_string()
            }
            None => PlanError::BadReply(reply.len()).to_string(),
        }
    }
}

pub(crate) const SYS_MMAP: i64 = libc::SYS_mmap;

#[cfg(test)]
mod tests {
    use super::*;

    fn ops_of(bytes: &[u8], ops_len: usize) -> Vec<PlanOp> {
        bytes[..ops_len]
            .chunks_exact(std::mem::size_of::<PlanOp>())
            // SAFETY: PlanOp is plain integers; each chunk has its exact size.
            .map(|c| unsafe { std::ptr::read_unaligned(c.as_ptr() as *const PlanOp) })
            .collect()
    }

    #[test]
    fn data_arguments_and_fixups_resolve_against_the_base() {
        let mut p = Plan::new();
        let a = p.put(b"abc");
        let b = p.put_u64s(&[0, 7]);
        let D(b_off) = b else { panic!("data") };
        let D(a_off) = a else { panic!("data") };
        p.fixups.push((b_off, a_off));
        p.op(
            1,
            [V(5), a, b, V(0), V(0), V(0)],
            stasis_abi::EXPECT_OK,
            "one",
        );
        let base = 0x10_0000;
        let (bytes, ops_len) = p.encode(base);
        assert_eq!(ops_len, std::mem::size_of::<PlanOp>());
        assert_eq!(bytes.len(), p.byte_len());
        let op = ops_of(&bytes, ops_len)[0];
        let data_at = base + ops_len.next_multiple_of(8) as u64;
        assert_eq!(op.nr, 1);
        assert_eq!(op.args[0], 5);
        assert_eq!(op.args[1], data_at + a_off as u64);
        assert_eq!(op.args[2], data_at + b_off as u64);
        let d = ops_len.next_multiple_of(8);
        assert_eq!(&bytes[d + a_off..d + a_off + 3], b"abc");
        assert_eq!(b_off % 8, 0, "u64 data is aligned");
        let slot = u64::from_le_bytes(bytes[d + b_off..d + b_off + 8].try_into().unwrap());
        assert_eq!(slot, data_at + a_off as u64, "pointer inside data fixed up");
    }

    fn reply(done: u64, failed_op: u64, result: i64) -> Vec<u8> {
        let r = RestoreResult {
            done,
            failed_op,
            result,
        };
        // SAFETY: RestoreResult is plain integers.
        unsafe {
            std::slice::from_raw_parts(
                &r as *const RestoreResult as *const u8,
                std::mem::size_of::<RestoreResult>(),
            )
        }
        .to_vec()
    }

    #[test]
    fn replies_are_checked_for_completeness_and_failures_named() {
        let mut p = Plan::new();
        p.op(1, [V(0); 6], stasis_abi::EXPECT_OK, "first");
        p.op(2, [V(0); 6], stasis_abi::EXPECT_OK, "second");
        assert!(p.check_result(&reply(2, 0, 0)).is_ok());
        assert!(matches!(
            p.check_result(&reply(1, 0, 0)),
            Err(PlanError::Incomplete { done: 1, total: 2 })
        ));
        assert!(matches!(
            p.check_result(&[0u8; 3]),
            Err(PlanError::BadReply(3))
        ));
        let why = p.describe_failure(&reply(1, 1, -13));
        assert!(why.contains("second") && why.contains("EACCES"), "{why}");
        let why = p.describe_failure(&reply(0, 99, -1));
        assert!(why.contains("unknown operation"), "{why}");
    }
}
