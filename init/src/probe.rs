//! Block devices without udev or libblkid: what filesystem a device holds (type, UUID,
//! label, read from its superblock) and, for partitions, the GPT/MBR partition UUID.
//! No listed crate reads superblocks, and libblkid would mean linking C into /init; the
//! few fixed offsets below are all a root= lookup needs.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::coldplug::read_attribute;
use crate::settings::DeviceSpec;

/// What a device holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Probe {
    pub fstype: Option<&'static str>,
    pub uuid: Option<String>,
    pub label: Option<String>,
    /// btrfs: how many devices the filesystem spans.
    pub devices: Option<u64>,
}

/// A block device as seen in /sys/class/block, with what its superblock says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDevice {
    pub name: String,
    pub node: PathBuf,
    pub probe: Probe,
    pub part_uuid: Option<String>,
    pub part_label: Option<String>,
}

impl BlockDevice {
    pub fn matches(&self, spec: &DeviceSpec) -> bool {
        let eq = |a: &Option<String>, b: &str| a.as_deref().is_some_and(|a| a.eq_ignore_ascii_case(b));
        match spec {
            DeviceSpec::Label(l) => self.probe.label.as_deref() == Some(l.as_str()),
            DeviceSpec::Uuid(u) => eq(&self.probe.uuid, u),
            DeviceSpec::PartUuid(u) => eq(&self.part_uuid, u),
            DeviceSpec::PartLabel(l) => self.part_label.as_deref() == Some(l.as_str()),
            DeviceSpec::Path(p) => {
                Path::new(p) == self.node || fs::canonicalize(p).is_ok_and(|c| c == self.node)
            }
        }
    }

    /// One line for "devices seen" listings.
    pub fn describe(&self) -> String {
        format!(
            "{} type={} label={} uuid={} partuuid={}",
            self.node.display(),
            self.probe.fstype.unwrap_or("?"),
            self.probe.label.as_deref().unwrap_or("-"),
            self.probe.uuid.as_deref().unwrap_or("-"),
            self.part_uuid.as_deref().unwrap_or("-")
        )
    }
}

const SUPERBLOCK_SPAN: usize = 0x10000 + 0x1000;

/// Reads the superblock area of `dev` and recognises btrfs, ext2/3/4, xfs and vfat.
pub fn probe(dev: &Path) -> std::io::Result<Probe> {
    let mut buf = vec![0u8; SUPERBLOCK_SPAN];
    let mut f = File::open(dev)?;
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    buf.truncate(n);
    Ok(probe_bytes(&buf))
}

pub fn probe_bytes(b: &[u8]) -> Probe {
    let at = |off: usize, len: usize| b.get(off..off + len);
    // btrfs: primary superblock at 64 KiB, magic at +0x40.
    if at(0x10040, 8) == Some(b"_BHRfS_M") {
        let devices = at(0x10088, 8).map(|v| u64::from_le_bytes(v.try_into().unwrap()));
        return Probe { fstype: Some("btrfs"), uuid: at(0x10020, 16).map(uuid), label: at(0x1012b, 256).and_then(cstr), devices };
    }
    // ext2/3/4: superblock at 1 KiB, magic 0xEF53 at +0x38.
    if at(0x438, 2) == Some(&[0x53, 0xef]) {
        return Probe { fstype: Some("ext4"), uuid: at(0x468, 16).map(uuid), label: at(0x478, 16).and_then(cstr), devices: None };
    }
    if at(0, 4) == Some(b"XFSB") {
        return Probe { fstype: Some("xfs"), uuid: at(32, 16).map(uuid), label: at(108, 12).and_then(cstr), devices: None };
    }
    // vfat: boot sector signature, then the FAT32 or FAT12/16 extended BPB.
    if at(510, 2) == Some(&[0x55, 0xaa]) {
        for (fs_type, id, label) in [(0x52, 0x43, 0x47), (0x36, 0x27, 0x2b)] {
            if at(fs_type, 3) == Some(b"FAT") {
                let id = at(id, 4).map(|v| format!("{:02X}{:02X}-{:02X}{:02X}", v[3], v[2], v[1], v[0]));
                let label = at(label, 11).and_then(cstr).filter(|l| l != "NO NAME");
                return Probe { fstype: Some("vfat"), uuid: id, label, devices: None };
            }
        }
    }
    Probe::default()
}

fn cstr(b: &[u8]) -> Option<String> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    let s = String::from_utf8_lossy(&b[..end]).trim_end().to_string();
    (!s.is_empty()).then_some(s)
}

