//! Copies the per-host top layer into the new root, like `cp -a` run inside it: owners,
//! modes, times, symlinks (copied, never followed), hard links, device nodes, fifos and
//! xattrs, top-level dotfiles included. As in an image layer, `.wh.NAME` deletes NAME
//! from the new root and `.wh..wh..opq` empties its directory before the copy.
//!
//! Destination directories are opened with `openat2(RESOLVE_IN_ROOT)`, so a symlink in
//! the image (`/bin` → `usr/bin`) is followed as the booted system would follow it, and
//! can never lead outside the new root.
//!
//! Deletions stay inside the new root too: a whiteout must name one real entry (`.wh.`,
//! `.wh..` and `.wh...` would name the directory itself or its parent, which at the top
//! is the store's partition), an opaque marker in a directory that is the new root (at
//! the top layer's root, or below it through a link such as `usr/up` → `..`: it would
//! empty the whole image, or a kept layer with all the machine wrote) is refused, and a
//! recursive delete never enters another filesystem or btrfs subvolume. Each refusal is
//! a warning naming the file, not a failed boot.
//!
//! Both trees are walked by descriptor, so no path is ever longer than a name: a top
//! layer deeper than PATH_MAX copies, and a whiteout deletes a tree of any depth with one
//! descriptor (see `whiteout.rs`). Directories deeper than [`COPY_DEPTH_MAX`] in the top
//! layer, or [`REMOVE_DEPTH_MAX`] below a deleted one, are left with a warning.
//!
//! The new root's own directory keeps its owner, mode and xattrs (on a snapshot they are
//! the layer's, and its marks are xattrs): a top-layer directory that leads to it
//! through a link copies its contents only.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::fcntl::{openat, openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fchmodat, fstat, mkdirat, mknodat, utimensat, FchmodatFlags, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchownat, linkat, symlinkat, unlinkat, Gid, Uid, UnlinkatFlags};

use crate::error::{Error, Result};

mod whiteout;

pub use whiteout::REMOVE_DEPTH_MAX;

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// How deep the top layer is copied, in directories below its root. Each level holds two
/// descriptors (its source and its destination) and /init has 1,024: a directory deeper
/// than this is not copied, with a warning naming it. Paths are never the limit: both
/// trees are walked by descriptor, so a top layer deeper than PATH_MAX copies.
pub const COPY_DEPTH_MAX: usize = 256;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CopyStats {
    pub files: usize,
    pub dirs: usize,
    pub links: usize,
    pub other: usize,
    pub bytes: u64,
    /// What was skipped and why, one sentence each, for the console and booted.json.
    pub warnings: Vec<String>,
}

/// The top-layer directory `rel` on the device mounted at `base`, resolved as if `base`
/// were `/` (a symlink in `rel` can never lead off the device) and without crossing into
/// another mount. Kernels before 5.6 (no openat2): the path, canonicalised and checked
/// to stay under `base`.
pub fn resolve_source(base: &Path, rel: &str) -> Result<PathBuf> {
    let rel = if rel.trim_matches('/').is_empty() {
        "."
    } else {
        rel.trim_start_matches('/')
    };
    let dir = File::open(base).map_err(|e| Error::io("cannot open", base, e))?;
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS | ResolveFlag::RESOLVE_NO_XDEV);
    let resolved = match openat2(dir.as_raw_fd(), rel, how) {
        Ok(fd) => {
            // SAFETY: a fresh descriptor from openat2.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                .map_err(|e| Error::io("cannot read the path of", base.join(rel), e))?
        }
        Err(Errno::ENOSYS) => {
            fs::canonicalize(base.join(rel)).map_err(|e| Error::io("cannot resolve", base.join(rel), e))?
        }
        Err(Errno::EXDEV) => {
            return Err(Error::new(
                "it lies on another filesystem mounted inside the top-layer device",
            ))
        }
        Err(Errno::ENOTDIR) => return Err(Error::new("it is not a directory")),
        Err(Errno::ENOENT) => return Err(Error::new("it does not exist")),
        Err(e) => return Err(Error::os("cannot open it", e)),
    };
    if !resolved.starts_with(base) || !resolved.is_dir() {
        return Err(Error::new(format!(
            "it resolves to {}, outside the top-layer device",
            resolved.display()
        )));
    }
    Ok(resolved)
}

