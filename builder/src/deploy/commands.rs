//! `layerboot deploy | upgrade | status | rollback | gc | bless`: a machine's life in
//! deployments (see `mod.rs` for the layout on the ESP).
//!
//! On a machine booted by layerboot the defaults come from the boot itself: the store
//! from `/run/layerboot/booted.json`, the kernel arguments from `/proc/cmdline` minus the
//! one-offs, the ESP where `bootctl --print-esp-path` (or /efi, /boot/efi, /boot) has it,
//! or, when nothing has it mounted, the one the boot came from (`layerboot.esp=` or the
//! loader's `LoaderDevicePartUUID`, as the bless service finds it), mounted by the
//! command for itself until it ends. Elsewhere (a host with the disk
//! mounted, a first install) `--store`, `--esp` and `--root` are required: nothing is
//! taken from the host's own boot.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use argh::FromArgs;
use layerboot_init::error::{Error, Result};
use layerboot_init::settings::{arg, parse_cmdline};
use layerboot_init::store::Store;
use serde_json::json;

use super::grub;
use super::systemd_boot::{self, Assessment, EntryName};
use super::{
    check_tries, default_of, entry_name_parts, list, next_serial, short_id, Deployment, FileSum, Files, Record,
    DEPLOYMENTS_DIR, INITRAMFS, KERNEL, RECORD,
};
use crate::image::{write_atomically, SourceImage};
use layerboot_init::bless::{self as bless_service, EspNamedBy};
use layerboot_init::esp_lock;
use layerboot_init::grubenv;

const BOOTED_JSON: &str = "/run/layerboot/booted.json";
/// Kernel arguments that belong to one boot, never carried into a new entry.
const ONE_OFFS: [&str; 5] = [arg::DOCKER_IMAGE, "BOOT_IMAGE", "initrd", arg::RW, arg::GRUB_DEPLOYMENT];
/// Every failure must end in a reboot: a kernel panic reboots after this many seconds.
const PANIC_REBOOT_S: u32 = 10;

/// Where a command finds the machine: ESP, store, and the boot that is running.
#[derive(Clone, Default)]
pub struct Machine {
    /// The ESP (or XBOOTLDR /boot) holding the deployments.
    pub esp: Option<PathBuf>,
    /// The engine's data root.
    pub store: Option<PathBuf>,
    /// The record of the running boot (default /run/layerboot/booted.json).
    pub booted: Option<PathBuf>,
}

/// Where a command mounts the ESP when nothing has it mounted: in [`ESP_MOUNT_DIR`], the
/// prefix followed by the command's PID. One directory per command, so that two at once
/// never stack their mounts (the bless service's is `/run/layerboot/esp`). All mount the
/// same filesystem, so its root is one inode and the ESP's `flock` (`esp_lock`) holds
/// across them.
const ESP_MOUNT_DIR: &str = "/run/layerboot";
const ESP_MOUNT_PREFIX: &str = "esp-cli-";
/// What the README and the errors tell a user to keep the ESP mounted.
const ESP_FSTAB_FIX: &str = "add the ESP to the top layer's /etc/fstab, e.g. \
     `PARTUUID=<its GUID>  /boot/efi  vfat  umask=0077  0  2`, or pass --esp";

/// The ESP a command works on, by its mount point. When the command mounted it itself,
/// dropping this unmounts it: when the command ends, on an error too (every lock on it
/// is dropped first, as it was taken after).
pub struct Esp {
    path: PathBuf,
    mounted: bool,
}

impl Esp {
    /// An ESP mounted already (by the system, or given with --esp).
    fn at(path: &Path) -> Esp {
        Esp {
            path: path.to_path_buf(),
            mounted: false,
        }
    }

    /// Mounts `device` (`fstype`, nosuid, nodev, noexec) at `dir`, for as long as the
    /// returned value lives.
    fn mount(device: &Path, dir: &Path, fstype: &str) -> Result<Esp> {
        bless_service::mount_esp(device, dir, fstype).inspect_err(|_| {
            let _ = fs::remove_dir(dir);
        })?;
        Ok(Esp {
            path: dir.to_path_buf(),
            mounted: true,
        })
    }
}

impl std::ops::Deref for Esp {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for Esp {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl Drop for Esp {
    fn drop(&mut self) {
        if !self.mounted {
            return;
        }
        match layerboot_init::mounts::unmount(&self.path) {
            Ok(()) => {
                let _ = fs::remove_dir(&self.path);
            }
            Err(e) => eprintln!(
                "layerboot: {e} (fix: `umount {}` once nothing uses it)",
                self.path.display()
            ),
        }
    }
}

/// Unmounts what a command that was killed (Ctrl-C, a timer's timeout) left mounted in
/// `run`: an `esp-cli-<pid>` whose process is gone. Best effort, said on standard error.
pub fn sweep_esp_mounts(run: &Path) {
    let Ok(entries) = fs::read_dir(run) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(ESP_MOUNT_PREFIX))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let dir = entry.path();
        match layerboot_init::mounts::unmount(&dir) {
            Ok(()) => {
                let _ = fs::remove_dir(&dir);
                eprintln!(
                    "layerboot: unmounted the ESP that a killed command left mounted at {}",
                    dir.display()
                );
            }
            // Not a mount point (a cut between its mkdir and its mount): only the directory.
            Err(e) => {
                if fs::remove_dir(&dir).is_err() {
                    eprintln!(
                        "layerboot: {e}, left by a killed command (fix: `umount {}`)",
                        dir.display()
                    );
                }
            }
        }
    }
}

/// Mounts the ESP this boot came from (`named`: `bless::this_boots_esp`'s answer) at
/// `dir`, when nothing has it mounted. Returns it with the line that says so.
pub fn mount_named_esp(
    named: Result<Option<(PathBuf, EspNamedBy)>>,
    dir: &Path,
    fstype: &str,
) -> Result<(Esp, String)> {
    let unmounted = "the ESP is not mounted (not where bootctl, /efi, /boot/efi or /boot has it)";
    let (device, by) = named
        .map_err(|e| {
            format!("{unmounted}, and the one this machine booted from cannot be told: {e} (fix: {ESP_FSTAB_FIX})")
        })?
        .ok_or_else(|| {
            format!(
                "{unmounted}, and neither {}= nor the boot loader (LoaderDevicePartUUID) names the one \
                 this machine booted from (fix: {ESP_FSTAB_FIX})",
                arg::ESP
            )
        })?;
    if !device.exists() {
        return Err(format!(
            "{unmounted}, and {} (named by {by}) is not there (fix: check that udev runs; or {ESP_FSTAB_FIX})",
            device.display()
        )
        .into());
    }
    let esp = Esp::mount(&device, dir, fstype).map_err(|e| {
        let fix = match e.errno() {
            Some(nix::errno::Errno::EPERM | nix::errno::Errno::EACCES) => "run as root".to_string(),
            Some(nix::errno::Errno::ENODEV) => format!("load the kernel's {fstype} module: modprobe {fstype}"),
            _ => ESP_FSTAB_FIX.to_string(),
        };
        Error::new(format!(
            "{unmounted}, and mounting {} (named by {by}) at {} failed: {} (fix: {fix})",
            device.display(),
            dir.display(),
            e.errno()
                .map_or_else(|| e.message().to_string(), |n| n.desc().to_string())
        ))
        .with_errno(e.errno())
    })?;
    let note = format!(
        "layerboot: the ESP was not mounted: mounted {} (named by {by}) at {} for this command \
         (add it to /etc/fstab to keep it mounted)",
        device.display(),
        dir.display()
    );
    Ok((esp, note))
}

/// What `booted.json` says of the running boot.
struct Booted {
    image_id: String,
    store: PathBuf,
    namespace: Option<String>,
}

impl Machine {
    fn booted(&self) -> Option<Booted> {
        let path = self.booted.clone().unwrap_or_else(|| PathBuf::from(BOOTED_JSON));
        let v: serde_json::Value = serde_json::from_slice(&fs::read(path).ok()?).ok()?;
        Some(Booted {
            image_id: v["id"].as_str()?.to_string(),
            store: PathBuf::from(v["store"].as_str()?),
            namespace: v["namespace"].as_str().map(str::to_string),
        })
    }

