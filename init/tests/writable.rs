//! The writable layer on real filesystems (btrfs and ext4 loop devices; needs root):
//! snapshot, swap-in, kept generations, what a cut boot left finished or discarded,
//! unmarked directories never touched, a full disk, a failed delete, and the image's
//! own subvolume never written. Every crash point of the rotation is checked as a model
//! in `init/src/writable/plan.rs`; here the same plans run on a disk.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use layerboot_init::btrfs::is_subvolume;
use layerboot_init::store::{Driver, Image, Layer};
use layerboot_init::writable::plan::Mark;
use layerboot_init::writable::{check_clear_of, layer_image, write_mark, Filled, Layers};
use layerboot_init::Result;

struct LoopFs {
    _dir: tempfile::TempDir,
    mnt: PathBuf,
}

impl LoopFs {
    fn new(mkfs: &str, size: u64) -> LoopFs {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.img");
        fs::File::create(&img).unwrap().set_len(size).unwrap();
        sh(Command::new(mkfs).arg("-q").arg(&img));
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        sh(Command::new("mount").arg("-o").arg("loop").arg(&img).arg(&mnt));
        LoopFs { _dir: dir, mnt }
    }

    fn btrfs() -> LoopFs {
        LoopFs::new("mkfs.btrfs", 256 << 20)
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
    }
}

fn sh(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (tests/setup-host.sh installs btrfs-progs)"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn image(top: &Path, driver: Driver) -> Image {
    let layer = Layer {
        chain_id: String::new(),
        diff_id: String::new(),
        cache_id: "c".repeat(64),
        dir: top.to_path_buf(),
    };
    Image {
        id: format!("sha256:{}", "a".repeat(64)),
        driver,
        layers: vec![layer],
        refs: vec![],
        namespace: None,
    }
}

/// A btrfs store with an image subvolume whose /id file says which boot a layer is from.
fn store_with_image() -> (LoopFs, PathBuf) {
    let fs_ = LoopFs::btrfs();
    let top = fs_.mnt.join("var/lib/docker/btrfs/subvolumes/img");
    fs::create_dir_all(top.parent().unwrap()).unwrap();
    sh(Command::new("btrfs").args(["-q", "subvolume", "create"]).arg(&top));
    fs::write(top.join("id"), "image").unwrap();
    (fs_, top)
}

/// One boot as /init runs it: recover, then a fresh layer stamped `id`, keeping `keep`.
fn boot(root: &Path, img: &Image, id: &str, keep: usize) -> Vec<String> {
    let mut layers = Layers::open(root, "rw", keep, false, img.layers.first().map(|l| l.dir.as_path())).unwrap();
    layers.recover().unwrap();
    layers
        .make_fresh_or_prune(img, &mut |l: &Path| -> Result<Filled> {
            fs::write(l.join("id"), id).map_err(|e| layerboot_init::Error::io("w", l, e))?;
            Ok(Filled::Contents)
        })
        .unwrap();
    layers.warnings
}

fn id(p: &Path) -> String {
    fs::read_to_string(p.join("id")).unwrap_or_else(|_| "-".into())
}

fn names(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("rw"))
        .collect();
    v.sort();
    v
}

#[test]
fn btrfs_layers_rotate_and_the_image_is_never_written() {
    let (fs_, top) = store_with_image();
    let m = &fs_.mnt;
    let img = image(&top, Driver::Btrfs);
    boot(m, &img, "b1", 1);
    assert!(is_subvolume(&m.join("rw")) && names(m) == ["rw"]);
    assert_eq!(
        layer_image(&m.join("rw")).as_deref(),
        Some(img.id.as_str()),
        "mode=keep can tell which image a layer is from"
    );
    // The booted system writes, and systemd makes a nested subvolume.
    fs::write(m.join("rw/written"), "x").unwrap();
    sh(Command::new("btrfs")
        .args(["-q", "subvolume", "create"])
        .arg(m.join("rw/machines")));
    boot(m, &img, "b2", 1);
    assert_eq!((id(&m.join("rw")), id(&m.join("rw.prev"))), ("b2".into(), "b1".into()));
    assert!(!m.join("rw/written").exists(), "fresh layer every boot");
    assert!(is_subvolume(&m.join("rw.prev/machines")));
    // The next rotation deletes the old .prev, nested subvolume and all.
    boot(m, &img, "b3", 1);
    assert_eq!(names(m), ["rw", "rw.prev"]);
    assert_eq!(id(&m.join("rw.prev")), "b2");
    for keep in [2, 2, 2] {
        boot(m, &img, "bk", keep);
    }
    assert_eq!(names(m), ["rw", "rw.prev", "rw.prev.2"]);
    boot(m, &img, "b0", 0);
    assert_eq!(names(m), ["rw"], "keep 0 drops every kept generation");
    assert_eq!(
        fs::read_dir(&top).unwrap().count(),
        1,
        "the image's subvolume is untouched"
    );
    assert_eq!(fs::read_to_string(top.join("id")).unwrap(), "image");
}

