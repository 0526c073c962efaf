//! `layerboot initramfs`, `kernel` and `entry` on the real fixture stores (mounted by
//! tests/run): what the archive holds, that it is reproducible, compressed modules, and
//! each error a user can hit.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use layerboot_init::kmod::{ModuleIndex, COMPILED_ALIAS};
use layerboot_init::lookup::MergedView;
use layerboot_init::settings::Config;
use layerboot_init::store::Store;

mod common;
use common::*;

fn store(driver: &str) -> String {
    let root = fixtures().join("mnt").join(driver).join("var/lib/docker");
    assert!(
        root.is_dir(),
        "{} is missing: run tests/run, which builds and mounts the fixture stores",
        root.display()
    );
    root.display().to_string()
}

struct Entry {
    mode: u32,
    rdev: (u32, u32),
    mtime: u32,
    data: Vec<u8>,
}

/// The archive's entries by path.
fn unpack(file: &Path) -> BTreeMap<String, Entry> {
    let bytes = fs::read(file).unwrap();
    // A bare archive (the default, whose modules are zstd frames, and --compress none),
    // or a gzipped one.
    let raw = if bytes.starts_with(b"070701") {
        bytes
    } else {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut out).unwrap();
        out
    };
    let mut rest: &[u8] = &raw;
    let mut out = BTreeMap::new();
    loop {
        let mut r = cpio::newc::Reader::new(rest).unwrap();
        if r.entry().is_trailer() {
            break;
        }
        let e = r.entry();
        let (name, mode, rdev, mtime) = (
            e.name().to_string(),
            e.mode(),
            (e.rdev_major(), e.rdev_minor()),
            e.mtime(),
        );
        assert_eq!((e.uid(), e.gid()), (0, 0), "{name} owned by root");
        let mut data = Vec::new();
        r.read_to_end(&mut data).unwrap();
        rest = r.finish().unwrap();
        out.insert(
            name,
            Entry {
                mode,
                rdev,
                mtime,
                data,
            },
        );
    }
    out
}

fn kver() -> String {
    let v: serde_json::Value = serde_json::from_str(&ok(layerboot(&[
        "inspect",
        "--json",
        "--store",
        &store("btrfs"),
        "layerboot/demo",
    ])))
    .unwrap();
    v["kernels"][0]["version"].as_str().unwrap().to_string()
}