    /// The ESP, mounted: `--esp`; else, on a machine booted by layerboot, where bootctl or
    /// /efi, /boot/efi, /boot have it; else the one this boot came from, mounted by this
    /// command for itself (saying so) until it ends.
    fn esp(&self) -> Result<Esp> {
        if let Some(esp) = &self.esp {
            return Ok(Esp::at(esp));
        }
        if self.booted().is_none() {
            return Err(
                "--esp is needed: this machine was not booted by layerboot, so its own ESP is not assumed \
                 (fix: --esp /path/to/the/mounted/ESP)"
                    .into(),
            );
        }
        // As bootctl finds it; Debian 12 ships bootctl only with systemd-boot, so its
        // places are looked at too.
        let by_bootctl = std::process::Command::new("bootctl")
            .arg("--print-esp-path")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .filter(|p| !p.is_empty())
            .map(PathBuf::from);
        let mounted = by_bootctl.or_else(|| {
            ["/efi", "/boot/efi", "/boot"]
                .iter()
                .map(PathBuf::from)
                .find(|p| is_esp(p))
        });
        if let Some(esp) = mounted {
            return Ok(Esp::at(&esp));
        }
        // Not mounted: the one this boot came from, as the bless service finds it.
        let run = Path::new(ESP_MOUNT_DIR);
        sweep_esp_mounts(run);
        let dir = run.join(format!("{ESP_MOUNT_PREFIX}{}", std::process::id()));
        let (esp, note) = mount_named_esp(bless_service::this_boots_esp(), &dir, bless_service::ESP_FSTYPE)?;
        eprintln!("{note}");
        Ok(esp)
    }

    fn store(&self) -> Result<(PathBuf, Option<String>)> {
        match (&self.store, self.booted()) {
            (Some(s), _) => Ok((s.clone(), None)),
            (None, Some(b)) => Ok((b.store, b.namespace)),
            (None, None) => Err("--store is needed: this machine was not booted by layerboot \
                 (fix: --store /path/to/the/engine's/data-root, e.g. /mnt/var/lib/docker)"
                .into()),
        }
    }
}

#[derive(FromArgs)]
#[argh(subcommand, name = "deploy")]
/// deploy an image: its kernel, an initramfs pinned to its ID and a boot entry on the ESP
pub struct DeployArgs {
    /// the image to deploy (name, name:tag, digest or ID)
    #[argh(positional)]
    reference: String,
    #[argh(option)]
    /// the ESP holding the deployments (default on a layerboot-booted machine: the mounted one, else the booted one, mounted for the command)
    esp: Option<PathBuf>,
    #[argh(option)]
    /// the engine's data root (default on a layerboot-booted machine: the booted store)
    store: Option<PathBuf>,
    #[argh(option)]
    /// the running boot's record (default /run/layerboot/booted.json)
    booted: Option<PathBuf>,
    /// the boot loader: systemd-boot or grub (default: what the ESP holds)
    #[argh(option)]
    loader: Option<String>,
    /// grub: the ESP as the booted system finds it (layerboot.esp=, e.g. LABEL=ESP), to bless its boots
    #[argh(option)]
    esp_device: Option<String>,
    /// tries a new deployment gets before the loader falls back: 1 to 16 (default 3; 0: no counting)
    #[argh(option, default = "3")]
    tries: u32,
    /// how many deployments to keep (default 3)
    #[argh(option, default = "3")]
    keep_deployments: usize,
    /// root= (the store's partition); default on a layerboot-booted machine: the running one
    #[argh(option)]
    root: Option<String>,
    /// rootflags=
    #[argh(option)]
    rootflags: Option<String>,
    /// docker_path=
    #[argh(option)]
    docker_path: Option<String>,
    /// toplayer=
    #[argh(option)]
    toplayer: Option<String>,
    /// toplayer_path=
    #[argh(option)]
    toplayer_path: Option<String>,
    /// layerboot.namespace= (containerd stores)
    #[argh(option)]
    namespace: Option<String>,
    /// layerboot.rw= (default with layerboot.mode=keep: one name per deployment)
    #[argh(option)]
    rw: Option<String>,
    /// more kernel arguments, e.g. "console=ttyS0 quiet"
    #[argh(option)]
    options: Option<String>,
    /// initramfs: also pack this module (repeatable)
    #[argh(option)]
    module: Vec<String>,
    /// initramfs: only this machine's drivers
    #[argh(switch)]
    host_only: bool,
    /// initramfs: the kernel version, if the image has several
    #[argh(option)]
    kver: Option<String>,
    /// the /init program to pack (default: layerboot-init beside this program, or in ../lib/layerboot/)
    #[argh(option)]
    init: Option<PathBuf>,
}

impl DeployArgs {
    fn machine(&self) -> Machine {
        Machine {
            esp: self.esp.clone(),
            store: self.store.clone(),
            booted: self.booted.clone(),
        }
    }

    /// What a deploy checks of its arguments before it builds anything.
    fn check(&self) -> Result<()> {
        check_tries(self.tries).map_err(|why| {
            format!("--tries {why} (fix: --tries 1 to 16, or 0 for an entry that is not counted)").into()
        })
    }

    /// The kernel command line of the new entry (without `docker_image=`), for the
    /// store at `store`.
    fn options(&self, booted: bool, store: &Path) -> Result<Vec<String>> {
        let mut out: Vec<String> = Vec::new();
        if booted && self.root.is_none() {
            let line = fs::read_to_string("/proc/cmdline").map_err(|e| Error::io("cannot read", "/proc/cmdline", e))?;
            out.extend(carried_arguments(&line));
        } else {
            let root = self
                .root
                .as_ref()
                .ok_or("--root is needed: the store's partition as root= names it (e.g. LABEL=store)")?;
            out.push(format!("{}={root}", arg::ROOT));
            out.push("rw".into());
        }
        for (k, v) in [
            (arg::ROOT_FLAGS, &self.rootflags),
            (arg::DOCKER_PATH, &self.docker_path),
            (arg::TOPLAYER, &self.toplayer),
            (arg::TOPLAYER_PATH, &self.toplayer_path),
            (arg::NAMESPACE, &self.namespace),
            (arg::RW, &self.rw),
            (arg::ESP, &self.esp_device),
        ] {
            if let Some(v) = v {
                if v.is_empty() || v.contains(char::is_whitespace) || v.contains('"') {
                    return Err(
                        format!("{k}='{v}' is empty or has spaces or quotes, which a kernel argument cannot").into(),
                    );
                }
                out.retain(|a| a.split('=').next() != Some(k));
                out.push(format!("{k}={v}"));
            }
        }
        if let Some(extra) = &self.options {
            out.extend(extra.split_whitespace().map(str::to_string));
        }
        // A store named on the command line is found at boot where it lies on its
        // partition, not at the default (`/mnt/docker` is `docker_path=docker`).
        let has_docker_path = out.iter().any(|a| a.split('=').next() == Some(arg::DOCKER_PATH));
        if self.store.is_some() && !has_docker_path {
            let rootflags = out
                .iter()
                .find_map(|a| a.strip_prefix(&format!("{}=", arg::ROOT_FLAGS)))
                .map(str::to_string);
            let derived = docker_path_of(store, rootflags.as_deref())?;
            out.push(format!("{}={derived}", arg::DOCKER_PATH));
        }
        Ok(out)
    }

    fn initramfs_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        for m in &self.module {
            a.extend(["--module".to_string(), m.clone()]);
        }
        if self.host_only {
            a.push("--host-only".into());
        }
        if let Some(k) = &self.kver {
            a.extend(["--kver".to_string(), k.clone()]);
        }
        a
    }
}

/// The running boot's kernel arguments worth carrying into a new entry.
pub fn carried_arguments(cmdline: &str) -> Vec<String> {
    cmdline
        .split_whitespace()
        .filter(|a| !ONE_OFFS.contains(&a.split('=').next().unwrap_or(a)))
        .map(str::to_string)
        .collect()
}

/// The arguments every deployment entry must carry so that each failure ends in a
/// reboot: a panic reboots, and /init's rescue wait is finite.
fn with_fallback_arguments(mut options: Vec<String>, image_id: &str, rw_default: Option<String>) -> Vec<String> {
    let has = |o: &[String], k: &str| o.iter().any(|a| a.split('=').next() == Some(k));
    if !has(&options, "panic") {
        options.push(format!("panic={PANIC_REBOOT_S}"));
    }
    if !has(&options, arg::RESCUE_TIMEOUT) {
        options.push(format!("{}=30", arg::RESCUE_TIMEOUT));
    }
    // A shell would wait for a person forever.
    options.retain(|a| a != &format!("{}=shell", arg::RESCUE));
    if let Some(rw) = rw_default.filter(|_| !has(&options, arg::RW)) {
        options.push(format!("{}={rw}", arg::RW));
    }
    options.push(format!("{}={image_id}", arg::DOCKER_IMAGE));
    options
}