#[test]
fn overlay_layers_are_plain_directories_rotated_the_same_way() {
    let fs_ = LoopFs::new("mkfs.ext4", 64 << 20);
    let lower = fs_.mnt.join("lower");
    fs::create_dir(&lower).unwrap();
    let img = image(&lower, Driver::Overlay2);
    boot(&fs_.mnt, &img, "b1", 1);
    assert!(fs_.mnt.join("rw/upper").is_dir() && fs_.mnt.join("rw/work").is_dir());
    fs::write(fs_.mnt.join("rw/upper/file"), "boot1").unwrap();
    boot(&fs_.mnt, &img, "b2", 1);
    assert!(!fs_.mnt.join("rw/upper/file").exists() && fs_.mnt.join("rw.prev/upper/file").exists());
    assert_eq!(fs::read_dir(&lower).unwrap().count(), 0);
}

#[test]
fn a_directory_numbered_like_a_subvolume_on_ext4_is_a_directory() {
    let fs_ = LoopFs::new("mkfs.ext4", 64 << 20);
    let parent = fs_.mnt.join("p");
    fs::create_dir(&parent).unwrap();
    // Subdirectories take the parent's group's next free inodes, in order.
    let at_256 = (0..1000)
        .map(|i| parent.join(i.to_string()))
        .find(|d| {
            fs::create_dir(d).unwrap();
            fs::metadata(d).unwrap().ino() >= 256
        })
        .unwrap();
    assert_eq!(fs::metadata(&at_256).unwrap().ino(), 256);
    assert!(!is_subvolume(&at_256));
    let btrfs = LoopFs::btrfs();
    sh(Command::new("btrfs")
        .args(["-q", "subvolume", "create"])
        .arg(btrfs.mnt.join("sv")));
    fs::create_dir(btrfs.mnt.join("dir")).unwrap();
    assert!(is_subvolume(&btrfs.mnt.join("sv")) && !is_subvolume(&btrfs.mnt.join("dir")));
}

#[test]
fn snapshot_of_a_non_btrfs_store_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path().join("img");
    fs::create_dir(&top).unwrap();
    let mut layers = Layers::open(dir.path(), "rw", 1, false, None).unwrap();
    let e = layers
        .make_fresh_or_prune(&image(&top, Driver::Btrfs), &mut |_: &Path| Ok(Filled::Metadata))
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot snapshot") && e.contains("not on btrfs"), "{e}");
}

/// A marked layer made by hand, as a cut boot would have left it.
fn layer(root: &Path, name: &str, mark: Mark, id: &str) {
    sh(Command::new("btrfs")
        .args(["-q", "subvolume", "create"])
        .arg(root.join(name)));
    fs::write(root.join(name).join("id"), id).unwrap();
    write_mark(&root.join(name), mark).unwrap();
}

