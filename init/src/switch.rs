//! The hand-over to the image: its init checked first (a missing one would panic the
//! kernel after the switch), then switch_root, following systemd's src/shared/switch-root.c: move the API filesystems
//! into the new root, empty the initramfs (never crossing a mount), move the new root
//! onto `/`, chroot, and exec the image's init.

use std::convert::Infallible;
use std::ffi::CString;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::errno::Errno;
use nix::sys::statfs::{statfs, FsType, TMPFS_MAGIC};
use nix::unistd::{chdir, chroot, execve};

use crate::error::{Error, Result};
use crate::mounts::{make_private, move_mount};

const API_MOUNTS: [&str; 4] = ["/dev", "/proc", "/sys", "/run"];

/// `after`: the post-switch helper's plan, left behind as the last step (after the
/// chroot, so it starts in the image's namespace, just before its init).
pub fn switch_root(
    new_root: &Path,
    init: &str,
    args: &[String],
    env: &[String],
    after: Option<&crate::after_switch::Plan>,
) -> Result<Infallible> {
    // No sync() here: what must survive a power cut was flushed by what wrote it (the
    // writable layer's syncfs, fsync of the loader's files). A sync of everything waited
    // ~28 ms for a btrfs commit of what none of it needs.
    let targets = api_mount_targets(new_root)?;
    make_private(Path::new("/"))?;
    for (m, target) in API_MOUNTS.iter().zip(&targets) {
        move_mount(Path::new(m), target)?;
    }
    chdir(new_root).map_err(|e| Error::io("cannot enter", new_root, e))?;
    empty_initramfs(new_root);
    move_mount(Path::new("."), Path::new("/"))?;
    chroot(".").map_err(|e| Error::new(format!("cannot chroot into the new root: {e}")))?;
    chdir("/").map_err(|e| Error::new(format!("cannot chdir to / in the new root: {e}")))?;
    if let Some(plan) = after.filter(|p| !p.is_empty()) {
        if let Err(e) = crate::after_switch::spawn(Path::new(crate::bless::PROGRAM), plan) {
            crate::console::say(&format!("layerboot: warning: {e}: this boot has no reboot deadline"));
        }
    }

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

/// Where the API filesystems go in the new root: its own directories, made if missing.
/// Checked all before any is moved. A link there (`/dev` → `/`) would be followed from
/// the initramfs, and the mount land outside the new root: refused, by name.
fn api_mount_targets(new_root: &Path) -> Result<Vec<std::path::PathBuf>> {
    let targets: Vec<_> = API_MOUNTS.iter().map(|m| new_root.join(&m[1..])).collect();
    for (m, target) in API_MOUNTS.iter().zip(&targets) {
        match fs::symlink_metadata(target) {
            Ok(md) if !md.is_dir() => {
                let what = match fs::read_link(target) {
                    Ok(to) => format!("a link to {}", to.display()),
                    Err(_) => "a file".to_string(),
                };
                return Err(Error::new(format!(
                    "the image's {m} is not a directory but {what} (fix: make {m} a directory in the image)"
                )));
            }
            _ => {}
        }
    }
    for target in targets.iter().filter(|t| fs::symlink_metadata(t).is_err()) {
        fs::create_dir(target).map_err(|e| Error::io("the new root has no", target, e))?;
    }
    Ok(targets)
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
    // The shutdown program stays: it is bound at /run/initramfs (see shutdown.rs).
    let keep = [new_root, Path::new(crate::shutdown::SHUTDOWN_HOME)];
    remove_children(Path::new("/"), root_md.dev(), &keep);
}

fn remove_children(dir: &Path, dev: u64, keep: &[&Path]) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if keep.contains(&p.as_path()) {
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

/// The image's init must exist and be executable, or the switch would panic the kernel.
pub fn check_init(new_root: &Path, init: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let found = match resolve_in_root(new_root, init) {
        Ok(found) => found,
        // Kernels before 5.6 (only in --mount-root under an old distro kernel): resolve
        // the links ourselves.
        Err(Errno::ENOSYS) => crate::lookup::MergedView::from_dirs(vec![new_root.to_path_buf()]).lookup_follow(init)?.map(|e| e.metadata),
        Err(e) => {
            return Err(Error::new(format!(
                "cannot look up {init} in the image: {e} (fix: check the image's links on the way to {init}, or set init= to its real path)"
            )))
        }
    };
    match found {
        Some(md) if md.is_file() && md.permissions().mode() & 0o111 != 0 => Ok(()),
        Some(_) => Err(Error::new(format!(
            "{init} in the image is not an executable file (fix: init= another program)"
        ))),
        None => Err(Error::new(format!(
            "the image has no {init} (fix: install an init system in the image, e.g. systemd-sysv, or set init=)"
        ))),
    }
}

/// Where `path` inside `root` leads, its symlinks followed inside `root` at every level
/// (as [`resolve_in_root`]), as a path of this namespace; None if it leads nowhere.
pub fn path_in_root(root: &Path, path: &str) -> std::result::Result<Option<std::path::PathBuf>, Errno> {
    use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let dir = fs::File::open(root).map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0)))?;
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT);
    match openat2(dir.as_raw_fd(), path, how) {
        Ok(fd) => {
            // SAFETY: openat2 returned a new descriptor that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            Ok(fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok())
        }
        Err(Errno::ENOENT) | Err(Errno::ENOTDIR) => Ok(None),
        Err(e) => Err(e),
    }
}