/// One step of a deploy, in the order they run: each leaves the ESP bootable as before.
pub enum Step {
    CreateDir(PathBuf),
    Write {
        path: PathBuf,
        data: Vec<u8>,
    },
    /// A GRUB environment block: rewritten in place when it exists (as GRUB's own
    /// save_env does; it keeps its size), created through a temporary name otherwise.
    WriteBlock {
        path: PathBuf,
        data: Vec<u8>,
    },
    /// The loader's config without a `default` line that would pin an older entry.
    UnpinDefault {
        path: PathBuf,
        text: String,
    },
}

impl Step {
    pub fn run(&self) -> Result<()> {
        match self {
            Step::CreateDir(d) => create_dirs(d).map(drop),
            Step::Write { path, data } => {
                write_atomically(path, data, 0o644)?;
                sync_dir(path.parent().unwrap_or(Path::new("/")))
            }
            Step::WriteBlock { path, data } => match layerboot_init::grubenv::rewrite_in_place(path, data) {
                Ok(true) => Ok(()),
                Ok(false) => {
                    write_atomically(path, data, 0o644)?;
                    sync_dir(path.parent().unwrap_or(Path::new("/")))
                }
                Err(e) => Err(e),
            },
            Step::UnpinDefault { path, text } => {
                write_atomically(path, text.as_bytes(), 0o644)?;
                sync_dir(path.parent().unwrap_or(Path::new("/")))
            }
        }
    }
}

/// `create_dir_all`, durable: every directory it makes is flushed, and so is the parent
/// of the topmost one. On FAT, flushing a new directory writes only the sector of its
/// short (8.3) name: the long name's slot, in its parent, is written with the parent.
/// Returns the directories flushed, parents first.
pub fn create_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    let Some(topmost) = missing.last() else {
        return Ok(Vec::new());
    };
    for d in missing.iter().rev() {
        match fs::create_dir(d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && d.is_dir() => {}
            Err(e) => return Err(Error::io("cannot create", d, e)),
        }
    }
    let parent = topmost
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let flushed: Vec<PathBuf> = std::iter::once(parent)
        .chain(missing.iter().rev().copied())
        .map(Path::to_path_buf)
        .collect();
    for d in &flushed {
        sync_dir(d)?;
    }
    Ok(flushed)
}

/// A rename is durable once its directory is flushed (vfat included).
fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("cannot flush", dir, e))
}

/// Everything `deploy` will write, computed before anything is: the image resolved,
/// its kernel read, its initramfs built in memory, the ESP's space checked.
pub struct Plan {
    pub record: Record,
    /// The deployment's name: its directory's, its entry's.
    pub name: String,
    pub steps: Vec<Step>,
    /// Said to the user after the steps ran.
    pub notes: Vec<String>,
}

/// The loader whose entries an ESP holds: GRUB if it has layerboot's GRUB files or a
/// `grub.cfg` and no systemd-boot entries, else systemd-boot.
pub fn loader_of(esp: &Path) -> &'static str {
    let systemd_boot = esp.join("loader/entries").is_dir() || esp.join("EFI/systemd").is_dir();
    let grub = super::grub::env_path(esp).is_file()
        || fs::read_dir(esp.join("EFI"))
            .map(|dirs| dirs.flatten().any(|d| d.path().join("grub.cfg").is_file()))
            .unwrap_or(false);
    if grub && !systemd_boot {
        "grub"
    } else {
        "systemd-boot"
    }
}

pub fn plan_deploy(a: &DeployArgs, esp: &Path, store: &Path, namespace: Option<String>, booted: bool) -> Result<Plan> {
    a.check()?;
    let built = build_deployment(a, &a.reference, esp, store, namespace)?;
    plan_writes(a, esp, store, built, booted)
}

/// What a deployment brings to the ESP, made off it: the image's kernel and an
/// initramfs from its modules (seconds of work, done before the ESP is locked).
struct Built {
    loader: String,
    image_id: String,
    namespace: Option<String>,
    kernel_version: String,
    kernel_bytes: Vec<u8>,
    initramfs: Vec<u8>,
}

/// `image`: what to build from, `a.reference` or the ID it was resolved to already.
fn build_deployment(a: &DeployArgs, image: &str, esp: &Path, store: &Path, namespace: Option<String>) -> Result<Built> {
    let loader = a.loader.clone().unwrap_or_else(|| loader_of(esp).to_string());
    if loader != "systemd-boot" && loader != "grub" {
        return Err(format!(
            "--loader {loader}: deployments with boot counting are written for systemd-boot and grub \
             (fix: use one of those, or write plain entries with `layerboot entry`, e.g. for rEFInd)"
        )
        .into());
    }
    let namespace = a.namespace.clone().or(namespace);
    let opened = Store::open(store)?.with_namespace(namespace.clone());
    let image = opened.resolve(image)?;
    let source = SourceImage::open(store, &image.id, namespace.as_deref())?;
    let kernel = source.kernel(a.kver.as_deref(), |k| k.vmlinuz.is_some() && k.modules)?;
    let vmlinuz = kernel.vmlinuz.as_deref().unwrap_or_default();
    let kernel_bytes = source
        .read(vmlinuz)?
        .ok_or_else(|| format!("the image has no {vmlinuz}"))?;
    let initramfs = build_initramfs(store, &image.id, namespace.as_deref(), &kernel.version, a)?;
    Ok(Built {
        loader,
        image_id: image.id,
        namespace,
        kernel_version: kernel.version,
        kernel_bytes,
        initramfs,
    })
}

/// The steps that put `built` on the ESP as its newest deployment, from the ESP's
/// deployments as they are now (read under the ESP's lock, when deploying).
fn plan_writes(a: &DeployArgs, esp: &Path, store: &Path, built: Built, booted: bool) -> Result<Plan> {
    let Built {
        loader,
        image_id,
        namespace,
        kernel_version,
        kernel_bytes,
        initramfs,
    } = built;
    let deployments = list(esp)?;
    let id12 = short_id(&image_id).to_string();
    let name = deployment_name(esp, &image_id)?;
    let serial = next_serial(&deployments)?;
    let given = a.options(booted, store)?;
    let keep_mode = given.iter().any(|o| o == &format!("{}=keep", arg::MODE));
    let rw_default = keep_mode.then(|| format!("layerboot-rw-{id12}"));
    let mut options = with_fallback_arguments(given, &image_id, rw_default);
    if loader == "grub" {
        if !options.iter().any(|o| o.starts_with(&format!("{}=", arg::ESP))) {
            return Err(
                "--esp-device is needed with GRUB: the ESP as the booted system finds it, e.g. LABEL=ESP \
                 or PARTUUID=… (GRUB does not tell the system which partition it booted from)"
                    .into(),
            );
        }
        options.push(format!("{}={name}", arg::GRUB_DEPLOYMENT));
    }
    let options = options.join(" ");
    let dir = esp.join(DEPLOYMENTS_DIR).join(&name);
    let record = Record {
        reference: a.reference.clone(),
        image_id: image_id.clone(),
        kernel: kernel_version.clone(),
        serial,
        created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        store: store.to_path_buf(),
        namespace,
        options: options.clone(),
        initramfs_args: a.initramfs_args(),
        tries: a.tries,
        loader: loader.clone(),
        // Recorded before the entry is written: what finishing a cut deploy checks.
        files: Some(Files {
            vmlinuz: FileSum::of(&kernel_bytes),
            initramfs: FileSum::of(&initramfs),
        }),
    };
    record.check(&name).map_err(|why| {
        format!(
            "cannot deploy {}: {why} (fix: drop that argument from --options)",
            a.reference
        )
    })?;

    let need = kernel_bytes.len() as u64 + initramfs.len() as u64 + (1 << 20);
    let free = free_bytes(esp)?;
    if free < need {
        return Err(format!(
            "the ESP {} has {} MiB free, {} MiB are needed for {}'s kernel and initramfs. Nothing was written \
             (fix: `layerboot gc --keep-deployments 1 --esp {}`, or remove other kernels from the ESP)",
            esp.display(),
            free >> 20,
            need.div_ceil(1 << 20),
            a.reference,
            esp.display()
        )
        .into());
    }

    if loader == "grub" {
        let steps = vec![
            Step::CreateDir(dir.clone()),
            Step::Write {
                path: dir.join(KERNEL),
                data: kernel_bytes,
            },
            Step::Write {
                path: dir.join(INITRAMFS),
                data: initramfs,
            },
            Step::Write {
                path: dir.join(RECORD),
                data: (serde_json::to_string_pretty(&record).unwrap() + "\n").into_bytes(),
            },
        ];
        let assessment = if a.tries == 0 {
            Assessment::Good
        } else {
            Assessment::Trying { left: a.tries, done: 0 }
        };
        let new = Deployment {
            record: record.clone(),
            dir,
            entry: None,
            stale_entries: Vec::new(),
            assessment: Some(assessment),
            version: serial,
        };
        let mut steps = steps;
        steps.extend(grub_steps(esp, &deployments, Some(&new), &[])?);
        return Ok(Plan {
            record,
            name,
            steps,
            notes: vec![format!(
                "GRUB boots deployments once its grub.cfg sources {} with the ESP as $root \
                 (`source /{DEPLOYMENTS_DIR}/grub.cfg`, e.g. from /etc/grub.d/40_custom)",
                grub::snippet_path(esp).display()
            )],
        });
    }
    let entry_dir = systemd_boot::entries_dir(esp);
    let assessment = if a.tries == 0 {
        Assessment::Good
    } else {
        Assessment::Trying { left: a.tries, done: 0 }
    };
    let entry = EntryName {
        id: systemd_boot::entry_id(serial, &name),
        assessment,
    };
    let text = entry_text(&record, &name, serial);
    let mut steps = vec![
        Step::CreateDir(dir.clone()),
        Step::CreateDir(entry_dir.clone()),
        Step::Write {
            path: dir.join(KERNEL),
            data: kernel_bytes,
        },
        Step::Write {
            path: dir.join(INITRAMFS),
            data: initramfs,
        },
        Step::Write {
            path: dir.join(RECORD),
            data: (serde_json::to_string_pretty(&record).unwrap() + "\n").into_bytes(),
        },
        // Last: the only file the loader reads.
        Step::Write {
            path: entry_dir.join(entry.file_name()),
            data: text.into_bytes(),
        },
    ];
    let mut notes = Vec::new();
    let conf = esp.join("loader/loader.conf");
    if let Ok(text) = fs::read_to_string(&conf) {
        if let Some(pinned) = systemd_boot::pinned_default(&text) {
            if pinned.starts_with("layerboot") {
                steps.push(Step::UnpinDefault {
                    path: conf.clone(),
                    text: systemd_boot::without_default(&text),
                });
                notes.push(format!(
                    "removed 'default {pinned}' from {}: the newest good deployment is the default by sort order",
                    conf.display()
                ));
            } else {
                notes.push(format!(
                    "{} pins 'default {pinned}', which boots instead of the deployments \
                     (fix: remove that line to let the newest deployment boot)",
                    conf.display()
                ));
            }
        }
    }
    Ok(Plan {
        record,
        name,
        steps,
        notes,
    })
}