/// 16 bytes as a big-endian UUID string (btrfs, ext4 and xfs store them so).
fn uuid(b: &[u8]) -> String {
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// A GPT GUID: the first three fields little-endian, the rest as stored.
fn guid(b: &[u8]) -> String {
    let mut le = b[..16].to_vec();
    le[0..4].reverse();
    le[4..6].reverse();
    le[6..8].reverse();
    uuid(&le)
}

/// Partition `number` (1-based) of a disk: its (PARTUUID, PARTLABEL), from GPT, or the
/// MBR's `<signature>-<nn>` form.
pub fn partition_ids(disk: &Path, number: u32) -> std::io::Result<(Option<String>, Option<String>)> {
    let mut f = File::open(disk)?;
    let mut mbr = [0u8; 512];
    f.read_exact(&mut mbr)?;
    for sector in [512u64, 4096] {
        let mut hdr = [0u8; 92];
        f.seek(SeekFrom::Start(sector))?;
        if f.read_exact(&mut hdr).is_err() || &hdr[0..8] != b"EFI PART" {
            continue;
        }
        let lba = u64::from_le_bytes(hdr[72..80].try_into().unwrap());
        let count = u32::from_le_bytes(hdr[80..84].try_into().unwrap());
        let size = u32::from_le_bytes(hdr[84..88].try_into().unwrap()) as u64;
        if number == 0 || number > count || size < 128 {
            return Ok((None, None));
        }
        let mut entry = vec![0u8; size as usize];
        f.seek(SeekFrom::Start(lba * sector + (number as u64 - 1) * size))?;
        f.read_exact(&mut entry)?;
        if entry[0..16].iter().all(|&b| b == 0) {
            return Ok((None, None)); // an unused entry
        }
        let name: Vec<u16> = entry[56..128].chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])).take_while(|&c| c != 0).collect();
        let name = String::from_utf16_lossy(&name);
        return Ok((Some(guid(&entry[16..32])), (!name.is_empty()).then_some(name)));
    }
    if mbr[510..512] == [0x55, 0xaa] {
        let sig = u32::from_le_bytes(mbr[440..444].try_into().unwrap());
        if sig != 0 {
            return Ok((Some(format!("{sig:08x}-{number:02x}")), None));
        }
    }
    Ok((None, None))
}

