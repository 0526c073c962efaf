//! The boot sequence of `/init`, start to switch_root. Each step is a function named for
//! what it does; any failure comes back as an [`Error`] that `main` shows on the console.

use std::collections::BTreeMap;
use std::fs;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};
use sys_mount::MountFlags;

use crate::copy::copy_tree;
use crate::error::{Context, Error, Result};
use crate::kmod::ModuleIndex;
use crate::mounts::{mount, unmount};
use crate::probe::{scan, BlockDevice};
use crate::settings::{parse_cmdline, Config, DeviceSpec, Settings, CONFIG_PATH};
use crate::store::{Driver, Image, Store};
use crate::writable::{overlay_data, prepare, rotate, LayerPaths};

pub const STORE_MOUNT: &str = "/run/layerboot/store";
const TOPLAYER_MOUNT: &str = "/run/layerboot/toplayer";
const STAGE_MOUNT: &str = "/run/layerboot/stage";
pub const NEW_ROOT: &str = "/sysroot";

/// What is known once the command line is read; used by `main` to report failures.
pub struct Boot {
    started: Instant,
    pub settings: Option<Settings>,
}

impl Boot {
    pub fn new() -> Boot {
        Boot { started: Instant::now(), settings: None }
    }

    fn stage(&self, what: &str) {
        log::info!("{what} ({} ms)", self.started.elapsed().as_millis());
    }

    /// Runs the whole sequence; returns only on failure (success execs the image's init).
    pub fn run(&mut self) -> Result<std::convert::Infallible> {
        mount_api_filesystems()?;
        crate::console::init_logging(false);
        let cmdline_text = fs::read_to_string("/proc/cmdline").map_err(|e| Error::new(format!("cannot read /proc/cmdline: {e}")))?;
        let cmdline = parse_cmdline(&cmdline_text);
        let config = read_config()?;
        let settings = Settings::resolve(&cmdline, &config)?;
        if settings.debug {
            crate::console::init_logging(true);
        }
        self.settings = Some(settings.clone());
        self.stage("layerboot: started");

        let modules = KernelModules::open(&config)?;
        modules.load(&config.modules)?;
        self.stage("layerboot: storage drivers loaded");

        let root = wait_for_device("root", &settings.root, settings.timeout)?;
        self.stage(&format!("layerboot: root device {}", root.describe()));
        let fstype = settings.root_fstype.clone().or(root.probe.fstype.map(str::to_string)).ok_or_else(|| {
            Error::new(format!("cannot tell which filesystem {} holds (fix: add rootfstype=btrfs, ext4, …)", root.node.display()))
        })?;
        modules.ensure_filesystem(&fstype)?;
        let store_mount = Path::new(STORE_MOUNT);
        mount(&root.node, store_mount, &fstype, MountFlags::empty(), &store_options(&fstype, &settings.root_flags))
            .context("mounting the image store partition (root=)")?;

        let data_root = store_mount.join(&settings.docker_path);
        let store = Store::open(&data_root).context("reading the image store (docker_path=)")?;
        let image = store.resolve(&settings.image).context("finding the image to boot (docker_image=)")?;
        self.stage(&format!("layerboot: image {} is {} ({} layers, {})", settings.image, image.id, image.layers.len(), image.driver.name()));

        match image.driver {
            Driver::Btrfs if fstype != "btrfs" => {
                return Err(Error::new(format!("the store uses the btrfs driver but {} is {fstype}", root.node.display())))
            }
            Driver::Btrfs => {}
            Driver::Overlay2 => modules.ensure_filesystem("overlay")?,
        }
        let toplayer = self.mount_toplayer(&settings, &root, &modules)?;
        let paths = LayerPaths::new(store_mount, &settings.rw_name);
        self.make_writable_layer(&image, &store, &paths, toplayer.as_deref())?;
        if toplayer.as_deref().is_some_and(|t| t.starts_with(TOPLAYER_MOUNT)) {
            let _ = unmount(Path::new(TOPLAYER_MOUNT));
        }
        self.stage("layerboot: writable layer ready");

        let new_root = Path::new(NEW_ROOT);
        let ro = if settings.read_only { MountFlags::RDONLY } else { MountFlags::empty() };
        match image.driver {
            Driver::Btrfs => {
                let mut opts = vec![format!("subvol=/{}", settings.rw_name)];
                opts.extend(settings.root_flags.iter().filter(|f| !f.starts_with("subvolid=")).cloned());
                mount(&root.node, new_root, "btrfs", ro, &opts.join(","))?
            }
            Driver::Overlay2 => mount_overlay(&image, &store, &paths.current, new_root, ro)?,
        }
        write_boot_record(&settings, &image);
        check_init(new_root, &settings.init)?;
        self.stage(&format!("layerboot: switching to {}", settings.init));

        let args: Vec<String> = std::env::args().skip(1).collect();
        let env: Vec<String> = std::env::vars().map(|(k, v)| format!("{k}={v}")).collect();
        crate::switch::switch_root(new_root, &settings.init, &args, &env)
    }

