//! Store reader against small synthetic stores: every kind of damage gets a named error.
//! (The real dockerd-made stores are tested in builder/tests/stores.rs.)

use super::*;
use crate::digest::{chain_ids, sha256_of};
use std::fs;
use std::path::Path;

struct Fixture {
    dir: tempfile::TempDir,
}

fn hex(n: u8) -> String {
    format!("{n:02x}").repeat(32)
}

impl Fixture {
    /// A btrfs-driver store with one image of two layers, tagged `acc/x:1` and `debian:latest`.
    fn new() -> (Fixture, String) {
        let f = Fixture {
            dir: tempfile::tempdir().unwrap(),
        };
        let diffs = [format!("sha256:{}", hex(1)), format!("sha256:{}", hex(2))];
        let config = serde_json::json!({"rootfs": {"type": "layers", "diff_ids": diffs}}).to_string();
        let id = sha256_of(config.as_bytes());
        f.write(&format!("image/btrfs/imagedb/content/sha256/{id}"), &config);
        for (i, (chain, diff)) in chain_ids(&diffs).iter().zip(&diffs).enumerate() {
            let layer = format!("image/btrfs/layerdb/sha256/{}", &chain[7..]);
            f.write(&format!("{layer}/diff"), diff);
            f.write(&format!("{layer}/cache-id"), &hex(0x10 + i as u8));
            fs::create_dir_all(f.path().join(format!("btrfs/subvolumes/{}", hex(0x10 + i as u8)))).unwrap();
        }
        f.repos(&format!(
            r#"{{"Repositories":{{"acc/x":{{"acc/x:1":"sha256:{id}","acc/x@sha256:{d}":"sha256:{id}"}},"debian":{{"debian:latest":"sha256:{id}"}}}}}}"#,
            d = hex(0xdd)
        ));
        (f, format!("sha256:{id}"))
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn write(&self, rel: &str, data: &str) {
        let p = self.path().join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, data).unwrap();
    }

    fn repos(&self, json: &str) {
        self.write("image/btrfs/repositories.json", json);
    }

    fn store(&self) -> Store {
        Store::open(self.path()).unwrap()
    }

    fn layer_meta(&self, top: bool) -> PathBuf {
        let dir = self.path().join("image/btrfs/layerdb/sha256");
        let mut all: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        all.sort_by_key(|p| fs::read_to_string(p.join("cache-id")).unwrap());
        if top {
            all.pop().unwrap()
        } else {
            all.remove(0)
        }
    }
}

