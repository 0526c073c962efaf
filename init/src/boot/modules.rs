//! The kernel modules packed into the initramfs: their index, and loading them in
//! dependency order with `finit_module`, or `init_module` after decompressing a
//! `.ko.zst` (layerboot's builder packs each module as its own zstd frame, so the kernel
//! never unpacks modules this boot does not load; not every kernel decompresses modules
//! itself). The decompression counts as module loading in the boot's timing line.

use std::collections::BTreeSet;
use std::fs;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::kmod::{finit_module, init_module, ModuleInitFlags};

use crate::error::{Error, Result};
use crate::kmod::ModuleIndex;
use crate::settings::Config;

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

    /// The modules that devices with these modaliases need, not tried yet.
    pub fn needed_by(&self, aliases: &[String]) -> Vec<String> {
        let names: BTreeSet<String> = aliases.iter().flat_map(|a| self.index.resolve(a)).collect();
        names.into_iter().filter(|n| !self.attempted.contains(n)).collect()
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
            let loaded = if step.path.ends_with(".zst") {
                init_module(&decompress_module(&path)?, c"")
            } else {
                let file = fs::File::open(&path).map_err(|e| Error::io("cannot open kernel module", &path, e))?;
                finit_module(file.as_fd(), c"", ModuleInitFlags::empty())
            };
            match loaded {
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

/// The largest module /init decompresses: btrfs, the largest packed, is 4 MiB.
const MAX_MODULE_BYTES: u64 = 64 << 20;

/// The module in the zstd frame at `path`, checked against the size its header declares.
fn decompress_module(path: &Path) -> Result<Vec<u8>> {
    let frame = fs::read(path).map_err(|e| Error::io("cannot read kernel module", path, e))?;
    let bad = |why: String| {
        Error::new(format!(
            "kernel module {} is damaged: {why} (fix: rebuild the initramfs with `layerboot initramfs`)",
            path.display()
        ))
    };
    let size = match zstd::zstd_safe::get_frame_content_size(&frame) {
        Ok(Some(n)) if n <= MAX_MODULE_BYTES => n as usize,
        Ok(Some(n)) => return Err(bad(format!("it declares {n} bytes, more than {MAX_MODULE_BYTES}"))),
        _ => return Err(bad("it is not a zstd frame that declares its size".into())),
    };
    let module = zstd::bulk::decompress(&frame, size).map_err(|e| bad(e.to_string()))?;
    if module.len() != size {
        return Err(bad(format!(
            "it holds {} bytes, not the {size} it declares",
            module.len()
        )));
    }
    Ok(module)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_compressed_module_is_decompressed_and_a_damaged_one_named() {
        let dir = tempfile::tempdir().unwrap();
        let module: Vec<u8> = (0..100_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        let path = dir.path().join("m.ko.zst");
        let frame = zstd::bulk::compress(&module, 6).unwrap();
        fs::write(&path, &frame).unwrap();
        assert_eq!(decompress_module(&path).unwrap(), module);

        for (damage, why) in [
            (frame[..frame.len() / 2].to_vec(), "damaged"),
            (b"\x7fELF not zstd".to_vec(), "not a zstd frame"),
            (Vec::new(), "not a zstd frame"),
        ] {
            fs::write(&path, damage).unwrap();
            let e = decompress_module(&path).unwrap_err().to_string();
            assert!(
                e.contains("m.ko.zst is damaged") && e.contains(why) && e.contains("fix:"),
                "{e}"
            );
        }
        // A header that claims a huge module is refused before any allocation.
        fs::write(&path, fake_frame_claiming(1 << 40)).unwrap();
        let e = decompress_module(&path).unwrap_err().to_string();
        assert!(e.contains("declares 1099511627776 bytes"), "{e}");
    }

    /// A zstd frame header declaring `size` bytes of content, followed by one empty raw
    /// last block (RFC 8878: magic, frame header descriptor with an 8-byte size, the size).
    fn fake_frame_claiming(size: u64) -> Vec<u8> {
        let mut f = vec![0x28, 0xb5, 0x2f, 0xfd, 0b1110_0000];
        f.extend(size.to_le_bytes());
        f.extend([0x01, 0x00, 0x00]);
        f
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
}
