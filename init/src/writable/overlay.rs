//! The overlayfs mount data for a writable root over an image's layers.

use std::path::Path;

use crate::error::{Error, Result};
use crate::store::{Image, Layer};

/// The overlayfs mount data for an overlay2 image with `upper` and `work`, and the
/// directory to chdir into first: lower dirs are named relative to the driver's home.
/// When their full names (`<id>/diff`) do not fit the one page mount(2) accepts, they
/// are named by their short `l/` links, as Docker always does: more layers fit, at the
/// cost of two more lookups per layer.
pub fn overlay_data(image: &Image, driver_home: &Path, upper: &Path, work: &Path) -> Result<String> {
    // btrfs, vfs: the top layer is the whole tree, the only lower.
    let layers = if image.driver.top_is_whole_tree() {
        &image.layers[..image.layers.len().min(1)]
    } else {
        &image.layers[..]
    };
    if layers.is_empty() {
        return Err(Error::new(format!("image {} has no layers to boot", image.id)));
    }
    // Relative to the driver's home where the layer lies under it (Docker's and podman's
    // `<id>/diff`, containerd's `<id>/fs`), else absolute.
    let full = |l: &Layer| l.dir.strip_prefix(driver_home).unwrap_or(&l.dir).display().to_string();
    let options = |lowers: Vec<String>| {
        format!(
            "lowerdir={},upperdir={},workdir={},index=off",
            lowers.join(":"),
            upper.display(),
            work.display()
        )
    };
    let mut data = options(layers.iter().map(full).collect());
    let page = 4096;
    if data.len() >= page {
        let short = |l: &Layer| match l.short_link() {
            Some(link) if driver_home.join("l").join(&link).exists() => format!("l/{link}"),
            _ => full(l),
        };
        data = options(layers.iter().map(short).collect());
    }
    if data.len() >= page {
        return Err(Error::new(format!(
            "image {} has {} layers: their overlay mount options ({} bytes) exceed the kernel's limit of {page} (fix: squash the image into fewer layers)",
            image.id,
            layers.len(),
            data.len()
        )));
    }
    Ok(data)
}
