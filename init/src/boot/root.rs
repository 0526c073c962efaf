//! Step 4 of a boot: the image's fresh writable root at the new root, with the top layer
//! copied in. The kinds (a btrfs snapshot, an overlay upper on the disk, the kept layer of
//! `layerboot.mode=keep`, an overlay upper in memory) share one path: the generations of
//! the writable layer are [`crate::writable`]'s, this file mounts what it made.

use std::fs;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use sys_mount::MountFlags;

use super::devices::Hardware;
use super::{Boot, STORE_MOUNT};
use crate::copy::copy_tree;
use crate::error::{Context, Error, Result};
use crate::mounts::{mount, unmount};
use crate::probe::BlockDevice;
use crate::settings::{arg, LayerMode, Settings, Upper};
use crate::store::{Driver, Image, Store};
use crate::writable::{check_clear_of, overlay_data, Layers};

const TOPLAYER_MOUNT: &str = "/run/layerboot/toplayer";
const STAGE_MOUNT: &str = "/run/layerboot/stage";
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
            mount(
                &dev.node,
                Path::new(TOPLAYER_MOUNT),
                &fstype,
                MountFlags::RDONLY,
                &s.toplayer_flags.join(","),
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
            check_toplayer_clear_of_store(on_store, &s.docker_path)?;
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
        if s.upper == Upper::Tmpfs {
            hw.ensure_filesystem("overlay")?;
            self.mount_tmpfs_root(src, toplayer, ro)?;
        } else if let Err(e) = self.mount_layer_on_disk(src, toplayer, ro) {
            // Never an older image's layer: this image, with nothing kept.
            if e.errno() != Some(Errno::ENOSPC) {
                return Err(e);
            }
            self.warn(&format!(
                "{e}. Booting {} with its writable layer in memory (as layerboot.upper=tmpfs): nothing it writes is \
                 kept (fix: free space on the store's partition)",
                s.image
            ));
            hw.ensure_filesystem("overlay")?;
            self.mount_tmpfs_root(src, toplayer, ro)?;
        }
        if toplayer.is_some_and(|t| t.starts_with(TOPLAYER_MOUNT)) {
            let _ = unmount(Path::new(TOPLAYER_MOUNT));
        }
        Ok(())
    }

    /// A fresh (or kept) generation of the writable layer on the store's partition.
    fn mount_layer_on_disk(&self, src: &Source, toplayer: Option<&Path>, ro: MountFlags) -> Result<()> {
        let (s, image) = (src.settings, src.image);
        // Before anything is touched: the layer's generations must not be the store or
        // the top layer, nor hold them.
        check_clear_of(&s.rw_name, "the image store (docker_path=)", &s.docker_path)?;
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
            .filter(|_| image.driver == Driver::Btrfs);
        let mut layers = Layers::open(Path::new(STORE_MOUNT), &s.rw_name, s.keep, s.rw_adopt, origin)?;
        let recovered = layers.recover();
        self.take_warnings(&mut layers);
        recovered.context("cleaning up after an interrupted boot")?;
        let kept = s.mode == LayerMode::Keep && reusable(&layers.current(), image, &s.rw_name);
        let mut fill = |layer: &Path| self.copy_toplayer(src, layer, toplayer);
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
        let new_root = self.new_root.as_path();
        match image.driver {
            Driver::Btrfs => {
                let mut opts = vec![format!("subvol=/{}", s.rw_name)];
                opts.extend(s.root_flags.iter().filter(|f| !f.starts_with("subvolid=")).cloned());
                mount(&src.device.node, new_root, "btrfs", ro, &opts.join(","))
            }
            Driver::Overlay2 | Driver::Vfs => mount_overlay(image, src.store, &layers.current(), new_root, ro),
        }
    }

    fn take_warnings(&self, layers: &mut Layers) {
        for w in std::mem::take(&mut layers.warnings) {
            self.warn(&w);
        }
    }

    /// Copies the top layer into a writable layer: straight into a btrfs snapshot, or
    /// through an overlay so it lands as the booted system will see it.
    fn copy_toplayer(&self, src: &Source, layer: &Path, toplayer: Option<&Path>) -> Result<()> {
        let Some(top) = toplayer else { return Ok(()) };
        log::debug!("copying the top layer from {} into {}", top.display(), layer.display());
        let stats = match src.image.driver {
            Driver::Btrfs => copy_tree(top, layer)?,
            Driver::Overlay2 | Driver::Vfs => {
                let stage = Path::new(STAGE_MOUNT);
                mount_overlay(src.image, src.store, layer, stage, MountFlags::empty())?;
                let copied = copy_tree(top, stage);
                unmount(stage)?;
                copied?
            }
        };
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
        Ok(())
    }

    /// `layerboot.upper=tmpfs`: the image under an overlay whose upper lives in memory;
    /// nothing is written to the disk.
    fn mount_tmpfs_root(&self, src: &Source, toplayer: Option<&Path>, ro: MountFlags) -> Result<()> {
        let home = Path::new(TMPFS_UPPER);
        mount(
            Path::new("tmpfs"),
            home,
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            "mode=0755",
        )?;
        for d in ["upper", "work"] {
            fs::create_dir_all(home.join(d)).map_err(|e| Error::io("cannot create", &home.join(d), e))?;
        }
        let new_root = self.new_root.as_path();
        mount_overlay(src.image, src.store, home, new_root, MountFlags::empty())?;
        if let Some(top) = toplayer {
            let stats = copy_tree(top, new_root)?;
            self.timeline.stage(
                "top layer",
                &format!("copied from {} ({} files)", top.display(), stats.files),
            );
            stats.warnings.iter().for_each(|w| self.warn(w));
        }
        if ro.contains(MountFlags::RDONLY) {
            mount(
                Path::new("overlay"),
                new_root,
                "overlay",
                MountFlags::REMOUNT | MountFlags::RDONLY,
                "",
            )?;
        }
        self.timeline.stage(
            "writable layer",
            "an overlay with its upper on tmpfs (layerboot.upper=tmpfs)",
        );
        Ok(())
    }
}

