//! The writable layer on a real btrfs filesystem (a loop device; needs root): snapshot,
//! swap-in, previous generation kept, leftovers from a cut boot discarded, nested
//! subvolumes deleted, and the image's own subvolume never touched.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use layerboot_init::store::{Driver, Image, Layer};
use layerboot_init::btrfs::is_subvolume;
use layerboot_init::writable::{apply, layer_image, prepare, rotate, rotation, LayerPaths};

struct Btrfs {
    _dir: tempfile::TempDir,
    mnt: PathBuf,
}

impl Btrfs {
    fn new() -> Btrfs {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.img");
        fs::File::create(&img).unwrap().set_len(256 << 20).unwrap();
        sh(Command::new("mkfs.btrfs").arg("-q").arg(&img));
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        sh(Command::new("mount").arg("-o").arg("loop").arg(&img).arg(&mnt));
        Btrfs { _dir: dir, mnt }
    }
}

impl Drop for Btrfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
    }
}

fn sh(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e} (tests/setup-host.sh installs btrfs-progs)"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn image(top: &Path, driver: Driver) -> Image {
    let layer = Layer {
        chain_id: String::new(),
        diff_id: String::new(),
        cache_id: "c".repeat(64),
        dir: top.to_path_buf(),
        link: None,
    };
    Image { id: format!("sha256:{}", "a".repeat(64)), config: serde_json::json!({}), driver, layers: vec![layer], refs: vec![], namespace: None }
}

#[test]
fn btrfs_layers_rotate_and_the_image_is_never_written() {
    let fs_ = Btrfs::new();
    let m = &fs_.mnt;
    let top = m.join("var/lib/docker/btrfs/subvolumes/img");
    fs::create_dir_all(top.parent().unwrap()).unwrap();
    sh(Command::new("btrfs").args(["-q", "subvolume", "create"]).arg(&top));
    fs::create_dir_all(top.join("etc")).unwrap();
    fs::write(top.join("etc/os-release"), "image\n").unwrap();
    let img = image(&top, Driver::Btrfs);
    let paths = LayerPaths::new(m, "rw");

    // First boot: no previous layer.
    prepare(&paths, &img).unwrap();
    assert!(is_subvolume(&paths.new));
    fs::write(paths.new.join("etc/hostname"), "boot1\n").unwrap(); // the top layer's copy
    rotate(&paths, 1).unwrap();
    assert!(is_subvolume(&paths.current) && !paths.new.exists() && !paths.prev(1).exists());
    assert_eq!(fs::read_to_string(paths.current.join("etc/hostname")).unwrap(), "boot1\n");

    // The booted system writes, and systemd makes a nested subvolume.
    fs::write(paths.current.join("etc/written"), "x").unwrap();
    sh(Command::new("btrfs").args(["-q", "subvolume", "create"]).arg(paths.current.join("machines")));

    // A boot cut after the snapshot left a half-made NAME.new: it is discarded, not used.
    prepare(&paths, &img).unwrap();
    fs::write(paths.new.join("half-made"), "x").unwrap();
    prepare(&paths, &img).unwrap();
    assert!(!paths.new.join("half-made").exists());
    rotate(&paths, 1).unwrap();
    assert!(!paths.current.join("etc/written").exists(), "fresh layer every boot");
    assert!(paths.prev(1).join("etc/written").exists(), "the previous layer is kept");
    assert!(is_subvolume(&paths.prev(1).join("machines")));

    // The next rotation deletes the old .prev, nested subvolume and all.
    prepare(&paths, &img).unwrap();
    rotate(&paths, 1).unwrap();
    assert!(!paths.prev(1).join("etc/written").exists() && !paths.prev(1).join("machines").exists());

    let entries: Vec<_> = fs::read_dir(top.join("etc")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(entries, vec!["os-release"], "the image's subvolume is untouched");
    assert_eq!(fs::read_to_string(top.join("etc/os-release")).unwrap(), "image\n");
}

#[test]
fn overlay_layers_are_plain_directories_rotated_the_same_way() {
    let dir = tempfile::tempdir().unwrap();
    let lower = dir.path().join("lower");
    fs::create_dir(&lower).unwrap();
    let img = image(&lower, Driver::Overlay2);
    let paths = LayerPaths::new(dir.path(), "rw");
    prepare(&paths, &img).unwrap();
    assert!(paths.new.join("upper").is_dir() && paths.new.join("work").is_dir());
    rotate(&paths, 1).unwrap();
    fs::write(paths.current.join("upper/file"), "boot1").unwrap();
    prepare(&paths, &img).unwrap();
    rotate(&paths, 1).unwrap();
    assert!(!paths.current.join("upper/file").exists());
    assert!(paths.prev(1).join("upper/file").exists());
    assert_eq!(fs::read_dir(&lower).unwrap().count(), 0);
}

#[test]
fn snapshot_of_a_non_btrfs_store_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path().join("img");
    fs::create_dir(&top).unwrap();
    let e = prepare(&LayerPaths::new(dir.path(), "rw"), &image(&top, Driver::Btrfs)).unwrap_err().to_string();
    assert!(e.contains("cannot snapshot") && e.contains("not on btrfs"), "{e}");
}

