//! Devices without udev: the modaliases of every device in sysfs (coldplug), and the
//! kernel's uevents for devices that appear later (hotplug: USB disks, slow NVMe, the
//! virtio disk behind a virtio PCI device just bound). Both yield modaliases to match
//! against modules.alias, as booster does.

use std::collections::BTreeSet;
use std::fs;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{bind, recv, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType};

/// Modaliases seen so far, so each is matched once.
#[derive(Default)]
pub struct ModaliasWalker {
    seen: BTreeSet<String>,
}

impl ModaliasWalker {
    /// Walks `sys_devices` (/sys/devices) and returns the modaliases not seen before.
    pub fn scan(&mut self, sys_devices: &Path) -> Vec<String> {
        let mut new = Vec::new();
        let mut todo = vec![sys_devices.to_path_buf()];
        while let Some(dir) = todo.pop() {
            let Ok(entries) = fs::read_dir(&dir) else { continue };
            for e in entries.flatten() {
                // Symlinks (subsystem, driver, …) lead back up the tree: not followed.
                let Ok(ft) = e.file_type() else { continue };
                if ft.is_dir() {
                    todo.push(e.path());
                } else if ft.is_file() && e.file_name() == "modalias" {
                    if let Ok(alias) = fs::read_to_string(e.path()) {
                        self.add(alias.trim(), &mut new);
                    }
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

/// The `MODALIAS=` of a kernel uevent message (`add@/devices/…\0ACTION=add\0…`).
pub fn uevent_modalias(msg: &[u8]) -> Option<String> {
    msg.split(|&b| b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok())
        .find_map(|kv| kv.strip_prefix("MODALIAS=").map(str::to_string))
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

    /// Waits up to `timeout` for uevents and returns the modaliases they carry.
    pub fn wait(&self, timeout: Duration) -> Vec<String> {
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        let ms = PollTimeout::try_from(timeout.as_millis().min(u16::MAX as u128) as u16).unwrap_or(PollTimeout::NONE);
        if !matches!(poll(&mut fds, ms), Ok(n) if n > 0) {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut buf = vec![0u8; 8192];
        while let Ok(n) = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
            if n == 0 {
                break;
            }
            out.extend(uevent_modalias(&buf[..n]));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_each_devices_modalias_once() {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path();
        let w = |rel: &str, s: &str| {
            let p = sys.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, s).unwrap();
        };
        w("pci0000:00/0000:00:04.0/modalias", "pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00\n");
        w("pci0000:00/0000:00:04.0/virtio1/modalias", "virtio:d00000002v00001AF4\n");
        w("platform/serial8250/modalias", "platform:serial8250\n");
        w("pci0000:00/0000:00:04.0/vendor", "0x1af4\n");
        std::os::unix::fs::symlink(sys.join("pci0000:00"), sys.join("pci0000:00/0000:00:04.0/subsystem")).unwrap();
        let mut walker = ModaliasWalker::default();
        let mut found = walker.scan(sys);
        found.sort();
        assert_eq!(found, ["pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00", "platform:serial8250", "virtio:d00000002v00001AF4"]);
        assert!(walker.scan(sys).is_empty(), "nothing new the second time");
        w("pci0000:00/0000:00:05.0/modalias", "pci:v00008086d00002922sv0sd0bc01sc06i01\n");
        assert_eq!(walker.scan(sys), ["pci:v00008086d00002922sv0sd0bc01sc06i01"]);
        assert_eq!(walker.add_from_uevent("platform:serial8250"), None);
    }

    #[test]
    fn reads_modalias_from_a_uevent() {
        let msg = b"add@/devices/pci0000:00/0000:00:04.0/virtio1\0ACTION=add\0DEVPATH=/devices/x\0SUBSYSTEM=virtio\0MODALIAS=virtio:d00000002v00001AF4\0SEQNUM=1\0";
        assert_eq!(uevent_modalias(msg).as_deref(), Some("virtio:d00000002v00001AF4"));
        assert_eq!(uevent_modalias(b"remove@/x\0ACTION=remove\0"), None);
    }
}
