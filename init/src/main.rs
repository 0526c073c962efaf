//! `layerboot-init`: the initramfs's `/init`. Boots the image named on the kernel command
//! line (or baked into /etc/layerboot.json) from the container image store on the root
//! partition. The steps are in `boot.rs`; this file only guards PID 1.

use layerboot_init::boot::Boot;
use layerboot_init::console;
use layerboot_init::settings::DEFAULT_RESCUE_TIMEOUT_S;
use std::time::Duration;

fn main() {
    if std::process::id() != 1 {
        eprintln!(
            "layerboot-init is an initramfs's /init: it must run as PID 1 at boot (it mounts, \
             snapshots and switches root). To look into a store from a running system, use `layerboot inspect`."
        );
        std::process::exit(2);
    }
    let default_wait = Duration::from_secs(DEFAULT_RESCUE_TIMEOUT_S);
    // A panic must not kill PID 1 (a kernel panic): report it like any failure.
    std::panic::set_hook(Box::new(move |info| {
        let cmdline = layerboot_init::boot::cmdline();
        let wait = cmdline.get("layerboot.rescue_timeout").and_then(|v| v.parse().ok()).map_or(default_wait, Duration::from_secs);
        let shell = cmdline.get("layerboot.rescue").is_some_and(|v| v == "shell");
        console::fail(&format!("internal error: {info}"), wait, shell)
    }));
    let mut boot = Boot::new();
    let err = match boot.run() {
        Err(e) => e,
        Ok(never) => match never {},
    };
    // Settings may be missing (a bad command line): fall back to reading it raw.
    let cmdline = layerboot_init::boot::cmdline();
    let raw_wait = cmdline.get("layerboot.rescue_timeout").and_then(|v| v.parse().ok()).map(Duration::from_secs);
    let wait = boot.settings.as_ref().map(|s| s.rescue_timeout).or(raw_wait).unwrap_or(default_wait);
    let shell = cmdline.get("layerboot.rescue").is_some_and(|v| v == "shell");
    console::fail(err.message(), wait, shell)
}
