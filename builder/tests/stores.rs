//! The store reader on real stores made by Debian's dockerd (tests/fixtures/build-stores.sh),
//! mounted read-only by tests/run: every ref spelling resolves, and the merged view of the
//! layers equals `docker export` of the same image, file by file.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::process::Command;

use layerboot_init::lookup::{is_opaque, is_whiteout, MergedView};
use layerboot_init::store::{Driver, Store};

mod common;
use common::*;

fn store(driver: &str) -> Store {
    open_store(driver, "var/lib/docker")
}

/// The podman (containers-storage) store on the overlay2 fixture's filesystem.
fn podman_store() -> Store {
    open_store("overlay2", "var/lib/containers/storage")
}

/// containerd's store (Docker 29's default), on its own btrfs fixture filesystem.
fn containerd_store() -> Store {
    open_store("containerd", "var/lib/containerd")
}

fn open_store(fs: &str, path: &str) -> Store {
    let root = fixtures().join("mnt").join(fs).join(path);
    assert!(
        root.is_dir(),
        "{} is missing: run tests/run, which builds and mounts the fixture stores",
        root.display()
    );
    Store::open(root).unwrap()
}

const DRIVERS: [(&str, Driver); 2] = [("btrfs", Driver::Btrfs), ("overlay2", Driver::Overlay2)];

#[test]
fn every_ref_spelling_resolves_in_both_drivers() {
    let demo = image_id("DEMO_ID");
    let v2 = image_id("DEMO_V2_ID");
    for (name, driver) in DRIVERS {
        let s = store(name);
        assert_eq!(s.driver(), driver);
        for r in [
            "layerboot/demo",
            "layerboot/demo:latest",
            "docker.io/layerboot/demo:latest",
            "index.docker.io/layerboot/demo",
            "layerboot/demo:v1",
            "localhost:5000/lb/demo:t",
            "demo",
            "demo:latest",
            "docker.io/library/demo",
            "docker.io/library/demo:latest",
            &demo,
            &demo[7..],
            &demo[7..19],
            &demo[..19],
        ] {
            let img = s.resolve(r).unwrap_or_else(|e| panic!("{name}: {r}: {e}"));
            assert_eq!(img.id, demo, "{name}: {r}");
        }
        let img = s.resolve("layerboot/demo:v2").unwrap();
        assert_eq!(img.id, v2);
        assert_eq!(img.refs, vec!["layerboot/demo:v2"]);
        assert!(img.layers.len() >= 7, "{name}: {} layers", img.layers.len());
        let e = s.resolve("layerboot/demo:v3").unwrap_err().to_string();
        assert!(
            e.contains("image 'layerboot/demo:v3' is not in the") && e.contains("closest match: layerboot/demo:v"),
            "{e}"
        );
        assert!(e.contains("  localhost:5000/lb/demo:t  "), "{e}");
    }
}

/// What a user compares: type, permissions, owner, size, link target and mtime.
fn describe(md: &fs::Metadata, link: Option<String>) -> String {
    let ft = md.file_type();
    let kind = if ft.is_dir() {
        "dir".to_string()
    } else if ft.is_symlink() {
        format!("link->{}", link.unwrap_or_default())
    } else if ft.is_char_device() || ft.is_block_device() {
        format!("dev {}", md.rdev())
    } else if ft.is_fifo() {
        "fifo".to_string()
    } else {
        format!("file {} bytes mtime {}", md.len(), md.mtime())
    };
    format!(
        "{kind} mode {:o} {}:{}",
        md.permissions().mode() & 0o7777,
        md.uid(),
        md.gid()
    )
}

fn tar_describe(h: &tar::Header, link: Option<String>, size: u64) -> String {
    let kind = match h.entry_type() {
        tar::EntryType::Directory => "dir".to_string(),
        tar::EntryType::Symlink => format!("link->{}", link.unwrap_or_default()),
        tar::EntryType::Char | tar::EntryType::Block => {
            let (ma, mi) = (
                h.device_major().unwrap().unwrap() as u64,
                h.device_minor().unwrap().unwrap() as u64,
            );
            format!("dev {}", nix::sys::stat::makedev(ma, mi))
        }
        tar::EntryType::Fifo => "fifo".to_string(),
        _ => format!("file {size} bytes mtime {}", h.mtime().unwrap()),
    };
    format!(
        "{kind} mode {:o} {}:{}",
        h.mode().unwrap() & 0o7777,
        h.uid().unwrap(),
        h.gid().unwrap()
    )
}

