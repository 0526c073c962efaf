//! containerd's image store (`/var/lib/containerd`, or dockerd's own
//! `<data-root>/containerd/daemon`), as Docker 29 uses it by default and as `ctr` and
//! nerdctl write it:
//!
//! `meta.db` (bbolt) `v1/<namespace>/images/<name>/target` → index or manifest blob →
//! config blob → `rootfs.diff_ids` → chain IDs → `v1/<namespace>/snapshots/<snapshotter>/<top
//! chain ID>/name` → the snapshotter's own `metadata.db` `v1/snapshots/<name>` → its
//! numeric `id` and `parent` chain → `snapshots/<id>/fs` (overlayfs, one diff each, whiteouts
//! as 0:0 devices as overlay2 has them) or `snapshots/<id>` (btrfs, the whole tree).
//! Every blob is checked against its digest before it is parsed. Format notes with
//! sources: docs/image-stores.md, sections "containerd's store" and "The bbolt reader".

use std::path::{Path, PathBuf};

use super::{edit_distance, Backend, Driver, Engine, Image, ImageEntry, Layer};
use crate::bolt::{uvarint, Bucket, Db};
use crate::digest::{chain_ids, sha256_hex};
use crate::error::{Error, Result};
use crate::reference::Reference;

mod content;
mod names;

use names::matching;

pub const META_DB: &str = "io.containerd.metadata.v1.bolt/meta.db";
/// Where dockerd keeps the containerd it starts itself, under its data root.
pub const DOCKERD_MANAGED: &str = "containerd/daemon";
const BLOBS: &str = "io.containerd.content.v1.content/blobs/sha256";
/// The snapshotters whose layers layerboot mounts, in the order they are tried.
const SNAPSHOTTERS: [(&str, Driver); 3] = [
    ("overlayfs", Driver::Overlay2),
    ("btrfs", Driver::Btrfs),
    ("native", Driver::Vfs),
];
/// Namespaces searched first when none is given: Docker's, then ctr's and nerdctl's.
const PREFERRED_NAMESPACES: [&str; 2] = ["moby", "default"];

/// The overlayfs snapshotter's layer directory (`snapshots/<id>/fs` is relative to it).
pub fn overlayfs_home(root: &Path) -> PathBuf {
    root.join("io.containerd.snapshotter.v1.overlayfs/snapshots")
}

/// One record of a namespace's `images` bucket.
#[derive(Debug, Clone)]
struct Record {
    namespace: String,
    name: String,
    /// The index or manifest digest: what `docker images` shows as the ID in this mode.
    digest: String,
}

fn utf8(v: &[u8]) -> String {
    String::from_utf8_lossy(v).into_owned()
}

reader!(Containerd);

pub(super) static ENGINE: Engine = Engine {
    name: "containerd",
    detect,
    reader: |store| Box::new(Containerd(store)),
};

/// containerd's store at `root`, or the one dockerd runs itself under its data root
/// (Docker 29 in containerd mode) when dockerd has no graphdriver store there.
fn detect(root: &Path) -> Option<Result<super::Detected>> {
    let managed = root.join(DOCKERD_MANAGED);
    let at = if root.join(META_DB).is_file() {
        root.to_path_buf()
    // A Docker data root always has dockerd's own containerd under it: its graphdriver
    // stores, read next anyway, are looked for first (4 fewer disk reads at boot).
    } else if super::docker::graphdriver_stores(root).is_empty() && managed.join(META_DB).is_file() {
        managed
    } else {
        return None;
    };
    let driver = driver_of(&at);
    Some(Ok((at, driver)))
}

/// The store's driver: the first snapshotter holding snapshots (each image says which
/// one its own layers are in).
fn driver_of(root: &Path) -> Driver {
    let has = |sn: &str| {
        std::fs::read_dir(root.join(format!("io.containerd.snapshotter.v1.{sn}/snapshots")))
            .is_ok_and(|mut d| d.next().is_some())
    };
    if !has("overlayfs") && has("btrfs") {
        Driver::Btrfs
    } else {
        Driver::Overlay2
    }
}

