//! The post-switch helper: the one process /init leaves behind when it hands the machine
//! to the image's init. It keeps the reboot deadline (`deadline.rs`) today; background
//! work that must not delay the boot joins it as another task. `docs/deadline.md` argues
//! the design; in short:
//!
//! - it is forked by /init after the switch, just before the image's init is executed,
//!   so it runs before anything of the image's can fail, whatever the init is, and no
//!   unit, isolate or emergency mode of the image's init can cancel it;
//! - it executes /init's copy in `/run/layerboot/` afresh (none of the boot's memory),
//!   closes every descriptor it inherited but the console, and chroots into
//!   `/run/layerboot/` (the /run tmpfs): it holds nothing in the store or the new root,
//!   so it never keeps them busy;
//! - its name never starts with `@`: systemd-shutdown, sysvinit's sendsigs and OpenRC's
//!   killprocs all send it SIGTERM, on which it exits at once, so the store unmounts.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::fcntl::{open, openat, OFlag};
use nix::sys::signal::{self, SigHandler, Signal};
use nix::sys::stat::Mode;
use nix::sys::statfs::{fstatfs, FsType};
use nix::time::{clock_gettime, ClockId};
use nix::unistd::{chdir, chroot, execve, fchdir, fork, setsid, ForkResult, Pid};

use crate::deadline::{self, Deadline, Step};
use crate::error::{Error, Result};

/// The helper's argv[0]: no `@`, so every shutdown stops it.
pub const NAME: &str = "layerboot-after-switch";
/// The flag that makes /init's program the helper.
pub const FLAG: &str = "--after-switch";

/// Which loader counts this boot: what the helper checks before it reboots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CountedBy {
    /// systemd-boot, if it set `LoaderBootCountPath` (read when the deadline passes).
    Loader,
    /// A GRUB deployment: its variable in layerboot's grubenv.
    Grub,
}

/// What the helper does after the switch: the whole request, passed as arguments.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The reboot deadline: `layerboot.bless_timeout=` and who counts the boot.
    pub deadline: Option<(Duration, CountedBy)>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.deadline.is_none()
    }

    /// The helper's arguments after [`FLAG`].
    pub fn to_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some((timeout, by)) = self.deadline {
            args.push(format!("deadline={}", timeout.as_secs()));
            args.push(format!(
                "counted-by={}",
                if by == CountedBy::Loader { "loader" } else { "grub" }
            ));
        }
        args
    }

    pub fn parse(args: &[String]) -> Result<Plan> {
        let mut timeout = None;
        let mut by = None;
        for a in args {
            match a.split_once('=') {
                Some(("deadline", v)) => {
                    let secs: u64 = v.parse().map_err(|_| format!("{FLAG}: bad {a}"))?;
                    // The bound /init's settings put on bless_timeout= (a day): no overflow.
                    timeout = Some(Duration::from_secs(secs.min(crate::settings::MAX_WAIT_S)))
                }
                Some(("counted-by", "loader")) => by = Some(CountedBy::Loader),
                Some(("counted-by", "grub")) => by = Some(CountedBy::Grub),
                _ => return Err(format!("{FLAG}: unknown argument '{a}'").into()),
            }
        }
        match (timeout, by) {
            (Some(t), Some(b)) if !t.is_zero() => Ok(Plan { deadline: Some((t, b)) }),
            (None, None) => Ok(Plan::default()),
            _ => Err(format!("{FLAG}: deadline= (not 0) and counted-by= go together").into()),
        }
    }
}

/// Leaves the helper behind: forks, and the child executes `program` with the plan.
/// Called by the switch after the chroot, as the last step before the image's init.
pub fn spawn(program: &Path, plan: &Plan) -> Result<()> {
    // The child could only _exit(127), unseen: say it now instead.
    nix::unistd::access(program, nix::unistd::AccessFlags::X_OK)
        .map_err(|e| Error::new(format!("the post-switch helper {} cannot run: {e}", program.display())))?;
    let cstr = |s: &str| CString::new(s).map_err(|_| Error::new(format!("NUL byte in {s:?}")));
    let path = cstr(&program.to_string_lossy())?;
    let mut argv = vec![cstr(NAME)?, cstr(FLAG)?];
    for a in plan.to_args() {
        argv.push(cstr(&a)?);
    }
    // Everything is made before the fork: the child only executes.
    // SAFETY: /init is single-threaded here, and the child calls only execve and _exit.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            let _ = execve::<CString, CString>(&path, &argv, &[]);
            // SAFETY: _exit ends the child without running anything of the parent's.
            unsafe { nix::libc::_exit(127) }
        }
        Ok(ForkResult::Parent { .. }) => Ok(()),
        Err(e) => Err(Error::new(format!("cannot start the post-switch helper: {e}"))),
    }
}

static TERMINATED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: nix::libc::c_int) {
    TERMINATED.store(true, Ordering::SeqCst);
}

