//! Boots real machines from the real fixture stores in QEMU (TCG) and checks what the
//! guest reports on its serial console: the image's own systemd, kernel and files, the
//! writable root of the store's driver, the top layer, a fresh layer at every boot, and a
//! readable failure for an unknown image. Afterwards the store's image layers are checked,
//! from the host, to be exactly as the engine left them.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use vm_tests::*;

/// Every file under `dir`, by its path relative to `dir`, with its metadata.
fn files(dir: &Path) -> Vec<(String, fs::Metadata)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let md = fs::symlink_metadata(&p).unwrap();
            if md.is_dir() {
                todo.push(p.clone());
            }
            out.push((p.strip_prefix(dir).unwrap().display().to_string(), md));
        }
    }
    out
}

/// Every file under `dir`: type and mode, owner, size, mtime. Enough to see any write.
fn tree(dir: &Path) -> BTreeMap<String, (u32, u32, u64, i64, i64)> {
    files(dir)
        .into_iter()
        .map(|(rel, md)| (rel, (md.mode(), md.uid(), md.size(), md.mtime(), md.mtime_nsec())))
        .collect()
}

/// The layer directories of `reference` in the store at `data_root`, with the image's
/// driver, as `layerboot inspect` reports them.
fn layer_dirs(data_root: &Path, args: &[&str], reference: &str) -> Vec<(String, String)> {
    let out = run(layerboot()
        .args(["inspect", "--json", "--store"])
        .arg(data_root)
        .args(args)
        .arg(reference));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let driver = v["driver"].as_str().unwrap().to_string();
    v["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["dir"].as_str().unwrap().to_string(), driver.clone()))
        .collect()
}

/// Every file's access time under `dir`: reading must not write them.
fn access_times(dir: &Path) -> BTreeMap<String, (i64, i64)> {
    files(dir)
        .into_iter()
        .map(|(rel, md)| (rel, (md.atime(), md.atime_nsec())))
        .collect()
}

/// The image layers in the booted copy are file-for-file those of the pristine fixture,
/// and the image metadata /init read (tags, configs, layer records) kept even its access
/// times: the store is read, never written.
fn assert_store_untouched(driver: &str, disk: &Path, dir: &Path) {
    assert_layers_untouched(
        driver,
        "var/lib/docker",
        &[],
        disk,
        dir,
        &["layerboot/demo:latest", "layerboot/demo:v2"],
    );
    let _m = LoopMount::new(disk, &dir.join("check"), true);
    let meta = Path::new("var/lib/docker/image").join(driver);
    let (pristine, booted) = (
        access_times(&fixtures().join("mnt").join(driver).join(&meta)),
        access_times(&dir.join("check").join(&meta)),
    );
    let touched: Vec<&String> = pristine
        .iter()
        .filter(|(k, v)| booted.get(*k) != Some(v))
        .map(|(k, _)| k)
        .collect();
    assert!(
        touched.is_empty(),
        "{driver}: booting wrote the access times of {touched:?}"
    );
}

/// Each of `refs` (in the store at `data_root` of fixture filesystem `fixture`, looked up
/// with `args`) has the same layers, file for file, in the booted copy `disk` as in the
/// pristine fixture.
fn assert_layers_untouched(fixture: &str, data_root: &str, args: &[&str], disk: &Path, dir: &Path, refs: &[&str]) {
    let pristine = fixtures().join("mnt").join(fixture).join(data_root);
    let _m = LoopMount::new(disk, &dir.join("check"), true);
    let booted = dir.join("check").join(data_root);
    for r in refs {
        let (a, b) = (layer_dirs(&pristine, args, r), layer_dirs(&booted, args, r));
        assert_eq!(a.len(), b.len());
        // btrfs: the top subvolume is the whole tree; overlay: every layer's diff.
        let n = if a[0].1 == "btrfs" { 1 } else { a.len() };
        for ((x, _), (y, _)) in a.iter().zip(&b).take(n) {
            assert!(
                tree(Path::new(x)) == tree(Path::new(y)),
                "{fixture}: layer {y} was modified by booting"
            );
        }
    }
}

#[test]
fn log_pids_reads_the_pid_of_each_kernel_log_line() {
    let console = "[ 1.0] layerboot_init::boot::timeline[285]: layerboot: x\n[ 2.0] layerboot_init::writable[1]: fresh\nlayerboot_init::x";
    assert_eq!(log_pids(console, "layerboot_init::"), [285, 1]);
}

fn no_panic(console: &str) {
    assert!(
        !console.contains("Kernel panic"),
        "kernel panic:\n{}",
        tail(console, 40)
    );
}

#[test]
fn btrfs_store_boots_the_image_with_a_fresh_snapshot_each_time() {
    let dir = test_dir("btrfs");
    // The top layer on the store partition itself, as mkinitcpio-docker-hooks users have it.
    let disk = store_disk_with_toplayer("btrfs", &dir, "vm-btrfs");
    // The hook's spelling: rootflags=subvol= names the writable layer.
    let base = "root=LABEL=lb-btrfs rootflags=subvol=lb-rw toplayer=LABEL=lb-btrfs toplayer_path=/toplayer layerboot.rescue_timeout=0";
    let ids = fs::read_to_string(fixtures().join("images.env")).unwrap();

    let console = Qemu::new(vec![disk.clone()], base, dir.join("boot1.log")).run();
    no_panic(&console);
    let r = report(&console);
    common_checks(&r, "vm-btrfs", "latest");
    assert!(
        r["root"].starts_with("btrfs ") && r["root"].contains("subvol=/lb-rw"),
        "root: {}",
        r["root"]
    );
    let demo_id = ids.lines().find_map(|l| l.strip_prefix("DEMO_ID=")).unwrap();
    assert!(r["booted"].contains(demo_id), "{}", r["booted"]);

    // Boot 2 picks the other tag from the command line, with the same initramfs, and
    // per-mount flags in rootflags= as initramfs-tools users write them (btrfs refuses
    // them as filesystem options: they must become mount flags).
    let flagged = base.replace("rootflags=subvol=lb-rw", "rootflags=subvol=lb-rw,noatime,nodev");
    let cmdline = format!("{flagged} docker_image=layerboot/demo:v2");
    let console = Qemu::new(vec![disk.clone()], cmdline, dir.join("boot2.log")).run();
    no_panic(&console);
    let r = report(&console);
    common_checks(&r, "vm-btrfs", "v2");
    let options: Vec<&str> = r["root"].split([' ', ',']).collect();
    assert!(
        options.contains(&"noatime") && options.contains(&"nodev") && options.contains(&"subvol=/lb-rw"),
        "rootflags=…,noatime,nodev on the root: {}",
        r["root"]
    );

    {
        let _m = LoopMount::new(&disk, &dir.join("mnt"), true);
        let m = dir.join("mnt");
        assert_eq!(fs::read_to_string(m.join("lb-rw/etc/layerboot-tag")).unwrap(), "v2\n");
        assert!(
            m.join("lb-rw/var/tmp/layerboot-marker").exists(),
            "boot 2 wrote into its layer"
        );
        assert_eq!(
            fs::read_to_string(m.join("lb-rw.prev/etc/layerboot-tag")).unwrap(),
            "latest\n",
            "boot 1's layer kept as .prev"
        );
        assert!(!m.join("lb-rw.new").exists());
    }
    assert_store_untouched("btrfs", &disk, &dir);
}

/// A disk of its own (ext4, label lb-top) holding the top layer `top_dir`.
fn toplayer_disk(top_dir: &Path, dir: &Path) -> std::path::PathBuf {
    let top = dir.join("toplayer.img");
    fs::File::create(&top).unwrap().set_len(32 << 20).unwrap();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-L", "lb-top", "-d"])
        .arg(top_dir)
        .arg(&top));
    top
}

