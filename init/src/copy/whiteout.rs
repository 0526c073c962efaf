//! What a whiteout deletes from the new root: one entry, a whole tree for a directory,
//! listed and removed by descriptor with symlinks never followed, and never beyond the
//! filesystem (or btrfs subvolume) of the directory the whiteout is in.

use std::ffi::OsStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};

use super::Copier;
use crate::error::{Error, Result};

impl Copier {
    /// Deletes `name` in `dir` (a whole tree for a directory), symlinks not followed,
    /// never leaving `dev`, the filesystem (or btrfs subvolume) of `dir`.
    pub(super) fn remove_at(&mut self, dir: RawFd, dev: u64, name: &OsStr, rel: &Path) -> Result<()> {
        let shown = Path::new("/").join(rel);
        let fail = |e: Errno| Error::os(format!("top layer: cannot delete {}", shown.display()), e);
        let st = match fstatat(Some(dir), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::ENOENT) => return Ok(()),
            Err(e) => return Err(fail(e)),
        };
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFDIR {
            return unlinkat(Some(dir), name, UnlinkatFlags::NoRemoveDir).map_err(fail);
        }
        let fd = openat(
            Some(dir),
            name,
            OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(fail)?;
        // SAFETY: a fresh descriptor from openat.
        let sub = unsafe { OwnedFd::from_raw_fd(fd) };
        let sub_dev = fstat(sub.as_raw_fd()).map_err(fail)?.st_dev;
        if sub_dev != dev {
            self.warn(format!(
                "top layer: did not delete {}: it is another filesystem or btrfs subvolume",
                shown.display()
            ));
            return Ok(());
        }
        self.remove_children(sub.as_raw_fd(), dev, rel)?;
        match unlinkat(Some(dir), name, UnlinkatFlags::RemoveDir) {
            // A child on another filesystem was left in place.
            Err(Errno::ENOTEMPTY) | Err(Errno::EBUSY) => Ok(()),
            r => r.map_err(fail),
        }
    }

    pub(super) fn remove_children(&mut self, dir: RawFd, dev: u64, rel: &Path) -> Result<()> {
        let shown = Path::new("/").join(rel);
        // Listed through a duplicate of the descriptor, never by path.
        let listing = nix::dir::Dir::openat(
            Some(dir),
            ".",
            OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::os(format!("top layer: cannot list {}", shown.display()), e))?;
        let names: Vec<std::ffi::OsString> = listing
            .into_iter()
            .filter_map(|e| e.ok())
            .map(|e| OsStr::from_bytes(e.file_name().to_bytes()).to_os_string())
            .filter(|n| n != "." && n != "..")
            .collect();
        for n in names {
            self.remove_at(dir, dev, &n, &rel.join(&n))?;
        }
        Ok(())
    }
}
