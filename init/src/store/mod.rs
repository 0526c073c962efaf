//! Offline reader for Docker's graphdriver image store (`/var/lib/docker`, btrfs and
//! overlay2 drivers): image reference → image ID → config → layer stack on disk.
//!
//! Nothing here writes: the store belongs to the engine. Every ID read from disk is
//! checked to be 64 lowercase hex before it becomes a path, and every missing or corrupt
//! file is reported by name with what was expected. Format notes with sources:
//! docs/image-stores.md, section "Docker's graphdriver store".

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::digest::{chain_ids, is_hex64, sha256_hex, sha256_of};
use crate::error::{Error, Result};
use crate::reference::Reference;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    /// Every layer is a btrfs subvolume holding the whole tree (whiteouts applied).
    Btrfs,
    /// Every layer holds only its changes; overlayfs stacks them.
    Overlay2,
    /// Every layer is a full copy in a plain directory (Docker's and podman's vfs,
    /// containerd's native snapshotter): the top one alone is the tree, booted as an
    /// overlay over it so it is never written.
    Vfs,
}

impl Driver {
    pub const ALL: [Driver; 3] = [Driver::Btrfs, Driver::Overlay2, Driver::Vfs];

    pub fn name(self) -> &'static str {
        match self {
            Driver::Btrfs => "btrfs",
            Driver::Overlay2 => "overlay2",
            Driver::Vfs => "vfs",
        }
    }

    /// Whether the top layer alone holds the whole tree (lower ones would only add
    /// files the image deleted).
    pub fn top_is_whole_tree(self) -> bool {
        matches!(self, Driver::Btrfs | Driver::Vfs)
    }
}

/// One layer of an image, as the driver keeps it on disk.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Layer {
    pub chain_id: String,
    pub diff_id: String,
    /// The driver's own directory ID (random, read from layerdb).
    pub cache_id: String,
    /// btrfs: the subvolume (whole tree); overlay2: the `diff` directory (changes only).
    pub dir: PathBuf,
    /// overlay2: the short name under `overlay2/l/` that links to `dir`.
    pub link: Option<String>,
}

/// A resolved image: its ID, config, and layers **topmost first**.
#[derive(Debug, Clone)]
pub struct Image {
    pub id: String,
    pub config: serde_json::Value,
    pub driver: Driver,
    pub layers: Vec<Layer>,
    /// The refs in the tag store that point at this image.
    pub refs: Vec<String>,
    /// containerd: the namespace the image was found in.
    pub namespace: Option<String>,
}

/// An image as listed by [`Store::images`].
#[derive(Debug, Clone)]
pub struct ImageEntry {
    pub id: String,
    pub refs: Vec<String>,
    /// containerd: the namespace holding these refs (an ID may be in several).
    pub namespace: Option<String>,
}

/// The tag store's content: familiar name → familiar ref string → image ID.
type Repos = BTreeMap<String, BTreeMap<String, String>>;

#[derive(Deserialize)]
struct Repositories {
    #[serde(rename = "Repositories", default)]
    repositories: BTreeMap<String, BTreeMap<String, String>>,
}

/// Which engine wrote the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// Docker's graphdriver store (`/var/lib/docker`).
    Docker,
    /// containers-storage, as podman and buildah write it (`/var/lib/containers/storage`).
    Podman,
    /// containerd's image store (`/var/lib/containerd`), Docker 29's default.
    Containerd,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Docker => "docker",
            Engine::Podman => "podman",
            Engine::Containerd => "containerd",
        }
    }
}

/// An engine's data root opened for reading.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    driver: Driver,
    engine: Engine,
    /// containerd: search only this namespace (`layerboot.namespace=`, `--namespace`).
    namespace: Option<String>,
}

