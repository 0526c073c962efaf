//! Offline readers of container engines' image stores: image reference → image ID →
//! config → layer stack on disk. This file detects which engine wrote a data root and
//! holds what they share ([`Image`], [`Layer`], bounded reads); each engine is a peer
//! behind [`Backend`]: `docker.rs` (Docker's graphdriver store), `podman.rs`
//! (containers-storage), `containerd.rs`. Format notes: docs/image-stores.md.
//!
//! Nothing here writes: the store belongs to the engine. Every ID read from disk is
//! checked to be 64 lowercase hex before it becomes a path, and every missing or corrupt
//! file is reported by name with what was expected.

use std::fs;
use std::path::{Path, PathBuf};

use crate::digest::sha256_hex;
use crate::error::{Error, Result};

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
}

impl Layer {
    /// overlay2 (Docker's and podman's): the short name under the driver's `l/` that links
    /// to `dir`, from the `link` file beside it, if it is a sane one (letters and digits:
    /// it becomes part of the overlay's mount options). Read only when the full names do
    /// not fit those options.
    pub fn short_link(&self) -> Option<String> {
        let raw = read_bounded(&self.dir.parent()?.join("link"), 256).ok()?;
        let link = String::from_utf8(raw).ok()?.trim().to_string();
        (!link.is_empty() && link.bytes().all(|b| b.is_ascii_alphanumeric())).then_some(link)
    }
}

/// A resolved image: its ID and layers **topmost first** (read by a
/// [`Store::for_boot`] from a btrfs or vfs store: the top one alone).
#[derive(Debug, Clone)]
pub struct Image {
    pub id: String,
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
/// One engine layerboot reads: a file of its own that implements [`Backend`] and tells
/// its stores apart, registered by its line in [`ENGINES`].
pub struct Engine {
    /// As `booted.json` and `inspect` name it: `docker`, `podman`, `containerd`.
    pub name: &'static str,
    /// The store at `root` if this engine wrote it: its data root (which may lie below
    /// `root`) and its driver; `None`: not this engine's.
    detect: fn(&Path) -> Option<Result<Detected>>,
    reader: for<'a> fn(&'a Store) -> Box<dyn Backend + 'a>,
}

/// What an engine's detection found: the data root and its driver.
type Detected = (PathBuf, Driver);

/// The engines, in the order their stores are tried. A new engine is one file and its
/// line here.
static ENGINES: [&Engine; 3] = [&podman::ENGINE, &containerd::ENGINE, &docker::ENGINE];

impl PartialEq for Engine {
    fn eq(&self, other: &Engine) -> bool {
        self.name == other.name
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

impl serde::Serialize for Engine {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name)
    }
}

/// An engine's data root opened for reading.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    driver: Driver,
    engine: &'static Engine,
    /// containerd: search only this namespace (`layerboot.namespace=`, `--namespace`).
    namespace: Option<String>,
    /// Read for a boot: see [`Store::for_boot`].
    for_boot: bool,
}

impl Store {
    /// Opens the data root and detects the engine and driver: podman's store
    /// (`<driver>-images/images.json`), containerd's (at the root, or the one dockerd
    /// manages under it), or Docker's graphdriver store (`image/<driver>/repositories.json`).
    pub fn open(root: impl Into<PathBuf>) -> Result<Store> {
        let root = root.into();
        if !root.is_dir() {
            return Err(Error::new(format!(
                "no container image store at {}: the directory does not exist \
                 (fix: point docker_path= / --store at the engine's data root, e.g. var/lib/docker)",
                root.display()
            )));
        }
        for engine in ENGINES {
            if let Some(found) = (engine.detect)(&root) {
                let (root, driver) = found?;
                return Ok(Store {
                    root,
                    driver,
                    engine,
                    namespace: None,
                    for_boot: false,
                });
            }
        }
        Err(Error::new(format!(
            "{} is not an image store layerboot reads: no image/<btrfs|overlay2|vfs>/repositories.json (Docker), \
             <overlay|btrfs|vfs>-images/images.json (podman) or {} (containerd) exists \
             (fix: point docker_path= / --store at the engine's data root: var/lib/docker, \
             var/lib/containers/storage or var/lib/containerd)",
            root.display(),
            containerd::META_DB
        )))
    }

    /// Limits a containerd store to one namespace; other stores have none.
    pub fn with_namespace(mut self, namespace: Option<String>) -> Store {
        self.namespace = namespace.filter(|n| !n.is_empty());
        self
    }

    /// Reads images for a boot: with a driver whose top layer is the whole tree (btrfs,
    /// vfs), the boot mounts that layer alone, so only its record and directory are read
    /// and checked, and [`Image::layers`] holds it alone. The lower layers' records are
    /// no business of a boot: on a btrfs store they were a dozen disk reads, each waiting
    /// for the disk. Other drivers' images keep every layer (all are mounted).
    pub fn for_boot(mut self) -> Store {
        self.for_boot = true;
        self
    }

