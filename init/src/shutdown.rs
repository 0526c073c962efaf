//! The way back at shutdown: systemd's initrd shutdown interface.
//!
//! Before the switch, /init leaves a copy of itself as `/run/initramfs/shutdown`. At the
//! very end of a shutdown, systemd-shutdown pivots into `/run/initramfs` (the old root
//! then at `/oldroot`, /dev /proc /sys /run bound in) and executes it as PID 1 with the
//! verb (`reboot`, `poweroff`, `halt`, `kexec`). Only from there can the image's root
//! (an overlay or a btrfs subvolume) and then the store's filesystem under it be
//! unmounted: from inside, the root can only be made read-only, which leaves an overlay
//! root's upper filesystem, the store, mounted read-write and its journal dirty.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::reboot::{reboot, RebootMode};
use sys_mount::MountFlags;

use crate::console::say;
use crate::error::{Error, Result};
use crate::mounts::{mount, remount_read_only_and_detach, unmount};

pub const SHUTDOWN_DIR: &str = "/run/initramfs";
const OLD_ROOT: &str = "/oldroot";

/// Leaves a copy of `program` (this /init) as `/run/initramfs/shutdown`, with the
/// directories systemd-shutdown binds and pivots into.
pub fn prepare(program: &Path) -> Result<()> {
    let dir = Path::new(SHUTDOWN_DIR);
    for d in ["oldroot", "proc", "sys", "dev", "run"] {
        fs::create_dir_all(dir.join(d)).map_err(|e| Error::io("cannot create", dir.join(d), e))?;
    }
    let (tmp, dest) = (dir.join(".shutdown.tmp"), dir.join("shutdown"));
    fs::copy(program, &tmp).map_err(|e| Error::io(&format!("cannot copy {} to", program.display()), &tmp, e))?;
    fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .map_err(|e| Error::io("cannot chmod", &tmp, e))?;
    // Executable only once complete: systemd-shutdown checks for it at the last moment.
    fs::rename(&tmp, &dest).map_err(|e| Error::io("cannot rename", &dest, e))
}

/// Whether this process was started as the shutdown program (by its name).
pub fn is_shutdown(argv0: &str) -> bool {
    Path::new(argv0).file_name().is_some_and(|n| n == "shutdown")
}

/// The mount points at or under `under`, deepest first, from `/proc/self/mountinfo`'s text.
pub fn unmount_order(mountinfo: &str, under: &str) -> Vec<PathBuf> {
    let mut points: Vec<String> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .filter(|p| p == under || p.starts_with(&format!("{under}/")))
        .collect();
    points.dedup();
    // A mount below another has the longer path; stacked mounts come later in the file.
    let mut indexed: Vec<(usize, String)> = points.into_iter().enumerate().collect();
    indexed.sort_by(|(i, a), (j, b)| b.len().cmp(&a.len()).then(j.cmp(i)));
    indexed.into_iter().map(|(_, p)| PathBuf::from(p)).collect()
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmounts everything under /oldroot, deepest first, pass after pass while that
/// helps; what stays busy is made read-only and detached. Returns what was not cleanly
/// unmounted.
fn unmount_old_root() -> Vec<String> {
    let mut left = Vec::new();
    for _pass in 0..5 {
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let points = unmount_order(&info, OLD_ROOT);
        if points.is_empty() {
            return Vec::new();
        }
        left.clear();
        let mut progress = false;
        for p in points {
            match unmount(&p) {
                Ok(()) => progress = true,
                Err(e) => left.push((p, e)),
            }
        }
        if !progress {
            break;
        }
    }
    left.into_iter()
        .map(|(p, e)| {
            remount_read_only_and_detach(&p);
            e.to_string()
        })
        .collect()
}

/// PID 1 at the end of a shutdown: unmount, flush, then do what `verb` asks. Never returns.
pub fn run(verb: &str) -> ! {
    if !Path::new("/proc/self/mountinfo").exists() {
        let _ = mount(Path::new("proc"), Path::new("/proc"), "proc", MountFlags::empty(), "");
    }
    let left = unmount_old_root();
    if left.is_empty() {
        say("layerboot: shutdown: the image's root and the store are unmounted cleanly");
    } else {
        say(&format!(
            "layerboot: shutdown: still busy, made read-only and detached: {}",
            left.join(", ")
        ));
    }
    nix::unistd::sync();
    let mode = match verb {
        "reboot" => RebootMode::RB_AUTOBOOT,
        "halt" => RebootMode::RB_HALT_SYSTEM,
        "kexec" => RebootMode::RB_KEXEC,
        "poweroff" => RebootMode::RB_POWER_OFF,
        other => {
            say(&format!("layerboot: shutdown: unknown verb '{other}': powering off"));
            RebootMode::RB_POWER_OFF
        }
    };
    let err = reboot(mode).unwrap_err();
    say(&format!("layerboot: shutdown: {verb} failed ({err}): powering off"));
    let _ = reboot(RebootMode::RB_POWER_OFF);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_old_root_is_unmounted_deepest_first_and_nothing_else() {
        let info = "\
22 1 0:20 / / rw - tmpfs tmpfs rw
30 22 0:30 / /oldroot rw - overlay overlay rw,lowerdir=l/A
31 30 0:21 / /oldroot/run rw - tmpfs tmpfs rw
32 31 254:0 / /oldroot/run/layerboot/store rw - ext4 /dev/vda rw
33 30 0:40 / /oldroot/mnt/with\\040space rw - tmpfs tmpfs rw
34 22 0:5 / /proc rw - proc proc rw
35 22 0:41 / /oldroots rw - tmpfs tmpfs rw
";
        let order: Vec<String> = unmount_order(info, "/oldroot")
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        assert_eq!(
            order,
            [
                "/oldroot/run/layerboot/store",
                "/oldroot/mnt/with space",
                "/oldroot/run",
                "/oldroot"
            ]
        );
        assert!(is_shutdown("/shutdown") && is_shutdown("shutdown") && !is_shutdown("/init"));
    }
}