#[test]
fn overlay2_store_boots_the_image_as_an_overlay_with_a_fresh_upper_each_time() {
    let dir = test_dir("overlay2");
    let disk = copy_store_disk("overlay2", &dir);
    // The top layer on a disk of its own.
    let top_dir = dir.join("toplayer");
    write_toplayer(&top_dir, "vm-overlay");
    let top = toplayer_disk(&top_dir, &dir);
    let cmdline = "root=LABEL=lb-overlay toplayer=LABEL=lb-top layerboot.rescue_timeout=0";

    for (i, log) in ["boot1.log", "boot2.log"].iter().enumerate() {
        let console = Qemu::new(vec![disk.clone(), top.clone()], cmdline, dir.join(log)).run();
        no_panic(&console);
        let r = report(&console);
        common_checks(&r, "vm-overlay", "latest");
        assert!(
            r["root"].starts_with("overlay ") && r["root"].contains("upperdir=/run/layerboot/store/layerboot-rw/upper"),
            "boot {}: root: {}",
            i + 1,
            r["root"]
        );
    }
    {
        let _m = LoopMount::new(&disk, &dir.join("mnt"), true);
        let m = dir.join("mnt");
        assert!(m.join("layerboot-rw/upper/var/tmp/layerboot-marker").exists());
        assert!(m.join("layerboot-rw.prev/upper/var/tmp/layerboot-marker").exists());
        assert!(!m.join("layerboot-rw.new").exists());
    }
    assert_store_untouched("overlay2", &disk, &dir);
}

#[test]
fn unknown_image_is_named_on_the_console_and_the_machine_reboots() {
    let dir = test_dir("unknown-image");
    let disk = fixtures().join("btrfs.img"); // booted with -snapshot: nothing is written to it
    let cmdline = "root=LABEL=lb-btrfs docker_image=layerboot/nope:1 layerboot.rescue_timeout=0";
    let console = Qemu {
        snapshot: true,
        ..Qemu::new(vec![disk], cmdline, dir.join("boot.log"))
    }
    .run();
    no_panic(&console);
    for want in [
        "layerboot: BOOT FAILED",
        "image 'layerboot/nope:1' is not in the btrfs store",
        "closest match: layerboot/demo:",
        "layerboot/demo:v2",
        "fix:",
    ] {
        assert!(console.contains(want), "missing {want:?} in:\n{}", tail(&console, 30));
    }
}

#[test]
fn missing_root_device_lists_the_devices_seen() {
    let dir = test_dir("no-root");
    let disk = fixtures().join("overlay2.img");
    let cmdline = "root=LABEL=nope layerboot.timeout=3 layerboot.rescue_timeout=0";
    let console = Qemu {
        snapshot: true,
        ..Qemu::new(vec![disk], cmdline, dir.join("boot.log"))
    }
    .run();
    no_panic(&console);
    for want in [
        "layerboot: BOOT FAILED",
        "root device LABEL=nope did not appear within 3 s",
        "/dev/vda type=ext4 label=lb-overlay uuid=",
        "fix: correct root=",
    ] {
        assert!(console.contains(want), "missing {want:?} in:\n{}", tail(&console, 30));
    }
}

#[test]
fn keep_mode_keeps_files_across_boots_and_tmpfs_upper_writes_nothing() {
    let dir = test_dir("keep-and-tmpfs");
    let disk = store_disk_with_toplayer("btrfs", &dir, "vm-keep");
    let base = "root=LABEL=lb-btrfs toplayer=LABEL=lb-btrfs toplayer_path=/toplayer layerboot.rescue_timeout=0";
    let qemu = |extra: &str, log: &str| {
        let console = Qemu::new(vec![disk.clone()], format!("{base} {extra}"), dir.join(log)).run();
        no_panic(&console);
        report(&console)
    };
    let r = qemu("layerboot.mode=keep", "boot1.log");
    assert_eq!(r["marker"], "none", "no layer yet: a fresh one");
    let r = qemu("layerboot.mode=keep", "boot2.log");
    assert_eq!(r["marker"], "written in an earlier boot", "mode=keep reuses the layer");
    assert_eq!(r["hostname"], "vm-keep");
    let r = qemu("layerboot.upper=tmpfs", "boot3.log");
    assert!(
        r["root"].starts_with("overlay ") && r["root"].contains("upperdir=/run/layerboot/upper/upper"),
        "{}",
        r["root"]
    );
    assert_eq!(
        r["marker"], "none",
        "tmpfs upper over the image, not over the kept layer"
    );
    assert_eq!(r["hostname"], "vm-keep", "top layer copied onto the tmpfs root");

    let _m = LoopMount::new(&disk, &dir.join("mnt"), true);
    let m = dir.join("mnt");
    assert_eq!(
        fs::read_to_string(m.join("layerboot-rw/var/tmp/layerboot-marker")).unwrap(),
        "written in an earlier boot\n"
    );
    assert!(
        !m.join("layerboot-rw.prev").exists() && !m.join("layerboot-rw.new").exists(),
        "keep mode and tmpfs made no new layer"
    );
}

#[test]
fn enter_on_the_console_reboots_a_failed_boot_at_once() {
    let dir = test_dir("enter-reboots");
    let cmdline = "root=LABEL=lb-btrfs docker_image=layerboot/nope:1 layerboot.rescue_timeout=3000";
    let console = Qemu {
        timeout: Duration::from_secs(240),
        snapshot: true,
        answer: Some(("Press Enter to reboot now", "\r")),
        ..Qemu::new(vec![fixtures().join("btrfs.img")], cmdline, dir.join("boot.log"))
    }
    .run();
    no_panic(&console);
    assert!(
        console.contains("the machine reboots in 3000 s") && console.contains("reboot: Restarting system"),
        "{}",
        tail(&console, 20)
    );
}

#[test]
fn a_store_on_a_two_device_btrfs_waits_for_both_and_boots() {
    let dir = test_dir("two-device-btrfs");
    let disk = copy_store_disk("btrfs", &dir);
    let second = dir.join("second.img");
    fs::File::create(&second).unwrap().set_len(2 << 30).unwrap();
    // A new fsid: the pristine store, same fsid, is mounted on this host, and the kernel
    // will not add devices to such a clone.
    run(Command::new("btrfstune").args(["-f", "-m"]).arg(&disk));
    {
        let m = LoopMount::new(&disk, &dir.join("mnt"), false);
        write_toplayer(&m.0.join("toplayer"), "vm-two-devices");
        let lo = run(Command::new("losetup").args(["--find", "--show"]).arg(&second))
            .trim()
            .to_string();
        let added = Command::new("btrfs")
            .args(["-q", "device", "add", "-f", &lo])
            .arg(&m.0)
            .output()
            .unwrap();
        drop(m); // unmounted before the second device is let go
        let _ = Command::new("losetup").args(["-d", &lo]).status();
        assert!(
            added.status.success(),
            "btrfs device add: {}",
            String::from_utf8_lossy(&added.stderr)
        );
    }
    let cmdline = "root=LABEL=lb-btrfs toplayer=LABEL=lb-btrfs toplayer_path=/toplayer layerboot.rescue_timeout=0";
    let console = Qemu::new(vec![disk, second], cmdline, dir.join("boot.log")).run();
    no_panic(&console);
    let r = report(&console);
    assert_eq!(r["hostname"], "vm-two-devices");
    assert!(r["root"].starts_with("btrfs "), "{}", r["root"]);
}

/// Firmware → boot loader → layerboot → systemd, on a GPT disk with an ESP and a store
/// partition; the entry (written by `layerboot entry`) picks the v2 tag, so the report
/// shows that its kernel arguments, not the initramfs's defaults, were used.
fn boots_through_uefi(loader: vm_tests::disk::Loader, driver: &str, root: &str) {
    use vm_tests::disk::{gpt_disk, EspFiles};
    let dir = test_dir(&format!("uefi-{}-{driver}", loader.name()));
    let store = store_disk_with_toplayer(driver, &dir, &format!("vm-{}", loader.name()));
    let boot = demo_boot_files();
    let disk = dir.join("disk.img");
    gpt_disk(
        &disk,
        &store,
        &EspFiles {
            loader,
            kernel: &boot.kernel,
            initramfs: &boot.initramfs,
            images: &["layerboot/demo:v2", "layerboot/demo"],
            options: "console=ttyS0 layerboot.rescue_timeout=0",
            root,
            toplayer: Some((root, "/toplayer")),
        },
    );
    fs::remove_file(&store).unwrap();
    let console = Qemu {
        timeout: Duration::from_secs(600),
        uefi: true,
        ..Qemu::new(vec![disk], String::new(), dir.join("boot.log"))
    }
    .run();
    no_panic(&console);
    let r = report(&console);
    common_checks(&r, &format!("vm-{}", loader.name()), "v2");
    assert!(
        r["cmdline"].contains(&format!("root={root}")) && r["cmdline"].contains("docker_image=layerboot/demo:v2"),
        "{}",
        r["cmdline"]
    );
    if driver == "btrfs" {
        assert!(
            r["root"].starts_with("btrfs ") && r["root"].contains("subvol=/layerboot-rw"),
            "{}",
            r["root"]
        );
    } else {
        assert!(
            r["root"].starts_with("overlay ") && r["root"].contains("upperdir=/run/layerboot/store/layerboot-rw/upper"),
            "{}",
            r["root"]
        );
    }
}

