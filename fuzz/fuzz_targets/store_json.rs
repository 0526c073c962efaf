//! Image store readers on arbitrary JSON: the input laid out as a Docker graphdriver store
//! or a podman (containers-storage) store in a fresh temporary directory, opened with
//! `store::Store::open`, then `resolve` of a fixed and of an input reference, `images`,
//! and `load` of what it lists. Errors are fine; a panic is a bug.
//!
//! Input: one control byte, then parts separated by 0xFF bytes. Control bit 0: podman
//! instead of Docker; bits 1–2: the driver (overlay2/overlay, btrfs, vfs); bit 3: create
//! the layer metadata and directories the JSON asks for, so a walk can get to the end;
//! bit 4: a layer's recorded diff ID is wrong (Docker).
//! - Docker: repositories.json, an image config (stored under its own sha256), a reference,
//!   overlay2 `link` contents. `@ID@` in repositories.json or the reference becomes
//!   `sha256:<the config's ID>`, which the fuzzer could not compute.
//! - podman: images.json, layers.json, a reference, `link` contents.
#![no_main]

use std::fs;
use std::path::Path;

use layerboot_init::digest::{chain_ids, is_hex64, sha256_hex, sha256_of};
use layerboot_init::store::Store;
use libfuzzer_sys::fuzz_target;

fn write(root: &Path, rel: &str, data: &[u8]) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, data).unwrap();
}

fn mkdir(root: &Path, rel: &str) {
    fs::create_dir_all(root.join(rel)).unwrap();
}

/// The JSON strings at `pointer` in every element (or the one object) of `json`.
fn strings_at(json: &[u8], pointer: &str) -> Vec<String> {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(json) else { return Vec::new() };
    let items = match v.as_array() {
        Some(a) => a.clone(),
        None => vec![v],
    };
    items
        .iter()
        .filter_map(|i| i.pointer(pointer))
        .flat_map(|x| match x {
            serde_json::Value::Array(a) => a.clone(),
            other => vec![other.clone()],
        })
        .filter_map(|x| x.as_str().map(str::to_string))
        .take(8)
        .collect()
}

fn docker(root: &Path, driver: &str, parts: &[&[u8]], control: u8) -> String {
    let config = parts.get(1).copied().unwrap_or_default();
    let id = sha256_of(config);
    let subst = |b: &[u8]| String::from_utf8_lossy(b).replace("@ID@", &format!("sha256:{id}"));
    let image = format!("image/{driver}");
    write(root, &format!("{image}/repositories.json"), subst(parts[0]).as_bytes());
    write(root, &format!("{image}/imagedb/content/sha256/{id}"), config);
    mkdir(root, &format!("{driver}/l"));
    if control & 8 != 0 {
        let diffs: Vec<String> = strings_at(config, "/rootfs/diff_ids").into_iter().filter(|d| sha256_hex(d).is_some()).collect();
        for (i, (chain, diff)) in chain_ids(&diffs).iter().zip(&diffs).enumerate() {
            let meta = format!("{image}/layerdb/sha256/{}", &chain[7..]);
            let recorded = if control & 16 != 0 && i == 0 { "sha256:0" } else { diff.as_str() };
            write(root, &format!("{meta}/diff"), recorded.as_bytes());
            let cache = sha256_of(chain.as_bytes());
            write(root, &format!("{meta}/cache-id"), cache.as_bytes());
            match driver {
                "btrfs" => mkdir(root, &format!("btrfs/subvolumes/{cache}")),
                "vfs" => mkdir(root, &format!("vfs/dir/{cache}")),
                _ => {
                    mkdir(root, &format!("overlay2/{cache}/diff"));
                    write(root, &format!("overlay2/{cache}/link"), parts.get(3).copied().unwrap_or(b"L1"));
                }
            }
        }
    }
    subst(parts.get(2).copied().unwrap_or(b"@ID@"))
}

fn podman(root: &Path, driver: &str, parts: &[&[u8]], control: u8) -> String {
    let layers = parts.get(1).copied().unwrap_or(b"[]");
    write(root, &format!("{driver}-images/images.json"), parts[0]);
    write(root, &format!("{driver}-layers/layers.json"), layers);
    if control & 8 != 0 {
        for id in strings_at(layers, "/id").into_iter().filter(|id| is_hex64(id)) {
            match driver {
                "btrfs" => mkdir(root, &format!("btrfs/subvolumes/{id}")),
                "vfs" => mkdir(root, &format!("vfs/dir/{id}")),
                _ => {
                    mkdir(root, &format!("overlay/{id}/diff"));
                    write(root, &format!("overlay/{id}/link"), parts.get(3).copied().unwrap_or(b"L1"));
                }
            }
        }
    }
    String::from_utf8_lossy(parts.get(2).copied().unwrap_or(b"x")).into_owned()
}

/// A fresh directory, on tmpfs unless TMPDIR says otherwise: on the disk a run is ~25×
/// slower (directory creation and removal dominate).
fn tempdir() -> tempfile::TempDir {
    match std::env::var_os("TMPDIR") {
        None if Path::new("/dev/shm").is_dir() => tempfile::tempdir_in("/dev/shm").unwrap(),
        _ => tempfile::tempdir().unwrap(),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else { return };
    let parts: Vec<&[u8]> = rest.split(|&b| b == 0xff).collect();
    let podman_store = control & 1 != 0;
    let driver = match ((control >> 1) & 3, podman_store) {
        (1, _) => "btrfs",
        (2, _) => "vfs",
        (_, false) => "overlay2",
        (_, true) => "overlay",
    };
    let dir = tempdir();
    let root = dir.path();
    let reference = if podman_store { podman(root, driver, &parts, control) } else { docker(root, driver, &parts, control) };

    let Ok(store) = Store::open(root) else { return };
    let _ = store.resolve("some:ref");
    let _ = store.resolve(&reference);
    if let Ok(images) = store.images() {
        for entry in images.iter().take(4) {
            let _ = store.load(entry);
        }
    }
});
