//! Helpers for the VM boot tests: disks made from the fixture stores, the layerboot
//! builds of kernel and initramfs, QEMU runs with the serial console captured, and the
//! report the guest prints.
//!
//! The fixture stores (tests/fixtures/build-stores.sh) are never modified: each test
//! boots a sparse copy of one under target/vm-tests/<test>/.

pub mod disk;
mod qemu;

pub use qemu::*;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

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

/// The report of the top layer `top` (which powers off) waits for the bless unit.
pub fn report_after_bless(top: &Path) {
    let dropin = top.join("etc/systemd/system/layerboot-report.service.d");
    fs::create_dir_all(&dropin).unwrap();
    fs::write(
        dropin.join("after-bless.conf"),
        "[Unit]\nAfter=layerboot-bless.service\n",
    )
    .unwrap();
}

/// A fixture image's full ID (`sha256:…`), by its name in `images.env` (`DEMO_ID`, …).
pub fn image_id(key: &str) -> String {
    let env = fs::read_to_string(fixtures().join("images.env")).unwrap();
    env.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in images.env"))
        .to_string()
}

/// Its first 12 hex digits, as deployments are named.
pub fn image_id12(key: &str) -> String {
    image_id(key)[7..19].to_string()
}

const REPORT: &str = r#"#!/bin/sh
# Prints what booted, for the VM tests, then leaves a marker to see if it survives a boot.
# The report goes out in one write, so a login prompt printed at the same moment cannot
# land inside it, and every line carries a tag, so one in front of it does no harm.
# Values go through printf, never echo: dash's echo reads backslashes, and a loader's path
# such as initrd=\layerboot\cc42... holds a `\c`, which would end the report's line there.
. /etc/os-release
kv() { printf '%s: %s\n' "$1" "$2"; }
report() {
echo "LAYERBOOT-REPORT-BEGIN"
kv os "$PRETTY_NAME"
kv kernel "$(uname -r)"
kv pid1 "$(cat /proc/1/comm)"
kv root "$(findmnt -no FSTYPE,OPTIONS /)"
kv hostname "$(cat /proc/sys/kernel/hostname)"
kv tag "$(cat /etc/layerboot-tag)"
kv secret "$(stat -c '%a %u:%g' /etc/layerboot-secret)"
kv dotfile "$(cat /.layerboot-dotfile)"
kv symlink "$(readlink /etc/layerboot-link)"
kv fstab-mount "$(findmnt -no FSTYPE /mnt/layerboot-fstab)"
kv issue "$(test -e /etc/issue && echo present || echo deleted)"
kv marker "$(cat /var/tmp/layerboot-marker 2>/dev/null || echo none)"
kv booted "$(cat /run/layerboot/booted.json)"
kv cmdline "$(cat /proc/cmdline)"
kv modules "$(cut -d' ' -f1 /proc/modules | sort | tr '\n' ' ')"
kv init-timing "$(dmesg | grep layerboot_init | grep -o -E '(switching to|root ready for) .*' | head -n 1)"
if command -v docker >/dev/null; then
kv docker-root "$(findmnt -no SOURCE,FSTYPE /var/lib/docker)"
kv docker-load "$(tail -n 1 /run/layerboot-update.log 2>/dev/null || echo none)"
kv docker-images "$(docker images --format '{{.Repository}}:{{.Tag}}' | sort | tr '\n' ' ')"
fi
echo "LAYERBOOT-REPORT-END"
}
text=$(report 2>&1 | sed 's/^/|lb| /')
printf '%s\n' "$text" > /dev/console
echo "written in an earlier boot" > /var/tmp/layerboot-marker
sync
"#;

/// What every test's booted machine reports the same way: its image's own OS, kernel and
/// init, the top layer's files, a fresh writable layer, and coldplug's modules.
pub fn common_checks(r: &Report, hostname: &str, tag: &str) {
    let boot = demo_boot_files();
    assert!(r["os"].contains("Debian GNU/Linux 12"), "{r:?}");
    assert_eq!(r["kernel"], boot.kernel_version, "the image's own kernel");
    assert_eq!(r["hostname"], hostname, "from the top layer");
    assert_eq!(r["tag"], tag, "which image booted");
    assert_eq!(r["secret"], "600 1000:1000", "top-layer owner and mode kept");
    assert_eq!(r["dotfile"], "dotfile", "top-level dotfile copied");
    assert_eq!(r["symlink"], "/etc/hostname", "symlink copied as a symlink");
    assert_eq!(r["fstab-mount"], "tmpfs", "the top layer's /etc/fstab took effect");
    assert_eq!(
        r["issue"], "deleted",
        "a .wh. file in the top layer deletes the image's file"
    );
    assert_eq!(r["marker"], "none", "a file written in the previous boot must be gone");
    if tag != "sysv" {
        assert_eq!(r["pid1"], "systemd", "the image's own init");
    }
    // Coldplug loaded what this machine's devices need, and nothing else.
    let modules: Vec<&str> = r["modules"].split_whitespace().collect();
    assert!(
        modules.contains(&"virtio_blk") && modules.contains(&"virtio_pci"),
        "{modules:?}"
    );
    assert!(
        !modules.contains(&"nvme") && !modules.contains(&"ahci"),
        "no NVMe or AHCI here: {modules:?}"
    );
    assert!(
        r["init-timing"].contains("init's own work"),
        "stage timings in dmesg: {}",
        r["init-timing"]
    );
    assert!(
        r["init-timing"].contains("ms of it in its own code"),
        "own work split into code and kernel: {}",
        r["init-timing"]
    );
}

/// What the report puts in front of each of its lines.
const REPORT_TAG: &str = "|lb| ";