#[test]
fn systemd_boot_boots_the_btrfs_store_from_a_gpt_disk() {
    boots_through_uefi(
        vm_tests::disk::Loader::SystemdBoot,
        "btrfs",
        &format!("PARTUUID={}", vm_tests::disk::STORE_PARTUUID),
    );
}

#[test]
fn systemd_boot_boots_the_overlay2_store_from_a_gpt_disk() {
    boots_through_uefi(vm_tests::disk::Loader::SystemdBoot, "overlay2", "PARTLABEL=store");
}

#[test]
fn grub_boots_the_btrfs_store_from_a_gpt_disk() {
    boots_through_uefi(vm_tests::disk::Loader::Grub, "btrfs", "PARTLABEL=store");
}

#[test]
fn refind_boots_the_btrfs_store_from_a_gpt_disk() {
    boots_through_uefi(vm_tests::disk::Loader::Refind, "btrfs", "LABEL=lb-btrfs");
}

/// Enough top-layer files that their copy takes seconds under TCG, so a cut lands inside it.
fn write_bulk(top: &Path) {
    let bulk = top.join("usr/share/layerboot-bulk");
    fs::create_dir_all(&bulk).unwrap();
    for i in 0..4000 {
        fs::write(bulk.join(format!("f{i}")), format!("{i}\n")).unwrap();
    }
}

/// Power is cut at three points of a boot: before the snapshot, right after it, and in
/// the middle of the top-layer copy. Every next boot succeeds with a fresh layer, no
/// half-made layer is left, and the image's layers are exactly as the engine left them.
#[test]
fn a_power_cut_during_boot_never_breaks_the_next_boot_or_the_store() {
    let dir = test_dir("power-cut");
    let disk = copy_store_disk("btrfs", &dir);
    {
        let _m = LoopMount::new(&disk, &dir.join("mnt"), false);
        let top = dir.join("mnt/toplayer");
        write_toplayer(&top, "vm-power");
        write_bulk(&top);
    }
    let cmdline = "root=LABEL=lb-btrfs toplayer=LABEL=lb-btrfs toplayer_path=/toplayer layerboot.debug layerboot.keep=2 layerboot.rescue_timeout=0";
    let qemu = |log: &str, cut: Option<&'static str>| {
        Qemu {
            cut_power_at: cut,
            ..Qemu::new(vec![disk.clone()], cmdline, dir.join(log))
        }
        .run()
    };
    for (i, marker) in [
        "image: layerboot/demo is sha256:",
        "fresh layer made:",
        "copying the top layer from",
    ]
    .iter()
    .enumerate()
    {
        let cut = qemu(&format!("cut{i}.log"), Some(marker));
        assert!(
            cut.contains(marker) && !cut.contains("LAYERBOOT-REPORT-BEGIN"),
            "cut {i} happened mid-boot"
        );
        if i == 2 {
            assert!(
                !cut.contains("top layer: copied"),
                "the cut landed during the copy:\n{}",
                tail(&cut, 10)
            );
        }
        let console = qemu(&format!("after-cut{i}.log"), None);
        no_panic(&console);
        let r = report(&console);
        assert_eq!(r["hostname"], "vm-power", "after cut {i}");
        assert_eq!(r["marker"], "none", "after cut {i}: a fresh layer");
    }
    {
        let _m = LoopMount::new(&disk, &dir.join("mnt"), true);
        assert!(!dir.join("mnt/layerboot-rw.new").exists(), "no half-made layer left");
        for kept in ["layerboot-rw.prev", "layerboot-rw.prev.2"] {
            assert!(
                dir.join("mnt").join(kept).join("var/tmp/layerboot-marker").exists(),
                "layerboot.keep=2 kept {kept}"
            );
        }
        assert!(!dir.join("mnt/layerboot-rw.prev.3").exists());
        assert_eq!(
            fs::read_dir(dir.join("mnt/layerboot-rw/usr/share/layerboot-bulk"))
                .unwrap()
                .count(),
            4000
        );
    }
    assert_store_untouched("btrfs", &disk, &dir);
}

/// `layerboot.rescue=shell` with an initramfs built `--rescue-shell` (busybox-static):
/// the failed boot drops into the shell on the console.
#[test]
fn rescue_shell_runs_on_the_console_after_a_failure() {
    let dir = test_dir("rescue-shell");
    let initramfs = dir.join("initramfs.img");
    let store = fixture_store("btrfs");
    run(layerboot()
        .args([
            "initramfs",
            "--store",
            store.to_str().unwrap(),
            "--image",
            "layerboot/demo",
            "--rescue-shell",
            "/bin/busybox",
            "-o",
        ])
        .arg(&initramfs));
    let demo = demo_boot_files();
    let boot = BootFiles {
        kernel: demo.kernel.clone(),
        kernel_version: demo.kernel_version.clone(),
        initramfs,
    };
    let cmdline = "root=LABEL=lb-btrfs docker_image=layerboot/nope:1 layerboot.rescue=shell layerboot.rescue_timeout=0";
    let console = Qemu {
        boot: &boot,
        snapshot: true,
        answer: Some(("starting a rescue shell", "echo RESCUE-$((6*7)); exit\n")),
        ..Qemu::new(vec![fixtures().join("btrfs.img")], cmdline, dir.join("boot.log"))
    }
    .run();
    no_panic(&console);
    assert!(
        console.contains("RESCUE-42"),
        "the shell ran the command:\n{}",
        tail(&console, 20)
    );
    assert!(console.contains("rescue shell ended"), "{}", tail(&console, 20));
}

/// A podman store (containers-storage, overlay) boots like Docker's overlay2 one.
#[test]
fn podman_store_boots_by_its_local_name() {
    let dir = test_dir("podman");
    let disk = store_disk_with_toplayer("overlay2", &dir, "vm-podman");
    // The initramfs is built from the podman store itself.
    let initramfs = dir.join("initramfs.img");
    run(layerboot()
        .args(["initramfs", "--store"])
        .arg(fixtures().join("mnt/overlay2/var/lib/containers/storage"))
        .args(["--image", "lb/podman:1", "-o"])
        .arg(&initramfs));
    let demo = demo_boot_files();
    let own = BootFiles {
        kernel: demo.kernel.clone(),
        kernel_version: demo.kernel_version.clone(),
        initramfs,
    };
    let cmdline = "root=LABEL=lb-overlay docker_path=var/lib/containers/storage docker_image=lb/podman:1 toplayer=LABEL=lb-overlay toplayer_path=/toplayer layerboot.rescue_timeout=0";
    let console = Qemu {
        boot: &own,
        ..Qemu::new(vec![disk], cmdline, dir.join("boot.log"))
    }
    .run();
    no_panic(&console);
    let r = report(&console);
    common_checks(&r, "vm-podman", "v2");
    assert!(
        r["root"].starts_with("overlay ") && r["root"].contains("upperdir=/run/layerboot/store/layerboot-rw/upper"),
        "{}",
        r["root"]
    );
    assert!(r["booted"].contains("var/lib/containers/storage"), "{}", r["booted"]);
}