#[test]
fn archive_holds_init_config_console_and_every_modules_dependencies() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("initramfs.img");
    ok(layerboot(&[
        "initramfs",
        "--store",
        &store("btrfs"),
        "--image",
        "layerboot/demo",
        "--docker-path",
        "/srv/docker/",
        "-o",
        out.to_str().unwrap(),
    ]));
    let a = unpack(&out);
    let kver = kver();

    assert_eq!(a["init"].mode, 0o100755);
    let elf = goblin::elf::Elf::parse(&a["init"].data).unwrap();
    assert!(elf.interpreter.is_none(), "/init is static");
    assert_eq!((a["dev/console"].mode, a["dev/console"].rdev), (0o020600, (5, 1)));
    assert!(String::from_utf8_lossy(&a["etc/initrd-release"].data).contains("ID=layerboot"));
    let config = Config::parse(&String::from_utf8_lossy(&a["etc/layerboot.json"].data)).unwrap();
    assert_eq!(config.kernel.as_deref(), Some(kver.as_str()));
    assert_eq!(config.defaults["docker_image"], "layerboot/demo");
    assert_eq!(
        config.defaults["docker_path"], "srv/docker",
        "the build machine's --store is never baked in"
    );

    let dir = format!("lib/modules/{kver}");
    let dep = String::from_utf8_lossy(&a[&format!("{dir}/modules.dep")].data).into_owned();
    let packed: BTreeSet<&str> = dep.lines().filter_map(|l| l.split(':').next()).collect();
    for m in [
        "btrfs",
        "ext4",
        "overlay",
        "xfs",
        "vfat",
        "virtio_blk",
        "virtio_pci",
        "virtio_scsi",
        "nvme",
        "ahci",
        "sd_mod",
        "usb-storage",
        "uas",
        "xhci-pci",
        "crc32c_generic",
        "libcrc32c",
    ] {
        assert!(
            packed.iter().any(|p| p.ends_with(&format!("/{m}.ko.zst"))),
            "{m} packed"
        );
    }
    for line in dep.lines() {
        let (module, deps) = line.split_once(':').unwrap();
        assert!(a.contains_key(&format!("{dir}/{module}")), "{module} listed and packed");
        for d in deps.split_whitespace() {
            assert!(
                a.contains_key(&format!("{dir}/{d}")),
                "{module} needs {d}, which is packed"
            );
        }
    }
    let softdep = String::from_utf8_lossy(&a[&format!("{dir}/modules.softdep")].data).into_owned();
    assert!(softdep.contains("softdep libcrc32c pre: crc32c"), "{softdep}");
    // The aliases go in compiled, and /init reads them back as modules.alias said.
    assert!(!a.contains_key(&format!("{dir}/modules.alias")));
    let index_dir = t.path().join("index");
    fs::create_dir(&index_dir).unwrap();
    for f in ["modules.dep", "modules.softdep", "modules.builtin", COMPILED_ALIAS] {
        fs::write(index_dir.join(f), &a[&format!("{dir}/{f}")].data).unwrap();
    }
    let index = ModuleIndex::load(&index_dir).unwrap();
    assert!(index.resolve("crc32c").contains(&"crc32c_generic".to_string()));
    assert_eq!(
        index.resolve("virtio:d00000002v00001AF4"),
        ["virtio_blk"],
        "coldplug needs the aliases"
    );
    // sdhci_acpi serves ACPI-described SD hosts as platform devices: no packed module
    // needs the ACPI bus read.
    assert!(packed.iter().any(|p| p.ends_with("/sdhci-acpi.ko.zst")));
    assert_eq!(config.walk_acpi_bus, Some(false));
    // Each module is its own zstd frame, which /init decompresses only if it loads it:
    // the image's own file, byte for byte.
    let img = Store::open(store("btrfs")).unwrap().resolve("layerboot/demo").unwrap();
    let view = MergedView::new(&img);
    let btrfs_zst = packed.iter().find(|p| p.ends_with("/btrfs.ko.zst")).unwrap();
    let original = view
        .lookup_follow(&format!("/lib/modules/{kver}/{}", btrfs_zst.trim_end_matches(".zst")))
        .unwrap()
        .unwrap();
    assert_eq!(
        fs::read(original.host_path).unwrap(),
        zstd::decode_all(&a[&format!("{dir}/{btrfs_zst}")].data[..]).unwrap()
    );
}

/// An ACPI bus driver (`button`, in the fixture's 6.1 kernel), a PNP driver
/// (`parport_pc`) or a platform driver with PNP aliases (`floppy`, for PNP0700) matches
/// only what coldplug reads on the ACPI bus: packing any of them has /init read it.
#[test]
fn a_driver_of_acpi_objects_has_init_read_the_acpi_bus() {
    let t = tempfile::tempdir().unwrap();
    let s = store("btrfs");
    for module in ["button", "parport_pc", "floppy"] {
        let out = t.path().join(format!("{module}.img"));
        let o = out.to_str().unwrap();
        ok(layerboot(&[
            "initramfs",
            "--store",
            &s,
            "--image",
            "layerboot/demo",
            "--module",
            module,
            "-o",
            o,
        ]));
        assert_eq!(packed_config(&out).walk_acpi_bus, Some(true), "{module}");
    }
}

#[test]
fn builds_are_byte_identical_and_mtimes_follow_source_date_epoch() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    let s = store("overlay2");
    ok(layerboot(&[
        "initramfs",
        "--store",
        &s,
        "--image",
        "layerboot/demo",
        "-o",
        a.to_str().unwrap(),
    ]));
    ok(layerboot(&[
        "initramfs",
        "--store",
        &s,
        "--image",
        "demo:latest",
        "--image-init",
        "/sbin/init",
        "-o",
        b.to_str().unwrap(),
    ]));
    let (ra, rb) = (fs::read(&a).unwrap(), fs::read(&b).unwrap());
    assert_ne!(ra, rb, "the default image differs, so the config does");
    ok(layerboot(&[
        "initramfs",
        "--store",
        &s,
        "--image",
        "demo:latest",
        "-o",
        a.to_str().unwrap(),
    ]));
    assert_eq!(fs::read(&a).unwrap(), rb, "same inputs, same bytes");
    assert!(unpack(&a).values().all(|e| e.mtime == 0));
    let out = Command::new(env!("CARGO_BIN_EXE_layerboot"))
        .args([
            "initramfs",
            "--store",
            &s,
            "--image",
            "demo:latest",
            "-o",
            a.to_str().unwrap(),
        ])
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .output()
        .unwrap();
    ok(out);
    assert!(unpack(&a).values().all(|e| e.mtime == 1_700_000_000));
}