fn err(r: Result<Image>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn resolves_every_spelling_and_orders_layers_top_first() {
    let (f, id) = Fixture::new();
    let s = f.store();
    assert_eq!(s.driver(), Driver::Btrfs);
    for r in [
        "acc/x:1",
        "docker.io/acc/x:1",
        "debian",
        "debian:latest",
        "docker.io/library/debian:latest",
        &id,
        &id[7..19],
        &id[7..],
    ] {
        let img = s.resolve(r).unwrap_or_else(|e| panic!("{r}: {e}"));
        assert_eq!(img.id, id);
        assert_eq!(img.layers.len(), 2);
        assert_eq!(img.layers[0].cache_id, hex(0x11), "topmost first");
        assert!(img.layers[0].dir.ends_with(format!("btrfs/subvolumes/{}", hex(0x11))));
    }
    let digest_ref = format!("acc/x@sha256:{}", hex(0xdd));
    assert_eq!(s.resolve(&digest_ref).unwrap().id, id);
    assert_eq!(
        s.resolve(&format!("docker.io/acc/x:9@sha256:{}", hex(0xdd)))
            .unwrap()
            .id,
        id
    );
}

#[test]
fn unknown_ref_lists_the_store_and_the_closest_match() {
    let (f, _) = Fixture::new();
    let e = err(f.store().resolve("acc/y:1"));
    assert!(e.contains("image 'acc/y:1' is not in the btrfs store"), "{e}");
    assert!(e.contains("closest match: acc/x:1"), "{e}");
    assert!(e.contains("\n  debian:latest  "), "{e}");
    let e = err(f.store().resolve(&format!("acc/x@sha256:{}", hex(0xee))));
    assert!(e.contains("is not in the btrfs store"), "{e}");
}

#[test]
fn ambiguous_id_prefix_is_refused() {
    let (f, _) = Fixture::new();
    let other = serde_json::json!({"rootfs": {"diff_ids": []}, "x": 1}).to_string();
    // Find a second config whose ID shares the first hex digit with the fixture's.
    let first = f.store().images().unwrap()[0].id[7..8].to_string();
    let mut n = 0;
    let id2 = loop {
        let c = format!("{other}{}", " ".repeat(n));
        let id = sha256_of(c.as_bytes());
        if id.starts_with(&first) {
            f.write(&format!("image/btrfs/imagedb/content/sha256/{id}"), &c);
            break id;
        }
        n += 1;
    };
    let e = err(f.store().resolve(&first));
    assert!(e.contains("is ambiguous") && e.contains(&id2[..16]), "{e}");
    // The untagged image is listed and resolvable by its full ID; it has no layers.
    assert!(f
        .store()
        .images()
        .unwrap()
        .iter()
        .any(|i| i.id.ends_with(&id2) && i.refs.is_empty()));
    assert!(f.store().resolve(&id2).unwrap().layers.is_empty());
}

#[test]
fn corrupt_tag_store_is_named() {
    let (f, _) = Fixture::new();
    f.repos("{\"Repositories\": {");
    let e = err(f.store().resolve("debian"));
    assert!(e.contains("repositories.json is corrupt"), "{e}");
}

#[test]
fn modified_config_fails_its_digest_check() {
    let (f, id) = Fixture::new();
    let p = f
        .path()
        .join(format!("image/btrfs/imagedb/content/sha256/{}", &id[7..]));
    fs::write(&p, "{}").unwrap();
    let e = err(f.store().resolve("debian"));
    assert!(
        e.contains("is corrupt: its sha256 is not the image ID") && e.contains(&id[7..]),
        "{e}"
    );
    fs::remove_file(&p).unwrap();
    let e = err(f.store().resolve("debian"));
    assert!(e.contains("cannot read") && e.contains(&id[7..]), "{e}");
}

#[test]
fn missing_cache_id_is_named() {
    let (f, _) = Fixture::new();
    let meta = f.layer_meta(true);
    fs::remove_file(meta.join("cache-id")).unwrap();
    let e = err(f.store().resolve("debian"));
    assert!(e.contains("cannot read") && e.contains("cache-id"), "{e}");
    fs::remove_dir_all(&meta).unwrap();
    let e = err(f.store().resolve("debian"));
    assert!(e.contains("is missing") && e.contains("store is incomplete"), "{e}");
}

#[test]
fn traversal_in_ids_read_from_disk_never_becomes_a_path() {
    let (f, id) = Fixture::new();
    let meta = f.layer_meta(false);
    fs::write(meta.join("cache-id"), "../../../../etc").unwrap();
    let e = err(f.store().resolve("debian"));
    assert!(e.contains("cache-id is corrupt: expected 64 lowercase hex"), "{e}");

    let (f, _) = Fixture::new();
    f.repos(r#"{"Repositories":{"debian":{"debian:latest":"sha256:../../../../etc/passwd"}}}"#);
    let e = err(f.store().resolve("debian"));
    assert!(e.contains("malformed"), "{e}");

    let (f, _) = Fixture::new();
    let bad = serde_json::json!({"rootfs": {"diff_ids": ["sha256:../../x"]}}).to_string();
    let bad_id = sha256_of(bad.as_bytes());
    f.write(&format!("image/btrfs/imagedb/content/sha256/{bad_id}"), &bad);
    let e = err(f.store().resolve(&bad_id));
    assert!(e.contains("malformed diff ID"), "{e}");
    drop(id);
}

#[test]
fn diff_recorded_in_layerdb_must_match_the_config() {
    let (f, _) = Fixture::new();
    fs::write(f.layer_meta(false).join("diff"), format!("sha256:{}", hex(9))).unwrap();
    let e = err(f.store().resolve("debian"));
    assert!(e.contains("but the image config expects"), "{e}");
}

#[test]
fn a_boot_does_not_read_a_records_diff_but_still_names_a_missing_record() {
    let (f, _) = Fixture::new();
    let meta = f.layer_meta(true);
    // The record's name is its chain ID: its `diff` only repeats it. `inspect` checks it.
    fs::write(meta.join("diff"), format!("sha256:{}", hex(9))).unwrap();
    assert!(err(f.store().resolve("debian")).contains("but the image config expects"));
    let img = f.store().for_boot().resolve("debian").unwrap();
    assert_eq!(img.layers[0].cache_id, hex(0x11));
    fs::remove_file(meta.join("cache-id")).unwrap();
    let e = err(f.store().for_boot().resolve("debian"));
    assert!(e.contains("cannot read") && e.contains("cache-id"), "{e}");
    fs::remove_dir_all(&meta).unwrap();
    let e = err(f.store().for_boot().resolve("debian"));
    assert!(e.contains("is missing") && e.contains("store is incomplete"), "{e}");
}

#[test]
fn missing_layer_data_is_named() {
    let (f, _) = Fixture::new();
    fs::remove_dir(f.path().join(format!("btrfs/subvolumes/{}", hex(0x11)))).unwrap();
    let e = err(f.store().resolve("debian"));
    assert!(e.contains("has no data") && e.contains(&hex(0x11)), "{e}");
}

#[test]
fn not_a_store_says_so() {
    let t = tempfile::tempdir().unwrap();
    let e = Store::open(t.path()).unwrap_err().to_string();
    assert!(e.contains("is not an image store layerboot reads"), "{e}");
    let e = Store::open(t.path().join("nope")).unwrap_err().to_string();
    assert!(e.contains("does not exist") && e.contains("docker_path="), "{e}");
}

/// A podman store with one two-layer image named `localhost/app:1` and `docker.io/acc/x:2`.
fn podman_fixture(layers_json: &str) -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    let w = |rel: &str, data: &str| {
        let p = t.path().join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, data).unwrap();
    };
    w(
        "overlay-images/images.json",
        &format!(
            r#"[{{"id":"{}","names":["localhost/app:1","docker.io/acc/x:2"],"layer":"{}"}}]"#,
            hex(0xaa),
            hex(2)
        ),
    );
    w("overlay-layers/layers.json", layers_json);
    for l in [1u8, 2] {
        fs::create_dir_all(t.path().join(format!("overlay/{}/diff", hex(l)))).unwrap();
    }
    t
}

