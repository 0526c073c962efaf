//! Blessing a boot that its boot loader counts, without installing anything in the image.
//!
//! Before the switch, /init leaves itself as `/run/initramfs/layerboot-init` and, for a
//! systemd image booted through UEFI or from a GRUB deployment, a unit under
//! `/run/systemd/system` (our /run becomes the image's). The unit runs only if the boot
//! is counted: systemd-boot set `LoaderBootCountPath` (checked by the unit's condition,
//! once systemd has mounted efivarfs, which the initramfs does not need), or the entry is
//! a GRUB deployment's (`layerboot.grub=`). Once the boot is good (`boot-complete.target`
//! and `multi-user.target` reached) it runs `layerboot-init --bless`, which stops the
//! boot's reboot deadline (`deadline.rs`), mounts the ESP and renames systemd-boot's
//! entry to its name without a counter, or sets the deployment's variable in layerboot's
//! grubenv to `good`. A boot that does not get there within `layerboot.bless_timeout=`
//! is rebooted by the post-switch helper, and uses up one more try. Images with
//! `systemd-bless-boot` rename the same file: whichever comes second finds it renamed
//! and is content.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sys_mount::MountFlags;

use crate::bootcount::{Assessment, EntryName};
use crate::error::{Error, Result};
use crate::esp_lock;
use crate::grubenv;
use crate::mounts::{mount, unmount};
use crate::settings::{arg, parse_cmdline};

/// The Boot Loader Interface's vendor GUID, for the loader's EFI variables.
pub const LOADER_GUID: &str = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";
const EFIVARS: &str = "/sys/firmware/efi/efivars";
pub const UNIT: &str = "layerboot-bless.service";
/// Where /init leaves a copy of itself for the unit (and for the shutdown, linked).
pub const PROGRAM: &str = "/run/initramfs/layerboot-init";
const ESP_MOUNT: &str = "/run/layerboot/esp";

/// An EFI variable's string: 4 bytes of attributes, then UTF-16LE up to a NUL.
pub fn efi_string(raw: &[u8]) -> Option<String> {
    let units: Vec<u16> = raw
        .get(4..)?
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16(&units).ok().filter(|s| !s.is_empty())
}

/// A string variable the boot loader set (`LoaderEntrySelected`, …), if it did.
pub fn loader_variable(name: &str) -> Option<String> {
    let raw = fs::read(loader_variable_path(name)).ok()?;
    efi_string(&raw)
}

/// The counted entry of this boot, from the ESP's root (`loader/entries/ID+1-1.conf`):
/// only a plain path inside `loader/entries`, whatever the variable holds.
pub fn entry_path(loader_path: &str) -> Option<PathBuf> {
    let rel = loader_path.replace('\\', "/");
    let rel = rel.trim_start_matches('/');
    let name = rel.strip_prefix("loader/entries/")?;
    let plain = !name.is_empty() && !name.contains('/') && name != "." && name != "..";
    (plain && EntryName::parse(name).is_some()).then(|| Path::new("loader/entries").join(name))
}

/// How this boot is counted, as far as the command line and firmware tell before the
/// switch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Counting {
    /// Booted through UEFI: systemd-boot may count it (`LoaderBootCountPath`).
    Loader,
    /// A GRUB deployment's entry: its variable in the grubenv on the ESP `esp` (a device
    /// spec: `LABEL=`, `PARTUUID=`, `UUID=`, `PARTLABEL=`, `/dev/…`).
    Grub { deployment: String, esp: String },
}

impl Counting {
    pub fn of(cmdline: &std::collections::BTreeMap<String, String>, uefi: bool) -> Option<Counting> {
        match (cmdline.get(arg::GRUB_DEPLOYMENT), cmdline.get(arg::ESP)) {
            (Some(d), Some(esp)) if grubenv::tries_variable(d).is_some() => Some(Counting::Grub {
                deployment: d.clone(),
                esp: esp.clone(),
            }),
            _ if uefi => Some(Counting::Loader),
            _ => None,
        }
    }
}

