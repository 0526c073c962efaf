//! The distro hooks in `hooks/`: every script passes shellcheck; mkinitcpio's build
//! function and runtime hook run under a small harness of mkinitcpio's own functions
//! (mkinitcpio is not in Debian); the kernel-install plugin builds an initramfs from a
//! real image root. initramfs-tools' hook and dracut's module are booted for real in vm-tests.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use layerboot_init::store::Store;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn hook(rel: &str) -> String {
    repo().join("hooks").join(rel).display().to_string()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The static layerboot-init that `cargo build --release` puts beside layerboot.
fn init_binary() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_layerboot")).with_file_name("layerboot-init")
}

#[test]
fn every_hook_script_passes_shellcheck() {
    for (shell, rel) in [
        ("bash", "mkinitcpio/install/layerboot"),
        ("dash", "mkinitcpio/hooks/layerboot"),
        ("sh", "initramfs-tools/hooks/layerboot"),
        ("sh", "initramfs-tools/scripts/layerboot"),
        ("sh", "kernel-install/50-layerboot.install"),
        ("bash", "dracut/90layerboot/module-setup.sh"),
        ("sh", "dracut/90layerboot/mount-layerboot.sh"),
    ] {
        let out = Command::new("shellcheck")
            .args(["-s", shell, &hook(rel)])
            .output()
            .expect("shellcheck (tests/setup-host.sh installs it)");
        assert!(out.status.success(), "{rel}:\n{}", text(&out));
    }
}

/// mkinitcpio's functions, recording what the hook asks for.
const MKINITCPIO_HARNESS: &str = r#"
add_binary() { echo "binary $1 -> $2"; }
add_module() { echo "module $1"; }
add_file() { echo "file $1"; }
add_runscript() { echo "runscript"; }
error() { echo "ERROR: $*" >&2; }
"#;

#[test]
fn mkinitcpio_install_hook_packs_init_and_filesystems_and_refuses_without_init() {
    let script = format!(
        "{MKINITCPIO_HARNESS}\n. '{}'\nbuild",
        hook("mkinitcpio/install/layerboot")
    );
    let out = Command::new("bash")
        .args(["-c", &script])
        .env("LAYERBOOT_INIT", init_binary())
        .output()
        .unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains(&format!(
            "binary {} -> /usr/lib/layerboot/layerboot-init",
            init_binary().display()
        )),
        "{t}"
    );
    for m in ["module btrfs", "module overlay", "runscript"] {
        assert!(t.contains(m), "{m} missing:\n{t}");
    }
    let out = Command::new("bash")
        .args(["-c", &script])
        .env("LAYERBOOT_INIT", "/nonexistent/layerboot-init")
        .output()
        .unwrap();
    let t = text(&out);
    assert!(
        !out.status.success() && t.contains("ERROR: layerboot: /nonexistent/layerboot-init is missing"),
        "{t}"
    );
}

#[test]
fn mkinitcpio_runtime_hook_hands_mounting_the_root_to_layerboot() {
    // The handler runs /usr/lib/layerboot/layerboot-init --mount-root; here it is not
    // installed, so the failure path shows: mkinitcpio's err and its rescue shell.
    let script = format!(
        "err() {{ echo \"ERR: $*\"; }}\nlaunch_interactive_shell() {{ echo SHELL; }}\n. '{}'\nrun_hook\necho \"handler=$mount_handler\"\n\"$mount_handler\" /new_root",
        hook("mkinitcpio/hooks/layerboot")
    );
    let out = Command::new("busybox").args(["ash", "-c", &script]).output().unwrap();
    let t = text(&out);
    assert!(t.contains("handler=layerboot_mount_handler"), "{t}");
    assert!(
        t.contains("ERR: layerboot could not make the root filesystem") && t.contains("SHELL"),
        "{t}"
    );
    // And layerboot-init's --mount-root mode says what it wants when misused.
    let out = Command::new(init_binary())
        .args(["--mount-root", "relative"])
        .output()
        .unwrap();
    assert!(
        !out.status.success() && text(&out).contains("usage: layerboot-init --mount-root /ABSOLUTE/DIR"),
        "{}",
        text(&out)
    );
}

