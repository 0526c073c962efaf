//! Disks as users have them: GPT with an EFI system partition (the image's kernel, the
//! layerboot initramfs, a real boot loader from Debian's packages and its entry written
//! by `layerboot entry`) and a store partition holding a copy of a fixture store's
//! filesystem. Built without mounting the ESP (mtools) and cached under target/.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{layerboot, repo, run};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loader {
    SystemdBoot,
    Grub,
    Refind,
}

impl Loader {
    pub fn name(self) -> &'static str {
        match self {
            Loader::SystemdBoot => "systemd-boot",
            Loader::Grub => "grub",
            Loader::Refind => "refind",
        }
    }

    fn package(self) -> &'static str {
        match self {
            Loader::SystemdBoot => "systemd-boot-efi",
            // The monolithic, signed GRUB: a real grubx64.efi with every module built in,
            // reading $prefix/grub.cfg = /EFI/debian/grub.cfg on the ESP.
            Loader::Grub => "grub-efi-amd64-signed",
            Loader::Refind => "refind",
        }
    }

    /// The loader's EFI program inside its unpacked package.
    fn efi(self) -> &'static str {
        match self {
            Loader::SystemdBoot => "usr/lib/systemd/boot/efi/systemd-bootx64.efi",
            Loader::Grub => "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed",
            Loader::Refind => "usr/share/refind/refind/refind_x64.efi",
        }
    }
}

/// The loader's package from Debian's archive, unpacked with `dpkg-deb -x` (never
/// installed on the host), cached under target/vm-tests/loaders.
pub fn unpacked_loader(loader: Loader) -> PathBuf {
    // Tests run in parallel, and two that need the same loader on a fresh machine would
    // each empty the other's download and unpack directories.
    static UNPACKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = UNPACKING.lock().unwrap_or_else(|e| e.into_inner());
    let dir = repo().join("target/vm-tests/loaders").join(loader.package());
    if dir.join(loader.efi()).exists() {
        return dir;
    }
    let dl = dir.with_extension("download");
    let _ = fs::remove_dir_all(&dl);
    fs::create_dir_all(&dl).unwrap();
    run(Command::new("apt-get")
        .args(["download", "-q", loader.package()])
        .current_dir(&dl));
    let deb = fs::read_dir(&dl)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .unwrap();
    let tmp = dir.with_extension("tmp");
    let _ = fs::remove_dir_all(&tmp);
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp));
    let _ = fs::remove_dir_all(&dir);
    fs::rename(&tmp, &dir).unwrap();
    dir
}

pub struct EspFiles<'a> {
    pub loader: Loader,
    pub kernel: &'a Path,
    pub initramfs: &'a Path,
    /// Images to make entries for; the first is the default.
    pub images: &'a [&'a str],
    /// Kernel arguments besides those `layerboot entry` writes (`console=ttyS0 …`).
    pub options: &'a str,
    pub root: &'a str,
    pub toplayer: Option<(&'a str, &'a str)>,
}

const ESP_MIB: u64 = 128;
/// The store partition's PARTUUID, fixed so entries can name it.
pub const STORE_PARTUUID: &str = "6c0ad6b0-5d1f-4a43-9f52-1a7e2b0c3d4e";
const MIB: u64 = 1 << 20;

/// Writes `disk`: GPT, partition 1 the ESP (`ESP_MIB`), partition 2 `store_fs` copied in.
pub fn gpt_disk(disk: &Path, store_fs: &Path, esp: &EspFiles) {
    let work = disk.with_extension("parts");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).unwrap();
    let esp_img = work.join("esp.img");
    make_esp(&esp_img, &work, esp);
    assemble(disk, store_fs, &esp_img, &work);
}