    /// Mounts the top-layer device (or reuses the store mount when it is the same
    /// device) and returns the directory to copy, if a top layer is configured.
    fn mount_toplayer(&self, s: &Settings, root: &BlockDevice, modules: &KernelModules) -> Result<Option<PathBuf>> {
        let Some(spec) = &s.toplayer else { return Ok(None) };
        let rel = s.toplayer_path.trim_start_matches('/');
        let base = if root.matches(spec) {
            PathBuf::from(STORE_MOUNT)
        } else {
            let dev = wait_for_device("toplayer", spec, s.timeout)?;
            let fstype = s.toplayer_fstype.clone().or(dev.probe.fstype.map(str::to_string)).ok_or_else(|| {
                Error::new(format!("cannot tell which filesystem {} holds (fix: add toplayerfstype=)", dev.node.display()))
            })?;
            modules.ensure_filesystem(&fstype)?;
            mount(&dev.node, Path::new(TOPLAYER_MOUNT), &fstype, MountFlags::RDONLY, &s.toplayer_flags.join(","))
                .context("mounting the top layer (toplayer=)")?;
            PathBuf::from(TOPLAYER_MOUNT)
        };
        let dir = base.join(rel);
        if !dir.is_dir() {
            return Err(Error::new(format!(
                "the top layer directory {} does not exist on {spec} (fix: create it, or set toplayer_path= to the directory to copy)",
                Path::new("/").join(rel).display()
            )));
        }
        Ok(Some(dir))
    }