#[test]
fn a_cut_between_the_exchange_and_the_rename_loses_no_layer() {
    let (fs_, top) = store_with_image();
    let m = &fs_.mnt;
    // Boot 5 swapped its layer in, then lost power: NAME.new is boot 4's layer.
    layer(m, "rw", Mark::Complete(5), "b5");
    layer(m, "rw.new", Mark::Complete(4), "b4");
    layer(m, "rw.prev", Mark::Complete(3), "b3");
    let warnings = boot(m, &image(&top, Driver::Btrfs), "b6", 2);
    assert_eq!(
        (id(&m.join("rw")), id(&m.join("rw.prev")), id(&m.join("rw.prev.2"))),
        ("b6".into(), "b5".into(), "b4".into())
    );
    assert_eq!(names(m), ["rw", "rw.prev", "rw.prev.2"]);
    assert!(
        warnings.iter().any(|w| w.contains("finished the rotation")),
        "{warnings:?}"
    );
    // A half-made layer is discarded, and said so.
    layer(m, "rw.new", Mark::Making, "half");
    let warnings = boot(m, &image(&top, Driver::Btrfs), "b7", 2);
    assert_eq!(
        (id(&m.join("rw")), id(&m.join("rw.prev")), id(&m.join("rw.prev.2"))),
        ("b7".into(), "b6".into(), "b5".into())
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("discarded an unfinished writable layer")),
        "{warnings:?}"
    );
}

#[test]
fn unmarked_directories_are_never_touched_and_the_old_hooks_layer_is_adopted() {
    let (fs_, top) = store_with_image();
    let m = &fs_.mnt;
    boot(m, &image(&top, Driver::Btrfs), "b1", 1);
    fs::create_dir(m.join("rw.prev")).unwrap();
    fs::write(m.join("rw.prev/mine"), "user data").unwrap();
    let e = Layers::open(m, "rw", 1, true, None).err().unwrap().to_string();
    assert!(
        e.contains("rw.prev exists but layerboot did not make it") && e.contains("fix:"),
        "{e}"
    );
    assert_eq!(fs::read_to_string(m.join("rw.prev/mine")).unwrap(), "user data");
    fs::remove_dir_all(m.join("rw.prev")).unwrap();

    // mkinitcpio-docker-hooks' rw subvolume, named by rootflags=subvol=: moved aside once.
    let fs2 = LoopFs::btrfs();
    sh(Command::new("btrfs")
        .args(["-q", "subvolume", "create"])
        .arg(fs2.mnt.join("docker_rwlayer")));
    fs::write(fs2.mnt.join("docker_rwlayer/home-data"), "keep me").unwrap();
    let e = Layers::open(&fs2.mnt, "docker_rwlayer", 1, false, None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("did not make it"), "layerboot.rw= never adopts: {e}");
    let layers = Layers::open(&fs2.mnt, "docker_rwlayer", 1, true, None).unwrap();
    assert!(
        layers.warnings[0].contains("moved aside to") && layers.warnings[0].contains("never deleted"),
        "{:?}",
        layers.warnings
    );
    assert_eq!(
        fs::read_to_string(fs2.mnt.join("docker_rwlayer.pre-layerboot/home-data")).unwrap(),
        "keep me"
    );
    // A second unmarked one finds the place taken: the boot stops, nothing moves.
    fs::create_dir(fs2.mnt.join("docker_rwlayer")).unwrap();
    assert!(Layers::open(&fs2.mnt, "docker_rwlayer", 1, true, None).is_err());
    assert!(fs2.mnt.join("docker_rwlayer").is_dir() && fs2.mnt.join("docker_rwlayer.pre-layerboot/home-data").exists());
}

#[test]
fn layer_names_that_are_or_hold_the_store_or_top_layer_are_refused() {
    assert!(check_clear_of("layerboot-rw", "the image store", "var/lib/docker").is_ok());
    for (name, rel) in [
        ("var", "var/lib/docker"),
        ("@", "@/var/lib/docker"),
        ("var", "var.new/x"),
        ("rw", ""),
        ("data", "data.prev.2/docker"),
    ] {
        let e = check_clear_of(name, "the image store (docker_path=)", rel)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("the image store (docker_path=)") && e.contains("Nothing was changed") && e.contains("fix:"),
            "{name} {rel}: {e}"
        );
    }
}

