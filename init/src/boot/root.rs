//! Step 4 of a boot: the image's fresh writable root at the new root, with the top layer
//! copied in. The kinds (a btrfs snapshot, an overlay upper on the disk, the kept layer of
//! `layerboot.mode=keep`, an overlay upper in memory) share one path: the generations of
//! the writable layer are [`crate::writable`]'s, this file mounts what it made.

use std::path::{Path, PathBuf};

use nix::errno::Errno;
use sys_mount::MountFlags;

use super::devices::Hardware;
use super::{Boot, STORE_MOUNT};
use crate::console::say;
use crate::error::{Context, Error, Result};
use crate::mounts::{mount, mount_with_options, unmount};
use crate::probe::BlockDevice;
use crate::settings::{arg, LayerMode, Settings};
use crate::store::{Image, Store};
use crate::writable::{check_clear_of, Filled, Kind, Layers, MountSource};

const TOPLAYER_MOUNT: &str = "/run/layerboot/toplayer";
const TMPFS_UPPER: &str = "/run/layerboot/upper";

/// What step 4 works from: the settings, the store's device and the image found in it.
pub struct Source<'a> {
    pub settings: &'a Settings,
    pub device: &'a BlockDevice,
    pub store: &'a Store,
    pub image: &'a Image,
}

impl Boot {
    /// The top layer's directory (its device mounted, or the store's own), if one is set.
    pub(super) fn find_toplayer(&self, src: &Source, hw: &mut Hardware) -> Result<Option<PathBuf>> {
        let s = src.settings;
        let Some(spec) = &s.toplayer else { return Ok(None) };
        let rel = s.toplayer_path.trim_start_matches('/');
        let base = if src.device.matches(spec) {
            PathBuf::from(STORE_MOUNT)
        } else {
            let dev = hw.wait_for(arg::TOPLAYER, spec, s.timeout)?;
            let fstype = super::filesystem_of(&dev, &s.toplayer_fstype, "toplayerfstype=")?;
            hw.ensure_filesystem(&fstype)?;
            mount_with_options(
                &dev.node,
                Path::new(TOPLAYER_MOUNT),
                &fstype,
                MountFlags::RDONLY,
                &s.toplayer_flags,
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
            check_toplayer_clear_of_store(on_store, &store_on_partition(s))?;
        }
        Ok(Some(dir))
    }

    /// Makes the writable root and mounts it at the new root, the top layer copied in.
    pub(super) fn make_writable_root(&self, src: &Source, toplayer: Option<&Path>, hw: &mut Hardware) -> Result<()> {
        let s = src.settings;
        let ro = if s.read_only {
            MountFlags::RDONLY
        } else {
            MountFlags::empty()
        };
        let kind = Kind::of(s.upper, src.image.driver);
        let on_disk = match kind {
            Kind::OverlayInMemory => None,
            Kind::Snapshot | Kind::OverlayOnDisk => Some(self.mount_layer_on_disk(kind, src, toplayer, ro)),
        };
        match on_disk {
            None => self.mount_in_memory(src, toplayer, ro, hw)?,
            Some(Ok(())) => {}
            // Never an older image's layer: this image, with nothing kept.
            Some(Err(e)) if e.errno() == Some(Errno::ENOSPC) => {
                self.warn(&format!(
                    "{e}. Booting {} with its writable layer in memory (as layerboot.upper=tmpfs): nothing it writes is \
                     kept (fix: free space on the store's partition)",
                    s.image
                ));
                self.mount_in_memory(src, toplayer, ro, hw)?;
            }
            Some(Err(e)) => return Err(e),
        }
        if toplayer.is_some_and(|t| t.starts_with(TOPLAYER_MOUNT)) {
            let _ = unmount(Path::new(TOPLAYER_MOUNT));
        }
        Ok(())
    }

    /// A fresh (or kept) generation of the writable layer on the store's partition.
    fn mount_layer_on_disk(&self, kind: Kind, src: &Source, toplayer: Option<&Path>, ro: MountFlags) -> Result<()> {
        let (s, image) = (src.settings, src.image);
        // Before anything is touched: the layer's generations must not be the store or
        // the top layer, nor hold them.
        check_clear_of(
            &s.rw_name,
            "the image store (docker_path=)",
            &store_on_partition(s).to_string_lossy(),
        )?;
        if let Some(on_store) = toplayer.and_then(|t| t.strip_prefix(STORE_MOUNT).ok()) {
            check_clear_of(
                &s.rw_name,
                "the top layer (toplayer_path=)",
                &on_store.to_string_lossy(),
            )?;
        }
        let origin = image
            .layers
            .first()
            .map(|l| l.dir.as_path())
            .filter(|_| kind == Kind::Snapshot);
        let mut layers = Layers::open(Path::new(STORE_MOUNT), &s.rw_name, s.keep, s.rw_adopt, origin)?;
        let recovered = layers.recover();
        self.take_warnings(&mut layers);
        recovered.context("cleaning up after an interrupted boot")?;
        let kept = s.mode == LayerMode::Keep && reusable(&layers.current(), image, &s.rw_name);
        let mut fill = |layer: &Path| self.copy_toplayer(kind, src, layer, toplayer);
        let made = if kept {
            layers.refresh_current(&mut fill)
        } else {
            layers.make_fresh_or_prune(image, &mut fill)
        };
        self.take_warnings(&mut layers);
        self.timeline.mark("top layer copied");
        made.context("making the writable layer")?;
        self.timeline
            .stage("writable layer", &layers.current().display().to_string());
        kind.mount(&mount_source(src), &layers.current(), &self.new_root, ro)
    }

    fn take_warnings(&self, layers: &mut Layers) {
        for w in std::mem::take(&mut layers.warnings) {
            self.warn(&w);
        }
    }

    /// Copies the top layer into a writable layer of `kind`.
    fn copy_toplayer(&self, kind: Kind, src: &Source, layer: &Path, toplayer: Option<&Path>) -> Result<Filled> {
        let Some(top) = toplayer else {
            return Ok(Filled::Metadata);
        };
        log::debug!("copying the top layer from {} into {}", top.display(), layer.display());
        let stats = kind.fill(src.image, src.store, layer, top)?;
        self.timeline.stage(
            "top layer",
            &format!(
                "copied from {} ({} files, {} dirs, {} links, {} bytes)",
                top.display(),
                stats.files,
                stats.dirs,
                stats.links,
                stats.bytes
            ),
        );
        stats.warnings.iter().for_each(|w| self.warn(w));
        Ok(if stats.bytes > 0 {
            Filled::Contents
        } else {
            Filled::Metadata
        })
    }

    /// [`Kind::OverlayInMemory`]: the image under an overlay whose upper lives on a
    /// tmpfs; nothing is written to the disk.
    fn mount_in_memory(&self, src: &Source, toplayer: Option<&Path>, ro: MountFlags, hw: &mut Hardware) -> Result<()> {
        hw.ensure_filesystem("overlay")?;
        let home = Path::new(TMPFS_UPPER);
        mount(
            Path::new("tmpfs"),
            home,
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            "mode=0755",
        )?;
        let kind = Kind::OverlayInMemory;
        kind.prepare(src.image, home)?;
        self.copy_toplayer(kind, src, home, toplayer)?;
        kind.mount(&mount_source(src), home, &self.new_root, ro)?;
        self.timeline.stage(
            "writable layer",
            "an overlay with its upper on tmpfs (layerboot.upper=tmpfs)",
        );
        Ok(())
    }
}

fn mount_source<'a>(src: &Source<'a>) -> MountSource<'a> {
    MountSource {
        image: src.image,
        store: src.store,
        device: &src.device.node,
        root_flags: &src.settings.root_flags,
    }
}

