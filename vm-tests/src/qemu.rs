//! QEMU runs: the accelerator probe, the floor boot the benchmark measures against, and
//! [`Qemu`], which boots disks with a kernel command line and captures the serial console.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::{demo_boot_files, repo, BootFiles};

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
    drive(cmd, None, None, Some(marker), timeout).time_of(marker)
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

impl Outcome {
    /// The kernel's timestamp of `marker`'s line, wherever the run ended: a guest that
    /// powers off at once (the floor) may exit before the poll sees its marker, and the
    /// whole console is read after QEMU's end.
    fn time_of(&self, marker: &str) -> Option<f64> {
        kernel_timestamp(&self.console, marker)
    }
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
    let mut polls = 0u64;
    while start.elapsed() < timeout {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            outcome.exited = Some((status, err));
            break;
        }
        let text = console.lock().unwrap();
        // A kernel message can land inside a program's line and split a prompt; the
        // console untangled (a scan of all of it) is looked at twice a second.
        polls += 1;
        let untangled = polls.is_multiple_of(50).then(|| crate::untangled(&text));
        let shows = |m: &str| text.contains(m) || untangled.as_ref().is_some_and(|u| u.contains(m));
        if let (Some((trigger, reply)), Some(input)) = (answer, stdin.as_mut()) {
            if shows(trigger) {
                let _ = input.write_all(reply.as_bytes());
                stdin = None; // answered once; closing stdin is harmless to QEMU
            }
        }
        if stop_at.is_some_and(shows) {
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
    // The marker may show before its line is complete; the stamp comes first anyway.
    drive(q.command(), Some(&q.log), q.answer, Some(marker), q.timeout).time_of(marker)
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
    /// returns the serial console's text, which is also kept in `log` as it came; the text
    /// returned has the kernel's messages taken out of the programs' lines they split
    /// (see [`crate::untangled`]), so a test can look for a program's line whole.
    pub fn run(&self) -> String {
        let o = drive(
            self.command(),
            Some(&self.log),
            self.answer,
            self.cut_power_at,
            self.timeout,
        );
        match (o.stopped_at, o.exited) {
            (Some(_), _) => crate::untangled(&o.console),
            (None, Some((status, err))) => {
                assert!(
                    status.success(),
                    "qemu failed ({status}): {err}\nconsole:\n{}",
                    tail(&o.console, 40)
                );
                crate::untangled(&o.console)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The floor's race: the guest prints its marker and is gone before the first poll.
    #[test]
    fn a_marker_printed_just_before_the_guest_exits_is_still_timed() {
        for _ in 0..20 {
            let mut cmd = Command::new("sh");
            cmd.args(["-c", "printf '[    1.500000] floor-init: started\\n'"]);
            let o = drive(cmd, None, None, Some("floor-init: started"), Duration::from_secs(10));
            assert_eq!(o.time_of("floor-init: started"), Some(1.5), "{:?}", o.console);
        }
    }
}
