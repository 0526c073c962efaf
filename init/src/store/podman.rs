//! containers-storage, as podman and buildah write it (`/var/lib/containers/storage`):
//! `<driver>-images/images.json` names the top layer of each image and
//! `<driver>-layers/layers.json` chains layers by `parent`. The overlay driver keeps each
//! layer's changes in `overlay/<id>/diff` in overlay whiteout format, as Docker's overlay2
//! does; btrfs keeps each layer as a snapshot holding the whole tree in
//! `btrfs/subvolumes/<id>`, vfs as a full copy in `vfs/dir/<id>`.
//! Format notes: docs/image-stores.md, section "podman's containers-storage".

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{edit_distance, read, Backend, Driver, Engine, Image, ImageEntry, Layer};
use crate::digest::is_hex64;
use crate::error::{Error, Result};
use crate::reference::Reference;

/// containers-storage's driver names, with the layer drivers layerboot boots them as.
const DRIVERS: [(&str, Driver); 3] = [
    ("overlay", Driver::Overlay2),
    ("btrfs", Driver::Btrfs),
    ("vfs", Driver::Vfs),
];

fn name(driver: Driver) -> &'static str {
    DRIVERS.iter().find(|(_, d)| *d == driver).map_or("overlay", |(n, _)| n)
}

/// The driver of the containers-storage store at `root`, if it is one.
pub fn driver(root: &Path) -> Option<Driver> {
    DRIVERS
        .iter()
        .find(|(n, _)| root.join(format!("{n}-images/images.json")).is_file())
        .map(|(_, d)| *d)
}

/// The directory the driver keeps its layers in, relative to the store's root.
pub fn data_dir(driver: Driver) -> &'static str {
    name(driver)
}

/// Where a layer's files are, below the driver's directory.
fn layer_dir(driver: Driver, id: &str) -> PathBuf {
    match driver {
        Driver::Overlay2 => Path::new(id).join("diff"),
        Driver::Btrfs => Path::new("subvolumes").join(id),
        Driver::Vfs => Path::new("dir").join(id),
    }
}

#[derive(Deserialize)]
struct PodImage {
    id: String,
    #[serde(default)]
    names: Vec<String>,
    layer: Option<String>,
}

#[derive(Deserialize)]
struct PodLayer {
    id: String,
    parent: Option<String>,
    #[serde(default)]
    flags: LayerFlags,
}

/// The one flag a boot reads; the others are skipped unbuilt (see `store::ImageConfig`).
#[derive(Deserialize, Default)]
struct LayerFlags {
    #[serde(default)]
    incomplete: bool,
}

reader!(Podman);

pub(super) static ENGINE: Engine = Engine {
    name: "podman",
    detect: |root| driver(root).map(|d| Ok((root.to_path_buf(), d))),
    reader: |store| Box::new(Podman(store)),
};

