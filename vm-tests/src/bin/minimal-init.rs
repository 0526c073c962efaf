//! The boot benchmark's minimal initramfs `/init`: the least any initramfs must do to
//! boot the exported root on this kernel, and nothing more. It loads the modules named in
//! /modules (one per line, dependencies first, as /lib/modules/NAME.ko), waits for
//! /dev/vda, mounts it read-only with the type in /fstype, and switches to its
//! /sbin/init. No device discovery, no module index, no store, no checks: a lower bound
//! for the benchmark, not a boot path anyone should use.

use std::ffi::CString;
use std::fs::{self, File};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};
use nix::mount::{mount, MsFlags};
use nix::unistd::{chdir, chroot, execv};

fn fail(what: &str) -> ! {
    if let Ok(mut kmsg) = fs::OpenOptions::new().write(true).open("/dev/kmsg") {
        let _ = writeln!(kmsg, "minimal-init: {what}");
    }
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

fn main() {
    if let Err(e) = mount(
        Some("devtmpfs"),
        "/dev",
        Some("devtmpfs"),
        MsFlags::empty(),
        None::<&str>,
    ) {
        fail(&format!("cannot mount /dev: {e}"));
    }
    let modules = fs::read_to_string("/modules").unwrap_or_else(|e| fail(&format!("cannot read /modules: {e}")));
    for name in modules.lines() {
        let path = format!("/lib/modules/{name}.ko");
        let file = File::open(&path).unwrap_or_else(|e| fail(&format!("cannot open {path}: {e}")));
        match finit_module(&file, c"", ModuleInitFlags::empty()) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => fail(&format!("cannot load {name}: {e}")),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !Path::new("/dev/vda").exists() {
        if Instant::now() > deadline {
            fail("no /dev/vda after 30 s");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let fstype = fs::read_to_string("/fstype").unwrap_or_else(|e| fail(&format!("cannot read /fstype: {e}")));
    let _ = fs::create_dir("/root");
    if let Err(e) = mount(
        Some("/dev/vda"),
        "/root",
        Some(fstype.trim()),
        MsFlags::MS_RDONLY,
        None::<&str>,
    ) {
        fail(&format!("cannot mount /dev/vda ({}): {e}", fstype.trim()));
    }
    // switch_root without deleting the initramfs (that would only add time).
    let switched = chdir("/root")
        .and_then(|_| mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>))
        .and_then(|_| chroot("."))
        .and_then(|_| chdir("/"));
    if let Err(e) = switched {
        fail(&format!("cannot switch to /root: {e}"));
    }
    let init = CString::new("/sbin/init").unwrap();
    let e = execv(&init, &[&init]).unwrap_err();
    fail(&format!("cannot run /sbin/init: {e}"))
}
