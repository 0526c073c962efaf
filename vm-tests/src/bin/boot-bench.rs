//! The boot benchmark: when does the image's own init start? The same kernel boots the
//! demo image three ways, BOOTS times each (default 3), for each store driver:
//!
//! - initramfs-tools: the image's root exported (`docker export`) onto a filesystem of
//!   the store's type, booted with the image's own Debian initramfs;
//! - floor: a 1 MiB initramfs whose /init only marks the time (nothing can be faster);
//! - minimal: the exported root again, with an initramfs whose /init only loads the
//!   modules that root needs, mounts it and switches (vm-tests/src/bin/minimal-init.rs):
//!   what any initramfs must spend here, so the least overhead a goal can ask for;
//! - layerboot: from the store, with layerboot's initramfs.
//!
//! Run by `bench/boot.sh` (tests/run mounts nothing for it; it mounts the fixtures itself).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use layerboot_init::kmod::{ModuleIndex, Step};
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
        run(Command::new("tar")
            .arg("-xf")
            .arg(fixtures().join("export-latest.tar"))
            .arg("-C")
            .arg(&tree));
    }
    // `docker export` adds the container's /.dockerenv, not the image's: with it, systemd
    // would believe it runs in a container (and log to the console, not through the kernel).
    let _ = fs::remove_file(tree.join(".dockerenv"));
    tree
}

/// A filesystem image of type `fs` holding the demo image's exported root.
fn exported_root(fs_type: &str, dir: &Path) -> PathBuf {
    let tree = exported_tree(dir);
    let img = dir.join(format!("root-{fs_type}.img"));
    let _ = fs::remove_file(&img);
    fs::File::create(&img).unwrap().set_len(3 << 30).unwrap();
    match fs_type {
        "ext4" => run(Command::new("mkfs.ext4")
            .args(["-q", "-L", "bench-root", "-d"])
            .arg(&tree)
            .arg(&img)),
        _ => run(Command::new("mkfs.btrfs")
            .args(["-q", "-L", "bench-root", "--rootdir"])
            .arg(&tree)
            .arg(&img)),
    };
    img
}

/// The minimal initramfs for a root of type `fs_type`: minimal-init, and the modules
/// to reach a virtio disk and mount it, in the order layerboot loads them, without the
/// optional soft dependencies (the CPU-specific ones fail under TCG's CPU). The checksum
/// modules the filesystem asks the crypto API for are named: with no modprobe, nobody
/// else would load them.
fn minimal_initramfs(fs_type: &str, modules_dir: &Path, dir: &Path) -> PathBuf {
    let roots: &[&str] = match fs_type {
        "ext4" => &["virtio_pci", "virtio_blk", "crc32c_generic", "ext4"],
        _ => &[
            "virtio_pci",
            "virtio_blk",
            "crc32c_generic",
            "xxhash_generic",
            "blake2b_generic",
            "btrfs",
        ],
    };
    let index = ModuleIndex::load(modules_dir).unwrap();
    let wanted: Vec<String> = roots.iter().map(|r| r.to_string()).collect();
    let order: Vec<Step> = index
        .load_order(&wanted)
        .unwrap()
        .into_iter()
        .filter(|s| !s.optional)
        .collect();
    let mut tree = base_tree(helper_binary("minimal-init"));
    tree.file("fstype", fs_type.as_bytes().to_vec(), 0o644);
    let list: String = order.iter().map(|s| format!("{}\n", s.name)).collect();
    tree.file("modules", list.into_bytes(), 0o644);
    for step in &order {
        let data = fs::read(modules_dir.join(&step.path)).unwrap();
        tree.file(&format!("lib/modules/{}.ko", step.name), data, 0o644);
    }
    let img = dir.join(format!("minimal-{fs_type}.img"));
    fs::write(&img, tree.cpio(0).unwrap()).unwrap();
    img
}