/// The text of the systemd-boot entry of `record`'s deployment `name` at `serial`.
fn entry_text(record: &Record, name: &str, serial: u64) -> String {
    let loader_path = |f: &str| format!("/{DEPLOYMENTS_DIR}/{name}/{f}");
    systemd_boot::render(
        &record.image_id,
        &format!(
            "layerboot: {} ({}, kernel {})",
            record.reference,
            record.short_id(),
            record.kernel
        ),
        serial,
        &loader_path(KERNEL),
        &loader_path(INITRAMFS),
        &record.options,
    )
}

/// The name of `image_id`'s deployment on `esp`: its first 12 hex digits, or more when
/// a record of another image (or one that cannot be read) holds that directory: two IDs
/// with the same first 12 digits never share one.
fn deployment_name(esp: &Path, image_id: &str) -> Result<String> {
    let hex =
        layerboot_init::digest::sha256_hex(image_id).ok_or_else(|| format!("'{image_id}' is not sha256:<64 hex>"))?;
    for len in (12..=64).step_by(4) {
        let name = &hex[..len];
        let record = esp.join(DEPLOYMENTS_DIR).join(name).join(RECORD);
        let taken = match fs::read(&record) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Ok(b) => serde_json::from_slice::<Record>(&b).map_or(true, |r| r.image_id != image_id),
            Err(_) => true,
        };
        if !taken {
            return Ok(name.to_string());
        }
        eprintln!(
            "note: {} holds another image's deployment (or one that cannot be read): {image_id} is deployed under a longer name",
            record.parent().unwrap_or(&record).display()
        );
    }
    Err(format!(
        "every name of {image_id} under {} is taken by a record of another image (fix: remove the directories that are not deployments)",
        esp.join(DEPLOYMENTS_DIR).display()
    )
    .into())
}

/// GRUB's two files after a change: the grubenv with each deployment's state (`with`
/// added or replaced, `without` gone), then the snippet that reads it, last.
fn grub_steps(esp: &Path, all: &[Deployment], with: Option<&Deployment>, without: &[&Deployment]) -> Result<Vec<Step>> {
    let mut env = grub::read_env(esp)?;
    let mut kept: Vec<&Deployment> = all
        .iter()
        .filter(|d| d.is_grub())
        .filter(|d| with.is_none_or(|w| w.record.image_id != d.record.image_id))
        .filter(|d| !without.iter().any(|x| x.record.image_id == d.record.image_id))
        .collect();
    if let Some(w) = with {
        kept.push(w);
    }
    for gone in without {
        if let Some(var) = grubenv::tries_variable(&gone.name()) {
            env.retain(|(k, _)| k != &var);
        }
    }
    if let Some(w) = with {
        let var = grubenv::tries_variable(&w.name()).ok_or("a deployment's name is not plain hex")?;
        grubenv::set(&mut env, &var, &grub::value(w.assessment.unwrap_or(Assessment::Good)));
    }
    Ok(vec![
        Step::WriteBlock {
            path: grub::env_path(esp),
            data: grubenv::render(&env)?,
        },
        Step::Write {
            path: grub::snippet_path(esp),
            data: grub::snippet(&kept).into_bytes(),
        },
    ])
}

/// The initramfs for `image_id`, built by `layerboot initramfs` into a temporary file
/// off the ESP (the ESP's space is checked against its real size).
fn build_initramfs(store: &Path, image_id: &str, ns: Option<&str>, kver: &str, a: &DeployArgs) -> Result<Vec<u8>> {
    let tmp = std::env::temp_dir().join(format!("layerboot-deploy-{}.img", std::process::id()));
    let mut argv: Vec<String> = vec![
        "--store".into(),
        store.display().to_string(),
        "--image".into(),
        image_id.to_string(),
        "--kver".into(),
        kver.to_string(),
        "-o".into(),
        tmp.display().to_string(),
    ];
    if let Some(ns) = ns {
        argv.extend(["--namespace".to_string(), ns.to_string()]);
    }
    for m in &a.module {
        argv.extend(["--module".to_string(), m.clone()]);
    }
    if a.host_only {
        argv.push("--host-only".into());
    }
    if let Some(init) = &a.init {
        argv.extend(["--init".to_string(), init.display().to_string()]);
    }
    let strs: Vec<&str> = argv.iter().map(String::as_str).collect();
    let args = <crate::initramfs::Args as FromArgs>::from_args(&["layerboot", "initramfs"], &strs)
        .map_err(|e| Error::new(format!("building the initramfs: {}", e.output)))?;
    let built =
        crate::initramfs::run(args).and_then(|()| fs::read(&tmp).map_err(|e| Error::io("cannot read", &tmp, e)));
    let _ = fs::remove_file(&tmp);
    built
}

/// Filesystems /init mounts a store partition of, as it mounts them: the whole
/// partition (a btrfs at its top level, `subvolid=5`).
const STORE_FILESYSTEMS: [&str; 5] = ["btrfs", "ext4", "ext3", "ext2", "xfs"];

/// `docker_path=` for the store at `store`, as this machine has it mounted: the mount's
/// root within its partition (field 4 of `/proc/self/mountinfo`) plus the path below the
/// mount point. `rootflags`: the entry's, which may mount another subvolume.
pub fn docker_path_of(store: &Path, rootflags: Option<&str>) -> Result<String> {
    let fix = "(fix: --docker-path with the data root's path from the top of its partition, e.g. --docker-path var/lib/docker)";
    let cannot = |why: String| -> Error {
        format!(
            "cannot tell docker_path= for the store {}: {why} {fix}",
            store.display()
        )
        .into()
    };
    if rootflags.is_some_and(|f| f.split(',').any(|o| o.starts_with("subvol"))) {
        return Err(cannot(
            "rootflags= names a subvolume, which the path is relative to".into(),
        ));
    }
    let real = fs::canonicalize(store).map_err(|e| cannot(e.to_string()))?;
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").map_err(|e| cannot(format!("/proc/self/mountinfo: {e}")))?;
    docker_path_in(&mountinfo, &real).map_err(cannot)
}

