//! The reboot deadline of a counted boot: a boot the boot loader counts must be blessed
//! within `layerboot.bless_timeout=`, or the machine reboots and the loader counts one
//! failed try (and falls back once the tries are used up). `docs/deadline.md` argues it.
//!
//! The deadline is kept by the post-switch helper (`after_switch.rs`), a process /init
//! leaves behind, outside the image's init and its dependency graph: emergency mode,
//! rescue mode, a hung boot script or an init that is not systemd cannot cancel it. This
//! module is what it decides, as plain functions a host can test; the helper does the
//! waiting and the rebooting.
//!
//! Everything else talks to it through files in `/run/layerboot/`, never a PID:
//! - [`DUE_FILE`]: written by the helper, when the reboot is due (CLOCK_MONOTONIC);
//! - [`STOP_FILE`]: written by whatever stops it (the bless, a shutdown, a person), with
//!   the reason.

use std::fs;
use std::io::Read;
use std::path::Path;
use std::time::Duration;

/// The directory every file of the deadline lives in; the helper's own root.
pub const RUN_DIR: &str = "/run/layerboot";
/// When the reboot is due: `due=SECONDS timeout=SECONDS counted-by=loader|grub`,
/// seconds of CLOCK_MONOTONIC.
pub const DUE_FILE: &str = "deadline";
/// Its presence stops the deadline; it holds the reason.
pub const STOP_FILE: &str = "deadline-stop";
/// After asking init for a clean reboot: how long before the helper reboots itself. A
/// clean reboot that waits out one hung stop job (systemd's default: 90 s) still fits.
pub const GRACE: Duration = Duration::from_secs(120);
/// How long before the reboot the console is told, and how to stop it.
pub const WARN_AHEAD: Duration = Duration::from_secs(60);
/// What a person types to stay (to repair the machine at the console).
pub const STAY_COMMAND: &str = "touch /run/layerboot/deadline-stop";

/// What the helper does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing yet: look again soon.
    Wait,
    /// Tell the console that the reboot comes in this long, and how to stop it.
    Warn(Duration),
    /// The deadline passed: ask init for a clean reboot (`kill(1, SIGINT)`).
    AskInit,
    /// The clean reboot did not come within [`GRACE`]: sync (bounded) and reboot(2).
    Force,
    /// Stopped before it fired, for this reason: the helper's deadline work is over.
    StandDown(String),
}

/// The deadline's state: due at `due` (CLOCK_MONOTONIC), escalated `grace` later.
#[derive(Clone, Debug)]
pub struct Deadline {
    pub due: Duration,
    grace: Duration,
    warned: bool,
    /// When init was asked for a reboot: the grace counts from then, not from `due`
    /// (a helper that wakes late, a VM paused, must still give init its grace).
    asked_at: Option<Duration>,
    forced: bool,
}

impl Deadline {
    pub fn new(due: Duration, grace: Duration) -> Deadline {
        Deadline {
            due,
            grace,
            warned: false,
            asked_at: None,
            forced: false,
        }
    }

    /// The next step at `now`, with the stop file's reason if it is there. Once init was
    /// asked to reboot, nothing stops it: the shutdown that reboot starts writes the stop
    /// file too, and a hung shutdown must still end in a reboot.
    pub fn step(&mut self, now: Duration, stop: Option<&str>) -> Step {
        if let Some(asked_at) = self.asked_at {
            if !self.forced && now >= asked_at + self.grace {
                self.forced = true;
                return Step::Force;
            }
            return Step::Wait;
        }
        if let Some(reason) = stop {
            return Step::StandDown(reason.to_string());
        }
        if now >= self.due {
            self.asked_at = Some(now);
            return Step::AskInit;
        }
        if !self.warned && now + WARN_AHEAD >= self.due {
            self.warned = true;
            return Step::Warn(self.due - now);
        }
        Step::Wait
    }
}

/// The due file's text; `loader`: systemd-boot counts the boot, if it set
/// `LoaderBootCountPath` (else GRUB's grubenv does).
pub fn due_text(due: Duration, timeout: Duration, loader: bool) -> String {
    let by = if loader { "loader" } else { "grub" };
    format!("due={} timeout={} counted-by={by}\n", due.as_secs(), timeout.as_secs())
}

/// The due file's `due=` and `timeout=`, if it is one.
pub fn parse_due(text: &str) -> Option<(Duration, Duration)> {
    let mut due = None;
    let mut timeout = None;
    for field in text.split_whitespace() {
        match field.split_once('=') {
            Some(("due", v)) => due = v.parse().ok().map(Duration::from_secs),
            Some(("timeout", v)) => timeout = v.parse().ok().map(Duration::from_secs),
            _ => {}
        }
    }
    Some((due?, timeout?))
}

/// The stop file's reason, read from the directory `run` (at most a line of it), if it is
/// there. Anything that is there stops the deadline, even an empty file (`touch`).
pub fn stop_reason(run: &Path) -> Option<String> {
    let path = run.join(STOP_FILE);
    fs::symlink_metadata(&path).ok()?;
    let mut text = String::new();
    let _ = fs::File::open(&path).and_then(|f| f.take(200).read_to_string(&mut text));
    let reason = text.lines().next().unwrap_or("").trim();
    Some(if reason.is_empty() {
        "stopped by hand".to_string()
    } else {
        reason.to_string()
    })
}

/// Stops the deadline of this boot, if one runs, with `reason`: the bless, a shutdown or
/// a person. Written whether or not the helper's due file is there (the helper may have
/// failed to write it); returns whether a deadline was known to run.
pub fn stand_down(run: &Path, reason: &str) -> std::io::Result<bool> {
    if !run.is_dir() {
        return Ok(false);
    }
    fs::write(run.join(STOP_FILE), format!("{reason}\n"))?;
    Ok(run.join(DUE_FILE).exists())
}