/// Walks a merged view: path → (kind, mode, owner, size).
fn tree(view: &MergedView, dir: &str, out: &mut BTreeMap<String, String>) {
    for name in view.read_dir(dir).unwrap().unwrap() {
        let path = if dir == "/" {
            format!("/{name}")
        } else {
            format!("{dir}/{name}")
        };
        let md = view.lookup(&path).unwrap().unwrap().metadata;
        let kind = if md.is_dir() {
            "d"
        } else if md.file_type().is_symlink() {
            "l"
        } else if md.file_type().is_char_device() {
            "c"
        } else {
            "f"
        };
        let size = if md.is_file() { md.len() } else { 0 };
        out.insert(
            path.clone(),
            format!("{kind} {:o} {}:{} {size}", md.permissions().mode(), md.uid(), md.gid()),
        );
        if md.is_dir() {
            tree(view, &path, out);
        }
    }
}

#[test]
fn overlay2_merged_view_equals_the_btrfs_view_of_the_same_image() {
    let mut views = Vec::new();
    for driver in ["btrfs", "overlay2"] {
        let img = Store::open(store(driver))
            .unwrap()
            .resolve("layerboot/demo:v2")
            .unwrap();
        let mut t = BTreeMap::new();
        tree(&MergedView::new(&img), "/", &mut t);
        views.push(t);
    }
    assert!(views[0].len() > 5000);
    let only: Vec<_> = views[0]
        .keys()
        .filter(|k| !views[1].contains_key(*k))
        .chain(views[1].keys().filter(|k| !views[0].contains_key(*k)))
        .collect();
    assert!(only.is_empty(), "in one view only: {only:?}");
    for (path, v) in &views[0] {
        assert_eq!(v, &views[1][path], "{path}");
    }
}

