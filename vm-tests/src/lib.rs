//! Helpers for the VM boot tests: disks made from the fixture stores, the layerboot
//! builds of kernel and initramfs, QEMU runs with the serial console captured, and the
//! report the guest prints.
//!
//! The fixture stores (tests/fixtures/build-stores.sh) are never modified: each test
//! boots a sparse copy of one under target/vm-tests/<test>/.

pub mod disk;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn fixtures() -> PathBuf {
    std::env::var_os("LAYERBOOT_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/fixtures"))
}

/// A test's directory under target/vm-tests/: its serial logs stay for reading; its
/// disk images and image trees (gigabytes each, ~20 tests) are deleted when the test
/// passes, so a full run fits the disk. A failed test keeps everything.
pub struct TestDir(PathBuf);

impl std::ops::Deref for TestDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TestDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        let Ok(entries) = fs::read_dir(&self.0) else { return };
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".img") || name.ends_with(".tar") {
                let _ = fs::remove_file(&p);
            } else if name == "rootfs" || name == "toplayer" {
                let _ = fs::remove_dir_all(&p);
            }
        }
    }
}

/// A fresh [`TestDir`] for test `name`.
pub fn test_dir(name: &str) -> TestDir {
    TestDir(work_dir(name))
}

pub fn work_dir(name: &str) -> PathBuf {
    let d = repo().join("target/vm-tests").join(name);
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

/// Runs a command, panicking with its output if it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The release `layerboot` (tests/run builds it before the tests).
pub fn layerboot() -> Command {
    let bin = repo().join("target/x86_64-unknown-linux-musl/release/layerboot");
    assert!(
        bin.exists(),
        "{} is missing: run tests/run (it builds the release binaries first)",
        bin.display()
    );
    Command::new(bin)
}

/// The mounted, read-only fixture store of `driver` (tests/run mounts them).
pub fn fixture_store(driver: &str) -> PathBuf {
    let root = fixtures().join("mnt").join(driver).join("var/lib/docker");
    assert!(
        root.is_dir(),
        "{} is missing: run tests/run, which builds and mounts the fixture stores",
        root.display()
    );
    root
}

pub struct BootFiles {
    pub kernel: PathBuf,
    pub kernel_version: String,
    pub initramfs: PathBuf,
}

/// The kernel and initramfs `layerboot` builds from the demo image, once per test run.
pub fn demo_boot_files() -> &'static BootFiles {
    static BOOT: OnceLock<BootFiles> = OnceLock::new();
    BOOT.get_or_init(|| {
        let dir = work_dir("boot-files");
        let store = fixture_store("btrfs");
        let store = store.to_str().unwrap();
        let initramfs = dir.join("initramfs.img");
        run(layerboot()
            .args(["initramfs", "--store", store, "--image", "layerboot/demo", "-o"])
            .arg(&initramfs));
        let kernel = PathBuf::from(
            run(layerboot()
                .args(["kernel", "--store", store, "--image", "layerboot/demo", "-o"])
                .arg(&dir))
            .trim(),
        );
        let kernel_version = kernel
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .trim_start_matches("vmlinuz-")
            .to_string();
        BootFiles {
            kernel,
            kernel_version,
            initramfs,
        }
    })
}

/// A loop mount that is undone when dropped.
pub struct LoopMount(pub PathBuf);

