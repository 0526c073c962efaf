//! The fresh writable root made at every boot, at the store partition's top level:
//!
//! - btrfs driver: `NAME` is a btrfs snapshot of the image's top subvolume;
//! - overlay2 driver: `NAME/{upper,work}` are the upper and work dirs of an overlayfs
//!   whose lower dirs are the image's layers.
//!
//! A new layer is made as `NAME.new`, filled (top layer), then swapped in with
//! `renameat2(RENAME_EXCHANGE)`: at any instant `NAME` is either the old complete layer or
//! the new complete one, so a half-made layer never replaces a good one. The old one is
//! kept as `NAME.prev`. The image's own layers are only ever read.

use std::fs;
use std::path::{Path, PathBuf};

use nix::errno::Errno;

use crate::btrfs::{self, is_subvolume};
use crate::error::{Error, Result};
use crate::store::{Driver, Image};

/// Removes a layer directory or subvolume, whichever it is.
fn remove_layer(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("cannot stat", path, e)),
        Ok(_) if is_subvolume(path) => btrfs::delete(path),
        Ok(md) if md.is_dir() => fs::remove_dir_all(path).map_err(|e| Error::io("cannot remove", path, e)),
        Ok(_) => fs::remove_file(path).map_err(|e| Error::io("cannot remove", path, e)),
    }
}

/// The paths of one writable layer's generations, at the partition's top level:
/// `NAME`, `NAME.new`, and the kept previous ones `NAME.prev`, `NAME.prev.2`, …
#[derive(Debug, Clone)]
pub struct LayerPaths {
    pub current: PathBuf,
    pub new: PathBuf,
    root: PathBuf,
    name: String,
}

impl LayerPaths {
    pub fn new(partition_root: &Path, name: &str) -> LayerPaths {
        LayerPaths {
            current: partition_root.join(name),
            new: partition_root.join(format!("{name}.new")),
            root: partition_root.to_path_buf(),
            name: name.to_string(),
        }
    }

    /// The `k`-th previous layer (1 = the last one).
    pub fn prev(&self, k: usize) -> PathBuf {
        match k {
            1 => self.root.join(format!("{}.prev", self.name)),
            k => self.root.join(format!("{}.prev.{k}", self.name)),
        }
    }

    /// Previous generations on disk beyond `keep` (left by a larger `layerboot.keep`).
    fn prev_beyond(&self, keep: usize) -> Vec<PathBuf> {
        let prefix = format!("{}.prev", self.name);
        let Ok(entries) = fs::read_dir(&self.root) else { return Vec::new() };
        let mut out: Vec<(usize, PathBuf)> = entries
            .filter_map(|e| {
                let e = e.ok()?;
                let name = e.file_name().into_string().ok()?;
                let rest = name.strip_prefix(&prefix)?;
                let k = if rest.is_empty() { 1 } else { rest.strip_prefix('.')?.parse().ok()? };
                (k > keep).then(|| (k, e.path()))
            })
            .collect();
        out.sort();
        out.into_iter().map(|(_, p)| p).collect()
    }
}

/// The xattr on a layer's top directory that names the image it was made from, for
/// `layerboot.mode=keep`. On the layer itself, so it moves with every rename.
const IMAGE_XATTR: &str = "trusted.layerboot.image";

/// The image ID a layer was made from, if recorded.
pub fn layer_image(layer: &Path) -> Option<String> {
    crate::lookup::getxattr(layer, IMAGE_XATTR).and_then(|v| String::from_utf8(v).ok())
}

fn set_layer_image(layer: &Path, id: &str) -> Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let p = CString::new(layer.as_os_str().as_bytes()).map_err(|_| Error::new("NUL in path"))?;
    let n = CString::new(IMAGE_XATTR).unwrap();
    // SAFETY: NUL-terminated strings; the value is valid for its length.
    let r = unsafe { nix::libc::lsetxattr(p.as_ptr(), n.as_ptr(), id.as_ptr().cast(), id.len(), 0) };
    Errno::result(r).map(drop).map_err(|e| Error::io(&format!("cannot record the image on {IMAGE_XATTR} of"), layer, e))
}

/// Step 1: discard a `NAME.new` left by an interrupted boot, then make a fresh one
/// from the image (a snapshot, or empty upper/work dirs), recording the image's ID.
pub fn prepare(paths: &LayerPaths, image: &Image) -> Result<()> {
    remove_layer(&paths.new).map_err(|e| e.context("discarding an unfinished writable layer"))?;
    match image.driver {
        Driver::Btrfs => {
            let top = image.layers.first().ok_or_else(|| Error::new(format!("image {} has no layers to boot", image.id)))?;
            btrfs::snapshot(&top.dir, &paths.new)?;
        }
        Driver::Overlay2 | Driver::Vfs => {
            for d in ["upper", "work"] {
                let p = paths.new.join(d);
                fs::create_dir_all(&p).map_err(|e| Error::io("cannot create", &p, e))?;
            }
        }
    }
    set_layer_image(&paths.new, &image.id)
}