/// A loader variable's file name in efivarfs.
pub fn loader_variable_name(name: &str) -> String {
    format!("{name}-{LOADER_GUID}")
}

fn loader_variable_path(name: &str) -> PathBuf {
    Path::new(EFIVARS).join(loader_variable_name(name))
}

/// The unit that blesses the boot once it is good. It only blesses: the reboot of a boot
/// that never gets good is the post-switch helper's deadline (`deadline.rs`), which a
/// failed `boot-complete.target` or emergency mode cannot cancel as they cancel this job.
pub fn unit(counting: &Counting) -> String {
    let condition = match counting {
        Counting::Loader => format!(
            "ConditionPathExists={}\n",
            loader_variable_path("LoaderBootCountPath").display()
        ),
        Counting::Grub { .. } => String::new(),
    };
    format!(
        "# Written by layerboot's /init for this boot only (it lives in /run).\n\
         [Unit]\nDescription=layerboot: mark this boot good for the boot loader\nDefaultDependencies=no\n\
         Requires=boot-complete.target\nAfter=local-fs.target boot-complete.target multi-user.target\n\
         Conflicts=shutdown.target\nBefore=shutdown.target\n{condition}\n\
         [Service]\nType=oneshot\nRemainAfterExit=yes\nStandardOutput=journal+console\n\
         ExecStart={PROGRAM} --bless\n"
    )
}

/// The unit that stops the deadline when a shutdown starts (a person's reboot or
/// poweroff must stay what it is). Wanted by `shutdown.target`, which every reboot,
/// poweroff, halt and kexec starts; the deadline's own reboot starts it too, too late
/// to stop that one.
pub const STAND_DOWN_UNIT: &str = "layerboot-deadline-stop.service";

pub fn stand_down_unit() -> String {
    format!(
        "# Written by layerboot's /init for this boot only (it lives in /run).\n\
         [Unit]\nDescription=layerboot: a shutdown stops this boot's reboot deadline\nDefaultDependencies=no\n\n\
         [Service]\nType=oneshot\nExecStart={PROGRAM} --stand-down shutdown\n"
    )
}

/// A drop-in for `emergency.service` and `rescue.service`: the console says when the
/// machine reboots and how to stay, before the shell asks for a password.
pub fn notice_dropin() -> String {
    format!(
        "# Written by layerboot's /init for this boot only (it lives in /run).\n\
         [Service]\nExecStartPre=-{PROGRAM} --deadline-notice\n"
    )
}

/// Whether the image's init at `init` (inside `new_root`) is systemd: its links followed
/// inside the new root at every level, as the exec after the switch follows them.
pub fn is_systemd(new_root: &Path, init: &str) -> bool {
    match crate::switch::path_in_root(new_root, init) {
        Ok(Some(target)) => target.file_name().is_some_and(|n| n == "systemd"),
        // Kernels before 5.6 have no openat2: the links resolved by hand, inside the image.
        Err(nix::errno::Errno::ENOSYS) => crate::lookup::MergedView::from_dirs(vec![new_root.to_path_buf()])
            .lookup_follow(init)
            .ok()
            .flatten()
            .is_some_and(|e| e.image_path.rsplit('/').next() == Some("systemd")),
        _ => false,
    }
}

