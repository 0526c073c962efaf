//! Devices without udev: the modaliases of every device on a bus (coldplug), and the
//! kernel's uevents for devices that appear later (hotplug: USB disks, slow NVMe, the
//! virtio disk behind a virtio PCI device just bound). Both yield modaliases to match
//! against modules.alias, as booster does.

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{bind, recv, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType};
use nix::sys::stat::Mode;

/// Buses whose devices have no `modalias` file, so nothing to read: the kernel's own
/// system devices. `memory` alone has one device per memory block, thousands on a large
/// server; in a 1 GiB guest these buses cost 1 ms of reads that all failed. (A CPU's
/// features come from /sys/devices/system/cpu/modalias, not from the `cpu` bus.) Nor do
/// PnP devices (their drivers match the ACPI objects behind them, on the `acpi` bus) or
/// nvmem cells: 0.15 ms more.
const NO_MODALIAS: [&str; 13] = [
    "clockevents",
    "clocksource",
    "container",
    "cpu",
    "edac",
    "event_source",
    "machinecheck",
    "memory",
    "memory_tiering",
    "node",
    "nvmem",
    "pnp",
    "workqueue",
];

/// Modaliases seen so far, so each is matched once.
pub struct ModaliasWalker {
    seen: BTreeSet<String>,
    /// Whether [`scan`](Self::scan) reads the ACPI bus (see `Config::walk_acpi_bus`).
    acpi_bus: bool,
}

impl Default for ModaliasWalker {
    fn default() -> Self {
        ModaliasWalker::new(true)
    }
}

impl ModaliasWalker {
    pub fn new(acpi_bus: bool) -> ModaliasWalker {
        ModaliasWalker {
            seen: BTreeSet::new(),
            acpi_bus,
        }
    }

    /// Reads the modalias of every device on every bus (`/sys/bus/*/devices/*`, as
    /// `udevadm trigger` enumerates them) and returns those not seen before. Far fewer
    /// reads than walking all of /sys/devices, which matters at boot under emulation.
    pub fn scan(&mut self, sys_bus: &Path) -> Vec<String> {
        let mut new = Vec::new();
        // Each directory opened once, and listed and read through that descriptor: std's
        // read_dir would take a second open for the reads, and walk each path from `/`.
        let Some(mut buses) = open_dir(None, sys_bus.as_os_str().as_bytes()) else {
            return new;
        };
        let buses_fd = buses.as_raw_fd();
        let mut rel = Vec::with_capacity(64);
        for bus in buses.iter().flatten() {
            let bus = bus.file_name().to_bytes();
            if bus.starts_with(b".") || NO_MODALIAS.iter().any(|b| bus == b.as_bytes()) {
                continue;
            }
            let acpi = bus == b"acpi";
            if acpi && !self.acpi_bus {
                continue;
            }
            rel.clear();
            rel.extend_from_slice(bus);
            rel.extend_from_slice(b"/devices");
            let Some(mut devices) = open_dir(Some(buses_fd), &rel) else {
                continue;
            };
            let devices_fd = devices.as_raw_fd();
            for dev in devices.iter().flatten() {
                let dev = dev.file_name().to_bytes();
                // An ACPI object with no hardware ID is named `device:NN` by the kernel and
                // has no modalias: most of the ACPI bus (33 of 56 devices in QEMU's PC).
                if dev.starts_with(b".") || acpi && dev.starts_with(b"device:") {
                    continue;
                }
                rel.clear();
                rel.extend_from_slice(dev);
                rel.extend_from_slice(b"/modalias");
                if let Some(alias) = read_attribute_at(devices_fd, &rel) {
                    self.add(alias.trim(), &mut new);
                }
            }
        }
        new
    }

    /// Records a modalias from a uevent; returns it if it is new.
    pub fn add_from_uevent(&mut self, alias: &str) -> Option<String> {
        let mut new = Vec::new();
        self.add(alias, &mut new);
        new.pop()
    }

    fn add(&mut self, alias: &str, new: &mut Vec<String>) {
        if !alias.is_empty() && self.seen.insert(alias.to_string()) {
            new.push(alias.to_string());
        }
    }
}

/// A sysfs attribute (`rel` under the directory `dir`), read the cheap way: one openat, one
/// read of at most a page (all sysfs gives), one close. `fs::read_to_string` would add a
/// statx and a second read, and walk the whole path from `/` each time: for hundreds of
/// attributes per boot that is measurable under emulation (TCG).
pub fn read_attribute(dir: &fs::File, rel: &[u8]) -> Option<String> {
    read_attribute_at(dir.as_raw_fd(), rel)
}

fn read_attribute_at(dir: RawFd, rel: &[u8]) -> Option<String> {
    let fd = nix::fcntl::openat(Some(dir), rel, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty()).ok()?;
    // SAFETY: openat returned a fresh descriptor that nothing else owns.
    let mut file = fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let mut page = [0u8; 4096];
    let n = file.read(&mut page).ok()?;
    String::from_utf8(page[..n].to_vec()).ok()
}

