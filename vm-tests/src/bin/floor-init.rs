//! The boot benchmark's floor: an initramfs `/init` that only marks when the kernel
//! started it (in the kernel log, so the console line carries the kernel's timestamp)
//! and powers off. Also the KVM probe's guest.

fn main() {
    use std::io::Write;
    if let Ok(mut kmsg) = std::fs::OpenOptions::new().write(true).open("/dev/kmsg") {
        let _ = kmsg.write_all(b"floor-init: started\n");
    }
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    loop {
        std::thread::sleep(std::time::Duration::from_secs(60));
    }
}