/// What the guest's report said: its `key: value` lines.
#[derive(Debug)]
pub struct Report(BTreeMap<String, String>);

impl std::ops::Index<&str> for Report {
    type Output = String;
    fn index(&self, key: &str) -> &String {
        self.0
            .get(key)
            .unwrap_or_else(|| panic!("the guest's report has no '{key}' line: {:#?}", self.0))
    }
}

/// The `key: value` lines the guest printed between the first pair of report markers.
pub fn report(console: &str) -> Report {
    let lines = tagged_lines(console, REPORT_TAG);
    let begin = lines
        .iter()
        .position(|l| l == "LAYERBOOT-REPORT-BEGIN")
        .unwrap_or_else(|| panic!("no report on the console:\n{}", tail(console, 80)));
    let end = lines[begin..]
        .iter()
        .position(|l| l == "LAYERBOOT-REPORT-END")
        .map(|e| begin + e)
        .expect("report not finished");
    Report(
        lines[begin + 1..end]
            .iter()
            .filter_map(|l| l.split_once(": "))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect(),
    )
}

/// The lines a program in the guest wrote to the console with `tag` in front, without it
/// (anything before the tag, such as a login prompt, is dropped).
pub fn tagged_lines(console: &str, tag: &str) -> Vec<String> {
    console_lines(console)
        .into_iter()
        .filter_map(|l| l.split_once(tag).map(|(_, rest)| rest.to_string()))
        .collect()
}

/// The console's text, with every kernel message that landed inside a program's line
/// taken out of it (see [`console_lines`]), and no carriage returns.
pub fn untangled(console: &str) -> String {
    console_lines(console).join("\n")
}

/// The console's lines, with every kernel message that landed inside a program's line
/// taken out of it and put before it.
///
/// A program's write goes through the serial driver's buffer, a few bytes per interrupt,
/// while the kernel writes its own messages to the port directly, whole. So a message
/// printed at that moment splits the program's line in two (`|lb| modu[   50.123456]
/// clocksource: …` then `les: …`), and the line's key is lost. A kernel message is never
/// split itself: one starting a line is left alone. (A program's line quoting a kernel
/// line would be cut too: no guest script here prints dmesg's lines whole.)
fn console_lines(console: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut cut: Option<String> = None; // the head of a line a kernel message split
    for piece in console.split('\n') {
        let mut line = cut.take().unwrap_or_default() + piece;
        if let Some(at) = (1..line.len()).find(|&i| line.is_char_boundary(i) && starts_kernel_message(&line[i..])) {
            if !starts_kernel_message(&line) {
                lines.push(line.split_off(at).trim_end_matches('\r').to_string());
                cut = Some(line);
                continue;
            }
        }
        lines.push(line.trim_end_matches('\r').to_string());
    }
    lines.extend(cut.map(|l| l.trim_end_matches('\r').to_string()));
    lines
}

/// Whether `text` starts with the kernel's time stamp, as in `[   12.578544] `.
fn starts_kernel_message(text: &str) -> bool {
    let Some(rest) = text.strip_prefix('[') else {
        return false;
    };
    let rest = rest.trim_start_matches(' ');
    let Some((seconds, rest)) = rest.split_once('.') else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    digits(seconds) && rest.len() >= 8 && digits(&rest[..6]) && rest[6..].starts_with("] ")
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

    #[test]
    fn a_kernel_message_inside_a_report_line_is_taken_out_of_it() {
        let console = "|lb| LAYERBOOT-REPORT-BEGIN\r\n|lb| tag: v2\r\n|lb| modu[   50.123456] clocksource: timekeeping watchdog\r\nles: ext4 virtio_blk\r\n\
                       [   51.000000] a kernel line of its own\r\n|lb| LAYERBOOT-REP[   52.000000] x\r\nORT-END\r\n";
        let r = super::report(console);
        assert_eq!(r["modules"], "ext4 virtio_blk");
        assert_eq!(r["tag"], "v2");
        assert_eq!(
            super::console_lines(console)[2..5],
            [
                "[   50.123456] clocksource: timekeeping watchdog",
                "|lb| modules: ext4 virtio_blk",
                "[   51.000000] a kernel line of its own"
            ]
        );
    }

    #[test]
    fn a_line_that_only_looks_like_a_time_stamp_is_left_alone() {
        let console = "|dp| [12.5] not a stamp\n|dp| a[ 1.123456]b\n[   12.578544] k [ 1.123456] quoted\n";
        assert_eq!(
            super::console_lines(console),
            [
                "|dp| [12.5] not a stamp",
                "|dp| a[ 1.123456]b",
                "[   12.578544] k [ 1.123456] quoted",
                ""
            ]
        );
    }

    #[test]
    fn a_report_value_with_backslashes_stays_on_its_line() {
        // The guest's /bin/sh is dash, as here; a loader's path in /proc/cmdline such as
        // `initrd=\layerboot\cc42…` once ended the cmdline line at its `\c`.
        let kv = super::REPORT
            .lines()
            .find(|l| l.starts_with("kv() "))
            .expect("the report defines kv");
        let script = format!("{kv}\nkv cmdline 'initrd=\\layerboot\\cc42\\n.img root=x'\nkv modules 'ext4'\n");
        let out = std::process::Command::new("/bin/sh")
            .args(["-c", &script])
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        assert_eq!(text, "cmdline: initrd=\\layerboot\\cc42\\n.img root=x\nmodules: ext4\n");
    }

    #[test]
    #[should_panic(expected = "the guest's report has no 'modules' line")]
    fn a_missing_report_line_is_named() {
        let _ = &super::report("|lb| LAYERBOOT-REPORT-BEGIN\n|lb| tag: v2\n|lb| LAYERBOOT-REPORT-END\n")["modules"];
    }
}
