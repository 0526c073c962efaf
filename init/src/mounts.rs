//! Mount helpers over sys-mount, with errors that name the device, the target and the fix.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sys_mount::{FilesystemType, Mount, MountFlags, UnmountFlags};

use crate::error::{Error, Result};

/// Microseconds spent in the kernel mounting and snapshotting, to tell /init's own work
/// apart from the filesystems' in the boot's timing line.
static FS_MICROS: AtomicU64 = AtomicU64::new(0);

pub fn fs_time() -> Duration {
    Duration::from_micros(FS_MICROS.load(Ordering::Relaxed))
}

/// Runs a filesystem operation, adding its duration to [`fs_time`].
pub fn timed_fs<T>(f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let r = crate::cost::kernel_work(f);
    FS_MICROS.fetch_add(start.elapsed().as_micros() as u64, Ordering::Relaxed);
    r
}

/// Microseconds of [`fs_time`] that /init slept while the disk committed writes (syncfs,
/// a btrfs snapshot's transaction commit): disk waits that run in real time even when
/// the guest's clock counts instructions, and that a read-only boot never makes, so the
/// benchmark shows them on their own.
static FLUSH_MICROS: AtomicU64 = AtomicU64::new(0);

pub fn flush_time() -> Duration {
    Duration::from_micros(FLUSH_MICROS.load(Ordering::Relaxed))
}

/// Runs a filesystem operation that commits writes to the disk (syncfs, a btrfs
/// snapshot); the time it sleeps (its duration less the CPU it used) adds to
/// [`flush_time`], the CPU stays the filesystem's work.
pub fn timed_flush<T>(f: impl FnOnce() -> T) -> T {
    let (start, cpu) = (Instant::now(), crate::cost::process_cpu());
    let r = timed_fs(f);
    let slept = start
        .elapsed()
        .saturating_sub(crate::cost::process_cpu().saturating_sub(cpu));
    FLUSH_MICROS.fetch_add(slept.as_micros() as u64, Ordering::Relaxed);
    r
}

/// `mount -t fstype -o data source target`.
pub fn mount(source: &Path, target: &Path, fstype: &str, flags: MountFlags, data: &str) -> Result<()> {
    std::fs::create_dir_all(target).map_err(|e| Error::io("cannot create mount point", target, e))?;
    timed_fs(|| {
        Mount::builder()
            .fstype(FilesystemType::Manual(fstype))
            .flags(flags)
            .data(data)
            .mount(source, target)
    })
    .map(drop)
    .map_err(|e| {
        let hint = match e.raw_os_error() {
            Some(nix::libc::ENODEV) => format!(" (the kernel has no {fstype} driver: is its module in the initramfs?)"),
            Some(nix::libc::EINVAL) => format!(" (check the mount options '{data}' and that it is really {fstype})"),
            _ => String::new(),
        };
        Error::new(format!(
            "cannot mount {} ({fstype}) on {}: {e}{hint}",
            source.display(),
            target.display()
        ))
        .with_errno(e.raw_os_error().map(nix::errno::Errno::from_raw))
    })
}

/// `mount --move source target`.
pub fn move_mount(source: &Path, target: &Path) -> Result<()> {
    Mount::builder()
        .fstype(FilesystemType::Manual(""))
        .flags(MountFlags::MOVE)
        .mount(source, target)
        .map(drop)
        .map_err(|e| {
            Error::new(format!(
                "cannot move mount {} to {}: {e}",
                source.display(),
                target.display()
            ))
        })
}

/// Makes the mount at `target` and everything below it private (no propagation).
/// sys-mount sets propagation only on mounts it made itself, so this is plain mount(2).
pub fn make_private(target: &Path) -> Result<()> {
    use nix::mount::MsFlags;
    nix::mount::mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| Error::new(format!("cannot make {} private: {e}", target.display())))
}

/// For a mount still busy at shutdown: read-only (nothing more is written), then
/// detached. Best effort: there is nothing left to do if either fails.
pub fn remount_read_only_and_detach(target: &Path) {
    let _ = Mount::builder()
        .fstype(FilesystemType::Manual(""))
        .flags(MountFlags::REMOUNT | MountFlags::RDONLY)
        .mount("", target);
    let _ = sys_mount::unmount(target, UnmountFlags::DETACH);
}

pub fn unmount(target: &Path) -> Result<()> {
    sys_mount::unmount(target, UnmountFlags::empty())
        .map_err(|e| Error::new(format!("cannot unmount {}: {e}", target.display())))
}