/// [`docker_path_of`] for the canonical path `store`, from a `mountinfo` text.
pub fn docker_path_in(mountinfo: &str, store: &Path) -> std::result::Result<String, String> {
    // The mount `store` lies on: the deepest mount point above it, the last one mounted there.
    let mut best: Option<(PathBuf, String, String)> = None;
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (Some(root), Some(point), Some(fstype)) = (fields.get(3), fields.get(4), fields.get(dash + 1)) else {
            continue;
        };
        let point = PathBuf::from(layerboot_init::shutdown::unescape_mountinfo(point));
        if store.starts_with(&point)
            && best
                .as_ref()
                .is_none_or(|(p, _, _)| point.components().count() >= p.components().count())
        {
            best = Some((
                point,
                layerboot_init::shutdown::unescape_mountinfo(root),
                fstype.to_string(),
            ));
        }
    }
    let (point, root, fstype) = best.ok_or("no mount holds it")?;
    if !STORE_FILESYSTEMS.contains(&fstype.as_str()) {
        return Err(format!(
            "it is on a {fstype} mount at {}, not on a partition /init mounts ({})",
            point.display(),
            STORE_FILESYSTEMS.join(", ")
        ));
    }
    let below = store.strip_prefix(&point).map_err(|e| e.to_string())?;
    let path = Path::new(&root).join(below);
    let path = path.to_string_lossy().trim_matches('/').to_string();
    if path.split('/').any(|c| c == "..") || path.contains(|c: char| c.is_whitespace() || c == '"') {
        return Err(format!(
            "its path '{path}' on the partition cannot be a kernel argument"
        ));
    }
    Ok(if path.is_empty() { "/".into() } else { path })
}

/// A mounted FAT filesystem that holds a boot loader's files.
fn is_esp(dir: &Path) -> bool {
    const MSDOS_SUPER_MAGIC: i64 = 0x4d44; // linux/magic.h; nix does not name it
    let fat = nix::sys::statfs::statfs(dir).is_ok_and(|s| s.filesystem_type().0 as i64 == MSDOS_SUPER_MAGIC);
    fat && (dir.join("loader").is_dir() || dir.join("EFI").is_dir())
}

fn free_bytes(dir: &Path) -> Result<u64> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(|e| Error::io("cannot read the free space of", dir, e))?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

pub fn deploy(a: DeployArgs) -> Result<()> {
    a.check()?;
    let machine = a.machine();
    let booted = machine.booted().is_some();
    let esp = machine.esp()?;
    let (store, namespace) = machine.store()?;
    let resolved = Store::open(&store)?
        .with_namespace(a.namespace.clone().or(namespace.clone()))
        .resolve(&a.reference)?;
    // The kernel and initramfs are made before the ESP is locked: a bless waiting on
    // the lock then waits for the writes only, not for seconds of building. This look
    // is only a guess (a bless may rename an entry as it reads); the one that counts is
    // under the lock. Built from the resolved ID: a tag moved meanwhile changes nothing.
    let built = match list(&esp) {
        Ok(all) if deployment_of(&all, &resolved.id).is_none_or(|d| files_damaged(d).is_some()) => {
            Some(build_deployment(&a, &resolved.id, &esp, &store, namespace.clone())?)
        }
        _ => None,
    };
    let _lock = esp_lock::lock(&esp, None)?;
    let deployments = list(&esp)?;
    if let Some(same) = deployment_of(&deployments, &resolved.id) {
        match files_damaged(same) {
            // The same image again: only made the default.
            None if !same.is_unfinished() => {
                make_default(&deployments, same)?;
                println!(
                    "{} is already deployed as {}: it is the default now",
                    a.reference,
                    same.name()
                );
                return Ok(());
            }
            // A deploy of it was cut after its record: its files are as recorded, and
            // only its entry is written.
            None => {
                make_default(&deployments, same)?;
                println!(
                    "deployed {} as {} (kernel {}, {} tries), finishing a deploy that was cut: it boots next",
                    a.reference,
                    same.name(),
                    same.record.kernel,
                    same.record.tries
                );
                return gc_deployments(&esp, a.keep_deployments, machine.booted().map(|b| b.image_id));
            }
            // Its files are written again, as by a new deploy.
            Some(why) => eprintln!(
                "note: the deploy of {} as {} was cut, and {why}: its files are written again",
                a.reference,
                same.name()
            ),
        }
    }
    // Not built yet (removed by a gc that ran while this one waited, say): built now.
    let built = match built {
        Some(b) => b,
        None => build_deployment(&a, &resolved.id, &esp, &store, namespace.clone())?,
    };
    let plan = plan_writes(&a, &esp, &store, built, booted)?;
    for step in &plan.steps {
        step.run()?;
    }
    for n in &plan.notes {
        eprintln!("note: {n}");
    }
    println!(
        "deployed {} as {} (kernel {}, {} tries): it boots next",
        a.reference, plan.name, plan.record.kernel, plan.record.tries
    );
    gc_deployments(&esp, a.keep_deployments, machine.booted().map(|b| b.image_id))
}

/// What keeps a cut deploy's files from being finished as they are: the kernel or the
/// initramfs not as its record says, or a record from before sizes and digests were
/// recorded. `None` for a finished deployment (its entry boots those files already).
fn files_damaged(d: &Deployment) -> Option<String> {
    if !d.is_unfinished() {
        return None;
    }
    match &d.record.files {
        None => Some("its record has no sizes and digests to check its files against".into()),
        Some(files) => files.check(&d.dir).err(),
    }
}

/// Whether the loader's `LoaderEntrySelected` (an entry's id, without counter) is `d`'s entry.
fn selects(selected: &str, d: &Deployment) -> bool {
    let id = selected.strip_suffix(".conf").unwrap_or(selected);
    let id = EntryName::parse(&format!("{id}.conf")).map_or(id.to_string(), |n| n.id);
    entry_name_parts(&id).is_some_and(|(_, name)| name == d.name())
}

/// The deployment of the image `id` (a full ID), if there is one.
fn deployment_of<'a>(all: &'a [Deployment], id: &str) -> Option<&'a Deployment> {
    all.iter().find(|d| d.record.image_id == id)
}

/// The state a deployment made the default again starts in: a bad one gets its tries back.
fn renewed(a: Option<Assessment>, tries: u32) -> Assessment {
    match a {
        Some(Assessment::Bad { .. }) | None if tries > 0 => Assessment::Trying { left: tries, done: 0 },
        Some(Assessment::Bad { .. }) | None => Assessment::Good,
        Some(other) => other,
    }
}

/// Raises `d`'s entry above every other (a new serial), its tries renewed if it was bad.
fn make_default(all: &[Deployment], d: &Deployment) -> Result<()> {
    if d.is_grub() {
        let mut raised = d.clone();
        raised.record.serial = next_serial(all)?;
        raised.version = raised.record.serial;
        raised.assessment = Some(renewed(d.assessment, d.record.tries));
        let mut steps = vec![Step::Write {
            path: d.dir.join(RECORD),
            data: (serde_json::to_string_pretty(&raised.record).unwrap() + "\n").into_bytes(),
        }];
        steps.extend(grub_steps(&esp_of(d), all, Some(&raised), &[])?);
        return steps.iter().try_for_each(Step::run);
    }
    let serial = next_serial(all)?;
    let Some((path, name)) = &d.entry else {
        // Unfinished (a deploy cut before its entry, whose files the caller checked):
        // the entry it was to get.
        let dir = systemd_boot::entries_dir(&esp_of(d));
        create_dirs(&dir)?;
        let entry = EntryName {
            id: systemd_boot::entry_id(serial, &d.name()),
            assessment: renewed(None, d.record.tries),
        };
        write_atomically(
            &dir.join(entry.file_name()),
            entry_text(&d.record, &d.name(), serial).as_bytes(),
            0o644,
        )?;
        return sync_dir(&dir);
    };
    // A new file under a new name, then the old one removed: FAT has no atomic
    // replace, so an entry is never rewritten in place. A cut in between leaves two
    // entries of one deployment, the newer first; the next change removes the other.
    let text = fs::read_to_string(path).map_err(|e| Error::io("cannot read", path, e))?;
    let raised = EntryName {
        id: systemd_boot::entry_id(serial, &d.name()),
        assessment: renewed(Some(name.assessment), d.record.tries),
    };
    let dir = path.parent().unwrap_or(Path::new("/"));
    write_atomically(
        &dir.join(raised.file_name()),
        systemd_boot::with_version(&text, serial).as_bytes(),
        0o644,
    )?;
    sync_dir(dir)?;
    for old in std::iter::once(path).chain(&d.stale_entries) {
        fs::remove_file(old).map_err(|e| Error::io("cannot remove", old, e))?;
    }
    sync_dir(dir)
}