/// Before the switch, for a boot the loader may count: /init's copy for the helper and
/// the units; for a systemd image, the bless unit and, with a `deadline`, what stops it
/// at shutdown and what names it in emergency and rescue mode. Nothing in
/// `/run/systemd/system` for other inits: that directory is how every program tells
/// that systemd runs (`sd_booted()`), and Debian's init scripts would hand every
/// service to a `systemctl` with no systemd. Returns whether the image's init is
/// systemd (else its own boot scripts must bless: `layerboot bless`).
pub fn prepare(run: &Path, new_root: &Path, init: &str, counting: &Counting, deadline: bool) -> Result<bool> {
    let program = run.join(PROGRAM.trim_start_matches("/run/"));
    let units = run.join("systemd/system");
    let write = |rel: &str, text: String| {
        let path = units.join(rel);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(|e| Error::io("cannot create", dir, e))?;
        }
        fs::write(&path, text).map_err(|e| Error::io("cannot write", &path, e))
    };
    let want = |target: &str, unit: &str| {
        let wants = units.join(format!("{target}.wants"));
        fs::create_dir_all(&wants).map_err(|e| Error::io("cannot create", &wants, e))?;
        let link = wants.join(unit);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(format!("../{unit}"), &link).map_err(|e| Error::io("cannot link", &link, e))
    };
    // Left by the shutdown's preparation, beside its program (`shutdown::prepare`).
    if !program.exists() {
        return Err(Error::new(format!(
            "{} is missing (the shutdown's directory could not be prepared)",
            program.display()
        )));
    }
    if !is_systemd(new_root, init) {
        return Ok(false);
    }
    write(UNIT, unit(counting))?;
    want("multi-user.target", UNIT)?;
    if deadline {
        write(STAND_DOWN_UNIT, stand_down_unit())?;
        want("shutdown.target", STAND_DOWN_UNIT)?;
        for service in ["emergency.service", "rescue.service"] {
            write(&format!("{service}.d/layerboot-deadline.conf"), notice_dropin())?;
        }
    }
    Ok(true)
}

/// How long the bless waits for a `layerboot` command changing the ESP (a deploy holds
/// it for its writes only, seconds). Past it, this boot stays counted: one try is used.
const LOCK_PATIENCE: Duration = Duration::from_secs(120);

/// `layerboot-init --bless`, in the booted system: renames the counted entry on the ESP
/// to its blessed name. Returns what it did, for the journal.
pub fn run() -> Result<String> {
    let cmdline = parse_cmdline(&fs::read_to_string("/proc/cmdline").unwrap_or_default());
    if let Some(Counting::Grub { deployment, esp }) = Counting::of(&cmdline, false) {
        let device = device_of(&esp)?;
        let mount_point = Path::new(ESP_MOUNT);
        mount_esp(&device, mount_point, ESP_FSTYPE)?;
        let result =
            esp_lock::lock(mount_point, Some(LOCK_PATIENCE)).and_then(|_held| bless_grubenv(mount_point, &deployment));
        let _ = unmount(mount_point);
        return result;
    }
    let loader_path = loader_variable("LoaderBootCountPath")
        .ok_or("this boot is not counted (the boot loader set no LoaderBootCountPath): nothing to bless")?;
    let entry = entry_path(&loader_path).ok_or_else(|| {
        format!("LoaderBootCountPath '{loader_path}' is not an entry in /loader/entries: not touching it")
    })?;
    let uuid = loader_variable("LoaderDevicePartUUID")
        .ok_or("the boot loader did not say which partition is the ESP (no LoaderDevicePartUUID)")?;
    let device = loader_device(&uuid)?;
    if !device.exists() {
        return Err(format!(
            "the ESP {} is not there (fix: check that udev runs in the image)",
            device.display()
        )
        .into());
    }
    let esp = Path::new(ESP_MOUNT);
    mount_esp(&device, esp, ESP_FSTYPE)?;
    let result = esp_lock::lock(esp, Some(LOCK_PATIENCE)).and_then(|_held| bless_at(esp, &entry));
    let _ = unmount(esp);
    result
}

/// The ESP's filesystem.
pub const ESP_FSTYPE: &str = "vfat";

/// Mounts the ESP `device` at `at` as the bless service and the `layerboot` commands do:
/// nosuid, nodev, noexec. `fstype`: [`ESP_FSTYPE`] (a test mounts another).
pub fn mount_esp(device: &Path, at: &Path, fstype: &str) -> Result<()> {
    mount(
        device,
        at,
        fstype,
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        "",
    )
}

