//! The writable layer on a real btrfs filesystem (a loop device; needs root): snapshot,
//! swap-in, previous generation kept, leftovers from a cut boot discarded, nested
//! subvolumes deleted, and the image's own subvolume never touched.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use layerboot_init::store::{Driver, Image, Layer};
use layerboot_init::writable::{is_subvolume, prepare, rotate, LayerPaths};

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
    Image { id: format!("sha256:{}", "a".repeat(64)), config: serde_json::json!({}), driver, layers: vec![layer], refs: vec![] }
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
    rotate(&paths).unwrap();
    assert!(is_subvolume(&paths.current) && !paths.new.exists() && !paths.prev.exists());
    assert_eq!(fs::read_to_string(paths.current.join("etc/hostname")).unwrap(), "boot1\n");

    // The booted system writes, and systemd makes a nested subvolume.
    fs::write(paths.current.join("etc/written"), "x").unwrap();
    sh(Command::new("btrfs").args(["-q", "subvolume", "create"]).arg(paths.current.join("machines")));

    // A boot cut after the snapshot left a half-made NAME.new: it is discarded, not used.
    prepare(&paths, &img).unwrap();
    fs::write(paths.new.join("half-made"), "x").unwrap();
    prepare(&paths, &img).unwrap();
    assert!(!paths.new.join("half-made").exists());
    rotate(&paths).unwrap();
    assert!(!paths.current.join("etc/written").exists(), "fresh layer every boot");
    assert!(paths.prev.join("etc/written").exists(), "the previous layer is kept");
    assert!(is_subvolume(&paths.prev.join("machines")));

    // The next rotation deletes the old .prev, nested subvolume and all.
    prepare(&paths, &img).unwrap();
    rotate(&paths).unwrap();
    assert!(!paths.prev.join("etc/written").exists() && !paths.prev.join("machines").exists());

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
    rotate(&paths).unwrap();
    fs::write(paths.current.join("upper/file"), "boot1").unwrap();
    prepare(&paths, &img).unwrap();
    rotate(&paths).unwrap();
    assert!(!paths.current.join("upper/file").exists());
    assert!(paths.prev.join("upper/file").exists());
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