/// One file-system operation of a rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Remove(PathBuf),
    Rename(PathBuf, PathBuf),
    /// Atomically swap two paths.
    Exchange(PathBuf, PathBuf),
}

/// The operations that make the complete `NAME.new` the current layer and keep `keep`
/// previous ones. Every prefix of this list leaves `NAME` a complete layer (old or new),
/// which is what makes a power cut at any instant harmless.
pub fn rotation(paths: &LayerPaths, keep: usize) -> Vec<Step> {
    let mut steps: Vec<Step> = paths.prev_beyond(keep.saturating_sub(1)).into_iter().rev().map(Step::Remove).collect();
    for k in (1..keep).rev() {
        if paths.prev(k).exists() {
            steps.push(Step::Rename(paths.prev(k), paths.prev(k + 1)));
        }
    }
    if fs::symlink_metadata(&paths.current).is_ok() {
        steps.push(Step::Exchange(paths.new.clone(), paths.current.clone()));
        if keep == 0 {
            steps.push(Step::Remove(paths.new.clone()));
        } else {
            steps.push(Step::Rename(paths.new.clone(), paths.prev(1)));
        }
    } else {
        steps.push(Step::Rename(paths.new.clone(), paths.current.clone()));
    }
    steps
}

pub fn apply(step: &Step) -> Result<()> {
    match step {
        Step::Remove(p) => remove_layer(p).map_err(|e| e.context("removing an old writable layer")),
        Step::Rename(a, b) => fs::rename(a, b).map_err(|e| Error::new(format!("cannot rename {} to {}: {e}", a.display(), b.display()))),
        Step::Exchange(a, b) => {
            exchange(a, b).map_err(|e| Error::new(format!("cannot swap in the new writable layer {}: {e}", b.display())))
        }
    }
}

/// Step 2, after the new layer is complete: `NAME.new` becomes `NAME`; the old ones
/// shift down to `NAME.prev`, `NAME.prev.2`, … up to `keep`.
pub fn rotate(paths: &LayerPaths, keep: usize) -> Result<()> {
    rotation(paths, keep).iter().try_for_each(apply)
}

/// `renameat2(RENAME_EXCHANGE)`: swaps two paths atomically. nix offers renameat2 only
/// for glibc targets; /init is built for musl, so this is the raw system call.
fn exchange(a: &Path, b: &Path) -> std::result::Result<(), Errno> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let a = CString::new(a.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?;
    let b = CString::new(b.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?;
    const RENAME_EXCHANGE: nix::libc::c_uint = 2;
    let at = nix::libc::AT_FDCWD;
    // SAFETY: both paths are NUL-terminated and outlive the call.
    let r = unsafe { nix::libc::syscall(nix::libc::SYS_renameat2, at, a.as_ptr(), at, b.as_ptr(), RENAME_EXCHANGE) };
    Errno::result(r).map(drop)
}

/// The overlayfs mount data for an overlay2 image with `upper` and `work`, and the
/// directory to chdir into first: lower dirs are named by their short `l/` links
/// relative to the driver's home, as Docker does, so more layers fit in the one page
/// that mount(2) accepts.
pub fn overlay_data(image: &Image, driver_home: &Path, upper: &Path, work: &Path) -> Result<String> {
    // btrfs, vfs: the top layer is the whole tree, the only lower.
    let layers = if image.driver.top_is_whole_tree() { &image.layers[..image.layers.len().min(1)] } else { &image.layers[..] };
    let lowers: Vec<String> = layers
        .iter()
        .map(|l| match &l.link {
            Some(link) if driver_home.join("l").join(link).exists() => format!("l/{link}"),
            // Relative to the driver's home where the layer lies under it (podman,
            // containerd's `<id>/fs`), else absolute.
            _ => l.dir.strip_prefix(driver_home).unwrap_or(&l.dir).display().to_string(),
        })
        .collect();
    if lowers.is_empty() {
        return Err(Error::new(format!("image {} has no layers to boot", image.id)));
    }
    let data = format!("lowerdir={},upperdir={},workdir={},index=off", lowers.join(":"), upper.display(), work.display());
    let page = 4096;
    if data.len() >= page {
        return Err(Error::new(format!(
            "image {} has {} layers: their overlay mount options ({} bytes) exceed the kernel's limit of {page} (fix: squash the image into fewer layers)",
            image.id,
            lowers.len(),
            data.len()
        )));
    }
    Ok(data)
}
