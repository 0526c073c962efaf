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

/// `mount -t fstype -o options source target` with options as a user writes them
/// (`rootflags=`, `toplayerflags=`): see [`UserOptions`]. `base` are the flags /init
/// mounts with anyway (read-only, say), which the options add to.
pub fn mount_with_options(
    source: &Path,
    target: &Path,
    fstype: &str,
    base: MountFlags,
    options: &[String],
) -> Result<()> {
    let options = UserOptions::parse(options);
    mount(source, target, fstype, options.flags(base), &options.data())
}

/// Mount options split as mount(8) splits them: the per-mount flags (`noatime`, `nodev`,
/// `nosuid`, `noexec`, …) become mount flags, the rest goes to the filesystem as data.
/// The kernel reads `ro`, `rw`, `sync` and the like from the data itself, but not the
/// per-mount flags: btrfs refuses `noatime` as an unknown option, and initramfs-tools
/// and dracut accept it in `rootflags=`.
#[derive(Debug, PartialEq)]
pub struct UserOptions {
    set: MountFlags,
    cleared: MountFlags,
    data: Vec<String>,
}

impl UserOptions {
    pub fn parse(options: &[String]) -> UserOptions {
        let atime = MountFlags::NOATIME | MountFlags::RELATIME | MountFlags::STRICTATIME;
        let mut o = UserOptions {
            set: MountFlags::empty(),
            cleared: MountFlags::empty(),
            data: Vec::new(),
        };
        for option in options {
            // (flags set, flags cleared): as with mount(8), a later word wins.
            let (set, cleared) = match option.as_str() {
                "nosuid" => (MountFlags::NOSUID, MountFlags::empty()),
                "suid" => (MountFlags::empty(), MountFlags::NOSUID),
                "nodev" => (MountFlags::NODEV, MountFlags::empty()),
                "dev" => (MountFlags::empty(), MountFlags::NODEV),
                "noexec" => (MountFlags::NOEXEC, MountFlags::empty()),
                "exec" => (MountFlags::empty(), MountFlags::NOEXEC),
                "nodiratime" => (MountFlags::NODIRATIME, MountFlags::empty()),
                "diratime" => (MountFlags::empty(), MountFlags::NODIRATIME),
                // One access-time policy at a time: the last one named.
                "noatime" => (MountFlags::NOATIME, atime - MountFlags::NOATIME),
                "relatime" => (MountFlags::RELATIME, atime - MountFlags::RELATIME),
                "strictatime" => (MountFlags::STRICTATIME, atime - MountFlags::STRICTATIME),
                "atime" => (MountFlags::empty(), MountFlags::NOATIME),
                "norelatime" => (MountFlags::empty(), MountFlags::RELATIME),
                "nostrictatime" => (MountFlags::empty(), MountFlags::STRICTATIME),
                // fstab's words for "nothing special", which no filesystem takes as data.
                "defaults" => continue,
                _ => {
                    o.data.push(option.clone());
                    continue;
                }
            };
            o.set = (o.set - cleared) | set;
            o.cleared = (o.cleared - set) | cleared;
        }
        o
    }

    /// The flags to mount with: `base`, with the options' flags set or cleared.
    pub fn flags(&self, base: MountFlags) -> MountFlags {
        (base - self.cleared) | self.set
    }

    /// What goes to the filesystem, comma-separated.
    pub fn data(&self) -> String {
        self.data.join(",")
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(options: &str) -> UserOptions {
        UserOptions::parse(&options.split(',').map(str::to_string).collect::<Vec<_>>())
    }

    #[test]
    fn per_mount_flags_become_flags_and_the_rest_stays_data() {
        let o = parse("noatime,compress=zstd,nodev,defaults,ro,subvolid=5");
        assert_eq!(o.flags(MountFlags::empty()), MountFlags::NOATIME | MountFlags::NODEV);
        // `ro` the kernel reads from the data itself.
        assert_eq!(o.data(), "compress=zstd,ro,subvolid=5");
    }

    #[test]
    fn a_later_word_wins_and_base_flags_are_kept_unless_cleared() {
        assert_eq!(
            parse("noatime,relatime").flags(MountFlags::empty()),
            MountFlags::RELATIME
        );
        assert_eq!(
            parse("strictatime,noatime").flags(MountFlags::empty()),
            MountFlags::NOATIME
        );
        assert_eq!(parse("nodev,dev").flags(MountFlags::empty()), MountFlags::empty());
        assert_eq!(parse("dev,nodev").flags(MountFlags::empty()), MountFlags::NODEV);
        assert_eq!(
            parse("nosuid").flags(MountFlags::RDONLY | MountFlags::NOEXEC),
            MountFlags::RDONLY | MountFlags::NOEXEC | MountFlags::NOSUID
        );
        assert_eq!(parse("exec").flags(MountFlags::NOEXEC), MountFlags::empty());
        assert_eq!(parse("atime").flags(MountFlags::NOATIME), MountFlags::empty());
    }

    #[test]
    fn no_options_is_no_data() {
        let o = UserOptions::parse(&[]);
        assert_eq!(
            (o.flags(MountFlags::RDONLY), o.data()),
            (MountFlags::RDONLY, String::new())
        );
    }
}
