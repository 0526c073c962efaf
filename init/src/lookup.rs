//! The merged view of an image's layers, read without mounting anything: what a path
//! would show in the container. Used to find the image's kernel, modules and init.
//!
//! overlay2 layers carry deletions as overlay whiteouts (a 0:0 character device) and
//! opaque directories (`trusted.overlay.opaque=y`); btrfs layers are whole trees. Symlinks
//! are resolved inside the image, as if chrooted into it, so `/lib/modules` works on a
//! merged-/usr image where `/lib` is a link to `usr/lib`.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::store::Image;

const MAX_SYMLINKS: usize = 40;

/// The layer directories of an image, topmost first.
pub struct MergedView {
    layers: Vec<PathBuf>,
}

/// A file as the merged view shows it.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The resolved path inside the image, absolute, symlinks in directories followed.
    pub image_path: String,
    /// Where the file actually lives (in the topmost layer that has it).
    pub host_path: PathBuf,
    pub metadata: fs::Metadata,
}

impl MergedView {
    pub fn new(image: &Image) -> MergedView {
        // A btrfs or vfs top layer is the whole tree; lower ones would only add stale files.
        let n = if image.driver.top_is_whole_tree() {
            1
        } else {
            image.layers.len()
        };
        let layers = image.layers.iter().take(n).map(|l| l.dir.clone()).collect();
        MergedView { layers }
    }

    /// A view of plain directories, topmost first (also used for tests and `--rootfs`).
    pub fn from_dirs(layers: Vec<PathBuf>) -> MergedView {
        MergedView { layers }
    }

    /// The file at `path`, the final symlink not followed (like `lstat`). `Ok(None)` if the
    /// merged view has no such file.
    pub fn lookup(&self, path: &str) -> Result<Option<Entry>> {
        self.resolve(path, false)
    }

    /// Like [`lookup`](Self::lookup), following a final symlink too (like `stat`).
    pub fn lookup_follow(&self, path: &str) -> Result<Option<Entry>> {
        self.resolve(path, true)
    }

    /// Names in directory `path` of the merged view, sorted; `Ok(None)` if it is not a directory.
    pub fn read_dir(&self, path: &str) -> Result<Option<Vec<String>>> {
        let Some((image_path, layers)) = self.resolve_dir(path)? else {
            return Ok(None);
        };
        let mut seen = std::collections::BTreeMap::<Vec<u8>, bool>::new(); // name → visible
        for layer in layers {
            let dir = self.host(layer, &image_path);
            let entries = fs::read_dir(&dir).map_err(|e| Error::io("cannot list", &dir, e))?;
            for entry in entries {
                let entry = entry.map_err(|e| Error::io("cannot list", &dir, e))?;
                let name = entry.file_name().as_bytes().to_vec();
                if seen.contains_key(&name) {
                    continue;
                }
                let md = entry
                    .metadata()
                    .map_err(|e| Error::io("cannot stat", entry.path(), e))?;
                seen.insert(name, !is_whiteout(&md));
            }
        }
        Ok(Some(
            seen.into_iter()
                .filter(|(_, visible)| *visible)
                .map(|(n, _)| String::from_utf8_lossy(&n).into_owned())
                .collect(),
        ))
    }

    fn host(&self, layer: usize, image_path: &str) -> PathBuf {
        self.layers[layer].join(image_path.trim_start_matches('/'))
    }

    fn resolve_dir(&self, path: &str) -> Result<Option<(String, Vec<usize>)>> {
        match self.walk(path, true)? {
            Some(Found::Dir(p, layers)) => Ok(Some((p, layers))),
            _ => Ok(None),
        }
    }

    fn resolve(&self, path: &str, follow_last: bool) -> Result<Option<Entry>> {
        Ok(match self.walk(path, follow_last)? {
            None => None,
            Some(Found::Dir(image_path, layers)) => {
                let host_path = self.host(layers[0], &image_path);
                let metadata = lstat(&host_path)?;
                Some(Entry {
                    image_path,
                    host_path,
                    metadata,
                })
            }
            Some(Found::Other(image_path, layer, metadata)) => {
                let host_path = self.host(layer, &image_path);
                Some(Entry {
                    image_path,
                    host_path,
                    metadata,
                })
            }
        })
    }