impl LoopMount {
    pub fn new(image: &Path, at: &Path, read_only: bool) -> LoopMount {
        fs::create_dir_all(at).unwrap();
        let opts = if read_only { "loop,ro" } else { "loop" };
        // The host's btrfs remembers devices of unmounted filesystems by loop number; a
        // reused loop device with a stale entry would not mount.
        let _ = Command::new("btrfs").args(["device", "scan", "--forget"]).status();
        run(Command::new("mount").args(["-o", opts]).arg(image).arg(at));
        LoopMount(at.to_path_buf())
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A sparse copy of a fixture store's disk image, to boot and write to.
pub fn copy_store_disk(driver: &str, dir: &Path) -> PathBuf {
    let disk = dir.join(format!("{driver}.img"));
    run(Command::new("cp")
        .arg("--sparse=always")
        .arg(fixtures().join(format!("{driver}.img")))
        .arg(&disk));
    disk
}

/// A copy of a fixture store's disk with the test top layer at `/toplayer` on it.
pub fn store_disk_with_toplayer(driver: &str, dir: &Path, hostname: &str) -> PathBuf {
    let disk = copy_store_disk(driver, dir);
    let m = LoopMount::new(&disk, &dir.join("mnt"), false);
    write_toplayer(&m.0.join("toplayer"), hostname);
    disk
}

/// The top layer the tests put on a machine: files a user would keep per host, and a
/// systemd unit that prints a report on the serial console and powers off.
pub fn write_toplayer(dir: &Path, hostname: &str) {
    let w = |rel: &str, text: &str, mode: u32| {
        let p = dir.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, text).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    };
    w("etc/hostname", &format!("{hostname}\n"), 0o644);
    w("etc/layerboot-secret", "per-host secret\n", 0o600);
    std::os::unix::fs::chown(dir.join("etc/layerboot-secret"), Some(1000), Some(1000)).unwrap();
    w(".layerboot-dotfile", "dotfile\n", 0o644);
    // A per-host fstab the booted systemd must act on, and a whiteout deleting an image file.
    w(
        "etc/fstab",
        "tmpfs /mnt/layerboot-fstab tmpfs defaults,size=1m 0 0\n",
        0o644,
    );
    fs::create_dir_all(dir.join("mnt/layerboot-fstab")).unwrap(); // systemd makes it; sysvinit's mountall needs it
    w("etc/.wh.issue", "", 0o644);
    std::os::unix::fs::symlink("/etc/hostname", dir.join("etc/layerboot-link")).unwrap();
    w(
        "etc/systemd/system/layerboot-report.service",
        "[Unit]\nDescription=layerboot test report\nAfter=multi-user.target\nSuccessAction=poweroff-force\nFailureAction=poweroff-force\n\
         [Service]\nType=oneshot\nExecStart=/usr/local/sbin/layerboot-report\n[Install]\nWantedBy=multi-user.target\n",
        0o644,
    );
    let wants = dir.join("etc/systemd/system/multi-user.target.wants");
    fs::create_dir_all(&wants).unwrap();
    std::os::unix::fs::symlink("../layerboot-report.service", wants.join("layerboot-report.service")).unwrap();
    w("usr/local/sbin/layerboot-report", REPORT, 0o755);
}

const REPORT: &str = r#"#!/bin/sh
# Prints what booted, for the VM tests, then leaves a marker to see if it survives a boot.
# The report goes out in one write, so a login prompt printed at the same moment cannot
# land inside it, and every line carries a tag, so one in front of it does no harm.
. /etc/os-release
report() {
echo "LAYERBOOT-REPORT-BEGIN"
echo "os: $PRETTY_NAME"
echo "kernel: $(uname -r)"
echo "pid1: $(cat /proc/1/comm)"
echo "root: $(findmnt -no FSTYPE,OPTIONS /)"
echo "hostname: $(cat /proc/sys/kernel/hostname)"
echo "tag: $(cat /etc/layerboot-tag)"
echo "secret: $(stat -c '%a %u:%g' /etc/layerboot-secret)"
echo "dotfile: $(cat /.layerboot-dotfile)"
echo "symlink: $(readlink /etc/layerboot-link)"
echo "fstab-mount: $(findmnt -no FSTYPE /mnt/layerboot-fstab)"
echo "issue: $(test -e /etc/issue && echo present || echo deleted)"
echo "marker: $(cat /var/tmp/layerboot-marker 2>/dev/null || echo none)"
echo "booted: $(cat /run/layerboot/booted.json)"
echo "cmdline: $(cat /proc/cmdline)"
echo "modules: $(cut -d' ' -f1 /proc/modules | sort | tr '\n' ' ')"
echo "init-timing: $(dmesg | grep layerboot_init | grep -o -E '(switching to|root ready for) .*' | head -n 1)"
if command -v docker >/dev/null; then
echo "docker-root: $(findmnt -no SOURCE,FSTYPE /var/lib/docker)"
echo "docker-load: $(tail -n 1 /run/layerboot-update.log 2>/dev/null || echo none)"
echo "docker-images: $(docker images --format '{{.Repository}}:{{.Tag}}' | sort | tr '\n' ' ')"
fi
echo "LAYERBOOT-REPORT-END"
}
text=$(report 2>&1 | sed 's/^/|lb| /')
printf '%s\n' "$text" > /dev/console
echo "written in an earlier boot" > /var/tmp/layerboot-marker
sync
"#;

/// UEFI firmware for x86-64 VMs (package ovmf).
pub const OVMF: &str = "/usr/share/ovmf/OVMF.fd";

/// LAYERBOOT_ACCEL if set; else `kvm` if a probe boot under KVM reaches its /init within
/// 20 s, else `tcg` (nested KVM often hangs instead of booting).
pub fn accel() -> String {
    static ACCEL: OnceLock<String> = OnceLock::new();
    ACCEL
        .get_or_init(|| {
            if let Ok(a) = std::env::var("LAYERBOOT_ACCEL") {
                return a;
            }
            let ok =
                std::path::Path::new("/dev/kvm").exists() && floor_boot("kvm", Duration::from_secs(20), &[]).is_some();
            eprintln!(
                "vm-tests: accelerator {}",
                if ok { "kvm" } else { "tcg (the KVM probe boot failed)" }
            );
            (if ok { "kvm" } else { "tcg" }).to_string()
        })
        .clone()
}

/// An uncompressed initramfs tree (the builder's own archive writer) holding `/init`
/// and the two device nodes the kernel needs before any /dev is mounted.
pub fn base_tree(init: Vec<u8>) -> layerboot::archive::Tree {
    let mut tree = layerboot::archive::Tree::default();
    tree.dir("dev");
    tree.char_dev("dev/console", 5, 1, 0o600);
    tree.char_dev("dev/kmsg", 1, 11, 0o600);
    tree.file("init", init, 0o755);
    tree
}

/// A static helper binary of this crate (floor-init, minimal-init), built by vm-tests/bench.
pub fn helper_binary(name: &str) -> Vec<u8> {
    let path = repo().join("target/x86_64-unknown-linux-musl/release").join(name);
    fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (cargo build --release -p vm-tests)", path.display()))
}

/// The floor initramfs: floor-init as /init, /dev/console and /dev/kmsg, and 1 MiB of
/// incompressible padding, as small initramfs images go.
pub fn floor_initramfs() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let mut pad = vec![0u8; 1 << 20];
        let mut x: u32 = 0x9e37_79b9;
        for b in pad.iter_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        let mut tree = base_tree(helper_binary("floor-init"));
        tree.file("padding", pad, 0o644);
        let archive = tree.cpio(0).unwrap();
        let path = repo().join("target/vm-tests/floor-initramfs.img");
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, archive).unwrap();
        path
    })
    .clone()
}