    /// How many of the `layers` (topmost first) of an image kept by `driver` a reader
    /// reads and checks. The image's driver, not the store's: a containerd store keeps
    /// each image with its own snapshotter.
    fn layers_to_read(&self, driver: Driver, layers: usize) -> usize {
        if self.for_boot && driver.top_is_whole_tree() {
            layers.min(1)
        } else {
            layers
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn engine(&self) -> &'static Engine {
        self.engine
    }

    /// The directory the driver keeps its layers in: overlay lower dirs are named
    /// relative to it (`l/<link>`).
    pub fn driver_home(&self) -> PathBuf {
        self.backend().driver_home()
    }

    pub fn driver(&self) -> Driver {
        self.driver
    }

    /// Every image in the store, tagged ones and untagged ones, sorted by first ref.
    pub fn images(&self) -> Result<Vec<ImageEntry>> {
        self.backend().images()
    }

    /// Resolves a reference as the engine's own CLI would: a tag or digest ref first,
    /// then an image ID or unique ID prefix.
    pub fn resolve(&self, reference: &str) -> Result<Image> {
        self.backend().resolve(reference)
    }

    /// Loads an image [`Store::images`] listed.
    pub fn load(&self, entry: &ImageEntry) -> Result<Image> {
        self.backend().load(entry)
    }

    /// The reader of the engine that wrote this store.
    fn backend(&self) -> Box<dyn Backend + '_> {
        (self.engine.reader)(self)
    }
}

/// One engine's store format: what a [`Store`] asks of the engine that wrote it.
trait Backend {
    /// The directory the driver keeps its layers in: overlay lower dirs are named
    /// relative to it.
    fn driver_home(&self) -> PathBuf;
    fn images(&self) -> Result<Vec<ImageEntry>>;
    fn resolve(&self, reference: &str) -> Result<Image>;
    fn load(&self, entry: &ImageEntry) -> Result<Image>;
}

/// An engine's reader: a view of the store it reads (it derefs to the [`Store`]).
macro_rules! reader {
    ($name:ident) => {
        pub(super) struct $name<'a>(pub(super) &'a super::Store);

        impl std::ops::Deref for $name<'_> {
            type Target = super::Store;
            fn deref(&self) -> &super::Store {
                self.0
            }
        }
    };
}

/// The one part of an image config a boot reads. The rest is skipped as it is parsed,
/// never built: as a `serde_json::Value`, a crafted config of small objects took 100
/// times its size in memory (an 8 MiB one, 819 MiB), and PID 1 out of memory is a
/// kernel panic.
#[derive(serde::Deserialize)]
struct ImageConfig {
    rootfs: Option<RootFs>,
}

#[derive(serde::Deserialize)]
struct RootFs {
    diff_ids: Option<Vec<String>>,
}

/// The diff IDs of the image config `data` (at `path`, for messages), bottom layer first.
pub(super) fn diff_ids(data: &[u8], path: &Path) -> Result<Vec<String>> {
    let config: ImageConfig = serde_json::from_slice(data)
        .map_err(|e| Error::new(format!("image config {} is not valid: {e}", path.display())))?;
    let ids = config
        .rootfs
        .and_then(|r| r.diff_ids)
        .ok_or_else(|| Error::new(format!("image config {} has no rootfs.diff_ids list", path.display())))?;
    if let Some(bad) = ids.iter().find(|s| sha256_hex(s).is_none()) {
        return Err(Error::new(format!(
            "image config {} lists a malformed diff ID {bad:?}: expected \"sha256:<64 lowercase hex>\"",
            path.display()
        )));
    }
    Ok(ids)
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
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    // Only a regular file is opened: a FIFO would hold the boot for a writer that never
    // comes, /dev/console never ends, and opening some devices acts (a watchdog arms).
    // Checked before the open (links followed, as the open follows them), and the open
    // cannot block even if the file changed in between.
    let kind = fs::metadata(path)
        .map_err(|e| Error::io("cannot read", path, e))?
        .file_type();
    if !kind.is_file() {
        let what = match kind {
            k if k.is_dir() => "a directory",
            k if k.is_fifo() => "a FIFO",
            k if k.is_char_device() || k.is_block_device() => "a device",
            _ => "not a regular file",
        };
        return Err(Error::new(format!(
            "{} is {what}, not a file: the store is corrupt (fix: repair or re-pull the image)",
            path.display()
        )));
    }
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
        .open(path)
        .map_err(|e| Error::io("cannot read", path, e))?;
    // Room for the usual store file (an ID, a config) in the first read: from an empty
    // buffer, read_to_end starts with a 32-byte read and grows from there.
    let mut data = Vec::with_capacity(8192);
    file.take(max + 1)
        .read_to_end(&mut data)
        .map_err(|e| Error::io("cannot read", path, e))?;
    if data.len() as u64 > max {
        let limit = if max >= 1 << 20 {
            format!("{} MiB", max >> 20)
        } else {
            format!("{max} bytes")
        };
        return Err(Error::new(format!(
            "{} is larger than {limit}, more than any store file of its kind: the store is corrupt (fix: repair or re-pull the image)",
            path.display()
        )));
    }
    Ok(data)
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
mod docker;
mod podman;
#[cfg(test)]
mod tests;
