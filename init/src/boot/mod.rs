//! The boot sequence of `/init`, start to switch_root, as the README tells it:
//!
//! 1. [`Boot::read_settings`]: the API filesystems, the command line over
//!    `/etc/layerboot.json`;
//! 2. [`Boot::find_store_device`]: drivers for what is on the buses, the root device;
//! 3. [`Boot::open_store`]: the store's partition mounted, the image found in it;
//! 4. [`Boot::make_writable_root`] (`root.rs`): a fresh writable root with the top layer;
//! 5. [`Boot::hand_over`]: the way back for shutdown, booted.json, the image's init
//!    checked; then [`crate::switch`].
//!
//! Each step is a method named for what it does; any failure comes back as an [`Error`]
//! that `main` shows on the console. `docs/boot.md` follows one boot through them.

mod devices;
mod modules;
mod root;
mod timeline;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use sys_mount::MountFlags;

use crate::console::say;
use crate::error::{Context, Error, Result};
use crate::mounts::{mount, UserOptions};
use crate::probe::BlockDevice;
use crate::settings::{arg, legacy_image, parse_cmdline, Config, Settings, Upper, CONFIG_PATH, LEGACY_CONFIG_PATH};
use crate::store::{Driver, Image, Store};
pub use devices::Hardware;
pub use modules::{check_kernel, KernelModules};
use root::Source;
use timeline::Timeline;

pub const STORE_MOUNT: &str = "/run/layerboot/store";
pub const NEW_ROOT: &str = "/sysroot";

/// One boot; `settings` is kept for `main` to report failures.
pub struct Boot {
    timeline: Timeline,
    pub settings: Option<Settings>,
    /// Where the new root is mounted.
    new_root: PathBuf,
    /// Run by another initramfs (initramfs-tools, dracut, mkinitcpio), which mounted
    /// /dev, /proc, /sys and /run and will switch root itself.
    hosted: bool,
    /// What went wrong without stopping the boot, for the console and booted.json.
    warnings: std::cell::RefCell<Vec<String>>,
    /// What the post-switch helper does (the reboot deadline), decided in `hand_over`.
    after_switch: crate::after_switch::Plan,
}

/// The partition that holds the store, and what filesystem it is.
struct StoreDevice {
    device: BlockDevice,
    fstype: String,
}

impl Boot {
    /// As the initramfs's `/init`: makes the root at /sysroot and switches to it.
    pub fn new() -> Boot {
        Boot {
            timeline: Timeline::start(),
            settings: None,
            new_root: PathBuf::from(NEW_ROOT),
            hosted: false,
            warnings: Default::default(),
            after_switch: Default::default(),
        }
    }

    /// Inside another initramfs: makes the root at `target` and returns (`--mount-root`).
    pub fn hosted(target: &Path) -> Boot {
        Boot {
            new_root: target.to_path_buf(),
            hosted: true,
            ..Boot::new()
        }
    }

    /// A problem that does not stop the boot: on the console now, in booted.json later.
    fn warn(&self, msg: &str) {
        say(&format!("layerboot: warning: {msg}"));
        self.warnings.borrow_mut().push(msg.to_string());
    }

    /// Runs the whole sequence; returns only on failure (success execs the image's init).
    pub fn run(&mut self) -> Result<std::convert::Infallible> {
        let settings = self.mount_root()?;
        let args: Vec<String> = std::env::args().skip(1).collect();
        let env: Vec<String> = std::env::vars().map(|(k, v)| format!("{k}={v}")).collect();
        crate::switch::switch_root(&self.new_root, &settings.init, &args, &env, Some(&self.after_switch))
    }

