//! What a whiteout deletes from the new root: one entry, a whole tree for a directory,
//! listed and removed by descriptor with symlinks never followed, and never beyond the
//! filesystem (or btrfs subvolume) of the directory the whiteout is in.
//!
//! A tree is walked down by descriptor and back up through `..`, each step up checked
//! against the directory it came from: one descriptor is held at a time however deep
//! the tree, and no path is ever longer than one name. /init runs with 1,024 open files
//! at most, and a tree 1,000 levels deep (in the image, or written into a kept layer)
//! would otherwise stop every boot. Below [`REMOVE_DEPTH_MAX`] levels a directory is
//! left in place, with a warning.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};

use super::Copier;
use crate::error::{Error, Result};

/// How many levels below the whiteout's directory a delete goes. Each level costs the
/// names still to visit there, no descriptor.
pub const REMOVE_DEPTH_MAX: usize = 4096;

/// A directory open on the way down: its name in its parent, its identity (to check
/// the way back up), and its subdirectories still to delete.
struct Level {
    name: OsString,
    id: (u64, u64),
    pending: Vec<OsString>,
}

fn open_dir_at(dir: RawFd, name: &OsStr) -> std::result::Result<OwnedFd, Errno> {
    let fd = openat(
        Some(dir),
        name,
        OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: a fresh descriptor from openat.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn is_dir(mode: u32) -> bool {
    SFlag::from_bits_truncate(mode) & SFlag::S_IFMT == SFlag::S_IFDIR
}

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
        if !is_dir(st.st_mode) {
            return unlinkat(Some(dir), name, UnlinkatFlags::NoRemoveDir).map_err(fail);
        }
        let sub = open_dir_at(dir, name).map_err(fail)?;
        let sub_dev = fstat(sub.as_raw_fd()).map_err(fail)?.st_dev;
        if sub_dev != dev {
            self.warn(format!(
                "top layer: did not delete {}: it is another filesystem or btrfs subvolume",
                shown.display()
            ));
            return Ok(());
        }
        self.empty_dir(sub, dev, rel)?;
        match unlinkat(Some(dir), name, UnlinkatFlags::RemoveDir) {
            // A child on another filesystem, or too deep, was left in place.
            Err(Errno::ENOTEMPTY) | Err(Errno::EBUSY) => Ok(()),
            r => r.map_err(fail),
        }
    }

    /// Deletes everything in the directory `dir` (the opaque marker's), never leaving `dev`.
    pub(super) fn remove_children(&mut self, dir: RawFd, dev: u64, rel: &Path) -> Result<()> {
        let top = open_dir_at(dir, OsStr::new(".")).map_err(|e| {
            Error::os(
                format!("top layer: cannot open {}", Path::new("/").join(rel).display()),
                e,
            )
        })?;
        self.empty_dir(top, dev, rel)
    }

    /// Deletes the contents of the open directory `top` (at `rel`), depth first: down by
    /// descriptor, up through `..`, checked.
    fn empty_dir(&mut self, top: OwnedFd, dev: u64, rel: &Path) -> Result<()> {
        let shown = |levels: &[Level], name: Option<&OsStr>| -> PathBuf {
            let mut p = Path::new("/").join(rel);
            p.extend(levels.iter().skip(1).map(|l| l.name.as_os_str()));
            p.extend(name);
            p
        };
        let st = fstat(top.as_raw_fd())
            .map_err(|e| Error::os(format!("top layer: cannot stat {}", shown(&[], None).display()), e))?;
        let pending = self.delete_files(top.as_raw_fd(), &shown(&[], None))?;
        let mut levels = vec![Level {
            name: OsString::new(),
            id: (st.st_dev, st.st_ino),
            pending,
        }];
        let mut cur = top;
        loop {
            let depth = levels.len();
            if let Some(child) = levels.last_mut().and_then(|l| l.pending.pop()) {
                let path = shown(&levels, Some(&child));
                let fail = |e: Errno| Error::os(format!("top layer: cannot delete {}", path.display()), e);
                let sub = match open_dir_at(cur.as_raw_fd(), &child) {
                    Ok(sub) => sub,
                    Err(Errno::ENOENT) => continue,
                    Err(e) => return Err(fail(e)),
                };
                let st = fstat(sub.as_raw_fd()).map_err(fail)?;
                if st.st_dev != dev {
                    self.warn(format!(
                        "top layer: did not delete {}: it is another filesystem or btrfs subvolume",
                        path.display()
                    ));
                    continue;
                }
                if depth > REMOVE_DEPTH_MAX {
                    self.warn(format!(
                        "top layer: did not delete {}: it is deeper than {REMOVE_DEPTH_MAX} directories below the deleted one (fix: delete it from the image or the layer)",
                        path.display()
                    ));
                    continue;
                }
                let pending = self.delete_files(sub.as_raw_fd(), &path)?;
                levels.push(Level {
                    name: child,
                    id: (st.st_dev, st.st_ino),
                    pending,
                });
                cur = sub;
                continue;
            }
            // Everything below is gone: back up, and delete this directory.
            let done = levels.pop().expect("a level");
            let Some(parent) = levels.last() else { return Ok(()) };
            let path = shown(&levels, Some(&done.name));
            let fail = |e: Errno| Error::os(format!("top layer: cannot delete {}", path.display()), e);
            let up = open_dir_at(cur.as_raw_fd(), OsStr::new("..")).map_err(fail)?;
            let st = fstat(up.as_raw_fd()).map_err(fail)?;
            if (st.st_dev, st.st_ino) != parent.id {
                return Err(Error::new(format!(
                    "top layer: cannot delete {}: its directory moved while it was deleted (fix: boot again; nothing \
                     else should change the new root while /init makes it)",
                    path.display()
                )));
            }
            cur = up;
            match unlinkat(Some(cur.as_raw_fd()), done.name.as_os_str(), UnlinkatFlags::RemoveDir) {
                Ok(()) | Err(Errno::ENOENT) | Err(Errno::ENOTEMPTY) | Err(Errno::EBUSY) => {}
                Err(e) => return Err(fail(e)),
            }
        }
    }

    /// Deletes every entry of `dir` but its directories, which it returns.
    fn delete_files(&mut self, dir: RawFd, shown: &Path) -> Result<Vec<OsString>> {
        // Listed through a fresh descriptor of the directory, never by path.
        let listing = nix::dir::Dir::openat(
            Some(dir),
            ".",
            OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::os(format!("top layer: cannot list {}", shown.display()), e))?;
        let names: Vec<OsString> = listing
            .into_iter()
            .filter_map(|e| e.ok())
            .map(|e| OsStr::from_bytes(e.file_name().to_bytes()).to_os_string())
            .filter(|n| n != "." && n != "..")
            .collect();
        let mut dirs = Vec::new();
        for n in names {
            let fail = |e: Errno| Error::os(format!("top layer: cannot delete {}", shown.join(&n).display()), e);
            match fstatat(Some(dir), n.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) if is_dir(st.st_mode) => dirs.push(n),
                Ok(_) => match unlinkat(Some(dir), n.as_os_str(), UnlinkatFlags::NoRemoveDir) {
                    Ok(()) | Err(Errno::ENOENT) => {}
                    Err(e) => return Err(fail(e)),
                },
                Err(Errno::ENOENT) => {}
                Err(e) => return Err(fail(e)),
            }
        }
        Ok(dirs)
    }
}
