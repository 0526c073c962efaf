//! The way back at shutdown: systemd's initrd shutdown interface.
//!
//! Before the switch, /init leaves itself as `/run/initramfs/shutdown`. At the
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
/// Where the shutdown program and its directories are kept in the initramfs itself,
/// bound at [`SHUTDOWN_DIR`]; emptying the initramfs at the switch leaves it.
pub const SHUTDOWN_HOME: &str = "/.layerboot-shutdown";
const OLD_ROOT: &str = "/oldroot";

/// Leaves `program` (this /init) as `shutdown` in `dir` (`/run/initramfs`), with the
/// directories systemd-shutdown binds and pivots into: `home` (on the initramfs, beside
/// `program`) holds them and a hard link to `program`, and is bound at `dir`. Linked,
/// not copied: copying /init's 1.1 MB took 1.5 ms of CPU under emulation. systemd never
/// unmounts what is under /run/initramfs, and binds it again itself before pivoting.
pub fn prepare(program: &Path, home: &Path, dir: &Path) -> Result<()> {
    for d in ["oldroot", "proc", "sys", "dev", "run"] {
        fs::create_dir_all(home.join(d)).map_err(|e| Error::io("cannot create", home.join(d), e))?;
    }
    // `shutdown` for systemd-shutdown; `layerboot-init` for the bless unit, the boot
    // scripts and the post-switch helper, under its own name (by `shutdown`, /init would
    // shut down). Here, not in /run/layerboot: no copy in memory, and executable even
    // where the image remounts /run noexec (Debian's sysvinit does).
    for name in ["shutdown", "layerboot-init"] {
        let dest = home.join(name);
        if fs::symlink_metadata(&dest).is_err() {
            // Executable from the start: a link appears whole, where a copy would not.
            fs::hard_link(program, &dest)
                .map_err(|e| Error::io(&format!("cannot link {} to", program.display()), &dest, e))?;
        }
    }
    mount(home, dir, "", MountFlags::BIND, "")
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
        .map(unescape_mountinfo)
        .filter(|p| p == under || p.starts_with(&format!("{under}/")))
        .collect();
    points.dedup();
    // A mount below another has the longer path; stacked mounts come later in the file.
    let mut indexed: Vec<(usize, String)> = points.into_iter().enumerate().collect();
    indexed.sort_by(|(i, a), (j, b)| b.len().cmp(&a.len()).then(j.cmp(i)));
    indexed.into_iter().map(|(_, p)| PathBuf::from(p)).collect()
}

/// A `/proc/self/mountinfo` field read back: mountinfo writes space, tab, newline and
/// backslash as `\ooo`. (The builder reads mountinfo with it too.)
pub fn unescape_mountinfo(field: &str) -> String {
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
    if !["poweroff", "halt", "kexec", "reboot"].contains(&verb) {
        say(&format!("layerboot: shutdown: unknown verb '{verb}': rebooting"));
    }
    let mut modes = actions(verb).into_iter().peekable();
    while let Some(mode) = modes.next() {
        let err = reboot(mode).unwrap_err();
        let then = match modes.peek() {
            Some(next) => format!("trying {next:?}"),
            None => "halted".to_string(),
        };
        say(&format!("layerboot: shutdown: {verb}: {mode:?} failed ({err}): {then}"));
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// What the kernel is asked for at the end of a shutdown with `verb`, in order, each
/// only if the one before failed (then /init waits, halted). Only `poweroff` powers off:
/// a failed kexec reboots, and an unknown verb reboots too, as a machine that comes back
/// can be reached and one that is off needs a person.
pub fn actions(verb: &str) -> Vec<RebootMode> {
    match verb {
        "poweroff" => vec![RebootMode::RB_POWER_OFF],
        "halt" => vec![RebootMode::RB_HALT_SYSTEM],
        "kexec" => vec![RebootMode::RB_KEXEC, RebootMode::RB_AUTOBOOT],
        "reboot" => vec![RebootMode::RB_AUTOBOOT],
        _ => vec![RebootMode::RB_AUTOBOOT],
    }
}

/// What the shutdown's panic hook asks the kernel for: a reboot, unless the machine was
/// being powered off.
pub fn after_panic(verb: &str) -> RebootMode {
    if verb == "poweroff" {
        RebootMode::RB_POWER_OFF
    } else {
        RebootMode::RB_AUTOBOOT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only `poweroff` ever powers the machine off: a failed reboot or kexec, an unknown
    /// verb and a panic reboot (a machine that comes back can be reached; one that is off
    /// needs a person), and a failed halt stays halted.
    #[test]
    fn only_poweroff_powers_off_and_a_failed_reboot_or_kexec_reboots() {
        use RebootMode::*;
        assert_eq!(actions("reboot"), [RB_AUTOBOOT]);
        assert_eq!(actions("kexec"), [RB_KEXEC, RB_AUTOBOOT]);
        assert_eq!(actions("poweroff"), [RB_POWER_OFF]);
        assert_eq!(actions("halt"), [RB_HALT_SYSTEM]);
        assert_eq!(actions("suspend"), [RB_AUTOBOOT]);
        assert_eq!(actions(""), [RB_AUTOBOOT]);
        assert_eq!(after_panic("poweroff"), RB_POWER_OFF);
        for verb in ["reboot", "kexec", "halt", "", "x"] {
            assert_eq!(after_panic(verb), RB_AUTOBOOT, "{verb}");
        }
    }

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

    /// What systemd-shutdown looks for: an executable `shutdown` in a directory it can
    /// pivot into, which is /init itself (a link, not a copy), and stays after /init's
    /// own name is gone (the switch empties the initramfs).
    #[test]
    fn the_shutdown_program_is_init_itself_bound_where_systemd_looks() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let t = tempfile::tempdir().unwrap();
        let (init, home, dir) = (
            t.path().join("init"),
            t.path().join("home"),
            t.path().join("run/initramfs"),
        );
        fs::write(&init, b"\x7fELF pretend").unwrap();
        fs::set_permissions(&init, fs::Permissions::from_mode(0o755)).unwrap();
        prepare(&init, &home, &dir).unwrap();
        let shutdown = fs::metadata(dir.join("shutdown")).unwrap();
        assert_eq!(
            shutdown.ino(),
            fs::metadata(&init).unwrap().ino(),
            "a link to /init, not a copy"
        );
        assert!(shutdown.permissions().mode() & 0o111 != 0);
        for d in ["oldroot", "proc", "sys", "dev", "run"] {
            assert!(dir.join(d).is_dir(), "{d}");
        }
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !unmount_order(&info, &dir.to_string_lossy()).is_empty(),
            "{} is a mount",
            dir.display()
        );
        fs::remove_file(&init).unwrap();
        assert!(dir.join("shutdown").is_file(), "still there once /init is deleted");
        unmount(&dir).unwrap();
    }
}