/// The helper's life: `layerboot-init --after-switch ARGS`. Exits 0 on SIGTERM or when
/// its work is done; a deadline that passes ends in a reboot instead.
pub fn run(args: &[String]) -> ! {
    // This process lives on: memory it no longer needs goes back, unlike /init's.
    crate::arena::retire();
    let plan = match Plan::parse(args) {
        Ok(plan) => plan,
        Err(e) => crate::console::usage(&e.to_string()),
    };
    // Nothing /init held comes along: only the console (0, 1, 2).
    // SAFETY: a plain syscall on descriptors this process owns and no one else uses yet.
    unsafe { nix::libc::syscall(nix::libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    let out = Output::open();
    // sysfs, for the loader's variables; not the new root, which the helper leaves.
    let sys = open(
        "/sys",
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .ok()
    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
    let _ = setsid();
    if let Err(e) = chdir(deadline::RUN_DIR)
        .and_then(|_| chroot("."))
        .and_then(|_| chdir("/"))
    {
        out.say(&format!(
            "layerboot: the post-switch helper cannot enter {}: {e}; no reboot deadline",
            deadline::RUN_DIR
        ));
        std::process::exit(1);
    }
    let term = signal::SigAction::new(
        SigHandler::Handler(on_term),
        signal::SaFlags::empty(),
        signal::SigSet::empty(),
    );
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        let _ = signal::sigaction(Signal::SIGTERM, &term);
        for s in [Signal::SIGINT, Signal::SIGHUP, Signal::SIGPIPE] {
            let _ = signal::signal(s, SigHandler::SigIgn);
        }
    }
    if let Some((timeout, by)) = plan.deadline {
        keep_deadline(timeout, by, sys.as_ref(), &out);
    }
    std::process::exit(0)
}

fn monotonic() -> Duration {
    clock_gettime(ClockId::CLOCK_MONOTONIC).map_or(Duration::ZERO, Duration::from)
}

/// Waits for the deadline, in the helper's root (`/run/layerboot`), and acts on it.
fn keep_deadline(timeout: Duration, by: CountedBy, sys: Option<&OwnedFd>, out: &Output) {
    let here = Path::new("/");
    let mut d = Deadline::new(monotonic() + timeout, deadline::GRACE);
    let loader = by == CountedBy::Loader;
    if let Err(e) = std::fs::write(
        here.join(deadline::DUE_FILE),
        deadline::due_text(d.due, timeout, loader),
    ) {
        out.log(&format!("layerboot: cannot write the deadline's due file: {e}"));
    }
    out.log(&format!(
        "layerboot: this boot must be blessed within {} s, or the machine reboots",
        timeout.as_secs()
    ));
    while !TERMINATED.load(Ordering::SeqCst) {
        match d.step(monotonic(), deadline::stop_reason(here).as_deref()) {
            Step::Wait => std::thread::sleep(Duration::from_millis(500)),
            // systemd-boot does not count a blessed entry's boots: no warning, no reboot
            // (as far as efivarfs, mounted by the image's init, tells already).
            Step::Warn(_) if loader && loader_counts(sys, false) == Some(false) => {
                out.log("layerboot: the boot loader does not count this boot: no reboot deadline");
                return;
            }
            Step::Warn(left) => out.say(&deadline::notice(Some(left), timeout)),
            Step::StandDown(reason) => {
                out.log(&format!("layerboot: the reboot deadline is stopped: {reason}"));
                return;
            }
            Step::AskInit => {
                if loader && loader_counts(sys, true) == Some(false) {
                    out.say("layerboot: this boot is not blessed, but the boot loader does not count it: no reboot");
                    return;
                }
                out.say(&format!(
                    "layerboot: this boot was not blessed within layerboot.bless_timeout={}: rebooting, so that \
                     the boot loader counts a failed try (asking init for a clean reboot; in {} s without one, \
                     a forced reboot)",
                    timeout.as_secs(),
                    deadline::GRACE.as_secs()
                ));
                let _ = signal::kill(Pid::from_raw(1), Signal::SIGINT);
            }
            Step::Force => {
                out.say("layerboot: no clean reboot came: syncing (10 s at most) and rebooting");
                bounded_sync(Duration::from_secs(10));
                let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
            }
        }
    }
}

/// sync(2) in a child process, waited for at most `bound`: a dead disk must not stop the
/// reboot. (A process, not a thread: threads and channels would add 60 KB to /init.)
fn bounded_sync(bound: Duration) {
    // SAFETY: the helper is single-threaded; the child only syncs and exits.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            nix::unistd::sync();
            // SAFETY: _exit ends the child without running anything of the parent's.
            unsafe { nix::libc::_exit(0) }
        }
        Ok(ForkResult::Parent { child }) => {
            let start = monotonic();
            while monotonic() < start + bound {
                match nix::sys::wait::waitpid(child, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
                    Ok(nix::sys::wait::WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(100)),
                    _ => return,
                }
            }
        }
        Err(_) => {}
    }
}

