//! `layerboot-init`: the initramfs's `/init`. Boots the image named on the kernel command
//! line (or baked into /etc/layerboot.json) from the container image store on the root
//! partition. The steps are in `boot.rs`; this file only guards PID 1.
//!
//! `layerboot-init --mount-root DIR` is the same inside another initramfs (the distro
//! hooks in `hooks/`): it makes the root at DIR and exits, 0 or 1 with the reason on
//! stderr, and that initramfs switches root (or drops to its shell).

use layerboot_init::boot::Boot;
use layerboot_init::console;
use layerboot_init::settings::{arg, DEFAULT_RESCUE_TIMEOUT_S, MAX_WAIT_S};
use std::time::Duration;

#[global_allocator]
static ALLOCATOR: layerboot_init::arena::BootAllocator = layerboot_init::arena::BootAllocator;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // systemd-shutdown runs our copy at /run/initramfs/shutdown as PID 1 (see shutdown.rs).
    if args.first().is_some_and(|a| layerboot_init::shutdown::is_shutdown(a)) {
        let verb = args.get(1).map_or("poweroff", String::as_str).to_string();
        std::panic::set_hook(Box::new(move |info| {
            console::say(&format!("layerboot: shutdown: internal error: {info}"));
            nix::sys::reboot::reboot(layerboot_init::shutdown::after_panic(&verb)).ok();
        }));
        layerboot_init::shutdown::run(args.get(1).map_or("poweroff", String::as_str));
    }
    let run_dir = std::path::Path::new(layerboot_init::deadline::RUN_DIR);
    match args.get(1).map(String::as_str) {
        // The post-switch helper /init leaves behind (after_switch.rs).
        Some(layerboot_init::after_switch::FLAG) => layerboot_init::after_switch::run(&args[2..]),
        // The bless unit, once the boot is good: a good boot stops the deadline even when
        // the loader's mark cannot be written (that boot then stays counted, as it says).
        Some("--bless") => {
            // First: the bless may wait for the ESP's lock, and the boot is good already.
            let _ = layerboot_init::deadline::stand_down(run_dir, "the boot is good (bless unit)");
            let blessed = layerboot_init::bless::run();
            match blessed {
                Ok(said) => console::say(&said),
                Err(e) => {
                    console::say(&format!("layerboot: cannot bless this boot: {e}"));
                    std::process::exit(1);
                }
            }
            std::process::exit(0);
        }
        // The shutdown's unit: a shutdown someone asked for stays what it is.
        Some("--stand-down") => {
            let reason = args.get(2).map_or("stopped", String::as_str);
            if let Err(e) = layerboot_init::deadline::stand_down(run_dir, reason) {
                console::say(&format!("layerboot: cannot stop the reboot deadline: {e}"));
                std::process::exit(1);
            }
            std::process::exit(0);
        }
        // Emergency and rescue mode's drop-in: when the machine reboots, and how to stay.
        Some("--deadline-notice") => {
            let now =
                nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(Duration::ZERO, Duration::from);
            let counts = std::path::Path::new(&format!(
                "/sys/firmware/efi/efivars/{}",
                layerboot_init::bless::loader_variable_name("LoaderBootCountPath")
            ))
            .exists();
            if let Some(notice) = layerboot_init::deadline::notice_from(run_dir, now, counts) {
                console::say(&notice);
            }
            std::process::exit(0);
        }
        _ => {}
    }
    if args.get(1).map(String::as_str) == Some("--mount-root") {
        let Some(target) = args.get(2).filter(|t| t.starts_with('/')) else {
            console::usage("usage: layerboot-init --mount-root /ABSOLUTE/DIR (the directory the initramfs switches to, e.g. ${rootmnt})");
        };
        match Boot::hosted(std::path::Path::new(target)).mount_root() {
            Ok(_) => std::process::exit(0),
            Err(e) => {
                console::say(&console::failure_text(e.message()));
                std::process::exit(1);
            }
        }
    }
    if std::process::id() != 1 {
        console::usage(
            "layerboot-init is an initramfs's /init: it must run as PID 1 at boot (it mounts, \
             snapshots and switches root). To look into a store from a running system, use `layerboot inspect`.",
        );
    }
    let default_wait = Duration::from_secs(DEFAULT_RESCUE_TIMEOUT_S);
    // A panic must not kill PID 1 (a kernel panic): report it like any failure.
    std::panic::set_hook(Box::new(move |info| {
        let cmdline = layerboot_init::boot::cmdline();
        let wait = raw_rescue_timeout(&cmdline).unwrap_or(default_wait);
        let shell = cmdline.get(arg::RESCUE).is_some_and(|v| v == "shell");
        console::fail(&format!("internal error: {info}"), wait, shell)
    }));
    let mut boot = Boot::new();
    let err = match boot.run() {
        Err(e) => e,
        Ok(never) => match never {},
    };
    // Settings may be missing (a bad command line): fall back to reading it raw.
    let cmdline = layerboot_init::boot::cmdline();
    let raw_wait = raw_rescue_timeout(&cmdline);
    let wait = boot
        .settings
        .as_ref()
        .map(|s| s.rescue_timeout)
        .or(raw_wait)
        .unwrap_or(default_wait);
    let shell = cmdline.get(arg::RESCUE).is_some_and(|v| v == "shell");
    console::fail(err.message(), wait, shell)
}

/// `layerboot.rescue_timeout=` read raw (the settings may have failed), bounded as the
/// settings bound it: an unbounded value would overflow the deadline, a panic in PID 1.
fn raw_rescue_timeout(cmdline: &std::collections::BTreeMap<String, String>) -> Option<Duration> {
    cmdline
        .get(arg::RESCUE_TIMEOUT)
        .and_then(|v| v.parse::<u64>().ok())
        .map(|s| Duration::from_secs(s.min(MAX_WAIT_S)))
}