/// `8-4-4-4-12` hex digits, as systemd-boot writes LoaderDevicePartUUID.
pub fn is_guid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups.iter().all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The node of the partition the loader's `LoaderDevicePartUUID` names, through udev's
/// links: a GUID, nothing else, as the variable's text becomes a path. Nothing is looked at.
pub fn loader_device(uuid: &str) -> Result<PathBuf> {
    let uuid = uuid.to_ascii_lowercase();
    if !is_guid(&uuid) {
        return Err(format!("LoaderDevicePartUUID '{uuid}' is not a partition GUID: not touching it").into());
    }
    Ok(PathBuf::from(format!("/dev/disk/by-partuuid/{uuid}")))
}

/// The device node a `layerboot.esp=` spec names (`LABEL=`, `UUID=`, `PARTUUID=`,
/// `PARTLABEL=`, `/dev/…`), through udev's links; never one with `..` in it. Nothing is
/// looked at.
pub fn device_path(spec: &str) -> Result<PathBuf> {
    let link = |dir: &str, v: &str| PathBuf::from(format!("/dev/disk/{dir}/{v}"));
    let path = match spec.split_once('=') {
        Some(("LABEL", v)) => link("by-label", v),
        Some(("UUID", v)) => link("by-uuid", &v.to_ascii_lowercase()),
        Some(("PARTUUID", v)) => link("by-partuuid", &v.to_ascii_lowercase()),
        Some(("PARTLABEL", v)) => link("by-partlabel", v),
        _ if spec.starts_with("/dev/") => PathBuf::from(spec),
        _ => {
            return Err(format!(
                "{}={spec}: not a device (use LABEL=, UUID=, PARTUUID=, PARTLABEL= or /dev/…)",
                arg::ESP
            )
            .into())
        }
    };
    if path.components().any(|c| c == std::path::Component::ParentDir) {
        return Err(format!("{}={spec}: a device path with '..' in it is refused", arg::ESP).into());
    }
    Ok(path)
}

/// The device node a `layerboot.esp=` spec names, which must be there (the booted system
/// has udev).
pub fn device_of(spec: &str) -> Result<PathBuf> {
    let path = device_path(spec)?;
    if !path.exists() {
        return Err(format!("the ESP {spec} ({}) is not there ({}=)", path.display(), arg::ESP).into());
    }
    Ok(path)
}

/// Who named this boot's ESP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EspNamedBy {
    /// `layerboot.esp=` on the kernel command line (a GRUB deployment's entry has it).
    CommandLine,
    /// The boot loader's `LoaderDevicePartUUID` (systemd-boot sets it).
    Loader,
}

impl std::fmt::Display for EspNamedBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EspNamedBy::CommandLine => write!(f, "{}= on the kernel command line", arg::ESP),
            EspNamedBy::Loader => f.write_str("the boot loader's LoaderDevicePartUUID"),
        }
    }
}

/// Which device is this boot's ESP, and who named it: `layerboot.esp=` from the kernel
/// command line (`cmdline_esp`; what the entry says, and the only word GRUB leaves), else
/// the loader's `LoaderDevicePartUUID` (`loader_uuid`). `None` when neither names one; an
/// error when the one that counts is malformed (never a fallback past it). Pure: nothing
/// is looked at, so the caller checks that the node is there.
pub fn esp_device(cmdline_esp: Option<&str>, loader_uuid: Option<&str>) -> Result<Option<(PathBuf, EspNamedBy)>> {
    if let Some(spec) = cmdline_esp {
        return Ok(Some((device_path(spec)?, EspNamedBy::CommandLine)));
    }
    match loader_uuid {
        Some(uuid) => Ok(Some((loader_device(uuid)?, EspNamedBy::Loader))),
        None => Ok(None),
    }
}

