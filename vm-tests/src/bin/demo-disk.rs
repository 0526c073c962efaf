//! Makes the demo's disk: GPT, an ESP with systemd-boot and the deployment `layerboot
//! deploy` wrote into ESP_TREE (the image's kernel, its initramfs, a counted entry), and
//! the btrfs store partition with a top layer that logs root in on the serial console,
//! mounts the ESP at /efi and carries `layerboot`, so the machine manages its own
//! deployments. Used by tests/demo.
//!
//!     demo-disk OUT_DISK STORE_FS_COPY ESP_TREE

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use vm_tests::disk::{gpt_disk_with_esp_tree, Loader};
use vm_tests::LoopMount;

const MOTD: &str = "
This machine booted through UEFI and systemd-boot from the Docker image layerboot/demo,
deployed by `layerboot deploy`, straight from the image store on its disk (btrfs
driver). / is a fresh snapshot of the image, made at this boot:
  findmnt /                            the writable layer, a btrfs subvolume
  cat /run/layerboot/booted.json       which image and layer booted
  layerboot status                     the deployments: which runs, which boots next
  layerboot deploy layerboot/demo:v2   deploy another image of the store (then reboot)
  layerboot rollback                   the previous deployment boots next
Anything you write is gone at the next boot. `poweroff` ends the demo.

";

fn main() {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [disk, store, esp_tree] = &args[..] else {
        eprintln!("usage: demo-disk OUT_DISK STORE_FS_COPY ESP_TREE");
        std::process::exit(2);
    };
    let bin = std::env::current_exe().unwrap();
    let release = bin.parent().unwrap();
    {
        let mnt = disk.with_extension("mnt");
        let _m = LoopMount::new(store, &mnt, false);
        let top = mnt.join("toplayer");
        let getty = top.join("etc/systemd/system/serial-getty@ttyS0.service.d");
        fs::create_dir_all(&getty).unwrap();
        fs::write(top.join("etc/hostname"), "layerboot-demo\n").unwrap();
        fs::write(
            getty.join("autologin.conf"),
            "[Service]\nExecStart=\nExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200,57600,38400,9600 %I $TERM\n",
        )
        .unwrap();
        fs::write(top.join("etc/motd"), MOTD).unwrap();
        // The image's own fstab plus the ESP, where `layerboot` finds the deployments.
        fs::create_dir_all(top.join("efi")).unwrap();
        fs::write(top.join("etc/fstab"), "LABEL=ESP /efi vfat umask=0077 0 0\n").unwrap();
        let local = top.join("usr/local/bin");
        fs::create_dir_all(&local).unwrap();
        for b in ["layerboot", "layerboot-init"] {
            let from = release.join(b);
            let to = local.join(b);
            fs::copy(&from, &to).unwrap_or_else(|e| panic!("{}: {e} (cargo build --release first)", from.display()));
            fs::set_permissions(&to, fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    gpt_disk_with_esp_tree(disk, store, esp_tree, Loader::SystemdBoot);
}
