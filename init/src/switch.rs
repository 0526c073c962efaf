//! switch_root, following systemd's src/shared/switch-root.c: move the API filesystems
//! into the new root, empty the initramfs (never crossing a mount), move the new root
//! onto `/`, chroot, and exec the image's init.

use std::convert::Infallible;
use std::ffi::CString;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::sys::statfs::{statfs, FsType, TMPFS_MAGIC};
use nix::unistd::{chdir, chroot, execve};

use crate::error::{Error, Result};
use crate::mounts::{make_private, move_mount};

const API_MOUNTS: [&str; 4] = ["/dev", "/proc", "/sys", "/run"];

pub fn switch_root(new_root: &Path, init: &str, args: &[String], env: &[String]) -> Result<Infallible> {
    nix::unistd::sync();
    make_private(Path::new("/"))?;
    for m in API_MOUNTS {
        let target = new_root.join(&m[1..]);
        if !target.is_dir() {
            fs::create_dir_all(&target).map_err(|e| Error::io("the new root has no", &target, e))?;
        }
        move_mount(Path::new(m), &target)?;
    }
    chdir(new_root).map_err(|e| Error::io("cannot enter", new_root, e))?;
    empty_initramfs(new_root);
    move_mount(Path::new("."), Path::new("/"))?;
    chroot(".").map_err(|e| Error::new(format!("cannot chroot into the new root: {e}")))?;
    chdir("/").map_err(|e| Error::new(format!("cannot chdir to / in the new root: {e}")))?;

    let cstr = |s: &str| CString::new(s).map_err(|_| Error::new(format!("NUL byte in {s:?}")));
    let path = cstr(init)?;
    let mut argv = vec![path.clone()];
    for a in args {
        argv.push(cstr(a)?);
    }
    let envp: Vec<CString> = env.iter().map(|e| cstr(e)).collect::<Result<_>>()?;
    let err = execve(&path, &argv, &envp).unwrap_err();
    Err(Error::new(format!("cannot execute the image's init {init}: {err}")))
}

/// Frees the initramfs's memory: deletes its files, staying on its own filesystem (so
/// the new root and anything else mounted is untouched). Only on ramfs/tmpfs.
fn empty_initramfs(new_root: &Path) {
    let Ok(fs) = statfs("/") else { return };
    // nix names no RAMFS_MAGIC; the value is from linux/magic.h.
    const RAMFS_MAGIC: FsType = FsType(0x8584_58f6);
    if fs.filesystem_type() != RAMFS_MAGIC && fs.filesystem_type() != TMPFS_MAGIC {
        log::warn!("/ is not ramfs or tmpfs: leaving the initramfs files in place");
        return;
    }
    let Ok(root_md) = fs::symlink_metadata("/") else { return };
    remove_children(Path::new("/"), root_md.dev(), new_root);
}

fn remove_children(dir: &Path, dev: u64, keep: &Path) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p == keep {
            continue;
        }
        let Ok(md) = fs::symlink_metadata(&p) else { continue };
        if md.dev() != dev {
            continue; // a mount point: not ours to delete
        }
        if md.is_dir() {
            remove_children(&p, dev, keep);
            let _ = fs::remove_dir(&p);
        } else {
            let _ = fs::remove_file(&p);
        }
    }
}