/// What the console says when emergency or rescue mode starts (or the reboot comes
/// near): when the machine reboots, and how to stop it.
pub fn notice(remaining: Option<Duration>, timeout: Duration) -> String {
    let when = match remaining {
        Some(r) if !r.is_zero() => format!("reboots in {} s", r.as_secs().max(1)),
        _ => "is rebooting now".to_string(),
    };
    format!(
        "layerboot: this boot is not blessed yet (layerboot.bless_timeout={}): the machine {when}, \
         and the boot loader counts a failed try (it falls back once the tries are used up).\n\
         layerboot: to stay and repair it: {STAY_COMMAND} (a good boot stops it itself: `layerboot bless`)",
        timeout.as_secs()
    )
}

/// The notice for emergency or rescue mode (their drop-in), from the due file in `run`;
/// `now` is CLOCK_MONOTONIC, `loader_counts` whether systemd-boot set
/// `LoaderBootCountPath`. None when no deadline runs, it stopped, or nobody counts the
/// boot (the helper will not reboot it).
pub fn notice_from(run: &Path, now: Duration, loader_counts: bool) -> Option<String> {
    let text = fs::read_to_string(run.join(DUE_FILE)).ok()?;
    let (due, timeout) = parse_due(&text)?;
    let by_loader = text.split_whitespace().any(|f| f == "counted-by=loader");
    if stop_reason(run).is_some() || (by_loader && !loader_counts) {
        return None;
    }
    Some(format!(
        "layerboot: emergency or rescue mode: {}",
        notice(due.checked_sub(now), timeout).trim_start_matches("layerboot: ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn the_deadline_warns_then_asks_init_then_forces_once_each() {
        let mut d = Deadline::new(S(300), S(120));
        assert_eq!(d.step(S(10), None), Step::Wait);
        assert_eq!(d.step(S(250), None), Step::Warn(S(50)));
        assert_eq!(d.step(S(260), None), Step::Wait, "warned once");
        assert_eq!(d.step(S(300), None), Step::AskInit);
        assert_eq!(d.step(S(301), None), Step::Wait);
        // The reboot init runs writes the stop file: too late to stop anything.
        assert_eq!(d.step(S(350), Some("shutdown")), Step::Wait);
        assert_eq!(d.step(S(420), Some("shutdown")), Step::Force);
        assert_eq!(d.step(S(500), None), Step::Wait, "forced once");
    }

    #[test]
    fn a_stop_before_the_deadline_stands_it_down_with_its_reason() {
        let mut d = Deadline::new(S(300), S(120));
        assert_eq!(d.step(S(299), Some("blessed")), Step::StandDown("blessed".into()));
        // A helper that wakes long past its deadline (a VM paused) asks first, and gives
        // init its whole grace from then.
        let mut late = Deadline::new(S(300), S(120));
        assert_eq!(late.step(S(10_000), None), Step::AskInit);
        assert_eq!(late.step(S(10_001), None), Step::Wait);
        assert_eq!(late.step(S(10_120), None), Step::Force);
    }

    #[test]
    fn the_stop_file_is_read_by_presence_and_its_first_line() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(stop_reason(t.path()), None);
        let nowhere = t.path().join("none");
        assert!(
            !stand_down(&nowhere, "blessed").unwrap(),
            "no run directory: nothing written"
        );
        assert!(!nowhere.exists());
        // No due file (the helper could not write it): stopped all the same.
        assert!(!stand_down(t.path(), "blessed").unwrap());
        assert_eq!(stop_reason(t.path()).as_deref(), Some("blessed"));
        fs::write(t.path().join(DUE_FILE), due_text(S(90), S(60), true)).unwrap();
        assert!(stand_down(t.path(), "blessed").unwrap());
        assert_eq!(stop_reason(t.path()).as_deref(), Some("blessed"));
        fs::write(t.path().join(STOP_FILE), "").unwrap();
        assert_eq!(stop_reason(t.path()).as_deref(), Some("stopped by hand"));
        // A huge file, or a directory, in its place still stops it, without reading it all.
        fs::remove_file(t.path().join(STOP_FILE)).unwrap();
        fs::create_dir(t.path().join(STOP_FILE)).unwrap();
        assert_eq!(stop_reason(t.path()).as_deref(), Some("stopped by hand"));
    }

    #[test]
    fn the_notice_names_the_time_left_and_how_to_stay() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(notice_from(t.path(), S(10), true), None, "no deadline runs");
        fs::write(t.path().join(DUE_FILE), due_text(S(130), S(100), true)).unwrap();
        let n = notice_from(t.path(), S(57), true).unwrap();
        assert!(n.starts_with("layerboot: emergency or rescue mode: "), "{n}");
        assert!(n.contains("reboots in 73 s") && n.contains("bless_timeout=100"), "{n}");
        assert!(n.contains(STAY_COMMAND), "{n}");
        assert!(notice_from(t.path(), S(200), true).unwrap().contains("rebooting now"));
        // systemd-boot does not count this boot: the helper will not reboot it, so no word.
        assert_eq!(notice_from(t.path(), S(57), false), None);
        fs::write(t.path().join(DUE_FILE), due_text(S(130), S(100), false)).unwrap();
        assert!(
            notice_from(t.path(), S(57), false).is_some(),
            "GRUB's count is not the loader's"
        );
        fs::write(t.path().join(STOP_FILE), "blessed\n").unwrap();
        assert_eq!(notice_from(t.path(), S(57), true), None, "stopped: nothing to say");
        assert_eq!(parse_due("due=x timeout=1"), None);
        assert_eq!(parse_due(&due_text(S(5), S(6), false)), Some((S(5), S(6))));
    }
}