/// What `path` is inside `root`, its symlinks followed as if `root` were `/`: one
/// openat2(RESOLVE_IN_ROOT), the kernel's own resolution, as the exec after the switch sees it.
fn resolve_in_root(root: &Path, path: &str) -> std::result::Result<Option<fs::Metadata>, Errno> {
    use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let dir = fs::File::open(root).map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0)))?;
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT);
    match openat2(dir.as_raw_fd(), path, how) {
        // SAFETY: openat2 returned a new descriptor that nothing else owns.
        Ok(fd) => Ok(fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) }).metadata().ok()),
        Err(Errno::ENOENT) | Err(Errno::ENOTDIR) => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emptying_the_initramfs_keeps_the_new_root_and_the_shutdown_program() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        for d in ["sysroot/usr", "shutdown-home/run", "lib/modules/k"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        for f in [
            "init",
            "sysroot/usr/keep",
            "shutdown-home/shutdown",
            "lib/modules/k/a.ko",
        ] {
            fs::write(root.join(f), "x").unwrap();
        }
        let dev = fs::metadata(root).unwrap().dev();
        remove_children(root, dev, &[&root.join("sysroot"), &root.join("shutdown-home")]);
        let mut left: Vec<String> = fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["shutdown-home", "sysroot"]);
        assert!(root.join("sysroot/usr/keep").exists() && root.join("shutdown-home/shutdown").exists());
    }

    #[test]
    fn the_api_filesystems_go_to_the_new_roots_own_directories() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        fs::create_dir(root.join("proc")).unwrap();
        let targets = api_mount_targets(root).unwrap();
        assert_eq!(targets, ["dev", "proc", "sys", "run"].map(|d| root.join(d)));
        assert!(targets.iter().all(|d| d.is_dir()), "the missing ones were made");
        for (name, make) in [("a link to /", true), ("a file", false)] {
            let root = t.path().join(name);
            fs::create_dir_all(root.join("proc")).unwrap();
            if make {
                std::os::unix::fs::symlink("/", root.join("run")).unwrap();
            } else {
                fs::write(root.join("run"), "").unwrap();
            }
            let e = api_mount_targets(&root).unwrap_err().to_string();
            assert!(
                e.contains(&format!("/run is not a directory but {name}")) && e.contains("fix:"),
                "{e}"
            );
            assert!(!root.join("dev").exists(), "nothing is made before all are checked");
        }
    }

    #[test]
    fn the_images_init_is_found_through_its_links_inside_the_new_root_only() {
        use std::os::unix::fs::{symlink, PermissionsExt};
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        // Debian's merged /usr: /sbin -> usr/sbin, /sbin/init -> /lib/systemd/systemd, /lib -> usr/lib.
        fs::create_dir_all(root.join("usr/sbin")).unwrap();
        fs::create_dir_all(root.join("usr/lib/systemd")).unwrap();
        symlink("usr/sbin", root.join("sbin")).unwrap();
        symlink("usr/lib", root.join("lib")).unwrap();
        symlink("/lib/systemd/systemd", root.join("usr/sbin/init")).unwrap();
        fs::write(root.join("usr/lib/systemd/systemd"), "").unwrap();
        fs::set_permissions(root.join("usr/lib/systemd/systemd"), fs::Permissions::from_mode(0o755)).unwrap();
        assert!(check_init(&root, "/sbin/init").is_ok());
        // An absolute link is the image's path, never the host's (/bin/sh exists here).
        symlink("/bin/sh", root.join("usr/sbin/sh-link")).unwrap();
        let e = check_init(&root, "/sbin/sh-link").unwrap_err().to_string();
        assert!(e.contains("the image has no /sbin/sh-link"), "{e}");
        // A link loop: the kernel gives up (ELOOP), and the message says what to fix.
        symlink("loop-b", root.join("usr/sbin/loop-a")).unwrap();
        symlink("loop-a", root.join("usr/sbin/loop-b")).unwrap();
        let e = check_init(&root, "/sbin/loop-a").unwrap_err().to_string();
        assert!(e.contains("cannot look up /sbin/loop-a") && e.contains("fix: "), "{e}");
        fs::write(root.join("usr/sbin/plain"), "").unwrap();
        let e = check_init(&root, "/usr/sbin/plain").unwrap_err().to_string();
        assert!(e.contains("not an executable file"), "{e}");
    }
}
