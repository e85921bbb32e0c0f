//! The image directory and the private, write-then-rename files inside it.

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::{ImageError, Result};

/// Mode of the image directory: only the owner may list or enter it.
pub(crate) const DIR_MODE: u32 = 0o700;
/// Mode of every image file: only the owner may read it.
pub(crate) const FILE_MODE: u32 = 0o600;

/// A directory holding one image.
#[derive(Clone, Debug)]
pub struct ImageDir {
    path: PathBuf,
    /// `create` made the directory (it did not exist).
    created: bool,
}

impl ImageDir {
    /// Creates a new image directory with mode 0700, or takes an existing empty one and sets its
    /// mode to 0700. A non-empty directory is refused, so files of an old image never mix with
    /// a new one — but for the temporary files (`.NAME.tmp`) a dump that was killed leaves,
    /// which are removed.
    pub fn create(path: impl AsRef<Path>) -> Result<ImageDir> {
        let path = path.as_ref().to_path_buf();
        parent_is_safe(&path)?;
        let created = match DirBuilder::new().mode(DIR_MODE).create(&path) {
            Ok(()) => true,
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                require_dir(&path)?;
                require_ours(&path)?;
                let entries = std::fs::read_dir(&path).map_err(|e| ImageError::io(&path, e))?;
                let mut stale = Vec::new();
                for entry in entries {
                    let entry = entry.map_err(|e| ImageError::io(&path, e))?;
                    let name = entry.file_name();
                    let name = name.to_string_lossy();
                    let is_file = entry.file_type().is_ok_and(|t| t.is_file());
                    if !(is_file && name.starts_with('.') && name.ends_with(".tmp")) {
                        return Err(ImageError::DirNotEmpty { dir: path });
                    }
                    stale.push(entry.path());
                }
                for f in stale {
                    std::fs::remove_file(&f).map_err(|e| ImageError::io(&f, e))?;
                }
                false
            }
            Err(e) => return Err(ImageError::io(&path, e)),
        };
        // Set the mode explicitly: mkdir applied the umask, and an existing directory keeps
        // whatever mode it had.
        std::fs::set_permissions(&path, Permissions::from_mode(DIR_MODE))
            .map_err(|e| ImageError::io(&path, e))?;
        Ok(ImageDir { path, created })
    }

    /// Opens an existing image directory for reading.
    pub fn open(path: impl AsRef<Path>) -> Result<ImageDir> {
        let path = path.as_ref().to_path_buf();
        require_dir(&path)?;
        Ok(ImageDir {
            path,
            created: false,
        })
    }

    /// Undoes `create` after a failed dump: everything in the directory is this dump's (it was
    /// empty), so it all goes; the directory too if `create` made it.
    pub fn discard(&self) {
        if self.created {
            let _ = std::fs::remove_dir_all(&self.path);
            return;
        }
        if let Ok(entries) = std::fs::read_dir(&self.path) {
            for e in entries.flatten() {
                let p = e.path();
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = std::fs::remove_dir_all(&p);
                } else {
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Creates the hidden temporary file that becomes `name` on [`TempFile::commit`].
    pub(crate) fn create_temp(&self, name: &str) -> Result<TempFile> {
        let final_path = self.join(name);
        let temp_path = self.join(&format!(".{name}.tmp"));
        // A stale temporary file can only be left by a dump that died in this directory.
        match std::fs::remove_file(&temp_path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(ImageError::io(&temp_path, e)),
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&temp_path)
            .map_err(|e| ImageError::io(&temp_path, e))?;
        let temp = TempFile {
            file,
            temp_path,
            final_path,
            committed: false,
        };
        // The umask may have narrowed the mode further; 0600 exactly is what we promise.
        temp.file
            .set_permissions(Permissions::from_mode(FILE_MODE))
            .map_err(|e| ImageError::io(&temp.temp_path, e))?;
        Ok(temp)
    }
}

/// An existing directory to dump into must be a directory (not a symlink to one) that the
/// dumping user owns: whoever owns it can swap the image's files.
fn require_ours(path: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path).map_err(|e| ImageError::open(path, e))?;
    let not_ours = |why: String| ImageError::NotOurs {
        dir: path.into(),
        why,
    };
    if meta.file_type().is_symlink() {
        return Err(not_ours("it is a symbolic link".into()));
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(not_ours(format!(
            "it belongs to uid {}, not to uid {me}",
            meta.uid()
        )));
    }
    Ok(())
}

/// The directory the image directory is in must not let another user rename or replace it:
/// owned by the dumping user or root, or sticky (as /tmp), and not writable by others
/// otherwise.
fn parent_is_safe(path: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let Ok(meta) = std::fs::metadata(&parent) else {
        // Creating the directory will say what is wrong.
        return Ok(());
    };
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let sticky = meta.mode() & 0o1000 != 0;
    let others_write = meta.mode() & 0o022 != 0;
    if !sticky && ((meta.uid() != me && meta.uid() != 0) || others_write) {
        return Err(ImageError::NotOurs {
            dir: path.into(),
            why: format!(
                "the directory it is in ({}) is {}",
                parent.display(),
                if meta.uid() != me && meta.uid() != 0 {
                    format!("owned by uid {}", meta.uid())
                } else {
                    "writable by other users and not sticky".to_string()
                }
            ),
        });
    }
    Ok(())
}

fn require_dir(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| ImageError::open(path, e))?;
    if meta.is_dir() {
        Ok(())
    } else {
        Err(ImageError::NotADirectory { path: path.into() })
    }
}