/// Copies the contents of `src` (not `src` itself) into the tree at `dest_root`.
pub fn copy_tree(src: &Path, dest_root: &Path) -> Result<CopyStats> {
    let root = open_dir(None, dest_root)?;
    let md = fs::symlink_metadata(src).map_err(|e| Error::io("cannot read the top layer", src, e))?;
    let root_st = fstat(root.as_raw_fd()).map_err(|e| Error::os(format!("cannot stat {}", dest_root.display()), e))?;
    let mut c = Copier {
        root,
        root_id: (root_st.st_dev, root_st.st_ino),
        src_root: src.to_path_buf(),
        src_dev: md.dev(),
        hardlinks: HashMap::new(),
        stats: CopyStats::default(),
    };
    if !md.is_dir() {
        return Err(Error::new(format!(
            "top layer {} is not a directory (fix: toplayer_path= must name a directory)",
            src.display()
        )));
    }
    let src_dir = open_dir(None, src)?;
    let dest = c.dest_dir(Path::new(""))?;
    c.copy_dir(&src_dir, src, &dest, Path::new(""), 0)?;
    Ok(c.stats)
}

struct Copier {
    root: OwnedFd,
    /// (dev, ino) of the new root: a destination directory that is it, under any name.
    root_id: (u64, u64),
    src_root: PathBuf,
    /// The top layer's filesystem: the copy never leaves it.
    src_dev: u64,
    /// (dev, ino) of a multiply-linked source file → its path in the destination
    hardlinks: HashMap<(u64, u64), PathBuf>,
    stats: CopyStats,
}

/// A directory's descriptor, at `dirfd` (relative paths) or the working directory.
pub(crate) fn open_dir(dirfd: Option<RawFd>, path: &Path) -> Result<OwnedFd> {
    open_dir_with(dirfd, path, OFlag::empty())
}

/// The directory `name` in `dir`, not followed if it is a symlink (ELOOP).
fn open_subdir(dir: RawFd, name: &OsStr) -> Result<OwnedFd> {
    open_dir_with(Some(dir), Path::new(name), OFlag::O_NOFOLLOW)
}