/// Paths that `docker export` adds from the container's init layer, not from the image.
const INIT_LAYER: [&str; 10] = [
    "/.dockerenv",
    "/etc/hostname",
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/mtab",
    "/dev/console",
    "/dev/pts",
    "/dev/shm",
    "/proc",
    "/sys",
];

fn walk(view: &MergedView, dir: &str, out: &mut BTreeSet<String>) {
    for name in view.read_dir(dir).unwrap().unwrap() {
        let path = if dir == "/" {
            format!("/{name}")
        } else {
            format!("{dir}/{name}")
        };
        let e = view
            .lookup(&path)
            .unwrap()
            .unwrap_or_else(|| panic!("{path} listed but not found"));
        out.insert(path.clone());
        if e.metadata.is_dir() {
            walk(view, &path, out);
        }
    }
}

#[test]
fn podman_store_resolves_docker_and_podman_spellings() {
    let s = podman_store();
    assert_eq!((s.engine().name, s.driver()), ("podman", Driver::Overlay2));
    let demo = image_id("DEMO_ID");
    // `podman load` of a docker-archive files short names under localhost/.
    for r in [
        "layerboot/demo",
        "localhost/layerboot/demo:latest",
        "layerboot/demo:v1",
        "localhost:5000/lb/demo:t",
        "demo",
        "localhost/demo",
        &demo,
        &demo[7..19],
    ] {
        assert_eq!(s.resolve(r).unwrap_or_else(|e| panic!("{r}: {e}")).id, demo, "{r}");
    }
    // A local name: podman keeps it as localhost/lb/podman:1, and `lb/podman:1` finds it.
    let v2 = image_id("DEMO_V2_ID");
    for r in ["lb/podman:1", "localhost/lb/podman:1", "layerboot/demo:v2"] {
        assert_eq!(s.resolve(r).unwrap_or_else(|e| panic!("{r}: {e}")).id, v2, "{r}");
    }
    let e = s.resolve("lb/podman:2").unwrap_err().to_string();
    assert!(
        e.contains("not in the podman store") && e.contains("closest match: localhost/lb/podman:1"),
        "{e}"
    );
    let img = s.resolve("layerboot/demo").unwrap();
    assert_eq!(
        img.layers.len(),
        store("overlay2").resolve("layerboot/demo").unwrap().layers.len()
    );
    assert!(img
        .layers
        .iter()
        .all(|l| l.dir.starts_with(s.root().join("overlay")) && l.short_link().is_some()));
}