/// containerd's store, as Docker 29 keeps images by default: the image in Docker's `moby`
/// namespace boots as an overlay of the overlayfs snapshotter's layers; then, from the
/// same disk, one that `ctr` unpacked with the btrfs snapshotter in `default` boots as a
/// btrfs snapshot. The store's snapshots are untouched afterwards.
#[test]
fn containerd_store_boots_from_both_snapshotters() {
    let dir = test_dir("containerd");
    let disk = store_disk_with_toplayer("containerd", &dir, "vm-containerd");
    // The initramfs is built from the containerd store itself, with its path and image
    // baked in as defaults: boot 1 names neither on the command line.
    let store = fixtures().join("mnt/containerd/var/lib/containerd");
    let initramfs = dir.join("initramfs.img");
    run(layerboot()
        .args(["initramfs", "--store"])
        .arg(&store)
        .args([
            "--image",
            "layerboot/demo:v2",
            "--docker-path",
            "var/lib/containerd",
            "-o",
        ])
        .arg(&initramfs));
    let demo = demo_boot_files();
    let own = BootFiles {
        kernel: demo.kernel.clone(),
        kernel_version: demo.kernel_version.clone(),
        initramfs,
    };
    let base =
        "root=LABEL=lb-containerd toplayer=LABEL=lb-containerd toplayer_path=/toplayer layerboot.rescue_timeout=0";

    let console = Qemu {
        boot: &own,
        ..Qemu::new(vec![disk.clone()], base, dir.join("boot1.log"))
    }
    .run();
    no_panic(&console);
    let r = report(&console);
    common_checks(&r, "vm-containerd", "v2");
    assert!(
        r["root"].starts_with("overlay ") && r["root"].contains("upperdir=/run/layerboot/store/layerboot-rw/upper"),
        "{}",
        r["root"]
    );
    assert!(
        r["booted"].contains(r#""engine":"containerd""#) && r["booted"].contains(r#""namespace":"moby""#),
        "{}",
        r["booted"]
    );
    assert!(
        !r["cmdline"].contains("docker_") && r["booted"].contains(r#""image":"layerboot/demo:v2""#),
        "the baked defaults booted: {}",
        r["booted"]
    );

    let base = format!("{base} docker_path=var/lib/containerd");
    let console = Qemu::new(
        vec![disk.clone()],
        format!("{base} docker_image=lb/ctr:btrfs"),
        dir.join("boot2.log"),
    )
    .run();
    no_panic(&console);
    let r = report(&console);
    common_checks(&r, "vm-containerd", "v2");
    assert!(
        r["root"].starts_with("btrfs ") && r["root"].contains("subvol=/layerboot-rw"),
        "{}",
        r["root"]
    );
    assert!(
        r["booted"].contains(r#""namespace":"default""#) && r["booted"].contains(r#""driver":"btrfs""#),
        "{}",
        r["booted"]
    );

    assert_layers_untouched(
        "containerd",
        "var/lib/containerd",
        &[],
        &disk,
        &dir,
        &["layerboot/demo:v2"],
    );
    assert_layers_untouched(
        "containerd",
        "var/lib/containerd",
        &["--namespace", "default"],
        &disk,
        &dir,
        &["layerboot/demo:v2"],
    );
}

/// Bind mounts of the host's /proc, /sys and /dev into a tree to chroot into, undone
/// when dropped.
struct ChrootMounts(Vec<std::path::PathBuf>);

impl ChrootMounts {
    fn new(tree: &Path) -> ChrootMounts {
        let mut done = ChrootMounts(Vec::new());
        for d in ["proc", "sys", "dev"] {
            let at = tree.join(d);
            fs::create_dir_all(&at).unwrap();
            run(Command::new("mount")
                .args(["--rbind", &format!("/{d}")])
                .arg(&at)
                .args(["--make-rslave"]));
            done.0.push(at);
        }
        done
    }
}

impl Drop for ChrootMounts {
    fn drop(&mut self) {
        for at in self.0.iter().rev() {
            let _ = Command::new("umount").arg("-R").arg(at).status();
        }
    }
}

/// The demo image's root (`docker export`), unpacked under `dir`, with `files` (repo
/// path, path in the tree, mode) copied in.
fn image_tree(dir: &Path, files: &[(&str, &str, u32)]) -> std::path::PathBuf {
    let tree = dir.join("rootfs");
    fs::create_dir_all(&tree).unwrap();
    run(Command::new("tar")
        .arg("-xf")
        .arg(fixtures().join("export-latest.tar"))
        .arg("-C")
        .arg(&tree));
    for (from, to, mode) in files {
        let dest = tree.join(to);
        fs::create_dir_all(dest.parent().unwrap()).unwrap();
        fs::copy(repo().join(from), &dest).unwrap();
        fs::set_permissions(&dest, std::os::unix::fs::PermissionsExt::from_mode(*mode)).unwrap();
    }
    tree
}

/// The PIDs of the kernel-log lines of `prefix` (`prefix<module path>[PID]: …`).
fn log_pids(console: &str, prefix: &str) -> Vec<u32> {
    console
        .match_indices(prefix)
        .filter_map(|(at, _)| {
            let word = console[at..].split_whitespace().next()?;
            word.strip_suffix("]:")?.rsplit_once('[')?.1.parse().ok()
        })
        .collect()
}

/// Boots `initramfs` (another tool's, with layerboot's hook) on the overlay2 store with
/// `cmdline`, and checks the image booted as from layerboot's own initramfs.
fn boots_with_hooked_initramfs(dir: &Path, initramfs: std::path::PathBuf, cmdline: &str, tool_said: &str) {
    let demo = demo_boot_files();
    let boot = BootFiles {
        kernel: demo.kernel.clone(),
        kernel_version: demo.kernel_version.clone(),
        initramfs,
    };
    let disk = store_disk_with_toplayer("overlay2", dir, "vm-hooked");
    let console = Qemu {
        boot: &boot,
        ..Qemu::new(vec![disk], cmdline, dir.join("boot.log"))
    }
    .run();
    no_panic(&console);
    assert!(
        console.contains(tool_said),
        "the tool ran layerboot's hook ({tool_said:?} missing):\n{}",
        tail(&console, 40)
    );
    let pids = log_pids(&console, "layerboot_init::");
    assert!(
        !pids.is_empty() && !pids.contains(&1),
        "layerboot-init ran as the tool's helper, not as PID 1: it logged as PIDs {pids:?}"
    );
    let r = report(&console);
    common_checks(&r, "vm-hooked", "v2");
    assert!(
        r["init-timing"].starts_with("root ready for /sbin/init"),
        "the tool switches, not layerboot: {}",
        r["init-timing"]
    );
    assert!(
        r["root"].starts_with("overlay ") && r["root"].contains("upperdir=/run/layerboot/store/layerboot-rw/upper"),
        "{}",
        r["root"]
    );
}

/// The lines of `lsinitramfs` for the initramfs at `path` inside `tree`.
fn lsinitramfs(tree: &Path, path: &str) -> String {
    run(Command::new("chroot").arg(tree).args(["lsinitramfs", path]))
}

/// layerboot's Debian package, installed with dpkg into the image's own root, changes
/// nothing until configured; with `/etc/layerboot.json` naming the image, Debian's own
/// `update-initramfs` builds an initramfs with layerboot's hook, and booted with
/// `boot=layerboot` it hands making the root to layerboot-init and switches to the
/// image's systemd itself.
#[test]
fn the_debian_package_with_initramfs_tools_boots_the_image_once_configured() {
    let dir = test_dir("initramfs-tools");
    let tree = image_tree(&dir, &[]);
    let deb = run(Command::new(repo().join("packaging/deb/build")).arg(dir.join("packages")));
    fs::copy(deb.trim(), tree.join("tmp/layerboot.deb")).unwrap();
    let demo = demo_boot_files();
    let kver = &demo.kernel_version;
    let initrd = format!("/boot/initrd.img-{kver}");
    let mounts = ChrootMounts::new(&tree);
    let chroot = |args: &[&str]| run(Command::new("chroot").arg(&tree).args(args));
    chroot(&["dpkg", "-i", "/tmp/layerboot.deb"]);
    let status = chroot(&["dpkg-query", "-W", "-f", "${Status} ${Version}", "layerboot"]);
    assert!(status.starts_with("install ok installed"), "{status}");

    // Installed, not configured: the initramfs Debian builds is its usual one.
    chroot(&["update-initramfs", "-c", "-k", kver]);
    let listing = lsinitramfs(&tree, &initrd);
    assert!(
        listing.contains("scripts/local") && !listing.contains("layerboot-init"),
        "the package changed an unconfigured initramfs:\n{listing}"
    );

    // Configured: the image to boot comes from /etc/layerboot.json, not the command line.
    fs::write(
        tree.join("etc/layerboot.json"),
        r#"{"defaults": {"docker_image": "layerboot/demo:v2"}}"#,
    )
    .unwrap();
    chroot(&["update-initramfs", "-u", "-k", kver]);
    let listing = lsinitramfs(&tree, &initrd);
    for f in [
        "usr/lib/layerboot/layerboot-init",
        "scripts/layerboot",
        "etc/layerboot.json",
    ] {
        assert!(listing.contains(f), "{f} missing:\n{listing}");
    }
    drop(mounts);
    let cmdline = "boot=layerboot rw root=LABEL=lb-overlay toplayer=LABEL=lb-overlay toplayer_path=/toplayer layerboot.rescue_timeout=0";
    boots_with_hooked_initramfs(
        &dir,
        tree.join(initrd.trim_start_matches('/')),
        cmdline,
        "Making the root from the container image (layerboot)",
    );
}

/// dracut (Debian's dracut-core, run inside the image's root) with layerboot's module:
/// its mount hook hands making the root to layerboot-init, and dracut switches to it. The
/// image to boot is the one mkinitcpio-docker-hooks' `/etc/docker-btrfs.json` names.
#[test]
fn dracut_with_the_layerboot_module_boots_the_image() {
    let dir = test_dir("dracut");
    let tree = image_tree(
        &dir,
        &[
            (
                "hooks/dracut/90layerboot/module-setup.sh",
                "usr/lib/dracut/modules.d/90layerboot/module-setup.sh",
                0o755,
            ),
            (
                "hooks/dracut/90layerboot/mount-layerboot.sh",
                "usr/lib/dracut/modules.d/90layerboot/mount-layerboot.sh",
                0o755,
            ),
            (
                "target/x86_64-unknown-linux-musl/release/layerboot-init",
                "usr/lib/layerboot/layerboot-init",
                0o755,
            ),
        ],
    );
    // A mkinitcpio-docker-hooks user's image keeps its config: it names the image.
    fs::write(
        tree.join("etc/docker-btrfs.json"),
        "{\n\t\"docker_image\": \"layerboot/demo\",\n\t\"docker_tag\": \"v2\"\n}\n",
    )
    .unwrap();
    // dracut itself, from the host's dracut-core (tests/setup-host.sh installs it).
    run(Command::new("cp")
        .args(["-a", "--no-clobber", "/usr/lib/dracut"])
        .arg(tree.join("usr/lib/")));
    run(Command::new("cp")
        .args(["-a", "/usr/bin/dracut"])
        .arg(tree.join("usr/bin/dracut")));
    let demo = demo_boot_files();
    {
        let _mounts = ChrootMounts::new(&tree);
        run(Command::new("chroot").arg(&tree).args([
            "dracut",
            "--quiet",
            "--force",
            "--no-hostonly",
            "--omit",
            "systemd systemd-initrd dracut-systemd",
            "-a",
            "layerboot",
            "--kver",
            &demo.kernel_version,
            "/boot/initrd-dracut.img",
        ]));
    }
    let cmdline = "rw root=LABEL=lb-overlay toplayer=LABEL=lb-overlay toplayer_path=/toplayer layerboot.rescue_timeout=0 rd.shell=0";
    boots_with_hooked_initramfs(
        &dir,
        tree.join("boot/initrd-dracut.img"),
        cmdline,
        "dracut: layerboot: making the root from the container image",
    );
}

/// The loop users live in (README, "Updating from inside"): a machine booted from an
/// image with Docker binds the store it booted from onto its /var/lib/docker (a top-layer
/// fstab line), loads a new image into it, and boots that image next time; the image it
/// ran stays in the store, untouched.
#[test]
fn a_machine_loads_an_update_into_its_own_store_and_boots_it_next() {
    let dir = test_dir("update");
    let disk = copy_store_disk("overlay2", &dir);
    let top_dir = dir.join("toplayer");
    write_toplayer(&top_dir, "vm-update");
    let w = |rel: &str, text: &str| {
        let p = top_dir.join(rel);
        let mut old = fs::read_to_string(&p).unwrap_or_default();
        old.push_str(text);
        fs::write(&p, old).unwrap();
    };
    w(
        "etc/fstab",
        "/run/layerboot/store/var/lib/docker /var/lib/docker none bind 0 0\n",
    );
    // Loads the archive on the third disk, if there is one, before the report.
    w(
        "etc/systemd/system/layerboot-update.service",
        "[Unit]\nDescription=load the update on /dev/vdc into the store\nRequires=docker.service\nAfter=docker.service\n\
         Before=layerboot-report.service\nConditionPathExists=/dev/vdc\n\
         [Service]\nType=oneshot\nExecStart=/bin/sh -c 'docker load -i /dev/vdc >/run/layerboot-update.log 2>&1'\n\
         [Install]\nWantedBy=multi-user.target\n",
    );
    std::os::unix::fs::symlink(
        "../layerboot-update.service",
        top_dir.join("etc/systemd/system/multi-user.target.wants/layerboot-update.service"),
    )
    .unwrap();
    let top = toplayer_disk(&top_dir, &dir);
    let update = dir.join("update.tar");
    fs::copy(fixtures().join("update.tar"), &update).unwrap();
    let base = "root=LABEL=lb-overlay toplayer=LABEL=lb-top layerboot.rescue_timeout=0";

    let cmdline = format!("{base} docker_image=layerboot/demo:docker");
    let console = Qemu::new(vec![disk.clone(), top.clone(), update], cmdline, dir.join("boot1.log")).run();
    no_panic(&console);
    let r = report(&console);
    common_checks(&r, "vm-update", "docker");
    assert!(
        r["docker-root"].starts_with("/dev/vda[/var/lib/docker]"),
        "the store bound onto /var/lib/docker: {}",
        r["docker-root"]
    );
    assert_eq!(
        r["docker-load"], "Loaded image: layerboot/demo:update",
        "docker load inside the machine"
    );
    {
        // The store on the disk now holds the update, readable offline as any image.
        let _m = LoopMount::new(&disk, &dir.join("check"), true);
        let out = run(layerboot()
            .args(["inspect", "--store"])
            .arg(dir.join("check/var/lib/docker"))
            .arg("layerboot/demo:update"));
        assert!(out.contains("layers"), "{out}");
    }

    let cmdline = format!("{base} docker_image=layerboot/demo:update");
    let console = Qemu::new(vec![disk.clone(), top], cmdline, dir.join("boot2.log")).run();
    no_panic(&console);
    let r = report(&console);
    common_checks(&r, "vm-update", "update");
    assert_eq!(r["docker-load"], "none", "no update disk this time");
    let images: Vec<&str> = r["docker-images"].split_whitespace().collect();
    assert!(
        images.contains(&"layerboot/demo:update") && images.contains(&"layerboot/demo:docker"),
        "{images:?}"
    );
    // What the machine ran before is all there: its layers are as the engine left them.
    assert_layers_untouched(
        "overlay2",
        "var/lib/docker",
        &[],
        &disk,
        &dir,
        &["layerboot/demo:docker", "layerboot/demo:latest"],
    );
}

/// Hostile and careless inputs on a btrfs store (issue: data safety): a writable-layer
/// name that is the store's parent directory stops the boot before anything is touched;
/// whiteouts that name no file and an opaque marker at the top layer's root are skipped
/// with warnings on the console and in booted.json. The store is as the engine left it.
#[test]
fn hostile_whiteouts_and_layer_names_never_touch_the_store() {
    let dir = test_dir("hostile");
    let disk = copy_store_disk("btrfs", &dir);
    {
        let m = LoopMount::new(&disk, &dir.join("mnt"), false);
        let top = m.0.join("toplayer");
        write_toplayer(&top, "vm-hostile");
        for d in ["", "etc"] {
            for bad in [".wh.", ".wh..", ".wh..."] {
                fs::write(top.join(d).join(bad), "").unwrap();
            }
        }
        fs::write(top.join(".wh..wh..opq"), "").unwrap();
    }
    let base = "root=LABEL=lb-btrfs toplayer=LABEL=lb-btrfs toplayer_path=/toplayer layerboot.rescue_timeout=0";
    // A USB stick with the store's label: the boot stops and names both, never guesses.
    let namesake = dir.join("namesake.img");
    fs::File::create(&namesake).unwrap().set_len(16 << 20).unwrap();
    run(Command::new("mkfs.ext4").args(["-q", "-L", "lb-btrfs"]).arg(&namesake));
    let console = Qemu {
        snapshot: true,
        ..Qemu::new(vec![disk.clone(), namesake], base, dir.join("boot0.log"))
    }
    .run();
    no_panic(&console);
    for want in [
        "layerboot: BOOT FAILED",
        "root=LABEL=lb-btrfs names 2 different filesystems",
        "/dev/vda type=btrfs",
        "/dev/vdb type=ext4",
        "fix: name the one meant by UUID=",
    ] {
        assert!(console.contains(want), "missing {want:?} in:\n{}", tail(&console, 30));
    }

    let console = Qemu::new(
        vec![disk.clone()],
        format!("{base} rootflags=subvol=var"),
        dir.join("boot1.log"),
    )
    .run();
    no_panic(&console);
    for want in [
        "layerboot: BOOT FAILED",
        "writable layer var",
        "the image store (docker_path=) at /var/lib/docker",
        "Nothing was changed",
        "fix:",
    ] {
        assert!(console.contains(want), "missing {want:?} in:\n{}", tail(&console, 30));
    }

    // Also attached: a disk with an MBR partition and a stale GPT header behind it that
    // claims 4 GiB entries (it made PID 1 fault once). The kernel reads the MBR; so must we.
    let stale = stale_gpt_disk(&dir);
    let console = Qemu::new(vec![disk.clone(), stale], base, dir.join("boot2.log")).run();
    no_panic(&console);
    let r = report(&console);
    common_checks(&r, "vm-hostile", "latest");
    assert!(
        console.contains("layerboot: warning: top layer: ignored whiteout"),
        "{}",
        tail(&console, 60)
    );
    assert_eq!(
        r["booted"].matches("names no file").count(),
        6,
        "every bad whiteout named in booted.json: {}",
        r["booted"]
    );
    assert!(
        r["booted"].contains("opaque marker at the top layer's root"),
        "{}",
        r["booted"]
    );
    {
        let _m = LoopMount::new(&disk, &dir.join("check"), true);
        let m = dir.join("check");
        let top: Vec<String> = fs::read_dir(&m)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(
            m.join("var/lib/docker/image").is_dir() && !top.iter().any(|n| n.starts_with("var.")),
            "the store stayed where it was: {top:?}"
        );
    }
    assert_store_untouched("btrfs", &disk, &dir);
}

/// An 8 MiB disk with one MBR partition and, behind it, a GPT header with a right CRC
/// that claims entries of 4 GiB.
fn stale_gpt_disk(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("stale-gpt.img");
    fs::File::create(&img).unwrap().set_len(8 << 20).unwrap();
    let mut sfdisk = Command::new("sfdisk")
        .arg("-q")
        .arg(&img)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut sfdisk.stdin.take().unwrap(), b"label: dos\ntype=83\n").unwrap();
    assert!(sfdisk.wait().unwrap().success());
    let mut d = fs::read(&img).unwrap();
    let h = &mut d[512..1024];
    h.fill(0);
    h[0..8].copy_from_slice(b"EFI PART");
    h[12..16].copy_from_slice(&92u32.to_le_bytes());
    h[24..32].copy_from_slice(&1u64.to_le_bytes());
    h[72..80].copy_from_slice(&2u64.to_le_bytes());
    h[80..84].copy_from_slice(&1u32.to_le_bytes());
    h[84..88].copy_from_slice(&0xffff_ff80u32.to_le_bytes());
    let crc = crc32fast::hash(&h[..92]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    fs::write(&img, d).unwrap();
    img
}

/// The generations' marks, read from the host: (layer name, mark) at the top level.
fn layer_marks(top: &Path) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = fs::read_dir(top)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("layerboot-rw"))
        .map(|n| {
            let v = Command::new("getfattr")
                .args(["--only-values", "-n", "trusted.layerboot.state"])
                .arg(top.join(&n))
                .output()
                .unwrap();
            (n, String::from_utf8_lossy(&v.stdout).into_owned())
        })
        .collect();
    out.sort();
    out
}

/// Power cuts on an overlay2 store on ext4 (today's other cuts are on btrfs): right
/// after the new layer is swapped in, and in the middle of a `mode=keep` boot's top-layer
/// copy. The next boots finish what was cut, keep the generations `layerboot.keep=2`
/// asks for, and a clean poweroff leaves the store's ext4 with nothing to recover.
#[test]
fn overlay2_power_cuts_after_the_swap_and_during_a_keep_copy_lose_nothing() {
    let dir = test_dir("overlay2-power-cut");
    let disk = copy_store_disk("overlay2", &dir);
    {
        let m = LoopMount::new(&disk, &dir.join("mnt"), false);
        let top = m.0.join("toplayer");
        write_toplayer(&top, "vm-cut");
        write_bulk(&top);
    }
    let base = "root=LABEL=lb-overlay toplayer=LABEL=lb-overlay toplayer_path=/toplayer layerboot.debug layerboot.keep=2 layerboot.rescue_timeout=0";
    let qemu = |extra: &str, log: &str, cut: Option<&'static str>| {
        let console = Qemu {
            cut_power_at: cut,
            ..Qemu::new(vec![disk.clone()], format!("{base} {extra}"), dir.join(log))
        }
        .run();
        no_panic(&console);
        console
    };
    let r = report(&qemu("", "boot1.log", None));
    common_checks(&r, "vm-cut", "latest");
    let cut = qemu("", "cut-after-swap.log", Some("writable layer swapped in:"));
    assert!(!cut.contains("LAYERBOOT-REPORT-BEGIN"), "the cut happened mid-boot");
    let console = qemu("", "boot3.log", None);
    let r = report(&console);
    common_checks(&r, "vm-cut", "latest");
    assert!(
        r["booted"].contains("finished the rotation of writable layers that a power cut interrupted"),
        "{}",
        r["booted"]
    );

    let cut = qemu(
        "layerboot.mode=keep",
        "cut-keep-copy.log",
        Some("copying the top layer from"),
    );
    assert!(
        !cut.contains("top layer: copied") && !cut.contains("LAYERBOOT-REPORT-BEGIN"),
        "the cut landed during the copy:\n{}",
        tail(&cut, 10)
    );
    let console = qemu("layerboot.mode=keep", "boot5.log", None);
    let r = report(&console);
    assert_eq!(r["hostname"], "vm-cut");
    assert_eq!(
        r["marker"], "written in an earlier boot",
        "mode=keep kept boot 3's layer"
    );
    assert!(
        r["booted"].contains("copying the top layer into") && r["booted"].contains("again"),
        "{}",
        r["booted"]
    );
    assert!(
        console.contains("layerboot: shutdown: the image's root and the store are unmounted cleanly"),
        "{}",
        tail(&console, 20)
    );

    let dumpe2fs = run(Command::new("dumpe2fs").arg("-h").arg(&disk));
    let features = dumpe2fs
        .lines()
        .find(|l| l.starts_with("Filesystem features:"))
        .unwrap_or_default();
    assert!(
        !features.contains("needs_recovery"),
        "the store's ext4 was left dirty: {features}"
    );
    assert!(
        dumpe2fs
            .lines()
            .any(|l| l.starts_with("Filesystem state:") && l.contains("clean")),
        "{dumpe2fs}"
    );
    {
        let _m = LoopMount::new(&disk, &dir.join("check"), true);
        let m = dir.join("check");
        let marks = layer_marks(&m);
        let want = [
            ("layerboot-rw", "complete 3"),
            ("layerboot-rw.prev", "complete 2"),
            ("layerboot-rw.prev.2", "complete 1"),
        ];
        assert_eq!(
            marks,
            want.map(|(a, b)| (a.to_string(), b.to_string())),
            "generations after the cuts"
        );
        assert!(
            m.join("layerboot-rw.prev.2/upper/var/tmp/layerboot-marker").exists(),
            "boot 1's layer, the last that booted before the cut, is kept"
        );
        let bulk = m.join("layerboot-rw/upper/usr/share/layerboot-bulk");
        assert_eq!(fs::read_dir(&bulk).unwrap().count(), 4000);
        for i in 0..4000 {
            assert_eq!(
                fs::read_to_string(bulk.join(format!("f{i}"))).unwrap(),
                format!("{i}\n"),
                "the cut copy was done again"
            );
        }
    }
    assert_store_untouched("overlay2", &disk, &dir);
}

