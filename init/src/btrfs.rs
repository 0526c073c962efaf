//! btrfs through its ioctls: snapshot and delete subvolumes, register the devices of a
//! multi-device filesystem and ask whether it is complete.
//!
//! These are a handful of ioctls through nix rather than btrfsutil: btrfsutil 0.2 is
//! unmaintained and would link libbtrfsutil (C, bindgen) into the static /init for the
//! same few calls.

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;

use crate::error::{Error, Result};

const BTRFS_IOCTL_MAGIC: u8 = 0x94;
const BTRFS_PATH_NAME_MAX: usize = 4087;
const BTRFS_SUBVOL_NAME_MAX: usize = 4039;
/// The inode number of every btrfs subvolume's root directory.
const BTRFS_FIRST_FREE_OBJECTID: u64 = 256;

#[repr(C)]
pub struct BtrfsVolArgs {
    fd: i64,
    name: [u8; BTRFS_PATH_NAME_MAX + 1],
}

#[repr(C)]
pub struct BtrfsVolArgsV2 {
    fd: i64,
    transid: u64,
    flags: u64,
    unused: [u64; 4],
    name: [u8; BTRFS_SUBVOL_NAME_MAX + 1],
}

nix::ioctl_write_ptr!(btrfs_snap_destroy, BTRFS_IOCTL_MAGIC, 15, BtrfsVolArgs);
nix::ioctl_write_ptr!(btrfs_snap_create_v2, BTRFS_IOCTL_MAGIC, 23, BtrfsVolArgsV2);
nix::ioctl_write_ptr!(btrfs_scan_dev, BTRFS_IOCTL_MAGIC, 4, BtrfsVolArgs);
nix::ioctl_read!(btrfs_devices_ready, BTRFS_IOCTL_MAGIC, 39, BtrfsVolArgs);

const CONTROL: &str = "/dev/btrfs-control";

fn vol_args(name: &[u8]) -> Result<Box<BtrfsVolArgs>> {
    if name.len() > BTRFS_PATH_NAME_MAX {
        return Err(Error::new(format!(
            "{} is too long for btrfs",
            String::from_utf8_lossy(name)
        )));
    }
    let mut args = Box::new(BtrfsVolArgs {
        fd: 0,
        name: [0; BTRFS_PATH_NAME_MAX + 1],
    });
    args.name[..name.len()].copy_from_slice(name);
    Ok(args)
}

/// Tells the kernel that `device` belongs to a btrfs filesystem, as `btrfs device scan`
/// (run by udev elsewhere) does; a multi-device filesystem mounts only once all are known.
pub fn scan_device(device: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let control = fs::File::open(CONTROL).map_err(|e| Error::io("cannot open", Path::new(CONTROL), e))?;
    let args = vol_args(device.as_os_str().as_bytes())?;
    // SAFETY: args is a valid btrfs_ioctl_vol_args for the call's duration.
    unsafe { btrfs_scan_dev(control.as_raw_fd(), &*args) }
        .map(drop)
        .map_err(|e| Error::new(format!("cannot register btrfs device {}: {e}", device.display())))
}

/// Whether every device of the btrfs filesystem on `device` has been registered.
pub fn devices_ready(device: &Path) -> Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let control = fs::File::open(CONTROL).map_err(|e| Error::io("cannot open", Path::new(CONTROL), e))?;
    let mut args = vol_args(device.as_os_str().as_bytes())?;
    // SAFETY: as above; the kernel writes back into args.
    match unsafe { btrfs_devices_ready(control.as_raw_fd(), &mut *args) } {
        Ok(0) => Ok(true),
        Ok(_) => Ok(false),
        Err(e) => Err(Error::new(format!(
            "cannot ask btrfs whether {} is complete: {e}",
            device.display()
        ))),
    }
}

/// A directory's descriptor (the ioctls act on it).
fn open_dir(path: &Path) -> Result<OwnedFd> {
    crate::copy::open_dir(None, path)
}

fn split(path: &Path) -> Result<(PathBuf, String)> {
    match (path.parent(), path.file_name().and_then(|n| n.to_str())) {
        (Some(p), Some(n)) => Ok((p.to_path_buf(), n.to_string())),
        _ => Err(Error::new(format!("{} has no parent directory", path.display()))),
    }
}