fn open_dir_with(dirfd: Option<RawFd>, path: &Path, flags: OFlag) -> Result<OwnedFd> {
    let fd = openat(
        dirfd,
        path,
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC | flags,
        Mode::empty(),
    )
    .map_err(|e| Error::io("cannot open directory", path, e))?;
    // SAFETY: openat returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Copier {
    /// The destination directory `rel`, resolved as if chrooted into the new root.
    fn dest_dir(&self, rel: &Path) -> Result<OwnedFd> {
        let path = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        let how = OpenHow::new()
            .flags(OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        let fd = openat2(self.root.as_raw_fd(), path, how)
            .map_err(|e| Error::io("cannot open in the new root", Path::new("/").join(rel), e))?;
        // SAFETY: a fresh descriptor from openat2.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Copies the contents of the top-layer directory open as `src_dir` (at `src`, for
    /// messages) into the destination directory open as `dir` (at `rel` in the new root),
    /// `depth` directories below the top layer's root.
    fn copy_dir(&mut self, src_dir: &OwnedFd, src: &Path, dir: &OwnedFd, rel: &Path, depth: usize) -> Result<()> {
        let listing = nix::dir::Dir::openat(
            Some(src_dir.as_raw_fd()),
            ".",
            OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io("cannot list", src, e))?;
        let mut entries: Vec<std::ffi::OsString> = Vec::new();
        for entry in listing {
            let entry = entry.map_err(|e| Error::io("cannot list", src, e))?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if name != "." && name != ".." {
                entries.push(name.to_os_string());
            }
        }
        entries.sort();
        let st = fstat(dir.as_raw_fd()).map_err(|e| {
            Error::os(
                format!("top layer: cannot stat {}", Path::new("/").join(rel).display()),
                e,
            )
        })?;
        // Deletes below stay on this directory's filesystem (or btrfs subvolume).
        let dev = st.st_dev;
        if entries.iter().any(|n| n == OPAQUE) {
            if rel.as_os_str().is_empty() {
                self.warn(format!(
                    "top layer: ignored {}: an opaque marker at the top layer's root would empty the whole image (fix: put it in the directory to empty)",
                    self.src_root.join(OPAQUE).display()
                ));
            } else if (st.st_dev, st.st_ino) == self.root_id {
                self.warn(format!(
                    "top layer: ignored {}: {} leads to the new root itself through a link, and the marker would empty the whole image (fix: put it in the directory to empty, by its real path)",
                    src.join(OPAQUE).display(),
                    Path::new("/").join(rel).display()
                ));
            } else {
                self.remove_children(dir.as_raw_fd(), dev, rel)?;
            }
        }
        for name in entries {
            if name == OPAQUE {
                continue;
            }
            if let Some(victim) = name.as_bytes().strip_prefix(WHITEOUT_PREFIX) {
                if matches!(victim, b"" | b"." | b"..") {
                    self.warn(format!(
                        "top layer: ignored whiteout {}: it names no file (fix: a whiteout is .wh. followed by the name to delete)",
                        src.join(&name).display()
                    ));
                    continue;
                }
                self.remove_at(
                    dir.as_raw_fd(),
                    dev,
                    OsStr::from_bytes(victim),
                    &rel.join(OsStr::from_bytes(victim)),
                )?;
                continue;
            }
            let s = src.join(&name);
            let md = fs::symlink_metadata(proc_path(src_dir.as_raw_fd(), &name))
                .map_err(|e| Error::io("cannot stat", &s, e))?;
            // One filesystem: something mounted inside the top layer is not part of it.
            if md.is_dir() && md.dev() != self.src_dev {
                self.warn(format!(
                    "top layer: did not copy {}: another filesystem is mounted there",
                    s.display()
                ));
                continue;
            }
            let at = (src_dir.as_raw_fd(), dir.as_raw_fd());
            self.copy_entry(&s, &md, at, &name, &rel.join(&name), depth)?;
        }
        Ok(())
    }

    fn warn(&mut self, msg: String) {
        log::warn!("{msg}");
        self.stats.warnings.push(msg);
    }

    /// Copies `name` of the top-layer directory `src_dir` into the destination directory
    /// `dir` (`at`), `depth` directories below the top layer's root. `src` (the source's
    /// path) is for messages only: it may be longer than PATH_MAX.
    fn copy_entry(
        &mut self,
        src: &Path,
        md: &fs::Metadata,
        at: (RawFd, RawFd),
        name: &OsStr,
        rel: &Path,
        depth: usize,
    ) -> Result<()> {
        let (src_dir, dir) = at;
        // The source's xattrs are read by this path, which is never long.
        let from = proc_path(src_dir, name);
        let shown = Path::new("/").join(rel);
        let fail = |what: &str, e: Errno| Error::os(format!("top layer: cannot {what} {}", shown.display()), e);
        let existing = nix::sys::stat::fstatat(Some(dir), name, AtFlags::AT_SYMLINK_NOFOLLOW).ok();
        let existing_is_dir =
            existing.is_some_and(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR);
        let ft = md.file_type();

        if ft.is_dir() {
            if depth >= COPY_DEPTH_MAX {
                self.warn(format!(
                    "top layer: did not copy {}: it is deeper than {COPY_DEPTH_MAX} directories (fix: move it higher in the top layer)",
                    src.display()
                ));
                return Ok(());
            }
            let existing_is_link =
                existing.is_some_and(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK);
            if existing.is_some() && !existing_is_dir && !existing_is_link {
                unlinkat(Some(dir), name, UnlinkatFlags::NoRemoveDir).map_err(|e| fail("replace", e))?;
            }
            if existing.is_none() || !(existing_is_dir || existing_is_link) {
                mkdirat(Some(dir), name, Mode::from_bits_truncate(0o700)).map_err(|e| fail("create directory", e))?;
            }
            // A directory symlink in the image stays a symlink, and is followed as the
            // booted system would follow it: resolved by its path inside the new root.
            let target = match open_subdir(dir, name) {
                Ok(target) => target,
                Err(e) if matches!(e.errno(), Some(Errno::ELOOP | Errno::ENOTDIR)) => match self.dest_dir(rel) {
                    Err(e) if e.errno() == Some(Errno::ENAMETOOLONG) => {
                        self.warn(format!(
                            "top layer: did not copy {}: {} is a link in the image deeper than PATH_MAX, which cannot be \
                             followed by its path (fix: replace the link by its directory in the top layer)",
                            src.display(),
                            shown.display()
                        ));
                        return Ok(());
                    }
                    r => r?,
                },
                Err(e) => return Err(e.context(format!("top layer: {}", shown.display()))),
            };
            let source = open_subdir(src_dir, name).map_err(|e| e.context(format!("top layer: {}", src.display())))?;
            self.copy_dir(&source, src, &target, rel, depth + 1)?;
            // The target gets the metadata, unless it is the new root, whose own stay
            // (see the module's comment).
            let st = fstat(target.as_raw_fd()).map_err(|e| fail("stat", e))?;
            if (st.st_dev, st.st_ino) == self.root_id {
                self.warn(format!(
                    "top layer: copied only the contents of {}: {} leads to the new root itself through a link, whose owner, mode and xattrs stay",
                    src.display(),
                    shown.display()
                ));
            } else {
                self.set_attrs(target.as_raw_fd(), OsStr::new("."), &from, md, &shown)?;
            }
            self.stats.dirs += 1;
            return Ok(());
        }
        if existing_is_dir {
            return Err(Error::new(format!(
                "top layer: {} is a directory in the image but not in the top layer {} (fix: remove it from the top layer, or make it a directory)",
                shown.display(),
                self.src_root.display()
            )));
        }
        if existing.is_some() {
            unlinkat(Some(dir), name, UnlinkatFlags::NoRemoveDir).map_err(|e| fail("replace", e))?;
        }
        if md.nlink() > 1 && !ft.is_dir() {
            if let Some(first) = self.hardlinks.get(&(md.dev(), md.ino())).cloned() {
                // By descriptor: the first copy's directory resolved inside the new root,
                // its name never followed.
                let (parent, file) = (
                    first.parent().unwrap_or(Path::new("")),
                    first.file_name().unwrap_or_default(),
                );
                match self.dest_dir(parent) {
                    Ok(first_dir) => {
                        linkat(
                            Some(first_dir.as_raw_fd()),
                            Path::new(file),
                            Some(dir),
                            Path::new(name),
                            AtFlags::empty(),
                        )
                        .map_err(|e| fail("hard-link", e))?;
                        self.stats.links += 1;
                        return Ok(());
                    }
                    // Its first copy is found by its path from the new root.
                    Err(e) if e.errno() == Some(Errno::ENAMETOOLONG) => self.warn(format!(
                        "top layer: copied {} as a file of its own, not as a hard link to {}: that path is longer than PATH_MAX",
                        shown.display(),
                        Path::new("/").join(&first).display()
                    )),
                    Err(e) => return Err(e),
                }
            } else {
                self.hardlinks.insert((md.dev(), md.ino()), rel.to_path_buf());
            }
        }
        if ft.is_file() {
            let fd = openat(
                Some(dir),
                name,
                OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o600),
            )
            .map_err(|e| fail("create", e))?;
            // SAFETY: a fresh descriptor from openat.
            let mut out = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
            let input = openat(
                Some(src_dir),
                name,
                OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| Error::io("cannot read", src, e))?;
            // SAFETY: a fresh descriptor from openat.
            let mut input = File::from(unsafe { OwnedFd::from_raw_fd(input) });
            // As cp decides it: fewer blocks than the size needs means holes (the check
            // spares the usual file the extra system calls of the copy by regions).
            let copied = if md.blocks() * 512 < md.len() {
                copy_data(&mut input, &mut out, md.len())
            } else {
                std::io::copy(&mut input, &mut out)
            };
            self.stats.bytes += copied.map_err(|e| Error::io("cannot copy", src, e))?;
            self.stats.files += 1;
        } else if ft.is_symlink() {
            let target =
                nix::fcntl::readlinkat(Some(src_dir), name).map_err(|e| Error::io("cannot read link", src, e))?;
            symlinkat(Path::new(&target), Some(dir), name).map_err(|e| fail("create symlink", e))?;
            self.stats.links += 1;
        } else {
            let kind = if ft.is_char_device() {
                SFlag::S_IFCHR
            } else if ft.is_block_device() {
                SFlag::S_IFBLK
            } else if ft.is_fifo() {
                SFlag::S_IFIFO
            } else {
                SFlag::S_IFSOCK
            };
            mknodat(Some(dir), name, kind, Mode::from_bits_truncate(0o600), md.rdev())
                .map_err(|e| fail("create node", e))?;
            self.stats.other += 1;
        }
        self.set_attrs(dir, name, &from, md, &shown)
    }

    /// Owner, then mode (chown clears set-id bits), xattrs, then times (last: the others touch ctime only).
    fn set_attrs(&mut self, dir: RawFd, name: &OsStr, src: &Path, md: &fs::Metadata, shown: &Path) -> Result<()> {
        let fail = |what: &str, e: Errno| Error::os(format!("top layer: cannot {what} {}", shown.display()), e);
        let is_link = md.file_type().is_symlink();
        fchownat(
            Some(dir),
            name,
            Some(Uid::from_raw(md.uid())),
            Some(Gid::from_raw(md.gid())),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| fail("set the owner of", e))?;
        if !is_link {
            fchmodat(
                Some(dir),
                name,
                Mode::from_bits_truncate(md.mode() & 0o7777),
                FchmodatFlags::FollowSymlink,
            )
            .map_err(|e| fail("set the mode of", e))?;
        }
        let refused = crate::xattr::copy_all(src, &proc_path(dir, name), is_link)
            .map_err(|e| e.context(format!("top layer: {}", shown.display())))?;
        for w in refused {
            self.warn(format!("top layer: {}: {w}", shown.display()));
        }
        let atime = TimeSpec::new(md.atime(), md.atime_nsec());
        let mtime = TimeSpec::new(md.mtime(), md.mtime_nsec());
        utimensat(Some(dir), name, &atime, &mtime, UtimensatFlags::NoFollowSymlink)
            .map_err(|e| fail("set the times of", e))
    }
}

/// Copies a file's data regions and leaves its holes holes, as `cp -a` does: a sparse
/// file (`/var/log/lastlog`, a disk image) written out in full could fill the disk, and
/// a full disk costs the kept layers (they are pruned to make room). Returns the bytes
/// copied. A filesystem without holes reports the whole file as one data region.
fn copy_data(input: &mut File, out: &mut File, size: u64) -> std::io::Result<u64> {
    use nix::unistd::{lseek, Whence};
    use std::io::{Read, Seek, SeekFrom};
    let mut copied = 0;
    let mut at = 0;
    while at < size {
        let data = match lseek(input.as_raw_fd(), at as i64, Whence::SeekData) {
            Ok(d) => d as u64,
            Err(Errno::ENXIO) => break, // only a hole from `at` to the end
            Err(e) => return Err(e.into()),
        };
        let hole = lseek(input.as_raw_fd(), data as i64, Whence::SeekHole)? as u64;
        input.seek(SeekFrom::Start(data))?;
        out.seek(SeekFrom::Start(data))?;
        // std copies file to file with copy_file_range (a reflink where it can).
        copied += std::io::copy(&mut input.by_ref().take(hole - data), out)?;
        at = hole;
    }
    // A trailing hole (and the size, if the file grew while copied, as written).
    let end = out.stream_position()?;
    out.set_len(size.max(end))?;
    Ok(copied)
}

/// A path naming `name` in the open directory `dir`, for the path-only xattr calls.
fn proc_path(dir: RawFd, name: &OsStr) -> PathBuf {
    Path::new(&format!("/proc/self/fd/{dir}")).join(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    #[test]
    fn copies_like_cp_a_and_stays_inside_the_root() {
        let t = tempfile::tempdir().unwrap();
        let (src, dest) = (t.path().join("top"), t.path().join("root"));
        fs::create_dir_all(src.join("etc/ssh")).unwrap();
        fs::create_dir_all(src.join("bin")).unwrap();
        fs::write(src.join("etc/hostname"), "pc1\n").unwrap();
        fs::write(src.join(".dotfile"), "dot").unwrap();
        fs::write(src.join("etc/ssh/key"), "secret").unwrap();
        fs::set_permissions(src.join("etc/ssh/key"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(src.join("bin/tool"), "#!/bin/sh").unwrap();
        fs::hard_link(src.join("etc/hostname"), src.join("etc/hostname2")).unwrap();
        symlink("/etc/hostname", src.join("etc/link")).unwrap();
        symlink("../../outside", src.join("escape")).unwrap();
        // The image: /bin is a symlink to usr/bin (merged /usr); /etc/hostname exists.
        fs::create_dir_all(dest.join("usr/bin")).unwrap();
        fs::create_dir_all(dest.join("etc")).unwrap();
        fs::write(dest.join("etc/hostname"), "image\n").unwrap();
        symlink("/usr/bin", dest.join("bin")).unwrap();
        // An absolute symlink that would leave the root if followed on the host.
        symlink("/", dest.join("etc/ssh")).unwrap();

        let stats = copy_tree(&src, &dest).unwrap();
        assert_eq!(fs::read_to_string(dest.join("etc/hostname")).unwrap(), "pc1\n");
        assert_eq!(fs::read_to_string(dest.join(".dotfile")).unwrap(), "dot");
        assert_eq!(
            fs::read_to_string(dest.join("usr/bin/tool")).unwrap(),
            "#!/bin/sh",
            "followed /bin inside the root"
        );
        assert!(fs::symlink_metadata(dest.join("bin")).unwrap().file_type().is_symlink());
        // etc/ssh → "/" resolves to the new root itself, never the host's /.
        assert_eq!(fs::read_to_string(dest.join("key")).unwrap(), "secret");
        assert_eq!(
            fs::metadata(dest.join("key")).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::read_link(dest.join("etc/link")).unwrap(),
            Path::new("/etc/hostname")
        );
        assert_eq!(fs::read_link(dest.join("escape")).unwrap(), Path::new("../../outside"));
        assert_eq!(
            fs::metadata(dest.join("etc/hostname")).unwrap().ino(),
            fs::metadata(dest.join("etc/hostname2")).unwrap().ino()
        );
        let (s, d) = (
            fs::metadata(src.join("etc/hostname")).unwrap(),
            fs::metadata(dest.join("etc/hostname")).unwrap(),
        );
        assert_eq!((s.mtime(), s.mtime_nsec()), (d.mtime(), d.mtime_nsec()));
        assert_eq!(stats.files, 4);
    }

    #[test]
    fn a_file_over_an_image_directory_is_refused_by_name() {
        let t = tempfile::tempdir().unwrap();
        let (src, dest) = (t.path().join("top"), t.path().join("root"));
        fs::create_dir_all(src.join("etc")).unwrap();
        fs::write(src.join("etc/ssh"), "x").unwrap();
        fs::create_dir_all(dest.join("etc/ssh")).unwrap();
        let e = copy_tree(&src, &dest).unwrap_err().to_string();
        assert!(e.contains("/etc/ssh is a directory in the image"), "{e}");
        let e = copy_tree(&t.path().join("nope"), &dest).unwrap_err().to_string();
        assert!(e.contains("cannot read the top layer"), "{e}");
    }
}

#[cfg(test)]
mod hostile_names {
    use super::*;

    /// A partition with the new root `root` beside a `store` that must survive.
    fn partition() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let (src, root) = (t.path().join("top"), t.path().join("root"));
        fs::create_dir_all(t.path().join("store/var/lib/docker")).unwrap();
        fs::write(t.path().join("store/var/lib/docker/precious"), "layers").unwrap();
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::write(root.join("etc/issue"), "image").unwrap();
        fs::write(root.join("keep"), "image").unwrap();
        fs::create_dir_all(&src).unwrap();
        (t, src, root)
    }

    #[test]
    fn whiteouts_that_name_no_file_are_skipped_with_a_warning() {
        for dir in ["", "etc"] {
            for bad in [".wh.", ".wh..", ".wh..."] {
                let (t, src, root) = partition();
                fs::create_dir_all(src.join(dir)).unwrap();
                fs::write(src.join(dir).join(bad), "").unwrap();
                let stats = copy_tree(&src, &root).unwrap();
                assert!(
                    t.path().join("store/var/lib/docker/precious").exists(),
                    "{dir}/{bad} deleted the store"
                );
                assert_eq!(
                    fs::read_to_string(root.join("etc/issue")).unwrap(),
                    "image",
                    "{dir}/{bad}"
                );
                assert_eq!(fs::read_to_string(root.join("keep")).unwrap(), "image", "{dir}/{bad}");
                assert_eq!(stats.warnings.len(), 1, "{dir}/{bad}: {:?}", stats.warnings);
                assert!(
                    stats.warnings[0].contains(bad) && stats.warnings[0].contains("names no file"),
                    "{:?}",
                    stats.warnings
                );
            }
        }
    }

    #[test]
    fn the_top_layer_path_resolves_inside_its_device() {
        let t = tempfile::tempdir().unwrap();
        let dev = t.path().join("dev");
        fs::create_dir_all(dev.join("hosts/pc1")).unwrap();
        fs::create_dir_all(dev.join("etc")).unwrap();
        std::os::unix::fs::symlink("/etc", dev.join("hosts/abs")).unwrap();
        std::os::unix::fs::symlink("../../..", dev.join("hosts/up")).unwrap();
        assert_eq!(resolve_source(&dev, "/hosts/pc1").unwrap(), dev.join("hosts/pc1"));
        assert_eq!(resolve_source(&dev, "/").unwrap(), dev);
        assert_eq!(
            resolve_source(&dev, "/hosts/abs").unwrap(),
            dev.join("etc"),
            "an absolute link is the device's /etc, not the host's"
        );
        assert_eq!(
            resolve_source(&dev, "/hosts/up").unwrap(),
            dev,
            "'..' stops at the device's root"
        );
        assert!(resolve_source(&dev, "/hosts/none")
            .unwrap_err()
            .to_string()
            .contains("does not exist"));
    }

    #[test]
    fn an_opaque_marker_at_the_root_is_refused_but_works_below_it() {
        let (t, src, root) = partition();
        fs::write(src.join(OPAQUE), "").unwrap();
        fs::create_dir_all(src.join("etc")).unwrap();
        fs::write(src.join("etc").join(OPAQUE), "").unwrap();
        fs::write(src.join("etc/hostname"), "pc1").unwrap();
        let stats = copy_tree(&src, &root).unwrap();
        assert!(root.join("keep").exists(), "the root was not emptied");
        assert!(!root.join("etc/issue").exists(), "etc/ was emptied");
        assert_eq!(fs::read_to_string(root.join("etc/hostname")).unwrap(), "pc1");
        assert!(t.path().join("store/var/lib/docker/precious").exists());
        assert!(
            stats.warnings.len() == 1 && stats.warnings[0].contains("opaque marker at the top layer's root"),
            "{:?}",
            stats.warnings
        );
    }

    /// A merged-/usr image: /bin → usr/bin.
    fn merged_usr(root: &Path) {
        fs::create_dir_all(root.join("usr/bin")).unwrap();
        fs::write(root.join("usr/bin/sh"), "sh").unwrap();
        std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
    }

    #[test]
    fn an_opaque_marker_that_reaches_the_root_through_a_link_is_refused() {
        // The link made by the top layer itself (copied first: `bin` sorts before `usr`),
        // or one in the image; either way `usr/bin/zz` and `usr/up` are the new root.
        for (link_at, target, marker_dir) in [("bin/zz", "/", "usr/bin/zz"), ("usr/up", "..", "usr/up")] {
            let (t, src, root) = partition();
            merged_usr(&root);
            if link_at == "bin/zz" {
                fs::create_dir_all(src.join("bin")).unwrap();
                std::os::unix::fs::symlink(target, src.join(link_at)).unwrap();
            } else {
                std::os::unix::fs::symlink(target, root.join(link_at)).unwrap();
            }
            fs::create_dir_all(src.join(marker_dir)).unwrap();
            fs::write(src.join(marker_dir).join(OPAQUE), "").unwrap();
            fs::write(src.join(marker_dir).join("mine"), "host").unwrap();
            let stats = copy_tree(&src, &root).unwrap();
            assert!(
                root.join("keep").exists() && root.join("etc/issue").exists() && root.join("usr/bin/sh").exists(),
                "{marker_dir}: the new root was emptied"
            );
            assert_eq!(fs::read_to_string(root.join("mine")).unwrap(), "host", "{marker_dir}");
            assert!(t.path().join("store/var/lib/docker/precious").exists());
            assert!(
                stats
                    .warnings
                    .iter()
                    .any(|w| w.contains(OPAQUE) && w.contains("leads to the new root itself")),
                "{marker_dir}: {:?}",
                stats.warnings
            );
        }
    }

    #[test]
    fn a_directory_that_leads_to_the_root_leaves_the_roots_mode_alone() {
        use std::os::unix::fs::PermissionsExt;
        let (_t, src, root) = partition();
        merged_usr(&root);
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        fs::create_dir_all(src.join("bin")).unwrap();
        std::os::unix::fs::symlink("/", src.join("bin/zz")).unwrap();
        fs::create_dir_all(src.join("usr/bin/zz")).unwrap();
        fs::set_permissions(src.join("usr/bin/zz"), fs::Permissions::from_mode(0o700)).unwrap();
        let stats = copy_tree(&src, &root).unwrap();
        assert_eq!(fs::metadata(&root).unwrap().permissions().mode() & 0o7777, 0o755);
        assert!(
            stats.warnings.iter().any(|w| w.contains("copied only the contents")),
            "{:?}",
            stats.warnings
        );
    }

    #[test]
    fn a_whiteout_through_an_image_symlink_stays_inside_the_root() {
        let (t, src, root) = partition();
        // The image's /etc/alt points at the partition above the root if followed on the host.
        std::os::unix::fs::symlink("../../store", root.join("etc/alt")).unwrap();
        fs::create_dir_all(src.join("etc/alt/var/lib")).unwrap();
        fs::write(src.join("etc/alt/var/lib/.wh.docker"), "").unwrap();
        let _ = copy_tree(&src, &root); // refused or done: either way nothing outside is touched
        assert!(
            t.path().join("store/var/lib/docker/precious").exists(),
            "the whiteout left the new root"
        );
    }
}