/// Boots the demo kernel with the floor initramfs; the kernel's clock (seconds since it
/// started) when its /init ran, if it did within `timeout`. (Not through [`Qemu`], which
/// asks [`accel`], which uses this as its probe.)
pub fn floor_boot(accel: &str, timeout: Duration, qemu_args: &[&str]) -> Option<f64> {
    let boot = demo_boot_files();
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-accel",
        accel,
        "-m",
        "1024",
        "-display",
        "none",
        "-monitor",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
    ])
    .arg("-kernel")
    .arg(&boot.kernel)
    .arg("-initrd")
    .arg(floor_initramfs())
    .args(["-append", "console=ttyS0"])
    .args(qemu_args);
    let marker = "floor-init: started";
    let o = drive(cmd, None, None, Some(marker), timeout);
    o.stopped_at.and_then(|_| kernel_timestamp(&o.console, marker))
}

/// The kernel's timestamp (`[    5.226962] …`) of the first console line holding `marker`.
pub fn kernel_timestamp(console: &str, marker: &str) -> Option<f64> {
    let line = console.lines().find(|l| l.contains(marker))?;
    let (stamp, _) = line.trim_start().strip_prefix('[')?.split_once(']')?;
    stamp.trim().parse().ok()
}

/// How a QEMU run ended.
struct Outcome {
    console: String,
    /// When the stop marker appeared (counted from QEMU's start); QEMU was then killed.
    stopped_at: Option<Duration>,
    /// QEMU's exit status and stderr, if it exited by itself.
    exited: Option<(std::process::ExitStatus, String)>,
}

/// Runs QEMU, copying its console to `log` if given and typing `answer.1` once `answer.0`
/// shows, until it exits, `stop_at` shows (then it is killed: a power cut) or `timeout`
/// passes (then it is killed too).
fn drive(
    mut cmd: Command,
    log: Option<&Path>,
    answer: Option<(&str, &str)>,
    stop_at: Option<&str>,
    timeout: Duration,
) -> Outcome {
    use std::io::{Read, Write};
    use std::sync::{Arc, Mutex};
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-system-x86_64 (tests/setup-host.sh installs it)");
    let console = Arc::new(Mutex::new(String::new()));
    let reader = {
        let console = console.clone();
        let mut out = child.stdout.take().unwrap();
        let mut log = log.map(|p| fs::File::create(p).unwrap());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Some(l) = log.as_mut() {
                    let _ = l.write_all(&buf[..n]);
                }
                console.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    let mut stdin = child.stdin.take();
    let mut outcome = Outcome {
        console: String::new(),
        stopped_at: None,
        exited: None,
    };
    while start.elapsed() < timeout {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            outcome.exited = Some((status, err));
            break;
        }
        let text = console.lock().unwrap();
        if let (Some((trigger, reply)), Some(input)) = (answer, stdin.as_mut()) {
            if text.contains(trigger) {
                let _ = input.write_all(reply.as_bytes());
                stdin = None; // answered once; closing stdin is harmless to QEMU
            }
        }
        if stop_at.is_some_and(|m| text.contains(m)) {
            outcome.stopped_at = Some(start.elapsed());
            break;
        }
        drop(text);
        std::thread::sleep(Duration::from_millis(10));
    }
    // Still running: stop it. Exited: both are no-ops (try_wait reaped it already).
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    outcome.console = console.lock().unwrap().clone();
    outcome
}

