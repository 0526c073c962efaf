//! The kinds of writable root, chosen once per boot by [`Kind::of`]. Each knows how a
//! new layer is made from the image (`prepare`), where the top layer is copied so it
//! lands as the booted system sees it (`fill`), and how the layer is mounted at the new
//! root (`mount`). Which generation is used (fresh, or the kept one of
//! `layerboot.mode=keep`) is [`super::Layers`]' business, not the kind's.

use std::fs;
use std::path::{Path, PathBuf};

use sys_mount::MountFlags;

use super::overlay::overlay_data;
use super::plan::{make_steps, MakeStep};
use crate::btrfs;
use crate::copy::{copy_tree, CopyStats};
use crate::error::{Error, Result};
use crate::mounts::{mount, mount_with_options, unmount};
use crate::settings::Upper;
use crate::store::{Driver, Image, Store};

/// Where the top layer is copied through on the overlay kinds: the merged view.
const STAGE_MOUNT: &str = "/run/layerboot/stage";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// btrfs driver: a btrfs snapshot of the image's top subvolume, at the store
    /// partition's top level.
    Snapshot,
    /// overlay2 and vfs drivers: an overlayfs over the image's layers whose
    /// `upper/` and `work/` lie in the layer's directory on the store's partition.
    OverlayOnDisk,
    /// `layerboot.upper=tmpfs`, or a disk too full for a layer: the same overlay with
    /// its upper in memory. Nothing is kept.
    OverlayInMemory,
}

impl Kind {
    /// The one place the kind is decided.
    pub fn of(upper: Upper, driver: Driver) -> Kind {
        match (upper, driver) {
            (Upper::Tmpfs, _) => Kind::OverlayInMemory,
            (Upper::Disk, Driver::Btrfs) => Kind::Snapshot,
            (Upper::Disk, Driver::Overlay2 | Driver::Vfs) => Kind::OverlayOnDisk,
        }
    }

    /// Makes the empty layer `dir` for `image` in one go, unmarked: the upper in memory.
    pub fn prepare(self, image: &Image, dir: &Path) -> Result<()> {
        make_steps(self == Kind::Snapshot)
            .into_iter()
            .filter(|&step| step != MakeStep::Mark)
            .try_for_each(|step| self.make(image, dir, step))
    }

    /// One step of making the empty layer `dir` for `image` ([`make_steps`] orders them):
    /// its snapshot or its directory, then its `upper/` and `work/`. The mark is the
    /// caller's.
    pub fn make(self, image: &Image, dir: &Path, step: MakeStep) -> Result<()> {
        let create = |d: &Path| fs::create_dir(d).map_err(|e| Error::io("cannot create", d, e));
        match (step, self) {
            (MakeStep::Top, Kind::Snapshot) => {
                let top = image
                    .layers
                    .first()
                    .ok_or_else(|| Error::new(format!("image {} has no layers to boot", image.id)))?;
                btrfs::snapshot(&top.dir, dir)
            }
            (MakeStep::Top, Kind::OverlayOnDisk) => create(dir),
            // Its directory is the tmpfs itself.
            (MakeStep::Top, Kind::OverlayInMemory) | (MakeStep::Mark, _) => Ok(()),
            (MakeStep::Dir(d), _) => create(&dir.join(d)),
        }
    }

    /// Copies the top layer `top` into the layer `dir`: straight into a snapshot, or
    /// through a staging overlay mount so whiteouts and copy-up happen as at run time.
    pub fn fill(self, image: &Image, store: &Store, dir: &Path, top: &Path) -> Result<CopyStats> {
        match self {
            Kind::Snapshot => copy_tree(top, dir),
            Kind::OverlayOnDisk | Kind::OverlayInMemory => {
                let stage = Path::new(STAGE_MOUNT);
                mount_overlay(image, store, dir, stage, MountFlags::empty())?;
                let copied = copy_tree(top, stage);
                unmount(stage)?;
                copied
            }
        }
    }

    /// Mounts the layer `dir` as the root at `target`. A snapshot is mounted from the
    /// store's `device` by its path from the top level, with the root's own `flags`.
    pub fn mount(self, src: &MountSource, dir: &Path, target: &Path, ro: MountFlags) -> Result<()> {
        match self {
            Kind::Snapshot => {
                let name = dir.file_name().unwrap_or_default().to_string_lossy();
                let mut opts = vec![format!("subvol=/{name}")];
                // subvolid= would name the store's subvolume, not the snapshot.
                opts.extend(src.root_flags.iter().filter(|f| !f.starts_with("subvolid=")).cloned());
                mount_with_options(src.device, target, "btrfs", ro, &opts)
            }
            Kind::OverlayOnDisk | Kind::OverlayInMemory => mount_overlay(src.image, src.store, dir, target, ro),
        }
    }
}

/// What a kind's mount reads besides the layer itself.
pub struct MountSource<'a> {
    pub image: &'a Image,
    pub store: &'a Store,
    /// The store's block device (a snapshot is a subvolume on it).
    pub device: &'a Path,
    /// `rootflags=`, for the snapshot's mount.
    pub root_flags: &'a [String],
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
    fn the_kind_follows_the_upper_then_the_driver() {
        assert_eq!(Kind::of(Upper::Disk, Driver::Btrfs), Kind::Snapshot);
        assert_eq!(Kind::of(Upper::Disk, Driver::Overlay2), Kind::OverlayOnDisk);
        assert_eq!(Kind::of(Upper::Disk, Driver::Vfs), Kind::OverlayOnDisk);
        for d in Driver::ALL {
            assert_eq!(Kind::of(Upper::Tmpfs, d), Kind::OverlayInMemory);
        }
    }
}