#[derive(FromArgs)]
#[argh(subcommand, name = "status")]
/// list the deployments: which boots by default, which is running, which are bad
pub struct StatusArgs {
    #[argh(option)]
    /// the ESP holding the deployments
    esp: Option<PathBuf>,
    #[argh(option)]
    /// the engine's data root, to tell which deployments' images are gone
    store: Option<PathBuf>,
    #[argh(option)]
    /// the running boot's record (default /run/layerboot/booted.json)
    booted: Option<PathBuf>,
    /// print JSON
    #[argh(switch)]
    json: bool,
}

pub fn status(a: StatusArgs) -> Result<()> {
    let machine = Machine {
        esp: a.esp,
        store: a.store,
        booted: a.booted,
    };
    let esp = machine.esp()?;
    let all = list(&esp)?;
    let booted = machine.booted();
    let store = machine
        .store()
        .ok()
        .and_then(|(s, ns)| Some(Store::open(&s).ok()?.with_namespace(ns)));
    let default = default_of(&all).map(|d| d.record.image_id.clone());
    // What the loader says it booted this time (its entry id, counter stripped).
    let selected = layerboot_init::bless::loader_variable("LoaderEntrySelected");
    let mut rows = Vec::new();
    let mut warnings = Vec::new();
    for d in &all {
        let present = store.as_ref().map(|s| s.resolve(&d.record.image_id).is_ok());
        rows.push(json!({
            "id": d.name(),
            "image_id": d.record.image_id,
            "reference": d.record.reference,
            "kernel": d.record.kernel,
            "created": d.record.created,
            "state": d.state(),
            "default": default.as_deref() == Some(&d.record.image_id),
            "booted": booted.as_ref().is_some_and(|b| b.image_id == d.record.image_id),
            "selected_by_loader": selected.as_ref().is_some_and(|s| selects(s, d)),
            "image_in_store": present,
        }));
        if present == Some(false) {
            warnings.push(format!(
                "deployment {} ({}): its image is gone from the store; it cannot boot (fix: pull it again, or `layerboot gc`)",
                d.name(),
                d.record.reference
            ));
        }
    }
    if esp.join("EFI/refind").is_dir() || esp.join("EFI/BOOT/refind.conf").is_file() {
        warnings.push(
            "this ESP holds rEFInd, which has no boot counting: if it is the boot loader, new deployments are not \
             counted and a failing one is not left automatically (use systemd-boot for that)"
                .to_string(),
        );
    }
    // The loader's word beside booted.json's: they differ when the entry was edited at
    // the menu (another docker_image=), or the loader started an entry layerboot did not write.
    if let (Some(b), Some(sel)) = (&booted, &selected) {
        let started = all.iter().find(|d| selects(sel, d));
        match started {
            Some(d) if d.record.image_id != b.image_id => warnings.push(format!(
                "the boot loader started deployment {} ({}), but image {} booted (its entry's docker_image= \
                 was changed at the menu?)",
                d.name(),
                d.record.reference,
                b.image_id
            )),
            None if sel.starts_with("layerboot-") => warnings.push(format!(
                "the boot loader started entry {sel}, which no recorded deployment has (removed since?)"
            )),
            _ => {}
        }
    }
    if booted.is_some() {
        let release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        if !release.is_empty() && !Path::new("/lib/modules").join(&release).is_dir() {
            warnings.push(format!(
                "the running kernel {release} has no /lib/modules/{release} in the booted image: it was not deployed \
                 with its own kernel (fix: `layerboot deploy` the image, which installs its kernel)"
            ));
        }
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "loader": all.first().map(|d| d.record.loader.clone()).unwrap_or_else(|| loader_of(&esp).to_string()),
                "loader_entry_selected": selected,
                "deployments": rows,
                "warnings": warnings
            }))
            .unwrap()
        );
        return Ok(());
    }
    println!("{:<2} {:<12}  {:<28} {:<20} state", "", "id", "image", "kernel");
    for r in &rows {
        let mark = match (r["default"].as_bool(), r["booted"].as_bool()) {
            (Some(true), Some(true)) => "*>",
            (Some(true), _) => "> ",
            (_, Some(true)) => "* ",
            _ => "  ",
        };
        println!(
            "{mark} {:<12}  {:<28} {:<20} {}",
            r["id"].as_str().unwrap_or(""),
            r["reference"].as_str().unwrap_or(""),
            r["kernel"].as_str().unwrap_or(""),
            r["state"].as_str().unwrap_or("")
        );
    }
    println!("(> boots by default, * is running)");
    for w in warnings {
        println!("warning: {w}");
    }
    Ok(())
}

#[derive(FromArgs)]
#[argh(subcommand, name = "rollback")]
/// make the previous good deployment the default
pub struct RollbackArgs {
    #[argh(option)]
    /// the ESP holding the deployments
    esp: Option<PathBuf>,
    #[argh(option)]
    /// the engine's data root (its image must still be there)
    store: Option<PathBuf>,
    #[argh(option)]
    /// the running boot's record (default /run/layerboot/booted.json)
    booted: Option<PathBuf>,
}

pub fn rollback(a: RollbackArgs) -> Result<()> {
    let machine = Machine {
        esp: a.esp,
        store: a.store,
        booted: a.booted,
    };
    let esp = machine.esp()?;
    let _lock = esp_lock::lock(&esp, None)?;
    let all = list(&esp)?;
    let current = default_of(&all).ok_or("there is no deployment to roll back from")?;
    let previous = all
        .iter()
        .filter(|d| d.version < current.version && d.is_good())
        .max_by_key(|d| d.version)
        .ok_or_else(|| {
            format!(
                "there is no good deployment older than {} ({}) to roll back to",
                current.name(),
                current.record.reference
            )
        })?;
    let (store, ns) = machine.store()?;
    let store = Store::open(&store)?.with_namespace(previous.record.namespace.clone().or(ns));
    if store.resolve(&previous.record.image_id).is_err() {
        return Err(format!(
            "cannot roll back to {} ({}): its image {} is gone from the store (fix: pull it again, then retry)",
            previous.name(),
            previous.record.reference,
            previous.record.image_id
        )
        .into());
    }
    make_default(&all, previous)?;
    println!(
        "rolled back: {} ({}) boots next, instead of {} ({})",
        previous.name(),
        previous.record.reference,
        current.name(),
        current.record.reference
    );
    Ok(())
}

#[derive(FromArgs)]
#[argh(subcommand, name = "gc")]
/// remove old deployments beyond --keep-deployments (never the running or newest good one)
pub struct GcArgs {
    #[argh(option)]
    /// the ESP holding the deployments
    esp: Option<PathBuf>,
    #[argh(option)]
    /// the running boot's record (default /run/layerboot/booted.json)
    booted: Option<PathBuf>,
    /// how many deployments to keep (default 3)
    #[argh(option, default = "3")]
    keep_deployments: usize,
}

pub fn gc(a: GcArgs) -> Result<()> {
    let machine = Machine {
        esp: a.esp,
        store: None,
        booted: a.booted,
    };
    let esp = machine.esp()?;
    let _lock = esp_lock::lock(&esp, None)?;
    gc_deployments(&esp, a.keep_deployments, machine.booted().map(|b| b.image_id))
}

/// Which deployments `gc` removes: beyond the `keep` newest, never the running one, the
/// one that boots next, nor the newest good one.
pub fn doomed(all: &[Deployment], keep: usize, booted_id: Option<&str>) -> Vec<Deployment> {
    // Unfinished ones first, and they count for none of the kept: a cut deploy's record
    // is no fallback.
    let running = |d: &&Deployment| Some(d.record.image_id.as_str()) == booted_id;
    let mut out: Vec<Deployment> = all
        .iter()
        .filter(|d| d.is_unfinished() && !running(d))
        .cloned()
        .collect();
    let mut by_age: Vec<&Deployment> = all.iter().filter(|d| !d.is_unfinished() || running(d)).collect();
    by_age.sort_by_key(|d| std::cmp::Reverse(d.version.max(d.record.serial)));
    let newest_good = by_age.iter().find(|d| d.is_good()).map(|d| d.record.image_id.clone());
    let next = default_of(all).map(|d| d.record.image_id.clone());
    let protected = |d: &Deployment| {
        let id = Some(&d.record.image_id);
        Some(d.record.image_id.as_str()) == booted_id || id == newest_good.as_ref() || id == next.as_ref()
    };
    let kept_protected = by_age.iter().filter(|d| protected(d)).count();
    let mut room = keep.saturating_sub(kept_protected);
    for d in by_age {
        if protected(d) {
            continue;
        }
        if room > 0 {
            room -= 1;
        } else {
            out.push(d.clone());
        }
    }
    out
}