#[test]
fn containerd_store_resolves_every_spelling_in_its_namespaces() {
    let s = containerd_store();
    assert_eq!(s.engine().name, "containerd");
    let docker = store("overlay2");
    let chains = |img: &layerboot_init::store::Image| img.layers.iter().map(|l| l.chain_id.clone()).collect::<Vec<_>>();
    let demo = s.resolve("layerboot/demo").unwrap();
    // Its ID is the manifest digest, as `docker images` shows it in containerd mode.
    let id = demo.id.clone();
    let digest_ref = format!("layerboot/demo@{id}");
    for r in [
        "layerboot/demo",
        "layerboot/demo:latest",
        "docker.io/layerboot/demo:latest",
        "index.docker.io/layerboot/demo",
        "layerboot/demo:v1",
        "localhost:5000/lb/demo:t",
        "demo",
        "docker.io/library/demo:latest",
        &digest_ref,
        &id,
        &id[7..19],
    ] {
        let img = s.resolve(r).unwrap_or_else(|e| panic!("{r}: {e}"));
        assert_eq!(
            (img.id.as_str(), img.namespace.as_deref(), img.driver),
            (id.as_str(), Some("moby"), Driver::Overlay2),
            "{r}"
        );
    }
    // The same layers, by chain ID, as Docker's own store of the same image; and where the
    // overlayfs snapshotter keeps them.
    assert_eq!(chains(&demo), chains(&docker.resolve("layerboot/demo").unwrap()));
    let home = s.root().join("io.containerd.snapshotter.v1.overlayfs/snapshots");
    assert!(
        demo.layers
            .iter()
            .all(|l| l.dir.starts_with(&home) && l.dir.ends_with("fs") && l.dir.is_dir()),
        "{:?}",
        demo.layers
    );

    // moby comes before default; default's copy is unpacked with the btrfs snapshotter.
    let v2 = s.resolve("layerboot/demo:v2").unwrap();
    assert_eq!((v2.namespace.as_deref(), v2.driver), (Some("moby"), Driver::Overlay2));
    let btrfs = s.resolve("lb/ctr:btrfs").unwrap();
    assert_eq!(
        (btrfs.namespace.as_deref(), btrfs.driver),
        (Some("default"), Driver::Btrfs)
    );
    assert_eq!(chains(&btrfs), chains(&v2));
    assert!(btrfs.layers[0]
        .dir
        .starts_with(s.root().join("io.containerd.snapshotter.v1.btrfs/snapshots")));
    let default_v2 = s
        .clone()
        .with_namespace(Some("default".into()))
        .resolve("layerboot/demo:v2")
        .unwrap();
    assert_eq!(default_v2.driver, Driver::Btrfs);

    // The same name in two namespaces that are neither moby nor default: ambiguous.
    let e = s.resolve("lb/twice:1").unwrap_err().to_string();
    assert!(
        e.contains("in several containerd namespaces")
            && e.contains("a (docker.io/lb/twice:1)")
            && e.contains("layerboot.namespace="),
        "{e}"
    );
    // Named, but never unpacked: the error says how to unpack it.
    let e = s
        .clone()
        .with_namespace(Some("a".into()))
        .resolve("lb/twice:1")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("is not unpacked") && e.contains("ctr -n a images unpack"),
        "{e}"
    );
    let e = s.resolve("layerboot/demo:v3").unwrap_err().to_string();
    assert!(
        e.contains("not in the containerd store")
            && e.contains("closest match: docker.io/layerboot/demo:v")
            && e.contains("(namespace moby)"),
        "{e}"
    );
    let e = s
        .clone()
        .with_namespace(Some("nope".into()))
        .resolve("layerboot/demo")
        .unwrap_err()
        .to_string();
    assert!(e.contains("namespace nope") && e.contains("holds no images"), "{e}");

    // Docker 29 with the containerd it runs itself: <data-root>/containerd/daemon.
    let data_root = tempfile::tempdir().unwrap();
    fs::create_dir(data_root.path().join("containerd")).unwrap();
    std::os::unix::fs::symlink(s.root(), data_root.path().join("containerd/daemon")).unwrap();
    let managed = Store::open(data_root.path()).unwrap();
    assert_eq!(managed.engine().name, "containerd");
    assert_eq!(managed.resolve("demo").unwrap().id, id);
}

/// Compares `view` with `docker export` of the same image (`export-<name>.tar`) file by
/// file: type, mode, owner, size, link target, mtime; nothing missing, nothing extra.
/// Returns how many entries were compared.
fn assert_matches_export(view: &MergedView, export: &str, label: &str) -> usize {
    let file = fs::File::open(fixtures().join(format!("export-{export}.tar"))).unwrap();
    let mut archive = tar::Archive::new(file);
    let mut in_tar = BTreeSet::new();
    let mut hardlinks: Vec<(String, String)> = Vec::new();
    let mut checked = 0;
    for entry in archive.entries().unwrap() {
        let entry = entry.unwrap();
        let h = entry.header();
        let path = format!("/{}", entry.path().unwrap().display())
            .trim_end_matches('/')
            .to_string();
        let path = if path.is_empty() { "/".to_string() } else { path };
        in_tar.insert(path.clone());
        if INIT_LAYER.contains(&path.as_str()) || INIT_LAYER.iter().any(|p| path.starts_with(&format!("{p}/"))) {
            continue;
        }
        // The init layer also makes /dev for an image that has none (one FROM scratch).
        if path == "/dev" && view.lookup("/dev").unwrap().is_none() {
            continue;
        }
        let link = entry.link_name().unwrap().map(|l| l.display().to_string());
        if h.entry_type() == tar::EntryType::Link {
            hardlinks.push((path, format!("/{}", link.unwrap())));
            continue;
        }
        let e = view
            .lookup(&path)
            .unwrap()
            .unwrap_or_else(|| panic!("{label}: {path} is in the export but not in the merged view"));
        let target = fs::read_link(&e.host_path).ok().map(|l| l.display().to_string());
        let want = tar_describe(h, link, entry.size());
        let mut got = describe(&e.metadata, target);
        if e.metadata.is_dir() {
            // Directory mtimes differ between engines' copies; compare the rest.
            got = got.replace(&format!("mtime {}", e.metadata.mtime()), "");
        }
        assert_eq!(got, want, "{label}: {path}");
        checked += 1;
    }
    for (path, target) in hardlinks {
        let a = view.lookup(&path).unwrap().unwrap().metadata;
        let b = view.lookup(&target).unwrap().unwrap().metadata;
        assert!(
            a.is_file() && a.len() == b.len(),
            "{label}: hard link {path} -> {target}"
        );
    }
    let mut in_view = BTreeSet::new();
    walk(view, "/", &mut in_view);
    let extra: Vec<_> = in_view
        .difference(&in_tar)
        .filter(|p| !INIT_LAYER.contains(&p.as_str()))
        .collect();
    assert!(
        extra.is_empty(),
        "{label}: in the merged view but not in the export: {extra:?}"
    );
    checked
}