/// The three virtio modules of the demo image, each compressed by the tool given (or
/// not, for ""), in a small root filesystem at `root`; returns the originals.
fn virtio_rootfs(root: &Path, tools: [&'static str; 3]) -> BTreeMap<&'static str, Vec<u8>> {
    let kver = kver();
    let img = Store::open(store("btrfs")).unwrap().resolve("layerboot/demo").unwrap();
    let view = MergedView::new(&img);
    let mods = [
        "kernel/drivers/block/virtio_blk.ko",
        "kernel/drivers/virtio/virtio.ko",
        "kernel/drivers/virtio/virtio_ring.ko",
    ];
    let dir = root.join(format!("usr/lib/modules/{kver}"));
    let mut originals = BTreeMap::new();
    let mut names = Vec::new();
    for (m, tool) in mods.into_iter().zip(tools) {
        let src = view
            .lookup_follow(&format!("/lib/modules/{kver}/{m}"))
            .unwrap()
            .unwrap()
            .host_path;
        let dest = dir.join(m);
        fs::create_dir_all(dest.parent().unwrap()).unwrap();
        fs::copy(&src, &dest).unwrap();
        originals.insert(m, fs::read(&src).unwrap());
        let ext = match tool {
            "" => "",
            "zstd" => ".zst",
            "gzip" => ".gz",
            _ => ".xz",
        };
        if !tool.is_empty() {
            ok(Command::new(tool).arg("-q").arg(&dest).output().unwrap());
        }
        names.push(format!("{m}{ext}"));
    }
    std::os::unix::fs::symlink("usr/lib", root.join("lib")).unwrap();
    fs::write(
        dir.join("modules.dep"),
        format!(
            "{}: {} {}\n{}:\n{}:\n",
            names[0], names[1], names[2], names[1], names[2]
        ),
    )
    .unwrap();
    originals
}

#[test]
fn compressed_modules_are_stored_decompressed_and_foreign_ones_refused() {
    let kver = kver();
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("rootfs");
    let originals = virtio_rootfs(&root, ["xz", "zstd", "gzip"]);
    let mods = originals.keys().map(|m| (*m, ())).collect::<Vec<_>>();
    let dir = root.join(format!("usr/lib/modules/{kver}"));
    let out = t.path().join("initramfs.img");
    let o = root.to_str().unwrap();
    ok(layerboot(&[
        "initramfs",
        "--rootfs",
        o,
        "--module",
        "virtio_blk",
        "-o",
        out.to_str().unwrap(),
    ]));
    // By default each module is its own zstd frame of the decompressed module, and
    // modules.dep names those frames.
    let a = unpack(&out);
    for (m, _) in &mods {
        let frame = &a[&format!("lib/modules/{kver}/{m}.zst")].data;
        assert_eq!(
            &zstd::decode_all(&frame[..]).unwrap(),
            &originals[m],
            "{m} as one zstd frame"
        );
    }
    let dep = String::from_utf8_lossy(&a[&format!("lib/modules/{kver}/modules.dep")].data).into_owned();
    assert!(
        dep.contains(
            "kernel/drivers/block/virtio_blk.ko.zst: kernel/drivers/virtio/virtio.ko.zst kernel/drivers/virtio/virtio_ring.ko.zst"
        ),
        "{dep}"
    );
    // --compress none: stored decompressed, as they are.
    ok(layerboot(&[
        "initramfs",
        "--rootfs",
        o,
        "--module",
        "virtio_blk",
        "--compress",
        "none",
        "-o",
        out.to_str().unwrap(),
    ]));
    let a = unpack(&out);
    for (m, _) in &mods {
        assert_eq!(
            a[&format!("lib/modules/{kver}/{m}")].data,
            originals[m],
            "{m} stored decompressed"
        );
    }
    let dep = String::from_utf8_lossy(&a[&format!("lib/modules/{kver}/modules.dep")].data).into_owned();
    assert!(
        dep.contains(
            "kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko"
        ),
        "{dep}"
    );

    // The same modules filed under another kernel version: their vermagic says otherwise.
    fs::rename(&dir, root.join("usr/lib/modules/9.9.9-other")).unwrap();
    let e = err(layerboot(&[
        "initramfs",
        "--rootfs",
        o,
        "--module",
        "virtio_blk",
        "-o",
        out.to_str().unwrap(),
    ]));
    assert!(
        e.contains(&format!("was built for kernel '{kver}', not 9.9.9-other")),
        "{e}"
    );
}

#[test]
fn each_build_error_names_the_problem_and_the_fix() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("x.img");
    let o = out.to_str().unwrap();
    let e = err(layerboot(&[
        "initramfs",
        "--store",
        &store("overlay2"),
        "--image",
        "layerboot/base:bookworm",
        "-o",
        o,
    ]));
    assert!(
        e.contains("image layerboot/base:bookworm has no kernel") && e.contains("linux-image-amd64"),
        "{e}"
    );
    let e = err(layerboot(&[
        "initramfs",
        "--store",
        &store("btrfs"),
        "--image",
        "layerboot/demo",
        "--image-init",
        "/sbin/openrc-init",
        "-o",
        o,
    ]));
    assert!(
        e.contains("has no /sbin/openrc-init") && e.contains("systemd-sysv"),
        "{e}"
    );
    let e = err(layerboot(&[
        "initramfs",
        "--store",
        &store("btrfs"),
        "--image",
        "layerboot/demo",
        "--module",
        "no_such_driver",
        "-o",
        o,
    ]));
    assert!(
        e.contains("module no_such_driver (--module) is not in modules.dep"),
        "{e}"
    );
    let e = err(layerboot(&[
        "initramfs",
        "--store",
        &store("btrfs"),
        "--image",
        "layerboot/demo",
        "-o",
        "/nonexistent/dir/x.img",
    ]));
    assert!(
        e.contains("cannot write /nonexistent/dir/x.img") && e.contains("writable"),
        "{e}"
    );
    let e = err(layerboot(&[
        "initramfs",
        "--store",
        &store("btrfs"),
        "--image",
        "layerboot/demo",
        "--init",
        "/bin/ls",
        "-o",
        o,
    ]));
    assert!(e.contains("is dynamically linked"), "{e}");
    let e = err(layerboot(&[
        "initramfs",
        "--store",
        &store("btrfs"),
        "--image",
        "layerboot/demo",
        "--rescue-shell",
        "/bin/bash",
        "-o",
        o,
    ]));
    assert!(
        e.contains("the rescue shell /bin/bash is dynamically linked") && e.contains("busybox"),
        "{e}"
    );
    let e = err(layerboot(&["initramfs", "--image", "layerboot/demo", "-o", o]));
    assert!(e.contains("--store DATA_ROOT --image REF, or --rootfs DIR"), "{e}");
    assert!(!out.exists(), "nothing half-written");
}

#[test]
fn kernel_is_copied_from_the_image() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("boot/layerboot");
    let path = ok(layerboot(&[
        "kernel",
        "--store",
        &store("btrfs"),
        "--image",
        "layerboot/demo",
        "-o",
        dir.to_str().unwrap(),
    ]));
    let path = PathBuf::from(path.trim());
    assert_eq!(path, dir.join(format!("vmlinuz-{}", kver())));
    let img = Store::open(store("btrfs")).unwrap().resolve("layerboot/demo").unwrap();
    let original = MergedView::new(&img)
        .lookup_follow(&format!("/boot/vmlinuz-{}", kver()))
        .unwrap()
        .unwrap()
        .host_path;
    assert_eq!(fs::read(path).unwrap(), fs::read(original).unwrap());
}

