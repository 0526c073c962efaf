//! The filesystem operations the rotation is made of: atomic renames that never replace,
//! an atomic swap, and removing a layer whichever kind of directory it is.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::errno::Errno;

use crate::btrfs::{self, is_subvolume};
use crate::error::{Error, Result};

/// Removes a layer directory or subvolume, whichever it is.
pub(super) fn remove_layer(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("cannot stat", path, e)),
        Ok(_) if is_subvolume(path) => btrfs::delete(path),
        Ok(md) if md.is_dir() => fs::remove_dir_all(path).map_err(|e| Error::io("cannot remove", path, e)),
        Ok(md) => Err(Error::new(format!(
            "{} is not a directory (mode {:o}): not removing it",
            path.display(),
            md.mode()
        ))),
    }
}

/// `renameat2` with `flags`. nix offers renameat2 only for glibc targets; /init is built
/// for musl, so this is the raw system call.
pub(super) fn renameat2(a: &Path, b: &Path, flags: nix::libc::c_uint) -> std::result::Result<(), Errno> {
    let a = CString::new(a.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?;
    let b = CString::new(b.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?;
    let at = nix::libc::AT_FDCWD;
    // SAFETY: both paths are NUL-terminated and outlive the call.
    let r = unsafe { nix::libc::syscall(nix::libc::SYS_renameat2, at, a.as_ptr(), at, b.as_ptr(), flags) };
    Errno::result(r).map(drop)
}

/// Swaps two paths atomically.
pub(super) fn exchange(a: &Path, b: &Path) -> std::result::Result<(), Errno> {
    renameat2(a, b, 2) // RENAME_EXCHANGE
}

/// Renames, failing rather than replacing whatever is at `b`.
pub(super) fn rename_noreplace(a: &Path, b: &Path) -> std::result::Result<(), Errno> {
    renameat2(a, b, 1) // RENAME_NOREPLACE
}