impl Store {
    /// Opens the data root and detects the engine and driver: Docker's graphdriver store
    /// (`image/<driver>/repositories.json`), podman's, or containerd's (at the root, or
    /// the one dockerd manages under it).
    pub fn open(root: impl Into<PathBuf>) -> Result<Store> {
        let root = root.into();
        if !root.is_dir() {
            return Err(Error::new(format!(
                "no container image store at {}: the directory does not exist \
                 (fix: point docker_path= / --store at the engine's data root, e.g. var/lib/docker)",
                root.display()
            )));
        }
        if let Some(driver) = podman::driver(&root) {
            return Ok(Store {
                root,
                driver,
                engine: Engine::Podman,
                namespace: None,
            });
        }
        if root.join(containerd::META_DB).is_file() {
            return Ok(Store::containerd(root));
        }
        let found: Vec<Driver> = Driver::ALL
            .into_iter()
            .filter(|d| root.join("image").join(d.name()).join("repositories.json").is_file())
            .collect();
        // With both present (a driver switch), Docker uses the one whose data dir is in use.
        let in_use: Vec<Driver> = found
            .iter()
            .copied()
            .filter(|d| fs::read_dir(root.join(d.name())).is_ok_and(|mut it| it.next().is_some()))
            .collect();
        let driver = match (found.as_slice(), in_use.as_slice()) {
            ([d], _) | (_, [d]) => *d,
            // Docker 29 in containerd mode with the containerd it runs itself.
            ([], _)
                if root
                    .join(containerd::DOCKERD_MANAGED)
                    .join(containerd::META_DB)
                    .is_file() =>
            {
                return Ok(Store::containerd(root.join(containerd::DOCKERD_MANAGED)))
            }
            ([], _) => {
                return Err(Error::new(format!(
                "{} is not an image store layerboot reads: no image/<btrfs|overlay2|vfs>/repositories.json (Docker), \
                     <overlay|btrfs|vfs>-images/images.json (podman) or {} (containerd) exists \
                     (fix: point docker_path= / --store at the engine's data root: var/lib/docker, \
                     var/lib/containers/storage or var/lib/containerd)",
                root.display(),
                containerd::META_DB
            )))
            }
            _ => {
                return Err(Error::new(format!(
                    "{} holds image stores of several drivers in use ({}); \
                     remove the ones the engine no longer uses",
                    root.display(),
                    in_use.iter().map(|d| d.name()).collect::<Vec<_>>().join(", ")
                )))
            }
        };
        Ok(Store {
            root,
            driver,
            engine: Engine::Docker,
            namespace: None,
        })
    }

    /// containerd's store; its driver is the first snapshotter holding snapshots
    /// (each image says which one its own layers are in).
    fn containerd(root: PathBuf) -> Store {
        let has = |sn: &str| {
            fs::read_dir(root.join(format!("io.containerd.snapshotter.v1.{sn}/snapshots")))
                .is_ok_and(|mut d| d.next().is_some())
        };
        let driver = if !has("overlayfs") && has("btrfs") {
            Driver::Btrfs
        } else {
            Driver::Overlay2
        };
        Store {
            root,
            driver,
            engine: Engine::Containerd,
            namespace: None,
        }
    }

    /// Limits a containerd store to one namespace; other stores have none.
    pub fn with_namespace(mut self, namespace: Option<String>) -> Store {
        self.namespace = namespace.filter(|n| !n.is_empty());
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// The directory the driver keeps its layers in: overlay lower dirs are named
    /// relative to it (`l/<link>`).
    pub fn driver_home(&self) -> PathBuf {
        match self.engine {
            Engine::Docker => self.root.join(self.driver.name()),
            Engine::Podman => self.root.join(podman::data_dir(self.driver)),
            Engine::Containerd => containerd::overlayfs_home(&self.root),
        }
    }

    pub fn driver(&self) -> Driver {
        self.driver
    }

    fn image_dir(&self) -> PathBuf {
        self.root.join("image").join(self.driver.name())
    }

    /// The tag store: familiar name → familiar ref string → image ID.
    fn repositories(&self) -> Result<Repos> {
        let path = self.image_dir().join("repositories.json");
        let data = read(&path)?;
        let repos: Repositories = serde_json::from_slice(&data).map_err(|e| {
            Error::new(format!(
                "{} is corrupt: {e} (expected {{\"Repositories\": {{name: {{ref: image ID}}}}}})",
                path.display()
            ))
        })?;
        Ok(repos.repositories)
    }

    /// Every image in the store, tagged ones and untagged ones, sorted by first ref.
    pub fn images(&self) -> Result<Vec<ImageEntry>> {
        match self.engine {
            Engine::Podman => return self.podman_images(),
            Engine::Containerd => return self.containerd_images(),
            Engine::Docker => {}
        }
        let mut by_id: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (_, refs) in self.repositories()? {
            for (r, id) in refs {
                by_id.entry(id).or_default().push(r);
            }
        }
        for hex in self.image_ids()? {
            by_id.entry(format!("sha256:{hex}")).or_default();
        }
        let mut out: Vec<ImageEntry> = by_id
            .into_iter()
            .map(|(id, refs)| ImageEntry {
                id,
                refs,
                namespace: None,
            })
            .collect();
        out.sort_by(|a, b| (a.refs.is_empty(), &a.refs).cmp(&(b.refs.is_empty(), &b.refs)));
        Ok(out)
    }

    /// IDs (hex) of every config in the image DB; names that are not IDs are skipped.
    fn image_ids(&self) -> Result<Vec<String>> {
        let dir = self.image_dir().join("imagedb/content/sha256");
        let entries = fs::read_dir(&dir).map_err(|e| Error::io("cannot list image configs in", &dir, e))?;
        let mut ids: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| is_hex64(n))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Resolves a reference as `docker run` would: a tag or digest ref first, then an
    /// image ID or unique ID prefix.
    pub fn resolve(&self, reference: &str) -> Result<Image> {
        match self.engine {
            Engine::Podman => return self.podman_resolve(reference),
            Engine::Containerd => return self.containerd_resolve(reference),
            Engine::Docker => {}
        }
        let repos = self.repositories()?;
        let id = self.resolve_id(reference, &repos)?;
        self.load_with(&id, &repos)
    }

    fn resolve_id(&self, reference: &str, repos: &Repos) -> Result<String> {
        let parsed = Reference::parse(reference);
        if let Ok(r) = &parsed {
            if let Some(id) = repos.get(&r.familiar_name()).and_then(|m| m.get(&r.familiar_string())) {
                return Ok(id.clone());
            }
        }
        // An ID or ID prefix: `sha256:abc…` or bare hex.
        let hex = reference.strip_prefix("sha256:").unwrap_or(reference);
        if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            let hex = hex.to_ascii_lowercase();
            let matches: Vec<String> = self
                .image_ids()?
                .into_iter()
                .filter(|id| id.starts_with(&hex))
                .collect();
            match matches.as_slice() {
                [one] => return Ok(format!("sha256:{one}")),
                [] => {}
                many => {
                    return Err(Error::new(format!(
                        "image ID prefix '{reference}' is ambiguous in {}: it matches {} \
                         (fix: give more digits of the ID)",
                        self.root.display(),
                        many.iter().map(|m| &m[..16]).collect::<Vec<_>>().join(", ")
                    )))
                }
            }
        }
        parsed?;
        Err(self.not_found(reference, repos))
    }

