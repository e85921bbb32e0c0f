//! Creating the task with the dumped pid (`clone3` with `set_tid`) and the handshake with it
//! while it prepares itself (`child.rs`); the guard that kills a half-made task.

use anyhow::{bail, Result};
use stasis_image::Image;
use std::os::fd::{AsRawFd, OwnedFd};

/// Kills the half-made task unless the restore got to the end.
pub(crate) struct ChildGuard {
    pub(crate) pid: i32,
    pub(crate) armed: bool,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.armed {
            // Killing and reaping our own child.
            let pid = nix::unistd::Pid::from_raw(self.pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::__WALL));
        }
    }
}

/// The parent's end of the handshake with the new task.
pub struct Child {
    /// Parent's end of the hold pipe: the child blocks reading it until it is seized.
    _hold_w: OwnedFd,
}

/// Creates the task with the dumped pid and lets it prepare itself; returns once it is blocked
/// waiting to be seized.
pub(crate) fn spawn_child(
    img: &Image,
    helpers: &crate::fds::Helpers,
    file_data: &crate::files::FileData,
) -> Result<Child> {
    let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let (hold_r, hold_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let pid = img.inventory.pid;
    // SAFETY: stasis is single-threaded here, so the child may keep running ordinary Rust
    // code, like after fork (it never returns from child_main).
    let r = match unsafe { stasis_sys::clone::clone3_with_pid(pid) } {
        Ok(r) => r,
        Err(e) => bail!(
            "creating pid {pid} with clone3(set_tid): {e}{}",
            if e == nix::errno::Errno::EPERM {
                " (needs root or CAP_CHECKPOINT_RESTORE)"
            } else {
                ""
            }
        ),
    };
    if r == 0 {
        drop(ready_r);
        drop(hold_w);
        crate::child::child_main(img, helpers, file_data, ready_w, hold_r);
    }
    drop(ready_w);
    drop(hold_r);
    let mut guard = ChildGuard { pid, armed: true };
    // The child reports "OK" or an error message, then blocks.
    let mut msg = Vec::new();
    let mut f = std::fs::File::from(ready_r);
    use std::io::Read;
    let _ = f.read_to_end(&mut msg);
    let text = String::from_utf8_lossy(&msg).into_owned();
    if text != "OK" {
        bail!(
            "preparing pid {pid}: {}",
            if text.is_empty() {
                "the new task died"
            } else {
                text.as_str()
            }
        );
    }
    guard.armed = false;
    let _ = hold_w.as_raw_fd();
    Ok(Child { _hold_w: hold_w })
}