#[test]
fn a_failed_delete_is_a_warning_and_is_tried_again() {
    // Overlay layers on ext4: an immutable file stops the delete; the layer is moved aside.
    let fs_ = LoopFs::new("mkfs.ext4", 64 << 20);
    let (m, lower) = (&fs_.mnt, fs_.mnt.join("lower"));
    fs::create_dir(&lower).unwrap();
    let img = image(&lower, Driver::Overlay2);
    boot(m, &img, "b1", 1);
    boot(m, &img, "b2", 1);
    fs::write(m.join("rw.prev/upper/stuck"), "x").unwrap();
    sh(Command::new("chattr").arg("+i").arg(m.join("rw.prev/upper/stuck")));
    let warnings = boot(m, &img, "b3", 1);
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("could not delete old writable layer") && w.contains("rw.trash.1")),
        "{warnings:?}"
    );
    assert_eq!((id(&m.join("rw")), id(&m.join("rw.prev"))), ("b3".into(), "b2".into()));
    sh(Command::new("chattr").arg("-i").arg(m.join("rw.trash.1/upper/stuck")));
    boot(m, &img, "b4", 1);
    assert_eq!(names(m), ["rw", "rw.prev"], "the next boot deleted it");

    // btrfs: an immutable layer can be neither deleted nor moved; boots go on around it.
    let (fs_, top) = store_with_image();
    let (m, img) = (&fs_.mnt, image(&top, Driver::Btrfs));
    boot(m, &img, "b1", 1);
    boot(m, &img, "b2", 1);
    sh(Command::new("chattr").arg("+i").arg(m.join("rw.prev")));
    for b in ["b3", "b4"] {
        let warnings = boot(m, &img, b, 1);
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("could not delete old writable layer") && w.contains("rw.prev")),
            "{warnings:?}"
        );
        assert_eq!(id(&m.join("rw")), b);
    }
    assert_eq!(id(&m.join("rw.prev")), "b1", "still there, for its owner to look at");
    sh(Command::new("chattr").arg("-i").arg(m.join("rw.prev")));
    boot(m, &img, "b5", 1);
    assert_eq!(names(m), ["rw", "rw.prev"]);
    assert_eq!(id(&m.join("rw.prev")), "b4");
}

#[test]
fn a_full_disk_prunes_old_generations_then_gives_up_with_enospc() {
    let (fs_, top) = store_with_image();
    let m = &fs_.mnt;
    let img = image(&top, Driver::Btrfs);
    let big = vec![7u8; 60 << 20];
    let fill = |size: usize| {
        move |l: &Path| -> Result<Filled> {
            fs::write(l.join("big"), vec![1u8; size])
                .map_err(|e| layerboot_init::Error::io("cannot write", l.join("big"), e))?;
            Ok(Filled::Contents)
        }
    };
    for b in ["b1", "b2"] {
        let mut layers = Layers::open(m, "rw", 2, false, None).unwrap();
        layers.recover().unwrap();
        layers.make_fresh_or_prune(&img, &mut fill(0)).unwrap();
        fs::write(m.join("rw").join(b), &big).unwrap(); // what the booted system wrote
    }
    // 120 MiB kept in NAME and NAME.prev of 256: a 100 MiB top layer fits only if .prev goes.
    let mut layers = Layers::open(m, "rw", 2, false, None).unwrap();
    layers.make_fresh_or_prune(&img, &mut fill(100 << 20)).unwrap();
    assert!(
        layers
            .warnings
            .iter()
            .any(|w| w.contains("partition is full") && w.contains("1 kept generation")),
        "{:?}",
        layers.warnings
    );
    assert!(m.join("rw.prev/b2").exists(), "the layer that booted last is kept");
    // Too big whatever is deleted: ENOSPC for the caller (it boots on tmpfs); NAME intact.
    let mut layers = Layers::open(m, "rw", 2, false, None).unwrap();
    let e = layers.make_fresh_or_prune(&img, &mut fill(300 << 20)).unwrap_err();
    assert_eq!(e.errno(), Some(nix::errno::Errno::ENOSPC), "{e}");
    assert!(m.join("rw/big").exists() && !m.join("rw.new").exists());
}

#[test]
fn a_cut_keep_mode_copy_is_done_again() {
    let (fs_, top) = store_with_image();
    let m = &fs_.mnt;
    boot(m, &image(&top, Driver::Btrfs), "b1", 1);
    let mut layers = Layers::open(m, "rw", 1, false, None).unwrap();
    assert!(!layers.current_interrupted());
    let cut = layers.refresh_current(&mut |l: &Path| -> Result<Filled> {
        fs::write(l.join("half"), "").unwrap();
        Err(layerboot_init::Error::new("power cut"))
    });
    assert!(cut.is_err());
    let mut layers = Layers::open(m, "rw", 1, false, None).unwrap();
    assert!(layers.current_interrupted(), "the next boot knows the copy was cut");
    layers
        .refresh_current(&mut |l: &Path| -> Result<Filled> {
            fs::write(l.join("half"), "whole").map_err(|e| layerboot_init::Error::io("w", l, e))?;
            Ok(Filled::Contents)
        })
        .unwrap();
    assert!(
        layers.warnings.iter().any(|w| w.contains("again")),
        "{:?}",
        layers.warnings
    );
    assert!(!Layers::open(m, "rw", 1, false, None).unwrap().current_interrupted());
    assert_eq!(fs::read_to_string(m.join("rw/half")).unwrap(), "whole");
}