impl Backend for Podman<'_> {
    fn driver_home(&self) -> PathBuf {
        self.root.join(data_dir(self.driver))
    }

    fn images(&self) -> Result<Vec<ImageEntry>> {
        let mut out: Vec<ImageEntry> = self
            .json::<PodImage>("images")?
            .into_iter()
            .map(|i| ImageEntry {
                id: format!("sha256:{}", i.id),
                refs: i.names,
                namespace: None,
            })
            .collect();
        out.sort_by(|a, b| (a.refs.is_empty(), &a.refs).cmp(&(b.refs.is_empty(), &b.refs)));
        Ok(out)
    }

    /// Podman's rule: a name with a registry matches exactly; a short one matches
    /// `localhost/NAME` first, else the one registry-qualified name with that path; then
    /// image IDs and unique ID prefixes.
    fn resolve(&self, reference: &str) -> Result<Image> {
        let images = self.json::<PodImage>("images")?;
        let by_name = |name: &str| images.iter().find(|i| i.names.iter().any(|n| n == name));
        let mut found = None;
        if let Ok(r) = Reference::parse(reference) {
            let explicit_domain = reference
                .split('/')
                .next()
                .is_some_and(|d| d.contains(['.', ':']) || d == "localhost")
                && reference.contains('/');
            let tail = format!(
                "{}{}",
                r.tag.as_ref().map(|t| format!(":{t}")).unwrap_or_default(),
                r.digest.as_ref().map(|d| format!("@{d}")).unwrap_or_default()
            );
            found = by_name(&r.full_string());
            if found.is_none() && !explicit_domain {
                let short = r.familiar_name();
                found = by_name(&format!("localhost/{short}{tail}"));
                if found.is_none() {
                    let matches: Vec<&PodImage> = images
                        .iter()
                        .filter(|i| {
                            i.names.iter().any(|n| {
                                n.split_once('/').is_some_and(|(_, p)| {
                                    p == format!("{short}{tail}") || p == format!("{}{tail}", r.path)
                                })
                            })
                        })
                        .collect();
                    match matches.as_slice() {
                        [one] => found = Some(one),
                        [] => {}
                        many => {
                            let names: Vec<String> = many.iter().flat_map(|i| i.names.clone()).collect();
                            return Err(Error::new(format!(
                                "image '{reference}' is ambiguous in {}: it could be {} (fix: give the full name with its registry)",
                                self.root.display(),
                                names.join(", ")
                            )));
                        }
                    }
                }
            }
        }
        if found.is_none() {
            let hex = reference
                .strip_prefix("sha256:")
                .unwrap_or(reference)
                .to_ascii_lowercase();
            if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                let matches: Vec<&PodImage> = images.iter().filter(|i| i.id.starts_with(&hex)).collect();
                match matches.as_slice() {
                    [one] => found = Some(one),
                    [] => {}
                    _ => {
                        return Err(Error::new(format!(
                            "image ID prefix '{reference}' is ambiguous in {} (fix: give more digits)",
                            self.root.display()
                        )))
                    }
                }
            }
        }
        let Some(image) = found else {
            let all: Vec<&String> = images.iter().flat_map(|i| i.names.iter()).collect();
            let mut msg = format!(
                "image '{reference}' is not in the podman store at {}",
                self.root.display()
            );
            if let Some(closest) = all.iter().min_by_key(|n| edit_distance(reference, n)) {
                msg.push_str(&format!("; closest match: {closest}"));
            }
            msg.push_str("\nimages in this store:");
            for n in &all {
                msg.push_str(&format!("\n  {n}"));
            }
            msg.push_str(
                "\n(fix: set docker_image= / --image to one of these, or podman load the image into the store)",
            );
            return Err(Error::new(msg));
        };
        self.image(image)
    }

    fn load(&self, entry: &ImageEntry) -> Result<Image> {
        self.resolve(&entry.id)
    }
}

impl Podman<'_> {
    /// `<driver>-images/images.json` or `<driver>-layers/layers.json`.
    fn json<T: for<'de> Deserialize<'de>>(&self, what: &str) -> Result<Vec<T>> {
        let path = self.json_path(what);
        serde_json::from_slice(&read(&path)?).map_err(|e| {
            Error::new(format!(
                "{} is corrupt: {e} (expected a JSON array of {what})",
                path.display()
            ))
        })
    }

    fn image(&self, image: &PodImage) -> Result<Image> {
        let layers_path = self.json_path("layers");
        let all = self.json::<PodLayer>("layers")?;
        let mut layers = Vec::new();
        let mut next = image.layer.clone();
        while let Some(id) = next.filter(|_| layers.len() < self.layers_to_read(self.driver, usize::MAX)) {
            if !is_hex64(&id) || layers.len() > 500 {
                return Err(Error::new(format!(
                    "{} names a malformed layer '{id}' (or a loop): expected 64 lowercase hex",
                    layers_path.display()
                )));
            }
            let layer = all.iter().find(|l| l.id == id).ok_or_else(|| {
                Error::new(format!(
                    "layer {id} of image {} is missing from {} (fix: podman pull / load the image again)",
                    image.id,
                    layers_path.display()
                ))
            })?;
            if layer.flags.incomplete {
                return Err(Error::new(format!("layer {id} of image {} is incomplete: podman was interrupted while writing or removing it (fix: podman pull / load the image again)", image.id)));
            }
            let dir = self.driver_home().join(layer_dir(self.driver, &id));
            if !dir.is_dir() {
                return Err(Error::new(format!(
                    "layer {id} has no data: {} does not exist (fix: podman pull / load the image again)",
                    dir.display()
                )));
            }
            layers.push(Layer {
                chain_id: String::new(),
                diff_id: String::new(),
                cache_id: id.clone(),
                dir,
            });
            next = layer.parent.clone();
        }
        Ok(Image {
            id: format!("sha256:{}", image.id),
            driver: self.driver,
            layers,
            refs: image.names.clone(),
            namespace: None,
        })
    }

    fn json_path(&self, what: &str) -> PathBuf {
        self.root.join(format!("{}-{what}/{what}.json", name(self.driver)))
    }
}