    /// "No such image", with what the store does hold and the closest name.
    fn not_found(&self, reference: &str, repos: &Repos) -> Error {
        let wanted = Reference::parse(reference)
            .map(|r| r.familiar_string())
            .unwrap_or_else(|_| reference.to_string());
        let all: Vec<(&String, &String)> = repos.values().flat_map(|m| m.iter()).collect();
        let mut msg = format!(
            "image '{reference}' is not in the {} store at {}",
            self.driver.name(),
            self.root.display()
        );
        if all.is_empty() {
            msg.push_str(": the store holds no tagged images (fix: docker pull / docker load the image into it)");
            return Error::new(msg);
        }
        if let Some((closest, _)) = all.iter().min_by_key(|(r, _)| edit_distance(&wanted, r)) {
            msg.push_str(&format!("; closest match: {closest}"));
        }
        msg.push_str("\nimages in this store:");
        for (r, id) in &all {
            let short = sha256_hex(id).map_or(id.as_str(), |h| &h[..12]);
            msg.push_str(&format!("\n  {r}  {short}"));
        }
        msg.push_str("\n(fix: set docker_image= / --image to one of these, or load the image into the store)");
        Error::new(msg)
    }

    /// Loads an image [`Store::images`] listed.
    pub fn load(&self, entry: &ImageEntry) -> Result<Image> {
        match self.engine {
            Engine::Podman => self.podman_resolve(&entry.id),
            Engine::Containerd => self.containerd_load(entry),
            Engine::Docker => self.load_with(&entry.id, &self.repositories()?),
        }
    }

    fn load_with(&self, id: &str, repos: &Repos) -> Result<Image> {
        let hex = sha256_hex(id).ok_or_else(|| {
            Error::new(format!(
                "image ID '{id}' in {} is malformed: expected sha256:<64 lowercase hex>",
                self.repositories_path().display()
            ))
        })?;
        let path = self.image_dir().join("imagedb/content/sha256").join(hex);
        let data = read(&path)?;
        if sha256_of(&data) != hex {
            return Err(Error::new(format!(
                "image config {} is corrupt: its sha256 is not the image ID (the file was modified or truncated; \
                 fix: docker pull / load the image again)",
                path.display()
            )));
        }
        let config: serde_json::Value = serde_json::from_slice(&data)
            .map_err(|e| Error::new(format!("image config {} is not valid JSON: {e}", path.display())))?;
        let diff_ids = diff_ids(&config, &path)?;
        let chains = chain_ids(&diff_ids);
        let mut layers = Vec::with_capacity(chains.len());
        for (chain, diff) in chains.iter().zip(&diff_ids).rev() {
            layers.push(self.layer(chain, diff)?);
        }
        let refs = repos
            .values()
            .flat_map(|m| m.iter())
            .filter(|(_, v)| *v == id)
            .map(|(k, _)| k.clone())
            .collect();
        Ok(Image {
            id: id.to_string(),
            config,
            driver: self.driver,
            layers,
            refs,
            namespace: None,
        })
    }