#[test]
fn a_keep_mode_copy_never_empties_the_kept_layer_through_a_link() {
    let (fs_, top) = store_with_image();
    let m = &fs_.mnt;
    boot(m, &image(&top, Driver::Btrfs), "b1", 1);
    fs::create_dir_all(m.join("rw/home/user")).unwrap();
    fs::write(m.join("rw/home/user/thesis.tex"), "years of work").unwrap();
    // A top layer whose `usr/bin/zz` is the root (through its own link bin/zz → /, in a
    // merged-/usr image), with an opaque marker there.
    let host = m.join("host-top");
    fs::create_dir_all(m.join("rw/usr/bin")).unwrap();
    std::os::unix::fs::symlink("usr/bin", m.join("rw/bin")).unwrap();
    fs::create_dir_all(host.join("bin")).unwrap();
    std::os::unix::fs::symlink("/", host.join("bin/zz")).unwrap();
    fs::create_dir_all(host.join("usr/bin/zz")).unwrap();
    fs::write(host.join("usr/bin/zz/.wh..wh..opq"), "").unwrap();
    let mut layers = Layers::open(m, "rw", 1, false, None).unwrap();
    layers
        .refresh_current(&mut |l: &Path| -> Result<Filled> {
            layerboot_init::copy::copy_tree(&host, l).map(|_| Filled::Contents)
        })
        .unwrap();
    assert_eq!(
        fs::read_to_string(m.join("rw/home/user/thesis.tex")).unwrap(),
        "years of work"
    );
    assert!(!Layers::open(m, "rw", 1, false, None).unwrap().current_interrupted());
}

#[test]
fn what_a_cut_boot_made_before_marking_it_is_discarded_and_nothing_else() {
    let (fs_, top) = store_with_image();
    let m = &fs_.mnt;
    let img = image(&top, Driver::Btrfs);
    boot(m, &img, "b1", 1);
    // Cut between the snapshot and its mark: an unmarked snapshot of the image.
    sh(Command::new("btrfs")
        .args(["-q", "subvolume", "snapshot"])
        .arg(&top)
        .arg(m.join("rw.new")));
    boot(m, &img, "b2", 1);
    assert_eq!(names(m), ["rw", "rw.prev"]);
    // Overlay drivers: empty upper/ and work/, or an empty directory.
    let dir = tempfile::tempdir().unwrap();
    for d in ["rw.new/upper", "rw.new/work"] {
        fs::create_dir_all(dir.path().join(d)).unwrap();
    }
    let mut layers = Layers::open(dir.path(), "rw", 1, false, None).unwrap();
    layers.recover().unwrap();
    assert!(!dir.path().join("rw.new").exists());
    // Anything else unmarked there is someone's: refused, kept.
    sh(Command::new("btrfs")
        .args(["-q", "subvolume", "create"])
        .arg(m.join("rw.new")));
    fs::write(m.join("rw.new/notes"), "mine").unwrap();
    assert!(Layers::open(m, "rw", 1, false, Some(&top)).is_err());
    fs::create_dir_all(dir.path().join("rw.new/upper")).unwrap();
    fs::write(dir.path().join("rw.new/upper/notes"), "mine").unwrap();
    assert!(Layers::open(dir.path(), "rw", 1, false, None).is_err());
    assert!(dir.path().join("rw.new/upper/notes").exists());
}