#[test]
fn podman_stores_resolve_short_names_and_walk_parents() {
    let t = podman_fixture(&format!(
        r#"[{{"id":"{}"}},{{"id":"{}","parent":"{}"}}]"#,
        hex(1),
        hex(2),
        hex(1)
    ));
    let s = Store::open(t.path()).unwrap();
    for r in [
        "app:1",
        "localhost/app:1",
        "acc/x:2",
        "docker.io/acc/x:2",
        &hex(0xaa)[..8],
    ] {
        let img = s.resolve(r).unwrap_or_else(|e| panic!("{r}: {e}"));
        assert_eq!(img.id, format!("sha256:{}", hex(0xaa)));
        assert_eq!(
            img.layers.iter().map(|l| l.cache_id.clone()).collect::<Vec<_>>(),
            [hex(2), hex(1)],
            "topmost first"
        );
    }
    let e = err(s.resolve("app:2"));
    assert!(
        e.contains("not in the podman store") && e.contains("closest match: localhost/app:1"),
        "{e}"
    );
}

#[test]
fn podman_incomplete_or_malformed_layers_are_refused() {
    let t = podman_fixture(&format!(
        r#"[{{"id":"{}"}},{{"id":"{}","parent":"{}","flags":{{"incomplete":true}}}}]"#,
        hex(1),
        hex(2),
        hex(1)
    ));
    let e = err(Store::open(t.path()).unwrap().resolve("app:1"));
    assert!(e.contains("is incomplete"), "{e}");
    let t = podman_fixture(&format!(r#"[{{"id":"{}","parent":"../../etc"}}]"#, hex(2)));
    let e = err(Store::open(t.path()).unwrap().resolve("app:1"));
    assert!(e.contains("malformed layer '../../etc'"), "{e}");
    let t = podman_fixture("[{");
    let e = err(Store::open(t.path()).unwrap().resolve("app:1"));
    assert!(e.contains("layers.json is corrupt"), "{e}");
}

#[test]
fn a_store_file_larger_than_any_real_one_is_a_named_error() {
    let t = tempfile::tempdir().unwrap();
    let big = t.path().join("repositories.json");
    fs::File::create(&big).unwrap().set_len(65 << 20).unwrap(); // sparse: no disk used
    let e = super::read(&big).unwrap_err().to_string();
    assert!(
        e.contains("repositories.json is larger than 64 MiB") && e.contains("fix:"),
        "{e}"
    );
    fs::write(&big, "{}").unwrap();
    assert_eq!(super::read(&big).unwrap(), b"{}");
}

#[test]
fn a_boot_reads_only_the_top_layer_of_a_whole_tree_driver_and_every_overlay_layer() {
    let (f, id) = Fixture::new();
    // The lower layer's record and subvolume gone: Docker would call the store broken,
    // but a boot mounts the top subvolume alone, which holds the whole tree.
    fs::remove_dir_all(f.layer_meta(false)).unwrap();
    fs::remove_dir(f.path().join(format!("btrfs/subvolumes/{}", hex(0x10)))).unwrap();
    assert!(err(f.store().resolve("debian")).contains("is missing"));
    let img = f.store().for_boot().resolve("debian").unwrap();
    assert_eq!((img.id.as_str(), img.layers.len()), (id.as_str(), 1));
    assert_eq!(img.layers[0].cache_id, hex(0x11));
    // The top layer is still read and checked.
    fs::remove_dir(f.path().join(format!("btrfs/subvolumes/{}", hex(0x11)))).unwrap();
    assert!(err(f.store().for_boot().resolve("debian")).contains("has no data"));

    // An overlay mounts every layer: a boot reads and checks them all.
    let t = podman_fixture(&format!(
        r#"[{{"id":"{}"}},{{"id":"{}","parent":"{}"}}]"#,
        hex(1),
        hex(2),
        hex(1)
    ));
    let s = Store::open(t.path()).unwrap().for_boot();
    assert_eq!(s.resolve("localhost/app:1").unwrap().layers.len(), 2);
    fs::remove_dir(t.path().join(format!("overlay/{}/diff", hex(1)))).unwrap();
    assert!(err(s.resolve("localhost/app:1")).contains("has no data"));
}

#[test]
fn a_fifo_or_a_device_in_the_store_is_named_and_never_waited_on() {
    for (kind, make) in [
        (
            "a FIFO",
            &(|p: &Path| nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap())
                as &dyn Fn(&Path),
        ),
        ("a device", &|p: &Path| {
            std::os::unix::fs::symlink("/dev/null", p).unwrap()
        }),
        ("a directory", &|p: &Path| fs::create_dir(p).unwrap()),
    ] {
        let (f, _) = Fixture::new();
        let cache_id = f.layer_meta(true).join("cache-id");
        fs::remove_file(&cache_id).unwrap();
        make(&cache_id);
        let store = f.store();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(err(store.resolve("debian")));
        });
        let e = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("{kind}: still reading after 10 s"));
        assert!(
            e.contains(&format!("is {kind}, not a file")) && e.contains("fix:"),
            "{kind}: {e}"
        );
    }
}
