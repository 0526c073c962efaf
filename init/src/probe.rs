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
            DeviceSpec::Path(p) => Path::new(p) == self.node || fs::canonicalize(p).is_ok_and(|c| c == self.node),
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

/// One device of each filesystem among `devices`: the members of one multi-device btrfs
/// (same filesystem UUID, more than one device) are one filesystem; anything else that
/// matched twice, a clone or a namesake, is two.
pub fn distinct_filesystems<'a>(devices: &[&'a BlockDevice]) -> Vec<&'a BlockDevice> {
    let mut out: Vec<&BlockDevice> = Vec::new();
    for d in devices {
        let one_btrfs = |o: &&BlockDevice| {
            o.probe.fstype == Some("btrfs")
                && d.probe.fstype == Some("btrfs")
                && o.probe.uuid.is_some()
                && o.probe.uuid == d.probe.uuid
                && d.probe.devices.unwrap_or(1) > 1
        };
        if !out.iter().any(one_btrfs) {
            out.push(d);
        }
    }
    out
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
        return Probe {
            fstype: Some("btrfs"),
            uuid: at(0x10020, 16).map(uuid),
            label: at(0x1012b, 256).and_then(cstr),
            devices,
        };
    }
    // ext2/3/4: superblock at 1 KiB, magic 0xEF53 at +0x38.
    if at(0x438, 2) == Some(&[0x53, 0xef]) {
        return Probe {
            fstype: Some("ext4"),
            uuid: at(0x468, 16).map(uuid),
            label: at(0x478, 16).and_then(cstr),
            devices: None,
        };
    }
    if at(0, 4) == Some(b"XFSB") {
        return Probe {
            fstype: Some("xfs"),
            uuid: at(32, 16).map(uuid),
            label: at(108, 12).and_then(cstr),
            devices: None,
        };
    }
    // vfat: boot sector signature, then the FAT32 or FAT12/16 extended BPB.
    if at(510, 2) == Some(&[0x55, 0xaa]) {
        for (fs_type, id, label) in [(0x52, 0x43, 0x47), (0x36, 0x27, 0x2b)] {
            if at(fs_type, 3) == Some(b"FAT") {
                let id = at(id, 4).map(|v| format!("{:02X}{:02X}-{:02X}{:02X}", v[3], v[2], v[1], v[0]));
                let label = at(label, 11).and_then(cstr).filter(|l| l != "NO NAME");
                return Probe {
                    fstype: Some("vfat"),
                    uuid: id,
                    label,
                    devices: None,
                };
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
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A GPT GUID: the first three fields little-endian, the rest as stored.
fn guid(b: &[u8]) -> String {
    let mut le = b[..16].to_vec();
    le[0..4].reverse();
    le[4..6].reverse();
    le[6..8].reverse();
    uuid(&le)
}

/// Reads at byte offsets: a disk, or (for tests and fuzzing) bytes in memory.
pub trait ReadAt {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
    fn size(&self) -> std::io::Result<u64>;
}

impl ReadAt for File {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
    fn size(&self) -> std::io::Result<u64> {
        // A block device's length is only known by seeking to its end.
        (&mut &*self).seek(SeekFrom::End(0))
    }
}

impl ReadAt for [u8] {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| std::io::ErrorKind::UnexpectedEof)?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.get(start..end))
            .ok_or(std::io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.len() as u64)
    }
}

/// The most GPT entry-array bytes read (the UEFI minimum is 16 KiB; 128 KiB of them is
/// already far more than any tool writes).
const GPT_MAX_ARRAY: u64 = 1 << 20;

