//! Image authentication: a keyed MAC (HMAC-SHA-256) with a host key only root can read, made
//! when the dump is complete and checked by a root restore before anything is created.
//!
//! What it binds: every record file of the image (the root's and every task's: inventory,
//! cores with their credentials, memory map, files, process state, tree, vDSO) byte for byte,
//! and `pages.img`'s header, which holds the page data's length and its checksum. Page
//! contents are protected against corruption by that checksum (XXH3, not a cryptographic
//! hash): they can be altered only by whoever can write the image directory (0700, its
//! owner's), and whatever they hold runs with the credentials the authenticated records give.
//!
//! The key: `/var/lib/stasis/image.key` (or `$STASIS_KEY_FILE`), 32 random bytes, owned by
//! root, mode 0600, made on first use. A dump that cannot read it (not root) writes no MAC;
//! a root restore refuses such an image — or an altered one — unless told to trust it.

use crate::{ImageError, Result};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub const MAC_FILE: &str = "mac.img";
const DEFAULT_KEY: &str = "/var/lib/stasis/image.key";
const KEY_LEN: usize = 32;
const MAGIC: &[u8; 16] = b"stasis-image-mac";

/// The host key file.
pub fn key_path() -> PathBuf {
    std::env::var_os("STASIS_KEY_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_KEY))
}

fn auth_err(why: String) -> ImageError {
    ImageError::Auth { why }
}

/// The host key; made first (as root) when `create` and there is none. `None`: this user
/// cannot read it (and, when `create`, is not root).
pub fn host_key(create: bool) -> Result<Option<[u8; KEY_LEN]>> {
    let path = key_path();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    match std::fs::symlink_metadata(&path) {
        Ok(m) => {
            if !m.file_type().is_file()
                || m.uid() != 0
                || m.mode() & 0o077 != 0
                || m.len() != KEY_LEN as u64
            {
                return Err(auth_err(format!(
                    "the image key {} must be a regular file of {KEY_LEN} bytes owned by root with mode 0600",
                    path.display()
                )));
            }
            match std::fs::read(&path) {
                Ok(b) => Ok(b.try_into().ok()),
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Ok(None),
                Err(e) => Err(ImageError::io(&path, e)),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !create || !root {
                return Ok(None);
            }
            make_key(&path)?;
            host_key(false)
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Ok(None),
        Err(e) => Err(ImageError::io(&path, e)),
    }
}

/// Writes 32 random bytes under a temporary name and links them into place (another stasis
/// making one at the same moment wins or loses whole).
fn make_key(path: &Path) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(|e| ImageError::io(dir, e))?;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    let mut key = [0u8; KEY_LEN];
    let mut got = 0;
    while got < KEY_LEN {
        // SAFETY: getrandom writes at most the given length into the buffer.
        let r = unsafe { libc::getrandom(key[got..].as_mut_ptr().cast(), KEY_LEN - got, 0) };
        if r < 0 {
            return Err(ImageError::io(path, std::io::Error::last_os_error()));
        }
        got += r as usize;
    }
    let temp = dir.join(format!(".image.key.{}.tmp", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)
        .map_err(|e| ImageError::io(&temp, e))?;
    f.write_all(&key).map_err(|e| ImageError::io(&temp, e))?;
    drop(f);
    let linked = std::fs::hard_link(&temp, path);
    let _ = std::fs::remove_file(&temp);
    match linked {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(ImageError::io(path, e)),
    }
}

/// Every file the MAC covers, relative to the image's root directory, sorted: the record
/// files of the root and of every `task-*` directory, and each `pages.img` (its header).
fn covered(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut dirs = vec![PathBuf::new()];
    while let Some(rel) = dirs.pop() {
        let dir = root.join(&rel);
        let entries = std::fs::read_dir(&dir).map_err(|e| ImageError::io(&dir, e))?;
        for e in entries {
            let e = e.map_err(|e| ImageError::io(&dir, e))?;
            let name = e.file_name();
            let name_s = name.to_string_lossy();
            let ty = e.file_type().map_err(|err| ImageError::io(e.path(), err))?;
            if ty.is_dir() && rel.as_os_str().is_empty() && name_s.starts_with("task-") {
                dirs.push(rel.join(&name));
            } else if ty.is_file() && name_s.ends_with(".img") && name_s != MAC_FILE {
                out.push(rel.join(&name));
            }
        }
    }
    out.sort();
    Ok(out)
}

fn mac_of(root: &Path, key: &[u8; KEY_LEN]) -> Result<(Hmac<Sha256>, usize)> {
    let files = covered(root)?;
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(key).map_err(|e| auth_err(e.to_string()))?;
    mac.update(MAGIC);
    for rel in &files {
        let path = root.join(rel);
        let bytes = if rel.file_name().is_some_and(|n| n == crate::PAGES_FILE) {
            let mut head = vec![0u8; crate::DATA_OFFSET as usize];
            let f = std::fs::File::open(&path).map_err(|e| ImageError::open(&path, e))?;
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut head, 0)
                .map_err(|e| ImageError::io(&path, e))?;
            head
        } else {
            std::fs::read(&path).map_err(|e| ImageError::open(&path, e))?
        };
        let name = rel.as_os_str().as_encoded_bytes();
        mac.update(&(name.len() as u64).to_le_bytes());
        mac.update(name);
        mac.update(&Sha256::digest(&bytes));
    }
    Ok((mac, files.len()))
}

/// Writes `mac.img` for the complete image at `root`.
pub fn seal(root: &Path, key: &[u8; KEY_LEN]) -> Result<()> {
    let (mac, _) = mac_of(root, key)?;
    let mac = mac.finalize().into_bytes();
    let path = root.join(MAC_FILE);
    let temp = root.join(format!(".{MAC_FILE}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)
        .map_err(|e| ImageError::io(&temp, e))?;
    f.write_all(MAGIC)
        .and_then(|()| f.write_all(&mac))
        .map_err(|e| ImageError::io(&temp, e))?;
    std::fs::rename(&temp, &path).map_err(|e| ImageError::io(&path, e))
}

/// Whether the image at `root` carries a MAC this host's key made, over exactly its files.
pub fn verify(root: &Path, key: &[u8; KEY_LEN]) -> Result<()> {
    let path = root.join(MAC_FILE);
    let stored = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(auth_err(format!(
                "{} carries no MAC (it was dumped without the host key: by another user, or on another machine)",
                root.display()
            )))
        }
        Err(e) => return Err(ImageError::open(&path, e)),
    };
    if stored.len() != MAGIC.len() + 32 || &stored[..MAGIC.len()] != MAGIC {
        return Err(auth_err(format!("{} is not a MAC file", path.display())));
    }
    let (want, n) = mac_of(root, key)?;
    // Compared in constant time by the MAC's own verifier.
    let ok = want.verify_slice(&stored[MAGIC.len()..]);
    if ok.is_err() {
        return Err(auth_err(format!(
            "{} was altered since it was dumped, or made with another key ({n} files checked)",
            root.display()
        )));
    }
    Ok(())
}
