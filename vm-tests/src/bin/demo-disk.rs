//! Makes the demo's disk: GPT, an ESP with systemd-boot, the image's kernel, the layerboot
//! initramfs and a BLS entry from `layerboot entry`, and the btrfs store partition with a
//! top layer that logs root in on the serial console. Used by tests/demo.
//!
//!     demo-disk OUT_DISK STORE_FS_COPY KERNEL INITRAMFS

use std::fs;
use std::path::PathBuf;

use vm_tests::disk::{gpt_disk, EspFiles, Loader};
use vm_tests::LoopMount;

const MOTD: &str = "
This machine booted through UEFI and systemd-boot from the Docker image layerboot/demo,
straight from the image store on its disk (btrfs driver). / is a fresh snapshot of the
image, made at this boot:
  findmnt /                         the writable layer, a btrfs subvolume
  cat /run/layerboot/booted.json    which image and layer booted
  ls /run/layerboot/store           the store partition
Anything you write is gone at the next boot. `poweroff` ends the demo.

";

fn main() {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [disk, store, kernel, initramfs] = &args[..] else {
        eprintln!("usage: demo-disk OUT_DISK STORE_FS_COPY KERNEL INITRAMFS");
        std::process::exit(2);
    };
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
    }
    gpt_disk(
        disk,
        store,
        &EspFiles {
            loader: Loader::SystemdBoot,
            kernel,
            initramfs,
            images: &["layerboot/demo"],
            options: "console=ttyS0",
            root: "PARTLABEL=store",
            toplayer: Some(("PARTLABEL=store", "/toplayer")),
        },
    );
}
