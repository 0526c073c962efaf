//! Which kernel modules go into the initramfs, and their bytes: the default set for
//! common PCs and VMs (or just this machine's, `--host-only`), closed over modules.dep
//! and soft dependencies, checked against the kernel version, decompressed, with the
//! firmware files they name.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use layerboot_init::coldplug::ModaliasWalker;
use layerboot_init::kmod::{ModuleIndex, Step, INDEX_FILES};

use crate::image::{SourceImage, MAX_IMAGE_FILE};
use layerboot_init::error::{Error, Result};

/// Drivers that find the disk on common PCs and VMs; /init loads those its devices'
/// modaliases ask for.
pub const STORAGE_DRIVERS: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "ahci",
    "nvme",
    "sd_mod", // disks
    "usb_storage",
    "uas",
    "xhci_pci",
    "ehci_pci",
    "ohci_pci",
    "uhci_hcd", // USB disks
    "sdhci_pci",
    "sdhci_acpi",
    "mmc_block", // SD cards
];
/// Filesystems the store, the top layer and the new root may need; loaded on demand.
pub const FILESYSTEMS: &[&str] = &["btrfs", "overlay", "ext4", "xfs", "vfat", "nls_cp437", "nls_iso8859_1"];

/// A module as packed: where it goes and its (decompressed) bytes.
pub struct Packed {
    /// Path relative to /lib/modules/<kver>: `.ko`, or `.ko.zst` once compressed for /init.
    pub path: String,
    pub data: Vec<u8>,
}

pub struct Selection {
    pub modules: Vec<Packed>,
    /// The index files restricted to the packed modules, paths decompressed.
    pub index_files: BTreeMap<&'static str, String>,
    /// `lib/firmware/...` path → bytes.
    pub firmware: BTreeMap<String, Vec<u8>>,
    /// Whether a packed module serves ACPI objects themselves ([`drives_acpi_objects`]):
    /// only then does /init read the ACPI bus's devices.
    pub drives_acpi_objects: bool,
    pub notes: Vec<String>,
}

/// The largest module index file read from a source: Debian's modules.alias for all of
/// a kernel's modules is 1.3 MB.
const MAX_INDEX_BYTES: u64 = 64 << 20;