/// A fleet's day-2 loop with the boot loader's counting, nobody at the console: v1 and
/// then a v2 whose init is missing are deployed from the host (as a first install is);
/// v2 boots first, fails twice (each failure reboots), and then the loader boots v1 by
/// itself, whose boot blesses it. What the loader keeps on the ESP, read back from the
/// host, shows v1 good and v2 bad, and `layerboot status` says so.
fn falls_back_from_a_failing_deployment(loader: vm_tests::disk::Loader) {
    use vm_tests::disk::{esp_tree, gpt_disk_with_esp_tree, Loader};
    let dir = test_dir(&format!("deployments-{}", loader.name()));
    let store = copy_store_disk("overlay2", &dir);
    {
        let m = LoopMount::new(&store, &dir.join("mnt"), false);
        write_toplayer(&m.0.join("toplayer"), "vm-deploy");
        report_after_bless(&m.0.join("toplayer"));
    }
    let esp = dir.join("esp");
    fs::create_dir_all(&esp).unwrap();
    let data_root = fixture_store("overlay2");
    let deploy = |reference: &str, options: &str| {
        deploy_from_host(
            &esp,
            reference,
            &[
                "--loader",
                loader.name(),
                "--esp-device",
                "LABEL=ESP",
                "--tries",
                "2",
                "--options",
                options,
            ],
        )
    };
    deploy("layerboot/demo", "console=ttyS0 layerboot.rescue_timeout=0");
    deploy(
        "layerboot/demo:v2",
        "console=ttyS0 layerboot.rescue_timeout=0 init=/sbin/no-such-init",
    );
    let disk = dir.join("disk.img");
    gpt_disk_with_esp_tree(&disk, &store, &esp, loader);
    fs::remove_file(&store).unwrap();

    // Each boot is one QEMU run (a reboot ends it): v2, v2, then v1 on the loader's own.
    let mut consoles = Vec::new();
    for n in 1..=3 {
        let console = Qemu {
            timeout: Duration::from_secs(600),
            uefi: true,
            ..Qemu::new(vec![disk.clone()], String::new(), dir.join(format!("boot{n}.log")))
        }
        .run();
        no_panic(&console);
        consoles.push(console);
    }
    for c in &consoles[..2] {
        assert!(
            c.contains("BOOT FAILED") && c.contains("/sbin/no-such-init"),
            "v2 fails with a readable reason:\n{}",
            tail(c, 30)
        );
    }
    let r = report(&consoles[2]);
    common_checks(&r, "vm-deploy", "latest");
    let (v1, v2) = (image_id("DEMO_ID"), image_id("DEMO_V2_ID"));
    let (id1, id2) = (&v1[7..19], &v2[7..19]);
    assert!(
        r["cmdline"].contains(&format!("docker_image={v1}")),
        "pinned by ID: {}",
        r["cmdline"]
    );
    assert!(
        consoles[2].contains("layerboot: boot blessed"),
        "the bless unit ran:\n{}",
        tail(&consoles[2], 40)
    );

    // From the host: v1 blessed, v2 out of tries, as the loader keeps them.
    let back = dir.join("esp-after");
    esp_tree(&disk, &back);
    if loader == Loader::Grub {
        let block = fs::read(back.join("layerboot/grubenv")).unwrap();
        assert_eq!(block.len(), 1024, "save_env kept the block's size");
        let vars = layerboot_init::grubenv::parse(&block).unwrap();
        assert_eq!(
            vars,
            [
                (format!("lb_{id1}"), "good".to_string()),
                (format!("lb_{id2}"), "0".to_string())
            ]
        );
    } else {
        let mut entries: Vec<String> = fs::read_dir(back.join("loader/entries"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        entries.sort();
        assert_eq!(
            entries,
            [
                format!("layerboot-000001-{id1}.conf"),
                format!("layerboot-000002-{id2}+0-2.conf")
            ]
        );
    }
    assert_status(
        &back,
        &data_root,
        &[("> ", "layerboot/demo ", "good"), ("  ", "layerboot/demo:v2 ", "bad")],
    );
}

/// `layerboot status` of the ESP copied out to `esp`: each deployment's line, in order,
/// starts with its marker, names its reference and ends with its state.
fn assert_status(esp: &Path, data_root: &Path, want: &[(&str, &str, &str)]) {
    let status = run(layerboot().args([
        "status",
        "--esp",
        esp.to_str().unwrap(),
        "--store",
        data_root.to_str().unwrap(),
    ]));
    let lines: Vec<&str> = status.lines().skip(1).collect();
    for (line, (mark, reference, state)) in lines.iter().zip(want) {
        assert!(
            line.starts_with(mark) && line.contains(reference) && line.ends_with(state),
            "{mark}{reference}…{state}:\n{status}"
        );
    }
}

#[test]
fn systemd_boot_falls_back_from_a_failing_deployment_and_blesses_the_good_one() {
    falls_back_from_a_failing_deployment(vm_tests::disk::Loader::SystemdBoot);
}

#[test]
fn grub_falls_back_from_a_failing_deployment_and_blesses_the_good_one() {
    falls_back_from_a_failing_deployment(vm_tests::disk::Loader::Grub);
}

/// `layerboot deploy` from the host, as a first install is: into `esp`, from the
/// overlay2 fixture store, for a machine whose store and top layer are on the GPT disk's
/// store partition.
fn deploy_from_host(esp: &Path, reference: &str, extra: &[&str]) -> String {
    let root = format!("PARTUUID={}", vm_tests::disk::STORE_PARTUUID);
    let data_root = fixture_store("overlay2");
    let mut args = vec![
        "deploy",
        reference,
        "--esp",
        esp.to_str().unwrap(),
        "--store",
        data_root.to_str().unwrap(),
        "--root",
        &root,
        "--toplayer",
        &root,
        "--toplayer-path",
        "/toplayer",
    ];
    args.extend(extra);
    run(layerboot().args(args))
}

/// What a guest's own `layerboot` printed: the lines a test unit tagged `|dp| `.
fn deploy_lines(console: &str) -> String {
    tagged_lines(console, "|dp| ").join("\n")
}

const GUEST_DEPLOY: &str = r#"#!/bin/sh
# The machine manages its own deployments, one step a boot (counted on the store's
# partition, which outlives the fresh writable layers): v1 deploys v2, v2 rolls back to
# v1, v1 deploys v2 again (already there: only made the default) and then starts
# deploying the sysv image, whose power is cut as soon as it writes to the ESP; v2 then
# deploys the sysv image keeping one deployment beside the protected ones, which removes v1.
count=/run/layerboot/store/layerboot-test-boots
n=$(( $(cat $count 2>/dev/null || echo 0) + 1 ))
echo $n > $count
if [ "$n" = 1 ]; then
  # This boot's report now (its own sync comes before the deploy): the power is cut as
  # soon as the deploy returns, with no periodic writeback, so only what the deploy
  # flushed itself is on the ESP (its FAT directories' long names included).
  /usr/local/sbin/layerboot-report
  echo 0 > /proc/sys/vm/dirty_writeback_centisecs
fi
sync
case "$n" in
1|3) out=$(layerboot deploy layerboot/demo:v2 2>&1) ;;
2) out=$(layerboot rollback 2>&1) ;;
4) out="$(layerboot status 2>&1)
$(layerboot deploy layerboot/demo:sysv --keep-deployments 1 2>&1)" ;;
esac
out="$out
$(layerboot status 2>&1)
$(layerboot status --json 2>&1 | grep '"loader_entry_selected"')"
printf '%s\n' "$out" | sed 's/^/|dp| /' > /dev/console
if [ "$n" = 1 ]; then
  echo "|dp| cutting the power as soon as the deploy returned" > /dev/console
  echo b > /proc/sysrq-trigger
