//! The overlayfs mount data for a writable root over an image's layers.

use std::path::Path;

use crate::error::{Error, Result};
use crate::store::Image;

/// The overlayfs mount data for an overlay2 image with `upper` and `work`, and the
/// directory to chdir into first: lower dirs are named by their short `l/` links
/// relative to the driver's home, as Docker does, so more layers fit in the one page
/// that mount(2) accepts.
pub fn overlay_data(image: &Image, driver_home: &Path, upper: &Path, work: &Path) -> Result<String> {
    // btrfs, vfs: the top layer is the whole tree, the only lower.
    let layers = if image.driver.top_is_whole_tree() {
        &image.layers[..image.layers.len().min(1)]
    } else {
        &image.layers[..]
    };
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
    let data = format!(
        "lowerdir={},upperdir={},workdir={},index=off",
        lowers.join(":"),
        upper.display(),
        work.display()
    );
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