#[test]
fn a_cut_between_the_overlay_layers_mkdirs_is_discarded_not_refused() {
    // Making NAME.new, then its upper/ and work/: on ext4 a journal commit can land
    // between any two mkdirs, and the cut leaves an unmarked NAME.new with any of them.
    for left in [&[][..], &["upper"], &["work"], &["upper", "work"]] {
        let fs_ = LoopFs::new("mkfs.ext4", 64 << 20);
        let (m, lower) = (&fs_.mnt, fs_.mnt.join("lower"));
        fs::create_dir(&lower).unwrap();
        let img = image(&lower, Driver::Overlay2);
        boot(m, &img, "b1", 1);
        fs::create_dir(m.join("rw.new")).unwrap();
        for d in left {
            fs::create_dir(m.join("rw.new").join(d)).unwrap();
        }
        let layers = Layers::open(m, "rw", 1, false, None);
        assert!(layers.is_ok(), "{left:?}: {}", layers.err().unwrap());
        let warnings = boot(m, &img, "b2", 1);
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("discarded an unfinished writable layer")),
            "{left:?}: {warnings:?}"
        );
        assert_eq!(names(m), ["rw", "rw.prev"], "{left:?}");
        assert_eq!((id(&m.join("rw")), id(&m.join("rw.prev"))), ("b2".into(), "b1".into()));
    }
}

#[test]
fn a_full_disk_prunes_other_names_kept_generations_never_their_current_layer() {
    let (fs_, top) = store_with_image();
    let m = &fs_.mnt;
    let img = image(&top, Driver::Btrfs);
    let mib = |n: usize| vec![7u8; n << 20];
    // Another deployment's layer (layerboot.mode=keep: one name per deployment): its
    // current layer is its kept state, its .prev an older generation.
    for (b, size) in [("o1", 10), ("o2", 80)] {
        let mut layers = Layers::open(m, "rw-other", 1, false, None).unwrap();
        layers.recover().unwrap();
        layers
            .make_fresh_or_prune(&img, &mut |_: &Path| Ok(Filled::Metadata))
            .unwrap();
        fs::write(m.join("rw-other").join(b), mib(size)).unwrap();
    }
    assert_eq!(names(m), ["rw-other", "rw-other.prev"]);
    // Marked like a kept generation, but no layer of that name is on the disk: it may be
    // a deployment's own layer named so. Never deleted.
    fs::rename(m.join("rw-other.prev"), m.join("rw-gone.prev")).unwrap();
    let fill = |size: usize| {
        move |l: &Path| -> Result<Filled> {
            fs::write(l.join("big"), vec![1u8; size])
                .map_err(|e| layerboot_init::Error::io("cannot write", l.join("big"), e))?;
            Ok(Filled::Contents)
        }
    };
    let mut layers = Layers::open(m, "rw-other", 1, false, None).unwrap();
    layers.recover().unwrap();
    layers
        .make_fresh_or_prune(&img, &mut |_: &Path| Ok(Filled::Metadata))
        .unwrap();
    fs::write(m.join("rw-other").join("o3"), mib(10)).unwrap();
    // Now: rw-other (10 MiB, its current state), rw-other.prev (80), rw-gone.prev (10)
    // of 256. This name keeps nothing: a 130 MiB top layer fits only if rw-other.prev goes.
    let mut layers = Layers::open(m, "rw", 1, false, None).unwrap();
    layers.make_fresh_or_prune(&img, &mut fill(130 << 20)).unwrap();
    assert!(
        layers
            .warnings
            .iter()
            .any(|w| w.contains("partition is full") && w.contains("rw-other.prev")),
        "{:?}",
        layers.warnings
    );
    assert!(!m.join("rw-other.prev").exists());
    assert!(
        m.join("rw-other/o3").exists(),
        "another deployment's current layer is its state"
    );
    assert!(
        m.join("rw-gone.prev/o1").exists(),
        "not a kept generation of a layer on the disk"
    );
    // Too big whatever is deleted: ENOSPC, and the other layers are still there.
    let mut layers = Layers::open(m, "rw", 1, false, None).unwrap();
    let e = layers.make_fresh_or_prune(&img, &mut fill(300 << 20)).unwrap_err();
    assert_eq!(e.errno(), Some(nix::errno::Errno::ENOSPC), "{e}");
    assert!(m.join("rw-other/o3").exists() && m.join("rw-gone.prev/o1").exists());
    assert!(m.join("rw/big").exists() && !m.join("rw.new").exists());
}