/// Snapshots subvolume `source` as `dest` (writable), like `btrfs subvolume snapshot`.
pub fn snapshot(source: &Path, dest: &Path) -> Result<()> {
    let (parent, name) = split(dest)?;
    if name.len() > BTRFS_SUBVOL_NAME_MAX {
        return Err(Error::new(format!("subvolume name {name} is too long")));
    }
    let src = open_dir(source)?;
    let dir = open_dir(&parent)?;
    let mut args = BtrfsVolArgsV2 {
        fd: src.as_raw_fd() as i64,
        transid: 0,
        flags: 0,
        unused: [0; 4],
        name: [0; BTRFS_SUBVOL_NAME_MAX + 1],
    };
    args.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: args is a valid, initialised btrfs_ioctl_vol_args_v2 for the call's duration.
    // A snapshot is made in a transaction commit, which waits for the disk like syncfs.
    crate::mounts::timed_flush(|| unsafe { btrfs_snap_create_v2(dir.as_raw_fd(), &args) }).map_err(|e| {
        let hint = if e == Errno::ENOTTY || e == Errno::EXDEV {
            " (the store is not on btrfs, or source and destination are different btrfs filesystems)"
        } else {
            ""
        };
        Error::new(format!(
            "cannot snapshot {} as {}: {e}{hint}",
            source.display(),
            dest.display()
        ))
    })?;
    Ok(())
}

/// Deletes subvolume `path`, including subvolumes nested in it (systemd creates some,
/// e.g. /var/lib/machines, which a plain delete would trip over).
pub fn delete(path: &Path) -> Result<()> {
    let (parent, name) = split(path)?;
    let dir = open_dir(&parent)?;
    let mut args = BtrfsVolArgs {
        fd: 0,
        name: [0; BTRFS_PATH_NAME_MAX + 1],
    };
    args.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: args is a valid btrfs_ioctl_vol_args for the call's duration.
    match crate::mounts::timed_fs(|| unsafe { btrfs_snap_destroy(dir.as_raw_fd(), &args) }) {
        Ok(_) => Ok(()),
        Err(Errno::ENOTEMPTY) => {
            for nested in nested_subvolumes(path)? {
                delete(&nested)?;
            }
            // SAFETY: as above.
            unsafe { btrfs_snap_destroy(dir.as_raw_fd(), &args) }
                .map(drop)
                .map_err(|e| Error::new(format!("cannot delete subvolume {}: {e}", path.display())))
        }
        Err(e) => Err(Error::new(format!("cannot delete subvolume {}: {e}", path.display()))),
    }
}

/// Subvolumes directly nested in subvolume `root` (not those nested in them).
fn nested_subvolumes(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in fs::read_dir(&dir).map_err(|e| Error::io("cannot list", &dir, e))? {
            let p = e.map_err(|e| Error::io("cannot list", &dir, e))?.path();
            let Ok(md) = fs::symlink_metadata(&p) else { continue };
            if !md.is_dir() {
                continue;
            }
            if md.ino() == BTRFS_FIRST_FREE_OBJECTID {
                out.push(p);
            } else {
                todo.push(p);
            }
        }
    }
    Ok(out)
}

/// Whether `path` is a btrfs subvolume: its root directory has inode 256 on btrfs (on
/// another filesystem any directory may have that number).
pub fn is_subvolume(path: &Path) -> bool {
    use nix::sys::statfs::{statfs, BTRFS_SUPER_MAGIC};
    fs::symlink_metadata(path).is_ok_and(|m| m.is_dir() && m.ino() == BTRFS_FIRST_FREE_OBJECTID)
        && statfs(path).is_ok_and(|s| s.filesystem_type() == BTRFS_SUPER_MAGIC)
}

/// The ID of the subvolume whose root is `path` (`BTRFS_IOC_INO_LOOKUP` with no tree: the
/// kernel answers with the tree of the open directory).
pub fn subvolume_id(path: &Path) -> Result<u64> {
    #[repr(C)]
    struct InoLookupArgs {
        treeid: u64,
        objectid: u64,
        name: [u8; 4080],
    }
    nix::ioctl_readwrite!(btrfs_ino_lookup, BTRFS_IOCTL_MAGIC, 18, InoLookupArgs);
    if !is_subvolume(path) {
        return Err(Error::new(format!("{} is not a btrfs subvolume", path.display())));
    }
    let dir = open_dir(path)?;
    let mut args = Box::new(InoLookupArgs {
        treeid: 0,
        objectid: BTRFS_FIRST_FREE_OBJECTID,
        name: [0; 4080],
    });
    // SAFETY: args is a valid btrfs_ioctl_ino_lookup_args the kernel writes back into.
    unsafe { btrfs_ino_lookup(dir.as_raw_fd(), &mut *args) }
        .map_err(|e| Error::io("cannot look up the subvolume of", path, e))?;
    Ok(args.treeid)
}

