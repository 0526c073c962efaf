//! The kernel modules packed into the initramfs: their index, and loading them in
//! dependency order with `finit_module`.

use std::collections::BTreeSet;
use std::fs;
use std::os::fd::AsFd;
use std::path::PathBuf;

use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};

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

#[cfg(test)]
mod tests {
    use super::*;

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