/// A btrfs store with an image subvolume whose /id file says which boot a layer is from.
fn store_with_image() -> (Btrfs, PathBuf) {
    let fs_ = Btrfs::new();
    let top = fs_.mnt.join("img");
    sh(Command::new("btrfs").args(["-q", "subvolume", "create"]).arg(&top));
    fs::write(top.join("id"), "image").unwrap();
    (fs_, top)
}

/// One boot: a fresh layer stamped `boot`, rotated in keeping `keep`.
fn boot(paths: &LayerPaths, img: &Image, boot: &str, keep: usize) {
    prepare(paths, img).unwrap();
    fs::write(paths.new.join("id"), boot).unwrap();
    rotate(paths, keep).unwrap();
}

fn id(p: &Path) -> String {
    fs::read_to_string(p.join("id")).unwrap_or_else(|_| "-".into())
}

#[test]
fn a_power_cut_at_any_step_of_the_rotation_leaves_a_bootable_layer() {
    for keep in [0, 1, 2] {
        let (fs_, top) = store_with_image();
        let img = image(&top, Driver::Btrfs);
        let paths = LayerPaths::new(&fs_.mnt, "rw");
        for b in ["b1", "b2", "b3"] {
            boot(&paths, &img, b, keep);
        }
        // Boot 4 is cut after each step in turn; then boot 5 runs to the end.
        prepare(&paths, &img).unwrap();
        fs::write(paths.new.join("id"), "b4").unwrap();
        let steps = rotation(&paths, keep);
        assert!(steps.len() >= 2, "{steps:?}");
        let saved = fs_.mnt.join("saved");
        sh(Command::new("btrfs").args(["-q", "subvolume", "snapshot"]).arg(&paths.new).arg(&saved));
        for cut in 0..=steps.len() {
            // Restore the state "boot 3 done, boot 4 prepared", apply `cut` steps.
            for e in fs::read_dir(&fs_.mnt).unwrap() {
                let p = e.unwrap().path();
                let n = p.file_name().unwrap().to_str().unwrap().to_string();
                if n.starts_with("rw") {
                    layerboot_init::btrfs::delete(&p).unwrap();
                }
            }
            for b in ["b1", "b2", "b3"] {
                boot(&paths, &img, b, keep);
            }
            sh(Command::new("btrfs").args(["-q", "subvolume", "snapshot"]).arg(&saved).arg(&paths.new));
            for step in rotation(&paths, keep).iter().take(cut) {
                apply(step).unwrap();
            }
            let now = id(&paths.current);
            assert!(now == "b3" || now == "b4", "keep {keep}, cut after {cut} steps: NAME is {now}");
            if cut == steps.len() {
                assert_eq!(now, "b4");
            }
            // The next boot cleans up whatever the cut left and succeeds.
            boot(&paths, &img, "b5", keep);
            assert_eq!(id(&paths.current), "b5", "keep {keep}, cut {cut}");
            assert!(!paths.new.exists());
            assert_eq!(id(&top), "image");
        }
    }
}

#[test]
fn keep_n_keeps_the_last_n_layers_and_records_the_image() {
    let (fs_, top) = store_with_image();
    let img = image(&top, Driver::Btrfs);
    let paths = LayerPaths::new(&fs_.mnt, "rw");
    for b in ["b1", "b2", "b3", "b4"] {
        boot(&paths, &img, b, 2);
    }
    assert_eq!((id(&paths.current), id(&paths.prev(1)), id(&paths.prev(2))), ("b4".into(), "b3".into(), "b2".into()));
    assert!(!paths.prev(3).exists());
    // Lowering keep drops the extra generations.
    boot(&paths, &img, "b5", 1);
    assert_eq!((id(&paths.prev(1)), paths.prev(2).exists()), ("b4".into(), false));
    boot(&paths, &img, "b6", 0);
    assert!(!paths.prev(1).exists());
    assert_eq!(layer_image(&paths.current).as_deref(), Some(img.id.as_str()), "mode=keep can tell which image a layer is from");
}