/// The ESP a deployment's directory lies on (`ESP/layerboot/<id12>`).
fn esp_of(d: &Deployment) -> PathBuf {
    d.dir
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("/"))
        .to_path_buf()
}

fn gc_deployments(esp: &Path, keep: usize, booted_id: Option<String>) -> Result<()> {
    let all = list(esp)?;
    let doomed = doomed(&all, keep.max(1), booted_id.as_deref());
    // GRUB's menu first, as systemd-boot's entries: never an entry whose files are gone.
    let grub_doomed: Vec<&Deployment> = doomed.iter().filter(|d| d.is_grub()).collect();
    if !grub_doomed.is_empty() {
        for step in grub_steps(esp, &all, None, &grub_doomed)? {
            step.run()?;
        }
    }
    for d in doomed {
        // The entry first: the loader never sees an entry whose files are gone.
        for entry in d.entry.iter().map(|(p, _)| p).chain(&d.stale_entries) {
            fs::remove_file(entry).map_err(|e| Error::io("cannot remove", entry, e))?;
            sync_dir(entry.parent().unwrap_or(Path::new("/")))?;
        }
        fs::remove_dir_all(&d.dir).map_err(|e| Error::io("cannot remove", &d.dir, e))?;
        println!("removed deployment {} ({})", d.name(), d.record.reference);
    }
    Ok(())
}

#[derive(FromArgs)]
#[argh(subcommand, name = "bless")]
/// mark the running deployment good (its entry loses its counter) or bad
pub struct BlessArgs {
    /// good (the default) or bad
    #[argh(positional, default = "String::from(\"good\")")]
    verdict: String,
    #[argh(option)]
    /// the ESP holding the deployments
    esp: Option<PathBuf>,
    #[argh(option)]
    /// the running boot's record (default /run/layerboot/booted.json)
    booted: Option<PathBuf>,
}

pub fn bless(a: BlessArgs) -> Result<()> {
    // A good boot stops this boot's reboot deadline (the post-switch helper /init left),
    // through its stop file, first: the mark may wait for the ESP's lock, or fail, and
    // the boot is good either way. On a sysvinit or OpenRC image this is the only bless.
    if a.verdict == "good" && a.booted.is_none() {
        let run = Path::new(layerboot_init::deadline::RUN_DIR);
        if layerboot_init::deadline::stand_down(run, "the boot is good (layerboot bless)")
            .map_err(|e| Error::io("cannot stop the reboot deadline in", run, e))?
        {
            println!("this boot's reboot deadline is stopped");
        }
    }
    mark_running(a)
}

/// Marks the running deployment good or bad, on its loader's terms.
fn mark_running(a: BlessArgs) -> Result<()> {
    let machine = Machine {
        esp: a.esp,
        store: None,
        booted: a.booted,
    };
    let good = match a.verdict.as_str() {
        "good" => true,
        "bad" => false,
        other => return Err(format!("bless '{other}': say good or bad").into()),
    };
    let booted = machine
        .booted()
        .ok_or("this machine was not booted by layerboot (no /run/layerboot/booted.json): nothing to bless")?;
    let esp = machine.esp()?;
    let _lock = esp_lock::lock(&esp, None)?;
    let all = list(&esp)?;
    let d = deployment_of(&all, &booted.image_id).ok_or_else(|| {
        format!(
            "the running image {} is not a deployment on {}",
            booted.image_id,
            esp.display()
        )
    })?;
    if d.is_grub() {
        let verdict = if good {
            Assessment::Good
        } else {
            Assessment::Bad { done: d.record.tries }
        };
        let mut marked = d.clone();
        marked.assessment = Some(verdict);
        for step in grub_steps(&esp, &all, Some(&marked), &[])? {
            step.run()?;
        }
        println!(
            "deployment {} ({}) is marked {}",
            d.name(),
            d.record.reference,
            if good { "good" } else { "bad" }
        );
        return Ok(());
    }
    let Some((path, name)) = &d.entry else {
        return Err(format!(
            "deployment {} has no boot entry: a deploy of it was cut (fix: `layerboot deploy {}` finishes it)",
            d.name(),
            d.record.reference
        )
        .into());
    };
    let done = match name.assessment {
        Assessment::Trying { done, .. } | Assessment::Bad { done } => done,
        Assessment::Good => 0,
    };
    let verdict = if good {
        Assessment::Good
    } else {
        Assessment::Bad { done }
    };
    if name.assessment == verdict {
        println!("deployment {} is {} already", d.name(), d.state());
        return Ok(());
    }
    let to = path.with_file_name(
        EntryName {
            id: name.id.clone(),
            assessment: verdict,
        }
        .file_name(),
    );
    match fs::rename(path, &to) {
        // FAT writes the renamed entry's start and size with the file: flush it.
        Ok(()) => fs::File::open(&to)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io("cannot flush", &to, e))?,
        // systemd-bless-boot renamed it first: fine if it reached the same verdict.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && to.exists() => {}
        Err(e) => return Err(Error::io("cannot rename", path, e)),
    }
    sync_dir(path.parent().unwrap_or(Path::new("/")))?;
    println!(
        "deployment {} ({}) is marked {}",
        d.name(),
        d.record.reference,
        if good { "good" } else { "bad" }
    );
    Ok(())
}

#[derive(FromArgs)]
#[argh(subcommand, name = "upgrade")]
/// deploy the running deployment's reference again if it now names another image
pub struct UpgradeArgs {
    /// only say whether an upgrade is there (exit status 0 either way)
    #[argh(switch)]
    check: bool,
    #[argh(option)]
    /// the ESP holding the deployments
    esp: Option<PathBuf>,
    #[argh(option)]
    /// the engine's data root
    store: Option<PathBuf>,
    #[argh(option)]
    /// the running boot's record (default /run/layerboot/booted.json)
    booted: Option<PathBuf>,
    /// the /init program to pack (default: layerboot-init beside this program, or in ../lib/layerboot/)
    #[argh(option)]
    init: Option<PathBuf>,
}