    fn repositories_path(&self) -> PathBuf {
        self.image_dir().join("repositories.json")
    }

    fn layer(&self, chain_id: &str, diff_id: &str) -> Result<Layer> {
        let chain_hex = sha256_hex(chain_id).expect("chain IDs are computed from validated diff IDs");
        let meta = self.image_dir().join("layerdb/sha256").join(chain_hex);
        if !meta.is_dir() {
            return Err(Error::new(format!(
                "layer {chain_id} is missing: {} does not exist (the store is incomplete; \
                 fix: docker pull / load the image again)",
                meta.display()
            )));
        }
        let recorded_diff = read_trimmed(&meta.join("diff"))?;
        if recorded_diff != diff_id {
            return Err(Error::new(format!(
                "{} says {recorded_diff}, but the image config expects {diff_id}",
                meta.join("diff").display()
            )));
        }
        let cache_path = meta.join("cache-id");
        let cache_id = read_trimmed(&cache_path)?;
        if !is_hex64(&cache_id) {
            return Err(Error::new(format!(
                "{} is corrupt: expected 64 lowercase hex digits, found {:?}",
                cache_path.display(),
                cache_id.chars().take(80).collect::<String>()
            )));
        }
        let (dir, link) = match self.driver {
            Driver::Btrfs => (self.root.join("btrfs/subvolumes").join(&cache_id), None),
            Driver::Vfs => (self.root.join("vfs/dir").join(&cache_id), None),
            Driver::Overlay2 => {
                let home = self.root.join("overlay2").join(&cache_id);
                let link = short_link(&home);
                (home.join("diff"), link)
            }
        };
        if !dir.is_dir() {
            return Err(Error::new(format!(
                "layer {chain_id} (cache-id {cache_id}) has no data: {} does not exist \
                 (the store is incomplete; fix: docker pull / load the image again)",
                dir.display()
            )));
        }
        Ok(Layer {
            chain_id: chain_id.to_string(),
            diff_id: diff_id.to_string(),
            cache_id,
            dir,
            link,
        })
    }
}

pub(super) fn diff_ids(config: &serde_json::Value, path: &Path) -> Result<Vec<String>> {
    let ids = config
        .pointer("/rootfs/diff_ids")
        .and_then(|v| v.as_array())
        .ok_or_else(|| Error::new(format!("image config {} has no rootfs.diff_ids list", path.display())))?;
    ids.iter()
        .map(|v| match v.as_str() {
            Some(s) if sha256_hex(s).is_some() => Ok(s.to_string()),
            _ => Err(Error::new(format!(
                "image config {} lists a malformed diff ID {v}: expected \"sha256:<64 lowercase hex>\"",
                path.display()
            ))),
        })
        .collect()
}

/// The largest store file (JSON, image config, blob) read whole into memory.
const MAX_STORE_FILE: u64 = 64 << 20;

pub(super) fn read(path: &Path) -> Result<Vec<u8>> {
    read_bounded(path, MAX_STORE_FILE)
}

/// Reads a whole file of at most `max` bytes; a larger one (corrupt, or crafted to
/// exhaust /init's memory) is a named error, not an allocation.
pub fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let file = fs::File::open(path).map_err(|e| Error::io("cannot read", path, e))?;
    let mut data = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut data)
        .map_err(|e| Error::io("cannot read", path, e))?;
    if data.len() as u64 > max {
        return Err(Error::new(format!(
            "{} is larger than {} MiB, more than any store file of its kind: the store is corrupt (fix: repair or re-pull the image)",
            path.display(),
            max >> 20
        )));
    }
    Ok(data)
}

/// An overlay layer's short `l/` link name, if it has a sane one (a short name of
/// letters and digits: it becomes part of the overlay's mount options).
pub(super) fn short_link(layer_home: &Path) -> Option<String> {
    let raw = read_bounded(&layer_home.join("link"), 256).ok()?;
    let link = String::from_utf8(raw).ok()?.trim().to_string();
    (!link.is_empty() && link.bytes().all(|b| b.is_ascii_alphanumeric())).then_some(link)
}

fn read_trimmed(path: &Path) -> Result<String> {
    let data = read(path)?;
    Ok(String::from_utf8_lossy(&data).trim().to_string())
}

/// Levenshtein distance, to suggest the closest image name.
pub(super) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (row[j + 1] + 1).min(row[j] + 1).min(diag + usize::from(ca != *cb));
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

mod containerd;
mod podman;
#[cfg(test)]
mod tests;