impl Backend for Containerd<'_> {
    fn driver_home(&self) -> PathBuf {
        overlayfs_home(&self.root)
    }

    fn images(&self) -> Result<Vec<ImageEntry>> {
        let db = self.meta_db()?;
        let mut out: Vec<ImageEntry> = Vec::new();
        for r in self.records(&db)? {
            match out
                .iter_mut()
                .find(|e| e.id == r.digest && e.namespace.as_deref() == Some(&r.namespace))
            {
                Some(e) => e.refs.push(r.name),
                None => out.push(ImageEntry {
                    id: r.digest,
                    refs: vec![r.name],
                    namespace: Some(r.namespace),
                }),
            }
        }
        out.sort_by(|a, b| (&a.namespace, &a.refs).cmp(&(&b.namespace, &b.refs)));
        Ok(out)
    }

    /// Resolves `reference` as Docker does in containerd mode (a normalised name, a
    /// digest ref, an ID or unique ID prefix), searching the namespaces in order: the one
    /// given, else `moby`, then `default`, then any other, where a match in two is an error.
    fn resolve(&self, reference: &str) -> Result<Image> {
        let db = self.meta_db()?;
        let records = self.records(&db)?;
        let matches = |ns: &str| -> Result<Vec<&Record>> {
            matching(reference, records.iter().filter(|r| r.namespace == ns).collect())
        };
        let mut namespaces: Vec<&str> = records.iter().map(|r| r.namespace.as_str()).collect();
        namespaces.sort();
        namespaces.dedup();
        let (mut preferred, rest): (Vec<&str>, Vec<&str>) =
            namespaces.into_iter().partition(|n| PREFERRED_NAMESPACES.contains(n));
        preferred.sort_by_key(|n| PREFERRED_NAMESPACES.iter().position(|p| p == n));
        for ns in &preferred {
            if let Some(r) = matches(ns)?.first() {
                return self.image(&db, r, &records);
            }
        }
        let mut found: Vec<&Record> = Vec::new();
        for ns in rest {
            found.extend(matches(ns)?.first());
        }
        match found.as_slice() {
            [one] => self.image(&db, one, &records),
            [] => Err(self.not_found(reference, &records)),
            many => Err(Error::new(format!(
                "image '{reference}' is in several containerd namespaces of {}: {} \
                 (fix: pick one with layerboot.namespace= at boot, --namespace for layerboot)",
                self.root.display(),
                many.iter()
                    .map(|r| format!("{} ({})", r.namespace, r.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// Loads an entry of [`Store::images`] by its ID in its namespace.
    fn load(&self, entry: &ImageEntry) -> Result<Image> {
        let db = self.meta_db()?;
        let records = self.records(&db)?;
        let r = records
            .iter()
            .find(|r| r.digest == entry.id && r.namespace.as_str() == entry.namespace.as_deref().unwrap_or_default())
            .ok_or_else(|| Error::new(format!("image {} is no longer in {}", entry.id, self.root.display())))?;
        self.image(&db, r, &records)
    }
}

impl Containerd<'_> {
    fn meta_db(&self) -> Result<Db> {
        Db::open(&self.root.join(META_DB))
    }

    /// Every image record, in every namespace (or only `--namespace`/`layerboot.namespace=`).
    fn records(&self, db: &Db) -> Result<Vec<Record>> {
        let meta = self.root.join(META_DB);
        let v1 = db.root().bucket("v1")?.ok_or_else(|| {
            Error::new(format!(
                "{} has no v1 bucket: not a containerd metadata database",
                meta.display()
            ))
        })?;
        let mut out = Vec::new();
        for (ns, entry) in v1.entries()? {
            let crate::bolt::Item::Bucket(ns_bucket) = entry else {
                continue;
            };
            let ns = utf8(ns);
            if self.namespace.as_ref().is_some_and(|want| *want != ns) {
                continue;
            }
            let Some(images) = ns_bucket.bucket("images")? else {
                continue;
            };
            for (name, entry) in images.entries()? {
                let crate::bolt::Item::Bucket(img) = entry else {
                    continue;
                };
                let digest = match img.bucket("target")? {
                    Some(t) => t.value("digest")?.map(utf8).unwrap_or_default(),
                    None => String::new(),
                };
                out.push(Record {
                    namespace: ns.clone(),
                    name: utf8(name),
                    digest,
                });
            }
        }
        Ok(out)
    }

    fn not_found(&self, reference: &str, records: &[Record]) -> Error {
        let wanted = Reference::parse(reference)
            .map(|r| r.full_string())
            .unwrap_or_else(|_| reference.to_string());
        let scope = match &self.namespace {
            Some(ns) => format!("namespace {ns} of "),
            None => String::new(),
        };
        let mut msg = format!(
            "image '{reference}' is not in the containerd store ({scope}{})",
            self.root.display()
        );
        if records.is_empty() {
            msg.push_str(
                ": it holds no images (fix: docker pull / ctr images pull the image, or check layerboot.namespace=)",
            );
            return Error::new(msg);
        }
        if let Some(closest) = records.iter().min_by_key(|r| edit_distance(&wanted, &r.name)) {
            msg.push_str(&format!("; closest match: {}", closest.name));
        }
        msg.push_str("\nimages in this store:");
        for r in records {
            msg.push_str(&format!(
                "\n  {}  {}  (namespace {})",
                r.name,
                sha256_hex(&r.digest).map_or("?", |h| &h[..12]),
                r.namespace
            ));
        }
        msg.push_str("\n(fix: set docker_image= / --image to one of these, or pull the image into the store)");
        Error::new(msg)
    }

    fn image(&self, db: &Db, record: &Record, records: &[Record]) -> Result<Image> {
        let (config_digest, config) = self.config_of(record)?;
        let diff_ids = super::diff_ids(&config, Path::new(&config_digest))?;
        let chains = chain_ids(&diff_ids);
        let Some(top) = chains.last() else {
            return Err(Error::new(format!(
                "image {} has no layers: there is nothing to boot",
                record.name
            )));
        };
        let ns = db
            .root()
            .bucket("v1")?
            .and_then(|v1| v1.bucket(&record.namespace).ok().flatten());
        let snapshots = match &ns {
            Some(ns) => ns.bucket("snapshots")?,
            None => None,
        };
        let mut unpacked = None;
        for (snapshotter, driver) in SNAPSHOTTERS {
            let Some(sn) = snapshots.as_ref().map(|s| s.bucket(snapshotter)).transpose()?.flatten() else {
                continue;
            };
            if let Some(key) = sn.bucket(top)? {
                let name = key.value("name")?.map(utf8).unwrap_or_default();
                unpacked = Some((snapshotter, driver, name));
                break;
            }
        }
        let Some((snapshotter, driver, backend_key)) = unpacked else {
            return Err(Error::new(format!(
                "image {} (namespace {}) is not unpacked for the overlayfs, btrfs or native snapshotter: its layers exist only \
                 as compressed blobs (fix: ctr -n {} images unpack --snapshotter overlayfs {}, or docker pull it again)",
                record.name, record.namespace, record.namespace, record.name
            )));
        };
        let home = self.root.join(format!("io.containerd.snapshotter.v1.{snapshotter}"));
        let sdb_path = home.join("metadata.db");
        let sdb = Db::open(&sdb_path)?;
        let all = sdb
            .root()
            .bucket("v1")?
            .and_then(|v| v.bucket("snapshots").ok().flatten())
            .ok_or_else(|| {
                Error::new(format!(
                    "{} has no v1/snapshots bucket: not a snapshotter database",
                    sdb_path.display()
                ))
            })?;
        let mut layers = Vec::with_capacity(chains.len());
        let mut key = backend_key;
        while !key.is_empty() && layers.len() < self.layers_to_read(driver, usize::MAX) {
            let snap = snapshot(&all, &key, &sdb_path)?;
            let dir = match driver {
                Driver::Overlay2 => home.join("snapshots").join(snap.id.to_string()).join("fs"),
                Driver::Btrfs | Driver::Vfs => home.join("snapshots").join(snap.id.to_string()),
            };
            if !dir.is_dir() {
                return Err(Error::new(format!(
                    "snapshot {key} of image {} has no data: {} does not exist (fix: pull the image again)",
                    record.name,
                    dir.display()
                )));
            }
            let i = chains.len().checked_sub(layers.len() + 1);
            layers.push(Layer {
                chain_id: i.map(|i| chains[i].clone()).unwrap_or_default(),
                diff_id: i.map(|i| diff_ids[i].clone()).unwrap_or_default(),
                cache_id: snap.id.to_string(),
                dir,
            });
            if layers.len() > chains.len() {
                return Err(Error::new(format!(
                    "{}: the snapshot chain of {} is longer than its {} layers",
                    sdb_path.display(),
                    record.name,
                    chains.len()
                )));
            }
            key = snap.parent;
        }
        if layers.len() != self.layers_to_read(driver, chains.len()) {
            return Err(Error::new(format!(
                "{}: image {} has {} layers but its snapshot chain {} (fix: unpack or pull the image again)",
                sdb_path.display(),
                record.name,
                chains.len(),
                layers.len()
            )));
        }
        let refs = records
            .iter()
            .filter(|r| r.namespace == record.namespace && r.digest == record.digest)
            .map(|r| r.name.clone())
            .collect();
        Ok(Image {
            id: record.digest.clone(),
            driver,
            layers,
            refs,
            namespace: Some(record.namespace.clone()),
        })
    }
}

struct Snapshot {
    id: u64,
    parent: String,
}

/// A committed snapshot of the snapshotter's database.
fn snapshot(all: &Bucket<'_>, key: &str, db: &Path) -> Result<Snapshot> {
    let b = all.bucket(key)?.ok_or_else(|| {
        Error::new(format!(
            "{} has no snapshot {key} (fix: unpack or pull the image again)",
            db.display()
        ))
    })?;
    let id = b
        .value("id")?
        .and_then(uvarint)
        .ok_or_else(|| Error::new(format!("{}: snapshot {key} has no valid id", db.display())))?;
    // 3 = committed; an image's layers never are views or active snapshots.
    if b.value("kind")? != Some(&[3][..]) {
        return Err(Error::new(format!(
            "{}: snapshot {key} is not committed: it is still being written (fix: pull the image again)",
            db.display()
        )));
    }
    let parent = b.value("parent")?.map(utf8).unwrap_or_default();
    Ok(Snapshot { id, parent })
}
