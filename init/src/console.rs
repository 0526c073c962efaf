//! The one way out of layerboot-init, with two audiences:
//! - the record: progress goes to the kernel log through `log` (kernlog), which the
//!   console also shows unless `quiet`, and which the journal keeps;
//! - the person: warnings and failures go through [`say`] straight to /dev/console,
//!   since /dev/kmsg writes are rate-limited and may be hidden by the log level.
//!
//! Nothing else in the crate prints: a new message picks one of these two.

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

/// Logs to /dev/kmsg at info level, or debug with `layerboot.debug`. May be called again
/// to change the level (the logger itself passes everything; `log`'s max level filters).
pub fn init_logging(debug: bool) {
    if let Ok(logger) = kernlog::KernelLog::with_level(log::LevelFilter::Debug) {
        let _ = log::set_boxed_logger(Box::new(logger));
    }
    log::set_max_level(if debug {
        log::LevelFilter::Debug
    } else {
        log::LevelFilter::Info
    });
}

/// How a failure reads on the console, at boot and under `--mount-root` alike.
pub fn failure_text(msg: &str) -> String {
    let mut text = String::from("layerboot: BOOT FAILED");
    for line in msg.lines() {
        text.push_str("\n  ");
        text.push_str(line);
    }
    text
}

/// A wrong invocation by hand (not at boot): the reason on stderr, exit status 2.
pub fn usage(msg: &str) -> ! {
    eprintln!("{msg}");
    std::process::exit(2);
}

/// The shell `layerboot initramfs --rescue-shell` packs.
pub const RESCUE_SHELL: &str = "/bin/sh";

/// The end of a failed boot: the reason on the console, then a rescue shell if asked
/// for and packed, else a pause (Enter or the timeout) and a reboot. PID 1 must never
/// exit (that is a kernel panic), so this never returns.
pub fn fail(msg: &str, wait: Duration, rescue_shell: bool) -> ! {
    say("");
    say(&failure_text(msg));
    if rescue_shell {
        if std::path::Path::new(RESCUE_SHELL).exists() {
            say("layerboot: starting a rescue shell (layerboot.rescue=shell); `exit` reboots.");
            match std::process::Command::new(RESCUE_SHELL).status() {
                Ok(status) => say(&format!("layerboot: rescue shell ended ({status})")),
                Err(e) => say(&format!("layerboot: cannot run the rescue shell {RESCUE_SHELL}: {e}")),
            }
        } else {
            say("layerboot: layerboot.rescue=shell, but this initramfs has no shell (build it with `layerboot initramfs --rescue-shell PATH`).");
        }
    }
    say(&format!(
        "Press Enter to reboot now; the machine reboots in {} s (layerboot.rescue_timeout=S changes this).",
        wait.as_secs()
    ));
    wait_for_enter(wait);
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Returns when a line is typed on the console or `wait` has passed.
fn wait_for_enter(wait: Duration) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::io::Read;
    use std::os::fd::AsFd;
    let Ok(mut console) = std::fs::OpenOptions::new().read(true).open("/dev/console") else {
        std::thread::sleep(wait);
        return;
    };
    // checked: no wait, however long, may overflow into a panic in PID 1.
    let deadline = std::time::Instant::now()
        .checked_add(wait)
        .unwrap_or_else(|| std::time::Instant::now() + Duration::from_secs(86_400));
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return;
        }
        let ms = PollTimeout::from(left.as_millis().min(60_000) as u16);
        let mut fds = [PollFd::new(console.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, ms) {
            Ok(n) if n > 0 => {
                let mut buf = [0u8; 64];
                match console.read(&mut buf) {
                    Ok(n) if buf[..n].iter().any(|&b| b == b'\n' || b == b'\r') => return,
                    Ok(0) | Err(_) => std::thread::sleep(left.min(Duration::from_millis(100))),
                    Ok(_) => {}
                }
            }
            _ => {}
        }
    }
}