/// Waits until btrfs's cleaner has dropped the deleted subvolumes `ids` of the filesystem
/// at `fs_dir` (their root items gone from the root tree), which is when their space is
/// free again, as `btrfs subvolume sync` does.
pub fn wait_until_cleaned(fs_dir: &Path, ids: &[u64], timeout: Duration) -> Result<()> {
    #[repr(C)]
    struct SearchArgs {
        tree_id: u64,
        min_objectid: u64,
        max_objectid: u64,
        min_offset: u64,
        max_offset: u64,
        min_transid: u64,
        max_transid: u64,
        min_type: u32,
        max_type: u32,
        nr_items: u32,
        unused: u32,
        unused1: [u64; 4],
        buf: [u8; 4096 - 104],
    }
    nix::ioctl_readwrite!(btrfs_tree_search, BTRFS_IOCTL_MAGIC, 17, SearchArgs);
    // BTRFS_IOC_SYNC commits and, unlike syncfs, pokes the transaction thread, which wakes
    // the cleaner (else it wakes every commit interval, 30 s by default).
    nix::ioctl_none!(btrfs_sync, BTRFS_IOCTL_MAGIC, 8);
    const ROOT_TREE: u64 = 1;
    const ROOT_ITEM_KEY: u32 = 132;
    let dir = open_dir(fs_dir)?;
    let start = std::time::Instant::now();
    let mut waiting: Vec<u64> = ids.to_vec();
    while !waiting.is_empty() {
        // SAFETY: an argument-less ioctl on an open btrfs directory.
        let _ = unsafe { btrfs_sync(dir.as_raw_fd()) };
        let mut still = Vec::new();
        for &id in &waiting {
            let mut args = Box::new(SearchArgs {
                tree_id: ROOT_TREE,
                min_objectid: id,
                max_objectid: id,
                min_offset: 0,
                max_offset: u64::MAX,
                min_transid: 0,
                max_transid: u64::MAX,
                min_type: ROOT_ITEM_KEY,
                max_type: ROOT_ITEM_KEY,
                nr_items: 1,
                unused: 0,
                unused1: [0; 4],
                buf: [0; 4096 - 104],
            });
            // SAFETY: args is a valid btrfs_ioctl_search_args the kernel writes back into.
            unsafe { btrfs_tree_search(dir.as_raw_fd(), &mut *args) }
                .map_err(|e| Error::io("cannot search the root tree of", fs_dir, e))?;
            if args.nr_items > 0 {
                still.push(id);
            }
        }
        waiting = still;
        if !waiting.is_empty() {
            if start.elapsed() >= timeout {
                return Err(Error::new(format!(
                    "btrfs had not freed the space of deleted subvolumes {waiting:?} after {} s",
                    timeout.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(())
}

/// The UUIDs of the subvolume whose root is `path`: its own and the one it was
/// snapshotted from (zero if none), from `BTRFS_IOC_GET_SUBVOL_INFO` (Linux 4.18).
pub fn subvolume_uuids(path: &Path) -> Result<([u8; 16], [u8; 16])> {
    #[repr(C)]
    struct Timespec {
        sec: u64,
        nsec: u32,
    }
    #[repr(C)]
    struct SubvolInfo {
        treeid: u64,
        name: [u8; 256],
        parent_id: u64,
        dirid: u64,
        generation: u64,
        flags: u64,
        uuid: [u8; 16],
        parent_uuid: [u8; 16],
        received_uuid: [u8; 16],
        transids: [u64; 4],
        times: [Timespec; 4],
        reserved: [u64; 8],
    }
    const _: () = assert!(
        std::mem::size_of::<SubvolInfo>() == 504,
        "struct btrfs_ioctl_get_subvol_info_args"
    );
    nix::ioctl_read!(btrfs_get_subvol_info, BTRFS_IOCTL_MAGIC, 60, SubvolInfo);
    if !is_subvolume(path) {
        return Err(Error::new(format!("{} is not a btrfs subvolume", path.display())));
    }
    let dir = open_dir(path)?;
    // SAFETY: all-zero is a valid SubvolInfo (plain integers); the kernel fills it in.
    let mut info: Box<SubvolInfo> = Box::new(unsafe { std::mem::zeroed() });
    // SAFETY: info is a valid btrfs_ioctl_get_subvol_info_args the kernel writes into.
    unsafe { btrfs_get_subvol_info(dir.as_raw_fd(), &mut *info) }
        .map_err(|e| Error::io("cannot read the subvolume info of", path, e))?;
    Ok((info.uuid, info.parent_uuid))
}