#[test]
fn merged_view_equals_docker_export() {
    for name in [
        "btrfs",
        "overlay2",
        "podman",
        "podman-btrfs",
        "containerd",
        "containerd-btrfs",
    ] {
        let s = match name {
            "podman" => podman_store(),
            "podman-btrfs" => open_store("btrfs", "var/lib/containers/storage"),
            "containerd" => containerd_store(),
            "containerd-btrfs" => containerd_store().with_namespace(Some("default".into())),
            _ => store(name),
        };
        for tag in ["latest", "v2"] {
            let img = s.resolve(&format!("layerboot/demo:{tag}")).unwrap();
            let view = MergedView::new(&img);
            let checked = assert_matches_export(&view, tag, &format!("{name} {tag}"));
            assert!(checked > 5000, "{name} {tag}: only {checked} files compared");

            // The deletions the fixture made are really honoured, not just absent everywhere.
            for gone in ["/etc/issue.net", "/opt/layerboot/old", "/opt/layerboot/keep"] {
                assert!(view.lookup(gone).unwrap().is_none(), "{name}: {gone} should be deleted");
            }
            let tag_file = view.lookup("/etc/layerboot-tag").unwrap().unwrap();
            assert_eq!(fs::read_to_string(tag_file.host_path).unwrap().trim(), tag);
            assert!(view
                .lookup("/dev/full")
                .unwrap()
                .unwrap()
                .metadata
                .file_type()
                .is_char_device());
        }
    }
}

/// A boot reads the top layer alone of an image whose top layer is the whole tree, and
/// every layer of an overlay image, judged by the image's own driver: one containerd
/// store keeps its images with several snapshotters.
#[test]
fn a_boot_reads_the_top_of_a_whole_tree_image_and_every_overlay_layer() {
    let cases = [
        (store("btrfs"), "layerboot/demo:v2", Driver::Btrfs),
        (store("overlay2"), "layerboot/demo:v2", Driver::Overlay2),
        (
            open_store("btrfs", "var/lib/containers/storage"),
            "layerboot/demo:v2",
            Driver::Btrfs,
        ),
        (containerd_store(), "layerboot/demo:v2", Driver::Overlay2),
        (containerd_store(), "lb/ctr:btrfs", Driver::Btrfs),
        (containerd_store(), "layerboot/tiny:1", Driver::Vfs),
    ];
    for (s, r, driver) in cases {
        let (all, boot) = (s.resolve(r).unwrap(), s.clone().for_boot().resolve(r).unwrap());
        let label = format!("{} {r}", s.engine().name);
        assert!(all.layers.len() > 1 && all.driver == driver, "{label}");
        let want = if driver.top_is_whole_tree() {
            1
        } else {
            all.layers.len()
        };
        assert_eq!(boot.layers.len(), want, "{label}");
        assert_eq!(boot.layers[0].dir, all.layers[0].dir, "{label}");
    }
}