/// A directory to list, opened at `rel` under `dir` (or the working directory).
fn open_dir(dir: Option<RawFd>, rel: &[u8]) -> Option<nix::dir::Dir> {
    nix::dir::Dir::openat(
        dir,
        rel,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .ok()
}

/// The `MODALIAS=` of a kernel uevent message (`add@/devices/…\0ACTION=add\0…`).
pub fn uevent_modalias(msg: &[u8]) -> Option<String> {
    msg.split(|&b| b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok())
        .find_map(|kv| kv.strip_prefix("MODALIAS=").map(str::to_string))
}

/// What a wait for uevents brought.
#[derive(Default)]
pub struct Wakeup {
    /// Some uevent came: devices changed.
    pub events: bool,
    /// Events were dropped (the socket's buffer overflowed): walk sysfs again.
    pub lost: bool,
    /// The modaliases they carried.
    pub modaliases: Vec<String>,
}

/// A socket on the kernel's uevent multicast group.
pub struct Uevents {
    fd: OwnedFd,
}

impl Uevents {
    pub fn open() -> nix::Result<Uevents> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkKObjectUEvent,
        )?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 1))?;
        Ok(Uevents { fd })
    }

    /// Waits up to `timeout` for uevents and tells what they brought.
    pub fn wait(&self, timeout: Duration) -> Wakeup {
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        let ms = PollTimeout::from(timeout.as_millis().min(u16::MAX as u128) as u16);
        let mut w = Wakeup::default();
        if !matches!(poll(&mut fds, ms), Ok(n) if n > 0) {
            return w;
        }
        let mut buf = vec![0u8; 8192];
        loop {
            match recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                Ok(0) | Err(nix::errno::Errno::EAGAIN) => break,
                Ok(n) => {
                    w.events = true;
                    w.modaliases.extend(uevent_modalias(&buf[..n]));
                }
                // The socket's buffer overflowed: some events are lost.
                Err(_) => {
                    w.events = true;
                    w.lost = true;
                    break;
                }
            }
        }
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_each_devices_modalias_once() {
        let t = tempfile::tempdir().unwrap();
        let (devices, bus) = (t.path().join("devices"), t.path().join("bus"));
        let w = |rel: &str, s: &str| {
            let p = devices.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, s).unwrap();
        };
        // As in sysfs: device dirs under devices/, linked from bus/<bus>/devices/.
        let link = |bus_name: &str, dev: &str| {
            let d = bus.join(bus_name).join("devices");
            fs::create_dir_all(&d).unwrap();
            std::os::unix::fs::symlink(devices.join(dev), d.join(dev.rsplit('/').next().unwrap())).unwrap();
        };
        w(
            "pci0000:00/0000:00:04.0/modalias",
            "pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00\n",
        );
        w(
            "pci0000:00/0000:00:04.0/virtio1/modalias",
            "virtio:d00000002v00001AF4\n",
        );
        w("platform/serial8250/modalias", "platform:serial8250\n");
        w("pci0000:00/0000:00:04.0/vendor", "0x1af4\n");
        link("pci", "pci0000:00/0000:00:04.0");
        link("virtio", "pci0000:00/0000:00:04.0/virtio1");
        link("platform", "platform/serial8250");
        // ACPI objects without a hardware ID are not read (this one lies to show it).
        w("LNXSYSTM:00/device:00/modalias", "never:read\n");
        link("acpi", "LNXSYSTM:00/device:00");
        // The kernel's system devices have no modalias: their buses are not read at all.
        w("system/memory/memory0/modalias", "never:read\n");
        link("memory", "system/memory/memory0");
        let mut walker = ModaliasWalker::default();
        let mut found = walker.scan(&bus);
        found.sort();
        assert_eq!(
            found,
            [
                "pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00",
                "platform:serial8250",
                "virtio:d00000002v00001AF4"
            ]
        );
        assert!(walker.scan(&bus).is_empty(), "nothing new the second time");
        w(
            "pci0000:00/0000:00:05.0/modalias",
            "pci:v00008086d00002922sv0sd0bc01sc06i01\n",
        );
        link("pci", "pci0000:00/0000:00:05.0");
        assert_eq!(walker.scan(&bus), ["pci:v00008086d00002922sv0sd0bc01sc06i01"]);
        assert_eq!(walker.add_from_uevent("platform:serial8250"), None);

        // An ACPI object with a hardware ID is read, unless no packed module serves ACPI
        // objects themselves; the platform device the kernel made of it is read anyway.
        w("LNXSYSTM:00/80860F14:00/modalias", "acpi:80860F14:PNP0D40:\n");
        link("acpi", "LNXSYSTM:00/80860F14:00");
        w("platform/80860F14:00/modalias", "acpi:80860F14:PNP0D40:\n");
        link("platform", "platform/80860F14:00");
        let found = ModaliasWalker::new(false).scan(&bus);
        assert!(
            found.contains(&"acpi:80860F14:PNP0D40:".to_string()),
            "the platform device's: {found:?}"
        );
        assert_eq!(walker.scan(&bus), ["acpi:80860F14:PNP0D40:"]);
        fs::remove_file(bus.join("platform/devices/80860F14:00")).unwrap();
        let mut no_acpi = ModaliasWalker::new(false);
        assert!(!no_acpi.scan(&bus).iter().any(|a| a.starts_with("acpi:")));
        assert!(ModaliasWalker::new(true)
            .scan(&bus)
            .iter()
            .any(|a| a.starts_with("acpi:")));
    }

    #[test]
    fn reads_modalias_from_a_uevent() {
        let msg = b"add@/devices/pci0000:00/0000:00:04.0/virtio1\0ACTION=add\0DEVPATH=/devices/x\0SUBSYSTEM=virtio\0MODALIAS=virtio:d00000002v00001AF4\0SEQNUM=1\0";
        assert_eq!(uevent_modalias(msg).as_deref(), Some("virtio:d00000002v00001AF4"));
        assert_eq!(uevent_modalias(b"remove@/x\0ACTION=remove\0"), None);
    }
}
