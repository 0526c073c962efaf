//! The boot sequence of `/init`, start to switch_root. Each step is a function named for
//! what it does; any failure comes back as an [`Error`] that `main` shows on the console.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};
use sys_mount::MountFlags;

use crate::coldplug::{ModaliasWalker, Uevents};
use crate::copy::copy_tree;
use crate::error::{Context, Error, Result};
use crate::kmod::ModuleIndex;
use crate::mounts::{mount, unmount};
use crate::probe::{scan, BlockDevice};
use crate::settings::{arg, parse_cmdline, Config, DeviceSpec, Settings, CONFIG_PATH};
use crate::store::{Driver, Image, Store};
use crate::writable::{check_clear_of, overlay_data, Layers};

pub const STORE_MOUNT: &str = "/run/layerboot/store";
const TOPLAYER_MOUNT: &str = "/run/layerboot/toplayer";
const STAGE_MOUNT: &str = "/run/layerboot/stage";
const TMPFS_UPPER: &str = "/run/layerboot/upper";
pub const NEW_ROOT: &str = "/sysroot";

/// What is known once the command line is read; used by `main` to report failures.
pub struct Boot {
    started: Instant,
    /// This process's CPU time when /init started (see [`crate::cost::own_cpu`]).
    cpu_at_start: Duration,
    /// The same in user mode only: /init's own code.
    user_cpu_at_start: Duration,
    pub settings: Option<Settings>,
    /// (stage, ms since start), logged together at the end: every line printed on a
    /// serial console costs ~10 ms, which would dwarf the work being timed.
    stages: std::cell::RefCell<Vec<(&'static str, u128)>>,
    /// (point, ms since start, own CPU ms, of it in /init's code ms), for the debug timeline.
    marks: std::cell::RefCell<Vec<(&'static str, u128, u128, u128)>>,
    /// Where the new root is mounted.
    new_root: PathBuf,
    /// Run by another initramfs (initramfs-tools, dracut, mkinitcpio), which mounted
    /// /dev, /proc, /sys and /run and will switch root itself.
    hosted: bool,
    /// What went wrong without stopping the boot, for the console and booted.json.
    warnings: std::cell::RefCell<Vec<String>>,
}

impl Boot {
    /// As the initramfs's `/init`: makes the root at /sysroot and switches to it.
    pub fn new() -> Boot {
        Boot {
            started: Instant::now(),
            cpu_at_start: crate::cost::process_cpu(),
            user_cpu_at_start: crate::cost::process_user_cpu(),
            settings: None,
            stages: Default::default(),
            marks: Default::default(),
            new_root: PathBuf::from(NEW_ROOT),
            hosted: false,
            warnings: Default::default(),
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

    /// A finer timing point for `layerboot.debug`: wall time, own CPU time and the part of
    /// it in /init's own code, kept for one line at the end (a console line each would
    /// cost more than most steps).
    fn mark(&self, what: &'static str) {
        let (cpu, user) = self.own_work_ms();
        self.marks
            .borrow_mut()
            .push((what, self.started.elapsed().as_millis(), cpu, user));
    }

    /// /init's own CPU time so far and the part of it in /init's own code, in ms.
    fn own_work_ms(&self) -> (u128, u128) {
        let user = crate::cost::process_user_cpu().saturating_sub(self.user_cpu_at_start);
        (crate::cost::own_cpu(self.cpu_at_start).as_millis(), user.as_millis())
    }

    /// A problem that does not stop the boot: on the console now, in booted.json later.
    fn warn(&self, msg: &str) {
        crate::console::say(&format!("layerboot: warning: {msg}"));
        self.warnings.borrow_mut().push(msg.to_string());
    }

    /// Marks the end of a stage; `detail` goes to the debug log.
    fn stage(&self, name: &'static str, detail: &str) {
        let ms = self.started.elapsed().as_millis();
        self.stages.borrow_mut().push((name, ms));
        log::debug!("{name}: {detail} ({ms} ms)");
    }

    /// Runs the whole sequence; returns only on failure (success execs the image's init).
    pub fn run(&mut self) -> Result<std::convert::Infallible> {
        let settings = self.mount_root()?;
        let args: Vec<String> = std::env::args().skip(1).collect();
        let env: Vec<String> = std::env::vars().map(|(k, v)| format!("{k}={v}")).collect();
        crate::switch::switch_root(&self.new_root, &settings.init, &args, &env)
    }

    /// Everything up to the switch: the image's fresh writable root, with the top layer,
    /// mounted at the new root and its init checked.
    pub fn mount_root(&mut self) -> Result<Settings> {
        if !self.hosted {
            mount_api_filesystems()?;
        }
        crate::console::init_logging(false);
        let cmdline_text =
            fs::read_to_string("/proc/cmdline").map_err(|e| Error::new(format!("cannot read /proc/cmdline: {e}")))?;
        let cmdline = parse_cmdline(&cmdline_text);
        let config = read_config()?;
        let settings = Settings::resolve(&cmdline, &config)?;
        if settings.debug {
            crate::console::init_logging(true);
        }
        self.settings = Some(settings.clone());
        self.stage("started", "command line and config read");
        self.mark("settings read");

        let _ = fs::write("/proc/sys/kernel/printk_devkmsg", "on\n"); // our stage timings must not be dropped
        let mut hw = Hardware::new(&config)?;
        self.mark("module index read");
        let mut forced = config.modules.clone();
        forced.extend(settings.modules.iter().cloned());
        hw.load(&forced)
            .context("loading the modules named by layerboot.modules=")?;

        let root = hw.wait_for(arg::ROOT, &settings.root, settings.timeout)?;
        self.stage("root device", &root.describe());
        self.mark("root device found");
        let fstype = settings
            .root_fstype
            .clone()
            .or(root.probe.fstype.map(str::to_string))
            .ok_or_else(|| {
                Error::new(format!(
                    "cannot tell which filesystem {} holds (fix: add rootfstype=btrfs, ext4, …)",
                    root.node.display()
                ))
            })?;
        hw.ensure_filesystem(&fstype)?;
        let store_mount = Path::new(STORE_MOUNT);
        // With the upper on tmpfs the store partition is only read.
        let store_flags = if settings.upper_tmpfs {
            MountFlags::RDONLY
        } else {
            MountFlags::empty()
        };
        mount(
            &root.node,
            store_mount,
            &fstype,
            store_flags,
            &store_options(&fstype, &settings.root_flags),
        )
        .context("mounting the image store partition (root=)")?;

        let data_root = store_mount.join(&settings.docker_path);
        self.mark("store partition mounted");
        let store = Store::open(&data_root)
            .context("reading the image store (docker_path=)")?
            .with_namespace(settings.namespace.clone());
        let image = store
            .resolve(&settings.image)
            .context("finding the image to boot (docker_image=)")?;
        self.stage(
            "image",
            &format!(
                "{} is {} ({} layers, {})",
                settings.image,
                image.id,
                image.layers.len(),
                image.driver.name()
            ),
        );
        self.mark("image resolved");

        match image.driver {
            Driver::Btrfs if fstype != "btrfs" => {
                return Err(Error::new(format!(
                    "the store uses the btrfs driver but {} is {fstype}",
                    root.node.display()
                )))
            }
            Driver::Btrfs => {}
            Driver::Overlay2 | Driver::Vfs => hw.ensure_filesystem("overlay")?,
        }
        let toplayer = self.mount_toplayer(&settings, &root, &mut hw)?;
        self.mark("top layer found");
        let new_root = self.new_root.as_path();
        let ro = if settings.read_only {
            MountFlags::RDONLY
        } else {
            MountFlags::empty()
        };
        if settings.upper_tmpfs {
            hw.ensure_filesystem("overlay")?;
            self.mount_tmpfs_root(&image, &store, toplayer.as_deref(), ro)?;
        } else {
            // Before anything is touched: the layer's generations must not be the store
            // or the top layer, nor hold them.
            check_clear_of(
                &settings.rw_name,
                "the image store (docker_path=)",
                &settings.docker_path,
            )?;
            if let Some(on_store) = toplayer.as_deref().and_then(|t| t.strip_prefix(STORE_MOUNT).ok()) {
                check_clear_of(
                    &settings.rw_name,
                    "the top layer (toplayer_path=)",
                    &on_store.to_string_lossy(),
                )?;
            }
            let origin = image
                .layers
                .first()
                .map(|l| l.dir.as_path())
                .filter(|_| image.driver == Driver::Btrfs);
            let mut layers = Layers::open(store_mount, &settings.rw_name, settings.keep, settings.rw_adopt, origin)?;
            let recovered = layers.recover();
            self.take_warnings(&mut layers);
            recovered.context("cleaning up after an interrupted boot")?;
            let kept = settings.mode_keep && reusable(&layers.current(), &image, &settings.rw_name);
            let mut fill = |layer: &Path| self.copy_toplayer(&image, &store, layer, toplayer.as_deref());
            let made = if kept {
                layers.refresh_current(&mut fill)
            } else {
                layers.make_fresh_or_prune(&image, &mut fill)
            };
            self.take_warnings(&mut layers);
            self.mark("top layer copied");
            match made {
                Ok(()) => {
                    self.stage("writable layer", &layers.current().display().to_string());
                    match image.driver {
                        Driver::Btrfs => {
                            let mut opts = vec![format!("subvol=/{}", settings.rw_name)];
                            opts.extend(
                                settings
                                    .root_flags
                                    .iter()
                                    .filter(|f| !f.starts_with("subvolid="))
                                    .cloned(),
                            );
                            mount(&root.node, new_root, "btrfs", ro, &opts.join(","))?
                        }
                        Driver::Overlay2 | Driver::Vfs => {
                            mount_overlay(&image, &store, &layers.current(), new_root, ro)?
                        }
                    }
                }
                // Never an older image's layer: this image, with nothing kept.
                Err(e) if e.errno() == Some(Errno::ENOSPC) => {
                    self.warn(&format!(
                        "{e}. Booting {} with its writable layer in memory (as layerboot.upper=tmpfs): nothing it writes is kept \
                         (fix: free space on the store's partition)",
                        settings.image
                    ));
                    hw.ensure_filesystem("overlay")?;
                    self.mount_tmpfs_root(&image, &store, toplayer.as_deref(), ro)?;
                }
                Err(e) => return Err(e.context("making the writable layer")),
            }
        }
        if toplayer.as_deref().is_some_and(|t| t.starts_with(TOPLAYER_MOUNT)) {
            let _ = unmount(Path::new(TOPLAYER_MOUNT));
        }
        self.mark("new root mounted");
        // Our own switch: leave the way back for a clean unmount at shutdown.
        if !self.hosted {
            if let Err(e) = crate::shutdown::prepare(Path::new("/init")) {
                self.warn(&format!(
                    "{e}: the store's filesystem will not be unmounted cleanly at shutdown"
                ));
            }
        }
        write_boot_record(&settings, &store, &image, &self.warnings.borrow());
        self.mark("boot record written");
        check_init(new_root, &settings.init)?;
        self.mark("init checked");
        let marks: Vec<String> = self
            .marks
            .borrow()
            .iter()
            .map(|(w, ms, cpu, user)| format!("{w} {ms}/{cpu}/{user}"))
            .collect();
        log::debug!(
            "timeline (ms since start / own CPU ms / of it in /init's code): {}",
            marks.join(", ")
        );
        let total = self.started.elapsed();
        let fs_time = crate::mounts::fs_time();
        let stages: Vec<String> = self.stages.borrow().iter().map(|(n, ms)| format!("{n} {ms}")).collect();
        let (own_cpu, own_code) = self.own_work_ms();
        log::info!(
            "layerboot: {} from {}: {} {} at {} ms (init's own work {} ms CPU, {} ms of it in its own code and the rest in the kernel serving its reads and writes; {} ms with its reads of the store; mounts and snapshots {} ms; modules and device waits {} ms; stages: {})",
            settings.image,
            image.id.get(7..19).unwrap_or(&image.id),
            // Under another initramfs (--mount-root), that one switches.
            if self.hosted { "root ready for" } else { "switching to" },
            settings.init,
            total.as_millis(),
            own_cpu,
            own_code,
            total.saturating_sub(hw.kernel_time).saturating_sub(fs_time).as_millis(),
            fs_time.as_millis(),
            hw.kernel_time.as_millis(),
            stages.join(", ")
        );
        Ok(settings)
    }

    /// Mounts the top-layer device (or reuses the store mount when it is the same
    /// device) and returns the directory to copy, if a top layer is configured.
    fn mount_toplayer(&self, s: &Settings, root: &BlockDevice, hw: &mut Hardware) -> Result<Option<PathBuf>> {
        let Some(spec) = &s.toplayer else { return Ok(None) };
        let rel = s.toplayer_path.trim_start_matches('/');
        let base = if root.matches(spec) {
            PathBuf::from(STORE_MOUNT)
        } else {
            let dev = hw.wait_for(arg::TOPLAYER, spec, s.timeout)?;
            let fstype = s
                .toplayer_fstype
                .clone()
                .or(dev.probe.fstype.map(str::to_string))
                .ok_or_else(|| {
                    Error::new(format!(
                        "cannot tell which filesystem {} holds (fix: add toplayerfstype=)",
                        dev.node.display()
                    ))
                })?;
            hw.ensure_filesystem(&fstype)?;
            mount(
                &dev.node,
                Path::new(TOPLAYER_MOUNT),
                &fstype,
                MountFlags::RDONLY,
                &s.toplayer_flags.join(","),
            )
            .context("mounting the top layer (toplayer=)")?;
            PathBuf::from(TOPLAYER_MOUNT)
        };
        // Resolved inside its device (a link in toplayer_path cannot lead off it), on one
        // filesystem.
        let dir = crate::copy::resolve_source(&base, rel).map_err(|e| {
            e.context(format!(
                "the top layer directory {} on {spec} (fix: create it, or set toplayer_path= to the directory to copy)",
                Path::new("/").join(rel).display()
            ))
        })?;
        if let Ok(on_store) = dir.strip_prefix(STORE_MOUNT) {
            check_toplayer_clear_of_store(on_store, &s.docker_path)?;
        }
        Ok(Some(dir))
    }

    fn take_warnings(&self, layers: &mut Layers) {
        for w in std::mem::take(&mut layers.warnings) {
            self.warn(&w);
        }
    }

    /// Copies the top layer into a writable layer: straight into a btrfs snapshot, or
    /// through an overlay so it lands as the booted system will see it.
    fn copy_toplayer(&self, image: &Image, store: &Store, layer: &Path, toplayer: Option<&Path>) -> Result<()> {
        let Some(src) = toplayer else { return Ok(()) };
        log::debug!("copying the top layer from {} into {}", src.display(), layer.display());
        let stats = match image.driver {
            Driver::Btrfs => copy_tree(src, layer)?,
            Driver::Overlay2 | Driver::Vfs => {
                let stage = Path::new(STAGE_MOUNT);
                mount_overlay(image, store, layer, stage, MountFlags::empty())?;
                let copied = copy_tree(src, stage);
                unmount(stage)?;
                copied?
            }
        };
        self.stage(
            "top layer",
            &format!(
                "copied from {} ({} files, {} dirs, {} links, {} bytes)",
                src.display(),
                stats.files,
                stats.dirs,
                stats.links,
                stats.bytes
            ),
        );
        stats.warnings.iter().for_each(|w| self.warn(w));
        Ok(())
    }

    /// `layerboot.upper=tmpfs`: the image under an overlay whose upper lives in memory;
    /// nothing is written to the disk.
    fn mount_tmpfs_root(&self, image: &Image, store: &Store, toplayer: Option<&Path>, ro: MountFlags) -> Result<()> {
        let home = Path::new(TMPFS_UPPER);
        mount(
            Path::new("tmpfs"),
            home,
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            "mode=0755",
        )?;
        for d in ["upper", "work"] {
            fs::create_dir_all(home.join(d)).map_err(|e| Error::io("cannot create", &home.join(d), e))?;
        }
        let new_root = self.new_root.as_path();
        mount_overlay(image, store, home, new_root, MountFlags::empty())?;
        if let Some(src) = toplayer {
            let stats = copy_tree(src, new_root)?;
            self.stage(
                "top layer",
                &format!("copied from {} ({} files)", src.display(), stats.files),
            );
            stats.warnings.iter().for_each(|w| self.warn(w));
        }
        if ro.contains(MountFlags::RDONLY) {
            mount(
                Path::new("overlay"),
                new_root,
                "overlay",
                MountFlags::REMOUNT | MountFlags::RDONLY,
                "",
            )?;
        }
        self.stage(
            "writable layer",
            "an overlay with its upper on tmpfs (layerboot.upper=tmpfs)",
        );
        Ok(())
    }
}

/// On the store's own device, the top layer (at `on_store`, from the partition's top)
/// must not hold the store: `toplayer_path=/` would copy the whole store into the root.
fn check_toplayer_clear_of_store(on_store: &Path, docker_path: &str) -> Result<()> {
    if Path::new(docker_path).starts_with(on_store) {
        return Err(Error::new(format!(
            "the top layer directory /{} holds the image store /{docker_path} (toplayer_path= on the store's own device): it would be \
             copied into the new root (fix: keep the top layer in a directory of its own, e.g. toplayer_path=/hosts/NAME)",
            on_store.display()
        )));
    }
    Ok(())
}

/// `layerboot.mode=keep`: the current layer is reused only if it was made from this image.
fn reusable(current: &Path, image: &Image, name: &str) -> bool {
    match crate::writable::layer_image(current) {
        Some(id) if id == image.id => {
            log::info!("layerboot: reusing writable layer {name} (layerboot.mode=keep)");
            true
        }
        Some(id) => {
            crate::console::say(&format!(
                "layerboot: layerboot.mode=keep, but layer {name} was made from image {id}, not {}: making a fresh layer",
                image.id
            ));
            false
        }
        None => {
            if current.exists() {
                crate::console::say(&format!(
                    "layerboot: layerboot.mode=keep, but layer {name} records no image: making a fresh layer"
                ));
            }
            false
        }
    }
}

impl Default for Boot {
    fn default() -> Self {
        Self::new()
    }
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

fn read_config() -> Result<Config> {
    match fs::read_to_string(CONFIG_PATH) {
        Ok(text) => Config::parse(&text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
        Err(e) => Err(Error::io("cannot read", Path::new(CONFIG_PATH), e)),
    }
}

/// btrfs: mount the top level (subvolid=5), where `docker_path` and the writable layers
/// live, unless the user named a subvolume id.
fn store_options(fstype: &str, flags: &[String]) -> String {
    let mut opts: Vec<String> = flags.to_vec();
    if fstype == "btrfs" && !opts.iter().any(|o| o.starts_with("subvolid=")) {
        opts.push("subvolid=5".to_string());
    }
    opts.join(",")
}

fn mount_overlay(image: &Image, store: &Store, layer: &Path, target: &Path, flags: MountFlags) -> Result<()> {
    // A containerd store may have no overlayfs snapshots at all (btrfs snapshotter only).
    let home = Some(store.driver_home())
        .filter(|h| h.is_dir())
        .unwrap_or_else(|| PathBuf::from("/"));
    let data = overlay_data(image, &home, &layer.join("upper"), &layer.join("work"))?;
    // The lower dirs are relative to the driver's home (see overlay_data).
    nix::unistd::chdir(&home).map_err(|e| Error::io("cannot enter", &home, e))?;
    let r = mount(Path::new("overlay"), target, "overlay", flags, &data);
    let _ = nix::unistd::chdir("/");
    r
}

/// Kernel modules and block devices: coldplug, hotplug, and waiting for a device.
pub struct Hardware {
    modules: KernelModules,
    walker: ModaliasWalker,
    uevents: Option<Uevents>,
    /// Time spent in the kernel loading modules and waiting for devices, not in /init's
    /// own work (reported separately).
    pub kernel_time: Duration,
}

impl Hardware {
    pub fn new(config: &Config) -> Result<Hardware> {
        // Opened before the first sysfs walk, so no device can appear unseen in between.
        let uevents = Uevents::open()
            .map_err(|e| log::warn!("no uevent socket ({e}): polling sysfs instead"))
            .ok();
        Ok(Hardware {
            modules: KernelModules::open(config)?,
            walker: ModaliasWalker::default(),
            uevents,
            kernel_time: Duration::ZERO,
        })
    }

    fn timed<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> T {
        let start = Instant::now();
        let r = crate::cost::kernel_work(|| f(self));
        self.kernel_time += start.elapsed();
        r
    }

    /// Loads named modules (with dependencies) whatever the devices.
    pub fn load(&mut self, names: &[String]) -> Result<()> {
        self.timed(|h| h.modules.load(names))
    }

    /// Loads the modules matching devices not seen before (their modaliases): those of
    /// every device on a bus if `walk_sysfs`, and those that uevents brought.
    fn coldplug(&mut self, walk_sysfs: bool, from_uevents: Vec<String>) {
        let mut aliases = if walk_sysfs {
            self.walker.scan(Path::new("/sys/bus"))
        } else {
            Vec::new()
        };
        aliases.extend(from_uevents.into_iter().filter_map(|a| self.walker.add_from_uevent(&a)));
        let names: BTreeSet<String> = aliases.iter().flat_map(|a| self.modules.index.resolve(a)).collect();
        let names: Vec<String> = names
            .into_iter()
            .filter(|n| !self.modules.attempted.contains(n))
            .collect();
        if names.is_empty() {
            return;
        }
        log::debug!("devices need modules {}", names.join(", "));
        // One device's driver failing must not stop the boot: the root may be elsewhere.
        if let Err(e) = self.timed(|h| h.modules.load(&names)) {
            log::warn!("{e}");
        }
    }

    pub fn ensure_filesystem(&mut self, fstype: &str) -> Result<()> {
        self.timed(|h| h.modules.ensure_filesystem(fstype))
    }

    /// A filesystem on several devices (btrfs) can be mounted once all of them are
    /// registered with the kernel, which udev's `btrfs device scan` does elsewhere.
    fn complete(&mut self, dev: &BlockDevice, all: &[BlockDevice]) -> Result<bool> {
        if dev.probe.fstype != Some("btrfs") || dev.probe.devices.unwrap_or(1) <= 1 {
            return Ok(true);
        }
        self.ensure_filesystem("btrfs")?;
        for member in all
            .iter()
            .filter(|d| d.probe.fstype == Some("btrfs") && d.probe.uuid == dev.probe.uuid)
        {
            crate::btrfs::scan_device(&member.node)?;
        }
        crate::btrfs::devices_ready(&dev.node)
    }

    /// Waits for the device `spec`, loading drivers for devices as they appear.
    pub fn wait_for(&mut self, what: &str, spec: &DeviceSpec, timeout: Option<Duration>) -> Result<BlockDevice> {
        let start = Instant::now();
        let kernel_time_before = self.kernel_time;
        let mut told = false;
        // sysfs is walked once; after that, uevents name what changed (the socket was open
        // before the first walk, so nothing is missed). Each walk costs hundreds of reads,
        // slow under emulation. With no uevent socket, every pass walks.
        let mut wakeup = crate::coldplug::Wakeup {
            events: true,
            lost: true,
            modaliases: Vec::new(),
        };
        let mut devices = Vec::new();
        let mut probed = Instant::now();
        let result = loop {
            let walk = wakeup.lost || self.uevents.is_none();
            self.coldplug(walk, std::mem::take(&mut wakeup.modaliases));
            // Superblocks are probed again on a change, and each second anyway (a disk
            // that failed its first read, or a filesystem written with no uevent).
            if walk || wakeup.events || probed.elapsed() >= Duration::from_secs(1) {
                devices = scan(Path::new("/sys/class/block"), Path::new("/dev"));
                probed = Instant::now();
            }
            let matching: Vec<&BlockDevice> = devices.iter().filter(|d| d.matches(spec)).collect();
            // Two filesystems answer to the name: a stick with the same label could be a
            // spoofed root or top layer. Never guess.
            let distinct = crate::probe::distinct_filesystems(&matching);
            if distinct.len() > 1 {
                let list: Vec<String> = distinct.iter().map(|d| format!("  {}", d.describe())).collect();
                break Err(Error::new(format!(
                    "{what}={spec} names {} different filesystems:\n{}\n(fix: name the one meant by UUID= or PARTUUID=, or remove the other disk)",
                    list.len(),
                    list.join("\n")
                )));
            }
            if let Some(d) = matching.first().copied() {
                match self.complete(d, &devices) {
                    Ok(true) => break Ok(d.clone()),
                    Ok(false) => {}
                    Err(e) => break Err(e),
                }
            }
            if timeout.is_some_and(|t| start.elapsed() >= t) {
                let seen: Vec<String> = devices.iter().map(|d| format!("  {}", d.describe())).collect();
                let partial = devices.iter().find(|d| d.matches(spec)).map_or(String::new(), |d| {
                    format!(
                        " (it is part of a {}-device btrfs filesystem whose other devices are missing)",
                        d.probe.devices.unwrap_or(0)
                    )
                });
                break Err(Error::new(format!(
                    "{what} device {spec} did not appear within {} s{partial}.\nblock devices seen:\n{}\n(fix: correct {what}=, or add the disk's driver to the initramfs; layerboot.timeout=S waits longer)",
                    timeout.unwrap().as_secs(),
                    if seen.is_empty() { "  none".to_string() } else { seen.join("\n") }
                )));
            }
            if !told && start.elapsed() > Duration::from_secs(2) {
                crate::console::say(&format!("layerboot: waiting for {what} device {spec}…"));
                told = true;
            }
            match &self.uevents {
                Some(u) => wakeup = u.wait(Duration::from_millis(100)),
                None => sleep(Duration::from_millis(50)),
            }
        };
        // All of the wait counts (module loads in it included, once).
        self.kernel_time = kernel_time_before + start.elapsed();
        result
    }
}

/// The kernel modules packed into the initramfs, for the running kernel.
pub struct KernelModules {
    dir: PathBuf,
    index: ModuleIndex,
    /// Modules already loaded or tried.
    attempted: BTreeSet<String>,
    /// This CPU's modalias (its features), read when first needed.
    cpu_modalias: Option<String>,
}

/// The initramfs's modules must be for the running kernel, or none will load.
pub fn check_kernel(packed: Option<&str>, running: &str) -> Result<()> {
    match packed {
        Some(packed) if packed != running => Err(Error::new(format!(
            "this initramfs holds modules for kernel {packed}, but the running kernel is {running} \
             (fix: boot the matching kernel, or rebuild the initramfs with `layerboot initramfs` from the image that carries {running})"
        ))),
        _ => Ok(()),
    }
}

impl KernelModules {
    pub fn open(config: &Config) -> Result<KernelModules> {
        let running = nix::sys::utsname::uname().map_err(|e| Error::new(format!("uname: {e}")))?;
        let running = running.release().to_string_lossy().into_owned();
        check_kernel(config.kernel.as_deref(), &running)?;
        let dir = PathBuf::from("/lib/modules").join(&running);
        let index = if dir.join("modules.dep").exists() {
            ModuleIndex::load(&dir)?
        } else {
            ModuleIndex::default()
        };
        Ok(KernelModules {
            dir,
            index,
            attempted: BTreeSet::new(),
            cpu_modalias: None,
        })
    }

    pub fn load(&mut self, names: &[String]) -> Result<()> {
        for step in self.index.load_order(names)? {
            if !self.attempted.insert(step.name.clone()) {
                continue;
            }
            if step.optional && !self.fits_cpu(&step.name) {
                log::debug!(
                    "optional module {} skipped: this CPU lacks the feature it needs",
                    step.name
                );
                continue;
            }
            let path = self.dir.join(&step.path);
            let file = fs::File::open(&path).map_err(|e| Error::io("cannot open kernel module", &path, e))?;
            match finit_module(file.as_fd(), c"", ModuleInitFlags::empty()) {
                Ok(()) => log::debug!("loaded module {}", step.name),
                Err(Errno::EEXIST) => {}
                // A soft dependency may not fit this machine (crc32c-intel without SSE4.2).
                Err(e) if step.optional => log::debug!("optional module {} not loaded: {e}", step.name),
                Err(e) => {
                    return Err(Error::new(format!(
                        "cannot load kernel module {} ({}): {e} (see dmesg for the kernel's reason)",
                        step.name,
                        path.display()
                    )))
                }
            }
        }
        Ok(())
    }

    /// Checked only for soft dependencies (a named or device-matched module is always tried).
    fn fits_cpu(&mut self, name: &str) -> bool {
        let cpu = self.cpu_modalias.get_or_insert_with(|| {
            fs::read_to_string("/sys/devices/system/cpu/modalias")
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        });
        cpu.is_empty() || self.index.fits_cpu(name, cpu)
    }

    /// Loads the module for filesystem `fstype` unless the kernel already has it.
    pub fn ensure_filesystem(&mut self, fstype: &str) -> Result<()> {
        let known = fs::read_to_string("/proc/filesystems").unwrap_or_default();
        if known.lines().any(|l| l.split_whitespace().last() == Some(fstype)) {
            return Ok(());
        }
        if self.index.resolve(fstype).is_empty() && !self.index.is_builtin(fstype) {
            return Err(Error::new(format!(
                "the kernel has no {fstype} filesystem and the initramfs has no {fstype} module (fix: rebuild the initramfs with it)"
            )));
        }
        self.load(&[fstype.to_string()])
    }
}

/// `/run/layerboot/booted.json`: which image and layer this boot came from, for the booted system.
fn write_boot_record(s: &Settings, store: &Store, image: &Image, warnings: &[String]) {
    let record = serde_json::json!({
        "image": s.image, "id": image.id, "driver": image.driver, "layer": s.rw_name,
        "store": store.root(), "engine": store.engine(), "namespace": image.namespace,
        "warnings": warnings,
    });
    let _ = fs::write("/run/layerboot/booted.json", format!("{record}\n"));
}

/// The image's init must exist and be executable, or the switch would panic the kernel.
fn check_init(new_root: &Path, init: &str) -> Result<()> {
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

/// For `main`'s failure message: the kernel command line as a map.
pub fn cmdline() -> BTreeMap<String, String> {
    parse_cmdline(&fs::read_to_string("/proc/cmdline").unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn modules_for_another_kernel_are_refused_with_the_fix() {
        assert!(check_kernel(Some("6.1.0-50-amd64"), "6.1.0-50-amd64").is_ok());
        assert!(check_kernel(None, "6.1.0-50-amd64").is_ok());
        let e = check_kernel(Some("6.1.0-50-amd64"), "6.12.0-1-amd64")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("modules for kernel 6.1.0-50-amd64, but the running kernel is 6.12.0-1-amd64")
                && e.contains("rebuild"),
            "{e}"
        );
    }

    #[test]
    fn a_top_layer_that_holds_the_store_is_refused() {
        for (top, store) in [
            ("", "var/lib/docker"),
            ("var", "var/lib/docker"),
            ("var/lib/docker", "var/lib/docker"),
        ] {
            let e = check_toplayer_clear_of_store(Path::new(top), store)
                .unwrap_err()
                .to_string();
            assert!(e.contains("holds the image store") && e.contains("fix:"), "{top}: {e}");
        }
        assert!(check_toplayer_clear_of_store(Path::new("toplayer"), "var/lib/docker").is_ok());
        assert!(check_toplayer_clear_of_store(Path::new("var/lib/docker2"), "var/lib/docker").is_ok());
    }

    #[test]
    fn btrfs_store_is_mounted_at_its_top_level() {
        assert_eq!(
            store_options("btrfs", &["compress=zstd".into()]),
            "compress=zstd,subvolid=5"
        );
        assert_eq!(store_options("btrfs", &["subvolid=256".into()]), "subvolid=256");
        assert_eq!(store_options("ext4", &[]), "");
    }
}