#[test]
fn entries_carry_each_formats_required_keys() {
    let base = [
        "--image",
        "layerboot/demo",
        "--image",
        "layerboot/demo:v2",
        "--kernel",
        "/lb/vmlinuz",
        "--initrd",
        "/lb/initramfs.img",
        "--root",
        "LABEL=store",
        "--rootflags",
        "subvol=rw",
        "--docker-path",
        "docker",
        "--toplayer",
        "LABEL=store",
        "--toplayer-path",
        "hosts/pc1",
    ];
    fn with<'a>(loader: &'a str, base: &[&'a str]) -> Vec<&'a str> {
        [&["entry", "--loader", loader][..], base].concat()
    }
    let args = |loader: &'static str| with(loader, &base);
    let opts = "root=LABEL=store rw rootflags=subvol=rw docker_path=docker docker_image=layerboot/demo:v2 toplayer=LABEL=store toplayer_path=hosts/pc1";

    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("loader/entries");
    let mut a = args("systemd-boot");
    a.extend(["-o", dir.to_str().unwrap()]);
    ok(layerboot(&a));
    let v2 = fs::read_to_string(dir.join("layerboot-layerboot-demo-v2.conf")).unwrap();
    assert!(dir.join("layerboot-layerboot-demo.conf").exists());
    for key in [
        "title layerboot: layerboot/demo:v2\n",
        "linux /lb/vmlinuz\n",
        "initrd /lb/initramfs.img\n",
        &format!("options {opts}\n"),
    ] {
        assert!(v2.contains(key), "{key:?} in {v2}");
    }
    let grub = ok(layerboot(&args("grub")));
    assert_eq!(grub.matches("menuentry 'layerboot: ").count(), 2);
    assert!(
        grub.contains(&format!("\tlinux /lb/vmlinuz {opts}\n\tinitrd /lb/initramfs.img\n}}")),
        "{grub}"
    );
    let mut r = args("refind");
    r.extend(["--volume", "linux"]);
    let refind = ok(layerboot(&r));
    assert!(refind.contains(&format!("menuentry \"layerboot: layerboot/demo:v2\" {{\n\tvolume linux\n\tloader /lb/vmlinuz\n\tinitrd /lb/initramfs.img\n\toptions \"{opts}\"\n}}")), "{refind}");

    let e = err(layerboot(&[
        "entry", "--loader", "lilo", "--kernel", "k", "--initrd", "i", "--root", "r", "--image", "x",
    ]));
    assert!(e.contains("use systemd-boot, grub or refind"), "{e}");
    let e = err(layerboot(&[
        "entry",
        "--loader",
        "grub",
        "--kernel",
        "k",
        "--initrd",
        "i",
        "--root",
        "r",
        "--image",
        "x",
        "--toplayer-path",
        "a b",
    ]));
    assert!(e.contains("contains spaces"), "{e}");
}

#[test]
fn compression_listing_and_host_only_do_what_they_say() {
    let t = tempfile::tempdir().unwrap();
    let s = store("btrfs");
    let build = |extra: &[&str], name: &str| {
        let out = t.path().join(name);
        let mut args = vec![
            "initramfs",
            "--store",
            &s,
            "--image",
            "layerboot/demo",
            "-o",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        (ok(layerboot(&args)), fs::read(&out).unwrap())
    };
    let (_, gz) = build(&["--compress", "gzip"], "gz");
    assert_eq!(&gz[..2], &[0x1f, 0x8b], "gzip magic");
    let (_, raw) = build(&["--compress", "none"], "raw");
    assert_eq!(&raw[..6], b"070701", "a bare newc archive");
    let (listing, zst) = build(&["--list"], "zst");
    // The default: a bare archive the kernel only copies, its modules zstd frames.
    assert_eq!(&zst[..6], b"070701", "an uncompressed newc archive");
    assert!(zst.len() <= 5 << 20, "{} bytes, over 5 MiB", zst.len());
    for want in [
        "  init\n",
        "  etc/layerboot.json\n",
        "  dev/console\n",
        "/kernel/fs/btrfs/btrfs.ko.zst\n",
    ] {
        assert!(listing.contains(want), "--list shows {want:?}");
    }
    let e = err(layerboot(&[
        "initramfs",
        "--store",
        &s,
        "--image",
        "layerboot/demo",
        "--compress",
        "lz4",
        "-o",
        "x",
    ]));
    assert!(e.contains("use zstd, gzip or none"), "{e}");

    // --host-only: a subset of the default set, keeping the filesystems this host has mounted.
    let modules = |file: &str| -> BTreeSet<String> {
        let a = unpack(&t.path().join(file));
        a.keys()
            .filter(|k| k.ends_with(".ko.zst"))
            .map(|k| k.rsplit('/').next().unwrap().to_string())
            .collect()
    };
    build(&["--host-only"], "host");
    let (host, all) = (modules("host"), modules("zst"));
    assert!(
        host.is_subset(&all) && host.len() < all.len(),
        "host-only {} of {}",
        host.len(),
        all.len()
    );
    let mounted = fs::read_to_string("/proc/mounts").unwrap();
    for fs_type in ["ext4", "btrfs"] {
        if mounted.lines().any(|l| l.split_whitespace().nth(2) == Some(fs_type)) {
            assert!(
                host.contains(&format!("{fs_type}.ko.zst")),
                "{fs_type} is mounted here: {host:?}"
            );
        }
    }
    assert!(
        host.contains("overlay.ko.zst"),
        "overlay is always needed for overlay2 stores"
    );
}

#[test]
fn entries_carry_the_namespace_and_the_writable_layers_name() {
    let out = ok(layerboot(&[
        "entry",
        "--loader",
        "systemd-boot",
        "--image",
        "x",
        "--kernel",
        "/k",
        "--initrd",
        "/i",
        "--root",
        "LABEL=s",
        "--namespace",
        "moby",
        "--rw",
        "pc1-rw",
    ]));
    assert!(out.contains("layerboot.namespace=moby layerboot.rw=pc1-rw"), "{out}");
    let e = err(layerboot(&[
        "entry", "--loader", "grub", "--image", "x", "--kernel", "/k", "--initrd", "/i", "--root", "LABEL=s", "--rw",
        "a b",
    ]));
    assert!(e.contains("spaces or quotes"), "{e}");
}

/// Everything a run that must succeed printed (notes go to standard error).
fn ok_said(out: std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out) + &stderr
}

/// The config packed into an initramfs.
fn packed_config(initramfs: &Path) -> Config {
    Config::parse(&String::from_utf8_lossy(&unpack(initramfs)["etc/layerboot.json"].data)).unwrap()
}

/// mkinitcpio-docker-hooks' users keep `/etc/docker-btrfs.json` in their images: built
/// from such a root, the initramfs boots the image it names by default, and says so;
/// `/etc/layerboot.json` there and the builder's own options win over it.
#[test]
fn a_root_with_the_old_hooks_config_boots_its_image_by_default() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("rootfs");
    virtio_rootfs(&root, ["", "", ""]);
    fs::create_dir_all(root.join("etc")).unwrap();
    // As the old hook's package shipped it, after its README's `sed`.
    fs::write(
        root.join("etc/docker-btrfs.json"),
        "{\n\t\"docker_image\": \"sample_image\",\n\t\"docker_tag\": \"latest\"\n}\n",
    )
    .unwrap();
    let out = t.path().join("initramfs.img");
    let build = |extra: &[&str]| {
        let mut args = vec![
            "initramfs",
            "--rootfs",
            root.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        layerboot(&args)
    };
    let said = ok_said(build(&[]));
    assert!(
        said.contains("default image sample_image:latest, from /etc/docker-btrfs.json")
            && said.contains("mkinitcpio-docker-hooks"),
        "{said}"
    );
    let c = packed_config(&out);
    assert_eq!(c.defaults["docker_image"], "sample_image:latest");
    assert_eq!(c.defaults["docker_path"], "var/lib/docker");

    // The root's own layerboot config names the image (and more): it wins, with a note.
    fs::write(
        root.join("etc/layerboot.json"),
        r#"{"defaults": {"docker_image": "mine:v3", "docker_path": "docker", "toplayer_path": "/boot_docker"}, "modules": ["virtio_blk"]}"#,
    )
    .unwrap();
    let said = ok_said(build(&[]));
    assert!(
        said.contains("names sample_image:latest; /etc/layerboot.json names the image"),
        "{said}"
    );
    let c = packed_config(&out);
    assert_eq!(
        [
            &c.defaults["docker_image"],
            &c.defaults["docker_path"],
            &c.defaults["toplayer_path"]
        ],
        ["mine:v3", "docker", "/boot_docker"]
    );
    assert_eq!(c.modules, ["virtio_blk"]);
    // And the command line wins over both.
    let said = ok_said(build(&["--image", "cli:1", "--docker-path", "/data/docker/"]));
    let c = packed_config(&out);
    assert_eq!(
        [&c.defaults["docker_image"], &c.defaults["docker_path"]],
        ["cli:1", "data/docker"]
    );
    assert!(
        said.contains("--image cli:1 is the default image, not the mine:v3"),
        "{said}"
    );

    // Broken files are named, with the fix; nothing is written.
    fs::remove_file(&out).unwrap();
    fs::write(root.join("etc/layerboot.json"), "{\"defaults\": 1}").unwrap();
    let e = err(build(&[]));
    assert!(
        e.contains("/etc/layerboot.json of root filesystem") && e.contains("fix:"),
        "{e}"
    );
    fs::remove_file(root.join("etc/layerboot.json")).unwrap();
    fs::write(
        root.join("etc/docker-btrfs.json"),
        "{\"docker_image\": \"x\", \"docker_tag\": \"a b\"}",
    )
    .unwrap();
    let e = err(build(&[]));
    assert!(
        e.contains("/etc/docker-btrfs.json (mkinitcpio-docker-hooks' config) names no image"),
        "{e}"
    );
    // A huge one (sparse: nothing is written) is refused before it is read.
    fs::File::create(root.join("etc/docker-btrfs.json"))
        .unwrap()
        .set_len(8 << 30)
        .unwrap();
    let e = err(build(&[]));
    assert!(
        e.contains("/etc/docker-btrfs.json of root filesystem") && e.contains("8589934592 bytes"),
        "{e}"
    );
    assert!(!out.exists());

    // So is a huge module index: it is parsed whole, into memory.
    fs::remove_file(root.join("etc/docker-btrfs.json")).unwrap();
    let alias = root.join(format!("usr/lib/modules/{}/modules.alias", kver()));
    fs::File::create(&alias).unwrap().set_len(8 << 30).unwrap();
    let e = err(build(&[]));
    assert!(
        e.contains("modules.alias of root filesystem")
            && e.contains("is 8589934592 bytes, more than a module index's")
            && e.contains("fix: run depmod"),
        "{e}"
    );
    assert!(!out.exists());
}
