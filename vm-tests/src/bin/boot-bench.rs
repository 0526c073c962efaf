//! The boot benchmark: when does the image's own init start? The same kernel boots the
//! demo image three ways, BOOTS times each (default 3), for each store driver:
//!
//! - initramfs-tools: the image's root exported (`docker export`) onto a filesystem of
//!   the store's type, booted with the image's own Debian initramfs;
//! - floor: a 1 MiB initramfs whose /init only marks the time (nothing can be faster);
//! - layerboot: from the store, with layerboot's initramfs.
//!
//! Run by `vm-tests/bench` (tests/run mounts nothing for it; it mounts the fixtures itself).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use vm_tests::*;

/// The image's init has started: systemd's first console line.
const INIT_STARTED: &str = "running in system mode";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// The demo image's root as `docker export` gave it, unpacked once.
fn exported_tree(dir: &Path) -> PathBuf {
    let tree = dir.join("rootfs");
    if !tree.join("etc/os-release").exists() {
        fs::create_dir_all(&tree).unwrap();
        run(Command::new("tar").arg("-xf").arg(fixtures().join("export-latest.tar")).arg("-C").arg(&tree));
    }
    tree
}

/// A filesystem image of type `fs` holding the demo image's exported root.
fn exported_root(fs_type: &str, dir: &Path) -> PathBuf {
    let tree = exported_tree(dir);
    let img = dir.join(format!("root-{fs_type}.img"));
    let _ = fs::remove_file(&img);
    fs::File::create(&img).unwrap().set_len(3 << 30).unwrap();
    match fs_type {
        "ext4" => run(Command::new("mkfs.ext4").args(["-q", "-L", "bench-root", "-d"]).arg(&tree).arg(&img)),
        _ => run(Command::new("mkfs.btrfs").args(["-q", "-L", "bench-root", "--rootdir"]).arg(&tree).arg(&img)),
    };
    img
}

fn boot_until(disk: &Path, kernel: &Path, initrd: &Path, cmdline: &str, log: PathBuf, marker: &str) -> f64 {
    let boot = Boot { kernel: kernel.to_path_buf(), kernel_version: String::new(), initramfs: initrd.to_path_buf() };
    let q = Qemu { boot: &boot, timeout: Duration::from_secs(300), snapshot: true, ..Qemu::new(vec![disk.to_path_buf()], cmdline, log.clone()) };
    time_until(&q, marker).unwrap_or_else(|| panic!("no {marker:?} on the console ({})", log.display()))
}

fn main() {
    let boots: usize = std::env::var("BOOTS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let dir = repo().join("target/vm-tests/boot-bench");
    fs::create_dir_all(&dir).unwrap();
    let demo = demo_boot_files();
    // The image's own initramfs-tools initramfs, as Debian built it inside the image.
    let itools_initrd = exported_tree(&dir).join(format!("boot/initrd.img-{}", demo.kernel_version));
    assert!(itools_initrd.exists(), "the image has no {}", itools_initrd.display());

    let floor: Vec<f64> = (0..boots).map(|_| floor_boot(&accel(), Duration::from_secs(120)).expect("floor boot")).collect();
    let floor = median(floor);
    println!();
    println!(
        "boot benchmark: kernel {}, {} boots each, accelerator {}; median seconds from QEMU's start until the image's init starts (systemd's first line; the floor's /init)",
        demo.kernel_version,
        boots,
        accel()
    );
    println!("{:<10} {:<18} {:>10} {:>16}", "store", "boot", "init at", "over the floor");
    println!("{:<10} {:<18} {:>9.2}s {:>15}", "-", "floor", floor, "-");
    for (driver, fs_type, goal) in [("overlay2", "ext4", 8.0), ("btrfs", "btrfs", 4.0)] {
        let root = exported_root(fs_type, &dir);
        let itools: Vec<f64> = (0..boots)
            .map(|i| boot_until(&root, &demo.kernel, &itools_initrd, "root=LABEL=bench-root ro", dir.join(format!("itools-{driver}-{i}.log")), INIT_STARTED))
            .collect();
        let store = fixtures().join(format!("{driver}.img"));
        let label = if driver == "btrfs" { "lb-btrfs" } else { "lb-overlay" };
        let lb: Vec<f64> = (0..boots)
            .map(|i| boot_until(&store, &demo.kernel, &demo.initramfs, &format!("root=LABEL={label}"), dir.join(format!("layerboot-{driver}-{i}.log")), INIT_STARTED))
            .collect();
        let (it, l) = (median(itools), median(lb));
        let (it_over, l_over) = (it - floor, l - floor);
        println!("{:<10} {:<18} {:>9.2}s {:>15.2}s", driver, format!("initramfs-tools ({fs_type})"), it, it_over);
        println!("{:<10} {:<18} {:>9.2}s {:>15.2}s", driver, "layerboot", l, l_over);
        let ratio = l_over / it_over;
        println!(
            "{:<10} layerboot's overhead is {:.2} of initramfs-tools' (goal <= 1/{goal}: {})",
            driver,
            ratio,
            if ratio <= 1.0 / goal { "met" } else { "MISSED" }
        );
        let _ = fs::remove_file(&root);
    }
}
