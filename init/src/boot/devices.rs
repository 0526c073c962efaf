//! Devices without udev: kernel modules for what is on the buses (coldplug, then
//! uevents), block devices probed for `root=`/`toplayer=`, and the wait for them.

use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use super::modules::KernelModules;
use crate::coldplug::{ModaliasWalker, Uevents};
use crate::console::say;
use crate::error::{Error, Result};
use crate::probe::{scan, BlockDevice};
use crate::settings::{Config, DeviceSpec};

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
            walker: ModaliasWalker::new(config.walk_acpi_bus != Some(false)),
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
        let names = self.modules.needed_by(&aliases);
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
                say(&format!("layerboot: waiting for {what} device {spec}…"));
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