fi
if [ "$n" = 3 ]; then
  echo "|dp| cutting the power once the deploy of layerboot/demo:sysv starts writing" > /dev/console
  layerboot deploy layerboot/demo:sysv >/dev/null 2>&1 &
  # Its directory comes first, then 12 MiB of kernel and initramfs, the entry last: the
  # shell's own glob sees the directory within one short sleep, long before the entry.
  while set -- /efi/layerboot/*/ && [ $# -lt 3 ]; do sleep 0.05; done
  echo b > /proc/sysrq-trigger
fi
"#;

/// `fsck.fat -n` of the ESP of `disk` (copied out to `img`) finds nothing but what any
/// power cut leaves on a mounted FAT: the dirty bit (and the boot sector's backup
/// without it) and a stale free-cluster count. An orphaned long name, a lost cluster or a
/// damaged directory would be another line.
fn assert_fat_whole_but_for_a_power_cut(disk: &Path, img: &Path) {
    vm_tests::disk::esp_image(disk, img);
    let fsck = Command::new("fsck.fat").arg("-n").arg(img).output().unwrap();
    let said = String::from_utf8_lossy(&fsck.stdout).into_owned() + &String::from_utf8_lossy(&fsck.stderr);
    let harmless = [
        "fsck.fat ",
        "There are differences between boot sector and its backup.",
        "This is mostly harmless. Differences: (offset:original/backup)",
        "  65:01/00",
        "  Not automatically fixing this.",
        "Dirty bit is set. Fs was not properly unmounted and some data may be corrupt.",
        " Automatically removing dirty bit.",
        "Free cluster summary wrong",
        "  Auto-correcting.",
        "Leaving filesystem unchanged.",
    ];
    let summary = format!("{}: ", img.display());
    let problems: Vec<&str> = said
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with(&summary))
        .filter(|l| !harmless.iter().any(|h| l.starts_with(h)))
        .collect();
    assert!(
        problems.is_empty() && fsck.status.code().is_some_and(|c| c <= 1),
        "fsck.fat -n after the cut found {problems:?}:\n{said}"
    );
    fs::remove_file(img).unwrap();
}

/// Adds 8.3-only files (one directory slot each) to the ESP directory `dir`, as staged on
/// the host, until the next name written into it takes two slots straddling a sector
/// (16 slots of 32 bytes): a deploy's new directory then has its long-name slot in one
/// sector and its short entry in the next, and flushing only the short one's sector loses
/// the long name.
fn pad_so_the_next_long_name_straddles_a_sector(dir: &Path) {
    // ".", "..", then each name: one short entry, and 13 characters a long-name slot
    // unless it is an upper-case 8.3 name.
    let slots = |name: &str| {
        let short = name.len() <= 8 && name.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
        1 + if short { 0 } else { name.len().div_ceil(13) }
    };
    let taken: usize = 2 + fs::read_dir(dir)
        .unwrap()
        .map(|e| slots(&e.unwrap().file_name().to_string_lossy()))
        .sum::<usize>();
    for k in 0..(15 + 16 - taken % 16) % 16 {
        fs::write(dir.join(format!("PAD{k}")), "").unwrap();
    }
}

/// The machine deploys, rolls back and redeploys by itself, with the `layerboot` of its
/// top layer and the defaults of its own boot (store, kernel arguments, ESP); a power
/// cut right after a deploy returns keeps it whole, and a cut in the middle of a deploy
/// leaves the previous default booting.
#[test]
fn a_machine_deploys_rolls_back_and_survives_a_deploy_cut_by_a_power_loss() {
    use vm_tests::disk::{esp_tree, gpt_disk_with_esp_tree};
    let dir = test_dir("deployments-in-guest");
    let store = copy_store_disk("overlay2", &dir);
    {
        let m = LoopMount::new(&store, &dir.join("mnt"), false);
        let top = m.0.join("toplayer");
        write_toplayer(&top, "vm-self");
        let bin = repo().join("target/x86_64-unknown-linux-musl/release");
        fs::create_dir_all(top.join("usr/local/bin")).unwrap();
        for b in ["layerboot", "layerboot-init"] {
            fs::copy(bin.join(b), top.join("usr/local/bin").join(b)).unwrap();
        }
        let fstab = top.join("etc/fstab");
        let mut text = fs::read_to_string(&fstab).unwrap();
        text.push_str("LABEL=ESP /efi vfat umask=0077 0 0\n");
        fs::write(&fstab, text).unwrap();
        fs::create_dir_all(top.join("efi")).unwrap();
        let units = top.join("etc/systemd/system");
        fs::write(
            units.join("layerboot-deploy-test.service"),
            "[Unit]\nAfter=multi-user.target layerboot-bless.service\nRequiresMountsFor=/efi /run/layerboot/store\n\
             [Service]\nType=oneshot\nExecStart=/usr/local/sbin/layerboot-deploy-test\n[Install]\nWantedBy=multi-user.target\n",
        )
        .unwrap();
        std::os::unix::fs::symlink(
            "../layerboot-deploy-test.service",
            units.join("multi-user.target.wants/layerboot-deploy-test.service"),
        )
        .unwrap();
        let script = top.join("usr/local/sbin/layerboot-deploy-test");
        fs::write(&script, GUEST_DEPLOY).unwrap();
        fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let dropin = units.join("layerboot-report.service.d");
        fs::create_dir_all(&dropin).unwrap();
        fs::write(
            dropin.join("after-deploy.conf"),
            "[Unit]\nAfter=layerboot-bless.service layerboot-deploy-test.service\n",
        )
        .unwrap();
    }
    let esp = dir.join("esp");
    fs::create_dir_all(&esp).unwrap();
    let data_root = fixture_store("overlay2");
    deploy_from_host(&esp, "layerboot/demo", &["--options", "console=ttyS0"]);
    pad_so_the_next_long_name_straddles_a_sector(&esp.join("layerboot"));
    let disk = dir.join("disk.img");
    gpt_disk_with_esp_tree(&disk, &store, &esp, vm_tests::disk::Loader::SystemdBoot);
    fs::remove_file(&store).unwrap();

    let (id1, id2) = (image_id12("DEMO_ID"), image_id12("DEMO_V2_ID"));
    let boot = |n: u32| {
        let console = Qemu {
            timeout: Duration::from_secs(900),
            uefi: true,
            ..Qemu::new(vec![disk.clone()], String::new(), dir.join(format!("boot{n}.log")))
        }
        .run();
        no_panic(&console);
        let said = deploy_lines(&console);
        (console, said)
    };

    let (console, said) = boot(1);
    common_checks(&report(&console), "vm-self", "latest");
    assert!(said.contains(&format!("deployed layerboot/demo:v2 as {id2}")), "{said}");
    assert!(
        said.contains("cutting the power as soon as the deploy returned"),
        "{said}"
    );
    // What the cut left on the ESP, read from the host: a clean FAT, and v2's directory
    // under its long name with its files (its long-name slot sat in the sector before).
    let cut = dir.join("esp-cut");
    esp_tree(&disk, &cut);
    assert_fat_whole_but_for_a_power_cut(&disk, &dir.join("esp-cut.img"));
    for f in ["vmlinuz", "initramfs.img", "deployment.json"] {
        assert!(
            cut.join("layerboot").join(&id2).join(f).is_file(),
            "{f} of {id2} after the cut"
        );
    }
    assert!(
        cut.join(format!("loader/entries/layerboot-000002-{id2}+3.conf"))
            .is_file(),
        "v2's entry after the cut"
    );
    assert!(
        said.lines()
            .any(|l| l.starts_with("> ") && l.contains("layerboot/demo:v2") && l.ends_with("trying, 3 tries left")),
        "{said}"
    );

    let (console, said) = boot(2);
    let r = report(&console);
    common_checks(&r, "vm-self", "v2");
    // systemd-boot's word on what it started agrees with what booted.
    assert!(
        said.contains(&format!("\"loader_entry_selected\": \"layerboot-000002-{id2}"))
            && !said.contains("the boot loader started"),
        "{said}"
    );
    assert!(
        r["cmdline"].contains("toplayer_path=/toplayer") && r["cmdline"].contains("console=ttyS0"),
        "the running boot's arguments were carried: {}",
        r["cmdline"]
    );
    assert!(
        said.contains(&format!("rolled back: {id1} (layerboot/demo) boots next")),
        "{said}"
    );

    // v1 again: redeploys v2, then a deploy of a third image is cut by a power loss.
    let (_, said) = boot(3);
    assert!(
        said.contains(&format!("already deployed as {id2}: it is the default now")),
        "{said}"
    );
    assert!(said.contains("cutting the power"), "{said}");

    // The previous default boots, and the cut deployment is not in the menu.
    let (console, said) = boot(4);
    common_checks(&report(&console), "vm-self", "v2");
    let (before, after) = said
        .split_once("deployed layerboot/demo:sysv")
        .unwrap_or_else(|| panic!("{said}"));
    assert!(
        before
            .lines()
            .any(|l| l.starts_with("*> ") && l.contains("layerboot/demo:v2")),
        "{said}"
    );
    // Cut before its record or its entry: never in the menu (a later deploy redoes it).
    assert!(
        before
            .lines()
            .filter(|l| l.contains("layerboot/demo:sysv"))
            .all(|l| l.ends_with("the next deploy finishes it, or gc removes it")),
        "{said}"
    );
    // Redone, with one deployment kept beside the protected ones (the booted v2 and the new
    // default): the oldest, v1, is removed, entry and files.
    assert!(
        after.contains(&format!("removed deployment {id1} (layerboot/demo)")),
        "{said}"
    );

    let back = dir.join("esp-after");
    esp_tree(&disk, &back);
    assert_status(
        &back,
        &data_root,
        &[
            ("> ", "layerboot/demo:sysv ", "trying, 3 tries left"),
            ("  ", "layerboot/demo:v2 ", "good"),
        ],
    );
    let left: Vec<String> = fs::read_dir(back.join("layerboot"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        !left.contains(&id1) && left.contains(&id2),
        "v1's files are gone, v2's stay: {left:?}"
    );
    let entries = fs::read_dir(back.join("loader/entries")).unwrap();
    let entries: Vec<String> = entries.map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert!(
        entries.len() == 2 && !entries.iter().any(|e| e.contains(&id1)),
        "v1's entry is gone: {entries:?}"
    );
}
