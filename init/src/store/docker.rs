//! Docker's graphdriver store (`/var/lib/docker`, btrfs, overlay2 and vfs drivers):
//! image reference → image ID → config → layer stack on disk. Format notes with
//! sources: docs/image-stores.md, section "Docker's graphdriver store".

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{diff_ids, edit_distance, read, Backend, Driver, Engine, Image, ImageEntry, Layer};
use crate::digest::{chain_ids, is_hex64, sha256_hex, sha256_of};
use crate::error::{Error, Result};
use crate::reference::Reference;

type Repos = BTreeMap<String, BTreeMap<String, String>>;

#[derive(Deserialize)]
struct Repositories {
    #[serde(rename = "Repositories", default)]
    repositories: BTreeMap<String, BTreeMap<String, String>>,
}

reader!(Docker);

pub(super) static ENGINE: Engine = Engine {
    name: "docker",
    detect,
    reader: |store| Box::new(Docker(store)),
};

/// The graphdriver stores under `root` (`image/<driver>/repositories.json`).
pub(super) fn graphdriver_stores(root: &Path) -> Vec<Driver> {
    Driver::ALL
        .into_iter()
        .filter(|d| root.join("image").join(d.name()).join("repositories.json").is_file())
        .collect()
}

fn detect(root: &Path) -> Option<Result<super::Detected>> {
    let found = graphdriver_stores(root);
    if let [d] = found.as_slice() {
        return Some(Ok((root.to_path_buf(), *d)));
    }
    // With both present (a driver switch), Docker uses the one whose data dir is in use.
    let in_use: Vec<Driver> = found
        .iter()
        .copied()
        .filter(|d| fs::read_dir(root.join(d.name())).is_ok_and(|mut it| it.next().is_some()))
        .collect();
    match (found.as_slice(), in_use.as_slice()) {
        ([], _) => None,
        (_, [d]) => Some(Ok((root.to_path_buf(), *d))),
        _ => Some(Err(Error::new(format!(
            "{} holds image stores of several drivers in use ({}); remove the ones the engine no longer uses",
            root.display(),
            in_use.iter().map(|d| d.name()).collect::<Vec<_>>().join(", ")
        )))),
    }
}

impl Backend for Docker<'_> {
    fn driver_home(&self) -> PathBuf {
        self.root.join(self.driver.name())
    }

    /// Every image in the store, tagged ones and untagged ones, sorted by first ref.
    fn images(&self) -> Result<Vec<ImageEntry>> {
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

    /// Resolves a reference as `docker run` would: a tag or digest ref first, then an
    /// image ID or unique ID prefix.
    fn resolve(&self, reference: &str) -> Result<Image> {
        let repos = self.repositories()?;
        let id = self.resolve_id(reference, &repos)?;
        self.load_with(&id, &repos)
    }

    fn load(&self, entry: &ImageEntry) -> Result<Image> {
        self.load_with(&entry.id, &self.repositories()?)
    }
}

impl Docker<'_> {
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
        let diff_ids = diff_ids(&data, &path)?;
        let chains = chain_ids(&diff_ids);
        let wanted = self.layers_to_read(self.driver, chains.len());
        let mut layers = Vec::with_capacity(wanted);
        for (chain, diff) in chains.iter().zip(&diff_ids).rev().take(wanted) {
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
        let missing = || {
            Error::new(format!(
                "layer {chain_id} is missing: {} does not exist (the store is incomplete; \
                 fix: docker pull / load the image again)",
                meta.display()
            ))
        };
        // The record's name is its chain ID, which the image's diff IDs give: its `diff`
        // can only repeat what the name says. `inspect` still checks it; a boot skips the
        // read (one cold disk read per layer). Docker writes a record in a temporary
        // directory and renames it, so one that exists is whole. The record's directory
        // is looked at only when a file in it cannot be read: one system call less.
        if !self.for_boot {
            let recorded_diff = match read_trimmed(&meta.join("diff")) {
                Err(_) if !meta.is_dir() => return Err(missing()),
                read => read?,
            };
            if recorded_diff != diff_id {
                return Err(Error::new(format!(
                    "{} says {recorded_diff}, but the image config expects {diff_id}",
                    meta.join("diff").display()
                )));
            }
        }
        let cache_path = meta.join("cache-id");
        let cache_id = match read_trimmed(&cache_path) {
            Err(_) if !meta.is_dir() => return Err(missing()),
            read => read?,
        };
        if !is_hex64(&cache_id) {
            return Err(Error::new(format!(
                "{} is corrupt: expected 64 lowercase hex digits, found {:?}",
                cache_path.display(),
                cache_id.chars().take(80).collect::<String>()
            )));
        }
        let dir = match self.driver {
            Driver::Btrfs => self.root.join("btrfs/subvolumes").join(&cache_id),
            Driver::Vfs => self.root.join("vfs/dir").join(&cache_id),
            Driver::Overlay2 => self.root.join("overlay2").join(&cache_id).join("diff"),
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
        })
    }
}

fn read_trimmed(path: &std::path::Path) -> Result<String> {
    let data = read(path)?;
    Ok(String::from_utf8_lossy(&data).trim().to_string())
}