pub fn read_index(src: &SourceImage, modules_dir: &str) -> Result<ModuleIndex> {
    let mut text = BTreeMap::new();
    for f in INDEX_FILES {
        let path = format!("{modules_dir}/{f}");
        let t = match src.read_at_most(
            &path,
            MAX_INDEX_BYTES,
            "a module index's",
            "run depmod for that kernel again",
        )? {
            Some(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            None if f == "modules.dep" => {
                return Err(format!(
                    "{} has no {modules_dir}/modules.dep (fix: run depmod for that kernel)",
                    src.name
                )
                .into())
            }
            None => String::new(),
        };
        text.insert(f, t);
    }
    Ok(ModuleIndex::parse(
        &text["modules.dep"],
        &text["modules.softdep"],
        &text["modules.alias"],
        &text["modules.builtin"],
    ))
}

/// The modules to pack: `extra` must exist; defaults that this kernel lacks are skipped
/// with a note; with `host_only`, only drivers this machine's devices match and the
/// filesystems it has mounted.
pub fn select(index: &ModuleIndex, kver: &str, extra: &[String], host_only: bool) -> Result<(Vec<Step>, Vec<String>)> {
    let mut notes = Vec::new();
    let mut wanted: Vec<String> = Vec::new();
    // This machine's devices resolved to module names once, not once per candidate.
    let host = host_only.then(host_needs).map(|(devices, filesystems)| {
        let drivers: BTreeSet<String> = devices.iter().flat_map(|alias| index.resolve(alias)).collect();
        (drivers, filesystems)
    });
    for m in STORAGE_DRIVERS.iter().chain(FILESYSTEMS) {
        let known = !index.resolve(m).is_empty() || index.is_builtin(m);
        if !known {
            notes.push(format!("kernel {kver} has no module {m}; left out"));
            continue;
        }
        if let Some((drivers, filesystems)) = &host {
            let needed = if FILESYSTEMS.contains(m) {
                filesystems.contains(*m) || *m == "overlay" || m.starts_with("nls_") && filesystems.contains("vfat")
            } else {
                index.resolve(m).iter().any(|n| drivers.contains(n))
            };
            if !needed {
                continue;
            }
        }
        wanted.push(m.to_string());
    }
    for m in extra {
        if index.resolve(m).is_empty() && !index.is_builtin(m) {
            return Err(format!("module {m} (--module) is not in modules.dep of kernel {kver} (fix: check its name with `modinfo -k {kver} {m}`)").into());
        }
        wanted.push(m.clone());
    }
    let steps = index.load_order(&wanted)?;
    Ok((steps, notes))
}

/// This machine's device modaliases and mounted filesystem types.
fn host_needs() -> (Vec<String>, BTreeSet<String>) {
    let devices = ModaliasWalker::default().scan(Path::new("/sys/bus"));
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let filesystems = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .map(str::to_string)
        .collect();
    (devices, filesystems)
}

const COMPRESSED: [&str; 3] = [".xz", ".zst", ".gz"];

/// Reads every module of `steps`, decompressed, after checking its vermagic.
pub fn pack(
    src: &SourceImage,
    index: &ModuleIndex,
    modules_dir: &str,
    kver: &str,
    steps: &[Step],
) -> Result<Selection> {
    let mut modules = Vec::new();
    let mut firmware = BTreeMap::new();
    let mut notes = Vec::new();
    let mut names = BTreeSet::new();
    let mut acpi_objects_driven = false;
    for step in steps {
        if !plain_relative(&step.path) {
            return Err(format!(
                "modules.dep of kernel {kver} names module {} at '{}', a path leaving {modules_dir} (fix: regenerate it with `depmod {kver}` in the image)",
                step.name, step.path
            ).into());
        }
        let raw = src.read(&format!("{modules_dir}/{}", step.path))?.ok_or_else(|| {
            format!(
                "module {} is listed in modules.dep but {modules_dir}/{} is missing from {}",
                step.name, step.path, src.name
            )
        })?;
        let data = decompress(&step.path, raw).map_err(|e| format!("cannot decompress module {}: {e}", step.path))?;
        let not_a_module = |e: String| format!("module {} is not a kernel module: {e}", step.path);
        let elf = goblin::elf::Elf::parse(&data).map_err(|e| not_a_module(e.to_string()))?;
        let info = modinfo(&elf, &data).map_err(|e| not_a_module(e.to_string()))?;
        acpi_objects_driven |= drives_acpi_objects(&elf, &info);
        let vermagic = info
            .iter()
            .find_map(|(k, v)| (*k == "vermagic").then_some(*v))
            .unwrap_or("");
        if vermagic.split_whitespace().next() != Some(kver) {
            return Err(format!(
                "module {} was built for kernel '{}', not {kver}: the image's modules and kernel do not match (fix: reinstall the kernel package in the image)",
                step.path,
                vermagic.split_whitespace().next().unwrap_or("?")
            ).into());
        }
        for (_, fw) in info.iter().filter(|(k, _)| *k == "firmware") {
            if !plain_relative(fw) {
                return Err(format!(
                    "module {} names firmware '{fw}', a path leaving /lib/firmware: refused",
                    step.path
                )
                .into());
            }
            match find_firmware(src, fw)? {
                Some((path, bytes)) => {
                    firmware.insert(path, bytes);
                }
                None => notes.push(format!("firmware {fw} for {} is not in the image", step.name)),
            }
        }
        names.insert(step.name.clone());
        modules.push(Packed {
            path: strip_compression(&step.path),
            data,
        });
    }
    let mut index_files = index.render(&names);
    for text in index_files.values_mut() {
        for suffix in COMPRESSED {
            *text = text.replace(&format!(".ko{suffix}"), ".ko");
        }
    }
    Ok(Selection {
        modules,
        index_files,
        firmware,
        drives_acpi_objects: acpi_objects_driven,
        notes,
    })
}

impl Selection {
    /// Each module as its own zstd frame (`NAME.ko.zst`, named so in modules.dep): the
    /// kernel then unpacks a few MiB of already-compressed modules at boot instead of
    /// decompressing all 18 MiB, and /init decompresses only those it loads.
    pub fn compress_each_module(mut self) -> Result<Selection> {
        let data: Vec<&[u8]> = self.modules.iter().map(|m| &m.data[..]).collect();
        let frames = crate::archive::zstd_each(&data).map_err(|e| Error::os("cannot compress the modules", e))?;
        for (m, frame) in self.modules.iter_mut().zip(frames) {
            m.path.push_str(".zst");
            m.data = frame;
        }
        if let Some(dep) = self.index_files.get_mut("modules.dep") {
            *dep = dep
                .lines()
                .map(|line| {
                    let words: Vec<String> = line
                        .split(' ')
                        .map(|w| match (w.strip_suffix(".ko:"), w.strip_suffix(".ko")) {
                            (Some(p), _) => format!("{p}.ko.zst:"),
                            (None, Some(p)) => format!("{p}.ko.zst"),
                            _ => w.to_string(),
                        })
                        .collect();
                    words.join(" ") + "\n"
                })
                .collect();
        }
        Ok(self)
    }
}

/// A path that stays below the directory it is joined to: relative, no `..`, no NUL.
fn plain_relative(path: &str) -> bool {
    !path.is_empty() && !path.starts_with('/') && !path.contains('\0') && path.split('/').all(|c| c != "..")
}

fn strip_compression(path: &str) -> String {
    COMPRESSED
        .iter()
        .find_map(|s| path.strip_suffix(s))
        .unwrap_or(path)
        .to_string()
}

/// Compressed modules are stored decompressed: /init loads them with finit_module, and
/// not every kernel can decompress modules itself.
/// No more than [`MAX_IMAGE_FILE`] bytes come out: a small crafted frame can claim
/// gigabytes.
fn decompress(path: &str, raw: Vec<u8>) -> Result<Vec<u8>> {
    decompress_at_most(path, raw, MAX_IMAGE_FILE)
}

fn decompress_at_most(path: &str, raw: Vec<u8>, max: u64) -> Result<Vec<u8>> {
    use std::io::{Read, Write};
    /// A sink that refuses to grow past the limit (lzma-rs writes; it cannot be read).
    struct Bounded {
        out: Vec<u8>,
        full: bool,
        max: u64,
    }
    impl Write for Bounded {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.out.len() as u64 + buf.len() as u64 > self.max {
                self.full = true;
                return Err(std::io::Error::other("too large"));
            }
            self.out.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let failed = |e: std::io::Error| Error::os(format!("cannot decompress {path}"), e);
    let too_large = || -> Error {
        format!("{path} decompresses to more than {max} bytes, more than any module (fix: check the image)").into()
    };
    let bounded = |mut r: Box<dyn Read + '_>| -> Result<Vec<u8>> {
        let mut out = Vec::new();
        r.by_ref()
            .take(MAX_IMAGE_FILE + 1)
            .read_to_end(&mut out)
            .map_err(failed)?;
        Ok(out)
    };
    let out = if path.ends_with(".zst") {
        bounded(Box::new(zstd::stream::read::Decoder::new(&raw[..]).map_err(failed)?))?
    } else if path.ends_with(".gz") {
        bounded(Box::new(flate2::read::GzDecoder::new(&raw[..])))?
    } else if path.ends_with(".xz") {
        let mut sink = Bounded {
            out: Vec::new(),
            full: false,
            max,
        };
        let done = lzma_rs::xz_decompress(&mut &raw[..], &mut sink);
        if sink.full {
            return Err(too_large());
        }
        done.map_err(|e| format!("cannot decompress {path}: {e:?}"))?;
        sink.out
    } else {
        return Ok(raw);
    };
    if out.len() as u64 > max {
        return Err(too_large());
    }
    Ok(out)
}

/// The `key=value` strings of a module's `.modinfo` section.
pub fn modinfo<'a>(elf: &goblin::elf::Elf, elf_bytes: &'a [u8]) -> Result<Vec<(&'a str, &'a str)>> {
    let section = elf
        .section_headers
        .iter()
        .find(|sh| elf.shdr_strtab.get_at(sh.sh_name) == Some(".modinfo"))
        .ok_or("it has no .modinfo section")?;
    let start = section.sh_offset as usize;
    let end = start
        .checked_add(section.sh_size as usize)
        .ok_or("its .modinfo section is truncated")?;
    let bytes = elf_bytes.get(start..end).ok_or("its .modinfo section is truncated")?;
    Ok(bytes
        .split(|&b| b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok()?.split_once('='))
        .collect())
}