    /// Path resolution over the layer stack, one component at a time. Each directory on
    /// the way keeps the layers that make it, so `..` and a relative link go back one
    /// level without walking again from the root: a crafted image of links full of
    /// `x/..` made one lookup take minutes when each `..` walked the path again.
    fn walk(&self, path: &str, follow_last: bool) -> Result<Option<Found>> {
        let mut todo: Vec<String> = components(path).into_iter().rev().collect();
        let all: Vec<usize> = (0..self.layers.len()).collect();
        // The directories resolved so far: their path (`/a/b`) and the layers making them.
        let mut dirs: Vec<(String, Vec<usize>)> = Vec::new();
        let mut links = 0;
        while let Some(name) = todo.pop() {
            if name == ".." {
                dirs.pop(); // at the root, `..` is the root
                continue;
            }
            let is_last = todo.is_empty();
            let (parent, dir_layers) = dirs.last().map_or(("", &all), |(p, l)| (p.as_str(), l));
            let image_path = format!("{parent}/{name}");
            let mut found: Option<Found> = None;
            let mut lower_dirs: Vec<usize> = Vec::new();
            for &layer in dir_layers {
                let host = self.host(layer, &image_path);
                let md = match fs::symlink_metadata(&host) {
                    Ok(md) => md,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) if e.raw_os_error() == Some(nix::libc::ENOTDIR) => continue,
                    Err(e) => return Err(Error::io("cannot stat", &host, e)),
                };
                if found.is_none() && lower_dirs.is_empty() {
                    if is_whiteout(&md) {
                        return Ok(None);
                    }
                    if md.is_dir() {
                        lower_dirs.push(layer);
                        if is_opaque(&host) {
                            break;
                        }
                        continue;
                    }
                    found = Some(Found::Other(image_path.clone(), layer, md));
                    break;
                }
                // Below a directory: lower directories merge into it, anything else ends it.
                if md.is_dir() {
                    lower_dirs.push(layer);
                    if is_opaque(&host) {
                        break;
                    }
                } else {
                    break;
                }
            }
            if !lower_dirs.is_empty() {
                dirs.push((image_path, lower_dirs));
                continue;
            }
            let Some(Found::Other(p, layer, md)) = found else {
                return Ok(None);
            };
            if md.file_type().is_symlink() && (!is_last || follow_last) {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(Error::new(format!(
                        "too many levels of symbolic links resolving {path} in the image"
                    )));
                }
                let host = self.host(layer, &p);
                let target = fs::read_link(&host).map_err(|e| Error::io("cannot read link", &host, e))?;
                let target = target.as_os_str().to_string_lossy().into_owned();
                // Relative: from the link's own directory, where the walk stands.
                if target.starts_with('/') {
                    dirs.clear();
                }
                for c in components(&target).into_iter().rev() {
                    todo.push(c);
                }
                continue;
            }
            if is_last {
                return Ok(Some(Found::Other(p, layer, md)));
            }
            return Ok(None); // a file used as a directory
        }
        Ok(Some(match dirs.pop() {
            Some((path, layers)) => Found::Dir(path, layers),
            None => Found::Dir("/".to_string(), all),
        }))
    }
}

enum Found {
    /// A directory: the resolved path and the layers that contribute to it, topmost first.
    Dir(String, Vec<usize>),
    /// Anything else: the resolved path, the layer it is in and its metadata.
    Other(String, usize, fs::Metadata),
}

fn components(path: &str) -> Vec<String> {
    path.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .map(str::to_string)
        .collect()
}

fn lstat(p: &Path) -> Result<fs::Metadata> {
    fs::symlink_metadata(p).map_err(|e| Error::io("cannot stat", p, e))
}

/// An overlay whiteout is a character device with device number 0:0. Real device nodes
/// (a base layer's /dev/null is 1:3) are not whiteouts.
pub fn is_whiteout(md: &fs::Metadata) -> bool {
    md.file_type().is_char_device() && md.rdev() == 0
}