/// Docker's and podman's vfs drivers and containerd's native snapshotter keep every layer
/// as a full copy: the top one alone is the image, and lower ones still hold what later
/// layers deleted.
#[test]
fn full_copy_drivers_show_the_top_layer_alone() {
    let stores = [
        ("docker vfs", open_store("overlay2", "var/lib/docker-vfs"), "docker"),
        ("podman vfs", open_store("overlay2", "var/lib/containers/vfs"), "podman"),
        ("containerd native", containerd_store(), "containerd"),
    ];
    for (label, s, engine) in stores {
        assert_eq!(s.engine().name, engine, "{label}");
        let img = s.resolve("layerboot/tiny:1").unwrap_or_else(|e| panic!("{label}: {e}"));
        assert_eq!(img.driver, Driver::Vfs, "{label}");
        assert!(img.layers.len() >= 4, "{label}: {} layers", img.layers.len());
        assert!(
            img.layers.last().unwrap().dir.join("etc/gone").is_file(),
            "{label}: the base layer is a full copy"
        );
        let view = MergedView::new(&img);
        assert!(assert_matches_export(&view, "tiny", label) >= 6, "{label}");
        for gone in ["/etc/gone", "/dir/old"] {
            assert!(
                view.lookup(gone).unwrap().is_none(),
                "{label}: {gone} should be deleted"
            );
        }
        assert_eq!(
            fs::read_to_string(view.lookup("/dir/new").unwrap().unwrap().host_path).unwrap(),
            "new\n"
        );
    }
    let s = open_store("btrfs", "var/lib/containers/storage");
    assert_eq!((s.engine().name, s.driver()), ("podman", Driver::Btrfs));
    let img = s.resolve("layerboot/demo:v2").unwrap();
    assert!(
        img.layers
            .iter()
            .all(|l| l.dir.starts_with(s.root().join("btrfs/subvolumes"))),
        "{:?}",
        img.layers
    );
}

#[test]
fn overlay2_fixture_really_has_whiteouts_and_opaque_dirs() {
    let img = store("overlay2").resolve("layerboot/demo").unwrap();
    let whiteout = img
        .layers
        .iter()
        .any(|l| fs::symlink_metadata(l.dir.join("etc/issue.net")).is_ok_and(|m| is_whiteout(&m)));
    let opaque = img
        .layers
        .iter()
        .any(|l| l.dir.join("opt/layerboot").is_dir() && is_opaque(&l.dir.join("opt/layerboot")));
    let base_has_it = img.layers.last().unwrap().dir.join("etc/issue.net").is_file();
    assert!(
        whiteout && opaque && base_has_it,
        "whiteout {whiteout}, opaque {opaque}, base file {base_has_it}"
    );
    assert!(img.layers.iter().all(|l| l.short_link().is_some_and(|k| k.len() == 26)));
}

fn layerboot(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_layerboot"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn inspect_lists_images_with_kernels_and_fails_clearly_on_unknown_refs() {
    for (name, _) in DRIVERS {
        let root = store(name).root().display().to_string();
        let out = layerboot(&["inspect", "--store", &root]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains(&format!("{name} driver")), "{text}");
        let demo = text
            .lines()
            .find(|l| l.contains("layerboot/demo:latest"))
            .expect("demo listed");
        assert!(
            demo.contains(&image_id("DEMO_ID")[7..19]) && demo.contains("-amd64"),
            "{demo}"
        );

        let out = layerboot(&["inspect", "--store", &root, "--json", "demo"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["id"], image_id("DEMO_ID"));
        let k = &v["kernels"][0];
        assert!(
            k["version"].as_str().unwrap().ends_with("-amd64") && k["modules"] == true,
            "{k}"
        );
        assert!(k["vmlinuz"].as_str().unwrap().starts_with("/boot/vmlinuz-"), "{k}");

        let out = layerboot(&["inspect", "--store", &root, "nope:1"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("image 'nope:1' is not in the") && err.contains("layerboot/demo:v2"),
            "{err}"
        );
    }
    let root = containerd_store().root().display().to_string();
    let out = layerboot(&["inspect", "--store", &root]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("(containerd, overlay2 driver)"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("moby: docker.io/layerboot/demo:latest") && l.contains("-amd64")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("a: docker.io/lb/twice:1") && l.contains("not unpacked")),
        "{text}"
    );
    let out = layerboot(&[
        "inspect",
        "--store",
        &root,
        "--namespace",
        "default",
        "--json",
        "layerboot/demo:v2",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["namespace"].as_str(), v["driver"].as_str(), v["engine"].as_str()),
        (Some("default"), Some("btrfs"), Some("containerd"))
    );
    let out = layerboot(&["inspect", "--store", "/nonexistent"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("does not exist"));
}

#[test]
fn version_is_printed() {
    let out = layerboot(&["--version"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("layerboot {}", env!("CARGO_PKG_VERSION"))
    );
}