/// Writes `disk` with an ESP holding the files of `tree` (as `layerboot deploy` left
/// them) and `loader`, its menu without a timeout or a fixed default: systemd-boot reads
/// the entries, GRUB's grub.cfg sources layerboot's snippet (as the README says to).
pub fn gpt_disk_with_esp_tree(disk: &Path, store_fs: &Path, tree: &Path, loader: Loader) {
    let work = disk.with_extension("parts");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).unwrap();
    let img = work.join("esp.img");
    fs::File::create(&img).unwrap().set_len(ESP_MIB * MIB).unwrap();
    run(Command::new("mkfs.vfat").args(["-F", "32", "-n", "ESP"]).arg(&img));
    let i = img.to_str().unwrap().to_string();
    for d in ["/EFI", "/EFI/BOOT"] {
        run(Command::new("mmd").args(["-i", &i, d]));
    }
    let efi = unpacked_loader(loader).join(loader.efi());
    run(Command::new("mcopy")
        .args(["-i", &i])
        .arg(&efi)
        .arg("::/EFI/BOOT/BOOTX64.EFI"));
    for e in fs::read_dir(tree).unwrap() {
        run(Command::new("mcopy")
            .args(["-s", "-i", &i])
            .arg(e.unwrap().path())
            .arg("::/"));
    }
    let (conf, text, dest) = match loader {
        Loader::Grub => {
            run(Command::new("mmd").args(["-i", &i, "/EFI/debian"]));
            (
                work.join("grub.cfg"),
                "serial --unit=0 --speed=115200\nterminal_output serial\nterminal_input serial\nset timeout=0\n\
                 source /layerboot/grub.cfg\n",
                "::/EFI/debian/grub.cfg",
            )
        }
        _ => (
            work.join("loader.conf"),
            "timeout 0\nconsole-mode keep\n",
            "::/loader/loader.conf",
        ),
    };
    fs::write(&conf, text).unwrap();
    run(Command::new("mcopy").args(["-o", "-i", &i]).arg(&conf).arg(dest));
    assemble(disk, store_fs, &img, &work);
}

/// The ESP partition of a disk `gpt_disk*` wrote, copied out as the image `img`.
pub fn esp_image(disk: &Path, img: &Path) {
    run(Command::new("dd")
        .arg(format!("if={}", disk.display()))
        .arg(format!("of={}", img.display()))
        .args(["bs=1M", "skip=1", "status=none"])
        .arg(format!("count={ESP_MIB}")));
}

/// The ESP of a disk `gpt_disk*` wrote, copied out into the directory `out`.
pub fn esp_tree(disk: &Path, out: &Path) {
    let img = out.with_extension("esp.img");
    esp_image(disk, &img);
    let _ = fs::remove_dir_all(out);
    fs::create_dir_all(out).unwrap();
    run(Command::new("mcopy")
        .args(["-s", "-n", "-i"])
        .arg(&img)
        .arg("::/")
        .arg(out));
    fs::remove_file(&img).unwrap();
}

fn assemble(disk: &Path, store_fs: &Path, esp_img: &Path, work: &Path) {
    let store_len = fs::metadata(store_fs).unwrap().len();
    let store_start = 1 + ESP_MIB; // MiB
    let total = (store_start * MIB) + store_len + MIB;
    let _ = fs::remove_file(disk);
    fs::File::create(disk).unwrap().set_len(total).unwrap();
    let table = format!(
        "label: gpt\nstart=2048, size={}, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=esp\nstart={}, size={}, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=store, uuid={STORE_PARTUUID}\n",
        ESP_MIB * MIB / 512,
        store_start * MIB / 512,
        store_len / 512
    );
    sfdisk(disk, &table);
    dd(esp_img, disk, MIB);
    dd(store_fs, disk, store_start * MIB);
    let _ = fs::remove_dir_all(work);
}

fn sfdisk(disk: &Path, table: &str) {
    use std::io::Write;
    let mut child = Command::new("sfdisk")
        .arg("-q")
        .arg(disk)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(table.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "sfdisk {}", disk.display());
}

fn dd(src: &Path, disk: &Path, offset: u64) {
    run(Command::new("dd")
        .arg(format!("if={}", src.display()))
        .arg(format!("of={}", disk.display()))
        .args(["bs=1M", "conv=notrunc,sparse", "status=none"])
        .arg(format!("seek={}", offset / MIB)));
}