pub fn upgrade(a: UpgradeArgs) -> Result<()> {
    let machine = Machine {
        esp: a.esp.clone(),
        store: a.store.clone(),
        booted: a.booted.clone(),
    };
    let esp = machine.esp()?;
    let all = list(&esp)?;
    let base = match machine.booted() {
        Some(b) => deployment_of(&all, &b.image_id),
        None => default_of(&all),
    }
    .ok_or("no deployment to upgrade: `layerboot deploy REF` first")?;
    let (store, ns) = machine.store()?;
    let ns = base.record.namespace.clone().or(ns);
    let now = Store::open(&store)?
        .with_namespace(ns.clone())
        .resolve(&base.record.reference)?;
    if now.id == base.record.image_id {
        println!("{} is up to date ({})", base.record.reference, base.name());
        return Ok(());
    }
    println!(
        "{} now names {} (deployed: {})",
        base.record.reference,
        short_id(&now.id),
        base.name()
    );
    if a.check {
        return Ok(());
    }
    // Redo the deployment as it was made: its kernel arguments and initramfs options.
    let mut argv = vec![
        base.record.reference.clone(),
        "--esp".into(),
        esp.display().to_string(),
        "--store".into(),
        store.display().to_string(),
        "--tries".into(),
        base.record.tries.to_string(),
        "--options".into(),
        carried_arguments(&base.record.options)
            .into_iter()
            .filter(|o| o != "rw" && !o.starts_with(&format!("{}=", arg::ROOT)))
            .collect::<Vec<_>>()
            .join(" "),
        "--root".into(),
    ];
    let root = parse_cmdline(&base.record.options)
        .get(arg::ROOT)
        .cloned()
        .ok_or("the deployed entry has no root=")?;
    argv.push(root);
    argv.extend(base.record.initramfs_args.iter().cloned());
    if let Some(b) = &a.booted {
        argv.extend(["--booted".into(), b.display().to_string()]);
    }
    if let Some(i) = &a.init {
        argv.extend(["--init".into(), i.display().to_string()]);
    }
    let strs: Vec<&str> = argv.iter().map(String::as_str).collect();
    let args = <DeployArgs as FromArgs>::from_args(&["layerboot", "deploy"], &strs)
        .map_err(|e| Error::new(format!("redoing the deployment: {}", e.output)))?;
    // deploy takes the ESP's lock and reads the deployments again under it; upgrade
    // holds no lock, as a second flock of this process would wait for the first.
    let done = deploy(args);
    // An ESP this command mounted stays mounted until the deploy is done.
    drop(esp);
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unmounted_esp_that_cannot_be_told_is_an_error_naming_the_fstab_fix() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("esp-cli-1");
        let bad_guid = layerboot_init::bless::esp_device(None, Some("../../sda"));
        for (named, says) in [
            (
                Ok(None),
                "neither layerboot.esp= nor the boot loader (LoaderDevicePartUUID) names",
            ),
            (bad_guid, "LoaderDevicePartUUID '../../sda' is not a partition GUID"),
            (
                Ok(Some((t.path().join("gone"), EspNamedBy::Loader))),
                "is not there (fix: check that udev runs",
            ),
        ] {
            let e = mount_named_esp(named, &dir, "vfat").err().unwrap().to_string();
            assert!(e.starts_with("the ESP is not mounted"), "{e}");
            assert!(e.contains(says), "{e}");
            assert!(e.contains("/etc/fstab") && e.contains("--esp"), "{e}");
            assert!(!dir.exists(), "nothing mounted, nothing left");
        }
    }

    #[test]
    fn what_a_killed_command_left_mounted_is_swept_and_nothing_else() {
        let t = tempfile::tempdir().unwrap();
        // No process has a PID above the kernel's maximum (at most 2^22).
        let dead = t.path().join("esp-cli-4294967295");
        let mine = t.path().join(format!("esp-cli-{}", std::process::id()));
        let other = t.path().join("esp");
        for d in [&dead, &mine, &other] {
            fs::create_dir(d).unwrap();
        }
        let mounted = layerboot_init::bless::mount_esp(Path::new("none"), &dead, "tmpfs").is_ok();
        if !mounted {
            eprintln!("skipped the mount: mounting needs root here");
        }
        sweep_esp_mounts(t.path());
        assert!(!dead.exists() && !is_mount_point(&dead), "swept");
        assert!(mine.is_dir() && other.is_dir(), "a live command's and others' are kept");
    }

    /// Whether `dir` is a mount point, as /proc/self/mountinfo has it.
    fn is_mount_point(dir: &Path) -> bool {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
        mountinfo
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .any(|p| Path::new(&layerboot_init::shutdown::unescape_mountinfo(p)) == dir)
    }

    #[test]
    fn an_esp_mounted_for_a_command_is_locked_there_and_unmounted_after_it_on_error_too() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("esp-cli-1");
        // The host may have no vfat: tmpfs stands in for it (its source is only a name).
        let device = t.path().join("device");
        fs::write(&device, "").unwrap();
        let named = || Ok(Some((device.clone(), EspNamedBy::Loader)));
        let command = |fail: bool| -> Result<String> {
            let (esp, note) = mount_named_esp(named(), &dir, "tmpfs")?;
            assert!(is_mount_point(&esp), "{} is mounted", esp.display());
            // The ESP's lock works on that mount: a second holder waits, then gives up.
            let _held = esp_lock::lock(&esp, None)?;
            let other = esp_lock::lock(&esp, Some(std::time::Duration::ZERO));
            assert!(other.err().unwrap().to_string().contains("gave up"));
            fs::write(esp.join("written"), "").map_err(|e| Error::io("cannot write", esp.join("written"), e))?;
            if fail {
                return Err("the command failed".into());
            }
            Ok(note)
        };
        match command(false) {
            Ok(note) => assert_eq!(
                note,
                format!(
                    "layerboot: the ESP was not mounted: mounted {} (named by the boot loader's \
                     LoaderDevicePartUUID) at {} for this command (add it to /etc/fstab to keep it mounted)",
                    device.display(),
                    dir.display()
                )
            ),
            Err(e) if matches!(e.errno(), Some(nix::errno::Errno::EPERM | nix::errno::Errno::EACCES)) => {
                assert!(e.to_string().contains("(fix: run as root)"), "{e}");
                eprintln!("skipped: mounting needs root here ({e})");
                return;
            }
            Err(e) => panic!("{e}"),
        }
        assert!(
            !is_mount_point(&dir) && !dir.exists(),
            "unmounted and removed after the command"
        );
        let e = command(true).err().unwrap().to_string();
        assert_eq!(e, "the command failed");
        assert!(
            !is_mount_point(&dir) && !dir.exists(),
            "unmounted and removed after a failed command"
        );
        // A mount that fails leaves no directory and names the fix.
        if !fs::read_to_string("/proc/filesystems").unwrap().contains("\tvfat\n") {
            let e = mount_named_esp(named(), &dir, "vfat").err().unwrap().to_string();
            assert!(
                e.contains(&format!("mounting {} (named by the boot loader's", device.display()))
                    && e.contains("(fix: load the kernel's vfat module: modprobe vfat)"),
                "{e}"
            );
            assert!(!dir.exists());
        }
    }

    #[test]
    fn every_directory_a_deploy_makes_is_flushed_in_its_parent() {
        let t = tempfile::tempdir().unwrap();
        let esp = t.path().join("esp");
        fs::create_dir(&esp).unwrap();
        let entries = esp.join("loader/entries");
        assert_eq!(
            create_dirs(&entries).unwrap(),
            [esp.clone(), esp.join("loader"), entries.clone()],
            "each new directory, and the parent of the topmost"
        );
        assert!(entries.is_dir());
        assert_eq!(
            create_dirs(&entries).unwrap(),
            Vec::<PathBuf>::new(),
            "nothing made, nothing to flush"
        );
        let id = esp.join("layerboot/abcdefabcdef");
        assert_eq!(create_dirs(&id).unwrap(), [esp.clone(), esp.join("layerboot"), id]);
    }

    const MOUNTINFO: &str = "\
22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
40 22 0:35 / /mnt rw,relatime shared:20 - btrfs /dev/vdb rw,subvolid=5,subvol=/
41 40 0:35 /@docker /mnt/docker rw,relatime shared:21 - btrfs /dev/vdb rw,subvolid=256,subvol=/@docker
42 22 0:40 / /tmp rw,nosuid shared:22 - tmpfs tmpfs rw
43 22 254:2 /srv/my\\040store /media/my\\040disk rw shared:23 - xfs /dev/vdc rw
";

    #[test]
    fn docker_path_is_where_the_store_lies_on_its_partition() {
        let p = |s: &str| docker_path_in(MOUNTINFO, Path::new(s));
        assert_eq!(p("/mnt/var/lib/docker").unwrap(), "var/lib/docker");
        assert_eq!(
            p("/mnt/docker").unwrap(),
            "@docker",
            "a mounted subvolume: its path from the top level"
        );
        assert_eq!(p("/mnt/docker/engine").unwrap(), "@docker/engine");
        assert_eq!(p("/mnt").unwrap(), "/", "the partition's top level itself");
        assert_eq!(p("/var/lib/docker").unwrap(), "var/lib/docker");
        assert!(p("/media/my disk/x")
            .unwrap_err()
            .contains("cannot be a kernel argument"));
        let e = p("/tmp/docker").unwrap_err();
        assert!(e.contains("tmpfs"), "{e}");
        let e = docker_path_of(Path::new("/"), Some("subvol=@rw,compress=zstd"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--docker-path") && e.contains("fix:"), "{e}");
    }

    fn deployment(image: char, version: u64, assessment: Option<Assessment>) -> Deployment {
        let image_id = format!("sha256:{}", image.to_string().repeat(64));
        Deployment {
            dir: PathBuf::from("/esp/layerboot").join(&image_id[7..19]),
            record: Record {
                reference: format!("img:{image}"),
                image_id,
                kernel: "6.1.0".into(),
                serial: version,
                created: 0,
                store: "/s".into(),
                namespace: None,
                options: String::new(),
                initramfs_args: vec![],
                tries: 3,
                loader: "systemd-boot".into(),
                files: None,
            },
            entry: None,
            stale_entries: Vec::new(),
            assessment,
            version,
        }
    }

    #[test]
    fn gc_removes_unfinished_deployments_first_and_keeps_the_fallbacks() {
        let trying = Some(Assessment::Trying { left: 3, done: 0 });
        // In list's order: the default first, unfinished last.
        let all = [
            deployment('c', 3, trying),
            deployment('b', 2, Some(Assessment::Good)),
            deployment('a', 1, Some(Assessment::Good)),
            deployment('d', 4, None), // a deploy cut after its record: the newest serial
        ];
        let names = |v: Vec<Deployment>| v.into_iter().map(|d| d.record.reference).collect::<Vec<_>>();
        assert_eq!(names(doomed(&all, 3, None)), ["img:d"], "the three that boot are kept");
        assert_eq!(names(doomed(&all, 2, None)), ["img:d", "img:a"]);
        // The running one is never removed, unfinished or not.
        let running = all[3].record.image_id.clone();
        assert_eq!(default_of(&all).unwrap().record.reference, "img:c");
        assert_eq!(names(doomed(&all, 3, Some(&running))), ["img:a"]);
    }
}