/// Boots like [`Qemu::run`] until the console shows `marker` on a line of the kernel's
/// log; that line's kernel timestamp. The guest's own clock: QEMU's start-up and the
/// firmware are not in it.
pub fn kernel_time_until(q: &Qemu, marker: &str) -> Option<f64> {
    let o = drive(q.command(), Some(&q.log), q.answer, Some(marker), q.timeout);
    // The marker may show before its line is complete; the stamp comes first anyway.
    o.stopped_at.and_then(|_| kernel_timestamp(&o.console, marker))
}

pub struct Qemu<'a> {
    pub disks: Vec<PathBuf>,
    pub cmdline: String,
    pub boot: &'a BootFiles,
    pub log: PathBuf,
    pub timeout: Duration,
    /// Writes go to a temporary file, not the disk images.
    pub snapshot: bool,
    /// When the console shows `.0`, type `.1` on it.
    pub answer: Option<(&'a str, &'a str)>,
    /// Boot through UEFI firmware (OVMF) and the disk's boot loader instead of
    /// handing QEMU the kernel; `boot` and `cmdline` are then unused.
    pub uefi: bool,
    /// Pull the plug as soon as the console shows this.
    pub cut_power_at: Option<&'a str>,
    /// More QEMU arguments (the benchmark's `-icount`).
    pub qemu_args: Vec<&'a str>,
}

impl Qemu<'_> {
    /// A direct-kernel boot of the demo image's kernel and initramfs with `cmdline`.
    pub fn new(disks: Vec<PathBuf>, cmdline: impl Into<String>, log: PathBuf) -> Qemu<'static> {
        Qemu {
            disks,
            cmdline: cmdline.into(),
            boot: demo_boot_files(),
            log,
            timeout: Duration::from_secs(400),
            snapshot: false,
            answer: None,
            uefi: false,
            cut_power_at: None,
            qemu_args: Vec::new(),
        }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-accel",
            &accel(),
            "-m",
            "1024",
            "-smp",
            "1",
            "-display",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
        ])
        .args(["-serial", "stdio"])
        .args(&self.qemu_args);
        if self.uefi {
            cmd.args(["-bios", OVMF]);
        } else {
            cmd.arg("-kernel")
                .arg(&self.boot.kernel)
                .arg("-initrd")
                .arg(&self.boot.initramfs);
            cmd.args(["-append", &format!("console=ttyS0 {}", self.cmdline)]);
        }
        if self.snapshot {
            cmd.arg("-snapshot");
        }
        for d in &self.disks {
            cmd.arg("-drive")
                .arg(format!("file={},if=virtio,format=raw", d.display()));
        }
        cmd
    }

    /// Boots until the guest powers off (or reboots: -no-reboot ends QEMU then too) and
    /// returns the serial console's text, which is also kept in `log`.
    pub fn run(&self) -> String {
        let o = drive(
            self.command(),
            Some(&self.log),
            self.answer,
            self.cut_power_at,
            self.timeout,
        );
        match (o.stopped_at, o.exited) {
            (Some(_), _) => o.console,
            (None, Some((status, err))) => {
                assert!(
                    status.success(),
                    "qemu failed ({status}): {err}\nconsole:\n{}",
                    tail(&o.console, 40)
                );
                o.console
            }
            (None, None) => panic!(
                "the guest did not power off within {:?}; console ({}):\n{}",
                self.timeout,
                self.log.display(),
                tail(&o.console, 60)
            ),
        }
    }
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// What the report puts in front of each of its lines.
const REPORT_TAG: &str = "|lb| ";

/// The `key: value` lines the guest printed between the report markers (anything the
/// console printed before a line's tag, such as a login prompt, is dropped).
pub fn report(console: &str) -> BTreeMap<String, String> {
    let begin = console
        .find("LAYERBOOT-REPORT-BEGIN")
        .unwrap_or_else(|| panic!("no report on the console:\n{}", tail(console, 80)));
    let end = console[begin..]
        .find("LAYERBOOT-REPORT-END")
        .map(|e| begin + e)
        .expect("report not finished");
    console[begin..end]
        .lines()
        .filter_map(|l| l.split_once(REPORT_TAG).map(|(_, rest)| rest))
        .filter_map(|l| l.trim_end_matches('\r').split_once(": "))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_kernels_timestamp_of_a_marked_line() {
        let console = "noise\r\n[    4.503379] Run /init as init process\r\n[   12.578544] systemd[1]: systemd 252 running in system mode (+PAM)\r\n";
        assert_eq!(
            super::kernel_timestamp(console, "running in system mode"),
            Some(12.578544)
        );
        assert_eq!(
            super::kernel_timestamp("systemd 252 running in system mode", "running in system mode"),
            None
        );
    }
}