/// `trusted.overlay.opaque=y` (or the rootless `user.overlay.opaque=y`) on a directory.
pub fn is_opaque(dir: &Path) -> bool {
    ["trusted.overlay.opaque", "user.overlay.opaque"]
        .iter()
        .any(|name| crate::xattr::get(dir, name).as_deref() == Some(b"y"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn write(p: &Path, s: &str) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, s).unwrap();
    }

    #[test]
    fn upper_shadows_lower_and_symlinked_dirs_resolve_inside_the_image() {
        let t = tempfile::tempdir().unwrap();
        let (top, base) = (t.path().join("top"), t.path().join("base"));
        write(&base.join("usr/lib/modules/6.1.0/modules.dep"), "base");
        write(&base.join("etc/os-release"), "base");
        write(&top.join("etc/os-release"), "top");
        fs::create_dir_all(&top).unwrap();
        symlink("usr/lib", base.join("lib")).unwrap();
        symlink("/etc/os-release", top.join("escape")).unwrap();
        let view = MergedView::from_dirs(vec![top.clone(), base.clone()]);

        let e = view.lookup("/lib/modules/6.1.0/modules.dep").unwrap().unwrap();
        assert_eq!(e.image_path, "/usr/lib/modules/6.1.0/modules.dep");
        assert_eq!(fs::read_to_string(e.host_path).unwrap(), "base");
        let e = view.lookup_follow("/escape").unwrap().unwrap();
        assert_eq!(fs::read_to_string(e.host_path).unwrap(), "top");
        assert!(view
            .lookup("/escape")
            .unwrap()
            .unwrap()
            .metadata
            .file_type()
            .is_symlink());
        assert_eq!(view.read_dir("/lib/modules").unwrap().unwrap(), vec!["6.1.0"]);
        assert_eq!(
            view.read_dir("/").unwrap().unwrap(),
            vec!["escape", "etc", "lib", "usr"]
        );
        assert!(view.lookup("/nope").unwrap().is_none());
        assert!(view.lookup("/etc/os-release/x").unwrap().is_none());
        // `..` cannot climb out of the image root.
        let e = view.lookup("/../../../etc/os-release").unwrap().unwrap();
        assert_eq!(e.image_path, "/etc/os-release");
    }

    #[test]
    fn dot_dot_goes_back_one_directory_with_its_own_layers() {
        let t = tempfile::tempdir().unwrap();
        let (top, base) = (t.path().join("top"), t.path().join("base"));
        write(&base.join("usr/lib/x"), "base");
        write(&top.join("usr/bin/y"), "top");
        symlink("../lib/x", top.join("usr/bin/rel")).unwrap();
        let view = MergedView::from_dirs(vec![top.clone(), base.clone()]);
        let e = view.lookup("/usr/lib/..").unwrap().unwrap();
        assert_eq!(
            (e.image_path.as_str(), e.host_path.as_path()),
            ("/usr", top.join("usr").as_path())
        );
        assert_eq!(view.read_dir("/usr/bin/..").unwrap().unwrap(), ["bin", "lib"]);
        let e = view.lookup_follow("/usr/bin/rel").unwrap().unwrap();
        assert_eq!(fs::read_to_string(e.host_path).unwrap(), "base");
    }

    #[test]
    fn links_full_of_dot_dot_cost_a_step_each() {
        // 39 chained links, each ~800 `x/..` pairs, 25 directories down: when each `..`
        // walked the path again from the root, this one lookup took 16 s.
        let t = tempfile::tempdir().unwrap();
        let deep = t.path().join(["a"; 25].join("/"));
        fs::create_dir_all(deep.join("x")).unwrap();
        for i in 0..39 {
            let next = if i == 38 {
                "x".to_string()
            } else {
                format!("l{}", i + 1)
            };
            symlink(format!("{}{next}", "x/../".repeat(799)), deep.join(format!("l{i}"))).unwrap();
        }
        let view = MergedView::from_dirs(vec![t.path().to_path_buf()]);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(
                view.lookup_follow(&format!("/{}/l0", ["a"; 25].join("/")))
                    .map(|e| e.map(|e| e.image_path)),
            );
        });
        let found = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("still resolving after 10 s");
        assert_eq!(found.unwrap().unwrap(), format!("/{}/x", ["a"; 25].join("/")));
    }

    #[test]
    fn symlink_loops_are_an_error_not_a_hang() {
        let t = tempfile::tempdir().unwrap();
        symlink("b", t.path().join("a")).unwrap();
        symlink("a", t.path().join("b")).unwrap();
        let view = MergedView::from_dirs(vec![t.path().to_path_buf()]);
        assert!(view
            .lookup_follow("/a")
            .unwrap_err()
            .to_string()
            .contains("too many levels"));
    }
}