fn boot_until(
    disk: &Path,
    kernel: &Path,
    initrd: &Path,
    cmdline: &str,
    log: PathBuf,
    marker: &str,
    qemu_args: &[&str],
) -> f64 {
    let boot = BootFiles {
        kernel: kernel.to_path_buf(),
        kernel_version: String::new(),
        initramfs: initrd.to_path_buf(),
    };
    // systemd logs through the kernel, so its first line carries the kernel's timestamp.
    let cmdline = format!("{cmdline} systemd.log_target=kmsg");
    let q = Qemu {
        boot: &boot,
        timeout: Duration::from_secs(600),
        snapshot: true,
        qemu_args: qemu_args.to_vec(),
        ..Qemu::new(vec![disk.to_path_buf()], cmdline, log.clone())
    };
    kernel_time_until(&q, marker).unwrap_or_else(|| panic!("no {marker:?} on the console ({})", log.display()))
}

/// From a layerboot boot's console log: "init's own work N ms CPU, M ms of it in its own
/// code" (the rest is the kernel serving its system calls), as (N, M).
fn own_work_ms(log: &Path) -> (f64, f64) {
    let text = fs::read_to_string(log).unwrap();
    let (_, rest) = text
        .split_once("init's own work ")
        .unwrap_or_else(|| panic!("no timing line in {}", log.display()));
    let number = |s: &str| {
        s.split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no number in {s:?}"))
    };
    let (_, user) = rest
        .split_once(" ms CPU, ")
        .unwrap_or_else(|| panic!("no user time in {}", log.display()));
    (number(rest), number(user))
}

/// The median, and the spread (max - min) that shows how noisy the machine was.
fn summary(v: &[f64]) -> (f64, f64) {
    let spread = v.iter().cloned().fold(f64::MIN, f64::max) - v.iter().cloned().fold(f64::MAX, f64::min);
    (median(v.to_vec()), spread)
}