/// Where the store really is on its partition, from the partition's top: docker_path=
/// with its links followed (`store` → `layerboot-rw/x` is in the writable layer). As
/// given if it cannot be resolved, or resolves off the partition (then nothing on it is
/// the store).
fn store_on_partition(s: &Settings) -> PathBuf {
    real_place(Path::new(STORE_MOUNT), &s.docker_path)
}

/// `rel` under the mount point `mount`, its links followed, from the top of `mount`.
fn real_place(mount: &Path, rel: &str) -> PathBuf {
    match std::fs::canonicalize(mount.join(rel)) {
        Ok(real) => match real.strip_prefix(mount) {
            Ok(inside) => inside.to_path_buf(),
            Err(_) => PathBuf::from(rel),
        },
        Err(_) => PathBuf::from(rel),
    }
}

/// On the store's own device, the top layer (at `on_store`, from the partition's top)
/// must not hold the store: `toplayer_path=/` would copy the whole store into the root.
fn check_toplayer_clear_of_store(on_store: &Path, store: &Path) -> Result<()> {
    if store.starts_with(on_store) {
        return Err(Error::new(format!(
            "the top layer directory /{} holds the image store /{} (toplayer_path= on the store's own \
             device): it would be copied into the new root (fix: keep the top layer in a directory of its own, e.g. \
             toplayer_path=/hosts/NAME)",
            on_store.display(),
            store.display()
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
            say(&format!(
                "layerboot: layerboot.mode=keep, but layer {name} was made from image {id}, not {}: making a fresh layer",
                image.id
            ));
            false
        }
        None => {
            if current.exists() {
                say(&format!(
                    "layerboot: layerboot.mode=keep, but layer {name} records no image: making a fresh layer"
                ));
            }
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_top_layer_that_holds_the_store_is_refused() {
        for (top, store) in [
            ("", "var/lib/docker"),
            ("var", "var/lib/docker"),
            ("var/lib/docker", "var/lib/docker"),
        ] {
            let e = check_toplayer_clear_of_store(Path::new(top), Path::new(store))
                .unwrap_err()
                .to_string();
            assert!(e.contains("holds the image store") && e.contains("fix:"), "{top}: {e}");
        }
        let store = Path::new("var/lib/docker");
        assert!(check_toplayer_clear_of_store(Path::new("toplayer"), store).is_ok());
        // The store's place is where its links lead: here inside the writable layer.
        let t = tempfile::tempdir().unwrap();
        let mount = t.path().canonicalize().unwrap();
        std::fs::create_dir_all(mount.join("layerboot-rw/x")).unwrap();
        std::os::unix::fs::symlink("layerboot-rw/x", mount.join("store")).unwrap();
        let real = real_place(&mount, "store");
        assert_eq!(real, Path::new("layerboot-rw/x"));
        assert!(check_clear_of("layerboot-rw", "the image store", &real.to_string_lossy()).is_err());
        assert_eq!(real_place(&mount, "missing"), Path::new("missing"));
        assert!(check_toplayer_clear_of_store(Path::new("var/lib/docker2"), store).is_ok());
    }
}
