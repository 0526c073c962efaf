//! The marks layerboot leaves on the layers it makes (xattrs on each layer's top
//! directory, so they move with every rename), and how a directory without one is told
//! apart from what a cut boot left.

use std::fs;
use std::path::Path;

use super::plan::{self, Mark, Slot};
use crate::btrfs;
use crate::error::Result;

/// The xattr on a layer's top directory that says layerboot made it, and how far.
pub const STATE_XATTR: &str = "trusted.layerboot.state";
/// The xattr on a layer's top directory that names the image it was made from, for
/// `layerboot.mode=keep`. On the layer itself, so it moves with every rename.
pub(super) const IMAGE_XATTR: &str = "trusted.layerboot.image";

/// The image ID a layer was made from, if recorded.
pub fn layer_image(layer: &Path) -> Option<String> {
    crate::xattr::get(layer, IMAGE_XATTR).and_then(|v| String::from_utf8(v).ok())
}

/// Marks the layer at `path` (for tests that build a disk's state by hand).
pub fn write_mark(path: &Path, mark: Mark) -> Result<()> {
    crate::xattr::set(path, STATE_XATTR, mark.encode().as_bytes())
}

/// The mark on the directory at `path`: `Ok(None)` if it is unmarked (or not a
/// directory: a symlink here is never followed). Layers of layerboot before marks carry
/// only the image xattr: those count as complete, generation 0 (`NAME.new`: half-made).
pub(super) fn read_mark(path: &Path, slot: Slot) -> Option<Mark> {
    let md = fs::symlink_metadata(path).ok()?;
    if !md.is_dir() {
        return None;
    }
    match crate::xattr::get(path, STATE_XATTR) {
        Some(raw) => Mark::decode(&raw),
        None if layer_image(path).is_some() => Some(if slot == Slot::New {
            Mark::Making
        } else {
            Mark::Complete(0)
        }),
        None => None,
    }
}

/// Whether the unmarked `NAME.new` at `path` is what a cut boot made in the instant
/// before marking it: an empty directory, empty `upper/` and `work/` (overlay drivers),
/// or a btrfs snapshot of the image's top subvolume `origin`. Nothing of anyone's.
pub(super) fn unmarked_leftover(path: &Path, origin: Option<&Path>) -> bool {
    let names = |p: &Path| -> Option<Vec<String>> {
        let mut v: Vec<String> = fs::read_dir(p)
            .ok()?
            .map(|e| e.ok().and_then(|e| e.file_name().into_string().ok()))
            .collect::<Option<_>>()?;
        v.sort();
        Some(v)
    };
    if fs::symlink_metadata(path).map(|m| !m.is_dir()).unwrap_or(true) {
        return false;
    }
    // Every entry one of the layer's own directories, and empty.
    let dirs: Option<Vec<&str>> = names(path).and_then(|entries| {
        entries
            .iter()
            .map(|n| {
                let d = plan::LAYER_DIRS.iter().find(|d| *d == n)?;
                let p = path.join(d);
                (fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) && names(&p).is_some_and(|n| n.is_empty()))
                    .then_some(*d)
            })
            .collect()
    });
    if dirs.is_some_and(|d| plan::unmarked_leftover(&d)) {
        return true;
    }
    match (origin, btrfs::subvolume_uuids(path)) {
        (Some(origin), Ok((_, parent))) => {
            btrfs::subvolume_uuids(origin).is_ok_and(|(uuid, _)| uuid == parent && parent != [0; 16])
        }
        _ => false,
    }
}