/// Partition `number` (1-based) of a disk with `sector`-byte logical blocks: its
/// (PARTUUID, PARTLABEL). From the GPT only behind a protective (or hybrid) MBR, as the
/// kernel reads it, with the header's and the entry array's CRCs checked and every size
/// and LBA bounded by the disk; else the MBR's `<signature>-<nn>` form. Anything that
/// does not check out is no ID, never an allocation or read a disk's bytes chose.
pub fn partition_ids(disk: &(impl ReadAt + ?Sized), number: u32, sector: u64) -> (Option<String>, Option<String>) {
    let mut mbr = [0u8; 512];
    if number == 0 || disk.read_at(0, &mut mbr).is_err() || mbr[510..512] != [0x55, 0xaa] {
        return (None, None);
    }
    let protective = (0..4).any(|i| mbr[446 + 16 * i + 4] == 0xee);
    if protective {
        return gpt_entry(disk, number, sector).unwrap_or((None, None));
    }
    let sig = u32::from_le_bytes(mbr[440..444].try_into().unwrap());
    if sig != 0 && number <= 255 {
        return (Some(format!("{sig:08x}-{number:02x}")), None);
    }
    (None, None)
}

fn gpt_entry(disk: &(impl ReadAt + ?Sized), number: u32, sector: u64) -> Option<(Option<String>, Option<String>)> {
    if !(512..=65536).contains(&sector) || !sector.is_power_of_two() {
        return None;
    }
    let disk_sectors = disk.size().ok()? / sector;
    let mut hdr = vec![0u8; sector as usize];
    disk.read_at(sector, &mut hdr).ok()?;
    let le32 = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let le64 = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    let header_size = le32(&hdr, 12) as usize;
    if &hdr[0..8] != b"EFI PART" || !(92..=hdr.len()).contains(&header_size) || le64(&hdr, 24) != 1 {
        return None;
    }
    let mut crc_input = hdr[..header_size].to_vec();
    crc_input[16..20].fill(0);
    if crc32fast::hash(&crc_input) != le32(&hdr, 16) {
        return None;
    }
    let (array_lba, count, size) = (le64(&hdr, 72), le32(&hdr, 80) as u64, le32(&hdr, 84) as u64);
    // Entries are 128·2ⁿ bytes; the whole array must be small and inside the disk.
    let array_bytes = count.checked_mul(size)?;
    let array_end = array_lba.checked_mul(sector)?.checked_add(array_bytes)?;
    if size < 128
        || !size.is_power_of_two()
        || array_bytes > GPT_MAX_ARRAY
        || array_lba < 2
        || array_end > disk_sectors.checked_mul(sector)?
    {
        return None;
    }
    let mut array = vec![0u8; array_bytes as usize];
    disk.read_at(array_lba * sector, &mut array).ok()?;
    if crc32fast::hash(&array) != le32(&hdr, 88) {
        return None;
    }
    if u64::from(number) > count {
        return Some((None, None));
    }
    let entry = &array[(number as usize - 1) * size as usize..][..size as usize];
    if entry[0..16].iter().all(|&b| b == 0) {
        return Some((None, None)); // an unused entry
    }
    let name: Vec<u16> = entry[56..128]
        .chunks(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&c| c != 0)
        .collect();
    let name = String::from_utf16_lossy(&name);
    Some((Some(guid(&entry[16..32])), (!name.is_empty()).then_some(name)))
}