/// On the store's own device, the top layer (at `on_store`, from the partition's top)
/// must not hold the store: `toplayer_path=/` would copy the whole store into the root.
fn check_toplayer_clear_of_store(on_store: &Path, docker_path: &str) -> Result<()> {
    if Path::new(docker_path).starts_with(on_store) {
        return Err(Error::new(format!(
            "the top layer directory /{} holds the image store /{docker_path} (toplayer_path= on the store's own \
             device): it would be copied into the new root (fix: keep the top layer in a directory of its own, e.g. \
             toplayer_path=/hosts/NAME)",
            on_store.display()
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
            crate::console::say(&format!(
                "layerboot: layerboot.mode=keep, but layer {name} was made from image {id}, not {}: making a fresh layer",
                image.id
            ));
            false
        }
        None => {
            if current.exists() {
                crate::console::say(&format!(
                    "layerboot: layerboot.mode=keep, but layer {name} records no image: making a fresh layer"
                ));
            }
            false
        }
    }
}

/// Mounts an overlay of `image`'s layers with `layer`'s upper and work dirs at `target`.
fn mount_overlay(image: &Image, store: &Store, layer: &Path, target: &Path, flags: MountFlags) -> Result<()> {
    // A containerd store may have no overlayfs snapshots at all (btrfs snapshotter only).
    let home = Some(store.driver_home())
        .filter(|h| h.is_dir())
        .unwrap_or_else(|| PathBuf::from("/"));
    let data = overlay_data(image, &home, &layer.join("upper"), &layer.join("work"))?;
    // The lower dirs are relative to the driver's home (see overlay_data).
    nix::unistd::chdir(&home).map_err(|e| Error::io("cannot enter", &home, e))?;
    let r = mount(Path::new("overlay"), target, "overlay", flags, &data);
    let _ = nix::unistd::chdir("/");
    r
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
            let e = check_toplayer_clear_of_store(Path::new(top), store)
                .unwrap_err()
                .to_string();
            assert!(e.contains("holds the image store") && e.contains("fix:"), "{top}: {e}");
        }
        assert!(check_toplayer_clear_of_store(Path::new("toplayer"), "var/lib/docker").is_ok());
        assert!(check_toplayer_clear_of_store(Path::new("var/lib/docker2"), "var/lib/docker").is_ok());
    }
}