/// Runs the kernel-install plugin as `kernel-install add KVER` does, on `rootfs`, with
/// `booted` as the running boot's record; returns its output and the staged initrd.
fn kernel_install_add(rootfs: &Path, kver: &str, booted: &Path) -> (Output, Option<Vec<u8>>) {
    let staging = tempfile::tempdir().unwrap();
    let out = Command::new(hook("kernel-install/50-layerboot.install"))
        .args(["add", kver, "/boot/vmlinuz"])
        .env("KERNEL_INSTALL_STAGING_AREA", staging.path())
        .env("KERNEL_INSTALL_VERBOSE", "1")
        .env("LAYERBOOT", env!("CARGO_BIN_EXE_layerboot"))
        .env("LAYERBOOT_ROOTFS", rootfs)
        .env("LAYERBOOT_BOOTED", booted)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    (out, fs::read(staging.path().join("initrd")).ok())
}

/// `dir` mounted as an overlay of `lower` with `files` added (the fixture's image tree is
/// never written); unmounted on drop.
struct OverlayRoot(PathBuf, #[allow(dead_code)] tempfile::TempDir);

impl OverlayRoot {
    fn new(lower: &Path, files: &[(&str, &str)]) -> OverlayRoot {
        let t = tempfile::tempdir().unwrap();
        let (upper, work, merged) = (t.path().join("upper"), t.path().join("work"), t.path().join("merged"));
        for (path, content) in files {
            let dest = upper.join(path);
            fs::create_dir_all(dest.parent().unwrap()).unwrap();
            fs::write(dest, content).unwrap();
        }
        for d in [&upper, &work, &merged] {
            fs::create_dir_all(d).unwrap();
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        let out = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &opts])
            .arg(&merged)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        OverlayRoot(merged, t)
    }
}

impl Drop for OverlayRoot {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn kernel_install_plugin_builds_the_initramfs_only_once_configured() {
    // A real image root: the btrfs fixture's top subvolume holds the demo image's tree.
    let root = std::env::var_os("LAYERBOOT_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/fixtures"))
        .join("mnt/btrfs/var/lib/docker");
    let image = Store::open(root).unwrap().resolve("layerboot/demo").unwrap();
    let rootfs = image.layers[0].dir.clone();
    let kver = fs::read_dir(rootfs.join("lib/modules"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .file_name()
        .into_string()
        .unwrap();
    let not_booted = Path::new("/nonexistent/booted.json");

    // Installed but not configured: the distribution's own initrd stays.
    let (out, initrd) = kernel_install_add(&rootfs, &kver, not_booted);
    assert!(initrd.is_none(), "{}", text(&out));
    assert!(text(&out).contains("not configured"), "{}", text(&out));

    // Configured by /etc/layerboot.json: it builds, with the root's defaults.
    let configured = OverlayRoot::new(
        &rootfs,
        &[(
            "etc/layerboot.json",
            r#"{"defaults": {"docker_image": "layerboot/demo:v2"}}"#,
        )],
    );
    let (out, initrd) = kernel_install_add(&configured.0, &kver, not_booted);
    let data = initrd.unwrap_or_else(|| panic!("no initrd: {}", text(&out)));
    assert_eq!(&data[..6], b"070701", "layerboot's initramfs (a newc archive)");
    assert!(
        text(&out).contains(&format!("kernel {kver}")) && text(&out).contains("default image layerboot/demo:v2"),
        "{}",
        text(&out)
    );

    // mkinitcpio-docker-hooks' config alone switches it on too, and names the image.
    let old = OverlayRoot::new(
        &rootfs,
        &[(
            "etc/docker-btrfs.json",
            r#"{"docker_image": "layerboot/demo", "docker_tag": "v2"}"#,
        )],
    );
    let (out, initrd) = kernel_install_add(&old.0, &kver, not_booted);
    assert!(
        initrd.is_some() && text(&out).contains("default image layerboot/demo:v2, from /etc/docker-btrfs.json"),
        "{}",
        text(&out)
    );

    // On a machine booted by layerboot, kernels come with deployments.
    let booted = tempfile::NamedTempFile::new().unwrap();
    let (out, initrd) = kernel_install_add(&configured.0, &kver, booted.path());
    assert!(
        initrd.is_none() && text(&out).contains("layerboot deploy"),
        "{}",
        text(&out)
    );

    // An older kernel-install names the entry directory instead; remove deletes it.
    let entry = tempfile::tempdir().unwrap();
    fs::write(entry.path().join("initrd"), "old").unwrap();
    let out = Command::new(hook("kernel-install/50-layerboot.install"))
        .arg("remove")
        .arg(&kver)
        .arg(entry.path())
        .env("LAYERBOOT_ROOTFS", &configured.0)
        .env("LAYERBOOT_BOOTED", not_booted)
        .output()
        .unwrap();
    assert!(
        out.status.success() && !entry.path().join("initrd").exists(),
        "{}",
        text(&out)
    );
}