fn main() {
    let boots: usize = std::env::var("BOOTS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let dir = repo().join("target/vm-tests/boot-bench");
    fs::create_dir_all(&dir).unwrap();
    let demo = demo_boot_files();
    // The image's own initramfs-tools initramfs, as Debian built it inside the image.
    let itools_initrd = exported_tree(&dir).join(format!("boot/initrd.img-{}", demo.kernel_version));
    assert!(itools_initrd.exists(), "the image has no {}", itools_initrd.display());
    let stores = [
        ("overlay2", "ext4", "lb-overlay", 8.0),
        ("btrfs", "btrfs", "lb-btrfs", 4.0),
    ];
    let roots: Vec<PathBuf> = stores
        .iter()
        .map(|(_, fs_type, _, _)| exported_root(fs_type, &dir))
        .collect();
    let modules_dir = exported_tree(&dir).join("lib/modules").join(&demo.kernel_version);
    let minimal: Vec<PathBuf> = stores
        .iter()
        .map(|(_, fs_type, _, _)| minimal_initramfs(fs_type, &modules_dir, &dir))
        .collect();

    // A round: one boot of each kind, the kernel's clock when the image's init started:
    // the floor, then per store [initramfs-tools, minimal, layerboot].
    let round = |tag: &str, qemu_args: &[&str]| -> (f64, Vec<[f64; 3]>) {
        let floor = floor_boot(&accel(), Duration::from_secs(600), qemu_args).expect("floor boot");
        let per_store = stores
            .iter()
            .enumerate()
            .map(|(i, (driver, _, label, _))| {
                let log = |kind: &str| dir.join(format!("{kind}-{driver}-{tag}.log"));
                let store = fixtures().join(format!("{driver}.img"));
                [
                    boot_until(
                        &roots[i],
                        &demo.kernel,
                        &itools_initrd,
                        "root=LABEL=bench-root ro",
                        log("itools"),
                        INIT_STARTED,
                        qemu_args,
                    ),
                    boot_until(
                        &roots[i],
                        &demo.kernel,
                        &minimal[i],
                        "ro",
                        log("minimal"),
                        INIT_STARTED,
                        qemu_args,
                    ),
                    boot_until(
                        &store,
                        &demo.kernel,
                        &demo.initramfs,
                        &format!("root=LABEL={label}"),
                        log("layerboot"),
                        INIT_STARTED,
                        qemu_args,
                    ),
                ]
            })
            .collect();
        (floor, per_store)
    };
    // Rounds of one boot of each kind, so that a burst of load on the host hits all kinds
    // alike rather than one kind's boots.
    let rounds: Vec<(f64, Vec<[f64; 3]>)> = (0..boots).map(|r| round(&r.to_string(), &[])).collect();
    // Once more under -icount, where the guest's clock counts the instructions it runs
    // (1 ns each; real time only while it idles, waiting for a disk): what the guest
    // executes, which host load hardly moves, without the time TCG spends translating
    // code (most of the cost of code that runs only once, as at boot).
    let icount = (accel() == "tcg").then(|| round("icount", &["-icount", "shift=0"]));
    for root in &roots {
        let _ = fs::remove_file(root);
    }

    println!();
    println!(
        "boot benchmark: kernel {}, accelerator {}; the kernel's clock (s) when the image's init starts (systemd's first line; the floor's /init)",
        demo.kernel_version,
        accel()
    );
    print_table(
        &format!("{boots} boots each, medians, spread = max - min"),
        &stores,
        &rounds,
    );
    if let Some(icount) = icount {
        print_table(
            "-icount shift=0 (guest instructions as time; one boot each)",
            &stores,
            &[icount],
        );
    }
    // /init's own CPU time, from its timing line: under TCG (noisy: it includes
    // translating code that runs once), and in instructions under -icount.
    let (own, user): (Vec<f64>, Vec<f64>) = (0..boots)
        .map(|r| own_work_ms(&dir.join(format!("layerboot-overlay2-{r}.log"))))
        .unzip();
    let kernel: Vec<f64> = own.iter().zip(&user).map(|(o, u)| o - u).collect();
    let ((own, own_spread), (user, _), (kernel, _)) = (summary(&own), summary(&user), summary(&kernel));
    let instructions = (accel() == "tcg").then(|| own_work_ms(&dir.join("layerboot-overlay2-icount.log")).0);
    println!(
        "/init's own work (overlay2): {own:.0} ms CPU under {} (spread {own_spread:.0}; goal <= 100 ms under TCG: {}): {user:.0} ms in its own code, {kernel:.0} ms in the kernel serving its system calls (medians){}",
        accel(),
        if own <= 100.0 { "met" } else { "MISSED" },
        instructions.map_or(String::new(), |n| format!("; {n:.0} million guest instructions (-icount)"))
    );
}

/// One table of boot times: per store, each kind's median and spread over the floor, and
/// layerboot's and the minimal initramfs's overheads as ratios of initramfs-tools'.
fn print_table(title: &str, stores: &[(&str, &str, &str, f64)], rounds: &[(f64, Vec<[f64; 3]>)]) {
    let (floor, floor_spread) = summary(&rounds.iter().map(|r| r.0).collect::<Vec<_>>());
    println!("{title}:");
    println!(
        "{:<10} {:<24} {:>9} {:>8} {:>15}",
        "store", "boot", "init at", "spread", "over the floor"
    );
    println!(
        "{:<10} {:<24} {:>8.2}s {:>7.2}s {:>15}",
        "-", "floor", floor, floor_spread, "-"
    );
    for (i, (driver, fs_type, _, goal)) in stores.iter().enumerate() {
        let kind = |k: usize| summary(&rounds.iter().map(|r| r.1[i][k]).collect::<Vec<_>>());
        let ((it, it_spread), (min, min_spread), (lb, lb_spread)) = (kind(0), kind(1), kind(2));
        let (it_over, min_over, lb_over) = (it - floor, min - floor, lb - floor);
        println!(
            "{:<10} {:<24} {:>8.2}s {:>7.2}s {:>14.2}s",
            driver,
            format!("initramfs-tools ({fs_type})"),
            it,
            it_spread,
            it_over
        );
        println!(
            "{:<10} {:<24} {:>8.2}s {:>7.2}s {:>14.2}s",
            driver,
            format!("minimal ({fs_type})"),
            min,
            min_spread,
            min_over
        );
        println!(
            "{:<10} {:<24} {:>8.2}s {:>7.2}s {:>14.2}s",
            driver, "layerboot", lb, lb_spread, lb_over
        );
        let ratio = lb_over / it_over;
        let least = min_over / it_over;
        println!(
            "{:<10} layerboot's overhead is {:.2} of initramfs-tools' (goal <= 1/{goal}: {}); the minimal initramfs's is {:.2}{}; layerboot - minimal = {:+.2}s",
            driver,
            ratio,
            if ratio <= 1.0 / goal { "met" } else { "MISSED" },
            least,
            if least > 1.0 / goal { " (over the goal too: no initramfs reaches it here)" } else { "" },
            lb - min
        );
    }
}
