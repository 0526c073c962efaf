//! Talking to the person at the machine. Progress goes to the kernel log (kernlog), which
//! the console shows unless `quiet`; failures go straight to /dev/console, since
//! /dev/kmsg writes are rate-limited and may be hidden by the log level.

use std::io::Write;
use std::time::Duration;

/// Writes a line to the console, whatever the log level.
pub fn say(msg: &str) {
    if let Ok(mut c) = std::fs::OpenOptions::new().write(true).open("/dev/console") {
        let _ = writeln!(c, "{msg}");
    } else {
        eprintln!("{msg}");
    }
}

/// Logs to /dev/kmsg at info level, or debug with `layerboot.debug`.
pub fn init_logging(debug: bool) {
    let level = if debug { log::LevelFilter::Debug } else { log::LevelFilter::Info };
    if let Ok(logger) = kernlog::KernelLog::with_level(level) {
        if log::set_boxed_logger(Box::new(logger)).is_ok() {
            log::set_max_level(level);
            return;
        }
    }
    log::set_max_level(level);
}

/// The end of a failed boot: the reason on the console, a pause to read it, a reboot.
/// PID 1 must never exit (that is a kernel panic), so this never returns.
pub fn fail(msg: &str, wait: Duration) -> ! {
    say("");
    say("layerboot: BOOT FAILED");
    for line in msg.lines() {
        say(&format!("  {line}"));
    }
    say(&format!("The machine reboots in {} s (layerboot.rescue_timeout=S changes this).", wait.as_secs()));
    std::thread::sleep(wait);
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