/// The ESP as a vfat image, filled with mtools.
fn make_esp(img: &Path, work: &Path, e: &EspFiles) {
    fs::File::create(img).unwrap().set_len(ESP_MIB * MIB).unwrap();
    run(Command::new("mkfs.vfat").args(["-F", "32", "-n", "ESP"]).arg(img));
    let i = img.to_str().unwrap().to_string();
    let mmd = |d: &str| run(Command::new("mmd").args(["-i", &i, d]));
    let mcopy = |src: &Path, dest: &str| {
        run(Command::new("mcopy")
            .args(["-o", "-i", &i])
            .arg(src)
            .arg(format!("::{dest}")))
    };
    for d in ["/EFI", "/EFI/BOOT", "/layerboot"] {
        mmd(d);
    }
    let loader_dir = unpacked_loader(e.loader);
    mcopy(&loader_dir.join(e.loader.efi()), "/EFI/BOOT/BOOTX64.EFI");
    let kname = e.kernel.file_name().unwrap().to_str().unwrap();
    mcopy(e.kernel, &format!("/layerboot/{kname}"));
    mcopy(e.initramfs, "/layerboot/initramfs.img");

    let mut args: Vec<String> = vec!["entry".into(), "--loader".into(), e.loader.name().into()];
    for img in e.images {
        args.extend(["--image".into(), img.to_string()]);
    }
    args.extend([
        "--kernel".into(),
        format!("/layerboot/{kname}"),
        "--initrd".into(),
        "/layerboot/initramfs.img".into(),
        "--root".into(),
        e.root.into(),
        "--options".into(),
        e.options.into(),
    ]);
    if let Some((dev, path)) = e.toplayer {
        args.extend(["--toplayer".into(), dev.into(), "--toplayer-path".into(), path.into()]);
    }
    match e.loader {
        Loader::SystemdBoot => {
            let entries = work.join("entries");
            args.extend(["-o".into(), entries.display().to_string()]);
            // It prints the files it wrote, one per image, in the order given.
            let written = run(layerboot().args(&args));
            let default = Path::new(written.lines().next().unwrap())
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .to_string();
            mmd("/loader");
            mmd("/loader/entries");
            let mut names: Vec<PathBuf> = fs::read_dir(&entries).unwrap().map(|d| d.unwrap().path()).collect();
            names.sort();
            for p in &names {
                mcopy(
                    p,
                    &format!("/loader/entries/{}", p.file_name().unwrap().to_str().unwrap()),
                );
            }
            let conf = work.join("loader.conf");
            fs::write(&conf, format!("default {default}\ntimeout 0\nconsole-mode keep\n")).unwrap();
            mcopy(&conf, "/loader/loader.conf");
        }
        Loader::Grub => {
            let cfg = work.join("grub.cfg");
            args.extend(["-o".into(), cfg.display().to_string()]);
            run(layerboot().args(&args));
            let entries = fs::read_to_string(&cfg).unwrap();
            // Serial console for the firmware-to-kernel part, the first entry at once.
            fs::write(&cfg, format!("serial --unit=0 --speed=115200\nterminal_output serial\nterminal_input serial\nset timeout=0\nset default=0\n\n{entries}")).unwrap();
            mmd("/EFI/debian");
            mcopy(&cfg, "/EFI/debian/grub.cfg");
        }
        Loader::Refind => {
            let stanzas = work.join("manual.conf");
            args.extend(["-o".into(), stanzas.display().to_string()]);
            run(layerboot().args(&args));
            let conf = work.join("refind.conf");
            let body = fs::read_to_string(&stanzas).unwrap();
            fs::write(
                &conf,
                format!("timeout -1\ntextonly\nscanfor manual\ndefault_selection 1\n\n{body}"),
            )
            .unwrap();
            mcopy(&conf, "/EFI/BOOT/refind.conf");
        }
    }
}