/// A file being written under a temporary name. It appears under its final name only when
/// complete; dropped uncommitted (an error, a panic), it is removed.
pub(crate) struct TempFile {
    pub(crate) file: File,
    temp_path: PathBuf,
    final_path: PathBuf,
    committed: bool,
}

impl TempFile {
    /// The name the file will have; errors about its content name this path.
    pub(crate) fn final_path(&self) -> &Path {
        &self.final_path
    }

    pub(crate) fn commit(mut self) -> Result<()> {
        std::fs::rename(&self.temp_path, &self.final_path)
            .map_err(|e| ImageError::io(&self.final_path, e))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: the error that got us here is the one worth reporting.
            let _ = std::fs::remove_file(&self.temp_path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{mode_of, TestDir};

    #[test]
    fn create_makes_a_private_directory() {
        let t = TestDir::new("create-private");
        let path = t.path().join("img");
        let dir = ImageDir::create(&path).expect("create");
        assert_eq!(dir.path(), path);
        assert_eq!(mode_of(&path), 0o700);
    }

    #[test]
    fn create_takes_an_empty_directory_and_makes_it_private() {
        let t = TestDir::new("create-empty");
        std::fs::set_permissions(t.path(), Permissions::from_mode(0o755)).expect("chmod");
        ImageDir::create(t.path()).expect("create");
        assert_eq!(mode_of(t.path()), 0o700);
    }

    #[test]
    fn create_refuses_a_non_empty_directory() {
        let t = TestDir::new("create-non-empty");
        std::fs::write(t.path().join("inventory.img"), b"old").expect("write");
        let err = ImageDir::create(t.path()).expect_err("must refuse");
        assert!(matches!(err, ImageError::DirNotEmpty { .. }), "{err}");
    }

    #[test]
    fn create_refuses_a_file() {
        let t = TestDir::new("create-file");
        let file = t.path().join("plain");
        std::fs::write(&file, b"").expect("write");
        let err = ImageDir::create(&file).expect_err("must refuse");
        assert!(matches!(err, ImageError::NotADirectory { .. }), "{err}");
    }

    #[test]
    fn open_refuses_a_missing_directory() {
        let t = TestDir::new("open-missing");
        let err = ImageDir::open(t.path().join("nope")).expect_err("must refuse");
        assert!(matches!(err, ImageError::Missing { .. }), "{err}");
    }

    #[test]
    fn uncommitted_temp_file_is_removed() {
        let t = TestDir::new("temp-removed");
        let dir = ImageDir::create(t.path()).expect("create");
        drop(dir.create_temp("mm.img").expect("temp"));
        let left: Vec<_> = std::fs::read_dir(t.path()).expect("ls").collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