/// Every block device the kernel has registered, probed. Devices that cannot be read
/// (an empty CD drive) are listed with nothing probed.
pub fn scan(sys_block: &Path, dev: &Path) -> Vec<BlockDevice> {
    let mut out = Vec::new();
    let (Ok(entries), Ok(dir)) = (fs::read_dir(sys_block), File::open(sys_block)) else {
        return out;
    };
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
            let parent = link
                .as_deref()
                .and_then(|l| l.parent())
                .and_then(|p| p.file_name())
                .map(|n| n.to_os_string());
            if let (Ok(n), Some(parent)) = (n.trim().parse(), parent) {
                // The disk's logical block size places its GPT (512 or 4096 bytes).
                let queue = format!("{}/queue/logical_block_size", parent.to_string_lossy());
                let sector = read_attribute(&dir, queue.as_bytes())
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(512);
                if let Ok(disk) = File::open(dev.join(parent)) {
                    (part_uuid, part_label) = partition_ids(&disk, n, sector);
                }
            }
        }
        out.push(BlockDevice {
            name,
            node,
            probe,
            part_uuid,
            part_label,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_real_filesystems() {
        let t = tempfile::tempdir().unwrap();
        for (fs, mkfs, label) in [
            ("btrfs", "mkfs.btrfs", "lb-test"),
            ("ext4", "mkfs.ext4", "lb-ext"),
            ("vfat", "mkfs.vfat", "LBFAT"),
        ] {
            let img = t.path().join(fs);
            File::create(&img).unwrap().set_len(128 << 20).unwrap();
            let label_flag = if fs == "vfat" { "-n" } else { "-L" };
            let out = std::process::Command::new(mkfs)
                .arg(label_flag)
                .arg(label)
                .arg(&img)
                .output();
            let Ok(out) = out else {
                panic!("{mkfs} is needed for this test (tests/setup-host.sh installs it)")
            };
            assert!(out.status.success(), "{mkfs}: {}", String::from_utf8_lossy(&out.stderr));
            let p = probe(&img).unwrap();
            assert_eq!(p.fstype, Some(if fs == "vfat" { "vfat" } else { fs }), "{fs}");
            assert_eq!(p.label.as_deref(), Some(label));
            assert_eq!(p.devices, (fs == "btrfs").then_some(1));
            let blkid = std::process::Command::new("blkid")
                .args(["-o", "value", "-s", "UUID"])
                .arg(&img)
                .output()
                .unwrap();
            assert_eq!(
                p.uuid.unwrap(),
                String::from_utf8_lossy(&blkid.stdout).trim(),
                "{fs} UUID as blkid reads it"
            );
        }
    }

    #[test]
    fn counts_the_devices_of_a_multi_device_btrfs() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        for p in [&a, &b] {
            File::create(p).unwrap().set_len(256 << 20).unwrap();
        }
        let out = std::process::Command::new("mkfs.btrfs")
            .args(["-q", "-d", "raid1", "-m", "raid1", "-L", "two"])
            .arg(&a)
            .arg(&b)
            .output()
            .unwrap();
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
                c.stdin
                    .take()
                    .unwrap()
                    .write_all(b"label: gpt\nsize=16M, type=U, name=esp\ntype=L, name=store\n")?;
                c.wait_with_output()
            })
            .unwrap();
        assert!(out.status.success());
        let sfdisk = std::process::Command::new("sfdisk")
            .args(["--part-uuid"])
            .arg(img)
            .arg("2")
            .output()
            .unwrap();
        String::from_utf8_lossy(&sfdisk.stdout).trim().to_ascii_lowercase()
    }

    #[test]
    fn reads_gpt_partition_uuids() {
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("disk");
        let want = gpt_disk(&img);
        let disk = File::open(&img).unwrap();
        assert_eq!(partition_ids(&disk, 2, 512), (Some(want), Some("store".to_string())));
        assert_eq!(partition_ids(&disk, 9, 512), (None, None));
        assert_eq!(
            partition_ids(&disk, 2, 4096),
            (None, None),
            "no GPT where 4 KiB sectors would put it"
        );
    }

    /// A disk whose MBR has one Linux partition, with a stale GPT header behind it that
    /// claims entries of `size` bytes (`count` of them), its CRC made right.
    fn mbr_disk_with_stale_gpt(size: u32, count: u32) -> Vec<u8> {
        let mut d = vec![0u8; 1 << 20];
        d[440..444].copy_from_slice(&0x1234_abcdu32.to_le_bytes());
        d[446 + 4] = 0x83;
        d[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
        d[510] = 0x55;
        d[511] = 0xaa;
        let h = &mut d[512..1024];
        h[0..8].copy_from_slice(b"EFI PART");
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&1u64.to_le_bytes());
        h[72..80].copy_from_slice(&2u64.to_le_bytes());
        h[80..84].copy_from_slice(&count.to_le_bytes());
        h[84..88].copy_from_slice(&size.to_le_bytes());
        let crc = crc32fast::hash(&h[..92]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        d
    }

    #[test]
    fn a_stale_gpt_behind_an_mbr_is_not_read_and_its_sizes_are_never_trusted() {
        for (size, count) in [(0xffff_ff80, 1), (128, 0xffff_ffff), (128, 4)] {
            let disk = mbr_disk_with_stale_gpt(size, count);
            assert_eq!(
                partition_ids(&disk[..], 1, 512),
                (Some("1234abcd-01".to_string()), None),
                "the MBR's ID, {size}×{count}"
            );
            // Even with the MBR made protective, the sizes are bounded: no ID, no huge read.
            let mut protective = disk.clone();
            protective[446 + 4] = 0xee;
            let ids = partition_ids(&protective[..], 1, 512);
            assert_eq!(ids, (None, None), "{size}×{count}");
        }
        // A header whose CRC is wrong is no GPT.
        let mut bad = mbr_disk_with_stale_gpt(128, 4);
        bad[446 + 4] = 0xee;
        bad[512 + 80] ^= 1;
        assert_eq!(partition_ids(&bad[..], 1, 512), (None, None));
        assert_eq!(partition_ids(&bad[..8], 1, 512), (None, None), "a truncated disk");
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
        std::os::unix::fs::symlink(
            "../../devices/pci0000:00/0000:00:04.0/virtio1/block/vdz",
            sys.join("class/block/vdz"),
        )
        .unwrap();
        std::os::unix::fs::symlink(
            "../../devices/pci0000:00/0000:00:04.0/virtio1/block/vdz/vdz2",
            sys.join("class/block/vdz2"),
        )
        .unwrap();
        let part_uuid = gpt_disk(&dev.join("vdz"));
        File::create(dev.join("vdz2")).unwrap().set_len(32 << 20).unwrap();
        let out = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-L", "lb-part"])
            .arg(dev.join("vdz2"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

        let found = scan(&sys.join("class/block"), &dev);
        let names: Vec<&str> = found.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["vdz", "vdz2"]);
        let part = &found[1];
        assert_eq!(
            (part.part_uuid.as_deref(), part.part_label.as_deref()),
            (Some(part_uuid.as_str()), Some("store"))
        );
        assert_eq!(
            (part.probe.fstype, part.probe.label.as_deref()),
            (Some("ext4"), Some("lb-part"))
        );
        assert_eq!(
            (found[0].part_uuid.as_deref(), found[0].probe.fstype),
            (None, None),
            "the whole disk is no partition"
        );
        assert!(
            part.matches(&DeviceSpec::parse("root", "PARTLABEL=store").unwrap())
                && part.matches(&DeviceSpec::parse("root", &format!("PARTUUID={part_uuid}")).unwrap())
        );
    }

    #[test]
    fn namesakes_are_two_filesystems_and_a_multi_device_btrfs_is_one() {
        let dev = |node: &str, fstype: &'static str, uuid: &str, devices: u64| BlockDevice {
            name: node.into(),
            node: PathBuf::from(node),
            probe: Probe {
                fstype: Some(fstype),
                uuid: Some(uuid.into()),
                label: Some("store".into()),
                devices: Some(devices),
            },
            part_uuid: None,
            part_label: None,
        };
        let (a, b) = (dev("/dev/vda", "btrfs", "u1", 2), dev("/dev/vdb", "btrfs", "u1", 2));
        assert_eq!(distinct_filesystems(&[&a, &b]).len(), 1, "two members of one btrfs");
        let (c, d) = (dev("/dev/vda", "ext4", "u1", 1), dev("/dev/sda1", "ext4", "u2", 1));
        assert_eq!(
            distinct_filesystems(&[&c, &d]).len(),
            2,
            "a USB stick with the same label"
        );
        let (e, f) = (dev("/dev/vda", "btrfs", "u1", 1), dev("/dev/sda", "btrfs", "u1", 1));
        assert_eq!(distinct_filesystems(&[&e, &f]).len(), 2, "a cloned single-device btrfs");
    }

    #[test]
    fn empty_device_is_nothing() {
        assert_eq!(probe_bytes(&[0u8; 70000]), Probe::default());
    }
}
