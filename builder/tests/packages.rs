//! The packages (packaging/): the Debian package built from the release binaries passes
//! lintian and installs every file where the distributions' tools look for it; the Arch
//! PKGBUILD builds with makepkg (as an unprivileged user) into a package of the same
//! files. That the .deb, installed into an image's root, boots a machine is a VM test.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use layerboot_init::store::Store;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Where users' and distributions' tools look for each part.
const INSTALLED: &[&str] = &[
    "usr/bin/layerboot",
    "usr/lib/layerboot/layerboot-init",
    "usr/share/initramfs-tools/hooks/layerboot",
    "usr/share/initramfs-tools/scripts/layerboot",
    "usr/lib/dracut/modules.d/90layerboot/module-setup.sh",
    "usr/lib/dracut/modules.d/90layerboot/mount-layerboot.sh",
    "usr/lib/kernel/install.d/50-layerboot.install",
    "usr/lib/initcpio/hooks/layerboot",
    "usr/lib/initcpio/install/layerboot",
    "usr/share/doc/layerboot/README.md",
    "usr/share/man/man1/layerboot.1.gz",
];

/// The files (not directories) of a package listing, without a leading `./`.
fn files(listing: &str) -> BTreeSet<String> {
    listing
        .lines()
        .map(|l| l.trim_start_matches("./").to_string())
        .filter(|l| !l.is_empty() && !l.ends_with('/'))
        .collect()
}

#[test]
fn the_packaging_scripts_pass_shellcheck() {
    for script in [
        "packaging/deb/build",
        "packaging/arch/build-on-debian",
        "packaging/arch/PKGBUILD",
    ] {
        let out = Command::new("shellcheck")
            .args(["-s", "bash"])
            .arg(repo().join(script))
            .output()
            .expect("shellcheck (tests/setup-host.sh installs it)");
        assert!(
            out.status.success(),
            "{script}:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[test]
fn the_debian_package_installs_every_part_and_passes_lintian() {
    let out = tempfile::tempdir().unwrap();
    let deb = run(Command::new(repo().join("packaging/deb/build")).arg(out.path()));
    let deb = Path::new(deb.trim());
    assert!(
        deb.ends_with(format!("layerboot_{}_amd64.deb", env!("CARGO_PKG_VERSION"))),
        "{deb:?}"
    );

    let contents = run(Command::new("sh")
        .arg("-c")
        .arg(format!("dpkg-deb --fsys-tarfile '{}' | tar -t", deb.display())));
    let have = files(&contents);
    for f in INSTALLED.iter().chain(&[
        "usr/share/doc/layerboot/copyright",
        "usr/share/doc/layerboot/changelog.gz",
    ]) {
        assert!(have.contains(*f), "{f} missing from the .deb:\n{contents}");
    }
    // Executable where the tools run them; root-owned.
    let verbose = run(Command::new("dpkg-deb").arg("-c").arg(deb));
    for exe in [
        "usr/bin/layerboot",
        "usr/lib/layerboot/layerboot-init",
        "usr/share/initramfs-tools/hooks/layerboot",
        "usr/lib/kernel/install.d/50-layerboot.install",
    ] {
        let line = verbose.lines().find(|l| l.ends_with(&format!("./{exe}"))).unwrap();
        assert!(line.starts_with("-rwxr-xr-x root/root"), "{line}");
    }
    // No maintainer scripts: installing it runs nothing and changes no boot.
    let info = run(Command::new("dpkg-deb").arg("--info").arg(deb));
    assert!(
        !["postinst", "preinst", "triggers"].iter().any(|s| info.contains(s)),
        "{info}"
    );
    assert!(
        info.contains("Package: layerboot") && info.contains("Architecture: amd64"),
        "{info}"
    );

    // lintian: no error and no warning (each override in the package says why).
    let lint = Command::new("lintian")
        .args(["--fail-on", "error,warning", "--no-tag-display-limit"])
        .arg(deb)
        .output()
        .expect("lintian (tests/setup-host.sh installs it)");
    assert!(
        lint.status.success(),
        "lintian:\n{}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );

    // Installed, layerboot finds its layerboot-init in /usr/lib/layerboot/, not beside it.
    let root = tempfile::tempdir().unwrap();
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(root.path()));
    let image = std::env::var_os("LAYERBOOT_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/fixtures"))
        .join("mnt/btrfs/var/lib/docker");
    let image = Store::open(image).unwrap().resolve("layerboot/demo").unwrap();
    let initramfs = root.path().join("initramfs.img");
    let out = Command::new(root.path().join("usr/bin/layerboot"))
        .args(["initramfs", "--rootfs"])
        .arg(&image.layers[0].dir)
        .arg("-o")
        .arg(&initramfs)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Reproducible: the same inputs make the same bytes.
    let again = tempfile::tempdir().unwrap();
    let deb2 = run(Command::new(repo().join("packaging/deb/build")).arg(again.path()));
    assert_eq!(
        std::fs::read(deb).unwrap(),
        std::fs::read(deb2.trim()).unwrap(),
        "two builds differ"
    );
}

#[test]
fn the_arch_pkgbuild_builds_with_makepkg_into_the_same_files() {
    let out = tempfile::tempdir().unwrap();
    let pkg = run(Command::new(repo().join("packaging/arch/build-on-debian")).arg(out.path()));
    let pkg = pkg.trim();
    assert!(
        pkg.contains(&format!("layerboot-{}-1-x86_64.pkg.tar", env!("CARGO_PKG_VERSION"))),
        "{pkg}"
    );
    let contents = run(Command::new("bsdtar").arg("-tf").arg(pkg));
    let have = files(&contents);
    for f in INSTALLED.iter().chain(&[
        "usr/share/licenses/layerboot/LICENSE-MIT",
        "usr/share/licenses/layerboot/LICENSE-APACHE",
        ".PKGINFO",
    ]) {
        assert!(have.contains(*f), "{f} missing from the Arch package:\n{contents}");
    }
    let pkginfo = run(Command::new("bsdtar").arg("-xOf").arg(pkg).arg(".PKGINFO"));
    assert!(
        pkginfo.contains("pkgname = layerboot") && pkginfo.contains("arch = x86_64"),
        "{pkginfo}"
    );
    // What it built runs: the packaged layerboot finds the packaged layerboot-init.
    let root = tempfile::tempdir().unwrap();
    run(Command::new("bsdtar").arg("-xf").arg(pkg).arg("-C").arg(root.path()));
    let version = run(Command::new(root.path().join("usr/bin/layerboot")).arg("--version"));
    assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");
}
