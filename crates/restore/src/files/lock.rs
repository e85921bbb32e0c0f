//! File locks, taken again by the restored task itself (a POSIX lock belongs to the process
//! that takes it, an OFD or flock lock to the description) through the descriptor the dump
//! found them on. They are the plan's last file operations: closing any descriptor of a file —
//! a helper the restorer used to map it — drops the POSIX locks the process holds on it.
//!
//! Each lock is taken without waiting: if another process took it while this one was away, the
//! restore fails, naming the lock, rather than bring the process back without it.

use crate::plan::{Arg::V, Plan};
use stasis_abi::EXPECT_OK;
use stasis_image::model::*;

pub(crate) fn take_back(p: &mut Plan, locks: &[FileLock]) {
    for l in locks {
        let what = format!("take back the {l} (another process may hold it now)");
        match l.kind {
            LockKind::Flock => {
                let op = if l.write {
                    libc::LOCK_EX
                } else {
                    libc::LOCK_SH
                } | libc::LOCK_NB;
                p.op(
                    libc::SYS_flock,
                    [V(l.fd as u64), V(op as u64), V(0), V(0), V(0), V(0)],
                    EXPECT_OK,
                    what,
                );
            }
            LockKind::Posix | LockKind::Ofd => {
                let cmd = if l.kind == LockKind::Posix {
                    libc::F_SETLK
                } else {
                    libc::F_OFD_SETLK
                };
                let arg = p.put(&flock_bytes(l));
                p.op(
                    libc::SYS_fcntl,
                    [V(l.fd as u64), V(cmd as u64), arg, V(0), V(0), V(0)],
                    EXPECT_OK,
                    what,
                );
            }
        }
    }
}

/// flock locks held by mappings: taken through the descriptor each file is mapped from, which
/// the mapping keeps after the plan closes it.
pub(crate) fn take_back_mapped(
    p: &mut Plan,
    locks: &[MappedLock],
    h: &crate::fds::Helpers,
) -> anyhow::Result<()> {
    for l in locks {
        let Some((_, &fd)) = h
            .maps
            .iter()
            .find(|(m, _)| m.dev == l.dev && m.inode == l.inode)
        else {
            anyhow::bail!(
                "no mapping of inode {} to take its flock back through",
                l.inode
            );
        };
        let op = if l.write {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        } | libc::LOCK_NB;
        p.op(
            libc::SYS_flock,
            [V(fd as u64), V(op as u64), V(0), V(0), V(0), V(0)],
            EXPECT_OK,
            format!(
                "take back the flock {} lock on mapped inode {} (another process may hold it now)",
                if l.write { "write" } else { "read" },
                l.inode
            ),
        );
    }
    Ok(())
}

/// `struct flock` as x86_64 lays it out: l_type, l_whence (i16 each), padding, l_start,
/// l_len (i64 each), l_pid (which F_OFD_SETLK requires to be 0), padding.
fn flock_bytes(l: &FileLock) -> [u8; 32] {
    let mut b = [0u8; 32];
    let ty = if l.write {
        libc::F_WRLCK
    } else {
        libc::F_RDLCK
    } as i16;
    b[0..2].copy_from_slice(&ty.to_le_bytes());
    b[2..4].copy_from_slice(&(libc::SEEK_SET as i16).to_le_bytes());
    b[8..16].copy_from_slice(&l.start.to_le_bytes());
    b[16..24].copy_from_slice(&l.len.to_le_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flock_struct_matches_libc() {
        assert_eq!(std::mem::size_of::<libc::flock>(), 32);
        let l = FileLock {
            fd: 3,
            kind: LockKind::Ofd,
            write: true,
            start: 10,
            len: 20,
        };
        let b = flock_bytes(&l);
        // SAFETY: libc::flock is plain integers; b has its size.
        let f: libc::flock = unsafe { std::ptr::read_unaligned(b.as_ptr() as *const libc::flock) };
        assert_eq!(
            (f.l_type, f.l_whence, f.l_start, f.l_len, f.l_pid),
            (libc::F_WRLCK as i16, libc::SEEK_SET as i16, 10, 20, 0)
        );
    }
}