/// Every block device the kernel has registered, probed. Devices that cannot be read
/// (an empty CD drive) are listed with nothing probed.
pub fn scan(sys_block: &Path, dev: &Path) -> Vec<BlockDevice> {
    let mut out = Vec::new();
    let (Ok(entries), Ok(dir)) = (fs::read_dir(sys_block), File::open(sys_block)) else { return out };
    let mut names: Vec<String> = entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
    names.sort();
    for name in names {
        if name.starts_with("loop") || name.starts_with("ram") {
            continue;
        }
        let node = dev.join(&name);
        let probe = probe(&node).unwrap_or_default();
        let (mut part_uuid, mut part_label) = (None, None);
        if let Some(n) = read_attribute(&dir, format!("{name}/partition").as_bytes()) {
            // A partition's sysfs link ends in …/block/<disk>/<partition>: one readlink,
            // where canonicalize would readlink every component.
            let link = fs::read_link(sys_block.join(&name)).ok();
            let parent = link.as_deref().and_then(|l| l.parent()).and_then(|p| p.file_name()).map(|n| n.to_os_string());
            if let (Ok(n), Some(parent)) = (n.trim().parse(), parent) {
                (part_uuid, part_label) = partition_ids(&dev.join(parent), n).unwrap_or((None, None));
            }
        }
        out.push(BlockDevice { name, node, probe, part_uuid, part_label });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_real_filesystems() {
        let t = tempfile::tempdir().unwrap();
        for (fs, mkfs, label) in [("btrfs", "mkfs.btrfs", "lb-test"), ("ext4", "mkfs.ext4", "lb-ext"), ("vfat", "mkfs.vfat", "LBFAT")] {
            let img = t.path().join(fs);
            File::create(&img).unwrap().set_len(128 << 20).unwrap();
            let label_flag = if fs == "vfat" { "-n" } else { "-L" };
            let out = std::process::Command::new(mkfs).arg(label_flag).arg(label).arg(&img).output();
            let Ok(out) = out else { panic!("{mkfs} is needed for this test (tests/setup-host.sh installs it)") };
            assert!(out.status.success(), "{mkfs}: {}", String::from_utf8_lossy(&out.stderr));
            let p = probe(&img).unwrap();
            assert_eq!(p.fstype, Some(if fs == "vfat" { "vfat" } else { fs }), "{fs}");
            assert_eq!(p.label.as_deref(), Some(label));
            assert_eq!(p.devices, (fs == "btrfs").then_some(1));
            let blkid = std::process::Command::new("blkid").args(["-o", "value", "-s", "UUID"]).arg(&img).output().unwrap();
            assert_eq!(p.uuid.unwrap(), String::from_utf8_lossy(&blkid.stdout).trim(), "{fs} UUID as blkid reads it");
        }
    }

    #[test]
    fn counts_the_devices_of_a_multi_device_btrfs() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        for p in [&a, &b] {
            File::create(p).unwrap().set_len(256 << 20).unwrap();
        }
        let out = std::process::Command::new("mkfs.btrfs").args(["-q", "-d", "raid1", "-m", "raid1", "-L", "two"]).arg(&a).arg(&b).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let (pa, pb) = (probe(&a).unwrap(), probe(&b).unwrap());
        assert_eq!((pa.devices, pb.devices), (Some(2), Some(2)));
        assert_eq!(pa.uuid, pb.uuid, "one filesystem");
    }

    /// A 64 MiB GPT disk image with partitions "esp" and "store"; returns store's PARTUUID.
    fn gpt_disk(img: &Path) -> String {
        File::create(img).unwrap().set_len(64 << 20).unwrap();
        let out = std::process::Command::new("sfdisk")
            .arg(img)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(b"label: gpt\nsize=16M, type=U, name=esp\ntype=L, name=store\n")?;
                c.wait_with_output()
            })
            .unwrap();
        assert!(out.status.success());
        let sfdisk = std::process::Command::new("sfdisk").args(["--part-uuid"]).arg(img).arg("2").output().unwrap();
        String::from_utf8_lossy(&sfdisk.stdout).trim().to_ascii_lowercase()
    }

    #[test]
    fn reads_gpt_partition_uuids() {
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("disk");
        let want = gpt_disk(&img);
        assert_eq!(partition_ids(&img, 2).unwrap(), (Some(want), Some("store".to_string())));
        assert_eq!(partition_ids(&img, 9).unwrap(), (None, None));
    }

    #[test]
    fn scan_finds_a_partitions_disk_through_its_sysfs_link() {
        // As in sysfs: /sys/class/block/<name> links into the device tree, where a
        // partition sits under its disk and has a `partition` number. The "devices" in
        // dev/ are image files: the disk's GPT and the partition's ext4.
        let t = tempfile::tempdir().unwrap();
        let (sys, dev) = (t.path().join("sys"), t.path().join("dev"));
        let disk_dir = sys.join("devices/pci0000:00/0000:00:04.0/virtio1/block/vdz");
        fs::create_dir_all(disk_dir.join("vdz2")).unwrap();
        fs::write(disk_dir.join("vdz2/partition"), "2\n").unwrap();
        fs::create_dir_all(sys.join("class/block")).unwrap();
        fs::create_dir_all(&dev).unwrap();
        std::os::unix::fs::symlink("../../devices/pci0000:00/0000:00:04.0/virtio1/block/vdz", sys.join("class/block/vdz")).unwrap();
        std::os::unix::fs::symlink("../../devices/pci0000:00/0000:00:04.0/virtio1/block/vdz/vdz2", sys.join("class/block/vdz2")).unwrap();
        let part_uuid = gpt_disk(&dev.join("vdz"));
        File::create(dev.join("vdz2")).unwrap().set_len(32 << 20).unwrap();
        let out = std::process::Command::new("mkfs.ext4").args(["-q", "-L", "lb-part"]).arg(dev.join("vdz2")).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

        let found = scan(&sys.join("class/block"), &dev);
        let names: Vec<&str> = found.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["vdz", "vdz2"]);
        let part = &found[1];
        assert_eq!((part.part_uuid.as_deref(), part.part_label.as_deref()), (Some(part_uuid.as_str()), Some("store")));
        assert_eq!((part.probe.fstype, part.probe.label.as_deref()), (Some("ext4"), Some("lb-part")));
        assert_eq!((found[0].part_uuid.as_deref(), found[0].probe.fstype), (None, None), "the whole disk is no partition");
        assert!(part.matches(&DeviceSpec::parse("root", "PARTLABEL=store").unwrap()) && part.matches(&DeviceSpec::parse("root", &format!("PARTUUID={part_uuid}")).unwrap()));
    }

    #[test]
    fn empty_device_is_nothing() {
        assert_eq!(probe_bytes(&[0u8; 70000]), Probe::default());
    }
}