/// [`esp_device`] for the running boot: its `/proc/cmdline` and the loader's variable.
pub fn this_boots_esp() -> Result<Option<(PathBuf, EspNamedBy)>> {
    let cmdline = parse_cmdline(&fs::read_to_string("/proc/cmdline").unwrap_or_default());
    esp_device(
        cmdline.get(arg::ESP).map(String::as_str),
        loader_variable("LoaderDevicePartUUID").as_deref(),
    )
}

/// Sets the deployment's variable in layerboot's grubenv on the ESP at `esp` to `good`,
/// the block rewritten whole (1024 bytes, as GRUB's save_env expects), durably.
pub fn bless_grubenv(esp: &Path, deployment: &str) -> Result<String> {
    let var = grubenv::tries_variable(deployment).ok_or("not a deployment id")?;
    let path = esp.join("layerboot/grubenv");
    // One byte more than a block at most: a larger file is no block, and is not read whole.
    let mut block = Vec::with_capacity(grubenv::SIZE + 1);
    fs::File::open(&path)
        .and_then(|f| std::io::Read::read_to_end(&mut std::io::Read::take(f, grubenv::SIZE as u64 + 1), &mut block))
        .map_err(|e| Error::io("cannot read", &path, e))?;
    let mut vars = grubenv::parse(&block)?;
    if grubenv::get(&vars, &var) == Some("good") {
        return Ok(format!("layerboot: deployment {deployment} is blessed already"));
    }
    grubenv::set(&mut vars, &var, "good");
    if !grubenv::rewrite_in_place(&path, &grubenv::render(&vars)?)? {
        return Err(format!(
            "{} is not a GRUB environment block of {} bytes",
            path.display(),
            grubenv::SIZE
        )
        .into());
    }
    Ok(format!(
        "layerboot: boot blessed: deployment {deployment} is good in {}",
        path.display()
    ))
}