/// efivarfs's magic (linux/magic.h; nix names none).
const EFIVARFS_MAGIC: FsType = FsType(0xde5e_81e4);

/// Whether systemd-boot counts this boot (`LoaderBootCountPath` set), through sysfs's
/// descriptor; with `mount`, efivarfs is mounted for the look if the image's init did
/// not. None: it cannot be told, and the boot is taken as counted.
fn loader_counts(sys: Option<&OwnedFd>, mount: bool) -> Option<bool> {
    let sys = sys?;
    const EFIVARS: &str = "firmware/efi/efivars";
    let variable = format!(
        "{EFIVARS}/{}",
        crate::bless::loader_variable_name("LoaderBootCountPath")
    );
    let mounted = || {
        openat(
            Some(sys.as_raw_fd()),
            EFIVARS,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .ok()
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .and_then(|fd| fstatfs(&fd).ok())
        .is_some_and(|s| s.filesystem_type() == EFIVARFS_MAGIC)
    };
    let exists = || {
        openat(
            Some(sys.as_raw_fd()),
            variable.as_str(),
            OFlag::O_PATH | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map(|fd| drop(unsafe { OwnedFd::from_raw_fd(fd) }))
        .is_ok()
    };
    if mounted() {
        return Some(exists());
    }
    if !mount {
        return None;
    }
    // The mount point is named from sysfs's directory, outside the helper's root.
    fchdir(sys.as_raw_fd()).ok()?;
    let flags = nix::mount::MsFlags::MS_RDONLY
        | nix::mount::MsFlags::MS_NOSUID
        | nix::mount::MsFlags::MS_NODEV
        | nix::mount::MsFlags::MS_NOEXEC;
    let answer = nix::mount::mount(Some("efivarfs"), EFIVARS, Some("efivarfs"), flags, None::<&str>)
        .ok()
        .map(|_| {
            let answer = exists();
            let _ = nix::mount::umount(EFIVARS);
            answer
        });
    let _ = chdir("/");
    answer
}

/// Where the helper speaks, opened before it leaves the new root: the console for
/// people, the kernel log (and so the journal) for the record.
struct Output {
    console: Option<File>,
    kmsg: Option<File>,
}

impl Output {
    fn open() -> Output {
        let open = |p: &str| {
            OpenOptions::new()
                .write(true)
                // The console must not become the helper's controlling terminal, and a
                // console nobody drains (flow control, a stuck serial line) must not
                // stop a reboot: a write that would block is dropped.
                .custom_flags(nix::libc::O_NOCTTY | nix::libc::O_NONBLOCK)
                .open(p)
                .ok()
        };
        Output {
            console: open("/dev/console"),
            kmsg: open("/dev/kmsg"),
        }
    }

    /// To the console, and to the kernel log at debug level (for the journal, without
    /// the console showing it twice).
    fn say(&self, msg: &str) {
        if let Some(mut c) = self.console.as_ref() {
            let _ = writeln!(c, "{msg}");
        }
        self.record(7, msg);
    }

    /// To the kernel log only.
    fn log(&self, msg: &str) {
        self.record(6, msg);
    }

    fn record(&self, level: u8, msg: &str) {
        if let Some(mut k) = self.kmsg.as_ref() {
            for line in msg.lines() {
                let _ = k.write_all(format!("<{level}>{line}\n").as_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_goes_through_the_helpers_arguments_unchanged() {
        let plan = Plan {
            deadline: Some((Duration::from_secs(90), CountedBy::Loader)),
        };
        assert_eq!(plan.to_args(), ["deadline=90", "counted-by=loader"]);
        assert_eq!(Plan::parse(&plan.to_args()).unwrap(), plan);
        let grub = Plan {
            deadline: Some((Duration::from_secs(900), CountedBy::Grub)),
        };
        assert_eq!(Plan::parse(&grub.to_args()).unwrap(), grub);
        assert!(Plan::parse(&[]).unwrap().is_empty());
        // A huge deadline is bounded as bless_timeout= is: no overflow in the helper.
        let huge: Vec<String> = ["deadline=18446744073709551615", "counted-by=grub"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            Plan::parse(&huge).unwrap().deadline,
            Some((Duration::from_secs(crate::settings::MAX_WAIT_S), CountedBy::Grub))
        );
        for bad in [
            &["deadline=90"][..],
            &["deadline=0", "counted-by=grub"],
            &["deadline=x", "counted-by=grub"],
            &["counted-by=lilo"],
            &["--delete=/"],
        ] {
            let bad: Vec<String> = bad.iter().map(|s| s.to_string()).collect();
            assert!(Plan::parse(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_helpers_name_is_never_spared_by_a_shutdown() {
        assert!(!NAME.starts_with('@'));
        assert!(!crate::shutdown::is_shutdown(NAME));
    }
}