    /// Everything up to the switch: the image's fresh writable root, with the top layer,
    /// mounted at the new root and its init checked.
    pub fn mount_root(&mut self) -> Result<Settings> {
        let (settings, config) = self.read_settings()?;
        self.settings = Some(settings.clone());
        let mut hw = Hardware::new(&config)?;
        self.timeline.mark("module index read");
        let forced: Vec<String> = config.modules.iter().chain(&settings.modules).cloned().collect();
        hw.load(&forced)
            .context("loading the modules named by layerboot.modules=")?;
        let store_device = self.find_store_device(&settings, &mut hw)?;
        let (store, image) = self.open_store(&settings, &store_device, &mut hw)?;
        let src = Source {
            settings: &settings,
            device: &store_device.device,
            store: &store,
            image: &image,
        };
        let toplayer = self.find_toplayer(&src, &mut hw)?;
        self.timeline.mark("top layer found");
        self.make_writable_root(&src, toplayer.as_deref(), &mut hw)?;
        self.timeline.mark("new root mounted");
        self.hand_over(&src)?;
        let booted = format!("{} from {}", settings.image, image.id.get(7..19).unwrap_or(&image.id));
        // Under another initramfs (--mount-root), that one switches.
        let next = if self.hosted { "root ready for" } else { "switching to" };
        self.timeline.report(&booted, next, &settings.init, hw.kernel_time);
        Ok(settings)
    }

    /// Step 1: the API filesystems (unless hosted), logging, the settings.
    fn read_settings(&self) -> Result<(Settings, Config)> {
        if !self.hosted {
            mount_api_filesystems()?;
        }
        crate::console::init_logging(false);
        let text =
            fs::read_to_string("/proc/cmdline").map_err(|e| Error::io("cannot read", Path::new("/proc/cmdline"), e))?;
        let config = read_config()?;
        let settings = Settings::resolve(&parse_cmdline(&text), &config)?;
        if settings.debug {
            crate::console::init_logging(true);
        }
        self.timeline.stage("started", "command line and config read");
        self.timeline.mark("settings read");
        let _ = fs::write("/proc/sys/kernel/printk_devkmsg", "on\n"); // our stage timings must not be dropped
        Ok((settings, config))
    }

    /// Step 2: waits for `root=` and tells its filesystem.
    fn find_store_device(&self, settings: &Settings, hw: &mut Hardware) -> Result<StoreDevice> {
        let device = hw.wait_for(arg::ROOT, &settings.root, settings.timeout)?;
        self.timeline.stage("root device", &device.describe());
        self.timeline.mark("root device found");
        let fstype = filesystem_of(&device, &settings.root_fstype, "rootfstype=btrfs, ext4, …")?;
        hw.ensure_filesystem(&fstype)?;
        Ok(StoreDevice { device, fstype })
    }

    /// Step 3: mounts the store's partition at its top level and finds the image in it.
    fn open_store(&self, settings: &Settings, dev: &StoreDevice, hw: &mut Hardware) -> Result<(Store, Image)> {
        let options = UserOptions::parse(&store_options(&dev.fstype, &settings.root_flags));
        let flags = store_flags(settings.upper, &options);
        mount(
            &dev.device.node,
            Path::new(STORE_MOUNT),
            &dev.fstype,
            flags,
            &options.data(),
        )
        .context("mounting the image store partition (root=)")?;
        self.timeline.mark("store partition mounted");
        let store = Store::open(Path::new(STORE_MOUNT).join(&settings.docker_path))
            .context("reading the image store (docker_path=)")?
            .with_namespace(settings.namespace.clone())
            .for_boot();
        let image = store
            .resolve(&settings.image)
            .context("finding the image to boot (docker_image=)")?;
        let found = format!(
            "{} is {} ({} layers to mount, {})",
            settings.image,
            image.id,
            image.layers.len(),
            image.driver.name()
        );
        self.timeline.stage("image", &found);
        self.timeline.mark("image resolved");
        match image.driver {
            Driver::Btrfs if dev.fstype != "btrfs" => {
                return Err(Error::new(format!(
                    "the store uses the btrfs driver but {} is {}",
                    dev.device.node.display(),
                    dev.fstype
                )))
            }
            Driver::Btrfs => {}
            Driver::Overlay2 | Driver::Vfs => hw.ensure_filesystem("overlay")?,
        }
        Ok((store, image))
    }