/// Whether a module serves ACPI objects themselves: it registers a driver on the ACPI bus
/// or a PNP driver, or has PNP aliases at all (`floppy` has them for PNP0700, a PNP
/// device, yet registers a platform driver). PNP devices have no modalias of their own:
/// udev, and /init, load their drivers from the ACPI object's. Any other driver of a
/// device the firmware's ACPI tables describe matches it on its own bus (a platform, I2C
/// or SPI device), whose modalias is the same `acpi:` text. The register functions are
/// told by what the module imports (also as `__NAME`, as kernels since 6.10 name the
/// first).
pub fn drives_acpi_objects(elf: &goblin::elf::Elf, info: &[(&str, &str)]) -> bool {
    const REGISTERS: [&str; 2] = ["acpi_bus_register_driver", "pnp_register_driver"];
    if info.iter().any(|(k, v)| *k == "alias" && v.starts_with("pnp:")) {
        return true;
    }
    elf.syms.iter().any(|sym| {
        sym.st_shndx == goblin::elf::section_header::SHN_UNDEF as usize
            && elf
                .strtab
                .get_at(sym.st_name)
                .is_some_and(|name| REGISTERS.contains(&name.trim_start_matches('_')))
    })
}

fn find_firmware(src: &SourceImage, name: &str) -> Result<Option<(String, Vec<u8>)>> {
    for dir in ["/lib/firmware", "/usr/lib/firmware"] {
        for suffix in ["", ".xz", ".zst"] {
            if let Some(bytes) = src.read(&format!("{dir}/{name}{suffix}"))? {
                return Ok(Some((format!("lib/firmware/{name}{suffix}"), bytes)));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod path_tests {
    #[test]
    fn module_and_firmware_paths_stay_below_their_directory() {
        for good in ["kernel/fs/btrfs/btrfs.ko", "updates/x.ko.zst", "rtl_nic/rtl8168g-2.fw"] {
            assert!(super::plain_relative(good), "{good}");
        }
        for bad in [
            "../../etc/shadow",
            "kernel/../../x.ko",
            "/etc/shadow",
            "",
            "a/..",
            "a\0b",
        ] {
            assert!(!super::plain_relative(bad), "{bad:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn a_module_that_decompresses_past_the_bound_is_refused_in_every_format() {
        let zeros = vec![0u8; 2 << 20];
        let zst = zstd::encode_all(&zeros[..], 1).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&zeros).unwrap();
        let gz = gz.finish().unwrap();
        let mut xz = Vec::new();
        lzma_rs::xz_compress(&mut (&zeros[..]).take(zeros.len() as u64), &mut xz).unwrap();
        for (name, raw) in [("m.ko.zst", zst), ("m.ko.gz", gz), ("m.ko.xz", xz)] {
            assert_eq!(
                decompress_at_most(name, raw.clone(), 4 << 20).unwrap().len(),
                2 << 20,
                "{name}"
            );
            let e = decompress_at_most(name, raw, 1 << 20).unwrap_err().to_string();
            assert!(
                e.contains("decompresses to more than 1048576 bytes") && e.contains("fix:"),
                "{name}: {e}"
            );
        }
    }
}