/// Renames `entry` (from the ESP's root at `esp`) to its blessed name, durably.
pub fn bless_at(esp: &Path, entry: &Path) -> Result<String> {
    let name = entry.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let parsed = EntryName::parse(name).ok_or_else(|| format!("{name} is not a boot loader entry"))?;
    let blessed = EntryName {
        id: parsed.id.clone(),
        assessment: Assessment::Good,
    };
    let (from, to) = (esp.join(entry), esp.join(entry).with_file_name(blessed.file_name()));
    match fs::rename(&from, &to) {
        // FAT writes the renamed entry's start and size with the file: flush it.
        Ok(()) => fs::File::open(&to)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io("cannot flush", &to, e))?,
        // systemd-bless-boot, or an earlier run, got there first.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && to.exists() => {
            return Ok(format!("layerboot: {} is blessed already", blessed.file_name()))
        }
        Err(e) => return Err(Error::io("cannot rename", &from, e)),
    }
    let dir = to.parent().unwrap_or(esp);
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("cannot flush", dir, e))?;
    Ok(format!(
        "layerboot: boot blessed: {name} is now {}",
        blessed.file_name()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn var(s: &str) -> Vec<u8> {
        let mut raw = vec![7, 0, 0, 0];
        for u in s.encode_utf16().chain([0]) {
            raw.extend(u.to_le_bytes());
        }
        raw
    }

    #[test]
    fn the_loaders_variables_read_as_utf16_after_their_attributes() {
        assert_eq!(
            efi_string(&var("\\loader\\entries\\x+1-1.conf")).as_deref(),
            Some("\\loader\\entries\\x+1-1.conf")
        );
        assert_eq!(efi_string(&[7, 0, 0]), None);
        assert_eq!(efi_string(&var("")), None);
        // An odd trailing byte is ignored, not a panic.
        let mut odd = var("ab");
        odd.push(0x41);
        assert_eq!(efi_string(&odd).as_deref(), Some("ab"));
    }

    #[test]
    fn only_a_plain_entry_in_loader_entries_is_ever_renamed() {
        assert_eq!(
            entry_path("\\loader\\entries\\layerboot-000002-abc+2-1.conf"),
            Some(PathBuf::from("loader/entries/layerboot-000002-abc+2-1.conf"))
        );
        for bad in [
            "\\loader\\entries\\..\\..\\EFI\\BOOT\\BOOTX64.EFI",
            "\\loader\\entries\\sub\\x+1.conf",
            "\\EFI\\x+1.conf",
            "\\loader\\entries\\",
            "\\loader\\entries\\x+1.efi",
        ] {
            assert_eq!(entry_path(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_grub_deployment_is_blessed_in_its_grubenv_and_only_its_variable_changes() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("layerboot")).unwrap();
        let vars = vec![
            ("lb_aaa".to_string(), "2".to_string()),
            ("lb_bbb".to_string(), "good".to_string()),
        ];
        fs::write(t.path().join("layerboot/grubenv"), grubenv::render(&vars).unwrap()).unwrap();
        assert!(bless_grubenv(t.path(), "aaa").unwrap().contains("good"));
        let after = grubenv::parse(&fs::read(t.path().join("layerboot/grubenv")).unwrap()).unwrap();
        assert_eq!(
            after,
            [
                ("lb_aaa".to_string(), "good".to_string()),
                ("lb_bbb".to_string(), "good".to_string())
            ]
        );
        assert!(bless_grubenv(t.path(), "aaa").unwrap().contains("already"));
        assert!(bless_grubenv(t.path(), "../x").is_err());
        // A huge file in its place is refused after one block's worth of reading, untouched.
        let env = t.path().join("layerboot/grubenv");
        fs::File::create(&env).unwrap().set_len(8 << 30).unwrap();
        let e = bless_grubenv(t.path(), "aaa").unwrap_err().to_string();
        assert!(e.contains("more than 1024 bytes"), "{e}");
        assert_eq!(fs::metadata(&env).unwrap().len(), 8 << 30);
    }

    #[test]
    fn only_a_guid_names_the_esp() {
        assert!(is_guid("6c0ad6b0-5d1f-4a43-9f52-1a7e2b0c3d4e"));
        for bad in [
            "../../sda",
            "6c0ad6b0-5d1f-4a43-9f52-1a7e2b0c3d4",
            "6c0ad6b0/5d1f-4a43-9f52-1a7e2b0c3d4e",
            "",
        ] {
            assert!(!is_guid(bad), "{bad}");
        }
    }

    #[test]
    fn the_esp_is_named_by_the_command_line_then_the_loader_and_never_past_a_bad_name() {
        let guid = "6C0AD6B0-5D1F-4A43-9F52-1A7E2B0C3D4E";
        let by_partuuid = PathBuf::from("/dev/disk/by-partuuid/6c0ad6b0-5d1f-4a43-9f52-1a7e2b0c3d4e");
        // Neither: nothing names it.
        assert_eq!(esp_device(None, None).unwrap(), None);
        // The loader's variable alone: its partition, lower-cased as udev names it.
        assert_eq!(
            esp_device(None, Some(guid)).unwrap(),
            Some((by_partuuid.clone(), EspNamedBy::Loader))
        );
        // layerboot.esp= says which, even when the loader names one too.
        for (spec, node) in [
            ("LABEL=ESP", "/dev/disk/by-label/ESP"),
            ("UUID=ABCD-1234", "/dev/disk/by-uuid/abcd-1234"),
            (
                "PARTUUID=6C0AD6B0-5D1F-4A43-9F52-1A7E2B0C3D4E",
                by_partuuid.to_str().unwrap(),
            ),
            ("PARTLABEL=EFI system", "/dev/disk/by-partlabel/EFI system"),
            ("/dev/vda1", "/dev/vda1"),
        ] {
            assert_eq!(
                esp_device(Some(spec), Some(guid)).unwrap(),
                Some((PathBuf::from(node), EspNamedBy::CommandLine)),
                "{spec}"
            );
        }
        // A variable that is no GUID is refused, never made a path.
        for bad in ["../../sda", "6c0ad6b0-5d1f-4a43-9f52-1a7e2b0c3d4", "/dev/sda1", ""] {
            let e = esp_device(None, Some(bad)).unwrap_err().to_string();
            assert!(
                e.contains("LoaderDevicePartUUID") && e.contains("not a partition GUID"),
                "{bad}: {e}"
            );
        }
        // A bad layerboot.esp= is refused, not passed over for the loader's word.
        for bad in [
            "LABEL=../../sda",
            "/dev/../etc/shadow",
            "PARTLABEL=a/../../b",
            "sda1",
            "FOO=bar",
        ] {
            let e = esp_device(Some(bad), Some(guid)).unwrap_err().to_string();
            assert!(e.contains("layerboot.esp="), "{bad}: {e}");
        }
        assert!(esp_device(Some("LABEL=../x"), None)
            .unwrap_err()
            .to_string()
            .contains("'..'"));
        assert_eq!(EspNamedBy::Loader.to_string(), "the boot loader's LoaderDevicePartUUID");
        assert_eq!(
            EspNamedBy::CommandLine.to_string(),
            "layerboot.esp= on the kernel command line"
        );
    }

    #[test]
    fn the_counting_follows_the_command_line_then_the_firmware() {
        let cmd = |s: &str| parse_cmdline(s);
        assert_eq!(
            Counting::of(&cmd("layerboot.grub=abc layerboot.esp=LABEL=ESP"), true),
            Some(Counting::Grub {
                deployment: "abc".into(),
                esp: "LABEL=ESP".into()
            })
        );
        assert_eq!(Counting::of(&cmd("layerboot.grub=abc"), true), Some(Counting::Loader));
        assert_eq!(
            Counting::of(&cmd("layerboot.grub=../x layerboot.esp=LABEL=E"), false),
            None
        );
        assert_eq!(Counting::of(&cmd(""), false), None);
    }

    #[test]
    fn blessing_renames_once_and_a_second_blesser_is_content() {
        let t = tempfile::tempdir().unwrap();
        let entries = t.path().join("loader/entries");
        fs::create_dir_all(&entries).unwrap();
        fs::write(entries.join("layerboot-000002-abc+2-1.conf"), "title x\n").unwrap();
        let entry = Path::new("loader/entries/layerboot-000002-abc+2-1.conf");
        let said = bless_at(t.path(), entry).unwrap();
        assert!(said.contains("layerboot-000002-abc.conf"), "{said}");
        assert!(entries.join("layerboot-000002-abc.conf").is_file());
        // systemd-bless-boot (or a rerun) finds it renamed already.
        assert!(bless_at(t.path(), entry).unwrap().contains("blessed already"));
    }

    #[test]
    fn the_unit_waits_for_a_good_boot_and_only_blesses() {
        let u = unit(&Counting::Loader);
        for line in [
            "Requires=boot-complete.target",
            "After=local-fs.target boot-complete.target multi-user.target",
            "ExecStart=/run/initramfs/layerboot-init --bless",
        ] {
            assert!(u.lines().any(|l| l == line), "{line} in\n{u}");
        }
        assert!(u.contains("ConditionPathExists=/sys/firmware/efi/efivars/LoaderBootCountPath-"));
        // The reboot is the helper's: a job timeout dies with the job (emergency mode).
        assert!(!u.contains("JobTimeout"), "{u}");
        let grub = Counting::Grub {
            deployment: "abc".into(),
            esp: "LABEL=ESP".into(),
        };
        assert!(!unit(&grub).contains("Condition"));
    }

    fn merged_usr_image(root: &Path) {
        use std::os::unix::fs::symlink;
        // Debian's merged /usr with absolute links: /sbin -> /usr/sbin,
        // /usr/sbin/init -> /lib/systemd/systemd, /lib -> /usr/lib.
        fs::create_dir_all(root.join("usr/sbin")).unwrap();
        fs::create_dir_all(root.join("usr/lib/systemd")).unwrap();
        fs::create_dir_all(root.join("usr/lib/sysvinit")).unwrap();
        symlink("/usr/sbin", root.join("sbin")).unwrap();
        symlink("/usr/lib", root.join("lib")).unwrap();
        symlink("/lib/systemd/systemd", root.join("usr/sbin/init")).unwrap();
        fs::write(root.join("usr/lib/systemd/systemd"), "").unwrap();
        fs::write(root.join("usr/lib/sysvinit/init"), "").unwrap();
        symlink("/lib/sysvinit/init", root.join("usr/sbin/sysv")).unwrap();
    }

    #[test]
    fn systemd_is_found_through_absolute_links_inside_the_image_only() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        merged_usr_image(&root);
        assert!(
            is_systemd(&root, "/sbin/init"),
            "through /sbin -> /usr/sbin, then an absolute link"
        );
        assert!(!is_systemd(&root, "/sbin/sysv"));
        assert!(!is_systemd(&root, "/sbin/missing"));
        // An absolute link is the image's path, never the host's or the initramfs's.
        std::os::unix::fs::symlink("/run/systemd", root.join("usr/sbin/elsewhere")).unwrap();
        assert!(!is_systemd(&root, "/sbin/elsewhere"));
    }

    #[test]
    fn an_armed_deadline_gets_its_units_on_systemd_and_only_there() {
        let t = tempfile::tempdir().unwrap();
        let (run, root) = (t.path().join("run"), t.path().join("root"));
        merged_usr_image(&root);
        fs::create_dir_all(run.join("initramfs")).unwrap();
        fs::write(run.join("initramfs/layerboot-init"), "program").unwrap();
        // sysvinit: no /run/systemd/system (sd_booted() would say systemd runs, and the
        // init scripts would call systemctl).
        assert!(!prepare(&run, &root, "/sbin/sysv", &Counting::Loader, true).unwrap());
        assert!(!run.join("systemd").exists());
        // Without the program beside the shutdown's, nothing is written, and it says why.
        let bare = t.path().join("bare");
        fs::create_dir_all(&bare).unwrap();
        let e = prepare(&bare, &root, "/sbin/init", &Counting::Loader, true).unwrap_err();
        assert!(e.to_string().contains("initramfs/layerboot-init is missing"), "{e}");
        assert!(!bare.join("systemd").exists());
        assert!(prepare(&run, &root, "/sbin/init", &Counting::Loader, true).unwrap());
        let units = run.join("systemd/system");
        assert!(units.join("multi-user.target.wants").join(UNIT).exists());
        let stop = fs::read_to_string(units.join("shutdown.target.wants").join(STAND_DOWN_UNIT)).unwrap();
        assert!(
            stop.contains("ExecStart=/run/initramfs/layerboot-init --stand-down shutdown"),
            "{stop}"
        );
        for s in ["emergency", "rescue"] {
            let d = fs::read_to_string(units.join(format!("{s}.service.d/layerboot-deadline.conf"))).unwrap();
            assert!(
                d.contains("ExecStartPre=-/run/initramfs/layerboot-init --deadline-notice"),
                "{d}"
            );
        }
        // No deadline (bless_timeout=0): the bless unit alone.
        let run2 = t.path().join("run2");
        fs::create_dir_all(run2.join("initramfs")).unwrap();
        fs::write(run2.join("initramfs/layerboot-init"), "program").unwrap();
        assert!(prepare(&run2, &root, "/sbin/init", &Counting::Loader, false).unwrap());
        assert!(run2.join("systemd/system").join(UNIT).exists());
        assert!(!run2.join("systemd/system/shutdown.target.wants").exists());
    }
}