    /// Step 5: what the booted system and its shutdown get from us, and the image's init
    /// checked (a missing one would panic the kernel after the switch).
    fn hand_over(&mut self, src: &Source) -> Result<()> {
        // Our own switch: leave the way back for a clean unmount at shutdown.
        if !self.hosted {
            use crate::shutdown::{prepare, SHUTDOWN_DIR, SHUTDOWN_HOME};
            if let Err(e) = prepare(Path::new("/init"), Path::new(SHUTDOWN_HOME), Path::new(SHUTDOWN_DIR)) {
                self.warn(&format!(
                    "{e}: the store's filesystem will not be unmounted cleanly at shutdown"
                ));
            }
        }
        if !self.hosted {
            self.after_switch = self.arm_deadline(src.settings);
        }
        write_boot_record(src, &self.warnings.borrow());
        self.timeline.mark("boot record written");
        crate::switch::check_init(&self.new_root, &src.settings.init)?;
        self.timeline.mark("init checked");
        Ok(())
    }
}

impl Boot {
    /// For a boot the loader counts: the bless unit and, unless `bless_timeout=0`, the
    /// reboot deadline the post-switch helper keeps (`deadline.rs`), for every init.
    fn arm_deadline(&self, s: &Settings) -> crate::after_switch::Plan {
        use crate::after_switch::{CountedBy, Plan};
        use crate::bless::Counting;
        let uefi = Path::new("/sys/firmware/efi").is_dir();
        let cmdline = cmdline();
        let Some(counting) = Counting::of(&cmdline, uefi) else {
            return Plan::default();
        };
        // GRUB says whether it counted this boot; a good deployment's boots it does not
        // count, and a reboot would only come back to the same entry.
        let grub_counted = cmdline.get(arg::GRUB_COUNTED).is_some_and(|v| v == "1");
        let counted = matches!(counting, Counting::Loader) || grub_counted;
        let deadline = !s.bless_timeout.is_zero() && counted;
        match crate::bless::prepare(Path::new("/run"), &self.new_root, &s.init, &counting, deadline) {
            Ok(true) => log::info!(
                "layerboot: {} blesses this boot once it is good, if the boot loader counts it",
                crate::bless::UNIT
            ),
            Ok(false) => log::info!(
                "layerboot: {} is not systemd: if the boot loader counts this boot, bless it from the image's \
                 own boot scripts (`layerboot bless`, see the README)",
                s.init
            ),
            Err(e) => {
                self.warn(&format!(
                    "{e}: this boot cannot bless itself, so the boot loader will count it as failed"
                ));
                return Plan::default();
            }
        }
        let by = match counting {
            Counting::Loader => CountedBy::Loader,
            Counting::Grub { .. } => CountedBy::Grub,
        };
        Plan {
            deadline: deadline.then_some((s.bless_timeout, by)),
        }
    }
}

impl Default for Boot {
    fn default() -> Self {
        Self::new()
    }
}

/// The filesystem type of `dev`: as given (`rootfstype=`, `toplayerfstype=`), else as its
/// superblock says; `fix` names the argument that would tell.
fn filesystem_of(dev: &BlockDevice, given: &Option<String>, fix: &str) -> Result<String> {
    given.clone().or(dev.probe.fstype.map(str::to_string)).ok_or_else(|| {
        Error::new(format!(
            "cannot tell which filesystem {} holds (fix: add {fix})",
            dev.node.display()
        ))
    })
}

fn mount_api_filesystems() -> Result<()> {
    let nosuid_nodev = MountFlags::NOSUID | MountFlags::NODEV;
    for (src, target, fstype, flags, data) in [
        ("devtmpfs", "/dev", "devtmpfs", MountFlags::NOSUID, "mode=0755"),
        ("proc", "/proc", "proc", nosuid_nodev | MountFlags::NOEXEC, ""),
        ("sysfs", "/sys", "sysfs", nosuid_nodev | MountFlags::NOEXEC, ""),
        ("tmpfs", "/run", "tmpfs", nosuid_nodev, "mode=0755"),
    ] {
        // Already mounted (the kernel may mount devtmpfs itself): fine.
        if let Err(e) = mount(Path::new(src), Path::new(target), fstype, flags, data) {
            if e.errno() != Some(Errno::EBUSY) {
                return Err(e);
            }
        }
    }
    Ok(())
}