    /// Makes `NAME.new`, copies the top layer into it, then swaps it in as `NAME`.
    fn make_writable_layer(&self, image: &Image, store: &Store, paths: &LayerPaths, toplayer: Option<&Path>) -> Result<()> {
        prepare(paths, image).context("making a fresh writable layer")?;
        if let Some(src) = toplayer {
            let stats = match image.driver {
                Driver::Btrfs => copy_tree(src, &paths.new)?,
                Driver::Overlay2 => {
                    // Copy through an overlay so the top layer lands as the booted system will see it.
                    let stage = Path::new(STAGE_MOUNT);
                    mount_overlay(image, store, &paths.new, stage, MountFlags::empty())?;
                    let copied = copy_tree(src, stage);
                    unmount(stage)?;
                    copied?
                }
            };
            self.stage(&format!(
                "layerboot: top layer copied from {} ({} files, {} dirs, {} links, {} bytes)",
                src.display(),
                stats.files,
                stats.dirs,
                stats.links,
                stats.bytes
            ));
        }
        rotate(paths).context("installing the new writable layer")
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
            if !e.message().contains("Device or resource busy") {
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
    let home = store.root().join("overlay2");
    let data = overlay_data(image, &home, &layer.join("upper"), &layer.join("work"))?;
    // The lower dirs are relative to the driver's home (see overlay_data).
    nix::unistd::chdir(&home).map_err(|e| Error::io("cannot enter", &home, e))?;
    let r = mount(Path::new("overlay"), target, "overlay", flags, &data);
    let _ = nix::unistd::chdir("/");
    r
}

fn wait_for_device(what: &str, spec: &DeviceSpec, timeout: Option<Duration>) -> Result<BlockDevice> {
    let start = Instant::now();
    let mut told = false;
    loop {
        let devices = scan(Path::new("/sys/class/block"), Path::new("/dev"));
        if let Some(d) = devices.iter().find(|d| d.matches(spec)) {
            return Ok(d.clone());
        }
        if timeout.is_some_and(|t| start.elapsed() >= t) {
            let seen: Vec<String> = devices.iter().map(|d| format!("  {}", d.describe())).collect();
            return Err(Error::new(format!(
                "{what} device {spec} did not appear within {} s.\nblock devices seen:\n{}\n(fix: correct {what}=, or load the disk's driver with the initramfs; layerboot.timeout=S waits longer)",
                timeout.unwrap().as_secs(),
                if seen.is_empty() { "  none".to_string() } else { seen.join("\n") }
            )));
        }
        if !told && start.elapsed() > Duration::from_secs(2) {
            crate::console::say(&format!("layerboot: waiting for {what} device {spec}…"));
            told = true;
        }
        sleep(Duration::from_millis(50));
    }
}

/// The kernel modules packed into the initramfs, for the running kernel.
pub struct KernelModules {
    dir: PathBuf,
    index: ModuleIndex,
}

impl KernelModules {
    pub fn open(config: &Config) -> Result<KernelModules> {
        let running = nix::sys::utsname::uname().map_err(|e| Error::new(format!("uname: {e}")))?;
        let running = running.release().to_string_lossy().into_owned();
        if let Some(packed) = &config.kernel {
            if *packed != running {
                return Err(Error::new(format!(
                    "this initramfs holds modules for kernel {packed}, but the running kernel is {running} \
                     (fix: boot the matching kernel, or rebuild the initramfs with `layerboot initramfs` from the image that carries {running})"
                )));
            }
        }
        let dir = PathBuf::from("/lib/modules").join(&running);
        let index = if dir.join("modules.dep").exists() { ModuleIndex::load(&dir)? } else { ModuleIndex::default() };
        Ok(KernelModules { dir, index })
    }

    pub fn load(&self, names: &[String]) -> Result<()> {
        for step in self.index.load_order(names)? {
            let path = self.dir.join(&step.path);
            let file = fs::File::open(&path).map_err(|e| Error::io("cannot open kernel module", &path, e))?;
            match finit_module(file.as_fd(), c"", ModuleInitFlags::empty()) {
                Ok(()) => log::debug!("loaded module {}", step.name),
                Err(Errno::EEXIST) => {}
                // A soft dependency may not fit this machine (crc32c-intel without SSE4.2).
                Err(e) if step.optional => log::info!("optional module {} not loaded: {e}", step.name),
                Err(e) => {
                    return Err(Error::new(format!("cannot load kernel module {} ({}): {e} (see dmesg for the kernel's reason)", step.name, path.display())))
                }
            }
        }
        Ok(())
    }

    /// Loads the module for filesystem `fstype` unless the kernel already has it.
    pub fn ensure_filesystem(&self, fstype: &str) -> Result<()> {
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
fn write_boot_record(s: &Settings, image: &Image) {
    let record = serde_json::json!({
        "image": s.image, "id": image.id, "driver": image.driver, "layer": s.rw_name,
        "store": Path::new(STORE_MOUNT).join(&s.docker_path),
    });
    let _ = fs::write("/run/layerboot/booted.json", format!("{record}\n"));
}

/// The image's init must exist and be executable, or the switch would panic the kernel.
fn check_init(new_root: &Path, init: &str) -> Result<()> {
    let view = crate::lookup::MergedView::from_dirs(vec![new_root.to_path_buf()]);
    use std::os::unix::fs::PermissionsExt;
    match view.lookup_follow(init)? {
        Some(e) if e.metadata.is_file() && e.metadata.permissions().mode() & 0o111 != 0 => Ok(()),
        Some(_) => Err(Error::new(format!("{init} in the image is not an executable file (fix: init= another program)"))),
        None => Err(Error::new(format!(
            "the image has no {init} (fix: install an init system in the image, e.g. systemd-sysv, or set init=)"
        ))),
    }
}

/// For `main`'s failure message: the kernel command line as a map.
pub fn cmdline() -> BTreeMap<String, String> {
    parse_cmdline(&fs::read_to_string("/proc/cmdline").unwrap_or_default())
}