/// `/etc/layerboot.json`, with the image of mkinitcpio-docker-hooks' config under it when
/// another tool's hook packed that file (its users' images keep it).
fn read_config() -> Result<Config> {
    let read = |path: &str| match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("cannot read", Path::new(path), e)),
    };
    let mut config = match read(CONFIG_PATH)? {
        Some(text) => Config::parse(&text)?,
        None => Config::default(),
    };
    if let Some(text) = read(LEGACY_CONFIG_PATH)? {
        if let Some(image) = config.adopt_legacy_image(legacy_image(&text)?) {
            log::info!("default image {image}, from {LEGACY_CONFIG_PATH} (mkinitcpio-docker-hooks' config)");
        }
    }
    Ok(config)
}

/// btrfs: mount the top level (subvolid=5), where `docker_path` and the writable layers
/// live, unless the user named a subvolume id.
fn store_options(fstype: &str, flags: &[String]) -> Vec<String> {
    let mut opts: Vec<String> = flags.to_vec();
    if fstype == "btrfs" && !opts.iter().any(|o| o.starts_with("subvolid=")) {
        opts.push("subvolid=5".to_string());
    }
    opts
}

/// The store's mount flags: those of `rootflags=`, but reading the store must not write
/// it, so never access times (on btrfs each would copy the store's metadata on write, and
/// the flushes before the switch would wait for it), whatever atime policy `rootflags=`
/// names for the root. With the upper on tmpfs the store partition is only read.
fn store_flags(upper: Upper, options: &UserOptions) -> MountFlags {
    let base = if upper == Upper::Tmpfs {
        MountFlags::RDONLY
    } else {
        MountFlags::empty()
    };
    (options.flags(base) - MountFlags::RELATIME - MountFlags::STRICTATIME) | MountFlags::NOATIME
}

/// `/run/layerboot/booted.json`: which image and layer this boot came from, for the booted
/// system, with every warning of the boot.
fn write_boot_record(src: &Source, warnings: &[String]) {
    // Typed, not `json!`: serde_json's Value would cost /init 10 KB for this one file.
    // Fields in the order `json!` wrote them (sorted).
    #[derive(serde::Serialize)]
    struct Booted<'a, D, E> {
        driver: D,
        engine: E,
        id: &'a str,
        image: &'a str,
        layer: &'a str,
        namespace: &'a Option<String>,
        store: &'a Path,
        warnings: &'a [String],
    }
    let (s, store, image) = (src.settings, src.store, src.image);
    let record = Booted {
        driver: image.driver,
        engine: store.engine(),
        id: &image.id,
        image: &s.image,
        layer: &s.rw_name,
        namespace: &image.namespace,
        store: store.root(),
        warnings,
    };
    if let Ok(text) = serde_json::to_string(&record) {
        let _ = fs::write("/run/layerboot/booted.json", format!("{text}\n"));
    }
}

/// For `main`'s failure message: the kernel command line as a map.
pub fn cmdline() -> BTreeMap<String, String> {
    parse_cmdline(&fs::read_to_string("/proc/cmdline").unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_never_gets_access_times_whatever_rootflags_say() {
        let opts = |o: &[&str]| UserOptions::parse(&o.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        for words in [&[][..], &["relatime"], &["strictatime", "nodev"], &["atime"]] {
            let flags = store_flags(Upper::Disk, &opts(words));
            assert!(flags.contains(MountFlags::NOATIME), "{words:?}");
            assert!(!flags.intersects(MountFlags::RELATIME | MountFlags::STRICTATIME | MountFlags::RDONLY));
        }
        assert!(store_flags(Upper::Disk, &opts(&["nodev"])).contains(MountFlags::NODEV));
        assert!(store_flags(Upper::Tmpfs, &opts(&[])).contains(MountFlags::RDONLY | MountFlags::NOATIME));
    }

    #[test]
    fn btrfs_store_is_mounted_at_its_top_level() {
        assert_eq!(
            store_options("btrfs", &["compress=zstd".into()]),
            ["compress=zstd", "subvolid=5"]
        );
        assert_eq!(store_options("btrfs", &["subvolid=256".into()]), ["subvolid=256"]);
        assert!(store_options("ext4", &[]).is_empty());
    }
}
